//! Policy losses averaged per sequence then over the batch, with
//! completion-level ratios, on-policy and chunked-logits forms (torchtune's
//! GRPO losses).
//!
//! # Overview
//!
//! Every loss here combines a policy-gradient term with a k3 KL penalty
//! towards a reference policy, `kl = e^{ref − log π} − (ref − log π) − 1`
//! ([`KlConfig`] k3, no clamps), weighted by `kl_coeff` (β). The GRPO
//! advantage `Aᵢ` is one number per sequence (`[batch]`), broadcast over the
//! sequence's tokens.
//!
//! | function | ratio | reduction | peer |
//! |---|---|---|---|
//! | [`token_clipped_loss`] | per token, clipped at `1 ± ε` | masked mean over the batch (`n + 1e-8`) | torchtune `GRPOLoss` |
//! | [`completion_clipped_loss`] | one scalar: `exp(Σ_valid (log π − log π_old))` over the **whole batch** | mean over sequences | torchtune `GRPOCompletionLoss` |
//! | [`on_policy_loss`] | `exp(log π − sg(log π)) = 1` (on-policy: no ε, no `π_old`) | per-sequence mean, then mean over sequences | torchtune `GRPOSimpleLoss` |
//! | [`on_policy_loss_from_logits`] | as above, `log π` from `[B, T, V]` logits | per-sequence mean (count ≥ 1e-9) | torchtune `GRPOWithChunkedOutputLoss` |
//! | [`on_policy_loss_from_hidden`] | as above, logits = hidden · Wᵀ | per-sequence mean (count ≥ 1e-9) | torchtune `LinearGRPOLoss` |
//!
//! [`truncate_for_logprobs`] is the slicing helper torchtune applies to
//! `[B, context + response, V]` logits before taking log-probabilities.
//!
//! Each returns a [`SequenceMeanOutput`]: `loss = −(policy − β·kl)` plus the
//! metrics the peer logs (`ratio_mean`, `clipfrac`; the on-policy forms report
//! 1 and 0, as torchtune does).
//!
//! # Masking
//!
//! `mask = None` means every position is valid. Masked positions are
//! selected out, so NaN/±inf there never reaches a loss or gradient; the one
//! exception is [`token_clipped_loss`]'s `ratio_mean`, which torchtune
//! averages over every position, padding included. Fully masked input gives
//! loss 0 and zero gradient for every per-token form (the completion form still
//! has its `−mean(A)` policy term: its ratio is then `e⁰ = 1`).
//!
//! # Example
//!
//! ```
//! use posttrain_core::policy::sequence_mean::{on_policy_loss, SequenceMeanConfig, TokenCountGuard};
//! use posttrain_core::Dims;
//!
//! let cfg = SequenceMeanConfig::new(0.2, 0.0)?;
//! let dims = Dims::new(2, 2);
//! let lp = [-1.0f64, -2.0, -0.5, f64::NAN];
//! let mask = [true, true, true, false];
//! let mut grad = [0.0; 4];
//! let out = on_policy_loss(&cfg, TokenCountGuard::TORCHTUNE_SIMPLE, dims, &lp, &lp, &[1.0, -1.0],
//!                          Some(&mask), Some(&mut grad))?;
//! // β = 0: loss = −mean_i(Aᵢ · nᵢ/(nᵢ + 1e-8)) ≈ 0; d/dlog π = −Aᵢ / (nᵢ · B).
//! assert!(out.loss.abs() < 1e-8);
//! assert!((grad[0] + 0.25).abs() < 1e-8 && (grad[2] - 0.5).abs() < 1e-8 && grad[3] == 0.0);
//! # Ok::<(), posttrain_core::Error>(())
//! ```

use crate::elem::{Elem, Real};
use crate::error::{check_len, check_param, Error};
use crate::kl::{KlConfig, KlEstimator};
use crate::logits::{row_max_lse, selective_log_softmax};
use crate::policy::{ppo_clipped_surrogate, ClipConfig};
use crate::preset::Preset;
use crate::shape::Dims;

/// Parameters shared by the losses of this module.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SequenceMeanConfig {
    /// `ε`: ratios are clipped to `[1 − ε, 1 + ε]` (ignored by the on-policy forms).
    pub epsilon: f64,
    /// `β`: weight of the k3 KL penalty.
    pub kl_coeff: f64,
}

impl SequenceMeanConfig {
    /// A validated configuration.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] if `epsilon` or `kl_coeff` is negative or not finite.
    pub fn new(epsilon: f64, kl_coeff: f64) -> Result<Self, Error> {
        let cfg = SequenceMeanConfig { epsilon, kl_coeff };
        cfg.validate()?;
        Ok(cfg)
    }

    /// torchtune's defaults (`epsilon = 0.1`, `kl_coeff = 0.1`); the other
    /// peers have no such loss, and get the same values.
    pub fn preset(_preset: Preset) -> Self {
        SequenceMeanConfig {
            epsilon: 0.1,
            kl_coeff: 0.1,
        }
    }

