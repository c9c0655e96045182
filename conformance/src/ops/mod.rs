//! Op handlers: one module per family, each mapping the peers' ops (named
//! `<peer>.<op>` as in the vector files) and their parameters onto
//! posttrain-core. A handler returns `None` for an op it does not know.

use crate::case::{Ctx, OpResult};
use posttrain_core::Real;

pub mod advantage;
pub mod aggregate;
#[cfg(feature = "burn")]
pub mod burn;
pub mod distill;
pub mod grpo;
pub mod kl;
pub mod logits;
pub mod loss_agg;
pub mod odds_ratio;
pub mod paired;
pub mod policy;
pub mod rollout;
pub mod sequence;
pub mod sequence_mean;
pub mod unpaired;
pub mod value;

/// Runs `op` on the case with float type `F`, or `None` if no family knows it.
pub fn dispatch<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    // `rollout` first: it claims `verl.policy_loss` in bypass mode.
    rollout::run::<F>(op, ctx)
        .or_else(|| policy::run::<F>(op, ctx))
        .or_else(|| grpo::run::<F>(op, ctx))
        .or_else(|| sequence_mean::run::<F>(op, ctx))
        .or_else(|| value::run::<F>(op, ctx))
        .or_else(|| kl::run::<F>(op, ctx))
        .or_else(|| advantage::run::<F>(op, ctx))
        .or_else(|| aggregate::run::<F>(op, ctx))
        .or_else(|| loss_agg::run::<F>(op, ctx))
        .or_else(|| logits::run::<F>(op, ctx))
        .or_else(|| distill::run::<F>(op, ctx))
        .or_else(|| paired::run::<F>(op, ctx))
        .or_else(|| unpaired::run::<F>(op, ctx))
        .or_else(|| odds_ratio::run::<F>(op, ctx))
        .or_else(|| sequence::run::<F>(op, ctx))
}
