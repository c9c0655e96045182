//! Distillation: forward/reverse KL and the generalized Jensen–Shannon
//! divergence between teacher and student token distributions, and the
//! teacher-weighted cross entropy of knowledge distillation.
//!
//! # Overview
//!
//! Logits are row-major `[rows, vocab]` matrices (`rows = batch · seq`). Per
//! vocabulary entry `k` of a row, with student and teacher log-probabilities
//! `sₖ = log softmax(z/T)ₖ`, `tₖ = log softmax(z_teacher/T)ₖ`:
//!
//! | β ([`Jsd`]) | divergence | element `jsdₖ` | `∂jsdₖ/∂sₖ` |
//! |---|---|---|---|
//! | `0` | KL(teacher ‖ student) (forward) | `e^{tₖ}(tₖ − sₖ)` | `−e^{tₖ}` |
//! | `1` | KL(student ‖ teacher) (reverse) | `e^{sₖ}(sₖ − tₖ)` | `e^{sₖ}(sₖ − tₖ + 1)` |
//! | `(0, 1)` | generalized JSD, mixture `mₖ = log((1−β)e^{sₖ} + βe^{tₖ})` | `β e^{tₖ}(tₖ − mₖ) + (1−β) e^{sₖ}(sₖ − mₖ)` | `(1−β) e^{sₖ}(sₖ − mₖ)` |
//!
//! The element derivative is chained through the log-softmax
//! ([`log_softmax_vjp_row`]) to give the gradient with respect to the student
//! logits: `∂L/∂zⱼ = (gⱼ − pⱼ Σₖ gₖ)/T`, `gₖ = cₖ ∂jsdₖ/∂sₖ`, `p = softmax(z/T)`.
//! Terms whose probability factor is exactly 0 are 0 (never `0 · ∞`).
//!
//! | function | what | peers |
//! |---|---|---|
//! | [`Jsd::term`] | one element (an [`Elem`] kernel) | TRL `_jsd_divergence`, GKD `generalized_jsd_loss` |
//! | [`Jsd::term_on_support`] | one element of the support-masked variant | TRL `_jsd_divergence(support_mask=…)` |
//! | [`jsd_from_log_probs`] | element-wise divergence of log-probabilities | TRL distillation `_jsd_divergence` |
//! | [`generalized_jsd_elementwise`] | element-wise divergence from logits (`reduction="none"`) | TRL GKD / distillation `generalized_jsd_loss` |
//! | [`generalized_jsd_loss`] | reduced to a scalar ([`Reduction`], `num_items_in_batch`) | TRL GKD / distillation `generalized_jsd_loss`, `compute_loss` |
//! | [`kd_loss`] | `−mean_valid Σₖ p_teacher,k log p_student,k` | OpenRLHF `KDLoss` |
//!
//! # Peers
//!
//! TRL (`GKDTrainer`, `DistillationTrainer`): β = 0 is KL(teacher‖student),
//! β = 1 is KL(student‖teacher), both exact branches (not the limits of the
//! mixture formula); `batchmean` without a row mask divides by the batch size
//! (the first axis), with one by the number of valid rows (clamped ≥ 1);
//! `mean` divides by every element (vocabulary included); `num_items_in_batch`
//! replaces the reduction by `sum / num_items_in_batch`. The trainers' causal
//! shift (logits at `t` score the token at `t + 1`) is the caller's slicing.
//! OpenRLHF `KDLoss`: no label shift, rows with label −100 skipped, terms
//! where the student logit is ±∞ zeroed, mean over valid rows.
//! Where the peers return NaN (an empty batch, `0 · log 0`), posttrain
//! returns 0.
//!
//! # Example
//!
//! ```
//! use posttrain_core::distill::{generalized_jsd_loss, DistillConfig, Reduction};
//! use posttrain_core::Dims;
//! let student = [0.1f64, 1.0, -0.5, 2.0, 0.0, 0.3];
//! let cfg = DistillConfig::new(0.5, 1.0, Reduction::BatchMean, None)?;
//! let mut grad = [0.0; 6];
//! // Teacher = student: zero divergence, zero gradient.
//! let l = generalized_jsd_loss(&cfg, Dims::new(2, 1), 3, &student, &student, None, Some((1.0, &mut grad)))?;
//! assert!(l.abs() < 1e-15 && grad.iter().all(|g| g.abs() < 1e-15));
//! # Ok::<(), posttrain_core::Error>(())
//! ```

