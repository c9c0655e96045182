//! Preference losses (paired, unpaired, odds ratio, reward models) on burn
//! tensors: handlers for the `burn-*` backends. Parameter parsing is the
//! core handlers' (`ops::paired`, `ops::unpaired`, `ops::odds_ratio`).

use crate::case::{Ctx, Fail, OpResult, Outputs};
use crate::ops::odds_ratio::{cpo_config, pair_meta, IGNORE_INDEX};
use crate::ops::paired::{openrlhf_dpo_config, torchtune_config, trl_dpo_config};
use crate::ops::unpaired::{
    bco_running, openrlhf_kto_config, prm_reward_ids, trl_kto_config, vocab_of,
};
use posttrain_burn::burn::tensor::{Bool, Int, Tensor, TensorData};
use posttrain_burn::preference::{self as pref, PairTensors};
use posttrain_burn::{tensor1, tensor3, to_vec, Device};
use posttrain_core::error::check_len;
use posttrain_core::preference::paired::{LossTerm, PairedConfig, PairedLoss};
use posttrain_core::preference::unpaired::PrmConfig;
use posttrain_core::Error;

/// Runs `op` if this family owns it.
pub fn run(op: &str, ctx: &Ctx, d: &Device) -> Option<OpResult> {
    Some(match op {
        "trl.dpo_loss" => trl_dpo(ctx, d),
        "openrlhf.dpo_loss" => {
            openrlhf_dpo_config(ctx).and_then(|(cfg, kind)| run_seq(ctx, d, &cfg, kind, None))
        }
        "torchtune.dpo_loss"
        | "torchtune.ipo_loss"
        | "torchtune.rso_loss"
        | "torchtune.simpo_loss" => torchtune_config(op, ctx)
            .and_then(|(cfg, kind)| run_seq(ctx, d, &cfg, kind, Some("losses"))),
        "openrlhf.pairwise_loss" | "openrlhf.log_exp_loss" => openrlhf_pairwise(ctx, d),
        "trl.reward_loss" => trl_reward(ctx, d),
        "trl.kto_loss" => trl_kto(ctx, d),
        "openrlhf.kto_loss" => openrlhf_kto(ctx, d),
        "openrlhf.vanilla_kto_loss" => openrlhf_vanilla_kto(ctx, d),
        "trl.bco_loss" => trl_bco(ctx, d),
        "openrlhf.prm_loss" => openrlhf_prm(ctx, d),
        "trl.cpo_loss" => trl_cpo_loss(ctx, d),
        "trl.odds_ratio_loss" => trl_odds_ratio_loss(ctx, d),
        "trl.cpo_batch_loss_metrics" => trl_cpo_batch(ctx, d),
        "trl.orpo_batch_loss_metrics" => trl_orpo_batch(ctx, d),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// Input helpers
// ---------------------------------------------------------------------------

fn t1(ctx: &Ctx, name: &str, d: &Device) -> Result<Tensor<1>, Fail> {
    Ok(tensor1(&ctx.f::<f64>(name)?, d))
}

fn t1_opt(ctx: &Ctx, name: &str, d: &Device) -> Result<Option<Tensor<1>>, Fail> {
    Ok(ctx.f_opt::<f64>(name)?.map(|v| tensor1(&v, d)))
}

fn scalar(t: Tensor<1>) -> f64 {
    to_vec(t)[0]
}

fn scaled(t: Tensor<1>, c: f64) -> Vec<f64> {
    to_vec(t).into_iter().map(|x| x * c).collect()
}

/// A `[batch, seq, vocab]` float input and its shape.
fn f3(ctx: &Ctx, name: &str, d: &Device) -> Result<(Tensor<3>, [usize; 3]), Fail> {
    let s = ctx.shape(name)?;
    if s.len() != 3 {
        return Err(Error::Invalid {
            input: "logits",
            rule: "must be [batch, seq, vocab]",
        }
        .into());
    }
    let shape = [s[0], s[1], s[2]];
    Ok((tensor3(&ctx.f::<f64>(name)?, shape, d)?, shape))
}

fn int2(v: Vec<i64>, shape: [usize; 2], d: &Device) -> Result<Tensor<2, Int>, Fail> {
    check_len("ids", v.len(), shape[0] * shape[1])?;
    Ok(Tensor::from_data(TensorData::new(v, shape), d))
}

fn bool2(v: Vec<bool>, shape: [usize; 2], d: &Device) -> Result<Tensor<2, Bool>, Fail> {
    check_len("mask", v.len(), shape[0] * shape[1])?;
    Ok(Tensor::from_data(TensorData::new(v, shape), d))
}

fn bool1(v: Vec<bool>, d: &Device) -> Tensor<1, Bool> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), d)
}

