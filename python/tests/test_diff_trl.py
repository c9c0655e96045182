"""Differential tests: posttrain against the released TRL installed from pip.

On seeded random inputs of several shapes (``(1, 1)``, ``(4, 7)``,
``(8, 33)``; completion masks with right padding, holes and an empty row;
old log-probs perturbed by ~0.5 so that ratios clip; reward groups with
``num_generations`` 1 (singletons), 2, 3, 4, 8 and unscorable completions)
every TRL op posttrain shares and that the release still has is run through
TRL's own installed code and through posttrain, and the two must agree: f64
within 1e-9 relative (1e-12 absolute), f32 within 1e-4 relative (1e-5
absolute), values, logged metrics and gradients (``torch.autograd`` on TRL's
side, posttrain's closed-form VJPs on ours). Where TRL itself computes in
float32 whatever the input dtype (clip-ratio metrics via ``.float()``, ORPO's
``odds_ratio_loss``, the fused LM head, the chunked distillation kernel) the
comparison uses the f32 tolerance.

TRL's trainer methods are called unbound on a minimal stand-in ``self`` that
carries exactly the attributes the method reads (an identity accelerator,
``_metrics`` dicts, ``model.training``, the config fields, and, for the GRPO
loss, a ``_get_per_token_logps_and_entropies`` that returns the prepared
leaf tensors). Models are stand-ins that return prepared logits; for the
trainers whose 1.16 forward goes through TRL's fused LM head
(``add_fused_lm_head``, computed in float32 whatever the model dtype), the
f64 comparisons use a stand-in head that builds the same
``FusedCausalLMOutput`` from the logits with TRL's own ``selective_log_softmax``
/ ``entropy_from_logits``, and the real fused head (identity LM-head weight)
is compared at the f32 tolerance.

posttrain's conformance vectors were recorded from TRL commit
``f2cd57710ae3``; the installed release can differ. Each difference found is
a ``test_release_difference_<what>`` test: it asserts the release behaviour
through the posttrain option that selects it, or is a strict xfail naming
the difference where posttrain has no such option yet. Mismatches that are
not release differences (TRL behaves the same at both commits) are
``test_mismatch_<what>`` strict xfails. ``test_release_vs_vectors_grpo_loss``
replays the recorded grpo_loss vectors through the release's own code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import zlib
from collections import defaultdict
from typing import Any, Dict, Optional

import numpy as np
import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

trl = pytest.importorskip("trl")
torch = pytest.importorskip("torch")

import posttrain.ops as ops  # noqa: E402
from trl.trainer import utils as trl_utils  # noqa: E402
from trl.trainer.grpo_config import GRPOConfig  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402

VECTORS_COMMIT = "f2cd57710ae3"
RELEASE = "1.16.0"
# The release-difference tests pin the behaviour of this release.
release_only = pytest.mark.skipif(
    trl.__version__ != RELEASE, reason=f"pins trl {RELEASE} behaviour (installed: {trl.__version__})"
)

DTYPES = ["f64", "f32"]
TOL = {"f64": (1e-9, 1e-12), "f32": (1e-4, 1e-5)}
TDT = {"f64": torch.float64, "f32": torch.float32}
NDT = {"f64": np.float64, "f32": np.float32}
SHAPES = [(1, 1), (4, 7), (8, 33)]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The peer's tensors are tiny: torch's intra-op thread pool only spins (and, on a shared
    machine, makes each op ~10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rng_for(*key: Any) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def assert_close(actual: Any, expected: Any, dt: str, what: str = "") -> None:
    rtol, atol = TOL[dt]
    e = np.asarray(_np(expected), dtype=np.float64)
    a = np.asarray(_np(actual), dtype=np.float64)
    assert a.size == e.size, f"{what}: posttrain shape {a.shape}, trl shape {e.shape}"
    np.testing.assert_allclose(a.reshape(e.shape), e, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


@contextlib.contextmanager
def default_dtype(dt: str):
    """TRL builds some constants with the default dtype (``torch.where(c, 1.0, 1.05)``,
    ``torch.zeros(1)``): run the peer with the default dtype of the precision under test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(TDT[dt])
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def t(x: Any, dt: Optional[str] = None, grad: bool = False) -> torch.Tensor:
    a = np.asarray(x)
    if dt is not None:
        a = a.astype(NDT[dt])
    # torch.tensor copies into torch-owned memory. (A from_numpy tensor still referenced by the
    # autograd engine's thread-local queue after a failing backward needs the GIL in its deleter
    # at interpreter exit: the process then hangs in exit().)
    out = torch.tensor(np.ascontiguousarray(a))
    if grad:
        out.requires_grad_(True)
    return out


class Accel:
    """A one-process accelerator: gather / reduce / pad are identities."""

    process_index = 0
    device = torch.device("cpu")
    sync_gradients = True

    def __init__(self, num_processes: int = 1):
        self.num_processes = num_processes

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x

    def unwrap_model(self, m):
        return m

    def autocast(self):
        return contextlib.nullcontext()


def new_metrics():
    return {"train": defaultdict(list), "eval": defaultdict(list)}


def last_metrics(m: Dict[str, list]) -> Dict[str, float]:
    return {k: v[-1] for k, v in m.items() if v}


def completion_mask(rng: np.random.Generator, b: int, t_: int, *, holes: bool = True, empty_row: bool = True):
    """Right padding (lengths 1..T), holes inside the completion, and one empty row when B ≥ 4."""
    lengths = rng.integers(1, t_ + 1, size=b)
    m = np.arange(t_)[None, :] < lengths[:, None]
    if holes and t_ > 2:
        m &= rng.random((b, t_)) > 0.15
    if empty_row and b >= 4:
        m[1] = False
    return m


def f32_representable(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64)


# ---------------------------------------------------------------------------
# selective_log_softmax / entropy_from_logits / log_probs_entropy
# ---------------------------------------------------------------------------


def logits_case(shape, dt, key):
    rng = rng_for("logits", shape, key)
    b, t_, v = shape
    z = rng.normal(0.0, 2.0, size=(b, t_, v))
    ids = rng.integers(0, v, size=(b, t_))
    return z.astype(NDT[dt]), ids


LOGIT_SHAPES = [(1, 1, 2), (4, 7, 11), (8, 33, 50)]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", LOGIT_SHAPES, ids=str)
def test_selective_log_softmax(shape, dt):
    z, ids = logits_case(shape, dt, "sls")
    cot = rng_for("sls-cot", shape).normal(size=ids.shape)
    zt = t(z, grad=True)
    with default_dtype(dt):
        lp = trl_utils.selective_log_softmax(zt, t(ids))
        (lp * t(cot, dt)).sum().backward()
    r = ops.call("trl.selective_log_softmax", dtype=dt, logits=z, index=ids, cotangents={"per_token_logps": cot})
    assert_close(r["per_token_logps"], lp, dt, "per_token_logps")
    assert_close(r.grads["logits"], zt.grad, dt, "d/dlogits")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("chunk_size", [128, 4])
@pytest.mark.parametrize("shape", LOGIT_SHAPES, ids=str)
def test_entropy_from_logits(shape, chunk_size, dt):
    z, _ = logits_case(shape, dt, "ent")
    cot = rng_for("ent-cot", shape).normal(size=shape[:-1])
    zt = t(z, grad=True)
    with default_dtype(dt):
        h = trl_utils.entropy_from_logits(zt, chunk_size=chunk_size)
        (h * t(cot, dt)).sum().backward()
    r = ops.call("trl.entropy_from_logits", dtype=dt, logits=z, chunk_size=chunk_size, cotangents={"entropies": cot})
    assert_close(r["entropies"], h, dt, "entropies")
    assert_close(r.grads["logits"], zt.grad, dt, "d/dlogits")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", LOGIT_SHAPES, ids=str)
def test_log_probs_entropy_hot_op(shape, temperature, dt):
    """The hot op against TRL 1.16's ``selective_log_softmax(..., temperature=)`` and
    ``entropy_from_logits(logits / T)``, values and the joint VJP."""
    z, ids = logits_case(shape, dt, "lpe")
    rng = rng_for("lpe-cot", shape, temperature)
    d_lp, d_h = rng.normal(size=ids.shape), rng.normal(size=ids.shape)
    zt = t(z, grad=True)
    with default_dtype(dt):
        lp = trl_utils.selective_log_softmax(zt, t(ids), temperature=temperature)
        h = trl_utils.entropy_from_logits(zt / temperature)
        ((lp * t(d_lp, dt)).sum() + (h * t(d_h, dt)).sum()).backward()
    plp, ph, lse = ops.log_probs_entropy(z, ids, temperature)
    assert plp.dtype == NDT[dt]
    assert_close(plp, lp, dt, "log_probs")
    assert_close(ph, h, dt, "entropy")
    g = ops.log_probs_entropy_backward(
        z, ids, lse, ph, d_lp.astype(NDT[dt]), d_h.astype(NDT[dt]), temperature
    )
    assert_close(g, zt.grad, dt, "d/dlogits")
    g_lp_only = ops.log_probs_entropy_backward(z, ids, lse, ph, d_lp.astype(NDT[dt]), None, temperature)
    zt2 = t(z, grad=True)
    with default_dtype(dt):
        (trl_utils.selective_log_softmax(zt2, t(ids), temperature=temperature) * t(d_lp, dt)).sum().backward()
    assert_close(g_lp_only, zt2.grad, dt, "d/dlogits (log-probs only)")


@pytest.mark.parametrize("dt", DTYPES)
def test_selective_log_softmax_row_mask(dt):
    """TRL 1.16 adds ``row_mask`` (masked positions return 0): posttrain's log-probs times the mask."""
    z, ids = logits_case((4, 7, 11), dt, "rowmask")
    m = completion_mask(rng_for("rowmask"), 4, 7)
    with default_dtype(dt):
        lp = trl_utils.selective_log_softmax(t(z), t(ids), row_mask=t(m))
    plp, _, _ = ops.log_probs_entropy(z, ids)
    assert_close(np.where(m, plp, 0.0), lp, dt, "masked log_probs")


# ---------------------------------------------------------------------------
# nanstd / nanmax / nanmin
# ---------------------------------------------------------------------------


def nan_case(shape, key, holes=True):
    rng = rng_for("nan", shape, key)
    x = rng.normal(size=shape)
    if holes and x.size > 1:
        x[rng.random(shape) < 0.25] = np.nan
    return x


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize(
    "dim,keepdim", [(None, False), (1, False), (0, True), (-1, True), ((0, 1), False)], ids=str
)
@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (8, 33)], ids=str)
def test_nanstd(shape, dim, keepdim, dt):
    x = nan_case(shape, "std").astype(NDT[dt])
    xt = t(x, grad=True)
    with default_dtype(dt):
        s = trl_utils.nanstd(xt, dim=dim, keepdim=keepdim)
        cot = rng_for("nanstd-cot", shape, dim).normal(size=tuple(s.shape))
        (torch.nan_to_num(s * t(cot, dt), nan=0.0)).sum().backward()
    kw = {"dim": list(dim) if isinstance(dim, tuple) else dim, "keepdim": keepdim}
    r = ops.call("trl.nanstd", dtype=dt, tensor=x, cotangents={"std": cot}, **kw)
    assert_close(r["std"], s, dt, "std")
    # TRL's autograd gives NaN gradients through NaN entries and rows with < 2 values; compare where finite.
    g_t = _np(xt.grad)
    g_p = np.asarray(r.grads["tensor"]).reshape(g_t.shape)
    fin = np.isfinite(g_t)
    assert_close(g_p[fin], g_t[fin], dt, "d/dtensor (finite entries)")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n,holes", [(1, False), (7, True), (33, True), (5, "all")], ids=str)
def test_nanmax_nanmin(n, holes, dt):
    x = nan_case((n,), "mm", holes=bool(holes)).astype(NDT[dt])
    if holes == "all":
        x[:] = np.nan
    with default_dtype(dt):
        mx, mn = trl_utils.nanmax(t(x)), trl_utils.nanmin(t(x))
    assert_close(ops.call("trl.nanmax", dtype=dt, tensor=x)["value"], mx, dt, "nanmax")
    assert_close(ops.call("trl.nanmin", dtype=dt, tensor=x)["value"], mn, dt, "nanmin")


# ---------------------------------------------------------------------------
# GRPO: the loss (GRPOTrainer._compute_loss)
# ---------------------------------------------------------------------------

# TRL 1.16's GRPOConfig defaults for the fields the loss reads.
GRPO_DEFAULTS: Dict[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(GRPOConfig)
    if f.name
    in (
        "loss_type",
        "importance_sampling_level",
        "epsilon",
        "epsilon_high",
        "delta",
        "beta",
        "use_bias_correction_kl",
        "top_entropy_quantile",
        "off_policy_mask_threshold",
        "vllm_importance_sampling_correction",
        "sapo_temperature_pos",
        "sapo_temperature_neg",
        "vespo_k_pos",
        "vespo_lambda_pos",
        "vespo_k_neg",
        "vespo_lambda_neg",
        "entropy_coef",
        "use_adaptive_entropy",
        "entropy_target",
        "entropy_coef_min",
        "entropy_coef_max",
        "entropy_coef_delta",
    )
}
GRPO_STATE_DEFAULTS = {
    "use_vllm": False,
    "num_processes": 1,
    "current_gradient_accumulation_steps": 1,
    "steps_per_generation": None,  # None: = current_gradient_accumulation_steps (TRL's default when gas is constant)
    "mode": "train",
    "_last_world_entropy": math.inf,
}

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"]
TOKEN_COUNT_LOSSES = ("cispo", "dapo", "vespo")
CLIPPED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


class _GRPOSelf:
    """The stand-in ``self`` for ``GRPOTrainer._compute_loss``: TRL's own helper methods."""

    _compute_loss = GRPOTrainer._compute_loss
    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask
    get_off_policy_mask = staticmethod(GRPOTrainer.get_off_policy_mask)
    get_gamma_weights = staticmethod(GRPOTrainer.get_gamma_weights)


