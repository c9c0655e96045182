//! Hostile inputs for the `advantage` family (fuzz target `fuzz/fuzz_targets/advantage.rs`):
//! every estimator of `core/src/advantage.rs`.
//!
//! Advantages are constants to the loss (no gradient), so the contract is:
//! no panic, typed errors for malformed input, finite outputs for finite
//! inputs, and padding (masked tokens) invisible bit for bit. Group ids mix
//! singleton groups, non-contiguous members and extreme ids.

use super::logits::{back, check, cv, is_range, is_shape, lp_or_special, param, Case, Probe};
use super::{decode, dims, floats, log_probs, mask, maybe_wrong_len};
use arbitrary::{Result as ArbResult, Unstructured};
use posttrain_core::advantage::{
    broadcast_to_tokens, discounted_returns, gae_advantages_returns, gdpo_advantages,
    gpg_advantages, group_mean_baseline_advantages, group_zscore_advantages,
    leave_one_out_advantages, leave_one_out_reward_advantages, length_weighted_baseline_advantages,
    multi_reward_group_advantages, optimal_token_baseline_advantages, outcome_scores,
    pass_at_k_advantages, reinforce_plus_plus_advantages, remax_advantages, GaeConfig,
    GroupNormConfig, MultiRewardConfig, OtbConfig, PassAtKConfig, RewardAggregation, RewardLog,
    RewardScaling, RlooConfig, SingletonGroup,
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
        let op: u8 = u.arbitrary()?;
        match op % 9 {
            0 => grouped(u),
            1 => pass_at_k(u),
            2 => gdpo(u),
            3 => gae(u),
            4 => returns(u),
            5 => otb(u),
            6 => multi_reward(u),
            7 => rloo_reward(u),
            _ => outcome(u),
        }
    });
}

/// Group ids: a few distinct values (singletons and non-contiguous members
/// arise naturally), sometimes the extreme `i64`s; sometimes a wrong length.
fn group_ids(u: &mut Unstructured, n: usize) -> ArbResult<(Vec<i64>, bool)> {
    let (len, bad) = maybe_wrong_len(u, n)?;
    let ids = (0..len)
        .map(|_| {
            let t: u8 = u.arbitrary()?;
            Ok(match t % 8 {
                6 => i64::MIN,
                7 => i64::MAX,
                k => k as i64 * 1000 - 2000,
            })
        })
        .collect::<ArbResult<Vec<_>>>()?;
    Ok((ids, bad))
}

fn scores(u: &mut Unstructured, n: usize, finite: bool) -> ArbResult<Vec<f64>> {
    floats(u, n, 3.0, finite)
}

fn probe(val: Vec<f64>) -> Probe {
    Probe {
        val,
        ..Probe::default()
    }
}

fn singleton(u: &mut Unstructured) -> ArbResult<SingletonGroup> {
    Ok([
        SingletonGroup::MeanZeroStdOne,
        SingletonGroup::RawScore,
        SingletonGroup::Zero,
    ][u.int_in_range(0..=2)?])
}

