//! The GRPO family on tensors against the core's f64 slice drivers on seeded
//! random inputs (TRL's GRPO/GSPO/GMPO/RLOO/VESPO, torchtune's GRPO losses);
//! masked NaN changes nothing; typed errors. The backend is the one
//! `posttrain_burn::device()` picks.

use burn::tensor::{Bool, Int, Tensor, TensorData};
use posttrain_burn::grpo::{self as tg, GrpoTensors, IsRatio};
use posttrain_burn::{device, mask2, tensor1, tensor2, tensor3, to_vec, Device};
use posttrain_core::policy::grpo::{
    self as cg, AdaptiveEntropy, EntropyBonus, GmpoConfig, GrpoConfig, GrpoInputs, GrpoLossType,
    ImportanceSamplingLevel, RlooConfig, TokenOrRow, VespoGamma,
};
use posttrain_core::policy::rollout::NanSamplerLogProbs;
use posttrain_core::policy::sequence_mean::{
    self as cs, HiddenGrads, SequenceMeanConfig, SequenceMeanOutput, TokenCountGuard,
};
use posttrain_core::{Dims, Error};

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
    /// About `p` valid, row 0 fully valid, the last row fully masked (≥ 3 rows).
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

fn t1(v: &[f64]) -> Tensor<1> {
    tensor1(v, &dev())
}

