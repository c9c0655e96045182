//! From `[batch, seq, vocab]` logits to token log-probabilities and entropy,
//! on tensors, with the VJP with respect to the logits.
//!
//! The formulas are those of [`posttrain_core::logits`], with the row loops
//! written as reductions over the vocabulary axis: the max-shifted
//! log-sum-exp `lse = m + ln Σ e^{z − m}` (`m = max z`; when `m` is not
//! finite the shift is 0, which gives the IEEE answer as the core does), so
//! logits of ±1e30 neither overflow nor lose the winner; zero-probability
//! terms are selected away (no `0 · ∞`).
//!
//! | function | value per position | VJP `∂/∂zₖ` (cotangent `c`) | core counterpart |
//! |---|---|---|---|
//! | [`selective_log_softmax`] | `z_t/T − lse(z/T)` | `c · (1[k=t] − pₖ) / T` | [`posttrain_core::logits::selective_log_softmax`] |
//! | [`gather_log_softmax`] | `z_{tᵢ}/T − lse(z/T)` for `k` ids | `(Σᵢ cᵢ 1[k=tᵢ] − pₖ Σᵢ cᵢ) / T` | [`posttrain_core::logits::gather_log_softmax`] |
//! | [`entropy_from_logits`] | `−Σ pₖ log pₖ` | `−c · pₖ (log pₖ + H)` | [`posttrain_core::logits::entropy_from_logits`] |
//! | [`sum_pi_squared`] | `Σ pₖ²` | `c · 2pₖ (pₖ − Σ p²)` | [`posttrain_core::logits::sum_pi_squared`] |
//! | [`sequence_log_probs`] | per-sequence label log-prob sum / mean | `w_b (1[k=label] − pₖ)` | [`posttrain_core::logits::sequence_log_probs`] |
//! | [`entropy_loss`] | aggregated token entropy | `wᵢⱼ · ∂H/∂z` | [`posttrain_core::logits::entropy_loss`] |
//!
//! The per-element parts of the gradients are the core's [`Elem`]
//! kernels ([`log_softmax_vjp_term`], [`entropy_vjp_term`],
//! [`sum_pi_squared_vjp_term`]) on `[batch, seq, vocab]` tensors.
//!
//! # Example
//!
//! ```
//! use posttrain_burn::{device, logits::selective_log_softmax, tensor3, to_vec, Int, Tensor};
//! use posttrain_core::logits::Temperature;
//! use burn::tensor::TensorData;
//! let dev = device()?;
//! let z = tensor3(&[0.0, 0.0, 1e30, -1e30], [1, 2, 2], &dev)?;
//! let t = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 0], [1, 2]), &dev);
//! let (lp, _) = selective_log_softmax(z, t, Temperature::ONE, None)?;
//! let lp = to_vec(lp);
//! assert!((lp[0] + std::f64::consts::LN_2).abs() < 1e-6 && lp[1] == 0.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use burn::tensor::{Bool, IndexingUpdateOp, Int, Tensor};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::logits::{
    entropy_vjp_term, log_softmax_vjp_term, sum_pi_squared_vjp_term, SequenceLogProbConfig,
    Temperature,
};
#[allow(unused_imports)]
use posttrain_core::Elem;
use posttrain_core::Error;

use crate::elem::ElemTensor;
use crate::util::{check_shape, keep, to_vec_bool};

/// `log softmax(z)` over the last axis with the stable max shift (the core's
/// `scaled_max_lse`).
pub(crate) fn log_softmax(z: Tensor<3>) -> Tensor<3> {
    let dims = z.dims();
    let m = z.clone().max_dim(2);
    // Shift by the max only where it is finite (all −inf, +inf or NaN rows:
    // no shift, the naive form gives the IEEE answer).
    let m = keep(m.clone(), &m.is_finite());
    let lse = m.clone() + (z.clone() - m.expand(dims)).exp().sum_dim(2).log();
    z - lse.expand(dims)
}

