//! Handlers for the `rollout` family: verl's rollout correction (IS weights,
//! rejection masks, off-policy metrics, bypass-mode policy loss) and TRL's
//! vLLM importance-sampling ratio.

use crate::case::{Ctx, Fail, OpResult, Outputs};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::policy::rollout::{
    bypass_policy_loss, rollout_correction_and_rejection, rollout_correction_weights,
    rollout_rejection_mask, vllm_importance_sampling_ratio, BypassBuffers, BypassConfig,
    BypassLoss, CorrectionBuffers, IsConfig, IsMetrics, IsThreshold, NanSamplerLogProbs,
    OffPolicyMetrics, RejectionMetrics, RolloutCorrectionConfig, RolloutCorrectionMetrics,
    RsConfig, VllmIsConfig,
};
use posttrain_core::Real;
use serde_json::Value;

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    match op {
        "verl.compute_rollout_correction_weights" => Some(verl_weights::<F>(ctx)),
        "verl.compute_rollout_rejection_mask" => Some(verl_rejection::<F>(ctx)),
        "verl.compute_rollout_correction_and_rejection_mask" => Some(verl_combined::<F>(ctx)),
        "verl.policy_loss"
            if ctx.param("loss_mode").and_then(Value::as_str) == Some("bypass_mode") =>
        {
            Some(verl_bypass::<F>(ctx))
        }
        "trl.grpo_vllm_importance_sampling_ratio" => Some(trl_vllm_is::<F>(ctx)),
        _ => None,
    }
}

/// A threshold parameter given as a number or a string.
fn threshold_str(ctx: &Ctx, key: &str) -> Result<Option<String>, Fail> {
    match ctx.param(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(_)) => Ok(Some(format!("{}", ctx.p_f64(key)?))),
        Some(_) => Err(ctx.unsupported(key)),
    }
}

pub(crate) fn is_config(ctx: &Ctx) -> Result<Option<IsConfig>, Fail> {
    let level = match ctx.p_opt_str("rollout_is")? {
        Some(l) => l.parse()?,
        None => return Ok(None),
    };
    let th: IsThreshold = match threshold_str(ctx, "rollout_is_threshold")? {
        Some(t) => t.parse()?,
        None => return Ok(None),
    };
    let bn = match ctx.param("rollout_is_batch_normalize") {
        None | Some(Value::Null) => false,
        _ => ctx.p_bool("rollout_is_batch_normalize")?,
    };
    Ok(Some(IsConfig::new(level, th, bn)?))
}

pub(crate) fn rs_config(ctx: &Ctx) -> Result<Option<RsConfig>, Fail> {
    let opts = match ctx.p_opt_str("rollout_rs")? {
        Some(o) => o,
        None => return Ok(None),
    };
    let cfg = match ctx.param("rollout_rs_threshold") {
        Some(Value::Number(_)) => {
            RsConfig::parse_uniform(opts, ctx.p_f64("rollout_rs_threshold")?)?
        }
        Some(Value::String(s)) => RsConfig::parse(opts, s)?,
        _ => {
            return Err(Fail::Op(posttrain_core::Error::Invalid {
                input: "rollout_rs_threshold",
                rule: "must be given when rollout_rs is set",
            }))
        }
    };
    Ok(Some(cfg))
}

pub(crate) fn put_is<F: Real>(o: &mut Outputs, p: &str, m: &IsMetrics<F>) {
    let s = |n: &str| format!("{p}rollout_is_{n}");
    o.scalar(&s("mean"), m.mean)
        .scalar(&s("ratio_fraction_high"), m.ratio_fraction_high)
        .scalar(&s("ratio_fraction_low"), m.ratio_fraction_low)
        .scalar(&s("max"), m.max)
        .scalar(&s("min"), m.min)
        .scalar(&s("std"), m.std)
        .scalar(&s("eff_sample_size"), m.eff_sample_size)
        .scalar(&s("seq_mean"), m.seq_mean)
        .scalar(&s("seq_std"), m.seq_std)
        .scalar(&s("seq_max"), m.seq_max)
        .scalar(&s("seq_min"), m.seq_min)
        .scalar(&s("seq_max_deviation"), m.seq_max_deviation)
        .scalar(&s("seq_fraction_high"), m.seq_fraction_high)
        .scalar(&s("seq_fraction_low"), m.seq_fraction_low);
    if let Some(v) = m.oob_ratio {
        o.scalar(&s("oob_ratio"), v);
    }
    if let Some(v) = m.batch_norm_factor {
        o.scalar(&s("batch_norm_factor"), v);
    }
}

