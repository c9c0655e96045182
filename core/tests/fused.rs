//! The fused kernels against the reference drivers they replace.

use posttrain_core::aggregate::{aggregate, AggMode, GlobalNorm};
use posttrain_core::fused::{
    log_probs_entropy, log_probs_entropy_backward, token_loss, token_loss_per_token, KlPenalty,
    TokenLoss, TokenLossPerToken,
};
use posttrain_core::kl::{KlConfig, KlEstimator};
use posttrain_core::logits::{entropy_from_logits, gather_log_softmax, Temperature};
use posttrain_core::policy::token::{
    policy_loss, PolicyBatch, PolicyLoss, PolicyLossMode, VerlPolicyParams,
};
use posttrain_core::{Dims, Error, Preset, Real};

/// xorshift64*: a tiny seeded generator for the inputs.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unif(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unif().max(1e-300), self.unif());
        (-2.0 * u.ln()).sqrt() * (2.0 * core::f64::consts::PI * v).cos()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn exp_branch_free_f32_is_within_two_ulp_of_libm() {
    let ulp = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
    let mut worst = 0;
    let mut x = -104.0f32;
    while x <= 89.0 {
        let fast = x.exp_branch_free();
        let libm = x.exp();
        if libm < f32::MIN_POSITIVE {
            assert!((fast - libm).abs() <= 1e-44, "x = {x}: {fast} vs {libm}");
        } else {
            worst = worst.max(ulp(fast, libm));
            assert!(ulp(fast, libm) <= 2, "x = {x}: {fast} vs {libm}");
        }
        x += 1.0 / 4096.0;
    }
    eprintln!("worst ulp distance: {worst}");
    assert_eq!(f32::INFINITY.exp_branch_free(), f32::INFINITY);
    assert_eq!(f32::NEG_INFINITY.exp_branch_free(), 0.0);
    assert_eq!(88.8f32.exp_branch_free(), f32::INFINITY);
    assert_eq!((-104.0f32).exp_branch_free(), 0.0);
    assert!(f32::NAN.exp_branch_free().is_nan());
    assert_eq!(0.0f32.exp_branch_free(), 1.0);
}

#[test]
fn exp_flush_subnormal_f32_is_within_two_ulp_of_libm_and_flushes_below_the_normals() {
    let ulp = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
    let (mut worst, mut flushed) = (0, 0);
    let mut x = -104.0f32;
    while x <= 88.0 {
        let fast = x.exp_flush_subnormal();
        let libm = x.exp();
        if libm < f32::MIN_POSITIVE {
            // subnormal results: flushed to 0, or the normal path's product
            assert!(
                (fast - libm).abs() <= f32::MIN_POSITIVE,
                "x = {x}: {fast} vs {libm}"
            );
            flushed += usize::from(fast == 0.0);
        } else {
            worst = worst.max(ulp(fast, libm));
            assert!(ulp(fast, libm) <= 2, "x = {x}: {fast} vs {libm}");
        }
        x += 1.0 / 4096.0;
    }
    eprintln!("worst ulp distance: {worst}");
    assert!(flushed > 0);
    assert_eq!((-88.0f32).exp_flush_subnormal(), 0.0);
    assert_eq!(f32::NEG_INFINITY.exp_flush_subnormal(), 0.0);
    assert_eq!(f32::INFINITY.exp_flush_subnormal(), f32::INFINITY);
    assert_eq!(88.5f32.exp_flush_subnormal(), f32::INFINITY);
    assert!(f32::NAN.exp_flush_subnormal().is_nan());
    assert_eq!(0.0f32.exp_flush_subnormal(), 1.0);
    assert_eq!(f64::NEG_INFINITY.exp_flush_subnormal(), 0.0);
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * (1.0 + a.abs().max(b.abs()))
}

struct TokenCase<F> {
    dims: Dims,
    lp: Vec<F>,
    old: Vec<F>,
    refp: Vec<F>,
    adv: Vec<F>,
    isw: Vec<F>,
    mask: Vec<bool>,
}

fn token_case<F: Real>(rng: &mut Rng, batch: usize, seq: usize) -> TokenCase<F> {
    let dims = Dims::new(batch, seq);
    let n = dims.len();
    let mut c = TokenCase {
        dims,
        lp: vec![],
        old: vec![],
        refp: vec![],
        adv: vec![],
        isw: vec![],
        mask: vec![],
    };
    for r in 0..batch {
        let a = rng.normal();
        // prefix-valid rows with holes; some rows fully masked
        let len = if rng.below(7) == 0 {
            0
        } else {
            1 + rng.below(seq)
        };
        for j in 0..seq {
            let valid = j < len && rng.below(10) != 0;
            let x = -(rng.normal().abs() * 2.0);
            c.mask.push(valid);
            if valid {
                c.lp.push(F::of(x));
                c.old.push(F::of(x + 0.3 * rng.normal()));
                c.refp.push(F::of(x + 0.3 * rng.normal()));
                c.adv.push(F::of(a + 0.1 * (r as f64)));
                c.isw.push(F::of(0.5 + rng.unif()));
            } else {
                // padding holds garbage: it must never reach a value or gradient
                let junk = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e30];
                c.lp.push(F::of(junk[rng.below(4)]));
                c.old.push(F::of(junk[rng.below(4)]));
                c.refp.push(F::of(junk[rng.below(4)]));
                c.adv.push(F::of(junk[rng.below(4)]));
                c.isw.push(F::of(junk[rng.below(4)]));
            }
        }
    }
    assert_eq!(c.lp.len(), n);
    c
}

