//! The core's own API from Python: every op under its Rust path
//! (`policy::token::policy_loss`, `advantage::group_zscore_advantages`, …),
//! its configs under their Rust type names with the Rust field names, and the
//! presets of their `preset(...)` constructors.
//!
//! Three pieces:
//!
//! * **Configs** ([`core_config`]): `ClipConfig`, `KlConfig`,
//!   `GroupNormConfig`, `PairedConfig`, … built the way Rust builds them
//!   (the type's `preset(Preset, …)` constructor, or its `Default`, or the
//!   fields given), then the caller's fields laid over, then validated, and
//!   handed to Python as the serde form of the Rust value (a dict with the
//!   Rust field names; enums as their serde tags, e.g. `{"Ppo": {...}}`,
//!   `"seq-mean-token-mean"`). Any dict of that form is accepted where an op
//!   takes that config, so a config can be written by hand, stored as JSON or
//!   built by [`core_config`].
//! * **Ops** ([`core_op`]): each [`OpDef`] names its Rust path, its
//!   parameters (configs and scalars, JSON) and its array inputs; the inputs
//!   are read **in place** from the caller's contiguous NumPy buffers (f32 or
//!   f64 for reals, `bool` masks, `int64` indices), the core runs with the GIL
//!   released, and the outputs, metrics and closed-form gradients come back
//!   as new arrays.
//! * **The catalogue** ([`core_spec`]): every op's and config's description
//!   as JSON, from which the Python side builds `posttrain.ops.core`.
//!
//! Errors: a missing or mistyped input, an unknown parameter and every error
//! of the core come back as `ValueError` with a message that names the op and
//! the input or field.

use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use posttrain_core::{Dims, Error, Preset, Real};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

use crate::core_ops;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a core call failed: the core's own error, or a problem with what the
/// caller passed (named input missing, wrong kind, bad parameter).
#[derive(Debug)]
pub(crate) enum CallError {
    Core(Error),
    Msg(String),
}

impl From<Error> for CallError {
    fn from(e: Error) -> Self {
        CallError::Core(e)
    }
}

impl From<String> for CallError {
    fn from(m: String) -> Self {
        CallError::Msg(m)
    }
}

pub(crate) type CallResult<T> = Result<T, CallError>;

// ---------------------------------------------------------------------------
// Array views
// ---------------------------------------------------------------------------

/// One input array, borrowed from the caller's buffer.
#[derive(Clone, Copy)]
pub(crate) enum View<'a> {
    F64(&'a [f64]),
    F32(&'a [f32]),
    Bool(&'a [bool]),
    I64(&'a [i64]),
}

impl View<'_> {
    fn kind(&self) -> &'static str {
        match self {
            View::F64(_) => "float64",
            View::F32(_) => "float32",
            View::Bool(_) => "bool",
            View::I64(_) => "int64",
        }
    }
}

/// The element types the core computes in, with the view they read.
pub(crate) trait CoreReal: Real + numpy::Element + Send + Sync {
    const NAME: &'static str;
    fn view<'a>(v: &View<'a>) -> Option<&'a [Self]>;
}

impl CoreReal for f64 {
    const NAME: &'static str = "float64";
    fn view<'a>(v: &View<'a>) -> Option<&'a [f64]> {
        match *v {
            View::F64(s) => Some(s),
            _ => None,
        }
    }
}

impl CoreReal for f32 {
    const NAME: &'static str = "float32";
    fn view<'a>(v: &View<'a>) -> Option<&'a [f32]> {
        match *v {
            View::F32(s) => Some(s),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// One call
// ---------------------------------------------------------------------------

/// A flat result array with its shape.
pub(crate) struct OutArray<F> {
    pub data: Vec<F>,
    pub shape: Vec<usize>,
}

/// What an op reads and writes: its parameters, inputs and cotangents, and
/// the outputs, metrics and gradients it produces.
pub(crate) struct Call<'a, F> {
    op: &'static str,
    params: &'a Map<String, Value>,
    inputs: &'a BTreeMap<String, (View<'a>, Vec<usize>)>,
    cotangents: &'a BTreeMap<String, (View<'a>, Vec<usize>)>,
    pub(crate) outputs: Vec<(String, OutArray<F>)>,
    pub(crate) ints: Vec<(String, OutArray<i64>)>,
    pub(crate) bools: Vec<(String, OutArray<bool>)>,
    pub(crate) metrics: Vec<(String, f64)>,
    pub(crate) grads: Vec<(String, OutArray<F>)>,
}

