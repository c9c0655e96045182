//! `logits::*`, `sequence::*`, `distill::*`, `fused::*`: log-softmax,
//! token log-probs and entropy from logits, sequence masks and weights,
//! distillation losses, the fused token loss.

use crate::core_api::{
    check_with, op_def, take, take_f64, to_value, Call, CallError, CallResult, ConfigDef, CoreReal,
    OpDef,
};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::distill::{
    generalized_jsd_elementwise, generalized_jsd_loss, jsd_from_log_probs, kd_loss, DistillConfig,
    Jsd,
};
use posttrain_core::fused::{
    log_probs_entropy, log_probs_entropy_backward, token_loss, KlPenalty, TokenLoss,
};
use posttrain_core::logits::{
    entropy_from_logits, entropy_loss, gather_log_softmax, log_softmax, log_softmax_vjp,
    selective_log_softmax, sequence_log_probs, sum_pi_squared, SequenceLogProbConfig, Temperature,
};
use posttrain_core::policy::rollout::NanSamplerLogProbs;
use posttrain_core::policy::token::PolicyBatch;
use posttrain_core::sequence::{
    high_entropy_mask, off_policy_sequence_mask, pf_ppo_sampling_weights, quantile,
    response_mask_from_eos, reward_penalty_mask, truncate_at_first_stop_token, PfPpoReweight,
    RewardPenaltyConfig,
};
use posttrain_core::{Dims, Preset};

