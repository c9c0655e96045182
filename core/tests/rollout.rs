//! Property tests of the rollout-correction family.
#![allow(clippy::needless_range_loop)]

use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::policy::rollout::*;
use posttrain_core::{Dims, Error};
use proptest::prelude::*;

/// A `[b, t]` batch: log-ratios in `[-lim, lim]` and a mask.
fn batch(lim: f64) -> impl Strategy<Value = (Dims, Vec<f64>, Vec<bool>)> {
    (1usize..5, 1usize..8).prop_flat_map(move |(b, t)| {
        (
            Just(Dims::new(b, t)),
            proptest::collection::vec(-lim..lim, b * t),
            proptest::collection::vec(any::<bool>(), b * t),
        )
    })
}

fn poison(x: &[f64], mask: &[bool]) -> Vec<f64> {
    let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
    x.iter()
        .zip(mask)
        .enumerate()
        .map(|(i, (&v, &m))| if m { v } else { bad[i % 3] })
        .collect()
}

fn is_cfg(level: IsLevel, th: &str, bn: bool) -> IsConfig {
    IsConfig::new(level, th.parse().unwrap(), bn).unwrap()
}

proptest! {
    #[test]
    fn token_tis_weights_are_truncated_ratios((dims, lr, mask) in batch(3.0), upper in 1.05f64..4.0) {
        let cfg = IsConfig::new(IsLevel::Token, IsThreshold::truncate(upper).unwrap(), false).unwrap();
        let mut w = vec![0.0; dims.len()];
        rollout_correction_weights(&cfg, dims, &lr, &mask, &mut w).unwrap();
        for i in 0..dims.len() {
            if mask[i] {
                prop_assert!(w[i] >= 0.0 && w[i] <= upper);
                if lr[i].exp() <= upper {
                    prop_assert!((w[i] - lr[i].exp()).abs() <= 1e-14 * lr[i].exp());
                }
            } else {
                prop_assert_eq!(w[i], 0.0);
            }
        }
    }

    #[test]
    fn sequence_weights_are_exp_of_masked_log_ratio_sum((dims, lr, mask) in batch(1.0)) {
        let cfg = is_cfg(IsLevel::Sequence, "1e6", false);
        let mut w = vec![0.0; dims.len()];
        rollout_correction_weights(&cfg, dims, &lr, &mask, &mut w).unwrap();
        for r in 0..dims.batch {
            let s: f64 = dims.row(r).filter(|&t| mask[t]).map(|t| lr[t]).sum();
            for t in dims.row(r) {
                if mask[t] {
                    prop_assert!((w[t] - s.exp()).abs() <= 1e-12 * s.exp());
                } else {
                    prop_assert_eq!(w[t], 0.0);
                }
            }
        }
    }

    #[test]
    fn icepop_weights_are_zero_or_in_band((dims, lr, mask) in batch(2.0), level in prop_oneof![Just(IsLevel::Token), Just(IsLevel::Sequence)]) {
        let cfg = is_cfg(level, "0.5_2.0", false);
        let mut w = vec![0.0; dims.len()];
        let m = rollout_correction_weights(&cfg, dims, &lr, &mask, &mut w).unwrap();
        for &x in &w {
            prop_assert!(x == 0.0 || (0.5..=2.0).contains(&x));
        }
        prop_assert!(m.oob_ratio.is_some());
    }

    #[test]
    fn batch_normalised_token_weights_have_unit_mean((dims, lr, mask) in batch(1.0)) {
        prop_assume!(mask.iter().any(|&m| m));
        let cfg = is_cfg(IsLevel::Token, "3.0", true);
        let mut w = vec![0.0; dims.len()];
        let m = rollout_correction_weights(&cfg, dims, &lr, &mask, &mut w).unwrap();
        let n = mask.iter().filter(|&&k| k).count() as f64;
        let mean: f64 = w.iter().zip(&mask).filter(|(_, &k)| k).map(|(&x, _)| x).sum::<f64>() / n;
        prop_assert!((mean - 1.0).abs() < 1e-7);
        prop_assert!(m.batch_norm_factor.unwrap() > 0.0);
    }

    #[test]
    fn masked_nan_changes_nothing((dims, lr, mask) in batch(1.5), level in prop_oneof![Just(IsLevel::Token), Just(IsLevel::Sequence)]) {
        let bad = poison(&lr, &mask);
        let is = is_cfg(level, "0.7_1.6", true);
        let (mut w1, mut w2) = (vec![0.0; dims.len()], vec![0.0; dims.len()]);
        let m1 = rollout_correction_weights(&is, dims, &lr, &mask, &mut w1).unwrap();
        let m2 = rollout_correction_weights(&is, dims, &bad, &mask, &mut w2).unwrap();
        prop_assert_eq!(&w1, &w2);
        prop_assert_eq!(m1, m2);

        let rs = RsConfig::parse("token_k1,seq_sum_k2,seq_max_k3,seq_mean_k1", "0.5_2.0,0.5,0.3,0.9_1.1").unwrap();
        let (mut k1, mut k2) = (vec![false; dims.len()], vec![false; dims.len()]);
        let mut rows = vec![0.0; dims.batch];
        let r1 = rollout_rejection_mask(&rs, dims, &lr, &mask, &mut k1, &mut rows).unwrap();
        let r2 = rollout_rejection_mask(&rs, dims, &bad, &mask, &mut k2, &mut rows).unwrap();
        prop_assert_eq!(&k1, &k2);
        prop_assert_eq!(r1, r2);

        let rollout = vec![-1.0; dims.len()];
        let lp: Vec<f64> = lr.iter().map(|x| x - 1.0).collect();
        let lp_bad = poison(&lp, &mask);
        let o1 = off_policy_metrics(dims, &lp, &rollout, &mask).unwrap();
        let o2 = off_policy_metrics(dims, &lp_bad, &rollout, &mask).unwrap();
        prop_assert_eq!(o1, o2);
    }

    #[test]
    fn rejection_keeps_a_subset_and_token_k1_is_a_ratio_band((dims, lr, mask) in batch(1.0)) {
        let rs = RsConfig::parse("token_k1", "0.8_1.25").unwrap();
        let mut keep = vec![false; dims.len()];
        let mut rows = vec![0.0; dims.batch];
        rollout_rejection_mask(&rs, dims, &lr, &mask, &mut keep, &mut rows).unwrap();
        for i in 0..dims.len() {
            prop_assert!(!keep[i] || mask[i]);
            if mask[i] {
                // k1 = −ℓ must lie in [ln 0.8, ln 1.25]: the bounds apply to 1/r.
                let inv = (-lr[i]).exp();
                let inside = (0.8f64.ln()..=1.25f64.ln()).contains(&-lr[i]);
                prop_assert_eq!(keep[i], inside, "1/r = {}", inv);
            }
        }
    }

    #[test]
    fn sequence_rejection_drops_whole_rows((dims, lr, mask) in batch(1.0)) {
        let rs = RsConfig::parse_uniform("seq_mean_k3", 0.05).unwrap();
        let mut keep = vec![false; dims.len()];
        let mut rows = vec![0.0; dims.batch];
        rollout_rejection_mask(&rs, dims, &lr, &mask, &mut keep, &mut rows).unwrap();
        for r in 0..dims.batch {
            let kept: Vec<bool> = dims.row(r).filter(|&t| mask[t]).map(|t| keep[t]).collect();
            prop_assert!(kept.iter().all(|&k| k) || kept.iter().all(|&k| !k));
        }
    }
}

