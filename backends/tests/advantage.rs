//! The advantage / reward / KL-controller tensor ops against the core's f64
//! slice drivers on seeded random inputs; masked NaN changes nothing; typed
//! errors. The backend is the one `posttrain_burn::device()` picks.

use burn::tensor::{Bool, Tensor};
use posttrain_burn::advantage::{self as adv, EosPosition, Groups};
use posttrain_burn::{device, mask2, tensor1, tensor2, to_vec, Device};
use posttrain_core::advantage::{
    self as core, GaeConfig, GroupNormConfig, MultiRewardConfig, OtbConfig, PassAtKConfig,
    RewardAggregation, RewardScaling, RlooConfig, SingletonGroup,
};
use posttrain_core::kl::{self as ckl, KlConfig, KlController, KlEstimator, ScorePosition};
use posttrain_core::stats::{masked_whiten_in_place, Reduce, WhitenConfig};
use posttrain_core::{Dims, Error, Preset};

// ---------------------------------------------------------------------------
// helpers (as tests/ops.rs)
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
    /// A mask with about `p` valid, row 0 fully valid, the last row fully
    /// masked when there are ≥ 3 rows.
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
    /// Group ids in `0..k` (shuffled, non-contiguous), every row in a group.
    fn index(&mut self, b: usize, k: usize) -> Vec<i64> {
        (0..b)
            .map(|_| 10 + (self.next_u64() % k as u64) as i64 * 7)
            .collect()
    }
    /// Binary-ish scores: a few ties on purpose.
    fn binary(&mut self, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| if self.unit() < 0.5 { 1.0 } else { 0.0 })
            .collect()
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

