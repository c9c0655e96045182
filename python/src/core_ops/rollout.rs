//! `policy::sequence_mean::*` and `policy::rollout::*`: the sequence-mean
//! (on-policy) losses and rollout correction (importance weights, rejection,
//! bypass losses, vLLM importance sampling).

use crate::core_api::{op_def, to_value, Call, CallError, CallResult, ConfigDef, CoreReal, OpDef};
use posttrain_core::policy::rollout::{
    bypass_policy_loss_vec, off_policy_metrics, rollout_correction_and_rejection_vec,
    rollout_correction_weights, rollout_rejection_mask, vllm_importance_sampling_ratio,
    BypassConfig, BypassLoss, IsConfig, IsMetrics, IsThreshold, OffPolicyMetrics, RejectionMetrics,
    RolloutCorrectionConfig, RolloutCorrectionMetrics, RsConfig, RsCriterion, RsOption,
    VllmIsConfig,
};
use posttrain_core::policy::sequence_mean::{
    completion_clipped_loss, on_policy_loss, on_policy_loss_from_hidden,
    on_policy_loss_from_logits, token_clipped_loss, truncate_for_logprobs,
    truncate_for_logprobs_vjp, truncate_response_len, HiddenGrads, SequenceMeanConfig,
    SequenceMeanOutput, TokenCountGuard,
};
use posttrain_core::{Dims, Error};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

// ---------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------

