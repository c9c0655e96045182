//! Rollout correction: importance-sampling weights and rejection masks between
//! the rollout (sampling) policy and the training policy.
//!
//! # Overview
//!
//! The rollout engine (vLLM, SGLang, …) samples with log-probs
//! `log μ(a)` that differ from the trainer's `log π(a)` for the same tokens
//! (precision, kernels, staleness). With the per-token log-ratio
//! `ℓ = log π − log μ`, this module offers
//!
//! | tool | what it computes | peers |
//! |---|---|---|
//! | [`rollout_correction_weights`] | token IS `e^ℓ` or sequence IS `e^{Σℓ}`, truncated (TIS) or band-masked (IcePop), optionally batch-normalised, with diagnostics | verl `compute_rollout_correction_weights` |
//! | [`rollout_rejection_mask`] | hard trust region: drop tokens / sequences whose divergence (k1/k2/k3 at token level, or their per-sequence sum / mean / max) leaves its bounds | verl `compute_rollout_rejection_mask` |
//! | [`off_policy_metrics`] | KL, k3-KL, perplexities, χ² between the two policies | verl `compute_offpolicy_metrics` |
//! | [`rollout_correction_and_rejection`] | the three above from the two log-prob matrices | verl `compute_rollout_correction_and_rejection_mask` |
//! | [`bypass_policy_loss`] | PPO-clip or REINFORCE loss against the rollout policy, with the rejection mask as loss mask (value + gradient) | verl `compute_policy_loss_bypass_mode` |
//! | [`vllm_importance_sampling_ratio`] | TRL's vLLM IS ratio (token/sequence, truncate/mask) with its metrics | TRL `GRPOTrainer` (vLLM IS correction) |
//!
//! All log-ratios are clamped to `±20` before `exp` (verl's `SAFETY_BOUND`),
//! except where a peer does not clamp (TRL's vLLM ratio).
//!
//! # Masking
//!
//! Masked positions are never read into any value: weights there are 0,
//! rejection keeps them masked, and NaN/±inf in padding cannot reach a
//! metric. verl refuses an all-masked batch; posttrain returns all-zero
//! weights and metrics instead (and a bypass loss of exactly 0 with a zero
//! gradient).
//!
//! # Example
//!
//! ```
//! use posttrain_core::policy::rollout::{rollout_correction_weights, IsConfig};
//! use posttrain_core::Dims;
//! let cfg: IsConfig = IsConfig::new("token".parse()?, "2.0".parse()?, false)?;
//! let log_ratio = [0.1f64, 1.0, f64::NAN];
//! let mask = [true, true, false];
//! let mut w = [0.0; 3];
//! let m = rollout_correction_weights(&cfg, Dims::new(1, 3), &log_ratio, &mask, &mut w)?;
//! assert!((w[0] - 0.1f64.exp()).abs() < 1e-15);
//! assert_eq!(w[1], 2.0); // e¹ truncated at 2
//! assert_eq!(w[2], 0.0); // padding
//! assert!(m.ratio_fraction_high > 0.49);
//! # Ok::<(), posttrain_core::Error>(())
//! ```

use crate::aggregate::{aggregate, AggMode, GlobalNorm};
use crate::elem::{Elem, MaskElem, Real};
use crate::error::{check_len, check_param, Error};
use crate::policy::{ppo_clipped_surrogate, ClipConfig};
use crate::shape::Dims;

/// verl's safety bound: log-ratios are clamped to `[−20, 20]` before `exp`.
pub const SAFETY_BOUND: f64 = 20.0;

/// verl's masked-mean epsilon: `Σ x / (n + 1e-8)`.
const MEAN_EPS: f64 = 1e-8;

// ---------------------------------------------------------------------------
// Per-token kernels (generic over Elem)
// ---------------------------------------------------------------------------

/// The raw importance weight `exp(clamp(ℓ, −20, 20))` of one log-ratio `ℓ`
/// (a token's, or a sequence's summed log-ratio).
///
/// # Formula
///
/// ```text
/// w = exp(clamp(ℓ, −20, 20))
/// ```
///
/// # Gradient
///
/// `∂w/∂ℓ = w` inside the bound, 0 where the clamp is active. verl treats the
/// weights as constants (detached), and so do the drivers of this module.
///
/// # Peers
///
/// verl `compute_rollout_correction_weights` (`SAFETY_BOUND = 20`).
pub fn safe_importance_weight<E: Elem>(log_ratio: E) -> E {
    log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp()
}

/// Applies an IS threshold to a raw weight: truncation `min(w, upper)` (TIS)
/// or the IcePop band (`w` if `lower ≤ w ≤ upper`, else 0).
///
/// # Formula
///
/// ```text
/// TIS:    min(w, upper)
/// IcePop: w · 1[lower ≤ w ≤ upper]      (a selection: out-of-band weights are exactly 0)
/// ```
///
/// # Gradient
///
/// `1` where the weight passes through, 0 where it is truncated or zeroed.
///
/// # Peers
///
/// verl: a float threshold truncates; a `"lower_upper"` string is IcePop.
pub fn threshold_importance_weight<E: Elem>(th: &IsThreshold, raw: E) -> E {
    match th.lower {
        None => {
            let up = raw.full_like(th.upper);
            raw.min(up)
        }
        Some(lo) => {
            let keep = raw.ge_scalar(lo).and(raw.le_scalar(th.upper));
            let zero = raw.full_like(0.0);
            E::select(&keep, raw, zero)
        }
    }
}

/// One token's divergence estimate from its log-ratio `ℓ = log π − log μ`,
/// after the `±20` safety clamp.
///
/// # Formula
///
/// ```text
/// x  = clamp(ℓ, −20, 20)
/// k1 = −x,   k2 = x² / 2,   k3 = eˣ − 1 − x
/// ```
///
/// # Gradient
///
/// Not needed (rejection is a hard mask): `−1`, `x`, `eˣ − 1` inside the
/// clamp, if you want it.
///
/// # Peers
///
/// verl `compute_rollout_rejection_mask` (`token_k1`, `token_k2`, `token_k3`).
pub fn rejection_divergence<E: Elem>(div: Divergence, log_ratio: E) -> E {
    let x = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND);
    match div {
        Divergence::K1 => x.neg(),
        Divergence::K2 => x.clone().mul(x).mul_scalar(0.5),
        Divergence::K3 => x.clone().exp().add_scalar(-1.0).sub(x),
    }
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// The granularity of the importance weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum IsLevel {
    /// One weight per token, `e^{ℓ_t}` (biased, low variance).
    Token,
    /// One weight per sequence, `e^{Σ_t ℓ_t}` over its valid tokens
    /// (unbiased, high variance), broadcast to its tokens.
    Sequence,
}

impl core::str::FromStr for IsLevel {
    type Err = Error;
    /// Parses `token` or `sequence` (verl's `rollout_is`).
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "token" => Ok(IsLevel::Token),
            "sequence" => Ok(IsLevel::Sequence),
            _ => Err(Error::unknown_option(
                "importance-sampling level",
                s,
                "token, sequence",
            )),
        }
    }
}

/// The bounds applied to the importance weights.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct IsThreshold {
    /// Upper bound (`> 0`).
    pub upper: f64,
    /// `None`: truncate at `upper` (TIS). `Some(lower)`: zero every weight
    /// outside `[lower, upper]` (IcePop), `0 < lower ≤ upper`.
    pub lower: Option<f64>,
}

impl IsThreshold {
    /// Truncation at `upper` (TIS).
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] unless `upper` is finite and `> 0`.
    pub fn truncate(upper: f64) -> Result<Self, Error> {
        let t = IsThreshold { upper, lower: None };
        t.validate()?;
        Ok(t)
    }

    /// The IcePop band `[lower, upper]`.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] unless `0 < lower ≤ upper` (finite).
    pub fn band(lower: f64, upper: f64) -> Result<Self, Error> {
        let t = IsThreshold {
            upper,
            lower: Some(lower),
        };
        t.validate()?;
        Ok(t)
    }

    /// The lower bound the diagnostics use: `lower`, or `1 / upper` for TIS.
    pub fn diagnostic_lower(&self) -> f64 {
        self.lower.unwrap_or(1.0 / self.upper)
    }

    fn validate(&self) -> Result<(), Error> {
        check_param(
            self.upper.is_finite() && self.upper > 0.0,
            "rollout_is_threshold",
            self.upper,
            "must be finite and > 0",
        )?;
        if let Some(lo) = self.lower {
            check_param(
                lo.is_finite() && lo > 0.0,
                "rollout_is_threshold (lower)",
                lo,
                "must be finite and > 0",
            )?;
            check_param(
                lo <= self.upper,
                "rollout_is_threshold (lower)",
                lo,
                "must be <= the upper bound",
            )?;
        }
        Ok(())
    }
}

fn parse_f64(kind: &'static str, s: &str, expected: &'static str) -> Result<f64, Error> {
    s.trim()
        .parse::<f64>()
        .map_err(|_| Error::unknown_option(kind, s, expected))
}

impl core::str::FromStr for IsThreshold {
    type Err = Error;
    /// Parses verl's `rollout_is_threshold`: `"2.0"` (TIS) or
    /// `"lower_upper"` such as `"0.5_2.0"` (IcePop).
    fn from_str(s: &str) -> Result<Self, Error> {
        const EXP: &str = "a positive number (\"2.0\") or \"lower_upper\" (\"0.5_2.0\")";
        let s = s.trim();
        match s.split_once('_') {
            Some((lo, up)) => IsThreshold::band(
                parse_f64("IS threshold", lo, EXP)?,
                parse_f64("IS threshold", up, EXP)?,
            ),
            None => IsThreshold::truncate(parse_f64("IS threshold", s, EXP)?),
        }
    }
}

/// Configuration of the importance-sampling weights.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct IsConfig {
    /// Token or sequence weights.
    pub level: IsLevel,
    /// Truncation or IcePop band.
    pub threshold: IsThreshold,
    /// Divide the weights by their batch mean (tokens, or sequences for
    /// sequence weights) when that mean is `> 1e-8`.
    pub batch_normalize: bool,
}

impl IsConfig {
    /// A validated configuration.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] for an invalid threshold.
    pub fn new(
        level: IsLevel,
        threshold: IsThreshold,
        batch_normalize: bool,
    ) -> Result<Self, Error> {
        threshold.validate()?;
        Ok(IsConfig {
            level,
            threshold,
            batch_normalize,
        })
    }
}

/// The divergence a rejection criterion measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Divergence {
    /// `−ℓ` (bounded on both sides: `log lower ≤ −ℓ ≤ log upper`).
    K1,
    /// `ℓ²/2` (upper bound only).
    K2,
    /// `e^ℓ − 1 − ℓ` (upper bound only).
    K3,
}

