//! `policy::*`: token-level policy losses (verl's family), TRL's GRPO
//! family, the sequence-mean losses, rollout correction.

use crate::core_api::{
    check_with, op_def, take, take_f64, to_value, Call, CallError, CallResult, ConfigDef, CoreReal,
    OpDef,
};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::error::check_len;
use posttrain_core::policy::grpo::{
    gmpo_loss, grpo_loss, rloo_loss, trl_token_weight, vespo_gamma_weights, AdaptiveEntropy,
    ClipMetrics, EntropyBonus, GmpoConfig, GrpoConfig, GrpoInputs, GrpoLossType, RlooConfig,
    TokenOrRow, TrlNormalizer, VespoGamma,
};
use posttrain_core::policy::ppo::{
    clipped_policy_loss, ClippedPolicyLoss, RatioLevel, RolloutIsCorrection,
};
use posttrain_core::policy::token::{
    policy_loss, DivergenceConfig, PolicyBatch, PolicyLoss, PolicyLossMode, VerlPolicyParams,
};
use posttrain_core::policy::{ppo_clipped_surrogate, ClipConfig};
use posttrain_core::{Dims, Preset};

pub(crate) fn ops() -> Vec<OpDef> {
    vec![
        op_def! {
            path: "policy::token::policy_loss",
            doc: "The token-level policy loss of `loss` (PPO clipped surrogate with dual clip, \
                  DPPO, GSPO, SAPO, GPG, Clip-Cov, KL-Cov, GMPO, DRO, CISPO), per-token \
                  `ℓ_t` weighted by `is_weights`, aggregated by `agg` with the global \
                  normalizers `norm` (verl `compute_policy_loss_*` + `agg_loss`). \
                  Metrics: clipfrac, clipfrac_lower, approx_kl (verl's pg_clipfrac, \
                  pg_clipfrac_lower, ppo_kl). Gradient: ∂loss/∂log_prob.",
            params: [
                "loss": "PolicyLoss" => "the variant and its parameters, e.g. {\"Ppo\": ClipConfig}",
                "agg": "AggMode" => "token-mean | token-sum | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm",
                "norm": "Option<GlobalNorm>" => "global normalizers (default: GlobalNorm::default(), dp_size 1)",
            ],
            inputs: [
                "log_prob": Real => "[B, T] log π of the taken tokens",
                "old_log_prob": Real => "[B, T] log π_old",
                "advantages": Real => "[B, T] advantages A",
                "mask": Mask => "[B, T] valid tokens",
                "is_weights": Real opt => "[B, T] constant importance weights (verl rollout_is_weights)",
            ],
            outputs: [
                "loss" => "the aggregated loss (scalar)",
                "clipfrac" => "metric: share of valid tokens clipped",
                "clipfrac_lower" => "metric: share where the dual clip (or the variant's lower bound) is active",
                "approx_kl" => "metric: mean −log-ratio over valid tokens",
            ],
            vjp: ["loss" => ["log_prob"]],
            run: run_policy_loss,
        },
        op_def! {
            path: "policy::ppo_clipped_surrogate",
            doc: "The PPO clipped surrogate of each element (the kernel every token-level \
                  variant shares): x = clamp(log π − log π_old, ±log_ratio_clamp), x ≤ 80, \
                  r = eˣ, ℓ = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)), capped at −A·c \
                  where A < 0 with dual clip c (verl compute_policy_loss_vanilla per token, \
                  OpenRLHF PolicyLoss, TRL GRPO token level, torchtune PPOLoss). \
                  Gradient: cotangent ⊙ ∂ℓ/∂log π (0 where clipped, dual-clipped or clamped).",
            params: ["cfg": "ClipConfig" => "eps_low, eps_high, dual_clip, log_ratio_clamp"],
            inputs: [
                "log_prob": Real => "[...] log π",
                "old_log_prob": Real => "[...] log π_old (same shape)",
                "advantage": Real => "[...] advantages A (same shape)",
            ],
            outputs: [
                "loss" => "[...] the per-element loss ℓ",
                "ratio" => "[...] the ratio r (after the clamp)",
                "log_ratio" => "[...] the log-ratio x (after the clamp)",
                "clipped" => "[...] bool: the clipped branch is strictly larger",
                "dual_clipped" => "[...] bool: the dual clip is active",
            ],
            vjp: ["loss" => ["log_prob"]],
            run: run_ppo_clipped_surrogate,
        },
        op_def! {
            path: "policy::ppo::clipped_policy_loss",
            doc: "OpenRLHF's PPO / GSPO policy loss: token level ℓᵢⱼ = ρᵢⱼ·surrogate(log π − log π_old, A) \
                  with the rollout IS weight ρ (tis: clamp(ρ, low, high); icepop: ρ inside [low, high] \
                  else 0; seq-mask-tis: ρ in rows whose exp(mean log ρ) lies in [low, high]); \
                  sequence level ℓᵢⱼ = surrogate(mean_valid(log π − log π_base), A), \
                  aggregated token-mean or seq-mean-token-mean (dp_size ignored without an \
                  explicit global count) — OpenRLHF PolicyLoss.forward. Metrics: clip_ratio, \
                  approx_kl (OpenRLHF ppo_kl), rollout_kl (vllm_kl, token level with a \
                  correction only). Gradient: ∂loss/∂log_prob.",
            params: [
                "cfg": "ClippedPolicyLoss" => "clip, ratio (Token | Sequence), token_level_loss, correction (ops.core.config(\"ClippedPolicyLoss\", ...))",
                "norm": "Option<GlobalNorm>" => "global normalizers (default: GlobalNorm::default())",
            ],
            inputs: [
                "log_prob": Real => "[B, T] log π of the taken tokens",
                "old_log_prob": Real => "[B, T] log π_old",
                "advantages": Real => "[B, T] advantages A",
                "mask": Mask => "[B, T] valid tokens (OpenRLHF action_mask)",
                "rollout_log_prob": Real opt => "[B, T] the rollout engine's log-probs (required with a correction)",
            ],
            outputs: [
                "loss" => "the aggregated loss (scalar)",
                "clip_ratio" => "metric: share of valid tokens where the clipped branch is active",
                "approx_kl" => "metric: mean log π_old − log π over valid tokens (OpenRLHF ppo_kl)",
                "rollout_kl" => "metric (token level with a correction only): mean log π_rollout − log π_old (OpenRLHF vllm_kl)",
            ],
            vjp: ["loss" => ["log_prob"]],
            run: run_clipped_policy_loss,
        },
        op_def! {
            path: "policy::grpo::grpo_loss",
            doc: "TRL's GRPO-family loss (GRPOTrainer._compute_loss, every loss_type: grpo, bnpo, \
                  dr_grpo, dapo, luspo, cispo, sapo, vespo; importance_sampling_level token, \
                  sequence (GSPO) or sequence_token (TRL experimental gspo_token)): per-token loss \
                  ℓ_t·keep_i·entropy_mask_t·ρ_t + β·k3_t (bias-corrected KL optional), δ two-sided \
                  clip, off-policy sequence mask, high-entropy token mask, vLLM IS correction, \
                  normalised by the loss type's TRL normaliser / gas, minus the entropy bonus c·H \
                  (static or adaptive). Log-ratios clamped at ±cfg.log_ratio_clamp (TRL: none). \
                  Without old_log_probs the ratio is 1 (on-policy, gradient −A·w). Metrics: \
                  policy_loss, entropy, kl, clip.low_mean, clip.high_mean, clip.region_mean, \
                  clip.low_min, clip.high_max (TRL clip_ratio/*), cispo_clip_ratio, \
                  vespo_phi_seq_mean, entropy_coef, world_entropy. Gradient: ∂loss/∂log_probs and \
                  ∂loss/∂entropies (the entropy bonus; the entropy mask is a selection).",
            params: ["cfg": "GrpoConfig" => "the loss type, IS level, clip, δ, β, masks, normalizers, entropy bonus (ops.core.config(\"GrpoConfig\", preset=\"trl\", loss_type=...))"],
            inputs: [
                "log_probs": Real => "[B, T] log π of the trained policy (TRL per_token_logps)",
                "entropies": Real => "[B, T] per-token entropies",
                "mask": Mask => "[B, T] loss mask (TRL completion_mask · tool_mask)",
                "advantages": Real => "[B] one advantage per row",
                "old_log_probs": Real opt => "[B, T] log π_old (absent: on-policy)",
                "ref_log_probs": Real opt => "[B, T] log π_ref (required when β ≠ 0)",
                "importance_sampling_ratio": Real opt => "[B, T] or [B] (one per row) vLLM IS ratio (required with vllm_is_correction)",
                "sampling_log_probs": Real opt => "[B, T] the sampler's log-probs for the off-policy mask (absent: old_log_probs)",
            ],
            outputs: [
                "loss" => "the loss (scalar)",
                "policy_loss" => "metric: the policy loss before the accumulation divisor and the entropy bonus",
                "entropy" => "metric: masked mean entropy",
                "kl" => "metric: masked mean per-token KL (0 when β = 0)",
                "clip.low_mean" => "metric: TRL clip_ratio/low_mean",
                "clip.high_mean" => "metric: TRL clip_ratio/high_mean",
                "clip.region_mean" => "metric: TRL clip_ratio/region_mean",
                "clip.low_min" => "metric: TRL clip_ratio/low_min",
                "clip.high_max" => "metric: TRL clip_ratio/high_max",
                "cispo_clip_ratio" => "metric: CISPO share of coef_1 > ε_high with A > 0",
                "vespo_phi_seq_mean" => "metric: VESPO mean φ over rows",
                "entropy_coef" => "metric: the entropy coefficient after this step's adaptive update",
                "world_entropy" => "metric: the mean entropy the adaptive controller measured",
            ],
            vjp: ["loss" => ["log_probs", "entropies"]],
            run: run_grpo_loss,
        },
        op_def! {
            path: "policy::grpo::gmpo_loss",
            doc: "GMPO (TRL experimental GMPOTrainer._compute_loss): x_t = log π − log π_old, \
                  x̃_t = min(x_t, clamp(x_t, −ε_low, ε_high)) if A_i > 0 else the max, \
                  c_i = exp(Σ_{m'} x̃ / max(Σ m', 1)) (m' = mask · entropy mask), \
                  L = (1/B) Σ_i (−c_i·A_i + β·Σ_valid k3 / max(n_i, 1)) / gas. Metrics: entropy, \
                  kl, clip.* (TRL clip_ratio/*). Gradient: ∂loss/∂log_probs.",
            params: ["cfg": "GmpoConfig" => "eps_low, eps_high, beta, top_entropy_quantile, gradient_accumulation_steps, train, log_ratio_clamp (ops.core.config(\"GmpoConfig\", preset=\"trl\"))"],
            inputs: [
                "log_probs": Real => "[B, T] log π (TRL per_token_logps)",
                "entropies": Real => "[B, T] per-token entropies",
                "mask": Mask => "[B, T] loss mask (TRL completion_mask · tool_mask)",
                "advantages": Real => "[B] one advantage per row",
                "old_log_probs": Real opt => "[B, T] log π_old (absent: on-policy)",
                "ref_log_probs": Real opt => "[B, T] log π_ref (required when β ≠ 0)",
            ],
            outputs: [
                "loss" => "the loss (scalar)",
                "entropy" => "metric: masked mean entropy",
                "kl" => "metric: masked mean per-token k3 KL (0 when β = 0)",
                "clip.low_mean" => "metric: TRL clip_ratio/low_mean",
                "clip.high_mean" => "metric: TRL clip_ratio/high_mean",
                "clip.region_mean" => "metric: TRL clip_ratio/region_mean",
                "clip.low_min" => "metric: TRL clip_ratio/low_min",
                "clip.high_max" => "metric: TRL clip_ratio/high_max",
            ],
            vjp: ["loss" => ["log_probs"]],
            run: run_gmpo_loss,
        },
        op_def! {
            path: "policy::grpo::rloo_loss",
            doc: "RLOO's sequence-ratio clipped loss (TRL RLOOTrainer._compute_loss): \
                  x_i = Σ_valid log π_t − old_logps_i, r_i = e^{x_i}, \
                  L = (1/B) Σ_i max(−A_i·r_i, −A_i·clip(r_i, 1−ε_low, 1+ε_high)). Metrics: entropy, \
                  clip.* (means/min/max over rows, TRL clip_ratio/*). Gradient: ∂loss/∂log_probs.",
            params: ["cfg": "policy::grpo::RlooConfig" => "eps_low, eps_high, log_ratio_clamp (ops.core.config(\"policy::grpo::RlooConfig\", preset=\"trl\"))"],
            inputs: [
                "log_probs": Real => "[B, T] log π (TRL per_token_logps)",
                "entropies": Real => "[B, T] per-token entropies",
                "mask": Mask => "[B, T] completion mask",
                "advantages": Real => "[B] one advantage per row",
                "old_logps": Real => "[B] the old policy's summed log-prob of each row",
            ],
            outputs: [
                "loss" => "the loss (scalar)",
                "entropy" => "metric: masked mean entropy",
                "clip.low_mean" => "metric: TRL clip_ratio/low_mean",
                "clip.high_mean" => "metric: TRL clip_ratio/high_mean",
                "clip.region_mean" => "metric: TRL clip_ratio/region_mean",
                "clip.low_min" => "metric: TRL clip_ratio/low_min",
                "clip.high_max" => "metric: TRL clip_ratio/high_max",
            ],
            vjp: ["loss" => ["log_probs"]],
            run: run_rloo_loss,
        },
        op_def! {
            path: "policy::grpo::vespo_gamma_weights",
            doc: "VESPO's per-sequence gamma weight: S = Σ_valid clamp(x_t, ±20) + Σ_valid \
                  clamp(ln ρ_t, ln 1e−8, 20) (ρ: IS ratio, if given), ln w = clamp(S, ln 1e−8, 20), \
                  (k, λ) by the sign of A (λ ≥ 1e−4), φ = exp(λ + k·ln w − λ·w), non-finite → 0 \
                  (TRL GRPOTrainer.get_gamma_weights; TRL sums ln ρ over every position, posttrain \
                  over valid ones). No gradient (φ is detached).",
            params: ["gamma": "VespoGamma" => "k_pos, lambda_pos, k_neg, lambda_neg (default: TRL's 2, 3, 3, 2)"],
            inputs: [
                "advantages": Real => "[B] one advantage per row",
                "log_ratio": Real => "[B, T] per-token log π − log π_old",
                "mask": Mask => "[B, T] valid tokens",
                "importance_sampling_ratio": Real opt => "[B, T] or [B] (one per row) vLLM IS ratio",
            ],
            outputs: ["phi" => "[B] φ of each row"],
            vjp: [],
            run: run_vespo_gamma_weights,
        },
        op_def! {
            path: "policy::grpo::trl_token_weight",
            doc: "The weight ∂L/∂ℓ_t TRL's normalisation gives one counted position of a row with \
                  row_valid valid tokens in a batch with total_valid: grpo, sapo 1/(B·max(n_i, 1))/gas; \
                  bnpo 1/max(N, 1)/gas; dr_grpo 1/(B·max_completion_length)/gas; dapo, cispo, vespo \
                  num_processes/max(num_items_in_batch, 1); luspo n_i/(B·T)/gas (TRL 1.16: 1/B/gas) \
                  — TRL GRPOTrainer._compute_loss. No gradient.",
            params: [
                "loss_type": "GrpoLossType" => "Grpo | Bnpo | DrGrpo | Dapo | Luspo | Cispo | Sapo | Vespo",
                "norm": "TrlNormalizer" => "TRL's normalizers (ops.core.config(\"TrlNormalizer\"))",
                "dims": "Dims" => "{\"batch\": B, \"seq\": T}",
                "row_valid": "usize" => "valid tokens of the row",
                "total_valid": "usize" => "valid tokens of the batch",
            ],
            inputs: [],
            outputs: ["weight" => "the weight (scalar)"],
            vjp: [],
            run: run_trl_token_weight,
        },
    ]
}