fn dims2(ctx: &Ctx, name: &str) -> Result<[usize; 2], Fail> {
    let dm = ctx.dims(name)?;
    Ok([dm.batch, dm.seq])
}

fn count_true(v: &[bool]) -> f64 {
    v.iter().filter(|&&b| b).count() as f64
}

// ---------------------------------------------------------------------------
// Paired (DPO family, reward models)
// ---------------------------------------------------------------------------

fn run_seq(
    ctx: &Ctx,
    d: &Device,
    cfg: &PairedConfig,
    kind: PairedLoss,
    per_pair_out: Option<&str>,
) -> OpResult {
    let mut batch = PairTensors::new(
        t1(ctx, "policy_chosen_logps", d)?,
        t1(ctx, "policy_rejected_logps", d)?,
    );
    if let (Some(rc), Some(rr)) = (
        t1_opt(ctx, "reference_chosen_logps", d)?,
        t1_opt(ctx, "reference_rejected_logps", d)?,
    ) {
        batch = batch.with_reference(rc, rr);
    }
    let terms = [LossTerm::new(kind)];
    let want = ctx.wants_grad("policy_chosen_logps") || ctx.wants_grad("policy_rejected_logps");
    let n = batch.policy_chosen.dims()[0];
    let grads = match (want, per_pair_out) {
        (false, _) => None,
        (true, Some(name)) => {
            let cot = ctx.cotangent::<f64>(name)?.unwrap_or_else(|| vec![0.0; n]);
            let (dc, dr) = pref::paired_loss_vjp(cfg, &terms, &batch, tensor1(&cot, d))?;
            Some((to_vec(dc), to_vec(dr)))
        }
        (true, None) => None,
    };
    let out = pref::paired_loss(cfg, &terms, batch)?;
    let mut o = Outputs::new();
    match per_pair_out {
        Some(name) => o.put(name, &to_vec(out.per_pair)),
        None => o.scalar("loss", scalar(out.loss)),
    };
    o.put("chosen_rewards", &to_vec(out.chosen_rewards))
        .put("rejected_rewards", &to_vec(out.rejected_rewards));
    if want {
        let (dc, dr) = match grads {
            Some(g) => g,
            None => {
                let c = ctx.cot_scalar::<f64>("loss")?;
                (scaled(out.grad_chosen, c), scaled(out.grad_rejected, c))
            }
        };
        o.grad("policy_chosen_logps", &dc)
            .grad("policy_rejected_logps", &dr);
    }
    Ok(o)
}

