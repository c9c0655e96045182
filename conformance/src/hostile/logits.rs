//! Hostile inputs for the `logits` family (fuzz target `fuzz/fuzz_targets/logits.rs`):
//! log-softmax / gather / entropy / `Σπ²` / sequence log-probabilities /
//! entropy loss (`core/src/logits.rs`) and distillation (`core/src/distill.rs`).
//!
//! Also holds the small driver ([`Probe`], [`check`]) that the `preference`
//! and `advantage` modules share: an op is written once as a closure over the
//! flattened inputs `x` (f64 or f32), and [`check`] applies the contract of
//! the [module docs](super) to it.

use super::{
    assert_finite, assert_same_bits, check_gradient, decode, dims, fill_masked, float, floats,
    log_probs, mask, maybe_wrong_len,
};
use arbitrary::{Result as ArbResult, Unstructured};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::distill::{
    generalized_jsd_elementwise, generalized_jsd_loss, jsd_from_log_probs, kd_loss, DistillConfig,
    Jsd, Reduction,
};
use posttrain_core::logits::{
    entropy_from_logits, entropy_loss, gather_log_softmax, log_softmax, log_softmax_vjp,
    selective_log_softmax, sequence_log_probs, sum_pi_squared, SequenceLogProbConfig, Temperature,
};
use posttrain_core::{Dims, Error, Real};

// ---------------------------------------------------------------------------
// The shared driver
// ---------------------------------------------------------------------------

/// What one evaluation of an op returns, widened to f64.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    /// The scalar the gradient is of (`Σ cotangent · outputs`).
    pub obj: f64,
    /// Every value output (checked finite for finite inputs).
    pub val: Vec<f64>,
    /// `∂obj/∂x`, aligned with the inputs `x` (0 where not differentiated).
    pub grad: Vec<f64>,
    /// Metrics / logged statistics: compared bit for bit only (peers define
    /// some of them as NaN, e.g. a std of one sample).
    pub metrics: Vec<f64>,
}

/// `x` as `F`.
pub fn cv<F: Real>(x: &[f64]) -> Vec<F> {
    x.iter().map(|&v| F::of(v)).collect()
}

/// `x` widened to f64.
pub fn back<F: Real>(x: &[F]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

/// `Σ cᵢ vᵢ` in f64.
pub fn dot(c: &[f64], v: &[f64]) -> f64 {
    c.iter().zip(v).map(|(a, b)| a * b).sum()
}

/// How an op is called: its inputs `x`, which of them are padding (never
/// read by the op), which are differentiated, and the expected failure.
pub struct Case<'a> {
    /// Name in failure messages.
    pub what: &'a str,
    /// The flattened inputs (may hold NaN/inf anywhere).
    pub x: Vec<f64>,
    /// `true` where `x` is padding: the op must ignore it bit for bit.
    pub pad: Vec<bool>,
    /// Coordinates of `x` with a closed-form gradient.
    pub diff: core::ops::Range<usize>,
    /// The input is malformed: the op must return an error (any typed
    /// error when `None`, else one the predicate accepts).
    pub malformed: bool,
    /// Accepts the expected error of a malformed call.
    pub expect: Option<fn(&Error) -> bool>,
    /// Whether the gradient is smooth enough to probe (no kinks other than
    /// those `check_gradient` detects itself).
    pub fd: bool,
    /// Coordinates to probe with finite differences.
    pub ks: Vec<usize>,
    /// Whether finite inputs must give finite results in f64 / in f32
    /// (false only where an op documents that an intermediate the peers
    /// also compute, e.g. `logits / T`, exceeds the float range).
    pub finite: (bool, bool),
}

impl<'a> Case<'a> {
    /// A case with no padding, every coordinate differentiated.
    pub fn new(what: &'a str, x: Vec<f64>) -> Self {
        let n = x.len();
        Case {
            what,
            pad: vec![false; n],
            diff: 0..n,
            x,
            malformed: false,
            expect: None,
            fd: true,
            ks: Vec::new(),
            finite: (true, true),
        }
    }
}

