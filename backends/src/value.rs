//! Value (critic) losses on tensors.
