//! Masked statistics and whitening: masked sum, mean, variance, whitening and
//! the NaN-aware reductions, each with its closed-form gradient.
//!
//! # Overview
//!
//! | op | formula (valid positions `V`, weights `w`) | peers |
//! |---|---|---|
//! | [`masked_sum`] | `Σ_V wᵢ xᵢ` | verl `masked_sum`, torchtune `masked_sum` |
//! | [`masked_mean`] | `Σ_V wᵢ xᵢ / (Σ_V wᵢ + ε_count)` | verl / torchtune `masked_mean` (`ε_count = 1e-8`) |
//! | [`masked_variance`] | `scale · Σ_V (xᵢ − m)²` | verl `masked_var`, torchtune `masked_var` |
//! | [`masked_whiten`] | `(x − m)·r (+ m)`, `r = (v + ε)^{-½}` | verl `masked_whiten`, torchtune `whiten`, OpenRLHF `masked_normalize` |
//! | [`nan_mean`], [`nan_std`], [`nan_max`], [`nan_min`] | the same over the non-NaN entries | TRL `nanstd`, `nanmax`, `nanmin`, `torch.nanmean` |
//!
//! A reduction runs over the whole matrix, over each row, or over each column
//! ([`Reduce`]). Where the peers disagree (the count epsilon, Bessel's
//! correction, where the variance epsilon goes, whether the mean is added
//! back) the configs ([`MomentConfig`], [`WhitenConfig`]) take explicit
//! parameters and offer a `preset(Preset)` constructor.
//!
//! # Masking
//!
//! Positions are *selected*: a masked entry is never read into a sum, so NaN
//! or ±inf there changes nothing. An all-masked mean is `0 / ε_count = 0`
//! with a zero gradient.
//!
//! # Example
//!
//! ```
//! use posttrain_core::stats::{masked_mean, MomentConfig, Reduce};
//! use posttrain_core::{Dims, Preset};
//!
//! let dims = Dims::new(2, 2);
//! let x = [1.0f64, f64::NAN, 3.0, 5.0];
//! let mask = [true, false, true, true];
//! let cfg = MomentConfig::preset(Preset::Verl);
//! let mut out = [0.0];
//! masked_mean(&cfg, dims, Reduce::All, &x, &mask, None, &mut out)?;
//! assert!((out[0] - 3.0).abs() < 1e-8);
//! # Ok::<(), posttrain_core::Error>(())
//! ```

use crate::elem::{Elem, Real};
use crate::error::{check_len, check_param, Error};
use crate::preset::Preset;
use crate::shape::Dims;

/// Which entries of a `[batch, seq]` matrix a reduction combines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Reduce {
    /// Everything: one output (`axis=None`).
    All,
    /// Each row over its columns: `batch` outputs (`axis=-1` / `dim=1`).
    Rows,
    /// Each column over the rows: `seq` outputs (`axis=0`).
    Columns,
}

impl Reduce {
    /// Number of outputs for a matrix of shape `dims`.
    pub fn out_len(self, dims: Dims) -> usize {
        match self {
            Reduce::All => 1,
            Reduce::Rows => dims.batch,
            Reduce::Columns => dims.seq,
        }
    }

    /// Parses a torch-style axis of a 2-D tensor: `None` → [`Reduce::All`],
    /// `0`/`-2` → [`Reduce::Columns`], `1`/`-1` → [`Reduce::Rows`].
    ///
    /// # Errors
    /// [`Error::OutOfRange`] for any other axis.
    pub fn from_axis(axis: Option<i64>) -> Result<Self, Error> {
        match axis {
            None => Ok(Reduce::All),
            Some(0) | Some(-2) => Ok(Reduce::Columns),
            Some(1) | Some(-1) => Ok(Reduce::Rows),
            Some(a) => Err(Error::OutOfRange {
                param: "axis",
                value: a as f64,
                rule: "must be None, 0, 1, -1 or -2 for a 2-D input",
            }),
        }
    }

