//! Handlers for KL estimators, KL-in-reward and KL controllers.

use crate::case::{Ctx, Fail, OpResult, Outputs};
use posttrain_core::kl::{
    kl_penalized_rewards, rewards_with_score_at_eos, KlConfig, KlController, KlEstimator,
    ScorePosition,
};
use posttrain_core::{Preset, Real};

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    Some(match op {
        "verl.kl_penalty" | "verl.kl_penalty_forward" => verl_kl_penalty::<F>(ctx),
        "openrlhf.compute_approx_kl" => openrlhf_approx_kl::<F>(ctx),
        "verl.apply_kl_penalty" => verl_apply_kl_penalty::<F>(ctx),
        "verl.compute_rewards" => verl_compute_rewards::<F>(ctx),
        "verl.kl_controller" => verl_kl_controller(ctx),
        "openrlhf.compute_reward" => openrlhf_compute_reward::<F>(ctx),
        "torchtune.get_rewards_ppo" => torchtune_rewards::<F>(ctx),
        _ => return None,
    })
}

/// Estimate (and its VJP wrt `lp_name`) into `o`.
fn estimate_into<F: Real>(
    cfg: &KlConfig,
    ctx: &Ctx,
    lp_name: &str,
    ref_name: &str,
    out_name: &str,
    o: &mut Outputs,
) -> Result<(), Fail> {
    let lp = ctx.f::<F>(lp_name)?;
    let rf = ctx.f::<F>(ref_name)?;
    let mut out = vec![F::zero(); lp.len()];
    match ctx.cotangent::<F>(out_name)? {
        Some(cot) => {
            let mut g = vec![F::zero(); lp.len()];
            cfg.estimate_slices(&lp, &rf, &mut out, Some((&cot, &mut g)))?;
            o.grad(lp_name, &g);
        }
        None => cfg.estimate_slices(&lp, &rf, &mut out, None)?,
    }
    o.put(out_name, &out);
    Ok(())
}

fn verl_kl_penalty<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = KlConfig::parse_verl(ctx.p_str("kl_penalty")?)
        .map_err(|_| ctx.unsupported("kl_penalty"))?;
    let mut o = Outputs::new();
    estimate_into::<F>(&cfg, ctx, "logprob", "ref_logprob", "kl_estimate", &mut o)?;
    Ok(o)
}

fn openrlhf_approx_kl<F: Real>(ctx: &Ctx) -> OpResult {
    let est = match ctx.p_str("kl_estimator")? {
        "k1" => KlEstimator::K1,
        "k2" => KlEstimator::K2,
        "k3" => KlEstimator::K3,
        _ => return Err(ctx.unsupported("kl_estimator")),
    };
    let cfg = KlConfig::preset(est, Preset::OpenRlhf);
    let mut o = Outputs::new();
    estimate_into::<F>(&cfg, ctx, "log_probs", "log_probs_base", "kl", &mut o)?;
    Ok(o)
}

pub(crate) fn controller(ctx: &Ctx) -> Result<KlController, Fail> {
    let coef = ctx.p_f64("kl_coef")?;
    Ok(match ctx.p_str("type")? {
        "fixed" => KlController::fixed(coef)?,
        "adaptive" => KlController::adaptive(coef, ctx.p_f64("target_kl")?, ctx.p_f64("horizon")?)?,
        _ => return Err(ctx.unsupported("type")),
    })
}

fn verl_apply_kl_penalty<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = KlConfig::parse_verl(ctx.p_str("kl_penalty")?)
        .map_err(|_| ctx.unsupported("kl_penalty"))?;
    let mut ctl = controller(ctx)?;
    let dims = ctx.dims("token_level_scores")?;
    let scores = ctx.f::<F>("token_level_scores")?;
    let old = ctx.f::<F>("old_log_probs")?;
    let rf = ctx.f::<F>("ref_log_prob")?;
    let mask = ctx.mask("response_mask")?;
    let beta = ctl.value();
    let mut out = vec![F::zero(); scores.len()];
    let stats = kl_penalized_rewards(&cfg, beta, dims, &scores, &old, &rf, Some(&mask), &mut out)?;
    ctl.update(stats.mean_kl.to_f64(), dims.batch as u64)?;
    let mut o = Outputs::new();
    o.put("token_level_rewards", &out)
        .scalar("reward_kl_penalty", stats.mean_kl)
        .scalar("reward_kl_penalty_coeff", F::of(beta))
        .scalar("kl_ctrl_value", F::of(ctl.value()));
    Ok(o)
}

