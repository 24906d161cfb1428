//! Projectors from vision features to the LM's embedding space, one struct
//! chosen by config. Weight names follow HF LLaVA's `multi_modal_projector`
//! (`linear_1`, `linear_2`); the adapter adds `adapter_down`/`adapter_up`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::config::ProjectorKind;
use crate::nn::{linear_b, Linear};
use crate::ops::Act;
use crate::{Error, Result};

pub enum Projector {
    /// Identity.
    None,
    /// `linear_1`.
    Linear(Linear),
    /// LLaVA-1.5 `mlp2x_gelu`: `linear_2(gelu(linear_1(x)))`.
    Mlp(Linear, Linear),
    /// `y = linear_1(x)`, then `y + adapter_up(gelu(adapter_down(y)))`: a
    /// residual bottleneck that starts close to a linear projection.
    Adapter {
        proj: Linear,
        down: Linear,
        up: Linear,
    },
}

impl Projector {
    /// `vision` and `text` are the two widths; `bottleneck` the adapter's.
    pub fn new(
        vb: VarBuilder,
        kind: ProjectorKind,
        vision: usize,
        text: usize,
        bias: bool,
        bottleneck: usize,
    ) -> Result<Self> {
        Ok(match kind {
            ProjectorKind::None => {
                if vision != text {
                    return Err(Error::Invalid(format!(
                        "projector `none` needs equal widths, got vision {vision} and LM {text}; use linear, mlp or adapter"
                    )));
                }
                Projector::None
            }
            ProjectorKind::Linear => {
                Projector::Linear(linear_b(vision, text, bias, vb.pp("linear_1"))?)
            }
            ProjectorKind::Mlp => Projector::Mlp(
                linear_b(vision, text, bias, vb.pp("linear_1"))?,
                linear_b(text, text, bias, vb.pp("linear_2"))?,
            ),
            ProjectorKind::Adapter => Projector::Adapter {
                proj: linear_b(vision, text, bias, vb.pp("linear_1"))?,
                down: linear_b(text, bottleneck, true, vb.pp("adapter_down"))?,
                up: linear_b(bottleneck, text, true, vb.pp("adapter_up"))?,
            },
        })
    }

    /// # Shapes
    /// `x`: (…, vision) → (…, text)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Projector::None => Ok(x.clone()),
            Projector::Linear(l) => l.forward(x),
            Projector::Mlp(l1, l2) => l2.forward(&l1.forward_act(x, Act::GeluErf)?),
            Projector::Adapter { proj, down, up } => {
                let y = proj.forward(x)?;
                let r = up.forward(&down.forward_act(&y, Act::GeluErf)?)?;
                Ok((y + r)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn build(kind: ProjectorKind, v: usize, t: usize) -> Result<(Projector, VarMap)> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let p = Projector::new(vb, kind, v, t, true, 4)?;
        // Random biases too, so that no term of the formula is zero.
        for var in vm.all_vars() {
            var.set(&Tensor::randn(0f32, 1.0, var.shape(), &Device::Cpu)?)?;
        }
        Ok((p, vm))
    }

    #[test]
    fn shapes_and_identity() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu)?;
        for kind in [
            ProjectorKind::Linear,
            ProjectorKind::Mlp,
            ProjectorKind::Adapter,
        ] {
            let (p, _) = build(kind, 8, 12)?;
            assert_eq!(p.forward(&x)?.dims(), &[2, 5, 12], "{kind:?}");
        }
        let (p, _) = build(ProjectorKind::None, 8, 8)?;
        assert_eq!(p.forward(&x)?.to_vec3::<f32>()?, x.to_vec3::<f32>()?);
        let e = build(ProjectorKind::None, 8, 12).err().unwrap().to_string();
        assert!(e.contains("equal widths"), "{e}");
        Ok(())
    }

    /// The maths of each kind against the formula, with the built weights.
    #[test]
    fn adapter_is_projection_plus_bottleneck() -> Result<()> {
        let (p, vm) = build(ProjectorKind::Adapter, 6, 10)?;
        let x = Tensor::randn(0f32, 1.0, (3, 6), &Device::Cpu)?;
        let w = |n: &str| vm.data().lock().unwrap()[n].as_tensor().clone();
        let lin = |x: &Tensor, n: &str| -> Result<Tensor> {
            Ok(x.matmul(&w(&format!("{n}.weight")).t()?)?
                .broadcast_add(&w(&format!("{n}.bias")))?)
        };
        let y = lin(&x, "linear_1")?;
        let want = (&y + lin(&lin(&y, "adapter_down")?.gelu_erf()?, "adapter_up")?)?;
        let d = (p.forward(&x)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    #[test]
    fn unknown_kind_is_refused_with_the_choices() {
        let e = ProjectorKind::parse("qformer").unwrap_err();
        assert!(e.contains("qformer") && e.contains("mlp2x_gelu"), "{e}");
    }
}
