//! Questions about an entity answered from knowledge-graph chains: the
//! facts a model reads for a question, the generated question sets that
//! teach a small decoder to read them, and a rule that answers from the
//! chain's structure (the baseline beside the model).
//!
//! The facts are made the same way for training and for answering
//! ([`facts_for`]): link the question's words, retrieve from the entity
//! (its is-a closure and up to [`MAX_OTHER_HOPS`] part / member / substance
//! hops), and keep the shortest chain to a linked concept, written as
//! numbered steps. When no chain reaches the question, the facts say what
//! the entity is (its is-a chain to the root), so a "no" has to be read
//! too: the concept is not there.

use std::collections::{BTreeMap, HashSet};

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::kg::reason::{
    retrieve, shortest_chain, Chain, Edges, Lexicon, Relation, MAX_OTHER_HOPS,
};
use crate::kg::store::KnowledgeGraph;
use crate::kg::wordnet::ID;
use crate::{Error, Result};

/// WordNet's root noun, "entity".
pub fn root() -> String {
    format!("{ID}00001740-n")
}

/// The question forms the generated sets use and the rule understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Form {
    /// "Is this a dog?"
    IsA,
    /// "Does it have a wheel?"
    HasPart,
    /// "What kind of animal is this?"
    WhatKind,
}

impl Form {
    /// The form of `question` and the words of its concept.
    pub fn parse(question: &str) -> Option<(Form, String)> {
        let q = question.trim().trim_end_matches('?').trim();
        let lower = q.to_lowercase();
        let strip_article = |s: &str| {
            let s = s.trim();
            s.strip_prefix("a ")
                .or_else(|| s.strip_prefix("an "))
                .or_else(|| s.strip_prefix("the "))
                .unwrap_or(s)
                .trim()
                .to_string()
        };
        for (prefix, form) in [
            ("is this ", Form::IsA),
            ("is it ", Form::IsA),
            ("does it have ", Form::HasPart),
            ("does this have ", Form::HasPart),
        ] {
            if let Some(rest) = lower.strip_prefix(prefix) {
                return Some((form, strip_article(rest)));
            }
        }
        let rest = lower.strip_prefix("what kind of ")?;
        let concept = rest
            .strip_suffix(" is this")
            .or_else(|| rest.strip_suffix(" is it"))?;
        Some((Form::WhatKind, strip_article(concept)))
    }
}

/// The shortest chain from `entity` to a synset the question's words link
/// to, over retrieved `edges`.
pub fn chain_to_question(
    edges: &Edges,
    lex: &Lexicon,
    entity: &str,
    question: &str,
) -> Option<Chain> {
    let mut best: Option<Chain> = None;
    for l in lex.link(question) {
        for target in &l.synsets {
            if target == entity {
                continue;
            }
            if let Some(c) = shortest_chain(edges, entity, target, MAX_OTHER_HOPS) {
                if best.as_ref().is_none_or(|b| c.hops() < b.hops()) {
                    best = Some(c);
                }
            }
        }
    }
    best
}

/// What the model reads for one question.
#[derive(Debug, Clone)]
pub struct Facts {
    /// The chain that reaches the question, if one does.
    pub chain: Option<Chain>,
    /// Numbered-step text: that chain, else the first steps of the
    /// entity's is-a chain.
    pub steps: Vec<String>,
}

/// The facts for `question` about `entity`, from its retrieved `edges`;
/// long chains keep `keep` steps.
pub fn facts_for(edges: &Edges, lex: &Lexicon, entity: &str, question: &str, keep: usize) -> Facts {
    let chain = chain_to_question(edges, lex, entity, question);
    let steps = match &chain {
        Some(c) => lex.verbalise(c, keep),
        // What the entity is: the first steps of its is-a chain.
        None => shortest_chain(edges, entity, &root(), 0)
            .map(|mut c| {
                c.steps.truncate(keep.max(1));
                lex.verbalise(&c, keep)
            })
            .unwrap_or_default(),
    };
    Facts { chain, steps }
}

