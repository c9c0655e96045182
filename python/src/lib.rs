//! # posttrain-python
//!
//! The native half of the `posttrain` Python package (`posttrain._native`).
//! The Python half (`python/posttrain/`) wraps these functions for NumPy
//! arrays and PyTorch tensors and adds the TRL and verl adapters; users import
//! `posttrain`, not this module.
//!
//! Three kinds of entry point:
//!
//! * **Core ops** ([`core_api`]): every public op of posttrain-core under
//!   its Rust path, its configs under their Rust names built by their
//!   `preset`/`new`/`Default` constructors, arrays read in place (the
//!   Python side is `posttrain.ops.core`).
//! * **Peer ops** ([`peer_op`]): every op of the conformance vectors, named
//!   `<peer>.<op>` (`verl.compute_policy_loss`, `trl.grpo_loss`, …) with the
//!   peer's parameter names, run by the same handlers the conformance runner
//!   uses — one mapping from a peer's configuration onto posttrain-core. The
//!   inputs are copied into the handler's form (this path is for
//!   completeness and for small tensors: advantages, DPO pairs).
//! * **Hot ops** ([`grpo_loss`], [`verl_policy_loss`],
//!   [`log_probs_entropy`], [`log_probs_entropy_backward`]): the tensors of
//!   a training step, read **in place** from the caller's contiguous arrays
//!   (f32 or f64, through NumPy's buffer; no element-wise Python and no
//!   copy), value and closed-form gradient in one call, the fused kernels
//!   spread over threads with the GIL released.
//!
//! Every error of the core surfaces as a Python `ValueError` carrying the
//! core's message; nothing here panics on bad input.

mod core_api;
mod core_ops;

use numpy::{Element, PyArray1, PyReadonlyArray1};
use posttrain_conformance::case::{Ctx, Fail};
use posttrain_conformance::ops;
use posttrain_conformance::vector::{Case, RawTensor, Vjp};
use posttrain_core::aggregate::{aggregate, AggMode};
use posttrain_core::fused::{self, KlPenalty, TokenLoss};
use posttrain_core::kl::KlConfig;
use posttrain_core::logits::Temperature;
use posttrain_core::policy::grpo::{GrpoInputs, TokenOrRow};
use posttrain_core::policy::token::{policy_loss, PolicyBatch, PolicyLoss};
use posttrain_core::preference::paired::{paired_loss, PairBatch, PairGrads};
use posttrain_core::{Dims, Error, Real};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

fn core_err(e: Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn fail_err(op: &str, f: Fail) -> PyErr {
    match f {
        Fail::Op(e) => core_err(e),
        Fail::Skip(m) | Fail::Harness(m) => PyValueError::new_err(format!("{op}: {m}")),
    }
}

fn parse_params(params_json: &str) -> PyResult<Map<String, Value>> {
    match serde_json::from_str::<Value>(params_json) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(PyValueError::new_err(format!(
            "parameters must be a JSON object, got {other}"
        ))),
        Err(e) => Err(PyValueError::new_err(format!("parameters: {e}"))),
    }
}

/// A float as the vectors store it (non-finite values as strings).
fn json_f64(v: f64) -> Value {
    if v.is_nan() {
        Value::from("nan")
    } else if v == f64::INFINITY {
        Value::from("inf")
    } else if v == f64::NEG_INFINITY {
        Value::from("-inf")
    } else {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

fn raw_tensor(dtype: &str, shape: Vec<usize>, data: &[f64]) -> PyResult<RawTensor> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(PyValueError::new_err(format!(
            "shape {shape:?} holds {n} elements but {} were given",
            data.len()
        )));
    }
    let data = match dtype {
        "f64" | "f32" => data.iter().map(|&v| json_f64(v)).collect(),
        "i64" => data.iter().map(|&v| Value::from(v as i64)).collect(),
        "bool" => data.iter().map(|&v| Value::Bool(v != 0.0)).collect(),
        other => {
            return Err(PyValueError::new_err(format!(
                "dtype `{other}` is not one of f64, f32, i64, bool"
            )))
        }
    };
    Ok(RawTensor {
        dtype: if dtype == "f32" {
            "f64".into()
        } else {
            dtype.into()
        },
        shape,
        data,
    })
}

