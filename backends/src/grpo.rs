//! TRL/torchtune GRPO-family sequence losses and OpenRLHF/torchtune PPO losses on tensors.