fn t1(v: &[f64]) -> Tensor<1> {
    tensor1(v, &dev())
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

const SHAPES: [(usize, usize); 4] = [(2, 3), (4, 7), (6, 5), (9, 16)];

// ---------------------------------------------------------------------------
// group estimators
// ---------------------------------------------------------------------------

fn zscore_configs() -> Vec<GroupNormConfig> {
    let mut v = vec![];
    for p in [Preset::Verl, Preset::Trl, Preset::OpenRlhf] {
        v.push(GroupNormConfig::preset(p));
    }
    for singleton in [
        SingletonGroup::MeanZeroStdOne,
        SingletonGroup::RawScore,
        SingletonGroup::Zero,
    ] {
        for scale in [true, false] {
            for bessel in [true, false] {
                v.push(GroupNormConfig::new(scale, 0.25, bessel, singleton).unwrap());
            }
        }
    }
    v
}

/// `(batch, groups)`: singletons appear with many groups.
const GROUPINGS: [(usize, usize); 5] = [(1, 1), (4, 2), (8, 3), (12, 9), (16, 4)];

#[test]
fn group_estimators_match_core() {
    let mut rng = Rng::new(1);
    for &(b, k) in &GROUPINGS {
        for kind in 0..2 {
            let s = if kind == 0 {
                rng.vec(b, -2.0, 2.0)
            } else {
                rng.binary(b)
            };
            let index = rng.index(b, k);
            let groups = Groups::new(&index, &dev()).unwrap();
            let mut perm = vec![0usize; b];
            let mut want = vec![0.0; b];
            for cfg in zscore_configs() {
                core::group_zscore_advantages(&cfg, &s, &index, &mut perm, &mut want).unwrap();
                let got = adv::group_zscore_advantages(&cfg, t1(&s), &groups).unwrap();
                close(&format!("zscore {cfg:?} b{b}"), &to_vec(got), &want, TOL);
            }
            core::group_mean_baseline_advantages(&s, &index, &mut perm, &mut want).unwrap();
            let got = adv::group_mean_baseline_advantages(t1(&s), &groups).unwrap();
            close("mean baseline", &to_vec(got), &want, TOL);
            for f_norm in [1.0, -2.5] {
                core::gpg_advantages(&s, &index, f_norm, &mut perm, &mut want).unwrap();
                let got = adv::gpg_advantages(t1(&s), &groups, f_norm).unwrap();
                close("gpg", &to_vec(got), &want, TOL);
            }
            for single in [SingletonGroup::RawScore, SingletonGroup::Zero] {
                core::leave_one_out_advantages(&s, &index, single, &mut perm, &mut want).unwrap();
                let got = adv::leave_one_out_advantages(t1(&s), &groups, single).unwrap();
                close("rloo", &to_vec(got), &want, TOL);
            }
            let mut lengths: Vec<f64> = (0..b).map(|_| (rng.next_u64() % 9) as f64).collect();
            if b > 2 {
                lengths[1] = 0.0;
            }
            core::length_weighted_baseline_advantages(&s, &lengths, &index, &mut perm, &mut want)
                .unwrap();
            let got =
                adv::length_weighted_baseline_advantages(t1(&s), t1(&lengths), &groups).unwrap();
            close("opo", &to_vec(got), &want, TOL);
        }
    }
}

#[test]
fn pass_at_k_matches_core_with_ties() {
    let mut rng = Rng::new(2);
    for &(b, k) in &[(4usize, 2usize), (8, 3), (12, 4), (16, 2)] {
        for kind in 0..2 {
            let s = if kind == 0 {
                rng.vec(b, -1.0, 1.0)
            } else {
                rng.binary(b)
            };
            // Every group ≥ 2 members: ids by position modulo k.
            let index: Vec<i64> = (0..b).map(|i| ((i * 5) % k) as i64 - 3).collect();
            let groups = Groups::new(&index, &dev()).unwrap();
            let mut perm = vec![0usize; b];
            let mut want = vec![0.0; b];
            for (scale, eps) in [(true, 1e-6), (true, 0.25), (false, 1e-6)] {
                let cfg = PassAtKConfig {
                    scale_by_std: scale,
                    std_eps: eps,
                };
                core::pass_at_k_advantages(&cfg, &s, &index, &mut perm, &mut want).unwrap();
                let got = adv::pass_at_k_advantages(&cfg, t1(&s), &groups).unwrap();
                close(&format!("passk b{b} kind{kind}"), &to_vec(got), &want, TOL);
            }
        }
    }
    // A singleton group is refused with its id.
    let groups = Groups::new(&[1, 1, 5], &dev()).unwrap();
    let cfg = PassAtKConfig {
        scale_by_std: true,
        std_eps: 1e-6,
    };
    let r = adv::pass_at_k_advantages(&cfg, t1(&[1.0, 2.0, 3.0]), &groups);
    assert!(matches!(r, Err(Error::EmptyGroup { group: 5, .. })));
}

#[test]
fn outcome_scores_gdpo_and_rpp_baseline_match_core() {
    let mut rng = Rng::new(3);
    for &(b, t) in &SHAPES {
        let d = Dims::new(b, t);
        let r = rng.vec(d.len(), -1.0, 1.0);
        let m = rng.mask(d, 0.7);
        let index = rng.index(b, 2.max(b / 3));
        let groups = Groups::new(&index, &dev()).unwrap();
        let mut s = vec![0.0; b];
        core::outcome_scores(d, &r, &mut s).unwrap();
        let got = adv::outcome_scores(t2(&r, d)).unwrap();
        close("outcome scores", &to_vec(got.clone()), &s, TOL);
        let mut tok = vec![0.0; d.len()];
        core::broadcast_to_tokens(d, &s, &m, &mut tok).unwrap();
        close(
            "broadcast",
            &to_vec(adv::broadcast_to_tokens(got, &m2(&m, d)).unwrap()),
            &tok,
            TOL,
        );
        // GDPO with 1 and 3 components.
        let mut perm = vec![0usize; b];
        for nk in [1usize, 3] {
            let keys: Vec<f64> = rng.vec(nk * b, -1.0, 2.0);
            let weights: Vec<f64> = (0..nk).map(|k| 0.5 + k as f64).collect();
            for scale in [true, false] {
                let cfg = GroupNormConfig::new(scale, 1e-6, true, SingletonGroup::MeanZeroStdOne)
                    .unwrap();
                let mut scratch = vec![0.0; 2 * b];
                let mut want = vec![0.0; d.len()];
                core::gdpo_advantages(
                    &cfg,
                    d,
                    &keys,
                    &weights,
                    &m,
                    &index,
                    &mut perm,
                    &mut scratch,
                    &mut want,
                )
                .unwrap();
                let kt: Vec<Tensor<1>> = (0..nk).map(|k| t1(&keys[k * b..(k + 1) * b])).collect();
                let got = adv::gdpo_advantages(&cfg, &kt, &weights, &m2(&m, d), &groups).unwrap();
                close("gdpo", &to_vec(got), &want, TOL);
            }
        }
        // REINFORCE++ baseline: mean baseline, broadcast, verl whitening, zeroed.
        let mut a = vec![0.0; b];
        core::group_mean_baseline_advantages(&s, &index, &mut perm, &mut a).unwrap();
        let mut want = vec![0.0; d.len()];
        core::broadcast_to_tokens(d, &a, &m, &mut want).unwrap();
        masked_whiten_in_place(
            &WhitenConfig::preset(Preset::Verl),
            d,
            Reduce::All,
            &mut want,
            &m,
        )
        .unwrap();
        for (w, &k) in want.iter_mut().zip(&m) {
            if !k {
                *w = 0.0;
            }
        }
        let got =
            adv::reinforce_plus_plus_baseline_advantages(t1(&s), &groups, &m2(&m, d)).unwrap();
        close("rpp baseline", &to_vec(got), &want, TOL);
    }
}

// ---------------------------------------------------------------------------
// token-level scans
// ---------------------------------------------------------------------------

#[test]
fn gae_matches_core_and_ignores_masked_nan() {
    let mut rng = Rng::new(4);
    for &(b, t) in &SHAPES {
        let d = Dims::new(b, t);
        let r = rng.vec(d.len(), -1.0, 1.0);
        let v = rng.vec(d.len(), -1.0, 1.0);
        let m = rng.mask(d, 0.7);
        for (gamma, lam) in [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)] {
            for preset in [Preset::Verl, Preset::Torchtune] {
                let cfg = GaeConfig::preset(preset, gamma, lam).unwrap();
                let mut adv_w = vec![0.0; d.len()];
                let mut ret_w = vec![0.0; d.len()];
                core::gae_advantages_returns(&cfg, d, &r, &v, &m, &mut adv_w, &mut ret_w).unwrap();
                let got =
                    adv::gae_advantages_returns(&cfg, t2(&r, d), t2(&v, d), &m2(&m, d)).unwrap();
                let what = format!("gae {preset:?} g{gamma} l{lam} b{b}t{t}");
                close(&what, &to_vec(got.advantages), &adv_w, TOL);
                close(&what, &to_vec(got.returns), &ret_w, TOL);
                if preset == Preset::Verl {
                    // verl skips masked steps: poisoned rewards there change
                    // nothing at the valid positions.
                    let got = adv::gae_advantages_returns(
                        &cfg,
                        t2(&poison(&r, &m), d),
                        t2(&v, d),
                        &m2(&m, d),
                    )
                    .unwrap();
                    let a = to_vec(got.advantages);
                    let valid = |x: &[f64]| -> Vec<f64> {
                        x.iter()
                            .zip(&m)
                            .filter(|(_, &k)| k)
                            .map(|(&x, _)| x)
                            .collect()
                    };
                    close(&what, &valid(&a), &valid(&adv_w), TOL);
                }
            }
        }
    }
}