pub(crate) fn ops() -> Vec<OpDef> {
    vec![
        op_def! {
            path: "policy::sequence_mean::token_clipped_loss",
            doc: "torchtune's token-level clipped GRPO loss: r = exp(log π − log π_old), \
                  kl = e^{ref − log π} − (ref − log π) − 1 (k3), D = n + 1e-8 (n = valid tokens \
                  of the batch), policy_loss = Σ_valid min(A_i·r, A_i·clip(r, 1 ± ε)) / D, \
                  kl_loss = Σ_valid kl / D, loss = −(policy_loss − β·kl_loss); clipfrac = \
                  Σ_valid 1[clipped] / D, ratio_mean = mean of r over every position (padding \
                  included, as torchtune) — torchtune dev.grpo.loss.GRPOLoss. Gradient: ∂loss/∂log_prob.",
            params: ["cfg": "SequenceMeanConfig" => "epsilon (ε), kl_coeff (β)"],
            inputs: [
                "old_log_prob": Real => "[B, T] log π_old",
                "log_prob": Real => "[B, T] log π",
                "ref_log_prob": Real => "[B, T] log π_ref",
                "advantages": Real => "[B] one advantage per sequence",
                "mask": Mask opt => "[B, T] valid tokens (absent: all valid)",
            ],
            outputs: [
                "loss" => "−(policy_loss − β·kl_loss) (scalar)",
                "policy_loss" => "metric: the policy objective",
                "kl_loss" => "metric: the k3 penalty",
                "ratio_mean" => "metric: mean ratio over every position",
                "clipfrac" => "metric: clipped share (Σ_valid / (n + 1e-8))",
            ],
            vjp: ["loss" => ["log_prob"]],
            run: run_token_clipped,
        },
        op_def! {
            path: "policy::sequence_mean::completion_clipped_loss",
            doc: "torchtune's completion-level clipped GRPO loss: one ratio R = exp(x), \
                  x = Σ_valid (log π − log π_old) over the whole batch, y = Σ_valid (log π − ref); \
                  policy_loss = mean_i min(A_i·R, A_i·clip(R, 1 ± ε)), kl_loss = (e^{−y} + y − 1)·n/(n + 1e-8), \
                  loss = −(policy_loss − β·kl_loss), clipfrac = mean_i 1[clipped], ratio_mean = R — \
                  torchtune dev.grpo.loss.GRPOCompletionLoss. Gradient: ∂loss/∂log_prob (the same on \
                  every valid token).",
            params: ["cfg": "SequenceMeanConfig" => "epsilon (ε), kl_coeff (β)"],
            inputs: [
                "old_log_prob": Real => "[B, T] log π_old",
                "log_prob": Real => "[B, T] log π",
                "ref_log_prob": Real => "[B, T] log π_ref",
                "advantages": Real => "[B] one advantage per sequence",
                "mask": Mask opt => "[B, T] valid tokens (absent: all valid)",
            ],
            outputs: [
                "loss" => "−(policy_loss − β·kl_loss) (scalar)",
                "policy_loss" => "metric: the policy objective",
                "kl_loss" => "metric: the k3 penalty",
                "ratio_mean" => "metric: the completion ratio R",
                "clipfrac" => "metric: share of sequences on the clipped branch",
            ],
            vjp: ["loss" => ["log_prob"]],
            run: run_completion_clipped,
        },
        op_def! {
            path: "policy::sequence_mean::on_policy_loss",
            doc: "torchtune's on-policy GRPO loss (ratio π/sg(π) = 1): D_i = guard(n_i), \
                  loss = mean_i Σ_valid −(A_i − β·kl) / D_i, policy_loss = mean_i Σ_valid A_i / D_i, \
                  kl_loss = mean_i Σ_valid kl / D_i (k3), ratio_mean = 1, clipfrac = 0; a row without \
                  valid tokens gives 0 but counts in the mean — torchtune dev.grpo.loss.GRPOSimpleLoss \
                  (guard Add(1e-8)). Gradient: the stop-gradient surrogate's, \
                  (−A_i + β(1 − e^{ref − log π})) / (D_i·B) — by design NOT the derivative of the \
                  value (whose policy term does not move with log π).",
            params: [
                "cfg": "SequenceMeanConfig" => "epsilon (unused), kl_coeff (β)",
                "guard": "Option<TokenCountGuard>" => "{\"Add\": e} (n + e) or {\"AtLeast\": e} (max(n, e)); default {\"Add\": 1e-8} (TORCHTUNE_SIMPLE)",
            ],
            inputs: [
                "log_prob": Real => "[B, T] log π",
                "ref_log_prob": Real => "[B, T] log π_ref",
                "advantages": Real => "[B] one advantage per sequence",
                "mask": Mask opt => "[B, T] valid tokens (absent: all valid)",
            ],
            outputs: [
                "loss" => "the loss (scalar)",
                "policy_loss" => "metric: the policy objective",
                "kl_loss" => "metric: the k3 penalty",
                "ratio_mean" => "metric: 1",
                "clipfrac" => "metric: 0",
            ],
            vjp: ["loss" => ["log_prob"]],
            run: run_on_policy,
        },
        op_def! {
            path: "policy::sequence_mean::on_policy_loss_from_logits",
            doc: "on_policy_loss with log π = log_softmax(z)[t] from [B, T, V] logits (0 where the \
                  target is ignore_index, as cross_entropy) — torchtune \
                  dev.grpo.loss.GRPOWithChunkedOutputLoss (guard AtLeast(1e-9), ignore_index -100). \
                  Gradient: ∂loss/∂z = c·(onehot(t) − softmax(z)), c the stop-gradient surrogate's \
                  ∂loss/∂log π (so, as on_policy_loss, not the derivative of the value when A ≠ 0).",
            params: [
                "cfg": "SequenceMeanConfig" => "epsilon (unused), kl_coeff (β)",
                "guard": "Option<TokenCountGuard>" => "default {\"AtLeast\": 1e-9} (TORCHTUNE_CHUNKED)",
                "ignore_index": "Option<i64>" => "target id that is skipped (torchtune: -100); default none",
            ],
            inputs: [
                "logits": Real => "[B, T, V] logits of π",
                "targets": Index => "[B, T] token ids",
                "ref_log_prob": Real => "[B, T] log π_ref",
                "advantages": Real => "[B] one advantage per sequence",
                "mask": Mask opt => "[B, T] valid tokens (absent: all valid)",
            ],
            outputs: [
                "loss" => "the loss (scalar)",
                "log_prob" => "[B, T] log π of every position (0 at ignore_index)",
                "policy_loss" => "metric: the policy objective",
                "kl_loss" => "metric: the k3 penalty",
                "ratio_mean" => "metric: 1",
                "clipfrac" => "metric: 0",
            ],
            vjp: ["loss" => ["logits"]],
            run: run_on_policy_logits,
        },
        op_def! {
            path: "policy::sequence_mean::on_policy_loss_from_hidden",
            doc: "on_policy_loss_from_logits fused with the output projection z = W·h (no bias), one \
                  position at a time — torchtune dev.rl.linear_grpo_loss.LinearGRPOLoss (guard \
                  AtLeast(1e-9), ignore_index -100; its pi_old_outputs are these hidden states, \
                  pi_outputs the targets). Gradient: ∂loss/∂h = Wᵀdz, ∂loss/∂W = Σ dz ⊗ h with \
                  dz = c·(onehot(t) − softmax(W·h)) (stop-gradient surrogate, as on_policy_loss).",
            params: [
                "cfg": "SequenceMeanConfig" => "epsilon (unused), kl_coeff (β)",
                "guard": "Option<TokenCountGuard>" => "default {\"AtLeast\": 1e-9} (TORCHTUNE_CHUNKED)",
                "ignore_index": "Option<i64>" => "target id that is skipped (torchtune: -100); default none",
            ],
            inputs: [
                "hidden": Real => "[B, T, H] hidden states of π",
                "weight": Real => "[V, H] output projection",
                "targets": Index => "[B, T] token ids",
                "ref_log_prob": Real => "[B, T] log π_ref",
                "advantages": Real => "[B] one advantage per sequence",
                "mask": Mask opt => "[B, T] valid tokens (absent: all valid)",
            ],
            outputs: [
                "loss" => "the loss (scalar)",
                "log_prob" => "[B, T] log π of every position (0 at ignore_index)",
                "policy_loss" => "metric: the policy objective",
                "kl_loss" => "metric: the k3 penalty",
                "ratio_mean" => "metric: 1",
                "clipfrac" => "metric: 0",
            ],
            vjp: ["loss" => ["hidden", "weight"]],
            run: run_on_policy_hidden,
        },
        op_def! {
            path: "policy::sequence_mean::truncate_for_logprobs",
            doc: "The response part of [B, context + response, V] logits: out[b, j] = \
                  logits[b, context − 1 + j] for j < len − context (Python logits[:, context − 1 : −1]) — \
                  torchtune rlhf.truncate_sequence_for_logprobs. Gradient: truncate_for_logprobs_vjp \
                  (the cotangent scattered back, zero elsewhere; give it with cotangents={\"out\": …}, \
                  shaped like `out`).",
            params: ["context": "usize" => "context length, 1 ≤ context ≤ len"],
            inputs: ["logits": Real => "[B, len, V] logits"],
            outputs: ["out" => "[B, len − context, V] the response logits"],
            vjp: ["out" => ["logits"]],
            run: run_truncate,
        },
        op_def! {
            path: "policy::rollout::rollout_correction_weights",
            doc: "Rollout-correction IS weights from ℓ = log π − log μ: token raw_t = exp(clamp(ℓ_t, ±20)), \
                  sequence raw_t = exp(clamp(Σ_valid ℓ, ±20)); TIS w = min(raw, upper), IcePop \
                  w = raw·1[lower ≤ raw ≤ upper]; 0 on masked positions; batch_normalize divides by the \
                  mean when > 1e-8 — verl compute_rollout_correction_weights with compute_is_metrics \
                  (all-masked: zeros, where verl raises). Metrics: IsMetrics fields (oob_ratio, \
                  batch_norm_factor only when they apply). No gradient (verl detaches).",
            params: ["cfg": "IsConfig" => "level (Token | Sequence), threshold {upper, lower}, batch_normalize"],
            inputs: [
                "log_ratio": Real => "[B, T] log π − log μ",
                "mask": Mask => "[B, T] valid tokens (verl response_mask)",
            ],
            outputs: [
                "weights" => "[B, T] the IS weights",
                "mean" => "metric: masked mean of the weights (before batch normalisation)",
                "ratio_fraction_high" => "metric: share above upper (tokens, or rows at sequence level)",
                "ratio_fraction_low" => "metric: share below the diagnostic lower bound",
                "max" => "metric: largest weight",
                "min" => "metric: smallest weight",
                "std" => "metric: masked std of the weights clamped to [0, upper]",
                "eff_sample_size" => "metric: 1 / mean((w / mean w)²)",
                "seq_mean" => "metric: mean of the row mean weights",
                "seq_std" => "metric: unbiased std of the row mean weights",
                "seq_max" => "metric: largest row mean weight",
                "seq_min" => "metric: smallest row mean weight",
                "seq_max_deviation" => "metric: max |row mean − 1|",
                "seq_fraction_high" => "metric: share of rows whose raw mean weight > upper",
                "seq_fraction_low" => "metric: share of rows whose raw mean weight < the lower bound",
                "oob_ratio" => "metric (IcePop only): share of valid tokens outside the band",
                "batch_norm_factor" => "metric (batch_normalize only): the mean divided by",
            ],
            vjp: [],
            run: run_is_weights,
        },
        op_def! {
            path: "policy::rollout::rollout_rejection_mask",
            doc: "Hard trust-region rejection: keep = mask ∧ every criterion keeps the token; a \
                  criterion measures k1 = −ℓ, k2 = ℓ²/2 or k3 = e^ℓ − 1 − ℓ (ℓ clamped ±20) per token \
                  or per sequence (sum / mean / max) against its bounds (k1: log lower ≤ k1 ≤ log upper; \
                  k2/k3: ≤ upper) — verl compute_rollout_rejection_mask with compute_rs_metrics. \
                  Metrics: `<option>.<field>` per criterion (RsOptionMetrics fields, e.g. \
                  `seq_mean_k3.masked_fraction`), then masked_fraction, seq_masked_fraction. No gradient.",
            params: ["cfg": "RsConfig" => "the criteria (ops.core.config(\"RsConfig\", options=\"token_k1,seq_max_k3\", thresholds=\"0.5_2.0,0.1\"))"],
            inputs: [
                "log_ratio": Real => "[B, T] log π − log μ",
                "mask": Mask => "[B, T] valid tokens (verl response_mask)",
            ],
            outputs: [
                "keep" => "[B, T] bool: the rejection-adjusted mask",
                "masked_fraction" => "metric: share of valid tokens rejected by any criterion",
                "seq_masked_fraction" => "metric: share of rows that lost a valid token",
                "<option>.<field>" => "metrics per criterion, e.g. token_k1.mean: the RsOptionMetrics fields mean, max, min, fraction_high, fraction_low, std, seq_mean, seq_std, seq_max, seq_min, seq_max_deviation, seq_fraction_high, seq_fraction_low (k1), masked_fraction, seq_masked_fraction",
            ],
            vjp: [],
            run: run_rejection,
        },
        op_def! {
            path: "policy::rollout::off_policy_metrics",
            doc: "Off-policy diagnostics between log π and the rollout's log μ (OffPolicyMetrics): \
                  training/rollout ppl and log-ppl, kl = masked mean of log μ − log π, k3_kl, \
                  log_ppl_diff (mean, abs, max, min), ppl_ratio, chi2_token, chi2_seq; every exponent \
                  clamped ±20 — verl compute_offpolicy_metrics. Metrics only, no gradient.",
            params: [],
            inputs: [
                "log_prob": Real => "[B, T] log π (verl old_log_prob)",
                "rollout_log_prob": Real => "[B, T] log μ",
                "mask": Mask => "[B, T] valid tokens",
            ],
            outputs: [
                "training_ppl" => "metric: mean over rows of exp(−row mean log π)",
                "training_log_ppl" => "metric: mean over rows of −row mean log π",
                "kl" => "metric: masked mean of log μ − log π",
                "k3_kl" => "metric: masked mean of e^ℓ − ℓ − 1",
                "rollout_ppl" => "metric: mean over rows of exp(−row mean log μ)",
                "rollout_log_ppl" => "metric: mean over rows of −row mean log μ",
                "log_ppl_diff" => "metric: mean of d_i = row mean log μ − row mean log π",
                "log_ppl_abs_diff" => "metric: mean |d_i|",
                "log_ppl_diff_max" => "metric: max d_i",
                "log_ppl_diff_min" => "metric: min d_i",
                "ppl_ratio" => "metric: mean exp(d_i)",
                "chi2_token" => "metric: masked mean of e^{2ℓ} − 1",
                "chi2_seq" => "metric: mean over rows of e^{2Σℓ} − 1",
            ],
            vjp: [],
            run: run_off_policy,
        },
        op_def! {
            path: "policy::rollout::rollout_correction_and_rejection",
            doc: "ℓ = log π − log μ, then rollout_correction_weights (if cfg.is), rollout_rejection_mask \
                  (if cfg.rs; else keep = mask) and off_policy_metrics, all on the original mask — verl \
                  compute_rollout_correction_and_rejection_mask. Metrics: `is.<field>`, \
                  `rs.<option>.<field>`, `rs.masked_fraction`, `rs.seq_masked_fraction`, \
                  `off_policy.<field>`. No gradient (verl: no_grad).",
            params: ["cfg": "RolloutCorrectionConfig" => "is: Option<IsConfig>, rs: Option<RsConfig>"],
            inputs: [
                "log_prob": Real => "[B, T] log π (verl old_log_prob)",
                "rollout_log_prob": Real => "[B, T] log μ",
                "mask": Mask => "[B, T] valid tokens",
            ],
            outputs: [
                "weights" => "[B, T] the IS weights (zeros when IS is off)",
                "keep" => "[B, T] bool: the rejection-adjusted mask",
                "is.<field>" => "metrics (when cfg.is): the fields of rollout_correction_weights",
                "rs.<field>" => "metrics (when cfg.rs): the metrics of rollout_rejection_mask",
                "off_policy.<field>" => "metrics: the metrics of off_policy_metrics",
            ],
            vjp: [],
            run: run_correction,
        },
        op_def! {
            path: "policy::rollout::bypass_policy_loss",
            doc: "verl's bypass-mode policy loss (old policy = rollout policy): (w, keep) = \
                  rollout_correction_and_rejection(log π, log μ, mask); PpoClip: ℓ_t = PPO clipped \
                  surrogate of log π against log μ; Reinforce: ℓ_t = −A_t·w_t·log π_t (w = 1 when IS is \
                  off); L = aggregate(agg, norm, ℓ, keep) — verl compute_policy_loss_bypass_mode → \
                  compute_policy_loss_vanilla / compute_policy_loss_reinforce. Metrics: ppo_kl, \
                  pg_clipfrac, pg_clipfrac_lower (PpoClip), `correction.is.*`, `correction.rs.*`, \
                  `correction.off_policy.*`. Gradient: ∂L/∂log π with w and keep held constant (verl \
                  computes them under no_grad: with Reinforce + IS not the derivative of the value).",
            params: ["cfg": "BypassConfig" => "loss ({\"PpoClip\": ClipConfig} | \"Reinforce\"), correction (RolloutCorrectionConfig), agg (AggMode), norm (GlobalNorm)"],
            inputs: [
                "log_prob": Real => "[B, T] log π",
                "rollout_log_prob": Real => "[B, T] log μ (verl old_log_prob)",
                "advantages": Real => "[B, T] advantages A",
                "mask": Mask => "[B, T] valid tokens",
            ],
            outputs: [
                "loss" => "the aggregated loss (scalar)",
                "is_weights" => "[B, T] the IS weights (zeros when IS is off)",
                "keep" => "[B, T] bool: the mask the loss used",
                "ppo_kl" => "metric: masked mean over kept tokens of −log-ratio (PpoClip, clamped ±20) or log μ − log π (Reinforce)",
                "pg_clipfrac" => "metric (PpoClip only): share of kept tokens on the clipped branch",
                "pg_clipfrac_lower" => "metric (PpoClip only): share of kept tokens where the dual clip is active",
                "correction.<group>.<field>" => "metrics: those of rollout_correction_and_rejection (is.*, rs.*, off_policy.*)",
            ],
            vjp: ["loss" => ["log_prob"]],
            run: run_bypass,
        },
        op_def! {
            path: "policy::rollout::vllm_importance_sampling_ratio",
            doc: "TRL's vLLM importance-sampling ratio: d_t = old_t − sampling_t on valid tokens \
                  (nan_to_num(d) with nan_sampler_log_probs = as_on_policy); token modes ratio_t = \
                  bound(exp(d_t)) (padding bound(1)), sequence modes ratio_i = bound(exp(Σ_t d_t)), bound \
                  = truncation or band mask by clip_min/clip_max; no log-ratio clamp — TRL \
                  GRPOTrainer._generate_and_score_completions (f2cd577: propagate; 1.16.0: as_on_policy). \
                  Metrics: num_items, logp_difference_mean, logp_difference_max, ratio_min, ratio_mean, \
                  ratio_max. No gradient (TRL: no_grad).",
            params: ["cfg": "VllmIsConfig" => "mode (TokenTruncate | TokenMask | SequenceTruncate | SequenceMask), clip_min, clip_max, nan_sampler_log_probs (propagate | as_on_policy)"],
            inputs: [
                "old_log_prob": Real => "[B, T] the trainer's log π_old",
                "sampling_log_prob": Real => "[B, T] the sampler's log-probs",
                "mask": Mask => "[B, T] valid tokens (TRL completion_mask ∧ tool_mask)",
            ],
            outputs: [
                "ratio" => "[B, T] (token modes) or [B] (sequence modes) the ratios",
                "num_items" => "metric: number of valid tokens",
                "logp_difference_mean" => "metric: mean |old − sampling| over valid tokens",
                "logp_difference_max" => "metric: max |old − sampling| over valid tokens",
                "ratio_min" => "metric: min ratio over valid tokens (token modes) or rows (sequence modes)",
                "ratio_mean" => "metric: mean ratio, likewise",
                "ratio_max" => "metric: max ratio, likewise",
            ],
            vjp: [],
            run: run_vllm_is,
        },
    ]
}

