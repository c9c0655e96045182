//! KL estimators between the policy and a reference, per token.
//!
//! # Overview
//!
//! With `x = log π(a) − log π_ref(a)` for a token `a` sampled from `π`, the
//! classic single-sample estimators of `KL(π ‖ π_ref)` are
//!
//! | estimator | value | `∂/∂ log π` | bias / variance |
//! |---|---|---|---|
//! | [`K1`](KlEstimator::K1) (`kl`) | `x` | `1` | unbiased, high variance, can be < 0 |
//! | [`Abs`](KlEstimator::Abs) (`abs`) | `|x|` | `sign(x)` (0 at a tie) | biased |
//! | [`K2`](KlEstimator::K2) (`mse`) | `x² / 2` | `x` | biased, low variance |
//! | [`K3`](KlEstimator::K3) (`low_var_kl`) | `e^{−x} + x − 1` | `1 − e^{−x}` | unbiased, low variance, ≥ 0 |
//!
//! The **straight-through** variants (`kl+`, `abs+`, `k3+`, …) keep the base
//! estimator's value but use the k2 gradient `x`, whose expectation is the
//! gradient of the true KL when used as a loss (verl's `+` modes).
//!
//! # Peers and clamps
//!
//! | preset | log-ratio clamp (k3 only) | value clamp |
//! |---|---|---|
//! | `Verl` | `−x ∈ [−20, 20]` | k3 value to `[−10, 10]` |
//! | `OpenRlhf` | none | every estimator's value to `[−10, 10]` |
//! | `Trl`, `Torchtune` | none | none |
//!
//! A clamp that is active zeroes the gradient at that position (as
//! `torch.clamp`'s backward does; a value exactly on the bound keeps it).
//! Every preset also caps the k3 exponent `−x` at [`K3_EXP_SAFETY`] (80), so
//! that finite log-probs never give an infinite value or gradient.
//!
//! # Example
//!
//! ```
//! use posttrain_core::kl::{KlConfig, KlEstimator};
//! use posttrain_core::Preset;
//! let cfg = KlConfig::preset(KlEstimator::K3, Preset::Verl);
//! let (v, g) = cfg.estimate(-1.0f64, -1.5);
//! // x = 0.5: e^{-0.5} + 0.5 − 1 and 1 − e^{-0.5}
//! assert!((v - ((-0.5f64).exp() - 0.5)).abs() < 1e-15);
//! assert!((g - (1.0 - (-0.5f64).exp())).abs() < 1e-15);
//! ```

use crate::elem::{Elem, ElemExt, MaskElem, Real};
use crate::error::{check_len, Error};
use crate::preset::Preset;

/// A single-sample KL estimator (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum KlEstimator {
    /// `x = log π − log π_ref` (verl `kl`/`k1`).
    K1,
    /// `|x|` (verl `abs`).
    Abs,
    /// `x² / 2` (verl `mse`/`k2`).
    K2,
    /// `e^{−x} + x − 1` (verl `low_var_kl`/`k3`, Schulman's k3).
    K3,
}

/// A KL estimator with its clamps and gradient mode.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct KlConfig {
    /// Which estimator.
    pub estimator: KlEstimator,
    /// Straight-through: the value of `estimator`, the gradient of k2 (`x`).
    pub straight_through: bool,
    /// k3 only: clamp `−x = log π_ref − log π` to `[−c, c]` before `exp`
    /// (verl: 20). `None`: no clamp.
    pub log_ratio_clamp: Option<f64>,
    /// Clamp the estimate to `[−c, c]` (verl k3: 10, OpenRLHF: 10 for all).
    pub value_clamp: Option<f64>,
}

/// Safety bound on the k3 exponent: `−x = log π_ref − log π` is capped at 80
/// before `exp` (e⁸⁰ ≈ 5.5·10³⁴, finite in `f32`), with gradient 0 where the
/// cap is active. No peer reaches it with realistic log-probs (verl clamps at
/// 20 already); without it, `−x > 88` (f32) or `> 709` (f64) turns the value
/// and gradient into `inf`.
pub const K3_EXP_SAFETY: f64 = 80.0;

