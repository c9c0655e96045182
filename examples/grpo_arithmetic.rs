//! GRPO on verifiable arithmetic, the DeepSeek-R1-Zero recipe in miniature.
//!
//! The task: two-digit additions `47+85=`, answered with column addition as
//! the reasoning, `<think>7+5=12,4+8+1=13</think><answer>132</answer>`;
//! 8000 problems to train on, 2000 held out (500 of them evaluated).
//!
//! 1. **Cold start.** A 0.1 M-parameter transformer gets a *short* SFT on
//!    demonstrations (150 steps): it learns the template perfectly, but many
//!    single-digit facts are still wrong (`5+5=8`), so about a third of the
//!    held-out answers are right.
//! 2. **GRPO alone** (600 steps, learning rate 5e-4 decaying linearly to 0 as
//!    in TRL). For each of 64 training prompts per step it samples a group of
//!    4 completions at temperature 1, scores them with the rule-based R1-Zero
//!    reward (accuracy + 0.2 · format), turns each group's rewards into
//!    z-scores (the advantage), and takes a policy-gradient step on verl's
//!    clipped PPO objective (token-mean). No SFT data is used any more: the
//!    model only learns from which of its own samples were right. Measured
//!    on one core of the 2-core dev VM: 34.0 % → 93.2 % held-out in 252 s
//!    (94.8 % before the burn ndarray fast path changed the summation order).
//!    Many distinct prompts per step matter more than large groups: each
//!    wrong digit fact is rare in any one batch, and it is corrected only
//!    when a sample happens to get it right.
//!
//! Held-out accuracy (problems never trained on, greedy decoding) is
//! printed after each phase, with a few held-out completions at the end.
//! Defaults follow TRL (`beta = 0`: no reference model, `num_iterations = 1`);
//! `--beta 0.02 --num-iterations 2` adds a k3 KL penalty to the cold-start
//! model and a second, clipped update per batch.
//!
//! ```sh
//! cargo run --release --example grpo_arithmetic                 # ndarray (CPU)
//! cargo run --release --example grpo_arithmetic --features wgpu # any GPU
//! cargo run --release --example grpo_arithmetic -- --grpo-steps 50 --out /tmp/run
//! ```
//!
//! Writes `metrics.jsonl`, `curves.svg` and checkpoints (resumed when the run
//! is restarted with the same `--out`; `--fresh` starts over) to
//! `target/examples/grpo_arithmetic/`, and prints as its last line
//! `{"example": "grpo_arithmetic", "metric": "heldout_accuracy", "start": …, "end": …, …}`.

use posttrain_trainers::burn::module::Module;
use posttrain_trainers::checkpoint::Checkpoint;
use posttrain_trainers::generate::{generate, SamplingConfig};
use posttrain_trainers::grpo::{GrpoConfig, GrpoTrainer};
use posttrain_trainers::model::TinyLmConfig;
use posttrain_trainers::report::{Args, RunLog};
use posttrain_trainers::sft::{SftConfig, SftTrainer};
use posttrain_trainers::tasks::Arithmetic;
use posttrain_trainers::{OptimizerConfig, Rng, TrainError};
use serde_json::json;

