//! Fused ops: the core's closed-form gradient registered as a custom burn
//! backward op (feature `autodiff`).
//!
//! The plain ops of this crate ([`policy_loss`](crate::policy::policy_loss),
//! [`kl_loss`](crate::kl::kl_loss), [`selective_log_softmax`](crate::logits::selective_log_softmax),
//! [`entropy_from_logits`](crate::logits::entropy_from_logits),
//! [`paired_loss`](crate::preference::paired_loss)) are graphs of element-wise
//! tensor ops: on an autodiff device burn records every intermediate and
//! differentiates them one by one. The core, however, already returns each
//! op's gradient in closed form. The functions here evaluate the plain op
//! **once, without autodiff** (on the device's inner backend: value and
//! closed-form gradient together), and register a single burn backward node
//! whose backward is that closed form. `.backward()` on the returned tensor
//! then gives the core's gradient, and the autodiff graph holds one node per
//! op instead of dozens. (Without the `autodiff` feature this module is
//! empty.)
//!
//! | function | value | backward registered | core counterpart |
//! |---|---|---|---|
//! | `policy_loss_with_kl` | `pg_loss + coef · kl_loss` (verl actor with `use_kl_loss`) | `g · (∂pg/∂log π + coef · ∂kl/∂log π)`, stored from the forward | [`posttrain_core::policy::token`], [`posttrain_core::kl`] |
//! | `selective_log_softmax` | `log softmax(z/T)[t]` per position | `c · (1[k=t] − p)/T`, recomputed from the logits in backward | [`posttrain_core::logits`] |
//! | `entropy` | `H = −Σ p log p` per position | `−c · p (log p + H)`, recomputed from the logits in backward | [`posttrain_core::logits`] |
//! | `log_probs_and_entropy` | both of the above, of `z/T` | `(c_lp·(1[k=t] − p) − c_H·p (log p + H))/T`, one backward for both | [`posttrain_core::fused::log_probs_entropy`] |
//! | `paired_loss` | `(1/B) Σ lossᵢ` (DPO family on sequence log-probs) | `g · ∂loss/∂c`, `g · ∂loss/∂r`, stored from the forward | [`posttrain_core::preference::paired`] |
//!
//! (`g` / `c` is the incoming gradient of the op's output.)
//!
//! # How the backward op is registered (burn 0.22)
//!
//! In burn 0.22 `Tensor<D>` has no backend parameter: its primitive is a
//! `DispatchTensor` whose variant names the backend, and an autodiff tensor
//! is the variant `Autodiff(NdArray(AutodiffTensor<NdArray>))` (and likewise
//! for the cubecl and libtorch backends). burn's sanctioned path for custom
//! backward passes is the backend-extension API: `Tensor::try_into_primitive::<Autodiff<B, C>>()`
//! yields the `AutodiffTensor<B>` (burn-tensor `tensor/api/extension.rs`),
//! whose `node()` guard feeds `burn_autodiff::ops::Backward::prepare`;
//! `.compute_bound().stateful()` gives `OpsKind::Tracked`/`UnTracked`,
//! `finish(state, output)` records the node, and `Tensor::from_primitive::<Autodiff<B, C>>`
//! wraps the result back into a `Tensor<D>`. The backend `B` (ndarray, the
//! cubecl backend behind wgpu/vulkan/metal, or libtorch — whichever were
//! compiled in) and the checkpointing strategy `C` are picked at run time from
//! the input tensor. Inside the backward, incoming gradients are wrapped back
//! into plain `Tensor`s with `Tensor::from_primitive::<B>` so the VJP is
//! computed by this crate's (= the core's) closed-form code, not a second copy.
//!
//! Where this is in burn 0.22.1's sources:
//!
//! - burn-tensor `src/tensor/api/extension.rs`: `Tensor::try_into_primitive`
//!   ("for an autodiff tensor, we can get the wrapped … primitive on the
//!   `Autodiff<Wgpu>` backend") and `Tensor::from_primitive`, bounded by
//!   `DispatchTensor: DispatchKindConversion<B>`;
//! - burn-dispatch `src/tensor.rs`: `DispatchTensorKind::Autodiff(Box<…>)`
//!   and `impl_dispatch_conversion!`, which implements
//!   `DispatchKindConversion<Autodiff<B, C>>` for every compiled backend and
//!   both checkpointing strategies;
//! - burn-autodiff `src/ops/backward.rs` (`Backward`, `prepare`),
//!   `src/ops/base.rs` (`OpsPrep::compute_bound`, `stateful`, `OpsKind`,
//!   `finish`, `NodeGuard`), `src/tensor.rs` (`AutodiffTensor::node`),
//!   `src/grads.rs` (`Gradients::consume`, `register`); burn-autodiff's own
//!   `float_sum` (`src/ops/tensor.rs`) is the model for the scalar ops'
//!   backward (a one-element gradient broadcast against the saved VJP);
//! - burn-backend-extension `src/lib.rs` (`#[backend_extension]` docs):
//!   "Autodiff support for custom operations requires a handwritten
//!   implementation … for `Autodiff<B, C>`; this macro does not generate
//!   backward passes" — i.e. the hand-written `Backward` above is the
//!   intended mechanism; the macro only generates routing, which
//!   this module does by hand for the three backends (no extra cargo
//!   feature needed);
//! - burn-core `src/backend.rs` re-exports all of it as `burn::backend::…`
//!   (`burn::backend::autodiff` is the burn-autodiff crate).
//!
//! # Which inputs are differentiated
//!
//! Only the policy's log-probabilities (`log_prob`; `chosen`/`rejected` for
//! `paired_loss`; the logits for the log-softmax ops). The others
//! (old log-probs, advantages, reference log-probs, weights, lengths) are data
//! in every peer: passing one that is tracked by autodiff is an
//! [`Error::Invalid`](posttrain_core::Error::Invalid) rather than a silently
//! dropped gradient.
//!
//! # Gradients of stop-gradient losses
//!
//! DPPO, CISPO and GSPO (and the straight-through KL estimators) define their
//! gradient with a stop-gradient `sg(·)`: differentiating their *value* with
//! burn's autodiff gives a different (wrong) gradient. The fused ops register
//! the core's gradient, so they give the peers' gradient for these too.
//!
//! # The ndarray fast path
//!
//! On burn's ndarray backend (tensors of `f32` or `f64`) the ops do not run
//! burn tensor algebra at all: they read the tensors' host buffers in place
//! and call the core's fused single-pass kernels ([`posttrain_core::fused`];
//! on several threads with the `parallel` feature, a default), then wrap the
//! kernels' output buffers as tensors (no copy either way).
//!
//! - `policy_loss_with_kl`: [`posttrain_core::fused::token_loss`] gives the
//!   loss, the metrics and `∂L/∂log π` (the gradient the node registers);
//!   one more pass with the same per-token kernels fills the per-token
//!   tensors of [`PolicyLossOutput`](crate::policy::PolicyLossOutput) and
//!   [`KlLoss`](crate::kl::KlLoss) (`per_token`, `grad`).
//!   Token-local variants only: GSPO, GMPO, Clip-Cov and KL-Cov take the
//!   tensor path.
//! - `selective_log_softmax`, `entropy`, `log_probs_and_entropy`:
//!   [`posttrain_core::fused::log_probs_entropy`] (one read of the logits,
//!   online log-sum-exp) forward; the node keeps the logits handle, the
//!   targets and the rows' `lse` and `H`, and its backward is one
//!   [`posttrain_core::fused::log_probs_entropy_backward`] with both
//!   cotangents. Nothing `[batch, seq, vocab]` is held between forward and
//!   backward.
//!
//! Masked positions holding NaN or ±inf are handled as by the tensor path
//! (never read). A *valid* position holding NaN may get gradient 0 where the
//! tensor path gives NaN (the fused kernel treats an absent clamp as a clamp
//! at ±∞); its loss is NaN either way.
//! Other backends (wgpu, libtorch), mixed element types and inputs the
//! tensor path rejects (whose error it then returns) take the tensor path.
//!
//! # Cost (ndarray, CPU)
//!
//! `cargo run --release -p posttrain-bench -- --no-peers --only token_loss,logprobs`
//! times the fast path ("posttrain-burn fused, ndarray") next to the core
//! kernels it calls, forward + backward. On a 2-core x86_64 VM (2 threads):
//! the token loss `[256, 4096]` (PPO + k3 KL, seq-mean-token-mean) in 20 ms
//! (the fused kernel 5 ms; the pass filling the per-token output tensors
//! most of the rest), where verl's eager PyTorch takes 42 ms and the tensor
//! path 117 ms; log-probs + entropy of `[8, 512, 32000]` logits forward +
//! backward in 0.43 s (core kernels 0.32 s), where PyTorch's
//! `F.cross_entropy` + entropy takes 2.3 s and the tensor path 15 s.
//!
//! The tensor path (the other backends) still evaluates each op as a graph
//! of element-wise tensor ops, once, without autodiff: `cargo bench -p
//! posttrain-burn --features autodiff --bench fused` compares it with
//! burn's autodiff of the same graph (forward + backward time, peak heap,
//! heap held between forward and backward; `backends/benches/fused-ndarray.txt`
//! holds a run from before the fast path, on the tensor path).
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "autodiff")] {
//! use posttrain_burn::{device, fused, mask2, tensor2, to_vec};
//! use posttrain_core::aggregate::{AggMode, GlobalNorm};
//! use posttrain_core::kl::KlConfig;
//! use posttrain_core::policy::token::{PolicyLoss, PolicyLossMode, VerlPolicyParams};
//! let dev = device()?.autodiff();
//! let loss = PolicyLoss::from_verl(PolicyLossMode::Vanilla, &VerlPolicyParams::default())?;
//! let lp = tensor2(&[-1.0, -0.5, f64::NAN], [1, 3], &dev)?.require_grad();
//! let old = tensor2(&[-1.1, -0.4, 0.0], [1, 3], &dev)?;
//! let adv = tensor2(&[1.0, -1.0, 0.0], [1, 3], &dev)?;
//! let rf = tensor2(&[-1.2, -0.6, 0.0], [1, 3], &dev)?;
//! let mask = mask2(&[true, true, false], [1, 3], &dev)?;
//! let kl = fused::KlPenalty { config: KlConfig::parse_verl("low_var_kl")?, coef: 0.1, ref_log_prob: rf };
//! let out = fused::policy_loss_with_kl(
//!     &loss, AggMode::TokenMean, &GlobalNorm::default(), lp.clone(), old, adv, &mask, None, Some(kl),
//! )?;
//! let grads = out.loss.backward();
//! let g = to_vec(lp.grad(&grads).unwrap());
//! assert_eq!(g[2], 0.0); // the masked NaN never leaks
//! assert!(g[0] < 0.0);   // positive advantage: raise log π
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(all(feature = "autodiff", feature = "ndarray"))]
mod host;