pub(crate) fn ops() -> Vec<OpDef> {
    vec![
        // ------------------------------------------------------------- logits
        op_def! {
            path: "logits::log_softmax",
            doc: "The full row log-softmax of `[..., V]` logits at temperature T: \
                  out[r, k] = z[r, k]/T − lse(z[r, :]/T) (max-shifted log-sum-exp; the building \
                  block of the distillation losses, torch.log_softmax(z / T, -1)). Gradient \
                  (logits::log_softmax_vjp): ∂/∂z[r, k] = (c[r, k] − p[r, k] Σⱼ c[r, j]) / T, \
                  p = softmax(z/T).",
            params: ["temperature": "Option<Temperature>" => "softmax temperature T > 0 (default 1.0)"],
            inputs: ["logits": Real => "[..., V] logits z"],
            outputs: ["log_probs" => "[..., V] log softmax(z/T)"],
            vjp: ["log_probs" => ["logits"]],
            run: run_log_softmax,
        },
        op_def! {
            path: "logits::selective_log_softmax",
            doc: "Log-probability of each row's target token: out[r] = z[r, t_r] − lse(z[r, :]) \
                  (TRL selective_log_softmax, verl logprobs_from_logits, OpenRLHF \
                  log_probs_from_logits at T = 1). Gradient: c[r]·(1[k = t_r] − softmax(z[r])ₖ).",
            params: [],
            inputs: [
                "logits": Real => "[..., V] logits",
                "targets": Index => "[...] target ids in [0, V) (logits.shape[:-1])",
            ],
            outputs: ["log_probs" => "[...] log softmax(z)[target]"],
            vjp: ["log_probs" => ["logits"]],
            run: run_selective_log_softmax,
        },
        op_def! {
            path: "logits::gather_log_softmax",
            doc: "Log-probabilities of k target ids per row at temperature T: \
                  out[r, i] = z[r, t_{r,i}]/T − lse(z[r, :]/T) (TRL selective_log_softmax with a \
                  [..., k] index, OpenRLHF log_probs_from_logits(temperature), torchtune \
                  logits_to_logprobs(temperature), verl logprobs_from_logits at T = 1). Gradient: \
                  (Σᵢ c[r, i] 1[j = t_{r,i}] − p[r, j] Σᵢ c[r, i]) / T.",
            params: ["temperature": "Option<Temperature>" => "softmax temperature T > 0 (default 1.0)"],
            inputs: [
                "logits": Real => "[..., V] logits",
                "targets": Index => "[..., k] target ids per row (k = its last axis)",
            ],
            outputs: ["log_probs" => "[..., k] log softmax(z/T)[targets]"],
            vjp: ["log_probs" => ["logits"]],
            run: run_gather_log_softmax,
        },
        op_def! {
            path: "logits::entropy_from_logits",
            doc: "Entropy of each row's softmax: H = −Σₖ pₖ log pₖ (= lse(z) − Σ p·z), \
                  zero-probability terms skipped (TRL / verl entropy_from_logits, OpenRLHF \
                  compute_entropy; they give NaN for a logit of −∞). Gradient: \
                  −c·pₖ(log pₖ + H).",
            params: [],
            inputs: ["logits": Real => "[..., V] logits"],
            outputs: ["entropy" => "[...] the entropy per row"],
            vjp: ["entropy" => ["logits"]],
            run: run_entropy_from_logits,
        },
        op_def! {
            path: "logits::sum_pi_squared",
            doc: "Σₖ pₖ² of each row's softmax, the collision probability (verl \
                  calculate_sum_pi_squared_from_logits, the optimal-token-baseline estimator). \
                  Gradient: c·2pₖ(pₖ − Σⱼ pⱼ²).",
            params: [],
            inputs: ["logits": Real => "[..., V] logits"],
            outputs: ["sum_pi_squared" => "[...] Σₖ pₖ² per row"],
            vjp: ["sum_pi_squared" => ["logits"]],
            run: run_sum_pi_squared,
        },
        op_def! {
            path: "logits::sequence_log_probs",
            doc: "Per-sequence log-probability of the labels: out[b] = Σ_valid log p_t(label) \
                  (with shift_labels the logits at t score label_{t+1}; a position is valid when \
                  its label ≠ ignore_index), or that sum / (n_b + 1e-8) when averaging; an empty \
                  row gives 0 (torchtune get_batch_log_probs). Gradient: \
                  w_b (1[j = label] − p[b, t, j]) at valid positions, 0 elsewhere.",
            params: ["cfg": "SequenceLogProbConfig" => "ignore_index, average, shift_labels (SequenceLogProbConfig preset torchtune(average))"],
            inputs: [
                "logits": Real => "[B, T, V] logits",
                "labels": Index => "[B, T] label ids (ignore_index marks a skipped position)",
            ],
            outputs: ["log_probs" => "[B] the summed (or averaged) label log-probability per sequence"],
            vjp: ["log_probs" => ["logits"]],
            run: run_sequence_log_probs,
        },
        op_def! {
            path: "logits::entropy_loss",
            doc: "The aggregated token entropy L = Σᵢⱼ wᵢⱼ H(z[i, j]), w the weights of `mode` \
                  under `norm` (verl compute_entropy_loss(logits, response_mask, loss_agg_mode) \
                  with GlobalNorm::default()). Gradient: −wᵢⱼ pₖ(log pₖ + H), 0 on masked \
                  positions (never read there).",
            params: [
                "mode": "AggMode" => "token-mean | token-sum | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm",
                "norm": "Option<GlobalNorm>" => "global normalizers (default: GlobalNorm::default())",
            ],
            inputs: [
                "logits": Real => "[B, T, V] logits",
                "mask": Mask => "[B, T] valid tokens",
            ],
            outputs: ["loss" => "the aggregated entropy (scalar)"],
            vjp: ["loss" => ["logits"]],
            run: run_entropy_loss,
        },
        // ----------------------------------------------------------- sequence
        op_def! {
            path: "sequence::response_mask_from_eos",
            doc: "Marks, per row, every position up to and including the first EOS token: \
                  e_t = 1[id_t ∈ eos], mask_t = (Σ_{s ≤ t} e_s − e_t) == 0 (verl get_response_mask, \
                  eos_token an int or a list). Not differentiable.",
            params: [],
            inputs: [
                "response_ids": Index => "[B, T] token ids",
                "eos": Index => "[K] the EOS token ids",
            ],
            outputs: ["mask" => "[B, T] bool: up to and including the first EOS"],
            vjp: [],
            run: run_response_mask_from_eos,
        },
        op_def! {
            path: "sequence::truncate_at_first_stop_token",
            doc: "Truncates each row after its first stop token: c_t = #stop tokens at positions ≤ t, \
                  padding_t = c_t > 1 or (c_t = 1 and id_t is not a stop token); padded positions \
                  are set to `fill` (the first stop token itself is kept; a row without one is \
                  untouched) — torchtune truncate_sequence_at_first_stop_token. Not differentiable.",
            params: ["fill": "i64" => "the id written at padded positions (torchtune: pad_id)"],
            inputs: [
                "sequences": Index => "[B, T] token ids (read; the truncated copy is returned)",
                "stop_tokens": Index => "[K] the stop token ids",
            ],
            outputs: [
                "sequences" => "[B, T] int64: the truncated ids",
                "padding_mask" => "[B, T] bool: the positions after the first stop token",
            ],
            vjp: [],
            run: run_truncate_at_first_stop_token,
        },
        op_def! {
            path: "sequence::reward_penalty_mask",
            doc: "Which sequences get the reward penalty: penalise_i = (penalise_no_eos and row i has \
                  no padding, i.e. no EOS) or (min_response_length is set and seq_lens_i < it) — \
                  torchtune get_reward_penalty_mask (rows assumed truncated at their first EOS). \
                  Not differentiable.",
            params: ["cfg": "RewardPenaltyConfig" => "penalise_no_eos, min_response_length (default: the core's Default)"],
            inputs: [
                "padding_masks": Mask => "[B, T] padding after the first EOS",
                "seq_lens": Index => "[B] response lengths",
            ],
            outputs: ["penalise" => "[B] bool: the sequences to penalise"],
            vjp: [],
            run: run_reward_penalty_mask,
        },
        op_def! {
            path: "sequence::quantile",
            doc: "The q-quantile of `values` with linear interpolation (torch.quantile, \
                  interpolation=\"linear\", torch's lerp order): sorted v, ρ = q·(n − 1), \
                  lerp(v_⌊ρ⌋, v_⌈ρ⌉, ρ − ⌊ρ⌋). NaN if any value is NaN; NaN for no values (the \
                  core's None). Not differentiable.",
            params: ["q": "f64" => "the quantile, 0 ≤ q ≤ 1"],
            inputs: ["values": Real => "[...] the values (read, not sorted in place)"],
            outputs: ["quantile" => "the quantile (scalar); NaN when `values` is empty"],
            vjp: [],
            run: run_quantile,
        },
        op_def! {
            path: "sequence::high_entropy_mask",
            doc: "Marks the valid tokens whose entropy reaches the quantile_q-quantile τ of the \
                  valid entropies: mask_t = valid_t and H_t ≥ τ (TRL \
                  GRPOTrainer.get_high_entropy_mask(entropies, mask, threshold=quantile_q), one \
                  process). Metric `threshold` = τ, absent when nothing is valid (then nothing \
                  is marked). Not differentiable.",
            params: ["quantile_q": "f64" => "the quantile q ∈ [0, 1] (TRL: 1 − top_entropy_quantile)"],
            inputs: [
                "entropies": Real => "[B, T] token entropies",
                "mask": Mask => "[B, T] valid tokens",
            ],
            outputs: [
                "entropy_mask" => "[B, T] bool: valid and H ≥ τ",
                "threshold" => "metric: the quantile τ (absent when no token is valid)",
            ],
            vjp: [],
            run: run_high_entropy_mask,
        },
        op_def! {
            path: "sequence::off_policy_sequence_mask",
            doc: "Keeps a sequence when A_i ≥ 0 or its mean KL to the sampler is small: \
                  KL_i = Σ_valid nan(log μ_t − log π_t) / max(n_i, 1), keep_i = A_i ≥ 0 or \
                  KL_i ≤ threshold (TRL GRPOTrainer.get_off_policy_mask, DeepSeek-V3.2; `nan` \
                  propagate = TRL f2cd577, as_on_policy = TRL 1.16.0 nan_to_num). Not \
                  differentiable.",
            params: [
                "threshold": "f64" => "the KL threshold δ (TRL off_policy_threshold)",
                "nan": "Option<NanSamplerLogProbs>" => "propagate (default) | as_on_policy",
            ],
            inputs: [
                "advantages": Real => "[B] (or [B, 1]) sequence advantages",
                "log_prob": Real => "[B, T] log π (TRL per_token_logps)",
                "sampling_log_prob": Real => "[B, T] log μ of the sampler (TRL sampling_per_token_logps)",
                "mask": Mask => "[B, T] valid tokens",
            ],
            outputs: ["keep" => "[B] bool: the sequence is kept"],
            vjp: [],
            run: run_off_policy_sequence_mask,
        },
        op_def! {
            path: "sequence::pf_ppo_sampling_weights",
            doc: "PF-PPO resampling weights from sequence scores s_i = Σ_t score_{i,t}: pow \
                  |s_i|^p, max_min 1[s_i = max or min], max_random 0.4 at the max else 0.1; then \
                  max(w + 1e-8, 1e-8) (verl compute_pf_ppo_reweight_data, the weights it draws \
                  from). Not differentiable.",
            params: ["method": "PfPpoReweight" => "{\"Pow\": p} | \"MaxMin\" | \"MaxRandom\" (config PfPpoReweight from verl's reweight_method / weight_pow)"],
            inputs: ["scores": Real => "[B, T] token-level scores (every position counts)"],
            outputs: ["weights" => "[B] the sampling weight per sequence"],
            vjp: [],
            run: run_pf_ppo_sampling_weights,
        },
        // ------------------------------------------------------------ distill
        op_def! {
            path: "distill::generalized_jsd_loss",
            doc: "The generalized JSD distillation loss from logits: s = log softmax(z_s/T), \
                  t = log softmax(z_t/T), per element β = 0: e^t(t − s) (KL(teacher‖student)), \
                  β = 1: e^s(s − t), else β e^t(t − m) + (1−β) e^s(s − m) with \
                  m = log((1−β)e^s + βe^t); L = Σ_valid rows Σₖ jsd / D, D = num_items_in_batch \
                  or by reduction (BatchMean: #valid rows with a mask, else batch; Sum: 1; Mean: \
                  #valid rows·V); an empty selection gives 0 (TRL GKDTrainer / \
                  DistillationTrainer.generalized_jsd_loss with labels ≠ −100 as the row mask). \
                  Gradient: ∂L/∂z_student.",
            params: ["cfg": "DistillConfig" => "jsd {beta}, temperature, reduction (BatchMean | Sum | Mean), num_items_in_batch"],
            inputs: [
                "student_logits": Real => "[B, T, V] (or [B, V]: T = 1) student logits",
                "teacher_logits": Real => "same shape: teacher logits",
                "valid": Mask opt => "[B, T] rows that count (default: all; TRL labels ≠ −100)",
            ],
            outputs: ["loss" => "the reduced divergence (scalar)"],
            vjp: ["loss" => ["student_logits"]],
            run: run_generalized_jsd_loss,
        },
        op_def! {
            path: "distill::generalized_jsd_elementwise",
            doc: "The element-wise generalized JSD from logits (reduction=\"none\"): \
                  out[r, k] = jsd(s[r, k], t[r, k]) with s, t the student and teacher \
                  log softmax(z/T) (formulas as distill::generalized_jsd_loss); rows where \
                  `valid` is false give 0 (TRL generalized_jsd_loss(…, reduction=\"none\"), which \
                  returns the valid rows only). Gradient: (g − p Σₖ gₖ)/T, \
                  gₖ = cₖ ∂jsd/∂sₖ, into the student logits.",
            params: [
                "jsd": "Jsd" => "{\"beta\": β}, β ∈ [0, 1]",
                "temperature": "Option<Temperature>" => "softmax temperature T > 0 (default 1.0)",
            ],
            inputs: [
                "student_logits": Real => "[..., V] student logits",
                "teacher_logits": Real => "[..., V] teacher logits",
                "valid": Mask opt => "[...] rows that count (default: all)",
            ],
            outputs: ["jsd" => "[..., V] the divergence per element"],
            vjp: ["jsd" => ["student_logits"]],
            run: run_generalized_jsd_elementwise,
        },
        op_def! {
            path: "distill::jsd_from_log_probs",
            doc: "The element-wise generalized JSD of log-probabilities (no softmax): \
                  out[i] = jsd(s[i], t[i]); with a support mask, positions outside it are 0 and \
                  those inside use the support-masked term (TRL distillation \
                  _jsd_divergence(student_log_probs, teacher_log_probs, beta, support_mask)). \
                  Gradient: c ⊙ ∂jsd/∂s.",
            params: ["jsd": "Jsd" => "{\"beta\": β}, β ∈ [0, 1]"],
            inputs: [
                "student_log_probs": Real => "[...] student log-probabilities s",
                "teacher_log_probs": Real => "[...] teacher log-probabilities t",
                "support": Mask opt => "[...] support mask (default: none)",
            ],
            outputs: ["jsd" => "[...] the divergence per element"],
            vjp: ["jsd" => ["student_log_probs"]],
            run: run_jsd_from_log_probs,
        },
        op_def! {
            path: "distill::kd_loss",
            doc: "Knowledge-distillation cross entropy: L = −(1/N) Σ_valid rows \
                  Σ_{k: zₖ ≠ ±∞} p_teacher,k log softmax(z)ₖ, N valid rows (an empty selection \
                  gives 0; OpenRLHF KDLoss, valid = label ≠ −100, no shift). Gradient: \
                  −(1/N)(p_teacher,j 1[zⱼ finite] − p_student,j Σ_{k finite} p_teacher,k).",
            params: [],
            inputs: [
                "student_logits": Real => "[..., V] student logits",
                "teacher_logits": Real => "[..., V] teacher logits",
                "valid": Mask => "[...] rows that count (OpenRLHF: label ≠ −100)",
            ],
            outputs: ["loss" => "the mean teacher-weighted NLL (scalar)"],
            vjp: ["loss" => ["student_logits"]],
            run: run_kd_loss,
        },
        // -------------------------------------------------------------- fused
        op_def! {
            path: "fused::token_loss",
            doc: "verl's actor loss in one pass: L = Σ w·IS·ℓ + coef·Σ v·KL, ℓ the token-level \
                  policy loss of cfg.loss (token-local variants), KL the cfg.kl estimator of \
                  log π − log π_ref, w and v the weights of cfg.agg under cfg.norm (verl \
                  compute_policy_loss_* + kl_penalty + agg_loss as the actor combines them: \
                  pg_loss + kl_loss·kl_loss_coef; the same numbers as policy::token::policy_loss \
                  + kl::KlConfig::estimate_slices + aggregate). Metrics: policy_loss, kl_loss \
                  (before the coefficient), clipfrac, clipfrac_lower, approx_kl. Gradient: \
                  ∂L/∂log_prob.",
            params: ["cfg": "TokenLoss" => "loss (PolicyLoss), agg (AggMode), norm (GlobalNorm), kl (Option<KlPenalty>)"],
            inputs: [
                "log_prob": Real => "[B, T] log π of the taken tokens",
                "old_log_prob": Real => "[B, T] log π_old",
                "advantages": Real => "[B, T] advantages A",
                "mask": Mask => "[B, T] valid tokens",
                "is_weights": Real opt => "[B, T] constant importance weights (verl rollout_is_weights)",
                "ref_log_prob": Real opt => "[B, T] log π_ref (required with cfg.kl)",
            ],
            outputs: [
                "loss" => "policy loss + coef · KL loss (scalar)",
                "policy_loss" => "metric: the policy term (verl pg_loss)",
                "kl_loss" => "metric: the aggregated KL before the coefficient (verl kl_loss; 0 without kl)",
                "clipfrac" => "metric: share of valid tokens clipped (verl pg_clipfrac)",
                "clipfrac_lower" => "metric: share where the dual clip is active (verl pg_clipfrac_lower)",
                "approx_kl" => "metric: mean −log-ratio over valid tokens (verl ppo_kl)",
            ],
            vjp: ["loss" => ["log_prob"]],
            run: run_token_loss,
        },
        op_def! {
            path: "fused::log_probs_entropy",
            doc: "Token log-probability and entropy from logits in one read (online \
                  log-sum-exp), y = z/T: log_probs[r] = y[t_r] − lse, entropy[r] = −Σ p log p, \
                  lse[r] = log Σ e^y (TRL selective_log_softmax + entropy_from_logits, verl \
                  logprobs_from_logits + entropy_from_logits, OpenRLHF \
                  log_probs_from_logits(temperature); the same numbers as \
                  logits::gather_log_softmax and logits::entropy_from_logits). Gradient \
                  (fused::log_probs_entropy_backward): \
                  (c_lp·(1[k = t] − pₖ) − c_H·pₖ(log pₖ + H)) / T.",
            params: ["temperature": "Option<Temperature>" => "softmax temperature T > 0 (default 1.0)"],
            inputs: [
                "logits": Real => "[..., V] logits",
                "targets": Index => "[...] target ids in [0, V) (logits.shape[:-1])",
            ],
            outputs: [
                "log_probs" => "[...] log softmax(z/T)[target]",
                "entropy" => "[...] entropy of softmax(z/T)",
                "lse" => "[...] log-sum-exp of z/T (what the backward reuses)",
            ],
            vjp: ["log_probs" => ["logits"], "entropy" => ["logits"]],
            run: run_log_probs_entropy,
        },
    ]
}