    /// The flat indices that output `s` combines.
    fn members(self, dims: Dims, s: usize) -> Members {
        match self {
            Reduce::All => Members {
                next: 0,
                step: 1,
                left: dims.len(),
            },
            Reduce::Rows => Members {
                next: s * dims.seq,
                step: 1,
                left: dims.seq,
            },
            Reduce::Columns => Members {
                next: s,
                step: dims.seq.max(1),
                left: dims.batch,
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Members {
    next: usize,
    step: usize,
    left: usize,
}

impl Iterator for Members {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.left == 0 {
            return None;
        }
        let i = self.next;
        self.next += self.step;
        self.left -= 1;
        Some(i)
    }
}

/// Bessel's correction of a variance over `W` valid entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Bessel {
    /// Biased: `Σ(x − m)² / D`.
    None,
    /// Unbiased: `Σ(x − m)² / D · W/(W − 1)`; refuses `W ≤ 1` (verl, `torch.var`).
    Exact,
    /// `Σ(x − m)² / D · (W + ε)/(W + ε − 1)` with the count epsilon `ε`
    /// (torchtune; no check, `W = 1` divides by `ε`).
    Smoothed,
}

/// How a masked mean and variance count their valid entries.
///
/// The mean is `Σ_V wᵢxᵢ / D` with `D = max(W + count_eps, count_floor)` and
/// `W = Σ_V wᵢ`; the variance is `Σ_V (xᵢ − m)² / D` times the [`Bessel`]
/// factor.
///
/// # Peers
/// | preset | `count_eps` | `count_floor` | `bessel` |
/// |---|---|---|---|
/// | `Verl` | `1e-8` | 0 | `Exact` |
/// | `Torchtune` | `1e-8` | 0 | `Smoothed` |
/// | `OpenRlhf` (`masked_normalize`) | 0 | 1 | `None` |
/// | `Trl` (`nanstd`, `torch.var`) | 0 | 0 | `Exact` |
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MomentConfig {
    /// Added to the valid count in the mean's denominator.
    pub count_eps: f64,
    /// Lower bound of the mean's denominator (0 = none).
    pub count_floor: f64,
    /// Bessel's correction of the variance.
    pub bessel: Bessel,
}

impl MomentConfig {
    /// Validates the parameters.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] if `count_eps` or `count_floor` is negative or not finite.
    pub fn new(count_eps: f64, count_floor: f64, bessel: Bessel) -> Result<Self, Error> {
        check_param(
            count_eps >= 0.0 && count_eps.is_finite(),
            "count_eps",
            count_eps,
            "must be finite and ≥ 0",
        )?;
        check_param(
            count_floor >= 0.0 && count_floor.is_finite(),
            "count_floor",
            count_floor,
            "must be finite and ≥ 0",
        )?;
        Ok(MomentConfig {
            count_eps,
            count_floor,
            bessel,
        })
    }

    /// The peer's convention (see the table above).
    pub fn preset(preset: Preset) -> Self {
        match preset {
            Preset::Verl => MomentConfig {
                count_eps: 1e-8,
                count_floor: 0.0,
                bessel: Bessel::Exact,
            },
            Preset::Torchtune => MomentConfig {
                count_eps: 1e-8,
                count_floor: 0.0,
                bessel: Bessel::Smoothed,
            },
            Preset::OpenRlhf => MomentConfig {
                count_eps: 0.0,
                count_floor: 1.0,
                bessel: Bessel::None,
            },
            Preset::Trl => MomentConfig {
                count_eps: 0.0,
                count_floor: 0.0,
                bessel: Bessel::Exact,
            },
        }
    }

    fn denom<F: Real>(&self, w: F) -> F {
        self.denominator(w)
    }

    /// The mean's denominator `D = max(W + count_eps, count_floor)` from the
    /// valid weight `W` (an [`Elem`] kernel: the slice drivers call it per
    /// group, the burn backend on a tensor of group weights).
    ///
    /// # Formula
    /// `D = W + ε`, raised to `count_floor` when `count_floor > 0` and
    /// `W + ε < count_floor`.
    pub fn denominator<E: Elem>(&self, w: E) -> E {
        let d = w.add_scalar(self.count_eps);
        if self.count_floor > 0.0 {
            let low = d.lt_scalar(self.count_floor);
            let floor = d.full_like(self.count_floor);
            E::select(&low, floor, d)
        } else {
            d
        }
    }

    /// Checks that a group with valid count `w` has a defined variance
    /// under this config's [`Bessel`] correction.
    ///
    /// # Errors
    /// [`Error::Invalid`] for [`Bessel::Exact`] with `w ≤ 1`, or
    /// [`Bessel::Smoothed`] with `w + count_eps = 1`.
    pub fn check_variance_count(&self, w: f64) -> Result<(), Error> {
        match self.bessel {
            Bessel::Exact if w <= 1.0 => Err(Error::Invalid {
                input: "mask",
                rule: "an unbiased variance needs at least two valid entries",
            }),
            Bessel::Smoothed if w + self.count_eps == 1.0 => Err(Error::Invalid {
                input: "mask",
                rule: "a smoothed-Bessel variance with count_eps = 0 needs a count other than 1",
            }),
            _ => Ok(()),
        }
    }

    /// The factor `scale` of `variance = Σ_V (x − m)² · scale` for a group of
    /// valid count `w` (an [`Elem`] kernel; validate the count first with
    /// [`MomentConfig::check_variance_count`]).
    ///
    /// # Formula
    /// `scale = bessel(W) / D` with `D` = [`MomentConfig::denominator`] and
    /// `bessel` = 1, `W/(W − 1)` or `(W + ε)/(W + ε − 1)`; a group with
    /// `D = 0` (nothing valid, no count epsilon) has `scale = 0` unless the
    /// correction is exact.
    pub fn variance_scale<E: Elem>(&self, w: E) -> E {
        let d = self.denominator(w.clone());
        let inv = d.full_like(1.0).div(d.clone());
        let scale = match self.bessel {
            Bessel::None => inv,
            Bessel::Exact => inv.mul(w.clone().div(w.add_scalar(-1.0))),
            Bessel::Smoothed => {
                let we = w.add_scalar(self.count_eps);
                inv.mul(we.clone().div(we.add_scalar(-1.0)))
            }
        };
        if self.bessel == Bessel::Exact {
            return scale;
        }
        // Nothing valid and no count epsilon: the sum of squares is 0, and so
        // is the variance (rather than 0 · ∞ = NaN).
        let live = d.gt_scalar(0.0);
        let zero = d.full_like(0.0);
        E::select(&live, scale, zero)
    }

    /// `variance = Σ(x − m)² · scale`.
    fn var_scale<F: Real>(&self, w: F) -> Result<F, Error> {
        self.check_variance_count(w.to_f64())?;
        Ok(self.variance_scale(w))
    }
}

fn check_mask<F: Real>(
    dims: Dims,
    values: usize,
    mask: &[bool],
    weights: Option<&[F]>,
) -> Result<(), Error> {
    check_len("values", values, dims.len())?;
    check_len("mask", mask.len(), dims.len())?;
    if let Some(w) = weights {
        check_len("weights", w.len(), dims.len())?;
    }
    Ok(())
}

#[inline]
fn weight<F: Real>(weights: Option<&[F]>, i: usize) -> F {
    weights.map_or(F::one(), |w| w[i])
}

/// Masked (weighted) sum `Σ_V wᵢ xᵢ` per output of `reduce`.
///
/// # Formula
/// ```text
/// out_s = Σ_{i ∈ s, mask_i} w_i · x_i        (w_i = 1 without weights)
/// ```
/// # Gradient
/// `∂out_s/∂x_i = w_i` for valid `i` in `s`, else 0 (see [`masked_sum_vjp`]).
/// # Peers
/// verl `masked_sum` (a float mask is the weight), torchtune `masked_sum`.
/// # Errors
/// [`Error::ShapeMismatch`] when `values`, `mask`, `weights` or `out` do not fit `dims`/`reduce`.
pub fn masked_sum<F: Real>(
    dims: Dims,
    reduce: Reduce,
    values: &[F],
    mask: &[bool],
    weights: Option<&[F]>,
    out: &mut [F],
) -> Result<(), Error> {
    check_mask(dims, values.len(), mask, weights)?;
    check_len("out", out.len(), reduce.out_len(dims))?;
    for (s, o) in out.iter_mut().enumerate() {
        *o = reduce
            .members(dims, s)
            .filter(|&i| mask[i])
            .map(|i| weight(weights, i) * values[i])
            .sum();
    }
    Ok(())
}

/// Vector-Jacobian product of [`masked_sum`]: `dx_i = w_i · cot_s` for valid `i`.
///
/// # Formula
/// ```text
/// dx_i = w_i · cot_{s(i)} if mask_i else 0
/// ```
/// # Gradient
/// This is the gradient of [`masked_sum`].
/// # Peers
/// As [`masked_sum`].
/// # Errors
/// [`Error::ShapeMismatch`] on inconsistent lengths.
pub fn masked_sum_vjp<F: Real>(
    dims: Dims,
    reduce: Reduce,
    mask: &[bool],
    weights: Option<&[F]>,
    cot: &[F],
    dvalues: &mut [F],
) -> Result<(), Error> {
    check_mask(dims, dvalues.len(), mask, weights)?;
    check_len("cotangent", cot.len(), reduce.out_len(dims))?;
    for (s, &c) in cot.iter().enumerate() {
        for i in reduce.members(dims, s) {
            dvalues[i] = if mask[i] {
                weight(weights, i) * c
            } else {
                F::zero()
            };
        }
    }
    Ok(())
}

/// Masked (weighted) mean `Σ_V wᵢxᵢ / D` per output of `reduce`, with
/// `D = max(Σ_V wᵢ + count_eps, count_floor)` ([`MomentConfig`]).
///
/// # Formula
/// ```text
/// out_s = Σ_{i∈s, mask_i} w_i x_i / max(Σ_{i∈s, mask_i} w_i + ε, floor)
/// ```
/// # Gradient
/// `∂out_s/∂x_i = w_i / D_s` for valid `i` (see [`masked_mean_vjp`]).
/// # Peers
/// verl and torchtune `masked_mean` (`MomentConfig::preset(Verl | Torchtune)`,
/// `+1e-8`): an all-masked output is `0`.
/// # Errors
/// [`Error::ShapeMismatch`] on inconsistent lengths.
pub fn masked_mean<F: Real>(
    cfg: &MomentConfig,
    dims: Dims,
    reduce: Reduce,
    values: &[F],
    mask: &[bool],
    weights: Option<&[F]>,
    out: &mut [F],
) -> Result<(), Error> {
    check_mask(dims, values.len(), mask, weights)?;
    check_len("out", out.len(), reduce.out_len(dims))?;
    for (s, o) in out.iter_mut().enumerate() {
        let (mut sum, mut w) = (F::zero(), F::zero());
        for i in reduce.members(dims, s).filter(|&i| mask[i]) {
            let wi = weight(weights, i);
            sum += wi * values[i];
            w += wi;
        }
        let d = cfg.denom(w);
        *o = if d == F::zero() { F::zero() } else { sum / d };
    }
    Ok(())
}

/// Vector-Jacobian product of [`masked_mean`]: `dx_i = w_i · cot_s / D_s` for valid `i`.
///
/// # Formula
/// ```text
/// dx_i = w_i · cot_{s(i)} / D_{s(i)} if mask_i else 0
/// ```
/// # Gradient
/// This is the gradient of [`masked_mean`] (exactly 0 everywhere when all is masked).
/// # Peers
/// As [`masked_mean`].
/// # Errors
/// [`Error::ShapeMismatch`] on inconsistent lengths.
pub fn masked_mean_vjp<F: Real>(
    cfg: &MomentConfig,
    dims: Dims,
    reduce: Reduce,
    mask: &[bool],
    weights: Option<&[F]>,
    cot: &[F],
    dvalues: &mut [F],
) -> Result<(), Error> {
    check_mask(dims, dvalues.len(), mask, weights)?;
    check_len("cotangent", cot.len(), reduce.out_len(dims))?;
    for (s, &c) in cot.iter().enumerate() {
        let w: F = reduce
            .members(dims, s)
            .filter(|&i| mask[i])
            .map(|i| weight(weights, i))
            .sum();
        let d = cfg.denom(w);
        for i in reduce.members(dims, s) {
            dvalues[i] = if mask[i] && d != F::zero() {
                weight(weights, i) * c / d
            } else {
                F::zero()
            };
        }
    }
    Ok(())
}

/// Moments of one reduction group.
#[derive(Debug, Clone, Copy)]
struct Moments<F> {
    /// Valid count `W`.
    w: F,
    /// Mean denominator `D`.
    d: F,
    /// Mean `m` (0 when not centering).
    mean: F,
    /// `Σ_V (x − m)`.
    csum: F,
    /// `Σ_V (x − m)²`.
    sq: F,
}

fn moments<F: Real>(
    cfg: &MomentConfig,
    it: impl Iterator<Item = usize> + Clone,
    values: &[F],
    mask: &[bool],
    center: bool,
) -> Moments<F> {
    let (mut sum, mut w) = (F::zero(), F::zero());
    for i in it.clone().filter(|&i| mask[i]) {
        sum += values[i];
        w += F::one();
    }
    let d = cfg.denom(w);
    let mean = if center && d != F::zero() {
        sum / d
    } else {
        F::zero()
    };
    let (mut csum, mut sq) = (F::zero(), F::zero());
    for i in it.filter(|&i| mask[i]) {
        let c = values[i] - mean;
        csum += c;
        sq += c * c;
    }
    Moments {
        w,
        d,
        mean,
        csum,
        sq,
    }
}

/// Masked variance of all entries, `Σ_V (xᵢ − m)² · scale` ([`MomentConfig`]).
///
/// With `center = false` the input is taken as already centered (`m = 0`,
/// torchtune's `masked_var(centered_values, …)`).
///
/// # Formula
/// ```text
/// m = Σ_V x / D          D = max(W + ε, floor), W = |V|
/// v = Σ_V (x − m)² / D · bessel(W)
/// ```
/// # Gradient
/// `∂v/∂x_j = 2·scale·(c_j − [center]·Σ_V c / D)` for valid `j`, else 0,
/// with `c = x − m`; `grad = Some((cot, dvalues))` writes `cot · ∂v/∂x`.
/// # Peers
/// verl `masked_var` (`preset(Verl)`, `center = true`), torchtune
/// `masked_var` (`preset(Torchtune)`, `center = false`, or `Bessel::None` when
/// `unbiased=False`).
/// # Errors
/// [`Error::ShapeMismatch`] on inconsistent lengths; [`Error::Invalid`] for
/// [`Bessel::Exact`] with fewer than two valid entries.
pub fn masked_variance<F: Real>(
    cfg: &MomentConfig,
    values: &[F],
    mask: &[bool],
    center: bool,
    grad: Option<(F, &mut [F])>,
) -> Result<F, Error> {
    check_len("mask", mask.len(), values.len())?;
    let m = moments(cfg, 0..values.len(), values, mask, center);
    let scale = cfg.var_scale(m.w)?;
    if let Some((cot, dx)) = grad {
        check_len("dvalues", dx.len(), values.len())?;
        let shift = if center && m.d != F::zero() {
            m.csum / m.d
        } else {
            F::zero()
        };
        for (i, d) in dx.iter_mut().enumerate() {
            *d = if mask[i] {
                cot * F::of(2.0) * scale * (values[i] - m.mean - shift)
            } else {
                F::zero()
            };
        }
    }
    Ok(m.sq * scale)
}

/// Where the whitening epsilon enters `r = 1/√v`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum VarEps {
    /// `r = (v + ε)^{-½}` (verl, torchtune: `ε = 1e-8`).
    Add(f64),
    /// `r = max(v, ε)^{-½}` (OpenRLHF `masked_normalize`).
    Floor(f64),
}

/// Whitening `y = (x − m)·r (+ m)` with `r = (v + ε)^{-½}`.
///
/// # Peers
/// | preset | moments | `var_eps` | `keep_mean` | `zero_masked` |
/// |---|---|---|---|---|
/// | `Verl` (`masked_whiten`, `shift_mean=True`) | verl | `Add(1e-8)` | false | false |
/// | `Torchtune` (`whiten`, `shift_mean=False`) | torchtune | `Add(1e-8)` | false | false |
/// | `OpenRlhf` (`masked_normalize`, per row) | OpenRLHF | `Floor(1e-8)` | false | true |
/// | `Trl` | torch (`x.mean()`, `x.var()`) | `Add(1e-8)` | false | false |
///
/// verl's `shift_mean=False` and torchtune's `shift_mean=True` both mean
/// `keep_mean = true` (the flag's meaning is opposite in the two peers).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct WhitenConfig {
    /// How the mean and variance count valid entries.
    pub moments: MomentConfig,
    /// The variance epsilon.
    pub var_eps: VarEps,
    /// Add the mean back after scaling.
    pub keep_mean: bool,
    /// Write 0 at masked positions (else the formula is applied there too).
    pub zero_masked: bool,
}