// Not every op reads or writes every kind of array.
#[allow(dead_code)]
impl<'a, F: CoreReal> Call<'a, F> {
    fn err(&self, m: impl core::fmt::Display) -> CallError {
        CallError::Msg(format!("{}: {m}", self.op))
    }

    /// A required real array (the call's precision) and its shape.
    pub fn real(&self, name: &str) -> CallResult<(&'a [F], &'a [usize])> {
        self.opt_real(name)?
            .ok_or_else(|| self.err(format_args!("missing input `{name}`")))
    }

    /// An optional real array.
    pub fn opt_real(&self, name: &str) -> CallResult<Option<(&'a [F], &'a [usize])>> {
        match self.inputs.get(name) {
            None => Ok(None),
            Some((v, shape)) => match F::view(v) {
                Some(s) => Ok(Some((s, shape.as_slice()))),
                None => Err(self.err(format_args!(
                    "input `{name}` is {}, the call computes in {}",
                    v.kind(),
                    F::NAME
                ))),
            },
        }
    }

    /// A required boolean mask.
    pub fn mask(&self, name: &str) -> CallResult<(&'a [bool], &'a [usize])> {
        self.opt_mask(name)?
            .ok_or_else(|| self.err(format_args!("missing input `{name}`")))
    }

    /// An optional boolean mask.
    pub fn opt_mask(&self, name: &str) -> CallResult<Option<(&'a [bool], &'a [usize])>> {
        match self.inputs.get(name) {
            None => Ok(None),
            Some((View::Bool(s), shape)) => Ok(Some((s, shape.as_slice()))),
            Some((v, _)) => Err(self.err(format_args!(
                "input `{name}` must be a bool mask, got {}",
                v.kind()
            ))),
        }
    }

    /// A required int64 array (indices, group ids, token ids).
    pub fn index(&self, name: &str) -> CallResult<(&'a [i64], &'a [usize])> {
        self.opt_index(name)?
            .ok_or_else(|| self.err(format_args!("missing input `{name}`")))
    }

    /// An optional int64 array.
    pub fn opt_index(&self, name: &str) -> CallResult<Option<(&'a [i64], &'a [usize])>> {
        match self.inputs.get(name) {
            None => Ok(None),
            Some((View::I64(s), shape)) => Ok(Some((s, shape.as_slice()))),
            Some((v, _)) => Err(self.err(format_args!(
                "input `{name}` must be an int64 array, got {}",
                v.kind()
            ))),
        }
    }

    /// `Dims` of a 2-D input `[batch, seq]` (a 1-D input is one row).
    pub fn dims_of(&self, name: &str) -> CallResult<Dims> {
        let shape = match self.inputs.get(name) {
            Some((_, s)) => s,
            None => return Err(self.err(format_args!("missing input `{name}`"))),
        };
        match shape.as_slice() {
            [b, t] => Ok(Dims::new(*b, *t)),
            [t] => Ok(Dims::new(1, *t)),
            other => Err(self.err(format_args!(
                "input `{name}` must be [batch, seq], got shape {other:?}"
            ))),
        }
    }