/// The text a model reads with the knowledge graph: the name of what was
/// recognised, numbered facts, then the question.
pub fn prompt(entity_label: &str, steps: &[String], question: &str) -> String {
    let facts = if steps.is_empty() {
        "none found".to_string()
    } else {
        steps
            .iter()
            .enumerate()
            .map(|(i, f)| format!("{}. {f}", i + 1))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!("Seen: {entity_label}\nFacts: {facts}\nQuestion: {question}")
}

/// The text a model reads without the knowledge graph: only the name of
/// what was recognised, as in [`prompt`].
pub fn prompt_without_kg(entity_label: &str, question: &str) -> String {
    format!("Seen: {entity_label}\nQuestion: {question}")
}

/// What a reader may answer to a [`prompt`] (or [`prompt_without_kg`]):
/// "yes", "no", or the name of a thing it was given: the Seen name or a
/// name in one of the facts; never, for "what kind of X is this?", X
/// itself (a non-answer). Decoding restricted to these
/// ([`crate::text::generate::AnswerSpace`]) lets the reader answer "what
/// kind" questions with a name it has never seen by copying it off the
/// prompt, while it still chooses every token and when to stop.
pub fn reader_answers(prompt: &str) -> Vec<String> {
    let mut out: Vec<String> = vec!["yes".into(), "no".into()];
    let mut asked = None;
    for line in prompt.lines() {
        if let Some(q) = line.strip_prefix("Question:") {
            if let Some((Form::WhatKind, concept)) = Form::parse(q.trim()) {
                asked = Some(concept.to_lowercase());
            }
        } else if let Some(seen) = line.strip_prefix("Seen:") {
            out.push(seen.trim().to_string());
        } else if let Some(facts) = line.strip_prefix("Facts:") {
            // Steps are numbered "1. … 2. …".
            let mut step = Vec::new();
            let mut flush = |step: &mut Vec<&str>| {
                out.extend(crate::kg::reason::Relation::names_in_step(&step.join(" ")));
                step.clear();
            };
            for w in facts.split_whitespace() {
                let numbering = w.len() > 1
                    && w.ends_with('.')
                    && w[..w.len() - 1].chars().all(|c| c.is_ascii_digit());
                if numbering {
                    flush(&mut step);
                } else {
                    step.push(w);
                }
            }
            flush(&mut step);
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| {
        !p.is_empty()
            && p != "none found"
            && asked.as_deref() != Some(p.to_lowercase().as_str())
            && seen.insert(p.clone())
    });
    out
}

/// Whether a chain says the entity has the concept as a part: is-a steps
/// and exactly one has-part step.
fn has_part(c: &Chain) -> bool {
    let other: Vec<Relation> = c
        .steps
        .iter()
        .map(|s| s.relation)
        .filter(|r| !r.is_isa())
        .collect();
    other == [Relation::HasPart]
}

/// The rule-based answer: read the chain's structure, not its words. A
/// baseline beside the trained reader; `None` when the question has none
/// of the [`Form`]s.
pub fn rule_answer(lex: &Lexicon, question: &str, chain: Option<&Chain>) -> Option<String> {
    let (form, _) = Form::parse(question)?;
    let isa = chain.is_some_and(|c| c.steps.iter().all(|s| s.relation.is_isa()));
    Some(match form {
        Form::IsA => if isa { "yes" } else { "no" }.to_string(),
        Form::HasPart => if chain.is_some_and(has_part) {
            "yes"
        } else {
            "no"
        }
        .to_string(),
        Form::WhatKind => match chain {
            Some(c) if isa => lex.label(&c.steps[0].from).to_string(),
            _ => "unknown".to_string(),
        },
    })
}

/// What WordNet says of one entity, to generate questions and their true
/// answers.
#[derive(Debug, Clone, Default)]
pub struct Truth {
    pub entity: String,
    /// Its is-a closure (without itself).
    pub ancestors: HashSet<String>,
    /// What it has as a part: the parts of it and its ancestors, and their
    /// own is-a closures.
    pub parts: HashSet<String>,
    /// The parts worth asking about: direct parts and their parents.
    pub near_parts: Vec<String>,
}

/// Reads the truth about `entity` from the store.
pub fn truth(kg: &KnowledgeGraph, entity: &str) -> Result<Truth> {
    let edges = retrieve(kg, entity, 1)?;
    let closure = |start: &[String]| -> HashSet<String> {
        let mut seen: HashSet<String> = HashSet::new();
        let mut stack: Vec<String> = start.to_vec();
        while let Some(n) = stack.pop() {
            for (r, to) in edges.get(&n).into_iter().flatten() {
                if r.is_isa() && seen.insert(to.clone()) {
                    stack.push(to.clone());
                }
            }
        }
        seen
    };
    let ancestors = closure(&[entity.to_string()]);
    let mut direct: Vec<String> = Vec::new();
    for a in ancestors.iter().chain(std::iter::once(&entity.to_string())) {
        for (r, to) in edges.get(a).into_iter().flatten() {
            if *r == Relation::HasPart {
                direct.push(to.clone());
            }
        }
    }
    direct.sort();
    direct.dedup();
    let mut parts = closure(&direct);
    parts.extend(direct.iter().cloned());
    let mut near: Vec<String> = direct.clone();
    for d in &direct {
        for (r, to) in edges.get(d).into_iter().flatten() {
            if r.is_isa() {
                near.push(to.clone());
            }
        }
    }
    near.sort();
    near.dedup();
    near.retain(|p| !ancestors.contains(p) && p != entity);
    Ok(Truth {
        entity: entity.to_string(),
        ancestors,
        parts,
        near_parts: near,
    })
}

/// One generated question and its true answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KgQuestion {
    /// The synset IRI of the entity (what the photo shows).
    pub entity: String,
    pub question: String,
    pub answer: String,
    /// `isa`, `not-isa`, `part`, `not-part`, `kind`.
    pub kind: &'static str,
}

fn article(w: &str) -> String {
    if w.starts_with(|c: char| "aeiouAEIOU".contains(c)) {
        format!("an {w}")
    } else {
        format!("a {w}")
    }
}

/// `per_entity` questions about `truths[i]`, cycling through is-a (yes,
/// no), part (yes, no) and what-kind; a "no" asks about another entity's
/// ancestor or part that this one does not have. Deterministic for a seed.
pub fn questions_about(
    lex: &Lexicon,
    truths: &[Truth],
    i: usize,
    per_entity: usize,
    seed: u64,
) -> Vec<KgQuestion> {
    let rng = &mut rand::rngs::StdRng::seed_from_u64(seed);
    let t = &truths[i];
    let ancestors: Vec<&String> = {
        let mut v: Vec<&String> = t.ancestors.iter().collect();
        v.sort();
        v
    };
    let mut out = Vec::new();
    for q in 0..per_entity {
        let (form, yes) = match q % 5 {
            0 => (Form::IsA, true),
            1 => (Form::IsA, false),
            2 if !t.near_parts.is_empty() => (Form::HasPart, true),
            3 if !t.near_parts.is_empty() => (Form::HasPart, false),
            2 => (Form::IsA, true),
            3 => (Form::IsA, false),
            _ => (Form::WhatKind, true),
        };
        let concept = if yes {
            match form {
                Form::HasPart => t.near_parts.choose(rng).cloned(),
                _ => ancestors.choose(rng).map(|s| s.to_string()),
            }
        } else {
            // Another entity's concept that this one does not reach.
            (0..50).find_map(|_| {
                let o = &truths[rng.random_range(0..truths.len())];
                let c = match form {
                    Form::HasPart => o.near_parts.choose(rng).cloned(),
                    _ => {
                        let mut a: Vec<&String> = o.ancestors.iter().collect();
                        a.sort();
                        a.choose(rng).map(|s| s.to_string())
                    }
                }?;
                (!t.ancestors.contains(&c) && !t.parts.contains(&c) && c != t.entity).then_some(c)
            })
        };
        let Some(concept) = concept else { continue };
        let name = lex.label(&concept);
        if name.starts_with("http") {
            continue;
        }
        let (question, answer, kind) = match (form, yes) {
            (Form::WhatKind, _) => (
                format!("What kind of {name} is this?"),
                lex.label(&t.entity).to_string(),
                "kind",
            ),
            (Form::IsA, true) => (format!("Is this {}?", article(name)), "yes".into(), "isa"),
            (Form::IsA, false) => (
                format!("Is this {}?", article(name)),
                "no".into(),
                "not-isa",
            ),
            (Form::HasPart, true) => (
                format!("Does it have {}?", article(name)),
                "yes".into(),
                "part",
            ),
            (Form::HasPart, false) => (
                format!("Does it have {}?", article(name)),
                "no".into(),
                "not-part",
            ),
        };
        out.push(KgQuestion {
            entity: t.entity.clone(),
            question,
            answer,
            kind,
        });
    }
    out
}

/// A generated question with the facts retrieved for it.
#[derive(Debug, Clone)]
pub struct Grounded {
    pub question: KgQuestion,
    pub facts: Facts,
}

/// What [`generate`] kept and dropped.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GenerateReport {
    /// Questions kept, by kind.
    pub kept: BTreeMap<&'static str, usize>,
    /// Questions dropped because the retrieved chain does not support the
    /// true answer (a word's other sense, a rare word that does not link,
    /// a shorter chain through another relation), by kind.
    pub dropped: BTreeMap<&'static str, usize>,
}

