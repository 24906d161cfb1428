//! Multi-hop reasoning over WordNet in the store: link the question's
//! words to synsets, retrieve the chains that join the image's entity to
//! them, and write the chains as numbered steps.
//!
//! Retrieval runs SPARQL with the entities as bound variables (never
//! pasted into query text): the is-a closure of an entity through the
//! property path `(wn:hypernym|wn:instance_hypernym)*`, then up to
//! [`MAX_OTHER_HOPS`] part / member / substance hops, each followed by its
//! own is-a closure. Chains are found by breadth-first search over the
//! retrieved edges, so the shortest chain to each concept comes first.

use std::collections::{HashMap, HashSet, VecDeque};

use oxigraph::model::{NamedNode, Term};

use crate::kg::store::{Answer, KnowledgeGraph, QueryLimits};
use crate::kg::wordnet::{ONTO, PREF_LABEL, RDFS_LABEL};
use crate::{Error, Result};

/// Non-is-a hops allowed in one chain.
pub const MAX_OTHER_HOPS: usize = 3;
/// Nodes a retrieval may reach before it stops widening.
const MAX_NODES: usize = 20_000;

/// The relation of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Relation {
    IsA,
    InstanceOf,
    HasPart,
    HasMember,
    HasSubstance,
    PartOf,
    MemberOf,
    SubstanceOf,
}

impl Relation {
    fn from_predicate(p: &str) -> Option<Self> {
        Some(match p.strip_prefix(ONTO)? {
            "hypernym" => Relation::IsA,
            "instance_hypernym" => Relation::InstanceOf,
            "part_meronym" => Relation::HasPart,
            "member_meronym" => Relation::HasMember,
            "substance_meronym" => Relation::HasSubstance,
            "part_holonym" => Relation::PartOf,
            "member_holonym" => Relation::MemberOf,
            "substance_holonym" => Relation::SubstanceOf,
            _ => return None,
        })
    }

    pub fn is_isa(self) -> bool {
        matches!(self, Relation::IsA | Relation::InstanceOf)
    }

    /// The names a step of [`Self::say`] (possibly condensed with a
    /// "(via …)" list) mentions, in order: "a tabby is a kind of domestic
    /// cat" → ["tabby", "domestic cat"].
    pub fn names_in_step(step: &str) -> Vec<String> {
        let core = step.split(" (via ").next().unwrap_or(step);
        let mut text = format!(" {core} ");
        // Longest first, so that " is " does not cut " is a kind of ".
        for joint in [
            " is a substance of ",
            " is a member of ",
            " is a kind of ",
            " as a member ",
            " is part of ",
            " is made of ",
            " as a part ",
            " has ",
            " is ",
        ] {
            text = text.replace(joint, " | ");
        }
        text.split('|')
            .map(str::trim)
            .map(|n| {
                // Drop the article `say` added before a lower-case name.
                for art in ["a ", "an "] {
                    if let Some(rest) = n.strip_prefix(art) {
                        if !rest.starts_with(|c: char| c.is_uppercase()) {
                            return rest.to_string();
                        }
                    }
                }
                n.to_string()
            })
            .filter(|n| !n.is_empty())
            .collect()
    }

    /// The step in plain words, given the labels of its two ends.
    fn say(self, from: &str, to: &str) -> String {
        let a = |w: &str| {
            if w.starts_with(|c: char| c.is_uppercase()) {
                w.to_string() // a name: "Rome", "Felis catus"
            } else if w.starts_with(|c: char| "aeiou".contains(c)) {
                format!("an {w}")
            } else {
                format!("a {w}")
            }
        };
        match self {
            Relation::IsA => format!("{} is a kind of {to}", a(from)),
            Relation::InstanceOf => format!("{from} is {}", a(to)),
            Relation::HasPart => format!("{} has {} as a part", a(from), a(to)),
            Relation::HasMember => format!("{} has {} as a member", a(from), a(to)),
            Relation::HasSubstance => format!("{} is made of {to}", a(from)),
            Relation::PartOf => format!("{} is part of {}", a(from), a(to)),
            Relation::MemberOf => format!("{} is a member of {}", a(from), a(to)),
            Relation::SubstanceOf => format!("{from} is a substance of {}", a(to)),
        }
    }
}

