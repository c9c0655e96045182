//! Value losses on tensors against the core's f64 slice drivers: seeded
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

use posttrain_burn::to_vec;
use posttrain_burn::value::{policy_value_loss, value_loss, PolicyValueTensors};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::value::{
    policy_value_loss as core_pv, value_loss as core_value, PolicyValueConfig, PolicyValueGrads,
    ValueLossConfig,
};
use posttrain_core::Error;

#[test]
fn value_loss_matches_core() {
    let mut rng = Rng::new(11);
    let norms = [
        GlobalNorm::default(),
        GlobalNorm {
            dp_size: 2.0,
            batch_num_tokens: Some(13.0),
            global_batch_size: Some(3.0),
            loss_scale_factor: Some(7.0),
        },
    ];
    for (b, s) in SHAPES {
        let d = Dims::new(b, s);
        for clip in [None, Some(0.2)] {
            for agg in AggMode::ALL {
                for norm in norms {
                    let v = rng.vec(d.len(), -1.0, 1.0);
                    let old = rng.vec(d.len(), -1.0, 1.0);
                    let ret = rng.vec(d.len(), -1.0, 1.0);
                    let mask = rng.mask(d, 0.7);
                    let cfg = ValueLossConfig::new(clip, agg).unwrap().with_norm(norm);
                    let out = value_loss(
                        &cfg,
                        t2(&poison(&v, &mask), d),
                        t2(&old, d),
                        t2(&poison(&ret, &mask), d),
                        &m2(&mask, d),
                    )
                    .unwrap();
                    let (mut pt, mut g) = (vec![0.0; d.len()], vec![0.0; d.len()]);
                    let want =
                        core_value(&cfg, d, &v, &old, &ret, &mask, &mut pt, Some(&mut g)).unwrap();
                    let ctx = format!("{clip:?} {agg:?} {norm:?} {b}x{s}");
                    close(&format!("{ctx} loss"), &to_vec(out.loss), &[want.loss], TOL);
                    close(&format!("{ctx} grad"), &to_vec(out.grad), &g, TOL);
                    close(
                        &format!("{ctx} per_token"),
                        &to_vec(out.per_token),
                        &pt,
                        TOL,
                    );
                    close(
                        &format!("{ctx} clipfrac"),
                        &to_vec(out.clipfrac),
                        &[want.clipfrac],
                        TOL,
                    );
                }
            }
        }
    }
}

#[test]
fn policy_value_loss_matches_core() {
    let mut rng = Rng::new(12);
    for (b, s) in SHAPES {
        let d = Dims::new(b, s);
        for masks in 0..4 {
            let lp = rng.vec(d.len(), -3.0, -0.05);
            let old: Vec<f64> = lp
                .iter()
                .map(|&x| (x + rng.uniform(-0.4, 0.4)) as f32 as f64)
                .collect();
            let adv = rng.vec(d.len(), -2.0, 2.0);
            let ov = rng.vec(d.len(), -1.0, 1.0);
            let v = rng.vec(d.len(), -1.0, 1.0);
            let ret = rng.vec(d.len(), -1.0, 1.0);
            let pm = rng.mask(d, 0.7);
            let vm = rng.mask(d, 0.6);
            let pm = (masks & 1 == 1).then_some(pm);
            let vm = (masks & 2 == 2).then_some(vm);
            let cfg = PolicyValueConfig::new(0.2, 0.3, 0.1).unwrap();
            let x = PolicyValueTensors {
                old_log_prob: t2(&old, d),
                log_prob: t2(&lp, d),
                advantages: t2(&adv, d),
                old_values: t2(&ov, d),
                values: t2(&v, d),
                returns: t2(&ret, d),
            };
            let (pmt, vmt) = (pm.as_ref().map(|m| m2(m, d)), vm.as_ref().map(|m| m2(m, d)));
            let out = policy_value_loss(&cfg, x, pmt.as_ref(), vmt.as_ref()).unwrap();
            let (mut gl, mut gv) = (vec![0.0; d.len()], vec![0.0; d.len()]);
            let want = core_pv(
                &cfg,
                d,
                &old,
                &lp,
                &adv,
                &ov,
                &v,
                &ret,
                pm.as_deref(),
                vm.as_deref(),
                Some(PolicyValueGrads {
                    log_prob: &mut gl,
                    value: &mut gv,
                }),
            )
            .unwrap();
            let ctx = format!("masks={masks} {b}x{s}");
            for (name, got, w) in [
                ("loss", out.loss, want.loss),
                ("policy_loss", out.policy_loss, want.policy_loss),
                ("value_loss", out.value_loss, want.value_loss),
                ("ratio_mean", out.ratio_mean, want.ratio_mean),
                ("clipfrac", out.clipfrac, want.clipfrac),
                ("approx_kl", out.approx_kl, want.approx_kl),
            ] {
                close(&format!("{ctx} {name}"), &to_vec(got), &[w], TOL);
            }
            close(
                &format!("{ctx} grad lp"),
                &to_vec(out.grad_log_prob),
                &gl,
                TOL,
            );
            close(&format!("{ctx} grad v"), &to_vec(out.grad_values), &gv, TOL);
        }
    }
}

#[test]
fn value_all_masked_is_zero() {
    let d = Dims::new(2, 3);
    let mask = vec![false; 6];
    let x = vec![f64::NAN; 6];
    let cfg = ValueLossConfig::new(Some(0.2), AggMode::SeqMeanTokenMean).unwrap();
    let out = value_loss(&cfg, t2(&x, d), t2(&x, d), t2(&x, d), &m2(&mask, d)).unwrap();
    assert_eq!(to_vec(out.loss), vec![0.0]);
    assert!(to_vec(out.grad).iter().all(|&g| g == 0.0));
}

#[test]
fn value_errors_are_typed() {
    let d = Dims::new(2, 3);
    let d2 = Dims::new(3, 2);
    let x = vec![0.0; 6];
    let mask = vec![true; 6];
    let cfg = ValueLossConfig::new(Some(0.2), AggMode::TokenMean).unwrap();
    let r = value_loss(&cfg, t2(&x, d2), t2(&x, d), t2(&x, d), &m2(&mask, d));
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch {
            input: "values",
            ..
        })
    ));
    let bad = ValueLossConfig {
        clip_range: Some(-1.0),
        ..cfg
    };
    let r = value_loss(&bad, t2(&x, d), t2(&x, d), t2(&x, d), &m2(&mask, d));
    assert!(matches!(r, Err(Error::OutOfRange { .. })));
    let pv = PolicyValueConfig::new(0.2, 0.2, 0.1).unwrap();
    let x2 = PolicyValueTensors {
        old_log_prob: t2(&x, d),
        log_prob: t2(&x, d),
        advantages: t2(&x, d2),
        old_values: t2(&x, d),
        values: t2(&x, d),
        returns: t2(&x, d),
    };
    let r = policy_value_loss(&pv, x2, None, None);
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch {
            input: "advantages",
            ..
        })
    ));
}
