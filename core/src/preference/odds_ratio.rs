//! Reference-free preference losses with an NLL term: CPO (and its
//! AlphaPO/SimPO variants) and ORPO's odds-ratio loss — plus the shifted
//! sequence log-probabilities from logits that both start from.
//!
//! # Overview
//!
//! Neither loss needs a reference model: the preference term compares the
//! policy's own log-probabilities of the chosen and rejected completions, and
//! a supervised NLL term on the chosen completion keeps the policy anchored.
//!
//! | loss | preference term (per pair) | sequence log-prob | NLL term | peer |
//! |---|---|---|---|---|
//! | CPO `sigmoid` | `−(1−ε) log σ(βh) − ε log σ(−βh)` | sum | chosen labels | TRL `CPOTrainer` |
//! | CPO `hinge` | `relu(1 − βh)` | sum | chosen labels | TRL `CPOTrainer` |
//! | CPO `ipo` | `(h − 1/(2β))²` | per-token mean | chosen labels | TRL `CPOTrainer` |
//! | CPO `simpo` | sigmoid on `h − γ/β` | per-token mean | chosen labels | TRL `CPOTrainer` |
//! | ORPO | `β · log σ(log_odds)` (subtracted) | per-token mean | prompt + response | TRL `ORPOTrainer` |
//!
//! with the margin `h = r(π_c) − r(π_r)`, where `r(ℓ) = ℓ` (α = 0) or the
//! AlphaPO reward `r(ℓ) = (1 − e^{−αℓ})/α`, and
//! `log_odds = (ℓ_c − ℓ_r) − (log(1 − e^{ℓ_c}) − log(1 − e^{ℓ_r}))`.
//!
//! The per-pair formulas are [`cpo_pair_loss`], [`alphapo_reward`] and
//! [`orpo_log_odds`] (generic over [`Elem`]); [`cpo_loss`] and
//! [`odds_ratio_loss`] are the slice drivers; [`shifted_sequence_logps`] and
//! [`shifted_mean_nll`] turn `[batch, seq, vocab]` logits into the sequence
//! log-probabilities and the NLL term, with their VJPs.
//!
//! # Example
//!
//! ```
//! use posttrain_core::preference::odds_ratio::{cpo_loss, CpoConfig, CpoLossType};
//! let cfg = CpoConfig::new(CpoLossType::Sigmoid, 0.1, 0.0, 0.5, 0.0, 1.0)?;
//! let (c, r) = ([-3.0f64, -2.0], [-4.0f64, -1.0]);
//! let (mut l, mut cr, mut rr) = ([0.0; 2], [0.0; 2], [0.0; 2]);
//! let (mut dc, mut dr) = ([0.0; 2], [0.0; 2]);
//! cpo_loss(&cfg, &c, &r, &mut l, &mut cr, &mut rr, Some((&[1.0, 1.0], &mut dc, &mut dr)))?;
//! assert!(l[0] < l[1]);          // a larger margin gives a smaller loss
//! assert!(dc[0] < 0.0 && dr[0] > 0.0);
//! # Ok::<(), posttrain_core::Error>(())
//! ```

use crate::elem::{Elem, ElemExt, MaskElem, Real};
use crate::error::{check_len, check_param, Error};
use crate::logits::selective_log_softmax;
use crate::preset::Preset;
use crate::shape::Dims;

/// The CPO preference term (`loss_type` in TRL's `CPOConfig`); see
/// [`cpo_pair_loss`] for the formulas.
///
/// # Peers
///
/// TRL `CPOTrainer` (`sigmoid`, `hinge`, `ipo`, `simpo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum CpoLossType {
    /// Label-smoothed logistic loss on `β·h` (CPO paper eq. 3).
    Sigmoid,
    /// `relu(1 − β·h)`.
    Hinge,
    /// IPO's squared loss `(h − 1/(2β))²` on per-token average log-probs.
    Ipo,
    /// SimPO: the sigmoid loss on `h − γ/β`, per-token average log-probs.
    Simpo,
}

impl CpoLossType {
    /// Whether the loss uses per-token average log-probabilities (`ipo`,
    /// `simpo`) rather than their sum.
    pub fn uses_average_log_prob(self) -> bool {
        matches!(self, CpoLossType::Ipo | CpoLossType::Simpo)
    }
}

