//! Paired preference losses: DPO and its family on `(chosen, rejected)`
//! sequence log-probabilities, and reward-model pairwise losses.
//!
//! # Overview
//!
//! Every loss here compares a *chosen* and a *rejected* completion of the
//! same prompt. With sequence log-probabilities `c, r` under the policy and
//! `c₀, r₀` under a frozen reference, the log-ratios are
//! `ℓc = c − c₀`, `ℓr = r − r₀`; an [`FDivergence`] maps them to scores
//! `sc = f(ℓc)`, `sr = f(ℓr)` (reverse KL: `f(x) = x`, i.e. plain DPO) and
//! `Δ = sc − sr`. Each [`PairedLoss`] is a function of these:
//!
//! | [`PairedLoss`] | per-pair loss | peers |
//! |---|---|---|
//! | `Sigmoid` | `−(1−ε) log σ(βΔ−γ) − ε log σ(−(βΔ−γ))` (DPO, cDPO, SimPO) | TRL `sigmoid` (ε ignored), OpenRLHF `DPOLoss`, torchtune `DPOLoss`/`SimPOLoss` |
//! | `Hinge` | `relu(1 − βΔ)` | TRL `hinge`, torchtune `RSOLoss` (β = γ) |
//! | `Ipo` | `(Δ̄ − 1/(2β))²`, `Δ̄` length-normalised when lengths are given | TRL `ipo` (normalised), OpenRLHF `ipo=True`, torchtune `IPOLoss` (β = τ) |
//! | `ExoPair` | `KL(softmax(β·[sc, sr]) ‖ [1−ε, ε])` | TRL `exo_pair` |
//! | `NcaPair` | `−log σ(βsc) − ½ log σ(−βsc) − ½ log σ(−βsr)` | TRL `nca_pair` |
//! | `Robust` | `(−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1−2ε)` | TRL `robust` |
//! | `BcoPair` | `−log σ(βsc) − log σ(−βsr)` | TRL `bco_pair` |
//! | `SppoHard` | `(sc − 1/(2β))² + (sr + 1/(2β))²` | TRL `sppo_hard` |
//! | `Aot` | smoothed sigmoid of `sort(c−r)ⱼ − sort(c₀−r₀)ⱼ` | TRL `aot` |
//! | `AotUnpaired` | smoothed sigmoid of `sort(ℓc)ⱼ − sort(ℓr)ⱼ` | TRL `aot_unpaired` |
//! | `ApoZero` | `1 − σ(βℓc) + σ(βℓr)` | TRL `apo_zero` |
//! | `ApoDown` | `σ(βℓc) + 1 − σ(βΔ)` | TRL `apo_down` |
//! | `Discopop` | `(1−m)·softplus(−βΔ) + m·e^{−βΔ}`, `m = σ(βΔ/τ)` | TRL `discopop` |
//! | `SigmoidNorm` | `−log σ(β(sc/nc − sr/nr))` | TRL `sigmoid_norm` |
//! | `Sft` | token-mean NLL of the chosen completions | TRL `sft` |
//!
//! Several terms can be mixed with weights ([`LossTerm`]), each averaged over
//! the batch; optional per-pair weights (WPO) multiply every term.
//!
//! Three layers:
//!
//! * [`PairedConfig::pair_term`] — one pair's loss and its partial
//!   derivatives, written once over [`Elem`];
//! * [`paired_loss`] — the batch driver on sequence log-probabilities:
//!   loss, [`PairedMetrics`], and the VJP with respect to the policy's
//!   sequence log-probabilities;
//! * [`dpo_from_logits`] — TRL's full step from `[2B, T, V]` logits:
//!   shifted masked sums (optionally LD-DPO weighted), WPO weights, the SFT
//!   term, TRL's logged metrics, and the VJP with respect to the logits.
//!
//! Reward models use [`pairwise_reward_loss`] (Bradley–Terry with an optional
//! margin and reward centering; OpenRLHF `PairWiseLoss`/`LogExpLoss`, TRL
//! `RewardTrainer`).
//!
//! # Peers
//!
//! [`PairedConfig::preset`] fills the options where the peers differ: TRL's
//! `sigmoid` ignores label smoothing, OpenRLHF and torchtune apply it (cDPO).
//! TRL's `ipo` is length-normalised because the TRL driver passes completion
//! lengths; the others pass none.
//!
//! ## f-divergence scores: TRL f2cd577 and TRL 1.16.0
//!
//! For a divergence other than reverse KL the two TRL releases differ, and
//! [`PairedConfig::divergence_scores`] ([`FDivergenceScores`]) selects one:
//!
//! | | f2cd577 (`ConstantsDropped`, default) | 1.16.0 (`ZeroAtReference`) |
//! |---|---|---|
//! | forward KL score | `−e^{−x}` | `1 − e^{−x}` |
//! | JS score | `log σ(x)` | `ln 2 + log σ(x)` |
//! | α score | `e^{(α−1)x}/(α−1)` | `(e^{(α−1)x} − 1)/(α−1)` |
//! | `sigmoid`, `hinge`, `exo_pair`, `robust`, `discopop` | `Δ = sc − sr` | the same `Δ` (the constants cancel) |
//! | `ipo`, `sigmoid_norm` | `sc/nc − sr/nr` | the same with the shifted scores (the constants do not cancel) |
//! | `nca_pair`, `bco_pair`, `sppo_hard` | scores `sc`, `sr` | raw log-ratios `ℓc`, `ℓr` |
//! | `apo_down` | `σ(βℓc) + 1 − σ(βΔ)` | `σ(βℓc) + 1 − σ(β(ℓc − ℓr))` |
//! | `aot`, `aot_unpaired`, `apo_zero`, `sft` | no scores | no scores |
//!
//! The scores' derivatives are the same (`e^{−x}`, `σ(−x)`, `e^{(α−1)x}`);
//! where 1.16.0 reads raw log-ratios the gradient has no `f′` factor. TRL
//! 1.16.0's `DPOTrainer` also refuses, at construction, a divergence other
//! than `reverse_kl` with `nca_pair`, `bco_pair`, `sppo_hard`, `aot`,
//! `aot_unpaired`, `apo_zero` or `apo_down`; posttrain computes what its
//! `_compute_loss` would.
//!
//! # Example
//!
//! ```
//! use posttrain_core::preference::paired::*;
//! use posttrain_core::Preset;
//! let cfg = PairedConfig::preset(Preset::OpenRlhf, 0.1)?;
//! let terms = [LossTerm::new(PairedLoss::Sigmoid)];
//! let (c, r, c0, r0) = ([-3.0f64, -2.0], [-4.0, -1.0], [-3.5, -2.0], [-3.5, -1.5]);
//! let batch = PairBatch::new(&c, &r).with_reference(&c0, &r0);
//! let (mut dc, mut dr) = ([0.0; 2], [0.0; 2]);
//! let grads = PairGrads::of_mean(1.0, &mut dc, &mut dr);
//! let out = paired_loss(&cfg, &terms, &batch, None, Some(grads), &mut [])?;
//! assert!(out.loss > 0.0 && out.metrics.accuracy == 0.5);
//! // swapping chosen and rejected flips the gradient of the sigmoid loss' margin
//! assert!(dc[0] < 0.0 && dr[0] > 0.0);
//! # Ok::<(), posttrain_core::Error>(())
//! ```

use core::cmp::Ordering;
use core::str::FromStr;

use crate::elem::{Elem, ElemExt, Real};
use crate::error::{check_len, check_param, Error};
use crate::logits::{entropy_from_logits, row_max_lse, selective_log_softmax};
use crate::preset::Preset;
use crate::shape::Dims;

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

/// One paired preference loss (see the [module table](self)); parsed from
/// TRL's `loss_type` names with [`FromStr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum PairedLoss {
    /// Logistic (Bradley–Terry) loss on `βΔ − γ`, with optional label
    /// smoothing (cDPO) and target margin γ (SimPO). TRL `sigmoid`.
    Sigmoid,
    /// `relu(1 − βΔ)` (SLiC / RSO). TRL `hinge`.
    Hinge,
    /// `(Δ̄ − 1/(2β))²` (IPO). TRL `ipo`.
    Ipo,
    /// EXO with two candidates. TRL `exo_pair`.
    ExoPair,
    /// Noise-contrastive alignment, pairwise. TRL `nca_pair`.
    NcaPair,
    /// Robust DPO (unbiased under label noise ε). TRL `robust`.
    Robust,
    /// Binary classifier optimisation on pairs. TRL `bco_pair`.
    BcoPair,
    /// SPPO with hard win probabilities. TRL `sppo_hard`.
    SppoHard,
    /// Alignment via optimal transport, paired. TRL `aot`.
    Aot,
    /// Alignment via optimal transport, unpaired. TRL `aot_unpaired`.
    AotUnpaired,
    /// Anchored preference optimisation, "zero" variant. TRL `apo_zero`.
    ApoZero,
    /// Anchored preference optimisation, "down" variant. TRL `apo_down`.
    ApoDown,
    /// DiscoPOP (log-ratio modulated logistic/exponential). TRL `discopop`.
    /// Its exponential part `e^{−z}·σ(z/τ)` grows like `e^{−z(1 − 1/τ)}`
    /// for `z → −∞` when `τ > 1`: beyond the float range it is +inf (the
    /// true value); for `τ ≤ 1` it stays finite (evaluated as one
    /// exponential of `−z + log σ(z/τ)`).
    Discopop,
    /// Logistic loss on length-normalised scores. TRL `sigmoid_norm`.
    SigmoidNorm,
    /// Negative log-likelihood of the chosen completions (token mean). TRL `sft`.
    Sft,
}

const PAIRED_LOSS_NAMES: &str = "sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, \
sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, sft";

impl PairedLoss {
    /// TRL's `loss_type` name.
    pub fn name(self) -> &'static str {
        match self {
            PairedLoss::Sigmoid => "sigmoid",
            PairedLoss::Hinge => "hinge",
            PairedLoss::Ipo => "ipo",
            PairedLoss::ExoPair => "exo_pair",
            PairedLoss::NcaPair => "nca_pair",
            PairedLoss::Robust => "robust",
            PairedLoss::BcoPair => "bco_pair",
            PairedLoss::SppoHard => "sppo_hard",
            PairedLoss::Aot => "aot",
            PairedLoss::AotUnpaired => "aot_unpaired",
            PairedLoss::ApoZero => "apo_zero",
            PairedLoss::ApoDown => "apo_down",
            PairedLoss::Discopop => "discopop",
            PairedLoss::SigmoidNorm => "sigmoid_norm",
            PairedLoss::Sft => "sft",
        }
    }

    fn is_sorted(self) -> bool {
        matches!(self, PairedLoss::Aot | PairedLoss::AotUnpaired)
    }

    fn needs_lengths(self) -> bool {
        matches!(self, PairedLoss::SigmoidNorm)
    }
}

