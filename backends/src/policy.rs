//! Token-level policy losses on tensors (verl's `policy_loss` registry): the
//! core's per-token kernels ([`PolicyLoss::token`], which calls
//! [`ppo_clipped_surrogate`]
//! for PPO, and [`sequence_ratio_surrogate`] for GSPO) on `[batch, seq]`
//! tensors, importance weights, aggregation and verl's metrics.
//!
//! | [`PolicyLoss`] variant | verl `loss_mode` | here |
//! |---|---|---|
//! | `Ppo` | `vanilla` | yes |
//! | `DivergenceTv` / `DivergenceKl` | `dppo_tv` / `dppo_kl` | yes |
//! | `SoftGate` | `sapo` | yes |
//! | `LogProb` | `gpg`, REINFORCE | yes |
//! | `QuadraticPenalty` | `dro` | yes |
//! | `ClippedWeight` | `cispo` | yes |
//! | `SequenceRatio` | `gspo` | yes (row means as tensor reductions) |
//! | `ClipCov`, `KlCov` | `clip_cov`, `kl_cov` | yes: covariance as tensor reductions, top-k by a tensor sort (see [`select_top`]) |
//! | `GeometricMean` | `geo_mean` | yes (row means as tensor reductions) |
//! | — | `bypass_mode` | in [`crate::rollout::bypass_policy_loss`] (a rollout-correction wrapper) |
//!
//! [`clipped_policy_loss`] is OpenRLHF's `PolicyLoss` (token- or
//! sequence-level ratio, rollout IS correction), the tensor counterpart of
//! [`posttrain_core::policy::ppo::clipped_policy_loss`].
//!
//! # Example
//!
//! ```
//! use posttrain_burn::{device, mask2, policy::policy_loss, tensor2, to_vec};
//! use posttrain_core::aggregate::{AggMode, GlobalNorm};
//! use posttrain_core::policy::token::{PolicyLoss, PolicyLossMode, VerlPolicyParams};
//! let dev = device()?;
//! let loss = PolicyLoss::from_verl(PolicyLossMode::Vanilla, &VerlPolicyParams::default())?;
//! let lp = tensor2(&[-1.0, -0.5, f64::NAN], [1, 3], &dev)?;
//! let old = tensor2(&[-1.1, -0.4, 0.0], [1, 3], &dev)?;
//! let adv = tensor2(&[1.0, -1.0, 0.0], [1, 3], &dev)?;
//! let mask = mask2(&[true, true, false], [1, 3], &dev)?;
//! let out = policy_loss(&loss, AggMode::TokenMean, &GlobalNorm::default(), lp, old, adv, &mask, None)?;
//! assert!(to_vec(out.loss)[0].is_finite());
//! assert_eq!(to_vec(out.grad)[2], 0.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::util::Filled;
use burn::tensor::{Bool, Tensor};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::policy::ppo::{
    rollout_is_weight, ClippedPolicyLoss, RatioLevel, RolloutIsKind,
};
use posttrain_core::policy::ppo_clipped_surrogate;
use posttrain_core::policy::token::{
    geometric_clipped_log_ratio, kl_cov_penalty, sequence_ratio_surrogate, PolicyLoss, PolicyToken,
    LOG_RATIO_CLAMP,
};
use posttrain_core::Error;

use crate::aggregate::{aggregation_weights, weighted_sum};
use crate::elem::{ElemMask, ElemTensor};
use crate::util::{check_shape, count, keep};

/// verl's `+1e-8` in the metric denominators.
const MEAN_EPS: f64 = 1e-8;

