//! `kl::*`, `value::*`, `aggregate::*`, `stats::*`: the KL estimators and
//! KL-shaped rewards, value losses, loss aggregation, masked statistics.

use crate::core_api::{
    check_with, op_def, take, to_value, Call, CallResult, ConfigDef, CoreReal, OpDef,
};
use posttrain_core::aggregate::{self, AggMode, GlobalNorm};
use posttrain_core::error::check_len;
use posttrain_core::kl::{
    kl_penalized_rewards, rewards_with_score_at_eos, KlConfig, KlController, KlEstimator,
    ScorePosition,
};
use posttrain_core::stats::{self, Bessel, MomentConfig, Reduce, WhitenConfig};
use posttrain_core::value::{
    policy_value_loss, value_loss, PolicyValueConfig, PolicyValueGrads, ValueLossConfig,
};
use posttrain_core::{Dims, Error};

pub(crate) fn ops() -> Vec<OpDef> {
    let mut v = kl_ops();
    v.extend(value_ops());
    v.extend(aggregate_ops());
    v.extend(stats_ops());
    v
}

// ---------------------------------------------------------------------------
// kl
// ---------------------------------------------------------------------------

fn kl_ops() -> Vec<OpDef> {
    vec![
        op_def! {
            path: "kl::KlConfig::estimate_slices",
            doc: "Per-token KL estimate of π against π_ref by `cfg.estimator` with x = log π − log π_ref \
                  (clamped to ±log_ratio_clamp): k1 = x, abs = |x|, k2 = x²/2, k3 = e^{−x} − 1 + x \
                  (clamped to ±value_clamp), optionally straight-through (value of the estimator, \
                  gradient of k2) — verl kl_penalty, TRL/OpenRLHF compute_approx_kl. Gradient: \
                  cotangent ⊙ ∂estimate/∂log_prob.",
            params: ["cfg": "KlConfig" => "estimator (K1 | Abs | K2 | K3), straight_through, log_ratio_clamp, value_clamp"],
            inputs: [
                "log_prob": Real => "[...] log π",
                "ref_log_prob": Real => "[...] log π_ref (same shape)",
            ],
            outputs: ["kl" => "[...] the estimate per element"],
            vjp: ["kl" => ["log_prob"]],
            run: run_kl_estimate,
        },
        op_def! {
            path: "kl::kl_penalized_rewards",
            doc: "KL-in-reward: r̃ᵢⱼ = scoresᵢⱼ − β·kᵢⱼ with kᵢⱼ = cfg.estimate(old_log_prob, ref_log_prob) \
                  on valid tokens and 0 on masked ones (masked positions keep their score whatever the \
                  log-probs hold); mean_kl = (1/B) Σᵢ Σⱼ kᵢⱼ / (nᵢ + 1e-8). verl apply_kl_penalty \
                  (β = the controller's value before its update; feed mean_kl to \
                  kl::KlController::update afterwards) and, with no mask, verl compute_rewards \
                  (β = kl_ratio, K1). No gradient (rewards are constants to the loss).",
            params: [
                "cfg": "KlConfig" => "the estimator (verl: KlConfig preset verl)",
                "beta": "f64" => "the KL coefficient β (finite)",
            ],
            inputs: [
                "scores": Real => "[B, T] token-level scores",
                "old_log_prob": Real => "[B, T] log π_old",
                "ref_log_prob": Real => "[B, T] log π_ref",
                "mask": Mask opt => "[B, T] valid tokens (absent: every token valid)",
            ],
            outputs: [
                "rewards" => "[B, T] r̃ = scores − β·KL̂",
                "mean_kl" => "metric: mean over rows of each row's masked-mean KL (verl actor/reward_kl_penalty)",
            ],
            vjp: [],
            run: run_kl_penalized_rewards,
        },
        op_def! {
            path: "kl::rewards_with_score_at_eos",
            doc: "Token rewards with the sequence score at its EOS position and a per-token KL penalty: \
                  rᵢⱼ = −β·klᵢⱼ + 1[j = eosᵢ]·scoreᵢ. The `position: ScorePosition` argument is given \
                  by which input is present: `action_mask` → LastValid (the last valid position; a \
                  row with none uses the last column, OpenRLHF compute_reward), `valid_score_idxs` → \
                  Explicit (torchtune get_rewards_ppo), neither → LastColumn (torchtune with \
                  valid_score_idxs=None). Callers apply the peers' conventions before (OpenRLHF clamps \
                  β ≥ 0 and clips the score). Gradient: ∂r/∂kl = −β everywhere (the KL is not \
                  masked, as in both peers), ∂r/∂score = 1 at the EOS position.",
            params: ["beta": "f64" => "the KL coefficient β (finite)"],
            inputs: [
                "scores": Real => "[B] one score per sequence",
                "kl": Real => "[B, T] a per-token KL estimate",
                "action_mask": Mask opt => "[B, T] ScorePosition::LastValid(action_mask)",
                "valid_score_idxs": Index opt => "[B] ScorePosition::Explicit(valid_score_idxs), each in [0, T)",
            ],
            outputs: ["rewards" => "[B, T] the token rewards"],
            vjp: ["rewards" => ["scores", "kl"]],
            run: run_rewards_at_eos,
        },
        op_def! {
            path: "kl::KlController::update",
            doc: "One update of the KL coefficient β after a batch of `n_steps` samples whose mean KL \
                  was `current_kl`: Fixed keeps β; Adaptive (Ziegler et al. 2019) sets \
                  e = clip(current_kl / target − 1, −0.2, 0.2), β ← β·(1 + e·n_steps/horizon) (no \
                  floor: β may turn negative, as in the peers). verl FixedKLController / \
                  AdaptiveKLController (TRL's are the same). The controller is state: build the next \
                  one with its `coef` set to the returned value. A NaN current_kl or an overflowing \
                  β is an error (β unchanged). No gradient.",
            params: [
                "controller": "KlController" => "{\"Fixed\": {\"coef\"}} or {\"Adaptive\": {\"coef\", \"target\", \"horizon\"}} (ops.core.config(\"KlController\", ...))",
                "current_kl": "f64" => "the batch's mean KL (e.g. kl_penalized_rewards' mean_kl)",
                "n_steps": "u64" => "samples in the batch",
            ],
            inputs: [],
            outputs: ["value" => "the new β, KlController::value() after the update (scalar)"],
            vjp: [],
            run: run_kl_controller_update,
        },
    ]
}

