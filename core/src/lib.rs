//! # posttrain-core
//!
//! The math of LLM post-training — the losses and estimators behind RLHF/PPO,
//! DPO and its family, and GRPO and its family — as a `no_std` library that
//! reproduces TRL, verl, OpenRLHF and torchtune number for number, and gives
//! every differentiable op's **closed-form gradient** (a vector-Jacobian
//! product), so a framework without autodiff can train with it.
//!
//! ## Structure
//!
//! Three tiers, from what most users call to what backend authors implement:
//!
//! 1. **Ops** — one module per family, each opening with a table of its
//!    variants and the peers they match:
//!    [`policy`] (clipped surrogates: PPO, dual clip, clip-higher, GSPO, CISPO,
//!    SAPO, …; rollout correction), [`value`], [`preference`] (DPO family,
//!    KTO, ORPO, CPO, reward models), [`advantage`] (GAE, GRPO, RLOO,
//!    REINFORCE++, …), [`kl`] (k1/k2/k3, abs, straight-through), [`aggregate`]
//!    (loss aggregation modes with global normalizers), [`stats`] (masked
//!    statistics, whitening), [`logits`] (log-softmax, entropy), [`distill`],
//!    [`sequence`] (masks). Ops take slices of a row-major `[batch, seq]`
//!    matrix ([`Dims`]) plus boolean masks, write into caller-provided buffers,
//!    and never allocate in the hot path. Configs are validated once
//!    (`Config::new(..)?` or a [`Preset`]) and ops report bad input as an
//!    [`Error`], never a panic.
//! 2. **Kernels** — the per-token formulas (for example
//!    [`policy::ppo_clipped_surrogate`], [`kl::KlConfig::estimate`]), written
//!    once, generic over [`Elem`].
//! 3. **[`Elem`]** — the small element-wise algebra (`+ − × ÷`, `exp`, `ln`,
//!    `min`/`max`, comparisons, `select`) the kernels are written in. `f32`
//!    and `f64` implement it here; the `posttrain-burn` adapter implements it
//!    for burn tensors, so the *same* kernel bodies run on ndarray, wgpu and
//!    libtorch. Reductions (sums over rows or groups) are the drivers' part,
//!    not the kernels'.
//!
//! ## Masking
//!
//! Masked positions never influence a result or a gradient, even when they
//! hold NaN or ±inf: every op *selects* valid positions rather than
//! multiplying by a 0/1 mask. An all-masked reduction is 0 with a zero
//! gradient (several peers return NaN there; each op's docs say so).
//!
//! ## Crate features
//!
//! * `std` (default) — implies `alloc`; implements `std` conveniences.
//! * `alloc` — allocating convenience wrappers; the hot API never needs it.
//! * `serde` — `Serialize`/`Deserialize` for configs and option enums.
//! * `parallel` — implies `std`; `fused::parallel`, the fused kernels spread
//!   over threads.
//!
//! With `default-features = false` the crate is `no_std` and allocation-free;
//! math goes through `num-traits`' `libm` backend.
//!
//! ## Example
//!
//! ```
//! use posttrain_core::aggregate::{aggregate, AggMode, GlobalNorm};
//! use posttrain_core::policy::{ppo_clipped_surrogate, ClipConfig};
//! use posttrain_core::Dims;
//!
//! let dims = Dims::new(1, 3);
//! let (logp, old, adv) = ([-1.0f64, -0.5, -2.0], [-1.1f64, -0.4, -2.0], [1.0f64, 1.0, -1.0]);
//! let mask = [true, true, false];
//! let cfg = ClipConfig { eps_low: 0.2, eps_high: 0.28, dual_clip: Some(3.0), log_ratio_clamp: Some(20.0) };
//! let mut per_token = [0.0; 3];
//! let mut dtoken = [0.0; 3];
//! for i in 0..3 {
//!     let t = ppo_clipped_surrogate(&cfg, logp[i], old[i], adv[i]);
//!     per_token[i] = t.loss;
//!     dtoken[i] = t.grad;
//! }
//! let mut w = [0.0; 3];
//! let loss = aggregate(AggMode::TokenMean, &GlobalNorm::default(), dims, &per_token, &mask, Some(&mut w))?;
//! let grad: Vec<f64> = (0..3).map(|i| w[i] * dtoken[i]).collect();
//! assert!(loss < 0.0 && grad[2] == 0.0);
//! # Ok::<(), posttrain_core::Error>(())
//! ```
#![no_std]
// `unsafe` appears only for x86-64 intrinsics, each site marked with its SAFETY
// argument: calling the AVX2 and AVX-512 builds of the fused loops after a
// run-time CPU check (`fused`, feature `std`); the SSE streaming stores and
// `sfence` of `Real::copy_streaming` / `Real::stream_fence` (`elem`); the
// prefetch hint of the logits forward (`fused`). One more, not an intrinsic:
// the worker pool of the parallel drivers erases the lifetime of a call's
// blocks, which the call outlives (`pool`, feature `parallel`).
#![deny(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]
#![doc(test(attr(deny(warnings))))]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod advantage;
pub mod aggregate;
pub mod distill;
pub mod elem;
pub mod error;
pub mod fused;
pub mod kl;
pub mod logits;
pub mod policy;
#[cfg(feature = "parallel")]
mod pool;
pub mod preference;
pub mod preset;
pub mod sequence;
pub mod shape;
pub mod stats;
pub mod value;

pub use elem::{Elem, ElemExt, MaskElem, Real};
pub use error::Error;
pub use preset::Preset;
pub use shape::Dims;