// ---------------------------------------------------------------------------
// Shapes and parameters
// ---------------------------------------------------------------------------

fn msg(op: &str, m: impl core::fmt::Display) -> CallError {
    CallError::Msg(format!("{op}: {m}"))
}

/// `(rows, vocab)` of a `[..., V]` array: the last axis is the vocabulary.
fn rows_vocab(op: &str, name: &str, shape: &[usize]) -> CallResult<(usize, usize)> {
    match shape.split_last() {
        Some((&v, lead)) => Ok((lead.iter().product(), v)),
        None => Err(msg(
            op,
            format_args!("input `{name}` must be [..., V] (at least 1-D), got a 0-d array"),
        )),
    }
}

/// The temperature parameter, validated by `Temperature::new`.
fn temperature<F: CoreReal>(c: &Call<'_, F>) -> CallResult<Temperature> {
    let t: Temperature = c.param_or("temperature", Temperature::ONE)?;
    Ok(Temperature::new(t.get())?)
}

/// A zeroed gradient buffer when a cotangent was given, else an empty one.
fn grad_buf<F: CoreReal>(wanted: bool, n: usize) -> Vec<F> {
    vec![F::zero(); if wanted { n } else { 0 }]
}

// ---------------------------------------------------------------------------
// logits
// ---------------------------------------------------------------------------

