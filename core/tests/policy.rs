//! Property tests of the token-level policy losses (`policy::token`,
//! `policy::ppo`) and the shared PPO kernel.

use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::policy::ppo::{
    clipped_policy_loss, ClippedPolicyLoss, RatioLevel, RolloutIsCorrection, RolloutIsKind,
};
use posttrain_core::policy::token::{
    policy_loss, DivergenceConfig, PolicyBatch, PolicyLoss, PolicyLossMode, PolicyLossOutput,
    VerlPolicyParams,
};
use posttrain_core::policy::{ppo_clipped_surrogate, ClipConfig};
use posttrain_core::{Dims, Error};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    dims: Dims,
    lp: Vec<f64>,
    old: Vec<f64>,
    adv: Vec<f64>,
    mask: Vec<bool>,
    w: Vec<f64>,
    rollout: Vec<f64>,
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..4, 1usize..6).prop_flat_map(|(b, s)| {
        let n = b * s;
        (
            prop::collection::vec(-3.0f64..-0.05, n),
            prop::collection::vec(-0.6f64..0.6, n),
            prop::collection::vec(-2.0f64..2.0, n),
            prop::collection::vec(prop::bool::weighted(0.75), n),
            prop::collection::vec(0.5f64..1.5, n),
            prop::collection::vec(-0.4f64..0.4, n),
        )
            .prop_map(move |(lp, d, adv, mask, w, rd)| {
                let old: Vec<f64> = lp.iter().zip(&d).map(|(l, d)| l - d).collect();
                let rollout = old.iter().zip(&rd).map(|(o, r)| o + r).collect();
                Case {
                    dims: Dims::new(b, s),
                    lp,
                    old,
                    adv,
                    mask,
                    w,
                    rollout,
                }
            })
    })
}

fn batch<'a>(c: &'a Case, lp: &'a [f64], weights: bool) -> PolicyBatch<'a, f64> {
    PolicyBatch {
        dims: c.dims,
        log_prob: lp,
        old_log_prob: &c.old,
        advantages: &c.adv,
        mask: &c.mask,
        is_weights: weights.then_some(&c.w[..]),
    }
}

fn run(
    loss: &PolicyLoss,
    agg: AggMode,
    norm: &GlobalNorm,
    b: &PolicyBatch<'_, f64>,
) -> (PolicyLossOutput<f64>, Vec<f64>) {
    let mut scratch = vec![0.0; PolicyLoss::scratch_len(b.dims)];
    let mut g = vec![0.0; b.dims.len()];
    let out = policy_loss(loss, agg, norm, b, &mut scratch, Some((1.0, &mut g))).unwrap();
    (out, g)
}

/// The analytic gradient matches the central finite difference, or a
/// one-sided one (at a kink or a selection flip the analytic value is the
/// derivative of one side; at the kink of |x| it is the central value 0).
fn check_fd(grad: &[f64], x: &[f64], f: &dyn Fn(&[f64]) -> f64) -> Result<(), TestCaseError> {
    let h = 1e-6;
    let f0 = f(x);
    for i in 0..x.len() {
        let mut xp = x.to_vec();
        xp[i] += h;
        let mut xm = x.to_vec();
        xm[i] -= h;
        let fwd = (f(&xp) - f0) / h;
        let bwd = (f0 - f(&xm)) / h;
        let central = 0.5 * (fwd + bwd);
        let tol = |d: f64| (grad[i] - d).abs() <= 1e-5 + 1e-4 * d.abs();
        prop_assert!(
            tol(fwd) || tol(bwd) || tol(central),
            "coordinate {i}: analytic {} vs forward {fwd}, backward {bwd}",
            grad[i]
        );
    }
    Ok(())
}

/// The variants whose gradient is the true derivative of their value (no
/// stop-gradient inside).
fn smooth_variants() -> Vec<PolicyLoss> {
    let p = VerlPolicyParams {
        clip_ratio_high: Some(0.28),
        dro_beta: Some(0.5),
        // Ratio 1: every candidate is taken, so no ranking (whose exact
        // ties, e.g. between any two valid tokens, flip under perturbation).
        clip_cov_ratio: 1.0,
        clip_cov_lb: -0.5,
        clip_cov_ub: 0.5,
        kl_cov_ratio: 1.0,
        ppo_kl_coef: 0.7,
        ..VerlPolicyParams::default()
    };
    [
        PolicyLossMode::Vanilla,
        PolicyLossMode::Sapo,
        PolicyLossMode::Gpg,
        PolicyLossMode::ClipCov,
        PolicyLossMode::KlCov,
        PolicyLossMode::GeoMean,
        PolicyLossMode::Dro,
    ]
    .into_iter()
    .map(|m| PolicyLoss::from_verl(m, &p).unwrap())
    .collect()
}