/// One step of a chain: `from` `relation` `to` (synset IRIs).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub from: String,
    pub relation: Relation,
    pub to: String,
}

/// A chain of steps from an entity to a concept.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    pub steps: Vec<Step>,
}

impl Chain {
    pub fn hops(&self) -> usize {
        self.steps.len()
    }
}

/// The SPARQL queries retrieval runs (shown by `--explain`).
pub const ISA_CLOSURE: &str = "PREFIX wn: <http://wordnet-rdf.princeton.edu/ontology#>
SELECT ?e ?a ?p ?b WHERE {
  ?e (wn:hypernym|wn:instance_hypernym)* ?a .
  ?a ?p ?b .
  FILTER(?p IN (wn:hypernym, wn:instance_hypernym))
}";

pub const OTHER_HOPS: &str = "PREFIX wn: <http://wordnet-rdf.princeton.edu/ontology#>
SELECT ?e ?a ?p ?b WHERE {
  ?e (wn:hypernym|wn:instance_hypernym)* ?a .
  ?a ?p ?b .
  FILTER(?p IN (wn:part_meronym, wn:member_meronym, wn:substance_meronym,
                wn:part_holonym, wn:member_holonym, wn:substance_holonym))
}";

/// Edges out of each node, as retrieved.
pub type Edges = HashMap<String, Vec<(Relation, String)>>;

