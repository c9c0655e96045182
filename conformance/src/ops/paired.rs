//! Handlers for the `paired` family: DPO and its family, reward-model
//! pairwise losses.

use crate::case::{Ctx, Fail, OpResult, Outputs};
use posttrain_core::error::check_len;
use posttrain_core::preference::paired::{
    dpo_from_logits, dpo_from_logits_scratch_len, implicit_rewards, paired_loss,
    pairwise_reward_loss, FDivergence, FDivergenceScores, LogitsPairBatch, LossTerm, PairBatch,
    PairGrads, PairedConfig, PairedLoss, Reference,
};
use posttrain_core::{Dims, Error, Preset, Real};
use serde_json::Value;

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    match op {
        "trl.dpo_loss" => Some(trl_dpo::<F>(ctx)),
        "openrlhf.dpo_loss" => Some(openrlhf_dpo::<F>(ctx)),
        "torchtune.dpo_loss"
        | "torchtune.ipo_loss"
        | "torchtune.rso_loss"
        | "torchtune.simpo_loss" => Some(torchtune_loss::<F>(op, ctx)),
        "openrlhf.pairwise_loss" | "openrlhf.log_exp_loss" => Some(openrlhf_pairwise::<F>(ctx)),
        "trl.reward_loss" => Some(trl_reward::<F>(ctx)),
        _ => None,
    }
}

/// TRL's `loss_type` (a string or a list) and `loss_weights` as terms.
pub fn trl_terms(ctx: &Ctx) -> Result<Vec<LossTerm>, Fail> {
    let names: Vec<String> = match ctx.param("loss_type") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| Fail::Harness("loss_type entry is not a string".into()))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(Fail::Harness("param `loss_type` missing".into())),
    };
    let mut kinds = Vec::with_capacity(names.len());
    for n in &names {
        match n.parse::<PairedLoss>() {
            Ok(k) => kinds.push(k),
            Err(_) => return Err(ctx.unsupported("loss_type")),
        }
    }
    let weights = ctx.p_opt_f64_list("loss_weights")?;
    if let Some(w) = &weights {
        check_len("loss_weights", w.len(), kinds.len())?;
    }
    Ok(kinds
        .iter()
        .enumerate()
        .map(|(i, &k)| LossTerm::weighted(k, weights.as_ref().map_or(1.0, |w| w[i])))
        .collect())
}

/// TRL `DPOTrainer`'s config and loss terms from the case parameters;
/// `f_divergence_scores` (`constants_dropped`, the default, or
/// `zero_at_reference`) selects TRL f2cd577's or TRL 1.16.0's
/// f-divergence scores ([`FDivergenceScores`]).
pub fn trl_dpo_config(ctx: &Ctx) -> Result<(PairedConfig, Vec<LossTerm>), Fail> {
    let terms = trl_terms(ctx)?;
    let div = match FDivergence::from_trl(
        ctx.p_str("f_divergence_type")?,
        ctx.p_f64("f_alpha_divergence_coef")?,
    ) {
        Ok(d) => d,
        Err(Error::UnknownOption { .. }) => return Err(ctx.unsupported("f_divergence_type")),
        Err(e) => return Err(e.into()),
    };
    // Which f-divergence scores the losses read (absent: TRL f2cd577's, the
    // vectors'; `zero_at_reference`: TRL 1.16.0's); another value is refused.
    let scores = match ctx.p_opt_str("f_divergence_scores")? {
        None => FDivergenceScores::default(),
        Some(s) => s
            .parse::<FDivergenceScores>()
            .map_err(|_| ctx.unsupported("f_divergence_scores"))?,
    };
    let cfg = PairedConfig::new(
        ctx.p_f64("beta")?,
        ctx.p_f64("label_smoothing")?,
        false,
        0.0,
        div,
        ctx.p_f64("discopop_tau")?,
    )?
    .with_divergence_scores(scores);
    Ok((cfg, terms))
}

