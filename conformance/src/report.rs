//! The cross-hardware report: every op on seeded random inputs of realistic
//! shapes on every backend.
//!
//! `posttrain-conformance report --backend all --scale full --out PATH`
//! runs every op of the vector files through the same handlers as the
//! golden vectors ([`Backend::run`]), but on *synthesised* cases:
//!
//! * **Templates.** Every non-edge case of an op's vector file is a template
//!   (its parameters, input names, dtypes and ranks); templates with the same
//!   parameters and input names are one *variant*. Every variant runs (at
//!   `full` scale an op with `[batch, seq, vocab]` inputs runs at most
//!   [`Scale::max_variants_3d`] of them, spread over the list).
//! * **Shapes.** Every axis of every input has a role: batch (`B`), sequence
//!   (`T`), vocabulary (`V`), kept (`K`) or group (`G`). Defaults by rank:
//!   `[B]`, `[B, T]`, `[B, T, V]`; [`roles`] lists the per-op overrides. An
//!   axis of size 1 stays 1; every other axis is multiplied by one integer
//!   factor per role, chosen so the op's largest batch/sequence/vocabulary
//!   reach the scale's target ([`Scale::tokens`], [`Scale::logits`]).
//!   Integer factors keep every relation between the template's inputs
//!   (`prompt + completion = sequence`, `2·pairs = rows`, `seq_lens` against
//!   a mask).
//! * **Integer and boolean inputs** (masks, token ids, labels with `-100`,
//!   stop tokens, group ids) come from the template: tiled along batch and
//!   vocabulary axes, stretched (each column repeated) along the sequence
//!   axis, so padding stays a monotone tail, ids stay in range and labels
//!   stay where their placeholder tokens are. Overrides: verl's `index`
//!   (group uids) becomes groups of 8; `seq_lens` and `valid_score_idxs`
//!   are rescaled with the sequence axis.
//! * **Float inputs** are fresh, seeded and *well-conditioned*, chosen by
//!   name ([`float_kind`]): log-probabilities in `[-5, 0]` sharing one base
//!   per shape plus N(0, 0.05) noise (so every ratio is near 1),
//!   advantages / rewards ~ N(0, 1), values sharing a base plus N(0, 0.1),
//!   logits ~ N(0, 2), per-row log-distributions for `*_log_probs` over a
//!   vocabulary, entropies in `[0, 3]`, log-ratios ~ N(0, 0.05). Every float
//!   is rounded to `f32`, so every backend sees the very same inputs.
//! * **Cotangents.** A first `core-f64` run (without VJP) gives every
//!   output's length; scalar cotangents are 1, tensor cotangents seeded
//!   U(-1, 1); the template's gradient list is kept.
//!
//! Each backend runs each case twice: the first run is compared with
//! `core-f64` (max abs error; max relative error `|got − want| /
//! max(|want|, 1e-3)` — the floor [`REL_FLOOR`] keeps outputs that cancel to
//! ~0 from dominating; integer/boolean outputs as a count of flipped
//! elements), the second with the first, bit for bit. Every pair of backends
//! is compared the same way. With the `burn` feature, the first variant of
//! every op also runs on inputs rounded to f16 and bf16
//! ([`posttrain_burn::precision`]).
//!
//! A backend passes an op when its max relative error is at most
//! [`DEFAULT_REL`] (1e-5), nothing flipped and its repeated runs are
//! bitwise identical — or when an entry of [`BOUNDS`] names the op, states a
//! wider bound and explains it. Anything else is a *problem*: the report
//! lists it and the command exits nonzero. Synthesis failures (the
//! reference rejects the generated input) are problems too; an op a
//! backend does not implement is not (it is listed as "not on backend").

use crate::case::{Ctx, Fail, OpResult, Outputs};
use crate::vector::{Case, RawTensor, VectorFile, Vjp};
use crate::Backend;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

/// The relative-error bound every op must meet unless [`BOUNDS`] explains it.
pub const DEFAULT_REL: f64 = 1e-5;

/// The floor of the relative error's denominator: `|got − want| / max(|want|, REL_FLOOR)`.
pub const REL_FLOOR: f64 = 1e-3;

/// A documented exception to [`DEFAULT_REL`].
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The op (exact peer op name).
    pub op: &'static str,
    /// The variants (case-name substring) it applies to (`""` = every variant).
    /// A variant-specific bound keeps those variants' errors apart from the
    /// op's other variants, which stay under the op-level bound.
    pub variant: &'static str,
    /// The backend it applies to (`*` = every f32 backend).
    pub backend: &'static str,
    /// The max element-wise relative error allowed (vs core-f64 and pairwise).
    pub rel: f64,
    /// Flipped integer/boolean output elements allowed (per op, over all variants).
    pub flips: usize,
    /// Why the op cannot meet the default bound on these inputs.
    pub why: &'static str,
}

const KL: &str = "k2/k3/low-var KL of log-ratios r ~ N(0, 0.07): `exp(−r) − 1 + r ≈ r²/2` is formed from terms of size 1, so f32 (ε ≈ 6e-8) leaves an absolute error ~ε — relative ε/r² on the small KL values (and on the metrics built from them). The peers' f32 formula cancels the same way; normwise the error is at f32 rounding.";
const SUM: &str = "sums / means / reverse scans of zero-mean terms (masked sums of N(0,1), GAE and reward-to-go with γ = λ = 1 over up to 1024 steps, baselines subtracted from returns) cancel to values far below the terms; f32 accumulation leaves ~ε·Σ|xᵢ| absolute, large relative to a cancelled element, small normwise.";
const NORM: &str = "normalisation `(x − mean) / std` (whitening, group z-scores, leave-one-out baselines): elements near the mean cancel, so the f32 error of the mean (~ε·|x|) is relative to a small difference; normwise at f32 rounding.";
const SOFTMAX: &str = "softmax gradients and divergences: `p·(log p + H)`, `softmax(z) − onehot` and JSD/KL between a policy and a teacher/reference whose logits are close (they share a base) cancel — a divergence of ~1e-3 is formed from O(1) log-probabilities; f32 keeps ~ε·|log p| absolute.";
const LOGRATIO: &str = "sequence log-ratios: DPO/KTO/CPO/ORPO rewards and margins are β·(Σ policy − Σ reference) over sequences of ~−8 nats per token that agree to ~1 nat; each f32 sum carries ~ε·8T absolute error, which is large relative to the small difference.";
const ROLLOUT: &str = "rollout-correction metrics (log-PPL differences, χ², k3 minima/means) are differences and means of near-equal quantities (log-ratios ~ N(0, 0.05)) — see the KL and sum entries.";

const fn bv(op: &'static str, variant: &'static str, rel: f64, why: &'static str) -> Bound {
    Bound {
        op,
        variant,
        backend: "*",
        rel,
        flips: 0,
        why,
    }
}

const SELECT: &str = "clip_cov / kl_cov pick the tokens to clip or penalise by ranking per-token covariances (top-k / a random draw within a covariance band); over 64×1024 tokens some covariances agree to f32 rounding, so f32 and f64 can pick a different token and detach a different gradient entry (an O(1) difference at one element). Not an accuracy bound: a discrete, data-dependent selection.";
const VOCAB: &str = "long f32 reductions: Σₖ pₖ² over a 32000-token vocabulary row, and pf-PPO's weights normalised by a sum over 64×1024 scores, accumulate ~√n·ε relative error in naive f32 summation (the peers' f32 order).";

const fn b(op: &'static str, rel: f64, why: &'static str) -> Bound {
    Bound {
        op,
        variant: "",
        backend: "*",
        rel,
        flips: 0,
        why,
    }
}