fn edges_of(kg: &KnowledgeGraph, query: &str, entity: &str, into: &mut Edges) -> Result<usize> {
    let e = NamedNode::new(entity).map_err(|e| Error::Invalid(format!("entity IRI: {e}")))?;
    let Answer::Solutions { rows, .. } =
        kg.query(query, &[("e", e.into())], QueryLimits::default())?
    else {
        return Err(Error::Invalid("retrieval: not a SELECT answer".into()));
    };
    let iri = |t: &Option<Term>| match t {
        Some(Term::NamedNode(n)) => Some(n.as_str().to_string()),
        _ => None,
    };
    let mut n = 0;
    for r in &rows {
        let (Some(a), Some(p), Some(b)) = (iri(&r[1]), iri(&r[2]), iri(&r[3])) else {
            continue;
        };
        if let Some(rel) = Relation::from_predicate(&p) {
            let out = into.entry(a).or_default();
            if !out.iter().any(|(r2, b2)| *r2 == rel && *b2 == b) {
                out.push((rel, b));
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Retrieves the edges reachable from `entity`: its is-a closure, and up
/// to `max_other` part/member/substance hops, each with its own closure.
pub fn retrieve(kg: &KnowledgeGraph, entity: &str, max_other: usize) -> Result<Edges> {
    let mut edges = Edges::new();
    edges_of(kg, ISA_CLOSURE, entity, &mut edges)?;
    let mut frontier = vec![entity.to_string()];
    let mut seen: HashSet<String> = frontier.iter().cloned().collect();
    for _ in 0..max_other.min(MAX_OTHER_HOPS) {
        let mut next = Vec::new();
        for e in &frontier {
            let mut other = Edges::new();
            edges_of(kg, OTHER_HOPS, e, &mut other)?;
            for (a, outs) in other {
                for (rel, b) in outs {
                    if seen.insert(b.clone()) {
                        next.push(b.clone());
                    }
                    let v = edges.entry(a.clone()).or_default();
                    if !v.contains(&(rel, b.clone())) {
                        v.push((rel, b));
                    }
                }
            }
        }
        for b in &next {
            edges_of(kg, ISA_CLOSURE, b, &mut edges)?;
        }
        if seen.len() > MAX_NODES || next.is_empty() {
            break;
        }
        frontier = next;
    }
    // One order whatever the hash maps did: is-a first, then by IRI, so
    // that equally short chains are chosen the same way every time.
    for v in edges.values_mut() {
        v.sort();
    }
    Ok(edges)
}

/// The shortest chain from `from` to `to` over `edges` with at most
/// `max_other` non-is-a steps.
pub fn shortest_chain(edges: &Edges, from: &str, to: &str, max_other: usize) -> Option<Chain> {
    // State: (node, non-is-a steps so far); parents for reconstruction.
    let mut parent: HashMap<(String, usize), (String, usize, Relation)> = HashMap::new();
    let mut queue = VecDeque::from([(from.to_string(), 0usize)]);
    let mut seen: HashSet<(String, usize)> = HashSet::from([(from.to_string(), 0)]);
    while let Some((node, k)) = queue.pop_front() {
        if node == to {
            let mut steps = Vec::new();
            let mut cur = (node, k);
            while let Some((p, pk, rel)) = parent.get(&cur) {
                steps.push(Step {
                    from: p.clone(),
                    relation: *rel,
                    to: cur.0.clone(),
                });
                cur = (p.clone(), *pk);
            }
            steps.reverse();
            return Some(Chain { steps });
        }
        for (rel, next) in edges.get(&node).into_iter().flatten() {
            let nk = k + usize::from(!rel.is_isa());
            if nk > max_other {
                continue;
            }
            let state = (next.clone(), nk);
            if seen.insert(state.clone()) {
                parent.insert(state.clone(), (node.clone(), k, *rel));
                queue.push_back(state);
            }
        }
    }
    None
}

/// Words of a question linked to synsets.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    /// The words as written in the question.
    pub text: String,
    /// Candidate synset IRIs (nouns first).
    pub synsets: Vec<String>,
}

/// A lemma → synsets index of the store's `rdfs:label`s, for linking.
pub struct Lexicon {
    lemmas: HashMap<String, Vec<String>>,
    labels: HashMap<String, String>,
    /// Irregular plurals (WordNet's noun.exc), plural → singular.
    exceptions: HashMap<String, String>,
}

const STOPWORDS: &[&str] = &[
    "a", "an", "the", "is", "are", "this", "that", "these", "it", "its", "what", "which", "kind",
    "sort", "type", "of", "does", "do", "have", "has", "in", "on", "be", "there", "any", "picture",
    "photo", "image", "thing", "object", "part", "member", "made", "or", "and", "to", "can",
    "with", "you", "see", "one", "some",
];

impl Lexicon {
    /// Reads every label of the store; `noun_exc` is WordNet's `noun.exc`
    /// text (irregular plurals), when at hand.
    pub fn new(kg: &KnowledgeGraph, noun_exc: Option<&str>) -> Result<Self> {
        let q = format!("SELECT ?s ?l WHERE {{ ?s <{RDFS_LABEL}> ?l }}");
        let limits = QueryLimits {
            max_rows: 10_000_000,
            ..QueryLimits::default()
        };
        let Answer::Solutions { rows, .. } = kg.query(&q, &[], limits)? else {
            return Err(Error::Invalid("lexicon: not a SELECT answer".into()));
        };
        let mut lemmas: HashMap<String, Vec<String>> = HashMap::new();
        let mut labels = HashMap::new();
        for r in rows {
            if let (Some(Term::NamedNode(s)), Some(Term::Literal(l))) = (&r[0], &r[1]) {
                let iri = s.as_str().to_string();
                labels
                    .entry(iri.clone())
                    .or_insert_with(|| l.value().to_string());
                lemmas
                    .entry(l.value().to_lowercase())
                    .or_default()
                    .push(iri);
            }
        }
        // Head words, where the graph names them, label the synsets.
        let q = format!("SELECT ?s ?l WHERE {{ ?s <{PREF_LABEL}> ?l }}");
        if let Answer::Solutions { rows, .. } = kg.query(&q, &[], limits)? {
            for r in rows {
                if let (Some(Term::NamedNode(s)), Some(Term::Literal(l))) = (&r[0], &r[1]) {
                    labels.insert(s.as_str().to_string(), l.value().to_string());
                }
            }
        }
        for v in lemmas.values_mut() {
            // Nouns first (the things a photo shows), then by IRI for a
            // stable order.
            v.sort_by_key(|i| (!i.ends_with("-n"), i.clone()));
            v.dedup();
        }
        let exceptions = noun_exc
            .unwrap_or("")
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.replace('_', " "), w.next()?.replace('_', " ")))
            })
            .collect();
        Ok(Self {
            lemmas,
            labels,
            exceptions,
        })
    }

    /// The head word of a synset ("tabby"), else one of its labels, else
    /// the IRI.
    pub fn label<'a>(&'a self, iri: &'a str) -> &'a str {
        self.labels.get(iri).map(String::as_str).unwrap_or(iri)
    }

    /// Synsets of a word or phrase, trying its singular forms too.
    pub fn lookup(&self, phrase: &str) -> Option<&Vec<String>> {
        let p = phrase.to_lowercase();
        if let Some(v) = self.lemmas.get(&p) {
            return Some(v);
        }
        if let Some(s) = self.exceptions.get(&p) {
            return self.lemmas.get(s);
        }
        // WordNet's morphy rules for nouns.
        for (suffix, repl) in [
            ("ses", "s"),
            ("xes", "x"),
            ("zes", "z"),
            ("ches", "ch"),
            ("shes", "sh"),
            ("men", "man"),
            ("ies", "y"),
            ("s", ""),
        ] {
            if let Some(stem) = p.strip_suffix(suffix) {
                if let Some(v) = self.lemmas.get(&format!("{stem}{repl}")) {
                    return Some(v);
                }
            }
        }
        None
    }

    /// Links the longest word sequences (up to 4 words) of `question` that
    /// name synsets, skipping function words.
    pub fn link(&self, question: &str) -> Vec<Link> {
        let words: Vec<&str> = question
            .split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '\''))
            .filter(|w| !w.is_empty())
            .collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < words.len() {
            let mut hit = None;
            for n in (1..=4.min(words.len() - i)).rev() {
                let phrase = words[i..i + n].join(" ");
                if n == 1 && STOPWORDS.contains(&phrase.to_lowercase().as_str()) {
                    break;
                }
                if let Some(v) = self.lookup(&phrase) {
                    hit = Some((
                        n,
                        Link {
                            text: phrase,
                            synsets: v.clone(),
                        },
                    ));
                    break;
                }
            }
            match hit {
                Some((n, link)) => {
                    out.push(link);
                    i += n;
                }
                None => i += 1,
            }
        }
        out
    }

    /// The chain as steps in plain words. A chain longer than `keep` steps
    /// is condensed: an all-is-a chain keeps its first and last steps
    /// around a summary of the run between them; a chain that mixes
    /// relations has each run of three or more is-a steps summarised as
    /// one step.
    pub fn verbalise(&self, chain: &Chain, keep: usize) -> Vec<String> {
        let say = |s: &Step| s.relation.say(self.label(&s.from), self.label(&s.to));
        // One is-a step standing for `run`, naming at most three of the
        // kinds it goes through: the question's concept is at an end of a
        // step, never only in the run.
        let summary = |run: &[Step]| {
            let mut via: Vec<&str> = run[1..].iter().map(|s| self.label(&s.from)).collect();
            if via.len() > 3 {
                via.truncate(3);
                via.push("…");
            }
            format!(
                "{} (via {})",
                Relation::IsA.say(self.label(&run[0].from), self.label(&run[run.len() - 1].to)),
                via.join(", ")
            )
        };
        let n = chain.steps.len();
        let keep = keep.max(3);
        if n <= keep {
            return chain.steps.iter().map(say).collect();
        }
        if chain.steps.iter().all(|s| s.relation.is_isa()) {
            let head = keep / 2;
            let tail = keep - head - 1;
            let mut out: Vec<String> = chain.steps[..head].iter().map(say).collect();
            out.push(summary(&chain.steps[head..n - tail]));
            out.extend(chain.steps[n - tail..].iter().map(say));
            return out;
        }
        let mut out = Vec::new();
        let mut i = 0;
        while i < n {
            let run = chain.steps[i..]
                .iter()
                .take_while(|s| s.relation.is_isa())
                .count();
            if run >= 3 {
                out.push(summary(&chain.steps[i..i + run]));
                i += run;
            } else {
                out.push(say(&chain.steps[i]));
                i += 1;
            }
        }
        out
    }
}