/// Whether two evaluations agree bit for bit (values, gradients, metrics),
/// or fail with the same error kind.
#[track_caller]
pub fn same_outcome(what: &str, a: &Result<Probe, Error>, b: &Result<Probe, Error>) {
    match (a, b) {
        (Ok(a), Ok(b)) => {
            assert_same_bits(&format!("{what} value"), &a.val, &b.val);
            assert_same_bits(&format!("{what} grad"), &a.grad, &b.grad);
            assert_same_bits(&format!("{what} metrics"), &a.metrics, &b.metrics);
            assert_same_bits(&format!("{what} objective"), &[a.obj], &[b.obj]);
        }
        (Err(a), Err(b)) => assert_eq!(
            core::mem::discriminant(a),
            core::mem::discriminant(b),
            "{what}: padding changed the error ({a:?} vs {b:?})"
        ),
        _ => panic!(
            "{what}: padding changed Ok/Err ({:?} vs {:?})",
            a.is_ok(),
            b.is_ok()
        ),
    }
}

fn all_finite(p: &Probe) -> bool {
    p.val.iter().chain(&p.grad).all(|v| v.is_finite())
}

/// One evaluation of an op on the inputs `x`.
pub type Eval<'a> = &'a dyn Fn(&[f64]) -> Result<Probe, Error>;

/// Applies the contract to `case`, evaluating with `f64` and `f32` (each
/// closure maps `x` to the op's [`Probe`]).
#[track_caller]
pub fn check(case: &Case, f64_eval: Eval, f32_eval: Option<Eval>) {
    let what = case.what;
    let keep: Vec<bool> = case.pad.iter().map(|&p| !p).collect();
    let zeros = fill_masked(&case.x, &keep, false);
    let poison = fill_masked(&case.x, &keep, true);
    // 4. padding is invisible (f64 and f32).
    let a = f64_eval(&zeros);
    let b = f64_eval(&poison);
    same_outcome(what, &a, &b);
    // 2. malformed input is a typed error.
    if case.malformed {
        match &a {
            Ok(_) => panic!("{what}: malformed input returned numbers"),
            Err(e) => {
                if let Some(ok) = case.expect {
                    assert!(ok(e), "{what}: unexpected error {e:?}");
                }
            }
        }
    }
    let inputs_finite = zeros.iter().all(|v| v.is_finite());
    let in_f32_range = zeros.iter().all(|v| v.abs() < 1e36);
    if let Some(e32) = f32_eval {
        let a32 = e32(&zeros);
        let b32 = e32(&poison);
        same_outcome(&format!("{what} (f32)"), &a32, &b32);
        assert_eq!(
            a.is_ok(),
            a32.is_ok(),
            "{what}: f32 and f64 disagree on Ok/Err ({:?} vs {:?})",
            a.as_ref().err(),
            a32.as_ref().err()
        );
        // 3. in f32 where the true value (the f64 result) is well inside the
        // f32 range.
        if let (Ok(p64), Ok(p32)) = (&a, &a32) {
            let small = p64.val.iter().chain(&p64.grad).all(|v| v.abs() < 1e30);
            if inputs_finite && in_f32_range && small && case.finite.1 {
                assert_finite(&format!("{what} value (f32)"), &p32.val);
                assert_finite(&format!("{what} grad (f32)"), &p32.grad);
            }
        }
    }
    let Ok(p) = a else { return };
    // 3. finite inputs → finite values and gradients.
    if inputs_finite && case.finite.0 {
        assert_finite(&format!("{what} value"), &p.val);
        assert_finite(&format!("{what} grad"), &p.grad);
    }
    // 5. the closed form matches finite differences where smooth.
    // Finite differences of a sum resolve a coordinate only when no term
    // dwarfs it: probe where inputs, values and gradients are moderate.
    let moderate = zeros.iter().all(|v| v.abs() <= 1e3)
        && p.val.iter().chain(&p.grad).all(|v| v.abs() <= 1e4)
        && p.obj.abs() <= 1e4;
    if case.fd && inputs_finite && moderate && all_finite(&p) {
        let ks: Vec<usize> = case
            .ks
            .iter()
            .copied()
            .filter(|k| case.diff.contains(k) && !case.pad[*k])
            .collect();
        let value = |y: &[f64]| f64_eval(y).ok().map(|q| q.obj);
        check_gradient(what, &value, &zeros, &p.grad, &ks);
    }
}

