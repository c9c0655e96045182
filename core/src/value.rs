//! Value-function losses: clipped and unclipped squared error, the value clip
//! fraction, and torchtune's combined PPO actor-critic loss.
//!
//! # Overview
//!
//! A critic `V` is regressed onto the returns `R`. PPO's clipped variant keeps
//! the new prediction within `±c` of the prediction `V_old` made when the
//! rollout was collected, and takes the pessimistic (larger) of the two errors:
//!
//! ```text
//! V_clip = clamp(V, V_old − c, V_old + c)
//! ℓ      = max((V − R)², (V_clip − R)²)          (clipped, c = clip_range)
//! ℓ      = (V − R)²                                (unclipped, clip_range = None)
//! L      = 0.5 · aggregate(ℓ)
//! ```
//!
//! | function | aggregation | peers |
//! |---|---|---|
//! | [`clipped_value_error`] | (one token, over [`Elem`]) | the kernel of all below |
//! | [`value_loss`] | any [`AggMode`] with [`GlobalNorm`] | verl `compute_value_loss`, OpenRLHF `ValueLoss` |
//! | [`policy_value_loss`] | masked means (`+1e-8`) or plain means | torchtune `PPOLoss` (+ the recipe's `approx_policy_kls`) |
//!
//! [`ValueLossConfig::preset`] fills the peers' choices: verl always clips and
//! takes `loss_agg_mode`; OpenRLHF clips only when `clip_eps` is set and
//! aggregates per token (`token_level_loss = true` → `token-mean`) or per
//! sequence (`false` → `seq-mean-token-mean`).
//!
//! # Masking
//!
//! Masked positions are *selected out*: NaN or ±inf there never reach a loss,
//! a metric or a gradient (except torchtune's two whole-tensor metrics
//! `ratio_mean` and `approx_kl`, which by the peer's definition average every
//! position, padding included). A fully masked batch gives loss 0 and a zero
//! gradient (verl and torchtune give `0/0 = NaN` or a `1e-8`-guarded 0).
//!
//! # Example
//!
//! ```
//! use posttrain_core::aggregate::AggMode;
//! use posttrain_core::value::{value_loss, ValueLossConfig};
//! use posttrain_core::Dims;
//!
//! let cfg = ValueLossConfig::new(Some(0.2), AggMode::TokenMean)?;
//! let dims = Dims::new(1, 3);
//! let (v, old, ret) = ([1.0f64, 0.5, f64::NAN], [0.9, 0.0, 0.0], [1.2, 0.5, 0.0]);
//! let mask = [true, true, false];
//! let (mut per_token, mut grad) = ([0.0; 3], [0.0; 3]);
//! let out = value_loss(&cfg, dims, &v, &old, &ret, &mask, &mut per_token, Some(&mut grad))?;
//! // token 0: V=1.0 inside [0.7, 1.1], error 0.04; token 1: V_clip = 0.2, error 0.09.
//! assert!((out.loss - 0.5 * (0.04 + 0.09) / 2.0).abs() < 1e-12);
//! assert_eq!(out.clipfrac, 0.5 / (1.0 + 0.5e-8));
//! assert_eq!(grad[2], 0.0);
//! # Ok::<(), posttrain_core::Error>(())
//! ```

use crate::aggregate::{aggregate, AggMode, GlobalNorm};
use crate::elem::{Elem, MaskElem, Real};
use crate::error::{check_len, check_param, Error};
use crate::policy::{ppo_clipped_surrogate, ClipConfig};
use crate::preset::Preset;
use crate::shape::Dims;

/// One token's value error, its derivative and its clip indicator.
#[derive(Debug, Clone)]
pub struct ValueToken<E: Elem> {
    /// `ℓ = max((V − R)², (V_clip − R)²)`, or `(V − R)²` without clipping.
    pub loss: E,
    /// `∂ℓ/∂V`.
    pub grad: E,
    /// Where the clipped error is strictly larger than the unclipped one
    /// (verl's `vf_clipfrac` counts these). Always false without clipping.
    pub clipped: E::Mask,
}

