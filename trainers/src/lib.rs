//! # posttrain-trainers
//!
//! The post-training loops — SFT, reward modelling, PPO, DPO, GRPO,
//! rejection sampling and distillation — on burn models, with every loss,
//! advantage and KL term computed by [`posttrain_core`] through
//! [`posttrain_burn`]. Small enough to read in an afternoon, real enough to
//! train the built-in transformer on a laptop CPU in minutes.
//!
//! ## How a trainer uses the core
//!
//! A trainer computes per-token log-probabilities with posttrain-burn's fused
//! selective log-softmax, hands them to one of the core's losses (evaluated on
//! tensors by posttrain-burn, which also returns the loss's **closed-form
//! gradient** with respect to the log-probs), and backpropagates that gradient
//! into the model: the surrogate `Σ sg(∂L/∂log π) · log π` has exactly the
//! loss's gradient, so burn's autodiff only ever differentiates the model, and
//! the loss math — clipping, masking, aggregation, KL estimators — is the
//! core's, the same numbers the conformance vectors pin to TRL and verl.
//!
//! | module | what |
//! |---|---|
//! | [`model`] | the [`Policy`](model::Policy) trait, [`TinyLm`](model::TinyLm), value and reward heads |
//! | [`tokenizer`] | a character tokenizer with special tokens |
//! | [`generate`] | batched sampling (temperature, top-k, top-p, EOS) and completion log-probs |
//! | [`tasks`] | built-in tasks: verifiable arithmetic with the R1-Zero reward, a preference task |
//! | [`sft`] | supervised fine-tuning on completions (masked cross-entropy) |
//! | [`grpo`] | GRPO and its family (any group advantage, any TRL loss type and aggregation) |
//! | [`ppo`] | PPO for RLHF: actor, critic, frozen reference, KL-in-reward with a fixed or adaptive β, GAE, clipped policy and value losses |
//! | [`dpo`] | DPO and its family (every paired loss of the core, SimPO, ORPO, KTO) on preference pairs |
//! | [`rejection`] | rejection-sampling fine-tuning: best-of-n by a reward, then SFT on the winners (OpenRLHF `rs`, RFT) |
//! | [`distill`] | distillation: generalized JSD / forward / reverse KL or KD loss from a teacher, off- or on-policy (TRL GKD) |
//! | [`reward`] | reward models: Bradley–Terry on preference pairs, with margins and centering |
//! | [`checkpoint`] | model weights (burn-store), optimizer state, loop state |
//! | [`report`] | metrics as JSONL, a progress bar, SVG plots, the examples' last JSON line |
//!
//! ## Backends
//!
//! Everything is written against burn's device-dispatched tensors: the same
//! code runs on ndarray (default), wgpu (`--features wgpu`) or libtorch
//! (`--features tch`); [`posttrain_burn::device`] picks the device
//! (`POSTTRAIN_BACKEND` overrides) and trainers train on its autodiff
//! wrapper.
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]

pub use burn;
pub use posttrain_burn;

pub mod checkpoint;
pub mod distill;
pub mod dpo;
pub mod generate;
pub mod grpo;
pub mod model;
pub mod ppo;
pub mod rejection;
pub mod report;
pub mod reward;
pub mod sft;
pub mod tasks;
pub mod tokenizer;

use std::fmt;

/// What can go wrong in a trainer.
#[derive(Debug)]
pub enum TrainError {
    /// A loss or estimator of the core refused its input.
    Core(posttrain_core::Error),
    /// No device for the requested backend.
    Device(String),
    /// An invalid configuration or input (the message names it).
    Config(String),
    /// Reading or writing a file (metrics, plots, checkpoints).
    Io(String),
}

impl TrainError {
    pub(crate) fn config(msg: impl Into<String>) -> Self {
        TrainError::Config(msg.into())
    }
}

impl fmt::Display for TrainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrainError::Core(e) => write!(f, "loss math: {e}"),
            TrainError::Device(e) => write!(f, "device: {e}"),
            TrainError::Config(e) => write!(f, "configuration: {e}"),
            TrainError::Io(e) => write!(f, "i/o: {e}"),
        }
    }
}

impl std::error::Error for TrainError {}

impl From<posttrain_core::Error> for TrainError {
    fn from(e: posttrain_core::Error) -> Self {
        TrainError::Core(e)
    }
}

impl From<posttrain_burn::DeviceError> for TrainError {
    fn from(e: posttrain_burn::DeviceError) -> Self {
        TrainError::Device(e.to_string())
    }
}

impl From<std::io::Error> for TrainError {
    fn from(e: std::io::Error) -> Self {
        TrainError::Io(e.to_string())
    }
}

/// A small, seedable, reproducible PRNG (xoshiro256**, seeded by
/// SplitMix64) for sampling, shuffling and task generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator from a 64-bit seed.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Shuffles in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }

    /// The state, for checkpoints.
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// A generator from a [`state`](Self::state).
    pub fn from_state(s: [u64; 4]) -> Self {
        Rng { s }
    }

    /// A generator from a [`state`](Self::state) saved as a JSON array of
    /// four integers (as `serde_json::json!(rng.state())` writes it, e.g. in
    /// a checkpoint's loop state); `None` for anything else.
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        let s: Vec<u64> = v
            .as_array()?
            .iter()
            .map(|x| x.as_u64())
            .collect::<Option<_>>()?;
        Some(Rng::from_state(s.try_into().ok()?))
    }
}

