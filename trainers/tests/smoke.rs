//! Short fixed-seed runs of each trainer: the loss must fall. Smoke tests —
//! the examples are the proof that the trainers learn.

use posttrain_trainers::burn::module::Module;
use posttrain_trainers::generate::{generate, SamplingConfig};
use posttrain_trainers::grpo::{GrpoConfig, GrpoTrainer};
use posttrain_trainers::model::{TinyLm, TinyLmConfig};
use posttrain_trainers::sft::{SftConfig, SftTrainer};
use posttrain_trainers::tasks::Arithmetic;
use posttrain_trainers::{OptimizerConfig, Rng};

fn setup(seed: u64) -> (Arithmetic, TinyLm, posttrain_trainers::burn::tensor::Device) {
    let device = posttrain_burn::device().unwrap();
    device.seed(seed);
    let ad = device.autodiff();
    let task = Arithmetic::new(19, 0.2, seed).unwrap();
    let mut cfg = TinyLmConfig::new(task.tokenizer.vocab_size(), 32);
    cfg.d_model = 32;
    cfg.d_ff = 64;
    let model = cfg.init(&ad).unwrap();
    (task, model, ad)
}

#[test]
fn sft_loss_falls() {
    let (task, model, ad) = setup(1);
    let mut sft = SftTrainer::new(
        model,
        SftConfig {
            optimizer: OptimizerConfig::adamw(3e-3),
            batch_size: 16,
        },
        &ad,
    )
    .unwrap();
    let batch: Vec<_> = task.train[..16]
        .iter()
        .map(|&p| (task.prompt(p), task.demonstration(p)))
        .collect();
    let first = sft.step(&batch).unwrap();
    for _ in 0..30 {
        sft.step(&batch).unwrap();
    }
    let last = sft.loss(&batch).unwrap();
    assert!(
        first.is_finite() && last < 0.6 * first,
        "SFT loss {first} -> {last}"
    );
}

#[test]
fn grpo_iterations_lower_the_loss_on_a_fixed_batch() {
    let (task, model, ad) = setup(2);
    let mut cfg = GrpoConfig::new(task.max_completion_len());
    cfg.num_generations = 4;
    cfg.num_iterations = 6;
    cfg.optimizer = OptimizerConfig::adamw(3e-3);
    cfg.drop_zero_variance_groups = false;
    let mut grpo = GrpoTrainer::new(model, cfg, &ad).unwrap();
    let prompts: Vec<Vec<u32>> = task.train[..4]
        .iter()
        .flat_map(|&p| std::iter::repeat_n(task.prompt(p), 4))
        .collect();
    let inner = ad.clone().inner();
    let rollout = generate(
        &grpo.model().valid(),
        &prompts,
        &SamplingConfig::new(task.max_completion_len()),
        &mut Rng::new(3),
        &inner,
    )
    .unwrap();
    // Reward: completions shorter than their group's median are good.
    let rewards: Vec<f64> = (0..rollout.len())
        .map(|i| -(rollout.completion_lens[i] as f64) + (i % 4) as f64 * 0.25)
        .collect();
    let stats = grpo.learn(&rollout, &rewards).unwrap();
    let (first, last) = (stats.losses[0], *stats.losses.last().unwrap());
    assert!(
        last < first - 0.05,
        "GRPO surrogate on a fixed batch: {:?}",
        stats.losses
    );
}

#[test]
fn cached_decoding_matches_the_full_forward() {
    use posttrain_trainers::burn::tensor::{Int, Tensor, TensorData};
    use posttrain_trainers::model::{DecodeState, Policy};
    let (_, model, ad) = setup(4);
    let model = model.valid();
    let dev = ad.inner();
    let ids: Vec<i64> = (0..3 * 9).map(|i| (i * 7 % 17 + 2) as i64).collect();
    let mut state = DecodeState::new();
    for s in 4..=9 {
        let rows: Vec<i64> = (0..3)
            .flat_map(|r| ids[r * 9..r * 9 + s].to_vec())
            .collect();
        let t = Tensor::<2, Int>::from_data(TensorData::new(rows, [3, s]), &dev);
        let cached = posttrain_burn::to_vec(model.next_token_logits(t.clone(), &mut state));
        let v = model.vocab_size();
        let full = posttrain_burn::to_vec(
            model
                .logits(t)
                .slice([0..3, s - 1..s, 0..v])
                .reshape([3, v]),
        );
        let err = cached
            .iter()
            .zip(&full)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-4, "length {s}: cached decoding differs by {err}");
    }
}

#[test]
fn grpo_kl_in_loss_or_reward_and_other_estimators_run() {
    let (task, model, ad) = setup(5);
    let inner = ad.clone().inner();
    let prompts: Vec<Vec<u32>> = task.train[..2].iter().map(|&p| task.prompt(p)).collect();
    for (estimator, use_kl_loss, agg, mode) in [
        ("grpo", true, "token-mean", "vanilla"),
        ("rloo", false, "seq-mean-token-mean", "gspo"),
        (
            "reinforce_plus_plus_baseline",
            true,
            "seq-mean-token-sum-norm",
            "cispo",
        ),
        ("opo", true, "seq-mean-token-sum", "sapo"),
    ] {
        let mut cfg = GrpoConfig::new(task.max_completion_len());
        cfg.num_generations = 4;
        cfg.num_iterations = 2;
        cfg.beta = 0.05;
        cfg.use_kl_loss = use_kl_loss;
        cfg.adv_estimator = estimator.into();
        cfg.loss_agg_mode = agg.into();
        cfg.loss_mode = mode.into();
        cfg.drop_zero_variance_groups = false;
        let mut grpo = GrpoTrainer::new(model.clone(), cfg, &ad).unwrap();
        let mut rng = Rng::new(9);
        let mut kl = 0.0;
        for _ in 0..3 {
            let stats = grpo
                .step(&prompts, &mut |_, c| c.len() as f64 * 0.1, &mut rng)
                .unwrap();
            assert!(
                stats.losses.iter().all(|l| l.is_finite()),
                "{estimator}: {stats:?}"
            );
            kl = stats.kl;
        }
        assert!(
            kl > 0.0,
            "{estimator}: the policy moved, KL to the reference must be > 0"
        );
    }
    let _ = inner;
}

#[test]
fn grpo_rejects_bad_configs_and_inputs() {
    let (task, model, ad) = setup(6);
    let mut cfg = GrpoConfig::new(task.max_completion_len());
    cfg.adv_estimator = "gae".into();
    assert!(
        GrpoTrainer::new(model.clone(), cfg, &ad).is_err(),
        "gae needs a critic"
    );
    let mut cfg = GrpoConfig::new(task.max_completion_len());
    cfg.loss_agg_mode = "token-average".into();
    assert!(
        GrpoTrainer::new(model.clone(), cfg, &ad).is_err(),
        "unknown aggregation"
    );
    let mut cfg = GrpoConfig::new(task.max_completion_len());
    cfg.num_generations = 4;
    let mut grpo = GrpoTrainer::new(model, cfg, &ad).unwrap();
    let prompts: Vec<Vec<u32>> = task.train[..1].iter().map(|&p| task.prompt(p)).collect();
    let err = grpo
        .step(&prompts, &mut |_, _| f64::NAN, &mut Rng::new(1))
        .unwrap_err();
    assert!(err.to_string().contains("reward"), "{err}");
}