/// `log softmax(z / T)` (the peers divide the logits first).
pub(crate) fn log_softmax_t(z: Tensor<3>, t: f64) -> Tensor<3> {
    if t == 1.0 {
        log_softmax(z)
    } else {
        log_softmax(z.div_scalar(t))
    }
}

/// The VJP of `z ↦ log softmax(z/T)` from the log-probabilities `lp` and the
/// cotangent `g` (both `[b, s, v]`): the core's
/// [`log_softmax_vjp_term`] with the row sums `Σⱼ gⱼ` as a reduction.
pub(crate) fn log_softmax_vjp(lp: Tensor<3>, g: Tensor<3>, t: f64) -> Tensor<3> {
    let dims = g.dims();
    let total = g.clone().sum_dim(2).expand(dims);
    log_softmax_vjp_term(ElemTensor(g), ElemTensor(lp.exp()), ElemTensor(total), t).0
}

/// The VJP of `z ↦ log softmax(z/T)` for a cotangent that is *sparse* over
/// the vocabulary: `c[b, s, i]` at the ids `idx[b, s, i]`, 0 elsewhere
/// (repeated ids add up).
///
/// The core's [`log_softmax_vjp_term`] `(g − p·Σⱼgⱼ)/T` taken in its two
/// parts: the dense `−p·Σⱼgⱼ/T` over the whole row (`pₖ = 0` terms selected
/// to 0, as the core does) and the sparse `g/T`, added at the ids by a
/// scatter — so no `[b, s, v]` one-hot mask or dense `g` is ever built.
pub(crate) fn sparse_log_softmax_vjp(
    lp: Tensor<3>,
    idx: Tensor<3, Int>,
    c: Tensor<3>,
    t: f64,
) -> Tensor<3> {
    let dims = lp.dims();
    let total = c.clone().sum_dim(2).expand(dims);
    let p = lp.exp();
    let live = p.clone().greater_elem(0.0);
    let dense = keep(p * total, &live).div_scalar(-t);
    dense.scatter(2, idx, c.div_scalar(t), IndexingUpdateOp::Add)
}

/// Below this a log-probability's `exp` is exactly 0 in `f32` and `f64`
/// (`e^{−745}` underflows even in `f64`): clamping `log p` here keeps
/// `p · log p` and `p · (log p + H)` at exactly 0 for `p = 0` (a logit of
/// `−∞`) without a selection.
#[cfg_attr(not(feature = "autodiff"), allow(dead_code))]
const LOG_P_FLOOR: f64 = -1.0e4;

/// `(log p[t], H)` of `log softmax(z/T)`, both `[b, s, 1]`, for the fused
/// two-output op: the backend's own `log_softmax` (one kernel on libtorch),
/// one `exp`, one product and one sum over the vocabulary. `H = −Σ p·log p`
/// with `log p` floored at [`LOG_P_FLOOR`] (exact: those terms are 0).
///
/// For logits that are finite or `−∞` this is [`selective_log_softmax`] and
/// [`entropy_from_logits`] of `z/T`; a row holding `+∞` or NaN gives NaN
/// (the backend's `log_softmax`, as torch's), where the selections of the
/// single-output ops give `−∞` log-probs and `H = 0`.
#[cfg_attr(not(feature = "autodiff"), allow(dead_code))]
pub(crate) fn log_probs_entropy_rows(
    z: Tensor<3>,
    idx: Tensor<3, Int>,
    t: f64,
) -> (Tensor<3>, Tensor<3>) {
    let y = if t == 1.0 { z } else { z.div_scalar(t) };
    let ls = burn::tensor::activation::log_softmax(y, 2);
    let lp = ls.clone().gather(2, idx);
    let ls = ls.clamp_min(LOG_P_FLOOR);
    let h = (ls.clone().exp() * ls).sum_dim(2).neg();
    (lp, h)
}