pub(crate) fn put_rs<F: Real>(o: &mut Outputs, p: &str, m: &RejectionMetrics<F>) {
    for (opt, om) in m.per_option() {
        let s = |n: &str| format!("{p}rollout_rs_{}_{n}", opt.name());
        o.scalar(&s("mean"), om.mean)
            .scalar(&s("max"), om.max)
            .scalar(&s("min"), om.min)
            .scalar(&s("fraction_high"), om.fraction_high)
            .scalar(&s("fraction_low"), om.fraction_low)
            .scalar(&s("std"), om.std)
            .scalar(&s("seq_mean"), om.seq_mean)
            .scalar(&s("seq_std"), om.seq_std)
            .scalar(&s("seq_max"), om.seq_max)
            .scalar(&s("seq_min"), om.seq_min)
            .scalar(&s("seq_max_deviation"), om.seq_max_deviation)
            .scalar(&s("seq_fraction_high"), om.seq_fraction_high)
            .scalar(&s("masked_fraction"), om.masked_fraction)
            .scalar(&s("seq_masked_fraction"), om.seq_masked_fraction);
        if let Some(v) = om.seq_fraction_low {
            o.scalar(&s("seq_fraction_low"), v);
        }
    }
    o.scalar(&format!("{p}rollout_rs_masked_fraction"), m.masked_fraction)
        .scalar(
            &format!("{p}rollout_rs_seq_masked_fraction"),
            m.seq_masked_fraction,
        );
}

pub(crate) fn put_off_policy<F: Real>(o: &mut Outputs, p: &str, m: &OffPolicyMetrics<F>) {
    let s = |n: &str| format!("{p}{n}");
    o.scalar(&s("training_ppl"), m.training_ppl)
        .scalar(&s("training_log_ppl"), m.training_log_ppl)
        .scalar(&s("kl"), m.kl)
        .scalar(&s("k3_kl"), m.k3_kl)
        .scalar(&s("rollout_ppl"), m.rollout_ppl)
        .scalar(&s("rollout_log_ppl"), m.rollout_log_ppl)
        .scalar(&s("log_ppl_diff"), m.log_ppl_diff)
        .scalar(&s("log_ppl_abs_diff"), m.log_ppl_abs_diff)
        .scalar(&s("log_ppl_diff_max"), m.log_ppl_diff_max)
        .scalar(&s("log_ppl_diff_min"), m.log_ppl_diff_min)
        .scalar(&s("ppl_ratio"), m.ppl_ratio)
        .scalar(&s("chi2_token"), m.chi2_token)
        .scalar(&s("chi2_seq"), m.chi2_seq);
}

pub(crate) fn put_correction<F: Real>(o: &mut Outputs, m: &RolloutCorrectionMetrics<F>) {
    const P: &str = "rollout_corr/";
    if let Some(is) = &m.is {
        put_is(o, P, is);
    }
    if let Some(rs) = &m.rs {
        put_rs(o, P, rs);
    }
    put_off_policy(o, P, &m.off_policy);
}

fn verl_weights<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = match is_config(ctx)? {
        Some(c) => c,
        None => return Err(ctx.unsupported("rollout_is")),
    };
    let dims = ctx.dims("log_ratio")?;
    let lr = ctx.f::<F>("log_ratio")?;
    let mask = ctx.mask("response_mask")?;
    let mut w = vec![F::zero(); lr.len()];
    let m = rollout_correction_weights(&cfg, dims, &lr, &mask, &mut w)?;
    let mut o = Outputs::new();
    o.put("rollout_is_weights", &w);
    put_is(&mut o, "", &m);
    Ok(o)
}