    /// Checks the ranges.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] if `epsilon` or `kl_coeff` is negative or not finite.
    pub fn validate(&self) -> Result<(), Error> {
        check_param(
            self.epsilon.is_finite() && self.epsilon >= 0.0,
            "epsilon",
            self.epsilon,
            "must be finite and ≥ 0",
        )?;
        check_param(
            self.kl_coeff.is_finite() && self.kl_coeff >= 0.0,
            "kl_coeff",
            self.kl_coeff,
            "must be finite and ≥ 0",
        )
    }

    /// The symmetric clip of the ratio, with no log-ratio clamp or dual clip.
    pub fn clip(&self) -> ClipConfig {
        ClipConfig {
            eps_low: self.epsilon,
            eps_high: self.epsilon,
            dual_clip: None,
            log_ratio_clamp: None,
        }
    }

    /// The KL estimator: k3 without clamps.
    pub fn kl(&self) -> KlConfig {
        KlConfig::new(KlEstimator::K3)
    }
}

/// How a sequence's valid-token count `n` is guarded before dividing by it.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum TokenCountGuard {
    /// Divide by `n + e` (torchtune `masked_mean`: `e = 1e-8`).
    Add(f64),
    /// Divide by `max(n, e)` (torchtune's chunked losses: `e = 1e-9`).
    AtLeast(f64),
}

impl TokenCountGuard {
    /// `GRPOSimpleLoss`'s `masked_mean(…, dim=1)`: `n + 1e-8`.
    pub const TORCHTUNE_SIMPLE: TokenCountGuard = TokenCountGuard::Add(1e-8);
    /// `GRPOWithChunkedOutputLoss` / `LinearGRPOLoss`: `max(n, 1e-9)`.
    pub const TORCHTUNE_CHUNKED: TokenCountGuard = TokenCountGuard::AtLeast(1e-9);

    /// The denominator for a count `n`.
    pub fn denominator(self, n: usize) -> f64 {
        self.denominator_of(n as f64)
    }

    /// The denominator for a count `n` held as an element (or a tensor of
    /// per-row counts): `n + e` or `max(n, e)`.
    pub fn denominator_of<E: Elem>(self, n: E) -> E {
        match self {
            TokenCountGuard::Add(e) => n.add_scalar(e),
            TokenCountGuard::AtLeast(e) => {
                let floor = n.full_like(e);
                n.max(floor)
            }
        }
    }

    /// Checks that the guard is finite and positive.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] otherwise.
    pub fn validate(self) -> Result<(), Error> {
        self.check()
    }

    fn check(self) -> Result<(), Error> {
        let (TokenCountGuard::Add(e) | TokenCountGuard::AtLeast(e)) = self;
        check_param(
            e.is_finite() && e > 0.0,
            "token count guard",
            e,
            "must be finite and > 0",
        )
    }
}

/// The scalar results of every loss in this module (the torchtune tuple).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SequenceMeanOutput<F> {
    /// `−(policy_loss − β · kl_loss)`: the loss to minimise.
    pub loss: F,
    /// The policy objective (to maximise), reduced like the loss.
    pub policy_loss: F,
    /// The KL penalty, reduced like the loss.
    pub kl_loss: F,
    /// The mean ratio (1 for the on-policy forms).
    pub ratio_mean: F,
    /// Fraction of clipped terms (0 for the on-policy forms).
    pub clipfrac: F,
}

/// One token of a clipped GRPO loss.
#[derive(Debug, Clone)]
pub struct ClippedToken<E: Elem> {
    /// The policy objective `min(A·r, A·clip(r, 1 ± ε))`.
    pub policy: E,
    /// The k3 KL estimate.
    pub kl: E,
    /// The token's loss `−policy + β·kl`.
    pub loss: E,
    /// `∂loss/∂log π`.
    pub grad: E,
    /// The ratio `r`.
    pub ratio: E,
    /// Whether the clipped branch is active (`A·clip(r) < A·r`).
    pub clipped: E::Mask,
}

