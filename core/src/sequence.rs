//! Sequence utilities: response masks from EOS, stop-token truncation, reward
//! penalty masks, entropy and off-policy masks, PF-PPO sampling weights.
//!
//! # Overview
//!
//! | function | what it computes | peers |
//! |---|---|---|
//! | [`response_mask_from_eos`] | valid up to and including the first EOS token of each row | verl `get_response_mask` |
//! | [`truncate_at_first_stop_token`] | fill everything after the first stop token, with the padding mask | torchtune `truncate_sequence_at_first_stop_token` |
//! | [`reward_penalty_mask`] | which sequences' scores to penalise (no EOS, too short) | torchtune `get_reward_penalty_mask` |
//! | [`high_entropy_mask`] | valid tokens whose entropy reaches a quantile of the valid entropies | TRL `GRPOTrainer.get_high_entropy_mask` |
//! | [`off_policy_sequence_mask`] | keep a sequence if `A ≥ 0` or its mean KL to the sampler is small | TRL `GRPOTrainer.get_off_policy_mask` (DeepSeek-V3.2) |
//! | [`pf_ppo_sampling_weights`] | resampling weights from sequence scores | verl `compute_pf_ppo_reweight_data` |
//!
//! None of these is differentiable (masks and sampling weights); they take
//! slices of a row-major `[batch, seq]` matrix ([`Dims`]) and write into
//! caller-provided buffers. Masked positions are selected out, never
//! multiplied, so NaN/±inf in padding cannot change a result.
//!
//! # Example
//!
//! ```
//! use posttrain_core::sequence::response_mask_from_eos;
//! use posttrain_core::Dims;
//! let ids = [5i64, 2, 7, 2, 9, 9];
//! let mut mask = [false; 6];
//! response_mask_from_eos(Dims::new(2, 3), &ids, &[2], &mut mask)?;
//! assert_eq!(mask, [true, true, false, true, false, false]);
//! # Ok::<(), posttrain_core::Error>(())
//! ```

use crate::elem::{Elem, MaskElem, Real};
use crate::error::{check_len, check_param, Error};
use crate::policy::rollout::NanSamplerLogProbs;
use crate::shape::Dims;

/// Marks, per row, every position up to and including the first EOS token.
///
/// # Formula
///
/// ```text
/// e_t = 1[id_t ∈ eos];   mask_t = (Σ_{s ≤ t} e_s − e_t) == 0
/// ```
///
/// # Gradient
///
/// None: a hard mask, not differentiable.
///
/// # Peers
///
/// verl `get_response_mask` (`eos_token` an int or a list).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `response_ids` or `mask` is not `dims.len()` long.
pub fn response_mask_from_eos(
    dims: Dims,
    response_ids: &[i64],
    eos: &[i64],
    mask: &mut [bool],
) -> Result<(), Error> {
    check_len("response_id", response_ids.len(), dims.len())?;
    check_len("response_mask", mask.len(), dims.len())?;
    for r in 0..dims.batch {
        let mut seen = false;
        for t in dims.row(r) {
            mask[t] = !seen;
            seen |= eos.contains(&response_ids[t]);
        }
    }
    Ok(())
}

/// Truncates each row after its first stop token: later positions are set
/// to `fill` in place and flagged in `padding_mask`.
///
/// # Formula
///
/// ```text
/// c_t = #stop tokens in positions ≤ t
/// padding_t = c_t > 1  or  (c_t == 1 and id_t is not a stop token)
/// ```
///
/// (the first stop token itself is kept; a row without one is untouched).
///
/// # Gradient
///
/// None: a hard mask, not differentiable.
///
/// # Peers
///
/// torchtune `truncate_sequence_at_first_stop_token`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `sequences` or `padding_mask` is not `dims.len()` long.
///
/// # Example
///
/// ```
/// use posttrain_core::sequence::truncate_at_first_stop_token;
/// use posttrain_core::Dims;
/// let mut seq = [13i64, 2, 20, 2];
/// let mut pad = [false; 4];
/// truncate_at_first_stop_token(Dims::new(1, 4), &mut seq, &[2], 0, &mut pad)?;
/// assert_eq!(seq, [13, 2, 0, 0]);
/// assert_eq!(pad, [false, false, true, true]);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn truncate_at_first_stop_token(
    dims: Dims,
    sequences: &mut [i64],
    stop_tokens: &[i64],
    fill: i64,
    padding_mask: &mut [bool],
) -> Result<(), Error> {
    check_len("sequences", sequences.len(), dims.len())?;
    check_len("padding_mask", padding_mask.len(), dims.len())?;
    for r in 0..dims.batch {
        let mut seen = false;
        for t in dims.row(r) {
            padding_mask[t] = seen;
            if seen {
                sequences[t] = fill;
            } else if stop_tokens.contains(&sequences[t]) {
                seen = true;
            }
        }
    }
    Ok(())
}

