//! Handlers for the `policy` family: verl's token-level policy losses and
//! OpenRLHF's `PolicyLoss`.

use crate::case::{Ctx, Fail, OpResult, Outputs};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::policy::ppo::{
    clipped_policy_loss, ClippedPolicyLoss, RatioLevel, RolloutIsCorrection, RolloutIsKind,
};
use posttrain_core::policy::token::{
    policy_loss, PolicyBatch, PolicyLoss, PolicyLossMode, VerlPolicyParams,
};
use posttrain_core::Real;

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    match op {
        "verl.policy_loss" => Some(verl_policy_loss::<F>(ctx)),
        "verl.compute_policy_loss" => Some(verl_compute_policy_loss::<F>(ctx)),
        "verl.compute_policy_loss_reinforce" => Some(verl_reinforce::<F>(ctx)),
        "openrlhf.policy_loss" => Some(openrlhf_policy_loss::<F>(ctx)),
        _ => None,
    }
}

/// verl's `loss_agg_mode` parameter as an [`AggMode`].
pub fn agg_mode(ctx: &Ctx) -> Result<AggMode, Fail> {
    match ctx.p_str("loss_agg_mode")?.parse() {
        Ok(m) => Ok(m),
        Err(_) => Err(ctx.unsupported("loss_agg_mode")),
    }
}

/// verl's global normalizers (`dp_size`, `batch_num_tokens`, `global_batch_size`,
/// `loss_scale_factor`; absent ones take verl's defaults).
pub fn global_norm(ctx: &Ctx) -> Result<GlobalNorm, Fail> {
    Ok(GlobalNorm {
        dp_size: ctx.p_opt_f64("dp_size")?.unwrap_or(1.0),
        batch_num_tokens: ctx.p_opt_f64("batch_num_tokens")?,
        global_batch_size: ctx.p_opt_f64("global_batch_size")?,
        loss_scale_factor: ctx.p_opt_f64("loss_scale_factor")?,
    })
}

/// Runs the core driver on the named inputs and packs verl's outputs.
fn run_verl<F: Real>(
    ctx: &Ctx,
    loss: &PolicyLoss,
    agg: AggMode,
    norm: &GlobalNorm,
    old_name: &str,
) -> OpResult {
    let lp = ctx.f::<F>("log_prob")?;
    let old = ctx.f::<F>(old_name)?;
    let adv = ctx.f::<F>("advantages")?;
    let mask = ctx.mask("response_mask")?;
    let w = ctx.f_opt::<F>("rollout_is_weights")?;
    let dims = ctx.dims("log_prob")?;
    let batch = PolicyBatch {
        dims,
        log_prob: &lp,
        old_log_prob: &old,
        advantages: &adv,
        mask: &mask,
        is_weights: w.as_deref(),
    };
    let mut scratch = vec![F::zero(); PolicyLoss::scratch_len(dims)];
    let mut o = Outputs::new();
    let out = if ctx.wants_grad("log_prob") {
        let c = ctx.cot_scalar::<F>("pg_loss")?;
        let mut g = vec![F::zero(); dims.len()];
        let out = policy_loss(loss, agg, norm, &batch, &mut scratch, Some((c, &mut g)))?;
        o.grad("log_prob", &g);
        out
    } else {
        policy_loss(loss, agg, norm, &batch, &mut scratch, None)?
    };
    o.scalar("pg_loss", out.loss)
        .scalar("pg_clipfrac", out.clipfrac)
        .scalar("pg_clipfrac_lower", out.clipfrac_lower)
        .scalar("ppo_kl", out.approx_kl);
    Ok(o)
}

/// verl's `loss_mode` and actor parameters from the case, as the policy
/// loss they select.
pub fn verl_policy_config(ctx: &Ctx) -> Result<PolicyLoss, Fail> {
    let name = ctx.p_str("loss_mode")?;
    let mode: PolicyLossMode = match name.parse() {
        Ok(m) => m,
        Err(_) => return Err(ctx.unsupported("loss_mode")),
    };
    let params = VerlPolicyParams {
        clip_ratio: ctx.p_f64("clip_ratio")?,
        clip_ratio_low: ctx.p_opt_f64("clip_ratio_low")?,
        clip_ratio_high: ctx.p_opt_f64("clip_ratio_high")?,
        clip_ratio_c: ctx.p_opt_f64("clip_ratio_c")?.unwrap_or(3.0),
        tau_pos: ctx.p_opt_f64("tau_pos")?.unwrap_or(1.0),
        tau_neg: ctx.p_opt_f64("tau_neg")?.unwrap_or(1.05),
        clip_cov_ratio: ctx.p_opt_f64("clip_cov_ratio")?.unwrap_or(0.0002),
        clip_cov_lb: ctx.p_opt_f64("clip_cov_lb")?.unwrap_or(1.0),
        clip_cov_ub: ctx.p_opt_f64("clip_cov_ub")?.unwrap_or(5.0),
        kl_cov_ratio: ctx.p_opt_f64("kl_cov_ratio")?.unwrap_or(0.0002),
        ppo_kl_coef: ctx.p_opt_f64("ppo_kl_coef")?.unwrap_or(0.1),
        dro_beta: ctx.p_opt_f64("dro_beta")?,
        gspo_honor_loss_agg_mode: matches!(
            ctx.param("gspo_honor_loss_agg_mode"),
            Some(serde_json::Value::Bool(true))
        ),
    };
    Ok(PolicyLoss::from_verl(mode, &params)?)
}

