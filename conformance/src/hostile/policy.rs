//! Hostile inputs for the `policy` family (fuzz target `fuzz/fuzz_targets/policy.rs`):
//! verl's token-level policy losses (every mode of the registry, with IS
//! weights, every aggregation mode and global normalizer), OpenRLHF's clipped
//! PPO/GSPO loss (dual clip, vLLM IS corrections) and TRL's GRPO family
//! (every loss type and IS level, KL, entropy mask and bonus, vLLM IS ratio).
//!
//! Each op goes through [`contract`]: raw hostile values must not panic;
//! finite values give finite outputs in `f64` and (with realistic magnitudes)
//! in `f32`; masked positions holding NaN/±inf change nothing bit for bit;
//! the closed-form gradient matches central finite differences.

use super::aggregate::{cast, expect_err, finite_only, global_norm, tame, wide};
use super::{assert_finite, assert_same_bits, check_gradient, decode, fill_masked};
use super::{dims, float, floats, log_probs, mask, maybe_wrong_len};
use arbitrary::{Result as ArbResult, Unstructured};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::policy::grpo::{
    gmpo_loss, grpo_loss, rloo_loss, AdaptiveEntropy, EntropyBonus, GmpoConfig, GrpoConfig,
    GrpoInputs, GrpoLossType, ImportanceSamplingLevel, RlooConfig, TokenOrRow,
};
use posttrain_core::policy::ppo::{
    clipped_policy_loss, ClippedPolicyLoss, RatioLevel, RolloutIsCorrection, RolloutIsKind,
};
use posttrain_core::policy::rollout::{
    bypass_policy_loss_vec, rollout_correction_and_rejection_vec, vllm_importance_sampling_ratio,
    BypassConfig, BypassLoss, IsConfig, IsLevel, IsThreshold, NanSamplerLogProbs,
    RolloutCorrectionConfig, RsConfig, VllmIsConfig, VllmIsMode,
};
use posttrain_core::policy::sequence_mean::{
    completion_clipped_loss, on_policy_loss, token_clipped_loss, SequenceMeanConfig,
    TokenCountGuard,
};
use posttrain_core::policy::token::{
    policy_loss, PolicyBatch, PolicyLoss, PolicyLossMode, VerlPolicyParams,
};
use posttrain_core::policy::ClipConfig;
use posttrain_core::sequence::{
    high_entropy_mask, off_policy_sequence_mask, pf_ppo_sampling_weights, quantile,
    response_mask_from_eos, PfPpoReweight,
};
use posttrain_core::{Dims, Error, Real};

/// Decodes `data` into calls of this family's ops and checks the contract
/// of the [module docs](super).
pub fn run(data: &[u8]) {
    let _ = decode(data, |u| match u.int_in_range(0..=6u8)? {
        0 => verl_policy(u),
        1 => openrlhf_policy(u),
        2 => grpo(u),
        3 => sequence_mean(u),
        4 => rollout(u),
        5 => gmpo_rloo(u),
        _ => sequence_helpers(u),
    });
}

// ---------------------------------------------------------------------------
// The shared contract.
// ---------------------------------------------------------------------------

/// An op evaluated on `f64` inputs (in some precision), flat outputs.
pub(crate) type OpFn<'a> = dyn Fn(&[Vec<f64>]) -> Result<Vec<f64>, Error> + 'a;

/// One op under test: its inputs are `Vec<f64>`s (log-probs first), its
/// outputs one flat `Vec<f64>` whose element 0 is the scalar loss.
pub(crate) struct Op<'a> {
    pub what: &'static str,
    pub f64: &'a OpFn<'a>,
    pub f32: &'a OpFn<'a>,
    /// Per input: the mask whose `false` positions are poisoned (None: the
    /// input is never padding).
    pub masks: Vec<Option<&'a [bool]>>,
    /// Per input: the `f32` magnitude bound (log-probs: 30, others: 10).
    pub f32_lim: Vec<f64>,
    /// Output indices that legitimately read padding (peer semantics).
    pub read_padding: Vec<usize>,
    /// `(input, offset)`: `∂out[0]/∂input[k] = out[offset + k]`.
    pub grads: Vec<(usize, usize)>,
    /// Whether the masked-invariance check applies at all.
    pub masked_check: bool,
}

pub(crate) fn contract(op: &Op, raw: &[Vec<f64>]) {
    let _ = (op.f64)(raw);
    let _ = (op.f32)(raw);
    let fin: Vec<Vec<f64>> = raw.iter().map(|x| finite_only(x)).collect();
    let a = match (op.f64)(&fin) {
        Ok(a) => a,
        Err(e) => panic!("{}: finite input gave {e:?}", op.what),
    };
    assert_finite(op.what, &a);
    let x32: Vec<Vec<f64>> = fin
        .iter()
        .zip(&op.f32_lim)
        .map(|(x, &l)| tame(x, l))
        .collect();
    match (op.f32)(&x32) {
        Ok(v) => assert_finite(&format!("{} f32", op.what), &v),
        Err(e) => panic!("{} f32: finite input gave {e:?}", op.what),
    }
    if op.masked_check {
        let fill = |p: bool| -> Vec<Vec<f64>> {
            fin.iter()
                .zip(&op.masks)
                .map(|(x, m)| match m {
                    Some(m) => fill_masked(x, m, p),
                    None => x.clone(),
                })
                .collect()
        };
        let keep = |v: Vec<f64>| -> Vec<f64> {
            v.into_iter()
                .enumerate()
                .filter(|(i, _)| !op.read_padding.contains(i))
                .map(|(_, x)| x)
                .collect()
        };
        let z = keep((op.f64)(&fill(false)).unwrap());
        let p = keep((op.f64)(&fill(true)).unwrap());
        assert_same_bits(&format!("{} masked", op.what), &z, &p);
    }
    let small: Vec<Vec<f64>> = fin.iter().map(|x| fd_point(x, 5.0)).collect();
    let g = (op.f64)(&small).unwrap();
    if g[0].is_nan() || g[0].abs() >= 1e4 {
        return; // a huge loss swamps the finite differences
    }
    for &(k, off) in &op.grads {
        let n = small[k].len();
        let value = |y: &[f64]| {
            let mut z = small.clone();
            z[k] = y.to_vec();
            (op.f64)(&z).ok().map(|o| o[0])
        };
        let ks: Vec<usize> = [0, n / 3, n / 2, n.saturating_sub(1)]
            .into_iter()
            .filter(|&j| j < n && smooth_at(&value, &small[k], j))
            .collect();
        check_gradient(
            &format!("{} ∂input{k}", op.what),
            &value,
            &small[k],
            &g[off..off + n],
            &ks,
        );
    }
}

fn is_out_of_range(e: &Error) -> bool {
    matches!(e, Error::OutOfRange { .. })
}