/// The explained bounds: ops whose f32 evaluation on well-conditioned
/// inputs cannot meet [`DEFAULT_REL`] element-wise because an output
/// *cancels* (it is much smaller than the terms it is computed from). For
/// each, the element-wise bound is widened to `rel` (about 10× the largest
/// error measured at full scale, so a real defect — a wrong formula, a lost
/// term, an error of O(1) — still fails); the report also prints the
/// normwise error (against each output's own scale). The same bounds
/// apply to core-f32 (the core's own f32 evaluation, the peers' formula
/// order) and every burn backend.
pub const BOUNDS: &[Bound] = &[
    b("openrlhf.compute_approx_kl", 1e-2, KL),
    b("verl.kl_penalty", 1e-2, KL),
    b("verl.kl_penalty_forward", 1e-2, KL),
    b("verl.apply_kl_penalty", 1e-2, KL),
    b("verl.policy_loss", 1e-1, ROLLOUT),
    bv("verl.policy_loss", "clip_cov", f64::INFINITY, SELECT),
    bv("verl.policy_loss", "kl_cov", f64::INFINITY, SELECT),
    b("trl.cpo_loss", 1e-3, LOGRATIO),
    b("verl.calculate_sum_pi_squared_from_logits", 1e-2, VOCAB),
    b("verl.compute_pf_ppo_reweight_data", 1e-2, VOCAB),
    b(
        "verl.compute_rollout_correction_and_rejection_mask",
        1e-1,
        ROLLOUT,
    ),
    b("verl.compute_rollout_rejection_mask", 1e-1, ROLLOUT),
    b("verl.compute_rollout_correction_weights", 1e-1, ROLLOUT),
    b("trl.grpo_vllm_importance_sampling_ratio", 1e-2, ROLLOUT),
    b("torchtune.masked_sum", 1e-1, SUM),
    b("torchtune.masked_mean", 1e-1, SUM),
    b("verl.masked_sum", 1e-1, SUM),
    b("verl.masked_mean", 1e-1, SUM),
    b("verl.agg_loss", 1e-1, SUM),
    b("openrlhf.aggregate_loss", 1e-1, SUM),
    b("trl.grpo_loss", 1e-1, SUM),
    b("trl.gspo_token_loss", 1e-1, SUM),
    b("trl.gmpo_loss", 1e-1, SUM),
    b("trl.rloo_loss", 1e-1, SUM),
    b("torchtune.grpo_loss", 1e-1, SUM),
    b("torchtune.grpo_simple_loss", 1e-1, SUM),
    b("torchtune.grpo_completion_loss", 1e-1, SUM),
    b("torchtune.ppo_loss", 1e-1, SUM),
    b("openrlhf.policy_loss", 1e-1, SUM),
    b("verl.compute_policy_loss", 1e-1, SUM),
    b("verl.compute_policy_loss_reinforce", 1e-1, SUM),
    b("verl.compute_value_loss", 1e-1, SUM),
    b("openrlhf.value_loss", 1e-1, SUM),
    b("torchtune.estimate_advantages", 1e-1, SUM),
    b("verl.compute_gae_advantage_return", 1e-1, SUM),
    b(
        "verl.compute_reinforce_plus_plus_outcome_advantage",
        1e-1,
        SUM,
    ),
    b("verl.compute_remax_outcome_advantage", 1e-1, SUM),
    b("verl.compute_optimal_token_baseline_advantage", 1e-1, SUM),
    b(
        "verl.compute_multi_turn_optimal_token_baseline_advantage",
        1e-1,
        SUM,
    ),
    b(
        "verl.compute_reinforce_plus_plus_baseline_outcome_advantage",
        1e-1,
        NORM,
    ),
    b("verl.compute_gdpo_outcome_advantage", 1e-1, NORM),
    b("verl.compute_gpg_outcome_advantage", 1e-1, NORM),
    b("verl.compute_grpo_outcome_advantage", 1e-1, NORM),
    b("verl.compute_grpo_vectorized_outcome_advantage", 1e-1, NORM),
    b("verl.compute_grpo_passk_outcome_advantage", 1e-1, NORM),
    b("verl.compute_rloo_outcome_advantage", 1e-1, NORM),
    b("verl.compute_rloo_vectorized_outcome_advantage", 1e-1, NORM),
    b("verl.compute_opo_outcome_advantage", 1e-1, NORM),
    b("trl.rloo_advantages", 1e-1, NORM),
    b("trl.grpo_advantages", 1e-1, NORM),
    b("torchtune.grpo_advantages", 1e-1, NORM),
    b("torchtune.whiten", 1e-1, NORM),
    b("verl.masked_whiten", 1e-1, NORM),
    b("openrlhf.masked_normalize", 1e-1, NORM),
    b("trl.nanstd", 1e-2, NORM),
    b("openrlhf.compute_entropy", 1e-2, SOFTMAX),
    b("trl.entropy_from_logits", 1e-2, SOFTMAX),
    // measured 1.1e-5 (gradient entries of the PRM's log-softmax over the
    // reward-token columns, `softmax − onehot` cancelling)
    b("openrlhf.prm_loss", 1e-4, SOFTMAX),
    b("verl.entropy_from_logits", 1e-2, SOFTMAX),
    b("verl.compute_entropy_loss", 1e-2, SOFTMAX),
    b("trl.distillation_compute_loss", 1e-2, SOFTMAX),
    b("trl.distillation_generalized_jsd_loss", 1e-2, SOFTMAX),
    b("trl.distillation_jsd_divergence", 1e-2, SOFTMAX),
    b("trl.gkd_compute_loss", 1e-2, SOFTMAX),
    b("trl.gkd_generalized_jsd_loss", 1e-2, SOFTMAX),
    b("openrlhf.kd_loss", 1e-2, SOFTMAX),
    b("torchtune.grpo_with_chunked_output_loss", 1e-2, SOFTMAX),
    b("torchtune.linear_grpo_loss", 1e-2, SOFTMAX),
    b("trl.dpo_loss", 1e-1, LOGRATIO),
    b("trl.kto_loss", 1e-1, LOGRATIO),
    b("trl.cpo_batch_loss_metrics", 1e-1, LOGRATIO),
    b("trl.orpo_batch_loss_metrics", 1e-1, LOGRATIO),
    // measured 1.2e-5 on bf16-rounded inputs (wgpu): log-odds of sequence log-probs
    b("trl.odds_ratio_loss", 1e-4, LOGRATIO),
];

/// How large the synthesised inputs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Fast: tokens `[8, 64]`, logits `[2, 16, 512]` (tests, CI).
    Small,
    /// Realistic: tokens `[64, 1024]`, logits `[2, 64, 32000]` (the committed report).
    Full,
}

impl Scale {
    /// Parses `small` or `full`.
    pub fn parse(s: &str) -> Result<Scale, String> {
        match s {
            "small" => Ok(Scale::Small),
            "full" => Ok(Scale::Full),
            _ => Err(format!("unknown scale {s:?} (small or full)")),
        }
    }

    /// `small` or `full`.
    pub fn name(self) -> &'static str {
        match self {
            Scale::Small => "small",
            Scale::Full => "full",
        }
    }

    /// Target `[batch, seq]` of token-level ops.
    pub fn tokens(self) -> (usize, usize) {
        match self {
            Scale::Small => (8, 64),
            Scale::Full => (64, 1024),
        }
    }

    /// Target `[batch, seq, vocab]` of ops that take logits. `full` keeps a
    /// realistic vocabulary (32000: the log-sum-exp and entropy reductions
    /// are where accuracy is at stake) but only 2×64 rows: a synthesised
    /// case holds its inputs as JSON values (32 bytes per element), so the
    /// issue's 8×512×32000 (131 M elements, ~4 GB per tensor) does not fit
    /// a shared 2-core CI machine.
    pub fn logits(self) -> (usize, usize, usize) {
        match self {
            Scale::Small => (2, 16, 512),
            Scale::Full => (2, 64, 32000),
        }
    }

    /// At most this many variants of an op with `[batch, seq, vocab]` inputs.
    pub fn max_variants_3d(self) -> usize {
        match self {
            Scale::Small => usize::MAX,
            Scale::Full => 1,
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Backends to compare (core-f64 is always the reference and always runs).
    pub backends: Vec<Backend>,
    /// Input size.
    pub scale: Scale,
    /// Seed of every generated input.
    pub seed: u64,
    /// Keep only ops containing one of these substrings (all when empty).
    pub filter: Vec<String>,
    /// At most this many variants per op (all when `None`).
    pub max_variants: Option<usize>,
    /// Also run the f16/bf16 rounded-input rows (feature `burn`).
    pub reduced: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            backends: Backend::ALL.to_vec(),
            scale: Scale::Small,
            seed: 2024,
            filter: Vec::new(),
            max_variants: None,
            reduced: true,
        }
    }
}

// ---------------------------------------------------------------- inputs

/// xorshift64* with a Box–Muller normal.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in `[0, 1)`.
    fn unif(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let u = self.unif().max(1e-300);
        let v = self.unif();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// How a float input is drawn (see [`float_kind`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FloatKind {
    /// A log-probability: a per-shape base in `[-5, -0.2]` plus N(0, 0.05).
    LogProb,
    /// A value-head output: a per-shape base ~ N(0, 1) plus N(0, 0.1).
    Value,
    /// A log-distribution over the last axis (log-softmax of N(0, 2) logits).
    LogDist,
    /// Logits: a per-shape base ~ N(0, 2) plus N(0, 0.1), so a policy's,
    /// its reference's and a teacher's logits of one shape are close (ratios
    /// near 1, as for a policy a few steps from its reference).
    Logits,
    /// N(0, σ).
    Normal(f64),
    /// U(lo, hi).
    Uniform(f64, f64),
}

