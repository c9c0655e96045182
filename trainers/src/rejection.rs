//! Rejection-sampling fine-tuning: sample `n` completions per prompt from
//! the current model, keep the best one when it is good enough, and
//! fine-tune on what was kept (best-of-n → SFT, repeated in rounds).
//!
//! # One round
//!
//! 1. Each of the round's prompts is repeated `num_samples` (`n`) times and
//!    sampled ([`generate`]) from the current model.
//! 2. Every completion gets a scalar reward from the caller's reward function.
//! 3. **Best of n** ([`best_of_n`]): per prompt, the completion with the
//!    highest reward (ties: the first sampled) is kept when its reward is
//!    `≥ min_reward`; the prompt is dropped otherwise. Without a threshold
//!    (`min_reward = −∞`) every prompt keeps one completion.
//! 4. **SFT** on the kept pairs `(prompt, completion + EOS)` for
//!    `num_train_epochs` shuffled passes in minibatches of `sft.batch_size`,
//!    with [`SftTrainer`] (the token-mean completion NLL of
//!    [`crate::sft`]; one optimizer whose AdamW state carries over from round
//!    to round).
//!
//! # Peers
//!
//! The selection is OpenRLHF's `rejection_sampling_processor` (`batch_inference
//! --post_processor rs` after `--best_of_n` generation): per prompt the
//! completion with the highest reward, a later one replacing it only when
//! strictly better (ties keep the first). OpenRLHF keeps every prompt's best;
//! `min_reward` adds the correctness filter of RFT (Yuan et al. 2023, which
//! fine-tunes only on sampled reasoning paths with the right answer) and of
//! RAFT (Dong et al. 2023) — with `min_reward = −∞` it is OpenRLHF's rule.
//! The SFT half is OpenRLHF's `train_sft` / TRL's `SFTTrainer` on the kept
//! pairs, as in Llama 2's rejection-sampling fine-tuning. Rewards are compared
//! as given (no normalization); a completion cut at `max_new_tokens` is kept
//! like any other, with an EOS appended (a reward that wants finished answers
//! scores it low).

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::generate::{generate, SamplingConfig};
use crate::model::Policy;
use crate::sft::{Example, SftConfig, SftTrainer};
use crate::tokenizer::CharTokenizer;
use crate::{OptimizerConfig, Rng, TrainError};

/// Rejection-sampling settings (OpenRLHF's `best_of_n`, RFT's reward
/// filter as `min_reward`; the SFT half is TRL's `SFTConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RejectionSamplingConfig {
    /// Completions sampled per prompt, `n` of best-of-n (OpenRLHF `best_of_n`).
    pub num_samples: usize,
    /// How to sample (temperature, top-k, top-p, `max_new_tokens`).
    pub sampling: SamplingConfig,
    /// A prompt's best completion is kept only when its reward is `≥
    /// min_reward` (`f64::NEG_INFINITY`: always; NaN is rejected).
    pub min_reward: f64,
    /// The SFT on the kept pairs (optimizer and minibatch size).
    pub sft: SftConfig,
    /// Passes over each round's kept pairs (TRL `num_train_epochs`).
    pub num_train_epochs: usize,
    /// Rounds of sample → filter → SFT ([`RejectionSamplingTrainer::fit`]).
    pub rounds: usize,
    /// Prompts drawn per round ([`RejectionSamplingTrainer::fit`]).
    pub prompts_per_round: usize,
}

