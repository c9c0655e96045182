//! The core ops and configs exposed to Python under their Rust names, one
//! file per module family of `posttrain-core`. Each op is an
//! [`OpDef`](crate::core_api::OpDef) declared with
//! [`op_def!`](crate::core_api::core_op) over a generic `run` function that
//! reads its inputs from a [`Call`](crate::core_api::Call), calls the core
//! once, and records outputs, metrics and (given cotangents) gradients.

use crate::core_api::{ConfigDef, OpDef};

mod advantage;
mod logits;
mod misc;
mod policy;
mod preference;
mod rollout;

/// Every op, in catalogue order.
pub(crate) fn all() -> Vec<OpDef> {
    let mut v = Vec::new();
    v.extend(policy::ops());
    v.extend(rollout::ops());
    v.extend(advantage::ops());
    v.extend(preference::ops());
    v.extend(misc::ops());
    v.extend(logits::ops());
    v
}

/// Every config type Python can build by name.
pub(crate) fn configs() -> Vec<ConfigDef> {
    let mut v = Vec::new();
    v.extend(policy::configs());
    v.extend(rollout::configs());
    v.extend(advantage::configs());
    v.extend(preference::configs());
    v.extend(misc::configs());
    v.extend(logits::configs());
    v
}
