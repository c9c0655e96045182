//! Token-level policy-gradient losses: PPO and the variants verl registers
//! as `loss_mode`s, with rollout importance weights, global normalizers, the
//! peers' metrics and the closed-form gradient with respect to `log π`.
//!
//! # Overview
//!
//! Every variant turns the per-token inputs `log π` (trainable), `log π_old`,
//! `A` (and an optional constant importance weight `w`) into a per-token loss
//! `ℓ`, which [`aggregate`](crate::aggregate) reduces to a scalar. With
//! `x = log π − log π_old` and `r = eˣ`:
//!
//! | [`PolicyLoss`] variant | per-token loss `ℓ` | verl `loss_mode` |
//! |---|---|---|
//! | [`Ppo`](PolicyLoss::Ppo) | clipped surrogate, clip-higher, dual clip ([`ppo_clipped_surrogate`]) | `vanilla` |
//! | [`DivergenceTv`](PolicyLoss::DivergenceTv) | `−A·sg(min(r, c))·log π` where `π − π_old` stays in the trust region | `dppo_tv` |
//! | [`DivergenceKl`](PolicyLoss::DivergenceKl) | the same with the binary-KL trust region | `dppo_kl` |
//! | [`SequenceRatio`](PolicyLoss::SequenceRatio) | clipped surrogate of the per-sequence geometric-mean ratio (straight-through per token) | `gspo` |
//! | [`SoftGate`](PolicyLoss::SoftGate) | `−A·(4/τ)·σ(τ(r − 1))` | `sapo` |
//! | [`LogProb`](PolicyLoss::LogProb) | `−A·log π` (REINFORCE) | `gpg`, `compute_policy_loss_reinforce` |
//! | [`ClipCov`](PolicyLoss::ClipCov) | clipped surrogate with high-covariance tokens detached | `clip_cov` |
//! | [`KlCov`](PolicyLoss::KlCov) | `−A·r`, plus `κ·|x|` on the top-covariance tokens | `kl_cov` |
//! | [`GeometricMean`](PolicyLoss::GeometricMean) | `−Ā·exp(mean clipped x)` per sequence | `geo_mean` |
//! | [`QuadraticPenalty`](PolicyLoss::QuadraticPenalty) | `−(A·log π − β/2·x²)` | `dro` |
//! | [`ClippedWeight`](PolicyLoss::ClippedWeight) | `−sg(clip(r))·A·log π` | `cispo` |
//!
//! [`policy_loss`] is the slice driver: it runs the per-token kernel (each
//! written once over [`Elem`]), the cross-token parts (sequence ratios,
//! covariance selection), the importance weights and the aggregation, and
//! returns the loss with verl's metrics ([`PolicyLossOutput`]) and, on
//! request, `∂L/∂log π` times the loss cotangent.
//!
//! # Masking
//!
//! Masked positions are never read into a value or a gradient (selection, not
//! multiplication), so padding may hold NaN or ±inf. Fully masked input gives
//! loss 0, gradient 0 and metrics 0 (verl returns NaN for some modes there).
//!
//! # Peers
//!
//! [`PolicyLoss::from_verl`] maps verl's `ActorConfig` fields onto a variant,
//! exactly as `core_algos.py` reads them (`clip_ratio_low/high` falling back
//! to `clip_ratio`, and so on). Deliberate differences from verl, each only
//! visible where verl overflows: `clip_cov` and `kl_cov` clamp the log-ratio
//! (and `geo_mean` its per-sequence mean) to ±20 before `exp` (verl does not,
//! and returns ±inf beyond |x| ≈ 709, or ≈ 88 in f32), and the random choice
//! of `clip_cov` is made deterministic (see [`PolicyLoss::ClipCov`]).
//!
//! # Example
//!
//! ```
//! use posttrain_core::aggregate::{AggMode, GlobalNorm};
//! use posttrain_core::policy::token::{policy_loss, PolicyBatch, PolicyLoss, PolicyLossMode, VerlPolicyParams};
//! use posttrain_core::Dims;
//!
//! let mode: PolicyLossMode = "vanilla".parse()?;
//! let loss = PolicyLoss::from_verl(mode, &VerlPolicyParams::default())?;
//! let dims = Dims::new(1, 3);
//! let batch = PolicyBatch {
//!     dims,
//!     log_prob: &[-1.0f64, -0.5, f64::NAN],
//!     old_log_prob: &[-1.1, -0.4, 0.0],
//!     advantages: &[1.0, -1.0, 0.0],
//!     mask: &[true, true, false],
//!     is_weights: None,
//! };
//! let mut scratch = vec![0.0; PolicyLoss::scratch_len(dims)];
//! let mut grad = [0.0; 3];
//! let out = policy_loss(&loss, AggMode::TokenMean, &GlobalNorm::default(), &batch, &mut scratch, Some((1.0, &mut grad)))?;
//! assert!(out.loss.is_finite());
//! assert_eq!(grad[2], 0.0);
//! # Ok::<(), posttrain_core::Error>(())
//! ```

use crate::aggregate::{aggregation_weights, weighted_sum, AggMode, GlobalNorm};
use crate::elem::{Elem, ElemExt, MaskElem, Real};
use crate::error::{check_len, check_param, Error};
use crate::shape::Dims;

use super::{ppo_clipped_surrogate, ClipConfig};

/// The log-ratio clamp verl and OpenRLHF apply before `exp` (`±20`).
pub const LOG_RATIO_CLAMP: f64 = 20.0;

/// verl's `+1e-8` in `masked_mean` denominators.
const MEAN_EPS: f64 = 1e-8;

/// The names of verl's policy-loss registry (`actor.policy_loss.loss_mode`)
/// that [`PolicyLoss`] implements. `bypass_mode` is a rollout-correction
/// wrapper around `vanilla`/REINFORCE and lives in [`super::rollout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum PolicyLossMode {
    /// `vanilla`: PPO clipped surrogate with dual clip.
    Vanilla,
    /// `dppo_tv`: DPPO with the total-variation trust region.
    DppoTv,
    /// `dppo_kl`: DPPO with the binary-KL trust region.
    DppoKl,
    /// `gspo`: sequence-level ratio.
    Gspo,
    /// `sapo`: soft gate.
    Sapo,
    /// `gpg`: plain `−A·log π`.
    Gpg,
    /// `clip_cov`: covariance-based detaching.
    ClipCov,
    /// `kl_cov`: covariance-based KL penalty.
    KlCov,
    /// `geo_mean`: geometric-mean policy optimization (GMPO).
    GeoMean,
    /// `dro`: quadratic log-ratio penalty.
    Dro,
    /// `cispo`: clipped, detached importance weight on `log π`.
    Cispo,
}

impl PolicyLossMode {
    /// Every mode, in declaration order.
    pub const ALL: [PolicyLossMode; 11] = [
        PolicyLossMode::Vanilla,
        PolicyLossMode::DppoTv,
        PolicyLossMode::DppoKl,
        PolicyLossMode::Gspo,
        PolicyLossMode::Sapo,
        PolicyLossMode::Gpg,
        PolicyLossMode::ClipCov,
        PolicyLossMode::KlCov,
        PolicyLossMode::GeoMean,
        PolicyLossMode::Dro,
        PolicyLossMode::Cispo,
    ];