fn run_policy_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let loss: PolicyLoss = c.param("loss")?;
    let agg: AggMode = c.param("agg")?;
    let norm: GlobalNorm = c.param_or("norm", GlobalNorm::default())?;
    let dims = c.dims_of("log_prob")?;
    let batch = PolicyBatch {
        dims,
        log_prob: c.real("log_prob")?.0,
        old_log_prob: c.real("old_log_prob")?.0,
        advantages: c.real("advantages")?.0,
        mask: c.mask("mask")?.0,
        is_weights: c.opt_real("is_weights")?.map(|x| x.0),
    };
    let mut scratch = vec![F::zero(); PolicyLoss::scratch_len(dims)];
    let cot = c.cot_scalar("loss")?;
    let mut grad = vec![F::zero(); if cot.is_some() { dims.len() } else { 0 }];
    let out = policy_loss(
        &loss,
        agg,
        &norm,
        &batch,
        &mut scratch,
        cot.map(|k| (k, &mut grad[..])),
    )?;
    c.scalar("loss", out.loss);
    c.metric("clipfrac", out.clipfrac.to_f64());
    c.metric("clipfrac_lower", out.clipfrac_lower.to_f64());
    c.metric("approx_kl", out.approx_kl.to_f64());
    if cot.is_some() {
        c.grad("log_prob", grad);
    }
    Ok(())
}