/// The VJP of [`log_probs_entropy_rows`] for the cotangents `c_lp`, `c_h`
/// (`[b, s, 1]`), recomputed from the logits and the rows' `H`:
/// `gₖ = pₖ·(−c_lp − c_H (log pₖ + H))/T + 1[k = t]·c_lp/T` — the core's
/// [`log_softmax_vjp_term`] and [`entropy_vjp_term`] summed, in five
/// element-wise passes after the `log_softmax` (floor, `exp`, the affine
/// map in `log p`, the product, the scatter at the targets).
#[cfg_attr(not(feature = "autodiff"), allow(dead_code))]
pub(crate) fn log_probs_entropy_vjp(
    z: Tensor<3>,
    idx: Tensor<3, Int>,
    h: Tensor<3>,
    c_lp: Tensor<3>,
    c_h: Tensor<3>,
    t: f64,
) -> Tensor<3> {
    let dims = z.dims();
    let y = if t == 1.0 { z } else { z.div_scalar(t) };
    let ls = burn::tensor::activation::log_softmax(y, 2).clamp_min(LOG_P_FLOOR);
    let p = ls.clone().exp();
    let a = (ls + h.expand(dims)) * c_h.div_scalar(-t).expand(dims)
        + c_lp.clone().div_scalar(-t).expand(dims);
    (a * p).scatter(2, idx, c_lp.div_scalar(t), IndexingUpdateOp::Add)
}

/// The checks of [`selective_log_softmax`] without a cotangent: non-empty
/// vocabulary, `targets` `[batch, seq]`, every id in `[0, vocab)`.
#[cfg_attr(not(feature = "autodiff"), allow(dead_code))]
pub(crate) fn check_log_probs_inputs(
    logits: &Tensor<3>,
    targets: &Tensor<2, Int>,
) -> Result<(), Error> {
    let [b, s, v] = logits.dims();
    check_logits(logits)?;
    check_shape("targets", targets.dims(), [b, s])?;
    check_ids(targets, v, "targets")
}

/// [`Error::Invalid`] if any id lies outside `[0, vocab)` (one boolean read
/// back from the device).
fn check_ids<const D: usize>(
    ids: &Tensor<D, Int>,
    vocab: usize,
    input: &'static str,
) -> Result<(), Error> {
    if ids.dims().iter().product::<usize>() == 0 {
        return Ok(());
    }
    let bad = ids
        .clone()
        .lower_elem(0)
        .bool_or(ids.clone().greater_equal_elem(vocab as i64))
        .any();
    if to_vec_bool(bad)[0] {
        return Err(Error::Invalid {
            input,
            rule: "every token id must lie in [0, vocab)",
        });
    }
    Ok(())
}

fn check_logits(logits: &Tensor<3>) -> Result<(), Error> {
    let [b, s, v] = logits.dims();
    if v == 0 && b * s > 0 {
        return Err(Error::Empty { input: "logits" });
    }
    Ok(())
}

/// The log-probability of one target id per position:
/// `log softmax(z / T)[target]`, and, with a cotangent, its VJP.
///
/// # Formula
///
/// `out[b, s] = z[b, s, t]/T − lse(z[b, s, :]/T)`.
///
/// # Gradient
///
/// `g[b, s, k] = c[b, s] · (1[k = t] − p[b, s, k]) / T`, `p = softmax(z/T)`
/// (`pₖ = 0` terms contribute nothing).
///
/// # Peers
///
/// TRL `selective_log_softmax`, verl `logprobs_from_logits` (`T = 1`),
/// OpenRLHF `log_probs_from_logits(temperature)`, torchtune
/// `logits_to_logprobs(temperature)`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `targets` (or the cotangent) is not
/// `[batch, seq]`; [`Error::Invalid`] for an id outside `[0, vocab)` (this
/// check reads one boolean back from the device); [`Error::Empty`] for
/// `vocab = 0`.
pub fn selective_log_softmax(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    temperature: Temperature,
    cotangent: Option<Tensor<2>>,
) -> Result<(Tensor<2>, Option<Tensor<3>>), Error> {
    let [b, s, v] = logits.dims();
    check_logits(&logits)?;
    check_shape("targets", targets.dims(), [b, s])?;
    if let Some(c) = &cotangent {
        check_shape("cotangent", c.dims(), [b, s])?;
    }
    check_ids(&targets, v, "targets")?;
    let t = temperature.get();
    let lp = log_softmax_t(logits, t);
    let idx = targets.unsqueeze_dim::<3>(2);
    let out = lp.clone().gather(2, idx.clone()).squeeze_dim::<2>(2);
    let grad = cotangent.map(|c| sparse_log_softmax_vjp(lp, idx, c.unsqueeze_dim::<3>(2), t));
    Ok((out, grad))
}