fn is_shape(e: &Error) -> bool {
    matches!(e, Error::ShapeMismatch { .. })
}

/// A clip epsilon: usually in [0, 1), sometimes hostile.
fn eps(u: &mut Unstructured) -> ArbResult<f64> {
    Ok(if u.int_in_range(0..=7u8)? == 0 {
        float(u, 1.0, true)?
    } else {
        float(u, 1.0, false)?.abs().min(0.99)
    })
}

// ---------------------------------------------------------------------------
// verl token-level policy losses.
// ---------------------------------------------------------------------------

fn verl_params(u: &mut Unstructured) -> ArbResult<VerlPolicyParams> {
    let mut p = VerlPolicyParams::default();
    if u.arbitrary()? {
        p.clip_ratio = eps(u)?;
    }
    if u.arbitrary()? {
        p.clip_ratio_low = Some(eps(u)?);
    }
    if u.arbitrary()? {
        p.clip_ratio_high = Some(eps(u)?);
    }
    if u.arbitrary()? {
        p.clip_ratio_c = 1.0 + rare(u, 5.0)?;
    }
    if u.arbitrary()? {
        p.tau_pos = float(u, 2.0, true)?;
        p.tau_neg = float(u, 2.0, true)?;
    }
    if u.arbitrary()? {
        p.clip_cov_ratio = float(u, 0.5, true)?;
        p.clip_cov_lb = float(u, 5.0, true)?;
        p.clip_cov_ub = float(u, 5.0, true)?;
    }
    if u.arbitrary()? {
        p.kl_cov_ratio = float(u, 0.5, true)?;
        p.ppo_kl_coef = coefficient(float(u, 1.0, true)?);
    }
    if u.arbitrary()? {
        p.dro_beta = Some(float(u, 2.0, true)?);
    }
    Ok(p)
}

fn policy_call<F: Real>(
    loss: &PolicyLoss,
    agg: AggMode,
    norm: &GlobalNorm,
    d: Dims,
    m: &[bool],
    with_is: bool,
    x: &[Vec<f64>],
) -> Result<Vec<f64>, Error> {
    let (lp, old, adv, w) = (
        cast::<F>(&x[0]),
        cast::<F>(&x[1]),
        cast::<F>(&x[2]),
        cast::<F>(&x[3]),
    );
    let batch = PolicyBatch {
        dims: d,
        log_prob: &lp,
        old_log_prob: &old,
        advantages: &adv,
        mask: m,
        is_weights: with_is.then_some(&w[..]),
    };
    let mut scratch = vec![F::zero(); PolicyLoss::scratch_len(d)];
    let mut g = vec![F::zero(); lp.len()];
    let o = policy_loss(
        loss,
        agg,
        norm,
        &batch,
        &mut scratch,
        Some((F::one(), &mut g)),
    )?;
    let mut out = wide(&[o.loss, o.clipfrac, o.clipfrac_lower, o.approx_kl]);
    out.extend(wide(&g));
    Ok(out)
}

fn verl_policy(u: &mut Unstructured) -> ArbResult<()> {
    let mode = *u.choose(&PolicyLossMode::ALL)?;
    let name = *u.choose(&[mode.name(), "ppo", "grpo", "Vanilla"])?;
    if let Err(e) = name.parse::<PolicyLossMode>() {
        assert!(matches!(e, Error::UnknownOption { .. }), "{e:?}");
    }
    let p = verl_params(u)?;
    let loss = if u.int_in_range(0..=5u8)? == 0 {
        // A hand-built PPO config, possibly out of range.
        let c = ClipConfig {
            eps_low: eps(u)?,
            eps_high: eps(u)?,
            dual_clip: if u.arbitrary()? {
                Some(float(u, 4.0, true)?)
            } else {
                None
            },
            log_ratio_clamp: if u.arbitrary()? {
                Some(float(u, 30.0, true)?)
            } else {
                None
            },
        };
        let ok = c.eps_low.is_finite()
            && c.eps_low >= 0.0
            && c.eps_high.is_finite()
            && c.eps_high >= 0.0
            && c.dual_clip.is_none_or(|c| c.is_finite() && c > 1.0)
            && c.log_ratio_clamp.is_none_or(|k| k.is_finite() && k > 0.0);
        let l = PolicyLoss::Ppo(c);
        match l.validate() {
            Ok(()) => assert!(ok, "invalid clip config accepted: {c:?}"),
            Err(e) => {
                assert!(!ok && is_out_of_range(&e), "{e:?}");
            }
        }
        if !ok {
            return Ok(());
        }
        l
    } else {
        match PolicyLoss::from_verl(mode, &p) {
            Ok(l) => l,
            Err(e) => {
                assert!(
                    is_out_of_range(&e) || matches!(e, Error::Invalid { .. }),
                    "{e:?}"
                );
                return Ok(());
            }
        }
    };
    let agg = *u.choose(&AggMode::ALL)?;
    let (norm, nok) = global_norm(u)?;
    let d = dims(u)?;
    let n = d.len();
    let (na, bad) = maybe_wrong_len(u, n)?;
    let with_is: bool = u.arbitrary()?;
    let raw = vec![
        floats(u, n, 30.0, false)?,
        floats(u, n, 30.0, false)?,
        floats(u, na, 5.0, false)?,
        floats(u, n, 2.0, false)?.iter().map(|v| v.abs()).collect(),
    ];
    let m = mask(u, n)?;
    let f64c = |x: &[Vec<f64>]| policy_call::<f64>(&loss, agg, &norm, d, &m, with_is, x);
    let f32c = |x: &[Vec<f64>]| policy_call::<f32>(&loss, agg, &norm, d, &m, with_is, x);
    if bad || !nok {
        expect_err("policy_loss malformed", f64c(&raw), |e| {
            bad && is_shape(e) || !nok && is_out_of_range(e)
        });
        return Ok(());
    }
    let mut fin_lp = raw.clone();
    fin_lp[0] = finite_only(&raw[0]).iter().map(|v| -v.abs()).collect();
    fin_lp[1] = log_probs(u, n)?;
    let op = Op {
        what: "verl policy_loss",
        f64: &f64c,
        f32: &f32c,
        masks: vec![Some(&m); 4],
        f32_lim: vec![30.0, 30.0, 10.0, 10.0],
        read_padding: vec![],
        // Modes whose value holds detached factors (straight-through GSPO,
        // clip-cov/DPPO's detached tokens and ratios, CISPO's detached
        // weight, KL-cov's selection) have a gradient that is by design not
        // the derivative of the value: no finite-difference check there.
        // (A log-ratio clamp narrower than the probe's step: see `grpo`.)
        // (as is a SAPO gate σ(τ·(r − 1)) with τ ≫ 1/h.)
        grads: if !matches!(loss, PolicyLoss::Ppo(c) if c.log_ratio_clamp.is_some_and(|k| k < 1e-3))
            && !matches!(loss, PolicyLoss::SoftGate { tau_pos, tau_neg } if tau_pos.max(tau_neg) > 1e3)
            && matches!(
                loss,
                PolicyLoss::Ppo(_)
                    | PolicyLoss::LogProb
                    | PolicyLoss::SoftGate { .. }
                    | PolicyLoss::QuadraticPenalty { .. }
                    | PolicyLoss::GeometricMean { .. }
            ) {
            vec![(0, 4)]
        } else {
            vec![]
        },
        masked_check: true,
    };
    let _ = f64c(&raw);
    contract(&op, &fin_lp);
    Ok(())
}

