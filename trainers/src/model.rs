//! Models: the [`Policy`] trait every trainer drives, a small decoder-only
//! transformer ([`TinyLm`]) for teaching, and the heads RLHF needs (a value
//! head for PPO's critic, a scalar reward head for reward models).
//!
//! ## Plugging in your own model
//!
//! A trainer needs only next-token logits: implement [`Policy`] for your burn
//! module (any `#[derive(Module)]` struct) and every trainer accepts it. The
//! logits are `[batch, seq, vocab]` with position `s` predicting token
//! `s + 1`, i.e. a causal LM: position `s` must not see tokens after `s`
//! (the trainers right-pad finished completions and rely on this).
//!
//! ## The built-in transformer
//!
//! [`TinyLm`] is GPT-shaped: token + learned position embeddings, `n_layers`
//! pre-norm blocks of causal multi-head attention and a GELU feed-forward
//! (burn's `TransformerEncoder` with an autoregressive mask), a final layer
//! norm and a linear head. At the default [`TinyLmConfig`] it has ≈ 0.2 M
//! parameters; [`TinyLmConfig::num_params`] tells for any setting.

use burn::module::Module;
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::transformer::{
    TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput,
};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// A causal language model the trainers can optimise.
///
/// `logits(tokens)` maps `[batch, seq]` token ids to `[batch, seq, vocab]`
/// next-token logits (position `s` predicts token `s + 1`; it must depend
/// on tokens `0..=s` only).
pub trait Policy: Module + Sized {
    /// Next-token logits, `[batch, seq, vocab]`.
    fn logits(&self, tokens: Tensor<2, Int>) -> Tensor<3>;
    /// The vocabulary size (last axis of [`logits`](Self::logits)).
    fn vocab_size(&self) -> usize;
    /// The longest sequence the model accepts (prompt + completion).
    fn max_len(&self) -> usize;

    /// The logits of the *last* position, `[batch, vocab]`, during
    /// decoding: called with the same rows growing by one token per call,
    /// `state` starting from [`DecodeState::new`]. A model may keep a
    /// key/value cache in `state`; the default runs the full forward pass.
    fn next_token_logits(&self, tokens: Tensor<2, Int>, state: &mut DecodeState) -> Tensor<2> {
        let _ = state;
        let [b, s] = tokens.dims();
        let v = self.vocab_size();
        self.logits(tokens)
            .slice([0..b, s - 1..s, 0..v])
            .reshape([b, v])
    }
}

/// Whatever a [`Policy`] keeps between decoding steps (e.g. a key/value
/// cache); opaque to the caller.
pub struct DecodeState(Option<Box<dyn std::any::Any + Send>>);

impl DecodeState {
    /// The state before the first decoding step.
    pub fn new() -> Self {
        DecodeState(None)
    }
}

impl Default for DecodeState {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for DecodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "DecodeState(cached)"
        } else {
            "DecodeState(empty)"
        })
    }
}

/// A model with a hidden state per position, for the heads of
/// [`ValueModel`] and [`RewardModel`].
pub trait Backbone: Policy {
    /// The final hidden states, `[batch, seq, d_model]`.
    fn hidden(&self, tokens: Tensor<2, Int>) -> Tensor<3>;
    /// The width of [`hidden`](Self::hidden).
    fn d_model(&self) -> usize;
}

/// Shape of a [`TinyLm`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TinyLmConfig {
    /// Vocabulary size (the tokenizer's).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Attention heads (must divide `d_model`).
    pub n_heads: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Width of the feed-forward layer.
    pub d_ff: usize,
    /// Longest sequence (learned position embeddings).
    pub max_len: usize,
}

impl TinyLmConfig {
    /// A 2-layer, 64-wide model with 4 heads, `d_ff = 256` (≈ 0.1 M
    /// parameters plus `2 · 64 · vocab` for embedding and head).
    pub fn new(vocab_size: usize, max_len: usize) -> Self {
        TinyLmConfig {
            vocab_size,
            d_model: 64,
            n_heads: 4,
            n_layers: 2,
            d_ff: 256,
            max_len,
        }
    }

