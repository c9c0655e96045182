//! Rollout correction on tensors against the core's f64 slice drivers:
//! seeded random inputs (rounded to f32), every weight, mask bit, metric and
//! gradient; masked NaN changes nothing; typed errors.

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

use posttrain_burn::rollout::{
    bypass_policy_loss, correction_metrics_to_host, is_metrics_to_host, off_policy_metrics,
    off_policy_metrics_to_host, rejection_metrics_to_host, rollout_correction_and_rejection,
    rollout_correction_weights, rollout_rejection_mask, vllm_importance_sampling_ratio,
    vllm_metrics_to_host,
};
use posttrain_burn::{to_vec, to_vec_bool};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::policy::rollout::{
    self as core, BypassBuffers, BypassConfig, BypassLoss, CorrectionBuffers, IsConfig, IsLevel,
    IsMetrics, IsThreshold, NanSamplerLogProbs, OffPolicyMetrics, RejectionMetrics,
    RolloutCorrectionConfig, RsConfig, VllmIsConfig,
};
use posttrain_core::Error;

fn check_is(ctx: &str, got: IsMetrics<f64>, want: IsMetrics<f64>) {
    let pairs = [
        ("mean", got.mean, want.mean),
        (
            "ratio_fraction_high",
            got.ratio_fraction_high,
            want.ratio_fraction_high,
        ),
        (
            "ratio_fraction_low",
            got.ratio_fraction_low,
            want.ratio_fraction_low,
        ),
        ("max", got.max, want.max),
        ("min", got.min, want.min),
        ("std", got.std, want.std),
        ("eff_sample_size", got.eff_sample_size, want.eff_sample_size),
        ("seq_mean", got.seq_mean, want.seq_mean),
        ("seq_std", got.seq_std, want.seq_std),
        ("seq_max", got.seq_max, want.seq_max),
        ("seq_min", got.seq_min, want.seq_min),
        (
            "seq_max_deviation",
            got.seq_max_deviation,
            want.seq_max_deviation,
        ),
        (
            "seq_fraction_high",
            got.seq_fraction_high,
            want.seq_fraction_high,
        ),
        (
            "seq_fraction_low",
            got.seq_fraction_low,
            want.seq_fraction_low,
        ),
    ];
    for (n, g, w) in pairs {
        close(&format!("{ctx} is.{n}"), &[g], &[w], 1e-4);
    }
    assert_eq!(got.oob_ratio.is_some(), want.oob_ratio.is_some(), "{ctx}");
    assert_eq!(
        got.batch_norm_factor.is_some(),
        want.batch_norm_factor.is_some(),
        "{ctx}"
    );
    if let (Some(g), Some(w)) = (got.oob_ratio, want.oob_ratio) {
        close(&format!("{ctx} oob"), &[g], &[w], TOL);
    }
    if let (Some(g), Some(w)) = (got.batch_norm_factor, want.batch_norm_factor) {
        close(&format!("{ctx} bn"), &[g], &[w], TOL);
    }
}

fn check_rs(ctx: &str, got: RejectionMetrics<f64>, want: RejectionMetrics<f64>) {
    close(
        &format!("{ctx} rs.masked_fraction"),
        &[got.masked_fraction],
        &[want.masked_fraction],
        TOL,
    );
    close(
        &format!("{ctx} rs.seq_masked_fraction"),
        &[got.seq_masked_fraction],
        &[want.seq_masked_fraction],
        TOL,
    );
    let (g, w): (Vec<_>, Vec<_>) = (got.per_option().collect(), want.per_option().collect());
    assert_eq!(g.len(), w.len(), "{ctx}");
    for ((go, gm), (wo, wm)) in g.into_iter().zip(w) {
        assert_eq!(go, wo);
        let c = format!("{ctx} {}", go.name());
        for (n, a, b) in [
            ("mean", gm.mean, wm.mean),
            ("max", gm.max, wm.max),
            ("min", gm.min, wm.min),
            ("fraction_high", gm.fraction_high, wm.fraction_high),
            ("fraction_low", gm.fraction_low, wm.fraction_low),
            ("std", gm.std, wm.std),
            ("seq_mean", gm.seq_mean, wm.seq_mean),
            ("seq_std", gm.seq_std, wm.seq_std),
            ("seq_max", gm.seq_max, wm.seq_max),
            ("seq_min", gm.seq_min, wm.seq_min),
            (
                "seq_max_deviation",
                gm.seq_max_deviation,
                wm.seq_max_deviation,
            ),
            (
                "seq_fraction_high",
                gm.seq_fraction_high,
                wm.seq_fraction_high,
            ),
            ("masked_fraction", gm.masked_fraction, wm.masked_fraction),
            (
                "seq_masked_fraction",
                gm.seq_masked_fraction,
                wm.seq_masked_fraction,
            ),
        ] {
            close(&format!("{c}.{n}"), &[a], &[b], 1e-4);
        }
        assert_eq!(
            gm.seq_fraction_low.is_some(),
            wm.seq_fraction_low.is_some(),
            "{c}"
        );
        if let (Some(a), Some(b)) = (gm.seq_fraction_low, wm.seq_fraction_low) {
            close(&format!("{c}.seq_fraction_low"), &[a], &[b], TOL);
        }
    }
}

