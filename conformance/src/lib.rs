//! # posttrain-conformance
//!
//! Runs the golden vectors (`posttrain-vectors/1` files, produced by running
//! TRL, verl, OpenRLHF and torchtune in float64) against posttrain backends
//! and reports, per op and backend, how many cases passed, failed or were
//! skipped, ending with the line `N passed, M failed, K skipped`.
//!
//! * [`vector`] — the file format;
//! * [`case`] — what an op handler reads ([`case::Ctx`]) and returns
//!   ([`case::Outputs`]);
//! * [`ops`] — one handler module per op family, mapping a peer op and its
//!   parameters onto posttrain-core;
//! * [`hostile`] — the hostile-input contract behind the fuzz targets;
//! * [`run_files`] — the engine: run, compare at the precision's tolerance,
//!   check the `edge` contracts (`finite`, `zero`, `error`).
//!
//! A backend is a float type the core runs in: `core-f64` and `core-f32`
//! (inputs rounded to f32 — exact, since every vector input is representable
//! in f32 — computed in f32, compared at the `f32` tolerance). With the
//! features `burn`, `wgpu` and `tch`, the backends `burn-ndarray`,
//! `burn-wgpu` and `burn-tch` run every op through posttrain-burn on that
//! burn device (f32 tensors, `f32` tolerance).

pub mod case;
pub mod hostile;
pub mod ops;
pub mod report;
pub mod vector;

use case::{Ctx, Fail, OpResult, Outputs};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use vector::{Case, Tolerance, VectorFile};

/// A backend the runner can execute cases on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Backend {
    /// posttrain-core in `f64`.
    CoreF64,
    /// posttrain-core in `f32`.
    CoreF32,
    /// posttrain-burn on burn's ndarray device (f32 tensors). Feature `burn`.
    #[cfg(feature = "burn")]
    BurnNdarray,
    /// posttrain-burn on burn's wgpu device (f32 tensors; lavapipe on a
    /// machine without a GPU). Feature `wgpu`.
    #[cfg(feature = "wgpu")]
    BurnWgpu,
    /// posttrain-burn on libtorch (f32 tensors; the device
    /// `posttrain_burn::device_for(BackendKind::Tch)` picks). Feature `tch`.
    #[cfg(feature = "tch")]
    BurnTch,
}

impl Backend {
    /// Every backend compiled into this binary.
    pub const ALL: &'static [Backend] = &[
        Backend::CoreF64,
        Backend::CoreF32,
        #[cfg(feature = "burn")]
        Backend::BurnNdarray,
        #[cfg(feature = "wgpu")]
        Backend::BurnWgpu,
        #[cfg(feature = "tch")]
        Backend::BurnTch,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Backend::CoreF64 => "core-f64",
            Backend::CoreF32 => "core-f32",
            #[cfg(feature = "burn")]
            Backend::BurnNdarray => "burn-ndarray",
            #[cfg(feature = "wgpu")]
            Backend::BurnWgpu => "burn-wgpu",
            #[cfg(feature = "tch")]
            Backend::BurnTch => "burn-tch",
        }
    }

    /// The burn backend this runner backend drives, if it is a burn one.
    #[cfg(feature = "burn")]
    pub fn burn_kind(self) -> Option<posttrain_burn::BackendKind> {
        use posttrain_burn::BackendKind;
        match self {
            Backend::CoreF64 | Backend::CoreF32 => None,
            Backend::BurnNdarray => Some(BackendKind::NdArray),
            #[cfg(feature = "wgpu")]
            Backend::BurnWgpu => Some(BackendKind::Wgpu),
            #[cfg(feature = "tch")]
            Backend::BurnTch => Some(BackendKind::Tch),
        }
    }

    /// The tolerance key (`f64` or `f32`).
    pub fn precision(self) -> &'static str {
        match self {
            Backend::CoreF64 => "f64",
            _ => "f32",
        }
    }

    /// Parses a comma-separated list (`all` = every compiled backend).
    pub fn parse_list(s: &str) -> Result<Vec<Backend>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "all" {
                out.extend_from_slice(Self::ALL);
                continue;
            }
            match Self::ALL.iter().find(|b| b.name() == part) {
                Some(b) => out.push(*b),
                None => {
                    let known: Vec<_> = Self::ALL.iter().map(|b| b.name()).collect();
                    return Err(format!(
                        "unknown backend {part:?}; compiled backends: {} \
                         (burn-ndarray needs the feature `burn`, burn-wgpu `wgpu`, burn-tch `tch`)",
                        known.join(", ")
                    ));
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Runs `op` on this backend (`None` when no handler knows the op).
    pub fn run(self, op: &str, ctx: &Ctx) -> Option<OpResult> {
        match self {
            Backend::CoreF64 => ops::dispatch::<f64>(op, ctx),
            Backend::CoreF32 => ops::dispatch::<f32>(op, ctx),
            #[cfg(feature = "burn")]
            _ => ops::burn::run(self.burn_kind()?, op, ctx),
        }
    }
}

/// The verdict on one case.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every output and gradient matched (or the edge contract held).
    Pass,
    /// Something did not match; the reason names output, index, got and want.
    Fail(String),
    /// Unsupported op or parameter value.
    Skip(String),
}

