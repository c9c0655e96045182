//! Property tests for the paired preference losses.

use posttrain_core::preference::paired::*;
use posttrain_core::{Dims, Error, Preset};
use proptest::prelude::*;

const ALL: [PairedLoss; 15] = [
    PairedLoss::Sigmoid,
    PairedLoss::Hinge,
    PairedLoss::Ipo,
    PairedLoss::ExoPair,
    PairedLoss::NcaPair,
    PairedLoss::Robust,
    PairedLoss::BcoPair,
    PairedLoss::SppoHard,
    PairedLoss::Aot,
    PairedLoss::AotUnpaired,
    PairedLoss::ApoZero,
    PairedLoss::ApoDown,
    PairedLoss::Discopop,
    PairedLoss::SigmoidNorm,
    PairedLoss::Sft,
];

fn divergence(i: usize) -> FDivergence {
    match i % 5 {
        0 => FDivergence::ReverseKl,
        1 => FDivergence::ForwardKl,
        2 => FDivergence::JsDivergence,
        3 => FDivergence::Alpha(0.5),
        _ => FDivergence::Alpha(1.5),
    }
}

#[derive(Debug)]
struct Data {
    pc: Vec<f64>,
    pr: Vec<f64>,
    rc: Vec<f64>,
    rr: Vec<f64>,
    lc: Vec<f64>,
    lr: Vec<f64>,
    w: Vec<f64>,
    sft: Vec<f64>,
    cot: Vec<f64>,
}

fn data(n: usize) -> impl Strategy<Value = Data> {
    let v = move || proptest::collection::vec(-3.0f64..-0.1, n);
    (
        (v(), v(), v(), v()),
        proptest::collection::vec(1.0f64..6.0, 2 * n),
        proptest::collection::vec(0.2f64..1.5, n),
        v(),
        proptest::collection::vec(-1.0f64..1.0, n),
    )
        .prop_map(|((pc, pr, rc, rr), lens, w, sft, cot)| Data {
            pc,
            pr,
            rc,
            rr,
            lc: lens[..lens.len() / 2].iter().map(|x| x.floor()).collect(),
            lr: lens[lens.len() / 2..].iter().map(|x| x.floor()).collect(),
            w,
            sft,
            cot,
        })
}

