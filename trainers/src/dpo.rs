//! Direct preference optimisation and its family: learn from pairs
//! `(prompt, chosen, rejected)` without a reward model or sampling.
//!
//! # Sequence log-probabilities
//!
//! Every loss here reads the policy's log-probability of a whole completion,
//! `log π(y | x) = Σ_t log π(y_t | x, y_<t)` over the completion's tokens
//! (EOS included, prompt and padding excluded). One forward pass scores the
//! chosen and the rejected completions of a batch together
//! ([`sequence_logps`]): [`crate::sft::batch_of`] pads them,
//! [`crate::generate::completion_log_probs`] gives the per-token log-probs
//! (posttrain-burn's fused selective log-softmax), and the padding is
//! *selected* away (`mask_where`) before the row sum, so nothing from a
//! padded position reaches a value or a gradient.
//!
//! # The losses
//!
//! With `c = log π(y_c|x)`, `r = log π(y_r|x)` and the frozen reference's
//! `c₀`, `r₀`, DPO's implicit reward of a completion is `β(log π − log π_ref)`
//! and the DPO loss is `−log σ(β((c − c₀) − (r − r₀)))` (TRL `sigmoid`). The
//! `loss_type` names are TRL's:
//!
//! | `loss_type` | what | computed by |
//! |---|---|---|
//! | `sigmoid`, `hinge`, `ipo`, `exo_pair`, `nca_pair`, `robust`, `bco_pair`, `sppo_hard`, `aot`, `aot_unpaired`, `apo_zero`, `apo_down`, `discopop`, `sigmoid_norm` | the core's paired losses ([`PairedLoss`]), `ipo` and `sigmoid_norm` length-normalised as in TRL | [`posttrain_burn::fused::paired_loss`]: value and closed-form gradient of the core |
//! | a comma-separated list, e.g. `sigmoid,sft` | TRL's multi-loss with `loss_weights`; `sft` is the token-mean NLL of the chosen completions (with `rpo_alpha`, the same term: RPO) | as above, plus the NLL |
//! | `simpo` | SimPO: reference-free, per-token mean log-probs, `−log σ(β(c̄ − r̄) − γ)` with `γ = simpo_gamma` (TRL `CPOTrainer` `loss_type="simpo"`) | `fused::paired_loss` |
//! | `orpo` | ORPO: reference-free, `NLL(chosen) − β · mean log σ(log odds(c̄) − log odds(r̄))` on per-token mean log-probs (TRL `ORPOTrainer`) | [`posttrain_burn::preference::odds_ratio_loss`] |
//! | `kto`, `apo_zero_unpaired` | KTO: each pair gives one desirable (chosen) and one undesirable (rejected) example, the KL reference point from mismatched prompt/completion pairs (TRL `KTOTrainer`) | [`posttrain_burn::preference::kto_loss`] |
//!
//! The losses without a fused op (ORPO, KTO) are evaluated by posttrain-burn
//! on the inner device and reach the model through the surrogate of the
//! [crate docs](crate): a term whose value is the loss and whose gradient in
//! the sequence log-probs is the core's closed form.
//!
//! # The reference
//!
//! [`DpoTrainer::new`] freezes a copy of the starting model (`model.valid()`)
//! as the reference. With `precompute_ref_log_probs` (TRL's option) each
//! sequence's reference log-prob is computed once — on first sight or by
//! [`DpoTrainer::precompute_reference`] — and cached; otherwise the frozen
//! reference is run on every batch. The reference is frozen, so both give the
//! same numbers; caching saves a forward pass per step. `reference_free`
//! (TRL) drops it (`c₀ = r₀ = 0`).
//!
//! # Metrics
//!
//! TRL's `rewards/chosen`, `rewards/rejected`, `rewards/accuracies` (share of
//! pairs with `β(c − c₀) > β(r − r₀)`, strictly), `rewards/margins`,
//! `logps/chosen`, `logps/rejected` ([`DpoStepStats`]; for the
//! reference-free losses the implicit reward is `β·c̄`, as TRL's CPO/ORPO
//! trainers report it). [`DpoTrainer::implicit_reward_accuracy`] measures
//! the accuracy on held-out pairs.

use std::collections::HashMap;

use burn::tensor::{Bool, Device, Tensor, TensorData};
use posttrain_burn::fused;
use posttrain_burn::preference::{self as pref, OrpoCotangentTensors, PairTensors};
use posttrain_core::preference::paired::{
    implicit_rewards, FDivergence, LossTerm, PairedConfig, PairedLoss,
};
use posttrain_core::preference::unpaired::{KtoConfig, KtoLossType};
use serde::{Deserialize, Serialize};

