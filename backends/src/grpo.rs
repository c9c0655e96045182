//! The GRPO family on tensors: TRL's GRPO-family losses (every `loss_type`
//! and importance-sampling level, GSPO-token, GMPO, RLOO, VESPO's gamma
//! weights) and torchtune's GRPO losses (token, completion, on-policy,
//! chunked-logits, fused linear projection, logits truncation).
//!
//! Every per-token formula is the core's `Elem`-generic kernel run on
//! [`ElemTensor`]s; what the core's slice drivers do with loops (row sums,
//! valid counts, the entropy quantile, row minima of the clip fractions) is
//! written here with tensor reductions, following the drivers line by line.
//!
//! | function | core counterpart | peer |
//! |---|---|---|
//! | [`grpo_loss`] | [`posttrain_core::policy::grpo::grpo_loss`] ([`grpo_token`], [`grpo_kl_token`], [`trl_token_weight_of`]) | TRL `GRPOTrainer._compute_loss`, GSPO-token |
//! | [`gmpo_loss`] | [`posttrain_core::policy::grpo::gmpo_loss`] ([`gmpo_clipped_log_ratio`], [`gmpo_sequence_objective`]) | TRL experimental `GMPOTrainer` |
//! | [`rloo_loss`] | [`posttrain_core::policy::grpo::rloo_loss`] ([`ppo_clipped_surrogate`]) | TRL `RLOOTrainer` |
//! | [`vespo_gamma_weights`] | [`posttrain_core::policy::grpo::vespo_gamma_weights`] ([`vespo_phi`]) | TRL `get_gamma_weights` |
//! | [`token_clipped_loss`] | [`posttrain_core::policy::sequence_mean::token_clipped_loss`] ([`clipped_token`]) | torchtune `GRPOLoss` |
//! | [`completion_clipped_loss`] | [`posttrain_core::policy::sequence_mean::completion_clipped_loss`] | torchtune `GRPOCompletionLoss` |
//! | [`on_policy_loss`] | [`posttrain_core::policy::sequence_mean::on_policy_loss`] ([`on_policy_token`]) | torchtune `GRPOSimpleLoss` |
//! | [`on_policy_loss_from_logits`] | [`posttrain_core::policy::sequence_mean::on_policy_loss_from_logits`] (+ [`crate::logits::selective_log_softmax`]) | torchtune `GRPOWithChunkedOutputLoss` |
//! | [`on_policy_loss_from_hidden`] | [`posttrain_core::policy::sequence_mean::on_policy_loss_from_hidden`] (logits = `h·Wᵀ` by `matmul`) | torchtune `LinearGRPOLoss` |
//! | [`truncate_for_logprobs`], [`truncate_for_logprobs_vjp`] | [`posttrain_core::policy::sequence_mean::truncate_for_logprobs`] | torchtune `truncate_sequence_for_logprobs` |
//!
//! Sequence-level quantities (GSPO's mean log-ratio, GMPO's geometric mean,
//! RLOO's summed log-probability, VESPO's `φ`) are row reductions
//! (`sum_dim(1)`) broadcast back over the row. Masked positions are selected
//! away, so NaN/inf in padding reaches no value or gradient (TRL's `luspo`
//! weighs padding, as in the core). The few host reads are metadata or a
//! scalar state machine: the target-id range check of the logits forms (one
//! boolean) and the adaptive entropy controller of [`grpo_loss`] (one scalar).
//!
//! # Example
//!
//! ```
//! use posttrain_burn::grpo::{grpo_loss, GrpoTensors};
//! use posttrain_burn::{device, mask2, tensor1, tensor2, to_vec};
//! use posttrain_core::policy::grpo::{GrpoConfig, GrpoLossType};
//! let dev = device()?;
//! let lp = tensor2(&[-1.0, -0.5, -2.0, -0.7, -0.3, 9.9], [2, 3], &dev)?;
//! let old = tensor2(&[-1.1, -0.4, -2.0, -0.7, -0.2, f64::NAN], [2, 3], &dev)?;
//! let mask = mask2(&[true, true, true, true, true, false], [2, 3], &dev)?;
//! let ent = tensor2(&[0.5; 6], [2, 3], &dev)?;
//! let adv = tensor1(&[1.0, -0.5], &dev);
//! let mut x = GrpoTensors::new(lp, ent, mask, adv);
//! x.old_log_probs = Some(old);
//! let out = grpo_loss(&GrpoConfig::trl(GrpoLossType::Grpo), x)?;
//! assert!(to_vec(out.loss)[0].is_finite());
//! assert_eq!(to_vec(out.grad_log_probs)[5], 0.0); // the masked NaN never leaks
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::util::Filled;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use posttrain_core::kl::{KlConfig, KlEstimator};
use posttrain_core::logits::Temperature;
use posttrain_core::policy::grpo::{
    cispo_clip_indicator, clamp_log_ratio, gmpo_clip_indicators, gmpo_clipped_log_ratio,
    gmpo_sequence_objective, grpo_kl_token, grpo_token, off_policy_keep, trl_clip_indicators,
    trl_token_weight_of, vespo_log_is_term, vespo_log_ratio_term, vespo_phi, GmpoConfig,
    GrpoConfig, GrpoLossType, ImportanceSamplingLevel, RlooConfig, VespoGamma,
};
use posttrain_core::policy::sequence_mean::{
    clipped_token, on_policy_token, truncate_response_len, SequenceMeanConfig, TokenCountGuard,
};
use posttrain_core::policy::{ppo_clipped_surrogate, ClipConfig};
use posttrain_core::Error;

use crate::elem::{ElemMask, ElemTensor};
use crate::util::{check_shape, count, keep, nan_log_diff, to_vec, to_vec_bool};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A `[batch]` tensor broadcast over the row: `[batch, seq]`.
fn col(v: Tensor<1>, shape: [usize; 2]) -> Tensor<2> {
    v.reshape([shape[0], 1]).expand(shape)
}

/// Row sums of the selected entries: `[batch, 1]`.
fn row_sum(x: Tensor<2>, mask: &Tensor<2, Bool>) -> Tensor<2> {
    keep(x, mask).sum_dim(1)
}

/// `max(v, 1)` of a count.
fn at_least_one<const D: usize>(v: Tensor<D>) -> Tensor<D> {
    v.clamp_min(1.0)
}

/// An all-true mask of `shape` on `like`'s device.
fn all_true(like: &Tensor<2>) -> Tensor<2, Bool> {
    let [b, s] = like.dims();
    Tensor::from_data(TensorData::new(vec![true; b * s], [b, s]), &like.device())
}

/// `Option<&Tensor<Bool>>` as the kernels' `Option<&ElemMask>`.
fn live_ref(m: &Option<ElemMask<2>>) -> Option<&ElemMask<2>> {
    m.as_ref()
}

/// The min (or max) over the rows where `live`, of a `[batch, 1]` tensor;
/// 0 when no row is live. A `[1]` tensor.
fn row_extreme(v: Tensor<2>, live: &Tensor<2, Bool>, max: bool) -> Tensor<1> {
    let fill = if max {
        f64::NEG_INFINITY
    } else {
        f64::INFINITY
    };
    let filled = v.clone().filled(fill).mask_where(live.clone(), v);
    let e = if max { filled.max() } else { filled.min() };
    let any = live.clone().any();
    e.zeros_like().mask_where(any, e)
}

