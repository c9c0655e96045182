//! Hostile inputs for the `preference` family (fuzz target `fuzz/fuzz_targets/preference.rs`):
//! the paired losses (every DPO-family loss type, weighted mixtures, the
//! f-divergences, references, lengths, pair weights, SFT), the reward-model
//! loss, KTO / vanilla KTO / BCO, CPO / SimPO / AlphaPO, ORPO and the
//! shifted sequence log-probabilities.
//!
//! Per-sequence inputs have no padding; the token-level op
//! (`shifted_sequence_logps`) has: its invalid positions' logit rows.

use super::logits::{
    back, check, cotangent, cotangents, cv, dot, is_range, lp_or_special, param, probe_coords,
    Case, Probe,
};
use super::{decode, dims, floats, mask, maybe_wrong_len};
use arbitrary::{Result as ArbResult, Unstructured};
use posttrain_core::preference::odds_ratio::{
    cpo_loss, odds_ratio_loss, shifted_sequence_logps, shifted_sequence_logps_vjp, CpoConfig,
    CpoLossType, OrpoCotangents,
};
use posttrain_core::preference::paired::{
    paired_loss, pairwise_reward_loss, FDivergence, LossTerm, PairBatch, PairGrads, PairedConfig,
    PairedLoss, SftInput,
};
use posttrain_core::preference::unpaired::{
    bco_loss, kto_loss, vanilla_kto_loss, KtoConfig, KtoLossType, RunningMoments,
};
use posttrain_core::{Dims, Error, Real};

const KINDS: [PairedLoss; 15] = [
    PairedLoss::Sigmoid,
    PairedLoss::Hinge,
    PairedLoss::Ipo,
    PairedLoss::ExoPair,
    PairedLoss::NcaPair,
    PairedLoss::Robust,
    PairedLoss::BcoPair,
    PairedLoss::SppoHard,
    PairedLoss::Aot,
    PairedLoss::AotUnpaired,
    PairedLoss::ApoZero,
    PairedLoss::ApoDown,
    PairedLoss::Discopop,
    PairedLoss::SigmoidNorm,
    PairedLoss::Sft,
];

/// Decodes `data` into calls of this family's ops and checks the contract
/// of the [module docs](super).
pub fn run(data: &[u8]) {
    let _ = decode(data, |u| {
        let op: u8 = u.arbitrary()?;
        match op % 7 {
            0 | 1 => paired(u),
            2 => reward(u),
            3 => kto(u),
            4 => bco(u),
            5 => cpo_orpo(u),
            _ => shifted(u),
        }
    });
}

/// Sequence log-probabilities (≤ 0; NaN/±inf when not `finite`).
fn seq_logps(u: &mut Unstructured, n: usize, finite: bool) -> ArbResult<Vec<f64>> {
    lp_or_special(u, n, finite)
}

fn beta(u: &mut Unstructured) -> ArbResult<(f64, bool)> {
    param(u, 0.01, 2.0, |b| b > 0.0 && b.is_finite())
}

