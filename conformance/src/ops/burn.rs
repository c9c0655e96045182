//! The `burn-ndarray` backend: the ops posttrain-burn implements on burn
//! tensors (ndarray device, f32), run on the same vectors as the core. Ops it
//! does not implement return `None` (counted as skipped).

use crate::case::{Ctx, Fail, OpResult, Outputs};
use posttrain_burn::burn::tensor::{Int, Tensor, TensorData};
use posttrain_burn::{mask2, tensor2, tensor3, to_vec, BackendKind, Device};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::kl::{KlConfig, KlEstimator};
use posttrain_core::logits::Temperature;
use posttrain_core::policy::token::{PolicyLoss, PolicyLossMode, VerlPolicyParams};
use posttrain_core::Preset;

use super::logits::cot_vec;

/// Runs `op` on the burn ndarray device if posttrain-burn implements it.
pub fn run(op: &str, ctx: &Ctx) -> Option<OpResult> {
    Some(match op {
        "verl.kl_penalty" | "verl.kl_penalty_forward" => {
            KlConfig::parse_verl(ctx.p_str("kl_penalty").unwrap_or(""))
                .map_err(|_| ctx.unsupported("kl_penalty"))
                .and_then(|cfg| kl(ctx, &cfg, "logprob", "ref_logprob", "kl_estimate"))
        }
        "openrlhf.compute_approx_kl" => {
            let est = match ctx.p_str("kl_estimator") {
                Ok("k1") => KlEstimator::K1,
                Ok("k2") => KlEstimator::K2,
                Ok("k3") => KlEstimator::K3,
                _ => return Some(Err(ctx.unsupported("kl_estimator"))),
            };
            let cfg = KlConfig::preset(est, Preset::OpenRlhf);
            kl(ctx, &cfg, "log_probs", "log_probs_base", "kl")
        }
        "verl.agg_loss" => match ctx.p_str("loss_agg_mode").map(str::parse::<AggMode>) {
            Ok(Ok(mode)) => agg(ctx, mode, "loss_mat", true),
            _ => Err(ctx.unsupported("loss_agg_mode")),
        },
        "openrlhf.aggregate_loss" => ctx.p_bool("token_level_loss").and_then(|tok| {
            let mode = if tok {
                AggMode::TokenMean
            } else {
                AggMode::SeqMeanTokenMean
            };
            agg(ctx, mode, "loss", false)
        }),
        "trl.selective_log_softmax" => gather(ctx, "index", "per_token_logps", None),
        "verl.logprobs_from_logits" => gather(ctx, "labels", "log_probs", None),
        "openrlhf.log_probs_from_logits" => gather(ctx, "labels", "log_probs", Some("temperature")),
        "torchtune.logits_to_logprobs" => gather(ctx, "sequences", "logprobs", Some("temperature")),
        "trl.entropy_from_logits" => entropy(ctx, "entropies"),
        "verl.entropy_from_logits" | "openrlhf.compute_entropy" => entropy(ctx, "entropy"),
        "verl.policy_loss" => verl_policy_loss(ctx),
        "verl.compute_policy_loss" => verl_compute_policy_loss(ctx),
        "verl.compute_policy_loss_reinforce" => policy(
            ctx,
            &PolicyLoss::LogProb,
            agg_mode(ctx),
            global_norm(ctx, true),
            "rollout_log_prob",
        ),
        _ => return None,
    })
}

fn dev() -> Result<Device, Fail> {
    posttrain_burn::device_for(BackendKind::NdArray).map_err(|e| Fail::Harness(e.to_string()))
}

/// A `[rows, last]` view of an input's shape (a 1-D input is one row).
fn as2(shape: &[usize]) -> [usize; 2] {
    match shape.split_last() {
        None => [1, 1],
        Some((&last, lead)) => [lead.iter().product(), last],
    }
}

fn f2(ctx: &Ctx, name: &str, shape: [usize; 2], d: &Device) -> Result<Tensor<2>, Fail> {
    Ok(tensor2(&ctx.f::<f64>(name)?, shape, d)?)
}

