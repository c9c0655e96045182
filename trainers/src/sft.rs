//! Supervised fine-tuning on completions: the cold start of every RL recipe.
//!
//! # Loss
//!
//! `L = −(1/N) Σ_{b,t} m_{b,t} log π(y_{b,t} | x_b, y_{b,<t})`: the mean
//! negative log-likelihood of the completion tokens (EOS included), prompt
//! tokens masked out — TRL's `SFTTrainer` with `completion_only_loss=True`
//! (token-mean over the batch). The log-probs come from posttrain-burn's
//! fused selective log-softmax; padding is *selected* away, so nothing in a
//! padded position reaches the loss or its gradient.

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::generate::{completion_log_probs, Rollout};
use crate::model::Policy;
use crate::{apply_gradients, scalar, OptimizerConfig, TrainError};

/// SFT settings (TRL `SFTConfig` names).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SftConfig {
    /// AdamW.
    pub optimizer: OptimizerConfig,
    /// Examples per step (TRL `per_device_train_batch_size`).
    pub batch_size: usize,
}

/// A prompt and its demonstration (EOS included).
pub type Example = (Vec<u32>, Vec<u32>);

/// Pads `(prompt, completion)` pairs (equal prompt lengths) into a [`Rollout`]-shaped batch.
///
/// # Errors
///
/// [`TrainError::Config`] for an empty batch, unequal prompt lengths or an empty completion.
pub fn batch_of(examples: &[Example]) -> Result<Rollout, TrainError> {
    let p = examples.first().map_or(0, |e| e.0.len());
    if examples.is_empty() || p == 0 || examples.iter().any(|e| e.0.len() != p || e.1.is_empty()) {
        return Err(TrainError::config(
            "SFT batch: need ≥ 1 example, equal non-empty prompts and non-empty completions",
        ));
    }
    let w = examples.iter().map(|e| e.1.len()).max().unwrap_or(0);
    let sequences = examples
        .iter()
        .map(|(q, c)| {
            let mut s = q.clone();
            s.extend_from_slice(c);
            s.resize(p + w, crate::tokenizer::CharTokenizer::PAD);
            s
        })
        .collect();
    Ok(Rollout {
        prompt_len: p,
        sequences,
        completion_lens: examples.iter().map(|e| e.1.len()).collect(),
        finished: vec![true; examples.len()],
        sampling_log_probs: examples.iter().map(|e| vec![0.0; e.1.len()]).collect(),
    })
}

/// Supervised fine-tuning of a [`Policy`] (see the [module docs](self)).
#[derive(Debug)]
pub struct SftTrainer<M> {
    model: M,
    optim: crate::Optim,
    config: SftConfig,
    device: Device,
    steps: usize,
}

impl<M: Policy> SftTrainer<M> {
    /// A trainer for `model`, which must live on an autodiff device.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for invalid settings.
    pub fn new(model: M, config: SftConfig, device: &Device) -> Result<Self, TrainError> {
        if config.batch_size == 0 {
            return Err(TrainError::config("SftConfig.batch_size must be > 0"));
        }
        Ok(SftTrainer {
            model,
            optim: crate::Optim(config.optimizer.init()?),
            config,
            device: device.clone(),
            steps: 0,
        })
    }

    /// The mean completion NLL of `examples` (no update).
    ///
    /// # Errors
    ///
    /// As [`batch_of`].
    pub fn loss(&self, examples: &[Example]) -> Result<f64, TrainError> {
        let batch = batch_of(examples)?;
        let model = self.model.valid();
        Ok(scalar(nll(&model, &batch, &self.device.clone().inner())?))
    }

    /// One AdamW step on `examples`; returns the loss before the step.
    ///
    /// # Errors
    ///
    /// As [`batch_of`]; those of the log-prob op.
    pub fn step(&mut self, examples: &[Example]) -> Result<f64, TrainError> {
        let batch = batch_of(examples)?;
        let loss = nll(&self.model, &batch, &self.device)?;
        let value = scalar(loss.clone());
        let model = self.model.clone();
        self.model = apply_gradients(
            model,
            &mut self.optim,
            loss,
            self.config.optimizer.learning_rate,
        );
        self.steps += 1;
        Ok(value)
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The model being trained.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The trained model.
    pub fn into_model(self) -> M {
        self.model
    }

    /// The settings.
    pub fn config(&self) -> &SftConfig {
        &self.config
    }
}

/// `−mean` completion log-likelihood, `[1]`.
pub(crate) fn nll<P: Policy>(
    model: &P,
    batch: &Rollout,
    device: &Device,
) -> Result<burn::tensor::Tensor<1>, TrainError> {
    let lp = completion_log_probs(model, batch, 1.0, device)?;
    let mask = batch.mask(device);
    let n: usize = batch.completion_lens.iter().sum();
    let kept = lp.clone().mask_where(mask.bool_not(), lp.zeros_like());
    Ok(kept.sum().div_scalar(-(n as f64)))
}

impl<M: Policy> SftTrainer<M> {
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
