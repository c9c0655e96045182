//! DPO and a reward model on preferences with a known ground truth.
//!
//! The task ([`Sorting`]): prompts are five random digits and `=`
//! (`31420=`); the ground truth prefers completions closer to the digits
//! sorted ascending (`01234`): [`Sorting::quality`] is `1 − inversions /
//! max_inversions` for a permutation of the prompt's digits, 0 otherwise.
//! A preference pair `(chosen, rejected)` has the chosen completion strictly
//! better: the sorted answer against a corruption (adjacent swaps, a
//! shuffle, the prompt copied, a digit dropped, replaced or duplicated) or,
//! in the *graded* pairs, two imperfect answers.
//!
//! 1. **SFT**: a short supervised run on sorted demonstrations, so the
//!    policy puts its mass on permutations (≈ 70 % of its greedy answers are
//!    sorted). This model becomes DPO's frozen reference, its log-probs
//!    precomputed once (TRL's `precompute_ref_log_probs`).
//! 2. **DPO** on a fixed set of pairs on training prompts (chosen = sorted):
//!    TRL's `sigmoid` loss from the core through posttrain-burn's fused op,
//!    plus RPO's NLL of the chosen completions (`rpo_alpha = 0.2`; without
//!    it, `--rpo-alpha 0`, the implicit reward still ranks the pairs but the
//!    greedy answers get *worse*: the chosen completions' likelihood falls
//!    with the rejected ones', DPO's likelihood displacement). Reported: the
//!    held-out implicit-reward accuracy — on pairs of prompts never trained
//!    on, the share with `β(log π(c) − log π_ref(c)) > β(log π(r) −
//!    log π_ref(r))` (TRL's `rewards/accuracies`); it starts at 0, where
//!    policy = reference (with the reference-free `--loss-type simpo` or
//!    `orpo` the implicit reward is `β ×` the mean token log-prob, which the
//!    SFT model already ranks well) — and the ground-truth quality of greedy
//!    answers before and after.
//! 3. **Reward model**: a scalar head on the SFT backbone, Bradley–Terry
//!    loss (with centering, and with the ground-truth quality gap as TRL's
//!    `margin` when `--rm-margin`) on graded pairs (half of them with an
//!    imperfect chosen answer); reported: its held-out pairwise accuracy.
//!
//! ```sh
//! cargo run --release --example dpo_preferences                  # ndarray (CPU)
//! cargo run --release --example dpo_preferences -- --loss-type ipo --beta 0.5 --rpo-alpha 0
//! cargo run --release --example dpo_preferences -- --rm-steps 0 --out /tmp/run
//! ```
//!
//! Writes `metrics.jsonl`, `curves.svg` (of the steps run by this process)
//! and checkpoints (resumed when the run is restarted with the same `--out`;
//! `--fresh` starts over) to `target/examples/dpo_preferences/`, and prints
//! as its last line
//! `{"example": "dpo_preferences", "metric": "heldout_implicit_reward_accuracy", "start": …, "end": …, …}`.

use posttrain_trainers::burn::module::Module;
use posttrain_trainers::checkpoint::Checkpoint;
use posttrain_trainers::dpo::{DpoConfig, DpoTrainer, PreferencePair};
use posttrain_trainers::model::{RewardModel, TinyLmConfig};
use posttrain_trainers::report::{Args, RunLog};
use posttrain_trainers::reward::{RewardConfig, RewardTrainer};
use posttrain_trainers::sft::{SftConfig, SftTrainer};
use posttrain_trainers::tasks::Sorting;
use posttrain_trainers::{OptimizerConfig, Rng, TrainError};
use serde_json::json;

fn main() {
    if let Err(e) = run() {
        eprintln!("dpo_preferences: {e}");
        std::process::exit(1);
    }
}

/// Draws `n` pairs from `pool` (with replacement).
fn sample(pool: &[PreferencePair], n: usize, rng: &mut Rng) -> Vec<PreferencePair> {
    (0..n)
        .map(|_| pool[rng.below(pool.len())].clone())
        .collect()
}