/// Which sequences' scores [`reward_penalty_mask`] flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RewardPenaltyConfig {
    /// Flag sequences without an EOS (no padding position after truncation).
    pub penalise_no_eos: bool,
    /// Flag sequences shorter than this (`None`: no length rule).
    pub min_response_length: Option<i64>,
}

/// Writes, per sequence, whether its score should be penalised.
///
/// # Formula
///
/// ```text
/// penalise_i = (penalise_no_eos and no padding in row i)
///              or (min_response_length = m and seq_len_i < m)
/// ```
///
/// Rows are assumed truncated at their first EOS (see
/// [`truncate_at_first_stop_token`]), so "any padding" means "has an EOS".
///
/// # Gradient
///
/// None: a hard mask, not differentiable.
///
/// # Peers
///
/// torchtune `get_reward_penalty_mask`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `padding_masks` is not `dims.len()` long or
/// `seq_lens`/`penalise` is not `dims.batch` long.
///
/// # Example
///
/// ```
/// use posttrain_core::sequence::{reward_penalty_mask, RewardPenaltyConfig};
/// use posttrain_core::Dims;
/// let pad = [false, false, true, false, false, false];
/// let mut out = [false; 2];
/// let cfg = RewardPenaltyConfig { penalise_no_eos: true, min_response_length: Some(3) };
/// reward_penalty_mask(&cfg, Dims::new(2, 3), &pad, &[2, 3], &mut out)?;
/// assert_eq!(out, [true, true]); // short; no EOS
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn reward_penalty_mask(
    cfg: &RewardPenaltyConfig,
    dims: Dims,
    padding_masks: &[bool],
    seq_lens: &[i64],
    penalise: &mut [bool],
) -> Result<(), Error> {
    check_len("padding_masks", padding_masks.len(), dims.len())?;
    check_len("seq_lens", seq_lens.len(), dims.batch)?;
    check_len("reward_penalty_mask", penalise.len(), dims.batch)?;
    for (r, out) in penalise.iter_mut().enumerate() {
        let no_eos = cfg.penalise_no_eos && !padding_masks[dims.row(r)].iter().any(|&p| p);
        let short = cfg.min_response_length.is_some_and(|m| seq_lens[r] < m);
        *out = no_eos || short;
    }
    Ok(())
}

/// `torch.lerp(a, b, w)`, exactly as torch evaluates it on CPU (an [`Elem`]
/// kernel; the weight is one host scalar).
///
/// # Formula
/// `a + w (b − a)` for `w < ½`, else `b − (b − a)(1 − w)`.
pub fn torch_lerp<E: Elem>(a: E, b: E, w: f64) -> E {
    if w < 0.5 {
        let d = b.sub(a.clone());
        a.add(d.mul_scalar(w))
    } else {
        let d = b.clone().sub(a);
        b.sub(d.mul_scalar(1.0 - w))
    }
}

/// Where the `q`-quantile of `n` sorted values lies: `(i, j, w)` with the
/// quantile `lerp(v_i, v_j, w)` ([`torch_lerp`]); `None` for `n = 0`.
///
/// # Formula
/// `ρ = q·(n − 1)` (in `F`), `i = ⌊ρ⌋`, `j = min(⌈ρ⌉, n − 1)`, `w = ρ − i`.
///
/// # Errors
/// [`Error::OutOfRange`] unless `0 ≤ q ≤ 1`.
pub fn quantile_position<F: Real>(n: usize, q: f64) -> Result<Option<(usize, usize, F)>, Error> {
    check_param((0.0..=1.0).contains(&q), "quantile", q, "must be in [0, 1]")?;
    if n == 0 {
        return Ok(None);
    }
    let rank = F::of(q) * F::of_usize(n - 1);
    // `rank ≥ 0`, so truncation is the floor.
    let below = rank.to_f64() as usize;
    let above = if F::of_usize(below) < rank {
        below + 1
    } else {
        below
    }
    .min(n - 1);
    Ok(Some((below, above, rank - F::of_usize(below))))
}

