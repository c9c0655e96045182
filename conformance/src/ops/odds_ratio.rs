//! Handlers for the `odds_ratio` family: TRL's CPO and ORPO, both per pair
//! (`cpo_loss`, `odds_ratio_loss`) and from logits (`*_batch_loss_metrics`).

use crate::case::{Ctx, Fail, OpResult, Outputs};
use posttrain_core::preference::odds_ratio::{
    cpo_loss, odds_ratio_loss, shifted_mean_nll, shifted_sequence_logps,
    shifted_sequence_logps_vjp, CpoConfig, CpoLossType, OrpoCotangents,
};
use posttrain_core::{Dims, Real};

/// TRL's label ignore index.
pub(crate) const IGNORE_INDEX: i64 = -100;

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    match op {
        "trl.cpo_loss" => Some(trl_cpo_loss::<F>(ctx)),
        "trl.odds_ratio_loss" => Some(trl_odds_ratio_loss::<F>(ctx)),
        "trl.cpo_batch_loss_metrics" => Some(trl_cpo_batch::<F>(ctx)),
        "trl.orpo_batch_loss_metrics" => Some(trl_orpo_batch::<F>(ctx)),
        _ => None,
    }
}

pub(crate) fn cpo_config(ctx: &Ctx) -> Result<CpoConfig, Fail> {
    let loss_type: CpoLossType = match ctx.p_str("loss_type")?.parse() {
        Ok(t) => t,
        Err(_) => return Err(ctx.unsupported("loss_type")),
    };
    let cpo_alpha = ctx.p_opt_f64("cpo_alpha")?.unwrap_or(1.0);
    Ok(CpoConfig::new(
        loss_type,
        ctx.p_f64("beta")?,
        ctx.p_f64("label_smoothing")?,
        ctx.p_f64("simpo_gamma")?,
        ctx.p_f64("alpha")?,
        cpo_alpha,
    )?)
}

fn mean<F: Real>(x: &[F]) -> F {
    if x.is_empty() {
        F::zero()
    } else {
        x.iter().copied().sum::<F>() / F::of_usize(x.len())
    }
}

fn trl_cpo_loss<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = cpo_config(ctx)?;
    let c = ctx.f::<F>("policy_chosen_logps")?;
    let r = ctx.f::<F>("policy_rejected_logps")?;
    let n = c.len();
    let (mut l, mut cr, mut rr) = (vec![F::zero(); n], vec![F::zero(); n], vec![F::zero(); n]);
    let cot = ctx
        .cotangent::<F>("losses")?
        .unwrap_or_else(|| vec![F::zero(); n]);
    let (mut dc, mut dr) = (vec![F::zero(); n], vec![F::zero(); n]);
    cpo_loss(
        &cfg,
        &c,
        &r,
        &mut l,
        &mut cr,
        &mut rr,
        Some((&cot, &mut dc, &mut dr)),
    )?;
    let mut o = Outputs::new();
    o.put("losses", &l)
        .put("chosen_rewards", &cr)
        .put("rejected_rewards", &rr)
        .grad("policy_chosen_logps", &dc)
        .grad("policy_rejected_logps", &dr);
    Ok(o)
}

