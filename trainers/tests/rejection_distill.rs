//! Short fixed-seed runs of rejection-sampling fine-tuning and distillation:
//! the losses must fall, bad settings must be typed errors. Smoke tests —
//! the examples are the proof that the trainers learn.

use posttrain_trainers::burn::tensor::Device;
use posttrain_trainers::distill::{DistillConfig, DistillTrainer};
use posttrain_trainers::model::{TinyLm, TinyLmConfig};
use posttrain_trainers::rejection::{best_of_n, RejectionSamplingConfig, RejectionSamplingTrainer};
use posttrain_trainers::sft::{Example, SftConfig, SftTrainer};
use posttrain_trainers::tasks::Arithmetic;
use posttrain_trainers::{OptimizerConfig, Rng, TrainError};

fn tiny(task: &Arithmetic, ad: &Device) -> TinyLm {
    let mut cfg = TinyLmConfig::new(task.tokenizer.vocab_size(), 32);
    cfg.d_model = 32;
    cfg.d_ff = 64;
    cfg.init(ad).unwrap()
}

fn setup(seed: u64) -> (Arithmetic, TinyLm, Device) {
    let device = posttrain_burn::device().unwrap();
    device.seed(seed);
    let ad = device.autodiff();
    let task = Arithmetic::new(19, 0.2, seed).unwrap();
    let model = tiny(&task, &ad);
    (task, model, ad)
}

fn demos(task: &Arithmetic, n: usize) -> Vec<Example> {
    task.train[..n]
        .iter()
        .map(|&p| (task.prompt(p), task.demonstration(p)))
        .collect()
}

#[test]
fn best_of_n_keeps_the_first_best_above_the_threshold() {
    let r = [0.0, 1.0, 1.0, 0.5, 0.2, 0.1, -1.0, -1.0, -1.0];
    assert_eq!(
        best_of_n(&r, 3, f64::NEG_INFINITY).unwrap(),
        vec![Some(1), Some(3), Some(6)]
    );
    assert_eq!(best_of_n(&r, 3, 0.5).unwrap(), vec![Some(1), Some(3), None]);
    assert!(best_of_n(&r, 0, 0.0).is_err());
    assert!(best_of_n(&r, 2, 0.0).is_err());
    assert!(best_of_n(&[f64::NAN, 1.0], 2, 0.0).is_err());
    assert!(best_of_n(&r, 3, f64::NAN).is_err());
}

#[test]
fn rejection_sampling_sft_loss_falls() {
    let (task, model, ad) = setup(11);
    let mut cfg = RejectionSamplingConfig::new(task.max_completion_len());
    cfg.num_samples = 4;
    cfg.num_train_epochs = 8;
    cfg.sft = SftConfig {
        optimizer: OptimizerConfig::adamw(3e-3),
        batch_size: 8,
    };
    let mut rs = RejectionSamplingTrainer::new(model, cfg, &ad).unwrap();
    let prompts: Vec<Vec<u32>> = task.train[..8].iter().map(|&p| task.prompt(p)).collect();
    let mut rng = Rng::new(5);
    // Reward: shorter is better; every prompt keeps its shortest sample.
    let stats = rs
        .round(&prompts, &mut |_, c| -(c.len() as f64), &mut rng)
        .unwrap();
    assert_eq!(stats.kept, 8);
    assert_eq!(stats.kept_fraction, 1.0);
    assert!(stats.best_reward_mean >= stats.reward_mean);
    assert_eq!(stats.sft_losses.len(), 8);
    let (first, last) = (stats.sft_losses[0], *stats.sft_losses.last().unwrap());
    assert!(
        first.is_finite() && last < 0.8 * first,
        "rejection-sampling SFT loss {first} -> {last}: {:?}",
        stats.sft_losses
    );
    assert_eq!(rs.sft_steps(), 8);
    assert_eq!(rs.rounds(), 1);
}

#[test]
fn rejection_sampling_threshold_drops_prompts() {
    let (task, model, ad) = setup(12);
    let mut cfg = RejectionSamplingConfig::new(task.max_completion_len());
    cfg.num_samples = 2;
    cfg.min_reward = 0.5;
    let mut rs = RejectionSamplingTrainer::new(model, cfg, &ad).unwrap();
    let prompts: Vec<Vec<u32>> = task.train[..4].iter().map(|&p| task.prompt(p)).collect();
    // Only prompt 0's completions pass the threshold.
    let stats = rs
        .round(
            &prompts,
            &mut |i, _| if i == 0 { 1.0 } else { 0.0 },
            &mut Rng::new(1),
        )
        .unwrap();
    assert_eq!((stats.kept, stats.prompts), (1, 4));
    assert_eq!(stats.sft_losses.len(), 1);
    // Nothing kept: no SFT step, NaN loss.
    let stats = rs
        .round(&prompts, &mut |_, _| 0.0, &mut Rng::new(2))
        .unwrap();
    assert_eq!(stats.kept, 0);
    assert!(stats.sft_losses.is_empty() && stats.sft_loss.is_nan());
}