    /// verl's name for the mode.
    pub fn name(self) -> &'static str {
        match self {
            PolicyLossMode::Vanilla => "vanilla",
            PolicyLossMode::DppoTv => "dppo_tv",
            PolicyLossMode::DppoKl => "dppo_kl",
            PolicyLossMode::Gspo => "gspo",
            PolicyLossMode::Sapo => "sapo",
            PolicyLossMode::Gpg => "gpg",
            PolicyLossMode::ClipCov => "clip_cov",
            PolicyLossMode::KlCov => "kl_cov",
            PolicyLossMode::GeoMean => "geo_mean",
            PolicyLossMode::Dro => "dro",
            PolicyLossMode::Cispo => "cispo",
        }
    }
}

impl core::str::FromStr for PolicyLossMode {
    type Err = Error;
    /// Parses verl's `loss_mode` names; anything else is [`Error::UnknownOption`].
    fn from_str(s: &str) -> Result<Self, Error> {
        PolicyLossMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                Error::unknown_option(
                    "policy loss mode",
                    s,
                    "vanilla, dppo_tv, dppo_kl, gspo, sapo, gpg, clip_cov, kl_cov, geo_mean, dro, cispo",
                )
            })
    }
}

/// verl's actor configuration fields read by the policy losses, named as verl
/// names them. [`Default`] is verl's `ActorConfig` default.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct VerlPolicyParams {
    /// `clip_ratio` (ε), also the fallback of the two below. Default 0.2.
    pub clip_ratio: f64,
    /// `clip_ratio_low`; `None` → `clip_ratio`.
    pub clip_ratio_low: Option<f64>,
    /// `clip_ratio_high`; `None` → `clip_ratio`.
    pub clip_ratio_high: Option<f64>,
    /// `clip_ratio_c`: dual-clip bound (vanilla) or ratio truncation (dppo). Default 3.
    pub clip_ratio_c: f64,
    /// `tau_pos` of SAPO. Default 1.
    pub tau_pos: f64,
    /// `tau_neg` of SAPO. Default 1.05.
    pub tau_neg: f64,
    /// `clip_cov_ratio`. Default 0.0002.
    pub clip_cov_ratio: f64,
    /// `clip_cov_lb`. Default 1.
    pub clip_cov_lb: f64,
    /// `clip_cov_ub`. Default 5.
    pub clip_cov_ub: f64,
    /// `kl_cov_ratio`. Default 0.0002.
    pub kl_cov_ratio: f64,
    /// `ppo_kl_coef` of kl_cov. Default 0.1.
    pub ppo_kl_coef: f64,
    /// `dro_beta`; required (> 0) by `dro`. Default `None`.
    pub dro_beta: Option<f64>,
    /// GSPO honours `loss_agg_mode` (verl 0.9.1) instead of forcing
    /// `seq-mean-token-mean` (verl 1dda039, the vectors' commit; the default).
    pub gspo_honor_loss_agg_mode: bool,
}

impl Default for VerlPolicyParams {
    fn default() -> Self {
        VerlPolicyParams {
            clip_ratio: 0.2,
            clip_ratio_low: None,
            clip_ratio_high: None,
            clip_ratio_c: 3.0,
            tau_pos: 1.0,
            tau_neg: 1.05,
            clip_cov_ratio: 0.0002,
            clip_cov_lb: 1.0,
            clip_cov_ub: 5.0,
            kl_cov_ratio: 0.0002,
            ppo_kl_coef: 0.1,
            dro_beta: None,
            gspo_honor_loss_agg_mode: false,
        }
    }
}

/// A token-level policy loss with its parameters (see the
/// [module docs](self) for the table of variants and peers).
///
/// Build one with [`PolicyLoss::from_verl`] or directly, then call
/// [`PolicyLoss::validate`] (the driver [`policy_loss`] validates too).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum PolicyLoss {
    /// The PPO clipped surrogate [`ppo_clipped_surrogate`] (verl `vanilla`:
    /// log-ratio clamp 20, dual clip `clip_ratio_c`).
    ///
    /// Metrics: `clipfrac` = share of `−A·clip(r) > −A·r` (strict),
    /// `clipfrac_lower` = share where the dual clip is active,
    /// `approx_kl` = mean of `−x` (clamped).
    Ppo(ClipConfig),
    /// DPPO-Binary-TV: `ℓ = −A·sg(min(r, c))·log π` on tokens whose probability
    /// change `π − π_old` stays `≤ ε_high` (for `A > 0`) or `≥ −ε_low`
    /// (for `A ≤ 0`), 0 elsewhere. Note: `log π`, not `r`.
    ///
    /// Metrics: `clipfrac` = share outside the trust region,
    /// `clipfrac_lower` = share inside it with `r > c`, `approx_kl` = mean `−x`.
    DivergenceTv(DivergenceConfig),
    /// DPPO-Binary-KL: as [`DivergenceTv`](Self::DivergenceTv) with the
    /// trust region `KL_bin(π_old ‖ π) ≤ ε_high` or `π ≤ π_old` (`A > 0`),
    /// `KL_bin ≤ ε_low` or `π ≥ π_old` (`A ≤ 0`), where
    /// `KL_bin = p_old·(log p_old − log p) + (1 − p_old)·log((1 − p_old + 1e-8)/(1 − p + 1e-8))`.
    DivergenceKl(DivergenceConfig),
    /// GSPO (verl): each token's ratio is the sequence's geometric-mean ratio
    /// `s = exp(min(mean_valid x, 10))`, with the gradient flowing straight
    /// through each token (`log s_t = sg(log s) + log π_t − sg(log π_t)`).
    /// The clipped surrogate of `s` (no dual clip), aggregated with
    /// `seq-mean-token-mean` whatever `loss_agg_mode` asks when
    /// `force_seq_mean_token_mean` (verl at 1dda039, the vectors' commit),
    /// with the requested mode otherwise (verl 0.9.1); the normalizers apply
    /// either way.
    ///
    /// Metrics: `clipfrac` (strict, as PPO), `clipfrac_lower` = 0,
    /// `approx_kl` = mean `−x` (unclamped).
    SequenceRatio {
        /// `ε_low`.
        eps_low: f64,
        /// `ε_high`.
        eps_high: f64,
        /// Upper clamp of the sequence log-ratio (verl: 10).
        max_log_ratio: f64,
        /// Aggregate with `seq-mean-token-mean` regardless of the requested
        /// mode (verl 1dda039); `false`: honour it (verl 0.9.1).
        force_seq_mean_token_mean: bool,
    },
    /// SAPO: `ℓ = −A·(4/τ)·σ(τ·(r − 1))` with `τ = τ_pos` where `A > 0`,
    /// else `τ_neg` (so `A = 0` uses `τ_neg`); log-ratio clamped to ±20;
    /// always aggregated with `seq-mean-token-mean`.
    ///
    /// Metrics: `clipfrac = clipfrac_lower = 0`, `approx_kl` = mean `−x` (clamped).
    SoftGate {
        /// `τ_pos > 0`.
        tau_pos: f64,
        /// `τ_neg > 0`.
        tau_neg: f64,
    },
    /// REINFORCE / GPG: `ℓ = −A·log π` (times the importance weight if given).
    ///
    /// Metrics: `approx_kl` = mean of `log π_old − log π` (verl's
    /// `compute_policy_loss_reinforce` reports it with the rollout log-probs
    /// as `log π_old`; `gpg` reports nothing).
    LogProb,
    /// Clip-Cov: the PPO clipped surrogate (no dual clip) where the tokens
    /// with centred covariance `(A − Ā)(log π − mean log π)` strictly inside
    /// `(lb, ub)` — among valid tokens not already clipped — are detached
    /// (loss and gradient 0), at most `max(⌊ratio·N⌋, 1)` of them.
    ///
    /// verl draws those tokens at random when there are more candidates than
    /// that; posttrain takes the ones with the **largest covariance** (ties:
    /// lowest flat index), which agrees with verl whenever every candidate
    /// is taken.
    ///
    /// Metrics: `clipfrac` = share of detached tokens, `approx_kl` = mean `−x`.
    ClipCov {
        /// The surrogate (verl: no log-ratio clamp — posttrain clamps at 20, no dual clip).
        clip: ClipConfig,
        /// `clip_cov_ratio > 0`.
        ratio: f64,
        /// `clip_cov_lb`.
        lb: f64,
        /// `clip_cov_ub`.
        ub: f64,
    },
    /// KL-Cov: `ℓ = −A·r` everywhere, plus `κ·|x|` on the
    /// `max(⌊ratio·N⌋, 1)` valid tokens with the largest covariance
    /// `(A − Ā)(log π − mean log π)` (plain means over valid tokens; ties:
    /// lowest flat index).
    ///
    /// Metrics: `approx_kl` = mean `|x|` (verl logs it as `ppo_kl`).
    KlCov {
        /// `kl_cov_ratio > 0` (the count is capped at the valid tokens).
        ratio: f64,
        /// `ppo_kl_coef` κ.
        coef: f64,
        /// Log-ratio clamp before `exp` (verl: none; posttrain preset: 20).
        log_ratio_clamp: Option<f64>,
    },
    /// GMPO: per sequence `Lᵢ = −Āᵢ·exp(Σ x̃ / (nᵢ + 1e-8))·w̄ᵢ` with
    /// `x̃ = sgn(A)·min(sgn(A)·x, sgn(A)·clamp(x, −ε_low, ε_high))`,
    /// `Āᵢ = Σ A / (nᵢ + 1e-8)` and the sequence IS weight
    /// `w̄ᵢ = exp(Σ log(w + 1e-10) / (nᵢ + 1e-8))`; the loss is the plain mean
    /// over **all** rows (aggregation mode and normalizers ignored, fully
    /// masked rows count). posttrain clamps the mean clipped log-ratio to
    /// ±20 before `exp` (zero gradient beyond; verl does not clamp, and
    /// overflows there for `A < 0`, whose unclipped side is unbounded).
    ///
    /// Metrics: `clipfrac` = share with `x` clipped and `A > 0`,
    /// `clipfrac_lower` = clipped and `A < 0`, `approx_kl` = mean `−x`.
    GeometricMean {
        /// `ε_low`.
        eps_low: f64,
        /// `ε_high`.
        eps_high: f64,
    },
    /// DRO: `ℓ = −(A·log π − β/2·x²)` (no clamp).
    ///
    /// Metrics: `approx_kl` = mean `−x`.
    QuadraticPenalty {
        /// `β > 0`.
        beta: f64,
    },
    /// CISPO (verl meaning): `ℓ = −sg(clip(r, 1 − ε_low, 1 + ε_high))·A·log π`,
    /// log-ratio clamped to ±20.
    ///
    /// Metrics: `clipfrac` = share with `r` outside the range (either side),
    /// `clipfrac_lower` = 0, `approx_kl` = mean `−x`.
    ClippedWeight {
        /// `ε_low`.
        eps_low: f64,
        /// `ε_high`.
        eps_high: f64,
    },
}

