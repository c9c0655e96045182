//! Determinism: for a representative op of every family, the same input
//! gives bitwise-identical values, metrics and gradients across repeated
//! runs and when run concurrently from 1, 2 and 8 threads, in f32 and f64.
//!
//! Every op is a pure function of its arguments (no global state, no
//! parallel reductions), so any difference here is a bug: an uninitialised
//! scratch read, an order-dependent sort of equal keys, or hidden state.

use posttrain_core::advantage::{
    gae_advantages_returns, group_zscore_advantages, GaeConfig, GroupNormConfig,
};
use posttrain_core::aggregate::{aggregate, AggMode, GlobalNorm};
use posttrain_core::distill::{generalized_jsd_loss, DistillConfig, Reduction};
use posttrain_core::kl::{KlConfig, KlEstimator};
use posttrain_core::logits::{entropy_from_logits, gather_log_softmax, Temperature};
use posttrain_core::policy::grpo::{grpo_loss, GrpoConfig, GrpoInputs, GrpoLossType};
use posttrain_core::policy::ppo::{clipped_policy_loss, ClippedPolicyLoss, RatioLevel};
use posttrain_core::policy::rollout::{rollout_correction_weights, IsConfig, IsLevel, IsThreshold};
use posttrain_core::policy::token::PolicyBatch;
use posttrain_core::policy::ClipConfig;
use posttrain_core::preference::odds_ratio::{odds_ratio_loss, OrpoCotangents};
use posttrain_core::preference::paired::{
    paired_loss, LossTerm, PairBatch, PairGrads, PairedConfig, PairedLoss,
};
use posttrain_core::preference::unpaired::{kto_loss, KtoConfig, KtoLossType};
use posttrain_core::stats::{masked_whiten, Reduce, WhitenConfig};
use posttrain_core::value::{value_loss, ValueLossConfig};
use posttrain_core::{Dims, Preset, Real};

const B: usize = 8;
const T: usize = 16;
const V: usize = 32;

/// Deterministic pseudo-random inputs (xorshift), in `[lo, hi)`.
fn data<F: Real>(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<F> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            F::of(lo + (hi - lo) * ((s >> 11) as f64 / (1u64 << 53) as f64))
        })
        .collect()
}

fn mask(seed: u64, n: usize) -> Vec<bool> {
    data::<f64>(seed, n, 0.0, 1.0)
        .into_iter()
        .enumerate()
        .map(|(i, x)| i % T == 0 || x < 0.8)
        .collect()
}

/// The fingerprint of one run: every value and gradient as raw bits, and
/// the Debug form of the output structs (shortest round-trip floats).
#[derive(PartialEq, Eq, Debug)]
struct Print(Vec<u64>, String);

fn bits<F: Real>(x: &[F]) -> Vec<u64> {
    x.iter().map(|v| v.to_f64().to_bits()).collect()
}

