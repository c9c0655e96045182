//! KL estimators and loss aggregation on burn tensors.

use super::{as2, f2, global_norm};
use crate::case::{Ctx, OpResult, Outputs};
use crate::ops::logits::cot_vec;
use posttrain_burn::{mask2, to_vec, Device};
use posttrain_core::aggregate::AggMode;
use posttrain_core::kl::{KlConfig, KlEstimator};
use posttrain_core::Preset;

/// Runs `op` if it is a KL or aggregation op.
pub fn run(op: &str, ctx: &Ctx, d: &Device) -> Option<OpResult> {
    Some(match op {
        "verl.kl_penalty" | "verl.kl_penalty_forward" => {
            KlConfig::parse_verl(ctx.p_str("kl_penalty").unwrap_or(""))
                .map_err(|_| ctx.unsupported("kl_penalty"))
                .and_then(|cfg| kl(ctx, d, &cfg, "logprob", "ref_logprob", "kl_estimate"))
        }
        "openrlhf.compute_approx_kl" => {
            let est = match ctx.p_str("kl_estimator") {
                Ok("k1") => KlEstimator::K1,
                Ok("k2") => KlEstimator::K2,
                Ok("k3") => KlEstimator::K3,
                _ => return Some(Err(ctx.unsupported("kl_estimator"))),
            };
            let cfg = KlConfig::preset(est, Preset::OpenRlhf);
            kl(ctx, d, &cfg, "log_probs", "log_probs_base", "kl")
        }
        "verl.agg_loss" => match ctx.p_str("loss_agg_mode").map(str::parse::<AggMode>) {
            Ok(Ok(mode)) => agg(ctx, d, mode, "loss_mat", true),
            _ => Err(ctx.unsupported("loss_agg_mode")),
        },
        "openrlhf.aggregate_loss" => ctx.p_bool("token_level_loss").and_then(|tok| {
            let mode = if tok {
                AggMode::TokenMean
            } else {
                AggMode::SeqMeanTokenMean
            };
            agg(ctx, d, mode, "loss", false)
        }),
        _ => return None,
    })
}

fn kl(ctx: &Ctx, d: &Device, cfg: &KlConfig, lp: &str, rf: &str, out: &str) -> OpResult {
    let shape = as2(&ctx.shape(lp)?);
    let n = shape[0] * shape[1];
    let mask = mask2(&vec![true; n], shape, d)?;
    let est = posttrain_burn::kl::kl_estimate(
        cfg,
        f2(ctx, lp, shape, d)?,
        f2(ctx, rf, shape, d)?,
        &mask,
    )?;
    let mut o = Outputs::new();
    if let Some(c) = cot_vec::<f64>(ctx, out, n)? {
        let g: Vec<f64> = to_vec(est.grad)
            .iter()
            .zip(&c)
            .map(|(g, c)| g * c)
            .collect();
        o.grad(lp, &g);
    }
    o.put(out, &to_vec(est.value));
    Ok(o)
}

fn agg(ctx: &Ctx, d: &Device, mode: AggMode, loss_name: &str, scale: bool) -> OpResult {
    let norm = global_norm(ctx, scale)?;
    let shape = as2(&ctx.shape(loss_name)?);
    let loss = f2(ctx, loss_name, shape, d)?;
    let mask = ctx.mask("loss_mask")?;
    let mask = mask2(&mask, shape, d)?;
    let out = posttrain_burn::aggregate::aggregate(mode, &norm, loss, &mask)?;
    let c = ctx.cot_scalar::<f64>("loss")?;
    let g: Vec<f64> = to_vec(out.weights).iter().map(|w| w * c).collect();
    let mut o = Outputs::new();
    o.scalar("loss", to_vec(out.value)[0]).grad(loss_name, &g);
    Ok(o)
}