/// Parameters of the DPPO trust-region losses.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DivergenceConfig {
    /// Divergence allowed downwards (`A ≤ 0` side), ≥ 0.
    pub eps_low: f64,
    /// Divergence allowed upwards (`A > 0` side), ≥ 0.
    pub eps_high: f64,
    /// Truncation `c > 0` of the detached ratio `min(r, c)` (verl `clip_ratio_c`).
    pub truncation: f64,
}

fn check_eps(name: &'static str, v: f64) -> Result<(), Error> {
    check_param(v.is_finite() && v >= 0.0, name, v, "must be finite and ≥ 0")
}

fn check_pos(name: &'static str, v: f64) -> Result<(), Error> {
    check_param(v.is_finite() && v > 0.0, name, v, "must be finite and > 0")
}

impl PolicyLoss {
    /// The variant verl's `loss_mode` selects, with its parameters read from
    /// the actor config as verl reads them, validated.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] for a parameter out of range (`clip_ratio_c ≤ 1`
    /// for `vanilla`, negative ε, `τ ≤ 0`, `clip_cov_ratio ≤ 0`,
    /// `kl_cov_ratio ≤ 0`); [`Error::Invalid`] if `dro` has no `dro_beta`.
    pub fn from_verl(mode: PolicyLossMode, p: &VerlPolicyParams) -> Result<Self, Error> {
        let lo = p.clip_ratio_low.unwrap_or(p.clip_ratio);
        let hi = p.clip_ratio_high.unwrap_or(p.clip_ratio);
        let loss = match mode {
            PolicyLossMode::Vanilla => PolicyLoss::Ppo(ClipConfig {
                eps_low: lo,
                eps_high: hi,
                dual_clip: Some(p.clip_ratio_c),
                log_ratio_clamp: Some(LOG_RATIO_CLAMP),
            }),
            PolicyLossMode::DppoTv | PolicyLossMode::DppoKl => {
                let cfg = DivergenceConfig {
                    eps_low: lo,
                    eps_high: hi,
                    truncation: p.clip_ratio_c,
                };
                if mode == PolicyLossMode::DppoTv {
                    PolicyLoss::DivergenceTv(cfg)
                } else {
                    PolicyLoss::DivergenceKl(cfg)
                }
            }
            PolicyLossMode::Gspo => PolicyLoss::SequenceRatio {
                eps_low: lo,
                eps_high: hi,
                max_log_ratio: 10.0,
                force_seq_mean_token_mean: !p.gspo_honor_loss_agg_mode,
            },
            PolicyLossMode::Sapo => PolicyLoss::SoftGate {
                tau_pos: p.tau_pos,
                tau_neg: p.tau_neg,
            },
            PolicyLossMode::Gpg => PolicyLoss::LogProb,
            PolicyLossMode::ClipCov => PolicyLoss::ClipCov {
                clip: ClipConfig {
                    eps_low: lo,
                    eps_high: hi,
                    dual_clip: None,
                    log_ratio_clamp: Some(LOG_RATIO_CLAMP),
                },
                ratio: p.clip_cov_ratio,
                lb: p.clip_cov_lb,
                ub: p.clip_cov_ub,
            },
            PolicyLossMode::KlCov => PolicyLoss::KlCov {
                ratio: p.kl_cov_ratio,
                coef: p.ppo_kl_coef,
                log_ratio_clamp: Some(LOG_RATIO_CLAMP),
            },
            PolicyLossMode::GeoMean => PolicyLoss::GeometricMean {
                eps_low: lo,
                eps_high: hi,
            },
            PolicyLossMode::Dro => PolicyLoss::QuadraticPenalty {
                beta: p.dro_beta.ok_or(Error::Invalid {
                    input: "dro_beta",
                    rule: "the dro loss needs dro_beta > 0",
                })?,
            },
            PolicyLossMode::Cispo => PolicyLoss::ClippedWeight {
                eps_low: lo,
                eps_high: hi,
            },
        };
        loss.validate()?;
        Ok(loss)
    }