/// `cot_mean · loss + Σ cotᵢ lossᵢ` and its gradient.
fn objective(
    cfg: &PairedConfig,
    terms: &[LossTerm],
    d: &Data,
    pc: &[f64],
    pr: &[f64],
    grads: bool,
) -> (f64, Vec<f64>, Vec<f64>) {
    let n = pc.len();
    let batch = PairBatch::new(pc, pr)
        .with_reference(&d.rc, &d.rr)
        .with_lengths(&d.lc, &d.lr)
        .with_pair_weight(&d.w)
        .with_sft(SftInput {
            chosen_logps: &d.sft,
            tokens: 7.0,
        });
    let mut per_pair = vec![0.0; n];
    let (mut dc, mut dr) = (vec![0.0; n], vec![0.0; n]);
    let mut order = vec![0usize; 2 * n];
    let g = grads.then(|| PairGrads {
        cotangent_loss: 0.7,
        cotangent_per_pair: Some(&d.cot),
        chosen: &mut dc,
        rejected: &mut dr,
    });
    let out = paired_loss(cfg, terms, &batch, Some(&mut per_pair), g, &mut order).unwrap();
    let v = 0.7 * out.loss + per_pair.iter().zip(&d.cot).map(|(a, b)| a * b).sum::<f64>();
    (v, dc, dr)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The closed-form VJP of every loss type (and every divergence) matches
    /// central finite differences.
    #[test]
    fn gradient_matches_finite_differences(d in data(4), k in 0usize..15, div in 0usize..5, beta in 0.1f64..1.0) {
        let kind = ALL[k];
        let ls = if kind == PairedLoss::ExoPair || kind == PairedLoss::Robust { 0.2 } else { 0.1 };
        let cfg = PairedConfig::new(beta, ls, true, 0.05, divergence(div), 0.5).unwrap();
        let terms = [LossTerm::weighted(kind, 0.8), LossTerm::weighted(PairedLoss::Sigmoid, 0.3)];
        let (_, dc, dr) = objective(&cfg, &terms, &d, &d.pc, &d.pr, true);
        let h = 1e-6;
        for side in 0..2 {
            for i in 0..d.pc.len() {
                let (mut p, mut m) = (d.pc.clone(), d.pc.clone());
                let (mut pr_p, mut pr_m) = (d.pr.clone(), d.pr.clone());
                if side == 0 { p[i] += h; m[i] -= h; } else { pr_p[i] += h; pr_m[i] -= h; }
                let (fp, _, _) = objective(&cfg, &terms, &d, if side == 0 { &p } else { &d.pc }, if side == 0 { &d.pr } else { &pr_p }, false);
                let (fm, _, _) = objective(&cfg, &terms, &d, if side == 0 { &m } else { &d.pc }, if side == 0 { &d.pr } else { &pr_m }, false);
                let fd = (fp - fm) / (2.0 * h);
                let g = if side == 0 { dc[i] } else { dr[i] };
                // Hinge has a kink at 1 − βΔ = 0; skip pairs sitting on it.
                prop_assert!((fd - g).abs() <= 1e-5 * (1.0 + fd.abs()),
                    "{:?} side {} i {}: fd {} vs closed form {}", kind, side, i, fd, g);
            }
        }
    }

    /// Swapping chosen and rejected flips the DPO margin and the accuracy,
    /// and maps the sigmoid loss' gradient σ(−z) ↔ σ(z).
    #[test]
    fn swapping_flips_margin(d in data(5), beta in 0.05f64..2.0) {
        let cfg = PairedConfig::preset(Preset::Trl, beta).unwrap();
        let terms = [LossTerm::new(PairedLoss::Sigmoid)];
        let n = d.pc.len();
        let run = |pc: &[f64], pr: &[f64], rc: &[f64], rr: &[f64]| {
            let (mut dc, mut dr) = (vec![0.0; n], vec![0.0; n]);
            let b = PairBatch::new(pc, pr).with_reference(rc, rr);
            let out = paired_loss(&cfg, &terms, &b, None, Some(PairGrads::of_mean(1.0, &mut dc, &mut dr)), &mut []).unwrap();
            (out, dc, dr)
        };
        let (a, dca, dra) = run(&d.pc, &d.pr, &d.rc, &d.rr);
        let (b, dcb, drb) = run(&d.pr, &d.pc, &d.rr, &d.rc);
        prop_assert!((a.metrics.margin + b.metrics.margin).abs() < 1e-12);
        prop_assert!((a.metrics.reward_chosen - b.metrics.reward_rejected).abs() < 1e-12);
        let ties = (0..n).filter(|&i| {
            let x = beta * (d.pc[i] - d.rc[i]);
            let y = beta * (d.pr[i] - d.rr[i]);
            x == y
        }).count();
        if ties == 0 {
            prop_assert!((a.metrics.accuracy + b.metrics.accuracy - 1.0).abs() < 1e-12);
        }
        for i in 0..n {
            // −βσ(−z)/B − βσ(z)/B = −β/B
            prop_assert!((dca[i] + dcb[i] + beta / n as f64).abs() < 1e-12);
            prop_assert!((dca[i] + dra[i]).abs() < 1e-12);
            prop_assert!((dcb[i] + drb[i]).abs() < 1e-12);
        }
        // L(Δ) − L(−Δ) = −βΔ per pair, so the means differ by the mean margin.
        prop_assert!((a.loss - b.loss + a.metrics.margin).abs() < 1e-10);
    }

    /// cDPO with ε = 0 is plain DPO.
    #[test]
    fn cdpo_with_zero_smoothing_is_dpo(d in data(3), beta in 0.05f64..2.0) {
        let plain = PairedConfig::preset(Preset::Trl, beta).unwrap();
        let cdpo = PairedConfig::new(beta, 0.0, true, 0.0, FDivergence::ReverseKl, 0.05).unwrap();
        let terms = [LossTerm::new(PairedLoss::Sigmoid)];
        let (a, ga, _) = objective(&plain, &terms, &d, &d.pc, &d.pr, true);
        let (b, gb, _) = objective(&cdpo, &terms, &d, &d.pc, &d.pr, true);
        prop_assert_eq!(a, b);
        prop_assert_eq!(ga, gb);
    }

    /// The reward-model loss' gradient matches finite differences.
    #[test]
    fn reward_loss_gradient(c in proptest::collection::vec(-3.0f64..3.0, 4), r in proptest::collection::vec(-3.0f64..3.0, 4),
                            m in proptest::collection::vec(0.0f64..1.0, 4), kappa in 0.0f64..0.5) {
        let (mut dc, mut dr) = ([0.0; 4], [0.0; 4]);
        pairwise_reward_loss(&c, &r, Some(&m), Some(kappa), Some((1.0, &mut dc[..], &mut dr[..]))).unwrap();
        let f = |c: &[f64], r: &[f64]| pairwise_reward_loss(c, r, Some(&m), Some(kappa), None).unwrap().loss;
        let h = 1e-6;
        for i in 0..4 {
            let (mut cp, mut cm) = (c.clone(), c.clone());
            cp[i] += h; cm[i] -= h;
            prop_assert!(((f(&cp, &r) - f(&cm, &r)) / (2.0 * h) - dc[i]).abs() < 1e-6);
            let (mut rp, mut rm) = (r.clone(), r.clone());
            rp[i] += h; rm[i] -= h;
            prop_assert!(((f(&c, &rp) - f(&c, &rm)) / (2.0 * h) - dr[i]).abs() < 1e-6);
        }
    }
}

