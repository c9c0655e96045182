//! Short fixed-seed runs of the preference trainers (DPO family, reward
//! model): the loss must fall, and bad input must give a typed error. Smoke
//! tests — `examples/dpo_preferences.rs` is the proof that they learn.

use posttrain_trainers::burn::tensor::Device;
use posttrain_trainers::dpo::{DpoConfig, DpoTrainer, PreferencePair};
use posttrain_trainers::model::{RewardModel, TinyLm, TinyLmConfig};
use posttrain_trainers::reward::{RewardConfig, RewardTrainer};
use posttrain_trainers::tasks::Sorting;
use posttrain_trainers::{OptimizerConfig, Rng, TrainError};

fn setup(seed: u64) -> (Sorting, TinyLm, Device) {
    let device = posttrain_burn::device().unwrap();
    device.seed(seed);
    let ad = device.autodiff();
    let task = Sorting::new(4, 200, 50, seed).unwrap();
    let mut cfg = TinyLmConfig::new(
        task.tokenizer.vocab_size(),
        task.prompt_len() + task.max_completion_len(),
    );
    cfg.d_model = 32;
    cfg.d_ff = 64;
    let model = cfg.init(&ad).unwrap();
    (task, model, ad)
}

fn pairs(task: &Sorting, n: usize, seed: u64) -> Vec<PreferencePair> {
    task.preference_pairs(&task.train, n, true, &mut Rng::new(seed))
}

fn dpo_config(loss_type: &str) -> DpoConfig {
    DpoConfig {
        optimizer: OptimizerConfig::adamw(3e-3),
        batch_size: 16,
        loss_type: loss_type.into(),
        ..DpoConfig::default()
    }
}

#[test]
fn dpo_loss_falls_and_implicit_rewards_separate() {
    let (task, model, ad) = setup(1);
    let batch = pairs(&task, 16, 2);
    let mut dpo = DpoTrainer::new(model, dpo_config("sigmoid"), &ad).unwrap();
    assert_eq!(
        dpo.implicit_reward_accuracy(&batch).unwrap(),
        0.0,
        "policy = reference"
    );
    let first = dpo.step(&batch).unwrap();
    assert!(
        (first.loss - std::f64::consts::LN_2).abs() < 1e-4,
        "{first:?}"
    );
    assert!(first.reward_margin.abs() < 1e-6);
    let mut last = first;
    for _ in 0..25 {
        last = dpo.step(&batch).unwrap();
    }
    assert!(
        last.loss < 0.8 * first.loss,
        "DPO loss {} -> {}",
        first.loss,
        last.loss
    );
    assert!(
        last.reward_margin > 0.0 && last.reward_accuracy > 0.8,
        "{last:?}"
    );
    let acc = dpo.implicit_reward_accuracy(&batch).unwrap();
    assert!(acc > 0.8, "implicit-reward accuracy {acc}");
    assert_eq!(dpo.steps(), 26);
}

#[test]
fn every_loss_type_runs_and_lowers_its_loss() {
    let types = [
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sigmoid_norm",
        "sigmoid,sft",
        "simpo",
        "orpo",
        "kto",
        "apo_zero_unpaired",
    ];
    for (i, t) in types.into_iter().enumerate() {
        let (task, model, ad) = setup(10 + i as u64);
        let batch = pairs(&task, 8, 3);
        let mut cfg = dpo_config(t);
        if matches!(t, "exo_pair" | "robust") {
            cfg.label_smoothing = 0.1;
        }
        if t == "simpo" {
            cfg.beta = 2.0;
        }
        let mut dpo = DpoTrainer::new(model, cfg, &ad).unwrap();
        let first = dpo.step(&batch).unwrap();
        let mut last = first;
        for _ in 0..10 {
            last = dpo.step(&batch).unwrap();
        }
        assert!(
            first.loss.is_finite() && last.loss < first.loss,
            "{t}: loss {} -> {}",
            first.loss,
            last.loss
        );
    }
}

