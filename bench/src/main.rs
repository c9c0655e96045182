//! `posttrain-bench`: posttrain's fused kernels against the peers' own
//! PyTorch functions, measured side by side in one run.
//!
//! ```text
//! cargo run --release -p posttrain-bench -- [--quick] [--threads N] [--python PATH] [--no-peers] [--no-simd | --isa baseline|avx2|avx512] [--gpu | --gpu-ops] [--only W,W]
//! ```
//!
//! For each workload this binary times posttrain (the core's fused kernels on
//! `--threads` threads, and the burn ndarray path where the issue asks for
//! it), then runs `bench/peers.py WORKLOAD` in a Python subprocess — the
//! released `trl` and `verl` functions under torch eager, on the same number
//! of threads — and prints `peer time ÷ our time` (> 1: posttrain is faster).
//! For workloads 1 and 2 it also measures the memory one step takes, ours and
//! the peers' alike: the peak resident set during one more step above the
//! resident set before it (`peak_extra_mb`; `*_peak_mb` in the JSON).
//! It also measures this machine's memory bandwidth with a STREAM-style copy
//! (`copy_from_slice` of a 1 GiB array, counted as read + write bytes, best of
//! 5, all threads) and reports the bandwidth-bound workloads as a fraction of
//! it, counting the bytes the fused kernels must move:
//!
//! | workload | bytes moved per step |
//! |---|---|
//! | logprobs (forward + backward) | logits read twice (forward, backward) + gradient written: 12 B per logit |
//! | token loss (forward + gradient) | `log π`, `log π_old`, `log π_ref`, `A` (4 B each), mask (1 B) read, gradient (4 B) written: 21 B per token |
//!
//! The token loss skips a [`TOKEN_BLOCK`] of a row that holds padding only
//! (it reads the block's mask and writes its zero gradient, 5 B per token), so
//! the bench reports that workload three ways: against the 21 B per token of
//! its tensors (`token_loss_bw_fraction`), against the bytes the kernel does
//! move on the bench's padded rows (`token_loss_touched_bw_fraction`), and on
//! the same inputs with no padding at all (`token_loss_dense_bw_fraction`).
//!
//! Timing: the median of `reps` steps after `warmup` steps (posttrain:
//! warm-up 2, reps 10, 5 for the logits workloads; the peers the same through
//! `peers.py`). The last line is one JSON object with every ratio (see
//! `docs/PERFORMANCE.md`).
//!
//! GPU: `--gpu` (build with `--features tch` and/or `wgpu`) runs workloads
//! 1–2 on the GPU devices compiled in — libtorch (`POSTTRAIN_TCH_DEVICE`,
//! CUDA 0 by default when libtorch sees one) and wgpu — each step ending in
//! `Device::sync`, checks every output against the core, and times the peers
//! with `peers.py --device cuda`; `--gpu-ops` adds a breakdown of the
//! building blocks. The JSON keys are `gpu_<backend>_<workload>_vs_torch`
//! (and `_vs_trl`, `_vs_liger`, `_max_rel_err`). Measured tables:
//! `docs/PERFORMANCE.md`, section GPU.
//!
//! Python: `--python` (default `$POSTTRAIN_BENCH_PYTHON`, else `python3`) must
//! import torch, trl and verl; `.ci/run` builds such a venv. `--no-peers`
//! measures posttrain alone (ratios `null`).

use std::io::BufRead;
use std::process::Command;
use std::time::Instant;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use posttrain_core::advantage::{
    gae_advantages_returns, group_zscore_advantages, GaeConfig, GroupNormConfig,
};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::fused::{parallel, KlPenalty, TokenLoss, TOKEN_BLOCK};
use posttrain_core::kl::{KlConfig, KlEstimator};
use posttrain_core::logits::Temperature;
use posttrain_core::policy::token::{PolicyBatch, PolicyLoss, PolicyLossMode, VerlPolicyParams};
use posttrain_core::preference::paired::{
    paired_loss, LossTerm, PairBatch, PairGrads, PairedConfig, PairedLoss,
};
use posttrain_core::{Dims, Preset};
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

struct Args {
    quick: bool,
    threads: usize,
    python: String,
    peers: bool,
    only: Option<Vec<String>>,
    /// `--gpu`: workloads 1–2 on the GPU backends compiled in (tch CUDA,
    /// wgpu) against the peers on CUDA.
    gpu: bool,
    /// `--gpu-ops`: with `--gpu`, also time the building blocks on each device.
    gpu_ops: bool,
}

fn args() -> Args {
    let mut a = Args {
        quick: false,
        threads: parallel::default_threads(),
        python: std::env::var("POSTTRAIN_BENCH_PYTHON").unwrap_or_else(|_| "python3".into()),
        peers: true,
        only: None,
        gpu: false,
        gpu_ops: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--quick" => a.quick = true,
            "--no-peers" => a.peers = false,
            "--gpu" => a.gpu = true,
            "--gpu-ops" => {
                a.gpu = true;
                a.gpu_ops = true
            }
            // The fused loops on the build's baseline instruction set only (SSE2 on x86-64).
            "--no-simd" => posttrain_core::fused::use_simd_extensions(false),
            // The fused loops on at most this instruction set (baseline, avx2, avx512).
            "--isa" => {
                use posttrain_core::fused::{limit_vector_isa, VectorIsa};
                limit_vector_isa(match it.next().as_deref() {
                    Some("baseline") => VectorIsa::Baseline,
                    Some("avx2") => VectorIsa::Avx2,
                    Some("avx512") => VectorIsa::Avx512,
                    other => {
                        eprintln!("posttrain-bench: --isa baseline|avx2|avx512, not {other:?}");
                        std::process::exit(2);
                    }
                })
            }
            "--threads" => a.threads = it.next().and_then(|v| v.parse().ok()).expect("--threads N"),
            "--python" => a.python = it.next().expect("--python PATH"),
            "--only" => {
                a.only = Some(
                    it.next()
                        .expect("--only W,W")
                        .split(',')
                        .map(String::from)
                        .collect(),
                )
            }
            "-h" | "--help" => {
                println!("usage: posttrain-bench [--quick] [--threads N] [--python PATH] [--no-peers] [--no-simd | --isa baseline|avx2|avx512] [--gpu | --gpu-ops] [--only logprobs,token_loss,advantages,gae,dpo,dpo_logits]");
                std::process::exit(0);
            }
            other => {
                eprintln!("posttrain-bench: unknown argument {other:?} (see --help)");
                std::process::exit(2);
            }
        }
    }
    a
}

