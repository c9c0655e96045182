//! Handlers for the `unpaired` family: KTO (TRL, OpenRLHF, OpenRLHF vanilla),
//! BCO (TRL) and the process-reward-model loss (OpenRLHF).

use crate::case::{Ctx, Fail, OpResult, Outputs};
use posttrain_core::logits::entropy_from_logits;
use posttrain_core::preference::odds_ratio::{shifted_sequence_logps, shifted_sequence_logps_vjp};
use posttrain_core::preference::unpaired::{
    bco_loss, kto_kl_baseline, kto_loss, prm_hard_loss, prm_soft_loss, vanilla_kto_loss, KtoConfig,
    KtoLossType, PrmConfig, RunningMoments,
};
use posttrain_core::{Dims, Real};

/// Runs `op` if this family knows it.
pub fn run<F: Real>(op: &str, ctx: &Ctx) -> Option<OpResult> {
    match op {
        "trl.kto_loss" => Some(trl_kto::<F>(ctx)),
        "openrlhf.kto_loss" => Some(openrlhf_kto::<F>(ctx)),
        "openrlhf.vanilla_kto_loss" => Some(openrlhf_vanilla_kto::<F>(ctx)),
        "trl.bco_loss" => Some(trl_bco::<F>(ctx)),
        "openrlhf.prm_loss" => Some(openrlhf_prm::<F>(ctx)),
        _ => None,
    }
}

pub(crate) fn vocab_of(ctx: &Ctx, name: &str) -> Result<usize, Fail> {
    let s = ctx.shape(name)?;
    match s.len() {
        3 => Ok(s[2]),
        _ => Err(Fail::Harness(format!(
            "`{name}` must be [batch, seq, vocab]"
        ))),
    }
}

/// Sequence log-probs with the inputs they came from.
struct SeqLogps<F> {
    logps: Vec<F>,
    logits: Vec<F>,
    dims: Dims,
    vocab: usize,
    ids: Vec<i64>,
    mask: Vec<bool>,
}

/// Sequence log-prob sums over the shifted completion mask of one
/// `(logits, input_ids, completion_mask)` triple.
fn completion_logps<F: Real>(
    ctx: &Ctx,
    logits: &str,
    ids: &str,
    mask: &str,
) -> Result<SeqLogps<F>, Fail> {
    let z = ctx.f::<F>(logits)?;
    let dims = ctx.dims(ids)?;
    let vocab = vocab_of(ctx, logits)?;
    let t = ctx.i64(ids)?;
    let m = ctx.mask(mask)?;
    let mut out = vec![F::zero(); dims.batch];
    shifted_sequence_logps(&z, dims, vocab, &t, &m, false, &mut out)?;
    Ok(SeqLogps {
        logps: out,
        logits: z,
        dims,
        vocab,
        ids: t,
        mask: m,
    })
}

/// TRL `KTOTrainer`'s config from the case parameters.
pub(crate) fn trl_kto_config(ctx: &Ctx) -> Result<KtoConfig, Fail> {
    let loss_type: KtoLossType = match ctx.p_str("loss_type")?.parse() {
        Ok(t) => t,
        Err(_) => return Err(ctx.unsupported("loss_type")),
    };
    Ok(KtoConfig::new(
        loss_type,
        ctx.p_f64("beta")?,
        ctx.p_f64("desirable_weight")?,
        ctx.p_f64("undesirable_weight")?,
    )?)
}

