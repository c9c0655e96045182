//! `posttrain-conformance run --backend core-f64,core-f32 PATH...`

use posttrain_conformance::{run_files, vector::collect_files, Backend};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str =
    "usage: posttrain-conformance run [--backend LIST] [--filter SUBSTR]... [--verbose] PATH...

  --backend LIST   comma-separated backends (default: core-f64,core-f32; `all` = every compiled one)
  --filter SUBSTR  only ops, files or cases containing SUBSTR (repeatable)
  --verbose        print every op line, not only failing or skipping ones
  PATH             vector files or folders of them";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
