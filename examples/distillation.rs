//! Distillation on verifiable arithmetic: a small student learns the
//! teacher's next-token distributions (TRL's GKD in miniature).
//!
//! The task is `grpo_arithmetic`'s: two-digit additions `47+85=` answered
//! with column addition, `<think>7+5=12,4+8+1=13</think><answer>132</answer>`,
//! with a held-out split of problems never trained on.
//!
//! 1. **Teacher.** The default 0.1 M-parameter transformer (`d_model` 64)
//!    is trained by SFT on demonstrations until it answers most held-out
//!    problems (saved, and loaded on the next run with the same `--out`).
//! 2. **Student.** A smaller transformer (`d_model` 32, `d_ff` 64: about a
//!    quarter of the parameters) starts from random weights and is trained
//!    only on the teacher's token distributions over the completion tokens:
//!    by default the forward KL(teacher ‖ student) (`--beta 0`) on the
//!    demonstrations' prompts and completions (`--lmbda 0`: supervised KD,
//!    no sampling). `--reverse-kl` (`--beta 1`) or `--jsd` (`--beta 0.5`)
//!    change the divergence, `--lmbda 0.5` makes half of the steps train on
//!    the student's own samples (on-policy GKD), `--seq-kd` on the teacher's,
//!    `--loss-type kd` uses OpenRLHF's KD cross entropy.
//!
//! The loss is posttrain-core's generalized JSD evaluated on `[batch, seq,
//! vocab]` logits by posttrain-burn, whose closed-form gradient with respect
//! to the student logits is passed into the student's autodiff graph.
//! Held-out accuracy (greedy decoding) is printed for the teacher, the
//! student at the start and the student at the end.
//!
//! ```sh
//! cargo run --release --example distillation
//! cargo run --release --example distillation -- --reverse-kl --lmbda 0.5
//! ```
//!
//! Writes `metrics.jsonl`, `curves.svg` and checkpoints (resumed when the run
//! is restarted with the same `--out`; `--fresh` starts over, teacher
//! included) to `target/examples/distillation/`, and prints as its last line
//! `{"example": "distillation", "metric": "student_heldout_accuracy", "start": …, "end": …, …}`.

use posttrain_trainers::burn::module::Module;
use posttrain_trainers::checkpoint::Checkpoint;
use posttrain_trainers::distill::{DistillConfig, DistillTrainer};
use posttrain_trainers::model::TinyLmConfig;
use posttrain_trainers::report::{Args, RunLog};
use posttrain_trainers::sft::{Example, SftConfig, SftTrainer};
use posttrain_trainers::tasks::Arithmetic;
use posttrain_trainers::{OptimizerConfig, Rng, TrainError};
use serde_json::json;

