//! PPO from a learned reward model: the classic RLHF pipeline (InstructGPT,
//! TRL's `PPOTrainer`) on preferences with a known ground truth.
//!
//! The task ([`Sorting`]): prompts are five random digits and `=`
//! (`31420=`); the ground truth prefers completions closer to the digits
//! sorted ascending (`01234`): [`Sorting::quality`] is `1 − inversions /
//! max_inversions` for a permutation of the prompt's digits, 0 otherwise.
//! PPO never sees it: it only reports how much the learned reward is worth.
//!
//! 1. **SFT**: a *short* supervised run (40 steps) on sorted demonstrations,
//!    so the policy writes sorted answers for only about half of the
//!    held-out prompts (the others mostly have a wrong or repeated digit) —
//!    room to improve.
//! 2. **Reward model**: a scalar head on the SFT backbone, Bradley–Terry on
//!    graded preference pairs (half of them with an imperfect chosen answer,
//!    the ground-truth quality gap as TRL's `margin`, centering 0.01);
//!    ≈ 93 % held-out pairwise accuracy after 500 steps.
//! 3. **PPO**: the actor starts from the SFT model, which is also the frozen
//!    reference; the critic is initialised from the reward model (TRL's
//!    default: `value_model` = the reward model's weights). Each step samples
//!    one completion for each of 64 training prompts at temperature 1, scores
//!    it with the reward model (score at the EOS token), subtracts `β·kl_t`
//!    per token (k1: the KL to the SFT reference is *in the reward*), with β
//!    from verl's adaptive controller (start 2.0, horizon 1000) steering the
//!    per-token KL towards `--target-kl` (0.05), runs GAE (γ = 1, λ = 0.95,
//!    whitened advantages) and 4 epochs × 2 mini-batches of the clipped
//!    policy and value losses (separate AdamW for actor and critic).
//!
//! Reported: the reward-model score and the ground-truth quality of the
//! greedy completions of held-out prompts (never trained on) before and
//! after PPO, the per-token KL to the reference against its target, and a
//! few held-out completions. The reward model is imperfect, and PPO finds
//! its blind spots when the KL leash is loose: with `--kl-coef 0.1
//! --kl-horizon 256 --lr 3e-4` the score climbs higher while the KL runs
//! far over the target and the ground-truth quality *falls* — ordered
//! answers with a wrong digit score well (reward hacking, the reason for the
//! KL term).
//!
//! ```sh
//! cargo run --release --example ppo_rlhf                  # ndarray (CPU)
//! cargo run --release --example ppo_rlhf -- --target-kl 0.1 --ppo-steps 100
//! cargo run --release --example ppo_rlhf -- --fixed-kl --kl-coef 0.05 --out /tmp/run
//! ```
//!
//! Writes `metrics.jsonl`, `curves.svg` (of the phases run by this process)
//! and checkpoints (resumed when the run is restarted with the same `--out`;
//! `--fresh` starts over) to `target/examples/ppo_rlhf/`, and prints as its
//! last line
//! `{"example": "ppo_rlhf", "metric": "reward_model_score", "start": …, "end": …, …}`
//! (`start`: held-out greedy score before PPO, `end`: after).

use posttrain_trainers::burn::module::Module;
use posttrain_trainers::burn::tensor::Device;
use posttrain_trainers::checkpoint::Checkpoint;
use posttrain_trainers::generate::{generate, SamplingConfig};
use posttrain_trainers::model::{Policy, RewardModel, TinyLm, TinyLmConfig, ValueModel};
use posttrain_trainers::ppo::{PpoConfig, PpoTrainer};
use posttrain_trainers::report::{Args, RunLog};
use posttrain_trainers::reward::{RewardConfig, RewardTrainer};
use posttrain_trainers::sft::{SftConfig, SftTrainer};
use posttrain_trainers::tasks::{Digits, Sorting};
use posttrain_trainers::{OptimizerConfig, Rng, TrainError};
use serde_json::json;

fn main() {
    if let Err(e) = run() {
        eprintln!("ppo_rlhf: {e}");
        std::process::exit(1);
    }
}

/// Greedy completions of `prompts`, scored by the reward model and the ground truth.
#[derive(Debug, Clone, Copy)]
struct Eval {
    score: f64,
    quality: f64,
    exact: f64,
}