fn token_local_losses() -> Vec<PolicyLoss> {
    let p = VerlPolicyParams {
        clip_ratio_low: Some(0.2),
        clip_ratio_high: Some(0.28),
        dro_beta: Some(0.1),
        ..VerlPolicyParams::default()
    };
    [
        "vanilla", "dppo_tv", "dppo_kl", "sapo", "gpg", "dro", "cispo",
    ]
    .iter()
    .map(|m| PolicyLoss::from_verl(m.parse::<PolicyLossMode>().unwrap(), &p).unwrap())
    .collect()
}

/// The reference chain: policy_loss + KL estimate + aggregate.
fn reference<F: Real>(
    cfg: &TokenLoss,
    batch: &PolicyBatch<'_, F>,
    refp: &[F],
) -> (f64, f64, f64, [f64; 3], Vec<f64>) {
    let n = batch.dims.len();
    let mut scratch = vec![F::zero(); PolicyLoss::scratch_len(batch.dims)];
    let mut g = vec![F::zero(); n];
    let out = policy_loss(
        &cfg.loss,
        cfg.agg,
        &cfg.norm,
        batch,
        &mut scratch,
        Some((F::one(), &mut g)),
    )
    .unwrap();
    let mut grad: Vec<f64> = g.iter().map(|v| v.to_f64()).collect();
    let mut kl_loss = 0.0;
    if let Some(k) = &cfg.kl {
        let mut est = vec![F::zero(); n];
        let mut dk = vec![F::zero(); n];
        let ones = vec![F::one(); n];
        k.estimator
            .estimate_slices(batch.log_prob, refp, &mut est, Some((&ones, &mut dk)))
            .unwrap();
        let mut w = vec![F::zero(); n];
        kl_loss = aggregate(
            cfg.agg,
            &cfg.norm,
            batch.dims,
            &est,
            batch.mask,
            Some(&mut w),
        )
        .unwrap()
        .to_f64();
        for i in 0..n {
            if batch.mask[i] {
                grad[i] += k.coef * (w[i] * dk[i]).to_f64();
            }
        }
    }
    let coef = cfg.kl.map_or(0.0, |k| k.coef);
    let pl = out.loss.to_f64();
    (
        pl + coef * kl_loss,
        pl,
        kl_loss,
        [
            out.clipfrac.to_f64(),
            out.clipfrac_lower.to_f64(),
            out.approx_kl.to_f64(),
        ],
        grad,
    )
}

