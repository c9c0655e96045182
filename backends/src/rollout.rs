//! Rollout correction on tensors: importance-sampling weights, rejection
//! masks, off-policy diagnostics, verl's bypass-mode policy loss and TRL's
//! vLLM importance-sampling ratio — the core's per-token kernels of
//! [`posttrain_core::policy::rollout`] on whole `[batch, seq]` tensors, with
//! the drivers' reductions (row sums, masked means, max/min, std) written as
//! tensor reductions.
//!
//! | op | core counterpart | peer |
//! |---|---|---|
//! | [`rollout_correction_weights`] | [`core::rollout_correction_weights`](posttrain_core::policy::rollout::rollout_correction_weights) | verl `compute_rollout_correction_weights` |
//! | [`rollout_rejection_mask`] | [`core::rollout_rejection_mask`](posttrain_core::policy::rollout::rollout_rejection_mask) | verl `compute_rollout_rejection_mask` |
//! | [`off_policy_metrics`] | [`core::off_policy_metrics`](posttrain_core::policy::rollout::off_policy_metrics) | verl `compute_offpolicy_metrics` |
//! | [`rollout_correction_and_rejection`] | [`core::rollout_correction_and_rejection`](posttrain_core::policy::rollout::rollout_correction_and_rejection) | verl `compute_rollout_correction_and_rejection_mask` |
//! | [`bypass_policy_loss`] | [`core::bypass_policy_loss`](posttrain_core::policy::rollout::bypass_policy_loss) | verl `compute_policy_loss_bypass_mode` |
//! | [`vllm_importance_sampling_ratio`] | [`core::vllm_importance_sampling_ratio`](posttrain_core::policy::rollout::vllm_importance_sampling_ratio) | TRL `GRPOTrainer` vLLM IS correction |
//!
//! Metrics come back as the core's metric structs holding `[1]` tensors
//! (convert with the `*_to_host` functions). Two things are read to the
//! host, both mask *metadata*: the valid-token count and the number of rows
//! with a valid token (they decide the all-masked early return and the
//! `n ≤ 1` / `n < 2` guards of the std metrics). The masked variance is
//! computed two-pass, `Σ(x − m)²/d + m²·1e-8/d` with `d = n + 1e-8` — the
//! same number as verl's `E[x²] − E[x]²` (the core accumulates that one in
//! f64 for the same reason: one-pass cancels catastrophically in f32).
//!
//! # Example
//!
//! ```
//! use posttrain_burn::{device, mask2, tensor2, to_vec, rollout::rollout_correction_weights};
//! use posttrain_core::policy::rollout::IsConfig;
//! let dev = device()?;
//! let cfg = IsConfig::new("token".parse()?, "2.0".parse()?, false)?;
//! let lr = tensor2(&[0.1, 1.0, f64::NAN], [1, 3], &dev)?;
//! let mask = mask2(&[true, true, false], [1, 3], &dev)?;
//! let (w, _metrics) = rollout_correction_weights(&cfg, lr, &mask)?;
//! let w = to_vec(w);
//! assert!((w[0] - 0.1f64.exp()).abs() < 1e-6);
//! assert_eq!((w[1], w[2]), (2.0, 0.0)); // truncated at 2; padding
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::util::Filled;
use burn::tensor::{Bool, Tensor};
use posttrain_core::policy::ppo_clipped_surrogate;
use posttrain_core::policy::rollout::{
    rejection_divergence, safe_importance_weight, threshold_importance_weight, BypassConfig,
    BypassLoss, Divergence, IsConfig, IsLevel, IsMetrics, NanSamplerLogProbs, OffPolicyMetrics,
    RejectionMetrics, RolloutCorrectionConfig, RolloutCorrectionMetrics, RsAggregation, RsConfig,
    RsOptionMetrics, VllmIsConfig, VllmIsMetrics, SAFETY_BOUND,
};
use posttrain_core::policy::token::log_prob_token;
use posttrain_core::Error;

use crate::aggregate::{aggregation_weights, weighted_sum};
use crate::elem::ElemTensor;
use crate::util::{check_shape, count, keep, nan_log_diff, to_vec, to_vec_bool};

/// verl's masked-mean epsilon.
const MEAN_EPS: f64 = 1e-8;

type T1 = Tensor<1>;
type T2 = Tensor<2>;
type M2 = Tensor<2, Bool>;

// ---------------------------------------------------------------------------
// reduction helpers (the core's `vmean`, `frac`, `Stats`, std helpers)
// ---------------------------------------------------------------------------

/// Host metadata of a mask: valid tokens per row.
fn row_counts(mask: &M2) -> Vec<usize> {
    let [b, s] = mask.dims();
    let v = to_vec_bool(mask.clone());
    (0..b)
        .map(|r| v[r * s..(r + 1) * s].iter().filter(|&&x| x).count())
        .collect()
}

/// A `[1]` tensor holding `v` on `like`'s device.
fn scalar(like: &T2, v: f64) -> T1 {
    crate::util::tensor1(&[v], &like.device())
}