impl core::str::FromStr for CpoLossType {
    type Err = Error;
    /// Parses TRL's names `sigmoid`, `hinge`, `ipo`, `simpo`.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "sigmoid" => Ok(CpoLossType::Sigmoid),
            "hinge" => Ok(CpoLossType::Hinge),
            "ipo" => Ok(CpoLossType::Ipo),
            "simpo" => Ok(CpoLossType::Simpo),
            _ => Err(Error::unknown_option(
                "CPO loss type",
                s,
                "sigmoid, hinge, ipo, simpo",
            )),
        }
    }
}

/// Configuration of the CPO loss, validated by [`CpoConfig::new`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CpoConfig {
    /// The preference term.
    pub loss_type: CpoLossType,
    /// Temperature `β > 0`.
    pub beta: f64,
    /// Label smoothing `ε ∈ [0, 0.5]` of the sigmoid/simpo terms.
    pub label_smoothing: f64,
    /// SimPO target margin `γ` (used by `simpo` only).
    pub simpo_gamma: f64,
    /// AlphaPO exponent `α` (0 = plain log-probabilities).
    pub alpha: f64,
    /// Weight `≥ 0` of the chosen NLL term in the batch loss.
    pub cpo_alpha: f64,
}

impl CpoConfig {
    /// Validates and builds a configuration.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] unless `β > 0`, `0 ≤ ε ≤ 0.5`, `cpo_alpha ≥ 0`
    /// and `simpo_gamma`, `alpha` are finite.
    pub fn new(
        loss_type: CpoLossType,
        beta: f64,
        label_smoothing: f64,
        simpo_gamma: f64,
        alpha: f64,
        cpo_alpha: f64,
    ) -> Result<Self, Error> {
        check_param(
            beta > 0.0 && beta.is_finite(),
            "beta",
            beta,
            "must be finite and > 0",
        )?;
        check_param(
            (0.0..=0.5).contains(&label_smoothing),
            "label_smoothing",
            label_smoothing,
            "must lie in [0, 0.5]",
        )?;
        check_param(
            simpo_gamma.is_finite(),
            "simpo_gamma",
            simpo_gamma,
            "must be finite",
        )?;
        check_param(alpha.is_finite(), "alpha", alpha, "must be finite")?;
        check_param(
            cpo_alpha >= 0.0 && cpo_alpha.is_finite(),
            "cpo_alpha",
            cpo_alpha,
            "must be finite and ≥ 0",
        )?;
        Ok(CpoConfig {
            loss_type,
            beta,
            label_smoothing,
            simpo_gamma,
            alpha,
            cpo_alpha,
        })
    }

    /// The peer's defaults: TRL `CPOConfig` (`sigmoid`, β = 0.1, ε = 0,
    /// γ = 0.5, α = 0, `cpo_alpha` = 1). Every preset gives TRL's defaults
    /// (only TRL implements CPO).
    pub fn preset(_preset: Preset) -> Self {
        CpoConfig {
            loss_type: CpoLossType::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            alpha: 0.0,
            cpo_alpha: 1.0,
        }
    }
}

/// A per-pair loss value and its derivative with respect to the margin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MarginTerm<E> {
    /// The loss.
    pub loss: E,
    /// `∂loss/∂h`.
    pub dmargin: E,
}

/// The AlphaPO reward of a sequence log-probability and its derivative.
///
/// # Formula
///
/// ```text
/// r(ℓ) = ℓ                      if α = 0
/// r(ℓ) = (1 − e^{−α·ℓ}) / α     otherwise   (= (1 − p^{−α})/α, p = e^ℓ)
/// ```
///
/// # Gradient
///
/// `dr/dℓ = 1` (α = 0) or `e^{−α·ℓ}`. Returned as `(r, dr/dℓ)`.
///
/// Evaluated as `−expm1(u)/α` with `u = −α·ℓ` for `|u| > 1/2`, and as
/// `ℓ · expm1(u)/u` (→ `ℓ` as `u → 0`) closer to 0, so a tiny `α` keeps the
/// reward `≈ ℓ` instead of cancelling to 0. For `u` beyond `ln(MAX)`
/// (`α·(−ℓ) > ≈709` in `f64`, `≈88` in `f32`) the true reward and
/// derivative exceed the float range: ∓inf.
///
/// # Peers
///
/// TRL `CPOTrainer.cpo_loss` (`alpha`). TRL evaluates `exp(ℓ).pow(−α)`,
/// which overflows to ±inf for very negative `ℓ` where `e^{−αℓ}` does not.
pub fn alphapo_reward<E: Elem>(logp: E, alpha: f64) -> (E, E) {
    if alpha == 0.0 {
        let one = logp.full_like(1.0);
        (logp, one)
    } else {
        let u = logp.clone().mul_scalar(-alpha);
        let e = u.clone().exp();
        let em1 = exp_m1(u.clone());
        let far = u.clone().abs().gt_scalar(0.5);
        let is_zero = u.ge_scalar(0.0).and(u.le_scalar(0.0));
        let r_far = em1.clone().mul_scalar(-1.0 / alpha);
        // expm1(u)/u, exactly 1 at u = 0.
        let ratio = E::select(&is_zero, u.full_like(1.0), em1.div(u.clone()));
        let r_near = logp.mul(ratio);
        (E::select(&far, r_far, r_near), e)
    }
}

