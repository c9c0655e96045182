//! Handlers for the `advantage` family.

use crate::case::{Ctx, Fail, OpResult, Outputs};
use posttrain_core::advantage::{
    broadcast_to_tokens, gae_advantages_returns, gdpo_advantages, gpg_advantages,
    group_mean_baseline_advantages, group_zscore_advantages, leave_one_out_advantages,
    leave_one_out_reward_advantages, length_weighted_baseline_advantages,
    multi_reward_group_advantages, optimal_token_baseline_advantages, outcome_scores,
    pass_at_k_advantages, reinforce_plus_plus_advantages, remax_advantages, AdvantageEstimator,
    GaeConfig, GroupNormConfig, MultiRewardConfig, OtbConfig, PassAtKConfig, RlooConfig,
    SingletonGroup,
};
use posttrain_core::stats::{masked_whiten_in_place, nan_mean, nan_std, Reduce, WhitenConfig};
use posttrain_core::{Dims, Preset, Real};
use serde_json::Value;

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    if let Some(skip) = unknown_estimator(op, ctx) {
        return Some(Err(skip));
    }
    let r = match op {
        "verl.compute_gae_advantage_return" => verl_gae::<F>(ctx),
        "torchtune.estimate_advantages" => torchtune_gae::<F>(ctx),
        "verl.compute_grpo_outcome_advantage"
        | "verl.compute_grpo_vectorized_outcome_advantage"
        | "verl.compute_grpo_passk_outcome_advantage"
        | "verl.compute_gpg_outcome_advantage"
        | "verl.compute_rloo_outcome_advantage"
        | "verl.compute_rloo_vectorized_outcome_advantage"
        | "verl.compute_opo_outcome_advantage"
        | "verl.compute_reinforce_plus_plus_baseline_outcome_advantage" => {
            verl_outcome::<F>(op, ctx)
        }
        "verl.compute_gdpo_outcome_advantage" => verl_gdpo::<F>(ctx),
        "verl.compute_reinforce_plus_plus_outcome_advantage" => verl_rpp::<F>(ctx),
        "verl.compute_remax_outcome_advantage" => verl_remax::<F>(ctx),
        "verl.compute_optimal_token_baseline_advantage" => verl_otb::<F>(ctx, false),
        "verl.compute_multi_turn_optimal_token_baseline_advantage" => verl_otb::<F>(ctx, true),
        "torchtune.grpo_advantages" => torchtune_grpo::<F>(ctx),
        "trl.grpo_advantages" => trl_grpo::<F>(ctx),
        "trl.rloo_advantages" => trl_rloo::<F>(ctx),
        _ => return None,
    };
    Some(r)
}

/// A skip when a verl advantage op names an `adv_estimator` this crate does not know.
pub(crate) fn unknown_estimator(op: &str, ctx: &Ctx) -> Option<Fail> {
    if op.starts_with("verl.compute_") && op.ends_with("advantage") || op.ends_with("_return") {
        if let Some(name) = ctx.param("adv_estimator").and_then(Value::as_str) {
            if name.parse::<AdvantageEstimator>().is_err() {
                return Some(ctx.unsupported("adv_estimator"));
            }
        }
    }
    None
}

/// verl's outcome-estimator `(epsilon, norm_adv_by_std_in_grpo)` (defaults `1e-6`, true).
pub(crate) fn outcome_eps_scale(ctx: &Ctx) -> Result<(f64, bool), Fail> {
    let eps = ctx.p_opt_f64("epsilon")?.unwrap_or(1e-6);
    let scale = match ctx.param("norm_adv_by_std_in_grpo") {
        Some(Value::Bool(x)) => *x,
        _ => true,
    };
    Ok((eps, scale))
}

/// TRL RLOO's `reward_clip_range` (a pair or `None`).
pub(crate) fn reward_clip(ctx: &Ctx) -> Result<Option<(f64, f64)>, Fail> {
    Ok(match ctx.p_opt_f64_list("reward_clip_range")? {
        Some(v) if v.len() == 2 => Some((v[0], v[1])),
        Some(_) => return Err(ctx.unsupported("reward_clip_range")),
        None => None,
    })
}

fn both<F: Real>(adv: &[F], ret: &[F]) -> Outputs {
    let mut o = Outputs::new();
    o.put("advantages", adv).put("returns", ret);
    o
}

fn verl_gae<F: Real>(ctx: &Ctx) -> OpResult {
    let dims = ctx.dims("token_level_rewards")?;
    let r = ctx.f::<F>("token_level_rewards")?;
    let v = ctx.f::<F>("values")?;
    let m = ctx.mask("response_mask")?;
    let cfg = GaeConfig::preset(Preset::Verl, ctx.p_f64("gamma")?, ctx.p_f64("lam")?)?;
    let mut adv = vec![F::zero(); r.len()];
    let mut ret = vec![F::zero(); r.len()];
    gae_advantages_returns(&cfg, dims, &r, &v, &m, &mut adv, &mut ret)?;
    Ok(both(&adv, &ret))
}