/// An input or cotangent as the Python side hands it over: name, dtype
/// (`f64`, `f32`, `i64`, `bool`), shape and the values widened to f64.
type Named<'py> = (String, String, Vec<usize>, PyReadonlyArray1<'py, f64>);

/// Output name → flat values (as f64).
type Flat<'py> = Vec<(String, Bound<'py, PyArray1<f64>>)>;

/// A new 1-D NumPy array.
type Arr<'py, F> = Bound<'py, PyArray1<F>>;

/// Metrics and two gradients.
type MetricsGrads<'py, F> = (Bound<'py, PyDict>, Arr<'py, F>, Arr<'py, F>);

/// Log-probabilities, entropies and log-sum-exps.
type LpeOut<'py, F> = (Arr<'py, F>, Arr<'py, F>, Arr<'py, F>);

/// Runs the peer op `op` (`<peer>.<op>`, as in the conformance vectors) with
/// the peer's parameters (`params_json`, a JSON object) on `inputs`.
///
/// With `cotangents` (one per differentiated output) the handler also runs
/// the closed-form VJP and returns the gradient of every input in `grads`.
/// `dtype` is the precision the core computes in: `f64` or `f32` (inputs are
/// rounded to f32 first). Returns `(outputs, gradients)`, flat; the Python
/// side restores shapes.
///
/// Errors: `ValueError` for an unknown op, a missing input or parameter, an
/// unsupported parameter value, or any error of the core.
#[pyfunction]
#[pyo3(signature = (op, params_json, inputs, cotangents, grads, dtype))]
fn peer_op<'py>(
    py: Python<'py>,
    op: &str,
    params_json: &str,
    inputs: Vec<Named<'py>>,
    cotangents: Vec<Named<'py>>,
    grads: Vec<String>,
    dtype: &str,
) -> PyResult<(Flat<'py>, Flat<'py>)> {
    let params = parse_params(params_json)?;
    let mut ins = BTreeMap::new();
    for (name, dt, shape, data) in inputs {
        ins.insert(name, raw_tensor(&dt, shape, data.as_slice()?)?);
    }
    let vjp = if cotangents.is_empty() && grads.is_empty() {
        None
    } else {
        let mut cots = BTreeMap::new();
        for (name, dt, shape, data) in cotangents {
            cots.insert(name, raw_tensor(&dt, shape, data.as_slice()?)?);
        }
        Some(Vjp {
            cotangents: cots,
            grads: Value::Array(grads.into_iter().map(Value::from).collect()),
        })
    };
    let case = Case {
        name: op.to_string(),
        params,
        inputs: ins,
        outputs: Value::Null,
        vjp,
        tolerance: BTreeMap::new(),
        expect: None,
    };
    let f32 = match dtype {
        "f64" => false,
        "f32" => true,
        other => {
            return Err(PyValueError::new_err(format!(
                "dtype `{other}`: posttrain computes in f64 or f32"
            )))
        }
    };
    let result = py.detach(|| {
        let ctx = Ctx::new(&case);
        if f32 {
            ops::dispatch::<f32>(op, &ctx)
        } else {
            ops::dispatch::<f64>(op, &ctx)
        }
    });
    let out = match result {
        None => {
            return Err(PyValueError::new_err(format!(
                "unknown op `{op}` (posttrain.ops.list_ops() names every op)"
            )))
        }
        Some(r) => r.map_err(|f| fail_err(op, f))?,
    };
    let conv = |m: BTreeMap<String, Vec<f64>>| -> Flat<'py> {
        m.into_iter()
            .map(|(k, v)| (k, PyArray1::from_vec(py, v)))
            .collect()
    };
    Ok((conv(out.values), conv(out.grads)))
}

/// A `Ctx` over parameters only (the peer-config parsers read nothing else).
fn params_case(op: &str, params_json: &str) -> PyResult<Case> {
    Ok(Case {
        name: op.to_string(),
        params: parse_params(params_json)?,
        inputs: BTreeMap::new(),
        outputs: Value::Null,
        vjp: None,
        tolerance: BTreeMap::new(),
        expect: None,
    })
}