/// GRPO z-score (every preset / explicit config), group-mean baseline, GPG,
/// RLOO (leave one out) and OPO (length-weighted baseline).
fn grouped(u: &mut Unstructured) -> ArbResult<()> {
    let n: usize = u.int_in_range(0..=10)?;
    let finite: bool = u.arbitrary()?;
    let s = scores(u, n, finite)?;
    let (index, bad_idx) = group_ids(u, n)?;
    let which: u8 = u.int_in_range(0..=4)?;
    let mut malformed = bad_idx || n == 0;
    let mut expect: Option<fn(&Error) -> bool> = None;
    let mut x = s.clone();
    let (cfg, cfg_ok) = if u.arbitrary()? {
        (
            Some(GroupNormConfig::preset(PRESETS[u.int_in_range(0..=3)?])),
            true,
        )
    } else {
        let (eps, ok) = param(u, 0.0, 1e-3, |e| e >= 0.0 && e.is_finite())?;
        let scale: bool = u.arbitrary()?;
        let bessel: bool = u.arbitrary()?;
        let single = singleton(u)?;
        let cfg = GroupNormConfig::new(scale, eps, bessel, single);
        assert_eq!(cfg.is_ok(), ok, "GroupNormConfig::new({eps})");
        if let Err(e) = &cfg {
            assert!(is_range(e));
        }
        (cfg.ok(), ok)
    };
    let (f_norm, f_ok) = param(u, -4.0, 4.0, |f| f != 0.0 && f.is_finite())?;
    let single = singleton(u)?;
    let (nl, bad_len) = maybe_wrong_len(u, n)?;
    let lengths: Vec<f64> = floats(u, nl, 50.0, true)?.iter().map(|v| v.abs()).collect();
    match which {
        0 if !cfg_ok => return Ok(()),
        2 => malformed |= !f_ok,
        4 => {
            malformed |= bad_len;
            x.extend(&lengths);
        }
        _ => {}
    }
    if which == 2 && !f_ok {
        expect = Some(is_range);
    } else if n == 0 {
        expect = Some(|e| matches!(e, Error::Empty { .. } | Error::ShapeMismatch { .. }));
    } else if bad_idx || (which == 4 && bad_len) {
        expect = Some(is_shape);
    }
    let mut case = Case::new("group advantages", x);
    case.malformed = malformed;
    case.expect = expect;
    case.fd = false;
    fn eval<F: Real>(
        x: &[f64],
        n: usize,
        which: u8,
        cfg: Option<GroupNormConfig>,
        f_norm: f64,
        single: SingletonGroup,
        index: &[i64],
    ) -> Result<Probe, Error> {
        let s = cv::<F>(&x[..n]);
        let mut perm = vec![0usize; index.len()];
        let mut out = vec![F::zero(); n];
        match which {
            0 => group_zscore_advantages(&cfg.unwrap(), &s, index, &mut perm, &mut out)?,
            1 => group_mean_baseline_advantages(&s, index, &mut perm, &mut out)?,
            2 => gpg_advantages(&s, index, f_norm, &mut perm, &mut out)?,
            3 => leave_one_out_advantages(&s, index, single, &mut perm, &mut out)?,
            _ => {
                let l = cv::<F>(&x[n..]);
                length_weighted_baseline_advantages(&s, &l, index, &mut perm, &mut out)?
            }
        }
        Ok(probe(back(&out)))
    }
    // GPG divides by `f_norm`: a nonzero `|f_norm|` so small that the true
    // advantage exceeds the float range may give ±inf (documented on
    // `gpg_advantages`); probe finiteness with a representable quotient.
    if which == 2 && f_ok && f_norm.abs() < 1e-250 {
        return Ok(());
    }
    check(
        &case,
        &|x| eval::<f64>(x, n, which, cfg, f_norm, single, &index),
        Some(&|x| eval::<f32>(x, n, which, cfg, f_norm, single, &index)),
    );
    Ok(())
}