fn check_off(ctx: &str, g: OffPolicyMetrics<f64>, w: OffPolicyMetrics<f64>) {
    for (n, a, b) in [
        ("training_ppl", g.training_ppl, w.training_ppl),
        ("training_log_ppl", g.training_log_ppl, w.training_log_ppl),
        ("kl", g.kl, w.kl),
        ("k3_kl", g.k3_kl, w.k3_kl),
        ("rollout_ppl", g.rollout_ppl, w.rollout_ppl),
        ("rollout_log_ppl", g.rollout_log_ppl, w.rollout_log_ppl),
        ("log_ppl_diff", g.log_ppl_diff, w.log_ppl_diff),
        ("log_ppl_abs_diff", g.log_ppl_abs_diff, w.log_ppl_abs_diff),
        ("log_ppl_diff_max", g.log_ppl_diff_max, w.log_ppl_diff_max),
        ("log_ppl_diff_min", g.log_ppl_diff_min, w.log_ppl_diff_min),
        ("ppl_ratio", g.ppl_ratio, w.ppl_ratio),
        ("chi2_token", g.chi2_token, w.chi2_token),
        ("chi2_seq", g.chi2_seq, w.chi2_seq),
    ] {
        close(&format!("{ctx} off.{n}"), &[a], &[b], 1e-4);
    }
}

fn is_configs() -> Vec<IsConfig> {
    let mut v = vec![];
    for level in [IsLevel::Token, IsLevel::Sequence] {
        for th in [
            IsThreshold::truncate(1.5).unwrap(),
            IsThreshold::band(0.7, 1.4).unwrap(),
        ] {
            for bn in [false, true] {
                v.push(IsConfig::new(level, th, bn).unwrap());
            }
        }
    }
    v
}

fn rs_configs() -> Vec<RsConfig> {
    [
        ("token_k1", "0.8_1.25"),
        ("token_k2,token_k3", "0.05"),
        ("seq_sum_k1,seq_mean_k2", "0.5_2.0,0.02"),
        ("seq_mean_k1,seq_max_k3,seq_sum_k3", "1.5,0.02,0.05"),
        ("seq_max_k2,seq_sum_k2,seq_mean_k3", "0.03"),
    ]
    .iter()
    .map(|(o, t)| RsConfig::parse(o, t).unwrap())
    .collect()
}

#[test]
fn correction_weights_match_core() {
    let mut rng = Rng::new(31);
    for (b, s) in SHAPES {
        let d = Dims::new(b, s);
        for cfg in is_configs() {
            let lr = rng.vec(d.len(), -0.4, 0.4);
            let mask = rng.mask(d, 0.7);
            let (w, m) =
                rollout_correction_weights(&cfg, t2(&poison(&lr, &mask), d), &m2(&mask, d))
                    .unwrap();
            let mut want = vec![0.0; d.len()];
            let wm = core::rollout_correction_weights(&cfg, d, &lr, &mask, &mut want).unwrap();
            let ctx = format!("{cfg:?} {b}x{s}");
            close(&format!("{ctx} weights"), &to_vec(w), &want, TOL);
            check_is(&ctx, is_metrics_to_host(m), wm);
        }
    }
}

