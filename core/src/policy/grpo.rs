//! GRPO-family policy losses as TRL computes them: clipped, soft (SAPO),
//! truncated-weight (CISPO), gamma-weighted (VESPO), length-unbiased (LUSPO),
//! sequence-level (GSPO), geometric-mean (GMPO) and sequence-ratio (RLOO)
//! objectives, with their entropy masks, importance-sampling corrections,
//! KL penalty, entropy bonus, normalizers and logged metrics.
//!
//! # Overview
//!
//! Every loss here starts from the log importance weight of the policy
//! against the policy that sampled the data, `x = log π − log π_old`, taken
//! per token or per sequence ([`ImportanceSamplingLevel`]), and from one
//! advantage per sequence. [`grpo_loss`] is TRL's `GRPOTrainer._compute_loss`
//! (every [`GrpoLossType`]) and also its experimental GSPO-token trainer;
//! [`gmpo_loss`] and [`rloo_loss`] are the GMPO and RLOO trainers.
//!
//! | variant | per-token loss `ℓ` (`r = eˣ`) | normalizer | peer |
//! |---|---|---|---|
//! | [`Grpo`](GrpoLossType::Grpo) | `max(−A·min(r, δ), −A·clip(r, 1−ε_low, 1+ε_high))` | mean over rows of the row's token mean | TRL `grpo` |
//! | [`Bnpo`](GrpoLossType::Bnpo) | same | valid tokens of the batch | TRL `bnpo` |
//! | [`DrGrpo`](GrpoLossType::DrGrpo) | same | `B · max_completion_length` | TRL `dr_grpo` |
//! | [`Dapo`](GrpoLossType::Dapo) | same | `num_items_in_batch / num_processes` | TRL `dapo` |
//! | [`Luspo`](GrpoLossType::Luspo) | same, times the row length | every `(B, T)` entry | TRL `luspo` |
//! | [`Cispo`](GrpoLossType::Cispo) | `−sg(min(r, ε_high))·A·log π` | as `dapo` | TRL `cispo` |
//! | [`Sapo`](GrpoLossType::Sapo) | `−A·4/τ·σ(τ·(r − 1))` | as `grpo` | TRL `sapo` |
//! | [`Vespo`](GrpoLossType::Vespo) | `−sg(φ(w))·A·log π` ([`vespo_gamma_weights`]) | as `dapo` | TRL `vespo` |
//! | GSPO | any of the above with [`Sequence`](ImportanceSamplingLevel::Sequence) | | TRL `importance_sampling_level="sequence"` |
//! | GSPO-token | [`SequenceToken`](ImportanceSamplingLevel::SequenceToken) | | TRL experimental `gspo_token` |
//! | GMPO ([`gmpo_loss`]) | `−A·exp(mean log-space-clipped x)` per row | mean over rows | TRL experimental `gmpo` |
//! | RLOO ([`rloo_loss`]) | PPO clip of `exp(Σ log π − old_logps)` per row | mean over rows | TRL `RLOOTrainer` |
//!
//! # Order of operations (TRL)
//!
//! `coef_1 = exp(x)`; the clipped ratio `clip(coef_1)` is taken first, then
//! `δ` caps `coef_1` (two-sided clipping); the per-token loss is then
//! multiplied by the off-policy sequence mask, the high-entropy token mask and
//! the vLLM importance-sampling ratio (not for VESPO, which folds that ratio
//! into `φ`); the k3 KL `β·(e^{ref−logp} − (ref−logp) − 1)` is added after
//! and is never masked or reweighted by them (with
//! `use_bias_correction_kl` it is multiplied by the non-detached `coef_1`).
//! The entropy bonus `−c·H` is subtracted from the normalised loss.
//!
//! # Masking and safety
//!
//! The loss mask is the completion mask combined with the tool mask; masked
//! positions are selected away and never read, with one exception that TRL
//! forces: `luspo` weighs every `(B, T)` entry, padding included, at every
//! IS level (so its padding must hold finite values). Log importance
//! weights (and the KL's `ref − logp`) are clamped to
//! `±`[`GrpoConfig::log_ratio_clamp`] before `exp` (TRL has no clamp; the
//! [`GrpoConfig::trl`] preset sets 20 as a safety net: it acts only on
//! ratios beyond `e^{20} ≈ 4.9·10⁸`, where TRL's loss is dominated by one
//! token or overflows to inf/NaN); an active clamp zeroes the gradient
//! through that exponent. Set it to `None` for TRL's unclamped numbers.
//! A NaN sampler log-prob on a valid token (one vLLM could not score)
//! drops an `A < 0` row from the off-policy mask, as TRL f2cd577 does, or
//! counts as on-policy (KL 0), as TRL 1.16.0 does:
//! [`GrpoConfig::off_policy_nan_sampler_log_probs`].
//!
//! # Example
//!
//! ```
//! use posttrain_core::policy::grpo::{grpo_loss, GrpoConfig, GrpoInputs, GrpoLossType};
//! use posttrain_core::Dims;
//!
//! let dims = Dims::new(2, 3);
//! let logp = [-1.0, -0.5, -2.0, -0.7, -0.3, 9.9];
//! let old = [-1.1, -0.4, -2.0, -0.7, -0.2, f64::NAN];
//! let mask = [true, true, true, true, true, false];
//! let adv = [1.0, -0.5];
//! let ent = [0.5; 6];
//! let cfg = GrpoConfig::trl(GrpoLossType::Grpo);
//! let inputs = GrpoInputs::new(dims, &logp, &ent, &mask, &adv).old_log_probs(&old);
//! let mut grad = [0.0; 6];
//! let out = grpo_loss(&cfg, &inputs, Some(&mut grad), None, &mut [])?;
//! assert!(out.loss.is_finite() && grad[5] == 0.0);
//! # Ok::<(), posttrain_core::Error>(())
//! ```

use crate::aggregate;
use crate::elem::{Elem, ElemExt, MaskElem, Real};
use crate::error::{check_finite_nonneg, check_len, check_param, Error};
use crate::kl::{KlConfig, KlEstimator};
use crate::policy::rollout::NanSamplerLogProbs;
use crate::policy::{ppo_clipped_surrogate, ClipConfig};
use crate::shape::Dims;

/// Smallest SAPO temperature accepted: the soft gate's loss is
/// `−A·σ(τ(r−1))·4/τ`, which tends to `−2A/τ` as `τ → 0` (and `4/τ`
/// overflows, or is a division by zero in `f32`, for subnormal `τ`).
pub const SAPO_MIN_TEMPERATURE: f64 = 1e-6;

/// `log(1e-8)`: VESPO's lower clamp of log-weights.
const VESPO_LOG_FLOOR: f64 = -18.420680743952367;

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

/// Which GRPO-family objective [`grpo_loss`] computes (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum GrpoLossType {
    /// Clipped surrogate, mean over rows of each row's token mean.
    Grpo,
    /// Clipped surrogate, mean over the batch's valid tokens.
    Bnpo,
    /// Clipped surrogate, token sum over `B · max_completion_length`.
    DrGrpo,
    /// Clipped surrogate, token sum over `num_items_in_batch / num_processes`.
    Dapo,
    /// Clipped surrogate times the row length, mean over every `(B, T)` entry.
    Luspo,
    /// `−sg(min(r, ε_high))·A·log π` (TRL's meaning: `ε_high` is an absolute cap).
    Cispo,
    /// Soft gate `4/τ·σ(τ(r − 1))` instead of the clip.
    Sapo,
    /// `−sg(φ(w))·A·log π` with the gamma weight of the sequence ratio.
    Vespo,
}

impl GrpoLossType {
    /// Every loss type, in declaration order.
    pub const ALL: [GrpoLossType; 8] = [
        GrpoLossType::Grpo,
        GrpoLossType::Bnpo,
        GrpoLossType::DrGrpo,
        GrpoLossType::Dapo,
        GrpoLossType::Luspo,
        GrpoLossType::Cispo,
        GrpoLossType::Sapo,
        GrpoLossType::Vespo,
    ];

    /// TRL's name (`"grpo"`, `"dr_grpo"`, …).
    pub fn name(self) -> &'static str {
        match self {
            GrpoLossType::Grpo => "grpo",
            GrpoLossType::Bnpo => "bnpo",
            GrpoLossType::DrGrpo => "dr_grpo",
            GrpoLossType::Dapo => "dapo",
            GrpoLossType::Luspo => "luspo",
            GrpoLossType::Cispo => "cispo",
            GrpoLossType::Sapo => "sapo",
            GrpoLossType::Vespo => "vespo",
        }
    }

    /// Whether the loss is the two-sided clipped surrogate (and logs `clip_ratio/*`).
    pub fn is_clipped(self) -> bool {
        matches!(
            self,
            GrpoLossType::Grpo
                | GrpoLossType::Bnpo
                | GrpoLossType::DrGrpo
                | GrpoLossType::Dapo
                | GrpoLossType::Luspo
        )
    }

    /// Whether the normalizer is the global token count (`dapo`, `cispo`, `vespo`).
    pub fn uses_global_token_count(self) -> bool {
        matches!(
            self,
            GrpoLossType::Dapo | GrpoLossType::Cispo | GrpoLossType::Vespo
        )
    }
}

impl core::str::FromStr for GrpoLossType {
    type Err = Error;
    /// Parses TRL's `loss_type` names.
    fn from_str(s: &str) -> Result<Self, Error> {
        GrpoLossType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                Error::unknown_option(
                    "GRPO loss type",
                    s,
                    "grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, vespo",
                )
            })
    }
}

/// Where the importance weight `exp(x)` is taken (TRL's `importance_sampling_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum ImportanceSamplingLevel {
    /// `x_t = log π_t − log π_old,t` per token (GRPO).
    Token,
    /// `x_i = Σ_valid (log π − log π_old) / max(nᵢ, 1)`, one per row (GSPO).
    Sequence,
    /// GSPO-token: value `x_i` per token, gradient of `log π_t` alone
    /// (`log π_t − sg(log π_t) + sg(x_i)`).
    SequenceToken,
}

impl ImportanceSamplingLevel {
    /// TRL's name.
    pub fn name(self) -> &'static str {
        match self {
            ImportanceSamplingLevel::Token => "token",
            ImportanceSamplingLevel::Sequence => "sequence",
            ImportanceSamplingLevel::SequenceToken => "sequence_token",
        }
    }
}

impl core::str::FromStr for ImportanceSamplingLevel {
    type Err = Error;
    /// Parses `token`, `sequence`, `sequence_token`.
    fn from_str(s: &str) -> Result<Self, Error> {
        [
            ImportanceSamplingLevel::Token,
            ImportanceSamplingLevel::Sequence,
            ImportanceSamplingLevel::SequenceToken,
        ]
        .into_iter()
        .find(|t| t.name() == s)
        .ok_or_else(|| {
            Error::unknown_option(
                "importance sampling level",
                s,
                "token, sequence, sequence_token",
            )
        })
    }
}