/// The high-entropy token mask of TRL's `top_entropy_quantile` (`None` when
/// the quantile is ≥ 1: no entropy mask): `mask ∧ H ≥ quantile(H_valid, 1 − q)`.
///
/// `torch.quantile` with linear interpolation, as the core's
/// `valid_quantile`: the valid entropies are sorted (padding as `+∞` at the
/// end), `rank = (1 − q)·(n − 1)`, `lo = ⌊rank⌋`, `hi = min(lo + 1, n − 1)`,
/// `w = rank − lo`, and the two order statistics are gathered by index
/// tensors and interpolated as `torch.lerp` does. A NaN among the valid
/// entropies makes the threshold NaN (every token dropped); no valid token:
/// every token dropped.
fn entropy_mask(top: f64, ent: &Tensor<2>, mask: &Tensor<2, Bool>) -> Option<Tensor<2, Bool>> {
    if top >= 1.0 {
        return None;
    }
    let [b, s] = ent.dims();
    let n_all = b * s;
    if n_all == 0 {
        return Some(mask.clone());
    }
    let flat = ent.clone().reshape([n_all]);
    let m = mask.clone().reshape([n_all]);
    let any_nan = flat.clone().is_nan().bool_and(m.clone()).any();
    let inf = flat.filled(f64::INFINITY);
    let filled = inf.clone().mask_where(m.clone(), flat);
    let filled = filled.clone().mask_where(filled.clone().is_nan(), inf);
    let sorted = filled.sort(0);
    let n = m.float().sum();
    let nm1 = n.add_scalar(-1.0).clamp_min(0.0);
    let rank = nm1.clone().mul_scalar(1.0 - top);
    let lo = rank.clone().floor().min_pair(nm1.clone());
    let hi = lo.clone().add_scalar(1.0).min_pair(nm1);
    let w = rank - lo.clone();
    let a = sorted.clone().gather(0, lo.int());
    let bv = sorted.gather(0, hi.int());
    let diff = bv.clone() - a.clone();
    let low_form = a + w.clone() * diff.clone();
    let high_form = bv - diff * (w.clone().neg().add_scalar(1.0));
    let th = high_form.mask_where(w.lower_elem(0.5), low_form);
    let th = th.clone().mask_where(any_nan, th.filled(f64::NAN));
    let th = th.reshape([1, 1]).expand([b, s]);
    Some(mask.clone().bool_and(ent.clone().greater_equal(th)))
}

// ---------------------------------------------------------------------------
// TRL GRPO family
// ---------------------------------------------------------------------------

/// TRL's vLLM importance-sampling ratio: per token or one per row.
#[derive(Debug, Clone)]
pub enum IsRatio {
    /// `[batch, seq]`.
    Token(Tensor<2>),
    /// `[batch]`.
    Row(Tensor<1>),
}

impl IsRatio {
    fn check(&self, name: &'static str, shape: [usize; 2]) -> Result<(), Error> {
        match self {
            IsRatio::Token(t) => check_shape(name, t.dims(), shape),
            IsRatio::Row(t) => check_shape(name, t.dims(), [shape[0]]),
        }
    }
    fn per_token(&self, shape: [usize; 2]) -> Tensor<2> {
        match self {
            IsRatio::Token(t) => t.clone(),
            IsRatio::Row(t) => col(t.clone(), shape),
        }
    }
}

/// The tensors [`grpo_loss`] (and [`gmpo_loss`], [`rloo_loss`]) read, as
/// [`posttrain_core::policy::grpo::GrpoInputs`]: `mask` is the loss mask
/// (TRL: `completion_mask · tool_mask`).
#[derive(Debug, Clone)]
pub struct GrpoTensors {
    /// `log π`, `[batch, seq]` (differentiated).
    pub log_probs: Tensor<2>,
    /// Per-token entropies, `[batch, seq]` (differentiated through the entropy bonus).
    pub entropies: Tensor<2>,
    /// Loss mask, `[batch, seq]`.
    pub mask: Tensor<2, Bool>,
    /// One advantage per row, `[batch]`.
    pub advantages: Tensor<1>,
    /// `log π_old`, `[batch, seq]`; `None`: on-policy (ratio 1).
    pub old_log_probs: Option<Tensor<2>>,
    /// `log π_ref`, `[batch, seq]` (required when `β ≠ 0`).
    pub ref_log_probs: Option<Tensor<2>>,
    /// The vLLM importance-sampling ratio.
    pub importance_sampling_ratio: Option<IsRatio>,
    /// The sampler's log-probs for the off-policy mask (`None`: `old_log_probs`).
    pub sampling_log_probs: Option<Tensor<2>>,
}

impl GrpoTensors {
    /// The required tensors; the optional ones are `None`.
    pub fn new(
        log_probs: Tensor<2>,
        entropies: Tensor<2>,
        mask: Tensor<2, Bool>,
        advantages: Tensor<1>,
    ) -> Self {
        GrpoTensors {
            log_probs,
            entropies,
            mask,
            advantages,
            old_log_probs: None,
            ref_log_probs: None,
            importance_sampling_ratio: None,
            sampling_log_probs: None,
        }
    }

    fn validate(&self) -> Result<[usize; 2], Error> {
        let shape = self.mask.dims();
        check_shape("per_token_logps", self.log_probs.dims(), shape)?;
        check_shape("entropies", self.entropies.dims(), shape)?;
        check_shape("advantages", self.advantages.dims(), [shape[0]])?;
        if let Some(v) = &self.old_log_probs {
            check_shape("old_per_token_logps", v.dims(), shape)?;
        }
        if let Some(v) = &self.ref_log_probs {
            check_shape("ref_per_token_logps", v.dims(), shape)?;
        }
        if let Some(v) = &self.sampling_log_probs {
            check_shape("sampling_per_token_logps", v.dims(), shape)?;
        }
        if let Some(v) = &self.importance_sampling_ratio {
            v.check("importance_sampling_ratio", shape)?;
        }
        Ok(shape)
    }
}

/// TRL's clip metrics (`clip_ratio/*`) as `[1]` tensors, as
/// [`posttrain_core::policy::grpo::ClipMetrics`].
#[derive(Debug, Clone)]
pub struct ClipMetricTensors {
    /// Mean of the low-clip indicator.
    pub low_mean: Tensor<1>,
    /// Mean of the high-clip indicator.
    pub high_mean: Tensor<1>,
    /// Mean of either.
    pub region_mean: Tensor<1>,
    /// Minimum over rows of the row's low-clip fraction (0 if no row counts).
    pub low_min: Tensor<1>,
    /// Maximum over rows of the row's high-clip fraction.
    pub high_max: Tensor<1>,
}

impl ClipMetricTensors {
    fn zeros(like: &Tensor<1>) -> Self {
        let z = like.zeros_like();
        ClipMetricTensors {
            low_mean: z.clone(),
            high_mean: z.clone(),
            region_mean: z.clone(),
            low_min: z.clone(),
            high_max: z,
        }
    }

    /// Token-level metrics from per-token indicators (restricted to `mask`):
    /// means over the valid tokens, row fractions over rows with a valid token.
    fn per_token(
        low: Tensor<2, Bool>,
        high: Tensor<2, Bool>,
        mask: &Tensor<2, Bool>,
        n_row: &Tensor<2>,
        total: &Tensor<1>,
    ) -> Self {
        let low = low.bool_and(mask.clone());
        let high = high.bool_and(mask.clone());
        let region = low.clone().bool_or(high.clone());
        let low_cnt = low.float().sum_dim(1);
        let high_cnt = high.float().sum_dim(1);
        let den = at_least_one(total.clone());
        let live = n_row.clone().greater_elem(0.0);
        let n_safe = at_least_one(n_row.clone());
        ClipMetricTensors {
            low_mean: low_cnt.clone().sum() / den.clone(),
            high_mean: high_cnt.clone().sum() / den.clone(),
            region_mean: region.float().sum() / den,
            low_min: row_extreme(low_cnt / n_safe.clone(), &live, false),
            high_max: row_extreme(high_cnt / n_safe, &live, true),
        }
    }

