//! Advantage estimators (GRPO, RLOO, REINFORCE++, GAE, OTB, …), reward
//! shaping and the KL controller on burn tensors.
//!
//! Advantages are constants to the policy loss (every peer computes them
//! under `no_grad`), so these ops return values only — except
//! [`rewards_with_score_at_eos`], whose `∂r/∂kl = −β` the peers differentiate.
//!
//! | op | core counterpart | peers |
//! |---|---|---|
//! | [`outcome_scores`], [`broadcast_to_tokens`] | [`ca::outcome_scores`], [`ca::broadcast_to_tokens`] | verl outcome estimators |
//! | [`group_zscore_advantages`] | [`ca::group_zscore_advantages`] | verl `grpo`, `grpo_vectorized`, torchtune GRPO |
//! | [`group_mean_baseline_advantages`], [`reinforce_plus_plus_baseline_advantages`] | [`ca::group_mean_baseline_advantages`] (then whitened) | verl `reinforce_plus_plus_baseline` |
//! | [`gpg_advantages`] | [`ca::gpg_advantages`] | verl `gpg` |
//! | [`leave_one_out_advantages`] | [`ca::leave_one_out_advantages`] | verl `rloo`, `rloo_vectorized` |
//! | [`length_weighted_baseline_advantages`] | [`ca::length_weighted_baseline_advantages`] | verl `opo` |
//! | [`pass_at_k_advantages`] | [`ca::pass_at_k_advantages`] | verl `grpo_passk` |
//! | [`gdpo_advantages`] | [`ca::gdpo_advantages`] | verl `gdpo` |
//! | [`gae_advantages_returns`] | [`ca::gae_advantages_returns`] (kernel [`ca::gae_step`]) | verl `gae`, torchtune `estimate_advantages` |
//! | [`discounted_returns`], [`reinforce_plus_plus_advantages`] | [`ca::discounted_returns`], [`ca::reinforce_plus_plus_advantages`] | verl `reinforce_plus_plus` |
//! | [`remax_advantages`] | [`ca::remax_advantages`] | verl `remax` |
//! | [`optimal_token_baseline_advantages`] | [`ca::optimal_token_baseline_advantages`] (kernel [`ca::otb_token_weight`]) | verl `optimal_token_baseline`, `tir_optimal_token_baseline` |
//! | [`multi_reward_group_advantages`] | [`ca::multi_reward_group_advantages`] | TRL GRPO |
//! | [`leave_one_out_reward_advantages`] | [`ca::leave_one_out_reward_advantages`] | TRL RLOO |
//! | [`kl_penalized_rewards`] | [`posttrain_core::kl::kl_penalized_rewards`] (kernel [`KlConfig::estimate`]) | verl `apply_kl_penalty`, `compute_rewards` |
//! | [`rewards_with_score_at_eos`] | [`posttrain_core::kl::rewards_with_score_at_eos`] | OpenRLHF `compute_reward`, torchtune `get_rewards_ppo` |
//! | [`update_kl_controller`] | [`KlController::update`] | verl / TRL KL controllers |
//!
//! # Groups
//!
//! Group ids (verl `index`/uid) are host metadata: [`Groups::new`] turns
//! them into a dense group number per row (an `Int` tensor), a one-hot
//! `[batch, groups]` membership mask and the group sizes. Group sums are a
//! scatter-add (`select_assign` with `Add`) into `[groups, …]`, group maxima
//! a masked `max_dim` over the membership mask, and both come back to the rows
//! by `select` (a gather): only selections and sums within a group, so a
//! non-finite score never reaches another group. TRL's groups are
//! `num_generations` consecutive rows, so TRL's ops reshape to
//! `[groups, group_size]` and reduce along the last axis.
//!
//! # Scans
//!
//! GAE and the discounted returns are reverse recursions: they loop over the
//! `seq` columns (`narrow` to a `[batch, 1]` column, a few element-wise ops,
//! one `cat` at the end), i.e. `O(seq)` kernel launches per call — the
//! recursion is inherently sequential in time, but each launch covers the
//! whole batch. Reward-to-go (no discount) is `flip`/`cumsum`/`flip`.
//!
//! # Host reads
//!
//! Only metadata and scalar state cross to the host: the valid-token count
//! of a whitening (its Bessel correction may refuse `< 2` valid tokens, a
//! typed error), and the measured KL that [`update_kl_controller`] feeds to
//! the scalar state machine [`KlController`]. Numeric inputs stay in tensors.
//!
//! # Example
//!
//! ```
//! use posttrain_burn::advantage::{group_zscore_advantages, Groups};
//! use posttrain_burn::{device, tensor1, to_vec};
//! use posttrain_core::advantage::GroupNormConfig;
//! use posttrain_core::Preset;
//! let dev = device()?;
//! let scores = tensor1(&[1.0, 0.0, 1.0, 0.5, 0.5, 2.0], &dev);
//! let groups = Groups::new(&[7, 7, 3, 7, 3, 9], &dev)?;
//! let adv = group_zscore_advantages(&GroupNormConfig::preset(Preset::Verl), scores, &groups)?;
//! let a = to_vec(adv);
//! assert!((a[0] + a[1] + a[3]).abs() < 1e-6);
//! assert!((a[5] - 2.0 / (1.0 + 1e-6)).abs() < 1e-6); // singleton: mean 0, std 1
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::util::Filled;
use burn::tensor::{Bool, Device, IndexingUpdateOp, Int, Tensor, TensorData};
use posttrain_core::advantage::{
    self as ca, GaeConfig, GroupNormConfig, MultiRewardConfig, OtbConfig, PassAtKConfig,
    RewardAggregation, RewardScaling, RlooConfig, SingletonGroup,
};
use posttrain_core::error::check_param;
use posttrain_core::kl::{KlConfig, KlController};
use posttrain_core::stats::{Bessel, VarEps, WhitenConfig};
use posttrain_core::{Error, Preset};

use crate::elem::ElemTensor;
use crate::util::{check_shape, count, keep, mask2, to_vec};

// ---------------------------------------------------------------------------
// Small tensor helpers
// ---------------------------------------------------------------------------

/// `select(mask, on_true, on_false)`: a selection, never a 0/1 product.
fn sel<const D: usize>(
    mask: Tensor<D, Bool>,
    on_true: Tensor<D>,
    on_false: Tensor<D>,
) -> Tensor<D> {
    on_false.mask_where(mask, on_true)
}

/// A `[n]` tensor as a `[n, 1]` column.
fn col(x: Tensor<1>) -> Tensor<2> {
    let n = x.dims()[0];
    x.reshape([n, 1])
}

/// A `[n, 1]` column as a `[n]` tensor.
fn flat(x: Tensor<2>) -> Tensor<1> {
    let n = x.dims()[0] * x.dims()[1];
    x.reshape([n])
}

/// A `[1]` (or `[1, 1]`-shaped) scalar tensor broadcast to `shape`.
fn bcast(x: Tensor<1>, shape: [usize; 2]) -> Tensor<2> {
    x.reshape([1, 1]).expand(shape)
}

fn check_len(input: &'static str, got: usize, want: usize) -> Result<(), Error> {
    posttrain_core::error::check_len(input, got, want)
}

/// Values and returns of a token-level estimator.
#[derive(Debug, Clone)]
pub struct AdvantagesReturns {
    /// Advantages, `[batch, seq]`.
    pub advantages: Tensor<2>,
    /// Returns, `[batch, seq]`.
    pub returns: Tensor<2>,
}

