//! Rollout importance-sampling weights and rejection masks on tensors.