/// Counts per op and backend, plus failure details.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// `(op, backend)` → `[passed, failed, skipped]`.
    pub per_op: BTreeMap<(String, &'static str), [usize; 3]>,
    /// One line per failed case.
    pub failures: Vec<String>,
    /// Skip reasons, deduplicated per op.
    pub skips: BTreeMap<String, Vec<String>>,
}

impl Summary {
    /// `(passed, failed, skipped)` over everything.
    pub fn totals(&self) -> (usize, usize, usize) {
        self.per_op
            .values()
            .fold((0, 0, 0), |a, c| (a.0 + c[0], a.1 + c[1], a.2 + c[2]))
    }

    /// The final line: `N passed, M failed, K skipped`.
    pub fn last_line(&self) -> String {
        let (p, f, s) = self.totals();
        format!("{p} passed, {f} failed, {s} skipped")
    }

    /// The per-op report, failures, skips and the final line.
    pub fn report(&self) -> String {
        let mut s = String::new();
        for ((op, be), [p, f, k]) in &self.per_op {
            let flag = if *f > 0 {
                "FAIL"
            } else if *k > 0 {
                "skip"
            } else {
                "ok"
            };
            let _ = writeln!(
                s,
                "{flag:4} {op} [{be}]: {p} passed, {f} failed, {k} skipped"
            );
        }
        if !self.failures.is_empty() {
            let _ = writeln!(s, "\nfailures:");
            for f in &self.failures {
                let _ = writeln!(s, "  {f}");
            }
        }
        if !self.skips.is_empty() {
            let _ = writeln!(s, "\nskipped:");
            for (op, reasons) in &self.skips {
                let _ = writeln!(s, "  {op}: {}", reasons.join("; "));
            }
        }
        let _ = writeln!(s, "{}", self.last_line());
        s
    }
}

fn tolerance_for(file: &VectorFile, case: &Case, precision: &str) -> Tolerance {
    case.tolerance
        .get(precision)
        .or_else(|| file.tolerance.get(precision))
        .copied()
        .unwrap_or(if precision == "f64" {
            Tolerance {
                abs: 1e-12,
                rel: 1e-9,
            }
        } else {
            Tolerance {
                abs: 1e-5,
                rel: 1e-4,
            }
        })
}

fn compare(
    kind: &str,
    name: &str,
    got: &[f64],
    want: &vector::RawTensor,
    tol: Tolerance,
) -> Result<(), String> {
    let want_v = want.to_f64()?;
    if got.len() != want_v.len() {
        return Err(format!(
            "{kind} `{name}`: got {} elements, want {}",
            got.len(),
            want_v.len()
        ));
    }
    let exact = want.dtype == "i64" || want.dtype == "bool";
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(&want_v).enumerate() {
        let ok = if exact { g == w } else { tol.matches(g, w) };
        if !ok {
            let err = if g.is_finite() && w.is_finite() {
                (g - w).abs()
            } else {
                f64::INFINITY
            };
            if worst.is_none_or(|(_, e)| err > e) {
                worst = Some((i, err));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, _)) => Err(format!(
            "{kind} `{name}`[{i}]: got {:e}, want {:e} (tol abs {:e} rel {:e}{})",
            got[i],
            want_v[i],
            tol.abs,
            tol.rel,
            if exact { ", exact" } else { "" }
        )),
    }
}

