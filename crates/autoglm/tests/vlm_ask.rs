//! The `ask` pipeline (chat template → tokens → image splice → generation)
//! against transformers' processor + generate, and the VLM's bad inputs.

mod common;

use autoglm::assistant::{Assistant, Overflow};
use autoglm::io::image::{load, ImageLimits};
use autoglm::text::generate::GenerateConfig;
use autoglm::vlm::Llava;
use candle_core::{DType, Device, Tensor};
use common::*;

#[test]
fn prompt_and_answer_match_the_reference_processor_and_generate() {
    for name in ["llava-tiny-llama", "llava-tiny-qwen2"] {
        let dir = fixtures().join(name);
        let a = Assistant::load(&dir, &Device::Cpu).unwrap();
        let r = load_fixture(&dir.join("reference.safetensors"));
        let want_ids = ids(&r["conv0.input_ids"]);
        let got_ids = a
            .prompt_ids("what color is the shape?", 1, Overflow::Error, 16)
            .unwrap();
        assert_eq!(got_ids, want_ids, "{name}: prompt ids");

        let img = load(&asset("photos").join("chelsea.png"), ImageLimits::default()).unwrap();
        let cfg = GenerateConfig {
            max_new_tokens: 16,
            ..GenerateConfig::default()
        };
        let mut streamed = String::new();
        let ans = a
            .ask(
                &[img],
                "what color is the shape?",
                &cfg,
                Overflow::Error,
                &mut |s| {
                    streamed.push_str(s);
                    true
                },
            )
            .unwrap();
        let want = ids(&r["conv0.generated"]);
        // The reference generated 16 tokens regardless of EOS; we stop at EOS.
        let n = want
            .iter()
            .position(|t| a.eos_ids.contains(t))
            .map_or(16, |p| p + 1);
        assert_eq!(ans.tokens, want[..n].to_vec(), "{name}: answer tokens");
        assert_eq!(streamed, ans.text, "{name}: streamed text");
    }
}

#[test]
fn prompt_longer_than_the_context() {
    let a = Assistant::load(&fixtures().join("llava-tiny-llama"), &Device::Cpu).unwrap();
    let long = "is there a red circle? ".repeat(60);
    let e = a
        .prompt_ids(&long, 1, Overflow::Error, 16)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("context of 256") && e.contains("--truncate"),
        "{e}"
    );
    let ids = a
        .prompt_ids(&long, 1, Overflow::TruncateQuestion, 16)
        .unwrap();
    assert!(
        ids.len() <= 256 - 16 && ids.len() >= 256 - 16 - 3,
        "{}",
        ids.len()
    );
    // The image and the template's tail survive: the question's end is cut.
    let img = a.model.config.image_token_index;
    assert_eq!(
        ids.iter().filter(|&&t| t == img).count(),
        a.model.image_tokens()
    );
    let tail = a.prompt_ids("hi", 1, Overflow::Error, 16).unwrap();
    assert_eq!(ids[ids.len() - 5..], tail[tail.len() - 5..]);
    // Nothing left to cut: 16 images cannot fit.
    let e = a
        .prompt_ids("x", 16, Overflow::TruncateQuestion, 16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("even without the question"), "{e}");
}

