//! PPO for RLHF: an actor, a critic, a frozen reference and a reward
//! function — the classic InstructGPT recipe (TRL `PPOTrainer`, verl's
//! `ray_trainer` with `adv_estimator = gae`).
//!
//! # One step
//!
//! 1. **Rollout.** Every prompt is sampled once from the current actor
//!    ([`generate`]); the reward function scores each completion (a trained
//!    [`RewardModel`](crate::model::RewardModel)'s score, say). Completions
//!    cut at `max_new_tokens` lose `missing_eos_penalty` (TRL's option).
//! 2. **Log-probs and values**, all without gradient: the actor's `log π_old`,
//!    the reference's `log π_ref` (the actor as it was when the trainer was
//!    built), and the critic's `V_old(s_t)` at every completion position
//!    (the value of the prefix before token `t`, TRL's
//!    `value[:, context_length − 1 : −1]`).
//! 3. **KL in the reward.** With `kl_t = KL̂(log π_old,t, log π_ref,t)` (the
//!    core's estimator `kl_estimator`, verl names) the token rewards are
//!
//!    `r_t = −β·kl_t + 1[t = last]·score`
//!
//!    (verl `apply_kl_penalty` through
//!    [`kl_penalized_rewards`],
//!    the score at the last real token as TRL's `PPOTrainer` and OpenRLHF's
//!    `compute_reward` place it), padding selected to 0. `β` comes from the
//!    core's [`KlController`]: fixed (`adaptive_kl = false`) or verl's
//!    `AdaptiveKLController`, updated *after* the rewards with the batch's
//!    per-token mean KL and `n_steps` = the rows of the batch. Optionally the
//!    rewards are whitened (TRL `whiten_rewards`, mean kept).
//! 4. **GAE** ([`gae_advantages_returns`]):
//!    `δ_t = r_t + γV_{t+1} − V_t`, `A_t = δ_t + γλA_{t+1}`, returns
//!    `R_t = A_t + V_t`; the advantages are whitened over the valid tokens of
//!    the batch when `whiten_advantages` (TRL always, verl's `gae`).
//! 5. **Updates.** `num_ppo_epochs` passes over the batch, each shuffled
//!    into `num_mini_batches` mini-batches; per mini-batch one AdamW step of
//!    the actor on the PPO clipped surrogate
//!    `ℓ = max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))`, `ρ = π/π_old`, `ε = cliprange`
//!    (posttrain-burn's fused op: its backward is the core's closed-form
//!    gradient; no KL in the loss — it is in the reward) and one AdamW step of
//!    the critic on `vf_coef ·` the clipped value loss
//!    `0.5 · agg(max((V − R)², (clip(V, V_old ± cliprange_value) − R)²))`
//!    (posttrain-burn's [`value_loss`]; its
//!    closed-form `∂L/∂V` enters the critic's graph through the surrogate of the
//!    [crate docs](crate)). Both losses are aggregated by `loss_agg_mode`.
//!
//! Padding never enters a value or a gradient: every mask is a selection
//! (`mask_where`), nothing is multiplied by a 0/1 mask.
//!
//! TRL trains actor and critic with one optimizer on
//! `pg_loss + vf_coef · vf_loss`; their parameters are disjoint, so the two
//! separate AdamW steps here (verl's separate actor and critic workers) take
//! the same gradients, each with its own learning rate.

use std::str::FromStr;

use burn::module::{Module, ModuleDisplay};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use posttrain_burn::advantage::{gae_advantages_returns, kl_penalized_rewards};
use posttrain_burn::fused;
use posttrain_burn::kl::kl_estimate;
use posttrain_burn::stats::masked_whiten;
use posttrain_burn::value::value_loss;
use posttrain_core::advantage::GaeConfig;
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::kl::{KlConfig, KlController};
use posttrain_core::policy::token::PolicyLoss;
use posttrain_core::policy::ClipConfig;
use posttrain_core::stats::{Reduce, WhitenConfig};
use posttrain_core::value::ValueLossConfig;
use posttrain_core::Preset;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::generate::{
    completion_log_probs, generate, sequence_log_probs, Rollout, SamplingConfig,
};
use crate::model::{Backbone, Policy, ValueModel};
use crate::{apply_gradients, scalar, with_closed_form_gradient, OptimizerConfig, Rng, TrainError};

