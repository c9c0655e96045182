//! Preference and reward-model losses on tensors: the DPO family (from
//! sequence log-probabilities and TRL's whole step from logits), reward
//! models, KTO, BCO, the process-reward-model loss, CPO and ORPO.
//!
//! The per-pair / per-example formulas are the core's [`Elem`] kernels run on
//! whole `[B]` tensors through [`ElemTensor`]; what the core's slice drivers
//! do with loops (sequence sums of shifted token log-probabilities, batch
//! means, the KL reference point, the AOT sort, the running moments of BCO)
//! is written here with tensor reductions, following the drivers line by
//! line. Token log-probabilities come from [`crate::logits`]'s
//! [`selective_log_softmax`] and [`entropy_from_logits`].
//!
//! | function | core counterpart | peers |
//! |---|---|---|
//! | [`paired_loss`], [`paired_loss_vjp`], [`paired_metrics`] | [`paired::paired_loss`] (every [`PairedLoss`], AOT and SFT included) | TRL `DPOTrainer`, OpenRLHF `DPOLoss`, torchtune `DPOLoss`/`IPOLoss`/`RSOLoss`/`SimPOLoss` |
//! | [`dpo_from_logits`] | [`paired::dpo_from_logits`] | TRL `DPOTrainer._compute_loss` |
//! | [`pairwise_reward_loss`] | [`paired::pairwise_reward_loss`] | TRL `RewardTrainer`, OpenRLHF `PairWiseLoss`/`LogExpLoss` |
//! | [`kto_kl_baseline`], [`kto_loss`], [`vanilla_kto_loss`] | [`unpaired::kto_loss`] and friends | TRL `KTOTrainer`, OpenRLHF `KTOLoss`/`VanillaKTOLoss` |
//! | [`bco_loss`] | [`unpaired::bco_loss`] | TRL `BCOTrainer` |
//! | [`prm_hard_loss`], [`prm_soft_loss`] | [`unpaired::prm_hard_loss`], [`unpaired::prm_soft_loss`] | OpenRLHF `PRMLoss` |
//! | [`cpo_loss`], [`odds_ratio_loss`] | [`odds_ratio::cpo_loss`], [`odds_ratio::odds_ratio_loss`] | TRL `CPOTrainer`, `ORPOTrainer` |
//! | [`shifted_sequence_logps`], [`shifted_sequence_logps_vjp`], [`shifted_mean_nll`] | [`odds_ratio::shifted_sequence_logps`] and friends | TRL `get_batch_logps`, `CrossEntropyLoss` |
//!
//! Positions that do not count (masked, padding, label −100) are selected
//! away, so NaN or ±inf there never reaches a value or a gradient.
//!
//! # Example
//!
//! ```
//! use posttrain_burn::{device, preference::{paired_loss, PairTensors}, tensor1, to_vec};
//! use posttrain_core::preference::paired::{LossTerm, PairedConfig, PairedLoss};
//! use posttrain_core::Preset;
//! let dev = device()?;
//! let cfg = PairedConfig::preset(Preset::OpenRlhf, 0.1)?;
//! let batch = PairTensors::new(tensor1(&[-3.0, -2.0], &dev), tensor1(&[-4.0, -1.0], &dev))
//!     .with_reference(tensor1(&[-3.5, -2.0], &dev), tensor1(&[-3.5, -1.5], &dev));
//! let out = paired_loss(&cfg, &[LossTerm::new(PairedLoss::Sigmoid)], batch)?;
//! assert!(to_vec(out.loss)[0] > 0.0);
//! let dc = to_vec(out.grad_chosen);
//! assert!(dc[0] < 0.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`paired::paired_loss`]: posttrain_core::preference::paired::paired_loss
//! [`paired::dpo_from_logits`]: posttrain_core::preference::paired::dpo_from_logits
//! [`paired::pairwise_reward_loss`]: posttrain_core::preference::paired::pairwise_reward_loss
//! [`unpaired::kto_loss`]: posttrain_core::preference::unpaired::kto_loss
//! [`unpaired::bco_loss`]: posttrain_core::preference::unpaired::bco_loss
//! [`unpaired::prm_hard_loss`]: posttrain_core::preference::unpaired::prm_hard_loss
//! [`unpaired::prm_soft_loss`]: posttrain_core::preference::unpaired::prm_soft_loss
//! [`odds_ratio::cpo_loss`]: posttrain_core::preference::odds_ratio::cpo_loss
//! [`odds_ratio::odds_ratio_loss`]: posttrain_core::preference::odds_ratio::odds_ratio_loss
//! [`odds_ratio::shifted_sequence_logps`]: posttrain_core::preference::odds_ratio::shifted_sequence_logps
//! [`Elem`]: posttrain_core::Elem

use crate::util::Filled;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use posttrain_core::error::check_param;
use posttrain_core::logits::Temperature;
use posttrain_core::preference::odds_ratio::{
    alphapo_reward, cpo_pair_loss, orpo_log_odds, CpoConfig,
};
use posttrain_core::preference::paired::{
    pairwise_reward_term, LossTerm, PairArgs, PairedConfig, PairedLoss,
};
use posttrain_core::preference::unpaired::{
    bco_term, kto_desirable_term, kto_undesirable_term, KtoConfig, KtoLossType, PrmConfig,
    RunningMoments,
};
use posttrain_core::{Elem, ElemExt, Error};

use crate::elem::ElemTensor;
use crate::logits::{entropy_from_logits, selective_log_softmax};
use crate::util::{check_shape, count, keep, to_vec, to_vec_bool};

// ---------------------------------------------------------------------------
// Small tensor helpers
// ---------------------------------------------------------------------------

/// `num / den` where `den ≠ 0`, else 0 (the core's "0 for an empty mean").
fn safe_div<const D: usize>(num: Tensor<D>, den: Tensor<D>) -> Tensor<D> {
    let zero = den.clone().equal_elem(0.0);
    num.div(den.mask_fill(zero.clone(), 1.0))
        .mask_fill(zero, 0.0)
}

/// The mean of a `[n]` tensor as `[1]`, 0 when `n = 0`.
fn mean0(x: Tensor<1>) -> Tensor<1> {
    if x.dims()[0] == 0 {
        Tensor::zeros([1], &x.device())
    } else {
        x.mean()
    }
}

/// `x` where `x ≥ 0`, else 0 — the core's `x.max(0)` (NaN gives 0 there too).
fn relu_keep(x: Tensor<1>) -> Tensor<1> {
    let m = x.clone().greater_equal_elem(0.0);
    keep(x, &m)
}

fn e(x: Tensor<1>) -> ElemTensor<1> {
    ElemTensor(x)
}

fn check_beta(beta: f64) -> Result<(), Error> {
    check_param(
        beta > 0.0 && beta.is_finite(),
        "beta",
        beta,
        "must be finite and > 0",
    )
}

// ---------------------------------------------------------------------------
// Shifted token log-probabilities
// ---------------------------------------------------------------------------

/// Logits rows `0..T−1` with the targets and validity of positions `1..T`.
struct Shifted {
    /// `[B, T−1, V]`.
    z: Tensor<3>,
    /// Targets, 0 where the position does not count, `[B, T−1]`.
    targets: Tensor<2, Int>,
    /// Which positions count, `[B, T−1]`.
    valid: Tensor<2, Bool>,
    /// `log softmax(z)[target]` where valid, else 0, `[B, T−1]`.
    lp: Tensor<2>,
}

/// Checks shapes and builds the shifted view; `None` when no position can
/// count (`T < 2` or `B = 0`).
fn shift(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    valid: Tensor<2, Bool>,
) -> Result<Option<Shifted>, Error> {
    let [b, t, v] = logits.dims();
    check_shape("targets", targets.dims(), [b, t])?;
    check_shape("valid", valid.dims(), [b, t])?;
    if v == 0 && b * t > 0 {
        return Err(Error::Empty {
            input: "logits (vocabulary)",
        });
    }
    if t < 2 || b == 0 {
        return Ok(None);
    }
    let z = logits.narrow(1, 0, t - 1);
    let tg = targets.narrow(1, 1, t - 1);
    let vd = valid.narrow(1, 1, t - 1);
    let bad = tg
        .clone()
        .lower_elem(0)
        .bool_or(tg.clone().greater_equal_elem(v as i64))
        .bool_and(vd.clone())
        .any();
    if to_vec_bool(bad)[0] {
        return Err(Error::Invalid {
            input: "targets",
            rule: "every counted token id must lie in [0, vocab)",
        });
    }
    let tg = tg.mask_fill(vd.clone().bool_not(), 0);
    let (lp, _) = selective_log_softmax(z.clone(), tg.clone(), Temperature::ONE, None)?;
    let lp = keep(lp, &vd);
    Ok(Some(Shifted {
        z,
        targets: tg,
        valid: vd,
        lp,
    }))
}

impl Shifted {
    /// Counted positions per row, `[B]`.
    fn counts(&self) -> Tensor<1> {
        self.valid.clone().float().sum_dim(1).squeeze_dim::<1>(1)
    }

