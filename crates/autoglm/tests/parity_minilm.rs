//! all-MiniLM-L6-v2 against sentence-transformers (fixtures made by
//! tools/reference/minilm.py).

mod common;

use autoglm::text::bert::SentenceEncoder;
use candle_core::Device;
use common::*;

fn sentences() -> Vec<String> {
    let p = fixtures().join("minilm/sentences.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn tokens_match_reference_including_truncation() {
    let enc = SentenceEncoder::load(&asset("minilm"), &Device::Cpu).unwrap();
    #[derive(serde::Deserialize)]
    struct Tokens {
        max_seq_length: usize,
        input_ids: Vec<Vec<u32>>,
    }
    let t: Tokens = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("minilm/tokens.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(enc.tokenizer().max_len(), t.max_seq_length);
    let s = sentences();
    for (text, want) in s.iter().zip(&t.input_ids) {
        assert_eq!(
            &enc.tokenizer().encode(text).unwrap(),
            want,
            "tokens of {text:?}"
        );
    }
    // The long sentence really is cut at the limit.
    assert_eq!(t.input_ids.iter().map(Vec::len).max(), Some(256));
}

#[test]
fn embeddings_match_sentence_transformers() {
    let enc = SentenceEncoder::load(&asset("minilm"), &Device::Cpu).unwrap();
    let want = &load_fixture(&fixtures().join("minilm/embeddings.safetensors"))["embeddings"];
    let s = sentences();
    let refs: Vec<&str> = s.iter().map(String::as_str).collect();
    assert!(refs.len() >= 20);
    let got = enc.embed(&refs, 8).unwrap();
    let mut worst = 1f32;
    for (i, text) in refs.iter().enumerate() {
        let c = cosine(&got.get(i).unwrap(), &want.get(i).unwrap());
        worst = worst.min(c);
        assert!(c >= 0.9999, "sentence {i} {text:?}: cosine {c}");
    }
    eprintln!("MiniLM worst cosine vs sentence-transformers: {worst}");
    let diff = max_abs_diff(&got, want);
    assert!(diff < 1e-4, "max abs diff {diff}");
}

#[test]
fn batched_equals_one_by_one() {
    let enc = SentenceEncoder::load(&asset("minilm"), &Device::Cpu).unwrap();
    let s = sentences();
    let refs: Vec<&str> = s.iter().map(String::as_str).collect();
    let batched = enc.embed(&refs, 64).unwrap();
    for (i, text) in refs.iter().enumerate() {
        let one = enc.embed(&[text], 1).unwrap().get(0).unwrap();
        let d = max_abs_diff(&one, &batched.get(i).unwrap());
        assert!(d < 1e-5, "sentence {i}: batched differs from alone by {d}");
    }
}

/// The packed, unpadded path equals the padded, masked one.
#[test]
fn unpadded_equals_padded_masked_forward() {
    use autoglm::text::bert::{l2_normalize, mean_pool};
    use autoglm::text::tokenizer::Tokenizer;
    let enc = SentenceEncoder::load(&asset("minilm"), &Device::Cpu).unwrap();
    let s = sentences();
    let seqs: Vec<Vec<u32>> = s
        .iter()
        .map(|t| enc.tokenizer().encode(t).unwrap())
        .collect();
    let b = Tokenizer::pad(&seqs, enc.pad_id(), &Device::Cpu).unwrap();
    let hidden = enc.bert().forward(&b.ids, &b.mask).unwrap();
    let padded = l2_normalize(&mean_pool(&hidden, &b.mask).unwrap()).unwrap();
    let packed = l2_normalize(&enc.bert().pooled_unpadded(&seqs).unwrap()).unwrap();
    let d = max_abs_diff(&padded, &packed);
    assert!(d < 1e-5, "packed vs padded: {d}");
}
