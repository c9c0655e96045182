//! Property tests for `posttrain_core::distill`: closed-form gradients against
//! central finite differences, JSD ≥ 0 with equality at teacher = student,
//! masking, and config validation.

use posttrain_core::distill::{
    generalized_jsd_elementwise, generalized_jsd_loss, jsd_from_log_probs, kd_loss, DistillConfig,
    Jsd, Reduction,
};
use posttrain_core::logits::Temperature;
use posttrain_core::{Dims, Error};
use proptest::prelude::*;

const H: f64 = 1e-6;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 + 1e-5 * b.abs()
}

fn numeric_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = xp[i];
            xp[i] = x0 + H;
            let up = f(&xp);
            xp[i] = x0 - H;
            let down = f(&xp);
            xp[i] = x0;
            (up - down) / (2.0 * H)
        })
        .collect()
}

const REDUCTIONS: [Reduction; 3] = [Reduction::BatchMean, Reduction::Sum, Reduction::Mean];

/// `(batch, seq, vocab, student, teacher, valid)`.
#[allow(clippy::type_complexity)]
fn case_strategy() -> impl Strategy<Value = (usize, usize, usize, Vec<f64>, Vec<f64>, Vec<bool>)> {
    (1usize..3, 1usize..4, 2usize..6).prop_flat_map(|(b, s, v)| {
        let n = b * s;
        (
            Just(b),
            Just(s),
            Just(v),
            prop::collection::vec(-4.0f64..4.0, n * v),
            prop::collection::vec(-4.0f64..4.0, n * v),
            prop::collection::vec(any::<bool>(), n),
        )
    })
}

