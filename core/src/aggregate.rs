//! Loss aggregation: from a `[batch, seq]` matrix of per-token losses to one scalar.
//!
//! # Overview
//!
//! Every aggregation mode is a weighted sum `L = Σᵢⱼ wᵢⱼ · ℓᵢⱼ` over the valid
//! (unmasked) tokens, so its gradient with respect to the per-token loss is the
//! weight matrix itself: `∂L/∂ℓᵢⱼ = wᵢⱼ`. [`aggregation_weights`] computes `w`
//! once; [`aggregate`] applies it. The modes (names as verl spells them):
//!
//! | mode | `wᵢⱼ` for a valid token of row `i` | used by |
//! |---|---|---|
//! | `token-mean` | `dp / N` (`N` = `batch_num_tokens`, else valid tokens here) | verl default, DAPO, TRL `bnpo`/`dapo` |
//! | `token-sum` | `dp` | |
//! | `seq-mean-token-sum` | `dp / G` (`G` = `global_batch_size`, else rows with ≥ 1 valid token) | |
//! | `seq-mean-token-mean` | `dp / (G · (nᵢ + 1e-8))` (`nᵢ` = valid tokens of row `i`) | TRL `grpo`, GSPO, SAPO |
//! | `seq-mean-token-sum-norm` | `dp / (G · S)` (`S` = `loss_scale_factor`, else the padded length) | Dr. GRPO |
//!
//! `dp` is the data-parallel size. The externally supplied normalizers
//! ([`GlobalNorm`]) make a micro-batch's loss a fixed share of the global
//! batch's: summing the aggregated losses of the micro-batches (each with the
//! *global* `N` or `G`) over every rank gives the full-batch loss times `dp`,
//! which the gradient all-reduce (a mean over ranks) divides back out.
//!
//! # Masking
//!
//! Masked positions get weight exactly 0 and their values are never read into
//! the sum (selection, not multiplication), so NaN or ±inf in padding cannot
//! leak. A row with no valid token does not count in `G`. When nothing is
//! valid the loss is 0 and every weight is 0 (verl divides 0 by 0 here and
//! returns NaN; posttrain returns 0 on purpose).
//!
//! # Peers
//!
//! verl `agg_loss` (every mode and normalizer, including the `+1e-8` in the
//! per-row token-mean denominator); OpenRLHF `aggregate_loss` (token mode = `token-mean`,
//! sample mode = `seq-mean-token-mean`).

use crate::elem::Real;
use crate::error::{check_len, check_param, Error};
use crate::shape::Dims;

/// How per-token losses are reduced to a scalar (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum AggMode {
    /// `Σ valid ℓ / N`: every token of the batch weighs the same.
    #[cfg_attr(feature = "serde", serde(rename = "token-mean"))]
    TokenMean,
    /// `Σ valid ℓ`.
    #[cfg_attr(feature = "serde", serde(rename = "token-sum"))]
    TokenSum,
    /// Mean over rows of each row's token sum.
    #[cfg_attr(feature = "serde", serde(rename = "seq-mean-token-sum"))]
    SeqMeanTokenSum,
    /// Mean over rows of each row's token mean: every sequence weighs the same.
    #[cfg_attr(feature = "serde", serde(rename = "seq-mean-token-mean"))]
    SeqMeanTokenMean,
    /// Mean over rows of each row's token sum divided by a constant length (Dr. GRPO).
    #[cfg_attr(feature = "serde", serde(rename = "seq-mean-token-sum-norm"))]
    SeqMeanTokenSumNorm,
}

impl AggMode {
    /// Every mode, in declaration order.
    pub const ALL: [AggMode; 5] = [
        AggMode::TokenMean,
        AggMode::TokenSum,
        AggMode::SeqMeanTokenSum,
        AggMode::SeqMeanTokenMean,
        AggMode::SeqMeanTokenSumNorm,
    ];

    /// The name verl uses (`"token-mean"`, …).
    pub fn name(self) -> &'static str {
        match self {
            AggMode::TokenMean => "token-mean",
            AggMode::TokenSum => "token-sum",
            AggMode::SeqMeanTokenSum => "seq-mean-token-sum",
            AggMode::SeqMeanTokenMean => "seq-mean-token-mean",
            AggMode::SeqMeanTokenSumNorm => "seq-mean-token-sum-norm",
        }
    }
}

