#!/usr/bin/env python3
"""Time the peers' own PyTorch loss math (released `trl` and `verl`) on fixed workloads.

The posttrain Rust bench binary spawns this script and reads its stdout, one JSON
object per line and per implementation variant, to compute speed ratios in the same
run on the same machine. The script does not depend on posttrain.

Usage
-----
    python bench/peers.py WORKLOAD [--shape A,B,...] [--reps N] [--warmup N]
                          [--threads N] [--dtype float32|float64] [--impl SUBSTR]
    python bench/peers.py all --quick           # every workload, tiny shapes (CI smoke test)
    python bench/peers.py --list                # workload names and default shapes (JSON lines)
    python bench/peers.py --pip-pins            # pinned pip requirements (see below)
    python bench/peers.py --pip-pins-nodeps     # packages to install with --no-deps

WORKLOAD is one of: logprobs, token_loss, advantages, gae, dpo, dpo_logits, or `all`.
`--shape` may be given several times (token_loss defaults to two shapes).

Output line (stdout; everything else, including the peers' own logging, goes to stderr):
    {"workload": "token_loss", "impl": "verl.compute_policy_loss_vanilla+kl_penalty(low_var_kl)+agg_loss",
     "shape": [64, 1024], "dtype": "float32", "threads": 2, "reps": 10, "warmup": 2,
     "median_s": ..., "min_s": ..., "peer": "verl==0.9.1", "checksum": ..., "call": "...", ...}
A variant that fails prints {"workload", "impl", "shape", "error"} instead, and the
process then exits with status 2 after running everything else.

Workloads (inputs; see also the `call` field of each line)
----------------------------------------------------------
logprobs    logits [B,T,V] ~ N(0,1) (leaf), labels uniform ids, cotangents c1,c2 [B,T] ~ N(0,1);
            backward of (logp*c1).sum() + (entropy*c2).sum(). Variants: trl, verl,
            F.cross_entropy+verl entropy, and the logprob-only trl and F.cross_entropy forms.
token_loss  log_prob = -|N(0,1)|*2 (leaf), old/ref = log_prob + U(-0.3,0.3), advantages one N(0,1)
            per row, response_mask bool, row b valid on [0, len_b), len_b ~ U{T/4..T};
            loss = pg_loss + 0.001 * kl_loss exactly as verl.workers.utils.losses.ppo_loss does.
advantages  N rewards ~ Bernoulli(0.5) in groups of G (uid strings, each repeated G times).
gae         values ~ N(0,1) on valid tokens, reward N(0,1) at each row's last valid token,
            float response_mask (same prefix padding), gamma=1.0, lam=0.95.
dpo         N pairs of sequence log-probs in [-220,-20]; backward of the mean loss, beta=0.1,
            loss_type="sigmoid", label_smoothing=0, reference log-probs precomputed.
dpo_logits  logits [2N,T,V] (chosen rows first), mask as token_loss, per-sequence log-prob =
            (trl selective_log_softmax(logits, labels) * mask).sum(-1) (this is what trl <= 0.28
            DPOTrainer.concatenated_forward did; trl 1.16 instead scores hidden states through a
            fused chunked LM head and never materialises logits), then TRL's DPO loss; reference
            log-probs = the policy's own (untimed) + N(0, 2^2).

Timing protocol
---------------
torch.set_num_threads(--threads, default 2); inputs are built once from a fixed seed
(torch.Generator seeded with 20240607, float32 draws cast to --dtype so float32 and float64 runs
see the same data; uid strings from random.Random(20240607)), before any timing;
trainable inputs are leaf tensors created once. Each rep: `.grad = None` on the leaves
(untimed), gc disabled, then time.perf_counter() around forward + `loss.backward()`
(forward only for the no-grad workloads). `--warmup` untimed reps (default 2), then
`--reps` timed reps (default 10; 5 for the big logits workloads logprobs and dpo_logits).
`checksum` is computed after the clock stops, from the last rep:
    logprobs, token_loss, dpo, dpo_logits: the scalar loss value that was backpropagated;
    advantages: sum(advantages**2) (the sum itself is ~0 after per-group normalisation);
    gae: sum(returns) + sum(advantages**2 * mask).
`grad_abs_sum` (backward workloads) is sum(|grad|) over the trainable leaves after the last
rep (the plain sum is ~0 for softmax gradients and for DPO's chosen/rejected pair).

Installing the peers (from a venv that only has torch==2.9.0, CPU or CUDA wheel)
-------------------------------------------------------------------------------
Pinned, deterministic; these two commands were run on a fresh Python 3.11.7 venv holding
only torch==2.9.0 (+ its nvidia/triton deps), pip 23.2.1, on a busy 2-core box; measured wall
time 47.7 s (55.9 s when pinned to one core) and 1.9-2.2 s (PyPI downloads included):

    pip install "torch==2.9.0" $(python bench/peers.py --pip-pins)
    pip install --no-deps $(python bench/peers.py --pip-pins-nodeps)        # verl==0.9.1

that is, spelled out:

    pip install "torch==2.9.0" trl==1.16.0 transformers==5.10.4 ray==2.60.0 \
        tensordict==0.10.0 omegaconf==2.4.0 codetiming==1.4.0 <all their transitive pins, PIP_PINS below>
    pip install --no-deps verl==0.9.1

Versions: trl 1.16.0 (latest on PyPI at the time), verl 0.9.1 (latest), torch 2.9.0 untouched.
verl is installed with --no-deps so that ray[default], vllm, wandb, peft, hydra, ... are not
pulled; importing verl.trainer.ppo.core_algos / verl.utils.torch_functional needs only
ray (core, imported by verl/__init__ -> verl/protocol.py), tensordict, omegaconf, codetiming,
transformers, numpy. transformers is pinned to 5.10.4 to satisfy both verl (<5.11,>=5.5.3)
and trl (>=4.56.2). `pip check` still reports verl's uninstalled optional-at-import deps
(hydra-core, peft, pybind11, pylatexenc, tensorboard, torchdata, wandb): expected, harmless.

Notes on the peers (trl 1.16.0, verl 0.9.1), see also the `call` field of every line
------------------------------------------------------------------------------------
* trl.trainer.utils.selective_log_softmax / entropy_from_logits / selective_log_softmax_and_entropy
  dispatch to a fused Triton kernel on CUDA/XPU only; on CPU (this bench) they run the plain
  torch code: gather + per-batch-row loop of logsumexp; entropy in chunks of 128 rows of
  log_softmax -> -(exp(logp)*logp).sum(-1).
* verl.utils.torch_functional.logprobs_from_logits uses flash-attn's Triton cross entropy when
  flash_attn is importable, else logprobs_from_logits_v2 (same gather + row-loop logsumexp as trl).
  verl entropy_from_logits = logsumexp(logits) - sum(softmax(logits) * logits).
* trl >= 0.29 has no DPOTrainer.dpo_loss method any more (last present in trl 0.28.0); the DPO
  loss lives inline in DPOTrainer._compute_loss(self, model, inputs, return_outputs), which also
  does TRL's metric bookkeeping (several .item() and gathers). We call that method unbound with a
  stand-in self / accelerator / model (the model returns the precomputed per-token log-probs), and
  additionally time our transcription of its sigmoid branch (loss only). If an older trl with
  DPOTrainer.dpo_loss is installed, that method is used instead (unbound, stand-in self).
* verl compute_policy_loss_vanilla needs an ActorConfig (clip_ratio, clip_ratio_low/high, clip_ratio_c,
  global_batch_info); it calls .item() three times for its metrics (part of verl's cost).
  kl_penalty("low_var_kl") clamps log(ref/p) to [-20, 20] and the k3 value to [-10, 10];
  agg_loss("seq-mean-token-mean") divides each row by (token count + 1e-8) and averages over rows
  with at least one valid token. compute_policy_loss_vanilla clamps log-ratio to [-20, 20].
* verl compute_grpo_outcome_advantage is a Python loop over the batch keyed by the uid
  (numpy object array of str, as verl's ray_trainer builds it); std is torch.std (unbiased),
  adv = (r - mean) / (std + epsilon); singleton groups get mean 0, std 1.
  compute_grpo_vectorized_outcome_advantage (also verl's) is timed as a second variant; its
  group_mean_std always works in float32.
* TRL GRPOTrainer computes group advantages inline in _generate_and_score_completions; the
  "torch (transcribed ...)" variant is our transcription of that code (defaults
  multi_objective_aggregation="sum_then_normalize", scale_rewards="group", one reward function
  with weight 1), calling TRL's own trl.trainer.utils.nanstd; adv = (r - mean) / (std + 1e-4).
* verl compute_gae_advantage_return is a Python loop over time steps, then masked_whiten
  (unbiased variance, rsqrt(var + 1e-8)); it runs under torch.no_grad().
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import random
import statistics
import sys
import time
import types
import uuid
from collections import defaultdict

# ----------------------------------------------------------------------------------------
# Pinned installation (printed by --pip-pins / --pip-pins-nodeps; keep in sync with docstring)
# ----------------------------------------------------------------------------------------
PIP_PINS = """
trl==1.16.0 transformers==5.10.4 ray==2.60.0 tensordict==0.10.0 omegaconf==2.4.0 codetiming==1.4.0
PyYAML==6.0.3 Pygments==2.21.0 accelerate==1.15.0 annotated-doc==0.0.7 annotated-types==0.8.0
anyio==4.16.0 attrs==26.1.0 certifi==2026.10.18 charset-normalizer==3.5.2 click==8.5.1
cloudpickle==3.1.2 datasets==5.2.0 dill==0.4.1 h11==0.16.0 hf-xet==1.8.0 httpcore==1.0.9
httpx==0.28.1 huggingface_hub==1.33.0 idna==3.20 importlib_metadata==10.2.0 jsonschema==4.26.0
jsonschema-specifications==2025.9.1 lazy-importer==0.1.0 markdown-it-py==4.3.0 mdurl==0.1.2
msgpack==1.2.4 multiprocess==0.70.19 numpy==2.4.6 orjson==3.13.0 packaging==25.0 pandas==3.1.1
protobuf==7.36.2 psutil==7.2.2 pyarrow==26.0.1 pydantic==2.14.3 pydantic_core==2.50.4
python-dateutil==4.0.0 pyvers==0.1.0 referencing==0.37.0 regex==2026.11.15 requests==2.34.2
rich==15.0.0 rpds-py==2026.9.1 safetensors==0.8.0 shellingham==1.5.4 tokenizers==0.22.2
tqdm==4.70.1 typer==0.29.2 typing-inspection==0.4.5 tzdata==2026.6 urllib3==2.8.0 xxhash==4.1.0
zipp==4.1.2
""".split()
PIP_PINS_NODEPS = ["verl==0.9.1"]

SEED = 20240607

# name -> (default shapes, quick shapes, default reps)
WORKLOADS = {
    "logprobs": ([[8, 512, 32000]], [[2, 64, 512]], 5),
    "token_loss": ([[64, 1024], [256, 4096]], [[8, 128]], 10),
    "advantages": ([[4096, 8]], [[64, 8]], 10),
    "gae": ([[256, 1024]], [[8, 128]], 10),
    "dpo": ([[4096]], [[64]], 10),
    "dpo_logits": ([[8, 512, 32000]], [[4, 64, 512]], 5),
}
SHAPE_DOC = {
    "logprobs": "B,T,V logits; labels [B,T]",
    "token_loss": "B,T",
    "advantages": "N,G: N sequences (one reward each) in groups of G",
    "gae": "B,T",
    "dpo": "N pairs (sequence log-probs)",
    "dpo_logits": "2N,T,V policy logits (N chosen rows first, then N rejected)",
}

_errors = []


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def quiet_stdout():
    """Keep stdout pure JSON: anything the peers print goes to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def pkg_version(name):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def peer_str(*names):
    return "+".join(f"{n}=={pkg_version(n)}" for n in names)


