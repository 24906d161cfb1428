//! A one-layer LSTM question encoder, the baseline the relation-network
//! paper (and the seed) compares attention against. PyTorch's `nn.LSTM`
//! layout and gate order (input, forget, cell, output): `weight_ih_l0`
//! (4H, I), `weight_hh_l0` (4H, H), `bias_ih_l0`, `bias_hh_l0` (4H), so
//! PyTorch weights load as they are.

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// The bias that [`forget_bias`] initialises (PyTorch adds `bias_ih_l0`
/// and `bias_hh_l0`; the other one starts at 0).
pub const FORGET_BIAS_NAME: &str = "bias_hh_l0";

/// A bias of shape (4H) that is 1 on the forget gate and 0 elsewhere
/// (Jozefowicz et al. 2015). With 0, the forget gate starts at σ(0) = ½
/// and a word k steps before the end reaches the last state scaled by
/// about 2⁻ᵏ at first: "Is the green object on the left or right of the
/// image?" names its colour 8 words before the end. σ(1) ≈ 0.73 keeps 8
/// steps at 8 % instead of 0.4 %. (Before, both biases drew from N(0, 1),
/// as if weights of one input: their names do not end in `bias`. Its
/// effect on Sort-of-CLEVR is not measured on its own; docs/benchmarks.md.)
pub fn forget_bias(like: &Tensor) -> Result<Tensor> {
    let n = like.elem_count();
    if like.rank() != 1 || n % 4 != 0 {
        return Err(Error::Invalid(format!(
            "an LSTM bias has 4·H values, one per gate, got shape {:?}",
            like.dims()
        )));
    }
    let h = n / 4;
    let v: Vec<f32> = (0..n)
        .map(|i| if (h..2 * h).contains(&i) { 1.0 } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(v, n, like.device())?.to_dtype(like.dtype())?)
}

pub struct Lstm {
    w_ih: Tensor,
    w_hh: Tensor,
    /// Added at each forward, not once here: a variable set or trained
    /// after construction must change the model.
    b_ih: Tensor,
    b_hh: Tensor,
    hidden: usize,
}

