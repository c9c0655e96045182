//! Batched sampling from a [`Policy`], and the per-token log-probabilities
//! the trainers need.
//!
//! ## Sampling
//!
//! [`generate`] extends every prompt by up to `max_new_tokens` tokens, one
//! position per forward pass, sampling each row from
//! `softmax(z / temperature)` restricted to the `top_k` most likely tokens
//! and to the smallest set whose probability reaches `top_p` (the order
//! HuggingFace and vLLM apply them: temperature, top-k, top-p). A row stops
//! after it samples EOS; finished rows are right-padded with PAD, which a
//! causal model never looks back at. `temperature = 0` is greedy decoding.
//!
//! Every sampled token's log-probability under the *tempered* distribution
//! (before the top-k/top-p truncation, as TRL computes `old_per_token_logps`
//! with `logits / temperature`) is recorded as the sampling log-prob.
//!
//! ## Log-probs for training
//!
//! [`completion_log_probs`] recomputes `log π(y_t | x, y_<t)` of the
//! completion tokens with one forward pass over the whole padded batch,
//! through posttrain-burn's fused selective log-softmax (its backward is the
//! closed form `(1[k = y] − p)/T`). [`Rollout::mask`] marks the real
//! completion tokens (EOS included, PAD excluded).

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use posttrain_burn::fused;
use posttrain_core::logits::Temperature;
use serde::{Deserialize, Serialize};

use crate::model::{DecodeState, Policy};
use crate::tokenizer::CharTokenizer;
use crate::{Rng, TrainError};

/// How to sample (TRL's `temperature`, `top_k`, `top_p`, `max_completion_length`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingConfig {
    /// Softmax temperature (> 0), or 0 for greedy decoding.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Nucleus: keep the smallest set of tokens with probability ≥ `top_p` (1 = off).
    pub top_p: f64,
    /// Most tokens to generate per prompt (TRL `max_completion_length`).
    pub max_new_tokens: usize,
}

impl SamplingConfig {
    /// Plain sampling at temperature 1, no truncation.
    pub fn new(max_new_tokens: usize) -> Self {
        SamplingConfig {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            max_new_tokens,
        }
    }