type Op = (&'static str, fn() -> Print);

fn policy<F: Real>() -> Print {
    let dims = Dims::new(B, T);
    let n = dims.len();
    let (lp, old, adv) = (
        data::<F>(1, n, -3.0, 0.0),
        data::<F>(2, n, -3.0, 0.0),
        data::<F>(3, n, -2.0, 2.0),
    );
    let m = mask(4, n);
    let clip = ClipConfig {
        eps_low: 0.2,
        eps_high: 0.28,
        dual_clip: Some(3.0),
        log_ratio_clamp: Some(20.0),
    };
    let cfg = ClippedPolicyLoss::new(clip, RatioLevel::Token, true, None).unwrap();
    let batch = PolicyBatch {
        dims,
        log_prob: &lp,
        old_log_prob: &old,
        advantages: &adv,
        mask: &m,
        is_weights: None,
    };
    let mut scratch = vec![F::zero(); ClippedPolicyLoss::scratch_len(dims)];
    let mut g = vec![F::zero(); n];
    let out = clipped_policy_loss(
        &cfg,
        &GlobalNorm::default(),
        &batch,
        None,
        &mut scratch,
        Some((F::one(), &mut g)),
    )
    .unwrap();
    Print(bits(&g), format!("{out:?}"))
}

fn grpo<F: Real>() -> Print {
    let dims = Dims::new(B, T);
    let n = dims.len();
    let (lp, old, ent) = (
        data::<F>(5, n, -3.0, 0.0),
        data::<F>(6, n, -3.0, 0.0),
        data::<F>(7, n, 0.0, 2.0),
    );
    let adv = data::<F>(8, B, -1.0, 1.0);
    let m = mask(9, n);
    let cfg = GrpoConfig::trl(GrpoLossType::Dapo);
    let x = GrpoInputs::new(dims, &lp, &ent, &m, &adv).old_log_probs(&old);
    let (mut g, mut ge) = (vec![F::zero(); n], vec![F::zero(); n]);
    let out = grpo_loss(&cfg, &x, Some(&mut g), Some(&mut ge), &mut []).unwrap();
    let mut b = bits(&g);
    b.extend(bits(&ge));
    Print(b, format!("{out:?}"))
}

fn value<F: Real>() -> Print {
    let dims = Dims::new(B, T);
    let n = dims.len();
    let (v, old, ret) = (
        data::<F>(10, n, -1.0, 1.0),
        data::<F>(11, n, -1.0, 1.0),
        data::<F>(12, n, -1.0, 1.0),
    );
    let m = mask(13, n);
    let cfg = ValueLossConfig::new(Some(0.2), AggMode::SeqMeanTokenMean).unwrap();
    let (mut per, mut g) = (vec![F::zero(); n], vec![F::zero(); n]);
    let out = value_loss(&cfg, dims, &v, &old, &ret, &m, &mut per, Some(&mut g)).unwrap();
    let mut b = bits(&per);
    b.extend(bits(&g));
    Print(b, format!("{out:?}"))
}

fn kl<F: Real>() -> Print {
    let n = B * T;
    let (lp, rf) = (data::<F>(14, n, -4.0, 0.0), data::<F>(15, n, -4.0, 0.0));
    let cot = data::<F>(16, n, -1.0, 1.0);
    let mut b = Vec::new();
    for est in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
        let cfg = KlConfig::preset(est, Preset::Verl);
        let (mut out, mut g) = (vec![F::zero(); n], vec![F::zero(); n]);
        cfg.estimate_slices(&lp, &rf, &mut out, Some((&cot, &mut g)))
            .unwrap();
        b.extend(bits(&out));
        b.extend(bits(&g));
    }
    Print(b, String::new())
}

fn aggregation<F: Real>() -> Print {
    let dims = Dims::new(B, T);
    let n = dims.len();
    let loss = data::<F>(17, n, -2.0, 2.0);
    let m = mask(18, n);
    let mut b = Vec::new();
    for mode in AggMode::ALL {
        let mut g = vec![F::zero(); n];
        let l = aggregate(mode, &GlobalNorm::default(), dims, &loss, &m, Some(&mut g)).unwrap();
        b.push(l.to_f64().to_bits());
        b.extend(bits(&g));
    }
    Print(b, String::new())
}

fn whitening<F: Real>() -> Print {
    let dims = Dims::new(B, T);
    let n = dims.len();
    let x = data::<F>(19, n, -5.0, 5.0);
    let cot = data::<F>(20, n, -1.0, 1.0);
    let m = mask(21, n);
    let mut b = Vec::new();
    for preset in [Preset::Verl, Preset::Torchtune] {
        let (mut out, mut g) = (vec![F::zero(); n], vec![F::zero(); n]);
        let cfg = WhitenConfig::preset(preset);
        masked_whiten(
            &cfg,
            dims,
            Reduce::All,
            &x,
            &m,
            &mut out,
            Some((&cot, &mut g)),
        )
        .unwrap();
        b.extend(bits(&out));
        b.extend(bits(&g));
    }
    Print(b, String::new())
}

fn advantages<F: Real>() -> Print {
    let dims = Dims::new(B, T);
    let n = dims.len();
    // Group ids out of order, with ties among scores (a stable sort matters).
    let scores: Vec<F> = data::<f64>(22, 4 * B, 0.0, 3.0)
        .into_iter()
        .map(|x| F::of(x.floor()))
        .collect();
    let index: Vec<i64> = (0..4 * B as i64).map(|i| (i * 7) % 5 - 2).collect();
    let mut perm = vec![0usize; 4 * B];
    let mut adv = vec![F::zero(); 4 * B];
    group_zscore_advantages(
        &GroupNormConfig::preset(Preset::Verl),
        &scores,
        &index,
        &mut perm,
        &mut adv,
    )
    .unwrap();
    let mut b = bits(&adv);
    let (r, v) = (data::<F>(23, n, -1.0, 1.0), data::<F>(24, n, -1.0, 1.0));
    let m = mask(25, n);
    let (mut a, mut ret) = (vec![F::zero(); n], vec![F::zero(); n]);
    let cfg = GaeConfig::preset(Preset::Verl, 0.99, 0.95).unwrap();
    gae_advantages_returns(&cfg, dims, &r, &v, &m, &mut a, &mut ret).unwrap();
    b.extend(bits(&a));
    b.extend(bits(&ret));
    Print(b, String::new())
}