impl RejectionSamplingConfig {
    /// Best-of-8 at temperature 1 with no reward threshold, one SFT epoch
    /// per round at learning rate 3e-4 in minibatches of 16, 10 rounds of
    /// 64 prompts. The learning rate is lower than a cold start's: the kept
    /// samples are already likely under the model, so their gradients are
    /// small, and AdamW turns small gradients into full-size steps (on the
    /// arithmetic task 3e-3 degrades the model, 3e-4 improves it).
    pub fn new(max_new_tokens: usize) -> Self {
        RejectionSamplingConfig {
            num_samples: 8,
            sampling: SamplingConfig::new(max_new_tokens),
            min_reward: f64::NEG_INFINITY,
            sft: SftConfig {
                optimizer: OptimizerConfig::adamw(3e-4),
                batch_size: 16,
            },
            num_train_epochs: 1,
            rounds: 10,
            prompts_per_round: 64,
        }
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for `num_samples`, `num_train_epochs`,
    /// `rounds`, `prompts_per_round` or `sft.batch_size` equal to 0, a NaN
    /// `min_reward`, invalid sampling or optimizer settings.
    pub fn validate(&self) -> Result<(), TrainError> {
        self.sampling.validate()?;
        let zero = [
            ("num_samples", self.num_samples),
            ("num_train_epochs", self.num_train_epochs),
            ("rounds", self.rounds),
            ("prompts_per_round", self.prompts_per_round),
            ("sft.batch_size", self.sft.batch_size),
        ]
        .into_iter()
        .find(|(_, v)| *v == 0);
        if let Some((name, _)) = zero {
            return Err(TrainError::config(format!(
                "RejectionSamplingConfig.{name} must be > 0"
            )));
        }
        if self.min_reward.is_nan() {
            return Err(TrainError::config(
                "RejectionSamplingConfig.min_reward is NaN (use -inf to keep every prompt's best)",
            ));
        }
        self.sft.optimizer.init().map(|_| ())
    }
}

/// Best-of-n selection: `rewards` holds consecutive groups of `n` rows (one
/// group per prompt); per group, the row index (into `rewards`) of the
/// highest reward — the first one on ties — or `None` when that reward is
/// below `min_reward`.
///
/// # Formula
///
/// `kept_g = argmax_{i ∈ g} r_i` (smallest `i` among maxima) if
/// `max_{i ∈ g} r_i ≥ min_reward`, else none.
///
/// # Peers
///
/// OpenRLHF `rejection_sampling_processor` (strictly-greater replacement:
/// ties keep the first), with RFT / RAFT's threshold as `min_reward`.
///
/// # Errors
///
/// [`TrainError::Config`] for `n = 0`, a length that is not a multiple of
/// `n`, a NaN `min_reward` or a reward that is not finite.
pub fn best_of_n(
    rewards: &[f64],
    n: usize,
    min_reward: f64,
) -> Result<Vec<Option<usize>>, TrainError> {
    if n == 0 || rewards.len() % n != 0 || min_reward.is_nan() {
        return Err(TrainError::config(format!(
            "best_of_n: {} rewards in groups of n = {n} with min_reward = {min_reward}; need n > 0 \
             dividing the count and a threshold that is not NaN",
            rewards.len()
        )));
    }
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        return Err(TrainError::config(format!(
            "reward of completion {i} is {}",
            rewards[i]
        )));
    }
    Ok(rewards
        .chunks(n)
        .enumerate()
        .map(|(g, r)| {
            let best = (1..n).fold(0, |b, i| if r[i] > r[b] { i } else { b });
            (r[best] >= min_reward).then_some(g * n + best)
        })
        .collect())
}

/// What the sampling half of a round found ([`RejectionSamplingTrainer::sample`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RejectionRoundStats {
    /// Mean reward of all `n · prompts` sampled completions.
    pub reward_mean: f64,
    /// Mean over prompts of the best-of-n reward (kept or not).
    pub best_reward_mean: f64,
    /// Prompts whose best completion was kept.
    pub kept: usize,
    /// Prompts sampled.
    pub prompts: usize,
    /// `kept / prompts`.
    pub kept_fraction: f64,
    /// Mean length in tokens of all sampled completions.
    pub completion_len: f64,
    /// Mean SFT loss of the round's steps (each before its update); NaN when
    /// nothing was kept.
    pub sft_loss: f64,
    /// The loss of each SFT step of the round, before it.
    pub sft_losses: Vec<f64>,
}

/// Rejection-sampling fine-tuning of a [`Policy`] (see the [module docs](self)).
#[derive(Debug)]
pub struct RejectionSamplingTrainer<M> {
    sft: SftTrainer<M>,
    config: RejectionSamplingConfig,
    device: Device,
    rounds: usize,
}

impl<M: Policy> RejectionSamplingTrainer<M> {
    /// A trainer for `model`, which must live on an autodiff device.
    ///
    /// # Errors
    ///
    /// Those of [`RejectionSamplingConfig::validate`].
    pub fn new(
        model: M,
        config: RejectionSamplingConfig,
        device: &Device,
    ) -> Result<Self, TrainError> {
        config.validate()?;
        Ok(RejectionSamplingTrainer {
            sft: SftTrainer::new(model, config.sft, device)?,
            config,
            device: device.clone(),
            rounds: 0,
        })
    }

    /// Samples `num_samples` completions of each of `prompts` (equal
    /// lengths) from the current model, scores each with `reward(i,
    /// completion)` (`i` indexes `prompts`, the completion has no EOS) and
    /// returns the kept `(prompt, completion + EOS)` pairs, in prompt order,
    /// with the round's statistics (SFT fields still empty).
    ///
    /// # Errors
    ///
    /// Those of [`generate`] and [`best_of_n`].
    pub fn sample(
        &self,
        prompts: &[Vec<u32>],
        reward: &mut dyn FnMut(usize, &[u32]) -> f64,
        rng: &mut Rng,
    ) -> Result<(Vec<Example>, RejectionRoundStats), TrainError> {
        self.config.validate()?;
        let n = self.config.num_samples;
        let inner = self.device.clone().inner();
        let expanded: Vec<Vec<u32>> = prompts
            .iter()
            .flat_map(|q| std::iter::repeat_n(q.clone(), n))
            .collect();
        let sampler = self.sft.model().valid();
        let rollout = generate(&sampler, &expanded, &self.config.sampling, rng, &inner)?;
        let rewards: Vec<f64> = (0..rollout.len())
            .map(|i| reward(i / n, rollout.completion(i)))
            .collect();
        let picks = best_of_n(&rewards, n, self.config.min_reward)?;
        let kept: Vec<Example> = picks
            .iter()
            .flatten()
            .map(|&i| {
                let mut c = rollout.completion(i).to_vec();
                c.push(CharTokenizer::EOS);
                (rollout.prompt(i).to_vec(), c)
            })
            .collect();
        let best_sum: f64 = rewards
            .chunks(n)
            .map(|r| r.iter().copied().fold(f64::NEG_INFINITY, f64::max))
            .sum();
        let p = prompts.len().max(1) as f64;
        let stats = RejectionRoundStats {
            reward_mean: rewards.iter().sum::<f64>() / rewards.len().max(1) as f64,
            best_reward_mean: best_sum / p,
            kept: kept.len(),
            prompts: prompts.len(),
            kept_fraction: kept.len() as f64 / p,
            completion_len: rollout.completion_lens.iter().sum::<usize>() as f64
                / rollout.len().max(1) as f64,
            sft_loss: f64::NAN,
            sft_losses: Vec::new(),
        };
        Ok((kept, stats))
    }

