//! Property tests of the per-sequence-mean GRPO losses: gradients against
//! central finite differences, masking, and relations between the variants.

use posttrain_core::policy::sequence_mean::{
    completion_clipped_loss, on_policy_loss, on_policy_loss_from_hidden,
    on_policy_loss_from_logits, token_clipped_loss, truncate_for_logprobs,
    truncate_for_logprobs_vjp, HiddenGrads, SequenceMeanConfig, TokenCountGuard,
};
use posttrain_core::{Dims, Error};
use proptest::prelude::*;

const B: usize = 3;
const T: usize = 4;
const N: usize = B * T;
const V: usize = 5;
const H: usize = 3;

fn vec_in(n: usize, lo: f64, hi: f64) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(lo..hi, n)
}

fn mask() -> impl Strategy<Value = Vec<bool>> {
    prop::collection::vec(any::<bool>(), N).prop_map(|mut m| {
        m[0] = true;
        m
    })
}

fn poison(x: &[f64], m: &[bool]) -> Vec<f64> {
    x.iter()
        .zip(m)
        .map(|(&x, &k)| if k { x } else { f64::NAN })
        .collect()
}

fn fd_check(g: &[f64], x: &[f64], f: impl Fn(&[f64]) -> f64) -> Result<(), TestCaseError> {
    let h = 1e-6;
    for i in 0..x.len() {
        let (mut p, mut q) = (x.to_vec(), x.to_vec());
        p[i] += h;
        q[i] -= h;
        let fd = (f(&p) - f(&q)) / (2.0 * h);
        prop_assert!(
            (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
            "i={i} fd={fd} g={}",
            g[i]
        );
    }
    Ok(())
}

/// The on-policy losses' *value* does not depend on `log π` through the
/// policy term (`exp(log π − sg(log π)) = 1`); their gradient is that of this
/// surrogate, with the stop-gradient copy `lp0` held fixed.
#[allow(clippy::too_many_arguments)]
fn on_policy_surrogate(
    lp: &[f64],
    lp0: &[f64],
    rf: &[f64],
    adv: &[f64],
    m: &[bool],
    beta: f64,
    den: impl Fn(usize) -> f64,
) -> f64 {
    let mut total = 0.0;
    for (b, &a) in adv.iter().enumerate() {
        let range = b * T..(b + 1) * T;
        let n = range.clone().filter(|&i| m[i]).count();
        let mut row = 0.0;
        for i in range.filter(|&i| m[i]) {
            let x = rf[i] - lp[i];
            let kl = x.exp() - x - 1.0;
            row += -(a * (lp[i] - lp0[i]).exp() - beta * kl);
        }
        total += row / den(n);
    }
    total / adv.len() as f64
}

/// `log softmax(z)[t]` per row, 0 for `t = -100`.
fn log_probs(z: &[f64], t: &[i64]) -> Vec<f64> {
    t.iter()
        .enumerate()
        .map(|(i, &t)| {
            if t == -100 {
                return 0.0;
            }
            let row = &z[i * V..(i + 1) * V];
            let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + row.iter().map(|&x| (x - mx).exp()).sum::<f64>().ln();
            row[t as usize] - lse
        })
        .collect()
}

fn project(h: &[f64], w: &[f64]) -> Vec<f64> {
    (0..N * V)
        .map(|k| {
            let (i, v) = (k / V, k % V);
            (0..H).map(|j| w[v * H + j] * h[i * H + j]).sum()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn on_policy_gradient_matches_finite_differences(
        lp in vec_in(N, -3.0, 0.0), rf in vec_in(N, -3.0, 0.0), adv in vec_in(B, -2.0, 2.0),
        m in mask(), beta in 0.0f64..0.5,
    ) {
        let cfg = SequenceMeanConfig::new(0.2, beta)?;
        let dims = Dims::new(B, T);
        let guard = TokenCountGuard::TORCHTUNE_SIMPLE;
        let mut g = vec![0.0; N];
        on_policy_loss(&cfg, guard, dims, &lp, &rf, &adv, Some(&m), Some(&mut g))?;
        let out = on_policy_loss(&cfg, guard, dims, &lp, &rf, &adv, Some(&m), None)?;
        let sur = on_policy_surrogate(&lp, &lp, &rf, &adv, &m, beta, |n| n as f64 + 1e-8);
        prop_assert!((out.loss - sur).abs() < 1e-12 * (1.0 + sur.abs()));
        fd_check(&g, &lp, |x| on_policy_surrogate(x, &lp, &rf, &adv, &m, beta, |n| n as f64 + 1e-8))?;
    }

    #[test]
    fn token_clipped_gradient_matches_finite_differences(
        lp in vec_in(N, -3.0, 0.0), old in vec_in(N, -3.0, 0.0), rf in vec_in(N, -3.0, 0.0),
        adv in vec_in(B, -2.0, 2.0), m in mask(), beta in 0.0f64..0.5,
    ) {
        for i in 0..N {
            let r = (lp[i] - old[i]).exp();
            prop_assume!((r - 0.8).abs() > 1e-4 && (r - 1.2).abs() > 1e-4);
        }
        let cfg = SequenceMeanConfig::new(0.2, beta)?;
        let dims = Dims::new(B, T);
        let mut g = vec![0.0; N];
        token_clipped_loss(&cfg, dims, &old, &lp, &rf, &adv, Some(&m), Some(&mut g))?;
        fd_check(&g, &lp, |x| token_clipped_loss(&cfg, dims, &old, x, &rf, &adv, Some(&m), None).unwrap().loss)?;
    }

    #[test]
    fn completion_gradient_matches_finite_differences(
        lp in vec_in(N, -0.3, 0.0), old in vec_in(N, -0.3, 0.0), rf in vec_in(N, -0.3, 0.0),
        adv in vec_in(B, -2.0, 2.0), m in mask(), beta in 0.0f64..0.5,
    ) {
        let x: f64 = (0..N).filter(|&i| m[i]).map(|i| lp[i] - old[i]).sum();
        prop_assume!((x.exp() - 0.8).abs() > 1e-3 && (x.exp() - 1.2).abs() > 1e-3);
        let cfg = SequenceMeanConfig::new(0.2, beta)?;
        let dims = Dims::new(B, T);
        let mut g = vec![0.0; N];
        completion_clipped_loss(&cfg, dims, &old, &lp, &rf, &adv, Some(&m), Some(&mut g))?;
        fd_check(&g, &lp, |x| completion_clipped_loss(&cfg, dims, &old, x, &rf, &adv, Some(&m), None).unwrap().loss)?;
    }

    #[test]
    fn from_logits_gradient_matches_finite_differences(
        z in vec_in(N * V, -3.0, 3.0), t in prop::collection::vec(0i64..V as i64, N),
        rf in vec_in(N, -3.0, 0.0), adv in vec_in(B, -2.0, 2.0), m in mask(), beta in 0.0f64..0.5,
    ) {
        let cfg = SequenceMeanConfig::new(0.2, beta)?;
        let dims = Dims::new(B, T);
        let guard = TokenCountGuard::TORCHTUNE_CHUNKED;
        let mut lp = vec![0.0; N];
        let mut g = vec![0.0; N * V];
        on_policy_loss_from_logits(&cfg, guard, dims, V, &z, &t, Some(-100), &rf, &adv, Some(&m), &mut lp, Some(&mut g))?;
        let lp0 = log_probs(&z, &t);
        for i in 0..N {
            prop_assert!((lp[i] - lp0[i]).abs() < 1e-12);
        }
        fd_check(&g, &z, |x| on_policy_surrogate(&log_probs(x, &t), &lp0, &rf, &adv, &m, beta, |n| (n as f64).max(1e-9)))?;
    }

    #[test]
    fn from_hidden_gradient_matches_finite_differences(
        h in vec_in(N * H, -1.5, 1.5), w in vec_in(V * H, -1.5, 1.5),
        t in prop::collection::vec(prop_oneof![4 => 0i64..V as i64, 1 => Just(-100i64)], N),
        rf in vec_in(N, -3.0, 0.0), adv in vec_in(B, -2.0, 2.0), m in mask(), beta in 0.0f64..0.5,
    ) {
        let cfg = SequenceMeanConfig::new(0.2, beta)?;
        let dims = Dims::new(B, T);
        let guard = TokenCountGuard::TORCHTUNE_CHUNKED;
        let run = |h: &[f64], w: &[f64], grads: Option<HiddenGrads<'_, f64>>| {
            let mut lp = vec![0.0; N];
            let mut scratch = vec![0.0; V];
            on_policy_loss_from_hidden(&cfg, guard, dims, H, V, h, w, &t, Some(-100), &rf, &adv, Some(&m), &mut lp, &mut scratch, grads)
                .unwrap()
                .loss
        };
        let (mut gh, mut gw) = (vec![0.0; N * H], vec![0.0; V * H]);
        run(&h, &w, Some(HiddenGrads { hidden: &mut gh, weight: &mut gw }));
        let lp0 = log_probs(&project(&h, &w), &t);
        let sur = |h: &[f64], w: &[f64]| {
            on_policy_surrogate(&log_probs(&project(h, w), &t), &lp0, &rf, &adv, &m, beta, |n| (n as f64).max(1e-9))
        };
        prop_assert!((run(&h, &w, None) - sur(&h, &w)).abs() < 1e-12);
        fd_check(&gh, &h, |x| sur(x, &w))?;
        fd_check(&gw, &w, |x| sur(&h, x))?;
    }

    #[test]
    fn masked_nan_changes_nothing(
        lp in vec_in(N, -3.0, 0.0), old in vec_in(N, -3.0, 0.0), rf in vec_in(N, -3.0, 0.0),
        adv in vec_in(B, -2.0, 2.0), m in mask(), beta in 0.0f64..0.5,
    ) {
        let cfg = SequenceMeanConfig::new(0.2, beta)?;
        let dims = Dims::new(B, T);
        let (plp, pold, prf) = (poison(&lp, &m), poison(&old, &m), poison(&rf, &m));
        let (mut g1, mut g2) = (vec![0.0; N], vec![0.0; N]);
        let a = on_policy_loss(&cfg, TokenCountGuard::TORCHTUNE_SIMPLE, dims, &lp, &rf, &adv, Some(&m), Some(&mut g1))?;
        let b = on_policy_loss(&cfg, TokenCountGuard::TORCHTUNE_SIMPLE, dims, &plp, &prf, &adv, Some(&m), Some(&mut g2))?;
        prop_assert_eq!(a, b);
        prop_assert_eq!(&g1, &g2);
        let a = completion_clipped_loss(&cfg, dims, &old, &lp, &rf, &adv, Some(&m), Some(&mut g1))?;
        let b = completion_clipped_loss(&cfg, dims, &pold, &plp, &prf, &adv, Some(&m), Some(&mut g2))?;
        prop_assert_eq!(a, b);
        prop_assert_eq!(&g1, &g2);
        // The token form's loss, metrics (but `ratio_mean`, a whole-batch
        // mean by definition) and gradient.
        let a = token_clipped_loss(&cfg, dims, &old, &lp, &rf, &adv, Some(&m), Some(&mut g1))?;
        let b = token_clipped_loss(&cfg, dims, &pold, &plp, &prf, &adv, Some(&m), Some(&mut g2))?;
        prop_assert_eq!((a.loss, a.policy_loss, a.kl_loss, a.clipfrac), (b.loss, b.policy_loss, b.kl_loss, b.clipfrac));
        prop_assert_eq!(&g1, &g2);
    }

    /// At ratio 1 with full rows, the clipped token loss and the on-policy
    /// loss are the same objective: equal values and gradients.
    #[test]
    fn on_policy_equals_token_clipped_at_unit_ratio(
        lp in vec_in(N, -3.0, 0.0), rf in vec_in(N, -3.0, 0.0), adv in vec_in(B, -2.0, 2.0),
        beta in 0.0f64..0.5,
    ) {
        let cfg = SequenceMeanConfig::new(0.2, beta)?;
        let dims = Dims::new(B, T);
        let (mut g1, mut g2) = (vec![0.0; N], vec![0.0; N]);
        let a = token_clipped_loss(&cfg, dims, &lp, &lp, &rf, &adv, None, Some(&mut g1))?;
        let b = on_policy_loss(&cfg, TokenCountGuard::AtLeast(1e-9), dims, &lp, &rf, &adv, None, Some(&mut g2))?;
        prop_assert!((a.loss - b.loss).abs() < 1e-9 * (1.0 + b.loss.abs()));
        prop_assert_eq!(a.ratio_mean, 1.0);
        for i in 0..N {
            prop_assert!((g1[i] - g2[i]).abs() < 1e-9 * (1.0 + g2[i].abs()));
        }
    }

    /// The truncation VJP is the adjoint of the truncation.
    #[test]
    fn truncation_vjp_is_the_adjoint(x in vec_in(2 * 6 * 3, -1.0, 1.0), c in vec_in(2 * 4 * 3, -1.0, 1.0)) {
        let mut y = vec![0.0; 2 * 4 * 3];
        truncate_for_logprobs(&x, 2, 6, 3, 2, &mut y)?;
        let mut g = vec![0.0; x.len()];
        truncate_for_logprobs_vjp(&c, 2, 6, 3, 2, &mut g)?;
        let lhs: f64 = y.iter().zip(&c).map(|(a, b)| a * b).sum();
        let rhs: f64 = x.iter().zip(&g).map(|(a, b)| a * b).sum();
        prop_assert!((lhs - rhs).abs() < 1e-12);
    }
}

#[test]
fn all_masked_is_zero_with_zero_gradient() {
    let cfg = SequenceMeanConfig::new(0.2, 0.1).unwrap();
    let dims = Dims::new(2, 2);
    let x = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0];
    let m = [false; 4];
    let mut g = [1.0; 4];
    let out =
        token_clipped_loss(&cfg, dims, &x, &x, &x, &[1.0, 2.0], Some(&m), Some(&mut g)).unwrap();
    assert_eq!(
        (out.loss, out.policy_loss, out.kl_loss, out.clipfrac),
        (0.0, 0.0, 0.0, 0.0)
    );
    assert_eq!(g, [0.0; 4]);
    let mut g = [1.0; 4];
    let out = on_policy_loss(
        &cfg,
        TokenCountGuard::TORCHTUNE_SIMPLE,
        dims,
        &x,
        &x,
        &[1.0, 2.0],
        Some(&m),
        Some(&mut g),
    )
    .unwrap();
    assert_eq!((out.loss, out.policy_loss, out.kl_loss), (0.0, 0.0, 0.0));
    assert_eq!(g, [0.0; 4]);
}

#[test]
fn bad_input_is_a_typed_error() {
    assert!(matches!(
        SequenceMeanConfig::new(-0.1, 0.1),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        SequenceMeanConfig::new(0.1, f64::INFINITY),
        Err(Error::OutOfRange { .. })
    ));
    let cfg = SequenceMeanConfig::new(0.2, 0.1).unwrap();
    let dims = Dims::new(2, 2);
    let z = [0.0; 4];
    let r = token_clipped_loss(&cfg, dims, &z, &z, &z[..3], &[0.0; 2], None, None);
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch {
            input: "ref_log_prob",
            ..
        })
    ));
    let r = on_policy_loss(
        &cfg,
        TokenCountGuard::TORCHTUNE_SIMPLE,
        dims,
        &z,
        &z,
        &[0.0; 3],
        None,
        None,
    );
    assert!(matches!(
        r,
        Err(Error::ShapeMismatch {
            input: "advantages",
            ..
        })
    ));
    let mut lp = [0.0; 4];
    let r = on_policy_loss_from_logits(
        &cfg,
        TokenCountGuard::TORCHTUNE_CHUNKED,
        dims,
        2,
        &[0.0; 8],
        &[0, 1, 2, 0],
        Some(-100),
        &z,
        &[0.0; 2],
        None,
        &mut lp,
        None,
    );
    assert!(matches!(
        r,
        Err(Error::Invalid {
            input: "targets",
            ..
        })
    ));
    let mut out = [0.0; 4];
    assert!(matches!(
        truncate_for_logprobs(&[0.0; 4], 1, 4, 1, 0, &mut out),
        Err(Error::OutOfRange { .. })
    ));
}