    /// Greedy decoding (for evaluation).
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingConfig {
            temperature: 0.0,
            ..Self::new(max_new_tokens)
        }
    }

    /// Checks the parameters.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for a negative or non-finite temperature,
    /// `top_k = 0`, `top_p ∉ (0, 1]` or `max_new_tokens = 0`.
    pub fn validate(&self) -> Result<(), TrainError> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(TrainError::config(format!(
                "temperature = {} must be finite and ≥ 0 (0 = greedy)",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(TrainError::config(
                "top_k = 0 keeps no token; use None for no limit",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(TrainError::config(format!(
                "top_p = {} must be in (0, 1]",
                self.top_p
            )));
        }
        if self.max_new_tokens == 0 {
            return Err(TrainError::config("max_new_tokens must be > 0"));
        }
        Ok(())
    }

    /// The temperature the trainers divide logits by (1 for greedy).
    pub fn logit_temperature(&self) -> f64 {
        if self.temperature > 0.0 {
            self.temperature
        } else {
            1.0
        }
    }
}

/// Sampled completions of a batch of equal-length prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// Length of every prompt.
    pub prompt_len: usize,
    /// Prompt + completion per row, right-padded with PAD to
    /// `prompt_len + width()`.
    pub sequences: Vec<Vec<u32>>,
    /// Completion tokens per row, EOS included when it was sampled.
    pub completion_lens: Vec<usize>,
    /// Whether the row ended with EOS (false: cut at `max_new_tokens`).
    pub finished: Vec<bool>,
    /// `log π_sampler(y_t)` per completion token (tempered, untruncated).
    pub sampling_log_probs: Vec<Vec<f64>>,
}

impl Rollout {
    /// Rows.
    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    /// Completion width (the longest completion; the padded length).
    pub fn width(&self) -> usize {
        self.completion_lens.iter().copied().max().unwrap_or(0)
    }

    /// Row `i`'s completion tokens without the EOS.
    pub fn completion(&self, i: usize) -> &[u32] {
        let c = &self.sequences[i][self.prompt_len..self.prompt_len + self.completion_lens[i]];
        match c.last() {
            Some(&CharTokenizer::EOS) => &c[..c.len() - 1],
            _ => c,
        }
    }

    /// Row `i`'s prompt.
    pub fn prompt(&self, i: usize) -> &[u32] {
        &self.sequences[i][..self.prompt_len]
    }

    /// `[rows, prompt_len + width]` token ids.
    pub fn ids(&self, device: &Device) -> Tensor<2, Int> {
        ids_tensor(&self.sequences, device)
    }

    /// `[rows, width]`: true on real completion tokens (EOS included).
    pub fn mask(&self, device: &Device) -> Tensor<2, Bool> {
        let w = self.width();
        let m: Vec<bool> = self
            .completion_lens
            .iter()
            .flat_map(|&l| (0..w).map(move |j| j < l))
            .collect();
        Tensor::from_data(TensorData::new(m, [self.len(), w]), device)
    }

    /// `[rows, width]` sampling log-probs (0 on padding).
    pub fn sampling_log_probs(&self, device: &Device) -> Tensor<2> {
        let w = self.width();
        let v: Vec<f32> = self
            .sampling_log_probs
            .iter()
            .flat_map(|r| (0..w).map(move |j| r.get(j).copied().unwrap_or(0.0) as f32))
            .collect();
        Tensor::from_data(TensorData::new(v, [self.len(), w]), device)
    }

    /// Keeps the rows where `keep[i]`, in order.
    pub fn select(&self, keep: &[bool]) -> Rollout {
        fn pick<T: Clone>(v: &[T], keep: &[bool]) -> Vec<T> {
            v.iter()
                .zip(keep)
                .filter(|(_, &k)| k)
                .map(|(x, _)| x.clone())
                .collect()
        }
        let mut r = Rollout {
            prompt_len: self.prompt_len,
            sequences: pick(&self.sequences, keep),
            completion_lens: pick(&self.completion_lens, keep),
            finished: pick(&self.finished, keep),
            sampling_log_probs: pick(&self.sampling_log_probs, keep),
        };
        let w = r.width();
        for s in &mut r.sequences {
            s.truncate(r.prompt_len + w);
        }
        r
    }
}

/// `[rows, len]` Int tensor from equal-length rows.
pub(crate) fn ids_tensor(rows: &[Vec<u32>], device: &Device) -> Tensor<2, Int> {
    let len = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.iter().map(|&t| t as i64))
        .collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), len]), device)
}

/// Samples a completion for every prompt (all prompts must have the same
/// length); see the [module docs](self).
///
/// # Errors
///
/// [`TrainError::Config`] for an invalid [`SamplingConfig`], no prompts,
/// prompts of different or zero length, or `prompt_len + max_new_tokens`
/// beyond the model's `max_len`.
pub fn generate<P: Policy>(
    model: &P,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
    rng: &mut Rng,
    device: &Device,
) -> Result<Rollout, TrainError> {
    cfg.validate()?;
    let p = prompts.first().map_or(0, Vec::len);
    if prompts.is_empty() || p == 0 || prompts.iter().any(|q| q.len() != p) {
        return Err(TrainError::config(
            "generate: need at least one prompt, all of the same non-zero length",
        ));
    }
    if p + cfg.max_new_tokens > model.max_len() {
        return Err(TrainError::config(format!(
            "generate: prompt length {p} + max_new_tokens {} exceeds the model's max_len {}",
            cfg.max_new_tokens,
            model.max_len()
        )));
    }
    let b = prompts.len();
    let v = model.vocab_size();
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut lens = vec![0usize; b];
    let mut finished = vec![false; b];
    let mut logps: Vec<Vec<f64>> = vec![Vec::new(); b];
    let t = cfg.logit_temperature();
    let mut scratch: Vec<(f64, u32)> = Vec::with_capacity(v);
    let mut state = DecodeState::new();
    for _ in 0..cfg.max_new_tokens {
        let logits = model.next_token_logits(ids_tensor(&seqs, device), &mut state);
        let last: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| TrainError::Device(format!("reading logits back: {e:?}")))?;
        for (i, seq) in seqs.iter_mut().enumerate() {
            if finished[i] {
                seq.push(CharTokenizer::PAD);
                continue;
            }
            let row = &last[i * v..(i + 1) * v];
            let (tok, lp) = sample_row(row, t, cfg, rng, &mut scratch);
            seq.push(tok);
            lens[i] += 1;
            logps[i].push(lp);
            if tok == CharTokenizer::EOS {
                finished[i] = true;
            }
        }
        if finished.iter().all(|&f| f) {
            break;
        }
    }
    let mut r = Rollout {
        prompt_len: p,
        sequences: seqs,
        completion_lens: lens,
        finished,
        sampling_log_probs: logps,
    };
    let w = r.width();
    for s in &mut r.sequences {
        s.truncate(p + w);
    }
    Ok(r)
}

