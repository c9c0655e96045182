//! Log-softmax, entropy, `Σπ²`, sequence log-probabilities and the entropy
//! loss on burn tensors.

use super::as2;
use crate::case::{Ctx, Fail, OpResult, Outputs};
use crate::ops::logits::{
    batch_log_probs_config, cot_vec, entropy_loss_mode, logits_dims, temperature,
};
use posttrain_burn::burn::tensor::{Int, Tensor, TensorData};
use posttrain_burn::{mask2, tensor1, tensor2, tensor3, to_vec, Device};
use posttrain_core::aggregate::GlobalNorm;

/// Runs `op` if it is a logits op.
pub fn run(op: &str, ctx: &Ctx, d: &Device) -> Option<OpResult> {
    Some(match op {
        "trl.selective_log_softmax" => gather(ctx, d, "index", "per_token_logps", None),
        "verl.logprobs_from_logits" => gather(ctx, d, "labels", "log_probs", None),
        "openrlhf.log_probs_from_logits" => {
            gather(ctx, d, "labels", "log_probs", Some("temperature"))
        }
        "torchtune.logits_to_logprobs" => {
            gather(ctx, d, "sequences", "logprobs", Some("temperature"))
        }
        "trl.entropy_from_logits" => per_row(ctx, d, "entropies", false),
        "verl.entropy_from_logits" | "openrlhf.compute_entropy" => {
            per_row(ctx, d, "entropy", false)
        }
        "verl.calculate_sum_pi_squared_from_logits" => per_row(ctx, d, "sum_pi_squared", true),
        "torchtune.get_batch_log_probs" => batch_log_probs(ctx, d),
        "verl.compute_entropy_loss" => entropy_loss(ctx, d),
        _ => return None,
    })
}

/// `[rows, vocab]` logits as a `[1, rows, vocab]` tensor.
fn logits3(ctx: &Ctx, d: &Device) -> Result<(Tensor<3>, usize, usize), Fail> {
    let [rows, vocab] = as2(&ctx.shape("logits")?);
    let z = tensor3(&ctx.f::<f64>("logits")?, [1, rows, vocab], d)?;
    Ok((z, rows, vocab))
}

fn gather(ctx: &Ctx, d: &Device, ids: &str, out_name: &str, temp_key: Option<&str>) -> OpResult {
    let t = temperature(ctx, temp_key)?;
    let (z, rows, _) = logits3(ctx, d)?;
    let index = ctx.i64(ids)?;
    // An index with as many axes as the logits carries k ids per row (top-k).
    let k = match (ctx.shape(ids)?, ctx.shape("logits")?) {
        (si, sl) if si.len() == sl.len() => si.last().copied().unwrap_or(1),
        _ => 1,
    };
    posttrain_core::error::check_len("targets", index.len(), rows * k)?;
    let targets = Tensor::<3, Int>::from_data(TensorData::new(index, [1, rows, k]), d);
    let cot = cot_vec::<f64>(ctx, out_name, rows * k)?
        .map(|c| tensor3(&c, [1, rows, k], d))
        .transpose()?;
    let (lp, g) = posttrain_burn::logits::gather_log_softmax(z, targets, t, cot)?;
    let mut o = Outputs::new();
    if let Some(g) = g {
        o.grad("logits", &to_vec(g));
    }
    o.put(out_name, &to_vec(lp));
    Ok(o)
}

fn per_row(ctx: &Ctx, d: &Device, out_name: &str, pi_squared: bool) -> OpResult {
    let (z, rows, _) = logits3(ctx, d)?;
    let cot = cot_vec::<f64>(ctx, out_name, rows)?
        .map(|c| tensor2(&c, [1, rows], d))
        .transpose()?;
    let (h, g) = if pi_squared {
        posttrain_burn::logits::sum_pi_squared(z, cot)?
    } else {
        posttrain_burn::logits::entropy_from_logits(z, cot)?
    };
    let mut o = Outputs::new();
    if let Some(g) = g {
        o.grad("logits", &to_vec(g));
    }
    o.put(out_name, &to_vec(h));
    Ok(o)
}

fn batch_log_probs(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = batch_log_probs_config(ctx)?;
    let (dims, vocab) = logits_dims(ctx)?;
    let z = tensor3(&ctx.f::<f64>("logits")?, [dims.batch, dims.seq, vocab], d)?;
    let labels = ctx.i64("labels")?;
    posttrain_core::error::check_len("labels", labels.len(), dims.len())?;
    let labels = Tensor::<2, Int>::from_data(TensorData::new(labels, [dims.batch, dims.seq]), d);
    let cot = cot_vec::<f64>(ctx, "logps", dims.batch)?.map(|c| tensor1(&c, d));
    let (lp, g) = posttrain_burn::logits::sequence_log_probs(&cfg, z, labels, cot)?;
    let mut o = Outputs::new();
    if let Some(g) = g {
        o.grad("logits", &to_vec(g));
    }
    o.put("logps", &to_vec(lp));
    Ok(o)
}

fn entropy_loss(ctx: &Ctx, d: &Device) -> OpResult {
    let mode = entropy_loss_mode(ctx)?;
    let (dims, vocab) = logits_dims(ctx)?;
    let z = tensor3(&ctx.f::<f64>("logits")?, [dims.batch, dims.seq, vocab], d)?;
    let mask = mask2(&ctx.mask("response_mask")?, [dims.batch, dims.seq], d)?;
    let cot = if ctx.has_vjp() {
        Some(ctx.cot_scalar::<f64>("entropy_loss")?)
    } else {
        None
    };
    let (l, g) = posttrain_burn::logits::entropy_loss(mode, &GlobalNorm::default(), z, &mask, cot)?;
    let mut o = Outputs::new();
    if let Some(g) = g {
        o.grad("logits", &to_vec(g));
    }
    o.scalar("entropy_loss", to_vec(l)[0]);
    Ok(o)
}