// ---------------------------------------------------------------------------
// Sequence-mean losses
// ---------------------------------------------------------------------------

fn record_seq_mean<F: CoreReal>(c: &mut Call<'_, F>, out: &SequenceMeanOutput<F>) {
    c.scalar("loss", out.loss);
    c.metric("policy_loss", out.policy_loss.to_f64());
    c.metric("kl_loss", out.kl_loss.to_f64());
    c.metric("ratio_mean", out.ratio_mean.to_f64());
    c.metric("clipfrac", out.clipfrac.to_f64());
}

/// Scales a gradient computed for a unit cotangent.
fn scaled<F: CoreReal>(mut g: Vec<F>, k: F) -> Vec<F> {
    g.iter_mut().for_each(|x| *x *= k);
    g
}

fn run_token_clipped<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    run_clipped(c, false)
}

fn run_completion_clipped<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    run_clipped(c, true)
}

fn run_clipped<F: CoreReal>(c: &mut Call<'_, F>, completion: bool) -> CallResult<()> {
    let cfg: SequenceMeanConfig = c.param("cfg")?;
    let dims = c.dims_of("log_prob")?;
    let old = c.real("old_log_prob")?.0;
    let lp = c.real("log_prob")?.0;
    let rf = c.real("ref_log_prob")?.0;
    let adv = c.real("advantages")?.0;
    let mask = c.opt_mask("mask")?.map(|m| m.0);
    let cot = c.cot_scalar("loss")?;
    let mut g = vec![F::zero(); if cot.is_some() { dims.len() } else { 0 }];
    let grad = cot.is_some().then_some(g.as_mut_slice());
    let out = if completion {
        completion_clipped_loss(&cfg, dims, old, lp, rf, adv, mask, grad)?
    } else {
        token_clipped_loss(&cfg, dims, old, lp, rf, adv, mask, grad)?
    };
    record_seq_mean(c, &out);
    if let Some(k) = cot {
        c.grad("log_prob", scaled(g, k));
    }
    Ok(())
}

