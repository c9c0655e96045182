//! Reward models: a scalar head on a transformer, trained on preference
//! pairs to score the chosen completion above the rejected one — the
//! learned reward of RLHF's PPO stage.
//!
//! # Loss
//!
//! A [`RewardModel`] reads one reward per sequence at its last real token
//! (the EOS that ends the completion; TRL's
//! `AutoModelForSequenceClassification` with one label). With `r_c`, `r_r`
//! the rewards of the chosen and rejected sequences of pair `i`, the
//! Bradley–Terry loss with an optional margin `mᵢ` and reward centering `κ`
//! is
//!
//! `L = (1/B) Σᵢ −log σ(r_c,i − r_r,i − mᵢ) + κ · (1/B) Σᵢ (r_c,i + r_r,i)²`
//!
//! — TRL `RewardTrainer.compute_loss` (`margin` column,
//! `center_rewards_coefficient`), OpenRLHF `PairWiseLoss`/`LogExpLoss`. The
//! value and its closed-form gradient in the rewards come from the core
//! through [`posttrain_burn::preference::pairwise_reward_loss`]; the
//! gradient reaches the model through the surrogate of the
//! [crate docs](crate).
//!
//! The margin is the pairs' own [`PreferencePair::margin`] (TRL reads it
//! from the dataset): a batch uses margins when every pair has one, and none
//! when no pair has one.
//!
//! # Metrics
//!
//! TRL's `accuracy` (share of pairs with `r_c > r_r`), `margin` (mean
//! `r_c − r_r`), and the min/mean/max reward ([`RewardStepStats`]).

use burn::module::{Module, ModuleDisplay};
use burn::tensor::{Device, Int, Tensor, TensorData};
use posttrain_burn::preference::pairwise_reward_loss;
use serde::{Deserialize, Serialize};

use crate::dpo::PreferencePair;
use crate::model::{Backbone, RewardModel};
use crate::tokenizer::CharTokenizer;
use crate::{apply_gradients, scalar, with_closed_form_gradient, OptimizerConfig, TrainError};

/// Reward-model settings (TRL `RewardConfig` names).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RewardConfig {
    /// AdamW.
    pub optimizer: OptimizerConfig,
    /// Pairs per step (TRL `per_device_train_batch_size`), and per forward
    /// pass in evaluation.
    pub batch_size: usize,
    /// κ of the centering term `κ · mean((r_c + r_r)²)` (TRL
    /// `center_rewards_coefficient`; `None`: no centering, TRL's default).
    pub center_rewards_coefficient: Option<f64>,
}

impl Default for RewardConfig {
    /// AdamW at 1e-3 (a tiny model), 32 pairs, no centering.
    fn default() -> Self {
        RewardConfig {
            optimizer: OptimizerConfig::adamw(1e-3),
            batch_size: 32,
            center_rewards_coefficient: None,
        }
    }
}

/// What one [`RewardTrainer::step`] measured (before its update), TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RewardStepStats {
    /// The loss.
    pub loss: f64,
    /// Share of pairs with `r_c > r_r`.
    pub accuracy: f64,
    /// Mean `r_c − r_r` (margins not subtracted).
    pub margin: f64,
    /// Smallest reward over both sides.
    pub min_reward: f64,
    /// Mean reward over both sides.
    pub mean_reward: f64,
    /// Largest reward over both sides.
    pub max_reward: f64,
}

/// Prompt + completion rows (EOS appended when missing), right-padded, and
/// the index of each row's last real token.
fn rows(
    items: &[(&[u32], &[u32])],
    max_len: usize,
) -> Result<(Vec<Vec<u32>>, Vec<usize>), TrainError> {
    let mut seqs: Vec<Vec<u32>> = Vec::with_capacity(items.len());
    for (i, (p, c)) in items.iter().enumerate() {
        if p.is_empty() && c.is_empty() {
            return Err(TrainError::config(format!(
                "reward model: sequence {i} is empty"
            )));
        }
        let mut s = p.to_vec();
        s.extend_from_slice(c);
        if s.last() != Some(&CharTokenizer::EOS) {
            s.push(CharTokenizer::EOS);
        }
        if s.len() > max_len {
            return Err(TrainError::config(format!(
                "reward model: sequence {i} has {} tokens, beyond the model's max_len {max_len}",
                s.len()
            )));
        }
        seqs.push(s);
    }
    let last: Vec<usize> = seqs.iter().map(|s| s.len() - 1).collect();
    let w = seqs.iter().map(Vec::len).max().unwrap_or(0);
    for s in &mut seqs {
        s.resize(w, CharTokenizer::PAD);
    }
    Ok((seqs, last))
}