fn trl_kto<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = trl_kto_config(ctx)?;
    let (loss_type, beta) = (cfg.loss_type, cfg.beta);
    let SeqLogps {
        logps: lp,
        logits: z,
        dims,
        vocab,
        ids,
        mask: cmask,
    } = completion_logps::<F>(ctx, "logits", "input_ids", "completion_mask")?;
    let labels = ctx.mask("label")?;
    let ref_lp = if ctx.has("ref_logps") {
        ctx.f::<F>("ref_logps")?
    } else {
        completion_logps::<F>(ctx, "ref_logits", "input_ids", "completion_mask")?.logps
    };
    posttrain_core::error::check_len("ref_logps", ref_lp.len(), lp.len())?;
    let kl = if loss_type.uses_kl() {
        let kl_lp =
            completion_logps::<F>(ctx, "KL_logits", "KL_input_ids", "KL_completion_mask")?.logps;
        let ref_kl = if ctx.has("ref_KL_logps") {
            ctx.f::<F>("ref_KL_logps")?
        } else {
            completion_logps::<F>(ctx, "ref_KL_logits", "KL_input_ids", "KL_completion_mask")?.logps
        };
        kto_kl_baseline(&kl_lp, &ref_kl)?
    } else {
        F::zero()
    };
    let lr: Vec<F> = lp.iter().zip(&ref_lp).map(|(&a, &b)| a - b).collect();
    let mut dlr = vec![F::zero(); lr.len()];
    let loss = kto_loss(&cfg, &lr, &labels, kl, Some(&mut dlr))?;

    let mut o = Outputs::new();
    o.scalar("loss", loss).scalar("kl", kl);
    if ctx.wants_grad("logits") {
        let c = ctx.cot_scalar::<F>("loss")?;
        let cot: Vec<F> = dlr.iter().map(|&d| c * d).collect();
        let mut g = vec![F::zero(); z.len()];
        let mut scratch = vec![F::zero(); vocab];
        shifted_sequence_logps_vjp(
            &z,
            dims,
            vocab,
            &ids,
            &cmask,
            false,
            &cot,
            &mut g,
            &mut scratch,
        )?;
        o.grad("logits", &g);
    }

    // Metrics over the shifted completion positions (logits row t predicts token t+1).
    let (mut ent_sum, mut ntok) = (F::zero(), 0usize);
    let mut side_logits = [F::zero(); 2];
    let mut side_tokens = [0usize; 2];
    let mut ent = [F::zero()];
    for b in 0..dims.batch {
        for t in 0..dims.seq.saturating_sub(1) {
            if !cmask[b * dims.seq + t + 1] {
                continue;
            }
            let r = (b * dims.seq + t) * vocab;
            let row = &z[r..r + vocab];
            entropy_from_logits(row, 1, vocab, &mut ent, None)?;
            ent_sum += ent[0];
            ntok += 1;
            let side = if labels[b] { 0 } else { 1 };
            side_logits[side] += row.iter().copied().sum::<F>() / F::of_usize(vocab);
            side_tokens[side] += 1;
        }
    }
    let ratio = |s: F, n: usize| {
        if n == 0 {
            F::zero()
        } else {
            s / F::of_usize(n)
        }
    };
    o.scalar("entropy", ratio(ent_sum, ntok));
    let attn = ctx.mask("attention_mask")?;
    o.scalar(
        "num_tokens",
        F::of_usize(attn.iter().filter(|&&m| m).count()),
    );
    o.scalar("logits/chosen", ratio(side_logits[0], side_tokens[0]));
    o.scalar("logits/rejected", ratio(side_logits[1], side_tokens[1]));
    let b = F::of(beta);
    let nansum = |want: bool, f: &dyn Fn(usize) -> F| {
        (0..lr.len())
            .filter(|&i| labels[i] == want)
            .map(f)
            .filter(|v| !v.is_nan())
            .fold(F::zero(), |a, v| a + v)
    };
    let n_ch = labels.iter().filter(|&&l| l).count();
    let n_rj = labels.len() - n_ch;
    let rc = ratio(nansum(true, &|i| b * lr[i]), n_ch);
    let rr = ratio(nansum(false, &|i| b * lr[i]), n_rj);
    o.scalar("rewards/chosen", rc)
        .scalar("rewards/rejected", rr)
        .scalar("logps/chosen", ratio(nansum(true, &|i| lp[i]), n_ch))
        .scalar("logps/rejected", ratio(nansum(false, &|i| lp[i]), n_rj))
        .scalar("rewards/margins", rc - rr);
    Ok(o)
}

