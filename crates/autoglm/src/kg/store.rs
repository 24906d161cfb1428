//! An RDF store (oxigraph, in memory) with SPARQL, persisted as an
//! N-Quads file written atomically.
//!
//! Oxigraph's on-disk backend is RocksDB, a C++ build of several minutes
//! on our 2-core machines for every clean CI run; an in-memory store
//! loaded from its N-Quads dump (the whole of WordNet: see
//! docs/benchmarks.md) costs far less. Any RDF graph a user has loads the
//! same way as ours: Turtle, N-Triples, N-Quads, TriG, RDF/XML.

use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::time::Duration;

use oxigraph::io::{RdfFormat, RdfParseError, RdfParser};
use oxigraph::model::{Term, Variable};
use oxigraph::sparql::{
    CancellationToken, DefaultServiceHandler, QueryEvaluationError, QueryResults, SparqlEvaluator,
};
use oxigraph::store::{LoaderError, Store};

use crate::{Error, Result};

/// The answer of a query, materialised.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// SELECT: variable names, and one row per solution (unbound → None).
    Solutions {
        variables: Vec<String>,
        rows: Vec<Vec<Option<Term>>>,
    },
    /// ASK.
    Boolean(bool),
    /// CONSTRUCT / DESCRIBE: N-Triples lines.
    Graph(Vec<String>),
}

/// Limits on one query, so that a user's query cannot run away.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    pub timeout: Duration,
    pub max_rows: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            max_rows: 100_000,
        }
    }
}

/// Federated `SERVICE` calls would send parts of the query (and so user
/// text) to another server: refused.
struct RefuseService;

impl DefaultServiceHandler for RefuseService {
    type Error = std::io::Error;

    fn handle(
        &self,
        service_name: &oxigraph::model::NamedNode,
        _pattern: &spargebra::algebra::GraphPattern,
        _base_iri: Option<&oxiri::Iri<String>>,
    ) -> std::result::Result<oxigraph::sparql::QuerySolutionIter<'static>, Self::Error> {
        Err(std::io::Error::other(format!(
            "federated SERVICE queries are disabled (SERVICE {service_name}): this store answers from its own data only"
        )))
    }
}

pub struct KnowledgeGraph {
    store: Store,
}

impl KnowledgeGraph {
    pub fn new() -> Result<Self> {
        Ok(Self {
            store: Store::new()
                .map_err(|e| Error::Invalid(format!("cannot create the store: {e}")))?,
        })
    }

