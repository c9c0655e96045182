#![no_main]
//! The `controllers` family under hostile input: see `posttrain_conformance::hostile`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| posttrain_conformance::hostile::controllers::run(data));