// ---------------------------------------------------------------------------
// OpenRLHF clipped PPO / GSPO.
// ---------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn openrlhf_call<F: Real>(
    cfg: &ClippedPolicyLoss,
    norm: &GlobalNorm,
    d: Dims,
    m: &[bool],
    with_rollout: bool,
    x: &[Vec<f64>],
) -> Result<Vec<f64>, Error> {
    let (lp, old, adv, r) = (
        cast::<F>(&x[0]),
        cast::<F>(&x[1]),
        cast::<F>(&x[2]),
        cast::<F>(&x[3]),
    );
    let batch = PolicyBatch {
        dims: d,
        log_prob: &lp,
        old_log_prob: &old,
        advantages: &adv,
        mask: m,
        is_weights: None,
    };
    let mut scratch = vec![F::zero(); ClippedPolicyLoss::scratch_len(d)];
    let mut g = vec![F::zero(); lp.len()];
    let o = clipped_policy_loss(
        cfg,
        norm,
        &batch,
        with_rollout.then_some(&r[..]),
        &mut scratch,
        Some((F::one(), &mut g)),
    )?;
    let mut out = wide(&[
        o.loss,
        o.clip_ratio,
        o.approx_kl,
        o.rollout_kl.unwrap_or(F::zero()),
    ]);
    out.extend(wide(&g));
    Ok(out)
}

fn openrlhf_policy(u: &mut Unstructured) -> ArbResult<()> {
    let (lo, hi) = (eps(u)?, eps(u)?);
    let dual = if u.arbitrary()? {
        Some(1.0 + rare(u, 4.0)?)
    } else {
        None
    };
    let ratio = *u.choose(&[RatioLevel::Token, RatioLevel::Sequence])?;
    let token_level: bool = u.arbitrary()?;
    let correction = if u.arbitrary()? {
        let kind = *u.choose(&[
            RolloutIsKind::Truncate,
            RolloutIsKind::TokenMask,
            RolloutIsKind::SequenceMask,
        ])?;
        let name = *u.choose(&["tis", "icepop", "seq-mask-tis", "is"])?;
        if let Err(e) = name.parse::<RolloutIsKind>() {
            assert!(matches!(e, Error::UnknownOption { .. }));
        }
        let low = rare(u, 1.0)?.abs();
        let high = low + rare(u, 5.0)?;
        Some(RolloutIsCorrection { kind, low, high })
    } else {
        None
    };
    let cfg = ClippedPolicyLoss::openrlhf(lo, hi, dual, ratio, token_level, correction);
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            assert!(is_out_of_range(&e), "{e:?}");
            return Ok(());
        }
    };
    let (norm, nok) = global_norm(u)?;
    let d = dims(u)?;
    let n = d.len();
    let (na, bad) = maybe_wrong_len(u, n)?;
    let with_rollout: bool = u.arbitrary()?;
    let m = mask(u, n)?;
    let raw = vec![
        floats(u, n, 30.0, false)?,
        floats(u, n, 30.0, false)?,
        floats(u, na, 5.0, false)?,
        floats(u, n, 30.0, false)?,
    ];
    let f64c = |x: &[Vec<f64>]| openrlhf_call::<f64>(&cfg, &norm, d, &m, with_rollout, x);
    let f32c = |x: &[Vec<f64>]| openrlhf_call::<f32>(&cfg, &norm, d, &m, with_rollout, x);
    let missing = correction.is_some() && !with_rollout;
    if bad || !nok || missing {
        expect_err("clipped_policy_loss malformed", f64c(&raw), |e| {
            bad && is_shape(e)
                || !nok && is_out_of_range(e)
                || missing && matches!(e, Error::Invalid { .. })
        });
        return Ok(());
    }
    let _ = f64c(&raw);
    let mut x = raw.clone();
    x[0] = finite_only(&raw[0]).iter().map(|v| -v.abs()).collect();
    x[1] = log_probs(u, n)?;
    x[3] = log_probs(u, n)?;
    let op = Op {
        what: "openrlhf clipped_policy_loss",
        f64: &f64c,
        f32: &f32c,
        masks: vec![Some(&m); 4],
        f32_lim: vec![30.0, 30.0, 10.0, 30.0],
        read_padding: vec![],
        grads: vec![(0, 4)],
        masked_check: true,
    };
    contract(&op, &x);
    Ok(())
}

// ---------------------------------------------------------------------------
// TRL GRPO family.
// ---------------------------------------------------------------------------

struct GrpoCase {
    cfg: GrpoConfig,
    /// `cfg.off_policy_nan_sampler_log_probs`, drawn after every other byte
    /// (so that the committed inputs keep their meaning).
    nan: core::cell::Cell<NanSamplerLogProbs>,
    d: Dims,
    m: Vec<bool>,
    with_old: bool,
    with_ref: bool,
    with_sampling: bool,
    is_ratio: Option<bool>, // Some(per_token)
}

fn grpo_call<F: Real>(c: &GrpoCase, x: &[Vec<f64>]) -> Result<Vec<f64>, Error> {
    let v: Vec<Vec<F>> = x.iter().map(|x| cast::<F>(x)).collect();
    let mut inp = GrpoInputs::new(c.d, &v[0], &v[1], &c.m, &v[2]);
    if c.with_old {
        inp = inp.old_log_probs(&v[3]);
    }
    if c.with_ref {
        inp = inp.ref_log_probs(&v[4]);
    }
    if c.with_sampling {
        inp = inp.sampling_log_probs(&v[5]);
    }
    match c.is_ratio {
        Some(true) => inp = inp.importance_sampling_ratio(TokenOrRow::Token(&v[6])),
        Some(false) => inp = inp.importance_sampling_ratio(TokenOrRow::Row(&v[7])),
        None => {}
    }
    let n = c.d.len();
    let mut gl = vec![F::zero(); n];
    let mut ge = vec![F::zero(); n];
    let mut scratch = vec![F::zero(); n];
    let mut cfg = c.cfg;
    cfg.off_policy_nan_sampler_log_probs = c.nan.get();
    let o = grpo_loss(&cfg, &inp, Some(&mut gl), Some(&mut ge), &mut scratch)?;
    let mut out = wide(&[
        o.loss,
        o.policy_loss,
        o.entropy,
        o.kl,
        o.clip.low_mean,
        o.clip.high_mean,
        o.clip.region_mean,
        o.clip.low_min,
        o.clip.high_max,
        o.cispo_clip_ratio,
        o.vespo_phi_seq_mean,
        o.entropy_coef,
        o.world_entropy,
    ]);
    out.extend(wide(&gl));
    out.extend(wide(&ge));
    Ok(out)
}

