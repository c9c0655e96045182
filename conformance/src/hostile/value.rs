//! Hostile inputs for the `value` family (fuzz target `fuzz/fuzz_targets/value.rs`):
//! the clipped value loss (every preset, OpenRLHF's token/sample modes, every
//! aggregation mode and global normalizer) and torchtune's joint
//! policy + value PPO loss.

use super::aggregate::{cast, expect_err, finite_only, global_norm, tame, wide};
use super::{assert_finite, assert_same_bits, check_gradient, decode, fill_masked};
use super::{dims, float, floats, log_probs, mask, maybe_wrong_len};
use arbitrary::{Result as ArbResult, Unstructured};
use posttrain_core::aggregate::AggMode;
use posttrain_core::value::{
    policy_value_loss, value_loss, PolicyValueConfig, PolicyValueGrads, ValueLossConfig,
};
use posttrain_core::{Dims, Error, Preset, Real};

const PRESETS: [Preset; 4] = [
    Preset::Trl,
    Preset::Verl,
    Preset::OpenRlhf,
    Preset::Torchtune,
];

/// Decodes `data` into calls of this family's ops and checks the contract
/// of the [module docs](super).
pub fn run(data: &[u8]) {
    let _ = decode(data, |u| {
        if u.arbitrary()? {
            clipped_value(u)
        } else {
            policy_value(u)
        }
    });
}

fn clip_range(u: &mut Unstructured) -> ArbResult<Option<f64>> {
    Ok(if u.int_in_range(0..=3u8)? == 0 {
        None
    } else {
        Some(
            float(u, 1.0, true)?.abs()
                * if u.int_in_range(0..=7u8)? == 0 {
                    -1.0
                } else {
                    1.0
                },
        )
    })
}

