//! From logits to token log-probabilities, entropy and `Σπ²`.
//!
//! # Overview
//!
//! Logits are a row-major `[rows, vocab]` matrix (a `[batch, seq, vocab]`
//! tensor flattened to `batch·seq` rows). Every function works one row at a
//! time with the max-shifted log-sum-exp `lse(z) = m + ln Σ e^{zₖ − m}`,
//! `m = max z`, so logits of ±1e30 neither overflow nor lose the winner, and
//! needs no scratch memory beyond what the signature asks for.
//!
//! With a [`Temperature`] `T`, every formula reads `z / T` for `z` (the peers
//! divide the logits before the log-softmax); the gradients then carry the
//! chain-rule factor `1/T`.
//!
//! | function | value per row | VJP `∂/∂zₖ` (cotangent `c`) | peers |
//! |---|---|---|---|
//! | [`selective_log_softmax`] | `z_t − lse(z)` | `c · (1[k=t] − pₖ)` | TRL `selective_log_softmax`, verl `logprobs_from_logits` |
//! | [`gather_log_softmax`] | `z_{tᵢ}/T − lse(z/T)` for `k` ids per row | `Σᵢ cᵢ (1[k=tᵢ] − pₖ) / T` | TRL top-k `selective_log_softmax`, OpenRLHF `log_probs_from_logits`, torchtune `logits_to_logprobs` |
//! | [`entropy_from_logits`] | `−Σ pₖ log pₖ` | `−c · pₖ (log pₖ + H)` | TRL / verl `entropy_from_logits`, OpenRLHF `compute_entropy` |
//! | [`sum_pi_squared`] | `Σ pₖ²` | `c · 2pₖ (pₖ − Σⱼ pⱼ²)` | verl `calculate_sum_pi_squared_from_logits` |
//! | [`sequence_log_probs`] | `Σ_t log p(label_{t+1})` (or the mean) per sequence | as `gather_log_softmax`, per valid position | torchtune `get_batch_log_probs` |
//! | [`entropy_loss`] | aggregated token entropy | `w_{ij} · ∂H/∂z` | verl `compute_entropy_loss` |
//! | [`log_softmax`] / [`log_softmax_vjp`] | the full `log softmax(z/T)` row | `(gₖ − pₖ Σⱼ gⱼ) / T` | building blocks (distillation) |
//!
//! with `p = softmax(z / T)`.
//!
//! # Peers
//!
//! All peers compute these values; they differ only in chunking (TRL's
//! `chunk_size`, verl's row loop, OpenRLHF's flash-attn cross entropy), which
//! does not change the math. Where a peer produces NaN (a `0 · ∞` in
//! `Σ p·z` for a logit of −∞) posttrain skips the zero-probability term, the
//! limit value.
//!
//! # Example
//!
//! ```
//! use posttrain_core::logits::{entropy_from_logits, gather_log_softmax, Temperature};
//! let logits = [1.0f64, 2.0, 3.0, 0.0, 0.0, 0.0];
//! let mut lp = [0.0; 2];
//! gather_log_softmax(&logits, 2, 3, Temperature::new(0.5)?, 1, &[2, 0], &mut lp, None)?;
//! assert!(lp.iter().all(|&x| x <= 0.0));
//! let mut h = [0.0; 2];
//! entropy_from_logits(&logits, 2, 3, &mut h, None)?;
//! assert!((h[1] - 3f64.ln()).abs() < 1e-12);
//! # Ok::<(), posttrain_core::Error>(())
//! ```

use crate::aggregate::{aggregate, aggregation_weights, AggMode, GlobalNorm};
use crate::elem::{Elem, Real};
use crate::error::{check_len, check_param, Error};
use crate::shape::Dims;