def grpo_data(shape, key, *, is_ratio: Optional[str] = None, sampling: bool = False, old: bool = True, tool: bool = False):
    """Seeded GRPO inputs (f64); entropies rounded to f32 (see test_mismatch_high_entropy_mask_f32_quantile)."""
    b, t_ = shape
    rng = rng_for("grpo", shape, key)
    mask = completion_mask(rng, b, t_)
    lp = -np.abs(rng.normal(0.8, 0.8, size=(b, t_))) - 0.01
    d = {
        "per_token_logps": lp,
        "entropies": f32_representable(rng.uniform(0.0, 3.0, size=(b, t_))),
        "completion_mask": mask,
        "advantages": rng.normal(size=b),
        "ref_per_token_logps": lp + rng.normal(0.0, 0.3, size=(b, t_)),
    }
    if b > 2:
        d["advantages"][2] = 0.0
    if old:
        d["old_per_token_logps"] = lp + rng.normal(0.0, 0.5, size=(b, t_))
    if sampling:
        base = d.get("old_per_token_logps", lp)
        d["sampling_per_token_logps"] = base + rng.normal(0.05, 0.2, size=(b, t_))
    if is_ratio == "token":
        # As TRL builds it (exp of the masked log-ratio difference): 1 outside the mask
        # (see test_mismatch_vespo_gamma_unmasked_is_ratio).
        d["importance_sampling_ratio"] = np.where(mask, np.exp(rng.normal(0.0, 0.3, size=(b, t_))), 1.0)
    elif is_ratio == "row":
        d["importance_sampling_ratio"] = np.exp(rng.normal(0.0, 0.3, size=(b, 1)))
    if tool:
        d["tool_mask"] = rng.random((b, t_)) > 0.25  # tool-output tokens inside completions
    return d


def loss_mask(data):
    m = np.asarray(data["completion_mask"], dtype=bool)
    return m & np.asarray(data["tool_mask"], dtype=bool) if "tool_mask" in data else m


def grpo_full_cfg(cfg: Dict[str, Any], data: Dict[str, np.ndarray]) -> Dict[str, Any]:
    c = dict(GRPO_DEFAULTS)
    c.update(GRPO_STATE_DEFAULTS)
    c.update(cfg)
    b, t_ = data["per_token_logps"].shape
    c.setdefault("max_completion_length", t_ + 3)
    if c.get("num_items_in_batch") is None:
        c["num_items_in_batch"] = float(loss_mask(data).sum()) * c["num_processes"]
    if c.get("steps_per_generation") is None:
        c["steps_per_generation"] = c["current_gradient_accumulation_steps"]
    return c


def trl_grpo(cfg: Dict[str, Any], data: Dict[str, np.ndarray], dt: str):
    """``GRPOTrainer._compute_loss`` on a stand-in self; returns (loss, d/dlogps, d/dentropies, metrics, self)."""
    c = grpo_full_cfg(cfg, data)
    s = _GRPOSelf()
    s.loss_type = c["loss_type"]
    s.importance_sampling_level = c["importance_sampling_level"]
    s.epsilon_low = c["epsilon"]
    s.epsilon_high = c["epsilon_high"] if c["epsilon_high"] is not None else c["epsilon"]
    s.beta = c["beta"]
    s.top_entropy_quantile = c["top_entropy_quantile"]
    s.off_policy_mask_threshold = c["off_policy_mask_threshold"]
    s.use_vllm = c["use_vllm"]
    s.vllm_importance_sampling_correction = c["vllm_importance_sampling_correction"]
    s.max_completion_length = c["max_completion_length"]
    s.current_gradient_accumulation_steps = c["current_gradient_accumulation_steps"]
    s.aux_loss_enabled = False
    s.router_aux_loss_coef = 0.0
    s.entropy_coef = c["entropy_coef"]
    s.use_adaptive_entropy = c["use_adaptive_entropy"]
    s._entropy_bonus_enabled = s.entropy_coef != 0.0 or s.use_adaptive_entropy
    s._last_world_entropy = c["_last_world_entropy"]
    s._entropy_window_stats = None
    s._metrics = new_metrics()
    s.model = types.SimpleNamespace(training=c["mode"] == "train")
    s.accelerator = Accel(c["num_processes"])
    s.args = types.SimpleNamespace(
        **{
            k: c[k]
            for k in (
                "delta",
                "use_bias_correction_kl",
                "sapo_temperature_pos",
                "sapo_temperature_neg",
                "vespo_k_pos",
                "vespo_lambda_pos",
                "vespo_k_neg",
                "vespo_lambda_neg",
                "steps_per_generation",
                "entropy_target",
                "entropy_coef_min",
                "entropy_coef_max",
                "entropy_coef_delta",
            )
        }
    )
    with default_dtype(dt):
        lp = t(data["per_token_logps"], dt, grad=True)
        ent = t(data["entropies"], dt, grad=True)
        s._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent, None)
        b, t_ = lp.shape
        inputs = {
            "prompt_ids": torch.zeros((b, 1), dtype=torch.long),
            "prompt_mask": torch.ones((b, 1), dtype=torch.long),
            "completion_ids": torch.zeros((b, t_), dtype=torch.long),
            "completion_mask": t(data["completion_mask"].astype(np.int64)),
            "advantages": t(data["advantages"], dt),
            "num_items_in_batch": torch.tensor(float(c["num_items_in_batch"])),
        }
        for k in ("old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps", "importance_sampling_ratio"):
            if k in data:
                inputs[k] = t(data[k], dt)
        if "tool_mask" in data:
            inputs["tool_mask"] = t(data["tool_mask"].astype(np.int64))
        loss = s._compute_loss(None, inputs)
        loss.backward()
    g_ent = ent.grad if ent.grad is not None else torch.zeros_like(ent)
    return loss.item(), lp.grad, g_ent, last_metrics(s._metrics[c["mode"]]), s


def pt_grpo(cfg: Dict[str, Any], data: Dict[str, np.ndarray], dt: str, *, steps_per_generation: bool = False):
    c = grpo_full_cfg(cfg, data)
    if not steps_per_generation:
        c.pop("steps_per_generation")
    # posttrain's parameter JSON has no Infinity: the vectors spell it "inf" (see test_mismatch_infinite_parameter).
    c = {k: ("inf" if isinstance(v, float) and math.isinf(v) and v > 0 else v) for k, v in c.items()}
    arrays = {k: (v.astype(NDT[dt]) if v.dtype.kind == "f" else v) for k, v in data.items()}
    return ops.grpo_loss(
        arrays.pop("per_token_logps"),
        arrays.pop("entropies"),
        arrays.pop("completion_mask"),
        arrays.pop("advantages"),
        **arrays,
        **c,
    )


F32_METRICS = {
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
    "cispo_clip_ratio",
}


def compare_grpo(cfg, data, dt, *, steps_per_generation=False, what=""):
    loss, g_lp, g_ent, m_trl, _ = trl_grpo(cfg, data, dt)
    m_pt, pg_lp, pg_ent = pt_grpo(cfg, data, dt, steps_per_generation=steps_per_generation)
    assert pg_lp.dtype == NDT[dt]
    assert_close(m_pt["loss"], loss, dt, f"{what} loss")
    assert_close(pg_lp, g_lp, dt, f"{what} d loss/d per_token_logps")
    assert_close(pg_ent, g_ent, dt, f"{what} d loss/d entropies")
    for k, v in m_trl.items():
        assert k in m_pt, f"{what} metric {k!r} logged by TRL, absent from posttrain's {sorted(m_pt)}"
        # TRL averages the clip indicators as float32 (`is_clipped.float()`) whatever the dtype.
        tol = "f32" if k in F32_METRICS else dt
        assert_close(m_pt[k], v, tol, f"{what} metric {k}")


ADAPTIVE = {
    "use_adaptive_entropy": True,
    "entropy_coef": 0.01,
    "entropy_target": 2.0,
    "entropy_coef_min": 0.0,
    "entropy_coef_max": 0.3,
    "entropy_coef_delta": 0.005,
}
VLLM = {"use_vllm": True, "vllm_importance_sampling_correction": True}

# name -> (config overrides, grpo_data keywords)
GRPO_FEATURES: Dict[str, Any] = {
    "plain": ({}, {}),
    "no_old": ({}, {"old": False}),
    "eps_high": ({"epsilon_high": 0.28}, {}),
    "delta": ({"delta": 1.25, "epsilon_high": 0.28}, {}),
    "gspo_eps": ({"epsilon": 3e-4, "epsilon_high": 4e-4}, {}),
    "kl": ({"beta": 0.04, "use_bias_correction_kl": False}, {}),
    "kl_bias_corr": ({"beta": 0.04, "use_bias_correction_kl": True}, {}),
    "entropy_mask": ({"top_entropy_quantile": 0.5}, {}),
    "entropy_mask_0.2": ({"top_entropy_quantile": 0.2}, {}),
    "opsm_sampler": ({"off_policy_mask_threshold": 0.02}, {"sampling": True}),
    "opsm_old": ({"off_policy_mask_threshold": 0.0}, {}),
    "vllm_is_token": (dict(VLLM), {"is_ratio": "token", "sampling": True}),
    "vllm_is_row": (dict(VLLM), {"is_ratio": "row", "sampling": True}),
    "is_ratio_no_vllm": ({}, {"is_ratio": "token"}),
    "bonus": ({"entropy_coef": 0.05}, {}),
    "bonus_neg_masked": ({"entropy_coef": -0.02, "top_entropy_quantile": 0.5}, {}),
    "adaptive_applied": (dict(ADAPTIVE, _last_world_entropy=0.5), {}),
    "adaptive_gated": (dict(ADAPTIVE, _last_world_entropy=math.inf), {}),
    "adaptive_eval": (dict(ADAPTIVE, _last_world_entropy=0.5, mode="eval"), {}),
    "accum": ({"current_gradient_accumulation_steps": 4}, {}),
    "eval": ({"mode": "eval", "current_gradient_accumulation_steps": 4}, {}),
    "procs": ({"num_processes": 2}, {}),
    "tool_mask": ({}, {"tool": True}),
    "tool_mask_bonus_kl": ({"entropy_coef": 0.05, "beta": 0.04, "top_entropy_quantile": 0.5}, {"tool": True}),
    "temps": (
        {
            "sapo_temperature_pos": 2.0,
            "sapo_temperature_neg": 0.5,
            "vespo_k_pos": 1.5,
            "vespo_lambda_pos": 1.0,
            "vespo_k_neg": 4.0,
            "vespo_lambda_neg": 0.5,
        },
        {},
    ),
    "combo": (
        dict(
            VLLM,
            beta=0.04,
            use_bias_correction_kl=True,
            delta=1.25,
            epsilon_high=0.28,
            top_entropy_quantile=0.5,
            off_policy_mask_threshold=0.02,
            entropy_coef=0.05,
            current_gradient_accumulation_steps=2,
        ),
        {"is_ratio": "token", "sampling": True},
    ),
}


def _bonus_applied(c: Dict[str, Any]) -> bool:
    if c.get("use_adaptive_entropy"):
        return c.get("_last_world_entropy", math.inf) <= c.get("entropy_target", 0.2) and c.get("entropy_coef", 0.0) != 0
    return c.get("entropy_coef", 0.0) != 0.0


def release_difference(
    loss_type: str, level: str, cfg: Dict[str, Any], dkw: Dict[str, Any], t_: int, data: Optional[Dict[str, Any]] = None
) -> Optional[str]:
    """Why TRL 1.16.0 differs from f2cd577 (posttrain's behaviour) for this case, or None.
    Without ``data`` the answer is conservative (a difference unless it cannot arise)."""
    if loss_type in TOKEN_COUNT_LOSSES and _bonus_applied(cfg):
        # 1.16: Σ H·m_eff / max(Σ m_eff, 1) / acc; f2cd577: Σ H·m_eff / (num_items_in_batch / num_processes).
        if data is None or cfg.get("top_entropy_quantile", 1.0) < 1.0:
            return "entropy_bonus_normalizer"
        c = grpo_full_cfg(cfg, data)
        count = float(loss_mask(data).sum())
        acc = c["current_gradient_accumulation_steps"] if c["mode"] == "train" else 1
        if max(float(c["num_items_in_batch"]), 1.0) / c["num_processes"] != max(count, 1.0) * acc:
            return "entropy_bonus_normalizer"
    if loss_type == "luspo" and t_ > 1:
        per_token = (
            level == "token"
            or cfg.get("beta", 0.0) != 0.0
            or cfg.get("top_entropy_quantile", 1.0) < 1.0
            or (cfg.get("use_vllm") and dkw.get("is_ratio") == "token")
        )
        if per_token:
            return "luspo_masked_aggregation"
    return None


GRPO_CASES = [
    pytest.param(lt, lvl, name, id=f"{lt}-{lvl}-{name}")
    for lt in LOSS_TYPES
    for lvl in ("token", "sequence")
    for name, (over, dkw) in GRPO_FEATURES.items()
    if not all(
        release_difference(lt, lvl, dict(over, loss_type=lt), dkw, s[1], grpo_data(s, (lt, lvl, name), **dkw))
        for s in SHAPES
    )
]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("loss_type,level,feature", GRPO_CASES)
def test_grpo_loss(loss_type, level, feature, dt):
    over, dkw = GRPO_FEATURES[feature]
    cfg = dict(over, loss_type=loss_type, importance_sampling_level=level)
    ran = 0
    for shape in SHAPES:
        data = grpo_data(shape, (loss_type, level, feature), **dkw)
        if release_difference(loss_type, level, cfg, dkw, shape[1], data):
            continue  # covered by the test_release_difference_* tests
        if shape[1] == 1 and not loss_mask(data).all():
            continue  # covered by test_mismatch_metrics_single_token_completions
        compare_grpo(cfg, data, dt, what=f"{shape}")
        ran += 1
    if not ran:
        pytest.skip("every shape hits a named release difference")