fn run_log_softmax<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let op = "logits::log_softmax";
    let t = temperature(c)?;
    let (z, shape) = c.real("logits")?;
    let (rows, vocab) = rows_vocab(op, "logits", shape)?;
    let mut out = vec![F::zero(); z.len()];
    log_softmax(z, rows, vocab, t, &mut out)?;
    if let Some(cot) = c.cot("log_probs")? {
        let mut g = vec![F::zero(); z.len()];
        log_softmax_vjp(z, rows, vocab, t, cot, &mut g)?;
        c.grad("logits", g);
    }
    c.output("log_probs", out, shape);
    Ok(())
}

fn run_selective_log_softmax<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let op = "logits::selective_log_softmax";
    let (z, shape) = c.real("logits")?;
    let (ids, id_shape) = c.index("targets")?;
    let (rows, vocab) = rows_vocab(op, "logits", shape)?;
    let cot = c.cot("log_probs")?;
    let mut out = vec![F::zero(); ids.len()];
    let mut g = grad_buf(cot.is_some(), z.len());
    selective_log_softmax(z, rows, vocab, ids, &mut out, cot.map(|k| (k, &mut g[..])))?;
    c.output("log_probs", out, id_shape);
    if cot.is_some() {
        c.grad("logits", g);
    }
    Ok(())
}

