//! posttrain-burn's distillation losses against the core's f64 slice drivers
//! on seeded random inputs; masked NaN changes nothing; typed errors.

use posttrain_burn::distill::{
    generalized_jsd_elementwise, generalized_jsd_loss, jsd_from_log_probs, kd_loss,
};
use posttrain_burn::{device, mask2, tensor3, to_vec};
use posttrain_core::distill::{self as core, DistillConfig, Jsd, Reduction};
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

const B: usize = 2;
const S: usize = 3;
const V: usize = 5;

#[test]
fn jsd_losses_match_the_core() {
    let dev = device().unwrap();
    let mut rng = Rng::new(41);
    let zs = rng.vec(B * S * V, -3.0, 3.0);
    let zt = rng.vec(B * S * V, -3.0, 3.0);
    let valid = vec![true, false, true, true, true, false];
    for beta in [0.0, 0.3, 1.0] {
        for (red, n) in [
            (Reduction::BatchMean, None),
            (Reduction::Sum, None),
            (Reduction::Mean, None),
            (Reduction::BatchMean, Some(3.0)),
        ] {
            for t in [1.0, 2.0] {
                let cfg = DistillConfig::new(beta, t, red, n).unwrap();
                for m in [None, Some(&valid)] {
                    let mt = m.map(|m| mask2(m, [B, S], &dev).unwrap());
                    let (l, g) = generalized_jsd_loss(
                        &cfg,
                        tensor3(&zs, [B, S, V], &dev).unwrap(),
                        tensor3(&zt, [B, S, V], &dev).unwrap(),
                        mt.as_ref(),
                        Some(0.9),
                    )
                    .unwrap();
                    let mut gw = vec![0.0; zs.len()];
                    let want = core::generalized_jsd_loss(
                        &cfg,
                        Dims::new(B, S),
                        V,
                        &zs,
                        &zt,
                        m.map(|v| v.as_slice()),
                        Some((0.9, &mut gw)),
                    )
                    .unwrap();
                    close("jsd loss", &to_vec(l), &[want]);
                    close("jsd loss grad", &to_vec(g.unwrap()), &gw);
                }
            }
        }
        let jsd = Jsd::new(beta).unwrap();
        let cot = rng.vec(zs.len(), -1.0, 1.0);
        let mt = mask2(&valid, [B, S], &dev).unwrap();
        let (e, g) = generalized_jsd_elementwise(
            &jsd,
            posttrain_core::logits::Temperature::ONE,
            tensor3(&zs, [B, S, V], &dev).unwrap(),
            tensor3(&zt, [B, S, V], &dev).unwrap(),
            Some(&mt),
            Some(tensor3(&cot, [B, S, V], &dev).unwrap()),
        )
        .unwrap();
        let mut out = vec![0.0; zs.len()];
        let mut gw = vec![0.0; zs.len()];
        core::generalized_jsd_elementwise(
            &jsd,
            posttrain_core::logits::Temperature::ONE,
            B * S,
            V,
            &zs,
            &zt,
            Some(&valid),
            &mut out,
            Some((&cot, &mut gw)),
        )
        .unwrap();
        close("jsd elementwise", &to_vec(e), &out);
        close("jsd elementwise grad", &to_vec(g.unwrap()), &gw);
        // log-probability form, with and without a support mask
        let s: Vec<f64> = rng.vec(zs.len(), -6.0, -0.1);
        let tl: Vec<f64> = rng.vec(zs.len(), -6.0, -0.1);
        let support = rng.bools(zs.len(), 0.7);
        for sup in [None, Some(&support)] {
            let st = sup.map(|m| {
                burn::tensor::Tensor::<3, burn::tensor::Bool>::from_data(
                    burn::tensor::TensorData::new(m.clone(), [B, S, V]),
                    &dev,
                )
            });
            let (e, g) = jsd_from_log_probs(
                &jsd,
                tensor3(&s, [B, S, V], &dev).unwrap(),
                tensor3(&tl, [B, S, V], &dev).unwrap(),
                st.as_ref(),
                Some(tensor3(&cot, [B, S, V], &dev).unwrap()),
            )
            .unwrap();
            core::jsd_from_log_probs(
                &jsd,
                &s,
                &tl,
                sup.map(|v| v.as_slice()),
                &mut out,
                Some((&cot, &mut gw)),
            )
            .unwrap();
            close("jsd log-probs", &to_vec(e), &out);
            close("jsd log-probs grad", &to_vec(g.unwrap()), &gw);
        }
    }
}

