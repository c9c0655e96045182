//! PPO: a short fixed-seed run on a trivial reward, the epochs fitting a
//! fixed batch, a checkpoint round trip, and typed errors for bad settings.

use posttrain_trainers::burn::module::Module;
use posttrain_trainers::burn::tensor::Device;
use posttrain_trainers::checkpoint::Checkpoint;
use posttrain_trainers::generate::{generate, SamplingConfig};
use posttrain_trainers::model::{TinyLm, TinyLmConfig, ValueModel};
use posttrain_trainers::ppo::{PpoConfig, PpoTrainer};
use posttrain_trainers::tasks::Sorting;
use posttrain_trainers::{OptimizerConfig, Rng, TrainError};

fn setup(seed: u64) -> (Sorting, TinyLm, ValueModel<TinyLm>, Device) {
    let device = posttrain_burn::device().unwrap();
    device.seed(seed);
    let ad = device.autodiff();
    let task = Sorting::new(3, 200, 50, seed).unwrap();
    let mut cfg = TinyLmConfig::new(
        task.tokenizer.vocab_size(),
        task.prompt_len() + task.max_completion_len(),
    );
    cfg.d_model = 32;
    cfg.d_ff = 64;
    let actor = cfg.init(&ad).unwrap();
    let critic = ValueModel::new(cfg.init(&ad).unwrap(), &ad);
    (task, actor, critic, ad)
}

/// A change to a [`PpoConfig`].
type Edit = Box<dyn Fn(&mut PpoConfig)>;

fn config(task: &Sorting) -> PpoConfig {
    let mut cfg = PpoConfig::new(task.max_completion_len());
    cfg.optimizer = OptimizerConfig::adamw(3e-3);
    cfg.value_optimizer = OptimizerConfig::adamw(3e-3);
    cfg.prompts_per_step = 16;
    cfg
}

/// The share of completion tokens that are the digit `7`.
fn sevens(items: &[(&[u32], &[u32])], seven: u32) -> Result<Vec<f64>, TrainError> {
    Ok(items
        .iter()
        .map(|(_, c)| c.iter().filter(|&&t| t == seven).count() as f64 / c.len().max(1) as f64)
        .collect())
}

#[test]
fn epochs_lower_the_policy_and_value_loss_on_a_fixed_batch() {
    let (task, actor, critic, ad) = setup(1);
    let mut cfg = config(&task);
    cfg.num_ppo_epochs = 6;
    let mut ppo = PpoTrainer::new(actor, critic, cfg, &ad).unwrap();
    let prompts: Vec<Vec<u32>> = task.train[..16].iter().map(|d| task.prompt(d)).collect();
    let inner = ad.clone().inner();
    let rollout = generate(
        &ppo.actor().valid(),
        &prompts,
        &SamplingConfig::new(task.max_completion_len()),
        &mut Rng::new(3),
        &inner,
    )
    .unwrap();
    let seven = task.tokenizer.encode("7").unwrap()[0];
    let items: Vec<(&[u32], &[u32])> = (0..rollout.len())
        .map(|i| (rollout.prompt(i), rollout.completion(i)))
        .collect();
    let scores = sevens(&items, seven).unwrap();
    let s = ppo.learn(&rollout, &scores, &mut Rng::new(4)).unwrap();
    let (first, last) = (s.epoch_losses[0], *s.epoch_losses.last().unwrap());
    eprintln!("epoch losses {:?}", s.epoch_losses);
    assert_eq!(s.epoch_losses.len(), 6);
    assert!(
        first.is_finite() && last < first - 0.05,
        "PPO loss over epochs: {:?}",
        s.epoch_losses
    );
    // The first epoch's ratio is 1: nothing clipped, policy loss = −mean(A) = 0 (whitened).
    assert!(
        s.kl_per_token.abs() < 1e-5,
        "policy = reference: KL {}",
        s.kl_per_token
    );
    assert!(s.policy_loss.is_finite() && s.value_loss.is_finite() && s.clipfrac > 0.0);
    assert_eq!(ppo.steps(), 1);
}