fn all_variants() -> Vec<PolicyLoss> {
    let p = VerlPolicyParams {
        dro_beta: Some(0.5),
        clip_cov_ratio: 0.3,
        clip_cov_lb: -0.5,
        clip_cov_ub: 0.5,
        kl_cov_ratio: 0.3,
        ..VerlPolicyParams::default()
    };
    PolicyLossMode::ALL
        .into_iter()
        .map(|m| PolicyLoss::from_verl(m, &p).unwrap())
        .collect()
}

fn norms() -> [GlobalNorm; 2] {
    [
        GlobalNorm::default(),
        GlobalNorm {
            dp_size: 2.0,
            batch_num_tokens: Some(37.0),
            global_batch_size: Some(9.0),
            loss_scale_factor: Some(16.0),
        },
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Closed-form gradient vs central/one-sided finite differences, every
    /// smooth variant, every aggregation mode, with and without IS weights.
    #[test]
    fn verl_gradient_matches_finite_differences(c in case(), agg_i in 0usize..5, weighted in any::<bool>(), norm_i in 0usize..2) {
        let agg = AggMode::ALL[agg_i];
        let norm = norms()[norm_i];
        for loss in smooth_variants() {
            let b = batch(&c, &c.lp, weighted);
            let (_, g) = run(&loss, agg, &norm, &b);
            let f = |x: &[f64]| run(&loss, agg, &norm, &batch(&c, x, weighted)).0.loss;
            check_fd(&g, &c.lp, &f)?;
        }
    }

    /// OpenRLHF's loss (token and sequence ratios, dual clip, corrections):
    /// gradient vs finite differences.
    #[test]
    fn openrlhf_gradient_matches_finite_differences(
        c in case(), seq_level in any::<bool>(), token_level in any::<bool>(),
        dual in any::<bool>(), corr_i in 0usize..4,
    ) {
        let correction = [RolloutIsKind::Truncate, RolloutIsKind::TokenMask, RolloutIsKind::SequenceMask]
            .get(corr_i)
            .map(|&kind| RolloutIsCorrection { kind, low: 0.8, high: 1.25 });
        let ratio = if seq_level { RatioLevel::Sequence } else { RatioLevel::Token };
        let cfg = ClippedPolicyLoss::openrlhf(0.2, 0.28, dual.then_some(3.0), ratio, token_level, correction).unwrap();
        let eval = |x: &[f64], g: Option<&mut [f64]>| {
            let b = batch(&c, x, false);
            let mut scratch = vec![0.0; ClippedPolicyLoss::scratch_len(c.dims)];
            clipped_policy_loss(&cfg, &GlobalNorm::default(), &b, Some(&c.rollout), &mut scratch, g.map(|g| (1.0, g)))
                .unwrap()
                .loss
        };
        let mut g = vec![0.0; c.dims.len()];
        eval(&c.lp, Some(&mut g));
        check_fd(&g, &c.lp, &|x| eval(x, None))?;
    }

    /// Inside the clip range (and away from the dual clip) the PPO surrogate
    /// is the plain importance-weighted surrogate −A·r, gradient −A·r.
    #[test]
    fn ppo_equals_unclipped_surrogate_inside_the_range(lp in -3.0f64..-0.1, x in -0.15f64..0.15, adv in -2.0f64..2.0) {
        let cfg = ClipConfig { eps_low: 0.2, eps_high: 0.28, dual_clip: Some(3.0), log_ratio_clamp: Some(20.0) };
        let t = ppo_clipped_surrogate(&cfg, lp, lp - x, adv);
        let r = (lp - (lp - x)).exp();
        prop_assert!((t.loss + adv * r).abs() <= 1e-12);
        prop_assert!((t.grad + adv * r).abs() <= 1e-12);
        prop_assert!(!t.clipped && !t.dual_clipped);
    }

    /// NaN / ±inf in masked positions change nothing, for every variant and
    /// for OpenRLHF's loss.
    #[test]
    fn masked_nan_changes_nothing(c in case(), agg_i in 0usize..5, poison_i in 0usize..3) {
        let poison = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][poison_i];
        let agg = AggMode::ALL[agg_i];
        let mut p = c.clone();
        for i in 0..c.mask.len() {
            if !c.mask[i] {
                p.lp[i] = poison;
                p.old[i] = poison;
                p.adv[i] = poison;
                p.w[i] = poison;
                p.rollout[i] = poison;
            }
        }
        for loss in all_variants() {
            for weighted in [false, true] {
                let (o1, g1) = run(&loss, agg, &GlobalNorm::default(), &batch(&c, &c.lp, weighted));
                let (o2, g2) = run(&loss, agg, &GlobalNorm::default(), &batch(&p, &p.lp, weighted));
                prop_assert_eq!(o1, o2);
                prop_assert_eq!(g1, g2);
            }
        }
        let correction = Some(RolloutIsCorrection { kind: RolloutIsKind::SequenceMask, low: 0.5, high: 2.0 });
        for ratio in [RatioLevel::Token, RatioLevel::Sequence] {
            let cfg = ClippedPolicyLoss::openrlhf(0.2, 0.2, Some(3.0), ratio, true, correction).unwrap();
            let eval = |k: &Case| {
                let mut s = vec![0.0; ClippedPolicyLoss::scratch_len(k.dims)];
                let mut g = vec![0.0; k.dims.len()];
                let o = clipped_policy_loss(&cfg, &GlobalNorm::default(), &batch(k, &k.lp, false), Some(&k.rollout), &mut s, Some((1.0, &mut g))).unwrap();
                (o, g)
            };
            prop_assert_eq!(eval(&c), eval(&p));
        }
    }

    /// Variants linear in log π with a detached coefficient (DPPO, CISPO,
    /// REINFORCE) under token-sum: L = Σ grad·log π.
    #[test]
    fn detached_coefficient_losses_are_linear_in_log_prob(c in case()) {
        let d = DivergenceConfig { eps_low: 0.1, eps_high: 0.1, truncation: 3.0 };
        for loss in [
            PolicyLoss::DivergenceTv(d),
            PolicyLoss::DivergenceKl(d),
            PolicyLoss::ClippedWeight { eps_low: 0.2, eps_high: 0.28 },
            PolicyLoss::LogProb,
        ] {
            let (o, g) = run(&loss, AggMode::TokenSum, &GlobalNorm::default(), &batch(&c, &c.lp, true));
            let lin: f64 = g.iter().zip(&c.lp).map(|(g, l)| g * l).sum();
            prop_assert!((o.loss - lin).abs() <= 1e-10 * (1.0 + lin.abs()));
        }
    }

    /// With one token per sequence, verl's GSPO is PPO without dual clip or
    /// clamp, aggregated per sequence.
    #[test]
    fn gspo_with_single_tokens_is_ppo(c in case()) {
        let single = Case { dims: Dims::new(c.dims.len(), 1), ..c.clone() };
        let gspo = PolicyLoss::SequenceRatio { eps_low: 0.2, eps_high: 0.28, max_log_ratio: 10.0, force_seq_mean_token_mean: true };
        let ppo = PolicyLoss::Ppo(ClipConfig { eps_low: 0.2, eps_high: 0.28, dual_clip: None, log_ratio_clamp: None });
        let (a, ga) = run(&gspo, AggMode::TokenMean, &GlobalNorm::default(), &batch(&single, &single.lp, false));
        let (b, gb) = run(&ppo, AggMode::SeqMeanTokenMean, &GlobalNorm::default(), &batch(&single, &single.lp, false));
        prop_assert!((a.loss - b.loss).abs() <= 1e-12);
        prop_assert!((a.clipfrac - b.clipfrac).abs() <= 1e-12);
        for (x, y) in ga.iter().zip(&gb) {
            prop_assert!((x - y).abs() <= 1e-12);
        }
    }

    /// A fully masked batch gives exactly 0 loss, metrics and gradient.
    #[test]
    fn all_masked_is_zero(c in case(), agg_i in 0usize..5) {
        let mut m = c.clone();
        m.mask.iter_mut().for_each(|x| *x = false);
        for loss in all_variants() {
            let (o, g) = run(&loss, AggMode::ALL[agg_i], &norms()[1], &batch(&m, &m.lp, true));
            prop_assert_eq!(o.loss, 0.0);
            prop_assert_eq!(o.clipfrac, 0.0);
            prop_assert_eq!(o.approx_kl, 0.0);
            prop_assert!(g.iter().all(|&x| x == 0.0));
        }
    }
}

