//! posttrain-burn's sequence masks against the core's slice drivers on
//! seeded random inputs; masked NaN changes nothing; typed errors.

use burn::tensor::{Int, Tensor, TensorData};
use posttrain_burn::sequence::{
    high_entropy_mask, off_policy_sequence_mask, pf_ppo_sampling_weights, response_mask_from_eos,
    reward_penalty_mask, truncate_at_first_stop_token,
};
use posttrain_burn::{device, mask2, tensor1, tensor2, to_vec, to_vec_bool, Device};
use posttrain_core::policy::rollout::NanSamplerLogProbs;
use posttrain_core::sequence::{self as core, PfPpoReweight, RewardPenaltyConfig};

const NAN_CHOICES: [NanSamplerLogProbs; 2] = [
    NanSamplerLogProbs::Propagate,
    NanSamplerLogProbs::AsOnPolicy,
];
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

fn ids(v: &[i64], shape: [usize; 2], dev: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), dev)
}

#[test]
fn token_masks_match_the_core() {
    let dev = device().unwrap();
    let mut rng = Rng::new(21);
    let d = Dims::new(5, 7);
    for _ in 0..4 {
        let seq = rng.ints(d.len(), 6);
        let mut want = vec![false; d.len()];
        core::response_mask_from_eos(d, &seq, &[2, 4], &mut want).unwrap();
        assert_eq!(
            to_vec_bool(response_mask_from_eos(ids(&seq, [5, 7], &dev), &[2, 4])),
            want
        );
        let mut s2 = seq.clone();
        let mut pad = vec![false; d.len()];
        core::truncate_at_first_stop_token(d, &mut s2, &[3], -1, &mut pad).unwrap();
        let (got, gpad) = truncate_at_first_stop_token(ids(&seq, [5, 7], &dev), &[3], -1);
        let got: Vec<i64> = got
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap();
        assert_eq!(got, s2);
        assert_eq!(to_vec_bool(gpad.clone()), pad);
        let lens = rng.ints(d.batch, 8);
        for cfg in [
            RewardPenaltyConfig {
                penalise_no_eos: true,
                min_response_length: Some(4),
            },
            RewardPenaltyConfig {
                penalise_no_eos: false,
                min_response_length: Some(3),
            },
            RewardPenaltyConfig {
                penalise_no_eos: true,
                min_response_length: None,
            },
        ] {
            let mut want = vec![false; d.batch];
            core::reward_penalty_mask(&cfg, d, &pad, &lens, &mut want).unwrap();
            let lt = Tensor::<1, Int>::from_data(TensorData::new(lens.clone(), [d.batch]), &dev);
            assert_eq!(
                to_vec_bool(reward_penalty_mask(&cfg, &gpad, lt).unwrap()),
                want
            );
        }
    }
}

#[test]
fn float_masks_and_weights_match_the_core() {
    let dev = device().unwrap();
    let mut rng = Rng::new(22);
    let d = Dims::new(4, 6);
    for q in [0.0, 0.25, 0.37, 0.5, 1.0] {
        let h = rng.vec(d.len(), 0.0, 3.0);
        let m = rng.bools(d.len(), 0.6);
        let mut want = vec![false; d.len()];
        let mut scratch = vec![0.0; d.len()];
        let tau = core::high_entropy_mask(d, &h, &m, q, &mut want, &mut scratch).unwrap();
        let (got, gtau) = high_entropy_mask(
            tensor2(&h, [4, 6], &dev).unwrap(),
            &mask2(&m, [4, 6], &dev).unwrap(),
            q,
        )
        .unwrap();
        assert_eq!(to_vec_bool(got), want, "q = {q}");
        close("tau", &to_vec(gtau.unwrap()), &[tau.unwrap()]);
    }
    for thr in [0.0, 0.05, 0.3] {
        let adv = rng.vec(d.batch, -1.0, 1.0);
        let lp = rng.vec(d.len(), -2.0, 0.0);
        let mut sp = rng.vec(d.len(), -2.0, 0.0);
        let m = rng.bools(d.len(), 0.7);
        // Tokens the sampler could not score (NaN), valid ones included,
        // and an infinite difference.
        for t in [1, 7, 8, 20] {
            sp[t] = f64::NAN;
        }
        sp[13] = f64::NEG_INFINITY;
        for nan in NAN_CHOICES {
            let mut want = vec![false; d.batch];
            core::off_policy_sequence_mask(d, &adv, &lp, &sp, &m, thr, nan, &mut want).unwrap();
            let got = off_policy_sequence_mask(
                tensor1(&adv, &dev),
                tensor2(&lp, [4, 6], &dev).unwrap(),
                tensor2(&sp, [4, 6], &dev).unwrap(),
                &mask2(&m, [4, 6], &dev).unwrap(),
                thr,
                nan,
            )
            .unwrap();
            assert_eq!(to_vec_bool(got), want, "{nan:?}");
        }
    }
    // Explicit: row 0 has A < 0, a small KL and one valid NaN token.
    let d1 = Dims::new(2, 3);
    let lp = [-1.0; 6];
    let sp = [-0.97, f64::NAN, -1.0, -0.5, -0.5, -0.5];
    let adv = [-1.0, 1.0];
    for (nan, want) in [
        (NanSamplerLogProbs::Propagate, [false, true]),
        (NanSamplerLogProbs::AsOnPolicy, [true, true]),
    ] {
        let got = off_policy_sequence_mask(
            tensor1(&adv, &dev),
            tensor2(&lp, [2, 3], &dev).unwrap(),
            tensor2(&sp, [2, 3], &dev).unwrap(),
            &mask2(&[true; 6], [2, 3], &dev).unwrap(),
            0.02,
            nan,
        )
        .unwrap();
        assert_eq!(to_vec_bool(got), want, "{nan:?}");
        let mut core_keep = [false; 2];
        core::off_policy_sequence_mask(d1, &adv, &lp, &sp, &[true; 6], 0.02, nan, &mut core_keep)
            .unwrap();
        assert_eq!(core_keep, want);
    }
    let scores = rng.vec(d.len(), -1.0, 1.0);
    for method in [
        PfPpoReweight::Pow(2.0),
        PfPpoReweight::Pow(0.5),
        PfPpoReweight::MaxMin,
        PfPpoReweight::MaxRandom,
    ] {
        let mut want = vec![0.0; d.batch];
        core::pf_ppo_sampling_weights(method, d, &scores, &mut want).unwrap();
        close(
            "pf-ppo",
            &to_vec(pf_ppo_sampling_weights(
                method,
                tensor2(&scores, [4, 6], &dev).unwrap(),
            )),
            &want,
        );
    }
}

