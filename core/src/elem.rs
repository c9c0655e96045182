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
    #[inline(always)]
    fn and(self, rhs: Self) -> Self {
        // `&`, not `&&`: no branch, so loops over kernels vectorise.
        self & rhs
    }
    #[inline(always)]
    fn or(self, rhs: Self) -> Self {
        self | rhs
    }
    #[inline(always)]
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
    /// `min(self, v)` for a constant `v` that is not NaN: NaN-propagating
    /// like [`min`](Elem::min) (a NaN `self` gives NaN). The default is
    /// [`min`](Elem::min) against a filled `v`; an element type may do it in
    /// one selection, since only `self` can be NaN.
    #[inline(always)]
    fn min_scalar(self, v: f64) -> Self {
        let c = self.full_like(v);
        self.min(c)
    }
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
    #[inline(always)]
    fn softplus(self) -> Self {
        let relu = self.clone().max(self.full_like(0.0));
        relu.add(self.abs().neg().exp().ln_1p())
    }
    /// `log σ(x) = −softplus(−x)`, stable for `|x|` up to the float range.
    #[inline(always)]
    fn log_sigmoid(self) -> Self {
        self.neg().softplus().neg()
    }
    /// `σ(x) = 1 / (1 + e^{−x})`, evaluated as `exp(log σ(x))` (no overflow).
    #[inline(always)]
    fn sigmoid(self) -> Self {
        self.log_sigmoid().exp()
    }
    /// `x` where `mask`, else the constant `fill` (a selection, never a product).
    #[inline(always)]
    fn masked_fill_not(self, mask: &Self::Mask, fill: f64) -> Self {
        let f = self.full_like(fill);
        Self::select(mask, self, f)
    }
    /// `x²`.
    #[inline(always)]
    fn square(self) -> Self {
        self.clone().mul(self)
    }
    /// `1.0` where `mask`, else `0.0`.
    #[inline(always)]
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
    /// `eˣ` written without calls or data-dependent branches, so that a loop
    /// applying it to consecutive elements vectorises (the [`fused`](crate::fused)
    /// kernels rely on it).
    ///
    /// # Formula
    ///
    /// `f32`: `eˣ = 2ⁿ·eʳ` with `n = round(x / ln 2)`, `r = x − n·ln 2`
    /// (Cody–Waite, two-part `ln 2`), `eʳ` by Cephes' degree-7 polynomial,
    /// `2ⁿ` built from the exponent bits in two factors so subnormal results
    /// come out gradually. Measured against `libm::expf` on every `f32` in
    /// `[−104, 89]` with step 2⁻¹² (`fused` tests): within 2 ulp (the
    /// subnormal range within 1e-44 absolute). `x > 88.72…` gives `+inf`,
    /// `x < −103.97…` gives `0`, NaN gives NaN — as `expf`.
    ///
    /// `f64`: `libm`'s `exp` (calls; the `f64` kernels are not vectorised).
    fn exp_branch_free(self) -> Self;
    /// [`exp_branch_free`](Real::exp_branch_free) with less work per element,
    /// for the [`fused`](crate::fused) kernels: results below 2⁻¹²⁶
    /// (`x < −87.3…`) are flushed to 0 instead of coming out subnormal (which
    /// saves the two-factor scaling and the underflow selection), and the
    /// polynomial is evaluated in Estrin's form (the same coefficients, a
    /// shorter dependency chain). Within 2 ulp of `libm::expf` wherever the
    /// result is normal (tested on every `f32` step 2⁻¹² in `[−87, 88]`). A
    /// NaN gives NaN, `−∞` gives 0, `x > 88` gives `+inf` (there the true
    /// value exceeds 1.6·10³⁸).
    ///
    /// `f64`: `libm`'s `exp`.
    fn exp_flush_subnormal(self) -> Self;
    /// `dst.copy_from_slice(src)` with **non-temporal** stores where the
    /// target has them: on x86-64, `movntps`/`movntpd` for every whole
    /// 16 bytes when `dst` starts 16-byte aligned (a plain copy otherwise, and
    /// for the last few elements).
    ///
    /// A non-temporal store writes a cache line to memory without first
    /// reading it in (the read-for-ownership a plain store pays) and without
    /// evicting anything: for a result written once and not read soon — the
    /// [`fused`](crate::fused) logits backward writes a gradient of hundreds
    /// of MiB — it saves a third of the memory traffic. The stores are weakly
    /// ordered: the writer must issue [`stream_fence`](Real::stream_fence)
    /// before another thread reads `dst` (`std::thread::scope`'s join alone
    /// does not promise it).
    ///
    /// # Panics
    ///
    /// If the lengths differ (as `copy_from_slice`).
    ///
    /// # Example
    ///
    /// ```
    /// use posttrain_core::Real;
    /// let src: Vec<f32> = (0..100).map(|i| i as f32).collect();
    /// let mut dst = vec![0.0f32; 100];
    /// f32::copy_streaming(&src, &mut dst);
    /// f32::stream_fence(); // before another thread reads `dst`
    /// assert_eq!(dst, src);
    /// ```
    fn copy_streaming(src: &[Self], dst: &mut [Self]);
    /// Orders every earlier [`copy_streaming`](Real::copy_streaming) store
    /// before every later store (x86-64 `sfence`; nothing elsewhere, where
    /// `copy_streaming` is a plain copy).
    fn stream_fence() {
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        // SAFETY: `sfence` (SSE) exists on every x86-64 CPU and touches no memory.
        unsafe {
            core::arch::x86_64::_mm_sfence()
        };
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

macro_rules! impl_real {
    ($t:ty, $exp:ident, $flush:ident, $stream:ident, $load:ident) => {
        impl Elem for $t {
            type Mask = bool;
            #[inline(always)]
            fn full_like(&self, v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn add(self, rhs: Self) -> Self {
                self + rhs
            }
            #[inline(always)]
            fn sub(self, rhs: Self) -> Self {
                self - rhs
            }
            #[inline(always)]
            fn mul(self, rhs: Self) -> Self {
                self * rhs
            }
            #[inline(always)]
            fn div(self, rhs: Self) -> Self {
                self / rhs
            }
            #[inline(always)]
            fn neg(self) -> Self {
                -self
            }
            #[inline(always)]
            fn add_scalar(self, v: f64) -> Self {
                self + v as $t
            }
            #[inline(always)]
            fn mul_scalar(self, v: f64) -> Self {
                self * v as $t
            }
            #[inline(always)]
            fn exp(self) -> Self {
                num_traits::Float::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                num_traits::Float::ln(self)
            }
            #[inline(always)]
            fn ln_1p(self) -> Self {
                num_traits::Float::ln_1p(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                num_traits::Float::abs(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                num_traits::Float::sqrt(self)
            }
            #[inline(always)]
            fn powf(self, p: f64) -> Self {
                num_traits::Float::powf(self, p as $t)
            }
            #[inline(always)]
            fn min(self, rhs: Self) -> Self {
                // `|`, not `||`: selections without branches, so loops over
                // the kernels vectorise.
                let m = if rhs < self { rhs } else { self };
                if self.is_nan() | rhs.is_nan() {
                    <$t>::NAN
                } else {
                    m
                }
            }
            #[inline(always)]
            fn max(self, rhs: Self) -> Self {
                let m = if rhs > self { rhs } else { self };
                if self.is_nan() | rhs.is_nan() {
                    <$t>::NAN
                } else {
                    m
                }
            }
            #[inline(always)]
            fn clamp(self, lo: f64, hi: f64) -> Self {
                Elem::min(Elem::max(self, lo as $t), hi as $t)
            }
            #[inline(always)]
            fn gt(&self, rhs: &Self) -> bool {
                *self > *rhs
            }
            #[inline(always)]
            fn ge(&self, rhs: &Self) -> bool {
                *self >= *rhs
            }
            #[inline(always)]
            fn gt_scalar(&self, v: f64) -> bool {
                *self > v as $t
            }
            #[inline(always)]
            fn ge_scalar(&self, v: f64) -> bool {
                *self >= v as $t
            }
            #[inline(always)]
            fn lt_scalar(&self, v: f64) -> bool {
                *self < v as $t
            }
            #[inline(always)]
            fn le_scalar(&self, v: f64) -> bool {
                *self <= v as $t
            }
            #[inline(always)]
            fn select(mask: &bool, on_true: Self, on_false: Self) -> Self {
                if *mask {
                    on_true
                } else {
                    on_false
                }
            }
        }

        impl Real for $t {
            #[inline(always)]
            fn of(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            #[inline(always)]
            fn powi(self, n: i32) -> Self {
                num_traits::Float::powi(self, n)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                num_traits::Float::tanh(self)
            }
            #[inline(always)]
            fn exp_m1(self) -> Self {
                num_traits::Float::exp_m1(self)
            }
            #[inline(always)]
            fn epsilon() -> Self {
                <$t>::EPSILON
            }
            #[inline(always)]
            fn max_value() -> Self {
                <$t>::MAX
            }
            #[inline(always)]
            fn exp_branch_free(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn exp_flush_subnormal(self) -> Self {
                $flush(self)
            }
            #[inline(always)]
            fn copy_streaming(src: &[Self], dst: &mut [Self]) {
                assert_eq!(src.len(), dst.len(), "copy_streaming: lengths differ");
                #[cfg(target_arch = "x86_64")]
                if (dst.as_ptr() as usize) % 16 == 0 {
                    use core::arch::x86_64 as arch;
                    // Elements per 16-byte store.
                    const W: usize = 16 / core::mem::size_of::<$t>();
                    let whole = dst.len() / W * W;
                    let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
                    let mut i = 0;
                    while i < whole {
                        #[allow(unsafe_code)]
                        // SAFETY: `i + W ≤ whole ≤ len` for both slices (the
                        // lengths are equal), so the 16 bytes read and written
                        // lie inside them; `d + i` is 16-byte aligned (`d` is,
                        // and `i` counts whole 16-byte steps); SSE2 is part
                        // of every x86-64 CPU.
                        unsafe {
                            arch::$stream(d.add(i), arch::$load(s.add(i)))
                        };
                        i += W;
                    }
                    dst[whole..].copy_from_slice(&src[whole..]);
                    return;
                }
                dst.copy_from_slice(src);
            }
        }
    };
}

impl_real!(
    f32,
    exp_f32_branch_free,
    exp_f32_flush_subnormal,
    _mm_stream_ps,
    _mm_loadu_ps
);
impl_real!(f64, exp_f64_libm, exp_f64_libm, _mm_stream_pd, _mm_loadu_pd);

#[inline(always)]
fn exp_f64_libm(x: f64) -> f64 {
    num_traits::Float::exp(x)
}

/// The range reduction of [`exp_f32_branch_free`] and
/// [`exp_f32_flush_subnormal`]: `(r, n)` with `n = round(x / ln 2)` and
/// `r = x − n·ln 2` (Cody–Waite, two-part `ln 2`), so `eˣ = eʳ·2ⁿ` with
/// `|r| ≤ ln 2 / 2`. `x` must lie in `[−104, 89]`.
#[inline(always)]
fn exp_f32_reduce(xc: f32) -> (f32, i32) {
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO, LN2_HI exact in 9 bits (so n·LN2_HI is exact).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to the nearest integer (ties to even) and
    // leaves that integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let t = xc * LOG2E + ROUND;
    let n_bits = t.to_bits() as i32 - ROUND.to_bits() as i32; // n ∈ [−150, 128]
    let n = t - ROUND;
    (xc - n * LN2_HI - n * LN2_LO, n_bits)
}

/// `eʳ` for the reduced argument, by Cephes' degree-7 polynomial
/// `1 + r + r²·P(r)` with `P` in Horner's form.
#[inline(always)]
fn exp_f32_poly_horner(r: f32) -> f32 {
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    p * (r * r) + r + 1.0
}

/// [`exp_f32_poly_horner`] with `P` in Estrin's form (three independent
/// pairs, then `r²` and `r⁴`): the same coefficients, a shorter dependency
/// chain, a different rounding (also within 2 ulp, tested).
#[inline(always)]
fn exp_f32_poly_estrin(r: f32) -> f32 {
    let r2 = r * r;
    let r4 = r2 * r2;
    let a = 1.666_666_5e-1 * r + 0.5;
    let b = 8.333_452e-3 * r + 4.166_579_6e-2;
    let c = 1.987_569_1e-4_f32 * r + 1.398_199_9e-3;
    let p = (a + b * r2) + c * r4;
    p * r2 + r + 1.0
}

/// See [`Real::exp_branch_free`]. Every step is a plain float or integer
/// operation on the one value; the out-of-range and NaN cases are selected at
/// the end, so the compiler turns a loop of these into vector code.
#[inline(always)]
fn exp_f32_branch_free(x: f32) -> f32 {
    const OVERFLOW: f32 = 88.722_84; // ln(f32::MAX)
    const UNDERFLOW: f32 = -103.972_08; // ln(smallest subnormal / 2)
    let xc = if x > 89.0 { 89.0 } else { x };
    let xc = if xc < -104.0 { -104.0 } else { xc };
    let (r, n_bits) = exp_f32_reduce(xc);
    let er = exp_f32_poly_horner(r);
    // 2ⁿ = 2^{n₁}·2^{n₂}, each factor a normal float.
    let n1 = n_bits >> 1;
    let n2 = n_bits - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    let y = er * s1 * s2;
    let y = if x > OVERFLOW { f32::INFINITY } else { y };
    let y = if x < UNDERFLOW { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// See [`Real::exp_flush_subnormal`]: the clamps are comparisons that let
/// NaN through (and NaN stays NaN through the arithmetic), and `2ⁿ` is one
/// factor, whose exponent field is 0 — the float 0 — for `n = −127`.
#[inline(always)]
fn exp_f32_flush_subnormal(x: f32) -> f32 {
    // x ≤ −88 rounds to n ≤ −127; x ≤ 88 to n ≤ 127.
    let xc = if x < -88.0 { -88.0 } else { x };
    let xc = if xc > 88.0 { 88.0 } else { xc };
    let (r, n_bits) = exp_f32_reduce(xc);
    let er = exp_f32_poly_estrin(r);
    let y = er * f32::from_bits(((n_bits + 127) as u32) << 23);
    if x > 88.0 {
        f32::INFINITY
    } else {
        y
    }
}

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
