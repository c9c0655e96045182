//! torchtune's GRPO losses and `truncate_sequence_for_logprobs` on burn
//! tensors: handlers for the `burn-*` backends. Parameters are parsed by the
//! core handlers' own functions ([`crate::ops::sequence_mean`]); the math
//! runs in [`posttrain_burn::grpo`].

use super::as2;
use crate::case::{Ctx, Fail, OpResult, Outputs};
use crate::ops::sequence_mean::{config, dims3, record};
use posttrain_burn::burn::tensor::{Int, TensorData};
use posttrain_burn::grpo::SequenceMeanTensors;
use posttrain_burn::{mask2, tensor1, tensor2, tensor3, to_vec, Device, Tensor};
use posttrain_core::policy::sequence_mean::{SequenceMeanOutput, TokenCountGuard};

/// Runs `op` if this family owns it.
pub fn run(op: &str, ctx: &Ctx, d: &Device) -> Option<OpResult> {
    Some(match op {
        "torchtune.grpo_loss" | "torchtune.grpo_completion_loss" | "torchtune.grpo_simple_loss" => {
            from_log_probs(op, ctx, d)
        }
        "torchtune.grpo_with_chunked_output_loss" => from_logits(ctx, d),
        "torchtune.linear_grpo_loss" => from_hidden(ctx, d),
        "torchtune.truncate_sequence_for_logprobs" => truncate(ctx, d),
        _ => return None,
    })
}

fn scalars(t: SequenceMeanTensors) -> SequenceMeanOutput<f64> {
    let s = |v: Tensor<1>| to_vec(v)[0];
    SequenceMeanOutput {
        loss: s(t.loss),
        policy_loss: s(t.policy_loss),
        kl_loss: s(t.kl_loss),
        ratio_mean: s(t.ratio_mean),
        clipfrac: s(t.clipfrac),
    }
}

fn mask_opt(
    ctx: &Ctx,
    shape: [usize; 2],
    d: &Device,
) -> Result<Option<Tensor<2, posttrain_burn::Bool>>, Fail> {
    match ctx.mask_opt("padding_masks")? {
        Some(m) => Ok(Some(mask2(&m, shape, d)?)),
        None => Ok(None),
    }
}

fn targets(ctx: &Ctx, name: &str, shape: [usize; 2], d: &Device) -> Result<Tensor<2, Int>, Fail> {
    let t = ctx.i64(name)?;
    posttrain_core::error::check_len("targets", t.len(), shape[0] * shape[1])?;
    Ok(Tensor::from_data(TensorData::new(t, shape), d))
}

fn scaled(ctx: &Ctx, g: Vec<f64>) -> Result<Vec<f64>, Fail> {
    let c = ctx.cot_scalar::<f64>("loss")?;
    Ok(g.iter().map(|x| x * c).collect())
}

fn from_log_probs(op: &str, ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = config(ctx)?;
    let shape = as2(&ctx.shape("pi_logprobs")?);
    let old = tensor2(&ctx.f::<f64>("pi_old_logprobs")?, shape, d)?;
    let lp = tensor2(&ctx.f::<f64>("pi_logprobs")?, shape, d)?;
    let rf = tensor2(&ctx.f::<f64>("ref_logprobs")?, shape, d)?;
    let adv = tensor1(&ctx.f::<f64>("advantages")?, d);
    let mask = mask_opt(ctx, shape, d)?;
    let (out, g) = match op {
        "torchtune.grpo_loss" => {
            posttrain_burn::grpo::token_clipped_loss(&cfg, old, lp, rf, adv, mask.as_ref())?
        }
        "torchtune.grpo_completion_loss" => {
            posttrain_burn::grpo::completion_clipped_loss(&cfg, old, lp, rf, adv, mask.as_ref())?
        }
        _ => {
            // GRPOSimpleLoss ignores `pi_old_logprobs` (its shape was checked above).
            let guard = TokenCountGuard::TORCHTUNE_SIMPLE;
            posttrain_burn::grpo::on_policy_loss(&cfg, guard, lp, rf, adv, mask.as_ref())?
        }
    };
    let mut o = Outputs::new();
    record(&mut o, &scalars(out));
    if ctx.wants_grad("pi_logprobs") {
        o.grad("pi_logprobs", &scaled(ctx, to_vec(g))?);
    }
    Ok(o)
}