/// A few coordinates in `0..n` to probe with finite differences.
pub fn probe_coords(u: &mut Unstructured, n: usize) -> ArbResult<Vec<usize>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let k: usize = u.int_in_range(1..=3)?;
    (0..k).map(|_| u.int_in_range(0..=n - 1)).collect()
}

/// A cotangent in `[-2, 2]` (moderate, so finite differences of `Σ c·v`
/// resolve every coordinate).
pub fn cotangent(u: &mut Unstructured) -> ArbResult<f64> {
    let x: u16 = u.arbitrary()?;
    Ok((x as f64 / u16::MAX as f64) * 4.0 - 2.0)
}

/// `n` values of [`cotangent`].
pub fn cotangents(u: &mut Unstructured, n: usize) -> ArbResult<Vec<f64>> {
    (0..n).map(|_| cotangent(u)).collect()
}

/// `ShapeMismatch` (a length that disagrees).
pub fn is_shape(e: &Error) -> bool {
    matches!(e, Error::ShapeMismatch { .. })
}

/// `OutOfRange` (a parameter outside its documented range).
pub fn is_range(e: &Error) -> bool {
    matches!(e, Error::OutOfRange { .. })
}

/// A parameter: usually inside `[lo, hi]`, sometimes a hostile value (NaN,
/// ±inf, negative, huge). Returns `(value, in_range)` by the predicate `ok`.
pub fn param(
    u: &mut Unstructured,
    lo: f64,
    hi: f64,
    ok: impl Fn(f64) -> bool,
) -> ArbResult<(f64, bool)> {
    let tag: u8 = u.arbitrary()?;
    let v = if tag < 16 {
        float(u, hi.abs().max(lo.abs()).max(1.0) * 4.0, true)?
    } else {
        let x: u16 = u.arbitrary()?;
        lo + (hi - lo) * (x as f64 / u16::MAX as f64)
    };
    Ok((v, ok(v)))
}

// ---------------------------------------------------------------------------
// The logits family
// ---------------------------------------------------------------------------

/// Logits: ordinary values, with ±1e30 and (when not `finite`) NaN/±inf.
fn logits(u: &mut Unstructured, n: usize, finite: bool) -> ArbResult<Vec<f64>> {
    floats(u, n, 6.0, finite)
}

/// Token ids in `[0, vocab)`, sometimes one outside (→ `Error::Invalid`).
fn ids(u: &mut Unstructured, n: usize, vocab: usize) -> ArbResult<(Vec<i64>, bool)> {
    let mut bad = false;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let tag: u8 = u.arbitrary()?;
        let id = if tag < 2 {
            bad = true;
            let which: u8 = u.arbitrary()?;
            [-1i64, vocab as i64, i64::MIN, i64::MAX][(which as usize) % 4]
        } else {
            (tag as usize % vocab.max(1)) as i64
        };
        v.push(id);
    }
    Ok((v, bad))
}

/// Decodes `data` into calls of this family's ops and checks the contract
/// of the [module docs](super).
pub fn run(data: &[u8]) {
    let _ = decode(data, |u| {
        let op: u8 = u.arbitrary()?;
        match op % 9 {
            0 => gather(u),
            1 => row_stats(u),
            2 => full_log_softmax(u),
            3 => seq_log_probs(u),
            4 => entropy_agg(u),
            5 => jsd_loss(u),
            6 => jsd_elementwise(u),
            7 => jsd_log_probs(u),
            _ => kd(u),
        }
    });
}

fn rows_vocab(u: &mut Unstructured) -> ArbResult<(usize, usize)> {
    Ok((u.int_in_range(0..=6)?, u.int_in_range(0..=7)?))
}

/// Whether the scaled logits `z / T` and the gradient factor `1/T` stay
/// inside the f64 / f32 range (beyond it the peers' `logits / temperature`
/// overflows too; documented on `Temperature`).
fn scaled_in_range(z: &[f64], t: f64) -> (bool, bool) {
    let m = z
        .iter()
        .filter(|v| v.is_finite())
        .fold(1.0f64, |a, v| a.max(v.abs()))
        / t;
    (m < 1e300, m < 1e36)
}

