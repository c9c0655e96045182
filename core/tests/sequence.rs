//! Property tests of the sequence utilities.
#![allow(clippy::needless_range_loop)]

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
        let mut keep = vec![false; dims.batch];
        off_policy_sequence_mask(dims, adv, &lp, &sampling, &mask, thr, &mut keep).unwrap();
        for r in 0..dims.batch {
            if adv[r] >= 0.0 {
                prop_assert!(keep[r]);
            }
        }
        let poisoned: Vec<f64> = lp.iter().zip(&mask).map(|(&x, &m)| if m { x } else { f64::NAN }).collect();
        let mut keep2 = vec![false; dims.batch];
        off_policy_sequence_mask(dims, adv, &poisoned, &sampling, &mask, thr, &mut keep2).unwrap();
        prop_assert_eq!(keep, keep2);
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
        &mut keep,
    );
    assert!(matches!(r, Err(Error::ShapeMismatch { .. })));
}
