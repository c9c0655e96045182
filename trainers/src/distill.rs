//! Knowledge distillation of a student [`Policy`] from a frozen teacher:
//! the generalized Jensen–Shannon divergence between their next-token
//! distributions on completion tokens (TRL's GKD), or OpenRLHF's KD cross
//! entropy, on fixed data, teacher samples or the student's own samples.
//!
//! # The loss
//!
//! On every completion position `t` of a batch (prompt positions are sliced
//! away, padding is *selected* away by the row mask), with
//! `s = log softmax(z_student/T)`, `q = log softmax(z_teacher/T)` over the
//! vocabulary and `β = beta`:
//!
//! | `beta` | divergence per token |
//! |---|---|
//! | `0` | forward KL, `KL(teacher ‖ student) = Σₖ e^{qₖ}(qₖ − sₖ)` |
//! | `1` | reverse KL, `KL(student ‖ teacher) = Σₖ e^{sₖ}(sₖ − qₖ)` |
//! | `(0, 1)` | `β KL(teacher ‖ m) + (1−β) KL(student ‖ m)`, `m = (1−β) p_student + β p_teacher` |
//!
//! — the convention of [`posttrain_core::distill::Jsd`] and of TRL's
//! `GKDTrainer.generalized_jsd_loss` (`beta = 0` is forward KL, `1` reverse
//! KL). The loss is the sum over valid tokens divided by their number
//! (TRL's `reduction="batchmean"` with the `labels != −100` mask): the mean
//! per-token divergence. `loss_type = "kd"` instead uses OpenRLHF's `KDLoss`,
//! `−mean_t Σₖ p_teacher,k log p_student,k` (the forward KL plus the
//! teacher's entropy, which has no gradient), at temperature `T` by scaling
//! both logits by `1/T`.
//!
//! posttrain-burn ([`posttrain_burn::distill`]) evaluates the loss on the
//! inner (non-autodiff) device and returns the core's **closed-form
//! gradient** with respect to the student logits; the trainer passes it into
//! the student's autodiff graph through the surrogate of the
//! [crate docs](crate), `L = value + S − sg(S)`, `S = Σ z · sg(∂L/∂z)`,
//! where the student logits of padded positions are selected away
//! (`mask_where`) before anything multiplies them.
//!
//! # The data (TRL `GKDTrainer.training_step`)
//!
//! Each [`DistillTrainer::step`] gets a batch of `(prompt, completion)`
//! pairs (the fixed data). With `seq_kd` the completions are replaced by the
//! teacher's samples (sequence-level KD); then, with probability `lmbda` (one
//! draw per step, as TRL's `random.random() <= lmbda`), by the *student's*
//! own samples (on-policy distillation, which overrides `seq_kd`). Sampling
//! uses `sampling` (TRL `GKDConfig.temperature` and `max_new_tokens` live
//! there). The teacher is a frozen inference copy, `teacher.valid()`.

use std::str::FromStr;

use burn::tensor::{Bool, Device, Tensor};
use posttrain_burn::distill as kd;
use posttrain_core::distill::{DistillConfig as CoreDistillConfig, Reduction};
use serde::{Deserialize, Serialize};

use crate::generate::{generate, Rollout, SamplingConfig};
use crate::model::Policy;
use crate::sft::{batch_of, Example};
use crate::{apply_gradients, scalar, with_closed_form_gradient, OptimizerConfig, Rng, TrainError};

/// Which distillation loss ([`DistillConfig::loss_type`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DistillLoss {
    /// `"generalized_jsd"` (also `"gkd"`, `"jsd"`): TRL GKD's generalized JSD at `beta`.
    GeneralizedJsd,
    /// `"kd"`: OpenRLHF's `KDLoss`, the teacher-weighted student NLL.
    Kd,
}

impl FromStr for DistillLoss {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self, TrainError> {
        match s {
            "generalized_jsd" | "gkd" | "jsd" => Ok(DistillLoss::GeneralizedJsd),
            "kd" => Ok(DistillLoss::Kd),
            _ => Err(TrainError::config(format!(
                "DistillConfig.loss_type = {s:?}: expected generalized_jsd (gkd, jsd) or kd"
            ))),
        }
    }
}