fn trl_dpo(ctx: &Ctx, d: &Device) -> OpResult {
    let (cfg, terms) = trl_dpo_config(ctx)?;
    let (logits, shape) = f3(ctx, "logits", d)?;
    let s2 = [shape[0], shape[1]];
    let dims = dims2(ctx, "input_ids")?;
    check_len("logits", s2[0] * s2[1], dims[0] * dims[1])?;
    let ids = int2(ctx.i64("input_ids")?, s2, d)?;
    let cmask = bool2(ctx.mask("completion_mask")?, s2, d)?;
    let amask = ctx.mask("attention_mask")?;
    check_len("attention_mask", amask.len(), s2[0] * s2[1])?;
    let reference = if ctx.p_bool("precompute_ref_log_probs")? {
        pref::ReferenceTensors::Precomputed(
            t1(ctx, "ref_chosen_logps", d)?,
            t1(ctx, "ref_rejected_logps", d)?,
        )
    } else {
        pref::ReferenceTensors::Logits(f3(ctx, "ref_logits", d)?.0)
    };
    let batch = pref::LogitsPairTensors {
        logits,
        input_ids: ids,
        completion_mask: cmask,
        reference,
        ld_alpha: ctx.p_opt_f64("ld_alpha")?,
        use_weighting: ctx.p_bool("use_weighting")?,
    };
    let out = pref::dpo_from_logits(&cfg, &terms, batch)?;
    let mut o = Outputs::new();
    if ctx.wants_grad("logits") {
        let c = ctx.cot_scalar::<f64>("loss")?;
        let g: Vec<f64> = to_vec(out.grad_logits).iter().map(|x| x * c).collect();
        o.grad("logits", &g);
    }
    let m = out.metrics;
    o.scalar("loss", scalar(out.loss))
        .scalar("entropy", scalar(out.entropy))
        .scalar("num_tokens", count_true(&amask))
        .scalar("logits/chosen", scalar(out.logits_chosen))
        .scalar("logits/rejected", scalar(out.logits_rejected))
        .scalar("mean_token_accuracy", scalar(out.token_accuracy))
        .scalar("rewards/chosen", scalar(m.reward_chosen))
        .scalar("rewards/rejected", scalar(m.reward_rejected))
        .scalar("rewards/accuracies", scalar(m.accuracy))
        .scalar("rewards/margins", scalar(m.margin))
        .scalar("logps/chosen", scalar(m.logps_chosen))
        .scalar("logps/rejected", scalar(m.logps_rejected));
    Ok(o)
}

fn openrlhf_pairwise(ctx: &Ctx, d: &Device) -> OpResult {
    let out = pref::pairwise_reward_loss(
        t1(ctx, "chosen_reward", d)?,
        t1(ctx, "reject_reward", d)?,
        t1_opt(ctx, "margin", d)?,
        None,
    )?;
    let mut o = Outputs::new();
    o.scalar("loss", scalar(out.loss));
    if ctx.wants_grad("chosen_reward") || ctx.wants_grad("reject_reward") {
        let c = ctx.cot_scalar::<f64>("loss")?;
        o.grad("chosen_reward", &scaled(out.grad_chosen, c))
            .grad("reject_reward", &scaled(out.grad_rejected, c));
    }
    Ok(o)
}

fn trl_reward(ctx: &Ctx, d: &Device) -> OpResult {
    let logits = ctx.f::<f64>("logits")?;
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
    let amask = ctx.mask("attention_mask")?;
    check_len(
        "attention_mask rows",
        ctx.dims("attention_mask")?.batch,
        logits.len(),
    )?;
    let z = tensor1(&logits, d);
    let out = pref::pairwise_reward_loss(
        z.clone().narrow(0, 0, n),
        z.narrow(0, n, n),
        t1_opt(ctx, "margin", d)?,
        ctx.p_opt_f64("center_rewards_coefficient")?,
    )?;
    let mut o = Outputs::new();
    o.scalar("loss", scalar(out.loss))
        .scalar("num_tokens", count_true(&amask))
        .scalar("min_reward", scalar(out.min_reward))
        .scalar("mean_reward", scalar(out.mean_reward))
        .scalar("max_reward", scalar(out.max_reward))
        .scalar("accuracy", scalar(out.accuracy))
        .scalar("margin", scalar(out.margin));
    if ctx.wants_grad("logits") {
        let c = ctx.cot_scalar::<f64>("loss")?;
        let mut g = scaled(out.grad_chosen, c);
        g.extend(scaled(out.grad_rejected, c));
        o.grad("logits", &g);
    }
    Ok(o)
}

// ---------------------------------------------------------------------------
// Unpaired (KTO, BCO, PRM)
// ---------------------------------------------------------------------------

/// The completion triple `(logits, ids, mask)` as tensors.
struct Completion {
    logits: Tensor<3>,
    ids: Tensor<2, Int>,
    mask: Tensor<2, Bool>,
}

