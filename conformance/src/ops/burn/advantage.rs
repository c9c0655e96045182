//! Advantage estimators, rewards and the KL controller on burn tensors:
//! handlers for the `burn-*` backends. Same ops and parameter parsing as the
//! core handlers (`ops::advantage`, `ops::kl`), calling `posttrain_burn::advantage`.

use super::as2;
use crate::case::{Ctx, Fail, OpResult, Outputs};
use crate::ops::advantage::{
    outcome_eps_scale, reward_clip, str_list, trl_weights, unknown_estimator, usize_param,
    REWARD_NAMES,
};
use crate::ops::kl::controller;
use posttrain_burn::advantage::{self as adv, AdvantagesReturns, EosPosition, Groups, RewardLog};
use posttrain_burn::{mask2, tensor1, tensor2, to_vec, Bool, Device, Tensor};
use posttrain_core::advantage::{
    GaeConfig, GroupNormConfig, MultiRewardConfig, OtbConfig, PassAtKConfig, RlooConfig,
    SingletonGroup,
};
use posttrain_core::kl::{KlConfig, KlEstimator};
use posttrain_core::stats::WhitenConfig;
use posttrain_core::{Error, Preset};

/// Runs `op` if this family owns it.
pub fn run(op: &str, ctx: &Ctx, d: &Device) -> Option<OpResult> {
    if let Some(skip) = unknown_estimator(op, ctx) {
        return Some(Err(skip));
    }
    Some(match op {
        "verl.compute_gae_advantage_return" => verl_gae(ctx, d),
        "torchtune.estimate_advantages" => torchtune_gae(ctx, d),
        "verl.compute_grpo_outcome_advantage"
        | "verl.compute_grpo_vectorized_outcome_advantage"
        | "verl.compute_grpo_passk_outcome_advantage"
        | "verl.compute_gpg_outcome_advantage"
        | "verl.compute_rloo_outcome_advantage"
        | "verl.compute_rloo_vectorized_outcome_advantage"
        | "verl.compute_opo_outcome_advantage"
        | "verl.compute_reinforce_plus_plus_baseline_outcome_advantage" => verl_outcome(op, ctx, d),
        "verl.compute_gdpo_outcome_advantage" => verl_gdpo(ctx, d),
        "verl.compute_reinforce_plus_plus_outcome_advantage" => verl_rpp(ctx, d),
        "verl.compute_remax_outcome_advantage" => verl_remax(ctx, d),
        "verl.compute_optimal_token_baseline_advantage" => verl_otb(ctx, d, false),
        "verl.compute_multi_turn_optimal_token_baseline_advantage" => verl_otb(ctx, d, true),
        "torchtune.grpo_advantages" => torchtune_grpo(ctx, d),
        "trl.grpo_advantages" => trl_grpo(ctx, d),
        "trl.rloo_advantages" => trl_rloo(ctx, d),
        "verl.apply_kl_penalty" => verl_apply_kl_penalty(ctx, d),
        "verl.compute_rewards" => verl_compute_rewards(ctx, d),
        "verl.kl_controller" => verl_kl_controller(ctx, d),
        "openrlhf.compute_reward" => openrlhf_compute_reward(ctx, d),
        "torchtune.get_rewards_ppo" => torchtune_rewards(ctx, d),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// inputs (each tensor with its own shape: the op checks that they agree)
// ---------------------------------------------------------------------------

fn t2(ctx: &Ctx, name: &str, d: &Device) -> Result<Tensor<2>, Fail> {
    let shape = as2(&ctx.shape(name)?);
    Ok(tensor2(&ctx.f::<f64>(name)?, shape, d)?)
}

fn t2_opt(ctx: &Ctx, name: &str, d: &Device) -> Result<Option<Tensor<2>>, Fail> {
    if ctx.has(name) {
        t2(ctx, name, d).map(Some)
    } else {
        Ok(None)
    }
}

fn m2(ctx: &Ctx, name: &str, d: &Device) -> Result<Tensor<2, Bool>, Fail> {
    let shape = as2(&ctx.shape(name)?);
    Ok(mask2(&ctx.mask(name)?, shape, d)?)
}

fn t1(ctx: &Ctx, name: &str, d: &Device) -> Result<Tensor<1>, Fail> {
    Ok(tensor1(&ctx.f::<f64>(name)?, d))
}

/// `ShapeMismatch` unless the two `[batch, seq]` shapes agree.
fn same(input: &'static str, got: [usize; 2], want: [usize; 2]) -> Result<(), Fail> {
    if got == want {
        return Ok(());
    }
    Err(Error::ShapeMismatch {
        input,
        expected: want[0] * want[1],
        got: got[0] * got[1],
    }
    .into())
}

fn both(r: AdvantagesReturns) -> Outputs {
    let mut o = Outputs::new();
    o.put("advantages", &to_vec(r.advantages))
        .put("returns", &to_vec(r.returns));
    o
}

fn same_both(a: Tensor<2>) -> Outputs {
    let v = to_vec(a);
    let mut o = Outputs::new();
    o.put("advantages", &v).put("returns", &v);
    o
}

// ---------------------------------------------------------------------------
// verl / torchtune estimators
// ---------------------------------------------------------------------------

fn verl_gae(ctx: &Ctx, d: &Device) -> OpResult {
    let r = t2(ctx, "token_level_rewards", d)?;
    let v = t2(ctx, "values", d)?;
    let m = m2(ctx, "response_mask", d)?;
    let cfg = GaeConfig::preset(Preset::Verl, ctx.p_f64("gamma")?, ctx.p_f64("lam")?)?;
    Ok(both(adv::gae_advantages_returns(&cfg, r, v, &m)?))
}

fn torchtune_gae(ctx: &Ctx, d: &Device) -> OpResult {
    let v = t2(ctx, "values", d)?;
    let r = t2(ctx, "rewards", d)?;
    let mut cfg = GaeConfig::preset(Preset::Torchtune, ctx.p_f64("gamma")?, ctx.p_f64("lmbda")?)?;
    let m = if ctx.has("masks") {
        m2(ctx, "masks", d)?
    } else {
        // `whiten(x)` without a mask: `x.mean()`, `x.var()`; nothing zeroed.
        cfg.whiten = Some(WhitenConfig {
            keep_mean: true,
            ..WhitenConfig::preset(Preset::Trl)
        });
        let shape = v.dims();
        mask2(&vec![true; shape[0] * shape[1]], shape, d)?
    };
    Ok(both(adv::gae_advantages_returns(&cfg, r, v, &m)?))
}

fn verl_outcome(op: &str, ctx: &Ctx, d: &Device) -> OpResult {
    let r = t2(ctx, "token_level_rewards", d)?;
    let m = m2(ctx, "response_mask", d)?;
    same("response_mask", m.dims(), r.dims())?;
    let groups = Groups::new(&ctx.i64("index")?, d)?;
    let scores = adv::outcome_scores(r)?;
    let (eps, scale) = outcome_eps_scale(ctx)?;
    let a = match op {
        "verl.compute_grpo_outcome_advantage"
        | "verl.compute_grpo_vectorized_outcome_advantage" => {
            let cfg = GroupNormConfig::new(scale, eps, true, SingletonGroup::MeanZeroStdOne)?;
            adv::group_zscore_advantages(&cfg, scores, &groups)?
        }
        "verl.compute_grpo_passk_outcome_advantage" => {
            let cfg = PassAtKConfig {
                scale_by_std: scale,
                std_eps: eps,
            };
            adv::pass_at_k_advantages(&cfg, scores, &groups)?
        }
        "verl.compute_gpg_outcome_advantage" => {
            adv::gpg_advantages(scores, &groups, ctx.p_f64("f_norm")?)?
        }
        "verl.compute_rloo_outcome_advantage" => {
            adv::leave_one_out_advantages(scores, &groups, SingletonGroup::RawScore)?
        }
        "verl.compute_rloo_vectorized_outcome_advantage" => {
            adv::leave_one_out_advantages(scores, &groups, SingletonGroup::Zero)?
        }
        "verl.compute_opo_outcome_advantage" => {
            let b = m.dims()[0];
            let lengths = m.clone().float().sum_dim(1).reshape([b]);
            adv::length_weighted_baseline_advantages(scores, lengths, &groups)?
        }
        _ => {
            // REINFORCE++ with a group-mean baseline, whitened over tokens.
            let a = adv::reinforce_plus_plus_baseline_advantages(scores, &groups, &m)?;
            return Ok(same_both(a));
        }
    };
    Ok(same_both(adv::broadcast_to_tokens(a, &m)?))
}

fn verl_gdpo(ctx: &Ctx, d: &Device) -> OpResult {
    let m = m2(ctx, "response_mask", d)?;
    let groups = Groups::new(&ctx.i64("index")?, d)?;
    let b = m.dims()[0];
    let keys = str_list(ctx, "gdpo_reward_keys")?;
    let key_scores: Vec<Tensor<1>> = match &keys {
        None => {
            let r = t2(ctx, "token_level_rewards", d)?;
            same("token_level_rewards", r.dims(), m.dims())?;
            vec![adv::outcome_scores(r)?]
        }
        Some(keys) => keys
            .iter()
            .map(|k| {
                let v = ctx.f::<f64>(k)?;
                if v.len() != b {
                    return Err(Error::ShapeMismatch {
                        input: "gdpo reward",
                        expected: b,
                        got: v.len(),
                    }
                    .into());
                }
                Ok(tensor1(&v, d))
            })
            .collect::<Result<_, Fail>>()?,
    };
    let weights: Vec<f64> = match (&keys, ctx.p_opt_f64_list("gdpo_reward_weights")?) {
        (Some(_), Some(w)) => w,
        _ => vec![1.0; key_scores.len()],
    };
    let cfg = GroupNormConfig::new(
        ctx.p_bool("norm_adv_by_std_in_grpo")?,
        ctx.p_f64("epsilon")?,
        true,
        SingletonGroup::MeanZeroStdOne,
    )?;
    let out = adv::gdpo_advantages(&cfg, &key_scores, &weights, &m, &groups)?;
    Ok(same_both(out))
}

fn verl_rpp(ctx: &Ctx, d: &Device) -> OpResult {
    let r = t2(ctx, "token_level_rewards", d)?;
    let m = m2(ctx, "response_mask", d)?;
    Ok(both(adv::reinforce_plus_plus_advantages(
        r,
        &m,
        ctx.p_f64("gamma")?,
    )?))
}

fn verl_remax(ctx: &Ctx, d: &Device) -> OpResult {
    let r = t2(ctx, "token_level_rewards", d)?;
    let base = t1(ctx, "reward_baselines", d)?;
    let m = m2(ctx, "response_mask", d)?;
    Ok(both(adv::remax_advantages(r, base, &m)?))
}

fn verl_otb(ctx: &Ctx, d: &Device, multi_turn: bool) -> OpResult {
    let r = t2(ctx, "token_level_rewards", d)?;
    let m = m2(ctx, "response_mask", d)?;
    let groups = Groups::new(&ctx.i64("index")?, d)?;
    let lp = t2(ctx, "old_log_probs", d)?;
    let sp = t2(ctx, "sum_pi_squared", d)?;
    let is = t2_opt(ctx, "rollout_is_weights", d)?;
    let cfg = OtbConfig {
        handle_zero_tail: ctx.p_bool("handle_zero_tail")?,
        epsilon: ctx.p_f64("epsilon")?,
        compact_steps: multi_turn,
    };
    Ok(both(adv::optimal_token_baseline_advantages(
        &cfg, r, &m, &groups, lp, sp, is,
    )?))
}

fn torchtune_grpo(ctx: &Ctx, d: &Device) -> OpResult {
    let shape = as2(&ctx.shape("rewards")?);
    let r = ctx.f::<f64>("rewards")?;
    let index: Vec<i64> = (0..r.len()).map(|k| (k / shape[1].max(1)) as i64).collect();
    let groups = Groups::new(&index, d)?;
    let cfg = GroupNormConfig::preset(Preset::Torchtune);
    let a = adv::group_zscore_advantages(&cfg, tensor1(&r, d), &groups)?;
    let mut o = Outputs::new();
    o.put("advantages", &to_vec(a));
    Ok(o)
}

// ---------------------------------------------------------------------------
// TRL
// ---------------------------------------------------------------------------

fn put_log(o: &mut Outputs, log: RewardLog) {
    o.scalar("reward", to_vec(log.reward_mean)[0])
        .scalar("reward_std", to_vec(log.reward_std)[0])
        .scalar("frac_reward_zero_std", to_vec(log.frac_zero_std)[0]);
    if let Some(kl) = log.kl {
        o.scalar("kl", to_vec(kl)[0]);
    }
}

/// Per-reward-function `rewards/<name>/mean|std` metrics.
fn per_func_metrics(o: &mut Outputs, per_func: Tensor<2>) -> Result<(), Fail> {
    let (mean, std) = adv::reward_func_stats(per_func)?;
    let (mean, std) = (to_vec(mean), to_vec(std));
    for f in 0..mean.len() {
        let name = REWARD_NAMES.get(f).copied().unwrap_or("reward");
        o.scalar(&format!("rewards/{name}/mean"), mean[f]);
        o.scalar(&format!("rewards/{name}/std"), std[f]);
    }
    Ok(())
}

fn trl_grpo(ctx: &Ctx, d: &Device) -> OpResult {
    let per_func = t2(ctx, "rewards_per_func", d)?;
    let k = per_func.dims()[1];
    let weights = trl_weights::<f64>(ctx, k)?;
    let scaling = ctx.p_str("scale_rewards")?.parse()?;
    let aggregation = ctx.p_str("multi_objective_aggregation")?.parse()?;
    let cfg = MultiRewardConfig::new(usize_param(ctx, "num_generations")?, scaling, aggregation)?;
    let out = adv::multi_reward_group_advantages(&cfg, per_func.clone(), &weights)?;
    let mut o = Outputs::new();
    o.put("advantages", &to_vec(out.advantages));
    put_log(&mut o, out.log);
    per_func_metrics(&mut o, per_func)?;
    Ok(o)
}

fn trl_rloo(ctx: &Ctx, d: &Device) -> OpResult {
    let per_func = t2(ctx, "rewards_per_func", d)?;
    let k = per_func.dims()[1];
    let weights = trl_weights::<f64>(ctx, k)?;
    let mask = m2(ctx, "completion_mask", d)?;
    let old = t2(ctx, "old_per_token_logps", d)?;
    let rf = t2_opt(ctx, "ref_per_token_logps", d)?;
    let clip = reward_clip(ctx)?;
    let cfg = RlooConfig::new(
        usize_param(ctx, "num_generations")?,
        ctx.p_f64("beta")?,
        clip,
        ctx.p_bool("normalize_advantages")?,
    )?;
    let out =
        adv::leave_one_out_reward_advantages(&cfg, per_func.clone(), &weights, &mask, old, rf)?;
    let mut o = Outputs::new();
    o.put("advantages", &to_vec(out.advantages))
        .put("old_logps", &to_vec(out.seq_old_logps));
    put_log(&mut o, out.log);
    per_func_metrics(&mut o, per_func)?;
    Ok(o)
}

// ---------------------------------------------------------------------------
// Rewards and the KL controller
// ---------------------------------------------------------------------------

fn verl_apply_kl_penalty(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = KlConfig::parse_verl(ctx.p_str("kl_penalty")?)
        .map_err(|_| ctx.unsupported("kl_penalty"))?;
    let mut ctl = controller(ctx)?;
    let scores = t2(ctx, "token_level_scores", d)?;
    let old = t2(ctx, "old_log_probs", d)?;
    let rf = t2(ctx, "ref_log_prob", d)?;
    let mask = m2(ctx, "response_mask", d)?;
    let batch = scores.dims()[0];
    let beta = ctl.value();
    let out = adv::kl_penalized_rewards(&cfg, beta, scores, old, rf, Some(&mask))?;
    let mean_kl = to_vec(out.mean_kl.clone())[0];
    adv::update_kl_controller(&mut ctl, out.mean_kl, batch as u64)?;
    let mut o = Outputs::new();
    o.put("token_level_rewards", &to_vec(out.rewards))
        .scalar("reward_kl_penalty", mean_kl)
        .scalar("reward_kl_penalty_coeff", beta)
        .scalar("kl_ctrl_value", ctl.value());
    Ok(o)
}

fn verl_compute_rewards(ctx: &Ctx, d: &Device) -> OpResult {
    let scores = t2(ctx, "token_level_scores", d)?;
    let old = t2(ctx, "old_log_prob", d)?;
    let rf = t2(ctx, "ref_log_prob", d)?;
    let cfg = KlConfig::new(KlEstimator::K1);
    let out = adv::kl_penalized_rewards(&cfg, ctx.p_f64("kl_ratio")?, scores, old, rf, None)?;
    let mut o = Outputs::new();
    o.put("token_level_rewards", &to_vec(out.rewards));
    Ok(o)
}

fn verl_kl_controller(ctx: &Ctx, d: &Device) -> OpResult {
    let mut ctl = controller(ctx)?;
    let kls = t1(ctx, "current_kl", d)?;
    let steps = ctx.i64("n_steps")?;
    posttrain_core::error::check_len("n_steps", steps.len(), kls.dims()[0])?;
    let mut coefs = Vec::with_capacity(steps.len());
    for (k, &n) in steps.iter().enumerate() {
        if n < 0 {
            return Err(Error::OutOfRange {
                param: "n_steps",
                value: n as f64,
                rule: "must be ≥ 0",
            }
            .into());
        }
        adv::update_kl_controller(&mut ctl, kls.clone().narrow(0, k, 1), n as u64)?;
        coefs.push(ctl.value());
    }
    let mut o = Outputs::new();
    o.put("kl_coef", &coefs);
    Ok(o)
}

fn openrlhf_compute_reward(ctx: &Ctx, d: &Device) -> OpResult {
    let mut r = t1(ctx, "r", d)?;
    let kl = t2(ctx, "kl", d)?;
    let mask = m2(ctx, "action_mask", d)?;
    // OpenRLHF conventions: a non-positive coefficient means no penalty; the
    // score is clipped to `reward_clip_range` before it is placed.
    let beta = ctx.p_f64("kl_coef")?.max(0.0);
    if let Some(range) = ctx.p_opt_f64_list("reward_clip_range")? {
        let [lo, hi] = range[..] else {
            return Err(ctx.unsupported("reward_clip_range"));
        };
        r = r.clamp(lo, hi);
    }
    let out = adv::rewards_with_score_at_eos(r, EosPosition::LastValid(&mask), kl, beta)?;
    let n = out.grad_kl.dims()[0] * out.grad_kl.dims()[1];
    let mut o = Outputs::new();
    o.put("reward", &to_vec(out.rewards));
    if let Some(cot) = crate::ops::logits::cot_vec::<f64>(ctx, "reward", n)? {
        let g: Vec<f64> = to_vec(out.grad_kl)
            .iter()
            .zip(&cot)
            .map(|(g, c)| c * g)
            .collect();
        o.grad("kl", &g);
    }
    Ok(o)
}

fn torchtune_rewards(ctx: &Ctx, d: &Device) -> OpResult {
    let scores = t1(ctx, "scores", d)?;
    let lp = t2(ctx, "logprobs", d)?;
    let rf = t2(ctx, "ref_logprobs", d)?;
    let beta = ctx.p_f64("kl_coeff")?;
    let shape = lp.dims();
    let all = mask2(&vec![true; shape[0] * shape[1]], shape, d)?;
    let kl = posttrain_burn::kl::kl_estimate(&KlConfig::new(KlEstimator::K1), lp, rf, &all)?.value;
    let idx = if ctx.has("valid_score_idxs") {
        Some(ctx.i64("valid_score_idxs")?)
    } else {
        None
    };
    let pos = match &idx {
        Some(i) => EosPosition::Explicit(i),
        None => EosPosition::LastColumn,
    };
    let out = adv::rewards_with_score_at_eos(scores, pos, kl.clone(), beta)?;
    let kl_reward = kl.clone().mul_scalar(beta).neg();
    let mut o = Outputs::new();
    o.put("total_reward", &to_vec(out.rewards))
        .put("kl", &to_vec(kl))
        .put("kl_reward", &to_vec(kl_reward));
    Ok(o)
}
