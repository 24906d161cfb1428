//! `autoglm kg eval`: questions about real photos (scikit-image) and
//! Fashion-MNIST test images, answered with the knowledge graph and
//! without it.
//!
//! Each image's thing is recognised (EfficientNet-Lite0 for the photos,
//! the Fashion-MNIST classifier for the clothes), linked to its synset,
//! and the question's chain retrieved from that synset. The questions and
//! their true answers come from the *true* synset (the photo's label here,
//! the image's class), with the generator that made the training set, so
//! a recognition error can make the facts, and then the answer, wrong.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use autoglm::assistant::{Assistant, Overflow};
use autoglm::data::fashion_mnist;
use autoglm::io::assets;
use autoglm::kg::qa::{self, facts_for, prompt, prompt_without_kg, rule_answer, KgQuestion, Truth};
use autoglm::kg::reason::{retrieve, Edges, Lexicon, MAX_OTHER_HOPS};
use autoglm::kg::{wordnet, KnowledgeGraph};
use autoglm::text::generate::GenerateConfig;
use autoglm::vision::pixel_mlp::PixelMlp;
use clap::Args;
use rayon::prelude::*;
use serde_json::json;

use crate::kg_cmd::{lexicon, store_path, wnid_of};
use crate::Global;

/// The scikit-image photos with a thing WordNet names, and that synset
/// (read off the photos; the ImageNet classifier never sees these labels).
pub const PHOTOS: [(&str, &str); 7] = [
    ("chelsea.png", "n02121808"),         // domestic cat
    ("coffee.png", "n07929519"),          // coffee (the beverage)
    ("horse.png", "n02374451"),           // horse
    ("motorcycle_left.png", "n03790512"), // motorcycle
    ("rocket.jpg", "n04099429"),          // rocket (the vehicle)
    ("camera.png", "n02942699"),          // camera
    ("astronaut.png", "n09818022"),       // astronaut
];

/// Fashion-MNIST's classes as WordNet synsets, in label order.
pub const FASHION_SYNSETS: [&str; 10] = [
    "n03595614", // T-shirt/top → jersey, T-shirt
    "n04489008", // Trouser → trouser, pant
    "n04021028", // Pullover → pullover, slipover
    "n03236735", // Dress
    "n03057021", // Coat
    "n04133789", // Sandal
    "n04197391", // Shirt
    "n03472535", // Sneaker → gym shoe, sneaker
    "n02773037", // Bag
    "n02872752", // Ankle boot → boot
];

#[derive(Args)]
pub struct EvalArgs {
    /// The WordNet store.
    #[arg(long, default_value = "wordnet")]
    store: String,
    /// The model that answers from the facts.
    /// (default: models/kg-reader of this repository)
    #[arg(long)]
    reader: Option<PathBuf>,
    /// The same model trained with only the recognised thing's name.
    /// (default: models/kg-reader-no-kg of this repository)
    #[arg(long)]
    no_kg_reader: Option<PathBuf>,
    /// The Fashion-MNIST classifier (`autoglm fashion train`).
    /// (default: models/fashion-mlp of this repository)
    #[arg(long)]
    fashion_classifier: Option<PathBuf>,
    /// Fashion-MNIST test images asked about (the first N).
    #[arg(long, default_value_t = 1000)]
    fashion_images: usize,
    /// Questions per Fashion-MNIST image.
    #[arg(long, default_value_t = 4)]
    per_image: usize,
    /// Questions generated per synset before filtering.
    #[arg(long, default_value_t = 20)]
    per_entity: usize,
    /// Steps shown before a long is-a run is summarised.
    #[arg(long, default_value_t = 5)]
    keep: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the report and every question with its answers here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One question asked about one image.
struct Case<'a> {
    set: &'static str,
    q: &'a KgQuestion,
    /// The recognised synset.
    predicted: String,
}

#[derive(Default, Clone, serde::Serialize)]
struct Tally {
    questions: usize,
    with_kg: usize,
    without_kg: usize,
    rule: usize,
    oracle_entity_with_kg: usize,
    correct_chains: usize,
}

