//! Fused single-pass kernels: the hot ops' value **and** gradient in one read
//! of their inputs, vectorised, and (feature `parallel`) spread over threads.
//!
//! # Why a second driver
//!
//! The drivers of [`policy`](crate::policy), [`kl`](crate::kl),
//! [`aggregate`](crate::aggregate) and [`logits`](crate::logits) are written
//! for clarity: one op per call, intermediate arrays in a scratch buffer, one
//! token at a time. A training step chains several of them (surrogate, KL
//! estimate, aggregation, then the gradient), so the same `[batch, seq]`
//! arrays travel through memory several times. The drivers here run the
//! **same per-token kernels** — [`PolicyLoss::token`],
//! [`KlConfig::estimate`], [`log_softmax_vjp_term`], [`entropy_vjp_term`],
//! each written once over [`Elem`] — but on [`Lanes`]: 64 consecutive
//! tokens at a time, as one value. Every kernel is branch-free (selections,
//! not `if`s) and [`Real::exp_flush_subnormal`] is a polynomial, so the compiler
//! turns a lane operation into a vector instruction. Nothing is stored
//! between the kernels: each token's loss, KL and gradient are formed in
//! registers, summed into per-lane accumulators, and the gradient is written
//! once.
//!
//! | fused driver | reads | writes | the unfused chain it replaces |
//! |---|---|---|---|
//! | [`token_loss`] | `log π`, `log π_old`, `log π_ref`, `A`, mask (+ IS weights) once | `∂L/∂log π` once | [`policy_loss`](crate::policy::token::policy_loss) + [`KlConfig::estimate_slices`] + [`aggregate`](crate::aggregate::aggregate) |
//! | [`token_loss_per_token`] | the same | `∂L/∂log π`, and each term's per-token loss and gradient ([`TokenLossPerToken`]) | the same, keeping its per-token arrays |
//! | [`log_probs_entropy`] | the logits once from memory (its max), again from the cache (its exp-sums) | `log p[target]`, `H`, `lse` per row | [`gather_log_softmax`](crate::logits::gather_log_softmax) + [`entropy_from_logits`](crate::logits::entropy_from_logits) |
//! | [`log_probs_entropy_backward`] | the logits once | `∂/∂logits` once | their two VJPs |
//!
//! # Agreement with the reference drivers
//!
//! The values are the reference drivers' up to summation order and the
//! polynomial `exp` (`f32`: within 2 ulp of `libm`, results below 2⁻¹²⁶
//! flushed to 0): the `fused` tests check
//! every supported loss variant, KL estimator and aggregation mode against
//! the reference chain within `1e-5` relative (`f32`) and `1e-12` (`f64`),
//! with NaN and ±inf in masked positions. Rows of logits holding `+inf` or
//! NaN (or only `−inf`) are handed to the reference row kernels, so they give
//! exactly the reference's IEEE answer.
//!
//! # Determinism
//!
//! Each row is reduced in the same lane order whatever the thread count, and
//! row totals are added in row order, so results are bitwise identical for
//! 1, 2 or 64 threads (tested).
//!
//! # Example
//!
//! ```
//! use posttrain_core::aggregate::{AggMode, GlobalNorm};
//! use posttrain_core::fused::{token_loss, KlPenalty, TokenLoss};
//! use posttrain_core::kl::{KlConfig, KlEstimator};
//! use posttrain_core::policy::token::{PolicyBatch, PolicyLoss};
//! use posttrain_core::policy::ClipConfig;
//! use posttrain_core::{Dims, Preset};
//!
//! // verl's actor loss: vanilla PPO (clip 0.2/0.28, dual clip 3) + 0.001 · low_var_kl,
//! // both aggregated seq-mean-token-mean.
//! let cfg = TokenLoss {
//!     loss: PolicyLoss::Ppo(ClipConfig::preset(Preset::Verl, 0.2, 0.28)),
//!     agg: AggMode::SeqMeanTokenMean,
//!     norm: GlobalNorm::default(),
//!     kl: Some(KlPenalty { estimator: KlConfig::preset(KlEstimator::K3, Preset::Verl), coef: 0.001 }),
//! };
//! let dims = Dims::new(2, 3);
//! let batch = PolicyBatch {
//!     dims,
//!     log_prob: &[-1.0f32, -0.5, -2.0, -0.3, -0.7, f32::NAN],
//!     old_log_prob: &[-1.1, -0.4, -2.0, -0.3, -0.9, 0.0],
//!     advantages: &[1.0, 1.0, 1.0, -0.5, -0.5, -0.5],
//!     mask: &[true, true, true, true, true, false],
//!     is_weights: None,
//! };
//! let reference = [-1.0f32, -0.6, -2.1, -0.2, -0.7, 0.0];
//! let mut grad = [0.0f32; 6];
//! let out = token_loss(&cfg, &batch, Some(&reference), Some((1.0, &mut grad)))?;
//! assert!(out.loss.is_finite() && grad[5] == 0.0);
//! # Ok::<(), posttrain_core::Error>(())
//! ```

// Index loops over fixed-size arrays are what the vectoriser handles best.
#![allow(clippy::needless_range_loop)]

use crate::aggregate::{AggMode, AggTotals, GlobalNorm};
use crate::elem::{Elem, MaskElem, Real};
use crate::error::{check_len, check_param, Error};
use crate::kl::{KlConfig, KlEstimator};
use crate::logits::{
    check_ids, check_rows, entropy_vjp_term, log_softmax_vjp_term, reference_row_entropy,
    scaled_max_lse, Temperature,
};
use crate::policy::token::{
    clipped_token, clipped_weight_token, divergence_masked_token, log_prob_token,
    quadratic_penalty_token, soft_gated_token, DivergenceConfig, PolicyBatch, PolicyLoss,
    PolicyLossOutput, PolicyToken,
};
use crate::policy::ClipConfig;

/// How many consecutive elements a [`Lanes`] value holds. Each lane
/// operation is a loop of this many iterations over small arrays, which the
/// compiler turns into vector code (measured on the logits kernels, 2-core
/// x86-64 baseline build: 8 lanes 1.67 s, 16 lanes 1.44 s, 32 lanes 1.09 s,
/// 64 lanes 1.98 s for `[8, 512, 32000]` forward + backward on one thread —
/// past 32 the lanes are copied through memory).
pub const LANES: usize = 32;

/// [`LANES`] consecutive elements processed as one [`Elem`] value: each
/// operation applies to every lane, so a kernel written over [`Elem`] runs on
/// 64 tokens at once and the compiler emits vector instructions.
///
/// `exp` is [`Real::exp_flush_subnormal`]; `ln`, `ln_1p`, `sqrt` and `powf` apply
/// the scalar function lane by lane.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lanes<F>(pub [F; LANES]);

/// The comparison result of [`Lanes`]: one `bool` per lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneMask(pub [bool; LANES]);

impl LaneMask {
    /// How many lanes are set.
    #[inline(always)]
    pub fn count(&self) -> usize {
        self.0.iter().filter(|&&b| b).count()
    }
}

impl MaskElem for LaneMask {
    #[inline(always)]
    fn and(self, rhs: Self) -> Self {
        let mut o = self.0;
        for i in 0..LANES {
            o[i] = self.0[i] & rhs.0[i];
        }
        LaneMask(o)
    }
    #[inline(always)]
    fn or(self, rhs: Self) -> Self {
        let mut o = self.0;
        for i in 0..LANES {
            o[i] = self.0[i] | rhs.0[i];
        }
        LaneMask(o)
    }
    #[inline(always)]
    fn not(self) -> Self {
        let mut o = self.0;
        for i in 0..LANES {
            o[i] = !self.0[i];
        }
        LaneMask(o)
    }
}

impl<F: Real> Lanes<F> {
    /// Every lane `v`.
    #[inline(always)]
    pub fn splat(v: F) -> Self {
        Lanes([v; LANES])
    }
    /// The lanes `src[i]`, and `fill` past the end of `src` (a short tail).
    #[inline(always)]
    pub fn load(src: &[F], fill: F) -> Self {
        let mut a = [fill; LANES];
        if src.len() >= LANES {
            a.copy_from_slice(&src[..LANES]);
        } else {
            a[..src.len()].copy_from_slice(src);
        }
        Lanes(a)
    }
    /// Writes the first `dst.len()` (≤ [`LANES`]) lanes into `dst`.
    #[inline(always)]
    pub fn store(self, dst: &mut [F]) {
        let n = dst.len();
        dst.copy_from_slice(&self.0[..n]);
    }
    #[inline(always)]
    fn map(self, f: impl Fn(F) -> F) -> Self {
        let mut o = self.0;
        for i in 0..LANES {
            o[i] = f(self.0[i]);
        }
        Lanes(o)
    }
    #[inline(always)]
    fn zip(self, rhs: Self, f: impl Fn(F, F) -> F) -> Self {
        let mut o = self.0;
        for i in 0..LANES {
            o[i] = f(self.0[i], rhs.0[i]);
        }
        Lanes(o)
    }
    #[inline(always)]
    fn test(&self, f: impl Fn(F) -> bool) -> LaneMask {
        let mut o = [false; LANES];
        for i in 0..LANES {
            o[i] = f(self.0[i]);
        }
        LaneMask(o)
    }
    #[inline(always)]
    fn test2(&self, rhs: &Self, f: impl Fn(F, F) -> bool) -> LaneMask {
        let mut o = [false; LANES];
        for i in 0..LANES {
            o[i] = f(self.0[i], rhs.0[i]);
        }
        LaneMask(o)
    }
}

impl<F: Real> Elem for Lanes<F> {
    type Mask = LaneMask;

