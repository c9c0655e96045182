//! Rollout correction (verl), bypass-mode policy loss (verl) and TRL's vLLM
//! importance-sampling ratio on burn tensors: the core handlers' parameter
//! parsing and output packing, calling `posttrain_burn::rollout`.

use super::{as2, f2};
use crate::case::{Ctx, OpResult, Outputs};
use crate::ops::rollout::{
    bypass_config, correction_config, is_config, put_correction, put_is, put_rs, rs_config,
    vllm_config, vllm_mask,
};
use posttrain_burn::rollout::{
    bypass_policy_loss, correction_metrics_to_host, is_metrics_to_host, rejection_metrics_to_host,
    rollout_correction_and_rejection, rollout_correction_weights, rollout_rejection_mask,
    vllm_importance_sampling_ratio, vllm_metrics_to_host,
};
use posttrain_burn::{mask2, to_vec, to_vec_bool, Device};
use serde_json::Value;

/// Runs `op` if this family owns it.
pub fn run(op: &str, ctx: &Ctx, d: &Device) -> Option<OpResult> {
    Some(match op {
        "verl.compute_rollout_correction_weights" => weights(ctx, d),
        "verl.compute_rollout_rejection_mask" => rejection(ctx, d),
        "verl.compute_rollout_correction_and_rejection_mask" => combined(ctx, d),
        "verl.policy_loss"
            if ctx.param("loss_mode").and_then(Value::as_str) == Some("bypass_mode") =>
        {
            bypass(ctx, d)
        }
        "trl.grpo_vllm_importance_sampling_ratio" => vllm(ctx, d),
        _ => return None,
    })
}

fn weights(ctx: &Ctx, d: &Device) -> OpResult {
    let Some(cfg) = is_config(ctx)? else {
        return Err(ctx.unsupported("rollout_is"));
    };
    let shape = as2(&ctx.shape("log_ratio")?);
    let mask = mask2(&ctx.mask("response_mask")?, shape, d)?;
    let (w, m) = rollout_correction_weights(&cfg, f2(ctx, "log_ratio", shape, d)?, &mask)?;
    let mut o = Outputs::new();
    o.put("rollout_is_weights", &to_vec(w));
    put_is(&mut o, "", &is_metrics_to_host(m));
    Ok(o)
}

fn rejection(ctx: &Ctx, d: &Device) -> OpResult {
    let Some(cfg) = rs_config(ctx)? else {
        return Err(ctx.unsupported("rollout_rs"));
    };
    let shape = as2(&ctx.shape("log_ratio")?);
    let mask = mask2(&ctx.mask("response_mask")?, shape, d)?;
    let (keep, m) = rollout_rejection_mask(&cfg, f2(ctx, "log_ratio", shape, d)?, &mask)?;
    let mut o = Outputs::new();
    o.put_bool("modified_response_mask", &to_vec_bool(keep));
    put_rs(&mut o, "", &rejection_metrics_to_host(m));
    Ok(o)
}

fn combined(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = correction_config(ctx)?;
    let shape = as2(&ctx.shape("old_log_prob")?);
    let mask = mask2(&ctx.mask("response_mask")?, shape, d)?;
    let c = rollout_correction_and_rejection(
        &cfg,
        f2(ctx, "old_log_prob", shape, d)?,
        f2(ctx, "rollout_log_prob", shape, d)?,
        &mask,
    )?;
    let mut o = Outputs::new();
    o.put_bool("modified_response_mask", &to_vec_bool(c.keep));
    if let Some(w) = c.weights {
        o.put("rollout_is_weights", &to_vec(w));
    }
    put_correction(&mut o, &correction_metrics_to_host(c.metrics));
    Ok(o)
}

fn bypass(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = bypass_config(ctx)?;
    let shape = as2(&ctx.shape("log_prob")?);
    let mask = mask2(&ctx.mask("response_mask")?, shape, d)?;
    let out = bypass_policy_loss(
        &cfg,
        f2(ctx, "log_prob", shape, d)?,
        f2(ctx, "old_log_prob", shape, d)?,
        f2(ctx, "advantages", shape, d)?,
        &mask,
    )?;
    let mut o = Outputs::new();
    o.scalar("pg_loss", to_vec(out.loss)[0])
        .scalar("ppo_kl", to_vec(out.ppo_kl)[0]);
    if let Some(v) = out.pg_clipfrac {
        o.scalar("pg_clipfrac", to_vec(v)[0]);
    }
    if let Some(v) = out.pg_clipfrac_lower {
        o.scalar("pg_clipfrac_lower", to_vec(v)[0]);
    }
    put_correction(&mut o, &correction_metrics_to_host(out.correction.metrics));
    let cot = ctx.cot_scalar::<f64>("pg_loss")?;
    let g: Vec<f64> = to_vec(out.grad).iter().map(|x| x * cot).collect();
    o.grad("log_prob", &g);
    Ok(o)
}

fn vllm(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = vllm_config(ctx)?;
    let shape = as2(&ctx.shape("old_per_token_logps")?);
    let mask = mask2(&vllm_mask(ctx)?, shape, d)?;
    let (ratio, m) = vllm_importance_sampling_ratio(
        &cfg,
        f2(ctx, "old_per_token_logps", shape, d)?,
        f2(ctx, "sampling_per_token_logps", shape, d)?,
        &mask,
    )?;
    let m = vllm_metrics_to_host(m);
    let mut o = Outputs::new();
    o.put("importance_sampling_ratio", &to_vec(ratio))
        .put_i64("num_items_in_batch", &[m.num_items as i64])
        .scalar(
            "sampling/sampling_logp_difference/mean",
            m.logp_difference_mean,
        )
        .scalar(
            "sampling/sampling_logp_difference/max",
            m.logp_difference_max,
        )
        .scalar("sampling/importance_sampling_ratio/min", m.ratio_min)
        .scalar("sampling/importance_sampling_ratio/mean", m.ratio_mean)
        .scalar("sampling/importance_sampling_ratio/max", m.ratio_max);
    Ok(o)
}
