//! The element-wise algebra every formula is written in.
//!
//! # Why a trait
//!
//! Each loss in posttrain is written **once**, as a function generic over
//! [`Elem`]: a value that supports `+ − × ÷`, `exp`, `ln`, `min`/`max`,
//! comparisons producing a [`Mask`](Elem::Mask) and a [`select`](Elem::select).
//! Plain floats (`f32`, `f64`) implement it here, so the slice drivers of each
//! module run the formula one token at a time; the burn adapter implements it
//! for whole tensors, so the very same function body runs once over a
//! `[batch, seq]` tensor on ndarray, wgpu or libtorch. Reductions (sums over a
//! row, over a group) are the slice drivers' business; they are not part of
//! this trait.
//!
//! The trait is deliberately small (the primitives a backend must provide);
//! everything else — softplus, log-sigmoid, sigmoid, masked selection — is
//! derived once in [`ElemExt`], which has a blanket implementation.
//!
//! # Requirements (for implementers)
//!
//! * **Do** make [`select`](Elem::select) a true selection: the value *not*
//!   selected must never reach the result, even when it is NaN or ±inf. This is
//!   what keeps masked padding from leaking NaN into losses and gradients
//!   (multiplying by a 0/1 mask would turn `0 · inf` into NaN).
//! * **Do** implement `clamp` with IEEE semantics for the bounds (`min` then
//!   `max`), and comparisons that are `false` for NaN operands.
//! * **Do not** broadcast implicitly beyond "same shape" and "scalar constant":
//!   the formulas never rely on it.

use core::fmt::{Debug, Display};

/// Boolean masks produced by comparisons of [`Elem`] values.
///
/// `bool` for scalars; a boolean tensor in the burn adapter.
pub trait MaskElem: Clone {
    /// Element-wise logical and.
    fn and(self, rhs: Self) -> Self;
    /// Element-wise logical or.
    fn or(self, rhs: Self) -> Self;
    /// Element-wise logical not.
    fn not(self) -> Self;
}

impl MaskElem for bool {
    #[inline]
    fn and(self, rhs: Self) -> Self {
        self && rhs
    }
    #[inline]
    fn or(self, rhs: Self) -> Self {
        self || rhs
    }
    #[inline]
    fn not(self) -> Self {
        !self
    }
}

/// The element-wise primitives a backend provides; every formula is written
/// against this trait (see the [module docs](self)).
pub trait Elem: Clone {
    /// The boolean type comparisons return.
    type Mask: MaskElem;

    /// A constant `v` of the same shape (and device) as `self`.
    fn full_like(&self, v: f64) -> Self;
    /// `self + rhs`.
    fn add(self, rhs: Self) -> Self;
    /// `self − rhs`.
    fn sub(self, rhs: Self) -> Self;
    /// `self · rhs`.
    fn mul(self, rhs: Self) -> Self;
    /// `self / rhs`.
    fn div(self, rhs: Self) -> Self;
    /// `−self`.
    fn neg(self) -> Self;
    /// `self + v` for a constant `v`.
    fn add_scalar(self, v: f64) -> Self;
    /// `self · v` for a constant `v`.
    fn mul_scalar(self, v: f64) -> Self;
    /// `eˣ`.
    fn exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// `ln(1 + x)`, accurate near 0.
    fn ln_1p(self) -> Self;
    /// `|x|`.
    fn abs(self) -> Self;
    /// `√x`.
    fn sqrt(self) -> Self;
    /// `xᵖ` for a constant exponent.
    fn powf(self, p: f64) -> Self;
    /// Element-wise minimum (NaN-propagating like `torch.minimum`).
    fn min(self, rhs: Self) -> Self;
    /// Element-wise maximum (NaN-propagating like `torch.maximum`).
    fn max(self, rhs: Self) -> Self;
    /// `min(max(x, lo), hi)`, like `torch.clamp`.
    fn clamp(self, lo: f64, hi: f64) -> Self;
    /// `self > rhs` (false for NaN).
    fn gt(&self, rhs: &Self) -> Self::Mask;
    /// `self ≥ rhs` (false for NaN).
    fn ge(&self, rhs: &Self) -> Self::Mask;
    /// `self > v` for a constant `v`.
    fn gt_scalar(&self, v: f64) -> Self::Mask;
    /// `self ≥ v` for a constant `v`.
    fn ge_scalar(&self, v: f64) -> Self::Mask;
    /// `self < v` for a constant `v`.
    fn lt_scalar(&self, v: f64) -> Self::Mask;
    /// `self ≤ v` for a constant `v`.
    fn le_scalar(&self, v: f64) -> Self::Mask;
    /// `on_true` where `mask`, else `on_false`. The unselected value must never
    /// reach the result (see the requirements in the [module docs](self)).
    fn select(mask: &Self::Mask, on_true: Self, on_false: Self) -> Self;
}