// ---------------------------------------------------------------------------
// Timing, inputs, bandwidth
// ---------------------------------------------------------------------------

/// `(median, min)` seconds of `reps` calls after `warmup` calls.
fn time(warmup: usize, reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..warmup {
        f();
    }
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    (t[t.len() / 2], t[0])
}

/// splitmix64 → uniform / normal floats (fixed seeds: every run sees the same inputs).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unif(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unif().max(1e-300), self.unif());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Best-of-5 copy bandwidth in bytes/s (read + write), `threads` threads.
fn copy_bandwidth(threads: usize, bytes: usize) -> f64 {
    let n = bytes / 4;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let per = n.div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        let s = Instant::now();
        std::thread::scope(|sc| {
            for (d, s) in dst.chunks_mut(per).zip(src.chunks(per)) {
                sc.spawn(move || d.copy_from_slice(s));
            }
        });
        best = best.min(s.elapsed().as_secs_f64());
    }
    assert_eq!(dst[n - 1], 1.0);
    2.0 * (n * 4) as f64 / best
}

// ---------------------------------------------------------------------------
// Peers
// ---------------------------------------------------------------------------

/// One line of `peers.py`.
#[derive(Clone, Debug)]
struct PeerTime {
    imp: String,
    median: f64,
    /// `peak_extra_mb` of the peer's line (see [`peak_extra_mb`]).
    peak_mb: Option<f64>,
    line: Value,
}

/// Runs `f` once and measures the memory it takes above what is live before
/// it, in MiB: the process's peak resident set (`VmHWM`, reset through
/// `/proc/self/clear_refs`) minus its resident set before `f`. Linux only
/// (`None` elsewhere). `peers.py` measures the peers the same way (on CUDA,
/// torch's peak allocated bytes instead).
fn peak_extra_mb<R>(f: impl FnOnce() -> R) -> (R, Option<f64>) {
    let vm_kb = |key: &str| -> Option<f64> {
        let s = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = s.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = vm_kb("VmRSS:");
    let r = f();
    let peak = vm_kb("VmHWM:");
    let mb = match (reset, before, peak) {
        (true, Some(b), Some(p)) => Some((p - b).max(0.0) / 1024.0),
        _ => None,
    };
    (r, mb)
}

/// "peak +N MiB" for a row's note (empty when not measured).
fn peak_note(mb: Option<f64>) -> String {
    mb.map_or(String::new(), |m| format!("peak +{m:.0} MiB"))
}

fn run_peers(a: &Args, workload: &str, shape: &[usize]) -> Result<Vec<PeerTime>, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/peers.py");
    let shape_s: Vec<String> = shape.iter().map(|v| v.to_string()).collect();
    let out = Command::new(&a.python)
        .arg(script)
        .arg(workload)
        .args([
            "--shape",
            &shape_s.join(","),
            "--threads",
            &a.threads.to_string(),
            "--device",
            if a.gpu { "cuda" } else { "cpu" },
        ])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", a.python))?;
    let failed = (!out.status.success()).then(|| {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(6).collect();
        format!(
            "peers.py {workload} failed ({}): {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    });
    let mut v = vec![];
    for line in out.stdout.lines() {
        let line = line.map_err(|e| e.to_string())?;
        if let Ok(j) = serde_json::from_str::<Value>(&line) {
            if let Some(e) = j["error"].as_str() {
                eprintln!(
                    "posttrain-bench: peer {} ({workload}): {e}",
                    j["impl"].as_str().unwrap_or("?")
                );
                continue;
            }
            if let (Some(imp), Some(m)) = (j["impl"].as_str(), j["median_s"].as_f64()) {
                v.push(PeerTime {
                    imp: imp.to_string(),
                    median: m,
                    peak_mb: j["peak_extra_mb"].as_f64(),
                    line: j.clone(),
                });
            }
        }
    }
    match failed {
        // Some variants failed (an import, say) but others were timed: keep
        // those, and say what failed (every failed variant prints an `error` line).
        Some(e) if !v.is_empty() => eprintln!("posttrain-bench: {e}"),
        Some(e) => return Err(e),
        None if v.is_empty() => return Err(format!("peers.py {workload} printed no timing")),
        None => {}
    }
    Ok(v)
}

/// The first peer line whose implementation name contains `key`.
fn pick<'a>(peers: &'a [PeerTime], key: &str) -> Option<&'a PeerTime> {
    peers.iter().find(|p| p.imp.contains(key))
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

struct Report {
    rows: Vec<[String; 5]>,
    json: Map<String, Value>,
    peers_used: Map<String, Value>,
    /// The peak memory of the headline peer of the last [`Report::peers`].
    headline_peak_mb: Option<f64>,
}

impl Report {
    fn row(&mut self, workload: &str, shape: &[usize], what: &str, secs: f64, note: String) {
        let shape = format!("{shape:?}");
        self.rows.push([
            workload.into(),
            shape,
            what.into(),
            format!("{:.3} ms", secs * 1e3),
            note,
        ]);
    }
    fn set(&mut self, key: &str, v: Option<f64>) {
        self.json.insert(
            key.into(),
            v.map_or(Value::Null, |x| json!((x * 1000.0).round() / 1000.0)),
        );
    }
    /// Prints the table, the peers' lines (with `POSTTRAIN_BENCH_PEER_LINES`)
    /// and, last, the JSON object.
    fn print(self) {
        let w = [10, 16, 52, 12];
        println!();
        println!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}",
            "workload",
            "shape",
            "implementation",
            "time",
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3]
        );
        for row in &self.rows {
            println!(
                "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {}",
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3]
            );
        }
        if std::env::var_os("POSTTRAIN_BENCH_PEER_LINES").is_some() {
            let peers = Value::Object(self.peers_used);
            println!(
                "{}",
                serde_json::to_string_pretty(&peers).unwrap_or_default()
            );
        }
        println!("{}", Value::Object(self.json));
    }
    /// Adds every peer row of a workload (ratios against `ours`) and returns
    /// the peers' times (none with `--no-peers` or when the peers failed).
    fn peers_all(&mut self, a: &Args, workload: &str, shape: &[usize], ours: f64) -> Vec<PeerTime> {
        if !a.peers {
            return vec![];
        }
        match run_peers(a, workload, shape) {
            Ok(ps) => {
                for p in &ps {
                    self.row(
                        workload,
                        shape,
                        &format!("peer: {}", p.imp),
                        p.median,
                        format!(
                            "ours {:.2}× faster  {}",
                            p.median / ours,
                            peak_note(p.peak_mb)
                        ),
                    );
                    self.peers_used
                        .insert(format!("{workload} {shape:?} {}", p.imp), p.line.clone());
                }
                ps
            }
            Err(e) => {
                eprintln!("posttrain-bench: {e}");
                self.row(workload, shape, "peer: unavailable", f64::NAN, e);
                vec![]
            }
        }
    }
    /// Adds the peer rows of a workload and returns `peer ÷ ours` for the headline peer.
    fn peers(
        &mut self,
        a: &Args,
        workload: &str,
        shape: &[usize],
        ours: f64,
        headline: &str,
    ) -> Option<f64> {
        let ps = self.peers_all(a, workload, shape, ours);
        if ps.is_empty() {
            return None;
        }
        let h = pick(&ps, headline);
        if h.is_none() {
            eprintln!("posttrain-bench: no peer line of {workload} matches {headline:?}");
        }
        self.headline_peak_mb = h.and_then(|p| p.peak_mb);
        h.map(|p| p.median / ours)
    }
}