fn verl_compute_rewards<F: Real>(ctx: &Ctx) -> OpResult {
    let dims = ctx.dims("token_level_scores")?;
    let scores = ctx.f::<F>("token_level_scores")?;
    let old = ctx.f::<F>("old_log_prob")?;
    let rf = ctx.f::<F>("ref_log_prob")?;
    let mut out = vec![F::zero(); scores.len()];
    let cfg = KlConfig::new(KlEstimator::K1);
    kl_penalized_rewards(
        &cfg,
        ctx.p_f64("kl_ratio")?,
        dims,
        &scores,
        &old,
        &rf,
        None,
        &mut out,
    )?;
    let mut o = Outputs::new();
    o.put("token_level_rewards", &out);
    Ok(o)
}

fn verl_kl_controller(ctx: &Ctx) -> OpResult {
    let mut ctl = controller(ctx)?;
    let kls = ctx.f::<f64>("current_kl")?;
    let steps = ctx.i64("n_steps")?;
    posttrain_core::error::check_len("n_steps", steps.len(), kls.len())?;
    let mut coefs = Vec::with_capacity(kls.len());
    for (&kl, &n) in kls.iter().zip(&steps) {
        if n < 0 {
            return Err(posttrain_core::Error::OutOfRange {
                param: "n_steps",
                value: n as f64,
                rule: "must be ≥ 0",
            }
            .into());
        }
        ctl.update(kl, n as u64)?;
        coefs.push(ctl.value());
    }
    let mut o = Outputs::new();
    o.put("kl_coef", &coefs);
    Ok(o)
}

fn openrlhf_compute_reward<F: Real>(ctx: &Ctx) -> OpResult {
    let dims = ctx.dims("kl")?;
    let mut r = ctx.f::<F>("r")?;
    let kl = ctx.f::<F>("kl")?;
    let mask = ctx.mask("action_mask")?;
    // OpenRLHF conventions: a non-positive coefficient means no penalty; the
    // score is clipped to `reward_clip_range` before it is placed.
    let beta = ctx.p_f64("kl_coef")?.max(0.0);
    if let Some(range) = ctx.p_opt_f64_list("reward_clip_range")? {
        let [lo, hi] = range[..] else {
            return Err(ctx.unsupported("reward_clip_range"));
        };
        for x in r.iter_mut() {
            *x = x.clamp(lo, hi);
        }
    }
    let mut out = vec![F::zero(); kl.len()];
    rewards_with_score_at_eos(
        dims,
        &r,
        ScorePosition::LastValid(&mask),
        &kl,
        beta,
        &mut out,
    )?;
    let mut o = Outputs::new();
    o.put("reward", &out);
    if let Some(cot) = ctx.cotangent::<F>("reward")? {
        let g: Vec<F> = cot.iter().map(|&c| c * F::of(-beta)).collect();
        o.grad("kl", &g);
    }
    Ok(o)
}

fn torchtune_rewards<F: Real>(ctx: &Ctx) -> OpResult {
    let dims = ctx.dims("logprobs")?;
    let scores = ctx.f::<F>("scores")?;
    let lp = ctx.f::<F>("logprobs")?;
    let rf = ctx.f::<F>("ref_logprobs")?;
    let beta = ctx.p_f64("kl_coeff")?;
    let mut kl = vec![F::zero(); lp.len()];
    KlConfig::new(KlEstimator::K1).estimate_slices(&lp, &rf, &mut kl, None)?;
    let idx = if ctx.has("valid_score_idxs") {
        Some(ctx.i64("valid_score_idxs")?)
    } else {
        None
    };
    let pos = match &idx {
        Some(i) => ScorePosition::Explicit(i),
        None => ScorePosition::LastColumn,
    };
    let mut total = vec![F::zero(); lp.len()];
    rewards_with_score_at_eos(dims, &scores, pos, &kl, beta, &mut total)?;
    let kl_reward: Vec<F> = kl.iter().map(|&k| -(F::of(beta) * k)).collect();
    let mut o = Outputs::new();
    o.put("total_reward", &total)
        .put("kl", &kl)
        .put("kl_reward", &kl_reward);
    Ok(o)
}