#[test]
fn returns_rpp_remax_match_core_and_ignore_masked_nan() {
    let mut rng = Rng::new(5);
    for &(b, t) in &SHAPES {
        let d = Dims::new(b, t);
        let r = rng.vec(d.len(), -1.0, 1.0);
        let m = rng.mask(d, 0.6);
        let rp = poison(&r, &m);
        for gamma in [1.0, 0.9, 0.0] {
            let mut adv_w = vec![0.0; d.len()];
            let mut ret_w = vec![0.0; d.len()];
            core::reinforce_plus_plus_advantages(d, &r, &m, gamma, &mut adv_w, &mut ret_w).unwrap();
            for input in [&r, &rp] {
                let got =
                    adv::reinforce_plus_plus_advantages(t2(input, d), &m2(&m, d), gamma).unwrap();
                close("rpp adv", &to_vec(got.advantages), &adv_w, TOL);
                close("rpp ret", &to_vec(got.returns), &ret_w, TOL);
            }
            let mut want = vec![0.0; d.len()];
            core::discounted_returns(d, &r, &m, gamma, &mut want).unwrap();
            let got = adv::discounted_returns(t2(&rp, d), &m2(&m, d), gamma).unwrap();
            close("returns", &to_vec(got), &want, TOL);
        }
        let base = rng.vec(b, -1.0, 1.0);
        let mut adv_w = vec![0.0; d.len()];
        let mut ret_w = vec![0.0; d.len()];
        core::remax_advantages(d, &r, &base, &m, &mut adv_w, &mut ret_w).unwrap();
        for input in [&r, &rp] {
            let got = adv::remax_advantages(t2(input, d), t1(&base), &m2(&m, d)).unwrap();
            close("remax adv", &to_vec(got.advantages), &adv_w, TOL);
            close("remax ret", &to_vec(got.returns), &ret_w, TOL);
        }
    }
}

