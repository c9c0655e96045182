//! Handlers for the `grpo` family: TRL's GRPO-family losses (`grpo_loss`,
//! `gspo_token_loss`, `gmpo_loss`, `rloo_loss`) and VESPO's gamma weights.

use crate::case::{Ctx, Fail, OpResult, Outputs};
use crate::ops::rollout::nan_sampler_log_probs;
use posttrain_core::policy::grpo::{
    gmpo_loss, grpo_loss, rloo_loss, vespo_gamma_weights, AdaptiveEntropy, ClipMetrics,
    EntropyBonus, GmpoConfig, GrpoConfig, GrpoInputs, GrpoLossType, ImportanceSamplingLevel,
    RlooConfig, TokenOrRow, TrlNormalizer, VespoGamma,
};
use posttrain_core::{Dims, Real};

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    match op {
        "trl.grpo_loss" => Some(trl_grpo_loss::<F>(ctx, false)),
        "trl.gspo_token_loss" => Some(trl_grpo_loss::<F>(ctx, true)),
        "trl.gmpo_loss" => Some(trl_gmpo_loss::<F>(ctx)),
        "trl.rloo_loss" => Some(trl_rloo_loss::<F>(ctx)),
        "trl.get_gamma_weights" => Some(trl_gamma_weights::<F>(ctx)),
        _ => None,
    }
}

fn opt_bool(ctx: &Ctx, key: &str) -> Result<bool, Fail> {
    if ctx.param(key).is_some() {
        ctx.p_bool(key)
    } else {
        Ok(false)
    }
}

pub(crate) fn is_train(ctx: &Ctx) -> Result<bool, Fail> {
    match ctx.p_opt_str("mode")? {
        None | Some("train") => Ok(true),
        Some("eval") => Ok(false),
        Some(_) => Err(ctx.unsupported("mode")),
    }
}

/// Completion mask combined with the tool mask, if any.
pub(crate) fn loss_mask(ctx: &Ctx) -> Result<Vec<bool>, Fail> {
    let mut m = ctx.mask("completion_mask")?;
    if let Some(t) = ctx.mask_opt("tool_mask")? {
        if t.len() != m.len() {
            return Err(Fail::Op(posttrain_core::Error::ShapeMismatch {
                input: "tool_mask",
                expected: m.len(),
                got: t.len(),
            }));
        }
        for (a, b) in m.iter_mut().zip(t) {
            *a = *a && b;
        }
    }
    Ok(m)
}

pub(crate) fn put_clip(o: &mut Outputs, c: &ClipMetrics<impl Real>) {
    o.scalar("clip_ratio/low_mean", c.low_mean);
    o.scalar("clip_ratio/high_mean", c.high_mean);
    o.scalar("clip_ratio/region_mean", c.region_mean);
    o.scalar("clip_ratio/low_min", c.low_min);
    o.scalar("clip_ratio/high_max", c.high_max);
}