impl FromStr for PairedLoss {
    type Err = Error;
    /// Parses TRL's `loss_type` names (exact, lower case).
    ///
    /// # Errors
    /// [`Error::UnknownOption`] for any other name.
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "sigmoid" => PairedLoss::Sigmoid,
            "hinge" => PairedLoss::Hinge,
            "ipo" => PairedLoss::Ipo,
            "exo_pair" => PairedLoss::ExoPair,
            "nca_pair" => PairedLoss::NcaPair,
            "robust" => PairedLoss::Robust,
            "bco_pair" => PairedLoss::BcoPair,
            "sppo_hard" => PairedLoss::SppoHard,
            "aot" => PairedLoss::Aot,
            "aot_unpaired" => PairedLoss::AotUnpaired,
            "apo_zero" => PairedLoss::ApoZero,
            "apo_down" => PairedLoss::ApoDown,
            "discopop" => PairedLoss::Discopop,
            "sigmoid_norm" => PairedLoss::SigmoidNorm,
            "sft" => PairedLoss::Sft,
            _ => {
                return Err(Error::unknown_option(
                    "paired loss type",
                    s,
                    PAIRED_LOSS_NAMES,
                ))
            }
        })
    }
}

/// One weighted term of a (possibly multi-term) paired loss.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LossTerm {
    /// The loss.
    pub kind: PairedLoss,
    /// Its weight in the sum (TRL `loss_weights`, 1 by default).
    pub weight: f64,
}

impl LossTerm {
    /// `kind` with weight 1.
    pub const fn new(kind: PairedLoss) -> Self {
        LossTerm { kind, weight: 1.0 }
    }
    /// `kind` with weight `weight`.
    pub const fn weighted(kind: PairedLoss, weight: f64) -> Self {
        LossTerm { kind, weight }
    }
}

/// How a log-ratio `x = log π − log π_ref` becomes a score: the derivative
/// `f′(eˣ)` of the f-divergence's generator, up to an additive constant
/// that [`FDivergenceScores`] keeps or drops.
///
/// # Formula
/// With [`FDivergenceScores::ConstantsDropped`] (the default, [`score`](Self::score)):
/// ```text
/// reverse KL   f(x) = x
/// forward KL   f(x) = −e^{−x}
/// JS           f(x) = log σ(x)
/// α-divergence f(x) = e^{min((α−1)x, 80)} / (α−1)   (reverse KL when |α−1| < 1e-6)
/// ```
/// With [`FDivergenceScores::ZeroAtReference`] each score is shifted by a
/// constant so that `f(0) = 0`: `1 − e^{−x}`, `ln 2 + log σ(x)`,
/// `(e^{min((α−1)x, 80)} − 1)/(α−1)` (see [`score_with`](Self::score_with)).
/// # Gradient
/// `1`, `e^{−x}`, `σ(−x)`, `e^{(α−1)x}` (0 where the clamp at 80 is active),
/// either way (the constants do not change it).
/// # Peers
/// TRL `f_divergence_type` (`reverse_kl`, `forward_kl`, `js_divergence`,
/// `alpha_divergence` with `f_alpha_divergence_coef`); which constants TRL
/// keeps depends on the release ([`FDivergenceScores`]).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum FDivergence {
    /// Plain DPO: the score is the log-ratio.
    ReverseKl,
    /// Forward KL: the score `−e^{−x}` has no clamp (as in TRL), so it
    /// exceeds the float range — and so do losses that use it linearly or
    /// squared (IPO, hinge…) — once the log-ratio `x` is below
    /// `−ln(MAX)` (≈ −709 in `f64`, ≈ −88 in `f32`). Where a loss saturates
    /// instead (sigmoid-type losses) the result stays finite: a zero
    /// `∂loss/∂score` times the overflowed `e^{−x}` counts as 0.
    ForwardKl,
    /// Jensen–Shannon.
    JsDivergence,
    /// α-divergence with coefficient α. The score is at most
    /// `e^80/|α − 1|` (TRL's clamp), which exceeds the `f32` range for
    /// `|α − 1| < ≈1.6e-4` (and `|α − 1| ≥ 1e-6`, below which it is the
    /// reverse KL): ±inf there, as in TRL.
    Alpha(f64),
}

/// TRL's clamp on `(α−1)·x` before the exponential.
const ALPHA_EXP_CLAMP: f64 = 80.0;

impl FDivergence {
    /// Parses TRL's `f_divergence_type`; `alpha` is `f_alpha_divergence_coef`
    /// (read only for `alpha_divergence`).
    ///
    /// # Errors
    /// [`Error::UnknownOption`] for an unknown name, [`Error::OutOfRange`]
    /// for a non-finite α.
    pub fn from_trl(name: &str, alpha: f64) -> Result<Self, Error> {
        Ok(match name {
            "reverse_kl" => FDivergence::ReverseKl,
            "forward_kl" => FDivergence::ForwardKl,
            "js_divergence" => FDivergence::JsDivergence,
            "alpha_divergence" => {
                check_param(
                    alpha.is_finite(),
                    "f_alpha_divergence_coef",
                    alpha,
                    "must be finite",
                )?;
                FDivergence::Alpha(alpha)
            }
            _ => {
                return Err(Error::unknown_option(
                    "f-divergence",
                    name,
                    "reverse_kl, forward_kl, js_divergence, alpha_divergence",
                ))
            }
        })
    }

    /// The score `f(x)` with its constant dropped and its derivative
    /// `f′(x)` (see the type docs): [`score_with`](Self::score_with) for
    /// [`FDivergenceScores::ConstantsDropped`].
    pub fn score<E: Elem>(&self, x: E) -> (E, E) {
        self.score_with(FDivergenceScores::ConstantsDropped, x)
    }

    /// The score `f(x)` and its derivative `f′(x)`, with the constants that
    /// `scores` selects.
    ///
    /// # Formula
    /// ```text
    ///                  ConstantsDropped               ZeroAtReference
    /// reverse KL       x                              x
    /// forward KL       −e^{−x}                        1 − e^{−x}
    /// JS               log σ(x)                       ln 2 + log σ(x)
    /// α-divergence     e^{min((α−1)x, 80)}/(α−1)      (e^{min((α−1)x, 80)} − 1)/(α−1)
    /// ```
    /// (α-divergence: reverse KL when `|α − 1| < 1e-6`.) For example, the
    /// forward KL at `x = ln 2` is `−½` (dropped) or `½` (at the
    /// reference), both with derivative `½`.
    /// # Gradient
    /// `1`, `e^{−x}`, `σ(−x)`, `e^{(α−1)x}` (0 where the clamp at 80 is
    /// active), for both.
    /// # Peers
    /// TRL f2cd577 computes the first column, TRL 1.16.0 the second (same
    /// operations in the same order: `1 − e^{−x}`, `ln 2 + log σ(x)`,
    /// `(e^{t} − 1)·(1/(α−1))`).
    pub fn score_with<E: Elem>(&self, scores: FDivergenceScores, x: E) -> (E, E) {
        let keep = scores == FDivergenceScores::ZeroAtReference;
        match *self {
            FDivergence::ReverseKl => (x.clone(), x.full_like(1.0)),
            FDivergence::ForwardKl => {
                let e = x.neg().exp();
                let s = e.clone().neg();
                (if keep { s.add_scalar(1.0) } else { s }, e)
            }
            FDivergence::JsDivergence => {
                let s = x.clone().log_sigmoid();
                let s = if keep {
                    s.add_scalar(core::f64::consts::LN_2)
                } else {
                    s
                };
                (s, x.neg().sigmoid())
            }
            FDivergence::Alpha(a) => {
                if <f64 as Elem>::abs(a - 1.0) < 1e-6 {
                    return (x.clone(), x.full_like(1.0));
                }
                let t = x.mul_scalar(a - 1.0);
                let inside = t.le_scalar(ALPHA_EXP_CLAMP);
                let e = t.clone().min(t.full_like(ALPHA_EXP_CLAMP)).exp();
                let zero = e.full_like(0.0);
                let d = E::select(&inside, e.clone(), zero);
                let s = if keep { e.add_scalar(-1.0) } else { e };
                (s.mul_scalar(1.0 / (a - 1.0)), d)
            }
        }
    }
}

/// Which f-divergence scores the score-reading losses see: the two
/// behaviours of TRL's DPO releases for `f_divergence_type ≠ reverse_kl`
/// (with [`FDivergence::ReverseKl`] they coincide).
///
/// # Formula
/// * [`ConstantsDropped`](Self::ConstantsDropped): the scores of
///   [`FDivergence::score`] (`−e^{−x}`, `log σ(x)`, `e^{(α−1)x}/(α−1)`), read
///   by every loss that reads scores: `Sigmoid`, `Hinge`, `Ipo`, `ExoPair`,
///   `NcaPair`, `Robust`, `BcoPair`, `SppoHard`, `ApoDown` (its `σ(βΔ)`
///   part), `Discopop`, `SigmoidNorm`.
/// * [`ZeroAtReference`](Self::ZeroAtReference): the scores shifted to
///   vanish at `x = 0` (`1 − e^{−x}`, `ln 2 + log σ(x)`,
///   `(e^{(α−1)x} − 1)/(α−1)`, [`FDivergence::score_with`]), read only by
///   the losses of the score difference `Δ = sc − sr` (`Sigmoid`, `Hinge`,
///   `ExoPair`, `Robust`, `Discopop`, where the shift cancels) and of the
///   length-normalised scores (`Ipo`, `SigmoidNorm`: `sc/nc − sr/nr`, where
///   it does not); the pointwise losses `NcaPair`, `BcoPair`, `SppoHard` and
///   `ApoDown` read the raw log-ratios `ℓc`, `ℓr` in place of `sc`, `sr`
///   whatever the divergence.
///
/// `Aot`, `AotUnpaired`, `ApoZero` and `Sft` never read scores; the logged
/// rewards are `β·ℓ` under both.
///
/// See the example below: by hand, with β = ½ (so `1/(2β) = 1`), forward
/// KL, `ℓc = ln 2`, `ℓr = 0` (`f′(ℓc) = ½`, `f′(ℓr) = 1`), completion
/// lengths 2 and 1:
///
/// | | `ConstantsDropped` | `ZeroAtReference` |
/// |---|---|---|
/// | `sc`, `sr` | `−½`, `−1` | `½`, `0` |
/// | `Ipo` `Δ̄ = sc/2 − sr` | `¾` | `¼` |
/// | `Ipo` loss `(Δ̄ − 1)²` | `1/16` | `9/16` |
/// | `Ipo` `∂/∂c = 2(Δ̄ − 1)·f′(ℓc)/2` | `−⅛` | `−⅜` |
/// | `SppoHard` loss `(u − 1)² + (v + 1)²` | `(−3/2)² + 0² = 9/4` | `(ln 2 − 1)² + 1` (`u, v = ℓc, ℓr`) |
/// | `SppoHard` `∂/∂c` | `2(−3/2)·½ = −3/2` | `2(ln 2 − 1)` (no `f′`) |
///
/// # Gradient
/// The scores' derivatives are the same for both. With
/// `ZeroAtReference`, `NcaPair`, `BcoPair`, `SppoHard` and `ApoDown` take
/// their derivative with respect to the log-ratios directly (no `f′`
/// factor): [`PairedConfig::pair_term`] reports it in
/// `d_chosen_logratio`/`d_rejected_logratio` and 0 for the scores.
///
/// # Peers
/// TRL commit f2cd577 (the conformance vectors): `ConstantsDropped`. TRL
/// 1.16.0 (`DPOTrainer._compute_loss`): `ZeroAtReference`; its
/// `DPOTrainer.__init__` also refuses a divergence other than `reverse_kl`
/// with any loss outside `sigmoid, sigmoid_norm, hinge, ipo, exo_pair,
/// robust, discopop, sft` (the pointwise losses then read the same raw
/// log-ratios as under `reverse_kl`). The other peers have no f-divergence.
///
/// # Example
/// ```
/// use posttrain_core::preference::paired::*;
/// use posttrain_core::Preset;
/// let (c, r, c0, r0) = ([2.0f64.ln()], [0.0f64], [0.0f64], [0.0f64]);
/// let (nc, nr) = ([2.0f64], [1.0f64]);
/// let batch = PairBatch::new(&c, &r).with_reference(&c0, &r0).with_lengths(&nc, &nr);
/// let run = |scores: FDivergenceScores, kind: PairedLoss| {
///     let mut cfg = PairedConfig::preset(Preset::Trl, 0.5).unwrap();
///     cfg.divergence = FDivergence::ForwardKl;
///     let cfg = cfg.with_divergence_scores(scores);
///     let (mut dc, mut dr) = ([0.0], [0.0]);
///     let out = paired_loss(&cfg, &[LossTerm::new(kind)], &batch, None,
///         Some(PairGrads::of_mean(1.0, &mut dc, &mut dr)), &mut []).unwrap();
///     (out.loss, dc[0])
/// };
/// let close = |a: (f64, f64), b: (f64, f64)| (a.0 - b.0).abs() < 1e-15 && (a.1 - b.1).abs() < 1e-15;
/// use FDivergenceScores::{ConstantsDropped, ZeroAtReference};
/// assert!(close(run(ConstantsDropped, PairedLoss::Ipo), (1.0 / 16.0, -1.0 / 8.0)));
/// assert!(close(run(ZeroAtReference, PairedLoss::Ipo), (9.0 / 16.0, -3.0 / 8.0)));
/// let l2 = 2.0f64.ln();
/// assert!(close(run(ConstantsDropped, PairedLoss::SppoHard), (9.0 / 4.0, -1.5)));
/// assert!(close(run(ZeroAtReference, PairedLoss::SppoHard), ((l2 - 1.0).powi(2) + 1.0, 2.0 * (l2 - 1.0))));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum FDivergenceScores {
    /// Constants dropped, read by every score-reading loss (TRL f2cd577;
    /// the default).
    #[default]
    ConstantsDropped,
    /// Zero at the reference (`f(0) = 0`), read only by the `Δ` and
    /// length-normalised losses; the pointwise losses read raw log-ratios
    /// (TRL 1.16.0).
    ZeroAtReference,
}