fn slice<'a, F: Element>(name: &str, a: &'a PyReadonlyArray1<'_, F>) -> PyResult<&'a [F]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("`{name}` must be a contiguous array")))
}

fn opt_slice<'a, F: Element>(
    name: &str,
    a: &'a Option<PyReadonlyArray1<'_, F>>,
) -> PyResult<Option<&'a [F]>> {
    a.as_ref().map(|a| slice(name, a)).transpose()
}

fn dims(batch: usize, seq: usize) -> Dims {
    Dims::new(batch, seq)
}

fn threads(n: Option<usize>) -> usize {
    n.unwrap_or_else(fused::parallel::default_threads).max(1)
}

fn metrics<'py>(py: Python<'py>, items: &[(&str, f64)]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in items {
        d.set_item(*k, *v)?;
    }
    Ok(d)
}

// ---------------------------------------------------------------------------
// TRL's GRPO-family loss
// ---------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn grpo_loss_impl<'py, F: Real + Element>(
    py: Python<'py>,
    params_json: &str,
    batch: usize,
    seq: usize,
    per_token_logps: PyReadonlyArray1<'py, F>,
    entropies: PyReadonlyArray1<'py, F>,
    mask: PyReadonlyArray1<'py, bool>,
    advantages: PyReadonlyArray1<'py, F>,
    old_per_token_logps: Option<PyReadonlyArray1<'py, F>>,
    ref_per_token_logps: Option<PyReadonlyArray1<'py, F>>,
    sampling_per_token_logps: Option<PyReadonlyArray1<'py, F>>,
    importance_sampling_ratio: Option<PyReadonlyArray1<'py, F>>,
) -> PyResult<MetricsGrads<'py, F>> {
    let case = params_case("trl.grpo_loss", params_json)?;
    let ctx = Ctx::new(&case);
    let gspo_token =
        ctx.p_opt_str("importance_sampling_level").ok().flatten() == Some("sequence_token");
    let cfg = ops::grpo::grpo_config(&ctx, gspo_token).map_err(|f| fail_err("grpo_loss", f))?;
    let d = dims(batch, seq);
    let lp = slice("per_token_logps", &per_token_logps)?;
    let ent = slice("entropies", &entropies)?;
    let m = slice("completion_mask", &mask)?;
    let adv = slice("advantages", &advantages)?;
    let old = opt_slice("old_per_token_logps", &old_per_token_logps)?;
    let rf = opt_slice("ref_per_token_logps", &ref_per_token_logps)?;
    let samp = opt_slice("sampling_per_token_logps", &sampling_per_token_logps)?;
    let is = opt_slice("importance_sampling_ratio", &importance_sampling_ratio)?;
    let (out, g_lp, g_ent) = py
        .detach(|| {
            let mut x = GrpoInputs::new(d, lp, ent, m, adv);
            x.old_log_probs = old;
            x.ref_log_probs = rf;
            x.sampling_log_probs = samp;
            x.importance_sampling_ratio = is.map(|v| {
                if v.len() == batch && seq != 1 {
                    TokenOrRow::Row(v)
                } else {
                    TokenOrRow::Token(v)
                }
            });
            let n = d.len();
            let mut g_lp = vec![F::zero(); n];
            let mut g_ent = vec![F::zero(); n];
            let mut scratch = vec![F::zero(); n];
            posttrain_core::policy::grpo::grpo_loss(
                &cfg,
                &x,
                Some(&mut g_lp),
                Some(&mut g_ent),
                &mut scratch,
            )
            .map(|o| (o, g_lp, g_ent))
        })
        .map_err(core_err)?;
    let m = metrics(
        py,
        &[
            ("loss", out.loss.to_f64()),
            ("policy_loss", out.policy_loss.to_f64()),
            ("entropy", out.entropy.to_f64()),
            ("kl", out.kl.to_f64()),
            ("clip_ratio/low_mean", out.clip.low_mean.to_f64()),
            ("clip_ratio/high_mean", out.clip.high_mean.to_f64()),
            ("clip_ratio/region_mean", out.clip.region_mean.to_f64()),
            ("clip_ratio/low_min", out.clip.low_min.to_f64()),
            ("clip_ratio/high_max", out.clip.high_max.to_f64()),
            ("cispo_clip_ratio", out.cispo_clip_ratio.to_f64()),
            ("vespo/phi_seq_mean", out.vespo_phi_seq_mean.to_f64()),
            ("entropy_coef", out.entropy_coef.to_f64()),
            ("world_entropy", out.world_entropy.to_f64()),
        ],
    )?;
    Ok((
        m,
        PyArray1::from_vec(py, g_lp),
        PyArray1::from_vec(py, g_ent),
    ))
}

