//! From logits to token log-probabilities, entropy and `Σπ²`.
//!
//! # Overview
//!
//! Logits are a row-major `[rows, vocab]` matrix (a `[batch, seq, vocab]`
//! tensor flattened to `batch·seq` rows). Every function works one row at a
//! time with the max-shifted log-sum-exp `lse(z) = m + ln Σ e^{zₖ − m}`,
//! `m = max z`, so logits of ±1e30 neither overflow nor lose the winner.
//!
//! | function | value per row | VJP `∂/∂zₖ` (cotangent `c`) |
//! |---|---|---|
//! | [`selective_log_softmax`] | `z_t − lse(z)` | `c · (1[k=t] − pₖ)` |
//! | [`entropy_from_logits`] | `lse(z) − Σ pₖ zₖ` | `c · pₖ (Σⱼ pⱼ zⱼ − zₖ)` |
//! | [`sum_pi_squared`] | `Σ pₖ²` | `c · 2pₖ (pₖ − Σⱼ pⱼ²)` |
//!
//! with `p = softmax(z)`.
//!
//! # Peers
//!
//! TRL `selective_log_softmax` / `entropy_from_logits`, verl
//! `logprobs_from_logits` / `entropy_from_logits` /
//! `calculate_sum_pi_squared_from_logits`, OpenRLHF `log_probs_from_logits` /
//! `compute_entropy`, torchtune `logits_to_logprobs`: all compute these
//! values; they differ only in chunking, which does not change the math.

use crate::elem::Real;
use crate::error::{check_len, Error};

/// `(max zₖ, lse(z))` of one row. An empty row gives `(-inf, -inf)`.
#[inline]
pub fn row_max_lse<F: Real>(row: &[F]) -> (F, F) {
    let m = row
        .iter()
        .fold(F::neg_infinity(), |a, &b| if b > a { b } else { a });
    if !m.is_finite() {
        // All −inf (or +inf / NaN present): fall back to the naive form, which
        // yields the IEEE answer (−inf, +inf or NaN).
        let s = row.iter().fold(F::zero(), |a, &z| a + z.exp());
        return (m, s.ln());
    }
    let s = row.iter().fold(F::zero(), |a, &z| a + (z - m).exp());
    (m, m + s.ln())
}

fn check_rows<F: Real>(logits: &[F], rows: usize, vocab: usize) -> Result<(), Error> {
    check_len("logits", logits.len(), rows * vocab)?;
    if vocab == 0 && rows > 0 {
        return Err(Error::Empty {
            input: "logits (vocabulary)",
        });
    }
    Ok(())
}

/// Log-probability of each row's target token: `log softmax(z)[t]`.
///
/// # Formula
///
/// `out[r] = z[r, t_r] − lse(z[r, :])`
///
/// # Gradient
///
/// With `vjp = Some((c, g))`: `g[r, k] = c[r] · (1[k = t_r] − softmax(z[r])ₖ)`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths; [`Error::Invalid`] for a target id
/// outside `[0, vocab)`.
///
/// # Example
///
/// ```
/// use posttrain_core::logits::selective_log_softmax;
/// let logits = [0.0f64, 0.0, 1e30, -1e30];
/// let mut out = [0.0; 2];
/// selective_log_softmax(&logits, 2, 2, &[1, 0], &mut out, None)?;
/// assert!((out[0] + core::f64::consts::LN_2).abs() < 1e-15);
/// assert_eq!(out[1], 0.0);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn selective_log_softmax<F: Real>(
    logits: &[F],
    rows: usize,
    vocab: usize,
    targets: &[i64],
    out: &mut [F],
    vjp: Option<(&[F], &mut [F])>,
) -> Result<(), Error> {
    check_rows(logits, rows, vocab)?;
    check_len("targets", targets.len(), rows)?;
    check_len("out", out.len(), rows)?;
    if targets.iter().any(|&t| t < 0 || t as usize >= vocab) {
        return Err(Error::Invalid {
            input: "targets",
            rule: "every target id must lie in [0, vocab)",
        });
    }
    let mut vjp = vjp;
    if let Some((c, g)) = vjp.as_mut() {
        check_len("cotangent", c.len(), rows)?;
        check_len("grad", g.len(), rows * vocab)?;
    }
    for r in 0..rows {
        let z = &logits[r * vocab..(r + 1) * vocab];
        let t = targets[r] as usize;
        let (_, lse) = row_max_lse(z);
        out[r] = z[t] - lse;
        if let Some((c, g)) = vjp.as_mut() {
            let gr = &mut g[r * vocab..(r + 1) * vocab];
            for (k, (gk, &zk)) in gr.iter_mut().zip(z).enumerate() {
                let p = (zk - lse).exp();
                let onehot = if k == t { F::one() } else { F::zero() };
                *gk = c[r] * (onehot - p);
            }
        }
    }
    Ok(())
}

