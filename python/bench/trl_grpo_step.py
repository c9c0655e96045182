"""The TRL GRPO loss step with and without posttrain, side by side.

Times ``GRPOTrainer._compute_loss`` of the installed TRL (1.16.0 when this was
written) after the model forward — importance weights, clipping, the k3 KL
term, the loss-type normalizer and the logged metrics — forward and backward
to the per-token log-probs, against the same method with
``posttrain.integrations.trl.use_posttrain``. Both run on one stand-in
trainer whose ``_get_per_token_logps_and_entropies`` returns prepared leaf
tensors, so the model is not part of the timing (it is the same on both sides).

    python python/bench/trl_grpo_step.py            # [64, 1024] and [256, 4096]
    python python/bench/trl_grpo_step.py --quick    # fewer repetitions (CI smoke)

Prints a table and, last, one JSON line.
"""

import argparse
import collections
import json
import time
import types

import torch

from trl import GRPOTrainer

import posttrain
from posttrain.integrations.trl import _compute_loss as posttrain_compute_loss


class _Accel:
    num_processes = 1
    sync_gradients = True
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def stand_in(b, t, loss_type, beta, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(b, t, generator=g) * 0.5 - 1.5).float()
    old = lp + torch.randn(b, t, generator=g) * 0.1
    ref = lp + torch.randn(b, t, generator=g) * 0.1
    ent = torch.rand(b, t, generator=g) * 3
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    adv = torch.randn(b, generator=g)
    leaf = {}

    def get_logps(self, model, input_ids, attention_mask, logits_to_keep, **kw):
        leaf["lp"] = lp.clone().requires_grad_()
        return leaf["lp"], ent, None

    args = types.SimpleNamespace(
        delta=None, use_bias_correction_kl=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
        steps_per_generation=1, entropy_target=0.0, entropy_coef_min=0.0, entropy_coef_max=0.0, entropy_coef_delta=0.0,
    )
    me = types.SimpleNamespace(
        args=args, loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.28, importance_sampling_level="token",
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=t,
        accelerator=_Accel(), _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _entropy_bonus_enabled=False, use_adaptive_entropy=False, entropy_coef=0.0, aux_loss_enabled=False,
    )
    me._get_per_token_logps_and_entropies = types.MethodType(get_logps, me)
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
        "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    return me, inputs, leaf


def step(fn, me, inputs, leaf):
    loss = fn(me, None, inputs)
    loss.backward()
    return loss.item(), leaf["lp"].grad


def best_ms(fn, me, inputs, leaf, reps):
    step(fn, me, inputs, leaf)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(fn, me, inputs, leaf)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--loss-type", default="dapo")
    ap.add_argument("--beta", type=float, default=0.04)
    a = ap.parse_args()
    import trl

    print(f"TRL GRPO loss step, fwd+bwd: trl {trl.__version__} vs posttrain {posttrain.__version__} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads), loss_type={a.loss_type}, beta={a.beta}")
    print(f"{'shape':>14}  {'TRL ms':>9}  {'posttrain ms':>12}  {'ratio':>6}  |loss diff|  max|grad diff|")
    out = {}
    for b, t in ((64, 1024), (256, 4096)):
        me, inputs, leaf = stand_in(b, t, a.loss_type, a.beta)
        reps = 3 if a.quick else (30 if b == 64 else 10)
        l1, g1 = step(GRPOTrainer._compute_loss, me, inputs, leaf)
        l2, g2 = step(posttrain_compute_loss, me, inputs, leaf)
        trl_ms = best_ms(GRPOTrainer._compute_loss, me, inputs, leaf, reps)
        pt_ms = best_ms(posttrain_compute_loss, me, inputs, leaf, reps)
        ratio = trl_ms / pt_ms
        print(f"{str([b, t]):>14}  {trl_ms:9.2f}  {pt_ms:12.2f}  {ratio:5.2f}x  {abs(l1 - l2):.1e}      "
              f"{(g1 - g2).abs().max().item():.1e}")
        out[f"trl_grpo_step_{b}x{t}_vs_trl"] = round(ratio, 3)
        out[f"trl_grpo_step_{b}x{t}_trl_ms"] = round(trl_ms, 3)
        out[f"trl_grpo_step_{b}x{t}_posttrain_ms"] = round(pt_ms, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
