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

/// The gate on the burn backends (`burn-ndarray`, and `burn-wgpu` /
/// `burn-tch` when compiled in) — the coordinator tightens it here:
///
/// * **failures** must be a subset of the known vector defects: a burn
///   backend computes in f32, so `FILE :: CASE [burn-*]` may fail only where
///   `FILE :: CASE [core-f32]` is listed in `known-vector-defects.txt`;
/// * **skips** (an op no burn handler implements yet, or an unsupported
///   parameter value of one) are allowed only while [`BURN_ALLOW_SKIPS`] is
///   true; the goal is false: 0 skipped, like the core.
///
/// `POSTTRAIN_CONFORMANCE_BURN=ndarray,wgpu` narrows the backends (default:
/// every burn backend compiled in).
#[cfg(feature = "burn")]
const BURN_ALLOW_SKIPS: bool = false; // every family is ported: 0 skipped

#[cfg(feature = "burn")]
#[test]
fn golden_vectors_on_burn_backends() {
    let dir = shared_vectors().unwrap_or_else(repo_vectors);
    let files = collect_files(std::slice::from_ref(&dir)).expect("vector folder");
    let only = std::env::var("POSTTRAIN_CONFORMANCE_BURN").unwrap_or_default();
    let backends: Vec<Backend> = Backend::ALL
        .iter()
        .copied()
        .filter(|b| b.burn_kind().is_some())
        .filter(|b| {
            only.trim().is_empty()
                || only
                    .split(',')
                    .any(|o| b.name() == format!("burn-{}", o.trim()) || b.name() == o.trim())
        })
        .collect();
    assert!(!backends.is_empty(), "no burn backend selected by {only:?}");
    let known = known_defects();
    let mut problems = Vec::new();
    for be in backends {
        let t = std::time::Instant::now();
        let summary = run_files(&files, &[be], &[]).expect("vectors parse");
        let (passed, failed, skipped) = summary.totals();
        println!(
            "[{}] {passed} passed, {failed} failed, {skipped} skipped ({:.1} s)",
            be.name(),
            t.elapsed().as_secs_f64()
        );
        for f in &summary.failures {
            let id = f.split("]: ").next().unwrap_or(f);
            let core_id = match id.rsplit_once(" [") {
                Some((case, _)) => format!("{case} [core-f32]"),
                None => id.to_string(),
            };
            if known.contains(&core_id) {
                println!("  known defect: {f}");
            } else {
                problems.push(format!("unexpected failure: {f}"));
            }
        }
        for (op, reasons) in &summary.skips {
            for r in reasons {
                if !BURN_ALLOW_SKIPS {
                    problems.push(format!("[{}] {op}: skipped: {r}", be.name()));
                } else if !(r.starts_with("op ") && r.ends_with(" not supported")) {
                    println!("  [{}] {op}: skipped: {r}", be.name());
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems on the burn backends:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