    /// Row-level metrics from `[batch, 1]` indicators: means over rows.
    fn per_row(low: Tensor<2, Bool>, high: Tensor<2, Bool>) -> Self {
        let [b, _] = low.dims();
        let bf = b.max(1) as f64;
        let region = low.clone().bool_or(high.clone()).float();
        let (lf, hf) = (low.float(), high.float());
        let all = lf.clone().greater_equal_elem(0.0);
        ClipMetricTensors {
            low_mean: lf.clone().sum().div_scalar(bf),
            high_mean: hf.clone().sum().div_scalar(bf),
            region_mean: region.sum().div_scalar(bf),
            low_min: row_extreme(lf, &all, false),
            high_max: row_extreme(hf, &all, true),
        }
    }
}

/// What [`grpo_loss`] returns: the loss, TRL's metrics and the gradients.
#[derive(Debug, Clone)]
pub struct GrpoLossOutput {
    /// The loss (normalised, minus the entropy bonus), `[1]`.
    pub loss: Tensor<1>,
    /// TRL's logged `policy_loss` (before the accumulation divisor and the bonus), `[1]`.
    pub policy_loss: Tensor<1>,
    /// Masked mean entropy, `[1]`.
    pub entropy: Tensor<1>,
    /// Masked mean of the (bias-corrected) per-token KL; 0 when `β = 0`.
    pub kl: Tensor<1>,
    /// Clip metrics (clipped loss types; zeros otherwise).
    pub clip: ClipMetricTensors,
    /// CISPO: mean of `coef_1 > ε_high ∧ A > 0` (0 otherwise).
    pub cispo_clip_ratio: Tensor<1>,
    /// VESPO: mean of `φ` over rows (0 otherwise).
    pub vespo_phi_seq_mean: Tensor<1>,
    /// The entropy coefficient after this step's adaptive update (0 without the bonus).
    pub entropy_coef: f64,
    /// The mean entropy over the effective mask that the controller measured (0 without the bonus).
    pub world_entropy: Tensor<1>,
    /// `∂loss/∂log π`, `[batch, seq]`.
    pub grad_log_probs: Tensor<2>,
    /// `∂loss/∂H`, `[batch, seq]` (the entropy bonus only).
    pub grad_entropies: Tensor<2>,
}

