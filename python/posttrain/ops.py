"""posttrain's ops on NumPy arrays.

Three ways in:

**The core's own API** (:mod:`posttrain.ops.core`): every op of
posttrain-core under its Rust path (``ops.core.policy.token.policy_loss``),
its configs under their Rust type names and fields, built by the Rust
``preset(...)`` constructors (``ops.core.config("ClipConfig",
preset="verl", eps_low=0.2, eps_high=0.28)``); arrays read in place.

**Every peer op, by name.** The conformance vectors name 102 ops after the
peer function they reproduce (``verl.compute_policy_loss``,
``trl.grpo_loss``, ``openrlhf.compute_approx_kl``, ``torchtune.whiten``, …;
:func:`list_ops` lists them, :func:`op_info` gives an op's parameters,
inputs, outputs and differentiable inputs). :func:`call` runs one with the
peer's own parameter names and returns its outputs and, given cotangents,
the closed-form gradient of every differentiable input::

    import numpy as np, posttrain.ops as ops
    r = ops.call("verl.kl_penalty", logprob=np.log([[0.5, 0.25]]),
                 ref_logprob=np.log([[0.25, 0.25]]), kl_penalty="low_var_kl",
                 cotangents={"kl_estimate": np.ones((1, 2))})
    r["kl_estimate"], r.grads["logprob"]

The same ops are attributes of per-peer namespaces:
``ops.verl.kl_penalty(...)`` is ``ops.call("verl.kl_penalty", ...)``.
Inputs are copied into the core's form; use this path for anything, and the
hot ops below for the big tensors of a training step.

**Hot ops, in place.** :func:`grpo_loss` (TRL's GRPO-family loss),
:func:`verl_policy_loss` (verl's actor loss, KL loss included) and
:func:`log_probs_entropy` / :func:`log_probs_entropy_backward` read
contiguous f32 or f64 arrays without copying, compute value and gradient in
one call on all cores (the GIL released), and return the gradients as new
arrays.

Bad input (shape mismatch, unknown option, NaN where forbidden) raises
``ValueError`` with the core's message.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from . import _native
from . import _core as core

__all__ = [
    "OpResult",
    "call",
    "list_ops",
    "op_info",
    "grpo_loss",
    "verl_policy_loss",
    "dpo_pair_loss",
    "log_probs_entropy",
    "log_probs_entropy_backward",
    "trl",
    "verl",
    "openrlhf",
    "torchtune",
    "core",
]

_CATALOG_FILE = json.loads(pathlib.Path(__file__).with_name("_catalog.json").read_text())
_CATALOG: Dict[str, dict] = _CATALOG_FILE["ops"]
# Options the op handlers read beyond those the vectors use (release
# behaviours, normalizers); with an op's own parameters, the names accepted.
_HANDLER_PARAMS = frozenset(_CATALOG_FILE["handler_params"])


def _check_params(where: str, given: Iterable[str], known: Iterable[str]) -> None:
    known = set(known) | _HANDLER_PARAMS
    unknown = sorted(k for k in given if k not in known)
    if unknown:
        raise ValueError(
            f"{where}: unknown parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(f'`{k}`' for k in unknown)} (op_info() lists an op's parameters)"
        )


def list_ops() -> List[str]:
    """Every peer op :func:`call` runs, as ``<peer>.<op>``, sorted."""
    return sorted(_CATALOG)


def op_info(op: str) -> dict:
    """The op's peer source, parameters (with values the vectors use),
    inputs (dtype and rank), outputs and differentiable inputs."""
    try:
        return json.loads(json.dumps(_CATALOG[op]))
    except KeyError:
        raise ValueError(_unknown(op)) from None


def _unknown(op: str) -> str:
    peer = op.split(".", 1)[0]
    near = [o for o in _CATALOG if o.startswith(peer + ".")]
    hint = f"; {peer} ops: {', '.join(near)}" if near else "; posttrain.ops.list_ops() names them"
    return f"unknown op `{op}`{hint}"


class OpResult:
    """What :func:`call` returns: ``outputs`` (name → array; scalars are 0-d)
    and ``grads`` (input name → array shaped like that input).
    ``result[name]`` is ``result.outputs[name]``."""

    __slots__ = ("outputs", "grads")

    def __init__(self, outputs: Dict[str, np.ndarray], grads: Dict[str, np.ndarray]):
        self.outputs = outputs
        self.grads = grads

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]

    def __contains__(self, name: str) -> bool:
        return name in self.outputs

    def __repr__(self) -> str:
        return f"OpResult(outputs={sorted(self.outputs)}, grads={sorted(self.grads)})"


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor
        x = x.detach()
        if getattr(x, "device", None) is not None and x.device.type != "cpu":
            x = x.cpu()
        return x.numpy()
    return np.asarray(x)


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or (hasattr(x, "detach") and hasattr(x, "numpy"))


def _dtype_tag(a: np.ndarray) -> str:
    if a.dtype == np.bool_:
        return "bool"
    if np.issubdtype(a.dtype, np.integer):
        return "i64"
    if np.issubdtype(a.dtype, np.floating):
        return "f64"
    raise ValueError(f"arrays must be float, integer or bool, got {a.dtype}")


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"parameter value {x!r} is not a number, string, bool, list or None")


def _finite_or_named(v: Any) -> Any:
    """Non-finite floats as the strings the core reads (`"inf"`, `"-inf"`, `"nan"`)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (list, tuple)):
        return [_finite_or_named(x) for x in v]
    return v