// ---------------------------------------------------------------------------
// Groups
// ---------------------------------------------------------------------------

/// Group membership of the rows of a batch, built on the host from group ids
/// (metadata, not numeric data; see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct Groups {
    /// Dense group number `0..groups` of every row, `[batch]`.
    ids: Tensor<1, Int>,
    /// One-hot membership, `[batch, groups]`.
    members: Tensor<2, Bool>,
    /// The size of each row's group, `[batch, 1]`.
    size: Tensor<2>,
    /// Original id and size of each group (host).
    groups: Vec<(i64, usize)>,
    batch: usize,
}

impl Groups {
    /// Groups from one arbitrary `i64` id per row (members need not be
    /// contiguous), on `device`.
    ///
    /// # Errors
    /// [`Error::Empty`] for no row.
    pub fn new(index: &[i64], device: &Device) -> Result<Self, Error> {
        if index.is_empty() {
            return Err(Error::Empty { input: "scores" });
        }
        let mut uniq: Vec<i64> = index.to_vec();
        uniq.sort_unstable();
        uniq.dedup();
        let b = index.len();
        let g = uniq.len();
        let dense: Vec<usize> = index
            .iter()
            .map(|id| uniq.binary_search(id).unwrap_or(0))
            .collect();
        let mut sizes = vec![0usize; g];
        for &k in &dense {
            sizes[k] += 1;
        }
        let mut onehot = vec![false; b * g];
        for (i, &k) in dense.iter().enumerate() {
            onehot[i * g + k] = true;
        }
        let ids_i64: Vec<i64> = dense.iter().map(|&k| k as i64).collect();
        let size_f: Vec<f64> = dense.iter().map(|&k| sizes[k] as f64).collect();
        Ok(Groups {
            ids: Tensor::from_data(TensorData::new(ids_i64, [b]), device),
            members: mask2(&onehot, [b, g], device)?,
            size: Tensor::from_data(TensorData::new(size_f, [b, 1]), device),
            groups: uniq.into_iter().zip(sizes).collect(),
            batch: b,
        })
    }

    /// `group_size` consecutive rows per group (TRL's `num_generations`).
    ///
    /// # Errors
    /// [`Error::Empty`] for no row; [`Error::Invalid`] when `group_size` is 0
    /// or does not divide `batch`.
    pub fn consecutive(batch: usize, group_size: usize, device: &Device) -> Result<Self, Error> {
        if group_size == 0 || batch % group_size != 0 {
            return Err(Error::Invalid {
                input: "num_generations",
                rule: "must divide the number of completions",
            });
        }
        let ids: Vec<i64> = (0..batch).map(|i| (i / group_size) as i64).collect();
        Groups::new(&ids, device)
    }

    /// The number of rows.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The number of groups.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Whether there is no group (never: [`Groups::new`] refuses no row).
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Per-group sums of the rows of `x` (`[batch, k]` → `[groups, k]`), a
    /// scatter-add.
    fn sum(&self, x: Tensor<2>) -> Tensor<2> {
        let k = x.dims()[1];
        Tensor::zeros([self.len(), k], &x.device()).select_assign(
            0,
            self.ids.clone(),
            x,
            IndexingUpdateOp::Add,
        )
    }

    /// Each row's group's value (`[groups, k]` → `[batch, k]`), a gather.
    fn per_row(&self, g: Tensor<2>) -> Tensor<2> {
        g.select(0, self.ids.clone())
    }

    /// Each row's group sum of `x` (`[batch, k]`).
    fn row_sum(&self, x: Tensor<2>) -> Tensor<2> {
        self.per_row(self.sum(x))
    }

    /// Each row's group maximum of the column `x` (`[batch, 1]`); `fill`
    /// stands for non-members (the fold's start value).
    fn row_max(&self, x: Tensor<2>, fill: f64) -> Tensor<2> {
        let shape = self.members.dims();
        let g = crate::util::filled(shape, fill, &x.device())
            .mask_where(self.members.clone(), x.expand(shape))
            .max_dim(0);
        self.per_row(g.reshape([shape[1], 1]))
    }

    /// Rows whose group has a single member, `[batch, 1]`.
    fn singleton(&self) -> Tensor<2, Bool> {
        self.size.clone().equal_elem(1.0)
    }

    fn check(&self, input: &'static str, x: &Tensor<1>) -> Result<(), Error> {
        check_len(input, x.dims()[0], self.batch)
    }
}

/// `(mean, std)` of each row's group (`bessel`: divide by `n − 1`), `[batch, 1]`
/// each; core `group_mean_std`.
fn group_mean_std(s: &Tensor<2>, groups: &Groups, bessel: bool) -> (Tensor<2>, Tensor<2>) {
    let n = groups.size.clone();
    let mean = groups.row_sum(s.clone()) / n.clone();
    let c = s.clone() - mean.clone();
    let sq = groups.row_sum(c.clone() * c);
    let d = if bessel { n.sub_scalar(1.0) } else { n };
    (mean, (sq / d).sqrt())
}

// ---------------------------------------------------------------------------
// Scores and broadcasting
// ---------------------------------------------------------------------------

/// One score per sequence: the sum of its **whole** row of token rewards,
/// padding included (verl's outcome estimators).
///
/// # Formula
/// `s_i = Σ_t r_{i,t}` (`sum_dim(1)`), as [`ca::outcome_scores`].
/// # Gradient
/// None (advantages are constants).
/// # Peers
/// verl `token_level_rewards.sum(dim=-1)`.
/// # Errors
/// Never fails (the shape is the input's); returns `[batch]`.
pub fn outcome_scores(rewards: Tensor<2>) -> Result<Tensor<1>, Error> {
    Ok(flat(rewards.sum_dim(1)))
}

/// Each sequence's scalar at its valid tokens, 0 elsewhere.
///
/// # Formula
/// `out_{i,t} = a_i if mask_{i,t} else 0` (a selection), as
/// [`ca::broadcast_to_tokens`].
/// # Gradient
/// None.
/// # Peers
/// verl `scores.unsqueeze(-1) * response_mask`.
/// # Errors
/// [`Error::ShapeMismatch`] when `per_seq` is not `[batch]`.
pub fn broadcast_to_tokens(per_seq: Tensor<1>, mask: &Tensor<2, Bool>) -> Result<Tensor<2>, Error> {
    let [b, t] = mask.dims();
    check_len("per_seq", per_seq.dims()[0], b)?;
    Ok(keep(col(per_seq).expand([b, t]), mask))
}

// ---------------------------------------------------------------------------
// Group estimators
// ---------------------------------------------------------------------------