fn value_config(u: &mut Unstructured) -> ArbResult<Result<ValueLossConfig, Error>> {
    Ok(match u.int_in_range(0..=2u8)? {
        0 => Ok(ValueLossConfig::preset(*u.choose(&PRESETS)?)),
        1 => {
            let c = clip_range(u)?;
            let (norm, _) = global_norm(u)?;
            ValueLossConfig::new(c, *u.choose(&AggMode::ALL)?).map(|c| c.with_norm(norm))
        }
        _ => {
            let c = clip_range(u)?;
            let (norm, _) = global_norm(u)?;
            ValueLossConfig::openrlhf(
                c,
                u.arbitrary()?,
                norm.dp_size,
                norm.batch_num_tokens,
                norm.global_batch_size,
            )
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn value_call<F: Real>(
    cfg: &ValueLossConfig,
    d: Dims,
    v: &[f64],
    old: &[f64],
    ret: &[f64],
    m: &[bool],
) -> Result<Vec<f64>, Error> {
    let (v, old, ret) = (cast::<F>(v), cast::<F>(old), cast::<F>(ret));
    let mut per = vec![F::zero(); d.len()];
    let mut g = vec![F::zero(); d.len()];
    let o = value_loss(cfg, d, &v, &old, &ret, m, &mut per, Some(&mut g))?;
    let mut per2 = vec![F::zero(); d.len()];
    let o2 = value_loss(cfg, d, &v, &old, &ret, m, &mut per2, None)?;
    let (a, b) = (o.loss.to_f64(), o2.loss.to_f64());
    assert!(
        a == b || (a - b).abs() <= 1e-5 * (1.0 + a.abs()) || a.is_nan() && b.is_nan(),
        "value loss with/without gradient: {a:e} vs {b:e}"
    );
    let mut out = vec![a, o.clipfrac.to_f64()];
    out.extend(wide(&per));
    out.extend(wide(&g));
    Ok(out)
}

fn clipped_value(u: &mut Unstructured) -> ArbResult<()> {
    let cfg = value_config(u)?;
    let d = dims(u)?;
    let n = d.len();
    let (nr, bad) = maybe_wrong_len(u, n)?;
    let v = floats(u, n, 10.0, false)?;
    let old = floats(u, n, 10.0, false)?;
    let ret = floats(u, nr, 10.0, false)?;
    let m = mask(u, n)?;
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            assert!(matches!(e, Error::OutOfRange { .. }), "{e:?}");
            return Ok(());
        }
    };
    let call = |v: &[f64], o: &[f64], r: &[f64]| value_call::<f64>(&cfg, d, v, o, r, &m);
    let norm_ok = {
        let n = cfg.norm;
        let ok = |v: f64| v.is_finite() && v > 0.0;
        ok(n.dp_size)
            && [n.batch_num_tokens, n.global_batch_size, n.loss_scale_factor]
                .iter()
                .all(|v| v.is_none_or(ok))
    };
    if bad || !norm_ok {
        expect_err("value loss malformed", call(&v, &old, &ret), |e| {
            bad && matches!(e, Error::ShapeMismatch { .. })
                || !norm_ok && matches!(e, Error::OutOfRange { .. })
        });
        return Ok(());
    }
    let _ = call(&v, &old, &ret);
    let _ = value_call::<f32>(&cfg, d, &v, &old, &ret, &m);
    let (v, old, ret) = (finite_only(&v), finite_only(&old), finite_only(&ret));
    let a = call(&v, &old, &ret).unwrap();
    assert_finite("value loss", &a);
    if !m.iter().any(|&b| b) {
        assert!(
            a.iter().all(|&x| x == 0.0),
            "all-masked value loss not 0: {a:?}"
        );
    }
    let t = |x: &[f64]| tame(x, 1e4);
    assert_finite(
        "value loss f32",
        &value_call::<f32>(&cfg, d, &t(&v), &t(&old), &t(&ret), &m).unwrap(),
    );
    let z = |x: &[f64]| fill_masked(x, &m, false);
    let p = |x: &[f64]| fill_masked(x, &m, true);
    assert_same_bits(
        "value loss masked",
        &call(&z(&v), &z(&old), &z(&ret)).unwrap(),
        &call(&p(&v), &p(&old), &p(&ret)).unwrap(),
    );
    let s = |x: &[f64]| tame(x, 100.0);
    let (v, old, ret) = (s(&v), s(&old), s(&ret));
    let g = call(&v, &old, &ret).unwrap();
    let value = |x: &[f64]| call(x, &old, &ret).ok().map(|o| o[0]);
    check_gradient(
        "value loss",
        &value,
        &v,
        &g[2 + n..],
        &[0, n / 2, n.saturating_sub(1)],
    );
    Ok(())
}

struct Pv {
    lp: Vec<f64>,
    old_lp: Vec<f64>,
    adv: Vec<f64>,
    old_v: Vec<f64>,
    v: Vec<f64>,
    ret: Vec<f64>,
}

impl Pv {
    fn map(&self, f: impl Fn(&[f64]) -> Vec<f64>) -> Pv {
        Pv {
            lp: f(&self.lp),
            old_lp: f(&self.old_lp),
            adv: f(&self.adv),
            old_v: f(&self.old_v),
            v: f(&self.v),
            ret: f(&self.ret),
        }
    }
}

fn pv_call<F: Real>(
    cfg: &PolicyValueConfig,
    d: Dims,
    x: &Pv,
    pm: Option<&[bool]>,
    vm: Option<&[bool]>,
) -> Result<Vec<f64>, Error> {
    let n = d.len();
    let mut gl = vec![F::zero(); n];
    let mut gv = vec![F::zero(); n];
    let o = policy_value_loss(
        cfg,
        d,
        &cast::<F>(&x.old_lp),
        &cast::<F>(&x.lp),
        &cast::<F>(&x.adv),
        &cast::<F>(&x.old_v),
        &cast::<F>(&x.v),
        &cast::<F>(&x.ret),
        pm,
        vm,
        Some(PolicyValueGrads {
            log_prob: &mut gl,
            value: &mut gv,
        }),
    )?;
    // [loss, policy, value, clipfrac, ratio_mean, approx_kl, grads…]
    let mut out: Vec<f64> = [
        o.loss,
        o.policy_loss,
        o.value_loss,
        o.clipfrac,
        o.ratio_mean,
        o.approx_kl,
    ]
    .iter()
    .map(|v| v.to_f64())
    .collect();
    out.extend(wide(&gl));
    out.extend(wide(&gv));
    Ok(out)
}

fn policy_value(u: &mut Unstructured) -> ArbResult<()> {
    let cfg = if u.arbitrary()? {
        Ok(PolicyValueConfig::preset(Preset::Torchtune))
    } else {
        PolicyValueConfig::new(
            float(u, 0.5, true)?,
            float(u, 0.5, true)?,
            float(u, 1.0, true)?,
        )
    };
    let d = dims(u)?;
    let n = d.len();
    let (nv, bad) = maybe_wrong_len(u, n)?;
    let x = Pv {
        lp: log_probs(u, n)?,
        old_lp: log_probs(u, n)?,
        adv: floats(u, n, 5.0, false)?,
        old_v: floats(u, n, 5.0, false)?,
        v: floats(u, nv, 5.0, false)?,
        ret: floats(u, n, 5.0, false)?,
    };
    let raw_lp = floats(u, n, 30.0, false)?;
    let pm = mask(u, n)?;
    let vm = mask(u, n)?;
    let pm = u.arbitrary::<bool>()?.then_some(&pm[..]);
    let vm = u.arbitrary::<bool>()?.then_some(&vm[..]);
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            assert!(matches!(e, Error::OutOfRange { .. }), "{e:?}");
            return Ok(());
        }
    };
    let call = |x: &Pv| pv_call::<f64>(&cfg, d, x, pm, vm);
    if bad {
        expect_err("ppo loss length", call(&x), |e| {
            matches!(e, Error::ShapeMismatch { .. } | Error::Empty { .. })
        });
        return Ok(());
    }
    if n == 0 {
        expect_err("ppo loss empty", call(&x), |e| {
            matches!(e, Error::Empty { .. })
        });
        return Ok(());
    }
    // Hostile raw values (log-probs included): no panic.
    let mut hostile = x.map(|v| v.to_vec());
    hostile.lp = raw_lp;
    let _ = call(&hostile);
    let _ = pv_call::<f32>(&cfg, d, &hostile, pm, vm);
    let x = x.map(finite_only);
    let a = call(&x).unwrap();
    assert_finite("ppo loss", &a);
    let x32 = x.map(|v| tame(v, 1e2));
    assert_finite(
        "ppo loss f32",
        &pv_call::<f32>(&cfg, d, &x32, pm, vm).unwrap(),
    );
    // Masked invariance: ratio_mean and approx_kl average every position by
    // peer design (torchtune `ratios.mean()`, the recipe's approx KL), so
    // they are left out; the losses and both gradients must not move. Log-
    // probs and advantages are poisoned where the policy mask is off, values
    // and returns where the value mask is off.
    let poison = |x: &Pv, p: bool| Pv {
        lp: pm.map_or(x.lp.clone(), |m| fill_masked(&x.lp, m, p)),
        old_lp: x.old_lp.clone(),
        adv: pm.map_or(x.adv.clone(), |m| fill_masked(&x.adv, m, p)),
        old_v: vm.map_or(x.old_v.clone(), |m| fill_masked(&x.old_v, m, p)),
        v: vm.map_or(x.v.clone(), |m| fill_masked(&x.v, m, p)),
        ret: vm.map_or(x.ret.clone(), |m| fill_masked(&x.ret, m, p)),
    };
    let pick = |v: Vec<f64>| -> Vec<f64> { v[..4].iter().chain(&v[6..]).copied().collect() };
    let (za, pa) = (
        call(&poison(&x, false)).unwrap(),
        call(&poison(&x, true)).unwrap(),
    );
    assert_same_bits("ppo loss masked", &pick(za), &pick(pa));
    // Gradients vs finite differences.
    let x = x.map(|v| tame(v, 5.0));
    let g = call(&x).unwrap();
    let ks = [0, n / 2, n - 1];
    let f_lp = |y: &[f64]| {
        let mut z = x.map(|v| v.to_vec());
        z.lp = y.to_vec();
        call(&z).ok().map(|o| o[1]) // the policy part (the value part may swamp it)
    };
    check_gradient("ppo loss ∂log π", &f_lp, &x.lp, &g[6..6 + n], &ks);
    let f_v = |y: &[f64]| {
        let mut z = x.map(|v| v.to_vec());
        z.v = y.to_vec();
        call(&z).ok().map(|o| o[2] * cfg.value_coeff)
    };
    check_gradient("ppo loss ∂V", &f_v, &x.v, &g[6 + n..], &ks);
    Ok(())
}