fn torchtune_gae<F: Real>(ctx: &Ctx) -> OpResult {
    let dims = ctx.dims("values")?;
    let r = ctx.f::<F>("rewards")?;
    let v = ctx.f::<F>("values")?;
    let mut cfg = GaeConfig::preset(Preset::Torchtune, ctx.p_f64("gamma")?, ctx.p_f64("lmbda")?)?;
    let m = match ctx.mask_opt("masks")? {
        Some(m) => m,
        None => {
            // `whiten(x)` without a mask: `x.mean()`, `x.var()`; nothing zeroed.
            cfg.whiten = Some(WhitenConfig {
                keep_mean: true,
                ..WhitenConfig::preset(Preset::Trl)
            });
            vec![true; v.len()]
        }
    };
    let mut adv = vec![F::zero(); v.len()];
    let mut ret = vec![F::zero(); v.len()];
    gae_advantages_returns(&cfg, dims, &r, &v, &m, &mut adv, &mut ret)?;
    Ok(both(&adv, &ret))
}

fn verl_outcome<F: Real>(op: &str, ctx: &Ctx) -> OpResult {
    let dims = ctx.dims("token_level_rewards")?;
    let r = ctx.f::<F>("token_level_rewards")?;
    let m = ctx.mask("response_mask")?;
    let index = ctx.i64("index")?;
    let b = dims.batch;
    let mut scores = vec![F::zero(); b];
    outcome_scores(dims, &r, &mut scores)?;
    let mut perm = vec![0usize; index.len()];
    let mut a = vec![F::zero(); b];
    let (eps, scale) = outcome_eps_scale(ctx)?;
    match op {
        "verl.compute_grpo_outcome_advantage"
        | "verl.compute_grpo_vectorized_outcome_advantage" => {
            let cfg = GroupNormConfig::new(scale, eps, true, SingletonGroup::MeanZeroStdOne)?;
            group_zscore_advantages(&cfg, &scores, &index, &mut perm, &mut a)?;
        }
        "verl.compute_grpo_passk_outcome_advantage" => {
            let cfg = PassAtKConfig {
                scale_by_std: scale,
                std_eps: eps,
            };
            pass_at_k_advantages(&cfg, &scores, &index, &mut perm, &mut a)?;
        }
        "verl.compute_gpg_outcome_advantage" => {
            gpg_advantages(&scores, &index, ctx.p_f64("f_norm")?, &mut perm, &mut a)?;
        }
        "verl.compute_rloo_outcome_advantage" => {
            leave_one_out_advantages(&scores, &index, SingletonGroup::RawScore, &mut perm, &mut a)?;
        }
        "verl.compute_rloo_vectorized_outcome_advantage" => {
            leave_one_out_advantages(&scores, &index, SingletonGroup::Zero, &mut perm, &mut a)?;
        }
        "verl.compute_opo_outcome_advantage" => {
            let lengths: Vec<F> = (0..b)
                .map(|i| F::of_usize(m[dims.row(i)].iter().filter(|&&x| x).count()))
                .collect();
            length_weighted_baseline_advantages(&scores, &lengths, &index, &mut perm, &mut a)?;
        }
        _ => {
            // REINFORCE++ with a group-mean baseline, whitened over tokens.
            group_mean_baseline_advantages(&scores, &index, &mut perm, &mut a)?;
            let mut out = vec![F::zero(); dims.len()];
            broadcast_to_tokens(dims, &a, &m, &mut out)?;
            let w = WhitenConfig::preset(Preset::Verl);
            masked_whiten_in_place(&w, dims, Reduce::All, &mut out, &m)?;
            for (o, &k) in out.iter_mut().zip(&m) {
                if !k {
                    *o = F::zero();
                }
            }
            return Ok(both(&out, &out));
        }
    }
    let mut out = vec![F::zero(); dims.len()];
    broadcast_to_tokens(dims, &a, &m, &mut out)?;
    Ok(both(&out, &out))
}

pub(crate) fn str_list(ctx: &Ctx, key: &str) -> Result<Option<Vec<String>>, Fail> {
    match ctx.param(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => Ok(Some(
            a.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Fail::Harness(format!("param `{key}` is not a string list")))?,
        )),
        Some(_) => Err(Fail::Harness(format!("param `{key}` is not a list"))),
    }
}

