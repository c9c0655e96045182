//! Host <-> tensor conversions and shape checks shared by the op modules.

use burn::tensor::{Bool, Device, Tensor, TensorData};
use posttrain_core::Error;

/// A `[batch, seq]` float tensor from row-major host values.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `values.len() != batch · seq`.
pub fn tensor2(values: &[f64], shape: [usize; 2], device: &Device) -> Result<Tensor<2>, Error> {
    posttrain_core::error::check_len("values", values.len(), shape[0] * shape[1])?;
    Ok(Tensor::from_data(
        TensorData::new(values.to_vec(), shape),
        device,
    ))
}

/// A `[n]` float tensor from host values.
pub fn tensor1(values: &[f64], device: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

/// A `[batch, seq, vocab]` float tensor from row-major host values.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `values.len()` is not the product of `shape`.
pub fn tensor3(values: &[f64], shape: [usize; 3], device: &Device) -> Result<Tensor<3>, Error> {
    posttrain_core::error::check_len("values", values.len(), shape.iter().product())?;
    Ok(Tensor::from_data(
        TensorData::new(values.to_vec(), shape),
        device,
    ))
}

/// A `[batch, seq]` boolean mask from row-major host values.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `values.len() != batch · seq`.
pub fn mask2(
    values: &[bool],
    shape: [usize; 2],
    device: &Device,
) -> Result<Tensor<2, Bool>, Error> {
    posttrain_core::error::check_len("mask", values.len(), shape[0] * shape[1])?;
    Ok(Tensor::from_data(
        TensorData::new(values.to_vec(), shape),
        device,
    ))
}

/// Reads a float tensor back to the host as row-major `f64`s (a device sync).
///
/// # Panics
///
/// If the backend cannot read the tensor back (a device failure).
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data()
        .convert::<f64>()
        .try_to_vec::<f64>()
        .expect("tensor read-back")
}

/// Reads a boolean tensor back to the host (a device sync).
///
/// # Panics
///
/// If the backend cannot read the tensor back (a device failure).
///
/// Backends store booleans differently (ndarray natively, wgpu as `u32`,
/// libtorch as `bool`), so the mask is read back through its integer form.
pub fn to_vec_bool<const D: usize>(t: Tensor<D, Bool>) -> Vec<bool> {
    t.int()
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .expect("mask read-back")
        .into_iter()
        .map(|v| v != 0)
        .collect()
}

/// Checks that `t` has shape `want`; the error names `input`.
pub(crate) fn check_shape<const D: usize>(
    input: &'static str,
    got: [usize; D],
    want: [usize; D],
) -> Result<(), Error> {
    if got == want {
        return Ok(());
    }
    let (g, w): (usize, usize) = (got.iter().product(), want.iter().product());
    if g != w {
        return Err(Error::ShapeMismatch {
            input,
            expected: w,
            got: g,
        });
    }
    // Same element count, different layout: report the first axis that differs.
    let axis = (0..D).find(|&i| got[i] != want[i]).unwrap_or(0);
    Err(Error::ShapeMismatch {
        input,
        expected: want[axis],
        got: got[axis],
    })
}

/// A per-token log-difference under the core's
/// [`NanSamplerLogProbs`](posttrain_core::policy::rollout::NanSamplerLogProbs)
/// choice: `d` as is, or `torch.nan_to_num(d, nan=0.0)` (NaN → 0, ±inf → ±the
/// dtype's largest finite value), as
/// [`NanSamplerLogProbs::log_diff`](posttrain_core::policy::rollout::NanSamplerLogProbs::log_diff).
pub(crate) fn nan_log_diff<const D: usize>(
    nan: posttrain_core::policy::rollout::NanSamplerLogProbs,
    d: Tensor<D>,
) -> Tensor<D> {
    use burn::tensor::DType;
    use posttrain_core::policy::rollout::NanSamplerLogProbs;
    match nan {
        NanSamplerLogProbs::Propagate => d,
        NanSamplerLogProbs::AsOnPolicy => {
            let max = match d.dtype() {
                DType::F64 => f64::MAX,
                DType::F16 => 65504.0,
                DType::BF16 => 3.389_531_389_251_535_5e38,
                _ => f32::MAX as f64,
            };
            let nan_at = d.clone().is_nan();
            d.mask_fill(nan_at, 0.0).clamp(-max, max)
        }
    }
}

/// `x` where `mask`, else 0 (a selection: masked NaN/inf never reaches the result).
pub(crate) fn keep<const D: usize>(x: Tensor<D>, mask: &Tensor<D, Bool>) -> Tensor<D> {
    x.zeros_like().mask_where(mask.clone(), x)
}

/// The number of `true`s in `mask` as a `[1]` float tensor.
pub(crate) fn count<const D: usize>(mask: &Tensor<D, Bool>) -> Tensor<1> {
    mask.clone().float().sum()
}

/// A float tensor shaped and placed like `self`, every element `v`, built
/// on the device.
///
/// burn 0.22's `Tensor::full_like` / `Tensor::full` fall back, on backends
/// without a native fill (libtorch), to a host buffer of the whole shape
/// copied to the device: for a `[8, 512, 32000]` fill on CUDA that is a
/// 524 MB host allocation and upload per call (measured: the entropy VJP
/// took 685 ms instead of ~4). `zeros_like` is native everywhere, and
/// `0 + v` is `v` for every `v` (±∞ and NaN included; `−0.0` becomes `+0.0`).
pub(crate) trait Filled {
    /// `self.full_like(v)`, built on the device.
    fn filled(&self, v: f64) -> Self;
}

impl<const D: usize> Filled for Tensor<D> {
    fn filled(&self, v: f64) -> Self {
        let z = self.zeros_like();
        if v == 0.0 {
            z
        } else {
            z.add_scalar(v)
        }
    }
}

/// `Tensor::full(shape, v, device)`, built on the device (see [`Filled`]).
pub(crate) fn filled<const D: usize>(shape: [usize; D], v: f64, device: &Device) -> Tensor<D> {
    let z = Tensor::<D>::zeros(shape, device);
    if v == 0.0 {
        z
    } else {
        z.add_scalar(v)
    }
}