/// Rewards of `items`, `[rows]`, on `device` (tracked on an autodiff device).
fn rewards_of<M: Backbone>(
    model: &RewardModel<M>,
    items: &[(&[u32], &[u32])],
    device: &Device,
) -> Result<Tensor<1>, TrainError> {
    let (seqs, last) = rows(items, model.backbone.max_len())?;
    let w = seqs.first().map_or(0, Vec::len);
    let flat: Vec<i64> = seqs
        .iter()
        .flat_map(|s| s.iter().map(|&t| t as i64))
        .collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(flat, [seqs.len(), w]), device);
    model.rewards(ids, &last)
}

/// `(chosen, rejected)` rewards of a batch of pairs.
fn pair_rewards<M: Backbone>(
    model: &RewardModel<M>,
    pairs: &[PreferencePair],
    device: &Device,
) -> Result<(Tensor<1>, Tensor<1>), TrainError> {
    let b = pairs.len();
    let items: Vec<(&[u32], &[u32])> = pairs
        .iter()
        .map(|p| (&p.prompt[..], &p.chosen[..]))
        .chain(pairs.iter().map(|p| (&p.prompt[..], &p.rejected[..])))
        .collect();
    let all = rewards_of(model, &items, device)?;
    Ok((all.clone().narrow(0, 0, b), all.narrow(0, b, b)))
}

/// The batch's margins: all or none.
fn margins(pairs: &[PreferencePair], device: &Device) -> Result<Option<Tensor<1>>, TrainError> {
    let m: Vec<f64> = pairs.iter().filter_map(|p| p.margin).collect();
    if m.is_empty() {
        return Ok(None);
    }
    if m.len() != pairs.len() || m.iter().any(|x| !x.is_finite()) {
        return Err(TrainError::config(format!(
            "reward model: {} of {} pairs have a margin (all or none, finite)",
            m.len(),
            pairs.len()
        )));
    }
    Ok(Some(posttrain_burn::tensor1(&m, device)))
}

/// A reward-model trainer (see the [module docs](self)).
#[derive(Debug)]
pub struct RewardTrainer<M: Module> {
    model: RewardModel<M>,
    optim: crate::Optim,
    config: RewardConfig,
    device: Device,
    steps: usize,
}

