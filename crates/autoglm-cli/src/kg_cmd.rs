//! `autoglm kg`: knowledge graphs in an RDF store, queried with SPARQL.
//! A store is an N-Quads file: `--store NAME` is `$AUTOGLM_HOME/kg/NAME.nq`,
//! or give a path ending in `.nq`.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use autoglm::io::assets;
use autoglm::kg::{wordnet, Answer, KnowledgeGraph, QueryLimits};
use clap::{Args, Subcommand, ValueEnum};
use oxigraph::model::Term;
use serde_json::json;

use crate::Global;

#[derive(Subcommand)]
pub enum KgCommand {
    /// Add RDF files (Turtle, N-Triples, N-Quads, TriG, RDF/XML) to a store.
    Load(LoadArgs),
    /// Run a SPARQL query (SELECT, ASK, CONSTRUCT, DESCRIBE) on a store.
    Query(QueryArgs),
    /// Size of a store and its most used predicates.
    Stats(StoreArg),
    /// Convert WordNet 3.0 (the `wordnet` asset) into RDF, into a store.
    ImportWordnet(ImportArgs),
}

#[derive(Args)]
pub struct StoreArg {
    /// A store name (under $AUTOGLM_HOME/kg/) or a path ending in .nq.
    #[arg(long, default_value = "default")]
    store: String,
}

