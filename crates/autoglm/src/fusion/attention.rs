//! Attention between modalities: multi-head cross-attention (text attends
//! to image patches, or patches to text), Flamingo-style gated
//! cross-attention blocks for inside a decoder, and top-k sparse attention.
//!
//! Everything here is built from candle's differentiable ops (the fused
//! softmax has no backward; see [`crate::ops::softmax_last_dim`]), so it
//! trains.

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

use crate::nn::{layer_norm, linear_b, LayerNorm, Linear};
use crate::ops::Act;
use crate::{Error, Result};

/// Keeps, in each row of `scores`, the `k` largest entries and sets the rest
/// to −∞; rows are the last dim. Entries tied with the k-th largest are
/// all kept. With `k` ≥ the row length the scores are returned unchanged,
/// so top-k attention is then exactly dense attention.
///
/// # Shapes
/// `scores`: (…, S) → (…, S)
pub fn keep_top_k(scores: &Tensor, k: usize) -> Result<Tensor> {
    if k == 0 {
        return Err(Error::Invalid(
            "top-k attention needs k ≥ 1: with k = 0 no key is attended".into(),
        ));
    }
    let s = scores.dim(D::Minus1)?;
    if k >= s {
        return Ok(scores.clone());
    }
    // The threshold comes from a detached copy: gradients flow only
    // through the kept scores.
    let (sorted, _) = scores.detach().contiguous()?.sort_last_dim(false)?;
    let kth = sorted.narrow(D::Minus1, k - 1, 1)?;
    let keep = scores.broadcast_ge(&kth)?;
    let off = Tensor::full(f32::NEG_INFINITY, scores.shape(), scores.device())?
        .to_dtype(scores.dtype())?;
    Ok(keep.where_cond(scores, &off)?)
}

/// Scaled dot-product attention, optionally restricted to each query's
/// `top_k` highest-scoring keys.
///
/// # Shapes
/// `q`: (B, h, T, d), `k`/`v`: (B, h, S, d), `bias` (added to the scores,
/// 0 or −∞): broadcastable to (B, h, T, S) → (B, h, T, d)
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    top_k: Option<usize>,
) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let mut scores = (q.matmul(&k.t()?)? * (d as f64).powf(-0.5))?;
    if let Some(b) = bias {
        scores = scores.broadcast_add(b)?;
    }
    if let Some(k) = top_k {
        scores = keep_top_k(&scores, k)?;
    }
    let probs = crate::ops::softmax_last_dim(&scores)?;
    Ok(probs.matmul(&v.contiguous()?)?)
}

/// Which keys each query attends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySelection {
    /// Every key.
    Dense,
    /// Its `k` highest-scoring keys ([`keep_top_k`]: every score is
    /// computed, the rest masked).
    TopK(usize),
    /// The keys of its `keep` best blocks of `block` keys
    /// ([`crate::fusion::block_sparse`]: only those are computed).
    Blocks { block: usize, keep: usize },
}

impl KeySelection {
    /// From a config's `attention_top_k` (keys kept) and
    /// `attention_block_size` (kept in whole blocks: ⌈k / block⌉ of them).
    /// Validated configs only: a block size needs a k.
    pub fn from_config(top_k: Option<usize>, block: Option<usize>) -> Self {
        match (top_k, block) {
            (Some(k), Some(b)) => Self::Blocks {
                block: b,
                keep: k.div_ceil(b),
            },
            (Some(k), None) => Self::TopK(k),
            _ => Self::Dense,
        }
    }
}

/// [`attend`] with the keys chosen by `keys`. `offset` is the key index
/// of the first query (the cached length; 0 within one sequence), which
/// block selection needs to line query blocks up with key blocks.
pub fn attend_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    keys: KeySelection,
    offset: usize,
) -> Result<Tensor> {
    match keys {
        KeySelection::Dense => attend(q, k, v, bias, None),
        KeySelection::TopK(n) => attend(q, k, v, bias, Some(n)),
        KeySelection::Blocks { block, keep } => crate::fusion::block_sparse::block_top_k_attend(
            q,
            k,
            &v.contiguous()?,
            bias,
            block,
            keep,
            offset,
        ),
    }
}