/// Orders chains by the MiniLM similarity of the question to each
/// verbalised chain, minus `length_prior` per step; returns the scores.
pub fn rank(
    encoder: &crate::text::bert::SentenceEncoder,
    question: &str,
    chains: &[Vec<String>],
    hops: &[usize],
    length_prior: f32,
) -> Result<Vec<f32>> {
    if chains.is_empty() {
        return Ok(Vec::new());
    }
    let texts: Vec<String> = chains.iter().map(|c| c.join("; ")).collect();
    let mut all: Vec<&str> = vec![question];
    all.extend(texts.iter().map(String::as_str));
    let e = encoder.embed(&all, 32)?.to_vec2::<f32>()?;
    Ok(e[1..]
        .iter()
        .zip(hops)
        .map(|(c, &h)| {
            e[0].iter().zip(c).map(|(a, b)| a * b).sum::<f32>() - length_prior * h as f32
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_come_back_out_of_every_kind_of_step() {
        use super::Relation::*;
        for r in [
            IsA,
            InstanceOf,
            HasPart,
            HasMember,
            HasSubstance,
            PartOf,
            MemberOf,
            SubstanceOf,
        ] {
            for (from, to) in [
                ("domestic cat", "iPod"),
                ("Rome", "national capital"),
                ("oak", "Quercus"),
            ] {
                let step = r.say(from, to);
                assert_eq!(
                    super::Relation::names_in_step(&step),
                    [from, to],
                    "{r:?}: {step}"
                );
                let condensed = format!("{step} (via feline, carnivore, placental)");
                assert_eq!(super::Relation::names_in_step(&condensed), [from, to]);
            }
        }
    }

    use super::*;

    #[test]
    fn shortest_chain_counts_other_hops() {
        let mut e = Edges::new();
        let add =
            |e: &mut Edges, a: &str, r, b: &str| e.entry(a.into()).or_default().push((r, b.into()));
        add(&mut e, "tabby", Relation::IsA, "cat");
        add(&mut e, "cat", Relation::IsA, "animal");
        add(&mut e, "cat", Relation::HasPart, "paw");
        add(&mut e, "paw", Relation::HasPart, "claw");
        add(&mut e, "claw", Relation::IsA, "nail");
        let c = shortest_chain(&e, "tabby", "animal", 0).unwrap();
        assert_eq!(c.hops(), 2);
        assert_eq!(
            c.steps[1],
            Step {
                from: "cat".into(),
                relation: Relation::IsA,
                to: "animal".into()
            }
        );
        assert_eq!(shortest_chain(&e, "tabby", "nail", 2).unwrap().hops(), 4);
        assert!(
            shortest_chain(&e, "tabby", "nail", 1).is_none(),
            "two part-of hops needed"
        );
        assert!(
            shortest_chain(&e, "animal", "tabby", 3).is_none(),
            "edges have a direction"
        );
    }
}