#[test]
fn precomputed_reference_matches_the_live_one() {
    let (task, model, ad) = setup(4);
    let batch = pairs(&task, 8, 5);
    let held_out = task.preference_pairs(&task.test, 8, false, &mut Rng::new(6));
    let mut cached = dpo_config("sigmoid");
    cached.precompute_ref_log_probs = true;
    let mut a = DpoTrainer::new(model.clone(), dpo_config("sigmoid"), &ad).unwrap();
    let mut b = DpoTrainer::new(model, cached, &ad).unwrap();
    assert_eq!(b.precompute_reference(&held_out).unwrap(), 16);
    assert!(a.precompute_reference(&held_out).is_err());
    for _ in 0..3 {
        let (sa, sb) = (a.step(&batch).unwrap(), b.step(&batch).unwrap());
        assert!((sa.loss - sb.loss).abs() < 1e-5, "{sa:?} vs {sb:?}");
    }
    let (ea, eb) = (
        a.evaluate(&held_out).unwrap(),
        b.evaluate(&held_out).unwrap(),
    );
    assert!((ea.margin - eb.margin).abs() < 1e-5, "{ea:?} vs {eb:?}");
}

#[test]
fn reward_model_loss_falls() {
    let (task, backbone, ad) = setup(7);
    let batch = pairs(&task, 16, 8);
    let rm = RewardModel::new(backbone, &ad);
    let cfg = RewardConfig {
        optimizer: OptimizerConfig::adamw(3e-3),
        batch_size: 16,
        center_rewards_coefficient: Some(0.01),
    };
    let mut trainer = RewardTrainer::new(rm, cfg, &ad).unwrap();
    let first = trainer.step(&batch).unwrap();
    let mut last = first;
    for _ in 0..30 {
        last = trainer.step(&batch).unwrap();
    }
    assert!(
        last.loss < 0.6 * first.loss,
        "reward-model loss {} -> {}",
        first.loss,
        last.loss
    );
    assert!(trainer.accuracy(&batch).unwrap() > 0.9);
    let eval = trainer.evaluate(&batch).unwrap();
    assert!(eval.min_reward <= eval.mean_reward && eval.mean_reward <= eval.max_reward);
    let p = &batch[0];
    let s = trainer.score(&p.prompt, &p.chosen).unwrap();
    // EOS is appended when missing: the stripped completion scores the same.
    let stripped = trainer
        .score(&p.prompt, &p.chosen[..p.chosen.len() - 1])
        .unwrap();
    assert!(s.is_finite() && (s - stripped).abs() < 1e-6);
    let many = trainer
        .scores(&[
            (&p.prompt[..], &p.chosen[..]),
            (&p.prompt[..1], &p.rejected[..]),
        ])
        .unwrap();
    assert_eq!(many.len(), 2);
    assert!((many[0] - s).abs() < 1e-5);
}

#[test]
fn rpo_alpha_is_the_weighted_sft_term() {
    let (task, model, ad) = setup(13);
    let batch = pairs(&task, 8, 4);
    let mut rpo = dpo_config("sigmoid");
    rpo.rpo_alpha = Some(0.3);
    let mut listed = dpo_config("sigmoid,sft");
    listed.loss_weights = vec![1.0, 0.3];
    let mut a = DpoTrainer::new(model.clone(), rpo, &ad).unwrap();
    let mut b = DpoTrainer::new(model, listed, &ad).unwrap();
    for step in 0..3 {
        let (sa, sb) = (a.step(&batch).unwrap(), b.step(&batch).unwrap());
        assert!((sa.loss - sb.loss).abs() < 1e-5, "{sa:?} vs {sb:?}");
        if step == 0 {
            // policy = reference: the DPO term is ln 2, the NLL term adds to it
            assert!(sa.loss > std::f64::consts::LN_2 + 0.1, "{sa:?}");
        }
    }
}

fn is_config<T: std::fmt::Debug>(r: Result<T, TrainError>) -> bool {
    matches!(r, Err(TrainError::Config(_)))
}

