//! Masked statistics and whitening on `[batch, seq]` tensors, with their
//! closed-form gradients.
//!
//! The formulas are those of [`posttrain_core::stats`]: the per-group scalar
//! rules — the mean's denominator, Bessel's correction, the whitening scale
//! `r = (v + ε)^{-½}` and `dr/dv` — are the core's [`Elem`] kernels
//! ([`MomentConfig::denominator`], [`MomentConfig::variance_scale`],
//! [`WhitenConfig::inv_std`]) run on tensors of group statistics; the sums
//! over a group (the whole matrix, each row or each column, [`Reduce`]) are
//! `sum`/`sum_dim` reductions following the core drivers line by line.
//!
//! | function | value | core counterpart | peers |
//! |---|---|---|---|
//! | [`masked_sum`] | `Σ_V wᵢ xᵢ` | [`posttrain_core::stats::masked_sum`] | verl / torchtune `masked_sum` |
//! | [`masked_mean`] | `Σ_V wᵢ xᵢ / D` | [`posttrain_core::stats::masked_mean`] | verl / torchtune `masked_mean` |
//! | [`masked_variance`] | `Σ_V (x − m)² · scale` | [`posttrain_core::stats::masked_variance`] | verl / torchtune `masked_var` |
//! | [`masked_whiten`] | `(x − m)·r (+ m)` | [`posttrain_core::stats::masked_whiten`] | verl `masked_whiten`, torchtune `whiten`, OpenRLHF `masked_normalize` |
//! | [`nan_std`] | std of the non-NaN entries | [`posttrain_core::stats::nan_std`] | TRL `nanstd` |
//! | [`nan_max`], [`nan_min`] | extreme non-NaN entry | [`posttrain_core::stats::nan_max`] | TRL `nanmax`, `nanmin` |
//!
//! A reduction's output is a `Tensor<1>`: one value ([`Reduce::All`]),
//! `batch` values ([`Reduce::Rows`]) or `seq` values ([`Reduce::Columns`]);
//! its cotangent has the same shape.
//!
//! Masked positions are selected away (`mask_where`), so NaN or ±inf there
//! never reaches a value or a gradient; the NaN reductions select the
//! non-NaN entries with `is_nan`. The variance and whitening ops read the
//! groups' valid counts back to the host (mask metadata, one small tensor)
//! to raise the core's typed error for a group too small for an unbiased
//! variance.
//!
//! # Example
//!
//! ```
//! use posttrain_burn::{device, mask2, stats::masked_mean, tensor2, to_vec};
//! use posttrain_core::stats::{MomentConfig, Reduce};
//! use posttrain_core::Preset;
//! let dev = device()?;
//! let x = tensor2(&[1.0, f64::NAN, 3.0, 5.0], [2, 2], &dev)?;
//! let mask = mask2(&[true, false, true, true], [2, 2], &dev)?;
//! let cfg = MomentConfig::preset(Preset::Verl);
//! let (m, _) = masked_mean(&cfg, Reduce::All, x, &mask, None, None)?;
//! assert!((to_vec(m)[0] - 3.0).abs() < 1e-6);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::util::Filled;
use burn::tensor::{Bool, Tensor};
use posttrain_core::stats::{MomentConfig, Reduce, WhitenConfig};
use posttrain_core::Error;

use crate::elem::ElemTensor;
use crate::util::{check_shape, keep, to_vec};

/// The group sums of `x` with the reduced axes kept: `[1, 1]`, `[batch, 1]`
/// or `[1, seq]`.
pub(crate) fn group_sum(x: Tensor<2>, reduce: Reduce) -> Tensor<2> {
    match reduce {
        Reduce::All => x.sum().reshape([1, 1]),
        Reduce::Rows => x.sum_dim(1),
        Reduce::Columns => x.sum_dim(0),
    }
}

/// The shape of a group tensor (the reduced axes kept as 1).
fn group_shape(reduce: Reduce, [b, s]: [usize; 2]) -> [usize; 2] {
    match reduce {
        Reduce::All => [1, 1],
        Reduce::Rows => [b, 1],
        Reduce::Columns => [1, s],
    }
}

