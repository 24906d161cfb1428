//! WordNet 3.0 (the Debian `wordnet-base` data files) as RDF.
//!
//! Synset IRIs follow the Princeton WordNet RDF scheme,
//! `http://wordnet-rdf.princeton.edu/id/02123045-n` (offset and part of
//! speech), so that an ImageNet class id such as `n02123045` maps to its
//! synset directly ([`synset_of_wnid`]). Each synset gets its type, part of
//! speech, lemmas (`rdfs:label`, spaces for underscores) and gloss, and the
//! semantic relations below. Format of the data files: `wndb(5WN)`.

use std::path::Path;

use oxigraph::model::{GraphName, Literal, NamedNode, Quad};

use crate::{Error, Result};

pub const ID: &str = "http://wordnet-rdf.princeton.edu/id/";
pub const ONTO: &str = "http://wordnet-rdf.princeton.edu/ontology#";
pub const RDFS_LABEL: &str = "http://www.w3.org/2000/01/rdf-schema#label";
/// The synset's first lemma, its head word.
pub const PREF_LABEL: &str = "http://www.w3.org/2004/02/skos/core#prefLabel";
const RDF_TYPE: &str = "http://www.w3.org/1999/02/22-rdf-syntax-ns#type";

/// The pointer symbols imported, and their predicates (`wn:NAME`).
pub const RELATIONS: [(&str, &str); 10] = [
    ("@", "hypernym"),
    ("@i", "instance_hypernym"),
    ("~", "hyponym"),
    ("~i", "instance_hyponym"),
    ("%p", "part_meronym"),
    ("%m", "member_meronym"),
    ("%s", "substance_meronym"),
    ("#p", "part_holonym"),
    ("#m", "member_holonym"),
    ("#s", "substance_holonym"),
];

pub const DATA_FILES: [&str; 4] = ["data.noun", "data.verb", "data.adj", "data.adv"];

