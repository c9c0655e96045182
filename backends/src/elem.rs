//! [`Elem`] for burn tensors: the core's per-token formulas, run on whole
//! tensors.
//!
//! A float tensor wrapped in [`ElemTensor<D>`] is an [`Elem`] whose masks are
//! [`ElemMask<D>`] (a wrapped `Tensor<D, Bool>`). The wrappers exist only
//! because of Rust's orphan rule: `Elem` lives in `posttrain-core` and
//! `Tensor` in burn, so neither crate's trait can be implemented for the
//! other's type here directly. They are zero-cost (`.0` unwraps).
//!
//! Each primitive maps to one burn op (`exp`, `log`, `log1p`, `max_pair`,
//! `clamp`, `greater`, `mask_where`, …), so a kernel such as
//! [`ppo_clipped_surrogate`](posttrain_core::policy::ppo_clipped_surrogate)
//! becomes a short graph of element-wise tensor ops on whatever device the
//! tensor lives on — and, on an autodiff device, burn can differentiate it.
//!
//! `select(mask, a, b)` is `b.mask_where(mask, a)`: a true selection, so a NaN
//! in the unselected tensor never reaches the result.
//!
//! # Example
//!
//! ```
//! use posttrain_burn::{device, tensor2, to_vec, ElemTensor};
//! use posttrain_core::policy::{ppo_clipped_surrogate, ClipConfig};
//! let dev = device()?;
//! let cfg = ClipConfig { eps_low: 0.2, eps_high: 0.2, dual_clip: None, log_ratio_clamp: None };
//! let lp = ElemTensor(tensor2(&[0.5, 0.0], [1, 2], &dev)?);
//! let old = ElemTensor(tensor2(&[0.0, 0.0], [1, 2], &dev)?);
//! let adv = ElemTensor(tensor2(&[1.0, 1.0], [1, 2], &dev)?);
//! let t = ppo_clipped_surrogate(&cfg, lp, old, adv);
//! let loss = to_vec(t.loss.0);
//! assert!((loss[0] + 1.2).abs() < 1e-6 && (loss[1] + 1.0).abs() < 1e-6);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use burn::tensor::{Bool, Tensor};
use posttrain_core::{Elem, MaskElem};

/// A burn float tensor as an [`Elem`] (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct ElemTensor<const D: usize>(pub Tensor<D>);

/// A burn boolean tensor as a [`MaskElem`], the masks of [`ElemTensor`].
#[derive(Debug, Clone)]
pub struct ElemMask<const D: usize>(pub Tensor<D, Bool>);

impl<const D: usize> From<Tensor<D>> for ElemTensor<D> {
    fn from(t: Tensor<D>) -> Self {
        ElemTensor(t)
    }
}

impl<const D: usize> From<Tensor<D, Bool>> for ElemMask<D> {
    fn from(t: Tensor<D, Bool>) -> Self {
        ElemMask(t)
    }
}

impl<const D: usize> MaskElem for ElemMask<D> {
    fn and(self, rhs: Self) -> Self {
        ElemMask(self.0.bool_and(rhs.0))
    }
    fn or(self, rhs: Self) -> Self {
        ElemMask(self.0.bool_or(rhs.0))
    }
    fn not(self) -> Self {
        ElemMask(self.0.bool_not())
    }
}

impl<const D: usize> Elem for ElemTensor<D> {
    type Mask = ElemMask<D>;

    fn full_like(&self, v: f64) -> Self {
        ElemTensor(crate::util::Filled::filled(&self.0, v))
    }
    fn add(self, rhs: Self) -> Self {
        ElemTensor(self.0 + rhs.0)
    }
    fn sub(self, rhs: Self) -> Self {
        ElemTensor(self.0 - rhs.0)
    }
    fn mul(self, rhs: Self) -> Self {
        ElemTensor(self.0 * rhs.0)
    }
    fn div(self, rhs: Self) -> Self {
        ElemTensor(self.0 / rhs.0)
    }
    fn neg(self) -> Self {
        ElemTensor(self.0.neg())
    }
    fn add_scalar(self, v: f64) -> Self {
        ElemTensor(self.0.add_scalar(v))
    }
    fn mul_scalar(self, v: f64) -> Self {
        ElemTensor(self.0.mul_scalar(v))
    }
    fn exp(self) -> Self {
        ElemTensor(self.0.exp())
    }
    fn ln(self) -> Self {
        ElemTensor(self.0.log())
    }
    fn ln_1p(self) -> Self {
        ElemTensor(self.0.log1p())
    }
    fn abs(self) -> Self {
        ElemTensor(self.0.abs())
    }
    fn sqrt(self) -> Self {
        ElemTensor(self.0.sqrt())
    }
    fn powf(self, p: f64) -> Self {
        ElemTensor(self.0.powf_scalar(p))
    }
    fn min(self, rhs: Self) -> Self {
        ElemTensor(self.0.min_pair(rhs.0))
    }
    fn max(self, rhs: Self) -> Self {
        ElemTensor(self.0.max_pair(rhs.0))
    }
    fn clamp(self, lo: f64, hi: f64) -> Self {
        ElemTensor(self.0.clamp(lo, hi))
    }
    fn gt(&self, rhs: &Self) -> ElemMask<D> {
        ElemMask(self.0.clone().greater(rhs.0.clone()))
    }
    fn ge(&self, rhs: &Self) -> ElemMask<D> {
        ElemMask(self.0.clone().greater_equal(rhs.0.clone()))
    }
    fn gt_scalar(&self, v: f64) -> ElemMask<D> {
        ElemMask(self.0.clone().greater_elem(v))
    }
    fn ge_scalar(&self, v: f64) -> ElemMask<D> {
        ElemMask(self.0.clone().greater_equal_elem(v))
    }
    fn lt_scalar(&self, v: f64) -> ElemMask<D> {
        ElemMask(self.0.clone().lower_elem(v))
    }
    fn le_scalar(&self, v: f64) -> ElemMask<D> {
        ElemMask(self.0.clone().lower_equal_elem(v))
    }
    fn select(mask: &ElemMask<D>, on_true: Self, on_false: Self) -> Self {
        ElemTensor(on_false.0.mask_where(mask.0.clone(), on_true.0))
    }
}