/// pass@k: groups of fewer than 2 are `EmptyGroup`.
fn pass_at_k(u: &mut Unstructured) -> ArbResult<()> {
    let n: usize = u.int_in_range(0..=10)?;
    let finite: bool = u.arbitrary()?;
    let s = scores(u, n, finite)?;
    let (index, bad_idx) = group_ids(u, n)?;
    let (eps, eps_ok) = param(u, 0.0, 1e-3, |e| e >= 0.0 && e.is_finite())?;
    if !eps_ok {
        return Ok(()); // the config is a plain struct: no validation to probe
    }
    let cfg = PassAtKConfig {
        scale_by_std: u.arbitrary()?,
        std_eps: eps,
    };
    let mut case = Case::new("pass_at_k_advantages", s);
    case.fd = false;
    case.malformed = bad_idx || n == 0;
    let mut counts = std::collections::BTreeMap::new();
    if !bad_idx {
        for &g in &index {
            *counts.entry(g).or_insert(0) += 1;
        }
    }
    let singleton = counts.values().any(|&c| c < 2);
    case.malformed |= singleton;
    fn eval<F: Real>(x: &[f64], cfg: &PassAtKConfig, index: &[i64]) -> Result<Probe, Error> {
        let s = cv::<F>(x);
        let mut perm = vec![0usize; index.len()];
        let mut out = vec![F::zero(); x.len()];
        pass_at_k_advantages(cfg, &s, index, &mut perm, &mut out)?;
        Ok(probe(back(&out)))
    }
    // With std scaling and eps = 0, a group of equal-but-distinct best
    // scores divides a 0 gap by a 0 std: allowed only through eps > 0.
    if cfg.scale_by_std && cfg.std_eps == 0.0 {
        return Ok(());
    }
    check(
        &case,
        &|x| eval::<f64>(x, &cfg, &index),
        Some(&|x| eval::<f32>(x, &cfg, &index)),
    );
    if !case.malformed {
        if let Err(e) = eval::<f64>(&case.x, &cfg, &index) {
            panic!("pass@k failed on a well-formed input: {e:?}");
        }
    }
    Ok(())
}

/// GDPO: several reward keys, weights, the token mask.
fn gdpo(u: &mut Unstructured) -> ArbResult<()> {
    let d = dims(u)?;
    let k: usize = u.int_in_range(0..=3)?;
    let finite: bool = u.arbitrary()?;
    let (nk, bad_k) = maybe_wrong_len(u, k * d.batch)?;
    let mut x = scores(u, nk, finite)?;
    // Moderate reward weights: `w · z` of ±1e30 then overflows the f32
    // variance inside the verl whitening (stats, reported separately).
    x.extend(super::logits::cotangents(u, k)?);
    let (index, bad_idx) = group_ids(u, d.batch)?;
    let m = mask(u, d.len())?;
    let cfg = GroupNormConfig::preset(PRESETS[u.int_in_range(0..=3)?]);
    let mut case = Case::new("gdpo_advantages", x);
    case.fd = false;
    case.malformed = bad_k || bad_idx || k == 0 || d.batch == 0;
    fn eval<F: Real>(
        x: &[f64],
        nk: usize,
        cfg: &GroupNormConfig,
        d: Dims,
        m: &[bool],
        index: &[i64],
    ) -> Result<Probe, Error> {
        let ks = cv::<F>(&x[..nk]);
        let w = cv::<F>(&x[nk..]);
        let mut perm = vec![0usize; index.len()];
        let mut scratch = vec![F::zero(); 2 * d.batch];
        let mut out = vec![F::zero(); d.len()];
        gdpo_advantages(cfg, d, &ks, &w, m, index, &mut perm, &mut scratch, &mut out)?;
        Ok(probe(back(&out)))
    }
    check(
        &case,
        &|x| eval::<f64>(x, nk, &cfg, d, &m, &index),
        Some(&|x| eval::<f32>(x, nk, &cfg, d, &m, &index)),
    );
    Ok(())
}

fn gamma(u: &mut Unstructured) -> ArbResult<(f64, bool)> {
    param(u, 0.0, 1.0, |g| (0.0..=1.0).contains(&g))
}