/// The paired driver: every loss type, mixtures with weights, optional
/// reference / lengths / pair weights / SFT, mean or per-pair cotangents.
fn paired(u: &mut Unstructured) -> ArbResult<()> {
    let n: usize = u.int_in_range(0..=6)?;
    let finite: bool = u.arbitrary()?;
    let (b, b_ok) = beta(u)?;
    let (ls, _) = param(u, 0.0, 0.6, |_| true)?;
    let smooth: bool = u.arbitrary()?;
    let (gamma, _) = param(u, -1.0, 1.0, |_| true)?;
    let (tau, _) = param(u, 0.01, 2.0, |_| true)?;
    let (alpha, _) = param(u, -1.0, 2.0, |_| true)?;
    let div = match u.int_in_range(0..=3)? {
        0 => FDivergence::ReverseKl,
        1 => FDivergence::ForwardKl,
        2 => FDivergence::JsDivergence,
        _ => FDivergence::Alpha(alpha),
    };
    let nterms: usize = u.int_in_range(0..=2)?;
    let mut terms = Vec::new();
    for _ in 0..nterms {
        let kind = KINDS[u.int_in_range(0..=KINDS.len() - 1)?];
        let (w, _) = if u.arbitrary()? {
            (1.0, true)
        } else {
            param(u, 0.0, 2.0, |_| true)?
        };
        terms.push(LossTerm::weighted(kind, w));
    }
    let cfg = PairedConfig::new(b, ls, smooth, gamma, div, tau);
    let cfg_ok = b_ok
        && (0.0..=1.0).contains(&ls)
        && gamma.is_finite()
        && tau > 0.0
        && tau.is_finite()
        && (!matches!(div, FDivergence::Alpha(_)) || alpha.is_finite());
    assert_eq!(cfg.is_ok(), cfg_ok, "PairedConfig::new validation");
    if let Err(e) = &cfg {
        assert!(is_range(e), "PairedConfig::new: {e:?}");
    }
    let Ok(cfg) = cfg else { return Ok(()) };
    // Inputs: policy chosen / rejected (differentiated), then the optional ones.
    let (nr, bad_r) = maybe_wrong_len(u, n)?;
    let mut x = seq_logps(u, n, finite)?;
    x.extend(seq_logps(u, nr, finite)?);
    let with_ref: bool = u.arbitrary()?;
    let with_len: bool = u.arbitrary()?;
    let with_w: bool = u.arbitrary()?;
    let with_sft: bool = u.arbitrary()?;
    let per_pair: bool = u.arbitrary()?;
    let off_ref = x.len();
    if with_ref {
        x.extend(seq_logps(u, 2 * n, finite)?);
    }
    let off_len = x.len();
    if with_len {
        x.extend(
            floats(u, 2 * n, 40.0, true)?
                .iter()
                .map(|v| v.abs().round()),
        );
    }
    let off_w = x.len();
    if with_w {
        x.extend(cotangents(u, n)?.iter().map(|v| v.abs()));
    }
    let off_sft = x.len();
    if with_sft {
        x.extend(seq_logps(u, n, finite)?);
    }
    let sft_tokens = u.int_in_range(0..=20)? as f64;
    let cot = cotangents(u, n)?;
    let c = cotangent(u)?;
    let kinds: Vec<_> = terms.iter().map(|t| t.kind).collect();
    let mut case = Case::new("paired_loss", x);
    case.diff = 0..2 * n;
    let needs_len = kinds.contains(&PairedLoss::SigmoidNorm);
    let needs_sft = kinds.contains(&PairedLoss::Sft);
    let robust_bad = kinds.contains(&PairedLoss::Robust) && !(0.0..0.5).contains(&ls);
    let exo_bad = kinds.contains(&PairedLoss::ExoPair) && !(ls > 0.0 && ls < 1.0);
    let bad_w = terms.iter().any(|t| !t.weight.is_finite());
    case.malformed = terms.is_empty()
        || n == 0
        || bad_r
        || (needs_len && !with_len)
        || (needs_sft && !with_sft)
        || robust_bad
        || exo_bad
        || bad_w;
    case.ks = probe_coords(u, 2 * n)?;
    // The forward-KL score `−e^{−x}` exceeds the float range for log-ratios
    // below −ln(MAX) (documented on `FDivergence::ForwardKl`).
    if div == FDivergence::ForwardKl {
        let lr = |i: usize| {
            let r = |j: usize| if with_ref { case.x[off_ref + j] } else { 0.0 };
            let mut v = case.x[i] - r(i % n.max(1) + if i < n { 0 } else { n });
            if v.is_nan() {
                v = 0.0;
            }
            v
        };
        let lo = (0..n + nr.min(n)).map(lr).fold(0.0f64, f64::min);
        case.finite = (lo > -700.0, lo > -85.0);
    }
    // Discopop with τ > 1 grows like e^{−z(1−1/τ)} (documented on
    // `PairedLoss::Discopop`); parameters far outside their usual range
    // (β or τ beyond [1e-3, 1e3], e.g. IPO's 1/(2β) for a subnormal β) may
    // give true values beyond the float range: finiteness is owed for
    // ordinary parameters and moderate log-ratios there.
    let ordinary = (1e-3..=1e3).contains(&b) && (1e-3..=1e3).contains(&tau);
    let steep = !matches!(div, FDivergence::ReverseKl | FDivergence::JsDivergence);
    let disco_big = kinds.contains(&PairedLoss::Discopop)
        && tau > 1.0
        && (steep || case.x.iter().any(|v| (v * b).abs() > 50.0));
    // Exponential scores (forward KL, α-divergence) have curvature
    // ~e^{|x|}: central differences resolve them only for small log-ratios.
    if steep && case.x.iter().any(|v| v.abs() > 3.0) {
        case.fd = false;
    }
    if !ordinary || disco_big {
        case.finite = (false, false);
    }
    // The α-divergence score reaches e^80/|α − 1| (TRL's clamp), beyond the
    // f32 range for |α − 1| < 1e-3 (documented on `FDivergence::Alpha`).
    // Squared losses (IPO, SPPO) square it: e^40 is the f32 limit there.
    if let FDivergence::Alpha(a) = div {
        let big = case.x.iter().any(|v| (2.0 * v * (a - 1.0)).abs() > 40.0);
        if (a - 1.0).abs() < 1e-3 || big {
            case.finite.1 = false;
        }
    }
    // Large β steepens every loss: the probe step then crosses kinks and
    // curvature it cannot resolve.
    if b > 10.0 {
        case.fd = false;
    }
    // The sorted losses pair the i-th smallest chosen with the i-th
    // smallest rejected value: near-ties swap within the probe step.
    if kinds
        .iter()
        .any(|k| matches!(k, PairedLoss::Aot | PairedLoss::AotUnpaired))
    {
        // Their keys (margins, log-ratios against the references) tie
        // often in fuzzed data: not probed (the pairwise terms they use are).
        case.fd = false;
    }
    let flags = (with_ref, with_len, with_w, with_sft, per_pair);
    let offs = (off_ref, off_len, off_w, off_sft);
    #[allow(clippy::too_many_arguments)]
    fn eval<F: Real>(
        x: &[f64],
        n: usize,
        nr: usize,
        cfg: &PairedConfig,
        terms: &[LossTerm],
        flags: (bool, bool, bool, bool, bool),
        offs: (usize, usize, usize, usize),
        sft_tokens: f64,
        cot: &[f64],
        c: f64,
    ) -> Result<Probe, Error> {
        let (with_ref, with_len, with_w, with_sft, per_pair) = flags;
        let xs = cv::<F>(x);
        let pc = &xs[..n];
        let pr = &xs[n..n + nr];
        let mut batch = PairBatch::new(pc, pr);
        if with_ref {
            batch = batch.with_reference(&xs[offs.0..offs.0 + n], &xs[offs.0 + n..offs.0 + 2 * n]);
        }
        if with_len {
            batch = batch.with_lengths(&xs[offs.1..offs.1 + n], &xs[offs.1 + n..offs.1 + 2 * n]);
        }
        if with_w {
            batch = batch.with_pair_weight(&xs[offs.2..offs.2 + n]);
        }
        if with_sft {
            batch = batch.with_sft(SftInput {
                chosen_logps: &xs[offs.3..offs.3 + n],
                tokens: F::of(sft_tokens),
            });
        }
        let cotf = cv::<F>(cot);
        let (mut gc, mut gr) = (vec![F::zero(); n], vec![F::zero(); nr]);
        let mut pp = vec![F::zero(); n];
        let mut order = vec![0usize; 2 * n];
        let grads = if per_pair {
            PairGrads::of_per_pair(&cotf, &mut gc, &mut gr)
        } else {
            PairGrads::of_mean(F::of(c), &mut gc, &mut gr)
        };
        let out = paired_loss(cfg, terms, &batch, Some(&mut pp), Some(grads), &mut order)?;
        let plain = paired_loss(cfg, terms, &batch, None, None, &mut order)?;
        assert_eq!(
            out.loss.to_f64().to_bits(),
            plain.loss.to_f64().to_bits(),
            "paired_loss: the loss depends on whether gradients are asked"
        );
        let per = back(&pp);
        let loss = out.loss.to_f64();
        let obj = if per_pair { dot(cot, &per) } else { c * loss };
        let mut val = vec![loss];
        val.extend(&per);
        let mut grad = back(&gc);
        grad.extend(back(&gr));
        grad.resize(x.len(), 0.0);
        let m = out.metrics;
        let metrics = [
            m.reward_chosen,
            m.reward_rejected,
            m.accuracy,
            m.margin,
            m.logps_chosen,
            m.logps_rejected,
            out.d_sft_chosen_logps,
        ];
        Ok(Probe {
            obj,
            val,
            grad,
            metrics: back(&metrics),
        })
    }
    check(
        &case,
        &|x| eval::<f64>(x, n, nr, &cfg, &terms, flags, offs, sft_tokens, &cot, c),
        Some(&|x| eval::<f32>(x, n, nr, &cfg, &terms, flags, offs, sft_tokens, &cot, c)),
    );
    Ok(())
}

