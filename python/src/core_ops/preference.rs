//! `preference::*`: DPO and its paired family, the unpaired losses (KTO,
//! BCO, PRM), odds-ratio losses (ORPO, CPO, SimPO), reward-model losses.

use crate::core_api::{
    check_with, op_def, take_f64, to_value, Call, CallError, CallResult, ConfigDef, CoreReal, OpDef,
};
use posttrain_core::preference::odds_ratio::{
    cpo_loss, odds_ratio_loss, shifted_mean_nll, shifted_sequence_logps,
    shifted_sequence_logps_vjp, CpoConfig, OrpoCotangents,
};
use posttrain_core::preference::paired::{
    dpo_from_logits, dpo_from_logits_scratch_len, implicit_rewards, paired_loss,
    pairwise_reward_loss, LogitsPairBatch, LossTerm, PairBatch, PairGrads, PairedConfig, Reference,
    SftInput,
};
use posttrain_core::preference::unpaired::{
    bco_loss, kto_kl_baseline, kto_loss, prm_hard_loss, prm_soft_loss, vanilla_kto_loss, KtoConfig,
    PrmConfig, RunningMoments,
};

pub(crate) fn ops() -> Vec<OpDef> {
    vec![
        op_def! {
            path: "preference::paired::paired_loss",
            doc: "A paired preference loss over B pairs: ℓc = c − c₀, ℓr = r − r₀ (the implicit \
                  rewards' log-ratios, scored by cfg.divergence), loss_i = ω_i Σ_k w_k term_k(pair i), \
                  loss = mean_i loss_i, with `terms` any mix of DPO's family (sigmoid, hinge, IPO, \
                  robust, BCO, SPPO, NCA, AOT, APO, DiscoPOP, SimPO, …) as TRL DPOTrainer._compute_loss, \
                  OpenRLHF DPOLoss, torchtune; an `Sft` term adds −Σ_j sft_chosen_logps_j / sft_tokens \
                  to every pair (TRL's `sft` loss type). Metrics: rewards, accuracy, margin. \
                  Gradient: ∂/∂c, ∂/∂r (and ∂/∂sft_chosen_logps with an Sft term).",
            params: [
                "cfg": "PairedConfig" => "beta, label_smoothing, smooth_sigmoid, target_margin, divergence, discopop_tau, divergence_scores",
                "terms": "Vec<LossTerm>" => "the loss terms [{\"kind\": PairedLoss, \"weight\": f64}, …]",
                "sft_tokens": "f64" => "SftInput.tokens: the number of chosen tokens the SFT sums run over (required with sft_chosen_logps)",
            ],
            inputs: [
                "policy_chosen": Real => "[B] log π(chosen) (sequence sums)",
                "policy_rejected": Real => "[B] log π(rejected)",
                "reference_chosen": Real opt => "[B] log π_ref(chosen) (absent: reference-free)",
                "reference_rejected": Real opt => "[B] log π_ref(rejected)",
                "chosen_len": Real opt => "[B] chosen lengths (IPO, SimPO, length-normalised losses)",
                "rejected_len": Real opt => "[B] rejected lengths",
                "pair_weight": Real opt => "[B] per-pair weights ω",
                "sft_chosen_logps": Real opt => "[B] SftInput.chosen_logps: plain chosen sequence sums for an Sft term",
            ],
            outputs: [
                "loss" => "the mean loss (scalar)",
                "per_pair" => "[B] loss_i",
                "reward_chosen" => "metric: mean β·ℓc",
                "reward_rejected" => "metric: mean β·ℓr",
                "accuracy" => "metric: share of pairs with reward_chosen > reward_rejected",
                "margin" => "metric: mean reward margin",
                "logps_chosen" => "metric: mean c",
                "logps_rejected" => "metric: mean r",
            ],
            vjp: [
                "loss" => ["policy_chosen", "policy_rejected", "sft_chosen_logps"],
                "per_pair" => ["policy_chosen", "policy_rejected", "sft_chosen_logps"],
            ],
            run: run_paired_loss,
        },
        op_def! {
            path: "preference::paired::implicit_rewards",
            doc: "The implicit rewards of DPO-style losses: reward_i = β·(policy_i − reference_i) \
                  (reference absent: β·policy_i, SimPO). OpenRLHF DPOLoss and torchtune \
                  DPOLoss/IPOLoss/RSOLoss/SimPOLoss chosen_rewards/rejected_rewards; TRL logs their \
                  means. No gradient (every peer detaches them).",
            params: ["beta": "f64" => "β"],
            inputs: [
                "policy": Real => "[B] policy sequence log-probs",
                "reference": Real opt => "[B] reference sequence log-probs",
            ],
            outputs: ["rewards" => "[B] β·(policy − reference)"],
            vjp: [],
            run: run_implicit_rewards,
        },
        op_def! {
            path: "preference::paired::dpo_from_logits",
            doc: "TRL's DPO step from logits: rows [0, B) chosen, [B, 2B) rejected; log p_t = \
                  log softmax(z_{r,t})[id_{r,t+1}] where completion_mask[r, t+1]; seq_r = Σ_t log p_t \
                  (LD-DPO: tokens beyond the pair's shorter completion weighted ld_alpha); WPO weights \
                  ω_i = exp(mean_t(log p_t − (lse(2z) − 2 lse(z)))) (chosen × rejected) when use_weighting; \
                  then paired_loss with lengths = completion-mask row sums and the SFT term over the \
                  shifted chosen mask (TRL DPOTrainer._compute_loss). Gradient: ∂loss/∂logits \
                  (WPO weights, entropy and metrics carry none).",
            params: [
                "cfg": "PairedConfig" => "the paired-loss parameters",
                "terms": "Vec<LossTerm>" => "the loss terms",
                "ld_alpha": "Option<f64>" => "LD-DPO weight of tokens beyond the shorter completion (default None: plain sums)",
                "use_weighting": "bool" => "WPO pair weights (default false)",
            ],
            inputs: [
                "logits": Real => "[2B, T, V] policy logits (B chosen rows, then B rejected)",
                "input_ids": Index => "[2B, T] token ids",
                "completion_mask": Mask => "[2B, T] completion positions (unshifted)",
                "reference_chosen": Real opt => "[B] Reference::Precomputed chosen log-probs",
                "reference_rejected": Real opt => "[B] Reference::Precomputed rejected log-probs",
                "reference_logits": Real opt => "[2B, T, V] Reference::Logits (instead of the precomputed sums)",
            ],
            outputs: [
                "loss" => "the mean loss (scalar)",
                "reward_chosen" => "metric: mean β·ℓc (TRL rewards/chosen)",
                "reward_rejected" => "metric: mean β·ℓr (TRL rewards/rejected)",
                "accuracy" => "metric: TRL rewards/accuracies",
                "margin" => "metric: TRL rewards/margins",
                "logps_chosen" => "metric: TRL logps/chosen",
                "logps_rejected" => "metric: TRL logps/rejected",
                "entropy" => "metric: mean policy entropy over completion tokens (TRL entropy)",
                "logits_chosen" => "metric: TRL logits/chosen",
                "logits_rejected" => "metric: TRL logits/rejected",
                "token_accuracy" => "metric: TRL mean_token_accuracy",
            ],
            vjp: ["loss" => ["logits"]],
            run: run_dpo_from_logits,
        },
        op_def! {
            path: "preference::paired::pairwise_reward_loss",
            doc: "The Bradley–Terry pairwise loss of a reward model: loss = mean_i softplus(−(rc_i − rr_i − m_i)) \
                  + κ·mean_i (rc_i + rr_i)² (no margin: m = 0; centering None: no κ term). TRL \
                  RewardTrainer.compute_loss (center_rewards_coefficient = κ), OpenRLHF PairWiseLoss / \
                  LogExpLoss. Metrics: min/mean/max reward, accuracy, margin. Gradient: ∂loss/∂chosen, \
                  ∂loss/∂rejected (margins are constants).",
            params: ["centering": "Option<f64>" => "κ, the reward-centering coefficient (default None)"],
            inputs: [
                "chosen": Real => "[B] chosen rewards rc",
                "rejected": Real => "[B] rejected rewards rr",
                "margin": Real opt => "[B] per-pair margins m",
            ],
            outputs: [
                "loss" => "the loss (scalar)",
                "min_reward" => "metric: smallest reward over both sides",
                "mean_reward" => "metric: mean reward over both sides",
                "max_reward" => "metric: largest reward over both sides",
                "accuracy" => "metric: share of pairs with rc > rr",
                "margin" => "metric: mean(rc − rr)",
            ],
            vjp: ["loss" => ["chosen", "rejected"]],
            run: run_pairwise_reward,
        },
        op_def! {
            path: "preference::unpaired::kto_kl_baseline",
            doc: "KTO's reference point KL = max(mean_i(policy_kl_logps_i − ref_kl_logps_i), 0), 0 for \
                  an empty batch (TRL KTOTrainer `kl`, OpenRLHF KTOLoss `KL` with world_size 1). \
                  No gradient (the peers detach it).",
            params: [],
            inputs: [
                "policy_kl_logps": Real => "[N] policy log-probs of the mismatched (KL) completions",
                "ref_kl_logps": Real => "[N] reference log-probs of the same",
            ],
            outputs: ["kl" => "the clamped mean log-ratio (scalar)"],
            vjp: [],
            run: run_kto_kl,
        },
        op_def! {
            path: "preference::unpaired::kto_loss",
            doc: "The KTO-family batch loss: ℓ_i = w_d·(1 − σ(β(z_i − KL))) for desirable[i], \
                  w_u·(1 − σ(β(KL − z_i))) otherwise (kto; apo_zero_unpaired: w_d·(1 − σ(βz)), w_u·σ(βz)), \
                  loss = nanmean_i ℓ_i (0 when empty). TRL KTOTrainer._compute_loss, OpenRLHF KTOLoss. \
                  Gradient: ∂loss/∂logratios (KL is a detached constant).",
            params: [
                "cfg": "KtoConfig" => "loss_type (kto | apo_zero_unpaired), beta, desirable_weight, undesirable_weight",
                "kl": "f64" => "the detached reference point KL (kto_kl_baseline; default 0)",
            ],
            inputs: [
                "logratios": Real => "[N] z = log π − log π_ref per completion",
                "desirable": Mask => "[N] desirable (true) or undesirable",
            ],
            outputs: ["loss" => "the nanmean loss (scalar)"],
            vjp: ["loss" => ["logratios"]],
            run: run_kto_loss,
        },
        op_def! {
            path: "preference::unpaired::vanilla_kto_loss",
            doc: "KTO for even sampling with non-detached reference points: KL_d = max(mean c, 0), \
                  KL_u = max(mean r, 0), loss = mean over [1 − σ(β(c_i − KL_u))]_i ++ [1 − σ(β(KL_d − r_j))]_j \
                  (OpenRLHF VanillaKTOLoss). Gradient: ∂loss/∂chosen_logratios, ∂loss/∂rejected_logratios, \
                  through the reference points too.",
            params: ["beta": "f64" => "β > 0"],
            inputs: [
                "chosen_logratios": Real => "[Nc] chosen log-ratios c",
                "rejected_logratios": Real => "[Nr] rejected log-ratios r",
            ],
            outputs: ["loss" => "the mean loss (scalar)"],
            vjp: ["loss" => ["chosen_logratios", "rejected_logratios"]],
            run: run_vanilla_kto,
        },
        op_def! {
            path: "preference::unpaired::bco_loss",
            doc: "BCO's per-example losses with the running reward shift: chosen_rewards = β·c, \
                  rejected_rewards = β·r, δ = running mean after folding in [chosen_rewards, rejected_rewards] \
                  (do_train; else the current mean), losses = [−log σ(βc_i − δ)] ++ [−log σ(−(βr_j − δ))] \
                  (TRL BCOTrainer.bco_loss). The RunningMoments state is explicit: `running` in, \
                  running_mean/var/std/count out. Gradient: of losses and rewards into the log-ratios \
                  with δ detached (so with do_train it is not the derivative of the value).",
            params: [
                "beta": "f64" => "β > 0",
                "running": "RunningMoments<f64>" => "the running moments {mean, var, std, count} before this batch (default RunningMoments::default(): TRL's initial state)",
                "do_train": "bool" => "fold this batch into the moments (default true)",
            ],
            inputs: [
                "chosen_logratios": Real => "[Nc] chosen log-ratios c",
                "rejected_logratios": Real => "[Nr] rejected log-ratios r",
            ],
            outputs: [
                "losses" => "[Nc + Nr] per-example losses, chosen first",
                "chosen_rewards" => "[Nc] β·c",
                "rejected_rewards" => "[Nr] β·r",
                "delta" => "metric: the reward shift δ",
                "running_mean" => "metric: the updated RunningMoments.mean",
                "running_var" => "metric: the updated RunningMoments.var",
                "running_std" => "metric: the updated RunningMoments.std",
                "running_count" => "metric: the updated RunningMoments.count",
            ],
            vjp: [
                "losses" => ["chosen_logratios", "rejected_logratios"],
                "chosen_rewards" => ["chosen_logratios", "rejected_logratios"],
                "rejected_rewards" => ["chosen_logratios", "rejected_logratios"],
            ],
            run: run_bco_loss,
        },
        op_def! {
            path: "preference::unpaired::RunningMoments::update",
            doc: "Folds a batch x (n values, mean μ_x, biased variance v_x) into BCO's running moments: \
                  d = μ_x − mean, N = count + n, mean ← mean + d·n/N, var ← (var·count + d²·count·n/N + v_x·n)/N, \
                  std ← sqrt(var·N/(N − 1)), count ← N (TRL RunningMoments, single process). The state is \
                  explicit: `running` in, mean/var/std/count out. No gradient.",
            params: ["running": "RunningMoments<f64>" => "the state before (default RunningMoments::default())"],
            inputs: ["xs": Real => "[n] the batch"],
            outputs: [
                "mean" => "metric: the updated mean",
                "var" => "metric: the updated (biased) variance",
                "std" => "metric: the updated unbiased std",
                "count" => "metric: the updated count",
            ],
            vjp: [],
            run: run_running_update,
        },
        op_def! {
            path: "preference::unpaired::prm_hard_loss",
            doc: "Process-reward-model cross-entropy with class-id labels at the positions where \
                  inputs == placeholder_token_id: loss = −(1/N) Σ_{scored, label ≠ −100} log softmax(classes)[label] \
                  (classes: the logits at reward_token_ids, labels mapped to class indices in turn; None: \
                  the whole vocabulary), acc = share of scored positions whose argmax is the label \
                  (OpenRLHF PRMLoss, integer labels; empty means give 0, not NaN). Gradient: ∂loss/∂logits.",
            params: [
                "placeholder_token_id": "i64" => "PrmConfig.placeholder_token_id: the token that marks a scored step",
                "reward_token_ids": "Option<Vec<i64>>" => "PrmConfig.reward_token_ids: the class columns (default None: the whole vocabulary)",
            ],
            inputs: [
                "inputs": Index => "[B, T] token ids",
                "logits": Real => "[B, T, V] logits",
                "labels": Index => "[B, T] label token ids (−100: ignored by the loss)",
            ],
            outputs: [
                "loss" => "mean cross-entropy over the scored steps (scalar)",
                "acc" => "metric: share of scored steps predicted right",
            ],
            vjp: ["loss" => ["logits"]],
            run: run_prm_hard,
        },
        op_def! {
            path: "preference::unpaired::prm_soft_loss",
            doc: "Process-reward-model cross-entropy with soft labels p (probability of the first of two \
                  reward tokens): loss = −(1/N) Σ_scored (p·log softmax(z)₀ + (1 − p)·log softmax(z)₁), \
                  acc = share with argmax z = argmax (p, 1 − p) (OpenRLHF PRMLoss, float labels). \
                  Gradient: ∂loss/∂logits (labels are constants).",
            params: [
                "placeholder_token_id": "i64" => "PrmConfig.placeholder_token_id",
                "reward_token_ids": "Option<Vec<i64>>" => "PrmConfig.reward_token_ids: exactly two ids",
            ],
            inputs: [
                "inputs": Index => "[B, T] token ids",
                "logits": Real => "[B, T, V] logits",
                "labels": Real => "[B, T] soft labels p",
            ],
            outputs: [
                "loss" => "mean soft cross-entropy over the scored steps (scalar)",
                "acc" => "metric: share of scored steps predicted right",
            ],
            vjp: ["loss" => ["logits"]],
            run: run_prm_soft,
        },
        op_def! {
            path: "preference::odds_ratio::cpo_loss",
            doc: "Per-pair CPO losses from sequence log-probs: h = r(c) − r(r) with the AlphaPO reward \
                  r(ℓ) = ℓ (α = 0) or (1 − e^{−αℓ})/α; sigmoid −(1−ε) log σ(βh) − ε log σ(−βh), hinge \
                  relu(1 − βh), ipo (h − 1/(2β))², simpo sigmoid on h − γ/β; chosen/rejected_rewards = β·r(·) \
                  (detached). The caller passes sums or per-token means as loss_type needs. TRL \
                  CPOTrainer.cpo_loss. Gradient: of losses into chosen_logps, rejected_logps.",
            params: ["cfg": "CpoConfig" => "loss_type, beta, label_smoothing, simpo_gamma, alpha, cpo_alpha"],
            inputs: [
                "chosen_logps": Real => "[B] chosen sequence log-probs",
                "rejected_logps": Real => "[B] rejected sequence log-probs",
            ],
            outputs: [
                "losses" => "[B] per-pair losses",
                "chosen_rewards" => "[B] β·r(c) (detached)",
                "rejected_rewards" => "[B] β·r(r) (detached)",
            ],
            vjp: ["losses" => ["chosen_logps", "rejected_logps"]],
            run: run_cpo_loss,
        },
        op_def! {
            path: "preference::odds_ratio::odds_ratio_loss",
            doc: "ORPO's odds-ratio term: log_odds_i = (ℓc − ℓr) − (log(1 − e^{ℓc}) − log(1 − e^{ℓr})), \
                  losses_i = β·log σ(log_odds_i) (the batch loss subtracts its mean), rewards β·ℓ (detached), \
                  log_odds_ratio = mean log σ(log_odds), log_odds_chosen = mean log_odds (0 for an empty \
                  batch). ℓ are per-token mean log-probs (< 0). TRL ORPOTrainer.odds_ratio_loss. Gradient: \
                  of losses and both means into chosen_logps, rejected_logps.",
            params: ["beta": "f64" => "β > 0"],
            inputs: [
                "chosen_logps": Real => "[B] chosen per-token mean log-probs (< 0)",
                "rejected_logps": Real => "[B] rejected per-token mean log-probs (< 0)",
            ],
            outputs: [
                "losses" => "[B] β·log σ(log_odds)",
                "chosen_rewards" => "[B] β·ℓc (detached)",
                "rejected_rewards" => "[B] β·ℓr (detached)",
                "log_odds_ratio" => "mean log σ(log_odds) (scalar)",
                "log_odds_chosen" => "mean log_odds (scalar)",
            ],
            vjp: [
                "losses" => ["chosen_logps", "rejected_logps"],
                "log_odds_ratio" => ["chosen_logps", "rejected_logps"],
                "log_odds_chosen" => ["chosen_logps", "rejected_logps"],
            ],
            run: run_odds_ratio_loss,
        },
        op_def! {
            path: "preference::odds_ratio::shifted_sequence_logps",
            doc: "Sequence log-probs from causal-LM logits shifted by one: s_b = Σ_{t ≥ 1, valid[b,t]} \
                  log softmax(logits[b, t−1])[targets[b, t]], out_b = s_b or s_b / n_b (average; 0 when \
                  n_b = 0). TRL get_batch_logps (CPO/ORPO, valid = labels ≠ −100) and the completion-mask \
                  sums of DPO/KTO. Positions that do not count are never read. Gradient: \
                  ∂/∂logits[b, t−1, k] = cot_b·w_b·(1[k = target] − softmax_k) (shifted_sequence_logps_vjp).",
            params: ["average": "bool" => "per-token mean instead of the sum (default false)"],
            inputs: [
                "logits": Real => "[B, T, V] logits",
                "targets": Index => "[B, T] target token ids",
                "valid": Mask => "[B, T] counted positions",
            ],
            outputs: ["logps" => "[B] sequence log-probs"],
            vjp: ["logps" => ["logits"]],
            run: run_shifted_logps,
        },
        op_def! {
            path: "preference::odds_ratio::shifted_mean_nll",
            doc: "Mean token NLL of causal-LM logits shifted by one over all counted positions: \
                  nll = −(Σ_{b, t ≥ 1, valid[b,t]} log softmax(logits[b, t−1])[targets[b, t]]) / N, 0 when \
                  N = 0 (torch CrossEntropyLoss(ignore_index=−100) on shifted logits: TRL CPO/ORPO nll_loss). \
                  Gradient: ∂nll/∂logits.",
            params: [],
            inputs: [
                "logits": Real => "[B, T, V] logits",
                "targets": Index => "[B, T] target token ids",
                "valid": Mask => "[B, T] counted positions",
            ],
            outputs: ["nll" => "the mean NLL (scalar)"],
            vjp: ["nll" => ["logits"]],
            run: run_shifted_nll,
        },
    ]
}