    /// `∂/∂logits` of `Σ_{b,t} coef[b,t] · lp[b,t]`, `[B, T, V]` (the last
    /// row and uncounted positions 0).
    fn vjp(&self, coef: Tensor<2>) -> Result<Tensor<3>, Error> {
        let [b, t1, v] = self.z.dims();
        let c = keep(coef, &self.valid);
        let (_, g) = selective_log_softmax(
            self.z.clone(),
            self.targets.clone(),
            Temperature::ONE,
            Some(c),
        )?;
        let g = g.expect("a cotangent was given");
        let m3 = self.valid.clone().unsqueeze_dim::<3>(2).expand([b, t1, v]);
        let g = keep(g, &m3);
        Ok(Tensor::cat(
            vec![g, Tensor::zeros([b, 1, v], &self.z.device())],
            1,
        ))
    }
}

/// Sequence log-probabilities from causal-LM logits, shifted by one.
///
/// # Formula
///
/// As [`posttrain_core::preference::odds_ratio::shifted_sequence_logps`]:
/// `s_b = Σ_{t ≥ 1, valid[b,t]} log softmax(logits[b, t−1])[targets[b, t]]`
/// (a masked row sum of [`selective_log_softmax`]), `out_b = s_b` or
/// `s_b / n_b` (`average`; 0 when `n_b = 0`). Uncounted positions are never
/// read (their targets may be −100, their logits NaN).
///
/// # Gradient
///
/// [`shifted_sequence_logps_vjp`].
///
/// # Peers
///
/// TRL `get_batch_logps` (CPO/ORPO) and the completion-mask sums of DPO/KTO.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] unless `targets`, `valid` are `[B, T]`;
/// [`Error::Invalid`] for a counted target outside `[0, V)` (one boolean is
/// read back); [`Error::Empty`] for `V = 0`.
pub fn shifted_sequence_logps(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    valid: Tensor<2, Bool>,
    average: bool,
) -> Result<Tensor<1>, Error> {
    let [b, _, _] = logits.dims();
    let dev = logits.device();
    Ok(match shift(logits, targets, valid)? {
        None => Tensor::zeros([b], &dev),
        Some(s) => {
            let sum = s.lp.clone().sum_dim(1).squeeze_dim::<1>(1);
            if average {
                safe_div(sum, s.counts())
            } else {
                sum
            }
        }
    })
}

/// The VJP of [`shifted_sequence_logps`]: `Σ_b cot[b] · ∂out_b/∂logits`.
///
/// # Gradient
///
/// `grad[b, t−1, k] = cot[b] · w_b · (1[k = targets[b,t]] − softmax(logits[b,t−1])ₖ)`
/// on counted positions (`w_b = 1`, or `1/n_b` with `average`), 0 elsewhere.
///
/// # Errors
///
/// As [`shifted_sequence_logps`], plus [`Error::ShapeMismatch`] unless
/// `cot` is `[B]`.
pub fn shifted_sequence_logps_vjp(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    valid: Tensor<2, Bool>,
    average: bool,
    cot: Tensor<1>,
) -> Result<Tensor<3>, Error> {
    let dims = logits.dims();
    check_shape("cotangent", cot.dims(), [dims[0]])?;
    let dev = logits.device();
    match shift(logits, targets, valid)? {
        None => Ok(Tensor::zeros(dims, &dev)),
        Some(s) => {
            let w = if average {
                safe_div(cot, s.counts())
            } else {
                cot
            };
            let [b, t1] = s.lp.dims();
            s.vjp(w.unsqueeze_dim::<2>(1).expand([b, t1]))
        }
    }
}

/// Mean token NLL of causal-LM logits, shifted by one, over every counted
/// position of the batch, and its gradient.
///
/// # Formula
///
/// As [`posttrain_core::preference::odds_ratio::shifted_mean_nll`]:
/// `nll = −(Σ_{b, t ≥ 1, valid} log softmax(logits[b,t−1])[targets[b,t]]) / N`
/// (0 when `N = 0`), `[1]`.
///
/// # Gradient
///
/// Returned for a cotangent of 1:
/// `g[b, t−1, k] = −(1/N) (1[k = target] − softmax(logits[b,t−1])ₖ)`.
///
/// # Peers
///
/// `CrossEntropyLoss(ignore_index=−100)` of TRL CPO (labels) and ORPO (input
/// ids under the attention mask).
///
/// # Errors
///
/// As [`shifted_sequence_logps`].
pub fn shifted_mean_nll(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    valid: Tensor<2, Bool>,
) -> Result<(Tensor<1>, Tensor<3>), Error> {
    let dims = logits.dims();
    let dev = logits.device();
    match shift(logits, targets, valid)? {
        None => Ok((Tensor::zeros([1], &dev), Tensor::zeros(dims, &dev))),
        Some(s) => {
            let inv_n = safe_div(Tensor::ones([1], &dev), count(&s.valid));
            let nll = s.lp.clone().sum().neg() * inv_n.clone();
            let [b, t1] = s.lp.dims();
            let coef = inv_n.neg().reshape([1, 1]).expand([b, t1]);
            Ok((nll, s.vjp(coef)?))
        }
    }
}

// ---------------------------------------------------------------------------
// Paired losses on sequence log-probabilities
// ---------------------------------------------------------------------------

/// The SFT term's inputs (see
/// [`posttrain_core::preference::paired::SftInput`]).
#[derive(Debug, Clone)]
pub struct SftTensors {
    /// `Σₜ log π(tokenₜ)` per chosen sequence (plain sums), `[B]`.
    pub chosen_logps: Tensor<1>,
    /// The number of tokens those sums run over, in total, `[1]`.
    pub tokens: Tensor<1>,
}

/// A batch of `B` preference pairs as `[B]` tensors (see
/// [`posttrain_core::preference::paired::PairBatch`]).
#[derive(Debug, Clone)]
pub struct PairTensors {
    /// `c`: the policy's log-probability of each chosen completion.
    pub policy_chosen: Tensor<1>,
    /// `r`: the policy's log-probability of each rejected completion.
    pub policy_rejected: Tensor<1>,
    /// `(c₀, r₀)`; `None` for reference-free losses (SimPO).
    pub reference: Option<(Tensor<1>, Tensor<1>)>,
    /// Completion lengths `(chosen, rejected)` normalising `Ipo` and
    /// `SigmoidNorm` (clamped ≥ 1).
    pub lengths: Option<(Tensor<1>, Tensor<1>)>,
    /// Per-pair weights multiplying every term (WPO); constants.
    pub pair_weight: Option<Tensor<1>>,
    /// The SFT term's inputs (required by [`PairedLoss::Sft`]).
    pub sft: Option<SftTensors>,
}

impl PairTensors {
    /// Policy log-probabilities only.
    pub fn new(policy_chosen: Tensor<1>, policy_rejected: Tensor<1>) -> Self {
        PairTensors {
            policy_chosen,
            policy_rejected,
            reference: None,
            lengths: None,
            pair_weight: None,
            sft: None,
        }
    }
    /// Adds the reference log-probabilities.
    pub fn with_reference(mut self, chosen: Tensor<1>, rejected: Tensor<1>) -> Self {
        self.reference = Some((chosen, rejected));
        self
    }
    /// Adds the completion lengths.
    pub fn with_lengths(mut self, chosen: Tensor<1>, rejected: Tensor<1>) -> Self {
        self.lengths = Some((chosen, rejected));
        self
    }
    /// Adds per-pair weights.
    pub fn with_pair_weight(mut self, w: Tensor<1>) -> Self {
        self.pair_weight = Some(w);
        self
    }
    /// Adds the SFT term's inputs.
    pub fn with_sft(mut self, sft: SftTensors) -> Self {
        self.sft = Some(sft);
        self
    }

    /// `(ℓc, ℓr)`: log-ratios (`c, r` without a reference).
    fn logratios(&self) -> (Tensor<1>, Tensor<1>) {
        let (c, r) = (self.policy_chosen.clone(), self.policy_rejected.clone());
        match &self.reference {
            Some((c0, r0)) => (c - c0.clone(), r - r0.clone()),
            None => (c, r),
        }
    }

    fn check(&self, terms: &[LossTerm]) -> Result<usize, Error> {
        let [n] = self.policy_chosen.dims();
        if n == 0 {
            return Err(Error::Empty {
                input: "policy_chosen_logps",
            });
        }
        check_shape("policy_rejected_logps", self.policy_rejected.dims(), [n])?;
        if let Some((c0, r0)) = &self.reference {
            check_shape("reference_chosen_logps", c0.dims(), [n])?;
            check_shape("reference_rejected_logps", r0.dims(), [n])?;
        }
        if let Some((lc, lr)) = &self.lengths {
            check_shape("chosen_len", lc.dims(), [n])?;
            check_shape("rejected_len", lr.dims(), [n])?;
        }
        if let Some(w) = &self.pair_weight {
            check_shape("pair_weight", w.dims(), [n])?;
        }
        if let Some(s) = &self.sft {
            check_shape("sft.chosen_logps", s.chosen_logps.dims(), [n])?;
            check_shape("sft.tokens", s.tokens.dims(), [1])?;
        }
        for t in terms {
            match t.kind {
                PairedLoss::SigmoidNorm if self.lengths.is_none() => {
                    return Err(Error::Invalid {
                        input: "chosen_len",
                        rule: "sigmoid_norm needs the completion lengths",
                    })
                }
                PairedLoss::Sft if self.sft.is_none() => {
                    return Err(Error::Invalid {
                        input: "sft",
                        rule: "the sft term needs the chosen token log-probabilities",
                    })
                }
                _ => {}
            }
        }
        Ok(n)
    }
}

