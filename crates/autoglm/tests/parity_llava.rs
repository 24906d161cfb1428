//! The VLM (LLaVA layout with Llama and Qwen2 decoders) against transformers'
//! `LlavaForConditionalGeneration` on two random tiny checkpoints (fixtures
//! made by tools/reference/llava_tiny.py): logits, 16 greedy tokens, and the
//! KV cache and batching equivalences.

mod common;

use autoglm::text::generate::{generate, generate_batch, GenerateConfig};
use autoglm::vlm::Llava;
use candle_core::{DType, Device, Tensor};
use common::*;

const MODELS: [&str; 2] = ["llava-tiny-llama", "llava-tiny-qwen2"];

#[test]
fn logits_and_greedy_tokens_match_transformers() {
    for name in MODELS {
        let dir = fixtures().join(name);
        let m = Llava::load(&dir, &Device::Cpu).unwrap();
        let r = load_fixture(&dir.join("reference.safetensors"));
        for k in 0..2 {
            let prompt = ids(&r[&format!("conv{k}.input_ids")]);
            let pixels = &r[&format!("conv{k}.pixel_values")];
            let logits = m
                .forward(&prompt, Some(pixels), &mut m.lm.new_cache())
                .unwrap();
            let d = max_abs_diff(&logits, &r[&format!("conv{k}.logits")]);
            eprintln!("{name} conv{k}: max |Δlogit| {d:.2e}");
            assert!(d < 1e-4, "{name} conv{k}: logits differ by {d}");

            let embeds = m
                .embed_prompt(&prompt, Some(pixels))
                .unwrap()
                .squeeze(0)
                .unwrap();
            let cfg = GenerateConfig {
                max_new_tokens: 16,
                ..GenerateConfig::default()
            };
            let g = generate(&m.lm, &embeds, &prompt, &cfg, None, &mut |_| true).unwrap();
            assert_eq!(
                g.tokens,
                ids(&r[&format!("conv{k}.generated")]),
                "{name} conv{k}: greedy tokens"
            );
        }
        // The decoder alone.
        let text = &r["text.input_ids"].to_dtype(DType::U32).unwrap();
        let logits = m.lm.forward(text, &mut m.lm.new_cache()).unwrap();
        let d = max_abs_diff(&logits, &r["text.logits"]);
        assert!(d < 1e-4, "{name} text logits differ by {d}");
    }
}

#[test]
fn kv_cache_token_by_token_equals_full_forward() {
    for name in MODELS {
        let m = Llava::load(&fixtures().join(name), &Device::Cpu).unwrap();
        let r = load_fixture(&fixtures().join(name).join("reference.safetensors"));
        let text = r["text.input_ids"].to_dtype(DType::U32).unwrap();
        let t = text.dim(1).unwrap();
        let full = m.lm.forward(&text, &mut m.lm.new_cache()).unwrap();
        let mut cache = m.lm.new_cache();
        // A prefix at once, then one token at a time.
        let mut steps = vec![m
            .lm
            .forward(&text.narrow(1, 0, 3).unwrap(), &mut cache)
            .unwrap()];
        for i in 3..t {
            steps.push(
                m.lm.forward(&text.narrow(1, i, 1).unwrap(), &mut cache)
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), t);
        let cached = Tensor::cat(&steps, 1).unwrap();
        let d = max_abs_diff(&cached, &full);
        assert!(d < 1e-4, "{name}: cached logits differ by {d}");
        cache.clear();
        assert!(cache.is_empty());
    }
}

#[test]
fn batched_generation_equals_one_by_one() {
    for name in MODELS {
        let m = Llava::load(&fixtures().join(name), &Device::Cpu).unwrap();
        let r = load_fixture(&fixtures().join(name).join("reference.safetensors"));
        // Prompts of different lengths: two with images, one text-only.
        let mut prompts = Vec::new();
        let mut prompt_ids = Vec::new();
        for k in 0..2 {
            let p = ids(&r[&format!("conv{k}.input_ids")]);
            prompts.push(
                m.embed_prompt(&p, Some(&r[&format!("conv{k}.pixel_values")]))
                    .unwrap()
                    .squeeze(0)
                    .unwrap(),
            );
            prompt_ids.push(p);
        }
        let t = ids(&r["text.input_ids"]);
        prompts.push(m.embed_prompt(&t, None).unwrap().squeeze(0).unwrap());
        prompt_ids.push(t);
        for sampling in [
            autoglm::text::generate::Sampling::default(),
            autoglm::text::generate::Sampling {
                temperature: 0.8,
                top_p: Some(0.9),
                top_k: Some(20),
                repetition_penalty: 1.2,
                seed: 3,
            },
        ] {
            let cfg = GenerateConfig {
                max_new_tokens: 12,
                sampling,
                ..GenerateConfig::default()
            };
            let batch =
                generate_batch(&m.lm, &prompts, &prompt_ids, &cfg, None, &mut |_, _| true).unwrap();
            for (i, (p, pid)) in prompts.iter().zip(&prompt_ids).enumerate() {
                let one = generate(&m.lm, p, pid, &cfg, None, &mut |_| true).unwrap();
                assert_eq!(batch[i].tokens, one.tokens, "{name} row {i}");
            }
        }
    }
}