PEER_OP_FEATURES = ["plain", "no_old", "combo", "tool_mask_bonus_kl", "vllm_is_row", "adaptive_applied", "eval"]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("feature", PEER_OP_FEATURES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_peer_op(loss_type, level, feature, dt):
    """The same comparison through ``ops.call("trl.grpo_loss", ...)`` (the by-name path, VJP by cotangent)."""
    over, dkw = GRPO_FEATURES[feature]
    cfg = dict(over, loss_type=loss_type, importance_sampling_level=level)
    for shape in SHAPES[1:]:
        data = grpo_data(shape, ("peer-op", loss_type, level, feature), **dkw)
        if release_difference(loss_type, level, cfg, dkw, shape[1], data):
            continue
        loss, g_lp, g_ent, m_trl, _ = trl_grpo(cfg, data, dt)
        c = grpo_full_cfg(cfg, data)
        c.pop("steps_per_generation")
        if c["epsilon_high"] is None:  # the by-name op wants it explicit (GRPOConfig: None means epsilon)
            c["epsilon_high"] = c["epsilon"]
        c = {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in c.items()}
        r = ops.call("trl.grpo_loss", dtype=dt, cotangents={"loss": 1.0}, **data, **c)
        assert_close(r["loss"], loss, dt, f"{shape} loss")
        assert_close(r.grads["per_token_logps"], g_lp, dt, f"{shape} d loss/d per_token_logps")
        if "entropies" in r.grads:
            assert_close(r.grads["entropies"], g_ent, dt, f"{shape} d loss/d entropies")
        compare_metrics(r, m_trl, dt, f32=F32_METRICS)


# ---------------------------------------------------------------------------
# GRPO: the masks and weights (GRPOTrainer static / helper methods)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_get_high_entropy_mask(shape, threshold, dt):
    d = grpo_data(shape, ("hem", threshold))
    s = _GRPOSelf()
    s.accelerator = Accel()
    with default_dtype(dt):
        m = s.get_high_entropy_mask(t(d["entropies"], dt), t(d["completion_mask"].astype(np.int64)), threshold)
    r = ops.call("trl.get_high_entropy_mask", dtype=dt, entropies=d["entropies"], mask=d["completion_mask"], threshold=threshold)
    np.testing.assert_array_equal(np.asarray(r["entropy_mask"]).astype(bool).reshape(m.shape), _np(m))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 0.02, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_get_off_policy_mask(shape, threshold, dt):
    d = grpo_data(shape, ("opm", threshold), sampling=True)
    adv = d["advantages"][:, None]
    with default_dtype(dt):
        m = GRPOTrainer.get_off_policy_mask(
            t(adv, dt),
            t(d["per_token_logps"], dt),
            t(d["sampling_per_token_logps"], dt),
            t(d["completion_mask"].astype(np.int64)),
            threshold,
        )
    r = ops.call(
        "trl.get_off_policy_mask",
        dtype=dt,
        advantages=adv,
        per_token_logps=d["per_token_logps"],
        sampling_per_token_logps=d["sampling_per_token_logps"],
        mask=d["completion_mask"],
        off_policy_threshold=threshold,
    )
    np.testing.assert_array_equal(np.asarray(r["off_policy_mask"]).reshape(m.shape), _np(m))


GAMMA_PARAMS = [
    dict(k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0),
    dict(k_pos=0.5, lambda_pos=0.5, k_neg=4.0, lambda_neg=1e-5),
]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("is_ratio", [None, "token"])
@pytest.mark.parametrize("params", GAMMA_PARAMS, ids=["default", "other"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_get_gamma_weights(shape, params, is_ratio, dt):
    d = grpo_data(shape, ("gamma", is_ratio), is_ratio=is_ratio)
    adv = d["advantages"][:, None]
    lr = d["per_token_logps"] - d["old_per_token_logps"]
    isr = d.get("importance_sampling_ratio")
    with default_dtype(dt):
        phi = GRPOTrainer.get_gamma_weights(
            t(adv, dt), t(lr, dt), t(d["completion_mask"].astype(np.int64)), None if isr is None else t(isr, dt), **params
        )
    kw = {} if isr is None else {"importance_sampling_ratio": isr}
    r = ops.call(
        "trl.get_gamma_weights", dtype=dt, advantages=adv, log_ratio_per_token=lr, mask=d["completion_mask"], **kw, **params
    )
    assert_close(r["phi_seq"], phi, dt, "phi_seq")


# ---------------------------------------------------------------------------
# GRPO / RLOO: advantages and the vLLM importance-sampling ratio
# (GRPOTrainer / RLOOTrainer._generate_and_score_completions on a stand-in self)
# ---------------------------------------------------------------------------

REWARD_NAMES = ["accuracy", "format"]


class _Tok:
    pad_token_id = 0
    eos_token_id = 1


def _fake_model():
    return types.SimpleNamespace(training=True, is_gradient_checkpointing=False)


def _generation_self(trainer_cls, dt, *, num_generations, rewards, reward_weights, old_logps, ref_logps=None, beta=0.0):
    s = types.SimpleNamespace()
    s.accelerator = Accel()
    s.model = _fake_model()
    s.ref_model = _fake_model() if beta != 0.0 else None
    s.beta = beta
    s.environment_factories = None
    s.environments = None
    s.tools = None
    s._tokenizer = _Tok()
    s.eos_token_ids = [_Tok.eos_token_id]
    s.pad_to_multiple_of = None
    s.mask_truncated_completions = False
    s.num_iterations = 1
    s.args = types.SimpleNamespace(
        per_device_train_batch_size=rewards.shape[0],
        per_device_eval_batch_size=rewards.shape[0],
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        gradient_checkpointing_kwargs=None,
    )
    s.num_generations = s.num_generations_eval = num_generations
    s.reward_weights = t(reward_weights, dt)
    s.reward_funcs = [None] * rewards.shape[1]
    s.reward_func_names = REWARD_NAMES[: rewards.shape[1]]
    s._calculate_rewards = lambda *a, **k: t(rewards, dt)
    s._metrics = new_metrics()
    s._logs = {
        "prompt": [],
        "completion": [],
        "rewards": defaultdict(list),
        "advantages": [],
        "extra": defaultdict(list),
        "images": [],
    }
    s._pending_extra_logs = {}
    s._pending_metrics = {}
    s.log_multimodal = False

    def logps(model, *a, **k):
        return (t(ref_logps if model is s.ref_model else old_logps, dt), None, None)

    s._get_per_token_logps_and_entropies = logps
    return s


def generation_case(key, n_prompts, num_generations, n_funcs, *, nan_rewards=False, t_max=6):
    rng = rng_for("gen", key)
    n = n_prompts * num_generations
    rewards = rng.normal(size=(n, n_funcs))
    if num_generations > 2:
        rewards[:num_generations, 0] = 0.5  # a group with zero std (for one reward function)
        if n_funcs == 1:
            rewards[:num_generations, 0] = 0.5
    if nan_rewards and n > 2:
        rewards[1, 0] = np.nan  # one reward function returned None for one completion
        rewards[n - 1, :] = np.nan  # an unscorable completion
    lengths = rng.integers(1, t_max + 1, size=n)
    lengths[0] = t_max
    completion_ids = [list(rng.integers(2, 20, size=int(l))) for l in lengths]
    mask = np.arange(t_max)[None, :] < lengths[:, None]
    tool_masks = [list((rng.random(int(l)) > 0.2).astype(int)) for l in lengths]
    old = -np.abs(rng.normal(0.8, 0.8, size=(n, t_max)))
    ref = old + rng.normal(0.0, 0.3, size=(n, t_max))
    sampling = [list(old[i, : int(l)] + rng.normal(0.0, 0.3, size=int(l))) for i, l in enumerate(lengths)]
    return dict(
        rewards=rewards,
        completion_ids=completion_ids,
        mask=mask,
        tool_masks=tool_masks,
        old=old,
        ref=ref,
        sampling=sampling,
        inputs=[{"prompt": f"p{i // num_generations}"} for i in range(n)],
    )


GRPO_ADV_CASES = [
    # (n_prompts, num_generations, n_funcs, reward_weights)
    (1, 1, 1, [1.0]),  # singleton group
    (3, 1, 1, [1.0]),  # singleton groups
    (2, 2, 1, [0.5]),
    (2, 3, 2, [1.0, 1.0]),
    (3, 4, 2, [0.5, 0.75]),
    (1, 8, 1, [1.0]),
]


def _adv_metrics(m):
    return {k: v for k, v in last_metrics(m).items() if k.startswith(("rewards/", "reward", "frac_reward"))}


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("nan_rewards", [False, True], ids=["scored", "unscorable"])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("case", GRPO_ADV_CASES, ids=str)
def test_grpo_advantages(case, scale_rewards, aggregation, nan_rewards, dt):
    n_prompts, g, n_funcs, weights = case
    c = generation_case(("grpo-adv", case, nan_rewards), n_prompts, g, n_funcs, nan_rewards=nan_rewards)
    s = _generation_self(
        GRPOTrainer, dt, num_generations=g, rewards=c["rewards"], reward_weights=weights, old_logps=c["old"]
    )
    s.use_vllm = False
    s.vllm_importance_sampling_correction = False
    s.scale_rewards = scale_rewards
    s.multi_objective_aggregation = aggregation
    s._generate = lambda prompts: (
        [[5, 6]] * len(prompts),
        c["completion_ids"],
        None,
        ["c"] * len(prompts),
        None,
        {},
        None,
        None,
    )
    with default_dtype(dt):
        out = GRPOTrainer._generate_and_score_completions(s, c["inputs"])
    r = ops.call(
        "trl.grpo_advantages",
        dtype=dt,
        rewards_per_func=c["rewards"],
        num_generations=g,
        scale_rewards=scale_rewards,
        multi_objective_aggregation=aggregation,
        reward_weights=weights,
    )
    assert_close(r["advantages"], out["advantages"], dt, "advantages")
    assert out["num_items_in_batch"].item() == c["mask"].sum()  # the stand-in's completions went through
    for k, v in _adv_metrics(s._metrics["train"]).items():
        assert k in r, f"metric {k!r} logged by TRL, absent from posttrain's {sorted(r.outputs)}"
        assert_close(r[k], v, "f32" if k == "frac_reward_zero_std" else dt, k)


IS_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("clip", [(None, 3.0), (0.8, 1.2), (0.5, 2.0)], ids=str)
@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("n", [1, 4, 9])
def test_grpo_vllm_importance_sampling_ratio(n, mode, clip, dt):
    c = generation_case(("vllm-is", n, mode, clip), n, 1, 1)
    s = _generation_self(GRPOTrainer, dt, num_generations=1, rewards=c["rewards"], reward_weights=[1.0], old_logps=c["old"])
    s.use_vllm = True
    s.vllm_importance_sampling_correction = True
    s.vllm_importance_sampling_mode = mode
    s.vllm_importance_sampling_clip_min, s.vllm_importance_sampling_clip_max = clip
    s.scale_rewards = "group"
    s.multi_objective_aggregation = "sum_then_normalize"
    s._generate = lambda prompts: (
        [[5, 6]] * len(prompts),
        c["completion_ids"],
        c["tool_masks"],
        ["c"] * len(prompts),
        c["sampling"],
        {},
        None,
        None,
    )
    with default_dtype(dt):
        out = GRPOTrainer._generate_and_score_completions(s, c["inputs"])
    r = ops.call(
        "trl.grpo_vllm_importance_sampling_ratio",
        dtype=dt,
        old_per_token_logps=c["old"],
        sampling_per_token_logps=_np(out["sampling_per_token_logps"]).astype(np.float64),
        completion_mask=_np(out["completion_mask"]).astype(bool),
        tool_mask=_np(out["tool_mask"]).astype(bool),
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=clip[0],
        vllm_importance_sampling_clip_max=clip[1],
    )
    assert_close(r["importance_sampling_ratio"], out["importance_sampling_ratio"], dt, "importance_sampling_ratio")
    assert float(r["num_items_in_batch"]) == out["num_items_in_batch"].item()
    for k, v in last_metrics(s._metrics["train"]).items():
        if k.startswith("sampling/"):
            assert k in r, f"metric {k!r} logged by TRL, absent from posttrain's {sorted(r.outputs)}"
            assert_close(r[k], v, dt, k)


RLOO_ADV_CASES = [
    # (n_prompts, num_generations, n_funcs, reward_weights)
    (3, 1, 1, [1.0]),  # singleton groups (TRL: zero advantages)
    (1, 2, 1, [1.0]),
    (2, 3, 1, [1.0]),
    (3, 4, 2, [1.0, 0.7]),
    (1, 8, 2, [1.0, 1.0]),
]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("nan_rewards", [False, True], ids=["scored", "unscorable"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("clip_range", [None, (-1.0, 1.5)], ids=["noclip", "clip"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("case", RLOO_ADV_CASES, ids=str)
def test_rloo_advantages(case, beta, clip_range, normalize, nan_rewards, dt):
    from trl.trainer.rloo_trainer import RLOOTrainer

    n_prompts, g, n_funcs, weights = case
    c = generation_case(("rloo-adv", case, nan_rewards), n_prompts, g, n_funcs, nan_rewards=nan_rewards)
    s = _generation_self(
        RLOOTrainer,
        dt,
        num_generations=g,
        rewards=c["rewards"],
        reward_weights=weights,
        old_logps=c["old"],
        ref_logps=c["ref"],
        beta=beta,
    )
    s.reward_clip_range = clip_range
    s.normalize_advantages = normalize
    s._generate = lambda prompts: ([[5, 6]] * len(prompts), c["completion_ids"], ["c"] * len(prompts))
    with default_dtype(dt):
        out = RLOOTrainer._generate_and_score_completions(s, c["inputs"])
    kw = {"ref_per_token_logps": c["ref"]} if beta else {}
    r = ops.call(
        "trl.rloo_advantages",
        dtype=dt,
        rewards_per_func=c["rewards"],
        completion_mask=c["mask"],
        old_per_token_logps=c["old"],
        num_generations=g,
        reward_weights=weights,
        beta=beta,
        reward_clip_range=None if clip_range is None else list(clip_range),
        normalize_advantages=normalize,
        **kw,
    )
    assert_close(r["advantages"], out["advantages"], dt, "advantages")
    assert_close(r["old_logps"], out["old_logps"], dt, "old_logps")
    for k, v in last_metrics(s._metrics["train"]).items():
        assert k in r, f"metric {k!r} logged by TRL, absent from posttrain's {sorted(r.outputs)}"
        assert_close(r[k], v, "f32" if k == "frac_reward_zero_std" else dt, k)


# ---------------------------------------------------------------------------
# RLOO loss (RLOOTrainer._compute_loss) and GMPO loss (experimental GMPOTrainer._compute_loss)
# ---------------------------------------------------------------------------


def _loss_self(dt, lp, ent, **attrs):
    s = types.SimpleNamespace(**attrs)
    s.accelerator = Accel()
    s._metrics = new_metrics()
    s.aux_loss_enabled = False
    s._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent, None)
    return s


def _loss_inputs(data, dt, **extra):
    b, t_ = data["per_token_logps"].shape
    inputs = {
        "prompt_ids": torch.zeros((b, 1), dtype=torch.long),
        "prompt_mask": torch.ones((b, 1), dtype=torch.long),
        "completion_ids": torch.zeros((b, t_), dtype=torch.long),
        "completion_mask": t(data["completion_mask"].astype(np.int64)),
        "advantages": t(data["advantages"], dt),
    }
    inputs.update(extra)
    return inputs


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.1, 0.5), (0.2, 0.28)], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rloo_loss(shape, eps, mode, dt):
    from trl.trainer.rloo_trainer import RLOOTrainer

    d = grpo_data(shape, ("rloo", eps))
    m = d["completion_mask"]
    # Sequence-level old log-probs a little off the current ones, so that ratios clip.
    old_logps = (d["per_token_logps"] * m).sum(1) + rng_for("rloo-old", shape).normal(0.0, 0.4, size=shape[0])
    with default_dtype(dt):
        lp, ent = t(d["per_token_logps"], dt, grad=True), t(d["entropies"], dt)
        s = _loss_self(dt, lp, ent, epsilon_low=eps[0], epsilon_high=eps[1], model=types.SimpleNamespace(training=mode == "train"))
        loss = RLOOTrainer._compute_loss(s, None, _loss_inputs(d, dt, old_logps=t(old_logps, dt)))
        loss.backward()
    r = ops.call(
        "trl.rloo_loss",
        dtype=dt,
        per_token_logps=d["per_token_logps"],
        entropies=d["entropies"],
        completion_mask=m,
        advantages=d["advantages"],
        old_logps=old_logps,
        epsilon=eps[0],
        epsilon_high=eps[1],
        mode=mode,
        cotangents={"loss": 1.0},
    )
    assert_close(r["loss"], loss, dt, "loss")
    assert_close(r.grads["per_token_logps"], lp.grad, dt, "d loss/d per_token_logps")
    for k, v in last_metrics(s._metrics[mode]).items():
        assert k in r, f"metric {k!r} logged by TRL, absent from posttrain's {sorted(r.outputs)}"
        assert_close(r[k], v, "f32" if k in F32_METRICS else dt, k)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize(
    "cfg",
    [
        dict(epsilon=0.4, epsilon_high=0.4),
        dict(epsilon=0.2, epsilon_high=0.3, beta=0.04),
        dict(epsilon=0.3, epsilon_high=0.5, top_entropy_quantile=0.5, current_gradient_accumulation_steps=4),
        dict(epsilon=0.1, epsilon_high=0.1, beta=0.1, mode="eval", current_gradient_accumulation_steps=2),
        dict(epsilon=0.4, epsilon_high=0.4, _no_old=True),
        dict(epsilon=0.4, epsilon_high=0.4, _tool_mask=True, beta=0.04, top_entropy_quantile=0.5),
    ],
    ids=["paper", "kl", "entropy_mask-accum", "eval", "no_old", "tool_mask"],
)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gmpo_loss(shape, cfg, dt):
    from trl.experimental.gmpo import GMPOTrainer

    c = dict(beta=0.0, top_entropy_quantile=1.0, current_gradient_accumulation_steps=1, mode="train")
    c.update(cfg)
    no_old, tool = c.pop("_no_old", False), c.pop("_tool_mask", False)
    d = grpo_data(shape, ("gmpo", tuple(sorted(cfg))), old=not no_old)
    tool_mask = rng_for("gmpo-tool", shape).random(shape) > 0.2 if tool else None
    with default_dtype(dt):
        lp, ent = t(d["per_token_logps"], dt, grad=True), t(d["entropies"], dt)
        s = _loss_self(
            dt,
            lp,
            ent,
            epsilon_low=c["epsilon"],
            epsilon_high=c["epsilon_high"],
            beta=c["beta"],
            top_entropy_quantile=c["top_entropy_quantile"],
            current_gradient_accumulation_steps=c["current_gradient_accumulation_steps"],
            model=types.SimpleNamespace(training=c["mode"] == "train"),
        )
        s.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, s)
        extra = {"ref_per_token_logps": t(d["ref_per_token_logps"], dt)}
        if not no_old:
            extra["old_per_token_logps"] = t(d["old_per_token_logps"], dt)
        if tool:
            extra["tool_mask"] = t(tool_mask.astype(np.int64))
        loss = GMPOTrainer._compute_loss(s, None, _loss_inputs(d, dt, **extra))
        loss.backward()
    kw = {k: d[k] for k in ("old_per_token_logps", "ref_per_token_logps") if k in d}
    if tool:
        kw["tool_mask"] = tool_mask
    r = ops.call(
        "trl.gmpo_loss",
        dtype=dt,
        per_token_logps=d["per_token_logps"],
        entropies=d["entropies"],
        completion_mask=d["completion_mask"],
        advantages=d["advantages"],
        cotangents={"loss": 1.0},
        **kw,
        **c,
    )
    assert_close(r["loss"], loss, dt, "loss")
    assert_close(r.grads["per_token_logps"], lp.grad, dt, "d loss/d per_token_logps")
    for k, v in last_metrics(s._metrics[c["mode"]]).items():
        assert k in r, f"metric {k!r} logged by TRL, absent from posttrain's {sorted(r.outputs)}"
        assert_close(r[k], v, "f32" if k in F32_METRICS else dt, k)


# ---------------------------------------------------------------------------
# Release differences: trl 1.16.0 vs f2cd577 (the commit the vectors came from)
# ---------------------------------------------------------------------------

REL_SHAPES = [(4, 7), (8, 33)]


@release_only
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("gas,spg", [(2, 4), (4, 2), (1, 8), (3, 3)], ids=str)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", TOKEN_COUNT_LOSSES)
def test_release_difference_token_count_steps_per_generation(loss_type, level, gas, spg, mode, dt):
    """trl 1.16.0 rescales the cispo/dapo/vespo normalizer to one accumulation window:
    ``num_items_in_batch / num_processes · current_gradient_accumulation_steps / steps_per_generation``
    in training (f2cd577: ``num_items_in_batch / num_processes``); posttrain selects it with
    ``steps_per_generation=``."""
    for shape in REL_SHAPES:
        d = grpo_data(shape, ("spg", loss_type, level))
        cfg = dict(
            loss_type=loss_type,
            importance_sampling_level=level,
            current_gradient_accumulation_steps=gas,
            steps_per_generation=spg,
            mode=mode,
            num_processes=2,
            num_items_in_batch=float(d["completion_mask"].sum()) * 2 * spg,  # spans the generation batch
        )
        compare_grpo(cfg, d, dt, steps_per_generation=True, what=f"{shape}")
        if mode == "train" and gas != spg:  # the commit's formula (no steps_per_generation) is off by gas/spg
            loss, *_ = trl_grpo(cfg, d, dt)
            m_old, _, _ = pt_grpo(cfg, d, dt, steps_per_generation=False)
            assert m_old["loss"] == pytest.approx(loss * gas / spg, rel=TOL[dt][0] * 10)


ENTROPY_BONUS_FEATURES = ["bonus", "bonus_neg_masked", "adaptive_applied", "adaptive_eval", "combo"]


@release_only
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("feature", ENTROPY_BONUS_FEATURES)
@pytest.mark.parametrize("loss_type", TOKEN_COUNT_LOSSES)
def test_release_difference_entropy_bonus_normalizer(loss_type, feature, dt):
    """trl 1.16.0's cispo/dapo/vespo entropy bonus is coef · Σ H·m_eff / max(Σ m_eff, 1) /
    (gas in train, 1 in eval), like the other loss types (f2cd577: / num_items_in_batch/num_processes);
    posttrain selects 1.16's normalizers with ``steps_per_generation=``, and keeps f2cd577's without."""
    over, dkw = GRPO_FEATURES[feature]
    cfg = dict(over, loss_type=loss_type, importance_sampling_level="token")
    cfg.setdefault("current_gradient_accumulation_steps", 2)
    for shape in REL_SHAPES:
        d = grpo_data(shape, ("bonus", loss_type, feature), **dkw)
        # The other micro-batches of the accumulation window have other completion lengths.
        cfg["num_items_in_batch"] = float(d["completion_mask"].sum()) * cfg["current_gradient_accumulation_steps"] + 5
        compare_grpo(cfg, d, dt, steps_per_generation=True, what=f"{shape}")


LUSPO_CASES = [
    ("token", "plain"),
    ("token", "kl"),
    ("sequence", "kl"),
    ("sequence", "kl_bias_corr"),
    ("sequence", "entropy_mask"),
    ("sequence", "vllm_is_token"),
]


@release_only
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("level,feature", LUSPO_CASES, ids=[f"{a}-{b}" for a, b in LUSPO_CASES])
def test_release_difference_luspo_masked_aggregation(level, feature, dt):
    """trl 1.16.0's luspo aggregates (per_token_loss * mask).sum(-1).mean() (f2cd577:
    (per_token_loss * mask.sum(1, keepdim=True)).mean(), every (B, T) entry); they differ whenever
    per_token_loss is (B, T). posttrain selects 1.16's with ``steps_per_generation=``."""
    over, dkw = GRPO_FEATURES[feature]
    cfg = dict(over, loss_type="luspo", importance_sampling_level=level)
    for shape in REL_SHAPES:
        compare_grpo(cfg, grpo_data(shape, ("luspo", level, feature), **dkw), dt, steps_per_generation=True, what=f"{shape}")


@release_only
@pytest.mark.parametrize("dt", DTYPES)
def test_release_difference_use_bias_correction_kl_default(dt):
    """trl 1.16.0's GRPOConfig.use_bias_correction_kl defaults to True (f2cd577:
    False); posttrain.ops.grpo_loss takes 1.16's default when it is not given."""
    assert GRPO_DEFAULTS["use_bias_correction_kl"] is True
    d = grpo_data((8, 33), "bias-default")
    loss, g_lp, _, _, _ = trl_grpo({"beta": 0.04}, d, dt)  # GRPOConfig defaults otherwise
    a = {k: v.astype(NDT[dt]) for k, v in d.items() if v.dtype.kind == "f"}
    m, pg, _ = ops.grpo_loss(
        a["per_token_logps"],
        a["entropies"],
        d["completion_mask"],
        a["advantages"],
        old_per_token_logps=a["old_per_token_logps"],
        ref_per_token_logps=a["ref_per_token_logps"],
        beta=0.04,
        max_completion_length=36,
    )
    assert_close(m["loss"], loss, dt, "loss")
    assert_close(pg, g_lp, dt, "d loss/d per_token_logps")


def _nan_sampling_case(dt):
    """Row 1 has A < 0, a small mean KL to the sampler, and one token the sampler could not score (NaN)."""
    d = grpo_data((4, 7), "opsm-nan", sampling=True)
    d["completion_mask"][1] = True
    d["advantages"][1] = -1.0
    d["sampling_per_token_logps"][1] = d["per_token_logps"][1] + 0.001
    d["sampling_per_token_logps"][1, 3] = np.nan
    return d


@contextlib.contextmanager
def trl_f2cd577_nan_handling():
    """trl 1.16.0's code with f2cd577's NaN handling: the two release differences below are each one
    ``torch.nan_to_num(..., nan=0.0)`` line that f2cd577 does not have (get_off_policy_mask, and the
    vLLM IS ratio of _generate_and_score_completions; its advantages' nan_to_num sees no NaN here).
    f2cd577's ``sampling/sampling_logp_difference/*`` also keep the NaN tokens; that filter is not a
    nan_to_num, so those two metrics still show 1.16.0's values under this patch."""
    real = torch.nan_to_num
    torch.nan_to_num = lambda x, *a, **k: x
    try:
        yield
    finally:
        torch.nan_to_num = real


def _trl_off_policy_mask(d, dt):
    with default_dtype(dt):
        return _np(
            GRPOTrainer.get_off_policy_mask(
                t(d["advantages"][:, None], dt),
                t(d["per_token_logps"], dt),
                t(d["sampling_per_token_logps"], dt),
                t(d["completion_mask"].astype(np.int64)),
                0.02,
            )
        )


def _pt_off_policy_mask(d, dt, **kw):
    r = ops.call(
        "trl.get_off_policy_mask",
        dtype=dt,
        advantages=d["advantages"][:, None],
        per_token_logps=d["per_token_logps"],
        sampling_per_token_logps=d["sampling_per_token_logps"],
        mask=d["completion_mask"],
        off_policy_threshold=0.02,
        **kw,
    )
    return np.asarray(r["off_policy_mask"]).reshape(-1, 1)


@release_only
@pytest.mark.parametrize("dt", DTYPES)
def test_release_difference_off_policy_mask_nan_sampler_logps(dt):
    """trl 1.16.0 differs from f2cd577: get_off_policy_mask replaces NaN sampler log-prob differences by 0
    (torch.nan_to_num, before the mask product; the row mean still divides by every valid token), so a
    NaN token no longer drops an A < 0 row (f2cd577: the mean is NaN, NaN <= threshold is False, the row
    is dropped). posttrain: ``off_policy_mask_nan_sampler_logps="as_on_policy"``, which ops.grpo_loss
    (and the TRL adapter) select by default; ops.call keeps the vectors' f2cd577."""
    d = _nan_sampling_case(dt)
    m = _trl_off_policy_mask(d, dt)
    assert m[1, 0] == 1  # the release keeps the row
    np.testing.assert_array_equal(_pt_off_policy_mask(d, dt, off_policy_mask_nan_sampler_logps="as_on_policy"), m)
    assert ops.TRL_GRPO_DEFAULTS["off_policy_mask_nan_sampler_logps"] == "as_on_policy"
    compare_grpo({"off_policy_mask_threshold": 0.02, "loss_type": "grpo"}, d, dt)
    compare_grpo({"off_policy_mask_threshold": 0.02, "loss_type": "dapo", "importance_sampling_level": "sequence"}, d, dt)


@pytest.mark.parametrize("dt", DTYPES)
def test_off_policy_mask_nan_sampler_logps_default_is_f2cd577(dt):
    """posttrain's default (ops.call, the conformance handler) is the vectors' f2cd577: the NaN token's
    row (A < 0) is dropped; ops.grpo_loss gives it with ``off_policy_mask_nan_sampler_logps="propagate"``."""
    d = _nan_sampling_case(dt)
    with trl_f2cd577_nan_handling():
        m = _trl_off_policy_mask(d, dt)
        assert m[1, 0] == 0
        np.testing.assert_array_equal(_pt_off_policy_mask(d, dt), m)
        np.testing.assert_array_equal(_pt_off_policy_mask(d, dt, off_policy_mask_nan_sampler_logps="propagate"), m)
        compare_grpo({"off_policy_mask_threshold": 0.02, "loss_type": "grpo", "off_policy_mask_nan_sampler_logps": "propagate"}, d, dt)
    # NaN in padding (masked) never reaches a row, whichever the choice.
    p = {k: v.copy() for k, v in d.items()}
    p["sampling_per_token_logps"][1, 3] = p["per_token_logps"][1, 3]
    p["completion_mask"][0, -1] = False
    p["sampling_per_token_logps"][0, -1] = np.nan
    p["advantages"][0] = -1.0
    for kw in ({}, {"off_policy_mask_nan_sampler_logps": "as_on_policy"}):
        clean = {k: v.copy() for k, v in p.items()}
        clean["sampling_per_token_logps"][0, -1] = -0.5
        np.testing.assert_array_equal(_pt_off_policy_mask(p, dt, **kw), _pt_off_policy_mask(clean, dt, **kw))
    with pytest.raises(ValueError, match="propagate, as_on_policy"):
        _pt_off_policy_mask(d, dt, off_policy_mask_nan_sampler_logps="zero")


@release_only
@pytest.mark.parametrize("dt", DTYPES)
def test_trl_adapter_selects_1_16_off_policy_mask_nan_sampler_logps(dt):
    """The GRPOTrainer adapter's loss configuration selects trl 1.16.0's off-policy mask on NaN sampler
    log-probs: the loss and its gradient through posttrain.torch match TRL's _compute_loss."""
    pt = pytest.importorskip("posttrain.torch")
    from posttrain.integrations.trl import grpo_loss_config

    d = _nan_sampling_case(dt)
    cfg = {"off_policy_mask_threshold": 0.02, "loss_type": "grpo"}
    loss, g_lp, _, _, s = trl_grpo(cfg, d, dt)
    c = grpo_loss_config(s, {"num_items_in_batch": float(d["completion_mask"].sum())})
    assert c["off_policy_mask_nan_sampler_logps"] == "as_on_policy"
    with default_dtype(dt):
        lp = t(d["per_token_logps"], dt, grad=True)
        ours, _ = pt.grpo_loss(
            lp,
            t(d["entropies"], dt),
            t(d["completion_mask"]),
            t(d["advantages"], dt),
            old_per_token_logps=t(d["old_per_token_logps"], dt),
            sampling_per_token_logps=t(d["sampling_per_token_logps"], dt),
            **c,
        )
        ours.backward()
    assert_close(ours.item(), loss, dt, "loss")
    assert_close(lp.grad, g_lp, dt, "d loss/d per_token_logps")


def _vllm_is_nan_case(mode, dt):
    """One sampler log-prob vLLM could not score (None) on a valid token; TRL's own generation step."""
    c = generation_case(("vllm-is-nan", mode), 4, 1, 1)
    c["sampling"][0][1] = None
    s = _generation_self(GRPOTrainer, dt, num_generations=1, rewards=c["rewards"], reward_weights=[1.0], old_logps=c["old"])
    s.use_vllm = s.vllm_importance_sampling_correction = True
    s.vllm_importance_sampling_mode = mode
    s.vllm_importance_sampling_clip_min, s.vllm_importance_sampling_clip_max = None, 3.0
    s.scale_rewards, s.multi_objective_aggregation = "group", "sum_then_normalize"
    s._generate = lambda prompts: (
        [[5, 6]] * len(prompts),
        c["completion_ids"],
        None,
        ["c"] * len(prompts),
        c["sampling"],
        {},
        None,
        None,
    )
    with default_dtype(dt):
        out = GRPOTrainer._generate_and_score_completions(s, c["inputs"])
    return c, s, out


def _pt_vllm_is(c, out, mode, dt, **kw):
    return ops.call(
        "trl.grpo_vllm_importance_sampling_ratio",
        dtype=dt,
        old_per_token_logps=c["old"],
        sampling_per_token_logps=_np(out["sampling_per_token_logps"]).astype(np.float64),
        completion_mask=_np(out["completion_mask"]).astype(bool),
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=None,
        vllm_importance_sampling_clip_max=3.0,
        **kw,
    )


@release_only
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("mode", IS_MODES)
def test_release_difference_vllm_is_ratio_nan_sampler_logps(mode, dt):
    """trl 1.16.0 differs from f2cd577: _generate_and_score_completions (vLLM IS ratio) maps sampler
    log-probs vLLM could not score (None -> NaN) to a zero log-difference (nan_to_num after the mask
    product: ratio bound(exp(0)) in token modes, nothing added to the row's sum in sequence modes), keeps
    them in sampling/importance_sampling_ratio/* and leaves them out of
    sampling/sampling_logp_difference/{mean,max} (f2cd577: NaN propagates into the ratio and the
    metrics). posttrain: ``vllm_importance_sampling_nan_sampler_logps="as_on_policy"``."""
    c, s, out = _vllm_is_nan_case(mode, dt)
    assert np.isfinite(_np(out["importance_sampling_ratio"])).all()
    r = _pt_vllm_is(c, out, mode, dt, vllm_importance_sampling_nan_sampler_logps="as_on_policy")
    assert_close(r["importance_sampling_ratio"], out["importance_sampling_ratio"], dt, "importance_sampling_ratio")
    metrics = {k: v for k, v in last_metrics(s._metrics["train"]).items() if k.startswith("sampling/")}
    assert len(metrics) == 5
    for k, v in metrics.items():
        assert math.isfinite(v), k
        assert_close(r[k], v, dt, k)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("mode", IS_MODES)
def test_vllm_is_ratio_nan_sampler_logps_default_is_f2cd577(mode, dt):
    """posttrain's default is the vectors' f2cd577: the NaN propagates into its token's (token modes) or
    row's (sequence modes) ratio, into every mode (TRL's band mask keeps NaN), and into the metrics."""
    with trl_f2cd577_nan_handling():
        c, s, out = _vllm_is_nan_case(mode, dt)
    want = _np(out["importance_sampling_ratio"])
    assert np.isnan(want).sum() == 1
    metrics = last_metrics(s._metrics["train"])
    for kw in ({}, {"vllm_importance_sampling_nan_sampler_logps": "propagate"}):
        r = _pt_vllm_is(c, out, mode, dt, **kw)
        assert_close(r["importance_sampling_ratio"], want, dt, "importance_sampling_ratio")
        for k in ("min", "mean", "max"):
            name = f"sampling/importance_sampling_ratio/{k}"
            assert math.isnan(metrics[name]), name
            assert_close(r[name], metrics[name], dt, name)
        # f2cd577 keeps the NaN token in the mean / max of |old - sampling| (torch.mean / torch.max: NaN).
        for k in ("mean", "max"):
            assert math.isnan(r[f"sampling/sampling_logp_difference/{k}"]), k


# ---------------------------------------------------------------------------
# Mismatches that are not release differences (TRL behaves the same at f2cd577)
# ---------------------------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="posttrain mismatch (trl f2cd577 and 1.16.0 alike): get_high_entropy_mask computes "
    "torch.quantile(entropies[mask].float(), q) in float32 and compares the (f64) entropies with that "
    "float32 threshold; posttrain's f64 path takes the quantile in f64, so a token whose entropy is the "
    "quantile element flips when float32 rounding moves the threshold above it (the vectors use "
    "f32-representable entropies, which hides it). Affects trl.get_high_entropy_mask and the grpo/gmpo "
    "losses with top_entropy_quantile < 1 in f64",
)
def test_mismatch_high_entropy_mask_f32_quantile():
    s = _GRPOSelf()
    s.accelerator = Accel()
    for seed in range(20):
        rng = rng_for("hem-f64", seed)
        n = int(rng.integers(3, 40)) | 1  # odd: the median is an element
        e = rng.uniform(0.0, 3.0, size=(1, n))
        m = np.ones((1, n), dtype=bool)
        with default_dtype("f64"):
            want = s.get_high_entropy_mask(t(e), t(m.astype(np.int64)), 0.5)
        got = ops.call("trl.get_high_entropy_mask", entropies=e, mask=m, threshold=0.5)["entropy_mask"]
        np.testing.assert_array_equal(np.asarray(got).astype(bool).reshape(want.shape), _np(want), err_msg=f"seed {seed}")


@pytest.mark.xfail(
    strict=True,
    reason="posttrain mismatch (trl f2cd577 and 1.16.0 alike): get_gamma_weights adds "
    "Σ_t log(importance_sampling_ratio) over every position, masked or not; posttrain sums the masked "
    "positions only. Equal on the ratios TRL builds (exactly 1 outside the mask), different for a "
    "caller's ratio that is not 1 on padding",
)
@pytest.mark.parametrize("dt", DTYPES)
def test_mismatch_vespo_gamma_unmasked_is_ratio(dt):
    d = grpo_data((8, 33), "gamma-unmasked", is_ratio="token")
    rng = rng_for("gamma-unmasked-pad")
    d["importance_sampling_ratio"] = np.where(
        d["completion_mask"], d["importance_sampling_ratio"], np.exp(rng.normal(0.0, 0.3, size=(8, 33)))
    )
    compare_grpo({"loss_type": "vespo"}, d, dt)


@pytest.mark.xfail(
    strict=True,
    reason="posttrain mismatch (trl f2cd577 and 1.16.0 alike): GRPOTrainer._compute_loss's metric helpers "
    "(global_masked_mean, masked_seq_mean) take any [B, 1] tensor for a per-sequence value, so with "
    "completions of length T == 1 the logged entropy / kl / clip ratios average every row, masked ones "
    "included (count B); posttrain masks them. The loss and gradients agree",
)
@pytest.mark.parametrize("dt", DTYPES)
def test_mismatch_metrics_single_token_completions(dt):
    d = grpo_data((4, 1), "t1", tool=True)
    d["tool_mask"][:] = [[True], [False], [True], [False]]
    cfg = {"loss_type": "grpo", "beta": 0.04}
    loss, g_lp, _, m_trl, _ = trl_grpo(cfg, d, dt)
    m_pt, pg, _ = pt_grpo(cfg, d, dt)
    assert_close(m_pt["loss"], loss, dt, "loss")  # agrees
    assert_close(pg, g_lp, dt, "d loss/d per_token_logps")  # agrees
    for k in ("entropy", "kl"):
        assert_close(m_pt[k], m_trl[k], dt, k)


def test_infinite_parameter():
    """TRL's initial _last_world_entropy is float('inf'): a parameter the core reads."""
    d = grpo_data((4, 7), "inf-param")
    ops.grpo_loss(
        d["per_token_logps"],
        d["entropies"],
        d["completion_mask"],
        d["advantages"],
        use_adaptive_entropy=True,
        entropy_coef=0.01,
        entropy_target=2.0,
        entropy_coef_min=0.0,
        entropy_coef_max=0.3,
        entropy_coef_delta=0.005,
        _last_world_entropy=math.inf,
    )


def test_single_element_output_keeps_its_shape():
    s = _GRPOSelf()
    s.accelerator = Accel()
    e, m = np.array([[0.7]]), np.array([[True]])
    want = s.get_high_entropy_mask(t(e), t(m.astype(np.int64)), 0.5)
    got = ops.call("trl.get_high_entropy_mask", entropies=e, mask=m, threshold=0.5)["entropy_mask"]
    assert np.shape(got) == tuple(want.shape)


# ---------------------------------------------------------------------------
# Stand-in language models
# ---------------------------------------------------------------------------


def _lookup(table, ids):
    for k, v in table:
        if k is ids:
            return v
    for k, v in table:
        if k.shape == ids.shape and torch.equal(k, ids):
            return v
    raise KeyError("unknown input_ids")


class StubLM:
    """Returns prepared logits for the input_ids it is given (``outputs.logits``); called with
    ``fused_lm_head=True`` it returns the ``FusedCausalLMOutput`` TRL 1.16's fused head defines,
    built from those logits with TRL's own ``selective_log_softmax`` / ``entropy_from_logits``
    in the logits' dtype (the real head computes in float32: see ``FusedHeadLM``)."""

    is_gradient_checkpointing = False

    def __init__(self, table, training=True):
        self.table = table
        self.training = training

    def eval(self):
        return self

    def __call__(self, input_ids=None, attention_mask=None, use_cache=None, labels=None, fused_lm_head=False, **kw):
        z = _lookup(self.table, input_ids)
        if not fused_lm_head:
            return types.SimpleNamespace(logits=z)
        zs, lab = z[:, :-1], labels[:, 1:]
        m = lab != -100
        idx = lab.clamp(min=0)
        lp = trl_utils.selective_log_softmax(zs, idx).masked_fill(~m, 0.0)
        ent = trl_utils.entropy_from_logits(zs).masked_fill(~m, 0.0)
        with torch.no_grad():
            mean_logits = zs.mean(-1).masked_fill(~m, 0.0)
            is_top1 = (zs.argmax(-1) == idx) & m
            lssp = torch.logsumexp(2.0 * torch.log_softmax(zs, -1), -1).masked_fill(~m, 0.0)
        return trl_utils.FusedCausalLMOutput(
            log_probs=lp, entropy=ent, mean_logits=mean_logits, is_top1=is_top1, log_sum_sq_probs=lssp, label_mask=m
        )


class _Backbone(torch.nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, **kw):
        return types.SimpleNamespace(last_hidden_state=_lookup(self.table, input_ids))


class FusedHeadLM(torch.nn.Module):
    """A model whose hidden states are the prepared logits and whose LM head is the identity, patched
    with TRL 1.16's own ``add_fused_lm_head``: the real fused head (float32 internally)."""

    is_gradient_checkpointing = False

    def __init__(self, table, vocab, dtype, outputs):
        super().__init__()
        self.table = table
        self.base_model = _Backbone(table)
        self.lm_head = torch.nn.Linear(vocab, vocab, bias=False, dtype=dtype)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(vocab, dtype=dtype))
        self.lm_head.weight.requires_grad_(False)
        cfg = types.SimpleNamespace()
        cfg.get_text_config = lambda: cfg
        self.config = cfg
        trl_utils.add_fused_lm_head(self, outputs=outputs)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, **kw):
        return types.SimpleNamespace(logits=_lookup(self.table, input_ids))


FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def make_lm(head, table, vocab, dt, training=True):
    if head == "stub":
        return StubLM(table, training)
    m = FusedHeadLM(table, vocab, TDT[dt], FUSED_OUTPUTS)
    m.train(training)
    return m


def sequences(rng, n, length, vocab, *, min_prompt=1):
    """Right-padded prompt + completion sequences: (input_ids, attention_mask, completion_mask)."""
    ids = rng.integers(2, vocab, size=(n, length))
    p = rng.integers(min_prompt, max(min_prompt + 1, length - 1), size=n)
    total = np.minimum(length, p + rng.integers(1, length + 1, size=n))
    total[0] = length
    pos = np.arange(length)[None, :]
    am = pos < total[:, None]
    cm = am & (pos >= p[:, None])
    ids = np.where(am, ids, 0)
    return ids, am, cm


# ---------------------------------------------------------------------------
# DPO (DPOTrainer._compute_loss)
# ---------------------------------------------------------------------------

DPO_LOSSES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
DPO_DIVERGENCES = ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
# Loss types whose score computation runs with a divergence other than reverse_kl (called unbound:
# trl 1.16's DPOTrainer.__init__ accepts only sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop
# and sft with one, but its _compute_loss computes every loss type).
DPO_F_LOSSES = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm"}
# Where the release's scores for non-reverse-KL divergences differ from f2cd577 (test_release_difference_dpo_f_divergence_scores).
DPO_F_SCORE_DIFFERENCES = {"ipo", "sigmoid_norm", "nca_pair", "bco_pair", "sppo_hard", "apo_down"}