/// The clipped GRPO objective and k3 penalty of one token.
///
/// # Formula
///
/// ```text
/// r = exp(log π − log π_old)
/// policy = min(A·r, A·clip(r, 1−ε, 1+ε))             (−ppo_clipped_surrogate)
/// kl = e^{ref − log π} − (ref − log π) − 1
/// loss = −policy + β·kl
/// ```
///
/// # Gradient
///
/// `∂loss/∂log π = ∂ℓ_clip/∂log π + β(1 − e^{ref − log π})`.
///
/// # Peers
///
/// torchtune `GRPOLoss` per token (and, with sequence sums as inputs,
/// `GRPOCompletionLoss`).
///
/// # Example
///
/// ```
/// use posttrain_core::policy::sequence_mean::{clipped_token, SequenceMeanConfig};
/// let cfg = SequenceMeanConfig::new(0.2, 0.1)?;
/// let t = clipped_token(&cfg, -1.0f64, -1.0, -1.0, 2.0);
/// assert_eq!((t.policy, t.kl, t.loss, t.grad), (2.0, 0.0, -2.0, -2.0));
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn clipped_token<E: Elem>(
    cfg: &SequenceMeanConfig,
    log_prob: E,
    old_log_prob: E,
    ref_log_prob: E,
    advantage: E,
) -> ClippedToken<E> {
    let s = ppo_clipped_surrogate(&cfg.clip(), log_prob.clone(), old_log_prob, advantage);
    let (kl, dkl) = cfg.kl().estimate(log_prob, ref_log_prob);
    let loss = s.loss.clone().add(kl.clone().mul_scalar(cfg.kl_coeff));
    let grad = s.grad.add(dkl.mul_scalar(cfg.kl_coeff));
    ClippedToken {
        policy: s.loss.neg(),
        kl,
        loss,
        grad,
        ratio: s.ratio,
        clipped: s.clipped,
    }
}

/// One token of an on-policy GRPO loss.
#[derive(Debug, Clone)]
pub struct OnPolicyToken<E: Elem> {
    /// The policy objective `exp(log π − sg(log π)) · A = A`.
    pub policy: E,
    /// The k3 KL estimate.
    pub kl: E,
    /// The token's loss `−(A − β·kl)`.
    pub loss: E,
    /// `∂loss/∂log π = −A + β(1 − e^{ref − log π})`.
    pub grad: E,
}

/// The on-policy GRPO objective of one token: the ratio `π/sg(π)` is 1 in
/// value, with gradient `A` (the REINFORCE gradient).
///
/// # Formula
///
/// ```text
/// policy = A,  kl = e^{ref − log π} − (ref − log π) − 1,  loss = −(policy − β·kl)
/// ```
///
/// # Gradient
///
/// `∂loss/∂log π = −A + β(1 − e^{ref − log π})`. This is the gradient of the
/// stop-gradient surrogate `−(A·e^{log π − sg(log π)} − β·kl)`, not of the
/// value above (which does not move with `log π` through its policy term):
/// finite differences must hold the `sg` copy fixed.
///
/// # Peers
///
/// torchtune `GRPOSimpleLoss`, `GRPOWithChunkedOutputLoss`, `LinearGRPOLoss`
/// (all ignore `epsilon` and `π_old`).
///
/// # Example
///
/// ```
/// use posttrain_core::policy::sequence_mean::on_policy_token;
/// let t = on_policy_token(0.1, -1.0f64, -1.0, 3.0);
/// assert_eq!((t.policy, t.kl, t.loss, t.grad), (3.0, 0.0, -3.0, -3.0));
/// ```
pub fn on_policy_token<E: Elem>(
    kl_coeff: f64,
    log_prob: E,
    ref_log_prob: E,
    advantage: E,
) -> OnPolicyToken<E> {
    let (kl, dkl) = KlConfig::new(KlEstimator::K3).estimate(log_prob, ref_log_prob);
    let loss = advantage.clone().sub(kl.clone().mul_scalar(kl_coeff)).neg();
    let grad = dkl.mul_scalar(kl_coeff).sub(advantage.clone());
    OnPolicyToken {
        policy: advantage,
        kl,
        loss,
        grad,
    }
}

#[inline]
fn is_valid(mask: Option<&[bool]>, i: usize) -> bool {
    mask.is_none_or(|m| m[i])
}

fn check_common<F>(
    dims: Dims,
    advantages: &[F],
    mask: Option<&[bool]>,
    grad: Option<&[F]>,
    grad_len: usize,
) -> Result<(), Error> {
    if dims.batch == 0 {
        return Err(Error::Empty {
            input: "advantages",
        });
    }
    check_len("advantages", advantages.len(), dims.batch)?;
    if let Some(m) = mask {
        check_len("mask", m.len(), dims.len())?;
    }
    if let Some(g) = grad {
        check_len("grad", g.len(), grad_len)?;
    }
    Ok(())
}