/// TRL's GRPO-family loss on tensors (`GRPOTrainer._compute_loss` for every
/// `loss_type` and importance-sampling level, and the GSPO-token trainer).
///
/// # Formula
///
/// As [`posttrain_core::policy::grpo::grpo_loss`]: per position the core's
/// [`grpo_token`] (clip/CISPO/SAPO/VESPO) at the token's or the row's log
/// weight (`x̂ = clamp(mean_valid(log π − log π_old))` by `sum_dim(1)`,
/// broadcast back), times `f = keep_row · entropy_mask · ρ`, plus
/// `β·`[`grpo_kl_token`]; weighted by [`trl_token_weight_of`] (row counts
/// `nᵢ = Σ mask` and `N = Σ nᵢ` as tensors) and summed over the counted
/// positions (valid ones; every entry for `luspo`); minus `c·H` of the
/// entropy bonus. The entropy mask's quantile is a sort and two gathers.
///
/// # Gradient
///
/// `∂L/∂log π` per token; at sequence level the row's `Σ w·∂ℓ/∂x` is
/// spread as `1/max(nᵢ, 1)` over its valid tokens. `∂L/∂H = −c/den` on the
/// effective mask.
///
/// # Peers
///
/// TRL `GRPOTrainer._compute_loss`, `trl/experimental/gspo_token`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for shapes; [`Error::Invalid`] when `β ≠ 0`
/// without `ref_log_probs`, or `vllm_is_correction` without the ratio;
/// [`Error::OutOfRange`] from [`GrpoConfig::validate`].
pub fn grpo_loss(cfg: &GrpoConfig, x: GrpoTensors) -> Result<GrpoLossOutput, Error> {
    cfg.validate()?;
    let shape = x.validate()?;
    let [b, t] = shape;
    if cfg.beta != 0.0 && x.ref_log_probs.is_none() {
        return Err(Error::Invalid {
            input: "ref_per_token_logps",
            rule: "required when beta ≠ 0",
        });
    }
    let lt = cfg.loss_type;
    let use_is = cfg.vllm_is_correction && lt != GrpoLossType::Vespo;
    if use_is && x.importance_sampling_ratio.is_none() {
        return Err(Error::Invalid {
            input: "importance_sampling_ratio",
            rule: "required with the vLLM importance-sampling correction",
        });
    }
    let mask = x.mask.clone();
    let lp = x.log_probs.clone();
    let ent = x.entropies.clone();
    let old = x.old_log_probs.clone().unwrap_or_else(|| lp.clone());
    let adv_col = x.advantages.clone().reshape([b, 1]);
    let a = adv_col.clone().expand(shape);
    let n_row = mask.clone().float().sum_dim(1); // [b, 1]
    let nf = at_least_one(n_row.clone());
    let total = count(&mask); // [1]
    let emask = entropy_mask(cfg.top_entropy_quantile, &ent, &mask);
    let emask_eff = emask.clone().unwrap_or_else(|| mask.clone());

    // Raw per-token log-ratio and the row's mean (sequence level).
    let xr = lp.clone() - old.clone();
    let s = row_sum(xr.clone(), &mask) / nf.clone(); // [b, 1]

    // Off-policy row mask (keep_i).
    let keep_row = cfg.off_policy_mask_threshold.map(|th| {
        let samp = x.sampling_log_probs.clone().unwrap_or_else(|| old.clone());
        let d = nan_log_diff(cfg.off_policy_nan_sampler_log_probs, samp - lp.clone());
        let kl = row_sum(d, &mask) / nf.clone();
        off_policy_keep(th, &ElemTensor(adv_col.clone()), &ElemTensor(kl))
            .0
            .expand(shape)
    });

    // VESPO's φ per row.
    let phi_row = if lt == GrpoLossType::Vespo {
        let mut sum = row_sum(vespo_log_ratio_term(ElemTensor(xr.clone())).0, &mask);
        match &x.importance_sampling_ratio {
            Some(IsRatio::Row(r)) => {
                sum = sum + vespo_log_is_term(ElemTensor(r.clone().reshape([b, 1]))).0;
            }
            Some(IsRatio::Token(r)) => {
                sum = sum + row_sum(vespo_log_is_term(ElemTensor(r.clone())).0, &mask);
            }
            None => {}
        }
        vespo_phi(&cfg.vespo, ElemTensor(sum), ElemTensor(adv_col.clone())).0
    } else {
        adv_col.zeros_like()
    };

    // Log importance weight of every position, and where the clamp is inactive.
    let level = cfg.level;
    let (lw, live) = match level {
        ImportanceSamplingLevel::Token => {
            let (v, l) = clamp_log_ratio(ElemTensor(xr.clone()), cfg.log_ratio_clamp);
            (v.0, l)
        }
        _ => {
            let (v, l) = clamp_log_ratio(ElemTensor(s.clone()), cfg.log_ratio_clamp);
            (v.0.expand(shape), l.map(|m| ElemMask(m.0.expand(shape))))
        }
    };
    let tok = grpo_token(
        cfg,
        ElemTensor(lw),
        live_ref(&live),
        ElemTensor(lp.clone()),
        ElemTensor(a.clone()),
        ElemTensor(phi_row.clone().expand(shape)),
    );

    // The multiplicative factor f (selection for the masks, ρ for IS).
    let mut f_on: Option<Tensor<2, Bool>> = keep_row;
    if let Some(e) = &emask {
        f_on = Some(match f_on {
            Some(k) => k.bool_and(e.clone()),
            None => e.clone(),
        });
    }
    let apply = |v: Tensor<2>| -> Tensor<2> {
        let v = if use_is {
            let r = x
                .importance_sampling_ratio
                .as_ref()
                .map(|r| r.per_token(shape));
            match r {
                Some(r) => v * r,
                None => v,
            }
        } else {
            v
        };
        match &f_on {
            Some(m) => keep(v, m),
            None => v,
        }
    };
    let mut lt_val = apply(tok.loss.0.clone());
    let mut g_x = apply(tok.grad_log_weight.0.clone());
    let mut g_lp = apply(tok.grad_log_prob.0.clone());

    // KL.
    let mut kl_sum = total.zeros_like();
    if cfg.beta != 0.0 {
        let rf = x.ref_log_probs.clone().unwrap_or_else(|| lp.zeros_like());
        let (kv2, kg2, kx) = grpo_kl_token(
            cfg,
            ElemTensor(lp.clone()),
            ElemTensor(rf),
            tok.ratio.clone(),
            live_ref(&live),
        );
        lt_val = lt_val + kv2.0.clone().mul_scalar(cfg.beta);
        g_lp = g_lp + kg2.0.mul_scalar(cfg.beta);
        g_x = g_x + kx.0.mul_scalar(cfg.beta);
        kl_sum = keep(kv2.0, &mask).sum();
    }

    // Normalizer weights and the counted positions.
    let w = trl_token_weight_of(
        lt,
        &cfg.norm,
        b,
        t,
        ElemTensor(n_row.clone().expand(shape)),
        ElemTensor(total.clone().reshape([1, 1]).expand(shape)),
    )
    .0;
    let counted = if lt == GrpoLossType::Luspo && !cfg.norm.is_trl_1_16() {
        all_true(&lp)
    } else {
        mask.clone()
    };
    let mut loss = keep(w.clone() * lt_val, &counted).sum();
    let grad_log_probs = match level {
        ImportanceSamplingLevel::Sequence => {
            let row_dx = keep(w.clone() * g_x, &counted).sum_dim(1);
            let share = (row_dx / nf.clone()).expand(shape);
            keep(w * g_lp, &counted) + keep(share, &mask)
        }
        _ => keep(w * (g_lp + g_x), &counted),
    };

    // Metrics.
    let clip_metrics = |low: Tensor<2, Bool>, high: Tensor<2, Bool>| {
        ClipMetricTensors::per_token(low, high, &mask, &n_row, &total)
    };
    let (clip, cispo_clip_ratio) = if level == ImportanceSamplingLevel::Sequence {
        // Row indicators from the row's own capped ratio (same kernel, [b, 1]).
        let (sc, _) = clamp_log_ratio(ElemTensor(s.clone()), cfg.log_ratio_clamp);
        let row = grpo_token(
            cfg,
            sc,
            None,
            ElemTensor(adv_col.zeros_like()),
            ElemTensor(adv_col.clone()),
            ElemTensor(phi_row.clone()),
        );
        let (lo, hi) = trl_clip_indicators(
            cfg.eps_low,
            cfg.eps_high,
            &row.capped_ratio,
            &ElemTensor(adv_col.clone()),
        );
        let cispo = cispo_clip_indicator(cfg.eps_high, &row.ratio, &ElemTensor(adv_col.clone()));
        let bf = b.max(1) as f64;
        (
            ClipMetricTensors::per_row(lo.0, hi.0),
            cispo.0.float().sum().div_scalar(bf),
        )
    } else {
        let (lo, hi) = trl_clip_indicators(
            cfg.eps_low,
            cfg.eps_high,
            &tok.capped_ratio,
            &ElemTensor(a.clone()),
        );
        let cispo = cispo_clip_indicator(cfg.eps_high, &tok.ratio, &ElemTensor(a.clone()));
        let cispo = cispo.0.bool_and(mask.clone()).float().sum() / at_least_one(total.clone());
        (clip_metrics(lo.0, hi.0), cispo)
    };
    let zero = total.zeros_like();
    let acc = cfg.norm.accumulation();
    let policy_loss = if lt.uses_global_token_count() {
        loss.clone()
    } else {
        loss.clone().mul_scalar(acc)
    };
    let entropy = keep(ent.clone(), &mask).sum() / at_least_one(total.clone());
    let kl = if cfg.beta != 0.0 {
        kl_sum / at_least_one(total.clone())
    } else {
        zero.clone()
    };
    let vespo_phi_seq_mean = if lt == GrpoLossType::Vespo {
        phi_row.sum().div_scalar(b.max(1) as f64)
    } else {
        zero.clone()
    };

    // Entropy bonus.
    let mut grad_entropies = ent.zeros_like();
    let mut entropy_coef = 0.0;
    let mut world_entropy = zero.clone();
    if let Some(bonus) = &cfg.entropy_bonus {
        let h_sum = keep(ent.clone(), &emask_eff).sum();
        let h_cnt = count(&emask_eff);
        let den = if lt.uses_global_token_count() && !cfg.norm.is_trl_1_16() {
            zero.filled(cfg.norm.token_count())
        } else {
            at_least_one(h_cnt.clone()).mul_scalar(acc)
        };
        let c = bonus.applied_coef();
        loss = loss - (h_sum.clone() / den.clone()).mul_scalar(c);
        let gv = den.filled(-c) / den;
        grad_entropies = keep(gv.reshape([1, 1]).expand(shape), &emask_eff);
        world_entropy = h_sum / at_least_one(h_cnt);
        // The adaptive controller is a scalar state machine: one host read.
        let world = to_vec(world_entropy.clone())[0];
        entropy_coef = bonus.updated_coef(world, cfg.norm.train);
    }
    let clip = if lt.is_clipped() {
        clip
    } else {
        ClipMetricTensors::zeros(&zero)
    };
    let cispo_clip_ratio = if lt == GrpoLossType::Cispo {
        cispo_clip_ratio
    } else {
        zero
    };
    Ok(GrpoLossOutput {
        loss,
        policy_loss,
        entropy,
        kl,
        clip,
        cispo_clip_ratio,
        vespo_phi_seq_mean,
        entropy_coef,
        world_entropy,
        grad_log_probs,
        grad_entropies,
    })
}

/// What [`gmpo_loss`] and [`rloo_loss`] return, as
/// [`posttrain_core::policy::grpo::SequenceLossOutput`], plus the gradient.
#[derive(Debug, Clone)]
pub struct SequenceLossTensors {
    /// The loss, `[1]`.
    pub loss: Tensor<1>,
    /// Masked mean entropy, `[1]`.
    pub entropy: Tensor<1>,
    /// Masked mean per-token k3 KL (0 when `β = 0`), `[1]`.
    pub kl: Tensor<1>,
    /// Clip metrics.
    pub clip: ClipMetricTensors,
    /// `∂loss/∂log π`, `[batch, seq]`.
    pub grad_log_probs: Tensor<2>,
}

