//! Handlers for the `sequence` family: response / padding / penalty masks,
//! entropy and off-policy masks, PF-PPO sampling weights.

use crate::case::{Ctx, Fail, OpResult, Outputs};
use crate::ops::rollout::nan_sampler_log_probs;
use posttrain_core::sequence::{
    high_entropy_mask, off_policy_sequence_mask, pf_ppo_sampling_weights, response_mask_from_eos,
    reward_penalty_mask, truncate_at_first_stop_token, PfPpoReweight, RewardPenaltyConfig,
};
use posttrain_core::Real;
use serde_json::Value;

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    match op {
        "verl.get_response_mask" => Some(verl_response_mask(ctx)),
        "torchtune.truncate_sequence_at_first_stop_token" => Some(torchtune_truncate(ctx)),
        "torchtune.get_reward_penalty_mask" => Some(torchtune_penalty(ctx)),
        "trl.get_high_entropy_mask" => Some(trl_entropy_mask::<F>(ctx)),
        "trl.get_off_policy_mask" => Some(trl_off_policy_mask::<F>(ctx)),
        "verl.compute_pf_ppo_reweight_data" => Some(verl_pf_ppo::<F>(ctx)),
        _ => None,
    }
}

pub(crate) fn int_list(ctx: &Ctx, key: &str) -> Result<Vec<i64>, Fail> {
    let as_int = |v: &Value| v.as_i64().ok_or_else(|| ctx.unsupported(key));
    match ctx.param(key) {
        Some(Value::Array(a)) => a.iter().map(as_int).collect(),
        Some(v @ Value::Number(_)) => Ok(vec![as_int(v)?]),
        _ => Err(ctx.unsupported(key)),
    }
}

fn verl_response_mask(ctx: &Ctx) -> OpResult {
    let eos = int_list(ctx, "eos_token")?;
    let dims = ctx.dims("response_id")?;
    let ids = ctx.i64("response_id")?;
    let mut mask = vec![false; ids.len()];
    response_mask_from_eos(dims, &ids, &eos, &mut mask)?;
    let mut o = Outputs::new();
    o.put_bool("response_mask", &mask);
    Ok(o)
}

fn torchtune_truncate(ctx: &Ctx) -> OpResult {
    let dims = ctx.dims("sequences")?;
    let mut seq = ctx.i64("sequences")?;
    let stops = ctx.i64("stop_tokens")?;
    let fill = ctx.p_i64("fill_value")?;
    let mut pad = vec![false; seq.len()];
    truncate_at_first_stop_token(dims, &mut seq, &stops, fill, &mut pad)?;
    let mut o = Outputs::new();
    o.put_bool("padding_mask", &pad).put_i64("sequences", &seq);
    Ok(o)
}

fn torchtune_penalty(ctx: &Ctx) -> OpResult {
    let cfg = RewardPenaltyConfig {
        penalise_no_eos: ctx.p_bool("penalise_no_eos")?,
        min_response_length: match ctx.param("min_response_length") {
            None | Some(Value::Null) => None,
            _ => Some(ctx.p_i64("min_response_length")?),
        },
    };
    let dims = ctx.dims("padding_masks")?;
    let pad = ctx.mask("padding_masks")?;
    let lens = ctx.i64("seq_lens")?;
    let mut out = vec![false; dims.batch];
    reward_penalty_mask(&cfg, dims, &pad, &lens, &mut out)?;
    let mut o = Outputs::new();
    o.put_bool("reward_penalty_mask", &out);
    Ok(o)
}

fn trl_entropy_mask<F: Real>(ctx: &Ctx) -> OpResult {
    let q = ctx.p_f64("threshold")?;
    let dims = ctx.dims("entropies")?;
    let h = ctx.f::<F>("entropies")?;
    let mask = ctx.mask("mask")?;
    let mut out = vec![false; h.len()];
    let mut scratch = vec![F::zero(); h.len()];
    high_entropy_mask(dims, &h, &mask, q, &mut out, &mut scratch)?;
    let mut o = Outputs::new();
    o.put_bool("entropy_mask", &out);
    Ok(o)
}

/// TRL's `get_off_policy_mask`; `off_policy_mask_nan_sampler_logps`
/// (`"propagate"`: f2cd577, the default; `"as_on_policy"`: TRL 1.16.0) says
/// what a NaN sampler log-prob does.
fn trl_off_policy_mask<F: Real>(ctx: &Ctx) -> OpResult {
    let thr = ctx.p_f64("off_policy_threshold")?;
    let nan = nan_sampler_log_probs(ctx.p_opt_str("off_policy_mask_nan_sampler_logps")?)?;
    let dims = ctx.dims("per_token_logps")?;
    let adv = ctx.f::<F>("advantages")?;
    let lp = ctx.f::<F>("per_token_logps")?;
    let sp = ctx.f::<F>("sampling_per_token_logps")?;
    let mask = ctx.mask("mask")?;
    let mut keep = vec![false; dims.batch];
    off_policy_sequence_mask(dims, &adv, &lp, &sp, &mask, thr, nan, &mut keep)?;
    let mut o = Outputs::new();
    o.put_bool("off_policy_mask", &keep);
    Ok(o)
}

fn verl_pf_ppo<F: Real>(ctx: &Ctx) -> OpResult {
    let method = PfPpoReweight::parse(
        ctx.p_str("reweight_method")?,
        ctx.p_opt_f64("weight_pow")?.unwrap_or(2.0),
    )?;
    let dims = ctx.dims("token_level_scores")?;
    let scores = ctx.f::<F>("token_level_scores")?;
    let mut w = vec![F::zero(); dims.batch];
    pf_ppo_sampling_weights(method, dims, &scores, &mut w)?;
    let mut o = Outputs::new();
    o.put("weights", &w);
    Ok(o)
}
