//! `autoglm kg`: knowledge graphs in an RDF store, queried with SPARQL.
//! A store is an N-Quads file: `--store NAME` is `$AUTOGLM_HOME/kg/NAME.nq`,
//! or give a path ending in `.nq`.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
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
    /// Generate question sets answered from retrieved chains (train: 800
    /// ImageNet classes, test: the other 200), as VQA JSON lines for a
    /// blind (text-only) `autoglm train`.
    Questions(QuestionsArgs),
    /// Questions about the scikit-image photos and Fashion-MNIST test
    /// images: accuracy with the knowledge graph and without it, the
    /// rule-based baseline, and the share of correct chains.
    Eval(crate::kg_eval::EvalArgs),
    /// Link a photo (EfficientNet-Lite0 → ImageNet class → synset) and the
    /// question's words to WordNet, and print the ranked chains between them.
    Paths(PathsArgs),
}

#[derive(Args)]
pub struct PathsArgs {
    /// The question ("Is this an animal?", "Does it have wheels?").
    question: String,
    /// A photo: its top ImageNet class is the entity.
    #[arg(long, conflicts_with = "entity", required_unless_present = "entity")]
    image: Option<PathBuf>,
    /// An ImageNet / WordNet id instead of a photo (n02123045).
    #[arg(long)]
    entity: Option<String>,
    /// The WordNet store (`autoglm kg import-wordnet`).
    #[arg(long, default_value = "wordnet")]
    store: String,
    /// Part / member / substance hops allowed in a chain (0 to 3).
    #[arg(long, default_value_t = 3)]
    max_other_hops: usize,
    /// Steps shown before a long is-a run is summarised.
    #[arg(long, default_value_t = 5)]
    keep: usize,
    /// Score lost per step when ranking chains.
    #[arg(long, default_value_t = 0.02)]
    length_prior: f32,
    /// Also print the linked entities, the SPARQL that ran and the scores.
    #[arg(long)]
    explain: bool,
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
    /// Let `SERVICE <url> {…}` call that SPARQL endpoint over the network
    /// (refused otherwise: the call sends part of the query there).
    #[arg(long)]
    allow_service: bool,
    /// Seconds one SERVICE call may take.
    #[arg(long, default_value_t = 30)]
    service_timeout: u64,
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

pub fn store_path(s: &str) -> PathBuf {
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
        KgCommand::Paths(a) => paths(g, a),
        KgCommand::Questions(a) => questions(g, a),
        KgCommand::Eval(a) => crate::kg_eval::eval(g, a),
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
    let mut kg = KnowledgeGraph::open(&path)?;
    if a.allow_service {
        kg.allow_federation(Duration::from_secs(a.service_timeout.max(1)));
    }
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

fn paths(g: &Global, a: PathsArgs) -> Result<()> {
    use autoglm::kg::reason::{retrieve, shortest_chain, ISA_CLOSURE, OTHER_HOPS};
    if a.max_other_hops > autoglm::kg::reason::MAX_OTHER_HOPS {
        bail!(
            "--max-other-hops is at most {}",
            autoglm::kg::reason::MAX_OTHER_HOPS
        );
    }
    let t0 = Instant::now();
    let kg = KnowledgeGraph::open(&store_path(&a.store))?;
    let lex = lexicon(&kg)?;
    let load_s = t0.elapsed().as_secs_f64();

    let (wnid, seen) = entity_of(g, a.image.as_ref(), a.entity.as_deref())?;
    let entity = wordnet::synset_of_wnid(&wnid)
        .with_context(|| format!("{wnid:?} is not a WordNet id (like n02123045)"))?;
    let links = lex.link(&a.question);
    if links.is_empty() {
        bail!("no word of {:?} names a WordNet concept", a.question);
    }
    let t1 = Instant::now();
    let edges = retrieve(&kg, &entity, a.max_other_hops)?;
    let mut found = Vec::new();
    for link in &links {
        for target in &link.synsets {
            if let Some(c) = shortest_chain(&edges, &entity, target, a.max_other_hops) {
                found.push((link.text.clone(), target.clone(), c));
            }
        }
    }
    let retrieve_ms = t1.elapsed().as_secs_f64() * 1e3;
    // Ranked by MiniLM similarity of the question to the verbalised
    // chain, with a length prior.
    let steps: Vec<Vec<String>> = found
        .iter()
        .map(|(_, _, c)| lex.verbalise(c, a.keep))
        .collect();
    let hops: Vec<usize> = found.iter().map(|(_, _, c)| c.hops()).collect();
    let encoder = autoglm::text::bert::SentenceEncoder::load(
        &assets::dir("minilm")?,
        &autoglm::default_device()?,
    )?;
    let scores = autoglm::kg::reason::rank(&encoder, &a.question, &steps, &hops, a.length_prior)?;
    let mut order: Vec<usize> = (0..found.len()).collect();
    order.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]));
    let chains: Vec<serde_json::Value> = order
        .iter()
        .map(|&i| {
            let (text, target, c) = &found[i];
            json!({
                "concept": text, "synset": target, "label": lex.label(target), "hops": c.hops(),
                "score": scores[i], "steps": steps[i],
            })
        })
        .collect();
    if g.json {
        println!(
            "{}",
            json!({
                "entity": {"wnid": wnid, "synset": entity, "label": lex.label(&entity),
                           "seen_as": seen.as_ref().map(|(l, p)| json!({"label": l, "probability": p}))},
                "links": links.iter().map(|l| json!({"text": l.text, "synsets": l.synsets})).collect::<Vec<_>>(),
                "chains": chains,
                "retrieval_ms": retrieve_ms, "store_load_s": load_s,
                "sparql": [ISA_CLOSURE, OTHER_HOPS],
            })
        );
        return Ok(());
    }
    if let Some((label, p)) = &seen {
        println!(
            "the photo shows: {label} ({:.1} %) → {wnid} ({})",
            p * 100.0,
            lex.label(&entity)
        );
    } else {
        println!("entity: {wnid} ({})", lex.label(&entity));
    }
    if a.explain {
        print_links(&lex, &links);
        println!("SPARQL (?e bound to each entity):\n{ISA_CLOSURE}\n{OTHER_HOPS}");
        println!(
            "retrieval: {retrieve_ms:.1} ms over {} nodes (store loaded in {load_s:.1} s)",
            edges.len()
        );
    }
    match chains.first() {
        None => println!(
            "no chain joins {} to {:?} within {} part/member hops",
            lex.label(&entity),
            a.question,
            a.max_other_hops
        ),
        Some(best) => {
            println!(
                "chain to {:?} ({:?}, {} steps, score {:.3}):",
                best["concept"].as_str().unwrap_or(""),
                best["label"].as_str().unwrap_or(""),
                best["hops"],
                best["score"].as_f64().unwrap_or(0.0)
            );
            for (i, s) in best["steps"].as_array().into_iter().flatten().enumerate() {
                println!("  {}. {}", i + 1, s.as_str().unwrap_or(""));
            }
            if a.explain {
                for c in chains.iter().skip(1).take(4) {
                    println!(
                        "also: {:?} ({:?}, {} steps, score {:.3}): {}",
                        c["concept"].as_str().unwrap_or(""),
                        c["label"].as_str().unwrap_or(""),
                        c["hops"],
                        c["score"].as_f64().unwrap_or(0.0),
                        c["steps"]
                            .as_array()
                            .map(|v| v
                                .iter()
                                .filter_map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join("; "))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct BenchArgs {
    /// The WordNet store.
    #[arg(long, default_value = "wordnet")]
    store: String,
    /// Questions per chain length.
    #[arg(long, default_value_t = 200)]
    questions: usize,
}

/// Retrieval latency over the whole of WordNet: for ImageNet classes, the
/// chain to their ancestor 2, 3 and 4 is-a steps up, retrieved with is-a
/// paths only and with up to 3 part/member/substance hops.
pub fn bench(g: &Global, a: BenchArgs) -> Result<()> {
    use autoglm::kg::reason::{retrieve, shortest_chain};
    let rss = || -> f64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .unwrap_or(f64::NAN)
            / 1024.0
    };
    let rss0 = rss();
    let t0 = Instant::now();
    let kg = KnowledgeGraph::open(&store_path(&a.store))?;
    let load_s = t0.elapsed().as_secs_f64();
    let rss_store = rss() - rss0;
    let ids = std::fs::read_to_string(assets::dir("imagenet")?.join("imagenet_synsets.txt"))?;
    let entities: Vec<String> = ids
        .split_whitespace()
        .filter_map(wordnet::synset_of_wnid)
        .collect();
    let mut rows = Vec::new();
    for hops in [2usize, 3, 4] {
        for max_other in [0usize, 3] {
            let mut times = Vec::new();
            let mut asked = 0;
            for e in entities
                .iter()
                .step_by((entities.len() / a.questions.max(1)).max(1))
                .take(a.questions)
            {
                // The target: the ancestor `hops` is-a steps up (first parents).
                let isa = retrieve(&kg, e, 0)?;
                let mut cur = e.clone();
                for _ in 0..hops {
                    match isa
                        .get(&cur)
                        .and_then(|v| v.iter().find(|(r, _)| r.is_isa()))
                    {
                        Some((_, up)) => cur = up.clone(),
                        None => break,
                    }
                }
                let t = Instant::now();
                let edges = retrieve(&kg, e, max_other)?;
                let chain = shortest_chain(&edges, e, &cur, max_other);
                times.push(t.elapsed().as_secs_f64() * 1e3);
                asked += 1;
                if chain.is_none_or(|c| c.hops() > hops) {
                    bail!("no chain of ≤ {hops} steps from {e} to {cur}");
                }
            }
            times.sort_by(f64::total_cmp);
            let p = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
            rows.push(json!({"hops": hops, "max_other_hops": max_other, "questions": asked, "p50_ms": p(0.5), "p99_ms": p(0.99)}));
        }
    }
    let report = json!({"store_quads": kg.len()?, "load_seconds": load_s, "store_rss_mib": rss_store, "latency": rows});
    if g.json {
        println!("{report}");
    } else {
        println!(
            "store: {} quads, loaded in {load_s:.1} s, {rss_store:.0} MiB resident",
            kg.len()?
        );
        println!("hops  part/member hops  questions    p50 ms    p99 ms");
        for r in &rows {
            println!(
                "{:>4}  {:>16}  {:>9}  {:>8.1}  {:>8.1}",
                r["hops"],
                r["max_other_hops"],
                r["questions"],
                r["p50_ms"].as_f64().unwrap_or(0.0),
                r["p99_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct QuestionsArgs {
    /// Output directory: train.jsonl, test.jsonl, entities/ (one 1×1 PNG
    /// per class, so that splits and held-out sets go by entity).
    #[arg(long)]
    out: PathBuf,
    /// The WordNet store.
    #[arg(long, default_value = "wordnet")]
    store: String,
    /// Questions per ImageNet class (is-a, part-of, what-kind in turn).
    #[arg(long, default_value_t = 12)]
    per_entity: usize,
    /// Facts kept per chain.
    #[arg(long, default_value_t = 5)]
    keep: usize,
    /// Other WordNet nouns (not ImageNet classes, none named like one)
    /// added to the training split: with thousands of names to copy, a
    /// reader learns to read the name off the prompt instead of memorising
    /// 800 of them.
    #[arg(long, default_value_t = 0)]
    extra_entities: usize,
    /// Questions per extra noun.
    #[arg(long, default_value_t = 5)]
    extra_per_entity: usize,
    /// Yet more WordNet nouns (after the extra ones), each with one "what
    /// kind of X is this?" question only, added to the training split: each
    /// name is seen once, so the answer can only be copied off the prompt.
    #[arg(long, default_value_t = 0)]
    copy_entities: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// `n` noun synsets with a head word, none of `exclude` and none named
/// like one of them, in a seeded order.
fn other_nouns(
    kg: &KnowledgeGraph,
    lex: &autoglm::kg::reason::Lexicon,
    exclude: &[String],
    n: usize,
    seed: u64,
) -> Result<Vec<String>> {
    use std::collections::HashSet;
    let q = format!("SELECT ?s WHERE {{ ?s <{}> ?l }}", wordnet::PREF_LABEL);
    let limits = QueryLimits {
        max_rows: 10_000_000,
        ..QueryLimits::default()
    };
    let Answer::Solutions { rows, .. } = kg.query(&q, &[], limits)? else {
        bail!("not a SELECT answer");
    };
    let skip: HashSet<&str> = exclude.iter().map(String::as_str).collect();
    let names: HashSet<String> = exclude
        .iter()
        .map(|e| lex.label(e).to_lowercase())
        .collect();
    let mut all: Vec<String> = rows
        .into_iter()
        .filter_map(|r| match &r[0] {
            Some(Term::NamedNode(s)) => Some(s.as_str().to_string()),
            _ => None,
        })
        .filter(|s| s.ends_with("-n") && !skip.contains(s.as_str()))
        .filter(|s| !names.contains(&lex.label(s).to_lowercase()))
        .collect();
    all.sort();
    all.dedup();
    // A seeded Fisher–Yates shuffle (splitmix64), then the first n.
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    for i in (1..all.len()).rev() {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        all.swap(i, (z % (i as u64 + 1)) as usize);
    }
    all.truncate(n);
    Ok(all)
}

/// `b`'s items spread evenly among `a`'s, in order.
fn interleave<T>(a: Vec<T>, b: Vec<T>) -> Vec<T> {
    if a.is_empty() {
        return b;
    }
    let every = (a.len() / b.len().max(1)).max(1);
    let mut b = b.into_iter();
    let mut merged = Vec::new();
    for (i, x) in a.into_iter().enumerate() {
        merged.push(x);
        if i % every == 0 {
            merged.extend(b.next());
        }
    }
    merged.extend(b);
    merged
}

fn questions(g: &Global, a: QuestionsArgs) -> Result<()> {
    use autoglm::kg::qa::{generate, prompt, prompt_without_kg};
    let t0 = Instant::now();
    let kg = KnowledgeGraph::open(&store_path(&a.store))?;
    let lex = lexicon(&kg)?;
    let ids = std::fs::read_to_string(assets::dir("imagenet")?.join("imagenet_synsets.txt"))?;
    let wnids: Vec<String> = ids.split_whitespace().map(String::from).collect();
    let ents = a.out.join("entities");
    std::fs::create_dir_all(&ents).with_context(|| format!("creating {}", ents.display()))?;
    let mut png = Vec::new();
    image::RgbImage::from_pixel(1, 1, image::Rgb([128, 128, 128]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    let mut counts = serde_json::Map::new();
    for (split, train) in [("train", true), ("test", false)] {
        // Every fifth class is a test class: no entity is in both splits.
        let chosen: Vec<&String> = wnids
            .iter()
            .enumerate()
            .filter(|(i, _)| (i % 5 != 0) == train)
            .map(|(_, w)| w)
            .collect();
        let entities: Vec<String> = chosen
            .iter()
            .map(|w| {
                wordnet::synset_of_wnid(w)
                    .ok_or_else(|| anyhow!("imagenet_synsets.txt: {w} is not a WordNet id"))
            })
            .collect::<Result<_>>()?;
        let (mut qs, mut report) = generate(
            &kg,
            &lex,
            &entities,
            a.per_entity,
            a.keep,
            a.seed + u64::from(train),
        )?;
        let mut extra = 0;
        let mut copy = 0;
        if train && a.extra_entities + a.copy_entities > 0 {
            let all: Vec<String> = wnids
                .iter()
                .filter_map(|w| wordnet::synset_of_wnid(w))
                .collect();
            let mut others =
                other_nouns(&kg, &lex, &all, a.extra_entities + a.copy_entities, a.seed)?;
            let copy_nouns = others.split_off(a.extra_entities.min(others.len()));
            extra = others.len();
            copy = copy_nouns.len();
            let none = || Ok((Vec::new(), Default::default()));
            let (mut more, r) = if others.is_empty() {
                none()
            } else {
                generate(&kg, &lex, &others, a.extra_per_entity, a.keep, a.seed + 2)
            }?;
            // Five questions per noun, of which the fifth is the what-kind one.
            let (copied, rc) = if copy_nouns.is_empty() {
                none()
            } else {
                generate(&kg, &lex, &copy_nouns, 5, a.keep, a.seed + 3)
            }?;
            let copied: Vec<_> = copied
                .into_iter()
                .filter(|g| g.question.kind == "kind")
                .collect();
            report.kept.insert("copy-kind", copied.len());
            report
                .dropped
                .insert("copy-kind", rc.dropped.get("kind").copied().unwrap_or(0));
            more = interleave(more, copied);
            for (k, n) in r.kept {
                *report.kept.entry(k).or_default() += n;
            }
            for (k, n) in r.dropped {
                *report.dropped.entry(k).or_default() += n;
            }
            // Interleaved with the ImageNet questions.
            qs = interleave(qs, more);
        }
        let mut with_kg = String::new();
        let mut without = String::new();
        for g in &qs {
            let q = &g.question;
            let wnid = wnid_of(&q.entity);
            let img = format!("entities/{wnid}.png");
            if !a.out.join(&img).is_file() {
                std::fs::write(a.out.join(&img), &png)?;
            }
            let row = |text: String| {
                json!({"image": img, "question": text, "answer": q.answer, "kind": q.kind, "entity": wnid})
                    .to_string()
                    + "\n"
            };
            with_kg.push_str(&row(prompt(
                lex.label(&q.entity),
                &g.facts.steps,
                &q.question,
            )));
            without.push_str(&row(prompt_without_kg(lex.label(&q.entity), &q.question)));
        }
        autoglm::train::write_atomic(&a.out.join(format!("{split}.jsonl")), with_kg.as_bytes())?;
        autoglm::train::write_atomic(
            &a.out.join(format!("{split}-no-kg.jsonl")),
            without.as_bytes(),
        )?;
        counts.insert(
            split.into(),
            json!({"questions": qs.len(), "entities": entities.len(), "extra_entities": extra, "copy_entities": copy, "report": report}),
        );
    }
    let report = json!({"out": a.out, "splits": counts, "seconds": t0.elapsed().as_secs_f64()});
    if g.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// The entity asked about: a photo's top ImageNet class (EfficientNet-Lite0)
/// with its label and probability, or a given WordNet id.
pub fn entity_of(
    g: &Global,
    image: Option<&PathBuf>,
    entity: Option<&str>,
) -> Result<(String, Option<(String, f32)>)> {
    match (image, entity) {
        (_, Some(e)) => Ok((e.to_string(), None)),
        (Some(img), None) => {
            let dev = autoglm::default_device()?;
            let clf = autoglm::vision::efficientnet::ImageClassifier::load(
                &assets::dir("efficientnet-lite0")?,
                &assets::dir("imagenet")?.join("labels.txt"),
                &dev,
            )?;
            let imgs = crate::commands::load_images(g, std::slice::from_ref(img))?;
            let top = clf.top_k(&imgs, 1)?.remove(0).remove(0);
            let ids =
                std::fs::read_to_string(assets::dir("imagenet")?.join("imagenet_synsets.txt"))?;
            let wnid = ids
                .split_whitespace()
                .nth(top.index)
                .with_context(|| format!("no WordNet id for ImageNet class {}", top.index))?
                .to_string();
            Ok((wnid, Some((top.label, top.probability))))
        }
        (None, None) => bail!("pass --image PHOTO or --entity WNID"),
    }
}

/// `autoglm ask --kg STORE`: recognise the photo, retrieve the chain for
/// the question, and let the reader model answer from it.
pub struct KgAsk {
    pub question: String,
    pub image: Option<PathBuf>,
    pub entity: Option<String>,
    pub store: String,
    pub reader: PathBuf,
    pub keep: usize,
    pub explain: bool,
}

pub fn ask_kg(g: &Global, a: KgAsk) -> Result<()> {
    use autoglm::kg::ground::Grounder;
    use autoglm::kg::reason::{rank, shortest_chain, ISA_CLOSURE, MAX_OTHER_HOPS, OTHER_HOPS};
    let path = store_path(&a.store);
    if !path.is_file() && a.store == "wordnet" {
        bail!(
            "{} not found: import WordNet once with `autoglm kg import-wordnet` (it needs the `wordnet` asset: scripts/fetch-assets.sh wordnet)",
            path.display()
        );
    }
    let dev = autoglm::default_device()?;
    let mut gr = Grounder::load(&path, &a.reader, &dev).with_context(|| {
        format!(
            "loading {} and the reader {}",
            path.display(),
            a.reader.display()
        )
    })?;
    gr.keep = a.keep;
    let (wnid, seen) = match (&a.image, &a.entity) {
        (_, Some(e)) => (e.clone(), None),
        (Some(img), None) => {
            let imgs = crate::commands::load_images(g, std::slice::from_ref(img))?;
            let s = gr.recognise(&imgs[0])?;
            (s.wnid.clone(), Some(s))
        }
        (None, None) => bail!("pass --image PHOTO or --entity WNID"),
    };
    let (res, edges) = gr.answer(&wnid, &a.question)?;
    let (lex, entity) = (&gr.lex, &res.entity);
    // For --explain: every linked concept's chain, ranked by MiniLM.
    let links = lex.link(&a.question);
    let mut ranked = Vec::new();
    if a.explain {
        let mut found = Vec::new();
        for l in &links {
            for t in &l.synsets {
                if let Some(c) = shortest_chain(&edges, entity, t, MAX_OTHER_HOPS) {
                    found.push((l.text.clone(), t.clone(), c));
                }
            }
        }
        let steps: Vec<Vec<String>> = found
            .iter()
            .map(|(_, _, c)| lex.verbalise(c, a.keep))
            .collect();
        let hops: Vec<usize> = found.iter().map(|(_, _, c)| c.hops()).collect();
        if !found.is_empty() {
            let enc = autoglm::text::bert::SentenceEncoder::load(&assets::dir("minilm")?, &dev)?;
            let scores = rank(&enc, &a.question, &steps, &hops, 0.02)?;
            for (i, (text, target, c)) in found.iter().enumerate() {
                ranked.push((
                    scores[i],
                    json!({"concept": text, "synset": target, "label": lex.label(target),
                    "hops": c.hops(), "score": scores[i], "steps": steps[i]}),
                ));
            }
            ranked.sort_by(|x, y| y.0.total_cmp(&x.0));
        }
    }
    let ranked: Vec<serde_json::Value> = ranked.into_iter().map(|(_, v)| v).collect();
    if g.json {
        println!(
            "{}",
            json!({
                "answer": res.answer,
                "entity": {"wnid": wnid, "synset": entity, "label": lex.label(entity), "seen_as": seen},
                "facts": res.facts.steps,
                "chain_reaches_question": res.facts.chain.is_some(),
                "rule_answer": res.rule_answer,
                "reader": a.reader,
                "retrieval_ms": res.retrieval_ms,
                "explain": a.explain.then(|| json!({
                    "links": links.iter().map(|l| json!({"text": l.text, "synsets": l.synsets})).collect::<Vec<_>>(),
                    "sparql": [ISA_CLOSURE, OTHER_HOPS],
                    "chains": ranked,
                    "prompt": res.prompt,
                })),
            })
        );
        return Ok(());
    }
    if let Some(s) = &seen {
        println!(
            "the photo shows: {} ({:.1} %) → {wnid} ({})",
            s.label,
            s.probability * 100.0,
            lex.label(entity)
        );
    }
    println!("{}", res.answer);
    println!(
        "{}",
        if res.facts.chain.is_some() {
            "because:"
        } else {
            "no chain reaches the question; what the graph says of it:"
        }
    );
    for (i, s) in res.facts.steps.iter().enumerate() {
        println!("  {}. {s}", i + 1);
    }
    if a.explain {
        print_links(lex, &links);
        println!("SPARQL (?e bound to each entity):\n{ISA_CLOSURE}\n{OTHER_HOPS}");
        println!(
            "retrieval: {:.1} ms over {} nodes",
            res.retrieval_ms,
            edges.len()
        );
        for c in &ranked {
            println!(
                "chain to {:?} ({}, {} steps): MiniLM score {:.3}",
                c["concept"].as_str().unwrap_or(""),
                c["label"].as_str().unwrap_or(""),
                c["hops"],
                c["score"].as_f64().unwrap_or(0.0)
            );
        }
        println!(
            "rule-based answer from the chain: {}",
            res.rule_answer
                .as_deref()
                .unwrap_or("(a question form the rule does not know)")
        );
        println!("the reader ({}) read:\n{}", a.reader.display(), res.prompt);
    }
    Ok(())
}

/// `--explain`: each linked phrase and its first synsets.
fn print_links(lex: &autoglm::kg::reason::Lexicon, links: &[autoglm::kg::reason::Link]) {
    for l in links {
        let shown: Vec<String> = l
            .synsets
            .iter()
            .take(5)
            .map(|s| format!("{} ({})", wnid_of(s), lex.label(s)))
            .collect();
        println!(
            "linked {:?} → {}{}",
            l.text,
            shown.join(", "),
            if l.synsets.len() > 5 { ", …" } else { "" }
        );
    }
}

/// The store's lexicon, with WordNet's irregular plurals when the
/// `wordnet` asset is installed.
pub fn lexicon(kg: &KnowledgeGraph) -> Result<autoglm::kg::reason::Lexicon> {
    Ok(autoglm::kg::ground::lexicon(kg)?)
}

/// `n02123045` from a synset IRI `…/id/02123045-n`.
pub fn wnid_of(iri: &str) -> String {
    let id = iri.rsplit('/').next().unwrap_or(iri);
    match id.split_once('-') {
        Some((off, pos)) => format!("{pos}{off}"),
        None => id.to_string(),
    }
}