fn trl_dpo<F: Real>(ctx: &Ctx) -> OpResult {
    let (cfg, terms) = trl_dpo_config(ctx)?;
    let shape = ctx.shape("logits")?;
    if shape.len() != 3 {
        return Err(Error::Invalid {
            input: "logits",
            rule: "must be [2B, T, V]",
        }
        .into());
    }
    let dims = ctx.dims("input_ids")?;
    let vocab = shape[2];
    check_len("logits", shape[0] * shape[1], dims.len())?;
    let logits = ctx.f::<F>("logits")?;
    let ids = ctx.i64("input_ids")?;
    let cmask = ctx.mask("completion_mask")?;
    let amask = ctx.mask("attention_mask")?;
    check_len("attention_mask", amask.len(), dims.len())?;
    let precomputed = ctx.p_bool("precompute_ref_log_probs")?;
    let (rc, rr, rl);
    let reference = if precomputed {
        rc = ctx.f::<F>("ref_chosen_logps")?;
        rr = ctx.f::<F>("ref_rejected_logps")?;
        Reference::Precomputed {
            chosen: &rc,
            rejected: &rr,
        }
    } else {
        rl = ctx.f::<F>("ref_logits")?;
        Reference::Logits(&rl)
    };
    let batch = LogitsPairBatch {
        dims,
        vocab,
        logits: &logits,
        input_ids: &ids,
        completion_mask: &cmask,
        reference,
        ld_alpha: ctx.p_opt_f64("ld_alpha")?,
        use_weighting: ctx.p_bool("use_weighting")?,
    };
    let mut scratch = vec![F::zero(); dpo_from_logits_scratch_len(dims)];
    let mut order = vec![0usize; dims.batch];
    let mut o = Outputs::new();
    let (out, tm) = if ctx.wants_grad("logits") {
        let mut g = vec![F::zero(); logits.len()];
        let cot = ctx.cot_scalar::<F>("loss")?;
        let r = dpo_from_logits(
            &cfg,
            &terms,
            &batch,
            Some((cot, &mut g)),
            &mut scratch,
            &mut order,
        )?;
        o.grad("logits", &g);
        r
    } else {
        dpo_from_logits(&cfg, &terms, &batch, None, &mut scratch, &mut order)?
    };
    let m = out.metrics;
    o.scalar("loss", out.loss)
        .scalar("entropy", tm.entropy)
        .scalar(
            "num_tokens",
            F::of_usize(amask.iter().filter(|&&b| b).count()),
        )
        .scalar("logits/chosen", tm.logits_chosen)
        .scalar("logits/rejected", tm.logits_rejected)
        .scalar("mean_token_accuracy", tm.token_accuracy)
        .scalar("rewards/chosen", m.reward_chosen)
        .scalar("rewards/rejected", m.reward_rejected)
        .scalar("rewards/accuracies", m.accuracy)
        .scalar("rewards/margins", m.margin)
        .scalar("logps/chosen", m.logps_chosen)
        .scalar("logps/rejected", m.logps_rejected);
    Ok(o)
}

struct SeqInputs<F> {
    pc: Vec<F>,
    pr: Vec<F>,
    rc: Option<Vec<F>>,
    rr: Option<Vec<F>>,
}

fn seq_inputs<F: Real>(ctx: &Ctx) -> Result<SeqInputs<F>, Fail> {
    Ok(SeqInputs {
        pc: ctx.f::<F>("policy_chosen_logps")?,
        pr: ctx.f::<F>("policy_rejected_logps")?,
        rc: ctx.f_opt::<F>("reference_chosen_logps")?,
        rr: ctx.f_opt::<F>("reference_rejected_logps")?,
    })
}

/// Runs the sequence-level loss; `per_pair_out` names the per-pair output
/// (torchtune) or `None` for the mean (OpenRLHF `loss`).
fn run_seq<F: Real>(
    ctx: &Ctx,
    cfg: &PairedConfig,
    kind: PairedLoss,
    x: &SeqInputs<F>,
    per_pair_out: Option<&str>,
) -> OpResult {
    let mut batch = PairBatch::new(&x.pc, &x.pr);
    if let (Some(rc), Some(rr)) = (&x.rc, &x.rr) {
        batch = batch.with_reference(rc, rr);
    }
    let n = x.pc.len();
    let terms = [LossTerm::new(kind)];
    let mut per_pair = vec![F::zero(); n];
    let mut dc = vec![F::zero(); n];
    let mut dr = vec![F::zero(); n];
    let want = ctx.wants_grad("policy_chosen_logps") || ctx.wants_grad("policy_rejected_logps");
    let cot_vec;
    let grads = if !want {
        None
    } else if let Some(name) = per_pair_out {
        cot_vec = ctx
            .cotangent::<F>(name)?
            .unwrap_or_else(|| vec![F::zero(); n]);
        Some(PairGrads::of_per_pair(&cot_vec, &mut dc, &mut dr))
    } else {
        Some(PairGrads::of_mean(
            ctx.cot_scalar::<F>("loss")?,
            &mut dc,
            &mut dr,
        ))
    };
    let has_grads = grads.is_some();
    let out = paired_loss(cfg, &terms, &batch, Some(&mut per_pair), grads, &mut [])?;
    let mut cr = vec![F::zero(); n];
    let mut rw = vec![F::zero(); x.pr.len()];
    implicit_rewards(cfg.beta, &x.pc, x.rc.as_deref(), &mut cr)?;
    implicit_rewards(cfg.beta, &x.pr, x.rr.as_deref(), &mut rw)?;
    let mut o = Outputs::new();
    match per_pair_out {
        Some(name) => o.put(name, &per_pair),
        None => o.scalar("loss", out.loss),
    };
    o.put("chosen_rewards", &cr).put("rejected_rewards", &rw);
    if has_grads {
        o.grad("policy_chosen_logps", &dc)
            .grad("policy_rejected_logps", &dr);
    }
    Ok(o)
}