/// GMPO on tensors (TRL experimental `GMPOTrainer._compute_loss`).
///
/// # Formula
///
/// As [`posttrain_core::policy::grpo::gmpo_loss`]: `x̃ =`
/// [`gmpo_clipped_log_ratio`] per token, the row mean over the effective
/// mask `m'` by `sum_dim(1)`, [`gmpo_sequence_objective`] per row, plus
/// `β·Σ_valid k3 / max(nᵢ, 1)`; `L = Σᵢ (…) / (B·gas)`.
///
/// # Gradient
///
/// `∂L/∂log π_t = (∂ℓᵢ/∂m · ∂x̃/∂x · m'_t / max(Σm', 1) + β·∂k3/∂log π / max(nᵢ, 1)) / (B·gas)`
/// on valid tokens, 0 elsewhere.
///
/// # Peers
///
/// TRL `trl/experimental/gmpo/gmpo_trainer.py`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for shapes; [`Error::Invalid`] when `β ≠ 0`
/// without `ref_log_probs`; [`Error::OutOfRange`] from [`GmpoConfig::validate`].
pub fn gmpo_loss(cfg: &GmpoConfig, x: GrpoTensors) -> Result<SequenceLossTensors, Error> {
    cfg.validate()?;
    let shape = x.validate()?;
    let [b, _] = shape;
    if cfg.beta != 0.0 && x.ref_log_probs.is_none() {
        return Err(Error::Invalid {
            input: "ref_per_token_logps",
            rule: "required when beta ≠ 0",
        });
    }
    let mask = x.mask.clone();
    let lp = x.log_probs.clone();
    let old = x.old_log_probs.clone().unwrap_or_else(|| lp.clone());
    let adv_col = x.advantages.clone().reshape([b, 1]);
    let a = adv_col.clone().expand(shape);
    let n_row = mask.clone().float().sum_dim(1);
    let nf = at_least_one(n_row.clone());
    let total = count(&mask);
    let emask =
        entropy_mask(cfg.top_entropy_quantile, &x.entropies, &mask).unwrap_or_else(|| mask.clone());
    let xr = lp.clone() - old;
    let (lo, hi) = gmpo_clip_indicators(
        cfg.eps_low,
        cfg.eps_high,
        &ElemTensor(xr.clone()),
        &ElemTensor(a.clone()),
    );
    let clip = ClipMetricTensors::per_token(lo.0, hi.0, &mask, &n_row, &total);
    let scale = 1.0
        / b.max(1) as f64
        / if cfg.train {
            cfg.gradient_accumulation_steps
        } else {
            1.0
        };
    let (clipped, d) = gmpo_clipped_log_ratio(
        cfg.eps_low,
        cfg.eps_high,
        ElemTensor(xr),
        ElemTensor(a.clone()),
    );
    let den = at_least_one(emask.clone().float().sum_dim(1));
    let mean = row_sum(clipped.0, &emask) / den.clone();
    let (row_loss, d_mean) =
        gmpo_sequence_objective(ElemTensor(mean), ElemTensor(adv_col), cfg.log_ratio_clamp);
    let mut loss = row_loss.0.sum().mul_scalar(scale);
    let mut g = keep((d_mean.0 / den).expand(shape) * d.0, &emask);
    let mut kl = total.zeros_like();
    if cfg.beta != 0.0 {
        let mut kl_cfg = KlConfig::new(KlEstimator::K3);
        kl_cfg.log_ratio_clamp = cfg.log_ratio_clamp;
        let rf = x.ref_log_probs.clone().unwrap_or_else(|| lp.zeros_like());
        let (kv, kg) = kl_cfg.estimate(ElemTensor(lp.clone()), ElemTensor(rf));
        let row_kl = row_sum(kv.0.clone(), &mask);
        loss = loss + (row_kl / nf.clone()).sum().mul_scalar(cfg.beta * scale);
        g = g + keep(kg.0.mul_scalar(cfg.beta) / nf.expand(shape), &mask);
        kl = keep(kv.0, &mask).sum() / at_least_one(total.clone());
    }
    let entropy = keep(x.entropies, &mask).sum() / at_least_one(total);
    Ok(SequenceLossTensors {
        loss,
        entropy,
        kl,
        clip,
        grad_log_probs: keep(g.mul_scalar(scale), &mask),
    })
}

/// RLOO's sequence-ratio clipped loss on tensors (TRL `RLOOTrainer._compute_loss`).
/// Reads `log_probs`, `entropies`, `mask` and `advantages` of `x`;
/// `old_logps` is `[batch]`.
///
/// # Formula
///
/// `xᵢ = Σ_valid log π − old_logpsᵢ` (a `sum_dim(1)`), then
/// [`ppo_clipped_surrogate`] per row on `[batch]` tensors;
/// `L = Σᵢ ℓᵢ / B`. Clip metrics are means/min/max over rows.
///
/// # Gradient
///
/// `∂L/∂log π_t = ∂ℓᵢ/∂xᵢ / B` on the valid tokens of row `i`.
///
/// # Peers
///
/// TRL `trl/trainer/rloo_trainer.py`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for shapes (`old_logps`, `advantages`: `[batch]`);
/// [`Error::OutOfRange`] from [`RlooConfig::validate`].
pub fn rloo_loss(
    cfg: &RlooConfig,
    x: GrpoTensors,
    old_logps: Tensor<1>,
) -> Result<SequenceLossTensors, Error> {
    cfg.validate()?;
    let shape = x.validate()?;
    let [b, _] = shape;
    check_shape("old_logps", old_logps.dims(), [b])?;
    let clip = ClipConfig {
        eps_low: cfg.eps_low,
        eps_high: cfg.eps_high,
        dual_clip: None,
        log_ratio_clamp: cfg.log_ratio_clamp,
    };
    let mask = x.mask.clone();
    let bf = b.max(1) as f64;
    let s = row_sum(x.log_probs.clone(), &mask).reshape([b]);
    let adv = ElemTensor(x.advantages.clone());
    let t = ppo_clipped_surrogate(&clip, ElemTensor(s), ElemTensor(old_logps), adv.clone());
    let loss = t.loss.0.sum().div_scalar(bf);
    let (lo, hi) = trl_clip_indicators(cfg.eps_low, cfg.eps_high, &t.ratio, &adv);
    let metrics = ClipMetricTensors::per_row(lo.0.reshape([b, 1]), hi.0.reshape([b, 1]));
    let grad = keep(col(t.grad.0.div_scalar(bf), shape), &mask);
    let total = count(&mask);
    let entropy = keep(x.entropies, &mask).sum() / at_least_one(total.clone());
    Ok(SequenceLossTensors {
        loss,
        entropy,
        kl: total.zeros_like(),
        clip: metrics,
        grad_log_probs: grad,
    })
}

/// VESPO's per-row gamma weights `φ` on tensors (TRL `get_gamma_weights`).
///
/// # Formula
///
/// `Sᵢ = Σ_valid `[`vespo_log_ratio_term`]`(x) + Σ_valid `[`vespo_log_is_term`]`(ρ)`
/// (row sums), `φᵢ = `[`vespo_phi`]`(Sᵢ, Aᵢ)`.
///
/// # Gradient
///
/// None (`φ` is detached).
///
/// # Peers
///
/// TRL `GRPOTrainer.get_gamma_weights`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for shapes (`advantages`: `[batch]`);
/// [`Error::OutOfRange`] for non-finite parameters.
pub fn vespo_gamma_weights(
    gamma: &VespoGamma,
    advantages: Tensor<1>,
    log_ratio: Tensor<2>,
    mask: &Tensor<2, Bool>,
    importance_sampling_ratio: Option<IsRatio>,
) -> Result<Tensor<1>, Error> {
    gamma.validate()?;
    let shape = log_ratio.dims();
    let [b, _] = shape;
    check_shape("advantages", advantages.dims(), [b])?;
    check_shape("mask", mask.dims(), shape)?;
    if let Some(r) = &importance_sampling_ratio {
        r.check("importance_sampling_ratio", shape)?;
    }
    let mut sum = row_sum(vespo_log_ratio_term(ElemTensor(log_ratio)).0, mask);
    match importance_sampling_ratio {
        Some(IsRatio::Row(r)) => sum = sum + vespo_log_is_term(ElemTensor(r.reshape([b, 1]))).0,
        Some(IsRatio::Token(r)) => sum = sum + row_sum(vespo_log_is_term(ElemTensor(r)).0, mask),
        None => {}
    }
    let phi = vespo_phi(
        gamma,
        ElemTensor(sum),
        ElemTensor(advantages.reshape([b, 1])),
    );
    Ok(phi.0.reshape([b]))
}

