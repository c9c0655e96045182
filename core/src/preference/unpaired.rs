//! Unpaired preference losses (KTO, BCO) and the process-reward-model loss.
//!
//! # Overview
//!
//! Unpaired losses learn from single completions labelled desirable or
//! undesirable, each scored by its log-ratio `z = log π(y|x) − log π_ref(y|x)`
//! against a reference point:
//!
//! | loss | desirable term | undesirable term | reference point | peers |
//! |---|---|---|---|---|
//! | KTO ([`KtoLossType::Kto`]) | `w_d·(1 − σ(β(z − KL)))` | `w_u·(1 − σ(β(KL − z)))` | `KL = max(mean(KL_logps − ref_KL_logps), 0)`, detached | TRL `KTOTrainer`, OpenRLHF `KTOLoss` |
//! | APO-zero unpaired | `w_d·(1 − σ(βz))` | `w_u·σ(βz)` | none | TRL `KTOTrainer` |
//! | vanilla KTO ([`vanilla_kto_loss`]) | `1 − σ(β(z − KL_u))` | `1 − σ(β(KL_d − z))` | the *other* side's clamped mean log-ratio, **not** detached | OpenRLHF `VanillaKTOLoss` |
//! | BCO ([`bco_loss`]) | `−log σ(βz − δ)` | `−log σ(−(βz − δ))` | `δ` = running mean of the rewards `βz`, after this batch | TRL `BCOTrainer` |
//!
//! The batch loss of KTO is the mean of the per-example terms, skipping NaN
//! terms (`nanmean`); BCO returns per-example losses. [`prm_hard_loss`] and
//! [`prm_soft_loss`] are the cross-entropy of a process reward model at the
//! placeholder tokens that mark the end of each reasoning step.
//!
//! # Example
//!
//! ```
//! use posttrain_core::preference::unpaired::{kto_kl_baseline, kto_loss, KtoConfig, KtoLossType};
//! let cfg = KtoConfig::new(KtoLossType::Kto, 0.1, 1.0, 1.0)?;
//! let kl = kto_kl_baseline(&[-3.0f64, -2.5], &[-3.2, -2.9])?; // mean 0.3
//! let logratios = [0.5f64, -0.4, 0.1];
//! let desirable = [true, false, true];
//! let mut grad = [0.0; 3];
//! let loss = kto_loss(&cfg, &logratios, &desirable, kl, Some(&mut grad))?;
//! assert!(loss > 0.0 && loss < 1.0);
//! assert!(grad[0] < 0.0 && grad[1] > 0.0); // push desirable up, undesirable down
//! # Ok::<(), posttrain_core::Error>(())
//! ```

use crate::elem::{Elem, ElemExt, Real};
use crate::error::{check_len, check_param, Error};
use crate::logits::row_max_lse;

/// The KTO-family loss variant (`loss_type` in TRL's `KTOConfig`); see
/// [`kto_desirable_term`] and [`kto_undesirable_term`] for the formulas.
///
/// # Peers
///
/// TRL `KTOTrainer` (`kto`, `apo_zero_unpaired`); OpenRLHF `KTOLoss` is `kto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum KtoLossType {
    /// KTO (paper eq. 7) with the batch KL reference point.
    #[cfg_attr(feature = "serde", serde(rename = "kto"))]
    Kto,
    /// Unpaired APO-zero: no reference point.
    #[cfg_attr(feature = "serde", serde(rename = "apo_zero_unpaired"))]
    ApoZeroUnpaired,
}

impl KtoLossType {
    /// Whether the loss uses the KL reference point (TRL's `calculate_KL`).
    pub fn uses_kl(self) -> bool {
        matches!(self, KtoLossType::Kto)
    }
}

impl core::str::FromStr for KtoLossType {
    type Err = Error;
    /// Parses TRL's names `kto`, `apo_zero_unpaired`.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "kto" => Ok(KtoLossType::Kto),
            "apo_zero_unpaired" => Ok(KtoLossType::ApoZeroUnpaired),
            _ => Err(Error::unknown_option(
                "KTO loss type",
                s,
                "kto, apo_zero_unpaired",
            )),
        }
    }
}

