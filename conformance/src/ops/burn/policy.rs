//! Token-level policy losses (verl's registry, OpenRLHF's `PolicyLoss`) on
//! burn tensors. verl's `bypass_mode` is a rollout-correction op: it goes to
//! the rollout family.

use super::{agg_mode, as2, f2, global_norm};
use crate::case::{Ctx, Fail, OpResult, Outputs};
use crate::ops::policy::{openrlhf_policy_config, verl_policy_config};
use posttrain_burn::{mask2, tensor2, to_vec, Device};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::policy::token::{PolicyLoss, PolicyLossMode, VerlPolicyParams};
use serde_json::Value;

/// Runs `op` if it is a verl token-level policy loss.
pub fn run(op: &str, ctx: &Ctx, d: &Device) -> Option<OpResult> {
    Some(match op {
        "verl.policy_loss"
            if ctx.param("loss_mode").and_then(Value::as_str) == Some("bypass_mode") =>
        {
            return super::rollout::run(op, ctx, d)
        }
        "verl.policy_loss" => verl_policy_loss(ctx, d),
        "openrlhf.policy_loss" => openrlhf_policy_loss(ctx, d),
        "verl.compute_policy_loss" => verl_compute_policy_loss(ctx, d),
        "verl.compute_policy_loss_reinforce" => policy(
            ctx,
            d,
            &PolicyLoss::LogProb,
            agg_mode(ctx),
            global_norm(ctx, true),
            "rollout_log_prob",
        ),
        _ => return None,
    })
}

fn verl_policy_loss(ctx: &Ctx, d: &Device) -> OpResult {
    let loss = verl_policy_config(ctx)?;
    policy(
        ctx,
        d,
        &loss,
        agg_mode(ctx),
        global_norm(ctx, true),
        "old_log_prob",
    )
}

fn openrlhf_policy_loss(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = openrlhf_policy_config(ctx)?;
    let shape = as2(&ctx.shape("log_probs")?);
    let mask = mask2(&ctx.mask("action_mask")?, shape, d)?;
    let rollout = match ctx.f_opt::<f64>("rollout_log_probs")? {
        Some(r) => Some(tensor2(&r, shape, d)?),
        None => None,
    };
    let out = posttrain_burn::policy::clipped_policy_loss(
        &cfg,
        &global_norm(ctx, false)?,
        f2(ctx, "log_probs", shape, d)?,
        f2(ctx, "old_log_probs", shape, d)?,
        f2(ctx, "advantages", shape, d)?,
        &mask,
        rollout,
    )?;
    let mut o = Outputs::new();
    if ctx.wants_grad("log_probs") {
        let c = ctx.cot_scalar::<f64>("loss")?;
        let g: Vec<f64> = to_vec(out.grad).iter().map(|g| g * c).collect();
        o.grad("log_probs", &g);
    }
    o.scalar("loss", to_vec(out.loss)[0])
        .scalar("clip_ratio", to_vec(out.clip_ratio)[0])
        .scalar("ppo_kl", to_vec(out.approx_kl)[0]);
    if let Some(kl) = out.rollout_kl {
        o.scalar("vllm_kl", to_vec(kl)[0]);
    }
    Ok(o)
}

fn verl_compute_policy_loss(ctx: &Ctx, d: &Device) -> OpResult {
    let params = VerlPolicyParams {
        clip_ratio: ctx.p_f64("cliprange")?,
        clip_ratio_low: ctx.p_opt_f64("cliprange_low")?,
        clip_ratio_high: ctx.p_opt_f64("cliprange_high")?,
        clip_ratio_c: ctx.p_opt_f64("clip_ratio_c")?.unwrap_or(3.0),
        ..VerlPolicyParams::default()
    };
    let loss = PolicyLoss::from_verl(PolicyLossMode::Vanilla, &params)?;
    policy(
        ctx,
        d,
        &loss,
        agg_mode(ctx),
        Ok(GlobalNorm::default()),
        "old_log_prob",
    )
}

fn policy(
    ctx: &Ctx,
    d: &Device,
    loss: &PolicyLoss,
    agg: Result<AggMode, Fail>,
    norm: Result<GlobalNorm, Fail>,
    old_name: &str,
) -> OpResult {
    let (agg, norm) = (agg?, norm?);
    let shape = as2(&ctx.shape("log_prob")?);
    let mask = mask2(&ctx.mask("response_mask")?, shape, d)?;
    let w = match ctx.f_opt::<f64>("rollout_is_weights")? {
        Some(w) => Some(tensor2(&w, shape, d)?),
        None => None,
    };
    let out = posttrain_burn::policy::policy_loss(
        loss,
        agg,
        &norm,
        f2(ctx, "log_prob", shape, d)?,
        f2(ctx, old_name, shape, d)?,
        f2(ctx, "advantages", shape, d)?,
        &mask,
        w,
    )?;
    let mut o = Outputs::new();
    if ctx.wants_grad("log_prob") {
        let c = ctx.cot_scalar::<f64>("pg_loss")?;
        let g: Vec<f64> = to_vec(out.grad).iter().map(|g| g * c).collect();
        o.grad("log_prob", &g);
    }
    o.scalar("pg_loss", to_vec(out.loss)[0])
        .scalar("pg_clipfrac", to_vec(out.clipfrac)[0])
        .scalar("pg_clipfrac_lower", to_vec(out.clipfrac_lower)[0])
        .scalar("ppo_kl", to_vec(out.approx_kl)[0]);
    Ok(o)
}