/// A small TRL batch: B = 2 pairs, T = 5, V = 4.
fn logits_case(seed: u64) -> (Dims, Vec<f64>, Vec<f64>, Vec<i64>, Vec<bool>) {
    let dims = Dims::new(4, 5);
    let v = 4;
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
    };
    let logits: Vec<f64> = (0..dims.len() * v).map(|_| next()).collect();
    let ref_logits: Vec<f64> = (0..dims.len() * v).map(|_| next()).collect();
    let ids: Vec<i64> = (0..dims.len())
        .map(|i| ((i * 7 + seed as usize) % v) as i64)
        .collect();
    let cmask = vec![
        false, false, true, true, true, // chosen 0: 3 completion tokens
        false, true, true, false, false, // chosen 1: 2
        false, false, false, true, true, // rejected 0: 2
        false, false, true, true, true, // rejected 1: 3
    ];
    (dims, logits, ref_logits, ids, cmask)
}

struct LCase<'a> {
    dims: Dims,
    ref_logits: &'a [f64],
    ids: &'a [i64],
    cmask: &'a [bool],
    ld_alpha: Option<f64>,
}

fn run_logits(
    cfg: &PairedConfig,
    terms: &[LossTerm],
    case: &LCase<'_>,
    logits: &[f64],
    grad: Option<&mut [f64]>,
) -> Result<(PairedOutput<f64>, LogitsMetrics<f64>), Error> {
    let LCase {
        dims,
        ref_logits,
        ids,
        cmask,
        ld_alpha,
    } = *case;
    let batch = LogitsPairBatch {
        dims,
        vocab: 4,
        logits,
        input_ids: ids,
        completion_mask: cmask,
        reference: Reference::Logits(ref_logits),
        ld_alpha,
        use_weighting: false,
    };
    let mut scratch = vec![0.0; dpo_from_logits_scratch_len(dims)];
    let mut order = vec![0usize; dims.batch];
    dpo_from_logits(
        cfg,
        terms,
        &batch,
        grad.map(|g| (1.0, g)),
        &mut scratch,
        &mut order,
    )
}