/// The entropy of each position's softmax distribution and, with a
/// cotangent, its VJP.
///
/// # Formula
///
/// `H = −Σₖ pₖ log pₖ` with `log p = z − lse(z)`; terms with `pₖ = 0` are
/// skipped (selected to 0), which keeps rows of ±1e30 logits finite.
///
/// # Gradient
///
/// `∂H/∂zₖ = −pₖ (log pₖ + H)`, times the position's cotangent.
///
/// # Peers
///
/// TRL and verl `entropy_from_logits`, OpenRLHF `compute_entropy` (which
/// give NaN for a logit of −∞ where posttrain skips the `p = 0` term).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if the cotangent is not `[batch, seq]`;
/// [`Error::Empty`] for `vocab = 0`.
pub fn entropy_from_logits(
    logits: Tensor<3>,
    cotangent: Option<Tensor<2>>,
) -> Result<(Tensor<2>, Option<Tensor<3>>), Error> {
    let [b, s, _] = logits.dims();
    check_logits(&logits)?;
    if let Some(c) = &cotangent {
        check_shape("cotangent", c.dims(), [b, s])?;
    }
    let (h, lp) = entropy_rows(logits);
    let grad = cotangent.map(|c| entropy_vjp(lp, h.clone(), c));
    Ok((h, grad))
}

/// `(H, log p)` of every row: `H = −Σ select(p > 0, p·log p, 0)`.
fn entropy_rows(logits: Tensor<3>) -> (Tensor<2>, Tensor<3>) {
    let lp = log_softmax(logits);
    let p = lp.clone().exp();
    let live = p.clone().greater_elem(0.0);
    let h = keep(p * lp.clone(), &live).sum_dim(2).neg();
    (h.squeeze_dim::<2>(2), lp)
}

/// `c · ∂H/∂z` with the core's [`entropy_vjp_term`].
fn entropy_vjp(lp: Tensor<3>, h: Tensor<2>, c: Tensor<2>) -> Tensor<3> {
    let dims = lp.dims();
    let c = c.unsqueeze_dim::<3>(2).expand(dims);
    let h = h.unsqueeze_dim::<3>(2).expand(dims);
    entropy_vjp_term(
        ElemTensor(lp.clone().exp()),
        ElemTensor(lp),
        ElemTensor(h),
        ElemTensor(c),
    )
    .0
}

