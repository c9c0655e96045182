//! Handlers for the `logits` family: log-probabilities, entropy and `Σπ²`
//! from logits, per-sequence label log-probabilities and the entropy loss.

use crate::case::{Ctx, Fail, OpResult, Outputs};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::logits::{
    entropy_from_logits, entropy_loss, gather_log_softmax, sequence_log_probs, sum_pi_squared,
    SequenceLogProbConfig, Temperature,
};
use posttrain_core::{Dims, Real};

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    match op {
        "trl.selective_log_softmax" => Some(gather::<F>(ctx, "index", "per_token_logps", None)),
        "verl.logprobs_from_logits" => Some(gather::<F>(ctx, "labels", "log_probs", None)),
        "openrlhf.log_probs_from_logits" => {
            Some(gather::<F>(ctx, "labels", "log_probs", Some("temperature")))
        }
        "torchtune.logits_to_logprobs" => Some(gather::<F>(
            ctx,
            "sequences",
            "logprobs",
            Some("temperature"),
        )),
        "trl.entropy_from_logits" => Some(per_row::<F>(ctx, "entropies", Row::Entropy)),
        "verl.entropy_from_logits" | "openrlhf.compute_entropy" => {
            Some(per_row::<F>(ctx, "entropy", Row::Entropy))
        }
        "verl.calculate_sum_pi_squared_from_logits" => {
            Some(per_row::<F>(ctx, "sum_pi_squared", Row::SumPiSquared))
        }
        "torchtune.get_batch_log_probs" => Some(batch_log_probs::<F>(ctx)),
        "verl.compute_entropy_loss" => Some(verl_entropy_loss::<F>(ctx)),
        _ => None,
    }
}

/// The cotangent of output `name` with `n` elements; a single value (the edge
/// files' scalar 1.0) is broadcast.
pub(crate) fn cot_vec<F: Real>(ctx: &Ctx, name: &str, n: usize) -> Result<Option<Vec<F>>, Fail> {
    Ok(ctx.cotangent::<F>(name)?.map(|c| {
        if c.len() == 1 && n != 1 {
            vec![c[0]; n]
        } else {
            c
        }
    }))
}

/// `(rows, vocab)` of a logits tensor `[..., vocab]`.
fn rows_vocab(ctx: &Ctx, name: &str) -> Result<(usize, usize), Fail> {
    let s = ctx.shape(name)?;
    match s.split_last() {
        Some((&v, lead)) => Ok((lead.iter().product(), v)),
        None => Err(Fail::Harness(format!(
            "`{name}` must have a vocabulary axis"
        ))),
    }
}

pub(crate) fn temperature(ctx: &Ctx, key: Option<&str>) -> Result<Temperature, Fail> {
    match key {
        Some(k) => match ctx.p_opt_f64(k)? {
            Some(t) => Ok(Temperature::new(t)?),
            None => Ok(Temperature::ONE),
        },
        None => Ok(Temperature::ONE),
    }
}

fn gather<F: Real>(ctx: &Ctx, ids: &str, out_name: &str, temp_key: Option<&str>) -> OpResult {
    let t = temperature(ctx, temp_key)?;
    let (rows, vocab) = rows_vocab(ctx, "logits")?;
    let logits = ctx.f::<F>("logits")?;
    let index = ctx.i64(ids)?;
    // An index with as many axes as the logits carries k ids per row (top-k).
    let k = match (ctx.shape(ids)?, ctx.shape("logits")?) {
        (si, sl) if si.len() == sl.len() => si.last().copied().unwrap_or(1),
        _ => 1,
    };
    let mut out = vec![F::zero(); index.len()];
    let mut o = Outputs::new();
    match cot_vec::<F>(ctx, out_name, out.len())? {
        Some(c) => {
            let mut g = vec![F::zero(); logits.len()];
            gather_log_softmax(
                &logits,
                rows,
                vocab,
                t,
                k,
                &index,
                &mut out,
                Some((&c, &mut g)),
            )?;
            o.grad("logits", &g);
        }
        None => gather_log_softmax(&logits, rows, vocab, t, k, &index, &mut out, None)?,
    }
    o.put(out_name, &out);
    Ok(o)
}