fn evaluate<P: Policy>(
    task: &Sorting,
    policy: &P,
    rm: &RewardTrainer<TinyLm>,
    prompts: &[Digits],
    device: &Device,
) -> Result<Eval, TrainError> {
    let ids: Vec<Vec<u32>> = prompts.iter().map(|d| task.prompt(d)).collect();
    let cfg = SamplingConfig::greedy(task.max_completion_len());
    let r = generate(policy, &ids, &cfg, &mut Rng::new(0), device)?;
    let items: Vec<(&[u32], &[u32])> = (0..r.len())
        .map(|i| (r.prompt(i), r.completion(i)))
        .collect();
    let scores = rm.scores(&items)?;
    let n = prompts.len() as f64;
    let mut quality = 0.0;
    let mut exact = 0.0;
    for (i, d) in prompts.iter().enumerate() {
        let q = task.quality(d, r.completion(i));
        quality += q;
        exact += f64::from(u8::from(q == 1.0 && r.finished[i]));
    }
    Ok(Eval {
        score: scores.iter().sum::<f64>() / n,
        quality: quality / n,
        exact: exact / n,
    })
}

fn run() -> Result<(), TrainError> {
    let args = Args::from_env();
    let seed: u64 = args.get("seed", 7)?;
    let digits: usize = args.get("digits", 5)?;
    let sft_steps: usize = args.get("sft-steps", 40)?;
    let rm_steps: usize = args.get("rm-steps", 500)?;
    let ppo_steps: usize = args.get("ppo-steps", 60)?;
    let batch_size: usize = args.get("batch-size", 32)?;
    let eval_every: usize = args.get("eval-every", 10)?.max(1);
    let eval_size: usize = args.get("eval-size", 256)?;
    let out: String = args.get("out", "target/examples/ppo_rlhf".to_string())?;
    if args.has("fresh") {
        let _ = std::fs::remove_dir_all(&out);
    }

    let device = posttrain_burn::device()?;
    device.seed(seed);
    let train_device = device.clone().autodiff();
    let task = Sorting::new(
        digits,
        args.get("train-prompts", 4000)?,
        args.get("test-prompts", 1000)?,
        seed,
    )?;
    let heldout = &task.test[..task.test.len().min(eval_size)];
    // One position more than prompt + completion: the reward model appends
    // EOS to a completion cut at `max_new_tokens`.
    let model_cfg = TinyLmConfig::new(
        task.tokenizer.vocab_size(),
        task.prompt_len() + task.max_completion_len() + 1,
    );
    let model = model_cfg.init(&train_device)?;
    let mut rng = Rng::new(seed);
    let mut data_rng = Rng::new(seed ^ 0x5EED);
    let rm_train = task.preference_pairs(&task.train, 16384, true, &mut data_rng);
    let rm_heldout = task.preference_pairs(&task.test, 1024, true, &mut data_rng);
    let ckpt = Checkpoint::new(format!("{out}/checkpoint"));
    let mut log = RunLog::new("ppo_rlhf", &out, sft_steps as u64)?;
    let mut curves: Vec<&str> = Vec::new();
    eprintln!(
        "ppo_rlhf on {:?}: {} parameters per model; {} train / {} held-out prompts of {digits} digits ({} evaluated)",
        posttrain_burn::selected_backend()?,
        model_cfg.num_params(),
        task.train.len(),
        task.test.len(),
        heldout.len()
    );

    let state = ckpt.load_state()?.unwrap_or(json!({}));
    let sft_done = state["sft_done"].as_bool().unwrap_or(false);
    let mut rm_done = state["rm_steps"].as_u64().unwrap_or(0) as usize;
    let mut ppo_done = state["ppo_steps"].as_u64().unwrap_or(0) as usize;
    let mut start = state["start"].as_f64();
    if let Some(saved) = Rng::from_json(&state["rng"]) {
        rng = saved;
    }
    let save_state = |rm: usize, ppo: usize, start: Option<f64>, rng: &Rng| {
        ckpt.save_state(&json!({"sft_done": true, "rm_steps": rm, "ppo_steps": ppo, "start": start, "rng": rng.state()}))
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
        save_state(0, 0, None, &rng)?;
    }
    let sft_model = sft.into_model();

    // 2. A reward model on the SFT backbone, trained on graded pairs.
    device.seed(seed ^ 0x4E3D); // the head's init, the same whether or not the run resumed
    let rm = RewardModel::new(sft_model.clone(), &train_device);
    let rm_cfg = RewardConfig {
        optimizer: OptimizerConfig::adamw(args.get("rm-lr", 1e-3)?),
        batch_size,
        center_rewards_coefficient: Some(args.get("center-rewards", 0.01)?),
    };
    let mut rm = RewardTrainer::new(rm, rm_cfg, &train_device)?;
    if rm_done > 0 {
        rm.load(&ckpt, "rm")?;
    }
    if rm_done < rm_steps {
        log.phase("reward", rm_steps as u64);
        log.bar().set_position(rm_done as u64);
        while rm_done < rm_steps {
            let batch: Vec<_> = (0..batch_size)
                .map(|_| rm_train[rng.below(rm_train.len())].clone())
                .collect();
            let s = rm.step(&batch)?;
            rm_done += 1;
            log.log("rm", rm_done, &[("loss", s.loss), ("accuracy", s.accuracy)])?;
            log.bar()
                .set_message(format!("loss {:.3} acc {:.0}%", s.loss, 100.0 * s.accuracy));
            log.bar().inc(1);
            if rm_done % 50 == 0 || rm_done == rm_steps {
                rm.save(&ckpt, "rm")?;
                save_state(rm_done, 0, None, &rng)?;
            }
        }
        curves.push("rm/loss");
    }
    let rm_eval = rm.evaluate(&rm_heldout)?;
    eprintln!(
        "reward model ({rm_steps} steps): held-out pairwise accuracy {:.1} %, margin {:.2}, rewards in [{:.2}, {:.2}]",
        100.0 * rm_eval.accuracy,
        rm_eval.margin,
        rm_eval.min_reward,
        rm_eval.max_reward
    );

    // 3. PPO: actor = SFT (also the reference), critic = the reward model's weights.
    let before = evaluate(&task, &sft_model.valid(), &rm, heldout, &device)?;
    let start = *start.get_or_insert(before.score);
    eprintln!(
        "before PPO (SFT, {sft_steps} steps), greedy on held-out prompts: reward-model score {:.3}, \
         quality {:.3}, sorted {:.1} %",
        before.score,
        before.quality,
        100.0 * before.exact
    );
    let mut cfg = PpoConfig::new(task.max_completion_len());
    cfg.optimizer = OptimizerConfig::adamw(args.get("lr", 1e-4)?);
    cfg.value_optimizer = OptimizerConfig::adamw(args.get("value-lr", 1e-3)?);
    cfg.prompts_per_step = args.get("prompts-per-step", 64)?;
    cfg.num_ppo_epochs = args.get("ppo-epochs", 4)?;
    cfg.num_mini_batches = args.get("mini-batches", 2)?;
    cfg.kl_coef = args.get("kl-coef", 2.0)?;
    cfg.adaptive_kl = !args.has("fixed-kl");
    cfg.target_kl = args.get("target-kl", 0.05)?;
    cfg.kl_horizon = args.get("kl-horizon", 1000.0)?;
    cfg.kl_estimator = args.get("kl-estimator", cfg.kl_estimator.clone())?;
    cfg.sampling.temperature = args.get("temperature", 1.0)?;
    let target_kl = cfg.target_kl;
    let critic = ValueModel {
        backbone: rm.model().backbone.clone(),
        value_head: rm.model().reward_head.clone(),
    };
    let mut ppo = PpoTrainer::new(sft_model, critic, cfg, &train_device)?;
    if ppo_done > 0 {
        ppo.load(&ckpt, "ppo")?;
    }
    save_state(rm_done, ppo_done, Some(start), &rng)?;
    if ppo_done == 0 {
        log.log(
            "eval",
            0,
            &[
                ("reward_model_score", before.score),
                ("quality", before.quality),
            ],
        )?;
    }
    log.phase("ppo", ppo_steps as u64);
    log.bar().set_position(ppo_done as u64);
    let ran_ppo = ppo_done < ppo_steps;
    let mut kls: Vec<f64> = Vec::new();
    while ppo_done < ppo_steps {
        let prompts: Vec<Vec<u32>> = (0..ppo.config().prompts_per_step)
            .map(|_| task.prompt(&task.train[rng.below(task.train.len())]))
            .collect();
        let s = ppo.step(&prompts, &mut |items| rm.scores(items), &mut rng)?;
        ppo_done += 1;
        kls.push(s.kl_per_token);
        log.log(
            "ppo",
            ppo_done,
            &[
                ("score", s.score_mean),
                ("kl_per_token", s.kl_per_token),
                ("kl_per_sequence", s.kl_per_sequence),
                ("kl_coef", s.kl_coef),
                ("rlhf_reward", s.rlhf_reward),
                ("policy_loss", s.policy_loss),
                ("value_loss", s.value_loss),
                ("clipfrac", s.clipfrac),
                ("value_clipfrac", s.value_clipfrac),
                ("return_mean", s.return_mean),
                ("explained_variance", s.explained_variance),
            ],
        )?;
        log.bar().set_message(format!(
            "score {:.2} kl {:.3} β {:.3}",
            s.score_mean, s.kl_per_token, s.kl_coef
        ));
        log.bar().inc(1);
        if ppo_done % eval_every == 0 || ppo_done == ppo_steps {
            let e = evaluate(&task, &ppo.actor().valid(), &rm, heldout, &device)?;
            log.log(
                "eval",
                ppo_done,
                &[("reward_model_score", e.score), ("quality", e.quality)],
            )?;
            eprintln!(
                "  step {ppo_done:>4}: held-out greedy score {:.3}, quality {:.3}; sampled score {:.3}, \
                 KL/token {:.4} (target {target_kl}), β {:.4}",
                e.score, e.quality, s.score_mean, s.kl_per_token, s.kl_coef
            );
            ppo.save(&ckpt, "ppo")?;
            save_state(rm_done, ppo_done, Some(start), &rng)?;
        }
    }
    if ran_ppo {
        curves.extend([
            "ppo/score",
            "eval/reward_model_score",
            "eval/quality",
            "ppo/kl_per_token",
            "ppo/kl_coef",
            "ppo/value_loss",
        ]);
    }
    let after = evaluate(&task, &ppo.actor().valid(), &rm, heldout, &device)?;
    let show: usize = args.get("show", 6)?;
    if show > 0 {
        let d = &heldout[..show.min(heldout.len())];
        let ids: Vec<Vec<u32>> = d.iter().map(|x| task.prompt(x)).collect();
        let g = SamplingConfig::greedy(task.max_completion_len());
        let inner = device.clone();
        let r0 = generate(&ppo.reference().valid(), &ids, &g, &mut Rng::new(0), &inner)?;
        let r1 = generate(&ppo.actor().valid(), &ids, &g, &mut Rng::new(0), &inner)?;
        eprintln!("held-out prompts, greedy: reference (SFT) → PPO [reward-model score, quality]");
        for (i, x) in d.iter().enumerate() {
            let s0 = rm.score(r0.prompt(i), r0.completion(i))?;
            let s1 = rm.score(r1.prompt(i), r1.completion(i))?;
            eprintln!(
                "  {} {:>6} [{s0:+.2}, {:.2}] → {:>6} [{s1:+.2}, {:.2}]",
                task.prompt_text(x),
                task.tokenizer.decode(r0.completion(i)),
                task.quality(x, r0.completion(i)),
                task.tokenizer.decode(r1.completion(i)),
                task.quality(x, r1.completion(i)),
            );
        }
    }
    let mean_kl = kls.iter().sum::<f64>() / kls.len().max(1) as f64;
    let tail = &kls[kls.len().saturating_sub(10)..];
    let tail_kl = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
    let max_kl = kls.iter().copied().fold(f64::NAN, f64::max);
    eprintln!(
        "after PPO ({ppo_steps} steps), greedy on held-out prompts: reward-model score {:.3} → {:.3}, \
         quality {:.3} → {:.3}, sorted {:.1} % → {:.1} %; per-token KL to the reference: mean {:.4}, \
         last 10 steps {:.4}, max {:.4} over the {} steps run here (target {target_kl}: mean {} the target), \
         final β {:.4}",
        start,
        after.score,
        before.quality,
        after.quality,
        100.0 * before.exact,
        100.0 * after.exact,
        mean_kl,
        tail_kl,
        max_kl,
        kls.len(),
        if mean_kl <= target_kl { "under" } else { "OVER" },
        ppo.kl_controller().value()
    );
    log.log(
        "final",
        ppo_steps,
        &[
            ("reward_model_score_before", start),
            ("reward_model_score_after", after.score),
            ("quality_before", before.quality),
            ("quality_after", after.quality),
            ("mean_kl_per_token", mean_kl),
            ("target_kl", target_kl),
        ],
    )?;
    if !curves.is_empty() {
        let path = log.plot("curves.svg", &curves)?;
        eprintln!("curves: {}", path.display());
    }
    println!(
        "{}",
        log.finish(
            "reward_model_score",
            start,
            after.score,
            sft_steps + rm_steps + ppo_steps
        )
    );
    Ok(())
}