/// Log-probabilities `log softmax(z / T)[tᵢ]` of `k` target ids per
/// position (`targets` `[batch, seq, k]`, e.g. the top-k ids), and with a
/// cotangent `[batch, seq, k]` the VJP.
///
/// # Formula
///
/// `out[b, s, i] = z[b, s, t_i]/T − lse(z[b, s, :]/T)` (a `gather` of the
/// log-softmax), as [`posttrain_core::logits::gather_log_softmax`].
///
/// # Gradient
///
/// `g[b, s, j] = (Σᵢ cᵢ 1[j = tᵢ] − p_j Σᵢ cᵢ) / T`: the cotangents are
/// scattered onto the vocabulary (one selection per id slot), then chained
/// through [`log_softmax_vjp_term`].
///
/// # Peers
///
/// TRL `selective_log_softmax` with an index of shape `[B, T, k]`; with
/// `k = 1` every peer of [`selective_log_softmax`].
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `targets` is not `[batch, seq, k]` or the
/// cotangent not the shape of `targets`; [`Error::Invalid`] for an id
/// outside `[0, vocab)` or `k = 0` with positions present;
/// [`Error::Empty`] for `vocab = 0`.
///
/// # Example
///
/// ```
/// use posttrain_burn::{device, logits::gather_log_softmax, tensor3, to_vec, Int, Tensor};
/// use posttrain_core::logits::Temperature;
/// use burn::tensor::TensorData;
/// let dev = device()?;
/// let z = tensor3(&[0.0; 4], [1, 1, 4], &dev)?;
/// let ids = Tensor::<3, Int>::from_data(TensorData::new(vec![0i64, 3], [1, 1, 2]), &dev);
/// let (lp, _) = gather_log_softmax(z, ids, Temperature::ONE, None)?;
/// assert!(to_vec(lp).iter().all(|x| (x + 4f64.ln()).abs() < 1e-6));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn gather_log_softmax(
    logits: Tensor<3>,
    targets: Tensor<3, Int>,
    temperature: Temperature,
    cotangent: Option<Tensor<3>>,
) -> Result<(Tensor<3>, Option<Tensor<3>>), Error> {
    let [b, s, v] = logits.dims();
    check_logits(&logits)?;
    let k = targets.dims()[2];
    check_shape("targets", targets.dims(), [b, s, k])?;
    if k == 0 && b * s > 0 {
        return Err(Error::Invalid {
            input: "targets",
            rule: "at least one target id per row is required",
        });
    }
    if let Some(c) = &cotangent {
        check_shape("cotangent", c.dims(), [b, s, k])?;
    }
    check_ids(&targets, v, "targets")?;
    let t = temperature.get();
    let lp = log_softmax_t(logits, t);
    let out = lp.clone().gather(2, targets.clone());
    let grad = cotangent.map(|c| sparse_log_softmax_vjp(lp, targets, c, t));
    Ok((out, grad))
}

/// `Σₖ pₖ²` of each position's softmax, and with a cotangent its VJP.
///
/// # Formula
///
/// `Σₖ pₖ²`, `p = softmax(z)` (max-shifted), as
/// [`posttrain_core::logits::sum_pi_squared`].
///
/// # Gradient
///
/// `c · 2pₖ (pₖ − Σⱼ pⱼ²)` ([`sum_pi_squared_vjp_term`]).
///
/// # Peers
///
/// verl `calculate_sum_pi_squared_from_logits`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if the cotangent is not `[batch, seq]`;
/// [`Error::Empty`] for `vocab = 0`.
pub fn sum_pi_squared(
    logits: Tensor<3>,
    cotangent: Option<Tensor<2>>,
) -> Result<(Tensor<2>, Option<Tensor<3>>), Error> {
    let [b, s, v] = logits.dims();
    check_logits(&logits)?;
    if let Some(c) = &cotangent {
        check_shape("cotangent", c.dims(), [b, s])?;
    }
    let p = log_softmax(logits).exp();
    let s2 = (p.clone() * p.clone()).sum_dim(2);
    let grad = cotangent.map(|c| {
        let c = c.unsqueeze_dim::<3>(2).expand([b, s, v]);
        let s2 = s2.clone().expand([b, s, v]);
        sum_pi_squared_vjp_term(ElemTensor(p), ElemTensor(s2), ElemTensor(c)).0
    });
    Ok((s2.squeeze_dim::<2>(2), grad))
}