    /// Checks the shape.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] for a zero size or `n_heads ∤ d_model`.
    pub fn validate(&self) -> Result<(), TrainError> {
        let zero = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("n_layers", self.n_layers),
            ("d_ff", self.d_ff),
            ("max_len", self.max_len),
        ]
        .into_iter()
        .find(|(_, v)| *v == 0);
        if let Some((name, _)) = zero {
            return Err(TrainError::config(format!(
                "TinyLmConfig.{name} must be > 0"
            )));
        }
        if self.d_model % self.n_heads != 0 {
            return Err(TrainError::config(format!(
                "TinyLmConfig: n_heads = {} must divide d_model = {}",
                self.n_heads, self.d_model
            )));
        }
        Ok(())
    }

    /// The number of trainable parameters.
    pub fn num_params(&self) -> usize {
        let (d, f, v, l) = (self.d_model, self.d_ff, self.vocab_size, self.n_layers);
        let attention = 4 * (d * d + d);
        let ffn = d * f + f + f * d + d;
        let norms = 2 * 2 * d;
        v * d + self.max_len * d + l * (attention + ffn + norms) + 2 * d + d * v + v
    }

    /// Builds the model with burn's default initialisers on `device` (seed
    /// the device first, `device.seed(s)`, for reproducible weights).
    ///
    /// # Errors
    ///
    /// Those of [`validate`](Self::validate).
    pub fn init(&self, device: &Device) -> Result<TinyLm, TrainError> {
        self.validate()?;
        let blocks =
            TransformerEncoderConfig::new(self.d_model, self.d_ff, self.n_heads, self.n_layers)
                .with_norm_first(true)
                .with_dropout(0.0)
                .init(device);
        Ok(TinyLm {
            token_embedding: EmbeddingConfig::new(self.vocab_size, self.d_model).init(device),
            position_embedding: EmbeddingConfig::new(self.max_len, self.d_model).init(device),
            blocks,
            final_norm: LayerNormConfig::new(self.d_model).init(device),
            lm_head: LinearConfig::new(self.d_model, self.vocab_size).init(device),
            vocab_size: self.vocab_size,
            d_model: self.d_model,
            max_len: self.max_len,
        })
    }
}

/// A small GPT-style causal transformer (see the [module docs](self)).
#[derive(Module, Debug)]
pub struct TinyLm {
    /// Token embeddings, `[vocab, d_model]`.
    pub token_embedding: Embedding,
    /// Learned absolute position embeddings, `[max_len, d_model]`.
    pub position_embedding: Embedding,
    /// Pre-norm transformer blocks (causally masked).
    pub blocks: TransformerEncoder,
    /// Final layer norm.
    pub final_norm: LayerNorm,
    /// Unembedding, `d_model → vocab`.
    pub lm_head: Linear,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub d_model: usize,
    /// Longest sequence.
    pub max_len: usize,
}

impl Backbone for TinyLm {
    fn hidden(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [b, s] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<1, Int>::arange(0..s as i64, &device)
            .unsqueeze_dim::<2>(0)
            .expand([b, s]);
        let x = self.token_embedding.forward(tokens) + self.position_embedding.forward(positions);
        let causal = generate_autoregressive_mask(b, s, &device);
        let x = self
            .blocks
            .forward(TransformerEncoderInput::new(x).mask_attn(causal));
        self.final_norm.forward(x)
    }

    fn d_model(&self) -> usize {
        self.d_model
    }
}