/// The aggregated policy loss, its gradient and verl's metrics, as tensors.
#[derive(Debug, Clone)]
pub struct PolicyLossOutput {
    /// The aggregated loss (verl `pg_loss`), `[1]`.
    pub loss: Tensor<1>,
    /// `∂loss/∂log π`, `[batch, seq]` (0 on masked positions).
    pub grad: Tensor<2>,
    /// The per-token loss after importance weights (0 on masked positions).
    /// For `GeometricMean`, whose loss is per sequence, each valid token
    /// holds an equal share of its row's term, so the sum is still the loss.
    pub per_token: Tensor<2>,
    /// verl `pg_clipfrac`, `[1]`.
    pub clipfrac: Tensor<1>,
    /// verl `pg_clipfrac_lower`, `[1]`.
    pub clipfrac_lower: Tensor<1>,
    /// verl `ppo_kl`, `[1]`.
    pub approx_kl: Tensor<1>,
}

/// Runs a token-level policy loss on tensors.
///
/// # Formula
///
/// As [`posttrain_core::policy::token::policy_loss`]:
/// `L = Σ wᵢⱼ·ISᵢⱼ·ℓᵢⱼ` over valid positions, `ℓ` from the core kernel of
/// the variant, `IS` the optional importance weights, `w` the weights of
/// [`PolicyLoss::effective_agg`]`(agg)` under `norm`. Metrics are means over
/// valid tokens with `+1e-8` in the denominator.
///
/// The cross-token parts follow the core driver line by line, as tensor
/// reductions:
///
/// - GSPO: the row mean `Σ_valid x / max(n, 1)` of the log-ratio.
/// - Clip-Cov / KL-Cov: the centred covariance
///   `(A − Ā)(log π − mean log π)` with masked means `Σ / (N + ε)`
///   (ε = 1e-8 for Clip-Cov, 0 for KL-Cov), then the top-`k` candidates by
///   [`select_top`] (`k = max(⌊ratio·N⌋, 1)`, capped at `N` for KL-Cov);
///   Clip-Cov zeroes the picked tokens' loss and gradient, KL-Cov adds
///   [`kl_cov_penalty`] to them. `k` needs the valid-token count `N` on the
///   host (one scalar read of the mask's count: metadata, not numeric data).
/// - GMPO: per row `−Ā·exp(clamp(Σ x̃ / (n + 1e-8), ±20))·w̄`
///   ([`geometric_clipped_log_ratio`] per token), averaged over all rows.
///
/// # Gradient
///
/// `∂L/∂log πᵢⱼ = wᵢⱼ·ISᵢⱼ·∂ℓᵢⱼ/∂log πᵢⱼ` (straight-through per token for
/// GSPO); GMPO: `−Āᵢ·w̄ᵢ·exp(x̄ᵢ)·∂x̃ᵢⱼ/∂x / (nᵢ + 1e-8) / batch` (0 where the
/// ±20 clamp is active).
///
/// # Peers
///
/// verl `get_policy_loss_fn(loss_mode)` for every mode but `bypass_mode`
/// (see [`crate::rollout`]).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for shapes; [`Error::OutOfRange`] for an invalid
/// variant or normalizer.
#[allow(clippy::too_many_arguments)]
pub fn policy_loss(
    loss: &PolicyLoss,
    agg: AggMode,
    norm: &GlobalNorm,
    log_prob: Tensor<2>,
    old_log_prob: Tensor<2>,
    advantages: Tensor<2>,
    mask: &Tensor<2, Bool>,
    is_weights: Option<Tensor<2>>,
) -> Result<PolicyLossOutput, Error> {
    loss.validate()?;
    norm.validate()?;
    let dims = mask.dims();
    check_shape("log_prob", log_prob.dims(), dims)?;
    check_shape("old_log_prob", old_log_prob.dims(), dims)?;
    check_shape("advantages", advantages.dims(), dims)?;
    if let Some(w) = &is_weights {
        check_shape("rollout_is_weights", w.dims(), dims)?;
    }
    if let PolicyLoss::GeometricMean { eps_low, eps_high } = *loss {
        return Ok(geometric_mean_loss(
            eps_low,
            eps_high,
            log_prob,
            old_log_prob,
            advantages,
            mask,
            is_weights,
        ));
    }
    let [batch, seq] = dims;
    let token: PolicyToken<ElemTensor<2>> = match *loss {
        PolicyLoss::SequenceRatio {
            eps_low,
            eps_high,
            max_log_ratio,
            ..
        } => {
            let x = keep(log_prob.clone() - old_log_prob.clone(), mask);
            let n = mask.clone().float().sum_dim(1).clamp_min(1.0);
            let seq_x = (x.sum_dim(1) / n).expand([batch, seq]);
            let mut t = sequence_ratio_surrogate(
                eps_low,
                eps_high,
                max_log_ratio,
                ElemTensor(seq_x),
                ElemTensor(advantages.clone()),
            );
            t.kl = ElemTensor(old_log_prob.clone() - log_prob.clone());
            t
        }
        _ => loss.token(
            ElemTensor(log_prob.clone()),
            ElemTensor(old_log_prob.clone()),
            ElemTensor(advantages.clone()),
        ),
    };
    let (mut tl, mut tg) = (keep(token.loss.0, mask), keep(token.grad.0, mask));
    let surrogate_clipped = token.clipped.0.clone();
    let denom = count(mask).add_scalar(MEAN_EPS);
    let frac = |m: Tensor<2, Bool>| count(&m.bool_and(mask.clone())) / denom.clone();
    let (mut clipfrac, mut clipfrac_lower) = match loss {
        PolicyLoss::SoftGate { .. } => (denom.zeros_like(), denom.zeros_like()),
        _ => (frac(token.clipped.0.clone()), frac(token.clipped_lower.0)),
    };
    match *loss {
        PolicyLoss::ClipCov { ratio, lb, ub, .. } => {
            let n_valid = valid_count(mask);
            let cov = covariance(&advantages, &log_prob, mask, MEAN_EPS);
            // Candidates: valid, not clipped by the surrogate (the token's
            // `clipped` is the surrogate's), lb < cov < ub.
            let cand = mask
                .clone()
                .bool_and(surrogate_clipped.bool_not())
                .bool_and(cov.clone().greater_elem(lb))
                .bool_and(cov.clone().lower_elem(ub));
            let k = ((ratio * n_valid as f64) as usize).max(1);
            let picked = select_top(cand, cov, k);
            tl = tl.mask_fill(picked.clone(), 0.0);
            tg = tg.mask_fill(picked.clone(), 0.0);
            clipfrac = count(&picked) / denom.clone();
            clipfrac_lower = denom.zeros_like();
        }
        PolicyLoss::KlCov { ratio, coef, .. } => {
            let n_valid = valid_count(mask);
            if n_valid > 0 {
                let cov = covariance(&advantages, &log_prob, mask, 0.0);
                let k = ((n_valid as f64 * ratio) as usize).max(1).min(n_valid);
                let picked = select_top(mask.clone(), cov, k);
                let (p, dp) = kl_cov_penalty(coef, ElemTensor(log_prob), ElemTensor(old_log_prob));
                tl = tl.clone().mask_where(picked.clone(), tl + p.0);
                tg = tg.clone().mask_where(picked, tg + dp.0);
            }
        }
        _ => {}
    }
    if let Some(w) = is_weights {
        tl = keep(tl * w.clone(), mask);
        tg = keep(tg * w, mask);
    }
    let weights = aggregation_weights(loss.effective_agg(agg), norm, mask)?;
    let value = weighted_sum(tl.clone(), mask, &weights);
    let grad = keep(weights * tg, mask);
    let approx_kl = keep(token.kl.0, mask).sum() / denom;
    Ok(PolicyLossOutput {
        loss: value,
        grad,
        per_token: tl,
        clipfrac,
        clipfrac_lower,
        approx_kl,
    })
}