#[test]
fn masked_nan_changes_nothing() {
    let dev = device().unwrap();
    let mut rng = Rng::new(23);
    let d = Dims::new(3, 5);
    let h = rng.vec(d.len(), 0.0, 2.0);
    let m = rng.bools(d.len(), 0.6);
    let poisoned: Vec<f64> = h
        .iter()
        .zip(&m)
        .map(|(&v, &k)| if k { v } else { f64::NAN })
        .collect();
    let mt = mask2(&m, [3, 5], &dev).unwrap();
    let a = high_entropy_mask(tensor2(&h, [3, 5], &dev).unwrap(), &mt, 0.4)
        .unwrap()
        .0;
    let b = high_entropy_mask(tensor2(&poisoned, [3, 5], &dev).unwrap(), &mt, 0.4)
        .unwrap()
        .0;
    assert_eq!(to_vec_bool(a), to_vec_bool(b));
    let adv = tensor1(&[-1.0, -1.0, -1.0], &dev);
    let lp = rng.vec(d.len(), -1.0, 0.0);
    let pl: Vec<f64> = lp
        .iter()
        .zip(&m)
        .map(|(&v, &k)| if k { v } else { f64::NAN })
        .collect();
    let zero = tensor2(&vec![-0.5; d.len()], [3, 5], &dev).unwrap();
    for nan in NAN_CHOICES {
        let a = off_policy_sequence_mask(
            adv.clone(),
            tensor2(&lp, [3, 5], &dev).unwrap(),
            zero.clone(),
            &mt,
            0.2,
            nan,
        )
        .unwrap();
        let b = off_policy_sequence_mask(
            adv.clone(),
            tensor2(&pl, [3, 5], &dev).unwrap(),
            zero.clone(),
            &mt,
            0.2,
            nan,
        )
        .unwrap();
        assert_eq!(to_vec_bool(a), to_vec_bool(b), "{nan:?}");
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let dev = device().unwrap();
    let h = tensor2(&[1.0; 6], [2, 3], &dev).unwrap();
    let m = mask2(&[true; 6], [3, 2], &dev).unwrap();
    assert!(matches!(
        high_entropy_mask(h.clone(), &m, 0.5),
        Err(Error::ShapeMismatch { .. })
    ));
    let ok = mask2(&[true; 6], [2, 3], &dev).unwrap();
    assert!(matches!(
        high_entropy_mask(h.clone(), &ok, 1.5),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        off_policy_sequence_mask(
            tensor1(&[0.0; 2], &dev),
            h.clone(),
            h.clone(),
            &ok,
            f64::NAN,
            NanSamplerLogProbs::Propagate,
        ),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        off_policy_sequence_mask(
            tensor1(&[0.0; 3], &dev),
            h.clone(),
            h,
            &ok,
            0.1,
            NanSamplerLogProbs::AsOnPolicy
        ),
        Err(Error::ShapeMismatch { .. })
    ));
}