fn logratios<F: Real>(ctx: &Ctx, policy: &str, reference: &str) -> Result<Vec<F>, Fail> {
    let p = ctx.f::<F>(policy)?;
    let r = ctx.f::<F>(reference)?;
    posttrain_core::error::check_len("reference logps", r.len(), p.len())?;
    Ok(p.iter().zip(&r).map(|(&a, &b)| a - b).collect())
}

/// OpenRLHF `KTOLoss`'s config (single process only).
pub(crate) fn openrlhf_kto_config(ctx: &Ctx) -> Result<KtoConfig, Fail> {
    if ctx.p_i64("world_size")? != 1 {
        return Err(ctx.unsupported("world_size"));
    }
    Ok(KtoConfig::new(
        KtoLossType::Kto,
        ctx.p_f64("beta")?,
        ctx.p_f64("desirable_weight")?,
        ctx.p_f64("undesirable_weight")?,
    )?)
}

fn openrlhf_kto<F: Real>(ctx: &Ctx) -> OpResult {
    let cfg = openrlhf_kto_config(ctx)?;
    let beta = cfg.beta;
    let c = logratios::<F>(ctx, "policy_chosen_logps", "reference_chosen_logps")?;
    let r = logratios::<F>(ctx, "policy_rejected_logps", "reference_rejected_logps")?;
    let kl = kto_kl_baseline(
        &ctx.f::<F>("policy_KL_logps")?,
        &ctx.f::<F>("reference_KL_logps")?,
    )?;
    let all: Vec<F> = c.iter().chain(&r).copied().collect();
    let labels: Vec<bool> = (0..all.len()).map(|i| i < c.len()).collect();
    let mut g = vec![F::zero(); all.len()];
    let loss = kto_loss(&cfg, &all, &labels, kl, Some(&mut g))?;
    let cot = ctx.cot_scalar::<F>("losses")?;
    let b = F::of(beta);
    let mut o = Outputs::new();
    o.scalar("losses", loss)
        .put(
            "chosen_rewards",
            &c.iter().map(|&x| b * x).collect::<Vec<_>>(),
        )
        .put(
            "rejected_rewards",
            &r.iter().map(|&x| b * x).collect::<Vec<_>>(),
        )
        .scalar("KL", kl)
        .grad(
            "policy_chosen_logps",
            &g[..c.len()].iter().map(|&d| cot * d).collect::<Vec<_>>(),
        )
        .grad(
            "policy_rejected_logps",
            &g[c.len()..].iter().map(|&d| cot * d).collect::<Vec<_>>(),
        );
    Ok(o)
}

fn openrlhf_vanilla_kto<F: Real>(ctx: &Ctx) -> OpResult {
    let beta = ctx.p_f64("beta")?;
    let c = logratios::<F>(ctx, "policy_chosen_logps", "reference_chosen_logps")?;
    let r = logratios::<F>(ctx, "policy_rejected_logps", "reference_rejected_logps")?;
    let mut dc = vec![F::zero(); c.len()];
    let mut dr = vec![F::zero(); r.len()];
    let loss = vanilla_kto_loss(beta, &c, &r, Some((&mut dc, &mut dr)))?;
    let cot = ctx.cot_scalar::<F>("losses")?;
    let b = F::of(beta);
    let mut o = Outputs::new();
    o.scalar("losses", loss)
        .put(
            "chosen_rewards",
            &c.iter().map(|&x| b * x).collect::<Vec<_>>(),
        )
        .put(
            "rejected_rewards",
            &r.iter().map(|&x| b * x).collect::<Vec<_>>(),
        )
        .grad(
            "policy_chosen_logps",
            &dc.iter().map(|&d| cot * d).collect::<Vec<_>>(),
        )
        .grad(
            "policy_rejected_logps",
            &dr.iter().map(|&d| cot * d).collect::<Vec<_>>(),
        );
    Ok(o)
}