// ---------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------

/// Workload 1's inputs (seeded) and the core's outputs on them.
struct LogitsCase {
    rows: usize,
    v: usize,
    z: Vec<f32>,
    ids: Vec<i64>,
    c_lp: Vec<f32>,
    c_h: Vec<f32>,
    lp: Vec<f32>,
    h: Vec<f32>,
    lse: Vec<f32>,
    g: Vec<f32>,
}

impl LogitsCase {
    fn new([b, s, v]: [usize; 3]) -> Self {
        let rows = b * s;
        let mut rng = Rng(1);
        let z = (0..rows * v).map(|_| (2.0 * rng.normal()) as f32).collect();
        let ids = (0..rows).map(|_| rng.below(v) as i64).collect();
        let c_lp = (0..rows).map(|_| rng.normal() as f32).collect();
        let c_h = (0..rows).map(|_| rng.normal() as f32).collect();
        let zeros = || vec![0.0f32; rows];
        let (lp, h, lse, g) = (zeros(), zeros(), zeros(), vec![0.0f32; rows * v]);
        LogitsCase {
            rows,
            v,
            z,
            ids,
            c_lp,
            c_h,
            lp,
            h,
            lse,
            g,
        }
    }

    /// The core's fused forward (`lp`, `h`, `lse`) and backward (`g`).
    fn run_core(&mut self, threads: usize) {
        let (rows, v, t) = (self.rows, self.v, Temperature::ONE);
        parallel::log_probs_entropy(
            &self.z,
            rows,
            v,
            t,
            &self.ids,
            &mut self.lp,
            &mut self.h,
            &mut self.lse,
            threads,
        )
        .expect("forward");
        parallel::log_probs_entropy_backward(
            &self.z,
            rows,
            v,
            t,
            &self.ids,
            &self.lse,
            &self.h,
            &self.c_lp,
            Some(&self.c_h),
            &mut self.g,
            threads,
        )
        .expect("backward");
    }
}

/// Workload 1: log-probs of the labels + entropy from logits, forward + backward.
fn logprobs(a: &Args, r: &mut Report, shape: [usize; 3], bw: f64) {
    let mut case = LogitsCase::new(shape);
    let reps = if a.quick { 3 } else { 5 };
    let (ours, _) = time(1, reps, || case.run_core(a.threads));
    // The core writes into the caller's buffers: its step allocates nothing.
    let ((), peak) = peak_extra_mb(|| case.run_core(a.threads));
    let (rows, v) = (case.rows, case.v);
    let bytes = 12.0 * (rows * v) as f64;
    let frac = bytes / ours / bw;
    r.row(
        "logprobs",
        &shape,
        "posttrain fused (core, f32)",
        ours,
        format!(
            "{:.0}% of copy bandwidth  {}",
            100.0 * frac,
            peak_note(peak)
        ),
    );
    r.set("logprobs_bw_fraction", Some(frac));
    r.set("logprobs_peak_mb", peak);
    let dev: Device = posttrain_burn::device().expect("burn device").autodiff();
    let (burn, _, burn_peak) = burn_logprobs(&dev, false, false, &case, shape, reps);
    r.row(
        "logprobs",
        &shape,
        "posttrain-burn fused, ndarray",
        burn,
        peak_note(burn_peak),
    );
    r.set("burn_ndarray_logprobs_peak_mb", burn_peak);
    let vs = r.peers(a, "logprobs", &shape, ours, "torch.F.cross_entropy+");
    r.set("logprobs_torch_peak_mb", r.headline_peak_mb);
    r.set("logprobs_vs_torch", vs);
    r.set(
        "burn_ndarray_logprobs_vs_torch",
        vs.map(|x| x * ours / burn),
    );
    drop(case);
}