    /// Loads a store saved by [`Self::save`].
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Missing {
                path: path.to_path_buf(),
                hint: "no such knowledge graph; create it with `autoglm kg load FILE…` or `autoglm kg import-wordnet`".into(),
            });
        }
        let kg = Self::new()?;
        kg.load_file(path, Some(RdfFormat::NQuads))?;
        Ok(kg)
    }

    /// Writes every quad as N-Quads: temp file, fsync, rename.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let tmp = path.with_extension("nq.tmp");
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = BufWriter::new(f);
        self.store
            .dump_to_writer(RdfFormat::NQuads, &mut w)
            .map_err(|e| Error::io(&tmp, std::io::Error::other(e)))?;
        let f = w
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        Ok(())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Number of quads.
    pub fn len(&self) -> Result<usize> {
        self.store
            .len()
            .map_err(|e| Error::Invalid(format!("store: {e}")))
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Adds the triples or quads of `path`; the format comes from the
    /// extension unless given. Returns the number of quads added. A syntax
    /// error names the file, line and column.
    pub fn load_file(&self, path: &Path, format: Option<RdfFormat>) -> Result<usize> {
        let format = match format {
            Some(f) => f,
            None => format_of(path)?,
        };
        let before = self.len()?;
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let base = format!("file://{}", path.display());
        let parser = RdfParser::from_format(format)
            .with_base_iri(&base)
            .unwrap_or_else(|_| RdfParser::from_format(format));
        self.store
            .load_from_reader(parser, BufReader::new(f))
            .map_err(|e| load_error(path, e))?;
        Ok(self.len()? - before)
    }

    /// Runs a SPARQL query; `bindings` substitute variables with terms
    /// (how user text enters a query: as a term, never as query text). A
    /// bound variable must be in the SELECT projection.
    pub fn query(
        &self,
        sparql: &str,
        bindings: &[(&str, Term)],
        limits: QueryLimits,
    ) -> Result<Answer> {
        let token = CancellationToken::new();
        let mut q = SparqlEvaluator::new()
            .with_default_service_handler(RefuseService)
            .with_cancellation_token(token.clone())
            .parse_query(sparql)
            .map_err(|e| Error::Invalid(format!("SPARQL syntax: {e}")))?;
        for (var, term) in bindings {
            let v =
                Variable::new(*var).map_err(|e| Error::Invalid(format!("variable ?{var}: {e}")))?;
            q = q.substitute_variable(v, term.clone());
        }
        // The timeout cancels the evaluation from a watchdog thread.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let watchdog = {
            let token = token.clone();
            let timeout = limits.timeout;
            std::thread::spawn(move || {
                if done_rx.recv_timeout(timeout).is_err() {
                    token.cancel();
                }
            })
        };
        let result = self.run(q.on_store(&self.store).execute(), limits);
        let _ = done_tx.send(());
        let _ = watchdog.join();
        result
    }

    fn run(
        &self,
        results: std::result::Result<QueryResults<'_>, QueryEvaluationError>,
        limits: QueryLimits,
    ) -> Result<Answer> {
        let eval = |e: QueryEvaluationError| {
            match e {
            QueryEvaluationError::Cancelled => Error::Invalid(format!(
                "the query ran past its time limit of {:?}; make it more selective (LIMIT, fewer hops)",
                limits.timeout
            )),
            QueryEvaluationError::Service(e) => Error::Invalid(e.to_string()),
            e => Error::Invalid(format!("SPARQL: {e}")),
        }
        };
        let too_many = || {
            Error::Invalid(format!(
                "the query has more than {} results; add a LIMIT",
                limits.max_rows
            ))
        };
        Ok(match results.map_err(eval)? {
            QueryResults::Boolean(b) => Answer::Boolean(b),
            QueryResults::Solutions(solutions) => {
                let variables: Vec<String> = solutions
                    .variables()
                    .iter()
                    .map(|v| v.as_str().to_string())
                    .collect();
                let mut rows = Vec::new();
                for s in solutions {
                    let s = s.map_err(eval)?;
                    if rows.len() == limits.max_rows {
                        return Err(too_many());
                    }
                    rows.push(
                        variables
                            .iter()
                            .map(|v| s.get(v.as_str()).cloned())
                            .collect(),
                    );
                }
                Answer::Solutions { variables, rows }
            }
            QueryResults::Graph(triples) => {
                let mut out = Vec::new();
                for t in triples {
                    if out.len() == limits.max_rows {
                        return Err(too_many());
                    }
                    out.push(format!("{} .", t.map_err(eval)?));
                }
                Answer::Graph(out)
            }
        })
    }
}

/// The RDF format of a file from its extension.
pub fn format_of(path: &Path) -> Result<RdfFormat> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    RdfFormat::from_extension(&ext)
        .or(match ext.as_str() {
            "xml" | "owl" => Some(RdfFormat::RdfXml),
            _ => None,
        })
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: unknown RDF format; name the file .ttl, .nt, .nq, .trig or .rdf (or pass --format)",
                path.display()
            ))
        })
}

fn load_error(path: &Path, e: LoaderError) -> Error {
    match e {
        LoaderError::Parsing(RdfParseError::Syntax(s)) => match s.location() {
            Some(at) => Error::Invalid(format!(
                "{}:{}:{}: {s}",
                path.display(),
                at.start.line + 1,
                at.start.column + 1,
            )),
            None => Error::Invalid(format!("{}: {s}", path.display())),
        },
        LoaderError::Parsing(RdfParseError::Io(e)) => Error::io(path, e),
        e => Error::Invalid(format!("{}: {e}", path.display())),
    }
}