/// torchtune's token-level clipped GRPO loss: per-token ratios, masked means
/// over the whole batch.
///
/// # Formula
///
/// ```text
/// n = #valid tokens,  D = n + 1e-8
/// policy_loss = Σ_valid min(Aᵢ·r, Aᵢ·clip(r)) / D
/// kl_loss     = Σ_valid kl / D
/// loss        = −(policy_loss − β·kl_loss)
/// clipfrac    = Σ_valid 1[Aᵢ·clip(r) < Aᵢ·r] / D
/// ratio_mean  = mean of r over every position (padding included)
/// ```
///
/// # Gradient
///
/// `∂loss/∂log πᵢⱼ = ClippedToken::grad / D` on valid positions, else 0
/// (see [`clipped_token`]).
///
/// # Peers
///
/// torchtune `dev.grpo.loss.GRPOLoss`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for an input, mask or `grad` of the wrong length
/// (`advantages` has one entry per row); [`Error::Empty`] for zero rows;
/// [`Error::OutOfRange`] for a bad configuration.
#[allow(clippy::too_many_arguments)]
pub fn token_clipped_loss<F: Real>(
    cfg: &SequenceMeanConfig,
    dims: Dims,
    old_log_prob: &[F],
    log_prob: &[F],
    ref_log_prob: &[F],
    advantages: &[F],
    mask: Option<&[bool]>,
    grad: Option<&mut [F]>,
) -> Result<SequenceMeanOutput<F>, Error> {
    cfg.validate()?;
    let n = dims.len();
    check_len("old_log_prob", old_log_prob.len(), n)?;
    check_len("log_prob", log_prob.len(), n)?;
    check_len("ref_log_prob", ref_log_prob.len(), n)?;
    check_common(dims, advantages, mask, grad.as_deref(), n)?;
    let valid = (0..n).filter(|&i| is_valid(mask, i)).count();
    let den = F::of(valid as f64 + 1e-8);
    let mut grad = grad;
    let (mut pol, mut kl, mut clip, mut ratio) = (F::zero(), F::zero(), F::zero(), F::zero());
    for i in 0..n {
        let a = advantages[i / dims.seq];
        let t = clipped_token(cfg, log_prob[i], old_log_prob[i], ref_log_prob[i], a);
        ratio += t.ratio;
        let ok = is_valid(mask, i);
        if ok {
            pol += t.policy;
            kl += t.kl;
            if t.clipped {
                clip += F::one();
            }
        }
        if let Some(g) = grad.as_mut() {
            g[i] = if ok { t.grad / den } else { F::zero() };
        }
    }
    let policy_loss = pol / den;
    let kl_loss = kl / den;
    Ok(SequenceMeanOutput {
        loss: -(policy_loss - F::of(cfg.kl_coeff) * kl_loss),
        policy_loss,
        kl_loss,
        ratio_mean: if n == 0 {
            F::one()
        } else {
            ratio / F::of_usize(n)
        },
        clipfrac: clip / den,
    })
}

/// torchtune's completion-level clipped GRPO loss: a single ratio from the
/// log-probabilities summed over every valid token of the **whole batch**.
///
/// # Formula
///
/// ```text
/// x   = Σ_valid (log π − log π_old),   y = Σ_valid (log π − ref)
/// R   = eˣ
/// policy_loss = meanᵢ min(Aᵢ·R, Aᵢ·clip(R, 1−ε, 1+ε))
/// kl_loss     = (e^{−y} + y − 1) · n / (n + 1e-8)       (n = #valid tokens)
/// loss        = −(policy_loss − β·kl_loss)
/// clipfrac    = meanᵢ 1[Aᵢ·clip(R) < Aᵢ·R],   ratio_mean = R
/// ```
///
/// The peer sums `log π` and `log π_old` separately and then subtracts; the
/// sums of differences used here are the same number, without the f32
/// cancellation.
///
/// # Gradient
///
/// Every valid token gets the same gradient
/// `meanᵢ ∂ℓ_clip,ᵢ/∂x + β·(1 − e^{−y})·n/(n + 1e-8)`; masked tokens get 0.
///
/// # Peers
///
/// torchtune `dev.grpo.loss.GRPOCompletionLoss`.
///
/// # Errors
///
/// As [`token_clipped_loss`].
#[allow(clippy::too_many_arguments)]
pub fn completion_clipped_loss<F: Real>(
    cfg: &SequenceMeanConfig,
    dims: Dims,
    old_log_prob: &[F],
    log_prob: &[F],
    ref_log_prob: &[F],
    advantages: &[F],
    mask: Option<&[bool]>,
    grad: Option<&mut [F]>,
) -> Result<SequenceMeanOutput<F>, Error> {
    cfg.validate()?;
    let n = dims.len();
    check_len("old_log_prob", old_log_prob.len(), n)?;
    check_len("log_prob", log_prob.len(), n)?;
    check_len("ref_log_prob", ref_log_prob.len(), n)?;
    check_common(dims, advantages, mask, grad.as_deref(), n)?;
    let (mut x, mut y, mut valid) = (F::zero(), F::zero(), 0usize);
    for i in (0..n).filter(|&i| is_valid(mask, i)) {
        x += log_prob[i] - old_log_prob[i];
        y += log_prob[i] - ref_log_prob[i];
        valid += 1;
    }
    let clip = cfg.clip();
    let (mut pol, mut dpol, mut clipped, mut ratio) = (F::zero(), F::zero(), 0usize, F::one());
    for &a in advantages {
        let s = ppo_clipped_surrogate(&clip, x, F::zero(), a);
        pol -= s.loss;
        dpol += s.grad;
        clipped += s.clipped as usize;
        ratio = s.ratio;
    }
    let b = F::of_usize(dims.batch);
    let (kl, dkl) = cfg.kl().estimate(y, F::zero());
    let share = F::of(valid as f64 / (valid as f64 + 1e-8));
    let beta = F::of(cfg.kl_coeff);
    let policy_loss = pol / b;
    let kl_loss = kl * share;
    if let Some(g) = grad {
        let gv = dpol / b + beta * dkl * share;
        for (i, gi) in g.iter_mut().enumerate() {
            *gi = if is_valid(mask, i) { gv } else { F::zero() };
        }
    }
    Ok(SequenceMeanOutput {
        loss: -(policy_loss - beta * kl_loss),
        policy_loss,
        kl_loss,
        ratio_mean: ratio,
        clipfrac: F::of(clipped as f64) / b,
    })
}