    #[inline(always)]
    fn full_like(&self, v: f64) -> Self {
        Lanes::splat(F::of(v))
    }
    #[inline(always)]
    fn add(self, rhs: Self) -> Self {
        self.zip(rhs, |a, b| a + b)
    }
    #[inline(always)]
    fn sub(self, rhs: Self) -> Self {
        self.zip(rhs, |a, b| a - b)
    }
    #[inline(always)]
    fn mul(self, rhs: Self) -> Self {
        self.zip(rhs, |a, b| a * b)
    }
    #[inline(always)]
    fn div(self, rhs: Self) -> Self {
        self.zip(rhs, |a, b| a / b)
    }
    #[inline(always)]
    fn neg(self) -> Self {
        self.map(|a| -a)
    }
    #[inline(always)]
    fn add_scalar(self, v: f64) -> Self {
        let v = F::of(v);
        self.map(|a| a + v)
    }
    #[inline(always)]
    fn mul_scalar(self, v: f64) -> Self {
        let v = F::of(v);
        self.map(|a| a * v)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        self.map(F::exp_flush_subnormal)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        self.map(Elem::ln)
    }
    #[inline(always)]
    fn ln_1p(self) -> Self {
        self.map(Elem::ln_1p)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        self.map(Elem::abs)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        self.map(Elem::sqrt)
    }
    #[inline(always)]
    fn powf(self, p: f64) -> Self {
        self.map(|a| a.powf(p))
    }
    #[inline(always)]
    fn min(self, rhs: Self) -> Self {
        self.zip(rhs, Elem::min)
    }
    #[inline(always)]
    fn max(self, rhs: Self) -> Self {
        self.zip(rhs, Elem::max)
    }
    #[inline(always)]
    fn clamp(self, lo: f64, hi: f64) -> Self {
        self.map(|a| a.clamp(lo, hi))
    }
    #[inline(always)]
    fn gt(&self, rhs: &Self) -> LaneMask {
        self.test2(rhs, |a, b| a > b)
    }
    #[inline(always)]
    fn ge(&self, rhs: &Self) -> LaneMask {
        self.test2(rhs, |a, b| a >= b)
    }
    #[inline(always)]
    fn gt_scalar(&self, v: f64) -> LaneMask {
        let v = F::of(v);
        self.test(|a| a > v)
    }
    #[inline(always)]
    fn ge_scalar(&self, v: f64) -> LaneMask {
        let v = F::of(v);
        self.test(|a| a >= v)
    }
    #[inline(always)]
    fn lt_scalar(&self, v: f64) -> LaneMask {
        let v = F::of(v);
        self.test(|a| a < v)
    }
    #[inline(always)]
    fn le_scalar(&self, v: f64) -> LaneMask {
        let v = F::of(v);
        self.test(|a| a <= v)
    }
    #[inline(always)]
    fn select(mask: &LaneMask, on_true: Self, on_false: Self) -> Self {
        let mut o = on_false.0;
        for i in 0..LANES {
            o[i] = if mask.0[i] {
                on_true.0[i]
            } else {
                on_false.0[i]
            };
        }
        Lanes(o)
    }
}

// ---------------------------------------------------------------------------
// Token-level policy loss + KL penalty + aggregation
// ---------------------------------------------------------------------------

/// A KL penalty added to the policy loss: `coef · agg(estimate(log π, log π_ref))`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct KlPenalty {
    /// The estimator with its clamps (verl `kl_loss_type`, through
    /// [`KlConfig::parse_verl`]).
    pub estimator: KlConfig,
    /// Its weight (verl `kl_loss_coef`).
    pub coef: f64,
}

/// Configuration of [`token_loss`]: verl's actor loss,
/// `L = agg(ℓ_policy) + coef · agg(KL)`, both aggregated with the same mode
/// and normalizers.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TokenLoss {
    /// The per-token policy loss. Token-local variants only: every variant
    /// but [`SequenceRatio`](PolicyLoss::SequenceRatio),
    /// [`GeometricMean`](PolicyLoss::GeometricMean),
    /// [`ClipCov`](PolicyLoss::ClipCov) and [`KlCov`](PolicyLoss::KlCov),
    /// which need cross-token passes (use
    /// [`policy_loss`](crate::policy::token::policy_loss) for those).
    pub loss: PolicyLoss,
    /// The aggregation of both terms (verl `loss_agg_mode`).
    pub agg: AggMode,
    /// Global normalizers (verl `global_batch_info`).
    pub norm: GlobalNorm,
    /// The KL penalty in the loss (verl `use_kl_loss`); `None`: off.
    pub kl: Option<KlPenalty>,
}

impl TokenLoss {
    /// Checks the variant, the normalizers and the KL penalty.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for a variant that needs cross-token passes;
    /// [`Error::OutOfRange`] as [`PolicyLoss::validate`],
    /// [`GlobalNorm::validate`], [`KlConfig::validate`], or a non-finite
    /// `kl_loss_coef`.
    pub fn validate(&self) -> Result<(), Error> {
        if !self.loss.is_token_local() {
            return Err(Error::Invalid {
                input: "loss",
                rule:
                    "the fused token loss runs token-local variants only; gspo, geo_mean, \
                       clip_cov and kl_cov need cross-token passes (use policy::token::policy_loss)",
            });
        }
        self.loss.validate()?;
        self.norm.validate()?;
        if let Some(kl) = &self.kl {
            kl.estimator.validate()?;
            check_param(
                kl.coef.is_finite(),
                "kl_loss_coef",
                kl.coef,
                "must be finite",
            )?;
        }
        Ok(())
    }
}

/// What [`token_loss`] returns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLossOutput<F> {
    /// `L = policy.loss + coef · kl_loss`.
    pub loss: F,
    /// The policy term and verl's metrics, as
    /// [`policy_loss`](crate::policy::token::policy_loss) returns them.
    pub policy: PolicyLossOutput<F>,
    /// The aggregated KL estimate before the coefficient (verl `kl_loss`);
    /// 0 without a penalty.
    pub kl_loss: F,
}

/// The per-token values behind [`token_loss`], written by
/// [`token_loss_per_token`] in the same pass: each slice `[batch·seq]`, 0 on
/// masked positions.
///
/// - `policy_loss`: `ISᵢⱼ·ℓᵢⱼ`, the policy loss before aggregation
///   ([`policy_loss`](crate::policy::token::policy_loss)'s `per_token`).
/// - `policy_grad`: `∂ pg_loss/∂log πᵢⱼ = wᵢⱼ·ISᵢⱼ·∂ℓᵢⱼ/∂log π` (its
///   gradient, with no cotangent).
/// - `kl`: `KLᵢⱼ`, the estimate before aggregation.
/// - `kl_grad`: `∂ kl_loss/∂log πᵢⱼ = vᵢⱼ·∂KLᵢⱼ/∂log π` (before `coef`).
///
/// Without a KL penalty `kl` and `kl_grad` may be empty (if not, they
/// receive zeros).
#[derive(Debug)]
pub struct TokenLossPerToken<'a, F> {
    /// `IS·ℓ` per token.
    pub policy_loss: &'a mut [F],
    /// `w·IS·∂ℓ/∂log π` per token.
    pub policy_grad: &'a mut [F],
    /// `KL` per token (with a penalty).
    pub kl: &'a mut [F],
    /// `v·∂KL/∂log π` per token (with a penalty).
    pub kl_grad: &'a mut [F],
}

impl<'a, F: Copy> TokenLossPerToken<'a, F> {
    /// Sets every slice to `v`.
    fn fill(&mut self, v: F) {
        self.policy_loss.fill(v);
        self.policy_grad.fill(v);
        self.kl.fill(v);
        self.kl_grad.fill(v);
    }

    /// The slices of the positions `r`.
    fn part(&mut self, r: core::ops::Range<usize>) -> TokenLossPerToken<'_, F> {
        let kl_r = if self.kl.is_empty() { 0..0 } else { r.clone() };
        TokenLossPerToken {
            policy_loss: &mut self.policy_loss[r.clone()],
            policy_grad: &mut self.policy_grad[r],
            kl: &mut self.kl[kl_r.clone()],
            kl_grad: &mut self.kl_grad[kl_r],
        }
    }

    /// Splits into the consecutive parts of `len` positions each.
    #[cfg(feature = "parallel")]
    fn split(self, len: usize) -> impl Iterator<Item = TokenLossPerToken<'a, F>> {
        let has_kl = !self.kl.is_empty();
        let (kl, kl_grad) = (
            self.kl.chunks_mut(len.max(1)),
            self.kl_grad.chunks_mut(len.max(1)),
        );
        let mut kls = kl.zip(kl_grad);
        self.policy_loss
            .chunks_mut(len.max(1))
            .zip(self.policy_grad.chunks_mut(len.max(1)))
            .map(move |(policy_loss, policy_grad)| {
                let (kl, kl_grad): (&'a mut [F], &'a mut [F]) = if has_kl {
                    kls.next().expect("as many KL parts")
                } else {
                    (&mut [], &mut [])
                };
                TokenLossPerToken {
                    policy_loss,
                    policy_grad,
                    kl,
                    kl_grad,
                }
            })
    }
}

/// One row's contribution, kept apart so that rows can be reduced on any
/// thread and added in row order.
#[derive(Debug, Clone, Copy, Default)]
struct RowTotals {
    policy: f64,
    kl: f64,
    kl_metric: f64,
    valid: usize,
    clipped: usize,
    lower: usize,
}

impl RowTotals {
    #[inline]
    fn add(&mut self, o: &RowTotals) {
        self.policy += o.policy;
        self.kl += o.kl;
        self.kl_metric += o.kl_metric;
        self.valid += o.valid;
        self.clipped += o.clipped;
        self.lower += o.lower;
    }
}

/// Checks the inputs and returns the batch totals the weights need.
fn token_loss_check<F: Real>(
    cfg: &TokenLoss,
    batch: &PolicyBatch<'_, F>,
    ref_log_prob: Option<&[F]>,
    grad_len: Option<usize>,
) -> Result<AggTotals, Error> {
    cfg.validate()?;
    batch.check()?;
    let n = batch.dims.len();
    match (cfg.kl.is_some(), ref_log_prob) {
        (true, None) => {
            return Err(Error::Invalid {
                input: "ref_log_prob",
                rule: "a KL penalty needs the reference log-probs",
            })
        }
        (_, Some(r)) => check_len("ref_log_prob", r.len(), n)?,
        _ => {}
    }
    if let Some(g) = grad_len {
        check_len("grad", g, n)?;
    }
    Ok(AggTotals::of(batch.mask, batch.dims))
}

/// A float whose [`Elem::exp`] is [`Real::exp_flush_subnormal`]: the per-token
/// kernels run on it one token at a time inside plain loops over slices,
/// which the compiler vectorises (no calls, every branch a selection).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
struct Fast<F>(F);

