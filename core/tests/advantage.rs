//! Property tests for the advantage estimators: group advantages have zero
//! mean per group, whitened advantages have zero mean, masked NaN never
//! leaks, and bad input gives typed errors.

use posttrain_core::advantage::{
    gae_advantages_returns, gpg_advantages, group_mean_baseline_advantages,
    group_zscore_advantages, leave_one_out_advantages, multi_reward_group_advantages,
    optimal_token_baseline_advantages, pass_at_k_advantages, reinforce_plus_plus_advantages,
    GaeConfig, GroupNormConfig, MultiRewardConfig, OtbConfig, PassAtKConfig, RewardAggregation,
    RewardScaling, SingletonGroup,
};
use posttrain_core::{Dims, Error, Preset};
use proptest::prelude::*;

/// Scores with non-contiguous group ids drawn from a few arbitrary values.
fn grouped() -> impl Strategy<Value = (Vec<f64>, Vec<i64>)> {
    (1usize..16).prop_flat_map(|n| {
        (
            prop::collection::vec(-5.0f64..5.0, n),
            prop::collection::vec(
                prop_oneof![Just(-7i64), Just(3), Just(42), Just(1 << 40)],
                n,
            ),
        )
    })
}

fn group_means(adv: &[f64], index: &[i64]) -> Vec<(usize, f64)> {
    let mut ids: Vec<i64> = index.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids.iter()
        .map(|&g| {
            let m: Vec<f64> = adv
                .iter()
                .zip(index)
                .filter(|(_, &i)| i == g)
                .map(|(a, _)| *a)
                .collect();
            (m.len(), m.iter().sum::<f64>() / m.len() as f64)
        })
        .collect()
}

fn token_case() -> impl Strategy<Value = (Dims, Vec<f64>, Vec<f64>, Vec<bool>)> {
    (1usize..5, 2usize..8).prop_flat_map(|(b, t)| {
        let n = b * t;
        (
            Just(Dims::new(b, t)),
            prop::collection::vec(-2.0f64..2.0, n),
            prop::collection::vec(-2.0f64..2.0, n),
            prop::collection::vec(prop::bool::weighted(0.75), n),
        )
    })
}

/// The mean of verl's `masked_whiten(x)` over the valid values `x`: not
/// exactly 0, because verl's masked mean divides by `n + 1e-8`, so the
/// centre is `Σx/(n + 1e-8)` rather than the true mean. Oracle: verl
/// `masked_whiten` = `(x − μ_ε)·rsqrt(var + 1e-8)`, `μ_ε = Σx/(n+1e-8)`,
/// `var` = Bessel-corrected `Σ(x − μ_ε)²/(n + 1e-8)`.
fn verl_whitened_mean(x: &[f64]) -> f64 {
    let n = x.len() as f64;
    let mu = x.iter().sum::<f64>() / (n + 1e-8);
    let var = x.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / (n + 1e-8) * n / (n - 1.0);
    let true_mean = x.iter().sum::<f64>() / n;
    (true_mean - mu) / (var + 1e-8).sqrt()
}