/// The pairwise reward-model loss with margins and centering.
fn reward(u: &mut Unstructured) -> ArbResult<()> {
    let n: usize = u.int_in_range(0..=6)?;
    let finite: bool = u.arbitrary()?;
    let (nr, bad_r) = maybe_wrong_len(u, n)?;
    let mut x = floats(u, n, 4.0, finite)?;
    x.extend(floats(u, nr, 4.0, finite)?);
    let with_margin: bool = u.arbitrary()?;
    if with_margin {
        x.extend(floats(u, n, 2.0, true)?);
    }
    let (k, k_ok) = if u.arbitrary()? {
        let (k, ok) = param(u, 0.0, 0.1, |k| k.is_finite())?;
        (Some(k), ok)
    } else {
        (None, true)
    };
    let c = cotangent(u)?;
    let mut case = Case::new("pairwise_reward_loss", x);
    case.diff = 0..n + nr;
    case.malformed = n == 0 || bad_r || !k_ok;
    case.ks = probe_coords(u, 2 * n)?;
    // Rewards of ~1e30 with centering: `k · mean((c + r)²)` exceeds the
    // float range (documented on `pairwise_reward_loss`).
    if k.is_some() {
        let big = case.x.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        case.finite = (big < 1e150, big < 1e18);
    }
    fn eval<F: Real>(
        x: &[f64],
        n: usize,
        nr: usize,
        with_margin: bool,
        k: Option<f64>,
        c: f64,
    ) -> Result<Probe, Error> {
        let xs = cv::<F>(x);
        let m = with_margin.then(|| &xs[n + nr..]);
        let (mut gc, mut gr) = (vec![F::zero(); n], vec![F::zero(); n]);
        let out = pairwise_reward_loss(
            &xs[..n],
            &xs[n..n + nr],
            m,
            k,
            Some((F::of(c), &mut gc, &mut gr)),
        )?;
        let mut grad = back(&gc);
        grad.extend(back(&gr));
        grad.resize(x.len(), 0.0);
        Ok(Probe {
            obj: c * out.loss.to_f64(),
            val: vec![out.loss.to_f64()],
            grad,
            metrics: back(&[
                out.min_reward,
                out.mean_reward,
                out.max_reward,
                out.accuracy,
                out.margin,
            ]),
        })
    }
    check(
        &case,
        &|x| eval::<f64>(x, n, nr, with_margin, k, c),
        Some(&|x| eval::<f32>(x, n, nr, with_margin, k, c)),
    );
    Ok(())
}