/// The burn fused log-probs + entropy step on `dev` (an autodiff device),
/// timed; returns `(median seconds, log π, H, ∂ℓ/∂z)` of the last step.
/// `two_nodes`: the same step from the two single-output fused ops
/// (`selective_log_softmax` and `entropy`, each recomputing the softmax),
/// the composition `log_probs_and_entropy` replaced on the tensor path.
///
/// On ndarray the gradient is read back into host memory (as an optimizer
/// step on the host would); on a GPU device (`on_gpu`) the step ends with
/// `Device::sync` and the gradient stays on the device, as torch's does.
fn burn_logprobs(
    dev: &Device,
    on_gpu: bool,
    two_nodes: bool,
    case: &LogitsCase,
    shape: [usize; 3],
    reps: usize,
) -> (f64, [Vec<f32>; 3], Option<f64>) {
    use posttrain_burn::fused;
    let [b, s, v] = shape;
    let (z, ids, c_lp, c_h) = (&case.z, &case.ids, &case.c_lp, &case.c_h);
    let inner = dev.clone().inner();
    let zt: Tensor<3> =
        Tensor::from_data(TensorData::new(z.to_vec(), [b, s, v]), &inner).autodiff();
    let it: Tensor<2, Int> = Tensor::from_data(TensorData::new(ids.to_vec(), [b, s]), &inner);
    let cl: Tensor<2> =
        Tensor::from_data(TensorData::new(c_lp.to_vec(), [b, s]), &inner).autodiff();
    let ch: Tensor<2> = Tensor::from_data(TensorData::new(c_h.to_vec(), [b, s]), &inner).autodiff();
    let step = || {
        let x = zt.clone().require_grad();
        let (lp, h) = if two_nodes {
            let lp =
                fused::selective_log_softmax(x.clone(), it.clone().autodiff(), Temperature::ONE)
                    .expect("log-probs");
            (lp, fused::entropy(x.clone()).expect("entropy"))
        } else {
            fused::log_probs_and_entropy(x.clone(), it.clone().autodiff(), Temperature::ONE)
                .expect("log-probs and entropy")
        };
        let loss = (lp.clone() * cl.clone()).sum() + (h.clone() * ch.clone()).sum();
        let mut grads = loss.backward();
        // Taken out of the container (as an optimizer step does), the
        // gradient's buffer is read without a copy.
        let gx = x.grad_remove(&mut grads).expect("grad");
        (lp, h, gx)
    };
    let (med, _) = time(1, reps, || {
        let (_, _, gx) = step();
        if on_gpu {
            dev.sync().expect("device sync");
            drop(gx);
        } else {
            let _ = gx.into_data();
        }
    });
    // One more step, measured for memory (host memory: not on a GPU).
    let ((lp, h, gx), peak) = peak_extra_mb(step);
    let peak = peak.filter(|_| !on_gpu);
    let host = |t: Tensor<2>| {
        t.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32")
    };
    let g = gx
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32");
    (med, [host(lp.inner()), host(h.inner()), g], peak)
}

/// `(log π, log π_old, log π_ref, A, mask)` of a `[b, t]` batch.
type TokenInputs = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<bool>);

fn token_inputs(b: usize, t: usize, seed: u64) -> TokenInputs {
    let mut rng = Rng(seed);
    let n = b * t;
    let (mut lp, mut old, mut rf, mut adv, mut mask) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for _ in 0..b {
        let len = t / 4 + rng.below(t - t / 4 + 1);
        let a = rng.normal() as f32;
        for j in 0..t {
            let x = -(2.0 * rng.normal().abs()) as f32;
            lp.push(x);
            old.push(x + (0.3 * (2.0 * rng.unif() - 1.0)) as f32);
            rf.push(x + (0.3 * (2.0 * rng.unif() - 1.0)) as f32);
            adv.push(a);
            mask.push(j < len);
        }
    }
    (lp, old, rf, adv, mask)
}

fn verl_actor_loss() -> TokenLoss {
    let params = VerlPolicyParams {
        clip_ratio_low: Some(0.2),
        clip_ratio_high: Some(0.28),
        ..VerlPolicyParams::default()
    };
    TokenLoss {
        loss: PolicyLoss::from_verl(PolicyLossMode::Vanilla, &params).expect("vanilla"),
        agg: AggMode::SeqMeanTokenMean,
        norm: GlobalNorm::default(),
        kl: Some(KlPenalty {
            estimator: KlConfig::preset(KlEstimator::K3, Preset::Verl),
            coef: 0.001,
        }),
    }
}

/// The bytes the fused token loss moves for `mask` (rows of `t`): 21 per
/// token of a [`TOKEN_BLOCK`] that holds a valid token, 5 (mask, gradient)
/// per token of a block of padding only.
fn touched_bytes(mask: &[bool], t: usize) -> f64 {
    mask.chunks(t)
        .flat_map(|row| row.chunks(TOKEN_BLOCK))
        .map(|blk| {
            let per = if blk.contains(&true) { 21.0 } else { 5.0 };
            per * blk.len() as f64
        })
        .sum()
}

/// The core's fused token loss (verl's actor loss) on `inputs` of shape
/// `[b, t]`: the loss, with `∂loss/∂log π` written into `g`.
fn core_token_loss(
    cfg: &TokenLoss,
    inputs: &TokenInputs,
    [b, t]: [usize; 2],
    g: &mut [f32],
    threads: usize,
) -> f32 {
    let (lp, old, rf, adv, mask) = inputs;
    let batch = PolicyBatch {
        dims: Dims::new(b, t),
        log_prob: lp,
        old_log_prob: old,
        advantages: adv,
        mask,
        is_weights: None,
    };
    parallel::token_loss(cfg, &batch, Some(rf), Some((1.0, g)), threads)
        .expect("token loss")
        .loss
}

