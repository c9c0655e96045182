//! `policy::sequence_mean::*` and `policy::rollout::*`: the sequence-mean
//! (on-policy) losses and rollout correction (importance weights, rejection,
//! bypass losses, vLLM importance sampling).

use crate::core_api::{ConfigDef, OpDef};

pub(crate) fn ops() -> Vec<OpDef> {
    vec![]
}

pub(crate) fn configs() -> Vec<ConfigDef> {
    vec![]
}