fn run_on_policy<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: SequenceMeanConfig = c.param("cfg")?;
    let guard = c.param_or("guard", TokenCountGuard::TORCHTUNE_SIMPLE)?;
    let dims = c.dims_of("log_prob")?;
    let lp = c.real("log_prob")?.0;
    let rf = c.real("ref_log_prob")?.0;
    let adv = c.real("advantages")?.0;
    let mask = c.opt_mask("mask")?.map(|m| m.0);
    let cot = c.cot_scalar("loss")?;
    let mut g = vec![F::zero(); if cot.is_some() { dims.len() } else { 0 }];
    let grad = cot.is_some().then_some(g.as_mut_slice());
    let out = on_policy_loss(&cfg, guard, dims, lp, rf, adv, mask, grad)?;
    record_seq_mean(c, &out);
    if let Some(k) = cot {
        c.grad("log_prob", scaled(g, k));
    }
    Ok(())
}

/// `[B, T]` and the last extent of a rank-3 input.
fn dims3<F: CoreReal>(c: &Call<'_, F>, name: &str) -> CallResult<(Dims, usize)> {
    match c.real(name)?.1 {
        [b, t, v] => Ok((Dims::new(*b, *t), *v)),
        other => Err(CallError::Msg(format!(
            "input `{name}` must be rank 3, got shape {other:?}"
        ))),
    }
}

