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