impl KlConfig {
    /// Checks the clamps: each, when set, must be finite and `> 0`.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] naming the clamp.
    pub fn validate(&self) -> Result<(), Error> {
        for (name, c) in [
            ("log_ratio_clamp", self.log_ratio_clamp),
            ("value_clamp", self.value_clamp),
        ] {
            if let Some(c) = c {
                crate::error::check_param(
                    c.is_finite() && c > 0.0,
                    name,
                    c,
                    "must be finite and > 0",
                )?;
            }
        }
        Ok(())
    }

    /// An estimator with no clamps and its own gradient.
    pub const fn new(estimator: KlEstimator) -> Self {
        KlConfig {
            estimator,
            straight_through: false,
            log_ratio_clamp: None,
            value_clamp: None,
        }
    }

    /// The estimator with the clamps the framework applies (table in the
    /// [module docs](self)).
    pub fn preset(estimator: KlEstimator, preset: Preset) -> Self {
        let mut c = KlConfig::new(estimator);
        match preset {
            Preset::Verl if estimator == KlEstimator::K3 => {
                c.log_ratio_clamp = Some(20.0);
                c.value_clamp = Some(10.0);
            }
            Preset::OpenRlhf => c.value_clamp = Some(10.0),
            _ => {}
        }
        c
    }

    /// Parses verl's `kl_penalty` names with verl's clamps: `kl`/`k1`,
    /// `abs`, `mse`/`k2`, `low_var_kl`/`k3`, each optionally suffixed `+`
    /// (straight-through). `full` (needs full-vocabulary logits) is refused.
    pub fn parse_verl(name: &str) -> Result<Self, Error> {
        let (base, st) = match name.strip_suffix('+') {
            Some(b) => (b, true),
            None => (name, false),
        };
        let est = match base {
            "kl" | "k1" => KlEstimator::K1,
            "abs" => KlEstimator::Abs,
            "mse" | "k2" => KlEstimator::K2,
            "low_var_kl" | "k3" => KlEstimator::K3,
            _ => {
                return Err(Error::unknown_option(
                    "KL estimator",
                    name,
                    "kl, k1, abs, mse, k2, low_var_kl, k3 (each optionally with a `+` suffix)",
                ))
            }
        };
        let mut c = KlConfig::preset(est, Preset::Verl);
        c.straight_through = st;
        Ok(c)
    }

    /// The estimate and its derivative with respect to `log_prob`, element-wise.
    ///
    /// # Formula
    ///
    /// See the [module docs](self); `x = log_prob − ref_log_prob`.
    ///
    /// # Gradient
    ///
    /// k1: `1`; abs: `sign(x)`; k2: `x`; k3: `1 − e^{−x}`; straight-through: `x`.
    /// Zero wherever a clamp is active (not for straight-through, whose
    /// surrogate `x²/2` is never clamped).
    #[inline(always)]
    pub fn estimate<E: Elem>(&self, log_prob: E, ref_log_prob: E) -> (E, E) {
        let x = log_prob.sub(ref_log_prob);
        let (value, grad) = match self.estimator {
            KlEstimator::K1 => (x.clone(), x.full_like(1.0)),
            KlEstimator::Abs => {
                let pos = x.gt_scalar(0.0);
                let neg = x.lt_scalar(0.0);
                let sign = E::select(
                    &pos,
                    x.full_like(1.0),
                    E::select(&neg, x.full_like(-1.0), x.full_like(0.0)),
                );
                (x.clone().abs(), sign)
            }
            KlEstimator::K2 => (x.clone().square().mul_scalar(0.5), x.clone()),
            KlEstimator::K3 => {
                // kl = ref − logp = −x, clamped; value e^{kl} − kl − 1.
                let kl = x.clone().neg();
                let kl_c = match self.log_ratio_clamp {
                    Some(c) => kl.clone().clamp(-c, c),
                    None => kl.clone(),
                };
                // Safety: e^{kl} overflows (f32 past 88, f64 past 709); keep
                // it finite with `kl ≤ K3_EXP_SAFETY` (gradient 0 beyond).
                let capped = kl_c.gt_scalar(K3_EXP_SAFETY);
                let kl_c = kl_c.min_scalar(K3_EXP_SAFETY);
                let r = kl_c.clone().exp();
                let v = r.clone().sub(kl_c).add_scalar(-1.0);
                // d/dlogp (e^{−x} + x − 1) = 1 − e^{−x}
                let g = r.neg().add_scalar(1.0);
                let g = E::select(&capped, g.full_like(0.0), g);
                match self.log_ratio_clamp {
                    Some(c) => {
                        let live = kl.ge_scalar(-c).and(kl.le_scalar(c));
                        let zero = g.full_like(0.0);
                        (v, E::select(&live, g, zero))
                    }
                    None => (v, g),
                }
            }
        };
        let (value, grad) = match self.value_clamp {
            Some(c) => {
                let live = value.ge_scalar(-c).and(value.le_scalar(c));
                let zero = grad.full_like(0.0);
                (value.clamp(-c, c), E::select(&live, grad, zero))
            }
            None => (value, grad),
        };
        if self.straight_through {
            (value, x)
        } else {
            (value, grad)
        }
    }

