//! Loss aggregation on tensors: `[batch, seq]` per-token losses to a scalar,
//! with the weight tensor `∂L/∂ℓ`.
//!
//! The weights are those of [`posttrain_core::aggregate`] (table there):
//! `wᵢⱼ = row_weight(mode, nᵢ, N, G)` on valid positions, 0 elsewhere, where
//! the per-row valid counts `nᵢ`, the valid-token total `N` and the valid-row
//! count `G` are tensor reductions of the mask (no host round trip), and the
//! [`GlobalNorm`] normalizers replace `N`, `G`, `S` when given. The value is
//! `Σ select(mask, w·ℓ, 0)`.
//!
//! # Example
//!
//! ```
//! use posttrain_burn::{aggregate::aggregate, device, mask2, tensor2, to_vec};
//! use posttrain_core::aggregate::{AggMode, GlobalNorm};
//! let dev = device()?;
//! let loss = tensor2(&[1.0, 2.0, f64::NAN, 4.0], [2, 2], &dev)?;
//! let mask = mask2(&[true, true, false, true], [2, 2], &dev)?;
//! let out = aggregate(AggMode::TokenMean, &GlobalNorm::default(), loss, &mask)?;
//! assert!((to_vec(out.value)[0] - 7.0 / 3.0).abs() < 1e-6);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::util::Filled;
use burn::tensor::{Bool, Tensor};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::{Dims, Error};

use crate::util::{check_shape, keep};

/// An aggregated loss and its gradient with respect to the per-token loss.
#[derive(Debug, Clone)]
pub struct Aggregated {
    /// `L = Σ wᵢⱼ ℓᵢⱼ` over valid positions, shape `[1]`.
    pub value: Tensor<1>,
    /// `∂L/∂ℓ = w`, `[batch, seq]`, 0 on masked positions.
    pub weights: Tensor<2>,
}

/// Validates `norm` with the core's own checks (an empty call of
/// [`posttrain_core::aggregate::aggregation_weights`] validates and returns).
pub(crate) fn validate_norm(mode: AggMode, norm: &GlobalNorm) -> Result<(), Error> {
    posttrain_core::aggregate::aggregation_weights::<f64>(mode, norm, Dims::new(0, 0), &[], &mut [])
}

/// The aggregation weights `wᵢⱼ = ∂L/∂ℓᵢⱼ` of `mode` for a `[batch, seq]` mask.
///
/// # Formula
///
/// As [`posttrain_core::aggregate::aggregation_weights`]: with `dp` the
/// data-parallel size, `nᵢ` the valid tokens of row `i`, `N`
/// (`batch_num_tokens`, else `Σ nᵢ`), `G` (`global_batch_size`, else the rows
/// with `nᵢ > 0`), `S` (`loss_scale_factor`, else `seq`):
///
/// ```text
/// token-mean               dp / N
/// token-sum                dp
/// seq-mean-token-sum       dp / G
/// seq-mean-token-mean      dp / (G · (nᵢ + 1e-8))
/// seq-mean-token-sum-norm  dp / (G · S)
/// ```
///
/// on valid positions of rows with `nᵢ > 0`, 0 elsewhere (selected, so a row
/// or batch with nothing valid gives 0, not `0/0`).
///
/// # Peers
///
/// verl `agg_loss`, OpenRLHF `aggregate_loss` (see the core module).
///
/// # Errors
///
/// [`Error::OutOfRange`] for a non-positive or non-finite normalizer.
pub fn aggregation_weights(
    mode: AggMode,
    norm: &GlobalNorm,
    mask: &Tensor<2, Bool>,
) -> Result<Tensor<2>, Error> {
    validate_norm(mode, norm)?;
    let [batch, seq] = mask.dims();
    let device = mask.device();
    if batch == 0 || seq == 0 {
        return Ok(Tensor::zeros([batch, seq], &device));
    }
    let maskf = mask.clone().float();
    // nᵢ: [batch, 1]
    let n_row = maskf.clone().sum_dim(1);
    let row_live = n_row.clone().greater_elem(0.0);
    let dp = norm.dp_size;
    let total_tokens = || -> Tensor<2> {
        match norm.batch_num_tokens {
            Some(n) => n_row.filled(n),
            None => maskf.clone().sum().reshape([1, 1]).expand([batch, 1]),
        }
    };
    let rows = || -> Tensor<2> {
        match norm.global_batch_size {
            Some(g) => n_row.filled(g),
            None => row_live
                .clone()
                .float()
                .sum()
                .reshape([1, 1])
                .expand([batch, 1]),
        }
    };
    let w_row: Tensor<2> = match mode {
        AggMode::TokenMean => total_tokens().recip().mul_scalar(dp),
        AggMode::TokenSum => n_row.filled(dp),
        AggMode::SeqMeanTokenSum => rows().recip().mul_scalar(dp),
        AggMode::SeqMeanTokenMean => (rows() * n_row.clone().add_scalar(1e-8))
            .recip()
            .mul_scalar(dp),
        AggMode::SeqMeanTokenSumNorm => {
            let s = norm.loss_scale_factor.unwrap_or(seq as f64);
            rows().mul_scalar(s).recip().mul_scalar(dp)
        }
    };
    let w_row = keep(w_row, &row_live);
    Ok(keep(w_row.expand([batch, seq]), mask))
}

/// Aggregates a `[batch, seq]` per-token loss to a scalar, with `∂L/∂ℓ`.
///
/// # Formula
///
/// `L = Σᵢⱼ select(maskᵢⱼ, wᵢⱼ·ℓᵢⱼ, 0)` with `w` from [`aggregation_weights`].
///
/// # Gradient
///
/// `∂L/∂ℓᵢⱼ = wᵢⱼ` (0 on masked positions).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `loss` and `mask` differ in shape;
/// [`Error::OutOfRange`] for an invalid normalizer.
pub fn aggregate(
    mode: AggMode,
    norm: &GlobalNorm,
    loss: Tensor<2>,
    mask: &Tensor<2, Bool>,
) -> Result<Aggregated, Error> {
    check_shape("loss", loss.dims(), mask.dims())?;
    let weights = aggregation_weights(mode, norm, mask)?;
    let value = weighted_sum(loss, mask, &weights);
    Ok(Aggregated { value, weights })
}

/// `Σ select(mask, w·ℓ, 0)` as a `[1]` tensor.
pub(crate) fn weighted_sum(loss: Tensor<2>, mask: &Tensor<2, Bool>, w: &Tensor<2>) -> Tensor<1> {
    keep(w.clone() * loss, mask).sum()
}
