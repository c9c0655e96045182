//! Property tests of the sequence utilities.
#![allow(clippy::needless_range_loop)]

use posttrain_core::policy::rollout::NanSamplerLogProbs;
use posttrain_core::sequence::*;
use posttrain_core::{Dims, Error};
use proptest::prelude::*;

fn ids() -> impl Strategy<Value = (Dims, Vec<i64>)> {
    (1usize..5, 1usize..9).prop_flat_map(|(b, t)| {
        (
            Just(Dims::new(b, t)),
            proptest::collection::vec(0i64..6, b * t),
        )
    })
}

fn floats(lo: f64, hi: f64) -> impl Strategy<Value = (Dims, Vec<f64>, Vec<bool>)> {
    (1usize..5, 1usize..8).prop_flat_map(move |(b, t)| {
        (
            Just(Dims::new(b, t)),
            proptest::collection::vec(lo..hi, b * t),
            proptest::collection::vec(any::<bool>(), b * t),
        )
    })
}

proptest! {
    #[test]
    fn response_mask_is_the_complement_of_truncation_padding((dims, seq) in ids(), fill in -2i64..3) {
        let stops = [2i64, 5];
        let mut mask = vec![false; dims.len()];
        response_mask_from_eos(dims, &seq, &stops, &mut mask).unwrap();
        let mut truncated = seq.clone();
        let mut pad = vec![false; dims.len()];
        truncate_at_first_stop_token(dims, &mut truncated, &stops, fill, &mut pad).unwrap();
        for r in 0..dims.batch {
            let row = dims.row(r);
            // A prefix of trues, ending at the first stop token (inclusive).
            let first = row.clone().find(|&t| stops.contains(&seq[t]));
            for t in row {
                let expect = first.is_none_or(|f| t <= f);
                prop_assert_eq!(mask[t], expect);
                prop_assert_eq!(pad[t], !expect);
                prop_assert_eq!(truncated[t], if expect { seq[t] } else { fill });
            }
        }
    }

    #[test]
    fn reward_penalty_flags_missing_eos_and_short_rows((dims, seq) in ids(), min_len in proptest::option::of(0i64..8)) {
        let mut truncated = seq.clone();
        let mut pad = vec![false; dims.len()];
        truncate_at_first_stop_token(dims, &mut truncated, &[2], 0, &mut pad).unwrap();
        let lens: Vec<i64> = (0..dims.batch).map(|r| dims.row(r).filter(|&t| !pad[t]).count() as i64).collect();
        let cfg = RewardPenaltyConfig { penalise_no_eos: true, min_response_length: min_len };
        let mut out = vec![false; dims.batch];
        reward_penalty_mask(&cfg, dims, &pad, &lens, &mut out).unwrap();
        for r in 0..dims.batch {
            let no_eos = !pad[dims.row(r)].iter().any(|&p| p);
            let short = min_len.is_some_and(|m| lens[r] < m);
            prop_assert_eq!(out[r], no_eos || short);
        }
    }

    #[test]
    fn high_entropy_mask_selects_the_top_quantile((dims, h, mask) in floats(0.0, 3.0), q in 0.0f64..=1.0) {
        let mut out = vec![false; dims.len()];
        let mut scratch = vec![0.0; dims.len()];
        let tau = high_entropy_mask(dims, &h, &mask, q, &mut out, &mut scratch).unwrap();
        let valid: Vec<f64> = h.iter().zip(&mask).filter(|(_, &m)| m).map(|(&x, _)| x).collect();
        match tau {
            None => prop_assert!(valid.is_empty() && out.iter().all(|&o| !o)),
            Some(t) => {
                let lo = valid.iter().cloned().fold(f64::INFINITY, f64::min);
                let hi = valid.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                prop_assert!(t >= lo && t <= hi);
                for i in 0..dims.len() {
                    prop_assert_eq!(out[i], mask[i] && h[i] >= t);
                }
                // At least the largest valid entropy is always selected.
                prop_assert!(out.iter().any(|&o| o));
            }
        }
    }

    #[test]
    fn quantile_is_monotone_in_q(mut v in proptest::collection::vec(-5.0f64..5.0, 1..20), a in 0.0f64..=1.0, b in 0.0f64..=1.0) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let mut w = v.clone();
        let ql = quantile(&mut v, lo).unwrap().unwrap();
        let qh = quantile(&mut w, hi).unwrap().unwrap();
        prop_assert!(ql <= qh);
    }

    #[test]
    fn off_policy_mask_keeps_positive_advantages_and_ignores_padding(
        (dims, lp, mask) in floats(-3.0, 0.0),
        adv in proptest::collection::vec(-1.0f64..1.0, 5),
        thr in 0.0f64..0.3,
    ) {
        let sampling: Vec<f64> = lp.iter().enumerate().map(|(i, x)| x + 0.1 * (i % 5) as f64).collect();
        let adv = &adv[..dims.batch];
        for nan in [NanSamplerLogProbs::Propagate, NanSamplerLogProbs::AsOnPolicy] {
            let mut keep = vec![false; dims.batch];
            off_policy_sequence_mask(dims, adv, &lp, &sampling, &mask, thr, nan, &mut keep).unwrap();
            for r in 0..dims.batch {
                if adv[r] >= 0.0 {
                    prop_assert!(keep[r]);
                }
            }
            let poisoned: Vec<f64> = lp.iter().zip(&mask).map(|(&x, &m)| if m { x } else { f64::NAN }).collect();
            let mut keep2 = vec![false; dims.batch];
            off_policy_sequence_mask(dims, adv, &poisoned, &sampling, &mask, thr, nan, &mut keep2).unwrap();
            prop_assert_eq!(&keep, &keep2);
        }
    }

    #[test]
    fn off_policy_mask_as_on_policy_is_a_zero_difference(
        (dims, lp, mask) in floats(-3.0, 0.0),
        adv in proptest::collection::vec(-1.0f64..1.0, 5),
        thr in -0.1f64..0.3,
        holes in proptest::collection::vec(any::<bool>(), 40),
    ) {
        // TRL 1.16.0: a NaN sampler log-prob is the token's own log-prob
        // (difference 0), the row's valid-token count unchanged.
        let adv = &adv[..dims.batch];
        let sampling: Vec<f64> = lp.iter().enumerate().map(|(i, x)| x + 0.05 * (i % 7) as f64 - 0.1).collect();
        let nan_at = |i: usize| holes[i % holes.len()];
        let with_nan: Vec<f64> = sampling.iter().enumerate().map(|(i, &x)| if nan_at(i) { f64::NAN } else { x }).collect();
        let on_policy: Vec<f64> = sampling.iter().zip(&lp).enumerate().map(|(i, (&x, &l))| if nan_at(i) { l } else { x }).collect();
        let (mut a, mut b) = (vec![false; dims.batch], vec![false; dims.batch]);
        off_policy_sequence_mask(dims, adv, &lp, &with_nan, &mask, thr, NanSamplerLogProbs::AsOnPolicy, &mut a).unwrap();
        off_policy_sequence_mask(dims, adv, &lp, &on_policy, &mask, thr, NanSamplerLogProbs::Propagate, &mut b).unwrap();
        prop_assert_eq!(&a, &b);
        // f2cd577: a row with a valid NaN token keeps only if A ≥ 0.
        off_policy_sequence_mask(dims, adv, &lp, &with_nan, &mask, thr, NanSamplerLogProbs::Propagate, &mut a).unwrap();
        for r in 0..dims.batch {
            if dims.row(r).any(|t| mask[t] && nan_at(t)) {
                prop_assert_eq!(a[r], adv[r] >= 0.0);
            }
        }
    }

    #[test]
    fn pf_ppo_weights_are_positive_and_mark_extremes((dims, s, _m) in floats(-2.0, 2.0), p in 0.5f64..3.0) {
        let mut w = vec![0.0; dims.batch];
        pf_ppo_sampling_weights(PfPpoReweight::Pow(p), dims, &s, &mut w).unwrap();
        prop_assert!(w.iter().all(|&x| x >= 1e-8));
        pf_ppo_sampling_weights(PfPpoReweight::MaxMin, dims, &s, &mut w).unwrap();
        let scores: Vec<f64> = (0..dims.batch).map(|r| s[dims.row(r)].iter().sum()).collect();
        let hi = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lo = scores.iter().cloned().fold(f64::INFINITY, f64::min);
        for r in 0..dims.batch {
            let extreme = scores[r] == hi || scores[r] == lo;
            prop_assert_eq!(w[r] > 0.5, extreme);
        }
    }
}