    /// Applies [`estimate`](Self::estimate) over slices: writes the estimate
    /// into `out` and, if `vjp` is `Some((cotangent, grad))`, the
    /// vector-Jacobian product `grad = cotangent ⊙ ∂estimate/∂log_prob`.
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] if any slice's length differs from `log_prob`'s;
    /// [`Error::OutOfRange`] for an invalid clamp ([`validate`](Self::validate)).
    pub fn estimate_slices<F: Real>(
        &self,
        log_prob: &[F],
        ref_log_prob: &[F],
        out: &mut [F],
        vjp: Option<(&[F], &mut [F])>,
    ) -> Result<(), Error> {
        self.validate()?;
        let n = log_prob.len();
        check_len("ref_log_prob", ref_log_prob.len(), n)?;
        check_len("out", out.len(), n)?;
        match vjp {
            Some((cot, grad)) => {
                check_len("cotangent", cot.len(), n)?;
                check_len("grad", grad.len(), n)?;
                for i in 0..n {
                    let (v, g) = self.estimate(log_prob[i], ref_log_prob[i]);
                    out[i] = v;
                    grad[i] = cot[i] * g;
                }
            }
            None => {
                for i in 0..n {
                    out[i] = self.estimate(log_prob[i], ref_log_prob[i]).0;
                }
            }
        }
        Ok(())
    }
}

/// Statistics of a KL penalty applied to rewards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlRewardStats<F> {
    /// Mean over rows of each row's masked-mean KL (verl
    /// `actor/reward_kl_penalty`; the `current_kl` fed to the controller).
    /// A row's masked mean divides by `nᵢ + 1e-8` as verl's `masked_mean` does.
    pub mean_kl: F,
}

/// KL-in-reward: `r̃ = score − β · KL̂(log π_old, log π_ref)` per token, with
/// masked positions carrying no KL.
///
/// # Formula
///
/// ```text
/// kᵢⱼ  = estimate(old_log_probᵢⱼ, ref_log_probᵢⱼ)   if maskᵢⱼ, else 0
/// r̃ᵢⱼ  = scoresᵢⱼ − β · kᵢⱼ
/// mean_kl = (1/B) Σᵢ (Σⱼ kᵢⱼ) / (nᵢ + 1e-8)
/// ```
///
/// # Peers
///
/// verl `apply_kl_penalty` (with `KlConfig::parse_verl`, β = the controller's
/// value *before* its update — feed `mean_kl` to
/// [`KlController::update`] afterwards) and, with `mask = None`, verl
/// `compute_rewards` (`β = kl_ratio`, k1 unmasked).
///
/// # Masking
///
/// Masked positions get `r̃ = score` whatever the log-probs hold (verl
/// multiplies the KL by the mask, which would turn a NaN into NaN).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if a slice is not `dims.len()` long;
/// [`Error::OutOfRange`] for a non-finite `beta` or an invalid clamp.
///
/// # Example
///
/// ```
/// use posttrain_core::kl::{kl_penalized_rewards, KlConfig, KlEstimator};
/// use posttrain_core::Dims;
/// let cfg = KlConfig::new(KlEstimator::K1);
/// let mut out = [0.0f64; 2];
/// let s = kl_penalized_rewards(&cfg, 0.1, Dims::new(1, 2), &[0.0, 1.0], &[-1.0, -1.0], &[-1.5, -0.5], Some(&[true, true]), &mut out)?;
/// assert!((out[0] + 0.05).abs() < 1e-12 && (out[1] - 1.05).abs() < 1e-12);
/// assert!(s.mean_kl.abs() < 1e-9);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn kl_penalized_rewards<F: Real>(
    cfg: &KlConfig,
    beta: f64,
    dims: crate::Dims,
    scores: &[F],
    old_log_prob: &[F],
    ref_log_prob: &[F],
    mask: Option<&[bool]>,
    out: &mut [F],
) -> Result<KlRewardStats<F>, Error> {
    cfg.validate()?;
    crate::error::check_param(beta.is_finite(), "kl_coef", beta, "must be finite")?;
    let n = dims.len();
    check_len("token_level_scores", scores.len(), n)?;
    check_len("old_log_prob", old_log_prob.len(), n)?;
    check_len("ref_log_prob", ref_log_prob.len(), n)?;
    check_len("out", out.len(), n)?;
    if let Some(m) = mask {
        check_len("response_mask", m.len(), n)?;
    }
    let beta = F::of(beta);
    let mut sum_of_row_means = F::zero();
    for i in 0..dims.batch {
        let mut row_sum = F::zero();
        let mut row_n = 0usize;
        for j in dims.row(i) {
            let valid = mask.is_none_or(|m| m[j]);
            let k = if valid {
                cfg.estimate(old_log_prob[j], ref_log_prob[j]).0
            } else {
                F::zero()
            };
            if valid {
                row_sum += k;
                row_n += 1;
            }
            out[j] = scores[j] - beta * k;
        }
        sum_of_row_means += row_sum / (F::of_usize(row_n) + F::of(1e-8));
    }
    let mean_kl = if dims.batch == 0 {
        F::zero()
    } else {
        sum_of_row_means / F::of_usize(dims.batch)
    };
    Ok(KlRewardStats { mean_kl })
}