/// Writes `answer` as an aligned text table.
pub fn write_table(answer: &Answer, w: &mut dyn Write) -> std::io::Result<()> {
    match answer {
        Answer::Boolean(b) => writeln!(w, "{b}"),
        Answer::Graph(lines) => lines.iter().try_for_each(|l| writeln!(w, "{l}")),
        Answer::Solutions { variables, rows } => {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|t| t.as_ref().map(Term::to_string).unwrap_or_default())
                        .collect()
                })
                .collect();
            let widths: Vec<usize> = variables
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    cells
                        .iter()
                        .map(|r| r[i].chars().count())
                        .chain(std::iter::once(v.len() + 1))
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |w: &mut dyn Write, vals: Vec<String>| -> std::io::Result<()> {
                let parts: Vec<String> = vals
                    .iter()
                    .zip(&widths)
                    .map(|(v, n)| format!("{v:<n$}"))
                    .collect();
                writeln!(w, "{}", parts.join("  ").trim_end())
            };
            line(w, variables.iter().map(|v| format!("?{v}")).collect())?;
            for r in cells {
                line(w, r)?;
            }
            writeln!(w, "({} rows)", rows.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxigraph::model::Literal;

    fn kg_with(ttl: &str) -> (KnowledgeGraph, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.ttl");
        std::fs::write(&p, ttl).unwrap();
        let kg = KnowledgeGraph::new().unwrap();
        kg.load_file(&p, None).unwrap();
        (kg, dir)
    }

    const G: &str = r#"@prefix ex: <http://example.org/> .
ex:cat ex:isa ex:feline . ex:feline ex:isa ex:animal .
ex:cat ex:label "cat" . ex:dog ex:label "dog \"the good\" boy" .
"#;

    #[test]
    fn load_query_save_open() {
        let (kg, dir) = kg_with(G);
        assert_eq!(kg.len().unwrap(), 4);
        let a = kg
            .query(
                "PREFIX ex: <http://example.org/> SELECT ?x WHERE { ex:cat ex:isa+ ?x } ORDER BY ?x",
                &[],
                QueryLimits::default(),
            )
            .unwrap();
        let Answer::Solutions { variables, rows } = &a else {
            panic!("{a:?}")
        };
        assert_eq!(variables, &["x"]);
        let got: Vec<String> = rows
            .iter()
            .map(|r| r[0].as_ref().unwrap().to_string())
            .collect();
        assert_eq!(
            got,
            ["<http://example.org/animal>", "<http://example.org/feline>"]
        );
        let p = dir.path().join("store/g.nq");
        kg.save(&p).unwrap();
        let back = KnowledgeGraph::open(&p).unwrap();
        assert_eq!(back.len().unwrap(), 4);
        let mut out = Vec::new();
        write_table(&a, &mut out).unwrap();
        assert!(String::from_utf8(out).unwrap().ends_with("(2 rows)\n"));
    }

    #[test]
    fn user_text_bound_as_a_term_is_inert() {
        let (kg, _d) = kg_with(G);
        // Bound variables must be projected (oxigraph's rule).
        let q = "PREFIX ex: <http://example.org/> SELECT ?s ?name WHERE { ?s ex:label ?name }";
        // Strings that would break out of a literal or add clauses, were
        // they pasted into the query text.
        for evil in [
            "cat\" } ; DROP ALL ; SELECT * WHERE { ?s ?p ?o",
            "\" . ?s ?p ?o . FILTER(\"1\"=\"1",
            "} SERVICE <http://evil.example/sparql> { ?x ?y ?z }",
            "DROP GRAPH <http://example.org/>",
            "dog \\\"the good\\\" boy",
        ] {
            let a = kg
                .query(
                    q,
                    &[("name", Literal::new_simple_literal(evil).into())],
                    QueryLimits::default(),
                )
                .unwrap();
            assert_eq!(
                a,
                Answer::Solutions {
                    variables: vec!["s".into(), "name".into()],
                    rows: vec![]
                },
                "{evil}"
            );
        }
        assert_eq!(kg.len().unwrap(), 4, "nothing was dropped");
        // The real value, with its quotes, matches exactly one subject.
        let a = kg
            .query(
                q,
                &[(
                    "name",
                    Literal::new_simple_literal("dog \"the good\" boy").into(),
                )],
                QueryLimits::default(),
            )
            .unwrap();
        let Answer::Solutions { rows, .. } = a else {
            panic!()
        };
        assert_eq!(rows.len(), 1);
        // Updates are not queries.
        assert!(kg.query("DROP ALL", &[], QueryLimits::default()).is_err());
    }

    #[test]
    fn service_calls_are_refused() {
        let (kg, _d) = kg_with(G);
        let e = kg
            .query(
                "SELECT * WHERE { SERVICE <http://dbpedia.org/sparql> { ?s ?p ?o } }",
                &[],
                QueryLimits::default(),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("SERVICE queries are disabled"), "{e}");
    }

    #[test]
    fn malformed_rdf_names_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.ttl");
        std::fs::write(
            &p,
            "@prefix ex: <http://example.org/> .\nex:a ex:b ex:c .\nex:a ex:b \"open .\n",
        )
        .unwrap();
        let e = KnowledgeGraph::new()
            .unwrap()
            .load_file(&p, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.ttl:3:"), "{e}");
        let p = dir.path().join("g.unknown");
        std::fs::write(&p, "x").unwrap();
        assert!(KnowledgeGraph::new()
            .unwrap()
            .load_file(&p, None)
            .unwrap_err()
            .to_string()
            .contains("unknown RDF format"));
        let limits = QueryLimits {
            max_rows: 2,
            ..QueryLimits::default()
        };
        let (kg, _d) = kg_with(G);
        let e = kg
            .query("SELECT * WHERE { ?s ?p ?o }", &[], limits)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 2 results"), "{e}");
    }
}
