//! Log-softmax, entropy and other logits ops on burn tensors.

use super::as2;
use crate::case::{Ctx, Fail, OpResult, Outputs};
use crate::ops::logits::cot_vec;
use posttrain_burn::burn::tensor::{Int, Tensor, TensorData};
use posttrain_burn::{tensor2, tensor3, to_vec, Device};
use posttrain_core::logits::Temperature;

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
        "trl.entropy_from_logits" => entropy(ctx, d, "entropies"),
        "verl.entropy_from_logits" | "openrlhf.compute_entropy" => entropy(ctx, d, "entropy"),
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
    if ctx.shape(ids)?.len() == ctx.shape("logits")?.len() {
        return Err(ctx.unsupported(ids)); // top-k ids per row
    }
    let t = match temp_key.map(|k| ctx.p_opt_f64(k)).transpose()?.flatten() {
        Some(t) => Temperature::new(t)?,
        None => Temperature::ONE,
    };
    let (z, rows, _) = logits3(ctx, d)?;
    let index = ctx.i64(ids)?;
    posttrain_core::error::check_len("targets", index.len(), rows)?;
    let targets = Tensor::<2, Int>::from_data(TensorData::new(index, [1, rows]), d);
    let cot = cot_vec::<f64>(ctx, out_name, rows)?
        .map(|c| tensor2(&c, [1, rows], d))
        .transpose()?;
    let (lp, g) = posttrain_burn::logits::selective_log_softmax(z, targets, t, cot)?;
    let mut o = Outputs::new();
    if let Some(g) = g {
        o.grad("logits", &to_vec(g));
    }
    o.put(out_name, &to_vec(lp));
    Ok(o)
}

fn entropy(ctx: &Ctx, d: &Device, out_name: &str) -> OpResult {
    let (z, rows, _) = logits3(ctx, d)?;
    let cot = cot_vec::<f64>(ctx, out_name, rows)?
        .map(|c| tensor2(&c, [1, rows], d))
        .transpose()?;
    let (h, g) = posttrain_burn::logits::entropy_from_logits(z, cot)?;
    let mut o = Outputs::new();
    if let Some(g) = g {
        o.grad("logits", &to_vec(g));
    }
    o.put(out_name, &to_vec(h));
    Ok(o)
}