/// The distribution of float input `name` (rank `rank`) of `op`.
pub fn float_kind(op: &str, name: &str, rank: usize) -> FloatKind {
    let n = name.to_ascii_lowercase();
    if rank == 3 && n.ends_with("log_probs") {
        return FloatKind::LogDist;
    }
    if n.contains("logit") {
        return if rank == 3 {
            FloatKind::Logits
        } else {
            FloatKind::Normal(1.0) // a reward model's scalar logits
        };
    }
    if op == "torchtune.linear_grpo_loss" && n == "weight" {
        return FloatKind::Normal(0.5);
    }
    if n.contains("log_ratio") {
        return FloatKind::Normal(0.05);
    }
    if n.contains("logp") || n.contains("log_prob") || n.contains("logprob") {
        return FloatKind::LogProb;
    }
    if n.contains("entrop") {
        return FloatKind::Uniform(0.0, 3.0);
    }
    if n == "current_kl" {
        return FloatKind::Uniform(0.0, 0.2);
    }
    if n == "kl" {
        return FloatKind::Uniform(0.0, 0.1);
    }
    if n == "sum_pi_squared" {
        return FloatKind::Uniform(0.05, 1.0);
    }
    if n.contains("value") && !op.contains("masked") || n == "vpreds" || n == "returns" {
        return FloatKind::Value;
    }
    FloatKind::Normal(1.0)
}

/// The role of every axis of input `name` (rank `rank`) of `op`: `B` batch,
/// `T` sequence, `V` vocabulary, `K` kept, `G` group (scaled to 8).
///
/// Overrides: `torchtune.linear_grpo_loss` keeps the hidden size and the
/// lm-head's vocabulary of its template (it takes hidden states and a weight
/// and forms the logits itself); `torchtune.grpo_advantages`' `[groups,
/// generations]` rewards get groups of 8; stop-token lists are kept.
pub fn roles(op: &str, name: &str, rank: usize) -> Vec<char> {
    let fixed: Option<&str> = match (op, name) {
        ("torchtune.linear_grpo_loss", "pi_old_outputs") => Some("BTK"),
        ("torchtune.linear_grpo_loss", "weight") => Some("KK"),
        ("torchtune.grpo_advantages", "rewards") => Some("BG"),
        (_, "stop_tokens") => Some("K"),
        (_, "rewards_per_func") => Some("BK"),
        _ => None,
    };
    if let Some(f) = fixed {
        if f.len() == rank {
            return f.chars().collect();
        }
    }
    match rank {
        0 => vec![],
        1 => vec!['B'],
        2 => vec!['B', 'T'],
        _ => {
            let mut v = vec!['B', 'T'];
            v.resize(rank - 1, 'K');
            v.push('V');
            v
        }
    }
}

/// The integer factor of each role for one template.
#[derive(Debug, Clone, Copy)]
struct Factors {
    b: usize,
    t: usize,
    v: usize,
}

fn factor(target: usize, size: usize) -> usize {
    if size <= 1 {
        return 1;
    }
    ((target as f64 / size as f64).round() as usize).max(1)
}

fn factors(op: &str, case: &Case, scale: Scale) -> Factors {
    let (mut b0, mut t0, mut v0, mut rank3, mut b1) = (0, 0, 0, false, 0);
    for (name, t) in &case.inputs {
        let r = roles(op, name, t.shape.len());
        for (&c, &d) in r.iter().zip(&t.shape) {
            match (c, t.shape.len()) {
                ('B', 1) => b1 = b1.max(d),
                ('B', _) => b0 = b0.max(d),
                ('T', _) => t0 = t0.max(d),
                ('V', _) => {
                    v0 = v0.max(d);
                    rank3 = true;
                }
                _ => {}
            }
        }
        if t.shape.len() == 3 {
            rank3 = true;
        }
    }
    if b0 == 0 {
        b0 = b1;
    }
    let (tb, tt) = scale.tokens();
    let (lb, lt, lv) = scale.logits();
    let (tb, tt) = if rank3 { (lb, lt) } else { (tb, tt) };
    Factors {
        b: factor(tb, b0),
        t: factor(tt, t0),
        v: factor(lv, v0),
    }
}

fn new_dim(role: char, old: usize, f: Factors) -> usize {
    if old <= 1 {
        return old;
    }
    match role {
        'B' => old * f.b,
        'T' => old * f.t,
        'V' => old * f.v,
        'G' => old * 8usize.div_ceil(old),
        _ => old,
    }
}