use crate::generate::completion_log_probs;
use crate::model::Policy;
use crate::sft::{batch_of, Example};
use crate::{apply_gradients, scalar, with_closed_form_gradient, OptimizerConfig, TrainError};

/// One preference: a prompt and two completions of it (token ids, each
/// completion ending with EOS as the model should produce it), the chosen
/// one preferred.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// The preferred completion.
    pub chosen: Vec<u32>,
    /// The other completion.
    pub rejected: Vec<u32>,
    /// How much better the chosen one is (TRL's `margin` column), read by
    /// the reward model's loss; the DPO losses ignore it.
    pub margin: Option<f64>,
}

impl PreferencePair {
    /// A pair without a margin.
    pub fn new(prompt: Vec<u32>, chosen: Vec<u32>, rejected: Vec<u32>) -> Self {
        PreferencePair {
            prompt,
            chosen,
            rejected,
            margin: None,
        }
    }

    /// The same pair with a margin.
    pub fn with_margin(mut self, margin: f64) -> Self {
        self.margin = Some(margin);
        self
    }
}

/// DPO settings: TRL `DPOConfig` names (`beta`, `loss_type`,
/// `loss_weights`, `label_smoothing`, `rpo_alpha`, `reference_free`,
/// `precompute_ref_log_probs`, `f_divergence_type`,
/// `f_alpha_divergence_coef`, `discopop_tau`), plus `simpo_gamma` (TRL
/// `CPOConfig`) and `desirable_weight`/`undesirable_weight` (TRL
/// `KTOConfig`) for the `simpo` and `kto` loss types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DpoConfig {
    /// AdamW.
    pub optimizer: OptimizerConfig,
    /// Pairs per step (TRL `per_device_train_batch_size`), and per forward
    /// pass in evaluation.
    pub batch_size: usize,
    /// β (> 0): the inverse temperature of the implicit reward (ORPO's λ).
    pub beta: f64,
    /// The loss, TRL names (see the [module docs](self)); several paired
    /// losses comma-separated are summed with `loss_weights`.
    pub loss_type: String,
    /// One weight per `loss_type` entry (empty: all 1).
    pub loss_weights: Vec<f64>,
    /// ε: label noise of `robust`, `exo_pair`, `aot*`; for `sigmoid`, cDPO
    /// smoothing (OpenRLHF and torchtune apply it, TRL's current `sigmoid`
    /// does not: here `ε > 0` turns it on).
    pub label_smoothing: f64,
    /// RPO: adds `rpo_alpha ×` the token-mean NLL of the chosen
    /// completions to a paired loss (TRL `rpo_alpha`; the same term as
    /// `loss_type = "…,sft"` with that weight). It keeps the chosen
    /// completions' likelihood from falling while the margin grows.
    pub rpo_alpha: Option<f64>,
    /// Drop the reference (`log π_ref = 0`).
    pub reference_free: bool,
    /// Compute each sequence's reference log-prob once and cache it.
    pub precompute_ref_log_probs: bool,
    /// `reverse_kl` (DPO), `forward_kl`, `js_divergence`, `alpha_divergence`.
    pub f_divergence_type: String,
    /// α of `alpha_divergence`.
    pub f_alpha_divergence_coef: f64,
    /// τ of `discopop`.
    pub discopop_tau: f64,
    /// γ, SimPO's target margin (`loss_type = "simpo"`).
    pub simpo_gamma: f64,
    /// KTO's weight of desirable (chosen) examples.
    pub desirable_weight: f64,
    /// KTO's weight of undesirable (rejected) examples.
    pub undesirable_weight: f64,
}

