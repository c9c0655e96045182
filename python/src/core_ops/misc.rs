//! `kl::*`, `value::*`, `aggregate::*`, `stats::*`: the KL estimators and
//! KL-shaped rewards, value losses, loss aggregation, masked statistics.

use crate::core_api::{
    check_with, op_def, take, to_value, Call, CallResult, ConfigDef, CoreReal, OpDef,
};
use posttrain_core::kl::{KlConfig, KlEstimator};

pub(crate) fn ops() -> Vec<OpDef> {
    vec![op_def! {
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
    }]
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

pub(crate) fn configs() -> Vec<ConfigDef> {
    vec![ConfigDef {
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
    }]
}
