//! GRPO and its family: sample a group of completions per prompt, score
//! them, turn the group's rewards into advantages, and take clipped policy
//! gradient steps.
//!
//! # One step
//!
//! 1. Each of the step's prompts is repeated `num_generations` (`G`) times
//!    and sampled ([`generate`]) from the current policy.
//! 2. Every completion gets a scalar reward from the caller's reward function.
//! 3. *Filters* (both optional): `drop_zero_variance_groups` removes the
//!    groups whose `G` rewards are all equal — their advantages are 0, they
//!    only dilute the batch (DAPO's dynamic sampling, without refill);
//!    `mask_truncated_completions` zeroes the loss mask of completions cut at
//!    `max_new_tokens` (TRL's option of that name).
//! 4. The old policy's log-probs `log π_old`: the values of the first
//!    update's forward pass (before any update the model *is* the sampler;
//!    TRL detaches them likewise), and, when `beta > 0`, the reference
//!    model's `log π_ref`.
//! 5. KL in the reward (`use_kl_loss = false`): each row's score becomes
//!    `r − β Σ_t kl_t` (verl `apply_kl_penalty` on outcome rewards).
//! 6. Advantages from the group scores by `adv_estimator` (verl names):
//!    `grpo` (z-score; `norm_adv_by_std_in_grpo = false` gives Dr. GRPO's
//!    mean-centering), `rloo`, `reinforce_plus_plus_baseline`, `opo`,
//!    `gpg`, `grpo_passk` — the core's estimators on tensors.
//! 7. `num_iterations` (TRL's μ) optimizer steps on the same batch with the
//!    token-level policy loss `loss_mode` (verl: `vanilla` PPO clip with
//!    `epsilon`/`epsilon_high` and dual clip, `gspo`, `cispo`, `sapo`,
//!    `gpg`, `clip_cov`, `kl_cov`, `geo_mean`, …) aggregated by
//!    `loss_agg_mode`, plus `β · KL` in the loss when `use_kl_loss`: posttrain-
//!    burn's fused `policy_loss_with_kl`, whose backward is the core's
//!    closed-form gradient. With `num_iterations > 1` the ratio moves away
//!    from 1 and the clip matters.

use std::str::FromStr;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use posttrain_burn::advantage::{self as adv, Groups};
use posttrain_burn::fused::{self, KlPenalty};
use posttrain_core::advantage::{
    AdvantageEstimator, GroupNormConfig, PassAtKConfig, SingletonGroup,
};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::kl::KlConfig;
use posttrain_core::policy::token::{PolicyLoss, PolicyLossMode, VerlPolicyParams};
use posttrain_core::Preset;
use serde::{Deserialize, Serialize};

use crate::generate::{completion_log_probs, generate, Rollout, SamplingConfig};
use crate::model::Policy;
use crate::{apply_gradients, scalar, OptimizerConfig, Rng, TrainError};

/// GRPO settings; names follow TRL's `GRPOConfig` and verl's actor config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrpoConfig {
    /// AdamW.
    pub optimizer: OptimizerConfig,
    /// Completions per prompt, `G` (TRL `num_generations`).
    pub num_generations: usize,
    /// Distinct prompts per step.
    pub prompts_per_step: usize,
    /// Sampling (TRL `temperature`, `top_k`, `top_p`, `max_completion_length`).
    pub sampling: SamplingConfig,
    /// verl `algorithm.adv_estimator`: `grpo`, `rloo`, `reinforce_plus_plus_baseline`, `opo`, `gpg`, `grpo_passk`.
    pub adv_estimator: String,
    /// verl `norm_adv_by_std_in_grpo` (false: Dr. GRPO).
    pub norm_adv_by_std_in_grpo: bool,
    /// verl `policy_loss.loss_mode`: `vanilla`, `gspo`, `cispo`, `sapo`, `gpg`, `clip_cov`, `kl_cov`, `geo_mean`, `dppo_tv`, `dppo_kl`, `dro`.
    pub loss_mode: String,
    /// Lower clip `ε` (TRL `epsilon`, verl `clip_ratio_low`).
    pub epsilon: f64,
    /// Upper clip `ε_high` (TRL `epsilon_high`, verl `clip_ratio_high`; DAPO's clip-higher).
    pub epsilon_high: f64,
    /// verl `loss_agg_mode`: `token-mean`, `seq-mean-token-sum`, `seq-mean-token-mean`, `seq-mean-token-sum-norm`, `token-sum`.
    pub loss_agg_mode: String,
    /// KL coefficient `β` (TRL `beta`, verl `kl_loss_coef`/`kl_coef`); 0 = no reference model.
    pub beta: f64,
    /// verl `kl_loss_type`: `k1`/`kl`, `k2`/`mse`, `k3`/`low_var_kl`, `abs`, with `+` for straight-through.
    pub kl_estimator: String,
    /// KL in the loss (verl `use_kl_loss`, TRL) or, when false, in the reward.
    pub use_kl_loss: bool,
    /// Drop groups whose rewards are all equal.
    pub drop_zero_variance_groups: bool,
    /// Mask the loss of completions cut at `max_new_tokens` (TRL `mask_truncated_completions`).
    pub mask_truncated_completions: bool,
    /// Optimizer steps per generated batch (TRL `num_iterations`, μ).
    pub num_iterations: usize,
}