fn run_kl_estimate<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: KlConfig = c.param("cfg")?;
    let (lp, shape) = c.real("log_prob")?;
    let (rlp, _) = c.real("ref_log_prob")?;
    let cot = c.cot("kl")?;
    let mut out = vec![F::zero(); lp.len()];
    let mut grad = vec![F::zero(); if cot.is_some() { lp.len() } else { 0 }];
    cfg.estimate_slices(lp, rlp, &mut out, cot.map(|k| (k, &mut grad[..])))?;
    c.output("kl", out, shape);
    if cot.is_some() {
        c.grad("log_prob", grad);
    }
    Ok(())
}

fn run_kl_penalized_rewards<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: KlConfig = c.param("cfg")?;
    let beta: f64 = c.param("beta")?;
    let dims = c.dims_of("scores")?;
    let (scores, shape) = c.real("scores")?;
    let old = c.real("old_log_prob")?.0;
    let rf = c.real("ref_log_prob")?.0;
    let mask = c.opt_mask("mask")?.map(|m| m.0);
    let mut out = vec![F::zero(); scores.len()];
    let stats = kl_penalized_rewards(&cfg, beta, dims, scores, old, rf, mask, &mut out)?;
    c.output("rewards", out, shape);
    c.metric("mean_kl", stats.mean_kl.to_f64());
    Ok(())
}

fn run_rewards_at_eos<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let beta: f64 = c.param("beta")?;
    let dims = c.dims_of("kl")?;
    let scores = c.real("scores")?.0;
    let (kl, shape) = c.real("kl")?;
    let position = match (c.opt_mask("action_mask")?, c.opt_index("valid_score_idxs")?) {
        (Some(_), Some(_)) => {
            return Err(
                "kl::rewards_with_score_at_eos: give `action_mask` (LastValid) or \
                        `valid_score_idxs` (Explicit), not both"
                    .to_string()
                    .into(),
            )
        }
        (Some((m, _)), None) => ScorePosition::LastValid(m),
        (None, Some((idx, _))) => ScorePosition::Explicit(idx),
        (None, None) => ScorePosition::LastColumn,
    };
    let mut out = vec![F::zero(); kl.len()];
    rewards_with_score_at_eos(dims, scores, position, kl, beta, &mut out)?;
    c.output("rewards", out, shape);
    if let Some(cot) = c.cot("rewards")? {
        check_len("cotangent", cot.len(), dims.len())?;
        // ∂r/∂kl = −β; the EOS indicator from the core itself (scores 1, no KL).
        let b = F::of(beta);
        let dkl: Vec<F> = cot.iter().map(|&g| -(b * g)).collect();
        let ones = vec![F::one(); dims.batch];
        let zeros = vec![F::zero(); dims.len()];
        let mut eos = vec![F::zero(); dims.len()];
        rewards_with_score_at_eos(dims, &ones, position, &zeros, 0.0, &mut eos)?;
        let mut dscores = vec![F::zero(); dims.batch];
        if dims.seq > 0 {
            for (i, d) in dscores.iter_mut().enumerate() {
                let row = i * dims.seq..(i + 1) * dims.seq;
                for (&e, &g) in eos[row.clone()].iter().zip(&cot[row]) {
                    if e != F::zero() {
                        *d += e * g;
                    }
                }
            }
        }
        c.grad("scores", dscores);
        c.grad("kl", dkl);
    }
    Ok(())
}

