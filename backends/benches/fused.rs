//! Fused custom-backward ops vs autodiff (filled in by the fused work).
fn main() {}