/// Workload 2: PPO/GRPO token loss (clip + k3 KL + seq-mean-token-mean), forward + gradient.
fn token_loss(a: &Args, r: &mut Report, shape: [usize; 2], bw: f64, headline: bool) {
    let [b, t] = shape;
    let inputs = token_inputs(b, t, 2);
    let cfg = verl_actor_loss();
    let mut g = vec![0.0f32; b * t];
    let reps = if a.quick { 5 } else { 20 };
    let (ours, _) = time(3, reps, || {
        core_token_loss(&cfg, &inputs, shape, &mut g, a.threads);
    });
    let (_, peak) = peak_extra_mb(|| core_token_loss(&cfg, &inputs, shape, &mut g, a.threads));
    let (lp, old, rf, adv, mask) = &inputs;
    let bytes = 21.0 * (b * t) as f64;
    let frac = bytes / ours / bw;
    // What the kernel does move: a block of padding only is not read
    // (`TOKEN_BLOCK`), only its mask (1 B) and its zero gradient (4 B).
    let touched = touched_bytes(mask, t);
    let touched_frac = touched / ours / bw;
    r.row(
        "token_loss",
        &shape,
        "posttrain fused (core, f32)",
        ours,
        format!(
            "{:.0}% of copy bandwidth ({:.0}% counting the {:.0}% of the bytes it reads and writes)  {}",
            100.0 * frac,
            100.0 * touched_frac,
            100.0 * touched / bytes,
            peak_note(peak)
        ),
    );
    // The same inputs with no padding: every token computed, every byte read.
    let dense_mask = vec![true; b * t];
    let dense = (lp.clone(), old.clone(), rf.clone(), adv.clone(), dense_mask);
    let (ours_dense, _) = time(3, reps, || {
        core_token_loss(&cfg, &dense, shape, &mut g, a.threads);
    });
    let dense_frac = bytes / ours_dense / bw;
    r.row(
        "token_loss",
        &shape,
        "posttrain fused (core, f32), no padding",
        ours_dense,
        format!("{:.0}% of copy bandwidth", 100.0 * dense_frac),
    );
    let dev: Device = posttrain_burn::device().expect("burn device").autodiff();
    let (burn, _, _, burn_peak) = burn_token_loss(&dev, false, lp, old, rf, adv, mask, shape, reps);
    r.row(
        "token_loss",
        &shape,
        "posttrain-burn fused, ndarray",
        burn,
        peak_note(burn_peak),
    );
    let vs = r.peers(a, "token_loss", &shape, ours, "verl");
    if headline {
        r.set("token_loss_peak_mb", peak);
        r.set("burn_ndarray_token_loss_peak_mb", burn_peak);
        r.set("token_loss_torch_peak_mb", r.headline_peak_mb);
        r.set("token_loss_vs_torch", vs);
        r.set("token_loss_bw_fraction", Some(frac));
        r.set("token_loss_touched_bw_fraction", Some(touched_frac));
        r.set("token_loss_dense_bw_fraction", Some(dense_frac));
        r.set(
            "burn_ndarray_token_loss_vs_torch",
            vs.map(|x| x * ours / burn),
        );
    } else {
        let k = format!("token_loss_{b}x{t}");
        r.set(&format!("{k}_vs_torch"), vs);
        r.set(&format!("{k}_bw_fraction"), Some(frac));
        r.set(&format!("{k}_touched_bw_fraction"), Some(touched_frac));
        r.set(&format!("{k}_dense_bw_fraction"), Some(dense_frac));
        r.set(
            &format!("burn_ndarray_{k}_vs_torch"),
            vs.map(|x| x * ours / burn),
        );
    }
}

/// The burn fused token loss (verl's actor loss) on `dev` (an autodiff
/// device), timed; returns `(median seconds, [loss], ∂ℓ/∂log π)` of the last
/// step. Synchronisation as [`burn_logprobs`].
#[allow(clippy::too_many_arguments)]
fn burn_token_loss(
    dev: &Device,
    on_gpu: bool,
    lp: &[f32],
    old: &[f32],
    rf: &[f32],
    adv: &[f32],
    mask: &[bool],
    shape: [usize; 2],
    reps: usize,
) -> (f64, f32, Vec<f32>, Option<f64>) {
    use posttrain_burn::fused;
    let [b, t] = shape;
    let inner = dev.clone().inner();
    let t2 = |v: &[f32]| -> Tensor<2> {
        Tensor::from_data(TensorData::new(v.to_vec(), [b, t]), &inner).autodiff()
    };
    let (x0, o, f, ad) = (t2(lp), t2(old), t2(rf), t2(adv));
    let m: Tensor<2, Bool> = Tensor::from_data(TensorData::new(mask.to_vec(), [b, t]), &inner);
    let m = m.autodiff();
    let cfg = verl_actor_loss();
    let kl = cfg.kl.expect("kl");
    let step = || {
        let x = x0.clone().require_grad();
        let out = fused::policy_loss_with_kl(
            &cfg.loss,
            cfg.agg,
            &cfg.norm,
            x.clone(),
            o.clone(),
            ad.clone(),
            &m,
            None,
            Some(fused::KlPenalty {
                config: kl.estimator,
                coef: kl.coef,
                ref_log_prob: f.clone(),
            }),
        )
        .expect("fused policy loss");
        let mut grads = out.loss.backward();
        let gx = x.grad_remove(&mut grads).expect("grad");
        (out.loss, gx)
    };
    let (med, _) = time(2, reps, || {
        let (_, gx) = step();
        if on_gpu {
            dev.sync().expect("device sync");
            drop(gx);
        } else {
            let _ = gx.into_data();
        }
    });
    // One more step, measured for memory (host memory: not on a GPU).
    let ((loss, gx), peak) = peak_extra_mb(step);
    let peak = peak.filter(|_| !on_gpu);
    let loss = loss
        .inner()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32")[0];
    let g = gx
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32");
    (med, loss, g, peak)
}

/// Workload 3a: GRPO group advantages (verl's outcome advantage: z-score per group, ε = 1e-6).
fn advantages(a: &Args, r: &mut Report, shape: [usize; 2]) {
    let [n, group] = shape;
    let mut rng = Rng(3);
    let scores: Vec<f32> = (0..n)
        .map(|_| if rng.unif() < 0.4 { 1.0 } else { 0.0 })
        .collect();
    let index: Vec<i64> = (0..n).map(|i| (i / group) as i64).collect();
    let cfg = GroupNormConfig::preset(Preset::Verl);
    let mut perm = vec![0usize; n];
    let mut out = vec![0.0f32; n];
    let (ours, _) = time(3, if a.quick { 10 } else { 50 }, || {
        group_zscore_advantages(&cfg, &scores, &index, &mut perm, &mut out).expect("advantages");
    });
    r.row(
        "advantages",
        &shape,
        "posttrain (core, f32)",
        ours,
        String::new(),
    );
    let vs = r.peers(
        a,
        "advantages",
        &[n, group],
        ours,
        "verl.compute_grpo_outcome_advantage",
    );
    r.set("advantages_vs_torch", vs);
}