/// What [`paired_loss`] returns.
#[derive(Debug, Clone)]
pub struct PairedTensorOutput {
    /// The batch mean `(1/B) Σᵢ lossᵢ`, `[1]`.
    pub loss: Tensor<1>,
    /// `lossᵢ = ωᵢ Σₖ wₖ termₖ(i)`, `[B]` (for `Aot*` terms: the term at the
    /// i-th *sorted* position, as the core).
    pub per_pair: Tensor<1>,
    /// `∂loss/∂cᵢ` of the mean loss, `[B]`.
    pub grad_chosen: Tensor<1>,
    /// `∂loss/∂rᵢ` of the mean loss, `[B]`.
    pub grad_rejected: Tensor<1>,
    /// `∂(Σⱼ lossⱼ)/∂cᵢ`. Without `Aot*` terms each pair's loss depends on
    /// its own pair only, so this is `∂lossᵢ/∂cᵢ` and any per-pair cotangent
    /// `u` gives the VJP `u ⊙ d_per_pair_chosen`; with them use
    /// [`paired_loss_vjp`].
    pub d_per_pair_chosen: Tensor<1>,
    /// `∂(Σⱼ lossⱼ)/∂rᵢ`.
    pub d_per_pair_rejected: Tensor<1>,
    /// `∂loss/∂` each entry of `sft.chosen_logps` (the same for all), `[1]`;
    /// 0 without an SFT term.
    pub d_sft_chosen_logps: Tensor<1>,
    /// Implicit rewards `β(c − c₀)` (detached metrics), `[B]`.
    pub chosen_rewards: Tensor<1>,
    /// Implicit rewards `β(r − r₀)`, `[B]`.
    pub rejected_rewards: Tensor<1>,
}

/// The position of each entry in the core's sort order (ascending, NaN last,
/// ties by index: a stable argsort), `[n]`. Written as pairwise comparisons
/// on an `[n, n]` tensor: `rankᵢ = #{j : xⱼ before xᵢ}`.
fn stable_rank(x: Tensor<1>) -> Tensor<1, Int> {
    let [n] = x.dims();
    let dev = x.device();
    let xj = x.clone().reshape([1, n]).expand([n, n]);
    let xi = x.reshape([n, 1]).expand([n, n]);
    let (nan_j, nan_i) = (xj.clone().is_nan(), xi.clone().is_nan());
    let less = xj
        .clone()
        .lower(xi.clone())
        .bool_or(nan_j.clone().bool_not().bool_and(nan_i.clone()));
    let same = xj.equal(xi).bool_or(nan_j.bool_and(nan_i));
    let iota = Tensor::<1, Int>::arange(0..n as i64, &dev);
    let j_first = iota
        .clone()
        .reshape([1, n])
        .expand([n, n])
        .lower(iota.reshape([n, 1]).expand([n, n]));
    less.bool_or(same.bool_and(j_first))
        .int()
        .sum_dim(1)
        .reshape([n])
}

/// The per-pair losses and the VJP of `Σᵢ upstreamᵢ · lossᵢ`: `(per_pair,
/// ∂/∂c, ∂/∂r, ∂/∂ each sft.chosen_logps)`, following
/// [`posttrain_core::preference::paired::paired_loss`] term by term.
fn paired_core(
    cfg: &PairedConfig,
    terms: &[LossTerm],
    batch: &PairTensors,
    upstream: Tensor<1>,
) -> (Tensor<1>, Tensor<1>, Tensor<1>, Tensor<1>) {
    let c = batch.policy_chosen.clone();
    let dev = c.device();
    let (lc, lr) = batch.logratios();
    let omega = batch.pair_weight.clone().unwrap_or_else(|| c.ones_like());
    let mut per_pair = c.zeros_like();
    let mut dc = c.zeros_like();
    let mut dr = c.zeros_like();
    let mut d_sft = Tensor::<1>::zeros([1], &dev);
    // `(d, ds)` → `d · ds`, 0 where `d = 0` (an overflowed `∂score/∂x`
    // times a zero `∂/∂score` counts as 0, as in the core).
    let chain = |d: Tensor<1>, ds: Tensor<1>| {
        let z = d.clone().equal_elem(0.0);
        (d * ds).mask_fill(z, 0.0)
    };
    for t in terms {
        // A term of weight 0 contributes exactly 0 (as the core).
        if t.weight == 0.0 {
            continue;
        }
        let w = t.weight;
        let u = upstream.clone() * omega.clone().mul_scalar(w);
        match t.kind {
            PairedLoss::Sft => {
                let s = batch.sft.as_ref().expect("checked by PairTensors::check");
                let inv = safe_div(Tensor::ones([1], &dev), s.tokens.clone());
                let value = s.chosen_logps.clone().sum().neg() * inv.clone();
                per_pair = per_pair + omega.clone().mul_scalar(w) * value.expand(c.dims());
                d_sft = d_sft - u.sum() * inv;
            }
            PairedLoss::Aot | PairedLoss::AotUnpaired => {
                let paired = t.kind == PairedLoss::Aot;
                let (kx, ky) = if paired {
                    let zero = c.zeros_like();
                    let (c0, r0) = batch
                        .reference
                        .clone()
                        .unwrap_or_else(|| (zero.clone(), zero));
                    (c.clone() - batch.policy_rejected.clone(), c0 - r0)
                } else {
                    (lc.clone(), lr.clone())
                };
                let (rx, ry) = (stable_rank(kx.clone()), stable_rank(ky.clone()));
                let (ox, oy) = (rx.clone().argsort(0), ry.clone().argsort(0));
                let xs = kx.gather(0, ox);
                let ys = ky.gather(0, oy);
                let args = PairArgs {
                    chosen_score: e(xs.zeros_like()),
                    rejected_score: e(xs.zeros_like()),
                    chosen_logratio: e(xs.clone()),
                    rejected_logratio: e(ys),
                    inv_len_chosen: e(xs.ones_like()),
                    inv_len_rejected: e(xs.ones_like()),
                };
                let v = cfg.pair_term(t.kind, &args);
                per_pair = per_pair + v.loss.0 * omega.clone().mul_scalar(w);
                let dx = (u.clone() * v.d_chosen_logratio.0).gather(0, rx);
                if paired {
                    dc = dc + dx.clone();
                    dr = dr - dx;
                } else {
                    dc = dc + dx;
                    dr = dr + (u * v.d_rejected_logratio.0).gather(0, ry);
                }
            }
            kind => {
                let (sc, dsc) = cfg.score(e(lc.clone()));
                let (sr, dsr) = cfg.score(e(lr.clone()));
                let (ic, ir) = match &batch.lengths {
                    Some((a, b)) => (
                        a.clone().clamp_min(1.0).recip(),
                        b.clone().clamp_min(1.0).recip(),
                    ),
                    None => (c.ones_like(), c.ones_like()),
                };
                let args = PairArgs {
                    chosen_score: sc,
                    rejected_score: sr,
                    chosen_logratio: e(lc.clone()),
                    rejected_logratio: e(lr.clone()),
                    inv_len_chosen: e(ic),
                    inv_len_rejected: e(ir),
                };
                let v = cfg.pair_term(kind, &args);
                per_pair = per_pair + v.loss.0 * omega.clone().mul_scalar(w);
                dc = dc + u.clone() * (v.d_chosen_logratio.0 + chain(v.d_chosen_score.0, dsc.0));
                dr = dr + u * (v.d_rejected_logratio.0 + chain(v.d_rejected_score.0, dsr.0));
            }
        }
    }
    (per_pair, dc, dr, d_sft)
}

/// A paired preference loss over a batch, on tensors.
///
/// # Formula
///
/// As [`posttrain_core::preference::paired::paired_loss`]:
/// `ℓc = c − c₀`, `ℓr = r − r₀`, `sc = f(ℓc)`, `sr = f(ℓr)` (the core's
/// [`PairedConfig::score`] kernel: `cfg.divergence_scores` picks TRL
/// f2cd577's or TRL 1.16.0's scores, and with the latter
/// [`PairedConfig::pair_term`] reads raw log-ratios for the pointwise losses),
/// `lossᵢ = ωᵢ Σₖ wₖ · termₖ(pair i)` ([`PairedConfig::pair_term`] on the
/// whole `[B]` tensors), `loss = (1/B) Σᵢ lossᵢ`. `Aot` pairs the j-th
/// smallest `c − r` with the j-th smallest `c₀ − r₀`, `AotUnpaired` the j-th
/// smallest `ℓc` with the j-th smallest `ℓr` (the core's stable, NaN-last
/// order, computed on the device by pairwise comparison: `[B, B]` memory);
/// `Sft` adds `−Σⱼ sft.chosen_logpsⱼ / sft.tokens` to every pair.
///
/// # Gradient
///
/// `∂lossᵢ/∂cᵢ = ωᵢ Σₖ wₖ (∂termₖ/∂ℓc + ∂termₖ/∂sc · f′(ℓc))`, likewise for
/// `r`; the sorted terms send each gradient back to the pair it was sorted
/// from; the mean's gradient divides by `B`.
///
/// # Peers
///
/// TRL `DPOTrainer` losses after the sequence sums, OpenRLHF `DPOLoss`,
/// torchtune `DPOLoss`/`IPOLoss`/`RSOLoss`/`SimPOLoss` (see the core).
///
/// # Errors
///
/// [`Error::Empty`] for no pair or no term; [`Error::ShapeMismatch`] for
/// shapes; [`Error::Invalid`] for `SigmoidNorm` without lengths or `Sft`
/// without [`SftTensors`]; [`PairedConfig::check_terms`]'s errors.
pub fn paired_loss(
    cfg: &PairedConfig,
    terms: &[LossTerm],
    batch: PairTensors,
) -> Result<PairedTensorOutput, Error> {
    cfg.validate()?;
    cfg.check_terms(terms)?;
    let n = batch.check(terms)?;
    let ones = batch.policy_chosen.ones_like();
    let (per_pair, dc, dr, d_sft) = paired_core(cfg, terms, &batch, ones);
    let (lc, lr) = batch.logratios();
    let inv_b = 1.0 / n as f64;
    Ok(PairedTensorOutput {
        loss: per_pair.clone().mean(),
        per_pair,
        grad_chosen: dc.clone().mul_scalar(inv_b),
        grad_rejected: dr.clone().mul_scalar(inv_b),
        d_per_pair_chosen: dc,
        d_per_pair_rejected: dr,
        d_sft_chosen_logps: d_sft.mul_scalar(inv_b),
        chosen_rewards: lc.mul_scalar(cfg.beta),
        rejected_rewards: lr.mul_scalar(cfg.beta),
    })
}