/// The number of valid positions, read to the host (a device sync of one
/// scalar: mask metadata, used for the top-`k` size).
fn valid_count(mask: &Tensor<2, Bool>) -> usize {
    let v = crate::util::to_vec(count(mask));
    v[0].round() as usize
}

/// The centred covariance `(A − Ā)(log π − mean log π)` of the core's
/// Clip-Cov / KL-Cov, with masked means `Σ_valid / (N + eps)` (0 when
/// nothing is valid, as the core's `masked_means`). Masked positions hold
/// whatever the inputs give there; callers select candidates among valid
/// positions only.
fn covariance(
    advantages: &Tensor<2>,
    log_prob: &Tensor<2>,
    mask: &Tensor<2, Bool>,
    eps: f64,
) -> Tensor<2> {
    let dims = mask.dims();
    let n = count(mask);
    // eps = 0 with N = 0: both sums are 0, divide by 1 instead of 0.
    let d = if eps > 0.0 {
        n.add_scalar(eps)
    } else {
        n.clamp_min(1.0)
    };
    let d = d.reshape([1, 1]).expand(dims);
    let mean =
        |x: &Tensor<2>| (keep(x.clone(), mask).sum().reshape([1, 1]).expand(dims)) / d.clone();
    let ma = mean(advantages);
    let ml = mean(log_prob);
    (advantages.clone() - ma) * (log_prob.clone() - ml)
}