/// How a rejection criterion aggregates the per-token divergence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum RsAggregation {
    /// Per token: rejects single tokens.
    Token,
    /// Sum over the sequence's valid tokens: rejects whole sequences.
    SeqSum,
    /// Mean over the valid tokens (`Σ / (n + 1e-8)`): rejects whole sequences.
    SeqMean,
    /// Maximum over the valid tokens (0 for an empty row): rejects whole sequences.
    SeqMax,
}

/// One rejection option, e.g. `token_k1` or `seq_max_k3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RsOption {
    /// Aggregation level.
    pub aggregation: RsAggregation,
    /// Divergence.
    pub divergence: Divergence,
}

const RS_NAMES: [(&str, RsAggregation, Divergence); 11] = [
    ("token_k1", RsAggregation::Token, Divergence::K1),
    ("token_k2", RsAggregation::Token, Divergence::K2),
    ("token_k3", RsAggregation::Token, Divergence::K3),
    ("seq_sum_k1", RsAggregation::SeqSum, Divergence::K1),
    ("seq_sum_k2", RsAggregation::SeqSum, Divergence::K2),
    ("seq_sum_k3", RsAggregation::SeqSum, Divergence::K3),
    ("seq_mean_k1", RsAggregation::SeqMean, Divergence::K1),
    ("seq_mean_k2", RsAggregation::SeqMean, Divergence::K2),
    ("seq_mean_k3", RsAggregation::SeqMean, Divergence::K3),
    ("seq_max_k2", RsAggregation::SeqMax, Divergence::K2),
    ("seq_max_k3", RsAggregation::SeqMax, Divergence::K3),
];

const RS_EXPECTED: &str = "token_k1, token_k2, token_k3, seq_sum_k1, seq_sum_k2, seq_sum_k3, seq_mean_k1, seq_mean_k2, seq_mean_k3, seq_max_k2, seq_max_k3";

impl RsOption {
    /// The option's name as verl spells it (`"seq_mean_k3"`, …).
    pub fn name(self) -> &'static str {
        RS_NAMES
            .iter()
            .find(|(_, a, d)| *a == self.aggregation && *d == self.divergence)
            .map(|(n, _, _)| *n)
            // `seq_max_k1` cannot be built through `FromStr`.
            .unwrap_or("seq_max_k1")
    }
}

impl core::str::FromStr for RsOption {
    type Err = Error;
    /// Parses one of verl's rejection options (`token_k1` … `seq_max_k3`;
    /// there is no `seq_max_k1`).
    fn from_str(s: &str) -> Result<Self, Error> {
        RS_NAMES
            .iter()
            .find(|(n, _, _)| *n == s)
            .map(|&(_, aggregation, divergence)| RsOption {
                aggregation,
                divergence,
            })
            .ok_or_else(|| Error::unknown_option("rejection-sampling option", s, RS_EXPECTED))
    }
}

/// One rejection criterion: an option and its bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RsCriterion {
    /// What is measured.
    pub option: RsOption,
    /// k1 only: the lower ratio bound (`−ℓ ≥ log lower`).
    pub lower: Option<f64>,
    /// The upper bound: a ratio bound for k1 (`−ℓ ≤ log upper`), the
    /// divergence bound otherwise.
    pub upper: f64,
}

impl RsCriterion {
    /// A validated criterion. For k1, `lower = None` means `1 / upper`.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] for a non-positive bound or `lower > upper`;
    /// [`Error::Invalid`] for a lower bound on a k2/k3 option.
    pub fn new(option: RsOption, lower: Option<f64>, upper: f64) -> Result<Self, Error> {
        // A bad `upper` (so a bad `1 / upper`) is reported by `validate` first.
        let lower = match option.divergence {
            Divergence::K1 => Some(lower.unwrap_or(1.0 / upper)),
            _ => lower,
        };
        let c = RsCriterion {
            option,
            lower,
            upper,
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks a criterion however it was built (fields, `serde`): what
    /// [`RsCriterion::new`] guarantees.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] for a non-positive or non-finite bound or
    /// `lower > upper`; [`Error::Invalid`] for a k1 criterion without its
    /// lower bound, a lower bound on a k2/k3 option, or `seq_max_k1` (an
    /// option verl does not have, which [`RsOption`]'s `FromStr` refuses).
    pub fn validate(&self) -> Result<(), Error> {
        check_param(
            self.upper.is_finite() && self.upper > 0.0,
            "rollout_rs_threshold",
            self.upper,
            "must be finite and > 0",
        )?;
        if self.option.aggregation == RsAggregation::SeqMax
            && self.option.divergence == Divergence::K1
        {
            return Err(Error::Invalid {
                input: "rollout_rs",
                rule: "there is no seq_max_k1 option (verl has seq_max_k2 and seq_max_k3)",
            });
        }
        match (self.option.divergence, self.lower) {
            (Divergence::K1, Some(lo)) => {
                check_param(
                    lo.is_finite() && lo > 0.0,
                    "rollout_rs_threshold (lower)",
                    lo,
                    "must be finite and > 0",
                )?;
                check_param(
                    lo <= self.upper,
                    "rollout_rs_threshold (lower)",
                    lo,
                    "must be <= the upper bound",
                )
            }
            (Divergence::K1, None) => Err(Error::Invalid {
                input: "rollout_rs_threshold",
                rule: "a k1 criterion carries its lower bound (RsCriterion::new sets 1 / upper)",
            }),
            (_, Some(_)) => Err(Error::Invalid {
                input: "rollout_rs_threshold",
                rule: "k2/k3 options take a single upper bound, not \"lower_upper\"",
            }),
            (_, None) => Ok(()),
        }
    }

    /// The bounds the statistic is compared with: `(log lower, log upper)`
    /// for k1, `(0, upper)` otherwise (the lower one is used by k1 only).
    fn stat_bounds(&self) -> (f64, f64) {
        match self.lower {
            Some(lo) => (lo.ln(), self.upper.ln()),
            None => (0.0, self.upper),
        }
    }

    fn is_k1(&self) -> bool {
        self.option.divergence == Divergence::K1
    }

    fn keeps<F: Real>(&self, stat: F) -> bool {
        let (lo, up) = self.stat_bounds();
        if self.is_k1() {
            stat >= F::of(lo) && stat <= F::of(up)
        } else {
            stat <= F::of(up)
        }
    }
}

/// At most this many distinct rejection options (every option verl has).
pub const MAX_RS_OPTIONS: usize = 11;

/// A conjunction of rejection criteria: a token survives only if every
/// criterion keeps it (duplicates are dropped, first occurrence wins).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RsConfig {
    criteria: [Option<RsCriterion>; MAX_RS_OPTIONS],
}

impl RsConfig {
    /// Builds from criteria (duplicated options are dropped after the first).
    ///
    /// # Errors
    ///
    /// [`Error::Empty`] when `criteria` is empty; the errors of
    /// [`RsCriterion::validate`].
    pub fn new(criteria: &[RsCriterion]) -> Result<Self, Error> {
        let mut out = RsConfig {
            criteria: [None; MAX_RS_OPTIONS],
        };
        let mut n = 0;
        for c in criteria {
            c.validate()?;
            if out.criteria[..n]
                .iter()
                .flatten()
                .any(|o| o.option == c.option)
            {
                continue;
            }
            if n == MAX_RS_OPTIONS {
                break; // unreachable: only 11 distinct options exist
            }
            out.criteria[n] = Some(*c);
            n += 1;
        }
        if n == 0 {
            return Err(Error::Empty {
                input: "rollout_rs",
            });
        }
        Ok(out)
    }

    /// Checks a configuration however it was built (a deserialized one
    /// bypasses [`RsConfig::new`]): at least one criterion, each valid.
    ///
    /// # Errors
    ///
    /// [`Error::Empty`] without criteria; the errors of
    /// [`RsCriterion::validate`].
    pub fn validate(&self) -> Result<(), Error> {
        if self.criteria.iter().all(Option::is_none) {
            return Err(Error::Empty {
                input: "rollout_rs",
            });
        }
        self.criteria
            .iter()
            .flatten()
            .try_for_each(RsCriterion::validate)
    }

    /// Parses verl's `rollout_rs` (comma-separated options) and
    /// `rollout_rs_threshold` (one spec shared by all, or one per distinct
    /// option, comma-separated; a spec is `"upper"` or, for k1 options,
    /// `"lower_upper"`; a single k1 upper means `lower = 1/upper`).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownOption`] for an unknown option or a non-numeric spec;
    /// [`Error::Empty`] for no options or no thresholds; [`Error::Invalid`]
    /// when the number of thresholds is neither 1 nor the number of options;
    /// the errors of [`RsCriterion::new`].
    pub fn parse(options: &str, thresholds: &str) -> Result<Self, Error> {
        const EXP: &str = "a positive number, or \"lower_upper\" for k1 options";
        let mut opts = [None; MAX_RS_OPTIONS];
        let mut n = 0;
        for part in options.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let o: RsOption = part.parse()?;
            if opts[..n].iter().flatten().any(|x: &RsOption| *x == o) {
                continue;
            }
            opts[n] = Some(o);
            n += 1;
        }
        if n == 0 {
            return Err(Error::Empty {
                input: "rollout_rs",
            });
        }
        let specs = || {
            thresholds
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
        };
        let count = specs().count();
        if count == 0 {
            return Err(Error::Empty {
                input: "rollout_rs_threshold",
            });
        }
        if count != 1 && count != n {
            return Err(Error::Invalid {
                input: "rollout_rs_threshold",
                rule:
                    "needs one threshold shared by all options or exactly one per distinct option",
            });
        }
        let mut crit = [None; MAX_RS_OPTIONS];
        for (i, o) in opts[..n].iter().flatten().enumerate() {
            let spec = if count == 1 {
                specs().next()
            } else {
                specs().nth(i)
            }
            .unwrap_or("");
            let (lower, upper) = match spec.split_once('_') {
                Some((lo, up)) => (
                    Some(parse_f64("rejection threshold", lo, EXP)?),
                    parse_f64("rejection threshold", up, EXP)?,
                ),
                None => (None, parse_f64("rejection threshold", spec, EXP)?),
            };
            crit[i] = Some(RsCriterion::new(*o, lower, upper)?);
        }
        Ok(RsConfig { criteria: crit })
    }

