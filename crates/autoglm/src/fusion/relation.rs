//! The relation network of Santoro et al. 2017 ("A simple neural network
//! module for relational reasoning"): an MLP `g` reads every ordered pair of
//! objects (each an image cell with its coordinates) together with the
//! question, and the pair outputs are pooled into one vector that the answer
//! MLP `f` reads. Relations are computed once per pair, so "the object
//! closest to the red one" needs no attention to find.
//!
//! `g`'s first layer is linear in the concatenation `[oᵢ; oⱼ; q]`, so it is
//! computed as `A·oᵢ + B·oⱼ + (Q·q + b)`: two (N, H) products per image
//! instead of one per pair. Only the remaining layers run on all N² pairs.
//! The pair outputs are summed, as in the paper. Their mean is the same
//! function class, but not the same to train: one pair's signal is then
//! 1/N² of `f`'s input, and `f`'s weights must grow by that much, in
//! Adam's small steps, to read it. With the mean, a Sort-of-CLEVR run
//! stayed at the question prior for 1,500 steps (docs/benchmarks.md).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::nn::{linear_b, Linear};
use crate::{Error, Result};

/// Weight names: `g.0.left`, `g.0.right` (no bias), `g.0.question`, then
/// `g.{1..}` for the layers over each pair.
pub struct RelationNetwork {
    left: Linear,
    right: Linear,
    question: Linear,
    layers: Vec<Linear>,
}

impl RelationNetwork {
    /// `g` has `layers` ReLU layers of width `hidden` (the paper: 4 × 256).
    pub fn new(
        vb: VarBuilder,
        object_dim: usize,
        question_dim: usize,
        hidden: usize,
        layers: usize,
    ) -> Result<Self> {
        if object_dim == 0 || question_dim == 0 || hidden == 0 || layers == 0 {
            return Err(Error::Invalid(format!(
                "a relation network needs objects, a question, and g of at least one layer of width ≥ 1, got object width {object_dim}, question width {question_dim}, {layers} layers of {hidden}"
            )));
        }
        let first = vb.pp("g.0");
        Ok(Self {
            left: linear_b(object_dim, hidden, false, first.pp("left"))?,
            right: linear_b(object_dim, hidden, false, first.pp("right"))?,
            question: linear_b(question_dim, hidden, true, first.pp("question"))?,
            layers: (1..layers)
                .map(|i| linear_b(hidden, hidden, true, vb.pp(format!("g.{i}"))))
                .collect::<Result<_>>()?,
        })
    }

    /// The sum of `g(oᵢ, oⱼ, q)` over all N² ordered pairs (i = j
    /// included).
    ///
    /// # Shapes
    /// `objects`: (B, N, D), `question`: (B, Q) → (B, hidden)
    pub fn forward(&self, objects: &Tensor, question: &Tensor) -> Result<Tensor> {
        let (b, n, _) = objects.dims3()?;
        let (bq, _) = question.dims2()?;
        if b != bq || n == 0 {
            return Err(Error::Invalid(format!(
                "relation network: {b} images of {n} objects need one question each, got {bq}"
            )));
        }
        // Pair (i, j) is row i·N + j of `select` · [A·o; B·o; Q·q + b]:
        // broadcasts written as products, whose backward passes are
        // products too (candle sums a broadcast's gradient with a division
        // per element).
        let parts = Tensor::cat(
            &[
                self.left.forward(objects)?,
                self.right.forward(objects)?,
                self.question.forward(question)?.unsqueeze(1)?,
            ],
            1,
        )?; // (B, 2N + 1, H)
        let h = parts.dim(2)?;
        let mut x = pair_select(n, objects.device())?
            .broadcast_matmul(&parts)?
            .relu()?
            .reshape((b * n * n, h))?;
        for layer in &self.layers {
            x = layer.forward(&x)?.relu()?;
        }
        let ones = Tensor::ones((1, n * n), x.dtype(), x.device())?;
        Ok(ones
            .broadcast_matmul(&x.reshape((b, n * n, h))?)?
            .squeeze(1)?)
    }
}