/// An additive attention bias from a key mask: 0 where `mask` is 1, −∞
/// where it is 0.
///
/// # Shapes
/// `mask`: (B, S), 1 = attend → (B, 1, 1, S)
pub fn mask_bias(mask: &Tensor) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let keep = mask.ne(0f32)?;
    let zero = Tensor::zeros((b, s), candle_core::DType::F32, mask.device())?;
    let off = Tensor::full(f32::NEG_INFINITY, (b, s), mask.device())?;
    Ok(keep.where_cond(&zero, &off)?.reshape((b, 1, 1, s))?)
}

/// Multi-head attention from one sequence (the queries: text tokens, say)
/// to another (the keys and values: image patches), each of its own width.
/// Weight names: `q_proj`, `k_proj`, `v_proj`, `o_proj`.
pub struct CrossAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    head_dim: usize,
    top_k: Option<usize>,
}

impl CrossAttention {
    /// `query_dim` and `context_dim` are the two sequences' widths; the
    /// attention runs at `heads` × `head_dim` and returns `query_dim`.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        top_k: Option<usize>,
    ) -> Result<Self> {
        if heads == 0 || head_dim == 0 {
            return Err(Error::Invalid(format!(
                "cross-attention needs heads ≥ 1 and head_dim ≥ 1, got {heads} and {head_dim}"
            )));
        }
        if top_k == Some(0) {
            return Err(Error::Invalid(
                "cross-attention: top_k must be ≥ 1 (or absent for dense attention)".into(),
            ));
        }
        let inner = heads * head_dim;
        Ok(Self {
            q: linear_b(query_dim, inner, true, vb.pp("q_proj"))?,
            k: linear_b(context_dim, inner, true, vb.pp("k_proj"))?,
            v: linear_b(context_dim, inner, true, vb.pp("v_proj"))?,
            o: linear_b(inner, query_dim, true, vb.pp("o_proj"))?,
            heads,
            head_dim,
            top_k,
        })
    }

    /// # Shapes
    /// `x`: (B, T, query_dim), `context`: (B, S, context_dim),
    /// `context_mask`: (B, S), 1 = attend → (B, T, query_dim)
    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        context_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let bias = context_mask.map(mask_bias).transpose()?;
        self.forward_biased(x, context, bias.as_ref())
    }

    /// [`Self::forward`] with any additive bias on the scores in place of
    /// a key mask.
    ///
    /// # Shapes
    /// `bias`: broadcastable to (B, heads, T, S)
    pub fn forward_biased(
        &self,
        x: &Tensor,
        context: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (bc, s, _) = context.dims3()?;
        if bc != b {
            return Err(Error::Invalid(format!(
                "cross-attention: {b} query sequences but {bc} contexts"
            )));
        }
        let split = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, n, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.q.forward(x)?, t)?;
        let k = split(self.k.forward(context)?, s)?;
        let v = split(self.v.forward(context)?, s)?;
        let ctx = attend(&q, &k, &v, bias, self.top_k)?;
        let ctx = ctx
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))?;
        self.o.forward(&ctx)
    }
}

/// A Flamingo-style block for inside a decoder: the hidden states attend to
/// the image, then pass a feed-forward layer, each added through a tanh
/// gate that starts at 0, so that a pretrained decoder is unchanged until
/// the gates learn to open:
/// `x ← x + tanh(α_attn)·xattn(ln(x), image)`,
/// `x ← x + tanh(α_ff)·ffn(ln(x))`.
/// Weight names: `attn_gate`, `ff_gate`, `norm_attn`, `norm_ff`, `attn.*`,
/// `ff.fc1`, `ff.fc2`.
pub struct GatedCrossAttention {
    attn: CrossAttention,
    norm_attn: LayerNorm,
    norm_ff: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    attn_gate: Tensor,
    ff_gate: Tensor,
}