/// GAE, verl (masked tokens skipped) and torchtune presets.
fn gae(u: &mut Unstructured) -> ArbResult<()> {
    let d = dims(u)?;
    let preset = PRESETS[u.int_in_range(0..=3)?];
    let (g, g_ok) = gamma(u)?;
    let (l, l_ok) = gamma(u)?;
    let finite: bool = u.arbitrary()?;
    let (nr, bad_r) = maybe_wrong_len(u, d.len())?;
    let mut x = scores(u, nr, finite)?;
    x.extend(floats(u, d.len(), 3.0, finite)?);
    let m = mask(u, d.len())?;
    let mut case = Case::new("gae_advantages_returns", x);
    case.fd = false;
    case.malformed = bad_r || !g_ok || !l_ok;
    let skip_masked = preset != Preset::Torchtune;
    // verl skips masked tokens in the recursion, so their rewards and values
    // are padding; torchtune's recursion reads every token (peer semantics),
    // so nothing is padding there.
    if skip_masked && !bad_r {
        case.pad = (0..2 * d.len()).map(|i| !m[i % d.len()]).collect();
    }
    // torchtune's whitening with exactly one valid token divides by
    // `n − 1 = 0` (the peer raises there); `masked_whiten` (stats, not this
    // family) gives a finite f64 but NaN in f32: reported, not probed here.
    if !skip_masked && m.iter().filter(|&&v| v).count() == 1 {
        case.finite.1 = false;
    }
    fn eval<F: Real>(
        x: &[f64],
        nr: usize,
        preset: Preset,
        g: f64,
        l: f64,
        d: Dims,
        m: &[bool],
    ) -> Result<Probe, Error> {
        let cfg = GaeConfig::preset(preset, g, l)?;
        let r = cv::<F>(&x[..nr]);
        let v = cv::<F>(&x[nr..]);
        let mut adv = vec![F::zero(); d.len()];
        let mut ret = vec![F::zero(); d.len()];
        gae_advantages_returns(&cfg, d, &r, &v, m, &mut adv, &mut ret)?;
        // Returns at masked positions are `A + V` with the padding's own
        // value (verl's `returns = advantages + values`): a masked output,
        // so only valid positions are compared.
        let mut val = back(&adv);
        val.extend(
            back(&ret)
                .into_iter()
                .zip(m)
                .filter(|(_, &mk)| mk || !cfg.skip_masked)
                .map(|(r, _)| r),
        );
        Ok(probe(val))
    }
    check(
        &case,
        &|x| eval::<f64>(x, nr, preset, g, l, d, &m),
        Some(&|x| eval::<f32>(x, nr, preset, g, l, d, &m)),
    );
    Ok(())
}

/// Discounted returns, REINFORCE++ and ReMax: masked rewards are padding.
fn returns(u: &mut Unstructured) -> ArbResult<()> {
    let d = dims(u)?;
    let which: u8 = u.int_in_range(0..=2)?;
    let (g, g_ok) = gamma(u)?;
    let finite: bool = u.arbitrary()?;
    let (nr, bad_r) = maybe_wrong_len(u, d.len())?;
    let mut x = scores(u, nr, finite)?;
    let (nb, bad_b) = maybe_wrong_len(u, d.batch)?;
    x.extend(scores(u, nb, finite)?);
    let m = mask(u, d.len())?;
    let mut case = Case::new("discounted returns", x);
    case.fd = false;
    case.malformed = bad_r
        || match which {
            0 => false, // discounted_returns takes γ as is
            1 => !g_ok,
            _ => bad_b,
        };
    if which == 0 && !g_ok {
        return Ok(());
    }
    if !bad_r {
        case.pad = (0..nr + nb).map(|i| i < nr && !m[i]).collect();
    }
    #[allow(clippy::too_many_arguments)]
    fn eval<F: Real>(
        x: &[f64],
        nr: usize,
        which: u8,
        g: f64,
        d: Dims,
        m: &[bool],
    ) -> Result<Probe, Error> {
        let r = cv::<F>(&x[..nr]);
        let b = cv::<F>(&x[nr..]);
        let mut adv = vec![F::zero(); d.len()];
        let mut ret = vec![F::zero(); d.len()];
        match which {
            0 => discounted_returns(d, &r, m, g, &mut ret)?,
            1 => reinforce_plus_plus_advantages(d, &r, m, g, &mut adv, &mut ret)?,
            _ => remax_advantages(d, &r, &b, m, &mut adv, &mut ret)?,
        }
        let mut val = back(&adv);
        val.extend(back(&ret));
        Ok(probe(val))
    }
    check(
        &case,
        &|x| eval::<f64>(x, nr, which, g, d, &m),
        Some(&|x| eval::<f32>(x, nr, which, g, d, &m)),
    );
    Ok(())
}