#[test]
fn score_rises_on_a_trivial_reward_and_kl_grows_from_zero() {
    let (task, actor, critic, ad) = setup(2);
    let mut cfg = config(&task);
    cfg.kl_coef = 0.01;
    cfg.adaptive_kl = true;
    cfg.target_kl = 0.05;
    cfg.kl_horizon = 200.0;
    cfg.num_mini_batches = 2;
    cfg.missing_eos_penalty = Some(0.5);
    let mut ppo = PpoTrainer::new(actor, critic, cfg, &ad).unwrap();
    let seven = task.tokenizer.encode("7").unwrap()[0];
    let mut rng = Rng::new(5);
    let mut reward = |items: &[(&[u32], &[u32])]| sevens(items, seven);
    let mut history = Vec::new();
    for _ in 0..20 {
        let prompts: Vec<Vec<u32>> = (0..16)
            .map(|_| task.prompt(&task.train[rng.below(task.train.len())]))
            .collect();
        history.push(ppo.step(&prompts, &mut reward, &mut rng).unwrap());
    }
    let mean = |s: &[posttrain_trainers::ppo::PpoStepStats]| {
        s.iter().map(|x| x.score_mean).sum::<f64>() / s.len() as f64
    };
    let (early, late) = (mean(&history[..4]), mean(&history[16..]));
    eprintln!(
        "score {early:.3} -> {late:.3}, kl/token {:.4}, beta {:.4}",
        history[19].kl_per_token,
        ppo.kl_controller().value()
    );
    assert!(late > early + 0.1, "score {early:.3} -> {late:.3}");
    assert!(history[0].kl_per_token.abs() < 1e-5);
    assert!(history[19].kl_per_token > 0.0 && history[19].kl_per_sequence > 0.0);
    // KL above target: the adaptive β grew.
    assert!(
        ppo.kl_controller().value() > 0.01,
        "{:?}",
        ppo.kl_controller()
    );
    assert!(history.iter().all(|s| s.explained_variance.is_finite()));
}