impl Tally {
    fn add(&mut self, r: &Row) {
        self.questions += 1;
        self.with_kg += usize::from(r.right[0]);
        self.without_kg += usize::from(r.right[1]);
        self.rule += usize::from(r.right[2]);
        self.oracle_entity_with_kg += usize::from(r.right[3]);
        self.correct_chains += usize::from(r.right[2]);
    }

    fn rates(&self) -> serde_json::Value {
        let n = self.questions.max(1) as f64;
        json!({
            "questions": self.questions,
            "accuracy_with_kg": self.with_kg as f64 / n,
            "accuracy_without_kg": self.without_kg as f64 / n,
            "accuracy_rule_baseline": self.rule as f64 / n,
            "accuracy_with_kg_true_entity": self.oracle_entity_with_kg as f64 / n,
            "share_of_correct_chains": self.correct_chains as f64 / n,
        })
    }
}

#[derive(serde::Serialize)]
struct Row {
    set: &'static str,
    entity: String,
    predicted: String,
    question: String,
    kind: &'static str,
    truth: String,
    with_kg: String,
    without_kg: String,
    rule: String,
    oracle: String,
    /// Whether the with-KG, without-KG, rule and true-entity answers are
    /// right. The rule reads the chain exactly, so its answer being right
    /// is the chain being right.
    right: [bool; 4],
    facts: Vec<String>,
}