/// A group tensor as the op's `Tensor<1>` output.
fn flat(g: Tensor<2>) -> Tensor<1> {
    let [a, b] = g.dims();
    g.reshape([a * b])
}

/// A cotangent of the op's output shape as a group tensor.
fn unflat(c: Tensor<1>, reduce: Reduce, dims: [usize; 2]) -> Result<Tensor<2>, Error> {
    let shape = group_shape(reduce, dims);
    check_shape("cotangent", c.dims(), [shape[0] * shape[1]])?;
    Ok(c.reshape(shape))
}

/// `x` where `m`, else `fill` (a selection).
fn select_or(x: Tensor<2>, m: &Tensor<2, Bool>, fill: f64) -> Tensor<2> {
    x.filled(fill).mask_where(m.clone(), x)
}

fn check_inputs(
    x: &Tensor<2>,
    mask: &Tensor<2, Bool>,
    weights: Option<&Tensor<2>>,
) -> Result<(), Error> {
    check_shape("mask", mask.dims(), x.dims())?;
    if let Some(w) = weights {
        check_shape("weights", w.dims(), x.dims())?;
    }
    Ok(())
}

/// The per-position weight: `w` on valid positions (1 without weights), 0
/// elsewhere (selected).
fn valid_weight(mask: &Tensor<2, Bool>, weights: Option<Tensor<2>>) -> Tensor<2> {
    match weights {
        Some(w) => keep(w, mask),
        None => mask.clone().float(),
    }
}

/// Masked (weighted) sum per group of `reduce`, and with a cotangent its VJP.
///
/// # Formula
///
/// `out_s = Σ_{i ∈ s, maskᵢ} wᵢ xᵢ` (`wᵢ = 1` without weights), as
/// [`posttrain_core::stats::masked_sum`].
///
/// # Gradient
///
/// `∂out_s/∂xᵢ = wᵢ` at valid `i` of `s`, else 0
/// ([`posttrain_core::stats::masked_sum_vjp`]).
///
/// # Peers
///
/// verl `masked_sum` (a float mask is the weight), torchtune `masked_sum`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] when `mask`, `weights` or the cotangent do not
/// fit.
pub fn masked_sum(
    reduce: Reduce,
    values: Tensor<2>,
    mask: &Tensor<2, Bool>,
    weights: Option<Tensor<2>>,
    cotangent: Option<Tensor<1>>,
) -> Result<(Tensor<1>, Option<Tensor<2>>), Error> {
    check_inputs(&values, mask, weights.as_ref())?;
    let dims = values.dims();
    let w = valid_weight(mask, weights);
    let out = group_sum(keep(w.clone() * values, mask), reduce);
    let grad = match cotangent {
        Some(c) => {
            let c = unflat(c, reduce, dims)?.expand(dims);
            Some(keep(w * c, mask))
        }
        None => None,
    };
    Ok((flat(out), grad))
}

/// Masked (weighted) mean per group of `reduce`, and with a cotangent its VJP.
///
/// # Formula
///
/// `out_s = Σ_V wᵢ xᵢ / D_s`, `D_s = max(Σ_V wᵢ + ε, floor)`
/// ([`MomentConfig::denominator`]); a group with `D = 0` gives 0.
///
/// # Gradient
///
/// `∂out_s/∂xᵢ = wᵢ / D_s` at valid `i` (0 everywhere for `D = 0`).
///
/// # Peers
///
/// verl and torchtune `masked_mean` (`MomentConfig::preset`).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] when `mask`, `weights` or the cotangent do not
/// fit.
pub fn masked_mean(
    cfg: &MomentConfig,
    reduce: Reduce,
    values: Tensor<2>,
    mask: &Tensor<2, Bool>,
    weights: Option<Tensor<2>>,
    cotangent: Option<Tensor<1>>,
) -> Result<(Tensor<1>, Option<Tensor<2>>), Error> {
    check_inputs(&values, mask, weights.as_ref())?;
    let dims = values.dims();
    let w = valid_weight(mask, weights);
    let sum = group_sum(keep(w.clone() * values, mask), reduce);
    let d = cfg.denominator(ElemTensor(group_sum(w.clone(), reduce))).0;
    let live = d.clone().not_equal_elem(0.0);
    let out = keep(sum / d.clone(), &live);
    let grad = match cotangent {
        Some(c) => {
            let c = unflat(c, reduce, dims)?;
            let per = keep(c / d, &live).expand(dims);
            Some(keep(w * per, mask))
        }
        None => None,
    };
    Ok((flat(out), grad))
}