fn msg(op: &str, m: impl core::fmt::Display) -> CallError {
    CallError::Msg(format!("{op}: {m}"))
}

/// The vocabulary size: the last dimension of a `[..., V]` logits input.
fn vocab_of<F: CoreReal>(c: &Call<'_, F>, op: &str, name: &str) -> CallResult<usize> {
    let (_, shape) = c.real(name)?;
    match shape {
        [.., v] if shape.len() >= 2 => Ok(*v),
        other => Err(msg(
            op,
            format_args!("input `{name}` must be [..., vocab], got shape {other:?}"),
        )),
    }
}

fn run_paired_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: PairedConfig = c.param("cfg")?;
    let terms: Vec<LossTerm> = c.param("terms")?;
    let (chosen, shape) = c.real("policy_chosen")?;
    let mut batch = PairBatch::new(chosen, c.real("policy_rejected")?.0);
    batch.reference_chosen = c.opt_real("reference_chosen")?.map(|x| x.0);
    batch.reference_rejected = c.opt_real("reference_rejected")?.map(|x| x.0);
    batch.chosen_len = c.opt_real("chosen_len")?.map(|x| x.0);
    batch.rejected_len = c.opt_real("rejected_len")?.map(|x| x.0);
    batch.pair_weight = c.opt_real("pair_weight")?.map(|x| x.0);
    let sft = c.opt_real("sft_chosen_logps")?.map(|x| x.0);
    let sft_tokens: Option<f64> = c.opt_param("sft_tokens")?;
    match (sft, sft_tokens) {
        (Some(chosen_logps), Some(t)) => {
            batch.sft = Some(SftInput {
                chosen_logps,
                tokens: F::of(t),
            })
        }
        (None, None) => {}
        _ => {
            return Err(msg(
                "preference::paired::paired_loss",
                "give `sft_chosen_logps` and `sft_tokens` together",
            ))
        }
    }
    let n = chosen.len();
    let mut per_pair = vec![F::zero(); n];
    let mut order = vec![0usize; 2 * n];
    let cot_loss = c.cot_scalar("loss")?;
    let cot_pp = c.cot("per_pair")?;
    let want = cot_loss.is_some() || cot_pp.is_some();
    let (mut gc, mut gr) = (vec![F::zero(); n], vec![F::zero(); n]);
    let grads = want.then(|| PairGrads {
        cotangent_loss: cot_loss.unwrap_or(F::zero()),
        cotangent_per_pair: cot_pp,
        chosen: &mut gc[..],
        rejected: &mut gr[..],
    });
    let out = paired_loss(&cfg, &terms, &batch, Some(&mut per_pair), grads, &mut order)?;
    c.scalar("loss", out.loss);
    c.output("per_pair", per_pair, shape);
    let m = out.metrics;
    c.metric("reward_chosen", m.reward_chosen.to_f64());
    c.metric("reward_rejected", m.reward_rejected.to_f64());
    c.metric("accuracy", m.accuracy.to_f64());
    c.metric("margin", m.margin.to_f64());
    c.metric("logps_chosen", m.logps_chosen.to_f64());
    c.metric("logps_rejected", m.logps_rejected.to_f64());
    if want {
        c.grad("policy_chosen", gc);
        c.grad("policy_rejected", gr);
        if let Some(s) = sft {
            c.grad("sft_chosen_logps", vec![out.d_sft_chosen_logps; s.len()]);
        }
    }
    Ok(())
}

