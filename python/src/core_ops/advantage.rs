//! `advantage::*`: group advantages (GRPO, Dr. GRPO, RLOO, GPG, pass@k,
//! GDPO, …), GAE and discounted returns, REINFORCE++, ReMax, the optimal
//! token baseline.

use crate::core_api::{
    check_with, op_def, take_f64, to_value, Call, CallResult, ConfigDef, CoreReal, OpDef,
};
use posttrain_core::advantage::{
    broadcast_to_tokens, discounted_returns, gae_advantages_returns, gdpo_advantages,
    gpg_advantages, group_mean_baseline_advantages, group_zscore_advantages,
    leave_one_out_advantages, leave_one_out_reward_advantages, length_weighted_baseline_advantages,
    multi_reward_group_advantages, optimal_token_baseline_advantages, outcome_scores,
    pass_at_k_advantages, reinforce_plus_plus_advantages, remax_advantages, GaeConfig,
    GroupNormConfig, MultiRewardConfig, OtbConfig, PassAtKConfig, RewardLog, RlooConfig,
    SingletonGroup,
};
use posttrain_core::Preset;

pub(crate) fn ops() -> Vec<OpDef> {
    vec![
        op_def! {
            path: "advantage::group_zscore_advantages",
            doc: "GRPO's group-normalised advantages: A_i = (s_i − mean_g) / (std_g + ε) \
                  (or s_i − mean_g without scaling), groups given by `index`; singleton \
                  groups follow `cfg.singleton` (verl compute_grpo_outcome_advantage, TRL \
                  GRPOTrainer, OpenRLHF, torchtune). No gradient (advantages are constants).",
            params: ["cfg": "GroupNormConfig" => "scale_by_std, std_eps, bessel, singleton (ops.core.config(\"GroupNormConfig\", preset=...))"],
            inputs: [
                "scores": Real => "[N] one score per sequence",
                "index": Index => "[N] group id of each sequence",
            ],
            outputs: ["advantages" => "[N] the advantages"],
            vjp: [],
            run: run_group_zscore,
        },
        op_def! {
            path: "advantage::outcome_scores",
            doc: "One score per sequence: s_i = Σ_t r_{i,t}, the sum of its whole row of token \
                  rewards, padding included (verl's outcome estimators, \
                  token_level_rewards.sum(dim=-1)). No gradient.",
            params: [],
            inputs: ["rewards": Real => "[B, T] token-level rewards"],
            outputs: ["scores" => "[B] the row sums"],
            vjp: [],
            run: run_outcome_scores,
        },
        op_def! {
            path: "advantage::broadcast_to_tokens",
            doc: "Writes each sequence's scalar at its valid tokens and 0 elsewhere: \
                  out_{i,t} = a_i if mask_{i,t} else 0 (verl scores.unsqueeze(-1) * \
                  response_mask, as a selection). No gradient.",
            params: [],
            inputs: [
                "per_seq": Real => "[B] one value per sequence",
                "mask": Mask => "[B, T] valid tokens",
            ],
            outputs: ["out" => "[B, T] the broadcast values"],
            vjp: [],
            run: run_broadcast,
        },
        op_def! {
            path: "advantage::group_mean_baseline_advantages",
            doc: "Mean-baseline advantages A_i = s_i − mean_g (a singleton's mean is 0) — verl \
                  reinforce_plus_plus_baseline before its token whitening. No gradient.",
            params: [],
            inputs: [
                "scores": Real => "[N] one score per sequence",
                "index": Index => "[N] group id of each sequence",
            ],
            outputs: ["advantages" => "[N] the advantages"],
            vjp: [],
            run: run_group_mean_baseline,
        },
        op_def! {
            path: "advantage::gpg_advantages",
            doc: "GPG advantages A_i = α (s_i − mean_g) / f_norm with α = N / max(1, \
                  count_nonzero(s)) (a singleton's mean is 0) — verl compute_gpg_outcome_advantage, \
                  which ignores its `alpha` argument and never divides by the std. No gradient.",
            params: ["f_norm": "f64" => "the divisor (finite, ≠ 0; verl default 1.0)"],
            inputs: [
                "scores": Real => "[N] one score per sequence",
                "index": Index => "[N] group id of each sequence",
            ],
            outputs: ["advantages" => "[N] the advantages"],
            vjp: [],
            run: run_gpg,
        },
        op_def! {
            path: "advantage::leave_one_out_advantages",
            doc: "Leave-one-out (RLOO) advantages A_i = (n·s_i − Σ_g s)/(n − 1) = s_i − \
                  mean_{j≠i} s_j; singleton groups follow `singleton` (RawScore: verl \
                  compute_rloo_outcome_advantage; Zero: compute_rloo_vectorized_outcome_advantage; \
                  MeanZeroStdOne acts as RawScore). No gradient.",
            params: ["singleton": "SingletonGroup" => "MeanZeroStdOne | RawScore | Zero"],
            inputs: [
                "scores": Real => "[N] one score per sequence",
                "index": Index => "[N] group id of each sequence",
            ],
            outputs: ["advantages" => "[N] the advantages"],
            vjp: [],
            run: run_leave_one_out,
        },
        op_def! {
            path: "advantage::length_weighted_baseline_advantages",
            doc: "OPO advantages A_i = s_i − b_g with b_g = Σ_g len_j s_j / Σ_g len_j (a \
                  singleton's baseline is 0, a group of total length 0 has baseline 0) — verl \
                  compute_opo_outcome_advantage (len = valid tokens per sequence). No gradient.",
            params: [],
            inputs: [
                "scores": Real => "[N] one score per sequence",
                "lengths": Real => "[N] the length weight of each sequence",
                "index": Index => "[N] group id of each sequence",
            ],
            outputs: ["advantages" => "[N] the advantages"],
            vjp: [],
            run: run_length_weighted,
        },
        op_def! {
            path: "advantage::pass_at_k_advantages",
            doc: "Pass@k advantages: only the best member of each group gets a nonzero advantage, \
                  A_best = (s_(1) − s_(2)) / (std_g + ε) (Bessel std; or unscaled), others 0; \
                  ties give 0 — verl compute_grpo_passk_outcome_advantage. Every group needs ≥ 2 \
                  members. No gradient.",
            params: ["cfg": "PassAtKConfig" => "scale_by_std, std_eps"],
            inputs: [
                "scores": Real => "[N] one score per sequence",
                "index": Index => "[N] group id of each sequence",
            ],
            outputs: ["advantages" => "[N] the advantages"],
            vjp: [],
            run: run_pass_at_k,
        },
        op_def! {
            path: "advantage::gdpo_advantages",
            doc: "GDPO: a group z-score per reward component, S_i = Σ_k w_k · zscore_k(i), \
                  broadcast to the valid tokens, whitened over the valid tokens of the batch \
                  (verl masked_whiten) and zeroed on padding — verl \
                  compute_gdpo_outcome_advantage. Needs ≥ 2 valid tokens. No gradient.",
            params: ["cfg": "GroupNormConfig" => "the per-component z-score (verl: preset verl with its epsilon / norm_adv_by_std_in_grpo)"],
            inputs: [
                "key_scores": Real => "[K, B] one score per component and sequence (component-major)",
                "weights": Real => "[K] one weight per component",
                "mask": Mask => "[B, T] valid tokens",
                "index": Index => "[B] group id of each sequence",
            ],
            outputs: ["advantages" => "[B, T] the advantages"],
            vjp: [],
            run: run_gdpo,
        },
        op_def! {
            path: "advantage::gae_advantages_returns",
            doc: "Generalised advantage estimation: δ_t = r_t + γ V_{t+1} − V_t, A_t = δ_t + γλ \
                  A_{t+1} (V_T = A_T = 0), returns = A + V (un-whitened), advantages = \
                  whiten(A) per cfg.whiten; with skip_masked a masked step carries the next \
                  valid V and A; zero_masked zeroes padding after whitening (verl \
                  compute_gae_advantage_return: preset verl; torchtune estimate_advantages: \
                  preset torchtune). No gradient.",
            params: ["cfg": "GaeConfig" => "gamma, lam, skip_masked, whiten, zero_masked (ops.core.config(\"GaeConfig\", preset=..., gamma=..., lam=...))"],
            inputs: [
                "rewards": Real => "[B, T] token-level rewards",
                "values": Real => "[B, T] value estimates V_t",
                "mask": Mask => "[B, T] valid tokens",
            ],
            outputs: [
                "advantages" => "[B, T] the (whitened) advantages",
                "returns" => "[B, T] A + V before whitening",
            ],
            vjp: [],
            run: run_gae,
        },
        op_def! {
            path: "advantage::discounted_returns",
            doc: "Discounted returns over the valid tokens: G_t = r_t + γ G_{t+1} at valid t; a \
                  masked t returns 0, drops its reward and passes G_{t+1} through undiscounted \
                  (verl reinforce_plus_plus returns, observation tokens in multi-turn). No gradient.",
            params: ["gamma": "f64" => "the discount γ"],
            inputs: [
                "rewards": Real => "[B, T] token-level rewards",
                "mask": Mask => "[B, T] valid tokens",
            ],
            outputs: ["returns" => "[B, T] the discounted returns"],
            vjp: [],
            run: run_discounted_returns,
        },
        op_def! {
            path: "advantage::reinforce_plus_plus_advantages",
            doc: "REINFORCE++: A = mask · whiten_V(G), the discounted returns G (see \
                  discounted_returns) whitened over the valid tokens of the batch (verl \
                  masked_whiten), zero on padding — verl \
                  compute_reinforce_plus_plus_outcome_advantage. γ ∈ [0, 1]; needs ≥ 2 valid \
                  tokens. No gradient.",
            params: ["gamma": "f64" => "the discount γ ∈ [0, 1]"],
            inputs: [
                "rewards": Real => "[B, T] token-level rewards",
                "mask": Mask => "[B, T] valid tokens",
            ],
            outputs: [
                "advantages" => "[B, T] the whitened returns, 0 on padding",
                "returns" => "[B, T] the discounted returns G",
            ],
            vjp: [],
            run: run_reinforce_pp,
        },
        op_def! {
            path: "advantage::remax_advantages",
            doc: "ReMax: returns G_t = Σ_{u ≥ t, mask_u} r_u (every position) and advantages \
                  A_t = G_t − b_i·mask_t — verl compute_remax_outcome_advantage (b = the greedy \
                  rollout's reward). No gradient.",
            params: [],
            inputs: [
                "rewards": Real => "[B, T] token-level rewards",
                "baselines": Real => "[B] the baseline reward b_i of each sequence",
                "mask": Mask => "[B, T] valid tokens",
            ],
            outputs: [
                "advantages" => "[B, T] G_t − b_i at valid positions, G_t elsewhere",
                "returns" => "[B, T] the masked reward-to-go G_t",
            ],
            vjp: [],
            run: run_remax,
        },
        op_def! {
            path: "advantage::optimal_token_baseline_advantages",
            doc: "Optimal token baseline: G_t = Σ_{u≥t, valid} r_u, w_t = (1 − 2 e^{lp_t} + Σπ²_t) \
                  · ρ_t², W_t = Σ_{u≤t, valid} w_u, b_k = Σ_group G·W / (Σ_group W + ε) over the \
                  members' step k, A_t = G_t − b_k at valid t, 0 elsewhere; singleton groups b = 0; \
                  handle_zero_tail zeroes the unique longest member's baseline beyond the \
                  second-longest length — verl compute_optimal_token_baseline_advantage \
                  (compact_steps false), compute_multi_turn_optimal_token_baseline_advantage \
                  (compact_steps true). No gradient.",
            params: ["cfg": "OtbConfig" => "handle_zero_tail, epsilon, compact_steps"],
            inputs: [
                "rewards": Real => "[B, T] token-level rewards",
                "mask": Mask => "[B, T] valid tokens",
                "index": Index => "[B] group id of each sequence",
                "old_log_probs": Real => "[B, T] log π_old of the taken tokens",
                "sum_pi_squared": Real => "[B, T] Σ_v π(v)² at each step",
                "is_weights": Real opt => "[B, T] importance weights ρ (verl rollout_is_weights)",
            ],
            outputs: [
                "advantages" => "[B, T] G_t − b at valid tokens, 0 elsewhere",
                "returns" => "[B, T] the masked reward-to-go G_t",
            ],
            vjp: [],
            run: run_otb,
        },
        op_def! {
            path: "advantage::multi_reward_group_advantages",
            doc: "TRL GRPO advantages from several reward functions, NaN-aware, groups of \
                  cfg.group_size consecutive rows. sum_then_normalize: R_i = nansum_k w_k r_ik, \
                  A_i = (R_i − nanmean_g R)/(std + ε) with std the group's (Group), the batch's \
                  (Batch) or none (None); normalize_then_sum: R_i = nansum_k w_k (r_ik − \
                  nanmean_g r_k)/(nanstd_g r_k + ε), A_i = (R_i − nanmean R)/(nanstd R + ε). \
                  NaN → 0 at the end — TRL GRPOTrainer._generate_and_score_completions. \
                  Metrics: reward_mean, reward_std (NaN-mean/std of the weighted rewards; TRL \
                  reward, reward_std), frac_zero_std (frac_reward_zero_std). No gradient.",
            params: ["cfg": "MultiRewardConfig" => "group_size, scaling (Group | Batch | None), aggregation (SumThenNormalize | NormalizeThenSum), std_eps"],
            inputs: [
                "rewards_per_func": Real => "[B, K] one reward per completion and reward function (NaN: unscored)",
                "weights": Real => "[K] one weight per reward function",
            ],
            outputs: [
                "advantages" => "[B] one advantage per completion",
                "reward_mean" => "metric: NaN-mean of the weighted rewards",
                "reward_std" => "metric: NaN-std (Bessel) of the weighted rewards",
                "frac_zero_std" => "metric: share of completions whose std is (numerically) zero",
            ],
            vjp: [],
            run: run_multi_reward,
        },
        op_def! {
            path: "advantage::leave_one_out_reward_advantages",
            doc: "TRL RLOO advantages, groups of cfg.group_size consecutive rows: R_i = \
                  clip(nansum_k w_k r_ik) − β Σ_t (old − ref)_{i,t} (valid t), A_i = R_i − \
                  (nansum_g R − R_i)/(n_g − 1); if normalize A ← (A − nanmean A)/(nanstd A + ε); \
                  NaN → 0 — TRL RLOOTrainer._generate_and_score_completions. Metrics: \
                  reward_mean, reward_std (before clip and KL), frac_zero_std (share of groups), \
                  kl (mean per-token k1 KL, only with β ≠ 0). No gradient.",
            params: ["cfg": "advantage::RlooConfig" => "group_size, beta, reward_clip, normalize, std_eps"],
            inputs: [
                "rewards_per_func": Real => "[B, K] one reward per completion and reward function",
                "weights": Real => "[K] one weight per reward function",
                "completion_mask": Mask => "[B, T] valid completion tokens",
                "old_logps": Real => "[B, T] per-token log π_old",
                "ref_logps": Real opt => "[B, T] per-token log π_ref (required when beta ≠ 0)",
            ],
            outputs: [
                "advantages" => "[B] one advantage per completion",
                "seq_old_logps" => "[B] each sequence's summed old log-prob over valid tokens",
                "reward_mean" => "metric: NaN-mean of the weighted rewards",
                "reward_std" => "metric: NaN-std (Bessel) of the weighted rewards",
                "frac_zero_std" => "metric: share of groups whose std is (numerically) zero",
                "kl" => "metric: mean per-token k1 KL over valid tokens (only when beta ≠ 0)",
            ],
            vjp: [],
            run: run_rloo_reward,
        },
    ]
}