#[test]
fn invalid_input_gives_typed_errors() {
    let (task, model, ad) = setup(9);
    let batch = pairs(&task, 4, 1);
    for bad in ["sigmoid_typo", "bco", "sigmoid,orpo"] {
        let r = DpoTrainer::new(model.clone(), dpo_config(bad), &ad);
        assert!(is_config(r), "{bad}");
    }
    let mut weights = dpo_config("sigmoid,sft");
    weights.loss_weights = vec![1.0];
    assert!(is_config(DpoTrainer::new(model.clone(), weights, &ad)));
    let mut kto = dpo_config("kto");
    kto.reference_free = true;
    assert!(is_config(DpoTrainer::new(model.clone(), kto, &ad)));
    for (t, a) in [
        ("orpo", 0.1),
        ("kto", 0.1),
        ("sigmoid", -1.0),
        ("sigmoid", f64::NAN),
    ] {
        let mut c = dpo_config(t);
        c.rpo_alpha = Some(a);
        assert!(
            is_config(DpoTrainer::new(model.clone(), c, &ad)),
            "rpo_alpha {a} with {t}"
        );
    }
    let mut beta = dpo_config("sigmoid");
    beta.beta = 0.0;
    assert!(matches!(
        DpoTrainer::new(model.clone(), beta, &ad),
        Err(TrainError::Core(_))
    ));
    let mut robust = dpo_config("robust");
    robust.label_smoothing = 0.7;
    assert!(matches!(
        DpoTrainer::new(model.clone(), robust, &ad),
        Err(TrainError::Core(_))
    ));

    let mut dpo = DpoTrainer::new(model.clone(), dpo_config("sigmoid"), &ad).unwrap();
    assert!(is_config(dpo.step(&[])));
    let mut mixed = batch.clone();
    mixed[1].prompt.pop(); // a shorter prompt in the batch
    assert!(is_config(dpo.step(&mixed)));
    let mut long = batch.clone();
    long[0].chosen = vec![2; 20]; // beyond max_len
    assert!(is_config(dpo.step(&long)));
    let mut empty = batch.clone();
    empty[2].rejected.clear();
    assert!(is_config(dpo.step(&empty)));
    assert_eq!(dpo.steps(), 0, "no step was taken");

    let mut rm =
        RewardTrainer::new(RewardModel::new(model, &ad), RewardConfig::default(), &ad).unwrap();
    let mut some_margins = batch.clone();
    some_margins[0].margin = None;
    assert!(is_config(rm.step(&some_margins)));
    assert!(is_config(rm.step(&[])));
    assert!(is_config(rm.step(&long)));
    assert!(is_config(rm.scores(&[])));
    let zero = RewardConfig {
        batch_size: 0,
        ..RewardConfig::default()
    };
    let (_, m2, _) = setup(9);
    assert!(is_config(RewardTrainer::new(
        RewardModel::new(m2, &ad),
        zero,
        &ad
    )));
}

#[test]
fn checkpoint_round_trip_keeps_the_reference() {
    let (task, model, ad) = setup(11);
    let batch = pairs(&task, 8, 2);
    let dir = std::env::temp_dir().join(format!("posttrain-dpo-ckpt-{}", std::process::id()));
    let ckpt = posttrain_trainers::checkpoint::Checkpoint::new(&dir);
    let mut dpo = DpoTrainer::new(model.clone(), dpo_config("sigmoid"), &ad).unwrap();
    for _ in 0..3 {
        dpo.step(&batch).unwrap();
    }
    dpo.save(&ckpt, "dpo").unwrap();
    let before = dpo.evaluate(&batch).unwrap();
    let (_, other, _) = setup(12); // different weights: the reference must come from the checkpoint
    let mut resumed = DpoTrainer::new(other, dpo_config("sigmoid"), &ad).unwrap();
    assert!(resumed.load(&ckpt, "dpo").unwrap());
    let after = resumed.evaluate(&batch).unwrap();
    assert!(
        (before.margin - after.margin).abs() < 1e-6,
        "{before:?} vs {after:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