/// `Σ / (n + 1e-8)` (the core's `vmean`).
fn vmean(sum: T1, n: usize) -> T1 {
    sum.div_scalar(n as f64 + MEAN_EPS)
}

/// `hits / total`, 0 when `total = 0` (the core's `frac`).
fn frac(hits: T1, total: usize) -> T1 {
    if total == 0 {
        hits.zeros_like()
    } else {
        hits.div_scalar(total as f64)
    }
}

fn masked_sum<const D: usize>(x: Tensor<D>, m: &Tensor<D, Bool>) -> T1 {
    keep(x, m).sum()
}

fn masked_max<const D: usize>(x: Tensor<D>, m: &Tensor<D, Bool>) -> T1 {
    x.filled(f64::NEG_INFINITY).mask_where(m.clone(), x).max()
}

fn masked_min<const D: usize>(x: Tensor<D>, m: &Tensor<D, Bool>) -> T1 {
    x.filled(f64::INFINITY).mask_where(m.clone(), x).min()
}

/// verl's masked std `sqrt(max(E[x²] − E[x]², 0))`, `E = Σ/(n + 1e-8)`,
/// computed two-pass (see the [module docs](self)); 0 for `n ≤ 1`.
fn verl_std<const D: usize>(x: Tensor<D>, m: &Tensor<D, Bool>, n: usize) -> T1 {
    let x = keep(x, m);
    if n <= 1 {
        return x.sum().zeros_like();
    }
    let d = n as f64 + MEAN_EPS;
    let mean = x.clone().sum().div_scalar(d);
    let dims = x.dims();
    let dev = keep(x - mean.clone().reshape([1; D]).expand(dims), m);
    let var =
        (dev.clone() * dev).sum().div_scalar(d) + (mean.clone() * mean).mul_scalar(MEAN_EPS / d);
    var.clamp_min(0.0).sqrt()
}

/// Unbiased std (torch `.std()`) over the selected entries; 0 for `n < 2`.
fn unbiased_std(x: T2, m: &M2, n: usize) -> T1 {
    let x = keep(x, m);
    if n < 2 {
        return x.sum().zeros_like();
    }
    let mean = x.clone().sum().div_scalar(n as f64);
    let dims = x.dims();
    let dev = keep(x - mean.reshape([1, 1]).expand(dims), m);
    (dev.clone() * dev).sum().div_scalar((n - 1) as f64).sqrt()
}

/// Row sums over valid positions, `[batch, 1]`.
fn row_sum(x: T2, m: &M2) -> T2 {
    keep(x, m).sum_dim(1)
}