fn validate_controller(k: &KlController) -> Result<(), Error> {
    match *k {
        KlController::Fixed { coef } => KlController::fixed(coef).map(|_| ()),
        KlController::Adaptive {
            coef,
            target,
            horizon,
        } => KlController::adaptive(coef, target, horizon).map(|_| ()),
    }
}

fn run_kl_controller_update<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let mut k: KlController = c.param("controller")?;
    let current_kl: f64 = c.param("current_kl")?;
    let n_steps: u64 = c.param("n_steps")?;
    validate_controller(&k)?;
    k.update(current_kl, n_steps)?;
    c.scalar("value", F::of(k.value()));
    Ok(())
}

// ---------------------------------------------------------------------------
// value
// ---------------------------------------------------------------------------

fn value_ops() -> Vec<OpDef> {
    vec![
        op_def! {
            path: "value::value_loss",
            doc: "The PPO value loss: V_clip = clamp(V, V_old − c, V_old + c), ℓ = max((V − R)², \
                  (V_clip − R)²) (or (V − R)² with clip_range None), L = 0.5·Σ wᵢⱼ ℓᵢⱼ with w the \
                  aggregation weights of cfg.agg and cfg.norm; clipfrac = Σ_valid 1[(V_clip − R)² > \
                  (V − R)²] / (n + 1e-8). verl compute_value_loss (vpreds = values, values = \
                  old_values, cliprange_value, loss_agg_mode), OpenRLHF ValueLoss (clip_eps, \
                  token_level_loss → token-mean / seq-mean-token-mean). A fully masked batch gives 0 \
                  (the peers: NaN). Gradient: ∂L/∂V = 0.5·w·∂ℓ/∂V, 0 where masked.",
            params: ["cfg": "ValueLossConfig" => "clip_range, agg, norm (ops.core.config(\"ValueLossConfig\", preset=...))"],
            inputs: [
                "values": Real => "[B, T] the new value predictions V",
                "old_values": Real => "[B, T] V_old from the rollout",
                "returns": Real => "[B, T] the returns R",
                "mask": Mask => "[B, T] valid tokens",
            ],
            outputs: [
                "loss" => "the value loss L (scalar)",
                "per_token" => "[B, T] ℓ before the 0.5 (0 where masked)",
                "clipfrac" => "metric: share of valid tokens where the clipped error is larger (verl vf_clipfrac)",
            ],
            vjp: ["loss" => ["values"]],
            run: run_value_loss,
        },
        op_def! {
            path: "value::policy_value_loss",
            doc: "torchtune's PPO actor-critic loss: r = exp(log π − log π_old), P = Σ_valid \
                  max(−A·r, −A·clip(r, 1−ε, 1+ε)) / D_p, Vl = 0.5·Σ_valid' max((V − R)², (V_clip − \
                  R)²) / D_v, loss = P + value_coeff·Vl, D = n + 1e-8 over a mask's valid positions \
                  or the element count without one. torchtune rlhf.loss.PPOLoss (padding_masks, \
                  value_padding_masks) plus approx_policy_kls of its PPO recipe. ratio_mean and \
                  approx_kl average every position, padding included (as the peer). Gradient: \
                  ∂loss/∂log π and ∂loss/∂V, 0 where masked.",
            params: ["cfg": "PolicyValueConfig" => "epsilon, value_clip_range, value_coeff (ops.core.config(\"PolicyValueConfig\", preset=...))"],
            inputs: [
                "old_log_prob": Real => "[B, T] log π_old",
                "log_prob": Real => "[B, T] log π",
                "advantages": Real => "[B, T] advantages A",
                "old_values": Real => "[B, T] V_old",
                "values": Real => "[B, T] V",
                "returns": Real => "[B, T] returns R",
                "policy_mask": Mask opt => "[B, T] valid tokens of the policy loss (torchtune padding_masks)",
                "value_mask": Mask opt => "[B, T] valid tokens of the value loss (torchtune value_padding_masks)",
            ],
            outputs: [
                "loss" => "P + value_coeff·Vl (scalar)",
                "policy_loss" => "metric: P",
                "value_loss" => "metric: Vl",
                "ratio_mean" => "metric: mean ratio over every position (torchtune ratios)",
                "clipfrac" => "metric: masked mean of the clip indicator",
                "approx_kl" => "metric: mean 0.5·(log π − log π_old)² over every position (approx_policy_kls)",
            ],
            vjp: ["loss" => ["log_prob", "values"]],
            run: run_policy_value_loss,
        },
    ]
}

