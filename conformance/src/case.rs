//! What an op handler sees of a case ([`Ctx`]) and what it hands back ([`Outputs`]).

use crate::vector::{value_to_f64, Case, RawTensor};
use posttrain_core::{Dims, Real};
use serde_json::Value;
use std::collections::BTreeMap;

/// Why a handler produced no outputs.
#[derive(Debug, Clone)]
pub enum Fail {
    /// The runner does not support this case (unknown op or parameter value):
    /// counted as skipped.
    Skip(String),
    /// The op refused the input with a typed error (a pass only for
    /// `expect: "error"` edge cases).
    Op(posttrain_core::Error),
    /// The case is malformed for this handler (missing input or parameter):
    /// counted as failed.
    Harness(String),
}

impl From<posttrain_core::Error> for Fail {
    fn from(e: posttrain_core::Error) -> Self {
        Fail::Op(e)
    }
}

/// The result of running one case.
pub type OpResult = Result<Outputs, Fail>;

/// Read access to one case's inputs, parameters and cotangents, converted to
/// the backend's float type `F`.
#[derive(Debug)]
pub struct Ctx<'a> {
    case: &'a Case,
}

fn harness(msg: String) -> Fail {
    Fail::Harness(msg)
}

impl<'a> Ctx<'a> {
    /// Wraps a case.
    pub fn new(case: &'a Case) -> Self {
        Ctx { case }
    }

    /// The case's name.
    pub fn name(&self) -> &str {
        &self.case.name
    }

    /// The raw case.
    pub fn case(&self) -> &Case {
        self.case
    }

    fn tensor(&self, name: &str) -> Result<&RawTensor, Fail> {
        self.case
            .inputs
            .get(name)
            .ok_or_else(|| harness(format!("input `{name}` missing")))
    }

    /// Whether the case has input `name`.
    pub fn has(&self, name: &str) -> bool {
        self.case.inputs.contains_key(name)
    }