impl FDivergenceScores {
    /// The option's name: `constants_dropped` or `zero_at_reference`.
    pub fn name(self) -> &'static str {
        match self {
            FDivergenceScores::ConstantsDropped => "constants_dropped",
            FDivergenceScores::ZeroAtReference => "zero_at_reference",
        }
    }

    /// Whether `kind` reads the raw log-ratios in place of the scores.
    pub fn reads_logratios(self, kind: PairedLoss) -> bool {
        self == FDivergenceScores::ZeroAtReference
            && matches!(
                kind,
                PairedLoss::NcaPair
                    | PairedLoss::BcoPair
                    | PairedLoss::SppoHard
                    | PairedLoss::ApoDown
            )
    }
}

impl FromStr for FDivergenceScores {
    type Err = Error;
    /// Parses [`name`](Self::name)'s names.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "constants_dropped" => Ok(FDivergenceScores::ConstantsDropped),
            "zero_at_reference" => Ok(FDivergenceScores::ZeroAtReference),
            _ => Err(Error::unknown_option(
                "f-divergence scores",
                s,
                "constants_dropped, zero_at_reference",
            )),
        }
    }
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// The scalar options shared by every [`PairedLoss`]; validated by
/// [`PairedConfig::new`].
///
/// # Peers
/// [`PairedConfig::preset`]: `Trl` leaves the sigmoid loss unsmoothed; the
/// others smooth it (cDPO).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PairedConfig {
    /// β (> 0): the inverse temperature of the implicit reward (τ for
    /// torchtune IPO, γ for torchtune RSO).
    pub beta: f64,
    /// ε ∈ [0, 1]: label noise of cDPO/robust/AOT, the EXO target `[1−ε, ε]`.
    pub label_smoothing: f64,
    /// Whether [`PairedLoss::Sigmoid`] applies `label_smoothing` (cDPO).
    /// TRL's current `sigmoid` does not; OpenRLHF and torchtune do.
    pub smooth_sigmoid: bool,
    /// γ: target reward margin of [`PairedLoss::Sigmoid`] (SimPO): the loss
    /// reads `β(Δ − γ/β)`. 0 for DPO.
    pub target_margin: f64,
    /// How log-ratios become scores.
    pub divergence: FDivergence,
    /// τ (> 0) of [`PairedLoss::Discopop`]'s modulation `σ(βΔ/τ)`.
    pub discopop_tau: f64,
    /// Which scores the losses read for a divergence other than reverse KL
    /// (TRL f2cd577 or 1.16.0, see [`FDivergenceScores`]); [`new`](Self::new)
    /// and [`preset`](Self::preset) set the default
    /// [`FDivergenceScores::ConstantsDropped`], [`with_divergence_scores`](Self::with_divergence_scores)
    /// changes it.
    #[cfg_attr(feature = "serde", serde(default))]
    pub divergence_scores: FDivergenceScores,
}

impl PairedConfig {
    /// Validates and builds a config.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] unless `beta > 0`, `label_smoothing ∈ [0, 1]`,
    /// `discopop_tau > 0`, `target_margin` finite, α finite.
    pub fn new(
        beta: f64,
        label_smoothing: f64,
        smooth_sigmoid: bool,
        target_margin: f64,
        divergence: FDivergence,
        discopop_tau: f64,
    ) -> Result<Self, Error> {
        check_param(
            beta > 0.0 && beta.is_finite(),
            "beta",
            beta,
            "must be finite and > 0",
        )?;
        check_param(
            (0.0..=1.0).contains(&label_smoothing),
            "label_smoothing",
            label_smoothing,
            "must lie in [0, 1]",
        )?;
        check_param(
            target_margin.is_finite(),
            "gamma",
            target_margin,
            "must be finite",
        )?;
        check_param(
            discopop_tau > 0.0 && discopop_tau.is_finite(),
            "discopop_tau",
            discopop_tau,
            "must be finite and > 0",
        )?;
        if let FDivergence::Alpha(a) = divergence {
            check_param(
                a.is_finite(),
                "f_alpha_divergence_coef",
                a,
                "must be finite",
            )?;
        }
        Ok(PairedConfig {
            beta,
            label_smoothing,
            smooth_sigmoid,
            target_margin,
            divergence,
            discopop_tau,
            divergence_scores: FDivergenceScores::ConstantsDropped,
        })
    }

    /// This config with `divergence_scores` (any value is valid).
    pub fn with_divergence_scores(mut self, scores: FDivergenceScores) -> Self {
        self.divergence_scores = scores;
        self
    }

    /// The score of a log-ratio and its derivative under this config's
    /// divergence and [`FDivergenceScores`]
    /// ([`FDivergence::score_with`]).
    pub fn score<E: Elem>(&self, x: E) -> (E, E) {
        self.divergence.score_with(self.divergence_scores, x)
    }

    /// β with the peer's defaults: no smoothing, no margin, reverse KL,
    /// `discopop_tau = 0.05`; `smooth_sigmoid` is `false` for `Trl`, `true`
    /// otherwise (set `label_smoothing` afterwards and call
    /// [`validate`](Self::validate), or use [`new`](Self::new)).
    ///
    /// # Peers
    /// | preset | `Sigmoid` smoothing | notes |
    /// |---|---|---|
    /// | `Trl` | ignored (`sigmoid` is plain DPO) | `robust`, `exo_pair`, `aot*` read ε |
    /// | `OpenRlhf` | cDPO | `ipo=True` ↔ [`PairedLoss::Ipo`] without lengths |
    /// | `Torchtune` | cDPO | IPO: β = τ; RSO: [`PairedLoss::Hinge`], β = γ; SimPO: `target_margin` = γ, no reference |
    /// | `Verl` | cDPO | (verl has no DPO loss; same as OpenRLHF) |
    ///
    /// # Errors
    /// [`Error::OutOfRange`] unless `beta > 0`.
    pub fn preset(preset: Preset, beta: f64) -> Result<Self, Error> {
        Self::new(
            beta,
            0.0,
            !matches!(preset, Preset::Trl),
            0.0,
            FDivergence::ReverseKl,
            0.05,
        )
    }

    /// Re-checks the ranges of [`new`](Self::new) (after editing fields).
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn validate(&self) -> Result<(), Error> {
        Self::new(
            self.beta,
            self.label_smoothing,
            self.smooth_sigmoid,
            self.target_margin,
            self.divergence,
            self.discopop_tau,
        )
        .map(|_| ())
    }

    /// Checks the terms against this config.
    ///
    /// # Errors
    /// [`Error::Empty`] for no term; [`Error::OutOfRange`] for a non-finite
    /// weight, `Robust` with `label_smoothing ∉ [0, 0.5)`, `ExoPair` with
    /// `label_smoothing ∉ (0, 1)`.
    pub fn check_terms(&self, terms: &[LossTerm]) -> Result<(), Error> {
        if terms.is_empty() {
            return Err(Error::Empty { input: "loss_type" });
        }
        let ls = self.label_smoothing;
        for t in terms {
            check_param(
                t.weight.is_finite(),
                "loss_weights",
                t.weight,
                "must be finite",
            )?;
            match t.kind {
                PairedLoss::Robust => check_param(
                    (0.0..0.5).contains(&ls),
                    "label_smoothing",
                    ls,
                    "must lie in [0, 0.5) for the robust loss",
                )?,
                PairedLoss::ExoPair => check_param(
                    ls > 0.0 && ls < 1.0,
                    "label_smoothing",
                    ls,
                    "must lie in (0, 1) for exo_pair",
                )?,
                _ => {}
            }
        }
        Ok(())
    }

    /// `−(1−ε) log σ(z) − ε log σ(−z)` and its derivative in `z`.
    fn smoothed_logistic<E: Elem>(&self, z: E, eps: f64) -> (E, E) {
        let loss = z
            .clone()
            .log_sigmoid()
            .mul_scalar(-(1.0 - eps))
            .sub(z.clone().neg().log_sigmoid().mul_scalar(eps));
        let d = z
            .clone()
            .neg()
            .sigmoid()
            .mul_scalar(-(1.0 - eps))
            .add(z.sigmoid().mul_scalar(eps));
        (loss, d)
    }

