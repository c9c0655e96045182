//! Every tensor op against the core's f64 slice driver on seeded random
//! inputs; masked NaN changes nothing; typed errors. The backend is the one
//! `posttrain_burn::device()` picks (cargo feature / `POSTTRAIN_BACKEND`).

use burn::tensor::{Int, Tensor, TensorData};
use posttrain_burn::aggregate::aggregate;
use posttrain_burn::kl::{kl_estimate, kl_loss};
use posttrain_burn::logits::{entropy_from_logits, selective_log_softmax};
use posttrain_burn::policy::policy_loss;
use posttrain_burn::preference::{paired_loss, PairTensors};
use posttrain_burn::{
    device, mask2, tensor1, tensor2, tensor3, to_vec, BackendKind, Device, DeviceError,
};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::kl::{KlConfig, KlEstimator};
use posttrain_core::logits::Temperature;
use posttrain_core::policy::token::{
    policy_loss_alloc, PolicyBatch, PolicyLoss, PolicyLossMode, VerlPolicyParams,
};
use posttrain_core::preference::paired::{
    self as core_paired, FDivergence, LossTerm, PairBatch, PairGrads, PairedConfig, PairedLoss,
};
use posttrain_core::{Dims, Error, Preset};

// ---------------------------------------------------------------------------
// helpers
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
    /// Uniform in `[lo, hi)`, rounded to f32 (so the f64 reference sees the
    /// tensor's exact inputs).
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        (lo + (hi - lo) * self.unit()) as f32 as f64
    }
    fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    /// A mask with about `p` valid, row 0 always fully valid, the last row
    /// fully masked when there are ≥ 3 rows.
    fn mask(&mut self, d: Dims, p: f64) -> Vec<bool> {
        let mut m: Vec<bool> = (0..d.len()).map(|_| self.unit() < p).collect();
        for j in 0..d.seq {
            m[j] = true;
            if d.batch >= 3 {
                m[(d.batch - 1) * d.seq + j] = false;
            }
        }
        m
    }
}

fn dev() -> Device {
    device().expect("a backend is compiled in")
}

fn t2(v: &[f64], d: Dims) -> Tensor<2> {
    tensor2(v, [d.batch, d.seq], &dev()).unwrap()
}