fn run_ppo_clipped_surrogate<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: ClipConfig = c.param("cfg")?;
    cfg.validate()?;
    let (lp, shape) = c.real("log_prob")?;
    let (old, _) = c.real("old_log_prob")?;
    let (adv, _) = c.real("advantage")?;
    let n = lp.len();
    check_len("old_log_prob", old.len(), n)?;
    check_len("advantage", adv.len(), n)?;
    let cot = c.cot("loss")?;
    if let Some(k) = cot {
        check_len("cotangent of loss", k.len(), n)?;
    }
    let (mut loss, mut ratio, mut log_ratio) =
        (vec![F::zero(); n], vec![F::zero(); n], vec![F::zero(); n]);
    let (mut clipped, mut dual) = (vec![false; n], vec![false; n]);
    let mut grad = vec![F::zero(); if cot.is_some() { n } else { 0 }];
    for i in 0..n {
        let t = ppo_clipped_surrogate(&cfg, lp[i], old[i], adv[i]);
        loss[i] = t.loss;
        ratio[i] = t.ratio;
        log_ratio[i] = t.log_ratio;
        clipped[i] = t.clipped;
        dual[i] = t.dual_clipped;
        if let Some(k) = cot {
            grad[i] = k[i] * t.grad;
        }
    }
    c.output("loss", loss, shape);
    c.output("ratio", ratio, shape);
    c.output("log_ratio", log_ratio, shape);
    c.output_mask("clipped", clipped, shape);
    c.output_mask("dual_clipped", dual, shape);
    if cot.is_some() {
        c.grad("log_prob", grad);
    }
    Ok(())
}