/// Distillation settings: TRL `GKDConfig` names (`beta`, `lmbda`,
/// `seq_kd`; its sampling `temperature` is `sampling.temperature`), the
/// divergence's softmax `temperature` of TRL's `generalized_jsd_loss`, and
/// `loss_type` to switch to OpenRLHF's KD loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// AdamW for the student.
    pub optimizer: OptimizerConfig,
    /// Sequences per step (TRL `per_device_train_batch_size`).
    pub batch_size: usize,
    /// Generalized-JSD interpolation `β ∈ [0, 1]`: 0 = forward
    /// KL(teacher‖student), 1 = reverse KL(student‖teacher), in between the
    /// β-skewed JSD (TRL GKD `beta`; see the [module docs](self)).
    pub beta: f64,
    /// Softmax temperature `T > 0` of both logits inside the divergence
    /// (TRL `generalized_jsd_loss(temperature=…)`; GKD's `compute_loss`
    /// leaves it at 1).
    pub temperature: f64,
    /// Probability `λ ∈ [0, 1]` that a step trains on the student's own
    /// samples instead of the given completions (TRL GKD `lmbda`; 0 =
    /// off-policy/supervised KD, 1 = fully on-policy).
    pub lmbda: f64,
    /// Replace the given completions by the teacher's samples before the
    /// `lmbda` draw (TRL GKD `seq_kd`: sequence-level KD).
    pub seq_kd: bool,
    /// Sampling for on-policy and `seq_kd` completions (TRL GKD
    /// `temperature`, `max_new_tokens`).
    pub sampling: SamplingConfig,
    /// `generalized_jsd` (TRL GKD) or `kd` (OpenRLHF `KDLoss`).
    pub loss_type: String,
}

impl DistillConfig {
    /// TRL `GKDConfig` defaults where they apply — `beta = 0.5`, `lmbda =
    /// 0.5`, sampling temperature 0.9, `seq_kd = false`, divergence
    /// temperature 1 — with a learning rate of 1e-3 for the small built-in
    /// models and 32 sequences per step.
    pub fn new(max_new_tokens: usize) -> Self {
        DistillConfig {
            optimizer: OptimizerConfig::adamw(1e-3),
            batch_size: 32,
            beta: 0.5,
            temperature: 1.0,
            lmbda: 0.5,
            seq_kd: false,
            sampling: SamplingConfig {
                temperature: 0.9,
                ..SamplingConfig::new(max_new_tokens)
            },
            loss_type: "generalized_jsd".into(),
        }
    }

    /// Checks the settings and returns the parsed loss.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for `batch_size = 0`, `lmbda ∉ [0, 1]`, an
    /// unknown `loss_type` or invalid sampling/optimizer settings;
    /// [`TrainError::Core`] (the core's `OutOfRange`) for `beta ∉ [0, 1]` or
    /// a temperature that is not finite and `> 0`.
    pub fn validate(&self) -> Result<DistillLoss, TrainError> {
        if self.batch_size == 0 {
            return Err(TrainError::config("DistillConfig.batch_size must be > 0"));
        }
        if !(0.0..=1.0).contains(&self.lmbda) {
            return Err(TrainError::config(format!(
                "DistillConfig.lmbda = {} must be in [0, 1]",
                self.lmbda
            )));
        }
        self.core()?;
        self.sampling.validate()?;
        self.optimizer.init()?;
        DistillLoss::from_str(&self.loss_type)
    }

    /// The core's configuration of the divergence: `beta`, `temperature`,
    /// `batchmean` over the valid tokens.
    ///
    /// # Errors
    ///
    /// [`TrainError::Core`] for `beta ∉ [0, 1]` or an invalid temperature.
    pub fn core(&self) -> Result<CoreDistillConfig, TrainError> {
        Ok(CoreDistillConfig::new(
            self.beta,
            self.temperature,
            Reduction::BatchMean,
            None,
        )?)
    }
}

/// What one [`DistillTrainer::step`] (or [`learn`](DistillTrainer::learn)) did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DistillStepStats {
    /// The loss before the update.
    pub loss: f64,
    /// Mean per-token divergence before the update: the generalized JSD at
    /// `beta` (equal to `loss` for `generalized_jsd`), or for `kd` the
    /// forward KL(teacher‖student) (the loss minus the teacher's entropy).
    pub divergence: f64,
    /// Whether the step trained on the student's own samples (the `lmbda` draw).
    pub on_policy: bool,
    /// Completion tokens in the loss (EOS included, padding excluded).
    pub tokens: usize,
    /// Mean completion length in tokens.
    pub completion_len: f64,
}

