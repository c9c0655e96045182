//! The fused ops of `posttrain_burn::fused` (custom burn backward nodes
//! carrying the core's closed-form gradient) against burn's autodiff of the
//! plain ops: equal values, equal gradients (1e-5 relative), and the
//! closed-form gradient where the plain graph differs by design.
#![cfg(feature = "autodiff")]

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use posttrain_burn::kl::kl_loss;
use posttrain_burn::logits::{entropy_from_logits, selective_log_softmax};
use posttrain_burn::policy::policy_loss;
use posttrain_burn::preference::{paired_loss, PairTensors};
use posttrain_burn::{device, fused, mask2, tensor1, tensor2, tensor3, to_vec};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::kl::KlConfig;
use posttrain_core::logits::Temperature;
use posttrain_core::policy::token::{PolicyLoss, PolicyLossMode, VerlPolicyParams};
use posttrain_core::preference::paired::{FDivergence, LossTerm, PairedConfig, PairedLoss};
use posttrain_core::Error;

fn ad() -> Device {
    device().unwrap().autodiff()
}

/// Deterministic pseudo-random values in `[lo, hi)`, rounded to f32.
fn vals(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let u = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
            (lo + (hi - lo) * u) as f32 as f64
        })
        .collect()
}

#[track_caller]
fn close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{what}[{i}]: fused {g}, reference {w}"
        );
    }
}

const B: usize = 3;
const S: usize = 7;

fn mask_vals() -> Vec<bool> {
    // Row 2 fully masked; scattered padding elsewhere.
    (0..B * S).map(|i| i % 4 != 3 && i < 2 * S).collect()
}

fn mask(dev: &Device) -> Tensor<2, Bool> {
    mask2(&mask_vals(), [B, S], dev).unwrap()
}

struct PolicyInputs {
    lp: Vec<f64>,
    old: Vec<f64>,
    adv: Vec<f64>,
    rf: Vec<f64>,
}

fn policy_inputs(seed: u64) -> PolicyInputs {
    let lp = vals(seed, B * S, -3.0, -0.1);
    let old = lp
        .iter()
        .zip(vals(seed + 1, B * S, -0.5, 0.5))
        .map(|(a, b)| (a + b) as f32 as f64)
        .collect();
    PolicyInputs {
        lp,
        old,
        adv: vals(seed + 2, B * S, -2.0, 2.0),
        rf: vals(seed + 3, B * S, -3.0, -0.1),
    }
}

/// The fused loss and `∂loss/∂lp` of a fresh leaf.
fn fused_policy(
    loss: &PolicyLoss,
    agg: AggMode,
    kl: Option<(KlConfig, f64)>,
    x: &PolicyInputs,
    dev: &Device,
) -> (Vec<f64>, Vec<f64>, fused::FusedPolicyOutput) {
    let lp = tensor2(&x.lp, [B, S], dev).unwrap().require_grad();
    let penalty = kl.map(|(config, coef)| fused::KlPenalty {
        config,
        coef,
        ref_log_prob: tensor2(&x.rf, [B, S], dev).unwrap(),
    });
    let out = fused::policy_loss_with_kl(
        loss,
        agg,
        &GlobalNorm::default(),
        lp.clone(),
        tensor2(&x.old, [B, S], dev).unwrap(),
        tensor2(&x.adv, [B, S], dev).unwrap(),
        &mask(dev),
        None,
        penalty,
    )
    .unwrap();
    let grads = out.loss.backward();
    let g = to_vec(lp.grad(&grads).unwrap());
    (to_vec(out.loss.clone()), g, out)
}

/// The plain ops' value and burn's autodiff gradient of it.
fn graph_policy(
    loss: &PolicyLoss,
    agg: AggMode,
    kl: Option<(KlConfig, f64)>,
    x: &PolicyInputs,
    dev: &Device,
) -> (Vec<f64>, Vec<f64>) {
    let lp = tensor2(&x.lp, [B, S], dev).unwrap().require_grad();
    let m = mask(dev);
    let pg = policy_loss(
        loss,
        agg,
        &GlobalNorm::default(),
        lp.clone(),
        tensor2(&x.old, [B, S], dev).unwrap(),
        tensor2(&x.adv, [B, S], dev).unwrap(),
        &m,
        None,
    )
    .unwrap();
    let mut total = pg.loss;
    if let Some((cfg, coef)) = kl {
        let k = kl_loss(
            &cfg,
            agg,
            &GlobalNorm::default(),
            lp.clone(),
            tensor2(&x.rf, [B, S], dev).unwrap(),
            &m,
        )
        .unwrap();
        total = total + k.value.mul_scalar(coef);
    }
    let grads = total.backward();
    (to_vec(total), to_vec(lp.grad(&grads).unwrap()))
}