fn run_implicit_rewards<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let beta: f64 = c.param("beta")?;
    let (policy, shape) = c.real("policy")?;
    let reference = c.opt_real("reference")?.map(|x| x.0);
    let mut out = vec![F::zero(); policy.len()];
    implicit_rewards(beta, policy, reference, &mut out)?;
    c.output("rewards", out, shape);
    Ok(())
}

fn run_dpo_from_logits<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    const OP: &str = "preference::paired::dpo_from_logits";
    let cfg: PairedConfig = c.param("cfg")?;
    let terms: Vec<LossTerm> = c.param("terms")?;
    let ld_alpha: Option<f64> = c.opt_param("ld_alpha")?;
    let use_weighting: bool = c.param_or("use_weighting", false)?;
    let dims = c.dims_of("input_ids")?;
    let vocab = vocab_of(c, OP, "logits")?;
    let (logits, _) = c.real("logits")?;
    let reference = match (
        c.opt_real("reference_chosen")?,
        c.opt_real("reference_rejected")?,
        c.opt_real("reference_logits")?,
    ) {
        (Some((rc, _)), Some((rr, _)), None) => Reference::Precomputed {
            chosen: rc,
            rejected: rr,
        },
        (None, None, Some((z, _))) => Reference::Logits(z),
        _ => {
            return Err(msg(
                OP,
                "give `reference_chosen` and `reference_rejected`, or `reference_logits`",
            ))
        }
    };
    let batch = LogitsPairBatch {
        dims,
        vocab,
        logits,
        input_ids: c.index("input_ids")?.0,
        completion_mask: c.mask("completion_mask")?.0,
        reference,
        ld_alpha,
        use_weighting,
    };
    let mut scratch = vec![F::zero(); dpo_from_logits_scratch_len(dims)];
    let mut order = vec![0usize; dims.batch];
    let cot = c.cot_scalar("loss")?;
    let mut grad = vec![F::zero(); if cot.is_some() { logits.len() } else { 0 }];
    let (out, tm) = dpo_from_logits(
        &cfg,
        &terms,
        &batch,
        cot.map(|k| (k, &mut grad[..])),
        &mut scratch,
        &mut order,
    )?;
    c.scalar("loss", out.loss);
    let m = out.metrics;
    c.metric("reward_chosen", m.reward_chosen.to_f64());
    c.metric("reward_rejected", m.reward_rejected.to_f64());
    c.metric("accuracy", m.accuracy.to_f64());
    c.metric("margin", m.margin.to_f64());
    c.metric("logps_chosen", m.logps_chosen.to_f64());
    c.metric("logps_rejected", m.logps_rejected.to_f64());
    c.metric("entropy", tm.entropy.to_f64());
    c.metric("logits_chosen", tm.logits_chosen.to_f64());
    c.metric("logits_rejected", tm.logits_rejected.to_f64());
    c.metric("token_accuracy", tm.token_accuracy.to_f64());
    if cot.is_some() {
        c.grad("logits", grad);
    }
    Ok(())
}