fn run_group_zscore<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: GroupNormConfig = c.param("cfg")?;
    let (scores, shape) = c.real("scores")?;
    let (index, _) = c.index("index")?;
    let mut perm = vec![0usize; scores.len()];
    let mut out = vec![F::zero(); scores.len()];
    group_zscore_advantages(&cfg, scores, index, &mut perm, &mut out)?;
    c.output("advantages", out, shape);
    Ok(())
}

fn run_outcome_scores<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let dims = c.dims_of("rewards")?;
    let (rewards, _) = c.real("rewards")?;
    let mut out = vec![F::zero(); dims.batch];
    outcome_scores(dims, rewards, &mut out)?;
    c.output("scores", out, &[dims.batch]);
    Ok(())
}

fn run_broadcast<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let dims = c.dims_of("mask")?;
    let (mask, shape) = c.mask("mask")?;
    let (per_seq, _) = c.real("per_seq")?;
    let mut out = vec![F::zero(); dims.len()];
    broadcast_to_tokens(dims, per_seq, mask, &mut out)?;
    c.output("out", out, shape);
    Ok(())
}

fn run_group_mean_baseline<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let (scores, shape) = c.real("scores")?;
    let (index, _) = c.index("index")?;
    let mut perm = vec![0usize; scores.len()];
    let mut out = vec![F::zero(); scores.len()];
    group_mean_baseline_advantages(scores, index, &mut perm, &mut out)?;
    c.output("advantages", out, shape);
    Ok(())
}