/// The VJP of [`paired_loss`]'s per-pair losses for a per-pair cotangent
/// `u`: `(∂/∂c, ∂/∂r)` of `Σᵢ uᵢ · lossᵢ`, `[B]` each.
///
/// # Formula
///
/// As [`paired_loss`] (the core's `PairGrads::of_per_pair`).
///
/// # Gradient
///
/// See [`paired_loss`]; `Aot*` terms route `uⱼ` of the j-th sorted term back
/// to the pairs it came from.
///
/// # Peers
///
/// torchtune's losses return per-pair losses (the runner's cotangent).
///
/// # Errors
///
/// As [`paired_loss`], plus [`Error::ShapeMismatch`] unless `u` is `[B]`.
pub fn paired_loss_vjp(
    cfg: &PairedConfig,
    terms: &[LossTerm],
    batch: &PairTensors,
    u: Tensor<1>,
) -> Result<(Tensor<1>, Tensor<1>), Error> {
    cfg.validate()?;
    cfg.check_terms(terms)?;
    let n = batch.check(terms)?;
    check_shape("cotangent per pair", u.dims(), [n])?;
    let (_, dc, dr, _) = paired_core(cfg, terms, batch, u);
    Ok((dc, dr))
}

/// The batch metrics the peers log, `[1]` each (see
/// [`posttrain_core::preference::paired::PairedMetrics`]).
#[derive(Debug, Clone)]
pub struct PairedMetricTensors {
    /// Mean `β·ℓc`.
    pub reward_chosen: Tensor<1>,
    /// Mean `β·ℓr`.
    pub reward_rejected: Tensor<1>,
    /// Fraction of pairs with `β·ℓc > β·ℓr`.
    pub accuracy: Tensor<1>,
    /// Mean `β·ℓc − β·ℓr`.
    pub margin: Tensor<1>,
    /// Mean `c`.
    pub logps_chosen: Tensor<1>,
    /// Mean `r`.
    pub logps_rejected: Tensor<1>,
}

/// The metrics of a paired batch: means of the implicit rewards `β·ℓ`
/// (reverse KL whatever the divergence), their accuracy and margin, and the
/// mean policy log-probabilities.
///
/// # Formula
///
/// As the metrics part of [`posttrain_core::preference::paired::paired_loss`].
///
/// # Gradient
///
/// None (detached metrics).
///
/// # Peers
///
/// TRL `rewards/*`, `logps/*`.
///
/// # Errors
///
/// As [`paired_loss`]'s shape checks.
pub fn paired_metrics(
    cfg: &PairedConfig,
    batch: &PairTensors,
) -> Result<PairedMetricTensors, Error> {
    batch.check(&[])?;
    let (lc, lr) = batch.logratios();
    let (rc, rr) = (lc.mul_scalar(cfg.beta), lr.mul_scalar(cfg.beta));
    Ok(PairedMetricTensors {
        accuracy: rc.clone().greater(rr.clone()).float().mean(),
        margin: (rc.clone() - rr.clone()).mean(),
        reward_chosen: rc.mean(),
        reward_rejected: rr.mean(),
        logps_chosen: batch.policy_chosen.clone().mean(),
        logps_rejected: batch.policy_rejected.clone().mean(),
    })
}

// ---------------------------------------------------------------------------
// TRL's DPO step from logits
// ---------------------------------------------------------------------------

/// The reference side of [`dpo_from_logits`].
#[derive(Debug, Clone)]
pub enum ReferenceTensors {
    /// Precomputed sequence log-probabilities `(c₀, r₀)`, `[B]` each.
    Precomputed(Tensor<1>, Tensor<1>),
    /// The reference model's logits, `[2B, T, V]` like the policy's.
    Logits(Tensor<3>),
}

/// TRL's batch for [`dpo_from_logits`]: rows `[0, B)` chosen, `[B, 2B)`
/// rejected (see [`posttrain_core::preference::paired::LogitsPairBatch`]).
#[derive(Debug, Clone)]
pub struct LogitsPairTensors {
    /// Policy logits, `[2B, T, V]`.
    pub logits: Tensor<3>,
    /// Token ids, `[2B, T]`.
    pub input_ids: Tensor<2, Int>,
    /// Which positions belong to the completion, `[2B, T]` (unshifted).
    pub completion_mask: Tensor<2, Bool>,
    /// The reference.
    pub reference: ReferenceTensors,
    /// LD-DPO weight of tokens beyond the pair's shorter completion.
    pub ld_alpha: Option<f64>,
    /// WPO pair weights (TRL `use_weighting`).
    pub use_weighting: bool,
}

/// What [`dpo_from_logits`] returns.
#[derive(Debug, Clone)]
pub struct DpoLogitsOutput {
    /// The loss, `[1]`.
    pub loss: Tensor<1>,
    /// `∂loss/∂logits`, `[2B, T, V]`.
    pub grad_logits: Tensor<3>,
    /// The pair metrics (TRL `rewards/*`, `logps/*`).
    pub metrics: PairedMetricTensors,
    /// Mean policy entropy over completion tokens, `[1]`.
    pub entropy: Tensor<1>,
    /// Mean vocabulary-mean logit over chosen completion tokens, `[1]`.
    pub logits_chosen: Tensor<1>,
    /// Same over rejected completion tokens, `[1]`.
    pub logits_rejected: Tensor<1>,
    /// Fraction of chosen completion tokens whose argmax is the label, `[1]`.
    pub token_accuracy: Tensor<1>,
}

/// Per-token LD-DPO weights `[2B, T−1]`: 1 on the first `min(len_c, len_r)`
/// completion tokens of the pair, `ld_alpha` after (the core's
/// `token_weight`, positions by a cumulative sum of the valid mask).
fn ld_weights(valid: &Tensor<2, Bool>, alpha: Option<f64>) -> Tensor<2> {
    let v = valid.clone().float();
    let Some(a) = alpha else {
        return v.ones_like();
    };
    let [rows, t1] = v.dims();
    let n = rows / 2;
    let pos = v.clone().cumsum(1);
    let len = v.sum_dim(1);
    let partner = Tensor::cat(
        vec![len.clone().narrow(0, n, n), len.clone().narrow(0, 0, n)],
        0,
    );
    let shared = len.min_pair(partner).expand([rows, t1]);
    pos.ones_like().mask_fill(pos.greater(shared), a)
}