fn run_gather_log_softmax<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let op = "logits::gather_log_softmax";
    let t = temperature(c)?;
    let (z, shape) = c.real("logits")?;
    let (ids, id_shape) = c.index("targets")?;
    let (rows, vocab) = rows_vocab(op, "logits", shape)?;
    let (_, k) = rows_vocab(op, "targets", id_shape)?;
    let cot = c.cot("log_probs")?;
    let mut out = vec![F::zero(); ids.len()];
    let mut g = grad_buf(cot.is_some(), z.len());
    gather_log_softmax(
        z,
        rows,
        vocab,
        t,
        k,
        ids,
        &mut out,
        cot.map(|x| (x, &mut g[..])),
    )?;
    c.output("log_probs", out, id_shape);
    if cot.is_some() {
        c.grad("logits", g);
    }
    Ok(())
}

/// A per-row reduction of `[..., V]` logits with a per-row cotangent.
type RowOp<F> =
    fn(&[F], usize, usize, &mut [F], Option<(&[F], &mut [F])>) -> Result<(), posttrain_core::Error>;

fn run_row_op<F: CoreReal>(
    c: &mut Call<'_, F>,
    op: &str,
    out_name: &str,
    f: RowOp<F>,
) -> CallResult<()> {
    let (z, shape) = c.real("logits")?;
    let (rows, vocab) = rows_vocab(op, "logits", shape)?;
    let cot = c.cot(out_name)?;
    let mut out = vec![F::zero(); rows];
    let mut g = grad_buf(cot.is_some(), z.len());
    f(z, rows, vocab, &mut out, cot.map(|k| (k, &mut g[..])))?;
    c.output(out_name, out, &shape[..shape.len() - 1]);
    if cot.is_some() {
        c.grad("logits", g);
    }
    Ok(())
}

fn run_entropy_from_logits<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    run_row_op(
        c,
        "logits::entropy_from_logits",
        "entropy",
        entropy_from_logits::<F>,
    )
}

fn run_sum_pi_squared<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    run_row_op(
        c,
        "logits::sum_pi_squared",
        "sum_pi_squared",
        sum_pi_squared::<F>,
    )
}

fn run_sequence_log_probs<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let op = "logits::sequence_log_probs";
    let cfg: SequenceLogProbConfig = c.param("cfg")?;
    let dims = c.dims_of("labels")?;
    let (z, shape) = c.real("logits")?;
    let (ids, _) = c.index("labels")?;
    let (_, vocab) = rows_vocab(op, "logits", shape)?;
    let cot = c.cot("log_probs")?;
    let mut out = vec![F::zero(); dims.batch];
    let mut g = grad_buf(cot.is_some(), z.len());
    sequence_log_probs(
        &cfg,
        dims,
        vocab,
        z,
        ids,
        &mut out,
        cot.map(|k| (k, &mut g[..])),
    )?;
    c.output("log_probs", out, &[dims.batch]);
    if cot.is_some() {
        c.grad("logits", g);
    }
    Ok(())
}