/// Re-runs `ClippedPolicyLoss::new` on a deserialized value (validation and
/// the sequence-level `token_level_loss = false` normalisation).
fn rebuild_clipped(c: &ClippedPolicyLoss) -> Result<ClippedPolicyLoss, posttrain_core::Error> {
    ClippedPolicyLoss::new(
        *c.clip(),
        c.ratio_level(),
        c.agg_mode() == AggMode::TokenMean,
        c.correction(),
    )
}

fn run_clipped_policy_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: ClippedPolicyLoss = c.param("cfg")?;
    let cfg = rebuild_clipped(&cfg)?;
    let norm: GlobalNorm = c.param_or("norm", GlobalNorm::default())?;
    let dims = c.dims_of("log_prob")?;
    let batch = PolicyBatch {
        dims,
        log_prob: c.real("log_prob")?.0,
        old_log_prob: c.real("old_log_prob")?.0,
        advantages: c.real("advantages")?.0,
        mask: c.mask("mask")?.0,
        is_weights: None,
    };
    let rollout = c.opt_real("rollout_log_prob")?.map(|x| x.0);
    let mut scratch = vec![F::zero(); ClippedPolicyLoss::scratch_len(dims)];
    let cot = c.cot_scalar("loss")?;
    let mut grad = vec![F::zero(); if cot.is_some() { dims.len() } else { 0 }];
    let out = clipped_policy_loss(
        &cfg,
        &norm,
        &batch,
        rollout,
        &mut scratch,
        cot.map(|k| (k, &mut grad[..])),
    )?;
    c.scalar("loss", out.loss);
    c.metric("clip_ratio", out.clip_ratio.to_f64());
    c.metric("approx_kl", out.approx_kl.to_f64());
    if let Some(v) = out.rollout_kl {
        c.metric("rollout_kl", v.to_f64());
    }
    if cot.is_some() {
        c.grad("log_prob", grad);
    }
    Ok(())
}