#[derive(Args)]
pub struct LoadArgs {
    /// RDF files; the format comes from the extension.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    store: StoreArg,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Args)]
pub struct QueryArgs {
    /// The SPARQL query.
    sparql: String,
    #[command(flatten)]
    store: StoreArg,
    /// Output: an aligned table, SPARQL results JSON, or CSV.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Seconds the query may run.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Most results returned (an error beyond: add a LIMIT).
    #[arg(long, default_value_t = 100_000)]
    max_rows: usize,
}

#[derive(Args)]
pub struct ImportArgs {
    /// The store written (replaced).
    #[arg(long, default_value = "wordnet")]
    store: String,
    /// The WordNet data files (default: the installed `wordnet` asset).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn store_path(s: &str) -> PathBuf {
    if s.ends_with(".nq") || s.contains('/') {
        PathBuf::from(s)
    } else {
        assets::home().join("kg").join(format!("{s}.nq"))
    }
}

pub fn kg(g: &Global, cmd: KgCommand) -> Result<()> {
    match cmd {
        KgCommand::Load(a) => load(g, a),
        KgCommand::Query(a) => query(g, a),
        KgCommand::Stats(a) => stats(g, a),
        KgCommand::ImportWordnet(a) => import_wordnet(g, a),
    }
}

fn load(g: &Global, a: LoadArgs) -> Result<()> {
    let path = store_path(&a.store.store);
    let kg = if path.is_file() {
        KnowledgeGraph::open(&path)?
    } else {
        KnowledgeGraph::new()?
    };
    let mut added = Vec::new();
    for f in &a.files {
        let n = kg.load_file(f, None)?;
        added.push(json!({"file": f, "quads": n}));
        if !g.json {
            println!("{}: {n} quads", f.display());
        }
    }
    kg.save(&path)?;
    let total = kg.len()?;
    if g.json {
        println!(
            "{}",
            json!({"store": path, "loaded": added, "total_quads": total})
        );
    } else {
        println!("{}: {total} quads", path.display());
    }
    Ok(())
}

fn query(g: &Global, a: QueryArgs) -> Result<()> {
    let path = store_path(&a.store.store);
    let kg = KnowledgeGraph::open(&path)?;
    let limits = QueryLimits {
        timeout: Duration::from_secs(a.timeout.max(1)),
        max_rows: a.max_rows,
    };
    let answer = kg.query(&a.sparql, &[], limits)?;
    let format = if g.json { Format::Json } else { a.format };
    let out = std::io::stdout();
    let mut w = out.lock();
    match format {
        Format::Table => autoglm::kg::store::write_table(&answer, &mut w)?,
        Format::Json => writeln!(w, "{}", results_json(&answer))?,
        Format::Csv => write_csv(&answer, &mut w)?,
    }
    Ok(())
}

/// The W3C SPARQL 1.1 results JSON of `answer`.
fn results_json(answer: &Answer) -> serde_json::Value {
    let term = |t: &Term| match t {
        Term::NamedNode(n) => json!({"type": "uri", "value": n.as_str()}),
        Term::BlankNode(b) => json!({"type": "bnode", "value": b.as_str()}),
        Term::Literal(l) => {
            let mut v = json!({"type": "literal", "value": l.value()});
            if let Some(lang) = l.language() {
                v["xml:lang"] = json!(lang);
            } else if l.datatype().as_str() != "http://www.w3.org/2001/XMLSchema#string" {
                v["datatype"] = json!(l.datatype().as_str());
            }
            v
        }
        #[allow(unreachable_patterns)]
        other => json!({"type": "triple", "value": other.to_string()}),
    };
    match answer {
        Answer::Boolean(b) => json!({"head": {}, "boolean": b}),
        Answer::Graph(lines) => json!({"triples": lines}),
        Answer::Solutions { variables, rows } => json!({
            "head": {"vars": variables},
            "results": {"bindings": rows.iter().map(|r| {
                variables.iter().zip(r).filter_map(|(v, t)| t.as_ref().map(|t| (v.clone(), term(t))))
                    .collect::<serde_json::Map<_, _>>()
            }).collect::<Vec<_>>()},
        }),
    }
}

/// W3C SPARQL 1.1 results CSV: plain values, quoted where needed.
fn write_csv(answer: &Answer, w: &mut dyn Write) -> std::io::Result<()> {
    let cell = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    match answer {
        Answer::Boolean(b) => writeln!(w, "{b}"),
        Answer::Graph(lines) => lines.iter().try_for_each(|l| writeln!(w, "{}", cell(l))),
        Answer::Solutions { variables, rows } => {
            write!(w, "{}\r\n", variables.join(","))?;
            for r in rows {
                let vals: Vec<String> = r
                    .iter()
                    .map(|t| match t {
                        None => String::new(),
                        Some(Term::NamedNode(n)) => cell(n.as_str()),
                        Some(Term::Literal(l)) => cell(l.value()),
                        Some(t) => cell(&t.to_string()),
                    })
                    .collect();
                write!(w, "{}\r\n", vals.join(","))?;
            }
            Ok(())
        }
    }
}

fn stats(g: &Global, a: StoreArg) -> Result<()> {
    let path = store_path(&a.store);
    let t0 = Instant::now();
    let kg = KnowledgeGraph::open(&path)?;
    let load_s = t0.elapsed().as_secs_f64();
    let q = "SELECT ?p (COUNT(*) AS ?n) WHERE { ?s ?p ?o } GROUP BY ?p ORDER BY DESC(?n) LIMIT 20";
    let Answer::Solutions { rows, .. } = kg.query(q, &[], QueryLimits::default())? else {
        bail!("unexpected answer to the statistics query");
    };
    let preds: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            let name = r[0].as_ref().map(Term::to_string).unwrap_or_default();
            let n = match &r[1] {
                Some(Term::Literal(l)) => l.value().to_string(),
                _ => String::new(),
            };
            (name, n)
        })
        .collect();
    let total = kg.len()?;
    if g.json {
        println!(
            "{}",
            json!({"store": path, "quads": total, "load_seconds": load_s,
                   "predicates": preds.iter().map(|(p, n)| json!({"predicate": p, "count": n.parse::<u64>().unwrap_or(0)})).collect::<Vec<_>>()})
        );
    } else {
        println!(
            "{}: {total} quads (loaded in {load_s:.1} s)",
            path.display()
        );
        for (p, n) in preds {
            println!("{n:>10}  {p}");
        }
    }
    Ok(())
}

fn import_wordnet(g: &Global, a: ImportArgs) -> Result<()> {
    let dir = match a.dir {
        Some(d) => d,
        None => assets::dir("wordnet")?,
    };
    let t0 = Instant::now();
    let synsets = wordnet::read_synsets(&dir)?;
    let quads = wordnet::quads(&synsets);
    let kg = KnowledgeGraph::new()?;
    kg.store()
        .extend(quads)
        .context("inserting the WordNet quads")?;
    let build_s = t0.elapsed().as_secs_f64();
    let path = store_path(&a.store);
    kg.save(&path)?;
    let total_s = t0.elapsed().as_secs_f64();
    let n = kg.len()?;
    if g.json {
        println!(
            "{}",
            json!({"store": path, "synsets": synsets.len(), "quads": n, "build_seconds": build_s, "total_seconds": total_s})
        );
    } else {
        println!(
            "WordNet 3.0 from {}: {} synsets, {n} quads in {build_s:.1} s; saved to {} ({total_s:.1} s in all)",
            dir.display(),
            synsets.len(),
            path.display()
        );
    }
    Ok(())
}