fn run_value_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: ValueLossConfig = c.param("cfg")?;
    let dims = c.dims_of("values")?;
    let (values, shape) = c.real("values")?;
    let old = c.real("old_values")?.0;
    let ret = c.real("returns")?.0;
    let mask = c.mask("mask")?.0;
    let cot = c.cot_scalar("loss")?;
    let mut per_token = vec![F::zero(); values.len()];
    let mut grad = vec![F::zero(); if cot.is_some() { values.len() } else { 0 }];
    let out = value_loss(
        &cfg,
        dims,
        values,
        old,
        ret,
        mask,
        &mut per_token,
        cot.map(|_| &mut grad[..]),
    )?;
    c.scalar("loss", out.loss);
    c.output("per_token", per_token, shape);
    c.metric("clipfrac", out.clipfrac.to_f64());
    if let Some(k) = cot {
        grad.iter_mut().for_each(|g| *g *= k);
        c.grad("values", grad);
    }
    Ok(())
}

fn run_policy_value_loss<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: PolicyValueConfig = c.param("cfg")?;
    let dims = c.dims_of("log_prob")?;
    let old_lp = c.real("old_log_prob")?.0;
    let lp = c.real("log_prob")?.0;
    let adv = c.real("advantages")?.0;
    let old_v = c.real("old_values")?.0;
    let v = c.real("values")?.0;
    let ret = c.real("returns")?.0;
    let pm = c.opt_mask("policy_mask")?.map(|m| m.0);
    let vm = c.opt_mask("value_mask")?.map(|m| m.0);
    let cot = c.cot_scalar("loss")?;
    let n = if cot.is_some() { dims.len() } else { 0 };
    let (mut glp, mut gv) = (vec![F::zero(); n], vec![F::zero(); n]);
    let grads = cot.map(|_| PolicyValueGrads {
        log_prob: &mut glp[..],
        value: &mut gv[..],
    });
    let out = policy_value_loss(&cfg, dims, old_lp, lp, adv, old_v, v, ret, pm, vm, grads)?;
    c.scalar("loss", out.loss);
    c.metric("policy_loss", out.policy_loss.to_f64());
    c.metric("value_loss", out.value_loss.to_f64());
    c.metric("ratio_mean", out.ratio_mean.to_f64());
    c.metric("clipfrac", out.clipfrac.to_f64());
    c.metric("approx_kl", out.approx_kl.to_f64());
    if let Some(k) = cot {
        glp.iter_mut().for_each(|g| *g *= k);
        gv.iter_mut().for_each(|g| *g *= k);
        c.grad("log_prob", glp);
        c.grad("values", gv);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// aggregate
// ---------------------------------------------------------------------------

fn aggregate_ops() -> Vec<OpDef> {
    vec![
        op_def! {
            path: "aggregate::aggregate",
            doc: "Aggregates a [B, T] per-token loss to a scalar: L = Σᵢⱼ wᵢⱼ ℓᵢⱼ over valid tokens \
                  (masked values never read), w by `mode`: token-mean dp/N, token-sum dp, \
                  seq-mean-token-sum dp/G, seq-mean-token-mean dp/(G·(nᵢ + 1e-8)), \
                  seq-mean-token-sum-norm dp/(G·S), with N, G, S from `norm` or this batch. verl \
                  agg_loss, OpenRLHF aggregate_loss (token mode = token-mean, sample mode = \
                  seq-mean-token-mean). Nothing valid gives 0 (verl: NaN). Gradient: ∂L/∂ℓ = w.",
            params: [
                "mode": "AggMode" => "token-mean | token-sum | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm",
                "norm": "Option<GlobalNorm>" => "global normalizers (default: GlobalNorm::default(), dp_size 1)",
            ],
            inputs: [
                "loss": Real => "[B, T] per-token loss ℓ",
                "mask": Mask => "[B, T] valid tokens",
            ],
            outputs: ["aggregated" => "the aggregated loss L (scalar)"],
            vjp: ["aggregated" => ["loss"]],
            run: run_aggregate,
        },
        op_def! {
            path: "aggregate::aggregation_weights",
            doc: "The aggregation weights wᵢⱼ = ∂L/∂ℓᵢⱼ of `mode` (the table of aggregate::aggregate; \
                  0 on masked positions, a row with no valid token gets none) — verl agg_loss's \
                  implicit weights. No gradient (weights depend on the mask only).",
            params: [
                "mode": "AggMode" => "the aggregation mode",
                "norm": "Option<GlobalNorm>" => "global normalizers (default: GlobalNorm::default())",
            ],
            inputs: ["mask": Mask => "[B, T] valid tokens"],
            outputs: ["weights" => "[B, T] w (float64 unless a float32 call)"],
            vjp: [],
            run: run_aggregation_weights,
        },
        op_def! {
            path: "aggregate::weighted_sum",
            doc: "Σ wᵢⱼ·ℓᵢⱼ over valid positions (masked ones skipped, never multiplied): the \
                  aggregated loss for weights from aggregate::aggregation_weights. Gradient: \
                  ∂/∂ℓ = w and ∂/∂w = ℓ on valid positions, 0 elsewhere.",
            params: [],
            inputs: [
                "loss": Real => "[...] per-token loss ℓ",
                "mask": Mask => "[...] valid positions (same length)",
                "weights": Real => "[...] weights w (same length)",
            ],
            outputs: ["sum" => "Σ_valid w·ℓ (scalar)"],
            vjp: ["sum" => ["loss", "weights"]],
            run: run_weighted_sum,
        },
        op_def! {
            path: "aggregate::masked_sum",
            doc: "Σ x over the positions where `mask` is true (selection: masked NaN/inf never read). \
                  Gradient: ∂/∂x = mask.",
            params: [],
            inputs: [
                "x": Real => "[...] values",
                "mask": Mask => "[...] valid positions (same length)",
            ],
            outputs: ["sum" => "Σ_valid x (scalar)"],
            vjp: ["sum" => ["x"]],
            run: run_agg_masked_sum,
        },
    ]
}

fn run_aggregate<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let mode: AggMode = c.param("mode")?;
    let norm: GlobalNorm = c.param_or("norm", GlobalNorm::default())?;
    let dims = c.dims_of("loss")?;
    let loss = c.real("loss")?.0;
    let mask = c.mask("mask")?.0;
    let cot = c.cot_scalar("aggregated")?;
    let mut grad = vec![F::zero(); if cot.is_some() { loss.len() } else { 0 }];
    let l = aggregate::aggregate(mode, &norm, dims, loss, mask, cot.map(|_| &mut grad[..]))?;
    c.scalar("aggregated", l);
    if let Some(k) = cot {
        grad.iter_mut().for_each(|g| *g *= k);
        c.grad("loss", grad);
    }
    Ok(())
}