fn temperature(u: &mut Unstructured) -> ArbResult<(f64, bool)> {
    if u.arbitrary::<bool>()? {
        return Ok((1.0, true));
    }
    param(u, 0.05, 4.0, |t| t.is_finite() && t > 0.0)
}

/// `selective_log_softmax` / `gather_log_softmax`.
fn gather(u: &mut Unstructured) -> ArbResult<()> {
    let (rows, vocab) = rows_vocab(u)?;
    let k: usize = u.int_in_range(0..=3)?;
    let (t, t_ok) = temperature(u)?;
    let finite: bool = u.arbitrary()?;
    let (nl, bad_len) = maybe_wrong_len(u, rows * vocab)?;
    let z = logits(u, nl, finite)?;
    let (targets, bad_id) = ids(u, rows * k, vocab)?;
    let cot = cotangents(u, rows * k)?;
    let selective = k == 1 && t == 1.0 && u.arbitrary::<bool>()?;
    let mut case = Case::new("gather_log_softmax", z.clone());
    case.finite = scaled_in_range(&case.x, t);
    case.malformed = bad_len || bad_id || !t_ok || (k == 0 && rows > 0) || (vocab == 0 && rows > 0);
    case.ks = probe_coords(u, nl)?;
    #[allow(clippy::too_many_arguments)]
    fn eval<F: Real>(
        x: &[f64],
        rows: usize,
        vocab: usize,
        k: usize,
        t: f64,
        ids: &[i64],
        cot: &[f64],
        selective: bool,
    ) -> Result<Probe, Error> {
        let z = cv::<F>(x);
        let c = cv::<F>(cot);
        let mut out = vec![F::zero(); rows * k];
        let mut g = vec![F::zero(); x.len()];
        if selective {
            selective_log_softmax(&z, rows, vocab, ids, &mut out, Some((&c, &mut g)))?;
        } else {
            let temp = Temperature::new(t)?;
            gather_log_softmax(&z, rows, vocab, temp, k, ids, &mut out, Some((&c, &mut g)))?;
        }
        let val = back(&out);
        Ok(Probe {
            obj: dot(cot, &val),
            val,
            grad: back(&g),
            metrics: vec![],
        })
    }
    check(
        &case,
        &|x| eval::<f64>(x, rows, vocab, k, t, &targets, &cot, selective),
        Some(&|x| eval::<f32>(x, rows, vocab, k, t, &targets, &cot, selective)),
    );
    Ok(())
}

/// `entropy_from_logits` and `sum_pi_squared`.
fn row_stats(u: &mut Unstructured) -> ArbResult<()> {
    let (rows, vocab) = rows_vocab(u)?;
    let which: bool = u.arbitrary()?;
    let finite: bool = u.arbitrary()?;
    let (nl, bad_len) = maybe_wrong_len(u, rows * vocab)?;
    let z = logits(u, nl, finite)?;
    let cot = cotangents(u, rows)?;
    let mut case = Case::new(
        if which {
            "entropy_from_logits"
        } else {
            "sum_pi_squared"
        },
        z,
    );
    case.malformed = bad_len || (vocab == 0 && rows > 0);
    case.ks = probe_coords(u, nl)?;
    fn eval<F: Real>(
        x: &[f64],
        rows: usize,
        vocab: usize,
        cot: &[f64],
        entropy: bool,
    ) -> Result<Probe, Error> {
        let z = cv::<F>(x);
        let c = cv::<F>(cot);
        let mut out = vec![F::zero(); rows];
        let mut g = vec![F::zero(); x.len()];
        if entropy {
            entropy_from_logits(&z, rows, vocab, &mut out, Some((&c, &mut g)))?;
        } else {
            sum_pi_squared(&z, rows, vocab, &mut out, Some((&c, &mut g)))?;
        }
        let val = back(&out);
        Ok(Probe {
            obj: dot(cot, &val),
            val,
            grad: back(&g),
            metrics: vec![],
        })
    }
    check(
        &case,
        &|x| eval::<f64>(x, rows, vocab, &cot, which),
        Some(&|x| eval::<f32>(x, rows, vocab, &cot, which)),
    );
    Ok(())
}

