//! The PPO clipped policy loss with token- or sequence-level ratios and
//! importance-sampling correction against the rollout engine's log-probs.
//!
//! # Overview
//!
//! | setting | per-token loss | OpenRLHF `PolicyLoss` |
//! |---|---|---|
//! | [`RatioLevel::Token`] | [`ppo_clipped_surrogate`] of `r = exp(clamp(log π − log π_old, ±20))` | `policy_loss_type="ppo"` |
//! | [`RatioLevel::Sequence`] | the same surrogate of `s = exp(mean_valid(log π − log π_base))`, gradient through the mean | `policy_loss_type="gspo"` |
//! | [`RolloutIsKind::Truncate`] | `ℓ · clamp(e^{log π_old − log π_rollout}, low, high)` | `vllm_is_correction_type="tis"` |
//! | [`RolloutIsKind::TokenMask`] | `ℓ · e^{…}` where `low ≤ e^{…} ≤ high`, else 0 | `"icepop"` |
//! | [`RolloutIsKind::SequenceMask`] | `ℓ · e^{…}` in sequences whose geometric-mean ratio lies in `[low, high]`, else 0 | `"seq-mask-tis"` |
//!
//! The importance weight is a constant (detached). With a sequence-level
//! ratio and a correction enabled, the ratio is taken against the rollout
//! log-probs (`log π_base = log π_rollout`) and no token weight is applied.
//! The loss is aggregated per token (`token-mean`) or per sequence
//! (`seq-mean-token-mean`, forced for sequence-level ratios).
//!
//! # Peers
//!
//! OpenRLHF `PolicyLoss` (`openrlhf/models/loss.py`). Differences, all where
//! OpenRLHF produces NaN or inf: fully masked input gives 0 (loss, metrics,
//! gradient); the sequence log-ratio is clamped to the token clamp (±20)
//! before `exp` (OpenRLHF does not clamp it and overflows beyond ~709).
//!
//! # Example
//!
//! ```
//! use posttrain_core::aggregate::GlobalNorm;
//! use posttrain_core::policy::ppo::{clipped_policy_loss, ClippedPolicyLoss, RatioLevel};
//! use posttrain_core::policy::token::PolicyBatch;
//! use posttrain_core::policy::ClipConfig;
//! use posttrain_core::Dims;
//!
//! let clip = ClipConfig { eps_low: 0.2, eps_high: 0.2, dual_clip: None, log_ratio_clamp: Some(20.0) };
//! let cfg = ClippedPolicyLoss::new(clip, RatioLevel::Token, true, None)?;
//! let dims = Dims::new(1, 2);
//! let batch = PolicyBatch {
//!     dims,
//!     log_prob: &[-1.0f64, -2.0],
//!     old_log_prob: &[-1.0, -2.0],
//!     advantages: &[1.0, -1.0],
//!     mask: &[true, true],
//!     is_weights: None,
//! };
//! let mut scratch = vec![0.0; ClippedPolicyLoss::scratch_len(dims)];
//! let mut g = [0.0; 2];
//! let out = clipped_policy_loss(&cfg, &GlobalNorm::default(), &batch, None, &mut scratch, Some((1.0, &mut g)))?;
//! assert_eq!(out.loss, 0.0); // ratio 1: −(1·1 + 1·(−1)) / 2
//! assert_eq!(g, [-0.5, 0.5]);
//! # Ok::<(), posttrain_core::Error>(())
//! ```

use crate::aggregate::{aggregation_weights, weighted_sum, AggMode, GlobalNorm};
use crate::elem::{Elem, MaskElem, Real};
use crate::error::{check_len, check_param, Error};
use crate::shape::Dims;

use super::token::PolicyBatch;
use super::{ppo_clipped_surrogate, ClipConfig};

/// Where the importance ratio is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum RatioLevel {
    /// One ratio per token (PPO).
    Token,
    /// One ratio per sequence: the geometric mean of its token ratios (GSPO).
    Sequence,
}

/// How the rollout importance weight `ρ = exp(log π_old − log π_rollout)` corrects the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum RolloutIsKind {
    /// Truncated IS: `clamp(ρ, low, high)` (OpenRLHF `tis`).
    Truncate,
    /// Token masking: `ρ` where `low ≤ ρ ≤ high`, else 0 (OpenRLHF `icepop`).
    TokenMask,
    /// Sequence masking: `ρ` in sequences whose `exp(mean log ρ)` lies in
    /// `[low, high]`, else 0 (OpenRLHF `seq-mask-tis`; the token weight is
    /// not truncated).
    SequenceMask,
}

