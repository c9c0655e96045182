#![no_main]
//! The `policy` family under hostile input: see `posttrain_conformance::hostile`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| posttrain_conformance::hostile::policy::run(data));
