//! Handlers for the `aggregate` family: masked statistics and whitening
//! (this part), and loss aggregation.

use crate::case::{Ctx, Fail, OpResult, Outputs};
use posttrain_core::stats::{
    masked_mean, masked_mean_vjp, masked_sum, masked_sum_vjp, masked_variance, masked_whiten,
    nan_max, nan_min, nan_std, Bessel, MomentConfig, Reduce, VarEps, WhitenConfig,
};
use posttrain_core::{Dims, Preset, Real};
use serde_json::Value;

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    run_stats::<F>(op, ctx)
}

// ---------------------------------------------------------------------------
// Masked statistics (advantage/statistics helper's part of this file).
// ---------------------------------------------------------------------------

fn run_stats<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    match op {
        "verl.masked_sum" => Some(stats_sum::<F>(ctx, "values", "axis", "result")),
        "torchtune.masked_sum" => Some(stats_sum::<F>(ctx, "x", "dim", "sum")),
        "verl.masked_mean" => Some(stats_mean::<F>(
            ctx,
            Preset::Verl,
            "values",
            "axis",
            "result",
        )),
        "torchtune.masked_mean" => {
            Some(stats_mean::<F>(ctx, Preset::Torchtune, "x", "dim", "mean"))
        }
        "verl.masked_var" => Some(stats_var::<F>(ctx, Preset::Verl)),
        "torchtune.masked_var" => Some(stats_var::<F>(ctx, Preset::Torchtune)),
        "verl.masked_whiten" => Some(stats_whiten::<F>(ctx, Preset::Verl)),
        "torchtune.whiten" => Some(stats_whiten::<F>(ctx, Preset::Torchtune)),
        "openrlhf.masked_normalize" => Some(stats_whiten::<F>(ctx, Preset::OpenRlhf)),
        "trl.nanstd" => Some(stats_nanstd::<F>(ctx)),
        "trl.nanmax" => Some(stats_nan_extreme::<F>(ctx, true)),
        "trl.nanmin" => Some(stats_nan_extreme::<F>(ctx, false)),
        _ => None,
    }
}

/// A 2-D input's dims (a 1-D input is one row).
pub(crate) fn stats_dims(ctx: &Ctx, name: &str) -> Result<Dims, Fail> {
    let s = ctx.shape(name)?;
    Ok(match s.len() {
        1 => Dims::new(1, s[0]),
        _ => ctx.dims(name)?,
    })
}

pub(crate) fn stats_axis(ctx: &Ctx, key: &str) -> Result<Reduce, Fail> {
    let axis = match ctx.param(key) {
        None | Some(Value::Null) => None,
        Some(_) => Some(ctx.p_i64(key)?),
    };
    Ok(Reduce::from_axis(axis)?)
}

/// The mask as booleans plus, for a float mask, its weights.
pub(crate) fn stats_mask<F: Real>(
    ctx: &Ctx,
    name: &str,
) -> Result<(Vec<bool>, Option<Vec<F>>), Fail> {
    let mask = ctx.mask(name)?;
    let weights = if ctx.dtype(name)? != "bool" {
        Some(ctx.f::<F>(name)?)
    } else {
        None
    };
    Ok((mask, weights))
}

fn stats_sum<F: Real>(ctx: &Ctx, input: &str, axis_key: &str, out_name: &str) -> OpResult {
    let x = ctx.f::<F>(input)?;
    let dims = stats_dims(ctx, input)?;
    let (mask, w) = stats_mask::<F>(ctx, "mask")?;
    let reduce = stats_axis(ctx, axis_key)?;
    let mut out = vec![F::zero(); reduce.out_len(dims)];
    masked_sum(dims, reduce, &x, &mask, w.as_deref(), &mut out)?;
    let mut o = Outputs::new();
    o.put(out_name, &out);
    if let Some(cot) = ctx.cotangent::<F>(out_name)? {
        let mut dx = vec![F::zero(); x.len()];
        masked_sum_vjp(dims, reduce, &mask, w.as_deref(), &cot, &mut dx)?;
        o.grad(input, &dx);
    }
    Ok(o)
}

fn stats_mean<F: Real>(
    ctx: &Ctx,
    preset: Preset,
    input: &str,
    axis_key: &str,
    out_name: &str,
) -> OpResult {
    let x = ctx.f::<F>(input)?;
    let dims = stats_dims(ctx, input)?;
    let (mask, w) = stats_mask::<F>(ctx, "mask")?;
    let reduce = stats_axis(ctx, axis_key)?;
    let cfg = MomentConfig::preset(preset);
    let mut out = vec![F::zero(); reduce.out_len(dims)];
    masked_mean(&cfg, dims, reduce, &x, &mask, w.as_deref(), &mut out)?;
    let mut o = Outputs::new();
    o.put(out_name, &out);
    if let Some(cot) = ctx.cotangent::<F>(out_name)? {
        let mut dx = vec![F::zero(); x.len()];
        masked_mean_vjp(&cfg, dims, reduce, &mask, w.as_deref(), &cot, &mut dx)?;
        o.grad(input, &dx);
    }
    Ok(o)
}

/// `masked_var`'s parameters: `(input, output, center, config)`.
pub(crate) fn var_setup(
    ctx: &Ctx,
    preset: Preset,
) -> Result<(&'static str, &'static str, bool, MomentConfig), Fail> {
    let (input, out_name, center) = match preset {
        Preset::Torchtune => ("centered_values", "var", false),
        _ => ("values", "variance", true),
    };
    let mut cfg = MomentConfig::preset(preset);
    if !ctx.p_bool("unbiased")? {
        cfg.bessel = Bessel::None;
    }
    Ok((input, out_name, center, cfg))
}

