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
            "federated SERVICE queries are disabled (SERVICE {service_name}): this store answers from its own data only; `autoglm kg query --allow-service` enables them"
        )))
    }
}

/// Federated `SERVICE` calls, for a store whose user enabled them
/// ([`KnowledgeGraph::allow_federation`]): the service's part of the query
/// is POSTed to the endpoint as a SPARQL SELECT, and its JSON, XML, CSV or
/// TSV results join the local ones. No redirects (the user named this
/// endpoint, not another), a time limit per call and a size limit on the
/// answer.
struct HttpService {
    agent: ureq::Agent,
    max_bytes: u64,
}

impl HttpService {
    fn new(timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            agent,
            max_bytes: 64 << 20,
        }
    }
}

impl DefaultServiceHandler for HttpService {
    type Error = std::io::Error;

    fn handle(
        &self,
        service_name: &oxigraph::model::NamedNode,
        pattern: &spargebra::algebra::GraphPattern,
        base_iri: Option<&oxiri::Iri<String>>,
    ) -> std::result::Result<oxigraph::sparql::QuerySolutionIter<'static>, Self::Error> {
        use oxigraph::sparql::results::{
            QueryResultsFormat, QueryResultsParser, ReaderQueryResultsParserOutput,
        };
        use std::io::Read;
        let url = service_name.as_str();
        let fail = |what: String| std::io::Error::other(format!("SERVICE <{url}>: {what}"));
        let query = spargebra::Query::Select {
            dataset: None,
            pattern: pattern.clone(),
            base_iri: base_iri.cloned(),
        }
        .to_string();
        let resp = self
            .agent
            .post(url)
            .header("content-type", "application/sparql-query")
            .header(
                "accept",
                "application/sparql-results+json, application/sparql-results+xml;q=0.9",
            )
            .send(query.as_bytes())
            .map_err(|e| fail(format!("cannot reach the endpoint: {e}")))?;
        let status = resp.status();
        let media = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let mut body = Vec::new();
        resp.into_body()
            .into_reader()
            .take(self.max_bytes + 1)
            .read_to_end(&mut body)
            .map_err(|e| fail(format!("cannot read the answer: {e}")))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            return Err(fail(format!("the endpoint answered HTTP {status}: {text}")));
        }
        if body.len() as u64 > self.max_bytes {
            return Err(fail(format!("the answer is over {} bytes", self.max_bytes)));
        }
        let format = QueryResultsFormat::from_media_type(&media).ok_or_else(|| {
            fail(format!(
                "the answer's content type `{media}` is not a SPARQL results format"
            ))
        })?;
        let parsed = QueryResultsParser::from_format(format)
            .for_reader(std::io::Cursor::new(body))
            .map_err(|e| fail(format!("malformed results: {e}")))?;
        let ReaderQueryResultsParserOutput::Solutions(solutions) = parsed else {
            return Err(fail("the answer is a boolean, not solutions".into()));
        };
        let variables = solutions.variables().to_vec().into();
        let service = url.to_string();
        Ok(oxigraph::sparql::QuerySolutionIter::new(
            variables,
            Box::new(solutions.map(move |s| {
                s.map_err(|e| {
                    QueryEvaluationError::Service(
                        format!("SERVICE <{service}>: malformed results: {e}").into(),
                    )
                })
            })),
        ))
    }
}

pub struct KnowledgeGraph {
    store: Store,
    /// Time limit of one federated call; `None`: SERVICE is refused.
    federation: Option<Duration>,
}

impl KnowledgeGraph {
    pub fn new() -> Result<Self> {
        Ok(Self {
            store: Store::new()
                .map_err(|e| Error::Invalid(format!("cannot create the store: {e}")))?,
            federation: None,
        })
    }

