//! Token-level policy losses (verl's registry) on burn tensors.

use super::{agg_mode, as2, f2, global_norm};
use crate::case::{Ctx, Fail, OpResult, Outputs};
use posttrain_burn::{mask2, tensor2, to_vec, Device};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::policy::token::{PolicyLoss, PolicyLossMode, VerlPolicyParams};

/// Runs `op` if it is a verl token-level policy loss.
pub fn run(op: &str, ctx: &Ctx, d: &Device) -> Option<OpResult> {
    Some(match op {
        "verl.policy_loss" => verl_policy_loss(ctx, d),
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
    let mode: PolicyLossMode = ctx
        .p_str("loss_mode")?
        .parse()
        .map_err(|_| ctx.unsupported("loss_mode"))?;
    if matches!(
        mode,
        PolicyLossMode::ClipCov | PolicyLossMode::KlCov | PolicyLossMode::GeoMean
    ) {
        return Err(ctx.unsupported("loss_mode"));
    }
    let params = VerlPolicyParams {
        clip_ratio: ctx.p_f64("clip_ratio")?,
        clip_ratio_low: ctx.p_opt_f64("clip_ratio_low")?,
        clip_ratio_high: ctx.p_opt_f64("clip_ratio_high")?,
        clip_ratio_c: ctx.p_opt_f64("clip_ratio_c")?.unwrap_or(3.0),
        tau_pos: ctx.p_opt_f64("tau_pos")?.unwrap_or(1.0),
        tau_neg: ctx.p_opt_f64("tau_neg")?.unwrap_or(1.05),
        dro_beta: ctx.p_opt_f64("dro_beta")?,
        ..VerlPolicyParams::default()
    };
    let loss = PolicyLoss::from_verl(mode, &params)?;
    policy(
        ctx,
        d,
        &loss,
        agg_mode(ctx),
        global_norm(ctx, true),
        "old_log_prob",
    )
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