impl<M: Backbone + ModuleDisplay> RewardTrainer<M> {
    /// A trainer for `model` (on an autodiff device).
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for `batch_size = 0`, a non-finite
    /// `center_rewards_coefficient` or invalid optimizer settings.
    pub fn new(
        model: RewardModel<M>,
        config: RewardConfig,
        device: &Device,
    ) -> Result<Self, TrainError> {
        if config.batch_size == 0 {
            return Err(TrainError::config("RewardConfig.batch_size must be > 0"));
        }
        if config
            .center_rewards_coefficient
            .is_some_and(|k| !k.is_finite())
        {
            return Err(TrainError::config(
                "RewardConfig.center_rewards_coefficient must be finite",
            ));
        }
        Ok(RewardTrainer {
            model,
            optim: crate::Optim(config.optimizer.init()?),
            config,
            device: device.clone(),
            steps: 0,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &RewardModel<M> {
        &self.model
    }

    /// The trained model.
    pub fn into_model(self) -> RewardModel<M> {
        self.model
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The settings.
    pub fn config(&self) -> &RewardConfig {
        &self.config
    }

    /// One AdamW step on `pairs` (prompt lengths may differ: each reward is
    /// read at its own last token); returns the loss and metrics before the
    /// update.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for no pairs, an empty prompt or completion,
    /// margins on some pairs only, sequences beyond the backbone's
    /// `max_len`; [`TrainError::Core`] from the loss.
    pub fn step(&mut self, pairs: &[PreferencePair]) -> Result<RewardStepStats, TrainError> {
        check_reward_pairs(pairs)?;
        let inner = self.device.clone().inner();
        let margin = margins(pairs, &inner)?;
        let (rc, rr) = pair_rewards(&self.model, pairs, &self.device)?;
        let out = pairwise_reward_loss(
            rc.clone().inner(),
            rr.clone().inner(),
            margin,
            self.config.center_rewards_coefficient,
        )?;
        let stats = RewardStepStats {
            loss: scalar(out.loss.clone()),
            accuracy: scalar(out.accuracy),
            margin: scalar(out.margin),
            min_reward: scalar(out.min_reward),
            mean_reward: scalar(out.mean_reward),
            max_reward: scalar(out.max_reward),
        };
        let loss = with_closed_form_gradient(
            out.loss,
            vec![(rc, out.grad_chosen), (rr, out.grad_rejected)],
        );
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

    /// The loss and metrics of `pairs` under the current model (no update),
    /// `batch_size` pairs per forward pass; the loss, accuracy and margin are
    /// means over all pairs.
    ///
    /// # Errors
    ///
    /// As [`step`](Self::step).
    pub fn evaluate(&self, pairs: &[PreferencePair]) -> Result<RewardStepStats, TrainError> {
        check_reward_pairs(pairs)?;
        let inner = self.device.clone().inner();
        let model = self.model.valid();
        let n = pairs.len() as f64;
        let mut s = RewardStepStats {
            loss: 0.0,
            accuracy: 0.0,
            margin: 0.0,
            min_reward: f64::INFINITY,
            mean_reward: 0.0,
            max_reward: f64::NEG_INFINITY,
        };
        for chunk in pairs.chunks(self.config.batch_size) {
            let (rc, rr) = pair_rewards(&model, chunk, &inner)?;
            let out = pairwise_reward_loss(
                rc,
                rr,
                margins(chunk, &inner)?,
                self.config.center_rewards_coefficient,
            )?;
            let w = chunk.len() as f64 / n;
            s.loss += w * scalar(out.loss);
            s.accuracy += w * scalar(out.accuracy);
            s.margin += w * scalar(out.margin);
            s.mean_reward += w * scalar(out.mean_reward);
            s.min_reward = s.min_reward.min(scalar(out.min_reward));
            s.max_reward = s.max_reward.max(scalar(out.max_reward));
        }
        Ok(s)
    }

    /// Share of `pairs` the model ranks right, `r_c > r_r` (strictly; TRL
    /// `accuracy`).
    ///
    /// # Errors
    ///
    /// As [`evaluate`](Self::evaluate).
    pub fn accuracy(&self, pairs: &[PreferencePair]) -> Result<f64, TrainError> {
        Ok(self.evaluate(pairs)?.accuracy)
    }

    /// The reward of one completion of `prompt` (EOS appended when missing,
    /// as the pairs were scored in training): the learned reward for PPO.
    ///
    /// # Errors
    ///
    /// As [`scores`](Self::scores).
    pub fn score(&self, prompt: &[u32], completion: &[u32]) -> Result<f64, TrainError> {
        Ok(self.scores(&[(prompt, completion)])?[0])
    }

    /// The rewards of several `(prompt, completion)`s in one forward pass
    /// (prompt lengths may differ).
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for no items, an empty sequence or one beyond
    /// the backbone's `max_len`.
    pub fn scores(&self, items: &[(&[u32], &[u32])]) -> Result<Vec<f64>, TrainError> {
        if items.is_empty() {
            return Err(TrainError::config("reward model: nothing to score"));
        }
        let inner = self.device.clone().inner();
        let model = self.model.valid();
        Ok(posttrain_burn::to_vec(rewards_of(&model, items, &inner)?))
    }

    /// Saves the model (`NAME.bpk`) and optimizer state (`NAME.optim`).
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] if writing fails.
    pub fn save(&self, ckpt: &crate::checkpoint::Checkpoint, name: &str) -> Result<(), TrainError> {
        ckpt.save_model(name, &self.model)?;
        ckpt.save_optim(name, &self.optim)
    }

    /// Restores what [`save`](Self::save) wrote (model and optimizer state);
    /// `false` when there is no checkpoint of that name.
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
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Pairs for the reward model: non-empty, non-empty completions (prompt
/// lengths may differ).
fn check_reward_pairs(pairs: &[PreferencePair]) -> Result<(), TrainError> {
    if pairs.is_empty() {
        return Err(TrainError::config("reward model: no preference pairs"));
    }
    if let Some(i) = pairs
        .iter()
        .position(|p| p.prompt.is_empty() || p.chosen.is_empty() || p.rejected.is_empty())
    {
        return Err(TrainError::config(format!(
            "reward model: pair {i} has an empty prompt or completion"
        )));
    }
    Ok(())
}