/// Entropy of each row's softmax distribution.
///
/// # Formula
///
/// `H = lse(z) − Σₖ pₖ zₖ`, `p = softmax(z)`.
///
/// # Gradient
///
/// `∂H/∂zₖ = pₖ (Σⱼ pⱼ zⱼ − zₖ)`, times the row's cotangent.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths.
pub fn entropy_from_logits<F: Real>(
    logits: &[F],
    rows: usize,
    vocab: usize,
    out: &mut [F],
    vjp: Option<(&[F], &mut [F])>,
) -> Result<(), Error> {
    check_rows(logits, rows, vocab)?;
    check_len("out", out.len(), rows)?;
    let mut vjp = vjp;
    if let Some((c, g)) = vjp.as_mut() {
        check_len("cotangent", c.len(), rows)?;
        check_len("grad", g.len(), rows * vocab)?;
    }
    for r in 0..rows {
        let z = &logits[r * vocab..(r + 1) * vocab];
        let (_, lse) = row_max_lse(z);
        // E_p[z], skipping p = 0 terms so that z = −inf does not give 0·inf.
        let mean_z = z.iter().fold(F::zero(), |a, &zk| {
            let p = (zk - lse).exp();
            if p > F::zero() {
                a + p * zk
            } else {
                a
            }
        });
        out[r] = lse - mean_z;
        if let Some((c, g)) = vjp.as_mut() {
            let gr = &mut g[r * vocab..(r + 1) * vocab];
            for (gk, &zk) in gr.iter_mut().zip(z) {
                let p = (zk - lse).exp();
                *gk = if p > F::zero() {
                    c[r] * p * (mean_z - zk)
                } else {
                    F::zero()
                };
            }
        }
    }
    Ok(())
}

/// `Σₖ pₖ²` of each row's softmax (the collision probability; verl uses it
/// for the optimal-token-baseline estimator).
///
/// # Gradient
///
/// `∂/∂zₖ Σⱼ pⱼ² = 2pₖ (pₖ − Σⱼ pⱼ²)`, times the row's cotangent.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths.
pub fn sum_pi_squared<F: Real>(
    logits: &[F],
    rows: usize,
    vocab: usize,
    out: &mut [F],
    vjp: Option<(&[F], &mut [F])>,
) -> Result<(), Error> {
    check_rows(logits, rows, vocab)?;
    check_len("out", out.len(), rows)?;
    let mut vjp = vjp;
    if let Some((c, g)) = vjp.as_mut() {
        check_len("cotangent", c.len(), rows)?;
        check_len("grad", g.len(), rows * vocab)?;
    }
    let two = F::of(2.0);
    for r in 0..rows {
        let z = &logits[r * vocab..(r + 1) * vocab];
        let (_, lse) = row_max_lse(z);
        let s2 = z.iter().fold(F::zero(), |a, &zk| {
            let p = (zk - lse).exp();
            a + p * p
        });
        out[r] = s2;
        if let Some((c, g)) = vjp.as_mut() {
            let gr = &mut g[r * vocab..(r + 1) * vocab];
            for (gk, &zk) in gr.iter_mut().zip(z) {
                let p = (zk - lse).exp();
                *gk = c[r] * two * p * (p - s2);
            }
        }
    }
    Ok(())
}