impl<F: Real> Elem for Fast<F> {
    type Mask = bool;
    #[inline(always)]
    fn full_like(&self, v: f64) -> Self {
        Fast(F::of(v))
    }
    #[inline(always)]
    fn add(self, rhs: Self) -> Self {
        Fast(self.0 + rhs.0)
    }
    #[inline(always)]
    fn sub(self, rhs: Self) -> Self {
        Fast(self.0 - rhs.0)
    }
    #[inline(always)]
    fn mul(self, rhs: Self) -> Self {
        Fast(self.0 * rhs.0)
    }
    #[inline(always)]
    fn div(self, rhs: Self) -> Self {
        Fast(self.0 / rhs.0)
    }
    #[inline(always)]
    fn neg(self) -> Self {
        Fast(-self.0)
    }
    #[inline(always)]
    fn add_scalar(self, v: f64) -> Self {
        Fast(self.0 + F::of(v))
    }
    #[inline(always)]
    fn mul_scalar(self, v: f64) -> Self {
        Fast(self.0 * F::of(v))
    }
    #[inline(always)]
    fn exp(self) -> Self {
        Fast(self.0.exp_flush_subnormal())
    }
    #[inline(always)]
    fn ln(self) -> Self {
        Fast(self.0.ln())
    }
    #[inline(always)]
    fn ln_1p(self) -> Self {
        Fast(self.0.ln_1p())
    }
    #[inline(always)]
    fn abs(self) -> Self {
        Fast(Elem::abs(self.0))
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        Fast(Elem::sqrt(self.0))
    }
    #[inline(always)]
    fn powf(self, p: f64) -> Self {
        Fast(self.0.powf(p))
    }
    #[inline(always)]
    fn min(self, rhs: Self) -> Self {
        Fast(Elem::min(self.0, rhs.0))
    }
    #[inline(always)]
    fn max(self, rhs: Self) -> Self {
        Fast(Elem::max(self.0, rhs.0))
    }
    /// One selection: `v` is a constant, never NaN, and `x > v` is false
    /// for a NaN `x`, which comes through as it is.
    #[inline(always)]
    fn min_scalar(self, v: f64) -> Self {
        let v = F::of(v);
        Fast(if self.0 > v { v } else { self.0 })
    }
    /// [`Elem::clamp`] in two selections instead of six operations: the
    /// bounds of the fused kernels are validated (never NaN), so only `self`
    /// can be NaN, and `x < lo` and `y > hi` are false for it — a NaN comes
    /// through as it is, as `Elem::clamp`'s does (its payload may differ).
    #[inline(always)]
    fn clamp(self, lo: f64, hi: f64) -> Self {
        let (lo, hi) = (F::of(lo), F::of(hi));
        let y = if self.0 < lo { lo } else { self.0 };
        Fast(if y > hi { hi } else { y })
    }
    #[inline(always)]
    fn gt(&self, rhs: &Self) -> bool {
        self.0 > rhs.0
    }
    #[inline(always)]
    fn ge(&self, rhs: &Self) -> bool {
        self.0 >= rhs.0
    }
    #[inline(always)]
    fn gt_scalar(&self, v: f64) -> bool {
        self.0 > F::of(v)
    }
    #[inline(always)]
    fn ge_scalar(&self, v: f64) -> bool {
        self.0 >= F::of(v)
    }
    #[inline(always)]
    fn lt_scalar(&self, v: f64) -> bool {
        self.0 < F::of(v)
    }
    #[inline(always)]
    fn le_scalar(&self, v: f64) -> bool {
        self.0 <= F::of(v)
    }
    #[inline(always)]
    fn select(mask: &bool, on_true: Self, on_false: Self) -> Self {
        if *mask {
            on_true
        } else {
            on_false
        }
    }
}

#[cfg(feature = "std")]
static SIMD_LIMIT: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(u8::MAX);

/// An instruction set the fused loops are compiled for (x86-64; elsewhere
/// only [`VectorIsa::Baseline`] exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VectorIsa {
    /// The build's baseline (SSE2 for a default x86-64 build): 4 `f32` lanes.
    Baseline,
    /// AVX2 + FMA: 8 `f32` lanes.
    Avx2,
    /// AVX-512 (F, BW, DQ, VL) on top of AVX2 + FMA: 16 `f32` lanes, mask
    /// registers for the selections.
    Avx512,
}

/// Caps the instruction set of the fused loops: they run on the widest of
/// the CPU's that is at most `limit` (default: no cap).
///
/// On x86-64 with `std`, every fused loop is compiled three times — for the
/// baseline (SSE2, what a default build targets), for AVX2 + FMA and for
/// AVX-512 — and the widest the CPU has (checked at run time) runs. Results
/// are **bitwise identical** at every level: the same operations in the same
/// order (no fused multiply-add is formed), only wider (tested). This switch
/// exists to measure the difference and to rule it out.
#[cfg(feature = "std")]
pub fn limit_vector_isa(limit: VectorIsa) {
    SIMD_LIMIT.store(limit as u8, core::sync::atomic::Ordering::Relaxed);
}

/// `use_simd_extensions(false)` is [`limit_vector_isa`]`(VectorIsa::Baseline)`,
/// `use_simd_extensions(true)` lifts the cap.
#[cfg(feature = "std")]
pub fn use_simd_extensions(enabled: bool) {
    let limit = if enabled {
        u8::MAX
    } else {
        VectorIsa::Baseline as u8
    };
    SIMD_LIMIT.store(limit, core::sync::atomic::Ordering::Relaxed);
}

/// The instruction set the fused loops run on now: the widest the CPU has,
/// within the cap of [`limit_vector_isa`].
#[cfg(feature = "std")]
pub fn vector_isa() -> VectorIsa {
    use core::sync::atomic::Ordering::Relaxed;
    // The CPU's widest level, detected on the first call (u8::MAX: not yet).
    static CPU: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(u8::MAX);
    let mut cpu = CPU.load(Relaxed);
    if cpu == u8::MAX {
        cpu = VectorIsa::Baseline as u8;
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            let avx512 = avx2
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512dq")
                && std::is_x86_feature_detected!("avx512vl");
            cpu = if avx512 {
                VectorIsa::Avx512 as u8
            } else if avx2 {
                VectorIsa::Avx2 as u8
            } else {
                cpu
            };
        }
        CPU.store(cpu, Relaxed);
    }
    // `cpu` ≤ 2: the discriminants are the declaration order.
    [VectorIsa::Baseline, VectorIsa::Avx2, VectorIsa::Avx512]
        [usize::from(cpu.min(SIMD_LIMIT.load(Relaxed)))]
}

/// Defines `fn $name`, which runs the `#[inline(always)]` function `$body`
/// with the same arguments compiled for the widest instruction set of
/// [`vector_isa`]: three copies of the loop, one per [`VectorIsa`].
macro_rules! multiversioned {
    (
        $(#[$m:meta])*
        $vis:vis fn $name:ident<$($g:ident: $b:path),*>($($a:ident: $t:ty),* $(,)?) $(-> $ret:ty)? => $body:ident
    ) => {
        $(#[$m])*
        #[inline(never)]
        $vis fn $name<$($g: $b),*>($($a: $t),*) $(-> $ret)? {
            #[cfg(all(feature = "std", target_arch = "x86_64"))]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn avx512<$($g: $b),*>($($a: $t),*) $(-> $ret)? {
                    $body($($a),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                fn avx2<$($g: $b),*>($($a: $t),*) $(-> $ret)? {
                    $body($($a),*)
                }
                match vector_isa() {
                    #[allow(unsafe_code)]
                    // SAFETY: `vector_isa()` checked that this CPU has AVX-512 F/BW/DQ/VL, AVX2 and FMA.
                    VectorIsa::Avx512 => return unsafe { avx512($($a),*) },
                    #[allow(unsafe_code)]
                    // SAFETY: `vector_isa()` checked that this CPU has AVX2 and FMA.
                    VectorIsa::Avx2 => return unsafe { avx2($($a),*) },
                    VectorIsa::Baseline => {}
                }
            }
            $body($($a),*)
        }
    };
}

/// A token-local policy kernel as a type: its call is always inlined into
/// the loop (closures are not, once the loop is compiled for AVX2).
trait TokenKernel<F: Real> {
    fn token(&self, x: Fast<F>, old: Fast<F>, adv: Fast<F>) -> PolicyToken<Fast<F>>;
}

/// The rollout importance weights as a type (see [`TokenKernel`]): given
/// ([`Weighted`]) or absent ([`Unweighted`], a constant 1 whose products fold
/// away — exact: `x·1 = x`).
trait IsWeights<F: Real> {
    fn weight(&self, given: F) -> F;
}

/// The weight is the given one.
struct Weighted;

impl<F: Real> IsWeights<F> for Weighted {
    #[inline(always)]
    fn weight(&self, given: F) -> F {
        given
    }
}

/// No weights: 1.
struct Unweighted;

impl<F: Real> IsWeights<F> for Unweighted {
    #[inline(always)]
    fn weight(&self, _given: F) -> F {
        F::one()
    }
}

/// A block's mask as a type (see [`TokenKernel`]): read token by token
/// ([`Masked`]), or known to be all `true` ([`AllValid`]: a block without
/// padding, where the loop loads no mask byte and every selection on it
/// folds away — exact, the same bits as [`Masked`] on that block).
trait BlockMask {
    fn valid(&self, mask: &[bool], j: usize) -> bool;
}

/// The mask as given.
struct Masked;

impl BlockMask for Masked {
    #[inline(always)]
    fn valid(&self, mask: &[bool], j: usize) -> bool {
        mask[j]
    }
}

/// Every token valid.
struct AllValid;

impl BlockMask for AllValid {
    #[inline(always)]
    fn valid(&self, _mask: &[bool], _j: usize) -> bool {
        true
    }
}

/// Whether the block loop also stores the per-token gradients of the two
/// terms ([`TokenLossPerToken`]), as a type (see [`TokenKernel`]).
trait PerTokenFlag {
    const ON: bool;
}

/// The loss and its gradient only.
struct Totals;

impl PerTokenFlag for Totals {
    const ON: bool = false;
}

/// Also the per-token gradients.
struct PerToken;

impl PerTokenFlag for PerToken {
    const ON: bool = true;
}

/// A KL estimator as a type (see [`TokenKernel`]).
trait KlKernel<F: Real> {
    fn estimate(&self, x: Fast<F>, reference: Fast<F>) -> (Fast<F>, Fast<F>);
}

macro_rules! token_kernel {
    ($name:ident { $($field:ident: $ty:ty),* }, |$s:ident, $x:ident, $o:ident, $a:ident| $body:expr) => {
        #[derive(Clone, Copy)]
        struct $name {
            $($field: $ty),*
        }
        impl<F: Real> TokenKernel<F> for $name {
            #[allow(unused_braces)]
            #[inline(always)]
            fn token(&self, $x: Fast<F>, $o: Fast<F>, $a: Fast<F>) -> PolicyToken<Fast<F>> {
                let $s = self;
                $body
            }
        }
    };
}

token_kernel!(
    PpoKernel {
        clip: ClipConfig,
        clamp: f64,
        dual: f64
    },
    |s, x, o, a| {
        // Literal `Some`s: the kernel's matches on them fold away.
        let c = ClipConfig {
            log_ratio_clamp: Some(s.clamp),
            dual_clip: Some(s.dual),
            ..s.clip
        };
        clipped_token(&c, Some(s.clamp), x, o, a)
    }
);
token_kernel!(
    DivergenceKernel {
        cfg: DivergenceConfig,
        binary_kl: bool
    },
    |s, x, o, a| { divergence_masked_token(&s.cfg, s.binary_kl, x, o, a) }
);
token_kernel!(
    SoftGateKernel {
        tau_pos: f64,
        tau_neg: f64
    },
    |s, x, o, a| { soft_gated_token(s.tau_pos, s.tau_neg, x, o, a) }
);
token_kernel!(LogProbKernel {}, |_s, x, o, a| log_prob_token(x, o, a));
token_kernel!(QuadraticKernel { beta: f64 }, |s, x, o, a| {
    quadratic_penalty_token(s.beta, x, o, a)
});
token_kernel!(
    ClippedWeightKernel {
        eps_low: f64,
        eps_high: f64
    },
    |s, x, o, a| { clipped_weight_token(s.eps_low, s.eps_high, x, o, a) }
);

/// A KL estimator with its variant (`EST`: 0 k1, 1 abs, 2 k2, 3 k3) and
/// straight-through flag as constants and its clamps as numbers.
#[derive(Clone, Copy)]
struct KlOf<const EST: u8, const ST: bool> {
    lr: f64,
    vc: f64,
}

impl<F: Real, const EST: u8, const ST: bool> KlKernel<F> for KlOf<EST, ST> {
    #[inline(always)]
    fn estimate(&self, x: Fast<F>, reference: Fast<F>) -> (Fast<F>, Fast<F>) {
        let estimator = match EST {
            0 => KlEstimator::K1,
            1 => KlEstimator::Abs,
            2 => KlEstimator::K2,
            _ => KlEstimator::K3,
        };
        KlConfig {
            estimator,
            straight_through: ST,
            log_ratio_clamp: Some(self.lr),
            value_clamp: Some(self.vc),
        }
        .estimate(x, reference)
    }
}

/// No KL term: a constant 0.
#[derive(Clone, Copy)]
struct NoKl;

impl<F: Real> KlKernel<F> for NoKl {
    #[inline(always)]
    fn estimate(&self, x: Fast<F>, _reference: Fast<F>) -> (Fast<F>, Fast<F>) {
        (x.full_like(0.0), x.full_like(0.0))
    }
}

/// An optional clamp or cap as a number: `None` is `+∞`. With a clamp at
/// `±∞` the kernels compute the same numbers as without one (the clamp is the
/// identity, its "inactive" mask all true; a dual clip at `∞` never binds) —
/// except that a *valid* position holding NaN gets gradient 0 instead of NaN
/// (its loss stays NaN) — and the fused loops then have no branch on the
/// option.
#[inline(always)]
fn sure(v: Option<f64>) -> f64 {
    v.unwrap_or(f64::INFINITY)
}

/// Tokens per block of the fused token loss: a row runs in blocks of this
/// many tokens (the per-token values of a block live in small stack buffers
/// between the element-wise loop and the reductions), and a block that holds
/// padding only (no `true` in its mask) is skipped: its gradient is written
/// as zeros and none of its inputs are read. A benchmark counting the bytes
/// the kernel moves needs it.
pub const TOKEN_BLOCK: usize = 256;
const BLOCK: usize = TOKEN_BLOCK;

/// Sum of `v` with eight interleaved partial sums (a fixed order the
/// compiler vectorises; plain `+=` in a loop cannot be reordered).
#[inline(always)]
fn sum8<F: Real>(v: &[F]) -> F {
    let mut p = [F::zero(); 8];
    let mut c = v.chunks_exact(8);
    for x in &mut c {
        for i in 0..8 {
            p[i] += x[i];
        }
    }
    for (i, &x) in c.remainder().iter().enumerate() {
        p[i] += x;
    }
    ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]))
}

