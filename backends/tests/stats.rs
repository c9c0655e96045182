//! posttrain-burn's masked statistics against the core's f64 slice drivers
//! on seeded random inputs; masked NaN changes nothing; typed errors.

use posttrain_burn::stats::{
    masked_mean, masked_sum, masked_variance, masked_whiten, nan_max, nan_min, nan_std,
};
use posttrain_burn::{device, mask2, tensor1, tensor2, to_vec};
use posttrain_core::stats::{self as core, MomentConfig, Reduce, WhitenConfig};
use posttrain_core::{Dims, Error, Preset};

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

const REDUCES: [Reduce; 3] = [Reduce::All, Reduce::Rows, Reduce::Columns];

fn masked_input(rng: &mut Rng, d: Dims) -> (Vec<f64>, Vec<bool>) {
    let mut m = rng.bools(d.len(), 0.7);
    for j in 0..d.seq {
        m[j] = true;
        m[d.seq + j] = j % 2 == 0;
    }
    m[d.seq] = true;
    let x = rng.vec(d.len(), -2.0, 3.0);
    (x, m)
}

#[test]
fn sum_and_mean_match_the_core() {
    let dev = device().unwrap();
    let mut rng = Rng::new(11);
    let d = Dims::new(4, 5);
    for reduce in REDUCES {
        let (x, m) = masked_input(&mut rng, d);
        let w = rng.vec(d.len(), 0.1, 2.0);
        let n = reduce.out_len(d);
        let cot = rng.vec(n, -1.0, 1.0);
        for weights in [None, Some(&w)] {
            let wt = weights.map(|w| tensor2(w, [4, 5], &dev).unwrap());
            let mt = mask2(&m, [4, 5], &dev).unwrap();
            // sum
            let (s, g) = masked_sum(
                reduce,
                tensor2(&x, [4, 5], &dev).unwrap(),
                &mt,
                wt.clone(),
                Some(tensor1(&cot, &dev)),
            )
            .unwrap();
            let mut want = vec![0.0; n];
            core::masked_sum(d, reduce, &x, &m, weights.map(|v| v.as_slice()), &mut want).unwrap();
            close("sum", &to_vec(s), &want);
            let mut dx = vec![0.0; d.len()];
            core::masked_sum_vjp(d, reduce, &m, weights.map(|v| v.as_slice()), &cot, &mut dx)
                .unwrap();
            close("sum grad", &to_vec(g.unwrap()), &dx);
            // mean
            for preset in [Preset::Verl, Preset::OpenRlhf] {
                let cfg = MomentConfig::preset(preset);
                let (s, g) = masked_mean(
                    &cfg,
                    reduce,
                    tensor2(&x, [4, 5], &dev).unwrap(),
                    &mt,
                    wt.clone(),
                    Some(tensor1(&cot, &dev)),
                )
                .unwrap();
                core::masked_mean(
                    &cfg,
                    d,
                    reduce,
                    &x,
                    &m,
                    weights.map(|v| v.as_slice()),
                    &mut want,
                )
                .unwrap();
                close("mean", &to_vec(s), &want);
                core::masked_mean_vjp(
                    &cfg,
                    d,
                    reduce,
                    &m,
                    weights.map(|v| v.as_slice()),
                    &cot,
                    &mut dx,
                )
                .unwrap();
                close("mean grad", &to_vec(g.unwrap()), &dx);
            }
        }
    }
}

#[test]
fn variance_and_whitening_match_the_core() {
    let dev = device().unwrap();
    let mut rng = Rng::new(12);
    let d = Dims::new(4, 6);
    let (x, m) = masked_input(&mut rng, d);
    let mt = mask2(&m, [4, 6], &dev).unwrap();
    for preset in [Preset::Verl, Preset::Torchtune, Preset::OpenRlhf] {
        let cfg = MomentConfig::preset(preset);
        for center in [true, false] {
            let (v, g) = masked_variance(
                &cfg,
                tensor2(&x, [4, 6], &dev).unwrap(),
                &mt,
                center,
                Some(tensor1(&[0.7], &dev)),
            )
            .unwrap();
            let mut dx = vec![0.0; d.len()];
            let want = core::masked_variance(&cfg, &x, &m, center, Some((0.7, &mut dx))).unwrap();
            close("variance", &to_vec(v), &[want]);
            close("variance grad", &to_vec(g.unwrap()), &dx);
        }
        let mut wcfg = WhitenConfig::preset(preset);
        for keep_mean in [false, true] {
            wcfg.keep_mean = keep_mean;
            for reduce in [Reduce::All, Reduce::Rows] {
                if preset == Preset::Verl && reduce == Reduce::Rows {
                    continue; // row 1 may hold a single valid entry: unbiased is undefined
                }
                let mut cot = rng.vec(d.len(), -1.0, 1.0);
                cot[3] = 0.0;
                let (y, g) = masked_whiten(
                    &wcfg,
                    reduce,
                    tensor2(&x, [4, 6], &dev).unwrap(),
                    &mt,
                    Some(tensor2(&cot, [4, 6], &dev).unwrap()),
                )
                .unwrap();
                let mut out = vec![0.0; d.len()];
                let mut dx = vec![0.0; d.len()];
                core::masked_whiten(&wcfg, d, reduce, &x, &m, &mut out, Some((&cot, &mut dx)))
                    .unwrap();
                close("whiten", &to_vec(y), &out);
                close("whiten grad", &to_vec(g.unwrap()), &dx);
            }
        }
    }
}

