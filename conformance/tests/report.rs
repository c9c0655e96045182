//! The cross-backend report at small scale: it runs, it covers every op of
//! the vector files, and core-f32 (and burn-ndarray, with the `burn`
//! feature) stay within the report's bounds of core-f64.

use posttrain_conformance::report::{
    compare, generate, synth, verdict, with_cotangents, Options, RunOutcome, Scale, DEFAULT_REL,
};
use posttrain_conformance::vector::{collect_files, VectorFile};
use posttrain_conformance::Backend;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn vector_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors");
    collect_files(&[dir]).expect("vector folder")
}

#[test]
fn small_report_covers_every_op_within_bounds() {
    let files = vector_files();
    let ops: BTreeSet<String> = files
        .iter()
        .map(|p| VectorFile::load(p).expect("vector file").op)
        .collect();
    let opts = Options {
        backends: Backend::ALL.to_vec(),
        scale: Scale::Small,
        max_variants: Some(3),
        ..Options::default()
    };
    let report = generate(&files, &opts, |_| {}).expect("report");
    let md = report.markdown();
    assert!(md.contains("## Machine") && md.contains("| op |"));

    // Every op of the vectors is in the report and ran at least one variant.
    let covered: BTreeSet<String> = report
        .rows
        .iter()
        .filter(|r| r.variants.0 > 0)
        .map(|r| r.op.clone())
        .collect();
    let missing: Vec<_> = ops.difference(&covered).collect();
    assert!(missing.is_empty(), "ops not covered: {missing:?}");

    // core-f32 vs core-f64: within the default bound or an explained one,
    // on every op, and bitwise repeatable.
    let mut bad = Vec::new();
    for r in &report.rows {
        assert!(r.ref_bitwise, "{}: core-f64 not repeatable", r.op);
        let c = &r.cells[&Backend::CoreF32];
        assert!(c.ran > 0, "{}: core-f32 did not run", r.op);
        assert!(c.stats.compared > 0, "{}: nothing compared", r.op);
        if let Err(why) = verdict(&r.op, Backend::CoreF32, c) {
            bad.push(format!("{}: {why}", r.op));
        }
    }
    assert!(bad.is_empty(), "core-f32 over bound:\n{}", bad.join("\n"));
    // The burn backends: whatever runs on them is within bound too.
    let problems: Vec<_> = report
        .problems()
        .into_iter()
        .filter(|p| !p.contains("[core-f32]"))
        .collect();
    assert!(problems.is_empty(), "problems:\n{}", problems.join("\n"));
}

/// The comparison is not a tautology: a perturbed output is caught, and a
/// discrete output that differs counts as a flip.
#[test]
fn comparison_detects_errors() {
    let file = VectorFile::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors/verl.policy_loss.json"),
    )
    .expect("file");
    let template = &file.cases[0];
    let case = synth(&file.op, template, Scale::Small, 7).expect("synth");
    let RunOutcome::Done(first) =
        posttrain_conformance::report::run_on(Backend::CoreF64, &file.op, &case)
    else {
        panic!("core-f64 must run the synthesised case")
    };
    let lens: BTreeMap<String, usize> = first
        .values
        .iter()
        .map(|(k, v)| (k.clone(), v.len()))
        .collect();
    let case = with_cotangents(case, template, &lens, 7);
    let RunOutcome::Done(reference) =
        posttrain_conformance::report::run_on(Backend::CoreF64, &file.op, &case)
    else {
        panic!("core-f64 with VJP")
    };
    assert!(
        !reference.grads.is_empty(),
        "the VJP must produce gradients"
    );
    // Realistic shape: [8, 64] tokens at small scale.
    assert_eq!(case.inputs["log_prob"].shape, vec![9, 66]);
    let mut bumped = reference.clone();
    let g = bumped.grads.values_mut().next().expect("a gradient");
    let i = (0..g.len())
        .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
        .expect("a gradient entry");
    assert!(g[i].abs() > 1e-3, "the largest gradient entry is {}", g[i]);
    g[i] *= 1.0 + 1e-3;
    let s = compare(&bumped, &reference, &BTreeSet::new(), "bumped");
    assert!(s.max_rel > DEFAULT_REL, "a 1e-3 bump must be seen: {s:?}");
    let s = compare(&reference, &reference, &BTreeSet::new(), "same");
    assert_eq!(s.max_rel, 0.0);
    let mut flipped = reference.clone();
    let (name, v) = flipped.values.iter_mut().next().expect("an output");
    v[0] += 1.0;
    let discrete: BTreeSet<String> = [name.clone()].into();
    assert_eq!(compare(&flipped, &reference, &discrete, "flip").flips, 1);
}