/// `log_softmax` + `log_softmax_vjp`.
fn full_log_softmax(u: &mut Unstructured) -> ArbResult<()> {
    let (rows, vocab) = rows_vocab(u)?;
    let (t, t_ok) = temperature(u)?;
    let finite: bool = u.arbitrary()?;
    let (nl, bad_len) = maybe_wrong_len(u, rows * vocab)?;
    let z = logits(u, nl, finite)?;
    let cot = cotangents(u, rows * vocab)?;
    let mut case = Case::new("log_softmax", z);
    case.finite = scaled_in_range(&case.x, t);
    case.malformed = bad_len || !t_ok || (vocab == 0 && rows > 0);
    case.ks = probe_coords(u, nl)?;
    fn eval<F: Real>(
        x: &[f64],
        rows: usize,
        vocab: usize,
        t: f64,
        cot: &[f64],
    ) -> Result<Probe, Error> {
        let temp = Temperature::new(t)?;
        let z = cv::<F>(x);
        let c = cv::<F>(cot);
        let mut out = vec![F::zero(); rows * vocab];
        let mut g = vec![F::zero(); x.len()];
        log_softmax(&z, rows, vocab, temp, &mut out)?;
        log_softmax_vjp(&z, rows, vocab, temp, &c, &mut g)?;
        let val = back(&out);
        Ok(Probe {
            obj: dot(cot, &val),
            val,
            grad: back(&g),
            metrics: vec![],
        })
    }
    check(
        &case,
        &|x| eval::<f64>(x, rows, vocab, t, &cot),
        Some(&|x| eval::<f32>(x, rows, vocab, t, &cot)),
    );
    Ok(())
}

/// `sequence_log_probs`: rows whose label is the ignore index (and the last
/// position when shifting) are padding.
fn seq_log_probs(u: &mut Unstructured) -> ArbResult<()> {
    let d = dims(u)?;
    let vocab: usize = u.int_in_range(0..=6)?;
    let cfg = SequenceLogProbConfig {
        ignore_index: -100,
        average: u.arbitrary()?,
        shift_labels: u.arbitrary()?,
    };
    let finite: bool = u.arbitrary()?;
    let (nl, bad_len) = maybe_wrong_len(u, d.len() * vocab)?;
    let z = logits(u, nl, finite)?;
    let (mut labels, bad_id) = ids(u, d.len(), vocab)?;
    let ignore = mask(u, d.len())?;
    for (l, &ig) in labels.iter_mut().zip(&ignore) {
        if ig {
            *l = -100;
        }
    }
    let shift = usize::from(cfg.shift_labels);
    // A row `r = (b, t)` is read iff t < seq − shift and label[r + shift] is valid.
    let read = |r: usize| {
        let t = r % d.seq.max(1);
        t + shift < d.seq && labels[r + shift] != -100
    };
    let bad_read = (0..d.len()).any(|r| {
        let t = r % d.seq.max(1);
        t + shift < d.seq && {
            let l = labels[r + shift];
            l != -100 && (l < 0 || l as usize >= vocab)
        }
    });
    let cot = cotangents(u, d.batch)?;
    let mut case = Case::new("sequence_log_probs", z);
    if !bad_len && vocab > 0 {
        case.pad = (0..nl).map(|i| !read(i / vocab)).collect();
    }
    case.malformed = bad_len || bad_read || (vocab == 0 && !d.is_empty());
    let _ = bad_id;
    case.ks = probe_coords(u, nl)?;
    fn eval<F: Real>(
        x: &[f64],
        cfg: &SequenceLogProbConfig,
        d: Dims,
        vocab: usize,
        labels: &[i64],
        cot: &[f64],
    ) -> Result<Probe, Error> {
        let z = cv::<F>(x);
        let c = cv::<F>(cot);
        let mut out = vec![F::zero(); d.batch];
        let mut g = vec![F::zero(); x.len()];
        sequence_log_probs(cfg, d, vocab, &z, labels, &mut out, Some((&c, &mut g)))?;
        let val = back(&out);
        Ok(Probe {
            obj: dot(cot, &val),
            val,
            grad: back(&g),
            metrics: vec![],
        })
    }
    check(
        &case,
        &|x| eval::<f64>(x, &cfg, d, vocab, &labels, &cot),
        Some(&|x| eval::<f32>(x, &cfg, d, vocab, &labels, &cot)),
    );
    Ok(())
}