// ---------------------------------------------------------------------------
// torchtune GRPO losses
// ---------------------------------------------------------------------------

/// torchtune's scalar results as `[1]` tensors, as
/// [`posttrain_core::policy::sequence_mean::SequenceMeanOutput`].
#[derive(Debug, Clone)]
pub struct SequenceMeanTensors {
    /// `−(policy_loss − β · kl_loss)`.
    pub loss: Tensor<1>,
    /// The policy objective.
    pub policy_loss: Tensor<1>,
    /// The KL penalty.
    pub kl_loss: Tensor<1>,
    /// The mean ratio (1 for the on-policy forms).
    pub ratio_mean: Tensor<1>,
    /// Fraction of clipped terms (0 for the on-policy forms).
    pub clipfrac: Tensor<1>,
}

/// Shape checks shared by the torchtune forms (the core's `check_common`).
fn check_common(
    shape: [usize; 2],
    advantages: &Tensor<1>,
    mask: Option<&Tensor<2, Bool>>,
) -> Result<(), Error> {
    if shape[0] == 0 {
        return Err(Error::Empty {
            input: "advantages",
        });
    }
    check_shape("advantages", advantages.dims(), [shape[0]])?;
    if let Some(m) = mask {
        check_shape("mask", m.dims(), shape)?;
    }
    Ok(())
}

fn mask_or_all(mask: Option<&Tensor<2, Bool>>, like: &Tensor<2>) -> Tensor<2, Bool> {
    mask.cloned().unwrap_or_else(|| all_true(like))
}

/// torchtune's token-level clipped GRPO loss on tensors, with `∂loss/∂log π`.
///
/// # Formula
///
/// As [`posttrain_core::policy::sequence_mean::token_clipped_loss`]: the
/// core's [`clipped_token`] per position; `D = N + 1e-8`;
/// `policy_loss = Σ_valid policy / D`, `kl_loss = Σ_valid kl / D`,
/// `clipfrac = Σ_valid 1[clipped] / D`, `ratio_mean` over every position.
///
/// # Gradient
///
/// `ClippedToken::grad / D` on valid positions, else 0.
///
/// # Peers
///
/// torchtune `dev.grpo.loss.GRPOLoss`.
///
/// # Errors
///
/// [`Error::ShapeMismatch`] for shapes; [`Error::Empty`] for zero rows;
/// [`Error::OutOfRange`] for a bad configuration.
pub fn token_clipped_loss(
    cfg: &SequenceMeanConfig,
    old_log_prob: Tensor<2>,
    log_prob: Tensor<2>,
    ref_log_prob: Tensor<2>,
    advantages: Tensor<1>,
    mask: Option<&Tensor<2, Bool>>,
) -> Result<(SequenceMeanTensors, Tensor<2>), Error> {
    cfg.validate()?;
    let shape = log_prob.dims();
    check_shape("old_log_prob", old_log_prob.dims(), shape)?;
    check_shape("ref_log_prob", ref_log_prob.dims(), shape)?;
    check_common(shape, &advantages, mask)?;
    let mask = mask_or_all(mask, &log_prob);
    let a = col(advantages, shape);
    let t = clipped_token(
        cfg,
        ElemTensor(log_prob),
        ElemTensor(old_log_prob),
        ElemTensor(ref_log_prob),
        ElemTensor(a),
    );
    let den = count(&mask).add_scalar(1e-8);
    let policy_loss = keep(t.policy.0, &mask).sum() / den.clone();
    let kl_loss = keep(t.kl.0, &mask).sum() / den.clone();
    let clipfrac = count(&t.clipped.0.bool_and(mask.clone())) / den.clone();
    let n = shape[0] * shape[1];
    let ratio_mean = if n == 0 {
        den.ones_like()
    } else {
        t.ratio.0.sum().div_scalar(n as f64)
    };
    let grad = keep(t.grad.0 / den.reshape([1, 1]).expand(shape), &mask);
    let loss = (policy_loss.clone() - kl_loss.clone().mul_scalar(cfg.kl_coeff)).neg();
    Ok((
        SequenceMeanTensors {
            loss,
            policy_loss,
            kl_loss,
            ratio_mean,
            clipfrac,
        },
        grad,
    ))
}

/// torchtune's completion-level clipped GRPO loss on tensors: one ratio from
/// the log-probabilities summed over every valid token of the whole batch.
///
/// # Formula
///
/// As [`posttrain_core::policy::sequence_mean::completion_clipped_loss`]:
/// `x = Σ_valid (log π − log π_old)`, `y = Σ_valid (log π − ref)` (full
/// reductions), [`ppo_clipped_surrogate`]`(x, 0, Aᵢ)` on a `[batch]`
/// tensor, `kl_loss = k3(y)·N/(N + 1e-8)`.
///
/// # Gradient
///
/// Every valid token gets `meanᵢ ∂ℓᵢ/∂x + β·∂k3/∂y·N/(N + 1e-8)`.
///
/// # Peers
///
/// torchtune `dev.grpo.loss.GRPOCompletionLoss`.
///
/// # Errors
///
/// As [`token_clipped_loss`].
pub fn completion_clipped_loss(
    cfg: &SequenceMeanConfig,
    old_log_prob: Tensor<2>,
    log_prob: Tensor<2>,
    ref_log_prob: Tensor<2>,
    advantages: Tensor<1>,
    mask: Option<&Tensor<2, Bool>>,
) -> Result<(SequenceMeanTensors, Tensor<2>), Error> {
    cfg.validate()?;
    let shape = log_prob.dims();
    check_shape("old_log_prob", old_log_prob.dims(), shape)?;
    check_shape("ref_log_prob", ref_log_prob.dims(), shape)?;
    check_common(shape, &advantages, mask)?;
    let [b, _] = shape;
    let mask = mask_or_all(mask, &log_prob);
    let x = keep(log_prob.clone() - old_log_prob, &mask).sum();
    let y = keep(log_prob - ref_log_prob, &mask).sum();
    let s = ppo_clipped_surrogate(
        &cfg.clip(),
        ElemTensor(x.expand([b])),
        ElemTensor(advantages.zeros_like()),
        ElemTensor(advantages),
    );
    let bf = b as f64;
    let policy_loss = s.loss.0.sum().neg().div_scalar(bf);
    let dpol = s.grad.0.sum();
    let clipfrac = s.clipped.0.float().sum().div_scalar(bf);
    let ratio_mean = s.ratio.0.narrow(0, b - 1, 1);
    let (kl, dkl) = cfg
        .kl()
        .estimate(ElemTensor(y.clone()), ElemTensor(y.zeros_like()));
    let valid = count(&mask);
    let share = valid.clone() / valid.add_scalar(1e-8);
    let kl_loss = kl.0 * share.clone();
    let gv = dpol.div_scalar(bf) + dkl.0.mul_scalar(cfg.kl_coeff) * share;
    let grad = keep(gv.reshape([1, 1]).expand(shape), &mask);
    let loss = (policy_loss.clone() - kl_loss.clone().mul_scalar(cfg.kl_coeff)).neg();
    Ok((
        SequenceMeanTensors {
            loss,
            policy_loss,
            kl_loss,
            ratio_mean,
            clipfrac,
        },
        grad,
    ))
}