fn dpo<F: Real>() -> Print {
    let n = 2 * B;
    let (pc, pr, rc, rr) = (
        data::<F>(26, n, -50.0, -1.0),
        data::<F>(27, n, -50.0, -1.0),
        data::<F>(28, n, -50.0, -1.0),
        data::<F>(29, n, -50.0, -1.0),
    );
    let cfg = PairedConfig::preset(Preset::Trl, 0.1).unwrap();
    let terms = [
        LossTerm::new(PairedLoss::Sigmoid),
        LossTerm::weighted(PairedLoss::AotUnpaired, 0.5),
    ];
    let batch = PairBatch::new(&pc, &pr).with_reference(&rc, &rr);
    let (mut gc, mut gr) = (vec![F::zero(); n], vec![F::zero(); n]);
    let mut per = vec![F::zero(); n];
    let mut order = vec![0usize; 2 * n];
    let out = paired_loss(
        &cfg,
        &terms,
        &batch,
        Some(&mut per),
        Some(PairGrads::of_mean(F::one(), &mut gc, &mut gr)),
        &mut order,
    )
    .unwrap();
    let mut b = bits(&per);
    b.extend(bits(&gc));
    b.extend(bits(&gr));
    Print(b, format!("{out:?}"))
}

fn kto<F: Real>() -> Print {
    let n = 4 * B;
    let lr = data::<F>(30, n, -2.0, 2.0);
    let labels = mask(31, n);
    let cfg = KtoConfig::new(KtoLossType::Kto, 0.1, 1.0, 1.33).unwrap();
    let mut g = vec![F::zero(); n];
    let l = kto_loss(&cfg, &lr, &labels, F::of(0.05), Some(&mut g)).unwrap();
    let mut b = vec![l.to_f64().to_bits()];
    b.extend(bits(&g));
    Print(b, String::new())
}

fn orpo<F: Real>() -> Print {
    let n = 2 * B;
    let (c, r) = (data::<F>(32, n, -3.0, -0.01), data::<F>(33, n, -3.0, -0.01));
    let cot = data::<F>(34, n, -1.0, 1.0);
    let (mut l, mut cr, mut rr) = (vec![F::zero(); n], vec![F::zero(); n], vec![F::zero(); n]);
    let (mut dc, mut dr) = (vec![F::zero(); n], vec![F::zero(); n]);
    let cots = OrpoCotangents {
        losses: &cot,
        log_odds_ratio: F::of(0.3),
        log_odds_chosen: F::of(-0.2),
    };
    let m = odds_ratio_loss(
        0.1,
        &c,
        &r,
        &mut l,
        &mut cr,
        &mut rr,
        Some((cots, &mut dc, &mut dr)),
    )
    .unwrap();
    let mut b = bits(&l);
    b.extend(bits(&dc));
    b.extend(bits(&dr));
    Print(b, format!("{m:?}"))
}

fn log_softmax_entropy<F: Real>() -> Print {
    let rows = B * T;
    let z = data::<F>(35, rows * V, -8.0, 8.0);
    let ids: Vec<i64> = (0..rows as i64).map(|i| (i * 13) % V as i64).collect();
    let cot = data::<F>(36, rows, -1.0, 1.0);
    let (mut lp, mut g) = (vec![F::zero(); rows], vec![F::zero(); rows * V]);
    let t = Temperature::new(0.7).unwrap();
    gather_log_softmax(&z, rows, V, t, 1, &ids, &mut lp, Some((&cot, &mut g))).unwrap();
    let (mut h, mut gh) = (vec![F::zero(); rows], vec![F::zero(); rows * V]);
    entropy_from_logits(&z, rows, V, &mut h, Some((&cot, &mut gh))).unwrap();
    let mut b = bits(&lp);
    b.extend(bits(&g));
    b.extend(bits(&h));
    b.extend(bits(&gh));
    Print(b, String::new())
}