/// The CPO preference term of one pair, from the margin `h = r_c − r_r`.
///
/// # Formula
///
/// ```text
/// sigmoid: −(1−ε)·log σ(β·h) − ε·log σ(−β·h)
/// simpo:   sigmoid on h − γ/β
/// hinge:   relu(1 − β·h)
/// ipo:     (h − 1/(2β))²
/// ```
///
/// These are the same formulas as DPO's `sigmoid`, `hinge`, `ipo` and
/// torchtune's SimPO with the DPO log-ratio margin replaced by `h`.
///
/// # Gradient
///
/// ```text
/// sigmoid/simpo: β·(ε·σ(β·h') − (1−ε)·σ(−β·h'))
/// hinge:         −β where 1 − β·h > 0, else 0
/// ipo:           2·(h − 1/(2β))
/// ```
///
/// # Peers
///
/// TRL `CPOTrainer.cpo_loss`.
pub fn cpo_pair_loss<E: Elem>(cfg: &CpoConfig, margin: E) -> MarginTerm<E> {
    let beta = cfg.beta;
    match cfg.loss_type {
        CpoLossType::Sigmoid | CpoLossType::Simpo => {
            let h = if cfg.loss_type == CpoLossType::Simpo {
                margin.add_scalar(-cfg.simpo_gamma / beta)
            } else {
                margin
            };
            let z = h.mul_scalar(beta);
            let eps = cfg.label_smoothing;
            let ls_pos = z.clone().log_sigmoid();
            let ls_neg = z.neg().log_sigmoid();
            let loss = ls_pos
                .clone()
                .mul_scalar(-(1.0 - eps))
                .sub(ls_neg.clone().mul_scalar(eps));
            // σ(z) = exp(log σ(z)), σ(−z) = exp(log σ(−z)).
            let dmargin = ls_pos
                .exp()
                .mul_scalar(eps)
                .sub(ls_neg.exp().mul_scalar(1.0 - eps))
                .mul_scalar(beta);
            MarginTerm { loss, dmargin }
        }
        CpoLossType::Hinge => {
            let u = margin.mul_scalar(-beta).add_scalar(1.0);
            let active = u.gt_scalar(0.0);
            let loss = E::select(&active, u.clone(), u.full_like(0.0));
            let dmargin = E::select(&active, u.full_like(-beta), u.full_like(0.0));
            MarginTerm { loss, dmargin }
        }
        CpoLossType::Ipo => {
            let d = margin.add_scalar(-1.0 / (2.0 * beta));
            MarginTerm {
                loss: d.clone().square(),
                dmargin: d.mul_scalar(2.0),
            }
        }
    }
}

/// Cotangents and gradient buffers of a per-pair loss: `(cot_losses,
/// d/d chosen_logps, d/d rejected_logps)`.
pub type PairVjp<'a, F> = (&'a [F], &'a mut [F], &'a mut [F]);