#[test]
fn loss_mode_names_round_trip_and_unknown_is_typed() {
    for m in PolicyLossMode::ALL {
        assert_eq!(m.name().parse::<PolicyLossMode>().unwrap(), m);
    }
    assert!(matches!(
        "ppo".parse::<PolicyLossMode>(),
        Err(Error::UnknownOption { .. })
    ));
    assert!(matches!(
        "tis2".parse::<RolloutIsKind>(),
        Err(Error::UnknownOption { .. })
    ));
}

#[test]
fn invalid_parameters_are_refused() {
    let bad_c = VerlPolicyParams {
        clip_ratio_c: 1.0,
        ..VerlPolicyParams::default()
    };
    assert!(matches!(
        PolicyLoss::from_verl(PolicyLossMode::Vanilla, &bad_c),
        Err(Error::OutOfRange {
            param: "clip_ratio_c",
            ..
        })
    ));
    let neg_eps = VerlPolicyParams {
        clip_ratio_low: Some(-0.1),
        ..VerlPolicyParams::default()
    };
    assert!(PolicyLoss::from_verl(PolicyLossMode::Cispo, &neg_eps).is_err());
    assert!(matches!(
        PolicyLoss::from_verl(PolicyLossMode::Dro, &VerlPolicyParams::default()),
        Err(Error::Invalid { .. })
    ));
    let bad_tau = VerlPolicyParams {
        tau_neg: 0.0,
        ..VerlPolicyParams::default()
    };
    assert!(PolicyLoss::from_verl(PolicyLossMode::Sapo, &bad_tau).is_err());
    assert!(
        ClippedPolicyLoss::openrlhf(0.2, 0.2, Some(0.5), RatioLevel::Token, true, None).is_err()
    );
}

