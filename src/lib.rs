//! Teaching examples for posttrain live in `examples/`; this crate re-exports the core.
pub use posttrain_core as core;