/// `entropy_loss` with every aggregation mode; masked rows are padding.
fn entropy_agg(u: &mut Unstructured) -> ArbResult<()> {
    let d = dims(u)?;
    let vocab: usize = u.int_in_range(0..=6)?;
    let mode = AggMode::ALL[u.int_in_range(0..=4)?];
    let finite: bool = u.arbitrary()?;
    let (nl, bad_len) = maybe_wrong_len(u, d.len() * vocab)?;
    let z = logits(u, nl, finite)?;
    let m = mask(u, d.len())?;
    let c = cotangent(u)?;
    let mut case = Case::new("entropy_loss", z);
    if !bad_len && vocab > 0 {
        case.pad = (0..nl).map(|i| !m[i / vocab]).collect();
    }
    case.malformed = bad_len || (vocab == 0 && !d.is_empty());
    case.ks = probe_coords(u, nl)?;
    fn eval<F: Real>(
        x: &[f64],
        mode: AggMode,
        d: Dims,
        vocab: usize,
        m: &[bool],
        c: f64,
    ) -> Result<Probe, Error> {
        let z = cv::<F>(x);
        let mut scratch = vec![F::zero(); d.len()];
        let mut g = vec![F::zero(); x.len()];
        let norm = GlobalNorm::default();
        let l = entropy_loss(
            mode,
            &norm,
            d,
            vocab,
            &z,
            m,
            &mut scratch,
            Some((F::of(c), &mut g)),
        )?;
        let l2 = entropy_loss(mode, &norm, d, vocab, &z, m, &mut scratch, None)?;
        assert_eq!(
            l.to_f64().to_bits(),
            l2.to_f64().to_bits(),
            "entropy_loss: value depends on whether a gradient is asked"
        );
        let l = l.to_f64();
        Ok(Probe {
            obj: c * l,
            val: vec![l],
            grad: back(&g),
            metrics: vec![],
        })
    }
    check(
        &case,
        &|x| eval::<f64>(x, mode, d, vocab, &m, c),
        Some(&|x| eval::<f32>(x, mode, d, vocab, &m, c)),
    );
    Ok(())
}

fn beta(u: &mut Unstructured) -> ArbResult<(f64, bool)> {
    match u.int_in_range(0..=3)? {
        0 => Ok((0.0, true)),
        1 => Ok((1.0, true)),
        _ => param(u, 0.0, 1.0, |b| (0.0..=1.0).contains(&b)),
    }
}

/// `generalized_jsd_loss`: student logits are differentiated, teacher
/// logits are inputs too; rows outside `valid` are padding in both.
fn jsd_loss(u: &mut Unstructured) -> ArbResult<()> {
    let d = dims(u)?;
    let vocab: usize = u.int_in_range(0..=6)?;
    let (b, b_ok) = beta(u)?;
    let (t, t_ok) = temperature(u)?;
    let reduction = [
        Reduction::BatchMean,
        Reduction::Sum,
        Reduction::Mean,
        Reduction::None,
    ][u.int_in_range(0..=3)?];
    let (nib, nib_ok) = if u.arbitrary()? {
        let (v, ok) = param(u, 1.0, 64.0, |n| n.is_finite() && n >= 1.0)?;
        (Some(v), ok)
    } else {
        (None, true)
    };
    let finite: bool = u.arbitrary()?;
    let n = d.len() * vocab;
    let (ns, bad_s) = maybe_wrong_len(u, n)?;
    let mut x = logits(u, ns, finite)?;
    x.extend(logits(u, n, finite)?);
    let valid = if u.arbitrary()? {
        Some(mask(u, d.len())?)
    } else {
        None
    };
    let c = cotangent(u)?;
    let mut case = Case::new("generalized_jsd_loss", x);
    case.finite = scaled_in_range(&case.x, t);
    case.diff = 0..ns;
    if let (Some(v), false, true) = (&valid, bad_s, vocab > 0) {
        case.pad = (0..2 * n).map(|i| !v[(i % n) / vocab]).collect();
    }
    case.malformed = bad_s
        || !b_ok
        || !t_ok
        || !nib_ok
        || (vocab == 0 && !d.is_empty())
        || (nib.is_none() && reduction == Reduction::None);
    case.ks = probe_coords(u, ns)?;
    #[allow(clippy::too_many_arguments)]
    fn eval<F: Real>(
        x: &[f64],
        ns: usize,
        p: (f64, f64, Reduction, Option<f64>),
        d: Dims,
        vocab: usize,
        valid: Option<&[bool]>,
        c: f64,
    ) -> Result<Probe, Error> {
        let cfg = DistillConfig::new(p.0, p.1, p.2, p.3)?;
        let s = cv::<F>(&x[..ns]);
        let t = cv::<F>(&x[ns..]);
        let mut g = vec![F::zero(); ns];
        let l = generalized_jsd_loss(&cfg, d, vocab, &s, &t, valid, Some((F::of(c), &mut g)))?;
        let l2 = generalized_jsd_loss(&cfg, d, vocab, &s, &t, valid, None)?;
        assert_eq!(l.to_f64().to_bits(), l2.to_f64().to_bits());
        let mut grad = back(&g);
        grad.resize(x.len(), 0.0);
        Ok(Probe {
            obj: c * l.to_f64(),
            val: vec![l.to_f64()],
            grad,
            metrics: vec![],
        })
    }
    let p = (b, t, reduction, nib);
    let v = valid.as_deref();
    check(
        &case,
        &|x| eval::<f64>(x, ns, p, d, vocab, v, c),
        Some(&|x| eval::<f32>(x, ns, p, d, vocab, v, c)),
    );
    Ok(())
}