fn distillation<F: Real>() -> Print {
    let dims = Dims::new(B, T);
    let n = dims.len() * V;
    let (s, t) = (data::<F>(37, n, -6.0, 6.0), data::<F>(38, n, -6.0, 6.0));
    let valid = mask(39, dims.len());
    let cfg = DistillConfig::new(0.5, 2.0, Reduction::BatchMean, None).unwrap();
    let mut g = vec![F::zero(); n];
    let l = generalized_jsd_loss(
        &cfg,
        dims,
        V,
        &s,
        &t,
        Some(&valid),
        Some((F::one(), &mut g)),
    )
    .unwrap();
    let mut b = vec![l.to_f64().to_bits()];
    b.extend(bits(&g));
    Print(b, String::new())
}

fn rollout<F: Real>() -> Print {
    let dims = Dims::new(B, T);
    let n = dims.len();
    let lr = data::<F>(40, n, -1.0, 1.0);
    let m = mask(41, n);
    let mut b = Vec::new();
    let mut dbg = String::new();
    for level in [IsLevel::Token, IsLevel::Sequence] {
        let cfg = IsConfig::new(level, IsThreshold::band(0.5, 2.0).unwrap(), false).unwrap();
        let mut w = vec![F::zero(); n];
        let metrics = rollout_correction_weights(&cfg, dims, &lr, &m, &mut w).unwrap();
        b.extend(bits(&w));
        dbg += &format!("{metrics:?}");
    }
    Print(b, dbg)
}

fn ops<F: Real>() -> Vec<Op> {
    vec![
        ("policy token loss (clipped_policy_loss)", policy::<F>),
        ("GRPO loss (grpo_loss, DAPO)", grpo::<F>),
        ("value loss", value::<F>),
        ("KL estimators k1/k2/k3", kl::<F>),
        ("aggregation (every mode)", aggregation::<F>),
        ("stats / whitening", whitening::<F>),
        ("advantages (group z-score, GAE)", advantages::<F>),
        ("DPO (sigmoid + aot_unpaired)", dpo::<F>),
        ("KTO", kto::<F>),
        ("ORPO", orpo::<F>),
        ("log-softmax / entropy", log_softmax_entropy::<F>),
        ("distillation (generalized JSD)", distillation::<F>),
        ("rollout correction weights", rollout::<F>),
    ]
}

/// Runs every op `reps` times on each of `threads` threads and checks every
/// print against the reference.
fn check_all(ops: &[Op], threads: usize, reps: usize) {
    let reference: Vec<Print> = ops.iter().map(|(_, f)| f()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    (0..reps)
                        .map(|_| ops.iter().map(|(_, f)| f()).collect::<Vec<_>>())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for run in h.join().unwrap() {
                for ((name, _), (got, want)) in ops.iter().zip(run.iter().zip(&reference)) {
                    assert!(
                        got == want,
                        "{name}: not bitwise deterministic across runs / threads"
                    );
                }
            }
        }
    });
}

#[test]
fn every_family_is_bitwise_deterministic_f64() {
    let ops = ops::<f64>();
    for threads in [1, 2, 8] {
        check_all(&ops, threads, 2);
    }
}

#[test]
fn every_family_is_bitwise_deterministic_f32() {
    let ops = ops::<f32>();
    for threads in [1, 2, 8] {
        check_all(&ops, threads, 2);
    }
}

/// The burn backends: every op a burn backend implements, on a synthesised
/// small-scale case (the cross-backend report's generator), gives
/// bitwise-identical values and gradients across repeated runs and when run
/// concurrently from 1, 2 and 8 threads. burn-ndarray is built without its
/// `multi-threads` (rayon) feature, so this also covers "across thread
/// counts": the only threads are the callers'.
#[cfg(feature = "burn")]
mod burn_backends {
    use posttrain_conformance::case::Outputs;
    use posttrain_conformance::report::{
        run_on, synth, variants, with_cotangents, RunOutcome, Scale,
    };
    use posttrain_conformance::vector::{collect_files, Case, VectorFile};
    use posttrain_conformance::Backend;
    use std::collections::BTreeMap;
    use std::path::Path;

    /// Every value and gradient as raw bits, by name.
    fn fingerprint(o: &Outputs) -> Vec<(String, Vec<u64>)> {
        o.values
            .iter()
            .chain(o.grads.iter())
            .map(|(k, v)| (k.clone(), v.iter().map(|x| x.to_bits()).collect()))
            .collect()
    }