#[test]
fn policy_loss_with_kl_matches_autodiff_graph() {
    let dev = ad();
    let p = VerlPolicyParams {
        dro_beta: Some(0.3),
        clip_ratio_high: Some(0.28),
        ..VerlPolicyParams::default()
    };
    let x = policy_inputs(11);
    let mut checked = 0;
    for mode in [
        PolicyLossMode::Vanilla,
        PolicyLossMode::Sapo,
        PolicyLossMode::Gpg,
        PolicyLossMode::Dro,
    ] {
        let loss = PolicyLoss::from_verl(mode, &p).unwrap();
        for agg in AggMode::ALL {
            for kl in [None, Some("kl"), Some("low_var_kl"), Some("mse")] {
                let kl = kl.map(|n| (KlConfig::parse_verl(n).unwrap(), 0.37));
                let (fv, fg, _) = fused_policy(&loss, agg, kl, &x, &dev);
                let (pv, pg) = graph_policy(&loss, agg, kl, &x, &dev);
                let what = format!("{mode:?} {agg:?} {kl:?}");
                close(&format!("{what} value"), &fv, &pv);
                close(&format!("{what} grad"), &fg, &pg);
                assert!(fg.iter().any(|g| g.abs() > 1e-6), "{what}: zero gradient");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 4 * AggMode::ALL.len() * 4);
}

#[test]
fn stop_gradient_losses_get_the_closed_form_gradient() {
    // DPPO, CISPO, GSPO and the straight-through KL define their gradient with
    // sg(·): the fused op registers the core's gradient (not autodiff of the value).
    let dev = ad();
    let x = policy_inputs(21);
    for mode in [
        PolicyLossMode::DppoTv,
        PolicyLossMode::Cispo,
        PolicyLossMode::Gspo,
        PolicyLossMode::Vanilla,
    ] {
        let loss = PolicyLoss::from_verl(mode, &VerlPolicyParams::default()).unwrap();
        let kl = Some((KlConfig::parse_verl("low_var_kl+").unwrap(), 0.5));
        let (fv, fg, out) = fused_policy(&loss, AggMode::TokenMean, kl, &x, &dev);
        let k = out.kl.unwrap();
        let want = out.policy.grad + k.grad.mul_scalar(0.5);
        close(&format!("{mode:?} grad"), &fg, &to_vec(want));
        let (pv, _) = graph_policy(&loss, AggMode::TokenMean, kl, &x, &dev);
        close(&format!("{mode:?} value"), &fv, &pv);
    }
}

#[test]
fn fused_policy_chains_through_upstream_ops_and_scales() {
    // log π as a non-leaf (x·2 − 1) and the loss scaled by 3: the registered
    // backward must multiply by the incoming gradient and feed its parent.
    let dev = ad();
    let xs = policy_inputs(31);
    let loss =
        PolicyLoss::from_verl(PolicyLossMode::Vanilla, &VerlPolicyParams::default()).unwrap();
    let kl = KlConfig::parse_verl("low_var_kl").unwrap();
    let run = |fused_path: bool| {
        let half: Vec<f64> = xs.lp.iter().map(|v| (v + 1.0) / 2.0).collect();
        let x = tensor2(&half, [B, S], &dev).unwrap().require_grad();
        let lp = x.clone().mul_scalar(2.0).sub_scalar(1.0);
        let old = tensor2(&xs.old, [B, S], &dev).unwrap();
        let adv = tensor2(&xs.adv, [B, S], &dev).unwrap();
        let rf = tensor2(&xs.rf, [B, S], &dev).unwrap();
        let m = mask(&dev);
        let norm = GlobalNorm::default();
        let l = if fused_path {
            let pen = fused::KlPenalty {
                config: kl,
                coef: 0.2,
                ref_log_prob: rf,
            };
            fused::policy_loss_with_kl(
                &loss,
                AggMode::TokenMean,
                &norm,
                lp,
                old,
                adv,
                &m,
                None,
                Some(pen),
            )
            .unwrap()
            .loss
        } else {
            let pg = policy_loss(
                &loss,
                AggMode::TokenMean,
                &norm,
                lp.clone(),
                old,
                adv,
                &m,
                None,
            )
            .unwrap();
            let k = kl_loss(&kl, AggMode::TokenMean, &norm, lp, rf, &m).unwrap();
            pg.loss + k.value.mul_scalar(0.2)
        };
        let total = l.mul_scalar(3.0) + x.clone().sum().mul_scalar(0.5);
        let grads = total.backward();
        to_vec(x.grad(&grads).unwrap())
    };
    close("chained grad", &run(true), &run(false));
}

#[test]
fn masked_nan_never_reaches_the_fused_gradient() {
    let dev = ad();
    let mut x = policy_inputs(41);
    for (i, &m) in mask_vals().iter().enumerate() {
        if !m {
            x.lp[i] = f64::NAN;
            x.old[i] = f64::INFINITY;
            x.adv[i] = f64::NAN;
            x.rf[i] = f64::NEG_INFINITY;
        }
    }
    let loss =
        PolicyLoss::from_verl(PolicyLossMode::Vanilla, &VerlPolicyParams::default()).unwrap();
    let kl = Some((KlConfig::parse_verl("low_var_kl").unwrap(), 0.1));
    let (fv, fg, _) = fused_policy(&loss, AggMode::SeqMeanTokenMean, kl, &x, &dev);
    assert!(fv[0].is_finite());
    for (i, (&g, &m)) in fg.iter().zip(&mask_vals()).enumerate() {
        assert!(g.is_finite(), "grad[{i}] = {g}");
        if !m {
            assert_eq!(g, 0.0, "masked grad[{i}]");
        }
    }
    // Same as with clean padding.
    let clean = policy_inputs(41);
    let (cv, cg, _) = fused_policy(&loss, AggMode::SeqMeanTokenMean, kl, &clean, &dev);
    close("value", &fv, &cv);
    close("grad", &fg, &cg);
}

fn targets(v: usize, dev: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = (0..B * S).map(|i| ((i * 5 + 1) % v) as i64).collect();
    Tensor::<2, Int>::from_data(TensorData::new(ids, [B, S]), dev)
}

#[test]
fn selective_log_softmax_matches_autodiff_graph() {
    let dev = ad();
    let v = 11;
    let zv = vals(51, B * S * v, -6.0, 6.0);
    let cot = tensor2(&vals(52, B * S, -1.0, 1.0), [B, S], &dev).unwrap();
    for temp in [1.0, 0.7] {
        let t = Temperature::new(temp).unwrap();
        let zf = tensor3(&zv, [B, S, v], &dev).unwrap().require_grad();
        let f = fused::selective_log_softmax(zf.clone(), targets(v, &dev), t).unwrap();
        let gf = (f.clone() * cot.clone()).sum().backward();
        let zp = tensor3(&zv, [B, S, v], &dev).unwrap().require_grad();
        let (p, _) = selective_log_softmax(zp.clone(), targets(v, &dev), t, None).unwrap();
        let gp = (p.clone() * cot.clone()).sum().backward();
        close(&format!("T={temp} value"), &to_vec(f), &to_vec(p));
        close(
            &format!("T={temp} grad"),
            &to_vec(zf.grad(&gf).unwrap()),
            &to_vec(zp.grad(&gp).unwrap()),
        );
    }
}

#[test]
fn entropy_matches_autodiff_graph() {
    let dev = ad();
    let v = 9;
    let zv = vals(61, B * S * v, -6.0, 6.0);
    let cot = tensor2(&vals(62, B * S, -1.0, 1.0), [B, S], &dev).unwrap();
    let zf = tensor3(&zv, [B, S, v], &dev).unwrap().require_grad();
    let f = fused::entropy(zf.clone()).unwrap();
    let gf = (f.clone() * cot.clone()).sum().backward();
    let zp = tensor3(&zv, [B, S, v], &dev).unwrap().require_grad();
    let (p, _) = entropy_from_logits(zp.clone(), None).unwrap();
    let gp = (p.clone() * cot).sum().backward();
    close("entropy value", &to_vec(f), &to_vec(p));
    close(
        "entropy grad",
        &to_vec(zf.grad(&gf).unwrap()),
        &to_vec(zp.grad(&gp).unwrap()),
    );
}

#[test]
fn logits_ops_compose_in_one_graph() {
    // Log-prob and entropy of the same logits in one loss: both backward
    // nodes register into the same parent.
    let dev = ad();
    let v = 13;
    let zv = vals(71, B * S * v, -4.0, 4.0);
    let t = Temperature::new(0.9).unwrap();
    let zf = tensor3(&zv, [B, S, v], &dev).unwrap().require_grad();
    let lf = fused::selective_log_softmax(zf.clone(), targets(v, &dev), t)
        .unwrap()
        .sum()
        - fused::entropy(zf.clone()).unwrap().mean().mul_scalar(0.01);
    let gf = lf.backward();
    let zp = tensor3(&zv, [B, S, v], &dev).unwrap().require_grad();
    let lp = selective_log_softmax(zp.clone(), targets(v, &dev), t, None)
        .unwrap()
        .0
        .sum()
        - entropy_from_logits(zp.clone(), None)
            .unwrap()
            .0
            .mean()
            .mul_scalar(0.01);
    let gp = lp.backward();
    close(
        "combined grad",
        &to_vec(zf.grad(&gf).unwrap()),
        &to_vec(zp.grad(&gp).unwrap()),
    );
}

#[test]
fn paired_loss_matches_autodiff_graph() {
    let dev = ad();
    let n = 10;
    let (cv, rv) = (vals(81, n, -30.0, -5.0), vals(82, n, -30.0, -5.0));
    let (c0, r0) = (vals(83, n, -30.0, -5.0), vals(84, n, -30.0, -5.0));
    for kind in [
        PairedLoss::Sigmoid,
        PairedLoss::Ipo,
        PairedLoss::Robust,
        PairedLoss::Hinge,
        PairedLoss::Discopop,
        PairedLoss::ApoDown,
    ] {
        for div in [FDivergence::ReverseKl, FDivergence::JsDivergence] {
            let cfg = PairedConfig::new(0.3, 0.1, true, 0.0, div, 0.05).unwrap();
            let terms = [LossTerm::new(kind)];
            let mk = || {
                let c = tensor1(&cv, &dev).require_grad();
                let r = tensor1(&rv, &dev).require_grad();
                let b = PairTensors::new(c.clone(), r.clone())
                    .with_reference(tensor1(&c0, &dev), tensor1(&r0, &dev));
                (c, r, b)
            };
            let (c, r, batch) = mk();
            let f = fused::paired_loss(&cfg, &terms, batch).unwrap();
            let gf = f.loss.backward();
            let (cp, rp, batch) = mk();
            let p = paired_loss(&cfg, &terms, batch).unwrap();
            let gp = p.loss.backward();
            let what = format!("{kind:?} {div:?}");
            close(&format!("{what} value"), &to_vec(f.loss), &to_vec(p.loss));
            close(
                &format!("{what} d chosen"),
                &to_vec(c.grad(&gf).unwrap()),
                &to_vec(cp.grad(&gp).unwrap()),
            );
            close(
                &format!("{what} d rejected"),
                &to_vec(r.grad(&gf).unwrap()),
                &to_vec(rp.grad(&gp).unwrap()),
            );
        }
    }
}

#[test]
fn tracked_data_inputs_are_typed_errors() {
    let dev = ad();
    let x = policy_inputs(91);
    let loss =
        PolicyLoss::from_verl(PolicyLossMode::Vanilla, &VerlPolicyParams::default()).unwrap();
    let lp = tensor2(&x.lp, [B, S], &dev).unwrap().require_grad();
    let adv = tensor2(&x.adv, [B, S], &dev).unwrap().require_grad();
    let err = fused::policy_loss_with_kl(
        &loss,
        AggMode::TokenMean,
        &GlobalNorm::default(),
        lp.clone(),
        tensor2(&x.old, [B, S], &dev).unwrap(),
        adv,
        &mask(&dev),
        None,
        None,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                input: "advantages",
                ..
            }
        ),
        "{err:?}"
    );
    // Shape mismatch: the plain op's typed error.
    let err = fused::policy_loss_with_kl(
        &loss,
        AggMode::TokenMean,
        &GlobalNorm::default(),
        lp,
        tensor2(&x.old[..S], [1, S], &dev).unwrap(),
        tensor2(&x.adv, [B, S], &dev).unwrap(),
        &mask(&dev),
        None,
        None,
    )
    .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err:?}");
    // Reference log-probs must be data.
    let c = tensor1(&[-3.0, -2.0], &dev).require_grad();
    let r = tensor1(&[-4.0, -1.0], &dev).require_grad();
    let batch = PairTensors::new(c, r).with_reference(
        tensor1(&[-3.5, -2.0], &dev).require_grad(),
        tensor1(&[-3.5, -1.5], &dev),
    );
    let cfg = PairedConfig::new(0.1, 0.0, true, 0.0, FDivergence::ReverseKl, 0.05).unwrap();
    let err = fused::paired_loss(&cfg, &[LossTerm::new(PairedLoss::Sigmoid)], batch).unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err:?}");
    // Bad coefficient.
    let pen = fused::KlPenalty {
        config: KlConfig::parse_verl("kl").unwrap(),
        coef: f64::NAN,
        ref_log_prob: tensor2(&x.rf, [B, S], &dev).unwrap(),
    };
    let err = fused::policy_loss_with_kl(
        &loss,
        AggMode::TokenMean,
        &GlobalNorm::default(),
        tensor2(&x.lp, [B, S], &dev).unwrap(),
        tensor2(&x.old, [B, S], &dev).unwrap(),
        tensor2(&x.adv, [B, S], &dev).unwrap(),
        &mask(&dev),
        None,
        Some(pen),
    )
    .unwrap_err();
    assert!(matches!(err, Error::OutOfRange { .. }), "{err:?}");
}