macro_rules! grpo_loss_fn {
    ($name:ident, $f:ty) => {
        /// TRL's GRPO-family loss (`GRPOTrainer._compute_loss` after the
        /// forward pass) on `[batch, seq]` arrays of this precision, read in
        /// place: returns `(metrics, d loss / d per_token_logps,
        /// d loss / d entropies)`. `params_json` holds TRL's config names
        /// (see `posttrain.ops.grpo_loss`).
        #[pyfunction]
        #[pyo3(signature = (params_json, batch, seq, per_token_logps, entropies, mask, advantages, old_per_token_logps=None, ref_per_token_logps=None, sampling_per_token_logps=None, importance_sampling_ratio=None))]
        #[allow(clippy::too_many_arguments, clippy::type_complexity)]
        fn $name<'py>(
            py: Python<'py>,
            params_json: &str,
            batch: usize,
            seq: usize,
            per_token_logps: PyReadonlyArray1<'py, $f>,
            entropies: PyReadonlyArray1<'py, $f>,
            mask: PyReadonlyArray1<'py, bool>,
            advantages: PyReadonlyArray1<'py, $f>,
            old_per_token_logps: Option<PyReadonlyArray1<'py, $f>>,
            ref_per_token_logps: Option<PyReadonlyArray1<'py, $f>>,
            sampling_per_token_logps: Option<PyReadonlyArray1<'py, $f>>,
            importance_sampling_ratio: Option<PyReadonlyArray1<'py, $f>>,
        ) -> PyResult<(
            Bound<'py, PyDict>,
            Bound<'py, PyArray1<$f>>,
            Bound<'py, PyArray1<$f>>,
        )> {
            grpo_loss_impl(
                py,
                params_json,
                batch,
                seq,
                per_token_logps,
                entropies,
                mask,
                advantages,
                old_per_token_logps,
                ref_per_token_logps,
                sampling_per_token_logps,
                importance_sampling_ratio,
            )
        }
    };
}
grpo_loss_fn!(grpo_loss_f64, f64);
grpo_loss_fn!(grpo_loss_f32, f32);

// ---------------------------------------------------------------------------
// verl's actor loss: policy loss (+ KL loss), aggregated
// ---------------------------------------------------------------------------

/// verl's policy loss and KL loss configuration from its actor config names.
fn verl_token_loss_config(params_json: &str) -> PyResult<(TokenLoss, bool)> {
    let case = params_case("verl.policy_loss", params_json)?;
    let ctx = Ctx::new(&case);
    let err = |f| fail_err("verl policy loss", f);
    let loss: PolicyLoss = ops::policy::verl_policy_config(&ctx).map_err(err)?;
    let agg: AggMode = ops::policy::agg_mode(&ctx).map_err(err)?;
    let norm = ops::policy::global_norm(&ctx).map_err(err)?;
    let use_kl = matches!(ctx.param("use_kl_loss"), Some(Value::Bool(true)));
    let kl = if use_kl {
        let name = ctx
            .p_opt_str("kl_loss_type")
            .map_err(err)?
            .unwrap_or("low_var_kl");
        let coef = ctx.p_opt_f64("kl_loss_coef").map_err(err)?.unwrap_or(0.001);
        Some(KlPenalty {
            estimator: KlConfig::parse_verl(name).map_err(core_err)?,
            coef,
        })
    } else {
        None
    };
    let cfg = TokenLoss {
        loss,
        agg,
        norm,
        kl,
    };
    if cfg.loss.is_token_local() {
        cfg.validate().map_err(core_err)?;
    } else {
        cfg.loss.validate().map_err(core_err)?;
        cfg.norm.validate().map_err(core_err)?;
    }
    Ok((cfg, use_kl))
}