multiversioned! {
    /// How many of `mask` are `true` (the valid tokens of a row or a batch),
    /// for the widest instruction set the CPU has.
    pub(crate) fn count_true<>(mask: &[bool]) -> usize => count_true_body
}

/// Byte sums over stretches of 255 (no `u8` overflow): they vectorise, 16
/// to 64 positions per instruction, where `filter().count()` went one byte
/// at a time.
#[inline(always)]
fn count_true_body(mask: &[bool]) -> usize {
    let mut total = 0;
    for c in mask.chunks(255) {
        let mut s = 0u8;
        for &m in c {
            s += u8::from(m);
        }
        total += usize::from(s);
    }
    total
}

/// Whether any of `mask` is `true`, and whether all are: an OR and an AND
/// of the bytes, which vectorise on every instruction set (no early exit; a
/// block is 256 bytes).
#[inline(always)]
fn any_all_true(mask: &[bool]) -> (bool, bool) {
    let (any, all) = mask.iter().fold((0u8, 1u8), |(any, all), &m| {
        (any | u8::from(m), all & u8::from(m))
    });
    (any != 0, all != 0)
}

/// A row's gradient scales: `c·w`, `c·coef·v` (the total's) and `w`, `v`
/// (the per-token gradients', see [`TokenLossPerToken`]).
#[derive(Clone, Copy)]
struct RowScales<F> {
    scale_pol: F,
    scale_kl: F,
    w_pol: F,
    w_kl: F,
}

/// What one row needs besides the kernel.
struct RowInputs<'a, F> {
    lp: &'a [F],
    old: &'a [F],
    adv: &'a [F],
    mask: &'a [bool],
    isw: Option<&'a [F]>,
    rlp: Option<&'a [F]>,
}

multiversioned! {
    /// [`token_block_body`] compiled for the widest instruction set the CPU
    /// has (see [`limit_vector_isa`]).
    #[allow(clippy::too_many_arguments)]
    fn token_block<F: Real, K: TokenKernel<F>, L: KlKernel<F>, W: IsWeights<F>, M: BlockMask, P: PerTokenFlag>(
        k: &K,
        kl: &L,
        weights: &W,
        valid: &M,
        per: &P,
        lp: &[F],
        old: &[F],
        adv: &[F],
        isw: &[F],
        rlp: &[F],
        mask: &[bool],
        scale_pol: F,
        scale_kl: F,
        w_pol: F,
        w_kl: F,
        lb: &mut [F],
        kb: &mut [F],
        mb: &mut [F],
        cb: &mut [F],
        db: &mut [F],
        gb: &mut [F],
        pgb: &mut [F],
        kgb: &mut [F],
        sums: &mut [F; 5],
    ) => token_block_body
}

/// One block of tokens: the per-token kernels, every result stored into the
/// block buffers, then the block's sums of the loss, KL, KL metric and the two
/// clip indicators into `sums` (in the same build, so they vectorise too). A
/// separate function whose slices are arguments (so the compiler knows the
/// outputs alias nothing) with a straight-line body (every store
/// unconditional, every branch a selection): it vectorises.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn token_block_body<F: Real, K, L, W, M, P>(
    k: &K,
    kl: &L,
    weights: &W,
    valid: &M,
    _per: &P,
    lp: &[F],
    old: &[F],
    adv: &[F],
    isw: &[F],
    rlp: &[F],
    mask: &[bool],
    scale_pol: F,
    scale_kl: F,
    w_pol: F,
    w_kl: F,
    lb: &mut [F],
    kb: &mut [F],
    mb: &mut [F],
    cb: &mut [F],
    db: &mut [F],
    gb: &mut [F],
    pgb: &mut [F],
    kgb: &mut [F],
    sums: &mut [F; 5],
) where
    K: TokenKernel<F>,
    L: KlKernel<F>,
    W: IsWeights<F>,
    M: BlockMask,
    P: PerTokenFlag,
{
    let len = mask.len();
    let (lp, old, adv, isw, rlp) = (
        &lp[..len],
        &old[..len],
        &adv[..len],
        &isw[..len],
        &rlp[..len],
    );
    let (lb, kb, mb, cb, db, gb) = (
        &mut lb[..len],
        &mut kb[..len],
        &mut mb[..len],
        &mut cb[..len],
        &mut db[..len],
        &mut gb[..len],
    );
    let (pgb, kgb) = if P::ON {
        (&mut pgb[..len], &mut kgb[..len])
    } else {
        (&mut pgb[..0], &mut kgb[..0])
    };
    let zero = F::zero();
    for j in 0..len {
        let m = valid.valid(mask, j);
        // Masked tokens run on zeros (padding may hold NaN or inf) and are
        // selected away.
        let pick = |v: F| if m { v } else { zero };
        let x = pick(lp[j]);
        let t = k.token(Fast(x), Fast(pick(old[j])), Fast(pick(adv[j])));
        // Not masked here: every product with `w` is selected below.
        let w = weights.weight(isw[j]);
        let (kv, kg) = kl.estimate(Fast(x), Fast(pick(rlp[j])));
        lb[j] = pick(t.loss.0 * w);
        kb[j] = pick(kv.0);
        mb[j] = pick(t.kl.0);
        cb[j] = if m & t.clipped { F::one() } else { zero };
        db[j] = if m & t.clipped_lower { F::one() } else { zero };
        gb[j] = pick(t.grad.0 * w * scale_pol + kg.0 * scale_kl);
        if P::ON {
            pgb[j] = pick(t.grad.0 * w * w_pol);
            kgb[j] = pick(kg.0 * w_kl);
        }
    }
    *sums = [sum8(lb), sum8(kb), sum8(mb), sum8(cb), sum8(db)];
}

