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

const SCORES: [FDivergenceScores; 2] = [
    FDivergenceScores::ConstantsDropped,
    FDivergenceScores::ZeroAtReference,
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

    /// The closed-form VJP of every loss type (and every divergence, both
    /// kinds of f-divergence scores) matches central finite differences.
    #[test]
    fn gradient_matches_finite_differences(d in data(4), k in 0usize..15, div in 0usize..5, beta in 0.1f64..1.0, sc in 0usize..2) {
        let kind = ALL[k];
        let ls = if kind == PairedLoss::ExoPair || kind == PairedLoss::Robust { 0.2 } else { 0.1 };
        let cfg = PairedConfig::new(beta, ls, true, 0.05, divergence(div), 0.5).unwrap()
            .with_divergence_scores(SCORES[sc]);
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

/// `f(x) = ` each divergence's score under both settings, by hand.
#[test]
fn divergence_scores_by_hand() {
    use FDivergenceScores::{ConstantsDropped as D, ZeroAtReference as Z};
    let l2 = core::f64::consts::LN_2;
    let close = |a: (f64, f64), b: (f64, f64)| {
        assert!(
            (a.0 - b.0).abs() < 1e-15 && (a.1 - b.1).abs() < 1e-15,
            "{a:?} vs {b:?}"
        );
    };
    let fk = FDivergence::ForwardKl;
    close(fk.score_with(D, l2), (-0.5, 0.5));
    close(fk.score_with(Z, l2), (0.5, 0.5));
    close(fk.score(l2), (-0.5, 0.5));
    // JS at 0: log σ(0) = −ln 2, σ(−0) = ½.
    let js = FDivergence::JsDivergence;
    close(js.score_with(D, 0.0), (-l2, 0.5));
    close(js.score_with(Z, 0.0), (0.0, 0.5));
    // JS at ln 3: σ = ¾, log σ = ln 3 − 2 ln 2; σ(−x) = ¼.
    let l3 = 3.0f64.ln();
    close(js.score_with(D, l3), (l3 - 2.0 * l2, 0.25));
    close(js.score_with(Z, l3), (l3 - l2, 0.25));
    // α = ½ at x = 2 ln 2: e^{(α−1)x} = ½, divided by α − 1 = −½.
    let a = FDivergence::Alpha(0.5);
    close(a.score_with(D, 2.0 * l2), (-1.0, 0.5));
    close(a.score_with(Z, 2.0 * l2), (1.0, 0.5));
    // α = 3 at x = 50: the clamp (80 < 100) is active, derivative 0.
    let a3 = FDivergence::Alpha(3.0);
    let e80 = 80.0f64.exp();
    close(a3.score_with(D, 50.0), (e80 / 2.0, 0.0));
    close(a3.score_with(Z, 50.0), ((e80 - 1.0) / 2.0, 0.0));
    // α ≈ 1 and reverse KL: the log-ratio itself under both.
    for s in [D, Z] {
        close(
            FDivergence::Alpha(1.0 + 1e-7).score_with(s, 0.3),
            (0.3, 1.0),
        );
        close(FDivergence::ReverseKl.score_with(s, -0.7), (-0.7, 1.0));
    }
    // f32: the same operations.
    let (v, d) = FDivergence::ForwardKl.score_with(Z, 0.25f32);
    assert_eq!(v, 1.0f32 - (-0.25f32).exp());
    assert_eq!(d, (-0.25f32).exp());
    let (v, _) = js.score_with(Z, 0.25f32);
    assert_eq!(
        v,
        core::f32::consts::LN_2 + <f32 as posttrain_core::ElemExt>::log_sigmoid(0.25f32)
    );
}

/// Every score's derivative matches central finite differences, both settings.
#[test]
fn divergence_score_derivative_matches_finite_differences() {
    let h = 1e-6;
    for s in SCORES {
        for i in 0..5 {
            let f = divergence(i);
            for x in [-3.0f64, -0.4, 0.0, 0.7, 2.5] {
                let (_, d): (f64, f64) = f.score_with(s, x);
                let fd = (f.score_with(s, x + h).0 - f.score_with(s, x - h).0) / (2.0 * h);
                assert!(
                    (fd - d).abs() < 1e-7 * (1.0 + d.abs()),
                    "{f:?} {s:?} x {x}: fd {fd} vs {d}"
                );
            }
        }
    }
}

/// One pair (β = ½, `ℓc = ln 2`, `ℓr = −ln 2`, no lengths), forward KL: the
/// pointwise losses by hand under both settings.
#[test]
fn pointwise_losses_by_hand() {
    use FDivergenceScores::{ConstantsDropped as D, ZeroAtReference as Z};
    let l2 = core::f64::consts::LN_2;
    let (c, r, c0, r0) = ([l2 - 1.0], [-l2 - 2.0], [-1.0], [-2.0]);
    let run = |s: FDivergenceScores, kind: PairedLoss| {
        let mut cfg = PairedConfig::preset(Preset::Trl, 0.5).unwrap();
        cfg.divergence = FDivergence::ForwardKl;
        let cfg = cfg.with_divergence_scores(s);
        let (mut dc, mut dr) = ([0.0], [0.0]);
        let b = PairBatch::new(&c[..], &r[..]).with_reference(&c0[..], &r0[..]);
        let out = paired_loss(
            &cfg,
            &[LossTerm::new(kind)],
            &b,
            None,
            Some(PairGrads::of_mean(1.0, &mut dc, &mut dr)),
            &mut [],
        )
        .unwrap();
        (out.loss, dc[0], dr[0])
    };
    let close = |a: (f64, f64, f64), b: (f64, f64, f64)| {
        let ok =
            (a.0 - b.0).abs() < 1e-14 && (a.1 - b.1).abs() < 1e-14 && (a.2 - b.2).abs() < 1e-14;
        assert!(ok, "{a:?} vs {b:?}");
    };
    let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
    let lsig = |z: f64| sig(z).ln();
    // Dropped: sc = −e^{−ln 2} = −½, sr = −e^{ln 2} = −2; f′ = ½ and 2.
    // At the reference the pointwise losses read ℓc = ln 2, ℓr = −ln 2, f′ = 1.
    let (sc, sr, fc, fr) = (-0.5, -2.0, 0.5, 2.0);
    let (xc, xr) = (l2, -l2);
    // sppo_hard: (u − 1)² + (v + 1)², ∂ = 2(u − 1), 2(v + 1).
    close(
        run(D, PairedLoss::SppoHard),
        (
            (sc - 1.0f64).powi(2) + (sr + 1.0f64).powi(2),
            2.0 * (sc - 1.0) * fc,
            2.0 * (sr + 1.0) * fr,
        ),
    );
    close(
        run(Z, PairedLoss::SppoHard),
        (
            (xc - 1.0f64).powi(2) + (xr + 1.0f64).powi(2),
            2.0 * (xc - 1.0),
            2.0 * (xr + 1.0),
        ),
    );
    // bco_pair: −log σ(βu) − log σ(−βv), ∂ = −βσ(−βu), βσ(βv).
    let bco = |u: f64, v: f64, fu: f64, fv: f64| {
        (
            -lsig(0.5 * u) - lsig(-0.5 * v),
            -0.5 * sig(-0.5 * u) * fu,
            0.5 * sig(0.5 * v) * fv,
        )
    };
    close(run(D, PairedLoss::BcoPair), bco(sc, sr, fc, fr));
    close(run(Z, PairedLoss::BcoPair), bco(xc, xr, 1.0, 1.0));
    // nca_pair: −log σ(βu) − ½ log σ(−βu) − ½ log σ(−βv).
    let nca = |u: f64, v: f64, fu: f64, fv: f64| {
        let (a, b) = (0.5 * u, 0.5 * v);
        (
            -lsig(a) - 0.5 * lsig(-a) - 0.5 * lsig(-b),
            0.5 * (-sig(-a) + 0.5 * sig(a)) * fu,
            0.5 * 0.5 * sig(b) * fv,
        )
    };
    close(run(D, PairedLoss::NcaPair), nca(sc, sr, fc, fr));
    close(run(Z, PairedLoss::NcaPair), nca(xc, xr, 1.0, 1.0));
    // apo_down: σ(βℓc) + 1 − σ(βΔ); Δ = sc − sr (dropped) or ℓc − ℓr.
    let apo = |d: f64, fu: f64, fv: f64| {
        let (a, z) = (0.5 * xc, 0.5 * d);
        let dd = -0.5 * sig(z) * sig(-z);
        (
            sig(a) + 1.0 - sig(z),
            0.5 * sig(a) * sig(-a) + dd * fu,
            -dd * fv,
        )
    };
    close(run(D, PairedLoss::ApoDown), apo(sc - sr, fc, fr));
    close(run(Z, PairedLoss::ApoDown), apo(xc - xr, 1.0, 1.0));
    // The losses of Δ agree (the constant cancels); apo_zero / aot_unpaired
    // never read scores: identical.
    for kind in [PairedLoss::Sigmoid, PairedLoss::Hinge, PairedLoss::Discopop] {
        let (a, b) = (run(D, kind), run(Z, kind));
        assert!(
            (a.0 - b.0).abs() < 1e-14 && (a.1 - b.1).abs() < 1e-14 && (a.2 - b.2).abs() < 1e-14,
            "{kind:?}"
        );
    }
    assert_eq!(run(D, PairedLoss::ApoZero), run(Z, PairedLoss::ApoZero));
}

/// With reverse KL both settings give the same numbers, every loss type.
#[test]
fn reverse_kl_ignores_the_score_setting() {
    let (c, r, c0, r0) = (
        [-2.0f64, -1.0, -3.0],
        [-2.5, -0.5, -1.0],
        [-2.2, -1.5, -2.0],
        [-2.0, -1.0, -1.5],
    );
    let (nc, nr, sft) = ([3.0, 1.0, 4.0], [2.0, 5.0, 1.0], [-4.0, -2.0, -3.0]);
    for kind in ALL {
        let ls = if matches!(kind, PairedLoss::ExoPair | PairedLoss::Robust) {
            0.2
        } else {
            0.1
        };
        let run = |s: FDivergenceScores| {
            let cfg = PairedConfig::new(0.3, ls, false, 0.0, FDivergence::ReverseKl, 0.5)
                .unwrap()
                .with_divergence_scores(s);
            let b = PairBatch::new(&c[..], &r[..])
                .with_reference(&c0[..], &r0[..])
                .with_lengths(&nc[..], &nr[..])
                .with_sft(SftInput {
                    chosen_logps: &sft[..],
                    tokens: 8.0,
                });
            let (mut dc, mut dr) = ([0.0; 3], [0.0; 3]);
            let mut order = [0usize; 6];
            let out = paired_loss(
                &cfg,
                &[LossTerm::new(kind)],
                &b,
                None,
                Some(PairGrads::of_mean(1.0, &mut dc, &mut dr)),
                &mut order,
            )
            .unwrap();
            (out, dc, dr)
        };
        assert_eq!(
            run(FDivergenceScores::ConstantsDropped),
            run(FDivergenceScores::ZeroAtReference),
            "{kind:?}"
        );
    }
}

#[test]
fn divergence_scores_options() {
    for s in SCORES {
        assert_eq!(s.name().parse::<FDivergenceScores>().unwrap(), s);
    }
    assert!(matches!(
        "trl_1.16".parse::<FDivergenceScores>(),
        Err(Error::UnknownOption { .. })
    ));
    let cfg = PairedConfig::preset(Preset::Trl, 0.1).unwrap();
    assert_eq!(cfg.divergence_scores, FDivergenceScores::ConstantsDropped);
    assert_eq!(
        FDivergenceScores::default(),
        FDivergenceScores::ConstantsDropped
    );
    let z = cfg.with_divergence_scores(FDivergenceScores::ZeroAtReference);
    assert!(z.validate().is_ok());
    for kind in ALL {
        let raw = matches!(
            kind,
            PairedLoss::NcaPair | PairedLoss::BcoPair | PairedLoss::SppoHard | PairedLoss::ApoDown
        );
        assert_eq!(
            FDivergenceScores::ZeroAtReference.reads_logratios(kind),
            raw,
            "{kind:?}"
        );
        assert!(!FDivergenceScores::ConstantsDropped.reads_logratios(kind));
    }
}
