//! Rejection-sampling fine-tuning on verifiable arithmetic: best-of-n by the
//! R1-Zero reward, then SFT on the winners (expert iteration, RFT / RAFT).
//!
//! The task is `grpo_arithmetic`'s: two-digit additions `47+85=` answered
//! with column addition, `<think>7+5=12,4+8+1=13</think><answer>132</answer>`,
//! with a held-out split of problems never trained on.
//!
//! 1. **Cold start.** The 0.1 M-parameter transformer gets a *short* SFT on
//!    demonstrations (150 steps): it learns the template, but many
//!    single-digit facts are still wrong, so only part of the held-out
//!    answers are right.
//! 2. **Rounds of rejection sampling.** Each round draws 64 training prompts,
//!    samples 8 completions of each at temperature 1, scores them with the
//!    rule-based R1-Zero reward (accuracy + 0.2 · format), keeps each
//!    prompt's best completion when it is correct (`--min-reward 1`) and
//!    takes SFT steps on the kept `(prompt, completion + EOS)` pairs (one
//!    epoch, minibatches of 16, learning rate 3e-4: the kept samples are
//!    already likely under the model, their gradients are small, and Adam
//!    turns small gradients into full-size steps — at 3e-3 the model
//!    degrades). No demonstration is used any more: the model only learns
//!    from its own correct samples.
//!
//! Held-out accuracy (greedy decoding) is printed after the cold start, every
//! few rounds and at the end.
//!
//! ```sh
//! cargo run --release --example rejection_sampling
//! cargo run --release --example rejection_sampling -- --num-samples 4 --rounds 10
//! ```
//!
//! Writes `metrics.jsonl`, `curves.svg` and checkpoints (resumed when the run
//! is restarted with the same `--out`; `--fresh` starts over) to
//! `target/examples/rejection_sampling/`, and prints as its last line
//! `{"example": "rejection_sampling", "metric": "heldout_accuracy", "start": …, "end": …, …}`.

use posttrain_trainers::burn::module::Module;
use posttrain_trainers::checkpoint::Checkpoint;
use posttrain_trainers::model::TinyLmConfig;
use posttrain_trainers::rejection::{RejectionSamplingConfig, RejectionSamplingTrainer};
use posttrain_trainers::report::{Args, RunLog};
use posttrain_trainers::sft::{SftConfig, SftTrainer};
use posttrain_trainers::tasks::Arithmetic;
use posttrain_trainers::{OptimizerConfig, Rng, TrainError};
use serde_json::json;

