//! Distillation losses on burn tensors: handlers for the `burn-*` backends
//! (same parameter parsing as the core handlers in `ops::distill`).

use crate::case::{Ctx, Fail, OpResult, Outputs};
use crate::ops::distill::{
    dims3, distillation_setup, gkd_setup, jsd_loss_config, jsd_valid, SlicedJsd, IGNORE_INDEX,
};
use crate::ops::logits::cot_vec;
use posttrain_burn::burn::tensor::Tensor;
use posttrain_burn::{mask2, tensor3, to_vec, Device};
use posttrain_core::distill::{Jsd, Reduction};
use posttrain_core::error::check_len;

/// Runs `op` if this family owns it.
pub fn run(op: &str, ctx: &Ctx, d: &Device) -> Option<OpResult> {
    Some(match op {
        "openrlhf.kd_loss" => kd(ctx, d),
        "trl.distillation_generalized_jsd_loss" | "trl.gkd_generalized_jsd_loss" => {
            jsd_loss(ctx, d)
        }
        "trl.distillation_jsd_divergence" => jsd_divergence(ctx, d),
        "trl.gkd_compute_loss" => gkd_setup(ctx).and_then(|c| sliced(ctx, d, c)),
        "trl.distillation_compute_loss" => distillation_setup(ctx).and_then(|c| sliced(ctx, d, c)),
        _ => return None,
    })
}

fn logits(ctx: &Ctx, name: &str, d: &Device) -> Result<(Tensor<3>, [usize; 3]), Fail> {
    let (dims, vocab) = dims3(ctx, name)?;
    let shape = [dims.batch, dims.seq, vocab];
    Ok((tensor3(&ctx.f::<f64>(name)?, shape, d)?, shape))
}

fn kd(ctx: &Ctx, d: &Device) -> OpResult {
    let (zs, [b, s, _]) = logits(ctx, "logits", d)?;
    let (zt, _) = logits(ctx, "teacher_logits", d)?;
    let valid: Vec<bool> = ctx
        .i64("label")?
        .iter()
        .map(|&l| l != IGNORE_INDEX)
        .collect();
    let valid = mask2(&valid, [b, s], d)?;
    let cot = if ctx.has_vjp() {
        Some(ctx.cot_scalar::<f64>("distil_loss")?)
    } else {
        None
    };
    let (l, g) = posttrain_burn::distill::kd_loss(zs, zt, &valid, cot)?;
    let mut o = Outputs::new();
    if let Some(g) = g {
        o.grad("logits", &to_vec(g));
    }
    o.scalar("distil_loss", to_vec(l)[0]);
    Ok(o)
}

fn jsd_loss(ctx: &Ctx, d: &Device) -> OpResult {
    let cfg = jsd_loss_config(ctx)?;
    let (zs, [b, s, v]) = logits(ctx, "student_logits", d)?;
    let (zt, _) = logits(ctx, "teacher_logits", d)?;
    let valid = jsd_valid(ctx, posttrain_core::Dims::new(b, s))?;
    let valid_t = valid.as_ref().map(|m| mask2(m, [b, s], d)).transpose()?;
    let mut o = Outputs::new();
    if cfg.reduction == Reduction::None && cfg.num_items_in_batch.is_none() {
        // Output rows: the valid ones (TRL's `jsd[mask]`), or all.
        let kept: Vec<usize> = (0..b * s)
            .filter(|&r| valid.as_ref().is_none_or(|m| m[r]))
            .collect();
        let cot = match cot_vec::<f64>(ctx, "loss", kept.len() * v)? {
            Some(c) => {
                check_len("cotangent", c.len(), kept.len() * v)?;
                let mut full = vec![0.0; b * s * v];
                for (i, &r) in kept.iter().enumerate() {
                    full[r * v..(r + 1) * v].copy_from_slice(&c[i * v..(i + 1) * v]);
                }
                Some(tensor3(&full, [b, s, v], d)?)
            }
            None => None,
        };
        let (out, g) = posttrain_burn::distill::generalized_jsd_elementwise(
            &cfg.jsd,
            cfg.temperature,
            zs,
            zt,
            valid_t.as_ref(),
            cot,
        )?;
        if let Some(g) = g {
            o.grad("student_logits", &to_vec(g));
        }
        let out = to_vec(out);
        let compact: Vec<f64> = kept
            .iter()
            .flat_map(|&r| out[r * v..(r + 1) * v].iter().copied())
            .collect();
        o.put("loss", &compact);
        return Ok(o);
    }
    let cot = if ctx.has_vjp() {
        Some(ctx.cot_scalar::<f64>("loss")?)
    } else {
        None
    };
    let (l, g) =
        posttrain_burn::distill::generalized_jsd_loss(&cfg, zs, zt, valid_t.as_ref(), cot)?;
    if let Some(g) = g {
        o.grad("student_logits", &to_vec(g));
    }
    o.scalar("loss", to_vec(l)[0]);
    Ok(o)
}