#[test]
fn kd_loss_matches_the_core() {
    let dev = device().unwrap();
    let mut rng = Rng::new(42);
    let mut zs = rng.vec(B * S * V, -3.0, 3.0);
    zs[7] = f64::NEG_INFINITY;
    let zt = rng.vec(B * S * V, -3.0, 3.0);
    let valid = vec![true, true, false, true, false, true];
    let (l, g) = kd_loss(
        tensor3(&zs, [B, S, V], &dev).unwrap(),
        tensor3(&zt, [B, S, V], &dev).unwrap(),
        &mask2(&valid, [B, S], &dev).unwrap(),
        Some(1.3),
    )
    .unwrap();
    let mut gw = vec![0.0; zs.len()];
    let want = core::kd_loss(B * S, V, &zs, &zt, &valid, Some((1.3, &mut gw))).unwrap();
    close("kd", &to_vec(l), &[want]);
    close("kd grad", &to_vec(g.unwrap()), &gw);
}

#[test]
fn masked_nan_changes_nothing() {
    let dev = device().unwrap();
    let mut rng = Rng::new(43);
    let zs = rng.vec(B * S * V, -3.0, 3.0);
    let zt = rng.vec(B * S * V, -3.0, 3.0);
    let valid = vec![true, false, true, true, false, true];
    let mut ps = zs.clone();
    for (r, &m) in valid.iter().enumerate() {
        if !m {
            ps[r * V..(r + 1) * V]
                .iter_mut()
                .for_each(|x| *x = f64::NAN);
        }
    }
    let mt = mask2(&valid, [B, S], &dev).unwrap();
    let cfg = DistillConfig::new(0.5, 1.0, Reduction::BatchMean, None).unwrap();
    let run = |z: &[f64]| {
        let (l, g) = generalized_jsd_loss(
            &cfg,
            tensor3(z, [B, S, V], &dev).unwrap(),
            tensor3(&zt, [B, S, V], &dev).unwrap(),
            Some(&mt),
            Some(1.0),
        )
        .unwrap();
        let (k, kg) = kd_loss(
            tensor3(z, [B, S, V], &dev).unwrap(),
            tensor3(&zt, [B, S, V], &dev).unwrap(),
            &mt,
            Some(1.0),
        )
        .unwrap();
        (
            to_vec(l),
            to_vec(g.unwrap()),
            to_vec(k),
            to_vec(kg.unwrap()),
        )
    };
    let (a, p) = (run(&zs), run(&ps));
    assert!(p
        .0
        .iter()
        .chain(&p.1)
        .chain(&p.2)
        .chain(&p.3)
        .all(|x| x.is_finite()));
    close("jsd", &p.0, &a.0);
    close("jsd grad", &p.1, &a.1);
    close("kd", &p.2, &a.2);
    close("kd grad", &p.3, &a.3);
}

#[test]
fn bad_input_is_a_typed_error() {
    let dev = device().unwrap();
    let a = tensor3(&[0.0; 12], [1, 3, 4], &dev).unwrap();
    let b = tensor3(&[0.0; 12], [1, 4, 3], &dev).unwrap();
    let cfg = DistillConfig::new(0.5, 1.0, Reduction::BatchMean, None).unwrap();
    assert!(matches!(
        generalized_jsd_loss(&cfg, a.clone(), b, None, None),
        Err(Error::ShapeMismatch { .. })
    ));
    let none = DistillConfig::new(0.5, 1.0, Reduction::None, None).unwrap();
    assert!(matches!(
        generalized_jsd_loss(&none, a.clone(), a.clone(), None, None),
        Err(Error::Invalid { .. })
    ));
    let m = mask2(&[true; 2], [1, 2], &dev).unwrap();
    assert!(matches!(
        kd_loss(a.clone(), a, &m, None),
        Err(Error::ShapeMismatch { .. })
    ));
}
