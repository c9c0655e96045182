//! Advantage estimators: GAE, GRPO group z-scores and their family, RLOO,
//! REINFORCE++, ReMax, OPO, GPG, pass@k, optimal token baselines.
//!
//! # Overview
//!
//! Advantages are constants to the policy loss (every peer computes them
//! under `no_grad`), so these ops return values only.
//!
//! | estimator | per-sequence / per-token formula | peers |
//! |---|---|---|
//! | [`gae_advantages_returns`] | `Aₜ = δₜ + γλAₜ₊₁`, whitened | verl `gae`, torchtune `estimate_advantages` |
//! | [`group_zscore_advantages`] | `(s − mean_g)/(std_g + ε)` | verl `grpo`, `grpo_vectorized`, torchtune GRPO |
//! | [`multi_reward_group_advantages`] | NaN-aware z-score of weighted rewards | TRL GRPO (`scale_rewards`, multi-objective) |
//! | [`gdpo_advantages`] | Σₖ wₖ·zscoreₖ, whitened over tokens | verl `gdpo` |
//! | [`pass_at_k_advantages`] | best − second best, only for the best | verl `grpo_passk` |
//! | [`leave_one_out_advantages`] | `s − mean of the others` | verl `rloo`, `rloo_vectorized` |
//! | [`leave_one_out_reward_advantages`] | RLOO with k1 KL, clip, normalisation | TRL RLOO |
//! | [`group_mean_baseline_advantages`] | `s − mean_g` | verl `reinforce_plus_plus_baseline` (then whitened) |
//! | [`gpg_advantages`] | `α (s − mean_g) / f_norm` | verl `gpg` |
//! | [`length_weighted_baseline_advantages`] | `s − Σ len·s / Σ len` | verl `opo` |
//! | [`reinforce_plus_plus_advantages`] | whitened discounted returns | verl `reinforce_plus_plus` |
//! | [`remax_advantages`] | `Gₜ − b` | verl `remax` |
//! | [`optimal_token_baseline_advantages`] | `Gₜ − Σ G W / Σ W` per step | verl `optimal_token_baseline`, `tir_optimal_token_baseline` |
//!
//! # Element-wise kernels
//!
//! The per-element parts of the token-level drivers are generic over
//! [`Elem`] — [`gae_step`] (one step of the GAE recursion) and
//! [`otb_token_weight`] (the OTB path-variance proxy) — so the drivers here
//! and posttrain-burn's tensor ops run the very same formula.
//!
//! # Groups
//!
//! Group ids (`index`) are arbitrary `i64`s, one per sequence; members of a
//! group need not be contiguous. The caller passes a `perm` scratch of one
//! `usize` per sequence; the op sorts positions by group id in it (no
//! allocation). Where peers disagree on singleton groups ([`SingletonGroup`])
//! or on the std epsilon the configs take explicit parameters plus presets.
//!
//! # Peer quirks reproduced
//!
//! * verl's outcome estimators score a sequence by summing its **whole**
//!   `token_level_rewards` row, padding included ([`outcome_scores`]).
//! * verl GAE whitens the advantages over valid tokens but does not re-mask
//!   them; torchtune's GAE ignores the mask in the recursion, whitens with the
//!   mean added back, then zeroes masked positions.
//! * REINFORCE++: masked tokens drop their reward and pass the running return
//!   through undiscounted.
//! * GPG ignores its `alpha` argument: `α = B / max(1, #nonzero scores)`.
//!
//! # Example
//!
//! ```
//! use posttrain_core::advantage::{group_zscore_advantages, GroupNormConfig};
//! use posttrain_core::Preset;
//!
//! let scores = [1.0f64, 0.0, 1.0, 0.5, 0.5, 2.0];
//! let index = [7i64, 7, 3, 7, 3, 9];
//! let mut perm = [0usize; 6];
//! let mut adv = [0.0; 6];
//! group_zscore_advantages(&GroupNormConfig::preset(Preset::Verl), &scores, &index, &mut perm, &mut adv)?;
//! assert!((adv[0] + adv[1] + adv[3]).abs() < 1e-12);
//! assert!((adv[5] - 2.0 / (1.0 + 1e-6)).abs() < 1e-12); // singleton: mean 0, std 1
//! # Ok::<(), posttrain_core::Error>(())
//! ```

// Index loops over rows, groups and parallel slices read clearer here.
#![allow(clippy::needless_range_loop)]

use crate::elem::{Elem, Real};
use crate::error::{check_len, check_param, Error};
use crate::preset::Preset;
use crate::shape::Dims;
use crate::stats::{masked_whiten_in_place, Reduce, WhitenConfig};

/// The advantage estimators by their verl names (`algorithm.adv_estimator`),
/// so a configuration string maps onto a function of this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub enum AdvantageEstimator {
    /// `gae` → [`gae_advantages_returns`].
    Gae,
    /// `grpo` → [`group_zscore_advantages`].
    Grpo,
    /// `grpo_vectorized` → [`group_zscore_advantages`] (same numbers).
    GrpoVectorized,
    /// `grpo_passk` → [`pass_at_k_advantages`].
    GrpoPassK,
    /// `gdpo` → [`gdpo_advantages`].
    Gdpo,
    /// `gpg` → [`gpg_advantages`].
    Gpg,
    /// `rloo` → [`leave_one_out_advantages`] (singleton keeps its score).
    Rloo,
    /// `rloo_vectorized` → [`leave_one_out_advantages`] (singleton gets 0).
    RlooVectorized,
    /// `opo` → [`length_weighted_baseline_advantages`].
    Opo,
    /// `reinforce_plus_plus` → [`reinforce_plus_plus_advantages`].
    ReinforcePlusPlus,
    /// `reinforce_plus_plus_baseline` → [`group_mean_baseline_advantages`], whitened.
    ReinforcePlusPlusBaseline,
    /// `remax` → [`remax_advantages`].
    Remax,
    /// `optimal_token_baseline` → [`optimal_token_baseline_advantages`].
    OptimalTokenBaseline,
    /// `tir_optimal_token_baseline` → [`optimal_token_baseline_advantages`] with compact steps.
    MultiTurnOptimalTokenBaseline,
}

impl AdvantageEstimator {
    /// Every estimator with its verl name.
    pub const NAMES: [(&'static str, AdvantageEstimator); 14] = [
        ("gae", AdvantageEstimator::Gae),
        ("grpo", AdvantageEstimator::Grpo),
        ("grpo_vectorized", AdvantageEstimator::GrpoVectorized),
        ("grpo_passk", AdvantageEstimator::GrpoPassK),
        ("gdpo", AdvantageEstimator::Gdpo),
        ("gpg", AdvantageEstimator::Gpg),
        ("rloo", AdvantageEstimator::Rloo),
        ("rloo_vectorized", AdvantageEstimator::RlooVectorized),
        ("opo", AdvantageEstimator::Opo),
        ("reinforce_plus_plus", AdvantageEstimator::ReinforcePlusPlus),
        (
            "reinforce_plus_plus_baseline",
            AdvantageEstimator::ReinforcePlusPlusBaseline,
        ),
        ("remax", AdvantageEstimator::Remax),
        (
            "optimal_token_baseline",
            AdvantageEstimator::OptimalTokenBaseline,
        ),
        (
            "tir_optimal_token_baseline",
            AdvantageEstimator::MultiTurnOptimalTokenBaseline,
        ),
    ];

    /// The verl name.
    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, e)| *e == self)
            .map_or("?", |(n, _)| n)
    }
}

