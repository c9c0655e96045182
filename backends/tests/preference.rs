//! The preference ops on tensors against the core's f64 slice drivers on
//! seeded random inputs (f32-rounded); masked NaN changes nothing; typed
//! errors. The backend is the one `posttrain_burn::device()` picks.

use burn::tensor::{Bool, Int, Tensor, TensorData};
use posttrain_burn::preference::{self as pref, PairTensors, SftTensors};
use posttrain_burn::{device, tensor1, tensor2, tensor3, to_vec, Device};
use posttrain_core::preference::odds_ratio::{
    self as core_or, CpoConfig, CpoLossType, OrpoCotangents,
};
use posttrain_core::preference::paired::{
    self as core_paired, FDivergence, FDivergenceScores, LogitsPairBatch, LossTerm, PairBatch,
    PairGrads, PairedConfig, PairedLoss, Reference, SftInput,
};
use posttrain_core::preference::unpaired::{
    self as core_un, KtoConfig, KtoLossType, PrmConfig, RunningMoments,
};
use posttrain_core::{Dims, Error};

// ---------------------------------------------------------------------------
// helpers (the Rng of tests/ops.rs)
// ---------------------------------------------------------------------------

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `[lo, hi)`, rounded to f32.
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        (lo + (hi - lo) * self.unit()) as f32 as f64
    }
    fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    fn ids(&mut self, n: usize, v: usize) -> Vec<i64> {
        (0..n)
            .map(|_| (self.next_u64() % v as u64) as i64)
            .collect()
    }
    fn bools(&mut self, n: usize, p: f64) -> Vec<bool> {
        (0..n).map(|_| self.unit() < p).collect()
    }
}

fn dev() -> Device {
    device().expect("a backend is compiled in")
}

fn t1(v: &[f64]) -> Tensor<1> {
    tensor1(v, &dev())
}

fn t3(v: &[f64], s: [usize; 3]) -> Tensor<3> {
    tensor3(v, s, &dev()).unwrap()
}

fn i2(v: &[i64], s: [usize; 2]) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), s), &dev())
}

fn b2(v: &[bool], s: [usize; 2]) -> Tensor<2, Bool> {
    Tensor::from_data(TensorData::new(v.to_vec(), s), &dev())
}

fn b1(v: &[bool]) -> Tensor<1, Bool> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &dev())
}

fn s(t: Tensor<1>) -> f64 {
    to_vec(t)[0]
}

/// `|got − want| ≤ tol·(1 + |want|)` element-wise.
#[track_caller]
fn close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= tol * (1.0 + w.abs()) || (g.is_nan() && w.is_nan());
        assert!(
            ok,
            "{what}[{i}]: got {g}, want {w} (|Δ| = {:e})",
            (g - w).abs()
        );
    }
}

const TOL: f64 = 1e-5;

