//! Sequence masks on tensors: response masks from EOS, stop-token
//! truncation, reward-penalty, high-entropy and off-policy masks, PF-PPO
//! sampling weights.
//!
//! The formulas are those of [`posttrain_core::sequence`]. The scans of the
//! core drivers ("seen a stop token before position t") are an `Int` cumsum
//! along the sequence axis; the per-sequence rules are the core's [`Elem`]
//! kernels ([`off_policy_keep`], [`PfPpoReweight::weight`], [`torch_lerp`])
//! run on tensors. The token ids and the lists of EOS / stop tokens are
//! integer metadata: the id lists are host parameters, the id matrices `Int`
//! tensors.
//!
//! | function | what | core counterpart | peers |
//! |---|---|---|---|
//! | [`response_mask_from_eos`] | valid up to and including the first EOS | [`posttrain_core::sequence::response_mask_from_eos`] | verl `get_response_mask` |
//! | [`truncate_at_first_stop_token`] | fill after the first stop token, padding mask | [`posttrain_core::sequence::truncate_at_first_stop_token`] | torchtune `truncate_sequence_at_first_stop_token` |
//! | [`reward_penalty_mask`] | sequences to penalise | [`posttrain_core::sequence::reward_penalty_mask`] | torchtune `get_reward_penalty_mask` |
//! | [`high_entropy_mask`] | valid tokens at or above an entropy quantile | [`posttrain_core::sequence::high_entropy_mask`] | TRL `get_high_entropy_mask` |
//! | [`off_policy_sequence_mask`] | keep `A ≥ 0` or small mean KL | [`posttrain_core::sequence::off_policy_sequence_mask`] | TRL `get_off_policy_mask` |
//! | [`pf_ppo_sampling_weights`] | resampling weights | [`posttrain_core::sequence::pf_ppo_sampling_weights`] | verl `compute_pf_ppo_reweight_data` |
//!
//! None of these is differentiable. Masked positions are selected away, so
//! NaN in padding changes nothing.
//!
//! # Example
//!
//! ```
//! use posttrain_burn::{device, sequence::response_mask_from_eos, to_vec_bool, Int, Tensor};
//! use burn::tensor::TensorData;
//! let dev = device()?;
//! let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![5i64, 2, 7, 2, 9, 9], [2, 3]), &dev);
//! let mask = response_mask_from_eos(ids, &[2]);
//! assert_eq!(to_vec_bool(mask), [true, true, false, true, false, false]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::util::Filled;
use burn::tensor::{Bool, Int, Tensor};
use posttrain_core::policy::rollout::NanSamplerLogProbs;
use posttrain_core::sequence::{
    off_policy_keep, quantile_position, torch_lerp, PfPpoReweight, RewardPenaltyConfig,
};
use posttrain_core::{Dims, Error};

use crate::elem::ElemTensor;
use crate::util::{check_shape, keep, nan_log_diff};

/// `1[id ∈ tokens]` for every position (false everywhere for no tokens).
fn is_any_of(ids: &Tensor<2, Int>, tokens: &[i64]) -> Tensor<2, Bool> {
    let none = ids.clone().equal(ids.clone()).bool_not();
    tokens
        .iter()
        .fold(none, |acc, &t| acc.bool_or(ids.clone().equal_elem(t)))
}

/// `Σ_{s < t} 1[id_s ∈ tokens]` for every position (an exclusive cumsum).
fn seen_before(hit: Tensor<2, Bool>) -> Tensor<2, Int> {
    let e = hit.int();
    e.clone().cumsum(1) - e
}

/// Marks, per row, every position up to and including the first EOS token.
///
/// # Formula
///
/// `e_t = 1[id_t ∈ eos]`, `mask_t = (Σ_{s ≤ t} e_s − e_t) == 0` (an `Int`
/// cumsum), as [`posttrain_core::sequence::response_mask_from_eos`].
///
/// # Gradient
///
/// None: a hard mask.
///
/// # Peers
///
/// verl `get_response_mask`.
///
/// # Errors
///
/// Never fails.
pub fn response_mask_from_eos(response_ids: Tensor<2, Int>, eos: &[i64]) -> Tensor<2, Bool> {
    seen_before(is_any_of(&response_ids, eos)).equal_elem(0)
}