use crate::elem::{Elem, Real};
use crate::error::{check_len, check_param, Error};
use crate::logits::{log_softmax_vjp_row, scaled_max_lse, Temperature};
use crate::shape::Dims;

/// The interpolation β of the generalized Jensen–Shannon divergence
/// (validated: `β ∈ [0, 1]`).
///
/// # Formula
///
/// See the table in the [module docs](self): β = 0 is KL(teacher‖student),
/// β = 1 is KL(student‖teacher), otherwise
/// `β KL(teacher‖m) + (1−β) KL(student‖m)` with the mixture
/// `m = (1−β) p_student + β p_teacher`.
///
/// # Peers
///
/// TRL GKD / distillation `beta` (the same convention in both trainers).
///
/// # Errors
///
/// [`Jsd::new`]: [`Error::OutOfRange`] unless `0 ≤ β ≤ 1`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Jsd {
    beta: f64,
}

impl Jsd {
    /// β = 0: KL(teacher ‖ student), the forward KL.
    pub const FORWARD_KL: Jsd = Jsd { beta: 0.0 };
    /// β = 1: KL(student ‖ teacher), the reverse KL.
    pub const REVERSE_KL: Jsd = Jsd { beta: 1.0 };

    /// A validated β.
    pub fn new(beta: f64) -> Result<Self, Error> {
        check_param(
            (0.0..=1.0).contains(&beta),
            "beta",
            beta,
            "must lie in [0, 1]",
        )?;
        Ok(Jsd { beta })
    }

    /// The value β.
    pub fn beta(self) -> f64 {
        self.beta
    }

    /// One element: `(jsdₖ, ∂jsdₖ/∂sₖ)` from the student and teacher
    /// log-probabilities `s`, `t` (see the [module docs](self) for the
    /// formulas). A term whose probability factor is 0 is 0, never `0 · ∞`.
    ///
    /// # Example
    ///
    /// ```
    /// use posttrain_core::distill::Jsd;
    /// let (v, d) = Jsd::new(0.5)?.term(-1.0f64, -1.0);
    /// assert!(v.abs() < 1e-16 && d.abs() < 1e-16);
    /// let (v, d) = Jsd::FORWARD_KL.term(-2.0f64, -1.0);
    /// assert!((v - (-1f64).exp()).abs() < 1e-15 && (d + (-1f64).exp()).abs() < 1e-15);
    /// # Ok::<(), posttrain_core::Error>(())
    /// ```
    pub fn term<E: Elem>(&self, s: E, t: E) -> (E, E) {
        let zero = s.full_like(0.0);
        let ps = s.clone().exp();
        let pt = t.clone().exp();
        if self.beta == 0.0 {
            let on = pt.gt_scalar(0.0);
            let v = pt.clone().mul(t.sub(s));
            (E::select(&on, v, zero), pt.neg())
        } else if self.beta == 1.0 {
            let on = ps.gt_scalar(0.0);
            let diff = s.sub(t);
            let v = ps.clone().mul(diff.clone());
            let d = ps.mul(diff.add_scalar(1.0));
            (E::select(&on, v, zero.clone()), E::select(&on, d, zero))
        } else {
            let m = self.mixture_log_prob(s.clone(), t.clone());
            let on_t = pt.gt_scalar(0.0);
            let on_s = ps.gt_scalar(0.0);
            let kl_t = E::select(&on_t, pt.mul(t.sub(m.clone())), zero.clone());
            let kl_s = E::select(&on_s, ps.mul(s.sub(m)), zero);
            let v = kl_t
                .mul_scalar(self.beta)
                .add(kl_s.clone().mul_scalar(1.0 - self.beta));
            (v, kl_s.mul_scalar(1.0 - self.beta))
        }
    }

    /// `log((1−β)e^s + βe^t)` as a stable two-term log-sum-exp.
    fn mixture_log_prob<E: Elem>(&self, s: E, t: E) -> E {
        let a = s.add_scalar(Elem::ln_1p(-self.beta));
        let b = t.add_scalar(Elem::ln(self.beta));
        let hi = a.clone().max(b.clone());
        let lo = a.min(b);
        hi.clone().add(lo.sub(hi).exp().ln_1p())
    }