impl Default for DpoConfig {
    /// TRL's defaults (β = 0.1, `sigmoid`, reverse KL, `simpo_gamma = 0.5`,
    /// `discopop_tau = 0.05`) with a learning rate for a tiny model (1e-3)
    /// and 32 pairs per step.
    fn default() -> Self {
        DpoConfig {
            optimizer: OptimizerConfig::adamw(1e-3),
            batch_size: 32,
            beta: 0.1,
            loss_type: "sigmoid".into(),
            loss_weights: Vec::new(),
            label_smoothing: 0.0,
            rpo_alpha: None,
            reference_free: false,
            precompute_ref_log_probs: false,
            f_divergence_type: "reverse_kl".into(),
            f_alpha_divergence_coef: 1.0,
            discopop_tau: 0.05,
            simpo_gamma: 0.5,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

/// The loss types handled here besides the core's paired losses.
const OWN_LOSSES: &str = "simpo, orpo, kto, apo_zero_unpaired";
const PAIRED_LOSSES: &str =
    "sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, \
aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, sft";

/// A parsed `loss_type`.
#[derive(Debug, Clone)]
enum Objective {
    /// The core's paired losses through the fused op, plus `sft_weight` × NLL(chosen).
    Paired {
        cfg: PairedConfig,
        terms: Vec<LossTerm>,
        sft_weight: f64,
        reference: bool,
        average: bool,
    },
    /// ORPO.
    Orpo,
    /// KTO on the pairs' chosen (desirable) and rejected (undesirable) halves.
    Kto(KtoConfig),
}

impl Objective {
    fn uses_reference(&self) -> bool {
        match self {
            Objective::Paired { reference, .. } => *reference,
            Objective::Orpo => false,
            Objective::Kto(_) => true,
        }
    }

    /// Whether the implicit reward reads per-token means (SimPO, ORPO).
    fn averages(&self) -> bool {
        match self {
            Objective::Paired { average, .. } => *average,
            Objective::Orpo => true,
            Objective::Kto(_) => false,
        }
    }
}

impl DpoConfig {
    fn parsed(&self) -> Result<Objective, TrainError> {
        if self.batch_size == 0 {
            return Err(TrainError::config("DpoConfig.batch_size must be > 0"));
        }
        let names: Vec<&str> = self.loss_type.split(',').map(str::trim).collect();
        let weights = if self.loss_weights.is_empty() {
            vec![1.0; names.len()]
        } else if self.loss_weights.len() == names.len() {
            self.loss_weights.clone()
        } else {
            return Err(TrainError::config(format!(
                "DpoConfig: {} loss_weights for the {} loss types {:?}",
                self.loss_weights.len(),
                names.len(),
                self.loss_type
            )));
        };
        let divergence =
            FDivergence::from_trl(&self.f_divergence_type, self.f_alpha_divergence_coef)?;
        let smooth = self.label_smoothing > 0.0;
        let paired = |margin: f64| {
            PairedConfig::new(
                self.beta,
                self.label_smoothing,
                smooth,
                margin,
                divergence,
                self.discopop_tau,
            )
        };
        let rpo = match self.rpo_alpha {
            Some(a) if !(a.is_finite() && a >= 0.0) => {
                return Err(TrainError::config(format!(
                    "DpoConfig.rpo_alpha = {a} must be finite and ≥ 0"
                )))
            }
            Some(a) => a,
            None => 0.0,
        };
        let own = |n: &str| OWN_LOSSES.split(", ").any(|o| o == n);
        if let Some(n) = names.iter().find(|n| own(n)) {
            if rpo != 0.0 && *n != "simpo" {
                return Err(TrainError::config(format!(
                    "DpoConfig.rpo_alpha applies to the paired losses and simpo, not to {n}"
                )));
            }
            if names.len() > 1 {
                return Err(TrainError::config(format!(
                    "DpoConfig.loss_type {:?}: {n} cannot be combined with other losses",
                    self.loss_type
                )));
            }
            let needs_reference = matches!(*n, "kto" | "apo_zero_unpaired");
            if self.reference_free && needs_reference {
                return Err(TrainError::config(format!(
                    "DpoConfig: loss_type {n} needs the reference model (reference_free = true)"
                )));
            }
            return Ok(match *n {
                "simpo" => {
                    let cfg = paired(self.simpo_gamma)?;
                    Objective::Paired {
                        cfg,
                        terms: vec![LossTerm::weighted(PairedLoss::Sigmoid, weights[0])],
                        sft_weight: rpo,
                        reference: false,
                        average: true,
                    }
                }
                "orpo" => {
                    paired(0.0)?; // checks β
                    Objective::Orpo
                }
                kto => {
                    let kind: KtoLossType = kto.parse()?;
                    Objective::Kto(KtoConfig::new(
                        kind,
                        self.beta,
                        self.desirable_weight,
                        self.undesirable_weight,
                    )?)
                }
            });
        }
        let cfg = paired(0.0)?;
        let mut terms = Vec::new();
        let mut sft_weight = rpo;
        for (n, &w) in names.iter().zip(&weights) {
            if !w.is_finite() {
                return Err(TrainError::config(format!(
                    "DpoConfig.loss_weights: {w} is not finite"
                )));
            }
            match n.parse::<PairedLoss>() {
                Ok(PairedLoss::Sft) => sft_weight += w,
                Ok(kind) => terms.push(LossTerm::weighted(kind, w)),
                Err(_) => {
                    return Err(TrainError::config(format!(
                        "DpoConfig.loss_type: {n:?} is not supported; use the core's paired losses \
                         ({PAIRED_LOSSES}; comma-separated to combine) or one of {OWN_LOSSES}"
                    )))
                }
            }
        }
        if terms.is_empty() && sft_weight == 0.0 {
            return Err(TrainError::config("DpoConfig.loss_type: no loss term"));
        }
        if !terms.is_empty() {
            cfg.check_terms(&terms)?;
        }
        Ok(Objective::Paired {
            cfg,
            terms,
            sft_weight,
            reference: !self.reference_free,
            average: false,
        })
    }

    /// Checks the settings (what [`DpoTrainer::new`] checks).
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for an unknown or unsupported `loss_type`,
    /// mismatched `loss_weights`, `batch_size = 0`; [`TrainError::Core`]
    /// for parameters the core rejects (β ≤ 0, `label_smoothing` outside the
    /// loss's range, an unknown `f_divergence_type`, …).
    pub fn validate(&self) -> Result<(), TrainError> {
        self.parsed().map(|_| ())
    }
}

/// What one [`DpoTrainer::step`] measured (before its update), TRL's
/// logged names.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DpoStepStats {
    /// The loss.
    pub loss: f64,
    /// `rewards/chosen`: mean implicit reward `β(c − c₀)` of the chosen completions.
    pub reward_chosen: f64,
    /// `rewards/rejected`: mean `β(r − r₀)`.
    pub reward_rejected: f64,
    /// `rewards/accuracies`: share of pairs with `β(c − c₀) > β(r − r₀)`.
    pub reward_accuracy: f64,
    /// `rewards/margins`: mean `β(c − c₀) − β(r − r₀)`.
    pub reward_margin: f64,
    /// `logps/chosen`: mean sequence log-prob of the chosen completions.
    pub logps_chosen: f64,
    /// `logps/rejected`.
    pub logps_rejected: f64,
}

/// The implicit-reward metrics of a set of pairs ([`DpoTrainer::evaluate`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DpoEvaluation {
    /// Share of pairs whose chosen completion has the higher implicit reward.
    pub accuracy: f64,
    /// Mean implicit-reward margin.
    pub margin: f64,
    /// Mean implicit reward of the chosen completions.
    pub reward_chosen: f64,
    /// Mean implicit reward of the rejected completions.
    pub reward_rejected: f64,
}

/// `Σ_t log π(y_t | x, y_<t)` of each example's completion, `[rows]` (a
/// tracked tensor on an autodiff device), and the completion lengths.
///
/// One forward pass over the padded batch ([`batch_of`],
/// [`completion_log_probs`]); padding is selected away before the row sum.
/// TRL `concatenated_forward`'s masked sums, OpenRLHF `_get_batch_logps`.
///
/// # Errors
///
/// Those of [`batch_of`] (empty batch, unequal prompt lengths, an empty
/// completion); [`TrainError::Config`] when a prompt plus its completion is
/// longer than the model's `max_len`.
pub fn sequence_logps<P: Policy>(
    model: &P,
    examples: &[Example],
    device: &Device,
) -> Result<(Tensor<1>, Vec<usize>), TrainError> {
    let batch = batch_of(examples)?;
    let len = batch.prompt_len + batch.width();
    if len > model.max_len() {
        return Err(TrainError::config(format!(
            "sequence_logps: prompt + completion = {len} tokens exceeds the model's max_len {}",
            model.max_len()
        )));
    }
    let lp = completion_log_probs(model, &batch, 1.0, device)?;
    let mask = batch.mask(device);
    let kept = lp.clone().mask_where(mask.bool_not(), lp.zeros_like());
    let rows = batch.len();
    Ok((kept.sum_dim(1).reshape([rows]), batch.completion_lens))
}

/// The pairs as `2B` examples: the chosen completions, then the rejected ones.
fn pair_examples(pairs: &[PreferencePair]) -> Vec<Example> {
    let chosen = pairs.iter().map(|p| (p.prompt.clone(), p.chosen.clone()));
    let rejected = pairs.iter().map(|p| (p.prompt.clone(), p.rejected.clone()));
    chosen.chain(rejected).collect()
}

/// Checks a batch of pairs before any forward pass.
pub(crate) fn check_pairs(pairs: &[PreferencePair], what: &str) -> Result<(), TrainError> {
    let Some(first) = pairs.first() else {
        return Err(TrainError::config(format!("{what}: no preference pairs")));
    };
    let p = first.prompt.len();
    if let Some(i) = pairs.iter().position(|x| {
        x.prompt.len() != p || x.prompt.is_empty() || x.chosen.is_empty() || x.rejected.is_empty()
    }) {
        return Err(TrainError::config(format!(
            "{what}: pair {i} has an empty prompt or completion, or a prompt length other than {p} \
             (a batch needs equal prompt lengths)"
        )));
    }
    Ok(())
}

/// Reference log-probs computed (not read from the cache), for the cache.
type FreshReference = Vec<(Example, f64)>;

/// Policy log-probs of a batch of pairs.
struct PairLogps {
    chosen: Tensor<1>,
    rejected: Tensor<1>,
    chosen_len: Vec<usize>,
    rejected_len: Vec<usize>,
}

fn pair_logps<P: Policy>(
    model: &P,
    pairs: &[PreferencePair],
    device: &Device,
) -> Result<PairLogps, TrainError> {
    let b = pairs.len();
    let (all, lens) = sequence_logps(model, &pair_examples(pairs), device)?;
    Ok(PairLogps {
        chosen: all.clone().narrow(0, 0, b),
        rejected: all.narrow(0, b, b),
        chosen_len: lens[..b].to_vec(),
        rejected_len: lens[b..].to_vec(),
    })
}

fn lengths(lens: &[usize], device: &Device) -> Tensor<1> {
    let v: Vec<f32> = lens.iter().map(|&l| l as f32).collect();
    Tensor::from_data(TensorData::new(v, [lens.len()]), device)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// A DPO-family trainer (see the [module docs](self)).
pub struct DpoTrainer<M> {
    model: M,
    reference: Option<M>,
    reference_cache: HashMap<Example, f64>,
    optim: crate::Optim,
    config: DpoConfig,
    device: Device,
    steps: usize,
}

impl<M: std::fmt::Debug> std::fmt::Debug for DpoTrainer<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpoTrainer")
            .field("model", &self.model)
            .field("has_reference", &self.reference.is_some())
            .field("cached_reference_log_probs", &self.reference_cache.len())
            .field("optim", &self.optim)
            .field("config", &self.config)
            .field("steps", &self.steps)
            .finish()
    }
}

