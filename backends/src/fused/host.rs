//! The ndarray fast path of the fused ops: on burn's ndarray backend the
//! tensors' host buffers are handed to the core's fused slice kernels
//! ([`posttrain_core::fused`]; on several threads with the `parallel`
//! feature) instead of running one burn op per term.
//!
//! burn's ndarray primitive is a reference-counted host array: its `f32`/`f64`
//! buffer is read in place (no copy) when it is contiguous, and the outputs
//! are wrapped around the kernels' `Vec`s (no copy either). Every function
//! here returns `None` — "use the tensor path" — for a tensor on another
//! backend, a mix of element types, a cross-token policy variant, or inputs
//! the tensor path would reject (so the error is the tensor path's).

// burn 0.22 deprecates the ndarray backend (for burn-flex); this module is
// its fast path, compiled only with the `ndarray` feature.
#![allow(deprecated)]

use std::borrow::Cow;
use std::marker::PhantomData;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::{
    Autodiff, DispatchKindConversion, DispatchTensor, GradientCheckpointingStrategy, TensorMetadata,
};
use burn::tensor::{Bool, Element, Int, Tensor, TensorData};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::elem::Real;
use posttrain_core::fused::{self as core_fused, TokenLoss, TokenLossPerToken};
use posttrain_core::kl::KlConfig;
use posttrain_core::logits::Temperature;
use posttrain_core::policy::token::{PolicyBatch, PolicyLoss};
use posttrain_core::{Dims, Error};

use crate::kl::KlLoss;
use crate::policy::PolicyLossOutput;

type Nd = burn::backend::NdArray;

/// Below this many elements the kernels run on the calling thread (spawning
/// costs more than it saves).
#[cfg(feature = "parallel")]
const PARALLEL_MIN: usize = 1 << 15;

/// The worker count for `n` elements of work (1: stay on this thread).
fn threads_for(n: usize) -> usize {
    #[cfg(feature = "parallel")]
    if n >= PARALLEL_MIN {
        return core_fused::parallel::default_threads();
    }
    let _ = n;
    1
}

// ---------------------------------------------------------------------------
// Host buffers of ndarray primitives.
// ---------------------------------------------------------------------------

/// The float element types whose ndarray buffers the kernels read.
pub(super) trait HostFloat: Real + Element {
    /// The buffer of `t` when it holds this type and is contiguous.
    fn borrow(t: &NdArrayTensor) -> Option<&[Self]>;
    /// Whether `t` holds this element type.
    fn holds(t: &NdArrayTensor) -> bool;
}

macro_rules! host_float {
    ($f:ty, $variant:ident) => {
        impl HostFloat for $f {
            fn borrow(t: &NdArrayTensor) -> Option<&[Self]> {
                match t {
                    NdArrayTensor::$variant(s) => s.view().to_slice(),
                    _ => None,
                }
            }
            fn holds(t: &NdArrayTensor) -> bool {
                matches!(t, NdArrayTensor::$variant(_))
            }
        }
    };
}
host_float!(f32, F32);
host_float!(f64, F64);

/// The ndarray primitive of `t` (its inner, non-autodiff tensor), or `None`
/// when it lives on another backend.
fn prim<const D: usize>(t: &Tensor<D>) -> Option<NdArrayTensor> {
    t.clone().inner().try_into_primitive::<Nd>().ok()
}

fn prim_bool<const D: usize>(t: &Tensor<D, Bool>) -> Option<NdArrayTensor> {
    t.clone().inner().try_into_primitive::<Nd>().ok()
}

fn prim_int<const D: usize>(t: &Tensor<D, Int>) -> Option<NdArrayTensor> {
    t.clone().inner().try_into_primitive::<Nd>().ok()
}

/// The elements of `t` in row-major order, as `F`: borrowed when possible,
/// else copied (a strided view or another element type).
fn floats<F: HostFloat>(t: &NdArrayTensor) -> Cow<'_, [F]> {
    match F::borrow(t) {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(
            Tensor::<1>::from_primitive::<Nd>(t.clone())
                .into_data()
                .convert::<F>()
                .into_vec::<F>()
                .expect("converted to F"),
        ),
    }
}