fn run_pairwise_reward<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let centering: Option<f64> = c.opt_param("centering")?;
    let (chosen, _) = c.real("chosen")?;
    let (rejected, _) = c.real("rejected")?;
    let margin = c.opt_real("margin")?.map(|x| x.0);
    let cot = c.cot_scalar("loss")?;
    let (mut dc, mut dr) = if cot.is_some() {
        (vec![F::zero(); chosen.len()], vec![F::zero(); chosen.len()])
    } else {
        (Vec::new(), Vec::new())
    };
    let out = pairwise_reward_loss(
        chosen,
        rejected,
        margin,
        centering,
        cot.map(|k| (k, &mut dc[..], &mut dr[..])),
    )?;
    c.scalar("loss", out.loss);
    c.metric("min_reward", out.min_reward.to_f64());
    c.metric("mean_reward", out.mean_reward.to_f64());
    c.metric("max_reward", out.max_reward.to_f64());
    c.metric("accuracy", out.accuracy.to_f64());
    c.metric("margin", out.margin.to_f64());
    if cot.is_some() {
        c.grad("chosen", dc);
        c.grad("rejected", dr);
    }
    Ok(())
}

fn run_kto_kl<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let kl = kto_kl_baseline(c.real("policy_kl_logps")?.0, c.real("ref_kl_logps")?.0)?;
    c.scalar("kl", kl);
    Ok(())
}