    /// SFT on `kept` pairs: `num_train_epochs` passes, each shuffled by `rng`,
    /// in minibatches of `sft.batch_size` (the last one may be smaller);
    /// returns each step's loss, before its update (empty when `kept` is).
    ///
    /// # Errors
    ///
    /// Those of [`SftTrainer::step`] (e.g. prompts of different lengths in
    /// one minibatch).
    pub fn fine_tune(&mut self, kept: &[Example], rng: &mut Rng) -> Result<Vec<f64>, TrainError> {
        let mut losses = Vec::new();
        let mut order: Vec<usize> = (0..kept.len()).collect();
        for _ in 0..self.config.num_train_epochs {
            rng.shuffle(&mut order);
            for chunk in order.chunks(self.config.sft.batch_size) {
                let batch: Vec<Example> = chunk.iter().map(|&i| kept[i].clone()).collect();
                losses.push(self.sft.step(&batch)?);
            }
        }
        Ok(losses)
    }

    /// One round on `prompts`: [`sample`](Self::sample), then
    /// [`fine_tune`](Self::fine_tune) on what was kept.
    ///
    /// # Errors
    ///
    /// Those of [`sample`](Self::sample) and [`fine_tune`](Self::fine_tune).
    pub fn round(
        &mut self,
        prompts: &[Vec<u32>],
        reward: &mut dyn FnMut(usize, &[u32]) -> f64,
        rng: &mut Rng,
    ) -> Result<RejectionRoundStats, TrainError> {
        let (kept, mut stats) = self.sample(prompts, reward, rng)?;
        stats.sft_losses = self.fine_tune(&kept, rng)?;
        if !stats.sft_losses.is_empty() {
            stats.sft_loss = stats.sft_losses.iter().sum::<f64>() / stats.sft_losses.len() as f64;
        }
        self.rounds += 1;
        Ok(stats)
    }

    /// `rounds` rounds, each on `prompts_per_round` prompts drawn uniformly
    /// (with replacement) from `pool`; `reward(j, completion)` scores a
    /// completion of `pool[j]`. Returns every round's statistics.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for an empty pool; those of
    /// [`round`](Self::round).
    pub fn fit(
        &mut self,
        pool: &[Vec<u32>],
        reward: &mut dyn FnMut(usize, &[u32]) -> f64,
        rng: &mut Rng,
    ) -> Result<Vec<RejectionRoundStats>, TrainError> {
        if pool.is_empty() {
            return Err(TrainError::config(
                "RejectionSamplingTrainer::fit: empty prompt pool",
            ));
        }
        let mut all = Vec::with_capacity(self.config.rounds);
        for _ in 0..self.config.rounds {
            let picks: Vec<usize> = (0..self.config.prompts_per_round)
                .map(|_| rng.below(pool.len()))
                .collect();
            let prompts: Vec<Vec<u32>> = picks.iter().map(|&j| pool[j].clone()).collect();
            all.push(self.round(&prompts, &mut |i, c| reward(picks[i], c), rng)?);
        }
        Ok(all)
    }

    /// The model being trained.
    pub fn model(&self) -> &M {
        self.sft.model()
    }

    /// The trained model.
    pub fn into_model(self) -> M {
        self.sft.into_model()
    }

    /// Rounds completed.
    pub fn rounds(&self) -> usize {
        self.rounds
    }

    /// SFT steps taken, over all rounds.
    pub fn sft_steps(&self) -> usize {
        self.sft.steps()
    }

    /// The settings.
    pub fn config(&self) -> &RejectionSamplingConfig {
        &self.config
    }

    /// Saves the model (`NAME.bpk`) and the SFT optimizer state (`NAME.optim`).
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] if writing fails.
    pub fn save(&self, ckpt: &crate::checkpoint::Checkpoint, name: &str) -> Result<(), TrainError> {
        self.sft.save(ckpt, name)
    }

    /// Restores what [`save`](Self::save) wrote; `false` when there is no
    /// checkpoint of that name.
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] for a checkpoint that does not fit.
    pub fn load(
        &mut self,
        ckpt: &crate::checkpoint::Checkpoint,
        name: &str,
    ) -> Result<bool, TrainError> {
        self.sft.load(ckpt, name)
    }
}
