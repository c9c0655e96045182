"""``posttrain.ops.core``: posttrain-core's own API, under its Rust names.

Where :mod:`posttrain.ops` speaks the peers' languages (``verl.kl_penalty``
with verl's parameter names), this module speaks the core's: every op under
its Rust path below ``posttrain_core`` (``policy::token::policy_loss`` is
``ops.core.policy.token.policy_loss``), every config under its Rust type
name with its Rust field names, and the presets of the Rust ``preset(...)``
constructors::

    import numpy as np
    from posttrain.ops import core

    clip = core.config("ClipConfig", preset="verl", eps_low=0.2, eps_high=0.28)
    # {'eps_low': 0.2, 'eps_high': 0.28, 'dual_clip': 3.0, 'log_ratio_clamp': 20.0}
    r = core.policy.token.policy_loss(
        loss={"Ppo": clip}, agg="seq-mean-token-mean",
        log_prob=lp, old_log_prob=old, advantages=adv, mask=mask, grad=True)
    r["loss"], r.metrics["clipfrac"], r.grads["log_prob"]

**Configs** are plain dicts: the serde form of the Rust value (struct fields
by name; enums by their Rust variant name, ``{"Ppo": {...}}``, ``"K3"``, or
their documented tag, ``"seq-mean-token-mean"``). :func:`config` builds one
the way Rust does — the type's ``preset(...)`` constructor when ``preset=``
is given (``"trl"``, ``"verl"``, ``"openrlhf"``, ``"torchtune"``; the
constructor's own arguments, such as ``eps_low``/``eps_high`` or ``beta``,
passed by name), else its ``Default``, else the fields alone — lays the
remaining fields over it, and validates it with the core's checks. A
hand-written dict of the same form is accepted too.

**Arrays** are read in place (no copy) when they are C-contiguous NumPy
arrays of the call's precision: reals float64 or float32 (the first real
input decides; the others are converted to it), masks ``bool``, indices
``int64``. PyTorch CPU tensors are accepted through ``.numpy()``.

**Gradients**: ``grad=True`` asks for the closed-form gradient of the op's
first differentiable output with a unit cotangent (for an array output this
costs one extra forward, to learn its shape); ``cotangents={"out":
array}`` gives any cotangents explicitly. Gradients are in ``r.grads``, by
input name, shaped like the input.

Errors (unknown op, parameter, input or field; shape mismatch; a config the
core rejects) raise ``ValueError`` naming the op and what is wrong.
"""

from __future__ import annotations

import json
import types
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from . import _native

__all__ = ["call", "config", "list_ops", "op_info", "list_configs", "CoreResult"]

_SPEC = json.loads(_native.core_spec())
_OPS: Dict[str, dict] = {d["path"]: d for d in _SPEC["ops"]}


class CoreResult:
    """What a core op returns: ``outputs`` (name → array; scalars are 0-d
    arrays), ``metrics`` (name → float) and ``grads`` (input name → array
    shaped like that input). ``r[name]`` looks in outputs, then metrics."""

    __slots__ = ("outputs", "metrics", "grads")

    def __init__(self, outputs: Dict[str, np.ndarray], metrics: Dict[str, float],
                 grads: Dict[str, np.ndarray]):
        self.outputs = outputs
        self.metrics = metrics
        self.grads = grads

    def __getitem__(self, name: str):
        if name in self.outputs:
            return self.outputs[name]
        return self.metrics[name]

    def __contains__(self, name: str) -> bool:
        return name in self.outputs or name in self.metrics

    def __repr__(self) -> str:
        return (f"CoreResult(outputs={sorted(self.outputs)}, metrics={sorted(self.metrics)}, "
                f"grads={sorted(self.grads)})")


def list_ops() -> List[str]:
    """Every core op, by its Rust path below ``posttrain_core``, sorted."""
    return sorted(_OPS)


def op_info(path: str) -> dict:
    """An op's formula and peers (``doc``), parameters (Rust types), array
    inputs (kind, optional, shape and meaning), outputs and differentiable
    outputs (``vjp``)."""
    try:
        return json.loads(json.dumps(_OPS[path]))
    except KeyError:
        raise ValueError(_unknown_op(path)) from None


def list_configs() -> List[str]:
    """Every config type :func:`config` builds, by Rust type name (by path
    below ``posttrain_core`` where the name alone is ambiguous)."""
    names = [d["name"] for d in _SPEC["configs"]]
    return sorted(d["name"] if names.count(d["name"]) == 1 else d["path"] for d in _SPEC["configs"])


def _unknown_op(path: str) -> str:
    module = path.rsplit("::", 1)[0]
    near = [p for p in _OPS if p.startswith(module + "::")]
    hint = f"; in {module}: {', '.join(near)}" if near else "; list_ops() names them"
    return f"unknown core op `{path}`{hint}"


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        raise ValueError(
            f"{v} is not a valid parameter value (JSON has no NaN or infinity; "
            "an absent clamp or cap is None)"
        )
    return v