/// The (optionally clipped) squared error of one value prediction — or, in the
/// burn adapter, of a whole tensor of them.
///
/// # Formula
///
/// ```text
/// V_clip = clamp(V, V_old − c, V_old + c)
/// ℓ      = max((V − R)², (V_clip − R)²)       clip_range = Some(c)
/// ℓ      = (V − R)²                            clip_range = None
/// ```
///
/// No `0.5` here: the drivers apply it after aggregation, as the peers do.
///
/// # Gradient
///
/// `∂ℓ/∂V = 2(V − R)` on the unclipped branch; `2(V_clip − R)` on the clipped
/// branch while `V` lies inside `[V_old − c, V_old + c]`, else 0. Inside the
/// range both branches coincide.
///
/// # Peers
///
/// verl `compute_value_loss` (`clip_by_value`), OpenRLHF `ValueLoss`
/// (`V_old + clamp(V − V_old, ±c)`, equal up to rounding), torchtune `PPOLoss`.
///
/// # Example
///
/// ```
/// use posttrain_core::value::clipped_value_error;
/// // V moved from 0 to 1, clipped back to 0.2; R = 0.5: the clipped error is
/// // smaller, so the unclipped one counts.
/// let t = clipped_value_error(Some(0.2), 1.0f64, 0.0, 0.5);
/// assert!((t.loss - 0.25).abs() < 1e-15 && (t.grad - 1.0).abs() < 1e-15 && !t.clipped);
/// ```
pub fn clipped_value_error<E: Elem>(
    clip_range: Option<f64>,
    value: E,
    old_value: E,
    ret: E,
) -> ValueToken<E> {
    let err = value.clone().sub(ret.clone());
    let l1 = err.clone().mul(err.clone());
    let d1 = err.mul_scalar(2.0);
    match clip_range {
        None => {
            let never = l1.gt(&l1);
            ValueToken {
                loss: l1,
                grad: d1,
                clipped: never.clone().and(never),
            }
        }
        Some(c) => {
            let lo = old_value.clone().add_scalar(-c);
            let hi = old_value.add_scalar(c);
            let inside = value.ge(&lo).and(hi.ge(&value));
            let v_clip = value.max(lo).min(hi);
            let err2 = v_clip.sub(ret);
            let l2 = err2.clone().mul(err2.clone());
            let zero = l2.full_like(0.0);
            let d2 = E::select(&inside, err2.mul_scalar(2.0), zero);
            let clipped = l2.gt(&l1);
            ValueToken {
                loss: E::select(&clipped, l2, l1),
                grad: E::select(&clipped, d2, d1),
                clipped,
            }
        }
    }
}

/// Configuration of [`value_loss`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ValueLossConfig {
    /// `c`: clip the new value to `V_old ± c`. `None`: plain squared error.
    pub clip_range: Option<f64>,
    /// How the per-token errors are reduced.
    pub agg: AggMode,
    /// Global normalizers for the aggregation (data-parallel invariance).
    pub norm: GlobalNorm,
}