/// The optional vLLM IS ratio: one per token (`[B, T]`) or one per row (`[B]`, `[B, 1]`).
fn token_or_row<'a, F: CoreReal>(
    c: &Call<'a, F>,
    name: &str,
    dims: Dims,
) -> CallResult<Option<TokenOrRow<'a, F>>> {
    Ok(c.opt_real(name)?.map(|(v, _)| {
        if v.len() == dims.len() {
            TokenOrRow::Token(v)
        } else {
            TokenOrRow::Row(v)
        }
    }))
}

/// The `GrpoInputs` of `grpo_loss` / `gmpo_loss` / `rloo_loss`.
fn grpo_inputs<'a, F: CoreReal>(c: &Call<'a, F>) -> CallResult<GrpoInputs<'a, F>> {
    let dims = c.dims_of("log_probs")?;
    let mut x = GrpoInputs::new(
        dims,
        c.real("log_probs")?.0,
        c.real("entropies")?.0,
        c.mask("mask")?.0,
        c.real("advantages")?.0,
    );
    x.old_log_probs = c.opt_real("old_log_probs")?.map(|v| v.0);
    x.ref_log_probs = c.opt_real("ref_log_probs")?.map(|v| v.0);
    x.sampling_log_probs = c.opt_real("sampling_log_probs")?.map(|v| v.0);
    x.importance_sampling_ratio = token_or_row(c, "importance_sampling_ratio", dims)?;
    Ok(x)
}

fn clip_metrics<F: CoreReal>(c: &mut Call<'_, F>, m: &ClipMetrics<F>) {
    c.metric("clip.low_mean", m.low_mean.to_f64());
    c.metric("clip.high_mean", m.high_mean.to_f64());
    c.metric("clip.region_mean", m.region_mean.to_f64());
    c.metric("clip.low_min", m.low_min.to_f64());
    c.metric("clip.high_max", m.high_max.to_f64());
}

