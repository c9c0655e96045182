//! Hostile inputs: the contract every op must keep, shared by the cargo-fuzz
//! targets in `fuzz/fuzz_targets/` and the stable corpus-replay test
//! (`conformance/tests/fuzz_corpus.rs`), so CI checks every committed fuzz
//! input without nightly.
//!
//! Each family module exposes `pub fn run(data: &[u8])`: it decodes the bytes
//! (with [`arbitrary::Unstructured`]) into an op, its parameters, shapes,
//! masks and values — NaN, ±inf, subnormals, ±1e30, empty shapes, all-zero
//! masks, singleton groups, mismatched lengths included — calls the op and
//! **panics** when the contract is broken (the fuzzer records a crash; the
//! replay test fails):
//!
//! 1. no panic, no out-of-bounds, no endless loop inside the op;
//! 2. malformed input (a length that disagrees, an out-of-range parameter)
//!    → a typed [`posttrain_core::Error`], never numbers;
//! 3. finite inputs → finite values and finite gradients (within the clamps
//!    each op documents);
//! 4. masked positions holding NaN/±inf change nothing, bit for bit, compared
//!    with the same call whose masked positions hold zeros ([`assert_same_bits`]);
//! 5. where the op is smooth at the point, the closed-form gradient matches a
//!    central finite difference in f64 ([`check_gradient`]).
//!
//! The helpers below decode values and check 2–5; the family modules only
//! map bytes to calls.

use arbitrary::{Result as ArbResult, Unstructured};

pub mod advantage;
pub mod aggregate;
pub mod controllers;
pub mod kl;
pub mod logits;
pub mod policy;
pub mod preference;
pub mod value;
use posttrain_core::Dims;

/// Largest batch / sequence length the decoders produce (keeps each run fast).
pub const MAX_DIM: usize = 9;

/// The special values the decoders mix in.
pub const SPECIALS: [f64; 10] = [
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    1e30,
    -1e30,
    5e-324,
    -1e-310,
    0.0,
    -0.0,
    1000.0,
];

/// A float: usually an ordinary value in `[-scale, scale]`, sometimes one of
/// [`SPECIALS`] (when `specials`), sometimes ±(a huge finite value).
pub fn float(u: &mut Unstructured, scale: f64, specials: bool) -> ArbResult<f64> {
    let tag: u8 = u.arbitrary()?;
    Ok(match tag % 16 {
        0 if specials => SPECIALS[(tag as usize / 16) % SPECIALS.len()],
        1 => {
            let e: i8 = u.arbitrary()?;
            let sign = if tag & 0x80 == 0 { 1.0 } else { -1.0 };
            sign * 10f64.powi((e % 31) as i32)
        }
        _ => {
            let x: u32 = u.arbitrary()?;
            (x as f64 / u32::MAX as f64 * 2.0 - 1.0) * scale
        }
    })
}

/// `n` floats of [`float`]. When `finite`, the specials are never drawn.
pub fn floats(u: &mut Unstructured, n: usize, scale: f64, finite: bool) -> ArbResult<Vec<f64>> {
    (0..n)
        .map(|_| float(u, scale, !finite).map(|x| if finite && !x.is_finite() { 0.0 } else { x }))
        .collect()
}

/// Log-probabilities: non-positive values (occasionally very negative).
pub fn log_probs(u: &mut Unstructured, n: usize) -> ArbResult<Vec<f64>> {
    Ok(floats(u, n, 8.0, true)?
        .into_iter()
        .map(|x| -x.abs())
        .collect())
}

/// A mask of `n` positions (may be all false).
pub fn mask(u: &mut Unstructured, n: usize) -> ArbResult<Vec<bool>> {
    (0..n).map(|_| u.arbitrary()).collect()
}

/// A `[batch, seq]` shape, each side in `0..=MAX_DIM` (empty shapes included).
pub fn dims(u: &mut Unstructured) -> ArbResult<Dims> {
    Ok(Dims::new(
        u.int_in_range(0..=MAX_DIM)?,
        u.int_in_range(0..=MAX_DIM)?,
    ))
}

/// A length that usually equals `n` and sometimes does not (to probe the
/// shape checks). Returns `(len, malformed)`.
pub fn maybe_wrong_len(u: &mut Unstructured, n: usize) -> ArbResult<(usize, bool)> {
    let tag: u8 = u.arbitrary()?;
    Ok(if tag < 8 {
        let len = if tag.is_multiple_of(2) {
            n + 1
        } else {
            n.saturating_sub(1)
        };
        (len, len != n)
    } else {
        (n, false)
    })
}