    /// Checks every parameter's range.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] naming the parameter: ε < 0, dual clip `c ≤ 1`,
    /// truncation ≤ 0, `τ ≤ 0`, covariance ratios ≤ 0, `β ≤ 0`, non-finite values.
    pub fn validate(&self) -> Result<(), Error> {
        match *self {
            PolicyLoss::Ppo(ref c) => c.validate(),
            PolicyLoss::DivergenceTv(c) | PolicyLoss::DivergenceKl(c) => {
                check_eps("clip_ratio_low", c.eps_low)?;
                check_eps("clip_ratio_high", c.eps_high)?;
                check_pos("clip_ratio_c", c.truncation)
            }
            PolicyLoss::SequenceRatio {
                eps_low,
                eps_high,
                max_log_ratio,
                ..
            } => {
                check_eps("clip_ratio_low", eps_low)?;
                check_eps("clip_ratio_high", eps_high)?;
                check_param(
                    !max_log_ratio.is_nan(),
                    "max_log_ratio",
                    max_log_ratio,
                    "must not be NaN",
                )
            }
            PolicyLoss::SoftGate { tau_pos, tau_neg } => {
                for (name, tau) in [("tau_pos", tau_pos), ("tau_neg", tau_neg)] {
                    check_param(
                        tau.is_finite() && tau >= super::grpo::SAPO_MIN_TEMPERATURE,
                        name,
                        tau,
                        "must be finite and ≥ 1e-6 (the loss scales as 2/τ)",
                    )?;
                }
                Ok(())
            }
            PolicyLoss::LogProb => Ok(()),
            PolicyLoss::ClipCov {
                ref clip,
                ratio,
                lb,
                ub,
            } => {
                clip.validate()?;
                check_pos("clip_cov_ratio", ratio)?;
                check_param(!lb.is_nan(), "clip_cov_lb", lb, "must not be NaN")?;
                check_param(!ub.is_nan(), "clip_cov_ub", ub, "must not be NaN")
            }
            PolicyLoss::KlCov {
                ratio,
                coef,
                log_ratio_clamp,
            } => {
                check_pos("kl_cov_ratio", ratio)?;
                check_param(coef.is_finite(), "ppo_kl_coef", coef, "must be finite")?;
                if let Some(k) = log_ratio_clamp {
                    check_pos("log_ratio_clamp", k)?;
                }
                Ok(())
            }
            PolicyLoss::GeometricMean { eps_low, eps_high }
            | PolicyLoss::ClippedWeight { eps_low, eps_high } => {
                check_eps("clip_ratio_low", eps_low)?;
                check_eps("clip_ratio_high", eps_high)
            }
            PolicyLoss::QuadraticPenalty { beta } => check_pos("dro_beta", beta),
        }
    }

    /// Whether every token's loss depends on that token alone (so a single
    /// fused pass computes it: [`crate::fused::token_loss`]). `false` for
    /// the variants that need row or batch statistics first: GSPO
    /// (sequence ratio), geometric mean, Clip-Cov and KL-Cov.
    pub const fn is_token_local(&self) -> bool {
        !matches!(
            self,
            PolicyLoss::SequenceRatio { .. }
                | PolicyLoss::GeometricMean { .. }
                | PolicyLoss::ClipCov { .. }
                | PolicyLoss::KlCov { .. }
        )
    }

    /// The scratch length [`policy_loss`] needs: `3 · batch · seq`.
    pub const fn scratch_len(dims: Dims) -> usize {
        3 * dims.len()
    }

    /// The aggregation this variant actually uses when `requested` is asked
    /// for: `seq-mean-token-mean` for SAPO and for GSPO with
    /// `force_seq_mean_token_mean` (as verl forces it), `requested`
    /// otherwise. ([`GeometricMean`](Self::GeometricMean) has its own
    /// reduction.)
    pub fn effective_agg(&self, requested: AggMode) -> AggMode {
        match self {
            PolicyLoss::SequenceRatio {
                force_seq_mean_token_mean: true,
                ..
            }
            | PolicyLoss::SoftGate { .. } => AggMode::SeqMeanTokenMean,
            _ => requested,
        }
    }

    /// One token's loss, gradient and metric indicators for the variants whose
    /// loss depends on that token alone (all but
    /// [`SequenceRatio`](Self::SequenceRatio) and
    /// [`GeometricMean`](Self::GeometricMean), which need a row reduction
    /// first — see [`sequence_ratio_surrogate`] and [`geometric_clipped_log_ratio`]).
    /// For [`ClipCov`](Self::ClipCov) and [`KlCov`](Self::KlCov) this is the
    /// loss before the covariance selection.
    ///
    /// # Formula
    ///
    /// See each variant.
    ///
    /// # Gradient
    ///
    /// `grad = ∂ℓ/∂log π` holding `log π_old`, `A` and every `sg(·)` constant.
    ///
    /// # Example
    ///
    /// ```
    /// use posttrain_core::policy::token::PolicyLoss;
    /// let t = PolicyLoss::LogProb.token(-0.5f64, -0.4, 2.0);
    /// assert_eq!((t.loss, t.grad), (1.0, -2.0));
    /// ```
    #[inline(always)]
    pub fn token<E: Elem>(&self, log_prob: E, old_log_prob: E, advantage: E) -> PolicyToken<E> {
        match *self {
            PolicyLoss::Ppo(ref c) => {
                clipped_token(c, c.log_ratio_clamp, log_prob, old_log_prob, advantage)
            }
            // verl's clip_cov reports the unclamped log-ratio.
            PolicyLoss::ClipCov { clip: ref c, .. } => {
                clipped_token(c, None, log_prob, old_log_prob, advantage)
            }
            PolicyLoss::DivergenceTv(c) => {
                divergence_masked_token(&c, false, log_prob, old_log_prob, advantage)
            }
            PolicyLoss::DivergenceKl(c) => {
                divergence_masked_token(&c, true, log_prob, old_log_prob, advantage)
            }
            PolicyLoss::SequenceRatio {
                eps_low,
                eps_high,
                max_log_ratio,
                ..
            } => {
                // Alone, a token is its own sequence.
                let x = log_prob.sub(old_log_prob);
                let kl = x.clone().neg();
                let mut t =
                    sequence_ratio_surrogate(eps_low, eps_high, max_log_ratio, x, advantage);
                t.kl = kl;
                t
            }
            PolicyLoss::SoftGate { tau_pos, tau_neg } => {
                soft_gated_token(tau_pos, tau_neg, log_prob, old_log_prob, advantage)
            }
            PolicyLoss::LogProb => log_prob_token(log_prob, old_log_prob, advantage),
            PolicyLoss::KlCov {
                log_ratio_clamp, ..
            } => {
                let x = log_prob.sub(old_log_prob);
                let (loss, grad) = kl_cov_base(&x, &advantage, log_ratio_clamp);
                let none = never(&x);
                PolicyToken {
                    loss,
                    grad,
                    clipped: none.clone(),
                    clipped_lower: none,
                    kl: x.abs(),
                }
            }
            PolicyLoss::GeometricMean { eps_low, eps_high } => {
                // Alone, a token is its own sequence: −A·exp(x̃).
                let x = log_prob.sub(old_log_prob);
                let g =
                    geometric_clipped_log_ratio(eps_low, eps_high, x.clone(), advantage.clone());
                let r = g.clipped_log_ratio.exp();
                let neg_a = advantage.neg();
                PolicyToken {
                    loss: neg_a.clone().mul(r.clone()),
                    grad: neg_a.mul(r).mul(g.grad),
                    clipped: g.clipped_high,
                    clipped_lower: g.clipped_low,
                    kl: x.neg(),
                }
            }
            PolicyLoss::QuadraticPenalty { beta } => {
                quadratic_penalty_token(beta, log_prob, old_log_prob, advantage)
            }
            PolicyLoss::ClippedWeight { eps_low, eps_high } => {
                clipped_weight_token(eps_low, eps_high, log_prob, old_log_prob, advantage)
            }
        }
    }
}