/// The per-row denominators' driver shared by the on-policy forms: runs
/// [`on_policy_token`] over the valid tokens and hands each one's
/// `∂loss/∂log π` to `sink`.
#[allow(clippy::too_many_arguments)]
fn on_policy_core<F: Real>(
    cfg: &SequenceMeanConfig,
    guard: TokenCountGuard,
    dims: Dims,
    log_prob: &[F],
    ref_log_prob: &[F],
    advantages: &[F],
    mask: Option<&[bool]>,
    mut sink: impl FnMut(usize, F) -> Result<(), Error>,
) -> Result<SequenceMeanOutput<F>, Error> {
    let b = F::of_usize(dims.batch);
    let (mut loss, mut pol, mut kl) = (F::zero(), F::zero(), F::zero());
    for (row, &a) in advantages.iter().enumerate() {
        let range = dims.row(row);
        let count = range.clone().filter(|&i| is_valid(mask, i)).count();
        if count == 0 {
            // Contributes exactly 0 (a tiny guard can round to 0 in f32: 0/0).
            continue;
        }
        let den = F::of(guard.denominator(count));
        let (mut l_row, mut p_row, mut k_row) = (F::zero(), F::zero(), F::zero());
        for i in range.filter(|&i| is_valid(mask, i)) {
            let t = on_policy_token(cfg.kl_coeff, log_prob[i], ref_log_prob[i], a);
            l_row += t.loss;
            p_row += t.policy;
            k_row += t.kl;
            sink(i, t.grad / (den * b))?;
        }
        loss += l_row / den;
        pol += p_row / den;
        kl += k_row / den;
    }
    Ok(SequenceMeanOutput {
        loss: loss / b,
        policy_loss: pol / b,
        kl_loss: kl / b,
        ratio_mean: F::one(),
        clipfrac: F::zero(),
    })
}

/// torchtune's on-policy GRPO loss: each sequence's token mean, then the mean
/// over sequences.
///
/// # Formula
///
/// ```text
/// Dᵢ = guard(nᵢ)                       (nᵢ = #valid tokens of row i)
/// loss        = meanᵢ Σ_valid −(Aᵢ − β·kl) / Dᵢ
/// policy_loss = meanᵢ Σ_valid Aᵢ / Dᵢ,   kl_loss = meanᵢ Σ_valid kl / Dᵢ
/// ratio_mean = 1, clipfrac = 0
/// ```
///
/// A row without valid tokens contributes 0 but still counts in the mean over
/// rows. `epsilon` is not used (the ratio is identically 1).
///
/// # Gradient
///
/// `∂loss/∂log πᵢⱼ = (−Aᵢ + β(1 − e^{refᵢⱼ − log πᵢⱼ})) / (Dᵢ · B)` on valid
/// positions, else 0.
///
/// # Peers
///
/// torchtune `dev.grpo.loss.GRPOSimpleLoss` with
/// [`TokenCountGuard::TORCHTUNE_SIMPLE`].
///
/// # Errors
///
/// As [`token_clipped_loss`], plus [`Error::OutOfRange`] for a non-positive guard.
#[allow(clippy::too_many_arguments)]
pub fn on_policy_loss<F: Real>(
    cfg: &SequenceMeanConfig,
    guard: TokenCountGuard,
    dims: Dims,
    log_prob: &[F],
    ref_log_prob: &[F],
    advantages: &[F],
    mask: Option<&[bool]>,
    grad: Option<&mut [F]>,
) -> Result<SequenceMeanOutput<F>, Error> {
    cfg.validate()?;
    guard.validate()?;
    let n = dims.len();
    check_len("log_prob", log_prob.len(), n)?;
    check_len("ref_log_prob", ref_log_prob.len(), n)?;
    check_common(dims, advantages, mask, grad.as_deref(), n)?;
    match grad {
        Some(g) => {
            g.iter_mut().for_each(|x| *x = F::zero());
            on_policy_core(
                cfg,
                guard,
                dims,
                log_prob,
                ref_log_prob,
                advantages,
                mask,
                |i, d| {
                    g[i] = d;
                    Ok(())
                },
            )
        }
        None => on_policy_core(
            cfg,
            guard,
            dims,
            log_prob,
            ref_log_prob,
            advantages,
            mask,
            |_, _| Ok(()),
        ),
    }
}

