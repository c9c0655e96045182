//! GRPO-family policy losses with sequence-level importance sampling, delta caps, entropy masks and their normalizers.