#[allow(clippy::too_many_arguments)]
fn verl_policy_loss_impl<'py, F: Real + Element>(
    py: Python<'py>,
    params_json: &str,
    batch: usize,
    seq: usize,
    old_log_prob: PyReadonlyArray1<'py, F>,
    log_prob: PyReadonlyArray1<'py, F>,
    advantages: PyReadonlyArray1<'py, F>,
    response_mask: PyReadonlyArray1<'py, bool>,
    rollout_is_weights: Option<PyReadonlyArray1<'py, F>>,
    ref_log_prob: Option<PyReadonlyArray1<'py, F>>,
    n_threads: Option<usize>,
) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyArray1<F>>)> {
    let (cfg, _) = verl_token_loss_config(params_json)?;
    let d = dims(batch, seq);
    let pb = PolicyBatch {
        dims: d,
        log_prob: slice("log_prob", &log_prob)?,
        old_log_prob: slice("old_log_prob", &old_log_prob)?,
        advantages: slice("advantages", &advantages)?,
        mask: slice("response_mask", &response_mask)?,
        is_weights: opt_slice("rollout_is_weights", &rollout_is_weights)?,
    };
    let rf = opt_slice("ref_log_prob", &ref_log_prob)?;
    let t = threads(n_threads);
    let (out, kl_loss, grad) = py
        .detach(|| {
            let mut grad = vec![F::zero(); d.len()];
            if cfg.loss.is_token_local() {
                let o = fused::parallel::token_loss(&cfg, &pb, rf, Some((F::one(), &mut grad)), t)?;
                Ok((o.policy, o.kl_loss, grad))
            } else {
                // Cross-token variants (GSPO, geo-mean, Clip-Cov, KL-Cov) need
                // row or batch statistics first: the reference driver, then the
                // KL loss (verl aggregates it with the requested mode).
                let mut scratch = vec![F::zero(); PolicyLoss::scratch_len(d)];
                let o = policy_loss(
                    &cfg.loss,
                    cfg.agg,
                    &cfg.norm,
                    &pb,
                    &mut scratch,
                    Some((F::one(), &mut grad)),
                )?;
                let kl_loss = match &cfg.kl {
                    None => F::zero(),
                    Some(k) => {
                        let rf = rf.ok_or(Error::Invalid {
                            input: "ref_log_prob",
                            rule: "required with use_kl_loss",
                        })?;
                        let n = d.len();
                        let (mut kl, mut dkl, mut w) =
                            (vec![F::zero(); n], vec![F::zero(); n], vec![F::zero(); n]);
                        let ones = vec![F::one(); n];
                        k.estimator.estimate_slices(
                            pb.log_prob,
                            rf,
                            &mut kl,
                            Some((&ones, &mut dkl)),
                        )?;
                        let v = aggregate(cfg.agg, &cfg.norm, d, &kl, pb.mask, Some(&mut w))?;
                        let c = F::of(k.coef);
                        for i in 0..n {
                            // Selected, not multiplied: masked positions may hold NaN.
                            if pb.mask[i] {
                                grad[i] += c * w[i] * dkl[i];
                            }
                        }
                        v
                    }
                };
                Ok((o, kl_loss, grad))
            }
        })
        .map_err(core_err)?;
    let m = metrics(
        py,
        &[
            ("pg_loss", out.loss.to_f64()),
            ("pg_clipfrac", out.clipfrac.to_f64()),
            ("pg_clipfrac_lower", out.clipfrac_lower.to_f64()),
            ("ppo_kl", out.approx_kl.to_f64()),
            ("kl_loss", kl_loss.to_f64()),
        ],
    )?;
    Ok((m, PyArray1::from_vec(py, grad)))
}