impl Policy for TinyLm {
    fn logits(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.lm_head.forward(self.hidden(tokens))
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn max_len(&self) -> usize {
        self.max_len
    }

    /// Decodes with a key/value cache: the first call runs the whole
    /// prefix and keeps every layer's keys and values; each later call
    /// (the same rows, one token longer) runs only the new position through
    /// the blocks and attends over the cached keys and values — the same
    /// arithmetic as [`logits`](Policy::logits) at that position, at
    /// `O(d²)` instead of `O(seq · d²)` per token. A call that does not
    /// extend the cached rows by exactly one token starts over.
    fn next_token_logits(&self, tokens: Tensor<2, Int>, state: &mut DecodeState) -> Tensor<2> {
        let [b, s] = tokens.dims();
        let device = tokens.device();
        let fresh = match state.0.as_ref().and_then(|c| c.downcast_ref::<KvCache>()) {
            Some(c) => c.len + 1 != s || c.rows != b,
            None => true,
        };
        if fresh {
            state.0 = Some(Box::new(KvCache {
                k: Vec::new(),
                v: Vec::new(),
                len: 0,
                rows: b,
            }));
        }
        let cache = state
            .0
            .as_mut()
            .and_then(|c| c.downcast_mut::<KvCache>())
            .expect("a TinyLm decode state was just set");
        let start = cache.len;
        let n = s - start;
        let new_tokens = tokens.slice([0..b, start..s]);
        let positions = Tensor::<1, Int>::arange(start as i64..s as i64, &device)
            .unsqueeze_dim::<2>(0)
            .expand([b, n]);
        let mut x =
            self.token_embedding.forward(new_tokens) + self.position_embedding.forward(positions);
        for (i, layer) in self.blocks.layers.iter().enumerate() {
            x = cached_block(layer, x, cache, i, start);
        }
        cache.len = s;
        let d = self.d_model;
        let last = x.slice([0..b, n - 1..n, 0..d]);
        self.lm_head
            .forward(self.final_norm.forward(last))
            .reshape([b, self.vocab_size])
    }
}

/// Every layer's keys and values, `[rows, heads, len, d_k]`.
struct KvCache {
    k: Vec<Tensor<4>>,
    v: Vec<Tensor<4>>,
    len: usize,
    rows: usize,
}

/// One pre-norm block on the new positions `x` (`[b, n, d]`, absolute
/// positions `start..start + n`), attending over the cached keys/values
/// plus the new ones (causally within the new ones); appends to the cache.
fn cached_block(
    layer: &burn::nn::transformer::TransformerEncoderLayer,
    x: Tensor<3>,
    cache: &mut KvCache,
    i: usize,
    start: usize,
) -> Tensor<3> {
    let mha = &layer.mha;
    let [b, n, d] = x.dims();
    let (h, dk) = (mha.n_heads, mha.d_k);
    let heads = |t: Tensor<3>| t.reshape([b, n, h, dk]).swap_dims(1, 2);
    let normed = layer.norm_2.forward(x.clone());
    let q = heads(mha.query.forward(normed.clone()));
    let mut k = heads(mha.key.forward(normed.clone()));
    let mut v = heads(mha.value.forward(normed));
    if i < cache.k.len() {
        k = Tensor::cat(vec![cache.k[i].clone(), k], 2);
        v = Tensor::cat(vec![cache.v[i].clone(), v], 2);
        cache.k[i] = k.clone();
        cache.v[i] = v.clone();
    } else {
        cache.k.push(k.clone());
        cache.v.push(v.clone());
    }
    let total = start + n;
    let mut scores = q.matmul(k.swap_dims(2, 3)).div_scalar((dk as f64).sqrt());
    if n > 1 {
        // New position start + r may not see keys beyond start + r.
        let future =
            Tensor::<2, burn::tensor::Bool>::tril_mask([n, total], start as i64, &x.device());
        scores = scores.mask_fill(
            future.reshape([1, 1, n, total]).expand([b, h, n, total]),
            mha.min_float,
        );
    }
    let weights = burn::tensor::activation::softmax(scores, 3);
    let context = weights.matmul(v).swap_dims(1, 2).reshape([b, n, d]);
    let x = x + mha.output.forward(context);
    let normed = layer.norm_1.forward(x.clone());
    x + layer.pwff.forward(normed)
}

/// A backbone with a scalar head per position: PPO's critic `V(s_t)`.
#[derive(Module, Debug)]
pub struct ValueModel<M: Module> {
    /// The transformer body.
    pub backbone: M,
    /// `d_model → 1`.
    pub value_head: Linear,
}

impl<M: Backbone> ValueModel<M> {
    /// A value head on `backbone`.
    pub fn new(backbone: M, device: &Device) -> Self {
        let value_head = LinearConfig::new(backbone.d_model(), 1).init(device);
        ValueModel {
            backbone,
            value_head,
        }
    }

    /// `V` at every position, `[batch, seq]`.
    pub fn values(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        self.value_head
            .forward(self.backbone.hidden(tokens))
            .squeeze_dim::<2>(2)
    }
}

/// A backbone with a scalar reward read at the last real token of each
/// sequence (TRL's `AutoModelForSequenceClassification` with one label).
#[derive(Module, Debug)]
pub struct RewardModel<M: Module> {
    /// The transformer body.
    pub backbone: M,
    /// `d_model → 1`.
    pub reward_head: Linear,
}

impl<M: Backbone> RewardModel<M> {
    /// A reward head on `backbone`.
    pub fn new(backbone: M, device: &Device) -> Self {
        let reward_head = LinearConfig::new(backbone.d_model(), 1).init(device);
        RewardModel {
            backbone,
            reward_head,
        }
    }

    /// One reward per row, read at position `last[b]` (the index of the
    /// sequence's last real token), `[batch]`.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] if `last` does not have one index per row
    /// or an index is outside the sequence.
    pub fn rewards(&self, tokens: Tensor<2, Int>, last: &[usize]) -> Result<Tensor<1>, TrainError> {
        let [b, s] = tokens.dims();
        if last.len() != b || last.iter().any(|&l| l >= s) {
            return Err(TrainError::config(format!(
                "RewardModel::rewards: need {b} last-token indices below {s}, got {last:?}"
            )));
        }
        let device = tokens.device();
        let all = self
            .reward_head
            .forward(self.backbone.hidden(tokens))
            .squeeze_dim::<2>(2);
        let idx: Vec<i64> = last.iter().map(|&l| l as i64).collect();
        let idx = Tensor::<2, Int>::from_data(burn::tensor::TensorData::new(idx, [b, 1]), &device);
        Ok(all.gather(1, idx).squeeze_dim::<1>(1))
    }
}