impl<M: Policy> DpoTrainer<M> {
    /// A trainer for `model` (on an autodiff device); unless the loss is
    /// reference-free, a frozen copy of it (`model.valid()`) becomes the
    /// reference policy.
    ///
    /// # Errors
    ///
    /// Those of [`DpoConfig::validate`] and [`OptimizerConfig::init`].
    pub fn new(model: M, config: DpoConfig, device: &Device) -> Result<Self, TrainError> {
        let objective = config.parsed()?;
        let reference = objective.uses_reference().then(|| model.valid());
        Ok(DpoTrainer {
            model,
            reference,
            reference_cache: HashMap::new(),
            optim: crate::Optim(config.optimizer.init()?),
            config,
            device: device.clone(),
            steps: 0,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The frozen reference (`None` for reference-free losses).
    pub fn reference(&self) -> Option<&M> {
        self.reference.as_ref()
    }

    /// The trained model.
    pub fn into_model(self) -> M {
        self.model
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The settings.
    pub fn config(&self) -> &DpoConfig {
        &self.config
    }

    /// Reference log-probs of `examples` (cached ones read from the cache),
    /// with the newly computed ones for the caller to cache.
    fn reference_logps(
        &self,
        examples: &[Example],
    ) -> Result<(Vec<f64>, FreshReference), TrainError> {
        let Some(reference) = &self.reference else {
            return Err(TrainError::config("DPO: this loss has no reference model"));
        };
        let mut out: Vec<Option<f64>> = examples
            .iter()
            .map(|e| self.reference_cache.get(e).copied())
            .collect();
        let missing: Vec<usize> = (0..examples.len()).filter(|&i| out[i].is_none()).collect();
        let mut fresh = Vec::with_capacity(missing.len());
        let inner = self.device.clone().inner();
        for chunk in missing.chunks(2 * self.config.batch_size) {
            let rows: Vec<Example> = chunk.iter().map(|&i| examples[i].clone()).collect();
            let (lp, _) = sequence_logps(reference, &rows, &inner)?;
            for ((&i, row), v) in chunk.iter().zip(rows).zip(posttrain_burn::to_vec(lp)) {
                out[i] = Some(v);
                fresh.push((row, v));
            }
        }
        Ok((
            out.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect(),
            fresh,
        ))
    }

    /// Computes and caches the reference log-probs of `pairs` (TRL's
    /// `precompute_ref_log_probs` pass over the dataset), `batch_size` pairs
    /// per forward pass; returns how many sequences the cache holds.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] unless `precompute_ref_log_probs` is set and
    /// the loss has a reference; those of [`sequence_logps`].
    pub fn precompute_reference(&mut self, pairs: &[PreferencePair]) -> Result<usize, TrainError> {
        if !self.config.precompute_ref_log_probs || self.reference.is_none() {
            return Err(TrainError::config(
                "precompute_reference needs precompute_ref_log_probs = true and a loss with a reference",
            ));
        }
        for chunk in pairs.chunks(self.config.batch_size) {
            check_pairs(chunk, "precompute_reference")?;
            let (_, fresh) = self.reference_logps(&pair_examples(chunk))?;
            self.reference_cache.extend(fresh);
        }
        Ok(self.reference_cache.len())
    }

    /// `(c₀, r₀)` of a batch, caching new values when `precompute_ref_log_probs`.
    fn batch_reference(
        &mut self,
        pairs: &[PreferencePair],
        cache: bool,
    ) -> Result<(Vec<f64>, Vec<f64>), TrainError> {
        let b = pairs.len();
        let (v, fresh) = self.reference_logps(&pair_examples(pairs))?;
        if cache && self.config.precompute_ref_log_probs {
            self.reference_cache.extend(fresh);
        }
        Ok((v[..b].to_vec(), v[b..].to_vec()))
    }

    /// The implicit rewards `β(x − x₀)` of the chosen and rejected sides (the
    /// core's `implicit_rewards`), `x` the sequence log-prob or, for SimPO
    /// and ORPO, its per-token mean.
    fn rewards(
        &self,
        objective: &Objective,
        c: &[f64],
        r: &[f64],
        lens: (&[usize], &[usize]),
        refs: Option<&(Vec<f64>, Vec<f64>)>,
    ) -> Result<(Vec<f64>, Vec<f64>), TrainError> {
        let avg = |x: &[f64], l: &[usize]| -> Vec<f64> {
            if objective.averages() {
                x.iter().zip(l).map(|(v, &n)| v / n.max(1) as f64).collect()
            } else {
                x.to_vec()
            }
        };
        let (c, r) = (avg(c, lens.0), avg(r, lens.1));
        let (mut rc, mut rr) = (vec![0.0; c.len()], vec![0.0; r.len()]);
        implicit_rewards(self.config.beta, &c, refs.map(|x| &x.0[..]), &mut rc)?;
        implicit_rewards(self.config.beta, &r, refs.map(|x| &x.1[..]), &mut rr)?;
        Ok((rc, rr))
    }

    /// One AdamW step on `pairs` (all of one prompt length); returns the
    /// batch's loss and TRL's metrics, measured before the update.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for an empty batch, unequal prompt lengths, an
    /// empty completion or sequences beyond the model's `max_len`; those of
    /// the core's losses.
    pub fn step(&mut self, pairs: &[PreferencePair]) -> Result<DpoStepStats, TrainError> {
        let objective = self.config.parsed()?;
        check_pairs(pairs, "DPO step")?;
        let refs = if objective.uses_reference() {
            Some(self.batch_reference(pairs, true)?)
        } else {
            None
        };
        let lp = pair_logps(&self.model, pairs, &self.device)?;
        let loss = self.loss(&objective, pairs, &lp, refs.as_ref())?;
        let c = posttrain_burn::to_vec(lp.chosen.clone().inner());
        let r = posttrain_burn::to_vec(lp.rejected.clone().inner());
        let (rc, rr) = self.rewards(
            &objective,
            &c,
            &r,
            (&lp.chosen_len, &lp.rejected_len),
            refs.as_ref(),
        )?;
        let n = pairs.len() as f64;
        let stats = DpoStepStats {
            loss: scalar(loss.clone()),
            reward_chosen: mean(&rc),
            reward_rejected: mean(&rr),
            reward_accuracy: rc.iter().zip(&rr).filter(|(a, b)| a > b).count() as f64 / n,
            reward_margin: rc.iter().zip(&rr).map(|(a, b)| a - b).sum::<f64>() / n,
            logps_chosen: mean(&c),
            logps_rejected: mean(&r),
        };
        let model = self.model.clone();
        self.model = apply_gradients(
            model,
            &mut self.optim,
            loss,
            self.config.optimizer.learning_rate,
        );
        self.steps += 1;
        Ok(stats)
    }

    /// The loss of a batch, `[1]` on the training device, differentiable.
    fn loss(
        &self,
        objective: &Objective,
        pairs: &[PreferencePair],
        lp: &PairLogps,
        refs: Option<&(Vec<f64>, Vec<f64>)>,
    ) -> Result<Tensor<1>, TrainError> {
        let dev = &self.device;
        let inner = self.device.clone().inner();
        let b = pairs.len();
        let (lc, lr) = (lengths(&lp.chosen_len, dev), lengths(&lp.rejected_len, dev));
        let chosen_tokens: usize = lp.chosen_len.iter().sum();
        // Token-mean NLL of the chosen completions (TRL `sft` term, ORPO's NLL).
        let nll = || lp.chosen.clone().sum().div_scalar(-(chosen_tokens as f64));
        let host = |v: &Vec<f64>| posttrain_burn::tensor1(v, dev);
        match objective {
            Objective::Paired {
                cfg,
                terms,
                sft_weight,
                average,
                ..
            } => {
                let (c, r) = if *average {
                    (
                        lp.chosen.clone() / lc.clone(),
                        lp.rejected.clone() / lr.clone(),
                    )
                } else {
                    (lp.chosen.clone(), lp.rejected.clone())
                };
                let mut loss = None;
                if !terms.is_empty() {
                    let mut batch = PairTensors::new(c, r).with_lengths(lc, lr);
                    if let Some((c0, r0)) = refs {
                        batch = batch.with_reference(host(c0), host(r0));
                    }
                    loss = Some(fused::paired_loss(cfg, terms, batch)?.loss);
                }
                if *sft_weight != 0.0 {
                    let sft = nll().mul_scalar(*sft_weight);
                    loss = Some(match loss {
                        Some(l) => l + sft,
                        None => sft,
                    });
                }
                loss.ok_or_else(|| TrainError::config("DPO: no loss term"))
            }
            Objective::Orpo => {
                let (c, r) = (lp.chosen.clone() / lc, lp.rejected.clone() / lr);
                let cot = OrpoCotangentTensors {
                    losses: Tensor::<1>::full([b], -1.0 / b as f64, &inner),
                    log_odds_ratio: 0.0,
                    log_odds_chosen: 0.0,
                };
                let out = pref::odds_ratio_loss(
                    self.config.beta,
                    c.clone().inner(),
                    r.clone().inner(),
                    Some(cot),
                )?;
                let value = out.losses.mean().neg();
                let (gc, gr) = out
                    .grad_chosen
                    .zip(out.grad_rejected)
                    .ok_or_else(|| TrainError::config("ORPO: the core returned no gradient"))?;
                Ok(nll() + with_closed_form_gradient(value, vec![(c, gc), (r, gr)]))
            }
            Objective::Kto(cfg) => {
                let (c0, r0) =
                    refs.ok_or_else(|| TrainError::config("KTO needs reference log-probs"))?;
                let z = Tensor::cat(
                    vec![lp.chosen.clone() - host(c0), lp.rejected.clone() - host(r0)],
                    0,
                );
                let desirable: Vec<bool> = (0..2 * b).map(|i| i < b).collect();
                let desirable =
                    Tensor::<1, Bool>::from_data(TensorData::new(desirable, [2 * b]), &inner);
                let kl = if cfg.loss_type.uses_kl() {
                    self.kto_kl(pairs)?
                } else {
                    Tensor::zeros([1], &inner)
                };
                let out = pref::kto_loss(cfg, z.clone().inner(), desirable, kl)?;
                Ok(with_closed_form_gradient(
                    out.loss,
                    vec![(z, out.grad_logratios)],
                ))
            }
        }
    }

    /// KTO's reference point `max(mean(log π(y'|x) − log π_ref(y'|x)), 0)`
    /// over mismatched pairs: example `i`'s prompt with example `i − 1`'s
    /// completion (TRL's shifted KL dataset), detached, `[1]` on the inner
    /// device.
    fn kto_kl(&self, pairs: &[PreferencePair]) -> Result<Tensor<1>, TrainError> {
        let ex = pair_examples(pairs);
        let n = ex.len();
        let shifted: Vec<Example> = (0..n)
            .map(|i| (ex[i].0.clone(), ex[(i + n - 1) % n].1.clone()))
            .collect();
        let inner = self.device.clone().inner();
        let policy = self.model.valid();
        let (p, _) = sequence_logps(&policy, &shifted, &inner)?;
        let (r, _) = self.reference_logps(&shifted)?;
        Ok(pref::kto_kl_baseline(
            p,
            posttrain_burn::tensor1(&r, &inner),
        )?)
    }

    /// The implicit-reward metrics of `pairs` under the current model (no
    /// update), `batch_size` pairs per forward pass; each batch's prompts
    /// must have equal lengths.
    ///
    /// # Errors
    ///
    /// As [`step`](Self::step).
    pub fn evaluate(&self, pairs: &[PreferencePair]) -> Result<DpoEvaluation, TrainError> {
        let objective = self.config.parsed()?;
        check_pairs(pairs, "DPO evaluate")?;
        let inner = self.device.clone().inner();
        let policy = self.model.valid();
        let (mut rc_all, mut rr_all) = (Vec::new(), Vec::new());
        for chunk in pairs.chunks(self.config.batch_size) {
            check_pairs(chunk, "DPO evaluate")?;
            let b = chunk.len();
            let refs = if objective.uses_reference() {
                let (v, _) = self.reference_logps(&pair_examples(chunk))?;
                Some((v[..b].to_vec(), v[b..].to_vec()))
            } else {
                None
            };
            let lp = pair_logps(&policy, chunk, &inner)?;
            let c = posttrain_burn::to_vec(lp.chosen);
            let r = posttrain_burn::to_vec(lp.rejected);
            let (rc, rr) = self.rewards(
                &objective,
                &c,
                &r,
                (&lp.chosen_len, &lp.rejected_len),
                refs.as_ref(),
            )?;
            rc_all.extend(rc);
            rr_all.extend(rr);
        }
        let n = rc_all.len() as f64;
        Ok(DpoEvaluation {
            accuracy: rc_all.iter().zip(&rr_all).filter(|(a, b)| a > b).count() as f64 / n,
            margin: rc_all.iter().zip(&rr_all).map(|(a, b)| a - b).sum::<f64>() / n,
            reward_chosen: mean(&rc_all),
            reward_rejected: mean(&rr_all),
        })
    }

    /// Share of `pairs` whose chosen completion has the higher implicit
    /// reward, `β(c − c₀) > β(r − r₀)` (strictly; TRL's
    /// `rewards/accuracies`). It is 0 before the first step, when the policy
    /// is the reference and every implicit reward is 0.
    ///
    /// # Errors
    ///
    /// As [`evaluate`](Self::evaluate).
    pub fn implicit_reward_accuracy(&self, pairs: &[PreferencePair]) -> Result<f64, TrainError> {
        Ok(self.evaluate(pairs)?.accuracy)
    }

    /// Saves the model (`NAME.bpk`), optimizer state (`NAME.optim`) and the
    /// reference (`NAME-reference.bpk`).
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] if writing fails.
    pub fn save(&self, ckpt: &crate::checkpoint::Checkpoint, name: &str) -> Result<(), TrainError> {
        ckpt.save_model(name, &self.model)?;
        if let Some(r) = &self.reference {
            ckpt.save_model(&format!("{name}-reference"), r)?;
        }
        ckpt.save_optim(name, &self.optim)
    }

    /// Restores what [`save`](Self::save) wrote; `false` when there is no
    /// checkpoint of that name. The reference is restored when saved (and the
    /// cache of its log-probs cleared).
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] for a checkpoint that does not fit.
    pub fn load(
        &mut self,
        ckpt: &crate::checkpoint::Checkpoint,
        name: &str,
    ) -> Result<bool, TrainError> {
        match ckpt.load_model(name, self.model.clone())? {
            Some(m) => {
                self.model = m;
                ckpt.load_optim(name, &mut self.optim)?;
                if let Some(r) = self.reference.take() {
                    let key = format!("{name}-reference");
                    self.reference = Some(ckpt.load_model(&key, r.clone())?.unwrap_or(r));
                    self.reference_cache.clear();
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