fn from_logits(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = config(ctx)?;
    let (dims, vocab) = dims3(ctx, "pi_logits")?;
    let shape = [dims.batch, dims.seq];
    let logits = tensor3(
        &ctx.f::<f64>("pi_logits")?,
        [dims.batch, dims.seq, vocab],
        d,
    )?;
    let t = targets(ctx, "targets", shape, d)?;
    let rf = tensor2(&ctx.f::<f64>("ref_logprobs")?, shape, d)?;
    let adv = tensor1(&ctx.f::<f64>("advantages")?, d);
    let mask = mask_opt(ctx, shape, d)?;
    let want = ctx.wants_grad("pi_logits");
    let r = posttrain_burn::grpo::on_policy_loss_from_logits(
        &cfg,
        TokenCountGuard::TORCHTUNE_CHUNKED,
        logits,
        t,
        Some(-100),
        rf,
        adv,
        mask.as_ref(),
        want,
    )?;
    let mut o = Outputs::new();
    record(&mut o, &scalars(r.out));
    o.put("pi_logprobs", &to_vec(r.log_probs));
    if let Some(g) = r.grad_logits {
        o.grad("pi_logits", &scaled(ctx, to_vec(g))?);
    }
    Ok(o)
}

fn from_hidden(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = config(ctx)?;
    let (dims, hidden_dim) = dims3(ctx, "pi_old_outputs")?;
    let shape = [dims.batch, dims.seq];
    let wshape = match ctx.shape("weight")?.as_slice() {
        [v, h] => [*v, *h],
        _ => return Err(Fail::Harness("input `weight` must have rank 2".into())),
    };
    let hidden = tensor3(
        &ctx.f::<f64>("pi_old_outputs")?,
        [dims.batch, dims.seq, hidden_dim],
        d,
    )?;
    let weight = tensor2(&ctx.f::<f64>("weight")?, wshape, d)?;
    let t = targets(ctx, "pi_outputs", shape, d)?;
    let rf = tensor2(&ctx.f::<f64>("ref_outputs")?, shape, d)?;
    let adv = tensor1(&ctx.f::<f64>("advantages")?, d);
    let mask = mask_opt(ctx, shape, d)?;
    let ignore = ctx.p_i64("ignore_index")?;
    let want = ctx.wants_grad("pi_old_outputs") || ctx.wants_grad("weight");
    let r = posttrain_burn::grpo::on_policy_loss_from_hidden(
        &cfg,
        TokenCountGuard::TORCHTUNE_CHUNKED,
        hidden,
        weight,
        t,
        Some(ignore),
        rf,
        adv,
        mask.as_ref(),
        want,
    )?;
    let mut o = Outputs::new();
    record(&mut o, &scalars(r.out));
    o.put("pi_logprobs", &to_vec(r.log_probs));
    if let Some((gh, gw)) = r.grads {
        o.grad("pi_old_outputs", &scaled(ctx, to_vec(gh))?)
            .grad("weight", &scaled(ctx, to_vec(gw))?);
    }
    Ok(o)
}

fn truncate(ctx: &Ctx, d: &Device) -> OpResult {
    let (dims, vocab) = dims3(ctx, "query_response_logits")?;
    let ctx_len = ctx.p_i64("context_length")?;
    let context = usize::try_from(ctx_len).map_err(|_| posttrain_core::Error::OutOfRange {
        param: "context_length",
        value: ctx_len as f64,
        rule: "must lie in [1, sequence length]",
    })?;
    let logits = tensor3(
        &ctx.f::<f64>("query_response_logits")?,
        [dims.batch, dims.seq, vocab],
        d,
    )?;
    let out = posttrain_burn::grpo::truncate_for_logprobs(logits, context)?;
    let [b, resp, v] = out.dims();
    let mut o = Outputs::new();
    o.put("logits", &to_vec(out));
    if let Some(cot) = ctx.cotangent::<f64>("logits")? {
        let cot = tensor3(&cot, [b, resp, v], d)?;
        let g = posttrain_burn::grpo::truncate_for_logprobs_vjp(cot, dims.seq, context)?;
        o.grad("query_response_logits", &to_vec(g));
    }
    Ok(o)
}