impl WhitenConfig {
    /// The peer's convention (see the table above).
    pub fn preset(preset: Preset) -> Self {
        let var_eps = match preset {
            Preset::OpenRlhf => VarEps::Floor(1e-8),
            _ => VarEps::Add(1e-8),
        };
        WhitenConfig {
            moments: MomentConfig::preset(preset),
            var_eps,
            keep_mean: false,
            zero_masked: preset == Preset::OpenRlhf,
        }
    }

    /// Validates `var_eps ≥ 0`.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] for a negative or non-finite epsilon.
    pub fn validate(&self) -> Result<(), Error> {
        let e = match self.var_eps {
            VarEps::Add(e) | VarEps::Floor(e) => e,
        };
        check_param(
            e > 0.0 && e.is_finite(),
            "var_eps",
            e,
            "must be finite and > 0 (1/√0 would be inf)",
        )?;
        MomentConfig::new(
            self.moments.count_eps,
            self.moments.count_floor,
            self.moments.bessel,
        )
        .map(|_| ())
    }

    /// `(r, dr/dv)`.
    fn rsqrt<F: Real>(&self, v: F) -> (F, F) {
        self.inv_std(v)
    }

    /// The whitening scale `r` and its derivative `dr/dv` from the variance
    /// `v` (an [`Elem`] kernel).
    ///
    /// # Formula
    /// `Add(ε)`: `r = (v + ε)^{-½}`; `Floor(ε)`: `r = max(v, ε)^{-½}`.
    ///
    /// # Gradient
    /// `dr/dv = −½ r³` (0 where the floor is active).
    pub fn inv_std<E: Elem>(&self, v: E) -> (E, E) {
        let rsqrt = |x: E| x.full_like(1.0).div(x.sqrt());
        let d_of = |r: E| r.clone().mul(r.clone()).mul(r).mul_scalar(-0.5);
        match self.var_eps {
            VarEps::Add(e) => {
                let r = rsqrt(v.add_scalar(e));
                (r.clone(), d_of(r))
            }
            VarEps::Floor(e) => {
                let above = v.ge_scalar(e);
                let r_v = rsqrt(v.clone());
                let r_e = v.full_like(1.0 / e.sqrt());
                let d = E::select(&above, d_of(r_v.clone()), v.full_like(0.0));
                (E::select(&above, r_v, r_e), d)
            }
        }
    }
}