impl GatedCrossAttention {
    pub fn new(
        vb: VarBuilder,
        hidden: usize,
        image_dim: usize,
        heads: usize,
        top_k: Option<usize>,
    ) -> Result<Self> {
        if heads == 0 || hidden % heads != 0 {
            return Err(Error::Invalid(format!(
                "gated cross-attention: hidden {hidden} must be a positive multiple of heads {heads}"
            )));
        }
        let zero = candle_nn::Init::Const(0.0);
        Ok(Self {
            attn: CrossAttention::new(
                vb.pp("attn"),
                hidden,
                image_dim,
                heads,
                hidden / heads,
                top_k,
            )?,
            norm_attn: layer_norm(hidden, 1e-5, vb.pp("norm_attn"))?,
            norm_ff: layer_norm(hidden, 1e-5, vb.pp("norm_ff"))?,
            fc1: linear_b(hidden, 4 * hidden, true, vb.pp("ff.fc1"))?,
            fc2: linear_b(4 * hidden, hidden, true, vb.pp("ff.fc2"))?,
            attn_gate: vb.get_with_hints(1, "attn_gate", zero)?,
            ff_gate: vb.get_with_hints(1, "ff_gate", zero)?,
        })
    }

    /// # Shapes
    /// `x`: (B, T, hidden), `image`: (B, S, image_dim), `image_mask`:
    /// (B, S) → (B, T, hidden)
    pub fn forward(
        &self,
        x: &Tensor,
        image: &Tensor,
        image_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        use candle_nn::Module;
        let a = self
            .attn
            .forward(&self.norm_attn.forward(x)?, image, image_mask)?;
        self.gated(x, &a)
    }

    /// The block as self-attention: every position of `x` attends to all
    /// of `x` (normed, as the queries), both ways, then the feed-forward
    /// layer, each through its gate. The block must have been built with
    /// `image_dim == hidden` (otherwise the key projection's product
    /// fails with a shape error).
    ///
    /// `bias` is added to the attention scores (e.g. a
    /// [`DistanceBias`]).
    ///
    /// # Shapes
    /// `x`: (B, T, hidden), `bias`: broadcastable to (B, heads, T, T) →
    /// (B, T, hidden)
    pub fn forward_self(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        use candle_nn::Module;
        let normed = self.norm_attn.forward(x)?;
        let a = self.attn.forward_biased(&normed, &normed, bias)?;
        self.gated(x, &a)
    }

    /// `x + tanh(α_attn)·a`, then its gated feed-forward layer.
    fn gated(&self, x: &Tensor, a: &Tensor) -> Result<Tensor> {
        use candle_nn::Module;
        let x = (x + a.broadcast_mul(&self.attn_gate.tanh()?)?)?;
        let h = self
            .fc1
            .forward_act(&self.norm_ff.forward(&x)?, Act::GeluErf)?;
        let f = self.fc2.forward(&h)?;
        Ok((&x + f.broadcast_mul(&self.ff_gate.tanh()?)?)?)
    }
}

/// A learned bias on self-attention scores from how far apart two tokens
/// sit: head h adds `σ_h · s_h · |p_i − p_j|²` to the score of query i on
/// key j, where p are the tokens' (x, y), s_h ≥ 0 at the start is learned
/// (`distance_slope`), and σ_h is −1 for the first half of the heads
/// (they start out preferring near tokens) and +1 for the rest (far
/// ones). With `exclude_self` a token does not attend to itself, so a
/// near-preferring head reads its nearest other token.
pub struct DistanceBias {
    slope: Tensor,
    sign: Tensor,
    exclude_self: bool,
}

/// The weight name of [`DistanceBias`]'s slopes.
pub const DISTANCE_SLOPE: &str = "distance_slope";

impl DistanceBias {
    /// `init`: every head's slope at the start (a logit difference of
    /// `init · Δ(d²)` between two keys).
    pub fn new(vb: VarBuilder, heads: usize, init: f64, exclude_self: bool) -> Result<Self> {
        if heads == 0 {
            return Err(Error::Invalid(
                "a distance bias needs at least one head".into(),
            ));
        }
        let near = heads.div_ceil(2);
        let sign: Vec<f32> = (0..heads)
            .map(|h| if h < near { -1.0 } else { 1.0 })
            .collect();
        Ok(Self {
            slope: vb.get_with_hints(heads, DISTANCE_SLOPE, candle_nn::Init::Const(init))?,
            sign: Tensor::from_vec(sign, heads, vb.device())?,
            exclude_self,
        })
    }