fn run_kto_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: KtoConfig = c.param("cfg")?;
    // A hand-written config is validated as KtoConfig::new does.
    KtoConfig::new(
        cfg.loss_type,
        cfg.beta,
        cfg.desirable_weight,
        cfg.undesirable_weight,
    )?;
    let kl: f64 = c.param_or("kl", 0.0)?;
    let (lr, _) = c.real("logratios")?;
    let (desirable, _) = c.mask("desirable")?;
    let cot = c.cot_scalar("loss")?;
    let mut g = vec![F::zero(); if cot.is_some() { lr.len() } else { 0 }];
    let loss = kto_loss(
        &cfg,
        lr,
        desirable,
        F::of(kl),
        cot.is_some().then_some(&mut g[..]),
    )?;
    c.scalar("loss", loss);
    if let Some(k) = cot {
        g.iter_mut().for_each(|x| *x *= k);
        c.grad("logratios", g);
    }
    Ok(())
}

fn run_vanilla_kto<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let beta: f64 = c.param("beta")?;
    let (ch, _) = c.real("chosen_logratios")?;
    let (rj, _) = c.real("rejected_logratios")?;
    let cot = c.cot_scalar("loss")?;
    let (mut dc, mut dr) = if cot.is_some() {
        (vec![F::zero(); ch.len()], vec![F::zero(); rj.len()])
    } else {
        (Vec::new(), Vec::new())
    };
    let loss = vanilla_kto_loss(
        beta,
        ch,
        rj,
        cot.is_some().then_some((&mut dc[..], &mut dr[..])),
    )?;
    c.scalar("loss", loss);
    if let Some(k) = cot {
        dc.iter_mut().chain(dr.iter_mut()).for_each(|x| *x *= k);
        c.grad("chosen_logratios", dc);
        c.grad("rejected_logratios", dr);
    }
    Ok(())
}