/// VESPO's gamma-weight shape parameters (`φ(w) = e^λ·wᵏ·e^{−λw}`), chosen
/// by the sign of the advantage (`A ≥ 0`: `*_pos`).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct VespoGamma {
    /// `k` for `A ≥ 0` (TRL default 2).
    pub k_pos: f64,
    /// `λ` for `A ≥ 0` (TRL default 3).
    pub lambda_pos: f64,
    /// `k` for `A < 0` (TRL default 3).
    pub k_neg: f64,
    /// `λ` for `A < 0` (TRL default 2).
    pub lambda_neg: f64,
}

impl Default for VespoGamma {
    fn default() -> Self {
        VespoGamma {
            k_pos: 2.0,
            lambda_pos: 3.0,
            k_neg: 3.0,
            lambda_neg: 2.0,
        }
    }
}

impl VespoGamma {
    /// Checks that every parameter is finite.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] for a non-finite `k` or `λ`.
    pub fn validate(&self) -> Result<(), Error> {
        for (name, v) in [
            ("vespo_k_pos", self.k_pos),
            ("vespo_lambda_pos", self.lambda_pos),
            ("vespo_k_neg", self.k_neg),
            ("vespo_lambda_neg", self.lambda_neg),
        ] {
            check_param(v.is_finite(), name, v, "must be finite")?;
        }
        Ok(())
    }
}

/// The normalizers TRL divides the summed loss by (see [`GrpoLossType`]).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TrlNormalizer {
    /// `dr_grpo`'s constant length (TRL `max_completion_length`).
    pub max_completion_length: f64,
    /// The global valid-token count (`dapo`, `cispo`, `vespo`), clamped ≥ 1.
    pub num_items_in_batch: f64,
    /// The number of processes the token count is spread over.
    pub num_processes: f64,
    /// Gradient-accumulation steps (every other loss type divides by it in training).
    pub gradient_accumulation_steps: f64,
    /// Training (`true`) or evaluation: evaluation never divides by the accumulation steps.
    pub train: bool,
    /// TRL 1.16's normalizers, selected by giving its `steps_per_generation`
    /// (`None`: TRL at the vectors' commit f2cd577). With it:
    /// `num_items_in_batch` counts the whole *generation* batch, so in
    /// training the token count is rescaled to one accumulation window,
    /// `× gradient_accumulation_steps / steps_per_generation`; the entropy
    /// bonus is the token mean of the entropies `/ gas` for every loss type
    /// (f2cd577: dapo, cispo and vespo divide by the token count); `luspo`
    /// sums each row over its valid tokens (f2cd577: every `(B, T)` entry
    /// times the row length).
    pub steps_per_generation: Option<f64>,
}

impl Default for TrlNormalizer {
    fn default() -> Self {
        TrlNormalizer {
            max_completion_length: 256.0,
            num_items_in_batch: 1.0,
            num_processes: 1.0,
            gradient_accumulation_steps: 1.0,
            train: true,
            steps_per_generation: None,
        }
    }
}

impl TrlNormalizer {
    fn validate(&self) -> Result<(), Error> {
        check_param(
            self.max_completion_length.is_finite() && self.max_completion_length > 0.0,
            "max_completion_length",
            self.max_completion_length,
            "must be finite and > 0",
        )?;
        check_finite_nonneg("num_items_in_batch", self.num_items_in_batch)?;
        check_param(
            self.num_processes.is_finite() && self.num_processes >= 1.0,
            "num_processes",
            self.num_processes,
            "must be finite and ≥ 1",
        )?;
        check_param(
            self.gradient_accumulation_steps.is_finite() && self.gradient_accumulation_steps >= 1.0,
            "current_gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            "must be finite and ≥ 1",
        )?;
        if let Some(spg) = self.steps_per_generation {
            check_param(
                spg.is_finite() && spg >= 1.0,
                "steps_per_generation",
                spg,
                "must be finite and ≥ 1",
            )?;
        }
        Ok(())
    }

    /// Whether these are TRL 1.16's normalizers (see
    /// [`steps_per_generation`](Self::steps_per_generation)).
    pub fn is_trl_1_16(&self) -> bool {
        self.steps_per_generation.is_some()
    }

    /// The accumulation divisor: the steps in training, 1 in evaluation.
    pub fn accumulation(&self) -> f64 {
        if self.train {
            self.gradient_accumulation_steps
        } else {
            1.0
        }
    }

    /// `max(num_items_in_batch, 1) / num_processes`, and with
    /// [`steps_per_generation`](Self::steps_per_generation) in training
    /// `× gradient_accumulation_steps / steps_per_generation` (TRL 1.16).
    ///
    /// ```
    /// use posttrain_core::policy::grpo::TrlNormalizer;
    /// let mut n = TrlNormalizer {
    ///     num_items_in_batch: 96.0,
    ///     gradient_accumulation_steps: 2.0,
    ///     ..TrlNormalizer::default()
    /// };
    /// assert_eq!(n.token_count(), 96.0); // TRL f2cd577: the count is per window
    /// n.steps_per_generation = Some(4.0); // TRL 1.16: it spans 4 steps' batches
    /// assert_eq!(n.token_count(), 48.0);
    /// n.train = false; // evaluation neither splits nor accumulates
    /// assert_eq!(n.token_count(), 96.0);
    /// ```
    pub fn token_count(&self) -> f64 {
        let count = self.num_items_in_batch.max(1.0) / self.num_processes;
        match self.steps_per_generation {
            Some(spg) if self.train => count * self.gradient_accumulation_steps / spg,
            _ => count,
        }
    }
}

/// The weight `∂L/∂ℓ_t` TRL's normalisation gives one counted position of a
/// row with `row_valid` valid tokens, in a batch with `total_valid` valid
/// tokens: the GRPO family's own aggregation.
///
/// # Formula
///
/// ```text
/// grpo, sapo:          1 / (B · max(n_i, 1)) / gas
/// bnpo:                1 / max(N, 1) / gas
/// dr_grpo:             1 / (B · max_completion_length) / gas
/// dapo, cispo, vespo:  num_processes / max(num_items_in_batch, 1)
/// luspo:               n_i / (B · T) / gas        (every entry of the row, padding included)
/// luspo (TRL 1.16):     1 / B / gas                (valid tokens)
/// ```
///
/// `gas` is [`TrlNormalizer::accumulation`]. This is not
/// [`crate::aggregate`]'s `seq-mean-token-mean`: TRL divides by
/// `max(n_i, 1)` (verl: `n_i + 1e−8`) and averages over all `B` rows,
/// empty ones included (verl: rows with a valid token).
///
/// # Peers
///
/// TRL `GRPOTrainer._compute_loss` and the GSPO-token trainer.
pub fn trl_token_weight<F: Real>(
    loss_type: GrpoLossType,
    norm: &TrlNormalizer,
    dims: Dims,
    row_valid: usize,
    total_valid: usize,
) -> F {
    trl_token_weight_of(
        loss_type,
        norm,
        dims.batch,
        dims.seq,
        F::of_usize(row_valid),
        F::of_usize(total_valid),
    )
}

/// TRL's adaptive entropy-coefficient controller.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AdaptiveEntropy {
    /// Entropy target: the bonus applies only while the last world entropy is ≤ it.
    pub target: f64,
    /// Floor of the coefficient.
    pub coef_min: f64,
    /// Ceiling of the coefficient.
    pub coef_max: f64,
    /// Step of the coefficient per optimizer step.
    pub coef_delta: f64,
    /// The world entropy measured at the end of the previous optimizer step
    /// (`+inf` before the first).
    pub last_world_entropy: f64,
}

/// The entropy bonus `−c·H` (TRL `entropy_coef`, `use_adaptive_entropy`).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct EntropyBonus {
    /// The coefficient `c` (at the start of this step).
    pub coef: f64,
    /// The adaptive controller, if on.
    pub adaptive: Option<AdaptiveEntropy>,
}

impl EntropyBonus {
    /// Checks the coefficient and the adaptive controller's parameters.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`]: a non-finite coefficient, target, floor or
    /// ceiling, a ceiling below the floor, a negative or non-finite step, or
    /// a NaN last world entropy.
    pub fn validate(&self) -> Result<(), Error> {
        check_param(
            self.coef.is_finite(),
            "entropy_coef",
            self.coef,
            "must be finite",
        )?;
        if let Some(a) = &self.adaptive {
            check_param(
                a.target.is_finite(),
                "entropy_target",
                a.target,
                "must be finite",
            )?;
            check_param(
                a.coef_min.is_finite(),
                "entropy_coef_min",
                a.coef_min,
                "must be finite",
            )?;
            check_param(
                a.coef_max.is_finite() && a.coef_max >= a.coef_min,
                "entropy_coef_max",
                a.coef_max,
                "must be finite and ≥ entropy_coef_min",
            )?;
            check_param(
                a.coef_delta.is_finite() && a.coef_delta >= 0.0,
                "entropy_coef_delta",
                a.coef_delta,
                "must be finite and ≥ 0",
            )?;
            check_param(
                !a.last_world_entropy.is_nan(),
                "_last_world_entropy",
                a.last_world_entropy,
                "must not be NaN",
            )?;
        }
        Ok(())
    }

    /// The coefficient applied in this step: `coef`, or 0 when adaptive and
    /// the last world entropy is above the target.
    pub fn applied_coef(&self) -> f64 {
        match &self.adaptive {
            Some(a) if a.last_world_entropy > a.target => 0.0,
            _ => self.coef,
        }
    }

    /// The coefficient after this step's adaptive update given the measured
    /// `world_entropy` (unchanged when not adaptive or not training).
    pub fn updated_coef(&self, world_entropy: f64, train: bool) -> f64 {
        match &self.adaptive {
            Some(a) if train => {
                if world_entropy <= a.target {
                    (self.coef + a.coef_delta).min(a.coef_max)
                } else {
                    (self.coef - a.coef_delta).max(a.coef_min)
                }
            }
            _ => self.coef,
        }
    }
}

