//! KL estimators between the policy and a reference, per token.
//!
//! # Overview
//!
//! With `x = log π(a) − log π_ref(a)` for a token `a` sampled from `π`, the
//! classic single-sample estimators of `KL(π ‖ π_ref)` are
//!
//! | estimator | value | `∂/∂ log π` | bias / variance |
//! |---|---|---|---|
//! | [`K1`](KlEstimator::K1) (`kl`) | `x` | `1` | unbiased, high variance, can be < 0 |
//! | [`Abs`](KlEstimator::Abs) (`abs`) | `|x|` | `sign(x)` (0 at a tie) | biased |
//! | [`K2`](KlEstimator::K2) (`mse`) | `x² / 2` | `x` | biased, low variance |
//! | [`K3`](KlEstimator::K3) (`low_var_kl`) | `e^{−x} + x − 1` | `1 − e^{−x}` | unbiased, low variance, ≥ 0 |
//!
//! The **straight-through** variants (`kl+`, `abs+`, `k3+`, …) keep the base
//! estimator's value but use the k2 gradient `x`, whose expectation is the
//! gradient of the true KL when used as a loss (verl's `+` modes).
//!
//! # Peers and clamps
//!
//! | preset | log-ratio clamp (k3 only) | value clamp |
//! |---|---|---|
//! | `Verl` | `−x ∈ [−20, 20]` | k3 value to `[−10, 10]` |
//! | `OpenRlhf` | none | every estimator's value to `[−10, 10]` |
//! | `Trl`, `Torchtune` | none | none |
//!
//! A clamp that is active zeroes the gradient at that position (as
//! `torch.clamp`'s backward does; a value exactly on the bound keeps it).
//!
//! # Example
//!
//! ```
//! use posttrain_core::kl::{KlConfig, KlEstimator};
//! use posttrain_core::Preset;
//! let cfg = KlConfig::preset(KlEstimator::K3, Preset::Verl);
//! let (v, g) = cfg.estimate(-1.0f64, -1.5);
//! // x = 0.5: e^{-0.5} + 0.5 − 1 and 1 − e^{-0.5}
//! assert!((v - ((-0.5f64).exp() - 0.5)).abs() < 1e-15);
//! assert!((g - (1.0 - (-0.5f64).exp())).abs() < 1e-15);
//! ```

use crate::elem::{Elem, ElemExt, MaskElem, Real};
use crate::error::{check_len, Error};
use crate::preset::Preset;

/// A single-sample KL estimator (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum KlEstimator {
    /// `x = log π − log π_ref` (verl `kl`/`k1`).
    K1,
    /// `|x|` (verl `abs`).
    Abs,
    /// `x² / 2` (verl `mse`/`k2`).
    K2,
    /// `e^{−x} + x − 1` (verl `low_var_kl`/`k3`, Schulman's k3).
    K3,
}

/// A KL estimator with its clamps and gradient mode.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct KlConfig {
    /// Which estimator.
    pub estimator: KlEstimator,
    /// Straight-through: the value of `estimator`, the gradient of k2 (`x`).
    pub straight_through: bool,
    /// k3 only: clamp `−x = log π_ref − log π` to `[−c, c]` before `exp`
    /// (verl: 20). `None`: no clamp.
    pub log_ratio_clamp: Option<f64>,
    /// Clamp the estimate to `[−c, c]` (verl k3: 10, OpenRLHF: 10 for all).
    pub value_clamp: Option<f64>,
}

impl KlConfig {
    /// An estimator with no clamps and its own gradient.
    pub const fn new(estimator: KlEstimator) -> Self {
        KlConfig {
            estimator,
            straight_through: false,
            log_ratio_clamp: None,
            value_clamp: None,
        }
    }

    /// The estimator with the clamps the framework applies (table in the
    /// [module docs](self)).
    pub fn preset(estimator: KlEstimator, preset: Preset) -> Self {
        let mut c = KlConfig::new(estimator);
        match preset {
            Preset::Verl if estimator == KlEstimator::K3 => {
                c.log_ratio_clamp = Some(20.0);
                c.value_clamp = Some(10.0);
            }
            Preset::OpenRlhf => c.value_clamp = Some(10.0),
            _ => {}
        }
        c
    }