/// `generalized_jsd_elementwise`.
fn jsd_elementwise(u: &mut Unstructured) -> ArbResult<()> {
    let (rows, vocab) = rows_vocab(u)?;
    let (b, b_ok) = beta(u)?;
    let (t, t_ok) = temperature(u)?;
    let finite: bool = u.arbitrary()?;
    let n = rows * vocab;
    let (ns, bad_s) = maybe_wrong_len(u, n)?;
    let mut x = logits(u, ns, finite)?;
    x.extend(logits(u, n, finite)?);
    let valid = if u.arbitrary()? {
        Some(mask(u, rows)?)
    } else {
        None
    };
    let cot = cotangents(u, n)?;
    let mut case = Case::new("generalized_jsd_elementwise", x);
    case.finite = scaled_in_range(&case.x, t);
    case.diff = 0..ns;
    if let (Some(v), false, true) = (&valid, bad_s, vocab > 0) {
        case.pad = (0..2 * n).map(|i| !v[(i % n) / vocab]).collect();
    }
    case.malformed = bad_s || !b_ok || !t_ok || (vocab == 0 && rows > 0);
    case.ks = probe_coords(u, ns)?;
    #[allow(clippy::too_many_arguments)]
    fn eval<F: Real>(
        x: &[f64],
        ns: usize,
        b: f64,
        t: f64,
        rows: usize,
        vocab: usize,
        valid: Option<&[bool]>,
        cot: &[f64],
    ) -> Result<Probe, Error> {
        let jsd = Jsd::new(b)?;
        let temp = Temperature::new(t)?;
        let s = cv::<F>(&x[..ns]);
        let tl = cv::<F>(&x[ns..]);
        let c = cv::<F>(cot);
        let mut out = vec![F::zero(); rows * vocab];
        let mut g = vec![F::zero(); ns];
        generalized_jsd_elementwise(
            &jsd,
            temp,
            rows,
            vocab,
            &s,
            &tl,
            valid,
            &mut out,
            Some((&c, &mut g)),
        )?;
        let val = back(&out);
        let mut grad = back(&g);
        grad.resize(x.len(), 0.0);
        Ok(Probe {
            obj: dot(cot, &val),
            val,
            grad,
            metrics: vec![],
        })
    }
    let v = valid.as_deref();
    check(
        &case,
        &|x| eval::<f64>(x, ns, b, t, rows, vocab, v, &cot),
        Some(&|x| eval::<f32>(x, ns, b, t, rows, vocab, v, &cot)),
    );
    Ok(())
}