/// Configuration of [`grpo_loss`]. Build with [`GrpoConfig::trl`] and adjust
/// fields; [`grpo_loss`] validates it on every call ([`GrpoConfig::validate`]).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GrpoConfig {
    /// The objective.
    pub loss_type: GrpoLossType,
    /// Token, sequence (GSPO) or sequence-token (GSPO-token) importance weights.
    pub level: ImportanceSamplingLevel,
    /// `ε_low` (TRL `epsilon`).
    pub eps_low: f64,
    /// `ε_high` (TRL `epsilon_high`); for CISPO the absolute cap of the weight.
    pub eps_high: f64,
    /// Two-sided clipping: cap `coef_1` at `δ` (TRL `delta`), after the clip.
    pub delta: Option<f64>,
    /// KL coefficient `β` (0: no KL term).
    pub beta: f64,
    /// Multiply the KL by the non-detached `coef_1` (TRL `use_bias_correction_kl`).
    pub bias_correction_kl: bool,
    /// Keep only tokens whose entropy is at or above the `1 − q` quantile of
    /// the valid entropies (TRL `top_entropy_quantile`; 1 = off).
    pub top_entropy_quantile: f64,
    /// Multiply the per-token loss by the vLLM importance-sampling ratio (TRL
    /// `use_vllm and vllm_importance_sampling_correction`; not for VESPO).
    pub vllm_is_correction: bool,
    /// Drop rows with `A < 0` whose mean `log π_sampler − log π` exceeds this
    /// (TRL `off_policy_mask_threshold`, DeepSeek-V3.2's off-policy sequence mask).
    pub off_policy_mask_threshold: Option<f64>,
    /// What a NaN `log π_sampler − log π` does in that mean (a token vLLM
    /// could not score): [`Propagate`](NanSamplerLogProbs::Propagate), TRL
    /// f2cd577 and the default, makes the mean NaN and drops an `A < 0` row;
    /// [`AsOnPolicy`](NanSamplerLogProbs::AsOnPolicy), TRL 1.16.0, counts it
    /// as 0 over the same `max(n_i, 1)` valid tokens
    /// ([`off_policy_sequence_mask`](crate::sequence::off_policy_sequence_mask)).
    #[cfg_attr(feature = "serde", serde(default))]
    pub off_policy_nan_sampler_log_probs: NanSamplerLogProbs,
    /// SAPO temperature for `A > 0`.
    pub sapo_temperature_pos: f64,
    /// SAPO temperature for `A ≤ 0`.
    pub sapo_temperature_neg: f64,
    /// VESPO gamma weights.
    pub vespo: VespoGamma,
    /// Normalizers.
    pub norm: TrlNormalizer,
    /// Entropy bonus (TRL enables it when `entropy_coef ≠ 0` or adaptive).
    pub entropy_bonus: Option<EntropyBonus>,
    /// Clamp of every log-ratio before `exp` (safety; TRL has none). `None`: no clamp.
    pub log_ratio_clamp: Option<f64>,
}

impl GrpoConfig {
    /// TRL's defaults for `loss_type` (ε = 0.2, no δ, β = 0, SAPO 1.0/1.05,
    /// VESPO defaults, no entropy mask, no bonus) with posttrain's safety
    /// clamp of 20 on log-ratios.
    pub fn trl(loss_type: GrpoLossType) -> Self {
        GrpoConfig {
            loss_type,
            level: ImportanceSamplingLevel::Token,
            eps_low: 0.2,
            eps_high: 0.2,
            delta: None,
            beta: 0.0,
            bias_correction_kl: false,
            top_entropy_quantile: 1.0,
            vllm_is_correction: false,
            off_policy_mask_threshold: None,
            off_policy_nan_sampler_log_probs: NanSamplerLogProbs::Propagate,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            vespo: VespoGamma::default(),
            norm: TrlNormalizer::default(),
            entropy_bonus: None,
            log_ratio_clamp: Some(20.0),
        }
    }

    /// TRL's defaults with the given objective, importance-sampling level
    /// and clip range, validated.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] for a negative or non-finite `ε_low` / `ε_high`.
    ///
    /// # Example
    ///
    /// ```
    /// use posttrain_core::policy::grpo::{GrpoConfig, GrpoLossType, ImportanceSamplingLevel};
    /// let gspo = GrpoConfig::new(GrpoLossType::Grpo, ImportanceSamplingLevel::Sequence, 3e-4, 4e-4)?;
    /// assert!(GrpoConfig::new(GrpoLossType::Dapo, ImportanceSamplingLevel::Token, -0.1, 0.2).is_err());
    /// # let _ = gspo;
    /// # Ok::<(), posttrain_core::Error>(())
    /// ```
    pub fn new(
        loss_type: GrpoLossType,
        level: ImportanceSamplingLevel,
        eps_low: f64,
        eps_high: f64,
    ) -> Result<Self, Error> {
        let mut c = GrpoConfig::trl(loss_type);
        c.level = level;
        c.eps_low = eps_low;
        c.eps_high = eps_high;
        c.validate()?;
        Ok(c)
    }

    /// Checks every parameter's range.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] for a negative or non-finite ε, δ ≤ 0, β < 0,
    /// `top_entropy_quantile ∉ [0, 1]`, a non-positive SAPO temperature, a
    /// non-positive clamp, or an invalid normalizer / entropy bonus.
    pub fn validate(&self) -> Result<(), Error> {
        check_finite_nonneg("epsilon", self.eps_low)?;
        check_finite_nonneg("epsilon_high", self.eps_high)?;
        if let Some(d) = self.delta {
            check_param(
                d.is_finite() && d > 0.0,
                "delta",
                d,
                "must be finite and > 0",
            )?;
        }
        check_finite_nonneg("beta", self.beta)?;
        check_param(
            (0.0..=1.0).contains(&self.top_entropy_quantile),
            "top_entropy_quantile",
            self.top_entropy_quantile,
            "must lie in [0, 1]",
        )?;
        if let Some(t) = self.off_policy_mask_threshold {
            check_param(
                t.is_finite(),
                "off_policy_mask_threshold",
                t,
                "must be finite",
            )?;
        }
        for (name, v) in [
            ("sapo_temperature_pos", self.sapo_temperature_pos),
            ("sapo_temperature_neg", self.sapo_temperature_neg),
        ] {
            check_param(
                v.is_finite() && v >= SAPO_MIN_TEMPERATURE,
                name,
                v,
                "must be finite and ≥ 1e-6 (the loss scales as 2/τ)",
            )?;
        }
        self.vespo.validate()?;
        self.norm.validate()?;
        if let Some(b) = &self.entropy_bonus {
            b.validate()?;
        }
        if let Some(c) = self.log_ratio_clamp {
            check_param(
                c.is_finite() && c > 0.0,
                "log_ratio_clamp",
                c,
                "must be finite and > 0",
            )?;
        }
        Ok(())
    }

    fn kl(&self) -> KlConfig {
        let mut k = KlConfig::new(KlEstimator::K3);
        k.log_ratio_clamp = self.log_ratio_clamp;
        k
    }
}

// ---------------------------------------------------------------------------
// Kernels (one token, generic over Elem)
// ---------------------------------------------------------------------------

/// `clamp(x, −c, c)` and whether the clamp is inactive (`None`: no clamp).
fn safe_log_ratio<F: Real>(x: F, clamp: Option<f64>) -> (F, bool) {
    let (v, live) = clamp_log_ratio(x, clamp);
    (v, live.unwrap_or(true))
}

/// The safety clamp of a log importance weight, for one token (or a tensor).
///
/// # Formula
///
/// `x̂ = clamp(x, −c, c)`; `live = (−c ≤ x ≤ c)`. With `clamp = None`, `x̂ = x`
/// and `live` is `None` (always live).
///
/// # Gradient
///
/// `∂x̂/∂x = 1` where `live`, else 0 (an active clamp stops the gradient).
///
/// # Peers
///
/// None (posttrain's safety net, see the [module docs](self)).
pub fn clamp_log_ratio<E: Elem>(x: E, clamp: Option<f64>) -> (E, Option<E::Mask>) {
    match clamp {
        Some(c) => {
            let live = x.ge_scalar(-c).and(x.le_scalar(c));
            (x.clamp(-c, c), Some(live))
        }
        None => (x, None),
    }
}

/// One token's value of TRL's two-sided clipped surrogate and its clip indicators.
#[derive(Debug, Clone)]
pub struct TrlClipToken<E: Elem> {
    /// `ℓ = max(−A·min(r, δ), −A·clip(r, 1−ε_low, 1+ε_high))`.
    pub loss: E,
    /// `∂ℓ/∂x` with `r = eˣ`.
    pub grad: E,
    /// `coef_1` after the `δ` cap (what TRL's clip metrics test).
    pub capped_ratio: E,
}

/// TRL's clipped surrogate with the `δ` cap, for one token (or a tensor).
///
/// # Formula
///
/// ```text
/// r = eˣ,  coef_2 = clip(r, 1−ε_low, 1+ε_high),  coef_1 = min(r, δ)   (clip first, then cap)
/// ℓ = −min(coef_1·A, coef_2·A)
/// ```
///
/// # Gradient
///
/// `∂ℓ/∂x = −A·r` on the active branch where its ratio is not clipped/capped,
/// else 0. Without `δ` this is [`ppo_clipped_surrogate`] (no log-ratio clamp,
/// no dual clip).
///
/// # Peers
///
/// TRL `GRPOTrainer._compute_loss` for `grpo`, `bnpo`, `dr_grpo`, `dapo`,
/// `luspo`; the GSPO-token trainer; RLOO (no `δ`).
pub fn trl_clipped_surrogate<E: Elem>(
    eps_low: f64,
    eps_high: f64,
    delta: Option<f64>,
    log_ratio: E,
    advantage: E,
) -> TrlClipToken<E> {
    match delta {
        None => {
            let cfg = ClipConfig {
                eps_low,
                eps_high,
                dual_clip: None,
                log_ratio_clamp: None,
            };
            let zero = log_ratio.full_like(0.0);
            let t = ppo_clipped_surrogate(&cfg, log_ratio, zero, advantage);
            TrlClipToken {
                loss: t.loss,
                grad: t.grad,
                capped_ratio: t.ratio,
            }
        }
        Some(d) => {
            let r = log_ratio.exp();
            let zero = r.full_like(0.0);
            let neg_a = advantage.neg();
            let lo = 1.0 - eps_low;
            let hi = 1.0 + eps_high;
            let capped = r.clone().min(r.full_like(d));
            let l1 = neg_a.clone().mul(capped.clone());
            let dr = neg_a.clone().mul(r.clone());
            let d1 = E::select(&r.le_scalar(d), dr.clone(), zero.clone());
            let l2 = neg_a.mul(r.clone().clamp(lo, hi));
            let in_range = r.ge_scalar(lo).and(r.le_scalar(hi));
            let d2 = E::select(&in_range, dr, zero);
            let second = l2.gt(&l1);
            TrlClipToken {
                loss: E::select(&second, l2, l1),
                grad: E::select(&second, d2, d1),
                capped_ratio: capped,
            }
        }
    }
}

/// SAPO's soft-gated surrogate for one token: value and `∂ℓ/∂x`.
///
/// # Formula
///
/// ```text
/// τ = τ_pos if A > 0 else τ_neg,   ℓ = −A · σ(τ·(r − 1)) · 4/τ,   r = eˣ
/// ```
///
/// # Gradient
///
/// `∂ℓ/∂x = −4·A·σ(z)·σ(−z)·r` with `z = τ(r − 1)` (computed in log space, no overflow).
///
/// # Peers
///
/// TRL `loss_type="sapo"`.
pub fn sapo_surrogate<E: Elem>(tau_pos: f64, tau_neg: f64, log_ratio: E, advantage: E) -> (E, E) {
    let r = log_ratio.exp();
    let pos = advantage.gt_scalar(0.0);
    let tau = E::select(&pos, r.full_like(tau_pos), r.full_like(tau_neg));
    let z = tau.clone().mul(r.clone().add_scalar(-1.0));
    let ls = z.clone().log_sigmoid();
    let lsn = z.neg().log_sigmoid();
    let gate = ls.clone().exp().mul_scalar(4.0).div(tau);
    let loss = advantage.clone().neg().mul(gate);
    let grad = advantage
        .neg()
        .mul_scalar(4.0)
        .mul(ls.add(lsn).exp())
        .mul(r);
    (loss, grad)
}

