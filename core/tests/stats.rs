//! Property tests for masked statistics and whitening: closed-form gradients
//! against central finite differences, whitening invariants, and masked NaN
//! never leaking.

use posttrain_core::stats::{
    masked_mean, masked_mean_vjp, masked_sum, masked_sum_vjp, masked_variance, masked_whiten,
    nan_max, nan_min, nan_std, Bessel, MomentConfig, Reduce, VarEps, WhitenConfig,
};
use posttrain_core::{Dims, Error, Preset};
use proptest::prelude::*;

/// A `[batch, seq]` case: values, mask, a cotangent-like vector.
fn case() -> impl Strategy<Value = (Dims, Vec<f64>, Vec<bool>, Vec<f64>)> {
    (1usize..5, 1usize..7).prop_flat_map(|(b, t)| {
        let n = b * t;
        (
            Just(Dims::new(b, t)),
            prop::collection::vec(-3.0f64..3.0, n),
            prop::collection::vec(prop::bool::weighted(0.7), n),
            prop::collection::vec(-1.0f64..1.0, n),
        )
    })
}

fn reduce() -> impl Strategy<Value = Reduce> {
    prop_oneof![Just(Reduce::All), Just(Reduce::Rows), Just(Reduce::Columns)]
}

fn whiten_cfg() -> impl Strategy<Value = (WhitenConfig, Reduce)> {
    prop_oneof![
        Just((WhitenConfig::preset(Preset::Verl), Reduce::All)),
        Just((
            WhitenConfig {
                keep_mean: true,
                ..WhitenConfig::preset(Preset::Verl)
            },
            Reduce::All
        )),
        Just((
            WhitenConfig {
                keep_mean: true,
                ..WhitenConfig::preset(Preset::Torchtune)
            },
            Reduce::All
        )),
        Just((WhitenConfig::preset(Preset::OpenRlhf), Reduce::Rows)),
    ]
}

/// `Σ cot ⊙ f(x)` differentiated numerically at every coordinate.
fn fd_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-6;
    (0..x.len())
        .map(|i| {
            let (mut p, mut m) = (x.to_vec(), x.to_vec());
            p[i] += h;
            m[i] -= h;
            (f(&p) - f(&m)) / (2.0 * h)
        })
        .collect()
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