    /// One pair's loss for `kind` and its partial derivatives.
    ///
    /// # Formula
    /// See the [module table](self); `Δ = sc − sr`. For `Aot` and
    /// `AotUnpaired` the driver passes the *sorted* quantities in
    /// `chosen_logratio`/`rejected_logratio` and the loss reads their
    /// difference. `Ipo` and `SigmoidNorm` read `sc·inv_len_chosen −
    /// sr·inv_len_rejected` (pass 1 for no normalisation). `Sft` is not a
    /// per-pair loss: it returns 0 here (see [`paired_loss`]).
    ///
    /// With [`FDivergenceScores::ZeroAtReference`], `NcaPair`, `BcoPair`,
    /// `SppoHard` and `ApoDown` read `chosen_logratio`/`rejected_logratio`
    /// where the table reads `sc`/`sr` (TRL 1.16.0).
    ///
    /// # Gradient
    /// [`PairTermValue`] holds `∂loss/∂` each of the four inputs (through the
    /// length normalisation, not through the divergence: chain with
    /// [`PairedConfig::score`]'s derivative). Where a loss reads the
    /// log-ratios in place of the scores, the whole derivative is in
    /// `d_*_logratio` and `d_*_score` is 0.
    ///
    /// # Peers
    /// TRL `DPOTrainer._compute_loss` per loss type; OpenRLHF `DPOLoss`;
    /// torchtune `DPOLoss`, `IPOLoss`, `RSOLoss`, `SimPOLoss`.
    pub fn pair_term<E: Elem>(&self, kind: PairedLoss, a: &PairArgs<E>) -> PairTermValue<E> {
        if !self.divergence_scores.reads_logratios(kind) {
            return self.pair_term_on_scores(kind, a);
        }
        // The same formula with the log-ratios as its scores: every
        // derivative is with respect to the log-ratios.
        let raw = PairArgs {
            chosen_score: a.chosen_logratio.clone(),
            rejected_score: a.rejected_logratio.clone(),
            ..a.clone()
        };
        let v = self.pair_term_on_scores(kind, &raw);
        let zero = v.loss.full_like(0.0);
        PairTermValue {
            loss: v.loss,
            d_chosen_score: zero.clone(),
            d_rejected_score: zero,
            d_chosen_logratio: v.d_chosen_logratio.add(v.d_chosen_score),
            d_rejected_logratio: v.d_rejected_logratio.add(v.d_rejected_score),
        }
    }

    /// [`pair_term`](Self::pair_term) reading the scores as the module
    /// table does, whatever [`FDivergenceScores`].
    fn pair_term_on_scores<E: Elem>(&self, kind: PairedLoss, a: &PairArgs<E>) -> PairTermValue<E> {
        let b = self.beta;
        let ls = self.label_smoothing;
        let zero = a.chosen_score.full_like(0.0);
        let delta = || a.chosen_score.clone().sub(a.rejected_score.clone());
        let on_delta = |loss: E, d_delta: E| PairTermValue {
            loss,
            d_chosen_score: d_delta.clone(),
            d_rejected_score: d_delta.neg(),
            d_chosen_logratio: zero.clone(),
            d_rejected_logratio: zero.clone(),
        };
        match kind {
            PairedLoss::Sigmoid => {
                let eps = if self.smooth_sigmoid { ls } else { 0.0 };
                // β·(Δ − γ/β), as the peers write it.
                let z = delta().add_scalar(-self.target_margin / b).mul_scalar(b);
                let (l, d) = self.smoothed_logistic(z, eps);
                on_delta(l, d.mul_scalar(b))
            }
            PairedLoss::Hinge => {
                let h = delta().mul_scalar(b).neg().add_scalar(1.0);
                let active = h.gt_scalar(0.0);
                let l = h.clone().max(h.full_like(0.0));
                let d = E::select(&active, h.full_like(-b), h.full_like(0.0));
                on_delta(l, d)
            }
            PairedLoss::Ipo | PairedLoss::SigmoidNorm => {
                let d = a
                    .chosen_score
                    .clone()
                    .mul(a.inv_len_chosen.clone())
                    .sub(a.rejected_score.clone().mul(a.inv_len_rejected.clone()));
                let (l, g) = if kind == PairedLoss::Ipo {
                    let u = d.add_scalar(-1.0 / (2.0 * b));
                    (u.clone().square(), u.mul_scalar(2.0))
                } else {
                    let z = d.mul_scalar(b);
                    (
                        z.clone().log_sigmoid().neg(),
                        z.neg().sigmoid().mul_scalar(-b),
                    )
                };
                PairTermValue {
                    loss: l,
                    d_chosen_score: g.clone().mul(a.inv_len_chosen.clone()),
                    d_rejected_score: g.neg().mul(a.inv_len_rejected.clone()),
                    d_chosen_logratio: zero.clone(),
                    d_rejected_logratio: zero.clone(),
                }
            }
            PairedLoss::ExoPair => {
                let z = delta().mul_scalar(b);
                let log_pw = <f64 as Elem>::ln_1p(-ls);
                let log_pl = <f64 as Elem>::ln(ls);
                let qw = z.clone().sigmoid();
                let ql = z.clone().neg().sigmoid();
                let l = qw
                    .clone()
                    .mul(z.clone().log_sigmoid().add_scalar(-log_pw))
                    .add(
                        ql.clone()
                            .mul(z.clone().neg().log_sigmoid().add_scalar(-log_pl)),
                    );
                // d/dz = σ(z)σ(−z)(z − log(1−ε) + log ε)
                let d = qw.mul(ql).mul(z.add_scalar(log_pl - log_pw)).mul_scalar(b);
                on_delta(l, d)
            }
            PairedLoss::NcaPair => {
                let cr = a.chosen_score.clone().mul_scalar(b);
                let rr = a.rejected_score.clone().mul_scalar(b);
                let l = cr
                    .clone()
                    .log_sigmoid()
                    .neg()
                    .sub(cr.clone().neg().log_sigmoid().mul_scalar(0.5))
                    .sub(rr.clone().neg().log_sigmoid().mul_scalar(0.5));
                let dc = cr
                    .clone()
                    .neg()
                    .sigmoid()
                    .neg()
                    .add(cr.sigmoid().mul_scalar(0.5))
                    .mul_scalar(b);
                let dr = rr.sigmoid().mul_scalar(0.5 * b);
                PairTermValue {
                    loss: l,
                    d_chosen_score: dc,
                    d_rejected_score: dr,
                    d_chosen_logratio: zero.clone(),
                    d_rejected_logratio: zero.clone(),
                }
            }
            PairedLoss::Robust => {
                let z = delta().mul_scalar(b);
                let k = 1.0 / (1.0 - 2.0 * ls);
                let l = z
                    .clone()
                    .log_sigmoid()
                    .mul_scalar(-(1.0 - ls))
                    .add(z.clone().neg().log_sigmoid().mul_scalar(ls))
                    .mul_scalar(k);
                let d = z
                    .clone()
                    .neg()
                    .sigmoid()
                    .mul_scalar(-(1.0 - ls))
                    .sub(z.sigmoid().mul_scalar(ls))
                    .mul_scalar(k * b);
                on_delta(l, d)
            }
            PairedLoss::BcoPair => {
                let cr = a.chosen_score.clone().mul_scalar(b);
                let rr = a.rejected_score.clone().mul_scalar(b);
                let l = cr
                    .clone()
                    .log_sigmoid()
                    .neg()
                    .sub(rr.clone().neg().log_sigmoid());
                PairTermValue {
                    loss: l,
                    d_chosen_score: cr.neg().sigmoid().mul_scalar(-b),
                    d_rejected_score: rr.sigmoid().mul_scalar(b),
                    d_chosen_logratio: zero.clone(),
                    d_rejected_logratio: zero.clone(),
                }
            }
            PairedLoss::SppoHard => {
                let w = a.chosen_score.clone().add_scalar(-0.5 / b);
                let r = a.rejected_score.clone().add_scalar(0.5 / b);
                PairTermValue {
                    loss: w.clone().square().add(r.clone().square()),
                    d_chosen_score: w.mul_scalar(2.0),
                    d_rejected_score: r.mul_scalar(2.0),
                    d_chosen_logratio: zero.clone(),
                    d_rejected_logratio: zero.clone(),
                }
            }
            PairedLoss::Aot | PairedLoss::AotUnpaired => {
                let d = a
                    .chosen_logratio
                    .clone()
                    .sub(a.rejected_logratio.clone())
                    .mul_scalar(b);
                let (l, g) = self.smoothed_logistic(d, ls);
                let g = g.mul_scalar(b);
                PairTermValue {
                    loss: l,
                    d_chosen_score: zero.clone(),
                    d_rejected_score: zero.clone(),
                    d_chosen_logratio: g.clone(),
                    d_rejected_logratio: g.neg(),
                }
            }
            PairedLoss::ApoZero => {
                let zc = a.chosen_logratio.clone().mul_scalar(b);
                let zr = a.rejected_logratio.clone().mul_scalar(b);
                let (sc, sr) = (zc.clone().sigmoid(), zr.clone().sigmoid());
                let l = sc.clone().neg().add_scalar(1.0).add(sr.clone());
                PairTermValue {
                    loss: l,
                    d_chosen_score: zero.clone(),
                    d_rejected_score: zero.clone(),
                    d_chosen_logratio: sc.mul(zc.neg().sigmoid()).mul_scalar(-b),
                    d_rejected_logratio: sr.mul(zr.neg().sigmoid()).mul_scalar(b),
                }
            }
            PairedLoss::ApoDown => {
                let zc = a.chosen_logratio.clone().mul_scalar(b);
                let z = delta().mul_scalar(b);
                let sc = zc.clone().sigmoid();
                let sz = z.clone().sigmoid();
                let l = sc.clone().add(sz.clone().neg().add_scalar(1.0));
                let dd = sz.mul(z.neg().sigmoid()).mul_scalar(-b);
                PairTermValue {
                    loss: l,
                    d_chosen_score: dd.clone(),
                    d_rejected_score: dd.neg(),
                    d_chosen_logratio: sc.mul(zc.neg().sigmoid()).mul_scalar(b),
                    d_rejected_logratio: zero.clone(),
                }
            }
            PairedLoss::Discopop => {
                let tau = self.discopop_tau;
                let z = delta().mul_scalar(b);
                let zt = z.clone().mul_scalar(1.0 / tau);
                // log m and log(1 − m), m = σ(z/τ), in the stable forms.
                let log_m = zt.clone().log_sigmoid();
                let log_1m = zt.neg().log_sigmoid();
                let m = log_m.clone().exp();
                let one_m = log_1m.clone().exp();
                let dm = log_m
                    .clone()
                    .add(log_1m.clone())
                    .exp()
                    .mul_scalar(1.0 / tau);
                let logistic = z.clone().log_sigmoid().neg();
                // e^{−z}·m and e^{−z}·m' as one exponential each: no
                // `∞ · 0` when e^{−z} overflows while m underflows.
                let expo_m = z.clone().neg().add(log_m.clone()).exp();
                let expo_dm = z
                    .clone()
                    .neg()
                    .add(log_m)
                    .add(log_1m)
                    .exp()
                    .mul_scalar(1.0 / tau);
                let l = logistic.clone().mul(one_m.clone()).add(expo_m.clone());
                let d = z
                    .neg()
                    .sigmoid()
                    .neg()
                    .mul(one_m)
                    .sub(logistic.mul(dm))
                    .sub(expo_m)
                    .add(expo_dm)
                    .mul_scalar(b);
                let _ = m;
                on_delta(l, d)
            }
            PairedLoss::Sft => PairTermValue {
                loss: zero.clone(),
                d_chosen_score: zero.clone(),
                d_rejected_score: zero.clone(),
                d_chosen_logratio: zero.clone(),
                d_rejected_logratio: zero,
            },
        }
    }
}

