//! `policy::*`: token-level policy losses (verl's family), TRL's GRPO
//! family, the sequence-mean losses, rollout correction.

use crate::core_api::{
    check_with, op_def, take_f64, to_value, Call, CallResult, ConfigDef, CoreReal, OpDef,
};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::policy::token::{policy_loss, PolicyBatch, PolicyLoss};
use posttrain_core::policy::ClipConfig;

pub(crate) fn ops() -> Vec<OpDef> {
    vec![op_def! {
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
    }]
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
    ]
}