/// A new ndarray float primitive holding `v` (no copy).
fn wrap<F: HostFloat>(v: Vec<F>, shape: &[usize]) -> NdArrayTensor {
    NdArrayTensor::from_data(TensorData::new(v, shape.to_vec()))
}

fn float_tensor<const D: usize, F: HostFloat>(v: Vec<F>, shape: [usize; D]) -> Tensor<D> {
    Tensor::from_primitive::<Nd>(wrap(v, &shape))
}

fn scalar<F: HostFloat>(v: F) -> Tensor<1> {
    float_tensor(vec![v], [1])
}

/// The mask as `bool`s (borrowed from a native bool buffer).
fn bools(t: &NdArrayTensor) -> Option<Cow<'_, [bool]>> {
    match t {
        NdArrayTensor::Bool(s) => Some(match s.view().to_slice() {
            Some(v) => Cow::Borrowed(v),
            None => Cow::Owned(s.view().iter().copied().collect()),
        }),
        _ => None,
    }
}

/// Integer ids as `i64`s (borrowed from an `i64` buffer).
fn ids(t: &NdArrayTensor) -> Option<Cow<'_, [i64]>> {
    if let NdArrayTensor::I64(s) = t {
        if let Some(v) = s.view().to_slice() {
            return Some(Cow::Borrowed(v));
        }
    }
    if !t.dtype().is_int() && !t.dtype().is_uint() {
        return None;
    }
    let data = Tensor::<1, Int>::from_primitive::<Nd>(t.clone())
        .into_data()
        .convert::<i64>();
    data.into_vec::<i64>().ok().map(Cow::Owned)
}

// ---------------------------------------------------------------------------
// Token-level policy loss + KL penalty.
// ---------------------------------------------------------------------------

/// What the fast path of `policy_loss_with_kl` computed, on the inner device.
pub(super) struct HostPolicy {
    /// `pg_loss + coef · kl_loss`, `[1]` (the fused kernel's).
    pub value: Tensor<1>,
    /// Its gradient in `log π`, `[batch, seq]` (the fused kernel's).
    pub grad: Tensor<2>,
    pub policy: PolicyLossOutput,
    pub kl: Option<KlLoss>,
}

/// The KL penalty's estimator, coefficient and `log π_ref`.
pub(super) type HostKl<'a> = (KlConfig, f64, &'a Tensor<2>);

/// [`posttrain_core::fused::token_loss`] on the host buffers of ndarray
/// tensors; `None` where the tensor path must run instead.
#[allow(clippy::too_many_arguments)]
pub(super) fn policy_loss_with_kl(
    loss: &PolicyLoss,
    agg: AggMode,
    norm: &GlobalNorm,
    log_prob: &Tensor<2>,
    old_log_prob: &Tensor<2>,
    advantages: &Tensor<2>,
    mask: &Tensor<2, Bool>,
    is_weights: Option<&Tensor<2>>,
    kl: Option<HostKl<'_>>,
) -> Option<Result<HostPolicy, Error>> {
    if !loss.is_token_local() {
        return None;
    }
    let dims = mask.dims();
    let mut floats_in = vec![log_prob, old_log_prob, advantages];
    floats_in.extend(is_weights);
    floats_in.extend(kl.as_ref().map(|k| k.2));
    if dims[0] * dims[1] == 0 || floats_in.iter().any(|t| t.dims() != dims) {
        return None;
    }
    let cfg = TokenLoss {
        loss: *loss,
        agg,
        norm: *norm,
        kl: kl
            .as_ref()
            .map(|&(estimator, coef, _)| core_fused::KlPenalty { estimator, coef }),
    };
    // Invalid settings: the tensor path's error.
    cfg.validate().ok()?;
    let m = prim_bool(mask)?;
    let p = floats_in
        .iter()
        .map(|t| prim(*t))
        .collect::<Option<Vec<_>>>()?;
    if p.iter().all(f32::holds) {
        Some(policy_on::<f32>(&cfg, dims, &m, &p))
    } else if p.iter().all(f64::holds) {
        Some(policy_on::<f64>(&cfg, dims, &m, &p))
    } else {
        None
    }
    .and_then(Result::transpose)
}