fn check_token_loss<F: Real>(rel: f64, seed: u64) {
    let mut rng = Rng(seed);
    let kls = [
        None,
        Some(KlPenalty {
            estimator: KlConfig::preset(KlEstimator::K3, Preset::Verl),
            coef: 0.001,
        }),
        Some(KlPenalty {
            estimator: KlConfig::new(KlEstimator::K1),
            coef: 0.1,
        }),
        Some(KlPenalty {
            estimator: KlConfig::new(KlEstimator::Abs),
            coef: 0.05,
        }),
        Some(KlPenalty {
            estimator: KlConfig::parse_verl("k2+").unwrap(),
            coef: 0.2,
        }),
    ];
    let mut cases = 0;
    for loss in token_local_losses() {
        for agg in AggMode::ALL {
            for kl in kls {
                let (b, t) = (1 + rng.below(6), 1 + rng.below(40));
                let c = token_case::<F>(&mut rng, b, t);
                let with_is = rng.below(2) == 0;
                let batch = PolicyBatch {
                    dims: c.dims,
                    log_prob: &c.lp,
                    old_log_prob: &c.old,
                    advantages: &c.adv,
                    mask: &c.mask,
                    is_weights: with_is.then_some(&c.isw[..]),
                };
                let cfg = TokenLoss {
                    loss,
                    agg,
                    norm: GlobalNorm::default(),
                    kl,
                };
                let (l, pl, kll, metrics, g_ref) = reference(&cfg, &batch, &c.refp);
                let mut g = vec![F::zero(); c.dims.len()];
                let out =
                    token_loss(&cfg, &batch, Some(&c.refp), Some((F::one(), &mut g))).unwrap();
                let what = format!("{loss:?} {agg:?} {kl:?} is={with_is}");
                assert!(
                    close(out.loss.to_f64(), l, rel),
                    "{what}: loss {} vs {l}",
                    out.loss
                );
                assert!(close(out.policy.loss.to_f64(), pl, rel), "{what}: pg");
                assert!(close(out.kl_loss.to_f64(), kll, rel), "{what}: kl");
                let got = [
                    out.policy.clipfrac.to_f64(),
                    out.policy.clipfrac_lower.to_f64(),
                    out.policy.approx_kl.to_f64(),
                ];
                for k in 0..3 {
                    assert!(
                        close(got[k], metrics[k], rel),
                        "{what}: metric {k}: {got:?} vs {metrics:?}"
                    );
                }
                let scale = g_ref.iter().fold(0.0f64, |a, v| a.max(v.abs()));
                for i in 0..g.len() {
                    let gi = g[i].to_f64();
                    assert!(gi.is_finite(), "{what}: grad[{i}] = {gi}");
                    assert!(
                        (gi - g_ref[i]).abs() <= rel * (scale + 1e-30) * 4.0,
                        "{what}: grad[{i}] {gi} vs {}",
                        g_ref[i]
                    );
                    if !c.mask[i] {
                        assert_eq!(gi, 0.0);
                    }
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 7 * 5 * 5);
}

#[test]
fn token_loss_matches_the_reference_chain_f64() {
    check_token_loss::<f64>(1e-12, 0x9e37_79b9_7f4a_7c15);
}

#[test]
fn token_loss_matches_the_reference_chain_f32() {
    check_token_loss::<f32>(1e-5, 0x1234_5678_9abc_def1);
}

/// Rows longer than the kernel's 256-token blocks, with whole blocks of
/// padding at the start, in the middle (packed sequences) and at the end:
/// the blocks of padding are skipped, so their garbage must not reach a
/// value, and their gradient (the buffer starts as NaN) must come out 0.
fn check_token_loss_over_padding_blocks<F: Real>(rel: f64) {
    let seq = 1100;
    // (valid ranges) per row
    let rows: [&[(usize, usize)]; 5] = [
        &[(0, 300), (900, 1000)],
        &[(700, 1100)],
        &[(0, 1100)],
        &[],
        &[(255, 257), (600, 601)],
    ];
    let mut rng = Rng(77);
    let dims = Dims::new(rows.len(), seq);
    let n = dims.len();
    let (mut lp, mut old, mut refp, mut adv, mut isw, mut mask) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (r, spans) in rows.iter().enumerate() {
        for j in 0..seq {
            let valid = spans.iter().any(|&(a, b)| (a..b).contains(&j));
            mask.push(valid);
            if valid {
                let x = -(rng.normal().abs() * 2.0);
                lp.push(F::of(x));
                old.push(F::of(x + 0.3 * rng.normal()));
                refp.push(F::of(x + 0.3 * rng.normal()));
                adv.push(F::of(rng.normal() + 0.1 * r as f64));
                isw.push(F::of(0.5 + rng.unif()));
            } else {
                let junk = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e30];
                lp.push(F::of(junk[rng.below(4)]));
                old.push(F::of(junk[rng.below(4)]));
                refp.push(F::of(junk[rng.below(4)]));
                adv.push(F::of(junk[rng.below(4)]));
                isw.push(F::of(junk[rng.below(4)]));
            }
        }
    }
    let kl = Some(KlPenalty {
        estimator: KlConfig::preset(KlEstimator::K3, Preset::Verl),
        coef: 0.001,
    });
    for loss in token_local_losses() {
        for with_is in [false, true] {
            let batch = PolicyBatch {
                dims,
                log_prob: &lp,
                old_log_prob: &old,
                advantages: &adv,
                mask: &mask,
                is_weights: with_is.then_some(&isw[..]),
            };
            let cfg = TokenLoss {
                loss,
                agg: AggMode::SeqMeanTokenMean,
                norm: GlobalNorm::default(),
                kl,
            };
            let (l, _, _, metrics, g_ref) = reference(&cfg, &batch, &refp);
            let mut g = vec![F::of(f64::NAN); n];
            let out = token_loss(&cfg, &batch, Some(&refp), Some((F::one(), &mut g))).unwrap();
            let what = format!("{loss:?} is={with_is}");
            assert!(
                close(out.loss.to_f64(), l, rel),
                "{what}: loss {} vs {l}",
                out.loss
            );
            let got = [
                out.policy.clipfrac.to_f64(),
                out.policy.clipfrac_lower.to_f64(),
                out.policy.approx_kl.to_f64(),
            ];
            for k in 0..3 {
                assert!(close(got[k], metrics[k], rel), "{what}: metric {k}");
            }
            let scale = g_ref.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            for i in 0..n {
                let gi = g[i].to_f64();
                assert!(
                    (gi - g_ref[i]).abs() <= rel * (scale + 1e-30) * 4.0,
                    "{what}: grad[{i}] {gi} vs {}",
                    g_ref[i]
                );
                if !mask[i] {
                    assert_eq!(gi.to_bits(), 0.0f64.to_bits(), "{what}: grad[{i}]");
                }
            }
            // Forward only (no gradient buffer) gives the same loss.
            let fwd = token_loss(&cfg, &batch, Some(&refp), None).unwrap();
            assert_eq!(
                fwd.loss.to_f64().to_bits(),
                out.loss.to_f64().to_bits(),
                "{what}"
            );
        }
    }
}

#[test]
fn token_loss_over_padding_blocks_matches_the_reference_chain() {
    check_token_loss_over_padding_blocks::<f64>(1e-10);
    check_token_loss_over_padding_blocks::<f32>(2e-4);
}

/// `token_loss_per_token` (and its parallel driver): each term's per-token
/// loss and gradient against the per-position kernels and the reference
/// drivers; the loss and total gradient bitwise those of `token_loss`.
fn check_token_loss_per_token<F: Real>(rel: f64, seed: u64) {
    use posttrain_core::aggregate::aggregation_weights;
    let mut rng = Rng(seed);
    let kls = [
        None,
        Some(KlPenalty {
            estimator: KlConfig::preset(KlEstimator::K3, Preset::Verl),
            coef: 0.001,
        }),
        Some(KlPenalty {
            estimator: KlConfig::parse_verl("k2+").unwrap(),
            coef: 0.2,
        }),
    ];
    for loss in token_local_losses() {
        for agg in [
            AggMode::TokenMean,
            AggMode::SeqMeanTokenMean,
            AggMode::SeqMeanTokenSumNorm,
        ] {
            for kl in kls {
                // Rows long enough for several blocks, some of padding only.
                let (b, t) = (1 + rng.below(5), 1 + rng.below(700));
                let c = token_case::<F>(&mut rng, b, t);
                let with_is = rng.below(2) == 0;
                let batch = PolicyBatch {
                    dims: c.dims,
                    log_prob: &c.lp,
                    old_log_prob: &c.old,
                    advantages: &c.adv,
                    mask: &c.mask,
                    is_weights: with_is.then_some(&c.isw[..]),
                };
                let cfg = TokenLoss {
                    loss,
                    agg,
                    norm: GlobalNorm::default(),
                    kl,
                };
                let n = c.dims.len();
                let what = format!("{loss:?} {agg:?} {kl:?} is={with_is} [{b}, {t}]");
                let kl_n = if kl.is_some() { n } else { 0 };
                let nan = F::of(f64::NAN);
                let (mut pl, mut pg, mut kv, mut kg) =
                    (vec![nan; n], vec![nan; n], vec![nan; kl_n], vec![nan; kl_n]);
                let mut g = vec![nan; n];
                let out = token_loss_per_token(
                    &cfg,
                    &batch,
                    Some(&c.refp),
                    Some((F::one(), &mut g)),
                    TokenLossPerToken {
                        policy_loss: &mut pl,
                        policy_grad: &mut pg,
                        kl: &mut kv,
                        kl_grad: &mut kg,
                    },
                )
                .unwrap();
                // The loss and gradient are token_loss's, bit for bit.
                let mut g0 = vec![F::zero(); n];
                let out0 =
                    token_loss(&cfg, &batch, Some(&c.refp), Some((F::one(), &mut g0))).unwrap();
                assert_eq!(
                    out.loss.to_f64().to_bits(),
                    out0.loss.to_f64().to_bits(),
                    "{what}"
                );
                assert!(
                    g.iter()
                        .zip(&g0)
                        .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits()),
                    "{what}"
                );
                // The policy term against the per-position kernel and the reference driver.
                let mut scratch = vec![F::zero(); PolicyLoss::scratch_len(c.dims)];
                let mut pg_ref = vec![F::zero(); n];
                policy_loss(
                    &cfg.loss,
                    agg,
                    &cfg.norm,
                    &batch,
                    &mut scratch,
                    Some((F::one(), &mut pg_ref)),
                )
                .unwrap();
                let scale = |v: &[F]| v.iter().fold(1e-30f64, |a, x| a.max(x.to_f64().abs()));
                let (s_pl, s_pg) = (scale(&pl), scale(&pg_ref));
                for i in 0..n {
                    let want = if c.mask[i] {
                        let tok =
                            loss.token(c.lp[i].to_f64(), c.old[i].to_f64(), c.adv[i].to_f64());
                        tok.loss * if with_is { c.isw[i].to_f64() } else { 1.0 }
                    } else {
                        0.0
                    };
                    let got = pl[i].to_f64();
                    assert!(
                        (got - want).abs() <= rel * 4.0 * s_pl.max(want.abs()),
                        "{what}: policy_loss[{i}] {got} vs {want}"
                    );
                    let (got, want) = (pg[i].to_f64(), pg_ref[i].to_f64());
                    assert!(
                        (got - want).abs() <= rel * 4.0 * s_pg,
                        "{what}: policy_grad[{i}] {got} vs {want}"
                    );
                    if !c.mask[i] {
                        assert_eq!(
                            (pl[i].to_f64(), pg[i].to_f64()),
                            (0.0, 0.0),
                            "{what}: [{i}]"
                        );
                    }
                }
                // The KL term against the estimator and the aggregation weights.
                if let Some(k) = kl {
                    let mut est = vec![F::zero(); n];
                    let mut dk = vec![F::zero(); n];
                    let ones = vec![F::one(); n];
                    k.estimator
                        .estimate_slices(&c.lp, &c.refp, &mut est, Some((&ones, &mut dk)))
                        .unwrap();
                    let mut w = vec![F::zero(); n];
                    aggregation_weights(agg, &cfg.norm, c.dims, &c.mask, &mut w).unwrap();
                    for i in 0..n {
                        let (want_v, want_g) = if c.mask[i] {
                            (est[i].to_f64(), (w[i] * dk[i]).to_f64())
                        } else {
                            (0.0, 0.0)
                        };
                        let (got_v, got_g) = (kv[i].to_f64(), kg[i].to_f64());
                        assert!(
                            close(got_v, want_v, rel * 4.0) || (got_v - want_v).abs() < 1e-30,
                            "{what}: kl[{i}] {got_v} vs {want_v}"
                        );
                        assert!(
                            (got_g - want_g).abs() <= rel * 4.0 * want_g.abs().max(1e-30) + 1e-30,
                            "{what}: kl_grad[{i}] {got_g} vs {want_g}"
                        );
                    }
                }
                // The parallel driver: the same bits.
                #[cfg(feature = "parallel")]
                for threads in [2, 3] {
                    use posttrain_core::fused::parallel;
                    let (mut pl2, mut pg2, mut kv2, mut kg2) =
                        (vec![nan; n], vec![nan; n], vec![nan; kl_n], vec![nan; kl_n]);
                    let mut g2 = vec![nan; n];
                    let out2 = parallel::token_loss_per_token(
                        &cfg,
                        &batch,
                        Some(&c.refp),
                        Some((F::one(), &mut g2)),
                        TokenLossPerToken {
                            policy_loss: &mut pl2,
                            policy_grad: &mut pg2,
                            kl: &mut kv2,
                            kl_grad: &mut kg2,
                        },
                        threads,
                    )
                    .unwrap();
                    assert_eq!(out2, out, "{what} threads {threads}");
                    let bits = |v: &[F]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&g2), bits(&g), "{what} threads {threads}");
                    assert_eq!(bits(&pl2), bits(&pl), "{what} threads {threads}");
                    assert_eq!(bits(&pg2), bits(&pg), "{what} threads {threads}");
                    assert_eq!(bits(&kv2), bits(&kv), "{what} threads {threads}");
                    assert_eq!(bits(&kg2), bits(&kg), "{what} threads {threads}");
                }
            }
        }
    }
}

