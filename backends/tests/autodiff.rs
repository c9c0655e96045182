//! With the `autodiff` feature: burn's autodiff of each op's *value* agrees
//! with the closed-form gradient the op returns (the core's VJP).
#![cfg(feature = "autodiff")]

use burn::tensor::{Bool, Device, Tensor};
use posttrain_burn::kl::kl_loss;
use posttrain_burn::logits::{entropy_from_logits, selective_log_softmax};
use posttrain_burn::policy::policy_loss;
use posttrain_burn::preference::{paired_loss, PairTensors};
use posttrain_burn::{device, mask2, tensor1, tensor2, tensor3, to_vec};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::kl::KlConfig;
use posttrain_core::logits::Temperature;
use posttrain_core::policy::token::{PolicyLoss, PolicyLossMode, VerlPolicyParams};
use posttrain_core::preference::paired::{FDivergence, LossTerm, PairedConfig, PairedLoss};

fn ad() -> Device {
    device().unwrap().autodiff()
}

/// Deterministic pseudo-random values in `[lo, hi)`.
fn vals(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let u = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
            lo + (hi - lo) * u
        })
        .collect()
}

#[track_caller]
fn close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{what}[{i}]: autodiff {g}, closed form {w}"
        );
    }
}

const B: usize = 3;
const S: usize = 5;

fn mask(dev: &Device) -> Tensor<2, Bool> {
    let m: Vec<bool> = (0..B * S).map(|i| i % 4 != 3 && i < 2 * S).collect();
    mask2(&m, [B, S], dev).unwrap()
}

#[test]
fn kl_loss_autodiff_agrees() {
    let dev = ad();
    for name in ["kl", "abs", "mse", "low_var_kl", "low_var_kl+"] {
        let cfg = KlConfig::parse_verl(name).unwrap();
        for mode in AggMode::ALL {
            let lp = tensor2(&vals(1, B * S, -3.0, 0.0), [B, S], &dev)
                .unwrap()
                .require_grad();
            let rf = tensor2(&vals(2, B * S, -3.0, 0.0), [B, S], &dev).unwrap();
            let out = kl_loss(
                &cfg,
                mode,
                &GlobalNorm::default(),
                lp.clone(),
                rf,
                &mask(&dev),
            )
            .unwrap();
            if cfg.straight_through {
                continue; // the value's gradient is not the estimator's by design
            }
            let grads = out.value.backward();
            let g = lp.grad(&grads).unwrap();
            close(
                &format!("{name} {mode:?}"),
                &to_vec(g),
                &to_vec(out.grad.inner()),
            );
        }
    }
}

#[test]
fn policy_loss_autodiff_agrees() {
    let dev = ad();
    let p = VerlPolicyParams {
        dro_beta: Some(0.3),
        clip_ratio_high: Some(0.28),
        ..VerlPolicyParams::default()
    };
    // (DPPO and CISPO detach part of the value: sg(·) — autodiff of the value differs by design.)
    for mode in [
        PolicyLossMode::Vanilla,
        PolicyLossMode::Sapo,
        PolicyLossMode::Gpg,
        PolicyLossMode::Dro,
    ] {
        let loss = PolicyLoss::from_verl(mode, &p).unwrap();
        for agg in AggMode::ALL {
            let lpv = vals(3, B * S, -3.0, -0.1);
            let oldv: Vec<f64> = lpv
                .iter()
                .zip(vals(4, B * S, -0.5, 0.5))
                .map(|(a, b)| a + b)
                .collect();
            let lp = tensor2(&lpv, [B, S], &dev).unwrap().require_grad();
            let old = tensor2(&oldv, [B, S], &dev).unwrap();
            let adv = tensor2(&vals(5, B * S, -2.0, 2.0), [B, S], &dev).unwrap();
            let out = policy_loss(
                &loss,
                agg,
                &GlobalNorm::default(),
                lp.clone(),
                old,
                adv,
                &mask(&dev),
                None,
            )
            .unwrap();
            let grads = out.loss.backward();
            let g = lp.grad(&grads).unwrap();
            close(
                &format!("{mode:?} {agg:?}"),
                &to_vec(g),
                &to_vec(out.grad.inner()),
            );
        }
    }
}

#[test]
fn logits_autodiff_agrees() {
    let dev = ad();
    let v = 7;
    let z = tensor3(&vals(6, B * S * v, -5.0, 5.0), [B, S, v], &dev)
        .unwrap()
        .require_grad();
    let cot = tensor2(&vals(7, B * S, -1.0, 1.0), [B, S], &dev).unwrap();
    let ids: Vec<i64> = (0..B * S).map(|i| (i * 3 % v) as i64).collect();
    let t =
        Tensor::<2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(ids, [B, S]), &dev);
    for temp in [1.0, 0.7] {
        let (lp, g) = selective_log_softmax(
            z.clone(),
            t.clone(),
            Temperature::new(temp).unwrap(),
            Some(cot.clone()),
        )
        .unwrap();
        let grads = (lp * cot.clone()).sum().backward();
        close(
            "log p",
            &to_vec(z.grad(&grads).unwrap()),
            &to_vec(g.unwrap().inner()),
        );
    }
    let (h, g) = entropy_from_logits(z.clone(), Some(cot.clone())).unwrap();
    let grads = (h * cot).sum().backward();
    close(
        "entropy",
        &to_vec(z.grad(&grads).unwrap()),
        &to_vec(g.unwrap().inner()),
    );
}

#[test]
fn paired_loss_autodiff_agrees() {
    let dev = ad();
    let n = 6;
    for kind in [
        PairedLoss::Sigmoid,
        PairedLoss::Ipo,
        PairedLoss::Robust,
        PairedLoss::Discopop,
        PairedLoss::ApoDown,
    ] {
        for div in [FDivergence::ReverseKl, FDivergence::JsDivergence] {
            let cfg = PairedConfig::new(0.3, 0.1, true, 0.0, div, 0.05).unwrap();
            let c = tensor1(&vals(8, n, -30.0, -5.0), &dev).require_grad();
            let r = tensor1(&vals(9, n, -30.0, -5.0), &dev).require_grad();
            let batch = PairTensors::new(c.clone(), r.clone()).with_reference(
                tensor1(&vals(10, n, -30.0, -5.0), &dev),
                tensor1(&vals(11, n, -30.0, -5.0), &dev),
            );
            let out = paired_loss(&cfg, &[LossTerm::new(kind)], batch).unwrap();
            let grads = out.loss.backward();
            close(
                &format!("{kind:?} c"),
                &to_vec(c.grad(&grads).unwrap()),
                &to_vec(out.grad_chosen.inner()),
            );
            close(
                &format!("{kind:?} r"),
                &to_vec(r.grad(&grads).unwrap()),
                &to_vec(out.grad_rejected.inner()),
            );
        }
    }
}