fn run_on_policy_logits<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: SequenceMeanConfig = c.param("cfg")?;
    let guard = c.param_or("guard", TokenCountGuard::TORCHTUNE_CHUNKED)?;
    let ignore: Option<i64> = c.opt_param("ignore_index")?;
    let (dims, vocab) = dims3(c, "logits")?;
    let logits = c.real("logits")?.0;
    let targets = c.index("targets")?.0;
    let rf = c.real("ref_log_prob")?.0;
    let adv = c.real("advantages")?.0;
    let mask = c.opt_mask("mask")?.map(|m| m.0);
    let cot = c.cot_scalar("loss")?;
    let mut lp = vec![F::zero(); dims.len()];
    let mut g = vec![F::zero(); if cot.is_some() { logits.len() } else { 0 }];
    let grad = cot.is_some().then_some(g.as_mut_slice());
    let out = on_policy_loss_from_logits(
        &cfg, guard, dims, vocab, logits, targets, ignore, rf, adv, mask, &mut lp, grad,
    )?;
    record_seq_mean(c, &out);
    c.output("log_prob", lp, &[dims.batch, dims.seq]);
    if let Some(k) = cot {
        c.grad("logits", scaled(g, k));
    }
    Ok(())
}

fn run_on_policy_hidden<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: SequenceMeanConfig = c.param("cfg")?;
    let guard = c.param_or("guard", TokenCountGuard::TORCHTUNE_CHUNKED)?;
    let ignore: Option<i64> = c.opt_param("ignore_index")?;
    let (dims, hidden_dim) = dims3(c, "hidden")?;
    let (weight, wshape) = c.real("weight")?;
    let vocab = match wshape {
        [v, _] => *v,
        other => {
            return Err(CallError::Msg(format!(
                "input `weight` must be [V, H], got shape {other:?}"
            )))
        }
    };
    let hidden = c.real("hidden")?.0;
    let targets = c.index("targets")?.0;
    let rf = c.real("ref_log_prob")?.0;
    let adv = c.real("advantages")?.0;
    let mask = c.opt_mask("mask")?.map(|m| m.0);
    let cot = c.cot_scalar("loss")?;
    let mut lp = vec![F::zero(); dims.len()];
    let mut scratch = vec![F::zero(); vocab];
    let want = cot.is_some();
    let mut gh = vec![F::zero(); if want { hidden.len() } else { 0 }];
    let mut gw = vec![F::zero(); if want { weight.len() } else { 0 }];
    let grads = want.then_some(HiddenGrads {
        hidden: &mut gh,
        weight: &mut gw,
    });
    let out = on_policy_loss_from_hidden(
        &cfg,
        guard,
        dims,
        hidden_dim,
        vocab,
        hidden,
        weight,
        targets,
        ignore,
        rf,
        adv,
        mask,
        &mut lp,
        &mut scratch,
        grads,
    )?;
    record_seq_mean(c, &out);
    c.output("log_prob", lp, &[dims.batch, dims.seq]);
    if let Some(k) = cot {
        c.grad("hidden", scaled(gh, k));
        c.grad("weight", scaled(gw, k));
    }
    Ok(())
}