#[test]
fn token_loss_per_token_matches_the_kernels_and_the_reference_drivers() {
    check_token_loss_per_token::<f64>(1e-12, 0x5eed_0001);
    check_token_loss_per_token::<f32>(1e-5, 0x5eed_0002);
}

#[test]
fn token_loss_per_token_refuses_wrong_lengths() {
    let c = token_case::<f64>(&mut Rng(5), 2, 8);
    let batch = PolicyBatch {
        dims: c.dims,
        log_prob: &c.lp,
        old_log_prob: &c.old,
        advantages: &c.adv,
        mask: &c.mask,
        is_weights: None,
    };
    let kl = Some(KlPenalty {
        estimator: KlConfig::new(KlEstimator::K1),
        coef: 0.1,
    });
    let cfg = TokenLoss {
        loss: token_local_losses()[0],
        agg: AggMode::TokenMean,
        norm: GlobalNorm::default(),
        kl,
    };
    let (mut pl, mut pg, mut short) = (vec![0.0; 16], vec![0.0; 16], vec![0.0; 15]);
    // A KL penalty needs the KL slices.
    let per = TokenLossPerToken {
        policy_loss: &mut pl,
        policy_grad: &mut pg,
        kl: &mut [],
        kl_grad: &mut [],
    };
    let err = token_loss_per_token(&cfg, &batch, Some(&c.refp), None, per).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    let per = TokenLossPerToken {
        policy_loss: &mut short,
        policy_grad: &mut pg,
        kl: &mut [],
        kl_grad: &mut [],
    };
    let cfg_no_kl = TokenLoss { kl: None, ..cfg };
    let err = token_loss_per_token(&cfg_no_kl, &batch, None, None, per).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn token_loss_refuses_cross_token_variants_and_bad_input() {
    let dims = Dims::new(1, 2);
    let batch = PolicyBatch {
        dims,
        log_prob: &[-1.0f64, -2.0],
        old_log_prob: &[-1.0, -2.0],
        advantages: &[1.0, 1.0],
        mask: &[true, true],
        is_weights: None,
    };
    let mut cfg = TokenLoss {
        loss: PolicyLoss::from_verl(PolicyLossMode::Gspo, &VerlPolicyParams::default()).unwrap(),
        agg: AggMode::TokenMean,
        norm: GlobalNorm::default(),
        kl: None,
    };
    assert!(matches!(
        token_loss(&cfg, &batch, None, None),
        Err(Error::Invalid { input: "loss", .. })
    ));
    cfg.loss = token_local_losses()[0];
    cfg.kl = Some(KlPenalty {
        estimator: KlConfig::new(KlEstimator::K3),
        coef: 0.1,
    });
    assert!(matches!(
        token_loss(&cfg, &batch, None, None),
        Err(Error::Invalid {
            input: "ref_log_prob",
            ..
        })
    ));
    let mut g = [0.0; 3];
    assert!(matches!(
        token_loss(&cfg, &batch, Some(&[0.0, 0.0]), Some((1.0, &mut g))),
        Err(Error::ShapeMismatch { input: "grad", .. })
    ));
    cfg.kl.as_mut().unwrap().coef = f64::NAN;
    assert!(matches!(
        token_loss(&cfg, &batch, Some(&[0.0, 0.0]), None),
        Err(Error::OutOfRange {
            param: "kl_loss_coef",
            ..
        })
    ));
}

fn logits_case<F: Real>(rng: &mut Rng, rows: usize, vocab: usize) -> (Vec<F>, Vec<i64>) {
    let mut z = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        let kind = r % 7;
        for k in 0..vocab {
            let v = match kind {
                // ±1e30 rows with one maximum (ties at 1e30: see the test below)
                3 if k == 0 => 1e30,
                3 => [-1e30, 0.0][rng.below(2)],
                // −inf entries (masked vocabulary)
                4 if k % 3 == 0 => f64::NEG_INFINITY,
                // a +inf or NaN: the reference's IEEE answer
                5 if k == vocab / 2 => [f64::INFINITY, f64::NAN][rng.below(2)],
                6 => 30.0 * rng.normal(),
                _ => 3.0 * rng.normal(),
            };
            z.push(F::of(v));
        }
    }
    let mut t: Vec<i64> = (0..rows).map(|_| rng.below(vocab) as i64).collect();
    // the −inf rows' target must be a finite entry for a finite answer; keep one −inf target too
    for (r, id) in t.iter_mut().enumerate() {
        if r % 7 == 4 && r % 2 == 0 {
            *id = 1.min(vocab as i64 - 1);
        }
    }
    (z, t)
}