impl core::str::FromStr for AdvantageEstimator {
    type Err = Error;
    /// Parses a verl `adv_estimator` name (case-sensitive, as verl).
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, e)| *e)
            .ok_or_else(|| {
                Error::unknown_option(
                    "advantage estimator",
                    s,
                    "gae, grpo, grpo_vectorized, grpo_passk, gdpo, gpg, rloo, rloo_vectorized, opo, \
                     reinforce_plus_plus, reinforce_plus_plus_baseline, remax, \
                     optimal_token_baseline, tir_optimal_token_baseline",
                )
            })
    }
}

// ---------------------------------------------------------------------------
// Grouping
// ---------------------------------------------------------------------------

/// Sorts `0..n` by `(index, position)` into `perm`.
fn sort_groups(index: &[i64], perm: &mut [usize]) -> Result<(), Error> {
    check_len("perm", perm.len(), index.len())?;
    for (k, p) in perm.iter_mut().enumerate() {
        *p = k;
    }
    perm.sort_unstable_by_key(|&i| (index[i], i));
    Ok(())
}

/// Calls `f(id, members)` for every group (members in position order).
fn for_each_group(
    index: &[i64],
    perm: &[usize],
    mut f: impl FnMut(i64, &[usize]) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut start = 0;
    while start < perm.len() {
        let id = index[perm[start]];
        let mut end = start + 1;
        while end < perm.len() && index[perm[end]] == id {
            end += 1;
        }
        f(id, &perm[start..end])?;
        start = end;
    }
    Ok(())
}

fn check_groups<F>(scores: &[F], index: &[i64], out: &[F]) -> Result<(), Error> {
    if scores.is_empty() {
        return Err(Error::Empty { input: "scores" });
    }
    check_len("index", index.len(), scores.len())?;
    check_len("out", out.len(), scores.len())
}

/// `(mean, std)` of the members' scores (`bessel`: divide by `n − 1`).
fn group_mean_std<F: Real>(scores: &[F], members: &[usize], bessel: bool) -> (F, F) {
    let n = F::of_usize(members.len());
    let mean = members.iter().map(|&i| scores[i]).sum::<F>() / n;
    let sq: F = members
        .iter()
        .map(|&i| (scores[i] - mean) * (scores[i] - mean))
        .sum();
    let d = if bessel { n - F::one() } else { n };
    (mean, (sq / d).sqrt())
}

// ---------------------------------------------------------------------------
// Scores and broadcasting
// ---------------------------------------------------------------------------

/// One score per sequence: the sum of its **whole** row of token rewards,
/// padding included (verl's outcome estimators).
///
/// # Formula
/// ```text
/// s_i = Σ_t r_{i,t}
/// ```
/// # Gradient
/// None (advantages are constants).
/// # Peers
/// verl `token_level_rewards.sum(dim=-1)`.
/// # Errors
/// [`Error::ShapeMismatch`] when `rewards` or `out` do not fit `dims`.
pub fn outcome_scores<F: Real>(dims: Dims, rewards: &[F], out: &mut [F]) -> Result<(), Error> {
    check_len("token_level_rewards", rewards.len(), dims.len())?;
    check_len("scores", out.len(), dims.batch)?;
    for (i, o) in out.iter_mut().enumerate() {
        *o = rewards[dims.row(i)].iter().copied().sum();
    }
    Ok(())
}