#[test]
fn save_and_load_round_trip() {
    let (task, actor, critic, ad) = setup(3);
    let mut cfg = config(&task);
    cfg.adaptive_kl = true;
    let mut ppo = PpoTrainer::new(actor, critic, cfg.clone(), &ad).unwrap();
    let seven = task.tokenizer.encode("7").unwrap()[0];
    let prompts: Vec<Vec<u32>> = task.train[..16].iter().map(|d| task.prompt(d)).collect();
    let mut reward = |items: &[(&[u32], &[u32])]| sevens(items, seven);
    ppo.step(&prompts, &mut reward, &mut Rng::new(1)).unwrap();
    ppo.step(&prompts, &mut reward, &mut Rng::new(2)).unwrap();
    let dir = std::env::temp_dir().join(format!("posttrain-ppo-test-{}", std::process::id()));
    let ckpt = Checkpoint::new(&dir);
    ppo.save(&ckpt, "ppo").unwrap();
    let (_, actor, critic, _) = setup(3);
    let mut fresh = PpoTrainer::new(actor, critic, cfg, &ad).unwrap();
    assert!(!fresh
        .load(&Checkpoint::new(dir.join("none")), "ppo")
        .unwrap());
    assert!(fresh.load(&ckpt, "ppo").unwrap());
    assert_eq!(fresh.steps(), 2);
    assert_eq!(fresh.kl_controller(), ppo.kl_controller());
    let a = generate(
        &fresh.actor().valid(),
        &prompts,
        &SamplingConfig::greedy(task.max_completion_len()),
        &mut Rng::new(0),
        &ad.clone().inner(),
    )
    .unwrap();
    let b = generate(
        &ppo.actor().valid(),
        &prompts,
        &SamplingConfig::greedy(task.max_completion_len()),
        &mut Rng::new(0),
        &ad.clone().inner(),
    )
    .unwrap();
    assert_eq!(a.sequences, b.sequences);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_settings_and_inputs_are_typed_errors() {
    let (task, actor, critic, ad) = setup(4);
    let base = config(&task);
    let bad: Vec<(&str, Edit)> = vec![
        ("epochs", Box::new(|c| c.num_ppo_epochs = 0)),
        ("mini-batches", Box::new(|c| c.num_mini_batches = 0)),
        ("prompts", Box::new(|c| c.prompts_per_step = 0)),
        ("kl_coef", Box::new(|c| c.kl_coef = -0.1)),
        ("cliprange", Box::new(|c| c.cliprange = 0.0)),
        (
            "cliprange_value",
            Box::new(|c| c.cliprange_value = f64::NAN),
        ),
        ("vf_coef", Box::new(|c| c.vf_coef = -1.0)),
        (
            "penalty",
            Box::new(|c| c.missing_eos_penalty = Some(f64::INFINITY)),
        ),
        ("lr", Box::new(|c| c.value_optimizer.learning_rate = 0.0)),
        ("temperature", Box::new(|c| c.sampling.temperature = -1.0)),
    ];
    for (name, f) in &bad {
        let mut c = base.clone();
        f(&mut c);
        assert!(
            matches!(c.validate(), Err(TrainError::Config(_))),
            "{name}: {:?}",
            c.validate()
        );
    }
    let core: Vec<(&str, Edit)> = vec![
        ("gamma", Box::new(|c| c.gamma = 1.5)),
        ("lam", Box::new(|c| c.lam = -0.1)),
        ("estimator", Box::new(|c| c.kl_estimator = "k9".into())),
        (
            "agg",
            Box::new(|c| c.loss_agg_mode = "mean-of-means".into()),
        ),
        (
            "target",
            Box::new(|c| {
                c.adaptive_kl = true;
                c.target_kl = 0.0
            }),
        ),
        (
            "horizon",
            Box::new(|c| {
                c.adaptive_kl = true;
                c.kl_horizon = f64::INFINITY
            }),
        ),
    ];
    for (name, f) in &core {
        let mut c = base.clone();
        f(&mut c);
        assert!(
            matches!(c.validate(), Err(TrainError::Core(_))),
            "{name}: {:?}",
            c.validate()
        );
    }
    let mut c = base.clone();
    c.gamma = 2.0;
    assert!(PpoTrainer::new(actor.clone(), critic.clone(), c, &ad).is_err());

    let mut c = base.clone();
    c.num_mini_batches = 4;
    let mut ppo = PpoTrainer::new(actor, critic, c, &ad).unwrap();
    let prompts: Vec<Vec<u32>> = task.train[..2].iter().map(|d| task.prompt(d)).collect();
    let rollout = generate(
        &ppo.actor().valid(),
        &prompts,
        &SamplingConfig::new(task.max_completion_len()),
        &mut Rng::new(0),
        &ad.clone().inner(),
    )
    .unwrap();
    let mut rng = Rng::new(0);
    // Fewer rows than mini-batches, a score count that is not the row count, a NaN score.
    assert!(matches!(
        ppo.learn(&rollout, &[0.0, 1.0], &mut rng),
        Err(TrainError::Config(_))
    ));
    assert!(matches!(
        ppo.learn(&rollout, &[0.0], &mut rng),
        Err(TrainError::Config(_))
    ));
    assert!(matches!(
        ppo.learn(&rollout, &[0.0, f64::NAN], &mut rng),
        Err(TrainError::Config(_))
    ));
    // A reward function returning the wrong count, and its own error, reach the caller.
    let mut short = |_: &[(&[u32], &[u32])]| Ok(vec![1.0]);
    assert!(ppo.step(&prompts, &mut short, &mut rng).is_err());
    let mut failing = |_: &[(&[u32], &[u32])]| Err(TrainError::Config("no reward".into()));
    assert!(matches!(
        ppo.step(&prompts, &mut failing, &mut rng),
        Err(TrainError::Config(m)) if m == "no reward"
    ));
    assert!(ppo.step(&[], &mut short, &mut rng).is_err());
    assert_eq!(ppo.steps(), 0);
}