/// PPO settings; names follow TRL's `PPOConfig` and verl's `algorithm` /
/// `kl_ctrl` / critic config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PpoConfig {
    /// AdamW of the actor (policy).
    pub optimizer: OptimizerConfig,
    /// AdamW of the critic (value model).
    pub value_optimizer: OptimizerConfig,
    /// Prompts per step (TRL `batch_size`, verl `train_batch_size`): how many
    /// the caller should draw; one completion each.
    pub prompts_per_step: usize,
    /// Sampling (TRL `temperature`, `response_length`; verl rollout).
    pub sampling: SamplingConfig,
    /// Initial (or fixed) KL coefficient `β` (TRL `kl_coef`, verl `kl_ctrl.kl_coef`).
    pub kl_coef: f64,
    /// verl `kl_ctrl.type = "adaptive"` (true) or `"fixed"` (false; TRL's only mode).
    pub adaptive_kl: bool,
    /// Target per-token KL of the adaptive controller (verl `kl_ctrl.target_kl`).
    pub target_kl: f64,
    /// Horizon of the adaptive controller, in samples (verl `kl_ctrl.horizon`).
    pub kl_horizon: f64,
    /// KL estimator in the reward (verl `algorithm.kl_penalty`: `kl`/`k1`,
    /// `abs`, `mse`/`k2`, `low_var_kl`/`k3`; TRL `kl_estimator`: `k1`, `k3`).
    pub kl_estimator: String,
    /// Policy clip range `ε` (TRL `cliprange`, verl `clip_ratio`).
    pub cliprange: f64,
    /// Value clip range (TRL `cliprange_value`, verl `critic.cliprange_value`).
    pub cliprange_value: f64,
    /// Value-loss coefficient (TRL `vf_coef`).
    pub vf_coef: f64,
    /// Discount `γ` (TRL `gamma`, verl `algorithm.gamma`).
    pub gamma: f64,
    /// GAE `λ` (TRL `lam`, verl `algorithm.lam`).
    pub lam: f64,
    /// Whiten the advantages over the batch's valid tokens (TRL: always; verl `gae`: always).
    pub whiten_advantages: bool,
    /// Whiten the token rewards before GAE, mean kept (TRL `whiten_rewards`).
    pub whiten_rewards: bool,
    /// Passes over each batch (TRL `num_ppo_epochs`, verl `ppo_epochs`).
    pub num_ppo_epochs: usize,
    /// Mini-batches per pass (TRL `num_mini_batches`; verl `ppo_mini_batch_size` = rows / this).
    pub num_mini_batches: usize,
    /// verl `loss_agg_mode` of both losses: `token-mean` (TRL), `seq-mean-token-sum`,
    /// `seq-mean-token-mean`, `seq-mean-token-sum-norm`, `token-sum`.
    pub loss_agg_mode: String,
    /// Subtracted from the score of completions without EOS (TRL `missing_eos_penalty`).
    pub missing_eos_penalty: Option<f64>,
}