impl ValueLossConfig {
    /// A validated configuration with local normalizers ([`GlobalNorm::default`]).
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] if `clip_range` is negative or not finite.
    pub fn new(clip_range: Option<f64>, agg: AggMode) -> Result<Self, Error> {
        let cfg = ValueLossConfig {
            clip_range,
            agg,
            norm: GlobalNorm::default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The same configuration with global normalizers (validated when the
    /// loss runs, by [`aggregate`]).
    pub fn with_norm(mut self, norm: GlobalNorm) -> Self {
        self.norm = norm;
        self
    }

    /// The peers' trainer defaults, all with `token-mean` and local normalizers:
    ///
    /// | preset | clip range | source |
    /// |---|---|---|
    /// | `Verl` | 0.5 | `critic.cliprange_value` |
    /// | `OpenRlhf` | 0.5 | `--critic.value_clip` (the bare `ValueLoss` class defaults to no clip) |
    /// | `Trl` | 0.2 | `PPOConfig.cliprange_value` |
    /// | `Torchtune` | 0.2 | `PPOLoss.value_clip_range` (see [`policy_value_loss`]) |
    pub fn preset(preset: Preset) -> Self {
        let clip_range = match preset {
            Preset::Verl | Preset::OpenRlhf => Some(0.5),
            _ => Some(0.2),
        };
        ValueLossConfig {
            clip_range,
            agg: AggMode::TokenMean,
            norm: GlobalNorm::default(),
        }
    }

    /// OpenRLHF's `token_level_loss` flag as an aggregation mode:
    /// `true` → `token-mean`, `false` → `seq-mean-token-mean` (each sequence's
    /// token mean with `+1e-8`, averaged over the sequences with ≥ 1 token).
    pub fn openrlhf_aggregation(token_level_loss: bool) -> AggMode {
        if token_level_loss {
            AggMode::TokenMean
        } else {
            AggMode::SeqMeanTokenMean
        }
    }

    /// OpenRLHF's `ValueLoss(clip_eps, token_level_loss)` called with
    /// `dp_size`, `batch_num_tokens`, `global_batch_size`: the aggregation of
    /// [`openrlhf_aggregation`](Self::openrlhf_aggregation), where `dp_size`
    /// applies only together with the global count of the mode in use
    /// (`batch_num_tokens` per token, `global_batch_size` per sequence), as in
    /// OpenRLHF's `aggregate_loss`.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] for a negative `clip_eps`.
    pub fn openrlhf(
        clip_eps: Option<f64>,
        token_level_loss: bool,
        dp_size: f64,
        batch_num_tokens: Option<f64>,
        global_batch_size: Option<f64>,
    ) -> Result<Self, Error> {
        let agg = Self::openrlhf_aggregation(token_level_loss);
        let global = if token_level_loss {
            batch_num_tokens.is_some()
        } else {
            global_batch_size.is_some()
        };
        let norm = GlobalNorm {
            dp_size: if global { dp_size } else { 1.0 },
            batch_num_tokens: batch_num_tokens.filter(|_| token_level_loss),
            global_batch_size: global_batch_size.filter(|_| !token_level_loss),
            loss_scale_factor: None,
        };
        Ok(Self::new(clip_eps, agg)?.with_norm(norm))
    }

    /// Checks the clip range and the normalizers.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] for a negative or non-finite clip range or a bad
    /// normalizer.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(c) = self.clip_range {
            check_param(
                c.is_finite() && c >= 0.0,
                "clip_range",
                c,
                "must be finite and ≥ 0",
            )?;
        }
        self.norm.validate()
    }
}

/// What [`value_loss`] returns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueLossOutput<F> {
    /// `0.5 · aggregate(ℓ)`.
    pub loss: F,
    /// Fraction of valid tokens where the clipped error is strictly larger,
    /// `Σ clipped / (n + 1e-8)` (verl's `masked_mean`); 0 without clipping.
    pub clipfrac: F,
}