/// The moments of each group (shapes of [`group_sum`]).
struct Moments {
    /// Valid count `W`.
    w: Tensor<2>,
    /// Mean denominator `D`.
    d: Tensor<2>,
    /// `D ≠ 0`.
    live: Tensor<2, Bool>,
    /// Mean `m` (0 when not centering or `D = 0`).
    mean: Tensor<2>,
    /// `Σ_V (x − m)`.
    csum: Tensor<2>,
    /// `Σ_V (x − m)²`.
    sq: Tensor<2>,
}

/// The core's `moments` (`posttrain_core::stats`) per group, with the count
/// check of [`MomentConfig::check_variance_count`] (which reads the counts
/// back).
fn moments(
    cfg: &MomentConfig,
    reduce: Reduce,
    x: &Tensor<2>,
    mask: &Tensor<2, Bool>,
    center: bool,
) -> Result<Moments, Error> {
    let dims = x.dims();
    let w = group_sum(mask.clone().float(), reduce);
    for n in to_vec(w.clone()) {
        cfg.check_variance_count(n)?;
    }
    let sum = group_sum(keep(x.clone(), mask), reduce);
    let d = cfg.denominator(ElemTensor(w.clone())).0;
    let live = d.clone().not_equal_elem(0.0);
    let mean = if center {
        keep(sum / d.clone(), &live)
    } else {
        d.zeros_like()
    };
    let c = keep(x.clone() - mean.clone().expand(dims), mask);
    let csum = group_sum(c.clone(), reduce);
    let sq = group_sum(c.clone() * c, reduce);
    Ok(Moments {
        w,
        d,
        live,
        mean,
        csum,
        sq,
    })
}

/// Masked variance of all entries, and with a cotangent its VJP.
///
/// With `center = false` the input is taken as already centered (`m = 0`).
///
/// # Formula
///
/// `m = Σ_V x / D`, `v = Σ_V (x − m)² · scale` with
/// [`MomentConfig::variance_scale`], as
/// [`posttrain_core::stats::masked_variance`].
///
/// # Gradient
///
/// `∂v/∂x_j = 2·scale·(c_j − [center]·Σ_V c / D)` at valid `j`, else 0,
/// `c = x − m`, times the scalar cotangent.
///
/// # Peers
///
/// verl `masked_var` (`preset(Verl)`, centered), torchtune `masked_var`
/// (`preset(Torchtune)`, not centered).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for a mask or cotangent of the wrong shape;
/// [`Error::Invalid`] for an unbiased variance with fewer than two valid
/// entries.
pub fn masked_variance(
    cfg: &MomentConfig,
    values: Tensor<2>,
    mask: &Tensor<2, Bool>,
    center: bool,
    cotangent: Option<Tensor<1>>,
) -> Result<(Tensor<1>, Option<Tensor<2>>), Error> {
    check_inputs(&values, mask, None)?;
    let dims = values.dims();
    let m = moments(cfg, Reduce::All, &values, mask, center)?;
    let scale = cfg.variance_scale(ElemTensor(m.w.clone())).0;
    let v = m.sq.clone() * scale.clone();
    let grad = match cotangent {
        Some(c) => {
            let c = unflat(c, Reduce::All, dims)?;
            let shift = if center {
                keep(m.csum / m.d, &m.live)
            } else {
                m.mean.zeros_like()
            };
            let coef = (c * scale).mul_scalar(2.0).expand(dims);
            let dev = values - (m.mean + shift).expand(dims);
            Some(keep(coef * dev, mask))
        }
        None => None,
    };
    Ok((flat(v), grad))
}