#[cfg(feature = "autodiff")]
mod imp {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::{
        BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
    };
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::{
        Autodiff, Backend, DispatchKindConversion, DispatchTensor, GradientCheckpointingStrategy,
        TensorMetadata,
    };
    use burn::tensor::{Bool, Int, Shape, Tensor};
    use posttrain_core::aggregate::{AggMode, GlobalNorm};
    use posttrain_core::kl::KlConfig;
    use posttrain_core::logits::Temperature;
    use posttrain_core::policy::token::PolicyLoss;
    use posttrain_core::preference::paired::{LossTerm, PairedConfig};
    use posttrain_core::Error;

    use crate::kl::{kl_loss, KlLoss};
    use crate::logits::{
        check_log_probs_inputs, entropy_from_logits, log_probs_entropy_rows, log_probs_entropy_vjp,
        selective_log_softmax as plain_log_softmax,
    };
    use crate::policy::{policy_loss, PolicyLossOutput};
    use crate::preference::{paired_loss as plain_paired_loss, PairTensors, PairedTensorOutput};

    // ---------------------------------------------------------------------
    // Routing: from a dispatch `Tensor` to the concrete `Autodiff<B, C>`.
    // ---------------------------------------------------------------------

    /// An op body generic over the concrete backend `B` and the checkpointing
    /// strategy `C` of the autodiff device (picked at run time by [`route`]).
    trait Fuse {
        type Out;
        fn run<B: Backend, C: CheckpointStrategy>(self) -> Self::Out
        where
            DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B, C>>;
    }