/// Validates target ids: each in `[0, vocab)` or equal to `ignore_index`.
fn check_targets(targets: &[i64], vocab: usize, ignore_index: Option<i64>) -> Result<(), Error> {
    let bad = targets
        .iter()
        .any(|&t| Some(t) != ignore_index && (t < 0 || t as usize >= vocab));
    if bad {
        return Err(Error::Invalid {
            input: "targets",
            rule: "every target id must lie in [0, vocab) or equal ignore_index",
        });
    }
    Ok(())
}

/// [`on_policy_loss`] with `log π` taken from logits: `log π = log_softmax(z)[t]`
/// (0 where the target equals `ignore_index`, as `cross_entropy` does).
///
/// `logits` is `[batch, seq, vocab]`, `targets` `[batch, seq]`. Writes every
/// position's `log π` into `log_prob` (masked ones included, as the peer
/// returns them) and, with `grad`, `∂loss/∂logits` (`[batch, seq, vocab]`).
///
/// # Formula
///
/// As [`on_policy_loss`] with `log πᵢⱼ = zᵢⱼ[tᵢⱼ] − lse(zᵢⱼ)`.
///
/// # Gradient
///
/// `∂loss/∂zᵢⱼₖ = cᵢⱼ · (1[k = tᵢⱼ] − softmax(zᵢⱼ)ₖ)` with
/// `cᵢⱼ = ∂loss/∂log πᵢⱼ` from [`on_policy_loss`]; 0 for masked or ignored
/// positions (their logits are never read for the gradient).
///
/// # Peers
///
/// torchtune `dev.grpo.loss.GRPOWithChunkedOutputLoss` with
/// [`TokenCountGuard::TORCHTUNE_CHUNKED`] and `ignore_index = Some(-100)`
/// (`F.cross_entropy`'s default). Chunking changes only memory use.
///
/// # Errors
///
/// As [`on_policy_loss`], plus [`Error::ShapeMismatch`] for `logits`,
/// `targets` or `log_prob`, [`Error::Empty`] for `vocab = 0`, and
/// [`Error::Invalid`] for a target outside `[0, vocab)` that is not `ignore_index`.
#[allow(clippy::too_many_arguments)]
pub fn on_policy_loss_from_logits<F: Real>(
    cfg: &SequenceMeanConfig,
    guard: TokenCountGuard,
    dims: Dims,
    vocab: usize,
    logits: &[F],
    targets: &[i64],
    ignore_index: Option<i64>,
    ref_log_prob: &[F],
    advantages: &[F],
    mask: Option<&[bool]>,
    log_prob: &mut [F],
    grad: Option<&mut [F]>,
) -> Result<SequenceMeanOutput<F>, Error> {
    cfg.validate()?;
    guard.validate()?;
    let n = dims.len();
    if vocab == 0 {
        return Err(Error::Empty {
            input: "logits (vocabulary)",
        });
    }
    check_len("logits", logits.len(), n * vocab)?;
    check_len("targets", targets.len(), n)?;
    check_len("ref_log_prob", ref_log_prob.len(), n)?;
    check_len("log_prob", log_prob.len(), n)?;
    check_common(dims, advantages, mask, grad.as_deref(), n * vocab)?;
    check_targets(targets, vocab, ignore_index)?;
    for i in 0..n {
        log_prob[i] = if Some(targets[i]) == ignore_index {
            F::zero()
        } else {
            let z = &logits[i * vocab..(i + 1) * vocab];
            let t = targets[i] as usize;
            z[t] - row_max_lse(z).1
        };
    }
    let lp: &[F] = log_prob;
    match grad {
        Some(g) => {
            g.iter_mut().for_each(|x| *x = F::zero());
            on_policy_core(
                cfg,
                guard,
                dims,
                lp,
                ref_log_prob,
                advantages,
                mask,
                |i, c| {
                    if Some(targets[i]) == ignore_index {
                        return Ok(());
                    }
                    let mut out = [F::zero()];
                    selective_log_softmax(
                        &logits[i * vocab..(i + 1) * vocab],
                        1,
                        vocab,
                        &targets[i..i + 1],
                        &mut out,
                        Some((&[c], &mut g[i * vocab..(i + 1) * vocab])),
                    )
                },
            )
        }
        None => on_policy_core(
            cfg,
            guard,
            dims,
            lp,
            ref_log_prob,
            advantages,
            mask,
            |_, _| Ok(()),
        ),
    }
}