/// CISPO's truncated-weight policy gradient for one token, as TRL defines it.
///
/// # Formula
///
/// ```text
/// w = sg(min(r, ε_high)),   ℓ = −w · A · log π      (r = eˣ; no lower clip)
/// ```
///
/// `ε_high` is an absolute cap on the weight here (TRL), not `1 + ε_high`.
///
/// # Gradient
///
/// `∂ℓ/∂log π = −w·A` (the weight is detached).
///
/// # Peers
///
/// TRL `loss_type="cispo"`. (verl's `cispo` caps at `1 + ε_high` and clips
/// from below too; see [`crate::policy`].)
pub fn cispo_surrogate<E: Elem>(eps_high: f64, log_ratio: E, log_prob: E, advantage: E) -> (E, E) {
    let w = log_ratio.exp();
    let w = w.clone().min(w.full_like(eps_high));
    let d = w.mul(advantage).neg();
    (d.clone().mul(log_prob), d)
}

/// TRL's clip-metric indicators of one token (or one row at sequence level).
///
/// # Formula
///
/// ```text
/// low  = coef_1 < 1 − ε_low  ∧ A < 0
/// high = coef_1 > 1 + ε_high ∧ A > 0
/// ```
///
/// `coef_1` is the (δ-capped) ratio ([`TrlClipToken::capped_ratio`]).
///
/// # Peers
///
/// TRL `clip_ratio/low_mean`, `clip_ratio/high_mean` (GRPO, GSPO-token, RLOO).
pub fn trl_clip_indicators<E: Elem>(
    eps_low: f64,
    eps_high: f64,
    capped_ratio: &E,
    advantage: &E,
) -> (E::Mask, E::Mask) {
    let low = capped_ratio
        .lt_scalar(1.0 - eps_low)
        .and(advantage.lt_scalar(0.0));
    let high = capped_ratio
        .gt_scalar(1.0 + eps_high)
        .and(advantage.gt_scalar(0.0));
    (low, high)
}

/// CISPO's clip indicator: `coef_1 > ε_high ∧ A > 0` (TRL `cispo_clip_ratio`).
pub fn cispo_clip_indicator<E: Elem>(eps_high: f64, ratio: &E, advantage: &E) -> E::Mask {
    ratio.gt_scalar(eps_high).and(advantage.gt_scalar(0.0))
}

/// One position's GRPO-family loss (before the multiplicative factors, the
/// KL and the normalizer) and its partial derivatives.
#[derive(Debug, Clone)]
pub struct GrpoToken<E: Elem> {
    /// The per-token loss `ℓ`.
    pub loss: E,
    /// `∂ℓ/∂x` through the importance weight (0 where the safety clamp is active).
    pub grad_log_weight: E,
    /// `∂ℓ/∂log π` directly (CISPO, VESPO: the detached-weight forms).
    pub grad_log_prob: E,
    /// `coef_1` after the `δ` cap (clipped types), else `coef_1 = eˣ̂`.
    pub capped_ratio: E,
    /// `coef_1 = eˣ̂`.
    pub ratio: E,
}

/// The per-token loss of [`grpo_loss`] for `cfg.loss_type`, for one position
/// (or a tensor).
///
/// # Formula
///
/// With `x̂` the (clamped) log importance weight of the position
/// ([`clamp_log_ratio`]; the token's own or its row's) and `r = e^x̂`:
///
/// ```text
/// grpo, bnpo, dr_grpo, dapo, luspo: trl_clipped_surrogate(ε_low, ε_high, δ, x̂, A)
/// cispo: cispo_surrogate(ε_high, x̂, log π, A)
/// sapo:  sapo_surrogate(τ_pos, τ_neg, x̂, A)
/// vespo: −φ·A·log π                 (φ = vespo_phi of the row; read by VESPO only)
/// ```
///
/// # Gradient
///
/// [`GrpoToken::grad_log_weight`] (`∂ℓ/∂x`, zeroed where `live` is false) and
/// [`GrpoToken::grad_log_prob`] (the detached-weight types).
///
/// # Peers
///
/// TRL `GRPOTrainer._compute_loss` (per-token part).
pub fn grpo_token<E: Elem>(
    cfg: &GrpoConfig,
    log_weight: E,
    live: Option<&E::Mask>,
    log_prob: E,
    advantage: E,
    phi: E,
) -> GrpoToken<E> {
    let coef = log_weight.clone().exp();
    let zero = coef.full_like(0.0);
    let (loss, d_x, d_lp, capped) = match cfg.loss_type {
        GrpoLossType::Cispo => {
            let (l, d) = cispo_surrogate(cfg.eps_high, log_weight, log_prob, advantage);
            (l, zero.clone(), d, coef.clone())
        }
        GrpoLossType::Vespo => {
            let d = phi.mul(advantage).neg();
            (d.clone().mul(log_prob), zero.clone(), d, coef.clone())
        }
        GrpoLossType::Sapo => {
            let (l, d) = sapo_surrogate(
                cfg.sapo_temperature_pos,
                cfg.sapo_temperature_neg,
                log_weight,
                advantage,
            );
            (l, d, zero.clone(), coef.clone())
        }
        _ => {
            let t =
                trl_clipped_surrogate(cfg.eps_low, cfg.eps_high, cfg.delta, log_weight, advantage);
            (t.loss, t.grad, zero.clone(), t.capped_ratio)
        }
    };
    let d_x = match live {
        Some(m) => E::select(m, d_x, zero),
        None => d_x,
    };
    GrpoToken {
        loss,
        grad_log_weight: d_x,
        grad_log_prob: d_lp,
        capped_ratio: capped,
        ratio: coef,
    }
}

/// The KL term of [`grpo_loss`] for one position: the k3 estimate, times
/// `coef_1` with TRL's `use_bias_correction_kl`.
///
/// # Formula
///
/// ```text
/// κ = e^{ref − log π} − (ref − log π) − 1       (k3, ref − log π clamped at ±log_ratio_clamp)
/// bias correction: κ' = κ · coef_1, else κ' = κ
/// ```
///
/// Returns `(κ', ∂κ'/∂log π, ∂κ'/∂x)`; the last is `κ·coef_1` where `live`
/// (bias correction only), else 0.
///
/// # Peers
///
/// TRL `GRPOTrainer._compute_loss` (`per_token_kl`, `use_bias_correction_kl`).
pub fn grpo_kl_token<E: Elem>(
    cfg: &GrpoConfig,
    log_prob: E,
    ref_log_prob: E,
    ratio: E,
    live: Option<&E::Mask>,
) -> (E, E, E) {
    let (kv, kg) = cfg.kl().estimate(log_prob, ref_log_prob);
    if cfg.bias_correction_kl {
        let c_live = match live {
            Some(m) => E::select(m, ratio.clone(), ratio.full_like(0.0)),
            None => ratio.clone(),
        };
        (kv.clone().mul(ratio.clone()), kg.mul(ratio), kv.mul(c_live))
    } else {
        let z = kv.full_like(0.0);
        (kv, kg, z)
    }
}

/// DeepSeek-V3.2's off-policy sequence mask for one row: keep the row unless
/// `A < 0` and its mean `log π_sampler − log π` exceeds the threshold.
///
/// # Formula
///
/// `keep = A ≥ 0 ∨ mean_kl ≤ threshold`.
///
/// # Peers
///
/// TRL `off_policy_mask_threshold`.
pub fn off_policy_keep<E: Elem>(threshold: f64, advantage: &E, mean_kl: &E) -> E::Mask {
    advantage.ge_scalar(0.0).or(mean_kl.le_scalar(threshold))
}

/// [`trl_token_weight`] with the counts as elements (or tensors): the weight
/// of one counted position of a row with `row_valid` valid tokens, in a
/// `batch × seq` batch with `total_valid` valid tokens.
///
/// # Formula
///
/// As [`trl_token_weight`].
///
/// # Peers
///
/// TRL `GRPOTrainer._compute_loss` (normalizers).
pub fn trl_token_weight_of<E: Elem>(
    loss_type: GrpoLossType,
    norm: &TrlNormalizer,
    batch: usize,
    seq: usize,
    row_valid: E,
    total_valid: E,
) -> E {
    let b = batch as f64;
    let acc = row_valid.full_like(norm.accumulation());
    let one = row_valid.full_like(1.0);
    match loss_type {
        GrpoLossType::Grpo | GrpoLossType::Sapo => {
            one.clone().div(row_valid.max(one).mul_scalar(b)).div(acc)
        }
        GrpoLossType::Bnpo => one.clone().div(total_valid.max(one)).div(acc),
        GrpoLossType::DrGrpo => one
            .div(row_valid.full_like(b * norm.max_completion_length))
            .div(acc),
        GrpoLossType::Dapo | GrpoLossType::Cispo | GrpoLossType::Vespo => {
            one.div(row_valid.full_like(norm.token_count()))
        }
        GrpoLossType::Luspo if norm.is_trl_1_16() => one.div(row_valid.full_like(b)).div(acc),
        GrpoLossType::Luspo => row_valid.div(one.full_like(b * seq as f64)).div(acc),
    }
}

/// GMPO's row objective from the mean clipped log-ratio `m` of the row.
///
/// # Formula
///
/// `m̂ = clamp(m, ±log_ratio_clamp)`, `c = e^m̂`, `ℓ = −c·A`.
///
/// # Gradient
///
/// `∂ℓ/∂m = −A·c` where the clamp is inactive, else 0.
///
/// # Peers
///
/// TRL experimental `GMPOTrainer._compute_loss`.
pub fn gmpo_sequence_objective<E: Elem>(
    mean_log_ratio: E,
    advantage: E,
    clamp: Option<f64>,
) -> (E, E) {
    let (m, live) = clamp_log_ratio(mean_log_ratio, clamp);
    let c = m.exp();
    let loss = c.clone().neg().mul(advantage.clone());
    let g = advantage.neg().mul(c);
    let g = match live {
        Some(l) => E::select(&l, g.clone(), g.full_like(0.0)),
        None => g,
    };
    (loss, g)
}

/// GMPO's clip-metric indicators of one raw log-ratio `x`:
/// `low = x < −ε_low ∧ A < 0`, `high = x > ε_high ∧ A > 0`.
///
/// # Peers
///
/// TRL experimental `GMPOTrainer` (`clip_ratio/*`).
pub fn gmpo_clip_indicators<E: Elem>(
    eps_low: f64,
    eps_high: f64,
    log_ratio: &E,
    advantage: &E,
) -> (E::Mask, E::Mask) {
    (
        log_ratio.lt_scalar(-eps_low).and(advantage.lt_scalar(0.0)),
        log_ratio.gt_scalar(eps_high).and(advantage.gt_scalar(0.0)),
    )
}