fn run_aggregation_weights<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let mode: AggMode = c.param("mode")?;
    let norm: GlobalNorm = c.param_or("norm", GlobalNorm::default())?;
    let dims = c.dims_of("mask")?;
    let (mask, shape) = c.mask("mask")?;
    let mut w = vec![F::zero(); mask.len()];
    aggregate::aggregation_weights(mode, &norm, dims, mask, &mut w)?;
    c.output("weights", w, shape);
    Ok(())
}

fn run_weighted_sum<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let loss = c.real("loss")?.0;
    let mask = c.mask("mask")?.0;
    let w = c.real("weights")?.0;
    c.scalar("sum", aggregate::weighted_sum(loss, mask, w)?);
    if let Some(k) = c.cot_scalar("sum")? {
        let pick = |x: &[F]| -> Vec<F> {
            x.iter()
                .zip(mask)
                .map(|(&v, &m)| if m { k * v } else { F::zero() })
                .collect()
        };
        let (dl, dw) = (pick(w), pick(loss));
        c.grad("loss", dl);
        c.grad("weights", dw);
    }
    Ok(())
}

fn run_agg_masked_sum<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let x = c.real("x")?.0;
    let mask = c.mask("mask")?.0;
    c.scalar("sum", aggregate::masked_sum(x, mask)?);
    if let Some(k) = c.cot_scalar("sum")? {
        let mut dx = vec![F::zero(); x.len()];
        stats::masked_sum_vjp(
            Dims::new(1, x.len()),
            Reduce::All,
            mask,
            None,
            &[k],
            &mut dx,
        )?;
        c.grad("x", dx);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// stats
// ---------------------------------------------------------------------------

fn stats_ops() -> Vec<OpDef> {
    vec![
        op_def! {
            path: "stats::masked_sum",
            doc: "Masked (weighted) sum per output of `reduce`: out_s = Σ_{i∈s, mask_i} wᵢ·xᵢ \
                  (w = 1 without weights; masked entries never read). verl masked_sum (a float mask \
                  is the weight), torchtune masked_sum. Gradient (stats::masked_sum_vjp): \
                  ∂out_s/∂xᵢ = wᵢ for valid i in s, else 0.",
            params: ["reduce": "Reduce" => "All (one output, axis=None) | Rows (B outputs, axis=-1) | Columns (T outputs, axis=0)"],
            inputs: [
                "values": Real => "[B, T] values x",
                "mask": Mask => "[B, T] valid entries",
                "weights": Real opt => "[B, T] weights w (constants)",
            ],
            outputs: ["sum" => "() for All (scalar), [B] for Rows, [T] for Columns"],
            vjp: ["sum" => ["values"]],
            run: run_masked_sum,
        },
        op_def! {
            path: "stats::masked_mean",
            doc: "Masked (weighted) mean per output of `reduce`: out_s = Σ_V wᵢxᵢ / D_s, \
                  D_s = max(Σ_V wᵢ + count_eps, count_floor) (MomentConfig); an all-masked output \
                  is 0. verl and torchtune masked_mean (MomentConfig preset verl/torchtune, +1e-8). \
                  Gradient (stats::masked_mean_vjp): ∂out_s/∂xᵢ = wᵢ/D_s for valid i, else 0.",
            params: [
                "cfg": "MomentConfig" => "count_eps, count_floor, bessel (ops.core.config(\"MomentConfig\", preset=...))",
                "reduce": "Reduce" => "All | Rows | Columns",
            ],
            inputs: [
                "values": Real => "[B, T] values x",
                "mask": Mask => "[B, T] valid entries",
                "weights": Real opt => "[B, T] weights w (constants)",
            ],
            outputs: ["mean" => "() for All (scalar), [B] for Rows, [T] for Columns"],
            vjp: ["mean" => ["values"]],
            run: run_masked_mean,
        },
        op_def! {
            path: "stats::masked_variance",
            doc: "Masked variance of all entries: m = Σ_V x / D (0 when center is false), \
                  v = Σ_V (x − m)² / D · bessel(W), D = max(W + count_eps, count_floor). verl \
                  masked_var (MomentConfig preset verl, center true), torchtune masked_var (preset \
                  torchtune, center false; bessel None for unbiased=False). Exact Bessel refuses \
                  fewer than two valid entries. Gradient: ∂v/∂x_j = 2·scale·(c_j − [center]·Σ_V c / D) \
                  for valid j, else 0.",
            params: [
                "cfg": "MomentConfig" => "count_eps, count_floor, bessel",
                "center": "bool" => "subtract the masked mean first (false: the input is already centered)",
            ],
            inputs: [
                "values": Real => "[...] values x",
                "mask": Mask => "[...] valid entries (same length)",
            ],
            outputs: ["variance" => "the variance (scalar)"],
            vjp: ["variance" => ["values"]],
            run: run_masked_variance,
        },
        op_def! {
            path: "stats::masked_whiten",
            doc: "Masked whitening per group of `reduce`: m = Σ_V x / D, v = Σ_V (x − m)²·scale, \
                  r = (v + ε)^{-½} (VarEps::Add) or max(v, ε)^{-½} (VarEps::Floor), \
                  yᵢ = zᵢ·(xᵢ − m)·r + [keep_mean]·m with zᵢ = maskᵢ if zero_masked else 1. verl \
                  masked_whiten (WhitenConfig preset verl; shift_mean=False ↔ keep_mean), torchtune \
                  whiten (preset torchtune; shift_mean=True ↔ keep_mean), OpenRLHF masked_normalize \
                  (preset openrlhf, reduce Rows). Gradient: the full VJP through m and v.",
            params: [
                "cfg": "WhitenConfig" => "moments, var_eps ({\"Add\": ε} | {\"Floor\": ε}), keep_mean, zero_masked",
                "reduce": "Reduce" => "All | Rows | Columns",
            ],
            inputs: [
                "values": Real => "[B, T] values x",
                "mask": Mask => "[B, T] valid entries",
            ],
            outputs: ["whitened" => "[B, T] y"],
            vjp: ["whitened" => ["values"]],
            run: run_masked_whiten,
        },
        op_def! {
            path: "stats::nan_mean",
            doc: "Mean of the non-NaN entries per output of `reduce` (torch.nanmean as TRL uses it); \
                  NaN where every entry of a group is NaN. Gradient (through \
                  stats::masked_mean_vjp with mask = not NaN, count_eps 0): 1/n_s at each non-NaN \
                  entry, 0 at NaN entries.",
            params: ["reduce": "Reduce" => "All | Rows | Columns"],
            inputs: ["values": Real => "[B, T] values (NaN = missing)"],
            outputs: ["mean" => "() for All (scalar), [B] for Rows, [T] for Columns; NaN for an all-NaN group"],
            vjp: ["mean" => ["values"]],
            run: run_nan_mean,
        },
        op_def! {
            path: "stats::nan_std",
            doc: "Bessel-corrected standard deviation of the non-NaN entries per output of `reduce`: \
                  std = √(Σ_{x≠NaN} (x − m)² / (n − 1)), NaN where fewer than two entries are \
                  non-NaN. TRL nanstd (any dim; keepdim only changes the shape). Gradient: \
                  (x_j − m − Σ(x − m)/n) / ((n − 1)·std) at non-NaN entries, 0 at NaN entries and \
                  where the std is 0 or undefined.",
            params: ["reduce": "Reduce" => "All | Rows | Columns"],
            inputs: ["values": Real => "[B, T] values (NaN = missing)"],
            outputs: ["std" => "() for All (scalar), [B] for Rows, [T] for Columns; NaN where n < 2"],
            vjp: ["std" => ["values"]],
            run: run_nan_std,
        },
        op_def! {
            path: "stats::nan_max",
            doc: "Largest non-NaN entry; NaN when every entry is NaN or there is none (the core's \
                  None; TRL nanmax returns NaN too). No gradient (a selection for metrics).",
            params: [],
            inputs: ["values": Real => "[...] values"],
            outputs: ["max" => "max of the non-NaN entries (scalar)"],
            vjp: [],
            run: run_nan_max,
        },
        op_def! {
            path: "stats::nan_min",
            doc: "Smallest non-NaN entry; NaN when every entry is NaN or there is none (the core's \
                  None; TRL nanmin returns NaN too). No gradient (a selection for metrics).",
            params: [],
            inputs: ["values": Real => "[...] values"],
            outputs: ["min" => "min of the non-NaN entries (scalar)"],
            vjp: [],
            run: run_nan_min,
        },
    ]
}

/// The shape of a reduction's output: `()` for `All`, `[B]`, `[T]`.
fn reduce_shape(reduce: Reduce, dims: Dims) -> Vec<usize> {
    match reduce {
        Reduce::All => vec![],
        _ => vec![reduce.out_len(dims)],
    }
}

fn run_masked_sum<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let reduce: Reduce = c.param("reduce")?;
    let dims = c.dims_of("values")?;
    let values = c.real("values")?.0;
    let mask = c.mask("mask")?.0;
    let weights = c.opt_real("weights")?.map(|w| w.0);
    let mut out = vec![F::zero(); reduce.out_len(dims)];
    stats::masked_sum(dims, reduce, values, mask, weights, &mut out)?;
    c.output("sum", out, &reduce_shape(reduce, dims));
    if let Some(cot) = c.cot("sum")? {
        let mut dx = vec![F::zero(); values.len()];
        stats::masked_sum_vjp(dims, reduce, mask, weights, cot, &mut dx)?;
        c.grad("values", dx);
    }
    Ok(())
}