/// Formulas derived from [`Elem`] once, for every backend.
pub trait ElemExt: Elem {
    /// `softplus(x) = ln(1 + eˣ)`, in the stable form `max(x, 0) + ln(1 + e^{−|x|})`.
    fn softplus(self) -> Self {
        let relu = self.clone().max(self.full_like(0.0));
        relu.add(self.abs().neg().exp().ln_1p())
    }
    /// `log σ(x) = −softplus(−x)`, stable for `|x|` up to the float range.
    fn log_sigmoid(self) -> Self {
        self.neg().softplus().neg()
    }
    /// `σ(x) = 1 / (1 + e^{−x})`, evaluated as `exp(log σ(x))` (no overflow).
    fn sigmoid(self) -> Self {
        self.log_sigmoid().exp()
    }
    /// `x` where `mask`, else the constant `fill` (a selection, never a product).
    fn masked_fill_not(self, mask: &Self::Mask, fill: f64) -> Self {
        let f = self.full_like(fill);
        Self::select(mask, self, f)
    }
    /// `x²`.
    fn square(self) -> Self {
        self.clone().mul(self)
    }
    /// `1.0` where `mask`, else `0.0`.
    fn indicator(like: &Self, mask: &Self::Mask) -> Self {
        Self::select(mask, like.full_like(1.0), like.full_like(0.0))
    }
}

impl<E: Elem> ElemExt for E {}