/// Configuration of [`kto_loss`], validated by [`KtoConfig::new`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct KtoConfig {
    /// The variant.
    pub loss_type: KtoLossType,
    /// Temperature `β > 0`.
    pub beta: f64,
    /// Weight `w_d ≥ 0` of desirable examples.
    pub desirable_weight: f64,
    /// Weight `w_u ≥ 0` of undesirable examples.
    pub undesirable_weight: f64,
}

impl KtoConfig {
    /// Validates and builds a configuration.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] unless `β > 0` and both weights are finite and `≥ 0`.
    pub fn new(
        loss_type: KtoLossType,
        beta: f64,
        desirable_weight: f64,
        undesirable_weight: f64,
    ) -> Result<Self, Error> {
        check_beta(beta)?;
        check_param(
            desirable_weight >= 0.0 && desirable_weight.is_finite(),
            "desirable_weight",
            desirable_weight,
            "must be finite and ≥ 0",
        )?;
        check_param(
            undesirable_weight >= 0.0 && undesirable_weight.is_finite(),
            "undesirable_weight",
            undesirable_weight,
            "must be finite and ≥ 0",
        )?;
        Ok(KtoConfig {
            loss_type,
            beta,
            desirable_weight,
            undesirable_weight,
        })
    }
}

fn check_beta(beta: f64) -> Result<(), Error> {
    check_param(
        beta > 0.0 && beta.is_finite(),
        "beta",
        beta,
        "must be finite and > 0",
    )
}

/// One example's KTO term and its partial derivatives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoTerm<E> {
    /// The unweighted loss.
    pub loss: E,
    /// `∂loss/∂z` (z the log-ratio).
    pub dlogratio: E,
    /// `∂loss/∂KL` (the reference point; the detached presets ignore it).
    pub dkl: E,
}

/// `σ(x)·(1 − σ(x)) = exp(log σ(x) + log σ(−x))`, without cancellation.
fn sigmoid_prime<E: Elem>(x: E) -> E {
    x.clone().log_sigmoid().add(x.neg().log_sigmoid()).exp()
}

/// The KTO-family term of one desirable example.
///
/// # Formula
///
/// ```text
/// kto:               1 − σ(β(z − KL))  = σ(β(KL − z))
/// apo_zero_unpaired: 1 − σ(βz)         (KL unused)
/// ```
///
/// # Gradient
///
/// `∂/∂z = −β·σ'(u)`, `∂/∂KL = +β·σ'(u)` (kto; 0 for apo), `u` the sigmoid's
/// argument, `σ' = σ(1 − σ)`.
///
/// # Peers
///
/// TRL `KTOTrainer._compute_loss`, OpenRLHF `KTOLoss` / `VanillaKTOLoss`.
pub fn kto_desirable_term<E: Elem>(
    loss_type: KtoLossType,
    beta: f64,
    logratio: E,
    kl: E,
) -> KtoTerm<E> {
    let (u, uses_kl) = match loss_type {
        KtoLossType::Kto => (logratio.sub(kl).mul_scalar(beta), true),
        KtoLossType::ApoZeroUnpaired => (logratio.mul_scalar(beta), false),
    };
    let sp = sigmoid_prime(u.clone()).mul_scalar(beta);
    KtoTerm {
        loss: u.neg().sigmoid(),
        dlogratio: sp.clone().neg(),
        dkl: if uses_kl {
            sp.clone()
        } else {
            sp.full_like(0.0)
        },
    }
}

/// The KTO-family term of one undesirable example.
///
/// # Formula
///
/// ```text
/// kto:               1 − σ(β(KL − z))  = σ(β(z − KL))
/// apo_zero_unpaired: σ(βz)
/// ```
///
/// # Gradient
///
/// `∂/∂z = +β·σ'(u)`, `∂/∂KL = −β·σ'(u)` (kto; 0 for apo).
///
/// # Peers
///
/// TRL `KTOTrainer._compute_loss`, OpenRLHF `KTOLoss` / `VanillaKTOLoss`.
pub fn kto_undesirable_term<E: Elem>(
    loss_type: KtoLossType,
    beta: f64,
    logratio: E,
    kl: E,
) -> KtoTerm<E> {
    let (u, uses_kl) = match loss_type {
        KtoLossType::Kto => (logratio.sub(kl).mul_scalar(beta), true),
        KtoLossType::ApoZeroUnpaired => (logratio.mul_scalar(beta), false),
    };
    let sp = sigmoid_prime(u.clone()).mul_scalar(beta);
    KtoTerm {
        loss: u.sigmoid(),
        dlogratio: sp.clone(),
        dkl: if uses_kl { sp.neg() } else { sp.full_like(0.0) },
    }
}

