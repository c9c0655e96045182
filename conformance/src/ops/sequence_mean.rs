//! Handlers for the per-sequence-mean policy losses: torchtune's GRPO losses
//! (token, completion, on-policy, chunked-logits, fused linear projection)
//! and `truncate_sequence_for_logprobs`.

use crate::case::{Ctx, Fail, OpResult, Outputs};
use posttrain_core::policy::sequence_mean::{
    completion_clipped_loss, on_policy_loss, on_policy_loss_from_hidden,
    on_policy_loss_from_logits, token_clipped_loss, truncate_for_logprobs,
    truncate_for_logprobs_vjp, HiddenGrads, SequenceMeanConfig, SequenceMeanOutput,
    TokenCountGuard,
};
use posttrain_core::{Dims, Real};

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    match op {
        "torchtune.grpo_loss" | "torchtune.grpo_completion_loss" | "torchtune.grpo_simple_loss" => {
            Some(from_log_probs::<F>(op, ctx))
        }
        "torchtune.grpo_with_chunked_output_loss" => Some(from_logits::<F>(ctx)),
        "torchtune.linear_grpo_loss" => Some(from_hidden::<F>(ctx)),
        "torchtune.truncate_sequence_for_logprobs" => Some(truncate::<F>(ctx)),
        _ => None,
    }
}

pub(crate) fn config(ctx: &Ctx) -> Result<SequenceMeanConfig, Fail> {
    Ok(SequenceMeanConfig::new(
        ctx.p_f64("epsilon")?,
        ctx.p_f64("kl_coeff")?,
    )?)
}

pub(crate) fn record<F: Real>(o: &mut Outputs, out: &SequenceMeanOutput<F>) {
    o.scalar("loss", out.loss)
        .scalar("policy_loss", out.policy_loss)
        .scalar("kl_loss", out.kl_loss)
        .scalar("ratios", out.ratio_mean)
        .scalar("clipfrac", out.clipfrac);
}

/// `[rows, cols, last]` of a rank-3 input.
pub(crate) fn dims3(ctx: &Ctx, name: &str) -> Result<(Dims, usize), Fail> {
    let s = ctx.shape(name)?;
    if s.len() != 3 {
        return Err(Fail::Harness(format!("input `{name}` must have rank 3")));
    }
    Ok((Dims::new(s[0], s[1]), s[2]))
}

fn from_log_probs<F: Real>(op: &str, ctx: &Ctx) -> OpResult {
    let cfg = config(ctx)?;
    let dims = ctx.dims("pi_logprobs")?;
    let old = ctx.f::<F>("pi_old_logprobs")?;
    let lp = ctx.f::<F>("pi_logprobs")?;
    let rf = ctx.f::<F>("ref_logprobs")?;
    let adv = ctx.f::<F>("advantages")?;
    let mask = ctx.mask_opt("padding_masks")?;
    let mask = mask.as_deref();
    let want = ctx.wants_grad("pi_logprobs");
    let mut g = vec![F::zero(); if want { dims.len() } else { 0 }];
    let grad = want.then_some(g.as_mut_slice());
    let out = match op {
        "torchtune.grpo_loss" => token_clipped_loss(&cfg, dims, &old, &lp, &rf, &adv, mask, grad)?,
        "torchtune.grpo_completion_loss" => {
            completion_clipped_loss(&cfg, dims, &old, &lp, &rf, &adv, mask, grad)?
        }
        _ => {
            // GRPOSimpleLoss ignores `pi_old_logprobs`; its shape is still checked.
            posttrain_core::error::check_len("pi_old_logprobs", old.len(), dims.len())?;
            let guard = TokenCountGuard::TORCHTUNE_SIMPLE;
            on_policy_loss(&cfg, guard, dims, &lp, &rf, &adv, mask, grad)?
        }
    };
    let mut o = Outputs::new();
    record(&mut o, &out);
    if want {
        let c = ctx.cot_scalar::<F>("loss")?;
        g.iter_mut().for_each(|x| *x *= c);
        o.grad("pi_logprobs", &g);
    }
    Ok(o)
}

