//! Property tests of the GRPO family (TRL semantics): closed-form gradients
//! against central finite differences, on-policy gradients, masking.

#![allow(clippy::needless_range_loop)]

use posttrain_core::policy::grpo::{
    gmpo_loss, grpo_loss, rloo_loss, EntropyBonus, GmpoConfig, GrpoConfig, GrpoInputs,
    GrpoLossType, ImportanceSamplingLevel, RlooConfig, TokenOrRow,
};
use posttrain_core::policy::rollout::NanSamplerLogProbs;
use posttrain_core::{Dims, Error};
use proptest::prelude::*;

const B: usize = 3;
const T: usize = 4;

#[derive(Debug, Clone)]
struct Batch {
    lp: Vec<f64>,
    old: Vec<f64>,
    rf: Vec<f64>,
    ent: Vec<f64>,
    is: Vec<f64>,
    adv: Vec<f64>,
    mask: Vec<bool>,
}

fn batch() -> impl Strategy<Value = Batch> {
    let n = B * T;
    (
        prop::collection::vec(-3.0f64..-0.05, n),
        prop::collection::vec(-0.4f64..0.4, n),
        prop::collection::vec(-0.5f64..0.5, n),
        prop::collection::vec(0.05f64..2.5, n),
        prop::collection::vec(0.5f64..1.5, n),
        prop::collection::vec(-2.0f64..2.0, B),
        prop::collection::vec(any::<bool>(), n),
    )
        .prop_map(|(lp, d_old, d_ref, ent, is, adv, mut mask)| {
            // every row keeps its first token
            for i in 0..B {
                mask[i * T] = true;
            }
            let old = lp.iter().zip(&d_old).map(|(a, d)| a + d).collect();
            let rf = lp.iter().zip(&d_ref).map(|(a, d)| a + d).collect();
            Batch {
                lp,
                old,
                rf,
                ent,
                is,
                adv,
                mask,
            }
        })
}

fn inputs<'a>(b: &'a Batch, lp: &'a [f64]) -> GrpoInputs<'a, f64> {
    GrpoInputs::new(Dims::new(B, T), lp, &b.ent, &b.mask, &b.adv)
        .old_log_probs(&b.old)
        .ref_log_probs(&b.rf)
        .importance_sampling_ratio(TokenOrRow::Token(&b.is))
}

fn config(lt: GrpoLossType, level: ImportanceSamplingLevel, variant: u8) -> GrpoConfig {
    let mut c = GrpoConfig::trl(lt);
    c.level = level;
    c.eps_high = 0.28;
    c.norm.gradient_accumulation_steps = 2.0;
    c.norm.num_items_in_batch = 7.0;
    c.norm.max_completion_length = 6.0;
    if variant & 1 != 0 {
        c.beta = 0.04;
        c.bias_correction_kl = variant & 2 != 0;
    }
    if variant & 4 != 0 {
        c.vllm_is_correction = true;
    }
    if variant & 8 != 0 {
        c.delta = Some(1.25);
        c.top_entropy_quantile = 0.5;
    }
    c
}

fn loss_of(cfg: &GrpoConfig, b: &Batch, lp: &[f64]) -> f64 {
    let mut scratch = vec![0.0; B * T];
    grpo_loss(cfg, &inputs(b, lp), None, None, &mut scratch)
        .unwrap()
        .loss
}