/// KTO's reference point: the batch mean of the KL-sample log-ratios,
/// clamped at 0 (and detached: no gradient flows through it).
///
/// # Formula
///
/// `KL = max(mean_i (policy_KL_logps_i − ref_KL_logps_i), 0)`; 0 for an
/// empty batch (the peers' mean is NaN).
///
/// # Gradient
///
/// None: the peers detach it.
///
/// # Peers
///
/// TRL `KTOTrainer` (`kl`), OpenRLHF `KTOLoss` (`KL`, with `world_size` = 1).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] when the lengths differ.
pub fn kto_kl_baseline<F: Real>(policy_kl_logps: &[F], ref_kl_logps: &[F]) -> Result<F, Error> {
    check_len(
        "reference_KL_logps",
        ref_kl_logps.len(),
        policy_kl_logps.len(),
    )?;
    let n = policy_kl_logps.len();
    if n == 0 {
        return Ok(F::zero());
    }
    let s: F = policy_kl_logps
        .iter()
        .zip(ref_kl_logps)
        .map(|(&p, &r)| p - r)
        .sum();
    Ok((s / F::of_usize(n)).max(F::zero()))
}

/// The KTO-family batch loss over a mixed batch of desirable and undesirable
/// examples.
///
/// # Formula
///
/// ```text
/// ℓ_i  = w_d · desirable_term(z_i, KL)    if desirable[i]
///        w_u · undesirable_term(z_i, KL)  otherwise
/// loss = nanmean_i ℓ_i                    (0 when every ℓ_i is NaN or the batch is empty)
/// ```
///
/// `KL` is a detached constant ([`kto_kl_baseline`]; pass 0 for
/// `apo_zero_unpaired`).
///
/// # Gradient
///
/// `dlogratios[i] = w_i · ∂term/∂z_i / m` for the `m` non-NaN terms, 0 for
/// NaN terms. Nothing flows through `KL`.
///
/// # Peers
///
/// TRL `KTOTrainer._compute_loss` (the row order of the concatenation does
/// not change a mean); OpenRLHF `KTOLoss` (plain mean: the same unless a term
/// is NaN).
///
/// # Errors
///
/// [`Error::ShapeMismatch`] when the lengths differ.
pub fn kto_loss<F: Real>(
    cfg: &KtoConfig,
    logratios: &[F],
    desirable: &[bool],
    kl: F,
    dlogratios: Option<&mut [F]>,
) -> Result<F, Error> {
    let n = logratios.len();
    check_len("label", desirable.len(), n)?;
    let term = |i: usize| {
        if desirable[i] {
            let t = kto_desirable_term(cfg.loss_type, cfg.beta, logratios[i], kl);
            (
                F::of(cfg.desirable_weight) * t.loss,
                F::of(cfg.desirable_weight) * t.dlogratio,
            )
        } else {
            let t = kto_undesirable_term(cfg.loss_type, cfg.beta, logratios[i], kl);
            (
                F::of(cfg.undesirable_weight) * t.loss,
                F::of(cfg.undesirable_weight) * t.dlogratio,
            )
        }
    };
    let (mut s, mut m) = (F::zero(), 0usize);
    for i in 0..n {
        let (l, _) = term(i);
        if !l.is_nan() {
            s += l;
            m += 1;
        }
    }
    let inv_m = if m == 0 {
        F::zero()
    } else {
        F::one() / F::of_usize(m)
    };
    if let Some(g) = dlogratios {
        check_len("grad logratios", g.len(), n)?;
        for (i, gi) in g.iter_mut().enumerate() {
            let (l, d) = term(i);
            *gi = if l.is_nan() { F::zero() } else { d * inv_m };
        }
    }
    Ok(s * inv_m)
}