fn run_masked_mean<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: MomentConfig = c.param("cfg")?;
    let reduce: Reduce = c.param("reduce")?;
    let dims = c.dims_of("values")?;
    let values = c.real("values")?.0;
    let mask = c.mask("mask")?.0;
    let weights = c.opt_real("weights")?.map(|w| w.0);
    let mut out = vec![F::zero(); reduce.out_len(dims)];
    stats::masked_mean(&cfg, dims, reduce, values, mask, weights, &mut out)?;
    c.output("mean", out, &reduce_shape(reduce, dims));
    if let Some(cot) = c.cot("mean")? {
        let mut dx = vec![F::zero(); values.len()];
        stats::masked_mean_vjp(&cfg, dims, reduce, mask, weights, cot, &mut dx)?;
        c.grad("values", dx);
    }
    Ok(())
}

fn run_masked_variance<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: MomentConfig = c.param("cfg")?;
    let center: bool = c.param("center")?;
    let values = c.real("values")?.0;
    let mask = c.mask("mask")?.0;
    let cot = c.cot_scalar("variance")?;
    let mut dx = vec![F::zero(); if cot.is_some() { values.len() } else { 0 }];
    let v = stats::masked_variance(&cfg, values, mask, center, cot.map(|k| (k, &mut dx[..])))?;
    c.scalar("variance", v);
    if cot.is_some() {
        c.grad("values", dx);
    }
    Ok(())
}

