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
//! | function | value per position | VJP `∂/∂zₖ` (cotangent `c`) |
//! |---|---|---|
//! | [`selective_log_softmax`] | `z_t/T − lse(z/T)` | `c · (1[k=t] − pₖ) / T` |
//! | [`entropy_from_logits`] | `−Σ pₖ log pₖ` | `−c · pₖ (log pₖ + H)` |
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

use burn::tensor::{Int, Tensor};
use posttrain_core::logits::Temperature;
use posttrain_core::Error;

use crate::util::{check_shape, keep, to_vec_bool};

/// `log softmax(z)` over the last axis with the stable max shift, and
/// `p = softmax(z)`.
fn log_softmax(z: Tensor<3>) -> Tensor<3> {
    let dims = z.dims();
    let m = z.clone().max_dim(2);
    // Shift by the max only where it is finite (all −inf, +inf or NaN rows:
    // no shift, the naive form gives the IEEE answer).
    let m = keep(m.clone(), &m.is_finite());
    let lse = m.clone() + (z.clone() - m.expand(dims)).exp().sum_dim(2).log();
    z - lse.expand(dims)
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
    if b * s > 0 {
        let bad = targets
            .clone()
            .lower_elem(0)
            .bool_or(targets.clone().greater_equal_elem(v as i64))
            .any();
        if to_vec_bool(bad)[0] {
            return Err(Error::Invalid {
                input: "targets",
                rule: "every token id must lie in [0, vocab)",
            });
        }
    }
    let t = temperature.get();
    let z = if t == 1.0 {
        logits
    } else {
        logits.div_scalar(t)
    };
    let lp = log_softmax(z);
    let idx = targets.clone().unsqueeze_dim::<3>(2);
    let out = lp.clone().gather(2, idx).squeeze_dim::<2>(2);
    let grad = cotangent.map(|c| {
        // 1[k = t] by comparison with an iota (burn's one_hot needs ≥ 2 classes).
        let iota = Tensor::<1, Int>::arange(0..v as i64, &lp.device())
            .reshape([1, 1, v])
            .expand([b, s, v]);
        let onehot: Tensor<3> = iota
            .equal(targets.unsqueeze_dim::<3>(2).expand([b, s, v]))
            .float();
        let c = c.unsqueeze_dim::<3>(2).expand([b, s, v]);
        let g = c * (onehot - lp.exp());
        if t == 1.0 {
            g
        } else {
            g.div_scalar(t)
        }
    });
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
    let [b, s, v] = logits.dims();
    check_logits(&logits)?;
    if let Some(c) = &cotangent {
        check_shape("cotangent", c.dims(), [b, s])?;
    }
    let lp = log_softmax(logits);
    let p = lp.clone().exp();
    let live = p.clone().greater_elem(0.0);
    let h = keep(p.clone() * lp.clone(), &live).sum_dim(2).neg();
    let grad = cotangent.map(|c| {
        let c = c.unsqueeze_dim::<3>(2).expand([b, s, v]);
        let g = (c * p * (lp + h.clone().expand([b, s, v]))).neg();
        keep(g, &live)
    });
    Ok((h.squeeze_dim::<2>(2), grad))
}