fn grpo(u: &mut Unstructured) -> ArbResult<()> {
    let lt = *u.choose(&GrpoLossType::ALL)?;
    let name = *u.choose(&[lt.name(), "gspo", "drgrpo"])?;
    if let Err(e) = name.parse::<GrpoLossType>() {
        assert!(matches!(e, Error::UnknownOption { .. }));
    }
    let mut cfg = GrpoConfig::trl(lt);
    cfg.level = *u.choose(&[
        ImportanceSamplingLevel::Token,
        ImportanceSamplingLevel::Sequence,
        ImportanceSamplingLevel::SequenceToken,
    ])?;
    cfg.eps_low = eps(u)?;
    cfg.eps_high = eps(u)?;
    if u.arbitrary()? {
        cfg.delta = Some(1.0 + rare(u, 3.0)?);
    }
    if u.arbitrary()? {
        cfg.beta = coefficient(rare(u, 0.5)?.abs());
        cfg.bias_correction_kl = u.arbitrary()?;
    }
    if u.arbitrary()? {
        cfg.top_entropy_quantile = rare(u, 1.0)?.abs();
    }
    cfg.vllm_is_correction = u.arbitrary()?;
    if u.arbitrary()? {
        cfg.off_policy_mask_threshold = Some(rare(u, 2.0)?);
    }
    if u.arbitrary()? {
        cfg.sapo_temperature_pos = float(u, 2.0, true)?.abs();
        cfg.sapo_temperature_neg = float(u, 2.0, true)?.abs();
    }
    if u.arbitrary()? {
        cfg.vespo.k_pos = float(u, 4.0, true)?;
        cfg.vespo.lambda_neg = float(u, 4.0, true)?;
    }
    if u.arbitrary()? {
        cfg.norm.max_completion_length = *u.choose(&[1.0, 4.0, 256.0, 0.0, f64::NAN])?;
        cfg.norm.num_items_in_batch = *u.choose(&[0.0, 1.0, 7.0, 100.0, -1.0, f64::INFINITY])?;
        cfg.norm.num_processes = *u.choose(&[1.0, 2.0, 8.0, 0.5])?;
        cfg.norm.gradient_accumulation_steps = *u.choose(&[1.0, 4.0, 0.0])?;
        cfg.norm.train = u.arbitrary()?;
    }
    if u.arbitrary()? {
        let adaptive = if u.arbitrary()? {
            Some(AdaptiveEntropy {
                target: float(u, 2.0, false)?,
                coef_min: 0.0,
                coef_max: float(u, 1.0, false)?.abs(),
                coef_delta: float(u, 0.1, false)?.abs(),
                last_world_entropy: float(u, 3.0, true)?,
            })
        } else {
            None
        };
        cfg.entropy_bonus = Some(EntropyBonus {
            coef: coefficient(rare(u, 0.1)?),
            adaptive,
        });
    }
    cfg.log_ratio_clamp = match u.int_in_range(0..=7u8)? {
        0 => None,
        1 => Some(float(u, 30.0, true)?),
        _ => Some(20.0),
    };
    let valid = cfg.validate();
    let d = dims(u)?;
    let n = d.len();
    let (na, bad) = maybe_wrong_len(u, d.batch)?;
    let case = GrpoCase {
        cfg,
        nan: core::cell::Cell::new(NanSamplerLogProbs::Propagate),
        d,
        m: mask(u, n)?,
        with_old: u.arbitrary()?,
        with_ref: u.arbitrary()?,
        with_sampling: u.arbitrary()?,
        is_ratio: if u.arbitrary()? {
            Some(u.arbitrary()?)
        } else {
            None
        },
    };
    let raw = vec![
        floats(u, n, 30.0, false)?,                                  // 0 log-probs
        floats(u, n, 3.0, false)?,                                   // 1 entropies
        floats(u, na, 3.0, false)?,                                  // 2 advantages (per row)
        floats(u, n, 30.0, false)?,                                  // 3 old
        floats(u, n, 30.0, false)?,                                  // 4 ref
        floats(u, n, 30.0, false)?,                                  // 5 sampling
        floats(u, n, 2.0, false)?.iter().map(|v| v.abs()).collect(), // 6 IS ratio per token
        floats(u, d.batch, 2.0, false)?
            .iter()
            .map(|v| v.abs())
            .collect(), // 7 per row
    ];
    let f64c = |x: &[Vec<f64>]| grpo_call::<f64>(&case, x);
    let f32c = |x: &[Vec<f64>]| grpo_call::<f32>(&case, x);
    if let Err(e) = valid {
        assert!(is_out_of_range(&e), "{e:?}");
        expect_err("grpo config", f64c(&raw), is_out_of_range);
        return Ok(());
    }
    if bad {
        expect_err("grpo length", f64c(&raw), is_shape);
        return Ok(());
    }
    let needs_ref = case.cfg.beta != 0.0 && !case.with_ref;
    let needs_is =
        case.cfg.vllm_is_correction && lt != GrpoLossType::Vespo && case.is_ratio.is_none();
    if needs_ref || needs_is {
        expect_err("grpo missing input", f64c(&raw), |e| {
            matches!(e, Error::Invalid { .. })
        });
        return Ok(());
    }
    let _ = f64c(&raw);
    let mut x = raw.clone();
    x[0] = finite_only(&raw[0]).iter().map(|v| -v.abs()).collect();
    x[3] = log_probs(u, n)?;
    x[4] = log_probs(u, n)?;
    x[5] = log_probs(u, n)?;
    // Sampler log-probs vLLM could not score: both releases' off-policy mask.
    case.nan.set(*u.choose(&[
        NanSamplerLogProbs::Propagate,
        NanSamplerLogProbs::AsOnPolicy,
    ])?);
    let m = &case.m[..];
    // TRL's luspo weighs every (B, T) entry, padding included (documented in
    // `policy::grpo`): no masked-invariance check for it.
    let luspo_token = lt == GrpoLossType::Luspo;
    // A clamp beyond e^30 does not keep the ratios representable: treat
    // it as TRL's unclamped loss (finite only for representable ratios).
    let unclamped = case.cfg.log_ratio_clamp.is_none_or(|c| c > 30.0);
    let op = Op {
        what: "trl grpo_loss",
        f64: &f64c,
        f32: &f32c,
        masks: vec![
            Some(m),
            Some(m),
            None,
            Some(m),
            Some(m),
            Some(m),
            Some(m),
            None,
        ],
        f32_lim: vec![30.0, 10.0, 10.0, 30.0, 30.0, 30.0, 10.0, 10.0],
        read_padding: vec![],
        // CISPO's weight and VESPO's φ are detached, and `sequence_token`
        // is straight-through: their value is not the gradient's primitive.
        // Without old log-probs TRL's ratio is `exp(logp − sg(logp))`: value
        // 1, gradient 1. A log-ratio clamp narrower than the probe's step
        // (1e-6) puts clamp edges on both sides of the point, where the
        // finite difference sees the flat clamped value and not the slope.
        grads: if lt == GrpoLossType::Cispo
            || lt == GrpoLossType::Vespo
            || case.cfg.level == ImportanceSamplingLevel::SequenceToken
            || !case.with_old
            || case.cfg.log_ratio_clamp.is_some_and(|c| c < 1e-3)
            // SAPO's gate σ(τ·(r − 1)) is as sharp: a step for τ ≫ 1/h.
            || (lt == GrpoLossType::Sapo
                && case.cfg.sapo_temperature_pos.max(case.cfg.sapo_temperature_neg) > 1e3)
        {
            vec![(1, 13 + n)]
        } else {
            vec![(0, 13), (1, 13 + n)]
        },
        masked_check: !luspo_token,
    };
    if unclamped {
        // No log-ratio clamp (TRL's own numbers): finite only while the
        // ratios are representable.
        let x: Vec<Vec<f64>> = x.iter().map(|v| tame(v, 30.0)).collect();
        contract(&op, &x);
    } else {
        contract(&op, &x);
    }
    Ok(())
}