/// The fast path on `F` buffers: `p` = `[log π, log π_old, A, (IS), (log π_ref)]`.
fn policy_on<F: HostFloat>(
    cfg: &TokenLoss,
    [batch, seq]: [usize; 2],
    mask: &NdArrayTensor,
    p: &[NdArrayTensor],
) -> Result<Option<HostPolicy>, Error> {
    let Some(mask) = bools(mask) else {
        return Ok(None);
    };
    let dims = Dims::new(batch, seq);
    let n = dims.len();
    let has_kl = cfg.kl.is_some();
    let bufs: Vec<Cow<'_, [F]>> = p.iter().map(floats::<F>).collect();
    let is_weights = (bufs.len() == 4 + has_kl as usize).then(|| &*bufs[3]);
    let rlp = has_kl.then(|| &*bufs[bufs.len() - 1]);
    let batch_in = PolicyBatch {
        dims,
        log_prob: &bufs[0],
        old_log_prob: &bufs[1],
        advantages: &bufs[2],
        mask: &mask,
        is_weights,
    };
    let threads = threads_for(n);
    let mut grad = vec![F::zero(); n];
    // The per-token outputs of the structs, written by the same pass.
    let mut per_token = vec![F::zero(); n];
    let mut pol_grad = vec![F::zero(); n];
    let (mut kl_tok, mut kl_grad) = if has_kl {
        (vec![F::zero(); n], vec![F::zero(); n])
    } else {
        (Vec::new(), Vec::new())
    };
    let per = TokenLossPerToken {
        policy_loss: &mut per_token,
        policy_grad: &mut pol_grad,
        kl: &mut kl_tok,
        kl_grad: &mut kl_grad,
    };
    let out = token_loss(cfg, &batch_in, rlp, &mut grad, per, threads)?;
    let shape = [batch, seq];
    let policy = PolicyLossOutput {
        loss: scalar(out.policy.loss),
        grad: float_tensor(pol_grad, shape),
        per_token: float_tensor(per_token, shape),
        clipfrac: scalar(out.policy.clipfrac),
        clipfrac_lower: scalar(out.policy.clipfrac_lower),
        approx_kl: scalar(out.policy.approx_kl),
    };
    let kl = has_kl.then(|| KlLoss {
        value: scalar(out.kl_loss),
        grad: float_tensor(kl_grad, shape),
        per_token: float_tensor(kl_tok, shape),
    });
    Ok(Some(HostPolicy {
        value: scalar(out.loss),
        grad: float_tensor(grad, shape),
        policy,
        kl,
    }))
}

fn token_loss<F: Real>(
    cfg: &TokenLoss,
    batch: &PolicyBatch<'_, F>,
    rlp: Option<&[F]>,
    grad: &mut [F],
    per: TokenLossPerToken<'_, F>,
    threads: usize,
) -> Result<core_fused::TokenLossOutput<F>, Error> {
    let vjp = Some((F::one(), grad));
    #[cfg(feature = "parallel")]
    if threads > 1 {
        return core_fused::parallel::token_loss_per_token(cfg, batch, rlp, vjp, per, threads);
    }
    let _ = threads;
    core_fused::token_loss_per_token(cfg, batch, rlp, vjp, per)
}

// ---------------------------------------------------------------------------
// Log-probabilities and entropy from logits.
// ---------------------------------------------------------------------------

/// Which outputs of [`posttrain_core::fused::log_probs_entropy`] an op returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LogitsOut {
    /// `log p[target]`, `[batch, seq]`.
    LogProbs,
    /// `H`, `[batch, seq]`.
    Entropy,
    /// Both, stacked as `[2, batch, seq]` (log-probs first).
    Both,
}