fn jsd_divergence(ctx: &Ctx, d: &Device) -> OpResult {
    let jsd = Jsd::new(ctx.p_f64("beta")?)?;
    let shape = ctx.shape("student_log_probs")?;
    let n: usize = shape.iter().product();
    // Element-wise: any layout will do; a `[1, 1, n]` tensor.
    let shape3 = [1, 1, n];
    let s = tensor3(&ctx.f::<f64>("student_log_probs")?, shape3, d)?;
    let t = tensor3(&ctx.f::<f64>("teacher_log_probs")?, shape3, d)?;
    let support = match ctx.mask_opt("support_mask")? {
        Some(m) => {
            check_len("support_mask", m.len(), n)?;
            Some(Tensor::from_data(
                posttrain_burn::burn::tensor::TensorData::new(m, shape3),
                d,
            ))
        }
        None => None,
    };
    let cot = cot_vec::<f64>(ctx, "jsd", n)?
        .map(|c| tensor3(&c, shape3, d))
        .transpose()?;
    let (out, g) = posttrain_burn::distill::jsd_from_log_probs(&jsd, s, t, support.as_ref(), cot)?;
    let mut o = Outputs::new();
    if let Some(g) = g {
        o.grad("student_log_probs", &to_vec(g));
    }
    o.put("jsd", &to_vec(out));
    Ok(o)
}

/// The batch-mean JSD over positions `[from, from + len)` of the logits: the
/// slice is a `narrow` of the tensors, the gradient is zero-padded back.
fn sliced(ctx: &Ctx, d: &Device, c: SlicedJsd) -> OpResult {
    let (zs, [b, s, v]) = logits(ctx, "logits", d)?;
    let (zt, _) = logits(ctx, "teacher_logits", d)?;
    check_len("valid", c.valid.len(), b * c.len)?;
    let valid = mask2(&c.valid, [b, c.len], d)?;
    let zs = zs.narrow(1, c.from, c.len);
    let zt = zt.narrow(1, c.from, c.len);
    let cot = if ctx.has_vjp() {
        Some(ctx.cot_scalar::<f64>("loss")?)
    } else {
        None
    };
    let (l, g) = posttrain_burn::distill::generalized_jsd_loss(&c.cfg, zs, zt, Some(&valid), cot)?;
    let mut o = Outputs::new();
    if let Some(g) = g {
        let before = Tensor::<3>::zeros([b, c.from, v], d);
        let after = Tensor::<3>::zeros([b, s - c.from - c.len, v], d);
        let parts: Vec<Tensor<3>> = [before, g, after]
            .into_iter()
            .filter(|t| t.dims()[1] > 0)
            .collect();
        let full = if parts.is_empty() {
            Tensor::<3>::zeros([b, s, v], d)
        } else {
            Tensor::cat(parts, 1)
        };
        o.grad("logits", &to_vec(full));
    }
    o.scalar("loss", to_vec(l)[0]);
    Ok(o)
}