/// Gradient buffers of [`on_policy_loss_from_hidden`].
#[derive(Debug)]
pub struct HiddenGrads<'a, F> {
    /// Receives `∂loss/∂hidden` (`[batch, seq, hidden]`).
    pub hidden: &'a mut [F],
    /// Receives `∂loss/∂weight` (`[vocab, hidden]`).
    pub weight: &'a mut [F],
}

/// `z = W·h` for one position into `out` (`W` is `[vocab, hidden]`).
fn project<F: Real>(weight: &[F], h: &[F], out: &mut [F]) {
    let hd = h.len();
    for (v, z) in out.iter_mut().enumerate() {
        let w = &weight[v * hd..(v + 1) * hd];
        *z = w.iter().zip(h).fold(F::zero(), |a, (&wk, &hk)| a + wk * hk);
    }
}

/// [`on_policy_loss_from_logits`] fused with the output projection: the
/// logits of each position are `z = W·h` (`W`: `[vocab, hidden]`, no bias),
/// computed one position at a time so that the `[batch, seq, vocab]` logits
/// never exist.
///
/// `hidden` is `[batch, seq, hidden_dim]`, `weight` `[vocab, hidden_dim]`,
/// `targets` `[batch, seq]` (positions whose target is `ignore_index` get
/// `log π = 0` and no gradient). `logits_scratch` must hold `vocab` elements:
/// it receives one position's logits at a time (its contents afterwards are
/// unspecified). Writes every position's `log π` into `log_prob`.
///
/// # Formula
///
/// As [`on_policy_loss`] with `log πᵢⱼ = log_softmax(W·hᵢⱼ)[tᵢⱼ]`.
///
/// # Gradient
///
/// With `dz = cᵢⱼ (onehot(tᵢⱼ) − softmax(W·hᵢⱼ))` and `cᵢⱼ = ∂loss/∂log πᵢⱼ`:
/// `∂loss/∂hᵢⱼ = Wᵀ dz`, `∂loss/∂W = Σᵢⱼ dz ⊗ hᵢⱼ` over valid, non-ignored
/// positions (masked hidden states are never read for the gradient).
///
/// # Peers
///
/// torchtune `dev.rl.linear_grpo_loss.LinearGRPOLoss(ignore_index = -100)`
/// with [`TokenCountGuard::TORCHTUNE_CHUNKED`]. Its argument names are
/// shifted: `pi_old_outputs` are these hidden states (of the *current*
/// policy), `pi_outputs` the targets, `ref_outputs` the reference log-probs.
///
/// # Errors
///
/// As [`on_policy_loss_from_logits`], plus [`Error::ShapeMismatch`] for
/// `hidden`, `weight`, `logits_scratch` and the gradient buffers and
/// [`Error::Empty`] for `hidden_dim = 0`.
#[allow(clippy::too_many_arguments)]
pub fn on_policy_loss_from_hidden<F: Real>(
    cfg: &SequenceMeanConfig,
    guard: TokenCountGuard,
    dims: Dims,
    hidden_dim: usize,
    vocab: usize,
    hidden: &[F],
    weight: &[F],
    targets: &[i64],
    ignore_index: Option<i64>,
    ref_log_prob: &[F],
    advantages: &[F],
    mask: Option<&[bool]>,
    log_prob: &mut [F],
    logits_scratch: &mut [F],
    grads: Option<HiddenGrads<'_, F>>,
) -> Result<SequenceMeanOutput<F>, Error> {
    cfg.validate()?;
    guard.validate()?;
    let n = dims.len();
    if vocab == 0 {
        return Err(Error::Empty {
            input: "weight (vocabulary)",
        });
    }
    if hidden_dim == 0 {
        return Err(Error::Empty { input: "hidden" });
    }
    check_len("hidden", hidden.len(), n * hidden_dim)?;
    check_len("weight", weight.len(), vocab * hidden_dim)?;
    check_len("targets", targets.len(), n)?;
    check_len("ref_log_prob", ref_log_prob.len(), n)?;
    check_len("log_prob", log_prob.len(), n)?;
    check_len("logits_scratch", logits_scratch.len(), vocab)?;
    check_common(dims, advantages, mask, None, 0)?;
    if let Some(g) = grads.as_ref() {
        check_len("grad hidden", g.hidden.len(), n * hidden_dim)?;
        check_len("grad weight", g.weight.len(), vocab * hidden_dim)?;
    }
    check_targets(targets, vocab, ignore_index)?;
    for i in 0..n {
        log_prob[i] = if Some(targets[i]) == ignore_index {
            F::zero()
        } else {
            project(
                weight,
                &hidden[i * hidden_dim..(i + 1) * hidden_dim],
                logits_scratch,
            );
            logits_scratch[targets[i] as usize] - row_max_lse(logits_scratch).1
        };
    }
    let lp: &[F] = log_prob;
    match grads {
        Some(g) => {
            let (gh, gw) = (g.hidden, g.weight);
            gh.iter_mut().for_each(|x| *x = F::zero());
            gw.iter_mut().for_each(|x| *x = F::zero());
            on_policy_core(
                cfg,
                guard,
                dims,
                lp,
                ref_log_prob,
                advantages,
                mask,
                |i, c| {
                    if Some(targets[i]) == ignore_index {
                        return Ok(());
                    }
                    let h = &hidden[i * hidden_dim..(i + 1) * hidden_dim];
                    let dh = &mut gh[i * hidden_dim..(i + 1) * hidden_dim];
                    project(weight, h, logits_scratch);
                    let lse = row_max_lse(logits_scratch).1;
                    let t = targets[i] as usize;
                    for (v, &z) in logits_scratch.iter().enumerate() {
                        let onehot = if v == t { F::one() } else { F::zero() };
                        let dz = c * (onehot - (z - lse).exp());
                        let w = &weight[v * hidden_dim..(v + 1) * hidden_dim];
                        let dw = &mut gw[v * hidden_dim..(v + 1) * hidden_dim];
                        for k in 0..hidden_dim {
                            dh[k] += w[k] * dz;
                            dw[k] += dz * h[k];
                        }
                    }
                    Ok(())
                },
            )
        }
        None => on_policy_core(
            cfg,
            guard,
            dims,
            lp,
            ref_log_prob,
            advantages,
            mask,
            |_, _| Ok(()),
        ),
    }
}

