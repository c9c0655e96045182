//! posttrain-burn's logits ops (top-k log-probabilities, Σπ², sequence
//! log-probabilities, the entropy loss) against the core's f64 slice drivers
//! on seeded random inputs; masked NaN changes nothing; typed errors.

use burn::tensor::{Int, Tensor, TensorData};
use posttrain_burn::logits::{
    entropy_loss, gather_log_softmax, sequence_log_probs, sum_pi_squared,
};
use posttrain_burn::{device, mask2, tensor1, tensor2, tensor3, to_vec};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::logits::{self as core, SequenceLogProbConfig, Temperature};
use posttrain_core::{Dims, Error};

/// xorshift64*: deterministic, dependency-free (as `tests/ops.rs`).
struct Rng(u64);
#[allow(dead_code)]
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
    fn bools(&mut self, n: usize, p: f64) -> Vec<bool> {
        (0..n).map(|_| self.unit() < p).collect()
    }
    fn ints(&mut self, n: usize, hi: i64) -> Vec<i64> {
        (0..n)
            .map(|_| (self.next_u64() % hi as u64) as i64)
            .collect()
    }
}

/// `got ≈ want` at ~1e-5 relative (f32 tensors against the f64 core).
fn close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            assert!(g.is_nan(), "{what}[{i}]: got {g}, want NaN");
            continue;
        }
        let tol = 2e-5 * (1.0 + w.abs());
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w}");
    }
}

#[test]
fn top_k_and_sum_pi_squared_match_the_core() {
    let dev = device().unwrap();
    let mut rng = Rng::new(31);
    let (b, s, v, k) = (2, 3, 7, 3);
    let z = rng.vec(b * s * v, -4.0, 4.0);
    let ids = rng.ints(b * s * k, v as i64);
    let cot = rng.vec(b * s * k, -1.0, 1.0);
    for t in [1.0, 0.7] {
        let idt = Tensor::<3, Int>::from_data(TensorData::new(ids.clone(), [b, s, k]), &dev);
        let (lp, g) = gather_log_softmax(
            tensor3(&z, [b, s, v], &dev).unwrap(),
            idt,
            Temperature::new(t).unwrap(),
            Some(tensor3(&cot, [b, s, k], &dev).unwrap()),
        )
        .unwrap();
        let mut out = vec![0.0; b * s * k];
        let mut gw = vec![0.0; z.len()];
        core::gather_log_softmax(
            &z,
            b * s,
            v,
            Temperature::new(t).unwrap(),
            k,
            &ids,
            &mut out,
            Some((&cot, &mut gw)),
        )
        .unwrap();
        close("top-k", &to_vec(lp), &out);
        close("top-k grad", &to_vec(g.unwrap()), &gw);
    }
    let c2 = rng.vec(b * s, -1.0, 1.0);
    let (p2, g) = sum_pi_squared(
        tensor3(&z, [b, s, v], &dev).unwrap(),
        Some(tensor2(&c2, [b, s], &dev).unwrap()),
    )
    .unwrap();
    let mut out = vec![0.0; b * s];
    let mut gw = vec![0.0; z.len()];
    core::sum_pi_squared(&z, b * s, v, &mut out, Some((&c2, &mut gw))).unwrap();
    close("sum pi^2", &to_vec(p2), &out);
    close("sum pi^2 grad", &to_vec(g.unwrap()), &gw);
}