/// Per-sequence log-probability of the labels (sum, or mean over valid
/// positions), and with a cotangent `[batch]` its VJP.
///
/// # Formula
///
/// With shifting, position `t < seq − 1` scores `label_{t+1}`; valid where
/// the label `≠ ignore_index`: `out[b] = Σ_valid log pₜ(label)`, divided by
/// `n_b + 1e-8` when averaging, 0 for a row with nothing valid — as
/// [`posttrain_core::logits::sequence_log_probs`], with the row loop as a
/// `gather`, a selection and a `sum_dim`.
///
/// # Gradient
///
/// `w_b (1[k = label] − pₖ)` at valid positions (`w_b = c_b` or
/// `c_b/(n_b + 1e-8)`), 0 elsewhere (the last position when shifting).
///
/// # Peers
///
/// torchtune `get_batch_log_probs`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `labels` is not `[batch, seq]` or the
/// cotangent not `[batch]`; [`Error::Invalid`] for a valid label outside
/// `[0, vocab)`; [`Error::Empty`] for `vocab = 0`.
pub fn sequence_log_probs(
    cfg: &SequenceLogProbConfig,
    logits: Tensor<3>,
    labels: Tensor<2, Int>,
    cotangent: Option<Tensor<1>>,
) -> Result<(Tensor<1>, Option<Tensor<3>>), Error> {
    let [b, s, v] = logits.dims();
    check_logits(&logits)?;
    check_shape("labels", labels.dims(), [b, s])?;
    if let Some(c) = &cotangent {
        check_shape("cotangent", c.dims(), [b])?;
    }
    let device = logits.device();
    let shift = usize::from(cfg.shift_labels);
    let n_pos = s.saturating_sub(shift);
    if b == 0 || n_pos == 0 {
        let grad = cotangent.map(|_| Tensor::zeros([b, s, v], &device));
        return Ok((Tensor::zeros([b], &device), grad));
    }
    let z = logits.narrow(1, 0, n_pos);
    let lab = labels.narrow(1, shift, n_pos);
    let valid = lab.clone().not_equal_elem(cfg.ignore_index);
    let safe = lab.mask_fill(valid.clone().bool_not(), 0);
    check_ids(&safe, v, "labels")?;
    let lp = log_softmax(z);
    let tok = lp.clone().gather(2, safe.clone().unsqueeze_dim::<3>(2));
    let tok = tok.squeeze_dim::<2>(2);
    let sum = keep(tok, &valid).sum_dim(1);
    let n = valid.clone().float().sum_dim(1);
    let denom = if cfg.average {
        n.clone().add_scalar(1e-8)
    } else {
        n.ones_like()
    };
    let out = keep(sum / denom.clone(), &n.greater_elem(0.0)).reshape([b]);
    let grad = cotangent.map(|c| {
        let w = (c.reshape([b, 1]) / denom).expand([b, n_pos]);
        let w = keep(w, &valid).unsqueeze_dim::<3>(2);
        let g = keep(
            sparse_log_softmax_vjp(lp, safe.unsqueeze_dim::<3>(2), w, 1.0),
            &valid.unsqueeze_dim::<3>(2).expand([b, n_pos, v]),
        );
        if shift == 0 {
            g
        } else {
            Tensor::cat(vec![g, Tensor::zeros([b, shift, v], &device)], 1)
        }
    });
    Ok((out, grad))
}

/// The aggregated entropy of the token distributions, and with a scalar
/// cotangent its VJP.
///
/// # Formula
///
/// `L = Σᵢⱼ wᵢⱼ H(z[i, j])` with `w` from
/// [`crate::aggregate::aggregation_weights`] (masked entropies selected to
/// 0), as [`posttrain_core::logits::entropy_loss`].
///
/// # Gradient
///
/// `∂L/∂z[i, j, k] = −c·wᵢⱼ pₖ (log pₖ + H)` ([`entropy_vjp_term`]), 0 on
/// masked positions (selected, so NaN logits in padding cannot leak).
///
/// # Peers
///
/// verl `compute_entropy_loss(logits, response_mask, loss_agg_mode)`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `mask` is not `[batch, seq]`;
/// [`Error::Empty`] for `vocab = 0`; the aggregation's errors.
pub fn entropy_loss(
    mode: AggMode,
    norm: &GlobalNorm,
    logits: Tensor<3>,
    mask: &Tensor<2, Bool>,
    cotangent: Option<f64>,
) -> Result<(Tensor<1>, Option<Tensor<3>>), Error> {
    let [b, s, v] = logits.dims();
    check_logits(&logits)?;
    check_shape("mask", mask.dims(), [b, s])?;
    let (h, lp) = entropy_rows(logits);
    let h = keep(h, mask);
    let agg = crate::aggregate::aggregate(mode, norm, h.clone(), mask)?;
    let grad = cotangent.map(|c| {
        let cw = agg.weights.mul_scalar(c);
        let g = entropy_vjp(lp, h, cw);
        keep(g, &mask.clone().unsqueeze_dim::<3>(2).expand([b, s, v]))
    });
    Ok((agg.value, grad))
}