    /// Parses verl's `kl_penalty` names with verl's clamps: `kl`/`k1`,
    /// `abs`, `mse`/`k2`, `low_var_kl`/`k3`, each optionally suffixed `+`
    /// (straight-through). `full` (needs full-vocabulary logits) is refused.
    pub fn parse_verl(name: &str) -> Result<Self, Error> {
        let (base, st) = match name.strip_suffix('+') {
            Some(b) => (b, true),
            None => (name, false),
        };
        let est = match base {
            "kl" | "k1" => KlEstimator::K1,
            "abs" => KlEstimator::Abs,
            "mse" | "k2" => KlEstimator::K2,
            "low_var_kl" | "k3" => KlEstimator::K3,
            _ => {
                return Err(Error::unknown_option(
                    "KL estimator",
                    name,
                    "kl, k1, abs, mse, k2, low_var_kl, k3 (each optionally with a `+` suffix)",
                ))
            }
        };
        let mut c = KlConfig::preset(est, Preset::Verl);
        c.straight_through = st;
        Ok(c)
    }

    /// The estimate and its derivative with respect to `log_prob`, element-wise.
    ///
    /// # Formula
    ///
    /// See the [module docs](self); `x = log_prob − ref_log_prob`.
    ///
    /// # Gradient
    ///
    /// k1: `1`; abs: `sign(x)`; k2: `x`; k3: `1 − e^{−x}`; straight-through: `x`.
    /// Zero wherever a clamp is active (not for straight-through, whose
    /// surrogate `x²/2` is never clamped).
    pub fn estimate<E: Elem>(&self, log_prob: E, ref_log_prob: E) -> (E, E) {
        let x = log_prob.sub(ref_log_prob);
        let (value, grad) = match self.estimator {
            KlEstimator::K1 => (x.clone(), x.full_like(1.0)),
            KlEstimator::Abs => {
                let pos = x.gt_scalar(0.0);
                let neg = x.lt_scalar(0.0);
                let sign = E::select(
                    &pos,
                    x.full_like(1.0),
                    E::select(&neg, x.full_like(-1.0), x.full_like(0.0)),
                );
                (x.clone().abs(), sign)
            }
            KlEstimator::K2 => (x.clone().square().mul_scalar(0.5), x.clone()),
            KlEstimator::K3 => {
                // kl = ref − logp = −x, clamped; value e^{kl} − kl − 1.
                let kl = x.clone().neg();
                let kl_c = match self.log_ratio_clamp {
                    Some(c) => kl.clone().clamp(-c, c),
                    None => kl.clone(),
                };
                let r = kl_c.clone().exp();
                let v = r.clone().sub(kl_c).add_scalar(-1.0);
                // d/dlogp (e^{−x} + x − 1) = 1 − e^{−x}
                let g = r.neg().add_scalar(1.0);
                match self.log_ratio_clamp {
                    Some(c) => {
                        let live = kl.ge_scalar(-c).and(kl.le_scalar(c));
                        let zero = g.full_like(0.0);
                        (v, E::select(&live, g, zero))
                    }
                    None => (v, g),
                }
            }
        };
        let (value, grad) = match self.value_clamp {
            Some(c) => {
                let live = value.ge_scalar(-c).and(value.le_scalar(c));
                let zero = grad.full_like(0.0);
                (value.clamp(-c, c), E::select(&live, grad, zero))
            }
            None => (value, grad),
        };
        if self.straight_through {
            (value, x)
        } else {
            (value, grad)
        }
    }

    /// Applies [`estimate`](Self::estimate) over slices: writes the estimate
    /// into `out` and, if `vjp` is `Some((cotangent, grad))`, the
    /// vector-Jacobian product `grad = cotangent ⊙ ∂estimate/∂log_prob`.
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] if any slice's length differs from `log_prob`'s.
    pub fn estimate_slices<F: Real>(
        &self,
        log_prob: &[F],
        ref_log_prob: &[F],
        out: &mut [F],
        vjp: Option<(&[F], &mut [F])>,
    ) -> Result<(), Error> {
        let n = log_prob.len();
        check_len("ref_log_prob", ref_log_prob.len(), n)?;
        check_len("out", out.len(), n)?;
        match vjp {
            Some((cot, grad)) => {
                check_len("cotangent", cot.len(), n)?;
                check_len("grad", grad.len(), n)?;
                for i in 0..n {
                    let (v, g) = self.estimate(log_prob[i], ref_log_prob[i]);
                    out[i] = v;
                    grad[i] = cot[i] * g;
                }
            }
            None => {
                for i in 0..n {
                    out[i] = self.estimate(log_prob[i], ref_log_prob[i]).0;
                }
            }
        }
        Ok(())
    }
}