fn verl_gdpo<F: Real>(ctx: &Ctx) -> OpResult {
    let dims = ctx.dims("token_level_rewards")?;
    let m = ctx.mask("response_mask")?;
    let index = ctx.i64("index")?;
    let b = dims.batch;
    let keys = str_list(ctx, "gdpo_reward_keys")?;
    let mut key_scores: Vec<F> = Vec::new();
    let n_keys = match &keys {
        None => {
            let r = ctx.f::<F>("token_level_rewards")?;
            key_scores.resize(b, F::zero());
            outcome_scores(dims, &r, &mut key_scores)?;
            1
        }
        Some(keys) => {
            for k in keys {
                let v = ctx.f::<F>(k)?;
                if v.len() != b {
                    return Err(posttrain_core::Error::ShapeMismatch {
                        input: "gdpo reward",
                        expected: b,
                        got: v.len(),
                    }
                    .into());
                }
                key_scores.extend(v);
            }
            keys.len()
        }
    };
    let weights: Vec<F> = match (&keys, ctx.p_opt_f64_list("gdpo_reward_weights")?) {
        (Some(_), Some(w)) => w.into_iter().map(F::of).collect(),
        _ => vec![F::one(); n_keys],
    };
    let eps = ctx.p_f64("epsilon")?;
    let cfg = GroupNormConfig::new(
        ctx.p_bool("norm_adv_by_std_in_grpo")?,
        eps,
        true,
        SingletonGroup::MeanZeroStdOne,
    )?;
    let mut perm = vec![0usize; index.len()];
    let mut scratch = vec![F::zero(); 2 * b];
    let mut out = vec![F::zero(); dims.len()];
    gdpo_advantages(
        &cfg,
        dims,
        &key_scores,
        &weights,
        &m,
        &index,
        &mut perm,
        &mut scratch,
        &mut out,
    )?;
    Ok(both(&out, &out))
}

fn verl_rpp<F: Real>(ctx: &Ctx) -> OpResult {
    let dims = ctx.dims("token_level_rewards")?;
    let r = ctx.f::<F>("token_level_rewards")?;
    let m = ctx.mask("response_mask")?;
    let mut adv = vec![F::zero(); r.len()];
    let mut ret = vec![F::zero(); r.len()];
    reinforce_plus_plus_advantages(dims, &r, &m, ctx.p_f64("gamma")?, &mut adv, &mut ret)?;
    Ok(both(&adv, &ret))
}

fn verl_remax<F: Real>(ctx: &Ctx) -> OpResult {
    let dims = ctx.dims("token_level_rewards")?;
    let r = ctx.f::<F>("token_level_rewards")?;
    let base = ctx.f::<F>("reward_baselines")?;
    let m = ctx.mask("response_mask")?;
    let mut adv = vec![F::zero(); r.len()];
    let mut ret = vec![F::zero(); r.len()];
    remax_advantages(dims, &r, &base, &m, &mut adv, &mut ret)?;
    Ok(both(&adv, &ret))
}

fn verl_otb<F: Real>(ctx: &Ctx, multi_turn: bool) -> OpResult {
    let dims = ctx.dims("token_level_rewards")?;
    let r = ctx.f::<F>("token_level_rewards")?;
    let m = ctx.mask("response_mask")?;
    let index = ctx.i64("index")?;
    let lp = ctx.f::<F>("old_log_probs")?;
    let sp = ctx.f::<F>("sum_pi_squared")?;
    let is = ctx.f_opt::<F>("rollout_is_weights")?;
    let cfg = OtbConfig {
        handle_zero_tail: ctx.p_bool("handle_zero_tail")?,
        epsilon: ctx.p_f64("epsilon")?,
        compact_steps: multi_turn,
    };
    let mut perm = vec![0usize; index.len()];
    let mut scratch = vec![F::zero(); dims.len() + 2 * dims.seq];
    let mut adv = vec![F::zero(); r.len()];
    let mut ret = vec![F::zero(); r.len()];
    optimal_token_baseline_advantages(
        &cfg,
        dims,
        &r,
        &m,
        &index,
        &lp,
        &sp,
        is.as_deref(),
        &mut perm,
        &mut scratch,
        &mut adv,
        &mut ret,
    )?;
    Ok(both(&adv, &ret))
}

fn torchtune_grpo<F: Real>(ctx: &Ctx) -> OpResult {
    let dims = ctx.dims("rewards")?;
    let r = ctx.f::<F>("rewards")?;
    let index: Vec<i64> = (0..r.len()).map(|k| (k / dims.seq) as i64).collect();
    let mut perm = vec![0usize; r.len()];
    let mut adv = vec![F::zero(); r.len()];
    let cfg = GroupNormConfig::preset(Preset::Torchtune);
    group_zscore_advantages(&cfg, &r, &index, &mut perm, &mut adv)?;
    let mut o = Outputs::new();
    o.put("advantages", &adv);
    Ok(o)
}