# ----------------------------------------------------------------------------------------
# Timing harness
# ----------------------------------------------------------------------------------------
def _vm_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return float(line.split()[1])
    return None


def peak_extra_mb(ctx, step, leaves):
    """Memory one more step() takes above what is live before it, in MiB: on
    CUDA torch's peak allocated bytes; on the CPU the process's peak resident
    set (VmHWM, reset through /proc/self/clear_refs, Linux) above its resident
    set before the step. The leaves' .grad is cleared first, so the gradient
    the step creates counts. None where neither is available."""
    import torch

    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    if ctx.device.type != "cpu":
        ctx.sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with quiet_stdout():
            res = step()
        ctx.sync()
        del res
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _vm_kb("VmRSS:")
        with quiet_stdout():
            res = step()
        peak = _vm_kb("VmHWM:")
        del res
    except OSError:
        return None
    if before is None or peak is None:
        return None
    return max(peak - before, 0.0) / 1024


def time_variant(ctx, impl, peer, call, step, leaves, checksum, extra=None):
    """step() runs one forward(+backward) and returns whatever checksum() needs."""
    import torch

    if ctx.impl_filter and not any(f in impl for f in ctx.impl_filter):
        return
    try:
        times = []
        out = None
        with quiet_stdout():
            for i in range(ctx.warmup + ctx.reps):
                for leaf in leaves:
                    leaf.grad = None
                gc.collect()
                gc.disable()
                try:
                    ctx.sync()
                    t0 = time.perf_counter()
                    out = step()
                    ctx.sync()
                    t1 = time.perf_counter()
                finally:
                    gc.enable()
                if i >= ctx.warmup:
                    times.append(t1 - t0)
            cs = float(checksum(out))
            out = None
            peak_mb = peak_extra_mb(ctx, step, leaves)
        rec = {
            "workload": ctx.workload,
            "impl": impl,
            "shape": ctx.shape,
            "dtype": ctx.dtype_name,
            "threads": ctx.threads,
            "reps": ctx.reps,
            "warmup": ctx.warmup,
            "median_s": statistics.median(times),
            "min_s": min(times),
            "peer": peer,
            "checksum": cs,
        }
        if peak_mb is not None:
            rec["peak_extra_mb"] = peak_mb
        if leaves:
            rec["grad_abs_sum"] = float(sum(leaf.grad.double().abs().sum() for leaf in leaves))
        rec["call"] = call
        if extra:
            rec.update(extra)
        rec["torch"] = torch.__version__
        rec["device"] = ctx.device_name
        if ctx.ray_stub:
            rec["ray"] = "stand-in"
        if not all(math.isfinite(v) for v in (cs, rec.get("grad_abs_sum", 0.0))):
            rec["error"] = "non-finite checksum"
            _errors.append(impl)
        emit(rec)
    except Exception as e:  # report and go on with the other variants
        _errors.append(impl)
        emit({"workload": ctx.workload, "impl": impl, "shape": ctx.shape, "error": f"{type(e).__name__}: {e}"})