/// The row loop for one policy kernel `k` and KL estimator `kl` (both
/// monomorphised, so the loop body has no variant dispatch). The body is
/// straight-line — every store unconditional, every branch a selection — so
/// the compiler vectorises it.
#[inline(always)]
fn token_loss_row_with<F: Real, K, L>(
    k: K,
    kl: L,
    row: &RowInputs<'_, F>,
    scale: RowScales<F>,
    mut grad: Option<&mut [F]>,
    mut per: Option<TokenLossPerToken<'_, F>>,
    out: &mut RowTotals,
) where
    K: TokenKernel<F>,
    L: KlKernel<F>,
{
    let RowScales {
        scale_pol,
        scale_kl,
        w_pol,
        w_kl,
    } = scale;
    let zero = F::zero();
    let mut lbuf = [zero; BLOCK];
    let mut kbuf = [zero; BLOCK];
    let mut mbuf = [zero; BLOCK];
    let mut cbuf = [zero; BLOCK];
    let mut dbuf = [zero; BLOCK];
    let mut gbuf = [zero; BLOCK];
    // The per-token gradients of the two terms (with `per` only).
    let mut pgbuf = [zero; BLOCK];
    let mut kgbuf = [zero; BLOCK];
    let (mut pol, mut klv, mut klm, mut clipped, mut lower) = (zero, zero, zero, zero, zero);
    let n = row.mask.len();
    let mut start = 0;
    while start < n {
        let len = (n - start).min(BLOCK);
        let r = start..start + len;
        let (lp, old, adv, mask) = (
            &row.lp[r.clone()],
            &row.old[r.clone()],
            &row.adv[r.clone()],
            &row.mask[r.clone()],
        );
        // Without weights any slice will do: `Unweighted` reads none.
        let isw = row.isw.map_or(lp, |v| &v[r.clone()]);
        // Without a KL term the estimator is a constant 0 (any slice will do).
        let rlp = row.rlp.map_or(lp, |v| &v[r.clone()]);
        let (lb, kb, mb, cb, db) = (
            &mut lbuf[..len],
            &mut kbuf[..len],
            &mut mbuf[..len],
            &mut cbuf[..len],
            &mut dbuf[..len],
        );
        // The gradient goes straight to its place (or to a scratch block).
        let gb = match grad.as_deref_mut() {
            Some(g) => &mut g[r.clone()],
            None => &mut gbuf[..len],
        };
        let mut per_block = per.as_mut().map(|p| p.part(r.clone()));
        let (any, all) = any_all_true(mask);
        if !any {
            // Padding only: the loop would select zeros for every token (its
            // gradient +0, its sums 0), so skip it and read none of the
            // block's inputs. Bitwise the same results.
            gb.fill(zero);
            if let Some(p) = per_block.as_mut() {
                p.fill(zero);
            }
            start += len;
            continue;
        }
        let (pgb, kgb) = (&mut pgbuf[..len], &mut kgbuf[..len]);
        let mut sums = [zero; 5];
        // The block loop built with or without IS weights (see `IsWeights`),
        // for a block with or without padding (see `BlockMask`), storing the
        // per-token gradients or not (see `PerTokenFlag`).
        macro_rules! block {
            ($weights:expr, $valid:expr, $per:expr) => {
                token_block(
                    &k, &kl, $weights, $valid, $per, lp, old, adv, isw, rlp, mask, scale_pol,
                    scale_kl, w_pol, w_kl, lb, kb, mb, cb, db, gb, pgb, kgb, &mut sums,
                )
            };
        }
        match (row.isw.is_some(), all, per_block.is_some()) {
            (true, true, false) => block!(&Weighted, &AllValid, &Totals),
            (true, false, false) => block!(&Weighted, &Masked, &Totals),
            (false, true, false) => block!(&Unweighted, &AllValid, &Totals),
            (false, false, false) => block!(&Unweighted, &Masked, &Totals),
            // Per-token outputs: one build for every mask (a rarer call).
            (true, _, true) => block!(&Weighted, &Masked, &PerToken),
            (false, _, true) => block!(&Unweighted, &Masked, &PerToken),
        }
        if let Some(p) = per_block {
            p.policy_loss.copy_from_slice(lb);
            p.policy_grad.copy_from_slice(pgb);
            if !p.kl.is_empty() {
                p.kl.copy_from_slice(kb);
                p.kl_grad.copy_from_slice(kgb);
            }
        }
        pol += sums[0];
        klv += sums[1];
        klm += sums[2];
        clipped += sums[3];
        lower += sums[4];
        start += len;
    }
    out.policy = pol.to_f64();
    out.kl = klv.to_f64();
    out.kl_metric = klm.to_f64();
    out.clipped = clipped.to_f64() as usize;
    out.lower = lower.to_f64() as usize;
}

/// Runs one row: the per-token kernels on every valid token, the gradient
/// written once, the row's sums returned.
#[inline(always)]
fn token_loss_row<F: Real>(
    cfg: &TokenLoss,
    batch: &PolicyBatch<'_, F>,
    ref_log_prob: Option<&[F]>,
    totals: &AggTotals,
    row: usize,
    grad: Option<(F, &mut [F])>,
    per: Option<TokenLossPerToken<'_, F>>,
) -> RowTotals {
    let dims = batch.dims;
    let range = dims.row(row);
    let mask = &batch.mask[range.clone()];
    let n = count_true(mask);
    let mut out = RowTotals {
        valid: n,
        ..RowTotals::default()
    };
    // SAPO and GSPO force seq-mean-token-mean on the policy term (as verl);
    // the KL term keeps the requested mode.
    let w_pol = totals.row_weight(cfg.loss.effective_agg(cfg.agg), &cfg.norm, dims.seq, n);
    let w_kl = totals.row_weight(cfg.agg, &cfg.norm, dims.seq, n);
    let (cot, grad) = match grad {
        Some((c, g)) => (c, Some(g)),
        None => (F::zero(), None),
    };
    if n == 0 {
        if let Some(g) = grad {
            g.iter_mut().for_each(|x| *x = F::zero());
        }
        if let Some(mut p) = per {
            p.fill(F::zero());
        }
        return out;
    }
    let coef = cfg.kl.map_or(0.0, |k| k.coef);
    // ∂L/∂log π = c·w_pol·IS·∂ℓ + c·coef·w_kl·∂KL
    let scale = RowScales {
        scale_pol: cot * F::of(w_pol),
        scale_kl: cot * F::of(coef * w_kl),
        w_pol: F::of(w_pol),
        w_kl: F::of(w_kl),
    };
    let inputs = RowInputs {
        lp: &batch.log_prob[range.clone()],
        old: &batch.old_log_prob[range.clone()],
        adv: &batch.advantages[range.clone()],
        mask,
        isw: batch.is_weights.map(|v| &v[range.clone()]),
        rlp: ref_log_prob.map(|v| &v[range.clone()]),
    };
    macro_rules! run_kl {
        ($kernel:expr, $kl:expr) => {{
            token_loss_row_with($kernel, $kl, &inputs, scale, grad, per, &mut out)
        }};
    }
    macro_rules! run {
        ($kernel:expr) => {{
            // The estimator's variant and flag become types, its clamps plain
            // numbers (`sure`), so no `match` on a run-time option is left in
            // the loop body (one stops the vectoriser).
            match cfg.kl.map(|k| k.estimator) {
                Some(e) => {
                    let (lr, vc) = (sure(e.log_ratio_clamp), sure(e.value_clamp));
                    match (e.estimator, e.straight_through) {
                        (KlEstimator::K1, false) => run_kl!($kernel, KlOf::<0, false> { lr, vc }),
                        (KlEstimator::Abs, false) => run_kl!($kernel, KlOf::<1, false> { lr, vc }),
                        (KlEstimator::K2, false) => run_kl!($kernel, KlOf::<2, false> { lr, vc }),
                        (KlEstimator::K3, false) => run_kl!($kernel, KlOf::<3, false> { lr, vc }),
                        (KlEstimator::K1, true) => run_kl!($kernel, KlOf::<0, true> { lr, vc }),
                        (KlEstimator::Abs, true) => run_kl!($kernel, KlOf::<1, true> { lr, vc }),
                        (KlEstimator::K2, true) => run_kl!($kernel, KlOf::<2, true> { lr, vc }),
                        (KlEstimator::K3, true) => run_kl!($kernel, KlOf::<3, true> { lr, vc }),
                    }
                }
                None => run_kl!($kernel, NoKl),
            }
        }};
    }
    // One monomorphised loop per variant, calling the variant's kernel
    // directly (the match is outside the loop; `PolicyLoss::token`'s own
    // match inside it stops the vectoriser).
    match cfg.loss {
        PolicyLoss::Ppo(c) => run!(PpoKernel {
            clip: c,
            clamp: sure(c.log_ratio_clamp),
            dual: sure(c.dual_clip),
        }),
        PolicyLoss::DivergenceTv(c) => run!(DivergenceKernel {
            cfg: c,
            binary_kl: false
        }),
        PolicyLoss::DivergenceKl(c) => run!(DivergenceKernel {
            cfg: c,
            binary_kl: true
        }),
        PolicyLoss::SoftGate { tau_pos, tau_neg } => run!(SoftGateKernel { tau_pos, tau_neg }),
        PolicyLoss::LogProb => run!(LogProbKernel {}),
        PolicyLoss::QuadraticPenalty { beta } => run!(QuadraticKernel { beta }),
        PolicyLoss::ClippedWeight { eps_low, eps_high } => {
            run!(ClippedWeightKernel { eps_low, eps_high })
        }
        // Refused by `TokenLoss::validate` before any row runs.
        PolicyLoss::SequenceRatio { .. }
        | PolicyLoss::GeometricMean { .. }
        | PolicyLoss::ClipCov { .. }
        | PolicyLoss::KlCov { .. } => unreachable!("cross-token variants are refused by validate"),
    }
    out.policy *= w_pol;
    out.kl *= w_kl;
    out
}

fn token_loss_output<F: Real>(cfg: &TokenLoss, t: &RowTotals) -> TokenLossOutput<F> {
    const MEAN_EPS: f64 = 1e-8;
    let denom = t.valid as f64 + MEAN_EPS;
    let soft = matches!(cfg.loss, PolicyLoss::SoftGate { .. });
    let (clipfrac, lower) = if soft {
        (0.0, 0.0)
    } else {
        (t.clipped as f64 / denom, t.lower as f64 / denom)
    };
    let coef = cfg.kl.map_or(0.0, |k| k.coef);
    TokenLossOutput {
        loss: F::of(t.policy + coef * t.kl),
        policy: PolicyLossOutput {
            loss: F::of(t.policy),
            clipfrac: F::of(clipfrac),
            clipfrac_lower: F::of(lower),
            approx_kl: F::of(t.kl_metric / denom),
        },
        kl_loss: F::of(t.kl),
    }
}

/// verl's actor loss — token-level policy loss, KL penalty and aggregation —
/// with its gradient, in one pass over the inputs (see the [module
/// docs](self)).
///
/// # Formula
///
/// `L = Σᵢⱼ wᵢⱼ·ISᵢⱼ·ℓᵢⱼ + coef · Σᵢⱼ vᵢⱼ·KLᵢⱼ`, with `ℓ` from
/// [`PolicyLoss::token`], `KL` from [`KlConfig::estimate`] of
/// `log π − log π_ref`, `IS` the optional constant importance weights of the
/// batch, `v` the weights of `cfg.agg` under `cfg.norm`
/// ([`aggregation_weights`](crate::aggregate::aggregation_weights)) and `w`
/// those of [`PolicyLoss::effective_agg`] (`v` but for SAPO, which verl
/// forces to `seq-mean-token-mean`). Metrics
/// as [`policy_loss`](crate::policy::token::policy_loss).
///
/// # Gradient
///
/// If `vjp = Some((c, grad))`: `gradᵢⱼ = c·(wᵢⱼ·ISᵢⱼ·∂ℓᵢⱼ/∂log π + coef·vᵢⱼ·∂KLᵢⱼ/∂log π)`,
/// 0 on masked positions.
///
/// # Peers
///
/// verl `compute_policy_loss_vanilla` (or the registered `loss_mode`) +
/// `kl_penalty` + `agg_loss`, as the actor combines them
/// (`pg_loss + kl_loss · kl_loss_coef`); OpenRLHF `PolicyLoss` + its KL loss.
/// The same numbers as the reference drivers (tested; see the module docs).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for a slice or `grad` of the wrong length;
/// [`Error::Invalid`] for a cross-token variant or a KL penalty without
/// `ref_log_prob`; [`Error::OutOfRange`] as [`TokenLoss::validate`].
pub fn token_loss<F: Real>(
    cfg: &TokenLoss,
    batch: &PolicyBatch<'_, F>,
    ref_log_prob: Option<&[F]>,
    vjp: Option<(F, &mut [F])>,
) -> Result<TokenLossOutput<F>, Error> {
    token_loss_driver(cfg, batch, ref_log_prob, vjp, None)
}

