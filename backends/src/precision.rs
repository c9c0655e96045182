//! Reduced-precision (f16/bf16) evaluation and its documented tolerances.
//!
//! posttrain's ops compute in `f32` on every burn backend (`f64` in the
//! core). Models, however, usually *emit* their logits and log-probabilities
//! in half precision. This module is the bridge: it rounds inputs to
//! [`Reduced::F16`] or [`Reduced::Bf16`] — on the host ([`Reduced::round`],
//! round-to-nearest-even through the `half` crate that burn re-exports) or
//! on the device ([`cast_roundtrip`], a real `f16`/`bf16` tensor on backends
//! that support the dtype) — and states how far an op's output may then
//! move ([`Reduced::tolerance`]). The ops themselves then run in `f32` on
//! the rounded values, which is what TRL, verl and OpenRLHF do with bf16
//! logits (`logits.float()` before `log_softmax`).
//!
//! ## What burn 0.22.1 supports
//!
//! | backend | `f16` | `bf16` | source |
//! |---|---|---|---|
//! | ndarray | no | no | `burn-ndarray` `backend.rs`: `DType::F16 \| DType::BF16 => DTypeUsageSet::empty()` |
//! | wgpu | when the adapter has `shader-f16` | storage/conversion only on Vulkan (no arithmetic) | `burn-cubecl` `supports_dtype` checks the runtime's `TypeUsage`; `Device::supports_dtype` docs |
//! | tch (libtorch) | yes (CPU and CUDA) | yes | libtorch kernels |
//!
//! [`supports`] asks the device (`Device::supports_dtype`), so the table is
//! checked at run time rather than assumed.
//!
//! ## Tolerances
//!
//! Rounding an input `x` to a format with unit roundoff `u` moves it by at
//! most `u·|x|` (`u = 2⁻¹¹ ≈ 4.9e-4` for f16, `2⁻⁸ ≈ 3.9e-3` for bf16). An
//! op with relative condition number `κ` then moves by about `κ·u`.
//! [`Reduced::tolerance`] is `rel = abs = 8·u`: the bound for ops whose `κ`
//! is a few units (losses and log-probs from logits ~ N(0, 2), aggregations,
//! whitening). It is *not* a bound for ops that take differences of nearly
//! equal inputs — a KL estimate or a ratio of two log-probs that agree to
//! 0.05 nats loses its value when each is rounded by `u·|log p| ≈ 1e-3`
//! (f16) or `1e-2` (bf16), and an entropy gradient `p·(log p + H)` cancels:
//! their `κ` is `|log p| / |Δ|`, and the cross-backend report lists the
//! measured sensitivity of every op (marked "ill-conditioned here" above
//! `8·u`). That is a property of the inputs, not of the computation. The
//! second guarantee is *stability*: on rounded inputs, the f32 computation
//! must stay within the f32 bound of the f64 reference evaluated on the
//! *same* rounded inputs — rounding the inputs may change the answer, never
//! the accuracy with which the answer is computed. In particular the
//! max-shifted log-softmax stays finite for bf16 logits of ±1e30 (f16
//! cannot hold them: it overflows to ±inf above 65504, and
//! [`Reduced::round`] says so by returning the infinity).
//!
//! ## Example
//!
//! ```
//! use posttrain_burn::precision::Reduced;
//! // 1 + 2⁻⁹ is a tie in bf16 (8 significant bits): it rounds to even, 1.0.
//! assert_eq!(Reduced::Bf16.round(1.0 + 2f64.powi(-9)), 1.0);
//! // f16 keeps it (11 significant bits).
//! assert_eq!(Reduced::F16.round(1.0 + 2f64.powi(-9)), 1.0 + 2f64.powi(-9));
//! assert!(Reduced::F16.round(1e30).is_infinite());
//! let tol = Reduced::F16.tolerance();
//! assert!(tol.rel < 1e-2);
//! let dev = posttrain_burn::device()?;
//! let t = posttrain_burn::tensor1(&[0.1, -2.5], &dev);
//! match posttrain_burn::precision::cast_roundtrip(t, Reduced::Bf16) {
//!     Ok(r) => assert_eq!(posttrain_burn::to_vec(r)[1], -2.5),
//!     Err(e) => println!("{e}"), // ndarray: no bf16 on the device
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use burn::tensor::{bf16, f16, Device, FloatDType, Tensor};
use core::fmt;