impl PpoConfig {
    /// TRL's `PPOConfig` defaults where they apply — `kl_coef = 0.05`, `k1`,
    /// `cliprange = cliprange_value = 0.2`, `vf_coef = 0.1`, `γ = 1`,
    /// `λ = 0.95`, 4 epochs of 1 mini-batch, whitened advantages, no reward
    /// whitening, token-mean — with a fixed β (`adaptive_kl = false`; verl's
    /// adaptive settings `target_kl = 0.1`, `kl_horizon = 10000` ready to be
    /// switched on), AdamW at 1e-4 for the actor and 1e-3 for the critic (the
    /// small built-in models; TRL's 3e-6 is for LLMs), 32 prompts per step
    /// and temperature 1.
    pub fn new(max_new_tokens: usize) -> Self {
        PpoConfig {
            optimizer: OptimizerConfig::adamw(1e-4),
            value_optimizer: OptimizerConfig::adamw(1e-3),
            prompts_per_step: 32,
            sampling: SamplingConfig::new(max_new_tokens),
            kl_coef: 0.05,
            adaptive_kl: false,
            target_kl: 0.1,
            kl_horizon: 10_000.0,
            kl_estimator: "k1".into(),
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            gamma: 1.0,
            lam: 0.95,
            whiten_advantages: true,
            whiten_rewards: false,
            num_ppo_epochs: 4,
            num_mini_batches: 1,
            loss_agg_mode: "token-mean".into(),
            missing_eos_penalty: None,
        }
    }

    /// The KL controller these settings start from: verl's
    /// `AdaptiveKLController(kl_coef, target_kl, kl_horizon)` or
    /// `FixedKLController(kl_coef)`.
    ///
    /// # Errors
    ///
    /// [`TrainError::Core`] for a non-finite `kl_coef`, or (adaptive) a
    /// `target_kl` or `kl_horizon` that is not finite and > 0.
    pub fn kl_controller(&self) -> Result<KlController, TrainError> {
        Ok(if self.adaptive_kl {
            KlController::adaptive(self.kl_coef, self.target_kl, self.kl_horizon)?
        } else {
            KlController::fixed(self.kl_coef)?
        })
    }

    /// Checks every setting.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for zero counts, a negative `kl_coef`,
    /// `cliprange`/`cliprange_value` not finite and > 0, a negative or
    /// non-finite `vf_coef` or `missing_eos_penalty`; [`TrainError::Core`] for
    /// `γ, λ ∉ [0, 1]`, an unknown estimator or aggregation, an invalid
    /// controller; those of [`SamplingConfig::validate`] and
    /// [`OptimizerConfig::init`].
    pub fn validate(&self) -> Result<(), TrainError> {
        self.parsed().map(|_| ())
    }

    fn parsed(&self) -> Result<Parsed, TrainError> {
        self.sampling.validate()?;
        self.optimizer.init()?;
        self.value_optimizer.init()?;
        if self.prompts_per_step == 0 || self.num_ppo_epochs == 0 || self.num_mini_batches == 0 {
            return Err(TrainError::config(
                "PpoConfig: prompts_per_step, num_ppo_epochs and num_mini_batches must be > 0",
            ));
        }
        if !(self.kl_coef >= 0.0 && self.kl_coef.is_finite()) {
            return Err(TrainError::config(format!(
                "PpoConfig.kl_coef = {} must be finite and ≥ 0",
                self.kl_coef
            )));
        }
        for (name, v) in [
            ("cliprange", self.cliprange),
            ("cliprange_value", self.cliprange_value),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(TrainError::config(format!(
                    "PpoConfig.{name} = {v} must be finite and > 0"
                )));
            }
        }
        if !(self.vf_coef >= 0.0 && self.vf_coef.is_finite()) {
            return Err(TrainError::config(format!(
                "PpoConfig.vf_coef = {} must be finite and ≥ 0",
                self.vf_coef
            )));
        }
        if let Some(p) = self.missing_eos_penalty {
            if !(p >= 0.0 && p.is_finite()) {
                return Err(TrainError::config(format!(
                    "PpoConfig.missing_eos_penalty = {p} must be finite and ≥ 0"
                )));
            }
        }
        let mut gae = GaeConfig::preset(Preset::Verl, self.gamma, self.lam)?;
        gae.whiten = self
            .whiten_advantages
            .then(|| WhitenConfig::preset(Preset::Verl));
        gae.zero_masked = true;
        let kl = KlConfig::parse_verl(&self.kl_estimator)?;
        kl.validate()?;
        let agg = AggMode::from_str(&self.loss_agg_mode)?;
        let value = ValueLossConfig::new(Some(self.cliprange_value), agg)?;
        self.kl_controller()?;
        Ok(Parsed {
            loss: PolicyLoss::Ppo(ClipConfig::preset(
                Preset::Trl,
                self.cliprange,
                self.cliprange,
            )),
            agg,
            value,
            kl,
            gae,
        })
    }
}

