//! Distillation losses (forward/reverse KL, generalized JSD) on tensors.