    /// A parameter deserialized from its JSON (configs in their serde form,
    /// scalars, strings); `None` when not given.
    pub fn opt_param<T: DeserializeOwned>(&self, name: &str) -> CallResult<Option<T>> {
        match self.params.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
                self.err(format_args!(
                    "parameter `{name}`: {e} (got {v}; ops.core.config() builds configs)"
                ))
            }),
        }
    }

    /// A required parameter.
    pub fn param<T: DeserializeOwned>(&self, name: &str) -> CallResult<T> {
        self.opt_param(name)?
            .ok_or_else(|| self.err(format_args!("missing parameter `{name}`")))
    }

    /// A parameter with a default.
    pub fn param_or<T: DeserializeOwned>(&self, name: &str, default: T) -> CallResult<T> {
        Ok(self.opt_param(name)?.unwrap_or(default))
    }

    /// The scalar cotangent of output `name` (present when the caller asked
    /// for gradients of it).
    pub fn cot_scalar(&self, name: &str) -> CallResult<Option<F>> {
        match self.cotangents.get(name) {
            None => Ok(None),
            Some((v, _)) => match F::view(v) {
                Some([c]) => Ok(Some(*c)),
                Some(s) => Err(self.err(format_args!(
                    "cotangent of `{name}` must be a scalar, got {} values",
                    s.len()
                ))),
                None => Err(self.err(format_args!(
                    "cotangent of `{name}` is {}, the call computes in {}",
                    v.kind(),
                    F::NAME
                ))),
            },
        }
    }

    /// The array cotangent of output `name`.
    pub fn cot(&self, name: &str) -> CallResult<Option<&'a [F]>> {
        match self.cotangents.get(name) {
            None => Ok(None),
            Some((v, _)) => F::view(v).map(Some).ok_or_else(|| {
                self.err(format_args!(
                    "cotangent of `{name}` is {}, the call computes in {}",
                    v.kind(),
                    F::NAME
                ))
            }),
        }
    }

    /// Whether any cotangent was given (the caller wants gradients).
    pub fn wants_grads(&self) -> bool {
        !self.cotangents.is_empty()
    }

    /// Records an output array.
    pub fn output(&mut self, name: &str, data: Vec<F>, shape: &[usize]) {
        self.outputs.push((
            name.to_string(),
            OutArray {
                data,
                shape: shape.to_vec(),
            },
        ));
    }

    /// Records a scalar output (a 0-d array).
    pub fn scalar(&mut self, name: &str, v: F) {
        self.output(name, vec![v], &[]);
    }

    /// Records an int64 output array.
    pub fn output_index(&mut self, name: &str, data: Vec<i64>, shape: &[usize]) {
        self.ints.push((
            name.to_string(),
            OutArray {
                data,
                shape: shape.to_vec(),
            },
        ));
    }

    /// Records a bool output array.
    pub fn output_mask(&mut self, name: &str, data: Vec<bool>, shape: &[usize]) {
        self.bools.push((
            name.to_string(),
            OutArray {
                data,
                shape: shape.to_vec(),
            },
        ));
    }

    /// Records a metric (a Python float).
    pub fn metric(&mut self, name: &str, v: f64) {
        self.metrics.push((name.to_string(), v));
    }

    /// Records the gradient of input `name` (shaped like that input).
    pub fn grad(&mut self, name: &str, data: Vec<F>) {
        let shape = self
            .inputs
            .get(name)
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| vec![data.len()]);
        self.grads
            .push((name.to_string(), OutArray { data, shape }));
    }
}

// ---------------------------------------------------------------------------
// The op registry
// ---------------------------------------------------------------------------

/// The kind of an array input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Floating point in the call's precision (f32 or f64).
    Real,
    /// `bool`.
    Mask,
    /// `int64`.
    Index,
}

/// One array input of an op.
pub(crate) struct Input {
    pub name: &'static str,
    pub kind: Kind,
    pub optional: bool,
    /// Shape and meaning, e.g. `"[B, T] log π of the taken tokens"`.
    pub doc: &'static str,
}

/// One parameter of an op (JSON: a config in its serde form, a scalar, an
/// enum tag).
pub(crate) struct Param {
    pub name: &'static str,
    /// The Rust type, e.g. `"PolicyLoss"`, `"AggMode"`, `"f64"`,
    /// `"Option<GlobalNorm>"`.
    pub ty: &'static str,
    /// What it is and its default when optional.
    pub doc: &'static str,
}

/// One core op as Python sees it.
pub(crate) struct OpDef {
    /// The Rust path below `posttrain_core`, e.g. `"policy::token::policy_loss"`.
    pub path: &'static str,
    /// The formula and the peer behaviour (one paragraph).
    pub doc: &'static str,
    pub params: &'static [Param],
    pub inputs: &'static [Input],
    /// Outputs (arrays, scalars and metrics) with a one-line description
    /// each; a scalar output's description contains `(scalar)` (the Python
    /// side's `grad=True` gives it a 0-d unit cotangent, an array output one
    /// of the output's shape).
    pub outputs: &'static [(&'static str, &'static str)],
    /// Outputs with a closed-form VJP (cotangent name → the inputs it
    /// differentiates), e.g. `&[("loss", &["log_prob"])]`.
    pub vjp: &'static [(&'static str, &'static [&'static str])],
    pub run64: for<'a> fn(&mut Call<'a, f64>) -> CallResult<()>,
    pub run32: for<'a> fn(&mut Call<'a, f32>) -> CallResult<()>,
}