fn trl_odds_ratio_loss<F: Real>(ctx: &Ctx) -> OpResult {
    let beta = ctx.p_f64("beta")?;
    let c = ctx.f::<F>("policy_chosen_logps")?;
    let r = ctx.f::<F>("policy_rejected_logps")?;
    let n = c.len();
    let (mut l, mut cr, mut rr) = (vec![F::zero(); n], vec![F::zero(); n], vec![F::zero(); n]);
    let cot = ctx
        .cotangent::<F>("losses")?
        .unwrap_or_else(|| vec![F::zero(); n]);
    let cots = OrpoCotangents {
        losses: &cot,
        log_odds_ratio: ctx.cot_scalar::<F>("log_odds_ratio")?,
        log_odds_chosen: ctx.cot_scalar::<F>("log_odds_chosen")?,
    };
    let (mut dc, mut dr) = (vec![F::zero(); n], vec![F::zero(); n]);
    let m = odds_ratio_loss(
        beta,
        &c,
        &r,
        &mut l,
        &mut cr,
        &mut rr,
        Some((cots, &mut dc, &mut dr)),
    )?;
    let mut o = Outputs::new();
    o.put("losses", &l)
        .put("chosen_rewards", &cr)
        .put("rejected_rewards", &rr)
        .scalar("log_odds_ratio", m.log_odds_ratio)
        .scalar("log_odds_chosen", m.log_odds_chosen)
        .grad("policy_chosen_logps", &dc)
        .grad("policy_rejected_logps", &dr);
    Ok(o)
}

/// A chosen/rejected batch concatenated as TRL's `concatenated_inputs` does:
/// rows `[0, B)` chosen, `[B, 2B)` rejected, each padded to the logits' width
/// (labels with −100, ids with 0, attention with 0).
struct PairBatch<F> {
    logits: Vec<F>,
    pairs: usize,
    dims: Dims,
    vocab: usize,
    labels: Vec<i64>,
    input_ids: Vec<i64>,
    attention: Vec<bool>,
}

fn pad<T: Copy>(
    data: &[T],
    dims: Dims,
    width: usize,
    fill: T,
    out: &mut Vec<T>,
) -> Result<(), Fail> {
    if dims.seq > width {
        return Err(posttrain_core::Error::ShapeMismatch {
            input: "chosen/rejected width",
            expected: width,
            got: dims.seq,
        }
        .into());
    }
    posttrain_core::error::check_len("labels", data.len(), dims.len())?;
    for b in 0..dims.batch {
        out.extend_from_slice(&data[b * dims.seq..(b + 1) * dims.seq]);
        out.extend(std::iter::repeat_n(fill, width - dims.seq));
    }
    Ok(())
}

/// The token metadata of a [`PairBatch`] (everything but the logits).
pub(crate) struct PairMeta {
    pub(crate) pairs: usize,
    pub(crate) dims: Dims,
    pub(crate) vocab: usize,
    pub(crate) labels: Vec<i64>,
    pub(crate) input_ids: Vec<i64>,
    pub(crate) attention: Vec<bool>,
}

fn pair_batch<F: Real>(ctx: &Ctx) -> Result<PairBatch<F>, Fail> {
    let logits = ctx.f::<F>("logits")?;
    let m = pair_meta(ctx)?;
    Ok(PairBatch {
        logits,
        pairs: m.pairs,
        dims: m.dims,
        vocab: m.vocab,
        labels: m.labels,
        input_ids: m.input_ids,
        attention: m.attention,
    })
}

/// Pads the chosen/rejected labels, ids and attention to the logits' width
/// (TRL's `concatenated_inputs`).
pub(crate) fn pair_meta(ctx: &Ctx) -> Result<PairMeta, Fail> {
    let shape = ctx.shape("logits")?;
    if shape.len() != 3 {
        return Err(Fail::Harness(
            "`logits` must be [2·batch, seq, vocab]".into(),
        ));
    }
    let (rows, width, vocab) = (shape[0], shape[1], shape[2]);
    let cd = ctx.dims("chosen_labels")?;
    let rd = ctx.dims("rejected_labels")?;
    posttrain_core::error::check_len("rejected_labels (rows)", rd.batch, cd.batch)?;
    posttrain_core::error::check_len("logits (rows)", rows, 2 * cd.batch)?;
    let mut labels = Vec::new();
    let mut input_ids = Vec::new();
    let mut attention = Vec::new();
    for (side, d) in [("chosen", cd), ("rejected", rd)] {
        pad(
            &ctx.i64(&format!("{side}_labels"))?,
            d,
            width,
            IGNORE_INDEX,
            &mut labels,
        )?;
        let ids = ctx.i64(&format!("{side}_input_ids"))?;
        let id_dims = ctx.dims(&format!("{side}_input_ids"))?;
        pad(&ids, id_dims, width, 0, &mut input_ids)?;
        let am = ctx.mask(&format!("{side}_attention_mask"))?;
        let am_dims = ctx.dims(&format!("{side}_attention_mask"))?;
        pad(&am, am_dims, width, false, &mut attention)?;
    }
    let dims = Dims::new(rows, width);
    posttrain_core::error::check_len("input_ids", input_ids.len(), dims.len())?;
    posttrain_core::error::check_len("attention_mask", attention.len(), dims.len())?;
    Ok(PairMeta {
        pairs: cd.batch,
        dims,
        vocab,
        labels,
        input_ids,
        attention,
    })
}