#[test]
fn logits_gradient_matches_finite_differences() {
    for (k, kind) in ALL.iter().enumerate() {
        let ls = if *kind == PairedLoss::ExoPair || *kind == PairedLoss::Robust {
            0.2
        } else {
            0.0
        };
        let cfg = PairedConfig::new(0.5, ls, false, 0.0, divergence(k), 0.5).unwrap();
        let terms = [
            LossTerm::new(*kind),
            LossTerm::weighted(PairedLoss::Sft, 0.3),
        ];
        for ld in [None, Some(0.4)] {
            let (dims, z, z0, ids, cm) = logits_case(k as u64);
            let mut g = vec![0.0; z.len()];
            run_logits(
                &cfg,
                &terms,
                &LCase {
                    dims,
                    ref_logits: &z0,
                    ids: &ids,
                    cmask: &cm,
                    ld_alpha: ld,
                },
                &z,
                Some(&mut g),
            )
            .unwrap();
            let h = 1e-6;
            for i in 0..z.len() {
                let (mut zp, mut zm) = (z.clone(), z.clone());
                zp[i] += h;
                zm[i] -= h;
                let fp = run_logits(
                    &cfg,
                    &terms,
                    &LCase {
                        dims,
                        ref_logits: &z0,
                        ids: &ids,
                        cmask: &cm,
                        ld_alpha: ld,
                    },
                    &zp,
                    None,
                )
                .unwrap()
                .0
                .loss;
                let fm = run_logits(
                    &cfg,
                    &terms,
                    &LCase {
                        dims,
                        ref_logits: &z0,
                        ids: &ids,
                        cmask: &cm,
                        ld_alpha: ld,
                    },
                    &zm,
                    None,
                )
                .unwrap()
                .0
                .loss;
                let fd = (fp - fm) / (2.0 * h);
                assert!(
                    (fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "{kind:?} ld {ld:?} logit {i}: fd {fd} vs {}",
                    g[i]
                );
            }
        }
    }
}

#[test]
fn masked_nan_changes_nothing() {
    let cfg = PairedConfig::preset(Preset::Trl, 0.1).unwrap();
    let terms = [
        LossTerm::new(PairedLoss::Ipo),
        LossTerm::new(PairedLoss::Sft),
    ];
    let (dims, z, z0, ids, cm) = logits_case(3);
    let mut g = vec![0.0; z.len()];
    let (a, ma) = run_logits(
        &cfg,
        &terms,
        &LCase {
            dims,
            ref_logits: &z0,
            ids: &ids,
            cmask: &cm,
            ld_alpha: None,
        },
        &z,
        Some(&mut g),
    )
    .unwrap();
    // Poison every position that is not a shifted completion position.
    let (mut zn, mut z0n) = (z.clone(), z0.clone());
    for r in 0..dims.batch {
        for t in 0..dims.seq {
            let valid = t + 1 < dims.seq && cm[r * dims.seq + t + 1];
            if !valid {
                for k in 0..4 {
                    zn[(r * dims.seq + t) * 4 + k] = f64::NAN;
                    z0n[(r * dims.seq + t) * 4 + k] = f64::INFINITY;
                }
            }
        }
    }
    let mut gn = vec![0.0; z.len()];
    let case = LCase {
        dims,
        ref_logits: &z0n,
        ids: &ids,
        cmask: &cm,
        ld_alpha: None,
    };
    let (b, mb) = run_logits(&cfg, &terms, &case, &zn, Some(&mut gn)).unwrap();
    assert_eq!(a, b);
    assert_eq!(ma, mb);
    assert_eq!(g, gn);
}

#[test]
fn options_and_ranges_are_checked() {
    assert!(matches!(
        "dpo_typo".parse::<PairedLoss>(),
        Err(Error::UnknownOption { .. })
    ));
    for k in ALL {
        assert_eq!(k.name().parse::<PairedLoss>().unwrap(), k);
    }
    assert!(matches!(
        FDivergence::from_trl("kl", 0.5),
        Err(Error::UnknownOption { .. })
    ));
    assert!(PairedConfig::preset(Preset::Trl, 0.0).is_err());
    assert!(PairedConfig::new(0.1, 1.5, false, 0.0, FDivergence::ReverseKl, 0.05).is_err());
    assert!(PairedConfig::new(0.1, 0.0, false, 0.0, FDivergence::ReverseKl, 0.0).is_err());
    let robust = PairedConfig::new(0.1, 0.5, false, 0.0, FDivergence::ReverseKl, 0.05).unwrap();
    assert!(matches!(
        robust.check_terms(&[LossTerm::new(PairedLoss::Robust)]),
        Err(Error::OutOfRange { .. })
    ));
    let exo = PairedConfig::preset(Preset::Trl, 0.1).unwrap();
    assert!(matches!(
        exo.check_terms(&[LossTerm::new(PairedLoss::ExoPair)]),
        Err(Error::OutOfRange { .. })
    ));
    // shape mismatch
    let b = PairBatch::new(&[0.0f64, 1.0][..], &[0.0f64][..]);
    assert!(matches!(
        paired_loss(
            &exo,
            &[LossTerm::new(PairedLoss::Sigmoid)],
            &b,
            None,
            None,
            &mut []
        ),
        Err(Error::ShapeMismatch { .. })
    ));
    // aot without scratch
    let b = PairBatch::new(&[0.0f64][..], &[0.0f64][..]);
    assert!(paired_loss(
        &exo,
        &[LossTerm::new(PairedLoss::Aot)],
        &b,
        None,
        None,
        &mut []
    )
    .is_err());
}

#[test]
fn all_masked_batch_is_finite_and_zero_gradient() {
    let cfg = PairedConfig::preset(Preset::Trl, 0.1).unwrap();
    let terms = [
        LossTerm::new(PairedLoss::Sigmoid),
        LossTerm::new(PairedLoss::Sft),
    ];
    let (dims, z, z0, ids, _) = logits_case(1);
    let cm = vec![false; dims.len()];
    let mut g = vec![1.0; z.len()];
    let (out, m) = run_logits(
        &cfg,
        &terms,
        &LCase {
            dims,
            ref_logits: &z0,
            ids: &ids,
            cmask: &cm,
            ld_alpha: None,
        },
        &z,
        Some(&mut g),
    )
    .unwrap();
    assert_eq!(out.loss, core::f64::consts::LN_2);
    assert_eq!(m.entropy, 0.0);
    assert!(g.iter().all(|&x| x == 0.0));
}