/// Workload 3b: GAE (verl preset: γ = 1, λ = 0.95, whitened) on `[B, T]`.
fn gae(a: &Args, r: &mut Report, shape: [usize; 2]) {
    let [b, t] = shape;
    let mut rng = Rng(4);
    let mut rewards = vec![0.0f32; b * t];
    let mut values = vec![0.0f32; b * t];
    let mut mask = vec![false; b * t];
    for row in 0..b {
        let len = t / 4 + rng.below(t - t / 4 + 1);
        for j in 0..t {
            values[row * t + j] = rng.normal() as f32;
            mask[row * t + j] = j < len;
        }
        rewards[row * t + len - 1] = if rng.unif() < 0.5 { 1.0 } else { 0.0 };
    }
    let cfg = GaeConfig::preset(Preset::Verl, 1.0, 0.95).expect("gae");
    let (mut adv, mut ret) = (vec![0.0f32; b * t], vec![0.0f32; b * t]);
    let (ours, _) = time(2, if a.quick { 5 } else { 20 }, || {
        gae_advantages_returns(
            &cfg,
            Dims::new(b, t),
            &rewards,
            &values,
            &mask,
            &mut adv,
            &mut ret,
        )
        .expect("gae");
    });
    r.row("gae", &shape, "posttrain (core, f32)", ours, String::new());
    let vs = r.peers(a, "gae", &shape, ours, "verl");
    r.set("gae_vs_torch", vs);
}

/// Workload 4a: DPO (sigmoid, β = 0.1) from sequence log-probs, loss + gradient.
fn dpo(a: &Args, r: &mut Report, n: usize) {
    let mut rng = Rng(5);
    let mut v = || {
        (0..n)
            .map(|_| (-50.0 + 10.0 * rng.normal()) as f32)
            .collect::<Vec<f32>>()
    };
    let (pc, pr, rc, rr) = (v(), v(), v(), v());
    let cfg = PairedConfig::preset(Preset::Trl, 0.1).expect("dpo");
    let terms = [LossTerm::new(PairedLoss::Sigmoid)];
    let (mut gc, mut gr) = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut order = vec![0usize; n];
    let mut batch = PairBatch::new(&pc[..], &pr[..]);
    batch.reference_chosen = Some(&rc);
    batch.reference_rejected = Some(&rr);
    let (ours, _) = time(3, if a.quick { 10 } else { 50 }, || {
        paired_loss(
            &cfg,
            &terms,
            &batch,
            None,
            Some(PairGrads::of_mean(1.0, &mut gc, &mut gr)),
            &mut order,
        )
        .expect("dpo");
    });
    r.row("dpo", &[n], "posttrain (core, f32)", ours, String::new());
    let vs = r.peers(a, "dpo", &[n], ours, "trl.DPOTrainer");
    r.set("dpo_vs_torch", vs);
}

/// Workload 4b: DPO from logits `[2N, T, V]` (chosen rows first): fused
/// log-probs, masked per-sequence sums, the DPO loss, and the gradient back
/// to the logits through the fused backward.
fn dpo_logits(a: &Args, r: &mut Report, shape: [usize; 3]) {
    let [b2, s, v] = shape;
    let (rows, pairs) = (b2 * s, b2 / 2);
    let mut rng = Rng(6);
    let z: Vec<f32> = (0..rows * v).map(|_| (2.0 * rng.normal()) as f32).collect();
    let ids: Vec<i64> = (0..rows).map(|_| rng.below(v) as i64).collect();
    let mask: Vec<bool> = (0..b2)
        .flat_map(|_| {
            let len = s / 2 + rng.below(s / 2 + 1);
            (0..s).map(move |j| j < len)
        })
        .collect();
    let refs: Vec<f32> = (0..b2)
        .map(|_| (-(s as f64) * 2.0 + rng.normal()) as f32)
        .collect();
    let cfg = PairedConfig::preset(Preset::Trl, 0.1).expect("dpo");
    let terms = [LossTerm::new(PairedLoss::Sigmoid)];
    let t = Temperature::ONE;
    let (mut lp, mut h, mut lse) = (vec![0.0f32; rows], vec![0.0f32; rows], vec![0.0f32; rows]);
    let mut g = vec![0.0f32; rows * v];
    let mut seq = vec![0.0f32; b2];
    let (mut gc, mut gr) = (vec![0.0f32; pairs], vec![0.0f32; pairs]);
    let mut order = vec![0usize; pairs];
    let mut d_lp = vec![0.0f32; rows];
    let reps = if a.quick { 3 } else { 5 };
    let (ours, _) = time(1, reps, || {
        parallel::log_probs_entropy(&z, rows, v, t, &ids, &mut lp, &mut h, &mut lse, a.threads)
            .expect("forward");
        for (k, sq) in seq.iter_mut().enumerate() {
            *sq = (k * s..(k + 1) * s)
                .filter(|&i| mask[i])
                .map(|i| lp[i])
                .sum();
        }
        let mut batch = PairBatch::new(&seq[..pairs], &seq[pairs..]);
        batch.reference_chosen = Some(&refs[..pairs]);
        batch.reference_rejected = Some(&refs[pairs..]);
        paired_loss(
            &cfg,
            &terms,
            &batch,
            None,
            Some(PairGrads::of_mean(1.0, &mut gc, &mut gr)),
            &mut order,
        )
        .expect("dpo");
        for k in 0..b2 {
            let gk = if k < pairs { gc[k] } else { gr[k - pairs] };
            for i in k * s..(k + 1) * s {
                d_lp[i] = if mask[i] { gk } else { 0.0 };
            }
        }
        parallel::log_probs_entropy_backward(
            &z, rows, v, t, &ids, &lse, &h, &d_lp, None, &mut g, a.threads,
        )
        .expect("backward");
    });
    r.row(
        "dpo_logits",
        &shape,
        "posttrain fused (core, f32)",
        ours,
        String::new(),
    );
    let vs = r.peers(
        a,
        "dpo_logits",
        &shape,
        ours,
        "trl.selective_log_softmax+masked sum+trl.DPOTrainer",
    );
    r.set("dpo_logits_vs_torch", vs);
}