fn verl_policy_loss<F: Real>(ctx: &Ctx) -> OpResult {
    let loss = verl_policy_config(ctx)?;
    run_verl::<F>(
        ctx,
        &loss,
        agg_mode(ctx)?,
        &global_norm(ctx)?,
        "old_log_prob",
    )
}

fn verl_compute_policy_loss<F: Real>(ctx: &Ctx) -> OpResult {
    let eps = ctx.p_f64("cliprange")?;
    let params = VerlPolicyParams {
        clip_ratio: eps,
        clip_ratio_low: ctx.p_opt_f64("cliprange_low")?,
        clip_ratio_high: ctx.p_opt_f64("cliprange_high")?,
        clip_ratio_c: ctx.p_opt_f64("clip_ratio_c")?.unwrap_or(3.0),
        ..VerlPolicyParams::default()
    };
    let loss = PolicyLoss::from_verl(PolicyLossMode::Vanilla, &params)?;
    run_verl::<F>(
        ctx,
        &loss,
        agg_mode(ctx)?,
        &GlobalNorm::default(),
        "old_log_prob",
    )
}

fn verl_reinforce<F: Real>(ctx: &Ctx) -> OpResult {
    run_verl::<F>(
        ctx,
        &PolicyLoss::LogProb,
        agg_mode(ctx)?,
        &global_norm(ctx)?,
        "rollout_log_prob",
    )
}

/// OpenRLHF `PolicyLoss`'s configuration from the case parameters.
pub(crate) fn openrlhf_policy_config(ctx: &Ctx) -> Result<ClippedPolicyLoss, Fail> {
    let ratio = match ctx.p_str("policy_loss_type")? {
        "ppo" => RatioLevel::Token,
        "gspo" => RatioLevel::Sequence,
        _ => return Err(ctx.unsupported("policy_loss_type")),
    };
    let correction = if ctx.p_bool("enable_vllm_is_correction")? {
        let kind: RolloutIsKind = match ctx.p_str("vllm_is_correction_type")?.parse() {
            Ok(k) => k,
            Err(_) => return Err(ctx.unsupported("vllm_is_correction_type")),
        };
        let th = ctx
            .p_opt_f64_list("vllm_is_truncated_threshold")?
            .unwrap_or_default();
        if th.len() != 2 {
            return Err(Fail::Harness(
                "vllm_is_truncated_threshold must be [low, high]".into(),
            ));
        }
        Some(RolloutIsCorrection {
            kind,
            low: th[0],
            high: th[1],
        })
    } else {
        None
    };
    Ok(ClippedPolicyLoss::openrlhf(
        ctx.p_f64("clip_eps_low")?,
        ctx.p_f64("clip_eps_high")?,
        ctx.p_opt_f64("dual_clip")?,
        ratio,
        ctx.p_bool("token_level_loss")?,
        correction,
    )?)
}

fn openrlhf_policy_loss<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = openrlhf_policy_config(ctx)?;
    let lp = ctx.f::<F>("log_probs")?;
    let old = ctx.f::<F>("old_log_probs")?;
    let adv = ctx.f::<F>("advantages")?;
    let mask = ctx.mask("action_mask")?;
    let rollout = ctx.f_opt::<F>("rollout_log_probs")?;
    let dims = ctx.dims("log_probs")?;
    let batch = PolicyBatch {
        dims,
        log_prob: &lp,
        old_log_prob: &old,
        advantages: &adv,
        mask: &mask,
        is_weights: None,
    };
    let norm = global_norm(ctx)?;
    let mut scratch = vec![F::zero(); ClippedPolicyLoss::scratch_len(dims)];
    let mut o = Outputs::new();
    let out = if ctx.wants_grad("log_probs") {
        let c = ctx.cot_scalar::<F>("loss")?;
        let mut g = vec![F::zero(); dims.len()];
        let out = clipped_policy_loss(
            &cfg,
            &norm,
            &batch,
            rollout.as_deref(),
            &mut scratch,
            Some((c, &mut g)),
        )?;
        o.grad("log_probs", &g);
        out
    } else {
        clipped_policy_loss(&cfg, &norm, &batch, rollout.as_deref(), &mut scratch, None)?
    };
    o.scalar("loss", out.loss)
        .scalar("clip_ratio", out.clip_ratio)
        .scalar("ppo_kl", out.approx_kl);
    if let Some(kl) = out.rollout_kl {
        o.scalar("vllm_kl", kl);
    }
    Ok(o)
}