/// Declares an [`OpDef`] whose body is a generic `fn run<F: CoreReal>`;
/// an optional input is written `"name": Real opt => "doc"`.
macro_rules! op_def {
    (
        path: $path:literal,
        doc: $doc:expr,
        params: [$($pn:literal : $pt:literal => $pd:literal),* $(,)?],
        inputs: [$($in:literal : $ik:ident $($opt:ident)? => $id:literal),* $(,)?],
        outputs: [$($on:literal => $od:literal),* $(,)?],
        vjp: [$($vn:literal => [$($vi:literal),* $(,)?]),* $(,)?],
        run: $run:ident $(,)?
    ) => {
        $crate::core_api::OpDef {
            path: $path,
            doc: $doc,
            params: &[$($crate::core_api::Param { name: $pn, ty: $pt, doc: $pd }),*],
            inputs: &[$($crate::core_api::Input {
                name: $in,
                kind: $crate::core_api::Kind::$ik,
                optional: op_def!(@opt $($opt)?),
                doc: $id,
            }),*],
            outputs: &[$(($on, $od)),*],
            vjp: &[$(($vn, &[$($vi),*])),*],
            run64: $run::<f64>,
            run32: $run::<f32>,
        }
    };
    (@opt) => { false };
    (@opt opt) => { true };
}
pub(crate) use op_def;

fn registry() -> &'static [OpDef] {
    use std::sync::OnceLock;
    static REG: OnceLock<Vec<OpDef>> = OnceLock::new();
    REG.get_or_init(core_ops::all)
}

// ---------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------

/// How a [`ConfigDef`] builds its base value (see [`ConfigDef::base`]).
pub(crate) type ConfigBase =
    fn(Option<Preset>, &mut Map<String, Value>) -> CallResult<Option<Value>>;

/// One config type Python can build by name.
pub(crate) struct ConfigDef {
    /// The Rust type name, e.g. `"ClipConfig"`.
    pub name: &'static str,
    /// Its Rust path below `posttrain_core`.
    pub path: &'static str,
    pub doc: &'static str,
    /// The arguments its `preset` constructor takes besides the preset
    /// (e.g. `["eps_low", "eps_high"]`); `None`: no preset constructor.
    pub preset_args: Option<&'static [&'static str]>,
    /// Builds the base value: from the preset (consuming its arguments from
    /// `args`) or the type's default; `None` when the type has neither and
    /// every field must be given.
    pub base: ConfigBase,
    /// Deserializes, validates and re-serializes a complete value.
    pub check: fn(Value) -> CallResult<Value>,
}

/// Serializes a config.
pub(crate) fn to_value<T: Serialize>(t: &T) -> CallResult<Value> {
    serde_json::to_value(t).map_err(|e| CallError::Msg(format!("serializing: {e}")))
}

/// Takes a required `f64` argument of a preset constructor out of `args`.
pub(crate) fn take_f64(args: &mut Map<String, Value>, ty: &str, name: &str) -> CallResult<f64> {
    match args.remove(name) {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| CallError::Msg(format!("{ty}: `{name}` must be a number, got {v}"))),
        None => Err(CallError::Msg(format!(
            "{ty}: its preset constructor needs `{name}`"
        ))),
    }
}

/// Takes a required argument of any serde type out of `args`.
pub(crate) fn take<T: DeserializeOwned>(
    args: &mut Map<String, Value>,
    ty: &str,
    name: &str,
) -> CallResult<T> {
    match args.remove(name) {
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| CallError::Msg(format!("{ty}: `{name}`: {e} (got {v})"))),
        None => Err(CallError::Msg(format!(
            "{ty}: its preset constructor needs `{name}`"
        ))),
    }
}

