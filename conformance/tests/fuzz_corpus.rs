//! Replays every committed fuzz input (`fuzz/corpus/<target>/` and the crash
//! reproducers in `fuzz/regressions/<target>/`) through the same contract as
//! the cargo-fuzz targets, on stable Rust.

use posttrain_conformance::hostile::TARGETS;
use std::path::Path;

#[test]
fn committed_fuzz_inputs_keep_the_contract() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = 0;
    for (name, run) in TARGETS {
        for kind in ["corpus", "regressions"] {
            let dir = root.join(kind).join(name);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut files: Vec<_> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            for file in files {
                let data = std::fs::read(&file).unwrap();
                let r = std::panic::catch_unwind(|| run(&data));
                assert!(
                    r.is_ok(),
                    "fuzz input {} broke the contract (see the panic above)",
                    file.display()
                );
                replayed += 1;
            }
        }
    }
    println!("replayed {replayed} committed fuzz inputs");
}