fn run_truncate<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let context: usize = c.param("context")?;
    let (dims, vocab) = dims3(c, "logits")?;
    let logits = c.real("logits")?.0;
    let resp = truncate_response_len(dims.seq, context)?;
    let mut out = vec![F::zero(); dims.batch * resp * vocab];
    truncate_for_logprobs(logits, dims.batch, dims.seq, vocab, context, &mut out)?;
    c.output("out", out, &[dims.batch, resp, vocab]);
    if let Some(cot) = c.cot("out")? {
        let mut g = vec![F::zero(); logits.len()];
        truncate_for_logprobs_vjp(cot, dims.batch, dims.seq, vocab, context, &mut g)?;
        c.grad("logits", g);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Rollout correction
// ---------------------------------------------------------------------------

fn put_is<F: CoreReal>(c: &mut Call<'_, F>, p: &str, m: &IsMetrics<F>) {
    let fields = [
        ("mean", m.mean),
        ("ratio_fraction_high", m.ratio_fraction_high),
        ("ratio_fraction_low", m.ratio_fraction_low),
        ("max", m.max),
        ("min", m.min),
        ("std", m.std),
        ("eff_sample_size", m.eff_sample_size),
        ("seq_mean", m.seq_mean),
        ("seq_std", m.seq_std),
        ("seq_max", m.seq_max),
        ("seq_min", m.seq_min),
        ("seq_max_deviation", m.seq_max_deviation),
        ("seq_fraction_high", m.seq_fraction_high),
        ("seq_fraction_low", m.seq_fraction_low),
    ];
    for (n, v) in fields {
        c.metric(&format!("{p}{n}"), v.to_f64());
    }
    if let Some(v) = m.oob_ratio {
        c.metric(&format!("{p}oob_ratio"), v.to_f64());
    }
    if let Some(v) = m.batch_norm_factor {
        c.metric(&format!("{p}batch_norm_factor"), v.to_f64());
    }
}

fn put_rs<F: CoreReal>(c: &mut Call<'_, F>, p: &str, m: &RejectionMetrics<F>) {
    for (opt, om) in m.per_option() {
        let q = format!("{p}{}.", opt.name());
        let fields = [
            ("mean", om.mean),
            ("max", om.max),
            ("min", om.min),
            ("fraction_high", om.fraction_high),
            ("fraction_low", om.fraction_low),
            ("std", om.std),
            ("seq_mean", om.seq_mean),
            ("seq_std", om.seq_std),
            ("seq_max", om.seq_max),
            ("seq_min", om.seq_min),
            ("seq_max_deviation", om.seq_max_deviation),
            ("seq_fraction_high", om.seq_fraction_high),
            ("masked_fraction", om.masked_fraction),
            ("seq_masked_fraction", om.seq_masked_fraction),
        ];
        for (n, v) in fields {
            c.metric(&format!("{q}{n}"), v.to_f64());
        }
        if let Some(v) = om.seq_fraction_low {
            c.metric(&format!("{q}seq_fraction_low"), v.to_f64());
        }
    }
    c.metric(&format!("{p}masked_fraction"), m.masked_fraction.to_f64());
    c.metric(
        &format!("{p}seq_masked_fraction"),
        m.seq_masked_fraction.to_f64(),
    );
}

fn put_off_policy<F: CoreReal>(c: &mut Call<'_, F>, p: &str, m: &OffPolicyMetrics<F>) {
    let fields = [
        ("training_ppl", m.training_ppl),
        ("training_log_ppl", m.training_log_ppl),
        ("kl", m.kl),
        ("k3_kl", m.k3_kl),
        ("rollout_ppl", m.rollout_ppl),
        ("rollout_log_ppl", m.rollout_log_ppl),
        ("log_ppl_diff", m.log_ppl_diff),
        ("log_ppl_abs_diff", m.log_ppl_abs_diff),
        ("log_ppl_diff_max", m.log_ppl_diff_max),
        ("log_ppl_diff_min", m.log_ppl_diff_min),
        ("ppl_ratio", m.ppl_ratio),
        ("chi2_token", m.chi2_token),
        ("chi2_seq", m.chi2_seq),
    ];
    for (n, v) in fields {
        c.metric(&format!("{p}{n}"), v.to_f64());
    }
}

fn put_correction<F: CoreReal>(c: &mut Call<'_, F>, p: &str, m: &RolloutCorrectionMetrics<F>) {
    if let Some(is) = &m.is {
        put_is(c, &format!("{p}is."), is);
    }
    if let Some(rs) = &m.rs {
        put_rs(c, &format!("{p}rs."), rs);
    }
    put_off_policy(c, &format!("{p}off_policy."), &m.off_policy);
}

fn run_is_weights<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: IsConfig = c.param("cfg")?;
    let dims = c.dims_of("log_ratio")?;
    let (lr, shape) = c.real("log_ratio")?;
    let mask = c.mask("mask")?.0;
    let mut w = vec![F::zero(); lr.len()];
    let m = rollout_correction_weights(&cfg, dims, lr, mask, &mut w)?;
    c.output("weights", w, shape);
    put_is(c, "", &m);
    Ok(())
}

fn run_rejection<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: RsConfig = c.param("cfg")?;
    let dims = c.dims_of("log_ratio")?;
    let (lr, shape) = c.real("log_ratio")?;
    let mask = c.mask("mask")?.0;
    let mut keep = vec![false; lr.len()];
    let mut rows = vec![F::zero(); dims.batch];
    let m = rollout_rejection_mask(&cfg, dims, lr, mask, &mut keep, &mut rows)?;
    c.output_mask("keep", keep, shape);
    put_rs(c, "", &m);
    Ok(())
}

fn run_off_policy<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let dims = c.dims_of("log_prob")?;
    let lp = c.real("log_prob")?.0;
    let rl = c.real("rollout_log_prob")?.0;
    let mask = c.mask("mask")?.0;
    let m = off_policy_metrics(dims, lp, rl, mask)?;
    put_off_policy(c, "", &m);
    Ok(())
}