/// Mean of all logits of rows `[r0, r1)`, positions `[0, upto)`.
fn logits_mean<F: Real>(pb: &PairBatch<F>, r0: usize, r1: usize, upto: usize) -> F {
    let (mut s, mut n) = (F::zero(), 0usize);
    for b in r0..r1 {
        for t in 0..upto {
            let i = (b * pb.dims.seq + t) * pb.vocab;
            s += pb.logits[i..i + pb.vocab].iter().copied().sum::<F>();
            n += pb.vocab;
        }
    }
    if n == 0 {
        F::zero()
    } else {
        s / F::of_usize(n)
    }
}

/// The pair metrics TRL logs for CPO and ORPO.
fn pair_metrics<F: Real>(o: &mut Outputs, cr: &[F], rr: &[F], c: &[F], r: &[F]) {
    let acc: Vec<F> = cr
        .iter()
        .zip(rr)
        .map(|(a, b)| if a > b { F::one() } else { F::zero() })
        .collect();
    let margins: Vec<F> = cr.iter().zip(rr).map(|(&a, &b)| a - b).collect();
    o.scalar("rewards/chosen", mean(cr))
        .scalar("rewards/rejected", mean(rr))
        .scalar("rewards/accuracies", mean(&acc))
        .scalar("rewards/margins", mean(&margins))
        .scalar("logps/chosen", mean(c))
        .scalar("logps/rejected", mean(r));
}

fn trl_cpo_batch<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = cpo_config(ctx)?;
    let pb = pair_batch::<F>(ctx)?;
    let (b, dims, vocab) = (pb.pairs, pb.dims, pb.vocab);
    let avg = cfg.loss_type.uses_average_log_prob();
    let valid: Vec<bool> = pb.labels.iter().map(|&l| l != IGNORE_INDEX).collect();
    let mut logps = vec![F::zero(); dims.batch];
    shifted_sequence_logps(&pb.logits, dims, vocab, &pb.labels, &valid, avg, &mut logps)?;
    let (c, r) = logps.split_at(b);
    let (mut l, mut cr, mut rr) = (vec![F::zero(); b], vec![F::zero(); b], vec![F::zero(); b]);
    let cot = ctx.cot_scalar::<F>("loss")?;
    let cot_pairs = vec![
        if b == 0 {
            F::zero()
        } else {
            cot / F::of_usize(b)
        };
        b
    ];
    let (mut dc, mut dr) = (vec![F::zero(); b], vec![F::zero(); b]);
    cpo_loss(
        &cfg,
        c,
        r,
        &mut l,
        &mut cr,
        &mut rr,
        Some((&cot_pairs, &mut dc, &mut dr)),
    )?;
    let half = b * dims.seq;
    let chosen_dims = Dims::new(b, dims.seq);
    let mut g = vec![F::zero(); pb.logits.len()];
    let mut scratch = vec![F::zero(); vocab];
    let nll = if cfg.cpo_alpha == 0.0 {
        F::zero()
    } else {
        let grad = Some((
            cot * F::of(cfg.cpo_alpha),
            &mut g[..half * vocab],
            &mut scratch[..],
        ));
        shifted_mean_nll(
            &pb.logits[..half * vocab],
            chosen_dims,
            vocab,
            &pb.labels[..half],
            &valid[..half],
            grad,
        )?
    };
    let dlogps: Vec<F> = dc.iter().chain(&dr).copied().collect();
    shifted_sequence_logps_vjp(
        &pb.logits,
        dims,
        vocab,
        &pb.labels,
        &valid,
        avg,
        &dlogps,
        &mut g,
        &mut scratch,
    )?;
    let loss = mean(&l) + F::of(cfg.cpo_alpha) * nll;
    let mut o = Outputs::new();
    o.scalar("loss", loss).scalar("nll_loss", nll);
    pair_metrics(&mut o, &cr, &rr, c, r);
    o.scalar("logits/chosen", logits_mean(&pb, 0, b, dims.seq))
        .scalar("logits/rejected", logits_mean(&pb, b, 2 * b, dims.seq))
        .grad("logits", &g);
    Ok(o)
}