#[test]
fn sequence_log_probs_and_entropy_loss_match_the_core() {
    let dev = device().unwrap();
    let mut rng = Rng::new(32);
    let (b, s, v) = (3, 5, 6);
    let d = Dims::new(b, s);
    let z = rng.vec(b * s * v, -3.0, 3.0);
    let mut labels = rng.ints(b * s, v as i64);
    for (i, l) in labels.iter_mut().enumerate() {
        if i % 3 == 1 || i >= 2 * s {
            *l = -100;
        }
    }
    let cot = rng.vec(b, -1.0, 1.0);
    for average in [false, true] {
        let cfg = SequenceLogProbConfig::torchtune(average);
        let lt = Tensor::<2, Int>::from_data(TensorData::new(labels.clone(), [b, s]), &dev);
        let (lp, g) = sequence_log_probs(
            &cfg,
            tensor3(&z, [b, s, v], &dev).unwrap(),
            lt,
            Some(tensor1(&cot, &dev)),
        )
        .unwrap();
        let mut out = vec![0.0; b];
        let mut gw = vec![0.0; z.len()];
        core::sequence_log_probs(&cfg, d, v, &z, &labels, &mut out, Some((&cot, &mut gw))).unwrap();
        close("seq logp", &to_vec(lp), &out);
        close("seq logp grad", &to_vec(g.unwrap()), &gw);
    }
    let mask: Vec<bool> = (0..b * s).map(|i| i % 4 != 3 && i < 2 * s).collect();
    for mode in [
        AggMode::TokenMean,
        AggMode::TokenSum,
        AggMode::SeqMeanTokenSum,
        AggMode::SeqMeanTokenMean,
        AggMode::SeqMeanTokenSumNorm,
    ] {
        let norm = GlobalNorm::default();
        let (l, g) = entropy_loss(
            mode,
            &norm,
            tensor3(&z, [b, s, v], &dev).unwrap(),
            &mask2(&mask, [b, s], &dev).unwrap(),
            Some(0.8),
        )
        .unwrap();
        let mut scratch = vec![0.0; b * s];
        let mut gw = vec![0.0; z.len()];
        let want = core::entropy_loss(
            mode,
            &norm,
            d,
            v,
            &z,
            &mask,
            &mut scratch,
            Some((0.8, &mut gw)),
        )
        .unwrap();
        close("entropy loss", &to_vec(l), &[want]);
        close("entropy loss grad", &to_vec(g.unwrap()), &gw);
    }
}

#[test]
fn masked_nan_changes_nothing() {
    let dev = device().unwrap();
    let mut rng = Rng::new(33);
    let (b, s, v) = (2, 4, 5);
    let z = rng.vec(b * s * v, -3.0, 3.0);
    let mask = vec![true, true, false, true, true, false, false, false];
    let mut poisoned = z.clone();
    for (r, &m) in mask.iter().enumerate() {
        if !m {
            poisoned[r * v..(r + 1) * v]
                .iter_mut()
                .for_each(|x| *x = f64::NAN);
        }
    }
    let run = |z: &[f64]| {
        let (l, g) = entropy_loss(
            AggMode::TokenMean,
            &GlobalNorm::default(),
            tensor3(z, [b, s, v], &dev).unwrap(),
            &mask2(&mask, [b, s], &dev).unwrap(),
            Some(1.0),
        )
        .unwrap();
        (to_vec(l), to_vec(g.unwrap()))
    };
    let (a, p) = (run(&z), run(&poisoned));
    assert!(p.0.iter().chain(&p.1).all(|x| x.is_finite()));
    close("loss", &p.0, &a.0);
    close("grad", &p.1, &a.1);
}

#[test]
fn bad_input_is_a_typed_error() {
    let dev = device().unwrap();
    let z = tensor3(&[0.0; 12], [1, 3, 4], &dev).unwrap();
    let ids = Tensor::<3, Int>::from_data(TensorData::new(vec![0i64, 4, 1], [1, 3, 1]), &dev);
    assert!(matches!(
        gather_log_softmax(z.clone(), ids, Temperature::ONE, None),
        Err(Error::Invalid { .. })
    ));
    let lt = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 1], [1, 2]), &dev);
    assert!(matches!(
        sequence_log_probs(
            &SequenceLogProbConfig::torchtune(false),
            z.clone(),
            lt,
            None
        ),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        sum_pi_squared(z, Some(tensor2(&[1.0; 2], [1, 2], &dev).unwrap())),
        Err(Error::ShapeMismatch { .. })
    ));
}