fn run_gpg<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let f_norm: f64 = c.param("f_norm")?;
    let (scores, shape) = c.real("scores")?;
    let (index, _) = c.index("index")?;
    let mut perm = vec![0usize; scores.len()];
    let mut out = vec![F::zero(); scores.len()];
    gpg_advantages(scores, index, f_norm, &mut perm, &mut out)?;
    c.output("advantages", out, shape);
    Ok(())
}

fn run_leave_one_out<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let singleton: SingletonGroup = c.param("singleton")?;
    let (scores, shape) = c.real("scores")?;
    let (index, _) = c.index("index")?;
    let mut perm = vec![0usize; scores.len()];
    let mut out = vec![F::zero(); scores.len()];
    leave_one_out_advantages(scores, index, singleton, &mut perm, &mut out)?;
    c.output("advantages", out, shape);
    Ok(())
}

fn run_length_weighted<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let (scores, shape) = c.real("scores")?;
    let (lengths, _) = c.real("lengths")?;
    let (index, _) = c.index("index")?;
    let mut perm = vec![0usize; scores.len()];
    let mut out = vec![F::zero(); scores.len()];
    length_weighted_baseline_advantages(scores, lengths, index, &mut perm, &mut out)?;
    c.output("advantages", out, shape);
    Ok(())
}