fn completion(
    ctx: &Ctx,
    d: &Device,
    logits: &str,
    ids: &str,
    mask: &str,
) -> Result<Completion, Fail> {
    vocab_of(ctx, logits)?;
    let (z, shape) = f3(ctx, logits, d)?;
    let s2 = [shape[0], shape[1]];
    check_len("input_ids", ctx.dims(ids)?.len(), s2[0] * s2[1])?;
    Ok(Completion {
        logits: z,
        ids: int2(ctx.i64(ids)?, s2, d)?,
        mask: bool2(ctx.mask(mask)?, s2, d)?,
    })
}

impl Completion {
    fn logps(&self) -> Result<Tensor<1>, Fail> {
        Ok(pref::shifted_sequence_logps(
            self.logits.clone(),
            self.ids.clone(),
            self.mask.clone(),
            false,
        )?)
    }
}

fn trl_kto(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = trl_kto_config(ctx)?;
    let pol = completion(ctx, d, "logits", "input_ids", "completion_mask")?;
    let lp = pol.logps()?;
    let labels = ctx.mask("label")?;
    let n = lp.dims()[0];
    check_len("label", labels.len(), n)?;
    let ref_lp = if ctx.has("ref_logps") {
        t1(ctx, "ref_logps", d)?
    } else {
        completion(ctx, d, "ref_logits", "input_ids", "completion_mask")?.logps()?
    };
    check_len("ref_logps", ref_lp.dims()[0], n)?;
    let kl = if cfg.loss_type.uses_kl() {
        let kl_lp =
            completion(ctx, d, "KL_logits", "KL_input_ids", "KL_completion_mask")?.logps()?;
        let ref_kl = if ctx.has("ref_KL_logps") {
            t1(ctx, "ref_KL_logps", d)?
        } else {
            completion(
                ctx,
                d,
                "ref_KL_logits",
                "KL_input_ids",
                "KL_completion_mask",
            )?
            .logps()?
        };
        pref::kto_kl_baseline(kl_lp, ref_kl)?
    } else {
        Tensor::zeros([1], d)
    };
    let lr = lp.clone() - ref_lp;
    let des = bool1(labels.clone(), d);
    let out = pref::kto_loss(&cfg, lr.clone(), des.clone(), kl.clone())?;
    let mut o = Outputs::new();
    o.scalar("loss", scalar(out.loss)).scalar("kl", scalar(kl));
    if ctx.wants_grad("logits") {
        let c = ctx.cot_scalar::<f64>("loss")?;
        let g = pref::shifted_sequence_logps_vjp(
            pol.logits.clone(),
            pol.ids.clone(),
            pol.mask.clone(),
            false,
            out.grad_logratios.mul_scalar(c),
        )?;
        o.grad("logits", &to_vec(g));
    }

    // Metrics over the shifted completion positions, per side.
    let [b, t, v] = pol.logits.dims();
    let mut ent = Tensor::<1>::zeros([1], d);
    let mut side = [Tensor::<1>::zeros([1], d), Tensor::<1>::zeros([1], d)];
    let mut side_n = [Tensor::<1>::zeros([1], d), Tensor::<1>::zeros([1], d)];
    let mut ntok = Tensor::<1>::zeros([1], d);
    if t >= 2 {
        let z = pol.logits.clone().narrow(1, 0, t - 1);
        let valid = pol.mask.clone().narrow(1, 1, t - 1);
        let (h, _) = posttrain_burn::logits::entropy_from_logits(z.clone(), None)?;
        let keep = |x: Tensor<2>, m: &Tensor<2, Bool>| x.zeros_like().mask_where(m.clone(), x);
        ent = keep(h, &valid).sum();
        ntok = valid.clone().float().sum();
        let zm = keep(
            z.sum_dim(2).squeeze_dim::<2>(2).div_scalar(v as f64),
            &valid,
        );
        let row_des = des.clone().reshape([b, 1]).expand([b, t - 1]);
        for (k, m) in [
            valid.clone().bool_and(row_des.clone()),
            valid.bool_and(row_des.bool_not()),
        ]
        .into_iter()
        .enumerate()
        {
            side[k] = keep(zm.clone(), &m).sum();
            side_n[k] = m.float().sum();
        }
    }
    let ratio = |s: Tensor<1>, n: Tensor<1>| {
        let (s, n) = (scalar(s), scalar(n));
        if n == 0.0 {
            0.0
        } else {
            s / n
        }
    };
    o.scalar("entropy", ratio(ent, ntok));
    o.scalar("num_tokens", count_true(&ctx.mask("attention_mask")?));
    let [s0, s1] = side;
    let [n0, n1] = side_n;
    o.scalar("logits/chosen", ratio(s0, n0));
    o.scalar("logits/rejected", ratio(s1, n1));
    // nan-sum means per side (no gradient).
    let nanmean = |x: Tensor<1>, want: bool| {
        let m = if want {
            des.clone()
        } else {
            des.clone().bool_not()
        };
        let ok = m.clone().bool_and(x.clone().is_nan().bool_not());
        let s = x.zeros_like().mask_where(ok, x).sum();
        ratio(s, m.float().sum())
    };
    let rw = lr.mul_scalar(cfg.beta);
    let rc = nanmean(rw.clone(), true);
    let rr = nanmean(rw, false);
    o.scalar("rewards/chosen", rc)
        .scalar("rewards/rejected", rr)
        .scalar("logps/chosen", nanmean(lp.clone(), true))
        .scalar("logps/rejected", nanmean(lp, false))
        .scalar("rewards/margins", rc - rr);
    Ok(o)
}

