//! Property tests of loss aggregation.

use posttrain_core::aggregate::{aggregate, AggMode, GlobalNorm};
use posttrain_core::Dims;
use proptest::prelude::*;

fn batch() -> impl Strategy<Value = (Dims, Vec<f64>, Vec<bool>)> {
    (1usize..7, 1usize..9).prop_flat_map(|(b, t)| {
        (
            Just(Dims::new(b, t)),
            prop::collection::vec(-5.0f64..5.0, b * t),
            prop::collection::vec(any::<bool>(), b * t),
        )
    })
}

proptest! {
    /// Splitting a batch into micro-batches, each aggregated with the global
    /// normalizers (global token count / global number of sequences), and
    /// summing gives the full-batch loss — for every mode.
    #[test]
    fn micro_batches_with_global_normalizers_sum_to_the_full_batch((dims, loss, mask) in batch(), split in 0usize..8, m in 0usize..5) {
        let mode = AggMode::ALL[m];
        let split = split.min(dims.batch);
        let n_tokens = mask.iter().filter(|&&x| x).count() as f64;
        let n_rows = mask.chunks(dims.seq).filter(|r| r.iter().any(|&x| x)).count() as f64;
        prop_assume!(n_tokens > 0.0);
        let norm = GlobalNorm { batch_num_tokens: Some(n_tokens), global_batch_size: Some(n_rows), ..GlobalNorm::default() };
        let full = aggregate(mode, &GlobalNorm::default(), dims, &loss, &mask, None).unwrap();
        let cut = split * dims.seq;
        let a = aggregate(mode, &norm, Dims::new(split, dims.seq), &loss[..cut], &mask[..cut], None).unwrap();
        let b = aggregate(mode, &norm, Dims::new(dims.batch - split, dims.seq), &loss[cut..], &mask[cut..], None).unwrap();
        prop_assert!((a + b - full).abs() <= 1e-9 * (1.0 + full.abs()), "{a} + {b} != {full}");
    }

    /// The gradient (the weights) matches finite differences, and the
    /// buffered and unbuffered paths agree.
    #[test]
    fn weights_are_the_gradient((dims, loss, mask) in batch(), m in 0usize..5, k in 0usize..64) {
        let mode = AggMode::ALL[m];
        let norm = GlobalNorm::default();
        let mut w = vec![0.0; dims.len()];
        let l = aggregate(mode, &norm, dims, &loss, &mask, Some(&mut w)).unwrap();
        let l2 = aggregate(mode, &norm, dims, &loss, &mask, None).unwrap();
        prop_assert!((l - l2).abs() <= 1e-12 * (1.0 + l.abs()));
        let k = k % dims.len();
        let h = 1e-5;
        let mut lp = loss.clone();
        lp[k] += h;
        let mut lm = loss.clone();
        lm[k] -= h;
        let fd = (aggregate(mode, &norm, dims, &lp, &mask, None).unwrap() - aggregate(mode, &norm, dims, &lm, &mask, None).unwrap()) / (2.0 * h);
        prop_assert!((fd - w[k]).abs() < 1e-6);
    }

    /// Masked positions holding NaN or ±inf change nothing; all-masked is 0.
    #[test]
    fn masked_nan_changes_nothing((dims, loss, mask) in batch(), m in 0usize..5) {
        let mode = AggMode::ALL[m];
        let mut poisoned = loss.clone();
        for (i, (x, &k)) in poisoned.iter_mut().zip(&mask).enumerate() {
            if !k { *x = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][i % 3]; }
        }
        let norm = GlobalNorm::default();
        let a = aggregate(mode, &norm, dims, &loss, &mask, None).unwrap();
        let b = aggregate(mode, &norm, dims, &poisoned, &mask, None).unwrap();
        prop_assert_eq!(a.to_bits(), b.to_bits());
        let none = vec![false; dims.len()];
        let mut w = vec![1.0; dims.len()];
        prop_assert_eq!(aggregate(mode, &norm, dims, &poisoned, &none, Some(&mut w)).unwrap(), 0.0);
        prop_assert!(w.iter().all(|&x| x == 0.0));
    }
}

#[test]
fn unknown_mode_is_a_typed_error() {
    let e = "seq-mean".parse::<AggMode>().unwrap_err();
    assert!(e.to_string().contains("seq-mean-token-mean"), "{e}");
}

#[test]
fn weighted_and_masked_sums_refuse_mismatched_lengths() {
    use posttrain_core::aggregate::{masked_sum, weighted_sum};
    use posttrain_core::Error;
    let l = [1.0f64, 2.0, 3.0];
    let m = [true, false, true];
    assert_eq!(weighted_sum(&l, &m, &[0.5, 0.5, 0.5]), Ok(2.0));
    assert_eq!(masked_sum(&l, &m), Ok(4.0));
    let short = [true, true];
    assert!(matches!(
        weighted_sum(&l, &short, &[0.5, 0.5, 0.5]),
        Err(Error::ShapeMismatch { input: "mask", .. })
    ));
    assert!(matches!(
        weighted_sum(&l, &m, &[0.5]),
        Err(Error::ShapeMismatch {
            input: "weights",
            ..
        })
    ));
    assert!(matches!(
        masked_sum(&l, &short),
        Err(Error::ShapeMismatch { input: "mask", .. })
    ));
}