fn run_pass_at_k<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: PassAtKConfig = c.param("cfg")?;
    let (scores, shape) = c.real("scores")?;
    let (index, _) = c.index("index")?;
    let mut perm = vec![0usize; scores.len()];
    let mut out = vec![F::zero(); scores.len()];
    pass_at_k_advantages(&cfg, scores, index, &mut perm, &mut out)?;
    c.output("advantages", out, shape);
    Ok(())
}

fn run_gdpo<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: GroupNormConfig = c.param("cfg")?;
    let dims = c.dims_of("mask")?;
    let (mask, shape) = c.mask("mask")?;
    let (key_scores, _) = c.real("key_scores")?;
    let (weights, _) = c.real("weights")?;
    let (index, _) = c.index("index")?;
    let mut perm = vec![0usize; index.len()];
    let mut scratch = vec![F::zero(); 2 * dims.batch];
    let mut out = vec![F::zero(); dims.len()];
    gdpo_advantages(
        &cfg,
        dims,
        key_scores,
        weights,
        mask,
        index,
        &mut perm,
        &mut scratch,
        &mut out,
    )?;
    c.output("advantages", out, shape);
    Ok(())
}

fn run_gae<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: GaeConfig = c.param("cfg")?;
    let dims = c.dims_of("rewards")?;
    let (rewards, shape) = c.real("rewards")?;
    let (values, _) = c.real("values")?;
    let (mask, _) = c.mask("mask")?;
    let mut adv = vec![F::zero(); dims.len()];
    let mut ret = vec![F::zero(); dims.len()];
    gae_advantages_returns(&cfg, dims, rewards, values, mask, &mut adv, &mut ret)?;
    c.output("advantages", adv, shape);
    c.output("returns", ret, shape);
    Ok(())
}