enum Row {
    Entropy,
    SumPiSquared,
}

fn per_row<F: Real>(ctx: &Ctx, out_name: &str, which: Row) -> OpResult {
    let (rows, vocab) = rows_vocab(ctx, "logits")?;
    let logits = ctx.f::<F>("logits")?;
    let f = match which {
        Row::Entropy => entropy_from_logits::<F>,
        Row::SumPiSquared => sum_pi_squared::<F>,
    };
    let mut out = vec![F::zero(); rows];
    let mut o = Outputs::new();
    match cot_vec::<F>(ctx, out_name, out.len())? {
        Some(c) => {
            let mut g = vec![F::zero(); logits.len()];
            f(&logits, rows, vocab, &mut out, Some((&c, &mut g)))?;
            o.grad("logits", &g);
        }
        None => f(&logits, rows, vocab, &mut out, None)?,
    }
    o.put(out_name, &out);
    Ok(o)
}

pub(crate) fn logits_dims(ctx: &Ctx) -> Result<(Dims, usize), Fail> {
    let s = ctx.shape("logits")?;
    if s.len() != 3 {
        return Err(Fail::Harness("`logits` must be [batch, seq, vocab]".into()));
    }
    Ok((Dims::new(s[0], s[1]), s[2]))
}

/// torchtune `get_batch_log_probs`'s config.
pub(crate) fn batch_log_probs_config(ctx: &Ctx) -> Result<SequenceLogProbConfig, Fail> {
    Ok(SequenceLogProbConfig {
        ignore_index: ctx.p_i64("label_pad_token_id")?,
        average: ctx.p_bool("return_average_logprobs")?,
        shift_labels: true,
    })
}

/// verl `compute_entropy_loss`'s aggregation mode.
pub(crate) fn entropy_loss_mode(ctx: &Ctx) -> Result<AggMode, Fail> {
    ctx.p_str("loss_agg_mode")?
        .parse()
        .map_err(|_| ctx.unsupported("loss_agg_mode"))
}

fn batch_log_probs<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = batch_log_probs_config(ctx)?;
    let (dims, vocab) = logits_dims(ctx)?;
    let logits = ctx.f::<F>("logits")?;
    let labels = ctx.i64("labels")?;
    let mut out = vec![F::zero(); dims.batch];
    let mut o = Outputs::new();
    match cot_vec::<F>(ctx, "logps", out.len())? {
        Some(c) => {
            let mut g = vec![F::zero(); logits.len()];
            sequence_log_probs(
                &cfg,
                dims,
                vocab,
                &logits,
                &labels,
                &mut out,
                Some((&c, &mut g)),
            )?;
            o.grad("logits", &g);
        }
        None => sequence_log_probs(&cfg, dims, vocab, &logits, &labels, &mut out, None)?,
    }
    o.put("logps", &out);
    Ok(o)
}

fn verl_entropy_loss<F: Real>(ctx: &Ctx) -> OpResult {
    let mode = entropy_loss_mode(ctx)?;
    let (dims, vocab) = logits_dims(ctx)?;
    let logits = ctx.f::<F>("logits")?;
    let mask = ctx.mask("response_mask")?;
    let mut scratch = vec![F::zero(); dims.len()];
    let norm = GlobalNorm::default();
    let mut o = Outputs::new();
    let loss = if ctx.has_vjp() {
        let c = ctx.cot_scalar::<F>("entropy_loss")?;
        let mut g = vec![F::zero(); logits.len()];
        let l = entropy_loss(
            mode,
            &norm,
            dims,
            vocab,
            &logits,
            &mask,
            &mut scratch,
            Some((c, &mut g)),
        )?;
        o.grad("logits", &g);
        l
    } else {
        entropy_loss(mode, &norm, dims, vocab, &logits, &mask, &mut scratch, None)?
    };
    o.scalar("entropy_loss", loss);
    Ok(o)
}