#[test]
fn nan_reductions_match_the_core() {
    let dev = device().unwrap();
    let mut rng = Rng::new(13);
    let d = Dims::new(3, 5);
    let mut x = rng.vec(d.len(), -2.0, 2.0);
    x[2] = f64::NAN;
    x[7] = f64::NAN;
    for j in 0..5 {
        x[10 + j] = if j < 4 { f64::NAN } else { 1.0 };
    }
    for reduce in REDUCES {
        let n = reduce.out_len(d);
        let cot = rng.vec(n, -1.0, 1.0);
        let (s, g) = nan_std(
            reduce,
            tensor2(&x, [3, 5], &dev).unwrap(),
            Some(tensor1(&cot, &dev)),
        )
        .unwrap();
        let mut want = vec![0.0; n];
        let mut dx = vec![0.0; d.len()];
        core::nan_std(d, reduce, &x, &mut want, Some((&cot, &mut dx))).unwrap();
        close("nanstd", &to_vec(s), &want);
        close("nanstd grad", &to_vec(g.unwrap()), &dx);
    }
    let t = tensor2(&x, [3, 5], &dev).unwrap();
    close(
        "nanmax",
        &to_vec(nan_max(t.clone())),
        &[core::nan_max(&x).unwrap()],
    );
    close("nanmin", &to_vec(nan_min(t)), &[core::nan_min(&x).unwrap()]);
    let all_nan = tensor1(&[f64::NAN, f64::NAN], &dev);
    assert!(to_vec(nan_max(all_nan))[0].is_nan());
}

#[test]
fn masked_nan_changes_nothing() {
    let dev = device().unwrap();
    let mut rng = Rng::new(14);
    let d = Dims::new(4, 5);
    let (x, m) = masked_input(&mut rng, d);
    let poisoned: Vec<f64> = x
        .iter()
        .zip(&m)
        .map(|(&v, &k)| if k { v } else { f64::NAN })
        .collect();
    let mt = mask2(&m, [4, 5], &dev).unwrap();
    let cfg = WhitenConfig::preset(Preset::OpenRlhf);
    let cot = vec![1.0; d.len()];
    let run = |x: &[f64]| {
        let (y, g) = masked_whiten(
            &cfg,
            Reduce::Rows,
            tensor2(x, [4, 5], &dev).unwrap(),
            &mt,
            Some(tensor2(&cot, [4, 5], &dev).unwrap()),
        )
        .unwrap();
        let (mm, gm) = masked_mean(
            &MomentConfig::preset(Preset::Verl),
            Reduce::Rows,
            tensor2(x, [4, 5], &dev).unwrap(),
            &mt,
            None,
            Some(tensor1(&[1.0; 4], &dev)),
        )
        .unwrap();
        (
            to_vec(y),
            to_vec(g.unwrap()),
            to_vec(mm),
            to_vec(gm.unwrap()),
        )
    };
    let (a, b) = (run(&x), run(&poisoned));
    assert!(b
        .0
        .iter()
        .chain(&b.1)
        .chain(&b.2)
        .chain(&b.3)
        .all(|v| v.is_finite()));
    close("whiten", &b.0, &a.0);
    close("whiten grad", &b.1, &a.1);
    close("mean", &b.2, &a.2);
    close("mean grad", &b.3, &a.3);
}

#[test]
fn bad_input_is_a_typed_error() {
    let dev = device().unwrap();
    let x = tensor2(&[1.0; 6], [2, 3], &dev).unwrap();
    let m = mask2(&[true; 6], [3, 2], &dev).unwrap();
    let cfg = MomentConfig::preset(Preset::Verl);
    assert!(matches!(
        masked_mean(&cfg, Reduce::All, x.clone(), &m, None, None),
        Err(Error::ShapeMismatch { .. })
    ));
    let one = mask2(&[true, false, false, false, false, false], [2, 3], &dev).unwrap();
    assert!(matches!(
        masked_variance(&cfg, x.clone(), &one, true, None),
        Err(Error::Invalid { .. })
    ));
    let ok = mask2(&[true; 6], [2, 3], &dev).unwrap();
    assert!(matches!(
        masked_sum(Reduce::Rows, x, &ok, None, Some(tensor1(&[1.0; 3], &dev))),
        Err(Error::ShapeMismatch { .. })
    ));
}