/// Group z-scores `(s − mean_g)/(std_g + ε)` on tensors.
///
/// # Formula
/// As [`ca::group_zscore_advantages`], line by line: group mean and
/// (Bessel) std by group sums; a member equal to its mean gets 0; singleton
/// groups per [`SingletonGroup`].
/// # Gradient
/// None.
/// # Peers
/// See [`GroupNormConfig`].
/// # Errors
/// [`Error::ShapeMismatch`] when `scores` is not `[groups.batch()]`;
/// [`Error::OutOfRange`] for a bad `std_eps`.
pub fn group_zscore_advantages(
    cfg: &GroupNormConfig,
    scores: Tensor<1>,
    groups: &Groups,
) -> Result<Tensor<1>, Error> {
    GroupNormConfig::new(cfg.scale_by_std, cfg.std_eps, cfg.bessel, cfg.singleton)?;
    groups.check("scores", &scores)?;
    let s = col(scores);
    let (mean, std) = group_mean_std(&s, groups, cfg.bessel);
    let c = s.clone() - mean;
    let multi = if cfg.scale_by_std {
        // ε = 0 with a constant group: the centered score is 0, so is A.
        sel(
            c.clone().equal_elem(0.0),
            c.clone(),
            c / std.add_scalar(cfg.std_eps),
        )
    } else {
        c
    };
    let single = match cfg.singleton {
        SingletonGroup::MeanZeroStdOne if cfg.scale_by_std => s.div_scalar(1.0 + cfg.std_eps),
        SingletonGroup::MeanZeroStdOne | SingletonGroup::RawScore => s,
        SingletonGroup::Zero => s.zeros_like(),
    };
    Ok(flat(sel(groups.singleton(), single, multi)))
}

/// Mean-baseline advantages `s − mean_g` (a singleton's mean is 0), as
/// [`ca::group_mean_baseline_advantages`].
///
/// # Formula
/// `A_i = s_i − mean_g`.
/// # Gradient
/// None.
/// # Peers
/// verl `reinforce_plus_plus_baseline` (before its token whitening).
/// # Errors
/// As [`group_zscore_advantages`].
pub fn group_mean_baseline_advantages(
    scores: Tensor<1>,
    groups: &Groups,
) -> Result<Tensor<1>, Error> {
    let cfg = GroupNormConfig {
        scale_by_std: false,
        std_eps: 0.0,
        bessel: true,
        singleton: SingletonGroup::MeanZeroStdOne,
    };
    group_zscore_advantages(&cfg, scores, groups)
}

/// REINFORCE++ with a group-mean baseline: `s − mean_g` broadcast to the
/// valid tokens, whitened over the valid tokens of the batch (verl
/// `masked_whiten`), zero on padding.
///
/// # Formula
/// `A = mask · whiten_V((s − mean_g) ⊗ mask)`: [`group_mean_baseline_advantages`],
/// [`broadcast_to_tokens`], then the whitening of [`ca::reinforce_plus_plus_advantages`].
/// # Gradient
/// None.
/// # Peers
/// verl `reinforce_plus_plus_baseline`.
/// # Errors
/// As [`group_zscore_advantages`]; [`Error::ShapeMismatch`] when the mask's
/// batch differs; [`Error::Invalid`] with fewer than two valid tokens.
pub fn reinforce_plus_plus_baseline_advantages(
    scores: Tensor<1>,
    groups: &Groups,
    mask: &Tensor<2, Bool>,
) -> Result<Tensor<2>, Error> {
    let a = group_mean_baseline_advantages(scores, groups)?;
    let tok = broadcast_to_tokens(a, mask)?;
    let w = masked_whiten_all(&WhitenConfig::preset(Preset::Verl), tok, mask)?;
    Ok(keep(w, mask))
}

/// GPG advantages `α·(s − mean_g)/f_norm`, `α = B / max(1, #{s ≠ 0})`.
///
/// # Formula
/// As [`ca::gpg_advantages`]; the nonzero count is a tensor reduction.
/// # Gradient
/// None.
/// # Peers
/// verl `gpg` (which ignores its `alpha` argument).
/// # Errors
/// As [`group_zscore_advantages`]; [`Error::OutOfRange`] for `f_norm = 0` or
/// non-finite.
pub fn gpg_advantages(scores: Tensor<1>, groups: &Groups, f_norm: f64) -> Result<Tensor<1>, Error> {
    check_param(
        f_norm != 0.0 && f_norm.is_finite(),
        "f_norm",
        f_norm,
        "must be finite and ≠ 0",
    )?;
    let base = group_mean_baseline_advantages(scores.clone(), groups)?;
    let b = groups.batch();
    let nonzero = scores.not_equal_elem(0.0).float().sum().clamp_min(1.0);
    let alpha = nonzero.recip().mul_scalar(b as f64).expand([b]);
    Ok((alpha * base).div_scalar(f_norm))
}

/// Leave-one-out advantages `s_i − mean_{j≠i} s_j`.
///
/// # Formula
/// `A_i = (n·s_i − Σ_g s)/(n − 1)`; singletons per `singleton` (`Zero` → 0,
/// otherwise the raw score), as [`ca::leave_one_out_advantages`].
/// # Gradient
/// None.
/// # Peers
/// verl `rloo` (`RawScore`), `rloo_vectorized` (`Zero`).
/// # Errors
/// [`Error::ShapeMismatch`] when `scores` is not `[groups.batch()]`.
pub fn leave_one_out_advantages(
    scores: Tensor<1>,
    groups: &Groups,
    singleton: SingletonGroup,
) -> Result<Tensor<1>, Error> {
    groups.check("scores", &scores)?;
    let s = col(scores);
    let n = groups.size.clone();
    let sum = groups.row_sum(s.clone());
    let multi = (n.clone() * s.clone() - sum) / n.sub_scalar(1.0);
    let single = match singleton {
        SingletonGroup::Zero => s.zeros_like(),
        _ => s,
    };
    Ok(flat(sel(groups.singleton(), single, multi)))
}

/// OPO advantages: each score minus its group's length-weighted mean score.
///
/// # Formula
/// As [`ca::length_weighted_baseline_advantages`]: weights `len / max_g |len|`
/// (scale 1 when that max is 0 or not finite), `b_g = Σ w s / Σ w` (0 when
/// `Σ w = 0` or for a singleton), `A = s − b_g`.
/// # Gradient
/// None.
/// # Peers
/// verl `opo` (`len` = valid tokens per sequence).
/// # Errors
/// [`Error::ShapeMismatch`] when `scores` or `lengths` is not `[groups.batch()]`.
pub fn length_weighted_baseline_advantages(
    scores: Tensor<1>,
    lengths: Tensor<1>,
    groups: &Groups,
) -> Result<Tensor<1>, Error> {
    groups.check("scores", &scores)?;
    groups.check("lengths", &lengths)?;
    let (s, len) = (col(scores), col(lengths));
    let lmax = groups.row_max(len.clone().abs(), 0.0);
    let ok = lmax
        .clone()
        .greater_elem(0.0)
        .bool_and(lmax.clone().is_finite());
    let scale = sel(ok, lmax.clone(), lmax.ones_like());
    let w = len / scale;
    let num = groups.row_sum(w.clone() * s.clone());
    let den = groups.row_sum(w);
    let base = sel(den.clone().equal_elem(0.0), den.zeros_like(), num / den);
    let base = sel(groups.singleton(), base.zeros_like(), base);
    Ok(flat(s - base))
}

