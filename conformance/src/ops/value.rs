//! Handlers for the value-loss family: verl `compute_value_loss`, OpenRLHF
//! `ValueLoss`, torchtune `PPOLoss` (policy + value).

use crate::case::{Ctx, Fail, OpResult, Outputs};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::value::{
    policy_value_loss, value_loss, PolicyValueConfig, PolicyValueGrads, ValueLossConfig,
};
use posttrain_core::Real;

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    match op {
        "verl.compute_value_loss" => Some(verl_value_loss::<F>(ctx)),
        "openrlhf.value_loss" => Some(openrlhf_value_loss::<F>(ctx)),
        "torchtune.ppo_loss" => Some(torchtune_ppo_loss::<F>(ctx)),
        _ => None,
    }
}

/// Runs [`value_loss`] on `values`/`old_values`/`returns`/`mask` and records
/// `loss_name` (and `clipfrac_name`, if any) plus the gradient wrt `values_name`.
#[allow(clippy::too_many_arguments)]
fn run_value_loss<F: Real>(
    ctx: &Ctx,
    cfg: &ValueLossConfig,
    values_name: &str,
    old_name: &str,
    returns_name: &str,
    mask_name: &str,
    loss_name: &str,
    clipfrac_name: Option<&str>,
) -> OpResult {
    let dims = ctx.dims(values_name)?;
    let values = ctx.f::<F>(values_name)?;
    let old = ctx.f::<F>(old_name)?;
    let returns = ctx.f::<F>(returns_name)?;
    let mask = ctx.mask(mask_name)?;
    let mut per_token = vec![F::zero(); dims.len()];
    let mut o = Outputs::new();
    let out = if ctx.wants_grad(values_name) {
        let mut g = vec![F::zero(); dims.len()];
        let out = value_loss(
            cfg,
            dims,
            &values,
            &old,
            &returns,
            &mask,
            &mut per_token,
            Some(&mut g),
        )?;
        let c = ctx.cot_scalar::<F>(loss_name)?;
        g.iter_mut().for_each(|x| *x *= c);
        o.grad(values_name, &g);
        out
    } else {
        value_loss(
            cfg,
            dims,
            &values,
            &old,
            &returns,
            &mask,
            &mut per_token,
            None,
        )?
    };
    o.scalar(loss_name, out.loss);
    if let Some(name) = clipfrac_name {
        o.scalar(name, out.clipfrac);
    }
    Ok(o)
}

/// verl `compute_value_loss`'s configuration from the case parameters.
pub(crate) fn verl_value_config(ctx: &Ctx) -> Result<ValueLossConfig, Fail> {
    let agg: AggMode = match ctx.p_str("loss_agg_mode")?.parse() {
        Ok(m) => m,
        Err(_) => return Err(ctx.unsupported("loss_agg_mode")),
    };
    let norm = GlobalNorm {
        dp_size: ctx.p_opt_f64("dp_size")?.unwrap_or(1.0),
        batch_num_tokens: ctx.p_opt_f64("batch_num_tokens")?,
        global_batch_size: ctx.p_opt_f64("global_batch_size")?,
        loss_scale_factor: ctx.p_opt_f64("loss_scale_factor")?,
    };
    Ok(ValueLossConfig::new(Some(ctx.p_f64("cliprange_value")?), agg)?.with_norm(norm))
}

/// OpenRLHF `ValueLoss`'s configuration from the case parameters.
pub(crate) fn openrlhf_value_config(ctx: &Ctx) -> Result<ValueLossConfig, Fail> {
    Ok(ValueLossConfig::openrlhf(
        ctx.p_opt_f64("clip_eps")?,
        ctx.p_bool("token_level_loss")?,
        ctx.p_opt_f64("dp_size")?.unwrap_or(1.0),
        ctx.p_opt_f64("batch_num_tokens")?,
        ctx.p_opt_f64("global_batch_size")?,
    )?)
}

/// torchtune `PPOLoss`'s configuration from the case parameters.
pub(crate) fn torchtune_config(ctx: &Ctx) -> Result<PolicyValueConfig, Fail> {
    Ok(PolicyValueConfig::new(
        ctx.p_f64("epsilon")?,
        ctx.p_f64("value_clip_range")?,
        ctx.p_f64("value_coeff")?,
    )?)
}

fn verl_value_loss<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = verl_value_config(ctx)?;
    run_value_loss::<F>(
        ctx,
        &cfg,
        "vpreds",
        "values",
        "returns",
        "response_mask",
        "vf_loss",
        Some("vf_clipfrac"),
    )
}

fn openrlhf_value_loss<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = openrlhf_value_config(ctx)?;
    run_value_loss::<F>(
        ctx,
        &cfg,
        "values",
        "old_values",
        "returns",
        "action_mask",
        "loss",
        None,
    )
}

fn torchtune_ppo_loss<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = torchtune_config(ctx)?;
    let dims = ctx.dims("pi_logprobs")?;
    let old_lp = ctx.f::<F>("pi_old_logprobs")?;
    let lp = ctx.f::<F>("pi_logprobs")?;
    let adv = ctx.f::<F>("advantages")?;
    let old_v = ctx.f::<F>("phi_old_values")?;
    let v = ctx.f::<F>("phi_values")?;
    let ret = ctx.f::<F>("returns")?;
    let pmask = ctx.mask_opt("padding_masks")?;
    let vmask = ctx.mask_opt("value_padding_masks")?;
    let want = ctx.wants_grad("pi_logprobs") || ctx.wants_grad("phi_values");
    let (mut g_lp, mut g_v) = (vec![F::zero(); dims.len()], vec![F::zero(); dims.len()]);
    let grads = want.then_some(PolicyValueGrads {
        log_prob: &mut g_lp,
        value: &mut g_v,
    });
    let out = policy_value_loss(
        &cfg,
        dims,
        &old_lp,
        &lp,
        &adv,
        &old_v,
        &v,
        &ret,
        pmask.as_deref(),
        vmask.as_deref(),
        grads,
    )?;
    let mut o = Outputs::new();
    o.scalar("loss", out.loss)
        .scalar("policy_loss", out.policy_loss)
        .scalar("value_loss", out.value_loss)
        .scalar("ratios", out.ratio_mean)
        .scalar("clipfrac", out.clipfrac)
        .scalar("approx_policy_kls", out.approx_kl);
    if want {
        let c = ctx.cot_scalar::<F>("loss")?;
        g_lp.iter_mut().for_each(|x| *x *= c);
        g_v.iter_mut().for_each(|x| *x *= c);
        o.grad("pi_logprobs", &g_lp).grad("phi_values", &g_v);
    }
    Ok(o)
}
