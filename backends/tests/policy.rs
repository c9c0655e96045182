//! The cross-token policy losses (Clip-Cov, KL-Cov, GMPO) and OpenRLHF's
//! `PolicyLoss` on tensors against the core's f64 slice drivers: seeded
//! random inputs (rounded to f32), every output and gradient; masked NaN
//! changes nothing; typed errors.

use burn::tensor::{Bool, Tensor};
use posttrain_burn::{device, mask2, tensor2, Device};
use posttrain_core::Dims;

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
    /// Uniform in `[lo, hi)`, rounded to f32 (the f64 reference sees the
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

fn m2(v: &[bool], d: Dims) -> Tensor<2, Bool> {
    mask2(v, [d.batch, d.seq], &dev()).unwrap()
}

/// `|got − want| ≤ tol·(1 + |want|)` element-wise (NaN matches NaN).
#[track_caller]
fn close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= tol * (1.0 + w.abs()) || (g.is_nan() && w.is_nan()) || g == w;
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

use posttrain_burn::policy::{clipped_policy_loss, policy_loss, select_top};
use posttrain_burn::{to_vec, to_vec_bool};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::policy::ppo::{
    clipped_policy_loss as core_clipped, ClippedPolicyLoss, RatioLevel, RolloutIsCorrection,
    RolloutIsKind,
};
use posttrain_core::policy::token::{
    policy_loss_alloc, PolicyBatch, PolicyLoss, PolicyLossMode, VerlPolicyParams,
};
use posttrain_core::Error;

fn cross_token_losses() -> Vec<(&'static str, PolicyLoss)> {
    let base = VerlPolicyParams {
        clip_ratio_low: Some(0.2),
        clip_ratio_high: Some(0.28),
        ..VerlPolicyParams::default()
    };
    let wide = VerlPolicyParams {
        // Many candidates, k < candidates: the top-k selection matters.
        clip_cov_ratio: 0.2,
        clip_cov_lb: -0.3,
        clip_cov_ub: 2.0,
        kl_cov_ratio: 0.3,
        ppo_kl_coef: 0.5,
        ..base
    };
    vec![
        (
            "clip_cov default",
            PolicyLoss::from_verl(PolicyLossMode::ClipCov, &base).unwrap(),
        ),
        (
            "clip_cov wide",
            PolicyLoss::from_verl(PolicyLossMode::ClipCov, &wide).unwrap(),
        ),
        (
            "kl_cov default",
            PolicyLoss::from_verl(PolicyLossMode::KlCov, &base).unwrap(),
        ),
        (
            "kl_cov wide",
            PolicyLoss::from_verl(PolicyLossMode::KlCov, &wide).unwrap(),
        ),
        (
            "geo_mean",
            PolicyLoss::from_verl(PolicyLossMode::GeoMean, &base).unwrap(),
        ),
    ]
}

#[test]
fn cross_token_policy_losses_match_core() {
    let mut rng = Rng::new(21);
    for (b, s) in SHAPES {
        let d = Dims::new(b, s);
        for (name, loss) in cross_token_losses() {
            for agg in [AggMode::TokenMean, AggMode::SeqMeanTokenMean] {
                for with_is in [false, true] {
                    let lp = rng.vec(d.len(), -3.0, -0.05);
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
                        t2(&poison(&lp, &mask), d),
                        t2(&poison(&old, &mask), d),
                        t2(&poison(&adv, &mask), d),
                        &m2(&mask, d),
                        with_is.then(|| t2(&poison(&isw, &mask), d)),
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
                    close(
                        &format!("{ctx} loss"),
                        &to_vec(out.loss.clone()),
                        &[want.loss],
                        TOL,
                    );
                    close(&format!("{ctx} grad"), &to_vec(out.grad), &g.unwrap(), TOL);
                    for (m, got, w) in [
                        ("clipfrac", out.clipfrac, want.clipfrac),
                        ("clipfrac_lower", out.clipfrac_lower, want.clipfrac_lower),
                        ("approx_kl", out.approx_kl, want.approx_kl),
                    ] {
                        close(&format!("{ctx} {m}"), &to_vec(got), &[w], TOL);
                    }
                    // The per-token losses sum to the loss for token-sum weights
                    // (and are 0 on padding).
                    let pt = to_vec(out.per_token);
                    assert!(pt.iter().zip(&mask).all(|(&p, &m)| m || p == 0.0), "{ctx}");
                }
            }
        }
    }
}

#[test]
fn select_top_picks_largest_then_lowest_index() {
    let d = Dims::new(2, 4);
    let key = [0.5, 3.0, 1.0, 3.0, 1.0, 7.0, 1.0, -2.0];
    let cand = [true, true, true, true, true, false, true, true];
    // k = 4: the two 3.0s, then two of the three 1.0s, lowest flat index first.
    let got = to_vec_bool(select_top(m2(&cand, d), t2(&key, d), 4));
    assert_eq!(got, [false, true, true, true, true, false, false, false]);
    // k ≥ candidates: every candidate.
    let got = to_vec_bool(select_top(m2(&cand, d), t2(&key, d), 9));
    assert_eq!(got, cand);
    // k = 0: nothing.
    let got = to_vec_bool(select_top(m2(&cand, d), t2(&key, d), 0));
    assert!(got.iter().all(|&x| !x));
}