// ---------------------------------------------------------------------------
// Inputs / outputs
// ---------------------------------------------------------------------------

/// A per-token `[B, T]` or per-sequence `[B]` tensor (TRL's vLLM
/// importance-sampling ratio is `(B, T)` in token modes, `(B, 1)` in sequence modes).
#[derive(Debug, Clone, Copy)]
pub enum TokenOrRow<'a, F> {
    /// `B·T` values.
    Token(&'a [F]),
    /// `B` values, one per row.
    Row(&'a [F]),
}

impl<F: Real> TokenOrRow<'_, F> {
    fn check(&self, name: &'static str, dims: Dims) -> Result<(), Error> {
        match self {
            TokenOrRow::Token(v) => check_len(name, v.len(), dims.len()),
            TokenOrRow::Row(v) => check_len(name, v.len(), dims.batch),
        }
    }
    fn at(&self, i: usize, k: usize) -> F {
        match self {
            TokenOrRow::Token(v) => v[k],
            TokenOrRow::Row(v) => v[i],
        }
    }
}

/// The tensors [`grpo_loss`] reads. `mask` is the loss mask (TRL:
/// `completion_mask · tool_mask`).
#[derive(Debug, Clone, Copy)]
pub struct GrpoInputs<'a, F> {
    /// `[B, T]`.
    pub dims: Dims,
    /// `log π` of the trained policy, `[B, T]` (differentiated).
    pub log_probs: &'a [F],
    /// Per-token entropies, `[B, T]` (differentiated through the entropy bonus).
    pub entropies: &'a [F],
    /// Loss mask, `[B, T]`.
    pub mask: &'a [bool],
    /// One advantage per row, `[B]`.
    pub advantages: &'a [F],
    /// `log π_old`, `[B, T]`; `None`: on-policy (`sg(log π)`, ratio 1).
    pub old_log_probs: Option<&'a [F]>,
    /// `log π_ref`, `[B, T]` (required when `β ≠ 0`).
    pub ref_log_probs: Option<&'a [F]>,
    /// The vLLM importance-sampling ratio (required with `vllm_is_correction`;
    /// VESPO folds it into `φ` when present).
    pub importance_sampling_ratio: Option<TokenOrRow<'a, F>>,
    /// The sampler's log-probs for the off-policy mask (`None`: `old_log_probs`).
    pub sampling_log_probs: Option<&'a [F]>,
}

impl<'a, F: Real> GrpoInputs<'a, F> {
    /// The required tensors; the optional ones are `None`.
    pub fn new(
        dims: Dims,
        log_probs: &'a [F],
        entropies: &'a [F],
        mask: &'a [bool],
        advantages: &'a [F],
    ) -> Self {
        GrpoInputs {
            dims,
            log_probs,
            entropies,
            mask,
            advantages,
            old_log_probs: None,
            ref_log_probs: None,
            importance_sampling_ratio: None,
            sampling_log_probs: None,
        }
    }
    /// Sets `old_log_probs`.
    pub fn old_log_probs(mut self, v: &'a [F]) -> Self {
        self.old_log_probs = Some(v);
        self
    }
    /// Sets `ref_log_probs`.
    pub fn ref_log_probs(mut self, v: &'a [F]) -> Self {
        self.ref_log_probs = Some(v);
        self
    }
    /// Sets the vLLM importance-sampling ratio.
    pub fn importance_sampling_ratio(mut self, v: TokenOrRow<'a, F>) -> Self {
        self.importance_sampling_ratio = Some(v);
        self
    }
    /// Sets the sampler's log-probs (off-policy mask).
    pub fn sampling_log_probs(mut self, v: &'a [F]) -> Self {
        self.sampling_log_probs = Some(v);
        self
    }

    fn validate(&self) -> Result<(), Error> {
        let n = self.dims.len();
        check_len("per_token_logps", self.log_probs.len(), n)?;
        check_len("entropies", self.entropies.len(), n)?;
        check_len("completion_mask", self.mask.len(), n)?;
        check_len("advantages", self.advantages.len(), self.dims.batch)?;
        if let Some(v) = self.old_log_probs {
            check_len("old_per_token_logps", v.len(), n)?;
        }
        if let Some(v) = self.ref_log_probs {
            check_len("ref_per_token_logps", v.len(), n)?;
        }
        if let Some(v) = self.sampling_log_probs {
            check_len("sampling_per_token_logps", v.len(), n)?;
        }
        if let Some(v) = &self.importance_sampling_ratio {
            v.check("importance_sampling_ratio", self.dims)?;
        }
        Ok(())
    }
}

/// TRL's clip metrics (`clip_ratio/*`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClipMetrics<F> {
    /// Mean of `coef_1 < 1 − ε_low ∧ A < 0` (valid tokens, or rows at sequence level).
    pub low_mean: F,
    /// Mean of `coef_1 > 1 + ε_high ∧ A > 0`.
    pub high_mean: F,
    /// Mean of either.
    pub region_mean: F,
    /// Minimum over rows of the row's low-clip fraction (rows without valid tokens skipped; 0 if none).
    pub low_min: F,
    /// Maximum over rows of the row's high-clip fraction.
    pub high_max: F,
}

/// What [`grpo_loss`] returns besides the gradients.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GrpoOutput<F> {
    /// The loss (normalised, minus the entropy bonus).
    pub loss: F,
    /// The policy loss before the accumulation divisor and the entropy bonus
    /// (TRL's logged `policy_loss`; for `dapo`/`cispo`/`vespo` it equals the
    /// normalised loss).
    pub policy_loss: F,
    /// Masked mean entropy (`Σ_valid H / max(N, 1)`).
    pub entropy: F,
    /// Masked mean of the (bias-corrected) per-token KL; 0 when `β = 0`.
    pub kl: F,
    /// Clip metrics (clipped loss types).
    pub clip: ClipMetrics<F>,
    /// CISPO: mean of `coef_1 > ε_high ∧ A > 0`.
    pub cispo_clip_ratio: F,
    /// VESPO: mean of `φ` over rows.
    pub vespo_phi_seq_mean: F,
    /// The entropy coefficient after this step's adaptive update (or the
    /// static one; 0 when the bonus is off). The controller measures this
    /// call's entropy only: TRL accumulates over the accumulation window and
    /// every rank and updates at the optimizer-step boundary, which agrees
    /// when this call is the whole window on one rank.
    pub entropy_coef: F,
    /// The mean entropy over the effective mask that the adaptive controller measured.
    pub world_entropy: F,
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `torch.quantile(v, q)` (linear interpolation) of the valid entropies,
/// sorted in `scratch`; `None` when nothing is valid.
fn valid_quantile<F: Real>(values: &[F], mask: &[bool], q: f64, scratch: &mut [F]) -> Option<F> {
    let mut n = 0;
    for (&v, &m) in values.iter().zip(mask) {
        if m {
            scratch[n] = v;
            n += 1;
        }
    }
    if n == 0 {
        return None;
    }
    let s = &mut scratch[..n];
    if s.iter().any(|v| v.is_nan()) {
        // torch.quantile: NaN (and sorting NaN with a partial order can
        // panic in the standard library's sort).
        return Some(F::nan());
    }
    s.sort_unstable_by(|a, b| a.partial_cmp(b).unwrap_or(core::cmp::Ordering::Equal));
    let rank = F::of(q) * F::of_usize(n - 1);
    // rank ≥ 0, so truncation is the floor.
    let lo: usize = core::cmp::min(rank.to_f64() as usize, n - 1);
    let hi: usize = core::cmp::min(lo + 1, n - 1);
    let w = rank - F::of_usize(lo);
    let (a, b) = (s[lo], s[hi]);
    // torch.lerp
    Some(if w < F::of(0.5) {
        a + w * (b - a)
    } else {
        b - (b - a) * (F::one() - w)
    })
}

/// The entropy threshold, or `None` (no entropy mask) when `top_entropy_quantile ≥ 1`.
/// `Some(None)`: mask on but nothing valid (every token dropped).
fn entropy_threshold<F: Real>(
    top: f64,
    entropies: &[F],
    mask: &[bool],
    scratch: &mut [F],
) -> Result<Option<Option<F>>, Error> {
    if top >= 1.0 {
        return Ok(None);
    }
    check_len(
        "scratch",
        scratch.len().min(entropies.len()),
        entropies.len(),
    )?;
    Ok(Some(valid_quantile(entropies, mask, 1.0 - top, scratch)))
}

fn row_count(mask: &[bool]) -> usize {
    mask.iter().filter(|&&m| m).count()
}

// ---------------------------------------------------------------------------
// VESPO gamma weights
// ---------------------------------------------------------------------------

/// VESPO's per-sequence gamma weight `φ(w)` of the sequence importance ratio.
///
/// # Formula
///
/// ```text
/// S   = Σ_valid clamp(x_t, −20, 20) + Σ_valid clamp(ln ρ_t, ln 1e−8, 20)   (ρ: IS ratio, if given)
/// ln w = clamp(S, ln 1e−8, 20)
/// k, λ = (k_pos, λ_pos) if A ≥ 0 else (k_neg, λ_neg);  λ ← max(λ, 1e−4)
/// φ   = exp(λ + k·ln w − λ·w)                     (non-finite → 0)
/// ```
///
/// # Gradient
///
/// None: `φ` is a detached coefficient.
///
/// # Peers
///
/// TRL `GRPOTrainer.get_gamma_weights`. TRL sums `ln ρ` over every position;
/// posttrain over valid ones only (TRL's ratio is 1 on padding).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for inconsistent lengths (`advantages` and `phi`: `B`).
pub fn vespo_gamma_weights<F: Real>(
    gamma: &VespoGamma,
    dims: Dims,
    advantages: &[F],
    log_ratio: &[F],
    mask: &[bool],
    importance_sampling_ratio: Option<TokenOrRow<'_, F>>,
    phi: &mut [F],
) -> Result<(), Error> {
    gamma.validate()?;
    check_len("advantages", advantages.len(), dims.batch)?;
    check_len("log_ratio_per_token", log_ratio.len(), dims.len())?;
    check_len("mask", mask.len(), dims.len())?;
    check_len("phi_seq", phi.len(), dims.batch)?;
    if let Some(r) = &importance_sampling_ratio {
        r.check("importance_sampling_ratio", dims)?;
    }
    for i in 0..dims.batch {
        let row = dims.row(i);
        phi[i] = vespo_row(
            gamma,
            advantages[i],
            row.clone().filter(|&k| mask[k]).map(|k| log_ratio[k]),
            importance_sampling_ratio.map(|r| vespo_log_is_sum(r, i, row.clone(), mask)),
        );
    }
    Ok(())
}

