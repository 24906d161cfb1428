//! Layers shared by the models.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::ops::{bias_act, Act};
use crate::Result;

/// A dense layer, `y = x·Wᵀ + b`, with HF's weight names (`weight` (out, in),
/// `bias` (out)).
///
/// Unlike `candle_nn::Linear`, which runs a (B, T, in) input as B separate
/// small GEMMs against a broadcast weight, this flattens the leading dims into
/// one (B·T, in) GEMM — 1.5–2× faster for batched sentence encoding — and adds
/// the bias (and an optional activation) in one parallel pass.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` and `bias`; fresh variables (a `VarMap` builder) get
    /// Kaiming-normal weights and zero biases.
    pub fn new(vb: VarBuilder, input: usize, output: usize) -> Result<Self> {
        let weight = Self::new_no_bias(vb.clone(), input, output)?.weight;
        Ok(Self {
            weight,
            bias: Some(vb.get(output, "bias")?),
        })
    }

    /// From existing tensors (e.g. an LM head tied to the embeddings).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn new_no_bias(vb: VarBuilder, input: usize, output: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(
                (output, input),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?,
            bias: None,
        })
    }

    /// # Shapes
    /// `x`: (…, in) → (…, out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Act::None)
    }

    /// `act(x·Wᵀ + b)`.
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some(&input) = dims.last() else {
            return Err(crate::Error::Invalid(
                "a dense layer needs an input of rank ≥ 1".into(),
            ));
        };
        let rows = x.elem_count() / input.max(1);
        let y = x.reshape((rows, input))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => bias_act(&y, b, act)?,
            None if act == Act::None => y,
            None => {
                let zeros = Tensor::zeros(self.weight.dim(0)?, y.dtype(), y.device())?;
                bias_act(&y, &zeros, act)?
            }
        };
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = self.weight.dim(0)?;
        }
        Ok(y.reshape(out)?)
    }
}

/// `Linear` with or without a bias.
pub fn linear_b(input: usize, output: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    if bias {
        Linear::new(vb, input, output)
    } else {
        Linear::new_no_bias(vb, input, output)
    }
}

/// `Linear` with a bias, argument order as `candle_nn::linear`.
pub fn linear(input: usize, output: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(vb, input, output)
}

/// `Linear` without a bias, argument order as `candle_nn::linear_no_bias`.
pub fn linear_no_bias(input: usize, output: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new_no_bias(vb, input, output)
}

/// LayerNorm (`weight`, `bias`): candle's fused kernel for inference, a
/// differentiable composition when gradients are needed (the fused kernel
/// has no backward; DESIGN.md §2).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
        bias: vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?,
        eps,
    })
}

impl candle_nn::Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !crate::ops::needs_grad(&[x, &self.weight, &self.bias]) && x.is_contiguous() {
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        let h = x.dim(candle_core::D::Minus1)? as f64;
        let mean = (x.sum_keepdim(candle_core::D::Minus1)? / h)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(candle_core::D::Minus1)? / h)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// RMSNorm (`weight`): fused for inference, differentiable when needed.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

pub fn rms_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    Ok(RmsNorm {
        weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
        eps,
    })
}

impl candle_nn::Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !crate::ops::needs_grad(&[x, &self.weight]) && x.is_contiguous() {
            return candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32);
        }
        let h = x.dim(candle_core::D::Minus1)? as f64;
        let ms = (x.sqr()?.sum_keepdim(candle_core::D::Minus1)? / h)?;
        x.broadcast_div(&(ms + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight)
    }
}
