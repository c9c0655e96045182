//! Value-function losses on tensors: the core's per-token kernel
//! [`clipped_value_error`] (and, for torchtune's combined loss,
//! [`ppo_clipped_surrogate`]) on whole `[batch, seq]` tensors, with the
//! aggregation and the masked means written as tensor reductions.
//!
//! | op | core counterpart | peers |
//! |---|---|---|
//! | [`value_loss`] | [`posttrain_core::value::value_loss`] | verl `compute_value_loss`, OpenRLHF `ValueLoss` |
//! | [`policy_value_loss`] | [`posttrain_core::value::policy_value_loss`] | torchtune `PPOLoss` (+ the recipe's `approx_policy_kls`) |
//!
//! Masked positions are selected away: NaN/±inf there reach no value and no
//! gradient — except torchtune's two whole-tensor metrics `ratio_mean` and
//! `approx_kl`, which by the peer's definition average every position.
//!
//! # Example
//!
//! ```
//! use posttrain_burn::{device, mask2, tensor2, to_vec, value::value_loss};
//! use posttrain_core::aggregate::AggMode;
//! use posttrain_core::value::ValueLossConfig;
//! let dev = device()?;
//! let cfg = ValueLossConfig::new(Some(0.2), AggMode::TokenMean)?;
//! let v = tensor2(&[1.0, 0.5, f64::NAN], [1, 3], &dev)?;
//! let old = tensor2(&[0.9, 0.0, 0.0], [1, 3], &dev)?;
//! let ret = tensor2(&[1.2, 0.5, 0.0], [1, 3], &dev)?;
//! let mask = mask2(&[true, true, false], [1, 3], &dev)?;
//! let out = value_loss(&cfg, v, old, ret, &mask)?;
//! assert!((to_vec(out.loss)[0] - 0.5 * (0.04 + 0.09) / 2.0).abs() < 1e-6);
//! assert_eq!(to_vec(out.grad)[2], 0.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use burn::tensor::{Bool, Tensor};
use posttrain_core::policy::ppo_clipped_surrogate;
use posttrain_core::value::{clipped_value_error, PolicyValueConfig, ValueLossConfig};
use posttrain_core::Error;

use crate::aggregate::{aggregation_weights, weighted_sum};
use crate::elem::ElemTensor;
use crate::util::{check_shape, count, keep};

/// verl's / torchtune's `+1e-8` in the masked-mean denominators.
const MEAN_EPS: f64 = 1e-8;

/// The value loss, its gradient and verl's clip fraction, as tensors.
#[derive(Debug, Clone)]
pub struct ValueLossOutput {
    /// `0.5 · aggregate(ℓ)`, `[1]`.
    pub loss: Tensor<1>,
    /// `∂loss/∂V`, `[batch, seq]` (0 on masked positions).
    pub grad: Tensor<2>,
    /// The per-token error `ℓ` before the `0.5` (0 on masked positions).
    pub per_token: Tensor<2>,
    /// verl `vf_clipfrac`, `[1]`.
    pub clipfrac: Tensor<1>,
}

/// The PPO value loss (clipped or plain squared error, aggregated, halved)
/// on tensors.
///
/// # Formula
///
/// As [`posttrain_core::value::value_loss`]: `ℓ` from
/// [`clipped_value_error`] on whole tensors,
/// `L = 0.5 · Σ select(mask, w·ℓ, 0)` with `w` the aggregation weights of
/// `cfg.agg` under `cfg.norm` ([`aggregation_weights`]),
/// `clipfrac = Σ_valid 1[clipped] / (n + 1e-8)`.
///
/// # Gradient
///
/// `∂L/∂V = 0.5 · w · ∂ℓ/∂V` on valid positions, 0 elsewhere.
///
/// # Peers
///
/// verl `compute_value_loss`, OpenRLHF `ValueLoss` (configure with
/// [`ValueLossConfig::openrlhf`]).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if an input's shape differs from the mask's;
/// [`Error::OutOfRange`] for a bad clip range or normalizer.
pub fn value_loss(
    cfg: &ValueLossConfig,
    values: Tensor<2>,
    old_values: Tensor<2>,
    returns: Tensor<2>,
    mask: &Tensor<2, Bool>,
) -> Result<ValueLossOutput, Error> {
    cfg.validate()?;
    let dims = mask.dims();
    check_shape("values", values.dims(), dims)?;
    check_shape("old_values", old_values.dims(), dims)?;
    check_shape("returns", returns.dims(), dims)?;
    let t = clipped_value_error(
        cfg.clip_range,
        ElemTensor(values),
        ElemTensor(old_values),
        ElemTensor(returns),
    );
    let per_token = keep(t.loss.0, mask);
    let w = aggregation_weights(cfg.agg, &cfg.norm, mask)?;
    let loss = weighted_sum(per_token.clone(), mask, &w).mul_scalar(0.5);
    let grad = keep((w * t.grad.0).mul_scalar(0.5), mask);
    let clipped = count(&t.clipped.0.bool_and(mask.clone()));
    let clipfrac = clipped / count(mask).add_scalar(MEAN_EPS);
    Ok(ValueLossOutput {
        loss,
        grad,
        per_token,
        clipfrac,
    })
}

/// The inputs of [`policy_value_loss`], all `[batch, seq]`.
#[derive(Debug, Clone)]
pub struct PolicyValueTensors {
    /// `log π_old`.
    pub old_log_prob: Tensor<2>,
    /// `log π` (trainable).
    pub log_prob: Tensor<2>,
    /// Advantages `A`.
    pub advantages: Tensor<2>,
    /// `V_old`.
    pub old_values: Tensor<2>,
    /// `V` (trainable).
    pub values: Tensor<2>,
    /// Returns `R`.
    pub returns: Tensor<2>,
}

