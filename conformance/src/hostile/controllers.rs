//! Hostile inputs for the `controllers` family (fuzz target
//! `fuzz/fuzz_targets/controllers.rs`): the running-state coefficients —
//! the KL controller ([`KlController`], fixed and adaptive) and GRPO's
//! adaptive entropy coefficient ([`EntropyBonus`]) — driven through long
//! sequences of hostile updates.

use super::{decode, float};
use arbitrary::{Result as ArbResult, Unstructured};
use posttrain_core::kl::KlController;
use posttrain_core::policy::grpo::{AdaptiveEntropy, EntropyBonus};
use posttrain_core::Error;

/// Decodes `data` into calls of this family's ops and checks the contract
/// of the [module docs](super).
pub fn run(data: &[u8]) {
    let _ = decode(data, |u| {
        if u.arbitrary()? {
            kl_controller(u)
        } else {
            entropy(u)
        }
    });
}

fn param(u: &mut Unstructured) -> ArbResult<f64> {
    float(u, 2.0, true)
}

fn kl_controller(u: &mut Unstructured) -> ArbResult<()> {
    let adaptive: bool = u.arbitrary()?;
    let (coef, target, horizon) = (param(u)?, param(u)?, float(u, 1e4, true)?);
    let ctl = if adaptive {
        KlController::adaptive(coef, target, horizon)
    } else {
        KlController::fixed(coef)
    };
    let valid = coef.is_finite()
        && (!adaptive
            || target.is_finite() && target > 0.0 && horizon.is_finite() && horizon > 0.0);
    let mut ctl = match ctl {
        Ok(c) => {
            assert!(valid, "invalid controller parameters accepted: {c:?}");
            c
        }
        Err(e) => {
            assert!(!valid && matches!(e, Error::OutOfRange { .. }), "{e:?}");
            return Ok(());
        }
    };
    while !u.is_empty() {
        let kl = float(u, 1.0, true)?;
        let n: u64 = match u.int_in_range(0..=3u8)? {
            0 => u.arbitrary()?,
            _ => u.int_in_range(0..=4096)?,
        };
        let before = ctl.value();
        match ctl.update(kl, n) {
            Ok(()) => {
                let after = ctl.value();
                assert!(after.is_finite(), "coef {before:e} → {after:e}");
                if let KlController::Adaptive {
                    target, horizon, ..
                } = ctl
                {
                    // |β' − β| ≤ 0.2 · n / horizon · |β|; direction follows the KL.
                    let step = 0.2 * n as f64 / horizon * before.abs();
                    assert!(
                        after == before
                            || (after - before).abs()
                                <= step * (1.0 + 1e-12) + 4.0 * f64::EPSILON * before.abs() + 1e-300,
                        "controller step too large: {before:e} → {after:e} (kl {kl:e}, n {n}, {ctl:?})"
                    );
                    let _ = target;
                } else {
                    assert_eq!(after.to_bits(), before.to_bits(), "fixed controller moved");
                }
            }
            Err(e) => {
                assert!(
                    matches!(e, Error::NonFinite { .. } | Error::OutOfRange { .. }),
                    "{e:?}"
                );
                assert_eq!(
                    ctl.value().to_bits(),
                    before.to_bits(),
                    "β changed on error"
                );
            }
        }
    }
    Ok(())
}

fn entropy(u: &mut Unstructured) -> ArbResult<()> {
    let coef = param(u)?;
    let adaptive = if u.arbitrary()? {
        let lo = param(u)?;
        Some(AdaptiveEntropy {
            target: param(u)?,
            coef_min: lo,
            coef_max: if u.arbitrary()? {
                lo + param(u)?.abs()
            } else {
                param(u)?
            },
            coef_delta: float(u, 0.1, true)?,
            last_world_entropy: float(u, 5.0, true)?,
        })
    } else {
        None
    };
    let mut bonus = EntropyBonus { coef, adaptive };
    let valid = coef.is_finite()
        && adaptive.is_none_or(|a| {
            a.target.is_finite()
                && a.coef_min.is_finite()
                && a.coef_max.is_finite()
                && a.coef_max >= a.coef_min
                && a.coef_delta.is_finite()
                && a.coef_delta >= 0.0
                && !a.last_world_entropy.is_nan()
        });
    match bonus.validate() {
        Ok(()) => assert!(valid, "invalid entropy bonus accepted: {bonus:?}"),
        Err(e) => {
            assert!(!valid && matches!(e, Error::OutOfRange { .. }), "{e:?}");
            return Ok(());
        }
    }
    let mut steps = 0;
    while !u.is_empty() && steps < 256 {
        steps += 1;
        let h = float(u, 5.0, true)?;
        let train: bool = u.arbitrary()?;
        let applied = bonus.applied_coef();
        assert!(applied.is_finite());
        let next = bonus.updated_coef(h, train);
        assert!(next.is_finite(), "entropy coef {} → {next:e}", bonus.coef);
        if let (Some(a), true) = (bonus.adaptive, train) {
            // A step up never passes the ceiling, a step down never the floor
            // (from where the coefficient was).
            if next > bonus.coef {
                assert!(next <= a.coef_max, "entropy coef above its ceiling");
            }
            if next < bonus.coef {
                assert!(next >= a.coef_min, "entropy coef below its floor");
            }
            let mut a = a;
            if !h.is_nan() {
                a.last_world_entropy = h;
            }
            bonus.adaptive = Some(a);
        } else {
            assert_eq!(next.to_bits(), bonus.coef.to_bits());
        }
        bonus.coef = next;
    }
    Ok(())
}