    /// Whether `t` lives on `Autodiff<B, C>` (a cheap clone: primitives are
    /// reference-counted).
    fn on<B: Backend, C: CheckpointStrategy, const D: usize>(t: &Tensor<D>) -> bool
    where
        DispatchTensor: DispatchKindConversion<Autodiff<B, C>>,
    {
        t.clone().try_into_primitive::<Autodiff<B, C>>().is_ok()
    }

    /// Runs `op` on the concrete backend of the autodiff tensor `probe`.
    #[allow(deprecated)] // burn 0.22 deprecates the ndarray and tch backends
    fn route<F: Fuse, const D: usize>(probe: &Tensor<D>, op: F) -> Result<F::Out, Error> {
        macro_rules! try_backend {
            ($b:ty) => {
                match probe.gradient_checkpointing_strategy() {
                    Some(GradientCheckpointingStrategy::Balanced) => {
                        if on::<$b, BalancedCheckpointing, D>(probe) {
                            return Ok(op.run::<$b, BalancedCheckpointing>());
                        }
                    }
                    _ => {
                        if on::<$b, NoCheckpointing, D>(probe) {
                            return Ok(op.run::<$b, NoCheckpointing>());
                        }
                    }
                }
            };
        }
        #[cfg(feature = "ndarray")]
        try_backend!(burn::backend::NdArray);
        #[cfg(any(feature = "wgpu", feature = "vulkan", feature = "metal"))]
        try_backend!(burn::backend::Cube);
        #[cfg(feature = "tch")]
        try_backend!(burn::backend::LibTorch);
        let _ = op;
        Err(Error::Invalid {
            input: "device",
            rule: "fused ops need an autodiff tensor on a backend compiled into posttrain-burn",
        })
    }

    /// `Err` if a tensor the fused op treats as data is tracked by autodiff.
    fn constant<const D: usize>(input: &'static str, t: &Tensor<D>) -> Result<(), Error> {
        if t.is_tracked() {
            return Err(Error::Invalid {
                input,
                rule: "fused ops differentiate the policy log-probabilities only: this input must not be tracked by autodiff (detach it)",
            });
        }
        Ok(())
    }