    /// Lets queries call other SPARQL endpoints with `SERVICE <url> {…}`,
    /// each call within `timeout`. Off by default: a federated query sends
    /// parts of itself (and so any user text in it) to that server.
    pub fn allow_federation(&mut self, timeout: Duration) {
        self.federation = Some(timeout);
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
        let evaluator = match self.federation {
            None => SparqlEvaluator::new().with_default_service_handler(RefuseService),
            Some(t) => SparqlEvaluator::new().with_default_service_handler(HttpService::new(t)),
        };
        let mut q = evaluator
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

    /// A SPARQL endpoint on a local port answering `n` queries from
    /// `remote` as SPARQL JSON results; returns its URL and the queries it
    /// received.
    fn endpoint(
        remote: KnowledgeGraph,
        n: usize,
    ) -> (String, std::thread::JoinHandle<Vec<String>>) {
        use oxigraph::sparql::results::{QueryResultsFormat, QueryResultsSerializer};
        use std::io::{BufRead, Read};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/sparql", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..n {
                let (mut conn, _) = listener.accept().unwrap();
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let (mut len, mut media) = (0, String::new());
                let mut request_line = String::new();
                r.read_line(&mut request_line).unwrap();
                assert!(request_line.starts_with("POST /sparql "), "{request_line}");
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    let Some((k, v)) = line.trim_end().split_once(':') else {
                        break;
                    };
                    match k.to_ascii_lowercase().as_str() {
                        "content-length" => len = v.trim().parse().unwrap(),
                        "content-type" => media = v.trim().to_string(),
                        _ => {}
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let q = String::from_utf8(body).unwrap();
                let Answer::Solutions { variables, rows } =
                    remote.query(&q, &[], QueryLimits::default()).unwrap()
                else {
                    panic!("not a SELECT: {q}")
                };
                let vars: Vec<Variable> = variables
                    .iter()
                    .map(|v| Variable::new(v).unwrap())
                    .collect();
                let mut ser = QueryResultsSerializer::from_format(QueryResultsFormat::Json)
                    .serialize_solutions_to_writer(Vec::new(), vars.clone())
                    .unwrap();
                for row in &rows {
                    ser.serialize(
                        vars.iter()
                            .zip(row)
                            .filter_map(|(v, t)| Some((v.as_ref(), t.as_ref()?.as_ref()))),
                    )
                    .unwrap();
                }
                let out = ser.finish().unwrap();
                write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/sparql-results+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    out.len()
                )
                .unwrap();
                conn.write_all(&out).unwrap();
                seen.push(format!("{media}\n{q}"));
            }
            seen
        });
        (url, handle)
    }

    #[test]
    fn federated_queries_once_enabled_join_the_endpoint_answers() {
        let (remote, _d1) = kg_with(
            r#"@prefix ex: <http://example.org/> .
ex:cat ex:says "meow" . ex:dog ex:says "woof" . ex:feline ex:says "purr" ."#,
        );
        let (url, server) = endpoint(remote, 1);
        let (mut kg, _d2) = kg_with(G);
        let q = format!(
            "PREFIX ex: <http://example.org/> SELECT ?x ?sound WHERE {{ ex:cat ex:isa* ?x . SERVICE <{url}> {{ ?x ex:says ?sound }} }} ORDER BY ?sound"
        );
        // Off by default: refused before anything is sent.
        let e = kg
            .query(&q, &[], QueryLimits::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SERVICE queries are disabled") && e.contains("--allow-service"),
            "{e}"
        );
        kg.allow_federation(Duration::from_secs(10));
        let Answer::Solutions { rows, .. } = kg.query(&q, &[], QueryLimits::default()).unwrap()
        else {
            panic!("not solutions")
        };
        let got: Vec<(String, String)> = rows
            .iter()
            .map(|r| {
                (
                    r[0].as_ref().unwrap().to_string(),
                    r[1].as_ref().unwrap().to_string(),
                )
            })
            .collect();
        // ex:cat and ex:feline are local kinds of cat; the dog's sound is
        // in the remote store but not joined.
        assert_eq!(
            got,
            [
                (
                    "<http://example.org/cat>".to_string(),
                    "\"meow\"".to_string()
                ),
                (
                    "<http://example.org/feline>".to_string(),
                    "\"purr\"".to_string()
                )
            ]
        );
        let seen = server.join().unwrap();
        assert!(
            seen[0].starts_with("application/sparql-query\n"),
            "{seen:?}"
        );
        assert!(seen[0].contains("says"), "{seen:?}");
    }

    #[test]
    fn federated_query_to_a_dead_endpoint_is_an_error_naming_it() {
        let (mut kg, _d) = kg_with(G);
        kg.allow_federation(Duration::from_secs(5));
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = kg
            .query(
                &format!(
                    "SELECT * WHERE {{ SERVICE <http://127.0.0.1:{port}/sparql> {{ ?s ?p ?o }} }}"
                ),
                &[],
                QueryLimits::default(),
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("127.0.0.1:{port}")) && e.contains("cannot reach"),
            "{e}"
        );
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