#[test]
fn without_autodiff_the_fused_ops_are_the_plain_values() {
    let dev = device().unwrap();
    let x = policy_inputs(101);
    let loss =
        PolicyLoss::from_verl(PolicyLossMode::Vanilla, &VerlPolicyParams::default()).unwrap();
    let m = mask(&dev);
    let f = fused::policy_loss_with_kl(
        &loss,
        AggMode::TokenMean,
        &GlobalNorm::default(),
        tensor2(&x.lp, [B, S], &dev).unwrap(),
        tensor2(&x.old, [B, S], &dev).unwrap(),
        tensor2(&x.adv, [B, S], &dev).unwrap(),
        &m,
        None,
        None,
    )
    .unwrap();
    let p = policy_loss(
        &loss,
        AggMode::TokenMean,
        &GlobalNorm::default(),
        tensor2(&x.lp, [B, S], &dev).unwrap(),
        tensor2(&x.old, [B, S], &dev).unwrap(),
        tensor2(&x.adv, [B, S], &dev).unwrap(),
        &m,
        None,
    )
    .unwrap();
    close("value", &to_vec(f.loss), &to_vec(p.loss));
    let v = 5;
    let z = tensor3(&vals(102, B * S * v, -3.0, 3.0), [B, S, v], &dev).unwrap();
    close(
        "entropy",
        &to_vec(fused::entropy(z.clone()).unwrap()),
        &to_vec(entropy_from_logits(z, None).unwrap().0),
    );
}