// ---------------------------------------------------------------------------
// GPU: workloads 1–2 on the burn GPU backends against the peers on CUDA
// ---------------------------------------------------------------------------

/// The GPU devices of the backends compiled in: libtorch (the device
/// `POSTTRAIN_TCH_DEVICE` picks, CUDA 0 when libtorch sees one) and wgpu
/// (its default adapter).
fn gpu_devices() -> Vec<(String, Device)> {
    use posttrain_burn::BackendKind;
    let mut v = vec![];
    for kind in [BackendKind::Tch, BackendKind::Wgpu] {
        if !kind.is_compiled() {
            continue;
        }
        match posttrain_burn::device_for(kind) {
            Ok(d) => v.push((format!("{} {d:?}", kind.name()), d.autodiff())),
            Err(e) => eprintln!("posttrain-bench: no {} device: {e}", kind.name()),
        }
    }
    v
}

/// `--gpu-ops`: the building blocks of workloads 1–2 timed one by one on
/// `dev` (each ends with `Device::sync`), to show where a GPU backend spends
/// its time.
fn gpu_ops(name: &str, dev: &Device) {
    use burn::tensor::activation::log_softmax;
    use posttrain_burn::{fused, logits};
    let inner = dev.clone().inner();
    let (b, s, v) = (8usize, 512usize, 32000usize);
    let mut rng = Rng(5);
    let z: Vec<f32> = (0..b * s * v).map(|_| rng.normal() as f32).collect();
    let ids: Vec<i64> = (0..b * s).map(|_| rng.below(v) as i64).collect();
    let zt: Tensor<3> = Tensor::from_data(TensorData::new(z, [b, s, v]), &inner);
    let it: Tensor<2, Int> = Tensor::from_data(TensorData::new(ids, [b, s]), &inner);
    let c: Tensor<2> = Tensor::ones([b, s], &inner);
    let t = |what: &str, f: &mut dyn FnMut()| {
        f();
        dev.sync().expect("sync");
        let (med, _) = time(1, 5, || {
            f();
            dev.sync().expect("sync");
        });
        println!("gpu-ops {name}: {what:<44} {:>9.3} ms", med * 1e3);
    };
    t("logits [8,512,32000]: exp", &mut || drop(zt.clone().exp()));
    t("logits: log_softmax (burn)", &mut || {
        drop(log_softmax(zt.clone(), 2))
    });
    t("logits: sum_dim(2)", &mut || drop(zt.clone().sum_dim(2)));
    t("logits: selective_log_softmax fwd", &mut || {
        drop(
            logits::selective_log_softmax(zt.clone(), it.clone(), Temperature::ONE, None)
                .expect("op"),
        )
    });
    t("logits: selective_log_softmax fwd + vjp", &mut || {
        drop(
            logits::selective_log_softmax(
                zt.clone(),
                it.clone(),
                Temperature::ONE,
                Some(c.clone()),
            )
            .expect("op"),
        )
    });
    t("logits: entropy fwd", &mut || {
        drop(logits::entropy_from_logits(zt.clone(), None).expect("op"))
    });
    t("logits: entropy fwd + vjp", &mut || {
        drop(logits::entropy_from_logits(zt.clone(), Some(c.clone())).expect("op"))
    });
    let za = zt.clone().autodiff();
    t("logits: fused log_probs_and_entropy fwd", &mut || {
        drop(
            fused::log_probs_and_entropy(za.clone(), it.clone().autodiff(), Temperature::ONE)
                .expect("op"),
        )
    });
    drop((zt, za));
    let (bt, tt) = (256usize, 4096usize);
    let (lp, old, rf, adv, mask) = token_inputs(bt, tt, 2);
    let t2 = |x: &[f32]| -> Tensor<2> {
        Tensor::from_data(TensorData::new(x.to_vec(), [bt, tt]), &inner)
    };
    let (x, o, f, ad) = (t2(&lp), t2(&old), t2(&rf), t2(&adv));
    let m: Tensor<2, Bool> = Tensor::from_data(TensorData::new(mask, [bt, tt]), &inner);
    t("tokens [256,4096]: exp", &mut || drop(x.clone().exp()));
    t("tokens: sum", &mut || drop(x.clone().sum()));
    let cfg = verl_actor_loss();
    let kl = cfg.kl.expect("kl");
    t("tokens: policy_loss_with_kl (no autodiff)", &mut || {
        drop(
            fused::policy_loss_with_kl(
                &cfg.loss,
                cfg.agg,
                &cfg.norm,
                x.clone(),
                o.clone(),
                ad.clone(),
                &m,
                None,
                Some(fused::KlPenalty {
                    config: kl.estimator,
                    coef: kl.coef,
                    ref_log_prob: f.clone(),
                }),
            )
            .expect("op"),
        )
    });
}

/// Largest `|a − b| / max(1, |b|)` over two equally long slices.
fn max_rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs() / (y as f64).abs().max(1.0))
        .fold(0.0, f64::max)
}