fn scaled<F: CoreReal>(g: Vec<F>, k: F) -> Vec<F> {
    g.into_iter().map(|v| v * k).collect()
}

fn run_grpo_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: GrpoConfig = c.param("cfg")?;
    let x = grpo_inputs(c)?;
    let n = x.dims.len();
    let cot = c.cot_scalar("loss")?;
    let m = if cot.is_some() { n } else { 0 };
    let (mut g_lp, mut g_ent) = (vec![F::zero(); m], vec![F::zero(); m]);
    let mut scratch = vec![F::zero(); n];
    let out = grpo_loss(
        &cfg,
        &x,
        cot.map(|_| &mut g_lp[..]),
        cot.map(|_| &mut g_ent[..]),
        &mut scratch,
    )?;
    c.scalar("loss", out.loss);
    c.metric("policy_loss", out.policy_loss.to_f64());
    c.metric("entropy", out.entropy.to_f64());
    c.metric("kl", out.kl.to_f64());
    clip_metrics(c, &out.clip);
    c.metric("cispo_clip_ratio", out.cispo_clip_ratio.to_f64());
    c.metric("vespo_phi_seq_mean", out.vespo_phi_seq_mean.to_f64());
    c.metric("entropy_coef", out.entropy_coef.to_f64());
    c.metric("world_entropy", out.world_entropy.to_f64());
    if let Some(k) = cot {
        c.grad("log_probs", scaled(g_lp, k));
        c.grad("entropies", scaled(g_ent, k));
    }
    Ok(())
}

fn run_gmpo_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: GmpoConfig = c.param("cfg")?;
    let x = grpo_inputs(c)?;
    let n = x.dims.len();
    let cot = c.cot_scalar("loss")?;
    let mut g = vec![F::zero(); if cot.is_some() { n } else { 0 }];
    let mut scratch = vec![F::zero(); n];
    let out = gmpo_loss(&cfg, &x, cot.map(|_| &mut g[..]), &mut scratch)?;
    c.scalar("loss", out.loss);
    c.metric("entropy", out.entropy.to_f64());
    c.metric("kl", out.kl.to_f64());
    clip_metrics(c, &out.clip);
    if let Some(k) = cot {
        c.grad("log_probs", scaled(g, k));
    }
    Ok(())
}

fn run_rloo_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: RlooConfig = c.param("cfg")?;
    let x = grpo_inputs(c)?;
    let (old, _) = c.real("old_logps")?;
    let cot = c.cot_scalar("loss")?;
    let mut g = vec![F::zero(); if cot.is_some() { x.dims.len() } else { 0 }];
    let out = rloo_loss(&cfg, &x, old, cot.map(|_| &mut g[..]))?;
    c.scalar("loss", out.loss);
    c.metric("entropy", out.entropy.to_f64());
    clip_metrics(c, &out.clip);
    if let Some(k) = cot {
        c.grad("log_probs", scaled(g, k));
    }
    Ok(())
}

fn run_vespo_gamma_weights<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let gamma: VespoGamma = c.param_or("gamma", VespoGamma::default())?;
    let dims = c.dims_of("log_ratio")?;
    let (adv, _) = c.real("advantages")?;
    let (lr, _) = c.real("log_ratio")?;
    let (mask, _) = c.mask("mask")?;
    let is = token_or_row(c, "importance_sampling_ratio", dims)?;
    let mut phi = vec![F::zero(); dims.batch];
    vespo_gamma_weights(&gamma, dims, adv, lr, mask, is, &mut phi)?;
    c.output("phi", phi, &[dims.batch]);
    Ok(())
}

fn run_trl_token_weight<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let loss_type: GrpoLossType = c.param("loss_type")?;
    let norm: TrlNormalizer = c.param("norm")?;
    check_trl_normalizer(&norm)?;
    let dims: Dims = c.param("dims")?;
    let row_valid: usize = c.param("row_valid")?;
    let total_valid: usize = c.param("total_valid")?;
    let w: F = trl_token_weight(loss_type, &norm, dims, row_valid, total_valid);
    c.scalar("weight", w);
    Ok(())
}

/// `TrlNormalizer`'s own `validate` is private: run it through `GrpoConfig::validate`.
fn check_trl_normalizer(n: &TrlNormalizer) -> Result<(), posttrain_core::Error> {
    let mut cfg = GrpoConfig::trl(GrpoLossType::Grpo);
    cfg.norm = *n;
    cfg.validate()
}