fn logratios(ctx: &Ctx, d: &Device, policy: &str, reference: &str) -> Result<Tensor<1>, Fail> {
    let p = ctx.f::<f64>(policy)?;
    let r = ctx.f::<f64>(reference)?;
    check_len("reference logps", r.len(), p.len())?;
    Ok(tensor1(&p, d) - tensor1(&r, d))
}

fn openrlhf_kto(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = openrlhf_kto_config(ctx)?;
    let c = logratios(ctx, d, "policy_chosen_logps", "reference_chosen_logps")?;
    let r = logratios(ctx, d, "policy_rejected_logps", "reference_rejected_logps")?;
    let kl = pref::kto_kl_baseline(
        t1(ctx, "policy_KL_logps", d)?,
        t1(ctx, "reference_KL_logps", d)?,
    )?;
    let (nc, nr) = (c.dims()[0], r.dims()[0]);
    let all = Tensor::cat(vec![c.clone(), r.clone()], 0);
    let labels = bool1((0..nc + nr).map(|i| i < nc).collect(), d);
    let out = pref::kto_loss(&cfg, all, labels, kl.clone())?;
    let cot = ctx.cot_scalar::<f64>("losses")?;
    let g = scaled(out.grad_logratios, cot);
    let mut o = Outputs::new();
    o.scalar("losses", scalar(out.loss))
        .put("chosen_rewards", &to_vec(c.mul_scalar(cfg.beta)))
        .put("rejected_rewards", &to_vec(r.mul_scalar(cfg.beta)))
        .scalar("KL", scalar(kl))
        .grad("policy_chosen_logps", &g[..nc])
        .grad("policy_rejected_logps", &g[nc..nc + nr]);
    Ok(o)
}

fn openrlhf_vanilla_kto(ctx: &Ctx, d: &Device) -> OpResult {
    let beta = ctx.p_f64("beta")?;
    let c = logratios(ctx, d, "policy_chosen_logps", "reference_chosen_logps")?;
    let r = logratios(ctx, d, "policy_rejected_logps", "reference_rejected_logps")?;
    let out = pref::vanilla_kto_loss(beta, c.clone(), r.clone())?;
    let cot = ctx.cot_scalar::<f64>("losses")?;
    let mut o = Outputs::new();
    o.scalar("losses", scalar(out.loss))
        .put("chosen_rewards", &to_vec(c.mul_scalar(beta)))
        .put("rejected_rewards", &to_vec(r.mul_scalar(beta)))
        .grad("policy_chosen_logps", &scaled(out.grad_chosen, cot))
        .grad("policy_rejected_logps", &scaled(out.grad_rejected, cot));
    Ok(o)
}