fn run_discounted_returns<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let gamma: f64 = c.param("gamma")?;
    let dims = c.dims_of("rewards")?;
    let (rewards, shape) = c.real("rewards")?;
    let (mask, _) = c.mask("mask")?;
    let mut ret = vec![F::zero(); dims.len()];
    discounted_returns(dims, rewards, mask, gamma, &mut ret)?;
    c.output("returns", ret, shape);
    Ok(())
}

fn run_reinforce_pp<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let gamma: f64 = c.param("gamma")?;
    let dims = c.dims_of("rewards")?;
    let (rewards, shape) = c.real("rewards")?;
    let (mask, _) = c.mask("mask")?;
    let mut adv = vec![F::zero(); dims.len()];
    let mut ret = vec![F::zero(); dims.len()];
    reinforce_plus_plus_advantages(dims, rewards, mask, gamma, &mut adv, &mut ret)?;
    c.output("advantages", adv, shape);
    c.output("returns", ret, shape);
    Ok(())
}

fn run_remax<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let dims = c.dims_of("rewards")?;
    let (rewards, shape) = c.real("rewards")?;
    let (baselines, _) = c.real("baselines")?;
    let (mask, _) = c.mask("mask")?;
    let mut adv = vec![F::zero(); dims.len()];
    let mut ret = vec![F::zero(); dims.len()];
    remax_advantages(dims, rewards, baselines, mask, &mut adv, &mut ret)?;
    c.output("advantages", adv, shape);
    c.output("returns", ret, shape);
    Ok(())
}

