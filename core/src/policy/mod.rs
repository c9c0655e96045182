//! Policy-gradient losses: the clipped surrogate and its variants.
//!
//! # Overview
//!
//! With `r = π(a)/π_old(a) = exp(log π − log π_old)` and advantage `A`, PPO
//! minimises per token
//!
//! ```text
//! ℓ = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high))          (clip-higher when ε_high ≠ ε_low)
//! ℓ = min(ℓ, −A·c)   where A < 0                          (dual clip, c > 1)
//! ```
//!
//! [`ppo_clipped_surrogate`] is that kernel, written once over [`Elem`] and
//! shared by every token-level variant in the submodules:
//!
//! * [`token`] — the token-level policy-gradient losses: PPO and every
//!   variant of verl's policy-loss registry (DPPO-TV/KL, GSPO, SAPO, GPG /
//!   REINFORCE, Clip-Cov, KL-Cov, GMPO, DRO, CISPO) with importance weights,
//!   global normalizers and verl's metrics;
//! * [`ppo`] — OpenRLHF's PPO / GSPO loss with dual clip and vLLM
//!   importance-sampling correction (TIS, IcePop, sequence-masked TIS);
//! * [`grpo`] — GRPO-family losses with sequence-level ratios (GSPO),
//!   delta caps, entropy masks, SAPO, CISPO, VESPO, LUSPO and their normalizers;
//! * [`sequence_mean`] — per-sequence-mean policy losses (GRPO with completion
//!   ratios, on-policy and chunked-logits forms);
//! * [`rollout`] — importance-sampling correction and rejection between the
//!   rollout engine's and the trainer's log-probs.

use crate::elem::{Elem, MaskElem};
use crate::error::{check_param, Error};
use crate::preset::Preset;

pub mod grpo;
pub mod ppo;
pub mod rollout;
pub mod sequence_mean;
pub mod token;

/// Parameters of the clipped surrogate.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ClipConfig {
    /// `ε_low`: the ratio is clipped from below at `1 − ε_low`.
    pub eps_low: f64,
    /// `ε_high`: the ratio is clipped from above at `1 + ε_high`.
    pub eps_high: f64,
    /// Dual clip `c > 1`: for `A < 0` the loss is capped at `−A·c`. `None`: off.
    pub dual_clip: Option<f64>,
    /// Clamp `log π − log π_old` to `[−k, k]` before `exp` (verl, OpenRLHF: 20).
    pub log_ratio_clamp: Option<f64>,
}

impl ClipConfig {
    /// The clip of `preset` with clip range `[1 − eps_low, 1 + eps_high]`.
    ///
    /// | preset | log-ratio clamp | dual clip |
    /// |---|---|---|
    /// | [`Preset::Verl`] | 20 | `clip_ratio_c` = 3 |
    /// | [`Preset::OpenRlhf`] | 20 | off (`dual_clip=None`) |
    /// | [`Preset::Trl`], [`Preset::Torchtune`] | none | off |
    ///
    /// # Example
    ///
    /// ```
    /// use posttrain_core::policy::ClipConfig;
    /// use posttrain_core::Preset;
    /// let c = ClipConfig::preset(Preset::Verl, 0.2, 0.28);
    /// assert_eq!((c.dual_clip, c.log_ratio_clamp), (Some(3.0), Some(20.0)));
    /// c.validate()?;
    /// # Ok::<(), posttrain_core::Error>(())
    /// ```
    pub fn preset(preset: Preset, eps_low: f64, eps_high: f64) -> Self {
        let (dual_clip, log_ratio_clamp) = match preset {
            Preset::Verl => (Some(3.0), Some(20.0)),
            Preset::OpenRlhf => (None, Some(20.0)),
            _ => (None, None),
        };
        ClipConfig {
            eps_low,
            eps_high,
            dual_clip,
            log_ratio_clamp,
        }
    }

    /// Checks the ranges: `ε_low, ε_high` finite and ≥ 0, dual clip `c > 1`,
    /// log-ratio clamp finite and > 0.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] naming the field as verl names it
    /// (`clip_ratio_low`, `clip_ratio_high`, `clip_ratio_c`, `log_ratio_clamp`).
    pub fn validate(&self) -> Result<(), Error> {
        let eps = |name, v: f64| {
            check_param(v.is_finite() && v >= 0.0, name, v, "must be finite and ≥ 0")
        };
        eps("clip_ratio_low", self.eps_low)?;
        eps("clip_ratio_high", self.eps_high)?;
        if let Some(c) = self.dual_clip {
            check_param(c.is_finite() && c > 1.0, "clip_ratio_c", c, "must be > 1")?;
        }
        if let Some(k) = self.log_ratio_clamp {
            check_param(
                k.is_finite() && k > 0.0,
                "log_ratio_clamp",
                k,
                "must be finite and > 0",
            )?;
        }
        Ok(())
    }
}

/// Safety cap on every log-ratio before `exp` in the policy losses: `x ≤ 80`
/// (`e⁸⁰ ≈ 5.5·10³⁴`, finite in `f32`), gradient 0 where the cap is active.
/// It applies even with no configured clamp (TRL, torchtune), where a finite
/// but huge log-ratio would otherwise give an infinite loss and gradient;
/// peers' numbers differ only past `x = 80`, where theirs are inf or NaN in
/// `f32` and astronomically large in `f64`.
pub const LOG_RATIO_SAFETY: f64 = 80.0;