fn trl_orpo_batch<F: Real>(ctx: &Ctx) -> OpResult {
    let beta = ctx.p_f64("beta")?;
    let pb = pair_batch::<F>(ctx)?;
    let (b, dims, vocab) = (pb.pairs, pb.dims, pb.vocab);
    let valid: Vec<bool> = pb.labels.iter().map(|&l| l != IGNORE_INDEX).collect();
    let mut logps = vec![F::zero(); dims.batch];
    shifted_sequence_logps(
        &pb.logits, dims, vocab, &pb.labels, &valid, true, &mut logps,
    )?;
    let (c, r) = logps.split_at(b);
    let (mut l, mut cr, mut rr) = (vec![F::zero(); b], vec![F::zero(); b], vec![F::zero(); b]);
    let cot = ctx.cot_scalar::<F>("loss")?;
    // loss = nll − mean(losses)
    let cot_pairs = vec![
        if b == 0 {
            F::zero()
        } else {
            -cot / F::of_usize(b)
        };
        b
    ];
    let cots = OrpoCotangents {
        losses: &cot_pairs,
        log_odds_ratio: F::zero(),
        log_odds_chosen: F::zero(),
    };
    let (mut dc, mut dr) = (vec![F::zero(); b], vec![F::zero(); b]);
    let m = odds_ratio_loss(
        beta,
        c,
        r,
        &mut l,
        &mut cr,
        &mut rr,
        Some((cots, &mut dc, &mut dr)),
    )?;
    let half = b * dims.seq;
    let mut g = vec![F::zero(); pb.logits.len()];
    let mut scratch = vec![F::zero(); vocab];
    // ORPO's NLL covers prompt and response: targets are the chosen input ids
    // wherever the attention mask is set.
    let nll = shifted_mean_nll(
        &pb.logits[..half * vocab],
        Dims::new(b, dims.seq),
        vocab,
        &pb.input_ids[..half],
        &pb.attention[..half],
        Some((cot, &mut g[..half * vocab], &mut scratch[..])),
    )?;
    let dlogps: Vec<F> = dc.iter().chain(&dr).copied().collect();
    shifted_sequence_logps_vjp(
        &pb.logits,
        dims,
        vocab,
        &pb.labels,
        &valid,
        true,
        &dlogps,
        &mut g,
        &mut scratch,
    )?;
    let loss = nll - mean(&l);
    let upto = dims.seq.saturating_sub(1);
    let mut o = Outputs::new();
    o.scalar("loss", loss).scalar("nll_loss", nll);
    pair_metrics(&mut o, &cr, &rr, c, r);
    o.scalar("logits/chosen", logits_mean(&pb, 0, b, upto))
        .scalar("logits/rejected", logits_mean(&pb, b, 2 * b, upto))
        .scalar("log_odds_ratio", m.log_odds_ratio)
        .scalar("log_odds_chosen", m.log_odds_chosen)
        .grad("logits", &g);
    Ok(o)
}