fn trl_bco(ctx: &Ctx, d: &Device) -> OpResult {
    let beta = ctx.p_f64("beta")?;
    let mut running = bco_running::<f64>(ctx)?;
    let do_train = ctx.p_bool("do_train")?;
    let c = logratios(ctx, d, "policy_chosen_logps", "reference_chosen_logps")?;
    let r = logratios(ctx, d, "policy_rejected_logps", "reference_rejected_logps")?;
    let (nc, nr) = (c.dims()[0], r.dims()[0]);
    let cot = |name: &str, n: usize| -> Result<Tensor<1>, Fail> {
        Ok(tensor1(
            &ctx.cotangent::<f64>(name)?.unwrap_or_else(|| vec![0.0; n]),
            d,
        ))
    };
    let cots = pref::BcoCotangentTensors {
        losses: cot("losses", nc + nr)?,
        chosen_rewards: cot("chosen_rewards", nc)?,
        rejected_rewards: cot("rejected_rewards", nr)?,
    };
    let out = pref::bco_loss(beta, c, r, &mut running, do_train, Some(cots))?;
    let mut o = Outputs::new();
    o.put("losses", &to_vec(out.losses))
        .put("chosen_rewards", &to_vec(out.chosen_rewards))
        .put("rejected_rewards", &to_vec(out.rejected_rewards))
        .scalar("delta", out.delta)
        .scalar("running.mean", running.mean)
        .scalar("running.var", running.var)
        .scalar("running.std", running.std)
        .scalar("running.count", running.count);
    if let (Some(gc), Some(gr)) = (out.grad_chosen, out.grad_rejected) {
        o.grad("policy_chosen_logps", &to_vec(gc))
            .grad("policy_rejected_logps", &to_vec(gr));
    }
    Ok(o)
}

fn openrlhf_prm(ctx: &Ctx, d: &Device) -> OpResult {
    let ids = prm_reward_ids(ctx)?;
    let cfg = PrmConfig {
        placeholder_token_id: ctx.p_i64("placeholder_token_id")?,
        reward_token_ids: ids.as_deref(),
    };
    vocab_of(ctx, "logits")?;
    let (logits, shape) = f3(ctx, "logits", d)?;
    let s2 = [shape[0], shape[1]];
    let inputs = int2(ctx.i64("inputs")?, s2, d)?;
    let out = if ctx.dtype("labels")? == "f64" {
        let labels = ctx.f::<f64>("labels")?;
        check_len("labels", labels.len(), s2[0] * s2[1])?;
        let labels = posttrain_burn::tensor2(&labels, s2, d)?;
        pref::prm_soft_loss(&cfg, inputs, logits, labels)?
    } else {
        let labels = int2(ctx.i64("labels")?, s2, d)?;
        pref::prm_hard_loss(&cfg, inputs, logits, labels)?
    };
    let cot = ctx.cot_scalar::<f64>("loss")?;
    let g: Vec<f64> = to_vec(out.grad_logits).iter().map(|x| x * cot).collect();
    let mut o = Outputs::new();
    o.scalar("loss", scalar(out.loss)).grad("logits", &g);
    if ctx.p_bool("return_acc")? {
        o.scalar("acc", scalar(out.acc));
    }
    Ok(o)
}

// ---------------------------------------------------------------------------
// Odds ratio (CPO, ORPO)
// ---------------------------------------------------------------------------

fn trl_cpo_loss(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = cpo_config(ctx)?;
    let c = t1(ctx, "policy_chosen_logps", d)?;
    let n = c.dims()[0];
    let out = pref::cpo_loss(&cfg, c, t1(ctx, "policy_rejected_logps", d)?)?;
    let cot = tensor1(
        &ctx.cotangent::<f64>("losses")?
            .unwrap_or_else(|| vec![0.0; n]),
        d,
    );
    let mut o = Outputs::new();
    o.put("losses", &to_vec(out.losses))
        .put("chosen_rewards", &to_vec(out.chosen_rewards))
        .put("rejected_rewards", &to_vec(out.rejected_rewards))
        .grad("policy_chosen_logps", &to_vec(out.d_chosen * cot.clone()))
        .grad("policy_rejected_logps", &to_vec(out.d_rejected * cot));
    Ok(o)
}