fn m2(v: &[bool], d: Dims) -> Tensor<2, burn::tensor::Bool> {
    mask2(v, [d.batch, d.seq], &dev()).unwrap()
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

/// Puts NaN / ±inf at every masked position of `v`.
fn poison(v: &[f64], mask: &[bool]) -> Vec<f64> {
    v.iter()
        .zip(mask)
        .enumerate()
        .map(|(i, (&x, &m))| {
            if m {
                x
            } else {
                [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][i % 3]
            }
        })
        .collect()
}

const SHAPES: [(usize, usize); 4] = [(1, 1), (2, 5), (4, 7), (5, 16)];

// ---------------------------------------------------------------------------
// KL
// ---------------------------------------------------------------------------

fn kl_configs() -> Vec<KlConfig> {
    let mut v = vec![];
    for est in [
        KlEstimator::K1,
        KlEstimator::Abs,
        KlEstimator::K2,
        KlEstimator::K3,
    ] {
        for p in [Preset::Trl, Preset::Verl, Preset::OpenRlhf] {
            for st in [false, true] {
                let mut c = KlConfig::preset(est, p);
                c.straight_through = st;
                v.push(c);
            }
        }
    }
    // A clamp that bites.
    let mut c = KlConfig::preset(KlEstimator::K3, Preset::Verl);
    c.log_ratio_clamp = Some(0.5);
    c.value_clamp = Some(0.3);
    v.push(c);
    v
}

#[test]
fn kl_estimate_matches_core() {
    let mut rng = Rng::new(1);
    for (b, s) in SHAPES {
        let d = Dims::new(b, s);
        for cfg in kl_configs() {
            let lp = rng.vec(d.len(), -3.0, 0.0);
            let rf = rng.vec(d.len(), -3.0, 0.0);
            let mask = rng.mask(d, 0.7);
            let out = kl_estimate(&cfg, t2(&lp, d), t2(&rf, d), &m2(&mask, d)).unwrap();
            let mut want = vec![0.0; d.len()];
            let mut grad = vec![0.0; d.len()];
            let ones = vec![1.0; d.len()];
            cfg.estimate_slices(&lp, &rf, &mut want, Some((&ones, &mut grad)))
                .unwrap();
            for i in 0..d.len() {
                if !mask[i] {
                    want[i] = 0.0;
                    grad[i] = 0.0;
                }
            }
            close("kl value", &to_vec(out.value), &want, TOL);
            close("kl grad", &to_vec(out.grad), &grad, TOL);
        }
    }
}

#[test]
fn kl_loss_matches_core_aggregate() {
    let mut rng = Rng::new(2);
    for (b, s) in SHAPES {
        let d = Dims::new(b, s);
        for mode in AggMode::ALL {
            let cfg = KlConfig::parse_verl("low_var_kl").unwrap();
            let lp = rng.vec(d.len(), -3.0, 0.0);
            let rf = rng.vec(d.len(), -3.0, 0.0);
            let mask = rng.mask(d, 0.6);
            let norm = GlobalNorm::default();
            let out = kl_loss(&cfg, mode, &norm, t2(&lp, d), t2(&rf, d), &m2(&mask, d)).unwrap();
            let mut kl = vec![0.0; d.len()];
            let mut g = vec![0.0; d.len()];
            cfg.estimate_slices(&lp, &rf, &mut kl, Some((&vec![1.0; d.len()], &mut g)))
                .unwrap();
            let mut w = vec![0.0; d.len()];
            let want =
                posttrain_core::aggregate::aggregate(mode, &norm, d, &kl, &mask, Some(&mut w))
                    .unwrap();
            let want_grad: Vec<f64> = (0..d.len())
                .map(|i| if mask[i] { w[i] * g[i] } else { 0.0 })
                .collect();
            close("kl loss", &to_vec(out.value), &[want], TOL);
            close("kl loss grad", &to_vec(out.grad), &want_grad, TOL);
        }
    }
}

// ---------------------------------------------------------------------------
// aggregation
// ---------------------------------------------------------------------------

fn norms() -> Vec<GlobalNorm> {
    vec![
        GlobalNorm::default(),
        GlobalNorm {
            dp_size: 4.0,
            batch_num_tokens: Some(37.0),
            global_batch_size: Some(6.0),
            loss_scale_factor: Some(11.0),
        },
        GlobalNorm {
            dp_size: 2.0,
            ..GlobalNorm::default()
        },
    ]
}

#[test]
fn aggregate_matches_core() {
    let mut rng = Rng::new(3);
    for (b, s) in SHAPES {
        let d = Dims::new(b, s);
        for mode in AggMode::ALL {
            for norm in norms() {
                let loss = rng.vec(d.len(), -2.0, 2.0);
                let mask = rng.mask(d, 0.5);
                let out =
                    aggregate(mode, &norm, t2(&poison(&loss, &mask), d), &m2(&mask, d)).unwrap();
                let mut w = vec![0.0; d.len()];
                let want = posttrain_core::aggregate::aggregate(
                    mode,
                    &norm,
                    d,
                    &loss,
                    &mask,
                    Some(&mut w),
                )
                .unwrap();
                close("agg value", &to_vec(out.value), &[want], TOL);
                close("agg weights", &to_vec(out.weights), &w, TOL);
            }
        }
    }
}

#[test]
fn aggregate_all_masked_is_zero() {
    let d = Dims::new(2, 3);
    let loss = vec![f64::NAN; 6];
    let mask = vec![false; 6];
    for mode in AggMode::ALL {
        let out = aggregate(mode, &GlobalNorm::default(), t2(&loss, d), &m2(&mask, d)).unwrap();
        assert_eq!(to_vec(out.value), vec![0.0]);
        assert_eq!(to_vec(out.weights), vec![0.0; 6]);
    }
}

// ---------------------------------------------------------------------------
// policy
// ---------------------------------------------------------------------------

fn policy_losses() -> Vec<(&'static str, PolicyLoss)> {
    let p = VerlPolicyParams {
        clip_ratio_low: Some(0.2),
        clip_ratio_high: Some(0.28),
        dro_beta: Some(0.3),
        ..VerlPolicyParams::default()
    };
    let mut v: Vec<(&'static str, PolicyLoss)> = [
        PolicyLossMode::Vanilla,
        PolicyLossMode::DppoTv,
        PolicyLossMode::DppoKl,
        PolicyLossMode::Gspo,
        PolicyLossMode::Sapo,
        PolicyLossMode::Gpg,
        PolicyLossMode::Dro,
        PolicyLossMode::Cispo,
    ]
    .into_iter()
    .map(|m| (m.name(), PolicyLoss::from_verl(m, &p).unwrap()))
    .collect();
    // Torchtune-style PPO: no clamp, no dual clip.
    v.push((
        "ppo-plain",
        PolicyLoss::Ppo(posttrain_core::policy::ClipConfig::preset(
            Preset::Torchtune,
            0.2,
            0.2,
        )),
    ));
    v
}

#[test]
fn policy_loss_matches_core() {
    let mut rng = Rng::new(4);
    for (b, s) in SHAPES {
        let d = Dims::new(b, s);
        for (name, loss) in policy_losses() {
            for agg in AggMode::ALL {
                for with_is in [false, true] {
                    let lp = rng.vec(d.len(), -3.0, -0.05);
                    // old = lp + noise so that ratios straddle the clip range
                    let old: Vec<f64> = lp
                        .iter()
                        .map(|&x| (x + rng.uniform(-0.5, 0.5)) as f32 as f64)
                        .collect();
                    let adv = rng.vec(d.len(), -2.0, 2.0);
                    let isw = rng.vec(d.len(), 0.5, 1.5);
                    let mask = rng.mask(d, 0.7);
                    let norm = GlobalNorm::default();
                    let out = policy_loss(
                        &loss,
                        agg,
                        &norm,
                        t2(&lp, d),
                        t2(&old, d),
                        t2(&adv, d),
                        &m2(&mask, d),
                        with_is.then(|| t2(&isw, d)),
                    )
                    .unwrap();
                    let batch = PolicyBatch {
                        dims: d,
                        log_prob: &lp,
                        old_log_prob: &old,
                        advantages: &adv,
                        mask: &mask,
                        is_weights: with_is.then_some(&isw[..]),
                    };
                    let (want, g) =
                        policy_loss_alloc(&loss, agg, &norm, &batch, Some(1.0)).unwrap();
                    let ctx = format!("{name} {agg:?} is={with_is} {b}x{s}");
                    close(&format!("{ctx} loss"), &to_vec(out.loss), &[want.loss], TOL);
                    close(&format!("{ctx} grad"), &to_vec(out.grad), &g.unwrap(), TOL);
                    close(
                        &format!("{ctx} clipfrac"),
                        &to_vec(out.clipfrac),
                        &[want.clipfrac],
                        TOL,
                    );
                    close(
                        &format!("{ctx} clipfrac_lower"),
                        &to_vec(out.clipfrac_lower),
                        &[want.clipfrac_lower],
                        TOL,
                    );
                    close(
                        &format!("{ctx} approx_kl"),
                        &to_vec(out.approx_kl),
                        &[want.approx_kl],
                        TOL,
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// logits
// ---------------------------------------------------------------------------

fn int2(v: &[i64], d: Dims) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [d.batch, d.seq]), &dev())
}

#[test]
fn selective_log_softmax_matches_core() {
    let mut rng = Rng::new(5);
    for (b, s) in SHAPES {
        for vocab in [1usize, 3, 17] {
            for temp in [1.0, 0.7] {
                let d = Dims::new(b, s);
                let rows = d.len();
                let z = rng.vec(rows * vocab, -8.0, 8.0);
                let ids: Vec<i64> = (0..rows)
                    .map(|_| (rng.next_u64() % vocab as u64) as i64)
                    .collect();
                let cot = rng.vec(rows, -1.0, 1.0);
                let (lp, g) = selective_log_softmax(
                    tensor3(&z, [b, s, vocab], &dev()).unwrap(),
                    int2(&ids, d),
                    Temperature::new(temp).unwrap(),
                    Some(t2(&cot, d)),
                )
                .unwrap();
                let mut want = vec![0.0; rows];
                let mut wg = vec![0.0; rows * vocab];
                posttrain_core::logits::gather_log_softmax(
                    &z,
                    rows,
                    vocab,
                    Temperature::new(temp).unwrap(),
                    1,
                    &ids,
                    &mut want,
                    Some((&cot, &mut wg)),
                )
                .unwrap();
                close("log p", &to_vec(lp), &want, TOL);
                close("log p vjp", &to_vec(g.unwrap()), &wg, TOL);
            }
        }
    }
}

#[test]
fn entropy_matches_core() {
    let mut rng = Rng::new(6);
    for (b, s) in SHAPES {
        for vocab in [1usize, 4, 33] {
            let d = Dims::new(b, s);
            let rows = d.len();
            let mut z = rng.vec(rows * vocab, -8.0, 8.0);
            if vocab > 1 {
                // extreme logits: one huge winner / a −1e30 loser
                z[0] = 1e30;
                let k = vocab.min(z.len() - 1);
                z[k] = -1e30;
            }
            let cot = rng.vec(rows, -1.0, 1.0);
            let (h, g) = entropy_from_logits(
                tensor3(&z, [b, s, vocab], &dev()).unwrap(),
                Some(t2(&cot, d)),
            )
            .unwrap();
            let mut want = vec![0.0; rows];
            let mut wg = vec![0.0; rows * vocab];
            posttrain_core::logits::entropy_from_logits(
                &z,
                rows,
                vocab,
                &mut want,
                Some((&cot, &mut wg)),
            )
            .unwrap();
            close("entropy", &to_vec(h), &want, TOL);
            close("entropy vjp", &to_vec(g.unwrap()), &wg, TOL);
        }
    }
}

#[test]
fn logits_errors_are_typed() {
    let d = Dims::new(1, 2);
    let z = tensor3(&[0.0; 6], [1, 2, 3], &dev()).unwrap();
    let r = selective_log_softmax(z.clone(), int2(&[0, 3], d), Temperature::ONE, None);
    assert!(matches!(r, Err(Error::Invalid { .. })));
    let r = selective_log_softmax(z.clone(), int2(&[0, -1], d), Temperature::ONE, None);
    assert!(matches!(r, Err(Error::Invalid { .. })));
    let r = selective_log_softmax(
        z.clone(),
        int2(&[0], Dims::new(1, 1)),
        Temperature::ONE,
        None,
    );
    assert!(matches!(r, Err(Error::ShapeMismatch { .. })));
    let r = entropy_from_logits(z, Some(t2(&[1.0], Dims::new(1, 1))));
    assert!(matches!(r, Err(Error::ShapeMismatch { .. })));
}

// ---------------------------------------------------------------------------
// preference
// ---------------------------------------------------------------------------

#[test]
fn paired_loss_matches_core() {
    let mut rng = Rng::new(7);
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
        FDivergence::ReverseKl,
        FDivergence::ForwardKl,
        FDivergence::JsDivergence,
        FDivergence::Alpha(0.5),
    ];
    for n in [1usize, 3, 8] {
        for &kind in &kinds {
            for div in divs {
                for extras in [false, true] {
                    let cfg = PairedConfig::new(0.3, 0.1, true, 0.2, div, 0.05).unwrap();
                    let terms = if extras {
                        vec![
                            LossTerm::weighted(kind, 0.7),
                            LossTerm::weighted(PairedLoss::Sigmoid, 0.3),
                        ]
                    } else {
                        vec![LossTerm::new(kind)]
                    };
                    let c = rng.vec(n, -30.0, -5.0);
                    let r = rng.vec(n, -30.0, -5.0);
                    // log-ratios within ±3 (an α-divergence score e^{(α−1)x} of a
                    // larger ratio overflows f32 in Discopop's e^{−βΔ})
                    let c0: Vec<f64> = c
                        .iter()
                        .map(|&x| (x + rng.uniform(-3.0, 3.0)) as f32 as f64)
                        .collect();
                    let r0: Vec<f64> = r
                        .iter()
                        .map(|&x| (x + rng.uniform(-3.0, 3.0)) as f32 as f64)
                        .collect();
                    let lc: Vec<f64> = (0..n).map(|_| (1 + rng.next_u64() % 20) as f64).collect();
                    let lr: Vec<f64> = (0..n).map(|_| (1 + rng.next_u64() % 20) as f64).collect();
                    let w = rng.vec(n, 0.5, 1.5);
                    let dv = dev();
                    let mut batch = PairTensors::new(tensor1(&c, &dv), tensor1(&r, &dv))
                        .with_reference(tensor1(&c0, &dv), tensor1(&r0, &dv))
                        .with_lengths(tensor1(&lc, &dv), tensor1(&lr, &dv));
                    let mut cb = PairBatch::new(&c, &r)
                        .with_reference(&c0, &r0)
                        .with_lengths(&lc, &lr);
                    if extras {
                        batch = batch.with_pair_weight(tensor1(&w, &dv));
                        cb = cb.with_pair_weight(&w);
                    }
                    let out = paired_loss(&cfg, &terms, batch).unwrap();
                    let (mut dc, mut dr) = (vec![0.0; n], vec![0.0; n]);
                    let mut per_pair = vec![0.0; n];
                    let want = core_paired::paired_loss(
                        &cfg,
                        &terms,
                        &cb,
                        Some(&mut per_pair),
                        Some(PairGrads::of_mean(1.0, &mut dc, &mut dr)),
                        &mut [],
                    )
                    .unwrap();
                    let ctx = format!("{kind:?} {div:?} extras={extras} n={n}");
                    close(&format!("{ctx} loss"), &to_vec(out.loss), &[want.loss], TOL);
                    close(
                        &format!("{ctx} per pair"),
                        &to_vec(out.per_pair),
                        &per_pair,
                        TOL,
                    );
                    close(
                        &format!("{ctx} d chosen"),
                        &to_vec(out.grad_chosen),
                        &dc,
                        TOL,
                    );
                    close(
                        &format!("{ctx} d rejected"),
                        &to_vec(out.grad_rejected),
                        &dr,
                        TOL,
                    );
                }
            }
        }
    }
}

#[test]
fn paired_loss_refuses_sft_without_inputs_and_empty_batches() {
    let dv = dev();
    let cfg = PairedConfig::preset(Preset::Trl, 0.1).unwrap();
    let b = PairTensors::new(tensor1(&[-1.0], &dv), tensor1(&[-2.0], &dv));
    let r = paired_loss(&cfg, &[LossTerm::new(PairedLoss::Sft)], b);
    assert!(matches!(r, Err(Error::Invalid { .. })), "{r:?}");
    let b = PairTensors::new(tensor1(&[], &dv), tensor1(&[], &dv));
    assert!(matches!(
        paired_loss(&cfg, &[LossTerm::new(PairedLoss::Sigmoid)], b),
        Err(Error::Empty { .. })
    ));
}

// ---------------------------------------------------------------------------
// masking and shapes
// ---------------------------------------------------------------------------

#[test]
fn masked_nan_changes_nothing() {
    let mut rng = Rng::new(8);
    let d = Dims::new(4, 6);
    let lp = rng.vec(d.len(), -3.0, -0.05);
    let old = rng.vec(d.len(), -3.0, -0.05);
    let adv = rng.vec(d.len(), -2.0, 2.0);
    let mask = rng.mask(d, 0.6);
    let (plp, pold, padv) = (poison(&lp, &mask), poison(&old, &mask), poison(&adv, &mask));
    for (name, loss) in policy_losses() {
        for agg in AggMode::ALL {
            let run = |a: &[f64], b: &[f64], c: &[f64]| {
                let o = policy_loss(
                    &loss,
                    agg,
                    &GlobalNorm::default(),
                    t2(a, d),
                    t2(b, d),
                    t2(c, d),
                    &m2(&mask, d),
                    None,
                )
                .unwrap();
                [
                    to_vec(o.loss),
                    to_vec(o.grad),
                    to_vec(o.clipfrac),
                    to_vec(o.approx_kl),
                    to_vec(o.per_token),
                ]
            };
            let clean = run(&lp, &old, &adv);
            let dirty = run(&plp, &pold, &padv);
            for (c, p) in clean.iter().zip(&dirty) {
                assert!(p.iter().all(|x| x.is_finite()), "{name} {agg:?}: {p:?}");
                assert_eq!(c, p, "{name} {agg:?}");
            }
        }
    }
    for cfg in kl_configs() {
        let a = kl_loss(
            &cfg,
            AggMode::SeqMeanTokenMean,
            &GlobalNorm::default(),
            t2(&lp, d),
            t2(&old, d),
            &m2(&mask, d),
        )
        .unwrap();
        let b = kl_loss(
            &cfg,
            AggMode::SeqMeanTokenMean,
            &GlobalNorm::default(),
            t2(&plp, d),
            t2(&pold, d),
            &m2(&mask, d),
        )
        .unwrap();
        assert_eq!(to_vec(a.value), to_vec(b.value));
        let bg = to_vec(b.grad);
        assert_eq!(to_vec(a.grad), bg);
        assert!(bg.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn shape_mismatch_is_a_typed_error() {
    let d = Dims::new(2, 3);
    let x = vec![0.0; 6];
    let y = vec![0.0; 6];
    let mask = vec![true; 6];
    let wrong = tensor2(&y, [3, 2], &dev()).unwrap();
    let r = kl_estimate(
        &KlConfig::new(KlEstimator::K1),
        t2(&x, d),
        wrong.clone(),
        &m2(&mask, d),
    );
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch {
            input: "ref_log_prob",
            ..
        })
    ));
    let r = aggregate(
        AggMode::TokenMean,
        &GlobalNorm::default(),
        wrong.clone(),
        &m2(&mask, d),
    );
    assert!(matches!(r, Err(Error::ShapeMismatch { .. })));
    let pl = PolicyLoss::from_verl(PolicyLossMode::Vanilla, &VerlPolicyParams::default()).unwrap();
    let r = policy_loss(
        &pl,
        AggMode::TokenMean,
        &GlobalNorm::default(),
        t2(&x, d),
        t2(&x, d),
        wrong,
        &m2(&mask, d),
        None,
    );
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch {
            input: "advantages",
            ..
        })
    ));
    let bad = GlobalNorm {
        dp_size: 0.0,
        ..GlobalNorm::default()
    };
    let r = aggregate(AggMode::TokenMean, &bad, t2(&x, d), &m2(&mask, d));
    assert!(matches!(r, Err(Error::OutOfRange { .. })));
    assert!(tensor2(&x, [4, 2], &dev()).is_err());
}