/// The `q`-quantile of `values` with linear interpolation (`torch.quantile`'s
/// default), sorting `values` in place. NaN if any value is NaN; `None` for
/// an empty slice.
///
/// # Formula
///
/// ```text
/// sorted v, ρ = q·(n − 1), i = ⌊ρ⌋, j = ⌈ρ⌉:  lerp(v_i, v_j, ρ − i)
/// ```
///
/// # Gradient
///
/// Not provided (used for masks).
///
/// # Peers
///
/// `torch.quantile(x, q)` (`interpolation="linear"`, torch's `lerp`
/// evaluation order), as TRL's entropy mask uses it.
///
/// # Errors
///
/// [`Error::OutOfRange`] unless `0 ≤ q ≤ 1`.
pub fn quantile<F: Real>(values: &mut [F], q: f64) -> Result<Option<F>, Error> {
    let Some((below, above, w)) = quantile_position::<F>(values.len(), q)? else {
        return Ok(None);
    };
    if values.iter().any(|v| v.is_nan()) {
        return Ok(Some(F::nan()));
    }
    values.sort_unstable_by(|a, b| a.partial_cmp(b).unwrap_or(core::cmp::Ordering::Equal));
    Ok(Some(torch_lerp(values[below], values[above], w.to_f64())))
}

/// Marks the valid tokens whose entropy is at least the `quantile`-quantile
/// of all valid entropies (the high-entropy "forking" tokens). Returns the
/// threshold (`None` when nothing is valid; then nothing is marked).
///
/// `scratch` must hold at least as many elements as there are valid tokens
/// (`dims.len()` always suffices); it receives the sorted valid entropies.
///
/// # Formula
///
/// ```text
/// τ = quantile({H_t : t valid}, q)      (linear interpolation)
/// mask_t = valid_t and H_t ≥ τ
/// ```
///
/// # Gradient
///
/// None: a hard mask, not differentiable.
///
/// # Peers
///
/// TRL `GRPOTrainer.get_high_entropy_mask` (called with
/// `q = 1 − top_entropy_quantile`), on one process.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for inputs of the wrong length or a too-short
/// scratch; [`Error::OutOfRange`] unless `0 ≤ quantile ≤ 1`.
///
/// # Example
///
/// ```
/// use posttrain_core::sequence::high_entropy_mask;
/// use posttrain_core::Dims;
/// let h = [0.1f64, 0.9, 0.5, f64::NAN];
/// let valid = [true, true, true, false];
/// let (mut out, mut scratch) = ([false; 4], [0.0; 4]);
/// let tau = high_entropy_mask(Dims::new(1, 4), &h, &valid, 0.5, &mut out, &mut scratch)?;
/// assert_eq!(tau, Some(0.5));
/// assert_eq!(out, [false, true, true, false]);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn high_entropy_mask<F: Real>(
    dims: Dims,
    entropies: &[F],
    mask: &[bool],
    quantile_q: f64,
    out: &mut [bool],
    scratch: &mut [F],
) -> Result<Option<F>, Error> {
    check_len("entropies", entropies.len(), dims.len())?;
    check_len("mask", mask.len(), dims.len())?;
    check_len("entropy_mask", out.len(), dims.len())?;
    let n = mask.iter().filter(|&&m| m).count();
    if scratch.len() < n {
        return Err(Error::ShapeMismatch {
            input: "scratch",
            expected: n,
            got: scratch.len(),
        });
    }
    for (s, (&h, _)) in scratch
        .iter_mut()
        .zip(entropies.iter().zip(mask).filter(|(_, &m)| m))
    {
        *s = h;
    }
    let tau = quantile(&mut scratch[..n], quantile_q)?;
    for ((o, &h), &m) in out.iter_mut().zip(entropies).zip(mask) {
        *o = match tau {
            Some(t) => m && h >= t,
            None => false,
        };
    }
    Ok(tau)
}