fn run_otb<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: OtbConfig = c.param("cfg")?;
    let dims = c.dims_of("rewards")?;
    let (rewards, shape) = c.real("rewards")?;
    let (mask, _) = c.mask("mask")?;
    let (index, _) = c.index("index")?;
    let (old_log_probs, _) = c.real("old_log_probs")?;
    let (sum_pi_squared, _) = c.real("sum_pi_squared")?;
    let is_weights = c.opt_real("is_weights")?.map(|x| x.0);
    let mut perm = vec![0usize; index.len()];
    let mut scratch = vec![F::zero(); dims.len() + 2 * dims.seq];
    let mut adv = vec![F::zero(); dims.len()];
    let mut ret = vec![F::zero(); dims.len()];
    optimal_token_baseline_advantages(
        &cfg,
        dims,
        rewards,
        mask,
        index,
        old_log_probs,
        sum_pi_squared,
        is_weights,
        &mut perm,
        &mut scratch,
        &mut adv,
        &mut ret,
    )?;
    c.output("advantages", adv, shape);
    c.output("returns", ret, shape);
    Ok(())
}

fn record_log<F: CoreReal>(c: &mut Call<'_, F>, log: &RewardLog<F>) {
    c.metric("reward_mean", log.reward_mean.to_f64());
    c.metric("reward_std", log.reward_std.to_f64());
    c.metric("frac_zero_std", log.frac_zero_std.to_f64());
    if let Some(kl) = log.kl {
        c.metric("kl", kl.to_f64());
    }
}

fn run_multi_reward<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: MultiRewardConfig = c.param("cfg")?;
    let b = c.dims_of("rewards_per_func")?.batch;
    let (per_func, _) = c.real("rewards_per_func")?;
    let (weights, _) = c.real("weights")?;
    let mut rewards = vec![F::zero(); b];
    let mut stds = vec![F::zero(); b];
    let mut out = vec![F::zero(); b];
    let log =
        multi_reward_group_advantages(&cfg, per_func, weights, &mut rewards, &mut stds, &mut out)?;
    c.output("advantages", out, &[b]);
    record_log(c, &log);
    Ok(())
}

fn run_rloo_reward<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: RlooConfig = c.param("cfg")?;
    let dims = c.dims_of("completion_mask")?;
    let b = dims.batch;
    let (per_func, _) = c.real("rewards_per_func")?;
    let (weights, _) = c.real("weights")?;
    let (mask, _) = c.mask("completion_mask")?;
    let (old, _) = c.real("old_logps")?;
    let rf = c.opt_real("ref_logps")?.map(|x| x.0);
    let mut rewards = vec![F::zero(); b];
    let mut seq_old = vec![F::zero(); b];
    let mut out = vec![F::zero(); b];
    let log = leave_one_out_reward_advantages(
        &cfg,
        dims,
        per_func,
        weights,
        mask,
        old,
        rf,
        &mut rewards,
        &mut seq_old,
        &mut out,
    )?;
    c.output("advantages", out, &[b]);
    c.output("seq_old_logps", seq_old, &[b]);
    record_log(c, &log);
    Ok(())
}