impl GrpoConfig {
    /// TRL's `GRPOConfig` defaults where they apply — `G = 8`, `ε = ε_high =
    /// 0.2`, `β = 0` (no reference model), `num_iterations = 1`, token-mean
    /// aggregation (TRL's default `loss_type="dapo"`), temperature 1 — with a
    /// learning rate of 5e-4 for the small built-in models (TRL's 1e-6 is
    /// for billion-parameter LLMs), 8 prompts per step and zero-variance
    /// groups dropped.
    pub fn new(max_new_tokens: usize) -> Self {
        GrpoConfig {
            optimizer: OptimizerConfig::adamw(5e-4),
            num_generations: 8,
            prompts_per_step: 8,
            sampling: SamplingConfig::new(max_new_tokens),
            adv_estimator: "grpo".into(),
            norm_adv_by_std_in_grpo: true,
            loss_mode: "vanilla".into(),
            epsilon: 0.2,
            epsilon_high: 0.2,
            loss_agg_mode: "token-mean".into(),
            beta: 0.0,
            kl_estimator: "low_var_kl".into(),
            use_kl_loss: true,
            drop_zero_variance_groups: true,
            mask_truncated_completions: false,
            num_iterations: 1,
        }
    }

    fn parsed(&self) -> Result<Parsed, TrainError> {
        self.sampling.validate()?;
        if self.num_generations == 0 || self.prompts_per_step == 0 || self.num_iterations == 0 {
            return Err(TrainError::config(
                "GrpoConfig: num_generations, prompts_per_step and num_iterations must be > 0",
            ));
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return Err(TrainError::config(format!(
                "GrpoConfig.beta = {} must be finite and ≥ 0",
                self.beta
            )));
        }
        let estimator = AdvantageEstimator::from_str(&self.adv_estimator)?;
        let supported = matches!(
            estimator,
            AdvantageEstimator::Grpo
                | AdvantageEstimator::GrpoVectorized
                | AdvantageEstimator::Rloo
                | AdvantageEstimator::RlooVectorized
                | AdvantageEstimator::ReinforcePlusPlusBaseline
                | AdvantageEstimator::Opo
                | AdvantageEstimator::Gpg
                | AdvantageEstimator::GrpoPassK
        );
        if !supported {
            return Err(TrainError::config(format!(
                "GrpoConfig.adv_estimator = {:?} needs a critic or per-token rewards; GRPO takes \
                 grpo, rloo, reinforce_plus_plus_baseline, opo, gpg or grpo_passk (use the PPO trainer for gae)",
                self.adv_estimator
            )));
        }
        let mode = PolicyLossMode::from_str(&self.loss_mode)?;
        let params = VerlPolicyParams {
            clip_ratio: self.epsilon,
            clip_ratio_low: Some(self.epsilon),
            clip_ratio_high: Some(self.epsilon_high),
            ..VerlPolicyParams::default()
        };
        let loss = PolicyLoss::from_verl(mode, &params)?;
        let agg = AggMode::from_str(&self.loss_agg_mode)?;
        let kl = KlConfig::parse_verl(&self.kl_estimator)?;
        kl.validate()?;
        Ok(Parsed {
            estimator,
            loss,
            agg,
            kl,
        })
    }
}