/// The optimal token baseline: masked rewards, log-probabilities, `Σπ²`
/// and IS weights are padding.
fn otb(u: &mut Unstructured) -> ArbResult<()> {
    let d = dims(u)?;
    let n = d.len();
    let finite: bool = u.arbitrary()?;
    let (nr, bad_r) = maybe_wrong_len(u, n)?;
    let mut x = scores(u, nr, finite)?;
    let lp = lp_or_special(u, n, finite)?;
    // Σπ² ∈ [p², 1] (a distribution that gives its token probability p).
    let spi: Vec<f64> = lp
        .iter()
        .map(|&l| {
            let p2 = (2.0 * l).exp();
            let t = u.arbitrary::<u8>()? as f64 / 255.0;
            Ok(if p2.is_finite() {
                p2 + (1.0 - p2) * t
            } else {
                p2
            })
        })
        .collect::<ArbResult<_>>()?;
    x.extend(lp);
    x.extend(spi);
    let with_is: bool = u.arbitrary()?;
    if with_is {
        x.extend(
            floats(u, n, 3.0, finite)?
                .iter()
                .map(|v| if v.is_finite() { v.abs() } else { *v }),
        );
    }
    let (index, bad_idx) = group_ids(u, d.batch)?;
    let m = mask(u, n)?;
    let (eps, eps_ok) = param(u, 0.0, 1e-3, |e| e >= 0.0 && e.is_finite())?;
    if !eps_ok || eps == 0.0 {
        return Ok(()); // a plain struct; ε > 0 keeps Σ W / (Σ W + ε) defined
    }
    let cfg = OtbConfig {
        handle_zero_tail: u.arbitrary()?,
        epsilon: eps,
        compact_steps: u.arbitrary()?,
    };
    let mut case = Case::new("optimal_token_baseline_advantages", x);
    case.fd = false;
    // IS weights whose square exceeds the float range overflow `w` (a
    // documented limit of `optimal_token_baseline_advantages`).
    // The products `G·W` must be representable too (f32: rewards ~1e30
    // times weights ~1e10 overflow, as in the peer).
    let big_r = case.x[..nr].iter().any(|r| r.abs() > 1e15);
    let big_w = with_is && case.x[nr + 2 * n..].iter().any(|r| r.abs() > 1e7);
    if big_r || big_w {
        case.finite.1 = false;
    }
    case.malformed = bad_r || bad_idx;
    if !bad_r {
        let parts = if with_is { 4 } else { 3 };
        case.pad = (0..parts * n).map(|i| !m[i % n.max(1)]).collect();
    }
    fn eval<F: Real>(
        x: &[f64],
        nr: usize,
        with_is: bool,
        cfg: &OtbConfig,
        d: Dims,
        m: &[bool],
        index: &[i64],
    ) -> Result<Probe, Error> {
        let n = d.len();
        let r = cv::<F>(&x[..nr]);
        let lp = cv::<F>(&x[nr..nr + n]);
        let spi = cv::<F>(&x[nr + n..nr + 2 * n]);
        let w = with_is.then(|| cv::<F>(&x[nr + 2 * n..]));
        let mut perm = vec![0usize; index.len()];
        let mut scratch = vec![F::zero(); n + 2 * d.seq];
        let mut adv = vec![F::zero(); n];
        let mut ret = vec![F::zero(); n];
        optimal_token_baseline_advantages(
            cfg,
            d,
            &r,
            m,
            index,
            &lp,
            &spi,
            w.as_deref(),
            &mut perm,
            &mut scratch,
            &mut adv,
            &mut ret,
        )?;
        let mut val = back(&adv);
        val.extend(back(&ret));
        Ok(probe(val))
    }
    check(
        &case,
        &|x| eval::<f64>(x, nr, with_is, &cfg, d, &m, &index),
        Some(&|x| eval::<f32>(x, nr, with_is, &cfg, d, &m, &index)),
    );
    Ok(())
}

