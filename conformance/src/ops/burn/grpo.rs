//! TRL's GRPO-family losses (`grpo_loss`, `gspo_token_loss`, `gmpo_loss`,
//! `rloo_loss`) and VESPO's gamma weights on burn tensors: handlers for the
//! `burn-*` backends. Parameters are parsed by the core handlers' own
//! functions ([`crate::ops::grpo`]); the math runs in [`posttrain_burn::grpo`].

use super::as2;
use crate::case::{Ctx, Fail, OpResult, Outputs};
use crate::ops::grpo::{
    gamma_config, gmpo_config, grpo_config, is_ratio_per_row, loss_mask, put_clip, rloo_config,
};
use posttrain_burn::grpo::{ClipMetricTensors, GrpoTensors, IsRatio};
use posttrain_burn::{mask2, tensor1, tensor2, to_vec, Device, Tensor};
use posttrain_core::policy::grpo::{ClipMetrics, GrpoLossType};
use posttrain_core::Dims;

/// Runs `op` if this family owns it.
pub fn run(op: &str, ctx: &Ctx, d: &Device) -> Option<OpResult> {
    Some(match op {
        "trl.grpo_loss" => grpo(ctx, d, false),
        "trl.gspo_token_loss" => grpo(ctx, d, true),
        "trl.gmpo_loss" => gmpo(ctx, d),
        "trl.rloo_loss" => rloo(ctx, d),
        "trl.get_gamma_weights" => gamma(ctx, d),
        _ => return None,
    })
}

fn scalar(t: Tensor<1>) -> f64 {
    to_vec(t)[0]
}

fn clip(c: &ClipMetricTensors) -> ClipMetrics<f64> {
    ClipMetrics {
        low_mean: scalar(c.low_mean.clone()),
        high_mean: scalar(c.high_mean.clone()),
        region_mean: scalar(c.region_mean.clone()),
        low_min: scalar(c.low_min.clone()),
        high_max: scalar(c.high_max.clone()),
    }
}

fn opt2(ctx: &Ctx, name: &str, shape: [usize; 2], d: &Device) -> Result<Option<Tensor<2>>, Fail> {
    match ctx.f_opt::<f64>(name)? {
        Some(v) => Ok(Some(tensor2(&v, shape, d)?)),
        None => Ok(None),
    }
}

/// The inputs TRL's trainers share, on the device; `mask` is the loss mask.
fn inputs(ctx: &Ctx, d: &Device, mask: &[bool]) -> Result<(GrpoTensors, [usize; 2]), Fail> {
    let shape = as2(&ctx.shape("per_token_logps")?);
    let x = GrpoTensors::new(
        tensor2(&ctx.f::<f64>("per_token_logps")?, shape, d)?,
        tensor2(&ctx.f::<f64>("entropies")?, shape, d)?,
        mask2(mask, shape, d)?,
        tensor1(&ctx.f::<f64>("advantages")?, d),
    );
    Ok((x, shape))
}