macro_rules! verl_policy_loss_fn {
    ($name:ident, $f:ty) => {
        /// verl's actor policy loss (`loss_mode`, clip ratios,
        /// `loss_agg_mode`, global normalizers; with `use_kl_loss` the KL loss
        /// `kl_loss_coef · agg(kl_loss_type)` too) on `[batch, seq]` arrays
        /// read in place: returns `(metrics, d total / d log_prob)` where
        /// total = `pg_loss + kl_loss_coef · kl_loss`.
        #[pyfunction]
        #[pyo3(signature = (params_json, batch, seq, old_log_prob, log_prob, advantages, response_mask, rollout_is_weights=None, ref_log_prob=None, threads=None))]
        #[allow(clippy::too_many_arguments, clippy::type_complexity)]
        fn $name<'py>(
            py: Python<'py>,
            params_json: &str,
            batch: usize,
            seq: usize,
            old_log_prob: PyReadonlyArray1<'py, $f>,
            log_prob: PyReadonlyArray1<'py, $f>,
            advantages: PyReadonlyArray1<'py, $f>,
            response_mask: PyReadonlyArray1<'py, bool>,
            rollout_is_weights: Option<PyReadonlyArray1<'py, $f>>,
            ref_log_prob: Option<PyReadonlyArray1<'py, $f>>,
            threads: Option<usize>,
        ) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyArray1<$f>>)> {
            verl_policy_loss_impl(
                py,
                params_json,
                batch,
                seq,
                old_log_prob,
                log_prob,
                advantages,
                response_mask,
                rollout_is_weights,
                ref_log_prob,
                threads,
            )
        }
    };
}
verl_policy_loss_fn!(verl_policy_loss_f64, f64);
verl_policy_loss_fn!(verl_policy_loss_f32, f32);

// ---------------------------------------------------------------------------
// TRL's DPO-family loss on sequence log-probabilities
// ---------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn dpo_pair_loss_impl<'py, F: Real + Element>(
    py: Python<'py>,
    params_json: &str,
    chosen_logps: PyReadonlyArray1<'py, F>,
    rejected_logps: PyReadonlyArray1<'py, F>,
    ref_chosen_logps: PyReadonlyArray1<'py, F>,
    ref_rejected_logps: PyReadonlyArray1<'py, F>,
    chosen_len: PyReadonlyArray1<'py, F>,
    rejected_len: PyReadonlyArray1<'py, F>,
    pair_weight: Option<PyReadonlyArray1<'py, F>>,
) -> PyResult<MetricsGrads<'py, F>> {
    let case = params_case("trl.dpo_loss", params_json)?;
    let ctx = Ctx::new(&case);
    let (cfg, terms) =
        ops::paired::trl_dpo_config(&ctx).map_err(|f| fail_err("dpo_pair_loss", f))?;
    let c = slice("chosen_logps", &chosen_logps)?;
    let r = slice("rejected_logps", &rejected_logps)?;
    let c0 = slice("ref_chosen_logps", &ref_chosen_logps)?;
    let r0 = slice("ref_rejected_logps", &ref_rejected_logps)?;
    let lc = slice("chosen_len", &chosen_len)?;
    let lr = slice("rejected_len", &rejected_len)?;
    let w = opt_slice("pair_weight", &pair_weight)?;
    let n = c.len();
    let (out, gc, gr) = py
        .detach(|| {
            let mut batch = PairBatch::new(c, r)
                .with_reference(c0, r0)
                .with_lengths(lc, lr);
            if let Some(w) = w {
                batch = batch.with_pair_weight(w);
            }
            let (mut gc, mut gr) = (vec![F::zero(); n], vec![F::zero(); n]);
            // AOT sorts both sides: 2·B indices of scratch.
            let mut order = vec![0usize; 2 * n];
            let out = paired_loss(
                &cfg,
                &terms,
                &batch,
                None,
                Some(PairGrads::of_mean(F::one(), &mut gc, &mut gr)),
                &mut order,
            )?;
            Ok::<_, Error>((out, gc, gr))
        })
        .map_err(core_err)?;
    let m = metrics(
        py,
        &[
            ("loss", out.loss.to_f64()),
            ("rewards/chosen", out.metrics.reward_chosen.to_f64()),
            ("rewards/rejected", out.metrics.reward_rejected.to_f64()),
            ("rewards/accuracies", out.metrics.accuracy.to_f64()),
            ("rewards/margins", out.metrics.margin.to_f64()),
        ],
    )?;
    Ok((m, PyArray1::from_vec(py, gc), PyArray1::from_vec(py, gr)))
}