def _params_json(params: Mapping[str, Any]) -> str:
    clean = {k: _finite_or_named(v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}
    return json.dumps(clean, default=_json_default, allow_nan=False)


def _out_shape(name: str, n: int, shapes: Dict[str, Tuple[int, ...]], rank: Optional[int]) -> Tuple[int, ...]:
    """An output's shape: that of the input it is named after, else a scalar
    (rank 0), else the shape of an input with as many elements (of the
    output's rank, as the vectors record it, when known), else flat."""
    if name in shapes and math.prod(shapes[name]) == n:
        return shapes[name]
    if rank == 0 and n == 1:
        return ()
    fits = [s for s in shapes.values() if math.prod(s) == n and (rank is None or len(s) == rank)]
    if fits:
        return max(fits, key=len)
    if n == 1 and rank is None:
        return ()
    return (n,)


def call(
    op: str,
    *,
    cotangents: Optional[Mapping[str, Any]] = None,
    grads: Optional[Iterable[str]] = None,
    dtype: str = "f64",
    **inputs_and_params: Any,
) -> OpResult:
    """Runs the peer op ``op`` (see :func:`list_ops`).

    Keyword arguments that name one of the op's inputs, or are arrays
    (NumPy or torch), are its inputs; the others are the peer's parameters
    under the peer's names (``loss_agg_mode="seq-mean-token-mean"``,
    ``kl_penalty="low_var_kl"``, …; ``op_info(op)["params"]``).

    ``cotangents`` (output name → array, or a number for a scalar output)
    asks for the vector-Jacobian product: ``result.grads[x]`` is
    ``Σ_o cotangent_o · ∂o/∂x`` for each differentiable input ``x``
    (``grads`` restricts or names them). ``dtype`` is the precision the core
    computes in, ``"f64"`` or ``"f32"``.
    """
    info = _CATALOG.get(op)
    if info is None:
        raise ValueError(_unknown(op))
    if dtype not in ("f64", "f32"):
        raise ValueError(f"dtype `{dtype}`: posttrain computes in f64 or f32")
    declared = info["inputs"]
    ins, shapes, params = [], {}, {}
    for name, value in inputs_and_params.items():
        if name in declared or _is_array(value):
            a = _to_numpy(value)
            tag = _dtype_tag(a)
            if name in declared and tag not in declared[name]["dtype"].split("|"):
                # The op's declared kind wins: a 0/1 float mask is a mask, an
                # integer array where floats are expected is floats.
                tag = declared[name]["dtype"].split("|")[0]
            shapes[name] = tuple(a.shape)
            ins.append((name, tag, list(a.shape), np.ascontiguousarray(a, dtype=np.float64).reshape(-1)))
        else:
            params[name] = value
    cots = []
    for name, value in (cotangents or {}).items():
        a = _to_numpy(value)
        cots.append((name, "f64", list(a.shape), np.ascontiguousarray(a, dtype=np.float64).reshape(-1)))
    if grads is None:
        wanted = [g for g in info["grads"] if g in shapes] if cots else []
    else:
        wanted = list(grads)
    _check_params(op, params, info["params"])
    values, gs = _native.peer_op(op, _params_json(params), ins, cots, wanted, dtype)
    ranks = info.get("output_ranks", {})
    outputs = {k: v.reshape(_out_shape(k, v.size, shapes, ranks.get(k))) for k, v in values}
    grads_out = {k: v.reshape(shapes.get(k, (v.size,))) for k, v in gs}
    return OpResult(outputs, grads_out)


def _describe_input(name: str, spec: dict) -> str:
    return f"{name} {spec['dtype']}[{spec['rank']}d]"


class _Peer:
    """``ops.<peer>.<op>(...)`` is ``ops.call("<peer>.<op>", ...)``."""

    def __init__(self, peer: str):
        self._peer = peer

    def __getattr__(self, name: str):
        op = f"{self._peer}.{name}"
        if op not in _CATALOG:
            raise AttributeError(_unknown(op))

        def run(**kwargs: Any) -> OpResult:
            return call(op, **kwargs)

        info = _CATALOG[op]
        run.__name__ = name
        run.__qualname__ = op
        run.__doc__ = (
            f"{op} — {info['source']}\n\nparams: {', '.join(info['params']) or '(none)'}\n"
            f"inputs: {', '.join(_describe_input(k, v) for k, v in info['inputs'].items())}\n"
            f"outputs: {', '.join(info['outputs'])}\ngradients wrt: {', '.join(info['grads']) or '(none)'}"
        )
        return run

    def __dir__(self) -> List[str]:
        return [o.split(".", 1)[1] for o in _CATALOG if o.startswith(self._peer + ".")]

    def __repr__(self) -> str:
        return f"<posttrain.ops.{self._peer}: {len(self.__dir__())} ops>"


trl = _Peer("trl")
verl = _Peer("verl")
openrlhf = _Peer("openrlhf")
torchtune = _Peer("torchtune")


# ---------------------------------------------------------------------------
# Hot ops: read in place, f32 or f64
# ---------------------------------------------------------------------------


def _float_dtype(a: np.ndarray) -> np.dtype:
    return np.dtype(np.float32) if a.dtype == np.float32 else np.dtype(np.float64)


def _flat(x: Any, dtype: np.dtype, name: str, n: Optional[int] = None) -> np.ndarray:
    a = np.ascontiguousarray(_to_numpy(x), dtype=dtype).reshape(-1)
    if n is not None and a.size != n:
        raise ValueError(f"shape mismatch: `{name}` has {a.size} elements, but the op requires {n}")
    return a


def _opt(x: Any, dtype: np.dtype, name: str, n: Optional[int] = None) -> Optional[np.ndarray]:
    return None if x is None else _flat(x, dtype, name, n)


# TRL's GRPOConfig defaults (trl 1.16.0) for what a caller leaves out, and
# trl 1.16.0's behaviour where it changed since the vectors' commit f2cd577
# (posttrain's release switches: "propagate" is f2cd577's NaN handling).
TRL_GRPO_DEFAULTS: Dict[str, Any] = {
    "loss_type": "dapo",
    "importance_sampling_level": "token",
    "epsilon": 0.2,
    "delta": None,
    "beta": 0.0,
    "top_entropy_quantile": 1.0,
    "use_bias_correction_kl": True,
    "off_policy_mask_nan_sampler_logps": "as_on_policy",
    "num_processes": 1,
    "current_gradient_accumulation_steps": 1,
    "mode": "train",
}


def grpo_loss(
    per_token_logps: Any,
    entropies: Any,
    completion_mask: Any,
    advantages: Any,
    *,
    old_per_token_logps: Any = None,
    ref_per_token_logps: Any = None,
    sampling_per_token_logps: Any = None,
    importance_sampling_ratio: Any = None,
    tool_mask: Any = None,
    **config: Any,
) -> Tuple[Dict[str, float], np.ndarray, np.ndarray]:
    """TRL's GRPO-family loss: ``GRPOTrainer._compute_loss`` after the forward.

    ``per_token_logps``, ``entropies``, ``completion_mask`` (and the optional
    old / ref / sampler log-probs) are ``[B, T]``; ``advantages`` is ``[B]``
    (or ``[B, 1]``); ``importance_sampling_ratio`` is ``[B, T]`` or
    ``[B, 1]``. ``config`` takes TRL's names: ``loss_type`` (grpo, bnpo,
    dr_grpo, dapo, luspo, cispo, sapo, vespo), ``importance_sampling_level``
    (token, sequence, sequence_token), ``epsilon``, ``epsilon_high``,
    ``delta``, ``beta``, ``use_bias_correction_kl``,
    ``top_entropy_quantile``, ``use_vllm`` +
    ``vllm_importance_sampling_correction``, ``off_policy_mask_threshold``
    (with ``off_policy_mask_nan_sampler_logps``: ``"as_on_policy"``, the
    default, is trl 1.16.0's mask, where a NaN sampler log-prob — a token
    vLLM could not score — counts as KL 0; ``"propagate"`` is f2cd577's,
    where it drops an ``A < 0`` row),
    ``sapo_temperature_pos/neg``, ``vespo_*``, ``entropy_coef`` (and the
    adaptive-entropy fields), and the trainer state ``max_completion_length``
    (default ``T``), ``num_items_in_batch`` (default: the mask's count),
    ``num_processes``, ``current_gradient_accumulation_steps``, ``mode``
    (``"train"``/``"eval"``). Missing fields take TRL's defaults
    (:data:`TRL_GRPO_DEFAULTS`).

    Returns ``(metrics, d loss/d per_token_logps, d loss/d entropies)``;
    ``metrics["loss"]`` is the loss TRL returns (already divided by the
    accumulation normalizer), the other entries TRL's logged metrics.
    """
    lp = _to_numpy(per_token_logps)
    if lp.ndim != 2:
        raise ValueError(f"`per_token_logps` must be [B, T], got shape {lp.shape}")
    b, t = lp.shape
    n = b * t
    dt = _float_dtype(lp)
    mask = np.ascontiguousarray(_to_numpy(completion_mask)).astype(bool, copy=False)
    if tool_mask is not None:
        mask = mask & np.asarray(_to_numpy(tool_mask)).astype(bool)
    adv = _to_numpy(advantages)
    if adv.ndim == 2 and adv.shape[1] != 1:
        raise ValueError(
            f"`advantages` must be one per row ([B] or [B, 1]), got shape {adv.shape}: "
            "TRL's base GRPO loss broadcasts a row's advantage over its tokens"
        )
    _check_params("grpo_loss", config, list(_CATALOG["trl.grpo_loss"]["params"]) + list(_CATALOG["trl.gspo_token_loss"]["params"]))
    p = dict(TRL_GRPO_DEFAULTS)
    p.update(config)
    if p.get("epsilon_high") is None:
        p["epsilon_high"] = p["epsilon"]
    p.setdefault("max_completion_length", t)
    if p.get("num_items_in_batch") is None:
        p["num_items_in_batch"] = float(mask.sum())
    fn = _native.grpo_loss_f32 if dt == np.float32 else _native.grpo_loss_f64
    metrics, g_lp, g_ent = fn(
        _params_json(p),
        b,
        t,
        _flat(lp, dt, "per_token_logps"),
        _flat(entropies, dt, "entropies", n),
        _flat(mask, np.dtype(bool), "completion_mask", n),
        _flat(adv, dt, "advantages", b),
        old_per_token_logps=_opt(old_per_token_logps, dt, "old_per_token_logps", n),
        ref_per_token_logps=_opt(ref_per_token_logps, dt, "ref_per_token_logps", n),
        sampling_per_token_logps=_opt(sampling_per_token_logps, dt, "sampling_per_token_logps", n),
        importance_sampling_ratio=_opt(importance_sampling_ratio, dt, "importance_sampling_ratio"),
    )
    return dict(metrics), g_lp.reshape(b, t), g_ent.reshape(b, t)


# verl's actor-config defaults (verl 0.9.1) for what a caller leaves out.
VERL_ACTOR_DEFAULTS: Dict[str, Any] = {
    "loss_mode": "vanilla",
    "clip_ratio": 0.2,
    "clip_ratio_c": 3.0,
    "loss_agg_mode": "token-mean",
}


def verl_policy_loss(
    old_log_prob: Any,
    log_prob: Any,
    advantages: Any,
    response_mask: Any,
    *,
    rollout_is_weights: Any = None,
    ref_log_prob: Any = None,
    threads: Optional[int] = None,
    **config: Any,
) -> Tuple[Dict[str, float], np.ndarray]:
    """verl's actor loss on ``[B, T]`` arrays: the policy loss selected by
    ``loss_mode`` (vanilla, gspo, gpg, clip_cov, kl_cov, geo_mean, cispo,
    sapo, dppo_tv, dppo_kl, …) with verl's actor config names
    (``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``,
    ``clip_ratio_c``, ``loss_agg_mode``, ``tau_pos``/``tau_neg``, …, and the
    global normalizers ``dp_size``, ``batch_num_tokens``,
    ``global_batch_size``, ``loss_scale_factor``), plus, with
    ``use_kl_loss=True``, ``kl_loss_coef · agg(kl_loss_type(log_prob,
    ref_log_prob))``.

    Token-local losses run in the fused single pass over all cores; GSPO,
    geo-mean, Clip-Cov and KL-Cov in the reference driver (the KL loss then
    separately, aggregated with the requested mode as verl does).
    ``gspo_honor_loss_agg_mode=True`` gives verl 0.9.1's GSPO, which honours
    ``loss_agg_mode`` (verl 1dda039, the vectors' commit and the default,
    forces ``seq-mean-token-mean``).

    An unknown keyword raises ``ValueError``.

    Returns ``(metrics, d total/d log_prob)`` with metrics ``pg_loss``,
    ``pg_clipfrac``, ``pg_clipfrac_lower``, ``ppo_kl``, ``kl_loss``
    (total = ``pg_loss + kl_loss_coef · kl_loss``).
    """
    lp = _to_numpy(log_prob)
    if lp.ndim != 2:
        raise ValueError(f"`log_prob` must be [B, T], got shape {lp.shape}")
    b, t = lp.shape
    n = b * t
    dt = _float_dtype(lp)
    _check_params("verl_policy_loss", config, ["use_kl_loss", "kl_loss_type", "kl_loss_coef"])
    p = dict(VERL_ACTOR_DEFAULTS)
    p.update(config)
    fn = _native.verl_policy_loss_f32 if dt == np.float32 else _native.verl_policy_loss_f64
    metrics, grad = fn(
        _params_json(p),
        b,
        t,
        _flat(old_log_prob, dt, "old_log_prob", n),
        _flat(lp, dt, "log_prob"),
        _flat(advantages, dt, "advantages", n),
        _flat(np.asarray(_to_numpy(response_mask)).astype(bool, copy=False), np.dtype(bool), "response_mask", n),
        rollout_is_weights=_opt(rollout_is_weights, dt, "rollout_is_weights", n),
        ref_log_prob=_opt(ref_log_prob, dt, "ref_log_prob", n),
        threads=threads,
    )
    return dict(metrics), grad.reshape(b, t)


# TRL's DPOConfig defaults (trl 1.16.0) for what a caller leaves out.
# (``f_divergence_scores`` is posttrain's release switch, not a DPOConfig
# field: absent, the handler takes TRL f2cd577's scores; the TRL adapter
# passes ``"zero_at_reference"``, trl 1.16.0's.)
TRL_DPO_DEFAULTS: Dict[str, Any] = {
    "loss_type": ["sigmoid"],
    "beta": 0.1,
    "label_smoothing": 0.0,
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 1.0,
    "discopop_tau": 0.05,
}


def dpo_pair_loss(
    chosen_logps: Any,
    rejected_logps: Any,
    ref_chosen_logps: Any,
    ref_rejected_logps: Any,
    chosen_len: Any,
    rejected_len: Any,
    *,
    pair_weight: Any = None,
    **config: Any,
) -> Tuple[Dict[str, float], np.ndarray, np.ndarray]:
    """TRL ``DPOTrainer``'s loss from sequence log-probabilities (``[B]``
    each): ``Σ_k w_k · mean_i ℓ_k(i)`` over ``loss_type`` (a name or a list:
    sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard,
    aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm) with
    ``loss_weights``, ``beta``, ``label_smoothing``, ``f_divergence_type``
    (reverse_kl, forward_kl, js_divergence, alpha_divergence) and
    ``f_alpha_divergence_coef``, ``discopop_tau``. ``chosen_len`` /
    ``rejected_len`` are the completion token counts (IPO and sigmoid_norm
    normalise by them); ``pair_weight`` multiplies each pair (WPO).

    ``f_divergence_scores`` picks the release behaviour for an
    ``f_divergence_type`` other than reverse_kl: ``"constants_dropped"``
    (the default, TRL f2cd577 and the conformance vectors: scores
    ``-exp(-x)``, ``logsigmoid(x)``, ``exp((α-1)x)/(α-1)``, read by every
    score-based loss) or ``"zero_at_reference"`` (trl 1.16.0: scores
    ``1 - exp(-x)``, ``log 2 + logsigmoid(x)``, ``(exp((α-1)x) - 1)/(α-1)``,
    which no longer cancel in ipo / sigmoid_norm; nca_pair, bco_pair,
    sppo_hard and apo_down read the raw log-ratios instead of the scores).
    Gradients are exact for both.

    Returns ``(metrics, d loss/d chosen_logps, d loss/d rejected_logps)``
    with ``metrics["loss"]`` and the reward metrics TRL logs.
    """
    c = _to_numpy(chosen_logps)
    dt = _float_dtype(c)
    n = c.size
    _check_params("dpo_pair_loss", config, _CATALOG["trl.dpo_loss"]["params"])
    p = dict(TRL_DPO_DEFAULTS)
    p.update(config)
    if isinstance(p["loss_type"], str):
        p["loss_type"] = [p["loss_type"]]
    fn = _native.dpo_pair_loss_f32 if dt == np.float32 else _native.dpo_pair_loss_f64
    metrics, gc, gr = fn(
        _params_json(p),
        _flat(c, dt, "chosen_logps"),
        _flat(rejected_logps, dt, "rejected_logps", n),
        _flat(ref_chosen_logps, dt, "ref_chosen_logps", n),
        _flat(ref_rejected_logps, dt, "ref_rejected_logps", n),
        _flat(chosen_len, dt, "chosen_len", n),
        _flat(rejected_len, dt, "rejected_len", n),
        pair_weight=_opt(pair_weight, dt, "pair_weight", n),
    )
    return dict(metrics), gc.reshape(c.shape), gr.reshape(c.shape)


def log_probs_entropy(
    logits: Any, targets: Any, temperature: float = 1.0, *, threads: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token log-probabilities ``log softmax(z/T)[target]`` and entropies
    ``−Σ p log p`` of ``[..., V]`` logits in one read (online log-sum-exp).

    TRL ``selective_log_softmax`` + ``entropy_from_logits``, verl
    ``logprobs_from_logits`` + ``entropy_from_logits``. Returns
    ``(log_probs, entropy, lse)`` shaped like ``targets``; pass ``lse`` to
    :func:`log_probs_entropy_backward`.
    """
    z = _to_numpy(logits)
    ids = np.ascontiguousarray(_to_numpy(targets), dtype=np.int64)
    if z.shape[:-1] != ids.shape:
        raise ValueError(f"logits {z.shape} and targets {ids.shape}: targets must be logits.shape[:-1]")
    v = z.shape[-1]
    rows = ids.size
    dt = _float_dtype(z)
    fn = _native.log_probs_entropy_f32 if dt == np.float32 else _native.log_probs_entropy_f64
    lp, h, lse = fn(_flat(z, dt, "logits"), rows, v, ids.reshape(-1), temperature, threads)
    return lp.reshape(ids.shape), h.reshape(ids.shape), lse.reshape(ids.shape)


def log_probs_entropy_backward(
    logits: Any,
    targets: Any,
    lse: Any,
    entropy: Any,
    d_log_probs: Any,
    d_entropy: Any = None,
    temperature: float = 1.0,
    *,
    threads: Optional[int] = None,
) -> np.ndarray:
    """The gradient of ``Σ d_log_probs · log_probs + Σ d_entropy · entropy``
    with respect to the logits (closed form, one read of the logits, one
    write): ``(1[k = t] − p_k)/T · d_lp − p_k (log p_k + H)/T · d_H``."""
    z = _to_numpy(logits)
    ids = np.ascontiguousarray(_to_numpy(targets), dtype=np.int64)
    v = z.shape[-1]
    rows = ids.size
    dt = _float_dtype(z)
    fn = _native.log_probs_entropy_backward_f32 if dt == np.float32 else _native.log_probs_entropy_backward_f64
    g = fn(
        _flat(z, dt, "logits"),
        rows,
        v,
        ids.reshape(-1),
        temperature,
        _flat(lse, dt, "lse", rows),
        _flat(entropy, dt, "entropy", rows),
        _flat(d_log_probs, dt, "d_log_probs", rows),
        d_entropy=_opt(d_entropy, dt, "d_entropy", rows),
        threads=threads,
    )
    return g.reshape(z.shape)