impl core::str::FromStr for AggMode {
    type Err = Error;
    /// Parses verl's names (`token-mean`, `token-sum`, `seq-mean-token-sum`,
    /// `seq-mean-token-mean`, `seq-mean-token-sum-norm`).
    fn from_str(s: &str) -> Result<Self, Error> {
        AggMode::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            Error::unknown_option(
                "loss aggregation mode",
                s,
                "token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm",
            )
        })
    }
}

/// Externally supplied normalizers for data-parallel and micro-batch
/// invariance (verl's `dp_size`, `batch_num_tokens`, `global_batch_size`,
/// `loss_scale_factor`). `GlobalNorm::default()` is the local, single-process
/// behaviour.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GlobalNorm {
    /// Multiplies every mode (verl `dp_size`). Default 1.
    pub dp_size: f64,
    /// `N` of `token-mean`: the valid-token count of the global batch.
    /// `None`: the valid tokens of this call.
    pub batch_num_tokens: Option<f64>,
    /// `G` of the `seq-mean-*` modes: the number of sequences of the global
    /// batch. `None`: the rows of this call with at least one valid token.
    pub global_batch_size: Option<f64>,
    /// `S` of `seq-mean-token-sum-norm`. `None`: the padded length `seq`.
    pub loss_scale_factor: Option<f64>,
}

impl Default for GlobalNorm {
    fn default() -> Self {
        GlobalNorm {
            dp_size: 1.0,
            batch_num_tokens: None,
            global_batch_size: None,
            loss_scale_factor: None,
        }
    }
}

impl GlobalNorm {
    /// Checks every normalizer: `dp_size` and each one given must be finite
    /// and `> 0`.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] naming the first bad normalizer.
    pub fn validate(&self) -> Result<(), Error> {
        check_param(
            self.dp_size.is_finite() && self.dp_size > 0.0,
            "dp_size",
            self.dp_size,
            "must be finite and > 0",
        )?;
        for (name, v) in [
            ("batch_num_tokens", self.batch_num_tokens),
            ("global_batch_size", self.global_batch_size),
            ("loss_scale_factor", self.loss_scale_factor),
        ] {
            if let Some(v) = v {
                check_param(v.is_finite() && v > 0.0, name, v, "must be finite and > 0")?;
            }
        }
        Ok(())
    }
}

/// Writes the aggregation weights `wᵢⱼ = ∂L/∂ℓᵢⱼ` of `mode` into `weights`
/// (0 on masked positions).
///
/// # Formula
///
/// See the table in the [module docs](self). The per-row token-mean
/// denominator is `nᵢ + 1e-8` as in verl (a row with no valid token gets no
/// weight at all).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `mask` or `weights` is not `dims.len()` long;
/// [`Error::OutOfRange`] for a non-positive or non-finite normalizer.
pub fn aggregation_weights<F: Real>(
    mode: AggMode,
    norm: &GlobalNorm,
    dims: Dims,
    mask: &[bool],
    weights: &mut [F],
) -> Result<(), Error> {
    norm.validate()?;
    check_len("mask", mask.len(), dims.len())?;
    check_len("weights", weights.len(), dims.len())?;
    if dims.seq == 0 {
        return Ok(());
    }
    let totals = AggTotals::of(mask, dims);
    for (w_row, m_row) in weights.chunks_mut(dims.seq).zip(mask.chunks(dims.seq)) {
        let n = m_row.iter().filter(|&&m| m).count();
        let w = F::of(totals.row_weight(mode, norm, dims.seq, n));
        for (wij, &m) in w_row.iter_mut().zip(m_row) {
            *wij = if m { w } else { F::zero() };
        }
    }
    Ok(())
}

/// `Σ wᵢⱼ · ℓᵢⱼ` over valid positions: the aggregated loss for weights from
/// [`aggregation_weights`]. Masked positions are skipped, never multiplied.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `mask` or `weights` differs in length from
/// `loss`.
pub fn weighted_sum<F: Real>(loss: &[F], mask: &[bool], weights: &[F]) -> Result<F, Error> {
    check_len("mask", mask.len(), loss.len())?;
    check_len("weights", weights.len(), loss.len())?;
    let mut acc = F::zero();
    for ((&l, &m), &w) in loss.iter().zip(mask).zip(weights) {
        if m {
            acc += w * l;
        }
    }
    Ok(acc)
}