/// `--gpu`: workload 1 and 2 on every GPU device, each checked against the
/// core (CPU, f32) and timed against the peers' code on CUDA.
fn gpu_run(a: &Args, r: &mut Report) {
    let devices = gpu_devices();
    if devices.is_empty() {
        eprintln!("posttrain-bench --gpu: no GPU backend compiled in (features tch, wgpu)");
        std::process::exit(2);
    }
    let q = a.quick;
    if a.gpu_ops {
        for (name, dev) in &devices {
            gpu_ops(name.split(' ').next().unwrap_or("gpu"), dev);
        }
    }
    let wanted = |w: &str| a.only.as_ref().is_none_or(|o| o.iter().any(|x| x == w));
    if wanted("logprobs") {
        let shape = if q { [2, 64, 4096] } else { [8, 512, 32000] };
        let mut case = LogitsCase::new(shape);
        case.run_core(a.threads);
        let mut times = vec![];
        for (name, dev) in &devices {
            let reps = if q { 3 } else { 10 };
            let (secs, [glp, gh, gg], _) = burn_logprobs(dev, true, false, &case, shape, reps);
            let err = max_rel_err(&glp, &case.lp)
                .max(max_rel_err(&gh, &case.h))
                .max(max_rel_err(&gg, &case.g));
            r.row(
                "logprobs",
                &shape,
                &format!("posttrain-burn fused, {name}"),
                secs,
                format!("max rel err vs core {err:.1e}"),
            );
            // The same step from the two single-output nodes, side by side.
            let (secs2, _, _) = burn_logprobs(dev, true, true, &case, shape, reps);
            r.row(
                "logprobs",
                &shape,
                &format!("  two nodes (selective_log_softmax + entropy), {name}"),
                secs2,
                format!("one node is {:.2}x faster", secs2 / secs),
            );
            let backend = name.split(' ').next().unwrap_or("gpu");
            r.json.insert(
                format!("gpu_{backend}_logprobs_one_node_vs_two"),
                json!((secs2 / secs * 1000.0).round() / 1000.0),
            );
            times.push((
                name.split(' ').next().unwrap_or("gpu").to_string(),
                secs,
                err,
            ));
        }
        let peers = r.peers_all(a, "logprobs", &shape, times[0].1);
        for (backend, secs, err) in &times {
            for (key, pat) in [
                ("logprobs_vs_torch", "torch.F.cross_entropy+verl"),
                ("logprobs_vs_trl", "trl.selective_log_softmax+trl.entropy"),
                ("logprobs_vs_liger", "liger"),
            ] {
                let vs = peers
                    .iter()
                    .find(|p| p.imp.contains(pat))
                    .map(|p| p.median / secs);
                r.set(&format!("gpu_{backend}_{key}"), vs);
            }
            r.json
                .insert(format!("gpu_{backend}_logprobs_max_rel_err"), json!(err));
        }
    }
    if wanted("token_loss") {
        let cfg = verl_actor_loss();
        for shape in if q {
            [[8, 256], [16, 512]]
        } else {
            [[64, 1024], [256, 4096]]
        } {
            let [b, t] = shape;
            let inputs = token_inputs(b, t, 2);
            let (lp, old, rf, adv, mask) = &inputs;
            let mut g = vec![0.0f32; b * t];
            let loss = core_token_loss(&cfg, &inputs, shape, &mut g, a.threads);
            let mut times = vec![];
            for (name, dev) in &devices {
                let (secs, gl, gg, _) = burn_token_loss(
                    dev,
                    true,
                    lp,
                    old,
                    rf,
                    adv,
                    mask,
                    shape,
                    if q { 5 } else { 50 },
                );
                let err = max_rel_err(&[gl], &[loss]).max(max_rel_err(&gg, &g));
                r.row(
                    "token_loss",
                    &shape,
                    &format!("posttrain-burn fused, {name}"),
                    secs,
                    format!("max rel err vs core {err:.1e}"),
                );
                times.push((
                    name.split(' ').next().unwrap_or("gpu").to_string(),
                    secs,
                    err,
                ));
            }
            let peers = r.peers_all(a, "token_loss", &shape, times[0].1);
            let sfx = if shape == [256, 4096] || (q && shape == [16, 512]) {
                String::new()
            } else {
                format!("_{b}x{t}")
            };
            for (backend, secs, err) in &times {
                let vs = peers
                    .iter()
                    .find(|p| p.imp.contains("verl"))
                    .map(|p| p.median / secs);
                r.set(&format!("gpu_{backend}_token_loss{sfx}_vs_torch"), vs);
                r.json.insert(
                    format!("gpu_{backend}_token_loss{sfx}_max_rel_err"),
                    json!(err),
                );
            }
        }
    }
}

fn main() {
    let a = args();
    let wanted = |w: &str| a.only.as_ref().is_none_or(|o| o.iter().any(|x| x == w));
    let q = a.quick;
    let isa = posttrain_core::fused::vector_isa();
    println!(
        "posttrain-bench: {} threads{}, peers {}, fused loops on {isa:?}",
        a.threads,
        if q { ", quick shapes" } else { "" },
        if a.peers { a.python.as_str() } else { "off" }
    );
    let bw = if a.gpu {
        f64::NAN
    } else {
        copy_bandwidth(a.threads, if q { 64 << 20 } else { 1 << 30 })
    };
    println!(
        "copy bandwidth: {:.1} GB/s (read + write, {} threads)",
        bw / 1e9,
        a.threads
    );
    let mut r = Report {
        rows: vec![],
        json: Map::new(),
        peers_used: Map::new(),
        headline_peak_mb: None,
    };
    r.json.insert("threads".into(), json!(a.threads));
    r.json.insert("isa".into(), json!(format!("{isa:?}")));
    if a.gpu {
        gpu_run(&a, &mut r);
        r.print();
        return;
    }
    r.json
        .insert("copy_gb_per_s".into(), json!((bw / 1e8).round() / 10.0));
    if wanted("logprobs") {
        logprobs(
            &a,
            &mut r,
            if q { [2, 64, 4096] } else { [8, 512, 32000] },
            bw,
        );
    }
    if wanted("token_loss") {
        token_loss(&a, &mut r, if q { [8, 256] } else { [64, 1024] }, bw, false);
        token_loss(
            &a,
            &mut r,
            if q { [16, 512] } else { [256, 4096] },
            bw,
            true,
        );
    }
    if wanted("advantages") {
        advantages(&a, &mut r, if q { [512, 8] } else { [4096, 8] });
    }
    if wanted("gae") {
        gae(&a, &mut r, if q { [16, 128] } else { [256, 1024] });
    }
    if wanted("dpo") {
        dpo(&a, &mut r, if q { 256 } else { 4096 });
    }
    if wanted("dpo_logits") {
        dpo_logits(&a, &mut r, if q { [4, 64, 4096] } else { [8, 512, 32000] });
    }
    r.print();
}