pub fn eval(g: &Global, a: EvalArgs) -> Result<()> {
    let t0 = Instant::now();
    let named = crate::ask::model_dir_named;
    let reader_dir = named(a.reader.as_ref(), "models/kg-reader")?;
    let no_kg_dir = named(a.no_kg_reader.as_ref(), "models/kg-reader-no-kg")?;
    let fashion_dir = named(a.fashion_classifier.as_ref(), "models/fashion-mlp")?;
    let kg = KnowledgeGraph::open(&store_path(&a.store))?;
    let lex = lexicon(&kg)?;
    let dev = autoglm::default_device()?;
    let reader = Assistant::load(&reader_dir, &dev)
        .with_context(|| format!("loading the reader {}", reader_dir.display()))?;
    let blind = Assistant::load(&no_kg_dir, &dev)
        .with_context(|| format!("loading the no-KG reader {}", no_kg_dir.display()))?;
    let iri =
        |w: &str| wordnet::synset_of_wnid(w).with_context(|| format!("{w} is not a WordNet id"));

    // The things asked about and what WordNet says of them.
    let mut entities: Vec<String> = PHOTOS.iter().map(|(_, w)| iri(w)).collect::<Result<_>>()?;
    entities.extend(
        FASHION_SYNSETS
            .iter()
            .map(|w| iri(w))
            .collect::<Result<Vec<_>>>()?,
    );
    let truths: Vec<Truth> = entities
        .par_iter()
        .map(|e| qa::truth(&kg, e))
        .collect::<autoglm::Result<_>>()?;
    // Questions per true synset, kept when the chain retrieved from the
    // true synset supports the true answer (as for the training set).
    let mut edges_of: HashMap<String, Edges> = HashMap::new();
    let pools: Vec<Vec<KgQuestion>> = (0..entities.len())
        .map(|i| -> Result<Vec<KgQuestion>> {
            let edges = retrieve(&kg, &entities[i], MAX_OTHER_HOPS)?;
            let qs = qa::questions_about(&lex, &truths, i, a.per_entity, a.seed ^ i as u64)
                .into_iter()
                .filter(|q| {
                    let f = facts_for(&edges, &lex, &entities[i], &q.question, a.keep);
                    rule_answer(&lex, &q.question, f.chain.as_ref()).as_deref()
                        == Some(q.answer.as_str())
                })
                .collect();
            edges_of.insert(entities[i].clone(), edges);
            Ok(qs)
        })
        .collect::<Result<_>>()?;

    // Photos, recognised by EfficientNet-Lite0 (ImageNet).
    let photos = assets::dir("photos")?;
    let clf = autoglm::vision::efficientnet::ImageClassifier::load(
        &assets::dir("efficientnet-lite0")?,
        &assets::dir("imagenet")?.join("labels.txt"),
        &dev,
    )?;
    let wnids: Vec<String> =
        std::fs::read_to_string(assets::dir("imagenet")?.join("imagenet_synsets.txt"))?
            .split_whitespace()
            .map(String::from)
            .collect();
    let mut cases = Vec::new();
    let mut recognised: BTreeMap<&str, f64> = BTreeMap::new();
    let mut photo_seen = Vec::new();
    for (i, (file, _)) in PHOTOS.iter().enumerate() {
        let img = crate::commands::load_images(g, &[photos.join(file)])?;
        let top = clf.top_k(&img, 1)?.remove(0).remove(0);
        let predicted = iri(&wnids[top.index])?;
        // Right when the class is the photo's synset or a kind of it.
        let right = predicted == entities[i]
            || qa::truth(&kg, &predicted)?.ancestors.contains(&entities[i]);
        photo_seen.push(
            json!({"photo": file, "true": lex.label(&entities[i]), "seen_as": top.label,
                                "probability": top.probability, "right": right}),
        );
        for q in &pools[i] {
            cases.push(Case {
                set: "photos",
                q,
                predicted: predicted.clone(),
            });
        }
    }
    // Fashion-MNIST test images, recognised by the classifier trained here.
    let mlp = PixelMlp::load(&fashion_dir, &dev).with_context(|| {
        format!(
            "loading {} (train it with `autoglm fashion train`)",
            fashion_dir.display()
        )
    })?;
    let test = fashion_mnist::load(&assets::dir("fashion-mnist")?, "test")?;
    let n = a.fashion_images.min(test.len());
    if n == 0 {
        bail!("--fashion-images must be positive");
    }
    let pred = mlp.predict(&test.images[..n * fashion_mnist::PIXELS])?;
    let mut right = 0;
    for (k, (p, _)) in pred.iter().enumerate() {
        let truth = test.labels[k] as usize;
        right += usize::from(*p == truth);
        let pool = &pools[PHOTOS.len() + truth];
        for j in 0..a.per_image.min(pool.len()) {
            let q = &pool[(k * a.per_image + j) % pool.len()];
            cases.push(Case {
                set: "fashion-mnist",
                q,
                predicted: entities[PHOTOS.len() + p].clone(),
            });
        }
    }
    recognised.insert("fashion-mnist", right as f64 / n as f64);
    for c in &cases {
        if !edges_of.contains_key(&c.predicted) {
            let e = retrieve(&kg, &c.predicted, MAX_OTHER_HOPS)?;
            edges_of.insert(c.predicted.clone(), e);
        }
    }

    // Ask.
    let cfg = GenerateConfig {
        max_new_tokens: 16,
        ..GenerateConfig::default()
    };
    // Both readers answer yes, no, or with a phrase of their prompt (as
    // `ask --kg` does).
    let ask = |m: &Assistant, text: &str| -> autoglm::Result<String> {
        let cfg = GenerateConfig {
            answer_space: Some(std::sync::Arc::new(
                m.answer_space(&qa::reader_answers(text))?,
            )),
            ..cfg.clone()
        };
        Ok(m.ask(&[], text, &cfg, Overflow::Error, &mut |_| true)?
            .text
            .trim()
            .to_string())
    };
    let lexr: &Lexicon = &lex;
    let rows: Vec<Row> = cases
        .par_iter()
        .map(|c| -> autoglm::Result<Row> {
            let q = c.q;
            let f = facts_for(
                &edges_of[&c.predicted],
                lexr,
                &c.predicted,
                &q.question,
                a.keep,
            );
            let f_true = facts_for(&edges_of[&q.entity], lexr, &q.entity, &q.question, a.keep);
            let rule = rule_answer(lexr, &q.question, f.chain.as_ref()).unwrap_or_default();
            Ok(Row {
                set: c.set,
                entity: wnid_of(&q.entity),
                predicted: wnid_of(&c.predicted),
                question: q.question.clone(),
                kind: q.kind,
                truth: q.answer.clone(),
                with_kg: ask(
                    &reader,
                    &prompt(lexr.label(&c.predicted), &f.steps, &q.question),
                )?,
                without_kg: ask(
                    &blind,
                    &prompt_without_kg(lexr.label(&c.predicted), &q.question),
                )?,
                oracle: ask(
                    &reader,
                    &prompt(lexr.label(&q.entity), &f_true.steps, &q.question),
                )?,
                right: [false; 4],
                rule,
                facts: f.steps,
            })
        })
        .collect::<autoglm::Result<_>>()?;

    // An answer is right when it is the true one, or, for "what kind"
    // questions, when it names a kind of the true synset: a photo of a
    // domestic cat that the reader calls a "tiger cat" is answered right.
    let mut kind_of: HashMap<String, bool> = HashMap::new();
    let mut rows = rows;
    for r in &mut rows {
        let truth_iri = iri(&r.entity)?;
        let answers = [&r.with_kg, &r.without_kg, &r.rule, &r.oracle];
        for (k, ans) in answers.into_iter().enumerate() {
            r.right[k] = *ans == r.truth
                || (r.kind == "kind" && {
                    let key = format!("{ans}\u{0}{truth_iri}");
                    match kind_of.get(&key) {
                        Some(&b) => b,
                        None => {
                            let mut b = false;
                            for s in lex.lookup(ans).into_iter().flatten() {
                                b |= qa::truth(&kg, s)?.ancestors.contains(&truth_iri);
                            }
                            kind_of.insert(key, b);
                            b
                        }
                    }
                });
        }
    }
    let mut by_set: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut by_kind: BTreeMap<(&str, &str), Tally> = BTreeMap::new();
    for r in &rows {
        by_set.entry(r.set).or_default().add(r);
        by_kind.entry((r.set, r.kind)).or_default().add(r);
    }
    let report = json!({
        "sets": by_set.iter().map(|(k, t)| (k.to_string(), t.rates())).collect::<serde_json::Map<_, _>>(),
        "by_kind": by_kind.iter().map(|((s, k), t)| (format!("{s}/{k}"), t.rates())).collect::<serde_json::Map<_, _>>(),
        "fashion_classifier_accuracy": recognised.get("fashion-mnist"),
        "fashion_images": n,
        "photos": photo_seen,
        "reader": reader_dir, "no_kg_reader": no_kg_dir,
        "seconds": t0.elapsed().as_secs_f64(),
    });
    if let Some(out) = &a.out {
        let mut text = serde_json::to_string_pretty(&report)?;
        text.push('\n');
        for r in &rows {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        autoglm::train::write_atomic(out, text.as_bytes())?;
    }
    if g.json {
        println!("{report}");
        return Ok(());
    }
    for p in &photo_seen {
        println!(
            "{}: {} — seen as {} ({:.0} %){}",
            p["photo"].as_str().unwrap_or(""),
            p["true"].as_str().unwrap_or(""),
            p["seen_as"].as_str().unwrap_or(""),
            p["probability"].as_f64().unwrap_or(0.0) * 100.0,
            if p["right"] == true {
                ""
            } else {
                ", not a kind of it"
            }
        );
    }
    println!(
        "Fashion-MNIST classifier: {:.2} % on the first {n} test images",
        right as f64 / n as f64 * 100.0
    );
    println!(
        "{:<28} {:>9} {:>8} {:>11} {:>6} {:>13} {:>14}",
        "set", "questions", "with KG", "without KG", "rule", "true entity", "correct chains"
    );
    let pct = |x: usize, n: usize| format!("{:.1} %", x as f64 / n.max(1) as f64 * 100.0);
    let line = |name: String, t: &Tally| {
        println!(
            "{name:<28} {:>9} {:>8} {:>11} {:>6} {:>13} {:>14}",
            t.questions,
            pct(t.with_kg, t.questions),
            pct(t.without_kg, t.questions),
            pct(t.rule, t.questions),
            pct(t.oracle_entity_with_kg, t.questions),
            pct(t.correct_chains, t.questions)
        );
    };
    for (s, t) in &by_set {
        line(s.to_string(), t);
    }
    for ((s, k), t) in &by_kind {
        line(format!("  {s}/{k}"), t);
    }
    eprintln!("[{:.1} s]", t0.elapsed().as_secs_f64());
    Ok(())
}