#[test]
fn balanced_checkpointing_device_gives_the_same_gradients() {
    // The route picks `Autodiff<B, BalancedCheckpointing>` for such a device.
    let plain = ad();
    let ckpt = device().unwrap().autodiff().gradient_checkpointing();
    let x = policy_inputs(111);
    let loss = PolicyLoss::from_verl(PolicyLossMode::Sapo, &VerlPolicyParams::default()).unwrap();
    let kl = Some((KlConfig::parse_verl("kl").unwrap(), 0.25));
    let (v1, g1, _) = fused_policy(&loss, AggMode::SeqMeanTokenSum, kl, &x, &ckpt);
    let (v2, g2) = graph_policy(&loss, AggMode::SeqMeanTokenSum, kl, &x, &plain);
    close("value", &v1, &v2);
    close("grad", &g1, &g2);
    let v = 6;
    let zv = vals(112, B * S * v, -3.0, 3.0);
    let z = tensor3(&zv, [B, S, v], &ckpt).unwrap().require_grad();
    let h = fused::entropy(z.clone()).unwrap();
    let g = h.sum().backward();
    let zp = tensor3(&zv, [B, S, v], &plain).unwrap().require_grad();
    let gp = entropy_from_logits(zp.clone(), None)
        .unwrap()
        .0
        .sum()
        .backward();
    close(
        "entropy grad",
        &to_vec(z.grad(&g).unwrap()),
        &to_vec(zp.grad(&gp).unwrap()),
    );
}

// ---------------------------------------------------------------------------
// The ndarray fast path (the core's fused slice kernels on the tensors' host
// buffers) against the core's reference drivers. On the other backends the
// same tests check the tensor path.
// ---------------------------------------------------------------------------

