//! Hostile inputs for the `aggregate` family (fuzz target
//! `fuzz/fuzz_targets/aggregate.rs`): loss aggregation (every mode, every
//! global normalizer, with and without the gradient buffer) and the masked
//! statistics (sum, mean, variance, whitening, nan-mean/std/max/min).
//!
//! The small conversion helpers at the top are shared by the `policy`,
//! `value`, `kl` and `controllers` targets.

use super::{assert_finite, assert_same_bits, check_gradient, decode, fill_masked};
use super::{dims, float, floats, mask, maybe_wrong_len};
use arbitrary::{Result as ArbResult, Unstructured};
use posttrain_core::aggregate::{aggregate, AggMode, GlobalNorm};
use posttrain_core::stats::{
    masked_mean, masked_mean_vjp, masked_sum, masked_sum_vjp, masked_variance, masked_whiten,
    masked_whiten_in_place, nan_max, nan_mean, nan_min, nan_std, Bessel, MomentConfig, Reduce,
    VarEps, WhitenConfig,
};
use posttrain_core::{Dims, Error, Preset, Real};

// ---------------------------------------------------------------------------
// Helpers shared by this crate's policy/value/kl/controllers targets.
// ---------------------------------------------------------------------------

/// `x` in the precision `F`.
pub(crate) fn cast<F: Real>(x: &[f64]) -> Vec<F> {
    x.iter().map(|&v| F::of(v)).collect()
}