/// Masked whitening per output group of `reduce` ([`Reduce::All`] for the
/// whole batch, [`Reduce::Rows`] per sequence, [`Reduce::Columns`] per position).
///
/// # Formula
/// ```text
/// m = Σ_V x / D,  v = Σ_V (x − m)² · scale,  r = (v + ε)^{-½}
/// y_i = z_i·(x_i − m)·r + [keep_mean]·m       z_i = mask_i if zero_masked else 1
/// ```
/// # Gradient
/// With cotangent `g`, `G = Σ g z`, `H = Σ g z (x − m)`, `K = Σ g`, `C = Σ_V (x − m)`:
/// ```text
/// dx_j = g_j z_j r + [j ∈ V]·( −r·G/D + H·r'·2·scale·(c_j − C/D) + [keep]·K/D )
/// ```
/// where `r' = dr/dv`. Entries with `g_i = 0` are skipped, so a NaN at a
/// masked position whose output carries no cotangent cannot leak.
/// # Peers
/// See [`WhitenConfig`].
/// # Errors
/// [`Error::ShapeMismatch`] on inconsistent lengths; [`Error::Invalid`] for
/// an unbiased variance ([`Bessel::Exact`]) with fewer than two valid entries
/// in a group; [`Error::OutOfRange`] for an invalid config
/// ([`WhitenConfig::validate`]).
pub fn masked_whiten<F: Real>(
    cfg: &WhitenConfig,
    dims: Dims,
    reduce: Reduce,
    values: &[F],
    mask: &[bool],
    out: &mut [F],
    mut grad: Option<(&[F], &mut [F])>,
) -> Result<(), Error> {
    cfg.validate()?;
    check_mask::<F>(dims, values.len(), mask, None)?;
    check_len("out", out.len(), dims.len())?;
    if let Some((g, dx)) = grad.as_ref() {
        check_len("cotangent", g.len(), dims.len())?;
        check_len("dvalues", dx.len(), dims.len())?;
    }
    for s in 0..reduce.out_len(dims) {
        let it = reduce.members(dims, s);
        let m = moments(&cfg.moments, it, values, mask, true);
        let scale = cfg.moments.var_scale(m.w)?;
        let v = m.sq * scale;
        let (r, dr) = cfg.rsqrt(v);
        let keep = if cfg.keep_mean { m.mean } else { F::zero() };
        for i in it {
            let z = mask[i] || !cfg.zero_masked;
            out[i] = if z {
                (values[i] - m.mean) * r + keep
            } else {
                keep
            };
        }
        if let Some((g, dx)) = grad.as_mut() {
            let (mut gs, mut hs, mut ks) = (F::zero(), F::zero(), F::zero());
            for i in it.filter(|&i| g[i] != F::zero()) {
                ks += g[i];
                if mask[i] || !cfg.zero_masked {
                    gs += g[i];
                    hs += g[i] * (values[i] - m.mean);
                }
            }
            let (d, cbar) = if m.d != F::zero() {
                (m.d, m.csum / m.d)
            } else {
                (F::one(), F::zero())
            };
            for j in it {
                let z = mask[j] || !cfg.zero_masked;
                let mut acc = if z && g[j] != F::zero() {
                    g[j] * r
                } else {
                    F::zero()
                };
                if mask[j] && m.d != F::zero() {
                    let c = values[j] - m.mean;
                    acc += -r * gs / d + hs * dr * F::of(2.0) * scale * (c - cbar);
                    if cfg.keep_mean {
                        acc += ks / d;
                    }
                }
                dx[j] = acc;
            }
        }
    }
    Ok(())
}