/// KTO (both loss types) and vanilla KTO.
fn kto(u: &mut Unstructured) -> ArbResult<()> {
    let n: usize = u.int_in_range(0..=8)?;
    let finite: bool = u.arbitrary()?;
    let (b, b_ok) = beta(u)?;
    let vanilla: bool = u.arbitrary()?;
    let (nl, bad_l) = maybe_wrong_len(u, n)?;
    let mut x = floats(u, n, 4.0, finite)?;
    let kl = floats(u, 1, 2.0, finite)?[0].abs();
    x.push(kl);
    let labels = mask(u, nl)?;
    let (wd, wd_ok) = param(u, 0.0, 2.0, |w| w >= 0.0 && w.is_finite())?;
    let (wu, wu_ok) = param(u, 0.0, 2.0, |w| w >= 0.0 && w.is_finite())?;
    let lt = if u.arbitrary()? {
        KtoLossType::Kto
    } else {
        KtoLossType::ApoZeroUnpaired
    };
    let split: usize = u.int_in_range(0..=n)?;
    let c = cotangent(u)?;
    let mut case = Case::new(
        if vanilla {
            "vanilla_kto_loss"
        } else {
            "kto_loss"
        },
        x,
    );
    case.diff = 0..n;
    case.malformed = !b_ok || (!vanilla && (bad_l || !wd_ok || !wu_ok));
    case.ks = probe_coords(u, n)?;
    if b > 10.0 {
        case.fd = false; // a steep sigmoid: the probe step cannot resolve it
    }
    // Vanilla KTO clamps each side's mean log-ratio at 0: a kink whose
    // derivative jump can be too small for `check_gradient` to notice.
    if vanilla {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let near = |v: &[f64]| !v.is_empty() && mean(v).abs() < 1e-3;
        if near(&case.x[..split]) || near(&case.x[split..n]) {
            case.fd = false;
        }
    }
    #[allow(clippy::too_many_arguments)]
    fn eval<F: Real>(
        x: &[f64],
        n: usize,
        vanilla: bool,
        split: usize,
        cfg: (KtoLossType, f64, f64, f64),
        labels: &[bool],
        c: f64,
    ) -> Result<Probe, Error> {
        let xs = cv::<F>(x);
        let mut g = vec![F::zero(); n];
        let l = if vanilla {
            let (gc, gr) = g.split_at_mut(split);
            vanilla_kto_loss(cfg.1, &xs[..split], &xs[split..n], Some((gc, gr)))?
        } else {
            let cfg = KtoConfig::new(cfg.0, cfg.1, cfg.2, cfg.3)?;
            kto_loss(&cfg, &xs[..n], labels, xs[n], Some(&mut g))?
        };
        // Both ops return ∂loss/∂logratio: the VJP is c times it.
        let mut grad: Vec<f64> = back(&g).into_iter().map(|v| c * v).collect();
        grad.push(0.0);
        Ok(Probe {
            obj: c * l.to_f64(),
            val: vec![l.to_f64()],
            grad,
            metrics: vec![],
        })
    }
    let cfg = (lt, b, wd, wu);
    check(
        &case,
        &|x| eval::<f64>(x, n, vanilla, split, cfg, &labels, c),
        Some(&|x| eval::<f32>(x, n, vanilla, split, cfg, &labels, c)),
    );
    Ok(())
}