/// A reduced floating-point format inputs can be rounded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reduced {
    /// IEEE binary16: 11 significant bits, max 65504.
    F16,
    /// bfloat16: 8 significant bits, the f32 exponent range.
    Bf16,
}

/// A documented tolerance: `|got − want| ≤ abs + rel·|want|`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute part.
    pub abs: f64,
    /// Relative part.
    pub rel: f64,
}

impl Tolerance {
    /// Whether `got` is within this tolerance of `want`.
    pub fn matches(&self, got: f64, want: f64) -> bool {
        (got - want).abs() <= self.abs + self.rel * want.abs()
    }
}

impl Reduced {
    /// Both formats.
    pub const ALL: [Reduced; 2] = [Reduced::F16, Reduced::Bf16];

    /// `f16` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Reduced::F16 => "f16",
            Reduced::Bf16 => "bf16",
        }
    }

    /// burn's dtype for this format.
    pub fn dtype(self) -> FloatDType {
        match self {
            Reduced::F16 => FloatDType::F16,
            Reduced::Bf16 => FloatDType::BF16,
        }
    }

    /// The unit roundoff `u` (half the distance from 1 to the next value):
    /// `2⁻¹¹` for f16, `2⁻⁸` for bf16.
    pub fn unit_roundoff(self) -> f64 {
        match self {
            Reduced::F16 => 2f64.powi(-11),
            Reduced::Bf16 => 2f64.powi(-8),
        }
    }

    /// `x` rounded to this format (round to nearest, ties to even) and
    /// widened back to `f64`. Out-of-range values become `±inf` (f16 above
    /// 65504); NaN stays NaN.
    pub fn round(self, x: f64) -> f64 {
        match self {
            Reduced::F16 => f16::from_f64(x).to_f64(),
            Reduced::Bf16 => bf16::from_f64(x).to_f64(),
        }
    }

    /// Every value of `xs` rounded with [`Reduced::round`].
    pub fn round_slice(self, xs: &[f64]) -> Vec<f64> {
        xs.iter().map(|&x| self.round(x)).collect()
    }

    /// How far an op's output may move when its well-conditioned inputs are
    /// rounded to this format: `rel = abs = 8·u` (see the module docs).
    pub fn tolerance(self) -> Tolerance {
        let u = self.unit_roundoff();
        Tolerance {
            abs: 8.0 * u,
            rel: 8.0 * u,
        }
    }
}

impl fmt::Display for Reduced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The device cannot hold tensors of the requested format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// The format asked for.
    pub format: Reduced,
    /// The device, as burn prints it.
    pub device: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is not supported on the device {} (burn's Device::supports_dtype)",
            self.format, self.device
        )
    }
}

impl std::error::Error for Unsupported {}

/// Whether `device` supports `format` for storage and arithmetic
/// (`Device::supports_dtype`).
pub fn supports(device: &Device, format: Reduced) -> bool {
    device.supports_dtype(format.dtype())
}

/// Casts `t` to `format` on its device and back to `f32`: the tensor then
/// holds exactly the values a half-precision producer (a model's bf16
/// logits) would hand over, ready for the `f32` ops of this crate.
///
/// # Errors
///
/// [`Unsupported`] when the device does not support `format` (ndarray
/// supports neither f16 nor bf16; round on the host with
/// [`Reduced::round_slice`] there).
pub fn cast_roundtrip<const D: usize>(
    t: Tensor<D>,
    format: Reduced,
) -> Result<Tensor<D>, Unsupported> {
    let device = t.device();
    if !supports(&device, format) {
        return Err(Unsupported {
            format,
            device: format!("{device:?}"),
        });
    }
    Ok(t.cast(format.dtype()).cast(FloatDType::F32))
}

/// A tensor of `values` rounded to `format`: on the device when it supports
/// the format ([`cast_roundtrip`]), else on the host ([`Reduced::round_slice`]).
/// Both give the same numbers (round to nearest even) for values that are
/// exactly representable in `f32` (the device path goes through the
/// device's `f32` tensor first); the `bool` says whether the device did the
/// rounding.
pub fn rounded_tensor1(values: &[f64], format: Reduced, device: &Device) -> (Tensor<1>, bool) {
    let t = crate::tensor1(values, device);
    match cast_roundtrip(t, format) {
        Ok(r) => (r, true),
        Err(_) => (crate::tensor1(&format.round_slice(values), device), false),
    }
}