    /// Parses `options` with one numeric threshold shared by all of them
    /// (verl's float `rollout_rs_threshold`).
    ///
    /// # Errors
    ///
    /// As [`RsConfig::parse`].
    pub fn parse_uniform(options: &str, threshold: f64) -> Result<Self, Error> {
        let mut crit = [None; MAX_RS_OPTIONS];
        let mut n = 0;
        for part in options.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let o: RsOption = part.parse()?;
            if crit[..n]
                .iter()
                .flatten()
                .any(|c: &RsCriterion| c.option == o)
            {
                continue;
            }
            crit[n] = Some(RsCriterion::new(o, None, threshold)?);
            n += 1;
        }
        if n == 0 {
            return Err(Error::Empty {
                input: "rollout_rs",
            });
        }
        Ok(RsConfig { criteria: crit })
    }

    /// The criteria, in order.
    pub fn criteria(&self) -> impl Iterator<Item = &RsCriterion> {
        self.criteria.iter().flatten()
    }

    /// Number of criteria.
    pub fn len(&self) -> usize {
        self.criteria().count()
    }

    /// Never true for a constructed config.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// Diagnostics of the importance weights (verl's `rollout_is_*`), all taken
/// before batch normalisation. "Valid" means unmasked; `n` the valid-token
/// count; means over tokens divide by `n + 1e-8` as verl does.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct IsMetrics<F> {
    /// Masked mean of the (thresholded) weights.
    pub mean: F,
    /// Token level: fraction of valid tokens whose raw weight is `> upper`.
    /// Sequence level: fraction of rows whose summed log-ratio is `> log upper`.
    pub ratio_fraction_high: F,
    /// As `ratio_fraction_high`, below the diagnostic lower bound
    /// (`lower`, or `1/upper` for TIS).
    pub ratio_fraction_low: F,
    /// Token level: largest valid weight. Sequence level:
    /// `exp(min(max_rows Σℓ, 20))` over every row.
    pub max: F,
    /// Token level: smallest valid weight. Sequence level:
    /// `exp(min(min_rows Σℓ, 20))` (verl does not clamp this one).
    pub min: F,
    /// Masked std (population) of the weights clamped to `[0, upper]`; 0 for `n ≤ 1`.
    pub std: F,
    /// Effective sample size `1 / mean((w / (mean w + 1e-8))²)` of the
    /// weights clamped to `[0, upper]`; 0 when every weight is 0 (verl: inf).
    pub eff_sample_size: F,
    /// Mean over every row of the row's mean weight.
    pub seq_mean: F,
    /// Unbiased std over rows of the row mean weights (0 for one row).
    pub seq_std: F,
    /// Largest row mean weight.
    pub seq_max: F,
    /// Smallest row mean weight.
    pub seq_min: F,
    /// `max |row mean − 1|`.
    pub seq_max_deviation: F,
    /// Fraction of rows whose raw (pre-threshold) mean weight is `> upper`.
    pub seq_fraction_high: F,
    /// Fraction of rows whose raw mean weight is below the diagnostic lower bound.
    pub seq_fraction_low: F,
    /// IcePop only: fraction of valid tokens whose raw weight is outside the band.
    pub oob_ratio: Option<F>,
    /// With batch normalisation: the mean the weights were divided by (1 when
    /// it was `≤ 1e-8`).
    pub batch_norm_factor: Option<F>,
}

/// Diagnostics of one rejection criterion (verl's `rollout_rs_<option>_*`).
/// The statistic is the per-token divergence (token options) or the row's
/// aggregate broadcast to its tokens (sequence options); "seq values" are
/// the row aggregates (sequence options) or the row means of the token
/// statistic (token options) over rows with a valid token. Bounds are
/// `log lower`/`log upper` for k1 and `0`/`upper` otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RsOptionMetrics<F> {
    /// Masked mean of the statistic over valid tokens.
    pub mean: F,
    /// Largest valid value (sequence options: largest seq value).
    pub max: F,
    /// Smallest valid value (sequence options: smallest seq value).
    pub min: F,
    /// Fraction above the upper bound (tokens, or valid rows for sequence options).
    pub fraction_high: F,
    /// Fraction below the lower bound (k1 only; 0 otherwise).
    pub fraction_low: F,
    /// Masked population std of the statistic clamped to its bounds; 0 for `n ≤ 1`.
    pub std: F,
    /// Mean of the seq values.
    pub seq_mean: F,
    /// Unbiased std of the seq values (0 for fewer than two).
    pub seq_std: F,
    /// Largest seq value.
    pub seq_max: F,
    /// Smallest seq value.
    pub seq_min: F,
    /// Largest `|seq value|`.
    pub seq_max_deviation: F,
    /// Fraction of seq values above the upper bound.
    pub seq_fraction_high: F,
    /// k1 only: fraction of seq values below the lower bound.
    pub seq_fraction_low: Option<F>,
    /// Fraction of valid tokens this criterion rejects (`/(n + 1e-8)`).
    pub masked_fraction: F,
    /// Fraction of rows with a valid token in which this criterion rejects any.
    pub seq_masked_fraction: F,
}

/// Diagnostics of a rejection mask: one entry per criterion, then the totals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RejectionMetrics<F> {
    /// Per criterion, in the config's order.
    pub options: [Option<(RsOption, RsOptionMetrics<F>)>; MAX_RS_OPTIONS],
    /// Fraction of valid tokens rejected by any criterion (`/(n + 1e-8)`).
    pub masked_fraction: F,
    /// Fraction of all rows that lost at least one valid token.
    pub seq_masked_fraction: F,
}

impl<F> RejectionMetrics<F> {
    /// The per-criterion metrics, in order.
    pub fn per_option(&self) -> impl Iterator<Item = &(RsOption, RsOptionMetrics<F>)> {
        self.options.iter().flatten()
    }
}

/// Off-policy diagnostics between the training policy `π` and the rollout
/// policy `μ` (verl's `compute_offpolicy_metrics`). Row quantities use the
/// masked row mean `Σ / (nᵢ + 1e-8)`; "mean over rows" includes every row.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OffPolicyMetrics<F> {
    /// Mean over rows of `exp(clamp(−row mean log π, ±20))` (verl does not
    /// clamp; this only matters for a mean log-prob below −20).
    pub training_ppl: F,
    /// Mean over rows of `−row mean log π`.
    pub training_log_ppl: F,
    /// Masked mean of `log μ − log π`.
    pub kl: F,
    /// Masked mean of `e^ℓ − ℓ − 1`, `ℓ = log π − log μ` clamped to `±20`
    /// (verl does not clamp here; posttrain does, to stay finite).
    pub k3_kl: F,
    /// Mean over rows of `exp(clamp(−row mean log μ, ±20))`.
    pub rollout_ppl: F,
    /// Mean over rows of `−row mean log μ`.
    pub rollout_log_ppl: F,
    /// Mean over rows of `dᵢ = row mean log μ − row mean log π`.
    pub log_ppl_diff: F,
    /// Mean of `|dᵢ|`.
    pub log_ppl_abs_diff: F,
    /// Max of `dᵢ`.
    pub log_ppl_diff_max: F,
    /// Min of `dᵢ`.
    pub log_ppl_diff_min: F,
    /// Mean of `exp(clamp(dᵢ, ±20))`.
    pub ppl_ratio: F,
    /// Masked mean of `exp(2·clamp(ℓ, ±20))` minus 1.
    pub chi2_token: F,
    /// Mean over rows of `exp(2·clamp(Σℓ, ±20))` minus 1.
    pub chi2_seq: F,
}

/// Everything [`rollout_correction_and_rejection`] reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RolloutCorrectionMetrics<F> {
    /// IS diagnostics (when IS is configured).
    pub is: Option<IsMetrics<F>>,
    /// Rejection diagnostics (when rejection is configured).
    pub rs: Option<RejectionMetrics<F>>,
    /// Off-policy diagnostics (always).
    pub off_policy: OffPolicyMetrics<F>,
}

// ---------------------------------------------------------------------------
// Small reduction helpers
// ---------------------------------------------------------------------------

#[inline]
fn vmean<F: Real>(sum: F, count: usize) -> F {
    sum / (F::of_usize(count) + F::of(MEAN_EPS))
}

#[inline]
fn frac<F: Real>(hits: usize, total: usize) -> F {
    if total == 0 {
        F::zero()
    } else {
        F::of_usize(hits) / F::of_usize(total)
    }
}

/// Running min / max / sum / count over selected values.
#[derive(Clone, Copy)]
struct Stats<F> {
    n: usize,
    sum: F,
    min: F,
    max: F,
}

impl<F: Real> Stats<F> {
    fn new() -> Self {
        Stats {
            n: 0,
            sum: F::zero(),
            min: F::infinity(),
            max: F::neg_infinity(),
        }
    }
    fn push(&mut self, v: F) {
        self.n += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }
    fn mean(&self) -> F {
        if self.n == 0 {
            F::zero()
        } else {
            self.sum / F::of_usize(self.n)
        }
    }
    fn min_or_zero(&self) -> F {
        if self.n == 0 {
            F::zero()
        } else {
            self.min
        }
    }
    fn max_or_zero(&self) -> F {
        if self.n == 0 {
            F::zero()
        } else {
            self.max
        }
    }
}

/// verl's masked std `sqrt(max(E[x²] − E[x]², 0))` with `E = Σ/(n + 1e-8)`,
/// from the sums `Σx`, `Σx²`. The moments are accumulated in `f64` whatever
/// `F` is: when every value sits on the same clamp bound the variance is a
/// tiny difference of two large moments, which `f32` cannot resolve.
fn verl_clamped_std<F: Real>(sum: f64, sum_sq: f64, n: usize) -> F {
    let d = n as f64 + MEAN_EPS;
    let mean = sum / d;
    let var = sum_sq / d - mean * mean;
    F::of(if var > 0.0 { sqrt_f64(var) } else { 0.0 })
}

fn sqrt_f64(x: f64) -> f64 {
    Elem::sqrt(x)
}

/// Unbiased std (torch `.std()`) of the values yielded by `it`, given their mean; 0 for n < 2.
fn unbiased_std<F: Real>(mean: F, n: usize, it: impl Iterator<Item = F>) -> F {
    if n < 2 {
        return F::zero();
    }
    let ss: F = it.map(|v| (v - mean) * (v - mean)).sum();
    (ss / F::of_usize(n - 1)).sqrt()
}