/// BCO with the running reward mean (updated or not).
fn bco(u: &mut Unstructured) -> ArbResult<()> {
    let nc: usize = u.int_in_range(0..=5)?;
    let nr: usize = u.int_in_range(0..=5)?;
    let finite: bool = u.arbitrary()?;
    let (b, b_ok) = beta(u)?;
    let mut x = floats(u, nc + nr, 4.0, finite)?;
    let prior = floats(u, 2, 2.0, true)?;
    x.extend(&prior);
    let do_train: bool = u.arbitrary()?;
    let cot = cotangents(u, 2 * (nc + nr))?;
    let mut case = Case::new("bco_loss", x);
    case.diff = 0..nc + nr;
    case.malformed = !b_ok;
    case.ks = probe_coords(u, nc + nr)?;
    // With `do_train` the baseline δ (the running mean) depends on the
    // batch but is detached, as in TRL: no finite-difference probe then.
    case.fd = !do_train;
    fn eval<F: Real>(
        x: &[f64],
        nc: usize,
        nr: usize,
        b: f64,
        do_train: bool,
        cot: &[f64],
    ) -> Result<Probe, Error> {
        let xs = cv::<F>(x);
        let n = nc + nr;
        let mut running = RunningMoments::<F>::default();
        running.update(&xs[n..n + 2]);
        let mut losses = vec![F::zero(); n];
        let (mut cr, mut rr) = (vec![F::zero(); nc], vec![F::zero(); nr]);
        let (mut dc, mut dr) = (vec![F::zero(); nc], vec![F::zero(); nr]);
        let cf = cv::<F>(cot);
        let delta = bco_loss(
            b,
            &xs[..nc],
            &xs[nc..n],
            &mut running,
            do_train,
            &mut losses,
            &mut cr,
            &mut rr,
            Some(((&cf[..n], &cf[n..n + nc], &cf[n + nc..]), &mut dc, &mut dr)),
        )?;
        let mut val = back(&losses);
        val.extend(back(&cr));
        val.extend(back(&rr));
        let mut grad = back(&dc);
        grad.extend(back(&dr));
        grad.resize(x.len(), 0.0);
        Ok(Probe {
            obj: dot(cot, &val),
            val,
            grad,
            metrics: back(&[delta, running.mean, running.var, running.std, running.count]),
        })
    }
    check(
        &case,
        &|x| eval::<f64>(x, nc, nr, b, do_train, &cot),
        Some(&|x| eval::<f32>(x, nc, nr, b, do_train, &cot)),
    );
    Ok(())
}