/// Pass@k advantages: only the best member of each group (the first on a
/// tie) gets a nonzero advantage, its gap to the second best.
///
/// # Formula
/// As [`ca::pass_at_k_advantages`]: `A_best = (s_(1) − s_(2)) / (std_g + ε)`
/// (or unscaled), `A_other = 0`. The best is the group max (`max_dim` over
/// the membership mask); the first of tied maxima is the one whose running
/// count of maxima in its group (`cumsum` down the batch) is 1.
/// # Gradient
/// None.
/// # Peers
/// verl `grpo_passk`.
/// # Errors
/// [`Error::EmptyGroup`] for a group with fewer than 2 members;
/// [`Error::ShapeMismatch`] for `scores`.
pub fn pass_at_k_advantages(
    cfg: &PassAtKConfig,
    scores: Tensor<1>,
    groups: &Groups,
) -> Result<Tensor<1>, Error> {
    groups.check("scores", &scores)?;
    if let Some(&(id, _)) = groups.groups.iter().find(|(_, n)| *n < 2) {
        return Err(Error::EmptyGroup {
            group: id,
            needed: 2,
        });
    }
    let s = col(scores);
    let shape = groups.members.dims();
    let gmax = groups.row_max(s.clone(), f64::NEG_INFINITY);
    let is_max = s.clone().equal(gmax.clone());
    let running = keep(is_max.clone().float().expand(shape), &groups.members).cumsum(0);
    let rank = keep(running, &groups.members).sum_dim(1);
    let best = is_max.bool_and(rank.equal_elem(1.0));
    let others = sel(best.clone(), s.filled(f64::NEG_INFINITY), s.clone());
    let second = groups.row_max(others, f64::NEG_INFINITY);
    let mut a = s.clone() - second;
    if cfg.scale_by_std {
        let (_, std) = group_mean_std(&s, groups, true);
        a = a / std.add_scalar(cfg.std_eps);
    }
    Ok(flat(keep(a, &best)))
}

/// GDPO: a group z-score per reward component, weighted sum, whitened over
/// the valid tokens of the batch, zero on padding.
///
/// # Formula
/// As [`ca::gdpo_advantages`]: `S = Σ_k w_k · zscore_k`, then
/// `A = mask · whiten_V(S ⊗ mask)` (verl `masked_whiten`).
/// # Gradient
/// None.
/// # Peers
/// verl `gdpo`.
/// # Errors
/// [`Error::Empty`] for no component; [`Error::ShapeMismatch`] when
/// `key_scores` and `weights` differ in length or a component is not
/// `[batch]`; the whitening's [`Error::Invalid`] with < 2 valid tokens.
pub fn gdpo_advantages(
    cfg: &GroupNormConfig,
    key_scores: &[Tensor<1>],
    weights: &[f64],
    mask: &Tensor<2, Bool>,
    groups: &Groups,
) -> Result<Tensor<2>, Error> {
    if weights.is_empty() {
        return Err(Error::Empty { input: "weights" });
    }
    check_len("key_scores", key_scores.len(), weights.len())?;
    check_len("response_mask", mask.dims()[0], groups.batch())?;
    let mut acc: Option<Tensor<1>> = None;
    for (k, &w) in key_scores.iter().zip(weights) {
        let z = group_zscore_advantages(cfg, k.clone(), groups)?.mul_scalar(w);
        acc = Some(match acc {
            None => z,
            Some(a) => a + z,
        });
    }
    let s = broadcast_to_tokens(acc.expect("≥ 1 component"), mask)?;
    let out = masked_whiten_all(&WhitenConfig::preset(Preset::Verl), s, mask)?;
    Ok(keep(out, mask))
}

// ---------------------------------------------------------------------------
// Whitening over the whole batch
// ---------------------------------------------------------------------------

/// Masked whitening over all valid entries of the batch (core
/// `masked_whiten_in_place` with `Reduce::All`), on tensors.
///
/// The valid count `W` is read to the host once (mask metadata): the mean's
/// denominator `D = max(W + ε, floor)` and the [`Bessel`] factor follow the
/// core's `MomentConfig` (which refuses `W ≤ 1` for the exact correction);
/// the sums are tensor reductions.
///
/// ```text
/// m = Σ_V x / D,  v = Σ_V (x − m)² · scale,  r = (v + ε)^{-½} | max(v, ε)^{-½}
/// y = (x − m)·r + [keep_mean]·m     (= [keep_mean]·m at masked entries when zero_masked)
/// ```
pub(crate) fn masked_whiten_all(
    cfg: &WhitenConfig,
    x: Tensor<2>,
    mask: &Tensor<2, Bool>,
) -> Result<Tensor<2>, Error> {
    cfg.validate()?;
    check_shape("values", x.dims(), mask.dims())?;
    let shape = x.dims();
    let mc = &cfg.moments;
    let w = to_vec(count(mask))[0];
    // MomentConfig::denom
    let mut d = w + mc.count_eps;
    if mc.count_floor > 0.0 && d < mc.count_floor {
        d = mc.count_floor;
    }
    // MomentConfig::var_scale
    let scale = if d == 0.0 && mc.bessel != Bessel::Exact {
        0.0
    } else {
        match mc.bessel {
            Bessel::None => 1.0 / d,
            Bessel::Exact => {
                if w <= 1.0 {
                    return Err(Error::Invalid {
                        input: "mask",
                        rule: "an unbiased variance needs at least two valid entries",
                    });
                }
                1.0 / d * (w / (w - 1.0))
            }
            Bessel::Smoothed => {
                let we = w + mc.count_eps;
                if we == 1.0 {
                    return Err(Error::Invalid {
                        input: "mask",
                        rule: "a smoothed-Bessel variance with count_eps = 0 needs a count other than 1",
                    });
                }
                1.0 / d * (we / (we - 1.0))
            }
        }
    };
    let mean = if d != 0.0 {
        keep(x.clone(), mask).sum().div_scalar(d)
    } else {
        Tensor::zeros([1], &x.device())
    };
    let c = x - bcast(mean.clone(), shape);
    let v = keep(c.clone().square(), mask).sum().mul_scalar(scale);
    let r = match cfg.var_eps {
        VarEps::Add(e) => v.add_scalar(e).sqrt().recip(),
        VarEps::Floor(e) => v.clamp_min(e).sqrt().recip(),
    };
    let kept = if cfg.keep_mean {
        bcast(mean, shape)
    } else {
        c.zeros_like()
    };
    let y = c * bcast(r, shape) + kept.clone();
    Ok(if cfg.zero_masked {
        sel(mask.clone(), y, kept)
    } else {
        y
    })
}

// ---------------------------------------------------------------------------
// Token-level: GAE, REINFORCE++, ReMax
// ---------------------------------------------------------------------------

/// Concatenates columns collected from the last to the first.
fn cat_reversed(mut cols: Vec<Tensor<2>>, shape: [usize; 2], device: &Device) -> Tensor<2> {
    if cols.is_empty() {
        return Tensor::zeros(shape, device);
    }
    cols.reverse();
    Tensor::cat(cols, 1)
}