fn kl(ctx: &Ctx, cfg: &KlConfig, lp: &str, rf: &str, out: &str) -> OpResult {
    let d = dev()?;
    let shape = as2(&ctx.shape(lp)?);
    let n = shape[0] * shape[1];
    let mask = mask2(&vec![true; n], shape, &d)?;
    let est = posttrain_burn::kl::kl_estimate(
        cfg,
        f2(ctx, lp, shape, &d)?,
        f2(ctx, rf, shape, &d)?,
        &mask,
    )?;
    let mut o = Outputs::new();
    if let Some(c) = cot_vec::<f64>(ctx, out, n)? {
        let g: Vec<f64> = to_vec(est.grad)
            .iter()
            .zip(&c)
            .map(|(g, c)| g * c)
            .collect();
        o.grad(lp, &g);
    }
    o.put(out, &to_vec(est.value));
    Ok(o)
}

fn global_norm(ctx: &Ctx, with_scale_factor: bool) -> Result<GlobalNorm, Fail> {
    super::loss_agg::global_norm(ctx, with_scale_factor)
}

fn agg(ctx: &Ctx, mode: AggMode, loss_name: &str, scale: bool) -> OpResult {
    let d = dev()?;
    let norm = global_norm(ctx, scale)?;
    let shape = as2(&ctx.shape(loss_name)?);
    let loss = f2(ctx, loss_name, shape, &d)?;
    let mask = ctx.mask("loss_mask")?;
    let mask = mask2(&mask, shape, &d)?;
    let out = posttrain_burn::aggregate::aggregate(mode, &norm, loss, &mask)?;
    let c = ctx.cot_scalar::<f64>("loss")?;
    let g: Vec<f64> = to_vec(out.weights).iter().map(|w| w * c).collect();
    let mut o = Outputs::new();
    o.scalar("loss", to_vec(out.value)[0]).grad(loss_name, &g);
    Ok(o)
}

/// `[rows, vocab]` logits as a `[1, rows, vocab]` tensor.
fn logits3(ctx: &Ctx, d: &Device) -> Result<(Tensor<3>, usize, usize), Fail> {
    let [rows, vocab] = as2(&ctx.shape("logits")?);
    let z = tensor3(&ctx.f::<f64>("logits")?, [1, rows, vocab], d)?;
    Ok((z, rows, vocab))
}

fn gather(ctx: &Ctx, ids: &str, out_name: &str, temp_key: Option<&str>) -> OpResult {
    if ctx.shape(ids)?.len() == ctx.shape("logits")?.len() {
        return Err(ctx.unsupported(ids)); // top-k ids per row
    }
    let t = match temp_key.map(|k| ctx.p_opt_f64(k)).transpose()?.flatten() {
        Some(t) => Temperature::new(t)?,
        None => Temperature::ONE,
    };
    let d = dev()?;
    let (z, rows, _) = logits3(ctx, &d)?;
    let index = ctx.i64(ids)?;
    posttrain_core::error::check_len("targets", index.len(), rows)?;
    let targets = Tensor::<2, Int>::from_data(TensorData::new(index, [1, rows]), &d);
    let cot = cot_vec::<f64>(ctx, out_name, rows)?
        .map(|c| tensor2(&c, [1, rows], &d))
        .transpose()?;
    let (lp, g) = posttrain_burn::logits::selective_log_softmax(z, targets, t, cot)?;
    let mut o = Outputs::new();
    if let Some(g) = g {
        o.grad("logits", &to_vec(g));
    }
    o.put(out_name, &to_vec(lp));
    Ok(o)
}

fn entropy(ctx: &Ctx, out_name: &str) -> OpResult {
    let d = dev()?;
    let (z, rows, _) = logits3(ctx, &d)?;
    let cot = cot_vec::<f64>(ctx, out_name, rows)?
        .map(|c| tensor2(&c, [1, rows], &d))
        .transpose()?;
    let (h, g) = posttrain_burn::logits::entropy_from_logits(z, cot)?;
    let mut o = Outputs::new();
    if let Some(g) = g {
        o.grad("logits", &to_vec(g));
    }
    o.put(out_name, &to_vec(h));
    Ok(o)
}