/// Deserialize → validate → serialize, for [`ConfigDef::check`].
pub(crate) fn check_with<T: Serialize + DeserializeOwned>(
    ty: &str,
    v: Value,
    validate: impl Fn(&T) -> Result<(), Error>,
) -> CallResult<Value> {
    let t: T = serde_json::from_value(v.clone())
        .map_err(|e| CallError::Msg(format!("{ty}: {e} (got {v})")))?;
    validate(&t)?;
    to_value(&t)
}

fn config_registry() -> &'static [ConfigDef] {
    use std::sync::OnceLock;
    static REG: OnceLock<Vec<ConfigDef>> = OnceLock::new();
    REG.get_or_init(core_ops::configs)
}

fn build_config(ty: &str, preset: Option<&str>, mut args: Map<String, Value>) -> CallResult<Value> {
    let reg = config_registry();
    // By Rust path (`advantage::RlooConfig`) or, where unambiguous, by
    // type name (`ClipConfig`).
    let found: Vec<&ConfigDef> = match reg.iter().find(|d| d.path == ty) {
        Some(d) => vec![d],
        None => reg.iter().filter(|d| d.name == ty).collect(),
    };
    let def = match found.as_slice() {
        [d] => *d,
        [] => {
            let names: Vec<_> = reg.iter().map(|d| d.name).collect();
            return Err(CallError::Msg(format!(
                "unknown config type `{ty}`; the configs are {}",
                names.join(", ")
            )));
        }
        several => {
            let paths: Vec<_> = several.iter().map(|d| format!("`{}`", d.path)).collect();
            return Err(CallError::Msg(format!(
                "config type `{ty}` is ambiguous: the core has {}; name it by its path",
                paths.join(" and ")
            )));
        }
    };
    let preset = match preset {
        None => None,
        Some(p) => {
            if def.preset_args.is_none() {
                return Err(CallError::Msg(format!(
                    "{ty} has no preset constructor; give its fields"
                )));
            }
            Some(p.parse::<Preset>()?)
        }
    };
    let base = (def.base)(preset, &mut args)?;
    let value = match base {
        Some(Value::Object(mut fields)) => {
            for (k, v) in args {
                if !fields.contains_key(&k) {
                    let known: Vec<_> = fields.keys().map(|k| format!("`{k}`")).collect();
                    return Err(CallError::Msg(format!(
                        "{ty}: unknown field `{k}`; its fields are {}",
                        known.join(", ")
                    )));
                }
                fields.insert(k, v);
            }
            Value::Object(fields)
        }
        Some(other) => {
            if let Some(k) = args.keys().next() {
                return Err(CallError::Msg(format!(
                    "{ty} is not a struct (its value is {other}); `{k}` cannot be set"
                )));
            }
            other
        }
        None => Value::Object(args),
    };
    (def.check)(value)
}

// ---------------------------------------------------------------------------
// Python entry points
// ---------------------------------------------------------------------------

fn py_err(e: CallError) -> PyErr {
    match e {
        CallError::Core(e) => PyValueError::new_err(e.to_string()),
        CallError::Msg(m) => PyValueError::new_err(m),
    }
}

fn parse_object(what: &str, json: &str) -> PyResult<Map<String, Value>> {
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(PyValueError::new_err(format!(
            "{what} must be a JSON object, got {other}"
        ))),
        Err(e) => Err(PyValueError::new_err(format!("{what}: invalid JSON: {e}"))),
    }
}

/// Builds config `ty` (a Rust type name, or its path below `posttrain_core`
/// where two modules define the same name) the way Rust does: from
/// `ty::preset(preset, …)` when `preset` is given (its extra arguments taken
/// from `args_json`), else from its default, else from the fields alone;
/// then lays the remaining fields of `args_json` over it and validates.
/// Returns the config's serde JSON.
#[pyfunction]
#[pyo3(signature = (ty, preset, args_json))]
pub(crate) fn core_config(ty: &str, preset: Option<&str>, args_json: &str) -> PyResult<String> {
    let args = parse_object("config fields", args_json)?;
    let v = build_config(ty, preset, args).map_err(py_err)?;
    Ok(v.to_string())
}

