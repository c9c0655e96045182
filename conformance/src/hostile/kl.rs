//! Hostile inputs for the `kl` family (fuzz target `fuzz/fuzz_targets/kl.rs`):
//! the per-token KL estimators (every estimator, straight-through, every
//! preset, custom clamps), KL-in-reward (`kl_penalized_rewards`) and the
//! score-at-EOS reward (`rewards_with_score_at_eos`, every score position).

use super::aggregate::{cast, expect_err, finite_only, tame, wide};
use super::{assert_finite, assert_same_bits, check_gradient, decode, fill_masked};
use super::{dims, float, floats, mask, maybe_wrong_len};
use arbitrary::{Result as ArbResult, Unstructured};
use posttrain_core::kl::{
    kl_penalized_rewards, rewards_with_score_at_eos, KlConfig, KlEstimator, ScorePosition,
};
use posttrain_core::{Dims, Error, Preset, Real};

const ESTIMATORS: [KlEstimator; 4] = [
    KlEstimator::K1,
    KlEstimator::Abs,
    KlEstimator::K2,
    KlEstimator::K3,
];
const PRESETS: [Preset; 4] = [
    Preset::Trl,
    Preset::Verl,
    Preset::OpenRlhf,
    Preset::Torchtune,
];
const VERL_NAMES: [&str; 11] = [
    "kl",
    "k1",
    "abs",
    "mse",
    "k2",
    "low_var_kl",
    "k3",
    "k3+",
    "abs+",
    "full",
    "k4",
];

/// Decodes `data` into calls of this family's ops and checks the contract
/// of the [module docs](super).
pub fn run(data: &[u8]) {
    let _ = decode(data, |u| match u.int_in_range(0..=2u8)? {
        0 => estimators(u),
        1 => penalized_rewards(u),
        _ => score_at_eos(u),
    });
}

/// A KL config: a preset, a verl name, or explicit (possibly invalid) clamps.
/// Returns the config and whether it is invalid (`Some(expected error)`).
fn config(u: &mut Unstructured) -> ArbResult<Result<KlConfig, Error>> {
    Ok(match u.int_in_range(0..=2u8)? {
        0 => {
            let est = *u.choose(&ESTIMATORS)?;
            let mut c = KlConfig::preset(est, *u.choose(&PRESETS)?);
            c.straight_through = u.arbitrary()?;
            Ok(c)
        }
        1 => KlConfig::parse_verl(u.choose(&VERL_NAMES)?),
        _ => {
            let mut c = KlConfig::new(*u.choose(&ESTIMATORS)?);
            c.straight_through = u.arbitrary()?;
            if u.arbitrary()? {
                c.log_ratio_clamp = Some(float(u, 30.0, true)?);
            }
            if u.arbitrary()? {
                c.value_clamp = Some(float(u, 30.0, true)?);
            }
            Ok(c)
        }
    })
}

fn valid_clamp(c: Option<f64>) -> bool {
    c.is_none_or(|c| c.is_finite() && c > 0.0)
}

fn estimate<F: Real>(
    cfg: &KlConfig,
    lp: &[f64],
    rf: &[f64],
    cot: &[f64],
) -> Result<Vec<f64>, Error> {
    let (lp, rf, cot) = (cast::<F>(lp), cast::<F>(rf), cast::<F>(cot));
    let mut out = vec![F::zero(); lp.len()];
    let mut g = vec![F::zero(); cot.len()];
    cfg.estimate_slices(&lp, &rf, &mut out, Some((&cot, &mut g)))?;
    let mut v = wide(&out);
    v.extend(wide(&g));
    Ok(v)
}