/// The plain float types the core drivers run on: `f32` and `f64`.
///
/// Arithmetic is the `std::ops` operators; transcendental functions and
/// comparisons come from [`Elem`] (`x.exp()`, `x.ln()`, `a.max(b)`), so a
/// driver and the kernels it calls read alike. The few scalar-only helpers
/// (constants, `is_finite`, conversions) are listed here. Sealed: implemented
/// for `f32` and `f64` only.
pub trait Real:
    Elem<Mask = bool>
    + Copy
    + PartialOrd
    + PartialEq
    + Debug
    + Display
    + Default
    + Send
    + Sync
    + 'static
    + core::ops::Add<Output = Self>
    + core::ops::Sub<Output = Self>
    + core::ops::Mul<Output = Self>
    + core::ops::Div<Output = Self>
    + core::ops::Neg<Output = Self>
    + core::ops::AddAssign
    + core::ops::SubAssign
    + core::ops::MulAssign
    + core::ops::DivAssign
    + core::iter::Sum
    + sealed::Sealed
{
    /// Converts an `f64` constant (rounding to nearest for `f32`).
    fn of(v: f64) -> Self;
    /// Widens to `f64` exactly.
    fn to_f64(self) -> f64;
    /// Converts a count.
    fn of_usize(n: usize) -> Self {
        Self::of(n as f64)
    }
    /// `0`.
    fn zero() -> Self {
        Self::of(0.0)
    }
    /// `1`.
    fn one() -> Self {
        Self::of(1.0)
    }
    /// NaN.
    fn nan() -> Self {
        Self::of(f64::NAN)
    }
    /// `+inf`.
    fn infinity() -> Self {
        Self::of(f64::INFINITY)
    }
    /// `−inf`.
    fn neg_infinity() -> Self {
        Self::of(f64::NEG_INFINITY)
    }
    /// Neither NaN nor ±inf.
    fn is_finite(self) -> bool;
    /// NaN.
    fn is_nan(self) -> bool;
    /// `xⁿ` for an integer exponent.
    fn powi(self, n: i32) -> Self;
    /// Hyperbolic tangent.
    fn tanh(self) -> Self;
    /// `eˣ − 1`, accurate near 0.
    fn exp_m1(self) -> Self;
    /// Sign: `1`, `−1`, or `0` for `±0` (and NaN for NaN), like `torch.sign`.
    fn sign(self) -> Self {
        if self.is_nan() {
            self
        } else if self > Self::zero() {
            Self::one()
        } else if self < Self::zero() {
            -Self::one()
        } else {
            Self::zero()
        }
    }
    /// Machine epsilon of the type.
    fn epsilon() -> Self;
    /// Largest finite value of the type.
    fn max_value() -> Self;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Elem for $t {
            type Mask = bool;
            #[inline]
            fn full_like(&self, v: f64) -> Self {
                v as $t
            }
            #[inline]
            fn add(self, rhs: Self) -> Self {
                self + rhs
            }
            #[inline]
            fn sub(self, rhs: Self) -> Self {
                self - rhs
            }
            #[inline]
            fn mul(self, rhs: Self) -> Self {
                self * rhs
            }
            #[inline]
            fn div(self, rhs: Self) -> Self {
                self / rhs
            }
            #[inline]
            fn neg(self) -> Self {
                -self
            }
            #[inline]
            fn add_scalar(self, v: f64) -> Self {
                self + v as $t
            }
            #[inline]
            fn mul_scalar(self, v: f64) -> Self {
                self * v as $t
            }
            #[inline]
            fn exp(self) -> Self {
                num_traits::Float::exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                num_traits::Float::ln(self)
            }
            #[inline]
            fn ln_1p(self) -> Self {
                num_traits::Float::ln_1p(self)
            }
            #[inline]
            fn abs(self) -> Self {
                num_traits::Float::abs(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                num_traits::Float::sqrt(self)
            }
            #[inline]
            fn powf(self, p: f64) -> Self {
                num_traits::Float::powf(self, p as $t)
            }
            #[inline]
            fn min(self, rhs: Self) -> Self {
                if self.is_nan() || rhs.is_nan() {
                    <$t>::NAN
                } else if rhs < self {
                    rhs
                } else {
                    self
                }
            }
            #[inline]
            fn max(self, rhs: Self) -> Self {
                if self.is_nan() || rhs.is_nan() {
                    <$t>::NAN
                } else if rhs > self {
                    rhs
                } else {
                    self
                }
            }
            #[inline]
            fn clamp(self, lo: f64, hi: f64) -> Self {
                Elem::min(Elem::max(self, lo as $t), hi as $t)
            }
            #[inline]
            fn gt(&self, rhs: &Self) -> bool {
                *self > *rhs
            }
            #[inline]
            fn ge(&self, rhs: &Self) -> bool {
                *self >= *rhs
            }
            #[inline]
            fn gt_scalar(&self, v: f64) -> bool {
                *self > v as $t
            }
            #[inline]
            fn ge_scalar(&self, v: f64) -> bool {
                *self >= v as $t
            }
            #[inline]
            fn lt_scalar(&self, v: f64) -> bool {
                *self < v as $t
            }
            #[inline]
            fn le_scalar(&self, v: f64) -> bool {
                *self <= v as $t
            }
            #[inline]
            fn select(mask: &bool, on_true: Self, on_false: Self) -> Self {
                if *mask {
                    on_true
                } else {
                    on_false
                }
            }
        }

        impl Real for $t {
            #[inline]
            fn of(v: f64) -> Self {
                v as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            #[inline]
            fn powi(self, n: i32) -> Self {
                num_traits::Float::powi(self, n)
            }
            #[inline]
            fn tanh(self) -> Self {
                num_traits::Float::tanh(self)
            }
            #[inline]
            fn exp_m1(self) -> Self {
                num_traits::Float::exp_m1(self)
            }
            #[inline]
            fn epsilon() -> Self {
                <$t>::EPSILON
            }
            #[inline]
            fn max_value() -> Self {
                <$t>::MAX
            }
        }
    };
}

impl_real!(f32);
impl_real!(f64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_never_leaks_the_other_branch() {
        assert_eq!(<f64 as Elem>::select(&true, 1.0, f64::NAN), 1.0);
        assert_eq!(<f64 as Elem>::select(&false, f64::INFINITY, 2.0), 2.0);
    }

    #[test]
    fn softplus_and_log_sigmoid_are_stable_at_extremes() {
        assert_eq!(1000.0f64.softplus(), 1000.0);
        assert_eq!((-1000.0f64).softplus(), 0.0);
        assert_eq!(1000.0f64.log_sigmoid(), 0.0);
        assert_eq!((-1000.0f64).log_sigmoid(), -1000.0);
        assert!((0.0f64.log_sigmoid() + core::f64::consts::LN_2).abs() < 1e-15);
        assert!((ElemExt::sigmoid(2.0f64) - 1.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-15);
    }
}