#[test]
fn rejection_mask_matches_core() {
    let mut rng = Rng::new(32);
    for (b, s) in SHAPES {
        let d = Dims::new(b, s);
        for cfg in rs_configs() {
            let lr = rng.vec(d.len(), -0.4, 0.4);
            let mask = rng.mask(d, 0.7);
            let (k, m) =
                rollout_rejection_mask(&cfg, t2(&poison(&lr, &mask), d), &m2(&mask, d)).unwrap();
            let mut keep = vec![false; d.len()];
            let mut rows = vec![0.0; b];
            let wm =
                core::rollout_rejection_mask(&cfg, d, &lr, &mask, &mut keep, &mut rows).unwrap();
            let ctx = format!("{cfg:?} {b}x{s}");
            assert_eq!(to_vec_bool(k), keep, "{ctx} keep");
            check_rs(&ctx, rejection_metrics_to_host(m), wm);
        }
    }
}

#[test]
fn off_policy_and_combined_match_core() {
    let mut rng = Rng::new(33);
    for (b, s) in SHAPES {
        let d = Dims::new(b, s);
        for (i, rs) in rs_configs().into_iter().enumerate() {
            let is = is_configs()[i % 8];
            let cfg = RolloutCorrectionConfig {
                is: (i % 3 != 0).then_some(is),
                rs: (i % 2 == 0).then_some(rs),
            };
            let lp = rng.vec(d.len(), -3.0, -0.05);
            let rl: Vec<f64> = lp
                .iter()
                .map(|&x| (x + rng.uniform(-0.3, 0.3)) as f32 as f64)
                .collect();
            let mask = rng.mask(d, 0.7);
            let off =
                off_policy_metrics(t2(&poison(&lp, &mask), d), t2(&rl, d), &m2(&mask, d)).unwrap();
            let want_off = core::off_policy_metrics(d, &lp, &rl, &mask).unwrap();
            let ctx = format!("{cfg:?} {b}x{s}");
            check_off(&ctx, off_policy_metrics_to_host(off), want_off);

            let c = rollout_correction_and_rejection(
                &cfg,
                t2(&poison(&lp, &mask), d),
                t2(&poison(&rl, &mask), d),
                &m2(&mask, d),
            )
            .unwrap();
            let n = d.len();
            let (mut w, mut keep, mut lr, mut rows) =
                (vec![0.0; n], vec![false; n], vec![0.0; n], vec![0.0; b]);
            let wm = core::rollout_correction_and_rejection(
                &cfg,
                d,
                &lp,
                &rl,
                &mask,
                CorrectionBuffers {
                    weights: &mut w,
                    keep: &mut keep,
                    log_ratio: &mut lr,
                    rows: &mut rows,
                },
            )
            .unwrap();
            assert_eq!(to_vec_bool(c.keep), keep, "{ctx} keep");
            assert_eq!(c.weights.is_some(), cfg.is.is_some());
            if let Some(cw) = c.weights {
                close(&format!("{ctx} weights"), &to_vec(cw), &w, TOL);
            }
            let got = correction_metrics_to_host(c.metrics);
            check_off(&ctx, got.off_policy, wm.off_policy);
            if let (Some(g), Some(w)) = (got.is, wm.is) {
                check_is(&ctx, g, w);
            }
            if let (Some(g), Some(w)) = (got.rs, wm.rs) {
                check_rs(&ctx, g, w);
            }
        }
    }
}