    /// One element of the support-masked variant, at a position inside the
    /// support (outside it the value and derivative are 0): the probability
    /// mixture `mix = (1−β)e^s + βe^t` is clamped below at the smallest normal
    /// float before its log, and each KL term that is not finite is replaced
    /// as `nan_to_num` does (NaN → 0, ±∞ → ±max) with a zero derivative.
    ///
    /// # Formula
    ///
    /// β = 0: `e^t (t − s)`; β = 1: `e^s (s − t)`; otherwise
    /// `β e^t (t − m) + (1−β) e^s (s − m)`, `m = ln max(mix, tiny)`.
    ///
    /// # Gradient
    ///
    /// With `∂m/∂s = (1−β)e^s/mix` (0 when clamped):
    /// `β (−e^t ∂m/∂s) + (1−β) e^s (s − m + 1 − ∂m/∂s)`, each KL term's part
    /// kept only where that term is finite.
    ///
    /// # Peers
    ///
    /// TRL distillation `_jsd_divergence(…, support_mask)`.
    pub fn term_on_support<F: Real>(&self, s: F, t: F) -> (F, F) {
        self.term_on_support_elem(s, t, tiny::<F>().to_f64(), F::max_value().to_f64())
    }

    /// [`Jsd::term_on_support`] as an [`Elem`] kernel, for any element type:
    /// `tiny` is the clamp of the mixture (`torch.finfo(dtype).tiny`) and
    /// `max` the largest finite value of the element's float type (what
    /// `nan_to_num` writes for ±∞), both given by the caller because an
    /// [`Elem`] does not know its precision.
    ///
    /// # Formula
    ///
    /// As [`Jsd::term_on_support`]; "finite" is tested as `|v| < ∞` and
    /// "NaN" as `¬(v ≥ v)`, with selections only.
    pub fn term_on_support_elem<E: Elem>(&self, s: E, t: E, tiny: f64, max: f64) -> (E, E) {
        let ps = s.clone().exp();
        let pt = t.clone().exp();
        if self.beta == 0.0 {
            let v = pt.clone().mul(t.sub(s));
            finite_or_elem(v, pt.neg(), max)
        } else if self.beta == 1.0 {
            let diff = s.sub(t);
            let v = ps.clone().mul(diff.clone());
            finite_or_elem(v, ps.mul(diff.add_scalar(1.0)), max)
        } else {
            let beta = self.beta;
            let mix = ps
                .clone()
                .mul_scalar(1.0 - beta)
                .add(pt.clone().mul_scalar(beta));
            let ok = mix.ge_scalar(tiny);
            // Where clamped, `mix` is replaced by `tiny` before the division
            // too, so the unselected branch stays finite.
            let mix_c = E::select(&ok, mix.clone(), mix.full_like(tiny));
            let m = E::select(&ok, mix_c.clone().ln(), mix.full_like(tiny.ln()));
            let dm = E::select(
                &ok,
                ps.clone().mul_scalar(1.0 - beta).div(mix_c),
                mix.full_like(0.0),
            );
            let (kl_t, dkl_t) = finite_or_elem(
                pt.clone().mul(t.sub(m.clone())),
                pt.neg().mul(dm.clone()),
                max,
            );
            let d_s = ps
                .clone()
                .mul(s.clone().sub(m.clone()).add_scalar(1.0))
                .sub(ps.clone().mul(dm));
            let (kl_s, dkl_s) = finite_or_elem(ps.mul(s.sub(m)), d_s, max);
            (
                kl_t.mul_scalar(beta).add(kl_s.mul_scalar(1.0 - beta)),
                dkl_t.mul_scalar(beta).add(dkl_s.mul_scalar(1.0 - beta)),
            )
        }
    }
}

/// `(v, d)` where `v` is finite, else `(nan_to_num(v), 0)` with `±max` for
/// `±∞` (selections only).
fn finite_or_elem<E: Elem>(v: E, d: E, max: f64) -> (E, E) {
    let zero = v.full_like(0.0);
    let finite = v.clone().abs().lt_scalar(f64::INFINITY);
    let not_nan = v.ge(&v);
    let pos = v.gt_scalar(0.0);
    let inf_val = E::select(&pos, v.full_like(max), v.full_like(-max));
    let replaced = E::select(&not_nan, inf_val, zero.clone());
    (E::select(&finite, v, replaced), E::select(&finite, d, zero))
}

/// The smallest positive normal value of `F` (`torch.finfo(dtype).tiny`).
fn tiny<F: Real>() -> F {
    if F::epsilon().to_f64() > 1e-10 {
        F::of(f32::MIN_POSITIVE as f64)
    } else {
        F::of(f64::MIN_POSITIVE)
    }
}