/// One token's policy loss, its gradient and the indicators its metrics count.
#[derive(Debug, Clone)]
pub struct PolicyToken<E: Elem> {
    /// The per-token loss `ℓ`.
    pub loss: E,
    /// `∂ℓ/∂log π`.
    pub grad: E,
    /// Counted by `clipfrac` (verl `pg_clipfrac`).
    pub clipped: E::Mask,
    /// Counted by `clipfrac_lower` (verl `pg_clipfrac_lower`).
    pub clipped_lower: E::Mask,
    /// The token's term of the approximate-KL metric (verl `ppo_kl`): `−x`,
    /// or `|x|` for KL-Cov.
    pub kl: E,
}

/// [`PolicyLoss::Ppo`]'s token: [`ppo_clipped_surrogate`] with verl's
/// metrics, the approximate-KL term `−x` clamped to `kl_clamp`.
#[inline(always)]
pub(crate) fn clipped_token<E: Elem>(
    c: &ClipConfig,
    kl_clamp: Option<f64>,
    log_prob: E,
    old_log_prob: E,
    advantage: E,
) -> PolicyToken<E> {
    let kl = neg_log_ratio(&log_prob, &old_log_prob, kl_clamp);
    let t = ppo_clipped_surrogate(c, log_prob, old_log_prob, advantage);
    PolicyToken {
        loss: t.loss,
        grad: t.grad,
        clipped: t.clipped,
        clipped_lower: t.dual_clipped,
        kl,
    }
}

#[inline(always)]
fn never<E: Elem>(like: &E) -> E::Mask {
    let z = like.full_like(0.0);
    z.gt(&z)
}

#[inline(always)]
fn neg_log_ratio<E: Elem>(log_prob: &E, old: &E, clamp: Option<f64>) -> E {
    let x = log_prob.clone().sub(old.clone());
    match clamp {
        Some(k) => x.clamp(-k, k).neg(),
        None => x.neg(),
    }
}

/// `(x clamped, live)`: the clamped log-ratio and where the clamp is inactive.
#[inline(always)]
fn clamped_log_ratio<E: Elem>(x: E, k: f64) -> (E, E::Mask) {
    let live = x.ge_scalar(-k).and(x.le_scalar(k));
    (x.clamp(-k, k), live)
}

/// DPPO (verl `dppo_tv` / `dppo_kl`) for one token.
///
/// # Formula
///
/// ```text
/// x = clamp(log π − log π_old, ±20),  r = eˣ,  p = e^{log π},  p_old = e^{log π_old}
/// TV:  ok₊ = p − p_old ≤ ε_high,              ok₋ = p − p_old ≥ −ε_low
/// KL:  ok₊ = KL_bin ≤ ε_high ∨ p ≤ p_old,     ok₋ = KL_bin ≤ ε_low ∨ p ≥ p_old
/// ok = ok₊ if A > 0 else ok₋
/// ℓ  = −A·sg(min(r, c))·log π  where ok, else 0
/// ```
///
/// # Gradient
///
/// `∂ℓ/∂log π = −A·min(r, c)` where ok, else 0 (the ratio and the trust-region
/// test are detached).
///
/// # Peers
///
/// verl `compute_policy_loss_dppo_tv` / `_dppo_kl`; metrics `clipped` =
/// outside the region, `clipped_lower` = inside with `r > c`.
#[inline(always)]
pub fn divergence_masked_token<E: Elem>(
    cfg: &DivergenceConfig,
    binary_kl: bool,
    log_prob: E,
    old_log_prob: E,
    advantage: E,
) -> PolicyToken<E> {
    let (x, _) = clamped_log_ratio(log_prob.clone().sub(old_log_prob.clone()), LOG_RATIO_CLAMP);
    let kl = x.clone().neg();
    let r = x.exp();
    let truncated = r.clone().clamp(f64::NEG_INFINITY, cfg.truncation);
    let p = log_prob.clone().exp();
    let p_old = old_log_prob.clone().exp();
    let (ok_pos, ok_neg) = if binary_kl {
        let one_minus_old = p_old.clone().neg().add_scalar(1.0);
        let one_minus_p = p.clone().neg().add_scalar(1.0);
        let tail = one_minus_old
            .clone()
            .add_scalar(1e-8)
            .div(one_minus_p.add_scalar(1e-8))
            .ln();
        let bkl = p_old
            .clone()
            .mul(old_log_prob.sub(log_prob.clone()))
            .add(one_minus_old.mul(tail));
        let up = p_old.ge(&p);
        let down = p.ge(&p_old);
        (
            bkl.le_scalar(cfg.eps_high).or(up),
            bkl.le_scalar(cfg.eps_low).or(down),
        )
    } else {
        let d = p.sub(p_old);
        (d.le_scalar(cfg.eps_high), d.ge_scalar(-cfg.eps_low))
    };
    let pos = advantage.gt_scalar(0.0);
    let ok = pos.clone().and(ok_pos).or(pos.not().and(ok_neg));
    let zero = advantage.full_like(0.0);
    let coef = advantage.neg().mul(truncated);
    let loss = E::select(&ok, coef.clone().mul(log_prob), zero.clone());
    let grad = E::select(&ok, coef, zero);
    let over = r.gt_scalar(cfg.truncation);
    PolicyToken {
        loss,
        grad,
        clipped: ok.clone().not(),
        clipped_lower: ok.and(over),
        kl,
    }
}

/// The clipped surrogate of a sequence-level log-ratio (verl GSPO) for one
/// token of that sequence.
///
/// # Formula
///
/// ```text
/// x̄ = Σ_valid (log π − log π_old) / max(n, 1)       (per sequence, by the caller)
/// s  = exp(min(x̄, m))
/// ℓ  = max(−A·s, −A·clip(s, 1 − ε_low, 1 + ε_high))
/// ```
///
/// # Gradient
///
/// Straight-through per token (`log s_t = sg(x̄) + log π_t − sg(log π_t)`):
/// `∂ℓ/∂log π_t = −A·s` on the unclipped branch, 0 where clipped or where
/// `x̄ > m`.
///
/// # Peers
///
/// verl `compute_policy_loss_gspo` (`m = 10`).
pub fn sequence_ratio_surrogate<E: Elem>(
    eps_low: f64,
    eps_high: f64,
    max_log_ratio: f64,
    seq_log_ratio: E,
    advantage: E,
) -> PolicyToken<E> {
    let live = seq_log_ratio.le_scalar(max_log_ratio);
    let x = seq_log_ratio.clamp(f64::NEG_INFINITY, max_log_ratio);
    let zero = x.full_like(0.0);
    let cfg = ClipConfig {
        eps_low,
        eps_high,
        dual_clip: None,
        log_ratio_clamp: None,
    };
    let t = ppo_clipped_surrogate(&cfg, x, zero.clone(), advantage);
    let none = never(&zero);
    PolicyToken {
        loss: t.loss,
        grad: E::select(&live, t.grad, zero.clone()),
        clipped: t.clipped,
        clipped_lower: none,
        kl: zero,
    }
}