fn run_entropy_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let op = "logits::entropy_loss";
    let mode: AggMode = c.param("mode")?;
    let norm: GlobalNorm = c.param_or("norm", GlobalNorm::default())?;
    let dims = c.dims_of("mask")?;
    let (z, shape) = c.real("logits")?;
    let (mask, _) = c.mask("mask")?;
    let (_, vocab) = rows_vocab(op, "logits", shape)?;
    let cot = c.cot_scalar("loss")?;
    let mut scratch = vec![F::zero(); dims.len()];
    let mut g = grad_buf(cot.is_some(), z.len());
    let loss = entropy_loss(
        mode,
        &norm,
        dims,
        vocab,
        z,
        mask,
        &mut scratch,
        cot.map(|k| (k, &mut g[..])),
    )?;
    c.scalar("loss", loss);
    if cot.is_some() {
        c.grad("logits", g);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// sequence
// ---------------------------------------------------------------------------

fn run_quantile<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let q: f64 = c.param("q")?;
    let (v, _) = c.real("values")?;
    let mut sorted = v.to_vec();
    let out = quantile(&mut sorted, q)?;
    c.scalar("quantile", out.unwrap_or_else(F::nan));
    Ok(())
}

fn run_response_mask_from_eos<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let dims = c.dims_of("response_ids")?;
    let (ids, shape) = c.index("response_ids")?;
    let (eos, _) = c.index("eos")?;
    let mut mask = vec![false; ids.len()];
    response_mask_from_eos(dims, ids, eos, &mut mask)?;
    c.output_mask("mask", mask, shape);
    Ok(())
}

fn run_truncate_at_first_stop_token<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let fill: i64 = c.param("fill")?;
    let dims = c.dims_of("sequences")?;
    let (ids, shape) = c.index("sequences")?;
    let (stop, _) = c.index("stop_tokens")?;
    let mut seq = ids.to_vec();
    let mut pad = vec![false; ids.len()];
    truncate_at_first_stop_token(dims, &mut seq, stop, fill, &mut pad)?;
    c.output_index("sequences", seq, shape);
    c.output_mask("padding_mask", pad, shape);
    Ok(())
}

fn run_reward_penalty_mask<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: RewardPenaltyConfig = c.param_or("cfg", RewardPenaltyConfig::default())?;
    let dims = c.dims_of("padding_masks")?;
    let (pad, _) = c.mask("padding_masks")?;
    let (lens, _) = c.index("seq_lens")?;
    let mut out = vec![false; dims.batch];
    reward_penalty_mask(&cfg, dims, pad, lens, &mut out)?;
    c.output_mask("penalise", out, &[dims.batch]);
    Ok(())
}

fn run_high_entropy_mask<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let q: f64 = c.param("quantile_q")?;
    let dims = c.dims_of("entropies")?;
    let (h, shape) = c.real("entropies")?;
    let (mask, _) = c.mask("mask")?;
    let mut out = vec![false; h.len()];
    let mut scratch = vec![F::zero(); h.len()];
    let tau = high_entropy_mask(dims, h, mask, q, &mut out, &mut scratch)?;
    c.output_mask("entropy_mask", out, shape);
    if let Some(t) = tau {
        c.metric("threshold", t.to_f64());
    }
    Ok(())
}

fn run_off_policy_sequence_mask<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let threshold: f64 = c.param("threshold")?;
    let nan: NanSamplerLogProbs = c.param_or("nan", NanSamplerLogProbs::default())?;
    let dims = c.dims_of("log_prob")?;
    let (adv, _) = c.real("advantages")?;
    let (lp, _) = c.real("log_prob")?;
    let (slp, _) = c.real("sampling_log_prob")?;
    let (mask, _) = c.mask("mask")?;
    let mut keep = vec![false; dims.batch];
    off_policy_sequence_mask(dims, adv, lp, slp, mask, threshold, nan, &mut keep)?;
    c.output_mask("keep", keep, &[dims.batch]);
    Ok(())
}

fn run_pf_ppo_sampling_weights<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let method: PfPpoReweight = c.param("method")?;
    check_pf_ppo(&method)?;
    let dims = c.dims_of("scores")?;
    let (s, _) = c.real("scores")?;
    let mut w = vec![F::zero(); dims.batch];
    pf_ppo_sampling_weights(method, dims, s, &mut w)?;
    c.output("weights", w, &[dims.batch]);
    Ok(())
}