/// The GRPO-family configs are TRL's: only `preset="trl"` has a constructor.
fn trl_only(ty: &str, p: Preset) -> CallResult<()> {
    if p == Preset::Trl {
        Ok(())
    } else {
        Err(CallError::Msg(format!(
            "{ty}: its constructor is TRL's (`{ty}::trl`); use preset=\"trl\""
        )))
    }
}

/// `VerlPolicyParams` has no `validate`: `PolicyLoss::from_verl` checks the
/// fields each verl mode reads; every mode must accept them (`dro` only
/// when `dro_beta` is given).
fn check_verl_params(p: &VerlPolicyParams) -> Result<(), posttrain_core::Error> {
    for mode in PolicyLossMode::ALL {
        if mode == PolicyLossMode::Dro && p.dro_beta.is_none() {
            continue;
        }
        PolicyLoss::from_verl(mode, p)?;
    }
    Ok(())
}

pub(crate) fn configs() -> Vec<ConfigDef> {
    vec![
        ConfigDef {
            name: "ClipConfig",
            path: "policy::ClipConfig",
            doc: "The clipped surrogate's parameters: eps_low, eps_high, dual_clip, log_ratio_clamp.",
            preset_args: Some(&["eps_low", "eps_high"]),
            base: |preset, args| {
                Ok(match preset {
                    Some(p) => {
                        let lo = take_f64(args, "ClipConfig", "eps_low")?;
                        let hi = take_f64(args, "ClipConfig", "eps_high")?;
                        Some(to_value(&ClipConfig::preset(p, lo, hi))?)
                    }
                    None => None,
                })
            },
            check: |v| check_with::<ClipConfig>("ClipConfig", v, |c| c.validate()),
        },
        ConfigDef {
            name: "PolicyLoss",
            path: "policy::token::PolicyLoss",
            doc: "The token-level loss variant (an enum): {\"Ppo\": ClipConfig}, {\"SequenceRatio\": {...}}, …",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| check_with::<PolicyLoss>("PolicyLoss", v, |c| c.validate()),
        },
        ConfigDef {
            name: "GlobalNorm",
            path: "aggregate::GlobalNorm",
            doc: "Global loss normalizers: dp_size, batch_num_tokens, global_batch_size, loss_scale_factor.",
            preset_args: None,
            base: |_, _| Ok(Some(to_value(&GlobalNorm::default())?)),
            check: |v| check_with::<GlobalNorm>("GlobalNorm", v, |c| c.validate()),
        },
        ConfigDef {
            name: "ClippedPolicyLoss",
            path: "policy::ppo::ClippedPolicyLoss",
            doc: "OpenRLHF's PolicyLoss: clip (ClipConfig; OpenRLHF clamps the log-ratio at 20), ratio (Token | Sequence), \
                  token_level_loss (forced false at sequence level), correction (Option<RolloutIsCorrection>).",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| {
                let c: ClippedPolicyLoss = serde_json::from_value(v.clone())
                    .map_err(|e| CallError::Msg(format!("ClippedPolicyLoss: {e} (got {v})")))?;
                to_value(&rebuild_clipped(&c)?)
            },
        },
        ConfigDef {
            name: "RolloutIsCorrection",
            path: "policy::ppo::RolloutIsCorrection",
            doc: "A rollout IS correction: kind (Truncate | TokenMask | SequenceMask; OpenRLHF tis, icepop, seq-mask-tis), low, high.",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| {
                check_with::<RolloutIsCorrection>("RolloutIsCorrection", v, |c| {
                    ClippedPolicyLoss::new(
                        ClipConfig::preset(Preset::OpenRlhf, 0.2, 0.2),
                        RatioLevel::Token,
                        true,
                        Some(*c),
                    )
                    .map(|_| ())
                })
            },
        },
        ConfigDef {
            name: "GrpoConfig",
            path: "policy::grpo::GrpoConfig",
            doc: "TRL's GRPO-family options: loss_type, level, eps_low, eps_high, delta, beta, bias_correction_kl, \
                  top_entropy_quantile, vllm_is_correction, off_policy_mask_threshold, off_policy_nan_sampler_log_probs, \
                  sapo_temperature_pos/neg, vespo (VespoGamma), norm (TrlNormalizer), entropy_bonus (Option<EntropyBonus>), \
                  log_ratio_clamp. preset=\"trl\": GrpoConfig::trl(loss_type).",
            preset_args: Some(&["loss_type"]),
            base: |preset, args| {
                Ok(match preset {
                    Some(p) => {
                        trl_only("GrpoConfig", p)?;
                        let lt: GrpoLossType = take(args, "GrpoConfig", "loss_type")?;
                        Some(to_value(&GrpoConfig::trl(lt))?)
                    }
                    None => None,
                })
            },
            check: |v| check_with::<GrpoConfig>("GrpoConfig", v, |c| c.validate()),
        },
        ConfigDef {
            name: "GmpoConfig",
            path: "policy::grpo::GmpoConfig",
            doc: "TRL's GMPO options: eps_low, eps_high, beta, top_entropy_quantile, gradient_accumulation_steps, train, \
                  log_ratio_clamp. preset=\"trl\": GmpoConfig::trl().",
            preset_args: Some(&[]),
            base: |preset, _| {
                Ok(match preset {
                    Some(p) => {
                        trl_only("GmpoConfig", p)?;
                        Some(to_value(&GmpoConfig::trl())?)
                    }
                    None => None,
                })
            },
            check: |v| check_with::<GmpoConfig>("GmpoConfig", v, |c| c.validate()),
        },
        ConfigDef {
            name: "RlooConfig",
            path: "policy::grpo::RlooConfig",
            doc: "TRL's RLOO options: eps_low, eps_high, log_ratio_clamp. preset=\"trl\": RlooConfig::trl().",
            preset_args: Some(&[]),
            base: |preset, _| {
                Ok(match preset {
                    Some(p) => {
                        trl_only("RlooConfig", p)?;
                        Some(to_value(&RlooConfig::trl())?)
                    }
                    None => None,
                })
            },
            check: |v| check_with::<RlooConfig>("RlooConfig", v, |c| c.validate()),
        },
        ConfigDef {
            name: "VespoGamma",
            path: "policy::grpo::VespoGamma",
            doc: "VESPO's gamma-weight shape: k_pos, lambda_pos, k_neg, lambda_neg (default: TRL's 2, 3, 3, 2).",
            preset_args: None,
            base: |_, _| Ok(Some(to_value(&VespoGamma::default())?)),
            check: |v| check_with::<VespoGamma>("VespoGamma", v, |c| c.validate()),
        },
        ConfigDef {
            name: "TrlNormalizer",
            path: "policy::grpo::TrlNormalizer",
            doc: "TRL's loss normalizers: max_completion_length, num_items_in_batch, num_processes, \
                  gradient_accumulation_steps, train, steps_per_generation (Some: TRL 1.16's normalizers).",
            preset_args: None,
            base: |_, _| Ok(Some(to_value(&TrlNormalizer::default())?)),
            check: |v| check_with::<TrlNormalizer>("TrlNormalizer", v, check_trl_normalizer),
        },
        ConfigDef {
            name: "EntropyBonus",
            path: "policy::grpo::EntropyBonus",
            doc: "The entropy bonus −c·H: coef, adaptive (Option<AdaptiveEntropy>; TRL use_adaptive_entropy).",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| check_with::<EntropyBonus>("EntropyBonus", v, |c| c.validate()),
        },
        ConfigDef {
            name: "AdaptiveEntropy",
            path: "policy::grpo::AdaptiveEntropy",
            doc: "TRL's adaptive entropy controller: target, coef_min, coef_max, coef_delta, last_world_entropy.",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| {
                check_with::<AdaptiveEntropy>("AdaptiveEntropy", v, |a| {
                    EntropyBonus {
                        coef: 0.0,
                        adaptive: Some(*a),
                    }
                    .validate()
                })
            },
        },
        ConfigDef {
            name: "DivergenceConfig",
            path: "policy::token::DivergenceConfig",
            doc: "The DPPO trust region ({\"DivergenceTv\": ...} / {\"DivergenceKl\": ...} of PolicyLoss): eps_low, eps_high, truncation.",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| {
                check_with::<DivergenceConfig>("DivergenceConfig", v, |c| {
                    PolicyLoss::DivergenceTv(*c).validate()
                })
            },
        },
        ConfigDef {
            name: "VerlPolicyParams",
            path: "policy::token::VerlPolicyParams",
            doc: "verl's actor fields read by the policy losses (clip_ratio, clip_ratio_low/high, clip_ratio_c, tau_pos/neg, \
                  clip_cov_*, kl_cov_ratio, ppo_kl_coef, dro_beta, gspo_honor_loss_agg_mode); default: verl's ActorConfig. \
                  Checked as PolicyLoss::from_verl reads them for the modes they can serve.",
            preset_args: None,
            base: |_, _| Ok(Some(to_value(&VerlPolicyParams::default())?)),
            check: |v| check_with::<VerlPolicyParams>("VerlPolicyParams", v, check_verl_params),
        },
    ]
}