/// The on-policy forms' driver (the core's `on_policy_core`): the core's
/// [`on_policy_token`] per position, per-row means with the guarded count
/// ([`TokenCountGuard::denominator_of`] on the row-count tensor), then the
/// mean over rows (rows without valid tokens contribute exactly 0).
fn on_policy_core(
    cfg: &SequenceMeanConfig,
    guard: TokenCountGuard,
    log_prob: Tensor<2>,
    ref_log_prob: Tensor<2>,
    advantages: Tensor<1>,
    mask: &Tensor<2, Bool>,
) -> (SequenceMeanTensors, Tensor<2>) {
    let shape = log_prob.dims();
    let bf = shape[0] as f64;
    let n_row = mask.clone().float().sum_dim(1);
    let live = n_row.clone().greater_elem(0.0);
    let den = guard.denominator_of(ElemTensor(n_row)).0;
    let t = on_policy_token(
        cfg.kl_coeff,
        ElemTensor(log_prob),
        ElemTensor(ref_log_prob),
        ElemTensor(col(advantages, shape)),
    );
    let reduce = |v: Tensor<2>| -> Tensor<1> {
        keep(row_sum(v, mask) / den.clone(), &live)
            .sum()
            .div_scalar(bf)
    };
    let loss = reduce(t.loss.0);
    let policy_loss = reduce(t.policy.0);
    let kl_loss = reduce(t.kl.0);
    let grad = keep(t.grad.0 / den.mul_scalar(bf).expand(shape), mask);
    let one = loss.ones_like();
    (
        SequenceMeanTensors {
            loss,
            policy_loss,
            kl_loss,
            ratio_mean: one.clone(),
            clipfrac: one.zeros_like(),
        },
        grad,
    )
}

/// torchtune's on-policy GRPO loss on tensors: each sequence's token mean,
/// then the mean over sequences.
///
/// # Formula
///
/// As [`posttrain_core::policy::sequence_mean::on_policy_loss`]:
/// `Dᵢ = guard(nᵢ)`, `loss = meanᵢ Σ_valid −(Aᵢ − β·kl) / Dᵢ`.
///
/// # Gradient
///
/// `(−Aᵢ + β(1 − e^{ref − log π})) / (Dᵢ · B)` on valid positions, else 0.
///
/// # Peers
///
/// torchtune `dev.grpo.loss.GRPOSimpleLoss` with [`TokenCountGuard::TORCHTUNE_SIMPLE`].
///
/// # Errors
///
/// As [`token_clipped_loss`], plus [`Error::OutOfRange`] for a non-positive guard.
pub fn on_policy_loss(
    cfg: &SequenceMeanConfig,
    guard: TokenCountGuard,
    log_prob: Tensor<2>,
    ref_log_prob: Tensor<2>,
    advantages: Tensor<1>,
    mask: Option<&Tensor<2, Bool>>,
) -> Result<(SequenceMeanTensors, Tensor<2>), Error> {
    cfg.validate()?;
    guard.validate()?;
    let shape = log_prob.dims();
    check_shape("ref_log_prob", ref_log_prob.dims(), shape)?;
    check_common(shape, &advantages, mask)?;
    let mask = mask_or_all(mask, &log_prob);
    Ok(on_policy_core(
        cfg,
        guard,
        log_prob,
        ref_log_prob,
        advantages,
        &mask,
    ))
}

/// What the logits/hidden forms return besides the scalars.
#[derive(Debug, Clone)]
pub struct FromLogitsOutput {
    /// The scalar results.
    pub out: SequenceMeanTensors,
    /// Every position's `log π` (0 where the target is `ignore_index`), `[batch, seq]`.
    pub log_probs: Tensor<2>,
    /// `∂loss/∂logits`, `[batch, seq, vocab]` (with `want_grad`).
    pub grad_logits: Option<Tensor<3>>,
}

/// Checks the ids and returns (ignored positions, ids with the ignored ones set to 0).
fn split_targets(
    targets: Tensor<2, Int>,
    vocab: usize,
    ignore_index: Option<i64>,
) -> Result<(Tensor<2, Bool>, Tensor<2, Int>), Error> {
    let ignored = match ignore_index {
        Some(i) => targets.clone().equal_elem(i),
        None => targets
            .clone()
            .equal_elem(0)
            .bool_and(targets.clone().not_equal_elem(0)),
    };
    let [b, s] = targets.dims();
    if b * s > 0 {
        let bad = targets
            .clone()
            .lower_elem(0)
            .bool_or(targets.clone().greater_equal_elem(vocab as i64))
            .bool_and(ignored.clone().bool_not())
            .any();
        if to_vec_bool(bad)[0] {
            return Err(Error::Invalid {
                input: "targets",
                rule: "every target id must lie in [0, vocab) or equal ignore_index",
            });
        }
    }
    let safe = targets.mask_fill(ignored.clone(), 0);
    Ok((ignored, safe))
}

/// The shared part of the logits and hidden forms: `log π` by the backend's
/// selective log-softmax, the on-policy driver, and `∂loss/∂logits`.
#[allow(clippy::too_many_arguments)]
fn from_logits_core(
    cfg: &SequenceMeanConfig,
    guard: TokenCountGuard,
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    ignore_index: Option<i64>,
    ref_log_prob: Tensor<2>,
    advantages: Tensor<1>,
    mask: &Tensor<2, Bool>,
    want_grad: bool,
) -> Result<FromLogitsOutput, Error> {
    let [b, s, v] = logits.dims();
    let (ignored, safe) = split_targets(targets, v, ignore_index)?;
    let (lp, _) =
        crate::logits::selective_log_softmax(logits.clone(), safe.clone(), Temperature::ONE, None)?;
    let live = ignored.bool_not();
    let lp = keep(lp, &live);
    let (out, c) = on_policy_core(cfg, guard, lp.clone(), ref_log_prob, advantages, mask);
    let grad_logits = if want_grad {
        let used = mask.clone().bool_and(live);
        let c = keep(c, &used);
        let (_, g) = crate::logits::selective_log_softmax(logits, safe, Temperature::ONE, Some(c))?;
        let used3 = used.unsqueeze_dim::<3>(2).expand([b, s, v]);
        g.map(|g| keep(g, &used3))
    } else {
        None
    };
    Ok(FromLogitsOutput {
        out,
        log_probs: lp,
        grad_logits,
    })
}