proptest! {
    #[test]
    fn masked_mean_and_sum_vjp_match_finite_differences(
        (dims, x, mask, _) in case(), red in reduce(), weighted in any::<bool>()
    ) {
        let cfg = MomentConfig::preset(Preset::Verl);
        let w: Option<Vec<f64>> = weighted.then(|| x.iter().map(|v| 0.5 + v.abs()).collect());
        let k = red.out_len(dims);
        let cot: Vec<f64> = (0..k).map(|i| 1.0 - 0.3 * i as f64).collect();
        let obj = |xs: &[f64], mean: bool| {
            let mut out = vec![0.0; k];
            if mean {
                masked_mean(&cfg, dims, red, xs, &mask, w.as_deref(), &mut out).unwrap();
            } else {
                masked_sum(dims, red, xs, &mask, w.as_deref(), &mut out).unwrap();
            }
            out.iter().zip(&cot).map(|(a, b)| a * b).sum::<f64>()
        };
        let mut g = vec![0.0; x.len()];
        masked_mean_vjp(&cfg, dims, red, &mask, w.as_deref(), &cot, &mut g).unwrap();
        prop_assert!(close(&g, &fd_grad(&x, |xs| obj(xs, true)), 1e-6));
        masked_sum_vjp(dims, red, &mask, w.as_deref(), &cot, &mut g).unwrap();
        prop_assert!(close(&g, &fd_grad(&x, |xs| obj(xs, false)), 1e-6));
    }

    #[test]
    fn masked_variance_gradient_matches_finite_differences(
        (_, x, mut mask, _) in case(),
        preset in prop_oneof![Just(Preset::Verl), Just(Preset::Torchtune)],
        unbiased in any::<bool>(),
        center in any::<bool>(),
    ) {
        mask[0] = true;
        if mask.len() > 1 { mask[1] = true; }
        prop_assume!(mask.iter().filter(|&&m| m).count() >= 2);
        let mut cfg = MomentConfig::preset(preset);
        if !unbiased { cfg.bessel = Bessel::None; }
        let mut g = vec![0.0; x.len()];
        masked_variance(&cfg, &x, &mask, center, Some((1.0, &mut g))).unwrap();
        let fd = fd_grad(&x, |xs| masked_variance(&cfg, xs, &mask, center, None).unwrap());
        prop_assert!(close(&g, &fd, 1e-6));
    }

    #[test]
    fn whitening_gradient_matches_finite_differences(
        (dims, x, mut mask, cot) in case(), (cfg, red) in whiten_cfg()
    ) {
        for i in 0..dims.batch { mask[i * dims.seq] = true; }
        mask[dims.len() - 1] = true;
        let valid = mask.iter().filter(|&&m| m).count();
        prop_assume!(valid >= 2);
        let run = |xs: &[f64], grad: Option<&mut [f64]>| {
            let mut out = vec![0.0; xs.len()];
            match grad {
                Some(g) => masked_whiten(&cfg, dims, red, xs, &mask, &mut out, Some((&cot, g))).unwrap(),
                None => masked_whiten(&cfg, dims, red, xs, &mask, &mut out, None).unwrap(),
            }
            out.iter().zip(&cot).map(|(a, b)| a * b).sum::<f64>()
        };
        let mut g = vec![0.0; x.len()];
        run(&x, Some(&mut g));
        // Skip degenerate (near-constant) groups where the floor branch switches.
        let fd = fd_grad(&x, |xs| run(xs, None));
        prop_assert!(close(&g, &fd, 1e-4), "{g:?} vs {fd:?}");
    }

    #[test]
    fn whitening_gives_zero_mean_unit_variance((dims, x, mut mask, _) in case()) {
        mask[0] = true;
        mask[dims.len() - 1] = true;
        let valid: Vec<f64> = x.iter().zip(&mask).filter(|(_, &m)| m).map(|(v, _)| *v).collect();
        prop_assume!(valid.len() >= 2);
        let mean = valid.iter().sum::<f64>() / valid.len() as f64;
        let var = valid.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (valid.len() - 1) as f64;
        prop_assume!(var > 1e-3);
        let cfg = WhitenConfig::preset(Preset::Verl);
        let mut out = vec![0.0; x.len()];
        masked_whiten(&cfg, dims, Reduce::All, &x, &mask, &mut out, None).unwrap();
        let w: Vec<f64> = out.iter().zip(&mask).filter(|(_, &m)| m).map(|(v, _)| *v).collect();
        let m = w.iter().sum::<f64>() / w.len() as f64;
        let v = w.iter().map(|a| (a - m).powi(2)).sum::<f64>() / (w.len() - 1) as f64;
        prop_assert!(m.abs() < 1e-6);
        prop_assert!((v - 1.0).abs() < 1e-5);
    }

    #[test]
    fn masked_nan_changes_nothing((dims, x, mask, cot) in case(), red in reduce()) {
        prop_assume!(mask.iter().filter(|&&m| m).count() >= 2);
        let poisoned: Vec<f64> = x.iter().zip(&mask)
            .enumerate()
            .map(|(i, (&v, &m))| if m { v } else if i % 2 == 0 { f64::NAN } else { f64::INFINITY })
            .collect();
        let cfg = MomentConfig::preset(Preset::Verl);
        let k = red.out_len(dims);
        let (mut a, mut b) = (vec![0.0; k], vec![0.0; k]);
        masked_mean(&cfg, dims, red, &x, &mask, None, &mut a).unwrap();
        masked_mean(&cfg, dims, red, &poisoned, &mask, None, &mut b).unwrap();
        prop_assert_eq!(&a, &b);
        masked_sum(dims, red, &x, &mask, None, &mut a).unwrap();
        masked_sum(dims, red, &poisoned, &mask, None, &mut b).unwrap();
        prop_assert_eq!(&a, &b);
        let (mut ga, mut gb) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        let va = masked_variance(&cfg, &x, &mask, true, Some((1.0, &mut ga))).unwrap();
        let vb = masked_variance(&cfg, &poisoned, &mask, true, Some((1.0, &mut gb))).unwrap();
        prop_assert_eq!(va, vb);
        prop_assert_eq!(&ga, &gb);
        // Whitening: valid outputs and gradients unchanged when padding gets no cotangent.
        let cot: Vec<f64> = cot.iter().zip(&mask).map(|(&c, &m)| if m { c } else { 0.0 }).collect();
        let w = WhitenConfig::preset(Preset::Verl);
        let (mut oa, mut ob) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        masked_whiten(&w, dims, Reduce::All, &x, &mask, &mut oa, Some((&cot, &mut ga))).unwrap();
        masked_whiten(&w, dims, Reduce::All, &poisoned, &mask, &mut ob, Some((&cot, &mut gb))).unwrap();
        for i in 0..x.len() {
            if mask[i] {
                prop_assert_eq!(oa[i], ob[i]);
            }
            prop_assert_eq!(ga[i], gb[i]);
        }
    }

    #[test]
    fn nan_std_gradient_matches_finite_differences((dims, x, _, _) in case(), red in reduce()) {
        let k = red.out_len(dims);
        let cot: Vec<f64> = (0..k).map(|i| 0.7 + 0.1 * i as f64).collect();
        let mut out = vec![0.0; k];
        let mut g = vec![0.0; x.len()];
        nan_std(dims, red, &x, &mut out, Some((&cot, &mut g))).unwrap();
        prop_assume!(out.iter().all(|s| s.is_finite() && *s > 1e-3));
        let fd = fd_grad(&x, |xs| {
            let mut o = vec![0.0; k];
            nan_std(dims, red, xs, &mut o, None).unwrap();
            o.iter().zip(&cot).map(|(a, b)| a * b).sum::<f64>()
        });
        prop_assert!(close(&g, &fd, 1e-5));
    }
}