pub(crate) const REWARD_NAMES: [&str; 2] = ["accuracy", "format"];

/// Per-reward-function `rewards/<name>/mean|std` metrics.
fn per_func_metrics<F: Real>(
    o: &mut Outputs,
    per_func: &[F],
    b: usize,
    k: usize,
) -> Result<(), Fail> {
    let dims = Dims::new(b, k);
    let mut mean = vec![F::zero(); k];
    let mut std = vec![F::zero(); k];
    nan_mean(dims, Reduce::Columns, per_func, &mut mean)?;
    nan_std(dims, Reduce::Columns, per_func, &mut std, None)?;
    for f in 0..k {
        let name = REWARD_NAMES.get(f).copied().unwrap_or("reward");
        o.scalar(&format!("rewards/{name}/mean"), mean[f]);
        o.scalar(&format!("rewards/{name}/std"), std[f]);
    }
    Ok(())
}

pub(crate) fn trl_weights<F: Real>(ctx: &Ctx, k: usize) -> Result<Vec<F>, Fail> {
    Ok(match ctx.p_opt_f64_list("reward_weights")? {
        Some(w) => w.into_iter().map(F::of).collect(),
        None => vec![F::one(); k],
    })
}

pub(crate) fn usize_param(ctx: &Ctx, key: &str) -> Result<usize, Fail> {
    let v = ctx.p_i64(key)?;
    usize::try_from(v).map_err(|_| {
        Fail::Op(posttrain_core::Error::OutOfRange {
            param: "num_generations",
            value: v as f64,
            rule: "must be ≥ 1",
        })
    })
}

fn trl_grpo<F: Real>(ctx: &Ctx) -> OpResult {
    let dims = ctx.dims("rewards_per_func")?;
    let (b, k) = (dims.batch, dims.seq);
    let per_func = ctx.f::<F>("rewards_per_func")?;
    let weights = trl_weights::<F>(ctx, k)?;
    let scaling = ctx.p_str("scale_rewards")?.parse()?;
    let aggregation = ctx.p_str("multi_objective_aggregation")?.parse()?;
    let cfg = MultiRewardConfig::new(usize_param(ctx, "num_generations")?, scaling, aggregation)?;
    let mut rewards = vec![F::zero(); b];
    let mut stds = vec![F::zero(); b];
    let mut adv = vec![F::zero(); b];
    let log = multi_reward_group_advantages(
        &cfg,
        &per_func,
        &weights,
        &mut rewards,
        &mut stds,
        &mut adv,
    )?;
    let mut o = Outputs::new();
    o.put("advantages", &adv)
        .scalar("reward", log.reward_mean)
        .scalar("reward_std", log.reward_std)
        .scalar("frac_reward_zero_std", log.frac_zero_std);
    per_func_metrics(&mut o, &per_func, b, k)?;
    Ok(o)
}

fn trl_rloo<F: Real>(ctx: &Ctx) -> OpResult {
    let fdims = ctx.dims("rewards_per_func")?;
    let (b, k) = (fdims.batch, fdims.seq);
    let dims = ctx.dims("completion_mask")?;
    let per_func = ctx.f::<F>("rewards_per_func")?;
    let weights = trl_weights::<F>(ctx, k)?;
    let mask = ctx.mask("completion_mask")?;
    let old = ctx.f::<F>("old_per_token_logps")?;
    let rf = ctx.f_opt::<F>("ref_per_token_logps")?;
    let clip = reward_clip(ctx)?;
    let cfg = RlooConfig::new(
        usize_param(ctx, "num_generations")?,
        ctx.p_f64("beta")?,
        clip,
        ctx.p_bool("normalize_advantages")?,
    )?;
    let mut rewards = vec![F::zero(); b];
    let mut seq_old = vec![F::zero(); b];
    let mut adv = vec![F::zero(); b];
    let log = leave_one_out_reward_advantages(
        &cfg,
        dims,
        &per_func,
        &weights,
        &mask,
        &old,
        rf.as_deref(),
        &mut rewards,
        &mut seq_old,
        &mut adv,
    )?;
    let mut o = Outputs::new();
    o.put("advantages", &adv)
        .put("old_logps", &seq_old)
        .scalar("reward", log.reward_mean)
        .scalar("reward_std", log.reward_std)
        .scalar("frac_reward_zero_std", log.frac_zero_std);
    if let Some(kl) = log.kl {
        o.scalar("kl", kl);
    }
    per_func_metrics(&mut o, &per_func, b, k)?;
    Ok(o)
}