/// Distills a frozen teacher into a student (see the [module docs](self)).
#[derive(Debug)]
pub struct DistillTrainer<S: Policy, T: Policy> {
    student: S,
    teacher: T,
    optim: crate::Optim,
    config: DistillConfig,
    loss: DistillLoss,
    device: Device,
    steps: usize,
}

impl<S: Policy, T: Policy> DistillTrainer<S, T> {
    /// A trainer for `student` (on the autodiff `device`); the teacher is
    /// frozen as `teacher.valid()` and run on `device.inner()`.
    ///
    /// # Errors
    ///
    /// Those of [`DistillConfig::validate`]; [`TrainError::Config`] when
    /// teacher and student vocabularies differ.
    pub fn new(
        student: S,
        teacher: T,
        config: DistillConfig,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let loss = config.validate()?;
        if student.vocab_size() != teacher.vocab_size() {
            return Err(TrainError::config(format!(
                "distillation: student vocabulary {} ≠ teacher vocabulary {}",
                student.vocab_size(),
                teacher.vocab_size()
            )));
        }
        Ok(DistillTrainer {
            student,
            teacher: teacher.valid(),
            optim: crate::Optim(config.optimizer.init()?),
            config,
            loss,
            device: device.clone(),
            steps: 0,
        })
    }

    /// One step on `examples` (`(prompt, completion + EOS)` pairs, equal
    /// prompt lengths): the completions are replaced by the teacher's samples
    /// when `seq_kd`, then with probability `lmbda` by the student's, and one
    /// AdamW step is taken on the divergence.
    ///
    /// # Errors
    ///
    /// Those of [`batch_of`], [`generate`] and [`learn`](Self::learn).
    pub fn step(
        &mut self,
        examples: &[Example],
        rng: &mut Rng,
    ) -> Result<DistillStepStats, TrainError> {
        self.config.validate()?;
        let inner = self.device.clone().inner();
        let mut batch = batch_of(examples)?;
        let prompts: Vec<Vec<u32>> = examples.iter().map(|e| e.0.clone()).collect();
        if self.config.seq_kd {
            batch = generate(&self.teacher, &prompts, &self.config.sampling, rng, &inner)?;
        }
        let on_policy = self.config.lmbda > 0.0 && rng.next_f64() < self.config.lmbda;
        if on_policy {
            let sampler = self.student.valid();
            batch = generate(&sampler, &prompts, &self.config.sampling, rng, &inner)?;
        }
        let mut stats = self.learn(&batch)?;
        stats.on_policy = on_policy;
        Ok(stats)
    }

    /// One AdamW step on the divergence over `batch`'s completion tokens
    /// (a [`Rollout`] from [`generate`] or [`batch_of`]); `on_policy` in the
    /// result is false.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for an empty batch or one longer than either
    /// model's `max_len`; those of posttrain-burn's distillation losses.
    pub fn learn(&mut self, batch: &Rollout) -> Result<DistillStepStats, TrainError> {
        let (loss, value, divergence) = self.objective(batch)?;
        let student = self.student.clone();
        self.student = apply_gradients(
            student,
            &mut self.optim,
            loss,
            self.config.optimizer.learning_rate,
        );
        self.steps += 1;
        let tokens: usize = batch.completion_lens.iter().sum();
        Ok(DistillStepStats {
            loss: value,
            divergence,
            on_policy: false,
            tokens,
            completion_len: tokens as f64 / batch.len() as f64,
        })
    }