/// Aggregates a `[batch, seq]` per-token loss to a scalar and, if `grad` is
/// given, writes `∂L/∂ℓ` (the aggregation weights) into it.
///
/// # Formula
///
/// `L = Σᵢⱼ wᵢⱼ ℓᵢⱼ` with `w` from [`aggregation_weights`].
///
/// # Gradient
///
/// `∂L/∂ℓᵢⱼ = wᵢⱼ` (0 on masked positions).
///
/// # Peers
///
/// verl `agg_loss`; OpenRLHF `aggregate_loss`.
///
/// # Errors
///
/// As [`aggregation_weights`], plus [`Error::ShapeMismatch`] for `loss`.
///
/// # Example
///
/// ```
/// use posttrain_core::aggregate::{aggregate, AggMode, GlobalNorm};
/// use posttrain_core::Dims;
/// let loss = [1.0, 2.0, f64::NAN, 4.0];
/// let mask = [true, true, false, true];
/// let l = aggregate(AggMode::TokenMean, &GlobalNorm::default(), Dims::new(2, 2), &loss, &mask, None)?;
/// assert!((l - 7.0 / 3.0).abs() < 1e-12);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn aggregate<F: Real>(
    mode: AggMode,
    norm: &GlobalNorm,
    dims: Dims,
    loss: &[F],
    mask: &[bool],
    grad: Option<&mut [F]>,
) -> Result<F, Error> {
    check_len("loss", loss.len(), dims.len())?;
    match grad {
        Some(w) => {
            aggregation_weights(mode, norm, dims, mask, w)?;
            weighted_sum(loss, mask, w)
        }
        None => {
            // The same weights, one row at a time, without a buffer.
            check_len("mask", mask.len(), dims.len())?;
            norm.validate()?;
            if dims.seq == 0 {
                return Ok(F::zero());
            }
            let totals = AggTotals::of(mask, dims);
            let mut acc = F::zero();
            for (l_row, m_row) in loss.chunks(dims.seq).zip(mask.chunks(dims.seq)) {
                let n = m_row.iter().filter(|&&m| m).count();
                let w = F::of(totals.row_weight(mode, norm, dims.seq, n));
                // Token by token, exactly as with the buffer (a row sum
                // before the weight can overflow in f32 where w·ℓ does not).
                for (&l, &m) in l_row.iter().zip(m_row) {
                    if m {
                        acc += w * l;
                    }
                }
            }
            Ok(acc)
        }
    }
}

/// `Σ x` over the positions where `mask` is true (selection: masked NaN/inf never read).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `mask` differs in length from `x`.
pub fn masked_sum<F: Real>(x: &[F], mask: &[bool]) -> Result<F, Error> {
    check_len("mask", mask.len(), x.len())?;
    Ok(x.iter()
        .zip(mask)
        .filter(|(_, &m)| m)
        .fold(F::zero(), |a, (&v, _)| a + v))
}

/// Batch-level counts the weights depend on.
pub(crate) struct AggTotals {
    valid_tokens: usize,
    valid_rows: usize,
}

impl AggTotals {
    pub(crate) fn of(mask: &[bool], dims: Dims) -> Self {
        let valid_tokens = crate::fused::count_true(mask);
        let valid_rows = mask
            .chunks(dims.seq.max(1))
            .filter(|r| r.iter().any(|&m| m))
            .count();
        AggTotals {
            valid_tokens,
            valid_rows,
        }
    }

    pub(crate) fn row_weight(&self, mode: AggMode, norm: &GlobalNorm, seq: usize, n: usize) -> f64 {
        if n == 0 {
            return 0.0;
        }
        let dp = norm.dp_size;
        let g = norm.global_batch_size.unwrap_or(self.valid_rows as f64);
        match mode {
            AggMode::TokenMean => dp / norm.batch_num_tokens.unwrap_or(self.valid_tokens as f64),
            AggMode::TokenSum => dp,
            AggMode::SeqMeanTokenSum => dp / g,
            AggMode::SeqMeanTokenMean => dp / (g * (n as f64 + 1e-8)),
            AggMode::SeqMeanTokenSumNorm => dp / (g * norm.loss_scale_factor.unwrap_or(seq as f64)),
        }
    }
}