def dpo_cfg(**over):
    c = dict(
        beta=0.1,
        loss_type=["sigmoid"],
        loss_weights=None,
        label_smoothing=0.0,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        ld_alpha=None,
        use_weighting=False,
        discopop_tau=0.05,
        precompute_ref_log_probs=True,
    )
    c.update(over)
    if {"exo_pair"} & set(c["loss_type"]) and c["label_smoothing"] == 0.0:
        c["label_smoothing"] = 0.1
    return c


def dpo_data(key, pairs, length, vocab, *, ref_near=False):
    """``ref_near``: reference logits close to the policy's (small log-ratios; the non-reverse-KL
    divergences exponentiate them)."""
    rng = rng_for("dpo", key, pairs, length, vocab)
    ids, am, cm = sequences(rng, 2 * pairs, length, vocab)
    z = rng.normal(0.0, 1.5, size=(2 * pairs, length, vocab))
    return dict(
        logits=z,
        ref_logits=z + rng.normal(0.0, 0.3, size=z.shape) if ref_near else rng.normal(0.0, 1.5, size=z.shape),
        input_ids=ids,
        attention_mask=am,
        completion_mask=cm,
        ref_chosen_logps=-rng.uniform(2.0, 12.0, size=pairs),
        ref_rejected_logps=-rng.uniform(2.0, 12.0, size=pairs),
    )