struct Parsed {
    estimator: AdvantageEstimator,
    loss: PolicyLoss,
    agg: AggMode,
    kl: KlConfig,
}

/// What one [`GrpoTrainer::step`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GrpoStepStats {
    /// Mean reward of all sampled completions.
    pub reward_mean: f64,
    /// Mean reward's within-group standard deviation (how much there is to learn from).
    pub reward_std_in_group: f64,
    /// Groups kept after the zero-variance filter.
    pub groups_kept: usize,
    /// Groups sampled.
    pub groups: usize,
    /// The policy loss of the last iteration (before its update); NaN when nothing was kept.
    pub loss: f64,
    /// The loss of each of the `num_iterations` updates, before it.
    pub losses: Vec<f64>,
    /// verl `pg_clipfrac` of the last iteration.
    pub clipfrac: f64,
    /// Mean per-token KL to the reference (`β > 0`), else 0.
    pub kl: f64,
    /// Mean completion length in tokens.
    pub completion_len: f64,
    /// Share of completions cut at `max_new_tokens`.
    pub truncated: f64,
    /// Wall time of sampling (0 for [`GrpoTrainer::learn`]).
    pub generate_seconds: f64,
    /// Wall time of the updates (log-probs, losses, backward, optimizer).
    pub learn_seconds: f64,
}

/// A GRPO trainer (see the [module docs](self)).
#[derive(Debug)]
pub struct GrpoTrainer<M> {
    model: M,
    reference: Option<M>,
    optim: crate::Optim,
    config: GrpoConfig,
    device: Device,
    steps: usize,
}