fn agg_mode(ctx: &Ctx) -> Result<AggMode, Fail> {
    ctx.p_str("loss_agg_mode")?
        .parse()
        .map_err(|_| ctx.unsupported("loss_agg_mode"))
}

fn verl_policy_loss(ctx: &Ctx) -> OpResult {
    let mode: PolicyLossMode = ctx
        .p_str("loss_mode")?
        .parse()
        .map_err(|_| ctx.unsupported("loss_mode"))?;
    if matches!(
        mode,
        PolicyLossMode::ClipCov | PolicyLossMode::KlCov | PolicyLossMode::GeoMean
    ) {
        return Err(ctx.unsupported("loss_mode"));
    }
    let params = VerlPolicyParams {
        clip_ratio: ctx.p_f64("clip_ratio")?,
        clip_ratio_low: ctx.p_opt_f64("clip_ratio_low")?,
        clip_ratio_high: ctx.p_opt_f64("clip_ratio_high")?,
        clip_ratio_c: ctx.p_opt_f64("clip_ratio_c")?.unwrap_or(3.0),
        tau_pos: ctx.p_opt_f64("tau_pos")?.unwrap_or(1.0),
        tau_neg: ctx.p_opt_f64("tau_neg")?.unwrap_or(1.05),
        dro_beta: ctx.p_opt_f64("dro_beta")?,
        ..VerlPolicyParams::default()
    };
    let loss = PolicyLoss::from_verl(mode, &params)?;
    policy(
        ctx,
        &loss,
        agg_mode(ctx),
        global_norm(ctx, true),
        "old_log_prob",
    )
}

fn verl_compute_policy_loss(ctx: &Ctx) -> OpResult {
    let params = VerlPolicyParams {
        clip_ratio: ctx.p_f64("cliprange")?,
        clip_ratio_low: ctx.p_opt_f64("cliprange_low")?,
        clip_ratio_high: ctx.p_opt_f64("cliprange_high")?,
        clip_ratio_c: ctx.p_opt_f64("clip_ratio_c")?.unwrap_or(3.0),
        ..VerlPolicyParams::default()
    };
    let loss = PolicyLoss::from_verl(PolicyLossMode::Vanilla, &params)?;
    policy(
        ctx,
        &loss,
        agg_mode(ctx),
        Ok(GlobalNorm::default()),
        "old_log_prob",
    )
}

fn policy(
    ctx: &Ctx,
    loss: &PolicyLoss,
    agg: Result<AggMode, Fail>,
    norm: Result<GlobalNorm, Fail>,
    old_name: &str,
) -> OpResult {
    let (agg, norm) = (agg?, norm?);
    let d = dev()?;
    let shape = as2(&ctx.shape("log_prob")?);
    let mask = mask2(&ctx.mask("response_mask")?, shape, &d)?;
    let w = match ctx.f_opt::<f64>("rollout_is_weights")? {
        Some(w) => Some(tensor2(&w, shape, &d)?),
        None => None,
    };
    let out = posttrain_burn::policy::policy_loss(
        loss,
        agg,
        &norm,
        f2(ctx, "log_prob", shape, &d)?,
        f2(ctx, old_name, shape, &d)?,
        f2(ctx, "advantages", shape, &d)?,
        &mask,
        w,
    )?;
    let mut o = Outputs::new();
    if ctx.wants_grad("log_prob") {
        let c = ctx.cot_scalar::<f64>("pg_loss")?;
        let g: Vec<f64> = to_vec(out.grad).iter().map(|g| g * c).collect();
        o.grad("log_prob", &g);
    }
    o.scalar("pg_loss", to_vec(out.loss)[0])
        .scalar("pg_clipfrac", to_vec(out.clipfrac)[0])
        .scalar("pg_clipfrac_lower", to_vec(out.clipfrac_lower)[0])
        .scalar("ppo_kl", to_vec(out.approx_kl)[0]);
    Ok(o)
}