fn trl_odds_ratio_loss(ctx: &Ctx, d: &Device) -> OpResult {
    let beta = ctx.p_f64("beta")?;
    let c = t1(ctx, "policy_chosen_logps", d)?;
    let n = c.dims()[0];
    let cots = pref::OrpoCotangentTensors {
        losses: tensor1(
            &ctx.cotangent::<f64>("losses")?
                .unwrap_or_else(|| vec![0.0; n]),
            d,
        ),
        log_odds_ratio: ctx.cot_scalar::<f64>("log_odds_ratio")?,
        log_odds_chosen: ctx.cot_scalar::<f64>("log_odds_chosen")?,
    };
    let out = pref::odds_ratio_loss(beta, c, t1(ctx, "policy_rejected_logps", d)?, Some(cots))?;
    let mut o = Outputs::new();
    o.put("losses", &to_vec(out.losses))
        .put("chosen_rewards", &to_vec(out.chosen_rewards))
        .put("rejected_rewards", &to_vec(out.rejected_rewards))
        .scalar("log_odds_ratio", scalar(out.log_odds_ratio))
        .scalar("log_odds_chosen", scalar(out.log_odds_chosen));
    if let (Some(gc), Some(gr)) = (out.grad_chosen, out.grad_rejected) {
        o.grad("policy_chosen_logps", &to_vec(gc))
            .grad("policy_rejected_logps", &to_vec(gr));
    }
    Ok(o)
}

/// TRL's concatenated chosen/rejected batch as tensors.
struct PairBatchT {
    logits: Tensor<3>,
    pairs: usize,
    labels: Tensor<2, Int>,
    valid: Tensor<2, Bool>,
    input_ids: Tensor<2, Int>,
    attention: Tensor<2, Bool>,
}

fn pair_batch(ctx: &Ctx, d: &Device) -> Result<PairBatchT, Fail> {
    let m = pair_meta(ctx)?;
    let s2 = [m.dims.batch, m.dims.seq];
    let logits = tensor3(&ctx.f::<f64>("logits")?, [s2[0], s2[1], m.vocab], d)?;
    let valid: Vec<bool> = m.labels.iter().map(|&l| l != IGNORE_INDEX).collect();
    Ok(PairBatchT {
        logits,
        pairs: m.pairs,
        labels: int2(m.labels, s2, d)?,
        valid: bool2(valid, s2, d)?,
        input_ids: int2(m.input_ids, s2, d)?,
        attention: bool2(m.attention, s2, d)?,
    })
}

impl PairBatchT {
    /// Mean of all logits of side `k`, positions `[0, upto)` (0 when empty).
    fn logits_mean(&self, k: usize, upto: usize) -> f64 {
        let z = self.logits.clone().narrow(0, k * self.pairs, self.pairs);
        let [b, _, v] = z.dims();
        if b * upto * v == 0 {
            return 0.0;
        }
        scalar(z.narrow(1, 0, upto).mean())
    }
}

/// The pair metrics TRL logs for CPO and ORPO.
fn pair_metrics(o: &mut Outputs, cr: Tensor<1>, rr: Tensor<1>, c: Tensor<1>, r: Tensor<1>) {
    let m = |x: Tensor<1>| {
        if x.dims()[0] == 0 {
            0.0
        } else {
            scalar(x.mean())
        }
    };
    o.scalar(
        "rewards/accuracies",
        m(cr.clone().greater(rr.clone()).float()),
    )
    .scalar("rewards/margins", m(cr.clone() - rr.clone()))
    .scalar("rewards/chosen", m(cr))
    .scalar("rewards/rejected", m(rr))
    .scalar("logps/chosen", m(c))
    .scalar("logps/rejected", m(r));
}