fn openrlhf_configs() -> Vec<(&'static str, ClippedPolicyLoss, bool)> {
    let mut v = vec![];
    for (ratio, rn) in [(RatioLevel::Token, "token"), (RatioLevel::Sequence, "seq")] {
        for tok in [true, false] {
            for (kind, kn) in [
                (None, "none"),
                (Some(RolloutIsKind::Truncate), "tis"),
                (Some(RolloutIsKind::TokenMask), "icepop"),
                (Some(RolloutIsKind::SequenceMask), "seq-mask-tis"),
            ] {
                let correction = kind.map(|kind| RolloutIsCorrection {
                    kind,
                    low: 0.8,
                    high: 1.3,
                });
                let cfg = ClippedPolicyLoss::openrlhf(0.2, 0.28, Some(3.0), ratio, tok, correction)
                    .unwrap();
                let name: &'static str = Box::leak(format!("{rn} tok={tok} {kn}").into_boxed_str());
                v.push((name, cfg, kind.is_some()));
            }
        }
    }
    v
}

#[test]
fn openrlhf_policy_loss_matches_core() {
    let mut rng = Rng::new(22);
    let norms = [
        GlobalNorm::default(),
        GlobalNorm {
            dp_size: 2.0,
            batch_num_tokens: Some(11.0),
            global_batch_size: Some(3.0),
            loss_scale_factor: None,
        },
    ];
    for (b, s) in SHAPES {
        let d = Dims::new(b, s);
        for (name, cfg, with_rollout) in openrlhf_configs() {
            for norm in norms {
                let lp = rng.vec(d.len(), -3.0, -0.05);
                let jitter = |rng: &mut Rng, v: &[f64], w: f64| -> Vec<f64> {
                    v.iter()
                        .map(|&x| (x + rng.uniform(-w, w)) as f32 as f64)
                        .collect()
                };
                let old = jitter(&mut rng, &lp, 0.4);
                let roll = jitter(&mut rng, &old, 0.3);
                let adv = rng.vec(d.len(), -2.0, 2.0);
                let mask = rng.mask(d, 0.7);
                let out = clipped_policy_loss(
                    &cfg,
                    &norm,
                    t2(&poison(&lp, &mask), d),
                    t2(&poison(&old, &mask), d),
                    t2(&poison(&adv, &mask), d),
                    &m2(&mask, d),
                    with_rollout.then(|| t2(&poison(&roll, &mask), d)),
                )
                .unwrap();
                let batch = PolicyBatch {
                    dims: d,
                    log_prob: &lp,
                    old_log_prob: &old,
                    advantages: &adv,
                    mask: &mask,
                    is_weights: None,
                };
                let mut scratch = vec![0.0; ClippedPolicyLoss::scratch_len(d)];
                let mut g = vec![0.0; d.len()];
                let want = core_clipped(
                    &cfg,
                    &norm,
                    &batch,
                    with_rollout.then_some(&roll[..]),
                    &mut scratch,
                    Some((1.0, &mut g)),
                )
                .unwrap();
                let ctx = format!("{name} {norm:?} {b}x{s}");
                close(&format!("{ctx} loss"), &to_vec(out.loss), &[want.loss], TOL);
                close(&format!("{ctx} grad"), &to_vec(out.grad), &g, TOL);
                close(
                    &format!("{ctx} clip_ratio"),
                    &to_vec(out.clip_ratio),
                    &[want.clip_ratio],
                    TOL,
                );
                close(
                    &format!("{ctx} approx_kl"),
                    &to_vec(out.approx_kl),
                    &[want.approx_kl],
                    TOL,
                );
                assert_eq!(out.rollout_kl.is_some(), want.rollout_kl.is_some(), "{ctx}");
                if let (Some(got), Some(w)) = (out.rollout_kl, want.rollout_kl) {
                    close(&format!("{ctx} rollout_kl"), &to_vec(got), &[w], TOL);
                }
            }
        }
    }
}

#[test]
fn policy_errors_are_typed() {
    let d = Dims::new(2, 3);
    let x = vec![-1.0; 6];
    let mask = vec![true; 6];
    let loss =
        PolicyLoss::from_verl(PolicyLossMode::ClipCov, &VerlPolicyParams::default()).unwrap();
    let r = policy_loss(
        &loss,
        AggMode::TokenMean,
        &GlobalNorm::default(),
        t2(&x, d),
        t2(&x, Dims::new(1, 6)),
        t2(&x, d),
        &m2(&mask, d),
        None,
    );
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch {
            input: "old_log_prob",
            ..
        })
    ));
    let cfg = ClippedPolicyLoss::openrlhf(
        0.2,
        0.2,
        None,
        RatioLevel::Token,
        true,
        Some(RolloutIsCorrection {
            kind: RolloutIsKind::Truncate,
            low: 0.5,
            high: 2.0,
        }),
    )
    .unwrap();
    let r = clipped_policy_loss(
        &cfg,
        &GlobalNorm::default(),
        t2(&x, d),
        t2(&x, d),
        t2(&x, d),
        &m2(&mask, d),
        None,
    );
    assert!(matches!(r, Err(Error::Invalid { .. })));
}