fn s(t: Tensor<1>) -> f64 {
    to_vec(t)[0]
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

/// NaN / ±inf at every masked position of `v`.
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
// TRL GRPO family
// ---------------------------------------------------------------------------

struct Data {
    d: Dims,
    lp: Vec<f64>,
    old: Vec<f64>,
    rf: Vec<f64>,
    ent: Vec<f64>,
    mask: Vec<bool>,
    adv: Vec<f64>,
    is_tok: Vec<f64>,
    is_row: Vec<f64>,
    samp: Vec<f64>,
}

fn data(seed: u64, b: usize, t: usize) -> Data {
    let mut r = Rng::new(seed);
    let d = Dims::new(b, t);
    let lp = r.vec(d.len(), -3.0, -0.1);
    let old: Vec<f64> = lp
        .iter()
        .map(|&x| (x + r.uniform(-0.4, 0.4)) as f32 as f64)
        .collect();
    Data {
        d,
        rf: lp
            .iter()
            .map(|&x| (x + r.uniform(-0.5, 0.5)) as f32 as f64)
            .collect(),
        samp: lp
            .iter()
            .map(|&x| (x + r.uniform(-0.3, 0.3)) as f32 as f64)
            .collect(),
        ent: r.vec(d.len(), 0.0, 2.0),
        mask: r.mask(d, 0.7),
        adv: r.vec(b, -1.5, 1.5),
        is_tok: r.vec(d.len(), 0.5, 1.5),
        is_row: r.vec(b, 0.5, 1.5),
        lp,
        old,
    }
}

/// The configurations each loss type is run under.
fn grpo_configs(lt: GrpoLossType) -> Vec<(GrpoConfig, bool, bool)> {
    let mut out = Vec::new();
    for level in [
        ImportanceSamplingLevel::Token,
        ImportanceSamplingLevel::Sequence,
        ImportanceSamplingLevel::SequenceToken,
    ] {
        let mut c = GrpoConfig::trl(lt);
        c.level = level;
        c.eps_high = 0.28;
        if lt == GrpoLossType::Cispo {
            c.eps_high = 1.1;
        }
        out.push((c, false, false));
        // β with bias correction, δ, entropy mask, token IS, off-policy mask,
        // adaptive entropy bonus, evaluation mode, accumulation.
        let mut c2 = c;
        c2.beta = 0.05;
        c2.bias_correction_kl = true;
        c2.delta = Some(1.3);
        c2.top_entropy_quantile = 0.6;
        c2.vllm_is_correction = true;
        c2.off_policy_mask_threshold = Some(0.02);
        c2.norm.gradient_accumulation_steps = 2.0;
        c2.norm.num_items_in_batch = 9.0;
        c2.norm.num_processes = 2.0;
        c2.norm.max_completion_length = 12.0;
        c2.entropy_bonus = Some(EntropyBonus {
            coef: 0.01,
            adaptive: Some(AdaptiveEntropy {
                target: 1.0,
                coef_min: 0.0,
                coef_max: 0.05,
                coef_delta: 0.002,
                last_world_entropy: 0.5,
            }),
        });
        out.push((c2, true, false));
        // Row IS ratio, static bonus, evaluation, no clamp.
        let mut c3 = c;
        c3.beta = 0.1;
        c3.vllm_is_correction = true;
        c3.norm.train = false;
        c3.log_ratio_clamp = None;
        c3.entropy_bonus = Some(EntropyBonus {
            coef: 0.02,
            adaptive: None,
        });
        out.push((c3, true, true));
        // TRL 1.16's normalizers (steps_per_generation): rescaled token
        // count, token-mean entropy bonus, luspo's masked row sums.
        let mut c4 = c2;
        c4.norm.steps_per_generation = Some(4.0);
        out.push((c4, true, false));
    }
    out
}

struct CoreGrpo {
    out: cg::GrpoOutput<f64>,
    g_lp: Vec<f64>,
    g_ent: Vec<f64>,
}

fn core_grpo(cfg: &GrpoConfig, x: &Data, with_is: bool, row_is: bool) -> CoreGrpo {
    let mut inp = GrpoInputs::new(x.d, &x.lp, &x.ent, &x.mask, &x.adv)
        .old_log_probs(&x.old)
        .ref_log_probs(&x.rf)
        .sampling_log_probs(&x.samp);
    if with_is {
        inp = inp.importance_sampling_ratio(if row_is {
            TokenOrRow::Row(&x.is_row)
        } else {
            TokenOrRow::Token(&x.is_tok)
        });
    }
    let mut g_lp = vec![0.0; x.d.len()];
    let mut g_ent = vec![0.0; x.d.len()];
    let mut scratch = vec![0.0; x.d.len()];
    let out = cg::grpo_loss(cfg, &inp, Some(&mut g_lp), Some(&mut g_ent), &mut scratch).unwrap();
    CoreGrpo { out, g_lp, g_ent }
}

fn tensor_grpo(
    cfg: &GrpoConfig,
    x: &Data,
    with_is: bool,
    row_is: bool,
    lp: &[f64],
    old: &[f64],
) -> tg::GrpoLossOutput {
    let d = x.d;
    let mut inp = GrpoTensors::new(t2(lp, d), t2(&x.ent, d), m2(&x.mask, d), t1(&x.adv));
    inp.old_log_probs = Some(t2(old, d));
    inp.ref_log_probs = Some(t2(&x.rf, d));
    inp.sampling_log_probs = Some(t2(&x.samp, d));
    if with_is {
        inp.importance_sampling_ratio = Some(if row_is {
            IsRatio::Row(t1(&x.is_row))
        } else {
            IsRatio::Token(t2(&x.is_tok, d))
        });
    }
    tg::grpo_loss(cfg, inp).unwrap()
}

fn check_grpo(what: &str, got: &tg::GrpoLossOutput, want: &CoreGrpo) {
    let w = &want.out;
    close(
        &format!("{what} loss"),
        &[s(got.loss.clone())],
        &[w.loss],
        TOL,
    );
    close(
        &format!("{what} policy_loss"),
        &[s(got.policy_loss.clone())],
        &[w.policy_loss],
        TOL,
    );
    close(
        &format!("{what} entropy"),
        &[s(got.entropy.clone())],
        &[w.entropy],
        TOL,
    );
    close(&format!("{what} kl"), &[s(got.kl.clone())], &[w.kl], TOL);
    let c = &got.clip;
    close(
        &format!("{what} clip"),
        &[
            s(c.low_mean.clone()),
            s(c.high_mean.clone()),
            s(c.region_mean.clone()),
            s(c.low_min.clone()),
            s(c.high_max.clone()),
        ],
        &[
            w.clip.low_mean,
            w.clip.high_mean,
            w.clip.region_mean,
            w.clip.low_min,
            w.clip.high_max,
        ],
        TOL,
    );
    close(
        &format!("{what} cispo"),
        &[s(got.cispo_clip_ratio.clone())],
        &[w.cispo_clip_ratio],
        TOL,
    );
    close(
        &format!("{what} vespo"),
        &[s(got.vespo_phi_seq_mean.clone())],
        &[w.vespo_phi_seq_mean],
        TOL,
    );
    close(
        &format!("{what} entropy_coef"),
        &[got.entropy_coef],
        &[w.entropy_coef],
        TOL,
    );
    close(
        &format!("{what} grad lp"),
        &to_vec(got.grad_log_probs.clone()),
        &want.g_lp,
        TOL,
    );
    close(
        &format!("{what} grad ent"),
        &to_vec(got.grad_entropies.clone()),
        &want.g_ent,
        TOL,
    );
}

#[test]
fn grpo_loss_matches_core_for_every_type_and_level() {
    let mut n = 0;
    for (k, &(b, t)) in SHAPES.iter().enumerate() {
        let x = data(11 + k as u64, b, t);
        for lt in GrpoLossType::ALL {
            for (cfg, with_is, row_is) in grpo_configs(lt) {
                let want = core_grpo(&cfg, &x, with_is, row_is);
                let got = tensor_grpo(&cfg, &x, with_is, row_is, &x.lp, &x.old);
                let what = format!("{}/{}/b{b}t{t}", lt.name(), cfg.level.name());
                check_grpo(&what, &got, &want);
                n += 1;
            }
        }
    }
    assert_eq!(n, 4 * 8 * 12);
}

#[test]
fn grpo_loss_masked_nan_changes_nothing() {
    let x = data(5, 4, 7);
    for lt in GrpoLossType::ALL {
        if lt == GrpoLossType::Luspo {
            continue; // TRL's luspo weighs padding: it must be finite.
        }
        for (cfg, with_is, row_is) in grpo_configs(lt) {
            let want = core_grpo(&cfg, &x, with_is, row_is);
            let got = tensor_grpo(
                &cfg,
                &x,
                with_is,
                row_is,
                &poison(&x.lp, &x.mask),
                &poison(&x.old, &x.mask),
            );
            check_grpo(&format!("poisoned {}", lt.name()), &got, &want);
        }
    }
}

/// Sampler log-probs vLLM could not score (NaN) on valid tokens, with the
/// off-policy mask: TRL f2cd577 drops those `A < 0` rows, TRL 1.16.0 counts
/// the tokens as KL 0; the tensor path agrees with the core either way.
#[test]
fn grpo_loss_nan_sampler_log_probs_match_core() {
    let mut n = 0;
    for (k, &(b, t)) in SHAPES.iter().enumerate() {
        let mut x = data(41 + k as u64, b, t);
        for i in (0..x.d.len()).step_by(4) {
            x.samp[i] = f64::NAN;
        }
        for lt in GrpoLossType::ALL {
            for (cfg, with_is, row_is) in grpo_configs(lt) {
                if cfg.off_policy_mask_threshold.is_none() {
                    continue;
                }
                for nan in [
                    NanSamplerLogProbs::Propagate,
                    NanSamplerLogProbs::AsOnPolicy,
                ] {
                    let mut cfg = cfg;
                    cfg.off_policy_nan_sampler_log_probs = nan;
                    let want = core_grpo(&cfg, &x, with_is, row_is);
                    assert!(want.out.loss.is_finite());
                    let got = tensor_grpo(&cfg, &x, with_is, row_is, &x.lp, &x.old);
                    let what = format!("{}/{}/b{b}t{t}/{nan:?}", lt.name(), cfg.level.name());
                    check_grpo(&what, &got, &want);
                    n += 1;
                }
            }
        }
    }
    assert!(n >= 4 * 8 * 2 * 2, "{n}");
}

#[test]
fn grpo_loss_all_masked_is_zero() {
    let d = Dims::new(3, 4);
    let mask = vec![false; d.len()];
    let v = vec![f64::NAN; d.len()];
    let mut x = GrpoTensors::new(t2(&v, d), t2(&v, d), m2(&mask, d), t1(&[1.0, -1.0, 0.5]));
    x.old_log_probs = Some(t2(&v, d));
    let out = tg::grpo_loss(&GrpoConfig::trl(GrpoLossType::Grpo), x).unwrap();
    assert_eq!(s(out.loss), 0.0);
    assert!(to_vec(out.grad_log_probs).iter().all(|&g| g == 0.0));
}

#[test]
fn gmpo_and_rloo_match_core() {
    for (k, &(b, t)) in SHAPES.iter().enumerate() {
        let x = data(31 + k as u64, b, t);
        let d = x.d;
        for (beta, q, train) in [(0.0, 1.0, true), (0.04, 0.5, true), (0.1, 1.0, false)] {
            let mut cfg = GmpoConfig::trl();
            cfg.eps_low = 0.2;
            cfg.eps_high = 0.3;
            cfg.beta = beta;
            cfg.top_entropy_quantile = q;
            cfg.gradient_accumulation_steps = 2.0;
            cfg.train = train;
            let inp = GrpoInputs::new(d, &x.lp, &x.ent, &x.mask, &x.adv)
                .old_log_probs(&x.old)
                .ref_log_probs(&x.rf);
            let mut g = vec![0.0; d.len()];
            let mut scratch = vec![0.0; d.len()];
            let want = cg::gmpo_loss(&cfg, &inp, Some(&mut g), &mut scratch).unwrap();
            for poisoned in [false, true] {
                let (lp, old) = if poisoned {
                    (poison(&x.lp, &x.mask), poison(&x.old, &x.mask))
                } else {
                    (x.lp.clone(), x.old.clone())
                };
                let mut ti =
                    GrpoTensors::new(t2(&lp, d), t2(&x.ent, d), m2(&x.mask, d), t1(&x.adv));
                ti.old_log_probs = Some(t2(&old, d));
                ti.ref_log_probs = Some(t2(&x.rf, d));
                let got = tg::gmpo_loss(&cfg, ti).unwrap();
                let what = format!("gmpo b{b}t{t} β{beta} q{q} poisoned={poisoned}");
                close(
                    &what,
                    &[s(got.loss), s(got.entropy), s(got.kl)],
                    &[want.loss, want.entropy, want.kl],
                    TOL,
                );
                close(
                    &format!("{what} clip"),
                    &[
                        s(got.clip.low_mean),
                        s(got.clip.high_mean),
                        s(got.clip.region_mean),
                        s(got.clip.low_min),
                        s(got.clip.high_max),
                    ],
                    &[
                        want.clip.low_mean,
                        want.clip.high_mean,
                        want.clip.region_mean,
                        want.clip.low_min,
                        want.clip.high_max,
                    ],
                    TOL,
                );
                close(
                    &format!("{what} grad"),
                    &to_vec(got.grad_log_probs),
                    &g,
                    TOL,
                );
            }
        }
        // RLOO: the sequence log-prob sum against per-row old log-probs near it.
        let mut r = Rng::new(77 + k as u64);
        let sums: Vec<f64> = (0..b)
            .map(|i| {
                (0..t)
                    .filter(|&j| x.mask[i * t + j])
                    .map(|j| x.lp[i * t + j])
                    .sum::<f64>()
            })
            .collect();
        let old: Vec<f64> = sums
            .iter()
            .map(|&v| (v + r.uniform(-0.5, 0.5)) as f32 as f64)
            .collect();
        let cfg = RlooConfig {
            eps_low: 0.2,
            eps_high: 0.28,
            log_ratio_clamp: Some(20.0),
        };
        let inp = GrpoInputs::new(d, &x.lp, &x.ent, &x.mask, &x.adv);
        let mut g = vec![0.0; d.len()];
        let want = cg::rloo_loss(&cfg, &inp, &old, Some(&mut g)).unwrap();
        let ti = GrpoTensors::new(
            t2(&poison(&x.lp, &x.mask), d),
            t2(&x.ent, d),
            m2(&x.mask, d),
            t1(&x.adv),
        );
        let got = tg::rloo_loss(&cfg, ti, t1(&old)).unwrap();
        let what = format!("rloo b{b}t{t}");
        close(
            &what,
            &[s(got.loss), s(got.entropy)],
            &[want.loss, want.entropy],
            TOL,
        );
        close(
            &format!("{what} clip"),
            &[
                s(got.clip.low_mean),
                s(got.clip.high_mean),
                s(got.clip.region_mean),
                s(got.clip.low_min),
                s(got.clip.high_max),
            ],
            &[
                want.clip.low_mean,
                want.clip.high_mean,
                want.clip.region_mean,
                want.clip.low_min,
                want.clip.high_max,
            ],
            TOL,
        );
        close(
            &format!("{what} grad"),
            &to_vec(got.grad_log_probs),
            &g,
            TOL,
        );
    }
}

#[test]
fn vespo_gamma_weights_match_core() {
    for (k, &(b, t)) in SHAPES.iter().enumerate() {
        let x = data(51 + k as u64, b, t);
        let d = x.d;
        let lr: Vec<f64> =
            x.lp.iter()
                .zip(&x.old)
                .map(|(a, o)| ((a - o) as f32) as f64)
                .collect();
        let gamma = VespoGamma {
            k_pos: 2.0,
            lambda_pos: 3.0,
            k_neg: 3.0,
            lambda_neg: 2.0,
        };
        for with_is in [false, true] {
            let mut want = vec![0.0; b];
            cg::vespo_gamma_weights(
                &gamma,
                d,
                &x.adv,
                &lr,
                &x.mask,
                with_is.then_some(TokenOrRow::Token(&x.is_tok[..])),
                &mut want,
            )
            .unwrap();
            let is = with_is.then(|| IsRatio::Token(t2(&poison(&x.is_tok, &x.mask), d)));
            let got = tg::vespo_gamma_weights(
                &gamma,
                t1(&x.adv),
                t2(&poison(&lr, &x.mask), d),
                &m2(&x.mask, d),
                is,
            )
            .unwrap();
            close(
                &format!("phi b{b}t{t} is={with_is}"),
                &to_vec(got),
                &want,
                TOL,
            );
        }
    }
}

#[test]
fn grpo_family_shape_mismatch_is_a_typed_error() {
    let d = Dims::new(2, 3);
    let v = vec![-1.0; d.len()];
    let mask = vec![true; d.len()];
    let mut x = GrpoTensors::new(t2(&v, d), t2(&v, d), m2(&mask, d), t1(&[1.0, -1.0]));
    x.old_log_probs = Some(tensor2(&[-1.0; 4], [2, 2], &dev()).unwrap());
    let e = tg::grpo_loss(&GrpoConfig::trl(GrpoLossType::Grpo), x.clone()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    let e = tg::gmpo_loss(&GmpoConfig::trl(), x).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    let x = GrpoTensors::new(t2(&v, d), t2(&v, d), m2(&mask, d), t1(&[1.0, -1.0, 0.0]));
    let e = tg::rloo_loss(&RlooConfig::trl(), x, t1(&[0.0, 0.0])).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    // β ≠ 0 without the reference policy.
    let mut cfg = GrpoConfig::trl(GrpoLossType::Dapo);
    cfg.beta = 0.1;
    let x = GrpoTensors::new(t2(&v, d), t2(&v, d), m2(&mask, d), t1(&[1.0, -1.0]));
    assert!(matches!(
        tg::grpo_loss(&cfg, x).unwrap_err(),
        Error::Invalid { .. }
    ));
}

// ---------------------------------------------------------------------------
// torchtune
// ---------------------------------------------------------------------------

fn scalars(t: &tg::SequenceMeanTensors) -> Vec<f64> {
    vec![
        s(t.loss.clone()),
        s(t.policy_loss.clone()),
        s(t.kl_loss.clone()),
        s(t.ratio_mean.clone()),
        s(t.clipfrac.clone()),
    ]
}

fn core_scalars(o: &SequenceMeanOutput<f64>) -> Vec<f64> {
    vec![o.loss, o.policy_loss, o.kl_loss, o.ratio_mean, o.clipfrac]
}

#[test]
fn torchtune_losses_match_core() {
    for (k, &(b, t)) in SHAPES.iter().enumerate() {
        let x = data(91 + k as u64, b, t);
        let d = x.d;
        let cfg = SequenceMeanConfig::new(0.2, 0.1).unwrap();
        for masked in [false, true] {
            let mask = masked.then_some(&x.mask[..]);
            let tm = masked.then(|| m2(&x.mask, d));
            // Poison only what the peer never reads (ratio_mean of GRPOLoss reads every position).
            let lp_p = if masked {
                poison(&x.lp, &x.mask)
            } else {
                x.lp.clone()
            };
            // token-level clipped
            let mut g = vec![0.0; d.len()];
            let want =
                cs::token_clipped_loss(&cfg, d, &x.old, &x.lp, &x.rf, &x.adv, mask, Some(&mut g))
                    .unwrap();
            let (got, gg) = tg::token_clipped_loss(
                &cfg,
                t2(&x.old, d),
                t2(&x.lp, d),
                t2(&x.rf, d),
                t1(&x.adv),
                tm.as_ref(),
            )
            .unwrap();
            let what = format!("token b{b}t{t} masked={masked}");
            close(&what, &scalars(&got), &core_scalars(&want), TOL);
            close(&format!("{what} grad"), &to_vec(gg), &g, TOL);
            // completion
            let want = cs::completion_clipped_loss(
                &cfg,
                d,
                &x.old,
                &x.lp,
                &x.rf,
                &x.adv,
                mask,
                Some(&mut g),
            )
            .unwrap();
            let (got, gg) = tg::completion_clipped_loss(
                &cfg,
                t2(&x.old, d),
                t2(&lp_p, d),
                t2(&x.rf, d),
                t1(&x.adv),
                tm.as_ref(),
            )
            .unwrap();
            let what = format!("completion b{b}t{t} masked={masked}");
            close(&what, &scalars(&got), &core_scalars(&want), TOL);
            close(&format!("{what} grad"), &to_vec(gg), &g, TOL);
            // on-policy
            for guard in [
                TokenCountGuard::TORCHTUNE_SIMPLE,
                TokenCountGuard::TORCHTUNE_CHUNKED,
            ] {
                let want =
                    cs::on_policy_loss(&cfg, guard, d, &x.lp, &x.rf, &x.adv, mask, Some(&mut g))
                        .unwrap();
                let (got, gg) = tg::on_policy_loss(
                    &cfg,
                    guard,
                    t2(&lp_p, d),
                    t2(&x.rf, d),
                    t1(&x.adv),
                    tm.as_ref(),
                )
                .unwrap();
                let what = format!("on-policy b{b}t{t} masked={masked} {guard:?}");
                close(&what, &scalars(&got), &core_scalars(&want), TOL);
                close(&format!("{what} grad"), &to_vec(gg), &g, TOL);
            }
        }
    }
}

#[test]
fn torchtune_logits_and_hidden_forms_match_core() {
    let cfg = SequenceMeanConfig::new(0.2, 0.1).unwrap();
    let guard = TokenCountGuard::TORCHTUNE_CHUNKED;
    for (k, &(b, t)) in SHAPES.iter().enumerate() {
        let (v, h) = (5usize, 3usize);
        let x = data(121 + k as u64, b, t);
        let d = x.d;
        let mut r = Rng::new(200 + k as u64);
        let logits = r.vec(d.len() * v, -3.0, 3.0);
        let hidden = r.vec(d.len() * h, -1.0, 1.0);
        let weight = r.vec(v * h, -1.0, 1.0);
        let targets: Vec<i64> = (0..d.len())
            .map(|i| {
                if i % 4 == 3 {
                    -100
                } else {
                    (r.next_u64() % v as u64) as i64
                }
            })
            .collect();
        let tt = || Tensor::<2, Int>::from_data(TensorData::new(targets.clone(), [b, t]), &dev());
        // logits
        let mut lp = vec![0.0; d.len()];
        let mut g = vec![0.0; d.len() * v];
        let want = cs::on_policy_loss_from_logits(
            &cfg,
            guard,
            d,
            v,
            &logits,
            &targets,
            Some(-100),
            &x.rf,
            &x.adv,
            Some(&x.mask),
            &mut lp,
            Some(&mut g),
        )
        .unwrap();
        let got = tg::on_policy_loss_from_logits(
            &cfg,
            guard,
            tensor3(&logits, [b, t, v], &dev()).unwrap(),
            tt(),
            Some(-100),
            t2(&x.rf, d),
            t1(&x.adv),
            Some(&m2(&x.mask, d)),
            true,
        )
        .unwrap();
        let what = format!("logits b{b}t{t}");
        close(&what, &scalars(&got.out), &core_scalars(&want), TOL);
        close(&format!("{what} lp"), &to_vec(got.log_probs), &lp, TOL);
        close(
            &format!("{what} grad"),
            &to_vec(got.grad_logits.unwrap()),
            &g,
            TOL,
        );
        // hidden, with NaN hidden states at masked positions
        let mut scratch = vec![0.0; v];
        let (mut gh, mut gw) = (vec![0.0; hidden.len()], vec![0.0; weight.len()]);
        let want = cs::on_policy_loss_from_hidden(
            &cfg,
            guard,
            d,
            h,
            v,
            &hidden,
            &weight,
            &targets,
            Some(-100),
            &x.rf,
            &x.adv,
            Some(&x.mask),
            &mut lp,
            &mut scratch,
            Some(HiddenGrads {
                hidden: &mut gh,
                weight: &mut gw,
            }),
        )
        .unwrap();
        let hidden_p: Vec<f64> = hidden
            .iter()
            .enumerate()
            .map(|(i, &y)| if x.mask[i / h] { y } else { f64::NAN })
            .collect();
        let got = tg::on_policy_loss_from_hidden(
            &cfg,
            guard,
            tensor3(&hidden_p, [b, t, h], &dev()).unwrap(),
            tensor2(&weight, [v, h], &dev()).unwrap(),
            tt(),
            Some(-100),
            t2(&x.rf, d),
            t1(&x.adv),
            Some(&m2(&x.mask, d)),
            true,
        )
        .unwrap();
        let what = format!("hidden b{b}t{t}");
        close(&what, &scalars(&got.out), &core_scalars(&want), TOL);
        let lp_got = to_vec(got.log_probs);
        for i in 0..d.len() {
            if x.mask[i] {
                close(&format!("{what} lp"), &lp_got[i..i + 1], &lp[i..i + 1], TOL);
            }
        }
        let (dh, dw) = got.grads.unwrap();
        close(&format!("{what} dh"), &to_vec(dh), &gh, TOL);
        close(&format!("{what} dw"), &to_vec(dw), &gw, TOL);
    }
}

#[test]
fn truncate_matches_core() {
    let mut r = Rng::new(9);
    let (b, len, v) = (2, 6, 3);
    let logits = r.vec(b * len * v, -2.0, 2.0);
    for context in 1..=len {
        let resp = len - context;
        let mut want = vec![0.0; b * resp * v];
        cs::truncate_for_logprobs(&logits, b, len, v, context, &mut want).unwrap();
        let got =
            tg::truncate_for_logprobs(tensor3(&logits, [b, len, v], &dev()).unwrap(), context)
                .unwrap();
        close("truncate", &to_vec(got), &want, 0.0);
        let cot = r.vec(b * resp * v, -1.0, 1.0);
        let mut gw = vec![0.0; b * len * v];
        cs::truncate_for_logprobs_vjp(&cot, b, len, v, context, &mut gw).unwrap();
        let g = tg::truncate_for_logprobs_vjp(
            tensor3(&cot, [b, resp, v], &dev()).unwrap(),
            len,
            context,
        )
        .unwrap();
        close("truncate vjp", &to_vec(g), &gw, 0.0);
    }
    let z = tensor3(&logits, [b, len, v], &dev()).unwrap();
    assert!(matches!(
        tg::truncate_for_logprobs(z.clone(), 0),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        tg::truncate_for_logprobs(z, len + 1),
        Err(Error::OutOfRange { .. })
    ));
}

#[test]
fn torchtune_shape_mismatch_and_bad_targets_are_typed_errors() {
    let cfg = SequenceMeanConfig::new(0.2, 0.1).unwrap();
    let d = Dims::new(2, 3);
    let v = vec![-1.0; d.len()];
    let short = tensor2(&[-1.0; 4], [2, 2], &dev()).unwrap();
    let e = tg::token_clipped_loss(
        &cfg,
        t2(&v, d),
        t2(&v, d),
        short.clone(),
        t1(&[1.0, 0.0]),
        None,
    )
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    let e = tg::completion_clipped_loss(&cfg, t2(&v, d), t2(&v, d), short, t1(&[1.0, 0.0]), None)
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    let e = tg::on_policy_loss(
        &cfg,
        TokenCountGuard::TORCHTUNE_SIMPLE,
        t2(&v, d),
        t2(&v, d),
        t1(&[1.0]),
        None,
    )
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    let logits = tensor3(&[0.0; 12], [2, 3, 2], &dev()).unwrap();
    let bad =
        Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 0, 1, 0], [2, 3]), &dev());
    let e = tg::on_policy_loss_from_logits(
        &cfg,
        TokenCountGuard::TORCHTUNE_CHUNKED,
        logits,
        bad,
        Some(-100),
        t2(&v, d),
        t1(&[1.0, 0.0]),
        None,
        false,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
}