/// For every new flat index, the template's flat index (tiled along B, V,
/// G; stretched along T; identity along K).
fn source_index(old: &[usize], new: &[usize], roles: &[char]) -> Vec<usize> {
    let n: usize = new.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; new.len()];
    for _ in 0..n {
        let mut flat = 0;
        for a in 0..new.len() {
            let o = if old[a] <= 1 {
                0
            } else {
                match roles[a] {
                    'T' => idx[a] / (new[a] / old[a]),
                    'K' => idx[a],
                    _ => idx[a] % old[a],
                }
            };
            flat = flat * old[a] + o;
        }
        out.push(flat);
        for a in (0..new.len()).rev() {
            idx[a] += 1;
            if idx[a] < new[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    out
}

fn fval(x: f64) -> Value {
    if x.is_nan() {
        Value::from("nan")
    } else if x.is_infinite() {
        Value::from(if x > 0.0 { "inf" } else { "-inf" })
    } else {
        Value::from(x)
    }
}

fn f32r(x: f64) -> f64 {
    x as f32 as f64
}

/// Generates one input's floats.
fn gen_floats(
    kind: FloatKind,
    shape: &[usize],
    rng: &mut Rng,
    bases: &mut BTreeMap<(u8, Vec<usize>), Vec<f64>>,
) -> Vec<f64> {
    let n: usize = shape.iter().product();
    let mut base = |tag: u8, rng: &mut Rng, f: &dyn Fn(&mut Rng) -> f64| -> Vec<f64> {
        bases
            .entry((tag, shape.to_vec()))
            .or_insert_with(|| (0..n).map(|_| f(rng)).collect())
            .clone()
    };
    let v: Vec<f64> = match kind {
        FloatKind::LogProb => {
            let b = base(0, rng, &|r: &mut Rng| -0.2 - 4.8 * r.unif());
            b.iter()
                .map(|&x| (x + 0.05 * rng.normal()).min(-1e-4))
                .collect()
        }
        FloatKind::Value => {
            let b = base(1, rng, &|r: &mut Rng| r.normal());
            b.iter().map(|&x| x + 0.1 * rng.normal()).collect()
        }
        FloatKind::LogDist => {
            let v = *shape.last().unwrap_or(&1);
            let z: Vec<f64> = (0..n).map(|_| 2.0 * rng.normal()).collect();
            let mut out = Vec::with_capacity(n);
            for row in z.chunks(v.max(1)) {
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                out.extend(row.iter().map(|x| x - lse));
            }
            out
        }
        FloatKind::Logits => {
            let b = base(2, rng, &|r: &mut Rng| 2.0 * r.normal());
            b.iter().map(|&x| x + 0.1 * rng.normal()).collect()
        }
        FloatKind::Normal(s) => (0..n).map(|_| s * rng.normal()).collect(),
        FloatKind::Uniform(lo, hi) => (0..n).map(|_| lo + (hi - lo) * rng.unif()).collect(),
    };
    v.into_iter().map(f32r).collect()
}

/// Synthesises a case from `template` at `scale` (seeded by `seed` and the
/// template's name). The VJP block is left out; see [`with_cotangents`].
pub fn synth(op: &str, template: &Case, scale: Scale, seed: u64) -> Result<Case, String> {
    let f = factors(op, template, scale);
    let mut rng = Rng::new(seed ^ hash(op) ^ hash(&template.name).rotate_left(17));
    let mut bases = BTreeMap::new();
    let mut inputs = BTreeMap::new();
    for (name, t) in &template.inputs {
        let r = roles(op, name, t.shape.len());
        let shape: Vec<usize> = r
            .iter()
            .zip(&t.shape)
            .map(|(&c, &d)| new_dim(c, d, f))
            .collect();
        let data: Vec<Value> = if t.dtype == "f64" {
            gen_floats(
                float_kind(op, name, t.shape.len()),
                &shape,
                &mut rng,
                &mut bases,
            )
            .into_iter()
            .map(fval)
            .collect()
        } else {
            let old: Vec<f64> = t.to_f64()?;
            if op.starts_with("verl.") && name == "index" && shape.len() == 1 {
                let n = shape[0];
                let last = (n.max(1) - 1) / 8;
                (0..n)
                    .map(|i| {
                        // Groups of 8; a singleton tail joins the group before it.
                        let g = if n % 8 == 1 && i / 8 == last && last > 0 {
                            last - 1
                        } else {
                            i / 8
                        };
                        Value::from(g as i64)
                    })
                    .collect()
            } else {
                let src = source_index(&t.shape, &shape, &r);
                let rt = f.t as f64;
                src.into_iter()
                    .map(|i| {
                        let x = old[i];
                        let x = match name.as_str() {
                            "seq_lens" => x * rt,
                            "valid_score_idxs" => (x + 1.0) * rt - 1.0,
                            _ => x,
                        };
                        if t.dtype == "bool" {
                            Value::from((x != 0.0) as u8)
                        } else {
                            Value::from(x as i64)
                        }
                    })
                    .collect()
            }
        };
        inputs.insert(
            name.clone(),
            RawTensor {
                dtype: t.dtype.clone(),
                shape,
                data,
            },
        );
    }
    Ok(Case {
        name: format!("{}@{}", template.name, scale.name()),
        params: template.params.clone(),
        inputs,
        outputs: Value::Null,
        vjp: None,
        tolerance: BTreeMap::new(),
        expect: None,
    })
}

/// Sequence-level reference log-probs next to logits (TRL's DPO with
/// precomputed reference log-probs): independent draws would put the
/// policy's summed log-probs (from the logits, ~ −8 per token) and the
/// reference's tens of nats apart, and `exp` of that overflows f32 — not a
/// well-conditioned input. So `ref_chosen_logps[i]` / `ref_rejected_logps[i]`
/// become the policy's own sequence log-prob of row `i` / `n + i` (TRL's
/// shifted sum `Σ_{t: completion_mask[r, t+1]} log softmax(z[r, t])[id[r, t+1]]`,
/// see `posttrain_core::preference::paired::dpo_from_logits`) plus N(0, 0.5).
pub fn calibrate(mut case: Case, seed: u64) -> Case {
    let get = |n: &str| {
        case.inputs
            .get(n)
            .and_then(|t| t.to_f64().ok().map(|v| (t.shape.clone(), v)))
    };
    let (Some((zs, z)), Some((_, ids)), Some((_, cm)), true) = (
        get("logits"),
        get("input_ids"),
        get("completion_mask"),
        case.inputs.contains_key("ref_chosen_logps"),
    ) else {
        return case;
    };
    if zs.len() != 3 {
        return case;
    }
    let (rows, t_len, v) = (zs[0], zs[1], zs[2]);
    let seq: Vec<f64> = (0..rows)
        .map(|r| {
            (0..t_len.saturating_sub(1))
                .filter(|&t| cm[r * t_len + t + 1] != 0.0)
                .map(|t| {
                    let row = &z[(r * t_len + t) * v..(r * t_len + t + 1) * v];
                    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                    let id = (ids[r * t_len + t + 1] as usize).min(v - 1);
                    row[id] - lse
                })
                .sum()
        })
        .collect();
    let mut rng = Rng::new(seed ^ hash(&case.name) ^ 0xCA1);
    let n = rows / 2;
    for (input, off) in [("ref_chosen_logps", 0), ("ref_rejected_logps", n)] {
        if let Some(t) = case.inputs.get_mut(input) {
            for (i, d) in t.data.iter_mut().enumerate() {
                let base = seq.get(off + i).copied().unwrap_or(-10.0);
                *d = fval(f32r(base + 0.5 * rng.normal()));
            }
        }
    }
    case
}

/// Adds the template's VJP to `case`: for every output the template has a
/// cotangent for, a cotangent of the length `lens` gives (1 for a scalar,
/// seeded U(-1, 1) otherwise); the template's gradient names are kept.
pub fn with_cotangents(
    mut case: Case,
    template: &Case,
    lens: &BTreeMap<String, usize>,
    seed: u64,
) -> Case {
    let Some(vjp) = &template.vjp else {
        return case;
    };
    let mut rng = Rng::new(seed ^ hash(&case.name) ^ 0xC07);
    let mut cot = BTreeMap::new();
    for (name, t) in &vjp.cotangents {
        let n = lens.get(name).copied().unwrap_or(t.data.len());
        let scalar = n == 1;
        let data: Vec<Value> = (0..n)
            .map(|_| {
                if scalar {
                    fval(1.0)
                } else {
                    fval(f32r(2.0 * rng.unif() - 1.0))
                }
            })
            .collect();
        let shape = if scalar && t.shape.is_empty() {
            vec![]
        } else {
            vec![n]
        };
        cot.insert(
            name.clone(),
            RawTensor {
                dtype: "f64".into(),
                shape,
                data,
            },
        );
    }
    let grads: Vec<Value> = match &vjp.grads {
        Value::Object(m) => m.keys().map(|k| Value::from(k.as_str())).collect(),
        Value::Array(a) => a.clone(),
        _ => vec![],
    };
    case.vjp = Some(Vjp {
        cotangents: cot,
        grads: Value::Array(grads),
    });
    case
}

/// Rounds every float input of `case` with `round`.
pub fn map_float_inputs(case: &Case, round: impl Fn(f64) -> f64) -> Case {
    let mut c = case.clone();
    for t in c.inputs.values_mut() {
        if t.dtype == "f64" {
            let v = t.to_f64().unwrap_or_default();
            t.data = v.into_iter().map(|x| fval(round(x))).collect();
        }
    }
    c
}

// ------------------------------------------------------------- running

/// How a backend run ended.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    /// Outputs and gradients.
    Done(Outputs),
    /// The backend has no handler for the op or the parameter value.
    NotOnBackend(String),
    /// The op failed (typed error, harness error or panic).
    Error(String),
}

/// Runs `case` of `op` on `backend`, catching panics.
pub fn run_on(backend: Backend, op: &str, case: &Case) -> RunOutcome {
    let ctx = Ctx::new(case);
    let r: Result<Option<OpResult>, _> =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend.run(op, &ctx)));
    match r {
        Err(_) => RunOutcome::Error("the handler panicked".into()),
        Ok(None) => RunOutcome::NotOnBackend(format!("op {op} not on {}", backend.name())),
        Ok(Some(Ok(o))) => RunOutcome::Done(o),
        Ok(Some(Err(Fail::Skip(r)))) => RunOutcome::NotOnBackend(r),
        Ok(Some(Err(Fail::Op(e)))) => RunOutcome::Error(format!("op error: {e}")),
        Ok(Some(Err(Fail::Harness(e)))) => RunOutcome::Error(format!("harness: {e}")),
    }
}

/// Error statistics of one comparison (or the max over many).
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Max `|got − want|` over float elements.
    pub max_abs: f64,
    /// Max `|got − want| / max(|want|, REL_FLOOR)`.
    pub max_rel: f64,
    /// Where `max_rel` was reached: `variant :: output`.
    pub worst: String,
    /// Max over outputs of `max |got − want| / max(max |want|, REL_FLOOR)`
    /// (normwise relative error: against the output's own scale).
    pub norm_rel: f64,
    /// Integer/boolean output elements that differ.
    pub flips: usize,
    /// Elements compared.
    pub compared: usize,
    /// Outputs the reference has and the other side lacks.
    pub missing: Vec<String>,
}

impl Stats {
    fn merge(&mut self, o: &Stats) {
        self.max_abs = self.max_abs.max(o.max_abs);
        self.norm_rel = self.norm_rel.max(o.norm_rel);
        if o.max_rel > self.max_rel || self.worst.is_empty() && !o.worst.is_empty() {
            self.max_rel = o.max_rel.max(self.max_rel);
            self.worst = o.worst.clone();
        }
        self.flips += o.flips;
        self.compared += o.compared;
        for m in &o.missing {
            if !self.missing.contains(m) {
                self.missing.push(m.clone());
            }
        }
    }
}

fn err_pair(got: f64, want: f64) -> (f64, f64) {
    if got == want || got.is_nan() && want.is_nan() {
        return (0.0, 0.0);
    }
    if !got.is_finite() || !want.is_finite() {
        return (f64::INFINITY, f64::INFINITY);
    }
    let a = (got - want).abs();
    (a, a / want.abs().max(REL_FLOOR))
}