def _randn(gen, dtype, *shape):
    """Standard normal draws made in float32 then cast, so --dtype float64 sees the same data."""
    import torch

    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def _rand(gen, dtype, *shape):
    import torch

    return torch.rand(*shape, generator=gen, dtype=torch.float32).to(dtype)


def masked_prefix(gen, B, T, device="cpu"):
    """Row b valid on positions [0, len_b), len_b uniform in [T//4, T]."""
    import torch

    lo = max(1, T // 4)
    lengths = torch.randint(lo, T + 1, (B,), generator=gen)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return mask, lengths


# ----------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------
def wl_logprobs(ctx):
    import torch
    import torch.nn.functional as F

    B, T, V = ctx.shape
    g = torch.Generator().manual_seed(SEED)
    dev = ctx.device
    logits = _randn(g, ctx.dtype, B, T, V).to(dev).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g).to(dev)
    c1 = _randn(g, ctx.dtype, B, T).to(dev)
    c2 = _randn(g, ctx.dtype, B, T).to(dev)

    def loss_of(logp, ent):
        loss = (logp * c1).sum()
        if ent is not None:
            loss = loss + (ent * c2).sum()
        loss.backward()
        return loss.detach()

    cs = lambda out: out.item()  # noqa: E731

    def ce_logp(x, y):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype not in (torch.float32, torch.float64):
            x2 = x2.float()
        return -F.cross_entropy(x2, y.reshape(-1), reduction="none").view(y.shape)

    try:
        with quiet_stdout():
            from trl.trainer.utils import entropy_from_logits as trl_entropy
            from trl.trainer.utils import selective_log_softmax
        time_variant(
            ctx, "trl.selective_log_softmax+trl.entropy_from_logits", peer_str("trl"),
            "logp = trl.trainer.utils.selective_log_softmax(logits, labels); "
            "ent = trl.trainer.utils.entropy_from_logits(logits); "
            "((logp*c1).sum() + (ent*c2).sum()).backward()",
            lambda: loss_of(selective_log_softmax(logits, labels), trl_entropy(logits)), [logits], cs)
        time_variant(
            ctx, "trl.selective_log_softmax (logprob only)", peer_str("trl"),
            "logp = trl.trainer.utils.selective_log_softmax(logits, labels); (logp*c1).sum().backward()",
            lambda: loss_of(selective_log_softmax(logits, labels), None), [logits], cs)
    except Exception as e:
        _import_error(ctx, "trl.selective_log_softmax+trl.entropy_from_logits", e)

    try:
        with quiet_stdout():
            import verl.utils.torch_functional as verl_F
        time_variant(
            ctx, "verl.logprobs_from_logits+verl.entropy_from_logits", peer_str("verl"),
            "logp = verl.utils.torch_functional.logprobs_from_logits(logits, labels); "
            "ent = verl.utils.torch_functional.entropy_from_logits(logits); "
            "((logp*c1).sum() + (ent*c2).sum()).backward()"
            + ("" if not verl_F.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE else " [flash-attn CE path]"),
            lambda: loss_of(verl_F.logprobs_from_logits(logits, labels), verl_F.entropy_from_logits(logits)),
            [logits], cs)
        time_variant(
            ctx, "torch.F.cross_entropy+verl.entropy_from_logits", peer_str("torch", "verl"),
            "logp = -F.cross_entropy(logits.view(-1,V), labels.view(-1), reduction='none').view(B,T); "
            "ent = verl.utils.torch_functional.entropy_from_logits(logits); "
            "((logp*c1).sum() + (ent*c2).sum()).backward()",
            lambda: loss_of(ce_logp(logits, labels), verl_F.entropy_from_logits(logits)), [logits], cs)
    except Exception as e:
        _import_error(ctx, "verl.logprobs_from_logits+verl.entropy_from_logits", e)

    try:
        with quiet_stdout():
            from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
        if logits.device.type != "cuda":
            raise RuntimeError("Liger-Kernel's Triton kernels need a GPU")

        def liger_logp(x, y):
            # LigerCrossEntropyFunction.apply(input, target, weight, ignore_index,
            # lse_square_scale, label_smoothing, reduction, softcap, return_z_loss, ...)
            out = LigerCrossEntropyFunction.apply(x.reshape(-1, V), y.reshape(-1), None, -100, 0.0, 0.0, "none")
            loss = out[0] if isinstance(out, tuple) else out
            return -loss.view(B, T)

        time_variant(
            ctx, "liger_kernel.cross_entropy (logprob only)", peer_str("liger-kernel"),
            "logp = -LigerCrossEntropyFunction.apply(logits.view(-1,V), labels.view(-1), None, -100, 0.0, 0.0, "
            "'none').view(B,T); (logp*c1).sum().backward()  # Triton, gradient computed in the forward",
            lambda: loss_of(liger_logp(logits, labels), None), [logits], cs)
    except Exception as e:
        if logits.device.type == "cuda":
            _import_error(ctx, "liger_kernel.cross_entropy (logprob only)", e)

    time_variant(
        ctx, "torch.F.cross_entropy (logprob only)", peer_str("torch"),
        "logp = -F.cross_entropy(logits.view(-1,V), labels.view(-1), reduction='none').view(B,T); "
        "(logp*c1).sum().backward()",
        lambda: loss_of(ce_logp(logits, labels), None), [logits], cs)