/// What the backward recomputes the VJP from: the logits (shared with the
/// caller's tensor: no copy), the targets and the rows' `lse` and `H`.
#[derive(Debug, Clone)]
struct LogitsState<F> {
    logits: NdArrayTensor,
    targets: Arc<Vec<i64>>,
    lse: Arc<Vec<F>>,
    entropy: Arc<Vec<F>>,
}

/// Backward of the fused logits op: one
/// [`log_probs_entropy_backward`](posttrain_core::fused::log_probs_entropy_backward)
/// with the cotangents of the op's outputs.
#[derive(Debug)]
struct HostLogitsVjp<F> {
    out: LogitsOut,
    temperature: Temperature,
    dims: [usize; 3],
    elem: PhantomData<fn() -> F>,
}

impl<F: HostFloat + core::fmt::Debug> Backward<Nd, 1> for HostLogitsVjp<F> {
    type State = LogitsState<F>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let cot = grads.consume::<Nd>(&ops.node);
        let [Some(node)] = ops.parents else {
            return;
        };
        let st = ops.state;
        let [b, s, v] = self.dims;
        let rows = b * s;
        let c = floats::<F>(&cot);
        let zeros;
        let (d_lp, d_h): (&[F], Option<&[F]>) = match self.out {
            LogitsOut::Both => (&c[..rows], Some(&c[rows..])),
            LogitsOut::LogProbs => (&c, None),
            LogitsOut::Entropy => {
                zeros = vec![F::zero(); rows];
                (&zeros, Some(&c))
            }
        };
        // An all-zero entropy cotangent (only the log-probs used) skips its term.
        let d_h = d_h.filter(|d| d.iter().any(|&x| x != F::zero()));
        let z = floats::<F>(&st.logits);
        let mut g = vec![F::zero(); rows * v];
        logits_backward(
            &z,
            rows,
            v,
            self.temperature,
            &st.targets,
            &st.lse,
            &st.entropy,
            d_lp,
            d_h,
            &mut g,
            threads_for(rows * v),
        )
        .expect("inputs validated by the forward");
        grads.register::<Nd>(node.id, wrap(g, &self.dims));
    }
}

#[allow(clippy::too_many_arguments)]
fn logits_backward<F: Real>(
    z: &[F],
    rows: usize,
    vocab: usize,
    t: Temperature,
    targets: &[i64],
    lse: &[F],
    h: &[F],
    d_lp: &[F],
    d_h: Option<&[F]>,
    g: &mut [F],
    threads: usize,
) -> Result<(), Error> {
    #[cfg(feature = "parallel")]
    if threads > 1 {
        return core_fused::parallel::log_probs_entropy_backward(
            z, rows, vocab, t, targets, lse, h, d_lp, d_h, g, threads,
        );
    }
    let _ = threads;
    core_fused::log_probs_entropy_backward(z, rows, vocab, t, targets, lse, h, d_lp, d_h, g)
}

#[allow(clippy::too_many_arguments)]
fn logits_forward<F: Real>(
    z: &[F],
    rows: usize,
    vocab: usize,
    t: Temperature,
    ids: &[i64],
    lp: &mut [F],
    h: &mut [F],
    lse: &mut [F],
    threads: usize,
) -> Result<(), Error> {
    #[cfg(feature = "parallel")]
    if threads > 1 {
        return core_fused::parallel::log_probs_entropy(
            z, rows, vocab, t, ids, lp, h, lse, threads,
        );
    }
    let _ = threads;
    core_fused::log_probs_entropy(z, rows, vocab, t, ids, lp, h, lse)
}

/// The fused log-probs / entropy op on an ndarray tensor (`targets = None`:
/// entropy only); `None` where the tensor path must run instead. The
/// outputs are on `logits`' device (recorded as one autodiff node when it
/// is an autodiff tensor): `(log p, H)` for [`LogitsOut::Both`], else
/// `(that output, the same)`.
pub(super) fn logits_op(
    logits: &Tensor<3>,
    targets: Option<&Tensor<2, Int>>,
    temperature: Temperature,
    out: LogitsOut,
) -> Option<(Tensor<2>, Tensor<2>)> {
    let [b, s, v] = logits.dims();
    if b * s == 0 || v == 0 {
        return None;
    }
    if targets.is_some_and(|t| t.dims() != [b, s]) {
        return None;
    }
    let z = prim(logits)?;
    if f32::holds(&z) {
        logits_on::<f32>(logits, z, targets, temperature, out)
    } else if f64::holds(&z) {
        logits_on::<f64>(logits, z, targets, temperature, out)
    } else {
        None
    }
}