struct Parsed {
    loss: PolicyLoss,
    agg: AggMode,
    value: ValueLossConfig,
    kl: KlConfig,
    gae: GaeConfig,
}

/// What one [`PpoTrainer::step`] measured (TRL's / verl's metric names in
/// the field docs). Loss metrics are means over all `num_ppo_epochs ×
/// num_mini_batches` updates, each measured before its update.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PpoStepStats {
    /// Mean score of the completions, before `missing_eos_penalty` (TRL `objective/scores`).
    pub score_mean: f64,
    /// Standard deviation of the scores.
    pub score_std: f64,
    /// Mean per-token KL to the reference: the mean over rows of each row's
    /// masked-mean KL (verl `actor/reward_kl_penalty`; what the controller sees).
    pub kl_per_token: f64,
    /// Mean over rows of each row's summed KL (TRL `objective/kl`).
    pub kl_per_sequence: f64,
    /// The `β` of this step's rewards (verl `actor/reward_kl_penalty_coeff`).
    pub kl_coef: f64,
    /// Mean over rows of `Σ_t −β·kl_t` (TRL `objective/non_score_reward`).
    pub non_score_reward: f64,
    /// `score − β·Σ_t kl_t`, mean over rows (TRL `objective/rlhf_reward`).
    pub rlhf_reward: f64,
    /// Mean policy loss (TRL `loss/policy_avg`, verl `actor/pg_loss`).
    pub policy_loss: f64,
    /// Mean value loss, before `vf_coef` (TRL `loss/value_avg`, verl `critic/vf_loss`).
    pub value_loss: f64,
    /// `policy_loss + vf_coef · value_loss` of each epoch (mean over its
    /// mini-batches, before their updates): it falls as the epochs fit the batch.
    pub epoch_losses: Vec<f64>,
    /// Share of tokens whose ratio was clipped (TRL `policy/clipfrac_avg`, verl `actor/pg_clipfrac`).
    pub clipfrac: f64,
    /// Share of tokens whose value was clipped (TRL `val/clipfrac_avg`, verl `critic/vf_clipfrac`).
    pub value_clipfrac: f64,
    /// Mean `log π_old − log π` over the updates (verl `actor/ppo_kl`).
    pub approx_kl: f64,
    /// Mean return over valid tokens (verl `critic/returns/mean`).
    pub return_mean: f64,
    /// Mean old value over valid tokens (verl `critic/values/mean`).
    pub value_mean: f64,
    /// `1 − Var(R − V_old) / (Var(R) + 1e-5)` over valid tokens (verl `critic/vf_explained_var`).
    pub explained_variance: f64,
    /// Mean completion length in tokens.
    pub completion_len: f64,
    /// Share of completions cut at `max_new_tokens`.
    pub truncated: f64,
}

/// A PPO trainer: actor `P`, critic [`ValueModel<V>`], frozen reference
/// (see the [module docs](self)).
#[derive(Debug)]
pub struct PpoTrainer<P: Policy, V: Backbone> {
    actor: P,
    critic: ValueModel<V>,
    reference: P,
    actor_optim: crate::Optim,
    critic_optim: crate::Optim,
    kl_ctl: KlController,
    config: PpoConfig,
    device: Device,
    steps: usize,
}

/// A batch reward function for [`PpoTrainer::step`]: given `(prompt,
/// completion)` token ids (completions without EOS), one score per item —
/// e.g. `|items| reward_trainer.scores(items)`, a trained reward model's
/// score (TRL `get_reward` on the reward model, read at the last token).
pub type BatchReward<'a> = dyn FnMut(&[(&[u32], &[u32])]) -> Result<Vec<f64>, TrainError> + 'a;