#[test]
fn entropy_of_tied_huge_logits_is_exact() {
    // k logits tied at 1e30: the entropy is ln k. The reference kernel (and
    // every peer: lse − Σ p·z) loses ln k to rounding next to 1e30 and says 0;
    // the online form measures everything from the max and keeps it.
    let z = [
        1e30f64, 1e30, -1e30, 1e30, 0.0, 1e30, 1e30, 1e30, 1e30, 1e30,
    ];
    let (mut lp, mut h, mut lse) = ([0.0; 1], [0.0; 1], [0.0; 1]);
    log_probs_entropy(&z, 1, 10, Temperature::ONE, &[0], &mut lp, &mut h, &mut lse).unwrap();
    assert!((h[0] - 8f64.ln()).abs() < 1e-12, "{}", h[0]);
    let mut h_ref = [0.0];
    entropy_from_logits(&z, 1, 10, &mut h_ref, None).unwrap();
    assert_eq!(h_ref[0], 0.0);
}

fn same(a: f64, b: f64, rel: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || close(a, b, rel)
}

fn check_logits<F: Real>(rel: f64, seed: u64) {
    let mut rng = Rng(seed);
    for &(rows, vocab) in &[(1, 1), (3, 7), (14, 8), (15, 33), (21, 100), (7, 1000)] {
        for temp in [1.0, 0.7] {
            let t = Temperature::new(temp).unwrap();
            let (z, ids) = logits_case::<F>(&mut rng, rows, vocab);
            let (mut lp, mut h, mut lse) = (
                vec![F::zero(); rows],
                vec![F::zero(); rows],
                vec![F::zero(); rows],
            );
            log_probs_entropy(&z, rows, vocab, t, &ids, &mut lp, &mut h, &mut lse).unwrap();
            let mut lp_ref = vec![F::zero(); rows];
            gather_log_softmax(&z, rows, vocab, t, 1, &ids, &mut lp_ref, None).unwrap();
            // the reference entropy has no temperature: feed it z / T
            let zt: Vec<F> = z.iter().map(|&v| v / F::of(temp)).collect();
            let mut h_ref = vec![F::zero(); rows];
            entropy_from_logits(&zt, rows, vocab, &mut h_ref, None).unwrap();
            for r in 0..rows {
                let what = format!("rows {rows} vocab {vocab} T {temp} row {r}");
                assert!(
                    same(lp[r].to_f64(), lp_ref[r].to_f64(), rel),
                    "{what}: logp {} vs {}",
                    lp[r],
                    lp_ref[r]
                );
                assert!(
                    same(h[r].to_f64(), h_ref[r].to_f64(), rel),
                    "{what}: H {} vs {}",
                    h[r],
                    h_ref[r]
                );
            }
            // backward vs the two reference VJPs
            let c_lp: Vec<F> = (0..rows).map(|_| F::of(rng.normal())).collect();
            let c_h: Vec<F> = (0..rows).map(|_| F::of(rng.normal())).collect();
            let mut g = vec![F::zero(); rows * vocab];
            log_probs_entropy_backward(
                &z,
                rows,
                vocab,
                t,
                &ids,
                &lse,
                &h,
                &c_lp,
                Some(&c_h),
                &mut g,
            )
            .unwrap();
            let mut g1 = vec![F::zero(); rows * vocab];
            gather_log_softmax(
                &z,
                rows,
                vocab,
                t,
                1,
                &ids,
                &mut lp_ref,
                Some((&c_lp, &mut g1)),
            )
            .unwrap();
            let mut g2 = vec![F::zero(); rows * vocab];
            entropy_from_logits(&zt, rows, vocab, &mut h_ref, Some((&c_h, &mut g2))).unwrap();
            for r in 0..rows {
                let row = r * vocab..(r + 1) * vocab;
                let want: Vec<f64> = row
                    .clone()
                    .map(|i| g1[i].to_f64() + g2[i].to_f64() / temp)
                    .collect();
                let scale = want
                    .iter()
                    .filter(|v| v.is_finite())
                    .fold(0.0f64, |a, v| a.max(v.abs()));
                for (k, i) in row.enumerate() {
                    let (a, b) = (g[i].to_f64(), want[k]);
                    let ok = (a.is_nan() && b.is_nan())
                        || a == b
                        || (a - b).abs() <= rel * 4.0 * (scale + 1e-30);
                    assert!(
                        ok,
                        "rows {rows} vocab {vocab} T {temp} row {r} k {k}: grad {a} vs {b}"
                    );
                }
            }
        }
    }
}