fn log_metrics<F: Real>(l: &RewardLog<F>) -> Vec<f64> {
    let mut v = vec![
        l.reward_mean.to_f64(),
        l.reward_std.to_f64(),
        l.frac_zero_std.to_f64(),
    ];
    v.extend(l.kl.map(|k| k.to_f64()));
    v
}

fn multi_shape(u: &mut Unstructured) -> ArbResult<(usize, usize, usize)> {
    let g: usize = u.int_in_range(0..=4)?;
    let groups: usize = u.int_in_range(0..=3)?;
    let k: usize = u.int_in_range(0..=3)?;
    Ok((g, groups, k))
}

/// TRL's multi-reward group advantages (NaN rewards are data there: a
/// reward function that does not apply, so only the finite case is checked
/// for finiteness and nothing is padding).
fn multi_reward(u: &mut Unstructured) -> ArbResult<()> {
    let (g, groups, k) = multi_shape(u)?;
    let b = g * groups + usize::from(u.arbitrary::<u8>()? < 16);
    let finite: bool = u.arbitrary()?;
    let (nf, bad_f) = maybe_wrong_len(u, b * k)?;
    let mut x = scores(u, nf, finite)?;
    x.extend(floats(u, k, 2.0, true)?);
    let scaling = [
        RewardScaling::Group,
        RewardScaling::Batch,
        RewardScaling::None,
    ][u.int_in_range(0..=2)?];
    let agg = [
        RewardAggregation::SumThenNormalize,
        RewardAggregation::NormalizeThenSum,
    ][u.int_in_range(0..=1)?];
    let mut case = Case::new("multi_reward_group_advantages", x);
    case.fd = false;
    case.malformed = bad_f || k == 0 || b == 0 || g == 0 || b % g != 0;
    fn eval<F: Real>(
        x: &[f64],
        nf: usize,
        b: usize,
        cfg: (usize, RewardScaling, RewardAggregation),
    ) -> Result<Probe, Error> {
        let cfg = MultiRewardConfig::new(cfg.0, cfg.1, cfg.2)?;
        let per = cv::<F>(&x[..nf]);
        let w = cv::<F>(&x[nf..]);
        let (mut r, mut s, mut out) = (vec![F::zero(); b], vec![F::zero(); b], vec![F::zero(); b]);
        let log = multi_reward_group_advantages(&cfg, &per, &w, &mut r, &mut s, &mut out)?;
        let mut p = probe(back(&out));
        p.metrics = log_metrics(&log);
        p.metrics.extend(back(&r));
        p.metrics.extend(back(&s));
        Ok(p)
    }
    let c = (g, scaling, agg);
    check(
        &case,
        &|x| eval::<f64>(x, nf, b, c),
        Some(&|x| eval::<f32>(x, nf, b, c)),
    );
    Ok(())
}

