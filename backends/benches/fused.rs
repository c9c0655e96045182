//! Fused custom-backward ops vs burn's autodiff graph: forward + backward
//! time and peak memory, measured side by side in one run.
//!
//! ```text
//! cargo bench -p posttrain-burn --features autodiff --bench fused
//! ```
//!
//! For each hot op and shape, one *step* is: make a fresh leaf
//! (`require_grad`) from a pre-built input, run the op on the autodiff device,
//! `backward()`, read the input's gradient, sync the device. Two paths:
//!
//! - `graph`: the plain op of `posttrain_burn` on autodiff tensors, differentiated
//!   by burn's autodiff (every element-wise intermediate recorded);
//! - `fused`: `posttrain_burn::fused`, the plain op evaluated once without autodiff
//!   plus one custom backward node carrying the core's closed-form VJP.
//!
//! Time: the median wall time of `N` steps (after one warm-up step).
//! Memory: a counting global allocator in this binary; "peak" is the maximum
//! number of heap bytes live at any moment during a step minus those live
//! when it started (i.e. the step's own peak heap footprint, all threads);
//! "held" is the heap bytes live after the forward, before `backward()`,
//! above the start — the output plus what the autodiff graph keeps for the
//! backward, i.e. what a real model would carry through the rest of its
//! forward pass. The two paths alternate step by step.
//! The backend is whatever `posttrain_burn::device()` picks (ndarray on CPU in
//! the default build; `POSTTRAIN_BACKEND` overrides it). The last line of the
//! output is JSON with every number and the graph/fused ratios.
//!
//! Environment: `FUSED_BENCH_N` (steps per measurement, default 7; 5 for the
//! logits ops), `FUSED_BENCH_SMALL=1` (small shapes, for a quick check).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use posttrain_burn::kl::kl_loss;
use posttrain_burn::logits::{entropy_from_logits, selective_log_softmax};
use posttrain_burn::policy::policy_loss;
use posttrain_burn::preference::{paired_loss, PairTensors};
use posttrain_burn::{device, fused, to_vec};
use posttrain_core::aggregate::{AggMode, GlobalNorm};
use posttrain_core::kl::KlConfig;
use posttrain_core::logits::Temperature;
use posttrain_core::policy::token::{PolicyLoss, PolicyLossMode, VerlPolicyParams};
use posttrain_core::preference::paired::{FDivergence, LossTerm, PairedConfig, PairedLoss};

// ---------------------------------------------------------------------------
// Counting allocator.
// ---------------------------------------------------------------------------

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call forwards to the system allocator unchanged; the
// counters are side bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

static MID: AtomicUsize = AtomicUsize::new(0);

/// Called by a step between its forward and its backward: records the heap
/// bytes live at that point (the forward's output plus whatever the autodiff
/// graph keeps for the backward).
fn mark_forward_done() {
    MID.store(LIVE.load(Ordering::SeqCst), Ordering::SeqCst);
}

/// One step's measurements.
#[derive(Clone, Copy, Default)]
struct Sample {
    /// Wall time, seconds.
    secs: f64,
    /// Peak heap bytes live during the step, above the start.
    peak: usize,
    /// Heap bytes live after the forward (before `backward()`), above the start.
    held: usize,
}

/// Runs `step` once.
fn measure(step: &mut dyn FnMut()) -> Sample {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    MID.store(base, Ordering::SeqCst);
    let t = Instant::now();
    step();
    let secs = t.elapsed().as_secs_f64();
    Sample {
        secs,
        peak: PEAK.load(Ordering::SeqCst).saturating_sub(base),
        held: MID.load(Ordering::SeqCst).saturating_sub(base),
    }
}

fn median(mut xs: Vec<Sample>) -> Sample {
    let n = xs.len();
    xs.sort_by(|a, b| a.secs.partial_cmp(&b.secs).unwrap());
    let secs = xs[n / 2].secs;
    xs.sort_by_key(|s| s.peak);
    let peak = xs[n / 2].peak;
    xs.sort_by_key(|s| s.held);
    Sample {
        secs,
        peak,
        held: xs[n / 2].held,
    }
}