#[test]
fn images_and_placeholders_must_agree() {
    let m = Llava::load(&fixtures().join("llava-tiny-llama"), &Device::Cpu).unwrap();
    let img = m.config.image_token_index;
    let e = m
        .expand_image_tokens(&[5, img, 6], 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 image placeholders but 2 image(s)"), "{e}");
    let e = m
        .expand_image_tokens(&[5, img, img, 6], 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 image placeholders but 1 image(s)"), "{e}");
    assert_eq!(
        m.expand_image_tokens(&[5, img, 6], 1).unwrap().len(),
        2 + m.image_tokens()
    );
    // Image tokens in the prompt but no pixels.
    let expanded = m.expand_image_tokens(&[5, img, 6], 1).unwrap();
    let e = m.embed_prompt(&expanded, None).unwrap_err().to_string();
    assert!(e.contains("no image was given"), "{e}");
}

#[test]
fn an_image_the_vision_tower_cannot_take() {
    let m = Llava::load(&fixtures().join("llava-tiny-llama"), &Device::Cpu).unwrap();
    let expanded = m
        .expand_image_tokens(&[5, m.config.image_token_index, 6], 1)
        .unwrap();
    let pixels = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let e = m
        .embed_prompt(&expanded, Some(&pixels))
        .unwrap_err()
        .to_string();
    assert!(e.contains("3×32×32") && e.contains("3×64×64"), "{e}");
}

fn with_config(name: &str, edit: impl Fn(&str) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let new = edit(&cfg);
    assert_ne!(cfg, new, "the edit changed nothing");
    std::fs::write(dir.path().join("config.json"), new).unwrap();
    dir
}

#[test]
fn unknown_projector_and_mismatched_checkpoint() {
    let d = with_config("llava-tiny-llama", |c| {
        c.replacen("{", "{\"projector_type\": \"qformer\",", 1)
    });
    let e = Llava::load(d.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unknown projector type `qformer`"), "{e}");

    let d = with_config("llava-tiny-qwen2", |c| {
        c.replacen("{", "{\"projector_type\": \"none\",", 1)
    });
    let e = Llava::load(d.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("projector `none` needs equal widths"), "{e}");

    let d = with_config("llava-tiny-llama", |c| {
        c.replace("\"intermediate_size\": 160", "\"intermediate_size\": 128")
    });
    let e = Llava::load(d.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("language_model.model.layers.0.mlp.gate_proj.weight") && e.contains("[128, 64]"),
        "{e}"
    );

    let d = with_config("llava-tiny-qwen2", |c| {
        c.replace("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\"")
    });
    let e = Llava::load(d.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rope type `yarn`"), "{e}");
}

#[test]
fn stop_strings_and_answer_spaces_shape_the_answer() {
    use autoglm::text::generate::{generate, Finish};
    let a = Assistant::load(&fixtures().join("llava-tiny-llama"), &Device::Cpu).unwrap();
    let lm = &a.model.lm;
    let prompt: Vec<u32> = vec![5, 17, 42, 99, 7];
    let e = lm
        .embed(
            &Tensor::new(prompt.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    // A decoder whose text is easy to reason about: token t → "<t>".
    let decode =
        |t: &[u32]| -> autoglm::Result<String> { Ok(t.iter().map(|t| format!("<{t}>")).collect()) };
    let cfg = GenerateConfig {
        max_new_tokens: 12,
        ..GenerateConfig::default()
    };
    let full = generate(lm, &e, &prompt, &cfg, Some(&decode), &mut |_| true)
        .unwrap()
        .tokens;
    let text_at = |k: usize| decode(&full[..k]).unwrap();
    // The reference semantics (HF's StopStringCriteria): stop at the first
    // token after which the text contains the stop string, also when the
    // string starts in an earlier token and ends inside the last one.
    let t4 = full[4].to_string();
    for stop in [
        text_at(5),
        format!("><{t4}"),
        format!("{}><", full[2]),
        format!("<{}", &t4[..1]),
    ] {
        let want = (1..=full.len())
            .find(|&n| text_at(n).contains(&stop))
            .unwrap();
        let cfg = GenerateConfig {
            stop_strings: vec![stop.clone()],
            ..cfg.clone()
        };
        let g = generate(lm, &e, &prompt, &cfg, Some(&decode), &mut |_| true).unwrap();
        assert_eq!(g.tokens, full[..want].to_vec(), "stop {stop:?}");
        assert_eq!(g.finish, Finish::Stop);
    }
    let bad = GenerateConfig {
        stop_strings: vec![String::new()],
        ..cfg.clone()
    };
    assert!(generate(lm, &e, &prompt, &bad, Some(&decode), &mut |_| true).is_err());

    // An answer space: the model's greedy choice among the tokens that
    // stay on an answer. Answers built from its own unconstrained choice
    // (full[0]) and from tokens it did not choose.
    use autoglm::text::generate::AnswerSpace;
    let stop = 0u32;
    let other = (1..50).find(|t| !full.contains(t)).unwrap();
    let mut space = AnswerSpace::new();
    space.insert(&[full[0], other, other]);
    space.insert(&[other]);
    let cfg = GenerateConfig {
        stop_token_ids: vec![stop],
        answer_space: Some(std::sync::Arc::new(space.clone())),
        ..cfg
    };
    let g = generate(lm, &e, &prompt, &cfg, Some(&decode), &mut |_| true).unwrap();
    // Its first choice is allowed, so it is kept; then only `other` may
    // follow, twice, then only the stop token.
    assert_eq!(g.tokens, [full[0], other, other, stop]);
    assert_eq!(g.finish, Finish::Stop);
    assert_eq!(space.after(&[full[0]]), Some((vec![other], false)));
    assert_eq!(space.after(&[other]), Some((vec![], true)));
    assert_eq!(space.after(&[other, other]), None);
}

/// The transformers 4 spelling (`rope_scaling` with `type`, top-level
/// `rope_theta`) gives the same model as the transformers 5 one.
#[test]
fn rope_scaling_in_both_spellings() {
    let d = with_config("llava-tiny-llama", |c| {
        c.replace(
            "\"rope_parameters\": {\n      \"factor\": 2.0,\n      \"rope_theta\": 10000.0,\n      \"rope_type\": \"linear\"\n    }",
            "\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}, \"rope_theta\": 10000.0",
        )
    });
    let m = Llava::load(d.path(), &Device::Cpu).unwrap();
    assert_eq!(m.lm.config.rope_linear_factor(), 2.0);
    let r = load_fixture(
        &fixtures()
            .join("llava-tiny-llama")
            .join("reference.safetensors"),
    );
    let text = r["text.input_ids"].to_dtype(DType::U32).unwrap();
    let dd = max_abs_diff(
        &m.lm.forward(&text, &mut m.lm.new_cache()).unwrap(),
        &r["text.logits"],
    );
    assert!(dd < 1e-4, "{dd}");
}

/// `attention_top_k` in both towers: with k at least the sequence length
/// the model is exactly the dense one; with k = 1 each query takes one key,
/// and the embeddings and answers change. k = 0 is refused at load.
#[test]
fn top_k_attention_in_both_towers() {
    let with_k = |k: usize| with_keys(&format!("\"attention_top_k\": {k},"));
    let (dense_e, dense_t) = embed_and_answer(&fixtures().join("llava-tiny-llama"));
    let big = with_k(100_000);
    let (e, t) = embed_and_answer(big.path());
    assert_eq!(common::max_abs_diff(&e, &dense_e), 0.0);
    assert_eq!(t, dense_t);
    let one = with_k(1);
    let (e, t) = embed_and_answer(one.path());
    assert!(
        common::max_abs_diff(&e, &dense_e) > 1e-3,
        "the vision tower ignored k"
    );
    assert_ne!(t, dense_t, "the decoder ignored k");
    let zero = with_k(0);
    let e = Llava::load(zero.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("attention_top_k"), "{e}");
}

/// `attention_block_size` in both towers: keeping every block is the dense
/// model (prefill, decode steps with the cache, the ViT); keeping one block
/// of 4 changes the embeddings and the answer. A block size without a k is
/// refused at load.
#[test]
fn block_top_k_attention_in_both_towers() {
    let (dense_e, dense_t) = embed_and_answer(&fixtures().join("llava-tiny-llama"));
    let all = with_keys("\"attention_top_k\": 100000, \"attention_block_size\": 4,");
    let (e, t) = embed_and_answer(all.path());
    assert!(common::max_abs_diff(&e, &dense_e) < 1e-5);
    assert_eq!(t, dense_t);
    let one = with_keys("\"attention_top_k\": 4, \"attention_block_size\": 4,");
    let (e, t) = embed_and_answer(one.path());
    assert!(
        common::max_abs_diff(&e, &dense_e) > 1e-3,
        "the vision tower ignored the blocks"
    );
    assert_ne!(t, dense_t, "the decoder ignored the blocks");
    let alone = with_keys("\"attention_block_size\": 4,");
    let e = Llava::load(alone.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("attention_block_size") && e.contains("attention_top_k"),
        "{e}"
    );
}

/// The tiny LLaVA fixture with `fields` added to both towers' configs.
fn with_keys(fields: &str) -> tempfile::TempDir {
    let fields = fields.to_string();
    with_config("llava-tiny-llama", move |c| {
        c.replace(
            "\"text_config\": {",
            &format!("\"text_config\": {{{fields}"),
        )
        .replace(
            "\"vision_config\": {",
            &format!("\"vision_config\": {{{fields}"),
        )
    })
}

/// The fixture's image tokens for one picture and question, and its
/// greedy 8-token answer.
fn embed_and_answer(dir: &std::path::Path) -> (Tensor, Vec<u32>) {
    use autoglm::text::generate::generate;
    let img = image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, 99])
    });
    let a = Assistant::load(dir, &Device::Cpu).unwrap();
    let ids = a
        .prompt_ids("What is in the picture?", 1, Overflow::Error, 8)
        .unwrap();
    let pixels = a
        .preprocess
        .batch(std::slice::from_ref(&img), &Device::Cpu)
        .unwrap();
    let e = a
        .model
        .embed_prompt(&ids, Some(&pixels))
        .unwrap()
        .squeeze(0)
        .unwrap();
    let cfg = GenerateConfig {
        max_new_tokens: 8,
        ..GenerateConfig::default()
    };
    let g = generate(&a.model.lm, &e, &ids, &cfg, None, &mut |_| true).unwrap();
    (e, g.tokens)
}

/// Image→text attention on the image tokens: a training batch (padded rows,
/// masked) gives each row what the single prompt gives at inference, and
/// the block changes the image tokens once its gates open.
#[test]
fn image_text_attention_is_the_same_in_batches_and_alone() {
    use candle_nn::{VarBuilder, VarMap};
    let text = std::fs::read_to_string(fixtures().join("llava-tiny-llama/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["image_text_attention_heads"] = 2.into();
    let cfg: autoglm::config::LlavaConfig = serde_json::from_value(v).unwrap();
    cfg.validate(std::path::Path::new("config.json")).unwrap();
    let vm = VarMap::new();
    let m = Llava::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg).unwrap();
    {
        let vars = vm.data().lock().unwrap();
        for g in [
            "image_text_attention.attn_gate",
            "image_text_attention.ff_gate",
        ] {
            vars[g]
                .set(&Tensor::new(&[1f32], &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let (tok, per) = (cfg.image_token_index, m.image_tokens());
    let row = |words: &[u32]| -> Vec<u32> {
        let mut r = vec![1];
        r.extend(std::iter::repeat_n(tok, per));
        r.extend(words);
        r
    };
    let (a, b) = (row(&[7, 8, 9, 10]), row(&[11, 12]));
    let s = cfg.vision_config.image_size;
    let pixels = Tensor::rand(-1f32, 1f32, (2, 3, s, s), &Device::Cpu).unwrap();
    let feats = m.image_features(&pixels).unwrap();
    // Teacher forcing appends answer tokens after the prompt: the image
    // must not read them (at inference they do not exist yet).
    let (mut a_ans, mut b_ans) = (a.clone(), b.clone());
    a_ans.extend([20, 21]);
    b_ans.extend([22]);
    let batch = m
        .embed_batch(&[a_ans, b_ans], &[a.len(), b.len()], &feats)
        .unwrap();
    assert!(m
        .embed_batch(
            std::slice::from_ref(&a),
            &[a.len() + 1],
            &feats.narrow(0, 0, 1).unwrap()
        )
        .is_err());
    for (i, r) in [a, b].iter().enumerate() {
        let alone = m
            .embed_prompt_features(r, Some(&feats.narrow(0, i, 1).unwrap()))
            .unwrap()
            .squeeze(0)
            .unwrap();
        let in_batch = batch.get(i).unwrap().narrow(0, 0, r.len()).unwrap();
        assert!(common::max_abs_diff(&alone, &in_batch) < 1e-5, "row {i}");
        // The image tokens are no longer the projected features.
        let img = alone.narrow(0, 1, per).unwrap();
        assert!(common::max_abs_diff(&img, &feats.get(i).unwrap()) > 1e-3);
    }
    let mut bad: serde_json::Value = serde_json::from_str(&text).unwrap();
    bad["image_text_attention_heads"] = 0.into();
    let bad: autoglm::config::LlavaConfig = serde_json::from_value(bad).unwrap();
    let e = bad
        .validate(std::path::Path::new("config.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("image_text_attention_heads"), "{e}");
}