/// Samples one token from a row of logits; returns it with its tempered log-prob.
fn sample_row(
    row: &[f32],
    t: f64,
    cfg: &SamplingConfig,
    rng: &mut Rng,
    scratch: &mut Vec<(f64, u32)>,
) -> (u32, f64) {
    // Never sample PAD (id 0): it is not a token of any completion.
    let z: Vec<f64> = row.iter().map(|&x| x as f64 / t).collect();
    let zmax = z[1..].iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = zmax + z.iter().map(|&x| (x - zmax).exp()).sum::<f64>().ln();
    let logp = |k: usize| z[k] - lse;
    if cfg.temperature == 0.0 {
        let k = (1..z.len()).fold(1, |best, k| if z[k] > z[best] { k } else { best });
        return (k as u32, logp(k));
    }
    scratch.clear();
    scratch.extend((1..z.len()).map(|k| ((z[k] - zmax).exp(), k as u32)));
    scratch.sort_by(|a, b| b.0.total_cmp(&a.0));
    if let Some(k) = cfg.top_k {
        scratch.truncate(k.max(1));
    }
    if cfg.top_p < 1.0 {
        let total: f64 = scratch.iter().map(|x| x.0).sum();
        let mut acc = 0.0;
        let mut keep = scratch.len();
        for (i, x) in scratch.iter().enumerate() {
            acc += x.0 / total;
            if acc >= cfg.top_p {
                keep = i + 1;
                break;
            }
        }
        scratch.truncate(keep);
    }
    let total: f64 = scratch.iter().map(|x| x.0).sum();
    let mut u = rng.next_f64() * total;
    for &(w, k) in scratch.iter() {
        if u < w {
            return (k, logp(k as usize));
        }
        u -= w;
    }
    let k = scratch.last().map_or(1, |x| x.1);
    (k, logp(k as usize))
}

/// `log π(y_t | x, y_<t) / T`-tempered log-probs of the rollout's completion
/// tokens under `model`, `[rows, width]` (padding positions hold the
/// log-prob of PAD; mask them with [`Rollout::mask`]).
///
/// On an autodiff device the result is differentiable (fused selective
/// log-softmax, closed-form backward).
///
/// # Errors
///
/// Those of posttrain-burn's selective log-softmax; [`TrainError::Config`]
/// for an empty rollout.
pub fn completion_log_probs<P: Policy>(
    model: &P,
    rollout: &Rollout,
    temperature: f64,
    device: &Device,
) -> Result<Tensor<2>, TrainError> {
    let (b, p, w) = (rollout.len(), rollout.prompt_len, rollout.width());
    if b == 0 || w == 0 {
        return Err(TrainError::config("completion_log_probs: empty rollout"));
    }
    let ids = rollout.ids(device);
    sequence_log_probs(model, ids, p, w, temperature)
}

/// Log-probs of tokens `p..p + w` of `ids` (`[rows, p + w]`) given their
/// prefixes, `[rows, w]`.
pub(crate) fn sequence_log_probs<P: Policy>(
    model: &P,
    ids: Tensor<2, Int>,
    p: usize,
    w: usize,
    temperature: f64,
) -> Result<Tensor<2>, TrainError> {
    let [b, len] = ids.dims();
    debug_assert_eq!(len, p + w);
    let inputs = ids.clone().slice([0..b, 0..len - 1]);
    let targets = ids.slice([0..b, p..len]);
    let v = model.vocab_size();
    let logits = model.logits(inputs).slice([0..b, p - 1..len - 1, 0..v]);
    Ok(fused::selective_log_softmax(
        logits,
        targets,
        Temperature::new(temperature)?,
    )?)
}