/// The smooth (non-detached) loss types.
const SMOOTH: [GrpoLossType; 6] = [
    GrpoLossType::Grpo,
    GrpoLossType::Bnpo,
    GrpoLossType::DrGrpo,
    GrpoLossType::Dapo,
    GrpoLossType::Luspo,
    GrpoLossType::Sapo,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn grpo_gradient_matches_finite_differences(
        b in batch(),
        which in 0usize..6,
        seq in any::<bool>(),
        variant in 0u8..16,
    ) {
        let level = if seq { ImportanceSamplingLevel::Sequence } else { ImportanceSamplingLevel::Token };
        let cfg = config(SMOOTH[which], level, variant);
        let mut g = vec![0.0; B * T];
        let mut ge = vec![0.0; B * T];
        let mut scratch = vec![0.0; B * T];
        grpo_loss(&cfg, &inputs(&b, &b.lp), Some(&mut g), Some(&mut ge), &mut scratch).unwrap();
        let h = 1e-6;
        for k in 0..B * T {
            let mut p = b.lp.clone();
            p[k] += h;
            let mut m = b.lp.clone();
            m[k] -= h;
            let fd = (loss_of(&cfg, &b, &p) - loss_of(&cfg, &b, &m)) / (2.0 * h);
            prop_assert!((fd - g[k]).abs() <= 1e-6 * (1.0 + fd.abs()), "k={k}: fd {fd} vs {}", g[k]);
        }
    }

    #[test]
    fn entropy_bonus_gradient_matches_finite_differences(b in batch(), which in 0usize..6, coef in -0.5f64..0.5) {
        let mut cfg = config(SMOOTH[which], ImportanceSamplingLevel::Token, 0);
        cfg.entropy_bonus = Some(EntropyBonus { coef, adaptive: None });
        let mut ge = vec![0.0; B * T];
        let mut scratch = vec![0.0; B * T];
        grpo_loss(&cfg, &inputs(&b, &b.lp), None, Some(&mut ge), &mut scratch).unwrap();
        let h = 1e-6;
        for k in 0..B * T {
            let f = |d: f64| {
                let mut bb = b.clone();
                bb.ent[k] += d;
                let mut s = vec![0.0; B * T];
                grpo_loss(&cfg, &inputs(&bb, &b.lp), None, None, &mut s).unwrap().loss
            };
            let fd = (f(h) - f(-h)) / (2.0 * h);
            prop_assert!((fd - ge[k]).abs() <= 1e-7, "k={k}: fd {fd} vs {}", ge[k]);
        }
    }

    #[test]
    fn on_policy_gradient_is_minus_advantage_times_weight(b in batch(), which in 0usize..5) {
        // No old log-probs: ratio 1, per-token gradient −A·w.
        let lt = SMOOTH[which];
        let cfg = config(lt, ImportanceSamplingLevel::Token, 0);
        let x = GrpoInputs::new(Dims::new(B, T), &b.lp, &b.ent, &b.mask, &b.adv);
        let mut g = vec![0.0; B * T];
        let mut scratch = vec![0.0; B * T];
        grpo_loss(&cfg, &x, Some(&mut g), None, &mut scratch).unwrap();
        let total: usize = b.mask.iter().filter(|&&m| m).count();
        for i in 0..B {
            let n = b.mask[i * T..(i + 1) * T].iter().filter(|&&m| m).count();
            let w = match lt {
                GrpoLossType::Grpo => 1.0 / (B as f64 * n as f64) / 2.0,
                GrpoLossType::Bnpo => 1.0 / total as f64 / 2.0,
                GrpoLossType::DrGrpo => 1.0 / (B as f64 * 6.0) / 2.0,
                GrpoLossType::Dapo => 1.0 / 7.0,
                _ => n as f64 / (B * T) as f64 / 2.0,
            };
            for t in 0..T {
                let k = i * T + t;
                let want = if b.mask[k] || lt == GrpoLossType::Luspo { -b.adv[i] * w } else { 0.0 };
                prop_assert!((g[k] - want).abs() <= 1e-12 * (1.0 + want.abs()), "k={k}: {} vs {want}", g[k]);
            }
        }
    }

    #[test]
    fn detached_weight_losses_have_weighted_logp_gradients(b in batch(), vespo in any::<bool>()) {
        // CISPO / VESPO: ℓ = −sg(w)·A·log π, so ∂L/∂log π_t = −w·A/(token count) on valid tokens.
        let lt = if vespo { GrpoLossType::Vespo } else { GrpoLossType::Cispo };
        let mut cfg = config(lt, ImportanceSamplingLevel::Token, 0);
        cfg.eps_high = 1.2;
        let mut g = vec![0.0; B * T];
        let mut scratch = vec![0.0; B * T];
        let x = inputs(&b, &b.lp);
        grpo_loss(&cfg, &x, Some(&mut g), None, &mut scratch).unwrap();
        for i in 0..B {
            for t in 0..T {
                let k = i * T + t;
                if !b.mask[k] {
                    prop_assert_eq!(g[k], 0.0);
                } else if !vespo {
                    let w = (b.lp[k] - b.old[k]).exp().min(1.2);
                    let want = -w * b.adv[i] / 7.0;
                    prop_assert!((g[k] - want).abs() <= 1e-12);
                } else {
                    // same φ for every valid token of the row
                    let first = i * T;
                    prop_assert!((g[k] - g[first]).abs() <= 1e-15);
                }
            }
        }
    }

    #[test]
    fn masked_nan_changes_nothing(
        b in batch(),
        which in 0usize..8,
        seq in any::<bool>(),
        variant in 0u8..16,
        trl_1_16 in any::<bool>(),
    ) {
        let lt = GrpoLossType::ALL[which];
        prop_assume!(lt != GrpoLossType::Luspo); // TRL's luspo reads padding by design
        let level = if seq { ImportanceSamplingLevel::Sequence } else { ImportanceSamplingLevel::Token };
        let mut cfg = config(lt, level, variant);
        cfg.off_policy_mask_threshold = Some(0.01);
        if trl_1_16 {
            cfg.off_policy_nan_sampler_log_probs = NanSamplerLogProbs::AsOnPolicy;
        }
        cfg.entropy_bonus = Some(EntropyBonus { coef: 0.1, adaptive: None });
        let run = |bb: &Batch| {
            let mut g = vec![0.0; B * T];
            let mut ge = vec![0.0; B * T];
            let mut s = vec![0.0; B * T];
            // The sampler's log-probs: `old`, NaN/±inf where `old` is.
            let x = inputs(bb, &bb.lp).sampling_log_probs(&bb.old);
            let o = grpo_loss(&cfg, &x, Some(&mut g), Some(&mut ge), &mut s).unwrap();
            (o, g, ge)
        };
        let mut poisoned = b.clone();
        for k in 0..B * T {
            if !b.mask[k] {
                let v = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][k % 3];
                poisoned.lp[k] = v;
                poisoned.old[k] = v;
                poisoned.rf[k] = v;
                poisoned.ent[k] = v;
                poisoned.is[k] = v;
            }
        }
        let (o1, g1, e1) = run(&b);
        let (o2, g2, e2) = run(&poisoned);
        prop_assert_eq!(o1, o2);
        prop_assert_eq!(g1, g2);
        prop_assert_eq!(e1, e2);
    }

    #[test]
    fn off_policy_nan_sampler_as_on_policy_is_a_zero_difference(
        b in batch(),
        which in 0usize..8,
        seq in any::<bool>(),
        variant in 0u8..16,
        nan_at in prop::collection::vec(any::<bool>(), B * T),
        threshold in -0.05f64..0.1,
    ) {
        // TRL 1.16.0: a NaN sampler log-prob is the token's own log-prob
        // (difference 0); the loss, both gradients and every metric are
        // those of the batch where it is.
        let lt = GrpoLossType::ALL[which];
        let level = if seq { ImportanceSamplingLevel::Sequence } else { ImportanceSamplingLevel::Token };
        let mut cfg = config(lt, level, variant);
        cfg.off_policy_mask_threshold = Some(threshold);
        cfg.entropy_bonus = Some(EntropyBonus { coef: 0.1, adaptive: None });
        let samp: Vec<f64> = b.old.iter().map(|o| o + 0.02).collect();
        let with_nan: Vec<f64> = samp.iter().zip(&nan_at).map(|(&s, &n)| if n { f64::NAN } else { s }).collect();
        let own: Vec<f64> = samp.iter().zip(&nan_at).zip(&b.lp).map(|((&s, &n), &l)| if n { l } else { s }).collect();
        let run = |cfg: &GrpoConfig, samp: &[f64]| {
            let mut g = vec![0.0; B * T];
            let mut ge = vec![0.0; B * T];
            let mut s = vec![0.0; B * T];
            let x = inputs(&b, &b.lp).sampling_log_probs(samp);
            let o = grpo_loss(cfg, &x, Some(&mut g), Some(&mut ge), &mut s).unwrap();
            (o, g, ge)
        };
        let mut on = cfg;
        on.off_policy_nan_sampler_log_probs = NanSamplerLogProbs::AsOnPolicy;
        let (o1, g1, e1) = run(&on, &with_nan);
        let (o2, g2, e2) = run(&cfg, &own);
        prop_assert!(o1.loss.is_finite());
        prop_assert_eq!(o1, o2);
        prop_assert_eq!(g1, g2);
        prop_assert_eq!(e1, e2);
        // f2cd577 (the default): every row with A < 0 and a valid NaN token
        // is dropped, as by a threshold no KL passes.
        let touched: Vec<bool> = (0..B).map(|i| (0..T).any(|t| b.mask[i * T + t] && nan_at[i * T + t])).collect();
        prop_assume!(touched.iter().zip(&b.adv).all(|(&t, &a)| t || a >= 0.0));
        let mut none = cfg;
        none.off_policy_mask_threshold = Some(-1e300);
        let (o3, g3, _) = run(&cfg, &with_nan);
        let (o4, g4, _) = run(&none, &samp);
        prop_assert_eq!(o3, o4);
        prop_assert_eq!(g3, g4);
    }

    #[test]
    fn gmpo_gradient_matches_finite_differences(b in batch(), beta in prop::sample::select(vec![0.0, 0.1]), q in prop::sample::select(vec![1.0, 0.5])) {
        let mut cfg = GmpoConfig::trl();
        cfg.beta = beta;
        cfg.top_entropy_quantile = q;
        cfg.eps_low = 0.2;
        cfg.eps_high = 0.3;
        let loss = |lp: &[f64]| {
            let x = GrpoInputs::new(Dims::new(B, T), lp, &b.ent, &b.mask, &b.adv).old_log_probs(&b.old).ref_log_probs(&b.rf);
            let mut s = vec![0.0; B * T];
            gmpo_loss(&cfg, &x, None, &mut s).unwrap().loss
        };
        let x = GrpoInputs::new(Dims::new(B, T), &b.lp, &b.ent, &b.mask, &b.adv).old_log_probs(&b.old).ref_log_probs(&b.rf);
        let mut g = vec![0.0; B * T];
        let mut s = vec![0.0; B * T];
        gmpo_loss(&cfg, &x, Some(&mut g), &mut s).unwrap();
        let h = 1e-6;
        for k in 0..B * T {
            let mut p = b.lp.clone();
            p[k] += h;
            let mut m = b.lp.clone();
            m[k] -= h;
            let fd = (loss(&p) - loss(&m)) / (2.0 * h);
            prop_assert!((fd - g[k]).abs() <= 1e-6 * (1.0 + fd.abs()), "k={k}: fd {fd} vs {}", g[k]);
        }
    }

    #[test]
    fn rloo_gradient_matches_finite_differences(b in batch(), shift in prop::collection::vec(-0.3f64..0.3, B)) {
        let cfg = RlooConfig::trl();
        // old sequence log-probs near the current ones
        let old: Vec<f64> = (0..B)
            .map(|i| (0..T).filter(|&t| b.mask[i * T + t]).map(|t| b.lp[i * T + t]).sum::<f64>() + shift[i])
            .collect();
        let loss = |lp: &[f64]| {
            let x = GrpoInputs::new(Dims::new(B, T), lp, &b.ent, &b.mask, &b.adv);
            rloo_loss(&cfg, &x, &old, None).unwrap().loss
        };
        let x = GrpoInputs::new(Dims::new(B, T), &b.lp, &b.ent, &b.mask, &b.adv);
        let mut g = vec![0.0; B * T];
        rloo_loss(&cfg, &x, &old, Some(&mut g)).unwrap();
        let h = 1e-6;
        for k in 0..B * T {
            let mut p = b.lp.clone();
            p[k] += h;
            let mut m = b.lp.clone();
            m[k] -= h;
            let fd = (loss(&p) - loss(&m)) / (2.0 * h);
            prop_assert!((fd - g[k]).abs() <= 1e-6 * (1.0 + fd.abs()), "k={k}: fd {fd} vs {}", g[k]);
        }
    }
}

