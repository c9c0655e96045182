//! Advantage estimators (GRPO, RLOO, REINFORCE++, GAE, …), reward shaping and controllers on tensors.