    /// The shape of input `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, Fail> {
        Ok(self.tensor(name)?.shape.clone())
    }

    /// The `[batch, seq]` dims of a 2-D input (a 1-D input of length n gives `[n, 1]`).
    pub fn dims(&self, name: &str) -> Result<Dims, Fail> {
        let s = &self.tensor(name)?.shape;
        match s.len() {
            2 => Ok(Dims::new(s[0], s[1])),
            1 => Ok(Dims::new(s[0], 1)),
            0 => Ok(Dims::new(1, 1)),
            _ => Err(harness(format!(
                "input `{name}` has rank {}, expected ≤ 2",
                s.len()
            ))),
        }
    }

    /// Input `name` as floats of type `F`.
    pub fn f<F: Real>(&self, name: &str) -> Result<Vec<F>, Fail> {
        let t = self.tensor(name)?;
        t.data
            .iter()
            .map(|v| value_to_f64(v).map(F::of).map_err(harness))
            .collect()
    }

    /// Input `name` as floats, or `None` if the case does not have it.
    pub fn f_opt<F: Real>(&self, name: &str) -> Result<Option<Vec<F>>, Fail> {
        if self.has(name) {
            self.f(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Input `name` as a boolean mask (any nonzero is true).
    pub fn mask(&self, name: &str) -> Result<Vec<bool>, Fail> {
        let t = self.tensor(name)?;
        t.data
            .iter()
            .map(|v| value_to_f64(v).map(|x| x != 0.0).map_err(harness))
            .collect()
    }

    /// Input `name` as a mask, or `None` if absent.
    pub fn mask_opt(&self, name: &str) -> Result<Option<Vec<bool>>, Fail> {
        if self.has(name) {
            self.mask(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Input `name` as integers.
    pub fn i64(&self, name: &str) -> Result<Vec<i64>, Fail> {
        let t = self.tensor(name)?;
        t.data
            .iter()
            .map(|v| match v {
                Value::Number(n) => n
                    .as_i64()
                    .or_else(|| n.as_f64().map(|f| f as i64))
                    .ok_or_else(|| harness(format!("bad int in `{name}`"))),
                Value::Bool(b) => Ok(*b as i64),
                _ => Err(harness(format!("bad int in `{name}`"))),
            })
            .collect()
    }

    /// Input `name`'s declared dtype (`f64`, `i64`, `bool`).
    pub fn dtype(&self, name: &str) -> Result<String, Fail> {
        Ok(self.tensor(name)?.dtype.clone())
    }

    /// The raw parameter `key` (`None` if absent).
    pub fn param(&self, key: &str) -> Option<&Value> {
        self.case.params.get(key)
    }

    /// Parameter `key` as a float (required, not null).
    pub fn p_f64(&self, key: &str) -> Result<f64, Fail> {
        match self.param(key) {
            Some(v) if !v.is_null() => {
                value_to_f64(v).map_err(|e| harness(format!("param `{key}`: {e}")))
            }
            _ => Err(harness(format!("param `{key}` missing or null"))),
        }
    }

    /// Parameter `key` as a float; absent or `null` gives `None`.
    pub fn p_opt_f64(&self, key: &str) -> Result<Option<f64>, Fail> {
        match self.param(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => value_to_f64(v)
                .map(Some)
                .map_err(|e| harness(format!("param `{key}`: {e}"))),
        }
    }

    /// Parameter `key` as a string (required).
    pub fn p_str(&self, key: &str) -> Result<&str, Fail> {
        match self.param(key) {
            Some(Value::String(s)) => Ok(s),
            _ => Err(harness(format!("param `{key}` missing or not a string"))),
        }
    }

    /// Parameter `key` as a string; absent or `null` gives `None`.
    pub fn p_opt_str(&self, key: &str) -> Result<Option<&str>, Fail> {
        match self.param(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(harness(format!("param `{key}` = {other} is not a string"))),
        }
    }

    /// Parameter `key` as a bool (required).
    pub fn p_bool(&self, key: &str) -> Result<bool, Fail> {
        match self.param(key) {
            Some(Value::Bool(b)) => Ok(*b),
            _ => Err(harness(format!("param `{key}` missing or not a bool"))),
        }
    }

    /// Parameter `key` as an integer (required).
    pub fn p_i64(&self, key: &str) -> Result<i64, Fail> {
        match self.param(key) {
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                .ok_or_else(|| harness(format!("param `{key}` is not an integer"))),
            _ => Err(harness(format!("param `{key}` missing or not an integer"))),
        }
    }

    /// Parameter `key` as a list of floats; absent or `null` gives `None`.
    pub fn p_opt_f64_list(&self, key: &str) -> Result<Option<Vec<f64>>, Fail> {
        match self.param(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| value_to_f64(v).map_err(harness))
                .collect::<Result<_, _>>()
                .map(Some),
            Some(other) => Err(harness(format!("param `{key}` = {other} is not a list"))),
        }
    }

    /// A skip for an unsupported value of parameter `key`.
    pub fn unsupported(&self, key: &str) -> Fail {
        Fail::Skip(format!(
            "unsupported `{key}` = {}",
            self.param(key).map(|v| v.to_string()).unwrap_or_default()
        ))
    }

    /// Whether the case checks the gradient with respect to input `name`.
    pub fn wants_grad(&self, name: &str) -> bool {
        match &self.case.vjp {
            Some(v) => match &v.grads {
                Value::Object(m) => m.contains_key(name),
                Value::Array(a) => a.iter().any(|x| x.as_str() == Some(name)),
                _ => false,
            },
            None => false,
        }
    }

    /// Whether the case has a VJP block at all.
    pub fn has_vjp(&self) -> bool {
        self.case.vjp.is_some()
    }

    /// The cotangent of output `name`, or `None` if the VJP does not involve it.
    pub fn cotangent<F: Real>(&self, name: &str) -> Result<Option<Vec<F>>, Fail> {
        match self.case.vjp.as_ref().and_then(|v| v.cotangents.get(name)) {
            Some(t) => t
                .data
                .iter()
                .map(|v| value_to_f64(v).map(F::of).map_err(harness))
                .collect::<Result<_, _>>()
                .map(Some),
            None => Ok(None),
        }
    }

    /// The scalar cotangent of output `name` (0 if the VJP does not involve it).
    pub fn cot_scalar<F: Real>(&self, name: &str) -> Result<F, Fail> {
        Ok(self
            .cotangent::<F>(name)?
            .and_then(|v| v.first().copied())
            .unwrap_or(F::zero()))
    }
}

/// What a handler computed: outputs and gradients, widened to `f64`.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    /// Output name → flat values.
    pub values: BTreeMap<String, Vec<f64>>,
    /// Input name → flat gradient (the VJP).
    pub grads: BTreeMap<String, Vec<f64>>,
}

impl Outputs {
    /// No outputs yet.
    pub fn new() -> Self {
        Self::default()
    }
    /// Records output `name`.
    pub fn put<F: Real>(&mut self, name: &str, v: &[F]) -> &mut Self {
        self.values
            .insert(name.to_string(), v.iter().map(|x| x.to_f64()).collect());
        self
    }
    /// Records a scalar output.
    pub fn scalar<F: Real>(&mut self, name: &str, v: F) -> &mut Self {
        self.values.insert(name.to_string(), vec![v.to_f64()]);
        self
    }
    /// Records a boolean output (as 0/1).
    pub fn put_bool(&mut self, name: &str, v: &[bool]) -> &mut Self {
        self.values.insert(
            name.to_string(),
            v.iter().map(|&b| b as u8 as f64).collect(),
        );
        self
    }
    /// Records an integer output.
    pub fn put_i64(&mut self, name: &str, v: &[i64]) -> &mut Self {
        self.values
            .insert(name.to_string(), v.iter().map(|&b| b as f64).collect());
        self
    }
    /// Records the gradient with respect to input `name`.
    pub fn grad<F: Real>(&mut self, name: &str, v: &[F]) -> &mut Self {
        self.grads
            .insert(name.to_string(), v.iter().map(|x| x.to_f64()).collect());
        self
    }
}