/// Every core op and config, as JSON: `{"ops": [...], "configs": [...]}`.
#[pyfunction]
pub(crate) fn core_spec() -> String {
    let ops: Vec<Value> = registry()
        .iter()
        .map(|d| {
            serde_json::json!({
                "path": d.path,
                "doc": d.doc,
                "params": d.params.iter().map(|p| serde_json::json!({
                    "name": p.name, "type": p.ty, "doc": p.doc,
                })).collect::<Vec<_>>(),
                "inputs": d.inputs.iter().map(|i| serde_json::json!({
                    "name": i.name,
                    "kind": match i.kind { Kind::Real => "real", Kind::Mask => "mask", Kind::Index => "index" },
                    "optional": i.optional,
                    "doc": i.doc,
                })).collect::<Vec<_>>(),
                "outputs": d.outputs.iter().map(|(n, doc)| serde_json::json!({"name": n, "doc": doc})).collect::<Vec<_>>(),
                "vjp": d.vjp.iter().map(|(n, ins)| serde_json::json!({
                    "output": n,
                    "inputs": ins,
                    "scalar": d.outputs.iter().any(|(o, doc)| o == n && doc.contains("(scalar)")),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let configs: Vec<Value> = config_registry()
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name, "path": c.path, "doc": c.doc,
                "preset_args": c.preset_args,
            })
        })
        .collect();
    serde_json::json!({ "ops": ops, "configs": configs }).to_string()
}

/// An input handed over from Python, still borrowed from its array.
enum Held<'py> {
    F64(PyReadonlyArrayDyn<'py, f64>),
    F32(PyReadonlyArrayDyn<'py, f32>),
    Bool(PyReadonlyArrayDyn<'py, bool>),
    I64(PyReadonlyArrayDyn<'py, i64>),
}

impl<'py> Held<'py> {
    fn extract(name: &str, a: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(x) = a.extract::<PyReadonlyArrayDyn<'py, f64>>() {
            return Ok(Held::F64(x));
        }
        if let Ok(x) = a.extract::<PyReadonlyArrayDyn<'py, f32>>() {
            return Ok(Held::F32(x));
        }
        if let Ok(x) = a.extract::<PyReadonlyArrayDyn<'py, bool>>() {
            return Ok(Held::Bool(x));
        }
        if let Ok(x) = a.extract::<PyReadonlyArrayDyn<'py, i64>>() {
            return Ok(Held::I64(x));
        }
        Err(PyValueError::new_err(format!(
            "`{name}` must be a NumPy array of float64, float32, bool or int64"
        )))
    }

    fn view(&self, name: &str) -> PyResult<(View<'_>, Vec<usize>)> {
        let contiguous = || PyValueError::new_err(format!("`{name}` must be a C-contiguous array"));
        Ok(match self {
            Held::F64(a) => (
                View::F64(a.as_slice().map_err(|_| contiguous())?),
                a.shape().to_vec(),
            ),
            Held::F32(a) => (
                View::F32(a.as_slice().map_err(|_| contiguous())?),
                a.shape().to_vec(),
            ),
            Held::Bool(a) => (
                View::Bool(a.as_slice().map_err(|_| contiguous())?),
                a.shape().to_vec(),
            ),
            Held::I64(a) => (
                View::I64(a.as_slice().map_err(|_| contiguous())?),
                a.shape().to_vec(),
            ),
        })
    }
}

type Outputs<'py> = (Bound<'py, PyDict>, Bound<'py, PyDict>, Bound<'py, PyDict>);

fn hold<'py>(d: &Bound<'py, PyDict>) -> PyResult<Vec<(String, Held<'py>)>> {
    let mut v = Vec::with_capacity(d.len());
    for (k, a) in d.iter() {
        let name: String = k.extract()?;
        let h = Held::extract(&name, &a)?;
        v.push((name, h));
    }
    Ok(v)
}