fn grpo(ctx: &Ctx, d: &Device, gspo_token: bool) -> OpResult {
    let cfg = grpo_config(ctx, gspo_token)?;
    let mask = loss_mask(ctx)?;
    let (mut x, shape) = inputs(ctx, d, &mask)?;
    x.old_log_probs = opt2(ctx, "old_per_token_logps", shape, d)?;
    x.ref_log_probs = opt2(ctx, "ref_per_token_logps", shape, d)?;
    x.sampling_log_probs = opt2(ctx, "sampling_per_token_logps", shape, d)?;
    if let Some(v) = ctx.f_opt::<f64>("importance_sampling_ratio")? {
        x.importance_sampling_ratio =
            Some(if is_ratio_per_row(ctx, Dims::new(shape[0], shape[1]))? {
                IsRatio::Row(tensor1(&v, d))
            } else {
                IsRatio::Token(tensor2(&v, shape, d)?)
            });
    }
    let out = posttrain_burn::grpo::grpo_loss(&cfg, x)?;
    let mut o = Outputs::new();
    o.scalar("loss", scalar(out.loss));
    o.scalar("entropy", scalar(out.entropy));
    if cfg.loss_type.is_clipped() {
        put_clip(&mut o, &clip(&out.clip));
    }
    if cfg.loss_type == GrpoLossType::Cispo {
        o.scalar("cispo_clip_ratio", scalar(out.cispo_clip_ratio));
    }
    if cfg.loss_type == GrpoLossType::Vespo {
        o.scalar("vespo/phi_seq_mean", scalar(out.vespo_phi_seq_mean));
    }
    if cfg.beta != 0.0 {
        o.scalar("kl", scalar(out.kl));
    }
    if cfg.entropy_bonus.is_some() {
        o.scalar("policy_loss", scalar(out.policy_loss));
        o.scalar("entropy_coef", out.entropy_coef);
    }
    let cot = ctx.cot_scalar::<f64>("loss")?;
    let scale = |g: Tensor<2>| to_vec(g).iter().map(|&v| v * cot).collect::<Vec<f64>>();
    o.grad("per_token_logps", &scale(out.grad_log_probs));
    o.grad("entropies", &scale(out.grad_entropies));
    Ok(o)
}

fn gmpo(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = gmpo_config(ctx)?;
    let mask = loss_mask(ctx)?;
    let (mut x, shape) = inputs(ctx, d, &mask)?;
    x.old_log_probs = opt2(ctx, "old_per_token_logps", shape, d)?;
    x.ref_log_probs = opt2(ctx, "ref_per_token_logps", shape, d)?;
    let out = posttrain_burn::grpo::gmpo_loss(&cfg, x)?;
    let mut o = Outputs::new();
    o.scalar("loss", scalar(out.loss));
    o.scalar("entropy", scalar(out.entropy));
    if cfg.beta != 0.0 {
        o.scalar("kl", scalar(out.kl));
    }
    put_clip(&mut o, &clip(&out.clip));
    let cot = ctx.cot_scalar::<f64>("loss")?;
    let g: Vec<f64> = to_vec(out.grad_log_probs)
        .iter()
        .map(|&v| v * cot)
        .collect();
    o.grad("per_token_logps", &g);
    Ok(o)
}

fn rloo(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = rloo_config(ctx)?;
    let mask = ctx.mask("completion_mask")?;
    let (x, _) = inputs(ctx, d, &mask)?;
    let old = tensor1(&ctx.f::<f64>("old_logps")?, d);
    let out = posttrain_burn::grpo::rloo_loss(&cfg, x, old)?;
    let mut o = Outputs::new();
    o.scalar("loss", scalar(out.loss));
    o.scalar("entropy", scalar(out.entropy));
    put_clip(&mut o, &clip(&out.clip));
    let cot = ctx.cot_scalar::<f64>("loss")?;
    let g: Vec<f64> = to_vec(out.grad_log_probs)
        .iter()
        .map(|&v| v * cot)
        .collect();
    o.grad("per_token_logps", &g);
    Ok(o)
}

fn gamma(ctx: &Ctx, d: &Device) -> OpResult {
    let gamma = gamma_config(ctx)?;
    let shape = as2(&ctx.shape("log_ratio_per_token")?);
    let lr = tensor2(&ctx.f::<f64>("log_ratio_per_token")?, shape, d)?;
    let mask = mask2(&ctx.mask("mask")?, shape, d)?;
    let adv = tensor1(&ctx.f::<f64>("advantages")?, d);
    let is = match ctx.f_opt::<f64>("importance_sampling_ratio")? {
        Some(v) => Some(IsRatio::Token(tensor2(&v, shape, d)?)),
        None => None,
    };
    let phi = posttrain_burn::grpo::vespo_gamma_weights(&gamma, adv, lr, &mask, is)?;
    let mut o = Outputs::new();
    o.put("phi_seq", &to_vec(phi));
    Ok(o)
}
