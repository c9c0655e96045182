//! The DPO family on tensors of sequence log-probabilities: the core's
//! per-pair kernel [`PairedConfig::pair_term`] and [`FDivergence::score`]
//! run on `[batch]` tensors, averaged over the batch, with the gradient with
//! respect to the policy's chosen and rejected log-probabilities.
//!
//! Supported [`PairedLoss`] terms: every per-pair loss (`Sigmoid` — DPO,
//! cDPO, SimPO —, `Hinge`, `Ipo`, `ExoPair`, `NcaPair`, `Robust`, `BcoPair`,
//! `SppoHard`, `ApoZero`, `ApoDown`, `Discopop`, `SigmoidNorm`), mixed with
//! weights. Not here: `Aot`/`AotUnpaired` (sorting across the batch) and
//! `Sft` (token-level inputs) — [`Error::Invalid`].
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

use burn::tensor::Tensor;
use posttrain_core::preference::paired::{
    FDivergence, LossTerm, PairArgs, PairedConfig, PairedLoss,
};
use posttrain_core::Error;

use crate::elem::ElemTensor;
use crate::util::check_shape;

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
}

/// What [`paired_loss`] returns.
#[derive(Debug, Clone)]
pub struct PairedTensorOutput {
    /// The batch mean `(1/B) Σᵢ lossᵢ`, `[1]`.
    pub loss: Tensor<1>,
    /// `lossᵢ = ωᵢ Σₖ wₖ termₖ(i)`, `[B]`.
    pub per_pair: Tensor<1>,
    /// `∂loss/∂cᵢ` of the mean loss, `[B]`.
    pub grad_chosen: Tensor<1>,
    /// `∂loss/∂rᵢ` of the mean loss, `[B]`.
    pub grad_rejected: Tensor<1>,
    /// `∂lossᵢ/∂cᵢ` (each pair's loss depends on its own pair only, so any
    /// per-pair cotangent `u` gives the VJP `u ⊙ d_per_pair_chosen`).
    pub d_per_pair_chosen: Tensor<1>,
    /// `∂lossᵢ/∂rᵢ`.
    pub d_per_pair_rejected: Tensor<1>,
    /// Implicit rewards `β(c − c₀)` (detached metrics), `[B]`.
    pub chosen_rewards: Tensor<1>,
    /// Implicit rewards `β(r − r₀)`, `[B]`.
    pub rejected_rewards: Tensor<1>,
}