/// Compares `got` with the reference `want`; `discrete` names integer or
/// boolean outputs (counted as flips).
pub fn compare(got: &Outputs, want: &Outputs, discrete: &BTreeSet<String>, label: &str) -> Stats {
    let mut s = Stats::default();
    let sides = [
        ("", &got.values, &want.values),
        ("d/d", &got.grads, &want.grads),
    ];
    for (prefix, g, w) in sides {
        for (name, wv) in w {
            let Some(gv) = g.get(name) else {
                s.missing.push(format!("{prefix}{name}"));
                continue;
            };
            if gv.len() != wv.len() {
                s.missing.push(format!(
                    "{prefix}{name} (length {} ≠ {})",
                    gv.len(),
                    wv.len()
                ));
                continue;
            }
            let is_discrete = prefix.is_empty() && discrete.contains(name);
            if !is_discrete {
                let scale = wv
                    .iter()
                    .filter(|x| x.is_finite())
                    .fold(0.0f64, |m, x| m.max(x.abs()));
                let worst = gv
                    .iter()
                    .zip(wv)
                    .map(|(&a, &b)| err_pair(a, b).0)
                    .fold(0.0f64, f64::max);
                let n = if worst == 0.0 {
                    0.0
                } else {
                    worst / scale.max(REL_FLOOR)
                };
                s.norm_rel = s.norm_rel.max(n);
            }
            for (i, (&a, &b)) in gv.iter().zip(wv).enumerate() {
                s.compared += 1;
                if is_discrete {
                    if a != b && !(a.is_nan() && b.is_nan()) {
                        s.flips += 1;
                    }
                    continue;
                }
                let (ea, er) = err_pair(a, b);
                s.max_abs = s.max_abs.max(ea);
                if er > s.max_rel || s.worst.is_empty() {
                    s.max_rel = s.max_rel.max(er);
                    s.worst = format!("{label} :: {prefix}{name}[{i}] = {a:.6e} vs {b:.6e}");
                }
            }
        }
    }
    s
}

/// Max `|a − b|` between two runs, and whether they are bitwise identical.
fn bitwise(a: &Outputs, b: &Outputs) -> (bool, f64) {
    let mut same = true;
    let mut spread: f64 = 0.0;
    for (x, y) in [(&a.values, &b.values), (&a.grads, &b.grads)] {
        if x.keys().ne(y.keys()) {
            return (false, f64::INFINITY);
        }
        for (k, xv) in x {
            let yv = &y[k];
            if xv.len() != yv.len() {
                return (false, f64::INFINITY);
            }
            for (&p, &q) in xv.iter().zip(yv) {
                if p.to_bits() != q.to_bits() {
                    same = false;
                    spread = spread.max(err_pair(p, q).0);
                }
            }
        }
    }
    (same, spread)
}

/// One backend's results on one op (over its variants).
#[derive(Debug, Clone, Default)]
pub struct Cell {
    /// Variants that ran.
    pub ran: usize,
    /// Variants the backend does not implement (first reason kept).
    pub not_on_backend: usize,
    /// The first not-on-backend reason.
    pub not_reason: String,
    /// Errors (op error, harness error, panic), at most 3 kept.
    pub errors: Vec<String>,
    /// Number of variants that errored.
    pub n_errors: usize,
    /// Errors vs core-f64 (variants under a variant-specific bound excluded).
    pub stats: Stats,
    /// Errors of the variants under a variant-specific bound, by its pattern.
    pub special: BTreeMap<&'static str, Stats>,
    /// Whether every repeated run was bitwise identical.
    pub bitwise: bool,
    /// Max `|run1 − run2|` when not bitwise identical.
    pub spread: f64,
    /// Seconds of the first runs.
    pub secs: f64,
}

/// f16/bf16 rows of one op.
#[derive(Debug, Clone)]
pub struct ReducedRow {
    /// `f16` or `bf16`.
    pub format: &'static str,
    /// How far core-f64 moves when the inputs are rounded (vs unrounded).
    pub sensitivity: Stats,
    /// The documented tolerance for `sensitivity`.
    pub tol_rel: f64,
    /// Per backend: device support of the format, and errors of the backend on
    /// the rounded inputs vs core-f64 on the same rounded inputs.
    pub cells: Vec<(Backend, String, Result<Stats, String>)>,
}

/// Everything measured about one op.
#[derive(Debug, Clone)]
pub struct OpRow {
    /// Peer op name.
    pub op: String,
    /// The first variant's input shapes.
    pub shapes: String,
    /// Variants run (after the cap) / available.
    pub variants: (usize, usize),
    /// Variants whose synthesis the reference rejected (first messages).
    pub ref_errors: Vec<String>,
    /// Whether core-f64's repeated runs were bitwise identical.
    pub ref_bitwise: bool,
    /// Seconds core-f64 took.
    pub ref_secs: f64,
    /// Per backend (not core-f64).
    pub cells: BTreeMap<Backend, Cell>,
    /// Pairwise backend differences.
    pub pairwise: BTreeMap<(Backend, Backend), Stats>,
    /// f16/bf16 rows.
    pub reduced: Vec<ReducedRow>,
}

/// The whole report.
#[derive(Debug, Clone)]
pub struct Report {
    /// What ran.
    pub options: Options,
    /// The machine, one line per fact.
    pub machine: Vec<String>,
    /// One row per op.
    pub rows: Vec<OpRow>,
    /// Wall time.
    pub secs: f64,
}

fn bound_for(op: &str, backend: Backend) -> Option<&'static Bound> {
    BOUNDS.iter().find(|b| {
        b.op == op && b.variant.is_empty() && (b.backend == "*" || b.backend == backend.name())
    })
}

/// The variant-specific bound for a case of `op` named `case`, if any.
pub fn variant_bound(op: &str, case: &str) -> Option<&'static Bound> {
    BOUNDS
        .iter()
        .find(|b| b.op == op && !b.variant.is_empty() && case.contains(b.variant))
}

/// The verdict of one cell: `Ok(None)` within the default bound,
/// `Ok(Some(bound))` within an explained bound, `Err(why)` a problem.
pub fn verdict(op: &str, backend: Backend, c: &Cell) -> Result<Option<&'static Bound>, String> {
    if c.ran == 0 {
        return Ok(None);
    }
    let mut why = Vec::new();
    if c.n_errors > 0 {
        why.push(format!(
            "{} variant(s) failed: {}",
            c.n_errors,
            c.errors.join("; ")
        ));
    }
    if !c.stats.missing.is_empty() {
        why.push(format!("missing outputs: {}", c.stats.missing.join(", ")));
    }
    let b = bound_for(op, backend);
    let (rel, flips) = b.map_or((DEFAULT_REL, 0), |b| (b.rel, b.flips));
    if c.stats.max_rel.is_nan() || c.stats.max_rel > rel {
        why.push(format!(
            "max rel {:.2e} > {:.0e} at {}",
            c.stats.max_rel, rel, c.stats.worst
        ));
    }
    if c.stats.flips > flips {
        why.push(format!(
            "{} discrete output elements flipped",
            c.stats.flips
        ));
    }
    let mut special_used = false;
    for (pat, st) in &c.special {
        if let Some(vb) = BOUNDS.iter().find(|x| x.op == op && x.variant == *pat) {
            special_used |= st.max_rel > DEFAULT_REL;
            if st.max_rel.is_nan() || st.max_rel > vb.rel {
                why.push(format!(
                    "{pat} variants: max rel {:.2e} > {:.0e}",
                    st.max_rel, vb.rel
                ));
            }
            if !st.missing.is_empty() {
                why.push(format!("missing outputs: {}", st.missing.join(", ")));
            }
        }
    }
    if !c.bitwise && backend != wgpu_backend().unwrap_or(Backend::CoreF64) {
        why.push(format!(
            "repeated runs differ (spread {:.2e}) on a CPU backend",
            c.spread
        ));
    }
    if why.is_empty() {
        if special_used && b.is_none() {
            return Ok(BOUNDS.iter().find(|x| x.op == op));
        }
        Ok(
            b.filter(|_| c.stats.max_rel > DEFAULT_REL || c.stats.flips > 0)
                .or_else(|| {
                    special_used
                        .then(|| BOUNDS.iter().find(|x| x.op == op))
                        .flatten()
                }),
        )
    } else {
        Err(why.join("; "))
    }
}

fn wgpu_backend() -> Option<Backend> {
    Backend::ALL
        .iter()
        .copied()
        .find(|b| b.name() == "burn-wgpu")
}