/// A float in `[-scale, scale]`, one time in eight a hostile one.
fn rare(u: &mut Unstructured, scale: f64) -> ArbResult<f64> {
    let hostile = u.int_in_range(0..=7u8)? == 0;
    float(u, scale, hostile)
}

/// A smooth, tie-free copy of `x` within about `±lim` for finite-difference
/// probes: `lim·tanh(x/lim)` plus a small per-index offset (ties would put
/// selections — quantiles, maxima — exactly on a kink).
pub(crate) fn fd_point(x: &[f64], lim: f64) -> Vec<f64> {
    finite_only(x)
        .iter()
        .enumerate()
        .map(|(i, &v)| lim * (v / lim).tanh() + 1e-3 * ((i * 7919) % 101) as f64 / 101.0)
        .collect()
}

// ---------------------------------------------------------------------------
// torchtune per-sequence-mean losses.
// ---------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn seq_mean_call<F: Real>(
    which: u8,
    cfg: &SequenceMeanConfig,
    guard: TokenCountGuard,
    d: Dims,
    m: Option<&[bool]>,
    x: &[Vec<f64>],
) -> Result<Vec<f64>, Error> {
    let (lp, old, rf, adv) = (
        cast::<F>(&x[0]),
        cast::<F>(&x[1]),
        cast::<F>(&x[2]),
        cast::<F>(&x[3]),
    );
    let mut g = vec![F::zero(); lp.len()];
    let o = match which {
        0 => token_clipped_loss(cfg, d, &old, &lp, &rf, &adv, m, Some(&mut g))?,
        1 => completion_clipped_loss(cfg, d, &old, &lp, &rf, &adv, m, Some(&mut g))?,
        _ => on_policy_loss(cfg, guard, d, &lp, &rf, &adv, m, Some(&mut g))?,
    };
    let mut out = wide(&[o.loss, o.policy_loss, o.kl_loss, o.ratio_mean, o.clipfrac]);
    out.extend(wide(&g));
    Ok(out)
}

fn sequence_mean(u: &mut Unstructured) -> ArbResult<()> {
    let which = u.int_in_range(0..=2u8)?;
    let cfg = if u.arbitrary()? {
        Ok(SequenceMeanConfig::preset(
            posttrain_core::Preset::Torchtune,
        ))
    } else {
        // Finite KL coefficients within ±1e3 (so that f32 stays finite),
        // non-finite ones as they come (they must be rejected).
        let k = rare(u, 1.0)?;
        SequenceMeanConfig::new(eps(u)?, if k.is_finite() { k.clamp(-1e3, 1e3) } else { k })
    };
    let guard = match u.int_in_range(0..=3u8)? {
        0 => TokenCountGuard::TORCHTUNE_SIMPLE,
        1 => TokenCountGuard::TORCHTUNE_CHUNKED,
        2 => TokenCountGuard::Add(rare(u, 1.0)?),
        _ => TokenCountGuard::AtLeast(rare(u, 1.0)?),
    };
    let d = dims(u)?;
    let n = d.len();
    let (na, bad) = maybe_wrong_len(u, d.batch)?;
    let m = mask(u, n)?;
    let m = u.arbitrary::<bool>()?.then_some(&m[..]);
    let raw = vec![
        floats(u, n, 30.0, false)?,
        floats(u, n, 30.0, false)?,
        floats(u, n, 30.0, false)?,
        floats(u, na, 5.0, false)?,
    ];
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            assert!(is_out_of_range(&e), "{e:?}");
            return Ok(());
        }
    };
    let (TokenCountGuard::Add(ge) | TokenCountGuard::AtLeast(ge)) = guard;
    let guard_ok = which != 2 || ge.is_finite() && ge > 0.0;
    let f64c = |x: &[Vec<f64>]| seq_mean_call::<f64>(which, &cfg, guard, d, m, x);
    let f32c = |x: &[Vec<f64>]| seq_mean_call::<f32>(which, &cfg, guard, d, m, x);
    if bad || !guard_ok {
        expect_err("sequence-mean malformed", f64c(&raw), |e| {
            bad && is_shape(e)
                || !guard_ok && is_out_of_range(e)
                || d.batch == 0 && matches!(e, Error::Empty { .. })
        });
        return Ok(());
    }
    let _ = f64c(&raw);
    let r = f64c(&raw.iter().map(|x| finite_only(x)).collect::<Vec<_>>());
    if n == 0 {
        // Whole-batch means of nothing: a typed error or finite numbers.
        if let Ok(v) = r {
            assert_finite("sequence-mean empty", &v);
        }
        return Ok(());
    }
    let mut x = raw.clone();
    x[0] = finite_only(&raw[0]).iter().map(|v| -v.abs()).collect();
    x[1] = log_probs(u, n)?;
    x[2] = log_probs(u, n)?;
    let mm = m.unwrap_or(&[]);
    let masks = match m {
        Some(_) => vec![Some(mm), Some(mm), Some(mm), None],
        None => vec![None; 4],
    };
    let op = Op {
        what: "torchtune sequence-mean loss",
        f64: &f64c,
        f32: &f32c,
        masks,
        f32_lim: vec![30.0, 30.0, 30.0, 10.0],
        // ratio_mean averages every position (torchtune `ratios.mean()`).
        read_padding: vec![3],
        // The on-policy form's ratio is `exp(logp − sg(logp))` (value 1).
        grads: if which == 2 { vec![] } else { vec![(0, 5)] },
        masked_check: true,
    };
    contract(&op, &x);
    Ok(())
}

