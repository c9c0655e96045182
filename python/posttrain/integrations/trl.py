"""posttrain as TRL's GRPO and DPO loss.

One call makes a built ``GRPOTrainer`` (or ``DPOTrainer``) compute its loss
with posttrain::

    from trl import GRPOConfig, GRPOTrainer
    from posttrain.integrations.trl import use_posttrain

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(loss_type="dapo", beta=0.04), ...)
    use_posttrain(trainer)
    trainer.train()

What changes: the loss math of ``GRPOTrainer._compute_loss`` — importance
weights, clipping, the KL term, masks, the loss-type normalizer, the
entropy bonus — runs in posttrain-core (``posttrain.torch.grpo_loss``),
whose closed-form gradient flows into the model through autograd. What
stays TRL's: the model forward (``_get_per_token_logps_and_entropies``),
generation, rewards, advantages, the optimizer, distributed reductions of
the logged metrics, the adaptive-entropy controller's bookkeeping.

The configuration is the trainer's own: ``loss_type``, ``epsilon``,
``epsilon_high``, ``delta``, ``beta``, ``importance_sampling_level``,
``use_bias_correction_kl``, ``top_entropy_quantile``,
``off_policy_mask_threshold``, vLLM importance-sampling correction, SAPO
temperatures, VESPO parameters, entropy bonus — read at every step, so
changing ``trainer.args`` later is honoured.

Release behaviour: TRL 1.16 counts ``num_items_in_batch`` over the whole
generation batch and rescales the dapo/cispo/vespo normalizer by
``gradient_accumulation_steps / steps_per_generation`` in training, takes
their entropy bonus as a token mean, and sums luspo's rows over valid tokens;
the adapter passes ``steps_per_generation``, which selects these 1.16
normalizers in posttrain (the conformance vectors, from TRL f2cd577, have
the older ones — posttrain's default when ``steps_per_generation`` is absent).
TRL 1.16's off-policy mask (``off_policy_mask_threshold``) counts a sampler
log-prob vLLM could not score (NaN) as KL 0 instead of dropping the row
with ``A < 0`` (f2cd577); the adapter passes
``off_policy_mask_nan_sampler_logps="as_on_policy"``, which selects it. (The
vLLM importance-sampling ratio itself stays TRL's: it is computed at
generation, not in ``_compute_loss``.)

``DPOTrainer``: the policy and reference forwards stay TRL's (its fused LM
head gives the token log-probs); the loss over the sequence log-probs —
every ``loss_type`` but ``sft``, ``loss_weights``, the f-divergences,
``label_smoothing``, LD-DPO's ``ld_alpha``, WPO's ``use_weighting`` — and its
gradient are posttrain's (``posttrain.torch.dpo_pair_loss``).

Release behaviour: for ``f_divergence_type`` other than ``reverse_kl``, TRL
1.16 keeps the constant terms of the scores (forward_kl ``1 - exp(-x)``,
js_divergence ``log 2 + logsigmoid(x)``, alpha_divergence
``(exp((α-1)x) - 1)/(α-1)``), which do not cancel in ipo / sigmoid_norm, and
nca_pair, bco_pair, sppo_hard and apo_down read the raw log-ratios; the
adapter passes ``f_divergence_scores="zero_at_reference"``, which selects
this in posttrain (the conformance vectors, from TRL f2cd577, have the scores
without constants read by every loss — posttrain's default). (TRL 1.16's
``DPOTrainer`` itself refuses a divergence with nca_pair, bco_pair,
sppo_hard, aot, aot_unpaired, apo_zero, apo_down when it is built; the
adapter computes what ``_compute_loss`` does if the attribute is changed
afterwards.)

TRL 1.16's other release behaviours are posttrain options the adapter sets:
its GRPO normalizers (the dapo/cispo/vespo token count, their entropy bonus,
luspo's aggregation) are ``steps_per_generation``, and its off-policy mask on
NaN sampler log-probs is ``off_policy_mask_nan_sampler_logps="as_on_policy"``.

Tested against trl 1.16.0 (``python/tests/test_trl_e2e.py`` and
``python/tests/test_trl_dpo_e2e.py``: GRPO and DPO training runs with and
without the adapter agree to f32 tolerance).
"""

from __future__ import annotations

import types
from typing import Any, Dict

import torch

from .. import torch as pt

__all__ = ["use_posttrain", "grpo_loss_config"]