/// Where the sequence-level score lands in a `[batch, seq]` reward matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScorePosition<'a> {
    /// The last column of every row (torchtune when `valid_score_idxs` is None).
    LastColumn,
    /// The last position where the mask is true (OpenRLHF `compute_reward`; a
    /// row with no valid position uses the last column, as OpenRLHF's
    /// `argmax` of an all-zero row does).
    LastValid(&'a [bool]),
    /// An explicit column per row (torchtune `valid_score_idxs`).
    Explicit(&'a [i64]),
}

/// Token rewards with the sequence score at its EOS position and a
/// per-token KL penalty: `rᵢⱼ = −β·klᵢⱼ + 1[j = eosᵢ]·scoreᵢ`.
///
/// # Formula
///
/// ```text
/// rᵢⱼ = −β · klᵢⱼ + (scoreᵢ if j = eosᵢ else 0)
/// ```
///
/// `kl` is any per-token estimate (e.g. k1 `log π − log π_ref`, see
/// [`KlConfig::estimate_slices`]). Callers apply the peers' conventions
/// before: OpenRLHF clamps `β ≥ 0` and clips the score to `reward_clip_range`.
///
/// # Gradient
///
/// `∂r/∂kl = −β` everywhere (the KL is not masked, as in both peers).
///
/// # Peers
///
/// OpenRLHF `compute_reward` ([`ScorePosition::LastValid`]), torchtune
/// `get_rewards_ppo` ([`ScorePosition::LastColumn`] / [`ScorePosition::Explicit`]).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths; [`Error::OutOfRange`] for a
/// non-finite `beta`; [`Error::Invalid`] for an explicit
/// position outside `[0, seq)`; [`Error::Empty`] for a zero-length row when a
/// score must be placed.
pub fn rewards_with_score_at_eos<F: Real>(
    dims: crate::Dims,
    scores: &[F],
    position: ScorePosition<'_>,
    kl: &[F],
    beta: f64,
    out: &mut [F],
) -> Result<(), Error> {
    crate::error::check_param(beta.is_finite(), "kl_coef", beta, "must be finite")?;
    let n = dims.len();
    check_len("scores", scores.len(), dims.batch)?;
    check_len("kl", kl.len(), n)?;
    check_len("out", out.len(), n)?;
    match position {
        ScorePosition::LastValid(m) => check_len("action_mask", m.len(), n)?,
        ScorePosition::Explicit(idx) => {
            check_len("valid_score_idxs", idx.len(), dims.batch)?;
            if idx.iter().any(|&j| j < 0 || j as usize >= dims.seq) {
                return Err(Error::Invalid {
                    input: "valid_score_idxs",
                    rule: "every index must lie in [0, seq)",
                });
            }
        }
        ScorePosition::LastColumn => {}
    }
    if dims.seq == 0 && dims.batch > 0 {
        return Err(Error::Empty { input: "seq" });
    }
    let beta = F::of(beta);
    for (o, &k) in out.iter_mut().zip(kl) {
        *o = -(beta * k);
    }
    for i in 0..dims.batch {
        let j = match position {
            ScorePosition::LastColumn => dims.seq - 1,
            ScorePosition::Explicit(idx) => idx[i] as usize,
            ScorePosition::LastValid(m) => m[dims.row(i)]
                .iter()
                .rposition(|&v| v)
                .unwrap_or(dims.seq - 1),
        };
        out[i * dims.seq + j] += scores[i];
    }
    Ok(())
}

/// The KL coefficient β of KL-in-reward, fixed or adapted towards a target KL.
///
/// # Formula
///
/// Adaptive (Ziegler et al. 2019):
///
/// ```text
/// e = clip(current_kl / target − 1, −0.2, 0.2)
/// β ← β · (1 + e · n_steps / horizon)
/// ```
///
/// There is no floor: with a large `n_steps / horizon` β can turn negative,
/// exactly as in verl and TRL.
///
/// # Peers
///
/// verl `FixedKLController` / `AdaptiveKLController` (and TRL's PPO
/// controllers, which are the same).
///
/// # Example
///
/// ```
/// use posttrain_core::kl::KlController;
/// let mut c = KlController::adaptive(0.05, 0.1, 10_000.0)?;
/// c.update(0.2, 256)?; // KL above target: β grows by 0.2·256/10000
/// assert!((c.value() - 0.05 * (1.0 + 0.2 * 256.0 / 10_000.0)).abs() < 1e-15);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum KlController {
    /// β never changes.
    Fixed {
        /// β.
        coef: f64,
    },
    /// β follows the proportional rule above.
    Adaptive {
        /// Current β.
        coef: f64,
        /// Target KL.
        target: f64,
        /// Horizon (in samples).
        horizon: f64,
    },
}