def wl_token_loss(ctx):
    import torch

    B, T = ctx.shape
    g = torch.Generator().manual_seed(SEED)
    dt = ctx.dtype
    dev = ctx.device
    lp0 = -_randn(g, dt, B, T).abs() * 2.0
    old_log_prob = (lp0 + (_rand(g, dt, B, T) * 0.6 - 0.3)).to(dev)
    ref_log_prob = (lp0 + (_rand(g, dt, B, T) * 0.6 - 0.3)).to(dev)
    advantages = _randn(g, dt, B, 1).repeat(1, T).to(dev)
    response_mask, _ = masked_prefix(g, B, T)  # bool, as verl's ppo_loss passes it (.to(bool))
    response_mask = response_mask.to(dev)
    log_prob = lp0.clone().to(dev).requires_grad_(True)

    try:
        with quiet_stdout():
            from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla, kl_penalty
            from verl.workers.config import ActorConfig

            config = ActorConfig(
                strategy="fsdp", rollout_n=8, ppo_micro_batch_size_per_gpu=8,
                clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                loss_agg_mode="seq-mean-token-mean", use_kl_loss=True, kl_loss_coef=0.001,
                kl_loss_type="low_var_kl",
            )
    except Exception as e:
        _import_error(ctx, "verl.compute_policy_loss_vanilla+kl_penalty(low_var_kl)+agg_loss", e)
        return

    def step():
        pg_loss, _metrics = compute_policy_loss_vanilla(
            old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
            response_mask=response_mask, loss_agg_mode="seq-mean-token-mean", config=config)
        kld = kl_penalty(logprob=log_prob, ref_logprob=ref_log_prob, kl_penalty="low_var_kl")
        kl_loss = agg_loss(loss_mat=kld, loss_mask=response_mask, loss_agg_mode="seq-mean-token-mean",
                           **config.global_batch_info)
        loss = pg_loss + kl_loss * 0.001
        loss.backward()
        return loss.detach()

    time_variant(
        ctx, "verl.compute_policy_loss_vanilla+kl_penalty(low_var_kl)+agg_loss", peer_str("verl"),
        "config = ActorConfig(strategy='fsdp', rollout_n=8, ppo_micro_batch_size_per_gpu=8, clip_ratio=0.2, "
        "clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode='seq-mean-token-mean'); "
        "pg_loss, _ = compute_policy_loss_vanilla(old_log_prob=old, log_prob=lp, advantages=adv, "
        "response_mask=mask_bool, loss_agg_mode='seq-mean-token-mean', config=config); "
        "kld = kl_penalty(logprob=lp, ref_logprob=ref, kl_penalty='low_var_kl'); "
        "kl_loss = agg_loss(loss_mat=kld, loss_mask=mask_bool, loss_agg_mode='seq-mean-token-mean'); "
        "(pg_loss + kl_loss * 0.001).backward()  # as verl.workers.utils.losses.ppo_loss",
        step, [log_prob], lambda out: out.item(),
        extra={"valid_tokens": int(response_mask.sum())})