proptest! {
    #[test]
    fn group_advantages_have_zero_mean_per_group((scores, index) in grouped()) {
        let n = scores.len();
        let mut perm = vec![0; n];
        let mut adv = vec![0.0; n];
        for preset in [Preset::Verl, Preset::Trl, Preset::Torchtune] {
            group_zscore_advantages(&GroupNormConfig::preset(preset), &scores, &index, &mut perm, &mut adv).unwrap();
            for (len, m) in group_means(&adv, &index) {
                if len > 1 { prop_assert!(m.abs() < 1e-9); }
            }
        }
        leave_one_out_advantages(&scores, &index, SingletonGroup::RawScore, &mut perm, &mut adv).unwrap();
        for (len, m) in group_means(&adv, &index) {
            if len > 1 { prop_assert!(m.abs() < 1e-9); }
        }
        group_mean_baseline_advantages(&scores, &index, &mut perm, &mut adv).unwrap();
        for (len, m) in group_means(&adv, &index) {
            if len > 1 { prop_assert!(m.abs() < 1e-9); }
        }
        gpg_advantages(&scores, &index, 2.0, &mut perm, &mut adv).unwrap();
        for (len, m) in group_means(&adv, &index) {
            if len > 1 { prop_assert!(m.abs() < 1e-8); }
        }
    }

    #[test]
    fn group_ids_need_not_be_contiguous((scores, index) in grouped()) {
        // Permuting the rows permutes the advantages.
        let n = scores.len();
        let rev_s: Vec<f64> = scores.iter().rev().copied().collect();
        let rev_i: Vec<i64> = index.iter().rev().copied().collect();
        let cfg = GroupNormConfig::preset(Preset::Verl);
        let (mut a, mut b, mut perm) = (vec![0.0; n], vec![0.0; n], vec![0; n]);
        group_zscore_advantages(&cfg, &scores, &index, &mut perm, &mut a).unwrap();
        group_zscore_advantages(&cfg, &rev_s, &rev_i, &mut perm, &mut b).unwrap();
        for i in 0..n {
            prop_assert!((a[i] - b[n - 1 - i]).abs() < 1e-12);
        }
    }

    #[test]
    fn trl_group_advantages_have_zero_mean_per_group(
        g in 2usize..5, groups in 1usize..4, seed in prop::collection::vec(-3.0f64..3.0, 40)
    ) {
        let b = g * groups;
        let per_func: Vec<f64> = seed[..b].to_vec();
        let cfg = MultiRewardConfig::new(g, RewardScaling::Group, RewardAggregation::SumThenNormalize).unwrap();
        let (mut r, mut s, mut adv) = (vec![0.0; b], vec![0.0; b], vec![0.0; b]);
        multi_reward_group_advantages(&cfg, &per_func, &[1.0], &mut r, &mut s, &mut adv).unwrap();
        for grp in 0..groups {
            let m: f64 = adv[grp * g..(grp + 1) * g].iter().sum::<f64>() / g as f64;
            prop_assert!(m.abs() < 1e-9);
        }
    }

    #[test]
    fn masked_nan_does_not_change_gae((dims, r, v, mut mask) in token_case()) {
        for i in 0..dims.batch { mask[i * dims.seq] = true; }
        prop_assume!(mask.iter().filter(|&&m| m).count() >= 2);
        let cfg = GaeConfig::preset(Preset::Verl, 0.99, 0.95).unwrap();
        let n = dims.len();
        let (mut a1, mut r1, mut a2, mut r2) = (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        gae_advantages_returns(&cfg, dims, &r, &v, &mask, &mut a1, &mut r1).unwrap();
        let rp: Vec<f64> = r.iter().zip(&mask).map(|(&x, &m)| if m { x } else { f64::NAN }).collect();
        let vp: Vec<f64> = v.iter().zip(&mask).map(|(&x, &m)| if m { x } else { f64::INFINITY }).collect();
        gae_advantages_returns(&cfg, dims, &rp, &vp, &mask, &mut a2, &mut r2).unwrap();
        for i in 0..n {
            if mask[i] {
                prop_assert_eq!(a1[i], a2[i]);
                prop_assert_eq!(r1[i], r2[i]);
            }
        }
        // Whitened over valid tokens: zero mean there, up to verl's `+1e-8`
        // in the mean's denominator (returns = raw advantages + values).
        let valid: Vec<f64> = a1.iter().zip(&mask).filter(|(_, &m)| m).map(|(a, _)| *a).collect();
        let raw: Vec<f64> = (0..n).filter(|&i| mask[i]).map(|i| r1[i] - v[i]).collect();
        let mean = valid.iter().sum::<f64>() / valid.len() as f64;
        prop_assert!((mean - verl_whitened_mean(&raw)).abs() < 1e-6, "{mean} vs {}", verl_whitened_mean(&raw));
    }

    #[test]
    fn reinforce_plus_plus_is_whitened_and_masked((dims, r, _, mut mask) in token_case()) {
        mask[0] = true;
        mask[dims.len() - 1] = true;
        let n = dims.len();
        let (mut adv, mut ret) = (vec![0.0; n], vec![0.0; n]);
        reinforce_plus_plus_advantages(dims, &r, &mask, 0.9, &mut adv, &mut ret).unwrap();
        let valid: Vec<f64> = adv.iter().zip(&mask).filter(|(_, &m)| m).map(|(a, _)| *a).collect();
        let raw: Vec<f64> = (0..n).filter(|&i| mask[i]).map(|i| ret[i]).collect();
        let mean = valid.iter().sum::<f64>() / valid.len() as f64;
        prop_assert!((mean - verl_whitened_mean(&raw)).abs() < 1e-6, "{mean} vs {}", verl_whitened_mean(&raw));
        for i in 0..n {
            if !mask[i] {
                prop_assert_eq!(adv[i], 0.0);
                prop_assert_eq!(ret[i], 0.0);
            }
        }
    }

    #[test]
    fn optimal_token_baseline_is_zero_on_padding((dims, r, lp, mask) in token_case(), multi in any::<bool>()) {
        let n = dims.len();
        let index: Vec<i64> = (0..dims.batch as i64).map(|i| i % 2).collect();
        let lp: Vec<f64> = lp.iter().map(|x| -x.abs()).collect();
        let sp = vec![0.3; n];
        let cfg = OtbConfig { handle_zero_tail: true, epsilon: 1e-8, compact_steps: multi };
        let (mut perm, mut scratch) = (vec![0; dims.batch], vec![0.0; n + 2 * dims.seq]);
        let (mut adv, mut ret) = (vec![0.0; n], vec![0.0; n]);
        optimal_token_baseline_advantages(&cfg, dims, &r, &mask, &index, &lp, &sp, None,
            &mut perm, &mut scratch, &mut adv, &mut ret).unwrap();
        for i in 0..n {
            prop_assert!(adv[i].is_finite());
            if !mask[i] { prop_assert_eq!(adv[i], 0.0); }
        }
    }
}

#[test]
fn typed_errors() {
    let mut perm = [0usize; 3];
    let mut out = [0.0f64; 3];
    let cfg = GroupNormConfig::preset(Preset::Verl);
    assert!(matches!(
        group_zscore_advantages(&cfg, &[1.0, 2.0, 3.0], &[1, 2], &mut perm, &mut out),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut empty: [f64; 0] = [];
    assert!(matches!(
        group_zscore_advantages(&cfg, &[], &[], &mut [], &mut empty),
        Err(Error::Empty { .. })
    ));
    let pk = PassAtKConfig {
        scale_by_std: true,
        std_eps: 1e-6,
    };
    assert!(matches!(
        pass_at_k_advantages(&pk, &[1.0, 2.0, 3.0], &[5, 5, 9], &mut perm, &mut out),
        Err(Error::EmptyGroup {
            group: 9,
            needed: 2
        })
    ));
    assert!(matches!(
        "groups".parse::<RewardScaling>(),
        Err(Error::UnknownOption { .. })
    ));
    assert!(matches!(
        "sum".parse::<RewardAggregation>(),
        Err(Error::UnknownOption { .. })
    ));
    assert!(GaeConfig::preset(Preset::Verl, 1.5, 0.9).is_err());
    assert!(GroupNormConfig::new(true, -1.0, true, SingletonGroup::Zero).is_err());
}

#[test]
fn singleton_conventions() {
    let mut perm = [0usize; 3];
    let mut out = [0.0f64; 3];
    let scores = [2.0, 1.0, 3.0];
    let index = [1, 2, 2];
    group_zscore_advantages(
        &GroupNormConfig::preset(Preset::Verl),
        &scores,
        &index,
        &mut perm,
        &mut out,
    )
    .unwrap();
    assert!((out[0] - 2.0 / (1.0 + 1e-6)).abs() < 1e-15);
    group_zscore_advantages(
        &GroupNormConfig::preset(Preset::Trl),
        &scores,
        &index,
        &mut perm,
        &mut out,
    )
    .unwrap();
    assert_eq!(out[0], 0.0);
    leave_one_out_advantages(
        &scores,
        &index,
        SingletonGroup::RawScore,
        &mut perm,
        &mut out,
    )
    .unwrap();
    assert_eq!(out[0], 2.0);
    leave_one_out_advantages(&scores, &index, SingletonGroup::Zero, &mut perm, &mut out).unwrap();
    assert_eq!(out[0], 0.0);
    assert_eq!(out[1], -2.0);
}

#[test]
fn configs_built_field_by_field_are_validated_by_the_ops() {
    use posttrain_core::advantage::{
        multi_reward_group_advantages, optimal_token_baseline_advantages, pass_at_k_advantages,
        MultiRewardConfig, OtbConfig, PassAtKConfig, RewardAggregation, RewardScaling,
    };
    let scores = [1.0f64, 2.0, 3.0, 4.0];
    let index = [0i64, 0, 1, 1];
    let (mut perm, mut out) = ([0usize; 4], [0.0f64; 4]);
    for eps in [-1e-6, f64::NAN, f64::INFINITY] {
        let cfg = PassAtKConfig {
            scale_by_std: true,
            std_eps: eps,
        };
        let e = pass_at_k_advantages(&cfg, &scores, &index, &mut perm, &mut out).unwrap_err();
        assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    }
    let ok = PassAtKConfig {
        scale_by_std: true,
        std_eps: 1e-6,
    };
    pass_at_k_advantages(&ok, &scores, &index, &mut perm, &mut out).unwrap();

    let dims = Dims::new(4, 2);
    let otb = OtbConfig {
        handle_zero_tail: true,
        epsilon: f64::NAN,
        compact_steps: false,
    };
    let z = [0.0f64; 8];
    let (mut p, mut s, mut a, mut r) = ([0usize; 4], [0.0f64; 64], [0.0f64; 8], [0.0f64; 8]);
    let e = optimal_token_baseline_advantages(
        &otb, dims, &z, &[true; 8], &index, &z, &z, None, &mut p, &mut s, &mut a, &mut r,
    )
    .unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");

    let mut cfg =
        MultiRewardConfig::new(2, RewardScaling::Group, RewardAggregation::SumThenNormalize)
            .unwrap();
    cfg.std_eps = -1.0;
    let (mut rw, mut sd, mut o) = ([0.0f64; 4], [0.0f64; 4], [0.0f64; 4]);
    let e =
        multi_reward_group_advantages(&cfg, &scores, &[1.0], &mut rw, &mut sd, &mut o).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    cfg.std_eps = 1e-4;
    cfg.group_size = 0;
    assert!(cfg.validate().is_err());
}