fn run_correction<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: RolloutCorrectionConfig = c.param("cfg")?;
    let dims = c.dims_of("log_prob")?;
    let (lp, shape) = c.real("log_prob")?;
    let rl = c.real("rollout_log_prob")?.0;
    let mask = c.mask("mask")?.0;
    let (m, v) = rollout_correction_and_rejection_vec(&cfg, dims, lp, rl, mask)?;
    c.output("weights", v.weights, shape);
    c.output_mask("keep", v.keep, shape);
    put_correction(c, "", &m);
    Ok(())
}

fn run_bypass<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: BypassConfig = c.param("cfg")?;
    let dims = c.dims_of("log_prob")?;
    let (lp, shape) = c.real("log_prob")?;
    let rl = c.real("rollout_log_prob")?.0;
    let adv = c.real("advantages")?.0;
    let mask = c.mask("mask")?.0;
    let cot = c.cot_scalar("loss")?;
    let (out, bufs) = bypass_policy_loss_vec(&cfg, dims, lp, rl, adv, mask)?;
    c.scalar("loss", out.loss);
    c.output("is_weights", bufs.correction.weights, shape);
    c.output_mask("keep", bufs.correction.keep, shape);
    c.metric("ppo_kl", out.ppo_kl.to_f64());
    if let Some(v) = out.pg_clipfrac {
        c.metric("pg_clipfrac", v.to_f64());
    }
    if let Some(v) = out.pg_clipfrac_lower {
        c.metric("pg_clipfrac_lower", v.to_f64());
    }
    put_correction(c, "correction.", &out.correction);
    if let Some(k) = cot {
        c.grad("log_prob", scaled(bufs.grad, k));
    }
    Ok(())
}

fn run_vllm_is<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: VllmIsConfig = c.param("cfg")?;
    let dims = c.dims_of("old_log_prob")?;
    let (old, shape) = c.real("old_log_prob")?;
    let samp = c.real("sampling_log_prob")?.0;
    let mask = c.mask("mask")?.0;
    let seq = cfg.mode.is_sequence();
    let mut ratio = vec![F::zero(); if seq { dims.batch } else { dims.len() }];
    let m = vllm_importance_sampling_ratio(&cfg, dims, old, samp, mask, &mut ratio)?;
    if seq {
        c.output("ratio", ratio, &[dims.batch]);
    } else {
        c.output("ratio", ratio, shape);
    }
    c.metric("num_items", m.num_items as f64);
    c.metric("logp_difference_mean", m.logp_difference_mean.to_f64());
    c.metric("logp_difference_max", m.logp_difference_max.to_f64());
    c.metric("ratio_min", m.ratio_min.to_f64());
    c.metric("ratio_mean", m.ratio_mean.to_f64());
    c.metric("ratio_max", m.ratio_max.to_f64());
    Ok(())
}

// ---------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------

/// Deserialize → rebuild through the core's constructor (which validates
/// and may normalise, e.g. a k1 criterion's default lower bound) → serialize.
fn rebuild<T: Serialize + DeserializeOwned>(
    ty: &str,
    v: Value,
    build: impl Fn(T) -> Result<T, Error>,
) -> CallResult<Value> {
    let t: T = serde_json::from_value(v.clone())
        .map_err(|e| CallError::Msg(format!("{ty}: {e} (got {v})")))?;
    to_value(&build(t)?)
}

fn check_threshold(t: IsThreshold) -> Result<IsThreshold, Error> {
    match t.lower {
        None => IsThreshold::truncate(t.upper),
        Some(lo) => IsThreshold::band(lo, t.upper),
    }
}

fn check_is(c: IsConfig) -> Result<IsConfig, Error> {
    IsConfig::new(c.level, check_threshold(c.threshold)?, c.batch_normalize)
}

fn check_rs(c: RsConfig) -> Result<RsConfig, Error> {
    let mut crit = Vec::with_capacity(c.len());
    for k in c.criteria() {
        crit.push(RsCriterion::new(k.option, k.lower, k.upper)?);
    }
    RsConfig::new(&crit)
}

fn check_correction(c: RolloutCorrectionConfig) -> Result<RolloutCorrectionConfig, Error> {
    Ok(RolloutCorrectionConfig {
        is: c.is.map(check_is).transpose()?,
        rs: c.rs.map(check_rs).transpose()?,
    })
}

fn check_bypass_loss(l: BypassLoss) -> Result<BypassLoss, Error> {
    if let BypassLoss::PpoClip(clip) = &l {
        clip.validate()?;
    }
    Ok(l)
}

/// `RsConfig` from verl's strings: `options` ("token_k1,seq_max_k3") and
/// `thresholds` (a string "0.5_2.0,0.1" for `RsConfig::parse`, or a number
/// for `RsConfig::parse_uniform`), when both are given.
fn rs_base(args: &mut Map<String, Value>) -> CallResult<Option<Value>> {
    let (options, thresholds) = match (args.remove("options"), args.remove("thresholds")) {
        (None, None) => return Ok(None),
        (Some(Value::String(o)), Some(t)) => (o, t),
        _ => {
            return Err(CallError::Msg(
                "RsConfig: give `options` (a string such as \"token_k1,seq_max_k3\") and \
                 `thresholds` (a string such as \"0.5_2.0,0.1\", or a number), or the field `criteria`"
                    .into(),
            ))
        }
    };
    let cfg = match thresholds {
        Value::String(t) => RsConfig::parse(&options, &t)?,
        Value::Number(x) => RsConfig::parse_uniform(&options, x.as_f64().unwrap_or(f64::NAN))?,
        other => {
            return Err(CallError::Msg(format!(
                "RsConfig: `thresholds` must be a string or a number, got {other}"
            )))
        }
    };
    Ok(Some(to_value(&cfg)?))
}