/// Unweighted mean of `x`, clamped at 0, and the derivative of the clamp
/// (1 where the mean is ≥ 0). Empty gives `(0, 0)`.
fn clamped_mean<F: Real>(x: &[F]) -> (F, F) {
    if x.is_empty() {
        return (F::zero(), F::zero());
    }
    let m = x.iter().copied().sum::<F>() / F::of_usize(x.len());
    if m >= F::zero() {
        (m, F::one())
    } else {
        (m.max(F::zero()), F::zero())
    }
}

/// KTO for even sampling, with each side's reference point taken from the
/// other side's log-ratios and **not** detached.
///
/// # Formula
///
/// ```text
/// KL_d = max(mean_i c_i, 0),   KL_u = max(mean_j r_j, 0)
/// loss = mean over the concatenation of
///        [1 − σ(β(c_i − KL_u))]_i  and  [1 − σ(β(KL_d − r_j))]_j
/// ```
///
/// with `c`, `r` the chosen and rejected log-ratios. An empty side gives a
/// reference point of 0.
///
/// # Gradient
///
/// Through the terms and through both reference points:
/// `∂KL_d/∂c_i = 1/n_c` where `mean c ≥ 0`, else 0 (likewise `KL_u`).
/// `dchosen`/`drejected` are written, not accumulated.
///
/// # Peers
///
/// OpenRLHF `VanillaKTOLoss` (legacy commit 04898500).
///
/// # Errors
///
/// [`Error::OutOfRange`] unless `β > 0`; [`Error::ShapeMismatch`] for the
/// gradient buffers.
pub fn vanilla_kto_loss<F: Real>(
    beta: f64,
    chosen_logratios: &[F],
    rejected_logratios: &[F],
    grads: Option<(&mut [F], &mut [F])>,
) -> Result<F, Error> {
    check_beta(beta)?;
    let (nc, nr) = (chosen_logratios.len(), rejected_logratios.len());
    let (kl_d, dkl_d) = clamped_mean(chosen_logratios);
    let (kl_u, dkl_u) = clamped_mean(rejected_logratios);
    let total = nc + nr;
    if total == 0 {
        if let Some((dc, dr)) = grads {
            check_len("grad policy_chosen_logps", dc.len(), 0)?;
            check_len("grad policy_rejected_logps", dr.len(), 0)?;
        }
        return Ok(F::zero());
    }
    let inv = F::one() / F::of_usize(total);
    let mut s = F::zero();
    // Accumulated ∂loss/∂KL_u (from chosen terms) and ∂loss/∂KL_d (from rejected terms).
    let (mut g_kl_u, mut g_kl_d) = (F::zero(), F::zero());
    let mut grads = grads;
    if let Some((dc, dr)) = grads.as_mut() {
        check_len("grad policy_chosen_logps", dc.len(), nc)?;
        check_len("grad policy_rejected_logps", dr.len(), nr)?;
    }
    for (i, &c) in chosen_logratios.iter().enumerate() {
        let t = kto_desirable_term(KtoLossType::Kto, beta, c, kl_u);
        s += t.loss;
        g_kl_u += t.dkl * inv;
        if let Some((dc, _)) = grads.as_mut() {
            dc[i] = t.dlogratio * inv;
        }
    }
    for (j, &r) in rejected_logratios.iter().enumerate() {
        let t = kto_undesirable_term(KtoLossType::Kto, beta, r, kl_d);
        s += t.loss;
        g_kl_d += t.dkl * inv;
        if let Some((_, dr)) = grads.as_mut() {
            dr[j] = t.dlogratio * inv;
        }
    }
    if let Some((dc, dr)) = grads {
        if nc > 0 {
            let add = g_kl_d * dkl_d / F::of_usize(nc);
            dc.iter_mut().for_each(|g| *g += add);
        }
        if nr > 0 {
            let add = g_kl_u * dkl_u / F::of_usize(nr);
            dr.iter_mut().for_each(|g| *g += add);
        }
    }
    Ok(s * inv)
}