/// [`token_loss`], also writing the per-token values behind it — each
/// term's per-token loss and gradient (see [`TokenLossPerToken`]) — in the
/// same pass.
///
/// # Formula
///
/// As [`token_loss`]; `per_token` receives `ISᵢⱼ·ℓᵢⱼ`,
/// `wᵢⱼ·ISᵢⱼ·∂ℓᵢⱼ/∂log π`, `KLᵢⱼ` and `vᵢⱼ·∂KLᵢⱼ/∂log π`, 0 on masked
/// positions, so that `grad = c·(policy_grad + coef·kl_grad)` up to
/// rounding.
///
/// # Peers
///
/// verl's `pg_losses` / `kld` before `agg_loss`; `policy_loss`'s
/// `per_token` and [`KlConfig::estimate`] per position.
///
/// # Errors
///
/// As [`token_loss`], and [`Error::ShapeMismatch`] for a `per_token` slice
/// of the wrong length (`kl` and `kl_grad` may be empty without a KL
/// penalty).
///
/// # Example
///
/// ```
/// use posttrain_core::aggregate::{AggMode, GlobalNorm};
/// use posttrain_core::fused::{token_loss_per_token, TokenLoss, TokenLossPerToken};
/// use posttrain_core::policy::token::{PolicyBatch, PolicyLoss, PolicyLossMode, VerlPolicyParams};
/// use posttrain_core::Dims;
///
/// let loss = PolicyLoss::from_verl(PolicyLossMode::Vanilla, &VerlPolicyParams::default())?;
/// let cfg = TokenLoss { loss, agg: AggMode::TokenMean, norm: GlobalNorm::default(), kl: None };
/// let (lp, old, adv) = ([-1.0f64, -0.5, -2.0], [-1.1, -0.5, -2.0], [1.0, 1.0, 1.0]);
/// let batch = PolicyBatch {
///     dims: Dims::new(1, 3),
///     log_prob: &lp,
///     old_log_prob: &old,
///     advantages: &adv,
///     mask: &[true, true, false],
///     is_weights: None,
/// };
/// let (mut pl, mut pg) = ([0.0; 3], [0.0; 3]);
/// let per = TokenLossPerToken { policy_loss: &mut pl, policy_grad: &mut pg, kl: &mut [], kl_grad: &mut [] };
/// let out = token_loss_per_token(&cfg, &batch, None, None, per)?;
/// // token-mean: the loss is the mean of the valid per-token losses
/// assert!((out.loss - (pl[0] + pl[1]) / 2.0).abs() < 1e-12);
/// assert_eq!((pl[2], pg[2]), (0.0, 0.0));
/// # Ok::<(), posttrain_core::Error>(())
/// ```
pub fn token_loss_per_token<F: Real>(
    cfg: &TokenLoss,
    batch: &PolicyBatch<'_, F>,
    ref_log_prob: Option<&[F]>,
    vjp: Option<(F, &mut [F])>,
    per_token: TokenLossPerToken<'_, F>,
) -> Result<TokenLossOutput<F>, Error> {
    token_loss_driver(cfg, batch, ref_log_prob, vjp, Some(per_token))
}

/// The sequential driver of [`token_loss`] and [`token_loss_per_token`].
fn token_loss_driver<F: Real>(
    cfg: &TokenLoss,
    batch: &PolicyBatch<'_, F>,
    ref_log_prob: Option<&[F]>,
    vjp: Option<(F, &mut [F])>,
    mut per: Option<TokenLossPerToken<'_, F>>,
) -> Result<TokenLossOutput<F>, Error> {
    let totals = token_loss_check(cfg, batch, ref_log_prob, vjp.as_ref().map(|(_, g)| g.len()))?;
    per_token_check(cfg, batch.dims, per.as_ref())?;
    let dims = batch.dims;
    let mut acc = RowTotals::default();
    let mut vjp = vjp;
    for row in 0..dims.batch {
        let g = vjp.as_mut().map(|(c, g)| (*c, &mut g[dims.row(row)]));
        let p = per.as_mut().map(|p| p.part(dims.row(row)));
        let r = token_loss_row(cfg, batch, ref_log_prob, &totals, row, g, p);
        acc.add(&r);
    }
    Ok(token_loss_output(cfg, &acc))
}

/// The lengths of the per-token outputs: `[batch·seq]`, the KL pair also
/// empty without a penalty.
fn per_token_check<F>(
    cfg: &TokenLoss,
    dims: crate::Dims,
    per: Option<&TokenLossPerToken<'_, F>>,
) -> Result<(), Error> {
    let Some(p) = per else {
        return Ok(());
    };
    let n = dims.len();
    check_len("per_token.policy_loss", p.policy_loss.len(), n)?;
    check_len("per_token.policy_grad", p.policy_grad.len(), n)?;
    let kl_len = if cfg.kl.is_none() && p.kl.is_empty() && p.kl_grad.is_empty() {
        0
    } else {
        n
    };
    check_len("per_token.kl", p.kl.len(), kl_len)?;
    check_len("per_token.kl_grad", p.kl_grad.len(), kl_len)
}

// ---------------------------------------------------------------------------
// Log-probabilities and entropy from logits
// ---------------------------------------------------------------------------

/// Validates the inputs of the logits kernels.
#[allow(clippy::too_many_arguments)]
fn logits_check<F: Real>(
    logits: &[F],
    rows: usize,
    vocab: usize,
    targets: &[i64],
    per_row: &[(&'static str, usize)],
) -> Result<(), Error> {
    check_rows(logits, rows, vocab)?;
    check_len("targets", targets.len(), rows)?;
    check_ids(targets, vocab, "targets")?;
    for &(name, len) in per_row {
        check_len(name, len, rows)?;
    }
    Ok(())
}

/// Where the logits kernels floor `y − max` and `log p`: `e^{−10⁴}` is 0 in
/// `f32` and `f64`, so the floor changes no probability, and it keeps the
/// products `p·(y − max)` and `p·log p` at `0·(−10⁴) = 0` for `−∞` logits
/// (banned tokens) instead of `0·(−∞) = NaN`. NaN passes the floor (a
/// comparison, not `max`), so it still reaches the row's sums.
const LOG_P_FLOOR: f64 = -1e4;

/// `v` floored at `floor` lane by lane; NaN stays NaN.
#[inline(always)]
fn floored<F: Real>(v: Lanes<F>, floor: F) -> Lanes<F> {
    let mut o = v.0;
    for i in 0..LANES {
        o[i] = if v.0[i] < floor { floor } else { v.0[i] };
    }
    Lanes(o)
}

/// Adds one chunk `c` (`−∞` past its end) to the exp-sums of
/// [`log_probs_entropy_row`]: `d = max(c/T − m, floor)`, `s += e^d`, `u += e^d·d`.
#[inline(always)]
fn exp_sums<F: Real>(
    s: &mut Lanes<F>,
    u: &mut Lanes<F>,
    c: &[F],
    inv_t: Lanes<F>,
    m: Lanes<F>,
    floor: F,
) {
    let d = floored(Lanes::load(c, F::neg_infinity()).mul(inv_t).sub(m), floor);
    let e = d.exp();
    for i in 0..LANES {
        s.0[i] += e.0[i];
        u.0[i] += e.0[i] * d.0[i];
    }
}

/// The maximum of a row's raw logits (`−∞` for an empty row; NaN never wins).
#[inline(always)]
fn row_max<F: Real>(z: &[F]) -> F {
    let mut mx = Lanes::splat(F::neg_infinity());
    let mut chunks = z.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            mx.0[i] = if c[i] > mx.0[i] { c[i] } else { mx.0[i] };
        }
    }
    let mut m = F::neg_infinity();
    for &v in mx.0.iter().chain(chunks.remainder()) {
        if v > m {
            m = v;
        }
    }
    m
}

/// One row of [`log_probs_entropy`]: `(log p[target], H, lse)`.
///
/// Two passes over the row: its maximum `m` (from memory), then (from the
/// cache: a row of 32 000 `f32` is 128 KiB) `d = z/T − m`, `e = e^d`,
/// `s = Σ e`, `u = Σ e·d` per lane; `lse = m + ln s`, `H = ln s − u/s` — the
/// entropy measured from the maximum, so logits of ±1e30 stay exact. `+∞`,
/// NaN or an all-`−∞` row make `lse` or `H` non-finite, and the row goes to
/// the reference kernels.
#[inline(always)]
fn log_probs_entropy_row<F: Real>(z: &[F], next: &[F], target: usize, inv_t: F, t: F) -> (F, F, F) {
    // max(z)/T = max(z/T): multiplying by 1/T > 0 keeps the order.
    let m = row_max(z) * inv_t;
    let (it, mm, floor) = (Lanes::splat(inv_t), Lanes::splat(m), F::of(LOG_P_FLOOR));
    let (mut s, mut u) = (Lanes::splat(F::zero()), Lanes::splat(F::zero()));
    let mut chunks = z.chunks_exact(LANES);
    for (k, c) in (&mut chunks).enumerate() {
        // While this row's exps compute, the next row (its max pass reads
        // it) comes in from memory.
        prefetch(next, k * LANES);
        exp_sums(&mut s, &mut u, c, it, mm, floor);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        exp_sums(&mut s, &mut u, tail, it, mm, floor);
    }
    let (s, u) = (sum_lanes(&s), sum_lanes(&u));
    let ls = s.ln();
    let (lse, h) = (m + ls, ls - u / s);
    if !(lse.is_finite() && h.is_finite()) {
        let (_, lse) = scaled_max_lse(z, t);
        let h = reference_row_entropy(z, lse, t);
        return (z[target] / t - lse, h, lse);
    }
    (z[target] * inv_t - lse, h, lse)
}