/// Copies `x` with every position where `mask` is false replaced by `fill`
/// cycling through NaN, +inf, −inf (`poison = true`) or by 0 (`poison = false`).
pub fn fill_masked(x: &[f64], mask: &[bool], poison: bool) -> Vec<f64> {
    x.iter()
        .zip(mask)
        .enumerate()
        .map(|(i, (&v, &m))| {
            if m {
                v
            } else if poison {
                [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][i % 3]
            } else {
                0.0
            }
        })
        .collect()
}

/// Panics unless `a` and `b` are identical bit for bit (NaN payloads included).
#[track_caller]
pub fn assert_same_bits(what: &str, a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            x.to_bits() == y.to_bits(),
            "{what}[{i}]: {x:e} vs {y:e} — masked positions changed the result"
        );
    }
}

/// Panics unless every value is finite.
#[track_caller]
pub fn assert_finite(what: &str, v: &[f64]) {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        panic!("{what}[{i}] = {:e} is not finite for finite inputs", v[i]);
    }
}

/// Checks `grad[k]` against a central finite difference of `value` at `x`
/// for a few coordinates `ks`. Skips coordinates where the function is not
/// smooth at the scale of the probe (the one-sided differences disagree, or
/// the central difference changes when the step shrinks fourfold), and
/// returns how many coordinates were actually compared.
#[track_caller]
pub fn check_gradient(
    what: &str,
    value: &dyn Fn(&[f64]) -> Option<f64>,
    x: &[f64],
    grad: &[f64],
    ks: &[usize],
) -> usize {
    let mut compared = 0;
    for &k in ks {
        if k >= x.len() {
            continue;
        }
        let h = 1e-6 * (1.0 + x[k].abs());
        let at = |d: f64| {
            let mut y = x.to_vec();
            y[k] += d;
            value(&y)
        };
        let (Some(f0), Some(fp), Some(fm)) = (at(0.0), at(h), at(-h)) else {
            continue;
        };
        let (right, left) = ((fp - f0) / h, (f0 - fm) / h);
        let scale = 1.0 + right.abs().max(left.abs());
        // A kink, clamp edge or selection change within ±h (or curvature too
        // high for this h): the one-sided slopes disagree by more than the
        // tolerance below, so the central difference proves nothing. (With
        // a looser skip threshold a kink whose slopes differ by less than
        // the threshold but more than the tolerance fails spuriously.)
        if !(right.is_finite() && left.is_finite()) || (right - left).abs() > 1e-4 * scale {
            continue;
        }
        // Resolved only if halving the step twice agrees: the central
        // difference's error is O(h²·f‴), which one-sided slopes that agree
        // do not bound (an inflection point of a sharp feature, e.g. logits
        // at temperature 1e-5, where the probe's step spans the feature).
        let (Some(fq), Some(fmq)) = (at(h / 4.0), at(-h / 4.0)) else {
            continue;
        };
        let fd_coarse = (fp - fm) / (2.0 * h);
        let fd = (fq - fmq) / (h / 2.0);
        if (fd - fd_coarse).abs() > 0.5e-4 * (1.0 + fd.abs()) {
            continue;
        }
        assert!(
            (grad[k] - fd).abs() <= 1e-4 * (1.0 + fd.abs()),
            "{what}: ∂/∂x[{k}] closed form {:e} vs finite difference {fd:e}",
            grad[k]
        );
        compared += 1;
    }
    compared
}

/// Decodes with `f`, ignoring inputs too short to decode (the fuzzer then
/// simply explores elsewhere).
pub fn decode<T>(data: &[u8], f: impl FnOnce(&mut Unstructured) -> ArbResult<T>) -> Option<T> {
    let mut u = Unstructured::new(data);
    f(&mut u).ok()
}

/// A fuzz target (one per op family; the name is its file in
/// `fuzz/fuzz_targets/`): its name and its entry point.
pub type Target = (&'static str, fn(&[u8]));

/// The fuzz targets, in the order of their names.
pub const TARGETS: &[Target] = &[
    ("advantage", advantage::run),
    ("aggregate", aggregate::run),
    ("controllers", controllers::run),
    ("kl", kl::run),
    ("logits", logits::run),
    ("policy", policy::run),
    ("preference", preference::run),
    ("value", value::run),
];
