"""posttrain's ops on PyTorch tensors, differentiable.

Each function here is a ``torch.autograd.Function`` whose backward is the
core's **closed-form** gradient (the same VJP the Rust API returns), so a
user's ``loss.backward()`` flows through posttrain into the model::

    import torch, posttrain.torch as pt
    logits = model(input_ids).logits[:, :-1]                 # [B, T, V]
    logp, ent = pt.log_probs_entropy(logits, input_ids[:, 1:])
    loss, metrics = pt.grpo_loss(logp, ent, mask, advantages,
                                 old_per_token_logps=old, loss_type="dapo")
    loss.backward()

f32 and f64 tensors compute in their own precision. The core runs on the
CPU: CPU tensors are read in place (no copy for contiguous tensors); tensors
on another device are copied to the host and the gradients copied back.

* :func:`grpo_loss` — TRL's GRPO-family loss (``GRPOTrainer._compute_loss``).
* :func:`verl_policy_loss` — verl's actor policy loss (+ KL loss).
* :func:`dpo_pair_loss` — TRL's DPO-family loss on sequence log-probs.
* :func:`log_probs_entropy` — token log-probs and entropies from logits.
* :func:`call` — any peer op by name (``posttrain.ops.list_ops()``),
  differentiable with respect to its differentiable inputs.
* :func:`core` — any op of the core by its Rust path
  (``posttrain.ops.core.list_ops()``), with the core's parameter names and
  configs (``posttrain.ops.core.config``), differentiable the same way.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from . import ops as _ops

__all__ = ["grpo_loss", "verl_policy_loss", "dpo_pair_loss", "log_probs_entropy", "call", "core"]


def _host(t: Any) -> Any:
    """A tensor as a NumPy array sharing its memory (CPU, contiguous) or a
    host copy; anything else unchanged."""
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
            t = t.float()
        return t.contiguous().numpy()
    return t


def _back(a: np.ndarray, like: torch.Tensor, *, own: bool = True) -> torch.Tensor:
    """``a`` as a tensor on ``like``'s device and dtype. With ``own`` (the
    default) the tensor owns its memory: tensors the autograd graph saves are
    freed by the engine, and a NumPy-backed one would need the GIL there
    (which can deadlock an interpreter that is shutting down). The large
    logits gradient is handed over without a copy (``own=False``)."""
    t = torch.from_numpy(a)
    if own and like.device.type == "cpu" and t.dtype == like.dtype:
        return t.clone()
    return t.to(device=like.device, dtype=like.dtype)


def _scalar_loss(value: float, like: torch.Tensor, pairs) -> torch.Tensor:
    """``value`` as a tensor on ``like``'s device whose gradient with respect
    to each ``(input, closed-form gradient)`` pair is that gradient."""
    inputs = [x for x, _ in pairs]
    grads = [g for _, g in pairs]
    v = torch.tensor(value, dtype=like.dtype, device=like.device)
    # The gradients go in as inputs (not saved attributes) so that autograd
    # routes them; only the inputs that require grad receive one.
    return _Route.apply(v, len(inputs), *inputs, *grads)


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: torch.Tensor, k: int, *rest: torch.Tensor) -> torch.Tensor:
        ctx.k = k
        ctx.save_for_backward(*rest[k:])
        return value.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        grads = ctx.saved_tensors
        return (None, None, *(g * gr for gr in grads), *(None for _ in grads))


def grpo_loss(
    per_token_logps: torch.Tensor,
    entropies: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_per_token_logps: Optional[torch.Tensor] = None,
    ref_per_token_logps: Optional[torch.Tensor] = None,
    sampling_per_token_logps: Optional[torch.Tensor] = None,
    importance_sampling_ratio: Optional[torch.Tensor] = None,
    tool_mask: Optional[torch.Tensor] = None,
    **config: Any,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """TRL's GRPO-family loss, differentiable with respect to
    ``per_token_logps`` and ``entropies`` (the entropy bonus).

    Arguments and ``config`` as :func:`posttrain.ops.grpo_loss` (TRL's
    ``GRPOConfig`` names; what is left out takes trl 1.16.0's defaults,
    :data:`posttrain.ops.TRL_GRPO_DEFAULTS`, including its off-policy mask
    on NaN sampler log-probs, ``off_policy_mask_nan_sampler_logps``).
    ``old_per_token_logps=None`` means on-policy
    (TRL's ``per_token_logps.detach()``). Returns ``(loss, metrics)``: the
    scalar TRL's ``_compute_loss`` returns and its logged metrics.
    """
    metrics, g_lp, g_ent = _ops.grpo_loss(
        _host(per_token_logps),
        _host(entropies),
        _host(completion_mask),
        _host(advantages),
        old_per_token_logps=_host(old_per_token_logps),
        ref_per_token_logps=_host(ref_per_token_logps),
        sampling_per_token_logps=_host(sampling_per_token_logps),
        importance_sampling_ratio=_host(importance_sampling_ratio),
        tool_mask=_host(tool_mask),
        **config,
    )
    pairs = [(per_token_logps, _back(g_lp, per_token_logps))]
    if config.get("entropy_coef", 0.0) or config.get("use_adaptive_entropy", False):
        # Only the entropy bonus differentiates the entropies; without it no
        # gradient (not even a zero one) flows into their computation.
        pairs.append((entropies, _back(g_ent, entropies)))
    loss = _scalar_loss(metrics["loss"], per_token_logps, pairs)
    return loss, metrics


def verl_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    rollout_is_weights: Optional[torch.Tensor] = None,
    ref_log_prob: Optional[torch.Tensor] = None,
    threads: Optional[int] = None,
    **config: Any,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """verl's actor loss, differentiable with respect to ``log_prob``.

    Arguments and ``config`` as :func:`posttrain.ops.verl_policy_loss`
    (verl's actor config names). Returns ``(loss, metrics)`` where ``loss``
    is ``pg_loss`` (plus ``kl_loss_coef · kl_loss`` with ``use_kl_loss``).
    """
    metrics, grad = _ops.verl_policy_loss(
        _host(old_log_prob),
        _host(log_prob),
        _host(advantages),
        _host(response_mask),
        rollout_is_weights=_host(rollout_is_weights),
        ref_log_prob=_host(ref_log_prob),
        threads=threads,
        **config,
    )
    total = metrics["pg_loss"]
    if config.get("use_kl_loss"):
        total = total + float(config.get("kl_loss_coef", 0.001)) * metrics["kl_loss"]
    loss = _scalar_loss(total, log_prob, [(log_prob, _back(grad, log_prob))])
    return loss, metrics


def dpo_pair_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    *,
    pair_weight: Optional[torch.Tensor] = None,
    **config: Any,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """TRL's DPO-family loss, differentiable with respect to
    ``chosen_logps`` and ``rejected_logps`` (arguments and ``config`` as
    :func:`posttrain.ops.dpo_pair_loss`, ``f_divergence_scores`` included:
    ``"zero_at_reference"`` gives trl 1.16.0's f-divergence scores, the
    default ``"constants_dropped"`` TRL f2cd577's). Returns ``(loss, metrics)``."""
    metrics, gc, gr = _ops.dpo_pair_loss(
        _host(chosen_logps),
        _host(rejected_logps),
        _host(ref_chosen_logps),
        _host(ref_rejected_logps),
        _host(chosen_len),
        _host(rejected_len),
        pair_weight=_host(pair_weight),
        **config,
    )
    loss = _scalar_loss(
        metrics["loss"],
        chosen_logps,
        [(chosen_logps, _back(gc, chosen_logps)), (rejected_logps, _back(gr, rejected_logps))],
    )
    return loss, metrics


class _LogProbsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float, threads):
        z = _host(logits)
        ids = _host(targets)
        lp, h, lse = _ops.log_probs_entropy(z, ids, temperature, threads=threads)
        ctx.temperature = temperature
        ctx.threads = threads
        lp_t, h_t, lse_t = (_back(a, logits) for a in (lp, h, lse))
        ctx.save_for_backward(logits, targets, lse_t, h_t)
        return lp_t, h_t

    @staticmethod
    def backward(ctx, g_lp: Optional[torch.Tensor], g_h: Optional[torch.Tensor]):
        logits, targets, lse, h = ctx.saved_tensors
        if g_lp is None:
            g_lp = torch.zeros_like(lse)
        g = _ops.log_probs_entropy_backward(
            _host(logits),
            _host(targets),
            _host(lse),
            _host(h),
            _host(g_lp),
            None if g_h is None else _host(g_h),
            ctx.temperature,
            threads=ctx.threads,
        )
        return _back(g, logits, own=False), None, None, None


def log_probs_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    threads: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs, entropy)`` of ``[..., V]`` logits at ``targets``
    (shaped ``logits.shape[:-1]``), from one read of the logits; the backward
    recomputes the softmax from the logits (nothing ``[..., V]``-sized is
    kept between forward and backward).

    TRL ``selective_log_softmax(logits / T, ids)`` + ``entropy_from_logits``,
    verl ``logprobs_from_logits`` + ``entropy_from_logits``.
    """
    return _LogProbsEntropy.apply(logits, targets, float(temperature), threads)


def _input_grads(names, tensors, wanted, grads) -> list:
    """The backward's gradient for each input tensor: the op's gradient of
    that input (as a tensor like it) where autograd wants one, else None."""
    out = []
    for n, t in zip(names, tensors):
        g = grads.get(n) if n in wanted else None
        out.append(None if g is None else _back(np.asarray(g), t).reshape(t.shape))
    return out


class _PeerOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op: str, names, static: Dict[str, Any], dtype: str, holder: dict, *tensors: torch.Tensor):
        kwargs = dict(static)
        kwargs.update({n: _host(t) for n, t in zip(names, tensors)})
        r = _ops.call(op, dtype=dtype, **kwargs)
        ctx.op, ctx.names, ctx.static, ctx.dtype = op, names, static, dtype
        ctx.out_names = holder["names"] = list(r.outputs)
        ctx.save_for_backward(*tensors)
        like = tensors[0]
        return tuple(
            torch.as_tensor(np.asarray(v, dtype=np.float64)).to(device=like.device, dtype=like.dtype)
            for v in r.outputs.values()
        )

    @staticmethod
    def backward(ctx, *g_outs: Optional[torch.Tensor]):
        tensors = ctx.saved_tensors
        skip = (None,) * 5
        wanted = [n for i, n in enumerate(ctx.names) if ctx.needs_input_grad[5 + i]]
        if not wanted:
            return (*skip, *(None for _ in tensors))
        cots = {n: _host(g) for n, g in zip(ctx.out_names, g_outs) if g is not None}
        kwargs = dict(ctx.static)
        kwargs.update({n: _host(t) for n, t in zip(ctx.names, tensors)})
        r = _ops.call(ctx.op, dtype=ctx.dtype, cotangents=cots, grads=wanted, **kwargs)
        return (*skip, *_input_grads(ctx.names, tensors, wanted, r.grads))


def call(op: str, **inputs_and_params: Any) -> Dict[str, torch.Tensor]:
    """Runs the peer op ``op`` (see :func:`posttrain.ops.call`) on tensors
    and returns ``{output: tensor}``, differentiable with respect to every
    float tensor input the op has a gradient for (the backward runs the
    core's closed-form VJP with the incoming gradients as cotangents).

    Computes in f32 if the first float input is f32, else in f64; every
    output is a float tensor of that dtype (masks as 0/1) on the first float
    input's device."""
    names, tensors, static = [], [], {}
    for k, v in inputs_and_params.items():
        if isinstance(v, torch.Tensor):
            names.append(k)
            tensors.append(v)
        else:
            static[k] = v
    if not tensors:
        raise ValueError(f"{op}: no tensor inputs")
    order = sorted(range(len(tensors)), key=lambda i: not tensors[i].is_floating_point())
    names = [names[i] for i in order]
    tensors = [tensors[i] for i in order]
    dtype = "f32" if tensors[0].dtype == torch.float32 else "f64"
    holder: Dict[str, Any] = {}
    outs = _PeerOp.apply(op, names, static, dtype, holder, *tensors)
    return dict(zip(holder["names"], outs))


class _CoreOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, path: str, names, static: Dict[str, Any], holder: dict, *tensors: torch.Tensor):
        from . import _core

        kwargs = dict(static)
        kwargs.update({n: _host(t) for n, t in zip(names, tensors)})
        r = _core.call(path, **kwargs)
        spec = _core.op_info(path)
        differentiable = {v["output"] for v in spec["vjp"]}
        ctx.path, ctx.names, ctx.static = path, names, static
        float_outs = [(k, v) for k, v in r.outputs.items() if np.asarray(v).dtype.kind == "f"]
        ctx.out_names = [k for k, _ in float_outs]
        holder["names"] = ctx.out_names
        holder["other"] = {k: v for k, v in r.outputs.items() if np.asarray(v).dtype.kind != "f"}
        holder["metrics"] = r.metrics
        ctx.save_for_backward(*tensors)
        like = next(t for t in tensors if t.is_floating_point())
        outs = tuple(_back(np.asarray(v), like) for _, v in float_outs)
        ctx.mark_non_differentiable(*(o for (k, _), o in zip(float_outs, outs) if k not in differentiable))
        return outs

    @staticmethod
    def backward(ctx, *g_outs: Optional[torch.Tensor]):
        from . import _core

        tensors = ctx.saved_tensors
        skip = (None,) * 4
        spec = _core.op_info(ctx.path)
        differentiable = {v["output"] for v in spec["vjp"]}
        wanted = [n for i, n in enumerate(ctx.names) if ctx.needs_input_grad[4 + i]]
        cots = {n: _host(g) for n, g in zip(ctx.out_names, g_outs) if g is not None and n in differentiable}
        if not wanted or not cots:
            return (*skip, *(None for _ in tensors))
        kwargs = dict(ctx.static)
        kwargs.update({n: _host(t) for n, t in zip(ctx.names, tensors)})
        r = _core.call(ctx.path, cotangents=cots, **kwargs)
        return (*skip, *_input_grads(ctx.names, tensors, wanted, r.grads))


def core(path: str, **inputs_and_params: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Runs the core op ``path`` (its Rust path, see
    :mod:`posttrain.ops.core`) on tensors and returns ``(outputs, metrics)``:
    ``outputs`` maps each output to a tensor on the first float input's
    device and dtype (int64 and bool outputs as NumPy arrays), ``metrics``
    maps each metric to a float.

    Outputs with a closed-form gradient (``posttrain.ops.core.op_info(path)
    ["vjp"]``) are differentiable with respect to the float tensor inputs
    they differentiate: the backward runs the core's VJP with the incoming
    gradients as cotangents. Computes in f32 if the first real input is f32,
    else in f64::

        clip = posttrain.ops.core.config("ClipConfig", preset="verl", eps_low=0.2, eps_high=0.28)
        out, metrics = pt.core("policy::token::policy_loss", loss={"Ppo": clip},
                               agg="token-mean", log_prob=logp, old_log_prob=old,
                               advantages=adv, mask=mask)
        out["loss"].backward()
    """
    names, tensors, static = [], [], {}
    for k, v in inputs_and_params.items():
        if isinstance(v, torch.Tensor):
            names.append(k)
            tensors.append(v)
        else:
            static[k] = v
    if not any(t.is_floating_point() for t in tensors):
        raise ValueError(f"{path}: no float tensor inputs (pass NumPy arrays to posttrain.ops.core instead)")
    holder: Dict[str, Any] = {}
    outs = _CoreOp.apply(path, names, static, holder, *tensors)
    result: Dict[str, Any] = dict(zip(holder["names"], outs))
    result.update(holder["other"])
    return result, holder["metrics"]