/// The per-pair inputs of [`PairedConfig::pair_term`].
#[derive(Debug, Clone)]
pub struct PairArgs<E> {
    /// `sc = f(ℓc)`.
    pub chosen_score: E,
    /// `sr = f(ℓr)`.
    pub rejected_score: E,
    /// `ℓc = c − c₀` (for `Aot*`: the sorted quantity, see `pair_term`).
    pub chosen_logratio: E,
    /// `ℓr = r − r₀` (for `Aot*`: the sorted quantity).
    pub rejected_logratio: E,
    /// `1 / max(chosen length, 1)` for `Ipo`/`SigmoidNorm` (1: none).
    pub inv_len_chosen: E,
    /// `1 / max(rejected length, 1)` for `Ipo`/`SigmoidNorm` (1: none).
    pub inv_len_rejected: E,
}

/// One pair's loss and its partial derivatives (see
/// [`PairedConfig::pair_term`]).
#[derive(Debug, Clone)]
pub struct PairTermValue<E> {
    /// The loss.
    pub loss: E,
    /// `∂loss/∂sc`.
    pub d_chosen_score: E,
    /// `∂loss/∂sr`.
    pub d_rejected_score: E,
    /// `∂loss/∂ℓc` (direct, not through the score).
    pub d_chosen_logratio: E,
    /// `∂loss/∂ℓr` (direct, not through the score).
    pub d_rejected_logratio: E,
}

// ---------------------------------------------------------------------------
// Batch driver on sequence log-probabilities
// ---------------------------------------------------------------------------

/// The SFT term's inputs: chosen sequence sums of per-token log-probs and the
/// total number of chosen tokens (TRL: the shifted completion mask).
#[derive(Debug, Clone, Copy)]
pub struct SftInput<'a, F> {
    /// `Σₜ log π(tokenₜ)` per chosen sequence (plain sums, no LD weighting).
    pub chosen_logps: &'a [F],
    /// The number of tokens those sums run over, in total.
    pub tokens: F,
}

/// A batch of `B` preference pairs (sequence-level).
#[derive(Debug, Clone, Copy)]
pub struct PairBatch<'a, F> {
    /// `c`: the policy's log-probability of each chosen completion.
    pub policy_chosen: &'a [F],
    /// `r`: the policy's log-probability of each rejected completion.
    pub policy_rejected: &'a [F],
    /// `c₀`; `None` for reference-free losses (SimPO): `c₀ = 0`.
    pub reference_chosen: Option<&'a [F]>,
    /// `r₀`; `None`: `r₀ = 0`.
    pub reference_rejected: Option<&'a [F]>,
    /// Completion lengths normalising `Ipo` and `SigmoidNorm` (clamped ≥ 1).
    pub chosen_len: Option<&'a [F]>,
    /// Completion lengths of the rejected side.
    pub rejected_len: Option<&'a [F]>,
    /// Per-pair weights multiplying every term (WPO); constants.
    pub pair_weight: Option<&'a [F]>,
    /// The SFT term's inputs (required when a term is [`PairedLoss::Sft`]).
    pub sft: Option<SftInput<'a, F>>,
}

impl<'a, F: Real> PairBatch<'a, F> {
    /// Policy log-probabilities only (reference-free, no lengths, no weights).
    pub fn new(policy_chosen: &'a [F], policy_rejected: &'a [F]) -> Self {
        PairBatch {
            policy_chosen,
            policy_rejected,
            reference_chosen: None,
            reference_rejected: None,
            chosen_len: None,
            rejected_len: None,
            pair_weight: None,
            sft: None,
        }
    }
    /// Adds the reference log-probabilities.
    pub fn with_reference(mut self, chosen: &'a [F], rejected: &'a [F]) -> Self {
        self.reference_chosen = Some(chosen);
        self.reference_rejected = Some(rejected);
        self
    }
    /// Adds the completion lengths (length-normalised `Ipo`, `SigmoidNorm`).
    pub fn with_lengths(mut self, chosen: &'a [F], rejected: &'a [F]) -> Self {
        self.chosen_len = Some(chosen);
        self.rejected_len = Some(rejected);
        self
    }
    /// Adds per-pair weights.
    pub fn with_pair_weight(mut self, w: &'a [F]) -> Self {
        self.pair_weight = Some(w);
        self
    }
    /// Adds the SFT inputs.
    pub fn with_sft(mut self, sft: SftInput<'a, F>) -> Self {
        self.sft = Some(sft);
        self
    }
    /// The number of pairs.
    pub fn len(&self) -> usize {
        self.policy_chosen.len()
    }
    /// Whether there is no pair.
    pub fn is_empty(&self) -> bool {
        self.policy_chosen.is_empty()
    }

    fn check(&self) -> Result<usize, Error> {
        let b = self.policy_chosen.len();
        if b == 0 {
            return Err(Error::Empty {
                input: "policy_chosen_logps",
            });
        }
        check_len("policy_rejected_logps", self.policy_rejected.len(), b)?;
        if let Some(x) = self.reference_chosen {
            check_len("reference_chosen_logps", x.len(), b)?;
        }
        if let Some(x) = self.reference_rejected {
            check_len("reference_rejected_logps", x.len(), b)?;
        }
        if self.reference_chosen.is_some() != self.reference_rejected.is_some() {
            return Err(Error::Invalid {
                input: "reference_rejected_logps",
                rule: "give both reference log-probabilities or neither",
            });
        }
        if let Some(x) = self.chosen_len {
            check_len("chosen_len", x.len(), b)?;
        }
        if let Some(x) = self.rejected_len {
            check_len("rejected_len", x.len(), b)?;
        }
        if self.chosen_len.is_some() != self.rejected_len.is_some() {
            return Err(Error::Invalid {
                input: "rejected_len",
                rule: "give both completion lengths or neither",
            });
        }
        if let Some(x) = self.pair_weight {
            check_len("pair_weight", x.len(), b)?;
        }
        if let Some(s) = self.sft {
            check_len("sft.chosen_logps", s.chosen_logps.len(), b)?;
        }
        Ok(b)
    }

    fn logratios(&self, i: usize) -> (F, F) {
        let c0 = self.reference_chosen.map_or(F::zero(), |x| x[i]);
        let r0 = self.reference_rejected.map_or(F::zero(), |x| x[i]);
        (self.policy_chosen[i] - c0, self.policy_rejected[i] - r0)
    }

    fn inv_lens(&self, i: usize) -> (F, F) {
        match (self.chosen_len, self.rejected_len) {
            (Some(c), Some(r)) => (F::one() / c[i].max(F::one()), F::one() / r[i].max(F::one())),
            _ => (F::one(), F::one()),
        }
    }
}

/// Where the VJP of [`paired_loss`] goes, and with which cotangents.
#[derive(Debug)]
pub struct PairGrads<'a, F> {
    /// Cotangent of the (mean) loss.
    pub cotangent_loss: F,
    /// Cotangents of the per-pair losses (torchtune returns those), if any.
    pub cotangent_per_pair: Option<&'a [F]>,
    /// Receives `∂/∂c` (overwritten), `B` elements.
    pub chosen: &'a mut [F],
    /// Receives `∂/∂r` (overwritten), `B` elements.
    pub rejected: &'a mut [F],
}

impl<'a, F: Real> PairGrads<'a, F> {
    /// The gradient of `cotangent · loss`.
    pub fn of_mean(cotangent: F, chosen: &'a mut [F], rejected: &'a mut [F]) -> Self {
        PairGrads {
            cotangent_loss: cotangent,
            cotangent_per_pair: None,
            chosen,
            rejected,
        }
    }
    /// The gradient of `Σᵢ cotangentᵢ · lossᵢ` over the per-pair losses.
    pub fn of_per_pair(cotangent: &'a [F], chosen: &'a mut [F], rejected: &'a mut [F]) -> Self {
        PairGrads {
            cotangent_loss: F::zero(),
            cotangent_per_pair: Some(cotangent),
            chosen,
            rejected,
        }
    }
}

/// The batch metrics the peers log (means over the pairs).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PairedMetrics<F> {
    /// Mean implicit reward of the chosen side, `β·ℓc` (reverse KL whatever
    /// the divergence). TRL `rewards/chosen`.
    pub reward_chosen: F,
    /// Mean `β·ℓr`. TRL `rewards/rejected`.
    pub reward_rejected: F,
    /// Fraction of pairs with `β·ℓc > β·ℓr` (strict). TRL `rewards/accuracies`.
    pub accuracy: F,
    /// Mean `β·ℓc − β·ℓr`. TRL `rewards/margins`.
    pub margin: F,
    /// Mean `c`. TRL `logps/chosen`.
    pub logps_chosen: F,
    /// Mean `r`. TRL `logps/rejected`.
    pub logps_rejected: F,
}

/// What [`paired_loss`] returns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairedOutput<F> {
    /// `Σₖ wₖ · meanᵢ(ωᵢ · lossₖ,ᵢ)`.
    pub loss: F,
    /// The logged metrics.
    pub metrics: PairedMetrics<F>,
    /// The VJP with respect to *each* entry of `sft.chosen_logps` (the same
    /// for all; 0 without an SFT term or without gradients).
    pub d_sft_chosen_logps: F,
}

/// The implicit rewards of DPO-style losses, per sequence.
///
/// # Formula
/// ```text
/// rewardᵢ = β · (policyᵢ − referenceᵢ)      (reference = None: β · policyᵢ, SimPO)
/// ```
/// # Gradient
/// None: every peer detaches these rewards (they are metrics).
///
/// # Peers
/// OpenRLHF `DPOLoss` and torchtune `DPOLoss`/`IPOLoss` (β = τ)/`RSOLoss`
/// (β = γ)/`SimPOLoss` return them as `chosen_rewards`/`rejected_rewards`;
/// TRL logs their means ([`PairedMetrics`]).
///
/// # Example
/// ```
/// use posttrain_core::preference::paired::implicit_rewards;
/// let mut out = [0.0f64; 2];
/// implicit_rewards(0.5, &[-1.0, -2.0], Some(&[-1.5, -1.0]), &mut out)?;
/// assert_eq!(out, [0.25, -0.5]);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] on length disagreement.
pub fn implicit_rewards<F: Real>(
    beta: f64,
    policy: &[F],
    reference: Option<&[F]>,
    out: &mut [F],
) -> Result<(), Error> {
    check_len("out", out.len(), policy.len())?;
    if let Some(r) = reference {
        check_len("reference", r.len(), policy.len())?;
    }
    let b = F::of(beta);
    for (i, o) in out.iter_mut().enumerate() {
        *o = b * (policy[i] - reference.map_or(F::zero(), |r| r[i]));
    }
    Ok(())
}