    /// # Shapes
    /// `coords`: (B, T, 2), the tokens' (x, y) → (B, heads, T, T)
    pub fn forward(&self, coords: &Tensor) -> Result<Tensor> {
        let (_, t, two) = coords.dims3()?;
        if two != 2 {
            return Err(Error::Invalid(format!(
                "a distance bias needs each token's (x, y), got {two} coordinates per token"
            )));
        }
        let diff = coords.unsqueeze(2)?.broadcast_sub(&coords.unsqueeze(1)?)?;
        let d2 = diff.sqr()?.sum(D::Minus1)?.unsqueeze(1)?; // (B, 1, T, T)
        let h = self.slope.dim(0)?;
        let per_head = (&self.slope * &self.sign)?.reshape((1, h, 1, 1))?;
        let bias = d2.broadcast_mul(&per_head)?;
        // A lone token keeps itself: it has nothing else to attend to.
        if !self.exclude_self || t == 1 {
            return Ok(bias);
        }
        let off: Vec<f32> = (0..t * t)
            .map(|k| {
                if k / t == k % t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let off = Tensor::from_vec(off, (t, t), bias.device())?;
        Ok(bias.broadcast_add(&off)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fusion::test_util::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    fn vec3(t: &Tensor) -> Vec<Vec<Vec<f32>>> {
        t.to_vec3().unwrap()
    }

    /// Attention for one head in plain loops: the k largest scores of each
    /// query (ties kept), softmax, weighted sum of values.
    fn reference(q: &[Vec<f32>], k: &[Vec<f32>], v: &[Vec<f32>], top: usize) -> Vec<Vec<f32>> {
        let d = q[0].len() as f32;
        q.iter()
            .map(|qi| {
                let s: Vec<f32> = k
                    .iter()
                    .map(|kj| qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() / d.sqrt())
                    .collect();
                let mut sorted = s.clone();
                sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
                let kth = sorted[top.min(s.len()) - 1];
                let m = sorted[0];
                let w: Vec<f32> = s
                    .iter()
                    .map(|&x| if x >= kth { (x - m).exp() } else { 0.0 })
                    .collect();
                let z: f32 = w.iter().sum();
                (0..v[0].len())
                    .map(|c| w.iter().zip(v).map(|(wj, vj)| wj * vj[c]).sum::<f32>() / z)
                    .collect()
            })
            .collect()
    }

    fn close(a: &[Vec<f32>], b: &[Vec<f32>]) {
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn top_k_attention_matches_loops_and_equals_dense_when_k_covers_the_keys() {
        let (t, s, d) = (5, 9, 4);
        let q = rand(&[1, 1, t, d], 1);
        let k = rand(&[1, 1, s, d], 2);
        let v = rand(&[1, 1, s, d], 3);
        let rows = |x: &Tensor| vec3(&x.squeeze(0).unwrap())[0].clone();
        let dense = attend(&q, &k, &v, None, None).unwrap();
        for top in [1, 3, 8, 9, 50] {
            let sparse = attend(&q, &k, &v, None, Some(top)).unwrap();
            close(
                &rows(&sparse),
                &reference(&rows(&q), &rows(&k), &rows(&v), top),
            );
            if top >= s {
                let diff = (&sparse - &dense)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap();
                assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "k = {top}");
            }
        }
        // k = 1 is a hard lookup: each query returns the value of its best key.
        let one = rows(&attend(&q, &k, &v, None, Some(1)).unwrap());
        let scores = rows(&q.matmul(&k.t().unwrap()).unwrap());
        for (i, row) in scores.iter().enumerate() {
            let best = (0..s)
                .max_by(|&a, &b| row[a].partial_cmp(&row[b]).unwrap())
                .unwrap();
            close(&[one[i].clone()], &[rows(&v)[best].clone()]);
        }
        assert!(keep_top_k(&q, 0).is_err());
    }

    #[test]
    fn top_k_attention_trains() {
        let q = Var::from_tensor(&rand(&[1, 2, 3, 4], 4)).unwrap();
        let k = rand(&[1, 2, 6, 4], 5);
        let v = rand(&[1, 2, 6, 4], 6);
        let y = attend(q.as_tensor(), &k, &v, None, Some(2)).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let gq = g.get(q.as_tensor()).expect("a gradient reaches q");
        let n = gq
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0);
    }

    #[test]
    fn masked_keys_get_no_weight() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let xa = CrossAttention::new(vb, 6, 5, 2, 3, None).unwrap();
        let x = rand(&[2, 4, 6], 7);
        let ctx = rand(&[2, 7, 5], 8);
        // Row 0 sees the first 3 context tokens, row 1 all 7.
        let mask = Tensor::new(
            &[[1f32, 1., 1., 0., 0., 0., 0.], [1., 1., 1., 1., 1., 1., 1.]],
            &dev,
        )
        .unwrap();
        let y = xa.forward(&x, &ctx, Some(&mask)).unwrap();
        assert_eq!(y.dims(), &[2, 4, 6]);
        // What row 0's masked tokens hold does not matter …
        let junk = Tensor::cat(
            &[
                &ctx.narrow(0, 0, 1).unwrap().narrow(1, 0, 3).unwrap(),
                &(rand(&[1, 4, 5], 9) * 100.0).unwrap(),
            ],
            1,
        )
        .unwrap();
        let ctx2 = Tensor::cat(&[&junk, &ctx.narrow(0, 1, 1).unwrap()], 0).unwrap();
        let y2 = xa.forward(&x, &ctx2, Some(&mask)).unwrap();
        close(&vec3(&y)[0], &vec3(&y2)[0]);
        // … and it equals attending to the first 3 tokens alone.
        let short = xa
            .forward(
                &x.narrow(0, 0, 1).unwrap(),
                &ctx.narrow(0, 0, 1).unwrap().narrow(1, 0, 3).unwrap(),
                None,
            )
            .unwrap();
        close(&vec3(&y)[0], &vec3(&short)[0]);
        assert!(xa.forward(&x, &ctx.narrow(0, 0, 1).unwrap(), None).is_err());
        assert!(CrossAttention::new(
            VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev),
            6,
            5,
            2,
            3,
            Some(0)
        )
        .is_err());
    }

    #[test]
    fn gated_block_is_the_identity_until_its_gates_open() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let block = GatedCrossAttention::new(vb, 8, 5, 2, None).unwrap();
        let x = rand(&[2, 3, 8], 10);
        let img = rand(&[2, 4, 5], 11);
        let y = block.forward(&x, &img, None).unwrap();
        assert_eq!(vec3(&y), vec3(&x));
        // Open the attention gate: the change is tanh(1) × the attention.
        let vars = vm.data().lock().unwrap();
        vars["attn_gate"]
            .set(&Tensor::new(&[1f32], &dev).unwrap())
            .unwrap();
        drop(vars);
        let y = block.forward(&x, &img, None).unwrap();
        let a = block
            .attn
            .forward(
                &candle_nn::Module::forward(&block.norm_attn, &x).unwrap(),
                &img,
                None,
            )
            .unwrap();
        let want = (&x + (a * 1f64.tanh()).unwrap()).unwrap();
        close(&vec3(&y)[0], &vec3(&want)[0]);
        assert!(GatedCrossAttention::new(
            VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev),
            8,
            5,
            3,
            None
        )
        .is_err());
    }

    /// As self-attention the block attends both ways: its attention is
    /// the block's attention with the layer-normed tokens (normed here in
    /// loops) as queries, keys and values; the first token's output
    /// depends on the last token; and with no positions, reordering the
    /// tokens reorders the outputs.
    #[test]
    fn gated_self_attention_attends_both_ways() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let block = GatedCrossAttention::new(vb, 8, 8, 2, None).unwrap();
        let x = rand(&[1, 4, 8], 20);
        assert_eq!(vec3(&block.forward_self(&x, None).unwrap()), vec3(&x));
        let vars = vm.data().lock().unwrap();
        vars["attn_gate"]
            .set(&Tensor::new(&[0.5f32], &dev).unwrap())
            .unwrap();
        drop(vars);
        let normed: Vec<Vec<f32>> = vec3(&x)[0]
            .iter()
            .map(|r| {
                let m = r.iter().sum::<f32>() / 8.0;
                let v = r.iter().map(|a| (a - m) * (a - m)).sum::<f32>() / 8.0;
                r.iter().map(|a| (a - m) / (v + 1e-5).sqrt()).collect()
            })
            .collect();
        let normed = Tensor::new(normed, &dev).unwrap().unsqueeze(0).unwrap();
        let a = block.attn.forward(&normed, &normed, None).unwrap();
        let want = (&x + (a * 0.5f64.tanh()).unwrap()).unwrap();
        let y = block.forward_self(&x, None).unwrap();
        close(&vec3(&y)[0], &vec3(&want)[0]);
        // The last token changed: the first one's output changes.
        let mut rows = vec3(&x)[0].clone();
        rows[3] = rows[3].iter().map(|v| -v).collect();
        let x2 = Tensor::new(rows.clone(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let y2 = block.forward_self(&x2, None).unwrap();
        let moved = vec3(&y)[0][0]
            .iter()
            .zip(&vec3(&y2)[0][0])
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(moved > 1e-3, "the first token ignored the last: {moved}");
        // Reversed tokens, reversed outputs.
        rows.reverse();
        let x3 = Tensor::new(rows, &dev).unwrap().unsqueeze(0).unwrap();
        let mut y3 = vec3(&block.forward_self(&x3, None).unwrap())[0].clone();
        y3.reverse();
        close(&y3, &vec3(&y2)[0]);
    }

    /// The distance bias by hand: −s·d² on the near half of the heads,
    /// +s·d² on the far half, −∞ on the diagonal. With a steep slope and
    /// no content in the scores, a near head reads each token's nearest
    /// other token and a far head its furthest.
    #[test]
    fn distance_bias_reads_the_nearest_and_the_furthest_other_token() {
        let dev = Device::Cpu;
        let pts = [(0.0f32, 0.0f32), (0.3, 0.0), (0.0, -0.5), (0.9, 0.9)];
        let coords = Tensor::new(&pts.map(|(x, y)| [x, y]), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let bias = DistanceBias::new(vb, 2, 2.0, true).unwrap();
        let b = vec3(&bias.forward(&coords).unwrap().squeeze(0).unwrap());
        let d2 = |i: usize, j: usize| (pts[i].0 - pts[j].0).powi(2) + (pts[i].1 - pts[j].1).powi(2);
        for i in 0..4 {
            for j in 0..4 {
                if i == j {
                    assert!(b[0][i][j] == f32::NEG_INFINITY && b[1][i][j] == f32::NEG_INFINITY);
                } else {
                    assert!((b[0][i][j] + 2.0 * d2(i, j)).abs() < 1e-6);
                    assert!((b[1][i][j] - 2.0 * d2(i, j)).abs() < 1e-6);
                }
            }
        }
        // Without the exclusion the diagonal is 0: the near heads' best.
        let plain = DistanceBias::new(
            VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev),
            2,
            2.0,
            false,
        )
        .unwrap();
        let p = vec3(&plain.forward(&coords).unwrap().squeeze(0).unwrap());
        assert_eq!(p[0][2][2], 0f32);
        // Slope 200: attention is all but a hard argmin / argmax. Values
        // are one-hot token ids, so each output row names the token read.
        let steep = DistanceBias::new(
            VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev),
            2,
            200.0,
            true,
        )
        .unwrap()
        .forward(&coords)
        .unwrap();
        let q = Tensor::zeros((1, 2, 4, 3), DType::F32, &dev).unwrap();
        let v = Tensor::eye(4, DType::F32, &dev)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap()
            .repeat((1, 2, 1, 1))
            .unwrap();
        let out = vec3(
            &attend(&q, &q, &v, Some(&steep), None)
                .unwrap()
                .squeeze(0)
                .unwrap(),
        );
        for i in 0..4 {
            let others = (0..4).filter(|&j| j != i);
            let near = others
                .clone()
                .min_by(|&a, &c| d2(i, a).total_cmp(&d2(i, c)))
                .unwrap();
            let far = others
                .max_by(|&a, &c| d2(i, a).total_cmp(&d2(i, c)))
                .unwrap();
            assert!(out[0][i][near] > 0.99, "token {i}: {:?}", out[0][i]);
            assert!(out[1][i][far] > 0.99, "token {i}: {:?}", out[1][i]);
        }
        assert!(bias.forward(&coords.narrow(2, 0, 1).unwrap()).is_err());
    }
}