/// Mean of the non-NaN entries per output of `reduce` (`torch.nanmean`);
/// NaN where every entry is NaN.
///
/// # Formula
/// ```text
/// out_s = Σ_{i∈s, x_i ≠ NaN} x_i / #{i∈s : x_i ≠ NaN}
/// ```
/// # Gradient
/// `1/n_s` at each non-NaN entry (not provided separately; use [`masked_mean_vjp`]).
/// # Peers
/// `torch.nanmean` as TRL uses it.
/// # Errors
/// [`Error::ShapeMismatch`] when `values` or `out` do not fit.
pub fn nan_mean<F: Real>(
    dims: Dims,
    reduce: Reduce,
    values: &[F],
    out: &mut [F],
) -> Result<(), Error> {
    check_len("values", values.len(), dims.len())?;
    check_len("out", out.len(), reduce.out_len(dims))?;
    for (s, o) in out.iter_mut().enumerate() {
        let (mut sum, mut n) = (F::zero(), 0usize);
        for i in reduce.members(dims, s).filter(|&i| !values[i].is_nan()) {
            sum += values[i];
            n += 1;
        }
        *o = if n == 0 {
            F::nan()
        } else {
            sum / F::of_usize(n)
        };
    }
    Ok(())
}

/// Bessel-corrected standard deviation of the non-NaN entries per output of
/// `reduce`; NaN where fewer than two entries are non-NaN (TRL `nanstd`).
///
/// # Formula
/// ```text
/// m = nanmean(x),  std = √( Σ_{x≠NaN} (x − m)² / (n − 1) )
/// ```
/// # Gradient
/// `∂std/∂x_j = (x_j − m − Σ(x − m)/n) / ((n − 1)·std)` at non-NaN entries,
/// 0 at NaN entries; `grad = Some((cot, dvalues))` writes the VJP (0 where
/// the std is 0 or undefined).
/// # Peers
/// TRL `nanstd` (any `dim`, `keepdim` only changes the shape).
/// # Errors
/// [`Error::ShapeMismatch`] on inconsistent lengths.
pub fn nan_std<F: Real>(
    dims: Dims,
    reduce: Reduce,
    values: &[F],
    out: &mut [F],
    mut grad: Option<(&[F], &mut [F])>,
) -> Result<(), Error> {
    check_len("values", values.len(), dims.len())?;
    check_len("out", out.len(), reduce.out_len(dims))?;
    if let Some((g, dx)) = grad.as_ref() {
        check_len("cotangent", g.len(), out.len())?;
        check_len("dvalues", dx.len(), dims.len())?;
    }
    for (s, o) in out.iter_mut().enumerate() {
        let it = reduce.members(dims, s);
        let (mut sum, mut n) = (F::zero(), 0usize);
        for i in it.filter(|&i| !values[i].is_nan()) {
            sum += values[i];
            n += 1;
        }
        let std = if n < 2 {
            F::nan()
        } else {
            let mean = sum / F::of_usize(n);
            let sq: F = it
                .filter(|&i| !values[i].is_nan())
                .map(|i| (values[i] - mean) * (values[i] - mean))
                .sum();
            (sq / F::of_usize(n - 1)).sqrt()
        };
        *o = std;
        if let Some((g, dx)) = grad.as_mut() {
            let ok = n >= 2 && std > F::zero() && std.is_finite();
            let mean = if n > 0 {
                sum / F::of_usize(n)
            } else {
                F::zero()
            };
            let cbar = if ok {
                it.filter(|&i| !values[i].is_nan())
                    .map(|i| values[i] - mean)
                    .sum::<F>()
                    / F::of_usize(n)
            } else {
                F::zero()
            };
            for i in it {
                dx[i] = if ok && !values[i].is_nan() {
                    g[s] * (values[i] - mean - cbar) / (F::of_usize(n - 1) * std)
                } else {
                    F::zero()
                };
            }
        }
    }
    Ok(())
}