#[test]
fn all_masked_mean_is_zero_with_zero_gradient() {
    let dims = Dims::new(2, 3);
    let x = [f64::NAN, 1.0, f64::INFINITY, 2.0, 3.0, -1.0];
    let mask = [false; 6];
    let cfg = MomentConfig::preset(Preset::Torchtune);
    let mut out = [1.0];
    masked_mean(&cfg, dims, Reduce::All, &x, &mask, None, &mut out).unwrap();
    assert_eq!(out[0], 0.0);
    let mut g = [1.0; 6];
    masked_mean_vjp(&cfg, dims, Reduce::All, &mask, None, &[1.0], &mut g).unwrap();
    assert!(g.iter().all(|&v| v == 0.0));
}

#[test]
fn errors_are_typed() {
    let dims = Dims::new(2, 2);
    let mut out = [0.0f64];
    assert!(matches!(
        masked_sum(dims, Reduce::All, &[1.0f64; 3], &[true; 4], None, &mut out),
        Err(Error::ShapeMismatch { .. })
    ));
    let cfg = MomentConfig::preset(Preset::Verl);
    assert!(matches!(
        masked_variance(&cfg, &[1.0f64, 2.0], &[true, false], true, None),
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        Reduce::from_axis(Some(2)),
        Err(Error::OutOfRange { .. })
    ));
    let bad = WhitenConfig {
        var_eps: VarEps::Add(-1.0),
        ..WhitenConfig::preset(Preset::Verl)
    };
    assert!(bad.validate().is_err());
    assert!(MomentConfig::new(-1.0, 0.0, Bessel::None).is_err());
}

#[test]
fn nan_extremes_skip_nan() {
    let x = [f64::NAN, 2.0, -1.0, f64::NAN];
    assert_eq!(nan_max(&x), Some(2.0));
    assert_eq!(nan_min(&x), Some(-1.0));
    assert_eq!(nan_max(&[f64::NAN]), None);
}