/// Masked whitening per group of `reduce`, and with a cotangent its VJP.
///
/// # Formula
///
/// As [`posttrain_core::stats::masked_whiten`]: `m = Σ_V x / D`,
/// `v = Σ_V (x − m)² · scale`, `(r, r') = inv_std(v)`
/// ([`WhitenConfig::inv_std`]),
/// `yᵢ = zᵢ·(xᵢ − m)·r + [keep_mean]·m`, `zᵢ = maskᵢ` if `zero_masked`
/// else 1.
///
/// # Gradient
///
/// With the cotangent `g` (entries with `g = 0` skipped), `G = Σ g z`,
/// `H = Σ g z (x − m)`, `K = Σ g`, `C = Σ_V (x − m)`:
/// `dx_j = g_j z_j r + [j ∈ V]·(−r·G/D + H·r'·2·scale·(c_j − C/D) + [keep]·K/D)`.
///
/// # Peers
///
/// See [`WhitenConfig`]: verl `masked_whiten`, torchtune `whiten`, OpenRLHF
/// `masked_normalize`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for a mask or cotangent of the wrong shape;
/// [`Error::Invalid`] for an unbiased variance with fewer than two valid
/// entries in a group; [`Error::OutOfRange`] for an invalid config.
pub fn masked_whiten(
    cfg: &WhitenConfig,
    reduce: Reduce,
    values: Tensor<2>,
    mask: &Tensor<2, Bool>,
    cotangent: Option<Tensor<2>>,
) -> Result<(Tensor<2>, Option<Tensor<2>>), Error> {
    cfg.validate()?;
    check_inputs(&values, mask, None)?;
    let dims = values.dims();
    if let Some(g) = &cotangent {
        check_shape("cotangent", g.dims(), dims)?;
    }
    let m = moments(&cfg.moments, reduce, &values, mask, true)?;
    let scale = cfg.moments.variance_scale(ElemTensor(m.w.clone())).0;
    let v = m.sq.clone() * scale.clone();
    let (r, dr) = cfg.inv_std(ElemTensor(v));
    let (r, dr) = (r.0, dr.0);
    let keep_m = if cfg.keep_mean {
        m.mean.clone()
    } else {
        m.mean.zeros_like()
    };
    let z = if cfg.zero_masked {
        mask.clone()
    } else {
        mask.clone().bool_not().bool_or(mask.clone())
    };
    let centered = values.clone() - m.mean.clone().expand(dims);
    let y = centered.clone() * r.clone().expand(dims) + keep_m.clone().expand(dims);
    let out = keep_m.expand(dims).mask_where(z.clone(), y);
    let grad = cotangent.map(|g| {
        let nz = g.clone().not_equal_elem(0.0);
        let nz_z = nz.clone().bool_and(z.clone());
        let ks = group_sum(keep(g.clone(), &nz), reduce);
        let gs = group_sum(keep(g.clone(), &nz_z), reduce);
        let hs = group_sum(keep(g.clone() * centered.clone(), &nz_z), reduce);
        let d = select_or(m.d.clone(), &m.live, 1.0);
        let cbar = keep(m.csum.clone() / m.d.clone(), &m.live);
        let direct = keep(g * r.clone().expand(dims), &nz_z);
        let mut via_moments = (r.clone().neg() * gs / d.clone()).expand(dims)
            + (hs * dr * scale.mul_scalar(2.0)).expand(dims) * (centered - cbar.expand(dims));
        if cfg.keep_mean {
            via_moments = via_moments + (ks / d).expand(dims);
        }
        let on = mask.clone().bool_and(m.live.clone().expand(dims));
        direct + keep(via_moments, &on)
    });
    Ok((out, grad))
}