fn names(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        Value::Object(m) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// Runs one case on one backend and judges it.
pub fn judge(file: &VectorFile, case: &Case, backend: Backend) -> Verdict {
    let ctx = Ctx::new(case);
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend.run(&file.op, &ctx)));
    let result = match result {
        Ok(Some(r)) => r,
        Ok(None) => return Verdict::Skip(format!("op {} not supported", file.op)),
        Err(_) => return Verdict::Fail("the handler panicked".into()),
    };
    if let Some(expect) = &case.expect {
        return judge_edge(expect, case, result);
    }
    let out: Outputs = match result {
        Ok(o) => o,
        Err(Fail::Skip(r)) => return Verdict::Skip(r),
        Err(Fail::Op(e)) => return Verdict::Fail(format!("op error: {e}")),
        Err(Fail::Harness(e)) => return Verdict::Fail(format!("harness: {e}")),
    };
    let tol = tolerance_for(file, case, backend.precision());
    if let Value::Object(m) = &case.outputs {
        for (name, want) in m {
            let want: vector::RawTensor = match serde_json::from_value(want.clone()) {
                Ok(t) => t,
                Err(e) => return Verdict::Fail(format!("bad expected output `{name}`: {e}")),
            };
            match out.values.get(name) {
                None => return Verdict::Fail(format!("output `{name}` not produced")),
                Some(got) => {
                    if let Err(e) = compare("output", name, got, &want, tol) {
                        return Verdict::Fail(e);
                    }
                }
            }
        }
    }
    if let Some(vjp) = &case.vjp {
        if let Value::Object(m) = &vjp.grads {
            for (name, want) in m {
                let want: vector::RawTensor = match serde_json::from_value(want.clone()) {
                    Ok(t) => t,
                    Err(e) => return Verdict::Fail(format!("bad expected grad `{name}`: {e}")),
                };
                match out.grads.get(name) {
                    None => return Verdict::Fail(format!("gradient wrt `{name}` not produced")),
                    Some(got) => {
                        if let Err(e) = compare("grad", name, got, &want, tol) {
                            return Verdict::Fail(e);
                        }
                    }
                }
            }
        }
    }
    Verdict::Pass
}

fn judge_edge(expect: &str, case: &Case, result: OpResult) -> Verdict {
    match (expect, result) {
        (_, Err(Fail::Skip(r))) => Verdict::Skip(r),
        (_, Err(Fail::Harness(e))) => Verdict::Fail(format!("harness: {e}")),
        ("error", Err(Fail::Op(_))) => Verdict::Pass,
        ("error", Ok(_)) => Verdict::Fail("expected a typed error, got outputs".into()),
        (_, Err(Fail::Op(e))) => Verdict::Fail(format!("expected {expect}, got op error: {e}")),
        (contract @ ("finite" | "zero"), Ok(out)) => {
            let grads = case
                .vjp
                .as_ref()
                .map(|v| names(&v.grads))
                .unwrap_or_default();
            let checks = names(&case.outputs)
                .into_iter()
                .map(|n| ("output", out.values.get(&n), n))
                .chain(grads.into_iter().map(|n| ("grad", out.grads.get(&n), n)));
            for (kind, got, name) in checks {
                let Some(got) = got else {
                    return Verdict::Fail(format!("{kind} `{name}` not produced"));
                };
                for (i, &g) in got.iter().enumerate() {
                    let bad = if contract == "zero" {
                        g != 0.0
                    } else {
                        !g.is_finite()
                    };
                    if bad {
                        return Verdict::Fail(format!(
                            "{kind} `{name}`[{i}] = {g:e} breaks the `{contract}` contract"
                        ));
                    }
                }
            }
            Verdict::Pass
        }
        (other, _) => Verdict::Skip(format!("unknown edge contract {other:?}")),
    }
}

/// Runs every case of every file on every backend; `filter` keeps ops or
/// case names containing any of its substrings (all when empty).
pub fn run_files(
    files: &[PathBuf],
    backends: &[Backend],
    filter: &[String],
) -> Result<Summary, String> {
    let mut summary = Summary::default();
    for path in files {
        let file = VectorFile::load(path)?;
        run_file(path, &file, backends, filter, &mut summary);
    }
    Ok(summary)
}

fn run_file(
    path: &Path,
    file: &VectorFile,
    backends: &[Backend],
    filter: &[String],
    summary: &mut Summary,
) {
    let fname = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    for case in &file.cases {
        if !filter.is_empty()
            && !filter.iter().any(|f| {
                file.op.contains(f.as_str())
                    || case.name.contains(f.as_str())
                    || fname.contains(f.as_str())
            })
        {
            continue;
        }
        for &be in backends {
            let counts = summary
                .per_op
                .entry((file.op.clone(), be.name()))
                .or_default();
            match judge(file, case, be) {
                Verdict::Pass => counts[0] += 1,
                Verdict::Fail(why) => {
                    counts[1] += 1;
                    summary.failures.push(format!(
                        "{fname} :: {} [{}]: {why}",
                        case.name,
                        be.name()
                    ));
                }
                Verdict::Skip(why) => {
                    counts[2] += 1;
                    let v = summary.skips.entry(file.op.clone()).or_default();
                    if !v.contains(&why) {
                        v.push(why);
                    }
                }
            }
        }
    }
}