#[test]
fn shape_mismatch_is_typed() {
    let dims = Dims::new(2, 3);
    let b = PolicyBatch {
        dims,
        log_prob: &[0.0f64; 6],
        old_log_prob: &[0.0; 6],
        advantages: &[0.0; 5],
        mask: &[true; 6],
        is_weights: None,
    };
    let mut scratch = vec![0.0; PolicyLoss::scratch_len(dims)];
    let r = policy_loss(
        &PolicyLoss::LogProb,
        AggMode::TokenMean,
        &GlobalNorm::default(),
        &b,
        &mut scratch,
        None,
    );
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch {
            input: "advantages",
            ..
        })
    ));
}

#[test]
fn clip_cov_takes_the_largest_covariance_when_candidates_exceed_the_budget() {
    // Four valid tokens, all candidates (wide bounds, ratio inside the clip
    // range); budget max(⌊0.5·4⌋, 1) = 2 → the two largest covariances.
    let dims = Dims::new(1, 4);
    let lp = [-1.0f64, -2.0, -3.0, -4.0];
    let adv = [2.0, 1.0, -1.0, -2.0];
    let b = PolicyBatch {
        dims,
        log_prob: &lp,
        old_log_prob: &lp,
        advantages: &adv,
        mask: &[true; 4],
        is_weights: None,
    };
    let loss = PolicyLoss::ClipCov {
        clip: ClipConfig {
            eps_low: 0.2,
            eps_high: 0.2,
            dual_clip: None,
            log_ratio_clamp: Some(20.0),
        },
        ratio: 0.5,
        lb: -100.0,
        ub: 100.0,
    };
    let (o, g) = run(&loss, AggMode::TokenSum, &GlobalNorm::default(), &b);
    // cov = (A − 0)(lp + 2.5): [3, 0.5, 0.5, 3] → tokens 0 and 3 detached.
    assert_eq!(g, vec![0.0, -1.0, 1.0, 0.0]);
    assert!((o.clipfrac - 0.5).abs() < 1e-8);
}

#[test]
fn clipped_policy_loss_refuses_batch_importance_weights() {
    let clip = ClipConfig::preset(posttrain_core::Preset::OpenRlhf, 0.2, 0.2);
    let cfg = ClippedPolicyLoss::new(clip, RatioLevel::Token, true, None).unwrap();
    let x = [-1.0f64, -0.5];
    let batch = PolicyBatch {
        dims: Dims::new(1, 2),
        log_prob: &x,
        old_log_prob: &x,
        advantages: &[1.0, -1.0],
        mask: &[true, true],
        is_weights: Some(&[0.5, 0.5]),
    };
    let mut scratch = vec![0.0; ClippedPolicyLoss::scratch_len(batch.dims)];
    let e = clipped_policy_loss(
        &cfg,
        &GlobalNorm::default(),
        &batch,
        None,
        &mut scratch,
        None,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Invalid {
                input: "is_weights",
                ..
            }
        ),
        "{e}"
    );
}