fn run_call<'py, F: CoreReal>(
    py: Python<'py>,
    def: &OpDef,
    run: for<'a> fn(&mut Call<'a, F>) -> CallResult<()>,
    params: &Map<String, Value>,
    inputs: &BTreeMap<String, (View<'_>, Vec<usize>)>,
    cots: &BTreeMap<String, (View<'_>, Vec<usize>)>,
) -> PyResult<Outputs<'py>> {
    let result = py.detach(|| {
        let mut call = Call {
            op: def.path,
            params,
            inputs,
            cotangents: cots,
            outputs: Vec::new(),
            ints: Vec::new(),
            bools: Vec::new(),
            metrics: Vec::new(),
            grads: Vec::new(),
        };
        run(&mut call).map(|_| call)
    });
    let call = result.map_err(|e| match e {
        CallError::Core(e) => PyValueError::new_err(format!("{}: {e}", def.path)),
        CallError::Msg(m) => PyValueError::new_err(m),
    })?;
    let outs = PyDict::new(py);
    for (name, a) in call.outputs {
        outs.set_item(name, shaped(py, a)?)?;
    }
    for (name, a) in call.ints {
        outs.set_item(name, shaped(py, a)?)?;
    }
    for (name, a) in call.bools {
        outs.set_item(name, shaped(py, a)?)?;
    }
    let metrics = PyDict::new(py);
    for (name, v) in call.metrics {
        metrics.set_item(name, v)?;
    }
    let grads = PyDict::new(py);
    for (name, a) in call.grads {
        grads.set_item(name, shaped(py, a)?)?;
    }
    Ok((outs, metrics, grads))
}

fn shaped<'py, T: numpy::Element>(
    py: Python<'py>,
    a: OutArray<T>,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let flat = numpy::PyArray1::from_vec(py, a.data);
    flat.reshape(a.shape)
}

/// Runs core op `path` (its Rust path below `posttrain_core`) on `inputs`
/// (name → NumPy array, read in place), `params_json` (its parameters) and
/// `cotangents` (output name → array or 0-d array; given, the op also
/// returns the closed-form gradient of every input it differentiates).
/// `dtype` (`"float64"` or `"float32"`) is the precision of its real arrays.
/// Returns `(outputs, metrics, grads)`.
#[pyfunction]
#[pyo3(signature = (path, params_json, inputs, cotangents, dtype))]
pub(crate) fn core_op<'py>(
    py: Python<'py>,
    path: &str,
    params_json: &str,
    inputs: &Bound<'py, PyDict>,
    cotangents: &Bound<'py, PyDict>,
    dtype: &str,
) -> PyResult<Outputs<'py>> {
    let def = registry().iter().find(|d| d.path == path).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown core op `{path}` (posttrain.ops.core.list_ops() names every op)"
        ))
    })?;
    let params = parse_object("parameters", params_json)?;
    if let Some(k) = params
        .keys()
        .find(|k| !def.params.iter().any(|p| p.name == k.as_str()))
    {
        let known: Vec<_> = def.params.iter().map(|p| format!("`{}`", p.name)).collect();
        return Err(PyValueError::new_err(format!(
            "{path}: unknown parameter `{k}`; its parameters are {}",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    }
    let held = hold(inputs)?;
    let held_cots = hold(cotangents)?;
    let mut views = BTreeMap::new();
    for (name, h) in &held {
        if !def.inputs.iter().any(|i| i.name == name) {
            let known: Vec<_> = def.inputs.iter().map(|i| format!("`{}`", i.name)).collect();
            return Err(PyValueError::new_err(format!(
                "{path}: unknown input `{name}`; its inputs are {}",
                known.join(", ")
            )));
        }
        views.insert(name.clone(), h.view(name)?);
    }
    let mut cots = BTreeMap::new();
    for (name, h) in &held_cots {
        if !def.vjp.iter().any(|(o, _)| o == name) {
            let known: Vec<_> = def.vjp.iter().map(|(o, _)| format!("`{o}`")).collect();
            return Err(PyValueError::new_err(format!(
                "{path}: no gradient flows from output `{name}`; {}",
                if known.is_empty() {
                    "this op has no closed-form gradient".to_string()
                } else {
                    format!("cotangents may be given for {}", known.join(", "))
                }
            )));
        }
        cots.insert(name.clone(), h.view(name)?);
    }
    match dtype {
        "float64" => run_call::<f64>(py, def, def.run64, &params, &views, &cots),
        "float32" => run_call::<f32>(py, def, def.run32, &params, &views, &cots),
        other => Err(PyValueError::new_err(format!(
            "dtype `{other}`: posttrain computes in float64 or float32"
        ))),
    }
}
