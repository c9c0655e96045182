//! Distillation on `[batch, seq, vocab]` tensors: the generalized
//! Jensen–Shannon divergence (forward / reverse KL at β = 0 / 1) between
//! teacher and student token distributions, and OpenRLHF's KD cross entropy,
//! with the VJP with respect to the student logits.
//!
//! The element formulas are the core's [`Elem`](posttrain_core::Elem)
//! kernels: [`Jsd::term`] (the mixture `log((1−β)e^s + βe^t)` as a stable
//! two-term log-sum-exp) and [`Jsd::term_on_support_elem`], run on whole
//! tensors of log-probabilities; the log-softmax of each row is the
//! max-shifted reduction of [`crate::logits`], and every gradient is chained
//! through the core's [`log_softmax_vjp_term`](posttrain_core::logits::log_softmax_vjp_term).
//!
//! | function | what | core counterpart | peers |
//! |---|---|---|---|
//! | [`jsd_from_log_probs`] | element-wise divergence of log-probabilities | [`posttrain_core::distill::jsd_from_log_probs`] | TRL distillation `_jsd_divergence` |
//! | [`generalized_jsd_elementwise`] | element-wise divergence from logits | [`posttrain_core::distill::generalized_jsd_elementwise`] | TRL `generalized_jsd_loss(reduction="none")` |
//! | [`generalized_jsd_loss`] | reduced to a scalar | [`posttrain_core::distill::generalized_jsd_loss`] | TRL GKD / distillation `generalized_jsd_loss`, `compute_loss` |
//! | [`kd_loss`] | teacher-weighted student NLL | [`posttrain_core::distill::kd_loss`] | OpenRLHF `KDLoss` |
//!
//! Invalid rows (e.g. label −100) are selected away: their values and
//! gradients are 0 and NaN logits there never leak.
//!
//! # Example
//!
//! ```
//! use posttrain_burn::{device, distill::generalized_jsd_loss, tensor3, to_vec};
//! use posttrain_core::distill::{DistillConfig, Reduction};
//! let dev = device()?;
//! let z = tensor3(&[0.1, 1.0, -0.5, 2.0, 0.0, 0.3], [2, 1, 3], &dev)?;
//! let cfg = DistillConfig::new(0.5, 1.0, Reduction::BatchMean, None)?;
//! // Teacher = student: zero divergence, zero gradient.
//! let (l, g) = generalized_jsd_loss(&cfg, z.clone(), z, None, Some(1.0))?;
//! assert!(to_vec(l)[0].abs() < 1e-6);
//! assert!(to_vec(g.unwrap()).iter().all(|g| g.abs() < 1e-6));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::util::Filled;
use burn::tensor::{Bool, DType, Tensor};
use posttrain_core::distill::{DistillConfig, Jsd};
use posttrain_core::logits::Temperature;
use posttrain_core::Error;

use crate::elem::ElemTensor;
use crate::logits::{log_softmax, log_softmax_t, log_softmax_vjp};
use crate::util::{check_shape, keep, to_vec};

fn check_pair(student: &Tensor<3>, teacher: &Tensor<3>) -> Result<(), Error> {
    check_shape("teacher_logits", teacher.dims(), student.dims())?;
    let [b, s, v] = student.dims();
    if v == 0 && b * s > 0 {
        return Err(Error::Empty {
            input: "logits (vocabulary)",
        });
    }
    Ok(())
}

fn check_valid(valid: Option<&Tensor<2, Bool>>, student: &Tensor<3>) -> Result<(), Error> {
    if let Some(m) = valid {
        let [b, s, _] = student.dims();
        check_shape("valid", m.dims(), [b, s])?;
    }
    Ok(())
}

/// A `[b, s]` row mask over the vocabulary axis.
fn rows3(m: &Tensor<2, Bool>, v: usize) -> Tensor<3, Bool> {
    let [b, s] = m.dims();
    m.clone().unsqueeze_dim::<3>(2).expand([b, s, v])
}

/// `cot · d`, 0 where the cotangent is 0 (the core's `g == 0 → 0`).
fn chain(cot: Tensor<3>, d: Tensor<3>) -> Tensor<3> {
    let nz = cot.clone().not_equal_elem(0.0);
    keep(cot * d, &nz)
}

