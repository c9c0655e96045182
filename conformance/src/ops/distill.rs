//! Handlers for the `distill` family: TRL GKD / distillation JSD losses and
//! OpenRLHF's KD loss.

use crate::case::{Ctx, Fail, OpResult, Outputs};
use crate::ops::logits::cot_vec;
use posttrain_core::distill::{
    generalized_jsd_elementwise, generalized_jsd_loss, jsd_from_log_probs, kd_loss, DistillConfig,
    Jsd, Reduction,
};
use posttrain_core::error::check_len;
use posttrain_core::{Dims, Real};

/// TRL's and OpenRLHF's ignore index.
pub(crate) const IGNORE_INDEX: i64 = -100;

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    match op {
        "openrlhf.kd_loss" => Some(openrlhf_kd::<F>(ctx)),
        "trl.distillation_generalized_jsd_loss" | "trl.gkd_generalized_jsd_loss" => {
            Some(trl_jsd_loss::<F>(ctx))
        }
        "trl.distillation_jsd_divergence" => Some(trl_jsd_divergence::<F>(ctx)),
        "trl.gkd_compute_loss" => Some(trl_gkd_compute_loss::<F>(ctx)),
        "trl.distillation_compute_loss" => Some(trl_distillation_compute_loss::<F>(ctx)),
        _ => None,
    }
}

/// `([batch, seq], vocab)` of a `[batch, seq, vocab]` input.
pub(crate) fn dims3(ctx: &Ctx, name: &str) -> Result<(Dims, usize), Fail> {
    let s = ctx.shape(name)?;
    if s.len() != 3 {
        return Err(Fail::Harness(format!(
            "`{name}` must be [batch, seq, vocab]"
        )));
    }
    Ok((Dims::new(s[0], s[1]), s[2]))
}

pub(crate) fn reduction(ctx: &Ctx) -> Result<Reduction, Fail> {
    match ctx.p_str("reduction")?.parse() {
        Ok(r) => Ok(r),
        Err(_) => Err(ctx.unsupported("reduction")),
    }
}

fn openrlhf_kd<F: Real>(ctx: &Ctx) -> OpResult {
    let (dims, vocab) = dims3(ctx, "logits")?;
    let zs = ctx.f::<F>("logits")?;
    let zt = ctx.f::<F>("teacher_logits")?;
    let valid: Vec<bool> = ctx
        .i64("label")?
        .iter()
        .map(|&l| l != IGNORE_INDEX)
        .collect();
    let mut o = Outputs::new();
    let loss = if ctx.has_vjp() {
        let c = ctx.cot_scalar::<F>("distil_loss")?;
        let mut g = vec![F::zero(); zs.len()];
        let l = kd_loss(dims.len(), vocab, &zs, &zt, &valid, Some((c, &mut g)))?;
        o.grad("logits", &g);
        l
    } else {
        kd_loss(dims.len(), vocab, &zs, &zt, &valid, None)?
    };
    o.scalar("distil_loss", loss);
    Ok(o)
}

/// TRL `generalized_jsd_loss` (GKD and distillation trainers alike).
/// `generalized_jsd_loss`'s config.
pub(crate) fn jsd_loss_config(ctx: &Ctx) -> Result<DistillConfig, Fail> {
    Ok(DistillConfig::new(
        ctx.p_f64("beta")?,
        ctx.p_f64("temperature")?,
        reduction(ctx)?,
        ctx.p_opt_f64("num_items_in_batch")?,
    )?)
}

/// The row validity `label ≠ −100` when the case has labels.
pub(crate) fn jsd_valid(ctx: &Ctx, dims: Dims) -> Result<Option<Vec<bool>>, Fail> {
    if !ctx.has("labels") {
        return Ok(None);
    }
    let labels = ctx.i64("labels")?;
    check_len("labels", labels.len(), dims.len())?;
    Ok(Some(labels.iter().map(|&l| l != IGNORE_INDEX).collect()))
}