/// TRL's RLOO with KL penalty, reward clipping and normalisation: masked
/// tokens of the log-probabilities are padding.
fn rloo_reward(u: &mut Unstructured) -> ArbResult<()> {
    let (g, groups, k) = multi_shape(u)?;
    let seq: usize = u.int_in_range(0..=5)?;
    let b = g * groups + usize::from(u.arbitrary::<u8>()? < 16);
    let d = Dims::new(b, seq);
    let finite: bool = u.arbitrary()?;
    let (nf, bad_f) = maybe_wrong_len(u, b * k)?;
    let mut x = scores(u, nf, finite)?;
    x.extend(floats(u, k, 2.0, true)?);
    let off = x.len();
    x.extend(log_probs(u, d.len())?);
    let with_ref: bool = u.arbitrary()?;
    if with_ref {
        x.extend(log_probs(u, d.len())?);
    }
    let m = mask(u, d.len())?;
    let (beta, beta_ok) = if u.arbitrary()? {
        (0.0, true)
    } else {
        param(u, 0.0, 0.5, |b| b.is_finite())?
    };
    let clip = if u.arbitrary()? {
        let lo = super::float(u, 3.0, false)?;
        let hi = super::float(u, 3.0, false)?;
        Some((lo, hi))
    } else {
        None
    };
    let clip_ok = clip.is_none_or(|(lo, hi)| lo <= hi);
    let normalize: bool = u.arbitrary()?;
    let mut case = Case::new("leave_one_out_reward_advantages", x);
    case.fd = false;
    case.malformed = bad_f
        || k == 0
        || b == 0
        || g == 0
        || b % g != 0
        || !beta_ok
        || !clip_ok
        || (beta != 0.0 && !with_ref);
    if !bad_f {
        let n = d.len().max(1);
        case.pad = (0..case.x.len())
            .map(|i| i >= off && !m[(i - off) % n])
            .collect();
    }
    #[allow(clippy::type_complexity)]
    fn eval<F: Real>(
        x: &[f64],
        nf: usize,
        k: usize,
        d: Dims,
        with_ref: bool,
        m: &[bool],
        cfg: (usize, f64, Option<(f64, f64)>, bool),
    ) -> Result<Probe, Error> {
        let cfg = RlooConfig::new(cfg.0, cfg.1, cfg.2, cfg.3)?;
        let b = d.batch;
        let per = cv::<F>(&x[..nf]);
        let w = cv::<F>(&x[nf..nf + k]);
        let old = cv::<F>(&x[nf + k..nf + k + d.len()]);
        let rf = with_ref.then(|| cv::<F>(&x[nf + k + d.len()..]));
        let (mut r, mut so, mut out) = (vec![F::zero(); b], vec![F::zero(); b], vec![F::zero(); b]);
        let log = leave_one_out_reward_advantages(
            &cfg,
            d,
            &per,
            &w,
            m,
            &old,
            rf.as_deref(),
            &mut r,
            &mut so,
            &mut out,
        )?;
        let mut p = probe(back(&out));
        p.val.extend(back(&so));
        p.metrics = log_metrics(&log);
        p.metrics.extend(back(&r));
        Ok(p)
    }
    let c = (g, beta, clip, normalize);
    check(
        &case,
        &|x| eval::<f64>(x, nf, k, d, with_ref, &m, c),
        Some(&|x| eval::<f32>(x, nf, k, d, with_ref, &m, c)),
    );
    Ok(())
}

/// `outcome_scores` (verl sums the whole reward row, padding included:
/// peer semantics, so nothing is padding for it) and `broadcast_to_tokens`
/// (masked tokens get 0).
fn outcome(u: &mut Unstructured) -> ArbResult<()> {
    let d = dims(u)?;
    let finite: bool = u.arbitrary()?;
    let (nr, bad_r) = maybe_wrong_len(u, d.len())?;
    let x = scores(u, nr, finite)?;
    let m = mask(u, d.len())?;
    let mut case = Case::new("outcome_scores", x);
    case.fd = false;
    case.malformed = bad_r;
    case.expect = Some(is_shape);
    fn eval<F: Real>(x: &[f64], d: Dims, m: &[bool]) -> Result<Probe, Error> {
        let r = cv::<F>(x);
        let mut s = vec![F::zero(); d.batch];
        outcome_scores(d, &r, &mut s)?;
        let mut t = vec![F::zero(); d.len()];
        broadcast_to_tokens(d, &s, m, &mut t)?;
        let mut val = back(&s);
        val.extend(back(&t));
        Ok(probe(val))
    }
    check(
        &case,
        &|x| eval::<f64>(x, d, &m),
        Some(&|x| eval::<f32>(x, d, &m)),
    );
    Ok(())
}