#[test]
fn all_masked_is_exactly_zero() {
    let lp = [-1.0; B * T];
    let ent = [1.0; B * T];
    let mask = [false; B * T];
    let adv = [1.0, -1.0, 0.5];
    let old = [-1.5; B * T];
    for lt in GrpoLossType::ALL {
        let cfg = GrpoConfig::trl(lt);
        let x = GrpoInputs::new(Dims::new(B, T), &lp, &ent, &mask, &adv).old_log_probs(&old);
        let mut g = [1.0; B * T];
        let o = grpo_loss(&cfg, &x, Some(&mut g), None, &mut []).unwrap();
        assert_eq!(o.loss, 0.0, "{lt:?}");
        assert!(g.iter().all(|&v| v == 0.0), "{lt:?}");
    }
}

#[test]
fn options_parse_and_reject_unknown_names() {
    for lt in GrpoLossType::ALL {
        assert_eq!(lt.name().parse::<GrpoLossType>().unwrap(), lt);
    }
    assert!(matches!(
        "ppo".parse::<GrpoLossType>(),
        Err(Error::UnknownOption { .. })
    ));
    assert_eq!(
        "sequence_token".parse::<ImportanceSamplingLevel>().unwrap(),
        ImportanceSamplingLevel::SequenceToken
    );
    assert!(matches!(
        "row".parse::<ImportanceSamplingLevel>(),
        Err(Error::UnknownOption { .. })
    ));
}