fn nan_last<F: Real>(a: F, b: F) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

fn argsort<F: Real>(idx: &mut [usize], key: impl Fn(usize) -> F) {
    for (i, x) in idx.iter_mut().enumerate() {
        *x = i;
    }
    idx.sort_unstable_by(|&a, &b| nan_last(key(a), key(b)).then(a.cmp(&b)));
}

/// A paired preference loss over a batch: value, metrics, and VJP.
///
/// # Formula
/// ```text
/// ℓcᵢ = cᵢ − c₀ᵢ,  ℓrᵢ = rᵢ − r₀ᵢ,  scᵢ = f(ℓcᵢ),  srᵢ = f(ℓrᵢ)
/// lossᵢ = ωᵢ · Σₖ wₖ · termₖ(pair i)         (ωᵢ = pair_weight or 1)
/// loss  = (1/B) Σᵢ lossᵢ
/// sft term (every i) = −Σⱼ sft.chosen_logpsⱼ / sft.tokens   (0 when tokens = 0)
/// ```
/// `Aot` pairs the j-th smallest `cᵢ − rᵢ` with the j-th smallest
/// `c₀ᵢ − r₀ᵢ`; `AotUnpaired` the j-th smallest `ℓc` with the j-th smallest
/// `ℓr`; the j-th term is weighted by `ωⱼ`. `per_pair` (if given) receives
/// `lossᵢ`. A term of weight 0 is skipped: it contributes exactly 0 even
/// where its loss would overflow (the peers multiply, giving NaN).
///
/// # Gradient
/// With `grads`, writes `∂/∂c` and `∂/∂r` of
/// `cotangent_loss · loss + Σᵢ cotangent_per_pairᵢ · lossᵢ` (references,
/// lengths and weights are constants); the SFT part is returned in
/// [`PairedOutput::d_sft_chosen_logps`].
///
/// # Peers
/// TRL `DPOTrainer._compute_loss` after the sequence sums (see
/// [`dpo_from_logits`] for the whole step), OpenRLHF `DPOLoss` (mean) and
/// torchtune `DPOLoss`/`IPOLoss`/`RSOLoss`/`SimPOLoss` (per pair).
///
/// # Errors
/// [`Error::Empty`] for no pair or no term; [`Error::ShapeMismatch`] on
/// lengths; [`Error::Invalid`] when `SigmoidNorm` has no lengths, `Sft` no
/// [`SftInput`], or `order` is shorter than `2B` with an `Aot*` term;
/// [`PairedConfig::check_terms`]'s errors.
///
/// # Example
/// ```
/// use posttrain_core::preference::paired::*;
/// use posttrain_core::Preset;
/// // torchtune SimPO: reference-free, γ = 0.5, β = 2
/// let mut cfg = PairedConfig::preset(Preset::Torchtune, 2.0)?;
/// cfg.target_margin = 0.5;
/// let (c, r) = ([-0.4f64], [-0.9f64]);
/// let mut per_pair = [0.0];
/// let out = paired_loss(&cfg, &[LossTerm::new(PairedLoss::Sigmoid)],
///     &PairBatch::new(&c, &r), Some(&mut per_pair), None, &mut [])?;
/// let z: f64 = 2.0 * (0.5 - 0.25);
/// assert!((per_pair[0] - (1.0 + (-z).exp()).ln()).abs() < 1e-15);
/// assert_eq!(out.loss, per_pair[0]);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn paired_loss<F: Real>(
    cfg: &PairedConfig,
    terms: &[LossTerm],
    batch: &PairBatch<'_, F>,
    per_pair: Option<&mut [F]>,
    grads: Option<PairGrads<'_, F>>,
    order: &mut [usize],
) -> Result<PairedOutput<F>, Error> {
    cfg.check_terms(terms)?;
    let n = batch.check()?;
    let bf = F::of_usize(n);
    let mut per_pair = per_pair;
    if let Some(p) = per_pair.as_deref() {
        check_len("per_pair", p.len(), n)?;
    }
    let mut grads = grads;
    if let Some(g) = grads.as_ref() {
        check_len("grad chosen", g.chosen.len(), n)?;
        check_len("grad rejected", g.rejected.len(), n)?;
        if let Some(c) = g.cotangent_per_pair {
            check_len("cotangent per pair", c.len(), n)?;
        }
    }
    let sorted = terms.iter().any(|t| t.kind.is_sorted());
    if sorted && order.len() < 2 * n {
        return Err(Error::Invalid {
            input: "order",
            rule: "the aot losses need a scratch of 2·batch indices",
        });
    }
    if terms.iter().any(|t| t.kind.needs_lengths()) && batch.chosen_len.is_none() {
        return Err(Error::Invalid {
            input: "chosen_len",
            rule: "sigmoid_norm needs the completion lengths",
        });
    }
    let has_sft = terms.iter().any(|t| t.kind == PairedLoss::Sft);
    if has_sft && batch.sft.is_none() {
        return Err(Error::Invalid {
            input: "sft",
            rule: "the sft term needs the chosen token log-probabilities",
        });
    }

    // SFT: one scalar, the same for every pair.
    let (sft_value, sft_inv_tokens) = match batch.sft {
        Some(s) if has_sft && s.tokens > F::zero() => {
            let inv = F::one() / s.tokens;
            let sum: F = s.chosen_logps.iter().copied().sum();
            (-sum * inv, inv)
        }
        _ => (F::zero(), F::zero()),
    };

    let omega = |i: usize| batch.pair_weight.map_or(F::one(), |w| w[i]);
    // Upstream weight of lossᵢ in the VJP.
    let upstream = |g: &PairGrads<'_, F>, i: usize| {
        g.cotangent_loss / bf + g.cotangent_per_pair.map_or(F::zero(), |c| c[i])
    };
    if let Some(p) = per_pair.as_deref_mut() {
        p.iter_mut().for_each(|x| *x = F::zero());
    }
    if let Some(g) = grads.as_mut() {
        g.chosen.iter_mut().for_each(|x| *x = F::zero());
        g.rejected.iter_mut().for_each(|x| *x = F::zero());
    }
    let mut d_sft = F::zero();
    let mut total = F::zero();

    for t in terms {
        // A term of weight 0 contributes exactly 0 (not `0 · ∞` when its
        // loss overflows, e.g. a squared IPO margin of 1e30 in f32).
        if t.weight == 0.0 {
            continue;
        }
        let w = F::of(t.weight);
        match t.kind {
            PairedLoss::Sft => {
                for i in 0..n {
                    let li = w * omega(i) * sft_value;
                    total += li;
                    if let Some(p) = per_pair.as_deref_mut() {
                        p[i] += li;
                    }
                    if let Some(g) = grads.as_ref() {
                        d_sft -= upstream(g, i) * w * omega(i) * sft_inv_tokens;
                    }
                }
            }
            PairedLoss::Aot | PairedLoss::AotUnpaired => {
                let (oc, or) = order.split_at_mut(n);
                let or = &mut or[..n];
                if t.kind == PairedLoss::Aot {
                    argsort(oc, |i| batch.policy_chosen[i] - batch.policy_rejected[i]);
                    argsort(or, |i| {
                        batch.reference_chosen.map_or(F::zero(), |x| x[i])
                            - batch.reference_rejected.map_or(F::zero(), |x| x[i])
                    });
                } else {
                    argsort(oc, |i| batch.logratios(i).0);
                    argsort(or, |i| batch.logratios(i).1);
                }
                for j in 0..n {
                    let (pc, pr) = (oc[j], or[j]);
                    let (x, y) = if t.kind == PairedLoss::Aot {
                        let c0 = |i: usize| batch.reference_chosen.map_or(F::zero(), |x| x[i]);
                        let r0 = |i: usize| batch.reference_rejected.map_or(F::zero(), |x| x[i]);
                        (
                            batch.policy_chosen[pc] - batch.policy_rejected[pc],
                            c0(pr) - r0(pr),
                        )
                    } else {
                        (batch.logratios(pc).0, batch.logratios(pr).1)
                    };
                    let args = PairArgs {
                        chosen_score: F::zero(),
                        rejected_score: F::zero(),
                        chosen_logratio: x,
                        rejected_logratio: y,
                        inv_len_chosen: F::one(),
                        inv_len_rejected: F::one(),
                    };
                    let v = cfg.pair_term(t.kind, &args);
                    let lj = w * omega(j) * v.loss;
                    total += lj;
                    if let Some(p) = per_pair.as_deref_mut() {
                        p[j] += lj;
                    }
                    if let Some(g) = grads.as_mut() {
                        let u = upstream(g, j) * w * omega(j);
                        let dx = u * v.d_chosen_logratio;
                        if t.kind == PairedLoss::Aot {
                            g.chosen[pc] += dx;
                            g.rejected[pc] -= dx;
                        } else {
                            g.chosen[pc] += dx;
                            g.rejected[pr] += u * v.d_rejected_logratio;
                        }
                    }
                }
            }
            kind => {
                for i in 0..n {
                    let (lc, lr) = batch.logratios(i);
                    let (sc, dsc) = cfg.score(lc);
                    let (sr, dsr) = cfg.score(lr);
                    let (ic, ir) = batch.inv_lens(i);
                    let args = PairArgs {
                        chosen_score: sc,
                        rejected_score: sr,
                        chosen_logratio: lc,
                        rejected_logratio: lr,
                        inv_len_chosen: ic,
                        inv_len_rejected: ir,
                    };
                    let v = cfg.pair_term(kind, &args);
                    let li = w * omega(i) * v.loss;
                    total += li;
                    if let Some(p) = per_pair.as_deref_mut() {
                        p[i] += li;
                    }
                    if let Some(g) = grads.as_mut() {
                        let u = upstream(g, i) * w * omega(i);
                        // A zero `∂/∂score` times an overflowed `∂score/∂x`
                        // (forward KL `e^{−x}` beyond the float range) is 0.
                        let chain = |d: F, ds: F| if d == F::zero() { d } else { d * ds };
                        g.chosen[i] += u * (v.d_chosen_logratio + chain(v.d_chosen_score, dsc));
                        g.rejected[i] +=
                            u * (v.d_rejected_logratio + chain(v.d_rejected_score, dsr));
                    }
                }
            }
        }
    }

    // Metrics: implicit rewards are β × reverse-KL log-ratios.
    let beta = F::of(cfg.beta);
    let mut m = PairedMetrics::default();
    for i in 0..n {
        let (lc, lr) = batch.logratios(i);
        let (rc, rr) = (beta * lc, beta * lr);
        m.reward_chosen += rc;
        m.reward_rejected += rr;
        m.margin += rc - rr;
        if rc > rr {
            m.accuracy += F::one();
        }
        m.logps_chosen += batch.policy_chosen[i];
        m.logps_rejected += batch.policy_rejected[i];
    }
    m.reward_chosen /= bf;
    m.reward_rejected /= bf;
    m.margin /= bf;
    m.accuracy /= bf;
    m.logps_chosen /= bf;
    m.logps_rejected /= bf;

    Ok(PairedOutput {
        loss: total / bf,
        metrics: m,
        d_sft_chosen_logps: d_sft,
    })
}