/// A softmax temperature `T > 0` (finite): logits are divided by `T` before
/// the log-softmax.
///
/// # Range
///
/// Every op divides the logits by `T` first, as the peers do. When a scaled
/// logit `z / T` itself exceeds the float range (e.g. `z = 1e30` with
/// `T = 1e-20` in `f32`), that intermediate is ±inf and the results are not
/// finite, exactly as the peers' `logits / temperature`. Likewise every
/// gradient carries the factor `1/T`, which exceeds the float range for a
/// subnormal `T`. For `max(|z|, 1) / T` inside the range, finite logits give
/// finite results and gradients.
///
/// # Errors
///
/// [`Temperature::new`] returns [`Error::OutOfRange`] unless `T` is finite
/// and `> 0`.
///
/// # Peers
///
/// OpenRLHF `log_probs_from_logits(temperature)`, torchtune
/// `logits_to_logprobs(temperature)`, TRL GKD / distillation `temperature`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Temperature(f64);

impl Temperature {
    /// `T = 1`: the plain softmax.
    pub const ONE: Temperature = Temperature(1.0);

    /// A validated temperature.
    pub fn new(t: f64) -> Result<Self, Error> {
        check_param(
            t.is_finite() && t > 0.0,
            "temperature",
            t,
            "must be finite and > 0",
        )?;
        Ok(Temperature(t))
    }

    /// The value `T`.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for Temperature {
    fn default() -> Self {
        Temperature::ONE
    }
}

/// `(max zₖ, lse(z))` of one row. An empty row gives `(-inf, -inf)`.
///
/// # Formula
///
/// `m = max z`, `lse = m + ln Σₖ e^{zₖ − m}`; when `m` is not finite (all
/// −∞, or a +∞ / NaN present) the naive `ln Σ e^{zₖ}` gives the IEEE answer.
///
/// # Peers
///
/// `torch.logsumexp` (every peer's log-softmax).
#[inline]
pub fn row_max_lse<F: Real>(row: &[F]) -> (F, F) {
    scaled_max_lse(row, F::one())
}

/// `(max zₖ/T, lse(z/T))` of one row, dividing each logit by `t` as the
/// peers do (`logits / temperature`). `t = 1` is exactly [`row_max_lse`].
///
/// # Formula
///
/// As [`row_max_lse`] on `z / t` (`t > 0`, so the arg-max is unchanged).
#[inline]
pub fn scaled_max_lse<F: Real>(row: &[F], t: F) -> (F, F) {
    let m = row
        .iter()
        .fold(F::neg_infinity(), |a, &b| if b / t > a { b / t } else { a });
    if !m.is_finite() {
        // All −inf (or +inf / NaN present): fall back to the naive form, which
        // yields the IEEE answer (−inf, +inf or NaN).
        let s = row.iter().fold(F::zero(), |a, &z| a + (z / t).exp());
        return (m, s.ln());
    }
    let s = row.iter().fold(F::zero(), |a, &z| a + (z / t - m).exp());
    (m, m + s.ln())
}

pub(crate) fn check_rows<F: Real>(logits: &[F], rows: usize, vocab: usize) -> Result<(), Error> {
    check_len("logits", logits.len(), rows * vocab)?;
    if vocab == 0 && rows > 0 {
        return Err(Error::Empty {
            input: "logits (vocabulary)",
        });
    }
    Ok(())
}

pub(crate) fn check_ids(ids: &[i64], vocab: usize, input: &'static str) -> Result<(), Error> {
    if ids.iter().any(|&t| t < 0 || t as usize >= vocab) {
        return Err(Error::Invalid {
            input,
            rule: "every token id must lie in [0, vocab)",
        });
    }
    Ok(())
}

/// Writes `log softmax(z / T)` of every row into `out` (`rows · vocab`).
///
/// # Formula
///
/// `out[r, k] = z[r, k]/T − lse(z[r, :]/T)`.
///
/// # Gradient
///
/// See [`log_softmax_vjp`].
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths; [`Error::Empty`] for `vocab = 0`.
pub fn log_softmax<F: Real>(
    logits: &[F],
    rows: usize,
    vocab: usize,
    temperature: Temperature,
    out: &mut [F],
) -> Result<(), Error> {
    check_rows(logits, rows, vocab)?;
    check_len("out", out.len(), rows * vocab)?;
    let t = F::of(temperature.get());
    for (z, o) in logits
        .chunks(vocab.max(1))
        .zip(out.chunks_mut(vocab.max(1)))
    {
        let (_, lse) = scaled_max_lse(z, t);
        for (ok, &zk) in o.iter_mut().zip(z) {
            *ok = zk / t - lse;
        }
    }
    Ok(())
}