#[test]
fn optimal_token_baseline_matches_core() {
    let mut rng = Rng::new(6);
    for &(b, t) in &SHAPES {
        let d = Dims::new(b, t);
        let r = rng.vec(d.len(), -1.0, 1.0);
        let mut m = rng.mask(d, 0.7);
        // A unique longest member somewhere and ragged lengths.
        for i in 1..b {
            let len = (i * 3) % (t + 1);
            for j in 0..t {
                if j >= len {
                    m[i * t + j] = false;
                }
            }
        }
        let lp = rng.vec(d.len(), -3.0, -0.05);
        let sp = rng.vec(d.len(), 0.0, 0.8);
        let is = rng.vec(d.len(), 0.5, 1.5);
        let index = rng.index(b, 2.max(b / 3));
        let groups = Groups::new(&index, &dev()).unwrap();
        for compact in [false, true] {
            for tail in [true, false] {
                for eps in [1e-8, 1e-3] {
                    for use_is in [false, true] {
                        let cfg = OtbConfig {
                            handle_zero_tail: tail,
                            epsilon: eps,
                            compact_steps: compact,
                        };
                        let mut perm = vec![0usize; b];
                        let mut scratch = vec![0.0; d.len() + 2 * t];
                        let mut adv_w = vec![0.0; d.len()];
                        let mut ret_w = vec![0.0; d.len()];
                        core::optimal_token_baseline_advantages(
                            &cfg,
                            d,
                            &r,
                            &m,
                            &index,
                            &lp,
                            &sp,
                            use_is.then_some(&is[..]),
                            &mut perm,
                            &mut scratch,
                            &mut adv_w,
                            &mut ret_w,
                        )
                        .unwrap();
                        let got = adv::optimal_token_baseline_advantages(
                            &cfg,
                            t2(&poison(&r, &m), d),
                            &m2(&m, d),
                            &groups,
                            t2(&poison(&lp, &m), d),
                            t2(&sp, d),
                            use_is.then(|| t2(&is, d)),
                        )
                        .unwrap();
                        let what = format!("otb {cfg:?} is{use_is} b{b}t{t}");
                        close(&what, &to_vec(got.advantages), &adv_w, TOL);
                        close(&what, &to_vec(got.returns), &ret_w, TOL);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// TRL
// ---------------------------------------------------------------------------

/// `batch × k` rewards with some NaNs (and one all-NaN row when `nan`).
fn trl_rewards(rng: &mut Rng, b: usize, k: usize, nan: bool) -> Vec<f64> {
    let mut v = rng.vec(b * k, -1.0, 2.0);
    if nan {
        for (i, x) in v.iter_mut().enumerate() {
            if i % 5 == 2 {
                *x = f64::NAN;
            }
        }
        for x in &mut v[..k] {
            *x = f64::NAN;
        }
    }
    v
}

#[test]
fn trl_grpo_matches_core() {
    let mut rng = Rng::new(7);
    for &(g, ng, k) in &[(3usize, 2usize, 1usize), (4, 2, 2), (1, 5, 1), (2, 3, 3)] {
        let b = g * ng;
        for nan in [false, true] {
            let per_func = trl_rewards(&mut rng, b, k, nan);
            let weights: Vec<f64> = (0..k).map(|i| 0.5 + 0.25 * i as f64).collect();
            for scaling in [
                RewardScaling::Group,
                RewardScaling::Batch,
                RewardScaling::None,
            ] {
                for aggregation in [
                    RewardAggregation::SumThenNormalize,
                    RewardAggregation::NormalizeThenSum,
                ] {
                    let cfg = MultiRewardConfig::new(g, scaling, aggregation).unwrap();
                    let (mut rw, mut st, mut want) = (vec![0.0; b], vec![0.0; b], vec![0.0; b]);
                    let log = core::multi_reward_group_advantages(
                        &cfg, &per_func, &weights, &mut rw, &mut st, &mut want,
                    )
                    .unwrap();
                    let got = adv::multi_reward_group_advantages(
                        &cfg,
                        t2(&per_func, Dims::new(b, k)),
                        &weights,
                    )
                    .unwrap();
                    let what = format!("trl grpo {cfg:?} nan{nan}");
                    close(&what, &to_vec(got.advantages), &want, TOL);
                    close(&what, &to_vec(got.log.reward_mean), &[log.reward_mean], TOL);
                    close(&what, &to_vec(got.log.reward_std), &[log.reward_std], TOL);
                    close(
                        &what,
                        &to_vec(got.log.frac_zero_std),
                        &[log.frac_zero_std],
                        TOL,
                    );
                }
            }
            // Per-function metrics.
            let d = Dims::new(b, k);
            let (mut mean, mut std) = (vec![0.0; k], vec![0.0; k]);
            posttrain_core::stats::nan_mean(d, Reduce::Columns, &per_func, &mut mean).unwrap();
            posttrain_core::stats::nan_std(d, Reduce::Columns, &per_func, &mut std, None).unwrap();
            let (gm, gs) = adv::reward_func_stats(t2(&per_func, d)).unwrap();
            close("func mean", &to_vec(gm), &mean, TOL);
            close("func std", &to_vec(gs), &std, TOL);
        }
    }
}

#[test]
fn trl_rloo_matches_core() {
    let mut rng = Rng::new(8);
    for &(g, ng, k, t) in &[(3usize, 2usize, 1usize, 6usize), (4, 2, 2, 5), (1, 4, 1, 3)] {
        let b = g * ng;
        let d = Dims::new(b, t);
        for nan in [false, true] {
            let per_func = trl_rewards(&mut rng, b, k, nan);
            let weights: Vec<f64> = (0..k).map(|i| 1.0 - 0.3 * i as f64).collect();
            let m = rng.mask(d, 0.7);
            let old = rng.vec(d.len(), -2.0, -0.1);
            let rf = rng.vec(d.len(), -2.0, -0.1);
            for beta in [0.0, 0.05] {
                for clip in [None, Some((-0.5, 0.5))] {
                    for normalize in [false, true] {
                        let cfg = RlooConfig::new(g, beta, clip, normalize).unwrap();
                        let (mut rw, mut so, mut want) = (vec![0.0; b], vec![0.0; b], vec![0.0; b]);
                        let log = core::leave_one_out_reward_advantages(
                            &cfg,
                            d,
                            &per_func,
                            &weights,
                            &m,
                            &old,
                            Some(&rf),
                            &mut rw,
                            &mut so,
                            &mut want,
                        )
                        .unwrap();
                        let got = adv::leave_one_out_reward_advantages(
                            &cfg,
                            t2(&per_func, Dims::new(b, k)),
                            &weights,
                            &m2(&m, d),
                            t2(&poison(&old, &m), d),
                            Some(t2(&poison(&rf, &m), d)),
                        )
                        .unwrap();
                        let what = format!("trl rloo {cfg:?} nan{nan}");
                        close(&what, &to_vec(got.advantages), &want, TOL);
                        close(&what, &to_vec(got.seq_old_logps), &so, TOL);
                        close(&what, &to_vec(got.log.reward_mean), &[log.reward_mean], TOL);
                        close(&what, &to_vec(got.log.reward_std), &[log.reward_std], TOL);
                        close(
                            &what,
                            &to_vec(got.log.frac_zero_std),
                            &[log.frac_zero_std],
                            TOL,
                        );
                        assert_eq!(got.log.kl.is_some(), log.kl.is_some());
                        if let (Some(a), Some(w)) = (got.log.kl, log.kl) {
                            close(&what, &to_vec(a), &[w], TOL);
                        }
                    }
                }
            }
            // β ≠ 0 needs the reference log-probs.
            let cfg = RlooConfig::new(g, 0.1, None, false).unwrap();
            let r = adv::leave_one_out_reward_advantages(
                &cfg,
                t2(&per_func, Dims::new(b, k)),
                &weights,
                &m2(&m, d),
                t2(&old, d),
                None,
            );
            assert!(matches!(r, Err(Error::Invalid { .. })));
        }
    }
}

// ---------------------------------------------------------------------------
// rewards and the controller
// ---------------------------------------------------------------------------

#[test]
fn kl_penalized_rewards_match_core() {
    let mut rng = Rng::new(9);
    for &(b, t) in &SHAPES {
        let d = Dims::new(b, t);
        let s = rng.vec(d.len(), -1.0, 1.0);
        let old = rng.vec(d.len(), -3.0, -0.1);
        let rf = rng.vec(d.len(), -3.0, -0.1);
        let m = rng.mask(d, 0.7);
        for name in ["kl", "abs", "mse", "low_var_kl", "low_var_kl+"] {
            let cfg = KlConfig::parse_verl(name).unwrap();
            for beta in [0.0, 0.05, -0.2] {
                let mut want = vec![0.0; d.len()];
                let st =
                    ckl::kl_penalized_rewards(&cfg, beta, d, &s, &old, &rf, Some(&m), &mut want)
                        .unwrap();
                let got = adv::kl_penalized_rewards(
                    &cfg,
                    beta,
                    t2(&s, d),
                    t2(&poison(&old, &m), d),
                    t2(&rf, d),
                    Some(&m2(&m, d)),
                )
                .unwrap();
                close(name, &to_vec(got.rewards), &want, TOL);
                close(name, &to_vec(got.mean_kl), &[st.mean_kl], TOL);
                // Unmasked (verl compute_rewards).
                let st = ckl::kl_penalized_rewards(&cfg, beta, d, &s, &old, &rf, None, &mut want)
                    .unwrap();
                let got =
                    adv::kl_penalized_rewards(&cfg, beta, t2(&s, d), t2(&old, d), t2(&rf, d), None)
                        .unwrap();
                close(name, &to_vec(got.rewards), &want, TOL);
                close(name, &to_vec(got.mean_kl), &[st.mean_kl], TOL);
            }
        }
    }
}

#[test]
fn rewards_with_score_at_eos_match_core() {
    let mut rng = Rng::new(10);
    for &(b, t) in &SHAPES {
        let d = Dims::new(b, t);
        let s = rng.vec(b, -1.0, 1.0);
        let kl = rng.vec(d.len(), -0.5, 0.5);
        let mut m = rng.mask(d, 0.6);
        // Right padding in row 1 (a last valid inside the row).
        if b > 1 && t > 2 {
            for j in t - 2..t {
                m[t + j] = false;
            }
        }
        let idx: Vec<i64> = (0..b).map(|i| ((i * 7) % t) as i64).collect();
        let mt = m2(&m, d);
        for beta in [0.0, 0.1] {
            let cases: [(ScorePosition, EosPosition); 3] = [
                (ScorePosition::LastColumn, EosPosition::LastColumn),
                (ScorePosition::LastValid(&m), EosPosition::LastValid(&mt)),
                (ScorePosition::Explicit(&idx), EosPosition::Explicit(&idx)),
            ];
            for (cp, tp) in cases {
                let mut want = vec![0.0; d.len()];
                ckl::rewards_with_score_at_eos(d, &s, cp, &kl, beta, &mut want).unwrap();
                let got = adv::rewards_with_score_at_eos(t1(&s), tp, t2(&kl, d), beta).unwrap();
                close(&format!("eos {cp:?}"), &to_vec(got.rewards), &want, TOL);
                close("eos grad", &to_vec(got.grad_kl), &vec![-beta; d.len()], TOL);
            }
        }
    }
    // An index outside the row is a typed error.
    let d = Dims::new(2, 3);
    let r = adv::rewards_with_score_at_eos(
        t1(&[1.0, 2.0]),
        EosPosition::Explicit(&[0, 3]),
        t2(&[0.0; 6], d),
        0.1,
    );
    assert!(matches!(r, Err(Error::Invalid { .. })));
}

#[test]
fn kl_controller_reads_the_tensor_kl() {
    let kls = [0.05, 0.2, f64::INFINITY, 0.0, 0.11];
    let mut want = KlController::adaptive(0.05, 0.1, 64.0).unwrap();
    let mut got = want;
    for (k, &kl) in kls.iter().enumerate() {
        want.update(kl, 16 + k as u64).unwrap();
        adv::update_kl_controller(&mut got, t1(&[kl]), 16 + k as u64).unwrap();
        assert!((got.value() - want.value()).abs() <= 1e-6 * want.value().abs());
    }
    // NaN is refused and β stays.
    let before = got.value();
    assert!(matches!(
        adv::update_kl_controller(&mut got, t1(&[f64::NAN]), 8),
        Err(Error::NonFinite { .. })
    ));
    assert_eq!(got.value(), before);
    assert!(matches!(
        adv::update_kl_controller(&mut got, t1(&[0.1, 0.2]), 8),
        Err(Error::ShapeMismatch { .. })
    ));
}

// ---------------------------------------------------------------------------
// typed errors
// ---------------------------------------------------------------------------

#[test]
fn shape_mismatches_are_typed_errors() {
    let d = Dims::new(3, 4);
    let e = Dims::new(3, 5);
    let x = vec![0.5; d.len()];
    let y = vec![0.5; e.len()];
    let m = vec![true; d.len()];
    let is_shape = |r: Result<(), Error>| matches!(r, Err(Error::ShapeMismatch { .. }));
    let cfg = GaeConfig::preset(Preset::Verl, 1.0, 1.0).unwrap();
    assert!(is_shape(
        adv::gae_advantages_returns(&cfg, t2(&x, d), t2(&y, e), &m2(&m, d)).map(|_| ())
    ));
    assert!(is_shape(
        adv::reinforce_plus_plus_advantages(t2(&y, e), &m2(&m, d), 1.0).map(|_| ())
    ));
    assert!(is_shape(
        adv::remax_advantages(t2(&x, d), t1(&[1.0, 2.0]), &m2(&m, d)).map(|_| ())
    ));
    let groups = Groups::new(&[1, 1, 2], &dev()).unwrap();
    let otb = OtbConfig {
        handle_zero_tail: true,
        epsilon: 1e-8,
        compact_steps: false,
    };
    assert!(is_shape(
        adv::optimal_token_baseline_advantages(
            &otb,
            t2(&x, d),
            &m2(&m, d),
            &groups,
            t2(&x, d),
            t2(&y, e),
            None
        )
        .map(|_| ())
    ));
    assert!(is_shape(
        adv::group_zscore_advantages(
            &GroupNormConfig::preset(Preset::Verl),
            t1(&[1.0, 2.0]),
            &groups
        )
        .map(|_| ())
    ));
    let kc = KlConfig::new(KlEstimator::K1);
    assert!(is_shape(
        adv::kl_penalized_rewards(&kc, 0.1, t2(&x, d), t2(&x, d), t2(&y, e), None).map(|_| ())
    ));
    let me = m2(&vec![true; e.len()], e);
    assert!(is_shape(
        adv::rewards_with_score_at_eos(
            t1(&[1.0, 2.0, 3.0]),
            EosPosition::LastValid(&me),
            t2(&x, d),
            0.1
        )
        .map(|_| ())
    ));
    // Bad parameters are typed too.
    assert!(matches!(
        adv::gpg_advantages(t1(&[1.0, 2.0, 3.0]), &groups, 0.0),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(Groups::new(&[], &dev()), Err(Error::Empty { .. })));
    // Whitening needs two valid tokens (verl's unbiased variance).
    let one = [
        true, false, false, false, false, false, false, false, false, false, false, false,
    ];
    assert!(matches!(
        adv::reinforce_plus_plus_advantages(t2(&x, d), &m2(&one, d), 1.0),
        Err(Error::Invalid { .. })
    ));
}