/// BCO's running moments from the case parameters (`std = √var`).
pub(crate) fn bco_running<F: Real>(ctx: &Ctx) -> Result<RunningMoments<F>, Fail> {
    let var = F::of(ctx.p_f64("running.var")?);
    Ok(RunningMoments {
        mean: F::of(ctx.p_f64("running.mean")?),
        var,
        std: var.sqrt(),
        count: F::of(ctx.p_f64("running.count")?),
    })
}

fn trl_bco<F: Real>(ctx: &Ctx) -> OpResult {
    let beta = ctx.p_f64("beta")?;
    let mut running = bco_running::<F>(ctx)?;
    let do_train = ctx.p_bool("do_train")?;
    let c = logratios::<F>(ctx, "policy_chosen_logps", "reference_chosen_logps")?;
    let r = logratios::<F>(ctx, "policy_rejected_logps", "reference_rejected_logps")?;
    let (nc, nr) = (c.len(), r.len());
    let mut losses = vec![F::zero(); nc + nr];
    let mut cr = vec![F::zero(); nc];
    let mut rr = vec![F::zero(); nr];
    let cot_l = ctx
        .cotangent::<F>("losses")?
        .unwrap_or_else(|| vec![F::zero(); nc + nr]);
    let cot_c = ctx
        .cotangent::<F>("chosen_rewards")?
        .unwrap_or_else(|| vec![F::zero(); nc]);
    let cot_r = ctx
        .cotangent::<F>("rejected_rewards")?
        .unwrap_or_else(|| vec![F::zero(); nr]);
    let mut dc = vec![F::zero(); nc];
    let mut dr = vec![F::zero(); nr];
    let delta = bco_loss(
        beta,
        &c,
        &r,
        &mut running,
        do_train,
        &mut losses,
        &mut cr,
        &mut rr,
        Some(((&cot_l, &cot_c, &cot_r), &mut dc, &mut dr)),
    )?;
    let mut o = Outputs::new();
    o.put("losses", &losses)
        .put("chosen_rewards", &cr)
        .put("rejected_rewards", &rr)
        .scalar("delta", delta)
        .scalar("running.mean", running.mean)
        .scalar("running.var", running.var)
        .scalar("running.std", running.std)
        .scalar("running.count", running.count)
        .grad("policy_chosen_logps", &dc)
        .grad("policy_rejected_logps", &dr);
    Ok(o)
}

/// OpenRLHF `PRMLoss`'s `reward_token_ids`.
pub(crate) fn prm_reward_ids(ctx: &Ctx) -> Result<Option<Vec<i64>>, Fail> {
    Ok(ctx
        .p_opt_f64_list("reward_token_ids")?
        .map(|v| v.into_iter().map(|x| x as i64).collect()))
}

fn openrlhf_prm<F: Real>(ctx: &Ctx) -> OpResult {
    let ids = prm_reward_ids(ctx)?;
    let cfg = PrmConfig {
        placeholder_token_id: ctx.p_i64("placeholder_token_id")?,
        reward_token_ids: ids.as_deref(),
    };
    let inputs = ctx.i64("inputs")?;
    let logits = ctx.f::<F>("logits")?;
    let vocab = vocab_of(ctx, "logits")?;
    let mut g = vec![F::zero(); logits.len()];
    let out = if ctx.dtype("labels")? == "f64" {
        let labels = ctx.f::<F>("labels")?;
        prm_soft_loss(&cfg, &inputs, &logits, vocab, &labels, Some(&mut g))?
    } else {
        let labels = ctx.i64("labels")?;
        prm_hard_loss(&cfg, &inputs, &logits, vocab, &labels, Some(&mut g))?
    };
    let cot = ctx.cot_scalar::<F>("loss")?;
    g.iter_mut().for_each(|x| *x *= cot);
    let mut o = Outputs::new();
    o.scalar("loss", out.loss).grad("logits", &g);
    if ctx.p_bool("return_acc")? {
        o.scalar("acc", out.acc);
    }
    Ok(o)
}