/// `jsd_from_log_probs`, with and without a support mask (outside it,
/// both inputs are padding).
fn jsd_log_probs(u: &mut Unstructured) -> ArbResult<()> {
    let n: usize = u.int_in_range(0..=12)?;
    let (b, b_ok) = beta(u)?;
    let finite: bool = u.arbitrary()?;
    let (nt, bad_t) = maybe_wrong_len(u, n)?;
    // Log-probabilities live in [−inf, 0]: positive finite values (outside
    // the domain, where `e^s` overflows) are not drawn; NaN/±inf are.
    let mut x = lp_or_special(u, n, finite)?;
    x.extend(lp_or_special(u, nt, finite)?);
    let support = if u.arbitrary()? {
        Some(mask(u, n)?)
    } else {
        None
    };
    let cot = cotangents(u, n)?;
    let mut case = Case::new("jsd_from_log_probs", x);
    case.diff = 0..n;
    if let (Some(m), false) = (&support, bad_t) {
        case.pad = (0..2 * n).map(|i| !m[i % n]).collect();
    }
    case.malformed = bad_t || !b_ok;
    case.ks = probe_coords(u, n)?;
    fn eval<F: Real>(
        x: &[f64],
        n: usize,
        b: f64,
        support: Option<&[bool]>,
        cot: &[f64],
    ) -> Result<Probe, Error> {
        let jsd = Jsd::new(b)?;
        let s = cv::<F>(&x[..n]);
        let t = cv::<F>(&x[n..]);
        let c = cv::<F>(cot);
        let mut out = vec![F::zero(); n];
        let mut g = vec![F::zero(); n];
        jsd_from_log_probs(&jsd, &s, &t, support, &mut out, Some((&c, &mut g)))?;
        let val = back(&out);
        let mut grad = back(&g);
        grad.resize(x.len(), 0.0);
        Ok(Probe {
            obj: dot(cot, &val),
            val,
            grad,
            metrics: vec![],
        })
    }
    let m = support.as_deref();
    check(
        &case,
        &|x| eval::<f64>(x, n, b, m, &cot),
        Some(&|x| eval::<f32>(x, n, b, m, &cot)),
    );
    Ok(())
}

/// Log-probabilities (≤ 0), and when not `finite` also NaN/±inf.
pub fn lp_or_special(u: &mut Unstructured, n: usize, finite: bool) -> ArbResult<Vec<f64>> {
    if finite {
        return log_probs(u, n);
    }
    Ok(floats(u, n, 8.0, false)?
        .into_iter()
        .map(|v| if v.is_finite() { -v.abs() } else { v })
        .collect())
}

/// `kd_loss`: rows outside `valid` are padding in both logits.
fn kd(u: &mut Unstructured) -> ArbResult<()> {
    let (rows, vocab) = rows_vocab(u)?;
    let finite: bool = u.arbitrary()?;
    let n = rows * vocab;
    let (ns, bad_s) = maybe_wrong_len(u, n)?;
    let mut x = logits(u, ns, finite)?;
    x.extend(logits(u, n, finite)?);
    let valid = mask(u, rows)?;
    let c = cotangent(u)?;
    let mut case = Case::new("kd_loss", x);
    case.diff = 0..ns;
    if !bad_s && vocab > 0 {
        case.pad = (0..2 * n).map(|i| !valid[(i % n) / vocab]).collect();
    }
    case.malformed = bad_s || (vocab == 0 && rows > 0);
    case.ks = probe_coords(u, ns)?;
    fn eval<F: Real>(
        x: &[f64],
        ns: usize,
        rows: usize,
        vocab: usize,
        valid: &[bool],
        c: f64,
    ) -> Result<Probe, Error> {
        let s = cv::<F>(&x[..ns]);
        let t = cv::<F>(&x[ns..]);
        let mut g = vec![F::zero(); ns];
        let l = kd_loss(rows, vocab, &s, &t, valid, Some((F::of(c), &mut g)))?;
        let mut grad = back(&g);
        grad.resize(x.len(), 0.0);
        Ok(Probe {
            obj: c * l.to_f64(),
            val: vec![l.to_f64()],
            grad,
            metrics: vec![],
        })
    }
    check(
        &case,
        &|x| eval::<f64>(x, ns, rows, vocab, &valid, c),
        Some(&|x| eval::<f32>(x, ns, rows, vocab, &valid, c)),
    );
    Ok(())
}