/// How [`generalized_jsd_loss`] reduces the element-wise divergence (TRL's
/// `reduction` names; `FromStr` parses `batchmean`, `sum`, `mean`, `none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Reduction {
    /// Sum over valid elements divided by the number of valid rows (with a row
    /// mask, clamped ≥ 1) or by the batch size (without one).
    BatchMean,
    /// Sum over valid elements.
    Sum,
    /// Mean over valid elements, the vocabulary axis included.
    Mean,
    /// No reduction: use [`generalized_jsd_elementwise`].
    None,
}

impl core::str::FromStr for Reduction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "batchmean" => Ok(Reduction::BatchMean),
            "sum" => Ok(Reduction::Sum),
            "mean" => Ok(Reduction::Mean),
            "none" => Ok(Reduction::None),
            _ => Err(Error::unknown_option(
                "divergence reduction",
                s,
                "batchmean, sum, mean, none",
            )),
        }
    }
}

/// Configuration of the generalized JSD distillation loss.
///
/// # Peers
///
/// TRL `GKDTrainer.generalized_jsd_loss` /
/// `DistillationTrainer.generalized_jsd_loss` (`beta`, `temperature`,
/// `reduction`, `num_items_in_batch`); their `compute_loss` uses
/// `Reduction::BatchMean` with the completion (label ≠ −100) rows as the row
/// mask, GKD with `temperature = 1`.
///
/// # Errors
///
/// [`DistillConfig::new`]: [`Error::OutOfRange`] for β ∉ [0, 1], a
/// temperature that is not finite and `> 0`, or a `num_items_in_batch` that
/// is not a finite count `≥ 1`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DistillConfig {
    /// The divergence (β).
    pub jsd: Jsd,
    /// Softmax temperature applied to both student and teacher logits.
    pub temperature: Temperature,
    /// The reduction to a scalar.
    pub reduction: Reduction,
    /// When set, the loss is `Σ / num_items_in_batch` whatever the reduction
    /// (gradient-accumulation-correct normalization).
    pub num_items_in_batch: Option<f64>,
}

impl DistillConfig {
    /// The divisor `D` of [`generalized_jsd_loss`]'s `L = S / D`, from the
    /// batch size, the vocabulary size, the number of valid rows and whether
    /// a row mask was given.
    ///
    /// # Formula
    ///
    /// `num_items_in_batch` when set, else by [`Reduction`]: `BatchMean` →
    /// `max(n_valid, 1)` with a mask, `max(batch, 1)` without; `Sum` → 1;
    /// `Mean` → `max(n_valid · vocab, 1)`.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for [`Reduction::None`] (not a scalar reduction).
    pub fn denominator(
        &self,
        batch: usize,
        vocab: usize,
        n_valid: usize,
        masked: bool,
    ) -> Result<f64, Error> {
        Ok(match (self.num_items_in_batch, self.reduction) {
            (Some(n), _) => n,
            (None, Reduction::BatchMean) => {
                if masked {
                    n_valid.max(1) as f64
                } else {
                    batch.max(1) as f64
                }
            }
            (None, Reduction::Sum) => 1.0,
            (None, Reduction::Mean) => (n_valid * vocab).max(1) as f64,
            (None, Reduction::None) => {
                return Err(Error::Invalid {
                    input: "reduction",
                    rule: "`none` is not a scalar reduction; use generalized_jsd_elementwise",
                })
            }
        })
    }

    /// A validated configuration.
    pub fn new(
        beta: f64,
        temperature: f64,
        reduction: Reduction,
        num_items_in_batch: Option<f64>,
    ) -> Result<Self, Error> {
        if let Some(n) = num_items_in_batch {
            // A count of items: below 1 (e.g. a subnormal) `Σ / n` would
            // overflow for ordinary divergences.
            check_param(
                n.is_finite() && n >= 1.0,
                "num_items_in_batch",
                n,
                "must be a finite count ≥ 1",
            )?;
        }
        Ok(DistillConfig {
            jsd: Jsd::new(beta)?,
            temperature: Temperature::new(temperature)?,
            reduction,
            num_items_in_batch,
        })
    }
}

