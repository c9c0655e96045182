//! Fused ops: the core's closed-form backward registered as burn custom backward ops.