macro_rules! dpo_pair_loss_fn {
    ($name:ident, $f:ty) => {
        /// TRL `DPOTrainer`'s loss (every `loss_type` with `loss_weights`,
        /// `f_divergence_type`, `beta`, `label_smoothing`, …; not `sft`) from
        /// sequence log-probabilities `[B]`: returns `(metrics, d loss / d
        /// chosen_logps, d loss / d rejected_logps)`. `f_divergence_scores`
        /// in `params_json` selects the f-divergence scores:
        /// `constants_dropped` (default, TRL f2cd577) or `zero_at_reference`
        /// (TRL 1.16.0); another value is a `ValueError`.
        #[pyfunction]
        #[pyo3(signature = (params_json, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_len, rejected_len, pair_weight=None))]
        #[allow(clippy::too_many_arguments)]
        fn $name<'py>(
            py: Python<'py>,
            params_json: &str,
            chosen_logps: PyReadonlyArray1<'py, $f>,
            rejected_logps: PyReadonlyArray1<'py, $f>,
            ref_chosen_logps: PyReadonlyArray1<'py, $f>,
            ref_rejected_logps: PyReadonlyArray1<'py, $f>,
            chosen_len: PyReadonlyArray1<'py, $f>,
            rejected_len: PyReadonlyArray1<'py, $f>,
            pair_weight: Option<PyReadonlyArray1<'py, $f>>,
        ) -> PyResult<MetricsGrads<'py, $f>> {
            dpo_pair_loss_impl(
                py,
                params_json,
                chosen_logps,
                rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                chosen_len,
                rejected_len,
                pair_weight,
            )
        }
    };
}
dpo_pair_loss_fn!(dpo_pair_loss_f64, f64);
dpo_pair_loss_fn!(dpo_pair_loss_f32, f32);

// ---------------------------------------------------------------------------
// Log-probabilities and entropy from logits
// ---------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn lpe_impl<'py, F: Real + Element>(
    py: Python<'py>,
    logits: PyReadonlyArray1<'py, F>,
    rows: usize,
    vocab: usize,
    targets: PyReadonlyArray1<'py, i64>,
    temperature: f64,
    n_threads: Option<usize>,
) -> PyResult<LpeOut<'py, F>> {
    let z = slice("logits", &logits)?;
    let ids = slice("targets", &targets)?;
    let temp = Temperature::new(temperature).map_err(core_err)?;
    let t = threads(n_threads);
    let (lp, ent, lse) = py
        .detach(|| {
            let mut lp = vec![F::zero(); rows];
            let mut ent = vec![F::zero(); rows];
            let mut lse = vec![F::zero(); rows];
            fused::parallel::log_probs_entropy(
                z, rows, vocab, temp, ids, &mut lp, &mut ent, &mut lse, t,
            )
            .map(|_| (lp, ent, lse))
        })
        .map_err(core_err)?;
    Ok((
        PyArray1::from_vec(py, lp),
        PyArray1::from_vec(py, ent),
        PyArray1::from_vec(py, lse),
    ))
}

#[allow(clippy::too_many_arguments)]
fn lpe_backward_impl<'py, F: Real + Element>(
    py: Python<'py>,
    logits: PyReadonlyArray1<'py, F>,
    rows: usize,
    vocab: usize,
    targets: PyReadonlyArray1<'py, i64>,
    temperature: f64,
    lse: PyReadonlyArray1<'py, F>,
    entropy: PyReadonlyArray1<'py, F>,
    d_log_probs: PyReadonlyArray1<'py, F>,
    d_entropy: Option<PyReadonlyArray1<'py, F>>,
    n_threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray1<F>>> {
    let z = slice("logits", &logits)?;
    let ids = slice("targets", &targets)?;
    let l = slice("lse", &lse)?;
    let h = slice("entropy", &entropy)?;
    let dl = slice("d_log_probs", &d_log_probs)?;
    let dh = opt_slice("d_entropy", &d_entropy)?;
    let temp = Temperature::new(temperature).map_err(core_err)?;
    let t = threads(n_threads);
    let n = rows.checked_mul(vocab).ok_or_else(|| {
        PyValueError::new_err(format!("rows × vocab = {rows} × {vocab} overflows"))
    })?;
    let grad = py
        .detach(|| {
            let mut g = vec![F::zero(); n];
            fused::parallel::log_probs_entropy_backward(
                z, rows, vocab, temp, ids, l, h, dl, dh, &mut g, t,
            )
            .map(|_| g)
        })
        .map_err(core_err)?;
    Ok(PyArray1::from_vec(py, grad))
}