/// Per-pair CPO losses and rewards from sequence log-probabilities.
///
/// # Formula
///
/// `losses[i] = cpo_pair_loss(r(c_i) − r(r_i))`, `chosen_rewards[i] = β·r(c_i)`,
/// `rejected_rewards[i] = β·r(r_i)` (rewards are detached), with `r` the
/// [`alphapo_reward`]. The caller passes summed or per-token average
/// log-probabilities as [`CpoLossType::uses_average_log_prob`] says.
///
/// # Gradient
///
/// With `vjp = Some((c, dc, dr))`: `dc[i] = c[i]·ℓ'(h_i)·r'(c_i)`,
/// `dr[i] = −c[i]·ℓ'(h_i)·r'(r_i)` (written, not accumulated).
///
/// # Peers
///
/// TRL `CPOTrainer.cpo_loss`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] when the lengths differ.
pub fn cpo_loss<F: Real>(
    cfg: &CpoConfig,
    chosen_logps: &[F],
    rejected_logps: &[F],
    losses: &mut [F],
    chosen_rewards: &mut [F],
    rejected_rewards: &mut [F],
    vjp: Option<PairVjp<'_, F>>,
) -> Result<(), Error> {
    let n = chosen_logps.len();
    check_len("policy_rejected_logps", rejected_logps.len(), n)?;
    check_len("losses", losses.len(), n)?;
    check_len("chosen_rewards", chosen_rewards.len(), n)?;
    check_len("rejected_rewards", rejected_rewards.len(), n)?;
    let mut vjp = vjp;
    if let Some((c, dc, dr)) = vjp.as_mut() {
        check_len("cotangent", c.len(), n)?;
        check_len("grad policy_chosen_logps", dc.len(), n)?;
        check_len("grad policy_rejected_logps", dr.len(), n)?;
    }
    for i in 0..n {
        let (rc, drc) = alphapo_reward(chosen_logps[i], cfg.alpha);
        let (rr, drr) = alphapo_reward(rejected_logps[i], cfg.alpha);
        let t = cpo_pair_loss(cfg, rc - rr);
        losses[i] = t.loss;
        chosen_rewards[i] = F::of(cfg.beta) * rc;
        rejected_rewards[i] = F::of(cfg.beta) * rr;
        if let Some((c, dc, dr)) = vjp.as_mut() {
            dc[i] = c[i] * t.dmargin * drc;
            dr[i] = -(c[i] * t.dmargin * drr);
        }
    }
    Ok(())
}

/// `e^x − 1`, accurate near 0, from [`Elem`] primitives only: Kahan's
/// `(u − 1)·x / ln u` with `u = eˣ` for `|x| ≤ 1/2` (`x` itself where `u`
/// rounds to 1), the plain `u − 1` elsewhere.
fn exp_m1<E: Elem>(x: E) -> E {
    let u = x.clone().exp();
    let um1 = u.clone().add_scalar(-1.0);
    let far = x.clone().abs().gt_scalar(0.5);
    let is_one = u.ge_scalar(1.0).and(u.le_scalar(1.0));
    let kahan = um1.clone().mul(x.clone()).div(u.ln());
    let near = E::select(&is_one, x, kahan);
    E::select(&far, um1, near)
}

/// `log(1 − eˣ)` for `x ≤ 0`, stable on both sides of `−ln 2`.
///
/// # Formula
///
/// `log1p(−eˣ)` for `x < −ln 2`, else `log(−expm1(x))` (TRL's `log1mexp`).
///
/// # Gradient
///
/// `d/dx = −eˣ/(1 − eˣ) = 1 + 1/expm1(x)`.
///
/// # Peers
///
/// TRL `orpo_trainer.log1mexp` (same branches). `expm1` is evaluated from
/// [`Elem`] primitives with Kahan's `(u − 1)·x/ln u`, accurate near 0 in f32.
pub fn log1mexp<E: Elem>(x: E) -> E {
    let lo = x.lt_scalar(-core::f64::consts::LN_2);
    let a = x.clone().exp().neg().ln_1p();
    let b = exp_m1(x).neg().ln();
    E::select(&lo, a, b)
}

/// ORPO's log-odds of one pair and its partial derivatives.
///
/// # Formula
///
/// ```text
/// log_odds = (ℓ_c − ℓ_r) − (log(1 − e^{ℓ_c}) − log(1 − e^{ℓ_r}))
///          = log(odds(p_c) / odds(p_r)),   odds(p) = p/(1 − p)
/// ```
///
/// # Gradient
///
/// `∂/∂ℓ_c = 1/(1 − e^{ℓ_c}) = −1/expm1(ℓ_c)`, `∂/∂ℓ_r = 1/expm1(ℓ_r)`.
/// Returned as `(log_odds, ∂/∂ℓ_c, ∂/∂ℓ_r)`.
///
/// # Peers
///
/// TRL `ORPOTrainer.odds_ratio_loss`. Antisymmetric: swapping chosen and
/// rejected negates it.
pub fn orpo_log_odds<E: Elem>(chosen: E, rejected: E) -> (E, E, E) {
    let lo = chosen
        .clone()
        .sub(rejected.clone())
        .sub(log1mexp(chosen.clone()).sub(log1mexp(rejected.clone())));
    let em_c = exp_m1(chosen);
    let em_r = exp_m1(rejected);
    let dc = em_c.full_like(-1.0).div(em_c);
    let dr = em_r.full_like(1.0).div(em_r);
    (lo, dc, dr)
}