/// AdamW settings shared by the trainers (TRL's `learning_rate`,
/// `weight_decay`, `max_grad_norm`, `adam_beta1/2`, `adam_epsilon`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimizerConfig {
    /// Step size.
    pub learning_rate: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// `β₁`.
    pub adam_beta1: f64,
    /// `β₂`.
    pub adam_beta2: f64,
    /// `ε`.
    pub adam_epsilon: f64,
}

impl OptimizerConfig {
    /// AdamW at `learning_rate`, β = (0.9, 0.999), ε = 1e-8, no decay, gradient norm clipped at 1.
    pub fn adamw(learning_rate: f64) -> Self {
        OptimizerConfig {
            learning_rate,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
        }
    }

    /// Checks the settings and builds burn's AdamW for a whole module.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for a non-positive or non-finite learning
    /// rate or clip norm, or betas outside `[0, 1)`.
    pub fn init(&self) -> Result<burn::optim::ModuleOptimizer, TrainError> {
        let ok = |x: f64| x.is_finite() && x > 0.0;
        if !ok(self.learning_rate)
            || !ok(self.adam_epsilon)
            || self.max_grad_norm.is_some_and(|n| !ok(n))
        {
            return Err(TrainError::config(format!(
                "optimizer: learning_rate, adam_epsilon and max_grad_norm must be finite and > 0 ({self:?})"
            )));
        }
        let betas_ok =
            (0.0..1.0).contains(&self.adam_beta1) && (0.0..1.0).contains(&self.adam_beta2);
        if !(betas_ok && self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(TrainError::config(format!(
                "optimizer: betas must be in [0, 1) and weight_decay ≥ 0 ({self:?})"
            )));
        }
        Ok(burn::optim::AdamWConfig::new()
            .with_beta_1(self.adam_beta1 as f32)
            .with_beta_2(self.adam_beta2 as f32)
            .with_epsilon(self.adam_epsilon as f32)
            .with_weight_decay(self.weight_decay as f32)
            .with_grad_clipping(
                self.max_grad_norm
                    .map(|n| burn::grad_clipping::GradientClippingConfig::Norm(n as f32)),
            )
            .init())
    }
}

/// burn's optimizer state, with a `Debug` that names it.
pub(crate) struct Optim(pub(crate) burn::optim::ModuleOptimizer);

impl fmt::Debug for Optim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdamW(burn ModuleOptimizer)")
    }
}

/// One optimizer step from a scalar `loss` on the autodiff device.
pub(crate) fn apply_gradients<M: burn::module::Module>(
    model: M,
    optim: &mut Optim,
    loss: burn::tensor::Tensor<1>,
    learning_rate: f64,
) -> M {
    let grads = loss.backward();
    let grads = burn::optim::GradientsParams::from_grads(grads, &model);
    optim.0.step(learning_rate, model, grads)
}

/// Reads a `[1]` (or any) float tensor's first value.
pub(crate) fn scalar(t: burn::tensor::Tensor<1>) -> f64 {
    posttrain_burn::to_vec(t.inner())
        .first()
        .copied()
        .unwrap_or(f64::NAN)
}

/// A `[1]` loss on the autodiff device whose *value* is `value` (computed
/// by posttrain-burn on the inner device) and whose *gradient* with respect
/// to each tracked `[n]` input `x` is the matching constant `g` — the core's
/// closed-form `∂L/∂x`:
///
/// `L = value + S − sg(S)`, `S = Σ_k Σ_i x_k,i · sg(g_k,i)`
///
/// (`S − sg(S)` is exactly 0 and has gradient `g`: the surrogate of the
/// [crate docs](crate), used for the losses posttrain-burn has no fused op
/// for).
pub(crate) fn with_closed_form_gradient(
    value: burn::tensor::Tensor<1>,
    parts: Vec<(burn::tensor::Tensor<1>, burn::tensor::Tensor<1>)>,
) -> burn::tensor::Tensor<1> {
    let value = value.inner().autodiff();
    let mut surrogate: Option<burn::tensor::Tensor<1>> = None;
    for (x, g) in parts {
        let term = (x * g.inner().autodiff()).sum();
        surrogate = Some(match surrogate {
            Some(s) => s + term,
            None => term,
        });
    }
    match surrogate {
        Some(s) => value + s.clone() - s.detach(),
        None => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_form_surrogate_has_the_value_and_the_gradient() {
        let dev = posttrain_burn::device().unwrap().autodiff();
        let inner = dev.clone().inner();
        let x = posttrain_burn::tensor1(&[1.0, -2.0, 0.5], &dev).require_grad();
        let y = posttrain_burn::tensor1(&[3.0, 4.0], &dev).require_grad();
        let gx = posttrain_burn::tensor1(&[0.25, -1.0, 2.0], &inner);
        let gy = posttrain_burn::tensor1(&[-0.5, 0.125], &inner);
        let value = posttrain_burn::tensor1(&[1.75], &inner);
        let loss = with_closed_form_gradient(value, vec![(x.clone() * 2.0, gx), (y.clone(), gy)]);
        assert_eq!(posttrain_burn::to_vec(loss.clone().inner()), vec![1.75]);
        let grads = loss.backward();
        assert_eq!(
            posttrain_burn::to_vec(x.grad(&grads).unwrap()),
            vec![0.5, -2.0, 4.0]
        );
        assert_eq!(
            posttrain_burn::to_vec(y.grad(&grads).unwrap()),
            vec![-0.5, 0.125]
        );
    }
}