macro_rules! lpe_fns {
    ($fwd:ident, $bwd:ident, $f:ty) => {
        /// Token log-probabilities and entropies of `[rows, vocab]` logits
        /// (divided by `temperature`) at `targets`, one read of the logits
        /// (online log-sum-exp): returns `(log_probs, entropy, lse)`, each
        /// `[rows]`; `lse` is what the backward needs.
        #[pyfunction]
        #[pyo3(signature = (logits, rows, vocab, targets, temperature=1.0, threads=None))]
        #[allow(clippy::type_complexity)]
        fn $fwd<'py>(
            py: Python<'py>,
            logits: PyReadonlyArray1<'py, $f>,
            rows: usize,
            vocab: usize,
            targets: PyReadonlyArray1<'py, i64>,
            temperature: f64,
            threads: Option<usize>,
        ) -> PyResult<(
            Bound<'py, PyArray1<$f>>,
            Bound<'py, PyArray1<$f>>,
            Bound<'py, PyArray1<$f>>,
        )> {
            lpe_impl(py, logits, rows, vocab, targets, temperature, threads)
        }

        /// The VJP of the log-probabilities and entropies with respect to
        /// the logits: `d_log_probs`, `d_entropy` (optional) are `[rows]`;
        /// returns `[rows · vocab]`.
        #[pyfunction]
        #[pyo3(signature = (logits, rows, vocab, targets, temperature, lse, entropy, d_log_probs, d_entropy=None, threads=None))]
        #[allow(clippy::too_many_arguments)]
        fn $bwd<'py>(
            py: Python<'py>,
            logits: PyReadonlyArray1<'py, $f>,
            rows: usize,
            vocab: usize,
            targets: PyReadonlyArray1<'py, i64>,
            temperature: f64,
            lse: PyReadonlyArray1<'py, $f>,
            entropy: PyReadonlyArray1<'py, $f>,
            d_log_probs: PyReadonlyArray1<'py, $f>,
            d_entropy: Option<PyReadonlyArray1<'py, $f>>,
            threads: Option<usize>,
        ) -> PyResult<Bound<'py, PyArray1<$f>>> {
            lpe_backward_impl(
                py,
                logits,
                rows,
                vocab,
                targets,
                temperature,
                lse,
                entropy,
                d_log_probs,
                d_entropy,
                threads,
            )
        }
    };
}
lpe_fns!(log_probs_entropy_f64, log_probs_entropy_backward_f64, f64);
lpe_fns!(log_probs_entropy_f32, log_probs_entropy_backward_f32, f32);

/// The `posttrain._native` module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(peer_op, m)?)?;
    m.add_function(wrap_pyfunction!(core_api::core_op, m)?)?;
    m.add_function(wrap_pyfunction!(core_api::core_config, m)?)?;
    m.add_function(wrap_pyfunction!(core_api::core_spec, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_loss_f64, m)?)?;
    m.add_function(wrap_pyfunction!(grpo_loss_f32, m)?)?;
    m.add_function(wrap_pyfunction!(verl_policy_loss_f64, m)?)?;
    m.add_function(wrap_pyfunction!(verl_policy_loss_f32, m)?)?;
    m.add_function(wrap_pyfunction!(dpo_pair_loss_f64, m)?)?;
    m.add_function(wrap_pyfunction!(dpo_pair_loss_f32, m)?)?;
    m.add_function(wrap_pyfunction!(log_probs_entropy_f64, m)?)?;
    m.add_function(wrap_pyfunction!(log_probs_entropy_f32, m)?)?;
    m.add_function(wrap_pyfunction!(log_probs_entropy_backward_f64, m)?)?;
    m.add_function(wrap_pyfunction!(log_probs_entropy_backward_f32, m)?)?;
    Ok(())
}