/// `Σ clamp(ln ρ, ln 1e−8, 20)` over the valid positions of row `i` (or the row's own ratio).
fn vespo_log_is_sum<F: Real>(
    ratio: TokenOrRow<'_, F>,
    i: usize,
    row: core::ops::Range<usize>,
    mask: &[bool],
) -> F {
    let log_is = |v: F| vespo_log_is_term(v);
    match ratio {
        TokenOrRow::Row(v) => log_is(v[i]),
        TokenOrRow::Token(v) => row
            .filter(|&k| mask[k])
            .fold(F::zero(), |acc, k| acc + log_is(v[k])),
    }
}

fn vespo_row<F: Real>(
    gamma: &VespoGamma,
    advantage: F,
    valid_log_ratios: impl Iterator<Item = F>,
    log_is_sum: Option<F>,
) -> F {
    let mut s = F::zero();
    for x in valid_log_ratios {
        s += vespo_log_ratio_term(x);
    }
    if let Some(l) = log_is_sum {
        s += l;
    }
    vespo_phi(gamma, s, advantage)
}

/// One token's term of VESPO's log sequence weight: `clamp(x, −20, 20)`.
///
/// # Peers
///
/// TRL `GRPOTrainer.get_gamma_weights`.
pub fn vespo_log_ratio_term<E: Elem>(log_ratio: E) -> E {
    log_ratio.clamp(-20.0, 20.0)
}

/// One position's term of VESPO's log importance-sampling correction:
/// `clamp(ln ρ, ln 1e−8, 20)`.
///
/// # Peers
///
/// TRL `GRPOTrainer.get_gamma_weights`.
pub fn vespo_log_is_term<E: Elem>(ratio: E) -> E {
    ratio.ln().clamp(VESPO_LOG_FLOOR, 20.0)
}

/// VESPO's gamma weight of one row from its summed log weight `S` (the sum
/// of [`vespo_log_ratio_term`]s and [`vespo_log_is_term`]s).
///
/// # Formula
///
/// ```text
/// ln w = clamp(S, ln 1e−8, 20),  w = e^{ln w}
/// k, λ = (k_pos, λ_pos) if A ≥ 0 else (k_neg, λ_neg);  λ ← max(λ, 1e−4)
/// φ = exp(λ + k·ln w − λ·w)     (non-finite → 0)
/// ```
///
/// # Gradient
///
/// None: `φ` is detached.
///
/// # Peers
///
/// TRL `GRPOTrainer.get_gamma_weights`.
pub fn vespo_phi<E: Elem>(gamma: &VespoGamma, log_weight_sum: E, advantage: E) -> E {
    let log_w = log_weight_sum.clamp(VESPO_LOG_FLOOR, 20.0);
    let w = log_w.clone().exp();
    let pos = advantage.ge_scalar(0.0);
    let k = E::select(&pos, w.full_like(gamma.k_pos), w.full_like(gamma.k_neg));
    let lambda = E::select(
        &pos,
        w.full_like(gamma.lambda_pos.max(1e-4)),
        w.full_like(gamma.lambda_neg.max(1e-4)),
    );
    let log_phi = lambda.clone().add(k.mul(log_w)).sub(lambda.mul(w));
    let phi = log_phi.exp();
    // exp ≥ 0: finite ⟺ < +inf (NaN compares false).
    let finite = phi.lt_scalar(f64::INFINITY);
    let zero = phi.full_like(0.0);
    E::select(&finite, phi, zero)
}

// ---------------------------------------------------------------------------
// The GRPO driver
// ---------------------------------------------------------------------------