/// A paired preference loss over a batch, on tensors.
///
/// # Formula
///
/// As [`posttrain_core::preference::paired::paired_loss`]:
/// `ℓc = c − c₀`, `ℓr = r − r₀`, `sc = f(ℓc)`, `sr = f(ℓr)`,
/// `lossᵢ = ωᵢ Σₖ wₖ · termₖ(pair i)` ([`PairedConfig::pair_term`] on the
/// whole `[B]` tensors), `loss = (1/B) Σᵢ lossᵢ`.
///
/// # Gradient
///
/// `∂lossᵢ/∂cᵢ = ωᵢ Σₖ wₖ (∂termₖ/∂ℓc + ∂termₖ/∂sc · f′(ℓc))`, likewise for
/// `r`; the mean's gradient divides by `B`.
///
/// # Peers
///
/// TRL `DPOTrainer` losses after the sequence sums, OpenRLHF `DPOLoss`,
/// torchtune `DPOLoss`/`IPOLoss`/`RSOLoss`/`SimPOLoss` (see the core).
///
/// # Errors
///
/// [`Error::Empty`] for no pair or no term; [`Error::ShapeMismatch`] for
/// shapes; [`Error::Invalid`] for `Aot`, `AotUnpaired`, `Sft`, or
/// `SigmoidNorm` without lengths; [`PairedConfig::check_terms`]'s errors.
pub fn paired_loss(
    cfg: &PairedConfig,
    terms: &[LossTerm],
    batch: PairTensors,
) -> Result<PairedTensorOutput, Error> {
    cfg.validate()?;
    cfg.check_terms(terms)?;
    let [n] = batch.policy_chosen.dims();
    if n == 0 {
        return Err(Error::Empty {
            input: "policy_chosen_logps",
        });
    }
    check_shape("policy_rejected_logps", batch.policy_rejected.dims(), [n])?;
    if let Some((c0, r0)) = &batch.reference {
        check_shape("reference_chosen_logps", c0.dims(), [n])?;
        check_shape("reference_rejected_logps", r0.dims(), [n])?;
    }
    if let Some((lc, lr)) = &batch.lengths {
        check_shape("chosen_len", lc.dims(), [n])?;
        check_shape("rejected_len", lr.dims(), [n])?;
    }
    if let Some(w) = &batch.pair_weight {
        check_shape("pair_weight", w.dims(), [n])?;
    }
    for t in terms {
        match t.kind {
            PairedLoss::Aot | PairedLoss::AotUnpaired | PairedLoss::Sft => {
                return Err(Error::Invalid {
                    input: "loss_type",
                    rule: "aot, aot_unpaired and sft are not implemented on burn tensors",
                })
            }
            PairedLoss::SigmoidNorm if batch.lengths.is_none() => {
                return Err(Error::Invalid {
                    input: "chosen_len",
                    rule: "sigmoid_norm needs the completion lengths",
                })
            }
            _ => {}
        }
    }
    let c = batch.policy_chosen.clone();
    let r = batch.policy_rejected.clone();
    let (lc, lr) = match &batch.reference {
        Some((c0, r0)) => (c.clone() - c0.clone(), r.clone() - r0.clone()),
        None => (c.clone(), r.clone()),
    };
    let (sc, dsc) = score(&cfg.divergence, lc.clone());
    let (sr, dsr) = score(&cfg.divergence, lr.clone());
    let (ic, ir) = match &batch.lengths {
        Some((a, b)) => (
            a.clone().clamp_min(1.0).recip(),
            b.clone().clamp_min(1.0).recip(),
        ),
        None => (c.ones_like(), c.ones_like()),
    };
    let args = PairArgs {
        chosen_score: ElemTensor(sc),
        rejected_score: ElemTensor(sr),
        chosen_logratio: ElemTensor(lc.clone()),
        rejected_logratio: ElemTensor(lr.clone()),
        inv_len_chosen: ElemTensor(ic),
        inv_len_rejected: ElemTensor(ir),
    };
    let mut per_pair = c.zeros_like();
    let mut dc = c.zeros_like();
    let mut dr = c.zeros_like();
    for t in terms {
        let v = cfg.pair_term(t.kind, &args);
        per_pair = per_pair + v.loss.0.mul_scalar(t.weight);
        dc = dc + (v.d_chosen_logratio.0 + v.d_chosen_score.0 * dsc.clone()).mul_scalar(t.weight);
        dr = dr
            + (v.d_rejected_logratio.0 + v.d_rejected_score.0 * dsr.clone()).mul_scalar(t.weight);
    }
    if let Some(w) = batch.pair_weight {
        per_pair = per_pair * w.clone();
        dc = dc * w.clone();
        dr = dr * w;
    }
    let inv_b = 1.0 / n as f64;
    Ok(PairedTensorOutput {
        loss: per_pair.clone().mean(),
        per_pair,
        grad_chosen: dc.clone().mul_scalar(inv_b),
        grad_rejected: dr.clone().mul_scalar(inv_b),
        d_per_pair_chosen: dc,
        d_per_pair_rejected: dr,
        chosen_rewards: lc.mul_scalar(cfg.beta),
        rejected_rewards: lr.mul_scalar(cfg.beta),
    })
}

fn score(div: &FDivergence, x: Tensor<1>) -> (Tensor<1>, Tensor<1>) {
    let (s, d) = div.score(ElemTensor(x));
    (s.0, d.0)
}
