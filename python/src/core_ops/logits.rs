//! `logits::*`, `sequence::*`, `distill::*`, `fused::*`: log-softmax,
//! token log-probs and entropy from logits, sequence masks and weights,
//! distillation losses, the fused token loss.

use crate::core_api::{ConfigDef, OpDef};

pub(crate) fn ops() -> Vec<OpDef> {
    vec![]
}

pub(crate) fn configs() -> Vec<ConfigDef> {
    vec![]
}