fn check_inputs(dims: Dims, pairs: &[(&'static str, usize)]) -> Result<(), Error> {
    for &(name, len) in pairs {
        check_len(name, len, dims.len())?;
    }
    Ok(())
}

fn row_valid_count(mask: &[bool]) -> usize {
    mask.iter().filter(|&&m| m).count()
}

fn row_masked_sum<F: Real>(x: &[F], mask: &[bool]) -> F {
    x.iter()
        .zip(mask)
        .filter(|(_, &m)| m)
        .fold(F::zero(), |a, (&v, _)| a + v)
}

// ---------------------------------------------------------------------------
// Importance-sampling weights
// ---------------------------------------------------------------------------

/// Writes the rollout-correction importance weights into `weights` and
/// returns their diagnostics.
///
/// # Formula
///
/// ```text
/// token:     raw_t = exp(clamp(ℓ_t, ±20))
/// sequence:  raw_t = exp(clamp(Σ_{valid s} ℓ_s, ±20))        for every valid t of the row
/// w_t = min(raw_t, upper)                  (TIS, float threshold)
/// w_t = raw_t · 1[lower ≤ raw_t ≤ upper]   (IcePop, "lower_upper")
/// w_t = 0                                  on masked positions
/// batch_normalize: w ← w / m  if m > 1e-8, with m the masked token mean
///                  (token level) or the mean of the row means over rows
///                  with a valid token (sequence level)
/// ```
///
/// # Gradient
///
/// None: the weights are constants of the loss (verl detaches them).
///
/// # Peers
///
/// verl `compute_rollout_correction_weights` with `compute_is_metrics`
/// (every metric, including the `+1e-8` of its masked means). An
/// all-masked batch (verl raises) gives zero weights and zero metrics.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `log_ratio`, `mask` or `weights` is not
/// `dims.len()` long.
///
/// # Example
///
/// ```
/// use posttrain_core::policy::rollout::{rollout_correction_weights, IsConfig, IsLevel, IsThreshold};
/// use posttrain_core::Dims;
/// let cfg = IsConfig::new(IsLevel::Sequence, IsThreshold::band(0.5, 2.0)?, false)?;
/// let lr = [0.2f64, 0.3, 5.0, -1.0];
/// let mask = [true, true, true, false];
/// let mut w = [0.0; 4];
/// rollout_correction_weights(&cfg, Dims::new(2, 2), &lr, &mask, &mut w)?;
/// assert!((w[0] - 0.5f64.exp()).abs() < 1e-12 && w[0] == w[1]);
/// assert_eq!(w[2], 0.0); // e⁵ is outside the band
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn rollout_correction_weights<F: Real>(
    cfg: &IsConfig,
    dims: Dims,
    log_ratio: &[F],
    mask: &[bool],
    weights: &mut [F],
) -> Result<IsMetrics<F>, Error> {
    cfg.threshold.validate()?;
    check_inputs(
        dims,
        &[
            ("log_ratio", log_ratio.len()),
            ("response_mask", mask.len()),
            ("weights", weights.len()),
        ],
    )?;
    let th = cfg.threshold;
    let n_valid = row_valid_count(mask);
    if n_valid == 0 || dims.batch == 0 {
        weights.iter_mut().for_each(|w| *w = F::zero());
        let mut m = IsMetrics::default();
        if th.lower.is_some() {
            m.oob_ratio = Some(F::zero());
        }
        if cfg.batch_normalize {
            m.batch_norm_factor = Some(F::one());
        }
        return Ok(m);
    }

    // Raw weight of a valid token (row log-sum given for sequence level).
    let raw_of = |lr: F, row_sum: F| -> F {
        match cfg.level {
            IsLevel::Token => safe_importance_weight(lr),
            IsLevel::Sequence => safe_importance_weight(row_sum),
        }
    };
    let row_sum_of = |r: usize| -> F {
        match cfg.level {
            IsLevel::Token => F::zero(),
            IsLevel::Sequence => row_masked_sum(&log_ratio[dims.row(r)], &mask[dims.row(r)]),
        }
    };

    // Pass 1: weights.
    for r in 0..dims.batch {
        let s = row_sum_of(r);
        for t in dims.row(r) {
            weights[t] = if mask[t] {
                threshold_importance_weight(&th, raw_of(log_ratio[t], s))
            } else {
                F::zero()
            };
        }
    }

    let upper = F::of(th.upper);
    let lower = F::of(th.diagnostic_lower());
    let mut m = IsMetrics::default();

    // Token-level aggregates.
    let mut w_stats = Stats::new();
    let (mut hi, mut lo, mut oob) = (0usize, 0usize, 0usize);
    let mut c1 = F::zero();
    let (mut c1_64, mut c2_64) = (0.0f64, 0.0f64);
    for r in 0..dims.batch {
        let s = row_sum_of(r);
        for t in dims.row(r) {
            if !mask[t] {
                continue;
            }
            let w = weights[t];
            w_stats.push(w);
            let raw = raw_of(log_ratio[t], s);
            hi += (raw > upper) as usize;
            lo += (raw < lower) as usize;
            if let Some(l) = th.lower {
                oob += (raw < F::of(l) || raw > upper) as usize;
            }
            let wc = w.clamp(0.0, th.upper);
            c1 += wc;
            c1_64 += wc.to_f64();
            c2_64 += wc.to_f64() * wc.to_f64();
        }
    }
    m.mean = vmean(w_stats.sum, n_valid);
    match cfg.level {
        IsLevel::Token => {
            m.ratio_fraction_high = vmean(F::of_usize(hi), n_valid);
            m.ratio_fraction_low = vmean(F::of_usize(lo), n_valid);
            m.max = w_stats.max;
            m.min = w_stats.min;
        }
        IsLevel::Sequence => {
            let (log_up, log_lo) = (F::of(th.upper.ln()), F::of(th.diagnostic_lower().ln()));
            let mut sums = Stats::new();
            let (mut h, mut l) = (0usize, 0usize);
            for r in 0..dims.batch {
                let s = row_sum_of(r);
                sums.push(s);
                h += (s > log_up) as usize;
                l += (s < log_lo) as usize;
            }
            m.max = sums.max.min(F::of(SAFETY_BOUND)).exp();
            m.min = sums.min.min(F::of(SAFETY_BOUND)).exp();
            m.ratio_fraction_high = frac(h, dims.batch);
            m.ratio_fraction_low = frac(l, dims.batch);
        }
    }
    if n_valid > 1 {
        m.std = verl_clamped_std(c1_64, c2_64, n_valid);
    }
    let mean_c = vmean(c1, n_valid);
    let denom = mean_c + F::of(MEAN_EPS);
    let mut norm2 = F::zero();
    for (&w, _) in weights.iter().zip(mask).filter(|(_, &k)| k) {
        let x = w.clamp(0.0, th.upper) / denom;
        norm2 += x * x;
    }
    // All weights zero (e.g. IcePop rejected everything): no effective
    // sample (verl divides by zero here).
    m.eff_sample_size = if norm2 > F::zero() {
        F::one() / vmean(norm2, n_valid)
    } else {
        F::zero()
    };

    // Row means of the weights and of the raw weights, over every row.
    let row_mean = |r: usize| -> F {
        let rr = dims.row(r);
        vmean(
            row_masked_sum(&weights[rr.clone()], &mask[rr.clone()]),
            row_valid_count(&mask[rr]),
        )
    };
    let mut rows = Stats::new();
    let (mut sh, mut sl) = (0usize, 0usize);
    let mut dev = F::zero();
    for r in 0..dims.batch {
        let sm = row_mean(r);
        rows.push(sm);
        dev = dev.max((sm - F::one()).abs());
        let s = row_sum_of(r);
        let rr = dims.row(r);
        let raw_sum = rr
            .clone()
            .filter(|&t| mask[t])
            .fold(F::zero(), |a, t| a + raw_of(log_ratio[t], s));
        let raw_mean = vmean(raw_sum, row_valid_count(&mask[rr]));
        sh += (raw_mean > upper) as usize;
        sl += (raw_mean < lower) as usize;
    }
    m.seq_mean = rows.mean();
    m.seq_std = unbiased_std(m.seq_mean, dims.batch, (0..dims.batch).map(row_mean));
    m.seq_max = rows.max;
    m.seq_min = rows.min;
    m.seq_max_deviation = dev;
    m.seq_fraction_high = frac(sh, dims.batch);
    m.seq_fraction_low = frac(sl, dims.batch);
    if th.lower.is_some() {
        m.oob_ratio = Some(vmean(F::of_usize(oob), n_valid));
    }

    if cfg.batch_normalize {
        let wm = match cfg.level {
            IsLevel::Token => m.mean,
            IsLevel::Sequence => {
                let mut acc = F::zero();
                let mut k = 0usize;
                for r in 0..dims.batch {
                    if row_valid_count(&mask[dims.row(r)]) > 0 {
                        acc += row_mean(r);
                        k += 1;
                    }
                }
                acc / F::of_usize(k).max(F::of(MEAN_EPS))
            }
        };
        if wm > F::of(MEAN_EPS) {
            for (w, _) in weights.iter_mut().zip(mask).filter(|(_, &k)| k) {
                *w /= wm;
            }
            m.batch_norm_factor = Some(wm);
        } else {
            m.batch_norm_factor = Some(F::one());
        }
    }
    Ok(m)
}

// ---------------------------------------------------------------------------
// Rejection mask
// ---------------------------------------------------------------------------

/// The row statistic of a sequence-level criterion (sum / mean / max of the
/// valid tokens' divergence), or the row mean of a token-level one.
fn row_statistic<F: Real>(opt: RsOption, lr: &[F], mask: &[bool]) -> F {
    let div = |x: F| rejection_divergence(opt.divergence, x);
    let n = row_valid_count(mask);
    let vals = lr
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m)
        .map(|(&x, _)| div(x));
    match opt.aggregation {
        RsAggregation::SeqSum => vals.fold(F::zero(), |a, v| a + v),
        RsAggregation::SeqMean | RsAggregation::Token => {
            vmean(vals.fold(F::zero(), |a, v| a + v), n)
        }
        RsAggregation::SeqMax => {
            if n == 0 {
                F::zero()
            } else {
                vals.fold(F::neg_infinity(), |a, v| a.max(v))
            }
        }
    }
}

/// Writes the rejection mask (`keep`: `mask` with every token or sequence a
/// criterion rejects turned off) and returns its diagnostics.
///
/// # Formula
///
/// With `dₜ` the per-token divergence of [`rejection_divergence`] and `D`
/// its row sum / mean (`Σ/(n+1e-8)`) / max over valid tokens:
///
/// ```text
/// token_k1:     keep t   iff  log lower ≤ dₜ ≤ log upper
/// token_k2/k3:  keep t   iff  dₜ ≤ upper
/// seq_*_k1:     keep row iff  log lower ≤ D ≤ log upper
/// seq_*_k2/k3:  keep row iff  D ≤ upper
/// keep = mask ∧ (every criterion keeps)
/// ```
///
/// `row_scratch` (length `dims.batch`) holds each criterion's row values.
///
/// # Gradient
///
/// None (a hard mask).
///
/// # Peers
///
/// verl `compute_rollout_rejection_mask` with `compute_rs_metrics` (every
/// metric). An all-masked batch (verl raises) keeps nothing and reports zeros.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for inputs or buffers of the wrong length; the
/// errors of [`RsConfig::validate`] (a deserialized configuration).
///
/// # Example
///
/// ```
/// use posttrain_core::policy::rollout::{rollout_rejection_mask, RsConfig};
/// use posttrain_core::Dims;
/// let cfg = RsConfig::parse("token_k1", "0.5_2.0")?;
/// let lr = [0.0f64, 1.0, -0.1];      // r = 1, e, 0.905
/// let mask = [true, true, true];
/// let mut keep = [false; 3];
/// let mut rows = [0.0; 1];
/// let m = rollout_rejection_mask(&cfg, Dims::new(1, 3), &lr, &mask, &mut keep, &mut rows)?;
/// assert_eq!(keep, [true, false, true]);
/// assert!((m.masked_fraction - 1.0 / 3.0).abs() < 1e-8);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn rollout_rejection_mask<F: Real>(
    cfg: &RsConfig,
    dims: Dims,
    log_ratio: &[F],
    mask: &[bool],
    keep: &mut [bool],
    row_scratch: &mut [F],
) -> Result<RejectionMetrics<F>, Error> {
    check_inputs(
        dims,
        &[
            ("log_ratio", log_ratio.len()),
            ("response_mask", mask.len()),
            ("keep", keep.len()),
        ],
    )?;
    check_len("row_scratch", row_scratch.len(), dims.batch)?;
    cfg.validate()?;
    keep.copy_from_slice(mask);
    let n_valid = row_valid_count(mask);
    let mut out = RejectionMetrics {
        options: [None; MAX_RS_OPTIONS],
        masked_fraction: F::zero(),
        seq_masked_fraction: F::zero(),
    };
    let valid_rows = (0..dims.batch)
        .filter(|&r| row_valid_count(&mask[dims.row(r)]) > 0)
        .count();

    for (slot, crit) in out.options.iter_mut().zip(cfg.criteria()) {
        let opt = crit.option;
        let is_token = opt.aggregation == RsAggregation::Token;
        let k1 = crit.is_k1();
        let (lo_b, up_b) = crit.stat_bounds();
        let (lo_f, up_f) = (F::of(lo_b), F::of(up_b));
        let clamp_min = if k1 { lo_b } else { 0.0 };

        for (r, rs) in row_scratch.iter_mut().enumerate() {
            let rr = dims.row(r);
            *rs = row_statistic(opt, &log_ratio[rr.clone()], &mask[rr]);
        }
        let token_stat = |t: usize, r: usize| -> F {
            if is_token {
                rejection_divergence(opt.divergence, log_ratio[t])
            } else {
                row_scratch[r]
            }
        };

        let mut m = RsOptionMetrics::default();
        if n_valid == 0 {
            if k1 {
                m.seq_fraction_low = Some(F::zero());
            }
            *slot = Some((opt, m));
            continue;
        }
        // Token pass.
        let mut st = Stats::new();
        let (mut hi, mut lo, mut rejected, mut rows_rejected) = (0usize, 0usize, 0usize, 0usize);
        let (mut c1, mut c2) = (0.0f64, 0.0f64);
        for r in 0..dims.batch {
            let mut row_rej = false;
            for t in dims.row(r) {
                if !mask[t] {
                    continue;
                }
                let s = token_stat(t, r);
                st.push(s);
                hi += (s > up_f) as usize;
                lo += (k1 && s < lo_f) as usize;
                let sc = s.clamp(clamp_min, up_b).to_f64();
                c1 += sc;
                c2 += sc * sc;
                if !crit.keeps(s) {
                    rejected += 1;
                    row_rej = true;
                    keep[t] = false;
                }
            }
            rows_rejected += row_rej as usize;
        }
        m.mean = vmean(st.sum, n_valid);
        if n_valid > 1 {
            m.std = verl_clamped_std(c1, c2, n_valid);
        }
        m.masked_fraction = vmean(F::of_usize(rejected), n_valid);
        m.seq_masked_fraction = frac(rows_rejected, valid_rows);

        // Seq values over rows with a valid token.
        let valid_row = |r: usize| row_valid_count(&mask[dims.row(r)]) > 0;
        let mut sv = Stats::new();
        let (mut shi, mut slo) = (0usize, 0usize);
        let mut dev = F::zero();
        for (r, &v) in row_scratch.iter().enumerate() {
            if !valid_row(r) {
                continue;
            }
            sv.push(v);
            shi += (v > up_f) as usize;
            slo += (v < lo_f) as usize;
            dev = dev.max(v.abs());
        }
        if is_token {
            m.max = st.max;
            m.min = st.min;
            m.fraction_high = vmean(F::of_usize(hi), n_valid);
            m.fraction_low = if k1 {
                vmean(F::of_usize(lo), n_valid)
            } else {
                F::zero()
            };
        } else {
            m.max = sv.max;
            m.min = sv.min;
            m.fraction_high = frac(shi, sv.n);
            m.fraction_low = if k1 { frac(slo, sv.n) } else { F::zero() };
        }
        m.seq_mean = sv.mean();
        m.seq_std = unbiased_std(
            m.seq_mean,
            sv.n,
            row_scratch
                .iter()
                .enumerate()
                .filter(|&(r, _)| valid_row(r))
                .map(|(_, &v)| v),
        );
        m.seq_max = sv.max_or_zero();
        m.seq_min = sv.min_or_zero();
        m.seq_max_deviation = dev;
        m.seq_fraction_high = frac(shi, sv.n);
        if k1 {
            m.seq_fraction_low = Some(frac(slo, sv.n));
        }
        *slot = Some((opt, m));
    }

    let rejected = mask
        .iter()
        .zip(keep.iter())
        .filter(|(&m, &k)| m && !k)
        .count();
    out.masked_fraction = vmean(F::of_usize(rejected), n_valid);
    let rows_hit = (0..dims.batch)
        .filter(|&r| dims.row(r).any(|t| mask[t] && !keep[t]))
        .count();
    out.seq_masked_fraction = frac(rows_hit, dims.batch);
    Ok(out)
}