/// Running mean and variance of a stream of rewards (BCO's reward shift `δ`).
///
/// # Formula
///
/// For a batch `x` of `n` values with mean `μ_x` and (biased) variance `v_x`,
/// `d = μ_x − mean`, `N = count + n`:
///
/// ```text
/// mean  ← mean + d·n/N
/// var   ← (var·count + d²·count·n/N + v_x·n) / N
/// std   ← sqrt(var·N/(N − 1))
/// count ← N
/// ```
///
/// # Peers
///
/// TRL `RunningMoments` (BCO), single process. Its initial state is
/// [`RunningMoments::default`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RunningMoments<F> {
    /// Running mean.
    pub mean: F,
    /// Running (biased) variance.
    pub var: F,
    /// Running unbiased standard deviation.
    pub std: F,
    /// Number of values seen (starts at `1e-24`, TRL's guard against 0/0).
    pub count: F,
}

impl<F: Real> Default for RunningMoments<F> {
    /// TRL's initial state: mean 0, var 1, std 1, count `1e-24`.
    fn default() -> Self {
        RunningMoments {
            mean: F::zero(),
            var: F::one(),
            std: F::one(),
            count: F::of(1e-24),
        }
    }
}

impl<F: Real> RunningMoments<F> {
    /// Folds a batch into the moments (see the type's formula). An empty batch
    /// changes nothing.
    pub fn update(&mut self, xs: &[F]) {
        let n = xs.len();
        if n == 0 {
            return;
        }
        let nf = F::of_usize(n);
        let mu = xs.iter().copied().sum::<F>() / nf;
        let v = xs.iter().map(|&x| (x - mu) * (x - mu)).sum::<F>() / nf;
        self.update_moments(n, mu, v);
    }

    /// Folds a batch given by its size `n`, mean `mu` and biased variance
    /// `var` into the moments (the type's formula; [`update`](Self::update)
    /// computes those three and calls this). `n = 0` changes nothing.
    pub fn update_moments(&mut self, n: usize, mu: F, v: F) {
        if n == 0 {
            return;
        }
        let nf = F::of_usize(n);
        let d = mu - self.mean;
        let tot = self.count + nf;
        let new_sum = v * nf;
        let old_sum = self.var * self.count + d * d * self.count * nf / tot;
        self.mean += d * nf / tot;
        let new_var = (old_sum + new_sum) / tot;
        self.std = (new_var * tot / (tot - F::one())).sqrt();
        self.var = new_var;
        self.count = tot;
    }
}

/// BCO's per-example term and its derivative with respect to the reward.
///
/// # Formula
/// ```text
/// desirable:   −log σ(reward − δ)
/// undesirable: −log σ(−(reward − δ))
/// ```
///
/// # Gradient
/// `∂/∂reward = −σ(−(reward − δ))` (desirable) or `σ(reward − δ)`
/// (undesirable); δ is detached. Returned as `(loss, ∂loss/∂reward)`.
///
/// # Peers
/// TRL `BCOTrainer.bco_loss`.
pub fn bco_term<E: Elem>(reward: E, delta: E, desirable: bool) -> (E, E) {
    let x = reward.sub(delta);
    if desirable {
        (x.clone().log_sigmoid().neg(), x.neg().sigmoid().neg())
    } else {
        (x.clone().neg().log_sigmoid().neg(), x.sigmoid())
    }
}

/// Cotangents of [`bco_loss`]'s outputs: losses (chosen first, then
/// rejected), chosen rewards, rejected rewards.
pub type BcoCotangents<'a, F> = (&'a [F], &'a [F], &'a [F]);