fn running_state<F: CoreReal>(c: &Call<'_, F>) -> CallResult<RunningMoments<F>> {
    let r: RunningMoments<f64> = c.param_or("running", RunningMoments::default())?;
    Ok(RunningMoments {
        mean: F::of(r.mean),
        var: F::of(r.var),
        std: F::of(r.std),
        count: F::of(r.count),
    })
}

fn run_bco_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let beta: f64 = c.param("beta")?;
    let do_train: bool = c.param_or("do_train", true)?;
    let mut running = running_state(c)?;
    let (ch, ch_shape) = c.real("chosen_logratios")?;
    let (rj, rj_shape) = c.real("rejected_logratios")?;
    let (nc, nr) = (ch.len(), rj.len());
    let (mut losses, mut cr, mut rr) = (
        vec![F::zero(); nc + nr],
        vec![F::zero(); nc],
        vec![F::zero(); nr],
    );
    let cot_l = c.cot("losses")?;
    let cot_c = c.cot("chosen_rewards")?;
    let cot_r = c.cot("rejected_rewards")?;
    let want = cot_l.is_some() || cot_c.is_some() || cot_r.is_some();
    let (zl, zc, zr) = if want {
        (
            vec![F::zero(); nc + nr],
            vec![F::zero(); nc],
            vec![F::zero(); nr],
        )
    } else {
        (Vec::new(), Vec::new(), Vec::new())
    };
    let (mut dc, mut dr) = if want {
        (vec![F::zero(); nc], vec![F::zero(); nr])
    } else {
        (Vec::new(), Vec::new())
    };
    let vjp = want.then(|| {
        (
            (
                cot_l.unwrap_or(&zl[..]),
                cot_c.unwrap_or(&zc[..]),
                cot_r.unwrap_or(&zr[..]),
            ),
            &mut dc[..],
            &mut dr[..],
        )
    });
    let delta = bco_loss(
        beta,
        ch,
        rj,
        &mut running,
        do_train,
        &mut losses,
        &mut cr,
        &mut rr,
        vjp,
    )?;
    c.output("losses", losses, &[nc + nr]);
    c.output("chosen_rewards", cr, ch_shape);
    c.output("rejected_rewards", rr, rj_shape);
    c.metric("delta", delta.to_f64());
    c.metric("running_mean", running.mean.to_f64());
    c.metric("running_var", running.var.to_f64());
    c.metric("running_std", running.std.to_f64());
    c.metric("running_count", running.count.to_f64());
    if want {
        c.grad("chosen_logratios", dc);
        c.grad("rejected_logratios", dr);
    }
    Ok(())
}