// ---------------------------------------------------------------------------
// Off-policy metrics
// ---------------------------------------------------------------------------

/// Off-policy diagnostics between the training log-probs `log π` and the
/// rollout log-probs `log μ` (see [`OffPolicyMetrics`] for each formula).
///
/// # Formula
///
/// See the fields of [`OffPolicyMetrics`]; `ℓ = log π − log μ`.
///
/// # Gradient
///
/// None (diagnostics).
///
/// # Peers
///
/// verl `compute_offpolicy_metrics`, except that every exponent is clamped
/// to `±20` (verl's `SAFETY_BOUND`, which verl itself applies to the χ²
/// terms only), so that the metrics stay finite for hostile log-probs: this
/// changes nothing unless a log-ratio or a mean log-prob leaves `[−20, 20]`.
/// All-masked: zeros.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for inputs of the wrong length.
pub fn off_policy_metrics<F: Real>(
    dims: Dims,
    log_prob: &[F],
    rollout_log_prob: &[F],
    mask: &[bool],
) -> Result<OffPolicyMetrics<F>, Error> {
    check_inputs(
        dims,
        &[
            ("old_log_prob", log_prob.len()),
            ("rollout_log_prob", rollout_log_prob.len()),
            ("response_mask", mask.len()),
        ],
    )?;
    let n_valid = row_valid_count(mask);
    let mut m = OffPolicyMetrics::default();
    if n_valid == 0 || dims.batch == 0 {
        return Ok(m);
    }
    let (mut kl, mut k3, mut chi) = (F::zero(), F::zero(), F::zero());
    for ((&p, &q), _) in log_prob
        .iter()
        .zip(rollout_log_prob)
        .zip(mask)
        .filter(|(_, &k)| k)
    {
        kl += q - p;
        let x = (p - q).clamp(-SAFETY_BOUND, SAFETY_BOUND);
        k3 += x.exp() - x - F::one();
        let rho = x.exp();
        chi += rho * rho;
    }
    m.kl = vmean(kl, n_valid);
    m.k3_kl = vmean(k3, n_valid);
    m.chi2_token = vmean(chi, n_valid) - F::one();

    let b = F::of_usize(dims.batch);
    let mut diffs = Stats::new();
    let (mut tp, mut tlp, mut rp, mut rlp, mut absd, mut ratio, mut chis) = (
        F::zero(),
        F::zero(),
        F::zero(),
        F::zero(),
        F::zero(),
        F::zero(),
        F::zero(),
    );
    for r in 0..dims.batch {
        let rr = dims.row(r);
        let mk = &mask[rr.clone()];
        let n = row_valid_count(mk);
        let mp = vmean(row_masked_sum(&log_prob[rr.clone()], mk), n);
        let mq = vmean(row_masked_sum(&rollout_log_prob[rr.clone()], mk), n);
        tp += safe_importance_weight(-mp);
        tlp += -mp;
        rp += safe_importance_weight(-mq);
        rlp += -mq;
        let d = mq - mp;
        diffs.push(d);
        absd += d.abs();
        ratio += safe_importance_weight(d);
        let s = rr
            .filter(|&t| mask[t])
            .fold(F::zero(), |a, t| a + (log_prob[t] - rollout_log_prob[t]));
        let s = s.clamp(-SAFETY_BOUND, SAFETY_BOUND);
        chis += (s * F::of(2.0)).exp();
    }
    m.training_ppl = tp / b;
    m.training_log_ppl = tlp / b;
    m.rollout_ppl = rp / b;
    m.rollout_log_ppl = rlp / b;
    m.log_ppl_diff = diffs.mean();
    m.log_ppl_abs_diff = absd / b;
    m.log_ppl_diff_max = diffs.max;
    m.log_ppl_diff_min = diffs.min;
    m.ppl_ratio = ratio / b;
    m.chi2_seq = chis / b - F::one();
    Ok(m)
}

// ---------------------------------------------------------------------------
// Combined
// ---------------------------------------------------------------------------

/// Which corrections [`rollout_correction_and_rejection`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RolloutCorrectionConfig {
    /// Importance weights (`None`: off).
    pub is: Option<IsConfig>,
    /// Rejection (`None`: off; `keep` is then `mask`).
    pub rs: Option<RsConfig>,
}

/// Buffers [`rollout_correction_and_rejection`] writes into.
#[derive(Debug)]
pub struct CorrectionBuffers<'a, F> {
    /// Output: the IS weights (`dims.len()`; left untouched when IS is off).
    pub weights: &'a mut [F],
    /// Output: the rejection-adjusted mask (`dims.len()`).
    pub keep: &'a mut [bool],
    /// Scratch: the log-ratios (`dims.len()`).
    pub log_ratio: &'a mut [F],
    /// Scratch: per-row values (`dims.batch`).
    pub rows: &'a mut [F],
}