fn check_all(dims: [usize; 2], inputs: &[(&'static str, [usize; 2])]) -> Result<(), Error> {
    for &(name, d) in inputs {
        check_shape(name, d, dims)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Importance-sampling weights
// ---------------------------------------------------------------------------

/// The rollout-correction importance weights and their diagnostics.
///
/// # Formula
///
/// As [`posttrain_core::policy::rollout::rollout_correction_weights`]:
/// `raw = exp(clamp(ℓ, ±20))` per token ([`safe_importance_weight`]) or of
/// the row sum `Σ_valid ℓ` (sequence level), then
/// [`threshold_importance_weight`] (TIS / IcePop), 0 on masked positions,
/// optionally divided by the batch mean; every `rollout_is_*` metric as the
/// core computes it (row means `Σ / (nᵢ + 1e-8)`, masked max/min, std).
///
/// # Gradient
///
/// None: the weights are constants of the loss.
///
/// # Peers
///
/// verl `compute_rollout_correction_weights`. All-masked: zero weights and
/// zero metrics (verl raises).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `log_ratio` and `mask` differ in shape;
/// [`Error::OutOfRange`] for an invalid threshold.
pub fn rollout_correction_weights(
    cfg: &IsConfig,
    log_ratio: T2,
    mask: &M2,
) -> Result<(T2, IsMetrics<T1>), Error> {
    let cfg = IsConfig::new(cfg.level, cfg.threshold, cfg.batch_normalize)?;
    let dims = mask.dims();
    let [batch, seq] = dims;
    check_shape("log_ratio", log_ratio.dims(), dims)?;
    let th = cfg.threshold;
    let rows = row_counts(mask);
    let n_valid: usize = rows.iter().sum();
    let z = || scalar(&log_ratio, 0.0);
    if n_valid == 0 || batch == 0 {
        let m = IsMetrics {
            mean: z(),
            ratio_fraction_high: z(),
            ratio_fraction_low: z(),
            max: z(),
            min: z(),
            std: z(),
            eff_sample_size: z(),
            seq_mean: z(),
            seq_std: z(),
            seq_max: z(),
            seq_min: z(),
            seq_max_deviation: z(),
            seq_fraction_high: z(),
            seq_fraction_low: z(),
            oob_ratio: th.lower.map(|_| z()),
            batch_norm_factor: cfg.batch_normalize.then(|| scalar(&log_ratio, 1.0)),
        };
        return Ok((log_ratio.zeros_like(), m));
    }
    let s = row_sum(log_ratio.clone(), mask); // [batch, 1]
    let raw = match cfg.level {
        IsLevel::Token => safe_importance_weight(ElemTensor(log_ratio)).0,
        IsLevel::Sequence => safe_importance_weight(ElemTensor(s.clone())).0.expand(dims),
    };
    let raw = keep(raw, mask);
    let w = keep(
        threshold_importance_weight(&th, ElemTensor(raw.clone())).0,
        mask,
    );
    let upper = th.upper;
    let lower = th.diagnostic_lower();
    let valid = |m: M2| count(&m.bool_and(mask.clone()));
    let hi = valid(raw.clone().greater_elem(upper));
    let lo = valid(raw.clone().lower_elem(lower));
    let oob = th.lower.map(|l| {
        let out = raw
            .clone()
            .lower_elem(l)
            .bool_or(raw.clone().greater_elem(upper));
        vmean(valid(out), n_valid)
    });
    let wc = w.clone().clamp(0.0, upper);
    let mean = vmean(masked_sum(w.clone(), mask), n_valid);
    let (ratio_fraction_high, ratio_fraction_low, max, min) = match cfg.level {
        IsLevel::Token => (
            vmean(hi, n_valid),
            vmean(lo, n_valid),
            masked_max(w.clone(), mask),
            masked_min(w.clone(), mask),
        ),
        IsLevel::Sequence => {
            let sh = count(&s.clone().greater_elem(upper.ln()));
            let sl = count(&s.clone().lower_elem(lower.ln()));
            (
                frac(sh, batch),
                frac(sl, batch),
                s.clone().max().clamp_max(SAFETY_BOUND).exp(),
                s.clone().min().clamp_max(SAFETY_BOUND).exp(),
            )
        }
    };
    let std = verl_std(wc.clone(), mask, n_valid);
    let mean_c = vmean(masked_sum(wc.clone(), mask), n_valid);
    let denom = mean_c.add_scalar(MEAN_EPS).reshape([1, 1]).expand(dims);
    let x = keep(wc / denom, mask);
    let norm2 = (x.clone() * x).sum();
    let ess = vmean(norm2.clone(), n_valid).recip();
    let eff_sample_size = ess.zeros_like().mask_where(norm2.greater_elem(0.0), ess);

    // Row means of the weights and of the raw weights, over every row.
    let n_row = mask.clone().float().sum_dim(1).add_scalar(MEAN_EPS);
    let row_mean = row_sum(w.clone(), mask) / n_row.clone();
    let raw_mean = row_sum(raw, mask) / n_row;
    let all_rows = row_mean.ones_like().greater_elem(0.0);
    let seq_mean = row_mean.clone().sum().div_scalar(batch as f64);
    let seq_std = unbiased_std(row_mean.clone(), &all_rows, batch);
    let seq_max_deviation = row_mean.clone().add_scalar(-1.0).abs().max();
    let mut m = IsMetrics {
        mean: mean.clone(),
        ratio_fraction_high,
        ratio_fraction_low,
        max,
        min,
        std,
        eff_sample_size,
        seq_mean,
        seq_std,
        seq_max: row_mean.clone().max(),
        seq_min: row_mean.clone().min(),
        seq_max_deviation,
        seq_fraction_high: frac(count(&raw_mean.clone().greater_elem(upper)), batch),
        seq_fraction_low: frac(count(&raw_mean.lower_elem(lower)), batch),
        oob_ratio: oob,
        batch_norm_factor: None,
    };
    let mut w = w;
    if cfg.batch_normalize {
        let wm = match cfg.level {
            IsLevel::Token => mean,
            IsLevel::Sequence => {
                // Mean of the row means over rows with a valid token.
                let live = mask.clone().float().sum_dim(1).greater_elem(0.0);
                let k = rows.iter().filter(|&&n| n > 0).count() as f64;
                keep(row_mean, &live).sum().div_scalar(k.max(MEAN_EPS))
            }
        };
        let ok = wm.clone().greater_elem(MEAN_EPS);
        let factor = wm.ones_like().mask_where(ok, wm);
        w = keep(
            w / factor.clone().reshape([1, 1]).expand([batch, seq]),
            mask,
        );
        m.batch_norm_factor = Some(factor);
    }
    Ok((w, m))
}

// ---------------------------------------------------------------------------
// Rejection mask
// ---------------------------------------------------------------------------

/// The rejection mask (`mask` with every token or sequence a criterion
/// rejects turned off) and its diagnostics.
///
/// # Formula
///
/// As [`posttrain_core::policy::rollout::rollout_rejection_mask`]: the
/// per-token divergence `d` of [`rejection_divergence`] on the whole tensor;
/// sequence options reduce it per row (`Σ`, `Σ/(n + 1e-8)`, or the masked
/// `max_dim`, 0 for an empty row) and broadcast the row value to its tokens;
/// k1 keeps `log lower ≤ stat ≤ log upper`, k2/k3 keep `stat ≤ upper`;
/// `keep = mask ∧ every criterion keeps`. Each criterion's metrics are the
/// core's, as tensor reductions.
///
/// # Gradient
///
/// None (a hard mask).
///
/// # Peers
///
/// verl `compute_rollout_rejection_mask` with `compute_rs_metrics`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `log_ratio` and `mask` differ in shape.
pub fn rollout_rejection_mask(
    cfg: &RsConfig,
    log_ratio: T2,
    mask: &M2,
) -> Result<(M2, RejectionMetrics<T1>), Error> {
    let dims = mask.dims();
    let [batch, _] = dims;
    check_shape("log_ratio", log_ratio.dims(), dims)?;
    let rows = row_counts(mask);
    let n_valid: usize = rows.iter().sum();
    let valid_rows = rows.iter().filter(|&&n| n > 0).count();
    let row_live = mask.clone().float().sum_dim(1).greater_elem(0.0); // [batch, 1]
    let n_row = mask.clone().float().sum_dim(1);
    let z = || scalar(&log_ratio, 0.0);
    let mut keep_all = mask.clone();
    let mut options: [Option<(_, RsOptionMetrics<T1>)>; 11] = Default::default();
    for (slot, crit) in options.iter_mut().zip(cfg.criteria()) {
        let opt = crit.option;
        let is_token = opt.aggregation == RsAggregation::Token;
        let k1 = opt.divergence == Divergence::K1;
        let (lo_b, up_b) = match crit.lower {
            Some(lo) => (lo.ln(), crit.upper.ln()),
            None => (0.0, crit.upper),
        };
        let clamp_min = if k1 { lo_b } else { 0.0 };
        let div = keep(
            rejection_divergence(opt.divergence, ElemTensor(log_ratio.clone())).0,
            mask,
        );
        // Row statistic, [batch, 1].
        let row_stat = match opt.aggregation {
            RsAggregation::SeqSum => div.clone().sum_dim(1),
            RsAggregation::SeqMean | RsAggregation::Token => {
                div.clone().sum_dim(1) / n_row.clone().add_scalar(MEAN_EPS)
            }
            RsAggregation::SeqMax => {
                let mx = div
                    .filled(f64::NEG_INFINITY)
                    .mask_where(mask.clone(), div.clone())
                    .max_dim(1);
                keep(mx, &row_live)
            }
        };
        if n_valid == 0 {
            let m = RsOptionMetrics {
                mean: z(),
                max: z(),
                min: z(),
                fraction_high: z(),
                fraction_low: z(),
                std: z(),
                seq_mean: z(),
                seq_std: z(),
                seq_max: z(),
                seq_min: z(),
                seq_max_deviation: z(),
                seq_fraction_high: z(),
                seq_fraction_low: k1.then(z),
                masked_fraction: z(),
                seq_masked_fraction: z(),
            };
            *slot = Some((opt, m));
            continue;
        }
        let stat = if is_token {
            div
        } else {
            row_stat.clone().expand(dims)
        };
        let stat = keep(stat, mask);
        let kept = if k1 {
            stat.clone()
                .greater_equal_elem(lo_b)
                .bool_and(stat.clone().lower_equal_elem(up_b))
        } else {
            stat.clone().lower_equal_elem(up_b)
        };
        let rejected = mask.clone().bool_and(kept.bool_not());
        keep_all = keep_all.bool_and(rejected.clone().bool_not());
        let valid = |m: M2| count(&m.bool_and(mask.clone()));
        let hi = valid(stat.clone().greater_elem(up_b));
        let lo = valid(stat.clone().lower_elem(lo_b));
        let rows_rejected = count(&rejected.clone().float().sum_dim(1).greater_elem(0.0));
        // Seq values: the row statistic over rows with a valid token.
        let sv_n = valid_rows;
        let sv_hi = count(
            &row_stat
                .clone()
                .greater_elem(up_b)
                .bool_and(row_live.clone()),
        );
        let sv_lo = count(&row_stat.clone().lower_elem(lo_b).bool_and(row_live.clone()));
        let sv_max = masked_max(row_stat.clone(), &row_live);
        let sv_min = masked_min(row_stat.clone(), &row_live);
        let (max, min, fraction_high, fraction_low) = if is_token {
            (
                masked_max(stat.clone(), mask),
                masked_min(stat.clone(), mask),
                vmean(hi, n_valid),
                if k1 { vmean(lo, n_valid) } else { z() },
            )
        } else {
            (
                sv_max.clone(),
                sv_min.clone(),
                frac(sv_hi.clone(), sv_n),
                if k1 { frac(sv_lo.clone(), sv_n) } else { z() },
            )
        };
        let m = RsOptionMetrics {
            mean: vmean(masked_sum(stat.clone(), mask), n_valid),
            max,
            min,
            fraction_high,
            fraction_low,
            std: verl_std(stat.clamp(clamp_min, up_b), mask, n_valid),
            seq_mean: masked_sum(row_stat.clone(), &row_live).div_scalar(sv_n.max(1) as f64),
            seq_std: unbiased_std(row_stat.clone(), &row_live, sv_n),
            seq_max: sv_max,
            seq_min: sv_min,
            seq_max_deviation: masked_max(row_stat.abs(), &row_live).clamp_min(0.0),
            seq_fraction_high: frac(sv_hi, sv_n),
            seq_fraction_low: k1.then(|| frac(sv_lo, sv_n)),
            masked_fraction: vmean(count(&rejected), n_valid),
            seq_masked_fraction: frac(rows_rejected, valid_rows),
        };
        *slot = Some((opt, m));
    }
    let lost = mask.clone().bool_and(keep_all.clone().bool_not());
    let rows_hit = count(&lost.clone().float().sum_dim(1).greater_elem(0.0));
    let out = RejectionMetrics {
        options,
        masked_fraction: vmean(count(&lost), n_valid),
        seq_masked_fraction: frac(rows_hit, batch),
    };
    Ok((keep_all, out))
}

// ---------------------------------------------------------------------------
// Off-policy metrics
// ---------------------------------------------------------------------------

/// Off-policy diagnostics between `log π` and the rollout `log μ`.
///
/// # Formula
///
/// As [`posttrain_core::policy::rollout::off_policy_metrics`] (every field of
/// [`OffPolicyMetrics`]), with `ℓ = log π − log μ`, the k3 term from
/// [`rejection_divergence`] and the `exp(clamp(·, ±20))` of
/// [`safe_importance_weight`]; row means `Σ / (nᵢ + 1e-8)`, means over all rows.
///
/// # Gradient
///
/// None (diagnostics).
///
/// # Peers
///
/// verl `compute_offpolicy_metrics` (exponents clamped to ±20). All-masked: zeros.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for inputs whose shape differs from the mask's.
pub fn off_policy_metrics(
    log_prob: T2,
    rollout_log_prob: T2,
    mask: &M2,
) -> Result<OffPolicyMetrics<T1>, Error> {
    let dims = mask.dims();
    let [batch, _] = dims;
    check_all(
        dims,
        &[
            ("old_log_prob", log_prob.dims()),
            ("rollout_log_prob", rollout_log_prob.dims()),
        ],
    )?;
    let n_valid: usize = row_counts(mask).iter().sum();
    let z = || scalar(&log_prob, 0.0);
    if n_valid == 0 || batch == 0 {
        return Ok(OffPolicyMetrics {
            training_ppl: z(),
            training_log_ppl: z(),
            kl: z(),
            k3_kl: z(),
            rollout_ppl: z(),
            rollout_log_ppl: z(),
            log_ppl_diff: z(),
            log_ppl_abs_diff: z(),
            log_ppl_diff_max: z(),
            log_ppl_diff_min: z(),
            ppl_ratio: z(),
            chi2_token: z(),
            chi2_seq: z(),
        });
    }
    let (p, q) = (keep(log_prob, mask), keep(rollout_log_prob, mask));
    let l = p.clone() - q.clone();
    let kl = vmean(masked_sum(q.clone() - p.clone(), mask), n_valid);
    let k3 = rejection_divergence(Divergence::K3, ElemTensor(l.clone())).0;
    let rho = safe_importance_weight(ElemTensor(l.clone())).0;
    let chi = vmean(masked_sum(rho.clone() * rho, mask), n_valid).add_scalar(-1.0);
    let b = batch as f64;
    let n_row = mask.clone().float().sum_dim(1).add_scalar(MEAN_EPS);
    let mp = p.sum_dim(1) / n_row.clone();
    let mq = q.sum_dim(1) / n_row;
    let d = mq.clone() - mp.clone();
    let safe = |x: T2| safe_importance_weight(ElemTensor(x)).0;
    let s = keep(l, mask).sum_dim(1).clamp(-SAFETY_BOUND, SAFETY_BOUND);
    Ok(OffPolicyMetrics {
        training_ppl: safe(mp.clone().neg()).sum().div_scalar(b),
        training_log_ppl: mp.neg().sum().div_scalar(b),
        kl,
        k3_kl: vmean(masked_sum(k3, mask), n_valid),
        rollout_ppl: safe(mq.clone().neg()).sum().div_scalar(b),
        rollout_log_ppl: mq.neg().sum().div_scalar(b),
        log_ppl_diff: d.clone().sum().div_scalar(b),
        log_ppl_abs_diff: d.clone().abs().sum().div_scalar(b),
        log_ppl_diff_max: d.clone().max(),
        log_ppl_diff_min: d.clone().min(),
        ppl_ratio: safe(d).sum().div_scalar(b),
        chi2_token: chi,
        chi2_seq: s.mul_scalar(2.0).exp().sum().div_scalar(b).add_scalar(-1.0),
    })
}

// ---------------------------------------------------------------------------
// Combined
// ---------------------------------------------------------------------------

/// What [`rollout_correction_and_rejection`] returns.
#[derive(Debug, Clone)]
pub struct Correction {
    /// The IS weights (`None` when IS is off).
    pub weights: Option<T2>,
    /// The rejection-adjusted mask (`mask` when rejection is off).
    pub keep: M2,
    /// The diagnostics.
    pub metrics: RolloutCorrectionMetrics<T1>,
}

/// IS weights, rejection mask and off-policy diagnostics from `log π` and
/// the rollout `log μ`.
///
/// # Formula
///
/// `ℓ = log π − log μ`, then [`rollout_correction_weights`] (if `cfg.is`),
/// [`rollout_rejection_mask`] (if `cfg.rs`) and [`off_policy_metrics`], all
/// on the original `mask` — as
/// [`posttrain_core::policy::rollout::rollout_correction_and_rejection`].
///
/// # Gradient
///
/// None.
///
/// # Peers
///
/// verl `compute_rollout_correction_and_rejection_mask`.
///
/// # Errors
///
/// As the three parts.
pub fn rollout_correction_and_rejection(
    cfg: &RolloutCorrectionConfig,
    log_prob: T2,
    rollout_log_prob: T2,
    mask: &M2,
) -> Result<Correction, Error> {
    let dims = mask.dims();
    check_all(
        dims,
        &[
            ("old_log_prob", log_prob.dims()),
            ("rollout_log_prob", rollout_log_prob.dims()),
        ],
    )?;
    let lr = log_prob.clone() - rollout_log_prob.clone();
    let (weights, is) = match &cfg.is {
        Some(c) => {
            let (w, m) = rollout_correction_weights(c, lr.clone(), mask)?;
            (Some(w), Some(m))
        }
        None => (None, None),
    };
    let (keep, rs) = match &cfg.rs {
        Some(c) => {
            let (k, m) = rollout_rejection_mask(c, lr, mask)?;
            (k, Some(m))
        }
        None => (mask.clone(), None),
    };
    let off_policy = off_policy_metrics(log_prob, rollout_log_prob, mask)?;
    Ok(Correction {
        weights,
        keep,
        metrics: RolloutCorrectionMetrics { is, rs, off_policy },
    })
}

// ---------------------------------------------------------------------------
// Bypass-mode policy loss
// ---------------------------------------------------------------------------

/// The loss, gradient and metrics of [`bypass_policy_loss`].
#[derive(Debug, Clone)]
pub struct BypassOutput {
    /// The aggregated loss, `[1]`.
    pub loss: T1,
    /// `∂loss/∂log π`, `[batch, seq]` (0 outside the kept tokens).
    pub grad: T2,
    /// PPO-clip: share of kept tokens on the clipped branch.
    pub pg_clipfrac: Option<T1>,
    /// PPO-clip: share of kept tokens where the dual clip is active.
    pub pg_clipfrac_lower: Option<T1>,
    /// Masked mean over kept tokens of `−x` (PPO-clip, clamped) or `log μ − log π`.
    pub ppo_kl: T1,
    /// The IS weights, rejection mask and diagnostics (on the original mask).
    pub correction: Correction,
}

/// verl's bypass-mode policy loss on tensors.
///
/// # Formula
///
/// As [`posttrain_core::policy::rollout::bypass_policy_loss`]:
/// `(w, keep) =` [`rollout_correction_and_rejection`]`(log π, log μ, mask)`;
/// PPO-clip: `ℓ =` [`ppo_clipped_surrogate`]`(log π, log μ, A)`; REINFORCE:
/// `ℓ = w ·` [`log_prob_token`]`(log π, log μ, A).loss` (`w = 1` without
/// IS); `L = Σ a·ℓ` with the aggregation weights `a` of `agg` on `keep`.
///
/// # Gradient
///
/// `a · ∂ℓ/∂log π` on kept tokens (weights and mask are constants).
///
/// # Peers
///
/// verl `compute_policy_loss_bypass_mode`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for shapes; [`Error::OutOfRange`] for bad
/// normalizers or thresholds.
pub fn bypass_policy_loss(
    cfg: &BypassConfig,
    log_prob: T2,
    rollout_log_prob: T2,
    advantages: T2,
    mask: &M2,
) -> Result<BypassOutput, Error> {
    let dims = mask.dims();
    check_all(
        dims,
        &[
            ("log_prob", log_prob.dims()),
            ("old_log_prob", rollout_log_prob.dims()),
            ("advantages", advantages.dims()),
        ],
    )?;
    let correction = rollout_correction_and_rejection(
        &cfg.correction,
        log_prob.clone(),
        rollout_log_prob.clone(),
        mask,
    )?;
    let kept = correction.keep.clone();
    let n_keep: usize = row_counts(&kept).iter().sum();
    let (tl, tg, kl, clip, dual) = match &cfg.loss {
        BypassLoss::PpoClip(c) => {
            let s = ppo_clipped_surrogate(
                c,
                ElemTensor(log_prob),
                ElemTensor(rollout_log_prob),
                ElemTensor(advantages),
            );
            let kl = masked_sum(s.log_ratio.0.neg(), &kept);
            let clip = count(&s.clipped.0.bool_and(kept.clone()));
            let dual = count(&s.dual_clipped.0.bool_and(kept.clone()));
            (s.loss.0, s.grad.0, kl, Some(clip), Some(dual))
        }
        BypassLoss::Reinforce => {
            let t = log_prob_token(
                ElemTensor(log_prob),
                ElemTensor(rollout_log_prob),
                ElemTensor(advantages),
            );
            let kl = masked_sum(t.kl.0, &kept);
            let (l, g) = match &correction.weights {
                Some(w) => (t.loss.0 * w.clone(), t.grad.0 * w.clone()),
                None => (t.loss.0, t.grad.0),
            };
            (l, g, kl, None, None)
        }
    };
    let tl = keep(tl, &kept);
    let a = aggregation_weights(cfg.agg, &cfg.norm, &kept)?;
    let loss = weighted_sum(tl, &kept, &a);
    let grad = keep(tg * a, &kept);
    Ok(BypassOutput {
        loss,
        grad,
        pg_clipfrac: clip.map(|c| vmean(c, n_keep)),
        pg_clipfrac_lower: dual.map(|c| vmean(c, n_keep)),
        ppo_kl: vmean(kl, n_keep),
        correction,
    })
}

// ---------------------------------------------------------------------------
// TRL: vLLM importance-sampling ratio
// ---------------------------------------------------------------------------

/// TRL's vLLM importance-sampling ratio with its metrics. The ratio is
/// `[batch, seq]` for token modes and `[batch, 1]` for sequence modes.
///
/// # Formula
///
/// As [`posttrain_core::policy::rollout::vllm_importance_sampling_ratio`]:
/// `d = select(mask, nan(old − sampling), 0)` with `nan` the
/// [`NanSamplerLogProbs`] choice (as is, TRL f2cd577; `nan_to_num`, TRL
/// 1.16.0); token modes `ratio = `[`VllmIsConfig::ratio`]`(d)` (padding gets
/// `ratio(0)`), sequence modes `ratioᵢ = ratio(Σₜ dᵢₜ)`; ratio metrics over
/// valid tokens (token modes) or all rows (sequence modes), the
/// log-prob-difference metrics over valid tokens (TRL 1.16.0: those whose
/// difference is not NaN), 0 when empty.
///
/// # Gradient
///
/// None (TRL computes it under `no_grad`).
///
/// # Peers
///
/// TRL `GRPOTrainer` (`vllm_importance_sampling_mode`).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for inputs whose shape differs from the mask's;
/// [`Error::OutOfRange`] for invalid bounds.
pub fn vllm_importance_sampling_ratio(
    cfg: &VllmIsConfig,
    old_log_prob: T2,
    sampling_log_prob: T2,
    mask: &M2,
) -> Result<(T2, VllmIsMetrics<T1>), Error> {
    let cfg = VllmIsConfig::new(cfg.mode, cfg.clip_min, cfg.clip_max)?
        .with_nan_sampler_log_probs(cfg.nan_sampler_log_probs);
    let dims = mask.dims();
    let [batch, _] = dims;
    check_all(
        dims,
        &[
            ("old_per_token_logps", old_log_prob.dims()),
            ("sampling_per_token_logps", sampling_log_prob.dims()),
        ],
    )?;
    let n_valid: usize = row_counts(mask).iter().sum();
    let raw = old_log_prob - sampling_log_prob;
    // The log-prob-difference metrics: every valid token, or (TRL 1.16.0)
    // those whose difference is not NaN.
    let (delta, delta_mask) = match cfg.nan_sampler_log_probs {
        NanSamplerLogProbs::Propagate => (keep(raw.clone(), mask).abs(), mask.clone()),
        NanSamplerLogProbs::AsOnPolicy => {
            let m = mask.clone().bool_and(raw.clone().is_nan().bool_not());
            (keep(raw.clone(), &m).abs(), m)
        }
    };
    let n_delta: usize = row_counts(&delta_mask).iter().sum();
    let d = keep(nan_log_diff(cfg.nan_sampler_log_probs, raw), mask);
    let or_zero = |x: T1, n: usize| if n == 0 { x.zeros_like() } else { x };
    let logp_difference_mean =
        masked_sum(delta.clone(), &delta_mask).div_scalar(n_delta.max(1) as f64);
    let logp_difference_max = or_zero(masked_max(delta, &delta_mask), n_delta);
    let (ratio, rmin, rmean, rmax) = if cfg.mode.is_sequence() {
        let r = cfg.ratio(ElemTensor(d.sum_dim(1))).0;
        (
            r.clone(),
            or_zero(r.clone().min(), batch),
            r.clone().sum().div_scalar(batch.max(1) as f64),
            or_zero(r.max(), batch),
        )
    } else {
        let r = cfg.ratio(ElemTensor(d)).0;
        (
            r.clone(),
            or_zero(masked_min(r.clone(), mask), n_valid),
            masked_sum(r.clone(), mask).div_scalar(n_valid.max(1) as f64),
            or_zero(masked_max(r, mask), n_valid),
        )
    };
    Ok((
        ratio,
        VllmIsMetrics {
            num_items: n_valid,
            logp_difference_mean,
            logp_difference_max,
            ratio_min: rmin,
            ratio_mean: rmean,
            ratio_max: rmax,
        },
    ))
}

// ---------------------------------------------------------------------------
// Host conversion of the metric structs
// ---------------------------------------------------------------------------

fn h(t: T1) -> f64 {
    to_vec(t)[0]
}

/// [`IsMetrics`] of `[1]` tensors to host `f64`s (one read per field).
pub fn is_metrics_to_host(m: IsMetrics<T1>) -> IsMetrics<f64> {
    IsMetrics {
        mean: h(m.mean),
        ratio_fraction_high: h(m.ratio_fraction_high),
        ratio_fraction_low: h(m.ratio_fraction_low),
        max: h(m.max),
        min: h(m.min),
        std: h(m.std),
        eff_sample_size: h(m.eff_sample_size),
        seq_mean: h(m.seq_mean),
        seq_std: h(m.seq_std),
        seq_max: h(m.seq_max),
        seq_min: h(m.seq_min),
        seq_max_deviation: h(m.seq_max_deviation),
        seq_fraction_high: h(m.seq_fraction_high),
        seq_fraction_low: h(m.seq_fraction_low),
        oob_ratio: m.oob_ratio.map(h),
        batch_norm_factor: m.batch_norm_factor.map(h),
    }
}

/// [`RejectionMetrics`] of `[1]` tensors to host `f64`s.
pub fn rejection_metrics_to_host(m: RejectionMetrics<T1>) -> RejectionMetrics<f64> {
    let mut options = [None; 11];
    for (slot, o) in options.iter_mut().zip(m.options) {
        *slot = o.map(|(opt, om)| {
            (
                opt,
                RsOptionMetrics {
                    mean: h(om.mean),
                    max: h(om.max),
                    min: h(om.min),
                    fraction_high: h(om.fraction_high),
                    fraction_low: h(om.fraction_low),
                    std: h(om.std),
                    seq_mean: h(om.seq_mean),
                    seq_std: h(om.seq_std),
                    seq_max: h(om.seq_max),
                    seq_min: h(om.seq_min),
                    seq_max_deviation: h(om.seq_max_deviation),
                    seq_fraction_high: h(om.seq_fraction_high),
                    seq_fraction_low: om.seq_fraction_low.map(h),
                    masked_fraction: h(om.masked_fraction),
                    seq_masked_fraction: h(om.seq_masked_fraction),
                },
            )
        });
    }
    RejectionMetrics {
        options,
        masked_fraction: h(m.masked_fraction),
        seq_masked_fraction: h(m.seq_masked_fraction),
    }
}

/// [`OffPolicyMetrics`] of `[1]` tensors to host `f64`s.
pub fn off_policy_metrics_to_host(m: OffPolicyMetrics<T1>) -> OffPolicyMetrics<f64> {
    OffPolicyMetrics {
        training_ppl: h(m.training_ppl),
        training_log_ppl: h(m.training_log_ppl),
        kl: h(m.kl),
        k3_kl: h(m.k3_kl),
        rollout_ppl: h(m.rollout_ppl),
        rollout_log_ppl: h(m.rollout_log_ppl),
        log_ppl_diff: h(m.log_ppl_diff),
        log_ppl_abs_diff: h(m.log_ppl_abs_diff),
        log_ppl_diff_max: h(m.log_ppl_diff_max),
        log_ppl_diff_min: h(m.log_ppl_diff_min),
        ppl_ratio: h(m.ppl_ratio),
        chi2_token: h(m.chi2_token),
        chi2_seq: h(m.chi2_seq),
    }
}

/// [`RolloutCorrectionMetrics`] of `[1]` tensors to host `f64`s.
pub fn correction_metrics_to_host(
    m: RolloutCorrectionMetrics<T1>,
) -> RolloutCorrectionMetrics<f64> {
    RolloutCorrectionMetrics {
        is: m.is.map(is_metrics_to_host),
        rs: m.rs.map(rejection_metrics_to_host),
        off_policy: off_policy_metrics_to_host(m.off_policy),
    }
}

/// [`VllmIsMetrics`] of `[1]` tensors to host `f64`s.
pub fn vllm_metrics_to_host(m: VllmIsMetrics<T1>) -> VllmIsMetrics<f64> {
    VllmIsMetrics {
        num_items: m.num_items,
        logp_difference_mean: h(m.logp_difference_mean),
        logp_difference_max: h(m.logp_difference_max),
        ratio_min: h(m.ratio_min),
        ratio_mean: h(m.ratio_mean),
        ratio_max: h(m.ratio_max),
    }
}