def wl_advantages(ctx):
    import numpy as np
    import torch

    N, G = ctx.shape
    assert N % G == 0, "N must be a multiple of the group size G"
    g = torch.Generator().manual_seed(SEED)
    dt = ctx.dtype
    rewards = torch.bernoulli(torch.full((N,), 0.5), generator=g).to(dt)  # 0/1 outcome rewards
    token_level_rewards = rewards.unsqueeze(1).clone()  # [N, 1]: one reward per sequence
    response_mask = torch.ones(N, 1, dtype=dt)
    rnd = random.Random(SEED)
    uids = np.array([str(uuid.UUID(int=rnd.getrandbits(128), version=4)) for _ in range(N // G)], dtype=object)
    index = np.repeat(uids, G)  # numpy object array of str, like verl's non_tensor_batch["uid"]
    cs = lambda out: out.double().square().sum().item()  # noqa: E731

    try:
        with quiet_stdout():
            from verl.trainer.ppo.core_algos import (
                compute_grpo_outcome_advantage,
                compute_grpo_vectorized_outcome_advantage,
            )
        time_variant(
            ctx, "verl.compute_grpo_outcome_advantage", peer_str("verl"),
            "adv, _ = compute_grpo_outcome_advantage(token_level_rewards[N,1], response_mask[N,1], "
            "index=np.ndarray[object str uid, each repeated G], epsilon=1e-6, norm_adv_by_std_in_grpo=True)",
            lambda: compute_grpo_outcome_advantage(
                token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True)[0],
            [], cs)
        time_variant(
            ctx, "verl.compute_grpo_vectorized_outcome_advantage", peer_str("verl"),
            "adv, _ = compute_grpo_vectorized_outcome_advantage(token_level_rewards[N,1], response_mask[N,1], "
            "index=np.ndarray[object str uid], epsilon=1e-6, norm_adv_by_std_in_grpo=True)",
            lambda: compute_grpo_vectorized_outcome_advantage(
                token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True)[0],
            [], cs)
    except Exception as e:
        _import_error(ctx, "verl.compute_grpo_outcome_advantage", e)

    try:
        with quiet_stdout():
            from trl.trainer.utils import nanstd
        rewards_per_func = rewards.unsqueeze(1).clone()  # [N, num_reward_funcs=1]
        reward_weights = torch.ones(1, dtype=dt)

        def trl_inline():
            # Transcribed from trl 1.16.0 GRPOTrainer._generate_and_score_completions,
            # multi_objective_aggregation="sum_then_normalize", scale_rewards="group".
            with torch.no_grad():
                unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
                r = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
                r[unscorable_mask] = torch.nan
                mean_grouped_rewards = torch.nanmean(r.view(-1, G), dim=1)
                mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(G, dim=0)
                std_rewards = nanstd(r.view(-1, G), dim=1)
                std_rewards = std_rewards.repeat_interleave(G, dim=0)
                advantages = r - mean_grouped_rewards
                advantages = advantages / (std_rewards + 1e-4)
                is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))  # noqa: F841 (logging)
                advantages = torch.nan_to_num(advantages, nan=0.0)
            return advantages

        time_variant(
            ctx, "torch (our transcription of TRL GRPOTrainer inline group advantages)",
            peer_str("trl") + " (transcribed)",
            "r = (rewards_per_func*w).nansum(1); mean = nanmean(r.view(-1,G),1).repeat_interleave(G); "
            "std = trl.trainer.utils.nanstd(r.view(-1,G),dim=1).repeat_interleave(G); "
            "adv = nan_to_num((r-mean)/(std+1e-4))",
            trl_inline, [], cs)
    except Exception as e:
        _import_error(ctx, "torch (our transcription of TRL GRPOTrainer inline group advantages)", e)


def wl_gae(ctx):
    import torch

    B, T = ctx.shape
    g = torch.Generator().manual_seed(SEED)
    dt = ctx.dtype
    mask_b, lengths = masked_prefix(g, B, T)
    response_mask = mask_b.to(dt)
    values = _randn(g, dt, B, T) * response_mask
    token_level_rewards = torch.zeros(B, T, dtype=dt)
    token_level_rewards[torch.arange(B), lengths - 1] = _randn(g, dt, B)

    try:
        with quiet_stdout():
            from verl.trainer.ppo.core_algos import compute_gae_advantage_return
    except Exception as e:
        _import_error(ctx, "verl.compute_gae_advantage_return", e)
        return

    def cs(out):
        adv, ret = out
        return (ret.double().sum() + (adv.double().square() * response_mask).sum()).item()

    time_variant(
        ctx, "verl.compute_gae_advantage_return", peer_str("verl"),
        "adv, ret = compute_gae_advantage_return(token_level_rewards, values, response_mask(float), "
        "gamma=1.0, lam=0.95)",
        lambda: compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma=1.0, lam=0.95),
        [], cs)