/// IS weights, rejection mask and off-policy diagnostics from the training
/// log-probs `log π` and the rollout log-probs `log μ`.
///
/// # Formula
///
/// `ℓ = log π − log μ`, then [`rollout_correction_weights`] (if
/// `cfg.is`), [`rollout_rejection_mask`] (if `cfg.rs`; otherwise
/// `keep = mask`) and [`off_policy_metrics`], all on the original `mask`.
///
/// # Gradient
///
/// None: verl computes all of it under `no_grad`.
///
/// # Peers
///
/// verl `compute_rollout_correction_and_rejection_mask` (its metrics get the
/// `rollout_corr/` prefix there).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] when the log-prob matrices, the mask or a
/// buffer disagree with `dims`.
pub fn rollout_correction_and_rejection<F: Real>(
    cfg: &RolloutCorrectionConfig,
    dims: Dims,
    log_prob: &[F],
    rollout_log_prob: &[F],
    mask: &[bool],
    buf: CorrectionBuffers<'_, F>,
) -> Result<RolloutCorrectionMetrics<F>, Error> {
    check_inputs(
        dims,
        &[
            ("old_log_prob", log_prob.len()),
            ("rollout_log_prob", rollout_log_prob.len()),
            ("response_mask", mask.len()),
            ("log_ratio", buf.log_ratio.len()),
            ("keep", buf.keep.len()),
        ],
    )?;
    for ((l, &p), &q) in buf.log_ratio.iter_mut().zip(log_prob).zip(rollout_log_prob) {
        *l = p - q;
    }
    let is = match &cfg.is {
        Some(c) => Some(rollout_correction_weights(
            c,
            dims,
            buf.log_ratio,
            mask,
            buf.weights,
        )?),
        None => None,
    };
    let rs = match &cfg.rs {
        Some(c) => Some(rollout_rejection_mask(
            c,
            dims,
            buf.log_ratio,
            mask,
            buf.keep,
            buf.rows,
        )?),
        None => {
            buf.keep.copy_from_slice(mask);
            None
        }
    };
    let off_policy = off_policy_metrics(dims, log_prob, rollout_log_prob, mask)?;
    Ok(RolloutCorrectionMetrics { is, rs, off_policy })
}

// ---------------------------------------------------------------------------
// Bypass-mode policy loss
// ---------------------------------------------------------------------------

/// The loss of [`bypass_policy_loss`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum BypassLoss {
    /// PPO clipped surrogate against the rollout policy (the ratio *is* the
    /// IS correction; IS weights are computed for metrics only).
    PpoClip(ClipConfig),
    /// REINFORCE `−A · w · log π` with the (detached) IS weights `w`, or
    /// `−A · log π` when IS is off.
    Reinforce,
}

/// Configuration of [`bypass_policy_loss`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BypassConfig {
    /// PPO-clip or REINFORCE.
    pub loss: BypassLoss,
    /// IS and rejection settings.
    pub correction: RolloutCorrectionConfig,
    /// Loss aggregation.
    pub agg: AggMode,
    /// Global normalizers of the aggregation.
    pub norm: GlobalNorm,
}

impl BypassConfig {
    /// A validated configuration.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] for negative clip ranges or a dual clip `c ≤ 1`.
    pub fn new(
        loss: BypassLoss,
        correction: RolloutCorrectionConfig,
        agg: AggMode,
        norm: GlobalNorm,
    ) -> Result<Self, Error> {
        if let BypassLoss::PpoClip(c) = &loss {
            check_param(
                c.eps_low >= 0.0,
                "clip_ratio_low",
                c.eps_low,
                "must be >= 0",
            )?;
            check_param(
                c.eps_high >= 0.0,
                "clip_ratio_high",
                c.eps_high,
                "must be >= 0",
            )?;
            if let Some(d) = c.dual_clip {
                check_param(d > 1.0, "clip_ratio_c", d, "must be > 1")?;
            }
        }
        Ok(BypassConfig {
            loss,
            correction,
            agg,
            norm,
        })
    }

    /// verl's PPO-clip bypass: clip range `[1 − ε_low, 1 + ε_high]`, dual
    /// clip `c`, log-ratio clamp 20.
    ///
    /// # Errors
    ///
    /// As [`BypassConfig::new`].
    pub fn verl_ppo_clip(
        eps_low: f64,
        eps_high: f64,
        clip_ratio_c: f64,
        correction: RolloutCorrectionConfig,
        agg: AggMode,
        norm: GlobalNorm,
    ) -> Result<Self, Error> {
        BypassConfig::new(
            BypassLoss::PpoClip(ClipConfig {
                eps_low,
                eps_high,
                dual_clip: Some(clip_ratio_c),
                log_ratio_clamp: Some(SAFETY_BOUND),
            }),
            correction,
            agg,
            norm,
        )
    }
}

/// Scratch and side outputs of [`bypass_policy_loss`]: every token buffer is
/// `dims.len()` long, `rows` is `dims.batch`.
#[derive(Debug)]
pub struct BypassBuffers<'a, F> {
    /// Output: IS weights (meaningful when IS is configured).
    pub is_weights: &'a mut [F],
    /// Output: the rejection-adjusted mask the loss used.
    pub keep: &'a mut [bool],
    /// Scratch: log-ratios, then per-token losses.
    pub tokens: &'a mut [F],
    /// Scratch: aggregation weights.
    pub agg_weights: &'a mut [F],
    /// Scratch: per-row values.
    pub rows: &'a mut [F],
}

/// The loss and metrics of [`bypass_policy_loss`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BypassOutput<F> {
    /// The aggregated loss.
    pub loss: F,
    /// PPO-clip: fraction of kept tokens whose clipped branch is active.
    pub pg_clipfrac: Option<F>,
    /// PPO-clip: masked mean of `−clamp(log π − log μ, ±20)`; REINFORCE:
    /// masked mean of `log μ − log π` (no clamp) — over the kept tokens.
    pub ppo_kl: F,
    /// PPO-clip: fraction of kept tokens where the dual clip is active.
    pub pg_clipfrac_lower: Option<F>,
    /// Rollout-correction diagnostics (on the original mask).
    pub correction: RolloutCorrectionMetrics<F>,
}

/// verl's bypass-mode policy loss: the old policy *is* the rollout policy;
/// rollout correction runs between the current and the rollout log-probs,
/// its rejection mask becomes the loss mask, and the loss is PPO-clip or
/// IS-weighted REINFORCE.
///
/// # Formula
///
/// ```text
/// (w, keep, metrics) = rollout_correction_and_rejection(log π, log μ, mask)
/// PPO-clip:   ℓ_t = ppo_clipped_surrogate(log π, log μ, A)     (verl vanilla: clamp 20, dual clip)
/// REINFORCE:  ℓ_t = −A_t · w_t · log π_t   (w_t = 1 when IS is off)
/// L = aggregate(agg, norm, ℓ, keep)
/// ```
///
/// # Gradient
///
/// `∂L/∂ log π_t = a_t · ∂ℓ_t/∂ log π_t` with `a` the aggregation weights on
/// `keep`; the IS weights and the rejection mask are constants (verl
/// computes them under `no_grad`). Written into `grad` when given.
///
/// # Peers
///
/// verl `compute_policy_loss_bypass_mode` → `compute_policy_loss_vanilla`
/// (`ppo_clip`) or `compute_policy_loss_reinforce` (`reinforce`).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for inputs or buffers of the wrong length;
/// [`Error::OutOfRange`] for invalid global normalizers.
#[allow(clippy::too_many_arguments)]
pub fn bypass_policy_loss<F: Real>(
    cfg: &BypassConfig,
    dims: Dims,
    log_prob: &[F],
    rollout_log_prob: &[F],
    advantages: &[F],
    mask: &[bool],
    grad: Option<&mut [F]>,
    buf: BypassBuffers<'_, F>,
) -> Result<BypassOutput<F>, Error> {
    check_inputs(
        dims,
        &[
            ("log_prob", log_prob.len()),
            ("old_log_prob", rollout_log_prob.len()),
            ("advantages", advantages.len()),
            ("response_mask", mask.len()),
            ("tokens", buf.tokens.len()),
            ("agg_weights", buf.agg_weights.len()),
            ("is_weights", buf.is_weights.len()),
        ],
    )?;
    if let Some(g) = grad.as_deref() {
        check_len("grad", g.len(), dims.len())?;
    }
    let correction = rollout_correction_and_rejection(
        &cfg.correction,
        dims,
        log_prob,
        rollout_log_prob,
        mask,
        CorrectionBuffers {
            weights: buf.is_weights,
            keep: buf.keep,
            log_ratio: buf.tokens,
            rows: buf.rows,
        },
    )?;
    let keep: &[bool] = buf.keep;
    let use_is = cfg.correction.is.is_some();
    let n_keep = row_valid_count(keep);
    let mut dtok = grad;
    let (mut kl, mut clip, mut dual) = (F::zero(), 0usize, 0usize);
    for t in 0..dims.len() {
        if !keep[t] {
            buf.tokens[t] = F::zero();
            if let Some(g) = dtok.as_deref_mut() {
                g[t] = F::zero();
            }
            continue;
        }
        let (l, d) = match &cfg.loss {
            BypassLoss::PpoClip(c) => {
                let s = ppo_clipped_surrogate(c, log_prob[t], rollout_log_prob[t], advantages[t]);
                kl += -s.log_ratio;
                clip += s.clipped as usize;
                dual += s.dual_clipped as usize;
                (s.loss, s.grad)
            }
            BypassLoss::Reinforce => {
                kl += rollout_log_prob[t] - log_prob[t];
                let w = if use_is { buf.is_weights[t] } else { F::one() };
                let coef = -advantages[t] * w;
                (coef * log_prob[t], coef)
            }
        };
        buf.tokens[t] = l;
        if let Some(g) = dtok.as_deref_mut() {
            g[t] = d;
        }
    }
    let loss = aggregate(
        cfg.agg,
        &cfg.norm,
        dims,
        buf.tokens,
        keep,
        Some(buf.agg_weights),
    )?;
    if let Some(g) = dtok {
        for (gt, &a) in g.iter_mut().zip(buf.agg_weights.iter()) {
            *gt = if a == F::zero() { F::zero() } else { *gt * a };
        }
    }
    let (pg_clipfrac, pg_clipfrac_lower) = match cfg.loss {
        BypassLoss::PpoClip(_) => (
            Some(vmean(F::of_usize(clip), n_keep)),
            Some(vmean(F::of_usize(dual), n_keep)),
        ),
        BypassLoss::Reinforce => (None, None),
    };
    Ok(BypassOutput {
        loss,
        pg_clipfrac,
        ppo_kl: vmean(kl, n_keep),
        pg_clipfrac_lower,
        correction,
    })
}

// ---------------------------------------------------------------------------
// TRL: vLLM importance-sampling ratio
// ---------------------------------------------------------------------------

