//! Masked statistics (sum, mean, variance, whitening, nan-reductions) on tensors.