def grpo_loss_config(trainer: Any, inputs: Dict[str, Any]) -> Dict[str, Any]:
    """The ``posttrain.ops.grpo_loss`` configuration of a ``GRPOTrainer`` at
    this step: its config fields and the trainer state the normalizers use."""
    args = trainer.args
    mode = "train" if trainer.model.training else "eval"
    nib = inputs.get("num_items_in_batch")
    cfg: Dict[str, Any] = {
        "loss_type": trainer.loss_type,
        "importance_sampling_level": trainer.importance_sampling_level,
        "epsilon": trainer.epsilon_low,
        "epsilon_high": trainer.epsilon_high,
        "delta": getattr(args, "delta", None),
        "beta": trainer.beta,
        "use_bias_correction_kl": bool(getattr(args, "use_bias_correction_kl", False)),
        "top_entropy_quantile": trainer.top_entropy_quantile,
        "use_vllm": bool(trainer.use_vllm),
        "vllm_importance_sampling_correction": bool(getattr(trainer, "vllm_importance_sampling_correction", False)),
        "off_policy_mask_threshold": trainer.off_policy_mask_threshold,
        # TRL 1.16: a NaN sampler log-prob (vLLM could not score it) is KL 0.
        "off_policy_mask_nan_sampler_logps": "as_on_policy",
        "sapo_temperature_pos": getattr(args, "sapo_temperature_pos", 1.0),
        "sapo_temperature_neg": getattr(args, "sapo_temperature_neg", 1.05),
        "max_completion_length": trainer.max_completion_length,
        "num_items_in_batch": float(nib) if nib is not None else None,
        "num_processes": trainer.accelerator.num_processes,
        "current_gradient_accumulation_steps": trainer.current_gradient_accumulation_steps,
        "steps_per_generation": args.steps_per_generation,
        "mode": mode,
    }
    for k in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
        if hasattr(args, k):
            cfg[k] = getattr(args, k)
    if trainer._entropy_bonus_enabled:
        cfg["entropy_coef"] = trainer.entropy_coef
        if trainer.use_adaptive_entropy:
            cfg.update(
                use_adaptive_entropy=True,
                entropy_target=args.entropy_target,
                entropy_coef_min=args.entropy_coef_min,
                entropy_coef_max=args.entropy_coef_max,
                entropy_coef_delta=args.entropy_coef_delta,
                _last_world_entropy=trainer._last_world_entropy,
            )
    return cfg