/// Truncates each row after its first stop token: later positions are set
/// to `fill`; returns `(sequences, padding_mask)`.
///
/// # Formula
///
/// `padding_t = Σ_{s < t} 1[id_s ∈ stop] > 0`, `id_t ← fill` where padding
/// (the first stop token is kept), as
/// [`posttrain_core::sequence::truncate_at_first_stop_token`].
///
/// # Gradient
///
/// None: a hard mask.
///
/// # Peers
///
/// torchtune `truncate_sequence_at_first_stop_token`.
///
/// # Errors
///
/// Never fails.
pub fn truncate_at_first_stop_token(
    sequences: Tensor<2, Int>,
    stop_tokens: &[i64],
    fill: i64,
) -> (Tensor<2, Int>, Tensor<2, Bool>) {
    let pad = seen_before(is_any_of(&sequences, stop_tokens)).greater_elem(0);
    (sequences.mask_fill(pad.clone(), fill), pad)
}

/// Per sequence, whether its score should be penalised.
///
/// # Formula
///
/// `penaliseᵢ = (penalise_no_eos and no padding in row i) or
/// (min_response_length = m and seq_lenᵢ < m)`, as
/// [`posttrain_core::sequence::reward_penalty_mask`].
///
/// # Gradient
///
/// None: a hard mask.
///
/// # Peers
///
/// torchtune `get_reward_penalty_mask`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `seq_lens` is not `[batch]`.
pub fn reward_penalty_mask(
    cfg: &RewardPenaltyConfig,
    padding_masks: &Tensor<2, Bool>,
    seq_lens: Tensor<1, Int>,
) -> Result<Tensor<1, Bool>, Error> {
    let [b, _] = padding_masks.dims();
    check_shape("seq_lens", seq_lens.dims(), [b])?;
    let never = seq_lens.clone().equal(seq_lens.clone()).bool_not();
    let no_eos = if cfg.penalise_no_eos {
        padding_masks
            .clone()
            .int()
            .sum_dim(1)
            .reshape([b])
            .equal_elem(0)
    } else {
        never.clone()
    };
    let short = match cfg.min_response_length {
        Some(m) => seq_lens.lower_elem(m),
        None => never,
    };
    Ok(no_eos.bool_or(short))
}

/// Marks the valid tokens whose entropy is at least the `q`-quantile of the
/// valid entropies; returns the mask and the threshold (`None` when nothing
/// is valid).
///
/// # Formula
///
/// `τ = quantile({H_t : t valid}, q)` (linear interpolation,
/// [`quantile_position`] and [`torch_lerp`] on the sorted valid entropies),
/// `mask_t = valid_t and H_t ≥ τ`; `τ` is NaN (nothing marked) when a valid
/// entropy is NaN. The valid count is mask metadata read back to the host
/// (it fixes which sorted entries interpolate).
///
/// # Gradient
///
/// None: a hard mask.
///
/// # Peers
///
/// TRL `GRPOTrainer.get_high_entropy_mask` (one process).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] if `mask` differs in shape;
/// [`Error::OutOfRange`] unless `0 ≤ q ≤ 1`.
pub fn high_entropy_mask(
    entropies: Tensor<2>,
    mask: &Tensor<2, Bool>,
    q: f64,
) -> Result<(Tensor<2, Bool>, Option<Tensor<1>>), Error> {
    let dims = entropies.dims();
    check_shape("mask", mask.dims(), dims)?;
    let n = mask.clone().int().sum().into_scalar::<i64>() as usize;
    let Some((below, above, w)) = quantile_position::<f64>(n, q)? else {
        return Ok((mask.clone().bool_and(mask.clone().bool_not()), None));
    };
    let len = dims[0] * dims[1];
    let nan = entropies.clone().is_nan();
    let any_nan = nan.clone().bool_and(mask.clone()).any();
    // Invalid (and NaN) entries sort last as +inf; the first n sorted entries
    // are then the valid entropies.
    let fill = entropies.filled(f64::INFINITY);
    let sortable = fill.mask_where(mask.clone().bool_and(nan.bool_not()), entropies.clone());
    let sorted = sortable.reshape([len]).sort(0);
    let lo = sorted.clone().narrow(0, below, 1);
    let hi = sorted.narrow(0, above, 1);
    let tau = torch_lerp(ElemTensor(lo), ElemTensor(hi), w).0;
    let tau = tau.filled(f64::NAN).mask_where(any_nan.bool_not(), tau);
    let out = mask
        .clone()
        .bool_and(entropies.greater_equal(tau.clone().reshape([1, 1]).expand(dims)));
    Ok((out, Some(tau)))
}