/// TRL's `GRPOConfig` fields (and trainer state: `current_gradient_accumulation_steps`,
/// `num_items_in_batch`, `mode`, …) from the case's parameters, as a validated [`GrpoConfig`];
/// `gspo_token` admits `importance_sampling_level = "sequence_token"`. Release switches
/// beyond the vectors' TRL f2cd577: `steps_per_generation` (TRL 1.16.0's normalizers) and
/// `off_policy_mask_nan_sampler_logps = "as_on_policy"` (TRL 1.16.0's off-policy mask on
/// NaN sampler log-probs).
pub fn grpo_config(ctx: &Ctx, gspo_token: bool) -> Result<GrpoConfig, Fail> {
    let loss_type: GrpoLossType = ctx.p_str("loss_type")?.parse()?;
    let mut cfg = GrpoConfig::trl(loss_type);
    cfg.level = ctx.p_str("importance_sampling_level")?.parse()?;
    if !gspo_token && cfg.level == ImportanceSamplingLevel::SequenceToken {
        return Err(ctx.unsupported("importance_sampling_level"));
    }
    cfg.eps_low = ctx.p_f64("epsilon")?;
    cfg.eps_high = ctx.p_f64("epsilon_high")?;
    cfg.delta = ctx.p_opt_f64("delta")?;
    cfg.beta = ctx.p_f64("beta")?;
    cfg.bias_correction_kl = opt_bool(ctx, "use_bias_correction_kl")?;
    cfg.top_entropy_quantile = ctx.p_f64("top_entropy_quantile")?;
    cfg.vllm_is_correction =
        opt_bool(ctx, "use_vllm")? && opt_bool(ctx, "vllm_importance_sampling_correction")?;
    cfg.off_policy_mask_threshold = ctx.p_opt_f64("off_policy_mask_threshold")?;
    cfg.off_policy_nan_sampler_log_probs =
        nan_sampler_log_probs(ctx.p_opt_str("off_policy_mask_nan_sampler_logps")?)?;
    if let Some(v) = ctx.p_opt_f64("sapo_temperature_pos")? {
        cfg.sapo_temperature_pos = v;
    }
    if let Some(v) = ctx.p_opt_f64("sapo_temperature_neg")? {
        cfg.sapo_temperature_neg = v;
    }
    let d = VespoGamma::default();
    cfg.vespo = VespoGamma {
        k_pos: ctx.p_opt_f64("vespo_k_pos")?.unwrap_or(d.k_pos),
        lambda_pos: ctx.p_opt_f64("vespo_lambda_pos")?.unwrap_or(d.lambda_pos),
        k_neg: ctx.p_opt_f64("vespo_k_neg")?.unwrap_or(d.k_neg),
        lambda_neg: ctx.p_opt_f64("vespo_lambda_neg")?.unwrap_or(d.lambda_neg),
    };
    cfg.norm = TrlNormalizer {
        max_completion_length: ctx.p_f64("max_completion_length")?,
        num_items_in_batch: ctx.p_f64("num_items_in_batch")?,
        num_processes: ctx.p_f64("num_processes")?,
        gradient_accumulation_steps: ctx.p_f64("current_gradient_accumulation_steps")?,
        train: is_train(ctx)?,
        steps_per_generation: ctx.p_opt_f64("steps_per_generation")?,
    };
    let coef = ctx.p_opt_f64("entropy_coef")?.unwrap_or(0.0);
    let adaptive = opt_bool(ctx, "use_adaptive_entropy")?;
    if coef != 0.0 || adaptive {
        cfg.entropy_bonus = Some(EntropyBonus {
            coef,
            adaptive: if adaptive {
                Some(AdaptiveEntropy {
                    target: ctx.p_f64("entropy_target")?,
                    coef_min: ctx.p_f64("entropy_coef_min")?,
                    coef_max: ctx.p_f64("entropy_coef_max")?,
                    coef_delta: ctx.p_f64("entropy_coef_delta")?,
                    last_world_entropy: ctx.p_f64("_last_world_entropy")?,
                })
            } else {
                None
            },
        });
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Whether TRL's vLLM importance-sampling ratio is one per row (`(B, 1)`).
pub fn is_ratio_per_row(ctx: &Ctx, dims: Dims) -> Result<bool, Fail> {
    Ok(ctx.has("importance_sampling_ratio")
        && ctx.shape("importance_sampling_ratio")?.last() == Some(&1)
        && dims.seq != 1)
}

fn trl_grpo_loss<F: Real>(ctx: &Ctx, gspo_token: bool) -> OpResult {
    let cfg = grpo_config(ctx, gspo_token)?;
    let dims = ctx.dims("per_token_logps")?;
    let lp = ctx.f::<F>("per_token_logps")?;
    let ent = ctx.f::<F>("entropies")?;
    let mask = loss_mask(ctx)?;
    let adv = ctx.f::<F>("advantages")?;
    let old = ctx.f_opt::<F>("old_per_token_logps")?;
    let rf = ctx.f_opt::<F>("ref_per_token_logps")?;
    let samp = ctx.f_opt::<F>("sampling_per_token_logps")?;
    let is = ctx.f_opt::<F>("importance_sampling_ratio")?;
    let is_row = is_ratio_per_row(ctx, dims)?;
    let mut x = GrpoInputs::new(dims, &lp, &ent, &mask, &adv);
    x.old_log_probs = old.as_deref();
    x.ref_log_probs = rf.as_deref();
    x.sampling_log_probs = samp.as_deref();
    x.importance_sampling_ratio = is.as_deref().map(|v| {
        if is_row {
            TokenOrRow::Row(v)
        } else {
            TokenOrRow::Token(v)
        }
    });
    let mut g_lp = vec![F::zero(); dims.len()];
    let mut g_ent = vec![F::zero(); dims.len()];
    let mut scratch = vec![F::zero(); dims.len()];
    let out = grpo_loss(&cfg, &x, Some(&mut g_lp), Some(&mut g_ent), &mut scratch)?;
    let mut o = Outputs::new();
    o.scalar("loss", out.loss);
    o.scalar("entropy", out.entropy);
    if cfg.loss_type.is_clipped() {
        put_clip(&mut o, &out.clip);
    }
    if cfg.loss_type == GrpoLossType::Cispo {
        o.scalar("cispo_clip_ratio", out.cispo_clip_ratio);
    }
    if cfg.loss_type == GrpoLossType::Vespo {
        o.scalar("vespo/phi_seq_mean", out.vespo_phi_seq_mean);
    }
    if cfg.beta != 0.0 {
        o.scalar("kl", out.kl);
    }
    if cfg.entropy_bonus.is_some() {
        o.scalar("policy_loss", out.policy_loss);
        o.scalar("entropy_coef", out.entropy_coef);
    }
    let cot = ctx.cot_scalar::<F>("loss")?;
    let scale = |g: &[F]| g.iter().map(|&v| v * cot).collect::<Vec<F>>();
    o.grad("per_token_logps", &scale(&g_lp));
    o.grad("entropies", &scale(&g_ent));
    Ok(o)
}

pub(crate) fn gmpo_config(ctx: &Ctx) -> Result<GmpoConfig, Fail> {
    let mut cfg = GmpoConfig::trl();
    cfg.eps_low = ctx.p_f64("epsilon")?;
    cfg.eps_high = ctx.p_f64("epsilon_high")?;
    cfg.beta = ctx.p_f64("beta")?;
    cfg.top_entropy_quantile = ctx.p_f64("top_entropy_quantile")?;
    cfg.gradient_accumulation_steps = ctx.p_f64("current_gradient_accumulation_steps")?;
    cfg.train = is_train(ctx)?;
    Ok(cfg)
}

fn trl_gmpo_loss<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = gmpo_config(ctx)?;
    let dims = ctx.dims("per_token_logps")?;
    let lp = ctx.f::<F>("per_token_logps")?;
    let ent = ctx.f::<F>("entropies")?;
    let mask = loss_mask(ctx)?;
    let adv = ctx.f::<F>("advantages")?;
    let old = ctx.f_opt::<F>("old_per_token_logps")?;
    let rf = ctx.f_opt::<F>("ref_per_token_logps")?;
    let mut x = GrpoInputs::new(dims, &lp, &ent, &mask, &adv);
    x.old_log_probs = old.as_deref();
    x.ref_log_probs = rf.as_deref();
    let mut g = vec![F::zero(); dims.len()];
    let mut scratch = vec![F::zero(); dims.len()];
    let out = gmpo_loss(&cfg, &x, Some(&mut g), &mut scratch)?;
    let mut o = Outputs::new();
    o.scalar("loss", out.loss);
    o.scalar("entropy", out.entropy);
    if cfg.beta != 0.0 {
        o.scalar("kl", out.kl);
    }
    put_clip(&mut o, &out.clip);
    let cot = ctx.cot_scalar::<F>("loss")?;
    let g: Vec<F> = g.iter().map(|&v| v * cot).collect();
    o.grad("per_token_logps", &g);
    Ok(o)
}

pub(crate) fn rloo_config(ctx: &Ctx) -> Result<RlooConfig, Fail> {
    let mut cfg = RlooConfig::trl();
    cfg.eps_low = ctx.p_f64("epsilon")?;
    cfg.eps_high = ctx.p_f64("epsilon_high")?;
    let _ = is_train(ctx)?;
    Ok(cfg)
}

fn trl_rloo_loss<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = rloo_config(ctx)?;
    let dims = ctx.dims("per_token_logps")?;
    let lp = ctx.f::<F>("per_token_logps")?;
    let ent = ctx.f::<F>("entropies")?;
    let mask = ctx.mask("completion_mask")?;
    let adv = ctx.f::<F>("advantages")?;
    let old = ctx.f::<F>("old_logps")?;
    let x = GrpoInputs::new(dims, &lp, &ent, &mask, &adv);
    let mut g = vec![F::zero(); dims.len()];
    let out = rloo_loss(&cfg, &x, &old, Some(&mut g))?;
    let mut o = Outputs::new();
    o.scalar("loss", out.loss);
    o.scalar("entropy", out.entropy);
    put_clip(&mut o, &out.clip);
    let cot = ctx.cot_scalar::<F>("loss")?;
    let g: Vec<F> = g.iter().map(|&v| v * cot).collect();
    o.grad("per_token_logps", &g);
    Ok(o)
}

pub(crate) fn gamma_config(ctx: &Ctx) -> Result<VespoGamma, Fail> {
    Ok(VespoGamma {
        k_pos: ctx.p_f64("k_pos")?,
        lambda_pos: ctx.p_f64("lambda_pos")?,
        k_neg: ctx.p_f64("k_neg")?,
        lambda_neg: ctx.p_f64("lambda_neg")?,
    })
}

fn trl_gamma_weights<F: Real>(ctx: &Ctx) -> OpResult {
    let gamma = gamma_config(ctx)?;
    let dims: Dims = ctx.dims("log_ratio_per_token")?;
    let adv = ctx.f::<F>("advantages")?;
    let lr = ctx.f::<F>("log_ratio_per_token")?;
    let mask = ctx.mask("mask")?;
    let is = ctx.f_opt::<F>("importance_sampling_ratio")?;
    let mut phi = vec![F::zero(); dims.batch];
    vespo_gamma_weights(
        &gamma,
        dims,
        &adv,
        &lr,
        &mask,
        is.as_deref().map(TokenOrRow::Token),
        &mut phi,
    )?;
    let mut o = Outputs::new();
    o.put("phi_seq", &phi);
    Ok(o)
}