/// OpenRLHF `DPOLoss`'s config and loss from the case parameters.
pub(crate) fn openrlhf_dpo_config(ctx: &Ctx) -> Result<(PairedConfig, PairedLoss), Fail> {
    let mut cfg = PairedConfig::preset(Preset::OpenRlhf, ctx.p_f64("beta")?)?;
    cfg.label_smoothing = ctx.p_f64("label_smoothing")?;
    cfg.validate()?;
    let kind = if ctx.p_bool("ipo")? {
        PairedLoss::Ipo
    } else {
        PairedLoss::Sigmoid
    };
    Ok((cfg, kind))
}

fn openrlhf_dpo<F: Real>(ctx: &Ctx) -> OpResult {
    let (cfg, kind) = openrlhf_dpo_config(ctx)?;
    run_seq(ctx, &cfg, kind, &seq_inputs::<F>(ctx)?, None)
}

fn torchtune_loss<F: Real>(op: &str, ctx: &Ctx) -> OpResult {
    let x = seq_inputs::<F>(ctx)?;
    let (cfg, kind) = torchtune_config(op, ctx)?;
    run_seq(ctx, &cfg, kind, &x, Some("losses"))
}

/// torchtune's loss config (`op` picks DPO, IPO, RSO or SimPO).
pub(crate) fn torchtune_config(op: &str, ctx: &Ctx) -> Result<(PairedConfig, PairedLoss), Fail> {
    let (cfg, kind) = match op {
        "torchtune.dpo_loss" => {
            let mut c = PairedConfig::preset(Preset::Torchtune, ctx.p_f64("beta")?)?;
            c.label_smoothing = ctx.p_f64("label_smoothing")?;
            (c, PairedLoss::Sigmoid)
        }
        "torchtune.ipo_loss" => (
            PairedConfig::preset(Preset::Torchtune, ctx.p_f64("tau")?)?,
            PairedLoss::Ipo,
        ),
        "torchtune.rso_loss" => (
            PairedConfig::preset(Preset::Torchtune, ctx.p_f64("gamma")?)?,
            PairedLoss::Hinge,
        ),
        _ => {
            let mut c = PairedConfig::preset(Preset::Torchtune, ctx.p_f64("beta")?)?;
            c.label_smoothing = ctx.p_f64("label_smoothing")?;
            c.target_margin = ctx.p_f64("gamma")?;
            (c, PairedLoss::Sigmoid)
        }
    };
    cfg.validate()?;
    Ok((cfg, kind))
}

fn openrlhf_pairwise<F: Real>(ctx: &Ctx) -> OpResult {
    let c = ctx.f::<F>("chosen_reward")?;
    let r = ctx.f::<F>("reject_reward")?;
    let m = ctx.f_opt::<F>("margin")?;
    let mut dc = vec![F::zero(); c.len()];
    let mut dr = vec![F::zero(); c.len()];
    let want = ctx.wants_grad("chosen_reward") || ctx.wants_grad("reject_reward");
    let cot = ctx.cot_scalar::<F>("loss")?;
    let out = pairwise_reward_loss(
        &c,
        &r,
        m.as_deref(),
        None,
        want.then_some((cot, &mut dc[..], &mut dr[..])),
    )?;
    let mut o = Outputs::new();
    o.scalar("loss", out.loss);
    if want {
        o.grad("chosen_reward", &dc).grad("reject_reward", &dr);
    }
    Ok(o)
}

fn trl_reward<F: Real>(ctx: &Ctx) -> OpResult {
    let logits = ctx.f::<F>("logits")?;
    let shape = ctx.shape("logits")?;
    if shape.len() == 2 && shape[1] != 1 {
        return Err(Error::Invalid {
            input: "logits",
            rule: "a reward model's logits are [2B, 1]",
        }
        .into());
    }
    if logits.len() % 2 != 0 {
        return Err(Error::Invalid {
            input: "logits",
            rule: "the batch must hold 2B rows: B chosen then B rejected",
        }
        .into());
    }
    let n = logits.len() / 2;
    let (c, r) = logits.split_at(n);
    let m = ctx.f_opt::<F>("margin")?;
    let amask = ctx.mask("attention_mask")?;
    let adims: Dims = ctx.dims("attention_mask")?;
    check_len("attention_mask rows", adims.batch, logits.len())?;
    let coef = ctx.p_opt_f64("center_rewards_coefficient")?;
    let want = ctx.wants_grad("logits");
    let mut g = vec![F::zero(); logits.len()];
    let (gc, gr) = g.split_at_mut(n);
    let cot = ctx.cot_scalar::<F>("loss")?;
    let out = pairwise_reward_loss(c, r, m.as_deref(), coef, want.then_some((cot, gc, gr)))?;
    let mut o = Outputs::new();
    o.scalar("loss", out.loss)
        .scalar(
            "num_tokens",
            F::of_usize(amask.iter().filter(|&&b| b).count()),
        )
        .scalar("min_reward", out.min_reward)
        .scalar("mean_reward", out.mean_reward)
        .scalar("max_reward", out.max_reward)
        .scalar("accuracy", out.accuracy)
        .scalar("margin", out.margin);
    if want {
        o.grad("logits", &g);
    }
    Ok(o)
}
