//! Property tests of the value losses: closed-form gradients against central
//! finite differences, the unclipped limit, and masking.

use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::value::{
    clipped_value_error, policy_value_loss, value_loss, PolicyValueConfig, PolicyValueGrads,
    ValueLossConfig,
};
use posttrain_core::{Dims, Error};
use proptest::prelude::*;

const B: usize = 3;
const T: usize = 4;
const N: usize = B * T;

fn vec_in(lo: f64, hi: f64) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(lo..hi, N)
}

fn mask_with_one_valid() -> impl Strategy<Value = Vec<bool>> {
    prop::collection::vec(any::<bool>(), N).prop_map(|mut m| {
        m[0] = true;
        m
    })
}

fn mode() -> impl Strategy<Value = AggMode> {
    prop::sample::select(AggMode::ALL.to_vec())
}

fn loss_of(cfg: &ValueLossConfig, v: &[f64], old: &[f64], ret: &[f64], m: &[bool]) -> f64 {
    let mut per = vec![0.0; N];
    value_loss(cfg, Dims::new(B, T), v, old, ret, m, &mut per, None)
        .unwrap()
        .loss
}

/// Whether `v` is within `d` of a kink of the clipped error (a clip bound, or
/// a switch between the two branches of the max).
fn near_kink(c: f64, v: f64, old: f64, ret: f64, d: f64) -> bool {
    let lo = old - c;
    let hi = old + c;
    let vc = v.clamp(lo, hi);
    // The clip edges, and (only when the value is clipped) the switch between
    // the clipped and unclipped squared errors.
    (v - lo).abs() < d
        || (v - hi).abs() < d
        || (vc != v && ((v - ret).abs() - (vc - ret).abs()).abs() < d)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn value_loss_gradient_matches_finite_differences(
        v in vec_in(-2.0, 2.0), old in vec_in(-2.0, 2.0), ret in vec_in(-2.0, 2.0),
        m in mask_with_one_valid(), agg in mode(), c in 0.05f64..1.0,
    ) {
        let h = 1e-6;
        let cfg = ValueLossConfig::new(Some(c), agg)?.with_norm(GlobalNorm {
            dp_size: 2.0,
            ..GlobalNorm::default()
        });
        let mut per = vec![0.0; N];
        let mut g = vec![0.0; N];
        value_loss(&cfg, Dims::new(B, T), &v, &old, &ret, &m, &mut per, Some(&mut g))?;
        for i in 0..N {
            // Each token's loss depends on its own value only: skip the
            // coordinates that sit within the probe of a kink.
            if near_kink(c, v[i], old[i], ret[i], 1e-4) {
                continue;
            }
            let (mut vp, mut vm) = (v.clone(), v.clone());
            vp[i] += h;
            vm[i] -= h;
            let fd = (loss_of(&cfg, &vp, &old, &ret, &m) - loss_of(&cfg, &vm, &old, &ret, &m)) / (2.0 * h);
            prop_assert!((fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()), "i={i} fd={fd} g={}", g[i]);
        }
    }

    #[test]
    fn huge_clip_range_is_half_the_mse(
        v in vec_in(-3.0, 3.0), old in vec_in(-3.0, 3.0), ret in vec_in(-3.0, 3.0),
        m in mask_with_one_valid(),
    ) {
        let clipped = ValueLossConfig::new(Some(1e6), AggMode::TokenMean)?;
        let plain = ValueLossConfig::new(None, AggMode::TokenMean)?;
        let n = m.iter().filter(|&&b| b).count() as f64;
        let mse = (0..N).filter(|&i| m[i]).map(|i| (v[i] - ret[i]).powi(2)).sum::<f64>() / n;
        let a = loss_of(&clipped, &v, &old, &ret, &m);
        let b = loss_of(&plain, &v, &old, &ret, &m);
        prop_assert!((a - 0.5 * mse).abs() < 1e-12 * (1.0 + mse));
        prop_assert!((b - 0.5 * mse).abs() < 1e-12 * (1.0 + mse));
    }

    #[test]
    fn masked_nan_changes_nothing(
        v in vec_in(-2.0, 2.0), old in vec_in(-2.0, 2.0), ret in vec_in(-2.0, 2.0),
        m in mask_with_one_valid(), agg in mode(), c in 0.0f64..1.0,
    ) {
        let cfg = ValueLossConfig::new(Some(c), agg)?;
        let poison = |x: &[f64]| -> Vec<f64> {
            x.iter().zip(&m).map(|(&x, &k)| if k { x } else { f64::NAN }).collect()
        };
        let (pv, pold, pret) = (poison(&v), poison(&old), poison(&ret));
        let dims = Dims::new(B, T);
        let (mut per1, mut per2, mut g1, mut g2) = (vec![0.0; N], vec![0.0; N], vec![0.0; N], vec![0.0; N]);
        let a = value_loss(&cfg, dims, &v, &old, &ret, &m, &mut per1, Some(&mut g1))?;
        let b = value_loss(&cfg, dims, &pv, &pold, &pret, &m, &mut per2, Some(&mut g2))?;
        prop_assert_eq!(a, b);
        prop_assert_eq!(g1, g2);
        prop_assert_eq!(per1, per2);
    }

    #[test]
    fn policy_value_gradient_matches_finite_differences(
        lp in vec_in(-3.0, 0.0), old_lp in vec_in(-3.0, 0.0), adv in vec_in(-2.0, 2.0),
        v in vec_in(-2.0, 2.0), old in vec_in(-2.0, 2.0), ret in vec_in(-2.0, 2.0),
        pm in mask_with_one_valid(), vm in mask_with_one_valid(),
    ) {
        let cfg = PolicyValueConfig::new(0.2, 0.3, 0.5)?;
        for i in 0..N {
            prop_assume!(!near_kink(0.3, v[i], old[i], ret[i], 1e-4));
            let r = (lp[i] - old_lp[i]).exp();
            prop_assume!((r - 0.8).abs() > 1e-4 && (r - 1.2).abs() > 1e-4);
        }
        let dims = Dims::new(B, T);
        let f = |lp: &[f64], v: &[f64]| {
            policy_value_loss(&cfg, dims, &old_lp, lp, &adv, &old, v, &ret, Some(&pm), Some(&vm), None)
                .unwrap()
                .loss
        };
        let (mut glp, mut gv) = (vec![0.0; N], vec![0.0; N]);
        let grads = PolicyValueGrads { log_prob: &mut glp, value: &mut gv };
        policy_value_loss(&cfg, dims, &old_lp, &lp, &adv, &old, &v, &ret, Some(&pm), Some(&vm), Some(grads))?;
        let h = 1e-6;
        for i in 0..N {
            let (mut p, mut q) = (lp.clone(), lp.clone());
            p[i] += h;
            q[i] -= h;
            let fd = (f(&p, &v) - f(&q, &v)) / (2.0 * h);
            prop_assert!((fd - glp[i]).abs() < 1e-6 * (1.0 + fd.abs()), "lp i={i} fd={fd} g={}", glp[i]);
            let (mut p, mut q) = (v.clone(), v.clone());
            p[i] += h;
            q[i] -= h;
            let fd = (f(&lp, &p) - f(&lp, &q)) / (2.0 * h);
            prop_assert!((fd - gv[i]).abs() < 1e-6 * (1.0 + fd.abs()), "v i={i} fd={fd} g={}", gv[i]);
        }
    }
}

