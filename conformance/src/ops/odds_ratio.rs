//! Handlers for the `odds_ratio` family.

use crate::case::{Ctx, OpResult};
use posttrain_core::Real;

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    let _ = (op, ctx, F::zero());
    None
}