fn verl_rejection<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = match rs_config(ctx)? {
        Some(c) => c,
        None => return Err(ctx.unsupported("rollout_rs")),
    };
    let dims = ctx.dims("log_ratio")?;
    let lr = ctx.f::<F>("log_ratio")?;
    let mask = ctx.mask("response_mask")?;
    let mut keep = vec![false; lr.len()];
    let mut rows = vec![F::zero(); dims.batch];
    let m = rollout_rejection_mask(&cfg, dims, &lr, &mask, &mut keep, &mut rows)?;
    let mut o = Outputs::new();
    o.put_bool("modified_response_mask", &keep);
    put_rs(&mut o, "", &m);
    Ok(o)
}

pub(crate) fn correction_config(ctx: &Ctx) -> Result<RolloutCorrectionConfig, Fail> {
    Ok(RolloutCorrectionConfig {
        is: is_config(ctx)?,
        rs: rs_config(ctx)?,
    })
}

fn verl_combined<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = correction_config(ctx)?;
    let dims = ctx.dims("old_log_prob")?;
    let lp = ctx.f::<F>("old_log_prob")?;
    let rl = ctx.f::<F>("rollout_log_prob")?;
    let mask = ctx.mask("response_mask")?;
    let n = dims.len();
    let mut w = vec![F::zero(); n];
    let mut keep = vec![false; n];
    let mut lr = vec![F::zero(); n];
    let mut rows = vec![F::zero(); dims.batch];
    let m = rollout_correction_and_rejection(
        &cfg,
        dims,
        &lp,
        &rl,
        &mask,
        CorrectionBuffers {
            weights: &mut w,
            keep: &mut keep,
            log_ratio: &mut lr,
            rows: &mut rows,
        },
    )?;
    let mut o = Outputs::new();
    o.put_bool("modified_response_mask", &keep);
    if cfg.is.is_some() {
        o.put("rollout_is_weights", &w);
    }
    put_correction(&mut o, &m);
    Ok(o)
}

fn opt_norm(ctx: &Ctx, key: &str) -> Result<Option<f64>, Fail> {
    ctx.p_opt_f64(key)
}

/// verl's bypass-mode configuration from the case parameters.
pub(crate) fn bypass_config(ctx: &Ctx) -> Result<BypassConfig, Fail> {
    let correction = correction_config(ctx)?;
    let agg: AggMode = ctx.p_str("loss_agg_mode")?.parse()?;
    let norm = GlobalNorm {
        dp_size: opt_norm(ctx, "dp_size")?.unwrap_or(1.0),
        batch_num_tokens: opt_norm(ctx, "batch_num_tokens")?,
        global_batch_size: opt_norm(ctx, "global_batch_size")?,
        loss_scale_factor: opt_norm(ctx, "loss_scale_factor")?,
    };
    Ok(match ctx.p_opt_str("loss_type")?.unwrap_or("ppo_clip") {
        "ppo_clip" => {
            let clip = ctx.p_f64("clip_ratio")?;
            let lo = ctx.p_opt_f64("clip_ratio_low")?.unwrap_or(clip);
            let hi = ctx.p_opt_f64("clip_ratio_high")?.unwrap_or(clip);
            let c = ctx.p_opt_f64("clip_ratio_c")?.unwrap_or(3.0);
            BypassConfig::verl_ppo_clip(lo, hi, c, correction, agg, norm)?
        }
        "reinforce" => BypassConfig::new(BypassLoss::Reinforce, correction, agg, norm)?,
        _ => return Err(ctx.unsupported("loss_type")),
    })
}

