//! The cross-hardware report: every op on seeded random inputs of realistic shapes on every backend.
