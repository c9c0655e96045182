//! Distillation losses on burn tensors: handlers for the `burn-*` backends.
//! (Filled in by the distill work; ops not matched here fall through.)

use crate::case::{Ctx, OpResult};
use posttrain_burn::Device;

/// Runs `op` if this family owns it.
pub fn run(op: &str, ctx: &Ctx, d: &Device) -> Option<OpResult> {
    let _ = (op, ctx, d);
    None
}