/// Turns, in place, a row's cotangent `g = ∂L/∂(log softmax(z/T))` into
/// `∂L/∂z`, given the row's logits `z` and `lse = lse(z/T)` (from
/// [`scaled_max_lse`]).
///
/// # Formula
///
/// `gₖ ← (gₖ − pₖ Σⱼ gⱼ) / T`, `pₖ = exp(zₖ/T − lse)`.
///
/// Positions with `pₖ = 0` (a logit of −∞, or −1e30 next to finite ones)
/// get `gₖ / T`, never `0 · ∞`.
///
/// # Gradient
///
/// This *is* the VJP of `z ↦ log softmax(z/T)`; every other op of this
/// module and of [`distill`](crate::distill) chains through it.
#[inline]
pub fn log_softmax_vjp_row<F: Real>(z: &[F], lse: F, t: F, g: &mut [F]) {
    let total = g.iter().fold(F::zero(), |a, &x| a + x);
    for (gk, &zk) in g.iter_mut().zip(z) {
        let p = (zk / t - lse).exp();
        *gk = log_softmax_vjp_term(*gk, p, total, t.to_f64());
    }
}

/// One element of [`log_softmax_vjp_row`] (an [`Elem`] kernel): from the
/// element's cotangent `gₖ`, its probability `pₖ`, the row's `Σⱼ gⱼ` and
/// the temperature.
///
/// # Formula
///
/// `(gₖ − pₖ Σⱼ gⱼ) / T`, the product selected to 0 where `pₖ = 0`.
#[inline]
pub fn log_softmax_vjp_term<E: Elem>(g: E, p: E, total: E, t: f64) -> E {
    let live = p.gt_scalar(0.0);
    let pt = E::select(&live, p.mul(total), g.full_like(0.0));
    let d = g.clone().sub(pt);
    if t == 1.0 {
        d
    } else {
        let tt = d.full_like(t);
        d.div(tt)
    }
}

/// One element of the entropy's VJP (an [`Elem`] kernel): `c · ∂H/∂zₖ`
/// from `pₖ`, `log pₖ`, the row's entropy `H` and its cotangent `c`.
///
/// # Formula
///
/// `−c · pₖ (log pₖ + H)`, selected to 0 where `pₖ = 0`.
#[inline]
pub fn entropy_vjp_term<E: Elem>(p: E, log_p: E, h: E, c: E) -> E {
    let live = p.gt_scalar(0.0);
    let zero = p.full_like(0.0);
    let g = c.mul(p).mul(log_p.add(h)).neg();
    E::select(&live, g, zero)
}

/// One element of the VJP of [`sum_pi_squared`] (an [`Elem`] kernel):
/// `c · 2pₖ (pₖ − Σⱼ pⱼ²)`.
#[inline]
pub fn sum_pi_squared_vjp_term<E: Elem>(p: E, s2: E, c: E) -> E {
    c.mul(p.clone()).mul(p.sub(s2)).mul_scalar(2.0)
}