/// `(values, ∂values/∂s)` of [`Jsd::term`] on the log-softmaxes of the
/// student and teacher logits, and the student log-probabilities.
fn jsd_terms(
    jsd: &Jsd,
    t: f64,
    student: Tensor<3>,
    teacher: Tensor<3>,
) -> (Tensor<3>, Tensor<3>, Tensor<3>) {
    let s = log_softmax_t(student, t);
    let tt = log_softmax_t(teacher, t);
    let (v, d) = jsd.term(ElemTensor(s.clone()), ElemTensor(tt));
    (v.0, d.0, s)
}

/// The element-wise divergence from logits, and with a cotangent
/// `[b, s, v]` its VJP with respect to the student logits.
///
/// # Formula
///
/// `out[r, k] = jsd(s[r, k], t[r, k])` ([`Jsd::term`]) with
/// `s = log softmax(z_student/T)`, `t = log softmax(z_teacher/T)`; rows
/// where `valid` is false are 0.
///
/// # Gradient
///
/// `(gⱼ − pⱼ Σₖ gₖ)/T` with `gₖ = cotₖ · ∂jsdₖ/∂sₖ` (0 where `cotₖ = 0`),
/// 0 on invalid rows.
///
/// # Peers
///
/// TRL `generalized_jsd_loss(…, reduction="none")`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for mismatched shapes; [`Error::Empty`] for
/// `vocab = 0`.
pub fn generalized_jsd_elementwise(
    jsd: &Jsd,
    temperature: Temperature,
    student_logits: Tensor<3>,
    teacher_logits: Tensor<3>,
    valid: Option<&Tensor<2, Bool>>,
    cotangent: Option<Tensor<3>>,
) -> Result<(Tensor<3>, Option<Tensor<3>>), Error> {
    check_pair(&student_logits, &teacher_logits)?;
    check_valid(valid, &student_logits)?;
    if let Some(c) = &cotangent {
        check_shape("cotangent", c.dims(), student_logits.dims())?;
    }
    let v = student_logits.dims()[2];
    let t = temperature.get();
    let (val, d, s) = jsd_terms(jsd, t, student_logits, teacher_logits);
    let grad = cotangent.map(|c| log_softmax_vjp(s, chain(c, d), t));
    Ok(match valid {
        Some(m) => {
            let m3 = rows3(m, v);
            (keep(val, &m3), grad.map(|g| keep(g, &m3)))
        }
        None => (val, grad),
    })
}

/// The generalized JSD distillation loss, reduced to a scalar (`[1]`), and
/// with a scalar cotangent its VJP with respect to the student logits.
///
/// # Formula
///
/// `L = Σ_valid rows Σₖ jsd(s, t) / D`, `D` =
/// [`DistillConfig::denominator`] (from the number of valid rows, which is
/// read back from the mask: row metadata).
///
/// # Gradient
///
/// Every valid element has cotangent `c / D`, chained as in
/// [`generalized_jsd_elementwise`]; invalid rows get 0.
///
/// # Peers
///
/// TRL `GKDTrainer.generalized_jsd_loss`,
/// `DistillationTrainer.generalized_jsd_loss` / `compute_loss`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for mismatched shapes; [`Error::Invalid`] for
/// `Reduction::None` (use [`generalized_jsd_elementwise`]).
pub fn generalized_jsd_loss(
    cfg: &DistillConfig,
    student_logits: Tensor<3>,
    teacher_logits: Tensor<3>,
    valid: Option<&Tensor<2, Bool>>,
    cotangent: Option<f64>,
) -> Result<(Tensor<1>, Option<Tensor<3>>), Error> {
    check_pair(&student_logits, &teacher_logits)?;
    check_valid(valid, &student_logits)?;
    let [b, s, v] = student_logits.dims();
    let n_valid = match valid {
        Some(m) => to_vec(m.clone().float().sum())[0] as usize,
        None => b * s,
    };
    let denom = cfg.denominator(b, v, n_valid, valid.is_some())?;
    let t = cfg.temperature.get();
    let (val, d, lp) = jsd_terms(&cfg.jsd, t, student_logits, teacher_logits);
    let m3 = valid.map(|m| rows3(m, v));
    let only_valid = |x: Tensor<3>| match &m3 {
        Some(m) => keep(x, m),
        None => x,
    };
    let loss = only_valid(val).sum().div_scalar(denom);
    let grad = cotangent.map(|c| {
        let cot = d.filled(c / denom);
        only_valid(log_softmax_vjp(lp, chain(cot, d), t))
    });
    Ok((loss, grad))
}