/// Reference outputs of `policy_loss_with_kl`, from the core's slice drivers
/// in f64.
struct CoreRef {
    loss: f64,
    grad: Vec<f64>,
    pg: f64,
    pg_grad: Vec<f64>,
    pg_per_token: Vec<f64>,
    clipfrac: f64,
    clipfrac_lower: f64,
    approx_kl: f64,
    kl: Option<(f64, Vec<f64>, Vec<f64>)>,
}

#[allow(clippy::too_many_arguments)]
fn core_reference(
    loss: &PolicyLoss,
    agg: AggMode,
    norm: &GlobalNorm,
    dims: [usize; 2],
    x: &PolicyInputs,
    isw: Option<&[f64]>,
    m: &[bool],
    kl: Option<(KlConfig, f64)>,
) -> CoreRef {
    use posttrain_core::aggregate::{aggregation_weights, weighted_sum};
    use posttrain_core::policy::token::{policy_loss_alloc, PolicyBatch};
    use posttrain_core::Dims;
    let d = Dims::new(dims[0], dims[1]);
    let batch = PolicyBatch {
        dims: d,
        log_prob: &x.lp,
        old_log_prob: &x.old,
        advantages: &x.adv,
        mask: m,
        is_weights: isw,
    };
    let (out, g) = policy_loss_alloc(loss, agg, norm, &batch, Some(1.0)).unwrap();
    let pg_grad = g.unwrap();
    let pg_per_token: Vec<f64> = (0..d.len())
        .map(|i| {
            if !m[i] {
                return 0.0;
            }
            loss.token(x.lp[i], x.old[i], x.adv[i]).loss * isw.map_or(1.0, |w| w[i])
        })
        .collect();
    let kl = kl.map(|(cfg, coef)| {
        let n = d.len();
        let mut w = vec![0.0; n];
        aggregation_weights(agg, norm, d, m, &mut w).unwrap();
        let (mut v, mut g) = (vec![0.0; n], vec![0.0; n]);
        cfg.estimate_slices(&x.lp, &x.rf, &mut v, Some((&vec![1.0; n], &mut g)))
            .unwrap();
        for i in 0..n {
            if !m[i] {
                v[i] = 0.0;
                g[i] = 0.0;
            }
            g[i] *= w[i];
        }
        (weighted_sum(&v, m, &w).unwrap(), g, v, coef)
    });
    let coef = kl.as_ref().map_or(0.0, |k| k.3);
    let grad = match &kl {
        Some((_, kg, _, _)) => pg_grad.iter().zip(kg).map(|(a, b)| a + coef * b).collect(),
        None => pg_grad.clone(),
    };
    CoreRef {
        loss: out.loss + kl.as_ref().map_or(0.0, |k| coef * k.0),
        grad,
        pg: out.loss,
        pg_grad,
        pg_per_token,
        clipfrac: out.clipfrac,
        clipfrac_lower: out.clipfrac_lower,
        approx_kl: out.approx_kl,
        kl: kl.map(|(v, g, t, _)| (v, g, t)),
    }
}

/// Every output of `policy_loss_with_kl` (value, backward gradient, the
/// policy and KL structs) against [`core_reference`].
#[allow(clippy::too_many_arguments)]
fn check_fused_policy(
    what: &str,
    loss: &PolicyLoss,
    agg: AggMode,
    norm: &GlobalNorm,
    dims: [usize; 2],
    x: &PolicyInputs,
    isw: Option<&[f64]>,
    m: &[bool],
    kl: Option<(KlConfig, f64)>,
    dev: &Device,
) {
    let lp = tensor2(&x.lp, dims, dev).unwrap().require_grad();
    let out = fused::policy_loss_with_kl(
        loss,
        agg,
        norm,
        lp.clone(),
        tensor2(&x.old, dims, dev).unwrap(),
        tensor2(&x.adv, dims, dev).unwrap(),
        &mask2(m, dims, dev).unwrap(),
        isw.map(|w| tensor2(w, dims, dev).unwrap()),
        kl.map(|(config, coef)| fused::KlPenalty {
            config,
            coef,
            ref_log_prob: tensor2(&x.rf, dims, dev).unwrap(),
        }),
    )
    .unwrap();
    let grads = out.loss.backward();
    let want = core_reference(loss, agg, norm, dims, x, isw, m, kl);
    close(
        &format!("{what} loss"),
        &to_vec(out.loss.clone()),
        &[want.loss],
    );
    close(
        &format!("{what} grad"),
        &to_vec(lp.grad(&grads).unwrap()),
        &want.grad,
    );
    let p = &out.policy;
    close(
        &format!("{what} pg_loss"),
        &to_vec(p.loss.clone()),
        &[want.pg],
    );
    close(
        &format!("{what} pg grad"),
        &to_vec(p.grad.clone()),
        &want.pg_grad,
    );
    close(
        &format!("{what} pg per_token"),
        &to_vec(p.per_token.clone()),
        &want.pg_per_token,
    );
    close(
        &format!("{what} clipfrac"),
        &to_vec(p.clipfrac.clone()),
        &[want.clipfrac],
    );
    close(
        &format!("{what} clipfrac_lower"),
        &to_vec(p.clipfrac_lower.clone()),
        &[want.clipfrac_lower],
    );
    close(
        &format!("{what} approx_kl"),
        &to_vec(p.approx_kl.clone()),
        &[want.approx_kl],
    );
    match (&out.kl, &want.kl) {
        (Some(k), Some((v, g, t))) => {
            close(&format!("{what} kl value"), &to_vec(k.value.clone()), &[*v]);
            close(&format!("{what} kl grad"), &to_vec(k.grad.clone()), g);
            close(
                &format!("{what} kl per_token"),
                &to_vec(k.per_token.clone()),
                t,
            );
        }
        (None, None) => {}
        _ => panic!("{what}: KL output present in one only"),
    }
}

