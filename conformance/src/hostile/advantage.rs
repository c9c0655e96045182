//! Hostile inputs for the `advantage` family (fuzz target `fuzz/fuzz_targets/advantage.rs`).

/// Decodes `data` into calls of this family's ops and checks the contract
/// of the [module docs](super).
pub fn run(data: &[u8]) {
    let _ = data;
}