/// What a NaN log-difference between the trainer's and the sampler's
/// log-probs does: TRL's tokens the sampler (vLLM) could not score, whose
/// log-prob it hands over as `None`, turned into NaN.
///
/// Two TRL releases differ here, in the vLLM importance-sampling ratio
/// ([`VllmIsConfig::nan_sampler_log_probs`]) and in the off-policy sequence
/// mask ([`off_policy_sequence_mask`](crate::sequence::off_policy_sequence_mask),
/// [`GrpoConfig::off_policy_nan_sampler_log_probs`](crate::policy::grpo::GrpoConfig::off_policy_nan_sampler_log_probs)).
/// Each of those has its own switch, and both default to
/// [`Propagate`](Self::Propagate), TRL at the conformance vectors' commit
/// f2cd577.
///
/// # Formula
///
/// With `d_t` the per-token difference (`log π_old − log μ` for the ratio,
/// `log μ − log π` for the off-policy KL) on a valid token:
///
/// ```text
/// Propagate:   d_t as is
/// AsOnPolicy:  nan_to_num(d_t) = 0 if d_t is NaN, ±max finite if d_t = ±inf, else d_t
/// ```
///
/// `AsOnPolicy` is exactly `torch.nan_to_num(d, nan=0.0)`, which also
/// maps `±inf` to the largest finite value of the type (that matters only
/// when `+inf` and `−inf` differences meet in one sum). A NaN difference
/// comes from a NaN in either log-prob (or `inf − inf`); the token then
/// counts as on-policy: KL 0 (still one of the row's `n` valid tokens in
/// the mean) and an importance ratio `exp(0) = 1` (before its truncation
/// or band mask). Masked positions are never read, whichever the choice.
///
/// # Peers
///
/// TRL 1.16.0 `GRPOTrainer.get_off_policy_mask` and
/// `_generate_and_score_completions` apply `torch.nan_to_num(…, nan=0.0)`
/// ([`AsOnPolicy`](Self::AsOnPolicy)); TRL f2cd577 does not
/// ([`Propagate`](Self::Propagate): the row's mean KL is NaN, `NaN ≤ δ` is
/// false and an `A < 0` row is dropped; the ratio is NaN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum NanSamplerLogProbs {
    /// NaN propagates (TRL f2cd577, the default).
    #[default]
    Propagate,
    /// NaN counts as an on-policy token, `torch.nan_to_num(d, nan=0.0)`
    /// (TRL 1.16.0).
    AsOnPolicy,
}

impl NanSamplerLogProbs {
    /// One per-token log-difference under this choice.
    ///
    /// # Formula
    ///
    /// See [`NanSamplerLogProbs`]: `d` or `nan_to_num(d)`.
    ///
    /// ```
    /// use posttrain_core::policy::rollout::NanSamplerLogProbs;
    /// assert!(NanSamplerLogProbs::Propagate.log_diff(f64::NAN).is_nan());
    /// assert_eq!(NanSamplerLogProbs::AsOnPolicy.log_diff(f64::NAN), 0.0);
    /// assert_eq!(NanSamplerLogProbs::AsOnPolicy.log_diff(f32::INFINITY), f32::MAX);
    /// assert_eq!(NanSamplerLogProbs::AsOnPolicy.log_diff(-0.5f64), -0.5);
    /// ```
    #[inline]
    pub fn log_diff<F: Real>(self, d: F) -> F {
        match self {
            NanSamplerLogProbs::Propagate => d,
            NanSamplerLogProbs::AsOnPolicy => {
                if d.is_nan() {
                    F::zero()
                } else if d.is_finite() {
                    d
                } else if d > F::zero() {
                    F::max_value()
                } else {
                    -F::max_value()
                }
            }
        }
    }

    /// The name [`FromStr`](core::str::FromStr) parses.
    pub fn name(self) -> &'static str {
        match self {
            NanSamplerLogProbs::Propagate => "propagate",
            NanSamplerLogProbs::AsOnPolicy => "as_on_policy",
        }
    }
}

impl core::str::FromStr for NanSamplerLogProbs {
    type Err = Error;
    /// Parses `propagate` (TRL f2cd577) and `as_on_policy` (TRL 1.16.0).
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "propagate" => Ok(NanSamplerLogProbs::Propagate),
            "as_on_policy" => Ok(NanSamplerLogProbs::AsOnPolicy),
            _ => Err(Error::unknown_option(
                "NaN sampler log-prob handling",
                s,
                "propagate, as_on_policy",
            )),
        }
    }
}

/// TRL's `vllm_importance_sampling_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum VllmIsMode {
    /// Per-token ratio, clamped to `[min, max]`.
    TokenTruncate,
    /// Per-token ratio, zeroed outside `[min, max]`.
    TokenMask,
    /// Per-sequence ratio `exp(Σ masked diff)`, clamped.
    SequenceTruncate,
    /// Per-sequence ratio, zeroed outside `[min, max]`.
    SequenceMask,
}

impl VllmIsMode {
    /// Whether the ratio is one per sequence.
    pub fn is_sequence(self) -> bool {
        matches!(
            self,
            VllmIsMode::SequenceTruncate | VllmIsMode::SequenceMask
        )
    }
    fn truncates(self) -> bool {
        matches!(
            self,
            VllmIsMode::TokenTruncate | VllmIsMode::SequenceTruncate
        )
    }
}

impl core::str::FromStr for VllmIsMode {
    type Err = Error;
    /// Parses `token_truncate`, `token_mask`, `sequence_truncate`, `sequence_mask`.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "token_truncate" => Ok(VllmIsMode::TokenTruncate),
            "token_mask" => Ok(VllmIsMode::TokenMask),
            "sequence_truncate" => Ok(VllmIsMode::SequenceTruncate),
            "sequence_mask" => Ok(VllmIsMode::SequenceMask),
            _ => Err(Error::unknown_option(
                "vLLM importance-sampling mode",
                s,
                "token_truncate, token_mask, sequence_truncate, sequence_mask",
            )),
        }
    }
}

/// Configuration of [`vllm_importance_sampling_ratio`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct VllmIsConfig {
    /// Token / sequence, truncate / mask.
    pub mode: VllmIsMode,
    /// Lower bound (`None`: none).
    pub clip_min: Option<f64>,
    /// Upper bound (`None`: none).
    pub clip_max: Option<f64>,
    /// What a NaN `old − sampling` difference does (a token vLLM could not
    /// score): TRL f2cd577 propagates it (the default), TRL 1.16.0 takes it as
    /// on-policy — difference 0, ratio `bound(1)`, left out of the
    /// log-prob-difference metrics. See [`NanSamplerLogProbs`].
    #[cfg_attr(feature = "serde", serde(default))]
    pub nan_sampler_log_probs: NanSamplerLogProbs,
}

impl VllmIsConfig {
    /// A validated configuration.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] for a NaN or negative bound, or `min > max`.
    pub fn new(
        mode: VllmIsMode,
        clip_min: Option<f64>,
        clip_max: Option<f64>,
    ) -> Result<Self, Error> {
        for (name, v) in [
            ("vllm_importance_sampling_clip_min", clip_min),
            ("vllm_importance_sampling_clip_max", clip_max),
        ] {
            if let Some(v) = v {
                check_param(v >= 0.0, name, v, "must be >= 0 (and not NaN)")?;
            }
        }
        if let Some(lo) = clip_min {
            // A floor of +inf would turn every ratio into inf.
            check_param(
                lo.is_finite(),
                "vllm_importance_sampling_clip_min",
                lo,
                "must be finite",
            )?;
        }
        if let (Some(lo), Some(hi)) = (clip_min, clip_max) {
            check_param(
                lo <= hi,
                "vllm_importance_sampling_clip_min",
                lo,
                "must be <= vllm_importance_sampling_clip_max",
            )?;
        }
        Ok(VllmIsConfig {
            mode,
            clip_min,
            clip_max,
            nan_sampler_log_probs: NanSamplerLogProbs::Propagate,
        })
    }

    /// This configuration with the given [`NanSamplerLogProbs`] choice.
    ///
    /// ```
    /// use posttrain_core::policy::rollout::{NanSamplerLogProbs, VllmIsConfig};
    /// let trl_1_16 = VllmIsConfig::new("token_truncate".parse()?, None, Some(3.0))?
    ///     .with_nan_sampler_log_probs(NanSamplerLogProbs::AsOnPolicy);
    /// assert_eq!(trl_1_16.nan_sampler_log_probs, NanSamplerLogProbs::AsOnPolicy);
    /// # Ok::<(), posttrain_core::Error>(())
    /// ```
    pub fn with_nan_sampler_log_probs(mut self, nan: NanSamplerLogProbs) -> Self {
        self.nan_sampler_log_probs = nan;
        self
    }

    /// The bounded ratio of one log-difference.
    ///
    /// # Formula
    ///
    /// ```text
    /// r = exp(min(d, 80));  truncate: clamp(r, min, max);  mask: 0 if r < min or r > max else r
    /// (80: the safety cap [`LOG_RATIO_SAFETY`](crate::policy::LOG_RATIO_SAFETY), TRL has none)
    /// ```
    ///
    /// A NaN `d` gives NaN in every mode (TRL's `clamp` and `masked_fill`
    /// both keep it).
    ///
    /// # Gradient
    ///
    /// Not needed (TRL detaches the ratio): `r` where it passes through, else 0.
    ///
    /// # Peers
    ///
    /// TRL `vllm_importance_sampling_mode` / `_clip_min` / `_clip_max`.
    pub fn ratio<E: Elem>(&self, log_diff: E) -> E {
        // Safety cap (TRL has none): e^x overflows past 88 (f32) / 709 (f64).
        let cap = crate::policy::LOG_RATIO_SAFETY;
        let r = log_diff.clone().min(log_diff.full_like(cap)).exp();
        if self.mode.truncates() {
            let r = match self.clip_min {
                Some(lo) => r.clone().max(r.full_like(lo)),
                None => r,
            };
            match self.clip_max {
                Some(hi) => r.clone().min(r.full_like(hi)),
                None => r,
            }
        } else {
            let lo = self.clip_min.unwrap_or(f64::NEG_INFINITY);
            let hi = self.clip_max.unwrap_or(f64::INFINITY);
            // TRL zeroes `(r < min) | (r > max)`: a NaN ratio stays NaN.
            let out = r.lt_scalar(lo).or(r.gt_scalar(hi));
            let zero = r.full_like(0.0);
            E::select(&out, zero, r)
        }
    }
}