/// Writes each sequence's scalar at its valid tokens and 0 elsewhere.
///
/// # Formula
/// ```text
/// out_{i,t} = a_i if mask_{i,t} else 0
/// ```
/// # Gradient
/// None.
/// # Peers
/// verl `scores.unsqueeze(-1) * response_mask` (as a selection).
/// # Errors
/// [`Error::ShapeMismatch`] on inconsistent lengths.
pub fn broadcast_to_tokens<F: Real>(
    dims: Dims,
    per_seq: &[F],
    mask: &[bool],
    out: &mut [F],
) -> Result<(), Error> {
    check_len("per_seq", per_seq.len(), dims.batch)?;
    check_len("response_mask", mask.len(), dims.len())?;
    check_len("out", out.len(), dims.len())?;
    for i in 0..dims.batch {
        for j in dims.row(i) {
            out[j] = if mask[j] { per_seq[i] } else { F::zero() };
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Group z-scores (GRPO)
// ---------------------------------------------------------------------------

/// What a group with a single member gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum SingletonGroup {
    /// Mean 0, std 1: the score itself, divided by `1 + ε` when scaling (verl `grpo`, `gpg`).
    MeanZeroStdOne,
    /// The raw score (verl `rloo`).
    RawScore,
    /// Zero (TRL; verl `rloo_vectorized`).
    Zero,
}

/// Group z-score parameters.
///
/// # Peers
/// | preset | `scale_by_std` | `std_eps` | `bessel` | `singleton` |
/// |---|---|---|---|---|
/// | `Verl` (`grpo`, `grpo_vectorized`) | true | `1e-6` | true | `MeanZeroStdOne` |
/// | `Trl` | true | `1e-4` | true | `Zero` |
/// | `Torchtune` | true | `1e-4` | true | `Zero` |
/// | `OpenRlhf` (`group_norm`) | true | `1e-9` | true | `Zero` |
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GroupNormConfig {
    /// Divide by `std + std_eps` (false: Dr. GRPO, mean-centering only).
    pub scale_by_std: bool,
    /// Added to the std (not the variance).
    pub std_eps: f64,
    /// Bessel-corrected std (`n − 1`).
    pub bessel: bool,
    /// Convention for singleton groups.
    pub singleton: SingletonGroup,
}

impl GroupNormConfig {
    /// Validates the parameters.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] for a negative or non-finite `std_eps`.
    pub fn new(
        scale_by_std: bool,
        std_eps: f64,
        bessel: bool,
        singleton: SingletonGroup,
    ) -> Result<Self, Error> {
        check_param(
            std_eps >= 0.0 && std_eps.is_finite(),
            "epsilon",
            std_eps,
            "must be finite and ≥ 0",
        )?;
        Ok(GroupNormConfig {
            scale_by_std,
            std_eps,
            bessel,
            singleton,
        })
    }

    /// The peer's convention (see the table above).
    pub fn preset(preset: Preset) -> Self {
        let (std_eps, singleton) = match preset {
            Preset::Verl => (1e-6, SingletonGroup::MeanZeroStdOne),
            Preset::Trl | Preset::Torchtune => (1e-4, SingletonGroup::Zero),
            Preset::OpenRlhf => (1e-9, SingletonGroup::Zero),
        };
        GroupNormConfig {
            scale_by_std: true,
            std_eps,
            bessel: true,
            singleton,
        }
    }
}

/// Group-normalised advantages: each score minus its group's mean, divided by
/// the group's std plus `ε`.
///
/// # Formula
/// ```text
/// A_i = (s_i − mean_g) / (std_g + ε)      (or s_i − mean_g without scaling)
/// ```
/// Singleton groups follow [`SingletonGroup`]. A member equal to its group
/// mean gets 0 (so `ε = 0` with a constant group gives 0, not `0/0`).
/// # Gradient
/// None (advantages are constants).
/// # Peers
/// See [`GroupNormConfig`].
/// # Errors
/// [`Error::Empty`] for no sequence; [`Error::ShapeMismatch`] when `index`,
/// `perm` or `out` differ in length from `scores`.
pub fn group_zscore_advantages<F: Real>(
    cfg: &GroupNormConfig,
    scores: &[F],
    index: &[i64],
    perm: &mut [usize],
    out: &mut [F],
) -> Result<(), Error> {
    check_groups(scores, index, out)?;
    sort_groups(index, perm)?;
    let eps = F::of(cfg.std_eps);
    for_each_group(index, perm, |_, members| {
        if members.len() == 1 {
            let i = members[0];
            out[i] = match cfg.singleton {
                SingletonGroup::MeanZeroStdOne if cfg.scale_by_std => scores[i] / (F::one() + eps),
                SingletonGroup::MeanZeroStdOne | SingletonGroup::RawScore => scores[i],
                SingletonGroup::Zero => F::zero(),
            };
            return Ok(());
        }
        let (mean, std) = group_mean_std(scores, members, cfg.bessel);
        for &i in members {
            out[i] = if cfg.scale_by_std {
                let c = scores[i] - mean;
                // ε = 0 and a constant group: every centered score is 0,
                // so is the advantage (not 0/0).
                if c == F::zero() {
                    c
                } else {
                    c / (std + eps)
                }
            } else {
                scores[i] - mean
            };
        }
        Ok(())
    })
}

/// Mean-baseline advantages `s_i − mean_g` (a singleton's mean is 0).
///
/// # Formula
/// ```text
/// A_i = s_i − mean_g
/// ```
/// # Gradient
/// None.
/// # Peers
/// verl `reinforce_plus_plus_baseline` (before its token whitening).
/// # Errors
/// As [`group_zscore_advantages`].
pub fn group_mean_baseline_advantages<F: Real>(
    scores: &[F],
    index: &[i64],
    perm: &mut [usize],
    out: &mut [F],
) -> Result<(), Error> {
    let cfg = GroupNormConfig {
        scale_by_std: false,
        std_eps: 0.0,
        bessel: true,
        singleton: SingletonGroup::MeanZeroStdOne,
    };
    group_zscore_advantages(&cfg, scores, index, perm, out)
}

/// GPG advantages `α·(s_i − mean_g)/f_norm` with `α = B / max(1, #{s ≠ 0})`.
///
/// # Formula
/// ```text
/// α = B / max(1, count_nonzero(s)),   A_i = α (s_i − mean_g) / f_norm
/// ```
/// (a singleton group's mean is 0).
/// # Gradient
/// None.
/// # Peers
/// verl `gpg` (which ignores its `alpha` argument and never divides by the std).
/// # Errors
/// As [`group_zscore_advantages`]; [`Error::OutOfRange`] for `f_norm = 0` or non-finite.
pub fn gpg_advantages<F: Real>(
    scores: &[F],
    index: &[i64],
    f_norm: f64,
    perm: &mut [usize],
    out: &mut [F],
) -> Result<(), Error> {
    check_param(
        f_norm != 0.0 && f_norm.is_finite(),
        "f_norm",
        f_norm,
        "must be finite and ≠ 0",
    )?;
    group_mean_baseline_advantages(scores, index, perm, out)?;
    let nonzero = scores.iter().filter(|&&s| s != F::zero()).count().max(1);
    let alpha = F::of_usize(scores.len()) / F::of_usize(nonzero);
    for o in out.iter_mut() {
        *o = alpha * *o / F::of(f_norm);
    }
    Ok(())
}

/// Leave-one-out advantages: each score minus the mean of the *other* members.
///
/// # Formula
/// ```text
/// A_i = (n·s_i − Σ_g s) / (n − 1) = s_i − mean_{j≠i} s_j
/// ```
/// Singleton groups follow `singleton` (`RawScore` for verl `rloo`, `Zero`
/// for `rloo_vectorized`; `MeanZeroStdOne` acts as `RawScore`).
/// # Gradient
/// None.
/// # Peers
/// verl `rloo` / `rloo_vectorized`.
/// # Errors
/// As [`group_zscore_advantages`].
pub fn leave_one_out_advantages<F: Real>(
    scores: &[F],
    index: &[i64],
    singleton: SingletonGroup,
    perm: &mut [usize],
    out: &mut [F],
) -> Result<(), Error> {
    check_groups(scores, index, out)?;
    sort_groups(index, perm)?;
    for_each_group(index, perm, |_, members| {
        if members.len() == 1 {
            let i = members[0];
            out[i] = match singleton {
                SingletonGroup::Zero => F::zero(),
                _ => scores[i],
            };
            return Ok(());
        }
        let n = F::of_usize(members.len());
        let sum: F = members.iter().map(|&i| scores[i]).sum();
        for &i in members {
            out[i] = (n * scores[i] - sum) / (n - F::one());
        }
        Ok(())
    })
}

/// OPO advantages: each score minus its group's length-weighted mean score
/// (a singleton's baseline is 0; a group of total length 0 has baseline 0).
///
/// # Formula
/// ```text
/// b_g = Σ_g len_j s_j / Σ_g len_j,   A_i = s_i − b_g
/// ```
/// The weights are divided by the group's largest `|len|` first (the same
/// ratio), so `len · s` cannot overflow when the baseline itself is
/// representable (e.g. `len = 1e11`, `s = −1e30` in `f32`).
/// # Gradient
/// None.
/// # Peers
/// verl `opo` (`len` = valid tokens per sequence).
/// # Errors
/// As [`group_zscore_advantages`]; [`Error::ShapeMismatch`] for `lengths`.
pub fn length_weighted_baseline_advantages<F: Real>(
    scores: &[F],
    lengths: &[F],
    index: &[i64],
    perm: &mut [usize],
    out: &mut [F],
) -> Result<(), Error> {
    check_groups(scores, index, out)?;
    check_len("lengths", lengths.len(), scores.len())?;
    sort_groups(index, perm)?;
    for_each_group(index, perm, |_, members| {
        let baseline = if members.len() == 1 {
            F::zero()
        } else {
            // Scale-free weights len / max|len| (a group of zero lengths
            // keeps scale 1 and baseline 0).
            let lmax = members
                .iter()
                .map(|&i| lengths[i].abs())
                .fold(F::zero(), |a, l| if l > a { l } else { a });
            let scale = if lmax > F::zero() && lmax.is_finite() {
                lmax
            } else {
                F::one()
            };
            let num: F = members
                .iter()
                .map(|&i| lengths[i] / scale * scores[i])
                .sum();
            let den: F = members.iter().map(|&i| lengths[i] / scale).sum();
            if den == F::zero() {
                F::zero()
            } else {
                num / den
            }
        };
        for &i in members {
            out[i] = scores[i] - baseline;
        }
        Ok(())
    })
}

/// Pass@k parameters: the group-size rule is fixed (≥ 2); scaling like GRPO.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PassAtKConfig {
    /// Divide by `std_g + std_eps` (Bessel-corrected std).
    pub scale_by_std: bool,
    /// Added to the std.
    pub std_eps: f64,
}

impl PassAtKConfig {
    /// Checks `std_eps` (finite, ≥ 0).
    ///
    /// # Errors
    /// [`Error::OutOfRange`] otherwise.
    pub fn validate(&self) -> Result<(), Error> {
        check_std_eps(self.std_eps)
    }
}

/// `std_eps` must be finite and ≥ 0 (a negative one can divide by 0).
fn check_std_eps(std_eps: f64) -> Result<(), Error> {
    check_param(
        std_eps >= 0.0 && std_eps.is_finite(),
        "epsilon",
        std_eps,
        "must be finite and ≥ 0",
    )
}

/// Pass@k advantages: only the best member of each group gets a nonzero
/// advantage, the gap to the second best.
///
/// # Formula
/// ```text
/// A_best = (s_(1) − s_(2)) / (std_g + ε)   (or without scaling),  A_other = 0
/// ```
/// Ties for the best give 0 whichever member is chosen (the first is).
/// # Gradient
/// None.
/// # Peers
/// verl `grpo_passk`.
/// # Errors
/// As [`group_zscore_advantages`]; [`Error::EmptyGroup`] for a group with fewer than 2 members.
pub fn pass_at_k_advantages<F: Real>(
    cfg: &PassAtKConfig,
    scores: &[F],
    index: &[i64],
    perm: &mut [usize],
    out: &mut [F],
) -> Result<(), Error> {
    cfg.validate()?;
    check_groups(scores, index, out)?;
    sort_groups(index, perm)?;
    for_each_group(index, perm, |id, members| {
        if members.len() < 2 {
            return Err(Error::EmptyGroup {
                group: id,
                needed: 2,
            });
        }
        let mut best = members[0];
        for &i in &members[1..] {
            if scores[i] > scores[best] {
                best = i;
            }
        }
        let mut second = F::neg_infinity();
        let mut seen = false;
        for &i in members.iter().filter(|&&i| i != best) {
            if !seen || scores[i] > second {
                second = scores[i];
                seen = true;
            }
        }
        let mut a = scores[best] - second;
        if cfg.scale_by_std {
            let (_, std) = group_mean_std(scores, members, true);
            a /= std + F::of(cfg.std_eps);
        }
        for &i in members {
            out[i] = if i == best { a } else { F::zero() };
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// GDPO
// ---------------------------------------------------------------------------

/// GDPO: a group z-score per reward component, weighted sum, then whitened
/// over the valid tokens of the batch and zeroed on padding.
///
/// `key_scores` holds `K` components, component-major (`K × batch`);
/// `weights` one weight per component. `scratch` holds `2·batch` values.
///
/// # Formula
/// ```text
/// S_i   = Σ_k w_k · zscore_k(i)
/// A_i,t = mask_i,t · whiten_V(S ⊗ mask)_i,t       (verl masked_whiten)
/// ```
/// # Gradient
/// None.
/// # Peers
/// verl `gdpo` (`GroupNormConfig::preset(Verl)`, `WhitenConfig::preset(Verl)`).
/// # Errors
/// [`Error::ShapeMismatch`] for inconsistent lengths; [`Error::Empty`] for no
/// component; the whitening's [`Error::Invalid`] with < 2 valid tokens.
#[allow(clippy::too_many_arguments)]
pub fn gdpo_advantages<F: Real>(
    cfg: &GroupNormConfig,
    dims: Dims,
    key_scores: &[F],
    weights: &[F],
    mask: &[bool],
    index: &[i64],
    perm: &mut [usize],
    scratch: &mut [F],
    out: &mut [F],
) -> Result<(), Error> {
    let b = dims.batch;
    if weights.is_empty() {
        return Err(Error::Empty { input: "weights" });
    }
    check_len("key_scores", key_scores.len(), weights.len() * b)?;
    check_len("scratch", scratch.len(), 2 * b)?;
    check_len("response_mask", mask.len(), dims.len())?;
    check_len("out", out.len(), dims.len())?;
    let (z, acc) = scratch.split_at_mut(b);
    for (k, &w) in weights.iter().enumerate() {
        group_zscore_advantages(cfg, &key_scores[k * b..(k + 1) * b], index, perm, z)?;
        for i in 0..b {
            acc[i] = if k == 0 { w * z[i] } else { acc[i] + w * z[i] };
        }
    }
    broadcast_to_tokens(dims, acc, mask, out)?;
    masked_whiten_in_place(
        &WhitenConfig::preset(Preset::Verl),
        dims,
        Reduce::All,
        out,
        mask,
    )?;
    zero_masked(out, mask);
    Ok(())
}

fn zero_masked<F: Real>(x: &mut [F], mask: &[bool]) {
    for (v, &m) in x.iter_mut().zip(mask) {
        if !m {
            *v = F::zero();
        }
    }
}

// ---------------------------------------------------------------------------
// Token-level: GAE, REINFORCE++, ReMax
// ---------------------------------------------------------------------------

/// GAE parameters.
///
/// # Peers
/// | preset | `skip_masked` | whitening | `zero_masked` |
/// |---|---|---|---|
/// | `Verl` | true (masked steps carry the next valid value and advantage) | verl, mean removed | false |
/// | `Torchtune` | false (the mask is ignored; the value after the end is 0) | torchtune, **mean added back** | true |
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GaeConfig {
    /// Discount `γ ∈ [0, 1]`.
    pub gamma: f64,
    /// GAE `λ ∈ [0, 1]`.
    pub lam: f64,
    /// Masked steps neither update the running value nor the running advantage.
    pub skip_masked: bool,
    /// Whitening of the advantages over the valid tokens (`None`: raw).
    pub whiten: Option<WhitenConfig>,
    /// Zero the advantages at masked positions after whitening.
    pub zero_masked: bool,
}

impl GaeConfig {
    /// The peer's convention with the given `γ`, `λ`.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] unless `γ, λ ∈ [0, 1]`.
    pub fn preset(preset: Preset, gamma: f64, lam: f64) -> Result<Self, Error> {
        check_param(
            (0.0..=1.0).contains(&gamma),
            "gamma",
            gamma,
            "must lie in [0, 1]",
        )?;
        check_param((0.0..=1.0).contains(&lam), "lam", lam, "must lie in [0, 1]")?;
        Ok(match preset {
            Preset::Torchtune => GaeConfig {
                gamma,
                lam,
                skip_masked: false,
                whiten: Some(WhitenConfig {
                    keep_mean: true,
                    ..WhitenConfig::preset(Preset::Torchtune)
                }),
                zero_masked: true,
            },
            _ => GaeConfig {
                gamma,
                lam,
                skip_masked: true,
                whiten: Some(WhitenConfig::preset(Preset::Verl)),
                zero_masked: false,
            },
        })
    }
}

/// One step of the GAE recursion, element-wise: the advantage `A_t` from
/// the step's reward and value and the running `V_{t+1}`, `A_{t+1}`.
///
/// The per-element kernel of [`gae_advantages_returns`] (which scans it
/// backwards over each row); generic over [`Elem`], so it runs unchanged on
/// whole `[batch, 1]` tensor columns.
///
/// # Formula
/// ```text
/// δ_t = r_t + γ V_{t+1} − V_t,    A_t = δ_t + γλ A_{t+1}
/// ```
/// (`gamma_lam` is the product `γλ`, computed by the caller in `f64`.)
/// # Gradient
/// None (advantages are constants).
/// # Peers
/// verl `compute_gae_advantage_return`, torchtune `estimate_advantages`.
pub fn gae_step<E: Elem>(
    gamma: f64,
    gamma_lam: f64,
    reward: E,
    value: E,
    next_value: E,
    next_advantage: E,
) -> E {
    let delta = reward.add(next_value.mul_scalar(gamma)).sub(value);
    delta.add(next_advantage.mul_scalar(gamma_lam))
}

/// Generalised advantage estimation with returns, then whitening.
///
/// # Formula
/// ```text
/// δ_t = r_t + γ V_{t+1} − V_t,   A_t = δ_t + γλ A_{t+1}      (V_T = A_T = 0)
/// returns = A + V   (un-whitened),   advantages = whiten(A)
/// ```
/// With `skip_masked`, a masked step keeps `V_{t+1}` and `A_{t+1}` of the next
/// valid step (and outputs that carried `A`).
/// # Gradient
/// None.
/// # Peers
/// See [`GaeConfig`].
/// # Errors
/// [`Error::ShapeMismatch`] for inconsistent lengths; the whitening's errors.
#[allow(clippy::too_many_arguments)]
pub fn gae_advantages_returns<F: Real>(
    cfg: &GaeConfig,
    dims: Dims,
    rewards: &[F],
    values: &[F],
    mask: &[bool],
    advantages: &mut [F],
    returns: &mut [F],
) -> Result<(), Error> {
    check_len("rewards", rewards.len(), dims.len())?;
    check_len("values", values.len(), dims.len())?;
    check_len("mask", mask.len(), dims.len())?;
    check_len("advantages", advantages.len(), dims.len())?;
    check_len("returns", returns.len(), dims.len())?;
    let gl = cfg.gamma * cfg.lam;
    for i in 0..dims.batch {
        let (mut next_v, mut last) = (F::zero(), F::zero());
        for j in dims.row(i).rev() {
            let a = gae_step(cfg.gamma, gl, rewards[j], values[j], next_v, last);
            if mask[j] || !cfg.skip_masked {
                next_v = values[j];
                last = a;
            }
            advantages[j] = last;
            returns[j] = last + values[j];
        }
    }
    if let Some(w) = &cfg.whiten {
        masked_whiten_in_place(w, dims, Reduce::All, advantages, mask)?;
    }
    if cfg.zero_masked {
        zero_masked(advantages, mask);
    }
    Ok(())
}

/// Discounted returns over the valid tokens; masked tokens return 0, drop
/// their reward and pass the running return through undiscounted.
///
/// # Formula
/// ```text
/// G_t = r_t + γ G_{t+1}  (valid t),   G_t = 0 with G_{t+1} carried  (masked t)
/// ```
/// # Gradient
/// None.
/// # Peers
/// verl `reinforce_plus_plus` returns (observation tokens in multi-turn).
/// # Errors
/// [`Error::ShapeMismatch`] for inconsistent lengths.
pub fn discounted_returns<F: Real>(
    dims: Dims,
    rewards: &[F],
    mask: &[bool],
    gamma: f64,
    returns: &mut [F],
) -> Result<(), Error> {
    check_len("token_level_rewards", rewards.len(), dims.len())?;
    check_len("response_mask", mask.len(), dims.len())?;
    check_len("returns", returns.len(), dims.len())?;
    let g = F::of(gamma);
    for i in 0..dims.batch {
        let mut running = F::zero();
        for j in dims.row(i).rev() {
            if mask[j] {
                running = rewards[j] + g * running;
                returns[j] = running;
            } else {
                returns[j] = F::zero();
            }
        }
    }
    Ok(())
}

/// REINFORCE++: [`discounted_returns`], whitened over the valid tokens of the
/// batch (verl `masked_whiten`), zero on padding.
///
/// # Formula
/// ```text
/// A = mask · whiten_V(G)
/// ```
/// # Gradient
/// None.
/// # Peers
/// verl `reinforce_plus_plus`.
/// # Errors
/// [`Error::ShapeMismatch`]; [`Error::OutOfRange`] unless `γ ∈ [0, 1]`;
/// [`Error::Invalid`] with fewer than two valid tokens.
pub fn reinforce_plus_plus_advantages<F: Real>(
    dims: Dims,
    rewards: &[F],
    mask: &[bool],
    gamma: f64,
    advantages: &mut [F],
    returns: &mut [F],
) -> Result<(), Error> {
    check_param(
        (0.0..=1.0).contains(&gamma),
        "gamma",
        gamma,
        "must lie in [0, 1]",
    )?;
    check_len("advantages", advantages.len(), dims.len())?;
    discounted_returns(dims, rewards, mask, gamma, returns)?;
    advantages.copy_from_slice(returns);
    masked_whiten_in_place(
        &WhitenConfig::preset(Preset::Verl),
        dims,
        Reduce::All,
        advantages,
        mask,
    )?;
    zero_masked(advantages, mask);
    Ok(())
}

/// Reward-to-go of the masked rewards (`returns`, every position), and ReMax
/// advantages `G_t − b_i` at valid positions (`G_t` elsewhere).
///
/// # Formula
/// ```text
/// G_t = Σ_{u ≥ t, mask_u} r_u,    A_t = G_t − b_i·mask_t
/// ```
/// # Gradient
/// None.
/// # Peers
/// verl `remax` (`b` = the greedy rollout's reward).
/// # Errors
/// [`Error::ShapeMismatch`] for inconsistent lengths.
pub fn remax_advantages<F: Real>(
    dims: Dims,
    rewards: &[F],
    baselines: &[F],
    mask: &[bool],
    advantages: &mut [F],
    returns: &mut [F],
) -> Result<(), Error> {
    check_len("reward_baselines", baselines.len(), dims.batch)?;
    check_len("advantages", advantages.len(), dims.len())?;
    reward_to_go(dims, rewards, mask, returns)?;
    for i in 0..dims.batch {
        for j in dims.row(i) {
            advantages[j] = if mask[j] {
                returns[j] - baselines[i]
            } else {
                returns[j]
            };
        }
    }
    Ok(())
}

/// `G_t = Σ_{u ≥ t, mask_u} r_u` at every position.
fn reward_to_go<F: Real>(
    dims: Dims,
    rewards: &[F],
    mask: &[bool],
    out: &mut [F],
) -> Result<(), Error> {
    check_len("token_level_rewards", rewards.len(), dims.len())?;
    check_len("response_mask", mask.len(), dims.len())?;
    check_len("returns", out.len(), dims.len())?;
    for i in 0..dims.batch {
        let mut acc = F::zero();
        for j in dims.row(i).rev() {
            if mask[j] {
                acc += rewards[j];
            }
            out[j] = acc;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Optimal token baseline
// ---------------------------------------------------------------------------

/// Optimal-token-baseline parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct OtbConfig {
    /// Zero the baseline of a group's unique longest sequence beyond the
    /// second-longest length.
    pub handle_zero_tail: bool,
    /// Added to the baseline's denominator.
    pub epsilon: f64,
    /// Multi-turn: steps are the k-th *valid* token of each sequence (rather
    /// than the k-th position), and empty sequences join no group.
    pub compact_steps: bool,
}

impl OtbConfig {
    /// Checks `epsilon` (finite, ≥ 0).
    ///
    /// # Errors
    /// [`Error::OutOfRange`] otherwise.
    pub fn validate(&self) -> Result<(), Error> {
        check_param(
            self.epsilon >= 0.0 && self.epsilon.is_finite(),
            "epsilon",
            self.epsilon,
            "must be finite and ≥ 0",
        )
    }
}

/// The OTB path-variance proxy of one token, element-wise: the per-element
/// kernel of [`optimal_token_baseline_advantages`] (which sums it along each
/// row over the valid tokens); generic over [`Elem`], so it runs unchanged on
/// whole tensors.
///
/// # Formula
/// ```text
/// w_t = (1 − 2 e^{lp_t} + Σπ²_t) · ρ_t²        (· ρ² only with importance weights)
/// ```
/// # Gradient
/// None (advantages are constants).
/// # Peers
/// verl `optimal_token_baseline`, `tir_optimal_token_baseline`.
pub fn otb_token_weight<E: Elem>(old_log_prob: E, sum_pi_squared: E, is_weight: Option<E>) -> E {
    let w = old_log_prob
        .exp()
        .mul_scalar(-2.0)
        .add_scalar(1.0)
        .add(sum_pi_squared);
    match is_weight {
        Some(rho) => w.mul(rho.clone().mul(rho)),
        None => w,
    }
}

/// Optimal token baseline (OTB): a per-step baseline weighted by the
/// cumulative path-variance proxy.
///
/// `scratch` holds `batch·seq + 2·seq` values.
///
/// # Formula
/// ```text
/// G_t = Σ_{u≥t, valid} r_u,    w_t = (1 − 2 e^{lp_t} + Σπ²_t) · ρ_t²,    W_t = Σ_{u≤t, valid} w_u
/// b_k = Σ_{group} G·W / (Σ_{group} W + ε)    over the members' valid step k
/// A_t = (G_t − b_k) at valid t, 0 elsewhere; singleton groups: b = 0
/// ```
/// The weights must be representable: `w_t` overflows to ±inf (and the
/// baseline to NaN) once `ρ_t²` exceeds the float range (`ρ > ≈1.8e19` in
/// `f32`, `≈1.3e154` in `f64`), as in the peer, and likewise when a
/// product `G_t·W_t` exceeds it (e.g. `G ~ 1e30`, `ρ ~ 1e10` in `f32`); `ε`
/// is absolute, so the weights are not rescaled.
/// # Gradient
/// None.
/// # Peers
/// verl `optimal_token_baseline` (`compact_steps = false`) and
/// `tir_optimal_token_baseline` (`compact_steps = true`).
/// # Errors
/// [`Error::ShapeMismatch`] for inconsistent lengths.
#[allow(clippy::too_many_arguments)]
pub fn optimal_token_baseline_advantages<F: Real>(
    cfg: &OtbConfig,
    dims: Dims,
    rewards: &[F],
    mask: &[bool],
    index: &[i64],
    old_log_probs: &[F],
    sum_pi_squared: &[F],
    is_weights: Option<&[F]>,
    perm: &mut [usize],
    scratch: &mut [F],
    advantages: &mut [F],
    returns: &mut [F],
) -> Result<(), Error> {
    cfg.validate()?;
    let (b, t) = (dims.batch, dims.seq);
    check_len("index", index.len(), b)?;
    check_len("old_log_probs", old_log_probs.len(), dims.len())?;
    check_len("sum_pi_squared", sum_pi_squared.len(), dims.len())?;
    if let Some(w) = is_weights {
        check_len("rollout_is_weights", w.len(), dims.len())?;
    }
    check_len("scratch", scratch.len(), dims.len() + 2 * t)?;
    check_len("advantages", advantages.len(), dims.len())?;
    reward_to_go(dims, rewards, mask, returns)?;
    let (wcum, acc) = scratch.split_at_mut(dims.len());
    for i in 0..b {
        let mut c = F::zero();
        for j in dims.row(i) {
            if mask[j] {
                c += otb_token_weight(
                    old_log_probs[j],
                    sum_pi_squared[j],
                    is_weights.map(|rho| rho[j]),
                );
            }
            wcum[j] = c;
        }
    }
    for a in advantages.iter_mut() {
        *a = F::zero();
    }
    sort_groups(index, perm)?;
    let len = |i: usize| mask[dims.row(i)].iter().filter(|&&m| m).count();
    let eps = F::of(cfg.epsilon);
    for_each_group(index, perm, |_, all| {
        // Multi-turn drops empty sequences from the group.
        let keep = |i: &usize| !cfg.compact_steps || len(*i) > 0;
        let n = all.iter().filter(|i| keep(i)).count();
        if n == 0 {
            return Ok(());
        }
        let (num, den) = acc.split_at_mut(t);
        for k in 0..t {
            num[k] = F::zero();
            den[k] = F::zero();
        }
        if n > 1 {
            for &i in all.iter().filter(|i| keep(i)) {
                let mut k = 0;
                for j in dims.row(i) {
                    if mask[j] {
                        let step = if cfg.compact_steps { k } else { j - i * t };
                        num[step] += returns[j] * wcum[j];
                        den[step] += wcum[j];
                        k += 1;
                    }
                }
            }
        }
        // Zero tail: the unique longest member beyond the second-longest length.
        let mut tail: Option<(usize, usize)> = None;
        if n > 1 && cfg.handle_zero_tail {
            let (mut max, mut second, mut arg, mut count_max) = (0usize, 0usize, 0usize, 0usize);
            let mut first = true;
            for &i in all.iter().filter(|i| keep(i)) {
                let l = len(i);
                if first || l > max {
                    if !first {
                        second = max;
                    }
                    max = l;
                    arg = i;
                    count_max = 1;
                    first = false;
                } else if l == max {
                    count_max += 1;
                    second = l;
                } else if l > second {
                    second = l;
                }
            }
            if count_max == 1 && max > second {
                tail = Some((arg, second));
            }
        }
        for &i in all.iter().filter(|i| keep(i)) {
            let mut k = 0;
            for j in dims.row(i) {
                if mask[j] {
                    let step = if cfg.compact_steps { k } else { j - i * t };
                    let mut base = if n > 1 {
                        num[step] / (den[step] + eps)
                    } else {
                        F::zero()
                    };
                    if let Some((arg, second)) = tail {
                        if arg == i && step >= second {
                            base = F::zero();
                        }
                    }
                    advantages[j] = returns[j] - base;
                    k += 1;
                }
            }
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// TRL: multi-reward GRPO and RLOO
// ---------------------------------------------------------------------------

/// How TRL's GRPO scales the centered rewards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum RewardScaling {
    /// By the group's std (`"group"`).
    Group,
    /// By the whole batch's std, keeping per-group means (`"batch"`).
    Batch,
    /// Not at all (`"none"`, Dr. GRPO).
    None,
}

impl core::str::FromStr for RewardScaling {
    type Err = Error;
    /// Parses `group`, `batch`, `none`.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "group" => Ok(RewardScaling::Group),
            "batch" => Ok(RewardScaling::Batch),
            "none" => Ok(RewardScaling::None),
            _ => Err(Error::unknown_option(
                "reward scaling",
                s,
                "group, batch, none",
            )),
        }
    }
}

/// How TRL's GRPO combines several reward functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum RewardAggregation {
    /// Weighted NaN-sum of the rewards, then group normalisation.
    SumThenNormalize,
    /// Group-normalise each reward, weighted NaN-sum, then batch normalisation
    /// (ignores [`RewardScaling`]).
    NormalizeThenSum,
}

impl core::str::FromStr for RewardAggregation {
    type Err = Error;
    /// Parses `sum_then_normalize`, `normalize_then_sum`.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "sum_then_normalize" => Ok(RewardAggregation::SumThenNormalize),
            "normalize_then_sum" => Ok(RewardAggregation::NormalizeThenSum),
            _ => Err(Error::unknown_option(
                "multi-objective aggregation",
                s,
                "sum_then_normalize, normalize_then_sum",
            )),
        }
    }
}

/// TRL GRPO advantage parameters. Groups are `group_size` consecutive rows.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MultiRewardConfig {
    /// Completions per prompt (`num_generations`).
    pub group_size: usize,
    /// Std scaling.
    pub scaling: RewardScaling,
    /// Multi-objective aggregation.
    pub aggregation: RewardAggregation,
    /// Added to the std (TRL: `1e-4`).
    pub std_eps: f64,
}

impl MultiRewardConfig {
    /// Validates the parameters (`std_eps` is TRL's `1e-4`).
    ///
    /// # Errors
    /// [`Error::OutOfRange`] for `group_size = 0`.
    pub fn new(
        group_size: usize,
        scaling: RewardScaling,
        aggregation: RewardAggregation,
    ) -> Result<Self, Error> {
        check_param(
            group_size > 0,
            "num_generations",
            group_size as f64,
            "must be ≥ 1",
        )?;
        Ok(MultiRewardConfig {
            group_size,
            scaling,
            aggregation,
            std_eps: 1e-4,
        })
    }

    /// Checks a config built field by field: `group_size ≥ 1`, `std_eps`
    /// finite and ≥ 0.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] otherwise.
    pub fn validate(&self) -> Result<(), Error> {
        Self::new(self.group_size, self.scaling, self.aggregation)?;
        check_std_eps(self.std_eps)
    }
}

/// Logged reward statistics of [`multi_reward_group_advantages`] and
/// [`leave_one_out_reward_advantages`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RewardLog<F> {
    /// NaN-mean of the weighted rewards (`reward`).
    pub reward_mean: F,
    /// NaN-std of the weighted rewards (`reward_std`).
    pub reward_std: F,
    /// Fraction with a (numerically) zero std (`frac_reward_zero_std`).
    pub frac_zero_std: F,
    /// Mean per-token k1 KL over valid tokens (`kl`, RLOO with `β ≠ 0`).
    pub kl: Option<F>,
}

/// NaN-aware `(count, mean, Bessel std)`; mean/std NaN when undefined.
fn nan_moments<F: Real>(it: impl Iterator<Item = F> + Clone) -> (usize, F, F) {
    let (mut n, mut sum) = (0usize, F::zero());
    for v in it.clone().filter(|v| !v.is_nan()) {
        n += 1;
        sum += v;
    }
    if n == 0 {
        return (0, F::nan(), F::nan());
    }
    let mean = sum / F::of_usize(n);
    if n < 2 {
        return (n, mean, F::nan());
    }
    let sq: F = it
        .filter(|v| !v.is_nan())
        .map(|v| (v - mean) * (v - mean))
        .sum();
    (n, mean, (sq / F::of_usize(n - 1)).sqrt())
}

/// `torch.nan_to_num`: NaN → 0, ±inf → ±max.
fn nan_to_num<F: Real>(x: F) -> F {
    if x.is_nan() {
        F::zero()
    } else if x == F::infinity() {
        F::max_value()
    } else if x == F::neg_infinity() {
        -F::max_value()
    } else {
        x
    }
}

/// `torch.isclose(x, 0)`: `|x| ≤ 1e-8`.
fn is_zero_std<F: Real>(x: F) -> bool {
    x.abs() <= F::of(1e-8)
}

/// Weighted NaN-sum of each row's rewards; NaN for a row where every reward is NaN.
fn weighted_rewards<F: Real>(per_func: &[F], weights: &[F], out: &mut [F]) {
    let k = weights.len();
    for (i, o) in out.iter_mut().enumerate() {
        let row = &per_func[i * k..(i + 1) * k];
        if row.iter().all(|v| v.is_nan()) {
            *o = F::nan();
        } else {
            *o = row
                .iter()
                .zip(weights)
                .map(|(&r, &w)| r * w)
                .filter(|p| !p.is_nan())
                .sum();
        }
    }
}

fn check_multi<F: Real>(
    group_size: usize,
    per_func: &[F],
    weights: &[F],
    b: usize,
) -> Result<(), Error> {
    if weights.is_empty() {
        return Err(Error::Empty {
            input: "reward_weights",
        });
    }
    if b == 0 {
        return Err(Error::Empty {
            input: "rewards_per_func",
        });
    }
    check_len("rewards_per_func", per_func.len(), b * weights.len())?;
    if group_size == 0 || b % group_size != 0 {
        return Err(Error::Invalid {
            input: "num_generations",
            rule: "must divide the number of completions",
        });
    }
    Ok(())
}

/// TRL GRPO advantages from several reward functions, NaN-aware.
///
/// `rewards_per_func` is `batch × K` (row-major), `weights` has `K` entries,
/// `rewards` and `stds` are `batch`-long scratch, `out` gets one advantage per
/// completion.
///
/// # Formula
/// ```text
/// sum_then_normalize:  R_i = nansum_k w_k r_ik;  A_i = (R_i − nanmean_g R) / (std + ε)
///     std = nanstd_g R ("group"), nanstd R ("batch"), no division ("none")
/// normalize_then_sum:  R_i = nansum_k w_k (r_ik − nanmean_g r_k)/(nanstd_g r_k + ε)
///                      A_i = (R_i − nanmean R) / (nanstd R + ε)
/// ```
/// Rows whose rewards are all NaN, groups with fewer than two scored
/// members, and `group_size = 1` get advantage 0 (NaN → 0 at the end).
/// # Gradient
/// None.
/// # Peers
/// TRL `GRPOTrainer._generate_and_score_completions` (`ε = 1e-4`).
/// # Errors
/// [`Error::ShapeMismatch`], [`Error::Empty`], [`Error::Invalid`] when
/// `group_size` does not divide the batch.
pub fn multi_reward_group_advantages<F: Real>(
    cfg: &MultiRewardConfig,
    rewards_per_func: &[F],
    weights: &[F],
    rewards: &mut [F],
    stds: &mut [F],
    out: &mut [F],
) -> Result<RewardLog<F>, Error> {
    cfg.validate()?;
    let b = out.len();
    let g = cfg.group_size;
    check_multi(g, rewards_per_func, weights, b)?;
    check_len("rewards", rewards.len(), b)?;
    check_len("stds", stds.len(), b)?;
    let k = weights.len();
    let eps = F::of(cfg.std_eps);
    weighted_rewards(rewards_per_func, weights, rewards);
    let (_, log_mean, log_std) = nan_moments(rewards.iter().copied());
    match cfg.aggregation {
        RewardAggregation::SumThenNormalize => {
            let batch_std = if b > 1 {
                nan_moments(rewards.iter().copied()).2
            } else {
                F::zero()
            };
            for grp in 0..b / g {
                let r = &rewards[grp * g..(grp + 1) * g];
                let (_, mean, std) = nan_moments(r.iter().copied());
                let std = match cfg.scaling {
                    RewardScaling::Batch => batch_std,
                    _ if g > 1 => std,
                    _ => F::zero(),
                };
                for i in grp * g..(grp + 1) * g {
                    let c = rewards[i] - mean;
                    out[i] = match cfg.scaling {
                        RewardScaling::None => c,
                        _ => c / (std + eps),
                    };
                    stds[i] = std;
                }
            }
        }
        RewardAggregation::NormalizeThenSum => {
            // rewards[] is rebuilt as the weighted sum of normalised rewards.
            for grp in 0..b / g {
                for i in grp * g..(grp + 1) * g {
                    out[i] = F::zero();
                }
                for (f, &w) in weights.iter().enumerate() {
                    let col = (grp * g..(grp + 1) * g).map(|i| rewards_per_func[i * k + f]);
                    let (_, mean, std) = nan_moments(col);
                    let std = if g > 1 { std } else { F::zero() };
                    for i in grp * g..(grp + 1) * g {
                        let p = (rewards_per_func[i * k + f] - mean) / (std + eps) * w;
                        if !p.is_nan() {
                            out[i] += p;
                        }
                    }
                }
            }
            for i in 0..b {
                let row = &rewards_per_func[i * k..(i + 1) * k];
                rewards[i] = if row.iter().all(|v| v.is_nan()) {
                    F::nan()
                } else {
                    out[i]
                };
            }
            let (_, mean, std) = nan_moments(rewards.iter().copied());
            let std = if b > 1 { std } else { F::zero() };
            for i in 0..b {
                out[i] = (rewards[i] - mean) / (std + eps);
                stds[i] = std;
            }
        }
    }
    let zero = stds.iter().filter(|&&s| is_zero_std(s)).count();
    for o in out.iter_mut() {
        *o = nan_to_num(*o);
    }
    Ok(RewardLog {
        reward_mean: log_mean,
        reward_std: log_std,
        frac_zero_std: F::of_usize(zero) / F::of_usize(b),
        kl: None,
    })
}

/// TRL RLOO advantage parameters. Groups are `group_size` consecutive rows.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RlooConfig {
    /// Completions per prompt (`num_generations`).
    pub group_size: usize,
    /// KL coefficient `β` (the sequence's summed k1 KL is subtracted from its reward).
    pub beta: f64,
    /// Clamp of the weighted reward before the KL penalty.
    pub reward_clip: Option<(f64, f64)>,
    /// Normalise the advantages over the batch (`(A − mean)/(std + ε)`).
    pub normalize: bool,
    /// Added to the std (TRL: `1e-4`).
    pub std_eps: f64,
}

impl RlooConfig {
    /// Validates the parameters (`std_eps` is TRL's `1e-4`).
    ///
    /// # Errors
    /// [`Error::OutOfRange`] for `group_size = 0`, a non-finite `β`, or a clip range with `lo > hi`.
    pub fn new(
        group_size: usize,
        beta: f64,
        reward_clip: Option<(f64, f64)>,
        normalize: bool,
    ) -> Result<Self, Error> {
        check_param(
            group_size > 0,
            "num_generations",
            group_size as f64,
            "must be ≥ 1",
        )?;
        check_param(beta.is_finite(), "beta", beta, "must be finite")?;
        if let Some((lo, hi)) = reward_clip {
            check_param(
                lo <= hi,
                "reward_clip_range",
                lo,
                "lower bound must be ≤ upper bound",
            )?;
        }
        Ok(RlooConfig {
            group_size,
            beta,
            reward_clip,
            normalize,
            std_eps: 1e-4,
        })
    }

    /// Checks a config built field by field: the checks of
    /// [`new`](Self::new) and `std_eps` finite and ≥ 0.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] otherwise.
    pub fn validate(&self) -> Result<(), Error> {
        Self::new(self.group_size, self.beta, self.reward_clip, self.normalize)?;
        check_std_eps(self.std_eps)
    }
}

/// TRL RLOO advantages: weighted rewards, clipped, minus `β` × the
/// sequence's summed k1 KL, minus the leave-one-out mean of the group.
///
/// `rewards_per_func` is `batch × K`; `completion_mask`, `old_logps`,
/// `ref_logps` are `[batch, seq]`; `rewards` is `batch`-long scratch;
/// `seq_old_logps` receives each sequence's summed old log-prob.
///
/// # Formula
/// ```text
/// R_i = clip(nansum_k w_k r_ik) − β Σ_t (old − ref)_{i,t}
/// A_i = R_i − (nansum_g R − R_i)/(n_g − 1)        (n_g = scored members)
/// A  ← (A − nanmean A)/(nanstd A + ε)   if normalize;   NaN → 0
/// ```
/// # Gradient
/// None.
/// # Peers
/// TRL `RLOOTrainer._generate_and_score_completions`.
/// # Errors
/// [`Error::ShapeMismatch`], [`Error::Empty`], [`Error::Invalid`] when
/// `group_size` does not divide the batch or `β ≠ 0` without `ref_logps`.
#[allow(clippy::too_many_arguments)]
pub fn leave_one_out_reward_advantages<F: Real>(
    cfg: &RlooConfig,
    dims: Dims,
    rewards_per_func: &[F],
    weights: &[F],
    completion_mask: &[bool],
    old_logps: &[F],
    ref_logps: Option<&[F]>,
    rewards: &mut [F],
    seq_old_logps: &mut [F],
    out: &mut [F],
) -> Result<RewardLog<F>, Error> {
    cfg.validate()?;
    let b = dims.batch;
    let g = cfg.group_size;
    check_len("advantages", out.len(), b)?;
    check_multi(g, rewards_per_func, weights, b)?;
    check_len("completion_mask", completion_mask.len(), dims.len())?;
    check_len("old_per_token_logps", old_logps.len(), dims.len())?;
    check_len("rewards", rewards.len(), b)?;
    check_len("old_logps", seq_old_logps.len(), b)?;
    if let Some(r) = ref_logps {
        check_len("ref_per_token_logps", r.len(), dims.len())?;
    }
    let eps = F::of(cfg.std_eps);
    for i in 0..b {
        seq_old_logps[i] = dims
            .row(i)
            .filter(|&j| completion_mask[j])
            .map(|j| old_logps[j])
            .sum();
    }
    weighted_rewards(rewards_per_func, weights, rewards);
    let (_, log_mean, log_std) = nan_moments(rewards.iter().copied());
    if let Some((lo, hi)) = cfg.reward_clip {
        for r in rewards.iter_mut() {
            *r = r.clamp(lo, hi);
        }
    }
    let mut kl_metric = None;
    if cfg.beta != 0.0 {
        let rf = ref_logps.ok_or(Error::Invalid {
            input: "ref_per_token_logps",
            rule: "required when beta ≠ 0",
        })?;
        let (mut total, mut count) = (F::zero(), 0usize);
        for i in 0..b {
            let kl: F = dims
                .row(i)
                .filter(|&j| completion_mask[j])
                .map(|j| old_logps[j] - rf[j])
                .sum();
            total += kl;
            count += dims.row(i).filter(|&j| completion_mask[j]).count();
            rewards[i] -= F::of(cfg.beta) * kl;
        }
        kl_metric = Some(total / F::of_usize(count.max(1)));
    }
    let mut zero = 0usize;
    for grp in 0..b / g {
        let r = &rewards[grp * g..(grp + 1) * g];
        let (n, _, std) = nan_moments(r.iter().copied());
        let std = if g > 1 { std } else { F::zero() };
        if is_zero_std(std) {
            zero += 1;
        }
        let sum: F = r.iter().copied().filter(|v| !v.is_nan()).sum();
        for i in grp * g..(grp + 1) * g {
            out[i] = if g > 1 {
                rewards[i] - (sum - rewards[i]) / (F::of_usize(n) - F::one())
            } else {
                F::zero()
            };
        }
    }
    if cfg.normalize {
        let (_, mean, std) = nan_moments(out.iter().copied());
        for o in out.iter_mut() {
            *o = (*o - mean) / (std + eps);
        }
    }
    for o in out.iter_mut() {
        *o = nan_to_num(*o);
    }
    Ok(RewardLog {
        reward_mean: log_mean,
        reward_std: log_std,
        frac_zero_std: F::of_usize(zero) / F::of_usize(b / g),
        kl: kl_metric,
    })
}