def trl_dpo(cfg, d, dt, head="stub"):
    from trl.trainer.dpo_trainer import DPOTrainer

    v = d["logits"].shape[-1]
    with default_dtype(dt):
        z = t(d["logits"], dt, grad=True)
        ids = t(d["input_ids"])
        model = make_lm(head, [(ids, z)], v, dt)
        ref = make_lm(head, [(ids, t(d["ref_logits"], dt))], v, dt)
        s = types.SimpleNamespace(
            model=model,
            ref_model=ref,
            accelerator=Accel(),
            aux_loss_enabled=False,
            ld_alpha=cfg["ld_alpha"],
            precompute_ref_logps=cfg["precompute_ref_log_probs"],
            f_divergence_type=cfg["f_divergence_type"],
            f_alpha_divergence_coef=cfg["f_alpha_divergence_coef"],
            beta=cfg["beta"],
            loss_types=cfg["loss_type"],
            loss_weights=cfg["loss_weights"] or [1.0] * len(cfg["loss_type"]),
            label_smoothing=cfg["label_smoothing"],
            use_weighting=cfg["use_weighting"],
            args=types.SimpleNamespace(discopop_tau=cfg["discopop_tau"], gradient_checkpointing_kwargs=None),
            _metrics=new_metrics(),
            _total_train_tokens=0,
            _tp_size=1,
        )
        inputs = {
            "input_ids": ids,
            "attention_mask": t(d["attention_mask"].astype(np.int64)),
            "completion_mask": t(d["completion_mask"].astype(np.int64)),
        }
        if cfg["precompute_ref_log_probs"]:
            inputs["ref_chosen_logps"] = t(d["ref_chosen_logps"], dt)
            inputs["ref_rejected_logps"] = t(d["ref_rejected_logps"], dt)
        loss = DPOTrainer._compute_loss(s, model, inputs, return_outputs=False)
        loss.backward()
    return loss.item(), z.grad, last_metrics(s._metrics["train"])


def pt_dpo(cfg, d, dt):
    kw = (
        {"ref_chosen_logps": d["ref_chosen_logps"], "ref_rejected_logps": d["ref_rejected_logps"]}
        if cfg["precompute_ref_log_probs"]
        else {"ref_logits": d["ref_logits"]}
    )
    return ops.call(
        "trl.dpo_loss",
        dtype=dt,
        logits=d["logits"],
        input_ids=d["input_ids"],
        attention_mask=d["attention_mask"],
        completion_mask=d["completion_mask"],
        cotangents={"loss": 1.0},
        **kw,
        **cfg,
    )


def compare_metrics(r, m_trl, dt, skip=(), f32=()):
    for k, v in m_trl.items():
        if k in skip:
            continue
        assert k in r, f"metric {k!r} logged by TRL, absent from posttrain's {sorted(r.outputs)}"
        assert_close(r[k], v, "f32" if k in f32 else dt, k)


def compare_dpo(cfg, d, dt, head="stub"):
    loss, g, m = trl_dpo(cfg, d, dt, head)
    r = pt_dpo(cfg, d, dt)
    tol = dt if head == "stub" else "f32"
    assert_close(r["loss"], loss, tol, "loss")
    assert_close(r.grads["logits"], g, tol, "d loss/d logits")
    compare_metrics(r, m, tol)


DPO_SHAPES = [(1, 2, 3), (2, 7, 11), (4, 12, 23)]  # (pairs, length, vocab)

DPO_CASES = [pytest.param(dict(loss_type=[lt]), id=lt) for lt in DPO_LOSSES]
DPO_CASES += [
    pytest.param(
        dict(loss_type=[lt], f_divergence_type=fd, f_alpha_divergence_coef=coef, precompute_ref_log_probs=False),
        id=f"{lt}-{fd}-{coef}",
    )
    for lt in sorted(DPO_F_LOSSES - DPO_F_SCORE_DIFFERENCES)
    for fd, coef in [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 1.5)]
]
DPO_CASES += [
    pytest.param(dict(loss_type=["sigmoid"], precompute_ref_log_probs=False, beta=0.5), id="sigmoid-ref_logits"),
    pytest.param(dict(loss_type=["ipo"], precompute_ref_log_probs=False), id="ipo-ref_logits"),
    pytest.param(dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3]), id="rpo-weighted"),
    pytest.param(dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]), id="mpo"),
    pytest.param(dict(loss_type=["robust"], label_smoothing=0.2), id="robust-0.2"),
    pytest.param(dict(loss_type=["exo_pair"], label_smoothing=1e-3), id="exo-1e-3"),
    pytest.param(dict(loss_type=["sigmoid"], ld_alpha=0.5), id="ld_alpha-0.5"),
    pytest.param(dict(loss_type=["sigmoid"], ld_alpha=0.0, precompute_ref_log_probs=False), id="ld_alpha-0-ref_logits"),
    pytest.param(dict(loss_type=["sigmoid"], use_weighting=True), id="wpo"),
    # (TRL cannot combine use_weighting with "sft" or "hinge": its in-place `per_sequence_loss *= weights`
    # fails on sft's expanded scalar, and on relu's output that the backward needs.)
    pytest.param(dict(loss_type=["ipo", "sigmoid"], use_weighting=True, loss_weights=[0.5, 2.0]), id="wpo-ipo-sigmoid"),
    pytest.param(dict(loss_type=["discopop"], discopop_tau=0.5, beta=1.0), id="discopop-0.5"),
]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("over", DPO_CASES)
def test_dpo_loss(over, dt):
    cfg = dpo_cfg(**over)
    if dt == "f64" and cfg["f_divergence_type"] == "alpha_divergence":
        pytest.skip("trl 1.16 alpha_divergence indexes {float16, bfloat16, float32}[dtype]: KeyError for float64")
    near = cfg["f_divergence_type"] != "reverse_kl"
    for shape in DPO_SHAPES:
        compare_dpo(cfg, dpo_data(tuple(over.items()), *shape, ref_near=near), dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize(
    "over",
    [
        dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
        dict(loss_type=["ipo"], use_weighting=True, precompute_ref_log_probs=False),
    ],
    ids=["rpo", "ipo-wpo-ref_logits"],
)
def test_dpo_loss_real_fused_head(over, dt):
    """TRL 1.16's forward through its own fused LM head (float32 inside whatever the dtype): f32 tolerance."""
    cfg = dpo_cfg(**over)
    for shape in DPO_SHAPES[1:]:
        compare_dpo(cfg, dpo_data(("fused",) + tuple(over.items()), *shape), dt, head="fused")


DPO_F_RELEASE_CASES = [
    (lt, fd, coef)
    for lt in sorted(DPO_F_LOSSES)
    for fd, coef in [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 1.5)]
]


@release_only
@pytest.mark.parametrize("dt", ["f32"])  # trl 1.16's alpha_divergence has no float64 path
@pytest.mark.parametrize("loss_type,fdiv,coef", DPO_F_RELEASE_CASES, ids=[f"{a}-{b}-{c}" for a, b, c in DPO_F_RELEASE_CASES])
def test_release_difference_dpo_f_divergence_scores(loss_type, fdiv, coef, dt):
    """trl 1.16.0 differs from f2cd577 (DPOTrainer._compute_loss, f_divergence_type != 'reverse_kl'): the
    scores keep the constant f'(1) terms, forward_kl 1 - exp(-x) (f2cd577: -exp(-x)), js_divergence
    log 2 + logsigmoid(x) (f2cd577: logsigmoid(x)), alpha_divergence (exp((α-1)x) - 1)/(α-1) (f2cd577:
    exp((α-1)x)/(α-1)), which no longer cancel in ipo / sigmoid_norm (scores divided by each completion's
    length); and nca_pair, bco_pair, sppo_hard, apo_down read the raw log-ratios instead of the scores.
    posttrain selects 1.16's with ``f_divergence_scores="zero_at_reference"``: every loss type that
    reads scores matches the release; the default (f2cd577's) differs exactly on DPO_F_SCORE_DIFFERENCES."""
    base = dpo_cfg(loss_type=[loss_type], f_divergence_type=fdiv, f_alpha_divergence_coef=coef, precompute_ref_log_probs=False)
    cfg = dict(base, f_divergence_scores="zero_at_reference")
    for shape in DPO_SHAPES[1:]:
        d = dpo_data(("fdiff", loss_type, fdiv, coef), *shape, ref_near=True)
        loss, g, m = trl_dpo(cfg, d, dt)
        r = pt_dpo(cfg, d, dt)
        assert_close(r["loss"], loss, dt, "loss")
        assert_close(r.grads["logits"], g, dt, "d loss/d logits")
        compare_metrics(r, m, dt)
        old = pt_dpo(base, d, dt)  # f2cd577's scores
        same = np.isclose(old["loss"], loss, rtol=TOL[dt][0], atol=TOL[dt][1])
        assert bool(same) == (loss_type not in DPO_F_SCORE_DIFFERENCES), (old["loss"], loss)