/// Metrics of [`vllm_importance_sampling_ratio`] (TRL's `sampling/*` logs).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct VllmIsMetrics<F> {
    /// Number of valid tokens (`completion_mask · tool_mask`), TRL's
    /// `num_items_in_batch` on one process.
    pub num_items: usize,
    /// Mean of `|log π_old − log π_vllm|` over valid tokens (0 if none).
    /// With [`NanSamplerLogProbs::AsOnPolicy`] over the valid tokens whose
    /// difference is not NaN (TRL 1.16.0); otherwise a NaN propagates.
    pub logp_difference_mean: F,
    /// Max of the same (0 if none).
    pub logp_difference_max: F,
    /// Min of the ratio over valid tokens (token modes) or rows (sequence modes).
    pub ratio_min: F,
    /// Mean of the same.
    pub ratio_mean: F,
    /// Max of the same.
    pub ratio_max: F,
}

/// TRL's vLLM importance-sampling ratio between the trainer's old log-probs
/// and the sampler's, with its metrics. `ratio` is `dims.len()` long for
/// token modes and `dims.batch` long for sequence modes.
///
/// # Formula
///
/// ```text
/// d_t = old_t − sampling_t   on valid tokens, 0 elsewhere
///       (nan_to_num(d_t) with NanSamplerLogProbs::AsOnPolicy)
/// token modes:    ratio_t = bound(exp(d_t))          (padding: bound(1))
/// sequence modes: ratio_i = bound(exp(Σ_t d_t))
/// logp_difference_{mean,max} = mean, max of |old_t − sampling_t| over valid t
///       (AsOnPolicy: over valid t whose difference is not NaN)
/// importance_sampling_ratio/{min,mean,max} over the ratios of valid tokens
///       (token modes) or of all rows (sequence modes)
/// ```
///
/// with `bound` the truncation or band mask of [`VllmIsConfig::ratio`]. No
/// log-ratio clamp (TRL has none). With
/// [`cfg.nan_sampler_log_probs`](VllmIsConfig::nan_sampler_log_probs) =
/// [`Propagate`](NanSamplerLogProbs::Propagate) (the default) a NaN
/// log-prob on a valid token makes its ratio (token modes) or its row's
/// (sequence modes) NaN, and the metrics NaN; with
/// [`AsOnPolicy`](NanSamplerLogProbs::AsOnPolicy) it contributes 0 to the
/// difference (ratio `bound(1)` in token modes, nothing to the row's sum in
/// sequence modes), still counts in the ratio metrics, and is left out of
/// the log-prob-difference metrics (0 when no valid token is left).
///
/// # Gradient
///
/// None (TRL computes it under `no_grad`).
///
/// # Peers
///
/// TRL `GRPOTrainer._generate_and_score_completions`: f2cd577
/// ([`Propagate`](NanSamplerLogProbs::Propagate)) and 1.16.0
/// ([`AsOnPolicy`](NanSamplerLogProbs::AsOnPolicy)). TRL f2cd577 multiplies
/// the difference by the mask, so NaN padding gives NaN there; posttrain
/// selects.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for inputs or `ratio` of the wrong length.
///
/// # Example
///
/// ```
/// use posttrain_core::policy::rollout::{vllm_importance_sampling_ratio, VllmIsConfig};
/// use posttrain_core::Dims;
/// let cfg = VllmIsConfig::new("sequence_truncate".parse()?, None, Some(3.0))?;
/// let mut r = [0.0f64; 1];
/// let m = vllm_importance_sampling_ratio(&cfg, Dims::new(1, 2), &[-1.0, -2.0], &[-1.5, -2.0], &[true, true], &mut r)?;
/// assert!((r[0] - 0.5f64.exp()).abs() < 1e-12);
/// assert_eq!(m.num_items, 2);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn vllm_importance_sampling_ratio<F: Real>(
    cfg: &VllmIsConfig,
    dims: Dims,
    old_log_prob: &[F],
    sampling_log_prob: &[F],
    mask: &[bool],
    ratio: &mut [F],
) -> Result<VllmIsMetrics<F>, Error> {
    check_inputs(
        dims,
        &[
            ("old_per_token_logps", old_log_prob.len()),
            ("sampling_per_token_logps", sampling_log_prob.len()),
            ("completion_mask", mask.len()),
        ],
    )?;
    let seq_level = cfg.mode.is_sequence();
    check_len(
        "importance_sampling_ratio",
        ratio.len(),
        if seq_level { dims.batch } else { dims.len() },
    )?;
    let mut m = VllmIsMetrics {
        num_items: row_valid_count(mask),
        ..Default::default()
    };
    let nan = cfg.nan_sampler_log_probs;
    let skip_nan = nan == NanSamplerLogProbs::AsOnPolicy;
    let mut delta = Stats::new();
    for ((&a, &b), _) in old_log_prob
        .iter()
        .zip(sampling_log_prob)
        .zip(mask)
        .filter(|(_, &k)| k)
    {
        let v = (a - b).abs();
        if !(skip_nan && v.is_nan()) {
            delta.push(v);
        }
    }
    m.logp_difference_mean = delta.mean();
    m.logp_difference_max = delta.max_or_zero();

    let mut rs = Stats::new();
    if seq_level {
        for (r, out) in ratio.iter_mut().enumerate() {
            let rr = dims.row(r);
            let s = rr.filter(|&t| mask[t]).fold(F::zero(), |acc, t| {
                acc + nan.log_diff(old_log_prob[t] - sampling_log_prob[t])
            });
            *out = cfg.ratio(s);
            rs.push(*out);
        }
    } else {
        let pad = cfg.ratio(F::zero());
        for t in 0..dims.len() {
            ratio[t] = if mask[t] {
                let v = cfg.ratio(nan.log_diff(old_log_prob[t] - sampling_log_prob[t]));
                rs.push(v);
                v
            } else {
                pad
            };
        }
    }
    m.ratio_min = rs.min_or_zero();
    m.ratio_mean = rs.mean();
    m.ratio_max = rs.max_or_zero();
    Ok(m)
}

// ---------------------------------------------------------------------------
// Allocating conveniences
// ---------------------------------------------------------------------------

/// What the allocating wrappers return besides the metrics.
#[cfg(feature = "alloc")]
#[derive(Debug, Clone, PartialEq)]
pub struct CorrectionVecs<F> {
    /// IS weights (zeros when IS is off).
    pub weights: alloc::vec::Vec<F>,
    /// The rejection-adjusted mask.
    pub keep: alloc::vec::Vec<bool>,
}

/// [`rollout_correction_and_rejection`] with freshly allocated buffers.
///
/// # Errors
///
/// As [`rollout_correction_and_rejection`].
///
/// # Example
///
/// ```
/// use posttrain_core::policy::rollout::{rollout_correction_and_rejection_vec, IsConfig, RolloutCorrectionConfig, RsConfig};
/// use posttrain_core::Dims;
/// let cfg = RolloutCorrectionConfig {
///     is: Some(IsConfig::new("token".parse()?, "2.0".parse()?, false)?),
///     rs: Some(RsConfig::parse("token_k3", "0.01")?),
/// };
/// let (m, v) = rollout_correction_and_rejection_vec(&cfg, Dims::new(1, 2), &[-1.0f64, -1.5], &[-1.0, -1.0], &[true, true])?;
/// assert_eq!(v.keep, [true, false]); // k3(−0.5) ≈ 0.107 > 0.01
/// assert!(m.is.is_some() && m.rs.is_some());
/// # Ok::<(), posttrain_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn rollout_correction_and_rejection_vec<F: Real>(
    cfg: &RolloutCorrectionConfig,
    dims: Dims,
    log_prob: &[F],
    rollout_log_prob: &[F],
    mask: &[bool],
) -> Result<(RolloutCorrectionMetrics<F>, CorrectionVecs<F>), Error> {
    use alloc::vec;
    let n = dims.len();
    let mut weights = vec![F::zero(); n];
    let mut keep = vec![false; n];
    let mut log_ratio = vec![F::zero(); n];
    let mut rows = vec![F::zero(); dims.batch];
    let m = rollout_correction_and_rejection(
        cfg,
        dims,
        log_prob,
        rollout_log_prob,
        mask,
        CorrectionBuffers {
            weights: &mut weights,
            keep: &mut keep,
            log_ratio: &mut log_ratio,
            rows: &mut rows,
        },
    )?;
    Ok((m, CorrectionVecs { weights, keep }))
}

/// The buffers [`bypass_policy_loss_vec`] returns.
#[cfg(feature = "alloc")]
#[derive(Debug, Clone, PartialEq)]
pub struct BypassVecs<F> {
    /// `∂L/∂ log π`.
    pub grad: alloc::vec::Vec<F>,
    /// The IS weights and the mask the loss used.
    pub correction: CorrectionVecs<F>,
}

/// [`bypass_policy_loss`] with freshly allocated buffers: returns the loss
/// and metrics, `∂L/∂ log π`, and the weights and mask it used.
///
/// # Errors
///
/// As [`bypass_policy_loss`].
///
/// # Example
///
/// ```
/// use posttrain_core::aggregate::{AggMode, GlobalNorm};
/// use posttrain_core::policy::rollout::{bypass_policy_loss_vec, BypassConfig, BypassLoss, RolloutCorrectionConfig};
/// use posttrain_core::Dims;
/// let cfg = BypassConfig::new(BypassLoss::Reinforce, RolloutCorrectionConfig::default(), AggMode::TokenMean, GlobalNorm::default())?;
/// let lp = [-1.0f64, -2.0];
/// let (out, v) = bypass_policy_loss_vec(&cfg, Dims::new(1, 2), &lp, &lp, &[1.0, 1.0], &[true, true])?;
/// // L = mean(−A · log π) = 1.5 and ∂L/∂log π = −A / 2.
/// assert!((out.loss - 1.5).abs() < 1e-12);
/// assert!((v.grad[0] + 0.5).abs() < 1e-12);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
#[cfg(feature = "alloc")]
pub fn bypass_policy_loss_vec<F: Real>(
    cfg: &BypassConfig,
    dims: Dims,
    log_prob: &[F],
    rollout_log_prob: &[F],
    advantages: &[F],
    mask: &[bool],
) -> Result<(BypassOutput<F>, BypassVecs<F>), Error> {
    use alloc::vec;
    let n = dims.len();
    let mut grad = vec![F::zero(); n];
    let mut weights = vec![F::zero(); n];
    let mut keep = vec![false; n];
    let (mut tokens, mut agg) = (vec![F::zero(); n], vec![F::zero(); n]);
    let mut rows = vec![F::zero(); dims.batch];
    let out = bypass_policy_loss(
        cfg,
        dims,
        log_prob,
        rollout_log_prob,
        advantages,
        mask,
        Some(&mut grad),
        BypassBuffers {
            is_weights: &mut weights,
            keep: &mut keep,
            tokens: &mut tokens,
            agg_weights: &mut agg,
            rows: &mut rows,
        },
    )?;
    Ok((
        out,
        BypassVecs {
            grad,
            correction: CorrectionVecs { weights, keep },
        },
    ))
}