fn bypass_loss(
    cfg: &BypassConfig,
    dims: Dims,
    lp: &[f64],
    old: &[f64],
    adv: &[f64],
    mask: &[bool],
    grad: Option<&mut [f64]>,
) -> f64 {
    let n = dims.len();
    let (mut w, mut tok, mut aw) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let mut keep = vec![false; n];
    let mut rows = vec![0.0; dims.batch];
    bypass_policy_loss(
        cfg,
        dims,
        lp,
        old,
        adv,
        mask,
        grad,
        BypassBuffers {
            is_weights: &mut w,
            keep: &mut keep,
            tokens: &mut tok,
            agg_weights: &mut aw,
            rows: &mut rows,
        },
    )
    .unwrap()
    .loss
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn bypass_gradient_matches_finite_differences(
        (dims, lr, mask) in batch(0.6),
        adv_seed in proptest::collection::vec(-2.0f64..2.0, 40),
        reinforce in any::<bool>(),
        mode in prop_oneof![Just(AggMode::TokenMean), Just(AggMode::SeqMeanTokenMean), Just(AggMode::SeqMeanTokenSum)],
    ) {
        let old: Vec<f64> = (0..dims.len()).map(|i| -1.0 - 0.1 * (i % 7) as f64).collect();
        let lp: Vec<f64> = old.iter().zip(&lr).map(|(o, l)| o + l).collect();
        let adv: Vec<f64> = (0..dims.len()).map(|i| adv_seed[i % 40]).collect();
        // Stay away from the clip kinks, where the derivative jumps.
        for &l in &lr {
            let r = l.exp();
            prop_assume!((r - 0.8).abs() > 1e-3 && (r - 1.28).abs() > 1e-3);
        }
        let loss = if reinforce { BypassLoss::Reinforce } else {
            BypassLoss::PpoClip(posttrain_core::policy::ClipConfig { eps_low: 0.2, eps_high: 0.28, dual_clip: Some(3.0), log_ratio_clamp: Some(20.0) })
        };
        // No IS / rejection in the loss path: they are constants of the loss.
        let cfg = BypassConfig::new(loss, RolloutCorrectionConfig::default(), mode, GlobalNorm::default()).unwrap();
        let mut g = vec![0.0; dims.len()];
        bypass_loss(&cfg, dims, &lp, &old, &adv, &mask, Some(&mut g));
        let h = 1e-6;
        for i in 0..dims.len() {
            let (mut p, mut m) = (lp.clone(), lp.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (bypass_loss(&cfg, dims, &p, &old, &adv, &mask, None) - bypass_loss(&cfg, dims, &m, &old, &adv, &mask, None)) / (2.0 * h);
            prop_assert!((fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()), "i={} fd={} g={}", i, fd, g[i]);
        }
    }

    #[test]
    fn bypass_all_masked_is_exactly_zero((dims, lr, _m) in batch(1.0)) {
        let mask = vec![false; dims.len()];
        let old = vec![-1.0; dims.len()];
        let lp: Vec<f64> = old.iter().zip(&lr).map(|(o, l)| o + l).collect();
        let adv = vec![1.0; dims.len()];
        let corr = RolloutCorrectionConfig {
            is: Some(is_cfg(IsLevel::Sequence, "2.0", true)),
            rs: Some(RsConfig::parse("token_k1,seq_max_k2", "0.5_2.0,0.2").unwrap()),
        };
        let cfg = BypassConfig::verl_ppo_clip(0.2, 0.28, 3.0, corr, AggMode::TokenMean, GlobalNorm::default()).unwrap();
        let mut g = vec![1.0; dims.len()];
        let l = bypass_loss(&cfg, dims, &lp, &old, &adv, &mask, Some(&mut g));
        prop_assert_eq!(l, 0.0);
        prop_assert!(g.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn vllm_ratio_respects_its_bounds((dims, lr, mask) in batch(2.0), seq in any::<bool>(), trunc in any::<bool>()) {
        let mode = match (seq, trunc) {
            (false, true) => VllmIsMode::TokenTruncate,
            (false, false) => VllmIsMode::TokenMask,
            (true, true) => VllmIsMode::SequenceTruncate,
            (true, false) => VllmIsMode::SequenceMask,
        };
        let cfg = VllmIsConfig::new(mode, Some(0.5), Some(2.0)).unwrap();
        let samp = vec![-1.0; dims.len()];
        let old: Vec<f64> = lr.iter().map(|l| l - 1.0).collect();
        let mut ratio = vec![0.0; if seq { dims.batch } else { dims.len() }];
        let m = vllm_importance_sampling_ratio(&cfg, dims, &old, &samp, &mask, &mut ratio).unwrap();
        for &r in &ratio {
            if trunc {
                prop_assert!((0.5..=2.0).contains(&r));
            } else {
                prop_assert!(r == 0.0 || (0.5..=2.0).contains(&r));
            }
        }
        if seq {
            for r in 0..dims.batch {
                let s: f64 = dims.row(r).filter(|&t| mask[t]).map(|t| lr[t]).sum();
                if trunc {
                    prop_assert!((ratio[r] - s.exp().clamp(0.5, 2.0)).abs() < 1e-12);
                }
            }
        }
        prop_assert_eq!(m.num_items, mask.iter().filter(|&&k| k).count());
    }
}

#[test]
fn option_strings_parse_and_refuse() {
    assert!(matches!(
        "tokens".parse::<IsLevel>(),
        Err(Error::UnknownOption { .. })
    ));
    assert!(matches!(
        "seq_max_k1".parse::<RsOption>(),
        Err(Error::UnknownOption { .. })
    ));
    assert!(matches!(
        "bogus".parse::<VllmIsMode>(),
        Err(Error::UnknownOption { .. })
    ));
    assert!(matches!(
        "2.0_0.5".parse::<IsThreshold>(),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        "-1".parse::<IsThreshold>(),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        RsConfig::parse("token_k1,token_k2", "1,2,3"),
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        RsConfig::parse("token_k2", "0.1_0.2"),
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(RsConfig::parse("", "1"), Err(Error::Empty { .. })));
    // A single k1 bound means lower = 1/upper; duplicates are dropped.
    let c = RsConfig::parse("token_k1, token_k1 ,seq_sum_k3", "1.25").unwrap();
    assert_eq!(c.len(), 2);
    let first = c.criteria().next().unwrap();
    assert_eq!(first.lower, Some(1.0 / 1.25));
    assert_eq!(first.option.name(), "token_k1");
    let t: IsThreshold = "0.5_2.0".parse().unwrap();
    assert_eq!((t.lower, t.upper), (Some(0.5), 2.0));
    assert!(BypassConfig::verl_ppo_clip(
        0.2,
        0.2,
        1.0,
        RolloutCorrectionConfig::default(),
        AggMode::TokenMean,
        GlobalNorm::default()
    )
    .is_err());
}

#[test]
fn shape_mismatch_is_an_error() {
    let cfg = RolloutCorrectionConfig::default();
    let dims = Dims::new(2, 3);
    let (mut w, mut keep, mut lr, mut rows) =
        (vec![0.0; 6], vec![false; 6], vec![0.0; 6], vec![0.0; 2]);
    let r = rollout_correction_and_rejection(
        &cfg,
        dims,
        &[0.0; 6],
        &[0.0; 5],
        &[true; 6],
        CorrectionBuffers {
            weights: &mut w,
            keep: &mut keep,
            log_ratio: &mut lr,
            rows: &mut rows,
        },
    );
    assert!(matches!(r, Err(Error::ShapeMismatch { .. })));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn hostile_log_ratios_give_finite_metrics(
        (dims, lr, mask) in batch(1.0),
        seq in any::<bool>(),
        band in any::<bool>(),
    ) {
        // Log-ratios of ±1000: every weight, metric and the loss stay finite.
        let rollout: Vec<f64> = lr.iter().map(|x| x - 1.0).collect();
        let lp: Vec<f64> = rollout
            .iter()
            .enumerate()
            .map(|(i, x)| x + if i % 2 == 0 { 1000.0 } else { -1000.0 })
            .collect();
        let level = if seq { IsLevel::Sequence } else { IsLevel::Token };
        let corr = RolloutCorrectionConfig {
            is: Some(is_cfg(level, if band { "0.5_2.0" } else { "2.0" }, true)),
            rs: Some(RsConfig::parse("token_k1,seq_sum_k3,seq_max_k2", "0.5_2.0,0.3,0.2").unwrap()),
        };
        let cfg = BypassConfig::new(BypassLoss::Reinforce, corr, AggMode::TokenMean, GlobalNorm::default()).unwrap();
        let n = dims.len();
        let (mut w, mut tok, mut aw) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let mut keep = vec![false; n];
        let mut rows = vec![0.0; dims.batch];
        let mut g = vec![0.0; n];
        let adv = vec![1.0; n];
        let out = bypass_policy_loss(
            &cfg, dims, &lp, &rollout, &adv, &mask, Some(&mut g),
            BypassBuffers { is_weights: &mut w, keep: &mut keep, tokens: &mut tok, agg_weights: &mut aw, rows: &mut rows },
        ).unwrap();
        prop_assert!(out.loss.is_finite() && g.iter().all(|x| x.is_finite()));
        prop_assert!(w.iter().all(|x| x.is_finite()));
        let text = format!("{:?}", out.correction);
        prop_assert!(!text.contains("inf") && !text.contains("NaN"), "{}", text);
    }
}

/// TRL's vLLM IS ratio on a sampler log-prob vLLM could not score (NaN):
/// f2cd577 propagates it into the ratio and every metric; 1.16.0 takes the
/// token's difference as 0 (ratio `bound(1)`), keeps it in the ratio
/// metrics and leaves it out of the log-prob-difference ones. NaN in
/// padding never reaches anything in either.
#[test]
fn vllm_ratio_nan_sampler_log_probs() {
    let nan = f64::NAN;
    let dims = Dims::new(2, 3);
    let old = [-1.0, -2.0, -0.5, -1.0, -1.0, -1.0];
    let samp = [-1.5, nan, -0.25, -1.0, -0.5, nan];
    let mask = [true, true, true, true, true, false];
    let run = |mode: VllmIsMode, lo, hi, nan_mode| {
        let cfg = VllmIsConfig::new(mode, lo, hi)
            .unwrap()
            .with_nan_sampler_log_probs(nan_mode);
        let mut r = vec![0.0; if mode.is_sequence() { 2 } else { 6 }];
        let m = vllm_importance_sampling_ratio(&cfg, dims, &old, &samp, &mask, &mut r).unwrap();
        (r, m)
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
    let on = NanSamplerLogProbs::AsOnPolicy;
    let off = NanSamplerLogProbs::Propagate;
    assert_eq!(NanSamplerLogProbs::default(), off);
    assert_eq!(
        VllmIsConfig::new(VllmIsMode::TokenMask, None, None)
            .unwrap()
            .nan_sampler_log_probs,
        off
    );

    // Token truncate, 1.16.0: d = [0.5, 0, −0.25, 0, −0.5, pad].
    let (r, m) = run(VllmIsMode::TokenTruncate, None, Some(1.5), on);
    let want = [1.5, 1.0, (-0.25f64).exp(), 1.0, (-0.5f64).exp(), 1.0];
    for (a, b) in r.iter().zip(want) {
        assert!(close(*a, b), "{r:?}");
    }
    // |d| over the 4 valid non-NaN tokens: (0.5 + 0.25 + 0 + 0.5) / 4.
    assert!(close(m.logp_difference_mean, 1.25 / 4.0));
    assert_eq!(m.logp_difference_max, 0.5);
    // The NaN token is in the ratio metrics, as ratio 1.
    assert_eq!(m.num_items, 5);
    assert!(close(m.ratio_min, (-0.5f64).exp()));
    assert_eq!(m.ratio_max, 1.5);
    let mean = (1.5 + 1.0 + (-0.25f64).exp() + 1.0 + (-0.5f64).exp()) / 5.0;
    assert!(close(m.ratio_mean, mean));
    // A band that excludes 1 zeroes the NaN token's ratio in 1.16.0 too.
    let (r, _) = run(VllmIsMode::TokenMask, Some(1.1), None, on);
    assert_eq!(r[1], 0.0);
    let (r, _) = run(VllmIsMode::TokenTruncate, Some(1.1), None, on);
    assert_eq!(r[1], 1.1);

    // f2cd577: NaN propagates through every mode's ratio (mask modes too:
    // TRL zeroes only `r < min | r > max`) and the metrics.
    for mode in [VllmIsMode::TokenTruncate, VllmIsMode::TokenMask] {
        let (r, m) = run(mode, Some(0.5), Some(1.5), off);
        assert!(r[1].is_nan(), "{mode:?} {r:?}");
        assert!(r.iter().enumerate().all(|(i, v)| i == 1 || !v.is_nan()));
        assert_eq!(r[5], 1.0); // padding: bound(1), never its NaN
        assert!(m.logp_difference_mean.is_nan() && m.logp_difference_max.is_nan());
        assert!(m.ratio_min.is_nan() && m.ratio_mean.is_nan() && m.ratio_max.is_nan());
    }
    for mode in [VllmIsMode::SequenceTruncate, VllmIsMode::SequenceMask] {
        let (r, m) = run(mode, Some(0.5), Some(1.5), off);
        assert!(r[0].is_nan(), "{mode:?} {r:?}");
        assert!(!r[1].is_nan(), "padding NaN leaked into row 1");
        assert!(m.ratio_mean.is_nan() && m.logp_difference_max.is_nan());
    }

    // Sequence modes, 1.16.0: Σd = 0.25 and −0.5 (the NaN adds nothing).
    let (r, m) = run(VllmIsMode::SequenceTruncate, None, Some(3.0), on);
    assert!(close(r[0], 0.25f64.exp()) && close(r[1], (-0.5f64).exp()));
    assert!(close(m.ratio_mean, (0.25f64.exp() + (-0.5f64).exp()) / 2.0));
    assert!(close(m.logp_difference_mean, 1.25 / 4.0));
    let (r, _) = run(VllmIsMode::SequenceMask, Some(0.7), Some(1.3), on);
    assert!(close(r[0], 0.25f64.exp()) && r[1] == 0.0);
}

/// Only NaN tokens on valid positions: the log-prob-difference metrics of
/// 1.16.0 have nothing to average and are 0 (TRL's empty-selection value).
#[test]
fn vllm_ratio_all_nan_valid_tokens_as_on_policy() {
    let dims = Dims::new(1, 2);
    let cfg = VllmIsConfig::new(VllmIsMode::SequenceMask, None, Some(2.0))
        .unwrap()
        .with_nan_sampler_log_probs(NanSamplerLogProbs::AsOnPolicy);
    let mut r = [0.0f32];
    let m = vllm_importance_sampling_ratio(
        &cfg,
        dims,
        &[-1.0f32, -2.0],
        &[f32::NAN, f32::NAN],
        &[true, true],
        &mut r,
    )
    .unwrap();
    assert_eq!(r, [1.0]);
    assert_eq!((m.logp_difference_mean, m.logp_difference_max), (0.0, 0.0));
    assert_eq!((m.ratio_min, m.ratio_mean, m.ratio_max), (1.0, 1.0, 1.0));
    assert_eq!(
        "as_on_policy".parse::<NanSamplerLogProbs>().unwrap(),
        NanSamplerLogProbs::AsOnPolicy
    );
    assert_eq!(NanSamplerLogProbs::AsOnPolicy.name(), "as_on_policy");
    assert!(matches!(
        "zero".parse::<NanSamplerLogProbs>(),
        Err(Error::UnknownOption { .. })
    ));
}

#[test]
fn rejection_criteria_built_field_by_field_are_validated() {
    let seq_max_k1 = RsCriterion {
        option: RsOption {
            aggregation: RsAggregation::SeqMax,
            divergence: Divergence::K1,
        },
        lower: Some(0.5),
        upper: 2.0,
    };
    assert!("seq_max_k1".parse::<RsOption>().is_err());
    assert!(matches!(
        RsCriterion::new(seq_max_k1.option, None, 2.0),
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        RsConfig::new(&[seq_max_k1]),
        Err(Error::Invalid { .. })
    ));
    let token_k1: RsOption = "token_k1".parse().unwrap();
    let token_k3: RsOption = "token_k3".parse().unwrap();
    for bad in [
        // k1 without its lower bound
        RsCriterion {
            option: token_k1,
            lower: None,
            upper: 2.0,
        },
        // lower above upper
        RsCriterion {
            option: token_k1,
            lower: Some(3.0),
            upper: 2.0,
        },
        // a lower bound on k3
        RsCriterion {
            option: token_k3,
            lower: Some(0.1),
            upper: 2.0,
        },
        // a non-finite or non-positive upper bound
        RsCriterion {
            option: token_k3,
            lower: None,
            upper: f64::NAN,
        },
        RsCriterion {
            option: token_k3,
            lower: None,
            upper: 0.0,
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
        assert!(RsConfig::new(&[bad]).is_err(), "{bad:?}");
    }
    let ok = RsCriterion::new(token_k1, None, 2.0).unwrap();
    assert_eq!(ok.lower, Some(0.5));
    assert!(ok.validate().is_ok());
    let cfg = RsConfig::new(&[ok]).unwrap();
    assert!(cfg.validate().is_ok());
}

#[cfg(feature = "serde")]
#[test]
fn a_deserialized_rejection_config_is_validated_before_use() {
    let good = RsConfig::parse("token_k1", "0.5_2.0").unwrap();
    let mut v = serde_json::to_value(good).unwrap();
    // turn token_k1 into seq_max_k1 behind the constructors' back
    v["criteria"][0]["option"]["aggregation"] = serde_json::json!("SeqMax");
    let bad: RsConfig = serde_json::from_value(v).unwrap();
    let dims = Dims::new(1, 3);
    let (lr, mask) = ([0.0f64, 0.1, -0.1], [true; 3]);
    let (mut keep, mut rows) = ([false; 3], [0.0f64; 1]);
    assert!(matches!(
        rollout_rejection_mask(&bad, dims, &lr, &mask, &mut keep, &mut rows),
        Err(Error::Invalid { .. })
    ));
    assert!(rollout_rejection_mask(&good, dims, &lr, &mask, &mut keep, &mut rows).is_ok());
}