fn run_running_update<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let mut running = running_state(c)?;
    running.update(c.real("xs")?.0);
    c.metric("mean", running.mean.to_f64());
    c.metric("var", running.var.to_f64());
    c.metric("std", running.std.to_f64());
    c.metric("count", running.count.to_f64());
    Ok(())
}

fn run_prm<F: CoreReal>(c: &mut Call<'_, F>, soft: bool) -> CallResult<()> {
    let op = if soft {
        "preference::unpaired::prm_soft_loss"
    } else {
        "preference::unpaired::prm_hard_loss"
    };
    let ids: Option<Vec<i64>> = c.opt_param("reward_token_ids")?;
    let cfg = PrmConfig {
        placeholder_token_id: c.param("placeholder_token_id")?,
        reward_token_ids: ids.as_deref(),
    };
    let vocab = vocab_of(c, op, "logits")?;
    let (inputs, _) = c.index("inputs")?;
    let (logits, _) = c.real("logits")?;
    let cot = c.cot_scalar("loss")?;
    let mut g = vec![F::zero(); if cot.is_some() { logits.len() } else { 0 }];
    let grad = cot.is_some().then_some(&mut g[..]);
    let out = if soft {
        prm_soft_loss(&cfg, inputs, logits, vocab, c.real("labels")?.0, grad)?
    } else {
        prm_hard_loss(&cfg, inputs, logits, vocab, c.index("labels")?.0, grad)?
    };
    c.scalar("loss", out.loss);
    c.metric("acc", out.acc.to_f64());
    if let Some(k) = cot {
        g.iter_mut().for_each(|x| *x *= k);
        c.grad("logits", g);
    }
    Ok(())
}

fn run_prm_hard<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    run_prm(c, false)
}

fn run_prm_soft<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    run_prm(c, true)
}

fn run_cpo_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: CpoConfig = c.param("cfg")?;
    // A hand-written config is validated as CpoConfig::new does.
    CpoConfig::new(
        cfg.loss_type,
        cfg.beta,
        cfg.label_smoothing,
        cfg.simpo_gamma,
        cfg.alpha,
        cfg.cpo_alpha,
    )?;
    let (ch, shape) = c.real("chosen_logps")?;
    let (rj, _) = c.real("rejected_logps")?;
    let n = ch.len();
    let (mut l, mut cr, mut rr) = (vec![F::zero(); n], vec![F::zero(); n], vec![F::zero(); n]);
    let cot = c.cot("losses")?;
    let (mut dc, mut dr) = (vec![F::zero(); n], vec![F::zero(); n]);
    cpo_loss(
        &cfg,
        ch,
        rj,
        &mut l,
        &mut cr,
        &mut rr,
        cot.map(|k| (k, &mut dc[..], &mut dr[..])),
    )?;
    c.output("losses", l, shape);
    c.output("chosen_rewards", cr, shape);
    c.output("rejected_rewards", rr, shape);
    if cot.is_some() {
        c.grad("chosen_logps", dc);
        c.grad("rejected_logps", dr);
    }
    Ok(())
}

fn run_odds_ratio_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let beta: f64 = c.param("beta")?;
    let (ch, shape) = c.real("chosen_logps")?;
    let (rj, _) = c.real("rejected_logps")?;
    let n = ch.len();
    let (mut l, mut cr, mut rr) = (vec![F::zero(); n], vec![F::zero(); n], vec![F::zero(); n]);
    let cot_l = c.cot("losses")?;
    let cot_ratio = c.cot_scalar("log_odds_ratio")?;
    let cot_chosen = c.cot_scalar("log_odds_chosen")?;
    let want = cot_l.is_some() || cot_ratio.is_some() || cot_chosen.is_some();
    let zeros = vec![F::zero(); if want && cot_l.is_none() { n } else { 0 }];
    let (mut dc, mut dr) = (vec![F::zero(); n], vec![F::zero(); n]);
    let vjp = want.then(|| {
        (
            OrpoCotangents {
                losses: cot_l.unwrap_or(&zeros[..]),
                log_odds_ratio: cot_ratio.unwrap_or(F::zero()),
                log_odds_chosen: cot_chosen.unwrap_or(F::zero()),
            },
            &mut dc[..],
            &mut dr[..],
        )
    });
    let m = odds_ratio_loss(beta, ch, rj, &mut l, &mut cr, &mut rr, vjp)?;
    c.output("losses", l, shape);
    c.output("chosen_rewards", cr, shape);
    c.output("rejected_rewards", rr, shape);
    c.scalar("log_odds_ratio", m.log_odds_ratio);
    c.scalar("log_odds_chosen", m.log_odds_chosen);
    if want {
        c.grad("chosen_logps", dc);
        c.grad("rejected_logps", dr);
    }
    Ok(())
}