/// torchtune's on-policy GRPO loss from `[batch, seq, vocab]` logits on tensors.
///
/// # Formula
///
/// As [`posttrain_core::policy::sequence_mean::on_policy_loss_from_logits`]:
/// `log πᵢⱼ = log_softmax(zᵢⱼ)[tᵢⱼ]` by [`crate::logits::selective_log_softmax`]
/// (0 where the target is `ignore_index`), then [`on_policy_loss`].
///
/// # Gradient
///
/// `∂loss/∂zᵢⱼₖ = cᵢⱼ (1[k = tᵢⱼ] − softmax(zᵢⱼ)ₖ)` with `cᵢⱼ = ∂loss/∂log πᵢⱼ`,
/// 0 on masked or ignored positions (selected away).
///
/// # Peers
///
/// torchtune `dev.grpo.loss.GRPOWithChunkedOutputLoss` (guard
/// [`TokenCountGuard::TORCHTUNE_CHUNKED`], `ignore_index = -100`).
///
/// # Errors
///
/// As [`on_policy_loss`], plus [`Error::ShapeMismatch`] for `targets`,
/// [`Error::Empty`] for `vocab = 0` and [`Error::Invalid`] for a target id
/// outside `[0, vocab)` that is not `ignore_index` (one boolean host read).
#[allow(clippy::too_many_arguments)]
pub fn on_policy_loss_from_logits(
    cfg: &SequenceMeanConfig,
    guard: TokenCountGuard,
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    ignore_index: Option<i64>,
    ref_log_prob: Tensor<2>,
    advantages: Tensor<1>,
    mask: Option<&Tensor<2, Bool>>,
    want_grad: bool,
) -> Result<FromLogitsOutput, Error> {
    cfg.validate()?;
    guard.validate()?;
    let [b, s, v] = logits.dims();
    if v == 0 {
        return Err(Error::Empty {
            input: "logits (vocabulary)",
        });
    }
    let shape = [b, s];
    check_shape("targets", targets.dims(), shape)?;
    check_shape("ref_log_prob", ref_log_prob.dims(), shape)?;
    check_common(shape, &advantages, mask)?;
    let mask = mask_or_all(mask, &ref_log_prob);
    from_logits_core(
        cfg,
        guard,
        logits,
        targets,
        ignore_index,
        ref_log_prob,
        advantages,
        &mask,
        want_grad,
    )
}

/// What [`on_policy_loss_from_hidden`] returns.
#[derive(Debug, Clone)]
pub struct FromHiddenOutput {
    /// The scalar results.
    pub out: SequenceMeanTensors,
    /// Every position's `log π`, `[batch, seq]`.
    pub log_probs: Tensor<2>,
    /// `(∂loss/∂hidden [batch, seq, hidden], ∂loss/∂weight [vocab, hidden])` (with `want_grad`).
    pub grads: Option<(Tensor<3>, Tensor<2>)>,
}

/// torchtune's fused linear-projection GRPO loss on tensors: logits
/// `z = h·Wᵀ` by one `matmul`, then [`on_policy_loss_from_logits`].
///
/// # Formula
///
/// As [`posttrain_core::policy::sequence_mean::on_policy_loss_from_hidden`]
/// (`W`: `[vocab, hidden]`, no bias).
///
/// # Gradient
///
/// With `dz = ∂loss/∂z` (0 on masked/ignored positions):
/// `∂loss/∂h = dz·W`, `∂loss/∂W = dzᵀ·h` (masked hidden rows are selected
/// to 0 before the product, so their NaN never reaches `∂W`).
///
/// # Peers
///
/// torchtune `dev.rl.linear_grpo_loss.LinearGRPOLoss` (argument names shifted:
/// `pi_old_outputs` are the hidden states, `pi_outputs` the targets).
///
/// # Errors
///
/// As [`on_policy_loss_from_logits`], plus [`Error::ShapeMismatch`] for
/// `weight` and [`Error::Empty`] for `hidden_dim = 0`.
#[allow(clippy::too_many_arguments)]
pub fn on_policy_loss_from_hidden(
    cfg: &SequenceMeanConfig,
    guard: TokenCountGuard,
    hidden: Tensor<3>,
    weight: Tensor<2>,
    targets: Tensor<2, Int>,
    ignore_index: Option<i64>,
    ref_log_prob: Tensor<2>,
    advantages: Tensor<1>,
    mask: Option<&Tensor<2, Bool>>,
    want_grad: bool,
) -> Result<FromHiddenOutput, Error> {
    cfg.validate()?;
    guard.validate()?;
    let [b, s, h] = hidden.dims();
    let [v, wh] = weight.dims();
    if v == 0 {
        return Err(Error::Empty {
            input: "weight (vocabulary)",
        });
    }
    if h == 0 {
        return Err(Error::Empty { input: "hidden" });
    }
    check_shape("weight", [v, wh], [v, h])?;
    let shape = [b, s];
    check_shape("targets", targets.dims(), shape)?;
    check_shape("ref_log_prob", ref_log_prob.dims(), shape)?;
    check_common(shape, &advantages, mask)?;
    let mask = mask_or_all(mask, &ref_log_prob);
    let h2 = hidden.reshape([b * s, h]);
    let logits = h2
        .clone()
        .matmul(weight.clone().transpose())
        .reshape([b, s, v]);
    let ignored = match ignore_index {
        Some(i) => targets.clone().equal_elem(i),
        None => mask.clone().bool_and(mask.clone().bool_not()),
    };
    let r = from_logits_core(
        cfg,
        guard,
        logits,
        targets,
        ignore_index,
        ref_log_prob,
        advantages,
        &mask,
        want_grad,
    )?;
    let grads = r.grad_logits.map(|dz| {
        let dz = dz.reshape([b * s, v]);
        let used = mask
            .clone()
            .bool_and(ignored.bool_not())
            .reshape([b * s, 1])
            .expand([b * s, h]);
        let dh = dz.clone().matmul(weight).reshape([b, s, h]);
        let dw = dz.transpose().matmul(keep(h2, &used));
        (dh, dw)
    });
    Ok(FromHiddenOutput {
        out: r.out,
        log_probs: r.log_probs,
        grads,
    })
}

/// The response part of `[batch, context + response, vocab]` logits on
/// tensors: `logits[:, context − 1 : −1]` (a `slice`).
///
/// # Formula
///
/// `out[b, j, :] = logits[b, context − 1 + j, :]` for `j < len − context`.
///
/// # Gradient
///
/// A slice: see [`truncate_for_logprobs_vjp`].
///
/// # Peers
///
/// torchtune `rlhf.truncate_sequence_for_logprobs`.
///
/// # Errors
///
/// [`Error::OutOfRange`] unless `1 ≤ context ≤ len`.
pub fn truncate_for_logprobs(logits: Tensor<3>, context: usize) -> Result<Tensor<3>, Error> {
    let [b, len, v] = logits.dims();
    let resp = truncate_response_len(len, context)?;
    if resp == 0 || b == 0 || v == 0 {
        return Ok(Tensor::zeros([b, resp, v], &logits.device()));
    }
    Ok(logits.slice([0..b, context - 1..context - 1 + resp, 0..v]))
}

/// The VJP of [`truncate_for_logprobs`]: the `[batch, len − context, vocab]`
/// cotangent placed back at positions `context − 1 …` of a zero
/// `[batch, len, vocab]` tensor (`slice_assign`).
///
/// # Errors
///
/// [`Error::OutOfRange`] unless `1 ≤ context ≤ len`;
/// [`Error::ShapeMismatch`] for the cotangent.
pub fn truncate_for_logprobs_vjp(
    cotangent: Tensor<3>,
    len: usize,
    context: usize,
) -> Result<Tensor<3>, Error> {
    let [b, r, v] = cotangent.dims();
    let resp = truncate_response_len(len, context)?;
    check_shape("cotangent", [b, r, v], [b, resp, v])?;
    let zeros = Tensor::zeros([b, len, v], &cotangent.device());
    if resp == 0 || b == 0 || v == 0 {
        return Ok(zeros);
    }
    Ok(zeros.slice_assign([0..b, context - 1..context - 1 + resp, 0..v], cotangent))
}