/// Medians of `n` steps of each path after one warm-up of each; the two
/// paths alternate step by step so that load from other processes hits both
/// alike.
fn bench(n: usize, fused: &mut dyn FnMut(), graph: &mut dyn FnMut()) -> (Sample, Sample) {
    fused();
    graph();
    let (mut f, mut g) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        if i % 2 == 0 {
            f.push(measure(fused));
            g.push(measure(graph));
        } else {
            g.push(measure(graph));
            f.push(measure(fused));
        }
    }
    (median(f), median(g))
}

// ---------------------------------------------------------------------------
// Inputs.
// ---------------------------------------------------------------------------

fn vals(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let u = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            lo + (hi - lo) * u
        })
        .collect()
}

fn t1(v: Vec<f32>, dev: &Device) -> Tensor<1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), dev)
}
fn t2(v: Vec<f32>, s: [usize; 2], dev: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v, s), dev)
}
fn t3(v: Vec<f32>, s: [usize; 3], dev: &Device) -> Tensor<3> {
    Tensor::from_data(TensorData::new(v, s), dev)
}

/// Largest absolute difference between two gradients (a sanity check that
/// both paths computed the same thing).
fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f64 {
    to_vec((a - b).abs().max())[0]
}

struct Row {
    op: &'static str,
    shape: String,
    n: usize,
    fused: Sample,
    graph: Sample,
    max_grad_diff: f64,
}

// ---------------------------------------------------------------------------
// The ops.
// ---------------------------------------------------------------------------

fn policy_row(dev: &Device, b: usize, s: usize, n: usize) -> Row {
    let inner = dev.clone().inner();
    let lp = t2(vals(1, b * s, -3.0, -0.1), [b, s], &inner);
    let old = lp.clone() + t2(vals(2, b * s, -0.3, 0.3), [b, s], &inner);
    let adv = t2(vals(3, b * s, -2.0, 2.0), [b, s], &inner);
    let rf = lp.clone() + t2(vals(4, b * s, -0.3, 0.3), [b, s], &inner);
    // ~10% padding at the end of each row.
    let keep: Vec<bool> = (0..b * s).map(|i| (i % s) < s - s / 10).collect();
    let mask: Tensor<2, Bool> = Tensor::from_data(TensorData::new(keep, [b, s]), &inner);
    let (lp, old, adv, rf) = (lp.autodiff(), old.autodiff(), adv.autodiff(), rf.autodiff());
    let mask = mask.autodiff();
    let loss =
        PolicyLoss::from_verl(PolicyLossMode::Vanilla, &VerlPolicyParams::default()).expect("ppo");
    let kl = KlConfig::parse_verl("low_var_kl").expect("kl");
    let (agg, norm, coef) = (AggMode::TokenMean, GlobalNorm::default(), 0.001);

    let fused_grad = |lp: &Tensor<2>| {
        let x = lp.clone().require_grad();
        let pen = fused::KlPenalty {
            config: kl,
            coef,
            ref_log_prob: rf.clone(),
        };
        let out = fused::policy_loss_with_kl(
            &loss,
            agg,
            &norm,
            x.clone(),
            old.clone(),
            adv.clone(),
            &mask,
            None,
            Some(pen),
        )
        .expect("fused policy loss");
        mark_forward_done();
        let g = out.loss.backward();
        x.grad(&g).expect("grad")
    };
    let graph_grad = |lp: &Tensor<2>| {
        let x = lp.clone().require_grad();
        let pg = policy_loss(
            &loss,
            agg,
            &norm,
            x.clone(),
            old.clone(),
            adv.clone(),
            &mask,
            None,
        )
        .expect("policy loss");
        let k = kl_loss(&kl, agg, &norm, x.clone(), rf.clone(), &mask).expect("kl loss");
        let total = pg.loss + k.value.mul_scalar(coef);
        mark_forward_done();
        let g = total.backward();
        x.grad(&g).expect("grad")
    };
    let diff = max_diff(fused_grad(&lp), graph_grad(&lp));
    let (f, g) = bench(
        n,
        &mut || {
            let _ = fused_grad(&lp);
            dev.sync().expect("sync");
        },
        &mut || {
            let _ = graph_grad(&lp);
            dev.sync().expect("sync");
        },
    );
    Row {
        op: "policy_loss+kl (ppo, token-mean, low_var_kl)",
        shape: format!("[{b}, {s}]"),
        n,
        fused: f,
        graph: g,
        max_grad_diff: diff,
    }
}