/// SAPO's soft-gated surrogate for one token.
///
/// # Formula
///
/// ```text
/// x = clamp(log π − log π_old, ±20),  r = eˣ,  τ = τ_pos if A > 0 else τ_neg
/// ℓ = −A·(4/τ)·σ(τ·(r − 1))
/// ```
///
/// # Gradient
///
/// `∂ℓ/∂log π = −A·4·σ(z)·σ(−z)·r` with `z = τ(r − 1)`; 0 where the clamp is active.
///
/// # Peers
///
/// verl `compute_policy_loss_sapo`.
#[inline(always)]
pub fn soft_gated_token<E: Elem>(
    tau_pos: f64,
    tau_neg: f64,
    log_prob: E,
    old_log_prob: E,
    advantage: E,
) -> PolicyToken<E> {
    let (x, live) = clamped_log_ratio(log_prob.sub(old_log_prob), LOG_RATIO_CLAMP);
    let kl = x.clone().neg();
    let r = x.exp();
    let pos = advantage.gt_scalar(0.0);
    let tau = E::select(&pos, r.full_like(tau_pos), r.full_like(tau_neg));
    let z = tau.clone().mul(r.clone().add_scalar(-1.0));
    let s = z.clone().sigmoid();
    let s_neg = z.neg().sigmoid();
    let gate = s.clone().mul_scalar(4.0).div(tau);
    let neg_a = advantage.neg();
    let loss = neg_a.clone().mul(gate);
    let zero = r.full_like(0.0);
    let grad = neg_a.mul(s).mul(s_neg).mul_scalar(4.0).mul(r);
    let none = never(&zero);
    PolicyToken {
        loss,
        grad: E::select(&live, grad, zero),
        clipped: none.clone(),
        clipped_lower: none,
        kl,
    }
}

/// REINFORCE for one token: `ℓ = −A·log π`.
///
/// # Gradient
///
/// `∂ℓ/∂log π = −A`.
///
/// # Peers
///
/// verl `gpg` and `compute_policy_loss_reinforce`; `kl = log π_old − log π`.
#[inline(always)]
pub fn log_prob_token<E: Elem>(log_prob: E, old_log_prob: E, advantage: E) -> PolicyToken<E> {
    let kl = old_log_prob.sub(log_prob.clone());
    let neg_a = advantage.neg();
    let none = never(&kl);
    PolicyToken {
        loss: neg_a.clone().mul(log_prob),
        grad: neg_a,
        clipped: none.clone(),
        clipped_lower: none,
        kl,
    }
}

/// KL-Cov's base term `−A·r` and, with [`kl_cov_penalty`], its penalized term.
#[inline(always)]
fn kl_cov_base<E: Elem>(x: &E, advantage: &E, clamp: Option<f64>) -> (E, E) {
    let (xc, live) = match clamp {
        Some(k) => {
            let (xc, live) = clamped_log_ratio(x.clone(), k);
            (xc, Some(live))
        }
        None => (x.clone(), None),
    };
    let r = xc.exp();
    let l = advantage.clone().neg().mul(r);
    let g = match live {
        Some(live) => E::select(&live, l.clone(), l.full_like(0.0)),
        None => l.clone(),
    };
    (l, g)
}

/// KL-Cov's penalty `κ·|x|` and its derivative `κ·sgn(x)` (0 at `x = 0`).
pub fn kl_cov_penalty<E: Elem>(coef: f64, log_prob: E, old_log_prob: E) -> (E, E) {
    let x = log_prob.sub(old_log_prob);
    let one = x.full_like(1.0);
    let sgn = E::select(
        &x.gt_scalar(0.0),
        one.clone(),
        E::select(&x.lt_scalar(0.0), one.neg(), x.full_like(0.0)),
    );
    (x.abs().mul_scalar(coef), sgn.mul_scalar(coef))
}

/// GMPO's per-token clipped log-ratio and its derivative.
#[derive(Debug, Clone)]
pub struct GeometricToken<E: Elem> {
    /// `x̃ = sgn(A)·min(sgn(A)·x, sgn(A)·clamp(x, −ε_low, ε_high))`.
    pub clipped_log_ratio: E,
    /// `∂x̃/∂x`: 1 where the unclipped side is taken (or at a tie), else 0
    /// (and 0 where `A = 0`).
    pub grad: E,
    /// `x ≠ clamp(x)` and `A > 0`.
    pub clipped_high: E::Mask,
    /// `x ≠ clamp(x)` and `A < 0`.
    pub clipped_low: E::Mask,
}

/// GMPO (verl `geo_mean`) token term: the sign-aware clipped log-ratio.
///
/// # Formula
///
/// `x̃ = sgn(A)·min(sgn(A)·x, sgn(A)·clamp(x, −ε_low, ε_high))`, `x = log π − log π_old`.
///
/// # Gradient
///
/// `∂x̃/∂x = 1` where `A ≠ 0` and `sgn(A)·x ≤ sgn(A)·clamp(x)` (a tie means
/// `x` is inside the range, where the clamp passes the gradient), else 0.
///
/// # Peers
///
/// verl `compute_policy_loss_geo_mean` (no log-ratio clamp).
pub fn geometric_clipped_log_ratio<E: Elem>(
    eps_low: f64,
    eps_high: f64,
    log_ratio: E,
    advantage: E,
) -> GeometricToken<E> {
    let one = log_ratio.full_like(1.0);
    let zero = log_ratio.full_like(0.0);
    let pos = advantage.gt_scalar(0.0);
    let neg = advantage.lt_scalar(0.0);
    let sgn = E::select(
        &pos,
        one.clone(),
        E::select(&neg, one.clone().neg(), zero.clone()),
    );
    let xc = log_ratio.clone().clamp(-eps_low, eps_high);
    let a = sgn.clone().mul(log_ratio.clone());
    let b = sgn.clone().mul(xc.clone());
    let m = a.clone().min(b.clone());
    let value = sgn.mul(m);
    let takes_x = b.ge(&a).and(pos.clone().or(neg.clone()));
    let inside = log_ratio
        .ge_scalar(-eps_low)
        .and(log_ratio.le_scalar(eps_high));
    GeometricToken {
        clipped_log_ratio: value,
        grad: E::select(&takes_x, one, zero),
        clipped_high: inside.clone().not().and(pos),
        clipped_low: inside.not().and(neg),
    }
}

/// DRO for one token: `ℓ = −(A·log π − β/2·x²)`, `x = log π − log π_old`.
///
/// # Gradient
///
/// `∂ℓ/∂log π = −A + β·x`.
///
/// # Peers
///
/// verl `compute_policy_loss_dro` (no clamp).
#[inline(always)]
pub fn quadratic_penalty_token<E: Elem>(
    beta: f64,
    log_prob: E,
    old_log_prob: E,
    advantage: E,
) -> PolicyToken<E> {
    let x = log_prob.clone().sub(old_log_prob);
    let kl = x.clone().neg();
    let loss = log_prob
        .mul(advantage.clone())
        .sub(x.clone().square().mul_scalar(0.5 * beta))
        .neg();
    let grad = advantage.neg().add(x.mul_scalar(beta));
    let none = never(&kl);
    PolicyToken {
        loss,
        grad,
        clipped: none.clone(),
        clipped_lower: none,
        kl,
    }
}

/// CISPO (verl meaning) for one token.
///
/// # Formula
///
/// ```text
/// x = clamp(log π − log π_old, ±20),  r = eˣ,  c = clip(r, 1 − ε_low, 1 + ε_high)
/// ℓ = −sg(c)·A·log π
/// ```
///
/// # Gradient
///
/// `∂ℓ/∂log π = −c·A`.
///
/// # Peers
///
/// verl `compute_policy_loss_cispo`; `clipped` = `r ≠ c` (either side).
/// TRL's `cispo` loss type is a different formula (see [`super::grpo`]).
#[inline(always)]
pub fn clipped_weight_token<E: Elem>(
    eps_low: f64,
    eps_high: f64,
    log_prob: E,
    old_log_prob: E,
    advantage: E,
) -> PolicyToken<E> {
    let (x, _) = clamped_log_ratio(log_prob.clone().sub(old_log_prob), LOG_RATIO_CLAMP);
    let kl = x.clone().neg();
    let r = x.exp();
    let lo = 1.0 - eps_low;
    let hi = 1.0 + eps_high;
    let inside = r.ge_scalar(lo).and(r.le_scalar(hi));
    let c = r.clamp(lo, hi);
    let coef = c.mul(advantage).neg();
    let none = never(&kl);
    PolicyToken {
        loss: coef.clone().mul(log_prob),
        grad: coef,
        clipped: inside.not(),
        clipped_lower: none,
        kl,
    }
}