fn stats_var<F: Real>(ctx: &Ctx, preset: Preset) -> OpResult {
    let (input, out_name, center, cfg) = var_setup(ctx, preset)?;
    let x = ctx.f::<F>(input)?;
    let mask = ctx.mask("mask")?;
    let mut o = Outputs::new();
    match ctx.cotangent::<F>(out_name)? {
        Some(cot) => {
            let mut dx = vec![F::zero(); x.len()];
            let v = masked_variance(&cfg, &x, &mask, center, Some((cot[0], &mut dx)))?;
            o.scalar(out_name, v).grad(input, &dx);
        }
        None => {
            let v = masked_variance(&cfg, &x, &mask, center, None)?;
            o.scalar(out_name, v);
        }
    }
    Ok(o)
}

/// A whitening case's parameters.
pub(crate) struct WhitenSetup {
    /// The input's name.
    pub input: &'static str,
    /// The output's name.
    pub output: &'static str,
    /// The config.
    pub cfg: WhitenConfig,
    /// The groups.
    pub reduce: Reduce,
    /// The mask (all true when the case has none).
    pub mask: Vec<bool>,
}

/// Parses a whitening case (verl `masked_whiten`, torchtune `whiten`,
/// OpenRLHF `masked_normalize`).
pub(crate) fn whiten_setup(ctx: &Ctx, preset: Preset) -> Result<WhitenSetup, Fail> {
    let (input, mask_name) = match preset {
        Preset::Verl => ("values", "mask"),
        Preset::OpenRlhf => ("tensor", "mask"),
        _ => ("x", "mask"),
    };
    let n = ctx.shape(input)?.iter().product::<usize>();
    let mut cfg = WhitenConfig::preset(preset);
    let mut reduce = Reduce::All;
    let mask = match preset {
        Preset::Verl => {
            cfg.keep_mean = !ctx.p_bool("shift_mean")?;
            ctx.mask(mask_name)?
        }
        Preset::Torchtune => {
            cfg.keep_mean = ctx.p_bool("shift_mean")?;
            match ctx.mask_opt(mask_name)? {
                Some(m) => m,
                None => {
                    // `x.mean()`, `x.var()`: exact count, unbiased.
                    cfg.moments = MomentConfig::preset(Preset::Trl);
                    vec![true; n]
                }
            }
        }
        _ => {
            if ctx.p_i64("dim")? != 1 {
                return Err(ctx.unsupported("dim"));
            }
            cfg.var_eps = VarEps::Floor(ctx.p_f64("eps")?);
            reduce = Reduce::Rows;
            ctx.mask(mask_name)?
        }
    };
    cfg.validate()?;
    let output = if preset == Preset::OpenRlhf {
        "normalized"
    } else {
        "whitened"
    };
    Ok(WhitenSetup {
        input,
        output,
        cfg,
        reduce,
        mask,
    })
}

fn stats_whiten<F: Real>(ctx: &Ctx, preset: Preset) -> OpResult {
    let WhitenSetup {
        input,
        output: name,
        cfg,
        reduce,
        mask,
    } = whiten_setup(ctx, preset)?;
    let x = ctx.f::<F>(input)?;
    let dims = stats_dims(ctx, input)?;
    let mut out = vec![F::zero(); x.len()];
    let mut o = Outputs::new();
    match ctx.cotangent::<F>(name)? {
        Some(cot) => {
            let mut dx = vec![F::zero(); x.len()];
            masked_whiten(
                &cfg,
                dims,
                reduce,
                &x,
                &mask,
                &mut out,
                Some((&cot, &mut dx)),
            )?;
            o.grad(input, &dx);
        }
        None => masked_whiten(&cfg, dims, reduce, &x, &mask, &mut out, None)?,
    }
    o.put(name, &out);
    Ok(o)
}

/// `nanstd`'s `dim` as a [`Reduce`] of a 2-D tensor.
pub(crate) fn nanstd_reduce(ctx: &Ctx) -> Result<Reduce, Fail> {
    Ok(match ctx.param("dim") {
        None | Some(Value::Null) => Reduce::All,
        Some(Value::Array(a)) => {
            let mut v: Vec<i64> = a.iter().filter_map(|x| x.as_i64()).collect();
            v.iter_mut().for_each(|d| {
                if *d < 0 {
                    *d += 2
                }
            });
            v.sort_unstable();
            v.dedup();
            match v.as_slice() {
                [0, 1] => Reduce::All,
                [0] => Reduce::Columns,
                [1] => Reduce::Rows,
                _ => return Err(ctx.unsupported("dim")),
            }
        }
        Some(_) => Reduce::from_axis(Some(ctx.p_i64("dim")?))?,
    })
}

fn stats_nanstd<F: Real>(ctx: &Ctx) -> OpResult {
    let x = ctx.f::<F>("tensor")?;
    let dims = stats_dims(ctx, "tensor")?;
    let reduce = nanstd_reduce(ctx)?;
    let mut out = vec![F::zero(); reduce.out_len(dims)];
    let mut o = Outputs::new();
    match ctx.cotangent::<F>("std")? {
        Some(cot) => {
            let mut dx = vec![F::zero(); x.len()];
            nan_std(dims, reduce, &x, &mut out, Some((&cot, &mut dx)))?;
            o.grad("tensor", &dx);
        }
        None => nan_std(dims, reduce, &x, &mut out, None)?,
    }
    o.put("std", &out);
    Ok(o)
}

fn stats_nan_extreme<F: Real>(ctx: &Ctx, max: bool) -> OpResult {
    let x = ctx.f::<F>("tensor")?;
    let v = if max { nan_max(&x) } else { nan_min(&x) };
    let mut o = Outputs::new();
    o.scalar("value", v.unwrap_or(F::nan()));
    Ok(o)
}