fn main() {
    if let Err(e) = run() {
        eprintln!("rejection_sampling: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), TrainError> {
    let args = Args::from_env();
    let seed: u64 = args.get("seed", 7)?;
    let sft_steps: usize = args.get("sft-steps", 150)?;
    let eval_every: usize = args.get("eval-every", 5)?;
    let out: String = args.get("out", "target/examples/rejection_sampling".to_string())?;
    if args.has("fresh") {
        let _ = std::fs::remove_dir_all(&out);
    }

    let device = posttrain_burn::device()?;
    device.seed(seed);
    let train_device = device.clone().autodiff();
    let task = Arithmetic::new(args.get("max-operand", 99)?, 0.2, seed)?;
    let heldout = &task.test[..task.test.len().min(args.get("eval-size", 300)?)];
    let max_len = task.prompt_len() + task.max_completion_len();
    let mut model_cfg = TinyLmConfig::new(task.tokenizer.vocab_size(), max_len);
    model_cfg.d_model = args.get("d-model", model_cfg.d_model)?;
    model_cfg.d_ff = 4 * model_cfg.d_model;
    let model = model_cfg.init(&train_device)?;
    let mut rng = Rng::new(seed);
    let ckpt = Checkpoint::new(format!("{out}/checkpoint"));
    let mut log = RunLog::new("rejection_sampling", &out, sft_steps as u64)?;
    eprintln!(
        "rejection_sampling on {:?}: {} parameters, {} train / {} held-out problems ({} evaluated)",
        posttrain_burn::selected_backend()?,
        model_cfg.num_params(),
        task.train.len(),
        task.test.len(),
        heldout.len()
    );

    let state = ckpt.load_state()?.unwrap_or(json!({}));
    let done_sft = state["sft_done"].as_bool().unwrap_or(false);
    let mut rounds_done = state["rounds"].as_u64().unwrap_or(0) as usize;
    if let Some(saved) = Rng::from_json(&state["rng"]) {
        rng = saved;
    }

    // 1. Cold start: a short SFT on demonstrations.
    let mut sft = SftTrainer::new(
        model,
        SftConfig {
            optimizer: OptimizerConfig::adamw(args.get("sft-lr", 3e-3)?),
            batch_size: 32,
        },
        &train_device,
    )?;
    if done_sft {
        sft.load(&ckpt, "sft")?;
    } else {
        log.phase("sft", sft_steps as u64);
        for step in 0..sft_steps {
            let batch = task.demonstration_batch(sft.config().batch_size, &mut rng);
            let loss = sft.step(&batch)?;
            log.log("sft", step, &[("loss", loss)])?;
            log.bar().set_message(format!("loss {loss:.3}"));
            log.bar().inc(1);
        }
        sft.save(&ckpt, "sft")?;
    }
    let inner = device.clone();
    let cold_eval = task.evaluate(&sft.model().valid(), heldout, &inner)?;
    let cold_acc = state["cold_start_accuracy"]
        .as_f64()
        .unwrap_or(cold_eval.accuracy);
    eprintln!(
        "cold start (SFT, {sft_steps} steps): held-out accuracy {:.1} %, format {:.1} %",
        100.0 * cold_acc,
        100.0 * cold_eval.format
    );
    let mut rs_sft_steps = state["rs_sft_steps"].as_u64().unwrap_or(0) as usize;
    let save_state = |rounds: usize, rs_sft_steps: usize, rng: &Rng| {
        json!({"sft_done": true, "cold_start_accuracy": cold_acc, "rounds": rounds,
               "rs_sft_steps": rs_sft_steps, "rng": rng.state()})
    };
    if rounds_done == 0 {
        log.log(
            "eval",
            0,
            &[
                ("heldout_accuracy", cold_eval.accuracy),
                ("format", cold_eval.format),
            ],
        )?;
        ckpt.save_state(&save_state(0, 0, &rng))?;
    }

    // 2. Rounds of best-of-n → SFT.
    let mut cfg = RejectionSamplingConfig::new(task.max_completion_len());
    cfg.num_samples = args.get("num-samples", 8)?;
    cfg.prompts_per_round = args.get("prompts-per-round", 64)?;
    cfg.rounds = args.get("rounds", 40)?;
    cfg.min_reward = args.get("min-reward", 1.0)?;
    cfg.num_train_epochs = args.get("epochs", 1)?;
    cfg.sampling.temperature = args.get("temperature", 1.0)?;
    cfg.sft = SftConfig {
        optimizer: OptimizerConfig::adamw(args.get("lr", 3e-4)?),
        batch_size: args.get("batch-size", 16)?,
    };
    let rounds = cfg.rounds;
    let mut rs = RejectionSamplingTrainer::new(sft.into_model(), cfg, &train_device)?;
    if rounds_done > 0 {
        rs.load(&ckpt, "rs")?;
        eprintln!("resumed at round {rounds_done}");
    }
    log.phase("rs", rounds as u64);
    log.bar().set_position(rounds_done as u64);
    while rounds_done < rounds {
        let problems: Vec<_> = (0..rs.config().prompts_per_round)
            .map(|_| task.train[rng.below(task.train.len())])
            .collect();
        let prompts: Vec<Vec<u32>> = problems.iter().map(|&p| task.prompt(p)).collect();
        let (mut accuracy, mut count) = (0.0, 0.0);
        let stats = rs.round(
            &prompts,
            &mut |i, completion| {
                let s = task.score(problems[i], completion);
                accuracy += s.accuracy;
                count += 1.0;
                s.reward
            },
            &mut rng,
        )?;
        rounds_done += 1;
        rs_sft_steps += stats.sft_losses.len();
        log.log(
            "rs",
            rounds_done,
            &[
                ("reward", stats.reward_mean),
                ("best_reward", stats.best_reward_mean),
                ("sample_accuracy", accuracy / count),
                ("kept_fraction", stats.kept_fraction),
                ("sft_loss", stats.sft_loss),
                ("completion_len", stats.completion_len),
            ],
        )?;
        log.bar().set_message(format!(
            "reward {:.2} kept {:.0}% sft {:.3}",
            stats.reward_mean,
            100.0 * stats.kept_fraction,
            stats.sft_loss
        ));
        log.bar().inc(1);
        if rounds_done % eval_every == 0 || rounds_done == rounds {
            let e = task.evaluate(&rs.model().valid(), heldout, &inner)?;
            log.log(
                "eval",
                rounds_done,
                &[("heldout_accuracy", e.accuracy), ("format", e.format)],
            )?;
            log.bar().suspend(|| {
                eprintln!(
                    "round {rounds_done}: held-out accuracy {:.1} %, best-of-{} kept {:.0} %",
                    100.0 * e.accuracy,
                    rs.config().num_samples,
                    100.0 * stats.kept_fraction
                )
            });
            rs.save(&ckpt, "rs")?;
            ckpt.save_state(&save_state(rounds_done, rs_sft_steps, &rng))?;
        }
    }
    log.plot(
        "curves.svg",
        &[
            "sft/loss",
            "rs/reward",
            "rs/kept_fraction",
            "rs/sft_loss",
            "eval/heldout_accuracy",
        ],
    )?;
    let end = task.evaluate(&rs.model().valid(), heldout, &inner)?;
    eprintln!(
        "after rejection sampling ({rounds} rounds): held-out accuracy {:.1} % (cold start {:.1} %), format {:.1} %",
        100.0 * end.accuracy,
        100.0 * cold_acc,
        100.0 * end.format
    );
    println!(
        "{}",
        log.finish(
            "heldout_accuracy",
            cold_acc,
            end.accuracy,
            sft_steps + rs_sft_steps
        )
    );
    Ok(())
}
