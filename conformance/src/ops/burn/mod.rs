//! The `burn-*` backends: every op through posttrain-burn on a burn device
//! (f32 tensors), run on the same vectors as the core. One submodule per op
//! family maps a peer op onto posttrain-burn's tensor ops; the device (and so
//! the burn backend) is chosen by the runner.

use crate::case::{Ctx, Fail, OpResult};
use posttrain_burn::{tensor2, BackendKind, Device, Tensor};
use posttrain_core::aggregate::{AggMode, GlobalNorm};

mod advantage;
mod distill;
mod grpo;
mod kl_agg;
mod logits;
mod policy;
mod preference;
mod rollout;
mod sequence;
mod sequence_mean;
mod stats;
mod value;

/// A family's entry point: runs `op` on the device if the family knows it.
type Family = fn(&str, &Ctx, &Device) -> Option<OpResult>;

/// The op families, tried in order; the first that knows `op` runs it.
const FAMILIES: &[Family] = &[
    kl_agg::run,
    logits::run,
    policy::run,
    advantage::run,
    value::run,
    preference::run,
    rollout::run,
    distill::run,
    sequence::run,
    stats::run,
    grpo::run,
    sequence_mean::run,
];

/// Runs `op` on the device of `kind`; `None` when no family implements it.
pub fn run(kind: BackendKind, op: &str, ctx: &Ctx) -> Option<OpResult> {
    let d = match posttrain_burn::device_for(kind) {
        Ok(d) => d,
        Err(e) => return Some(Err(Fail::Harness(e.to_string()))),
    };
    FAMILIES.iter().find_map(|family| family(op, ctx, &d))
}

/// A `[rows, last]` view of an input's shape (a 1-D input is one row).
pub(crate) fn as2(shape: &[usize]) -> [usize; 2] {
    match shape.split_last() {
        None => [1, 1],
        Some((&last, lead)) => [lead.iter().product(), last],
    }
}

pub(crate) fn f2(ctx: &Ctx, name: &str, shape: [usize; 2], d: &Device) -> Result<Tensor<2>, Fail> {
    Ok(tensor2(&ctx.f::<f64>(name)?, shape, d)?)
}

pub(crate) fn global_norm(ctx: &Ctx, with_scale_factor: bool) -> Result<GlobalNorm, Fail> {
    super::loss_agg::global_norm(ctx, with_scale_factor)
}

pub(crate) fn agg_mode(ctx: &Ctx) -> Result<AggMode, Fail> {
    ctx.p_str("loss_agg_mode")?
        .parse()
        .map_err(|_| ctx.unsupported("loss_agg_mode"))
}