/// TRL's GRPO-family loss (`GRPOTrainer._compute_loss`, and the GSPO-token
/// trainer with [`ImportanceSamplingLevel::SequenceToken`]): value, metrics,
/// and the gradients with respect to `log_probs` and `entropies`.
///
/// # Formula
///
/// See the [module docs](self) for the per-token loss of each type. With
/// `f = keep_i · entropy_mask_t · ρ_t` (off-policy row mask, high-entropy
/// mask, vLLM IS ratio) and `κ_t` the k3 KL (times `coef_1` with bias
/// correction):
///
/// ```text
/// ℓ'_t = ℓ_t · f_t + β·κ_t
/// grpo, sapo: L = (1/B) Σ_i Σ_valid ℓ' / max(n_i, 1)         / gas
/// bnpo:       L = Σ_valid ℓ' / max(N, 1)                      / gas
/// dr_grpo:    L = Σ_valid ℓ' / (B · max_completion_length)   / gas
/// dapo, cispo, vespo: L = Σ_valid ℓ' / (max(num_items, 1) / num_processes)
/// luspo:      L = Σ_{all i,t} ℓ'_t · n_i / (B·T)             / gas
/// L ← L − c · H,  H = Σ H_t·m'_t / max(Σ m'_t, 1) / gas   (dapo/cispo/vespo: Σ H_t·m'_t / token count)
/// ```
///
/// `gas` is the gradient-accumulation steps in training, 1 in evaluation;
/// `m'` is the loss mask times the entropy mask.
///
/// # Gradient
///
/// Written into `grad_log_probs` (`∂L/∂log π`, every position) and
/// `grad_entropies` (`∂L/∂H = −c·m'_t / …`, the entropy bonus only: the
/// entropy mask is a non-differentiable selection). At sequence level the
/// row's `∂L/∂x_i` is spread as `1/max(n_i, 1)` over its valid tokens.
/// Without `old_log_probs` the ratio is exactly 1 and the per-token gradient
/// of the clipped types is `−A·w_t`.
///
/// # Peers
///
/// TRL `GRPOTrainer._compute_loss` (`trl/trainer/grpo_trainer.py`) and
/// `trl/experimental/gspo_token`. Differences, on purpose: log-ratios are
/// clamped at ±[`GrpoConfig::log_ratio_clamp`]; metrics over an empty set are
/// 0 (TRL: NaN); VESPO sums the IS log-ratio over valid tokens only.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for inconsistent lengths (and a `scratch` shorter
/// than `B·T` when the entropy mask is on); [`Error::Invalid`] when `β ≠ 0`
/// without `ref_log_probs`, or `vllm_is_correction` without the ratio;
/// [`Error::OutOfRange`] from [`GrpoConfig::validate`].
pub fn grpo_loss<F: Real>(
    cfg: &GrpoConfig,
    x: &GrpoInputs<'_, F>,
    mut grad_log_probs: Option<&mut [F]>,
    mut grad_entropies: Option<&mut [F]>,
    scratch: &mut [F],
) -> Result<GrpoOutput<F>, Error> {
    cfg.validate()?;
    x.validate()?;
    let dims = x.dims;
    let b = dims.batch;
    if let Some(g) = grad_log_probs.as_deref() {
        check_len("grad_log_probs", g.len(), dims.len())?;
    }
    if let Some(g) = grad_entropies.as_deref() {
        check_len("grad_entropies", g.len(), dims.len())?;
    }
    if cfg.beta != 0.0 && x.ref_log_probs.is_none() {
        return Err(Error::Invalid {
            input: "ref_per_token_logps",
            rule: "required when beta ≠ 0",
        });
    }
    let use_is = cfg.vllm_is_correction && cfg.loss_type != GrpoLossType::Vespo;
    if use_is && x.importance_sampling_ratio.is_none() {
        return Err(Error::Invalid {
            input: "importance_sampling_ratio",
            rule: "required with the vLLM importance-sampling correction",
        });
    }
    let lt = cfg.loss_type;
    let level = cfg.level;
    let mask = x.mask;
    let lp = x.log_probs;
    let old = |k: usize| x.old_log_probs.map_or(lp[k], |o| o[k]);

    let threshold = entropy_threshold(cfg.top_entropy_quantile, x.entropies, mask, scratch)?;
    let emask = |k: usize| -> bool {
        mask[k]
            && match threshold {
                None => true,
                Some(None) => false,
                Some(Some(th)) => x.entropies[k] >= th,
            }
    };

    let total_valid = row_count(mask);
    let acc = F::of(cfg.norm.accumulation());
    // Aggregation weight of a counted position in a row with n valid tokens.
    let weight = |n: usize| -> F { trl_token_weight(lt, &cfg.norm, dims, n, total_valid) };
    // Whether a position enters the sum (luspo: every entry, padding included).
    let luspo_all = lt == GrpoLossType::Luspo && !cfg.norm.is_trl_1_16();

    let mut loss = F::zero();
    let (mut kl_sum, mut kl_count) = (F::zero(), 0usize);
    // clip metrics: token-level accumulators or row-level ones
    let seq_metrics = level == ImportanceSamplingLevel::Sequence;
    let (mut low_sum, mut high_sum, mut region_sum, mut cispo_sum) =
        (F::zero(), F::zero(), F::zero(), F::zero());
    let mut low_min: Option<F> = None;
    let mut high_max: Option<F> = None;
    let mut phi_sum = F::zero();

    if let Some(g) = grad_log_probs.as_deref_mut() {
        for v in g.iter_mut() {
            *v = F::zero();
        }
    }

    for i in 0..b {
        let row = dims.row(i);
        let n = row_count(&mask[row.clone()]);
        let nf = F::of_usize(n.max(1));
        let a = x.advantages[i];
        // sequence-level log weight (mean of valid log-ratios)
        let mut s = F::zero();
        for k in row.clone() {
            if mask[k] {
                s += lp[k] - old(k);
            }
        }
        let s = s / nf;
        // off-policy row mask
        let keep = match cfg.off_policy_mask_threshold {
            None => true,
            Some(th) => {
                let mut kl = F::zero();
                for k in row.clone() {
                    if mask[k] {
                        let samp = x.sampling_log_probs.map_or(old(k), |v| v[k]);
                        kl += cfg.off_policy_nan_sampler_log_probs.log_diff(samp - lp[k]);
                    }
                }
                off_policy_keep(th, &a, &(kl / nf))
            }
        };
        let phi = if lt == GrpoLossType::Vespo {
            let p = vespo_row(
                &cfg.vespo,
                a,
                row.clone().filter(|&k| mask[k]).map(|k| lp[k] - old(k)),
                x.importance_sampling_ratio
                    .map(|r| vespo_log_is_sum(r, i, row.clone(), mask)),
            );
            phi_sum += p;
            p
        } else {
            F::zero()
        };
        // Sequence-level quantities (x_i, its clamp, coef_1).
        let (s_c, s_live) = safe_log_ratio(s, cfg.log_ratio_clamp);
        let w_row = weight(n);
        let mut row_dx = F::zero(); // ∂L/∂x_i (sequence level)
        let (mut low_cnt, mut high_cnt) = (F::zero(), F::zero());
        let row_low;
        let row_high;
        let row_region;
        let row_cispo;
        // Row-level clip indicators (sequence level).
        {
            let coef = s_c.exp();
            let capped = match cfg.delta {
                Some(d) if lt.is_clipped() => coef.min(F::of(d)),
                _ => coef,
            };
            (row_low, row_high) = trl_clip_indicators(cfg.eps_low, cfg.eps_high, &capped, &a);
            row_region = row_low || row_high;
            row_cispo = cispo_clip_indicator(cfg.eps_high, &coef, &a);
        }
        for k in row.clone() {
            let valid = mask[k];
            if !(valid || luspo_all) {
                continue;
            }
            // log importance weight of this position
            let (lw, live) = match level {
                ImportanceSamplingLevel::Token => {
                    safe_log_ratio(lp[k] - old(k), cfg.log_ratio_clamp)
                }
                _ => (s_c, s_live),
            };
            // per-token loss, ∂ℓ/∂x and ∂ℓ/∂logp (direct)
            let t = grpo_token(cfg, lw, Some(&live), lp[k], a, phi);
            let (l, d_x, d_lp, capped, coef) = (
                t.loss,
                t.grad_log_weight,
                t.grad_log_prob,
                t.capped_ratio,
                t.ratio,
            );
            // multiplicative factor f
            let mut f_on = keep;
            if threshold.is_some() {
                f_on = f_on && emask(k);
            }
            let mut f = F::one();
            if use_is {
                if let Some(r) = &x.importance_sampling_ratio {
                    f = r.at(i, k);
                }
            }
            let (mut lt_val, mut g_x, mut g_lp) = if f_on {
                (l * f, d_x * f, d_lp * f)
            } else {
                (F::zero(), F::zero(), F::zero())
            };
            // KL
            if cfg.beta != 0.0 {
                let rf = x.ref_log_probs.map_or(F::zero(), |r| r[k]);
                let (kv2, kg2, kx) = grpo_kl_token(cfg, lp[k], rf, coef, Some(&live));
                let beta = F::of(cfg.beta);
                lt_val += beta * kv2;
                g_lp += beta * kg2;
                g_x += beta * kx;
                if valid {
                    kl_sum += kv2;
                    kl_count += 1;
                }
            }
            loss += w_row * lt_val;
            if let Some(g) = grad_log_probs.as_deref_mut() {
                match level {
                    ImportanceSamplingLevel::Sequence => {
                        g[k] += w_row * g_lp;
                        row_dx += w_row * g_x;
                    }
                    _ => g[k] += w_row * (g_lp + g_x),
                }
            }
            // metrics (token level)
            if valid && !seq_metrics {
                let (low, high) = trl_clip_indicators(cfg.eps_low, cfg.eps_high, &capped, &a);
                if low {
                    low_cnt += F::one();
                }
                if high {
                    high_cnt += F::one();
                }
                if low || high {
                    region_sum += F::one();
                }
                if lt == GrpoLossType::Cispo && cispo_clip_indicator(cfg.eps_high, &coef, &a) {
                    cispo_sum += F::one();
                }
            }
        }
        if level == ImportanceSamplingLevel::Sequence {
            if let Some(g) = grad_log_probs.as_deref_mut() {
                let share = row_dx / nf;
                for k in row.clone() {
                    if mask[k] {
                        g[k] += share;
                    }
                }
            }
        }
        // row metrics
        let (row_low_frac, row_high_frac) = if seq_metrics {
            let ind = |c: bool| if c { F::one() } else { F::zero() };
            low_sum += ind(row_low);
            high_sum += ind(row_high);
            region_sum += ind(row_region);
            cispo_sum += ind(row_cispo && lt == GrpoLossType::Cispo);
            (Some(ind(row_low)), Some(ind(row_high)))
        } else if n > 0 {
            low_sum += low_cnt;
            high_sum += high_cnt;
            (
                Some(low_cnt / F::of_usize(n)),
                Some(high_cnt / F::of_usize(n)),
            )
        } else {
            (None, None)
        };
        if let Some(v) = row_low_frac {
            low_min = Some(low_min.map_or(v, |m: F| if v < m { v } else { m }));
        }
        if let Some(v) = row_high_frac {
            high_max = Some(high_max.map_or(v, |m: F| if v > m { v } else { m }));
        }
    }

    // Metric denominators.
    let metric_den = if seq_metrics {
        F::of_usize(b.max(1))
    } else {
        F::of_usize(total_valid.max(1))
    };
    let mut out = GrpoOutput::<F> {
        loss,
        ..Default::default()
    };
    out.policy_loss = if lt.uses_global_token_count() {
        loss
    } else {
        loss * acc
    };
    if lt.is_clipped() {
        out.clip = ClipMetrics {
            low_mean: low_sum / metric_den,
            high_mean: high_sum / metric_den,
            region_mean: region_sum / metric_den,
            low_min: low_min.unwrap_or(F::zero()),
            high_max: high_max.unwrap_or(F::zero()),
        };
    }
    if lt == GrpoLossType::Cispo {
        out.cispo_clip_ratio = cispo_sum / metric_den;
    }
    if lt == GrpoLossType::Vespo {
        out.vespo_phi_seq_mean = phi_sum / F::of_usize(b.max(1));
    }
    if cfg.beta != 0.0 {
        out.kl = kl_sum / F::of_usize(kl_count.max(1));
    }
    // Entropy metric (loss mask).
    let e_sum = aggregate::masked_sum(x.entropies, mask)?;
    out.entropy = e_sum / F::of_usize(total_valid.max(1));

    // Entropy bonus.
    if let Some(g) = grad_entropies.as_deref_mut() {
        for v in g.iter_mut() {
            *v = F::zero();
        }
    }
    if let Some(bonus) = &cfg.entropy_bonus {
        let mut h_sum = F::zero();
        let mut h_cnt = 0usize;
        for k in 0..dims.len() {
            if emask(k) {
                h_sum += x.entropies[k];
                h_cnt += 1;
            }
        }
        let den = if lt.uses_global_token_count() && !cfg.norm.is_trl_1_16() {
            F::of(cfg.norm.token_count())
        } else {
            F::of_usize(h_cnt.max(1)) * acc
        };
        let c = F::of(bonus.applied_coef());
        out.loss -= c * (h_sum / den);
        if let Some(g) = grad_entropies {
            let gv = -c / den;
            for (k, v) in g.iter_mut().enumerate() {
                if emask(k) {
                    *v = gv;
                }
            }
        }
        let world = h_sum / F::of_usize(h_cnt.max(1));
        out.world_entropy = world;
        out.entropy_coef = F::of(bonus.updated_coef(world.to_f64(), cfg.norm.train));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// GMPO
// ---------------------------------------------------------------------------

/// Configuration of [`gmpo_loss`] (TRL experimental `GMPOTrainer`).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GmpoConfig {
    /// Log-space lower clip `ε_low` (ratio ≥ `e^{−ε_low}`; TRL `epsilon`, paper 0.4).
    pub eps_low: f64,
    /// Log-space upper clip `ε_high` (ratio ≤ `e^{ε_high}`).
    pub eps_high: f64,
    /// KL coefficient (sequence-averaged k3).
    pub beta: f64,
    /// Entropy mask quantile (1 = off); applies to the geometric mean only.
    pub top_entropy_quantile: f64,
    /// Gradient-accumulation steps (training only).
    pub gradient_accumulation_steps: f64,
    /// Training or evaluation.
    pub train: bool,
    /// Safety clamp of the geometric-mean log weight and of the KL's
    /// `ref − logp` (TRL: none; preset 20).
    pub log_ratio_clamp: Option<f64>,
}

impl GmpoConfig {
    /// TRL's defaults (ε = 0.4 both sides, β = 0) with the safety clamp.
    pub fn trl() -> Self {
        GmpoConfig {
            eps_low: 0.4,
            eps_high: 0.4,
            beta: 0.0,
            top_entropy_quantile: 1.0,
            gradient_accumulation_steps: 1.0,
            train: true,
            log_ratio_clamp: Some(20.0),
        }
    }

    /// Checks the ranges.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] for negative ε or β, a quantile outside `[0, 1]`,
    /// accumulation steps < 1, a non-positive clamp.
    pub fn validate(&self) -> Result<(), Error> {
        check_finite_nonneg("epsilon", self.eps_low)?;
        check_finite_nonneg("epsilon_high", self.eps_high)?;
        check_finite_nonneg("beta", self.beta)?;
        check_param(
            (0.0..=1.0).contains(&self.top_entropy_quantile),
            "top_entropy_quantile",
            self.top_entropy_quantile,
            "must lie in [0, 1]",
        )?;
        check_param(
            self.gradient_accumulation_steps.is_finite() && self.gradient_accumulation_steps >= 1.0,
            "current_gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            "must be finite and ≥ 1",
        )?;
        if let Some(c) = self.log_ratio_clamp {
            check_param(
                c.is_finite() && c > 0.0,
                "log_ratio_clamp",
                c,
                "must be finite and > 0",
            )?;
        }
        Ok(())
    }
}

/// Metrics of [`gmpo_loss`] and [`rloo_loss`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SequenceLossOutput<F> {
    /// The loss.
    pub loss: F,
    /// Masked mean entropy.
    pub entropy: F,
    /// Masked mean per-token k3 KL (0 when `β = 0`).
    pub kl: F,
    /// Clip metrics.
    pub clip: ClipMetrics<F>,
}

