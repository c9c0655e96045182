//! Masked statistics and whitening: masked mean, sum, variance, whitening, NaN-aware reductions.