fn main() {
    if let Err(e) = run() {
        eprintln!("grpo_arithmetic: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), TrainError> {
    let args = Args::from_env();
    let seed: u64 = args.get("seed", 7)?;
    let sft_steps: usize = args.get("sft-steps", 150)?;
    let grpo_steps: usize = args.get("grpo-steps", 600)?;
    let eval_every: usize = args.get("eval-every", 50)?;
    let out: String = args.get("out", "target/examples/grpo_arithmetic".to_string())?;
    if args.has("fresh") {
        let _ = std::fs::remove_dir_all(&out);
    }

    let device = posttrain_burn::device()?;
    device.seed(seed);
    let train_device = device.clone().autodiff();
    let task = Arithmetic::new(99, 0.2, seed)?;
    let heldout = &task.test[..task.test.len().min(args.get("eval-size", 500)?)];
    let mut model_cfg = TinyLmConfig::new(task.tokenizer.vocab_size(), 32);
    model_cfg.d_model = args.get("d-model", model_cfg.d_model)?;
    model_cfg.n_layers = args.get("n-layers", model_cfg.n_layers)?;
    model_cfg.d_ff = 4 * model_cfg.d_model;
    let model = model_cfg.init(&train_device)?;
    let mut rng = Rng::new(seed);
    let ckpt = Checkpoint::new(format!("{out}/checkpoint"));
    let mut log = RunLog::new("grpo_arithmetic", &out, sft_steps as u64)?;
    eprintln!(
        "grpo_arithmetic on {:?}: {} parameters, {} train / {} held-out problems ({} evaluated)",
        posttrain_burn::selected_backend()?,
        model_cfg.num_params(),
        task.train.len(),
        task.test.len(),
        heldout.len()
    );

    let state = ckpt.load_state()?.unwrap_or(json!({}));
    let done_sft = state["sft_done"].as_bool().unwrap_or(false);
    let mut cold = state["cold_start_accuracy"].as_f64();
    let mut grpo_done = state["grpo_steps"].as_u64().unwrap_or(0) as usize;
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
    let cold_acc = *cold.get_or_insert(cold_eval.accuracy);
    eprintln!(
        "cold start (SFT, {sft_steps} steps): held-out accuracy {:.1} %, format {:.1} %",
        100.0 * cold_acc,
        100.0 * cold_eval.format
    );
    log.log(
        "eval",
        0,
        &[
            ("heldout_accuracy", cold_eval.accuracy),
            ("format", cold_eval.format),
        ],
    )?;
    ckpt.save_state(&json!({"sft_done": true, "cold_start_accuracy": cold_acc, "grpo_steps": grpo_done, "rng": rng.state()}))?;

    // 2. GRPO alone from here.
    let mut cfg = GrpoConfig::new(task.max_completion_len());
    cfg.optimizer = OptimizerConfig::adamw(args.get("lr", 5e-4)?);
    cfg.num_generations = args.get("num-generations", 4)?;
    cfg.prompts_per_step = args.get("prompts-per-step", 64)?;
    cfg.beta = args.get("beta", 0.0)?;
    cfg.num_iterations = args.get("num-iterations", 1)?;
    cfg.sampling.temperature = args.get("temperature", 1.0)?;
    cfg.loss_agg_mode = args.get("loss-agg-mode", cfg.loss_agg_mode.clone())?;
    let mut grpo = GrpoTrainer::new(sft.into_model(), cfg, &train_device)?;
    if grpo_done > 0 {
        grpo.load(&ckpt, "grpo")?;
    }
    log.phase("grpo", grpo_steps as u64);
    log.bar().set_position(grpo_done as u64);
    let mut last = cold_eval;
    let peak_lr = grpo.config().optimizer.learning_rate;
    let schedule = args.get("lr-schedule", "linear".to_string())?;
    if schedule != "linear" && schedule != "constant" {
        return Err(TrainError::Config(format!(
            "--lr-schedule {schedule}: expected linear or constant"
        )));
    }
    while grpo_done < grpo_steps {
        // TRL's default schedule: linear decay from the peak to 0 over the run.
        if schedule == "linear" {
            grpo.set_learning_rate(peak_lr * (1.0 - grpo_done as f64 / grpo_steps as f64))?;
        }
        let problems: Vec<_> = (0..grpo.config().prompts_per_step)
            .map(|_| task.train[rng.below(task.train.len())])
            .collect();
        let prompts: Vec<Vec<u32>> = problems.iter().map(|&p| task.prompt(p)).collect();
        let mut accuracy = 0.0;
        let mut count = 0.0;
        let stats = grpo.step(
            &prompts,
            &mut |i, completion| {
                let s = task.score(problems[i], completion);
                accuracy += s.accuracy;
                count += 1.0;
                s.reward
            },
            &mut rng,
        )?;
        grpo_done += 1;
        log.log(
            "grpo",
            grpo_done,
            &[
                ("reward", stats.reward_mean),
                ("train_accuracy", accuracy / count),
                ("loss", stats.loss),
                ("kl", stats.kl),
                ("clipfrac", stats.clipfrac),
                ("groups_kept", stats.groups_kept as f64),
                ("completion_len", stats.completion_len),
                ("generate_seconds", stats.generate_seconds),
                ("learn_seconds", stats.learn_seconds),
            ],
        )?;
        log.bar().set_message(format!(
            "reward {:.2} acc {:.0}% kl {:.3}",
            stats.reward_mean,
            100.0 * accuracy / count,
            stats.kl
        ));
        log.bar().inc(1);
        if grpo_done % eval_every == 0 || grpo_done == grpo_steps {
            last = task.evaluate(&grpo.model().valid(), heldout, &inner)?;
            log.log(
                "eval",
                grpo_done,
                &[("heldout_accuracy", last.accuracy), ("format", last.format)],
            )?;
            grpo.save(&ckpt, "grpo")?;
            ckpt.save_state(&json!({"sft_done": true, "cold_start_accuracy": cold_acc, "grpo_steps": grpo_done, "rng": rng.state()}))?;
        }
    }
    log.plot(
        "curves.svg",
        &[
            "sft/loss",
            "grpo/reward",
            "grpo/train_accuracy",
            "eval/heldout_accuracy",
            "grpo/kl",
            "grpo/clipfrac",
        ],
    )?;
    let final_model = grpo.model().valid();
    let final_eval = task.evaluate(&final_model, heldout, &inner)?;
    // A few held-out completions, to see what the model writes.
    let shown = &heldout[..heldout.len().min(args.get("show", 6)?)];
    let prompts: Vec<Vec<u32>> = shown.iter().map(|&p| task.prompt(p)).collect();
    let greedy = SamplingConfig::greedy(task.max_completion_len());
    let r = if prompts.is_empty() {
        None
    } else {
        Some(generate(
            &final_model,
            &prompts,
            &greedy,
            &mut Rng::new(0),
            &inner,
        )?)
    };
    for (i, &p) in shown.iter().enumerate() {
        let r = r.as_ref().expect("prompts are not empty");
        let text = task.tokenizer.decode(r.completion(i));
        let ok = if task.score(p, r.completion(i)).accuracy == 1.0 {
            "ok "
        } else {
            "bad"
        };
        eprintln!("  {ok} {}{text}", task.prompt_text(p));
    }
    let _ = last;
    eprintln!(
        "after GRPO ({grpo_steps} steps): held-out accuracy {:.1} % (cold start {:.1} %), format {:.1} %",
        100.0 * final_eval.accuracy,
        100.0 * cold_acc,
        100.0 * final_eval.format
    );
    println!(
        "{}",
        log.finish(
            "heldout_accuracy",
            cold_acc,
            final_eval.accuracy,
            sft_steps + grpo_steps
        )
    );
    Ok(())
}