/// The off-policy sequence mask: keep a sequence when its advantage is
/// non-negative or its mean per-token KL from the sampling policy is at
/// most `threshold`. Writes one flag per row into `keep`. `nan` says what a
/// NaN per-token difference does (a token the sampler could not score).
///
/// # Formula
///
/// ```text
/// KL_i = Σ_{valid t} nan(log μ_t − log π_t) / max(n_i, 1)
/// keep_i = A_i ≥ 0  or  KL_i ≤ δ
/// ```
///
/// `nan` is [`NanSamplerLogProbs::log_diff`]:
/// [`Propagate`](NanSamplerLogProbs::Propagate) (TRL f2cd577) leaves a NaN
/// difference, so `KL_i` is NaN, `NaN ≤ δ` is false and a row with `A_i < 0`
/// is dropped; [`AsOnPolicy`](NanSamplerLogProbs::AsOnPolicy) (TRL 1.16.0,
/// `torch.nan_to_num(…, nan=0.0)`) counts it as 0, and `n_i` still counts it
/// (the denominator is every valid token).
///
/// # Gradient
///
/// None: a hard mask, not differentiable.
///
/// # Peers
///
/// TRL `GRPOTrainer.get_off_policy_mask` (DeepSeek-V3.2's off-policy
/// sequence masking): f2cd577 with
/// [`Propagate`](NanSamplerLogProbs::Propagate), 1.16.0 with
/// [`AsOnPolicy`](NanSamplerLogProbs::AsOnPolicy). TRL f2cd577 multiplies by
/// the mask, so NaN in padding drops the row there; posttrain selects and
/// keeps it (TRL 1.16.0 zeroes the NaN first and keeps it too).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for inputs of the wrong length (`advantages`
/// and `keep`: `dims.batch`); [`Error::OutOfRange`] for a NaN threshold.
///
/// # Example
///
/// ```
/// use posttrain_core::policy::rollout::NanSamplerLogProbs;
/// use posttrain_core::sequence::off_policy_sequence_mask;
/// use posttrain_core::Dims;
/// let adv = [-1.0f64, 1.0];
/// let lp = [-1.0, -1.0, -1.0, -1.0];
/// let sampling = [-0.5, -0.5, -0.5, -0.5]; // mean KL 0.5 in both rows
/// let mut keep = [false; 2];
/// let nan = NanSamplerLogProbs::Propagate;
/// off_policy_sequence_mask(Dims::new(2, 2), &adv, &lp, &sampling, &[true; 4], 0.1, nan, &mut keep)?;
/// assert_eq!(keep, [false, true]);
/// // A token the sampler could not score (NaN) in a row of small KL and A < 0:
/// let sampling = [-1.01, f64::NAN, -0.5, -0.5];
/// off_policy_sequence_mask(Dims::new(2, 2), &adv, &lp, &sampling, &[true; 4], 0.1, nan, &mut keep)?;
/// assert_eq!(keep, [false, true]); // TRL f2cd577: the NaN mean drops it
/// let nan = NanSamplerLogProbs::AsOnPolicy;
/// off_policy_sequence_mask(Dims::new(2, 2), &adv, &lp, &sampling, &[true; 4], 0.1, nan, &mut keep)?;
/// assert_eq!(keep, [true, true]); // TRL 1.16.0: KL = (−0.01 + 0) / 2 ≤ 0.1
/// # Ok::<(), posttrain_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn off_policy_sequence_mask<F: Real>(
    dims: Dims,
    advantages: &[F],
    log_prob: &[F],
    sampling_log_prob: &[F],
    mask: &[bool],
    threshold: f64,
    nan: NanSamplerLogProbs,
    keep: &mut [bool],
) -> Result<(), Error> {
    check_len("advantages", advantages.len(), dims.batch)?;
    check_len("per_token_logps", log_prob.len(), dims.len())?;
    check_len(
        "sampling_per_token_logps",
        sampling_log_prob.len(),
        dims.len(),
    )?;
    check_len("mask", mask.len(), dims.len())?;
    check_len("off_policy_mask", keep.len(), dims.batch)?;
    check_param(
        !threshold.is_nan(),
        "off_policy_threshold",
        threshold,
        "must not be NaN",
    )?;
    for (r, k) in keep.iter_mut().enumerate() {
        let mut sum = F::zero();
        let mut n = 0usize;
        for t in dims.row(r) {
            if mask[t] {
                sum += nan.log_diff(sampling_log_prob[t] - log_prob[t]);
                n += 1;
            }
        }
        let kl = sum / F::of_usize(n.max(1));
        *k = off_policy_keep(advantages[r], kl, threshold);
    }
    Ok(())
}

/// The off-policy keep rule of [`off_policy_sequence_mask`] for one
/// sequence (an [`Elem`] kernel).
///
/// # Formula
/// `keep = A ≥ 0 or KL ≤ δ`.
pub fn off_policy_keep<E: Elem>(advantage: E, kl: E, threshold: f64) -> E::Mask {
    advantage.ge_scalar(0.0).or(kl.le_scalar(threshold))
}

/// How PF-PPO turns sequence scores into resampling weights.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum PfPpoReweight {
    /// `|s|^p`.
    Pow(f64),
    /// 1 for the highest and the lowest scores, 0 otherwise.
    MaxMin,
    /// 0.4 for the highest score, 0.1 otherwise.
    MaxRandom,
}