pub(crate) fn configs() -> Vec<ConfigDef> {
    vec![
        ConfigDef {
            name: "GroupNormConfig",
            path: "advantage::GroupNormConfig",
            doc: "Group z-score parameters: scale_by_std, std_eps, bessel, singleton (MeanZeroStdOne | RawScore | Zero).",
            preset_args: Some(&[]),
            base: |preset, _| {
                Ok(match preset {
                    Some(p) => Some(to_value(&GroupNormConfig::preset(p))?),
                    None => None,
                })
            },
            check: |v| {
                check_with::<GroupNormConfig>("GroupNormConfig", v, |c| {
                    GroupNormConfig::new(c.scale_by_std, c.std_eps, c.bessel, c.singleton).map(|_| ())
                })
            },
        },
        ConfigDef {
            name: "PassAtKConfig",
            path: "advantage::PassAtKConfig",
            doc: "Pass@k parameters: scale_by_std (divide by the Bessel std + std_eps), std_eps. \
                  No constructor: give both fields (the core has no validation for it).",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| check_with::<PassAtKConfig>("PassAtKConfig", v, |_| Ok(())),
        },
        ConfigDef {
            name: "GaeConfig",
            path: "advantage::GaeConfig",
            doc: "GAE parameters: gamma, lam (both in [0, 1]), skip_masked, whiten \
                  (Option<WhitenConfig>), zero_masked. GaeConfig::preset(preset, gamma, lam): \
                  verl (skip masked steps, verl whitening) or torchtune (mask ignored in the \
                  recursion, whitening with the mean kept, padding zeroed).",
            preset_args: Some(&["gamma", "lam"]),
            base: |preset, args| {
                Ok(match preset {
                    Some(p) => {
                        let gamma = take_f64(args, "GaeConfig", "gamma")?;
                        let lam = take_f64(args, "GaeConfig", "lam")?;
                        Some(to_value(&GaeConfig::preset(p, gamma, lam)?)?)
                    }
                    None => None,
                })
            },
            check: |v| {
                check_with::<GaeConfig>("GaeConfig", v, |c| {
                    // The preset constructor's range checks on γ, λ, and the
                    // whitening's own validation.
                    GaeConfig::preset(Preset::Verl, c.gamma, c.lam)?;
                    match &c.whiten {
                        Some(w) => w.validate(),
                        None => Ok(()),
                    }
                })
            },
        },
        ConfigDef {
            name: "OtbConfig",
            path: "advantage::OtbConfig",
            doc: "Optimal-token-baseline parameters: handle_zero_tail, epsilon (added to the \
                  baseline's denominator), compact_steps (multi-turn: the k-th valid token). \
                  No constructor: give every field (the core has no validation for it).",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| check_with::<OtbConfig>("OtbConfig", v, |_| Ok(())),
        },
        ConfigDef {
            name: "MultiRewardConfig",
            path: "advantage::MultiRewardConfig",
            doc: "TRL GRPO advantage parameters: group_size (num_generations), scaling \
                  (Group | Batch | None), aggregation (SumThenNormalize | NormalizeThenSum), \
                  std_eps (TRL: 1e-4). Give every field; validated by MultiRewardConfig::new.",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| {
                check_with::<MultiRewardConfig>("MultiRewardConfig", v, |c| {
                    MultiRewardConfig::new(c.group_size, c.scaling, c.aggregation).map(|_| ())
                })
            },
        },
        ConfigDef {
            name: "RlooConfig",
            path: "advantage::RlooConfig",
            doc: "TRL RLOO advantage parameters: group_size (num_generations), beta, \
                  reward_clip ([lo, hi] or null), normalize, std_eps (TRL: 1e-4). Give every \
                  field; validated by RlooConfig::new.",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| {
                check_with::<RlooConfig>("RlooConfig", v, |c| {
                    RlooConfig::new(c.group_size, c.beta, c.reward_clip, c.normalize).map(|_| ())
                })
            },
        },
    ]
}