/// GAE with returns, then the config's whitening, on tensors.
///
/// # Formula
/// As [`ca::gae_advantages_returns`]: a reverse scan over the columns
/// (`O(seq)` launches, see the [module docs](self)) of the core kernel
/// [`ca::gae_step`] on `[batch, 1]` columns; with `skip_masked` a masked
/// step keeps the running `V_{t+1}`, `A_{t+1}` (a selection);
/// `returns = A + V` (un-whitened), `advantages = whiten(A)`, zeroed on
/// padding when `zero_masked`.
/// # Gradient
/// None.
/// # Peers
/// See [`GaeConfig`].
/// # Errors
/// [`Error::ShapeMismatch`] when the shapes differ; the whitening's errors;
/// [`Error::OutOfRange`] unless `γ, λ ∈ [0, 1]`.
pub fn gae_advantages_returns(
    cfg: &GaeConfig,
    rewards: Tensor<2>,
    values: Tensor<2>,
    mask: &Tensor<2, Bool>,
) -> Result<AdvantagesReturns, Error> {
    GaeConfig::preset(Preset::Verl, cfg.gamma, cfg.lam)?;
    let shape = mask.dims();
    check_shape("rewards", rewards.dims(), shape)?;
    check_shape("values", values.dims(), shape)?;
    let [b, t] = shape;
    let device = mask.device();
    let gl = cfg.gamma * cfg.lam;
    let mut next_v: Tensor<2> = Tensor::zeros([b, 1], &device);
    let mut last: Tensor<2> = Tensor::zeros([b, 1], &device);
    let (mut adv, mut ret) = (Vec::with_capacity(t), Vec::with_capacity(t));
    for j in (0..t).rev() {
        let r = rewards.clone().narrow(1, j, 1);
        let v = values.clone().narrow(1, j, 1);
        let a = ca::gae_step(
            cfg.gamma,
            gl,
            ElemTensor(r),
            ElemTensor(v.clone()),
            ElemTensor(next_v.clone()),
            ElemTensor(last.clone()),
        )
        .0;
        if cfg.skip_masked {
            let m = mask.clone().narrow(1, j, 1);
            next_v = sel(m.clone(), v.clone(), next_v);
            last = sel(m, a, last);
        } else {
            next_v = v.clone();
            last = a;
        }
        adv.push(last.clone());
        ret.push(last.clone() + v);
    }
    let mut advantages = cat_reversed(adv, shape, &device);
    let returns = cat_reversed(ret, shape, &device);
    if let Some(w) = &cfg.whiten {
        advantages = masked_whiten_all(w, advantages, mask)?;
    }
    if cfg.zero_masked {
        advantages = keep(advantages, mask);
    }
    Ok(AdvantagesReturns {
        advantages,
        returns,
    })
}

/// Discounted returns over the valid tokens; masked tokens return 0, drop
/// their reward and carry the running return through undiscounted.
///
/// # Formula
/// As [`ca::discounted_returns`]: `G_t = r_t + γ G_{t+1}` (valid), a
/// reverse scan over the columns (`O(seq)` launches).
/// # Gradient
/// None.
/// # Peers
/// verl `reinforce_plus_plus` returns.
/// # Errors
/// [`Error::ShapeMismatch`] when the shapes differ.
pub fn discounted_returns(
    rewards: Tensor<2>,
    mask: &Tensor<2, Bool>,
    gamma: f64,
) -> Result<Tensor<2>, Error> {
    let shape = mask.dims();
    check_shape("token_level_rewards", rewards.dims(), shape)?;
    let [b, t] = shape;
    let device = mask.device();
    let mut running: Tensor<2> = Tensor::zeros([b, 1], &device);
    let mut out = Vec::with_capacity(t);
    for j in (0..t).rev() {
        let m = mask.clone().narrow(1, j, 1);
        let r = rewards.clone().narrow(1, j, 1);
        running = sel(m.clone(), r + running.clone().mul_scalar(gamma), running);
        out.push(keep(running.clone(), &m));
    }
    Ok(cat_reversed(out, shape, &device))
}

/// REINFORCE++: [`discounted_returns`] whitened over the valid tokens of the
/// batch (verl `masked_whiten`), zero on padding.
///
/// # Formula
/// As [`ca::reinforce_plus_plus_advantages`]: `A = mask · whiten_V(G)`.
/// # Gradient
/// None.
/// # Peers
/// verl `reinforce_plus_plus`.
/// # Errors
/// [`Error::ShapeMismatch`]; [`Error::OutOfRange`] unless `γ ∈ [0, 1]`;
/// [`Error::Invalid`] with fewer than two valid tokens.
pub fn reinforce_plus_plus_advantages(
    rewards: Tensor<2>,
    mask: &Tensor<2, Bool>,
    gamma: f64,
) -> Result<AdvantagesReturns, Error> {
    check_param(
        (0.0..=1.0).contains(&gamma),
        "gamma",
        gamma,
        "must lie in [0, 1]",
    )?;
    let returns = discounted_returns(rewards, mask, gamma)?;
    let adv = masked_whiten_all(&WhitenConfig::preset(Preset::Verl), returns.clone(), mask)?;
    Ok(AdvantagesReturns {
        advantages: keep(adv, mask),
        returns,
    })
}

/// `G_t = Σ_{u ≥ t, mask_u} r_u` at every position: `flip`/`cumsum`/`flip`
/// of the selected rewards (core `reward_to_go`).
fn reward_to_go(rewards: Tensor<2>, mask: &Tensor<2, Bool>) -> Tensor<2> {
    keep(rewards, mask).flip([1]).cumsum(1).flip([1])
}

/// ReMax: reward-to-go of the masked rewards (`returns`, every position) and
/// `G_t − b_i` at valid positions (`G_t` elsewhere).
///
/// # Formula
/// As [`ca::remax_advantages`].
/// # Gradient
/// None.
/// # Peers
/// verl `remax` (`b` = the greedy rollout's reward).
/// # Errors
/// [`Error::ShapeMismatch`] when the shapes differ or `baselines` is not `[batch]`.
pub fn remax_advantages(
    rewards: Tensor<2>,
    baselines: Tensor<1>,
    mask: &Tensor<2, Bool>,
) -> Result<AdvantagesReturns, Error> {
    let shape = mask.dims();
    check_len("reward_baselines", baselines.dims()[0], shape[0])?;
    check_shape("token_level_rewards", rewards.dims(), shape)?;
    let returns = reward_to_go(rewards, mask);
    let adv = returns.clone() - col(baselines).expand(shape);
    Ok(AdvantagesReturns {
        advantages: sel(mask.clone(), adv, returns.clone()),
        returns,
    })
}

// ---------------------------------------------------------------------------
// Optimal token baseline
// ---------------------------------------------------------------------------