#[test]
fn log_probs_entropy_matches_the_reference_kernels_f64() {
    check_logits::<f64>(1e-12, 7);
}

#[test]
fn log_probs_entropy_matches_the_reference_kernels_f32() {
    check_logits::<f32>(2e-5, 11);
}

#[test]
fn log_probs_entropy_rejects_bad_shapes_and_ids() {
    let z = [0.0f32; 8];
    let (mut a, mut b, mut c) = ([0.0f32; 2], [0.0f32; 2], [0.0f32; 2]);
    let t = Temperature::ONE;
    assert!(matches!(
        log_probs_entropy(&z, 2, 4, t, &[0, 4], &mut a, &mut b, &mut c),
        Err(Error::Invalid {
            input: "targets",
            ..
        })
    ));
    assert!(matches!(
        log_probs_entropy(&z, 2, 4, t, &[0], &mut a, &mut b, &mut c),
        Err(Error::ShapeMismatch {
            input: "targets",
            ..
        })
    ));
    assert!(matches!(
        log_probs_entropy(&z, 3, 4, t, &[0, 0, 0], &mut a, &mut b, &mut c),
        Err(Error::ShapeMismatch {
            input: "logits",
            ..
        })
    ));
    let mut g = [0.0f32; 7];
    assert!(matches!(
        log_probs_entropy_backward(&z, 2, 4, t, &[0, 1], &c, &b, &a, None, &mut g),
        Err(Error::ShapeMismatch { input: "grad", .. })
    ));
}

