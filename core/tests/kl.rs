//! Property tests of the KL estimators and KL-in-reward.

use posttrain_core::kl::{kl_penalized_rewards, KlConfig, KlController, KlEstimator};
use posttrain_core::{Dims, Preset};
use proptest::prelude::*;

const ALL: [KlEstimator; 4] = [
    KlEstimator::K1,
    KlEstimator::Abs,
    KlEstimator::K2,
    KlEstimator::K3,
];

proptest! {
    /// The closed-form derivative matches a central finite difference (f64),
    /// away from the kinks of abs and of the clamps.
    #[test]
    fn gradient_matches_finite_differences(lp in -8.0f64..0.0, rf in -8.0f64..0.0, e in 0usize..4, preset in 0usize..3) {
        let preset = [Preset::Verl, Preset::OpenRlhf, Preset::Trl][preset];
        let cfg = KlConfig::preset(ALL[e], preset);
        prop_assume!((lp - rf).abs() > 1e-3);
        let h = 1e-6;
        let (v, g) = cfg.estimate(lp, rf);
        let fd = (cfg.estimate(lp + h, rf).0 - cfg.estimate(lp - h, rf).0) / (2.0 * h);
        prop_assume!(v.abs() < 9.9); // not at the value clamp
        prop_assert!((g - fd).abs() <= 1e-6 * (1.0 + fd.abs()), "g={g} fd={fd}");
    }

    /// k3 is non-negative; k2 and abs too.
    #[test]
    fn k3_k2_abs_are_nonnegative(lp in -30.0f64..0.0, rf in -30.0f64..0.0) {
        for e in [KlEstimator::Abs, KlEstimator::K2, KlEstimator::K3] {
            for p in [Preset::Verl, Preset::OpenRlhf, Preset::Trl] {
                prop_assert!(KlConfig::preset(e, p).estimate(lp, rf).0 >= 0.0);
            }
        }
    }

    /// Straight-through modes keep the value and take the k2 gradient.
    #[test]
    fn straight_through_keeps_value_takes_k2_gradient(lp in -8.0f64..0.0, rf in -8.0f64..0.0, e in 0usize..4) {
        let base = KlConfig::preset(ALL[e], Preset::Verl);
        let st = KlConfig { straight_through: true, ..base };
        let (v0, _) = base.estimate(lp, rf);
        let (v1, g1) = st.estimate(lp, rf);
        prop_assert_eq!(v0, v1);
        prop_assert_eq!(g1, lp - rf);
    }

    /// Masked positions change nothing, even when they hold NaN or inf.
    #[test]
    fn masked_positions_do_not_leak(n in 1usize..6, t in 1usize..6, seed in any::<u64>()) {
        let dims = Dims::new(n, t);
        let mut s = seed;
        let mut rnd = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((s >> 11) as f64 / (1u64 << 53) as f64) * -4.0 };
        let lp: Vec<f64> = (0..dims.len()).map(|_| rnd()).collect();
        let rf: Vec<f64> = (0..dims.len()).map(|_| rnd()).collect();
        let sc: Vec<f64> = (0..dims.len()).map(|_| rnd()).collect();
        let mask: Vec<bool> = (0..dims.len()).map(|i| (i * 7 + seed as usize) % 3 != 0).collect();
        let mut lp_bad = lp.clone();
        for (x, &m) in lp_bad.iter_mut().zip(&mask) { if !m { *x = f64::NAN; } }
        let cfg = KlConfig::preset(KlEstimator::K3, Preset::Verl);
        let (mut a, mut b) = (vec![0.0; dims.len()], vec![0.0; dims.len()]);
        let sa = kl_penalized_rewards(&cfg, 0.1, dims, &sc, &lp, &rf, Some(&mask), &mut a).unwrap();
        let sb = kl_penalized_rewards(&cfg, 0.1, dims, &sc, &lp_bad, &rf, Some(&mask), &mut b).unwrap();
        prop_assert_eq!(a, b);
        prop_assert_eq!(sa, sb);
    }

    /// The adaptive controller moves β towards the target and by at most 20 % · n/horizon.
    #[test]
    fn adaptive_controller_moves_towards_target(kl in 0.0f64..1.0, n in 1u64..512) {
        let mut c = KlController::adaptive(0.05, 0.1, 10_000.0).unwrap();
        c.update(kl, n).unwrap();
        let rel = c.value() / 0.05 - 1.0;
        prop_assert!(rel.abs() <= 0.2 * n as f64 / 10_000.0 + 1e-15);
        if kl > 0.1 { prop_assert!(rel >= 0.0) } else { prop_assert!(rel <= 0.0) }
    }
}

/// Monte-Carlo check: with samples from π, the mean of k1 and of k3 is the
/// true KL(π ‖ π_ref) of two categorical distributions.
#[test]
fn k1_and_k3_are_unbiased_monte_carlo() {
    let p = [0.5f64, 0.3, 0.15, 0.05];
    let q = [0.25f64, 0.25, 0.25, 0.25];
    let exact: f64 = p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum();
    let mut s = 0x9e3779b97f4a7c15u64;
    let n = 200_000;
    let (mut m1, mut m3) = (0.0, 0.0);
    let k1 = KlConfig::new(KlEstimator::K1);
    let k3 = KlConfig::new(KlEstimator::K3);
    for _ in 0..n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let u = (s >> 11) as f64 / (1u64 << 53) as f64;
        let mut acc = 0.0;
        let a = p.iter().position(|&pi| {
            acc += pi;
            u < acc
        });
        let a = a.unwrap_or(3);
        m1 += k1.estimate(p[a].ln(), q[a].ln()).0;
        m3 += k3.estimate(p[a].ln(), q[a].ln()).0;
    }
    let (m1, m3) = (m1 / n as f64, m3 / n as f64);
    assert!((m1 - exact).abs() < 0.01, "k1 mean {m1} vs exact {exact}");
    assert!((m3 - exact).abs() < 0.01, "k3 mean {m3} vs exact {exact}");
}