def _compute_loss(self: Any, model: Any, inputs: Dict[str, Any]) -> torch.Tensor:
    """``GRPOTrainer._compute_loss`` with posttrain's loss (see the module docs)."""
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits_to_keep = completion_ids.size(1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

    per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        compute_entropy=True,
        compute_aux_loss=self.aux_loss_enabled,
        **{
            k: inputs.get(k)
            for k in (
                "pixel_values",
                "image_grid_thw",
                "num_images",
                "pixel_attention_mask",
                "spatial_shapes",
                "num_tiles",
                "image_sizes",
                "token_type_ids",
                "mm_token_type_ids",
                "image_position_ids",
            )
        },
    )
    advantages = inputs["advantages"]
    if advantages.dim() == 2 and advantages.size(1) != 1:
        raise ValueError(
            "posttrain's GRPO loss takes one advantage per completion ([B]); this trainer passes per-token "
            f"advantages of shape {tuple(advantages.shape)}"
        )
    cfg = grpo_loss_config(self, inputs)
    mode = cfg["mode"]
    use_is = cfg["use_vllm"] and cfg["vllm_importance_sampling_correction"]
    loss, m = pt.grpo_loss(
        per_token_logps,
        entropies,
        mask,
        advantages.reshape(-1),
        old_per_token_logps=inputs.get("old_per_token_logps"),
        ref_per_token_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
        sampling_per_token_logps=inputs.get("sampling_per_token_logps"),
        importance_sampling_ratio=inputs.get("importance_sampling_ratio")
        if (use_is or self.loss_type == "vespo")
        else None,
        **cfg,
    )
    self._posttrain_calls = getattr(self, "_posttrain_calls", 0) + 1

    acc = self.accelerator
    if self._entropy_bonus_enabled:
        self._metrics[mode]["policy_loss"].append(
            acc.gather(torch.tensor(m["policy_loss"], device=loss.device)).nanmean().item()
        )
        if self.use_adaptive_entropy and mode == "train":
            # TRL's controller bookkeeping (window sums reduced across ranks at
            # the optimizer-step boundary); the coefficient applied above came
            # from the previous step, as in TRL.
            eff = mask if self.top_entropy_quantile >= 1.0 else None
            if eff is None:
                eff = mask * self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            stats = torch.stack([(entropies * eff).sum(), eff.sum()]).detach()
            self._entropy_window_stats = (
                stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
            )
            if acc.sync_gradients:
                window = acc.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
                a = self.args
                if world_entropy <= a.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and acc.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    if self.aux_loss_enabled:
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
        self._metrics[mode]["aux_loss"].append(acc.gather_for_metrics(aux_loss).mean().item())

    # Logged metrics, reduced across ranks as TRL does: posttrain's local means
    # become (sum, count) pairs weighted by the local token (or row) count.
    tokens = mask.sum().float()
    rows = torch.tensor(float(mask.size(0)), device=mask.device)
    seq_level = self.importance_sampling_level == "sequence"

    def global_mean(local_mean: float, count: torch.Tensor) -> float:
        totals = acc.reduce(torch.stack([count * local_mean, count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    if self.beta != 0.0:
        self._metrics[mode]["kl"].append(global_mean(m["kl"], tokens))
    self._metrics[mode]["entropy"].append(global_mean(m["entropy"], tokens))
    if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        n = rows if seq_level else tokens
        self._metrics[mode]["clip_ratio/low_mean"].append(global_mean(m["clip_ratio/low_mean"], n))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_mean(m["clip_ratio/high_mean"], n))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_mean(m["clip_ratio/region_mean"], n))
        low_min = acc.gather(torch.tensor([m["clip_ratio/low_min"]], device=mask.device))
        high_max = acc.gather(torch.tensor([m["clip_ratio/high_max"]], device=mask.device))
        self._metrics[mode]["clip_ratio/low_min"].append(low_min.min().item())
        self._metrics[mode]["clip_ratio/high_max"].append(high_max.max().item())
    elif self.loss_type == "cispo":
        n = rows if seq_level else tokens
        self._metrics[mode]["cispo_clip_ratio"].append(global_mean(m["cispo_clip_ratio"], n))
    elif self.loss_type == "vespo":
        # phi is one weight per sequence ([B, 1]).
        self._metrics[mode]["vespo/phi_seq_mean"].append(global_mean(m["vespo/phi_seq_mean"], rows))
    return loss


_DPO_SUPPORTED = {
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm",
}


def _dpo_compute_loss(self: Any, model: Any, inputs: Dict[str, Any], return_outputs: bool = False) -> Any:
    """``DPOTrainer._compute_loss`` with posttrain's loss: the model forwards
    (policy and reference) are TRL's; the loss over the sequence
    log-probabilities and its gradient are posttrain's; the logged metrics
    are TRL's."""
    from trl.trainer import dpo_trainer as _dpo

    mode = "train" if self.model.training else "eval"
    acc = self.accelerator
    model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
    model_kwargs["use_cache"] = False
    if self.aux_loss_enabled:
        model_kwargs["output_router_logits"] = True
    completion_mask = inputs["completion_mask"]
    mask = completion_mask[..., 1:]
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    t = mask.size(1)
    token_logps = outputs.log_probs[:, -t:]

    # Sequence log-probability: the sum over the completion, or LD-DPO's
    # shared-prefix sum plus ld_alpha times the longer side's tail.
    if self.ld_alpha is not None:
        pos = mask.cumsum(dim=1)
        shared = torch.minimum(*mask.sum(dim=1).long().chunk(2, dim=0))
        shared = torch.cat([shared, shared], dim=0).unsqueeze(1)
        in_shared, in_tail = (pos > 0) & (pos <= shared), pos > shared

    def sequence_logps(tok: torch.Tensor) -> torch.Tensor:
        if self.ld_alpha is None:
            return tok.sum(dim=1)
        return (tok * in_shared).sum(dim=1) + self.ld_alpha * (tok * in_tail).sum(dim=1)

    chosen_logps, rejected_logps = sequence_logps(token_logps).chunk(2, dim=0)
    if self.precompute_ref_logps:
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    else:
        ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        with torch.no_grad(), _dpo.disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if _dpo.is_peft_model(self.model) and self.ref_model is None:
                unwrapped = acc.unwrap_model(self.model)
                with _dpo.use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    ref_out = self.model(**ref_kwargs, labels=labels, fused_lm_head=True)
            else:
                ref_out = self.ref_model(**ref_kwargs, labels=labels, fused_lm_head=True)
        ref_chosen, ref_rejected = sequence_logps(ref_out.log_probs[:, -t:]).chunk(2, dim=0)

    chosen_mask, rejected_mask = mask.chunk(2, dim=0)
    pair_weight = None
    if self.use_weighting:
        # WPO: each pair weighted by exp(mean aligned log-prob) of both sides (constants).
        with torch.no_grad():
            aligned = (token_logps - outputs.log_sum_sq_probs[:, -t:]) * mask
            w = torch.exp(aligned.sum(dim=1) / mask.sum(dim=1).clamp_min(1))
            w_chosen, w_rejected = w.chunk(2, dim=0)
            pair_weight = w_chosen * w_rejected
    dt = chosen_logps.dtype
    loss, _ = pt.dpo_pair_loss(
        chosen_logps,
        rejected_logps,
        ref_chosen.to(dt),
        ref_rejected.to(dt),
        chosen_mask.sum(dim=1).to(dt),
        rejected_mask.sum(dim=1).to(dt),
        pair_weight=pair_weight,
        loss_type=list(self.loss_types),
        loss_weights=list(self.loss_weights),
        beta=self.beta,
        label_smoothing=self.label_smoothing,
        f_divergence_type=self.f_divergence_type,
        f_alpha_divergence_coef=self.f_alpha_divergence_coef,
        # TRL 1.16's f-divergence scores (f2cd577's are posttrain's default).
        f_divergence_scores="zero_at_reference",
        discopop_tau=self.args.discopop_tau,
    )
    self._posttrain_calls = getattr(self, "_posttrain_calls", 0) + 1
    if self.aux_loss_enabled:
        loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        self._metrics[mode]["aux_loss"].append(acc.gather_for_metrics(outputs.aux_loss).mean().item())

    # TRL's logged metrics, reduced across ranks as TRL reduces them.
    def total(x: torch.Tensor) -> float:
        return acc.gather_for_metrics(x).sum().item()

    tokens = total(mask.sum())
    ent = total((outputs.entropy[:, -t:].detach() * mask).sum())
    self._metrics[mode]["entropy"].append(ent / tokens if tokens > 0 else 0.0)
    if mode == "train":
        self._total_train_tokens += total(inputs["attention_mask"].sum()) // self._tp_size
    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
    mean_logits_c, mean_logits_r = outputs.mean_logits[:, -t:].chunk(2, dim=0)
    n_c, n_r = total(chosen_mask.sum()), total(rejected_mask.sum())
    lc = total(mean_logits_c[chosen_mask.bool()].sum())
    lr = total(mean_logits_r[rejected_mask.bool()].sum())
    self._metrics[mode]["logits/chosen"].append(lc / n_c if n_c > 0 else 0.0)
    self._metrics[mode]["logits/rejected"].append(lr / n_r if n_r > 0 else 0.0)
    top1_c, _ = outputs.is_top1[:, -t:].chunk(2, dim=0)
    correct = total((top1_c & chosen_mask.bool()).sum())
    self._metrics[mode]["mean_token_accuracy"].append(correct / n_c if n_c > 0 else 0.0)
    r_c = self.beta * (chosen_logps - ref_chosen).detach()
    r_r = self.beta * (rejected_logps - ref_rejected).detach()
    self._metrics[mode]["rewards/chosen"].append(acc.gather(r_c).mean().item())
    self._metrics[mode]["rewards/rejected"].append(acc.gather(r_r).mean().item())
    self._metrics[mode]["rewards/accuracies"].append(acc.gather((r_c > r_r).float()).mean().item())
    self._metrics[mode]["rewards/margins"].append(acc.gather(r_c - r_r).mean().item())
    self._metrics[mode]["logps/chosen"].append(acc.gather(chosen_logps.detach()).mean().item())
    self._metrics[mode]["logps/rejected"].append(acc.gather(rejected_logps.detach()).mean().item())
    if return_outputs:
        with torch.no_grad():
            outputs = model(**model_kwargs)
        return loss, outputs
    return loss


def use_posttrain(trainer: Any) -> Any:
    """Makes ``trainer`` (a built ``trl.GRPOTrainer`` or ``trl.DPOTrainer``)
    compute its loss with posttrain and returns it. Idempotent;
    ``trainer._posttrain_calls`` counts the steps posttrain computed.

    Raises ``TypeError`` for another trainer and ``NotImplementedError`` for
    a DPO ``loss_type`` posttrain does not compute here (``sft``, whose term
    is a token-level NLL TRL builds from the model's outputs)."""
    cls_name = type(trainer).__name__
    if hasattr(trainer, "_get_per_token_logps_and_entropies") and hasattr(trainer, "loss_type"):
        trainer._compute_loss = types.MethodType(_compute_loss, trainer)
    elif hasattr(trainer, "loss_types") and hasattr(trainer, "precompute_ref_logps"):
        bad = [t for t in trainer.loss_types if t not in _DPO_SUPPORTED]
        if bad:
            raise NotImplementedError(f"posttrain's DPO adapter does not compute loss_type {bad} (supported: {sorted(_DPO_SUPPORTED)})")
        trainer._compute_loss = types.MethodType(_dpo_compute_loss, trainer)
    else:
        raise TypeError(f"use_posttrain expects a trl GRPOTrainer or DPOTrainer, got {cls_name}")
    trainer._posttrain_calls = getattr(trainer, "_posttrain_calls", 0)
    return trainer