/// `x` widened to `f64`.
pub(crate) fn wide<F: Real>(x: &[F]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

/// Non-finite values replaced by 0 (a finite copy of hostile input).
pub(crate) fn finite_only(x: &[f64]) -> Vec<f64> {
    x.iter()
        .map(|&v| if v.is_finite() { v } else { 0.0 })
        .collect()
}

/// Finite values clamped to `±lim` (non-finite ones replaced by 0): inputs
/// whose results are representable in `f32`.
pub(crate) fn tame(x: &[f64], lim: f64) -> Vec<f64> {
    finite_only(x)
        .into_iter()
        .map(|v| v.clamp(-lim, lim))
        .collect()
}

/// Panics unless `r` is an error accepted by `ok`.
#[track_caller]
pub(crate) fn expect_err<T: core::fmt::Debug>(
    what: &str,
    r: Result<T, Error>,
    ok: impl Fn(&Error) -> bool,
) {
    match r {
        Err(e) if ok(&e) => {}
        Err(e) => panic!("{what}: wrong error kind {e:?}"),
        Ok(v) => panic!("{what}: malformed input gave numbers {v:?} instead of an error"),
    }
}

/// A global-normalizer value: usually a sane positive one, sometimes an
/// invalid one (0, negative, NaN, ±inf).
pub(crate) fn norm_value(u: &mut Unstructured) -> ArbResult<f64> {
    const V: [f64; 12] = [
        1.0,
        2.0,
        3.0,
        8.0,
        64.0,
        0.5,
        1e4,
        0.0,
        -1.0,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ];
    Ok(*u.choose(&V)?)
}

/// A [`GlobalNorm`] (maybe invalid) and whether it is valid.
pub(crate) fn global_norm(u: &mut Unstructured) -> ArbResult<(GlobalNorm, bool)> {
    let mut n = GlobalNorm::default();
    if u.arbitrary()? {
        n.dp_size = norm_value(u)?;
    }
    let opt = |u: &mut Unstructured| -> ArbResult<Option<f64>> {
        Ok(if u.arbitrary()? {
            Some(norm_value(u)?)
        } else {
            None
        })
    };
    n.batch_num_tokens = opt(u)?;
    n.global_batch_size = opt(u)?;
    n.loss_scale_factor = opt(u)?;
    let ok = |v: f64| v.is_finite() && v > 0.0;
    let valid = ok(n.dp_size)
        && [n.batch_num_tokens, n.global_batch_size, n.loss_scale_factor]
            .iter()
            .all(|v| v.is_none_or(ok));
    Ok((n, valid))
}

// ---------------------------------------------------------------------------
// The target.
// ---------------------------------------------------------------------------

/// Decodes `data` into calls of this family's ops and checks the contract
/// of the [module docs](super).
pub fn run(data: &[u8]) {
    let _ = decode(data, |u| match u.int_in_range(0..=4u8)? {
        0 => agg(u),
        1 => sum_mean(u),
        2 => variance(u),
        3 => whiten(u),
        _ => nan_stats(u),
    });
}

fn agg_call<F: Real>(
    mode: AggMode,
    norm: &GlobalNorm,
    d: Dims,
    loss: &[f64],
    m: &[bool],
    with_grad: bool,
) -> Result<Vec<f64>, Error> {
    let l = cast::<F>(loss);
    if with_grad {
        let mut w = vec![F::zero(); m.len()];
        let v = aggregate(mode, norm, d, &l, m, Some(&mut w))?;
        let mut out = vec![v.to_f64()];
        out.extend(wide(&w));
        Ok(out)
    } else {
        Ok(vec![aggregate(mode, norm, d, &l, m, None)?.to_f64()])
    }
}

fn agg(u: &mut Unstructured) -> ArbResult<()> {
    let mode = *u.choose(&AggMode::ALL)?;
    let name = *u.choose(&[mode.name(), "seq-mean", "token_mean", ""])?;
    if let Err(e) = name.parse::<AggMode>() {
        assert!(matches!(e, Error::UnknownOption { .. }), "{e:?}");
    }
    let (norm, valid) = global_norm(u)?;
    let d = dims(u)?;
    let (nm, bad) = maybe_wrong_len(u, d.len())?;
    let with_grad: bool = u.arbitrary()?;
    let loss = floats(u, d.len(), 10.0, false)?;
    let m = mask(u, nm)?;
    let call = |l: &[f64], m: &[bool]| agg_call::<f64>(mode, &norm, d, l, m, with_grad);
    if bad {
        expect_err("aggregate mask length", call(&loss, &m), |e| {
            matches!(e, Error::ShapeMismatch { .. })
                || !valid && matches!(e, Error::OutOfRange { .. })
        });
        return Ok(());
    }
    if !valid {
        expect_err("aggregate norm", call(&loss, &m), |e| {
            matches!(e, Error::OutOfRange { .. })
        });
        return Ok(());
    }
    let _ = call(&loss, &m);
    let _ = agg_call::<f32>(mode, &norm, d, &loss, &m, with_grad);
    let fin = finite_only(&loss);
    let a = call(&fin, &m).unwrap();
    assert_finite("aggregate", &a);
    assert_finite(
        "aggregate f32",
        &agg_call::<f32>(mode, &norm, d, &tame(&loss, 1e4), &m, with_grad).unwrap(),
    );
    if !m.iter().any(|&b| b) {
        assert!(
            a.iter().all(|&v| v == 0.0),
            "all-masked aggregate not 0: {a:?}"
        );
    }
    let b = call(&fill_masked(&fin, &m, true), &m).unwrap();
    let a0 = call(&fill_masked(&fin, &m, false), &m).unwrap();
    assert_same_bits("aggregate masked", &a0, &b);
    // Both paths (with / without the weight buffer) agree.
    let g = agg_call::<f64>(mode, &norm, d, &fin, &m, true).unwrap();
    let v = agg_call::<f64>(mode, &norm, d, &fin, &m, false).unwrap()[0];
    assert!(
        (g[0] - v).abs() <= 1e-9 * (1.0 + v.abs() + fin.iter().map(|x| x.abs()).sum::<f64>()),
        "aggregate with/without buffer: {} vs {v}",
        g[0]
    );
    let small = tame(&loss, 100.0);
    let g = agg_call::<f64>(mode, &norm, d, &small, &m, true).unwrap();
    let value = |x: &[f64]| {
        agg_call::<f64>(mode, &norm, d, x, &m, false)
            .ok()
            .map(|v| v[0])
    };
    let n = d.len();
    check_gradient(
        "aggregate",
        &value,
        &small,
        &g[1..],
        &[0, n / 3, n / 2, n.saturating_sub(1)],
    );
    Ok(())
}

fn moment_config(u: &mut Unstructured) -> ArbResult<Result<MomentConfig, Error>> {
    const PRESETS: [Preset; 4] = [
        Preset::Trl,
        Preset::Verl,
        Preset::OpenRlhf,
        Preset::Torchtune,
    ];
    const EPS: [f64; 8] = [0.0, 1e-8, 1.0, 1e-300, -1.0, f64::NAN, f64::INFINITY, 0.5];
    Ok(if u.arbitrary()? {
        Ok(MomentConfig::preset(*u.choose(&PRESETS)?))
    } else {
        let b = *u.choose(&[Bessel::None, Bessel::Exact, Bessel::Smoothed])?;
        MomentConfig::new(*u.choose(&EPS)?, *u.choose(&EPS)?, b)
    })
}

fn reduce(u: &mut Unstructured) -> ArbResult<Result<Reduce, Error>> {
    Ok(Reduce::from_axis(*u.choose(&[
        None,
        Some(0),
        Some(1),
        Some(-1),
        Some(-2),
        Some(2),
        Some(-3),
    ])?))
}

#[allow(clippy::too_many_arguments)]
fn sum_mean_call<F: Real>(
    cfg: Option<&MomentConfig>,
    d: Dims,
    r: Reduce,
    x: &[f64],
    m: &[bool],
    w: Option<&[f64]>,
    cot: &[f64],
) -> Result<Vec<f64>, Error> {
    let (x, cot) = (cast::<F>(x), cast::<F>(cot));
    let w = w.map(cast::<F>);
    let w = w.as_deref();
    let mut out = vec![F::zero(); r.out_len(d)];
    let mut dx = vec![F::zero(); x.len()];
    match cfg {
        None => {
            masked_sum(d, r, &x, m, w, &mut out)?;
            masked_sum_vjp(d, r, m, w, &cot, &mut dx)?;
        }
        Some(c) => {
            masked_mean(c, d, r, &x, m, w, &mut out)?;
            masked_mean_vjp(c, d, r, m, w, &cot, &mut dx)?;
        }
    }
    let mut v = wide(&out);
    v.extend(wide(&dx));
    Ok(v)
}

fn sum_mean(u: &mut Unstructured) -> ArbResult<()> {
    let is_mean: bool = u.arbitrary()?;
    let cfg = moment_config(u)?;
    let r = reduce(u)?;
    let d = dims(u)?;
    let (nx, bad) = maybe_wrong_len(u, d.len())?;
    let x = floats(u, nx, 10.0, false)?;
    let m = mask(u, d.len())?;
    let w: Option<Vec<f64>> = if u.arbitrary()? {
        Some(
            floats(u, d.len(), 4.0, true)?
                .iter()
                .map(|v| v.abs().min(10.0))
                .collect(),
        )
    } else {
        None
    };
    let (r, cfg) = match (r, cfg) {
        (Ok(r), Ok(c)) => (r, c),
        (Err(e), _) | (_, Err(e)) => {
            assert!(matches!(e, Error::OutOfRange { .. }), "{e:?}");
            return Ok(());
        }
    };
    let cot = tame(&floats(u, r.out_len(d), 2.0, true)?, 2.0);
    let cfg = is_mean.then_some(&cfg);
    let w = w.as_deref();
    let call = |x: &[f64]| sum_mean_call::<f64>(cfg, d, r, x, &m, w, &cot);
    if bad {
        expect_err("masked sum/mean length", call(&x), |e| {
            matches!(e, Error::ShapeMismatch { .. })
        });
        return Ok(());
    }
    let _ = call(&x);
    let _ = sum_mean_call::<f32>(cfg, d, r, &x, &m, w, &cot);
    let fin = finite_only(&x);
    assert_finite("masked sum/mean", &call(&fin).unwrap());
    assert_finite(
        "masked sum/mean f32",
        &sum_mean_call::<f32>(cfg, d, r, &tame(&x, 1e4), &m, w, &cot).unwrap(),
    );
    let a = call(&fill_masked(&fin, &m, false)).unwrap();
    let b = call(&fill_masked(&fin, &m, true)).unwrap();
    assert_same_bits("masked sum/mean masked", &a, &b);
    let small = tame(&x, 100.0);
    let g = call(&small).unwrap();
    let k = r.out_len(d);
    let value = |y: &[f64]| {
        let v = call(y).ok()?;
        Some(v[..k].iter().zip(&cot).map(|(a, b)| a * b).sum())
    };
    let n = d.len();
    check_gradient(
        "masked sum/mean",
        &value,
        &small,
        &g[k..],
        &[0, n / 2, n.saturating_sub(1)],
    );
    Ok(())
}

fn var_call<F: Real>(
    cfg: &MomentConfig,
    x: &[f64],
    m: &[bool],
    center: bool,
    cot: f64,
) -> Result<Vec<f64>, Error> {
    let x = cast::<F>(x);
    let mut dx = vec![F::zero(); x.len()];
    let v = masked_variance(cfg, &x, m, center, Some((F::of(cot), &mut dx)))?;
    let v2 = masked_variance(cfg, &x, m, center, None)?;
    assert_eq!(
        v.to_f64().to_bits(),
        v2.to_f64().to_bits(),
        "variance with/without grad"
    );
    let mut out = vec![v.to_f64()];
    out.extend(wide(&dx));
    Ok(out)
}

fn variance(u: &mut Unstructured) -> ArbResult<()> {
    let Ok(cfg) = moment_config(u)? else {
        return Ok(());
    };
    let n = u.int_in_range(0..=20usize)?;
    let (nm, bad) = maybe_wrong_len(u, n)?;
    let x = floats(u, n, 10.0, false)?;
    let m = mask(u, nm)?;
    let center: bool = u.arbitrary()?;
    let cot = float(u, 2.0, false)?.clamp(-2.0, 2.0);
    let call = |x: &[f64]| var_call::<f64>(&cfg, x, &m, center, cot);
    if bad {
        expect_err("variance length", call(&x), |e| {
            matches!(e, Error::ShapeMismatch { .. })
        });
        return Ok(());
    }
    let _ = call(&x);
    let _ = var_call::<f32>(&cfg, &x, &m, center, cot);
    let fin = finite_only(&x);
    let valid = m.iter().filter(|&&b| b).count();
    let r = call(&fin);
    if cfg.bessel == Bessel::Exact && valid < 2 {
        expect_err("variance of < 2", r, |e| matches!(e, Error::Invalid { .. }));
        return Ok(());
    }
    let Ok(r) = r else {
        // Smoothed Bessel with a degenerate count: a typed error is fine.
        return Ok(());
    };
    assert_finite("variance", &r);
    if valid == 0 {
        assert!(
            r.iter().all(|&v| v == 0.0),
            "all-masked variance not 0: {r:?}"
        );
    }
    assert_finite(
        "variance f32",
        &var_call::<f32>(&cfg, &tame(&x, 1e4), &m, center, cot).unwrap(),
    );
    let a = call(&fill_masked(&fin, &m, false)).unwrap();
    let b = call(&fill_masked(&fin, &m, true)).unwrap();
    assert_same_bits("variance masked", &a, &b);
    let small = tame(&x, 100.0);
    let g = call(&small).unwrap();
    let value = |y: &[f64]| call(y).ok().map(|v| v[0] * cot);
    check_gradient(
        "variance",
        &value,
        &small,
        &g[1..],
        &[0, n / 2, n.saturating_sub(1)],
    );
    Ok(())
}

fn whiten_call<F: Real>(
    cfg: &WhitenConfig,
    d: Dims,
    r: Reduce,
    x: &[f64],
    m: &[bool],
    cot: &[f64],
) -> Result<Vec<f64>, Error> {
    let (xf, cot) = (cast::<F>(x), cast::<F>(cot));
    let mut out = vec![F::zero(); xf.len()];
    let mut dx = vec![F::zero(); xf.len()];
    masked_whiten(cfg, d, r, &xf, m, &mut out, Some((&cot, &mut dx)))?;
    let mut inplace = xf.clone();
    masked_whiten_in_place(cfg, d, r, &mut inplace, m)?;
    let (o, ip) = (wide(&out), wide(&inplace));
    for (a, b) in o.iter().zip(&ip) {
        assert!(
            a.to_bits() == b.to_bits() || a.is_nan() && b.is_nan(),
            "whiten vs in place: {a:e} {b:e}"
        );
    }
    let mut v = o;
    v.extend(wide(&dx));
    Ok(v)
}

fn whiten(u: &mut Unstructured) -> ArbResult<()> {
    const PRESETS: [Preset; 4] = [
        Preset::Trl,
        Preset::Verl,
        Preset::OpenRlhf,
        Preset::Torchtune,
    ];
    let mut cfg = WhitenConfig::preset(*u.choose(&PRESETS)?);
    if u.arbitrary()? {
        let Ok(mc) = moment_config(u)? else {
            return Ok(());
        };
        cfg.moments = mc;
        let e = *u.choose(&[1e-8, 1e-5, 0.0, -1.0, f64::NAN, f64::INFINITY])?;
        cfg.var_eps = if u.arbitrary()? {
            VarEps::Add(e)
        } else {
            VarEps::Floor(e)
        };
        cfg.keep_mean = u.arbitrary()?;
        cfg.zero_masked = u.arbitrary()?;
    }
    let Ok(r) = reduce(u)? else {
        return Ok(());
    };
    let d = dims(u)?;
    let (nm, bad) = maybe_wrong_len(u, d.len())?;
    let x = floats(u, d.len(), 10.0, false)?;
    let m = mask(u, nm)?;
    let cot = tame(&floats(u, d.len(), 2.0, true)?, 2.0);
    let call = |x: &[f64], cot: &[f64]| whiten_call::<f64>(&cfg, d, r, x, &m, cot);
    let e = match cfg.var_eps {
        VarEps::Add(e) | VarEps::Floor(e) => e,
    };
    if !(e.is_finite() && e > 0.0) {
        expect_err("whiten var_eps", call(&x, &cot), |e| {
            matches!(e, Error::OutOfRange { .. })
        });
        return Ok(());
    }
    if bad {
        expect_err("whiten length", call(&x, &cot), |e| {
            matches!(e, Error::ShapeMismatch { .. })
        });
        return Ok(());
    }
    let _ = call(&x, &cot);
    let _ = whiten_call::<f32>(&cfg, d, r, &x, &m, &cot);
    let fin = finite_only(&x);
    let Ok(a) = call(&fin, &cot) else {
        return Ok(()); // unbiased variance of < 2 entries: a typed error
    };
    assert_finite("whiten", &a);
    // Huge inputs: the normalised values stay finite in f32 too.
    assert_finite(
        "whiten f32",
        &whiten_call::<f32>(&cfg, d, r, &tame(&x, 1e4), &m, &cot).unwrap(),
    );
    // Masked invariance. verl/torchtune whiten every position (`zero_masked =
    // false`), so a masked position's own output legitimately reads its
    // padding; compare the valid outputs, and every gradient with the
    // cotangent of masked positions set to 0.
    let cot_v: Vec<f64> = cot
        .iter()
        .zip(&m)
        .map(|(&c, &b)| if b { c } else { 0.0 })
        .collect();
    let n = d.len();
    let a = call(&fill_masked(&fin, &m, false), &cot_v).unwrap();
    let b = call(&fill_masked(&fin, &m, true), &cot_v).unwrap();
    let pick = |v: &[f64]| -> Vec<f64> {
        let mut o: Vec<f64> = (0..n)
            .filter(|&i| m[i] || cfg.zero_masked)
            .map(|i| v[i])
            .collect();
        o.extend(&v[n..]);
        o
    };
    assert_same_bits("whiten masked", &pick(&a), &pick(&b));
    // Gradient: only where the variance is well away from the epsilon.
    let small = super::policy::fd_point(&x, 10.0);
    // Near-constant groups (variance ≈ var_eps) are too curved for the probe.
    let (lo, hi) = (0..n)
        .filter(|&i| m[i])
        .fold((f64::MAX, f64::MIN), |(a, b), i| {
            (a.min(small[i]), b.max(small[i]))
        });
    if hi - lo < 0.5 {
        return Ok(());
    }
    let g = call(&small, &cot).unwrap();
    if g[n..].iter().any(|v| v.abs() > 50.0) {
        return Ok(()); // near-constant group: too curved for a finite difference
    }
    let value = |y: &[f64]| {
        let v = call(y, &cot).ok()?;
        Some(v[..n].iter().zip(&cot).map(|(a, b)| a * b).sum())
    };
    check_gradient(
        "whiten",
        &value,
        &small,
        &g[n..],
        &[0, n / 2, n.saturating_sub(1)],
    );
    Ok(())
}

/// nan-mean, nan-std and the nan-std gradient.
type NanStats = (Vec<f64>, Vec<f64>, Vec<f64>);

fn nan_stats(u: &mut Unstructured) -> ArbResult<()> {
    let Ok(r) = reduce(u)? else {
        return Ok(());
    };
    let d = dims(u)?;
    let (nx, bad) = maybe_wrong_len(u, d.len())?;
    let x = floats(u, nx, 10.0, false)?;
    let k = r.out_len(d);
    let cot = tame(&floats(u, k, 2.0, true)?, 2.0);
    let call = |x: &[f64]| -> Result<NanStats, Error> {
        let mut mean = vec![0.0; k];
        nan_mean(d, r, x, &mut mean)?;
        let mut std = vec![0.0; k];
        let mut dx = vec![0.0; x.len()];
        nan_std(d, r, x, &mut std, Some((&cot, &mut dx)))?;
        Ok((mean, std, dx))
    };
    let _ = nan_max(&x);
    let _ = nan_min(&x);
    let _ = nan_max(&cast::<f32>(&x));
    if bad {
        expect_err("nan stats length", call(&x), |e| {
            matches!(e, Error::ShapeMismatch { .. })
        });
        return Ok(());
    }
    let _ = call(&x).unwrap();
    // NaN entries are skipped: they change nothing compared with a call on
    // the non-NaN entries alone (checked by the all-reduce form).
    if r == Reduce::All && d.len() == x.len() {
        let kept: Vec<f64> = x.iter().copied().filter(|v| !v.is_nan()).collect();
        let mut a = vec![0.0; 1];
        nan_mean(Dims::new(1, kept.len()), Reduce::All, &kept, &mut a).unwrap();
        let mut b = vec![0.0; 1];
        nan_mean(d, Reduce::All, &x, &mut b).unwrap();
        assert_same_bits("nan_mean skips NaN", &a, &b);
    }
    // Finite entries → finite mean (≥ 1 member) and std/gradient (≥ 2).
    let fin = finite_only(&x);
    let (mean, std, dx) = call(&fin).unwrap();
    let members = match r {
        Reduce::All => d.len(),
        Reduce::Rows => d.seq,
        Reduce::Columns => d.batch,
    };
    if members >= 1 {
        assert_finite("nan_mean", &mean);
    }
    if members >= 2 {
        assert_finite("nan_std", &std);
    }
    assert_finite("nan_std grad", &dx);
    if let Some(v) = nan_max(&fin) {
        assert!(v.is_finite());
    }
    let small = tame(&x, 100.0);
    let (_, _, g) = call(&small).unwrap();
    let value = |y: &[f64]| {
        let (_, s, _) = call(y).ok()?;
        let v: f64 = s.iter().zip(&cot).map(|(a, b)| a * b).sum();
        v.is_finite().then_some(v)
    };
    let n = d.len();
    check_gradient(
        "nan_std",
        &value,
        &small,
        &g,
        &[0, n / 2, n.saturating_sub(1)],
    );
    Ok(())
}
