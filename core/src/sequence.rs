//! Sequence utilities: response masks from EOS, stop-token truncation, reward penalty masks, entropy and off-policy masks.