fn run_shifted_logps<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    const OP: &str = "preference::odds_ratio::shifted_sequence_logps";
    let average: bool = c.param_or("average", false)?;
    let dims = c.dims_of("targets")?;
    let vocab = vocab_of(c, OP, "logits")?;
    let (logits, _) = c.real("logits")?;
    let (targets, _) = c.index("targets")?;
    let (valid, _) = c.mask("valid")?;
    let mut out = vec![F::zero(); dims.batch];
    shifted_sequence_logps(logits, dims, vocab, targets, valid, average, &mut out)?;
    c.output("logps", out, &[dims.batch]);
    if let Some(cot) = c.cot("logps")? {
        let mut g = vec![F::zero(); logits.len()];
        let mut scratch = vec![F::zero(); vocab];
        shifted_sequence_logps_vjp(
            logits,
            dims,
            vocab,
            targets,
            valid,
            average,
            cot,
            &mut g,
            &mut scratch,
        )?;
        c.grad("logits", g);
    }
    Ok(())
}

fn run_shifted_nll<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    const OP: &str = "preference::odds_ratio::shifted_mean_nll";
    let dims = c.dims_of("targets")?;
    let vocab = vocab_of(c, OP, "logits")?;
    let (logits, _) = c.real("logits")?;
    let (targets, _) = c.index("targets")?;
    let (valid, _) = c.mask("valid")?;
    let cot = c.cot_scalar("nll")?;
    let mut g = vec![F::zero(); if cot.is_some() { logits.len() } else { 0 }];
    let mut scratch = vec![F::zero(); if cot.is_some() { vocab } else { 0 }];
    let nll = shifted_mean_nll(
        logits,
        dims,
        vocab,
        targets,
        valid,
        cot.map(|k| (k, &mut g[..], &mut scratch[..])),
    )?;
    c.scalar("nll", nll);
    if cot.is_some() {
        c.grad("logits", g);
    }
    Ok(())
}

pub(crate) fn configs() -> Vec<ConfigDef> {
    vec![
        ConfigDef {
            name: "PairedConfig",
            path: "preference::paired::PairedConfig",
            doc: "Paired-loss parameters: beta, label_smoothing, smooth_sigmoid, target_margin, divergence, discopop_tau, divergence_scores.",
            preset_args: Some(&["beta"]),
            base: |preset, args| {
                Ok(match preset {
                    Some(p) => {
                        let beta = take_f64(args, "PairedConfig", "beta")?;
                        Some(to_value(&PairedConfig::preset(p, beta)?)?)
                    }
                    None => None,
                })
            },
            check: |v| check_with::<PairedConfig>("PairedConfig", v, |c| c.validate()),
        },
        ConfigDef {
            name: "LossTerm",
            path: "preference::paired::LossTerm",
            doc: "One weighted term of a paired loss: kind (PairedLoss), weight (default 1).",
            preset_args: None,
            base: |_, args| {
                if !args.contains_key("weight") {
                    args.insert("weight".into(), 1.0.into());
                }
                Ok(None)
            },
            check: |v| check_with::<LossTerm>("LossTerm", v, |_| Ok(())),
        },
        ConfigDef {
            name: "KtoConfig",
            path: "preference::unpaired::KtoConfig",
            doc: "KTO-family parameters: loss_type (kto | apo_zero_unpaired), beta, desirable_weight, undesirable_weight (validated by KtoConfig::new).",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| {
                check_with::<KtoConfig>("KtoConfig", v, |c| {
                    KtoConfig::new(c.loss_type, c.beta, c.desirable_weight, c.undesirable_weight)
                        .map(|_| ())
                })
            },
        },
        ConfigDef {
            name: "CpoConfig",
            path: "preference::odds_ratio::CpoConfig",
            doc: "CPO parameters: loss_type (sigmoid | hinge | ipo | simpo), beta, label_smoothing, simpo_gamma, alpha (AlphaPO), cpo_alpha (NLL weight). Every preset gives TRL CPOConfig's defaults.",
            preset_args: Some(&[]),
            base: |preset, _| {
                Ok(match preset {
                    Some(p) => Some(to_value(&CpoConfig::preset(p))?),
                    None => None,
                })
            },
            check: |v| {
                check_with::<CpoConfig>("CpoConfig", v, |c| {
                    CpoConfig::new(
                        c.loss_type,
                        c.beta,
                        c.label_smoothing,
                        c.simpo_gamma,
                        c.alpha,
                        c.cpo_alpha,
                    )
                    .map(|_| ())
                })
            },
        },
        ConfigDef {
            name: "RunningMoments",
            path: "preference::unpaired::RunningMoments",
            doc: "BCO's running reward moments (explicit state): mean, var, std, count; default TRL's initial state (0, 1, 1, 1e-24).",
            preset_args: None,
            base: |_, _| Ok(Some(to_value(&RunningMoments::<f64>::default())?)),
            check: |v| check_with::<RunningMoments<f64>>("RunningMoments", v, |_| Ok(())),
        },
    ]
}