/// BCO's per-example losses with the running reward shift.
///
/// # Formula
///
/// ```text
/// chosen_rewards   = β·c,  rejected_rewards = β·r       (c, r: log-ratios; not detached)
/// δ = running mean after folding in [chosen_rewards, rejected_rewards]   (if do_train; else the current mean)
/// losses = [−log σ(β c_i − δ)]_i ++ [−log σ(−(β r_j − δ))]_j
/// ```
///
/// Returns `δ`; `running` is updated in place when `do_train`.
///
/// # Gradient
///
/// With cotangents `(c_L, c_cr, c_rr)` (δ is detached):
/// `dchosen_i = β·(−c_L,i·σ(−(βc_i − δ)) + c_cr,i)`,
/// `drejected_j = β·(c_L,n_c+j·σ(βr_j − δ) + c_rr,j)` (written).
///
/// # Peers
///
/// TRL `BCOTrainer.bco_loss` without underlying-distribution matching.
///
/// # Errors
///
/// [`Error::OutOfRange`] unless `β > 0`; [`Error::ShapeMismatch`] for buffers.
#[allow(clippy::too_many_arguments)]
pub fn bco_loss<F: Real>(
    beta: f64,
    chosen_logratios: &[F],
    rejected_logratios: &[F],
    running: &mut RunningMoments<F>,
    do_train: bool,
    losses: &mut [F],
    chosen_rewards: &mut [F],
    rejected_rewards: &mut [F],
    vjp: Option<(BcoCotangents<'_, F>, &mut [F], &mut [F])>,
) -> Result<F, Error> {
    check_beta(beta)?;
    let (nc, nr) = (chosen_logratios.len(), rejected_logratios.len());
    check_len("losses", losses.len(), nc + nr)?;
    check_len("chosen_rewards", chosen_rewards.len(), nc)?;
    check_len("rejected_rewards", rejected_rewards.len(), nr)?;
    let b = F::of(beta);
    for (o, &c) in chosen_rewards.iter_mut().zip(chosen_logratios) {
        *o = b * c;
    }
    for (o, &r) in rejected_rewards.iter_mut().zip(rejected_logratios) {
        *o = b * r;
    }
    if do_train {
        // The update sees the concatenation [chosen, rejected]; the losses
        // buffer serves as scratch for it before it is overwritten.
        losses[..nc].copy_from_slice(chosen_rewards);
        losses[nc..].copy_from_slice(rejected_rewards);
        running.update(losses);
    }
    let delta = running.mean;
    for i in 0..nc {
        losses[i] = bco_term(chosen_rewards[i], delta, true).0;
    }
    for j in 0..nr {
        losses[nc + j] = bco_term(rejected_rewards[j], delta, false).0;
    }
    if let Some(((cl, ccr, crr), dc, dr)) = vjp {
        check_len("cotangent losses", cl.len(), nc + nr)?;
        check_len("cotangent chosen_rewards", ccr.len(), nc)?;
        check_len("cotangent rejected_rewards", crr.len(), nr)?;
        check_len("grad policy_chosen_logps", dc.len(), nc)?;
        check_len("grad policy_rejected_logps", dr.len(), nr)?;
        for i in 0..nc {
            let d = bco_term(chosen_rewards[i], delta, true).1;
            dc[i] = b * (cl[i] * d + ccr[i]);
        }
        for j in 0..nr {
            let d = bco_term(rejected_rewards[j], delta, false).1;
            dr[j] = b * (cl[nc + j] * d + crr[j]);
        }
    }
    Ok(delta)
}

/// Configuration of the process-reward-model loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrmConfig<'a> {
    /// The token id that marks a scored step (OpenRLHF `placeholder_token_id`).
    pub placeholder_token_id: i64,
    /// The vocabulary ids whose logits are the reward classes; `None` trains
    /// the whole vocabulary (hard labels only). Soft labels need exactly two.
    pub reward_token_ids: Option<&'a [i64]>,
}

/// The loss and accuracy of a process reward model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrmOutput<F> {
    /// Mean cross-entropy over the scored steps.
    pub loss: F,
    /// Fraction of scored steps whose arg-max class equals the label.
    pub acc: F,
}

/// The class logits of one row: the whole row or the reward-token columns.
fn class_logit<F: Real>(z: &[F], ids: Option<&[i64]>, k: usize) -> F {
    match ids {
        Some(ids) => z[ids[k] as usize],
        None => z[k],
    }
}

/// `(lse, argmax)` over the classes (first maximum on ties; NaN wins, like
/// `torch.argmax`).
fn class_lse_argmax<F: Real>(z: &[F], ids: Option<&[i64]>, n: usize) -> (F, usize) {
    let mut arg = 0;
    for k in 1..n {
        let (a, b) = (class_logit(z, ids, arg), class_logit(z, ids, k));
        if !a.is_nan() && (b > a || b.is_nan()) {
            arg = k;
        }
    }
    let lse = match ids {
        None => row_max_lse(z).1,
        Some(_) => {
            let m = class_logit(z, ids, arg);
            if !m.is_finite() {
                (0..n).map(|k| class_logit(z, ids, k).exp()).sum::<F>().ln()
            } else {
                m + (0..n)
                    .map(|k| (class_logit(z, ids, k) - m).exp())
                    .sum::<F>()
                    .ln()
            }
        }
    };
    (lse, arg)
}