#[test]
fn bad_config_and_shapes_are_typed_errors() {
    let mut cfg = GrpoConfig::trl(GrpoLossType::Grpo);
    cfg.eps_low = -0.1;
    assert!(matches!(cfg.validate(), Err(Error::OutOfRange { .. })));
    let cfg = GrpoConfig::trl(GrpoLossType::Grpo);
    let lp = [-1.0; 6];
    let old = [-1.0; 5];
    let x = GrpoInputs::new(Dims::new(2, 3), &lp, &lp, &[true; 6], &[1.0, 1.0]).old_log_probs(&old);
    assert!(matches!(
        grpo_loss(&cfg, &x, None, None, &mut []),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut cfg = cfg;
    cfg.beta = 0.1;
    let x = GrpoInputs::new(Dims::new(2, 3), &lp, &lp, &[true; 6], &[1.0, 1.0]);
    assert!(matches!(
        grpo_loss(&cfg, &x, None, None, &mut []),
        Err(Error::Invalid { .. })
    ));
}

#[test]
fn extreme_log_ratios_stay_finite_in_f32_and_f64() {
    fn check<F: posttrain_core::Real>() {
        let of = |v: f64| F::of(v);
        let lp: Vec<F> = (0..B * T)
            .map(|k| of(if k % 2 == 0 { 998.0 } else { -1002.0 }))
            .collect();
        let old: Vec<F> = (0..B * T).map(|_| of(-2.0)).collect();
        let ent: Vec<F> = (0..B * T).map(|k| of(0.1 * k as f64)).collect();
        let mask: Vec<bool> = (0..B * T).map(|k| k % 5 != 4).collect();
        let adv = [of(-0.6), of(0.1), of(1.5)];
        for lt in GrpoLossType::ALL {
            for level in [
                ImportanceSamplingLevel::Token,
                ImportanceSamplingLevel::Sequence,
                ImportanceSamplingLevel::SequenceToken,
            ] {
                let mut cfg = GrpoConfig::trl(lt);
                cfg.level = level;
                cfg.beta = 0.1;
                cfg.bias_correction_kl = true;
                let x = GrpoInputs::new(Dims::new(B, T), &lp, &ent, &mask, &adv)
                    .old_log_probs(&old)
                    .ref_log_probs(&old);
                let mut g = vec![F::zero(); B * T];
                let mut s = vec![F::zero(); B * T];
                let o = grpo_loss(&cfg, &x, Some(&mut g), None, &mut s).unwrap();
                assert!(o.loss.is_finite(), "{lt:?} {level:?}");
                assert!(g.iter().all(|v| v.is_finite()), "{lt:?} {level:?}");
            }
        }
    }
    check::<f64>();
    check::<f32>();
}

#[test]
fn sequence_token_value_is_sequence_ratio_gradient_is_own_token() {
    // GSPO-token, no clipping: ℓ_t = −A·e^{s_i}, ∂L/∂log π_t = −A·e^{s_i}·w_t.
    let lp = [-1.0, -0.8, -1.3, -0.2, -0.6, -2.0];
    let old = [-1.1, -0.7, -1.2, -0.25, -0.5, -1.0];
    let mask = [true, true, false, true, true, true];
    let adv = [0.7, -1.2];
    let ent = [1.0; 6];
    let mut cfg = GrpoConfig::trl(GrpoLossType::Bnpo);
    cfg.level = ImportanceSamplingLevel::SequenceToken;
    cfg.eps_low = 0.9;
    cfg.eps_high = 5.0;
    let x = GrpoInputs::new(Dims::new(2, 3), &lp, &ent, &mask, &adv).old_log_probs(&old);
    let mut g = [0.0; 6];
    let o = grpo_loss(&cfg, &x, Some(&mut g), None, &mut []).unwrap();
    let s0 = ((-1.0f64 + 1.1) + (-0.8 + 0.7)) / 2.0;
    let s1 = ((-0.2f64 + 0.25) + (-0.6 + 0.5) + (-2.0 + 1.0)) / 3.0;
    let want = (2.0 * -0.7 * s0.exp() + 3.0 * 1.2 * s1.exp()) / 5.0;
    assert!((o.loss - want).abs() < 1e-12);
    assert!((g[0] + 0.7 * s0.exp() / 5.0).abs() < 1e-12);
    assert_eq!(g[2], 0.0);
    assert!((g[5] - 1.2 * s1.exp() / 5.0).abs() < 1e-12);
}