/// TRL's DPO step from logits, on tensors: loss, metrics, and the gradient
/// with respect to the policy logits.
///
/// # Formula
///
/// As [`posttrain_core::preference::paired::dpo_from_logits`]:
/// `log pₜ = log softmax(z_{r,t})[id_{r,t+1}]` where `completion_mask[r, t+1]`
/// ([`selective_log_softmax`]), `seqᵣ = Σₜ wₜ log pₜ` (LD-DPO weights `wₜ`),
/// WPO `ωᵢ = exp(meanₜ(log pₜ − (lse(2z) − 2 lse(z))))` chosen × rejected
/// (`log pₜ − lse(2z) + 2 lse(z)` is evaluated as
/// `log softmax(2z)[id] − log softmax(z)[id]`, the same quantity), then
/// [`paired_loss`] with lengths = unshifted completion-mask row sums and the
/// SFT term over the chosen rows. Metrics: the mean entropy
/// ([`entropy_from_logits`]), vocabulary-mean logits and argmax accuracy over
/// the counted positions.
///
/// # Gradient
///
/// `∂/∂z_{r,t,k} = g_{r,t} (1[k = id] − softmax(z)ₖ)` with `g` the VJP of the
/// loss through the (weighted) sums and the SFT term, at counted positions
/// only. WPO weights, entropy and metrics carry no gradient.
///
/// # Peers
///
/// TRL `DPOTrainer._compute_loss` (`precompute_ref_log_probs` ↔
/// [`ReferenceTensors::Precomputed`]).
///
/// # Errors
///
/// [`Error::Empty`] for no row or `V = 0`; [`Error::Invalid`] for an odd
/// batch, a non-finite `ld_alpha` or a counted id outside `[0, V)`;
/// [`Error::ShapeMismatch`] for shapes; [`paired_loss`]'s errors.
pub fn dpo_from_logits(
    cfg: &PairedConfig,
    terms: &[LossTerm],
    batch: LogitsPairTensors,
) -> Result<DpoLogitsOutput, Error> {
    let [rows, t, v] = batch.logits.dims();
    if rows == 0 {
        return Err(Error::Empty { input: "logits" });
    }
    if rows % 2 != 0 {
        return Err(Error::Invalid {
            input: "logits",
            rule: "the batch must hold 2B rows: B chosen then B rejected",
        });
    }
    if v == 0 {
        return Err(Error::Empty {
            input: "logits (vocabulary)",
        });
    }
    let n = rows / 2;
    check_shape("input_ids", batch.input_ids.dims(), [rows, t])?;
    check_shape("completion_mask", batch.completion_mask.dims(), [rows, t])?;
    match &batch.reference {
        ReferenceTensors::Precomputed(c0, r0) => {
            check_shape("ref_chosen_logps", c0.dims(), [n])?;
            check_shape("ref_rejected_logps", r0.dims(), [n])?;
        }
        ReferenceTensors::Logits(z) => check_shape("ref_logits", z.dims(), [rows, t, v])?,
    }
    if let Some(a) = batch.ld_alpha {
        check_param(a.is_finite(), "ld_alpha", a, "must be finite")?;
    }
    cfg.validate()?;
    cfg.check_terms(terms)?;
    let dev = batch.logits.device();
    let lens = batch
        .completion_mask
        .clone()
        .float()
        .sum_dim(1)
        .squeeze_dim::<1>(1);
    let shifted = shift(
        batch.logits.clone(),
        batch.input_ids.clone(),
        batch.completion_mask.clone(),
    )?;
    let zeros_rows = || Tensor::<1>::zeros([rows], &dev);
    // Policy sums (LD-weighted), plain chosen sums, token weights.
    let (pol, plain, tokens, weights) = match &shifted {
        None => (
            zeros_rows(),
            Tensor::zeros([n], &dev),
            Tensor::zeros([1], &dev),
            None,
        ),
        Some(s) => {
            let w = ld_weights(&s.valid, batch.ld_alpha);
            let pol = (s.lp.clone() * w.clone()).sum_dim(1).squeeze_dim::<1>(1);
            let plain = s.lp.clone().narrow(0, 0, n).sum_dim(1).squeeze_dim::<1>(1);
            let tokens = count(&s.valid.clone().narrow(0, 0, n));
            (pol, plain, tokens, Some(w))
        }
    };
    let refs = match batch.reference {
        ReferenceTensors::Precomputed(c0, r0) => Tensor::cat(vec![c0, r0], 0),
        ReferenceTensors::Logits(z) => {
            match shift(z, batch.input_ids.clone(), batch.completion_mask.clone())? {
                None => zeros_rows(),
                Some(rs) => {
                    let w = weights.clone().unwrap_or_else(|| rs.lp.ones_like());
                    (rs.lp * w).sum_dim(1).squeeze_dim::<1>(1)
                }
            }
        }
    };
    let half = |x: &Tensor<1>, k: usize| x.clone().narrow(0, k * n, n);
    let mut pb = PairTensors::new(half(&pol, 0), half(&pol, 1))
        .with_reference(half(&refs, 0), half(&refs, 1))
        .with_lengths(half(&lens, 0), half(&lens, 1))
        .with_sft(SftTensors {
            chosen_logps: plain,
            tokens,
        });
    if batch.use_weighting {
        let w = match &shifted {
            None => Tensor::ones([n], &dev),
            Some(s) => {
                let (lp2, _) = selective_log_softmax(
                    s.z.clone().mul_scalar(2.0),
                    s.targets.clone(),
                    Temperature::ONE,
                    None,
                )?;
                let term = keep(lp2 - s.lp.clone(), &s.valid);
                let mean = term.sum_dim(1).squeeze_dim::<1>(1) / s.counts().clamp_min(1.0);
                let ex = mean.exp();
                half(&ex, 0) * half(&ex, 1)
            }
        };
        pb = pb.with_pair_weight(w);
    }
    let metrics = paired_metrics(cfg, &pb)?;
    let out = paired_loss(cfg, terms, pb)?;
    let d_row = Tensor::cat(vec![out.grad_chosen, out.grad_rejected], 0);
    let mut o = DpoLogitsOutput {
        loss: out.loss,
        grad_logits: Tensor::zeros([rows, t, v], &dev),
        metrics,
        entropy: Tensor::zeros([1], &dev),
        logits_chosen: Tensor::zeros([1], &dev),
        logits_rejected: Tensor::zeros([1], &dev),
        token_accuracy: Tensor::zeros([1], &dev),
    };
    let (Some(s), Some(w)) = (shifted, weights) else {
        return Ok(o);
    };
    let [_, t1] = s.lp.dims();
    let sft_col = Tensor::cat(
        vec![
            out.d_sft_chosen_logps.reshape([1, 1]).expand([n, 1]),
            Tensor::zeros([n, 1], &dev),
        ],
        0,
    );
    let coef = d_row.unsqueeze_dim::<2>(1).expand([rows, t1]) * w + sft_col.expand([rows, t1]);
    o.grad_logits = s.vjp(coef)?;

    // Logged token metrics (no gradient).
    let (h, _) = entropy_from_logits(s.z.clone(), None)?;
    o.entropy = safe_div(keep(h, &s.valid).sum(), count(&s.valid));
    let zmean =
        s.z.clone()
            .sum_dim(2)
            .squeeze_dim::<2>(2)
            .div_scalar(v as f64);
    let zmean = keep(zmean, &s.valid);
    let vc = s.valid.clone().narrow(0, 0, n);
    let vr = s.valid.clone().narrow(0, n, n);
    o.logits_chosen = safe_div(zmean.clone().narrow(0, 0, n).sum(), count(&vc));
    o.logits_rejected = safe_div(zmean.narrow(0, n, n).sum(), count(&vr));
    let arg = s.z.clone().narrow(0, 0, n).argmax(2).squeeze_dim::<2>(2);
    let hit = arg
        .equal(s.targets.clone().narrow(0, 0, n))
        .bool_and(vc.clone());
    o.token_accuracy = safe_div(count(&hit), count(&vc));
    Ok(o)
}

// ---------------------------------------------------------------------------
// Reward-model pairwise loss
// ---------------------------------------------------------------------------

/// What [`pairwise_reward_loss`] returns (`[1]` scalars, `[B]` gradients).
#[derive(Debug, Clone)]
pub struct RewardTensorOutput {
    /// `mean(softplus(−(rc − rr − m))) + κ·mean((rc + rr)²)`.
    pub loss: Tensor<1>,
    /// `∂loss/∂rc`.
    pub grad_chosen: Tensor<1>,
    /// `∂loss/∂rr`.
    pub grad_rejected: Tensor<1>,
    /// Smallest reward over both sides.
    pub min_reward: Tensor<1>,
    /// Mean reward over both sides.
    pub mean_reward: Tensor<1>,
    /// Largest reward over both sides.
    pub max_reward: Tensor<1>,
    /// Fraction of pairs with `rc > rr`.
    pub accuracy: Tensor<1>,
    /// `mean(rc − rr)` (margins not subtracted).
    pub margin: Tensor<1>,
}

/// The Bradley–Terry pairwise loss of a reward model, on tensors.
///
/// # Formula
///
/// As [`posttrain_core::preference::paired::pairwise_reward_loss`]: the
/// core kernel [`pairwise_reward_term`] on the `[B]` tensors, then
/// `loss = mean(logistic) + κ·mean(square)` and the metrics as reductions.
///
/// # Gradient
///
/// `∂/∂rcᵢ = (2κ(rcᵢ + rrᵢ) − σ(−xᵢ))/B`, `∂/∂rrᵢ = (2κ(rcᵢ + rrᵢ) + σ(−xᵢ))/B`.
///
/// # Peers
///
/// TRL `RewardTrainer.compute_loss`, OpenRLHF `PairWiseLoss`/`LogExpLoss`.
///
/// # Errors
///
/// [`Error::Empty`] for no pair, [`Error::ShapeMismatch`] for shapes,
/// [`Error::OutOfRange`] for a non-finite κ.
pub fn pairwise_reward_loss(
    chosen: Tensor<1>,
    rejected: Tensor<1>,
    margin: Option<Tensor<1>>,
    centering: Option<f64>,
) -> Result<RewardTensorOutput, Error> {
    let [n] = chosen.dims();
    if n == 0 {
        return Err(Error::Empty {
            input: "chosen_reward",
        });
    }
    check_shape("reject_reward", rejected.dims(), [n])?;
    if let Some(m) = &margin {
        check_shape("margin", m.dims(), [n])?;
    }
    if let Some(k) = centering {
        check_param(
            k.is_finite(),
            "center_rewards_coefficient",
            k,
            "must be finite",
        )?;
    }
    let kappa = centering.unwrap_or(0.0);
    let t = pairwise_reward_term(e(chosen.clone()), e(rejected.clone()), margin.map(e), kappa);
    let mut loss = t.logistic.0.mean();
    if centering.is_some() {
        loss = loss + t.square.0.mean().mul_scalar(kappa);
    }
    let inv_b = 1.0 / n as f64;
    let both = Tensor::cat(vec![chosen.clone(), rejected.clone()], 0);
    Ok(RewardTensorOutput {
        loss,
        grad_chosen: t.d_chosen.0.mul_scalar(inv_b),
        grad_rejected: t.d_rejected.0.mul_scalar(inv_b),
        min_reward: both.clone().min(),
        max_reward: both.clone().max(),
        mean_reward: both.mean(),
        accuracy: chosen.clone().greater(rejected.clone()).float().mean(),
        margin: (chosen - rejected).mean(),
    })
}