fn main() {
    if let Err(e) = run() {
        eprintln!("distillation: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), TrainError> {
    let args = Args::from_env();
    let seed: u64 = args.get("seed", 7)?;
    let teacher_steps: usize = args.get("teacher-steps", 600)?;
    let steps: usize = args.get("steps", 600)?;
    let eval_every: usize = args.get("eval-every", 100)?;
    let out: String = args.get("out", "target/examples/distillation".to_string())?;
    if args.has("fresh") {
        let _ = std::fs::remove_dir_all(&out);
    }

    let device = posttrain_burn::device()?;
    device.seed(seed);
    let train_device = device.clone().autodiff();
    let task = Arithmetic::new(args.get("max-operand", 99)?, 0.2, seed)?;
    let heldout = &task.test[..task.test.len().min(args.get("eval-size", 300)?)];
    let max_len = task.prompt_len() + task.max_completion_len();
    let mut teacher_cfg = TinyLmConfig::new(task.tokenizer.vocab_size(), max_len);
    teacher_cfg.d_model = args.get("teacher-d-model", teacher_cfg.d_model)?;
    teacher_cfg.d_ff = 4 * teacher_cfg.d_model;
    let mut student_cfg = teacher_cfg;
    student_cfg.d_model = args.get("d-model", 32)?;
    student_cfg.d_ff = args.get("d-ff", 64)?;
    let teacher = teacher_cfg.init(&train_device)?;
    let student = student_cfg.init(&train_device)?;
    let mut rng = Rng::new(seed);
    let ckpt = Checkpoint::new(format!("{out}/checkpoint"));
    let mut log = RunLog::new("distillation", &out, teacher_steps as u64)?;
    eprintln!(
        "distillation on {:?}: teacher {} parameters, student {} parameters, {} train / {} held-out \
         problems ({} evaluated)",
        posttrain_burn::selected_backend()?,
        teacher_cfg.num_params(),
        student_cfg.num_params(),
        task.train.len(),
        task.test.len(),
        heldout.len()
    );
    let demo = |rng: &mut Rng, n: usize| -> Vec<Example> { task.demonstration_batch(n, rng) };

    // 1. The teacher: SFT on demonstrations, or the saved one.
    let mut sft = SftTrainer::new(
        teacher,
        SftConfig {
            optimizer: OptimizerConfig::adamw(args.get("teacher-lr", 3e-3)?),
            batch_size: 32,
        },
        &train_device,
    )?;
    let mut teacher_rng = Rng::new(seed ^ 0x7EAC);
    if sft.load(&ckpt, "teacher")? {
        eprintln!("teacher: loaded from {}", ckpt.dir().display());
    } else {
        log.phase("teacher", teacher_steps as u64);
        for step in 0..teacher_steps {
            let batch = demo(&mut teacher_rng, sft.config().batch_size);
            let loss = sft.step(&batch)?;
            log.log("teacher", step, &[("loss", loss)])?;
            log.bar().set_message(format!("loss {loss:.3}"));
            log.bar().inc(1);
        }
        sft.save(&ckpt, "teacher")?;
    }
    let teacher = sft.into_model().valid();
    let inner = device.clone();
    let teacher_eval = task.evaluate(&teacher, heldout, &inner)?;
    eprintln!(
        "teacher: held-out accuracy {:.1} %, format {:.1} %",
        100.0 * teacher_eval.accuracy,
        100.0 * teacher_eval.format
    );

    // 2. The student, distilled from the teacher.
    let mut cfg = DistillConfig::new(task.max_completion_len());
    cfg.optimizer = OptimizerConfig::adamw(args.get("lr", 3e-3)?);
    cfg.batch_size = args.get("batch-size", 32)?;
    cfg.beta = args.get("beta", 0.0)?;
    if args.has("reverse-kl") {
        cfg.beta = 1.0;
    }
    if args.has("jsd") {
        cfg.beta = 0.5;
    }
    cfg.lmbda = args.get("lmbda", 0.0)?;
    cfg.seq_kd = args.has("seq-kd");
    cfg.temperature = args.get("temperature", 1.0)?;
    cfg.sampling.temperature = args.get("sampling-temperature", cfg.sampling.temperature)?;
    cfg.loss_type = args.get("loss-type", cfg.loss_type.clone())?;
    eprintln!(
        "student: {} (beta = {}, lmbda = {}, seq_kd = {}), lr {}",
        cfg.loss_type, cfg.beta, cfg.lmbda, cfg.seq_kd, cfg.optimizer.learning_rate
    );
    let mut distill = DistillTrainer::new(student, teacher, cfg, &train_device)?;

    let state = ckpt.load_state()?.unwrap_or(json!({}));
    let mut done = state["steps"].as_u64().unwrap_or(0) as usize;
    if let Some(saved) = Rng::from_json(&state["rng"]) {
        rng = saved;
    }
    let start_eval = task.evaluate(&distill.model().valid(), heldout, &inner)?;
    let start_acc = state["student_start_accuracy"]
        .as_f64()
        .unwrap_or(start_eval.accuracy);
    if done > 0 {
        distill.load(&ckpt, "student")?;
        eprintln!("student: resumed at step {done}");
    }
    eprintln!(
        "student start: held-out accuracy {:.1} %, format {:.1} %",
        100.0 * start_acc,
        100.0 * start_eval.format
    );
    log.log(
        "eval",
        done,
        &[
            ("student_heldout_accuracy", start_eval.accuracy),
            ("teacher_heldout_accuracy", teacher_eval.accuracy),
        ],
    )?;
    let save_state = |done: usize, rng: &Rng| json!({"steps": done, "student_start_accuracy": start_acc, "rng": rng.state()});
    log.phase("student", steps as u64);
    log.bar().set_position(done as u64);
    while done < steps {
        let batch = demo(&mut rng, distill.config().batch_size);
        let stats = distill.step(&batch, &mut rng)?;
        done += 1;
        log.log(
            "distill",
            done,
            &[
                ("loss", stats.loss),
                ("divergence", stats.divergence),
                ("on_policy", f64::from(u8::from(stats.on_policy))),
                ("completion_len", stats.completion_len),
            ],
        )?;
        log.bar().set_message(format!(
            "loss {:.4} div {:.4}",
            stats.loss, stats.divergence
        ));
        log.bar().inc(1);
        if done % eval_every == 0 || done == steps {
            let e = task.evaluate(&distill.model().valid(), heldout, &inner)?;
            log.log(
                "eval",
                done,
                &[
                    ("student_heldout_accuracy", e.accuracy),
                    ("student_format", e.format),
                ],
            )?;
            log.bar().suspend(|| {
                eprintln!(
                    "step {done}: student held-out accuracy {:.1} %",
                    100.0 * e.accuracy
                )
            });
            distill.save(&ckpt, "student")?;
            ckpt.save_state(&save_state(done, &rng))?;
        }
    }
    log.plot(
        "curves.svg",
        &[
            "teacher/loss",
            "distill/loss",
            "distill/divergence",
            "eval/student_heldout_accuracy",
        ],
    )?;
    let end = task.evaluate(&distill.model().valid(), heldout, &inner)?;
    eprintln!(
        "held-out accuracy: teacher {:.1} %, student start {:.1} %, student end {:.1} % (format {:.1} %)",
        100.0 * teacher_eval.accuracy,
        100.0 * start_acc,
        100.0 * end.accuracy,
        100.0 * end.format
    );
    println!(
        "{}",
        log.finish("student_heldout_accuracy", start_acc, end.accuracy, steps)
    );
    Ok(())
}