#[test]
fn kernel_branches() {
    // Inside the clip range both branches agree.
    let t = clipped_value_error(Some(0.5), 1.0f64, 0.8, 0.0);
    assert_eq!((t.loss, t.grad, t.clipped), (1.0, 2.0, false));
    // Clipped branch larger and V outside the range: no gradient.
    let t = clipped_value_error(Some(0.1), -1.0f64, 0.0, -1.0);
    assert!((t.loss - 0.81).abs() < 1e-15 && t.grad == 0.0 && t.clipped);
}

#[test]
fn all_masked_is_zero_with_zero_gradient() {
    let dims = Dims::new(2, 2);
    let x = [f64::NAN, f64::INFINITY, 1.0, -1.0];
    let m = [false; 4];
    for agg in AggMode::ALL {
        let cfg = ValueLossConfig::new(Some(0.2), agg).unwrap();
        let (mut per, mut g) = ([1.0; 4], [1.0; 4]);
        let out = value_loss(&cfg, dims, &x, &x, &x, &m, &mut per, Some(&mut g)).unwrap();
        assert_eq!((out.loss, out.clipfrac), (0.0, 0.0));
        assert_eq!(g, [0.0; 4]);
    }
    let cfg = PolicyValueConfig::new(0.2, 0.2, 1.0).unwrap();
    let (mut glp, mut gv) = ([1.0; 4], [1.0; 4]);
    let grads = PolicyValueGrads {
        log_prob: &mut glp,
        value: &mut gv,
    };
    let out = policy_value_loss(
        &cfg,
        dims,
        &x,
        &x,
        &x,
        &x,
        &x,
        &x,
        Some(&m),
        Some(&m),
        Some(grads),
    )
    .unwrap();
    assert_eq!(
        (out.loss, out.policy_loss, out.value_loss, out.clipfrac),
        (0.0, 0.0, 0.0, 0.0)
    );
    assert_eq!((glp, gv), ([0.0; 4], [0.0; 4]));
}

#[test]
fn bad_input_is_a_typed_error() {
    assert!(matches!(
        ValueLossConfig::new(Some(-0.1), AggMode::TokenMean),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        PolicyValueConfig::new(f64::NAN, 0.2, 0.1),
        Err(Error::OutOfRange { .. })
    ));
    let cfg = ValueLossConfig::new(None, AggMode::TokenMean).unwrap();
    let mut per = [0.0; 4];
    let r = value_loss(
        &cfg,
        Dims::new(2, 2),
        &[0.0; 4],
        &[0.0; 3],
        &[0.0; 4],
        &[true; 4],
        &mut per,
        None,
    );
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch {
            input: "old_values",
            ..
        })
    ));
}