/// The VJP of [`log_softmax`]: `grad = ∂L/∂z` from the cotangent `cot =
/// ∂L/∂(log softmax(z/T))`, both `rows · vocab`.
///
/// # Formula
///
/// `grad[r, k] = (cot[r, k] − p[r, k] Σⱼ cot[r, j]) / T`, `p = softmax(z/T)`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths; [`Error::Empty`] for `vocab = 0`.
///
/// # Example
///
/// ```
/// use posttrain_core::logits::{log_softmax_vjp, Temperature};
/// // log-softmax is invariant to adding a constant to the logits, so every
/// // gradient row sums to zero.
/// let mut g = [0.0f64; 3];
/// log_softmax_vjp(&[0.5, -1.0, 2.0], 1, 3, Temperature::ONE, &[1.0, -2.0, 0.5], &mut g)?;
/// assert!(g.iter().sum::<f64>().abs() < 1e-12);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn log_softmax_vjp<F: Real>(
    logits: &[F],
    rows: usize,
    vocab: usize,
    temperature: Temperature,
    cot: &[F],
    grad: &mut [F],
) -> Result<(), Error> {
    check_rows(logits, rows, vocab)?;
    check_len("cotangent", cot.len(), rows * vocab)?;
    check_len("grad", grad.len(), rows * vocab)?;
    let t = F::of(temperature.get());
    let v = vocab.max(1);
    for ((z, c), g) in logits.chunks(v).zip(cot.chunks(v)).zip(grad.chunks_mut(v)) {
        let (_, lse) = scaled_max_lse(z, t);
        g.copy_from_slice(c);
        log_softmax_vjp_row(z, lse, t, g);
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
/// # Peers
///
/// TRL `selective_log_softmax`, verl `logprobs_from_logits` (every path),
/// OpenRLHF `log_probs_from_logits` at `temperature = 1`. For a temperature or
/// several ids per row use [`gather_log_softmax`].
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
    gather_log_softmax(logits, rows, vocab, Temperature::ONE, 1, targets, out, vjp)
}

/// Log-probabilities `log softmax(z / T)[tᵢ]` of `k` target ids per row
/// (`k = 1`: one token per position; `k > 1`: e.g. the top-k ids).
///
/// `targets`, `out` and the cotangent are `rows · k` long, row-major.
///
/// # Formula
///
/// `out[r, i] = z[r, t_{r,i}]/T − lse(z[r, :]/T)`
///
/// # Gradient
///
/// `g[r, j] = (Σᵢ c[r, i] 1[j = t_{r,i}] − p[r, j] Σᵢ c[r, i]) / T`, with
/// `p = softmax(z/T)`.
///
/// # Peers
///
/// TRL `selective_log_softmax` (an index of shape `[B, T, k]`), OpenRLHF
/// `log_probs_from_logits(temperature)`, torchtune
/// `logits_to_logprobs(temperature)`, verl `logprobs_from_logits` (`T = 1`).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths; [`Error::Invalid`] for an id outside
/// `[0, vocab)` or `k = 0` with rows present.
///
/// # Example
///
/// ```
/// use posttrain_core::logits::{gather_log_softmax, Temperature};
/// let mut out = [0.0f64; 2];
/// gather_log_softmax(&[0.0, 0.0, 0.0, 0.0], 1, 4, Temperature::ONE, 2, &[0, 3], &mut out, None)?;
/// assert!((out[0] + 4f64.ln()).abs() < 1e-15 && out[0] == out[1]);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn gather_log_softmax<F: Real>(
    logits: &[F],
    rows: usize,
    vocab: usize,
    temperature: Temperature,
    k: usize,
    targets: &[i64],
    out: &mut [F],
    vjp: Option<(&[F], &mut [F])>,
) -> Result<(), Error> {
    check_rows(logits, rows, vocab)?;
    if k == 0 && rows > 0 {
        return Err(Error::Invalid {
            input: "targets",
            rule: "at least one target id per row is required",
        });
    }
    check_len("targets", targets.len(), rows * k)?;
    check_len("out", out.len(), rows * k)?;
    check_ids(targets, vocab, "targets")?;
    let mut vjp = vjp;
    if let Some((c, g)) = vjp.as_mut() {
        check_len("cotangent", c.len(), rows * k)?;
        check_len("grad", g.len(), rows * vocab)?;
    }
    let t = F::of(temperature.get());
    for r in 0..rows {
        let z = &logits[r * vocab..(r + 1) * vocab];
        let ids = &targets[r * k..(r + 1) * k];
        let (_, lse) = scaled_max_lse(z, t);
        for (o, &id) in out[r * k..(r + 1) * k].iter_mut().zip(ids) {
            *o = z[id as usize] / t - lse;
        }
        if let Some((c, g)) = vjp.as_mut() {
            let gr = &mut g[r * vocab..(r + 1) * vocab];
            gr.iter_mut().for_each(|x| *x = F::zero());
            for (&ci, &id) in c[r * k..(r + 1) * k].iter().zip(ids) {
                gr[id as usize] += ci;
            }
            log_softmax_vjp_row(z, lse, t, gr);
        }
    }
    Ok(())
}