    /// `(surrogate loss on the autodiff device, loss value, divergence)`:
    /// the value is posttrain-burn's, the gradient its closed form.
    fn objective(&self, batch: &Rollout) -> Result<(Tensor<1>, f64, f64), TrainError> {
        self.check(batch)?;
        let inner = self.device.clone().inner();
        let zs = completion_logits(&self.student, batch, &self.device);
        let zt = completion_logits(&self.teacher, batch, &inner);
        let mask = batch.mask(&inner);
        let (value, grad, divergence) = self.divergence(zs.clone().inner(), zt, &mask, true)?;
        let grad = grad.ok_or_else(|| TrainError::config("distillation: no gradient"))?;
        // The student logits of padded positions are selected away before the
        // surrogate multiplies them by the (already 0 there) gradient.
        let [b, w, v] = zs.dims();
        let pad = batch
            .mask(&self.device)
            .bool_not()
            .unsqueeze_dim::<3>(2)
            .expand([b, w, v]);
        let zs = self.scaled(zs);
        let kept = zs.clone().mask_where(pad, zs.zeros_like());
        let loss = with_closed_form_gradient(
            value.clone(),
            vec![(kept.reshape([b * w * v]), grad.reshape([b * w * v]))],
        );
        Ok((loss, scalar(value), divergence))
    }

    /// The loss of `examples` as given (no sampling, no update), with the
    /// student's inference copy.
    ///
    /// # Errors
    ///
    /// Those of [`batch_of`] and [`learn`](Self::learn).
    pub fn loss(&self, examples: &[Example]) -> Result<f64, TrainError> {
        let batch = batch_of(examples)?;
        self.check(&batch)?;
        let inner = self.device.clone().inner();
        let zs = completion_logits(&self.student.valid(), &batch, &inner);
        let zt = completion_logits(&self.teacher, &batch, &inner);
        let (value, _, _) = self.divergence(zs, zt, &batch.mask(&inner), false)?;
        Ok(scalar(value))
    }

    fn check(&self, batch: &Rollout) -> Result<(), TrainError> {
        let (p, w) = (batch.prompt_len, batch.width());
        let max = self.student.max_len().min(self.teacher.max_len());
        if batch.is_empty() || p == 0 || w == 0 || p + w - 1 > max {
            return Err(TrainError::config(format!(
                "distillation: need a non-empty batch with a prompt and a completion whose \
                 prompt + completion − 1 = {} fits both models' max_len {max}",
                (p + w).saturating_sub(1)
            )));
        }
        Ok(())
    }

    /// KD runs at temperature `T` by scaling the logits (the JSD takes `T`
    /// itself).
    fn scaled(&self, z: Tensor<3>) -> Tensor<3> {
        match self.loss {
            DistillLoss::Kd if self.config.temperature != 1.0 => {
                z.div_scalar(self.config.temperature)
            }
            _ => z,
        }
    }

    /// `(loss [1], ∂loss/∂(scaled student logits), mean per-token divergence)`.
    fn divergence(
        &self,
        zs: Tensor<3>,
        zt: Tensor<3>,
        mask: &Tensor<2, Bool>,
        with_grad: bool,
    ) -> Result<(Tensor<1>, Option<Tensor<3>>, f64), TrainError> {
        let cot = with_grad.then_some(1.0);
        match self.loss {
            DistillLoss::GeneralizedJsd => {
                let (l, g) =
                    kd::generalized_jsd_loss(&self.config.core()?, zs, zt, Some(mask), cot)?;
                let d = scalar(l.clone());
                Ok((l, g, d))
            }
            DistillLoss::Kd => {
                let (zs, zt) = (self.scaled(zs), self.scaled(zt));
                let (l, g) = kd::kd_loss(zs.clone(), zt.clone(), mask, cot)?;
                let fwd = CoreDistillConfig::new(0.0, 1.0, Reduction::BatchMean, None)?;
                let (kl, _) = kd::generalized_jsd_loss(&fwd, zs, zt, Some(mask), None)?;
                Ok((l, g, scalar(kl)))
            }
        }
    }

    /// The student being trained.
    pub fn model(&self) -> &S {
        &self.student
    }

    /// The trained student.
    pub fn into_model(self) -> S {
        self.student
    }

    /// The frozen teacher.
    pub fn teacher(&self) -> &T {
        &self.teacher
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The settings.
    pub fn config(&self) -> &DistillConfig {
        &self.config
    }

    /// Saves the student (`NAME.bpk`) and its optimizer state (`NAME.optim`).
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] if writing fails.
    pub fn save(&self, ckpt: &crate::checkpoint::Checkpoint, name: &str) -> Result<(), TrainError> {
        ckpt.save_model(name, &self.student)?;
        ckpt.save_optim(name, &self.optim)
    }