#[test]
fn bypass_policy_loss_matches_core() {
    let mut rng = Rng::new(34);
    for (b, s) in SHAPES {
        let d = Dims::new(b, s);
        for (i, rs) in rs_configs().into_iter().enumerate() {
            for reinforce in [false, true] {
                let correction = RolloutCorrectionConfig {
                    is: (i % 2 == 1).then(|| is_configs()[i]),
                    rs: (i != 3).then_some(rs),
                };
                let agg = AggMode::ALL[i % AggMode::ALL.len()];
                let cfg = if reinforce {
                    BypassConfig::new(
                        BypassLoss::Reinforce,
                        correction,
                        agg,
                        GlobalNorm::default(),
                    )
                } else {
                    BypassConfig::verl_ppo_clip(
                        0.2,
                        0.28,
                        3.0,
                        correction,
                        agg,
                        GlobalNorm::default(),
                    )
                }
                .unwrap();
                let lp = rng.vec(d.len(), -3.0, -0.05);
                let rl: Vec<f64> = lp
                    .iter()
                    .map(|&x| (x + rng.uniform(-0.3, 0.3)) as f32 as f64)
                    .collect();
                let adv = rng.vec(d.len(), -2.0, 2.0);
                let mask = rng.mask(d, 0.7);
                let out = bypass_policy_loss(
                    &cfg,
                    t2(&poison(&lp, &mask), d),
                    t2(&poison(&rl, &mask), d),
                    t2(&poison(&adv, &mask), d),
                    &m2(&mask, d),
                )
                .unwrap();
                let n = d.len();
                let (mut w, mut tok, mut aw, mut keep, mut rows, mut g) = (
                    vec![0.0; n],
                    vec![0.0; n],
                    vec![0.0; n],
                    vec![false; n],
                    vec![0.0; b],
                    vec![0.0; n],
                );
                let want = core::bypass_policy_loss(
                    &cfg,
                    d,
                    &lp,
                    &rl,
                    &adv,
                    &mask,
                    Some(&mut g),
                    BypassBuffers {
                        is_weights: &mut w,
                        keep: &mut keep,
                        tokens: &mut tok,
                        agg_weights: &mut aw,
                        rows: &mut rows,
                    },
                )
                .unwrap();
                let ctx = format!("reinforce={reinforce} {cfg:?} {b}x{s}");
                close(&format!("{ctx} loss"), &to_vec(out.loss), &[want.loss], TOL);
                close(&format!("{ctx} grad"), &to_vec(out.grad), &g, TOL);
                close(
                    &format!("{ctx} ppo_kl"),
                    &to_vec(out.ppo_kl),
                    &[want.ppo_kl],
                    TOL,
                );
                assert_eq!(out.pg_clipfrac.is_some(), want.pg_clipfrac.is_some());
                if let (Some(a), Some(w)) = (out.pg_clipfrac, want.pg_clipfrac) {
                    close(&format!("{ctx} clipfrac"), &to_vec(a), &[w], TOL);
                }
                if let (Some(a), Some(w)) = (out.pg_clipfrac_lower, want.pg_clipfrac_lower) {
                    close(&format!("{ctx} clipfrac_lower"), &to_vec(a), &[w], TOL);
                }
                assert_eq!(to_vec_bool(out.correction.keep), keep, "{ctx}");
            }
        }
    }
}

#[test]
fn vllm_ratio_matches_core() {
    let mut rng = Rng::new(35);
    for (b, s) in SHAPES {
        let d = Dims::new(b, s);
        for mode in [
            "token_truncate",
            "token_mask",
            "sequence_truncate",
            "sequence_mask",
        ] {
            for (lo, hi) in [(None, Some(1.3)), (Some(0.8), Some(1.2)), (Some(0.9), None)] {
                let cfg = VllmIsConfig::new(mode.parse().unwrap(), lo, hi).unwrap();
                let old = rng.vec(d.len(), -3.0, -0.05);
                let samp: Vec<f64> = old
                    .iter()
                    .map(|&x| (x + rng.uniform(-0.2, 0.2)) as f32 as f64)
                    .collect();
                let mask = rng.mask(d, 0.7);
                let (r, m) = vllm_importance_sampling_ratio(
                    &cfg,
                    t2(&poison(&old, &mask), d),
                    t2(&poison(&samp, &mask), d),
                    &m2(&mask, d),
                )
                .unwrap();
                let mut want = vec![0.0; if cfg.mode.is_sequence() { b } else { d.len() }];
                let wm =
                    core::vllm_importance_sampling_ratio(&cfg, d, &old, &samp, &mask, &mut want)
                        .unwrap();
                let ctx = format!("{cfg:?} {b}x{s}");
                close(&format!("{ctx} ratio"), &to_vec(r), &want, TOL);
                let m = vllm_metrics_to_host(m);
                assert_eq!(m.num_items, wm.num_items);
                for (n, a, w) in [
                    ("dmean", m.logp_difference_mean, wm.logp_difference_mean),
                    ("dmax", m.logp_difference_max, wm.logp_difference_max),
                    ("rmin", m.ratio_min, wm.ratio_min),
                    ("rmean", m.ratio_mean, wm.ratio_mean),
                    ("rmax", m.ratio_max, wm.ratio_max),
                ] {
                    close(&format!("{ctx} {n}"), &[a], &[w], TOL);
                }
            }
        }
    }
}