/// A `[rows, w]` mask of the first `lens[i]` positions of each row.
fn mask_of(lens: &[usize], w: usize, device: &Device) -> Tensor<2, Bool> {
    let m: Vec<bool> = lens
        .iter()
        .flat_map(|&l| (0..w).map(move |j| j < l))
        .collect();
    Tensor::from_data(TensorData::new(m, [lens.len(), w]), device)
}

/// Mean and (population) variance of the entries of `x` where `m`.
fn masked_moments(x: &[f64], m: &[bool]) -> (f64, f64) {
    let v: Vec<f64> = x
        .iter()
        .zip(m)
        .filter(|(_, &k)| k)
        .map(|(x, _)| *x)
        .collect();
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    (mean, v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n)
}

impl<P: Policy, V: Backbone + ModuleDisplay> PpoTrainer<P, V> {
    /// A trainer for `actor` and `critic` (both on the autodiff `device`);
    /// a frozen copy of the actor (`actor.valid()`) becomes the reference.
    ///
    /// # Errors
    ///
    /// Those of [`PpoConfig::validate`].
    pub fn new(
        actor: P,
        critic: ValueModel<V>,
        config: PpoConfig,
        device: &Device,
    ) -> Result<Self, TrainError> {
        config.parsed()?;
        Ok(PpoTrainer {
            reference: actor.valid(),
            actor,
            critic,
            actor_optim: crate::Optim(config.optimizer.init()?),
            critic_optim: crate::Optim(config.value_optimizer.init()?),
            kl_ctl: config.kl_controller()?,
            config,
            device: device.clone(),
            steps: 0,
        })
    }

    /// The actor being trained.
    pub fn actor(&self) -> &P {
        &self.actor
    }

    /// The critic being trained.
    pub fn critic(&self) -> &ValueModel<V> {
        &self.critic
    }

    /// The frozen reference policy.
    pub fn reference(&self) -> &P {
        &self.reference
    }

    /// The trained actor.
    pub fn into_actor(self) -> P {
        self.actor
    }