/// GMPO: geometric-mean policy optimisation (TRL experimental `GMPOTrainer._compute_loss`).
///
/// # Formula
///
/// ```text
/// x_t  = log π_t − log π_old,t,   x̂_t = clamp(x_t, −ε_low, ε_high)
/// x̃_t = min(x_t, x̂_t) if A_i > 0 else max(x_t, x̂_t)
/// c_i  = exp( Σ_{m'} x̃_t / max(Σ m', 1) )        (m' = mask · entropy mask)
/// L    = (1/B) Σ_i ( −c_i·A_i + β·Σ_valid k3_t / max(n_i, 1) )  / gas
/// ```
///
/// # Gradient
///
/// `∂L/∂log π_t = (−A_i·c_i·[x̃_t = x_t, unclipped]·m'_t / max(Σm', 1) + β·(1 − e^{ref−logp})·m_t / max(n_i, 1)) / (B·gas)`.
///
/// # Peers
///
/// TRL `trl/experimental/gmpo/gmpo_trainer.py`. Clip metrics test the raw
/// `x` against `−ε_low` / `ε_high`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for inconsistent lengths or a short `scratch`
/// (needs `B·T` with the entropy mask); [`Error::Invalid`] when `β ≠ 0`
/// without `ref_log_probs`.
pub fn gmpo_loss<F: Real>(
    cfg: &GmpoConfig,
    x: &GrpoInputs<'_, F>,
    mut grad_log_probs: Option<&mut [F]>,
    scratch: &mut [F],
) -> Result<SequenceLossOutput<F>, Error> {
    cfg.validate()?;
    x.validate()?;
    let dims = x.dims;
    if let Some(g) = grad_log_probs.as_deref() {
        check_len("grad_log_probs", g.len(), dims.len())?;
    }
    if cfg.beta != 0.0 && x.ref_log_probs.is_none() {
        return Err(Error::Invalid {
            input: "ref_per_token_logps",
            rule: "required when beta ≠ 0",
        });
    }
    let mask = x.mask;
    let lp = x.log_probs;
    let old = |k: usize| x.old_log_probs.map_or(lp[k], |o| o[k]);
    let threshold = entropy_threshold(cfg.top_entropy_quantile, x.entropies, mask, scratch)?;
    let emask = |k: usize| -> bool {
        mask[k]
            && match threshold {
                None => true,
                Some(None) => false,
                Some(Some(th)) => x.entropies[k] >= th,
            }
    };
    let mut kl_cfg = KlConfig::new(KlEstimator::K3);
    kl_cfg.log_ratio_clamp = cfg.log_ratio_clamp;
    let b = dims.batch;
    let scale = F::one()
        / F::of_usize(b.max(1))
        / F::of(if cfg.train {
            cfg.gradient_accumulation_steps
        } else {
            1.0
        });
    if let Some(g) = grad_log_probs.as_deref_mut() {
        for v in g.iter_mut() {
            *v = F::zero();
        }
    }
    let mut out = SequenceLossOutput::<F>::default();
    let mut metrics = TokenClipMetrics::default();
    let (mut kl_sum, mut e_sum) = (F::zero(), F::zero());
    let total_valid = row_count(mask);
    for i in 0..b {
        let row = dims.row(i);
        let a = x.advantages[i];
        let n = row_count(&mask[row.clone()]);
        let mut m2 = 0usize;
        let mut sum = F::zero();
        let mut row_metrics = RowClip::default();
        for k in row.clone() {
            if !mask[k] {
                continue;
            }
            let xr = lp[k] - old(k);
            let (low, high) = gmpo_clip_indicators(cfg.eps_low, cfg.eps_high, &xr, &a);
            row_metrics.add(low, high);
            e_sum += x.entropies[k];
            if emask(k) {
                m2 += 1;
                sum += gmpo_clipped_log_ratio(cfg.eps_low, cfg.eps_high, xr, a).0;
            }
        }
        metrics.add_row(&row_metrics, n);
        let den = F::of_usize(m2.max(1));
        let (row_loss, d_mean) = gmpo_sequence_objective(sum / den, a, cfg.log_ratio_clamp);
        out.loss += row_loss * scale;
        let nf = F::of_usize(n.max(1));
        let beta = F::of(cfg.beta);
        let mut row_kl = F::zero();
        for k in row.clone() {
            if !mask[k] {
                continue;
            }
            let mut g = F::zero();
            if emask(k) {
                let d = gmpo_clipped_log_ratio(cfg.eps_low, cfg.eps_high, lp[k] - old(k), a).1;
                g += d_mean * d / den;
            }
            if cfg.beta != 0.0 {
                let rf = x.ref_log_probs.map_or(F::zero(), |r| r[k]);
                let (kv, kg) = kl_cfg.estimate(lp[k], rf);
                row_kl += kv;
                kl_sum += kv;
                g += beta * kg / nf;
            }
            if let Some(gr) = grad_log_probs.as_deref_mut() {
                gr[k] = g * scale;
            }
        }
        if cfg.beta != 0.0 {
            out.loss += beta * row_kl / nf * scale;
        }
    }
    let den = F::of_usize(total_valid.max(1));
    out.entropy = e_sum / den;
    if cfg.beta != 0.0 {
        out.kl = kl_sum / den;
    }
    out.clip = metrics.finish(total_valid);
    Ok(out)
}

/// GMPO's sign-aware log-space clip of one log-ratio: the clipped value
/// and its derivative with respect to `x`.
///
/// # Formula
///
/// ```text
/// x̂ = clamp(x, −ε_low, ε_high)
/// x̃ = min(x, x̂) if A > 0 else max(x, x̂)
/// ```
///
/// # Gradient
///
/// `1` where `x̃ = x` (inside the range, or outside on the side that is not
/// clipped for this sign of `A`), else `0`.
///
/// # Peers
///
/// TRL experimental `GMPOTrainer._compute_loss`.
pub fn gmpo_clipped_log_ratio<E: Elem>(eps_low: f64, eps_high: f64, x: E, advantage: E) -> (E, E) {
    let pos = advantage.gt_scalar(0.0);
    let inside = x.ge_scalar(-eps_low).and(x.le_scalar(eps_high));
    let below = x.lt_scalar(-eps_low);
    let above = x.gt_scalar(eps_high);
    let live = inside.or(pos.clone().and(below)).or(pos.not().and(above));
    let clamped = x.clone().clamp(-eps_low, eps_high);
    let one = x.full_like(1.0);
    let zero = x.full_like(0.0);
    (E::select(&live, x, clamped), E::select(&live, one, zero))
}

#[derive(Default)]
struct RowClip {
    low: usize,
    high: usize,
    region: usize,
}

impl RowClip {
    fn add(&mut self, low: bool, high: bool) {
        self.low += low as usize;
        self.high += high as usize;
        self.region += (low || high) as usize;
    }
}

#[derive(Default)]
struct TokenClipMetrics {
    low: usize,
    high: usize,
    region: usize,
    low_min: Option<f64>,
    high_max: Option<f64>,
}

impl TokenClipMetrics {
    fn add_row(&mut self, r: &RowClip, n: usize) {
        self.low += r.low;
        self.high += r.high;
        self.region += r.region;
        if n > 0 {
            let lf = r.low as f64 / n as f64;
            let hf = r.high as f64 / n as f64;
            self.low_min = Some(self.low_min.map_or(lf, |m| m.min(lf)));
            self.high_max = Some(self.high_max.map_or(hf, |m| m.max(hf)));
        }
    }
    fn finish<F: Real>(&self, total: usize) -> ClipMetrics<F> {
        let den = total.max(1) as f64;
        ClipMetrics {
            low_mean: F::of(self.low as f64 / den),
            high_mean: F::of(self.high as f64 / den),
            region_mean: F::of(self.region as f64 / den),
            low_min: F::of(self.low_min.unwrap_or(0.0)),
            high_max: F::of(self.high_max.unwrap_or(0.0)),
        }
    }
}

// ---------------------------------------------------------------------------
// RLOO
// ---------------------------------------------------------------------------

/// Configuration of [`rloo_loss`] (TRL `RLOOTrainer`).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RlooConfig {
    /// `ε_low`.
    pub eps_low: f64,
    /// `ε_high`.
    pub eps_high: f64,
    /// Safety clamp of the sequence log-ratio (TRL: none; preset 20).
    pub log_ratio_clamp: Option<f64>,
}

impl RlooConfig {
    /// TRL's defaults (ε = 0.2) with the safety clamp.
    pub fn trl() -> Self {
        RlooConfig {
            eps_low: 0.2,
            eps_high: 0.2,
            log_ratio_clamp: Some(20.0),
        }
    }

    /// Checks the ranges.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] for a negative or non-finite ε or a non-positive clamp.
    pub fn validate(&self) -> Result<(), Error> {
        check_finite_nonneg("epsilon", self.eps_low)?;
        check_finite_nonneg("epsilon_high", self.eps_high)?;
        if let Some(c) = self.log_ratio_clamp {
            check_param(
                c.is_finite() && c > 0.0,
                "log_ratio_clamp",
                c,
                "must be finite and > 0",
            )?;
        }
        Ok(())
    }
}

/// RLOO's sequence-ratio clipped loss (TRL `RLOOTrainer._compute_loss`).
/// Reads `log_probs`, `entropies`, `mask` (TRL: the completion mask) and
/// `advantages` of `x`; the old policy is the per-row `old_logps`.
///
/// # Formula
///
/// ```text
/// x_i = Σ_valid log π_t − old_logps_i,   r_i = e^{x_i}
/// L   = (1/B) Σ_i max(−A_i·r_i, −A_i·clip(r_i, 1−ε_low, 1+ε_high))
/// ```
///
/// # Gradient
///
/// `∂L/∂log π_t = ∂ℓ_i/∂x_i / B` on every valid token of row `i` (the
/// [`ppo_clipped_surrogate`] gradient), 0 on padding.
///
/// # Peers
///
/// TRL `trl/trainer/rloo_trainer.py` (no accumulation divisor: the HF
/// Trainer scales it). Clip metrics are means/min/max over rows.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for inconsistent lengths (`old_logps`, `advantages`: `B`).
pub fn rloo_loss<F: Real>(
    cfg: &RlooConfig,
    x: &GrpoInputs<'_, F>,
    old_logps: &[F],
    mut grad_log_probs: Option<&mut [F]>,
) -> Result<SequenceLossOutput<F>, Error> {
    cfg.validate()?;
    x.validate()?;
    let (dims, log_probs, entropies, mask, advantages) =
        (x.dims, x.log_probs, x.entropies, x.mask, x.advantages);
    check_len("old_logps", old_logps.len(), dims.batch)?;
    if let Some(g) = grad_log_probs.as_deref() {
        check_len("grad_log_probs", g.len(), dims.len())?;
    }
    let clip = ClipConfig {
        eps_low: cfg.eps_low,
        eps_high: cfg.eps_high,
        dual_clip: None,
        log_ratio_clamp: cfg.log_ratio_clamp,
    };
    let b = dims.batch;
    let bf = F::of_usize(b.max(1));
    let mut out = SequenceLossOutput::<F>::default();
    let (mut low, mut high, mut region) = (0usize, 0usize, 0usize);
    let (mut low_min, mut high_max): (Option<F>, Option<F>) = (None, None);
    let (mut e_sum, mut n_total) = (F::zero(), 0usize);
    for i in 0..b {
        let row = dims.row(i);
        let mut s = F::zero();
        for k in row.clone() {
            if mask[k] {
                s += log_probs[k];
                e_sum += entropies[k];
                n_total += 1;
            }
        }
        let a = advantages[i];
        let t = ppo_clipped_surrogate(&clip, s, old_logps[i], a);
        out.loss += t.loss / bf;
        // TRL tests the unclamped ratio; with the clamp inactive they agree.
        let r = t.ratio;
        let (lo, hi) = trl_clip_indicators(cfg.eps_low, cfg.eps_high, &r, &a);
        low += lo as usize;
        high += hi as usize;
        region += (lo || hi) as usize;
        let ind = |c: bool| if c { F::one() } else { F::zero() };
        low_min = Some(low_min.map_or(ind(lo), |m: F| if ind(lo) < m { ind(lo) } else { m }));
        high_max = Some(high_max.map_or(ind(hi), |m: F| if ind(hi) > m { ind(hi) } else { m }));
        if let Some(g) = grad_log_probs.as_deref_mut() {
            let gv = t.grad / bf;
            for k in row {
                g[k] = if mask[k] { gv } else { F::zero() };
            }
        }
    }
    out.entropy = e_sum / F::of_usize(n_total.max(1));
    out.clip = ClipMetrics {
        low_mean: F::of_usize(low) / bf,
        high_mean: F::of_usize(high) / bf,
        region_mean: F::of_usize(region) / bf,
        low_min: low_min.unwrap_or(F::zero()),
        high_max: high_max.unwrap_or(F::zero()),
    };
    Ok(out)
}