impl core::str::FromStr for RolloutIsKind {
    type Err = Error;
    /// Parses OpenRLHF's names `tis`, `icepop`, `seq-mask-tis`.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "tis" => Ok(RolloutIsKind::Truncate),
            "icepop" => Ok(RolloutIsKind::TokenMask),
            "seq-mask-tis" => Ok(RolloutIsKind::SequenceMask),
            _ => Err(Error::unknown_option(
                "rollout IS correction",
                s,
                "tis, icepop, seq-mask-tis",
            )),
        }
    }
}

/// A rollout importance-sampling correction and its bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RolloutIsCorrection {
    /// How the weight is applied.
    pub kind: RolloutIsKind,
    /// Lower bound (≥ 0).
    pub low: f64,
    /// Upper bound (≥ `low`).
    pub high: f64,
}

/// Configuration of [`clipped_policy_loss`], validated by [`ClippedPolicyLoss::new`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ClippedPolicyLoss {
    clip: ClipConfig,
    ratio: RatioLevel,
    token_level_loss: bool,
    correction: Option<RolloutIsCorrection>,
}

impl ClippedPolicyLoss {
    /// Builds and validates the configuration. A sequence-level ratio forces
    /// per-sequence aggregation (`token_level_loss = false`), as OpenRLHF does.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] for ε < 0, dual clip `c ≤ 1`, a non-positive
    /// clamp, or correction bounds with `low < 0` or `high < low`.
    pub fn new(
        clip: ClipConfig,
        ratio: RatioLevel,
        token_level_loss: bool,
        correction: Option<RolloutIsCorrection>,
    ) -> Result<Self, Error> {
        clip.validate()?;
        if let Some(c) = correction {
            check_param(
                c.low.is_finite() && c.low >= 0.0,
                "vllm_is_truncated_threshold[0]",
                c.low,
                "must be finite and ≥ 0",
            )?;
            check_param(
                !c.high.is_nan() && c.high >= c.low,
                "vllm_is_truncated_threshold[1]",
                c.high,
                "must be ≥ the lower threshold",
            )?;
        }
        Ok(ClippedPolicyLoss {
            clip,
            ratio,
            token_level_loss: token_level_loss && ratio == RatioLevel::Token,
            correction,
        })
    }

    /// OpenRLHF's `PolicyLoss(clip_eps_low, clip_eps_high, dual_clip, …)`:
    /// log-ratio clamp ±20.
    ///
    /// # Errors
    ///
    /// As [`ClippedPolicyLoss::new`].
    pub fn openrlhf(
        eps_low: f64,
        eps_high: f64,
        dual_clip: Option<f64>,
        ratio: RatioLevel,
        token_level_loss: bool,
        correction: Option<RolloutIsCorrection>,
    ) -> Result<Self, Error> {
        Self::new(
            ClipConfig {
                eps_low,
                eps_high,
                dual_clip,
                log_ratio_clamp: Some(20.0),
            },
            ratio,
            token_level_loss,
            correction,
        )
    }

    /// Re-checks a config that did not come from [`new`](Self::new) (a
    /// deserialized one: serde fills the fields directly).
    ///
    /// # Errors
    /// Those of [`new`](Self::new).
    pub fn validate(&self) -> Result<(), Error> {
        Self::new(
            self.clip,
            self.ratio,
            self.token_level_loss,
            self.correction,
        )
        .map(|_| ())
    }

    /// The scratch length [`clipped_policy_loss`] needs: `3 · batch · seq`.
    pub const fn scratch_len(dims: Dims) -> usize {
        3 * dims.len()
    }

    /// The surrogate's clip configuration.
    pub fn clip(&self) -> &ClipConfig {
        &self.clip
    }

    /// Where the ratio is formed.
    pub fn ratio_level(&self) -> RatioLevel {
        self.ratio
    }

    /// The rollout IS correction, if enabled.
    pub fn correction(&self) -> Option<RolloutIsCorrection> {
        self.correction
    }

    /// The normalizers actually used: `norm` with `dp_size = 1` unless the
    /// global count of the aggregation in use is given (`batch_num_tokens`
    /// for `token-mean`, `global_batch_size` otherwise), as in OpenRLHF.
    pub fn effective_norm(&self, norm: &GlobalNorm) -> GlobalNorm {
        let mut norm = *norm;
        let explicit = match self.agg_mode() {
            AggMode::TokenMean => norm.batch_num_tokens.is_some(),
            _ => norm.global_batch_size.is_some(),
        };
        if !explicit {
            norm.dp_size = 1.0;
        }
        norm
    }

    /// The aggregation used.
    pub fn agg_mode(&self) -> AggMode {
        if self.token_level_loss {
            AggMode::TokenMean
        } else {
            AggMode::SeqMeanTokenMean
        }
    }
}