    fn inner_opt<const D: usize>(t: Option<Tensor<D>>) -> Option<Tensor<D>> {
        t.map(Tensor::inner)
    }

    /// The `[1, …, 1]` view of a one-element gradient, for broadcasting
    /// against a rank-`rank` tensor (as burn's own `float_sum` backward does).
    fn scalar_like<B: Backend>(g: B::FloatTensorPrimitive, rank: usize) -> B::FloatTensorPrimitive {
        B::float_reshape(g, core::iter::repeat_n(1usize, rank).collect::<Shape>())
    }

    // ---------------------------------------------------------------------
    // Backward ops.
    // ---------------------------------------------------------------------

    /// Backward of a scalar loss whose gradient with respect to each of its
    /// `N` inputs was computed in closed form by the forward: the state holds
    /// `∂L/∂xᵢ` and the backward registers `g · ∂L/∂xᵢ`.
    #[derive(Debug)]
    struct ScalarVjp;

    impl<B: Backend, const N: usize> Backward<B, N> for ScalarVjp {
        type State = Vec<B::FloatTensorPrimitive>;

        fn backward(
            self,
            ops: Ops<Self::State, N>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let g = grads.consume::<B>(&ops.node);
            for (parent, vjp) in ops.parents.into_iter().zip(ops.state) {
                if let Some(node) = parent {
                    let rank = vjp.shape().num_dims();
                    let g = scalar_like::<B>(g.clone(), rank);
                    grads.register::<B>(node.id, B::float_mul(vjp, g));
                }
            }
        }
    }

    /// Records `value` (computed without autodiff) as a function of the
    /// autodiff tensors `inputs`, with `vjps[i] = ∂value/∂inputs[i]`.
    fn attach_scalar<B, C, const D: usize, const N: usize>(
        value: Tensor<1>,
        inputs: [Tensor<D>; N],
        vjps: [Tensor<D>; N],
    ) -> Tensor<1>
    where
        B: Backend,
        C: CheckpointStrategy,
        DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B, C>>,
    {
        let nodes = inputs.map(|t| {
            t.try_into_primitive::<Autodiff<B, C>>()
                .expect("routed to this backend")
                .node()
        });
        let out = value
            .try_into_primitive::<B>()
            .expect("the inner backend of the routed one");
        let ad = match ScalarVjp.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let state = vjps
                    .into_iter()
                    .map(|g| g.try_into_primitive::<B>().expect("inner backend"))
                    .collect();
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive::<Autodiff<B, C>>(ad)
    }

    /// What a logits op recomputes its VJP from: the logits (shared with the
    /// caller's tensor: no copy) and, for the log-softmax, the targets.
    #[derive(Debug, Clone, Copy)]
    enum LogitsOp {
        LogSoftmax(Temperature),
        Entropy,
    }

    /// Backward of a per-position logits op: the incoming gradient `c`
    /// (`[batch, seq]`) is the cotangent of the plain op's closed-form VJP,
    /// recomputed from the saved logits.
    #[derive(Debug)]
    struct LogitsVjp(LogitsOp);

    impl<B: Backend> Backward<B, 1> for LogitsVjp
    where
        DispatchTensor: DispatchKindConversion<B>,
    {
        type State = (B::FloatTensorPrimitive, Option<B::IntTensorPrimitive>);

        fn backward(
            self,
            ops: Ops<Self::State, 1>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let cot = grads.consume::<B>(&ops.node);
            let [Some(node)] = ops.parents else {
                return;
            };
            let (z, t) = ops.state;
            let z = Tensor::<3>::from_primitive::<B>(z);
            let c = Some(Tensor::<2>::from_primitive::<B>(cot));
            let g = match (self.0, t) {
                (LogitsOp::LogSoftmax(temp), Some(t)) => {
                    plain_log_softmax(z, Tensor::<2, Int>::from_primitive::<B>(t), temp, c)
                }
                _ => entropy_from_logits(z, c),
            }
            .expect("inputs validated by the forward")
            .1
            .expect("a cotangent was given");
            grads.register::<B>(node.id, g.try_into_primitive::<B>().expect("inner backend"));
        }
    }

    struct LogitsFuse {
        op: LogitsOp,
        logits: Tensor<3>,
        targets: Option<Tensor<2, Int>>,
        value: Tensor<2>,
    }

