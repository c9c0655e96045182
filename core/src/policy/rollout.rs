//! Rollout correction: importance-sampling weights and rejection masks between the rollout (sampling) policy and the training policy.