/// The rollout importance weight of one token.
///
/// # Formula
///
/// `ρ = exp(min(log π_old − log π_rollout, 80))` (80: the safety cap
/// [`LOG_RATIO_SAFETY`](crate::policy::LOG_RATIO_SAFETY)); [`Truncate`](RolloutIsKind::Truncate):
/// `clamp(ρ, low, high)`; [`TokenMask`](RolloutIsKind::TokenMask): `ρ` if
/// `low ≤ ρ ≤ high` else 0; [`SequenceMask`](RolloutIsKind::SequenceMask):
/// `ρ` if `keep_sequence` else 0.
///
/// # Gradient
///
/// None: the weight is a constant.
pub fn rollout_is_weight<E: Elem>(
    c: &RolloutIsCorrection,
    old_log_prob: E,
    rollout_log_prob: E,
    keep_sequence: &E::Mask,
) -> E {
    // Safety cap (OpenRLHF has none): e^x overflows past 88 (f32) / 709 (f64).
    let d = old_log_prob.sub(rollout_log_prob);
    let rho = d.clone().min(d.full_like(super::LOG_RATIO_SAFETY)).exp();
    let zero = rho.full_like(0.0);
    match c.kind {
        RolloutIsKind::Truncate => rho.clamp(c.low, c.high),
        RolloutIsKind::TokenMask => {
            let keep = rho.ge_scalar(c.low).and(rho.le_scalar(c.high));
            E::select(&keep, rho, zero)
        }
        RolloutIsKind::SequenceMask => E::select(keep_sequence, rho, zero),
    }
}

/// The loss and OpenRLHF's metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClippedPolicyLossOutput<F> {
    /// The aggregated loss.
    pub loss: F,
    /// Share of valid tokens where the clipped branch is active (OpenRLHF `clip_ratio`).
    pub clip_ratio: F,
    /// Mean of `log π_old − log π` over valid tokens (unclamped; OpenRLHF `ppo_kl`).
    pub approx_kl: F,
    /// Mean of `log π_rollout − log π_old` over valid tokens when a
    /// token-level ratio is corrected (OpenRLHF `vllm_kl`), else `None`.
    pub rollout_kl: Option<F>,
}

