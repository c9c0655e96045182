//! Property tests for the unpaired family: KTO, vanilla KTO, BCO, PRM.

#![allow(clippy::needless_range_loop)]

use posttrain_core::preference::unpaired::{
    bco_loss, kto_kl_baseline, kto_loss, prm_hard_loss, prm_soft_loss, vanilla_kto_loss, KtoConfig,
    KtoLossType, PrmConfig, RunningMoments,
};
use proptest::prelude::*;

const H: f64 = 1e-6;

/// Central finite difference of `f` at `x` along coordinate `i`.
fn fd(f: &dyn Fn(&[f64]) -> f64, x: &[f64], i: usize) -> f64 {
    let (mut a, mut b) = (x.to_vec(), x.to_vec());
    a[i] += H;
    b[i] -= H;
    (f(&a) - f(&b)) / (2.0 * H)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 + 1e-5 * b.abs()
}

fn loss_type() -> impl Strategy<Value = KtoLossType> {
    prop_oneof![Just(KtoLossType::Kto), Just(KtoLossType::ApoZeroUnpaired)]
}

proptest! {
    #[test]
    fn kto_gradient_matches_finite_differences(
        lt in loss_type(),
        beta in 0.05f64..2.0,
        wd in 0.0f64..2.0,
        wu in 0.0f64..2.0,
        z in prop::collection::vec(-5.0f64..5.0, 1..8),
        labels in prop::collection::vec(any::<bool>(), 8),
        kl in 0.0f64..3.0,
    ) {
        let cfg = KtoConfig::new(lt, beta, wd, wu).unwrap();
        let labels = &labels[..z.len()];
        let mut g = vec![0.0; z.len()];
        kto_loss(&cfg, &z, labels, kl, Some(&mut g)).unwrap();
        let f = |x: &[f64]| kto_loss(&cfg, x, labels, kl, None).unwrap();
        for i in 0..z.len() {
            prop_assert!(close(g[i], fd(&f, &z, i)), "i={} {} vs {}", i, g[i], fd(&f, &z, i));
        }
    }

    #[test]
    fn kto_kl_baseline_is_nonnegative_and_detached(
        p in prop::collection::vec(-10.0f64..0.0, 0..8),
        shift in -3.0f64..3.0,
        z in prop::collection::vec(-5.0f64..5.0, 1..6),
    ) {
        let r: Vec<f64> = p.iter().map(|x| x + shift).collect();
        let kl = kto_kl_baseline(&p, &r).unwrap();
        prop_assert!(kl >= 0.0);
        // Detached: the gradient wrt the log-ratios is the finite difference at
        // a fixed KL, even though a different KL changes the value.
        let cfg = KtoConfig::new(KtoLossType::Kto, 0.5, 1.0, 1.0).unwrap();
        let labels: Vec<bool> = (0..z.len()).map(|i| i % 2 == 0).collect();
        let mut g = vec![0.0; z.len()];
        kto_loss(&cfg, &z, &labels, kl, Some(&mut g)).unwrap();
        let f = |x: &[f64]| kto_loss(&cfg, x, &labels, kl, None).unwrap();
        for i in 0..z.len() {
            prop_assert!(close(g[i], fd(&f, &z, i)));
        }
    }

    #[test]
    fn vanilla_kto_gradient_includes_the_reference_points(
        beta in 0.05f64..2.0,
        c in prop::collection::vec(-3.0f64..3.0, 1..5),
        r in prop::collection::vec(-3.0f64..3.0, 1..5),
    ) {
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
        prop_assume!(mean(&c).abs() > 1e-3 && mean(&r).abs() > 1e-3);
        let (mut dc, mut dr) = (vec![0.0; c.len()], vec![0.0; r.len()]);
        vanilla_kto_loss(beta, &c, &r, Some((&mut dc, &mut dr))).unwrap();
        let all: Vec<f64> = c.iter().chain(&r).copied().collect();
        let nc = c.len();
        let f = |x: &[f64]| vanilla_kto_loss(beta, &x[..nc], &x[nc..], None).unwrap();
        for i in 0..all.len() {
            let want = fd(&f, &all, i);
            let got = if i < nc { dc[i] } else { dr[i - nc] };
            prop_assert!(close(got, want), "i={} {} vs {}", i, got, want);
        }
    }

    #[test]
    fn bco_gradient_matches_finite_differences(
        beta in 0.05f64..2.0,
        c in prop::collection::vec(-3.0f64..3.0, 0..5),
        r in prop::collection::vec(-3.0f64..3.0, 0..5),
        mean in -1.0f64..1.0,
        cots in prop::collection::vec(-1.0f64..1.0, 20),
    ) {
        let (nc, nr) = (c.len(), r.len());
        let running = RunningMoments { mean, var: 1.0, std: 1.0, count: 4.0 };
        let (cl, rest) = cots.split_at(nc + nr);
        let (ccr, rest) = rest.split_at(nc);
        let crr = &rest[..nr];
        // Σ cot ⊙ outputs, with the running state frozen (do_train = false).
        let f = |x: &[f64]| {
            let mut st = running;
            let (mut l, mut cr, mut rr) = (vec![0.0; nc + nr], vec![0.0; nc], vec![0.0; nr]);
            bco_loss(beta, &x[..nc], &x[nc..], &mut st, false, &mut l, &mut cr, &mut rr, None).unwrap();
            l.iter().zip(cl).map(|(a, b)| a * b).sum::<f64>()
                + cr.iter().zip(ccr).map(|(a, b)| a * b).sum::<f64>()
                + rr.iter().zip(crr).map(|(a, b)| a * b).sum::<f64>()
        };
        let mut st = running;
        let (mut l, mut cr, mut rr) = (vec![0.0; nc + nr], vec![0.0; nc], vec![0.0; nr]);
        let (mut dc, mut dr) = (vec![0.0; nc], vec![0.0; nr]);
        let delta = bco_loss(beta, &c, &r, &mut st, false, &mut l, &mut cr, &mut rr,
            Some(((cl, ccr, crr), &mut dc, &mut dr))).unwrap();
        prop_assert_eq!(delta, mean);
        let all: Vec<f64> = c.iter().chain(&r).copied().collect();
        for i in 0..all.len() {
            let got = if i < nc { dc[i] } else { dr[i - nc] };
            prop_assert!(close(got, fd(&f, &all, i)));
        }
    }

    #[test]
    fn running_moments_from_default_are_the_batch_moments(
        xs in prop::collection::vec(-5.0f64..5.0, 2..20),
    ) {
        let mut m = RunningMoments::<f64>::default();
        m.update(&xs);
        let n = xs.len() as f64;
        let mu = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / n;
        prop_assert!((m.mean - mu).abs() < 1e-12);
        prop_assert!((m.var - var).abs() < 1e-9);
        prop_assert!((m.std - (var * n / (n - 1.0)).sqrt()).abs() < 1e-9);
    }

    #[test]
    fn prm_gradients_match_finite_differences(
        logits in prop::collection::vec(-4.0f64..4.0, 24),
        hard in prop::collection::vec(0i64..6, 4),
        soft in prop::collection::vec(0.0f64..1.0, 4),
        use_ids in any::<bool>(),
    ) {
        // 4 positions, vocabulary 6; positions 0, 2, 3 are placeholders (id 9).
        let inputs = [9i64, 1, 9, 9];
        let ids = [2i64, 4];
        let vocab = 6;
        let cfg = PrmConfig { placeholder_token_id: 9, reward_token_ids: if use_ids { Some(&ids) } else { None } };
        let hard: Vec<i64> = if use_ids {
            hard.iter().map(|&l| if l % 2 == 0 { 2 } else { 4 }).collect()
        } else {
            hard
        };
        let mut g = vec![0.0; 24];
        prm_hard_loss(&cfg, &inputs, &logits, vocab, &hard, Some(&mut g)).unwrap();
        let f = |x: &[f64]| prm_hard_loss(&cfg, &inputs, x, vocab, &hard, None).unwrap().loss;
        for i in 0..24 {
            prop_assert!(close(g[i], fd(&f, &logits, i)));
        }
        let scfg = PrmConfig { placeholder_token_id: 9, reward_token_ids: Some(&ids) };
        prm_soft_loss(&scfg, &inputs, &logits, vocab, &soft, Some(&mut g)).unwrap();
        let f = |x: &[f64]| prm_soft_loss(&scfg, &inputs, x, vocab, &soft, None).unwrap().loss;
        for i in 0..24 {
            prop_assert!(close(g[i], fd(&f, &logits, i)));
        }
    }

    #[test]
    fn prm_ignores_non_placeholder_rows(
        logits in prop::collection::vec(-4.0f64..4.0, 24),
        hard in prop::collection::vec(0i64..6, 4),
    ) {
        let inputs = [9i64, 1, 9, 9];
        let cfg = PrmConfig { placeholder_token_id: 9, reward_token_ids: None };
        let a = prm_hard_loss(&cfg, &inputs, &logits, 6, &hard, None).unwrap();
        let mut poisoned = logits.clone();
        poisoned[6..12].iter_mut().for_each(|x| *x = f64::NAN);
        let mut g = vec![0.0; 24];
        let b = prm_hard_loss(&cfg, &inputs, &poisoned, 6, &hard, Some(&mut g)).unwrap();
        prop_assert_eq!(a, b);
        prop_assert!(g.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn configs_and_names_are_validated() {
    assert!(KtoConfig::new(KtoLossType::Kto, 0.0, 1.0, 1.0).is_err());
    assert!(KtoConfig::new(KtoLossType::Kto, 0.1, -1.0, 1.0).is_err());
    assert!(KtoConfig::new(KtoLossType::Kto, 0.1, 1.0, f64::NAN).is_err());
    assert_eq!("kto".parse::<KtoLossType>().unwrap(), KtoLossType::Kto);
    assert!(matches!(
        "bco".parse::<KtoLossType>(),
        Err(posttrain_core::Error::UnknownOption { .. })
    ));
    let cfg = KtoConfig::new(KtoLossType::Kto, 0.1, 1.0, 1.0).unwrap();
    assert!(kto_loss(&cfg, &[0.0f64; 3], &[true; 2], 0.0, None).is_err());
    // Empty batch: 0, not NaN.
    assert_eq!(kto_loss::<f64>(&cfg, &[], &[], 0.0, None).unwrap(), 0.0);
}
