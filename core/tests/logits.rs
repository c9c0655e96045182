//! Property tests for `posttrain_core::logits`: closed-form gradients against
//! central finite differences, and the invariants of log-softmax and entropy.

use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::logits::{
    entropy_from_logits, entropy_loss, gather_log_softmax, log_softmax, log_softmax_vjp,
    selective_log_softmax, sequence_log_probs, sum_pi_squared, SequenceLogProbConfig, Temperature,
};
use posttrain_core::{Dims, Error};
use proptest::prelude::*;

const H: f64 = 1e-6;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 + 1e-5 * b.abs()
}

/// Central finite difference of `f` at every coordinate of `x`.
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

/// `(rows, vocab, logits)`.
fn logits_strategy() -> impl Strategy<Value = (usize, usize, Vec<f64>)> {
    (1usize..4, 2usize..7)
        .prop_flat_map(|(r, v)| (Just(r), Just(v), prop::collection::vec(-5.0f64..5.0, r * v)))
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn gather_log_softmax_gradient_matches_finite_differences(
        (rows, vocab, z) in logits_strategy(),
        t in 0.4f64..2.5,
        k in 1usize..4,
        seed in prop::collection::vec((0usize..64, -2.0f64..2.0), 12),
    ) {
        let temp = Temperature::new(t).unwrap();
        let ids: Vec<i64> = (0..rows * k).map(|i| (seed[i % 12].0 % vocab) as i64).collect();
        let cot: Vec<f64> = (0..rows * k).map(|i| seed[(i + 5) % 12].1).collect();
        let f = |x: &[f64]| {
            let mut out = vec![0.0; rows * k];
            gather_log_softmax(x, rows, vocab, temp, k, &ids, &mut out, None).unwrap();
            dot(&out, &cot)
        };
        let mut out = vec![0.0; rows * k];
        let mut g = vec![0.0; rows * vocab];
        gather_log_softmax(&z, rows, vocab, temp, k, &ids, &mut out, Some((&cot, &mut g))).unwrap();
        let num = numeric_grad(&z, f);
        for (a, b) in g.iter().zip(&num) {
            prop_assert!(close(*a, *b), "analytic {a} vs numeric {b}");
        }
    }

    #[test]
    fn log_probs_are_nonpositive_and_shift_invariant(
        (rows, vocab, z) in logits_strategy(),
        shift in -1e3f64..1e3,
    ) {
        let ids: Vec<i64> = (0..rows).map(|r| (r % vocab) as i64).collect();
        let mut a = vec![0.0; rows];
        selective_log_softmax(&z, rows, vocab, &ids, &mut a, None).unwrap();
        let shifted: Vec<f64> = z.iter().map(|x| x + shift).collect();
        let mut b = vec![0.0; rows];
        selective_log_softmax(&shifted, rows, vocab, &ids, &mut b, None).unwrap();
        for (x, y) in a.iter().zip(&b) {
            prop_assert!(*x <= 0.0);
            prop_assert!((x - y).abs() < 1e-9, "{x} vs {y}");
        }
        // Full rows: log-softmax exponentiates to a distribution.
        let mut full = vec![0.0; rows * vocab];
        log_softmax(&z, rows, vocab, Temperature::ONE, &mut full).unwrap();
        for row in full.chunks(vocab) {
            let s: f64 = row.iter().map(|x| x.exp()).sum();
            prop_assert!((s - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn log_softmax_vjp_matches_finite_differences(
        (rows, vocab, z) in logits_strategy(),
        t in 0.4f64..2.5,
        c in prop::collection::vec(-2.0f64..2.0, 18),
    ) {
        let temp = Temperature::new(t).unwrap();
        let cot: Vec<f64> = (0..rows * vocab).map(|i| c[i % 18]).collect();
        let mut g = vec![0.0; rows * vocab];
        log_softmax_vjp(&z, rows, vocab, temp, &cot, &mut g).unwrap();
        let num = numeric_grad(&z, |x| {
            let mut out = vec![0.0; rows * vocab];
            log_softmax(x, rows, vocab, temp, &mut out).unwrap();
            dot(&out, &cot)
        });
        for (a, b) in g.iter().zip(&num) {
            prop_assert!(close(*a, *b), "analytic {a} vs numeric {b}");
        }
    }

    #[test]
    fn entropy_gradient_matches_finite_differences_and_is_bounded(
        (rows, vocab, z) in logits_strategy(),
        c in prop::collection::vec(-2.0f64..2.0, 3),
    ) {
        let cot = &c[..rows];
        let mut h = vec![0.0; rows];
        let mut g = vec![0.0; rows * vocab];
        entropy_from_logits(&z, rows, vocab, &mut h, Some((cot, &mut g))).unwrap();
        for &hr in &h {
            prop_assert!(hr >= -1e-12 && hr <= (vocab as f64).ln() + 1e-12);
        }
        let num = numeric_grad(&z, |x| {
            let mut out = vec![0.0; rows];
            entropy_from_logits(x, rows, vocab, &mut out, None).unwrap();
            dot(&out, cot)
        });
        for (a, b) in g.iter().zip(&num) {
            prop_assert!(close(*a, *b), "analytic {a} vs numeric {b}");
        }
    }

    #[test]
    fn sum_pi_squared_gradient_matches_finite_differences(
        (rows, vocab, z) in logits_strategy(),
        c in prop::collection::vec(-2.0f64..2.0, 3),
    ) {
        let cot = &c[..rows];
        let mut s = vec![0.0; rows];
        let mut g = vec![0.0; rows * vocab];
        sum_pi_squared(&z, rows, vocab, &mut s, Some((cot, &mut g))).unwrap();
        for &sr in &s {
            prop_assert!(sr >= 1.0 / vocab as f64 - 1e-12 && sr <= 1.0 + 1e-12);
        }
        let num = numeric_grad(&z, |x| {
            let mut out = vec![0.0; rows];
            sum_pi_squared(x, rows, vocab, &mut out, None).unwrap();
            dot(&out, cot)
        });
        for (a, b) in g.iter().zip(&num) {
            prop_assert!(close(*a, *b), "analytic {a} vs numeric {b}");
        }
    }

    #[test]
    fn sequence_log_probs_gradient_and_masking(
        batch in 1usize..3,
        seq in 2usize..5,
        vocab in 2usize..5,
        average in any::<bool>(),
        raw in prop::collection::vec((-4.0f64..4.0, -1i64..5), 60),
    ) {
        let dims = Dims::new(batch, seq);
        let n = dims.len();
        let mut z: Vec<f64> = (0..n * vocab).map(|i| raw[i % 60].0).collect();
        let labels: Vec<i64> = (0..n)
            .map(|i| {
                let l = raw[(i * 7) % 60].1;
                if l < 0 { -100 } else { l % vocab as i64 }
            })
            .collect();
        let cot: Vec<f64> = (0..batch).map(|b| 0.5 + b as f64).collect();
        let cfg = SequenceLogProbConfig::torchtune(average);
        let mut out = vec![0.0; batch];
        let mut g = vec![0.0; n * vocab];
        sequence_log_probs(&cfg, dims, vocab, &z, &labels, &mut out, Some((&cot, &mut g))).unwrap();
        let num = numeric_grad(&z, |x| {
            let mut o = vec![0.0; batch];
            sequence_log_probs(&cfg, dims, vocab, x, &labels, &mut o, None).unwrap();
            dot(&o, &cot)
        });
        for (a, b) in g.iter().zip(&num) {
            prop_assert!(close(*a, *b), "analytic {a} vs numeric {b}");
        }
        // NaN in positions that score an ignored label (or nothing) changes nothing.
        for b in 0..batch {
            for t in 0..seq {
                let unread = t + 1 == seq || labels[b * seq + t + 1] == -100;
                if unread {
                    let row = b * seq + t;
                    z[row * vocab..(row + 1) * vocab].iter_mut().for_each(|x| *x = f64::NAN);
                }
            }
        }
        let mut out2 = vec![0.0; batch];
        let mut g2 = vec![0.0; n * vocab];
        sequence_log_probs(&cfg, dims, vocab, &z, &labels, &mut out2, Some((&cot, &mut g2))).unwrap();
        prop_assert_eq!(out, out2);
        prop_assert_eq!(g, g2);
    }

    #[test]
    fn entropy_loss_gradient_and_masked_nan(
        batch in 1usize..3,
        seq in 1usize..4,
        vocab in 2usize..5,
        mode_ix in 0usize..5,
        raw in prop::collection::vec((-4.0f64..4.0, any::<bool>()), 48),
    ) {
        let dims = Dims::new(batch, seq);
        let n = dims.len();
        let mode = AggMode::ALL[mode_ix];
        let norm = GlobalNorm::default();
        let mut z: Vec<f64> = (0..n * vocab).map(|i| raw[i % 48].0).collect();
        let mask: Vec<bool> = (0..n).map(|i| raw[(i * 5 + 1) % 48].1).collect();
        let mut scratch = vec![0.0; n];
        let mut g = vec![0.0; n * vocab];
        let l = entropy_loss(mode, &norm, dims, vocab, &z, &mask, &mut scratch, Some((1.0, &mut g))).unwrap();
        let num = numeric_grad(&z, |x| {
            let mut s = vec![0.0; n];
            entropy_loss(mode, &norm, dims, vocab, x, &mask, &mut s, None).unwrap()
        });
        for (a, b) in g.iter().zip(&num) {
            prop_assert!(close(*a, *b), "analytic {a} vs numeric {b}");
        }
        for (r, &m) in mask.iter().enumerate() {
            if !m {
                z[r * vocab..(r + 1) * vocab].iter_mut().for_each(|x| *x = f64::NAN);
            }
        }
        let mut g2 = vec![0.0; n * vocab];
        let l2 = entropy_loss(mode, &norm, dims, vocab, &z, &mask, &mut scratch, Some((1.0, &mut g2))).unwrap();
        prop_assert_eq!(l, l2);
        prop_assert_eq!(g, g2);
    }
}

#[test]
fn extreme_logits_stay_finite() {
    let z = [1e30f64, -1e30, 0.0, 1e30, -1e30, 3.0];
    let mut h = [0.0; 2];
    let mut g = [0.0; 6];
    entropy_from_logits(&z, 2, 3, &mut h, Some((&[1.0, 1.0], &mut g))).unwrap();
    assert!(h.iter().chain(&g).all(|x| x.is_finite()));
    let mut lp = [0.0; 2];
    gather_log_softmax(
        &z,
        2,
        3,
        Temperature::new(0.7).unwrap(),
        1,
        &[1, 2],
        &mut lp,
        Some((&[1.0, 1.0], &mut g)),
    )
    .unwrap();
    assert!(lp.iter().chain(&g).all(|x| x.is_finite()));
}

#[test]
fn bad_input_is_a_typed_error() {
    let mut out = [0.0; 1];
    assert!(matches!(
        selective_log_softmax(&[0.0f64, 1.0], 1, 2, &[2], &mut out, None),
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        selective_log_softmax(&[0.0f64, 1.0, 2.0], 1, 2, &[0], &mut out, None),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        Temperature::new(0.0),
        Err(Error::OutOfRange { .. })
    ));
    assert!(Temperature::new(f64::NAN).is_err());
    let mut s = [0.0; 2];
    assert!(matches!(
        entropy_loss(
            AggMode::TokenMean,
            &GlobalNorm::default(),
            Dims::new(1, 2),
            2,
            &[0.0f64; 4],
            &[true],
            &mut s,
            None
        ),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn all_masked_entropy_loss_is_exactly_zero() {
    let z = [f64::NAN; 6];
    let mut s = [0.0; 3];
    let mut g = [1.0; 6];
    for mode in AggMode::ALL {
        let l = entropy_loss(
            mode,
            &GlobalNorm::default(),
            Dims::new(1, 3),
            2,
            &z,
            &[false; 3],
            &mut s,
            Some((1.0, &mut g)),
        )
        .unwrap();
        assert_eq!(l, 0.0);
        assert!(g.iter().all(|&x| x == 0.0));
    }
}
