//! Token-level policy losses on tensors (verl's `policy_loss` registry): the
//! core's per-token kernels ([`PolicyLoss::token`], which calls
//! [`ppo_clipped_surrogate`](posttrain_core::policy::ppo_clipped_surrogate)
//! for PPO, and [`sequence_ratio_surrogate`] for GSPO) on `[batch, seq]`
//! tensors, importance weights, aggregation and verl's metrics.
//!
//! | [`PolicyLoss`] variant | verl `loss_mode` | here |
//! |---|---|---|
//! | `Ppo` | `vanilla` | yes |
//! | `DivergenceTv` / `DivergenceKl` | `dppo_tv` / `dppo_kl` | yes |
//! | `SoftGate` | `sapo` | yes |
//! | `LogProb` | `gpg`, REINFORCE | yes |
//! | `QuadraticPenalty` | `dro` | yes |
//! | `ClippedWeight` | `cispo` | yes |
//! | `SequenceRatio` | `gspo` | yes (row means as tensor reductions) |
//! | `ClipCov`, `KlCov` | `clip_cov`, `kl_cov` | no: top-k covariance selection ([`Error::Invalid`]) |
//! | `GeometricMean` | `geo_mean` | no ([`Error::Invalid`]) |
//!
//! # Example
//!
//! ```
//! use posttrain_burn::{device, mask2, policy::policy_loss, tensor2, to_vec};
//! use posttrain_core::aggregate::{AggMode, GlobalNorm};
//! use posttrain_core::policy::token::{PolicyLoss, PolicyLossMode, VerlPolicyParams};
//! let dev = device()?;
//! let loss = PolicyLoss::from_verl(PolicyLossMode::Vanilla, &VerlPolicyParams::default())?;
//! let lp = tensor2(&[-1.0, -0.5, f64::NAN], [1, 3], &dev)?;
//! let old = tensor2(&[-1.1, -0.4, 0.0], [1, 3], &dev)?;
//! let adv = tensor2(&[1.0, -1.0, 0.0], [1, 3], &dev)?;
//! let mask = mask2(&[true, true, false], [1, 3], &dev)?;
//! let out = policy_loss(&loss, AggMode::TokenMean, &GlobalNorm::default(), lp, old, adv, &mask, None)?;
//! assert!(to_vec(out.loss)[0].is_finite());
//! assert_eq!(to_vec(out.grad)[2], 0.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use burn::tensor::{Bool, Tensor};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::policy::token::{sequence_ratio_surrogate, PolicyLoss, PolicyToken};
use posttrain_core::Error;

use crate::aggregate::{aggregation_weights, weighted_sum};
use crate::elem::ElemTensor;
use crate::util::{check_shape, count, keep};

/// verl's `+1e-8` in the metric denominators.
const MEAN_EPS: f64 = 1e-8;

/// The aggregated policy loss, its gradient and verl's metrics, as tensors.
#[derive(Debug, Clone)]
pub struct PolicyLossOutput {
    /// The aggregated loss (verl `pg_loss`), `[1]`.
    pub loss: Tensor<1>,
    /// `∂loss/∂log π`, `[batch, seq]` (0 on masked positions).
    pub grad: Tensor<2>,
    /// The per-token loss after importance weights (0 on masked positions).
    pub per_token: Tensor<2>,
    /// verl `pg_clipfrac`, `[1]`.
    pub clipfrac: Tensor<1>,
    /// verl `pg_clipfrac_lower`, `[1]`.
    pub clipfrac_lower: Tensor<1>,
    /// verl `ppo_kl`, `[1]`.
    pub approx_kl: Tensor<1>,
}