fn logits_rows(dev: &Device, b: usize, s: usize, v: usize, n: usize) -> Vec<Row> {
    let inner = dev.clone().inner();
    let z = t3(vals(5, b * s * v, -8.0, 8.0), [b, s, v], &inner).autodiff();
    let ids: Vec<i64> = (0..b * s).map(|i| ((i * 7919) % v) as i64).collect();
    let targets: Tensor<2, Int> = Tensor::from_data(TensorData::new(ids, [b, s]), &inner);
    let cot = t2(vals(6, b * s, -1.0, 1.0), [b, s], &inner).autodiff();
    let temp = Temperature::new(0.9).expect("temperature");
    let shape = format!("[{b}, {s}, {v}]");

    // Backward of `Σ out ⊙ c` (a random cotangent per position).
    let lsm = |fused_path: bool| {
        let x = z.clone().require_grad();
        let out = if fused_path {
            fused::selective_log_softmax(x.clone(), targets.clone(), temp).expect("fused lsm")
        } else {
            selective_log_softmax(x.clone(), targets.clone(), temp, None)
                .expect("lsm")
                .0
        };
        let l = (out * cot.clone()).sum();
        mark_forward_done();
        let g = l.backward();
        x.grad(&g).expect("grad")
    };
    let ent = |fused_path: bool| {
        let x = z.clone().require_grad();
        let out = if fused_path {
            fused::entropy(x.clone()).expect("fused entropy")
        } else {
            entropy_from_logits(x.clone(), None).expect("entropy").0
        };
        let l = (out * cot.clone()).sum();
        mark_forward_done();
        let g = l.backward();
        x.grad(&g).expect("grad")
    };
    let mut rows = Vec::new();
    for (op, f) in [
        (
            "selective_log_softmax (T=0.9)",
            &lsm as &dyn Fn(bool) -> Tensor<3>,
        ),
        ("entropy_from_logits", &ent),
    ] {
        let diff = max_diff(f(true), f(false));
        let (fr, gr) = bench(
            n,
            &mut || {
                let _ = f(true);
                dev.sync().expect("sync");
            },
            &mut || {
                let _ = f(false);
                dev.sync().expect("sync");
            },
        );
        rows.push(Row {
            op,
            shape: shape.clone(),
            n,
            fused: fr,
            graph: gr,
            max_grad_diff: diff,
        });
    }
    rows
}

fn dpo_row(dev: &Device, pairs: usize, n: usize) -> Row {
    let inner = dev.clone().inner();
    let c = t1(vals(7, pairs, -300.0, -50.0), &inner).autodiff();
    let r = t1(vals(8, pairs, -300.0, -50.0), &inner).autodiff();
    let c0 = t1(vals(9, pairs, -300.0, -50.0), &inner).autodiff();
    let r0 = t1(vals(10, pairs, -300.0, -50.0), &inner).autodiff();
    let cfg = PairedConfig::new(0.1, 0.0, true, 0.0, FDivergence::ReverseKl, 0.05).expect("cfg");
    let terms = [LossTerm::new(PairedLoss::Sigmoid)];
    let run = |fused_path: bool| {
        let (x, y) = (c.clone().require_grad(), r.clone().require_grad());
        let batch = PairTensors::new(x.clone(), y.clone()).with_reference(c0.clone(), r0.clone());
        let loss = if fused_path {
            fused::paired_loss(&cfg, &terms, batch)
                .expect("fused dpo")
                .loss
        } else {
            paired_loss(&cfg, &terms, batch).expect("dpo").loss
        };
        mark_forward_done();
        let g = loss.backward();
        let (gx, gy) = (x.grad(&g).expect("grad"), y.grad(&g).expect("grad"));
        Tensor::cat(vec![gx, gy], 0)
    };
    let diff = max_diff(run(true), run(false));
    let (f, g) = bench(
        n,
        &mut || {
            let _ = run(true);
            dev.sync().expect("sync");
        },
        &mut || {
            let _ = run(false);
            dev.sync().expect("sync");
        },
    );
    Row {
        op: "paired_loss (DPO sigmoid, beta=0.1)",
        shape: format!("[{pairs}] pairs"),
        n,
        fused: f,
        graph: g,
        max_grad_diff: diff,
    }
}

