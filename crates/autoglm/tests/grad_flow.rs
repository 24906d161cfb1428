//! Training prerequisites: with variables (a `VarMap`), the VLM runs on
//! differentiable ops, computes the same function as the fused inference
//! path, and every trainable tensor receives a non-zero, correct gradient.
//! (candle's fused softmax/norm/RoPE and our fused kernels have no backward:
//! gradients would stop there silently.)

mod common;

use autoglm::config::LlavaConfig;
use autoglm::vlm::Llava;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::max_abs_diff;

fn tiny_config() -> LlavaConfig {
    serde_json::from_value(serde_json::json!({
        "image_token_index": 3, "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
        "projector_type": "mlp",
        "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 16, "patch_size": 8, "hidden_act": "gelu"},
        "text_config": {"model_type": "qwen2", "vocab_size": 40, "hidden_size": 24, "intermediate_size": 40,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "max_position_embeddings": 64, "rope_parameters": {"rope_type": "linear", "factor": 2.0},
                        "tie_word_embeddings": false}
    }))
    .unwrap()
}

fn setup() -> (VarMap, Llava, Vec<u32>, Tensor) {
    let cfg = tiny_config();
    let vm = VarMap::new();
    let m = Llava::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg).unwrap();
    // Seeded random values everywhere, so that no gradient is zero by
    // accident and every run checks the same numbers.
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut noise = |shape: &candle_core::Shape, scale: f32| {
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| (rng.random::<f32>() - 0.5) * 2.0 * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    {
        let data = vm.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for n in names {
            let v = &data[n];
            // Replace candle's random init (drawn from a global generator);
            // norm gains around 1 so that signals are not damped.
            let t = noise(v.shape(), 0.5);
            let t = if n.contains("norm") {
                (t + 1.0).unwrap()
            } else {
                t
            };
            v.set(&t).unwrap();
        }
    }
    let ids = m
        .expand_image_tokens(&[1, 3, 7, 8, 9, 10, 11, 3, 12, 2], 2)
        .unwrap();
    let pixels = noise(&candle_core::Shape::from((2, 3, 16, 16)), 1.5);
    (vm, m, ids, pixels)
}

/// Next-token cross-entropy over the prompt.
fn loss(m: &Llava, ids: &[u32], pixels: &Tensor) -> Tensor {
    let logits = m
        .forward(ids, Some(pixels), &mut m.lm.new_cache())
        .unwrap()
        .squeeze(0)
        .unwrap();
    let t = ids.len();
    let targets = Tensor::new(&ids[1..], &Device::Cpu).unwrap();
    candle_nn::loss::cross_entropy(&logits.narrow(0, 0, t - 1).unwrap(), &targets).unwrap()
}

#[test]
fn every_trainable_tensor_gets_a_gradient() {
    let (vm, m, ids, pixels) = setup();
    let grads = loss(&m, &ids, &pixels).backward().unwrap();
    let data = vm.data().lock().unwrap();
    let mut missing = Vec::new();
    for (name, var) in data.iter() {
        // The pooled-output norm is not on LLaVA's path (HF's isn't either).
        if name.contains("post_layernorm") {
            continue;
        }
        if !common::has_gradient(&grads, var.as_tensor()) {
            missing.push(name.clone());
        }
    }
    assert!(data.len() > 40);
    assert!(missing.is_empty(), "no gradient for {missing:?}");
}

#[test]
fn training_path_computes_the_inference_function() {
    let (vm, m, ids, pixels) = setup();
    let train_logits = m
        .forward(&ids, Some(&pixels), &mut m.lm.new_cache())
        .unwrap();
    // The same weights as plain tensors take the fused inference kernels.
    let dir = tempfile::tempdir().unwrap();
    vm.save(dir.path().join("model.safetensors")).unwrap();
    let vb = autoglm::io::weights::Safetensors::open_dir(dir.path())
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let inf = Llava::new(vb, &tiny_config()).unwrap();
    let inf_logits = inf
        .forward(&ids, Some(&pixels), &mut inf.lm.new_cache())
        .unwrap();
    let d = max_abs_diff(&train_logits.detach(), &inf_logits);
    assert!(d < 1e-4, "train vs inference logits: {d}");
}