/// One token's clipped surrogate, its gradient and its clip indicators.
#[derive(Debug, Clone)]
pub struct SurrogateToken<E: Elem> {
    /// The per-token loss `ℓ`.
    pub loss: E,
    /// `∂ℓ/∂ log π`.
    pub grad: E,
    /// The ratio `r` (after the log-ratio clamp).
    pub ratio: E,
    /// The log-ratio `log π − log π_old` (after the clamp).
    pub log_ratio: E,
    /// Where the clipped branch is strictly larger (`−A·clip(r) > −A·r`):
    /// verl's and torchtune's `clipfrac` counts these.
    pub clipped: E::Mask,
    /// Where the dual clip is active (`A < 0` and `−A·c` strictly below the clipped loss).
    pub dual_clipped: E::Mask,
}

/// The PPO clipped surrogate (with clip-higher and dual clip) for one token —
/// or, in the burn adapter, for a whole tensor of tokens.
///
/// # Formula
///
/// ```text
/// x  = clamp(log π − log π_old, −k, k)        (if log_ratio_clamp = k)
/// x  = min(x, 80)                              (LOG_RATIO_SAFETY, always)
/// r  = eˣ
/// ℓ₁ = −A·r,  ℓ₂ = −A·clip(r, 1−ε_low, 1+ε_high),  ℓ_clip = max(ℓ₁, ℓ₂)
/// ℓ  = min(ℓ_clip, −A·c) if A < 0 and dual clip c is set, else ℓ_clip
/// ```
///
/// # Gradient
///
/// `∂ℓ/∂ log π = −A·r` on the branch that is active and unclipped, 0 where the
/// ratio is clipped, the dual clip is active, or the log-ratio clamp or the
/// safety cap is active. At a tie `ℓ₁ = ℓ₂` (ratio inside the range) both branches have the
/// same derivative, so the choice does not matter.
///
/// # Peers
///
/// verl `compute_policy_loss_vanilla` (log-ratio clamp 20, dual clip with
/// `clip_ratio_c`), OpenRLHF `PolicyLoss` (clamp 20, `dual_clip`), TRL GRPO
/// token level (no clamp, no dual clip), torchtune `PPOLoss` (no clamp).
///
/// # Example
///
/// ```
/// use posttrain_core::policy::{ppo_clipped_surrogate, ClipConfig};
/// let cfg = ClipConfig { eps_low: 0.2, eps_high: 0.2, dual_clip: None, log_ratio_clamp: None };
/// // ratio e^{0.5} ≈ 1.65 > 1.2 with A > 0: clipped, no gradient.
/// let t = ppo_clipped_surrogate(&cfg, 0.5f64, 0.0, 1.0);
/// assert!((t.loss + 1.2).abs() < 1e-12);
/// assert_eq!(t.grad, 0.0);
/// assert!(t.clipped);
/// ```
#[inline(always)]
pub fn ppo_clipped_surrogate<E: Elem>(
    cfg: &ClipConfig,
    log_prob: E,
    old_log_prob: E,
    advantage: E,
) -> SurrogateToken<E> {
    let raw = log_prob.sub(old_log_prob);
    let zero = raw.full_like(0.0);
    let (log_ratio, live) = match cfg.log_ratio_clamp {
        Some(k) => {
            let live = raw.ge_scalar(-k).and(raw.le_scalar(k));
            (raw.clamp(-k, k), Some(live))
        }
        None => (raw, None),
    };
    // Safety cap (whatever the clamp): e^x overflows past 88 (f32) / 709 (f64).
    let capped = log_ratio.gt_scalar(LOG_RATIO_SAFETY);
    let log_ratio = log_ratio.min_scalar(LOG_RATIO_SAFETY);
    let ratio = log_ratio.clone().exp();
    let neg_a = advantage.clone().neg();
    let l1 = neg_a.clone().mul(ratio.clone());
    let lo = 1.0 - cfg.eps_low;
    let hi = 1.0 + cfg.eps_high;
    let l2 = neg_a.clone().mul(ratio.clone().clamp(lo, hi));
    let in_range = ratio.ge_scalar(lo).and(ratio.le_scalar(hi));
    let d1 = neg_a.clone().mul(ratio.clone());
    let d2 = E::select(&in_range, d1.clone(), zero.clone());
    let clipped = l2.gt(&l1);
    let l_clip = E::select(&clipped, l2, l1);
    let d_clip = E::select(&clipped, d2, d1);
    let (loss, grad, dual_clipped) = match cfg.dual_clip {
        Some(c) => {
            let l3 = neg_a.mul_scalar(c);
            let neg_adv = advantage.lt_scalar(0.0);
            let dual = neg_adv.clone().and(l_clip.gt(&l3));
            let loss = E::select(&dual, l3, l_clip);
            let grad = E::select(&dual, zero.clone(), d_clip);
            (loss, grad, dual)
        }
        None => {
            let none = zero.gt(&zero);
            (l_clip, d_clip, none)
        }
    };
    let grad = match live {
        Some(live) => E::select(&live, grad, zero.clone()),
        None => grad,
    };
    let grad = E::select(&capped, zero, grad);
    SurrogateToken {
        loss,
        grad,
        ratio,
        log_ratio,
        clipped,
        dual_clipped,
    }
}
