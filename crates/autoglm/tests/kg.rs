//! WordNet 3.0 in the RDF store, checked against the data files and the
//! published counts, and ImageNet's classes linked to their synsets.

mod common;

use std::collections::HashMap;

use autoglm::kg::wordnet::{self, ONTO, RELATIONS};
use autoglm::kg::{Answer, KnowledgeGraph, QueryLimits};
use oxigraph::model::{Literal, NamedNode, Term};

fn count(kg: &KnowledgeGraph, q: &str, bindings: &[(&str, Term)]) -> u64 {
    match kg.query(q, bindings, QueryLimits::default()).unwrap() {
        Answer::Solutions { variables, rows } => {
            let n = variables
                .iter()
                .position(|v| v == "n")
                .expect("a ?n column");
            match rows.first().map(|r| &r[n]) {
                Some(Some(Term::Literal(l))) => l.value().parse().unwrap(),
                None => 0,
                other => panic!("{other:?}"),
            }
        }
        a => panic!("{a:?}"),
    }
}

/// Pointer symbols of the data files, counted by plain token scanning
/// (independently of the importer's parser): the part before the gloss,
/// after the words.
fn pointer_counts(dir: &std::path::Path) -> (HashMap<&'static str, u64>, HashMap<char, u64>) {
    let mut rel = HashMap::new();
    let mut synsets = HashMap::new();
    for name in wordnet::DATA_FILES {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        for line in text
            .lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        {
            let head = line.split(" | ").next().unwrap();
            let t: Vec<&str> = head.split(' ').collect();
            *synsets.entry(t[2].chars().next().unwrap()).or_insert(0) += 1;
            let words = usize::from_str_radix(t[3], 16).unwrap();
            let p_at = 4 + 2 * words;
            let n: usize = t[p_at].parse().unwrap();
            for k in 0..n {
                let sym = t[p_at + 1 + 4 * k];
                let st = t[p_at + 4 + 4 * k];
                if let Some((_, name)) = RELATIONS.iter().find(|(s, _)| *s == sym) {
                    assert_eq!(st, "0000", "{name} is a semantic relation");
                    *rel.entry(*name).or_insert(0) += 1;
                }
            }
        }
    }
    (rel, synsets)
}

#[test]
fn wordnet_import_matches_the_data_files_and_imagenet_links() {
    let dir = common::asset("wordnet");
    let t0 = std::time::Instant::now();
    let synsets = wordnet::read_synsets(&dir).unwrap();
    let kg = KnowledgeGraph::new().unwrap();
    kg.store().extend(wordnet::quads(&synsets)).unwrap();
    eprintln!(
        "imported {} synsets in {:.1} s",
        synsets.len(),
        t0.elapsed().as_secs_f64()
    );

    // WordNet 3.0's published size: 117,659 synsets.
    let q_syn = format!("SELECT (COUNT(?s) AS ?n) WHERE {{ ?s a <{ONTO}Synset> }}");
    assert_eq!(count(&kg, &q_syn, &[]), 117_659);
    let (rels, by_pos) = pointer_counts(&dir);
    let q_pos = format!(
        "SELECT (COUNT(?s) AS ?n) ?pos WHERE {{ ?s a <{ONTO}Synset> ; <{ONTO}part_of_speech> ?pos }} GROUP BY ?pos"
    );
    for (pos, n) in &by_pos {
        let got = count(
            &kg,
            &q_pos,
            &[("pos", Literal::new_simple_literal(pos.to_string()).into())],
        );
        assert_eq!(got, *n, "synsets of pos {pos}");
    }
    for (_, name) in RELATIONS {
        let q = "SELECT (COUNT(*) AS ?n) ?p WHERE { ?s ?p ?o } GROUP BY ?p";
        let p = NamedNode::new(format!("{ONTO}{name}")).unwrap();
        assert_eq!(count(&kg, q, &[("p", p.into())]), rels[name], "{name}");
    }
    // Published: 89,089 hypernym pointers (75,850 noun + 13,239 verb).
    assert_eq!(rels["hypernym"], 89_089);

    // Every ImageNet-1k class is a WordNet noun synset with a label.
    let wnids =
        std::fs::read_to_string(common::asset("imagenet").join("imagenet_synsets.txt")).unwrap();
    let wnids: Vec<&str> = wnids.split_whitespace().collect();
    assert_eq!(wnids.len(), 1000);
    let q = "SELECT ?s (COUNT(?l) AS ?n) WHERE { ?s <http://www.w3.org/2000/01/rdf-schema#label> ?l } GROUP BY ?s";
    for wnid in wnids {
        let iri = wordnet::synset_of_wnid(wnid).unwrap();
        let s = NamedNode::new(iri).unwrap();
        assert!(
            count(&kg, q, &[("s", s.into())]) >= 1,
            "{wnid} has no synset"
        );
    }
    // A long is-a chain through a property path: tabby → … → animal.
    let tabby = NamedNode::new(wordnet::synset_of_wnid("n02123045").unwrap()).unwrap();
    let q = format!(
        "ASK {{ ?s <{ONTO}hypernym>+ ?a . ?a <http://www.w3.org/2000/01/rdf-schema#label> \"animal\"@en }}"
    );
    let a = kg
        .query(
            &q.replace("?s ", &format!("{tabby} ")),
            &[],
            QueryLimits::default(),
        )
        .unwrap();
    assert_eq!(a, Answer::Boolean(true));
}