/// Bessel-corrected standard deviation of the non-NaN entries per group of
/// `reduce`, and with a cotangent its VJP.
///
/// # Formula
///
/// `m = nanmean(x)`, `std = √(Σ_{x≠NaN} (x − m)² / (n − 1))`; NaN where
/// fewer than two entries are non-NaN ([`posttrain_core::stats::nan_std`]).
///
/// # Gradient
///
/// `∂std/∂x_j = (x_j − m − Σ(x − m)/n) / ((n − 1)·std)` at non-NaN entries,
/// 0 at NaN entries and where the std is 0 or undefined.
///
/// # Peers
///
/// TRL `nanstd`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for a cotangent of the wrong shape.
pub fn nan_std(
    reduce: Reduce,
    values: Tensor<2>,
    cotangent: Option<Tensor<1>>,
) -> Result<(Tensor<1>, Option<Tensor<2>>), Error> {
    let dims = values.dims();
    let valid = values.clone().is_nan().bool_not();
    let n = group_sum(valid.clone().float(), reduce);
    let has = n.clone().greater_elem(0.0);
    let two = n.clone().greater_equal_elem(2.0);
    let sum = group_sum(keep(values.clone(), &valid), reduce);
    let mean = keep(sum / n.clone(), &has);
    let c = keep(values - mean.expand(dims), &valid);
    let sq = group_sum(c.clone() * c.clone(), reduce);
    let std = select_or((sq / n.clone().sub_scalar(1.0)).sqrt(), &two, f64::NAN);
    let grad = match cotangent {
        Some(g) => {
            let g = unflat(g, reduce, dims)?;
            let ok = two
                .bool_and(std.clone().greater_elem(0.0))
                .bool_and(std.clone().is_finite());
            let cbar = keep(group_sum(c.clone(), reduce) / n.clone(), &ok);
            let coef = keep(g / (n.sub_scalar(1.0) * std.clone()), &ok);
            let dx = coef.expand(dims) * (c - cbar.expand(dims));
            Some(keep(dx, &valid.bool_and(ok.expand(dims))))
        }
        None => None,
    };
    Ok((flat(std), grad))
}

/// The extreme non-NaN entry (`max` or `min`), as a `[1]` tensor; NaN when
/// every entry is NaN or there is none.
fn nan_extreme<const D: usize>(values: Tensor<D>, max: bool) -> Tensor<1> {
    if values.dims().iter().product::<usize>() == 0 {
        return Tensor::from_data(
            burn::tensor::TensorData::new(vec![f64::NAN], [1]),
            &values.device(),
        );
    }
    let valid = values.clone().is_nan().bool_not();
    let any = valid.clone().float().sum().greater_elem(0.0);
    let fill = if max {
        f64::NEG_INFINITY
    } else {
        f64::INFINITY
    };
    let x = values.filled(fill).mask_where(valid, values);
    let x = x.flatten::<1>(0, D - 1);
    let e = if max { x.max() } else { x.min() };
    e.filled(f64::NAN).mask_where(any, e)
}

/// The largest non-NaN entry, as a `[1]` tensor (NaN when there is none).
///
/// # Formula
///
/// `max { xᵢ : xᵢ ≠ NaN }` ([`posttrain_core::stats::nan_max`]; NaN entries
/// are selected to −∞ first).
///
/// # Gradient
///
/// None (a selection; TRL uses it for metrics only).
///
/// # Peers
///
/// TRL `nanmax` (NaN when nothing is left, as here).
///
/// # Errors
///
/// Never fails.
pub fn nan_max<const D: usize>(values: Tensor<D>) -> Tensor<1> {
    nan_extreme(values, true)
}

/// The smallest non-NaN entry, as a `[1]` tensor (NaN when there is none).
///
/// # Formula
///
/// `min { xᵢ : xᵢ ≠ NaN }` ([`posttrain_core::stats::nan_min`]).
///
/// # Gradient
///
/// None (a selection; TRL uses it for metrics only).
///
/// # Peers
///
/// TRL `nanmin` (NaN when nothing is left, as here).
///
/// # Errors
///
/// Never fails.
pub fn nan_min<const D: usize>(values: Tensor<D>) -> Tensor<1> {
    nan_extreme(values, false)
}