fn verl_bypass<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = bypass_config(ctx)?;
    let dims = ctx.dims("log_prob")?;
    let lp = ctx.f::<F>("log_prob")?;
    let old = ctx.f::<F>("old_log_prob")?;
    let adv = ctx.f::<F>("advantages")?;
    let mask = ctx.mask("response_mask")?;
    let n = dims.len();
    let (mut w, mut tok, mut aw) = (vec![F::zero(); n], vec![F::zero(); n], vec![F::zero(); n]);
    let mut keep = vec![false; n];
    let mut rows = vec![F::zero(); dims.batch];
    let mut g = vec![F::zero(); n];
    let out = bypass_policy_loss(
        &cfg,
        dims,
        &lp,
        &old,
        &adv,
        &mask,
        Some(&mut g),
        BypassBuffers {
            is_weights: &mut w,
            keep: &mut keep,
            tokens: &mut tok,
            agg_weights: &mut aw,
            rows: &mut rows,
        },
    )?;
    let mut o = Outputs::new();
    o.scalar("pg_loss", out.loss).scalar("ppo_kl", out.ppo_kl);
    if let Some(v) = out.pg_clipfrac {
        o.scalar("pg_clipfrac", v);
    }
    if let Some(v) = out.pg_clipfrac_lower {
        o.scalar("pg_clipfrac_lower", v);
    }
    put_correction(&mut o, &out.correction);
    let cot = ctx.cot_scalar::<F>("pg_loss")?;
    let grad: Vec<F> = g.iter().map(|&x| x * cot).collect();
    o.grad("log_prob", &grad);
    Ok(o)
}

/// A [`NanSamplerLogProbs`] choice from a string parameter's value:
/// `"propagate"` (TRL f2cd577, the vectors' commit; also when absent or
/// null) or `"as_on_policy"` (TRL 1.16.0); another value is a typed
/// [`UnknownOption`](posttrain_core::Error::UnknownOption) error.
pub(crate) fn nan_sampler_log_probs(value: Option<&str>) -> Result<NanSamplerLogProbs, Fail> {
    match value {
        None => Ok(NanSamplerLogProbs::Propagate),
        Some(s) => Ok(s.parse()?),
    }
}

/// TRL's vLLM IS configuration from the case parameters;
/// `vllm_importance_sampling_nan_sampler_logps` selects how sampler
/// log-probs vLLM could not score (NaN) are treated
/// ([`nan_sampler_log_probs`]).
pub(crate) fn vllm_config(ctx: &Ctx) -> Result<VllmIsConfig, Fail> {
    let mode = ctx.p_str("vllm_importance_sampling_mode")?.parse()?;
    let nan = ctx.p_opt_str("vllm_importance_sampling_nan_sampler_logps")?;
    Ok(VllmIsConfig::new(
        mode,
        ctx.p_opt_f64("vllm_importance_sampling_clip_min")?,
        ctx.p_opt_f64("vllm_importance_sampling_clip_max")?,
    )?
    .with_nan_sampler_log_probs(nan_sampler_log_probs(nan)?))
}

/// `completion_mask ∧ tool_mask` (when a tool mask is given).
pub(crate) fn vllm_mask(ctx: &Ctx) -> Result<Vec<bool>, Fail> {
    let mut mask = ctx.mask("completion_mask")?;
    if let Some(tool) = ctx.mask_opt("tool_mask")? {
        posttrain_core::error::check_len("tool_mask", tool.len(), mask.len())?;
        for (m, t) in mask.iter_mut().zip(tool) {
            *m = *m && t;
        }
    }
    Ok(mask)
}

fn trl_vllm_is<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = vllm_config(ctx)?;
    let dims = ctx.dims("old_per_token_logps")?;
    let old = ctx.f::<F>("old_per_token_logps")?;
    let samp = ctx.f::<F>("sampling_per_token_logps")?;
    let mask = vllm_mask(ctx)?;
    let mut ratio = vec![
        F::zero();
        if cfg.mode.is_sequence() {
            dims.batch
        } else {
            dims.len()
        }
    ];
    let m = vllm_importance_sampling_ratio(&cfg, dims, &old, &samp, &mask, &mut ratio)?;
    let mut o = Outputs::new();
    o.put("importance_sampling_ratio", &ratio)
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