#[cfg(feature = "parallel")]
#[test]
fn parallel_drivers_are_bitwise_identical_for_every_thread_count() {
    use posttrain_core::fused::parallel;
    let mut rng = Rng(99);
    let c = token_case::<f32>(&mut rng, 37, 129);
    let batch = PolicyBatch {
        dims: c.dims,
        log_prob: &c.lp,
        old_log_prob: &c.old,
        advantages: &c.adv,
        mask: &c.mask,
        is_weights: Some(&c.isw),
    };
    let cfg = TokenLoss {
        loss: token_local_losses()[0],
        agg: AggMode::SeqMeanTokenMean,
        norm: GlobalNorm::default(),
        kl: Some(KlPenalty {
            estimator: KlConfig::preset(KlEstimator::K3, Preset::Verl),
            coef: 0.001,
        }),
    };
    let mut g0 = vec![0.0f32; c.dims.len()];
    let o0 = token_loss(&cfg, &batch, Some(&c.refp), Some((1.0, &mut g0))).unwrap();
    for threads in [1, 2, 3, 8, 64] {
        let mut g = vec![0.0f32; c.dims.len()];
        let o = parallel::token_loss(&cfg, &batch, Some(&c.refp), Some((1.0, &mut g)), threads)
            .unwrap();
        assert_eq!(o, o0, "threads {threads}");
        assert!(
            g.iter().zip(&g0).all(|(a, b)| a.to_bits() == b.to_bits()),
            "threads {threads}"
        );
    }
    let (rows, vocab) = (29, 301);
    let (z, ids) = logits_case::<f32>(&mut rng, rows, vocab);
    let t = Temperature::ONE;
    let (mut lp0, mut h0, mut l0) = (vec![0.0f32; rows], vec![0.0f32; rows], vec![0.0f32; rows]);
    log_probs_entropy(&z, rows, vocab, t, &ids, &mut lp0, &mut h0, &mut l0).unwrap();
    let c_lp: Vec<f32> = (0..rows).map(|_| rng.normal() as f32).collect();
    let mut g0 = vec![0.0f32; rows * vocab];
    log_probs_entropy_backward(
        &z,
        rows,
        vocab,
        t,
        &ids,
        &l0,
        &h0,
        &c_lp,
        Some(&c_lp),
        &mut g0,
    )
    .unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for threads in [1, 2, 3, 8, 64] {
        let (mut lp, mut h, mut l) = (vec![0.0f32; rows], vec![0.0f32; rows], vec![0.0f32; rows]);
        parallel::log_probs_entropy(&z, rows, vocab, t, &ids, &mut lp, &mut h, &mut l, threads)
            .unwrap();
        assert_eq!(
            (bits(&lp), bits(&h), bits(&l)),
            (bits(&lp0), bits(&h0), bits(&l0))
        );
        let mut g = vec![0.0f32; rows * vocab];
        parallel::log_probs_entropy_backward(
            &z,
            rows,
            vocab,
            t,
            &ids,
            &l,
            &h,
            &c_lp,
            Some(&c_lp),
            &mut g,
            threads,
        )
        .unwrap();
        assert_eq!(bits(&g), bits(&g0), "threads {threads}");
    }
}

#[test]
fn copy_streaming_copies_at_every_alignment_and_length() {
    fn check<F: Real>() {
        let src: Vec<F> = (0..80).map(|i| F::of(i as f64 * 0.25 - 3.0)).collect();
        for start in 0..5 {
            for len in [0, 1, 3, 4, 5, 16, 33, 64, 70] {
                let mut dst = vec![F::nan(); start + len + 3];
                F::copy_streaming(&src[7..7 + len], &mut dst[start..start + len]);
                F::stream_fence();
                assert!(
                    dst[..start].iter().all(|x| x.is_nan()),
                    "start {start} len {len}"
                );
                assert_eq!(&dst[start..start + len], &src[7..7 + len]);
                assert!(dst[start + len..].iter().all(|x| x.is_nan()));
            }
        }
    }
    check::<f32>();
    check::<f64>();
}