@pytest.mark.parametrize("bad", ["trl_1.16", "", 3])
def test_dpo_f_divergence_scores_refuses_unknown_values(bad):
    d = dpo_data(("fdiff-bad",), *DPO_SHAPES[1], ref_near=True)
    cfg = dpo_cfg(loss_type=["ipo"], f_divergence_type="forward_kl", f_divergence_scores=bad)
    with pytest.raises(ValueError, match="f_divergence_scores"):
        pt_dpo(cfg, d, "f64")


# ---------------------------------------------------------------------------
# KTO (KTOTrainer._compute_loss)
# ---------------------------------------------------------------------------


def kto_data(key, n, length, vocab, *, labels=None):
    rng = rng_for("kto", key, n, length, vocab)
    ids, am, cm = sequences(rng, n, length, vocab)
    kl_ids, kl_am, kl_cm = sequences(rng, n, length + 1, vocab)
    lab = rng.random(n) < 0.5 if labels is None else np.asarray(labels, dtype=bool)
    z = rng.normal(0.0, 1.5, size=(n, length, vocab))
    zk = rng.normal(0.0, 1.5, size=(n, length + 1, vocab))
    return dict(
        logits=z,
        input_ids=ids,
        attention_mask=am,
        completion_mask=cm,
        label=lab,
        KL_logits=zk,
        KL_input_ids=kl_ids,
        KL_attention_mask=kl_am,
        KL_completion_mask=kl_cm,
        ref_logits=z + rng.normal(0.0, 0.5, size=z.shape),
        ref_KL_logits=zk + rng.normal(0.0, 0.5, size=zk.shape),
        ref_logps=-rng.uniform(2.0, 10.0, size=n),
        ref_KL_logps=-rng.uniform(2.0, 10.0, size=n),
    )


def trl_kto(cfg, d, dt, head="stub"):
    from trl.trainer.kto_trainer import KTOTrainer

    v = d["logits"].shape[-1]
    calc_kl = cfg["loss_type"] != "apo_zero_unpaired"
    with default_dtype(dt):
        z = t(d["logits"], dt, grad=True)
        ids, kl_ids = t(d["input_ids"]), t(d["KL_input_ids"])
        model = make_lm(head, [(ids, z), (kl_ids, t(d["KL_logits"], dt))], v, dt)
        ref = make_lm(head, [(ids, t(d["ref_logits"], dt)), (kl_ids, t(d["ref_KL_logits"], dt))], v, dt)
        s = type("KTOSelf", (), {"_compute_kl_logps": KTOTrainer._compute_kl_logps})()
        s.model, s.ref_model, s.accelerator = model, ref, Accel()
        s.calculate_KL = calc_kl
        s.aux_loss_enabled = False
        s.precompute_ref_logps = cfg["precompute_ref_log_probs"]
        s.loss_type, s.beta = cfg["loss_type"], cfg["beta"]
        s.desirable_weight, s.undesirable_weight = cfg["desirable_weight"], cfg["undesirable_weight"]
        s.args = types.SimpleNamespace(gradient_checkpointing_kwargs=None)
        s._metrics, s._total_train_tokens, s._tp_size = new_metrics(), 0, 1
        inputs = {
            "input_ids": ids,
            "attention_mask": t(d["attention_mask"].astype(np.int64)),
            "completion_mask": t(d["completion_mask"].astype(np.int64)),
            "label": t(d["label"]),
        }
        if calc_kl:
            inputs.update(
                KL_input_ids=kl_ids,
                KL_attention_mask=t(d["KL_attention_mask"].astype(np.int64)),
                KL_completion_mask=t(d["KL_completion_mask"].astype(np.int64)),
            )
        if cfg["precompute_ref_log_probs"]:
            inputs["ref_logps"] = t(d["ref_logps"], dt)
            if calc_kl:
                inputs["ref_KL_logps"] = t(d["ref_KL_logps"], dt)
        loss = KTOTrainer._compute_loss(s, model, inputs, return_outputs=False)
        loss.backward()
    return loss.item(), z.grad, last_metrics(s._metrics["train"])


def pt_kto(cfg, d, dt):
    calc_kl = cfg["loss_type"] != "apo_zero_unpaired"
    keys = ["logits", "input_ids", "attention_mask", "completion_mask", "label"]
    if calc_kl:
        keys += ["KL_logits", "KL_input_ids", "KL_attention_mask", "KL_completion_mask"]
    if cfg["precompute_ref_log_probs"]:
        keys += ["ref_logps"] + (["ref_KL_logps"] if calc_kl else [])
    else:
        keys += ["ref_logits"] + (["ref_KL_logits"] if calc_kl else [])
    return ops.call("trl.kto_loss", dtype=dt, cotangents={"loss": 1.0}, **{k: d[k] for k in keys}, **cfg)


KTO_CASES = [
    dict(loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, precompute_ref_log_probs=False),
    dict(loss_type="kto", beta=0.5, desirable_weight=1.33, undesirable_weight=0.7, precompute_ref_log_probs=True),
    dict(loss_type="apo_zero_unpaired", beta=0.1, desirable_weight=1.0, undesirable_weight=1.2, precompute_ref_log_probs=False),
    dict(loss_type="apo_zero_unpaired", beta=1.0, desirable_weight=0.8, undesirable_weight=1.0, precompute_ref_log_probs=True),
]
KTO_SHAPES = [(1, 3, 4), (4, 7, 11), (8, 12, 23)]  # (batch, length, vocab)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("labels", [None, "all_desirable", "all_undesirable"])
@pytest.mark.parametrize("cfg", KTO_CASES, ids=lambda c: f"{c['loss_type']}-{c['beta']}-pre{int(c['precompute_ref_log_probs'])}")
def test_kto_loss(cfg, labels, dt):
    for n, length, vocab in KTO_SHAPES:
        lab = None if labels is None else [labels == "all_desirable"] * n
        d = kto_data((cfg["loss_type"], cfg["beta"], labels), n, length, vocab, labels=lab)
        loss, g, m = trl_kto(cfg, d, dt)
        r = pt_kto(cfg, d, dt)
        assert_close(r["loss"], loss, dt, "loss")
        assert_close(r.grads["logits"], g, dt, "d loss/d logits")
        compare_metrics(r, m, dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("cfg", KTO_CASES[:1], ids=["kto"])
def test_kto_loss_real_fused_head(cfg, dt):
    d = kto_data(("fused",), 4, 7, 11)
    loss, g, m = trl_kto(cfg, d, dt, head="fused")
    r = pt_kto(cfg, d, dt)
    assert_close(r["loss"], loss, "f32", "loss")
    assert_close(r.grads["logits"], g, "f32", "d loss/d logits")
    compare_metrics(r, m, "f32")


# ---------------------------------------------------------------------------
# Reward model (RewardTrainer.compute_loss)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01, 0.5])
@pytest.mark.parametrize("pairs", [1, 4, 16])
def test_reward_loss(pairs, center, margin, dt):
    from trl.trainer.reward_trainer import RewardTrainer

    rng = rng_for("reward", pairs, center, margin)
    _, am, _ = sequences(rng, 2 * pairs, 9, 5)
    logits = rng.normal(0.0, 2.0, size=(2 * pairs, 1))
    mg = rng.uniform(0.0, 1.0, size=pairs)
    with default_dtype(dt):
        z = t(logits, dt, grad=True)
        model = lambda **kw: types.SimpleNamespace(logits=z)  # noqa: E731
        s = types.SimpleNamespace(
            model=types.SimpleNamespace(training=True),
            accelerator=Accel(),
            args=types.SimpleNamespace(center_rewards_coefficient=center),
            _metrics=new_metrics(),
            _total_train_tokens=0,
            _tp_size=1,
        )
        inputs = {"input_ids": torch.zeros(am.shape, dtype=torch.long), "attention_mask": t(am.astype(np.int64))}
        if margin:
            inputs["margin"] = t(mg, dt)
        loss = RewardTrainer.compute_loss(s, model, inputs)
        loss.backward()
    kw = {"margin": mg} if margin else {}
    r = ops.call(
        "trl.reward_loss",
        dtype=dt,
        logits=logits,
        attention_mask=am,
        center_rewards_coefficient=center,
        cotangents={"loss": 1.0},
        **kw,
    )
    assert_close(r["loss"], loss, dt, "loss")
    assert_close(r.grads["logits"], z.grad, dt, "d loss/d logits")
    compare_metrics(r, last_metrics(s._metrics["train"]), dt, f32={"accuracy"})


# ---------------------------------------------------------------------------
# CPO / ORPO (experimental trainers: the losses and get_batch_loss_metrics)
# ---------------------------------------------------------------------------


def pref_logps(key, n):
    rng = rng_for("pref-logps", key, n)
    return -rng.uniform(0.05, 6.0, size=n), -rng.uniform(0.05, 6.0, size=n)


CPO_CASES = [
    dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0),
    dict(loss_type="sigmoid", beta=0.5, label_smoothing=0.2, simpo_gamma=0.5, alpha=0.25),
    dict(loss_type="hinge", beta=0.5, label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0),
    dict(loss_type="hinge", beta=2.0, label_smoothing=0.0, simpo_gamma=0.5, alpha=-0.3),
    dict(loss_type="ipo", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0),
    dict(loss_type="simpo", beta=2.5, label_smoothing=0.1, simpo_gamma=1.0, alpha=0.0),
    dict(loss_type="simpo", beta=2.0, label_smoothing=0.0, simpo_gamma=0.5, alpha=0.5),
]


def _cpo_self(cfg, cpo_alpha=1.0):
    from trl.experimental.cpo import CPOTrainer

    s = type(
        "CPOSelf",
        (),
        {
            "cpo_loss": CPOTrainer.cpo_loss,
            "concatenated_forward": CPOTrainer.concatenated_forward,
            "get_batch_loss_metrics": CPOTrainer.get_batch_loss_metrics,
            "concatenated_inputs": staticmethod(CPOTrainer.concatenated_inputs),
            "get_batch_logps": staticmethod(CPOTrainer.get_batch_logps),
        },
    )()
    s.accelerator = Accel()
    s.is_encoder_decoder = False
    s.pad_token_id = 0
    s.aux_loss_enabled = False
    s.cpo_alpha = cpo_alpha
    for k in ("loss_type", "beta", "label_smoothing", "simpo_gamma", "alpha"):
        setattr(s, k, cfg[k])
    return s


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("cfg", CPO_CASES, ids=lambda c: f"{c['loss_type']}-{c['beta']}-{c['alpha']}")
@pytest.mark.parametrize("n", [1, 4, 9])
def test_cpo_loss(n, cfg, dt):
    pc, pr = pref_logps(("cpo", tuple(cfg.items())), n)
    rng = rng_for("cpo-cot", n)
    cot = {"losses": rng.normal(size=n), "chosen_rewards": rng.normal(size=n), "rejected_rewards": rng.normal(size=n)}
    s = _cpo_self(cfg)
    with default_dtype(dt):
        tc, tr = t(pc, dt, grad=True), t(pr, dt, grad=True)
        losses, cr, rr = s.cpo_loss(tc, tr)
        (losses * t(cot["losses"], dt)).sum().backward()
    r = ops.call(
        "trl.cpo_loss",
        dtype=dt,
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        cotangents={"losses": cot["losses"]},
        **cfg,
    )
    assert_close(r["losses"], losses, dt, "losses")
    assert_close(r["chosen_rewards"], cr, dt, "chosen_rewards")
    assert_close(r["rejected_rewards"], rr, dt, "rejected_rewards")
    assert_close(r.grads["policy_chosen_logps"], tc.grad, dt, "d/d chosen")
    assert_close(r.grads["policy_rejected_logps"], tr.grad, dt, "d/d rejected")


def pair_batch(key, pairs, length, vocab, *, rejected_length=None):
    """CPO / ORPO tokenized pairs: prompt tokens and padding labelled -100."""
    rng = rng_for("pairs", key, pairs, length, vocab)
    out = {}
    for side, ln in (("chosen", length), ("rejected", rejected_length or length)):
        ids, am, cm = sequences(rng, pairs, ln, vocab)
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = am
        out[f"{side}_labels"] = np.where(cm, ids, -100)
    lmax = max(length, rejected_length or length)
    out["logits"] = rng.normal(0.0, 1.5, size=(2 * pairs, lmax, vocab))
    return out


PAIR_SHAPES = [(1, 3, 4, None), (2, 7, 11, None), (4, 9, 13, 6)]  # (pairs, length, vocab, rejected length)