/// The element-wise divergence of log-probabilities (no softmax),
/// optionally restricted to a support mask, and with a cotangent its VJP.
///
/// # Formula
///
/// Without `support`: [`Jsd::term`]; with it, positions outside the support
/// are 0 and positions inside use [`Jsd::term_on_support_elem`] with the
/// tensor's float type's `tiny` and `max`, as
/// [`posttrain_core::distill::jsd_from_log_probs`].
///
/// # Gradient
///
/// Element-wise `cot · ∂jsd/∂s` (0 where `cot = 0` or outside the support).
///
/// # Peers
///
/// TRL distillation `_jsd_divergence(student_log_probs, teacher_log_probs,
/// beta, support_mask)`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for mismatched shapes.
pub fn jsd_from_log_probs<const D: usize>(
    jsd: &Jsd,
    student_log_probs: Tensor<D>,
    teacher_log_probs: Tensor<D>,
    support: Option<&Tensor<D, Bool>>,
    cotangent: Option<Tensor<D>>,
) -> Result<(Tensor<D>, Option<Tensor<D>>), Error> {
    let dims = student_log_probs.dims();
    check_shape("teacher_log_probs", teacher_log_probs.dims(), dims)?;
    if let Some(m) = support {
        check_shape("support_mask", m.dims(), dims)?;
    }
    if let Some(c) = &cotangent {
        check_shape("cotangent", c.dims(), dims)?;
    }
    let (s, t) = (ElemTensor(student_log_probs), ElemTensor(teacher_log_probs));
    let (v, d) = match support {
        None => jsd.term(s, t),
        Some(_) => {
            let (tiny, max) = match s.0.dtype() {
                DType::F64 => (f64::MIN_POSITIVE, f64::MAX),
                _ => (f32::MIN_POSITIVE as f64, f32::MAX as f64),
            };
            jsd.term_on_support_elem(s, t, tiny, max)
        }
    };
    let (v, d) = (v.0, d.0);
    let grad = cotangent.map(|c| {
        let nz = c.clone().not_equal_elem(0.0);
        keep(c * d, &nz)
    });
    Ok(match support {
        Some(m) => (keep(v, m), grad.map(|g| keep(g, m))),
        None => (v, grad),
    })
}

/// Knowledge-distillation cross entropy averaged over valid rows (`[1]`),
/// and with a scalar cotangent its VJP with respect to the student logits.
///
/// # Formula
///
/// `L = −(1/N) Σ_valid rows Σ_{k: zₖ ≠ ±∞, p_t,k ≠ 0} p_teacher,k ·
/// log softmax(z)ₖ`, `N` = valid rows (0 when `N = 0`), as
/// [`posttrain_core::distill::kd_loss`].
///
/// # Gradient
///
/// `∂L/∂zⱼ = −(c/N) (p_teacher,j 1[zⱼ ≠ ±∞] − p_student,j Σ_{k: zₖ ≠ ±∞}
/// p_teacher,k)` on valid rows, 0 elsewhere.
///
/// # Peers
///
/// OpenRLHF `KDLoss`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for mismatched shapes; [`Error::Empty`] for
/// `vocab = 0`.
pub fn kd_loss(
    student_logits: Tensor<3>,
    teacher_logits: Tensor<3>,
    valid: &Tensor<2, Bool>,
    cotangent: Option<f64>,
) -> Result<(Tensor<1>, Option<Tensor<3>>), Error> {
    check_pair(&student_logits, &teacher_logits)?;
    check_valid(Some(valid), &student_logits)?;
    let v = student_logits.dims()[2];
    let finite = student_logits.clone().is_inf().bool_not();
    let lp = log_softmax(student_logits);
    let pt = log_softmax(teacher_logits).exp();
    let live = finite.clone().bool_and(pt.clone().not_equal_elem(0.0));
    let m3 = rows3(valid, v);
    let total = keep(keep(pt.clone() * lp.clone(), &live), &m3).sum();
    let n = valid.clone().float().sum();
    let nf = n.clone().clamp_min(1.0);
    let loss = keep(total.neg() / nf.clone(), &n.greater_elem(0.0));
    let grad = cotangent.map(|c| {
        let w = nf
            .recip()
            .mul_scalar(-c)
            .reshape([1, 1, 1])
            .expand(pt.dims());
        let g = keep(w * pt, &finite);
        keep(log_softmax_vjp(lp, g, 1.0), &m3)
    });
    Ok((loss, grad))
}