/// The top-`k` candidates by `key`: every candidate if there are at most
/// `k`, else the `k` with the largest key, ties broken by the lowest flat
/// (row-major) index — the core's `select_top` (`policy::token`), on tensors.
///
/// # Formula
///
/// With non-candidates' keys set to `−∞` and the flattened keys sorted
/// descending (burn's `sort_descending`), `θ` = the `k`-th largest key;
/// picked = candidates with `key > θ`, plus the first
/// `k − #{key > θ}` candidates (in flat order, a `cumsum`) with `key = θ`.
/// When there are fewer than `k` candidates `θ = −∞` and every candidate is
/// above it. Candidate keys must be finite (the covariances of valid tokens
/// are). `k` is host metadata (burn's sort takes no tensor index).
///
/// Only the *value* of the `k`-th largest key comes from the sort, so the
/// result does not depend on the sort's stability (burn documents its sort
/// as unstable): ties are resolved by the flat-order `cumsum`, as the core
/// resolves them. On a backend without a device sort, burn's default
/// `float_sort` itself reads the keys back to sort them.
pub fn select_top(cand: Tensor<2, Bool>, key: Tensor<2>, k: usize) -> Tensor<2, Bool> {
    let dims = cand.dims();
    let n = dims[0] * dims[1];
    if n == 0 || k == 0 {
        return cand.clone().bool_and(cand.bool_not());
    }
    let cand = cand.reshape([n]);
    let key = key.reshape([n]);
    let key = key.filled(f64::NEG_INFINITY).mask_where(cand.clone(), key);
    let kk = k.min(n);
    let theta = key
        .clone()
        .sort_descending(0)
        .narrow(0, kk - 1, 1)
        .expand([n]);
    let above = cand.clone().bool_and(key.clone().greater(theta.clone()));
    let ties = cand.bool_and(key.equal(theta));
    let left = count(&above).neg().add_scalar(k as f64).expand([n]);
    let rank = ties.clone().float().cumsum(0);
    let tie_pick = ties.bool_and(rank.lower_equal(left));
    above.bool_or(tie_pick).reshape(dims)
}