/// The parallel backward of a gradient past `STREAM_GRAD_BYTES` (8 MiB)
/// writes it with streaming stores; it must be the sequential (plain) one bit
/// for bit, wherever the gradient starts (an odd vocabulary puts the rows at
/// every alignment; the special rows take the reference path).
#[cfg(feature = "parallel")]
#[test]
fn parallel_streamed_gradient_is_bitwise_the_sequential_one() {
    use posttrain_core::fused::parallel;
    fn check<F: Real>(rows: usize, vocab: usize, seed: u64) {
        assert!(rows * vocab * core::mem::size_of::<F>() > 8 << 20);
        let mut rng = Rng(seed);
        let (z, ids) = logits_case::<F>(&mut rng, rows, vocab);
        let t = Temperature::new(0.7).unwrap();
        let zeros = || vec![F::zero(); rows];
        let (mut lp, mut h, mut l) = (zeros(), zeros(), zeros());
        parallel::log_probs_entropy(&z, rows, vocab, t, &ids, &mut lp, &mut h, &mut l, 2).unwrap();
        let c_lp: Vec<F> = (0..rows).map(|_| F::of(rng.normal())).collect();
        let c_h: Vec<F> = (0..rows).map(|_| F::of(rng.normal())).collect();
        let mut g0 = vec![F::zero(); rows * vocab];
        log_probs_entropy_backward(&z, rows, vocab, t, &ids, &l, &h, &c_lp, Some(&c_h), &mut g0)
            .unwrap();
        for (offset, threads) in [(0, 2), (1, 2), (3, 3)] {
            let mut buf = vec![F::nan(); rows * vocab + offset];
            let g = &mut buf[offset..];
            parallel::log_probs_entropy_backward(
                &z,
                rows,
                vocab,
                t,
                &ids,
                &l,
                &h,
                &c_lp,
                Some(&c_h),
                g,
                threads,
            )
            .unwrap();
            let same = g
                .iter()
                .zip(&g0)
                .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits());
            assert!(same, "offset {offset}, {threads} threads");
        }
    }
    check::<f32>(70, 30_011, 5);
    check::<f64>(36, 30_011, 6);
}

#[cfg(feature = "std")]
#[test]
fn vector_extensions_change_no_bit() {
    use posttrain_core::fused::{limit_vector_isa, use_simd_extensions, vector_isa, VectorIsa};
    let mut rng = Rng(5);
    let c = token_case::<f32>(&mut rng, 9, 700);
    let batch = PolicyBatch {
        dims: c.dims,
        log_prob: &c.lp,
        old_log_prob: &c.old,
        advantages: &c.adv,
        mask: &c.mask,
        is_weights: Some(&c.isw),
    };
    let (rows, vocab) = (23, 517);
    let (z, ids) = logits_case::<f32>(&mut rng, rows, vocab);
    let c_lp: Vec<f32> = (0..rows).map(|_| rng.normal() as f32).collect();
    let t = Temperature::new(0.8).unwrap();
    let run = |isa: VectorIsa| {
        limit_vector_isa(isa);
        assert!(vector_isa() <= isa);
        let mut out = vec![];
        for loss in token_local_losses() {
            for est in [
                KlEstimator::K1,
                KlEstimator::Abs,
                KlEstimator::K2,
                KlEstimator::K3,
            ] {
                let cfg = TokenLoss {
                    loss,
                    agg: AggMode::SeqMeanTokenMean,
                    norm: GlobalNorm::default(),
                    kl: Some(KlPenalty {
                        estimator: KlConfig::preset(est, Preset::Verl),
                        coef: 0.01,
                    }),
                };
                let mut g = vec![0.0f32; c.dims.len()];
                let o = token_loss(&cfg, &batch, Some(&c.refp), Some((1.0, &mut g))).unwrap();
                out.push(o.loss.to_bits());
                out.extend(g.iter().map(|x| x.to_bits()));
            }
        }
        let (mut lp, mut h, mut l) = (vec![0.0f32; rows], vec![0.0f32; rows], vec![0.0f32; rows]);
        log_probs_entropy(&z, rows, vocab, t, &ids, &mut lp, &mut h, &mut l).unwrap();
        let mut g = vec![0.0f32; rows * vocab];
        log_probs_entropy_backward(&z, rows, vocab, t, &ids, &l, &h, &c_lp, Some(&c_lp), &mut g)
            .unwrap();
        for v in [&lp, &h, &l, &g] {
            out.extend(v.iter().map(|x| x.to_bits()));
        }
        use_simd_extensions(true);
        out
    };
    let base = run(VectorIsa::Baseline);
    for isa in [VectorIsa::Avx2, VectorIsa::Avx512] {
        let wide = run(isa);
        assert_eq!(wide.len(), base.len());
        let diff = wide.iter().zip(&base).filter(|(a, b)| a != b).count();
        assert_eq!(
            diff, 0,
            "{diff} values differ between the {isa:?} and the baseline build"
        );
    }
    use_simd_extensions(false);
    assert_eq!(vector_isa(), VectorIsa::Baseline);
    use_simd_extensions(true);
}
