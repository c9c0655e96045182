//! `posttrain-conformance run --backend core-f64,core-f32 PATH...`
//! `posttrain-conformance report --backend all --scale full --out PATH [VECTORS...]`

use posttrain_conformance::{run_files, vector::collect_files, Backend};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str =
    "usage: posttrain-conformance run [--backend LIST] [--filter SUBSTR]... [--verbose] PATH...

  --backend LIST   comma-separated backends (default: core-f64,core-f32; `all` = every compiled one)
  --filter SUBSTR  only ops, files or cases containing SUBSTR (repeatable)
  --verbose        print every op line, not only failing or skipping ones
  PATH             vector files or folders of them

usage: posttrain-conformance report [--backend LIST] [--scale small|full] [--out FILE]
                                    [--filter SUBSTR]... [--max-variants N] [--seed N]
                                    [--no-reduced] [PATH...]

  Runs every op on seeded random inputs of realistic shapes on every backend and
  writes a markdown report of the errors vs core-f64, pairwise differences and
  bitwise repeatability (see posttrain_conformance::report). Exits 1 when an op
  exceeds its bound without an explanation.
  --backend LIST    default: all (every compiled backend)
  --scale           small (tokens [8,64], logits [2,16,512]) or full (default:
                    tokens [64,1024], logits [2,64,32000])
  --out FILE        the markdown file (default: stdout)
  --max-variants N  at most N parameter sets per op
  --no-reduced      skip the f16/bf16 rounded-input rows
  PATH              vector files or folders (default: conformance/vectors)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("report") {
        return report(&args[1..]);
    }
    if args.first().map(String::as_str) != Some("run") {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let mut backends = vec![Backend::CoreF64, Backend::CoreF32];
    let mut filter = Vec::new();
    let mut paths = Vec::new();
    let mut verbose = false;
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--backend" => match it.next().map(|s| Backend::parse_list(s)) {
                Some(Ok(b)) => backends = b,
                Some(Err(e)) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
                None => {
                    eprintln!("error: --backend needs a value\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--filter" => match it.next() {
                Some(f) => filter.push(f.clone()),
                None => {
                    eprintln!("error: --filter needs a value");
                    return ExitCode::from(2);
                }
            },
            "--verbose" | "-v" => verbose = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            p => paths.push(PathBuf::from(p)),
        }
    }
    if paths.is_empty() {
        eprintln!("error: no vector path given\n{USAGE}");
        return ExitCode::from(2);
    }
    let files = match collect_files(&paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let summary = match run_files(&files, &backends, &filter) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let report = summary.report();
    for line in report.lines() {
        if verbose || !line.starts_with("ok ") {
            println!("{line}");
        }
    }
    if summary.totals().1 > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn report(args: &[String]) -> ExitCode {
    use posttrain_conformance::report::{generate, Options, Scale};
    let mut opts = Options {
        scale: Scale::Full,
        ..Options::default()
    };
    let mut out: Option<PathBuf> = None;
    let mut paths = Vec::new();
    let mut it = args.iter();
    let fail = |msg: String| {
        eprintln!("error: {msg}\n{USAGE}");
        ExitCode::from(2)
    };
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let r: Result<(), String> = match a.as_str() {
            "--backend" => value("--backend")
                .and_then(|v| Backend::parse_list(&v))
                .map(|b| opts.backends = b),
            "--scale" => value("--scale")
                .and_then(|v| Scale::parse(&v))
                .map(|s| opts.scale = s),
            "--out" => value("--out").map(|v| out = Some(PathBuf::from(v))),
            "--filter" => value("--filter").map(|v| opts.filter.push(v)),
            "--max-variants" => value("--max-variants").and_then(|v| {
                v.parse()
                    .map(|n| opts.max_variants = Some(n))
                    .map_err(|e| format!("--max-variants: {e}"))
            }),
            "--seed" => value("--seed").and_then(|v| {
                v.parse()
                    .map(|n| opts.seed = n)
                    .map_err(|e| format!("--seed: {e}"))
            }),
            "--no-reduced" => {
                opts.reduced = false;
                Ok(())
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            p => {
                paths.push(PathBuf::from(p));
                Ok(())
            }
        };
        if let Err(e) = r {
            return fail(e);
        }
    }
    if paths.is_empty() {
        paths.push(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/vectors"
        )));
    }
    let files = match collect_files(&paths) {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let report = generate(&files, &opts, |row| {
        eprintln!(
            "{:60} {:>3}/{:<3} variants, core-f64 {:.2}s{}",
            row.op,
            row.variants.0,
            row.variants.1,
            row.ref_secs,
            row.cells
                .iter()
                .map(|(b, c)| format!(", {} {:.1e} ({:.2}s)", b.name(), c.stats.max_rel, c.secs))
                .collect::<String>()
        );
    });
    let report = match report {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let md = report.markdown();
    match &out {
        Some(p) => {
            if let Err(e) = std::fs::write(p, &md) {
                eprintln!("error: {}: {e}", p.display());
                return ExitCode::from(2);
            }
        }
        None => print!("{md}"),
    }
    for p in report.problems() {
        eprintln!("problem: {p}");
    }
    println!("{}", report.summary_line());
    if report.problems().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