/// The response part of `[batch, context + response, vocab]` logits: the
/// positions `context − 1 … len − 2`, whose logits predict the response tokens.
///
/// Writes `[batch, len − context, vocab]` into `out`.
///
/// # Formula
///
/// `out[b, j, :] = logits[b, context − 1 + j, :]` for `j < len − context`
/// (Python: `logits[:, context − 1 : −1]`).
///
/// # Gradient
///
/// A slice: see [`truncate_for_logprobs_vjp`].
///
/// # Peers
///
/// torchtune `rlhf.truncate_sequence_for_logprobs`.
///
/// # Errors
///
/// [`Error::OutOfRange`] unless `1 ≤ context ≤ len`;
/// [`Error::ShapeMismatch`] for `logits` or `out`.
///
/// # Example
///
/// ```
/// use posttrain_core::policy::sequence_mean::truncate_for_logprobs;
/// let logits = [0.0f64, 1.0, 2.0, 3.0]; // [1, 4, 1]
/// let mut out = [0.0; 2];
/// truncate_for_logprobs(&logits, 1, 4, 1, 2, &mut out)?;
/// assert_eq!(out, [1.0, 2.0]);
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn truncate_for_logprobs<F: Copy>(
    logits: &[F],
    batch: usize,
    len: usize,
    vocab: usize,
    context: usize,
    out: &mut [F],
) -> Result<(), Error> {
    let resp = check_truncate(batch, len, vocab, context)?;
    check_len("logits", logits.len(), batch * len * vocab)?;
    check_len("out", out.len(), batch * resp * vocab)?;
    for b in 0..batch {
        let src = (b * len + context - 1) * vocab;
        out[b * resp * vocab..(b + 1) * resp * vocab]
            .copy_from_slice(&logits[src..src + resp * vocab]);
    }
    Ok(())
}

fn check_truncate(batch: usize, len: usize, vocab: usize, context: usize) -> Result<usize, Error> {
    let _ = (batch, vocab);
    truncate_response_len(len, context)
}

/// The response length `len − context` of [`truncate_for_logprobs`], after
/// checking `1 ≤ context ≤ len`.
///
/// # Errors
///
/// [`Error::OutOfRange`] unless `1 ≤ context ≤ len`.
pub fn truncate_response_len(len: usize, context: usize) -> Result<usize, Error> {
    check_param(
        context >= 1 && context <= len,
        "context_length",
        context as f64,
        "must lie in [1, sequence length]",
    )?;
    Ok(len - context)
}

/// The VJP of [`truncate_for_logprobs`]: scatters `cotangent`
/// (`[batch, len − context, vocab]`) back into `grad` (`[batch, len, vocab]`),
/// zero elsewhere.
///
/// # Errors
///
/// As [`truncate_for_logprobs`].
pub fn truncate_for_logprobs_vjp<F: Real>(
    cotangent: &[F],
    batch: usize,
    len: usize,
    vocab: usize,
    context: usize,
    grad: &mut [F],
) -> Result<(), Error> {
    let resp = check_truncate(batch, len, vocab, context)?;
    check_len("cotangent", cotangent.len(), batch * resp * vocab)?;
    check_len("grad", grad.len(), batch * len * vocab)?;
    grad.iter_mut().for_each(|x| *x = F::zero());
    for b in 0..batch {
        let dst = (b * len + context - 1) * vocab;
        grad[dst..dst + resp * vocab]
            .copy_from_slice(&cotangent[b * resp * vocab..(b + 1) * resp * vocab]);
    }
    Ok(())
}