fn main() {
    let n: usize = std::env::var("FUSED_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7)
        .max(1);
    let small = std::env::var("FUSED_BENCH_SMALL").is_ok_and(|s| s == "1");
    let dev = device().expect("a burn backend").autodiff();
    let dev_name = format!("{dev:?}").replace('"', "'");
    println!("posttrain-burn fused ops vs autodiff graph");
    println!("device: {dev_name}");
    println!(
        "step = fresh leaf + forward + backward + read grad; time = median of {n} steps (logits ops: {}) after 1 warm-up;",
        n.min(5)
    );
    println!("peak = max heap bytes live during the step minus those live at its start; held = heap bytes live after the forward, before backward(), minus those at the start (counting global allocator, all threads)");
    println!(
        "paths alternate step by step; max abs Δgrad = largest |fused − graph| gradient difference"
    );
    println!();

    let mut rows = Vec::new();
    let policy_shapes: &[[usize; 2]] = if small {
        &[[8, 128]]
    } else {
        &[[64, 1024], [256, 4096]]
    };
    for &[b, s] in policy_shapes {
        rows.push(policy_row(&dev, b, s, n));
    }
    let (lb, ls, lv) = if small {
        (2, 16, 1000)
    } else {
        (8, 512, 32000)
    };
    rows.extend(logits_rows(&dev, lb, ls, lv, n.min(5)));
    rows.push(dpo_row(&dev, if small { 256 } else { 4096 }, n));

    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    let ratio = |g: usize, f: usize| g as f64 / f.max(1) as f64;
    println!(
        "| op | shape | fused ms | graph ms | time graph/fused | fused peak MiB | graph peak MiB | peak graph/fused | fused held MiB | graph held MiB | held graph/fused | max abs Δgrad |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.2}x | {:.2} | {:.2} | {:.2}x | {:.2} | {:.2} | {:.2}x | {:.1e} |",
            r.op,
            r.shape,
            r.fused.secs * 1e3,
            r.graph.secs * 1e3,
            r.graph.secs / r.fused.secs,
            mib(r.fused.peak),
            mib(r.graph.peak),
            ratio(r.graph.peak, r.fused.peak),
            mib(r.fused.held),
            mib(r.graph.held),
            ratio(r.graph.held, r.fused.held),
            r.max_grad_diff
        );
    }
    println!();
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"op\":\"{}\",\"shape\":\"{}\",\"n\":{},\"fused_ms\":{:.4},\"graph_ms\":{:.4},\"time_ratio_graph_over_fused\":{:.4},\"fused_peak_bytes\":{},\"graph_peak_bytes\":{},\"peak_ratio_graph_over_fused\":{:.4},\"fused_held_bytes\":{},\"graph_held_bytes\":{},\"held_ratio_graph_over_fused\":{:.4},\"max_abs_grad_diff\":{:e}}}",
                r.op,
                r.shape,
                r.n,
                r.fused.secs * 1e3,
                r.graph.secs * 1e3,
                r.graph.secs / r.fused.secs,
                r.fused.peak,
                r.graph.peak,
                ratio(r.graph.peak, r.fused.peak),
                r.fused.held,
                r.graph.held,
                ratio(r.graph.held, r.fused.held),
                r.max_grad_diff
            )
        })
        .collect();
    println!(
        "{{\"bench\":\"fused\",\"device\":\"{}\",\"memory\":\"counting global allocator; peak = max heap bytes live during the step above its start, held = heap bytes live after the forward (before backward) above the start\",\"rows\":[{}]}}",
        dev_name,
        items.join(",")
    );
}