fn trl_jsd_loss<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = jsd_loss_config(ctx)?;
    let red = cfg.reduction;
    let (dims, vocab) = dims3(ctx, "student_logits")?;
    let zs = ctx.f::<F>("student_logits")?;
    let zt = ctx.f::<F>("teacher_logits")?;
    let valid = jsd_valid(ctx, dims)?;
    let mut o = Outputs::new();
    if red == Reduction::None && cfg.num_items_in_batch.is_none() {
        let rows = dims.len();
        check_len("student_logits", zs.len(), rows * vocab)?;
        // Output rows: the valid ones (TRL's `jsd[mask]`), or all.
        let kept: Vec<usize> = (0..rows)
            .filter(|&r| valid.as_ref().is_none_or(|v| v[r]))
            .collect();
        let mut out = vec![F::zero(); zs.len()];
        let cot = cot_vec::<F>(ctx, "loss", kept.len() * vocab)?;
        match cot {
            Some(c) => {
                check_len("cotangent", c.len(), kept.len() * vocab)?;
                let mut full = vec![F::zero(); zs.len()];
                for (i, &r) in kept.iter().enumerate() {
                    full[r * vocab..(r + 1) * vocab]
                        .copy_from_slice(&c[i * vocab..(i + 1) * vocab]);
                }
                let mut g = vec![F::zero(); zs.len()];
                generalized_jsd_elementwise(
                    &cfg.jsd,
                    cfg.temperature,
                    rows,
                    vocab,
                    &zs,
                    &zt,
                    valid.as_deref(),
                    &mut out,
                    Some((&full, &mut g)),
                )?;
                o.grad("student_logits", &g);
            }
            None => generalized_jsd_elementwise(
                &cfg.jsd,
                cfg.temperature,
                rows,
                vocab,
                &zs,
                &zt,
                valid.as_deref(),
                &mut out,
                None,
            )?,
        }
        let compact: Vec<F> = kept
            .iter()
            .flat_map(|&r| out[r * vocab..(r + 1) * vocab].iter().copied())
            .collect();
        o.put("loss", &compact);
        return Ok(o);
    }
    let loss = if ctx.has_vjp() {
        let c = ctx.cot_scalar::<F>("loss")?;
        let mut g = vec![F::zero(); zs.len()];
        let l = generalized_jsd_loss(
            &cfg,
            dims,
            vocab,
            &zs,
            &zt,
            valid.as_deref(),
            Some((c, &mut g)),
        )?;
        o.grad("student_logits", &g);
        l
    } else {
        generalized_jsd_loss(&cfg, dims, vocab, &zs, &zt, valid.as_deref(), None)?
    };
    o.scalar("loss", loss);
    Ok(o)
}

fn trl_jsd_divergence<F: Real>(ctx: &Ctx) -> OpResult {
    let jsd = Jsd::new(ctx.p_f64("beta")?)?;
    let s = ctx.f::<F>("student_log_probs")?;
    let t = ctx.f::<F>("teacher_log_probs")?;
    let support = ctx.mask_opt("support_mask")?;
    let mut out = vec![F::zero(); s.len()];
    let mut o = Outputs::new();
    match cot_vec::<F>(ctx, "jsd", s.len())? {
        Some(c) => {
            let mut g = vec![F::zero(); s.len()];
            jsd_from_log_probs(
                &jsd,
                &s,
                &t,
                support.as_deref(),
                &mut out,
                Some((&c, &mut g)),
            )?;
            o.grad("student_log_probs", &g);
        }
        None => jsd_from_log_probs(&jsd, &s, &t, support.as_deref(), &mut out, None)?,
    }
    o.put("jsd", &out);
    Ok(o)
}

/// Copies positions `[from, from + len)` of every row of a `[batch, seq, vocab]`
/// tensor into a `[batch, len, vocab]` one.
fn slice_positions<F: Real>(x: &[F], dims: Dims, vocab: usize, from: usize, len: usize) -> Vec<F> {
    let mut out = Vec::with_capacity(dims.batch * len * vocab);
    for b in 0..dims.batch {
        let start = (b * dims.seq + from) * vocab;
        out.extend_from_slice(&x[start..start + len * vocab]);
    }
    out
}

/// Scatters a `[batch, len, vocab]` gradient back to positions `[from, from + len)`.
fn unslice_positions<F: Real>(
    g: &[F],
    dims: Dims,
    vocab: usize,
    from: usize,
    len: usize,
) -> Vec<F> {
    let mut out = vec![F::zero(); dims.len() * vocab];
    for b in 0..dims.batch {
        let start = (b * dims.seq + from) * vocab;
        out[start..start + len * vocab].copy_from_slice(&g[b * len * vocab..(b + 1) * len * vocab]);
    }
    out
}