fn logits_on<F: HostFloat + core::fmt::Debug>(
    logits: &Tensor<3>,
    z: NdArrayTensor,
    targets: Option<&Tensor<2, Int>>,
    temperature: Temperature,
    out: LogitsOut,
) -> Option<(Tensor<2>, Tensor<2>)> {
    let [b, s, v] = logits.dims();
    let rows = b * s;
    let ids: Vec<i64> = match targets {
        Some(t) => ids(&prim_int(t)?)?.into_owned(),
        // Entropy only: any valid id (its log-prob is dropped).
        None => vec![0; rows],
    };
    let mut lp = vec![F::zero(); rows];
    let mut h = vec![F::zero(); rows];
    let mut lse = vec![F::zero(); rows];
    // Out-of-range ids: `None`, for the tensor path's error.
    logits_forward(
        &floats::<F>(&z),
        rows,
        v,
        temperature,
        &ids,
        &mut lp,
        &mut h,
        &mut lse,
        threads_for(rows * v),
    )
    .ok()?;
    let value = match out {
        LogitsOut::LogProbs => wrap(lp, &[b, s]),
        LogitsOut::Entropy => wrap(h.clone(), &[b, s]),
        LogitsOut::Both => {
            let mut both = lp;
            both.extend_from_slice(&h);
            wrap(both, &[2, b, s])
        }
    };
    let op = LogitsNode {
        logits,
        vjp: HostLogitsVjp {
            out,
            temperature,
            dims: [b, s, v],
            elem: PhantomData,
        },
        state: LogitsState {
            logits: z,
            targets: Arc::new(ids),
            lse: Arc::new(lse),
            entropy: Arc::new(h),
        },
        value,
    };
    Some(match out {
        LogitsOut::Both => {
            let both: Tensor<3> = op.finish()?;
            let lp = both.clone().narrow(0, 0, 1).reshape([b, s]);
            let h = both.narrow(0, 1, 1).reshape([b, s]);
            (lp, h)
        }
        _ => {
            let x: Tensor<2> = op.finish()?;
            (x.clone(), x)
        }
    })
}

/// A computed logits-op value and what its backward node needs.
struct LogitsNode<'a, F> {
    logits: &'a Tensor<3>,
    vjp: HostLogitsVjp<F>,
    state: LogitsState<F>,
    value: NdArrayTensor,
}

impl<F: HostFloat + core::fmt::Debug> LogitsNode<'_, F> {
    /// The value as a tensor: recorded as a function of `logits` when that
    /// is an autodiff tensor, else plain.
    fn finish<const D: usize>(self) -> Option<Tensor<D>> {
        if !self.logits.is_autodiff() {
            return Some(Tensor::from_primitive::<Nd>(self.value));
        }
        match self.logits.gradient_checkpointing_strategy() {
            Some(GradientCheckpointingStrategy::Balanced) => {
                self.attach::<BalancedCheckpointing, D>()
            }
            _ => self.attach::<NoCheckpointing, D>(),
        }
    }

    fn attach<C: CheckpointStrategy, const D: usize>(self) -> Option<Tensor<D>>
    where
        DispatchTensor: DispatchKindConversion<Autodiff<Nd, C>>,
    {
        let node = self
            .logits
            .clone()
            .try_into_primitive::<Autodiff<Nd, C>>()
            .ok()?
            .node();
        let ad = match self.vjp.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(self.state, self.value),
            OpsKind::UnTracked(prep) => prep.finish(self.value),
        };
        Some(Tensor::from_primitive::<Autodiff<Nd, C>>(ad))
    }
}