/// The entropy `H = −Σ pₖ log pₖ` of one row's softmax, with the row's
/// `lse`; zero-probability terms are skipped (no `0 · ∞`).
#[inline]
fn row_entropy<F: Real>(z: &[F], lse: F) -> F {
    z.iter().fold(F::zero(), |a, &zk| {
        let lp = zk - lse;
        let p = lp.exp();
        if p > F::zero() {
            a - p * lp
        } else {
            a
        }
    })
}

/// The entropy of `softmax(z / t)` given its `lse`, as [`row_entropy`] on
/// `z / t` (the fused kernels' fallback for rows holding `+inf` or NaN).
#[inline]
pub(crate) fn reference_row_entropy<F: Real>(z: &[F], lse: F, t: F) -> F {
    z.iter().fold(F::zero(), |a, &zk| {
        let lp = zk / t - lse;
        let p = lp.exp();
        if p > F::zero() {
            a - p * lp
        } else {
            a
        }
    })
}

/// Writes `c · ∂H/∂z = −c · pₖ (log pₖ + H)` for one row.
#[inline]
fn row_entropy_vjp<F: Real>(z: &[F], lse: F, h: F, c: F, g: &mut [F]) {
    for (gk, &zk) in g.iter_mut().zip(z) {
        let lp = zk - lse;
        *gk = entropy_vjp_term(lp.exp(), lp, h, c);
    }
}

/// Entropy of each row's softmax distribution.
///
/// # Formula
///
/// `H = −Σₖ pₖ log pₖ = lse(z) − Σₖ pₖ zₖ`, `p = softmax(z)`, evaluated in
/// the first form (log-probabilities `zₖ − lse` first), which keeps rows of
/// ±1e30 logits finite.
///
/// # Gradient
///
/// `∂H/∂zₖ = −pₖ (log pₖ + H) = pₖ (Σⱼ pⱼ zⱼ − zₖ)`, times the row's cotangent.
///
/// # Peers
///
/// TRL and verl `entropy_from_logits`, OpenRLHF `compute_entropy` (all
/// `lse − Σ p·z`; they give NaN for a logit of −∞, posttrain skips the
/// `p = 0` term).
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
        let h = row_entropy(z, lse);
        out[r] = h;
        if let Some((c, g)) = vjp.as_mut() {
            row_entropy_vjp(z, lse, h, c[r], &mut g[r * vocab..(r + 1) * vocab]);
        }
    }
    Ok(())
}

/// `Σₖ pₖ²` of each row's softmax (the collision probability; verl uses it
/// for the optimal-token-baseline estimator).
///
/// # Formula
///
/// `Σₖ pₖ²`, `p = softmax(z)`.
///
/// # Gradient
///
/// `∂/∂zₖ Σⱼ pⱼ² = 2pₖ (pₖ − Σⱼ pⱼ²)`, times the row's cotangent.
///
/// # Peers
///
/// verl `calculate_sum_pi_squared_from_logits`.
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
                *gk = sum_pi_squared_vjp_term((zk - lse).exp(), s2, c[r]);
            }
        }
    }
    Ok(())
}

/// How [`sequence_log_probs`] turns per-token label log-probabilities into one
/// number per sequence.
///
/// # Peers
///
/// [`SequenceLogProbConfig::torchtune`] is torchtune `get_batch_log_probs`
/// (labels shifted by one, ignore index −100, sum unless
/// `return_average_logprobs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SequenceLogProbConfig {
    /// Label id that marks a position to skip (torchtune `label_pad_token_id`).
    pub ignore_index: i64,
    /// `true`: the masked mean `Σ / (n + 1e-8)` (torchtune
    /// `return_average_logprobs`); `false`: the sum.
    pub average: bool,
    /// `true`: logits at position `t` score the label at `t + 1` (a causal LM's
    /// raw outputs); `false`: logits and labels are already aligned.
    pub shift_labels: bool,
}

