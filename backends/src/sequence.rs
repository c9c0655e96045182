//! Sequence utilities (response masks, stop-token truncation, sequence log-probs) on tensors.