impl Report {
    /// Every problem: `op [backend]: why`. Empty when the report passes.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for r in &self.rows {
            if r.variants.0 == 0 {
                p.push(format!(
                    "{}: no variant could be synthesised ({})",
                    r.op,
                    r.ref_errors.join("; ")
                ));
            }
            if !r.ref_bitwise {
                p.push(format!("{} [core-f64]: repeated runs differ", r.op));
            }
            for (be, c) in &r.cells {
                if let Err(why) = verdict(&r.op, *be, c) {
                    p.push(format!("{} [{}]: {why}", r.op, be.name()));
                }
            }
            for ((a, b), s) in &r.pairwise {
                let bound = [bound_for(&r.op, *a), bound_for(&r.op, *b)]
                    .into_iter()
                    .flatten()
                    .map(|b| b.rel)
                    .fold(DEFAULT_REL, f64::max);
                if s.max_rel.is_nan() || s.max_rel > 2.0 * bound {
                    p.push(format!(
                        "{} [{} vs {}]: max rel {:.2e} > {:.0e}",
                        r.op,
                        a.name(),
                        b.name(),
                        s.max_rel,
                        2.0 * bound
                    ));
                }
            }
            for red in &r.reduced {
                for (be, _, res) in &red.cells {
                    match res {
                        Ok(s) if s.max_rel > DEFAULT_REL.max(
                            bound_for(&r.op, *be).map_or(0.0, |b| b.rel)) =>
                        {
                            p.push(format!(
                                "{} [{} on {}-rounded inputs]: max rel {:.2e} vs core-f64 on the same inputs",
                                r.op, be.name(), red.format, s.max_rel
                            ))
                        }
                        _ => {}
                    }
                }
            }
        }
        p
    }

    /// `N ops · B backends: X within 1e-5, Y explained, Z not on backend, P problems`.
    pub fn summary_line(&self) -> String {
        let (mut ok, mut expl, mut not, mut bad) = (0, 0, 0, 0);
        for r in &self.rows {
            for (be, c) in &r.cells {
                if c.ran == 0 {
                    not += 1;
                    continue;
                }
                match verdict(&r.op, *be, c) {
                    Ok(None) => ok += 1,
                    Ok(Some(_)) => expl += 1,
                    Err(_) => bad += 1,
                }
            }
        }
        format!(
            "{} ops × {} backends vs core-f64 ({} scale): {ok} within {DEFAULT_REL:.0e}, {expl} within an explained bound, {not} not on backend, {bad} over bound; {} problems",
            self.rows.len(),
            self.options.backends.iter().filter(|b| **b != Backend::CoreF64).count(),
            self.options.scale.name(),
            self.problems().len()
        )
    }

    /// The markdown report.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let be: Vec<Backend> = self
            .options
            .backends
            .iter()
            .copied()
            .filter(|b| *b != Backend::CoreF64)
            .collect();
        let names: Vec<&str> = self.options.backends.iter().map(|b| b.name()).collect();
        let _ = writeln!(
            s,
            "# posttrain cross-backend report ({} scale)\n",
            self.options.scale.name()
        );
        let _ = writeln!(
            s,
            "Generated by `cargo run -p posttrain-conformance{} -- report --backend {} --scale {}{}{} --out PATH` \
             (seed {}) in {:.0} s. Do not edit by hand; regenerate.\n",
            features(),
            names.join(","),
            self.options.scale.name(),
            self.options
                .max_variants
                .map(|n| format!(" --max-variants {n}"))
                .unwrap_or_default(),
            if self.options.reduced { "" } else { " --no-reduced" },
            self.options.seed,
            self.secs
        );
        let _ = writeln!(s, "## Machine\n");
        for m in &self.machine {
            let _ = writeln!(s, "- {m}");
        }
        let (tb, tt) = self.options.scale.tokens();
        let (lb, lt, lv) = self.options.scale.logits();
        let _ = writeln!(
            s,
            "\n## Method\n\n\
             Every op of the vector files runs on synthesised, seeded, well-conditioned inputs \
             (log-probs in [-5, 0] sharing a base so ratios are near 1, advantages ~ N(0,1), \
             logits ~ N(0,2), masks/ids/labels/groups taken from the vector templates, tiled along batch \
             and stretched along the sequence; verl group uids in groups of 8; every float rounded to f32), \
             one case per distinct parameter set of the vector file (*variants*), at token shape \
             [{tb}, {tt}] and logits shape [{lb}, {lt}, {lv}] (each axis an integer multiple of the template's; \
             shapes below). Reference: core-f64. Errors: max abs `|got − want|` and max rel \
             `|got − want| / max(|want|, {REL_FLOOR:.0e})` over every output and every VJP gradient \
             (scalar cotangents 1, tensor cotangents seeded U(-1,1)); integer/boolean outputs count \
             flipped elements. *det*: two repeated runs bitwise identical. Default bound: max rel ≤ {DEFAULT_REL:.0e}, \
             0 flips, bitwise repeatable; exceptions are explained in the bound table. \
             See `conformance/src/report.rs` for the generator.\n"
        );
        if self.options.scale == Scale::Full {
            let _ = writeln!(
                s,
                "**Reduced shapes.** Ops with `[batch, seq, vocab]` inputs run at [{lb}, {lt}, {lv}] \
                 instead of 8×512×32000: a synthesised case stores inputs as JSON values (32 B/element), \
                 so 131 M-element tensors (~4 GB each, several per op) do not fit the shared 2-core CI machine; \
                 the vocabulary — where the log-sum-exp / entropy reductions accumulate error — is full size. \
                 Such ops run at most {} of their variants. `torchtune.linear_grpo_loss` keeps its template's \
                 hidden size and lm-head vocabulary (it forms the logits itself from hidden states).\n",
                self.options.scale.max_variants_3d()
            );
        }
        let _ = writeln!(s, "## Summary\n\n{}\n", self.summary_line());
        let problems = self.problems();
        if problems.is_empty() {
            let _ = writeln!(s, "No unexplained problem.\n");
        } else {
            let _ = writeln!(s, "### Problems (unexplained)\n");
            for p in &problems {
                let _ = writeln!(s, "- {p}");
            }
            let _ = writeln!(s);
        }

        // Main table.
        let _ = writeln!(s, "## Error vs core-f64 per op and backend\n");
        let _ = writeln!(
            s,
            "Cell: `max abs / max rel / normwise rel`, *det* when repeated runs are bitwise identical, flips if any; \
             `—` = not on this backend. Time: seconds for one run of every variant.\n"
        );
        let mut head =
            String::from("| op | variants | shapes (first variant) | core-f64 det / s |");
        let mut sep = String::from("|---|---|---|---|");
        for b in &be {
            let _ = write!(head, " {} |", b.name());
            sep.push_str("---|");
        }
        head.push_str(" verdict |");
        sep.push_str("---|");
        let _ = writeln!(s, "{head}\n{sep}");
        for r in &self.rows {
            let mut line = format!(
                "| `{}` | {}/{} | {} | {} / {:.2} |",
                r.op,
                r.variants.0,
                r.variants.1,
                r.shapes,
                if r.ref_bitwise { "det" } else { "**not det**" },
                r.ref_secs
            );
            let mut verdicts = Vec::new();
            for b in &be {
                let cell = match r.cells.get(b) {
                    None => "—".to_string(),
                    Some(c) if c.ran == 0 && c.n_errors == 0 => "—".to_string(),
                    Some(c) => {
                        let mut t = format!(
                            "{:.1e} / {:.1e} / {:.1e}",
                            c.stats.max_abs, c.stats.max_rel, c.stats.norm_rel
                        );
                        if c.bitwise {
                            t.push_str(" det");
                        } else {
                            let _ = write!(t, " **not det** (spread {:.1e})", c.spread);
                        }
                        if c.stats.flips > 0 {
                            let _ = write!(t, " {} flips", c.stats.flips);
                        }
                        if c.n_errors > 0 {
                            let _ = write!(t, " **{} errors**", c.n_errors);
                        }
                        if c.not_on_backend > 0 {
                            let _ = write!(t, " ({} variants not on backend)", c.not_on_backend);
                        }
                        let _ = write!(t, " {:.2}s", c.secs);
                        t
                    }
                };
                let _ = write!(line, " {cell} |");
                if let Some(c) = r.cells.get(b) {
                    if c.ran > 0 {
                        verdicts.push(match verdict(&r.op, *b, c) {
                            Ok(None) => "ok".to_string(),
                            Ok(Some(_)) => "explained".to_string(),
                            Err(_) => "**over bound**".to_string(),
                        });
                    }
                }
            }
            if r.variants.0 == 0 {
                verdicts.push("**not synthesised**".into());
            }
            verdicts.dedup();
            let _ = writeln!(line, " {} |", verdicts.join(", "));
            s.push_str(&line);
        }

        // Worst locations.
        let _ = writeln!(s, "\n### Where the worst relative error is\n");
        let _ = writeln!(
            s,
            "| op | backend | max rel | variant :: output |\n|---|---|---|---|"
        );
        for r in &self.rows {
            for (b, c) in &r.cells {
                if c.ran > 0 && c.stats.max_rel > 0.0 {
                    let _ = writeln!(
                        s,
                        "| `{}` | {} | {:.2e} | `{}` |",
                        r.op,
                        b.name(),
                        c.stats.max_rel,
                        c.stats.worst
                    );
                }
                for (pat, st) in &c.special {
                    let _ = writeln!(
                        s,
                        "| `{}` ({pat} variants) | {} | {:.2e} | `{}` |",
                        r.op,
                        b.name(),
                        st.max_rel,
                        st.worst
                    );
                }
            }
        }

        // Pairwise.
        let pairs: BTreeSet<(Backend, Backend)> = self
            .rows
            .iter()
            .flat_map(|r| r.pairwise.keys().copied())
            .collect();
        if !pairs.is_empty() {
            let _ = writeln!(s, "\n## Pairwise backend differences (max abs / max rel)\n");
            let mut head = String::from("| op |");
            let mut sep = String::from("|---|");
            for (a, b) in &pairs {
                let _ = write!(head, " {} vs {} |", a.name(), b.name());
                sep.push_str("---|");
            }
            let _ = writeln!(s, "{head}\n{sep}");
            for r in &self.rows {
                let mut line = format!("| `{}` |", r.op);
                for p in &pairs {
                    match r.pairwise.get(p) {
                        Some(st) => {
                            let _ = write!(line, " {:.1e} / {:.1e} |", st.max_abs, st.max_rel);
                        }
                        None => line.push_str(" — |"),
                    }
                }
                let _ = writeln!(s, "{line}");
            }
        }

        // Bounds.
        let _ = writeln!(s, "\n## Bounds\n");
        let _ = writeln!(
            s,
            "Default: max rel ≤ {DEFAULT_REL:.0e} vs core-f64 (2× that pairwise), no flipped discrete \
             element, bitwise-repeatable on CPU backends. Explained exceptions (from `BOUNDS` in \
             `conformance/src/report.rs`):\n"
        );
        if BOUNDS.is_empty() {
            let _ = writeln!(s, "(none)");
        } else {
            let _ = writeln!(s, "| op | backend | max rel | why |\n|---|---|---|---|");
            for b in BOUNDS {
                let _ = writeln!(
                    s,
                    "| `{}` | {} | {:.0e} | {} |",
                    b.op, b.backend, b.rel, b.why
                );
            }
        }

        // Determinism.
        let _ = writeln!(s, "\n## Determinism\n");
        let mut nondet = Vec::new();
        for r in &self.rows {
            for (b, c) in &r.cells {
                if c.ran > 0 && !c.bitwise {
                    nondet.push(format!(
                        "`{}` on {} (spread {:.2e})",
                        r.op,
                        b.name(),
                        c.spread
                    ));
                }
            }
            if !r.ref_bitwise {
                nondet.push(format!("`{}` on core-f64", r.op));
            }
        }
        let _ = writeln!(
            s,
            "Every backend ran every variant twice. {}\n\n\
             Thread counts: the core has no threads knob (every op is a pure single-threaded \
             function) and burn-ndarray is built without its `multi-threads` (rayon) feature, so \
             no reduction order depends on a thread count; `conformance/tests/determinism.rs` \
             proves bitwise identity for the core, burn-ndarray and burn-tch for every op run \
             concurrently from 1, 2 and 8 threads; on burn-wgpu (device-scheduled reductions) \
             it allows and prints a spread of at most 1e-5 relative (measured: 2.8e-7, \
             `torchtune.whiten`, 8 threads, lavapipe).",
            if nondet.is_empty() {
                "All repeated runs were bitwise identical.".to_string()
            } else {
                format!("Not bitwise identical: {}.", nondet.join(", "))
            }
        );

        // Reduced precision.
        let _ = writeln!(s, "\n## Reduced precision (f16 / bf16 inputs)\n");
        if self.rows.iter().all(|r| r.reduced.is_empty()) {
            let _ = writeln!(
                s,
                "Not run (needs the `burn` feature for `posttrain_burn::precision`, and the report's reduced rows on)."
            );
        } else {
            let _ = writeln!(
                s,
                "The first variant of every op, its float inputs rounded to f16 / bf16 (round to nearest even; \
                 on the device where it supports the dtype, else on the host — identical values), then computed as \
                 usual in f32 (f64 for core-f64), as the peers do with half-precision logits (`.float()` first). \
                 *sensitivity*: how far core-f64's answer moves when its inputs are rounded (documented tolerance \
                 `8·u`: {:.1e} for f16, {:.1e} for bf16, `posttrain_burn::precision`). Backend cells: max rel error \
                 on the rounded inputs vs core-f64 on the same rounded inputs — the computation must stay as \
                 accurate as in f32 ({DEFAULT_REL:.0e}); `dev` = the device supports the dtype \
                 (`Device::supports_dtype`), `host` = it does not (rounded on the host).\n",
                8.0 * 2f64.powi(-11),
                8.0 * 2f64.powi(-8)
            );
            let mut head = String::from("| op | format | sensitivity (max rel) |");
            let mut sep = String::from("|---|---|---|");
            for b in &be {
                let _ = write!(head, " {} |", b.name());
                sep.push_str("---|");
            }
            let _ = writeln!(s, "{head}\n{sep}");
            for r in &self.rows {
                for red in &r.reduced {
                    let mut line = format!(
                        "| `{}` | {} | {:.1e}{} |",
                        r.op,
                        red.format,
                        red.sensitivity.max_rel,
                        if red.sensitivity.max_rel > red.tol_rel {
                            " (> 8u: ill-conditioned here)"
                        } else {
                            ""
                        }
                    );
                    for b in &be {
                        match red.cells.iter().find(|c| c.0 == *b) {
                            None => line.push_str(" — |"),
                            Some((_, support, Ok(st))) => {
                                let _ = write!(line, " {:.1e} {support} |", st.max_rel);
                            }
                            Some((_, support, Err(e))) => {
                                let _ = write!(line, " {e} {support} |");
                            }
                        }
                    }
                    let _ = writeln!(s, "{line}");
                }
            }
        }

        // Synthesis failures.
        let failed: Vec<&OpRow> = self
            .rows
            .iter()
            .filter(|r| !r.ref_errors.is_empty())
            .collect();
        if !failed.is_empty() {
            let _ = writeln!(s, "\n## Variants the reference rejected\n");
            for r in failed {
                let _ = writeln!(s, "- `{}`: {}", r.op, r.ref_errors.join("; "));
            }
        }
        let _ = writeln!(s, "\n{}", self.summary_line());
        s
    }
}