impl<M: Policy> GrpoTrainer<M> {
    /// A trainer for `model` (on an autodiff device); when `beta > 0` a
    /// frozen copy of it becomes the reference policy.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] or [`TrainError::Core`] for invalid settings.
    pub fn new(model: M, config: GrpoConfig, device: &Device) -> Result<Self, TrainError> {
        config.parsed()?;
        let reference = (config.beta > 0.0).then(|| model.valid());
        Ok(GrpoTrainer {
            model,
            reference,
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

    /// The trained model.
    pub fn into_model(self) -> M {
        self.model
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The settings.
    pub fn config(&self) -> &GrpoConfig {
        &self.config
    }

    /// Sets the learning rate of the next updates (for a schedule, e.g.
    /// the linear decay to 0 that TRL's trainers use by default).
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for a negative or non-finite rate.
    pub fn set_learning_rate(&mut self, lr: f64) -> Result<(), TrainError> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(TrainError::config(format!(
                "learning rate {lr} must be finite and ≥ 0"
            )));
        }
        self.config.optimizer.learning_rate = lr;
        Ok(())
    }

    /// One GRPO step on `prompts` (equal lengths); `reward(i, completion)`
    /// scores a completion (EOS stripped) of `prompts[i]`.
    ///
    /// # Errors
    ///
    /// Those of [`generate`] and of the core's losses and estimators.
    pub fn step(
        &mut self,
        prompts: &[Vec<u32>],
        reward: &mut dyn FnMut(usize, &[u32]) -> f64,
        rng: &mut Rng,
    ) -> Result<GrpoStepStats, TrainError> {
        self.config.parsed()?;
        let g = self.config.num_generations;
        let inner = self.device.clone().inner();
        let expanded: Vec<Vec<u32>> = prompts
            .iter()
            .flat_map(|q| std::iter::repeat_n(q.clone(), g))
            .collect();
        let started = std::time::Instant::now();
        let sampler = self.model.valid();
        let rollout = generate(&sampler, &expanded, &self.config.sampling, rng, &inner)?;
        let generate_seconds = started.elapsed().as_secs_f64();
        let rewards: Vec<f64> = (0..rollout.len())
            .map(|i| reward(i / g, rollout.completion(i)))
            .collect();
        let mut stats = self.learn(&rollout, &rewards)?;
        stats.generate_seconds = generate_seconds;
        Ok(stats)
    }

    /// The learning half of [`step`](Self::step), for rollouts sampled
    /// elsewhere (by another engine, or replayed): `rollout` holds groups of
    /// `num_generations` consecutive rows sampled from the current model,
    /// `rewards` one score per row.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] when the rows are not whole groups, the
    /// rewards do not match the rows or a reward is not finite; those of the
    /// core's losses and estimators.
    pub fn learn(
        &mut self,
        rollout: &Rollout,
        rewards: &[f64],
    ) -> Result<GrpoStepStats, TrainError> {
        let p = self.config.parsed()?;
        let g = self.config.num_generations;
        let inner = self.device.clone().inner();
        if rollout.is_empty() || rollout.len() % g != 0 || rewards.len() != rollout.len() {
            return Err(TrainError::config(format!(
                "GRPO: {} rows and {} rewards; need equal counts, a non-zero multiple of num_generations = {g}",
                rollout.len(),
                rewards.len()
            )));
        }
        if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
            return Err(TrainError::config(format!(
                "reward of completion {i} is {}",
                rewards[i]
            )));
        }
        let n_groups = rollout.len() / g;
        let mut keep = vec![true; rollout.len()];
        let mut std_sum = 0.0;
        let mut kept_groups = 0;
        for gi in 0..n_groups {
            let r = &rewards[gi * g..(gi + 1) * g];
            let mean = r.iter().sum::<f64>() / g as f64;
            let var = r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / g as f64;
            std_sum += var.sqrt();
            let flat = r.iter().all(|&x| x == r[0]);
            let drop = self.config.drop_zero_variance_groups && flat;
            keep[gi * g..(gi + 1) * g]
                .iter_mut()
                .for_each(|k| *k = !drop);
            kept_groups += usize::from(!drop);
        }
        let mut stats = GrpoStepStats {
            reward_mean: rewards.iter().sum::<f64>() / rewards.len() as f64,
            reward_std_in_group: std_sum / n_groups as f64,
            groups_kept: kept_groups,
            groups: n_groups,
            loss: f64::NAN,
            losses: Vec::new(),
            clipfrac: 0.0,
            kl: 0.0,
            completion_len: rollout.completion_lens.iter().sum::<usize>() as f64
                / rollout.len() as f64,
            truncated: rollout.finished.iter().filter(|f| !**f).count() as f64
                / rollout.len() as f64,
            generate_seconds: 0.0,
            learn_seconds: 0.0,
        };
        let started = std::time::Instant::now();
        self.steps += 1;
        if kept_groups == 0 {
            return Ok(stats);
        }
        let batch = rollout.select(&keep);
        let scores_host: Vec<f64> = rewards
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(r, _)| *r)
            .collect();
        let rows = batch.len();
        let t = self.config.sampling.logit_temperature();
        let mut mask = batch.mask(&inner);
        if self.config.mask_truncated_completions {
            let fin: Vec<bool> = batch.finished.clone();
            let f =
                Tensor::<2, burn::tensor::Bool>::from_data(TensorData::new(fin, [rows, 1]), &inner)
                    .expand(mask.dims());
            mask = mask.bool_and(f);
        }
        // The first update's forward pass also gives `log π_old`: before any
        // update the model *is* the sampling policy (TRL detaches it likewise).
        let mut first = Some(completion_log_probs(&self.model, &batch, t, &self.device)?);
        let old = first
            .as_ref()
            .map(|lp| lp.clone().inner())
            .expect("just computed");
        let reference = match &self.reference {
            Some(r) => Some(completion_log_probs(r, &batch, t, &inner)?),
            None => None,
        };
        // KL to the reference per row (for the metric, and the reward when not in the loss).
        let mut scores = scores_host.clone();
        if let Some(r) = &reference {
            let kl_tok = kl_per_token(&p.kl, &old, r, &mask);
            let n: f64 = kl_tok.iter().map(|row| row.1 as f64).sum();
            stats.kl = kl_tok.iter().map(|row| row.0).sum::<f64>() / n.max(1.0);
            if !self.config.use_kl_loss {
                for (s, (sum, _)) in scores.iter_mut().zip(&kl_tok) {
                    *s -= self.config.beta * sum;
                }
            }
        }
        let advantages = self.advantages(&p, &scores, &batch, &mask, &inner)?;
        let kl_in_loss = self.config.use_kl_loss && self.config.beta > 0.0;
        for _ in 0..self.config.num_iterations {
            let log_prob = match first.take() {
                Some(lp) => lp,
                None => completion_log_probs(&self.model, &batch, t, &self.device)?,
            };
            let kl = match (&reference, kl_in_loss) {
                (Some(r), true) => Some(KlPenalty {
                    config: p.kl,
                    coef: self.config.beta,
                    ref_log_prob: r.clone(),
                }),
                _ => None,
            };
            let out = fused::policy_loss_with_kl(
                &p.loss,
                p.agg,
                &GlobalNorm::default(),
                log_prob,
                old.clone(),
                advantages.clone(),
                &mask,
                None,
                kl,
            )?;
            stats.loss = scalar(out.loss.clone());
            stats.losses.push(stats.loss);
            stats.clipfrac = scalar(out.policy.clipfrac.clone());
            let model = self.model.clone();
            self.model = apply_gradients(
                model,
                &mut self.optim,
                out.loss,
                self.config.optimizer.learning_rate,
            );
        }
        stats.learn_seconds = started.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// Token-level advantages `[rows, width]` from the row scores.
    fn advantages(
        &self,
        p: &Parsed,
        scores: &[f64],
        batch: &Rollout,
        mask: &Tensor<2, burn::tensor::Bool>,
        device: &Device,
    ) -> Result<Tensor<2>, TrainError> {
        let rows = batch.len();
        let groups = Groups::consecutive(rows, self.config.num_generations, device)?;
        let s = Tensor::<1>::from_data(TensorData::new(scores.to_vec(), [rows]), device);
        let per_row = match p.estimator {
            AdvantageEstimator::Grpo | AdvantageEstimator::GrpoVectorized => {
                let mut cfg = GroupNormConfig::preset(Preset::Verl);
                cfg.scale_by_std = self.config.norm_adv_by_std_in_grpo;
                adv::group_zscore_advantages(&cfg, s, &groups)?
            }
            AdvantageEstimator::Rloo => {
                adv::leave_one_out_advantages(s, &groups, SingletonGroup::RawScore)?
            }
            AdvantageEstimator::RlooVectorized => {
                adv::leave_one_out_advantages(s, &groups, SingletonGroup::Zero)?
            }
            AdvantageEstimator::ReinforcePlusPlusBaseline => {
                return Ok(adv::reinforce_plus_plus_baseline_advantages(
                    s, &groups, mask,
                )?);
            }
            AdvantageEstimator::Opo => {
                let lens: Vec<f64> = batch.completion_lens.iter().map(|&l| l as f64).collect();
                let l = Tensor::<1>::from_data(TensorData::new(lens, [rows]), device);
                adv::length_weighted_baseline_advantages(s, l, &groups)?
            }
            AdvantageEstimator::Gpg => adv::gpg_advantages(s, &groups, 1.0)?,
            AdvantageEstimator::GrpoPassK => {
                let cfg = PassAtKConfig {
                    scale_by_std: self.config.norm_adv_by_std_in_grpo,
                    std_eps: 1e-6,
                };
                adv::pass_at_k_advantages(&cfg, s, &groups)?
            }
            _ => unreachable!("rejected by GrpoConfig::parsed"),
        };
        Ok(adv::broadcast_to_tokens(per_row, mask)?)
    }
}

/// Per row: (Σ valid kl_t, valid count), kl from `estimator(log π_old, log π_ref)`.
fn kl_per_token(
    cfg: &KlConfig,
    log_prob: &Tensor<2>,
    ref_log_prob: &Tensor<2>,
    mask: &Tensor<2, burn::tensor::Bool>,
) -> Vec<(f64, usize)> {
    let [rows, w] = mask.dims();
    let lp = posttrain_burn::to_vec(log_prob.clone());
    let rp = posttrain_burn::to_vec(ref_log_prob.clone());
    let m = posttrain_burn::to_vec_bool(mask.clone());
    (0..rows)
        .map(|i| {
            let mut sum = 0.0;
            let mut n = 0;
            for j in 0..w {
                let k = i * w + j;
                if m[k] {
                    sum += cfg.estimate(lp[k], rp[k]).0;
                    n += 1;
                }
            }
            (sum, n)
        })
        .collect()
}

impl<M: Module> GrpoTrainer<M> {
    /// Replaces the model (e.g. after loading a checkpoint), keeping the optimizer.
    pub fn set_model(&mut self, model: M) {
        self.model = model;
    }
}

impl<M: Policy> GrpoTrainer<M> {
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