/// Optimal token baseline (OTB) on tensors.
///
/// # Formula
/// As [`ca::optimal_token_baseline_advantages`]: `G` = reward-to-go,
/// `w` = the core kernel [`ca::otb_token_weight`] on whole tensors,
/// `W = cumsum` of the valid `w` along the row; per group and step
/// `b = Σ G·W / (Σ W + ε)` — a scatter-add of the valid tokens into
/// `[groups · seq]` buckets (step = the column, or with `compact_steps` the
/// rank of the token among the row's valid tokens), gathered back per token;
/// `A = G − b` at valid tokens (0 elsewhere), `b = 0` for groups with a single
/// (non-empty, with `compact_steps`) member; the zero-tail rule from group
/// maxima of the valid lengths.
/// # Gradient
/// None.
/// # Peers
/// verl `optimal_token_baseline` / `tir_optimal_token_baseline`.
/// # Errors
/// [`Error::ShapeMismatch`] when the shapes differ.
pub fn optimal_token_baseline_advantages(
    cfg: &OtbConfig,
    rewards: Tensor<2>,
    mask: &Tensor<2, Bool>,
    groups: &Groups,
    old_log_probs: Tensor<2>,
    sum_pi_squared: Tensor<2>,
    is_weights: Option<Tensor<2>>,
) -> Result<AdvantagesReturns, Error> {
    let shape = mask.dims();
    let [b, t] = shape;
    check_len("index", groups.batch(), b)?;
    check_shape("token_level_rewards", rewards.dims(), shape)?;
    check_shape("old_log_probs", old_log_probs.dims(), shape)?;
    check_shape("sum_pi_squared", sum_pi_squared.dims(), shape)?;
    if let Some(w) = &is_weights {
        check_shape("rollout_is_weights", w.dims(), shape)?;
    }
    let device = mask.device();
    let g = groups.len();
    let ret = reward_to_go(rewards, mask);
    let w = ca::otb_token_weight(
        ElemTensor(old_log_probs),
        ElemTensor(sum_pi_squared),
        is_weights.map(ElemTensor),
    )
    .0;
    let wcum = keep(w, mask).cumsum(1);
    let maskf = mask.clone().float();
    // Step of every token (integer): its column, or its rank among the
    // row's valid tokens.
    let step: Tensor<2, Int> = if cfg.compact_steps {
        mask.clone().int().cumsum(1).sub_scalar(1)
    } else {
        Tensor::<1, Int>::arange(0..t as i64, &device)
            .reshape([1, t])
            .expand(shape)
    };
    // Bucket of every valid token: group · seq + step; padding → a dump bucket.
    let gid = groups.ids.clone().reshape([b, 1]).expand(shape);
    let bucket = gid.mul_scalar(t as i64) + step.clone();
    let bucket = Tensor::<2, Int>::zeros(shape, &device)
        .add_scalar((g * t) as i64)
        .mask_where(mask.clone(), bucket)
        .reshape([b * t]);
    let step = step.float();
    let scatter = |x: Tensor<2>| -> Tensor<1> {
        Tensor::zeros([g * t + 1], &device).select_assign(
            0,
            bucket.clone(),
            keep(x, mask).reshape([b * t]),
            IndexingUpdateOp::Add,
        )
    };
    let num = scatter(ret.clone() * wcum.clone());
    let den = scatter(wcum);
    let base_bucket = num / den.add_scalar(cfg.epsilon);
    let mut base = base_bucket.select(0, bucket).reshape(shape);
    // Members per group (multi-turn: non-empty ones only).
    let nonempty = maskf.clone().sum_dim(1).greater_elem(0.0);
    let n = if cfg.compact_steps {
        groups.row_sum(nonempty.float())
    } else {
        groups.size.clone()
    };
    let multi = n.greater_elem(1.0);
    if cfg.handle_zero_tail {
        let len = maskf.sum_dim(1);
        let lmax = groups.row_max(len.clone(), -1.0);
        let is_max = len.clone().equal(lmax.clone());
        let count_max = groups.row_sum(is_max.clone().float());
        let second = groups.row_max(sel(is_max.clone(), len.filled(-1.0), len), -1.0);
        let tail_row = multi
            .clone()
            .bool_and(is_max)
            .bool_and(count_max.equal_elem(1.0))
            .bool_and(lmax.greater(second.clone()));
        let tail = tail_row
            .expand(shape)
            .bool_and(step.greater_equal(second.expand(shape)));
        base = sel(tail, base.zeros_like(), base);
    }
    let base = sel(multi.expand(shape), base.clone(), base.zeros_like());
    Ok(AdvantagesReturns {
        advantages: keep(ret.clone() - base, mask),
        returns: ret,
    })
}

// ---------------------------------------------------------------------------
// TRL: multi-reward GRPO and RLOO
// ---------------------------------------------------------------------------

/// Logged reward statistics of the TRL ops, as `[1]` tensors (core
/// [`RewardLog`](posttrain_core::advantage::RewardLog)).
#[derive(Debug, Clone)]
pub struct RewardLog {
    /// NaN-mean of the weighted rewards (`reward`).
    pub reward_mean: Tensor<1>,
    /// NaN-std of the weighted rewards (`reward_std`).
    pub reward_std: Tensor<1>,
    /// Fraction with a (numerically) zero std (`frac_reward_zero_std`).
    pub frac_zero_std: Tensor<1>,
    /// Mean per-token k1 KL over valid tokens (`kl`, RLOO with `β ≠ 0`).
    pub kl: Option<Tensor<1>>,
}

/// NaN-aware `(count, mean, Bessel std)` along the last axis of `[n, m]`
/// (core `nan_moments`): mean NaN with no entry (`0/0`), std NaN with < 2.
fn nan_moments(x: Tensor<2>) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
    let shape = x.dims();
    let ok = x.clone().is_nan().bool_not();
    let n = ok.clone().float().sum_dim(1);
    let mean = keep(x.clone(), &ok).sum_dim(1) / n.clone();
    let c = x - mean.clone().expand(shape);
    let sq = keep(c.square(), &ok).sum_dim(1);
    let std = (sq / n.clone().sub_scalar(1.0)).sqrt();
    let std = sel(n.clone().lower_elem(2.0), std.filled(f64::NAN), std);
    (n, mean, std)
}

/// `torch.nan_to_num`: NaN → 0, ±inf → ±`f32::MAX` (the tensors' float type).
fn nan_to_num<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let nan = x.clone().is_nan();
    let c = x.clamp(-(f32::MAX as f64), f32::MAX as f64);
    sel(nan, c.zeros_like(), c)
}

/// `torch.isclose(x, 0)`: `|x| ≤ 1e-8` (false for NaN).
fn is_zero_std<const D: usize>(x: Tensor<D>) -> Tensor<D, Bool> {
    x.abs().lower_equal_elem(1e-8)
}

/// Weighted NaN-sum of each row, NaN for a row of NaNs (core `weighted_rewards`), `[b, 1]`.
fn weighted_rewards(per_func: &Tensor<2>, weights: &[f64]) -> Tensor<2> {
    let [b, k] = per_func.dims();
    let device = per_func.device();
    let w: Tensor<2> = Tensor::from_data(TensorData::new(weights.to_vec(), [1, k]), &device);
    let p = per_func.clone() * w.expand([b, k]);
    let ok = p.clone().is_nan().bool_not();
    let sum = keep(p, &ok).sum_dim(1);
    let all_nan = per_func.clone().is_nan().all_dim(1);
    sel(all_nan, sum.filled(f64::NAN), sum)
}

fn check_multi(group_size: usize, per_func: &Tensor<2>, weights: &[f64]) -> Result<(), Error> {
    let [b, k] = per_func.dims();
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
    check_len("rewards_per_func", b * k, b * weights.len())?;
    if group_size == 0 || b % group_size != 0 {
        return Err(Error::Invalid {
            input: "num_generations",
            rule: "must divide the number of completions",
        });
    }
    Ok(())
}

/// The per-function reward metrics TRL logs (`rewards/<name>/mean|std`):
/// NaN-mean and NaN-std (Bessel) of each column of `rewards_per_func`
/// (`[batch, K]` → `[K]`, `[K]`).
///
/// # Formula
/// As [`posttrain_core::stats::nan_mean`] / [`nan_std`](posttrain_core::stats::nan_std)
/// with `Reduce::Columns`.
/// # Gradient
/// None (metrics).
/// # Peers
/// TRL `GRPOTrainer` / `RLOOTrainer` logging.
/// # Errors
/// Never fails.
pub fn reward_func_stats(rewards_per_func: Tensor<2>) -> Result<(Tensor<1>, Tensor<1>), Error> {
    let (_, mean, std) = nan_moments(rewards_per_func.transpose());
    Ok((flat(mean), flat(std)))
}

/// Advantages of a TRL op with its logged statistics.
#[derive(Debug, Clone)]
pub struct TrlAdvantages {
    /// One advantage per completion, `[batch]`.
    pub advantages: Tensor<1>,
    /// The logged statistics.
    pub log: RewardLog,
}