impl SequenceLogProbConfig {
    /// torchtune `get_batch_log_probs(label_pad_token_id=-100,
    /// return_average_logprobs=average)`.
    pub fn torchtune(average: bool) -> Self {
        SequenceLogProbConfig {
            ignore_index: -100,
            average,
            shift_labels: true,
        }
    }
}

/// Per-sequence log-probability of the labels: the sum (or mean) over valid
/// positions of `log softmax(z)[label]`.
///
/// `logits` is `[batch, seq, vocab]` (`dims = [batch, seq]`), `labels` is
/// `[batch, seq]`, `out` (and the cotangent) one value per sequence.
///
/// # Formula
///
/// With shifting, position `t ∈ [0, seq−1)` scores `label_{t+1}`; a position
/// is valid when its label `≠ ignore_index`:
/// `out[b] = Σ_valid log pₜ(labelₜ₊₁)`, or that sum `/ (n_b + 1e-8)` when
/// averaging (`n_b` valid positions; an empty row gives 0).
///
/// # Gradient
///
/// `∂out[b]/∂z[b, t, j] = w_b (1[j = label] − p[b, t, j])` at valid positions
/// (`w_b = 1` or `1/(n_b + 1e-8)`), 0 elsewhere, including the last position
/// when shifting. Ignored positions are never read, so NaN there cannot leak.
///
/// # Peers
///
/// torchtune `get_batch_log_probs` ([`SequenceLogProbConfig::torchtune`]).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths; [`Error::Invalid`] for a valid label
/// outside `[0, vocab)`.
///
/// # Example
///
/// ```
/// use posttrain_core::logits::{sequence_log_probs, SequenceLogProbConfig};
/// use posttrain_core::Dims;
/// let logits = [0.0f64; 3 * 2];
/// let mut out = [0.0; 1];
/// let cfg = SequenceLogProbConfig::torchtune(false);
/// sequence_log_probs(&cfg, Dims::new(1, 3), 2, &logits, &[-100, 1, 0], &mut out, None)?;
/// assert!((out[0] + 2.0 * 2f64.ln()).abs() < 1e-12);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn sequence_log_probs<F: Real>(
    cfg: &SequenceLogProbConfig,
    dims: Dims,
    vocab: usize,
    logits: &[F],
    labels: &[i64],
    out: &mut [F],
    vjp: Option<(&[F], &mut [F])>,
) -> Result<(), Error> {
    let rows = dims.len();
    check_rows(logits, rows, vocab)?;
    check_len("labels", labels.len(), rows)?;
    check_len("out", out.len(), dims.batch)?;
    let mut vjp = vjp;
    if let Some((c, g)) = vjp.as_mut() {
        check_len("cotangent", c.len(), dims.batch)?;
        check_len("grad", g.len(), rows * vocab)?;
    }
    let shift = usize::from(cfg.shift_labels);
    let positions = dims.seq.saturating_sub(shift);
    // Validate every label that will be read.
    for b in 0..dims.batch {
        for t in 0..positions {
            let l = labels[b * dims.seq + t + shift];
            if l != cfg.ignore_index && (l < 0 || l as usize >= vocab) {
                return Err(Error::Invalid {
                    input: "labels",
                    rule: "every label other than the ignore index must lie in [0, vocab)",
                });
            }
        }
    }
    for b in 0..dims.batch {
        let mut sum = F::zero();
        let mut n = 0usize;
        for t in 0..positions {
            let l = labels[b * dims.seq + t + shift];
            if l == cfg.ignore_index {
                continue;
            }
            let row = b * dims.seq + t;
            let z = &logits[row * vocab..(row + 1) * vocab];
            let (_, lse) = row_max_lse(z);
            sum += z[l as usize] - lse;
            n += 1;
        }
        let denom = if cfg.average {
            F::of_usize(n) + F::of(1e-8)
        } else {
            F::one()
        };
        out[b] = if n == 0 { F::zero() } else { sum / denom };
        if let Some((c, g)) = vjp.as_mut() {
            let cw = c[b] / denom;
            for t in 0..dims.seq {
                let row = b * dims.seq + t;
                let gr = &mut g[row * vocab..(row + 1) * vocab];
                gr.iter_mut().for_each(|x| *x = F::zero());
                if t >= positions {
                    continue;
                }
                let l = labels[row + shift];
                if l == cfg.ignore_index {
                    continue;
                }
                let z = &logits[row * vocab..(row + 1) * vocab];
                let (_, lse) = row_max_lse(z);
                gr[l as usize] = cw;
                log_softmax_vjp_row(z, lse, F::one(), gr);
            }
        }
    }
    Ok(())
}