/// Questions about each of `entities` (synset IRIs) with their facts,
/// keeping only those whose retrieved chain supports the true answer, so
/// that the answer can be read from the facts. Deterministic for a seed,
/// whatever the threads.
pub fn generate(
    kg: &KnowledgeGraph,
    lex: &Lexicon,
    entities: &[String],
    per_entity: usize,
    keep: usize,
    seed: u64,
) -> Result<(Vec<Grounded>, GenerateReport)> {
    if entities.is_empty() {
        return Err(Error::Invalid("no entities to ask about".into()));
    }
    let truths: Vec<Truth> = entities
        .par_iter()
        .map(|e| truth(kg, e))
        .collect::<Result<_>>()?;
    let per: Vec<(Vec<Grounded>, Vec<&'static str>)> = (0..entities.len())
        .into_par_iter()
        .map(|i| -> Result<_> {
            let qs = questions_about(
                lex,
                &truths,
                i,
                per_entity,
                seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            if qs.is_empty() {
                return Ok((Vec::new(), Vec::new()));
            }
            let edges = retrieve(kg, &entities[i], MAX_OTHER_HOPS)?;
            let mut kept = Vec::new();
            let mut dropped = Vec::new();
            for q in qs {
                let facts = facts_for(&edges, lex, &entities[i], &q.question, keep);
                if rule_answer(lex, &q.question, facts.chain.as_ref()).as_deref() == Some(&q.answer)
                {
                    kept.push(Grounded { question: q, facts });
                } else {
                    dropped.push(q.kind);
                }
            }
            Ok((kept, dropped))
        })
        .collect::<Result<_>>()?;
    let mut report = GenerateReport::default();
    let mut out = Vec::new();
    for (kept, dropped) in per {
        for g in &kept {
            *report.kept.entry(g.question.kind).or_default() += 1;
        }
        for d in dropped {
            *report.dropped.entry(d).or_default() += 1;
        }
        out.extend(kept);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    out.shuffle(&mut rng);
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_answers_are_yes_no_and_the_names_given() {
        let p = prompt(
            "soccer ball",
            &[
                "a soccer ball is a kind of ball".into(),
                "a game equipment is a kind of whole (via equipment, instrumentality, artifact)"
                    .into(),
                "a ball has a valve as a part".into(),
            ],
            "What kind of physical entity is this?",
        );
        assert_eq!(
            reader_answers(&p),
            [
                "yes",
                "no",
                "soccer ball",
                "ball",
                "game equipment",
                "whole",
                "valve"
            ]
        );
        let b = reader_answers(&prompt_without_kg("iPod", "What kind of stereo is this?"));
        assert_eq!(b, ["yes", "no", "iPod"]);
        // What it asks about is not an answer to "what kind".
        let c = prompt(
            "soccer ball",
            &["a soccer ball is a kind of ball".into()],
            "What kind of Ball is this?",
        );
        assert_eq!(reader_answers(&c), ["yes", "no", "soccer ball"]);
        let d = prompt(
            "soccer ball",
            &["a soccer ball is a kind of ball".into()],
            "Is this a ball?",
        );
        assert_eq!(reader_answers(&d), ["yes", "no", "soccer ball", "ball"]);
        assert_eq!(
            reader_answers(&prompt("Rome", &[], "Is this a city?")),
            ["yes", "no", "Rome"]
        );
    }

    #[test]
    fn question_forms_parse() {
        assert_eq!(
            Form::parse("Is this an animal?"),
            Some((Form::IsA, "animal".into()))
        );
        assert_eq!(
            Form::parse("is it a Domestic Cat"),
            Some((Form::IsA, "domestic cat".into()))
        );
        assert_eq!(
            Form::parse("Does it have a wheel?"),
            Some((Form::HasPart, "wheel".into()))
        );
        assert_eq!(
            Form::parse("What kind of animal is this?"),
            Some((Form::WhatKind, "animal".into()))
        );
        assert_eq!(Form::parse("Where is the cat?"), None);
        assert_eq!(Form::parse("What kind of animal"), None);
    }

    #[test]
    fn part_chains_need_exactly_one_has_part() {
        let step = |r| crate::kg::reason::Step {
            from: "a".into(),
            relation: r,
            to: "b".into(),
        };
        let c = |rs: &[Relation]| Chain {
            steps: rs.iter().map(|&r| step(r)).collect(),
        };
        assert!(has_part(&c(&[
            Relation::IsA,
            Relation::HasPart,
            Relation::IsA
        ])));
        assert!(!has_part(&c(&[Relation::IsA, Relation::IsA])));
        assert!(!has_part(&c(&[Relation::HasPart, Relation::HasPart])));
        assert!(!has_part(&c(&[Relation::PartOf])));
        assert!(!has_part(&c(&[Relation::MemberOf, Relation::HasPart])));
    }
}