/// TRL GRPO advantages from several reward functions, NaN-aware.
///
/// # Formula
/// As [`ca::multi_reward_group_advantages`], line by line, with groups of
/// `group_size` consecutive rows as the rows of a `[batch/g, g]` reshape:
/// ```text
/// sum_then_normalize:  R = nansum_k w_k r_k;  A = (R − nanmean_g R)/(std + ε)
/// normalize_then_sum:  R = nansum_k w_k (r_k − nanmean_g r_k)/(nanstd_g r_k + ε);
///                      A = (R − nanmean R)/(nanstd R + ε)
/// ```
/// then NaN → 0.
/// # Gradient
/// None.
/// # Peers
/// TRL `GRPOTrainer._generate_and_score_completions` (`ε = 1e-4`).
/// # Errors
/// [`Error::Empty`], [`Error::ShapeMismatch`] for `weights`, [`Error::Invalid`]
/// when `group_size` does not divide the batch.
pub fn multi_reward_group_advantages(
    cfg: &MultiRewardConfig,
    rewards_per_func: Tensor<2>,
    weights: &[f64],
) -> Result<TrlAdvantages, Error> {
    let g = cfg.group_size;
    check_multi(g, &rewards_per_func, weights)?;
    let [b, _] = rewards_per_func.dims();
    let ng = b / g;
    let eps = cfg.std_eps;
    let rewards = weighted_rewards(&rewards_per_func, weights);
    let (_, log_mean, log_std) = nan_moments(rewards.clone().reshape([1, b]));
    let (out, stds) = match cfg.aggregation {
        RewardAggregation::SumThenNormalize => {
            let batch_std = if b > 1 {
                log_std.clone()
            } else {
                log_std.zeros_like()
            };
            let r = rewards.reshape([ng, g]);
            let (_, mean, std) = nan_moments(r.clone());
            let std = match cfg.scaling {
                RewardScaling::Batch => batch_std.expand([ng, 1]),
                _ if g > 1 => std,
                _ => std.zeros_like(),
            };
            let c = r - mean.expand([ng, g]);
            let out = match cfg.scaling {
                RewardScaling::None => c,
                _ => c / std.clone().add_scalar(eps).expand([ng, g]),
            };
            (out.reshape([b]), std.expand([ng, g]).reshape([b]))
        }
        RewardAggregation::NormalizeThenSum => {
            let mut acc: Tensor<2> = Tensor::zeros([ng, g], &rewards.device());
            for (f, &w) in weights.iter().enumerate() {
                let r = rewards_per_func.clone().narrow(1, f, 1).reshape([ng, g]);
                let (_, mean, std) = nan_moments(r.clone());
                let std = if g > 1 { std } else { std.zeros_like() };
                let p = (r - mean.expand([ng, g])) / std.add_scalar(eps).expand([ng, g]);
                let p = p.mul_scalar(w);
                let ok = p.clone().is_nan().bool_not();
                acc = acc + keep(p, &ok);
            }
            let all_nan = rewards_per_func.is_nan().all_dim(1).reshape([1, b]);
            let acc = acc.reshape([1, b]);
            let r = sel(all_nan, acc.filled(f64::NAN), acc);
            let (_, mean, std) = nan_moments(r.clone());
            let std = if b > 1 { std } else { std.zeros_like() };
            let out = (r - mean.expand([1, b])) / std.clone().add_scalar(eps).expand([1, b]);
            (out.reshape([b]), std.expand([1, b]).reshape([b]))
        }
    };
    let zero = is_zero_std(stds).float().sum();
    Ok(TrlAdvantages {
        advantages: nan_to_num(out),
        log: RewardLog {
            reward_mean: flat(log_mean),
            reward_std: flat(log_std),
            frac_zero_std: zero.div_scalar(b as f64),
            kl: None,
        },
    })
}

/// TRL RLOO advantages with the summed old log-probs of every completion.
#[derive(Debug, Clone)]
pub struct RlooAdvantages {
    /// One advantage per completion, `[batch]`.
    pub advantages: Tensor<1>,
    /// Σ of the valid old per-token log-probs per completion, `[batch]`.
    pub seq_old_logps: Tensor<1>,
    /// The logged statistics.
    pub log: RewardLog,
}

/// TRL RLOO advantages: weighted rewards, clipped, minus `β` × the
/// sequence's summed k1 KL, minus the leave-one-out mean of the group.
///
/// # Formula
/// As [`ca::leave_one_out_reward_advantages`], line by line:
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
pub fn leave_one_out_reward_advantages(
    cfg: &RlooConfig,
    rewards_per_func: Tensor<2>,
    weights: &[f64],
    completion_mask: &Tensor<2, Bool>,
    old_logps: Tensor<2>,
    ref_logps: Option<Tensor<2>>,
) -> Result<RlooAdvantages, Error> {
    let g = cfg.group_size;
    check_multi(g, &rewards_per_func, weights)?;
    let [b, _] = rewards_per_func.dims();
    let shape = completion_mask.dims();
    check_len("completion_mask", shape[0], b)?;
    check_shape("old_per_token_logps", old_logps.dims(), shape)?;
    if let Some(r) = &ref_logps {
        check_shape("ref_per_token_logps", r.dims(), shape)?;
    }
    let ng = b / g;
    let seq_old = keep(old_logps.clone(), completion_mask).sum_dim(1);
    let mut rewards = weighted_rewards(&rewards_per_func, weights);
    let (_, log_mean, log_std) = nan_moments(rewards.clone().reshape([1, b]));
    if let Some((lo, hi)) = cfg.reward_clip {
        let nan = rewards.clone().is_nan();
        rewards = sel(nan, rewards.clone(), rewards.clamp(lo, hi));
    }
    let mut kl_metric = None;
    if cfg.beta != 0.0 {
        let rf = ref_logps.ok_or(Error::Invalid {
            input: "ref_per_token_logps",
            rule: "required when beta ≠ 0",
        })?;
        let kl = keep(old_logps - rf, completion_mask).sum_dim(1);
        let total = kl.clone().sum();
        let n = count(completion_mask).clamp_min(1.0);
        rewards = rewards - kl.mul_scalar(cfg.beta);
        kl_metric = Some(total / n);
    }
    let r = rewards.reshape([ng, g]);
    let (n, _, std) = nan_moments(r.clone());
    let std = if g > 1 { std } else { std.zeros_like() };
    let zero = is_zero_std(std).float().sum();
    let ok = r.clone().is_nan().bool_not();
    let sum = keep(r.clone(), &ok).sum_dim(1).expand([ng, g]);
    let out = if g > 1 {
        r.clone() - (sum - r) / n.sub_scalar(1.0).expand([ng, g])
    } else {
        r.zeros_like()
    };
    let mut out = out.reshape([1, b]);
    if cfg.normalize {
        let (_, mean, std) = nan_moments(out.clone());
        out = (out - mean.expand([1, b])) / std.add_scalar(cfg.std_eps).expand([1, b]);
    }
    Ok(RlooAdvantages {
        advantages: nan_to_num(out.reshape([b])),
        seq_old_logps: flat(seq_old),
        log: RewardLog {
            reward_mean: flat(log_mean),
            reward_std: flat(log_std),
            frac_zero_std: zero.div_scalar(ng as f64),
            kl: kl_metric,
        },
    })
}

// ---------------------------------------------------------------------------
// Reward shaping and the KL controller
// ---------------------------------------------------------------------------