/// The PPO clipped policy loss with optional sequence-level ratio and rollout
/// IS correction (see the [module docs](self)).
///
/// # Formula
///
/// Token level: `ℓᵢⱼ = ρᵢⱼ · surrogate(log πᵢⱼ − log π_oldᵢⱼ, Aᵢⱼ)`. Sequence level:
/// `x̄ᵢ = Σ_valid (log π − log π_base) / max(nᵢ, 1)`, `ℓᵢⱼ = surrogate(x̄ᵢ, Aᵢⱼ)`.
/// `L = Σ wᵢⱼ ℓᵢⱼ` with `token-mean` or `seq-mean-token-mean` weights `w`.
/// Without an explicit global count (`batch_num_tokens` in token mode,
/// `global_batch_size` in sequence mode) `dp_size` is ignored, as in OpenRLHF.
///
/// # Gradient
///
/// If `vjp = Some((c, grad))`: token level `grad = c·wᵢⱼ·ρᵢⱼ·∂ℓ/∂x`;
/// sequence level `gradᵢₖ = c·(Σⱼ wᵢⱼ ∂ℓᵢⱼ/∂x̄ᵢ) / max(nᵢ, 1)` for valid `k`.
///
/// # Peers
///
/// OpenRLHF `PolicyLoss.forward` (see [`ClippedPolicyLoss::openrlhf`]).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for a slice, scratch or gradient of the wrong
/// length; [`Error::Invalid`] if a correction is configured without
/// `rollout_log_prob`, or if `batch.is_weights` is given (OpenRLHF's
/// importance weights come from the configured correction, not from the
/// batch); [`Error::OutOfRange`] for a bad normalizer or config.
pub fn clipped_policy_loss<F: Real>(
    cfg: &ClippedPolicyLoss,
    norm: &GlobalNorm,
    batch: &PolicyBatch<'_, F>,
    rollout_log_prob: Option<&[F]>,
    scratch: &mut [F],
    vjp: Option<(F, &mut [F])>,
) -> Result<ClippedPolicyLossOutput<F>, Error> {
    cfg.validate()?;
    norm.validate()?;
    if batch.is_weights.is_some() {
        return Err(Error::Invalid {
            input: "is_weights",
            rule: "clipped_policy_loss takes its importance weights from the config's rollout correction (pass is_weights: None)",
        });
    }
    batch.check()?;
    let dims = batch.dims;
    let n = dims.len();
    check_len(
        "scratch",
        scratch.len(),
        ClippedPolicyLoss::scratch_len(dims),
    )?;
    if let Some(r) = rollout_log_prob {
        check_len("rollout_log_probs", r.len(), n)?;
    }
    let rollout = match (cfg.correction, rollout_log_prob) {
        (Some(_), None) => {
            return Err(Error::Invalid {
                input: "rollout_log_probs",
                rule: "required when the rollout IS correction is enabled",
            })
        }
        (Some(c), Some(r)) => Some((c, r)),
        (None, _) => None,
    };
    let mut vjp = vjp;
    if let Some((_, g)) = vjp.as_mut() {
        check_len("grad", g.len(), n)?;
    }
    let (tl, rest) = scratch.split_at_mut(n);
    let (tg, aux) = rest.split_at_mut(n);
    let mask = batch.mask;
    let (lp, old, adv) = (batch.log_prob, batch.old_log_prob, batch.advantages);

    let mut n_valid = 0usize;
    let mut n_clipped = 0usize;
    let mut kl_sum = F::zero();
    let mut rollout_kl_sum = F::zero();
    for row in 0..dims.batch {
        let range = dims.row(row);
        match cfg.ratio {
            RatioLevel::Token => {
                // Sequence filter of seq-mask-tis: exp(mean log ρ) in [low, high].
                let keep_seq = match rollout {
                    Some((c, r)) if c.kind == RolloutIsKind::SequenceMask => {
                        let (mut s, mut k) = (F::zero(), 0usize);
                        for i in range.clone() {
                            if mask[i] {
                                s += old[i] - r[i];
                                k += 1;
                            }
                        }
                        let rho = (s / F::of_usize(k)).exp();
                        rho >= F::of(c.low) && rho <= F::of(c.high)
                    }
                    _ => true,
                };
                for i in range {
                    if !mask[i] {
                        tl[i] = F::zero();
                        tg[i] = F::zero();
                        continue;
                    }
                    let t = ppo_clipped_surrogate(&cfg.clip, lp[i], old[i], adv[i]);
                    let (l, g) = match rollout {
                        Some((c, r)) => {
                            let w = rollout_is_weight(&c, old[i], r[i], &keep_seq);
                            rollout_kl_sum += r[i] - old[i];
                            (w * t.loss, w * t.grad)
                        }
                        None => (t.loss, t.grad),
                    };
                    tl[i] = l;
                    tg[i] = g;
                    n_valid += 1;
                    n_clipped += t.clipped as usize;
                    kl_sum += old[i] - lp[i];
                }
            }
            RatioLevel::Sequence => {
                let base = match rollout {
                    Some((_, r)) => r,
                    None => old,
                };
                let (mut s, mut k) = (F::zero(), 0usize);
                for i in range.clone() {
                    if mask[i] {
                        s += lp[i] - base[i];
                        k += 1;
                    }
                }
                let x = s / F::of_usize(k.max(1));
                for i in range {
                    if !mask[i] {
                        tl[i] = F::zero();
                        tg[i] = F::zero();
                        continue;
                    }
                    let t = ppo_clipped_surrogate(&cfg.clip, x, F::zero(), adv[i]);
                    tl[i] = t.loss;
                    tg[i] = t.grad;
                    n_valid += 1;
                    n_clipped += t.clipped as usize;
                    kl_sum += old[i] - lp[i];
                }
            }
        }
    }

    let mode = cfg.agg_mode();
    let norm = cfg.effective_norm(norm);
    aggregation_weights(mode, &norm, dims, mask, aux)?;
    let value = weighted_sum(tl, mask, aux)?;
    if let Some((c, g)) = vjp {
        match cfg.ratio {
            RatioLevel::Token => {
                for i in 0..n {
                    g[i] = if mask[i] {
                        c * aux[i] * tg[i]
                    } else {
                        F::zero()
                    };
                }
            }
            RatioLevel::Sequence => {
                for row in 0..dims.batch {
                    let range = dims.row(row);
                    let (mut s, mut k) = (F::zero(), 0usize);
                    for i in range.clone() {
                        if mask[i] {
                            s += aux[i] * tg[i];
                            k += 1;
                        }
                    }
                    let per = c * s / F::of_usize(k.max(1));
                    for i in range {
                        g[i] = if mask[i] { per } else { F::zero() };
                    }
                }
            }
        }
    }
    let mean = |s: F| {
        if n_valid == 0 {
            F::zero()
        } else {
            s / F::of_usize(n_valid)
        }
    };
    let corrected = rollout.is_some() && cfg.ratio == RatioLevel::Token;
    Ok(ClippedPolicyLossOutput {
        loss: value,
        clip_ratio: mean(F::of_usize(n_clipped)),
        approx_kl: mean(kl_sum),
        rollout_kl: corrected.then(|| mean(rollout_kl_sum)),
    })
}