/// Cotangents of [`odds_ratio_loss`]'s outputs.
#[derive(Debug, Clone, Copy)]
pub struct OrpoCotangents<'a, F> {
    /// Cotangent of each per-pair loss.
    pub losses: &'a [F],
    /// Cotangent of the `log_odds_ratio` metric (`mean log σ(log_odds)`).
    pub log_odds_ratio: F,
    /// Cotangent of the `log_odds_chosen` metric (`mean log_odds`).
    pub log_odds_chosen: F,
}

/// The means [`odds_ratio_loss`] returns besides the per-pair losses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrpoMetrics<F> {
    /// `mean_i log σ(log_odds_i)` (TRL's `log_odds_ratio`).
    pub log_odds_ratio: F,
    /// `mean_i log_odds_i` (TRL's `log_odds_chosen`).
    pub log_odds_chosen: F,
}

/// ORPO's per-pair odds-ratio term, rewards and log-odds metrics.
///
/// # Formula
///
/// ```text
/// losses[i]           = β · log σ(log_odds_i)        (the batch loss subtracts its mean)
/// chosen_rewards[i]   = β · ℓ_c,i    rejected_rewards[i] = β · ℓ_r,i   (detached)
/// log_odds_ratio      = mean_i log σ(log_odds_i)
/// log_odds_chosen     = mean_i log_odds_i
/// ```
///
/// with [`orpo_log_odds`]; the log-probabilities are per-token averages.
/// An empty batch gives 0 for both means (the peer's mean is NaN).
///
/// # Gradient
///
/// With cotangents `c`: `∂/∂log_odds_i = (β·c_i + c_ratio/n)·σ(−log_odds_i) + c_chosen/n`,
/// chained through [`orpo_log_odds`]'s partials (written, not accumulated).
///
/// # Peers
///
/// TRL `ORPOTrainer.odds_ratio_loss`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] when the lengths differ.
pub fn odds_ratio_loss<F: Real>(
    beta: f64,
    chosen_logps: &[F],
    rejected_logps: &[F],
    losses: &mut [F],
    chosen_rewards: &mut [F],
    rejected_rewards: &mut [F],
    vjp: Option<(OrpoCotangents<'_, F>, &mut [F], &mut [F])>,
) -> Result<OrpoMetrics<F>, Error> {
    check_param(
        beta > 0.0 && beta.is_finite(),
        "beta",
        beta,
        "must be finite and > 0",
    )?;
    let n = chosen_logps.len();
    check_len("policy_rejected_logps", rejected_logps.len(), n)?;
    check_len("losses", losses.len(), n)?;
    check_len("chosen_rewards", chosen_rewards.len(), n)?;
    check_len("rejected_rewards", rejected_rewards.len(), n)?;
    let mut vjp = vjp;
    if let Some((c, dc, dr)) = vjp.as_mut() {
        check_len("cotangent losses", c.losses.len(), n)?;
        check_len("grad policy_chosen_logps", dc.len(), n)?;
        check_len("grad policy_rejected_logps", dr.len(), n)?;
    }
    let b = F::of(beta);
    let inv_n = if n == 0 {
        F::zero()
    } else {
        F::one() / F::of_usize(n)
    };
    let (mut sum_ratio, mut sum_lo) = (F::zero(), F::zero());
    for i in 0..n {
        let (lo, gc, gr) = orpo_log_odds(chosen_logps[i], rejected_logps[i]);
        let ratio = lo.log_sigmoid();
        losses[i] = b * ratio;
        chosen_rewards[i] = b * chosen_logps[i];
        rejected_rewards[i] = b * rejected_logps[i];
        sum_ratio += ratio;
        sum_lo += lo;
        if let Some((c, dc, dr)) = vjp.as_mut() {
            let dratio = b * c.losses[i] + c.log_odds_ratio * inv_n;
            let dlo = dratio * (-lo).sigmoid() + c.log_odds_chosen * inv_n;
            dc[i] = dlo * gc;
            dr[i] = dlo * gr;
        }
    }
    Ok(OrpoMetrics {
        log_odds_ratio: sum_ratio * inv_n,
        log_odds_chosen: sum_lo * inv_n,
    })
}

/// Log-probability of one target token under one logits row, and (when
/// `grad` is given) `grad += c · ∂/∂z` using `scratch` (one vocabulary row).
fn token_logp<F: Real>(
    z: &[F],
    target: i64,
    grad: Option<(F, &mut [F], &mut [F])>,
) -> Result<F, Error> {
    let vocab = z.len();
    let mut out = [F::zero()];
    match grad {
        Some((c, g, scratch)) => {
            selective_log_softmax(z, 1, vocab, &[target], &mut out, Some((&[c], scratch)))?;
            for (gk, &sk) in g.iter_mut().zip(scratch.iter()) {
                *gk += sk;
            }
        }
        None => selective_log_softmax(z, 1, vocab, &[target], &mut out, None)?,
    }
    Ok(out[0])
}

fn check_logits_shape<F>(
    logits: &[F],
    dims: Dims,
    vocab: usize,
    targets: &[i64],
    valid: &[bool],
) -> Result<(), Error> {
    check_len("logits", logits.len(), dims.len() * vocab)?;
    check_len("targets", targets.len(), dims.len())?;
    check_len("valid", valid.len(), dims.len())?;
    if vocab == 0 && !dims.is_empty() {
        return Err(Error::Empty {
            input: "logits (vocabulary)",
        });
    }
    Ok(())
}

/// Sequence log-probabilities from causal-LM logits, shifted by one.
///
/// `logits` is `[batch, seq, vocab]` row-major, `targets` and `valid` are
/// `[batch, seq]` (`dims`). Position `t ≥ 1` of row `b` scores `targets[b, t]`
/// under `logits[b, t−1, :]` and counts when `valid[b, t]`; position 0 never
/// counts, and the last logits row is never read. Positions that do not count
/// are never read either (they may hold NaN, and their targets any id such
/// as `−100`).
///
/// # Formula
///
/// ```text
/// s_b   = Σ_{t ≥ 1, valid[b,t]} log softmax(logits[b, t−1])[targets[b, t]]
/// out_b = s_b                 (average = false)
/// out_b = s_b / n_b           (average = true; n_b the counted positions, 0 when n_b = 0)
/// ```
///
/// # Gradient
///
/// [`shifted_sequence_logps_vjp`].
///
/// # Peers
///
/// TRL `get_batch_logps` (labels `≠ −100` as `valid`) of CPO/ORPO, and the
/// completion-mask sums of DPO/KTO (`valid` = `completion_mask`). The peers
/// divide by `n_b = 0` (NaN); posttrain gives 0.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths; [`Error::Invalid`] for a counted
/// target outside `[0, vocab)`.
///
/// # Example
///
/// ```
/// use posttrain_core::preference::odds_ratio::shifted_sequence_logps;
/// use posttrain_core::Dims;
/// // one row, two positions, vocabulary of 2: position 1 scores token 0 under row 0.
/// let logits = [0.0f64, 0.0, f64::NAN, f64::NAN];
/// let mut out = [0.0];
/// shifted_sequence_logps(&logits, Dims::new(1, 2), 2, &[-100, 0], &[false, true], false, &mut out)?;
/// assert!((out[0] + core::f64::consts::LN_2).abs() < 1e-15);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn shifted_sequence_logps<F: Real>(
    logits: &[F],
    dims: Dims,
    vocab: usize,
    targets: &[i64],
    valid: &[bool],
    average: bool,
    out: &mut [F],
) -> Result<(), Error> {
    check_logits_shape(logits, dims, vocab, targets, valid)?;
    check_len("out", out.len(), dims.batch)?;
    for (b, out_b) in out.iter_mut().enumerate() {
        let (mut s, mut n) = (F::zero(), 0usize);
        for t in 1..dims.seq {
            let i = b * dims.seq + t;
            if !valid[i] {
                continue;
            }
            let r = (i - 1) * vocab;
            s += token_logp(&logits[r..r + vocab], targets[i], None)?;
            n += 1;
        }
        *out_b = if !average {
            s
        } else if n == 0 {
            F::zero()
        } else {
            s / F::of_usize(n)
        };
    }
    Ok(())
}