/// (N², 2N + 1): row i·N + j has ones at columns i, N + j and 2N.
fn pair_select(n: usize, device: &candle_core::Device) -> Result<Tensor> {
    let w = 2 * n + 1;
    let mut m = vec![0f32; n * n * w];
    for i in 0..n {
        for j in 0..n {
            let row = &mut m[(i * n + j) * w..(i * n + j + 1) * w];
            row[i] = 1.0;
            row[n + j] = 1.0;
            row[2 * n] = 1.0;
        }
    }
    Ok(Tensor::from_vec(m, (n * n, w), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fusion::test_util::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    fn build(layers: usize) -> (VarMap, RelationNetwork) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let rn = RelationNetwork::new(vb, 3, 2, 5, layers).unwrap();
        crate::train::vqa::init_weights(&vm, 7, None).unwrap();
        // Nonzero biases, so that a bias in the wrong place shows.
        for (name, shape) in [("g.0.question.bias", 5), ("g.1.bias", 5), ("g.2.bias", 5)] {
            if vm.data().lock().unwrap().contains_key(name) {
                set(&vm, name, rand(&[shape], 40 + shape as u64));
            }
        }
        (vm, rn)
    }

    fn get(vm: &VarMap, name: &str) -> Vec<Vec<f32>> {
        let t = vm.data().lock().unwrap()[name].as_tensor().clone();
        match t.rank() {
            1 => vec![t.to_vec1().unwrap()],
            _ => t.to_vec2().unwrap(),
        }
    }

    /// `y = W·x + b` in plain loops.
    fn dense(w: &[Vec<f32>], b: Option<&[f32]>, x: &[f32]) -> Vec<f32> {
        w.iter()
            .enumerate()
            .map(|(o, row)| {
                row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() + b.map_or(0.0, |b| b[o])
            })
            .collect()
    }

    /// The relation network of the paper, one pair at a time: the first
    /// layer on the concatenation `[oᵢ; oⱼ; q]` with one weight matrix.
    #[test]
    fn equals_g_on_every_concatenated_pair() {
        let (vm, rn) = build(3);
        let objects = rand(&[2, 4, 3], 1);
        let question = rand(&[2, 2], 2);
        let got = rn.forward(&objects, &question).unwrap();

        let (l, r, qw) = (
            get(&vm, "g.0.left.weight"),
            get(&vm, "g.0.right.weight"),
            get(&vm, "g.0.question.weight"),
        );
        // The one matrix of the paper's first layer: [L R Q], 5 × (3+3+2).
        let w0: Vec<Vec<f32>> = (0..5)
            .map(|o| [&l[o][..], &r[o][..], &qw[o][..]].concat())
            .collect();
        let b0 = get(&vm, "g.0.question.bias").remove(0);
        let rest: Vec<(Vec<Vec<f32>>, Vec<f32>)> = (1..3)
            .map(|i| {
                (
                    get(&vm, &format!("g.{i}.weight")),
                    get(&vm, &format!("g.{i}.bias")).remove(0),
                )
            })
            .collect();
        let relu = |v: Vec<f32>| v.into_iter().map(|x| x.max(0.0)).collect::<Vec<_>>();
        let o: Vec<Vec<Vec<f32>>> = objects.to_vec3().unwrap();
        let q: Vec<Vec<f32>> = question.to_vec2().unwrap();
        let mut want = vec![vec![0f32; 5]; 2];
        for b in 0..2 {
            for i in 0..4 {
                for j in 0..4 {
                    let pair = [&o[b][i][..], &o[b][j][..], &q[b][..]].concat();
                    let mut x = relu(dense(&w0, Some(&b0), &pair));
                    for (w, bias) in &rest {
                        x = relu(dense(w, Some(bias), &x));
                    }
                    for (acc, v) in want[b].iter_mut().zip(x) {
                        *acc += v;
                    }
                }
            }
        }
        let want = Tensor::new(want, &Device::Cpu).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "{got} vs {want}");
    }

    /// Pooling over all pairs: the order of the objects does not matter,
    /// and each image's output depends on its own objects and question
    /// only.
    #[test]
    fn ignores_object_order_and_other_images() {
        let (_vm, rn) = build(2);
        let objects = rand(&[2, 4, 3], 3);
        let question = rand(&[2, 2], 4);
        let y = rn.forward(&objects, &question).unwrap();
        let idx = Tensor::new(&[2u32, 0, 3, 1], &Device::Cpu).unwrap();
        let shuffled = objects.index_select(&idx, 1).unwrap();
        let ys = rn.forward(&shuffled, &question).unwrap();
        assert!(max_diff(&y, &ys) < 1e-5);
        let alone = rn
            .forward(
                &objects.narrow(0, 1, 1).unwrap(),
                &question.narrow(0, 1, 1).unwrap(),
            )
            .unwrap();
        assert!(max_diff(&y.narrow(0, 1, 1).unwrap(), &alone) < 1e-5);
        // One layer: g is the first layer alone.
        let (_vm, one) = build(1);
        assert_eq!(one.forward(&objects, &question).unwrap().dims(), &[2, 5]);
    }

    /// Every weight and both inputs receive a gradient.
    #[test]
    fn gradients_reach_every_weight_and_input() {
        let (vm, rn) = build(3);
        let objects = Var::from_tensor(&rand(&[2, 4, 3], 5)).unwrap();
        let question = Var::from_tensor(&rand(&[2, 2], 6)).unwrap();
        let loss = rn
            .forward(objects.as_tensor(), question.as_tensor())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let data = vm.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        assert_eq!(names.len(), 8, "{names:?}");
        let nonzero = |t: &Tensor| grad_mass(&grads, t).expect("a gradient") > 0.0;
        for name in names {
            assert!(nonzero(data[name].as_tensor()), "no gradient for {name}");
        }
        assert!(nonzero(objects.as_tensor()) && nonzero(question.as_tensor()));
    }

    #[test]
    fn refuses_empty_shapes() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let e = RelationNetwork::new(vb, 3, 2, 5, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("at least one layer"), "{e}");
        let (_vm, rn) = build(2);
        let e = rn
            .forward(&rand(&[2, 4, 3], 1), &rand(&[3, 2], 2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("one question each"), "{e}");
    }
}