/// The aggregated entropy of the token distributions: each valid token's
/// [`entropy_from_logits`], reduced with [`aggregate`].
///
/// `logits` is `[batch, seq, vocab]`, `mask` `[batch, seq]`; `scratch` is a
/// caller buffer of `batch · seq` elements (it receives the per-token
/// entropies, or the aggregation weights when a gradient is requested).
/// `vjp = Some((c, grad))` writes `c · ∂L/∂logits` into `grad`.
///
/// # Formula
///
/// `L = Σᵢⱼ wᵢⱼ H(z[i, j])` with `w` from
/// [`aggregation_weights`].
///
/// # Gradient
///
/// `∂L/∂z[i, j, k] = −wᵢⱼ pₖ (log pₖ + H)`, 0 on masked positions (never
/// computed there, so NaN logits in padding cannot leak).
///
/// # Peers
///
/// verl `compute_entropy_loss(logits, response_mask, loss_agg_mode)` with
/// `GlobalNorm::default()` (verl passes no global normalizers here).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths; the errors of
/// [`aggregate`].
///
/// # Example
///
/// ```
/// use posttrain_core::aggregate::{AggMode, GlobalNorm};
/// use posttrain_core::logits::entropy_loss;
/// use posttrain_core::Dims;
/// let logits = [0.0f64, 0.0, f64::NAN, 1.0];
/// let mut scratch = [0.0; 2];
/// let l = entropy_loss(AggMode::TokenMean, &GlobalNorm::default(), Dims::new(1, 2), 2,
///                      &logits, &[true, false], &mut scratch, None)?;
/// assert!((l - 2f64.ln()).abs() < 1e-12);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn entropy_loss<F: Real>(
    mode: AggMode,
    norm: &GlobalNorm,
    dims: Dims,
    vocab: usize,
    logits: &[F],
    mask: &[bool],
    scratch: &mut [F],
    vjp: Option<(F, &mut [F])>,
) -> Result<F, Error> {
    let rows = dims.len();
    check_rows(logits, rows, vocab)?;
    check_len("mask", mask.len(), rows)?;
    check_len("scratch", scratch.len(), rows)?;
    if let Some((_, g)) = vjp.as_ref() {
        check_len("grad", g.len(), rows * vocab)?;
    }
    for r in 0..rows {
        scratch[r] = if mask[r] {
            let z = &logits[r * vocab..(r + 1) * vocab];
            let (_, lse) = row_max_lse(z);
            row_entropy(z, lse)
        } else {
            F::zero()
        };
    }
    let loss = aggregate(mode, norm, dims, scratch, mask, None)?;
    if let Some((c, g)) = vjp {
        aggregation_weights(mode, norm, dims, mask, scratch)?;
        for r in 0..rows {
            let gr = &mut g[r * vocab..(r + 1) * vocab];
            if !mask[r] {
                gr.iter_mut().for_each(|x| *x = F::zero());
                continue;
            }
            let z = &logits[r * vocab..(r + 1) * vocab];
            let (_, lse) = row_max_lse(z);
            let h = row_entropy(z, lse);
            row_entropy_vjp(z, lse, h, c * scratch[r], gr);
        }
    }
    Ok(loss)
}