/// The inputs of a token-level policy loss, row-major `[batch, seq]`.
#[derive(Debug, Clone, Copy)]
pub struct PolicyBatch<'a, F> {
    /// The shape.
    pub dims: Dims,
    /// `log π` of the taken tokens (the trainable input).
    pub log_prob: &'a [F],
    /// `log π_old` (for REINFORCE: the rollout policy's log-probs).
    pub old_log_prob: &'a [F],
    /// Per-token advantages `A`.
    pub advantages: &'a [F],
    /// Valid positions.
    pub mask: &'a [bool],
    /// Optional constant per-token importance weights `w` multiplying `ℓ`
    /// (verl `rollout_is_weights`).
    pub is_weights: Option<&'a [F]>,
}

impl<F> PolicyBatch<'_, F> {
    /// Checks every slice against `dims`.
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] naming the first slice of the wrong length.
    pub fn check(&self) -> Result<(), Error> {
        let n = self.dims.len();
        check_len("log_prob", self.log_prob.len(), n)?;
        check_len("old_log_prob", self.old_log_prob.len(), n)?;
        check_len("advantages", self.advantages.len(), n)?;
        check_len("response_mask", self.mask.len(), n)?;
        if let Some(w) = self.is_weights {
            check_len("rollout_is_weights", w.len(), n)?;
        }
        Ok(())
    }
}

/// The aggregated loss and verl's metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyLossOutput<F> {
    /// The aggregated loss (verl `pg_loss`).
    pub loss: F,
    /// Share of valid tokens the variant counts as clipped (verl `pg_clipfrac`).
    pub clipfrac: F,
    /// Share counted as lower/dual clipped (verl `pg_clipfrac_lower`).
    pub clipfrac_lower: F,
    /// Mean of the per-token KL term over valid tokens (verl `ppo_kl`).
    pub approx_kl: F,
}

/// Runs a token-level policy loss over a batch: per-token kernel, cross-token
/// parts, importance weights, aggregation and metrics.
///
/// # Formula
///
/// `L = Σ wᵢⱼ·ISᵢⱼ·ℓᵢⱼ` with `ℓ` from the variant (see [`PolicyLoss`]), `IS`
/// the optional importance weights and `w` the weights of
/// [`PolicyLoss::effective_agg`]`(agg)` under `norm`
/// ([`aggregation_weights`]); [`PolicyLoss::GeometricMean`] uses its own
/// per-sequence reduction. Metrics are means over valid tokens with verl's
/// `+1e-8` in the denominator.
///
/// # Gradient
///
/// If `vjp = Some((c, grad))`, writes `grad = c·∂L/∂log π`:
/// `c·wᵢⱼ·ISᵢⱼ·∂ℓᵢⱼ/∂log πᵢⱼ` for the token-local variants (0 on masked
/// positions). For GSPO each token's gradient flows straight through its own
/// log-prob; for GMPO it flows through the sequence mean.
///
/// # Peers
///
/// verl `get_policy_loss_fn(loss_mode)` (every mode but `bypass_mode`), with
/// `config.global_batch_info` as `norm`; verl `compute_policy_loss`
/// (deprecated vanilla) and `compute_policy_loss_reinforce` (with
/// [`PolicyLoss::LogProb`] and the rollout log-probs as `old_log_prob`).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for a slice, the scratch (needs
/// [`PolicyLoss::scratch_len`]) or the gradient buffer of the wrong length;
/// [`Error::OutOfRange`] for an invalid variant or normalizer.
pub fn policy_loss<F: Real>(
    loss: &PolicyLoss,
    agg: AggMode,
    norm: &GlobalNorm,
    batch: &PolicyBatch<'_, F>,
    scratch: &mut [F],
    vjp: Option<(F, &mut [F])>,
) -> Result<PolicyLossOutput<F>, Error> {
    loss.validate()?;
    norm.validate()?;
    batch.check()?;
    let dims = batch.dims;
    let n = dims.len();
    check_len("scratch", scratch.len(), PolicyLoss::scratch_len(dims))?;
    let mut vjp = vjp;
    if let Some((_, g)) = vjp.as_mut() {
        check_len("grad", g.len(), n)?;
    }
    if let PolicyLoss::GeometricMean { eps_low, eps_high } = *loss {
        return geometric_mean_loss(eps_low, eps_high, batch, vjp);
    }
    let (tl, rest) = scratch.split_at_mut(n);
    let (tg, aux) = rest.split_at_mut(n);
    let mask = batch.mask;
    let (lp, old, adv) = (batch.log_prob, batch.old_log_prob, batch.advantages);

    let mut n_valid = 0usize;
    let mut n_clipped = 0usize;
    let mut n_lower = 0usize;
    let mut kl_sum = F::zero();
    let mut tally = |t: &PolicyToken<F>| {
        n_valid += 1;
        n_clipped += t.clipped as usize;
        n_lower += t.clipped_lower as usize;
        kl_sum += t.kl;
    };
    if let PolicyLoss::SequenceRatio {
        eps_low,
        eps_high,
        max_log_ratio,
        ..
    } = *loss
    {
        for row in 0..dims.batch {
            let range = dims.row(row);
            let mut sum = F::zero();
            let mut count = 0usize;
            for i in range.clone() {
                if mask[i] {
                    sum += lp[i] - old[i];
                    count += 1;
                }
            }
            let seq = sum / F::of_usize(count.max(1));
            for i in range {
                if mask[i] {
                    let mut t =
                        sequence_ratio_surrogate(eps_low, eps_high, max_log_ratio, seq, adv[i]);
                    t.kl = old[i] - lp[i];
                    tally(&t);
                    tl[i] = t.loss;
                    tg[i] = t.grad;
                } else {
                    tl[i] = F::zero();
                    tg[i] = F::zero();
                }
            }
        }
    } else {
        for i in 0..n {
            if mask[i] {
                let t = loss.token(lp[i], old[i], adv[i]);
                tally(&t);
                tl[i] = t.loss;
                tg[i] = t.grad;
            } else {
                tl[i] = F::zero();
                tg[i] = F::zero();
            }
        }
    }

    match *loss {
        PolicyLoss::ClipCov {
            ref clip,
            ratio,
            lb,
            ub,
            ..
        } => {
            // Candidates: valid, not clipped by the surrogate, lb < cov < ub.
            let (mean_a, mean_lp) = masked_means(adv, lp, mask, MEAN_EPS);
            let cov = |i: usize| (adv[i] - mean_a) * (lp[i] - mean_lp);
            let is_candidate = |i: usize| {
                if !mask[i] {
                    return false;
                }
                let t = ppo_clipped_surrogate(clip, lp[i], old[i], adv[i]);
                let c = cov(i);
                !t.clipped && c.to_f64() > lb && c.to_f64() < ub
            };
            let k = core::cmp::max((ratio * n_valid as f64) as usize, 1);
            let picked = select_top(aux, n, k, &is_candidate, &cov, |i| {
                tl[i] = F::zero();
                tg[i] = F::zero();
            });
            n_clipped = picked;
            n_lower = 0;
        }
        PolicyLoss::KlCov { ratio, coef, .. } if n_valid > 0 => {
            let (mean_a, mean_lp) = masked_means(adv, lp, mask, 0.0);
            let cov = |i: usize| (adv[i] - mean_a) * (lp[i] - mean_lp);
            let k = core::cmp::min(
                core::cmp::max((n_valid as f64 * ratio) as usize, 1),
                n_valid,
            );
            select_top(aux, n, k, &|i: usize| mask[i], &cov, |i| {
                let (p, dp) = kl_cov_penalty(coef, lp[i], old[i]);
                tl[i] += p;
                tg[i] += dp;
            });
        }
        _ => {}
    }

    if let Some(w) = batch.is_weights {
        for i in 0..n {
            if mask[i] {
                tl[i] *= w[i];
                tg[i] *= w[i];
            }
        }
    }

    aggregation_weights(loss.effective_agg(agg), norm, dims, mask, aux)?;
    let value = weighted_sum(tl, mask, aux)?;
    if let Some((c, g)) = vjp {
        for i in 0..n {
            g[i] = if mask[i] {
                c * aux[i] * tg[i]
            } else {
                F::zero()
            };
        }
    }
    let denom = F::of(n_valid as f64 + MEAN_EPS);
    let (clipfrac, clipfrac_lower) = match loss {
        PolicyLoss::SoftGate { .. } => (F::zero(), F::zero()),
        _ => (F::of_usize(n_clipped) / denom, F::of_usize(n_lower) / denom),
    };
    Ok(PolicyLossOutput {
        loss: value,
        clipfrac,
        clipfrac_lower,
        approx_kl: kl_sum / denom,
    })
}