/// Runs a token-level policy loss on tensors.
///
/// # Formula
///
/// As [`posttrain_core::policy::token::policy_loss`]:
/// `L = Σ wᵢⱼ·ISᵢⱼ·ℓᵢⱼ` over valid positions, `ℓ` from the core kernel of
/// the variant, `IS` the optional importance weights, `w` the weights of
/// [`PolicyLoss::effective_agg`]`(agg)` under `norm`. Metrics are means over
/// valid tokens with `+1e-8` in the denominator.
///
/// # Gradient
///
/// `∂L/∂log πᵢⱼ = wᵢⱼ·ISᵢⱼ·∂ℓᵢⱼ/∂log πᵢⱼ` (straight-through per token for GSPO).
///
/// # Peers
///
/// verl `get_policy_loss_fn(loss_mode)` for the supported modes (table in the
/// [module docs](self)).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for shapes; [`Error::OutOfRange`] for an invalid
/// variant or normalizer; [`Error::Invalid`] for the variants this backend
/// does not run (`ClipCov`, `KlCov`, `GeometricMean`).
#[allow(clippy::too_many_arguments)]
pub fn policy_loss(
    loss: &PolicyLoss,
    agg: AggMode,
    norm: &GlobalNorm,
    log_prob: Tensor<2>,
    old_log_prob: Tensor<2>,
    advantages: Tensor<2>,
    mask: &Tensor<2, Bool>,
    is_weights: Option<Tensor<2>>,
) -> Result<PolicyLossOutput, Error> {
    loss.validate()?;
    let dims = mask.dims();
    check_shape("log_prob", log_prob.dims(), dims)?;
    check_shape("old_log_prob", old_log_prob.dims(), dims)?;
    check_shape("advantages", advantages.dims(), dims)?;
    if let Some(w) = &is_weights {
        check_shape("rollout_is_weights", w.dims(), dims)?;
    }
    let token: PolicyToken<ElemTensor<2>> = match *loss {
        PolicyLoss::ClipCov { .. }
        | PolicyLoss::KlCov { .. }
        | PolicyLoss::GeometricMean { .. } => {
            return Err(Error::Invalid {
                input: "loss_mode",
                rule: "clip_cov, kl_cov and geo_mean are not implemented on burn tensors",
            })
        }
        PolicyLoss::SequenceRatio {
            eps_low,
            eps_high,
            max_log_ratio,
        } => {
            let [batch, seq] = dims;
            let x = keep(log_prob.clone() - old_log_prob.clone(), mask);
            let n = mask.clone().float().sum_dim(1).clamp_min(1.0);
            let seq_x = (x.sum_dim(1) / n).expand([batch, seq]);
            let mut t = sequence_ratio_surrogate(
                eps_low,
                eps_high,
                max_log_ratio,
                ElemTensor(seq_x),
                ElemTensor(advantages),
            );
            t.kl = ElemTensor(old_log_prob - log_prob);
            t
        }
        _ => loss.token(
            ElemTensor(log_prob),
            ElemTensor(old_log_prob),
            ElemTensor(advantages),
        ),
    };
    let (mut tl, mut tg) = (keep(token.loss.0, mask), keep(token.grad.0, mask));
    if let Some(w) = is_weights {
        tl = keep(tl * w.clone(), mask);
        tg = keep(tg * w, mask);
    }
    let weights = aggregation_weights(loss.effective_agg(agg), norm, mask)?;
    let value = weighted_sum(tl.clone(), mask, &weights);
    let grad = keep(weights * tg, mask);
    let denom = count(mask).add_scalar(MEAN_EPS);
    let frac = |m: Tensor<2, Bool>| count(&m.bool_and(mask.clone())) / denom.clone();
    let (clipfrac, clipfrac_lower) = match loss {
        PolicyLoss::SoftGate { .. } => (denom.zeros_like(), denom.zeros_like()),
        _ => (frac(token.clipped.0), frac(token.clipped_lower.0)),
    };
    let approx_kl = keep(token.kl.0, mask).sum() / denom;
    Ok(PolicyLossOutput {
        loss: value,
        grad,
        per_token: tl,
        clipfrac,
        clipfrac_lower,
        approx_kl,
    })
}
