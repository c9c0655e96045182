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

/// `x` where `mask`, else 0 (a selection: masked NaN/inf never reaches the result).
pub(crate) fn keep<const D: usize>(x: Tensor<D>, mask: &Tensor<D, Bool>) -> Tensor<D> {
    x.zeros_like().mask_where(mask.clone(), x)
}

/// The number of `true`s in `mask` as a `[1]` float tensor.
pub(crate) fn count<const D: usize>(mask: &Tensor<D, Bool>) -> Tensor<1> {
    mask.clone().float().sum()
}