/// KL-penalized token rewards and the batch's mean KL.
#[derive(Debug, Clone)]
pub struct KlPenalizedRewards {
    /// `score − β·KL̂` per token, `[batch, seq]`.
    pub rewards: Tensor<2>,
    /// Mean over rows of each row's masked-mean KL, `[1]` (feed it to
    /// [`update_kl_controller`]).
    pub mean_kl: Tensor<1>,
}

/// KL-in-reward: `r̃ = score − β · KL̂(log π_old, log π_ref)` per token,
/// masked positions carrying no KL.
///
/// # Formula
/// As [`posttrain_core::kl::kl_penalized_rewards`]: the core kernel
/// [`KlConfig::estimate`] on whole tensors, selected to 0 off the mask;
/// `mean_kl = (1/B) Σ_i (Σ_j k_ij)/(n_i + 1e-8)`.
/// # Gradient
/// None (rewards are constants).
/// # Peers
/// verl `apply_kl_penalty` (β = the controller's value before its update),
/// and with `mask = None` verl `compute_rewards`.
/// # Errors
/// [`Error::ShapeMismatch`] when the shapes differ; [`Error::OutOfRange`] for
/// a non-finite `beta` or an invalid clamp.
pub fn kl_penalized_rewards(
    cfg: &KlConfig,
    beta: f64,
    scores: Tensor<2>,
    old_log_prob: Tensor<2>,
    ref_log_prob: Tensor<2>,
    mask: Option<&Tensor<2, Bool>>,
) -> Result<KlPenalizedRewards, Error> {
    cfg.validate()?;
    check_param(beta.is_finite(), "kl_coef", beta, "must be finite")?;
    let shape = scores.dims();
    check_shape("old_log_prob", old_log_prob.dims(), shape)?;
    check_shape("ref_log_prob", ref_log_prob.dims(), shape)?;
    if let Some(m) = mask {
        check_shape("response_mask", m.dims(), shape)?;
    }
    let [b, t] = shape;
    let device = scores.device();
    let (k, _) = cfg.estimate(ElemTensor(old_log_prob), ElemTensor(ref_log_prob));
    let k = k.0;
    let (k, row_n) = match mask {
        Some(m) => (keep(k, m), m.clone().float().sum_dim(1)),
        None => (k, crate::util::filled([b, 1], t as f64, &device)),
    };
    let rewards = scores - k.clone().mul_scalar(beta);
    let mean_kl = if b == 0 {
        Tensor::zeros([1], &device)
    } else {
        flat(k.sum_dim(1) / row_n.add_scalar(1e-8)).mean()
    };
    Ok(KlPenalizedRewards { rewards, mean_kl })
}

/// Where the sequence score lands (tensor version of
/// [`ScorePosition`](posttrain_core::kl::ScorePosition)).
#[derive(Debug, Clone, Copy)]
pub enum EosPosition<'a> {
    /// The last column of every row.
    LastColumn,
    /// The last valid position of the mask (the last column for a row with none).
    LastValid(&'a Tensor<2, Bool>),
    /// An explicit column per row.
    Explicit(&'a [i64]),
}

/// Token rewards with a sequence score at EOS, and `∂r/∂kl`.
#[derive(Debug, Clone)]
pub struct EosRewards {
    /// `−β·kl + score at EOS`, `[batch, seq]`.
    pub rewards: Tensor<2>,
    /// `∂r/∂kl = −β` everywhere, `[batch, seq]`.
    pub grad_kl: Tensor<2>,
}

/// Token rewards with the sequence score at its EOS position and a
/// per-token KL penalty: `r_ij = −β·kl_ij + 1[j = eos_i]·score_i`.
///
/// # Formula
/// As [`posttrain_core::kl::rewards_with_score_at_eos`]. The EOS one-hot is
/// built on the host for [`EosPosition::LastColumn`]/[`EosPosition::Explicit`]
/// (metadata), and on the tensor for [`EosPosition::LastValid`]: a valid
/// token with exactly one valid token at or after it (`flip`/`cumsum`).
/// # Gradient
/// `∂r/∂kl = −β` everywhere (the KL is not masked, as in both peers).
/// # Peers
/// OpenRLHF `compute_reward` (`LastValid`), torchtune `get_rewards_ppo`
/// (`LastColumn` / `Explicit`).
/// # Errors
/// [`Error::ShapeMismatch`]; [`Error::OutOfRange`] for a non-finite `beta`;
/// [`Error::Invalid`] for an explicit position outside `[0, seq)`;
/// [`Error::Empty`] for zero-length rows.
pub fn rewards_with_score_at_eos(
    scores: Tensor<1>,
    position: EosPosition<'_>,
    kl: Tensor<2>,
    beta: f64,
) -> Result<EosRewards, Error> {
    check_param(beta.is_finite(), "kl_coef", beta, "must be finite")?;
    let shape = kl.dims();
    let [b, t] = shape;
    let device = kl.device();
    check_len("scores", scores.dims()[0], b)?;
    match position {
        EosPosition::LastValid(m) => check_shape("action_mask", m.dims(), shape)?,
        EosPosition::Explicit(idx) => {
            check_len("valid_score_idxs", idx.len(), b)?;
            if idx.iter().any(|&j| j < 0 || j as usize >= t) {
                return Err(Error::Invalid {
                    input: "valid_score_idxs",
                    rule: "every index must lie in [0, seq)",
                });
            }
        }
        EosPosition::LastColumn => {}
    }
    if t == 0 && b > 0 {
        return Err(Error::Empty { input: "seq" });
    }
    let host_onehot = |col_of: &dyn Fn(usize) -> usize| -> Result<Tensor<2, Bool>, Error> {
        let mut v = vec![false; b * t];
        for i in 0..b {
            v[i * t + col_of(i)] = true;
        }
        mask2(&v, shape, &device)
    };
    let last_col = host_onehot(&|_| t - 1)?;
    let pos = match position {
        EosPosition::LastColumn => last_col,
        EosPosition::Explicit(idx) => host_onehot(&|i| idx[i] as usize)?,
        EosPosition::LastValid(m) => {
            let after = m.clone().float().flip([1]).cumsum(1).flip([1]);
            let last = m.clone().bool_and(after.equal_elem(1.0));
            let none = m.clone().any_dim(1).bool_not().expand(shape);
            last.bool_or(none.bool_and(last_col))
        }
    };
    let base = kl.mul_scalar(beta).neg();
    let with_score = base.clone() + col(scores).expand(shape);
    Ok(EosRewards {
        rewards: sel(pos, with_score, base.clone()),
        grad_kl: base.filled(-beta),
    })
}

/// Updates a [`KlController`] with a batch's measured KL held in a tensor.
///
/// The controller is host scalar state: `current_kl` (shape `[1]`) is read
/// to the host once (one device sync) and fed to [`KlController::update`].
///
/// # Formula
/// Adaptive: `β ← β·(1 + clip(kl/target − 1, ±0.2)·n_steps/horizon)`; fixed:
/// unchanged.
/// # Gradient
/// None.
/// # Peers
/// verl `FixedKLController` / `AdaptiveKLController`.
/// # Errors
/// [`Error::ShapeMismatch`] unless `current_kl` has one element; the
/// controller's errors (NaN KL, overflow).
pub fn update_kl_controller(
    ctl: &mut KlController,
    current_kl: Tensor<1>,
    n_steps: u64,
) -> Result<(), Error> {
    check_len("current_kl", current_kl.dims()[0], 1)?;
    ctl.update(to_vec(current_kl)[0], n_steps)
}