    /// The KL controller (its `value()` is the current `β`).
    pub fn kl_controller(&self) -> &KlController {
        &self.kl_ctl
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The settings.
    pub fn config(&self) -> &PpoConfig {
        &self.config
    }

    /// One PPO step on `prompts` (equal lengths, usually `prompts_per_step`
    /// of them): sample one completion each, score the batch with
    /// `reward(&[(prompt, completion)])` (completions without EOS; one score
    /// per item, e.g. `|items| reward_trainer.scores(items)`), then
    /// [`learn`](Self::learn).
    ///
    /// # Errors
    ///
    /// Those of [`generate`], of the reward function, and of
    /// [`learn`](Self::learn).
    pub fn step(
        &mut self,
        prompts: &[Vec<u32>],
        reward: &mut BatchReward<'_>,
        rng: &mut Rng,
    ) -> Result<PpoStepStats, TrainError> {
        self.config.parsed()?;
        let inner = self.device.clone().inner();
        let sampler = self.actor.valid();
        let rollout = generate(&sampler, prompts, &self.config.sampling, rng, &inner)?;
        let items: Vec<(&[u32], &[u32])> = (0..rollout.len())
            .map(|i| (rollout.prompt(i), rollout.completion(i)))
            .collect();
        let scores = reward(&items)?;
        self.learn(&rollout, &scores, rng)
    }

    /// The learning half of [`step`](Self::step) for a rollout sampled from
    /// the current actor and its `scores` (one per row): steps 2–5 of the
    /// [module docs](self); `rng` shuffles the mini-batches.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for an empty rollout, a score count that is not
    /// the row count, a non-finite score, or fewer rows than
    /// `num_mini_batches`; [`TrainError::Core`] from the core's estimators
    /// and losses (e.g. whitening with fewer than two valid tokens).
    pub fn learn(
        &mut self,
        rollout: &Rollout,
        scores: &[f64],
        rng: &mut Rng,
    ) -> Result<PpoStepStats, TrainError> {
        let p = self.config.parsed()?;
        let cfg = self.config.clone();
        let inner = self.device.clone().inner();
        let (b, pl, w) = (rollout.len(), rollout.prompt_len, rollout.width());
        if b == 0 || w == 0 || scores.len() != b {
            return Err(TrainError::config(format!(
                "PPO: {b} rows of width {w} and {} scores; need a non-empty rollout and one score per row",
                scores.len()
            )));
        }
        if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
            return Err(TrainError::config(format!(
                "PPO: score of completion {i} is {}",
                scores[i]
            )));
        }
        if b < cfg.num_mini_batches {
            return Err(TrainError::config(format!(
                "PPO: {b} rows cannot be split into num_mini_batches = {}",
                cfg.num_mini_batches
            )));
        }
        if pl == 0 || pl + w > self.actor.max_len() {
            return Err(TrainError::config(format!(
                "PPO: prompt length {pl} + completion width {w} must be in 1..={}",
                self.actor.max_len()
            )));
        }
        let t = cfg.sampling.logit_temperature();
        let mask = rollout.mask(&inner);
        let mask_host = posttrain_burn::to_vec_bool(mask.clone());

        // 2. Old log-probs, reference log-probs and old values (no gradient).
        let sampler = self.actor.valid();
        let old = completion_log_probs(&sampler, rollout, t, &inner)?;
        let reference = completion_log_probs(&self.reference, rollout, t, &inner)?;
        let ids = rollout.ids(&inner);
        let old_values = critic_values(&self.critic.valid(), ids, pl, w);

        // 3. Scores at the last real token, −β·kl everywhere (verl apply_kl_penalty).
        let mut penalised = scores.to_vec();
        if let Some(pen) = cfg.missing_eos_penalty {
            for (s, fin) in penalised.iter_mut().zip(&rollout.finished) {
                if !fin {
                    *s -= pen;
                }
            }
        }
        let mut score_tokens = vec![0.0f32; b * w];
        for (i, (&s, &l)) in penalised.iter().zip(&rollout.completion_lens).enumerate() {
            score_tokens[i * w + l.max(1) - 1] = s as f32;
        }
        let score_tokens = Tensor::<2>::from_data(TensorData::new(score_tokens, [b, w]), &inner);
        let beta = self.kl_ctl.value();
        let shaped = kl_penalized_rewards(
            &p.kl,
            beta,
            score_tokens,
            old.clone(),
            reference.clone(),
            Some(&mask),
        )?;
        let kl_tok =
            posttrain_burn::to_vec(kl_estimate(&p.kl, old.clone(), reference, &mask)?.value);
        let kl_seq: Vec<f64> = (0..b)
            .map(|i| kl_tok[i * w..(i + 1) * w].iter().sum())
            .collect();
        let kl_per_token = scalar(shaped.mean_kl.clone());
        posttrain_burn::advantage::update_kl_controller(
            &mut self.kl_ctl,
            shaped.mean_kl,
            b as u64,
        )?;
        let mut rewards = shaped.rewards;
        if cfg.whiten_rewards {
            let wc = WhitenConfig {
                keep_mean: true,
                zero_masked: true,
                ..WhitenConfig::preset(Preset::Verl)
            };
            rewards = masked_whiten(&wc, Reduce::All, rewards, &mask, None)?.0;
        }

        // 4. GAE and returns.
        let ar = gae_advantages_returns(&p.gae, rewards, old_values.clone(), &mask)?;
        let (advantages, returns) = (ar.advantages, ar.returns);

        let n = b as f64;
        let score_mean = scores.iter().sum::<f64>() / n;
        let kl_per_sequence = kl_seq.iter().sum::<f64>() / n;
        let (return_mean, return_var) =
            masked_moments(&posttrain_burn::to_vec(returns.clone()), &mask_host);
        let v_host = posttrain_burn::to_vec(old_values.clone());
        let (value_mean, _) = masked_moments(&v_host, &mask_host);
        let resid: Vec<f64> = posttrain_burn::to_vec(returns.clone())
            .iter()
            .zip(&v_host)
            .map(|(r, v)| r - v)
            .collect();
        let (_, resid_var) = masked_moments(&resid, &mask_host);
        let mut stats = PpoStepStats {
            score_mean,
            score_std: (scores.iter().map(|s| (s - score_mean).powi(2)).sum::<f64>() / n).sqrt(),
            kl_per_token,
            kl_per_sequence,
            kl_coef: beta,
            non_score_reward: -beta * kl_per_sequence,
            rlhf_reward: score_mean - beta * kl_per_sequence,
            policy_loss: 0.0,
            value_loss: 0.0,
            epoch_losses: Vec::with_capacity(cfg.num_ppo_epochs),
            clipfrac: 0.0,
            value_clipfrac: 0.0,
            approx_kl: 0.0,
            return_mean,
            value_mean,
            explained_variance: 1.0 - resid_var / (return_var + 1e-5),
            completion_len: rollout.completion_lens.iter().sum::<usize>() as f64 / n,
            truncated: rollout.finished.iter().filter(|f| !**f).count() as f64 / n,
        };

        // 5. Epochs of shuffled mini-batches.
        let ids_ad = rollout.ids(&self.device);
        let mut updates = 0usize;
        for _ in 0..cfg.num_ppo_epochs {
            let mut order: Vec<usize> = (0..b).collect();
            rng.shuffle(&mut order);
            let mut epoch_loss = 0.0;
            for k in 0..cfg.num_mini_batches {
                let (lo, hi) = (
                    k * b / cfg.num_mini_batches,
                    (k + 1) * b / cfg.num_mini_batches,
                );
                let rows = &order[lo..hi];
                let m = rows.len();
                let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
                let idx_in = Tensor::<1, Int>::from_data(TensorData::new(idx.clone(), [m]), &inner);
                let idx_ad = Tensor::<1, Int>::from_data(TensorData::new(idx, [m]), &self.device);
                let lens: Vec<usize> = rows.iter().map(|&r| rollout.completion_lens[r]).collect();
                let mb_mask = mask_of(&lens, w, &inner);
                let mb_mask_ad = mask_of(&lens, w, &self.device);
                let mb_ids = ids_ad.clone().select(0, idx_ad);
                let sel = |x: &Tensor<2>| x.clone().select(0, idx_in.clone());

                // Actor: PPO clip, no KL in the loss.
                let log_prob = sequence_log_probs(&self.actor, mb_ids.clone(), pl, w, t)?;
                let out = fused::policy_loss_with_kl(
                    &p.loss,
                    p.agg,
                    &GlobalNorm::default(),
                    log_prob,
                    sel(&old),
                    sel(&advantages),
                    &mb_mask,
                    None,
                    None,
                )?;
                let pg = scalar(out.loss.clone());
                stats.policy_loss += pg;
                stats.clipfrac += scalar(out.policy.clipfrac.clone());
                stats.approx_kl += scalar(out.policy.approx_kl.clone());
                self.actor = apply_gradients(
                    self.actor.clone(),
                    &mut self.actor_optim,
                    out.loss,
                    cfg.optimizer.learning_rate,
                );

                // Critic: clipped value loss, closed-form ∂L/∂V into its graph.
                let values = critic_values(&self.critic, mb_ids, pl, w);
                let values = values
                    .clone()
                    .mask_where(mb_mask_ad.bool_not(), values.zeros_like());
                let vo = value_loss(
                    &p.value,
                    values.clone().inner(),
                    sel(&old_values),
                    sel(&returns),
                    &mb_mask,
                )?;
                let vl = scalar(vo.loss.clone());
                stats.value_loss += vl;
                stats.value_clipfrac += scalar(vo.clipfrac.clone());
                let loss = with_closed_form_gradient(
                    vo.loss.mul_scalar(cfg.vf_coef),
                    vec![(
                        values.reshape([m * w]),
                        vo.grad.mul_scalar(cfg.vf_coef).reshape([m * w]),
                    )],
                );
                self.critic = apply_gradients(
                    self.critic.clone(),
                    &mut self.critic_optim,
                    loss,
                    cfg.value_optimizer.learning_rate,
                );
                epoch_loss += pg + cfg.vf_coef * vl;
                updates += 1;
            }
            stats
                .epoch_losses
                .push(epoch_loss / cfg.num_mini_batches as f64);
        }
        let u = updates as f64;
        stats.policy_loss /= u;
        stats.value_loss /= u;
        stats.clipfrac /= u;
        stats.value_clipfrac /= u;
        stats.approx_kl /= u;
        self.steps += 1;
        Ok(stats)
    }