#[test]
fn stop_tokens_and_streaming() {
    let m = Llava::load(&fixtures().join("llava-tiny-llama"), &Device::Cpu).unwrap();
    let r = load_fixture(
        &fixtures()
            .join("llava-tiny-llama")
            .join("reference.safetensors"),
    );
    let p = ids(&r["conv0.input_ids"]);
    let e = m
        .embed_prompt(&p, Some(&r["conv0.pixel_values"]))
        .unwrap()
        .squeeze(0)
        .unwrap();
    let want = ids(&r["conv0.generated"]);
    // Stop at the 5th greedy token: 5 tokens come back, finish = stop.
    let cfg = GenerateConfig {
        max_new_tokens: 16,
        stop_token_ids: vec![want[4]],
        ..GenerateConfig::default()
    };
    let mut streamed = Vec::new();
    let g = generate(&m.lm, &e, &p, &cfg, None, &mut |t| {
        streamed.push(t);
        true
    })
    .unwrap();
    let first = want.iter().position(|&t| t == want[4]).unwrap();
    assert_eq!(g.tokens, want[..=first].to_vec());
    assert_eq!(streamed, g.tokens);
    assert_eq!(g.finish, autoglm::text::generate::Finish::Stop);
    // The callback cancels.
    let g = generate(&m.lm, &e, &p, &GenerateConfig::default(), None, &mut |_| {
        false
    })
    .unwrap();
    assert_eq!(g.tokens.len(), 1);
    assert_eq!(g.finish, autoglm::text::generate::Finish::Cancelled);
}

/// A standalone `LlamaForCausalLM` / `Qwen2ForCausalLM` directory, sharded
/// with an index file: the decoder's weights cut out of the LLaVA fixtures.
#[test]
fn loads_sharded_causal_lm_checkpoints() {
    use autoglm::text::llama::Llama;
    use std::collections::HashMap;
    for name in MODELS {
        let src = fixtures().join(name);
        let all = load_fixture(&src.join("model.safetensors"));
        let dir = tempfile::tempdir().unwrap();
        let (mut a, mut b) = (HashMap::new(), HashMap::new());
        let mut index = serde_json::Map::new();
        for (k, v) in &all {
            let Some(rest) = k.strip_prefix("language_model.") else {
                continue;
            };
            let second = rest.contains("layers.1.") || rest.starts_with("lm_head");
            let (shard, file) = if second {
                (&mut b, "model-00002-of-00002.safetensors")
            } else {
                (&mut a, "model-00001-of-00002.safetensors")
            };
            shard.insert(rest.to_string(), v.clone());
            index.insert(
                rest.to_string(),
                serde_json::Value::String(file.to_string()),
            );
        }
        candle_core::safetensors::save(&a, dir.path().join("model-00001-of-00002.safetensors"))
            .unwrap();
        candle_core::safetensors::save(&b, dir.path().join("model-00002-of-00002.safetensors"))
            .unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            serde_json::json!({"metadata": {}, "weight_map": index}).to_string(),
        )
        .unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap())
                .unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            cfg["text_config"].to_string(),
        )
        .unwrap();

        let lm = Llama::load(dir.path(), &Device::Cpu).unwrap();
        let r = load_fixture(&src.join("reference.safetensors"));
        let text = r["text.input_ids"].to_dtype(DType::U32).unwrap();
        let d = max_abs_diff(
            &lm.forward(&text, &mut lm.new_cache()).unwrap(),
            &r["text.logits"],
        );
        assert!(d < 1e-4, "{name}: {d}");
    }
}

/// The chat template may also live in tokenizer_config.json.
#[test]
fn chat_template_from_tokenizer_config() {
    use autoglm::text::chat::ChatTemplate;
    let src = fixtures().join("llava-tiny-qwen2");
    let dir = tempfile::tempdir().unwrap();
    let tpl = std::fs::read_to_string(src.join("chat_template.jinja")).unwrap();
    let mut tk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap())
            .unwrap();
    tk["chat_template"] = serde_json::Value::String(tpl);
    std::fs::write(dir.path().join("tokenizer_config.json"), tk.to_string()).unwrap();
    let a = ChatTemplate::load(dir.path()).unwrap().unwrap();
    let b = ChatTemplate::load(&src).unwrap().unwrap();
    let msgs = serde_json::json!([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]);
    assert_eq!(
        a.render(&msgs, true).unwrap(),
        b.render(&msgs, true).unwrap()
    );
    assert!(ChatTemplate::load(tempfile::tempdir().unwrap().path())
        .unwrap()
        .is_none());
}
