//! Paired preference losses (DPO and its family, reward-model pairwise).
