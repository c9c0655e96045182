//! Masked statistics and whitening on burn tensors (the `aggregate` family's
//! statistics half; reached through `burn::sequence::run`).

use super::f2;
use crate::case::{Ctx, OpResult, Outputs};
use crate::ops::aggregate::{
    nanstd_reduce, stats_axis, stats_dims, stats_mask, var_setup, whiten_setup, WhitenSetup,
};
use posttrain_burn::{mask2, tensor1, tensor2, to_vec, Device};
use posttrain_core::stats::MomentConfig;
use posttrain_core::{Dims, Preset};

/// Runs `op` if it is a masked-statistics op.
pub fn run(op: &str, ctx: &Ctx, d: &Device) -> Option<OpResult> {
    Some(match op {
        "verl.masked_sum" => sum(ctx, d, "values", "axis", "result"),
        "torchtune.masked_sum" => sum(ctx, d, "x", "dim", "sum"),
        "verl.masked_mean" => mean(ctx, d, Preset::Verl, "values", "axis", "result"),
        "torchtune.masked_mean" => mean(ctx, d, Preset::Torchtune, "x", "dim", "mean"),
        "verl.masked_var" => var(ctx, d, Preset::Verl),
        "torchtune.masked_var" => var(ctx, d, Preset::Torchtune),
        "verl.masked_whiten" => whiten(ctx, d, Preset::Verl),
        "torchtune.whiten" => whiten(ctx, d, Preset::Torchtune),
        "openrlhf.masked_normalize" => whiten(ctx, d, Preset::OpenRlhf),
        "trl.nanstd" => nanstd(ctx, d),
        "trl.nanmax" => extreme(ctx, d, true),
        "trl.nanmin" => extreme(ctx, d, false),
        _ => return None,
    })
}

fn shape(dims: Dims) -> [usize; 2] {
    [dims.batch, dims.seq]
}

fn sum(ctx: &Ctx, d: &Device, input: &str, axis_key: &str, out_name: &str) -> OpResult {
    let shape = shape(stats_dims(ctx, input)?);
    let x = f2(ctx, input, shape, d)?;
    let (mask, w) = stats_mask::<f64>(ctx, "mask")?;
    let mask = mask2(&mask, shape, d)?;
    let w = w.map(|w| tensor2(&w, shape, d)).transpose()?;
    let reduce = stats_axis(ctx, axis_key)?;
    let cot = ctx.cotangent::<f64>(out_name)?.map(|c| tensor1(&c, d));
    let (out, g) = posttrain_burn::stats::masked_sum(reduce, x, &mask, w, cot)?;
    let mut o = Outputs::new();
    o.put(out_name, &to_vec(out));
    if let Some(g) = g {
        o.grad(input, &to_vec(g));
    }
    Ok(o)
}

fn mean(
    ctx: &Ctx,
    d: &Device,
    preset: Preset,
    input: &str,
    axis_key: &str,
    out_name: &str,
) -> OpResult {
    let shape = shape(stats_dims(ctx, input)?);
    let x = f2(ctx, input, shape, d)?;
    let (mask, w) = stats_mask::<f64>(ctx, "mask")?;
    let mask = mask2(&mask, shape, d)?;
    let w = w.map(|w| tensor2(&w, shape, d)).transpose()?;
    let reduce = stats_axis(ctx, axis_key)?;
    let cfg = MomentConfig::preset(preset);
    let cot = ctx.cotangent::<f64>(out_name)?.map(|c| tensor1(&c, d));
    let (out, g) = posttrain_burn::stats::masked_mean(&cfg, reduce, x, &mask, w, cot)?;
    let mut o = Outputs::new();
    o.put(out_name, &to_vec(out));
    if let Some(g) = g {
        o.grad(input, &to_vec(g));
    }
    Ok(o)
}

fn var(ctx: &Ctx, d: &Device, preset: Preset) -> OpResult {
    let (input, out_name, center, cfg) = var_setup(ctx, preset)?;
    let n = ctx.shape(input)?.iter().product::<usize>();
    let shape = [1, n];
    let x = f2(ctx, input, shape, d)?;
    let mask = mask2(&ctx.mask("mask")?, shape, d)?;
    let cot = ctx
        .cotangent::<f64>(out_name)?
        .map(|c| tensor1(&c[..1.min(c.len())], d));
    let (v, g) = posttrain_burn::stats::masked_variance(&cfg, x, &mask, center, cot)?;
    let mut o = Outputs::new();
    o.scalar(out_name, to_vec(v)[0]);
    if let Some(g) = g {
        o.grad(input, &to_vec(g));
    }
    Ok(o)
}

fn whiten(ctx: &Ctx, d: &Device, preset: Preset) -> OpResult {
    let WhitenSetup {
        input,
        output,
        cfg,
        reduce,
        mask,
    } = whiten_setup(ctx, preset)?;
    let shape = shape(stats_dims(ctx, input)?);
    let x = f2(ctx, input, shape, d)?;
    let mask = mask2(&mask, shape, d)?;
    let cot = ctx
        .cotangent::<f64>(output)?
        .map(|c| tensor2(&c, shape, d))
        .transpose()?;
    let (y, g) = posttrain_burn::stats::masked_whiten(&cfg, reduce, x, &mask, cot)?;
    let mut o = Outputs::new();
    o.put(output, &to_vec(y));
    if let Some(g) = g {
        o.grad(input, &to_vec(g));
    }
    Ok(o)
}

fn nanstd(ctx: &Ctx, d: &Device) -> OpResult {
    let shape = shape(stats_dims(ctx, "tensor")?);
    let x = f2(ctx, "tensor", shape, d)?;
    let reduce = nanstd_reduce(ctx)?;
    let cot = ctx.cotangent::<f64>("std")?.map(|c| tensor1(&c, d));
    let (s, g) = posttrain_burn::stats::nan_std(reduce, x, cot)?;
    let mut o = Outputs::new();
    if let Some(g) = g {
        o.grad("tensor", &to_vec(g));
    }
    o.put("std", &to_vec(s));
    Ok(o)
}

fn extreme(ctx: &Ctx, d: &Device, max: bool) -> OpResult {
    let x = tensor1(&ctx.f::<f64>("tensor")?, d);
    let v = if max {
        posttrain_burn::stats::nan_max(x)
    } else {
        posttrain_burn::stats::nan_min(x)
    };
    let mut o = Outputs::new();
    o.scalar("value", to_vec(v)[0]);
    Ok(o)
}