fn run_masked_whiten<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let cfg: WhitenConfig = c.param("cfg")?;
    let reduce: Reduce = c.param("reduce")?;
    let dims = c.dims_of("values")?;
    let (values, shape) = c.real("values")?;
    let mask = c.mask("mask")?.0;
    let cot = c.cot("whitened")?;
    let mut out = vec![F::zero(); values.len()];
    let mut dx = vec![F::zero(); if cot.is_some() { values.len() } else { 0 }];
    stats::masked_whiten(
        &cfg,
        dims,
        reduce,
        values,
        mask,
        &mut out,
        cot.map(|g| (g, &mut dx[..])),
    )?;
    c.output("whitened", out, shape);
    if cot.is_some() {
        c.grad("values", dx);
    }
    Ok(())
}

fn run_nan_mean<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let reduce: Reduce = c.param("reduce")?;
    let dims = c.dims_of("values")?;
    let values = c.real("values")?.0;
    let mut out = vec![F::zero(); reduce.out_len(dims)];
    stats::nan_mean(dims, reduce, values, &mut out)?;
    c.output("mean", out, &reduce_shape(reduce, dims));
    if let Some(cot) = c.cot("mean")? {
        // The core's own recipe: masked_mean_vjp over the non-NaN entries
        // with D = n (no count epsilon, no floor).
        let present: Vec<bool> = values.iter().map(|v| !v.is_nan()).collect();
        let plain = MomentConfig::new(0.0, 0.0, Bessel::None)?;
        let mut dx = vec![F::zero(); values.len()];
        stats::masked_mean_vjp(&plain, dims, reduce, &present, None, cot, &mut dx)?;
        c.grad("values", dx);
    }
    Ok(())
}