fn trl_cpo_batch(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = cpo_config(ctx)?;
    let pb = pair_batch(ctx, d)?;
    let b = pb.pairs;
    let avg = cfg.loss_type.uses_average_log_prob();
    let logps =
        pref::shifted_sequence_logps(pb.logits.clone(), pb.labels.clone(), pb.valid.clone(), avg)?;
    let (c, r) = (logps.clone().narrow(0, 0, b), logps.clone().narrow(0, b, b));
    let out = pref::cpo_loss(&cfg, c.clone(), r.clone())?;
    let cot = ctx.cot_scalar::<f64>("loss")?;
    let per = if b == 0 { 0.0 } else { cot / b as f64 };
    let mut g = pref::shifted_sequence_logps_vjp(
        pb.logits.clone(),
        pb.labels.clone(),
        pb.valid.clone(),
        avg,
        Tensor::cat(vec![out.d_chosen, out.d_rejected], 0).mul_scalar(per),
    )?;
    let nll = if cfg.cpo_alpha == 0.0 {
        0.0
    } else {
        let (nll, gn) = pref::shifted_mean_nll(
            pb.logits.clone().narrow(0, 0, b),
            pb.labels.clone().narrow(0, 0, b),
            pb.valid.clone().narrow(0, 0, b),
        )?;
        let [_, t, v] = gn.dims();
        let gn = Tensor::cat(
            vec![
                gn.mul_scalar(cot * cfg.cpo_alpha),
                Tensor::zeros([b, t, v], d),
            ],
            0,
        );
        g = g + gn;
        scalar(nll)
    };
    let mean_l = if b == 0 {
        0.0
    } else {
        scalar(out.losses.mean())
    };
    let width = pb.logits.dims()[1];
    let mut o = Outputs::new();
    o.scalar("loss", mean_l + cfg.cpo_alpha * nll)
        .scalar("nll_loss", nll);
    pair_metrics(&mut o, out.chosen_rewards, out.rejected_rewards, c, r);
    o.scalar("logits/chosen", pb.logits_mean(0, width))
        .scalar("logits/rejected", pb.logits_mean(1, width))
        .grad("logits", &to_vec(g));
    Ok(o)
}

fn trl_orpo_batch(ctx: &Ctx, d: &Device) -> OpResult {
    let beta = ctx.p_f64("beta")?;
    let pb = pair_batch(ctx, d)?;
    let b = pb.pairs;
    let logps =
        pref::shifted_sequence_logps(pb.logits.clone(), pb.labels.clone(), pb.valid.clone(), true)?;
    let (c, r) = (logps.clone().narrow(0, 0, b), logps.clone().narrow(0, b, b));
    let cot = ctx.cot_scalar::<f64>("loss")?;
    // loss = nll − mean(losses)
    let per = if b == 0 { 0.0 } else { -cot / b as f64 };
    let cots = pref::OrpoCotangentTensors {
        losses: c.full_like(per),
        log_odds_ratio: 0.0,
        log_odds_chosen: 0.0,
    };
    let out = pref::odds_ratio_loss(beta, c.clone(), r.clone(), Some(cots))?;
    let (nll, gn) = pref::shifted_mean_nll(
        pb.logits.clone().narrow(0, 0, b),
        pb.input_ids.clone().narrow(0, 0, b),
        pb.attention.clone().narrow(0, 0, b),
    )?;
    let [_, t, v] = gn.dims();
    let gn = Tensor::cat(vec![gn.mul_scalar(cot), Tensor::zeros([b, t, v], d)], 0);
    let (gc, gr) = (
        out.grad_chosen.expect("cotangents given"),
        out.grad_rejected.expect("cotangents given"),
    );
    let g = pref::shifted_sequence_logps_vjp(
        pb.logits.clone(),
        pb.labels.clone(),
        pb.valid.clone(),
        true,
        Tensor::cat(vec![gc, gr], 0),
    )? + gn;
    let nll = scalar(nll);
    let mean_l = if b == 0 {
        0.0
    } else {
        scalar(out.losses.mean())
    };
    let upto = t.saturating_sub(1);
    let mut o = Outputs::new();
    o.scalar("loss", nll - mean_l).scalar("nll_loss", nll);
    pair_metrics(&mut o, out.chosen_rewards, out.rejected_rewards, c, r);
    o.scalar("logits/chosen", pb.logits_mean(0, upto))
        .scalar("logits/rejected", pb.logits_mean(1, upto))
        .scalar("log_odds_ratio", scalar(out.log_odds_ratio))
        .scalar("log_odds_chosen", scalar(out.log_odds_chosen))
        .grad("logits", &to_vec(g));
    Ok(o)
}