fn check_logits<F: Real>(
    student: &[F],
    teacher: &[F],
    rows: usize,
    vocab: usize,
) -> Result<(), Error> {
    check_len("student_logits", student.len(), rows * vocab)?;
    check_len("teacher_logits", teacher.len(), rows * vocab)?;
    if vocab == 0 && rows > 0 {
        return Err(Error::Empty {
            input: "logits (vocabulary)",
        });
    }
    Ok(())
}

/// One row: writes the element values into `out` (if given), turns `grad`
/// (pre-filled with the element cotangents) into `∂L/∂z_student`, and returns
/// the row's sum.
fn jsd_row<F: Real>(
    jsd: &Jsd,
    t: F,
    zs: &[F],
    zt: &[F],
    mut out: Option<&mut [F]>,
    grad: Option<&mut [F]>,
) -> F {
    let (_, lse_s) = scaled_max_lse(zs, t);
    let (_, lse_t) = scaled_max_lse(zt, t);
    let mut sum = F::zero();
    let mut grad = grad;
    for k in 0..zs.len() {
        let s = zs[k] / t - lse_s;
        let tk = zt[k] / t - lse_t;
        let (v, d) = jsd.term(s, tk);
        sum += v;
        if let Some(o) = out.as_mut() {
            o[k] = v;
        }
        if let Some(g) = grad.as_mut() {
            g[k] = if g[k] == F::zero() {
                F::zero()
            } else {
                g[k] * d
            };
        }
    }
    if let Some(g) = grad {
        log_softmax_vjp_row(zs, lse_s, t, g);
    }
    sum
}

/// The element-wise divergence from logits: `out[r, k] = jsd(s[r, k], t[r, k])`
/// with `s = log softmax(z_student/T)`, `t = log softmax(z_teacher/T)`.
///
/// Rows where `valid` is false get 0 values and 0 gradients (their logits
/// are never read). `vjp = Some((cot, grad))` (both `rows · vocab`) writes
/// the VJP with respect to the student logits.
///
/// # Formula
///
/// See the [module docs](self).
///
/// # Gradient
///
/// `grad[r, j] = (g[r, j] − p[r, j] Σₖ g[r, k]) / T`,
/// `g[r, k] = cot[r, k] · ∂jsd/∂s[r, k]`.
///
/// # Peers
///
/// TRL `generalized_jsd_loss(…, reduction="none")` (which returns only the
/// valid rows when labels are given: select them from `out`).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths; [`Error::Empty`] for `vocab = 0`.
#[allow(clippy::too_many_arguments)]
pub fn generalized_jsd_elementwise<F: Real>(
    jsd: &Jsd,
    temperature: Temperature,
    rows: usize,
    vocab: usize,
    student_logits: &[F],
    teacher_logits: &[F],
    valid: Option<&[bool]>,
    out: &mut [F],
    vjp: Option<(&[F], &mut [F])>,
) -> Result<(), Error> {
    check_logits(student_logits, teacher_logits, rows, vocab)?;
    if let Some(v) = valid {
        check_len("valid", v.len(), rows)?;
    }
    check_len("out", out.len(), rows * vocab)?;
    let mut vjp = vjp;
    if let Some((c, g)) = vjp.as_mut() {
        check_len("cotangent", c.len(), rows * vocab)?;
        check_len("grad", g.len(), rows * vocab)?;
    }
    let t = F::of(temperature.get());
    for r in 0..rows {
        let span = r * vocab..(r + 1) * vocab;
        let o = &mut out[span.clone()];
        let is_valid = valid.is_none_or(|v| v[r]);
        if !is_valid {
            o.iter_mut().for_each(|x| *x = F::zero());
            if let Some((_, g)) = vjp.as_mut() {
                g[span].iter_mut().for_each(|x| *x = F::zero());
            }
            continue;
        }
        let g = match vjp.as_mut() {
            Some((c, g)) => {
                let gr = &mut g[span.clone()];
                gr.copy_from_slice(&c[span.clone()]);
                Some(gr)
            }
            None => None,
        };
        jsd_row(
            jsd,
            t,
            &student_logits[span.clone()],
            &teacher_logits[span],
            Some(o),
            g,
        );
    }
    Ok(())
}