/// CPO / SimPO / AlphaPO and ORPO on sequence log-probabilities.
fn cpo_orpo(u: &mut Unstructured) -> ArbResult<()> {
    let n: usize = u.int_in_range(0..=6)?;
    let finite: bool = u.arbitrary()?;
    let orpo: bool = u.arbitrary()?;
    let (b, b_ok) = beta(u)?;
    let (ls, ls_ok) = param(u, 0.0, 0.5, |l| (0.0..=0.5).contains(&l))?;
    let (gamma, g_ok) = param(u, 0.0, 2.0, |g| g.is_finite())?;
    let (alpha, a_ok) = if u.arbitrary()? {
        (0.0, true)
    } else {
        param(u, -1.0, 1.0, |a| a.is_finite())?
    };
    let lt = [
        CpoLossType::Sigmoid,
        CpoLossType::Hinge,
        CpoLossType::Ipo,
        CpoLossType::Simpo,
    ][u.int_in_range(0..=3)?];
    let (nr, bad_r) = maybe_wrong_len(u, n)?;
    let mut x = seq_logps(u, n, finite)?;
    x.extend(seq_logps(u, nr, finite)?);
    let cot = cotangents(u, n + 2)?;
    let mut case = Case::new(if orpo { "odds_ratio_loss" } else { "cpo_loss" }, x);
    let cpo_params_ok = ls_ok && g_ok && a_ok;
    case.malformed = bad_r || !b_ok || (!orpo && !cpo_params_ok);
    case.ks = probe_coords(u, 2 * n)?;
    // ORPO's log-odds `logp − log(1 − e^{logp})` is +inf at logp = 0 and
    // its derivative `1/(1 − e^{logp})` exceeds the float range for
    // |logp| ≲ 1/MAX (documented on `orpo_log_odds`): finite results are
    // owed for log-probabilities that are negative in the evaluated type.
    if orpo {
        let neg = |lim: f64| case.x.iter().all(|v| *v < -lim);
        case.finite = (neg(1e-300), neg(1e-37));
    }
    // AlphaPO's reward `(1 − e^{−α·logp})/α` exceeds the float range once
    // `−α·logp > ln(MAX)` (documented on `alphapo_reward`).
    if !orpo && alpha != 0.0 {
        // (halved: IPO squares the reward margin)
        let u = case.x.iter().fold(0.0f64, |a, v| a.max(-v * alpha));
        case.finite = (u <= 350.0, u <= 40.0); // `u` is never NaN (f64::max)
    }
    fn eval<F: Real>(
        x: &[f64],
        n: usize,
        nr: usize,
        orpo: bool,
        p: (CpoLossType, f64, f64, f64, f64),
        cot: &[f64],
    ) -> Result<Probe, Error> {
        let xs = cv::<F>(x);
        let (ch, rj) = (&xs[..n], &xs[n..n + nr]);
        let mut losses = vec![F::zero(); n];
        let (mut cr, mut rr) = (vec![F::zero(); n], vec![F::zero(); n]);
        let (mut dc, mut dr) = (vec![F::zero(); n], vec![F::zero(); n]);
        let cf = cv::<F>(cot);
        let mut metrics = vec![];
        let obj_extra;
        if orpo {
            let cots = OrpoCotangents {
                losses: &cf[..n],
                log_odds_ratio: cf[n],
                log_odds_chosen: cf[n + 1],
            };
            let m = odds_ratio_loss(
                p.1,
                ch,
                rj,
                &mut losses,
                &mut cr,
                &mut rr,
                Some((cots, &mut dc, &mut dr)),
            )?;
            metrics = back(&[m.log_odds_ratio, m.log_odds_chosen]);
            obj_extra = cot[n] * metrics[0] + cot[n + 1] * metrics[1];
        } else {
            let cfg = CpoConfig::new(p.0, p.1, p.2, p.3, p.4, 1.0)?;
            cpo_loss(
                &cfg,
                ch,
                rj,
                &mut losses,
                &mut cr,
                &mut rr,
                Some((&cf[..n], &mut dc, &mut dr)),
            )?;
            obj_extra = 0.0;
        }
        let val = back(&losses);
        let obj = dot(cot, &val) + obj_extra;
        let mut v = val;
        v.extend(&metrics);
        let mut grad = back(&dc);
        grad.extend(back(&dr));
        grad.resize(x.len(), 0.0);
        Ok(Probe {
            obj,
            val: v,
            grad,
            metrics: {
                let mut m = back(&cr);
                m.extend(back(&rr));
                m
            },
        })
    }
    let p = (lt, b, ls, gamma, alpha);
    if b > 10.0 {
        case.fd = false; // the hinge kink lies within the probe step
    }
    if !(1e-3..=1e3).contains(&b) {
        case.finite = (false, false); // IPO's 1/(2β) for extreme β
    }
    check(
        &case,
        &|x| eval::<f64>(x, n, nr, orpo, p, &cot),
        Some(&|x| eval::<f32>(x, n, nr, orpo, p, &cot)),
    );
    Ok(())
}

