//! Advantage estimators: GAE, GRPO group z-scores and their family, RLOO, REINFORCE++, ReMax, OPO, GPG, pass@k.