/// The generalized JSD distillation loss from logits, reduced to a scalar.
///
/// `student_logits`, `teacher_logits` are `[batch, seq, vocab]`
/// (`dims = [batch, seq]`); `valid` (one flag per row, e.g. `label ≠ −100`)
/// selects the rows that count; `vjp = Some((c, grad))` writes
/// `c · ∂L/∂z_student` into `grad`.
///
/// # Formula
///
/// `S = Σ_valid rows Σₖ jsd(s, t)`, then `L = S / D` with `D` =
/// `num_items_in_batch` when set, else by [`Reduction`]: `BatchMean` →
/// `max(#valid rows, 1)` with a mask, `max(batch, 1)` without; `Sum` → 1;
/// `Mean` → `#valid rows · vocab` (an empty selection gives 0, where TRL gives
/// NaN).
///
/// # Gradient
///
/// Every valid element has cotangent `c / D`, chained as in
/// [`generalized_jsd_elementwise`]; invalid rows get 0.
///
/// # Peers
///
/// TRL `GKDTrainer.generalized_jsd_loss`, `DistillationTrainer.generalized_jsd_loss`
/// and `_reduce_divergence_loss`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths; [`Error::Invalid`] for
/// `Reduction::None` (not a scalar: use [`generalized_jsd_elementwise`]).
pub fn generalized_jsd_loss<F: Real>(
    cfg: &DistillConfig,
    dims: Dims,
    vocab: usize,
    student_logits: &[F],
    teacher_logits: &[F],
    valid: Option<&[bool]>,
    vjp: Option<(F, &mut [F])>,
) -> Result<F, Error> {
    let rows = dims.len();
    check_logits(student_logits, teacher_logits, rows, vocab)?;
    if let Some(v) = valid {
        check_len("valid", v.len(), rows)?;
    }
    let mut vjp = vjp;
    if let Some((_, g)) = vjp.as_mut() {
        check_len("grad", g.len(), rows * vocab)?;
    }
    let n_valid = valid.map_or(rows, |v| v.iter().filter(|&&b| b).count());
    let denom = cfg.denominator(dims.batch, vocab, n_valid, valid.is_some())?;
    let d = F::of(denom);
    let t = F::of(cfg.temperature.get());
    let mut sum = F::zero();
    for r in 0..rows {
        let span = r * vocab..(r + 1) * vocab;
        let is_valid = valid.is_none_or(|v| v[r]);
        if !is_valid {
            if let Some((_, g)) = vjp.as_mut() {
                g[span].iter_mut().for_each(|x| *x = F::zero());
            }
            continue;
        }
        let g = match vjp.as_mut() {
            Some((c, g)) => {
                let gr = &mut g[span.clone()];
                let w = *c / d;
                gr.iter_mut().for_each(|x| *x = w);
                Some(gr)
            }
            None => None,
        };
        sum += jsd_row(
            &cfg.jsd,
            t,
            &student_logits[span.clone()],
            &teacher_logits[span],
            None,
            g,
        );
    }
    Ok(sum / d)
}

/// The element-wise divergence of log-probabilities (no softmax): `out[i] =
/// jsd(s[i], t[i])`, optionally restricted to a support mask.
///
/// Without `support`, every element uses [`Jsd::term`]; with it, positions
/// outside the support are 0 (value and gradient, their inputs never read)
/// and positions inside use [`Jsd::term_on_support`].
/// `vjp = Some((cot, grad))` writes `cot ⊙ ∂jsd/∂s`.
///
/// # Formula
///
/// See the [module docs](self) and [`Jsd::term_on_support`].
///
/// # Gradient
///
/// Element-wise: `grad[i] = cot[i] · ∂jsd[i]/∂s[i]`.
///
/// # Peers
///
/// TRL distillation `_jsd_divergence(student_log_probs, teacher_log_probs,
/// beta, support_mask)`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths.
///
/// # Example
///
/// ```
/// use posttrain_core::distill::{jsd_from_log_probs, Jsd};
/// let s = [-0.1f64, -2.4];
/// let mut out = [0.0; 2];
/// jsd_from_log_probs(&Jsd::REVERSE_KL, &s, &s, Some(&[true, false]), &mut out, None)?;
/// assert_eq!(out, [0.0, 0.0]);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn jsd_from_log_probs<F: Real>(
    jsd: &Jsd,
    student_log_probs: &[F],
    teacher_log_probs: &[F],
    support: Option<&[bool]>,
    out: &mut [F],
    vjp: Option<(&[F], &mut [F])>,
) -> Result<(), Error> {
    let n = student_log_probs.len();
    check_len("teacher_log_probs", teacher_log_probs.len(), n)?;
    if let Some(m) = support {
        check_len("support_mask", m.len(), n)?;
    }
    check_len("out", out.len(), n)?;
    let mut vjp = vjp;
    if let Some((c, g)) = vjp.as_mut() {
        check_len("cotangent", c.len(), n)?;
        check_len("grad", g.len(), n)?;
    }
    for i in 0..n {
        let (s, t) = (student_log_probs[i], teacher_log_probs[i]);
        let (v, d) = match support {
            Some(m) if !m[i] => (F::zero(), F::zero()),
            Some(_) => jsd.term_on_support(s, t),
            None => jsd.term(s, t),
        };
        out[i] = v;
        if let Some((c, g)) = vjp.as_mut() {
            g[i] = if c[i] == F::zero() {
                F::zero()
            } else {
                c[i] * d
            };
        }
    }
    Ok(())
}