// ---------------------------------------------------------------------------
// Sequence helpers: EOS masks, quantiles, entropy / off-policy masks, PF-PPO.
// ---------------------------------------------------------------------------

fn sequence_helpers(u: &mut Unstructured) -> ArbResult<()> {
    let d = dims(u)?;
    let n = d.len();
    match u.int_in_range(0..=4u8)? {
        0 => {
            let (ni, bad) = maybe_wrong_len(u, n)?;
            let ids: Vec<i64> = (0..ni)
                .map(|_| u.int_in_range(-2..=5))
                .collect::<ArbResult<_>>()?;
            let eos: Vec<i64> = (0..u.int_in_range(0..=3usize)?)
                .map(|_| u.int_in_range(-2..=5))
                .collect::<ArbResult<_>>()?;
            let mut m = vec![false; n];
            let r = response_mask_from_eos(d, &ids, &eos, &mut m);
            if bad {
                expect_err("eos mask length", r, is_shape);
            }
        }
        1 => {
            let q = rare(u, 1.0)?.abs();
            let len = u.int_in_range(0..=20usize)?;
            let mut v = floats(u, len, 10.0, false)?;
            let r = quantile(&mut v, q);
            if (0.0..=1.0).contains(&q) {
                let r = r.expect("valid quantile");
                let fin = finite_only(&v);
                let mut fin2 = fin.clone();
                if let Some(x) = quantile(&mut fin2, q).unwrap() {
                    assert!(x.is_finite(), "quantile of finite values {x:e}");
                    let (lo, hi) = fin
                        .iter()
                        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                    assert!(
                        lo <= x && x <= hi,
                        "quantile {x:e} outside [{lo:e}, {hi:e}]"
                    );
                }
                let _ = r;
            } else {
                expect_err("quantile q", r, is_out_of_range);
            }
        }
        2 => {
            let q = rare(u, 1.0)?.abs();
            let (ne, bad) = maybe_wrong_len(u, n)?;
            let e = floats(u, ne, 3.0, false)?;
            let m = mask(u, n)?;
            let mut out = vec![false; n];
            let mut scratch = vec![0.0; n];
            let r = high_entropy_mask(d, &e, &m, q, &mut out, &mut scratch);
            if bad || !(0.0..=1.0).contains(&q) {
                expect_err("high_entropy_mask", r, |e| {
                    is_shape(e) || is_out_of_range(e)
                });
            } else {
                let _ = r.unwrap();
                assert!(
                    out.iter().zip(&m).all(|(&o, &m)| m || !o),
                    "masked token kept"
                );
            }
        }
        3 => {
            let th = rare(u, 2.0)?;
            let (na, bad) = maybe_wrong_len(u, d.batch)?;
            let adv = floats(u, na, 3.0, false)?;
            let lp = floats(u, n, 30.0, false)?;
            let sp = floats(u, n, 30.0, false)?;
            let m = mask(u, n)?;
            let nan = *u.choose(&[
                NanSamplerLogProbs::Propagate,
                NanSamplerLogProbs::AsOnPolicy,
            ])?;
            let mut keep = vec![false; n];
            let r = off_policy_sequence_mask(d, &adv, &lp, &sp, &m, th, nan, &mut keep);
            if bad {
                expect_err("off_policy_sequence_mask", r, |e| {
                    is_shape(e) || is_out_of_range(e)
                });
            } else if r.is_ok() {
                // Masked padding changes nothing.
                let mut k2 = vec![false; n];
                let p = |x: &[f64]| fill_masked(&finite_only(x), &m, true);
                let z = |x: &[f64]| fill_masked(&finite_only(x), &m, false);
                off_policy_sequence_mask(d, &adv, &z(&lp), &z(&sp), &m, th, nan, &mut keep)
                    .unwrap();
                off_policy_sequence_mask(d, &adv, &p(&lp), &p(&sp), &m, th, nan, &mut k2).unwrap();
                assert_eq!(keep, k2, "off-policy mask read padding");
            }
        }
        _ => {
            let method = match u.int_in_range(0..=3u8)? {
                0 => PfPpoReweight::parse("pow", rare(u, 4.0)?),
                1 => PfPpoReweight::parse("max_min", 0.0),
                2 => PfPpoReweight::parse("max_random", 0.0),
                _ => PfPpoReweight::parse("min_max", 0.0),
            };
            let (ns, bad) = maybe_wrong_len(u, n)?;
            let sc = floats(u, ns, 3.0, false)?;
            let Ok(method) = method else {
                return Ok(());
            };
            let mut w = vec![0.0; d.batch];
            let r = pf_ppo_sampling_weights(method, d, &sc, &mut w);
            if bad {
                expect_err("pf_ppo length", r, is_shape);
                return Ok(());
            }
            let bounded = match method {
                PfPpoReweight::Pow(p) => (0.0..=4.0).contains(&p),
                _ => true,
            };
            if bounded {
                pf_ppo_sampling_weights(method, d, &tame(&sc, 1e3), &mut w).unwrap();
                assert_finite("pf_ppo weights", &w);
                assert!(w.iter().all(|&v| v > 0.0), "pf_ppo weight ≤ 0: {w:?}");
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Rollout correction: IS weights, rejection, bypass loss, vLLM IS ratio.
// ---------------------------------------------------------------------------

const RS_NAMES: [&str; 6] = [
    "token_k1",
    "seq_sum_k2",
    "seq_mean_k3",
    "seq_max_k3",
    "token_k3",
    "seq_max_k1",
];

fn correction_config(u: &mut Unstructured) -> ArbResult<Result<RolloutCorrectionConfig, Error>> {
    let is = if u.arbitrary()? {
        let level = *u.choose(&[IsLevel::Token, IsLevel::Sequence])?;
        let th = if u.arbitrary()? {
            IsThreshold::truncate(rare(u, 4.0)?.abs() + 0.5)
        } else {
            let lo = rare(u, 1.0)?.abs();
            IsThreshold::band(lo, lo + rare(u, 4.0)?)
        };
        match th.and_then(|t| IsConfig::new(level, t, u.arbitrary().unwrap_or(false))) {
            Ok(c) => Some(c),
            Err(e) => return Ok(Err(e)),
        }
    } else {
        None
    };
    let rs = if u.arbitrary()? {
        match RsConfig::parse_uniform(u.choose(&RS_NAMES)?, rare(u, 4.0)?.abs() + 0.1) {
            Ok(c) => Some(c),
            Err(e) => return Ok(Err(e)),
        }
    } else {
        None
    };
    Ok(Ok(RolloutCorrectionConfig { is, rs }))
}

fn rollout(u: &mut Unstructured) -> ArbResult<()> {
    let which = u.int_in_range(0..=2u8)?;
    let d = dims(u)?;
    let n = d.len();
    let (nr, bad) = maybe_wrong_len(u, n)?;
    let m = mask(u, n)?;
    let raw = vec![
        floats(u, n, 30.0, false)?,
        floats(u, nr, 30.0, false)?,
        floats(u, n, 5.0, false)?,
    ];
    let some_error = |e: &Error| {
        matches!(
            e,
            Error::OutOfRange { .. } | Error::UnknownOption { .. } | Error::Invalid { .. }
        )
    };
    match which {
        0 => {
            let mode = *u.choose(&[
                VllmIsMode::TokenTruncate,
                VllmIsMode::TokenMask,
                VllmIsMode::SequenceTruncate,
                VllmIsMode::SequenceMask,
            ])?;
            let lo = if u.arbitrary()? {
                Some(rare(u, 1.0)?.abs())
            } else {
                None
            };
            let hi = if u.arbitrary()? {
                Some(rare(u, 4.0)?)
            } else {
                None
            };
            // Drawn after every other byte (committed inputs keep their meaning).
            let nan = core::cell::Cell::new(NanSamplerLogProbs::Propagate);
            let cfg = match VllmIsConfig::new(mode, lo, hi) {
                Ok(c) => c,
                Err(e) => {
                    assert!(is_out_of_range(&e), "{e:?}");
                    return Ok(());
                }
            };
            let call = |x: &[Vec<f64>]| -> Result<Vec<f64>, Error> {
                let seq = mode.is_sequence();
                let mut r = vec![0.0; if seq { d.batch } else { n }];
                let cfg = cfg.with_nan_sampler_log_probs(nan.get());
                let mt = vllm_importance_sampling_ratio(&cfg, d, &x[0], &x[1], &m, &mut r)?;
                let mut out = vec![mt.ratio_mean, mt.ratio_min, mt.ratio_max];
                if seq {
                    out.extend(&r);
                } else {
                    out.extend((0..n).filter(|&i| m[i]).map(|i| r[i]));
                }
                Ok(out)
            };
            if bad {
                expect_err("vllm IS length", call(&raw), is_shape);
                return Ok(());
            }
            let _ = call(&raw);
            let x: Vec<Vec<f64>> = vec![
                finite_only(&raw[0]).iter().map(|v| -v.abs()).collect(),
                log_probs(u, n)?,
            ];
            nan.set(*u.choose(&[
                NanSamplerLogProbs::Propagate,
                NanSamplerLogProbs::AsOnPolicy,
            ])?);
            let a = call(&x).unwrap();
            assert_finite("vllm IS ratio", &a);
            if nan.get() == NanSamplerLogProbs::AsOnPolicy {
                // TRL 1.16.0: a token vLLM could not score is on-policy.
                let mut xn = x.clone();
                for (i, v) in xn[1].iter_mut().enumerate() {
                    if i % 2 == 0 {
                        *v = f64::NAN;
                    }
                }
                assert_finite("vllm IS ratio (NaN sampler, 1.16)", &call(&xn).unwrap());
            }
            let z = call(&[fill_masked(&x[0], &m, false), fill_masked(&x[1], &m, false)]).unwrap();
            let p = call(&[fill_masked(&x[0], &m, true), fill_masked(&x[1], &m, true)]).unwrap();
            assert_same_bits("vllm IS masked", &z, &p);
        }
        1 => {
            let cfg = match correction_config(u)? {
                Ok(c) => c,
                Err(e) => {
                    assert!(some_error(&e), "{e:?}");
                    return Ok(());
                }
            };
            let call = |x: &[Vec<f64>]| -> Result<Vec<f64>, Error> {
                let (_, v) = rollout_correction_and_rejection_vec(&cfg, d, &x[0], &x[1], &m)?;
                let mut out: Vec<f64> = (0..n).filter(|&i| m[i]).map(|i| v.weights[i]).collect();
                out.extend(v.keep.iter().map(|&k| k as u8 as f64));
                Ok(out)
            };
            if bad {
                expect_err("rollout correction length", call(&raw), is_shape);
                return Ok(());
            }
            let _ = call(&raw);
            let x: Vec<Vec<f64>> = vec![
                finite_only(&raw[0]).iter().map(|v| -v.abs()).collect(),
                log_probs(u, n)?,
            ];
            let a = call(&x).unwrap();
            assert_finite("rollout correction", &a);
            let z = call(&[fill_masked(&x[0], &m, false), fill_masked(&x[1], &m, false)]).unwrap();
            let p = call(&[fill_masked(&x[0], &m, true), fill_masked(&x[1], &m, true)]).unwrap();
            assert_same_bits("rollout correction masked", &z, &p);
        }
        _ => {
            let corr = match correction_config(u)? {
                Ok(c) => c,
                Err(e) => {
                    assert!(some_error(&e), "{e:?}");
                    return Ok(());
                }
            };
            let agg = *u.choose(&AggMode::ALL)?;
            let (norm, nok) = global_norm(u)?;
            let cfg = if u.arbitrary()? {
                BypassConfig::new(BypassLoss::Reinforce, corr, agg, norm)
            } else {
                BypassConfig::verl_ppo_clip(eps(u)?, eps(u)?, 1.0 + rare(u, 4.0)?, corr, agg, norm)
            };
            let cfg = match cfg {
                Ok(c) => c,
                Err(e) => {
                    assert!(is_out_of_range(&e), "{e:?}");
                    return Ok(());
                }
            };
            let f = |x: &[Vec<f64>]| -> Result<Vec<f64>, Error> {
                let (o, v) = bypass_policy_loss_vec(&cfg, d, &x[0], &x[1], &x[2], &m)?;
                let mut out = vec![o.loss, o.ppo_kl];
                out.extend(v.grad);
                Ok(out)
            };
            let f32f = |x: &[Vec<f64>]| -> Result<Vec<f64>, Error> {
                let (o, v) = bypass_policy_loss_vec(
                    &cfg,
                    d,
                    &cast::<f32>(&x[0]),
                    &cast::<f32>(&x[1]),
                    &cast::<f32>(&x[2]),
                    &m,
                )?;
                let mut out = wide(&[o.loss, o.ppo_kl]);
                out.extend(wide(&v.grad));
                Ok(out)
            };
            if bad || !nok {
                expect_err("bypass malformed", f(&raw), |e| {
                    bad && is_shape(e) || !nok && is_out_of_range(e)
                });
                return Ok(());
            }
            let _ = f(&raw);
            let mut x = raw.clone();
            x[0] = finite_only(&raw[0]).iter().map(|v| -v.abs()).collect();
            x[1] = log_probs(u, n)?;
            let op = Op {
                what: "verl bypass_policy_loss",
                f64: &f,
                f32: &f32f,
                masks: vec![Some(&m); 3],
                f32_lim: vec![30.0, 30.0, 10.0],
                read_padding: vec![],
                // The IS weights and rejection are detached selections of the
                // log-probs: the value is not the gradient's primitive there.
                grads: if corr.is.is_none() && corr.rs.is_none() {
                    vec![(0, 2)]
                } else {
                    vec![]
                },
                masked_check: true,
            };
            contract(&op, &x);
        }
    }
    Ok(())
}

/// A loss coefficient as drawn, but with finite ones kept within ±1e3 (so
/// that `f32` stays finite; non-finite ones must be rejected).
fn coefficient(v: f64) -> f64 {
    if v.is_finite() {
        v.clamp(-1e3, 1e3)
    } else {
        v
    }
}

// ---------------------------------------------------------------------------
// TRL GMPO and RLOO (sequence-level ratios).
// ---------------------------------------------------------------------------

fn clamp_choice(u: &mut Unstructured) -> ArbResult<Option<f64>> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => None,
        1 => Some(float(u, 30.0, true)?),
        _ => Some(20.0),
    })
}

fn gmpo_rloo(u: &mut Unstructured) -> ArbResult<()> {
    let is_gmpo: bool = u.arbitrary()?;
    let mut g = GmpoConfig::trl();
    g.eps_low = eps(u)?;
    g.eps_high = eps(u)?;
    if u.arbitrary()? {
        g.beta = coefficient(rare(u, 0.5)?.abs());
    }
    if u.arbitrary()? {
        g.top_entropy_quantile = rare(u, 1.0)?.abs();
    }
    g.train = u.arbitrary()?;
    g.log_ratio_clamp = clamp_choice(u)?;
    let mut r = RlooConfig::trl();
    r.eps_low = eps(u)?;
    r.eps_high = eps(u)?;
    r.log_ratio_clamp = clamp_choice(u)?;
    let valid = if is_gmpo { g.validate() } else { r.validate() };
    let d = dims(u)?;
    let n = d.len();
    let (na, bad) = maybe_wrong_len(u, d.batch)?;
    let m = mask(u, n)?;
    let with_ref: bool = u.arbitrary()?;
    let raw = vec![
        floats(u, n, 30.0, false)?,       // 0 log-probs
        floats(u, n, 3.0, false)?,        // 1 entropies
        floats(u, na, 3.0, false)?,       // 2 advantages
        floats(u, n, 30.0, false)?,       // 3 old (GMPO)
        floats(u, n, 30.0, false)?,       // 4 ref
        floats(u, d.batch, 30.0, false)?, // 5 per-row old log-prob sums (RLOO)
    ];
    let call = |x: &[Vec<f64>], f32p: bool| -> Result<Vec<f64>, Error> {
        fn go<F: Real>(
            is_gmpo: bool,
            g: &GmpoConfig,
            r: &RlooConfig,
            d: Dims,
            m: &[bool],
            with_ref: bool,
            x: &[Vec<f64>],
        ) -> Result<Vec<f64>, Error> {
            let v: Vec<Vec<F>> = x.iter().map(|x| cast::<F>(x)).collect();
            let mut inp = GrpoInputs::new(d, &v[0], &v[1], m, &v[2]).old_log_probs(&v[3]);
            if with_ref {
                inp = inp.ref_log_probs(&v[4]);
            }
            let mut gl = vec![F::zero(); d.len()];
            let o = if is_gmpo {
                let mut scratch = vec![F::zero(); d.len()];
                gmpo_loss(g, &inp, Some(&mut gl), &mut scratch)?
            } else {
                rloo_loss(r, &inp, &v[5], Some(&mut gl))?
            };
            let mut out = wide(&[o.loss, o.entropy, o.kl]);
            out.extend(wide(&gl));
            Ok(out)
        }
        if f32p {
            go::<f32>(is_gmpo, &g, &r, d, &m, with_ref, x)
        } else {
            go::<f64>(is_gmpo, &g, &r, d, &m, with_ref, x)
        }
    };
    let f64c = |x: &[Vec<f64>]| call(x, false);
    let f32c = |x: &[Vec<f64>]| call(x, true);
    if let Err(e) = valid {
        assert!(is_out_of_range(&e), "{e:?}");
        expect_err("gmpo/rloo config", f64c(&raw), is_out_of_range);
        return Ok(());
    }
    if bad {
        expect_err("gmpo/rloo length", f64c(&raw), is_shape);
        return Ok(());
    }
    let r0 = f64c(&raw);
    if is_gmpo && g.beta != 0.0 && !with_ref {
        expect_err("gmpo missing ref", r0, |e| {
            matches!(e, Error::Invalid { .. })
        });
        return Ok(());
    }
    let mut x = raw.clone();
    x[0] = finite_only(&raw[0]).iter().map(|v| -v.abs()).collect();
    x[3] = log_probs(u, n)?;
    x[4] = log_probs(u, n)?;
    x[5] = finite_only(&raw[5]).iter().map(|v| -v.abs()).collect();
    let clamp = if is_gmpo {
        g.log_ratio_clamp
    } else {
        r.log_ratio_clamp
    };
    let unclamped = clamp.is_none_or(|c| c > 30.0); // as in `grpo`
                                                    // A clamp narrower than the probe's step: see `grpo`.
    let narrow_clamp = clamp.is_some_and(|c| c < 1e-3);
    if unclamped {
        // TRL's own unclamped numbers: finite only while representable.
        x = x.iter().map(|v| tame(v, 30.0)).collect();
    }
    let op = Op {
        what: if is_gmpo {
            "trl gmpo_loss"
        } else {
            "trl rloo_loss"
        },
        f64: &f64c,
        f32: &f32c,
        masks: vec![Some(&m), Some(&m), None, Some(&m), Some(&m), None],
        f32_lim: vec![30.0, 10.0, 10.0, 30.0, 30.0, 30.0],
        read_padding: vec![],
        grads: if narrow_clamp { vec![] } else { vec![(0, 3)] },
        masked_check: true,
    };
    contract(&op, &x);
    Ok(())
}

/// Whether the one-sided slopes at `x[j]` agree relatively (a kink with
/// small slopes — a clamp edge hit exactly — escapes the absolute test of
/// [`check_gradient`]).
pub(crate) fn smooth_at(value: &dyn Fn(&[f64]) -> Option<f64>, x: &[f64], j: usize) -> bool {
    let h = 1e-6 * (1.0 + x[j].abs());
    let at = |d: f64| {
        let mut y = x.to_vec();
        y[j] += d;
        value(&y)
    };
    let (Some(f0), Some(fp), Some(fm)) = (at(0.0), at(h), at(-h)) else {
        return false;
    };
    let (r, l) = ((fp - f0) / h, (f0 - fm) / h);
    (r - l).abs() <= 1e-3 * (r.abs() + l.abs()) + 1e-9
}
