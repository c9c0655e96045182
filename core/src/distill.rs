//! Distillation: forward/reverse KL and generalized JSD between teacher and student token distributions.