/// The off-policy sequence mask: keep a sequence when its advantage is
/// non-negative or its mean per-token KL from the sampler is at most the
/// threshold.
///
/// # Formula
///
/// `KLᵢ = Σ_{valid t} nan(log μ_t − log π_t) / max(nᵢ, 1)` (row sums of a
/// selection), `keepᵢ` = [`off_policy_keep`]`(Aᵢ, KLᵢ, δ)`, with `nan` the
/// [`NanSamplerLogProbs`] choice: a NaN difference propagates (TRL f2cd577:
/// the row's KL is NaN and an `A < 0` row is dropped) or counts as 0 over
/// the same `nᵢ` (TRL 1.16.0, `torch.nan_to_num`).
///
/// # Gradient
///
/// None: a hard mask.
///
/// # Peers
///
/// TRL `GRPOTrainer.get_off_policy_mask` (TRL f2cd577 multiplies by the
/// mask, so NaN in padding drops the row there; here, as in the core, it is
/// selected away).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for inputs of the wrong shape;
/// [`Error::OutOfRange`] for a NaN threshold.
pub fn off_policy_sequence_mask(
    advantages: Tensor<1>,
    log_prob: Tensor<2>,
    sampling_log_prob: Tensor<2>,
    mask: &Tensor<2, Bool>,
    threshold: f64,
    nan: NanSamplerLogProbs,
) -> Result<Tensor<1, Bool>, Error> {
    // The core's parameter validation (an empty call).
    posttrain_core::sequence::off_policy_sequence_mask::<f64>(
        Dims::new(0, 0),
        &[],
        &[],
        &[],
        &[],
        threshold,
        nan,
        &mut [],
    )?;
    let [b, s] = log_prob.dims();
    check_shape("sampling_per_token_logps", sampling_log_prob.dims(), [b, s])?;
    check_shape("mask", mask.dims(), [b, s])?;
    check_shape("advantages", advantages.dims(), [b])?;
    let sum = keep(nan_log_diff(nan, sampling_log_prob - log_prob), mask).sum_dim(1);
    let n = mask.clone().float().sum_dim(1).clamp_min(1.0);
    let kl = (sum / n).reshape([b]);
    Ok(off_policy_keep(ElemTensor(advantages), ElemTensor(kl), threshold).0)
}

/// PF-PPO's resampling weights, one per sequence, from the row sums of the
/// token-level scores.
///
/// # Formula
///
/// `sᵢ = Σ_t score_{i,t}`, `weightᵢ` = [`PfPpoReweight::weight`]`(sᵢ, max s,
/// min s)`, as [`posttrain_core::sequence::pf_ppo_sampling_weights`].
///
/// # Gradient
///
/// None: sampling weights.
///
/// # Peers
///
/// verl `compute_pf_ppo_reweight_data`.
///
/// # Errors
///
/// Never fails.
pub fn pf_ppo_sampling_weights(method: PfPpoReweight, scores: Tensor<2>) -> Tensor<1> {
    let [b, _] = scores.dims();
    if b == 0 {
        return Tensor::zeros([0], &scores.device());
    }
    let s = scores.sum_dim(1).reshape([b]);
    let hi = s.clone().max().expand([b]);
    let lo = s.clone().min().expand([b]);
    method
        .weight(ElemTensor(s), ElemTensor(hi), ElemTensor(lo))
        .0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::to_vec;
    #[test]
    fn exclusive_cumsum() {
        let dev = crate::device().unwrap();
        let ids = Tensor::<2, Int>::from_data(
            burn::tensor::TensorData::new(vec![1i64, 2, 3, 2], [1, 4]),
            &dev,
        );
        let seen = seen_before(is_any_of(&ids, &[2]));
        let v: Vec<f64> = to_vec(seen.float());
        assert_eq!(v, [0.0, 0.0, 1.0, 1.0]);
    }
}