impl KlController {
    /// A fixed coefficient.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] if `coef` is not finite.
    pub fn fixed(coef: f64) -> Result<Self, Error> {
        crate::error::check_param(coef.is_finite(), "kl_coef", coef, "must be finite")?;
        Ok(KlController::Fixed { coef })
    }

    /// An adaptive coefficient starting at `coef`.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] if `coef` is not finite, or `target` or
    /// `horizon` is not finite and > 0.
    pub fn adaptive(coef: f64, target: f64, horizon: f64) -> Result<Self, Error> {
        crate::error::check_param(coef.is_finite(), "kl_coef", coef, "must be finite")?;
        crate::error::check_param(
            target.is_finite() && target > 0.0,
            "target_kl",
            target,
            "must be finite and > 0",
        )?;
        crate::error::check_param(
            horizon.is_finite() && horizon > 0.0,
            "horizon",
            horizon,
            "must be finite and > 0",
        )?;
        Ok(KlController::Adaptive {
            coef,
            target,
            horizon,
        })
    }

    /// The current β.
    pub fn value(&self) -> f64 {
        match *self {
            KlController::Fixed { coef } | KlController::Adaptive { coef, .. } => coef,
        }
    }

    /// Updates β after a batch of `n_steps` samples whose mean KL was `current_kl`.
    ///
    /// `current_kl = ±inf` saturates the error at `±0.2` (as in the peers).
    ///
    /// # Errors
    ///
    /// Adaptive only (a fixed β ignores its inputs): [`Error::NonFinite`] for
    /// a NaN `current_kl` (the peers would turn β into NaN for good), and
    /// [`Error::OutOfRange`] (`n_steps`) when the update would overflow β to
    /// ±inf. β is left unchanged on error.
    pub fn update(&mut self, current_kl: f64, n_steps: u64) -> Result<(), Error> {
        if let KlController::Adaptive {
            coef,
            target,
            horizon,
        } = self
        {
            if current_kl.is_nan() {
                return Err(Error::NonFinite {
                    input: "current_kl",
                    index: 0,
                });
            }
            let e = (current_kl / *target - 1.0).clamp(-0.2, 0.2);
            let next = *coef * (1.0 + e * n_steps as f64 / *horizon);
            crate::error::check_param(
                next.is_finite(),
                "n_steps",
                n_steps as f64,
                "must not overflow the coefficient (β · (1 + e · n_steps / horizon) is not finite)",
            )?;
            *coef = next;
        }
        Ok(())
    }
}