#[test]
fn rejection_sampling_rejects_bad_configs() {
    let (task, model, ad) = setup(13);
    let base = RejectionSamplingConfig::new(task.max_completion_len());
    let bad = [
        RejectionSamplingConfig {
            num_samples: 0,
            ..base
        },
        RejectionSamplingConfig {
            min_reward: f64::NAN,
            ..base
        },
        RejectionSamplingConfig {
            prompts_per_round: 0,
            ..base
        },
        RejectionSamplingConfig {
            num_train_epochs: 0,
            ..base
        },
    ];
    for cfg in bad {
        let err = RejectionSamplingTrainer::new(model.clone(), cfg, &ad).unwrap_err();
        assert!(matches!(err, TrainError::Config(_)), "{err}");
    }
    let mut cfg = base;
    cfg.sampling.top_p = 0.0;
    assert!(matches!(
        RejectionSamplingTrainer::new(model, cfg, &ad).unwrap_err(),
        TrainError::Config(_)
    ));
}

/// A teacher with sharp opinions: a few SFT steps on the demonstrations.
fn teacher(task: &Arithmetic, ad: &Device, batch: &[Example]) -> TinyLm {
    let mut sft = SftTrainer::new(
        tiny(task, ad),
        SftConfig {
            optimizer: OptimizerConfig::adamw(3e-3),
            batch_size: batch.len(),
        },
        ad,
    )
    .unwrap();
    for _ in 0..20 {
        sft.step(batch).unwrap();
    }
    sft.into_model()
}

#[test]
fn distillation_loss_falls_for_every_divergence() {
    let (task, student, ad) = setup(21);
    let batch = demos(&task, 16);
    let teacher = teacher(&task, &ad, &batch);
    for (beta, loss_type) in [
        (0.0, "generalized_jsd"),
        (1.0, "generalized_jsd"),
        (0.5, "generalized_jsd"),
        (0.0, "kd"),
    ] {
        let mut cfg = DistillConfig::new(task.max_completion_len());
        cfg.beta = beta;
        cfg.lmbda = 0.0;
        cfg.loss_type = loss_type.into();
        cfg.optimizer = OptimizerConfig::adamw(3e-3);
        let mut d = DistillTrainer::new(student.clone(), teacher.clone(), cfg, &ad).unwrap();
        let mut rng = Rng::new(3);
        let first = d.step(&batch, &mut rng).unwrap();
        assert!(!first.on_policy);
        assert_eq!(first.tokens, batch.iter().map(|e| e.1.len()).sum::<usize>());
        for _ in 0..15 {
            d.step(&batch, &mut rng).unwrap();
        }
        let end = d.step(&batch, &mut rng).unwrap();
        assert!(
            first.loss.is_finite()
                && first.divergence > 0.0
                && end.divergence < 0.6 * first.divergence
                && d.loss(&batch).unwrap() < end.loss
                && end.loss < first.loss,
            "{loss_type} β = {beta}: {first:?} -> {end:?}"
        );
        if loss_type == "generalized_jsd" {
            assert!((first.loss - first.divergence).abs() < 1e-9);
        } else {
            assert!(
                first.loss > first.divergence,
                "KD = forward KL + teacher entropy"
            );
        }
    }
}

#[test]
fn on_policy_distillation_samples_from_the_student() {
    let (task, student, ad) = setup(22);
    let batch = demos(&task, 8);
    let teacher = teacher(&task, &ad, &batch);
    let mut cfg = DistillConfig::new(task.max_completion_len());
    cfg.beta = 1.0;
    cfg.lmbda = 1.0;
    cfg.optimizer = OptimizerConfig::adamw(3e-3);
    let mut d = DistillTrainer::new(student.clone(), teacher.clone(), cfg.clone(), &ad).unwrap();
    let mut rng = Rng::new(4);
    for _ in 0..3 {
        let s = d.step(&batch, &mut rng).unwrap();
        assert!(s.on_policy && s.loss.is_finite() && s.loss >= 0.0, "{s:?}");
    }
    cfg.lmbda = 0.0;
    cfg.seq_kd = true;
    let mut d = DistillTrainer::new(student, teacher, cfg, &ad).unwrap();
    let s = d.step(&batch, &mut rng).unwrap();
    assert!(!s.on_policy && s.loss.is_finite(), "{s:?}");
}

#[test]
fn distillation_rejects_bad_configs() {
    let (task, student, ad) = setup(23);
    let teacher = student.clone();
    let base = DistillConfig::new(task.max_completion_len());
    let with = |f: &dyn Fn(&mut DistillConfig)| {
        let mut c = base.clone();
        f(&mut c);
        DistillTrainer::new(student.clone(), teacher.clone(), c, &ad).unwrap_err()
    };
    for beta in [-0.1, 1.5, f64::NAN] {
        let err = with(&|c| c.beta = beta);
        assert!(matches!(err, TrainError::Core(_)), "beta {beta}: {err}");
    }
    let err = with(&|c| c.temperature = 0.0);
    assert!(matches!(err, TrainError::Core(_)), "{err}");
    for f in [
        &|c: &mut DistillConfig| c.lmbda = 1.5,
        &|c: &mut DistillConfig| c.batch_size = 0,
        &|c: &mut DistillConfig| c.loss_type = "mse".into(),
    ] as [&dyn Fn(&mut DistillConfig); 3]
    {
        assert!(matches!(with(f), TrainError::Config(_)));
    }
    // Different vocabularies.
    let mut cfg = TinyLmConfig::new(task.tokenizer.vocab_size() + 1, 32);
    cfg.d_model = 32;
    cfg.d_ff = 64;
    let other = cfg.init(&ad).unwrap();
    let err = DistillTrainer::new(student, other, base, &ad).unwrap_err();
    assert!(matches!(err, TrainError::Config(_)), "{err}");
}