/// The outputs of [`policy_value_loss`]: scalars are `[1]` tensors.
#[derive(Debug, Clone)]
pub struct PolicyValueOutput {
    /// `policy_loss + value_coeff · value_loss`.
    pub loss: Tensor<1>,
    /// Masked mean of the clipped surrogate.
    pub policy_loss: Tensor<1>,
    /// `0.5 ·` masked mean of the clipped value error.
    pub value_loss: Tensor<1>,
    /// Mean ratio over **every** position (torchtune's `ratios`).
    pub ratio_mean: Tensor<1>,
    /// Masked mean of the clip indicator.
    pub clipfrac: Tensor<1>,
    /// `mean(0.5·(log π − log π_old)²)` over every position.
    pub approx_kl: Tensor<1>,
    /// `∂loss/∂log π` (0 where the policy mask is off).
    pub grad_log_prob: Tensor<2>,
    /// `∂loss/∂V` (0 where the value mask is off).
    pub grad_values: Tensor<2>,
}

/// torchtune's PPO loss on tensors: the clipped policy surrogate and the
/// clipped value loss, each a masked mean over its own mask.
///
/// # Formula
///
/// As [`posttrain_core::value::policy_value_loss`]: with
/// [`ppo_clipped_surrogate`] (clip `[1 − ε, 1 + ε]`, no clamp) and
/// [`clipped_value_error`] on whole tensors,
///
/// ```text
/// P  = Σ select(m_p, ℓ_p, 0) / D_p
/// Vl = 0.5 · Σ select(m_v, ℓ_v, 0) / D_v
/// loss = P + value_coeff · Vl
/// ```
///
/// `D = count(mask) + 1e-8`, or the element count when the mask is `None`;
/// `clipfrac = Σ select(m_p, clipped) / D_p`; `ratio_mean` and `approx_kl`
/// are plain means over every element.
///
/// # Gradient
///
/// `∂loss/∂log π = ∂ℓ_p/∂log π / D_p` on `m_p`,
/// `∂loss/∂V = value_coeff · 0.5 · ∂ℓ_v/∂V / D_v` on `m_v`, 0 elsewhere.
///
/// # Peers
///
/// torchtune `rlhf.loss.PPOLoss` (`padding_masks`, `value_padding_masks`).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for an input or mask whose shape differs from
/// `log_prob`'s; [`Error::Empty`] for an empty batch; [`Error::OutOfRange`]
/// for a bad configuration.
pub fn policy_value_loss(
    cfg: &PolicyValueConfig,
    x: PolicyValueTensors,
    policy_mask: Option<&Tensor<2, Bool>>,
    value_mask: Option<&Tensor<2, Bool>>,
) -> Result<PolicyValueOutput, Error> {
    cfg.validate()?;
    let dims = x.log_prob.dims();
    if dims[0] * dims[1] == 0 {
        return Err(Error::Empty { input: "log_prob" });
    }
    check_shape("old_log_prob", x.old_log_prob.dims(), dims)?;
    check_shape("advantages", x.advantages.dims(), dims)?;
    check_shape("old_values", x.old_values.dims(), dims)?;
    check_shape("values", x.values.dims(), dims)?;
    check_shape("returns", x.returns.dims(), dims)?;
    if let Some(m) = policy_mask {
        check_shape("policy_mask", m.dims(), dims)?;
    }
    if let Some(m) = value_mask {
        check_shape("value_mask", m.dims(), dims)?;
    }
    let n = (dims[0] * dims[1]) as f64;
    let all = x.log_prob.ones_like().greater_elem(0.0);
    // D = count + 1e-8 with a mask, the element count without.
    let denom = |m: Option<&Tensor<2, Bool>>| match m {
        Some(m) => count(m).add_scalar(MEAN_EPS),
        None => count(&all).zeros_like().add_scalar(n),
    };
    let (dp, dv) = (denom(policy_mask), denom(value_mask));
    let pm = policy_mask.cloned().unwrap_or_else(|| all.clone());
    let vm = value_mask.cloned().unwrap_or(all);

    let t = ppo_clipped_surrogate(
        &cfg.clip(),
        ElemTensor(x.log_prob),
        ElemTensor(x.old_log_prob),
        ElemTensor(x.advantages),
    );
    let ratio_mean = t.ratio.0.sum().div_scalar(n);
    let lr = t.log_ratio.0;
    let approx_kl = (lr.clone() * lr).mul_scalar(0.5).sum().div_scalar(n);
    let policy_loss = keep(t.loss.0, &pm).sum() / dp.clone();
    let clipfrac = count(&t.clipped.0.bool_and(pm.clone())) / dp.clone();
    let [b, s] = dims;
    let grad_log_prob = keep(t.grad.0 / dp.reshape([1, 1]).expand([b, s]), &pm);

    let vt = clipped_value_error(
        Some(cfg.value_clip_range),
        ElemTensor(x.values),
        ElemTensor(x.old_values),
        ElemTensor(x.returns),
    );
    let value_loss = (keep(vt.loss.0, &vm).sum() / dv.clone()).mul_scalar(0.5);
    let grad_values = keep(
        vt.grad.0.mul_scalar(cfg.value_coeff * 0.5) / dv.reshape([1, 1]).expand([b, s]),
        &vm,
    );
    let loss = policy_loss.clone() + value_loss.clone().mul_scalar(cfg.value_coeff);
    Ok(PolicyValueOutput {
        loss,
        policy_loss,
        value_loss,
        ratio_mean,
        clipfrac,
        approx_kl,
        grad_log_prob,
        grad_values,
    })
}
