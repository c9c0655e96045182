//! # posttrain-burn
//!
//! posttrain's loss math on [burn](https://burn.dev) tensors: the *same*
//! formulas as [`posttrain_core`], evaluated on whole `[batch, seq]` tensors on
//! ndarray (CPU), wgpu (Vulkan / Metal / DX12) or libtorch, each op returning
//! its value **and** its closed-form gradient as tensors.
//!
//! ## Design
//!
//! There is no second copy of the math. The core writes every per-token
//! formula once, generic over [`posttrain_core::Elem`]; this crate
//! implements `Elem` for burn tensors — through the zero-cost wrappers
//! [`ElemTensor<D>`] / [`ElemMask<D>`] around `Tensor<D>` / `Tensor<D, Bool>`
//! (the orphan rule forbids implementing a core trait for a burn type here
//! directly); `select` is `mask_where` — so a core kernel such as
//! [`ppo_clipped_surrogate`](posttrain_core::policy::ppo_clipped_surrogate) or
//! [`KlConfig::estimate`](posttrain_core::kl::KlConfig::estimate) runs
//! unchanged as one graph of element-wise tensor ops. What the core's slice
//! drivers do with loops — row sums, valid-token counts, the aggregation
//! weights, the log-sum-exp of a logits row — is written here as tensor
//! reductions (`sum_dim`, `max_dim`, `gather`), following the drivers'
//! formulas line by line; the tests check every op against the core's `f64`
//! slice driver.
//!
//! | module | ops | core counterpart |
//! |---|---|---|
//! | [`kl`] | per-token KL estimates, aggregated KL loss | [`posttrain_core::kl`] |
//! | [`aggregate`] | aggregation weights and the aggregated loss | [`posttrain_core::aggregate`] |
//! | [`policy`] | token-level policy losses (verl's registry: PPO, DPPO, SAPO, GPG, DRO, CISPO, GSPO, clip-cov, KL-cov, geo-mean) with verl's metrics; OpenRLHF's clipped policy loss | [`posttrain_core::policy::token`], [`posttrain_core::policy::ppo`] |
//! | [`grpo`] | TRL GRPO/DAPO/Dr. GRPO/GSPO/GMPO/RLOO/VESPO losses, torchtune GRPO losses (tokens, logits, hidden states) | [`posttrain_core::policy::grpo`], [`posttrain_core::policy::sequence_mean`] |
//! | [`rollout`] | rollout importance weights, rejection masks, bypass-mode loss, TRL's vLLM IS ratio | [`posttrain_core::policy::rollout`] |
//! | [`value`] | clipped value losses, torchtune's joint policy + value PPO loss | [`posttrain_core::value`] |
//! | [`advantage`] | group advantages (GRPO, Dr. GRPO, RLOO, GPG, OPO, pass@k, GDPO, REINFORCE++, ReMax, OTB), GAE and returns, KL-penalised rewards, score at EOS, the KL controller | [`posttrain_core::advantage`], [`posttrain_core::kl`] |
//! | [`preference`] | DPO family (paired, AOT, SFT terms; from sequence log-probs or logits), reward-model, KTO, BCO, PRM, CPO, ORPO losses | [`posttrain_core::preference`] |
//! | [`logits`] | selective/top-k log-softmax, entropy, Σπ², sequence log-probs, entropy loss (max-shifted, stable) | [`posttrain_core::logits`] |
//! | [`distill`] | generalized JSD (elementwise, loss, from log-probs), KD loss | [`posttrain_core::distill`] |
//! | [`sequence`] | response masks, stop-token truncation, reward-penalty, high-entropy and off-policy masks, PF-PPO weights | [`posttrain_core::sequence`] |
//! | [`stats`] | masked sum/mean/variance/whitening, nan-std/max/min | [`posttrain_core::stats`] |
//! | [`fused`] | the hot ops with the core's closed-form backward registered as a custom burn autodiff op (feature `autodiff`) | — |
//! | [`precision`] | f16/bf16 evaluation and its tolerances | — |
//!
//! Every op takes its `[batch, seq]` inputs as `Tensor<2>` plus a
//! `Tensor<2, Bool>` mask (`[batch, seq, vocab]` `Tensor<3>` logits for
//! [`logits`]), checks the shapes (a [`posttrain_core::Error`], never a
//! panic), and returns the value and `∂value/∂input` as tensors on the
//! inputs' device.
//!
//! ## Masking
//!
//! Masked positions are *selected* away (`mask_where`), never multiplied by a
//! 0/1 mask, so NaN or ±inf in padding never reaches a value or a gradient,
//! exactly as in the core.
//!
//! ## Features
//!
//! | feature | backend | device |
//! |---|---|---|
//! | `ndarray` (default) | pure-Rust CPU | `Device::ndarray()` |
//! | `wgpu` | GPU via wgpu (API picked at run time) | `Device::wgpu(DeviceKind::DefaultDevice)` |
//! | `vulkan` | wgpu pinned to Vulkan (SPIR-V) | `Device::vulkan(..)` |
//! | `metal` | wgpu pinned to Metal (MSL) | `Device::metal(..)` |
//! | `tch` | libtorch (needs a libtorch install) | `Device::libtorch()` |
//! | `autodiff` | burn's autodiff wrapper | `device()?.autodiff()` |
//!
//! `cargo test` at the workspace root builds the ndarray path only; the GPU
//! and libtorch backends are opt-in. The test aliases `test-ndarray`,
//! `test-wgpu`, `test-tch` (burn's style) run the one test body on that
//! backend: [`device()`] follows the alias, and the test
//! `backend_under_test` prints and asserts which backend ran
//! (`cargo test -p posttrain-burn --no-default-features --features test-wgpu`;
//! tch needs a libtorch, see the README's "Backends").
//!
//! ## Device selection
//!
//! In burn 0.22 the tensor type has no backend parameter: the *device* picks
//! the backend at run time. [`device()`] returns the device of the most
//! capable backend compiled in (tch, then wgpu/vulkan/metal, then ndarray);
//! the environment variable `POSTTRAIN_BACKEND=ndarray|wgpu|tch` overrides
//! the choice (a `test-*` feature picks its backend when the variable is
//! unset), and an unknown name or a backend that was not compiled in is a
//! [`DeviceError`], not a panic. On libtorch the device is CUDA 0 when
//! libtorch sees a GPU, else the CPU; `POSTTRAIN_TCH_DEVICE=auto|cpu|cuda|cuda:N`
//! overrides it ([`TchDevice`]; a CUDA index libtorch does not see is
//! [`DeviceError::NoCuda`]).
//!
//! ## Example
//!
//! ```
//! use posttrain_burn::{device, kl::kl_estimate, tensor2, mask2};
//! use posttrain_core::kl::{KlConfig, KlEstimator};
//! let dev = device()?;
//! let lp = tensor2(&[-1.0, -0.5, f64::NAN], [1, 3], &dev)?;
//! let rf = tensor2(&[-1.5, -0.5, 0.0], [1, 3], &dev)?;
//! let mask = mask2(&[true, true, false], [1, 3], &dev)?;
//! let out = kl_estimate(&KlConfig::new(KlEstimator::K3), lp, rf, &mask)?;
//! let v = posttrain_burn::to_vec(out.value);
//! assert!((v[0] - ((-0.5f64).exp() - 0.5)).abs() < 1e-6);
//! assert_eq!(v[2], 0.0); // the masked NaN never leaks
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]

pub use burn;
pub use burn::tensor::{Bool, Device, Int, Tensor};
pub use posttrain_core;

pub mod advantage;
pub mod aggregate;
mod device;
pub mod distill;
pub mod elem;
pub mod fused;
pub mod grpo;
pub mod kl;
pub mod logits;
pub mod policy;
pub mod precision;
pub mod preference;
pub mod rollout;
pub mod sequence;
pub mod stats;
mod util;
pub mod value;

pub use device::{
    compiled_backends, device, device_for, selected_backend, tch_cuda_count, tch_device,
    BackendKind, DeviceError, TchDevice, BACKEND_ENV, TCH_DEVICE_ENV,
};
pub use elem::{ElemMask, ElemTensor};
pub use util::{mask2, tensor1, tensor2, tensor3, to_vec, to_vec_bool};