/// Runs the batch-mean JSD over the positions `[from, from + len)` of the
/// logits with the given per-position validity, returning loss + gradient.
#[allow(clippy::too_many_arguments)]
fn sliced_jsd<F: Real>(
    ctx: &Ctx,
    cfg: &DistillConfig,
    dims: Dims,
    vocab: usize,
    from: usize,
    len: usize,
    valid: &[bool],
) -> OpResult {
    let zs_full = ctx.f::<F>("logits")?;
    let zt_full = ctx.f::<F>("teacher_logits")?;
    check_len("logits", zs_full.len(), dims.len() * vocab)?;
    check_len("teacher_logits", zt_full.len(), dims.len() * vocab)?;
    let zs = slice_positions(&zs_full, dims, vocab, from, len);
    let zt = slice_positions(&zt_full, dims, vocab, from, len);
    let sdims = Dims::new(dims.batch, len);
    let mut o = Outputs::new();
    let loss = if ctx.has_vjp() {
        let c = ctx.cot_scalar::<F>("loss")?;
        let mut g = vec![F::zero(); zs.len()];
        let l = generalized_jsd_loss(cfg, sdims, vocab, &zs, &zt, Some(valid), Some((c, &mut g)))?;
        o.grad("logits", &unslice_positions(&g, dims, vocab, from, len));
        l
    } else {
        generalized_jsd_loss(cfg, sdims, vocab, &zs, &zt, Some(valid), None)?
    };
    o.scalar("loss", loss);
    Ok(o)
}

/// TRL `GKDTrainer.compute_loss`: logits at `t` against labels at `t + 1`,
/// temperature 1, batch mean over label ≠ −100.
/// A sliced JSD case: the config, the logits' dims and vocabulary, the
/// first position and number of positions, and the per-position validity of
/// the slice (`[batch, len]`).
pub(crate) struct SlicedJsd {
    /// The loss config.
    pub cfg: DistillConfig,
    /// `[batch, seq]` of the logits.
    pub dims: Dims,
    /// Vocabulary size.
    pub vocab: usize,
    /// First position of the slice.
    pub from: usize,
    /// Number of positions.
    pub len: usize,
    /// Validity of the slice's positions.
    pub valid: Vec<bool>,
}

/// Parses TRL `GKDTrainer.compute_loss`'s case.
pub(crate) fn gkd_setup(ctx: &Ctx) -> Result<SlicedJsd, Fail> {
    let cfg = DistillConfig::new(
        ctx.p_f64("beta")?,
        1.0,
        Reduction::BatchMean,
        ctx.p_opt_f64("num_items_in_batch")?,
    )?;
    let (dims, vocab) = dims3(ctx, "logits")?;
    let labels = ctx.i64("labels")?;
    check_len("labels", labels.len(), dims.len())?;
    let len = dims.seq.saturating_sub(1);
    let mut valid = Vec::with_capacity(dims.batch * len);
    for b in 0..dims.batch {
        for t in 0..len {
            valid.push(labels[b * dims.seq + t + 1] != IGNORE_INDEX);
        }
    }
    Ok(SlicedJsd {
        cfg,
        dims,
        vocab,
        from: 0,
        len,
        valid,
    })
}

fn trl_gkd_compute_loss<F: Real>(ctx: &Ctx) -> OpResult {
    let c = gkd_setup(ctx)?;
    sliced_jsd::<F>(ctx, &c.cfg, c.dims, c.vocab, c.from, c.len, &c.valid)
}

/// TRL `DistillationTrainer.compute_loss`: the completion positions of the
/// logits (`[-C-1, -1)`), batch mean over the completion mask,
/// `num_items_in_batch = max(buffered, 1)` (one process) when buffered.
fn trl_distillation_compute_loss<F: Real>(ctx: &Ctx) -> OpResult {
    let c = distillation_setup(ctx)?;
    sliced_jsd::<F>(ctx, &c.cfg, c.dims, c.vocab, c.from, c.len, &c.valid)
}

/// Parses TRL `DistillationTrainer.compute_loss`'s case.
pub(crate) fn distillation_setup(ctx: &Ctx) -> Result<SlicedJsd, Fail> {
    let num_items = ctx.p_opt_f64("_buffered_num_items")?.map(|n| n.max(1.0));
    let cfg = DistillConfig::new(
        ctx.p_f64("beta")?,
        ctx.p_f64("temperature")?,
        Reduction::BatchMean,
        num_items,
    )?;
    let (dims, vocab) = dims3(ctx, "logits")?;
    let cshape = ctx.shape("completion_mask")?;
    let completion = ctx.mask("completion_mask")?;
    let c_len = cshape.get(1).copied().unwrap_or(0);
    if cshape.first().copied().unwrap_or(0) != dims.batch || c_len + 1 > dims.seq {
        return Err(Fail::Op(posttrain_core::Error::Invalid {
            input: "completion_mask",
            rule: "must be [batch, C] with C + 1 ≤ the logits' sequence length",
        }));
    }
    Ok(SlicedJsd {
        cfg,
        dims,
        vocab,
        from: dims.seq - c_len - 1,
        len: c_len,
        valid: completion,
    })
}