/// Masked positions of `x` set to NaN / ±inf (padding garbage).
fn poison(x: &mut PolicyInputs, m: &[bool]) {
    for (i, &keep) in m.iter().enumerate() {
        if !keep {
            x.lp[i] = f64::NAN;
            x.old[i] = f64::INFINITY;
            x.adv[i] = f64::NAN;
            x.rf[i] = f64::NEG_INFINITY;
        }
    }
}

#[test]
fn fused_policy_matches_the_core_reference_in_every_output() {
    let dev = ad();
    let p = VerlPolicyParams {
        dro_beta: Some(0.3),
        clip_ratio_high: Some(0.28),
        ..VerlPolicyParams::default()
    };
    let m = mask_vals();
    let mut x = policy_inputs(121);
    poison(&mut x, &m);
    let isw: Vec<f64> = vals(125, B * S, 0.5, 1.5)
        .into_iter()
        .zip(&m)
        .map(|(w, &keep)| if keep { w } else { f64::NAN })
        .collect();
    let norms = [
        GlobalNorm::default(),
        GlobalNorm {
            dp_size: 2.0,
            batch_num_tokens: Some(40.0),
            global_batch_size: Some(5.0),
            loss_scale_factor: Some(3.0),
        },
    ];
    let mut checked = 0;
    for mode in PolicyLossMode::ALL {
        let loss = PolicyLoss::from_verl(mode, &p).unwrap();
        if !loss.is_token_local() {
            continue;
        }
        for agg in AggMode::ALL {
            for (i, kl) in [
                None,
                Some("kl"),
                Some("abs"),
                Some("mse"),
                Some("low_var_kl+"),
            ]
            .into_iter()
            .enumerate()
            {
                let kl = kl.map(|n| (KlConfig::parse_verl(n).unwrap(), 0.37));
                let w = (i % 2 == 1).then_some(&isw[..]);
                let norm = &norms[i % 2];
                let what = format!("{mode:?} {agg:?} {kl:?} is={} {norm:?}", w.is_some());
                check_fused_policy(&what, &loss, agg, norm, [B, S], &x, w, &m, kl, &dev);
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 7 * AggMode::ALL.len() * 5);
}

#[test]
fn fused_policy_on_a_batch_split_over_threads() {
    // 40 × 1000 tokens: above the fast path's threshold for threads.
    let dims = [40, 1000];
    let n = dims[0] * dims[1];
    let m: Vec<bool> = (0..n)
        .map(|i| (i % dims[1]) < 200 + 17 * (i / dims[1]) && i % 13 != 5)
        .collect();
    let lp = vals(131, n, -3.0, -0.1);
    let old = lp
        .iter()
        .zip(vals(132, n, -0.3, 0.3))
        .map(|(a, b)| (a + b) as f32 as f64)
        .collect();
    let mut x = PolicyInputs {
        lp,
        old,
        adv: vals(133, n, -2.0, 2.0),
        rf: vals(134, n, -3.0, -0.1),
    };
    poison(&mut x, &m);
    let isw = vals(135, n, 0.8, 1.2);
    let loss =
        PolicyLoss::from_verl(PolicyLossMode::Vanilla, &VerlPolicyParams::default()).unwrap();
    let kl = Some((KlConfig::parse_verl("low_var_kl").unwrap(), 0.001));
    let dev = ad();
    for agg in [AggMode::SeqMeanTokenMean, AggMode::TokenMean] {
        check_fused_policy(
            &format!("large {agg:?}"),
            &loss,
            agg,
            &GlobalNorm::default(),
            dims,
            &x,
            Some(&isw),
            &m,
            kl,
            &dev,
        );
    }
}

#[test]
fn cross_token_variants_take_the_tensor_path() {
    // gspo, geo_mean, clip_cov and kl_cov need cross-token passes: the fused
    // op runs the plain ops (with the closed-form gradient registered).
    let dev = ad();
    let x = policy_inputs(141);
    let k3 = KlConfig::parse_verl("low_var_kl").unwrap();
    let kl = Some((k3, 0.3));
    let params = VerlPolicyParams {
        dro_beta: Some(0.3),
        ..VerlPolicyParams::default()
    };
    let mut checked = 0;
    for mode in PolicyLossMode::ALL {
        let loss = PolicyLoss::from_verl(mode, &params).unwrap();
        if loss.is_token_local() {
            continue;
        }
        let (fv, fg, out) = fused_policy(&loss, AggMode::SeqMeanTokenMean, kl, &x, &dev);
        let m = mask(&dev);
        let lp = tensor2(&x.lp, [B, S], &dev).unwrap();
        let pg = policy_loss(
            &loss,
            AggMode::SeqMeanTokenMean,
            &GlobalNorm::default(),
            lp.clone(),
            tensor2(&x.old, [B, S], &dev).unwrap(),
            tensor2(&x.adv, [B, S], &dev).unwrap(),
            &m,
            None,
        )
        .unwrap();
        let k = kl_loss(
            &k3,
            AggMode::SeqMeanTokenMean,
            &GlobalNorm::default(),
            lp,
            tensor2(&x.rf, [B, S], &dev).unwrap(),
            &m,
        )
        .unwrap();
        let what = format!("{mode:?}");
        let want = pg.loss.clone() + k.value.clone().mul_scalar(0.3);
        close(&format!("{what} value"), &fv, &to_vec(want));
        let want = pg.grad.clone() + k.grad.clone().mul_scalar(0.3);
        close(&format!("{what} grad"), &fg, &to_vec(want));
        close(
            &format!("{what} per_token"),
            &to_vec(out.policy.per_token),
            &to_vec(pg.per_token),
        );
        close(
            &format!("{what} clipfrac"),
            &to_vec(out.policy.clipfrac),
            &to_vec(pg.clipfrac),
        );
        checked += 1;
    }
    assert_eq!(checked, 4);
}

/// The core's reference drivers: `(log p[t], H, ∂(Σ c_lp·log p + c_H·H)/∂z)`,
/// the entropy of `z/T`.
#[allow(clippy::too_many_arguments)]
fn core_logits_reference(
    z: &[f64],
    rows: usize,
    v: usize,
    t: f64,
    ids: &[i64],
    c_lp: &[f64],
    c_h: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    use posttrain_core::logits::{entropy_from_logits, gather_log_softmax};
    let temp = Temperature::new(t).unwrap();
    let (mut lp, mut g_lp) = (vec![0.0; rows], vec![0.0; rows * v]);
    gather_log_softmax(z, rows, v, temp, 1, ids, &mut lp, Some((c_lp, &mut g_lp))).unwrap();
    let y: Vec<f64> = z.iter().map(|a| a / t).collect();
    let (mut h, mut g_h) = (vec![0.0; rows], vec![0.0; rows * v]);
    entropy_from_logits(&y, rows, v, &mut h, Some((c_h, &mut g_h))).unwrap();
    let g = g_lp.iter().zip(&g_h).map(|(a, b)| a + b / t).collect();
    (lp, h, g)
}

fn logits_case(seed: u64, dims: [usize; 3]) -> (Vec<f64>, Vec<i64>, Vec<f64>, Vec<f64>) {
    let [b, s, v] = dims;
    let rows = b * s;
    let mut z = vals(seed, rows * v, -8.0, 8.0);
    let mut ids: Vec<i64> = (0..rows).map(|r| ((r * 5 + 1) % v) as i64).collect();
    // Banned tokens (−inf, never a target) in some rows; row 0 all banned
    // but its target.
    for r in (3..rows).step_by(3) {
        let mut k = (r * 7) % v;
        if k as i64 == ids[r] {
            k = (k + 1) % v;
        }
        z[r * v + k] = f64::NEG_INFINITY;
    }
    ids[0] = 0;
    z[1..v].fill(f64::NEG_INFINITY);
    (
        z,
        ids,
        vals(seed + 1, rows, -1.0, 1.0),
        vals(seed + 2, rows, -1.0, 1.0),
    )
}

#[test]
fn log_probs_and_entropy_match_the_core_reference() {
    let dev = ad();
    // v = 37: a partial lane block; [2, 64, 300]: above the threads threshold.
    for dims in [[B, S, 37], [B, S, 64], [2, 64, 300]] {
        let [b, s, v] = dims;
        let rows = b * s;
        let (zv, ids, c_lp, c_h) = logits_case(151 + v as u64, dims);
        for t in [1.0, 0.7] {
            let temp = Temperature::new(t).unwrap();
            let targets = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [b, s]), &dev);
            let (want_lp, want_h, want_g) =
                core_logits_reference(&zv, rows, v, t, &ids, &c_lp, &c_h);
            let what = format!("{dims:?} T={t}");
            let cl = tensor2(&c_lp, [b, s], &dev).unwrap();
            let ch = tensor2(&c_h, [b, s], &dev).unwrap();

            // One op, both outputs, both cotangents.
            let z = tensor3(&zv, dims, &dev).unwrap().require_grad();
            let (lp, h) = fused::log_probs_and_entropy(z.clone(), targets.clone(), temp).unwrap();
            close(&format!("{what} log p"), &to_vec(lp.clone()), &want_lp);
            close(&format!("{what} H"), &to_vec(h.clone()), &want_h);
            let g = ((lp * cl.clone()).sum() + (h * ch.clone()).sum()).backward();
            close(
                &format!("{what} grad"),
                &to_vec(z.grad(&g).unwrap()),
                &want_g,
            );

            // Only the log-probs of the combined op used.
            let z = tensor3(&zv, dims, &dev).unwrap().require_grad();
            let (lp, _) = fused::log_probs_and_entropy(z.clone(), targets.clone(), temp).unwrap();
            let g = (lp * cl.clone()).sum().backward();
            let zero = vec![0.0; rows];
            let (_, _, want_g_lp) = core_logits_reference(&zv, rows, v, t, &ids, &c_lp, &zero);
            close(
                &format!("{what} grad of log p only"),
                &to_vec(z.grad(&g).unwrap()),
                &want_g_lp,
            );

            // The single-output ops.
            let z = tensor3(&zv, dims, &dev).unwrap().require_grad();
            let lp = fused::selective_log_softmax(z.clone(), targets.clone(), temp).unwrap();
            close(&format!("{what} selective"), &to_vec(lp.clone()), &want_lp);
            let g = (lp * cl.clone()).sum().backward();
            close(
                &format!("{what} selective grad"),
                &to_vec(z.grad(&g).unwrap()),
                &want_g_lp,
            );
        }
        let z = tensor3(&zv, dims, &dev).unwrap().require_grad();
        let h = fused::entropy(z.clone()).unwrap();
        let (_, want_h, want_g) =
            core_logits_reference(&zv, rows, v, 1.0, &vec![0; rows], &vec![0.0; rows], &c_h);
        close(&format!("{dims:?} entropy"), &to_vec(h.clone()), &want_h);
        let g = (h * tensor2(&c_h, [b, s], &dev).unwrap()).sum().backward();
        close(
            &format!("{dims:?} entropy grad"),
            &to_vec(z.grad(&g).unwrap()),
            &want_g,
        );
    }
}