/// Asks the CPU to bring `v[i..i + LANES]` into the cache (x86-64
/// `prefetcht0` per 64-byte line; nothing past the end of `v`, nothing on
/// other targets). A hint: it changes no result.
#[inline(always)]
fn prefetch<F: Real>(v: &[F], i: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let per_line = 64 / core::mem::size_of::<F>();
        let mut j = i;
        while j < (i + LANES).min(v.len()) {
            #[allow(unsafe_code)]
            // SAFETY: `v[j]` is in bounds; a prefetch reads nothing
            // architecturally and never faults; SSE is part of every x86-64.
            unsafe {
                use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                _mm_prefetch::<_MM_HINT_T0>(v.as_ptr().add(j).cast::<i8>())
            };
            j += per_line;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (v, i);
}

/// The lanes of `v` added in lane order.
#[inline(always)]
fn sum_lanes<F: Real>(v: &Lanes<F>) -> F {
    let mut a = F::zero();
    for i in 0..LANES {
        a += v.0[i];
    }
    a
}

/// Log-probability of one target id per row **and** the entropy of the row's
/// softmax, reading the logits from memory once; the row's `lse` is kept for
/// [`log_probs_entropy_backward`].
///
/// # Formula
///
/// With `y = z / T`: `lse = log Σₖ e^{yₖ}`, `out[r] = y[t_r] − lse`,
/// `H[r] = −Σₖ pₖ log pₖ`, `p = softmax(y)`. A first pass over the row finds
/// its max `m`; a second (the row is then in the cache) keeps, per lane,
/// `s = Σ e^{y−m}` and `u = Σ e^{y−m}(y − m)`; then `lse = m + ln s` and
/// `H = ln s − u/s` — the entropy relative to the max, so logits of ±1e30
/// stay exact.
///
/// # Peers
///
/// TRL `selective_log_softmax` + `entropy_from_logits`, verl
/// `logprobs_from_logits` + `entropy_from_logits`, OpenRLHF
/// `log_probs_from_logits(temperature)`. The same numbers as
/// [`gather_log_softmax`](crate::logits::gather_log_softmax) and
/// [`entropy_from_logits`](crate::logits::entropy_from_logits) (tested).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths (`targets`, `log_probs`, `entropy`,
/// `lse`: one per row); [`Error::Invalid`] for an id outside `[0, vocab)`;
/// [`Error::Empty`] for an empty vocabulary with rows present.
///
/// # Example
///
/// ```
/// use posttrain_core::fused::log_probs_entropy;
/// use posttrain_core::logits::Temperature;
/// let logits = [0.0f32, 0.0, 0.0, 0.0, 1e30, -1e30, 0.0, 0.0];
/// let (mut lp, mut h, mut lse) = ([0.0f32; 2], [0.0f32; 2], [0.0f32; 2]);
/// log_probs_entropy(&logits, 2, 4, Temperature::ONE, &[1, 0], &mut lp, &mut h, &mut lse)?;
/// assert!((lp[0] + 4f32.ln()).abs() < 1e-6 && (h[0] - 4f32.ln()).abs() < 1e-6);
/// assert_eq!((lp[1], h[1]), (0.0, 0.0));
/// # Ok::<(), posttrain_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn log_probs_entropy<F: Real>(
    logits: &[F],
    rows: usize,
    vocab: usize,
    temperature: Temperature,
    targets: &[i64],
    log_probs: &mut [F],
    entropy: &mut [F],
    lse: &mut [F],
) -> Result<(), Error> {
    logits_check(
        logits,
        rows,
        vocab,
        targets,
        &[
            ("log_probs", log_probs.len()),
            ("entropy", entropy.len()),
            ("lse", lse.len()),
        ],
    )?;
    let t = F::of(temperature.get());
    lpe_rows(logits, vocab, t, targets, log_probs, entropy, lse);
    Ok(())
}

multiversioned! {
    /// The rows of [`log_probs_entropy`] (checked), for the widest
    /// instruction set the CPU has.
    fn lpe_rows<F: Real>(
        logits: &[F],
        vocab: usize,
        t: F,
        targets: &[i64],
        lp: &mut [F],
        h: &mut [F],
        lse: &mut [F],
    ) => lpe_rows_body
}

#[inline(always)]
fn lpe_rows_body<F: Real>(
    logits: &[F],
    vocab: usize,
    t: F,
    targets: &[i64],
    lp: &mut [F],
    h: &mut [F],
    lse: &mut [F],
) {
    let inv_t = F::one() / t;
    for r in 0..lp.len() {
        let z = &logits[r * vocab..(r + 1) * vocab];
        let next = logits.get((r + 1) * vocab..(r + 2) * vocab).unwrap_or(&[]);
        let (a, b, c) = log_probs_entropy_row(z, next, targets[r] as usize, inv_t, t);
        lp[r] = a;
        h[r] = b;
        lse[r] = c;
    }
}

/// The affine form of [`log_probs_entropy_backward_row`] for one row, in
/// lanes: `g = p·(a + b·ℓ)` with `ℓ = max(z/T − lse, floor)`, `p = e^ℓ`.
/// Methods, not closures: closures are not inlined into the AVX loops.
struct AffineGrad<F: Real> {
    inv_t: Lanes<F>,
    lse: Lanes<F>,
    floor: F,
    a: Lanes<F>,
    b: Lanes<F>,
}

impl<F: Real> AffineGrad<F> {
    /// `gs` for a stretch `zs`, [`LANES`] logits at a time.
    #[inline(always)]
    fn chunks(&self, zs: &[F], gs: &mut [F]) {
        let mut zc = zs.chunks_exact(LANES);
        let mut gc = gs.chunks_exact_mut(LANES);
        for (z, g) in (&mut zc).zip(&mut gc) {
            self.chunk(z, g);
        }
        let (zt, gt) = (zc.remainder(), gc.into_remainder());
        if !zt.is_empty() {
            self.chunk(zt, gt);
        }
    }

    /// `gs` for one chunk `zs` of at most [`LANES`] logits.
    #[inline(always)]
    fn chunk(&self, zs: &[F], gs: &mut [F]) {
        let lp = floored(
            Lanes::load(zs, F::zero()).mul(self.inv_t).sub(self.lse),
            self.floor,
        );
        lp.exp().mul(self.a.add(self.b.mul(lp))).store(gs);
    }
}

/// [`parallel::log_probs_entropy_backward`] on several threads writes a
/// logits gradient of at least this many bytes with non-temporal stores
/// ([`Real::copy_streaming`]): it is far larger than the caches, so a plain
/// store would first read every line in for nothing. A smaller one stays in
/// the cache for whoever reads it next.
///
/// Measured on the 2-core dev machine (AMD EPYC, `[4096, 32000]` `f32`): the
/// backward on 2 threads 19.3 ms streamed against 23.7 ms plain (memory is
/// the limit); on 1 thread, streaming was *slower* (41 ms against 31 ms:
/// one core does not fill the memory bus, and the streamed lines cost it
/// latency), so the sequential driver never streams.
#[cfg(feature = "parallel")]
const STREAM_GRAD_BYTES: usize = 8 << 20;

/// Logits per block of a streamed gradient row, computed on the stack and
/// then streamed out (256 bytes in `f32`). Short blocks keep the computation
/// and the stores overlapped: with 4 KiB blocks the streamed backward was
/// no faster than the plain one.
const STREAM_BLOCK: usize = 64;

/// One row of [`log_probs_entropy_backward`].
///
/// With `ℓₖ = max(yₖ − lse, −10⁴)` ([`LOG_P_FLOOR`]) and `pₖ = e^{ℓₖ}`, the two
/// VJP terms ([`log_softmax_vjp_term`] of the one-hot cotangent and
/// [`entropy_vjp_term`]) add up, off the target, to the affine form
/// `gₖ = pₖ·(a + b·ℓₖ)` with `a = −(c_lp + c_H·H)/T`, `b = −c_H/T`: five
/// operations and an `exp` per logit. The target's entry is then written
/// from the two terms themselves.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn log_probs_entropy_backward_row<F: Real>(
    z: &[F],
    target: usize,
    t: F,
    lse: F,
    h: F,
    c_lp: F,
    c_h: F,
    g: &mut [F],
    stream: bool,
) {
    let inv_t = F::one() / t;
    if !(lse.is_finite() && h.is_finite()) {
        // The reference kernels give the IEEE answer for such rows.
        g.iter_mut().for_each(|x| *x = F::zero());
        g[target] = c_lp;
        crate::logits::log_softmax_vjp_row(z, lse, t, g);
        if c_h != F::zero() {
            for (gk, &zk) in g.iter_mut().zip(z) {
                let lp = zk / t - lse;
                *gk += entropy_vjp_term(lp.exp(), lp, h, c_h) * inv_t;
            }
        }
        return;
    }
    let floor = F::of(LOG_P_FLOOR);
    let affine = AffineGrad {
        inv_t: Lanes::splat(inv_t),
        lse: Lanes::splat(lse),
        floor,
        a: Lanes::splat(-(c_lp + c_h * h) * inv_t),
        b: Lanes::splat(-c_h * inv_t),
    };
    // Streaming stores need a 16-byte-aligned start: the few logits before
    // it go first, stored plainly (every logit is computed alike, so where
    // the chunks start changes no bit).
    let head = if stream {
        let misaligned = (g.as_ptr() as usize) % 16;
        ((16 - misaligned) % 16 / core::mem::size_of::<F>()).min(g.len())
    } else {
        0
    };
    let (zh, z_rest) = z.split_at(head);
    let (gh, g_rest) = g.split_at_mut(head);
    if head > 0 {
        affine.chunks(zh, gh);
    }
    if stream {
        // Computed into a block on the stack (plain stores, in L1), then
        // streamed out: a streaming store inside the chunk loop would make
        // the compiler narrow the whole computation to its 16-byte width.
        let mut buf = [F::zero(); STREAM_BLOCK];
        for (zb, gb) in z_rest
            .chunks(STREAM_BLOCK)
            .zip(g_rest.chunks_mut(STREAM_BLOCK))
        {
            let bb = &mut buf[..gb.len()];
            affine.chunks(zb, bb);
            F::copy_streaming(bb, gb);
        }
    } else {
        affine.chunks(z_rest, g_rest);
    }
    let lp = z[target] * inv_t - lse;
    let lp = if lp < floor { floor } else { lp };
    let p = lp.exp_flush_subnormal();
    g[target] =
        log_softmax_vjp_term(c_lp, p, c_lp, t.to_f64()) + entropy_vjp_term(p, lp, h, c_h) * inv_t;
}

/// The VJP of [`log_probs_entropy`]: `∂/∂z` of `Σᵣ c_lp[r]·out[r] + c_H[r]·H[r]`,
/// reading the logits once and writing the gradient once.
///
/// # Formula
///
/// With `y = z/T`, `p = softmax(y)`: `gₖ = (c_lp·(1[k = t] − pₖ) − c_H·pₖ(log pₖ + H)) / T`
/// per row (products selected to 0 where `pₖ = 0`), from the row's saved
/// `lse` and `H`.
///
/// # Peers
///
/// The autograd backward of the peers' `log_softmax`/`gather` and
/// `entropy_from_logits`.
///
/// # Errors
///
/// As [`log_probs_entropy`], plus [`Error::ShapeMismatch`] for the
/// cotangents and `grad` (`rows · vocab`).
#[allow(clippy::too_many_arguments)]
pub fn log_probs_entropy_backward<F: Real>(
    logits: &[F],
    rows: usize,
    vocab: usize,
    temperature: Temperature,
    targets: &[i64],
    lse: &[F],
    entropy: &[F],
    d_log_probs: &[F],
    d_entropy: Option<&[F]>,
    grad: &mut [F],
) -> Result<(), Error> {
    logits_check(
        logits,
        rows,
        vocab,
        targets,
        &[
            ("lse", lse.len()),
            ("entropy", entropy.len()),
            ("d_log_probs", d_log_probs.len()),
            ("d_entropy", d_entropy.map_or(rows, |d| d.len())),
        ],
    )?;
    check_len("grad", grad.len(), rows * vocab)?;
    let t = F::of(temperature.get());
    lpe_backward_rows(
        logits,
        vocab,
        t,
        targets,
        lse,
        entropy,
        d_log_probs,
        d_entropy,
        grad,
        false,
    );
    Ok(())
}