/// All of WordNet in a fresh store, and its lexicon with the irregular
/// plurals.
fn wordnet_with_lexicon() -> (KnowledgeGraph, autoglm::kg::reason::Lexicon) {
    let dir = common::asset("wordnet");
    let kg = KnowledgeGraph::new().unwrap();
    kg.store()
        .extend(wordnet::quads(&wordnet::read_synsets(&dir).unwrap()))
        .unwrap();
    let exc = std::fs::read_to_string(dir.join("noun.exc")).unwrap();
    let lex = autoglm::kg::reason::Lexicon::new(&kg, Some(&exc)).unwrap();
    (kg, lex)
}

#[test]
fn questions_link_and_chains_are_retrieved_ranked_and_verbalised() {
    use autoglm::kg::reason::{retrieve, shortest_chain, Relation};
    let (kg, lex) = wordnet_with_lexicon();

    // Linking: case, plurals (regular and irregular), multi-word lemmas,
    // function words skipped.
    let links = lex.link("Is this a Domestic Cat with two mice and some ice creams?");
    let texts: Vec<&str> = links.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["Domestic Cat", "two", "mice", "ice creams"]);
    let id = |wnid: &str| wordnet::synset_of_wnid(wnid).unwrap();
    assert!(links[0].synsets.contains(&id("n02121808")), "domestic cat");
    assert!(links[2].synsets.contains(&id("n02330245")), "mouse");
    assert_eq!(lex.label(&id("n02123045")), "tabby");

    // Is-a chains of any depth through the property path: tabby → animal.
    let tabby = id("n02123045");
    let edges = retrieve(&kg, &tabby, 0).unwrap();
    let animal = id("n00015388");
    let chain = shortest_chain(&edges, &tabby, &animal, 0).unwrap();
    assert!(chain.steps.iter().all(|s| s.relation.is_isa()));
    assert_eq!(chain.steps[0].from, tabby);
    assert_eq!(chain.steps.last().unwrap().to, animal);
    let words = lex.verbalise(&chain, 100);
    assert_eq!(words[0], "a tabby is a kind of domestic cat");
    // A long chain, condensed: tabby → … → entity, the root.
    let entity = id("n00001740");
    let long = shortest_chain(&edges, &tabby, &entity, 0).unwrap();
    assert!(long.hops() >= 8, "{:?}", lex.verbalise(&long, 100));
    let short = lex.verbalise(&long, 4);
    assert_eq!(short.len(), 4);
    assert_eq!(short[0], "a tabby is a kind of domestic cat");
    assert!(short[2].contains("(via "), "{short:?}");
    assert!(
        short[3].ends_with("physical entity is a kind of entity"),
        "{short:?}"
    );
    // The long chain: Egyptian cat → domestic cat → cat → feline →
    // carnivore → placental → mammal.
    let egyptian = id("n02124075");
    let mammal = id("n01861778");
    let e = retrieve(&kg, &egyptian, 0).unwrap();
    let c = shortest_chain(&e, &egyptian, &mammal, 0).unwrap();
    let labels: Vec<&str> = c.steps.iter().map(|s| lex.label(&s.to)).collect();
    assert_eq!(
        labels,
        [
            "domestic cat",
            "cat",
            "feline",
            "carnivore",
            "placental",
            "mammal"
        ]
    );

    // Part-of hops: a car (n02958343) has wheels, through its is-a closure.
    let car = id("n02958343");
    let edges = retrieve(&kg, &car, 3).unwrap();
    let wheel = id("n04574999");
    let c = shortest_chain(&edges, &car, &wheel, 3).unwrap();
    assert!(
        c.steps.iter().any(|s| s.relation == Relation::HasPart),
        "{:?}",
        lex.verbalise(&c, 100)
    );
    assert!(
        shortest_chain(&edges, &car, &wheel, 0).is_none(),
        "not without a part-of step"
    );
}