def config(ty: str, preset: Optional[str] = None, **fields: Any) -> dict:
    """Builds config ``ty`` (a Rust type name, :func:`list_configs`; where two
    modules define the same name, e.g. ``RlooConfig``, its path such as
    ``"policy::grpo::RlooConfig"``) as Rust
    does: ``ty::preset(preset, …)`` when ``preset`` is given (its extra
    arguments by name in ``fields``), else ``ty::default()`` where the type
    has one, else from ``fields`` alone; then the remaining ``fields`` laid
    over it (unknown field names raise), then the core's validation.
    Returns the config as a dict (its serde form)."""
    out = _native.core_config(ty, preset, json.dumps(_jsonable(fields)))
    return json.loads(out)


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor
        x = x.detach()
        if x.device.type != "cpu":
            raise ValueError("posttrain.ops.core reads CPU tensors; move the tensor with .cpu()")
        return x.numpy()
    return np.asarray(x)


def call(path: str, *, cotangents: Optional[Mapping[str, Any]] = None, grad: bool = False,
         **kwargs: Any) -> CoreResult:
    """Runs core op ``path`` (:func:`list_ops`): array inputs and parameters
    by name in ``kwargs`` (:func:`op_info` lists both), gradients by
    ``grad=True`` (unit cotangent on the first differentiable output) or
    explicit ``cotangents``."""
    spec = _OPS.get(path)
    if spec is None:
        raise ValueError(_unknown_op(path))
    in_specs = {i["name"]: i for i in spec["inputs"]}
    param_names = {p["name"] for p in spec["params"]}
    params: Dict[str, Any] = {}
    raw: Dict[str, Any] = {}
    for k, v in kwargs.items():
        if k in in_specs:
            if v is not None:
                raw[k] = v
        elif k in param_names:
            if v is not None:
                params[k] = _jsonable(v)
        else:
            ins = ", ".join(f"`{n}`" for n in in_specs) or "none"
            ps = ", ".join(f"`{n}`" for n in param_names) or "none"
            raise ValueError(f"{path}: unknown argument `{k}`; inputs: {ins}; parameters: {ps}")
    for name, i in in_specs.items():
        if not i["optional"] and name not in raw:
            raise ValueError(f"{path}: missing input `{name}` ({i['doc']})")
    dtype = None
    for name, i in in_specs.items():
        if i["kind"] == "real" and name in raw:
            a = _array(raw[name])
            dtype = np.float32 if a.dtype == np.float32 else np.float64
            break
    if dtype is None:
        dtype = np.float64
    inputs: Dict[str, np.ndarray] = {}
    for name, v in raw.items():
        kind = in_specs[name]["kind"]
        a = _array(v)
        if kind == "real":
            a = np.asarray(a, dtype=dtype, order="C")
        elif kind == "mask":
            a = np.asarray(a, dtype=np.bool_, order="C")
        else:
            if a.dtype.kind not in "iub":
                raise ValueError(f"{path}: input `{name}` must hold integers, got {a.dtype}")
            a = np.asarray(a, dtype=np.int64, order="C")
        inputs[name] = a
    cots: Dict[str, np.ndarray] = {}
    if cotangents:
        for k, v in cotangents.items():
            cots[k] = np.asarray(_array(v), dtype=dtype, order="C")
    elif grad:
        if not spec["vjp"]:
            raise ValueError(f"{path}: this op has no closed-form gradient")
        first = spec["vjp"][0]
        if first["scalar"]:
            cots[first["output"]] = np.ones((), dtype=dtype)
        else:
            # an array output: one forward to learn its shape
            outs, _, _ = _native.core_op(path, json.dumps(params), inputs, {}, np.dtype(dtype).name)
            cots[first["output"]] = np.ones(np.shape(outs[first["output"]]), dtype=dtype)
    outs, metrics, grads = _native.core_op(
        path, json.dumps(params), inputs, cots, np.dtype(dtype).name
    )
    return CoreResult(dict(outs), dict(metrics), dict(grads))


def _make(path: str, spec: dict):
    def op(*, cotangents=None, grad=False, **kwargs):
        return call(path, cotangents=cotangents, grad=grad, **kwargs)

    op.__name__ = path.rsplit("::", 1)[-1]
    op.__qualname__ = op.__name__
    lines = [spec["doc"], "", f"Rust: ``posttrain_core::{path}``.", "", "Parameters:"]
    lines += [f"  {p['name']} ({p['type']}): {p['doc']}" for p in spec["params"]] or ["  (none)"]
    lines += ["", "Inputs:"]
    lines += [
        f"  {i['name']} ({i['kind']}{', optional' if i['optional'] else ''}): {i['doc']}"
        for i in spec["inputs"]
    ]
    lines += ["", "Outputs:"] + [f"  {o['name']}: {o['doc']}" for o in spec["outputs"]]
    if spec["vjp"]:
        lines += ["", "Gradients:"] + [
            f"  from {v['output']} to {', '.join(v['inputs'])}" for v in spec["vjp"]
        ]
    op.__doc__ = "\n".join(lines)
    return op


def _namespace(name: str) -> types.SimpleNamespace:
    ns = types.SimpleNamespace()
    ns.__doc__ = f"posttrain_core::{name}"
    return ns


def _install(target: Dict[str, Any]) -> None:
    for path, spec in _OPS.items():
        parts = path.split("::")
        if parts[0] in __all__:
            raise RuntimeError(f"core module `{parts[0]}` shadows a function")
        if parts[0] not in target:
            target[parts[0]] = _namespace(parts[0])
        ns = target[parts[0]]
        for i, p in enumerate(parts[1:-1], start=1):
            if not hasattr(ns, p):
                setattr(ns, p, _namespace("::".join(parts[: i + 1])))
            ns = getattr(ns, p)
        setattr(ns, parts[-1], _make(path, spec))


_install(globals())
