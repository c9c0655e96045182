//! Sequence masks and PF-PPO weights on burn tensors: handlers for the
//! `burn-*` backends.

use super::f2;
use crate::case::{Ctx, OpResult, Outputs};
use crate::ops::rollout::nan_sampler_log_probs;
use crate::ops::sequence::int_list;
use posttrain_burn::burn::tensor::{Int, Tensor, TensorData};
use posttrain_burn::{mask2, tensor1, to_vec, to_vec_bool, Device};
use posttrain_core::sequence::{PfPpoReweight, RewardPenaltyConfig};
use serde_json::Value;

/// Runs `op` if this family owns it.
pub fn run(op: &str, ctx: &Ctx, d: &Device) -> Option<OpResult> {
    Some(match op {
        "verl.get_response_mask" => response_mask(ctx, d),
        "torchtune.truncate_sequence_at_first_stop_token" => truncate(ctx, d),
        "torchtune.get_reward_penalty_mask" => penalty(ctx, d),
        "trl.get_high_entropy_mask" => entropy_mask(ctx, d),
        "trl.get_off_policy_mask" => off_policy(ctx, d),
        "verl.compute_pf_ppo_reweight_data" => pf_ppo(ctx, d),
        _ => return None,
    })
}

fn ids2(
    ctx: &Ctx,
    name: &str,
    d: &Device,
) -> Result<(Tensor<2, Int>, [usize; 2]), crate::case::Fail> {
    let dims = ctx.dims(name)?;
    let shape = [dims.batch, dims.seq];
    let v = ctx.i64(name)?;
    posttrain_core::error::check_len(name_static(name), v.len(), shape[0] * shape[1])?;
    Ok((Tensor::from_data(TensorData::new(v, shape), d), shape))
}

fn name_static(name: &str) -> &'static str {
    match name {
        "response_id" => "response_id",
        "sequences" => "sequences",
        _ => "ids",
    }
}

fn response_mask(ctx: &Ctx, d: &Device) -> OpResult {
    let eos = int_list(ctx, "eos_token")?;
    let (ids, _) = ids2(ctx, "response_id", d)?;
    let mask = posttrain_burn::sequence::response_mask_from_eos(ids, &eos);
    let mut o = Outputs::new();
    o.put_bool("response_mask", &to_vec_bool(mask));
    Ok(o)
}

fn truncate(ctx: &Ctx, d: &Device) -> OpResult {
    let (seq, _) = ids2(ctx, "sequences", d)?;
    let stops = ctx.i64("stop_tokens")?;
    let fill = ctx.p_i64("fill_value")?;
    let (seq, pad) = posttrain_burn::sequence::truncate_at_first_stop_token(seq, &stops, fill);
    let seq: Vec<i64> = seq
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .map_err(|e| crate::case::Fail::Harness(format!("{e:?}")))?;
    let mut o = Outputs::new();
    o.put_bool("padding_mask", &to_vec_bool(pad))
        .put_i64("sequences", &seq);
    Ok(o)
}

fn penalty(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = RewardPenaltyConfig {
        penalise_no_eos: ctx.p_bool("penalise_no_eos")?,
        min_response_length: match ctx.param("min_response_length") {
            None | Some(Value::Null) => None,
            _ => Some(ctx.p_i64("min_response_length")?),
        },
    };
    let dims = ctx.dims("padding_masks")?;
    let shape = [dims.batch, dims.seq];
    let pad = mask2(&ctx.mask("padding_masks")?, shape, d)?;
    let lens = ctx.i64("seq_lens")?;
    let n = lens.len();
    let lens = Tensor::<1, Int>::from_data(TensorData::new(lens, [n]), d);
    let out = posttrain_burn::sequence::reward_penalty_mask(&cfg, &pad, lens)?;
    let mut o = Outputs::new();
    o.put_bool("reward_penalty_mask", &to_vec_bool(out));
    Ok(o)
}

fn entropy_mask(ctx: &Ctx, d: &Device) -> OpResult {
    let q = ctx.p_f64("threshold")?;
    let dims = ctx.dims("entropies")?;
    let shape = [dims.batch, dims.seq];
    let h = f2(ctx, "entropies", shape, d)?;
    let mask = mask2(&ctx.mask("mask")?, shape, d)?;
    let (out, _) = posttrain_burn::sequence::high_entropy_mask(h, &mask, q)?;
    let mut o = Outputs::new();
    o.put_bool("entropy_mask", &to_vec_bool(out));
    Ok(o)
}

fn off_policy(ctx: &Ctx, d: &Device) -> OpResult {
    let thr = ctx.p_f64("off_policy_threshold")?;
    let nan = nan_sampler_log_probs(ctx.p_opt_str("off_policy_mask_nan_sampler_logps")?)?;
    let dims = ctx.dims("per_token_logps")?;
    let shape = [dims.batch, dims.seq];
    let adv = tensor1(&ctx.f::<f64>("advantages")?, d);
    let lp = f2(ctx, "per_token_logps", shape, d)?;
    let sp = f2(ctx, "sampling_per_token_logps", shape, d)?;
    let mask = mask2(&ctx.mask("mask")?, shape, d)?;
    let keep = posttrain_burn::sequence::off_policy_sequence_mask(adv, lp, sp, &mask, thr, nan)?;
    let mut o = Outputs::new();
    o.put_bool("off_policy_mask", &to_vec_bool(keep));
    Ok(o)
}

fn pf_ppo(ctx: &Ctx, d: &Device) -> OpResult {
    let method = PfPpoReweight::parse(
        ctx.p_str("reweight_method")?,
        ctx.p_opt_f64("weight_pow")?.unwrap_or(2.0),
    )?;
    let dims = ctx.dims("token_level_scores")?;
    let scores = f2(ctx, "token_level_scores", [dims.batch, dims.seq], d)?;
    let w = posttrain_burn::sequence::pf_ppo_sampling_weights(method, scores);
    let mut o = Outputs::new();
    o.put("weights", &to_vec(w));
    Ok(o)
}