#[test]
fn backend_names_parse_to_typed_errors() {
    assert_eq!(
        "ndarray".parse::<BackendKind>().unwrap(),
        BackendKind::NdArray
    );
    assert_eq!("WGPU".parse::<BackendKind>().unwrap(), BackendKind::Wgpu);
    assert_eq!("tch".parse::<BackendKind>().unwrap(), BackendKind::Tch);
    assert!(matches!(
        "cuda-ish".parse::<BackendKind>(),
        Err(DeviceError::UnknownBackend(_))
    ));
    for k in BackendKind::ALL {
        if !k.is_compiled() {
            assert_eq!(
                posttrain_burn::device_for(k).unwrap_err(),
                DeviceError::NotCompiled(k)
            );
        } else {
            assert!(posttrain_burn::device_for(k).is_ok());
        }
    }
    assert!(!posttrain_burn::compiled_backends().is_empty());
}

/// Which backend this test run uses: printed (`--nocapture` / `--show-output`)
/// and asserted against the configuration — `POSTTRAIN_BACKEND` when set,
/// else the `test-*` feature — so a run meant for wgpu or tch cannot
/// silently test ndarray. The device must also compute (a read-back).
#[test]
fn backend_under_test() {
    let want = match std::env::var(posttrain_burn::BACKEND_ENV) {
        Ok(v) if !v.trim().is_empty() => v.parse::<BackendKind>().expect("POSTTRAIN_BACKEND"),
        _ => BackendKind::under_test().unwrap_or_else(|| posttrain_burn::compiled_backends()[0]),
    };
    let d = dev();
    println!(
        "posttrain-burn tests run on backend `{}` ({d:?}); test feature: {:?}",
        BackendKind::of(&d).map_or("?", BackendKind::name),
        BackendKind::under_test().map(BackendKind::name)
    );
    assert_eq!(BackendKind::of(&d), Some(want), "device {d:?}");
    assert_eq!(posttrain_burn::selected_backend().unwrap(), want);
    if let Some(t) = BackendKind::under_test() {
        assert!(t.is_compiled());
        if !matches!(std::env::var(posttrain_burn::BACKEND_ENV), Ok(v) if !v.trim().is_empty()) {
            assert_eq!(want, t, "the test-* feature picks the backend");
        }
    }
    let x = tensor2(&[1.5, -2.0, 0.25, 4.0], [2, 2], &d).unwrap();
    assert_eq!(to_vec(x.mul_scalar(2.0)), vec![3.0, -4.0, 0.5, 8.0]);
}

