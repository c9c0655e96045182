//! The golden vectors, run through `posttrain-conformance` on both core
//! backends, and the check that the in-repo copy is the shared one verbatim.

use posttrain_conformance::{run_files, vector::collect_files, Backend};
use std::path::{Path, PathBuf};

fn repo_vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

/// `../shared/conformance/vectors` next to the repository, when it exists.
fn shared_vectors() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/vectors");
    p.is_dir().then_some(p)
}

/// The cases listed in `conformance/known-vector-defects.txt` (edge contracts
/// that no correct implementation can meet, each with its reason there).
fn known_defects() -> Vec<String> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("known-vector-defects.txt"),
    )
    .expect("conformance/known-vector-defects.txt");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// Runs every vector on core-f64 and core-f32: nothing may fail except the
/// documented known vector defects (exactly those), and at most 5 % of the
/// cases may be skipped (unknown op or parameter value).
#[test]
fn golden_vectors_pass_on_core_backends() {
    // The shared folder is the source of truth when present (it may hold new
    // vectors not yet copied); a fresh clone uses its verbatim copy.
    let dir = shared_vectors().unwrap_or_else(repo_vectors);
    let files = collect_files(std::slice::from_ref(&dir)).expect("vector folder");
    assert!(
        files.len() > 100,
        "expected the full vector set in {}, found {} files",
        dir.display(),
        files.len()
    );
    let summary =
        run_files(&files, &[Backend::CoreF64, Backend::CoreF32], &[]).expect("vectors parse");
    let report = summary.report();
    println!("{report}");
    let (passed, failed, skipped) = summary.totals();
    let failing: Vec<String> = summary
        .failures
        .iter()
        .map(|f| f.split("]: ").next().unwrap_or(f).to_string() + "]")
        .collect();
    let known = known_defects();
    let unexpected: Vec<_> = summary
        .failures
        .iter()
        .zip(&failing)
        .filter(|(_, id)| !known.contains(id))
        .map(|(f, _)| f)
        .collect();
    assert!(
        unexpected.is_empty(),
        "{} cases failed:\n{unexpected:#?}",
        unexpected.len()
    );
    let fixed: Vec<_> = known.iter().filter(|k| !failing.contains(k)).collect();
    assert!(fixed.is_empty(), "listed as known defects but passing now (remove them from known-vector-defects.txt): {fixed:#?}");
    assert_eq!(failed, known.len());
    let total = passed + failed + skipped;
    assert!(
        skipped * 20 <= total,
        "{skipped} of {total} cases skipped (> 5 %):\n{:#?}",
        summary.skips
    );
}

/// `conformance/vectors` must be a verbatim copy of `../shared/conformance/vectors`.
#[test]
fn in_repo_vectors_are_a_verbatim_copy_of_shared() {
    let Some(shared) = shared_vectors() else {
        eprintln!("../shared/conformance/vectors not present: nothing to compare");
        return;
    };
    let names = |dir: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let (ours, theirs) = (names(&repo_vectors()), names(&shared));
    assert_eq!(
        ours, theirs,
        "conformance/vectors lists other files than ../shared: copy the folder again, verbatim"
    );
    for name in &theirs {
        let a = std::fs::read(repo_vectors().join(name)).unwrap();
        let b = std::fs::read(shared.join(name)).unwrap();
        assert!(
            a == b,
            "conformance/vectors/{name} differs from ../shared: copy it again, verbatim"
        );
    }
}