/// Largest non-NaN entry, `None` when every entry is NaN (or the slice is empty).
///
/// # Formula
/// ```text
/// max { x_i : x_i ≠ NaN }
/// ```
/// # Gradient
/// None (a selection; TRL uses it for metrics only).
/// # Peers
/// TRL `nanmax` (which returns NaN for `None`).
/// # Errors
/// Never fails.
pub fn nan_max<F: Real>(values: &[F]) -> Option<F> {
    values
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(None, |acc, v| Some(acc.map_or(v, |a: F| Elem::max(a, v))))
}

/// Smallest non-NaN entry, `None` when every entry is NaN (or the slice is empty).
///
/// # Formula
/// ```text
/// min { x_i : x_i ≠ NaN }
/// ```
/// # Gradient
/// None (a selection; TRL uses it for metrics only).
/// # Peers
/// TRL `nanmin` (which returns NaN for `None`).
/// # Errors
/// Never fails.
pub fn nan_min<F: Real>(values: &[F]) -> Option<F> {
    values
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(None, |acc, v| Some(acc.map_or(v, |a: F| Elem::min(a, v))))
}

/// [`masked_whiten`] in place, without a gradient (for estimators that
/// whiten their own intermediate results).
///
/// # Formula
/// As [`masked_whiten`].
/// # Gradient
/// None (advantages are constants to the loss).
/// # Peers
/// See [`WhitenConfig`].
/// # Errors
/// As [`masked_whiten`].
pub fn masked_whiten_in_place<F: Real>(
    cfg: &WhitenConfig,
    dims: Dims,
    reduce: Reduce,
    values: &mut [F],
    mask: &[bool],
) -> Result<(), Error> {
    cfg.validate()?;
    check_mask::<F>(dims, values.len(), mask, None)?;
    for s in 0..reduce.out_len(dims) {
        let it = reduce.members(dims, s);
        let m = moments(&cfg.moments, it, values, mask, true);
        let v = m.sq * cfg.moments.var_scale(m.w)?;
        let (r, _) = cfg.rsqrt(v);
        let keep = if cfg.keep_mean { m.mean } else { F::zero() };
        for i in it {
            values[i] = if mask[i] || !cfg.zero_masked {
                (values[i] - m.mean) * r + keep
            } else {
                keep
            };
        }
    }
    Ok(())
}