fn beta_strategy() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(1.0), Just(0.5), 0.05f64..0.95]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn jsd_loss_gradient_matches_finite_differences(
        (batch, seq, vocab, zs, zt, valid) in case_strategy(),
        beta in beta_strategy(),
        t in 0.5f64..2.0,
        red_ix in 0usize..3,
        use_mask in any::<bool>(),
        num_items in prop::option::of(1.0f64..10.0),
    ) {
        let cfg = DistillConfig::new(beta, t, REDUCTIONS[red_ix], num_items).unwrap();
        let dims = Dims::new(batch, seq);
        let mask = if use_mask { Some(valid.as_slice()) } else { None };
        let mut g = vec![0.0; zs.len()];
        generalized_jsd_loss(&cfg, dims, vocab, &zs, &zt, mask, Some((1.3, &mut g))).unwrap();
        let num = numeric_grad(&zs, |x| {
            1.3 * generalized_jsd_loss(&cfg, dims, vocab, x, &zt, mask, None).unwrap()
        });
        for (a, b) in g.iter().zip(&num) {
            prop_assert!(close(*a, *b), "analytic {a} vs numeric {b}");
        }
    }

    #[test]
    fn jsd_is_nonnegative_and_zero_at_equality(
        (batch, seq, vocab, zs, zt, _valid) in case_strategy(),
        beta in beta_strategy(),
        t in 0.5f64..2.0,
    ) {
        let dims = Dims::new(batch, seq);
        let cfg = DistillConfig::new(beta, t, Reduction::Sum, None).unwrap();
        let l = generalized_jsd_loss(&cfg, dims, vocab, &zs, &zt, None, None).unwrap();
        prop_assert!(l >= -1e-12, "divergence {l} < 0");
        let mut g = vec![1.0; zs.len()];
        let same = generalized_jsd_loss(&cfg, dims, vocab, &zs, &zs, None, Some((1.0, &mut g))).unwrap();
        prop_assert!(same.abs() < 1e-12);
        prop_assert!(g.iter().all(|x| x.abs() < 1e-12));
        // A teacher that differs only by a per-row constant is the same distribution.
        let shifted: Vec<f64> = zs.iter().enumerate().map(|(i, z)| z + (i / vocab) as f64 * 3.0).collect();
        let l2 = generalized_jsd_loss(&cfg, dims, vocab, &zs, &shifted, None, None).unwrap();
        prop_assert!(l2.abs() < 1e-10);
    }

    #[test]
    fn elementwise_matches_the_sum_and_its_vjp(
        (batch, seq, vocab, zs, zt, valid) in case_strategy(),
        beta in beta_strategy(),
        t in 0.5f64..2.0,
        c in prop::collection::vec(-2.0f64..2.0, 36),
    ) {
        let rows = batch * seq;
        let jsd = Jsd::new(beta).unwrap();
        let temp = Temperature::new(t).unwrap();
        let cot: Vec<f64> = (0..rows * vocab).map(|i| c[i % 36]).collect();
        let mut out = vec![0.0; rows * vocab];
        let mut g = vec![0.0; rows * vocab];
        generalized_jsd_elementwise(&jsd, temp, rows, vocab, &zs, &zt, Some(&valid), &mut out, Some((&cot, &mut g))).unwrap();
        let cfg = DistillConfig::new(beta, t, Reduction::Sum, None).unwrap();
        let total = generalized_jsd_loss(&cfg, Dims::new(batch, seq), vocab, &zs, &zt, Some(&valid), None).unwrap();
        prop_assert!((out.iter().sum::<f64>() - total).abs() < 1e-10);
        let num = numeric_grad(&zs, |x| {
            let mut o = vec![0.0; rows * vocab];
            generalized_jsd_elementwise(&jsd, temp, rows, vocab, x, &zt, Some(&valid), &mut o, None).unwrap();
            o.iter().zip(&cot).map(|(a, b)| a * b).sum()
        });
        for (a, b) in g.iter().zip(&num) {
            prop_assert!(close(*a, *b), "analytic {a} vs numeric {b}");
        }
    }

    #[test]
    fn masked_rows_never_leak(
        (batch, seq, vocab, zs, zt, valid) in case_strategy(),
        beta in beta_strategy(),
    ) {
        let dims = Dims::new(batch, seq);
        let cfg = DistillConfig::new(beta, 1.0, Reduction::BatchMean, None).unwrap();
        let mut g1 = vec![0.0; zs.len()];
        let l1 = generalized_jsd_loss(&cfg, dims, vocab, &zs, &zt, Some(&valid), Some((1.0, &mut g1))).unwrap();
        let mut zs2 = zs.clone();
        let mut zt2 = zt.clone();
        for (r, &v) in valid.iter().enumerate() {
            if !v {
                zs2[r * vocab..(r + 1) * vocab].iter_mut().for_each(|x| *x = f64::NAN);
                zt2[r * vocab..(r + 1) * vocab].iter_mut().for_each(|x| *x = f64::INFINITY);
            }
        }
        let mut g2 = vec![0.0; zs.len()];
        let l2 = generalized_jsd_loss(&cfg, dims, vocab, &zs2, &zt2, Some(&valid), Some((1.0, &mut g2))).unwrap();
        prop_assert_eq!(l1, l2);
        prop_assert_eq!(&g1, &g2);
        let mut g3 = vec![0.0; zs.len()];
        let k1 = kd_loss(dims.len(), vocab, &zs, &zt, &valid, Some((1.0, &mut g3))).unwrap();
        let mut g4 = vec![0.0; zs.len()];
        let k2 = kd_loss(dims.len(), vocab, &zs2, &zt2, &valid, Some((1.0, &mut g4))).unwrap();
        prop_assert_eq!(k1, k2);
        prop_assert_eq!(g3, g4);
    }

    #[test]
    fn kd_loss_gradient_and_cross_entropy_bound(
        (batch, seq, vocab, zs, zt, valid) in case_strategy(),
    ) {
        let rows = batch * seq;
        let mut g = vec![0.0; zs.len()];
        let l = kd_loss(rows, vocab, &zs, &zt, &valid, Some((0.7, &mut g))).unwrap();
        let num = numeric_grad(&zs, |x| 0.7 * kd_loss(rows, vocab, x, &zt, &valid, None).unwrap());
        for (a, b) in g.iter().zip(&num) {
            prop_assert!(close(*a, *b), "analytic {a} vs numeric {b}");
        }
        // Cross entropy ≥ the teacher's entropy, with equality at student = teacher.
        let at_teacher = kd_loss(rows, vocab, &zt, &zt, &valid, None).unwrap();
        prop_assert!(l >= at_teacher - 1e-12);
    }

    #[test]
    fn jsd_from_log_probs_gradient(
        n in 1usize..12,
        raw in prop::collection::vec((-6.0f64..-0.01, -6.0f64..-0.01, any::<bool>(), -2.0f64..2.0), 12),
        beta in beta_strategy(),
        use_support in any::<bool>(),
    ) {
        let jsd = Jsd::new(beta).unwrap();
        let s: Vec<f64> = raw[..n].iter().map(|r| r.0).collect();
        let t: Vec<f64> = raw[..n].iter().map(|r| r.1).collect();
        let m: Vec<bool> = raw[..n].iter().map(|r| r.2).collect();
        let c: Vec<f64> = raw[..n].iter().map(|r| r.3).collect();
        let support = if use_support { Some(m.as_slice()) } else { None };
        let mut out = vec![0.0; n];
        let mut g = vec![0.0; n];
        jsd_from_log_probs(&jsd, &s, &t, support, &mut out, Some((&c, &mut g))).unwrap();
        let num = numeric_grad(&s, |x| {
            let mut o = vec![0.0; n];
            jsd_from_log_probs(&jsd, x, &t, support, &mut o, None).unwrap();
            o.iter().zip(&c).map(|(a, b)| a * b).sum()
        });
        for (a, b) in g.iter().zip(&num) {
            prop_assert!(close(*a, *b), "analytic {a} vs numeric {b}");
        }
        // Inside the support the two variants agree (no clamping at these magnitudes).
        let mut plain = vec![0.0; n];
        jsd_from_log_probs(&jsd, &s, &t, None, &mut plain, None).unwrap();
        for i in 0..n {
            if support.is_none_or(|m| m[i]) {
                prop_assert!((plain[i] - out[i]).abs() < 1e-12);
            } else {
                prop_assert_eq!(out[i], 0.0);
            }
        }
    }
}