#[test]
fn tch_device_names_parse_to_typed_errors() {
    use posttrain_burn::TchDevice;
    assert_eq!("auto".parse::<TchDevice>().unwrap(), TchDevice::Auto);
    assert_eq!("CPU".parse::<TchDevice>().unwrap(), TchDevice::Cpu);
    assert_eq!("cuda".parse::<TchDevice>().unwrap(), TchDevice::Cuda(0));
    assert_eq!("cuda:3".parse::<TchDevice>().unwrap(), TchDevice::Cuda(3));
    for bad in ["cuda:", "cuda:x", "tpu"] {
        assert!(matches!(
            bad.parse::<TchDevice>(),
            Err(DeviceError::UnknownTchDevice(_))
        ));
    }
    let n = posttrain_burn::tch_cuda_count();
    match posttrain_burn::tch_device(TchDevice::Cuda(n)) {
        Err(DeviceError::NoCuda { index, available }) => {
            assert_eq!((index, available), (n, n));
        }
        Err(DeviceError::NotCompiled(BackendKind::Tch)) => {
            assert!(!BackendKind::Tch.is_compiled());
        }
        other => panic!("CUDA {n} of {n}: {other:?}"),
    }
    if BackendKind::Tch.is_compiled() {
        let cpu = posttrain_burn::tch_device(TchDevice::Cpu).unwrap();
        assert_eq!(BackendKind::of(&cpu), Some(BackendKind::Tch));
        assert!(format!("{cpu:?}").contains("Cpu"), "{cpu:?}");
    }
}