/// The VJP of [`shifted_sequence_logps`]: `grad += Σ_b cot[b] · ∂out_b/∂logits`.
///
/// # Gradient
///
/// `grad[b, t−1, k] += cot[b] · w_b · (1[k = targets[b,t]] − softmax(logits[b,t−1])ₖ)`
/// for each counted position, `w_b = 1` or `1/n_b` (average). Rows that do
/// not count are left untouched. `scratch` holds one vocabulary row.
///
/// # Errors
///
/// As [`shifted_sequence_logps`], plus [`Error::ShapeMismatch`] for `cot`,
/// `grad` and `scratch`.
#[allow(clippy::too_many_arguments)]
pub fn shifted_sequence_logps_vjp<F: Real>(
    logits: &[F],
    dims: Dims,
    vocab: usize,
    targets: &[i64],
    valid: &[bool],
    average: bool,
    cot: &[F],
    grad: &mut [F],
    scratch: &mut [F],
) -> Result<(), Error> {
    check_logits_shape(logits, dims, vocab, targets, valid)?;
    check_len("cotangent", cot.len(), dims.batch)?;
    check_len("grad", grad.len(), logits.len())?;
    check_len("scratch", scratch.len(), vocab)?;
    for (b, &cot_b) in cot.iter().enumerate() {
        let row = b * dims.seq..(b + 1) * dims.seq;
        let n = valid[row].iter().skip(1).filter(|&&v| v).count();
        if n == 0 {
            continue;
        }
        let w = if average {
            cot_b / F::of_usize(n)
        } else {
            cot_b
        };
        for t in 1..dims.seq {
            let i = b * dims.seq + t;
            if !valid[i] {
                continue;
            }
            let r = (i - 1) * vocab;
            token_logp(
                &logits[r..r + vocab],
                targets[i],
                Some((w, &mut grad[r..r + vocab], &mut *scratch)),
            )?;
        }
    }
    Ok(())
}