    /// One synthesised case (with its VJP) per op, the first variant.
    fn cases() -> Vec<(String, Case)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors");
        let mut out = Vec::new();
        for p in collect_files(&[dir]).expect("vectors") {
            if p.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with("edge."))
            {
                continue;
            }
            let file = VectorFile::load(&p).expect("file");
            let Some(template) = variants(&file).into_iter().next() else {
                continue;
            };
            let Ok(case) = synth(&file.op, template, Scale::Small, 11) else {
                continue;
            };
            let RunOutcome::Done(o) = run_on(Backend::CoreF64, &file.op, &case) else {
                continue;
            };
            let lens: BTreeMap<String, usize> =
                o.values.iter().map(|(k, v)| (k.clone(), v.len())).collect();
            out.push((file.op.clone(), with_cotangents(case, template, &lens, 11)));
        }
        out
    }

    fn check(backend: Backend) {
        let cases = cases();
        assert!(cases.len() >= 100, "only {} ops synthesised", cases.len());
        // The reference run of every op this backend implements.
        let reference: Vec<(usize, Vec<(String, Vec<u64>)>)> = cases
            .iter()
            .enumerate()
            .filter_map(|(i, (op, c))| match run_on(backend, op, c) {
                RunOutcome::Done(o) => Some((i, fingerprint(&o))),
                _ => None,
            })
            .collect();
        assert!(!reference.is_empty(), "no op ran on {}", backend.name());
        let mut not_bitwise = BTreeMap::<String, f64>::new();
        for threads in [1, 2, 8] {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        s.spawn(|| {
                            reference
                                .iter()
                                .map(|(i, _)| {
                                    let (op, c) = &cases[*i];
                                    match run_on(backend, op, c) {
                                        RunOutcome::Done(o) => fingerprint(&o),
                                        other => panic!("{op}: second run {other:?}"),
                                    }
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                for h in handles {
                    let got = h.join().expect("thread");
                    for ((i, want), got) in reference.iter().zip(got) {
                        if *want == got {
                            continue;
                        }
                        let op = &cases[*i].0;
                        // wgpu schedules its reductions on the device (cubecl
                        // may combine partial sums in any order, and kernels
                        // submitted from several threads interleave): bitwise
                        // identity is not promised there. The spread must stay
                        // at f32 rounding; it is printed (and the report's
                        // repeatability column records it).
                        let spread = spread(want, &got);
                        assert!(
                            backend.name() == "burn-wgpu" && spread <= 1e-5,
                            "{op} on {}: not bitwise deterministic with {threads} threads \
                             (max rel spread {spread:e})",
                            backend.name()
                        );
                        eprintln!(
                            "{}: {op} not bitwise identical with {threads} threads; \
                             max rel spread {spread:e} (≤ 1e-5)",
                            backend.name()
                        );
                        let worst = not_bitwise.entry(op.clone()).or_default();
                        *worst = worst.max(spread);
                    }
                }
            });
        }
        eprintln!(
            "{}: {} of {} ops bitwise deterministic across runs and 1/2/8 threads{}",
            backend.name(),
            reference.len() - not_bitwise.len(),
            reference.len(),
            if not_bitwise.is_empty() {
                String::new()
            } else {
                format!("; within f32 rounding: {not_bitwise:?}")
            }
        );
    }

    /// The largest relative difference between two fingerprints' values.
    fn spread(a: &[(String, Vec<u64>)], b: &[(String, Vec<u64>)]) -> f64 {
        let mut worst = 0.0f64;
        assert_eq!(a.len(), b.len(), "different outputs");
        for ((na, xa), (nb, xb)) in a.iter().zip(b) {
            assert_eq!((na, xa.len()), (nb, xb.len()), "different outputs");
            for (&x, &y) in xa.iter().zip(xb) {
                let (x, y) = (f64::from_bits(x), f64::from_bits(y));
                let d = if x == y || (x.is_nan() && y.is_nan()) {
                    0.0
                } else {
                    (x - y).abs() / x.abs().max(1e-3)
                };
                worst = worst.max(if d.is_nan() { f64::INFINITY } else { d });
            }
        }
        worst
    }

    #[test]
    fn every_op_on_every_burn_backend_is_bitwise_deterministic() {
        for &b in Backend::ALL {
            if b.burn_kind().is_some() {
                check(b);
            }
        }
    }
}