/// One synset of a data file.
#[derive(Debug, Clone, PartialEq)]
pub struct Synset {
    pub offset: u32,
    /// `n`, `v`, `a`, `s` (adjective satellite) or `r`.
    pub pos: char,
    pub lemmas: Vec<String>,
    /// (relation name, target offset, target pos), semantic pointers only.
    pub pointers: Vec<(&'static str, u32, char)>,
    pub gloss: String,
}

pub fn synset_iri(offset: u32, pos: char) -> String {
    format!("{ID}{offset:08}-{pos}")
}

/// `n02123045` (an ImageNet class id) → the synset's IRI.
pub fn synset_of_wnid(wnid: &str) -> Option<String> {
    let pos = wnid.chars().next()?;
    let offset: u32 = wnid.get(1..)?.parse().ok()?;
    "nvasr".contains(pos).then(|| synset_iri(offset, pos))
}

/// Parses one line of a data file; `None` for the license header.
pub fn parse_line(line: &str) -> std::result::Result<Option<Synset>, String> {
    if line.starts_with(' ') || line.trim().is_empty() {
        return Ok(None);
    }
    let (head, gloss) = line.split_once(" | ").unwrap_or((line, ""));
    let mut f = head.split_ascii_whitespace();
    let mut next = |what: &str| f.next().ok_or_else(|| format!("missing {what}"));
    let offset: u32 = next("offset")?
        .parse()
        .map_err(|e| format!("offset: {e}"))?;
    next("lex_filenum")?;
    let pos = next("ss_type")?.chars().next().ok_or("empty ss_type")?;
    let w_cnt = usize::from_str_radix(next("w_cnt")?, 16).map_err(|e| format!("w_cnt: {e}"))?;
    let mut lemmas = Vec::with_capacity(w_cnt);
    for _ in 0..w_cnt {
        let word = next("word")?;
        next("lex_id")?;
        // Adjective markers: `word(a)`, `word(p)`, `word(ip)`.
        let word = word.split_once('(').map_or(word, |(w, _)| w);
        lemmas.push(word.replace('_', " "));
    }
    let p_cnt: usize = next("p_cnt")?.parse().map_err(|e| format!("p_cnt: {e}"))?;
    let mut pointers = Vec::new();
    for _ in 0..p_cnt {
        let sym = next("pointer_symbol")?;
        let target: u32 = next("pointer offset")?
            .parse()
            .map_err(|e| format!("pointer offset: {e}"))?;
        let tpos = next("pointer pos")?
            .chars()
            .next()
            .ok_or("empty pointer pos")?;
        let st = next("source/target")?;
        if let Some((_, name)) = RELATIONS.iter().find(|(s, _)| *s == sym) {
            // Semantic pointers (between synsets) have source/target 0000.
            if st == "0000" {
                pointers.push((*name, target, tpos));
            }
        }
    }
    Ok(Some(Synset {
        offset,
        pos,
        lemmas,
        pointers,
        gloss: gloss.trim().to_string(),
    }))
}

/// Every synset of the four data files in `dir`.
pub fn read_synsets(dir: &Path) -> Result<Vec<Synset>> {
    let mut out = Vec::with_capacity(120_000);
    for name in DATA_FILES {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        for (i, line) in text.lines().enumerate() {
            match parse_line(line) {
                Ok(Some(s)) => out.push(s),
                Ok(None) => {}
                Err(e) => {
                    return Err(Error::Invalid(format!("{}:{}: {e}", path.display(), i + 1)));
                }
            }
        }
    }
    Ok(out)
}

fn node(iri: String) -> NamedNode {
    NamedNode::new_unchecked(iri)
}

/// The quads of `synsets`, in the default graph.
pub fn quads(synsets: &[Synset]) -> Vec<Quad> {
    let g = GraphName::DefaultGraph;
    let rdf_type = node(RDF_TYPE.into());
    let synset_class = node(format!("{ONTO}Synset"));
    let pos_p = node(format!("{ONTO}part_of_speech"));
    let gloss_p = node(format!("{ONTO}gloss"));
    let label = node(RDFS_LABEL.into());
    let pref = node(PREF_LABEL.into());
    let rel: Vec<(&str, NamedNode)> = RELATIONS
        .iter()
        .map(|(_, n)| (*n, node(format!("{ONTO}{n}"))))
        .collect();
    let mut out = Vec::with_capacity(synsets.len() * 6);
    for s in synsets {
        let subj = node(synset_iri(s.offset, s.pos));
        out.push(Quad::new(
            subj.clone(),
            rdf_type.clone(),
            synset_class.clone(),
            g.clone(),
        ));
        out.push(Quad::new(
            subj.clone(),
            pos_p.clone(),
            Literal::new_simple_literal(s.pos.to_string()),
            g.clone(),
        ));
        if let Some(head) = s.lemmas.first() {
            out.push(Quad::new(
                subj.clone(),
                pref.clone(),
                Literal::new_language_tagged_literal_unchecked(head, "en"),
                g.clone(),
            ));
        }
        for l in &s.lemmas {
            out.push(Quad::new(
                subj.clone(),
                label.clone(),
                Literal::new_language_tagged_literal_unchecked(l, "en"),
                g.clone(),
            ));
        }
        if !s.gloss.is_empty() {
            out.push(Quad::new(
                subj.clone(),
                gloss_p.clone(),
                Literal::new_simple_literal(&s.gloss),
                g.clone(),
            ));
        }
        for (name, target, tpos) in &s.pointers {
            let p = &rel
                .iter()
                .find(|(n, _)| n == name)
                .expect("a known relation")
                .1;
            out.push(Quad::new(
                subj.clone(),
                p.clone(),
                node(synset_iri(*target, *tpos)),
                g.clone(),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_data_line() {
        let l = "02123045 05 n 02 tabby 0 tabby_cat 0 003 @ 02121620 n 0000 ~ 02123159 n 0000 + 00384346 a 0101 | a cat with a grey or tawny coat";
        let s = parse_line(l).unwrap().unwrap();
        assert_eq!((s.offset, s.pos), (2123045, 'n'));
        assert_eq!(s.lemmas, ["tabby", "tabby cat"]);
        assert_eq!(
            s.pointers,
            [("hypernym", 2121620, 'n'), ("hyponym", 2123159, 'n')]
        );
        assert_eq!(s.gloss, "a cat with a grey or tawny coat");
        assert_eq!(
            synset_iri(s.offset, s.pos),
            "http://wordnet-rdf.princeton.edu/id/02123045-n"
        );
        assert_eq!(
            synset_of_wnid("n02123045").as_deref(),
            Some("http://wordnet-rdf.princeton.edu/id/02123045-n")
        );
        assert_eq!(synset_of_wnid("x123"), None);
        let adj = "00001740 00 a 01 able(p) 0 000 | having the necessary means";
        assert_eq!(parse_line(adj).unwrap().unwrap().lemmas, ["able"]);
        assert!(parse_line("  1 This software and database")
            .unwrap()
            .is_none());
        assert!(parse_line("00001740 03 n 0x entity").is_err());
    }
}