// ---------------------------------------------------------------------------
// TRL's full step from logits
// ---------------------------------------------------------------------------

/// The reference side of [`dpo_from_logits`].
#[derive(Debug, Clone, Copy)]
pub enum Reference<'a, F> {
    /// Precomputed sequence log-probabilities (`B` chosen, `B` rejected).
    Precomputed {
        /// `c₀`.
        chosen: &'a [F],
        /// `r₀`.
        rejected: &'a [F],
    },
    /// The reference model's logits, `[2B, T, V]` like the policy's.
    Logits(&'a [F]),
}

/// TRL's batch for [`dpo_from_logits`]: rows `[0, B)` chosen, `[B, 2B)`
/// rejected, each `T` positions.
#[derive(Debug, Clone, Copy)]
pub struct LogitsPairBatch<'a, F> {
    /// `[2B, T]`.
    pub dims: Dims,
    /// Vocabulary size `V`.
    pub vocab: usize,
    /// Policy logits, `[2B, T, V]` row-major.
    pub logits: &'a [F],
    /// Token ids, `[2B, T]`.
    pub input_ids: &'a [i64],
    /// Which positions belong to the completion, `[2B, T]` (unshifted).
    pub completion_mask: &'a [bool],
    /// The reference.
    pub reference: Reference<'a, F>,
    /// LD-DPO: tokens beyond the shorter completion of the pair count with
    /// weight `ld_alpha` (TRL `ld_alpha`; `None`: plain sums).
    pub ld_alpha: Option<f64>,
    /// WPO: weight each pair by its completions' length-normalised
    /// probability under the sampling-aligned policy (TRL `use_weighting`).
    pub use_weighting: bool,
}

/// TRL's logged token-level metrics of [`dpo_from_logits`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LogitsMetrics<F> {
    /// Mean entropy of the policy over completion tokens (TRL `entropy`).
    pub entropy: F,
    /// Mean over chosen completion tokens of the vocabulary-mean logit
    /// (TRL `logits/chosen`).
    pub logits_chosen: F,
    /// Same for the rejected side (TRL `logits/rejected`).
    pub logits_rejected: F,
    /// Fraction of chosen completion tokens whose argmax is the label
    /// (TRL `mean_token_accuracy`).
    pub token_accuracy: F,
}

/// The `F` scratch length [`dpo_from_logits`] needs for `dims = [2B, T]`:
/// one value per token plus five per row (`2B·T + 5·2B`).
pub const fn dpo_from_logits_scratch_len(dims: Dims) -> usize {
    dims.len() + 5 * dims.batch
}

/// TRL's DPO step from logits: loss, metrics, and VJP with respect to the
/// policy logits.
///
/// # Formula
/// ```text
/// log pₜ = log softmax(z_{r,t})[id_{r,t+1}]   for completion_mask[r, t+1]
/// seqᵣ  = Σₜ log pₜ                            (LD-DPO: ×1 on the first
///         min(len_c, len_r) completion tokens of the pair, ×ld_alpha after)
/// ωᵢ    = exp(mean_t(log pₜ − (lse(2z) − 2 lse(z))))  chosen × rejected (WPO)
/// ```
/// then [`paired_loss`] with lengths = unshifted completion-mask row sums
/// and the SFT term over the shifted chosen mask. The reference sums are
/// the same function of the reference logits (or precomputed).
///
/// # Gradient
/// `∂/∂z_{r,t,k} = g_{r,t} (1[k = id] − softmax(z)ₖ)` with `g` the VJP of the
/// loss through the (LD-weighted) sums and the SFT term, at completion
/// positions only; the last position and masked positions get 0. WPO
/// weights, entropy and the metrics carry no gradient.
///
/// # Peers
/// TRL `DPOTrainer._compute_loss` (`precompute_ref_log_probs` ↔
/// [`Reference::Precomputed`]).
///
/// # Errors
/// Shapes ([`Error::ShapeMismatch`]), an odd or empty batch, `scratch`
/// shorter than [`dpo_from_logits_scratch_len`] or `order` shorter than `2B`
/// ([`Error::Invalid`]), a completion token id outside `[0, V)`, and the
/// errors of [`paired_loss`].
///
/// # Example
/// ```
/// use posttrain_core::preference::paired::*;
/// use posttrain_core::{Dims, Preset};
/// let dims = Dims::new(2, 3); // B = 1 pair, T = 3, V = 2
/// let logits = [0.1f64, 0.2, 0.3, -0.1, 0.0, 0.0, 0.5, 0.1, -0.2, 0.4, 0.0, 0.0];
/// let ids = [0i64, 1, 0, 0, 0, 1];
/// let cmask = [false, true, true, false, true, true];
/// let (c0, r0) = ([-1.5f64], [-1.4f64]);
/// let batch = LogitsPairBatch { dims, vocab: 2, logits: &logits, input_ids: &ids,
///     completion_mask: &cmask, reference: Reference::Precomputed { chosen: &c0, rejected: &r0 },
///     ld_alpha: None, use_weighting: false };
/// let cfg = PairedConfig::preset(Preset::Trl, 0.1)?;
/// let mut scratch = vec![0.0; dpo_from_logits_scratch_len(dims)];
/// let mut order = [0usize; 2];
/// let mut grad = [0.0; 12];
/// let (out, _metrics) = dpo_from_logits(&cfg, &[LossTerm::new(PairedLoss::Sigmoid)], &batch,
///     Some((1.0, &mut grad[..])), &mut scratch, &mut order)?;
/// assert!(out.loss > 0.0 && grad[4..6] == [0.0, 0.0]);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn dpo_from_logits<F: Real>(
    cfg: &PairedConfig,
    terms: &[LossTerm],
    batch: &LogitsPairBatch<'_, F>,
    grad: Option<(F, &mut [F])>,
    scratch: &mut [F],
    order: &mut [usize],
) -> Result<(PairedOutput<F>, LogitsMetrics<F>), Error> {
    let dims = batch.dims;
    let (rows, t_len, v) = (dims.batch, dims.seq, batch.vocab);
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
    check_len("logits", batch.logits.len(), dims.len() * v)?;
    check_len("input_ids", batch.input_ids.len(), dims.len())?;
    check_len("completion_mask", batch.completion_mask.len(), dims.len())?;
    match batch.reference {
        Reference::Precomputed { chosen, rejected } => {
            check_len("ref_chosen_logps", chosen.len(), n)?;
            check_len("ref_rejected_logps", rejected.len(), n)?;
        }
        Reference::Logits(z) => check_len("ref_logits", z.len(), dims.len() * v)?,
    }
    if let Some(a) = batch.ld_alpha {
        check_param(a.is_finite(), "ld_alpha", a, "must be finite")?;
    }
    if scratch.len() < dpo_from_logits_scratch_len(dims) {
        return Err(Error::Invalid {
            input: "scratch",
            rule: "needs dpo_from_logits_scratch_len(dims) elements",
        });
    }
    let mut grad = grad;
    if let Some((_, g)) = grad.as_ref() {
        check_len("grad logits", g.len(), dims.len() * v)?;
    }

    let (token_lp, rest) = scratch.split_at_mut(dims.len());
    let (pol, rest) = rest.split_at_mut(rows);
    let (refs, rest) = rest.split_at_mut(rows);
    let (lens, rest) = rest.split_at_mut(rows);
    let (wpo, rest) = rest.split_at_mut(n);
    let (plain, _) = rest.split_at_mut(n);

    let valid = |r: usize, t: usize| t + 1 < t_len && batch.completion_mask[r * t_len + t + 1];
    let shifted_len = |r: usize| (0..t_len).filter(|&t| valid(r, t)).count();
    // LD-DPO: a pair's shared length is its shorter completion.
    let shared_len = |r: usize| shifted_len(r % n).min(shifted_len(r % n + n));
    // LD-DPO per-token weight of the `pos`-th completion token (1-based).
    let token_weight = |pos: usize, shared: usize| -> F {
        match batch.ld_alpha {
            Some(a) if pos > shared => F::of(a),
            _ => F::one(),
        }
    };

    let label = |r: usize, t: usize| batch.input_ids[r * t_len + t + 1];
    let token_logp = |z: &[F], r: usize, t: usize| -> Result<F, Error> {
        let at = (r * t_len + t) * v;
        let mut out = [F::zero()];
        selective_log_softmax(&z[at..at + v], 1, v, &[label(r, t)], &mut out, None)?;
        Ok(out[0])
    };

    // Policy per-token log-probs and sequence sums.
    let mut tokens_chosen = 0usize;
    for r in 0..rows {
        let mut pos = 0usize;
        let shared = if batch.ld_alpha.is_some() {
            shared_len(r)
        } else {
            0
        };
        let (mut seq, mut sum) = (F::zero(), F::zero());
        for t in 0..t_len {
            let i = r * t_len + t;
            token_lp[i] = F::zero();
            if !valid(r, t) {
                continue;
            }
            pos += 1;
            let lp = token_logp(batch.logits, r, t)?;
            token_lp[i] = lp;
            seq += token_weight(pos, shared) * lp;
            sum += lp;
        }
        pol[r] = seq;
        if r < n {
            plain[r] = sum;
            tokens_chosen += pos;
        }
        lens[r] = F::of_usize(
            (0..t_len)
                .filter(|&t| batch.completion_mask[r * t_len + t])
                .count(),
        );
    }
    // Reference sums.
    match batch.reference {
        Reference::Precomputed { chosen, rejected } => {
            refs[..n].copy_from_slice(chosen);
            refs[n..].copy_from_slice(rejected);
        }
        Reference::Logits(z) => {
            for (r, out) in refs.iter_mut().enumerate() {
                let mut pos = 0usize;
                let shared = if batch.ld_alpha.is_some() {
                    shared_len(r)
                } else {
                    0
                };
                let mut seq = F::zero();
                for t in 0..t_len {
                    if valid(r, t) {
                        pos += 1;
                        seq += token_weight(pos, shared) * token_logp(z, r, t)?;
                    }
                }
                *out = seq;
            }
        }
    }
    // WPO weights (no gradient).
    if batch.use_weighting {
        for (i, w) in wpo.iter_mut().enumerate() {
            *w = F::one();
            for r in [i, i + n] {
                let mut acc = F::zero();
                let mut count = 0usize;
                for t in 0..t_len {
                    if !valid(r, t) {
                        continue;
                    }
                    count += 1;
                    let at = (r * t_len + t) * v;
                    acc += token_lp[r * t_len + t] - log_self_normaliser(&batch.logits[at..at + v]);
                }
                let len = F::of_usize(count.max(1));
                *w *= (acc / len).exp();
            }
        }
    }

    let (pc, pr) = pol.split_at(n);
    let (rc, rr) = refs.split_at(n);
    let (lc, lr) = lens.split_at(n);
    let mut pb = PairBatch::new(pc, pr)
        .with_reference(rc, rr)
        .with_lengths(lc, lr)
        .with_sft(SftInput {
            chosen_logps: plain,
            tokens: F::of_usize(tokens_chosen),
        });
    if batch.use_weighting {
        pb = pb.with_pair_weight(wpo);
    }

    // The 2B sequence gradients are staged in the first 2B elements of the
    // logits gradient, then moved to `pol` (whose values `paired_loss` has
    // consumed) before the per-token VJP overwrites the whole buffer.
    let out = match grad.as_mut() {
        None => paired_loss(cfg, terms, &pb, None, None, order)?,
        Some((cot, g)) => {
            let (dc, rest) = g.split_at_mut(n);
            let (dr, _) = rest.split_at_mut(n);
            let out = paired_loss(
                cfg,
                terms,
                &pb,
                None,
                Some(PairGrads::of_mean(*cot, dc, dr)),
                order,
            )?;
            pol.copy_from_slice(&g[..rows]);
            out
        }
    };
    if let Some((_, g)) = grad.as_mut() {
        for (r, &d_row) in pol.iter().enumerate() {
            let mut pos = 0usize;
            let shared = if batch.ld_alpha.is_some() {
                shared_len(r)
            } else {
                0
            };
            for t in 0..t_len {
                let at = (r * t_len + t) * v;
                let gr = &mut g[at..at + v];
                if !valid(r, t) {
                    gr.iter_mut().for_each(|x| *x = F::zero());
                    continue;
                }
                pos += 1;
                let mut c = d_row * token_weight(pos, shared);
                if r < n {
                    c += out.d_sft_chosen_logps;
                }
                let mut o = [F::zero()];
                selective_log_softmax(
                    &batch.logits[at..at + v],
                    1,
                    v,
                    &[label(r, t)],
                    &mut o,
                    Some((&[c], gr)),
                )?;
            }
        }
    }

    // Logged token metrics (no gradient).
    let mut m = LogitsMetrics::default();
    let (mut ent_sum, mut ent_n) = (F::zero(), 0usize);
    let (mut lg_c, mut n_c, mut lg_r, mut n_r) = (F::zero(), 0usize, F::zero(), 0usize);
    let mut correct = 0usize;
    for r in 0..rows {
        for t in 0..t_len {
            if !valid(r, t) {
                continue;
            }
            let at = (r * t_len + t) * v;
            let z = &batch.logits[at..at + v];
            let mut e = [F::zero()];
            entropy_from_logits(z, 1, v, &mut e, None)?;
            ent_sum += e[0];
            ent_n += 1;
            let mean: F = z.iter().copied().sum::<F>() / F::of_usize(v);
            if r < n {
                lg_c += mean;
                n_c += 1;
                let mut best = 0usize;
                for (k, &zk) in z.iter().enumerate() {
                    if zk > z[best] {
                        best = k;
                    }
                }
                if best as i64 == label(r, t) {
                    correct += 1;
                }
            } else {
                lg_r += mean;
                n_r += 1;
            }
        }
    }
    let ratio = |s: F, k: usize| if k > 0 { s / F::of_usize(k) } else { F::zero() };
    m.entropy = ratio(ent_sum, ent_n);
    m.logits_chosen = ratio(lg_c, n_c);
    m.logits_rejected = ratio(lg_r, n_r);
    m.token_accuracy = ratio(F::of_usize(correct), n_c);
    Ok((out, m))
}