# ---- DPO -------------------------------------------------------------------------------
def _dpo_standins():
    """Stand-ins for DPOTrainer._compute_loss (trl >= 0.29) / DPOTrainer.dpo_loss (trl <= 0.28)."""
    import torch

    accel = types.SimpleNamespace(
        device=torch.device("cpu"),
        gather_for_metrics=lambda x: x,
        gather=lambda x: x,
        process_index=0,
        num_processes=1,
    )
    return accel


def _make_dpo_self(DPOTrainer, legacy):
    self = object.__new__(DPOTrainer)  # no __init__: set only what the loss code reads
    d = self.__dict__
    d["accelerator"] = _dpo_standins()
    d["beta"] = 0.1
    d["label_smoothing"] = 0.0
    if legacy:
        try:
            from trl.trainer.dpo_config import FDivergenceType

            d["f_divergence_type"] = FDivergenceType.REVERSE_KL
        except Exception:
            d["f_divergence_type"] = "reverse_kl"
        d["f_divergence_params"] = {}
        d["reference_free"] = False
        d["loss_type"] = ["sigmoid"]
        d["use_weighting"] = False
    else:
        d["model"] = types.SimpleNamespace(training=True)
        d["aux_loss_enabled"] = False
        d["ld_alpha"] = None
        d["precompute_ref_logps"] = True
        d["f_divergence_type"] = "reverse_kl"
        d["f_alpha_divergence_coef"] = 1.0
        d["loss_types"] = ["sigmoid"]
        d["loss_weights"] = [1.0]
        d["use_weighting"] = False
        d["_metrics"] = {"train": defaultdict(list), "eval": defaultdict(list)}
        d["_total_train_tokens"] = 0
        d["_tp_size"] = 1
        d["args"] = types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05)
    return self