// ---------------------------------------------------------------------------
// KTO, vanilla KTO, BCO
// ---------------------------------------------------------------------------

/// KTO's reference point: `max(mean(policy_KL − ref_KL), 0)`, `[1]`
/// (detached; 0 for an empty batch).
///
/// # Formula
///
/// As [`posttrain_core::preference::unpaired::kto_kl_baseline`] (a NaN mean
/// gives 0, as the core's `max`).
///
/// # Gradient
///
/// None: the peers detach it.
///
/// # Peers
///
/// TRL `KTOTrainer` (`kl`), OpenRLHF `KTOLoss` (`KL`).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] when the shapes differ.
pub fn kto_kl_baseline(
    policy_kl_logps: Tensor<1>,
    ref_kl_logps: Tensor<1>,
) -> Result<Tensor<1>, Error> {
    let [n] = policy_kl_logps.dims();
    check_shape("reference_KL_logps", ref_kl_logps.dims(), [n])?;
    Ok(relu_keep(mean0(policy_kl_logps - ref_kl_logps)))
}

/// What [`kto_loss`] returns.
#[derive(Debug, Clone)]
pub struct KtoTensorOutput {
    /// `nanmean` of the weighted terms, `[1]`.
    pub loss: Tensor<1>,
    /// `∂loss/∂zᵢ`, `[B]`.
    pub grad_logratios: Tensor<1>,
}

/// The KTO-family batch loss over a mixed batch, on tensors.
///
/// # Formula
///
/// As [`posttrain_core::preference::unpaired::kto_loss`]: `ℓᵢ = w_d ·
/// desirable_term(zᵢ, KL)` or `w_u · undesirable_term(zᵢ, KL)` (the core
/// kernels [`kto_desirable_term`], [`kto_undesirable_term`] on the whole
/// tensor, selected by `desirable`), `loss = nanmean ℓ` (0 when every term is
/// NaN or the batch is empty). `kl` is `[1]` and detached.
///
/// # Gradient
///
/// `wᵢ · ∂termᵢ/∂zᵢ / m` over the `m` non-NaN terms, 0 for NaN terms.
///
/// # Peers
///
/// TRL `KTOTrainer._compute_loss`, OpenRLHF `KTOLoss`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] unless `desirable` is `[B]` and `kl` is `[1]`.
pub fn kto_loss(
    cfg: &KtoConfig,
    logratios: Tensor<1>,
    desirable: Tensor<1, Bool>,
    kl: Tensor<1>,
) -> Result<KtoTensorOutput, Error> {
    let [n] = logratios.dims();
    check_shape("label", desirable.dims(), [n])?;
    check_shape("kl", kl.dims(), [1])?;
    let dev = logratios.device();
    if n == 0 {
        return Ok(KtoTensorOutput {
            loss: Tensor::zeros([1], &dev),
            grad_logratios: logratios,
        });
    }
    let klb = kl.expand([n]);
    let td = kto_desirable_term(
        cfg.loss_type,
        cfg.beta,
        e(logratios.clone()),
        e(klb.clone()),
    );
    let tu = kto_undesirable_term(cfg.loss_type, cfg.beta, e(logratios), e(klb));
    let l = tu.loss.0.mul_scalar(cfg.undesirable_weight).mask_where(
        desirable.clone(),
        td.loss.0.mul_scalar(cfg.desirable_weight),
    );
    let d = tu
        .dlogratio
        .0
        .mul_scalar(cfg.undesirable_weight)
        .mask_where(desirable, td.dlogratio.0.mul_scalar(cfg.desirable_weight));
    let ok = l.clone().is_nan().bool_not();
    let inv_m = safe_div(Tensor::ones([1], &dev), count(&ok));
    Ok(KtoTensorOutput {
        loss: keep(l, &ok).sum() * inv_m.clone(),
        grad_logratios: keep(d, &ok) * inv_m.expand([n]),
    })
}

/// What [`vanilla_kto_loss`] returns.
#[derive(Debug, Clone)]
pub struct VanillaKtoOutput {
    /// The loss, `[1]`.
    pub loss: Tensor<1>,
    /// `∂loss/∂cᵢ`, `[n_c]`.
    pub grad_chosen: Tensor<1>,
    /// `∂loss/∂rⱼ`, `[n_r]`.
    pub grad_rejected: Tensor<1>,
}

/// `(max(mean x, 0), 1[mean x ≥ 0])`, `[1]` each, `(0, 0)` when empty (the
/// core's `clamped_mean`).
fn clamped_mean(x: &Tensor<1>) -> (Tensor<1>, Tensor<1>) {
    let m = mean0(x.clone());
    let on = m.clone().greater_equal_elem(0.0);
    if x.dims()[0] == 0 {
        return (m.zeros_like(), m.zeros_like());
    }
    (keep(m, &on), on.float())
}

/// KTO for even sampling with each side's reference point from the other
/// side (not detached), on tensors.
///
/// # Formula
///
/// As [`posttrain_core::preference::unpaired::vanilla_kto_loss`]:
/// `KL_d = max(mean c, 0)`, `KL_u = max(mean r, 0)`, `loss = mean over
/// [1 − σ(β(cᵢ − KL_u))]ᵢ ++ [1 − σ(β(KL_d − rⱼ))]ⱼ` (the core kernels).
///
/// # Gradient
///
/// Through the terms and both reference points
/// (`∂KL_d/∂cᵢ = 1/n_c` where `mean c ≥ 0`).
///
/// # Peers
///
/// OpenRLHF `VanillaKTOLoss`.
///
/// # Errors
///
/// [`Error::OutOfRange`] unless `β > 0`.
pub fn vanilla_kto_loss(
    beta: f64,
    chosen_logratios: Tensor<1>,
    rejected_logratios: Tensor<1>,
) -> Result<VanillaKtoOutput, Error> {
    check_beta(beta)?;
    let ([nc], [nr]) = (chosen_logratios.dims(), rejected_logratios.dims());
    let dev = chosen_logratios.device();
    let (kl_d, dkl_d) = clamped_mean(&chosen_logratios);
    let (kl_u, dkl_u) = clamped_mean(&rejected_logratios);
    let total = nc + nr;
    if total == 0 {
        return Ok(VanillaKtoOutput {
            loss: Tensor::zeros([1], &dev),
            grad_chosen: chosen_logratios,
            grad_rejected: rejected_logratios,
        });
    }
    let inv = 1.0 / total as f64;
    let mut s = Tensor::<1>::zeros([1], &dev);
    let (mut g_kl_u, mut g_kl_d) = (s.clone(), s.clone());
    let mut dc = chosen_logratios.clone();
    let mut dr = rejected_logratios.clone();
    if nc > 0 {
        let t = kto_desirable_term(
            KtoLossType::Kto,
            beta,
            e(chosen_logratios.clone()),
            e(kl_u.expand([nc])),
        );
        s = s + t.loss.0.sum();
        g_kl_u = t.dkl.0.sum().mul_scalar(inv);
        dc = t.dlogratio.0.mul_scalar(inv);
    }
    if nr > 0 {
        let t = kto_undesirable_term(
            KtoLossType::Kto,
            beta,
            e(rejected_logratios.clone()),
            e(kl_d.expand([nr])),
        );
        s = s + t.loss.0.sum();
        g_kl_d = t.dkl.0.sum().mul_scalar(inv);
        dr = t.dlogratio.0.mul_scalar(inv);
    }
    if nc > 0 {
        dc = dc + (g_kl_d * dkl_d).div_scalar(nc as f64).expand([nc]);
    }
    if nr > 0 {
        dr = dr + (g_kl_u * dkl_u).div_scalar(nr as f64).expand([nr]);
    }
    Ok(VanillaKtoOutput {
        loss: s.mul_scalar(inv),
        grad_chosen: dc,
        grad_rejected: dr,
    })
}

/// Cotangents of [`bco_loss`]'s outputs: losses (`[n_c + n_r]`, chosen
/// first), chosen rewards (`[n_c]`), rejected rewards (`[n_r]`).
#[derive(Debug, Clone)]
pub struct BcoCotangentTensors {
    /// Cotangent of the losses.
    pub losses: Tensor<1>,
    /// Cotangent of the chosen rewards.
    pub chosen_rewards: Tensor<1>,
    /// Cotangent of the rejected rewards.
    pub rejected_rewards: Tensor<1>,
}

/// What [`bco_loss`] returns.
#[derive(Debug, Clone)]
pub struct BcoTensorOutput {
    /// `[−log σ(βcᵢ − δ)]ᵢ ++ [−log σ(−(βrⱼ − δ))]ⱼ`.
    pub losses: Tensor<1>,
    /// `β·c`.
    pub chosen_rewards: Tensor<1>,
    /// `β·r`.
    pub rejected_rewards: Tensor<1>,
    /// The reward shift δ used (the running mean, host state).
    pub delta: f64,
    /// The VJP `∂/∂c` (with cotangents), `[n_c]`.
    pub grad_chosen: Option<Tensor<1>>,
    /// The VJP `∂/∂r`, `[n_r]`.
    pub grad_rejected: Option<Tensor<1>>,
}