fn run_nan_std<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let reduce: Reduce = c.param("reduce")?;
    let dims = c.dims_of("values")?;
    let values = c.real("values")?.0;
    let cot = c.cot("std")?;
    let mut out = vec![F::zero(); reduce.out_len(dims)];
    let mut dx = vec![F::zero(); if cot.is_some() { values.len() } else { 0 }];
    stats::nan_std(
        dims,
        reduce,
        values,
        &mut out,
        cot.map(|g| (g, &mut dx[..])),
    )?;
    c.output("std", out, &reduce_shape(reduce, dims));
    if cot.is_some() {
        c.grad("values", dx);
    }
    Ok(())
}

fn run_nan_max<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let values = c.real("values")?.0;
    c.scalar("max", stats::nan_max(values).unwrap_or(F::nan()));
    Ok(())
}

fn run_nan_min<F: CoreReal>(c: &mut Call<'_, F>) -> CallResult<()> {
    let values = c.real("values")?.0;
    c.scalar("min", stats::nan_min(values).unwrap_or(F::nan()));
    Ok(())
}

// ---------------------------------------------------------------------------
// configs
// ---------------------------------------------------------------------------

pub(crate) fn configs() -> Vec<ConfigDef> {
    vec![
        ConfigDef {
            name: "KlConfig",
            path: "kl::KlConfig",
            doc: "A KL estimator: estimator (K1 | Abs | K2 | K3), straight_through, log_ratio_clamp, value_clamp.",
            preset_args: Some(&["estimator"]),
            base: |preset, args| {
                Ok(match preset {
                    Some(p) => {
                        let est: KlEstimator = take(args, "KlConfig", "estimator")?;
                        Some(to_value(&KlConfig::preset(est, p))?)
                    }
                    None => None,
                })
            },
            check: |v| check_with::<KlConfig>("KlConfig", v, |c| c.validate()),
        },
        ConfigDef {
            name: "KlController",
            path: "kl::KlController",
            doc: "The KL coefficient's controller (an enum): {\"Fixed\": {\"coef\"}} or \
                  {\"Adaptive\": {\"coef\", \"target\", \"horizon\"}} — built as \
                  config(\"KlController\", Adaptive={...}); checked by KlController::fixed / adaptive.",
            preset_args: None,
            base: |_, _| Ok(None),
            check: |v| check_with::<KlController>("KlController", v, validate_controller),
        },
        ConfigDef {
            name: "ValueLossConfig",
            path: "value::ValueLossConfig",
            doc: "The value loss: clip_range (None: plain squared error), agg (AggMode), norm (GlobalNorm).",
            preset_args: Some(&[]),
            base: |preset, _| {
                Ok(match preset {
                    Some(p) => Some(to_value(&ValueLossConfig::preset(p))?),
                    None => None,
                })
            },
            check: |v| check_with::<ValueLossConfig>("ValueLossConfig", v, |c| c.validate()),
        },
        ConfigDef {
            name: "PolicyValueConfig",
            path: "value::PolicyValueConfig",
            doc: "torchtune's PPOLoss: epsilon, value_clip_range, value_coeff.",
            preset_args: Some(&[]),
            base: |preset, _| {
                Ok(match preset {
                    Some(p) => Some(to_value(&PolicyValueConfig::preset(p))?),
                    None => None,
                })
            },
            check: |v| check_with::<PolicyValueConfig>("PolicyValueConfig", v, |c| c.validate()),
        },
        ConfigDef {
            name: "MomentConfig",
            path: "stats::MomentConfig",
            doc: "How a masked mean and variance count: count_eps, count_floor, bessel (None | Exact | Smoothed).",
            preset_args: Some(&[]),
            base: |preset, _| {
                Ok(match preset {
                    Some(p) => Some(to_value(&MomentConfig::preset(p))?),
                    None => None,
                })
            },
            check: |v| {
                check_with::<MomentConfig>("MomentConfig", v, |c| {
                    MomentConfig::new(c.count_eps, c.count_floor, c.bessel).map(|_| ())
                })
            },
        },
        ConfigDef {
            name: "WhitenConfig",
            path: "stats::WhitenConfig",
            doc: "Whitening: moments (MomentConfig), var_eps ({\"Add\": ε} | {\"Floor\": ε}), keep_mean, zero_masked.",
            preset_args: Some(&[]),
            base: |preset, _| {
                Ok(match preset {
                    Some(p) => Some(to_value(&WhitenConfig::preset(p))?),
                    None => None,
                })
            },
            check: |v| check_with::<WhitenConfig>("WhitenConfig", v, |c| c.validate()),
        },
    ]
}