/// NaN / ±inf at every position where `keep` is false.
fn poison(v: &[f64], keep: impl Fn(usize) -> bool) -> Vec<f64> {
    v.iter()
        .enumerate()
        .map(|(i, &x)| {
            if keep(i) {
                x
            } else {
                [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][i % 3]
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// paired: AOT, SFT, per-pair VJP
// ---------------------------------------------------------------------------

#[test]
fn paired_loss_sorted_and_sft_terms_match_core() {
    let mut rng = Rng::new(11);
    let term_sets: Vec<Vec<LossTerm>> = vec![
        vec![LossTerm::new(PairedLoss::Aot)],
        vec![LossTerm::new(PairedLoss::AotUnpaired)],
        vec![LossTerm::new(PairedLoss::Sft)],
        vec![
            LossTerm::weighted(PairedLoss::Sigmoid, 0.6),
            LossTerm::weighted(PairedLoss::Aot, 0.3),
            LossTerm::weighted(PairedLoss::Sft, 0.1),
            LossTerm::weighted(PairedLoss::Ipo, 0.0),
        ],
    ];
    for n in [1usize, 2, 5, 9] {
        for terms in &term_sets {
            for weighted in [false, true] {
                let cfg =
                    PairedConfig::new(0.4, 0.2, false, 0.0, FDivergence::ReverseKl, 0.05).unwrap();
                let c = rng.vec(n, -20.0, -5.0);
                let mut r = rng.vec(n, -20.0, -5.0);
                if n > 2 {
                    // a tie in c − r (the stable order must match the core's)
                    r[1] = (c[1] - (c[0] - r[0])) as f32 as f64;
                }
                let c0 = rng.vec(n, -20.0, -5.0);
                let r0 = rng.vec(n, -20.0, -5.0);
                let plain = rng.vec(n, -30.0, -5.0);
                let tokens = (3 * n) as f64;
                let w = rng.vec(n, 0.5, 1.5);
                let mut tb = PairTensors::new(t1(&c), t1(&r))
                    .with_reference(t1(&c0), t1(&r0))
                    .with_sft(SftTensors {
                        chosen_logps: t1(&plain),
                        tokens: t1(&[tokens]),
                    });
                let mut cb = PairBatch::new(&c, &r)
                    .with_reference(&c0, &r0)
                    .with_sft(SftInput {
                        chosen_logps: &plain,
                        tokens,
                    });
                if weighted {
                    tb = tb.with_pair_weight(t1(&w));
                    cb = cb.with_pair_weight(&w);
                }
                let u = rng.vec(n, -1.0, 1.0);
                let (gu_c, gu_r) = pref::paired_loss_vjp(&cfg, terms, &tb, t1(&u)).unwrap();
                let out = pref::paired_loss(&cfg, terms, tb).unwrap();
                let mut order = vec![0usize; 2 * n];
                let (mut dc, mut dr, mut pp) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
                let want = core_paired::paired_loss(
                    &cfg,
                    terms,
                    &cb,
                    Some(&mut pp),
                    Some(PairGrads::of_mean(1.0, &mut dc, &mut dr)),
                    &mut order,
                )
                .unwrap();
                let ctx = format!("{terms:?} n={n} weighted={weighted}");
                close(&format!("{ctx} loss"), &to_vec(out.loss), &[want.loss], TOL);
                close(&format!("{ctx} per pair"), &to_vec(out.per_pair), &pp, TOL);
                close(&format!("{ctx} dc"), &to_vec(out.grad_chosen), &dc, TOL);
                close(&format!("{ctx} dr"), &to_vec(out.grad_rejected), &dr, TOL);
                close(
                    &format!("{ctx} d sft"),
                    &to_vec(out.d_sft_chosen_logps),
                    &[want.d_sft_chosen_logps],
                    TOL,
                );
                let (mut uc, mut ur) = (vec![0.0; n], vec![0.0; n]);
                core_paired::paired_loss(
                    &cfg,
                    terms,
                    &cb,
                    None,
                    Some(PairGrads::of_per_pair(&u, &mut uc, &mut ur)),
                    &mut order,
                )
                .unwrap();
                close(&format!("{ctx} per-pair vjp c"), &to_vec(gu_c), &uc, TOL);
                close(&format!("{ctx} per-pair vjp r"), &to_vec(gu_r), &ur, TOL);
            }
        }
    }
}

/// Every score-reading loss with every divergence and both kinds of
/// f-divergence scores (TRL f2cd577's dropped constants, TRL 1.16.0's zero
/// at the reference with raw log-ratios for the pointwise losses): the
/// tensors agree with the core's slice driver, values and VJPs.
#[test]
fn paired_f_divergence_scores_match_core() {
    let mut rng = Rng::new(17);
    let kinds = [
        PairedLoss::Sigmoid,
        PairedLoss::Hinge,
        PairedLoss::Ipo,
        PairedLoss::ExoPair,
        PairedLoss::NcaPair,
        PairedLoss::Robust,
        PairedLoss::BcoPair,
        PairedLoss::SppoHard,
        PairedLoss::ApoZero,
        PairedLoss::ApoDown,
        PairedLoss::Discopop,
        PairedLoss::SigmoidNorm,
    ];
    let divs = [
        FDivergence::ForwardKl,
        FDivergence::JsDivergence,
        FDivergence::Alpha(0.5),
        FDivergence::Alpha(1.5),
    ];
    let n = 5;
    for scores in [
        FDivergenceScores::ConstantsDropped,
        FDivergenceScores::ZeroAtReference,
    ] {
        for div in divs {
            // Small log-ratios (the divergences exponentiate them).
            let c = rng.vec(n, -12.0, -2.0);
            let r = rng.vec(n, -12.0, -2.0);
            let c0: Vec<f64> = c
                .iter()
                .map(|&x| (x + rng.uniform(-1.0, 1.0)) as f32 as f64)
                .collect();
            let r0: Vec<f64> = r
                .iter()
                .map(|&x| (x + rng.uniform(-1.0, 1.0)) as f32 as f64)
                .collect();
            let lc: Vec<f64> = (0..n).map(|i| (i % 4) as f64).collect();
            let lr: Vec<f64> = (0..n).map(|i| (1 + 2 * i) as f64).collect();
            for kind in kinds {
                let terms = [LossTerm::new(kind)];
                let cfg = PairedConfig::new(0.3, 0.2, false, 0.0, div, 0.5)
                    .unwrap()
                    .with_divergence_scores(scores);
                let tb = PairTensors::new(t1(&c), t1(&r))
                    .with_reference(t1(&c0), t1(&r0))
                    .with_lengths(t1(&lc), t1(&lr));
                let cb = PairBatch::new(&c, &r)
                    .with_reference(&c0, &r0)
                    .with_lengths(&lc, &lr);
                let u = rng.vec(n, -1.0, 1.0);
                let (gu_c, gu_r) = pref::paired_loss_vjp(&cfg, &terms, &tb, t1(&u)).unwrap();
                let out = pref::paired_loss(&cfg, &terms, tb).unwrap();
                let (mut dc, mut dr, mut pp) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
                let want = core_paired::paired_loss(
                    &cfg,
                    &terms,
                    &cb,
                    Some(&mut pp),
                    Some(PairGrads::of_mean(1.0, &mut dc, &mut dr)),
                    &mut [],
                )
                .unwrap();
                let ctx = format!("{kind:?} {div:?} {scores:?}");
                close(&format!("{ctx} loss"), &to_vec(out.loss), &[want.loss], TOL);
                close(&format!("{ctx} per pair"), &to_vec(out.per_pair), &pp, TOL);
                close(&format!("{ctx} dc"), &to_vec(out.grad_chosen), &dc, TOL);
                close(&format!("{ctx} dr"), &to_vec(out.grad_rejected), &dr, TOL);
                let (mut uc, mut ur) = (vec![0.0; n], vec![0.0; n]);
                core_paired::paired_loss(
                    &cfg,
                    &terms,
                    &cb,
                    None,
                    Some(PairGrads::of_per_pair(&u, &mut uc, &mut ur)),
                    &mut [],
                )
                .unwrap();
                close(&format!("{ctx} per-pair vjp c"), &to_vec(gu_c), &uc, TOL);
                close(&format!("{ctx} per-pair vjp r"), &to_vec(gu_r), &ur, TOL);
                // The settings differ where TRL 1.16.0 differs from f2cd577.
                if scores == FDivergenceScores::ZeroAtReference {
                    let dropped = cfg.with_divergence_scores(FDivergenceScores::ConstantsDropped);
                    let other =
                        core_paired::paired_loss(&dropped, &terms, &cb, None, None, &mut [])
                            .unwrap();
                    let differs = (other.loss - want.loss).abs() > 1e-9 * (1.0 + want.loss.abs());
                    let expected = matches!(
                        kind,
                        PairedLoss::Ipo
                            | PairedLoss::SigmoidNorm
                            | PairedLoss::NcaPair
                            | PairedLoss::BcoPair
                            | PairedLoss::SppoHard
                            | PairedLoss::ApoDown
                    );
                    assert_eq!(differs, expected, "{ctx}: {} vs {}", other.loss, want.loss);
                }
            }
        }
    }
}

/// TRL's whole step from logits with TRL 1.16.0's f-divergence scores.
#[test]
fn dpo_from_logits_zero_at_reference_scores_match_core() {
    let mut rng = Rng::new(31);
    let term_sets: Vec<Vec<LossTerm>> = vec![
        vec![LossTerm::new(PairedLoss::Ipo)],
        vec![LossTerm::new(PairedLoss::SigmoidNorm)],
        vec![
            LossTerm::weighted(PairedLoss::Sigmoid, 0.5),
            LossTerm::weighted(PairedLoss::NcaPair, 0.3),
            LossTerm::weighted(PairedLoss::ApoDown, 0.2),
            LossTerm::weighted(PairedLoss::SppoHard, 0.1),
        ],
    ];
    let k = dpo_case(&mut rng, 3, 6, 5);
    for (ti, terms) in term_sets.iter().enumerate() {
        for div in [
            FDivergence::ForwardKl,
            FDivergence::JsDivergence,
            FDivergence::Alpha(0.5),
        ] {
            for (pre, wpo) in [(true, false), (false, true)] {
                let cfg = PairedConfig::new(0.2, 0.1, false, 0.0, div, 0.05)
                    .unwrap()
                    .with_divergence_scores(FDivergenceScores::ZeroAtReference);
                let what = format!("terms#{ti} {div:?} pre={pre} wpo={wpo}");
                check_dpo(&what, &k, &k.logits, &k.ids, &cfg, terms, pre, None, wpo);
            }
        }
    }
}

#[test]
fn aot_sorts_nan_last_like_the_core() {
    let cfg = PairedConfig::new(0.5, 0.1, false, 0.0, FDivergence::ReverseKl, 0.05).unwrap();
    let c = [-3.0, f64::NAN, -1.0, -2.0];
    let r = [-2.0, -1.0, -4.0, -2.0];
    let terms = [LossTerm::new(PairedLoss::AotUnpaired)];
    let out = pref::paired_loss(&cfg, &terms, PairTensors::new(t1(&c), t1(&r))).unwrap();
    let (mut dc, mut dr, mut pp) = ([0.0; 4], [0.0; 4], [0.0; 4]);
    let mut order = [0usize; 8];
    core_paired::paired_loss(
        &cfg,
        &terms,
        &PairBatch::new(&c, &r),
        Some(&mut pp),
        Some(PairGrads::of_mean(1.0, &mut dc, &mut dr)),
        &mut order,
    )
    .unwrap();
    close("per pair", &to_vec(out.per_pair), &pp, TOL);
    close("dc", &to_vec(out.grad_chosen), &dc, TOL);
    close("dr", &to_vec(out.grad_rejected), &dr, TOL);
}

// ---------------------------------------------------------------------------
// TRL's DPO step from logits
// ---------------------------------------------------------------------------

struct DpoCase {
    dims: Dims,
    v: usize,
    logits: Vec<f64>,
    ref_logits: Vec<f64>,
    ids: Vec<i64>,
    cmask: Vec<bool>,
    c0: Vec<f64>,
    r0: Vec<f64>,
}

fn dpo_case(rng: &mut Rng, n: usize, t: usize, v: usize) -> DpoCase {
    let dims = Dims::new(2 * n, t);
    let mut cmask = rng.bools(dims.len(), 0.7);
    for r in 0..2 * n {
        cmask[r * t] = false; // the prompt's first token
    }
    DpoCase {
        dims,
        v,
        logits: rng.vec(dims.len() * v, -4.0, 4.0),
        ref_logits: rng.vec(dims.len() * v, -4.0, 4.0),
        ids: rng.ids(dims.len(), v),
        cmask,
        c0: rng.vec(n, -15.0, -2.0),
        r0: rng.vec(n, -15.0, -2.0),
    }
}

#[allow(clippy::too_many_arguments)]
fn check_dpo(
    what: &str,
    k: &DpoCase,
    logits: &[f64],
    ids: &[i64],
    cfg: &PairedConfig,
    terms: &[LossTerm],
    pre: bool,
    ld_alpha: Option<f64>,
    wpo: bool,
) {
    let (rows, t, v) = (k.dims.batch, k.dims.seq, k.v);
    let reference = if pre {
        pref::ReferenceTensors::Precomputed(t1(&k.c0), t1(&k.r0))
    } else {
        pref::ReferenceTensors::Logits(t3(&k.ref_logits, [rows, t, v]))
    };
    let out = pref::dpo_from_logits(
        cfg,
        terms,
        pref::LogitsPairTensors {
            logits: t3(logits, [rows, t, v]),
            input_ids: i2(ids, [rows, t]),
            completion_mask: b2(&k.cmask, [rows, t]),
            reference,
            ld_alpha,
            use_weighting: wpo,
        },
    )
    .unwrap();
    let cref = if pre {
        Reference::Precomputed {
            chosen: &k.c0,
            rejected: &k.r0,
        }
    } else {
        Reference::Logits(&k.ref_logits)
    };
    let batch = LogitsPairBatch {
        dims: k.dims,
        vocab: v,
        logits: &k.logits,
        input_ids: &k.ids,
        completion_mask: &k.cmask,
        reference: cref,
        ld_alpha,
        use_weighting: wpo,
    };
    let mut scratch = vec![0.0; core_paired::dpo_from_logits_scratch_len(k.dims)];
    let mut order = vec![0usize; rows];
    let mut g = vec![0.0; k.logits.len()];
    let (want, tm) = core_paired::dpo_from_logits(
        cfg,
        terms,
        &batch,
        Some((1.0, &mut g)),
        &mut scratch,
        &mut order,
    )
    .unwrap();
    let m = &out.metrics;
    close(
        &format!("{what} loss"),
        &to_vec(out.loss.clone()),
        &[want.loss],
        TOL,
    );
    close(
        &format!("{what} grad"),
        &to_vec(out.grad_logits.clone()),
        &g,
        TOL,
    );
    let got = [
        s(out.entropy.clone()),
        s(out.logits_chosen.clone()),
        s(out.logits_rejected.clone()),
        s(out.token_accuracy.clone()),
        s(m.reward_chosen.clone()),
        s(m.reward_rejected.clone()),
        s(m.accuracy.clone()),
        s(m.margin.clone()),
        s(m.logps_chosen.clone()),
        s(m.logps_rejected.clone()),
    ];
    let wm = want.metrics;
    let exp = [
        tm.entropy,
        tm.logits_chosen,
        tm.logits_rejected,
        tm.token_accuracy,
        wm.reward_chosen,
        wm.reward_rejected,
        wm.accuracy,
        wm.margin,
        wm.logps_chosen,
        wm.logps_rejected,
    ];
    close(&format!("{what} metrics"), &got, &exp, TOL);
}

#[test]
fn dpo_from_logits_matches_core() {
    let mut rng = Rng::new(23);
    let term_sets: Vec<Vec<LossTerm>> = vec![
        vec![LossTerm::new(PairedLoss::Sigmoid)],
        vec![LossTerm::new(PairedLoss::Ipo)],
        vec![LossTerm::new(PairedLoss::SigmoidNorm)],
        vec![LossTerm::new(PairedLoss::Aot)],
        vec![
            LossTerm::weighted(PairedLoss::Sigmoid, 0.5),
            LossTerm::weighted(PairedLoss::BcoPair, 0.3),
            LossTerm::weighted(PairedLoss::Sft, 0.2),
        ],
    ];
    for (n, t, v) in [(1usize, 4usize, 3usize), (3, 6, 5)] {
        let k = dpo_case(&mut rng, n, t, v);
        for (ti, terms) in term_sets.iter().enumerate() {
            for (pre, ld, wpo) in [
                (true, None, false),
                (false, None, false),
                (false, Some(0.5), false),
                (true, None, true),
                (false, Some(0.3), true),
            ] {
                let cfg = PairedConfig::new(0.2, 0.1, false, 0.0, FDivergence::JsDivergence, 0.05)
                    .unwrap();
                let what = format!("n={n} terms#{ti} pre={pre} ld={ld:?} wpo={wpo}");
                check_dpo(&what, &k, &k.logits, &k.ids, &cfg, terms, pre, ld, wpo);
            }
        }
    }
}

#[test]
fn dpo_from_logits_masked_nan_changes_nothing() {
    let mut rng = Rng::new(29);
    let k = dpo_case(&mut rng, 2, 6, 4);
    let (t, v) = (k.dims.seq, k.v);
    // Logits rows that score no counted token, and every uncounted id.
    let counted_row = |i: usize| {
        let (r, pos) = (i / (t * v), (i / v) % t);
        pos + 1 < t && k.cmask[r * t + pos + 1]
    };
    let logits = poison(&k.logits, counted_row);
    let ids: Vec<i64> = k
        .ids
        .iter()
        .enumerate()
        .map(|(i, &x)| if k.cmask[i] { x } else { -100 })
        .collect();
    let cfg = PairedConfig::new(0.1, 0.0, false, 0.0, FDivergence::ReverseKl, 0.05).unwrap();
    let terms = [LossTerm::new(PairedLoss::Sigmoid)];
    // The core reads the clean inputs: the poisoned tensors must agree.
    check_dpo(
        "poisoned", &k, &logits, &ids, &cfg, &terms, true, None, false,
    );
}

// ---------------------------------------------------------------------------
// shifted sequence log-probs and NLL
// ---------------------------------------------------------------------------

#[test]
fn shifted_ops_match_core_and_ignore_masked_nan() {
    let mut rng = Rng::new(31);
    for (b, t, v) in [(1usize, 1usize, 3usize), (2, 5, 4), (4, 7, 6)] {
        let d = Dims::new(b, t);
        let logits = rng.vec(d.len() * v, -5.0, 5.0);
        let mut valid = rng.bools(d.len(), 0.6);
        if b > 2 {
            for x in &mut valid[(b - 1) * t..] {
                *x = false; // a row that counts nothing
            }
        }
        let ids: Vec<i64> = rng
            .ids(d.len(), v)
            .into_iter()
            .zip(&valid)
            .map(|(x, &m)| if m { x } else { -100 })
            .collect();
        let counted_row = |i: usize| {
            let (r, pos) = (i / (t * v), (i / v) % t);
            pos + 1 < t && valid[r * t + pos + 1]
        };
        let poisoned = poison(&logits, counted_row);
        let cot = rng.vec(b, -1.0, 1.0);
        for average in [false, true] {
            let got = pref::shifted_sequence_logps(
                t3(&poisoned, [b, t, v]),
                i2(&ids, [b, t]),
                b2(&valid, [b, t]),
                average,
            )
            .unwrap();
            let mut want = vec![0.0; b];
            core_or::shifted_sequence_logps(&logits, d, v, &ids, &valid, average, &mut want)
                .unwrap();
            close("seq logps", &to_vec(got), &want, TOL);
            let g = pref::shifted_sequence_logps_vjp(
                t3(&poisoned, [b, t, v]),
                i2(&ids, [b, t]),
                b2(&valid, [b, t]),
                average,
                t1(&cot),
            )
            .unwrap();
            let mut gw = vec![0.0; logits.len()];
            let mut scratch = vec![0.0; v];
            core_or::shifted_sequence_logps_vjp(
                &logits,
                d,
                v,
                &ids,
                &valid,
                average,
                &cot,
                &mut gw,
                &mut scratch,
            )
            .unwrap();
            close("seq logps vjp", &to_vec(g), &gw, TOL);
        }
        let (nll, g) = pref::shifted_mean_nll(
            t3(&poisoned, [b, t, v]),
            i2(&ids, [b, t]),
            b2(&valid, [b, t]),
        )
        .unwrap();
        let mut gw = vec![0.0; logits.len()];
        let mut scratch = vec![0.0; v];
        let want = core_or::shifted_mean_nll(
            &logits,
            d,
            v,
            &ids,
            &valid,
            Some((1.0, &mut gw, &mut scratch)),
        )
        .unwrap();
        close("nll", &to_vec(nll), &[want], TOL);
        close("nll grad", &to_vec(g), &gw, TOL);
    }
}

// ---------------------------------------------------------------------------
// reward model
// ---------------------------------------------------------------------------

#[test]
fn pairwise_reward_loss_matches_core() {
    let mut rng = Rng::new(37);
    for n in [1usize, 4, 9] {
        for (margin, centering) in [(false, None), (true, None), (true, Some(0.3))] {
            let c = rng.vec(n, -3.0, 3.0);
            let r = rng.vec(n, -3.0, 3.0);
            let m = rng.vec(n, 0.0, 1.0);
            let out = pref::pairwise_reward_loss(t1(&c), t1(&r), margin.then(|| t1(&m)), centering)
                .unwrap();
            let (mut dc, mut dr) = (vec![0.0; n], vec![0.0; n]);
            let w = core_paired::pairwise_reward_loss(
                &c,
                &r,
                margin.then_some(&m[..]),
                centering,
                Some((1.0, &mut dc, &mut dr)),
            )
            .unwrap();
            let got = [
                s(out.loss),
                s(out.min_reward),
                s(out.mean_reward),
                s(out.max_reward),
                s(out.accuracy),
                s(out.margin),
            ];
            let want = [
                w.loss,
                w.min_reward,
                w.mean_reward,
                w.max_reward,
                w.accuracy,
                w.margin,
            ];
            close("reward scalars", &got, &want, TOL);
            close("reward dc", &to_vec(out.grad_chosen), &dc, TOL);
            close("reward dr", &to_vec(out.grad_rejected), &dr, TOL);
        }
    }
}

// ---------------------------------------------------------------------------
// KTO, vanilla KTO, BCO
// ---------------------------------------------------------------------------

#[test]
fn kto_matches_core() {
    let mut rng = Rng::new(41);
    for n in [1usize, 5, 12] {
        for loss_type in [KtoLossType::Kto, KtoLossType::ApoZeroUnpaired] {
            let cfg = KtoConfig::new(loss_type, 0.3, 1.2, 0.7).unwrap();
            let pk = rng.vec(n, -10.0, -2.0);
            let rk = rng.vec(n, -10.0, -2.0);
            let mut z = rng.vec(n, -3.0, 3.0);
            if n > 2 {
                z[1] = f64::NAN; // a NaN term is skipped (nanmean)
            }
            let des = rng.bools(n, 0.5);
            let kl = pref::kto_kl_baseline(t1(&pk), t1(&rk)).unwrap();
            let kl_w = core_un::kto_kl_baseline(&pk, &rk).unwrap();
            close("kl", &to_vec(kl.clone()), &[kl_w], TOL);
            let kl_in = if loss_type.uses_kl() { kl_w } else { 0.0 };
            let out = pref::kto_loss(&cfg, t1(&z), b1(&des), t1(&[kl_in])).unwrap();
            let mut g = vec![0.0; n];
            let w = core_un::kto_loss(&cfg, &z, &des, kl_in, Some(&mut g)).unwrap();
            close("kto loss", &to_vec(out.loss), &[w], TOL);
            close("kto grad", &to_vec(out.grad_logratios), &g, TOL);
        }
    }
}

#[test]
fn vanilla_kto_matches_core() {
    let mut rng = Rng::new(43);
    for (nc, nr) in [(1usize, 1usize), (3, 5), (6, 2)] {
        for shift in [-1.0, 1.0] {
            let c: Vec<f64> = rng.vec(nc, -1.0, 1.0).iter().map(|x| x + shift).collect();
            let r: Vec<f64> = rng.vec(nr, -1.0, 1.0).iter().map(|x| x - shift).collect();
            let out = pref::vanilla_kto_loss(0.5, t1(&c), t1(&r)).unwrap();
            let (mut dc, mut dr) = (vec![0.0; nc], vec![0.0; nr]);
            let w = core_un::vanilla_kto_loss(0.5, &c, &r, Some((&mut dc, &mut dr))).unwrap();
            close("vkto loss", &to_vec(out.loss), &[w], TOL);
            close("vkto dc", &to_vec(out.grad_chosen), &dc, TOL);
            close("vkto dr", &to_vec(out.grad_rejected), &dr, TOL);
        }
    }
}

#[test]
fn bco_matches_core() {
    let mut rng = Rng::new(47);
    for (nc, nr) in [(1usize, 1usize), (4, 3)] {
        for do_train in [false, true] {
            let c = rng.vec(nc, -2.0, 2.0);
            let r = rng.vec(nr, -2.0, 2.0);
            let cl = rng.vec(nc + nr, -1.0, 1.0);
            let ccr = rng.vec(nc, -1.0, 1.0);
            let crr = rng.vec(nr, -1.0, 1.0);
            let start = RunningMoments {
                mean: 0.2,
                var: 1.5,
                std: 1.5f64.sqrt(),
                count: 10.0,
            };
            let mut run_t = start;
            let out = pref::bco_loss(
                0.7,
                t1(&c),
                t1(&r),
                &mut run_t,
                do_train,
                Some(pref::BcoCotangentTensors {
                    losses: t1(&cl),
                    chosen_rewards: t1(&ccr),
                    rejected_rewards: t1(&crr),
                }),
            )
            .unwrap();
            let mut run_c = start;
            let (mut l, mut cr, mut rr) = (vec![0.0; nc + nr], vec![0.0; nc], vec![0.0; nr]);
            let (mut dc, mut dr) = (vec![0.0; nc], vec![0.0; nr]);
            let delta = core_un::bco_loss(
                0.7,
                &c,
                &r,
                &mut run_c,
                do_train,
                &mut l,
                &mut cr,
                &mut rr,
                Some(((&cl, &ccr, &crr), &mut dc, &mut dr)),
            )
            .unwrap();
            close("bco losses", &to_vec(out.losses), &l, TOL);
            close("bco cr", &to_vec(out.chosen_rewards), &cr, TOL);
            close("bco rr", &to_vec(out.rejected_rewards), &rr, TOL);
            close("bco dc", &to_vec(out.grad_chosen.unwrap()), &dc, TOL);
            close("bco dr", &to_vec(out.grad_rejected.unwrap()), &dr, TOL);
            close(
                "bco running",
                &[out.delta, run_t.mean, run_t.var, run_t.std, run_t.count],
                &[delta, run_c.mean, run_c.var, run_c.std, run_c.count],
                TOL,
            );
        }
    }
}

// ---------------------------------------------------------------------------
// process reward model
// ---------------------------------------------------------------------------

#[test]
fn prm_matches_core_and_ignores_unscored_nan() {
    let mut rng = Rng::new(53);
    let (b, sq, v) = (3usize, 6usize, 7usize);
    let ph = 5i64;
    let ids_sets: [Option<Vec<i64>>; 3] = [None, Some(vec![2, 4]), Some(vec![1, 3, 6])];
    for ids in &ids_sets {
        let cfg = PrmConfig {
            placeholder_token_id: ph,
            reward_token_ids: ids.as_deref(),
        };
        let inputs: Vec<i64> = (0..b * sq)
            .map(|_| if rng.unit() < 0.5 { ph } else { 0 })
            .collect();
        let logits = rng.vec(b * sq * v, -3.0, 3.0);
        let scored = |i: usize| inputs[i / v] == ph;
        let poisoned = poison(&logits, scored);
        let n_cls = ids.as_ref().map_or(v, |x| x.len());
        let labels: Vec<i64> = (0..b * sq)
            .map(|i| {
                if i % 5 == 0 {
                    -100
                } else {
                    let k = (rng.next_u64() % n_cls as u64) as usize;
                    ids.as_ref().map_or(k as i64, |x| x[k])
                }
            })
            .collect();
        let out = pref::prm_hard_loss(
            &cfg,
            i2(&inputs, [b, sq]),
            t3(&poisoned, [b, sq, v]),
            i2(&labels, [b, sq]),
        )
        .unwrap();
        let mut g = vec![0.0; logits.len()];
        let w = core_un::prm_hard_loss(&cfg, &inputs, &logits, v, &labels, Some(&mut g)).unwrap();
        close(
            "prm hard",
            &[s(out.loss), s(out.acc)],
            &[w.loss, w.acc],
            TOL,
        );
        close("prm hard grad", &to_vec(out.grad_logits), &g, TOL);
        if ids.as_ref().map(|x| x.len()) == Some(2) {
            let soft = rng.vec(b * sq, 0.0, 1.0);
            let soft_p = poison(&soft, |i| inputs[i] == ph);
            let out = pref::prm_soft_loss(
                &cfg,
                i2(&inputs, [b, sq]),
                t3(&poisoned, [b, sq, v]),
                tensor2(&soft_p, [b, sq], &dev()).unwrap(),
            )
            .unwrap();
            let mut g = vec![0.0; logits.len()];
            let w = core_un::prm_soft_loss(&cfg, &inputs, &logits, v, &soft, Some(&mut g)).unwrap();
            close(
                "prm soft",
                &[s(out.loss), s(out.acc)],
                &[w.loss, w.acc],
                TOL,
            );
            close("prm soft grad", &to_vec(out.grad_logits), &g, TOL);
        }
    }
}

// ---------------------------------------------------------------------------
// CPO and ORPO
// ---------------------------------------------------------------------------

#[test]
fn cpo_and_odds_ratio_match_core() {
    let mut rng = Rng::new(59);
    for n in [1usize, 6] {
        for loss_type in [
            CpoLossType::Sigmoid,
            CpoLossType::Hinge,
            CpoLossType::Ipo,
            CpoLossType::Simpo,
        ] {
            for alpha in [0.0, 0.3] {
                let cfg = CpoConfig::new(loss_type, 0.8, 0.1, 0.5, alpha, 1.0).unwrap();
                let c = rng.vec(n, -3.0, -0.1);
                let r = rng.vec(n, -3.0, -0.1);
                let out = pref::cpo_loss(&cfg, t1(&c), t1(&r)).unwrap();
                let ones = vec![1.0; n];
                let (mut l, mut cr, mut rr) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
                let (mut dc, mut dr) = (vec![0.0; n], vec![0.0; n]);
                core_or::cpo_loss(
                    &cfg,
                    &c,
                    &r,
                    &mut l,
                    &mut cr,
                    &mut rr,
                    Some((&ones, &mut dc, &mut dr)),
                )
                .unwrap();
                let what = format!("cpo {loss_type:?} α={alpha}");
                close(&what, &to_vec(out.losses), &l, TOL);
                close(&what, &to_vec(out.chosen_rewards), &cr, TOL);
                close(&what, &to_vec(out.rejected_rewards), &rr, TOL);
                close(&what, &to_vec(out.d_chosen), &dc, TOL);
                close(&what, &to_vec(out.d_rejected), &dr, TOL);
            }
        }
        let c = rng.vec(n, -3.0, -0.05);
        let r = rng.vec(n, -3.0, -0.05);
        let cl = rng.vec(n, -1.0, 1.0);
        let out = pref::odds_ratio_loss(
            0.4,
            t1(&c),
            t1(&r),
            Some(pref::OrpoCotangentTensors {
                losses: t1(&cl),
                log_odds_ratio: 0.3,
                log_odds_chosen: -0.7,
            }),
        )
        .unwrap();
        let (mut l, mut cr, mut rr) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let (mut dc, mut dr) = (vec![0.0; n], vec![0.0; n]);
        let m = core_or::odds_ratio_loss(
            0.4,
            &c,
            &r,
            &mut l,
            &mut cr,
            &mut rr,
            Some((
                OrpoCotangents {
                    losses: &cl,
                    log_odds_ratio: 0.3,
                    log_odds_chosen: -0.7,
                },
                &mut dc,
                &mut dr,
            )),
        )
        .unwrap();
        close("orpo losses", &to_vec(out.losses), &l, TOL);
        close(
            "orpo metrics",
            &[s(out.log_odds_ratio), s(out.log_odds_chosen)],
            &[m.log_odds_ratio, m.log_odds_chosen],
            TOL,
        );
        close("orpo dc", &to_vec(out.grad_chosen.unwrap()), &dc, TOL);
        close("orpo dr", &to_vec(out.grad_rejected.unwrap()), &dr, TOL);
    }
}

// ---------------------------------------------------------------------------
// typed errors
// ---------------------------------------------------------------------------

#[test]
fn shape_mismatches_and_bad_inputs_are_typed_errors() {
    let cfg = PairedConfig::new(0.1, 0.0, false, 0.0, FDivergence::ReverseKl, 0.05).unwrap();
    let terms = [LossTerm::new(PairedLoss::Aot)];
    let b = PairTensors::new(t1(&[-1.0, -2.0]), t1(&[-2.0]));
    assert!(matches!(
        pref::paired_loss(&cfg, &terms, b),
        Err(Error::ShapeMismatch {
            input: "policy_rejected_logps",
            ..
        })
    ));
    let b = PairTensors::new(t1(&[-1.0]), t1(&[-2.0]));
    assert!(matches!(
        pref::paired_loss(&cfg, &[LossTerm::new(PairedLoss::Sft)], b),
        Err(Error::Invalid { input: "sft", .. })
    ));
    assert!(matches!(
        pref::pairwise_reward_loss(t1(&[1.0, 2.0]), t1(&[1.0]), None, None),
        Err(Error::ShapeMismatch { .. })
    ));
    let kcfg = KtoConfig::new(KtoLossType::Kto, 0.1, 1.0, 1.0).unwrap();
    assert!(matches!(
        pref::kto_loss(&kcfg, t1(&[0.1, 0.2]), b1(&[true]), t1(&[0.0])),
        Err(Error::ShapeMismatch { input: "label", .. })
    ));
    assert!(matches!(
        pref::vanilla_kto_loss(0.0, t1(&[0.1]), t1(&[0.2])),
        Err(Error::OutOfRange { .. })
    ));
    let z = t3(&[0.0; 12], [2, 2, 3]);
    assert!(matches!(
        pref::shifted_sequence_logps(
            z.clone(),
            i2(&[0, 1, 2], [1, 3]),
            b2(&[true; 4], [2, 2]),
            false
        ),
        Err(Error::ShapeMismatch { .. })
    ));
    // a counted id outside the vocabulary
    assert!(matches!(
        pref::shifted_sequence_logps(
            z.clone(),
            i2(&[0, 7, 0, 1], [2, 2]),
            b2(&[true; 4], [2, 2]),
            false
        ),
        Err(Error::Invalid { .. })
    ));
    let odd = pref::LogitsPairTensors {
        logits: t3(&[0.0; 9], [3, 1, 3]),
        input_ids: i2(&[0, 0, 0], [3, 1]),
        completion_mask: b2(&[true; 3], [3, 1]),
        reference: pref::ReferenceTensors::Precomputed(t1(&[0.0]), t1(&[0.0])),
        ld_alpha: None,
        use_weighting: false,
    };
    assert!(matches!(
        pref::dpo_from_logits(&cfg, &[LossTerm::new(PairedLoss::Sigmoid)], odd),
        Err(Error::Invalid {
            input: "logits",
            ..
        })
    ));
    let pcfg = PrmConfig {
        placeholder_token_id: 1,
        reward_token_ids: Some(&[0, 9]),
    };
    assert!(matches!(
        pref::prm_hard_loss(
            &pcfg,
            i2(&[1, 1], [1, 2]),
            t3(&[0.0; 6], [1, 2, 3]),
            i2(&[0, 0], [1, 2])
        ),
        Err(Error::Invalid {
            input: "reward_token_ids",
            ..
        })
    ));
    let cpo = CpoConfig::new(CpoLossType::Sigmoid, 0.1, 0.0, 0.5, 0.0, 1.0).unwrap();
    assert!(matches!(
        pref::cpo_loss(&cpo, t1(&[0.1, 0.2]), t1(&[0.1])),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        pref::odds_ratio_loss(-1.0, t1(&[-0.1]), t1(&[-0.2]), None),
        Err(Error::OutOfRange { .. })
    ));
}