/// BCO's per-example losses with the running reward shift, on tensors.
///
/// # Formula
///
/// As [`posttrain_core::preference::unpaired::bco_loss`]: rewards `β·c`,
/// `β·r`; when `do_train`, the batch mean and biased variance of the
/// concatenated rewards are tensor reductions, **read back to the host** (two
/// scalars) and folded into `running` by
/// [`RunningMoments::update_moments`] — the running moments are host scalar
/// state, like the core's; `δ = running.mean`; the losses are the core
/// kernel [`bco_term`] on the tensors.
///
/// # Gradient
///
/// With cotangents `(c_L, c_cr, c_rr)` (δ detached):
/// `∂/∂cᵢ = β(c_L,i · ∂termᵢ/∂reward + c_cr,i)`, likewise for `r`.
///
/// # Peers
///
/// TRL `BCOTrainer.bco_loss` without underlying-distribution matching.
///
/// # Errors
///
/// [`Error::OutOfRange`] unless `β > 0`; [`Error::ShapeMismatch`] for the
/// cotangents.
pub fn bco_loss(
    beta: f64,
    chosen_logratios: Tensor<1>,
    rejected_logratios: Tensor<1>,
    running: &mut RunningMoments<f64>,
    do_train: bool,
    cotangents: Option<BcoCotangentTensors>,
) -> Result<BcoTensorOutput, Error> {
    check_beta(beta)?;
    let ([nc], [nr]) = (chosen_logratios.dims(), rejected_logratios.dims());
    if let Some(c) = &cotangents {
        check_shape("cotangent losses", c.losses.dims(), [nc + nr])?;
        check_shape("cotangent chosen_rewards", c.chosen_rewards.dims(), [nc])?;
        check_shape(
            "cotangent rejected_rewards",
            c.rejected_rewards.dims(),
            [nr],
        )?;
    }
    let cr = chosen_logratios.mul_scalar(beta);
    let rr = rejected_logratios.mul_scalar(beta);
    let all = Tensor::cat(vec![cr.clone(), rr.clone()], 0);
    if do_train && nc + nr > 0 {
        let mu = all.clone().mean();
        let dev_ = all.clone() - mu.clone().expand([nc + nr]);
        let var = (dev_.clone() * dev_).mean();
        let mv = to_vec(Tensor::cat(vec![mu, var], 0));
        running.update_moments(nc + nr, mv[0], mv[1]);
    }
    let delta = running.mean;
    let (lc, dc) = bco_term(e(cr.clone()), e(cr.filled(delta)), true);
    let (lr, dr) = bco_term(e(rr.clone()), e(rr.filled(delta)), false);
    let (grad_chosen, grad_rejected) = match cotangents {
        None => (None, None),
        Some(c) => (
            Some((c.losses.clone().narrow(0, 0, nc) * dc.0 + c.chosen_rewards).mul_scalar(beta)),
            Some((c.losses.narrow(0, nc, nr) * dr.0 + c.rejected_rewards).mul_scalar(beta)),
        ),
    };
    Ok(BcoTensorOutput {
        losses: Tensor::cat(vec![lc.0, lr.0], 0),
        chosen_rewards: cr,
        rejected_rewards: rr,
        delta,
        grad_chosen,
        grad_rejected,
    })
}

// ---------------------------------------------------------------------------
// Process reward model
// ---------------------------------------------------------------------------

/// What [`prm_hard_loss`] and [`prm_soft_loss`] return.
#[derive(Debug, Clone)]
pub struct PrmTensorOutput {
    /// Mean cross-entropy over the scored steps, `[1]`.
    pub loss: Tensor<1>,
    /// Fraction of scored steps whose arg-max class is the label, `[1]`.
    pub acc: Tensor<1>,
    /// `∂loss/∂logits`, `[B, S, V]`.
    pub grad_logits: Tensor<3>,
}

/// The class logits `[B, S, C]` (the reward-token columns, or the whole
/// vocabulary) and the scatter back of a class gradient to the vocabulary.
struct Classes {
    z: Tensor<3>,
    /// `[C, V]` one-hot of the reward token ids (host-built metadata).
    onehot: Option<Tensor<2>>,
    n: usize,
}

impl Classes {
    fn new(cfg: &PrmConfig<'_>, logits: Tensor<3>) -> Result<Self, Error> {
        let [_, _, v] = logits.dims();
        let dev = logits.device();
        match cfg.reward_token_ids {
            None => Ok(Classes {
                z: logits,
                onehot: None,
                n: v,
            }),
            Some(ids) => {
                if ids.is_empty() {
                    return Err(Error::Empty {
                        input: "reward_token_ids",
                    });
                }
                if ids.iter().any(|&t| t < 0 || t as usize >= v) {
                    return Err(Error::Invalid {
                        input: "reward_token_ids",
                        rule: "every reward token id must lie in [0, vocab)",
                    });
                }
                let idx =
                    Tensor::<1, Int>::from_data(TensorData::new(ids.to_vec(), [ids.len()]), &dev);
                let mut oh = vec![0.0f64; ids.len() * v];
                for (k, &t) in ids.iter().enumerate() {
                    oh[k * v + t as usize] = 1.0;
                }
                Ok(Classes {
                    z: logits.select(2, idx),
                    onehot: Some(Tensor::from_data(TensorData::new(oh, [ids.len(), v]), &dev)),
                    n: ids.len(),
                })
            }
        }
    }

    /// A finite class gradient `[B, S, C]` as a vocabulary gradient.
    fn scatter(&self, g: Tensor<3>, v: usize) -> Tensor<3> {
        match &self.onehot {
            None => g,
            Some(oh) => {
                let [b, s, c] = g.dims();
                g.reshape([b * s, c]).matmul(oh.clone()).reshape([b, s, v])
            }
        }
    }
}

fn prm_prepare(
    cfg: &PrmConfig<'_>,
    inputs: &Tensor<2, Int>,
    logits: &Tensor<3>,
) -> Result<(Classes, Tensor<2, Bool>), Error> {
    let [b, s, v] = logits.dims();
    check_shape("inputs", inputs.dims(), [b, s])?;
    if v == 0 && b * s > 0 {
        return Err(Error::Empty {
            input: "logits (vocabulary)",
        });
    }
    let scored = inputs.clone().equal_elem(cfg.placeholder_token_id);
    Ok((Classes::new(cfg, logits.clone())?, scored))
}

/// Process-reward-model cross-entropy with hard (class-id) labels, on
/// tensors.
///
/// # Formula
///
/// As [`posttrain_core::preference::unpaired::prm_hard_loss`]: scored
/// positions are `inputs == placeholder_token_id`; labels are mapped to class
/// indices by replacing `ids[0]`, `ids[1]`, … in turn; over the `N` scored
/// positions with a label (≠ −100),
/// `loss = −(1/N) Σ log softmax(classes)[label]` ([`selective_log_softmax`]),
/// `acc = (1/M) Σ_{scored} 1[argmax classes = label]` (0 for empty means).
///
/// # Gradient
///
/// `(softmax(classes)ₖ − 1[k = label]) / N` at the class columns of scored
/// labelled rows, 0 elsewhere.
///
/// # Peers
///
/// OpenRLHF `PRMLoss`, integer labels.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for shapes; [`Error::Invalid`] for a reward id
/// outside the vocabulary or a scored label outside the classes and not
/// −100 (one boolean read back).
pub fn prm_hard_loss(
    cfg: &PrmConfig<'_>,
    inputs: Tensor<2, Int>,
    logits: Tensor<3>,
    labels: Tensor<2, Int>,
) -> Result<PrmTensorOutput, Error> {
    let [b, s, v] = logits.dims();
    check_shape("labels", labels.dims(), [b, s])?;
    let (cls, scored) = prm_prepare(cfg, &inputs, &logits)?;
    let dev = logits.device();
    let mut l = labels;
    if let Some(ids) = cfg.reward_token_ids {
        for (i, &t) in ids.iter().enumerate() {
            let hit = l.clone().equal_elem(t);
            l = l.mask_fill(hit, i as i64);
        }
    }
    let labelled = scored.clone().bool_and(l.clone().not_equal_elem(-100));
    let bad = labelled
        .clone()
        .bool_and(
            l.clone()
                .lower_elem(0)
                .bool_or(l.clone().greater_equal_elem(cls.n as i64)),
        )
        .any();
    if b * s > 0 && to_vec_bool(bad)[0] {
        return Err(Error::Invalid {
            input: "labels",
            rule: "a scored label must be -100 or a class of the reward tokens",
        });
    }
    let acc_hit = cls
        .z
        .clone()
        .argmax(2)
        .squeeze_dim::<2>(2)
        .equal(l.clone())
        .bool_and(scored.clone());
    let acc = safe_div(count(&acc_hit), count(&scored));
    let safe = l.mask_fill(labelled.clone().bool_not(), 0);
    let inv_n = safe_div(Tensor::ones([1], &dev), count(&labelled));
    let coef = keep(
        inv_n.clone().neg().reshape([1, 1]).expand([b, s]),
        &labelled,
    );
    let (lp, g) = selective_log_softmax(cls.z.clone(), safe, Temperature::ONE, Some(coef))?;
    let loss = keep(lp, &labelled).sum().neg() * inv_n;
    let m3 = labelled.unsqueeze_dim::<3>(2).expand([b, s, cls.n]);
    let g = keep(g.expect("a cotangent was given"), &m3);
    Ok(PrmTensorOutput {
        loss,
        acc,
        grad_logits: cls.scatter(g, v),
    })
}