/// The generated question sets: every answer agrees with a SPARQL property
/// path asked of the store directly (not with the generator's own
/// retrieval), every kind is there, and a seed gives the same set.
#[test]
fn generated_questions_have_true_answers_and_readable_facts() {
    use autoglm::kg::qa::{generate, prompt, Form};
    let (kg, lex) = wordnet_with_lexicon();
    let ids =
        std::fs::read_to_string(common::asset("imagenet").join("imagenet_synsets.txt")).unwrap();
    // 30 ImageNet classes spread over the list: animals, artefacts, food.
    let entities: Vec<String> = ids
        .split_whitespace()
        .step_by(33)
        .filter_map(wordnet::synset_of_wnid)
        .collect();
    let (qs, report) = generate(&kg, &lex, &entities, 10, 5, 7).unwrap();
    let (again, _) = generate(&kg, &lex, &entities, 10, 5, 7).unwrap();
    let texts = |v: &[autoglm::kg::qa::Grounded]| -> Vec<(String, String, Vec<String>)> {
        v.iter()
            .map(|g| {
                (
                    g.question.question.clone(),
                    g.question.answer.clone(),
                    g.facts.steps.clone(),
                )
            })
            .collect()
    };
    assert_eq!(texts(&qs), texts(&again), "a seed gives the same set");
    for kind in ["isa", "not-isa", "part", "not-part", "kind"] {
        assert!(
            report.kept.get(kind).copied().unwrap_or(0) >= 10,
            "{kind}: {report:?}"
        );
    }

    let isa = format!("ASK {{ ?e (<{ONTO}hypernym>|<{ONTO}instance_hypernym>)+ ?c }}");
    let part = format!(
        "ASK {{ ?e (<{ONTO}hypernym>|<{ONTO}instance_hypernym>)*/<{ONTO}part_meronym>/(<{ONTO}hypernym>|<{ONTO}instance_hypernym>)* ?c }}"
    );
    let ask = |q: &str, e: &str, c: &str| -> bool {
        let b = [
            ("e", Term::from(NamedNode::new(e).unwrap())),
            ("c", Term::from(NamedNode::new(c).unwrap())),
        ];
        match kg.query(q, &b, QueryLimits::default()).unwrap() {
            Answer::Boolean(b) => b,
            a => panic!("{a:?}"),
        }
    };
    for g in &qs {
        let q = &g.question;
        let (form, concept) = Form::parse(&q.question).unwrap();
        // The concept's synsets: any sense of the asked word.
        let senses = lex
            .lookup(&concept)
            .unwrap_or_else(|| panic!("{concept:?} does not link"));
        let text = prompt(lex.label(&q.entity), &g.facts.steps, &q.question);
        let head = format!("Seen: {}\nFacts: 1. ", lex.label(&q.entity));
        assert!(
            text.starts_with(&head) && text.ends_with(&q.question),
            "{text}"
        );
        match (form, q.answer.as_str()) {
            (Form::IsA, "yes") => assert!(senses.iter().any(|c| ask(&isa, &q.entity, c)), "{text}"),
            (Form::IsA, "no") => {
                assert!(!senses.iter().any(|c| ask(&isa, &q.entity, c)), "{text}")
            }
            (Form::HasPart, "yes") => {
                assert!(senses.iter().any(|c| ask(&part, &q.entity, c)), "{text}")
            }
            (Form::HasPart, "no") => {
                assert!(!senses.iter().any(|c| ask(&part, &q.entity, c)), "{text}")
            }
            (Form::WhatKind, name) => {
                assert_eq!(name, lex.label(&q.entity));
                assert!(senses.iter().any(|c| ask(&isa, &q.entity, c)), "{text}");
                // The answer is in the facts, to be read off them.
                assert!(g.facts.steps[0].contains(name), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }
}