fn from_logits<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = config(ctx)?;
    let (dims, vocab) = dims3(ctx, "pi_logits")?;
    let logits = ctx.f::<F>("pi_logits")?;
    let targets = ctx.i64("targets")?;
    let rf = ctx.f::<F>("ref_logprobs")?;
    let adv = ctx.f::<F>("advantages")?;
    let mask = ctx.mask_opt("padding_masks")?;
    let want = ctx.wants_grad("pi_logits");
    let mut lp = vec![F::zero(); dims.len()];
    let mut g = vec![F::zero(); if want { logits.len() } else { 0 }];
    let out = on_policy_loss_from_logits(
        &cfg,
        TokenCountGuard::TORCHTUNE_CHUNKED,
        dims,
        vocab,
        &logits,
        &targets,
        Some(-100),
        &rf,
        &adv,
        mask.as_deref(),
        &mut lp,
        want.then_some(g.as_mut_slice()),
    )?;
    let mut o = Outputs::new();
    record(&mut o, &out);
    o.put("pi_logprobs", &lp);
    if want {
        let c = ctx.cot_scalar::<F>("loss")?;
        g.iter_mut().for_each(|x| *x *= c);
        o.grad("pi_logits", &g);
    }
    Ok(o)
}

fn from_hidden<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = config(ctx)?;
    let (dims, hidden_dim) = dims3(ctx, "pi_old_outputs")?;
    let wshape = ctx.shape("weight")?;
    let vocab = match wshape.as_slice() {
        [v, _] => *v,
        _ => return Err(Fail::Harness("input `weight` must have rank 2".into())),
    };
    let hidden = ctx.f::<F>("pi_old_outputs")?;
    let weight = ctx.f::<F>("weight")?;
    let targets = ctx.i64("pi_outputs")?;
    let rf = ctx.f::<F>("ref_outputs")?;
    let adv = ctx.f::<F>("advantages")?;
    let mask = ctx.mask_opt("padding_masks")?;
    let ignore = ctx.p_i64("ignore_index")?;
    let want = ctx.wants_grad("pi_old_outputs") || ctx.wants_grad("weight");
    let mut lp = vec![F::zero(); dims.len()];
    let mut scratch = vec![F::zero(); vocab];
    let (mut gh, mut gw) = (vec![F::zero(); hidden.len()], vec![F::zero(); weight.len()]);
    let grads = want.then_some(HiddenGrads {
        hidden: &mut gh,
        weight: &mut gw,
    });
    let out = on_policy_loss_from_hidden(
        &cfg,
        TokenCountGuard::TORCHTUNE_CHUNKED,
        dims,
        hidden_dim,
        vocab,
        &hidden,
        &weight,
        &targets,
        Some(ignore),
        &rf,
        &adv,
        mask.as_deref(),
        &mut lp,
        &mut scratch,
        grads,
    )?;
    let mut o = Outputs::new();
    record(&mut o, &out);
    o.put("pi_logprobs", &lp);
    if want {
        let c = ctx.cot_scalar::<F>("loss")?;
        gh.iter_mut().for_each(|x| *x *= c);
        gw.iter_mut().for_each(|x| *x *= c);
        o.grad("pi_old_outputs", &gh).grad("weight", &gw);
    }
    Ok(o)
}

fn truncate<F: Real>(ctx: &Ctx) -> OpResult {
    let (dims, vocab) = dims3(ctx, "query_response_logits")?;
    let ctx_len = ctx.p_i64("context_length")?;
    let context = usize::try_from(ctx_len).map_err(|_| posttrain_core::Error::OutOfRange {
        param: "context_length",
        value: ctx_len as f64,
        rule: "must lie in [1, sequence length]",
    })?;
    let logits = ctx.f::<F>("query_response_logits")?;
    let resp = dims.seq.saturating_sub(context);
    let mut out = vec![F::zero(); dims.batch * resp * vocab];
    truncate_for_logprobs(&logits, dims.batch, dims.seq, vocab, context, &mut out)?;
    let mut o = Outputs::new();
    o.put("logits", &out);
    if let Some(cot) = ctx.cotangent::<F>("logits")? {
        let mut g = vec![F::zero(); logits.len()];
        truncate_for_logprobs_vjp(&cot, dims.batch, dims.seq, vocab, context, &mut g)?;
        o.grad("query_response_logits", &g);
    }
    Ok(o)
}