    /// Saves the actor and critic (`NAME_actor.bpk`, `NAME_critic.bpk`), their
    /// optimizer states (`.optim`), and the KL controller and step count
    /// (`NAME_ppo.json`).
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] if writing fails.
    pub fn save(&self, ckpt: &Checkpoint, name: &str) -> Result<(), TrainError> {
        ckpt.save_model(&format!("{name}_actor"), &self.actor)?;
        ckpt.save_optim(&format!("{name}_actor"), &self.actor_optim)?;
        ckpt.save_model(&format!("{name}_critic"), &self.critic)?;
        ckpt.save_optim(&format!("{name}_critic"), &self.critic_optim)?;
        let state = serde_json::json!({ "kl_controller": self.kl_ctl, "steps": self.steps });
        let bytes = serde_json::to_vec_pretty(&state).map_err(|e| TrainError::Io(e.to_string()))?;
        std::fs::write(ckpt.dir().join(format!("{name}_ppo.json")), bytes)?;
        Ok(())
    }

    /// Restores what [`save`](Self::save) wrote; `false` when there is no
    /// checkpoint of that name (the reference stays the one of construction).
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] for a checkpoint that does not fit or a malformed
    /// controller file.
    pub fn load(&mut self, ckpt: &Checkpoint, name: &str) -> Result<bool, TrainError> {
        let Some(actor) = ckpt.load_model(&format!("{name}_actor"), self.actor.clone())? else {
            return Ok(false);
        };
        let critic = ckpt
            .load_model(&format!("{name}_critic"), self.critic.clone())?
            .ok_or_else(|| TrainError::Io(format!("checkpoint {name}: actor without critic")))?;
        self.actor = actor;
        self.critic = critic;
        ckpt.load_optim(&format!("{name}_actor"), &mut self.actor_optim)?;
        ckpt.load_optim(&format!("{name}_critic"), &mut self.critic_optim)?;
        let path = ckpt.dir().join(format!("{name}_ppo.json"));
        if path.exists() {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)
                .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
            self.kl_ctl = serde_json::from_value(v["kl_controller"].clone())
                .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
            self.steps = v["steps"].as_u64().unwrap_or(0) as usize;
        }
        Ok(true)
    }
}

/// `V(s_t)` of the critic at the `w` completion positions of `ids`
/// (`[rows, pl + w]`): the values at positions `pl − 1 .. pl + w − 1`, each
/// the value of the prefix before completion token `t`, `[rows, w]`.
fn critic_values<V: Backbone>(
    critic: &ValueModel<V>,
    ids: Tensor<2, Int>,
    pl: usize,
    w: usize,
) -> Tensor<2> {
    let [b, len] = ids.dims();
    let inputs = ids.slice([0..b, 0..len - 1]);
    critic.values(inputs).slice([0..b, pl - 1..pl - 1 + w])
}
