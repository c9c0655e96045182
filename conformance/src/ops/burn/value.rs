//! Value losses (verl, OpenRLHF, torchtune) on burn tensors: the same
//! parameter parsing as the core handlers, calling `posttrain_burn::value`.

use super::{as2, f2};
use crate::case::{Ctx, OpResult, Outputs};
use crate::ops::value::{openrlhf_value_config, torchtune_config, verl_value_config};
use posttrain_burn::value::{policy_value_loss, value_loss, PolicyValueTensors};
use posttrain_burn::{mask2, to_vec, Device};
use posttrain_core::value::ValueLossConfig;

/// Runs `op` if this family owns it.
pub fn run(op: &str, ctx: &Ctx, d: &Device) -> Option<OpResult> {
    Some(match op {
        "verl.compute_value_loss" => verl_value_config(ctx).and_then(|cfg| {
            value(
                ctx,
                d,
                &cfg,
                ["vpreds", "values", "returns", "response_mask"],
                "vf_loss",
                Some("vf_clipfrac"),
            )
        }),
        "openrlhf.value_loss" => openrlhf_value_config(ctx).and_then(|cfg| {
            value(
                ctx,
                d,
                &cfg,
                ["values", "old_values", "returns", "action_mask"],
                "loss",
                None,
            )
        }),
        "torchtune.ppo_loss" => torchtune(ctx, d),
        _ => return None,
    })
}

/// `names` = values, old values, returns, mask.
fn value(
    ctx: &Ctx,
    d: &Device,
    cfg: &ValueLossConfig,
    names: [&str; 4],
    loss_name: &str,
    clipfrac_name: Option<&str>,
) -> OpResult {
    let [v, old, ret, mask] = names;
    let shape = as2(&ctx.shape(v)?);
    let m = mask2(&ctx.mask(mask)?, shape, d)?;
    let out = value_loss(
        cfg,
        f2(ctx, v, shape, d)?,
        f2(ctx, old, shape, d)?,
        f2(ctx, ret, shape, d)?,
        &m,
    )?;
    let mut o = Outputs::new();
    if ctx.wants_grad(v) {
        let c = ctx.cot_scalar::<f64>(loss_name)?;
        let g: Vec<f64> = to_vec(out.grad).iter().map(|g| g * c).collect();
        o.grad(v, &g);
    }
    o.scalar(loss_name, to_vec(out.loss)[0]);
    if let Some(name) = clipfrac_name {
        o.scalar(name, to_vec(out.clipfrac)[0]);
    }
    Ok(o)
}

fn torchtune(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = torchtune_config(ctx)?;
    let shape = as2(&ctx.shape("pi_logprobs")?);
    let pm = match ctx.mask_opt("padding_masks")? {
        Some(m) => Some(mask2(&m, shape, d)?),
        None => None,
    };
    let vm = match ctx.mask_opt("value_padding_masks")? {
        Some(m) => Some(mask2(&m, shape, d)?),
        None => None,
    };
    let x = PolicyValueTensors {
        old_log_prob: f2(ctx, "pi_old_logprobs", shape, d)?,
        log_prob: f2(ctx, "pi_logprobs", shape, d)?,
        advantages: f2(ctx, "advantages", shape, d)?,
        old_values: f2(ctx, "phi_old_values", shape, d)?,
        values: f2(ctx, "phi_values", shape, d)?,
        returns: f2(ctx, "returns", shape, d)?,
    };
    let out = policy_value_loss(&cfg, x, pm.as_ref(), vm.as_ref())?;
    let mut o = Outputs::new();
    o.scalar("loss", to_vec(out.loss)[0])
        .scalar("policy_loss", to_vec(out.policy_loss)[0])
        .scalar("value_loss", to_vec(out.value_loss)[0])
        .scalar("ratios", to_vec(out.ratio_mean)[0])
        .scalar("clipfrac", to_vec(out.clipfrac)[0])
        .scalar("approx_policy_kls", to_vec(out.approx_kl)[0]);
    if ctx.wants_grad("pi_logprobs") || ctx.wants_grad("phi_values") {
        let c = ctx.cot_scalar::<f64>("loss")?;
        let scale = |t| -> Vec<f64> { to_vec(t).iter().map(|g| g * c).collect() };
        o.grad("pi_logprobs", &scale(out.grad_log_prob))
            .grad("phi_values", &scale(out.grad_values));
    }
    Ok(o)
}