/// Process-reward-model cross-entropy with soft labels `p` (probability of
/// the first reward token), on tensors.
///
/// # Formula
///
/// As [`posttrain_core::preference::unpaired::prm_soft_loss`]: targets
/// `(p, 1 − p)` on the two reward-token classes, over the `N` scored
/// positions `loss = −(1/N) Σ (p·log softmax(z)₀ + (1 − p)·log softmax(z)₁)`
/// (two [`selective_log_softmax`] gathers), `acc = (1/N) Σ 1[argmax z =
/// argmax (p, 1 − p)]`.
///
/// # Gradient
///
/// `(softmax(z)ₖ − yₖ)/N` at the reward-token columns of scored rows (the sum
/// of the two gathers' VJPs with cotangents `−p/N`, `−(1 − p)/N`).
///
/// # Peers
///
/// OpenRLHF `PRMLoss`, float labels.
///
/// # Errors
///
/// [`Error::Invalid`] unless there are exactly two reward ids inside the
/// vocabulary; [`Error::ShapeMismatch`] for shapes.
pub fn prm_soft_loss(
    cfg: &PrmConfig<'_>,
    inputs: Tensor<2, Int>,
    logits: Tensor<3>,
    labels: Tensor<2>,
) -> Result<PrmTensorOutput, Error> {
    if cfg.reward_token_ids.map(|ids| ids.len()) != Some(2) {
        return Err(Error::Invalid {
            input: "reward_token_ids",
            rule: "soft labels need exactly two reward token ids",
        });
    }
    let [b, s, v] = logits.dims();
    check_shape("labels", labels.dims(), [b, s])?;
    let (cls, scored) = prm_prepare(cfg, &inputs, &logits)?;
    let dev = logits.device();
    let inv_n = safe_div(Tensor::ones([1], &dev), count(&scored));
    let inv = inv_n.clone().reshape([1, 1]).expand([b, s]);
    let p = keep(labels, &scored);
    let q = p.clone().neg().add_scalar(1.0);
    let k0 = Tensor::<2, Int>::zeros([b, s], &dev);
    let k1 = k0.ones_like();
    let c0 = keep(p.clone().neg() * inv.clone(), &scored);
    let c1 = keep(q.clone().neg() * inv, &scored);
    let (lp0, g0) = selective_log_softmax(cls.z.clone(), k0, Temperature::ONE, Some(c0))?;
    let (lp1, g1) = selective_log_softmax(cls.z.clone(), k1.clone(), Temperature::ONE, Some(c1))?;
    let s_sum = keep(p.clone() * lp0 + q.clone() * lp1, &scored).sum();
    let loss = s_sum.neg() * inv_n.clone();
    let m3 = scored.clone().unsqueeze_dim::<3>(2).expand([b, s, 2]);
    let g = keep(g0.expect("cotangent") + g1.expect("cotangent"), &m3);
    let label_arg = k1.mask_fill(q.greater(p).bool_not(), 0);
    let hit = cls
        .z
        .clone()
        .argmax(2)
        .squeeze_dim::<2>(2)
        .equal(label_arg)
        .bool_and(scored);
    Ok(PrmTensorOutput {
        loss,
        acc: count(&hit) * inv_n,
        grad_logits: cls.scatter(g, v),
    })
}

// ---------------------------------------------------------------------------
// CPO and ORPO
// ---------------------------------------------------------------------------

/// What [`cpo_loss`] returns.
#[derive(Debug, Clone)]
pub struct CpoTensorOutput {
    /// Per-pair losses, `[B]`.
    pub losses: Tensor<1>,
    /// `β·r(c)` (detached), `[B]`.
    pub chosen_rewards: Tensor<1>,
    /// `β·r(r)` (detached), `[B]`.
    pub rejected_rewards: Tensor<1>,
    /// `∂lossᵢ/∂cᵢ` (each pair's loss depends on its own pair only).
    pub d_chosen: Tensor<1>,
    /// `∂lossᵢ/∂rᵢ`.
    pub d_rejected: Tensor<1>,
}

/// Per-pair CPO losses and rewards from sequence log-probabilities, on
/// tensors.
///
/// # Formula
///
/// As [`posttrain_core::preference::odds_ratio::cpo_loss`]:
/// `lossᵢ = cpo_pair_loss(r(cᵢ) − r(rᵢ))` with the AlphaPO reward `r`
/// (the core kernels [`alphapo_reward`], [`cpo_pair_loss`]).
///
/// # Gradient
///
/// `∂lossᵢ/∂cᵢ = ℓ′(hᵢ)·r′(cᵢ)`, `∂lossᵢ/∂rᵢ = −ℓ′(hᵢ)·r′(rᵢ)`.
///
/// # Peers
///
/// TRL `CPOTrainer.cpo_loss`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] when the shapes differ.
pub fn cpo_loss(
    cfg: &CpoConfig,
    chosen_logps: Tensor<1>,
    rejected_logps: Tensor<1>,
) -> Result<CpoTensorOutput, Error> {
    let [n] = chosen_logps.dims();
    check_shape("policy_rejected_logps", rejected_logps.dims(), [n])?;
    let (rc, drc) = alphapo_reward(e(chosen_logps), cfg.alpha);
    let (rr, drr) = alphapo_reward(e(rejected_logps), cfg.alpha);
    let t = cpo_pair_loss(cfg, ElemTensor(rc.0.clone() - rr.0.clone()));
    Ok(CpoTensorOutput {
        losses: t.loss.0,
        chosen_rewards: rc.0.mul_scalar(cfg.beta),
        rejected_rewards: rr.0.mul_scalar(cfg.beta),
        d_chosen: t.dmargin.0.clone() * drc.0,
        d_rejected: (t.dmargin.0 * drr.0).neg(),
    })
}

/// Cotangents of [`odds_ratio_loss`]'s outputs.
#[derive(Debug, Clone)]
pub struct OrpoCotangentTensors {
    /// Cotangent of each per-pair loss, `[B]`.
    pub losses: Tensor<1>,
    /// Cotangent of the `log_odds_ratio` metric.
    pub log_odds_ratio: f64,
    /// Cotangent of the `log_odds_chosen` metric.
    pub log_odds_chosen: f64,
}

/// What [`odds_ratio_loss`] returns.
#[derive(Debug, Clone)]
pub struct OrpoTensorOutput {
    /// `β·log σ(log_oddsᵢ)`, `[B]`.
    pub losses: Tensor<1>,
    /// `β·cᵢ`, `[B]`.
    pub chosen_rewards: Tensor<1>,
    /// `β·rᵢ`, `[B]`.
    pub rejected_rewards: Tensor<1>,
    /// `mean log σ(log_odds)`, `[1]`.
    pub log_odds_ratio: Tensor<1>,
    /// `mean log_odds`, `[1]`.
    pub log_odds_chosen: Tensor<1>,
    /// The VJP `∂/∂c` (with cotangents), `[B]`.
    pub grad_chosen: Option<Tensor<1>>,
    /// The VJP `∂/∂r`, `[B]`.
    pub grad_rejected: Option<Tensor<1>>,
}

/// ORPO's per-pair odds-ratio term, rewards and log-odds metrics, on tensors.
///
/// # Formula
///
/// As [`posttrain_core::preference::odds_ratio::odds_ratio_loss`] with the
/// core kernel [`orpo_log_odds`]: `lossesᵢ = β·log σ(log_oddsᵢ)`, the means
/// as reductions (0 for an empty batch).
///
/// # Gradient
///
/// `∂/∂log_oddsᵢ = (β·cᵢ + c_ratio/n)·σ(−log_oddsᵢ) + c_chosen/n`, chained
/// through [`orpo_log_odds`]'s partials.
///
/// # Peers
///
/// TRL `ORPOTrainer.odds_ratio_loss`.
///
/// # Errors
///
/// [`Error::OutOfRange`] unless `β > 0`; [`Error::ShapeMismatch`] for shapes.
pub fn odds_ratio_loss(
    beta: f64,
    chosen_logps: Tensor<1>,
    rejected_logps: Tensor<1>,
    cotangents: Option<OrpoCotangentTensors>,
) -> Result<OrpoTensorOutput, Error> {
    check_beta(beta)?;
    let [n] = chosen_logps.dims();
    check_shape("policy_rejected_logps", rejected_logps.dims(), [n])?;
    if let Some(c) = &cotangents {
        check_shape("cotangent losses", c.losses.dims(), [n])?;
    }
    let (lo, gc, gr) = orpo_log_odds(e(chosen_logps.clone()), e(rejected_logps.clone()));
    let ratio = ElemExt::log_sigmoid(lo.clone()).0;
    let inv_n = if n == 0 { 0.0 } else { 1.0 / n as f64 };
    let (grad_chosen, grad_rejected) = match cotangents {
        None => (None, None),
        Some(c) => {
            let dratio = c
                .losses
                .mul_scalar(beta)
                .add_scalar(c.log_odds_ratio * inv_n);
            let dlo = (dratio * ElemExt::sigmoid(Elem::neg(lo.clone())).0)
                .add_scalar(c.log_odds_chosen * inv_n);
            (Some(dlo.clone() * gc.0), Some(dlo * gr.0))
        }
    };
    Ok(OrpoTensorOutput {
        losses: ratio.clone().mul_scalar(beta),
        chosen_rewards: chosen_logps.mul_scalar(beta),
        rejected_rewards: rejected_logps.mul_scalar(beta),
        log_odds_ratio: mean0(ratio),
        log_odds_chosen: mean0(lo.0),
        grad_chosen,
        grad_rejected,
    })
}