/// Knowledge-distillation cross entropy: the teacher-weighted negative
/// log-likelihood of the student, averaged over valid rows.
///
/// `student_logits`, `teacher_logits` are `[rows, vocab]`; `valid` has one
/// flag per row (OpenRLHF: `label ≠ −100`, no shift).
/// `vjp = Some((c, grad))` writes `c · ∂L/∂z_student`.
///
/// # Formula
///
/// `L = −(1/N) Σ_valid rows Σ_{k: z_k ≠ ±∞} p_teacher,k · log softmax(z)ₖ`,
/// `N` = number of valid rows (an empty selection gives 0; OpenRLHF gives NaN).
///
/// # Gradient
///
/// `∂L/∂zⱼ = −(1/N) (p_teacher,j 1[zⱼ ≠ ±∞] − p_student,j Σ_{k: zₖ ≠ ±∞} p_teacher,k)`
/// on valid rows, 0 elsewhere.
///
/// # Peers
///
/// OpenRLHF `KDLoss` (legacy `models/loss.py`).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths; [`Error::Empty`] for `vocab = 0`.
///
/// # Example
///
/// ```
/// use posttrain_core::distill::kd_loss;
/// // A uniform teacher over 2 tokens: the loss is the cross entropy ln 2 for equal student logits.
/// let l = kd_loss(1, 2, &[0.3f64, 0.3], &[0.0, 0.0], &[true], None)?;
/// assert!((l - 2f64.ln()).abs() < 1e-15);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn kd_loss<F: Real>(
    rows: usize,
    vocab: usize,
    student_logits: &[F],
    teacher_logits: &[F],
    valid: &[bool],
    vjp: Option<(F, &mut [F])>,
) -> Result<F, Error> {
    check_logits(student_logits, teacher_logits, rows, vocab)?;
    check_len("valid", valid.len(), rows)?;
    let mut vjp = vjp;
    if let Some((_, g)) = vjp.as_mut() {
        check_len("grad", g.len(), rows * vocab)?;
    }
    let n = valid.iter().filter(|&&b| b).count();
    let nf = F::of_usize(n.max(1));
    let is_inf = |z: F| z == F::infinity() || z == F::neg_infinity();
    let mut total = F::zero();
    for (r, &is_valid) in valid.iter().enumerate() {
        let span = r * vocab..(r + 1) * vocab;
        if !is_valid {
            if let Some((_, g)) = vjp.as_mut() {
                g[span].iter_mut().for_each(|x| *x = F::zero());
            }
            continue;
        }
        let zs = &student_logits[span.clone()];
        let zt = &teacher_logits[span.clone()];
        let (_, lse_s) = scaled_max_lse(zs, F::one());
        let (_, lse_t) = scaled_max_lse(zt, F::one());
        let mut x = F::zero();
        for (&z, &zk_t) in zs.iter().zip(zt) {
            if is_inf(z) {
                continue;
            }
            let pt = (zk_t - lse_t).exp();
            if pt != F::zero() {
                x += pt * (z - lse_s);
            }
        }
        total += x;
        if let Some((c, g)) = vjp.as_mut() {
            let w = -*c / nf;
            let gr = &mut g[span];
            for ((gk, &z), &zk_t) in gr.iter_mut().zip(zs).zip(zt) {
                *gk = if is_inf(z) {
                    F::zero()
                } else {
                    w * (zk_t - lse_t).exp()
                };
            }
            log_softmax_vjp_row(zs, lse_s, F::one(), gr);
        }
    }
    Ok(if n == 0 { F::zero() } else { -total / nf })
}