/// The PPO value loss over a `[batch, seq]` batch: clipped (or plain) squared
/// error, aggregated, halved.
///
/// Writes each token's error `ℓ` (before the `0.5`) into `per_token` (0 on
/// masked positions) and, if `grad` is given, `∂L/∂V` into it.
///
/// # Formula
///
/// ```text
/// L        = 0.5 · Σᵢⱼ wᵢⱼ ℓᵢⱼ          (w: aggregation weights of cfg.agg, cfg.norm)
/// clipfrac = Σ_valid 1[(V_clip − R)² > (V − R)²] / (n + 1e-8)
/// ```
///
/// with `ℓ` from [`clipped_value_error`].
///
/// # Gradient
///
/// `∂L/∂Vᵢⱼ = 0.5 · wᵢⱼ · ∂ℓᵢⱼ/∂Vᵢⱼ`, 0 on masked positions.
///
/// # Peers
///
/// verl `compute_value_loss(vpreds = values, values = old_values, …)` with
/// `cliprange_value` and `loss_agg_mode` ([`Preset::Verl`]); OpenRLHF
/// `ValueLoss(clip_eps, token_level_loss)` (see
/// [`ValueLossConfig::openrlhf_aggregation`]). Both return NaN for a fully
/// masked batch; this returns 0.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] when an input or buffer is not `dims.len()` long;
/// [`Error::OutOfRange`] for a bad clip range or normalizer.
#[allow(clippy::too_many_arguments)]
pub fn value_loss<F: Real>(
    cfg: &ValueLossConfig,
    dims: Dims,
    values: &[F],
    old_values: &[F],
    returns: &[F],
    mask: &[bool],
    per_token: &mut [F],
    grad: Option<&mut [F]>,
) -> Result<ValueLossOutput<F>, Error> {
    cfg.validate()?;
    let n = dims.len();
    check_len("values", values.len(), n)?;
    check_len("old_values", old_values.len(), n)?;
    check_len("returns", returns.len(), n)?;
    check_len("mask", mask.len(), n)?;
    check_len("per_token", per_token.len(), n)?;
    let mut clipped = 0usize;
    let mut valid = 0usize;
    for i in 0..n {
        per_token[i] = if mask[i] {
            let t = clipped_value_error(cfg.clip_range, values[i], old_values[i], returns[i]);
            valid += 1;
            clipped += t.clipped as usize;
            t.loss
        } else {
            F::zero()
        };
    }
    let half = F::of(0.5);
    let loss = match grad {
        Some(g) => {
            check_len("grad", g.len(), n)?;
            let l = aggregate(cfg.agg, &cfg.norm, dims, per_token, mask, Some(&mut *g))?;
            for i in 0..n {
                g[i] = if mask[i] {
                    let t =
                        clipped_value_error(cfg.clip_range, values[i], old_values[i], returns[i]);
                    half * g[i] * t.grad
                } else {
                    F::zero()
                };
            }
            l
        }
        None => aggregate(cfg.agg, &cfg.norm, dims, per_token, mask, None)?,
    };
    let clipfrac = F::of(clipped as f64 / (valid as f64 + 1e-8));
    Ok(ValueLossOutput {
        loss: half * loss,
        clipfrac,
    })
}

/// Configuration of [`policy_value_loss`] (torchtune's `PPOLoss`).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PolicyValueConfig {
    /// `ε`: the policy ratio is clipped to `[1 − ε, 1 + ε]`.
    pub epsilon: f64,
    /// `c`: the value is clipped to `V_old ± c`.
    pub value_clip_range: f64,
    /// Weight of the value loss in the total.
    pub value_coeff: f64,
}