fn run() -> Result<(), TrainError> {
    let args = Args::from_env();
    let seed: u64 = args.get("seed", 7)?;
    let digits: usize = args.get("digits", 5)?;
    let sft_steps: usize = args.get("sft-steps", 60)?;
    let dpo_steps: usize = args.get("dpo-steps", 300)?;
    let rm_steps: usize = args.get("rm-steps", 300)?;
    let batch_size: usize = args.get("batch-size", 32)?;
    let train_pairs: usize = args.get("train-pairs", 16384)?;
    let eval_pairs: usize = args.get("eval-pairs", 1024)?;
    let eval_every: usize = args.get("eval-every", 25)?.max(1);
    let rm_margin = args.has("rm-margin");
    let out: String = args.get("out", "target/examples/dpo_preferences".to_string())?;
    if args.has("fresh") {
        let _ = std::fs::remove_dir_all(&out);
    }

    let device = posttrain_burn::device()?;
    device.seed(seed);
    let train_device = device.clone().autodiff();
    let mut task = Sorting::new(
        digits,
        args.get("train-prompts", 4000)?,
        args.get("test-prompts", 1000)?,
        seed,
    )?;
    let mut graded = task.clone();
    task.imperfect_chosen = 0.0; // DPO's pairs: the chosen answer is the sorted one
    let model_cfg = TinyLmConfig::new(
        task.tokenizer.vocab_size(),
        task.prompt_len() + task.max_completion_len(),
    );
    let model = model_cfg.init(&train_device)?;
    let mut rng = Rng::new(seed);
    // The pairs: fixed training sets on training prompts, held-out sets on held-out prompts.
    graded.imperfect_chosen = args.get("imperfect-chosen", graded.imperfect_chosen)?;
    let mut data_rng = Rng::new(seed ^ 0x5EED);
    let train = task.preference_pairs(&task.train, train_pairs, false, &mut data_rng);
    let heldout = task.preference_pairs(&task.test, eval_pairs, false, &mut data_rng);
    let rm_train = graded.preference_pairs(&graded.train, train_pairs, rm_margin, &mut data_rng);
    let rm_heldout = graded.preference_pairs(&graded.test, eval_pairs, rm_margin, &mut data_rng);
    let ckpt = Checkpoint::new(format!("{out}/checkpoint"));
    let mut log = RunLog::new("dpo_preferences", &out, sft_steps as u64)?;
    let mut curves: Vec<&str> = Vec::new();
    eprintln!(
        "dpo_preferences on {:?}: {} parameters; {} train / {} held-out prompts of {digits} digits; \
         {} train / {} held-out pairs each for DPO and the reward model",
        posttrain_burn::selected_backend()?,
        model_cfg.num_params(),
        task.train.len(),
        task.test.len(),
        train.len(),
        heldout.len()
    );

    let state = ckpt.load_state()?.unwrap_or(json!({}));
    let sft_done = state["sft_done"].as_bool().unwrap_or(false);
    let mut dpo_done = state["dpo_steps"].as_u64().unwrap_or(0) as usize;
    let mut rm_done = state["rm_steps"].as_u64().unwrap_or(0) as usize;
    if let Some(saved) = Rng::from_json(&state["rng"]) {
        rng = saved;
    }
    let save_state = |dpo: usize, rm: usize, rng: &Rng| {
        ckpt.save_state(
            &json!({"sft_done": true, "dpo_steps": dpo, "rm_steps": rm, "rng": rng.state()}),
        )
    };

    // 1. A short SFT on sorted demonstrations: the reference policy.
    let mut sft = SftTrainer::new(
        model,
        SftConfig {
            optimizer: OptimizerConfig::adamw(args.get("sft-lr", 3e-3)?),
            batch_size,
        },
        &train_device,
    )?;
    if sft_done {
        sft.load(&ckpt, "sft")?;
    } else {
        log.phase("sft", sft_steps as u64);
        for step in 0..sft_steps {
            let batch = task.demonstration_batch(batch_size, &mut rng);
            let loss = sft.step(&batch)?;
            log.log("sft", step, &[("loss", loss)])?;
            log.bar().set_message(format!("loss {loss:.3}"));
            log.bar().inc(1);
        }
        curves.push("sft/loss");
        sft.save(&ckpt, "sft")?;
        save_state(0, 0, &rng)?;
    }
    let reference = sft.into_model();
    let before = task.evaluate(&reference.valid(), &task.test, &device)?;
    eprintln!(
        "after SFT ({sft_steps} steps), greedy on held-out prompts: quality {:.3}, sorted {:.1} %, permutation {:.1} %",
        before.quality,
        100.0 * before.exact,
        100.0 * before.permutation
    );

    // 2. DPO from the SFT model, which is also the frozen reference.
    let rpo_alpha: f64 = args.get("rpo-alpha", 0.2)?;
    let dpo_cfg = DpoConfig {
        optimizer: OptimizerConfig::adamw(args.get("lr", 1e-3)?),
        batch_size,
        beta: args.get("beta", 0.1)?,
        loss_type: args.get("loss-type", "sigmoid".to_string())?,
        label_smoothing: args.get("label-smoothing", 0.0)?,
        rpo_alpha: (rpo_alpha != 0.0).then_some(rpo_alpha),
        precompute_ref_log_probs: true,
        ..DpoConfig::default()
    };
    let mut dpo = DpoTrainer::new(reference.clone(), dpo_cfg, &train_device)?;
    let start = dpo.implicit_reward_accuracy(&heldout)?;
    if dpo_done > 0 {
        dpo.load(&ckpt, "dpo")?;
    }
    if dpo.reference().is_some() {
        let t = std::time::Instant::now();
        dpo.precompute_reference(&train)?;
        let cached = dpo.precompute_reference(&heldout)?;
        eprintln!(
            "reference log-probs of {cached} sequences precomputed in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    let ran_dpo = dpo_done < dpo_steps;
    log.phase("dpo", dpo_steps as u64);
    log.bar().set_position(dpo_done as u64);
    if dpo_done == 0 {
        log.log("eval", 0, &[("heldout_implicit_reward_accuracy", start)])?;
    }
    let mut next_eval = (dpo_done / eval_every + 1) * eval_every;
    while dpo_done < dpo_steps {
        let batch = sample(&train, batch_size, &mut rng);
        let s = dpo.step(&batch)?;
        dpo_done += 1;
        log.log(
            "dpo",
            dpo_done,
            &[
                ("loss", s.loss),
                ("reward_accuracy", s.reward_accuracy),
                ("reward_margin", s.reward_margin),
                ("reward_chosen", s.reward_chosen),
                ("reward_rejected", s.reward_rejected),
                ("logps_chosen", s.logps_chosen),
            ],
        )?;
        log.bar().set_message(format!(
            "loss {:.3} acc {:.0}% margin {:.2}",
            s.loss,
            100.0 * s.reward_accuracy,
            s.reward_margin
        ));
        log.bar().inc(1);
        if dpo_done == next_eval || dpo_done == dpo_steps {
            next_eval += eval_every;
            let e = dpo.evaluate(&heldout)?;
            log.log(
                "eval",
                dpo_done,
                &[
                    ("heldout_implicit_reward_accuracy", e.accuracy),
                    ("heldout_reward_margin", e.margin),
                ],
            )?;
            dpo.save(&ckpt, "dpo")?;
            save_state(dpo_done, rm_done, &rng)?;
        }
    }
    if ran_dpo {
        curves.extend([
            "dpo/loss",
            "dpo/reward_accuracy",
            "dpo/reward_margin",
            "eval/heldout_implicit_reward_accuracy",
        ]);
    }
    let end = dpo.evaluate(&heldout)?;
    let on_graded = dpo.implicit_reward_accuracy(&rm_heldout)?;
    let after = task.evaluate(&dpo.model().valid(), &task.test, &device)?;
    log.log(
        "final",
        dpo_steps,
        &[
            ("heldout_implicit_reward_accuracy", end.accuracy),
            ("heldout_graded_implicit_reward_accuracy", on_graded),
            ("greedy_quality_before", before.quality),
            ("greedy_quality_after", after.quality),
        ],
    )?;
    eprintln!(
        "after DPO ({dpo_steps} steps, {}{}): held-out implicit-reward accuracy {:.1} % (start {:.1} %), \
         margin {:.3} ({:.1} % on graded pairs); greedy on held-out prompts: quality {:.3} → {:.3}, \
         sorted {:.1} % → {:.1} %, permutation {:.1} % → {:.1} %",
        dpo.config().loss_type,
        dpo.config().rpo_alpha.map_or(String::new(), |a| format!(", rpo_alpha {a}")),
        100.0 * end.accuracy,
        100.0 * start,
        end.margin,
        100.0 * on_graded,
        before.quality,
        after.quality,
        100.0 * before.exact,
        100.0 * after.exact,
        100.0 * before.permutation,
        100.0 * after.permutation
    );

    // 3. A reward model on the SFT backbone, trained on graded pairs.
    if rm_steps > 0 {
        device.seed(seed ^ 0x4E3D); // the head's init, the same whether or not the run resumed
        let rm = RewardModel::new(reference, &train_device);
        let rm_cfg = RewardConfig {
            optimizer: OptimizerConfig::adamw(args.get("rm-lr", 1e-3)?),
            batch_size,
            center_rewards_coefficient: Some(args.get("center-rewards", 0.01)?),
        };
        let mut rm = RewardTrainer::new(rm, rm_cfg, &train_device)?;
        let rm_start = rm.accuracy(&rm_heldout)?;
        if rm_done > 0 {
            rm.load(&ckpt, "rm")?;
        }
        let ran_rm = rm_done < rm_steps;
        log.phase("reward", rm_steps as u64);
        log.bar().set_position(rm_done as u64);
        let mut next_eval = (rm_done / eval_every + 1) * eval_every;
        while rm_done < rm_steps {
            let batch = sample(&rm_train, batch_size, &mut rng);
            let s = rm.step(&batch)?;
            rm_done += 1;
            log.log(
                "rm",
                rm_done,
                &[
                    ("loss", s.loss),
                    ("accuracy", s.accuracy),
                    ("margin", s.margin),
                ],
            )?;
            log.bar()
                .set_message(format!("loss {:.3} acc {:.0}%", s.loss, 100.0 * s.accuracy));
            log.bar().inc(1);
            if rm_done == next_eval || rm_done == rm_steps {
                next_eval += eval_every;
                let acc = rm.accuracy(&rm_heldout)?;
                log.log("eval", rm_done, &[("rm_heldout_accuracy", acc)])?;
                rm.save(&ckpt, "rm")?;
                save_state(dpo_done, rm_done, &rng)?;
            }
        }
        if ran_rm {
            curves.extend(["rm/loss", "eval/rm_heldout_accuracy"]);
        }
        let rm_end = rm.evaluate(&rm_heldout)?;
        eprintln!(
            "reward model ({rm_steps} steps{}): held-out pairwise accuracy {:.1} % (start {:.1} %), loss {:.3}, margin {:.2}",
            if rm_margin { ", with margins" } else { "" },
            100.0 * rm_end.accuracy,
            100.0 * rm_start,
            rm_end.loss,
            rm_end.margin
        );
    }

    if !curves.is_empty() {
        let path = log.plot("curves.svg", &curves)?;
        eprintln!("curves: {}", path.display());
    }
    println!(
        "{}",
        log.finish(
            "heldout_implicit_reward_accuracy",
            start,
            end.accuracy,
            sft_steps + dpo_steps + rm_steps
        )
    );
    Ok(())
}
