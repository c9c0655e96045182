//! KL estimators on tensors: [`KlConfig::estimate`] — the core kernel itself —
//! run on `[batch, seq]` tensors, and the aggregated KL loss.
//!
//! See [`posttrain_core::kl`] for the estimators (k1, abs, k2, k3,
//! straight-through), their clamps and the peers' presets.
//!
//! # Example
//!
//! ```
//! use posttrain_burn::{device, kl::kl_loss, mask2, tensor2, to_vec};
//! use posttrain_core::aggregate::{AggMode, GlobalNorm};
//! use posttrain_core::kl::KlConfig;
//! let dev = device()?;
//! let lp = tensor2(&[-1.0, -0.5, -2.0, -0.1], [2, 2], &dev)?;
//! let rf = tensor2(&[-1.2, -0.5, -1.0, -0.3], [2, 2], &dev)?;
//! let mask = mask2(&[true, true, true, false], [2, 2], &dev)?;
//! let cfg = KlConfig::parse_verl("low_var_kl")?;
//! let out = kl_loss(&cfg, AggMode::TokenMean, &GlobalNorm::default(), lp, rf, &mask)?;
//! assert!(to_vec(out.value)[0] > 0.0);
//! assert_eq!(to_vec(out.grad)[3], 0.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use burn::tensor::{Bool, Tensor};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::kl::KlConfig;
use posttrain_core::Error;

use crate::aggregate::aggregate;
use crate::elem::ElemTensor;
use crate::util::{check_shape, keep};

/// Per-token KL estimates and their derivative.
#[derive(Debug, Clone)]
pub struct KlEstimate {
    /// The estimate per token, `[batch, seq]` (0 on masked positions).
    pub value: Tensor<2>,
    /// `∂estimate/∂log π` per token (0 on masked positions).
    pub grad: Tensor<2>,
}

/// The KL estimate of every token and its derivative in `log π`.
///
/// # Formula
///
/// `cfg.estimate(log_prob, ref_log_prob)` ([`KlConfig::estimate`]) on the
/// whole tensors, then masked positions selected to 0.
///
/// # Gradient
///
/// `∂estimate/∂log π` element-wise, as the core kernel returns it (0 where a
/// clamp is active, the k2 gradient for straight-through estimators).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if the shapes differ.
pub fn kl_estimate(
    cfg: &KlConfig,
    log_prob: Tensor<2>,
    ref_log_prob: Tensor<2>,
    mask: &Tensor<2, Bool>,
) -> Result<KlEstimate, Error> {
    check_shape("log_prob", log_prob.dims(), mask.dims())?;
    check_shape("ref_log_prob", ref_log_prob.dims(), mask.dims())?;
    let (value, grad) = cfg.estimate(ElemTensor(log_prob), ElemTensor(ref_log_prob));
    Ok(KlEstimate {
        value: keep(value.0, mask),
        grad: keep(grad.0, mask),
    })
}

/// An aggregated KL loss and its gradient.
#[derive(Debug, Clone)]
pub struct KlLoss {
    /// The aggregated loss, shape `[1]`.
    pub value: Tensor<1>,
    /// `∂loss/∂log π`, `[batch, seq]`.
    pub grad: Tensor<2>,
    /// The per-token estimates (0 on masked positions).
    pub per_token: Tensor<2>,
}

/// The KL loss: per-token estimates aggregated with `mode`.
///
/// # Formula
///
/// `L = Σ wᵢⱼ·kl(log πᵢⱼ, log π_refᵢⱼ)` with `w` from
/// [`aggregation_weights`](crate::aggregate::aggregation_weights).
///
/// # Gradient
///
/// `∂L/∂log πᵢⱼ = wᵢⱼ · ∂kl/∂log πᵢⱼ`.
///
/// # Peers
///
/// verl `kl_penalty` + `agg_loss` (actor `use_kl_loss`).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for shapes, [`Error::OutOfRange`] for `norm`.
pub fn kl_loss(
    cfg: &KlConfig,
    mode: AggMode,
    norm: &GlobalNorm,
    log_prob: Tensor<2>,
    ref_log_prob: Tensor<2>,
    mask: &Tensor<2, Bool>,
) -> Result<KlLoss, Error> {
    let est = kl_estimate(cfg, log_prob, ref_log_prob, mask)?;
    let agg = aggregate(mode, norm, est.value.clone(), mask)?;
    Ok(KlLoss {
        value: agg.value,
        grad: keep(agg.weights * est.grad, mask),
        per_token: est.value,
    })
}