/// `lse(2z) − 2·lse(z) = ln Σ e^{2(z−m)} − 2 ln Σ e^{z−m}` (WPO's
/// normaliser), stable for any finite logits.
fn log_self_normaliser<F: Real>(z: &[F]) -> F {
    let (m, _) = row_max_lse(z);
    let (mut s1, mut s2) = (F::zero(), F::zero());
    for &zk in z {
        let e = (zk - m).exp();
        s1 += e;
        s2 += e * e;
    }
    s2.ln() - F::of(2.0) * s1.ln()
}

// ---------------------------------------------------------------------------
// Reward-model pairwise loss
// ---------------------------------------------------------------------------

/// What [`pairwise_reward_loss`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RewardOutput<F> {
    /// `mean(softplus(−(rc − rr − m))) + κ·mean((rc + rr)²)`.
    pub loss: F,
    /// Smallest reward over both sides (TRL `min_reward`).
    pub min_reward: F,
    /// Mean reward over both sides (TRL `mean_reward`).
    pub mean_reward: F,
    /// Largest reward over both sides (TRL `max_reward`).
    pub max_reward: F,
    /// Fraction of pairs with `rc > rr` (strict; TRL `accuracy`).
    pub accuracy: F,
    /// `mean(rc − rr)`, margins not subtracted (TRL `margin`).
    pub margin: F,
}

/// One pair's terms of [`pairwise_reward_loss`] and their partials.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RewardTerm<E> {
    /// `−log σ(x) = softplus(−x)`, `x = rc − rr − m`.
    pub logistic: E,
    /// `(rc + rr)²` (the centering term before `κ`).
    pub square: E,
    /// `∂(logistic + κ·square)/∂rc = −σ(−x) + 2κ(rc + rr)`.
    pub d_chosen: E,
    /// `∂(logistic + κ·square)/∂rr = σ(−x) + 2κ(rc + rr)`.
    pub d_rejected: E,
}

/// The per-pair kernel of [`pairwise_reward_loss`], written once over
/// [`Elem`] (slices and tensors).
///
/// # Formula
/// ```text
/// x = rc − rr − m,  logistic = softplus(−x),  square = (rc + rr)²
/// ```
/// (`m = 0` without a margin; `kappa = 0` without centering).
///
/// # Gradient
/// `d_chosen = 2κ(rc + rr) − σ(−x)`, `d_rejected = 2κ(rc + rr) + σ(−x)`.
///
/// # Peers
/// TRL `RewardTrainer.compute_loss`, OpenRLHF `PairWiseLoss`/`LogExpLoss`.
pub fn pairwise_reward_term<E: Elem>(
    chosen: E,
    rejected: E,
    margin: Option<E>,
    kappa: f64,
) -> RewardTerm<E> {
    let diff = chosen.clone().sub(rejected.clone());
    let x = match margin {
        Some(m) => diff.sub(m),
        None => diff,
    };
    let s = chosen.add(rejected);
    let k2 = s.clone().mul_scalar(2.0 * kappa);
    let sig = x.clone().neg().sigmoid();
    RewardTerm {
        logistic: ElemExt::softplus(x.neg()),
        square: s.clone().mul(s),
        d_chosen: k2.clone().sub(sig.clone()),
        d_rejected: k2.add(sig),
    }
}

/// The Bradley–Terry pairwise loss of a reward model, with an optional
/// per-pair margin and reward centering.
///
/// # Formula
/// ```text
/// loss = (1/B) Σᵢ −log σ(rcᵢ − rrᵢ − mᵢ) + κ · (1/B) Σᵢ (rcᵢ + rrᵢ)²
/// ```
/// (`mᵢ = 0` without margins, no centering term with `centering = None`).
/// Known limit: the centering term squares the rewards, so with `κ ≠ 0` and
/// `|rc + rr|` above `√MAX` (≈ 1.3e154 in `f64`, ≈ 1.8e19 in `f32`) the true
/// value exceeds the float range and the loss is +inf (as in the peers).
/// `−log σ(x) = softplus(−x) = log(1 + e^{−x})`, so OpenRLHF's `LogExpLoss`
/// is this loss without margin.
///
/// # Gradient
/// With `grads = Some((c, d_chosen, d_rejected))`:
/// `∂/∂rcᵢ = c(−σ(−xᵢ) + 2κ(rcᵢ + rrᵢ))/B`,
/// `∂/∂rrᵢ = c(σ(−xᵢ) + 2κ(rcᵢ + rrᵢ))/B`; margins are constants.
///
/// # Peers
/// TRL `RewardTrainer.compute_loss` (`center_rewards_coefficient` = κ;
/// chosen rewards are the first half of the logits), OpenRLHF
/// `PairWiseLoss` and `LogExpLoss`.
///
/// # Errors
/// [`Error::Empty`] for no pair, [`Error::ShapeMismatch`] on lengths,
/// [`Error::OutOfRange`] for a non-finite κ.
///
/// # Example
/// ```
/// use posttrain_core::preference::paired::pairwise_reward_loss;
/// let out = pairwise_reward_loss(&[1.0f64], &[0.0], None, None, None)?;
/// assert!((out.loss - (1.0 + (-1.0f64).exp()).ln()).abs() < 1e-15);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn pairwise_reward_loss<F: Real>(
    chosen: &[F],
    rejected: &[F],
    margin: Option<&[F]>,
    centering: Option<f64>,
    grads: Option<(F, &mut [F], &mut [F])>,
) -> Result<RewardOutput<F>, Error> {
    let n = chosen.len();
    if n == 0 {
        return Err(Error::Empty {
            input: "chosen_reward",
        });
    }
    check_len("reject_reward", rejected.len(), n)?;
    if let Some(m) = margin {
        check_len("margin", m.len(), n)?;
    }
    if let Some(k) = centering {
        check_param(
            k.is_finite(),
            "center_rewards_coefficient",
            k,
            "must be finite",
        )?;
    }
    let mut grads = grads;
    if let Some((_, dc, dr)) = grads.as_ref() {
        check_len("grad chosen", dc.len(), n)?;
        check_len("grad rejected", dr.len(), n)?;
    }
    let bf = F::of_usize(n);
    let mut out = RewardOutput {
        min_reward: chosen[0],
        max_reward: chosen[0],
        ..RewardOutput::default()
    };
    let (mut bt, mut center) = (F::zero(), F::zero());
    for i in 0..n {
        let (c, r) = (chosen[i], rejected[i]);
        let t = pairwise_reward_term(c, r, margin.map(|m| m[i]), centering.unwrap_or(0.0));
        bt += t.logistic;
        if centering.is_some() {
            center += t.square;
        }
        out.min_reward = out.min_reward.min(c).min(r);
        out.max_reward = out.max_reward.max(c).max(r);
        out.mean_reward += c + r;
        if c > r {
            out.accuracy += F::one();
        }
        out.margin += c - r;
        if let Some((cot, dc, dr)) = grads.as_mut() {
            dc[i] = *cot * t.d_chosen / bf;
            dr[i] = *cot * t.d_rejected / bf;
        }
    }
    out.loss = bt / bf;
    if let Some(k) = centering {
        out.loss += F::of(k) * (center / bf);
    }
    out.mean_reward /= F::of_usize(2 * n);
    out.accuracy /= bf;
    out.margin /= bf;
    Ok(out)
}