def _dpo_compute_loss_call(DPOTrainer, self, per_token_logps, completion_mask, ref_chosen, ref_rejected):
    """One call of trl >= 0.29 DPOTrainer._compute_loss with a stand-in model.

    per_token_logps: [2N, L-1] policy log-probs (chosen rows first), the trainable tensor.
    completion_mask: [2N, L] (TRL shifts it by one: completion_mask[..., 1:]).
    """
    import torch

    zeros = torch.zeros(per_token_logps.shape, dtype=per_token_logps.dtype)
    is_top1 = torch.zeros(per_token_logps.shape, dtype=torch.bool)
    outputs = types.SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=is_top1)

    def model(**kwargs):
        return outputs

    inputs = {
        "input_ids": completion_mask.long(),
        "attention_mask": torch.ones_like(completion_mask, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(self, model, inputs, return_outputs=False)


def _dpo_transcribed(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Our transcription of trl 1.16.0 DPOTrainer._compute_loss, reverse_kl + loss_type='sigmoid', weight 1."""
    import torch.nn.functional as F

    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta_score = chosen_logratios - rejected_logratios
    loss = 0.0
    per_sequence_loss = -F.logsigmoid(beta * delta_score)
    loss += per_sequence_loss.mean() * 1.0
    return loss


def _import_dpo():
    with quiet_stdout():
        from trl.trainer.dpo_trainer import DPOTrainer
    legacy = hasattr(DPOTrainer, "dpo_loss")
    return DPOTrainer, legacy


def wl_dpo(ctx):
    import torch

    (N,) = ctx.shape
    g = torch.Generator().manual_seed(SEED)
    dt = ctx.dtype
    base = -(_rand(g, dt, N) * 200 + 20)  # sequence log-probs ~ [-220, -20]
    chosen0 = base + _randn(g, dt, N) * 5
    rejected0 = base + _randn(g, dt, N) * 5 - 2
    ref_chosen = chosen0 + _randn(g, dt, N) * 2
    ref_rejected = rejected0 + _randn(g, dt, N) * 2
    chosen = chosen0.clone().requires_grad_(True)
    rejected = rejected0.clone().requires_grad_(True)
    cs = lambda out: out.item()  # noqa: E731

    try:
        DPOTrainer, legacy = _import_dpo()
        self = _make_dpo_self(DPOTrainer, legacy)
    except Exception as e:
        _import_error(ctx, "trl.DPOTrainer", e)
        DPOTrainer = None

    if DPOTrainer is not None and legacy:

        def step():
            losses, _cr, _rr = DPOTrainer.dpo_loss(self, chosen, rejected, ref_chosen, ref_rejected, loss_type="sigmoid")
            loss = losses.mean()
            loss.backward()
            return loss.detach()

        time_variant(
            ctx, "trl.DPOTrainer.dpo_loss(sigmoid)", peer_str("trl"),
            "losses, _, _ = DPOTrainer.dpo_loss(standin_self(beta=0.1, label_smoothing=0), chosen, rejected, "
            "ref_chosen, ref_rejected, loss_type='sigmoid'); losses.mean().backward()",
            step, [chosen, rejected], cs)
    elif DPOTrainer is not None:
        # trl >= 0.29: the loss is inline in _compute_loss; the trainable tensor is the model's per-token
        # log-prob output, here [2N, 1] (one "token" carrying the whole sequence log-prob).
        per_token = torch.cat([chosen0, rejected0]).unsqueeze(1).clone().requires_grad_(True)
        completion_mask = torch.ones(2 * N, 2, dtype=torch.long)

        def step():
            loss = _dpo_compute_loss_call(DPOTrainer, self, per_token, completion_mask, ref_chosen, ref_rejected)
            loss.backward()
            return loss.detach()

        time_variant(
            ctx, "trl.DPOTrainer._compute_loss(sigmoid) [stand-in model; incl. TRL metric bookkeeping]",
            peer_str("trl"),
            "DPOTrainer._compute_loss(standin_self(beta=0.1, loss_types=['sigmoid'], f_divergence_type='reverse_kl', "
            "precompute_ref_logps=True), standin_model -> log_probs[2N,1] (chosen rows first), "
            "inputs{completion_mask[2N,2], ref_chosen_logps, ref_rejected_logps}).backward()",
            step, [per_token], cs)

    def step_t():
        loss = _dpo_transcribed(chosen, rejected, ref_chosen, ref_rejected, 0.1)
        loss.backward()
        return loss.detach()

    time_variant(
        ctx, "torch (our transcription of TRL DPO sigmoid loss)", peer_str("trl") + " (transcribed)",
        "(-F.logsigmoid(0.1 * ((chosen - ref_chosen) - (rejected - ref_rejected)))).mean().backward()",
        step_t, [chosen, rejected], cs)


def wl_dpo_logits(ctx):
    import torch

    B2, T, V = ctx.shape
    assert B2 % 2 == 0, "first dim must be 2N (chosen rows then rejected rows)"
    N = B2 // 2
    g = torch.Generator().manual_seed(SEED)
    dt = ctx.dtype
    logits = _randn(g, dt, B2, T, V).requires_grad_(True)
    labels = torch.randint(0, V, (B2, T), generator=g)
    mask_b, _ = masked_prefix(g, B2, T)
    loss_mask = mask_b.to(dt)
    cs = lambda out: out.item()  # noqa: E731

    try:
        with quiet_stdout():
            from trl.trainer.utils import selective_log_softmax
        DPOTrainer, legacy = _import_dpo()
        self = _make_dpo_self(DPOTrainer, legacy)
    except Exception as e:
        _import_error(ctx, "trl.selective_log_softmax+DPOTrainer", e)
        return

    # Reference sequence log-probs: the policy's own (untimed) plus N(0, 2^2) noise, so that the
    # DPO margins are a few nats as in training rather than dominated by the random logits.
    with torch.no_grad():
        ref_logps = (selective_log_softmax(logits, labels) * loss_mask).sum(-1)
        ref_logps = ref_logps + _randn(g, dt, B2) * 2.0
    ref_chosen, ref_rejected = ref_logps[:N].clone(), ref_logps[N:].clone()

    if legacy:

        def step():
            logps = (selective_log_softmax(logits, labels) * loss_mask).sum(-1)
            chosen, rejected = logps[:N], logps[N:]
            losses, _cr, _rr = DPOTrainer.dpo_loss(self, chosen, rejected, ref_chosen, ref_rejected, loss_type="sigmoid")
            loss = losses.mean()
            loss.backward()
            return loss.detach()

        time_variant(
            ctx, "trl.selective_log_softmax+masked sum+trl.DPOTrainer.dpo_loss(sigmoid)", peer_str("trl"),
            "logps = (selective_log_softmax(logits, labels) * mask).sum(-1); "
            "DPOTrainer.dpo_loss(standin_self, logps[:N], logps[N:], ref_c, ref_r, 'sigmoid')[0].mean().backward()",
            step, [logits], cs)
    else:
        completion_mask = torch.cat([torch.ones(B2, 1, dtype=torch.long), mask_b.long()], dim=1)  # [2N, T+1]

        def step():
            per_token = selective_log_softmax(logits, labels) * loss_mask
            loss = _dpo_compute_loss_call(DPOTrainer, self, per_token, completion_mask, ref_chosen, ref_rejected)
            loss.backward()
            return loss.detach()

        time_variant(
            ctx, "trl.selective_log_softmax+masked sum+trl.DPOTrainer._compute_loss(sigmoid)", peer_str("trl"),
            "per_token = trl.trainer.utils.selective_log_softmax(logits, labels) * mask; "
            "DPOTrainer._compute_loss(standin_self(beta=0.1, sigmoid), standin_model -> log_probs=per_token, "
            "inputs{completion_mask, ref_chosen_logps, ref_rejected_logps}).backward()  "
            "# _compute_loss sums per_token over T",
            step, [logits], cs)


RUNNERS = {
    "logprobs": wl_logprobs,
    "token_loss": wl_token_loss,
    "advantages": wl_advantages,
    "gae": wl_gae,
    "dpo": wl_dpo,
    "dpo_logits": wl_dpo_logits,
}


def _stub_ray_if_missing():
    """verl's package import (verl/__init__ -> verl/protocol.py) imports ray for
    its distributed DataProto futures (``ray.ObjectRef`` annotations, ``ray.get``);
    the loss functions timed here never touch it. Where ray cannot be installed
    (the GPU machine: no registry, and ray's wheel is ~70 MB), an empty stand-in
    module lets verl import; the peer lines then say ``"ray": "stand-in"``."""
    try:
        import ray  # noqa: F401

        return False
    except ImportError:
        ray = types.ModuleType("ray")
        ray.ObjectRef = type("ObjectRef", (), {})

        def _unavailable(*a, **k):
            raise RuntimeError("ray stand-in (bench/peers.py): ray is not installed")

        ray.get = ray.put = ray.init = ray.remote = _unavailable
        ray.is_initialized = lambda: False
        sys.modules["ray"] = ray
        return True


def _import_error(ctx, impl, e):
    _errors.append(impl)
    emit({"workload": ctx.workload, "impl": impl, "shape": ctx.shape,
          "error": f"import/setup failed: {type(e).__name__}: {e}"})


def parse_shape(s):
    return [int(x) for x in s.replace("x", ",").split(",") if x.strip()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workload", nargs="?", help="|".join(WORKLOADS) + "|all")
    p.add_argument("--shape", action="append", type=parse_shape, help="e.g. 8,512,32000 (repeatable)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: logprobs and token_loss only")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--impl", action="append", default=None, help="only variants whose impl contains this")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 reps, 1 warmup (smoke test)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--pip-pins", action="store_true")
    p.add_argument("--pip-pins-nodeps", action="store_true")
    args = p.parse_args(argv)

    if args.pip_pins:
        print(" ".join(PIP_PINS))
        return 0
    if args.pip_pins_nodeps:
        print(" ".join(PIP_PINS_NODEPS))
        return 0
    if args.list:
        for name, (shapes, quick, reps) in WORKLOADS.items():
            emit({"workload": name, "shapes": shapes, "quick_shapes": quick, "default_reps": reps,
                  "shape_meaning": SHAPE_DOC[name]})
        return 0
    if not args.workload:
        p.error("WORKLOAD required (or --list)")
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    for n in names:
        if n not in WORKLOADS:
            p.error(f"unknown workload {n!r}; one of {', '.join(WORKLOADS)} or all")
    if args.shape and len(names) > 1:
        p.error("--shape needs a single workload")

    import torch

    ray_stub = _stub_ray_if_missing()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no GPU")
        gpu_ok = {"logprobs", "token_loss"}
        if not set(names) <= gpu_ok:
            p.error(f"--device cuda runs {sorted(gpu_ok)} only")
        sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
        device_name = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        sync = lambda: None  # noqa: E731
        device_name = "cpu"
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]

    for name in names:
        shapes, quick_shapes, default_reps = WORKLOADS[name]
        if args.shape:
            shapes = args.shape
        elif args.quick:
            shapes = quick_shapes
        for shape in shapes:
            ndim = len(WORKLOADS[name][0][0])
            if len(shape) != ndim:
                p.error(f"{name}: shape needs {ndim} dims ({SHAPE_DOC[name]}), got {shape}")
            ctx = types.SimpleNamespace(
                workload=name, shape=list(shape), dtype=dtype, dtype_name=args.dtype, threads=args.threads,
                reps=args.reps if args.reps is not None else (3 if args.quick else default_reps),
                warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
                impl_filter=args.impl, device=device, device_name=device_name, sync=sync,
                ray_stub=ray_stub,
            )
            RUNNERS[name](ctx)
            gc.collect()
    return 2 if _errors else 0


if __name__ == "__main__":
    sys.exit(main())