fn features() -> &'static str {
    if cfg!(feature = "tch") && cfg!(feature = "wgpu") {
        " --features wgpu,tch"
    } else if cfg!(feature = "tch") {
        " --features tch"
    } else if cfg!(feature = "wgpu") {
        " --features wgpu"
    } else if cfg!(feature = "burn") {
        " --features burn"
    } else {
        ""
    }
}

/// A description of this machine: CPU, cores, OS, backends and adapters.
pub fn machine() -> Vec<String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("PRETTY_NAME=")).map(|l| {
                l.trim_start_matches("PRETTY_NAME=")
                    .trim_matches('"')
                    .to_string()
            })
        })
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().next().and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map(|kb| format!("{:.0} GiB", kb / 1048576.0))
        .unwrap_or_default();
    let mut v = vec![
        format!("CPU: {cpu}, {cores} cores available, memory {mem}"),
        format!("OS: {os}, kernel {kernel} ({})", std::env::consts::ARCH),
        format!(
            "Backends compiled: {}",
            Backend::ALL.iter().map(|b| b.name()).collect::<Vec<_>>().join(", ")
        ),
        "burn 0.22.1; burn-ndarray without `multi-threads` (no rayon); debug profile (dependencies at opt-level 2)".into(),
    ];
    if wgpu_backend().is_some() {
        let adapter = std::process::Command::new("vulkaninfo")
            .arg("--summary")
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.trim_start().starts_with("deviceName"))
                    .map(|l| l.split('=').nth(1).unwrap_or("").trim().to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown (vulkaninfo not available)".into());
        v.push(format!(
            "wgpu: default adapter; Vulkan devices on this machine: {adapter}"
        ));
    }
    if Backend::ALL.iter().any(|b| b.name() == "burn-tch") {
        v.push("tch: libtorch CPU device (torch 2.9.0)".into());
    }
    v
}

fn shapes_of(case: &Case) -> String {
    case.inputs
        .iter()
        .map(|(n, t)| format!("{n} {:?}", t.shape))
        .collect::<Vec<_>>()
        .join(", ")
}

fn discrete_outputs(template: &Case) -> BTreeSet<String> {
    match &template.outputs {
        Value::Object(m) => m
            .iter()
            .filter(|(_, v)| {
                v.get("dtype")
                    .and_then(Value::as_str)
                    .is_some_and(|d| d == "i64" || d == "bool")
            })
            .map(|(k, _)| k.clone())
            .collect(),
        _ => BTreeSet::new(),
    }
}