def _run_batch_metrics(s, b, dt):
    with default_dtype(dt):
        z = t(b["logits"], dt, grad=True)
        model = lambda ids, attention_mask=None, use_cache=None, **kw: types.SimpleNamespace(logits=z)  # noqa: E731
        batch = {k: t(v) for k, v in b.items() if k != "logits"}
        loss, metrics = s.get_batch_loss_metrics(model, batch, train_eval="train")
        loss.backward()
    return loss, z.grad, {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("cpo_alpha", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("cfg", CPO_CASES, ids=lambda c: f"{c['loss_type']}-{c['beta']}-{c['alpha']}")
def test_cpo_batch_loss_metrics(cfg, cpo_alpha, dt):
    s = _cpo_self(cfg, cpo_alpha)
    for shape in PAIR_SHAPES:
        b = pair_batch(("cpo", tuple(cfg.items()), cpo_alpha), *shape[:3], rejected_length=shape[3])
        loss, g, m = _run_batch_metrics(s, b, dt)
        r = ops.call("trl.cpo_batch_loss_metrics", dtype=dt, cotangents={"loss": 1.0}, cpo_alpha=cpo_alpha, **b, **cfg)
        assert_close(r["loss"], loss, dt, f"{shape} loss")
        assert_close(r.grads["logits"], g, dt, f"{shape} d loss/d logits")
        compare_metrics(r, m, dt, f32={"rewards/accuracies"})


def _orpo_self(beta):
    from trl.experimental.orpo import ORPOTrainer

    s = type(
        "ORPOSelf",
        (),
        {
            "odds_ratio_loss": ORPOTrainer.odds_ratio_loss,
            "concatenated_forward": ORPOTrainer.concatenated_forward,
            "get_batch_loss_metrics": ORPOTrainer.get_batch_loss_metrics,
            "concatenated_inputs": staticmethod(ORPOTrainer.concatenated_inputs),
            "get_batch_logps": staticmethod(ORPOTrainer.get_batch_logps),
        },
    )()
    s.accelerator = Accel()
    s.is_encoder_decoder = False
    s.padding_value = 0
    s.aux_loss_enabled = False
    s.beta = beta
    return s


# ORPO's odds_ratio_loss casts the log-probs to float32 (`.float()`) whatever their dtype, so TRL's
# ORPO terms are float32 in both precisions: compared at the f32 tolerance.
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 4, 9])
def test_odds_ratio_loss(n, beta, dt):
    pc, pr = pref_logps(("orpo", beta), n)
    cot = rng_for("orpo-cot", n).normal(size=n)
    s = _orpo_self(beta)
    with default_dtype(dt):
        tc, tr = t(pc, dt, grad=True), t(pr, dt, grad=True)
        losses, cr, rr, lor, loc = s.odds_ratio_loss(tc, tr)
        (losses * t(cot, "f32")).sum().backward()
    r = ops.call(
        "trl.odds_ratio_loss", dtype=dt, policy_chosen_logps=pc, policy_rejected_logps=pr, beta=beta, cotangents={"losses": cot}
    )
    for k, v in (("losses", losses), ("chosen_rewards", cr), ("rejected_rewards", rr), ("log_odds_ratio", lor), ("log_odds_chosen", loc)):
        assert_close(r[k], v, "f32", k)
    assert_close(r.grads["policy_chosen_logps"], tc.grad, "f32", "d/d chosen")
    assert_close(r.grads["policy_rejected_logps"], tr.grad, "f32", "d/d rejected")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
def test_orpo_batch_loss_metrics(beta, dt):
    s = _orpo_self(beta)
    for shape in PAIR_SHAPES:
        b = pair_batch(("orpo", beta), *shape[:3], rejected_length=shape[3])
        loss, g, m = _run_batch_metrics(s, b, dt)
        r = ops.call("trl.orpo_batch_loss_metrics", dtype=dt, cotangents={"loss": 1.0}, beta=beta, **b)
        assert_close(r["loss"], loss, "f32", f"{shape} loss")
        assert_close(r.grads["logits"], g, "f32", f"{shape} d loss/d logits")
        compare_metrics(r, m, dt, f32={"rewards/accuracies", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected", "rewards/margins"})


# ---------------------------------------------------------------------------
# GKD (experimental GKDTrainer) and the distillation JSD
# ---------------------------------------------------------------------------


def distill_case(key, b, length, vocab, labels=True):
    rng = rng_for("distill", key, b, length, vocab)
    ids, am, cm = sequences(rng, b, length, vocab)
    return dict(
        student=rng.normal(0.0, 1.5, size=(b, length, vocab)),
        teacher=rng.normal(0.0, 1.5, size=(b, length, vocab)),
        input_ids=ids,
        attention_mask=am,
        labels=np.where(cm, ids, -100) if labels else None,
    )


DISTILL_SHAPES = [(1, 2, 3), (2, 7, 11), (4, 9, 23)]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("num_items", [None, 7])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("temperature", [1.0, 0.9])
@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0])
def test_gkd_generalized_jsd_loss(beta, temperature, reduction, num_items, dt):
    from trl.experimental.gkd import GKDTrainer

    for i, shape in enumerate(DISTILL_SHAPES):
        for with_labels in (True, False) if i == 1 else (True,):
            c = distill_case((beta, temperature, reduction), *shape, labels=with_labels)
            with default_dtype(dt):
                zs = t(c["student"], dt, grad=True)
                out = GKDTrainer.generalized_jsd_loss(
                    zs,
                    t(c["teacher"], dt),
                    labels=None if c["labels"] is None else t(c["labels"]),
                    beta=beta,
                    temperature=temperature,
                    reduction=reduction,
                    num_items_in_batch=num_items,
                )
                cot = rng_for("gkd-cot", shape).normal(size=tuple(out.shape))
                (out * t(cot, dt)).sum().backward()
            kw = {} if c["labels"] is None else {"labels": c["labels"]}
            r = ops.call(
                "trl.gkd_generalized_jsd_loss",
                dtype=dt,
                student_logits=c["student"],
                teacher_logits=c["teacher"],
                beta=beta,
                temperature=temperature,
                reduction=reduction,
                num_items_in_batch=num_items,
                cotangents={"loss": cot},
                **kw,
            )
            assert_close(r["loss"], out, dt, f"{shape} labels={with_labels} loss")
            assert_close(r.grads["student_logits"], zs.grad, dt, f"{shape} labels={with_labels} d/d student_logits")
            # f2cd577's experimental DistillationTrainer.generalized_jsd_loss (gone from 1.16, whose
            # DistillationTrainer works on hidden states) is the same function: same answer.
            r2 = ops.call(
                "trl.distillation_generalized_jsd_loss",
                dtype=dt,
                student_logits=c["student"],
                teacher_logits=c["teacher"],
                beta=beta,
                temperature=temperature,
                reduction=reduction,
                num_items_in_batch=num_items,
                cotangents={"loss": cot},
                **kw,
            )
            assert_close(r2["loss"], out, dt, f"{shape} labels={with_labels} distillation loss")
            assert_close(r2.grads["student_logits"], zs.grad, dt, f"{shape} distillation d/d student_logits")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("num_items", [None, 9])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_compute_loss(beta, num_items, dt):
    from trl.experimental.gkd import GKDTrainer

    for shape in DISTILL_SHAPES:
        c = distill_case(("gkd-cl", beta), *shape)
        with default_dtype(dt):
            zs = t(c["student"], dt, grad=True)
            ids = t(c["input_ids"])
            student = StubLM([(ids, zs)])
            s = types.SimpleNamespace(teacher_model=StubLM([(ids, t(c["teacher"], dt))]), beta=beta)
            s.generalized_jsd_loss = GKDTrainer.generalized_jsd_loss
            inputs = {"input_ids": ids, "attention_mask": t(c["attention_mask"].astype(np.int64)), "labels": t(c["labels"])}
            loss = GKDTrainer.compute_loss(s, student, inputs, num_items_in_batch=num_items)
            loss.backward()
        r = ops.call(
            "trl.gkd_compute_loss",
            dtype=dt,
            logits=c["student"],
            teacher_logits=c["teacher"],
            input_ids=c["input_ids"],
            attention_mask=c["attention_mask"],
            labels=c["labels"],
            beta=beta,
            num_items_in_batch=num_items,
            cotangents={"loss": 1.0},
        )
        assert_close(r["loss"], loss, dt, f"{shape} loss")
        assert_close(r.grads["logits"], zs.grad, dt, f"{shape} d loss/d logits")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("support", [False, True], ids=["dense", "support_mask"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.3])
def test_distillation_jsd_divergence(beta, support, dt):
    """f2cd577's experimental DistillationTrainer ``_jsd_divergence``; in 1.16 the same function
    (both branches) lives in ``trl.experimental.server_distillation``."""
    sd = pytest.importorskip("trl.experimental.server_distillation.server_distillation_trainer")
    for shape in DISTILL_SHAPES:
        c = distill_case(("jsd", beta, support), *shape)
        s_lp = c["student"] - np.log(np.exp(c["student"]).sum(-1, keepdims=True))
        t_lp = c["teacher"] - np.log(np.exp(c["teacher"]).sum(-1, keepdims=True))
        mask = rng_for("jsd-mask", shape).random(s_lp.shape) > 0.3 if support else None
        with default_dtype(dt):
            st = t(s_lp, dt, grad=True)
            jsd = sd._jsd_divergence(st, t(t_lp, dt), beta, None if mask is None else t(mask))
            cot = rng_for("jsd-cot", shape).normal(size=tuple(jsd.shape))
            (jsd * t(cot, dt)).sum().backward()
        kw = {} if mask is None else {"support_mask": mask}
        r = ops.call(
            "trl.distillation_jsd_divergence",
            dtype=dt,
            student_log_probs=s_lp,
            teacher_log_probs=t_lp,
            beta=beta,
            cotangents={"jsd": cot},
            **kw,
        )
        assert_close(r["jsd"], jsd, dt, f"{shape} jsd")
        assert_close(r.grads["student_log_probs"], st.grad, dt, f"{shape} d/d student_log_probs")


# ---------------------------------------------------------------------------
# The release against the vectors (recorded from f2cd577)
# ---------------------------------------------------------------------------

VECTORS = __import__("pathlib").Path(__file__).resolve().parents[2] / "conformance" / "vectors"


def _vector_cases(op):
    import json

    out = []
    # (edge.trl.* record posttrain's own edge semantics — poisoned padding, the log-ratio clamp,
    # errors — not peer outputs.)
    for name in (f"trl.{op}.json",):
        f = VECTORS / name
        if f.exists():
            for c in json.loads(f.read_text())["cases"]:
                out.append(pytest.param(c, id=f"{name[:-5]}::{c['name']}"))
    return out


def _vec_array(spec):
    a = np.asarray(spec["data"], dtype={"f64": np.float64, "i64": np.int64, "bool": bool}[spec["dtype"]])
    return a.reshape(spec["shape"])


def _vector_release_difference(c) -> Optional[str]:
    """The named release difference a vector case falls under, or None."""
    p = {k: (math.inf if v == "inf" else v) for k, v in c["params"].items()}
    ins = c["inputs"]
    shape = ins["per_token_logps"]["shape"]
    dkw = {"is_ratio": "token"} if "importance_sampling_ratio" in ins and ins["importance_sampling_ratio"]["shape"][-1] != 1 else {}
    data = {k: _vec_array(v) for k, v in ins.items()}
    return release_difference(p["loss_type"], p["importance_sampling_level"], p, dkw, shape[1], data)


@release_only
@pytest.mark.parametrize("case", _vector_cases("grpo_loss"))
def test_release_vs_vectors_grpo_loss(case):
    """TRL 1.16.0's own GRPOTrainer._compute_loss reproduces every grpo_loss vector (recorded from
    f2cd577, f64) except the cases under a named release difference."""
    why = _vector_release_difference(case)
    if why is not None:
        pytest.skip(f"release difference {why} (test_release_difference_*)")
    p = {k: (math.inf if v == "inf" else v) for k, v in case["params"].items()}
    data = {k: _vec_array(v) for k, v in case["inputs"].items()}
    loss, g_lp, g_ent, m, _ = trl_grpo(p, data, "f64")
    got = dict(m, loss=loss)
    for k, spec in case["outputs"].items():
        if k in got:
            assert_close(got[k], _vec_array(spec), "f32" if k in F32_METRICS else "f64", k)
    vjp = case.get("vjp")
    if vjp and list(vjp["cotangents"]) == ["loss"]:
        assert float(_vec_array(vjp["cotangents"]["loss"])) == 1.0
        assert_close(g_lp, _vec_array(vjp["grads"]["per_token_logps"]), "f64", "d loss/d per_token_logps")
        if "entropies" in vjp["grads"]:
            assert_close(g_ent, _vec_array(vjp["grads"]["entropies"]), "f64", "d loss/d entropies")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("buffered", [None, 5.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_compute_loss(beta, temperature, buffered, dt):
    """f2cd577's experimental ``DistillationTrainer.compute_loss`` (JSD over the completion positions,
    ``Σ / (num_items or n_valid)``) against 1.16's ``trl.trainer.distillation_trainer._chunked_divergence_loss``,
    the same reduction on hidden states × ``lm_head`` (identity heads here; float32 inside: f32 tolerance)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    for b, p_len, c_len, v in [(1, 2, 1, 3), (2, 3, 5, 11), (4, 2, 7, 17)]:
        rng = rng_for("distill-cl", beta, temperature, buffered, b)
        z = rng.normal(0.0, 1.5, size=(b, p_len + c_len, v))
        zt = rng.normal(0.0, 1.5, size=(b, p_len + c_len, v))
        prompt_ids = rng.integers(2, v, size=(b, p_len))
        completion_ids = rng.integers(2, v, size=(b, c_len))
        cmask = completion_mask(rng, b, c_len, empty_row=b >= 4)
        with default_dtype(dt):
            zs = t(z, dt, grad=True)
            eye = torch.eye(v, dtype=TDT[dt])
            num_items = None if buffered is None else torch.tensor(buffered).clamp(min=1.0) / 1
            loss, _, _ = _chunked_divergence_loss(
                zs[:, -c_len - 1 : -1, :],
                t(zt, dt)[:, -c_len - 1 : -1, :],
                eye,
                eye,
                t(cmask.astype(np.int64)),
                beta,
                num_items_in_batch=num_items,
                temperature=temperature,
            )
            loss.backward()
        r = ops.call(
            "trl.distillation_compute_loss",
            dtype=dt,
            logits=z,
            teacher_logits=zt,
            prompt_ids=prompt_ids,
            prompt_mask=np.ones((b, p_len), dtype=bool),
            completion_ids=completion_ids,
            completion_mask=cmask,
            beta=beta,
            temperature=temperature,
            _buffered_num_items=buffered,
            cotangents={"loss": 1.0},
        )
        assert_close(r["loss"], loss, "f32", f"b={b} loss")
        assert_close(r.grads["logits"], zs.grad, "f32", f"b={b} d loss/d logits")