#[test]
fn gradients_match_finite_differences() {
    let (vm, m, ids, pixels) = setup();
    let grads = loss(&m, &ids, &pixels).backward().unwrap();
    let data = vm.data().lock().unwrap();
    // One element in each kind of layer, through RoPE, GQA, norms, projector.
    let names = [
        "language_model.model.layers.1.self_attn.q_proj.weight",
        "language_model.model.layers.0.self_attn.k_proj.bias",
        "language_model.model.layers.0.input_layernorm.weight",
        "language_model.model.layers.1.mlp.gate_proj.weight",
        "multi_modal_projector.linear_1.bias",
        "vision_tower.encoder.layers.0.layer_norm1.weight",
        "vision_tower.embeddings.patch_embedding.weight",
    ];
    for name in names {
        let var: &Var = data
            .get(name)
            .unwrap_or_else(|| panic!("{name} not a variable"));
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let i = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let eval = |delta: f32| {
            let mut v = base.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss(&m, &ids, &pixels).to_scalar::<f32>().unwrap()
        };
        let h = 2e-3;
        let numeric = (eval(h) - eval(-h)) / (2.0 * h);
        eval(0.0);
        // Central differences in f32: O(h²) truncation plus ~1e-7·loss/h rounding.
        let tol = 0.03 * g[i].abs() + 2e-3;
        eprintln!("{name}[{i}]: analytic {:.5} numeric {numeric:.5}", g[i]);
        assert!(
            (numeric - g[i]).abs() < tol,
            "{name}[{i}]: analytic {} vs numeric {numeric}",
            g[i]
        );
    }
}

/// The trainer's batched path (rows of different lengths, right-padded,
/// one image each, logits only at the answer positions) gives the logits
/// the one-example forward pass gives at those positions.
#[test]
fn batched_answer_logits_match_one_example_at_a_time() {
    use autoglm::train::vqa::{answer_logits, Encoded, Images};
    let (_vm, m, _, pixels) = setup();
    let rows = [
        Encoded {
            prompt: m.expand_image_tokens(&[1, 3, 7, 8], 1).unwrap(),
            answer: vec![9, 10, 2],
        },
        Encoded {
            prompt: m
                .expand_image_tokens(&[1, 3, 7, 8, 11, 12, 13, 14, 15], 1)
                .unwrap(),
            answer: vec![16, 2],
        },
    ];
    let refs: Vec<&Encoded> = rows.iter().collect();
    let (logits, targets) = answer_logits(&m, &refs, Images::Pixels(&pixels)).unwrap();
    assert_eq!(common::ids(&targets), vec![9, 10, 2, 16, 2]);
    let mut at = 0;
    for (b, r) in rows.iter().enumerate() {
        let mut ids = r.prompt.clone();
        ids.extend(&r.answer[..r.answer.len() - 1]);
        let one = m
            .forward(
                &ids,
                Some(&pixels.narrow(0, b, 1).unwrap()),
                &mut m.lm.new_cache(),
            )
            .unwrap()
            .squeeze(0)
            .unwrap();
        let n = r.answer.len();
        let want = one.narrow(0, r.prompt.len() - 1, n).unwrap();
        let got = logits.narrow(0, at, n).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(
            d < 1e-4,
            "row {b}: batched vs one-by-one logits differ by {d}"
        );
        at += n;
    }
}

/// The patched candle-core backward (`third_party/candle-core`: the first
/// gradient to reach a tensor is stored, later ones added) against
/// derivatives worked by hand: a tensor read by several ops (fan-in), by
/// both sides of one op, on the subtracted side, through a transpose
/// (a non-contiguous gradient) and through a broadcast.
#[test]
fn backward_sums_every_path_to_a_tensor() {
    let xv = [[1f32, -2., 3.], [4., 5., -6.]];
    let wv = [[1f32, 2.], [3., 4.], [5., 6.]];
    let sv = [0.5f32, -1.5, 2.];
    let x = Var::new(&xv, &Device::Cpu).unwrap();
    let w = Var::new(&wv, &Device::Cpu).unwrap();
    let s = Var::new(&sv, &Device::Cpu).unwrap();
    // sum(x·w) + sum(x ∘ x) − sum(relu(x)) + sum(−x) + sum(x ∘ s) + sum(xᵀ)
    let terms = [
        x.matmul(&w).unwrap(),
        (x.as_tensor() * x.as_tensor()).unwrap(),
        x.relu().unwrap().neg().unwrap(),
        x.neg().unwrap(),
        x.broadcast_mul(&s).unwrap(),
        x.t().unwrap(),
    ];
    let mut total = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for (i, t) in terms.iter().enumerate() {
        let t = t.sum_all().unwrap();
        // Subtract one term so that `Sub`'s right-hand rule is exercised.
        total = if i == 2 {
            (total - t.neg().unwrap()).unwrap()
        } else {
            (total + t).unwrap()
        };
    }
    let g = total.backward().unwrap();
    let got = |v: &Var| -> Vec<f32> {
        g.get(v)
            .expect("a gradient")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut dx = Vec::new();
    for row in xv {
        for (k, &v) in row.iter().enumerate() {
            let relu = if v >= 0.0 { 1.0 } else { 0.0 };
            dx.push(wv[k][0] + wv[k][1] + 2.0 * v - relu - 1.0 + sv[k] + 1.0);
        }
    }
    let col = |k: usize| xv[0][k] + xv[1][k];
    let dw: Vec<f32> = (0..3).flat_map(|k| [col(k), col(k)]).collect();
    let ds: Vec<f32> = (0..3).map(col).collect();
    assert_eq!(got(&x), dx, "d/dx");
    assert_eq!(got(&w), dw, "d/dw");
    assert_eq!(got(&s), ds, "d/ds");
}