/// The templates of one file: one per distinct (params, input names); edge
/// contracts are skipped.
pub fn variants(file: &VectorFile) -> Vec<&Case> {
    let mut seen = BTreeSet::new();
    file.cases
        .iter()
        .filter(|c| c.expect.is_none())
        .filter(|c| {
            let key = format!(
                "{}|{}",
                Value::Object(c.params.clone()),
                c.inputs.keys().cloned().collect::<Vec<_>>().join(",")
            );
            seen.insert(key)
        })
        .collect()
}

fn pick(n: usize, k: usize) -> Vec<usize> {
    if k >= n {
        return (0..n).collect();
    }
    let mut v: Vec<usize> = (0..k).map(|i| i * n / k).collect();
    v.dedup();
    v
}

#[cfg(feature = "burn")]
fn reduced_support(be: Backend, f: posttrain_burn::precision::Reduced) -> String {
    match be.burn_kind().map(posttrain_burn::device_for) {
        Some(Ok(d)) => {
            if posttrain_burn::precision::supports(&d, f) {
                "dev".into()
            } else {
                "host".into()
            }
        }
        Some(Err(e)) => format!("({e})"),
        None => "host".into(),
    }
}

#[cfg(feature = "burn")]
fn reduced_rows(
    op: &str,
    case: &Case,
    reference: &Outputs,
    backends: &[Backend],
    discrete: &BTreeSet<String>,
) -> Vec<ReducedRow> {
    use posttrain_burn::precision::Reduced;
    let mut rows = Vec::new();
    for f in Reduced::ALL {
        let rc = map_float_inputs(case, |x| f.round(x));
        let RunOutcome::Done(rref) = run_on(Backend::CoreF64, op, &rc) else {
            continue;
        };
        let sensitivity = compare(&rref, reference, discrete, "rounded vs unrounded");
        let mut cells = Vec::new();
        for &be in backends {
            if be == Backend::CoreF64 {
                continue;
            }
            let support = reduced_support(be, f);
            let res = match run_on(be, op, &rc) {
                RunOutcome::Done(o) => Ok(compare(&o, &rref, discrete, f.name())),
                RunOutcome::NotOnBackend(_) => continue,
                RunOutcome::Error(e) => Err(format!("error: {e}")),
            };
            cells.push((be, support, res));
        }
        rows.push(ReducedRow {
            format: f.name(),
            sensitivity,
            tol_rel: f.tolerance().rel,
            cells,
        });
    }
    rows
}

#[cfg(not(feature = "burn"))]
fn reduced_rows(
    _op: &str,
    _case: &Case,
    _reference: &Outputs,
    _backends: &[Backend],
    _discrete: &BTreeSet<String>,
) -> Vec<ReducedRow> {
    Vec::new()
}

/// Runs one op (every variant) on every backend.
pub fn run_op(file: &VectorFile, opts: &Options) -> OpRow {
    let op = file.op.as_str();
    let all = variants(file);
    let has3 = all
        .first()
        .is_some_and(|c| c.inputs.values().any(|t| t.shape.len() == 3));
    let mut cap = opts.max_variants.unwrap_or(usize::MAX);
    if has3 {
        cap = cap.min(opts.scale.max_variants_3d());
    }
    let chosen = pick(all.len(), cap);
    let others: Vec<Backend> = opts
        .backends
        .iter()
        .copied()
        .filter(|b| *b != Backend::CoreF64)
        .collect();
    let mut row = OpRow {
        op: op.to_string(),
        shapes: String::new(),
        variants: (0, all.len()),
        ref_errors: Vec::new(),
        ref_bitwise: true,
        ref_secs: 0.0,
        cells: others
            .iter()
            .map(|b| {
                (
                    *b,
                    Cell {
                        bitwise: true,
                        ..Cell::default()
                    },
                )
            })
            .collect(),
        pairwise: BTreeMap::new(),
        reduced: Vec::new(),
    };
    for &i in &chosen {
        let template = all[i];
        let discrete = discrete_outputs(template);
        let case = match synth(op, template, opts.scale, opts.seed) {
            Ok(c) => c,
            Err(e) => {
                row.ref_errors.push(format!("{}: {e}", template.name));
                continue;
            }
        };
        // Pass 1: output lengths for the cotangents.
        let case = calibrate(case, opts.seed);
        let lens: BTreeMap<String, usize> = match run_on(Backend::CoreF64, op, &case) {
            RunOutcome::Done(o) => o.values.iter().map(|(k, v)| (k.clone(), v.len())).collect(),
            RunOutcome::NotOnBackend(e) | RunOutcome::Error(e) => {
                if row.ref_errors.len() < 3 {
                    row.ref_errors.push(format!("{}: {e}", template.name));
                }
                continue;
            }
        };
        let case = with_cotangents(case, template, &lens, opts.seed);
        let t0 = Instant::now();
        let reference = match run_on(Backend::CoreF64, op, &case) {
            RunOutcome::Done(o) => o,
            RunOutcome::NotOnBackend(e) | RunOutcome::Error(e) => {
                if row.ref_errors.len() < 3 {
                    row.ref_errors
                        .push(format!("{} (with VJP): {e}", template.name));
                }
                continue;
            }
        };
        row.ref_secs += t0.elapsed().as_secs_f64();
        if let RunOutcome::Done(again) = run_on(Backend::CoreF64, op, &case) {
            row.ref_bitwise &= bitwise(&reference, &again).0;
        }
        if row.variants.0 == 0 {
            row.shapes = shapes_of(&case);
        }
        row.variants.0 += 1;
        let label = template.name.clone();
        let mut outs: Vec<(Backend, Outputs)> = Vec::new();
        for &be in &others {
            let cell = row.cells.get_mut(&be).expect("cell");
            let t0 = Instant::now();
            let first = run_on(be, op, &case);
            cell.secs += t0.elapsed().as_secs_f64();
            match first {
                RunOutcome::Done(o) => {
                    cell.ran += 1;
                    let st = compare(&o, &reference, &discrete, &label);
                    match variant_bound(op, &label) {
                        Some(vb) => cell.special.entry(vb.variant).or_default().merge(&st),
                        None => cell.stats.merge(&st),
                    }
                    if let RunOutcome::Done(again) = run_on(be, op, &case) {
                        let (same, spread) = bitwise(&o, &again);
                        cell.bitwise &= same;
                        cell.spread = cell.spread.max(spread);
                    } else {
                        cell.bitwise = false;
                    }
                    outs.push((be, o));
                }
                RunOutcome::NotOnBackend(r) => {
                    cell.not_on_backend += 1;
                    if cell.not_reason.is_empty() {
                        cell.not_reason = r;
                    }
                }
                RunOutcome::Error(e) => {
                    cell.n_errors += 1;
                    if cell.errors.len() < 3 {
                        cell.errors.push(format!("{label}: {e}"));
                    }
                }
            }
        }
        let special = variant_bound(op, &label).is_some();
        for a in 0..outs.len() {
            for b in a + 1..outs.len() {
                if special {
                    continue;
                }
                let st = compare(&outs[b].1, &outs[a].1, &discrete, &label);
                row.pairwise
                    .entry((outs[a].0, outs[b].0))
                    .or_default()
                    .merge(&st);
            }
        }
        if opts.reduced && row.reduced.is_empty() {
            row.reduced = reduced_rows(op, &case, &reference, &opts.backends, &discrete);
        }
    }
    row
}

/// Runs every op of `files` (edge files are skipped; ops are deduplicated by
/// name, the first file wins) and builds the report. `progress` is called
/// after each op.
pub fn generate(
    files: &[PathBuf],
    opts: &Options,
    mut progress: impl FnMut(&OpRow),
) -> Result<Report, String> {
    let t0 = Instant::now();
    let mut opts = opts.clone();
    if !opts.backends.contains(&Backend::CoreF64) {
        opts.backends.insert(0, Backend::CoreF64);
    }
    opts.backends.sort();
    opts.backends.dedup();
    let mut seen = BTreeSet::new();
    let mut rows = Vec::new();
    for path in files {
        let name = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("edge.") {
            continue;
        }
        let file = VectorFile::load(path)?;
        if !opts.filter.is_empty() && !opts.filter.iter().any(|f| file.op.contains(f.as_str())) {
            continue;
        }
        if !seen.insert(file.op.clone()) {
            continue;
        }
        let row = run_op(&file, &opts);
        progress(&row);
        rows.push(row);
    }
    Ok(Report {
        options: opts,
        machine: machine(),
        rows,
        secs: t0.elapsed().as_secs_f64(),
    })
}