#[test]
fn log_probs_and_entropy_without_autodiff_and_in_a_larger_graph() {
    let dims = [B, S, 23];
    let [b, s, v] = dims;
    let (zv, ids, c_lp, c_h) = logits_case(161, dims);
    let temp = Temperature::new(0.8).unwrap();
    let (want_lp, want_h, _) = core_logits_reference(&zv, b * s, v, 0.8, &ids, &c_lp, &c_h);
    // Plain device: the values.
    let dev = device().unwrap();
    let targets = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [b, s]), &dev);
    let z = tensor3(&zv, dims, &dev).unwrap();
    let (lp, h) = fused::log_probs_and_entropy(z, targets, temp).unwrap();
    close("plain log p", &to_vec(lp), &want_lp);
    close("plain H", &to_vec(h), &want_h);
    // Logits from an upstream op (x·2), the outputs used twice: the node's
    // backward feeds its parent with the summed cotangents.
    let dev = ad();
    let targets = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [b, s]), &dev);
    // Finite logits: burn's autodiff of the plain graph gives NaN at −inf.
    let half: Vec<f64> = zv.iter().map(|a| a.max(-30.0) / 2.0).collect();
    let run = |fused_path: bool| {
        let x = tensor3(&half, dims, &dev).unwrap().require_grad();
        let z = x.clone().mul_scalar(2.0);
        let (lp, h) = if fused_path {
            fused::log_probs_and_entropy(z, targets.clone(), temp).unwrap()
        } else {
            let (lp, _) = selective_log_softmax(z.clone(), targets.clone(), temp, None).unwrap();
            let (h, _) = entropy_from_logits(z.div_scalar(0.8), None).unwrap();
            (lp, h)
        };
        let l = lp.clone().sum() + (lp * h.clone()).mean() - h.sum().mul_scalar(0.1);
        let g = l.backward();
        to_vec(x.grad(&g).unwrap())
    };
    close("chained grad", &run(true), &run(false));
}