multiversioned! {
    /// The rows of [`log_probs_entropy_backward`] (checked), for the widest
    /// instruction set the CPU has.
    #[allow(clippy::too_many_arguments)]
    fn lpe_backward_rows<F: Real>(
        logits: &[F],
        vocab: usize,
        t: F,
        targets: &[i64],
        lse: &[F],
        entropy: &[F],
        d_lp: &[F],
        d_h: Option<&[F]>,
        grad: &mut [F],
        stream: bool,
    ) => lpe_backward_rows_body
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn lpe_backward_rows_body<F: Real>(
    logits: &[F],
    vocab: usize,
    t: F,
    targets: &[i64],
    lse: &[F],
    entropy: &[F],
    d_lp: &[F],
    d_h: Option<&[F]>,
    grad: &mut [F],
    stream: bool,
) {
    for r in 0..d_lp.len() {
        let z = &logits[r * vocab..(r + 1) * vocab];
        let ch = d_h.map_or(F::zero(), |d| d[r]);
        log_probs_entropy_backward_row(
            z,
            targets[r] as usize,
            t,
            lse[r],
            entropy[r],
            d_lp[r],
            ch,
            &mut grad[r * vocab..(r + 1) * vocab],
            stream,
        );
    }
    if stream {
        F::stream_fence();
    }
}

/// The fused drivers spread over threads (rows split into contiguous blocks,
/// run on a pool of worker threads that start on first use and stay; the
/// calling thread takes blocks too). Results are bitwise identical to the
/// sequential drivers for every thread count. An idle worker polls for the
/// next call for 200 µs before it sleeps; `POSTTRAIN_SPIN_US` sets that time
/// (0: sleep at once, for a machine whose cores other busy threads share).
#[cfg(feature = "parallel")]
pub mod parallel {
    use super::*;
    use crate::pool::Blocks;
    use std::vec::Vec;

    /// The number of threads to use: `POSTTRAIN_THREADS` if set and > 0,
    /// else [`std::thread::available_parallelism`].
    pub fn default_threads() -> usize {
        std::env::var("POSTTRAIN_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Splits `0..rows` into at most `threads` contiguous blocks.
    fn blocks(rows: usize, threads: usize) -> usize {
        rows.div_ceil(threads.max(1)).max(1)
    }

    /// [`token_loss`](super::token_loss) on `threads` threads.
    ///
    /// # Errors
    ///
    /// As [`token_loss`](super::token_loss).
    pub fn token_loss<F: Real>(
        cfg: &TokenLoss,
        batch: &PolicyBatch<'_, F>,
        ref_log_prob: Option<&[F]>,
        vjp: Option<(F, &mut [F])>,
        threads: usize,
    ) -> Result<TokenLossOutput<F>, Error> {
        token_loss_driver(cfg, batch, ref_log_prob, vjp, None, threads)
    }

    /// [`token_loss_per_token`](super::token_loss_per_token) on `threads`
    /// threads.
    ///
    /// # Errors
    ///
    /// As [`token_loss_per_token`](super::token_loss_per_token).
    pub fn token_loss_per_token<F: Real>(
        cfg: &TokenLoss,
        batch: &PolicyBatch<'_, F>,
        ref_log_prob: Option<&[F]>,
        vjp: Option<(F, &mut [F])>,
        per_token: TokenLossPerToken<'_, F>,
        threads: usize,
    ) -> Result<TokenLossOutput<F>, Error> {
        token_loss_driver(cfg, batch, ref_log_prob, vjp, Some(per_token), threads)
    }

    /// The parallel driver of both: rows in `threads` contiguous blocks.
    fn token_loss_driver<F: Real>(
        cfg: &TokenLoss,
        batch: &PolicyBatch<'_, F>,
        ref_log_prob: Option<&[F]>,
        vjp: Option<(F, &mut [F])>,
        per: Option<TokenLossPerToken<'_, F>>,
        threads: usize,
    ) -> Result<TokenLossOutput<F>, Error> {
        let totals =
            token_loss_check(cfg, batch, ref_log_prob, vjp.as_ref().map(|(_, g)| g.len()))?;
        per_token_check(cfg, batch.dims, per.as_ref())?;
        let dims = batch.dims;
        let mut per_row = std::vec![RowTotals::default(); dims.batch];
        let rows_per = blocks(dims.batch, threads);
        let seq = dims.seq.max(1);
        let n_blocks = dims.batch.div_ceil(rows_per);
        let (cot, grad) = match vjp {
            Some((c, g)) => (Some(c), Some(g)),
            None => (None, None),
        };
        let mut grad_blocks: Vec<Option<&mut [F]>> = match grad {
            Some(g) if dims.seq > 0 => g.chunks_mut(rows_per * seq).map(Some).collect(),
            _ => (0..n_blocks).map(|_| None).collect(),
        };
        let mut per_blocks: Vec<Option<TokenLossPerToken<'_, F>>> = match per {
            Some(p) if dims.seq > 0 => p.split(rows_per * seq).map(Some).collect(),
            _ => (0..n_blocks).map(|_| None).collect(),
        };
        let mut work = Blocks::new();
        for (bi, ((out, gb), pb)) in per_row
            .chunks_mut(rows_per)
            .zip(grad_blocks.iter_mut())
            .zip(per_blocks.iter_mut())
            .enumerate()
        {
            let (gb, pb) = (gb.take(), pb.take());
            let totals = &totals;
            work.push(move || {
                let (mut gb, mut pb) = (gb, pb);
                for (k, o) in out.iter_mut().enumerate() {
                    let row = bi * rows_per + k;
                    let local = k * seq..k * seq + dims.seq;
                    let g = match (cot, gb.as_deref_mut()) {
                        (Some(c), Some(g)) => Some((c, &mut g[local.clone()])),
                        _ => None,
                    };
                    let p = pb.as_mut().map(|p| p.part(local));
                    *o = token_loss_row(cfg, batch, ref_log_prob, totals, row, g, p);
                }
            });
        }
        work.run(threads);
        let mut acc = RowTotals::default();
        for r in &per_row {
            acc.add(r);
        }
        Ok(token_loss_output(cfg, &acc))
    }

    /// [`log_probs_entropy`](super::log_probs_entropy) on `threads` threads.
    ///
    /// # Errors
    ///
    /// As [`log_probs_entropy`](super::log_probs_entropy).
    #[allow(clippy::too_many_arguments)]
    pub fn log_probs_entropy<F: Real>(
        logits: &[F],
        rows: usize,
        vocab: usize,
        temperature: Temperature,
        targets: &[i64],
        log_probs: &mut [F],
        entropy: &mut [F],
        lse: &mut [F],
        threads: usize,
    ) -> Result<(), Error> {
        logits_check(
            logits,
            rows,
            vocab,
            targets,
            &[
                ("log_probs", log_probs.len()),
                ("entropy", entropy.len()),
                ("lse", lse.len()),
            ],
        )?;
        let rows_per = blocks(rows, threads);
        let mut work = Blocks::new();
        for (bi, ((lp, h), l)) in log_probs
            .chunks_mut(rows_per)
            .zip(entropy.chunks_mut(rows_per))
            .zip(lse.chunks_mut(rows_per))
            .enumerate()
        {
            let r0 = bi * rows_per;
            let (tr, lg) = (&targets[r0..r0 + lp.len()], logits);
            work.push(move || {
                super::log_probs_entropy(
                    &lg[r0 * vocab..(r0 + lp.len()) * vocab],
                    lp.len(),
                    vocab,
                    temperature,
                    tr,
                    lp,
                    h,
                    l,
                )
                .expect("checked above");
            });
        }
        work.run(threads);
        Ok(())
    }

    /// [`log_probs_entropy_backward`](super::log_probs_entropy_backward) on
    /// `threads` threads.
    ///
    /// # Errors
    ///
    /// As [`log_probs_entropy_backward`](super::log_probs_entropy_backward).
    #[allow(clippy::too_many_arguments)]
    pub fn log_probs_entropy_backward<F: Real>(
        logits: &[F],
        rows: usize,
        vocab: usize,
        temperature: Temperature,
        targets: &[i64],
        lse: &[F],
        entropy: &[F],
        d_log_probs: &[F],
        d_entropy: Option<&[F]>,
        grad: &mut [F],
        threads: usize,
    ) -> Result<(), Error> {
        logits_check(
            logits,
            rows,
            vocab,
            targets,
            &[
                ("lse", lse.len()),
                ("entropy", entropy.len()),
                ("d_log_probs", d_log_probs.len()),
                ("d_entropy", d_entropy.map_or(rows, |d| d.len())),
            ],
        )?;
        check_len("grad", grad.len(), rows * vocab)?;
        if vocab == 0 {
            return Ok(());
        }
        let rows_per = blocks(rows, threads);
        let t = F::of(temperature.get());
        // Streaming stores pay when several threads fill the memory bus
        // (see `STREAM_GRAD_BYTES`).
        let stream = rows > rows_per && core::mem::size_of_val(grad) >= STREAM_GRAD_BYTES;
        let mut work = Blocks::new();
        for (bi, g) in grad.chunks_mut(rows_per * vocab).enumerate() {
            let r0 = bi * rows_per;
            let n = g.len() / vocab;
            let r = r0..r0 + n;
            let de = d_entropy.map(|d| &d[r.clone()]);
            let lg = &logits[r0 * vocab..(r0 + n) * vocab];
            let (tr, ls, en, dl) = (
                &targets[r.clone()],
                &lse[r.clone()],
                &entropy[r.clone()],
                &d_log_probs[r],
            );
            // Each block fences its own streaming stores before it finishes.
            work.push(move || {
                lpe_backward_rows(lg, vocab, t, tr, ls, en, dl, de, g, stream);
            });
        }
        work.run(threads);
        Ok(())
    }
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::count_true;

    #[test]
    fn count_true_counts_past_the_byte_sums_limit() {
        // Lengths around the 255-long stretches, every third position set,
        // and all set (a stretch's byte sum at its 255 maximum).
        for len in [0usize, 1, 254, 255, 256, 510, 511, 1000, 4096] {
            let thirds: alloc::vec::Vec<bool> = (0..len).map(|i| i % 3 == 0).collect();
            assert_eq!(count_true(&thirds), len.div_ceil(3), "len {len}");
            let all = alloc::vec![true; len];
            assert_eq!(count_true(&all), len, "len {len}");
        }
    }
}