#[test]
fn errors_are_typed() {
    assert!(matches!(
        PfPpoReweight::parse("softmax", 1.0),
        Err(Error::UnknownOption { .. })
    ));
    let mut s = [0.0f64; 2];
    assert!(matches!(
        quantile(&mut s, 1.5),
        Err(Error::OutOfRange { .. })
    ));
    let mut keep = [false; 2];
    let r = off_policy_sequence_mask(
        Dims::new(2, 3),
        &[0.0, 1.0],
        &[0.0; 6],
        &[0.0; 5],
        &[true; 6],
        0.1,
        NanSamplerLogProbs::Propagate,
        &mut keep,
    );
    assert!(matches!(r, Err(Error::ShapeMismatch { .. })));
    assert!(matches!(
        "nan_to_num".parse::<NanSamplerLogProbs>(),
        Err(Error::UnknownOption { .. })
    ));
}

/// TRL's `get_off_policy_mask` on a NaN sampler log-prob, row by row:
/// f2cd577 drops an `A < 0` row (NaN mean), 1.16.0 counts the token as KL 0
/// over the same valid-token count; NaN in padding never reaches a row.
#[test]
fn off_policy_mask_nan_sampler_log_probs() {
    let nan = f64::NAN;
    let dims = Dims::new(4, 3);
    let adv = [-1.0, -1.0, 1.0, -1.0];
    let lp = [-1.0; 12];
    #[rustfmt::skip]
    let sampling = [
        -0.97, nan, -1.0,  // A < 0, KL (0.03 + 0 + 0) / 3 = 0.01
        -0.9, nan, -0.9,   // A < 0, KL (0.1 + 0 + 0.1) / 3 ≈ 0.067
        nan, nan, nan,     // A ≥ 0: kept either way
        -0.97, -1.0, nan,  // A < 0, NaN in padding only
    ];
    #[rustfmt::skip]
    let mask = [
        true, true, true,
        true, true, true,
        true, true, true,
        true, true, false,
    ];
    let run = |nan: NanSamplerLogProbs, thr: f64| {
        let mut keep = [false; 4];
        off_policy_sequence_mask(dims, &adv, &lp, &sampling, &mask, thr, nan, &mut keep).unwrap();
        keep
    };
    // f2cd577: the NaN mean fails `≤ δ`.
    assert_eq!(
        run(NanSamplerLogProbs::Propagate, 0.02),
        [false, false, true, true]
    );
    assert_eq!(
        run(NanSamplerLogProbs::Propagate, 1e9),
        [false, false, true, true]
    );
    // 1.16.0: the NaN counts as 0 and stays in the denominator (0.03 / 3 =
    // 0.01 ≤ 0.02 < 0.03 / 2; row 3: 0.03 / 2 = 0.015).
    assert_eq!(
        run(NanSamplerLogProbs::AsOnPolicy, 0.02),
        [true, false, true, true]
    );
    assert_eq!(
        run(NanSamplerLogProbs::AsOnPolicy, 0.012),
        [true, false, true, false]
    );
    assert_eq!(
        run(NanSamplerLogProbs::AsOnPolicy, 0.0),
        [false, false, true, false]
    );
    assert_eq!(
        run(NanSamplerLogProbs::AsOnPolicy, 0.07),
        [true, true, true, true]
    );
    // f32 as well.
    let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let mut keep = [false; 4];
    off_policy_sequence_mask(
        dims,
        &f(&adv),
        &f(&lp),
        &f(&sampling),
        &mask,
        0.02,
        NanSamplerLogProbs::AsOnPolicy,
        &mut keep,
    )
    .unwrap();
    assert_eq!(keep, [true, false, true, true]);
}

/// `torch.nan_to_num(d, nan=0.0)`: ±inf become the type's largest finite
/// value, so `+inf` and `−inf` in one row cancel (f2cd577: `inf − inf` is
/// NaN and drops the row).
#[test]
fn off_policy_mask_as_on_policy_maps_infinities_like_nan_to_num() {
    let dims = Dims::new(1, 3);
    let lp = [-1.0f64, f64::NEG_INFINITY, -1.0];
    let sampling = [f64::NEG_INFINITY, -1.0, -1.0];
    let mut keep = [false];
    let run = |nan, keep: &mut [bool; 1]| {
        off_policy_sequence_mask(dims, &[-1.0], &lp, &sampling, &[true; 3], 0.01, nan, keep)
            .unwrap()
    };
    run(NanSamplerLogProbs::Propagate, &mut keep);
    assert_eq!(keep, [false]);
    run(NanSamplerLogProbs::AsOnPolicy, &mut keep);
    assert_eq!(keep, [true]);
}
