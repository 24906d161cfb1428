//! Answers grounded in a knowledge graph: a photo is recognised
//! (EfficientNet-Lite0, ImageNet), its class is linked to its WordNet
//! synset, the chain for the question is retrieved, and a reader model
//! answers from the facts. Used by `autoglm ask --kg` and by the server's
//! `--kg` model.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use image::RgbImage;

use crate::assistant::{Assistant, Overflow};
use crate::io::assets;
use crate::kg::qa::{facts_for, prompt, reader_answers, rule_answer, Facts};
use crate::kg::reason::{retrieve, Edges, Lexicon, MAX_OTHER_HOPS};
use crate::kg::store::KnowledgeGraph;
use crate::kg::wordnet::synset_of_wnid;
use crate::text::generate::GenerateConfig;
use crate::vision::efficientnet::ImageClassifier;
use crate::{Error, Result};

/// What the photo was recognised as.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Seen {
    /// ImageNet's label of the class.
    pub label: String,
    pub probability: f32,
    pub wnid: String,
}

/// One grounded answer and how it was reached.
#[derive(Debug, Clone)]
pub struct Grounded {
    /// The synset IRI of the entity.
    pub entity: String,
    pub answer: String,
    pub facts: Facts,
    /// What the reader read.
    pub prompt: String,
    /// What a rule reading the chain's relations answers (the baseline).
    pub rule_answer: Option<String>,
    pub retrieval_ms: f64,
    /// Tokens the reader read and wrote.
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

pub struct Grounder {
    pub kg: KnowledgeGraph,
    pub lex: Lexicon,
    pub reader: Assistant,
    classifier: ImageClassifier,
    wnids: Vec<String>,
    /// Steps shown before a long is-a run is summarised.
    pub keep: usize,
}

/// The lexicon of `kg`, with WordNet's irregular plurals when the
/// `wordnet` asset is installed.
pub fn lexicon(kg: &KnowledgeGraph) -> Result<Lexicon> {
    let exc = assets::dir("wordnet")
        .ok()
        .and_then(|d| std::fs::read_to_string(d.join("noun.exc")).ok());
    Lexicon::new(kg, exc.as_deref())
}

impl Grounder {
    /// Loads the store, the reader model and the ImageNet classifier (the
    /// `efficientnet-lite0` and `imagenet` assets).
    pub fn load(store: &Path, reader: &Path, device: &Device) -> Result<Self> {
        let kg = KnowledgeGraph::open(store)?;
        let lex = lexicon(&kg)?;
        let reader = Assistant::load(reader, device)?;
        let classifier = ImageClassifier::load(
            &assets::dir("efficientnet-lite0")?,
            &assets::dir("imagenet")?.join("labels.txt"),
            device,
        )?;
        let ids_path = assets::dir("imagenet")?.join("imagenet_synsets.txt");
        let wnids = std::fs::read_to_string(&ids_path)
            .map_err(|e| Error::io(&ids_path, e))?
            .split_whitespace()
            .map(String::from)
            .collect();
        Ok(Self {
            kg,
            lex,
            reader,
            classifier,
            wnids,
            keep: 5,
        })
    }

    /// The photo's most likely ImageNet class as a WordNet id.
    pub fn recognise(&self, image: &RgbImage) -> Result<Seen> {
        let top = self
            .classifier
            .top_k(std::slice::from_ref(image), 1)?
            .remove(0)
            .remove(0);
        let wnid = self.wnids.get(top.index).cloned().ok_or_else(|| {
            Error::Invalid(format!("no WordNet id for ImageNet class {}", top.index))
        })?;
        Ok(Seen {
            label: top.label,
            probability: top.probability,
            wnid,
        })
    }

    /// Retrieves the facts for `question` about `wnid` (n02123045) and lets
    /// the reader answer; also returns the retrieved edges.
    pub fn answer(&self, wnid: &str, question: &str) -> Result<(Grounded, Edges)> {
        let entity = synset_of_wnid(wnid).ok_or_else(|| {
            Error::Invalid(format!("{wnid:?} is not a WordNet id (like n02123045)"))
        })?;
        if question.trim().is_empty() {
            return Err(Error::Invalid("the question is empty".into()));
        }
        let t0 = Instant::now();
        let edges = retrieve(&self.kg, &entity, MAX_OTHER_HOPS)?;
        let facts = facts_for(&edges, &self.lex, &entity, question, self.keep);
        let retrieval_ms = t0.elapsed().as_secs_f64() * 1e3;
        let text = prompt(self.lex.label(&entity), &facts.steps, question);
        // The reader answers yes, no, or with a phrase of its facts.
        let space = self.reader.answer_space(&reader_answers(&text))?;
        let cfg = GenerateConfig {
            max_new_tokens: 16,
            answer_space: Some(std::sync::Arc::new(space)),
            ..GenerateConfig::default()
        };
        let out = self
            .reader
            .ask(&[], &text, &cfg, Overflow::Error, &mut |_| true)?;
        let rule = rule_answer(&self.lex, question, facts.chain.as_ref());
        Ok((
            Grounded {
                entity,
                answer: out.text.trim().to_string(),
                facts,
                prompt: text,
                rule_answer: rule,
                retrieval_ms,
                prompt_tokens: out.prompt_tokens,
                completion_tokens: out.tokens.len(),
            },
            edges,
        ))
    }
}
