//! Handlers for KL estimators, KL-in-reward and KL controllers.

use crate::case::{Ctx, OpResult, Outputs};
use posttrain_core::kl::KlConfig;
use posttrain_core::Real;

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    match op {
        "verl.kl_penalty" | "verl.kl_penalty_forward" => Some(verl_kl_penalty::<F>(ctx)),
        _ => None,
    }
}

fn verl_kl_penalty<F: Real>(ctx: &Ctx) -> OpResult {
    let name = ctx.p_str("kl_penalty")?;
    let cfg = match KlConfig::parse_verl(name) {
        Ok(c) => c,
        Err(_) => return Err(ctx.unsupported("kl_penalty")),
    };
    let lp = ctx.f::<F>("logprob")?;
    let rf = ctx.f::<F>("ref_logprob")?;
    let mut out = vec![F::zero(); lp.len()];
    let mut o = Outputs::new();
    match ctx.cotangent::<F>("kl_estimate")? {
        Some(cot) => {
            let mut g = vec![F::zero(); lp.len()];
            cfg.estimate_slices(&lp, &rf, &mut out, Some((&cot, &mut g)))?;
            o.grad("logprob", &g);
        }
        None => cfg.estimate_slices(&lp, &rf, &mut out, None)?,
    }
    o.put("kl_estimate", &out);
    Ok(o)
}
