//! Property tests for the odds-ratio family: CPO, ORPO and the shifted
//! sequence log-probabilities from logits.

#![allow(clippy::needless_range_loop)]

use posttrain_core::preference::odds_ratio::{
    cpo_loss, log1mexp, odds_ratio_loss, orpo_log_odds, shifted_mean_nll, shifted_sequence_logps,
    shifted_sequence_logps_vjp, CpoConfig, CpoLossType, OrpoCotangents,
};
use posttrain_core::Dims;
use proptest::prelude::*;

const H: f64 = 1e-6;

fn fd(f: &dyn Fn(&[f64]) -> f64, x: &[f64], i: usize) -> f64 {
    let (mut a, mut b) = (x.to_vec(), x.to_vec());
    a[i] += H;
    b[i] -= H;
    (f(&a) - f(&b)) / (2.0 * H)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 + 1e-5 * b.abs()
}

fn cpo_type() -> impl Strategy<Value = CpoLossType> {
    prop_oneof![
        Just(CpoLossType::Sigmoid),
        Just(CpoLossType::Hinge),
        Just(CpoLossType::Ipo),
        Just(CpoLossType::Simpo),
    ]
}

proptest! {
    #[test]
    fn cpo_gradient_matches_finite_differences(
        lt in cpo_type(),
        beta in 0.1f64..2.5,
        ls in 0.0f64..0.5,
        gamma in 0.0f64..1.0,
        alpha in prop_oneof![Just(0.0f64), -0.5f64..0.5],
        c in prop::collection::vec(-4.0f64..-0.1, 1..6),
        r in prop::collection::vec(-4.0f64..-0.1, 6),
        cot in prop::collection::vec(-1.0f64..1.0, 6),
    ) {
        let cfg = CpoConfig::new(lt, beta, ls, gamma, alpha, 1.0).unwrap();
        let n = c.len();
        let (r, cot) = (&r[..n], &cot[..n]);
        let run = |x: &[f64], y: &[f64]| {
            let (mut l, mut cr, mut rr) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            cpo_loss(&cfg, x, y, &mut l, &mut cr, &mut rr, None).unwrap();
            l.iter().zip(cot).map(|(a, b)| a * b).sum::<f64>()
        };
        if lt == CpoLossType::Hinge {
            // Stay away from the hinge's kink.
            let rew = |x: f64| if alpha == 0.0 { x } else { (1.0 - (-alpha * x).exp()) / alpha };
            for i in 0..n {
                prop_assume!((1.0 - beta * (rew(c[i]) - rew(r[i]))).abs() > 1e-3);
            }
        }
        let (mut l, mut cr, mut rr) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let (mut dc, mut dr) = (vec![0.0; n], vec![0.0; n]);
        cpo_loss(&cfg, &c, r, &mut l, &mut cr, &mut rr, Some((cot, &mut dc, &mut dr))).unwrap();
        let all: Vec<f64> = c.iter().chain(r).copied().collect();
        let f = |x: &[f64]| run(&x[..n], &x[n..]);
        for i in 0..2 * n {
            let got = if i < n { dc[i] } else { dr[i - n] };
            prop_assert!(close(got, fd(&f, &all, i)), "i={} {} vs {}", i, got, fd(&f, &all, i));
        }
    }

    #[test]
    fn orpo_log_odds_is_antisymmetric(c in -20.0f64..-1e-6, r in -20.0f64..-1e-6) {
        let (a, ga_c, ga_r) = orpo_log_odds(c, r);
        let (b, gb_c, gb_r) = orpo_log_odds(r, c);
        prop_assert!((a + b).abs() <= 1e-12 * (1.0 + a.abs()));
        prop_assert!((ga_c + gb_r).abs() <= 1e-12 * (1.0 + ga_c.abs()));
        prop_assert!((ga_r + gb_c).abs() <= 1e-12 * (1.0 + ga_r.abs()));
    }

    #[test]
    fn log1mexp_matches_the_naive_form_where_that_is_accurate(x in -30.0f64..-1e-3) {
        let naive = (1.0 - x.exp()).ln();
        prop_assert!((log1mexp(x) - naive).abs() <= 1e-9 * (1.0 + naive.abs()));
        // f32 stays accurate near 0, where 1 − eˣ cancels.
        let x32 = x as f32;
        let want = log1mexp(x32 as f64);
        prop_assert!(((log1mexp(x32) as f64) - want).abs() <= 1e-5 * (1.0 + want.abs()));
    }

    #[test]
    fn odds_ratio_gradient_matches_finite_differences(
        beta in 0.1f64..1.0,
        c in prop::collection::vec(-4.0f64..-0.05, 1..6),
        r in prop::collection::vec(-4.0f64..-0.05, 6),
        cot in prop::collection::vec(-1.0f64..1.0, 6),
        c_ratio in -1.0f64..1.0,
        c_chosen in -1.0f64..1.0,
    ) {
        let n = c.len();
        let (r, cot) = (&r[..n], &cot[..n]);
        let f = |x: &[f64]| {
            let (mut l, mut cr, mut rr) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            let m = odds_ratio_loss(beta, &x[..n], &x[n..], &mut l, &mut cr, &mut rr, None).unwrap();
            l.iter().zip(cot).map(|(a, b)| a * b).sum::<f64>()
                + c_ratio * m.log_odds_ratio + c_chosen * m.log_odds_chosen
        };
        let (mut l, mut cr, mut rr) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let (mut dc, mut dr) = (vec![0.0; n], vec![0.0; n]);
        let cots = OrpoCotangents { losses: cot, log_odds_ratio: c_ratio, log_odds_chosen: c_chosen };
        odds_ratio_loss(beta, &c, r, &mut l, &mut cr, &mut rr, Some((cots, &mut dc, &mut dr))).unwrap();
        let all: Vec<f64> = c.iter().chain(r).copied().collect();
        for i in 0..2 * n {
            let got = if i < n { dc[i] } else { dr[i - n] };
            prop_assert!(close(got, fd(&f, &all, i)), "i={} {} vs {}", i, got, fd(&f, &all, i));
        }
    }

    #[test]
    fn shifted_logps_and_nll_gradients_match_finite_differences(
        logits in prop::collection::vec(-3.0f64..3.0, 2 * 4 * 3),
        targets in prop::collection::vec(0i64..3, 8),
        valid in prop::collection::vec(any::<bool>(), 8),
        average in any::<bool>(),
        cot in prop::collection::vec(-1.0f64..1.0, 2),
        c_nll in -1.0f64..1.0,
    ) {
        let dims = Dims::new(2, 4);
        let vocab = 3;
        let f = |x: &[f64]| {
            let mut out = [0.0; 2];
            shifted_sequence_logps(x, dims, vocab, &targets, &valid, average, &mut out).unwrap();
            let nll = shifted_mean_nll(x, dims, vocab, &targets, &valid, None).unwrap();
            out[0] * cot[0] + out[1] * cot[1] + c_nll * nll
        };
        let mut g = vec![0.0; logits.len()];
        let mut scratch = vec![0.0; vocab];
        shifted_mean_nll(&logits, dims, vocab, &targets, &valid, Some((c_nll, &mut g, &mut scratch))).unwrap();
        shifted_sequence_logps_vjp(&logits, dims, vocab, &targets, &valid, average, &cot, &mut g, &mut scratch).unwrap();
        for i in 0..logits.len() {
            prop_assert!(close(g[i], fd(&f, &logits, i)), "i={} {} vs {}", i, g[i], fd(&f, &logits, i));
        }
    }

    #[test]
    fn masked_positions_never_leak(
        logits in prop::collection::vec(-3.0f64..3.0, 2 * 4 * 3),
        targets in prop::collection::vec(0i64..3, 8),
        valid in prop::collection::vec(any::<bool>(), 8),
    ) {
        let dims = Dims::new(2, 4);
        let mut poisoned = logits.clone();
        let mut tg = targets.clone();
        for b in 0..2 {
            for t in 0..4 {
                let i = b * 4 + t;
                // Logits row i predicts position i + 1; poison it when unused.
                let used = t + 1 < 4 && valid[i + 1];
                if !used {
                    poisoned[i * 3..(i + 1) * 3].iter_mut().for_each(|x| *x = f64::NAN);
                }
                if !valid[i] || t == 0 {
                    tg[i] = -100;
                }
            }
        }
        let (mut a, mut b) = ([0.0; 2], [0.0; 2]);
        shifted_sequence_logps(&logits, dims, 3, &targets, &valid, true, &mut a).unwrap();
        shifted_sequence_logps(&poisoned, dims, 3, &tg, &valid, true, &mut b).unwrap();
        prop_assert_eq!(a, b);
        let mut g = vec![0.0; 24];
        let mut scratch = [0.0; 3];
        shifted_sequence_logps_vjp(&poisoned, dims, 3, &tg, &valid, false, &[1.0, 1.0], &mut g, &mut scratch).unwrap();
        prop_assert!(g.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn cpo_config_and_names_are_validated() {
    assert!(CpoConfig::new(CpoLossType::Sigmoid, 0.0, 0.0, 0.5, 0.0, 1.0).is_err());
    assert!(CpoConfig::new(CpoLossType::Sigmoid, 0.1, 0.7, 0.5, 0.0, 1.0).is_err());
    assert!(CpoConfig::new(CpoLossType::Sigmoid, 0.1, 0.0, 0.5, 0.0, -1.0).is_err());
    assert_eq!("simpo".parse::<CpoLossType>().unwrap(), CpoLossType::Simpo);
    assert!(matches!(
        "robust".parse::<CpoLossType>(),
        Err(posttrain_core::Error::UnknownOption { .. })
    ));
    assert!(
        CpoLossType::Ipo.uses_average_log_prob() && !CpoLossType::Hinge.uses_average_log_prob()
    );
    let mut out = [0.0];
    let e = shifted_sequence_logps(
        &[0.0f64; 6],
        Dims::new(1, 2),
        3,
        &[0, 7],
        &[true, true],
        false,
        &mut out,
    );
    assert!(matches!(e, Err(posttrain_core::Error::Invalid { .. })));
}