/// `(Σ_valid a / (n + eps), Σ_valid b / (n + eps))`; `(0, 0)` when nothing is valid.
fn masked_means<F: Real>(a: &[F], b: &[F], mask: &[bool], eps: f64) -> (F, F) {
    let mut sa = F::zero();
    let mut sb = F::zero();
    let mut n = 0usize;
    for i in 0..mask.len() {
        if mask[i] {
            sa += a[i];
            sb += b[i];
            n += 1;
        }
    }
    if n == 0 {
        return (F::zero(), F::zero());
    }
    let d = F::of(n as f64 + eps);
    (sa / d, sb / d)
}

/// Picks up to `k` positions among `0..n` satisfying `is_candidate`: all of
/// them if there are at most `k`, else the `k` with the largest `key`
/// (ties: lowest index). Calls `pick` on each and returns how many.
/// `buf` (length ≥ n) holds the candidates' keys while selecting.
fn select_top<F: Real>(
    buf: &mut [F],
    n: usize,
    k: usize,
    is_candidate: &dyn Fn(usize) -> bool,
    key: &dyn Fn(usize) -> F,
    mut pick: impl FnMut(usize),
) -> usize {
    let mut m = 0usize;
    for i in 0..n {
        if is_candidate(i) {
            buf[m] = key(i);
            m += 1;
        }
    }
    if m <= k {
        for i in 0..n {
            if is_candidate(i) {
                pick(i);
            }
        }
        return m;
    }
    if k == 0 {
        return 0;
    }
    // The k-th largest key.
    let keys = &mut buf[..m];
    let (_, kth, _) = keys.select_nth_unstable_by(k - 1, |a, b| b.to_f64().total_cmp(&a.to_f64()));
    let threshold = kth.to_f64();
    let above = (0..n)
        .filter(|&i| is_candidate(i) && key(i).to_f64().total_cmp(&threshold).is_gt())
        .count();
    let mut ties_left = k - above;
    for i in 0..n {
        if !is_candidate(i) {
            continue;
        }
        match key(i).to_f64().total_cmp(&threshold) {
            core::cmp::Ordering::Greater => pick(i),
            core::cmp::Ordering::Equal if ties_left > 0 => {
                ties_left -= 1;
                pick(i);
            }
            _ => {}
        }
    }
    k
}

/// GMPO's per-sequence reduction (see [`PolicyLoss::GeometricMean`]).
fn geometric_mean_loss<F: Real>(
    eps_low: f64,
    eps_high: f64,
    batch: &PolicyBatch<'_, F>,
    vjp: Option<(F, &mut [F])>,
) -> Result<PolicyLossOutput<F>, Error> {
    let dims = batch.dims;
    let mask = batch.mask;
    let (lp, old, adv) = (batch.log_prob, batch.old_log_prob, batch.advantages);
    let rows = F::of_usize(dims.batch.max(1));
    let mut vjp = vjp;
    let mut total = F::zero();
    let mut n_valid = 0usize;
    let mut n_high = 0usize;
    let mut n_low = 0usize;
    let mut kl_sum = F::zero();
    for row in 0..dims.batch {
        let range = dims.row(row);
        let mut sum_x = F::zero();
        let mut sum_a = F::zero();
        let mut sum_lw = F::zero();
        let mut count = 0usize;
        for i in range.clone() {
            if mask[i] {
                let x = lp[i] - old[i];
                let g = geometric_clipped_log_ratio(eps_low, eps_high, x, adv[i]);
                sum_x += g.clipped_log_ratio;
                sum_a += adv[i];
                if let Some(w) = batch.is_weights {
                    sum_lw += (w[i] + F::of(1e-10)).ln();
                }
                count += 1;
                n_high += g.clipped_high as usize;
                n_low += g.clipped_low as usize;
                kl_sum += -x;
            }
        }
        n_valid += count;
        let d = F::of(count as f64 + MEAN_EPS);
        // Safety clamp of the mean log-ratio (verl has none and overflows).
        let mean_x = sum_x / d;
        let live = mean_x.abs() <= F::of(LOG_RATIO_CLAMP);
        let ratio = mean_x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp();
        let a_bar = sum_a / d;
        let seq_w = if batch.is_weights.is_some() {
            (sum_lw / d).exp()
        } else {
            F::one()
        };
        total += -a_bar * ratio * seq_w;
        if let Some((c, g)) = vjp.as_mut() {
            let coef = if live {
                *c * (-a_bar * seq_w * ratio) / d / rows
            } else {
                F::zero()
            };
            for i in range {
                g[i] = if mask[i] {
                    let t = geometric_clipped_log_ratio(eps_low, eps_high, lp[i] - old[i], adv[i]);
                    coef * t.grad
                } else {
                    F::zero()
                };
            }
        }
    }
    let denom = F::of(n_valid as f64 + MEAN_EPS);
    Ok(PolicyLossOutput {
        loss: if dims.batch == 0 {
            F::zero()
        } else {
            total / rows
        },
        clipfrac: F::of_usize(n_high) / denom,
        clipfrac_lower: F::of_usize(n_low) / denom,
        approx_kl: kl_sum / denom,
    })
}

/// Allocating convenience around [`policy_loss`]: returns the output and, if
/// `cotangent` is given, the gradient with respect to `log π`.
///
/// # Errors
///
/// As [`policy_loss`].
#[cfg(feature = "alloc")]
pub fn policy_loss_alloc<F: Real>(
    loss: &PolicyLoss,
    agg: AggMode,
    norm: &GlobalNorm,
    batch: &PolicyBatch<'_, F>,
    cotangent: Option<F>,
) -> Result<(PolicyLossOutput<F>, Option<alloc::vec::Vec<F>>), Error> {
    let mut scratch = alloc::vec![F::zero(); PolicyLoss::scratch_len(batch.dims)];
    match cotangent {
        Some(c) => {
            let mut g = alloc::vec![F::zero(); batch.dims.len()];
            let out = policy_loss(loss, agg, norm, batch, &mut scratch, Some((c, &mut g)))?;
            Ok((out, Some(g)))
        }
        None => Ok((
            policy_loss(loss, agg, norm, batch, &mut scratch, None)?,
            None,
        )),
    }
}
