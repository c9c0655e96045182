//! The `posttrain-vectors/1` file format (see `SPEC.md` of the vectors).

use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// One vector file: an op and its cases.
#[derive(Debug, Clone, Deserialize)]
pub struct VectorFile {
    /// `posttrain-vectors/1`.
    pub format: String,
    /// `<peer>.<op>`.
    pub op: String,
    /// Where the expected values came from.
    #[serde(default)]
    pub source: Value,
    /// File-level tolerances per precision.
    #[serde(default)]
    pub tolerance: BTreeMap<String, Tolerance>,
    /// The cases.
    pub cases: Vec<Case>,
}

/// `|got − want| ≤ abs + rel·|want|` (or both NaN, or the same infinity).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
pub struct Tolerance {
    /// Absolute part.
    pub abs: f64,
    /// Relative part.
    pub rel: f64,
}

impl Tolerance {
    /// Whether `got` matches `want` under this tolerance.
    pub fn matches(&self, got: f64, want: f64) -> bool {
        if want.is_nan() || got.is_nan() {
            return want.is_nan() && got.is_nan();
        }
        if want.is_infinite() || got.is_infinite() {
            return want == got;
        }
        (got - want).abs() <= self.abs + self.rel * want.abs()
    }
}

/// A tensor as stored: dtype, shape, flat row-major data.
#[derive(Debug, Clone, Deserialize)]
pub struct RawTensor {
    /// `f64`, `i64` or `bool`.
    pub dtype: String,
    /// The shape (`[]` for a scalar).
    pub shape: Vec<usize>,
    /// The data (numbers, or `"nan"`, `"inf"`, `"-inf"`).
    pub data: Vec<Value>,
}

impl RawTensor {
    /// The data as `f64` (bools as 0/1).
    pub fn to_f64(&self) -> Result<Vec<f64>, String> {
        self.data.iter().map(value_to_f64).collect()
    }
}

/// Parses a JSON number or one of the strings `nan`, `inf`, `-inf`.
pub fn value_to_f64(v: &Value) -> Result<f64, String> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("bad number {n}")),
        Value::Bool(b) => Ok(if *b { 1.0 } else { 0.0 }),
        Value::String(s) => match s.as_str() {
            "nan" | "NaN" => Ok(f64::NAN),
            "inf" | "Infinity" => Ok(f64::INFINITY),
            "-inf" | "-Infinity" => Ok(f64::NEG_INFINITY),
            _ => Err(format!("bad float string {s:?}")),
        },
        other => Err(format!("not a number: {other}")),
    }
}

/// The `vjp` block of a case.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Vjp {
    /// Cotangent per output.
    #[serde(default)]
    pub cotangents: BTreeMap<String, RawTensor>,
    /// Expected gradient per input: tensors, or (edge files) a list of names.
    #[serde(default)]
    pub grads: Value,
}

/// One case.
#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    /// Unique name within the file.
    pub name: String,
    /// The op's configuration, named as the peer names it.
    #[serde(default)]
    pub params: Map<String, Value>,
    /// Input tensors.
    #[serde(default)]
    pub inputs: BTreeMap<String, RawTensor>,
    /// Expected outputs: tensors, or (edge files) a list of names.
    #[serde(default)]
    pub outputs: Value,
    /// Optional VJP check.
    #[serde(default)]
    pub vjp: Option<Vjp>,
    /// Per-case tolerance overrides.
    #[serde(default)]
    pub tolerance: BTreeMap<String, Tolerance>,
    /// Edge contract: `finite`, `zero` or `error`.
    #[serde(default)]
    pub expect: Option<String>,
}

impl VectorFile {
    /// Reads and parses one file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let f: VectorFile =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if f.format != "posttrain-vectors/1" {
            return Err(format!("{}: unknown format {:?}", path.display(), f.format));
        }
        Ok(f)
    }
}

/// Expands files and folders to the sorted list of `*.json` vector files.
pub fn collect_files(paths: &[std::path::PathBuf]) -> Result<Vec<std::path::PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let rd = std::fs::read_dir(p).map_err(|e| format!("{}: {e}", p.display()))?;
            let mut v: Vec<_> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            v.sort();
            out.extend(v);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            return Err(format!("{}: no such file or folder", p.display()));
        }
    }
    Ok(out)
}