/// GMPO's per-sequence reduction (the core's `geometric_mean_loss`) on tensors.
fn geometric_mean_loss(
    eps_low: f64,
    eps_high: f64,
    log_prob: Tensor<2>,
    old_log_prob: Tensor<2>,
    advantages: Tensor<2>,
    mask: &Tensor<2, Bool>,
    is_weights: Option<Tensor<2>>,
) -> PolicyLossOutput {
    let [batch, seq] = mask.dims();
    let rows = batch.max(1) as f64;
    let x = log_prob - old_log_prob;
    let g = geometric_clipped_log_ratio(
        eps_low,
        eps_high,
        ElemTensor(x.clone()),
        ElemTensor(advantages.clone()),
    );
    let n_row = mask.clone().float().sum_dim(1);
    let d = n_row.clone().add_scalar(MEAN_EPS);
    let mean_x = keep(g.clipped_log_ratio.0, mask).sum_dim(1) / d.clone();
    let live = mean_x.clone().abs().lower_equal_elem(LOG_RATIO_CLAMP);
    let ratio = mean_x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp();
    let a_bar = keep(advantages, mask).sum_dim(1) / d.clone();
    let seq_w = match is_weights {
        Some(w) => (keep(w.add_scalar(1e-10).log(), mask).sum_dim(1) / d.clone()).exp(),
        None => ratio.ones_like(),
    };
    // [batch, 1]: each row's term −Ā·exp(x̄)·w̄ / batch.
    let row_loss = (a_bar.neg() * ratio * seq_w).div_scalar(rows);
    let loss = row_loss.clone().sum();
    let coef = keep(row_loss.clone() / d, &live).expand([batch, seq]);
    let grad = keep(coef * g.grad.0, mask);
    let per_token = keep((row_loss / n_row.clamp_min(1.0)).expand([batch, seq]), mask);
    let denom = count(mask).add_scalar(MEAN_EPS);
    let frac = |m: ElemMask<2>| count(&m.0.bool_and(mask.clone())) / denom.clone();
    PolicyLossOutput {
        loss,
        grad,
        per_token,
        clipfrac: frac(g.clipped_high),
        clipfrac_lower: frac(g.clipped_low),
        approx_kl: keep(x.neg(), mask).sum() / denom,
    }
}

/// OpenRLHF's policy loss and metrics, as tensors.
#[derive(Debug, Clone)]
pub struct ClippedPolicyLossOutput {
    /// The aggregated loss, `[1]`.
    pub loss: Tensor<1>,
    /// `∂loss/∂log π`, `[batch, seq]` (0 on masked positions).
    pub grad: Tensor<2>,
    /// OpenRLHF `clip_ratio`: share of valid tokens on the clipped branch, `[1]`.
    pub clip_ratio: Tensor<1>,
    /// OpenRLHF `ppo_kl`: mean of `log π_old − log π` over valid tokens, `[1]`.
    pub approx_kl: Tensor<1>,
    /// OpenRLHF `vllm_kl` (token-level ratio with a correction only), `[1]`.
    pub rollout_kl: Option<Tensor<1>>,
}