impl PfPpoReweight {
    /// Parses verl's `reweight_method` (`pow`, `max_min`, `max_random`);
    /// `weight_pow` is used by `pow` only.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownOption`] for another name; [`Error::OutOfRange`] for
    /// a non-finite `weight_pow` with `pow`.
    pub fn parse(method: &str, weight_pow: f64) -> Result<Self, Error> {
        match method {
            "pow" => {
                check_param(
                    weight_pow.is_finite(),
                    "weight_pow",
                    weight_pow,
                    "must be finite",
                )?;
                Ok(PfPpoReweight::Pow(weight_pow))
            }
            "max_min" => Ok(PfPpoReweight::MaxMin),
            "max_random" => Ok(PfPpoReweight::MaxRandom),
            _ => Err(Error::unknown_option(
                "PF-PPO reweight method",
                method,
                "pow, max_min, max_random",
            )),
        }
    }
}

impl core::str::FromStr for PfPpoReweight {
    type Err = Error;
    /// Parses `pow` (with verl's default `weight_pow = 2`), `max_min`,
    /// `max_random`; use [`PfPpoReweight::parse`] for another power.
    fn from_str(s: &str) -> Result<Self, Error> {
        PfPpoReweight::parse(s, 2.0)
    }
}

/// PF-PPO's resampling weights: one per sequence from its score (the sum of
/// the row's token-level scores, every position included), floored at `1e-8`.
///
/// # Formula
///
/// ```text
/// s_i = Σ_t score_{i,t}
/// pow:        w_i = |s_i|^p
/// max_min:    w_i = 1[s_i = max s or s_i = min s]
/// max_random: w_i = 0.4 if s_i = max s else 0.1
/// weight_i = max(w_i + 1e-8, 1e-8)
/// ```
///
/// The draw `multinomial(weight, batch, replacement=True)` is the caller's.
///
/// # Gradient
///
/// None: sampling weights (verl computes them under `no_grad`).
///
/// # Peers
///
/// verl `compute_pf_ppo_reweight_data` (the weights it samples from).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `scores` is not `dims.len()` or `weights`
/// not `dims.batch` long.
///
/// # Example
///
/// ```
/// use posttrain_core::sequence::{pf_ppo_sampling_weights, PfPpoReweight};
/// use posttrain_core::Dims;
/// let scores = [1.0f64, 1.0, -3.0, 0.0];
/// let mut w = [0.0; 2];
/// pf_ppo_sampling_weights(PfPpoReweight::Pow(2.0), Dims::new(2, 2), &scores, &mut w)?;
/// assert!((w[0] - 4.0).abs() < 1e-7 && (w[1] - 9.0).abs() < 1e-7);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn pf_ppo_sampling_weights<F: Real>(
    method: PfPpoReweight,
    dims: Dims,
    scores: &[F],
    weights: &mut [F],
) -> Result<(), Error> {
    check_len("token_level_scores", scores.len(), dims.len())?;
    check_len("weights", weights.len(), dims.batch)?;
    let row_score = |r: usize| scores[dims.row(r)].iter().copied().sum::<F>();
    let (mut hi, mut lo) = (F::neg_infinity(), F::infinity());
    for r in 0..dims.batch {
        let s = row_score(r);
        hi = hi.max(s);
        lo = lo.min(s);
    }
    for (r, w) in weights.iter_mut().enumerate() {
        *w = method.weight(row_score(r), hi, lo);
    }
    Ok(())
}

impl PfPpoReweight {
    /// One sequence's weight from its score `s` and the batch's highest and
    /// lowest scores (an [`Elem`] kernel; see [`pf_ppo_sampling_weights`]).
    ///
    /// # Formula
    /// `pow`: `|s|^p`; `max_min`: `1[s = hi or s = lo]`; `max_random`:
    /// `0.4` if `s = hi` else `0.1`; then `max(w + 1e-8, 1e-8)`.
    pub fn weight<E: Elem>(&self, s: E, hi: E, lo: E) -> E {
        let raw = match *self {
            PfPpoReweight::Pow(p) => s.abs().powf(p),
            PfPpoReweight::MaxMin => {
                // `s ≥ max` is `s = max`, `min ≥ s` is `s = min`.
                let m = s.ge(&hi).or(lo.ge(&s));
                E::select(&m, s.full_like(1.0), s.full_like(0.0))
            }
            PfPpoReweight::MaxRandom => {
                let m = s.ge(&hi);
                E::select(&m, s.full_like(0.4), s.full_like(0.1))
            }
        };
        let eps = raw.full_like(1e-8);
        raw.add_scalar(1e-8).max(eps)
    }
}