#[test]
fn extreme_logits_stay_finite() {
    let zs = [1e30f64, -1e30, 0.0, -1e30, 2.0, 1e30];
    let zt = [0.5f64, -0.5, 1.0, 0.0, 0.2, -3.0];
    for beta in [0.0, 0.3, 1.0] {
        let cfg = DistillConfig::new(beta, 0.7, Reduction::BatchMean, None).unwrap();
        let mut g = [0.0; 6];
        let l = generalized_jsd_loss(
            &cfg,
            Dims::new(1, 2),
            3,
            &zs,
            &zt,
            None,
            Some((1.0, &mut g)),
        )
        .unwrap();
        assert!(
            l.is_finite() && g.iter().all(|x| x.is_finite()),
            "beta {beta}"
        );
    }
    let mut g = [0.0; 6];
    let l = kd_loss(2, 3, &zs, &zt, &[true, true], Some((1.0, &mut g))).unwrap();
    assert!(l.is_finite() && g.iter().all(|x| x.is_finite()));
    // A student logit of −inf: its term is dropped (OpenRLHF), the rest stays finite.
    let zs = [f64::NEG_INFINITY, 0.0, 1.0];
    let l = kd_loss(
        1,
        3,
        &zs,
        &[0.0, 0.0, 0.0],
        &[true],
        Some((1.0, &mut g[..3])),
    )
    .unwrap();
    assert!(l.is_finite() && g[..3].iter().all(|x| x.is_finite()));
}

#[test]
fn configs_are_validated() {
    assert!(matches!(Jsd::new(-0.1), Err(Error::OutOfRange { .. })));
    assert!(matches!(Jsd::new(1.5), Err(Error::OutOfRange { .. })));
    assert!(Jsd::new(f64::NAN).is_err());
    assert!(matches!(
        DistillConfig::new(0.5, 0.0, Reduction::Sum, None),
        Err(Error::OutOfRange { .. })
    ));
    assert!(DistillConfig::new(0.5, 1.0, Reduction::Sum, Some(0.0)).is_err());
    assert_eq!(
        "batchmean".parse::<Reduction>().unwrap(),
        Reduction::BatchMean
    );
    assert_eq!("none".parse::<Reduction>().unwrap(), Reduction::None);
    assert!(matches!(
        "avg".parse::<Reduction>(),
        Err(Error::UnknownOption { .. })
    ));
    let cfg = DistillConfig::new(0.5, 1.0, Reduction::None, None).unwrap();
    assert!(matches!(
        generalized_jsd_loss(
            &cfg,
            Dims::new(1, 1),
            2,
            &[0.0f64, 1.0],
            &[0.0, 1.0],
            None,
            None
        ),
        Err(Error::Invalid { .. })
    ));
    let cfg = DistillConfig::new(0.5, 1.0, Reduction::Sum, None).unwrap();
    assert!(matches!(
        generalized_jsd_loss(&cfg, Dims::new(1, 1), 2, &[0.0f64, 1.0], &[0.0], None, None),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn empty_selection_is_exactly_zero() {
    let zs = [f64::NAN; 4];
    for red in REDUCTIONS {
        let cfg = DistillConfig::new(0.5, 1.0, red, None).unwrap();
        let mut g = [1.0; 4];
        let l = generalized_jsd_loss(
            &cfg,
            Dims::new(1, 2),
            2,
            &zs,
            &zs,
            Some(&[false, false]),
            Some((1.0, &mut g)),
        )
        .unwrap();
        assert_eq!(l, 0.0);
        assert!(g.iter().all(|&x| x == 0.0));
    }
    let mut g = [1.0; 4];
    assert_eq!(
        kd_loss(2, 2, &zs, &zs, &[false, false], Some((1.0, &mut g))).unwrap(),
        0.0
    );
    assert!(g.iter().all(|&x| x == 0.0));
}
