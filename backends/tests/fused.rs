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