impl Lstm {
    pub fn new(vb: VarBuilder, input: usize, hidden: usize) -> Result<Self> {
        if input == 0 || hidden == 0 {
            return Err(Error::Invalid(format!(
                "an LSTM needs positive input and hidden sizes, got {input} and {hidden}"
            )));
        }
        // PyTorch's initialisation: U(−1/√H, 1/√H) for every tensor.
        let r = 1.0 / (hidden as f64).sqrt();
        let init = candle_nn::Init::Uniform { lo: -r, up: r };
        let w_ih = vb.get_with_hints((4 * hidden, input), "weight_ih_l0", init)?;
        let w_hh = vb.get_with_hints((4 * hidden, hidden), "weight_hh_l0", init)?;
        let b_ih = vb.get_with_hints(4 * hidden, "bias_ih_l0", init)?;
        let b_hh = vb.get_with_hints(4 * hidden, "bias_hh_l0", init)?;
        Ok(Self {
            w_ih,
            w_hh,
            b_ih,
            b_hh,
            hidden,
        })
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Runs over the sequence; returns every step's hidden state and each
    /// sequence's last hidden state at its own length (padding after
    /// `lengths[b]` steps leaves the state unchanged).
    ///
    /// # Shapes
    /// `x`: (B, T, I), `lengths`: B values in 1..=T → ((B, T, H), (B, H))
    pub fn forward(&self, x: &Tensor, lengths: &[usize]) -> Result<(Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        if lengths.len() != b || lengths.iter().any(|&l| l == 0 || l > t) {
            return Err(Error::Invalid(format!(
                "LSTM: lengths {lengths:?} must be {b} values in 1..={t}"
            )));
        }
        let hs = self.hidden;
        let dev = x.device();
        // The input projections of all steps in one matmul.
        let xi = x
            .reshape((b * t, x.dim(2)?))?
            .matmul(&self.w_ih.t()?)?
            .broadcast_add(&(&self.b_ih + &self.b_hh)?)?
            .reshape((b, t, 4 * hs))?;
        let mut h = Tensor::zeros((b, hs), x.dtype(), dev)?;
        let mut c = Tensor::zeros((b, hs), x.dtype(), dev)?;
        let mut outs = Vec::with_capacity(t);
        let w_hh_t = self.w_hh.t()?;
        for step in 0..t {
            let z = (xi.narrow(1, step, 1)?.squeeze(1)? + h.matmul(&w_hh_t)?)?;
            let gate = |i: usize| z.narrow(D::Minus1, i * hs, hs);
            let i = candle_nn::ops::sigmoid(&gate(0)?)?;
            let f = candle_nn::ops::sigmoid(&gate(1)?)?;
            let g = gate(2)?.tanh()?;
            let o = candle_nn::ops::sigmoid(&gate(3)?)?;
            let c_new = ((f * &c)? + (i * g)?)?;
            let h_new = (o * c_new.tanh()?)?;
            // Rows past their length keep their state.
            let live: Vec<f32> = lengths
                .iter()
                .map(|&l| if step < l { 1.0 } else { 0.0 })
                .collect();
            let live = Tensor::from_vec(live, (b, 1), dev)?.to_dtype(x.dtype())?;
            let keep = (1.0 - &live)?;
            c = (c_new.broadcast_mul(&live)? + c.broadcast_mul(&keep)?)?;
            h = (h_new.broadcast_mul(&live)? + h.broadcast_mul(&keep)?)?;
            outs.push(h.clone());
        }
        Ok((Tensor::stack(&outs, 1)?, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// The trainers' initialisation opens the forget gate: the two biases
    /// sum to 1 on the forget gate's rows and 0 on the others.
    #[test]
    fn initialisation_opens_the_forget_gate() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let lstm = Lstm::new(vb.pp("lstm"), 3, 2).unwrap();
        crate::train::vqa::init_weights(&vm, 1, None).unwrap();
        let sum: Vec<f32> = (&lstm.b_ih + &lstm.b_hh).unwrap().to_vec1().unwrap();
        assert_eq!(sum, [0., 0., 1., 1., 0., 0., 0., 0.]);
        let e = forget_bias(&Tensor::zeros(6, DType::F32, &Device::Cpu).unwrap()).unwrap_err();
        assert!(e.to_string().contains("4·H"), "{e}");
    }

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// The LSTM equations in f64 loops, for one sequence.
    fn reference(
        w_ih: &[Vec<f32>],
        w_hh: &[Vec<f32>],
        bias: &[f32],
        xs: &[Vec<f32>],
    ) -> Vec<Vec<f64>> {
        let hs = w_hh[0].len();
        let (mut h, mut c) = (vec![0f64; hs], vec![0f64; hs]);
        let mut out = Vec::new();
        for x in xs {
            let z: Vec<f64> = (0..4 * hs)
                .map(|r| {
                    let a: f64 = w_ih[r].iter().zip(x).map(|(w, v)| (*w * *v) as f64).sum();
                    let b: f64 = w_hh[r].iter().zip(&h).map(|(w, v)| *w as f64 * v).sum();
                    a + b + bias[r] as f64
                })
                .collect();
            for j in 0..hs {
                let (i, f) = (sigmoid(z[j]), sigmoid(z[hs + j]));
                let (g, o) = (z[2 * hs + j].tanh(), sigmoid(z[3 * hs + j]));
                c[j] = f * c[j] + i * g;
                h[j] = o * c[j].tanh();
            }
            out.push(h.clone());
        }
        out
    }

    #[test]
    fn matches_the_equations_and_respects_lengths() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let lstm = Lstm::new(vb, 3, 4).unwrap();
        let x = Tensor::rand(-1f32, 1f32, (2, 5, 3), &dev).unwrap();
        let (all, last) = lstm.forward(&x, &[5, 3]).unwrap();
        assert_eq!(all.dims(), &[2, 5, 4]);
        let w_ih = lstm.w_ih.to_vec2::<f32>().unwrap();
        let w_hh = lstm.w_hh.to_vec2::<f32>().unwrap();
        let bias = (&lstm.b_ih + &lstm.b_hh).unwrap().to_vec1::<f32>().unwrap();
        let xs = x.to_vec3::<f32>().unwrap();
        let all = all.to_vec3::<f32>().unwrap();
        let last = last.to_vec2::<f32>().unwrap();
        for (row, len) in [(0, 5), (1, 3)] {
            let want = reference(&w_ih, &w_hh, &bias, &xs[row][..len]);
            for (s, h) in want.iter().enumerate() {
                for (a, b) in all[row][s].iter().zip(h) {
                    assert!((*a as f64 - b).abs() < 1e-5, "row {row} step {s}");
                }
            }
            for (a, b) in last[row].iter().zip(&want[len - 1]) {
                assert!((*a as f64 - b).abs() < 1e-5, "row {row} last");
            }
        }
        // Padding leaves the short row's state where its length ended.
        assert_eq!(all[1][4], all[1][2]);
        assert!(lstm.forward(&x, &[5, 0]).is_err());
        assert!(lstm.forward(&x, &[5]).is_err());
    }

    /// The biases are read at each forward: a variable set after
    /// construction (initialised, trained, loaded) changes the output.
    #[test]
    fn the_bias_variables_are_live() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let lstm = Lstm::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), 3, 4).unwrap();
        let x = Tensor::ones((1, 2, 3), DType::F32, &dev).unwrap();
        let before = lstm.forward(&x, &[2]).unwrap().1;
        vm.data().lock().unwrap()["bias_hh_l0"]
            .set(&Tensor::full(3f32, 16, &dev).unwrap())
            .unwrap();
        let after = lstm.forward(&x, &[2]).unwrap().1;
        let d = crate::fusion::test_util::max_diff(&after, &before);
        assert!(d > 1e-3, "{d}");
    }
}