    /// Restores what [`save`](Self::save) wrote (student and optimizer
    /// state); `false` when there is no checkpoint of that name.
    ///
    /// # Errors
    ///
    /// [`TrainError::Io`] for a checkpoint that does not fit.
    pub fn load(
        &mut self,
        ckpt: &crate::checkpoint::Checkpoint,
        name: &str,
    ) -> Result<bool, TrainError> {
        match ckpt.load_model(name, self.student.clone())? {
            Some(m) => {
                self.student = m;
                ckpt.load_optim(name, &mut self.optim)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// The logits that predict the completion tokens, `[rows, width, vocab]`
/// (positions `p − 1 .. p + w − 1` of the forward pass over all but the
/// last token).
fn completion_logits<P: Policy>(model: &P, batch: &Rollout, device: &Device) -> Tensor<3> {
    let (b, p, w) = (batch.len(), batch.prompt_len, batch.width());
    let len = p + w;
    let ids = batch.ids(device).slice([0..b, 0..len - 1]);
    let v = model.vocab_size();
    model.logits(ids).slice([0..b, p - 1..len - 1, 0..v])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{TinyLm, TinyLmConfig};
    use burn::module::Module;

    /// The surrogate's gradient (closed form w.r.t. the logits, backpropagated
    /// through the model) equals burn's autodiff through posttrain-burn's op.
    #[test]
    fn surrogate_gradient_matches_autodiff_through_the_op() {
        let dev = posttrain_burn::device().unwrap();
        dev.seed(3);
        let ad = dev.clone().autodiff();
        let mut c = TinyLmConfig::new(9, 12);
        (c.d_model, c.d_ff, c.n_heads, c.n_layers) = (16, 32, 2, 1);
        let student: TinyLm = c.init(&ad).unwrap();
        let teacher = c.init(&ad).unwrap().valid();
        let batch = batch_of(&[
            (vec![2, 3, 4], vec![5, 6, 7, 1]),
            (vec![3, 8, 2], vec![4, 1]),
        ])
        .unwrap();
        for (beta, loss_type) in [(0.0, "jsd"), (0.3, "jsd"), (1.0, "jsd"), (0.0, "kd")] {
            let mut cfg = DistillConfig::new(4);
            (cfg.beta, cfg.temperature, cfg.loss_type) = (beta, 0.7, loss_type.into());
            let t =
                DistillTrainer::new(student.clone(), teacher.clone(), cfg.clone(), &ad).unwrap();
            let (loss, value, _) = t.objective(&batch).unwrap();
            let grads = loss.backward();
            let w = t.student.lm_head.weight.val();
            let g_closed = posttrain_burn::to_vec(w.grad(&grads).unwrap());
            let e = t.student.token_embedding.weight.val();
            let ge_closed = posttrain_burn::to_vec(e.grad(&grads).unwrap());

            let zs = completion_logits(&t.student, &batch, &ad);
            let zt = completion_logits(&t.teacher, &batch, &dev).autodiff();
            let mask = batch.mask(&ad);
            let direct = if loss_type == "kd" {
                kd::kd_loss(zs.div_scalar(0.7), zt.div_scalar(0.7), &mask, None)
                    .unwrap()
                    .0
            } else {
                kd::generalized_jsd_loss(&cfg.core().unwrap(), zs, zt, Some(&mask), None)
                    .unwrap()
                    .0
            };
            assert!((scalar(direct.clone()) - value).abs() < 1e-5 && value > 0.0);
            assert!(
                g_closed.iter().any(|x| x.abs() > 1e-4),
                "{loss_type} β = {beta}: no gradient"
            );
            let grads = direct.backward();
            let g_auto = posttrain_burn::to_vec(w.grad(&grads).unwrap());
            let ge_auto = posttrain_burn::to_vec(e.grad(&grads).unwrap());
            for (a, b) in g_closed
                .iter()
                .zip(&g_auto)
                .chain(ge_closed.iter().zip(&ge_auto))
            {
                assert!(
                    (a - b).abs() < 1e-5 + 1e-3 * b.abs(),
                    "{loss_type} β = {beta}: closed form {a} vs autodiff {b}"
                );
            }
        }
    }
}
