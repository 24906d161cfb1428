//! Fusion of vision features into the language model.

pub mod attention;
pub mod block_sparse;
pub mod fpn;
pub mod gating;
pub mod projector;
pub mod relation;
pub mod router;

/// Helpers of the fusion modules' tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Device, Tensor};
    use candle_nn::VarMap;

    /// Seeded uniform values in [-1, 1).
    pub fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims(), "shape mismatch");
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The summed magnitude of `t`'s gradient, `None` when none reached it.
    pub fn grad_mass(grads: &candle_core::backprop::GradStore, t: &Tensor) -> Option<f32> {
        let g = grads.get(t)?;
        Some(g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap())
    }

    /// Sets the variable `name` of `vm`.
    pub fn set(vm: &VarMap, name: &str, value: Tensor) {
        vm.data().lock().unwrap()[name].set(&value).unwrap();
    }
}
