//! Reduced-precision (f16/bf16) evaluation and its documented tolerances.