/// A sampler log-prob vLLM could not score (NaN) on valid tokens, both
/// [`NanSamplerLogProbs`] choices: the ratio and every metric as the core's
/// (NaN where the core has NaN), with NaN/±inf padding.
#[test]
fn vllm_ratio_nan_sampler_log_probs_match_core() {
    let mut rng = Rng::new(36);
    for (b, s) in SHAPES {
        let d = Dims::new(b, s);
        for mode in [
            "token_truncate",
            "token_mask",
            "sequence_truncate",
            "sequence_mask",
        ] {
            for nan in [
                NanSamplerLogProbs::Propagate,
                NanSamplerLogProbs::AsOnPolicy,
            ] {
                let cfg = VllmIsConfig::new(mode.parse().unwrap(), Some(0.8), Some(1.3))
                    .unwrap()
                    .with_nan_sampler_log_probs(nan);
                let old = rng.vec(d.len(), -3.0, -0.05);
                let mut samp: Vec<f64> = old
                    .iter()
                    .map(|&x| (x + rng.uniform(-0.2, 0.2)) as f32 as f64)
                    .collect();
                let mask = rng.mask(d, 0.7);
                // Row 0's first token (always valid) and a few others.
                for t in (0..d.len()).step_by(3) {
                    samp[t] = f64::NAN;
                }
                let (r, m) = vllm_importance_sampling_ratio(
                    &cfg,
                    t2(&poison(&old, &mask), d),
                    t2(&poison(&samp, &mask), d),
                    &m2(&mask, d),
                )
                .unwrap();
                let mut want = vec![0.0; if cfg.mode.is_sequence() { b } else { d.len() }];
                let wm =
                    core::vllm_importance_sampling_ratio(&cfg, d, &old, &samp, &mask, &mut want)
                        .unwrap();
                let ctx = format!("{cfg:?} {b}x{s}");
                let r = to_vec(r);
                close(&format!("{ctx} ratio"), &r, &want, TOL);
                assert_eq!(
                    r.iter().any(|v| v.is_nan()),
                    nan == NanSamplerLogProbs::Propagate,
                    "{ctx}: {r:?}"
                );
                let m = vllm_metrics_to_host(m);
                assert_eq!(m.num_items, wm.num_items);
                let mut metrics = vec![
                    ("rmin", m.ratio_min, wm.ratio_min),
                    ("rmean", m.ratio_mean, wm.ratio_mean),
                    ("rmax", m.ratio_max, wm.ratio_max),
                    ("dmean", m.logp_difference_mean, wm.logp_difference_mean),
                ];
                // burn's `max` skips NaN on some backends; TRL 1.16.0 has none to skip.
                if nan == NanSamplerLogProbs::AsOnPolicy {
                    metrics.push(("dmax", m.logp_difference_max, wm.logp_difference_max));
                }
                for (n, a, w) in metrics {
                    close(&format!("{ctx} {n}"), &[a], &[w], TOL);
                    if nan == NanSamplerLogProbs::AsOnPolicy {
                        assert!(a.is_finite(), "{ctx} {n} = {a}");
                    }
                }
            }
        }
    }
}

#[test]
fn rollout_errors_are_typed() {
    let d = Dims::new(2, 3);
    let x = vec![0.0; 6];
    let mask = vec![true; 6];
    let cfg = IsConfig::new(IsLevel::Token, IsThreshold::truncate(2.0).unwrap(), false).unwrap();
    let r = rollout_correction_weights(&cfg, t2(&x, Dims::new(3, 2)), &m2(&mask, d));
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch {
            input: "log_ratio",
            ..
        })
    ));
    let rs = RsConfig::parse("token_k1", "2.0").unwrap();
    let r = rollout_rejection_mask(&rs, t2(&x, Dims::new(1, 6)), &m2(&mask, d));
    assert!(matches!(r, Err(Error::ShapeMismatch { .. })));
    let bad = IsConfig {
        threshold: IsThreshold {
            upper: -1.0,
            lower: None,
        },
        ..cfg
    };
    let r = rollout_correction_weights(&bad, t2(&x, d), &m2(&mask, d));
    assert!(matches!(r, Err(Error::OutOfRange { .. })));
}

#[test]
fn all_masked_gives_zeros() {
    let d = Dims::new(2, 3);
    let x = vec![f64::NAN; 6];
    let mask = vec![false; 6];
    let cfg = IsConfig::new(IsLevel::Sequence, IsThreshold::truncate(2.0).unwrap(), true).unwrap();
    let (w, m) = rollout_correction_weights(&cfg, t2(&x, d), &m2(&mask, d)).unwrap();
    assert!(to_vec(w).iter().all(|&v| v == 0.0));
    let m = is_metrics_to_host(m);
    assert_eq!((m.mean, m.batch_norm_factor), (0.0, Some(1.0)));
}