/// OpenRLHF's `PolicyLoss` on tensors: the PPO clipped surrogate of a token-
/// or sequence-level ratio, with the optional rollout IS correction.
///
/// # Formula
///
/// As [`posttrain_core::policy::ppo::clipped_policy_loss`], with the core
/// kernels [`ppo_clipped_surrogate`] and [`rollout_is_weight`] on whole
/// tensors:
///
/// ```text
/// token:     ℓ = ρ · surrogate(log π − log π_old, A)
///            (seq-mask-tis: ρ kept in rows with exp(Σ_valid(log π_old − log μ) / n) in [low, high])
/// sequence:  x̄ᵢ = Σ_valid (log π − log π_base) / max(nᵢ, 1),  ℓ = surrogate(x̄ᵢ, A)
/// L = Σ w·ℓ   (token-mean or seq-mean-token-mean weights, [`ClippedPolicyLoss::effective_norm`])
/// ```
///
/// Metrics are plain means over valid tokens (0 when none).
///
/// # Gradient
///
/// Token level `w·ρ·∂ℓ/∂x`; sequence level `Σⱼ wᵢⱼ ∂ℓᵢⱼ/∂x̄ᵢ / max(nᵢ, 1)` on
/// each valid token of row `i`.
///
/// # Peers
///
/// OpenRLHF `PolicyLoss.forward` ([`ClippedPolicyLoss::openrlhf`]).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for shapes; [`Error::Invalid`] if a correction
/// is configured without `rollout_log_prob`; [`Error::OutOfRange`] for a bad
/// normalizer.
#[allow(clippy::too_many_arguments)]
pub fn clipped_policy_loss(
    cfg: &ClippedPolicyLoss,
    norm: &GlobalNorm,
    log_prob: Tensor<2>,
    old_log_prob: Tensor<2>,
    advantages: Tensor<2>,
    mask: &Tensor<2, Bool>,
    rollout_log_prob: Option<Tensor<2>>,
) -> Result<ClippedPolicyLossOutput, Error> {
    norm.validate()?;
    let dims = mask.dims();
    let [batch, seq] = dims;
    check_shape("log_probs", log_prob.dims(), dims)?;
    check_shape("old_log_probs", old_log_prob.dims(), dims)?;
    check_shape("advantages", advantages.dims(), dims)?;
    if let Some(r) = &rollout_log_prob {
        check_shape("rollout_log_probs", r.dims(), dims)?;
    }
    let rollout = match (cfg.correction(), rollout_log_prob) {
        (Some(_), None) => {
            return Err(Error::Invalid {
                input: "rollout_log_probs",
                rule: "required when the rollout IS correction is enabled",
            })
        }
        (Some(c), Some(r)) => Some((c, r)),
        (None, _) => None,
    };
    let maskf = mask.clone().float();
    let n_row = maskf.clone().sum_dim(1);
    let n_valid = count(mask);
    // Plain mean over valid tokens, 0 when none (the sums are then 0).
    let mean = |s: Tensor<1>| s / n_valid.clone().clamp_min(1.0);
    let clip = cfg.clip();
    let (tl, tg, clipped, rollout_kl) = match cfg.ratio_level() {
        RatioLevel::Token => {
            let t = ppo_clipped_surrogate(
                clip,
                ElemTensor(log_prob.clone()),
                ElemTensor(old_log_prob.clone()),
                ElemTensor(advantages),
            );
            let (l, g, kl) = match rollout {
                Some((c, r)) => {
                    let keep_seq = match c.kind {
                        RolloutIsKind::SequenceMask => {
                            let s = keep(old_log_prob.clone() - r.clone(), mask).sum_dim(1);
                            let rho = (s / n_row.clone()).exp();
                            rho.clone()
                                .greater_equal_elem(c.low)
                                .bool_and(rho.lower_equal_elem(c.high))
                                .expand(dims)
                        }
                        _ => mask.clone().bool_or(mask.clone().bool_not()),
                    };
                    let w = rollout_is_weight(
                        &c,
                        ElemTensor(old_log_prob.clone()),
                        ElemTensor(r.clone()),
                        &ElemMask(keep_seq),
                    );
                    let kl = mean(keep(r - old_log_prob.clone(), mask).sum());
                    (w.0.clone() * t.loss.0, w.0 * t.grad.0, Some(kl))
                }
                None => (t.loss.0, t.grad.0, None),
            };
            (keep(l, mask), keep(g, mask), t.clipped.0, kl)
        }
        RatioLevel::Sequence => {
            let base = match &rollout {
                Some((_, r)) => r.clone(),
                None => old_log_prob.clone(),
            };
            let x = keep(log_prob.clone() - base, mask).sum_dim(1) / n_row.clone().clamp_min(1.0);
            let x = x.expand(dims);
            let t = ppo_clipped_surrogate(
                clip,
                ElemTensor(x.clone()),
                ElemTensor(x.zeros_like()),
                ElemTensor(advantages),
            );
            (
                keep(t.loss.0, mask),
                keep(t.grad.0, mask),
                t.clipped.0,
                None,
            )
        }
    };
    let w = aggregation_weights(cfg.agg_mode(), &cfg.effective_norm(norm), mask)?;
    let value = weighted_sum(tl, mask, &w);
    let wg = keep(w * tg, mask);
    let grad = match cfg.ratio_level() {
        RatioLevel::Token => wg,
        RatioLevel::Sequence => {
            let per = wg.sum_dim(1) / n_row.clamp_min(1.0);
            keep(per.expand([batch, seq]), mask)
        }
    };
    Ok(ClippedPolicyLossOutput {
        loss: value,
        grad,
        clip_ratio: mean(count(&clipped.bool_and(mask.clone()))),
        approx_kl: mean(keep(old_log_prob - log_prob, mask).sum()),
        rollout_kl,
    })
}
