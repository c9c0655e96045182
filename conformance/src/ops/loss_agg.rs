//! Handlers for loss aggregation (`posttrain_core::aggregate`).

use crate::case::{Ctx, Fail, OpResult, Outputs};
use posttrain_core::aggregate::{aggregate, AggMode, GlobalNorm};
use posttrain_core::Real;

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    Some(match op {
        "verl.agg_loss" => {
            let mode = ctx.p_str("loss_agg_mode").and_then(|m| {
                m.parse::<AggMode>()
                    .map_err(|_| ctx.unsupported("loss_agg_mode"))
            });
            mode.and_then(|mode| agg::<F>(ctx, mode, "loss_mat", "loss_mask", true))
        }
        // OpenRLHF: token-level loss = token-mean, otherwise a mean over
        // sequences of each sequence's token mean (`+1e-8`, empty rows excluded).
        "openrlhf.aggregate_loss" => ctx.p_bool("token_level_loss").and_then(|tok| {
            let mode = if tok {
                AggMode::TokenMean
            } else {
                AggMode::SeqMeanTokenMean
            };
            agg::<F>(ctx, mode, "loss", "loss_mask", false)
        }),
        _ => return None,
    })
}

/// Reads verl's / OpenRLHF's normalizer parameters.
pub fn global_norm(ctx: &Ctx, with_scale_factor: bool) -> Result<GlobalNorm, Fail> {
    Ok(GlobalNorm {
        dp_size: ctx.p_opt_f64("dp_size")?.unwrap_or(1.0),
        batch_num_tokens: ctx.p_opt_f64("batch_num_tokens")?,
        global_batch_size: ctx.p_opt_f64("global_batch_size")?,
        loss_scale_factor: if with_scale_factor {
            ctx.p_opt_f64("loss_scale_factor")?
        } else {
            None
        },
    })
}

fn agg<F: Real>(
    ctx: &Ctx,
    mode: AggMode,
    loss_name: &str,
    mask_name: &str,
    scale: bool,
) -> OpResult {
    let norm = global_norm(ctx, scale)?;
    let dims = ctx.dims(loss_name)?;
    let loss = ctx.f::<F>(loss_name)?;
    let mask = ctx.mask(mask_name)?;
    let mut w = vec![F::zero(); loss.len()];
    let l = aggregate(mode, &norm, dims, &loss, &mask, Some(&mut w))?;
    let c = ctx.cot_scalar::<F>("loss")?;
    let g: Vec<F> = w.iter().map(|&x| x * c).collect();
    let mut o = Outputs::new();
    o.scalar("loss", l).grad(loss_name, &g);
    Ok(o)
}