#[test]
fn strided_inputs_are_read_in_logical_order() {
    // A transposed log π and narrowed logits (views, not contiguous
    // buffers): the same numbers as from contiguous tensors.
    let dev = ad();
    let x = policy_inputs(171);
    let loss =
        PolicyLoss::from_verl(PolicyLossMode::Vanilla, &VerlPolicyParams::default()).unwrap();
    let k3 = KlConfig::parse_verl("low_var_kl").unwrap();
    let (want_v, want_g, _) = fused_policy(&loss, AggMode::TokenMean, Some((k3, 0.2)), &x, &dev);
    let t: Vec<f64> = (0..B * S).map(|i| x.lp[(i % B) * S + i / B]).collect();
    let lp_t = tensor2(&t, [S, B], &dev).unwrap().require_grad();
    let lp = lp_t.clone().swap_dims(0, 1);
    let out = fused::policy_loss_with_kl(
        &loss,
        AggMode::TokenMean,
        &GlobalNorm::default(),
        lp,
        tensor2(&x.old, [B, S], &dev).unwrap(),
        tensor2(&x.adv, [B, S], &dev).unwrap(),
        &mask(&dev),
        None,
        Some(fused::KlPenalty {
            config: k3,
            coef: 0.2,
            ref_log_prob: tensor2(&x.rf, [B, S], &dev).unwrap(),
        }),
    )
    .unwrap();
    close("strided value", &to_vec(out.loss.clone()), &want_v);
    let g = out.loss.backward();
    let g = to_vec(lp_t.grad(&g).unwrap().swap_dims(0, 1));
    close("strided grad", &g, &want_g);

    let dims = [B, S, 19];
    let (zv, ids, c_lp, c_h) = logits_case(172, dims);
    let (want_lp, want_h, want_z) = core_logits_reference(&zv, B * S, 19, 1.0, &ids, &c_lp, &c_h);
    // The logits as columns 1..20 of a wider tensor.
    let wide: Vec<f64> = zv
        .chunks(19)
        .flat_map(|r| std::iter::once(0.5).chain(r.iter().copied()))
        .collect();
    let zw = tensor3(&wide, [B, S, 20], &dev).unwrap().require_grad();
    let z = zw.clone().narrow(2, 1, 19);
    let targets = Tensor::<2, Int>::from_data(TensorData::new(ids, [B, S]), &dev);
    let (lp, h) = fused::log_probs_and_entropy(z, targets, Temperature::ONE).unwrap();
    close("strided log p", &to_vec(lp.clone()), &want_lp);
    close("strided H", &to_vec(h.clone()), &want_h);
    let cl = tensor2(&c_lp, [B, S], &dev).unwrap();
    let ch = tensor2(&c_h, [B, S], &dev).unwrap();
    let g = ((lp * cl).sum() + (h * ch).sum()).backward();
    let gw = to_vec(zw.grad(&g).unwrap());
    let got: Vec<f64> = gw.chunks(20).flat_map(|r| r[1..].to_vec()).collect();
    close("strided logits grad", &got, &want_z);
    assert!(gw.chunks(20).all(|r| r[0] == 0.0));
}