fn prm_check<F>(
    cfg: &PrmConfig<'_>,
    inputs: &[i64],
    logits: &[F],
    vocab: usize,
    labels_len: usize,
) -> Result<usize, Error> {
    check_len("labels", labels_len, inputs.len())?;
    check_len("logits", logits.len(), inputs.len() * vocab)?;
    if vocab == 0 && !inputs.is_empty() {
        return Err(Error::Empty {
            input: "logits (vocabulary)",
        });
    }
    match cfg.reward_token_ids {
        Some(ids) => {
            if ids.is_empty() {
                return Err(Error::Empty {
                    input: "reward_token_ids",
                });
            }
            if ids.iter().any(|&t| t < 0 || t as usize >= vocab) {
                return Err(Error::Invalid {
                    input: "reward_token_ids",
                    rule: "every reward token id must lie in [0, vocab)",
                });
            }
            Ok(ids.len())
        }
        None => Ok(vocab),
    }
}

/// Process-reward-model cross-entropy with hard (class-id) labels.
///
/// `inputs` and `labels` are `[batch·seq]` token ids, `logits` is
/// `[batch·seq, vocab]`. Only positions where `inputs == placeholder_token_id`
/// are scored. With `reward_token_ids = Some(ids)` the classes are the logits
/// at `ids`, and labels are mapped to class indices by replacing
/// `ids[0]`, then `ids[1]`, … in turn (the peer's sequential `torch.where`;
/// a label equal to an earlier replacement's index is replaced again).
/// Labels `−100` are ignored by the loss but count (as wrong) in the accuracy.
///
/// # Formula
///
/// ```text
/// loss = −(1/N) Σ_{scored, label ≠ −100} log softmax(classes)[label]   (0 when N = 0)
/// acc  = (1/M) Σ_{scored} 1[argmax classes = label]                      (0 when M = 0)
/// ```
///
/// # Gradient
///
/// `dlogits[row, class k] = (softmax(classes)ₖ − 1[k = label]) / N` on
/// scored rows with a label, 0 elsewhere (written, not accumulated).
///
/// # Peers
///
/// OpenRLHF `PRMLoss` (legacy commit 04898500), integer labels. The peer's
/// empty means are NaN; posttrain gives 0.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths; [`Error::Invalid`] for a reward id
/// outside the vocabulary or a scored label (after mapping) outside the
/// classes and not `−100`.
pub fn prm_hard_loss<F: Real>(
    cfg: &PrmConfig<'_>,
    inputs: &[i64],
    logits: &[F],
    vocab: usize,
    labels: &[i64],
    dlogits: Option<&mut [F]>,
) -> Result<PrmOutput<F>, Error> {
    let n_classes = prm_check(cfg, inputs, logits, vocab, labels.len())?;
    let ids = cfg.reward_token_ids;
    let map = |l: i64| -> i64 {
        match ids {
            Some(ids) => ids
                .iter()
                .enumerate()
                .fold(l, |acc, (i, &t)| if acc == t { i as i64 } else { acc }),
            None => l,
        }
    };
    let (mut n, mut m, mut correct) = (0usize, 0usize, 0usize);
    for (i, &tok) in inputs.iter().enumerate() {
        if tok != cfg.placeholder_token_id {
            continue;
        }
        m += 1;
        let l = map(labels[i]);
        if l == -100 {
            continue;
        }
        if l < 0 || l as usize >= n_classes {
            return Err(Error::Invalid {
                input: "labels",
                rule: "a scored label must be -100 or a class of the reward tokens",
            });
        }
        n += 1;
    }
    let inv_n = if n == 0 {
        F::zero()
    } else {
        F::one() / F::of_usize(n)
    };
    let mut s = F::zero();
    let mut dlogits = dlogits;
    if let Some(g) = dlogits.as_mut() {
        check_len("grad logits", g.len(), logits.len())?;
        g.iter_mut().for_each(|x| *x = F::zero());
    }
    for (i, &tok) in inputs.iter().enumerate() {
        if tok != cfg.placeholder_token_id {
            continue;
        }
        let z = &logits[i * vocab..(i + 1) * vocab];
        let (lse, arg) = class_lse_argmax(z, ids, n_classes);
        let l = map(labels[i]);
        if l == arg as i64 {
            correct += 1;
        }
        if l == -100 {
            continue;
        }
        let l = l as usize;
        s += class_logit(z, ids, l) - lse;
        if let Some(g) = dlogits.as_mut() {
            for k in 0..n_classes {
                let p = (class_logit(z, ids, k) - lse).exp();
                let y = if k == l { F::one() } else { F::zero() };
                let col = match ids {
                    Some(ids) => ids[k] as usize,
                    None => k,
                };
                g[i * vocab + col] += (p - y) * inv_n;
            }
        }
    }
    let acc = if m == 0 {
        F::zero()
    } else {
        F::of_usize(correct) / F::of_usize(m)
    };
    Ok(PrmOutput {
        loss: -s * inv_n,
        acc,
    })
}