fn estimators(u: &mut Unstructured) -> ArbResult<()> {
    let cfg = config(u)?;
    let n = u.int_in_range(0..=12usize)?;
    let (n_ref, bad) = maybe_wrong_len(u, n)?;
    let lp = floats(u, n, 30.0, false)?;
    let rf = floats(u, n_ref, 30.0, false)?;
    let cot = tame(&floats(u, n, 2.0, true)?, 2.0);
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            assert!(matches!(e, Error::UnknownOption { .. }), "{e:?}");
            return Ok(());
        }
    };
    let invalid = !(valid_clamp(cfg.log_ratio_clamp) && valid_clamp(cfg.value_clamp));
    if invalid {
        expect_err(
            "kl invalid clamp",
            estimate::<f64>(&cfg, &lp, &rf, &cot),
            |e| matches!(e, Error::OutOfRange { .. }),
        );
        return Ok(());
    }
    if bad {
        expect_err(
            "kl ref length",
            estimate::<f64>(&cfg, &lp, &rf, &cot),
            |e| matches!(e, Error::ShapeMismatch { .. }),
        );
        return Ok(());
    }
    // Raw hostile values: no panic.
    let _ = estimate::<f64>(&cfg, &lp, &rf, &cot);
    let _ = estimate::<f32>(&cfg, &lp, &rf, &cot);
    // Finite inputs → finite outputs.
    let (lp, rf) = (finite_only(&lp), finite_only(&rf));
    assert_finite("kl f64", &estimate::<f64>(&cfg, &lp, &rf, &cot).unwrap());
    let (l32, r32) = (tame(&lp, 1e4), tame(&rf, 1e4));
    assert_finite("kl f32", &estimate::<f32>(&cfg, &l32, &r32, &cot).unwrap());
    // Closed form vs finite differences (not for straight-through, whose
    // gradient is by design not the value's derivative).
    // A clamp narrower than the probe (e.g. a subnormal one) is a kink the
    // finite difference cannot resolve: probe only with clamps ≥ 0.01.
    let wide_clamps = [cfg.log_ratio_clamp, cfg.value_clamp]
        .iter()
        .all(|c| c.is_none_or(|c| c >= 0.01));
    if !cfg.straight_through && wide_clamps {
        let (lp, rf) = (tame(&lp, 100.0), tame(&rf, 100.0));
        let g = estimate::<f64>(&cfg, &lp, &rf, &cot).unwrap();
        // Element-wise: probe each coordinate on its own term (a huge
        // neighbour would swamp the difference).
        for k in [0, 1, n / 2, n.saturating_sub(1)] {
            if k >= n {
                continue;
            }
            let value = |x: &[f64]| {
                let v = estimate::<f64>(&cfg, x, &rf, &cot).ok()?;
                Some(v[k] * cot[k])
            };
            check_gradient("kl estimate", &value, &lp, &g[n..], &[k]);
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn penalized<F: Real>(
    cfg: &KlConfig,
    beta: f64,
    d: Dims,
    scores: &[f64],
    old: &[f64],
    rf: &[f64],
    m: Option<&[bool]>,
) -> Result<Vec<f64>, Error> {
    let mut out = vec![F::zero(); d.len()];
    let s = kl_penalized_rewards(
        cfg,
        beta,
        d,
        &cast::<F>(scores),
        &cast::<F>(old),
        &cast::<F>(rf),
        m,
        &mut out,
    )?;
    let mut v = wide(&out);
    v.push(s.mean_kl.to_f64());
    Ok(v)
}

fn penalized_rewards(u: &mut Unstructured) -> ArbResult<()> {
    let cfg = config(u)?;
    let beta = float(u, 2.0, true)?;
    let d = dims(u)?;
    let n = d.len();
    let (n_old, bad) = maybe_wrong_len(u, n)?;
    let scores = floats(u, n, 10.0, false)?;
    let old = floats(u, n_old, 30.0, false)?;
    let rf = floats(u, n, 30.0, false)?;
    let use_mask: bool = u.arbitrary()?;
    let m = mask(u, n)?;
    let m = use_mask.then_some(&m[..]);
    let Ok(cfg) = cfg else { return Ok(()) };
    let invalid =
        !(valid_clamp(cfg.log_ratio_clamp) && valid_clamp(cfg.value_clamp) && beta.is_finite());
    let call = |s: &[f64], o: &[f64], r: &[f64]| penalized::<f64>(&cfg, beta, d, s, o, r, m);
    if invalid {
        expect_err("kl reward param", call(&scores, &old, &rf), |e| {
            matches!(e, Error::OutOfRange { .. })
        });
        return Ok(());
    }
    if bad {
        expect_err("kl reward length", call(&scores, &old, &rf), |e| {
            matches!(e, Error::ShapeMismatch { .. })
        });
        return Ok(());
    }
    let _ = call(&scores, &old, &rf);
    let _ = penalized::<f32>(&cfg, beta, d, &scores, &old, &rf, m);
    let (scores, old, rf) = (finite_only(&scores), finite_only(&old), finite_only(&rf));
    assert_finite("kl reward f64", &call(&scores, &old, &rf).unwrap());
    let (s32, o32, r32) = (tame(&scores, 1e4), tame(&old, 1e4), tame(&rf, 1e4));
    assert_finite(
        "kl reward f32",
        &penalized::<f32>(&cfg, beta.clamp(-10.0, 10.0), d, &s32, &o32, &r32, m).unwrap(),
    );
    // Masked log-probs holding NaN/±inf change nothing (the masked reward
    // position is the score itself, so the scores stay as they are).
    if let Some(m) = m {
        let a = call(
            &scores,
            &fill_masked(&old, m, false),
            &fill_masked(&rf, m, false),
        )
        .unwrap();
        let b = call(
            &scores,
            &fill_masked(&old, m, true),
            &fill_masked(&rf, m, true),
        )
        .unwrap();
        assert_same_bits("kl reward masked", &a, &b);
    }
    Ok(())
}

fn score_at_eos(u: &mut Unstructured) -> ArbResult<()> {
    let d = dims(u)?;
    let n = d.len();
    let beta = float(u, 2.0, true)?;
    let (n_scores, bad) = maybe_wrong_len(u, d.batch)?;
    let scores = floats(u, n_scores, 10.0, false)?;
    let kl = floats(u, n, 10.0, false)?;
    let m = mask(u, n)?;
    let idx: Vec<i64> = (0..d.batch)
        .map(|_| u.int_in_range(-1..=(d.seq as i64)))
        .collect::<ArbResult<_>>()?;
    let which = u.int_in_range(0..=2u8)?;
    let pos = match which {
        0 => ScorePosition::LastColumn,
        1 => ScorePosition::LastValid(&m),
        _ => ScorePosition::Explicit(&idx),
    };
    let call = |s: &[f64], k: &[f64]| -> Result<Vec<f64>, Error> {
        let mut out = vec![0.0; n];
        rewards_with_score_at_eos(d, s, pos, k, beta, &mut out)?;
        Ok(out)
    };
    let r = call(&scores, &kl);
    if bad || !beta.is_finite() {
        expect_err("eos malformed", r, |e| {
            bad && matches!(e, Error::ShapeMismatch { .. })
                || !beta.is_finite() && matches!(e, Error::OutOfRange { .. })
        });
        return Ok(());
    }
    let bad_idx = which == 2 && idx.iter().any(|&j| j < 0 || j as usize >= d.seq);
    let empty = d.seq == 0 && d.batch > 0;
    if bad_idx || empty {
        expect_err("eos index", r, |e| {
            matches!(e, Error::Invalid { .. } | Error::Empty { .. })
        });
        return Ok(());
    }
    let out = call(&finite_only(&scores), &finite_only(&kl)).unwrap();
    assert_finite("eos", &out);
    let mut out32 = vec![0f32; n];
    rewards_with_score_at_eos(
        d,
        &cast::<f32>(&tame(&scores, 1e4)),
        pos,
        &cast::<f32>(&tame(&kl, 1e4)),
        beta.clamp(-1e4, 1e4),
        &mut out32,
    )
    .unwrap();
    assert_finite("eos f32", &wide(&out32));
    Ok(())
}