pub(crate) fn configs() -> Vec<ConfigDef> {
    vec![
        ConfigDef {
            name: "SequenceMeanConfig",
            path: "policy::sequence_mean::SequenceMeanConfig",
            doc: "The sequence-mean GRPO losses' parameters: epsilon (ε, ratio clip), kl_coeff (β, k3 penalty). \
                  Every preset is torchtune's (0.1, 0.1).",
            preset_args: Some(&[]),
            base: |preset, _| {
                Ok(match preset {
                    Some(p) => Some(to_value(&SequenceMeanConfig::preset(p))?),
                    None => None,
                })
            },
            check: |v| {
                rebuild::<SequenceMeanConfig>("SequenceMeanConfig", v, |c| {
                    SequenceMeanConfig::new(c.epsilon, c.kl_coeff)
                })
            },
        },
        ConfigDef {
            name: "TokenCountGuard",
            path: "policy::sequence_mean::TokenCountGuard",
            doc: "How a row's valid-token count n is guarded (an enum): {\"Add\": e} divides by n + e \
                  (torchtune masked_mean, 1e-8), {\"AtLeast\": e} by max(n, e) (torchtune chunked losses, 1e-9).",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| {
                rebuild::<TokenCountGuard>("TokenCountGuard", v, |g| g.validate().map(|_| g))
            },
        },
        ConfigDef {
            name: "IsThreshold",
            path: "policy::rollout::IsThreshold",
            doc: "IS weight bounds: upper, lower (None: truncate at upper, TIS; Some: the IcePop band [lower, upper]).",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| rebuild::<IsThreshold>("IsThreshold", v, check_threshold),
        },
        ConfigDef {
            name: "IsConfig",
            path: "policy::rollout::IsConfig",
            doc: "Rollout-correction importance weights: level (Token | Sequence), threshold (IsThreshold), batch_normalize.",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| rebuild::<IsConfig>("IsConfig", v, check_is),
        },
        ConfigDef {
            name: "RsOption",
            path: "policy::rollout::RsOption",
            doc: "One rejection option: aggregation (Token | SeqSum | SeqMean | SeqMax), divergence (K1 | K2 | K3); \
                  or `name=` one of verl's names (\"token_k1\" … \"seq_max_k3\", parsed by FromStr).",
            preset_args: None,
            base: |_, args| match args.remove("name") {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(to_value(&s.parse::<RsOption>()?)?)),
                Some(other) => Err(CallError::Msg(format!(
                    "RsOption: `name` must be a string, got {other}"
                ))),
            },
            check: |v| rebuild::<RsOption>("RsOption", v, Ok),
        },
        ConfigDef {
            name: "RsCriterion",
            path: "policy::rollout::RsCriterion",
            doc: "One rejection criterion: option (RsOption), lower (k1 only; None: 1/upper), upper; \
                  built by RsCriterion::new.",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| {
                rebuild::<RsCriterion>("RsCriterion", v, |c| {
                    RsCriterion::new(c.option, c.lower, c.upper)
                })
            },
        },
        ConfigDef {
            name: "RsConfig",
            path: "policy::rollout::RsConfig",
            doc: "A conjunction of rejection criteria. No preset: build it from verl's strings with \
                  `options=\"token_k1,seq_max_k3\", thresholds=\"0.5_2.0,0.1\"` (RsConfig::parse; a number \
                  for thresholds is RsConfig::parse_uniform). Its serde form is {\"criteria\": [11 slots, \
                  RsCriterion or null]}, which is accepted too.",
            preset_args: None,
            base: |_, args| rs_base(args),
            check: |v| rebuild::<RsConfig>("RsConfig", v, check_rs),
        },
        ConfigDef {
            name: "RolloutCorrectionConfig",
            path: "policy::rollout::RolloutCorrectionConfig",
            doc: "Which rollout corrections apply: is (Option<IsConfig>), rs (Option<RsConfig>); default both off.",
            preset_args: None,
            base: |_, _| Ok(Some(to_value(&RolloutCorrectionConfig::default())?)),
            check: |v| rebuild::<RolloutCorrectionConfig>("RolloutCorrectionConfig", v, check_correction),
        },
        ConfigDef {
            name: "BypassLoss",
            path: "policy::rollout::BypassLoss",
            doc: "The bypass-mode loss (an enum): {\"PpoClip\": ClipConfig} or \"Reinforce\".",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| rebuild::<BypassLoss>("BypassLoss", v, check_bypass_loss),
        },
        ConfigDef {
            name: "BypassConfig",
            path: "policy::rollout::BypassConfig",
            doc: "verl's bypass-mode policy loss: loss (BypassLoss), correction (RolloutCorrectionConfig), \
                  agg (AggMode), norm (GlobalNorm); built by BypassConfig::new. verl's PPO-clip is \
                  {\"PpoClip\": {eps_low, eps_high, dual_clip: c, log_ratio_clamp: 20}} (BypassConfig::verl_ppo_clip).",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| {
                rebuild::<BypassConfig>("BypassConfig", v, |c| {
                    c.norm.validate()?;
                    BypassConfig::new(
                        check_bypass_loss(c.loss)?,
                        check_correction(c.correction)?,
                        c.agg,
                        c.norm,
                    )
                })
            },
        },
        ConfigDef {
            name: "VllmIsConfig",
            path: "policy::rollout::VllmIsConfig",
            doc: "TRL's vLLM importance sampling: mode (TokenTruncate | TokenMask | SequenceTruncate | \
                  SequenceMask), clip_min, clip_max (None: unbounded), nan_sampler_log_probs \
                  (\"propagate\", TRL f2cd577, default | \"as_on_policy\", TRL 1.16.0); built by VllmIsConfig::new.",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| {
                rebuild::<VllmIsConfig>("VllmIsConfig", v, |c| {
                    Ok(VllmIsConfig::new(c.mode, c.clip_min, c.clip_max)?
                        .with_nan_sampler_log_probs(c.nan_sampler_log_probs))
                })
            },
        },
    ]
}