/// `PfPpoReweight`'s validation: `PfPpoReweight::parse`'s rule (a finite
/// power for `Pow`).
fn check_pf_ppo(m: &PfPpoReweight) -> Result<(), posttrain_core::Error> {
    match *m {
        PfPpoReweight::Pow(p) => PfPpoReweight::parse("pow", p).map(|_| ()),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// distill
// ---------------------------------------------------------------------------

/// Re-runs `DistillConfig::new` on a deserialized value.
fn check_distill(c: &DistillConfig) -> Result<DistillConfig, posttrain_core::Error> {
    DistillConfig::new(
        c.jsd.beta(),
        c.temperature.get(),
        c.reduction,
        c.num_items_in_batch,
    )
}

/// `Dims` of `[B, T, V]` logits (`[B, V]`: `T = 1`) and the vocabulary.
fn logits_dims(op: &str, name: &str, shape: &[usize]) -> CallResult<(Dims, usize)> {
    match *shape {
        [b, t, v] => Ok((Dims::new(b, t), v)),
        [b, v] => Ok((Dims::new(b, 1), v)),
        _ => Err(msg(
            op,
            format_args!("input `{name}` must be [B, T, V] or [B, V], got shape {shape:?}"),
        )),
    }
}

fn run_generalized_jsd_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let op = "distill::generalized_jsd_loss";
    let cfg = check_distill(&c.param::<DistillConfig>("cfg")?)?;
    let (zs, shape) = c.real("student_logits")?;
    let (zt, _) = c.real("teacher_logits")?;
    let valid = c.opt_mask("valid")?.map(|x| x.0);
    let (dims, vocab) = logits_dims(op, "student_logits", shape)?;
    let cot = c.cot_scalar("loss")?;
    let mut g = grad_buf(cot.is_some(), zs.len());
    let loss = generalized_jsd_loss(
        &cfg,
        dims,
        vocab,
        zs,
        zt,
        valid,
        cot.map(|k| (k, &mut g[..])),
    )?;
    c.scalar("loss", loss);
    if cot.is_some() {
        c.grad("student_logits", g);
    }
    Ok(())
}

fn run_generalized_jsd_elementwise<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let op = "distill::generalized_jsd_elementwise";
    let jsd: Jsd = c.param("jsd")?;
    let jsd = Jsd::new(jsd.beta())?;
    let t = temperature(c)?;
    let (zs, shape) = c.real("student_logits")?;
    let (zt, _) = c.real("teacher_logits")?;
    let valid = c.opt_mask("valid")?.map(|x| x.0);
    let (rows, vocab) = rows_vocab(op, "student_logits", shape)?;
    let cot = c.cot("jsd")?;
    let mut out = vec![F::zero(); zs.len()];
    let mut g = grad_buf(cot.is_some(), zs.len());
    generalized_jsd_elementwise(
        &jsd,
        t,
        rows,
        vocab,
        zs,
        zt,
        valid,
        &mut out,
        cot.map(|k| (k, &mut g[..])),
    )?;
    c.output("jsd", out, shape);
    if cot.is_some() {
        c.grad("student_logits", g);
    }
    Ok(())
}

fn run_jsd_from_log_probs<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let jsd: Jsd = c.param("jsd")?;
    let jsd = Jsd::new(jsd.beta())?;
    let (s, shape) = c.real("student_log_probs")?;
    let (t, _) = c.real("teacher_log_probs")?;
    let support = c.opt_mask("support")?.map(|x| x.0);
    let cot = c.cot("jsd")?;
    let mut out = vec![F::zero(); s.len()];
    let mut g = grad_buf(cot.is_some(), s.len());
    jsd_from_log_probs(&jsd, s, t, support, &mut out, cot.map(|k| (k, &mut g[..])))?;
    c.output("jsd", out, shape);
    if cot.is_some() {
        c.grad("student_log_probs", g);
    }
    Ok(())
}

fn run_kd_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let op = "distill::kd_loss";
    let (zs, shape) = c.real("student_logits")?;
    let (zt, _) = c.real("teacher_logits")?;
    let (valid, _) = c.mask("valid")?;
    let (rows, vocab) = rows_vocab(op, "student_logits", shape)?;
    let cot = c.cot_scalar("loss")?;
    let mut g = grad_buf(cot.is_some(), zs.len());
    let loss = kd_loss(rows, vocab, zs, zt, valid, cot.map(|k| (k, &mut g[..])))?;
    c.scalar("loss", loss);
    if cot.is_some() {
        c.grad("student_logits", g);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// fused
// ---------------------------------------------------------------------------

fn run_token_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: TokenLoss = c.param("cfg")?;
    let dims = c.dims_of("log_prob")?;
    let batch = PolicyBatch {
        dims,
        log_prob: c.real("log_prob")?.0,
        old_log_prob: c.real("old_log_prob")?.0,
        advantages: c.real("advantages")?.0,
        mask: c.mask("mask")?.0,
        is_weights: c.opt_real("is_weights")?.map(|x| x.0),
    };
    let ref_lp = c.opt_real("ref_log_prob")?.map(|x| x.0);
    let cot = c.cot_scalar("loss")?;
    let mut g = grad_buf(cot.is_some(), dims.len());
    let out = token_loss(&cfg, &batch, ref_lp, cot.map(|k| (k, &mut g[..])))?;
    c.scalar("loss", out.loss);
    c.metric("policy_loss", out.policy.loss.to_f64());
    c.metric("kl_loss", out.kl_loss.to_f64());
    c.metric("clipfrac", out.policy.clipfrac.to_f64());
    c.metric("clipfrac_lower", out.policy.clipfrac_lower.to_f64());
    c.metric("approx_kl", out.policy.approx_kl.to_f64());
    if cot.is_some() {
        c.grad("log_prob", g);
    }
    Ok(())
}

fn run_log_probs_entropy<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let op = "fused::log_probs_entropy";
    let t = temperature(c)?;
    let (z, shape) = c.real("logits")?;
    let (ids, id_shape) = c.index("targets")?;
    let (rows, vocab) = rows_vocab(op, "logits", shape)?;
    let mut lp = vec![F::zero(); ids.len()];
    let mut h = vec![F::zero(); ids.len()];
    let mut lse = vec![F::zero(); ids.len()];
    log_probs_entropy(z, rows, vocab, t, ids, &mut lp, &mut h, &mut lse)?;
    let c_lp = c.cot("log_probs")?;
    let c_h = c.cot("entropy")?;
    if c_lp.is_some() || c_h.is_some() {
        let zeros;
        let d_lp = match c_lp {
            Some(x) => x,
            None => {
                zeros = vec![F::zero(); ids.len()];
                &zeros[..]
            }
        };
        let mut g = vec![F::zero(); z.len()];
        log_probs_entropy_backward(z, rows, vocab, t, ids, &lse, &h, d_lp, c_h, &mut g)?;
        c.grad("logits", g);
    }
    c.output("log_probs", lp, id_shape);
    c.output("entropy", h, id_shape);
    c.output("lse", lse, id_shape);
    Ok(())
}