/// Mean token NLL (cross-entropy) of causal-LM logits, shifted by one, over
/// all counted positions of the batch.
///
/// # Formula
///
/// `nll = −(Σ_{b, t ≥ 1, valid[b,t]} log softmax(logits[b,t−1])[targets[b,t]]) / N`,
/// `N` the number of counted positions; 0 when `N = 0` (the peer's
/// `CrossEntropyLoss` gives NaN). Masking as in [`shifted_sequence_logps`].
///
/// # Gradient
///
/// With `grad = Some((c, g, scratch))`:
/// `g[b, t−1, k] += −c/N · (1[k = target] − softmax(logits[b,t−1])ₖ)`.
///
/// # Peers
///
/// `torch.nn.CrossEntropyLoss(ignore_index=−100)` on shifted logits/labels:
/// TRL CPO (`valid` = chosen labels ≠ −100) and ORPO (`valid` = chosen
/// attention mask, targets = input ids).
///
/// # Errors
///
/// As [`shifted_sequence_logps_vjp`].
pub fn shifted_mean_nll<F: Real>(
    logits: &[F],
    dims: Dims,
    vocab: usize,
    targets: &[i64],
    valid: &[bool],
    grad: Option<(F, &mut [F], &mut [F])>,
) -> Result<F, Error> {
    check_logits_shape(logits, dims, vocab, targets, valid)?;
    let mut grad = grad;
    if let Some((_, g, scratch)) = grad.as_mut() {
        check_len("grad", g.len(), logits.len())?;
        check_len("scratch", scratch.len(), vocab)?;
    }
    let counted = |i: usize| i % dims.seq.max(1) != 0 && valid[i];
    let n = (0..dims.len()).filter(|&i| counted(i)).count();
    if n == 0 {
        return Ok(F::zero());
    }
    let inv_n = F::one() / F::of_usize(n);
    let mut s = F::zero();
    for i in (0..dims.len()).filter(|&i| counted(i)) {
        let r = (i - 1) * vocab;
        let z = &logits[r..r + vocab];
        s += match grad.as_mut() {
            Some((c, g, scratch)) => token_logp(
                z,
                targets[i],
                Some((-*c * inv_n, &mut g[r..r + vocab], &mut **scratch)),
            )?,
            None => token_logp(z, targets[i], None)?,
        };
    }
    Ok(-s * inv_n)
}