/// `shifted_sequence_logps` (+ VJP): the logit rows that score an invalid
/// position (and the last row) are padding.
fn shifted(u: &mut Unstructured) -> ArbResult<()> {
    let d = dims(u)?;
    let vocab: usize = u.int_in_range(0..=5)?;
    let finite: bool = u.arbitrary()?;
    let average: bool = u.arbitrary()?;
    let (nl, bad_l) = maybe_wrong_len(u, d.len() * vocab)?;
    let z = floats(u, nl, 6.0, finite)?;
    let valid = mask(u, d.len())?;
    let mut bad_id = false;
    let targets: Vec<i64> = (0..d.len())
        .map(|i| {
            let t: u8 = u.arbitrary()?;
            Ok(if t == 0 {
                if valid[i] && i % d.seq.max(1) != 0 {
                    bad_id = true;
                }
                -1
            } else {
                (t as usize % vocab.max(1)) as i64
            })
        })
        .collect::<ArbResult<_>>()?;
    let cot = cotangents(u, d.batch)?;
    let mut case = Case::new("shifted_sequence_logps", z);
    // Row r (position t) scores position t + 1 of the same sequence.
    let read = |r: usize| {
        let t = r % d.seq.max(1);
        t + 1 < d.seq && valid[r + 1]
    };
    if !bad_l && vocab > 0 {
        case.pad = (0..nl).map(|i| !read(i / vocab)).collect();
    }
    let any_read = (0..d.len()).any(read);
    case.malformed = bad_l || (vocab == 0 && !d.is_empty()) || bad_id;
    let _ = any_read;
    case.ks = probe_coords(u, nl)?;
    fn eval<F: Real>(
        x: &[f64],
        d: Dims,
        vocab: usize,
        targets: &[i64],
        valid: &[bool],
        average: bool,
        cot: &[f64],
    ) -> Result<Probe, Error> {
        let z = cv::<F>(x);
        let mut out = vec![F::zero(); d.batch];
        shifted_sequence_logps(&z, d, vocab, targets, valid, average, &mut out)?;
        let mut g = vec![F::zero(); x.len()];
        let mut scratch = vec![F::zero(); vocab];
        let c = cv::<F>(cot);
        shifted_sequence_logps_vjp(
            &z,
            d,
            vocab,
            targets,
            valid,
            average,
            &c,
            &mut g,
            &mut scratch,
        )?;
        let val = back(&out);
        Ok(Probe {
            obj: dot(cot, &val),
            val,
            grad: back(&g),
            metrics: vec![],
        })
    }
    check(
        &case,
        &|x| eval::<f64>(x, d, vocab, &targets, &valid, average, &cot),
        Some(&|x| eval::<f32>(x, d, vocab, &targets, &valid, average, &cot)),
    );
    Ok(())
}