/// Process-reward-model cross-entropy with soft labels `p` (probability of
/// the first reward token).
///
/// # Formula
///
/// With the two class logits `(z₀, z₁)` at `reward_token_ids` and targets
/// `(p, 1 − p)`, over the `N` scored positions:
///
/// ```text
/// loss = −(1/N) Σ (p·log softmax(z)₀ + (1 − p)·log softmax(z)₁)    (0 when N = 0)
/// acc  = (1/N) Σ 1[argmax z = argmax (p, 1 − p)]
/// ```
///
/// # Gradient
///
/// `dlogits[row, ids[k]] = (softmax(z)ₖ − yₖ)/N` on scored rows (written).
///
/// # Peers
///
/// OpenRLHF `PRMLoss` (legacy commit 04898500), float labels.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for lengths; [`Error::Invalid`] unless
/// `reward_token_ids` holds exactly two ids inside the vocabulary.
pub fn prm_soft_loss<F: Real>(
    cfg: &PrmConfig<'_>,
    inputs: &[i64],
    logits: &[F],
    vocab: usize,
    labels: &[F],
    dlogits: Option<&mut [F]>,
) -> Result<PrmOutput<F>, Error> {
    if cfg.reward_token_ids.map(|ids| ids.len()) != Some(2) {
        return Err(Error::Invalid {
            input: "reward_token_ids",
            rule: "soft labels need exactly two reward token ids",
        });
    }
    prm_check(cfg, inputs, logits, vocab, labels.len())?;
    let ids = cfg.reward_token_ids;
    let n = inputs
        .iter()
        .filter(|&&t| t == cfg.placeholder_token_id)
        .count();
    let inv_n = if n == 0 {
        F::zero()
    } else {
        F::one() / F::of_usize(n)
    };
    let mut dlogits = dlogits;
    if let Some(g) = dlogits.as_mut() {
        check_len("grad logits", g.len(), logits.len())?;
        g.iter_mut().for_each(|x| *x = F::zero());
    }
    let (mut s, mut correct) = (F::zero(), 0usize);
    for (i, &tok) in inputs.iter().enumerate() {
        if tok != cfg.placeholder_token_id {
            continue;
        }
        let z = &logits[i * vocab..(i + 1) * vocab];
        let (lse, arg) = class_lse_argmax(z, ids, 2);
        let p = labels[i];
        let y = [p, F::one() - p];
        let label_arg = if y[1] > y[0] { 1 } else { 0 };
        if arg == label_arg {
            correct += 1;
        }
        for (k, &yk) in y.iter().enumerate() {
            s += yk * (class_logit(z, ids, k) - lse);
        }
        if let Some(g) = dlogits.as_mut() {
            for (k, &yk) in y.iter().enumerate() {
                let pk = (class_logit(z, ids, k) - lse).exp();
                let col = ids.map(|ids| ids[k] as usize).unwrap_or(k);
                // Sum of targets is 1, so ∂/∂zₖ = softmaxₖ·Σy − yₖ = softmaxₖ − yₖ.
                g[i * vocab + col] += (pk - yk) * inv_n;
            }
        }
    }
    Ok(PrmOutput {
        loss: -s * inv_n,
        acc: F::of_usize(correct) * inv_n,
    })
}