impl PolicyValueConfig {
    /// A validated configuration.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] if `epsilon` or `value_clip_range` is negative,
    /// or any parameter is not finite.
    pub fn new(epsilon: f64, value_clip_range: f64, value_coeff: f64) -> Result<Self, Error> {
        let cfg = PolicyValueConfig {
            epsilon,
            value_clip_range,
            value_coeff,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// torchtune's defaults: `ε = 0.1`, value clip `0.2`, value coefficient `0.1`
    /// (every preset gives these; only torchtune has this combined loss).
    pub fn preset(_preset: Preset) -> Self {
        PolicyValueConfig {
            epsilon: 0.1,
            value_clip_range: 0.2,
            value_coeff: 0.1,
        }
    }

    /// Checks every parameter's range.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] if `epsilon` or `value_clip_range` is negative,
    /// or any parameter is not finite.
    pub fn validate(&self) -> Result<(), Error> {
        check_param(
            self.epsilon.is_finite() && self.epsilon >= 0.0,
            "epsilon",
            self.epsilon,
            "must be finite and ≥ 0",
        )?;
        check_param(
            self.value_clip_range.is_finite() && self.value_clip_range >= 0.0,
            "value_clip_range",
            self.value_clip_range,
            "must be finite and ≥ 0",
        )?;
        check_param(
            self.value_coeff.is_finite(),
            "value_coeff",
            self.value_coeff,
            "must be finite",
        )
    }

    /// The policy surrogate's clip: `[1 − ε, 1 + ε]`, no dual clip, no
    /// log-ratio clamp (torchtune has none).
    pub fn clip(&self) -> ClipConfig {
        ClipConfig {
            eps_low: self.epsilon,
            eps_high: self.epsilon,
            dual_clip: None,
            log_ratio_clamp: None,
        }
    }
}

/// What [`policy_value_loss`] returns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyValueOutput<F> {
    /// `policy_loss + value_coeff · value_loss`.
    pub loss: F,
    /// Masked mean of the clipped surrogate.
    pub policy_loss: F,
    /// `0.5 ·` masked mean of the clipped value error.
    pub value_loss: F,
    /// Mean ratio `π/π_old` over **every** position, padding included (torchtune's `ratios`).
    pub ratio_mean: F,
    /// Masked mean of the clip indicator (strict `>`).
    pub clipfrac: F,
    /// `mean(0.5 · (log π − log π_old)²)` over every position, padding
    /// included (the torchtune PPO recipe's `approx_policy_kls`).
    pub approx_kl: F,
}

/// Gradient buffers of [`policy_value_loss`]: `∂loss/∂log π` and `∂loss/∂V`.
#[derive(Debug)]
pub struct PolicyValueGrads<'a, F> {
    /// Receives `∂loss/∂log π` (`dims.len()` long).
    pub log_prob: &'a mut [F],
    /// Receives `∂loss/∂V` (`dims.len()` long).
    pub value: &'a mut [F],
}

/// Mean denominators: `n + 1e-8` with a mask (torchtune `masked_mean`), the
/// plain count without.
fn mean_denominator(mask: Option<&[bool]>, len: usize) -> f64 {
    match mask {
        Some(m) => m.iter().filter(|&&b| b).count() as f64 + 1e-8,
        None => len.max(1) as f64,
    }
}

#[inline]
fn valid(mask: Option<&[bool]>, i: usize) -> bool {
    mask.is_none_or(|m| m[i])
}