// ---------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------

pub(crate) fn configs() -> Vec<ConfigDef> {
    vec![
        ConfigDef {
            name: "Temperature",
            path: "logits::Temperature",
            doc: "A softmax temperature T > 0, finite (serde form: the bare number). \
                  Default 1.0; `t=` builds Temperature::new(t).",
            preset_args: None,
            base: |_, args| {
                Ok(Some(match args.remove("t") {
                    Some(v) => {
                        let t = v.as_f64().ok_or_else(|| {
                            CallError::Msg(format!("Temperature: `t` must be a number, got {v}"))
                        })?;
                        to_value(&Temperature::new(t)?)?
                    }
                    None => to_value(&Temperature::default())?,
                }))
            },
            check: |v| {
                check_with::<Temperature>("Temperature", v, |t| Temperature::new(t.get()).map(|_| ()))
            },
        },
        ConfigDef {
            name: "SequenceLogProbConfig",
            path: "logits::SequenceLogProbConfig",
            doc: "How logits::sequence_log_probs reduces label log-probs: ignore_index, average, \
                  shift_labels. preset=\"torchtune\" (with `average`) is \
                  SequenceLogProbConfig::torchtune(average): ignore_index −100, shifted labels.",
            preset_args: Some(&["average"]),
            base: |preset, args| {
                Ok(match preset {
                    Some(Preset::Torchtune) => {
                        let avg: bool = take(args, "SequenceLogProbConfig", "average")?;
                        Some(to_value(&SequenceLogProbConfig::torchtune(avg))?)
                    }
                    Some(p) => {
                        return Err(CallError::Msg(format!(
                            "SequenceLogProbConfig: its only constructor is torchtune(average), \
                             not preset {p:?}; give the fields"
                        )))
                    }
                    None => None,
                })
            },
            check: |v| check_with::<SequenceLogProbConfig>("SequenceLogProbConfig", v, |_| Ok(())),
        },
        ConfigDef {
            name: "RewardPenaltyConfig",
            path: "sequence::RewardPenaltyConfig",
            doc: "Which sequences sequence::reward_penalty_mask flags: penalise_no_eos, \
                  min_response_length (Option<i64>). Default: neither.",
            preset_args: None,
            base: |_, _| Ok(Some(to_value(&RewardPenaltyConfig::default())?)),
            check: |v| check_with::<RewardPenaltyConfig>("RewardPenaltyConfig", v, |_| Ok(())),
        },
        ConfigDef {
            name: "PfPpoReweight",
            path: "sequence::PfPpoReweight",
            doc: "PF-PPO's reweighting (an enum): {\"Pow\": p}, \"MaxMin\", \"MaxRandom\". \
                  `method=` (verl reweight_method: pow | max_min | max_random) with optional \
                  `weight_pow` (default 2.0) builds PfPpoReweight::parse(method, weight_pow).",
            preset_args: None,
            base: |_, args| {
                Ok(match args.remove("method") {
                    Some(m) => {
                        let m = m.as_str().map(str::to_owned).ok_or_else(|| {
                            CallError::Msg(format!("PfPpoReweight: `method` must be a string, got {m}"))
                        })?;
                        let p = if args.contains_key("weight_pow") {
                            take_f64(args, "PfPpoReweight", "weight_pow")?
                        } else {
                            2.0
                        };
                        Some(to_value(&PfPpoReweight::parse(&m, p)?)?)
                    }
                    None => None,
                })
            },
            check: |v| check_with::<PfPpoReweight>("PfPpoReweight", v, check_pf_ppo),
        },
        ConfigDef {
            name: "Jsd",
            path: "distill::Jsd",
            doc: "The generalized JSD interpolation {\"beta\": β}, β ∈ [0, 1]: 0 = KL(teacher‖student), \
                  1 = KL(student‖teacher).",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| check_with::<Jsd>("Jsd", v, |j| Jsd::new(j.beta()).map(|_| ())),
        },
        ConfigDef {
            name: "DistillConfig",
            path: "distill::DistillConfig",
            doc: "The generalized JSD distillation loss: jsd ({\"beta\": β}), temperature, \
                  reduction (BatchMean | Sum | Mean | None), num_items_in_batch (Option<f64>). \
                  Validated by DistillConfig::new.",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| check_with::<DistillConfig>("DistillConfig", v, |c| check_distill(c).map(|_| ())),
        },
        ConfigDef {
            name: "KlPenalty",
            path: "fused::KlPenalty",
            doc: "The KL penalty of fused::token_loss: estimator (KlConfig), coef (verl kl_loss_coef).",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| {
                check_with::<KlPenalty>("KlPenalty", v, |k| {
                    k.estimator.validate()?;
                    posttrain_core::error::check_param(
                        k.coef.is_finite(),
                        "kl_loss_coef",
                        k.coef,
                        "must be finite",
                    )
                })
            },
        },
        ConfigDef {
            name: "TokenLoss",
            path: "fused::TokenLoss",
            doc: "The fused token loss: loss (PolicyLoss, token-local variants), agg (AggMode), \
                  norm (GlobalNorm), kl (Option<KlPenalty>). Validated by TokenLoss::validate.",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| check_with::<TokenLoss>("TokenLoss", v, |c| c.validate()),
        },
    ]
}