    /// Records `value` (computed without autodiff on the inner backend) as
    /// a one-parent node on the autodiff `logits`, whose backward `vjp`
    /// recomputes its VJP from the state that `state` builds out of the
    /// logits' inner primitive (only when the logits are tracked).
    fn attach_logits_node<B, C, V, const D: usize>(
        logits: Tensor<3>,
        value: Tensor<D>,
        vjp: V,
        state: impl FnOnce(B::FloatTensorPrimitive) -> V::State,
    ) -> Tensor<D>
    where
        B: Backend,
        C: CheckpointStrategy,
        V: Backward<B, 1>,
        DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B, C>>,
    {
        let node = logits
            .clone()
            .try_into_primitive::<Autodiff<B, C>>()
            .expect("routed to this backend")
            .node();
        let out = value.try_into_primitive::<B>().expect("inner backend");
        let ad = match vjp.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let z = logits
                    .inner()
                    .try_into_primitive::<B>()
                    .expect("inner backend");
                prep.finish(state(z), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive::<Autodiff<B, C>>(ad)
    }

    impl Fuse for LogitsFuse {
        type Out = Tensor<2>;
        fn run<B: Backend, C: CheckpointStrategy>(self) -> Tensor<2>
        where
            DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B, C>>,
        {
            let targets = self.targets;
            attach_logits_node::<B, C, _, 2>(self.logits, self.value, LogitsVjp(self.op), |z| {
                let t =
                    targets.map(|t| t.inner().try_into_primitive::<B>().expect("inner backend"));
                (z, t)
            })
        }
    }

    /// Backward of [`log_probs_and_entropy`]'s single node: its output is
    /// `[batch, seq, 2]` (`log p[t]`, `H`), the incoming gradient likewise;
    /// the VJP of both is recomputed from the logits handle, the targets and
    /// the rows' `H` ([`logits::log_probs_entropy_vjp`](crate::logits)).
    #[derive(Debug)]
    struct LogProbsEntropyVjp(f64);

    impl<B: Backend> Backward<B, 1> for LogProbsEntropyVjp
    where
        DispatchTensor: DispatchKindConversion<B>,
    {
        /// Logits, targets `[b, s, 1]`, `H` `[b, s, 1]`.
        type State = (
            B::FloatTensorPrimitive,
            B::IntTensorPrimitive,
            B::FloatTensorPrimitive,
        );

        fn backward(
            self,
            ops: Ops<Self::State, 1>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let cot = grads.consume::<B>(&ops.node);
            let [Some(node)] = ops.parents else {
                return;
            };
            let (z, idx, h) = ops.state;
            let cot = Tensor::<3>::from_primitive::<B>(cot);
            let c_lp = cot.clone().narrow(2, 0, 1);
            let c_h = cot.narrow(2, 1, 1);
            let g = log_probs_entropy_vjp(
                Tensor::<3>::from_primitive::<B>(z),
                Tensor::<3, Int>::from_primitive::<B>(idx),
                Tensor::<3>::from_primitive::<B>(h),
                c_lp,
                c_h,
                self.0,
            );
            grads.register::<B>(node.id, g.try_into_primitive::<B>().expect("inner backend"));
        }
    }

    struct LogProbsEntropyFuse {
        t: f64,
        logits: Tensor<3>,
        idx: Tensor<3, Int>,
        h: Tensor<3>,
        value: Tensor<3>,
    }

    impl Fuse for LogProbsEntropyFuse {
        type Out = Tensor<3>;
        fn run<B: Backend, C: CheckpointStrategy>(self) -> Tensor<3>
        where
            DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B, C>>,
        {
            let (idx, h) = (self.idx, self.h);
            let vjp = LogProbsEntropyVjp(self.t);
            attach_logits_node::<B, C, _, 3>(self.logits, self.value, vjp, |z| {
                let idx = idx.try_into_primitive::<B>().expect("inner backend");
                let h = h.try_into_primitive::<B>().expect("inner backend");
                (z, idx, h)
            })
        }
    }

    struct ScalarFuse<const D: usize, const N: usize> {
        value: Tensor<1>,
        inputs: [Tensor<D>; N],
        vjps: [Tensor<D>; N],
    }

    impl<const D: usize, const N: usize> Fuse for ScalarFuse<D, N> {
        type Out = Tensor<1>;
        fn run<B: Backend, C: CheckpointStrategy>(self) -> Tensor<1>
        where
            DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B, C>>,
        {
            attach_scalar::<B, C, D, N>(self.value, self.inputs, self.vjps)
        }
    }

    // ---------------------------------------------------------------------
    // Public ops.
    // ---------------------------------------------------------------------

    /// The KL penalty of [`policy_loss_with_kl`]: `coef · kl_loss(config)`
    /// against the reference policy.
    #[derive(Debug, Clone)]
    pub struct KlPenalty {
        /// The estimator (verl `kl_loss_type`), see [`KlConfig`].
        pub config: KlConfig,
        /// verl `kl_loss_coef` (finite).
        pub coef: f64,
        /// `log π_ref`, `[batch, seq]` (data: not tracked by autodiff).
        pub ref_log_prob: Tensor<2>,
    }

    /// What [`policy_loss_with_kl`] returns.
    #[derive(Debug, Clone)]
    pub struct FusedPolicyOutput {
        /// `pg_loss + coef · kl_loss`, `[1]`, on the inputs' autodiff device:
        /// its `.backward()` gives the closed-form gradient in `log π`.
        pub loss: Tensor<1>,
        /// The policy loss with its gradient and verl's metrics, on the inner
        /// (non-autodiff) device.
        pub policy: PolicyLossOutput,
        /// The KL loss with its gradient (inner device), when a penalty was given.
        pub kl: Option<KlLoss>,
    }

    /// A token-level policy loss plus a KL penalty, as one fused autodiff op.
    ///
    /// # Formula
    ///
    /// `L = policy_loss(loss, agg) + coef · kl_loss(config, agg)`, exactly
    /// [`policy_loss`](crate::policy::policy_loss) and
    /// [`kl_loss`](crate::kl::kl_loss) (verl's actor: `pg_loss + kl_loss ·
    /// kl_loss_coef`, both aggregated with `loss_agg_mode`), evaluated once
    /// on the inner backend.
    ///
    /// # Gradient
    ///
    /// `∂L/∂log π = ∂pg/∂log π + coef · ∂kl/∂log π` — the two ops' closed-form
    /// gradients (the core's VJPs, stop-gradients included) — stored by the
    /// forward; the registered backward multiplies it by the incoming
    /// gradient. On a device without autodiff the loss is returned as is.
    ///
    /// # Peers
    ///
    /// verl `dp_actor.update_policy` (policy loss + `use_kl_loss`).
    ///
    /// # Errors
    ///
    /// Those of [`policy_loss`](crate::policy::policy_loss) and
    /// [`kl_loss`](crate::kl::kl_loss); [`Error::OutOfRange`] for a
    /// non-finite `coef`; [`Error::Invalid`] if `old_log_prob`,
    /// `advantages`, `is_weights` or `ref_log_prob` is tracked by autodiff.
    #[allow(clippy::too_many_arguments)]
    pub fn policy_loss_with_kl(
        loss: &PolicyLoss,
        agg: AggMode,
        norm: &GlobalNorm,
        log_prob: Tensor<2>,
        old_log_prob: Tensor<2>,
        advantages: Tensor<2>,
        mask: &Tensor<2, Bool>,
        is_weights: Option<Tensor<2>>,
        kl: Option<KlPenalty>,
    ) -> Result<FusedPolicyOutput, Error> {
        constant("old_log_prob", &old_log_prob)?;
        constant("advantages", &advantages)?;
        if let Some(w) = &is_weights {
            constant("rollout_is_weights", w)?;
        }
        if let Some(k) = &kl {
            constant("ref_log_prob", &k.ref_log_prob)?;
            if !k.coef.is_finite() {
                return Err(Error::OutOfRange {
                    param: "kl_loss_coef",
                    value: k.coef,
                    rule: "must be finite",
                });
            }
        }
        #[cfg(feature = "ndarray")]
        if let Some(fast) = super::host::policy_loss_with_kl(
            loss,
            agg,
            norm,
            &log_prob,
            &old_log_prob,
            &advantages,
            mask,
            is_weights.as_ref(),
            kl.as_ref().map(|k| (k.config, k.coef, &k.ref_log_prob)),
        ) {
            let fast = fast?;
            let loss = if log_prob.is_autodiff() {
                route(
                    &log_prob,
                    ScalarFuse {
                        value: fast.value,
                        inputs: [log_prob.clone()],
                        vjps: [fast.grad],
                    },
                )?
            } else {
                fast.value
            };
            return Ok(FusedPolicyOutput {
                loss,
                policy: fast.policy,
                kl: fast.kl,
            });
        }
        let mask_in = mask.clone().inner();
        let lp = log_prob.clone().inner();
        let policy = policy_loss(
            loss,
            agg,
            norm,
            lp.clone(),
            old_log_prob.inner(),
            advantages.inner(),
            &mask_in,
            inner_opt(is_weights),
        )?;
        let (value, grad, kl) = match kl {
            Some(k) => {
                let kl = kl_loss(&k.config, agg, norm, lp, k.ref_log_prob.inner(), &mask_in)?;
                (
                    policy.loss.clone() + kl.value.clone().mul_scalar(k.coef),
                    policy.grad.clone() + kl.grad.clone().mul_scalar(k.coef),
                    Some(kl),
                )
            }
            None => (policy.loss.clone(), policy.grad.clone(), None),
        };
        let loss = if log_prob.is_autodiff() {
            route(
                &log_prob,
                ScalarFuse {
                    value,
                    inputs: [log_prob.clone()],
                    vjps: [grad],
                },
            )?
        } else {
            value
        };
        Ok(FusedPolicyOutput { loss, policy, kl })
    }

    /// Selective log-softmax as one fused autodiff op.
    ///
    /// # Formula
    ///
    /// `out[b, s] = z[b, s, t]/T − lse(z[b, s, :]/T)`, computed by
    /// [`logits::selective_log_softmax`](crate::logits::selective_log_softmax)
    /// on the inner backend.
    ///
    /// # Gradient
    ///
    /// The backward node keeps only a handle on the logits and targets
    /// (shared with the caller's tensors) and, given the incoming gradient
    /// `c`, recomputes the closed form `c · (1[k = t] − p)/T` with the same
    /// function — no `[batch, seq, vocab]` intermediate is held between
    /// forward and backward.
    ///
    /// # Peers
    ///
    /// TRL `selective_log_softmax`, verl `logprobs_from_logits`, OpenRLHF
    /// `log_probs_from_logits`, torchtune `logits_to_logprobs`.
    ///
    /// # Errors
    ///
    /// Those of [`logits::selective_log_softmax`](crate::logits::selective_log_softmax).
    pub fn selective_log_softmax(
        logits: Tensor<3>,
        targets: Tensor<2, Int>,
        temperature: Temperature,
    ) -> Result<Tensor<2>, Error> {
        #[cfg(feature = "ndarray")]
        if let Some((lp, _)) = super::host::logits_op(
            &logits,
            Some(&targets),
            temperature,
            super::host::LogitsOut::LogProbs,
        ) {
            return Ok(lp);
        }
        let targets = targets.inner();
        let (value, _) =
            plain_log_softmax(logits.clone().inner(), targets.clone(), temperature, None)?;
        if !logits.is_autodiff() {
            return Ok(value);
        }
        route(
            &logits,
            LogitsFuse {
                op: LogitsOp::LogSoftmax(temperature),
                logits: logits.clone(),
                targets: Some(targets),
                value,
            },
        )
    }

    /// The entropy of each position's softmax as one fused autodiff op.
    ///
    /// # Formula
    ///
    /// `H = −Σₖ pₖ log pₖ` ([`logits::entropy_from_logits`](crate::logits::entropy_from_logits)
    /// on the inner backend).
    ///
    /// # Gradient
    ///
    /// `∂H/∂zₖ = −c · pₖ (log pₖ + H)` recomputed in the backward from the
    /// saved logits handle (as [`selective_log_softmax`]).
    ///
    /// # Peers
    ///
    /// TRL and verl `entropy_from_logits`, OpenRLHF `compute_entropy`.
    ///
    /// # Errors
    ///
    /// Those of [`logits::entropy_from_logits`](crate::logits::entropy_from_logits).
    pub fn entropy(logits: Tensor<3>) -> Result<Tensor<2>, Error> {
        #[cfg(feature = "ndarray")]
        if let Some((h, _)) = super::host::logits_op(
            &logits,
            None,
            Temperature::ONE,
            super::host::LogitsOut::Entropy,
        ) {
            return Ok(h);
        }
        let (value, _) = entropy_from_logits(logits.clone().inner(), None)?;
        if !logits.is_autodiff() {
            return Ok(value);
        }
        route(
            &logits,
            LogitsFuse {
                op: LogitsOp::Entropy,
                logits: logits.clone(),
                targets: None,
                value,
            },
        )
    }

    /// Log-probabilities of the targets **and** the entropy of each
    /// position's softmax, as one fused autodiff op.
    ///
    /// # Formula
    ///
    /// With `y = z/T`, `p = softmax(y)`: `(log p[t], H = −Σₖ pₖ log pₖ)` per
    /// position — [`selective_log_softmax`] and the entropy of the
    /// temperature-scaled logits (as TRL and verl compute it, on the logits
    /// already divided by `T`; `T = 1`: [`entropy`]).
    ///
    /// # Gradient
    ///
    /// Given the cotangents `c_lp` and `c_H` of both outputs:
    /// `(c_lp·(1[k = t] − pₖ) − c_H·pₖ(log pₖ + H)) / T`.
    ///
    /// # Cost
    ///
    /// On the ndarray backend both outputs come from one read of the logits
    /// ([`posttrain_core::fused::log_probs_entropy`]) and the backward is one
    /// more ([`posttrain_core::fused::log_probs_entropy_backward`], both
    /// cotangents at once): the node keeps a handle on the logits and the
    /// rows' `lse` and `H`, nothing `[batch, seq, vocab]`. On the other
    /// backends it is one autodiff node too (output `[batch, seq, 2]`, split
    /// by two narrow views): the forward is the backend's `log_softmax` (one
    /// kernel on libtorch) plus a gather, an `exp`, a product and a sum; the
    /// backward recomputes the `log_softmax` and adds five element-wise
    /// passes ([`logits::log_probs_entropy_vjp`](crate::logits)); it keeps
    /// the logits handle, the targets and `H`.
    ///
    /// # Non-finite logits
    ///
    /// `−∞` logits (banned tokens) are exact everywhere. On the tensor path
    /// (wgpu, libtorch) a row holding `+∞` or NaN gives NaN outputs and
    /// gradients, as torch's `log_softmax` does; the single-output
    /// [`selective_log_softmax`] and [`entropy`] and the ndarray kernels
    /// give that row `−∞` log-probs and `H = 0` (the core's selections).
    ///
    /// # Peers
    ///
    /// TRL `selective_log_softmax` + `entropy_from_logits`, verl
    /// `logprobs_from_logits` + `entropy_from_logits` (`calculate_entropy`).
    ///
    /// # Errors
    ///
    /// Those of [`logits::selective_log_softmax`](crate::logits::selective_log_softmax).
    pub fn log_probs_and_entropy(
        logits: Tensor<3>,
        targets: Tensor<2, Int>,
        temperature: Temperature,
    ) -> Result<(Tensor<2>, Tensor<2>), Error> {
        #[cfg(feature = "ndarray")]
        if let Some(both) = super::host::logits_op(
            &logits,
            Some(&targets),
            temperature,
            super::host::LogitsOut::Both,
        ) {
            return Ok(both);
        }
        check_log_probs_inputs(&logits, &targets)?;
        let t = temperature.get();
        let idx = targets.inner().unsqueeze_dim::<3>(2);
        let (lp, h) = log_probs_entropy_rows(logits.clone().inner(), idx.clone(), t);
        let split = |both: Tensor<3>| {
            (
                both.clone().narrow(2, 0, 1).squeeze_dim::<2>(2),
                both.narrow(2, 1, 1).squeeze_dim::<2>(2),
            )
        };
        if !logits.is_autodiff() {
            return Ok((lp.squeeze_dim::<2>(2), h.squeeze_dim::<2>(2)));
        }
        let value = Tensor::cat(vec![lp, h.clone()], 2);
        let both = route(
            &logits,
            LogProbsEntropyFuse {
                t,
                logits: logits.clone(),
                idx,
                h,
                value,
            },
        )?;
        Ok(split(both))
    }

    /// What [`paired_loss`] returns.
    #[derive(Debug, Clone)]
    pub struct FusedPairedOutput {
        /// The batch-mean loss, `[1]`, on the inputs' autodiff device.
        pub loss: Tensor<1>,
        /// The plain op's outputs (per-pair losses, gradients, rewards) on the
        /// inner device.
        pub paired: PairedTensorOutput,
    }

    /// A paired preference loss (DPO family) as one fused autodiff op.
    ///
    /// # Formula
    ///
    /// `loss = (1/B) Σᵢ lossᵢ`, exactly [`preference::paired_loss`](crate::preference::paired_loss)
    /// on the inner backend.
    ///
    /// # Gradient
    ///
    /// `g · ∂loss/∂cᵢ`, `g · ∂loss/∂rᵢ`: the core's closed-form gradients
    /// (`grad_chosen`, `grad_rejected`) stored by the forward.
    ///
    /// # Peers
    ///
    /// TRL `DPOTrainer`, OpenRLHF `DPOLoss`, torchtune `DPOLoss` and
    /// relatives (see the core).
    ///
    /// # Errors
    ///
    /// Those of [`preference::paired_loss`](crate::preference::paired_loss);
    /// [`Error::Invalid`] if the reference log-probs, lengths or pair
    /// weights are tracked by autodiff.
    pub fn paired_loss(
        cfg: &PairedConfig,
        terms: &[LossTerm],
        batch: PairTensors,
    ) -> Result<FusedPairedOutput, Error> {
        if let Some((c0, r0)) = &batch.reference {
            constant("reference_chosen_logps", c0)?;
            constant("reference_rejected_logps", r0)?;
        }
        if let Some((a, b)) = &batch.lengths {
            constant("chosen_len", a)?;
            constant("rejected_len", b)?;
        }
        if let Some(w) = &batch.pair_weight {
            constant("pair_weight", w)?;
        }
        if batch.sft.is_some() {
            return Err(Error::Invalid {
                input: "sft",
                rule: "the fused DPO path takes no SFT term (its gradient flows to other \
                       inputs); use preference::paired_loss for losses with an SFT term",
            });
        }
        let (c, r) = (batch.policy_chosen.clone(), batch.policy_rejected.clone());
        let inner = PairTensors {
            policy_chosen: c.clone().inner(),
            policy_rejected: r.clone().inner(),
            reference: batch.reference.map(|(a, b)| (a.inner(), b.inner())),
            lengths: batch.lengths.map(|(a, b)| (a.inner(), b.inner())),
            pair_weight: inner_opt(batch.pair_weight),
            sft: None,
        };
        let paired = plain_paired_loss(cfg, terms, inner)?;
        let loss = if c.is_autodiff() || r.is_autodiff() {
            // `autodiff()` is idempotent: a plain input becomes an untracked leaf.
            let (c, r) = (c.autodiff(), r.autodiff());
            route(
                &c,
                ScalarFuse {
                    value: paired.loss.clone(),
                    inputs: [c.clone(), r],
                    vjps: [paired.grad_chosen.clone(), paired.grad_rejected.clone()],
                },
            )?
        } else {
            paired.loss.clone()
        };
        Ok(FusedPairedOutput { loss, paired })
    }
}

#[cfg(feature = "autodiff")]
pub use imp::*;