/// torchtune's PPO loss: the clipped policy surrogate and the clipped value
/// loss, each a masked mean, added with weight `value_coeff`.
///
/// # Formula
///
/// ```text
/// r  = exp(log π − log π_old)
/// P  = Σ_valid max(−A·r, −A·clip(r, 1−ε, 1+ε)) / D_p
/// Vl = 0.5 · Σ_valid' max((V − R)², (V_clip − R)²) / D_v
/// loss = P + value_coeff · Vl
/// ```
///
/// `D = n + 1e-8` over a mask's valid positions, or the plain element count
/// when the mask is `None` (every position valid). `clipfrac` is the masked
/// mean of `−A·clip(r) > −A·r`; `ratio_mean` and `approx_kl` average every
/// position (see [`PolicyValueOutput`]).
///
/// # Gradient
///
/// `∂loss/∂log πᵢ = ∂ℓᵢ/∂log πᵢ / D_p` ([`ppo_clipped_surrogate`]'s gradient),
/// `∂loss/∂Vᵢ = value_coeff · 0.5 · ∂ℓᵢ/∂Vᵢ / D_v` ([`clipped_value_error`]),
/// both 0 where masked.
///
/// # Peers
///
/// torchtune `rlhf.loss.PPOLoss` (with `padding_masks`, `value_padding_masks`)
/// plus `approx_policy_kls` from its PPO recipe's `ppo_step`. A fully masked
/// batch gives 0 (torchtune: also 0, thanks to its `1e-8`).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] when an input, mask or gradient buffer is not
/// `dims.len()` long; [`Error::Empty`] for an empty batch (the whole-batch
/// means are undefined); [`Error::OutOfRange`] for a bad configuration.
///
/// # Example
///
/// ```
/// use posttrain_core::value::{policy_value_loss, PolicyValueConfig};
/// use posttrain_core::Dims;
/// let cfg = PolicyValueConfig::new(0.2, 0.2, 0.5)?;
/// let z = [0.0f64; 2];
/// let out = policy_value_loss(&cfg, Dims::new(1, 2), &z, &z, &[1.0, -1.0], &z, &[0.1, 0.0],
///                             &[0.0, 0.0], None, None, None)?;
/// // r = 1 everywhere: P = mean(−A) = 0; value errors 0.01 and 0.
/// assert!((out.loss - 0.5 * 0.5 * 0.01 / 2.0).abs() < 1e-15);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn policy_value_loss<F: Real>(
    cfg: &PolicyValueConfig,
    dims: Dims,
    old_log_prob: &[F],
    log_prob: &[F],
    advantages: &[F],
    old_values: &[F],
    values: &[F],
    returns: &[F],
    policy_mask: Option<&[bool]>,
    value_mask: Option<&[bool]>,
    grads: Option<PolicyValueGrads<'_, F>>,
) -> Result<PolicyValueOutput<F>, Error> {
    cfg.validate()?;
    let n = dims.len();
    if n == 0 {
        return Err(Error::Empty { input: "log_prob" });
    }
    check_len("old_log_prob", old_log_prob.len(), n)?;
    check_len("log_prob", log_prob.len(), n)?;
    check_len("advantages", advantages.len(), n)?;
    check_len("old_values", old_values.len(), n)?;
    check_len("values", values.len(), n)?;
    check_len("returns", returns.len(), n)?;
    if let Some(m) = policy_mask {
        check_len("policy_mask", m.len(), n)?;
    }
    if let Some(m) = value_mask {
        check_len("value_mask", m.len(), n)?;
    }
    let mut grads = grads;
    if let Some(g) = grads.as_ref() {
        check_len("grad log_prob", g.log_prob.len(), n)?;
        check_len("grad value", g.value.len(), n)?;
    }
    let clip = cfg.clip();
    let dp = F::of(mean_denominator(policy_mask, n));
    let dv = F::of(mean_denominator(value_mask, n));
    let half = F::of(0.5);
    let coeff = F::of(cfg.value_coeff);
    let (mut p_sum, mut clip_sum, mut v_sum) = (F::zero(), F::zero(), F::zero());
    let (mut r_sum, mut kl_sum) = (F::zero(), F::zero());
    for i in 0..n {
        let t = ppo_clipped_surrogate(&clip, log_prob[i], old_log_prob[i], advantages[i]);
        r_sum += t.ratio;
        kl_sum += half * t.log_ratio * t.log_ratio;
        let p_ok = valid(policy_mask, i);
        if p_ok {
            p_sum += t.loss;
            if t.clipped {
                clip_sum += F::one();
            }
        }
        let v_ok = valid(value_mask, i);
        let vt = if v_ok {
            let vt = clipped_value_error(
                Some(cfg.value_clip_range),
                values[i],
                old_values[i],
                returns[i],
            );
            v_sum += vt.loss;
            Some(vt)
        } else {
            None
        };
        if let Some(g) = grads.as_mut() {
            g.log_prob[i] = if p_ok { t.grad / dp } else { F::zero() };
            g.value[i] = match vt {
                Some(vt) => coeff * half * vt.grad / dv,
                None => F::zero(),
            };
        }
    }
    let policy_loss = p_sum / dp;
    let value_loss = half * (v_sum / dv);
    let count = F::of_usize(n);
    Ok(PolicyValueOutput {
        loss: policy_loss + value_loss * coeff,
        policy_loss,
        value_loss,
        ratio_mean: r_sum / count,
        clipfrac: clip_sum / dp,
        approx_kl: kl_sum / count,
    })
}
