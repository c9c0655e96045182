"""Differential tests: posttrain against the released verl installed from pip.

On seeded random inputs of several shapes (``(1, 1)``, ``(3, 7)``,
``(8, 33)``; masks with left/right padding, holes and a fully masked row;
log-ratios spread ~0.5 so that ratios clip; group ``index`` arrays with
singleton groups) every verl op posttrain shares is run through verl's own
installed function (gradients by ``torch.autograd`` with the same cotangent)
and through :func:`posttrain.ops.call` (gradients by ``cotangents=``), and the
two must agree: f64 within 1e-9 relative (1e-12 absolute), f32 within 1e-4
relative (1e-5 absolute), the inputs rounded to f32 on both sides and the
peer computing in f32 too.

posttrain's conformance vectors were recorded from verl commit
``1dda039b9c63``; the installed release can differ. ``test_release_vs_vectors``
replays every vector case through the release and asserts it reproduces the
recorded outputs except where a difference is named in
:data:`RELEASE_DIFFERENCES`; each named difference has a
``test_release_difference_<what>`` test that asserts posttrain reproduces the
release behaviour through the option that selects it, or is a strict xfail
where posttrain has no such option yet.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import warnings
import zlib
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import pytest

verl = pytest.importorskip("verl")
torch = pytest.importorskip("torch")

import posttrain.ops as ops  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo import core_algos as ca  # noqa: E402
from verl.utils import torch_functional as vF  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

try:
    from verl.trainer.ppo import rollout_corr_helper as rch
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
except ImportError:  # pragma: no cover - older releases
    rch = None
    RolloutCorrectionConfig = None

VECTORS = pathlib.Path(__file__).resolve().parents[2] / "conformance" / "vectors"
VECTOR_COMMIT = "1dda039b9c63"

DTYPES = ["f64", "f32"]
TOL = {"f64": (1e-9, 1e-12), "f32": (1e-4, 1e-5)}
TDT = {"f64": torch.float64, "f32": torch.float32}
SHAPES = [(1, 1), (3, 7), (8, 33)]
AGG_MODES = [
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
]
# verl's global normalizers (dp_size > 1 needs the global counts).
NORMS = {
    "local": {},
    "global": {"dp_size": 2, "batch_num_tokens": 37, "global_batch_size": 11, "loss_scale_factor": 24},
}


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def rng_for(*key: Any) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def make_mask(rng: np.random.Generator, b: int, t: int, full_row_masked: bool = True) -> np.ndarray:
    """Row kinds cycle: full, right padding, left padding, holes; row 5 of a
    batch of ≥ 8 is fully masked (unless ``full_row_masked`` is off)."""
    m = np.ones((b, t), dtype=bool)
    for i in range(b):
        kind = i % 4
        if t >= 3:
            if kind == 1:
                m[i, rng.integers(t // 2, t) :] = False
            elif kind == 2:
                m[i, : rng.integers(1, t // 2 + 1)] = False
            elif kind == 3:
                m[i, rng.random(t) < 0.3] = False
        if not m[i].any():
            m[i, rng.integers(t)] = True
    if full_row_masked and b >= 8:
        m[5] = False
    return m


def policy_inputs(rng: np.random.Generator, b: int, t: int, **mask_kw: Any) -> Dict[str, np.ndarray]:
    old = -rng.gamma(1.5, 0.8, (b, t)) - 0.01
    lp = np.minimum(old + rng.normal(0.0, 0.5, (b, t)), -1e-3)
    adv = rng.normal(0.0, 1.0, (b, t))
    adv[rng.random((b, t)) < 0.1] = 0.0
    return {
        "old_log_prob": old,
        "log_prob": lp,
        "advantages": adv,
        "response_mask": make_mask(rng, b, t, **mask_kw),
    }


def group_index(rng: np.random.Generator, b: int, min_size: int = 1) -> np.ndarray:
    """Group labels (non-contiguous, shuffled); with ``min_size == 1`` the
    last group of a batch > 1 is a singleton."""
    if b == 1:
        return np.array([7], dtype=np.int64)
    sizes = []
    left = b
    while left > 0:
        s = min(left, int(rng.integers(max(2, min_size), 5)))
        if left - s == 1 and min_size > 1:
            s += 1
        sizes.append(s)
        left -= s
    if min_size == 1 and sizes[-1] > 1:
        sizes[-1] -= 1
        sizes.append(1)
    labels = rng.permutation(50)[: len(sizes)] * 3 + 1
    idx = np.concatenate([np.full(s, lab) for s, lab in zip(sizes, labels)])
    return rng.permutation(idx).astype(np.int64)


def outcome_rewards(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A continuous score at each row's last valid token (plus small token
    rewards elsewhere on valid tokens), 0 on padding."""
    b, t = mask.shape
    r = np.zeros((b, t))
    for i in range(b):
        valid = np.flatnonzero(mask[i])
        if valid.size:
            r[i, valid[-1]] = rng.normal(0.5, 1.0)
            r[i, valid[:-1]] = rng.normal(0.0, 0.05, valid.size - 1)
    return r


def rnd(a: Any, dt: str) -> Any:
    """Rounds float arrays to f32 for the f32 runs (both sides then see the same numbers)."""
    if isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating) and dt == "f32":
        return a.astype(np.float32).astype(np.float64)
    if isinstance(a, float) and dt == "f32":
        return float(np.float32(a))
    return a


# ---------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------


def assert_close(got: Any, want: Any, dt: str, what: str) -> None:
    rtol, atol = TOL[dt]
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.size == want.size, f"{what}: posttrain has {got.shape}, verl {want.shape}"
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=rtol, atol=atol, err_msg=what)


def _f32_internal(key: str, value: Any) -> bool:
    """verl's rollout-correction fractions are ``bool.float().mean()``:
    float32 whatever the input dtype. Such a value (f32-representable) is
    compared at the f32 tolerance."""
    v = np.asarray(value, dtype=np.float64)
    return "fraction" in key and bool(np.all(v.astype(np.float32).astype(np.float64) == v))


def compare(op: str, got: "ops.OpResult", want: Dict[str, Any], wgrads: Dict[str, Any], dt: str) -> None:
    for k, v in want.items():
        assert k in got.outputs, f"{op}: posttrain has no output `{k}` (has {sorted(got.outputs)})"
        tol = "f32" if _f32_internal(k, v) else dt
        assert_close(got.outputs[k], v, tol, f"{op} output {k} [{dt}]")
    for k, v in wgrads.items():
        assert k in got.grads, f"{op}: posttrain gave no gradient for `{k}`"
        assert_close(got.grads[k], v, dt, f"{op} d/d{k} [{dt}]")


# ---------------------------------------------------------------------------
# The peer side: verl's installed functions on torch tensors
# ---------------------------------------------------------------------------


class Torch:
    """Builds the peer's tensors in one dtype and collects the leaves whose
    gradients are asked for."""

    def __init__(self, dt: str):
        self.dtype = TDT[dt]
        self.leaves: Dict[str, torch.Tensor] = {}

    def f(self, a: Any, grad: Optional[str] = None) -> torch.Tensor:
        t = torch.tensor(np.asarray(a, dtype=np.float64), dtype=self.dtype)
        if grad is not None:
            t.requires_grad_(True)
            self.leaves[grad] = t
        return t

    def m(self, a: Any) -> torch.Tensor:
        """A mask as the float dtype (verl's masks are numeric); a weighted
        (float) mask keeps its weights."""
        a = np.asarray(a)
        if a.dtype != bool and not np.issubdtype(a.dtype, np.floating):
            a = a.astype(bool)
        return torch.tensor(a.astype(np.float64), dtype=self.dtype)

    def i(self, a: Any) -> torch.Tensor:
        return torch.tensor(np.asarray(a), dtype=torch.long)

    def finish(self, outs: Dict[str, Any], cot: Optional[Dict[str, Any]]) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
        if cot:
            total = 0
            for k, c in cot.items():
                total = total + (torch.as_tensor(np.asarray(c, dtype=np.float64), dtype=self.dtype) * outs[k]).sum()
            total.backward()
        out_np = {}
        for k, v in outs.items():
            if isinstance(v, torch.Tensor):
                out_np[k] = v.detach().to(torch.float64).numpy()
            else:
                out_np[k] = np.asarray(float(v))
        grads = {}
        if cot:
            for k, t in self.leaves.items():
                g = t.grad
                grads[k] = np.zeros(t.shape) if g is None else g.to(torch.float64).numpy()
        return out_np, grads


@contextlib.contextmanager
def default_dtype(dt: str):
    """verl builds some constants with ``torch.tensor(<python float>)`` (GRPO's
    singleton-group mean 0 / std 1, pf-ppo's 0/1 weights, …), which take
    torch's default dtype. The f64 runs use a float64 default, as the vectors'
    generator did, so that the peer computes in f64 throughout; the f32 runs
    keep float32. (``test_verl_default_dtype_singleton_groups`` shows what the
    float32 default changes in an f64 run.)"""
    old = torch.get_default_dtype()
    torch.set_default_dtype(TDT[dt])
    try:
        yield
    finally:
        torch.set_default_dtype(old)


PEER: Dict[str, Callable] = {}


def in_default_dtype(fn: Callable) -> Callable:
    def run(I, P, dt, cot):
        with default_dtype(dt):
            return fn(I, P, dt, cot)

    run.__name__ = fn.__name__
    return run


def peer(*names: str):
    """Registers ``fn(inputs, params, dtype, cotangents) -> (outputs, grads)``
    as verl's side of the ops ``names`` (run under :func:`default_dtype`)."""

    def deco(fn):
        for n in names:
            PEER[n] = in_default_dtype(fn)
        return fn

    return deco


def norm_kwargs(p: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "dp_size": p.get("dp_size") or 1,
        "batch_num_tokens": p.get("batch_num_tokens"),
        "global_batch_size": p.get("global_batch_size"),
        "loss_scale_factor": p.get("loss_scale_factor"),
    }


def global_batch_info(p: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in norm_kwargs(p).items() if v is not None}


def actor_config(p: Dict[str, Any]) -> ActorConfig:
    """verl's own ActorConfig with the policy-loss fields of ``p``."""
    pl = {
        k: p[k]
        for k in ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef", "dro_beta")
        if k in p
    }
    if RolloutCorrectionConfig is not None and p.get("loss_mode") == "bypass_mode":
        pl["rollout_correction"] = RolloutCorrectionConfig(
            rollout_is=p.get("rollout_is"),
            rollout_is_threshold=p.get("rollout_is_threshold", 2.0),
            rollout_is_batch_normalize=bool(p.get("rollout_is_batch_normalize") or False),
            rollout_rs=p.get("rollout_rs"),
            rollout_rs_threshold=p.get("rollout_rs_threshold"),
            bypass_mode=True,
            loss_type=p.get("loss_type") or "ppo_clip",
        )
    actor = {k: p[k] for k in ("clip_ratio", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "tau_pos", "tau_neg") if k in p}
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        loss_agg_mode=p.get("loss_agg_mode", "token-mean"),
        policy_loss=PolicyLossConfig(loss_mode=p.get("loss_mode", "vanilla"), **pl),
        global_batch_info=global_batch_info(p),
        **actor,
    )


def _metrics(m: Dict[str, Any]) -> Dict[str, float]:
    return {k.split("/", 1)[1] if k.startswith("actor/") else k: float(v) for k, v in m.items()}


@contextlib.contextmanager
def seeded(seed: Optional[int]):
    if seed is None:
        yield
        return
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


@peer("verl.policy_loss")
def _peer_policy_loss(I, P, dt, cot):
    x = Torch(dt)
    w = I.get("rollout_is_weights")
    with seeded(P.get("seed")):
        loss, metrics = ca.get_policy_loss_fn(P["loss_mode"])(
            x.f(I["old_log_prob"]),
            x.f(I["log_prob"], "log_prob"),
            x.f(I["advantages"]),
            x.m(I["response_mask"]),
            P["loss_agg_mode"],
            actor_config(P),
            None if w is None else x.f(w),
        )
    outs = {"pg_loss": loss}
    outs.update(_metrics(metrics))
    return x.finish(outs, cot)


@peer("verl.compute_policy_loss")
def _peer_compute_policy_loss(I, P, dt, cot):
    x = Torch(dt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, clipfrac, kl, lower = ca.compute_policy_loss(
            x.f(I["old_log_prob"]),
            x.f(I["log_prob"], "log_prob"),
            x.f(I["advantages"]),
            x.m(I["response_mask"]),
            cliprange=P["cliprange"],
            cliprange_low=P.get("cliprange_low"),
            cliprange_high=P.get("cliprange_high"),
            clip_ratio_c=P.get("clip_ratio_c", 3.0),
            loss_agg_mode=P["loss_agg_mode"],
        )
    return x.finish({"pg_loss": loss, "pg_clipfrac": clipfrac, "ppo_kl": kl, "pg_clipfrac_lower": lower}, cot)


@peer("verl.compute_policy_loss_reinforce")
def _peer_reinforce(I, P, dt, cot):
    x = Torch(dt)
    w = I.get("rollout_is_weights")
    loss, metrics = ca.compute_policy_loss_reinforce(
        x.f(I["rollout_log_prob"]),
        x.f(I["log_prob"], "log_prob"),
        x.f(I["advantages"]),
        x.m(I["response_mask"]),
        loss_agg_mode=P["loss_agg_mode"],
        config=actor_config(P),
        rollout_is_weights=None if w is None else x.f(w),
    )
    outs = {"pg_loss": loss}
    outs.update(_metrics(metrics))
    return x.finish(outs, cot)


@peer("verl.agg_loss")
def _peer_agg_loss(I, P, dt, cot):
    x = Torch(dt)
    loss = ca.agg_loss(x.f(I["loss_mat"], "loss_mat"), x.m(I["loss_mask"]), P["loss_agg_mode"], **norm_kwargs(P))
    return x.finish({"loss": loss}, cot)


@peer("verl.kl_penalty")
def _peer_kl_penalty(I, P, dt, cot):
    x = Torch(dt)
    kl = ca.kl_penalty(x.f(I["logprob"], "logprob"), x.f(I["ref_logprob"]), P["kl_penalty"])
    return x.finish({"kl_estimate": kl}, cot)


@peer("verl.kl_penalty_forward")
def _peer_kl_penalty_forward(I, P, dt, cot):
    x = Torch(dt)
    kl = ca.kl_penalty_forward(x.f(I["logprob"], "logprob"), x.f(I["ref_logprob"]), P["kl_penalty"])
    return x.finish({"kl_estimate": kl}, cot)


@peer("verl.compute_rewards")
def _peer_compute_rewards(I, P, dt, cot):
    x = Torch(dt)
    r = ca.compute_rewards(x.f(I["token_level_scores"]), x.f(I["old_log_prob"]), x.f(I["ref_log_prob"]), P["kl_ratio"])
    return x.finish({"token_level_rewards": r}, None)


def _kl_ctrl(P):
    from verl.trainer.config.algorithm import KLControlConfig

    cfg = KLControlConfig(
        type=P["type"], kl_coef=P["kl_coef"], target_kl=P.get("target_kl", 0.1), horizon=int(P.get("horizon", 10000))
    )
    return ca.get_kl_controller(cfg)


@peer("verl.kl_controller")
def _peer_kl_controller(I, P, dt, cot):
    ctl = _kl_ctrl(P)
    coefs = []
    for kl, n in zip(np.asarray(I["current_kl"], dtype=np.float64), np.asarray(I["n_steps"])):
        ctl.update(current_kl=float(kl), n_steps=int(n))
        coefs.append(float(ctl.value))
    return {"kl_coef": np.array(coefs)}, {}


def verl_apply_kl_penalty() -> Callable:
    """``verl.trainer.ppo.ray_trainer.apply_kl_penalty``. That module imports
    the whole trainer (ray, torchdata, PIL, …); where those are missing, the
    installed file's own ``apply_kl_penalty`` is compiled on its own, with the
    names it uses bound to verl's (``core_algos``, ``masked_mean``,
    ``DataProto``)."""
    try:
        from verl.trainer.ppo.ray_trainer import apply_kl_penalty

        return apply_kl_penalty
    except ImportError:
        import ast

        from verl.protocol import DataProto

        path = pathlib.Path(ca.__file__).with_name("ray_trainer.py")
        tree = ast.parse(path.read_text())
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "apply_kl_penalty")
        ns = {"torch": torch, "core_algos": ca, "masked_mean": vF.masked_mean, "DataProto": DataProto}
        exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), ns)
        return ns["apply_kl_penalty"]


@peer("verl.apply_kl_penalty")
def _peer_apply_kl_penalty(I, P, dt, cot):
    from verl.protocol import DataProto

    x = Torch(dt)
    data = DataProto.from_dict(
        tensors={
            "response_mask": x.m(I["response_mask"]),
            "token_level_scores": x.f(I["token_level_scores"]),
            "old_log_probs": x.f(I["old_log_probs"]),
            "ref_log_prob": x.f(I["ref_log_prob"]),
        }
    )
    ctl = _kl_ctrl(P)
    data, metrics = verl_apply_kl_penalty()(data, ctl, kl_penalty=P["kl_penalty"])
    return {
        "token_level_rewards": data.batch["token_level_rewards"].to(torch.float64).numpy(),
        "reward_kl_penalty": np.asarray(metrics["actor/reward_kl_penalty"]),
        "reward_kl_penalty_coeff": np.asarray(metrics["actor/reward_kl_penalty_coeff"]),
        "kl_ctrl_value": np.asarray(ctl.value),
    }, {}


@peer("verl.masked_mean")
def _peer_masked_mean(I, P, dt, cot):
    x = Torch(dt)
    r = vF.masked_mean(x.f(I["values"], "values"), x.m(I["mask"]), axis=P.get("axis"))
    return x.finish({"result": r}, cot)


@peer("verl.masked_sum")
def _peer_masked_sum(I, P, dt, cot):
    x = Torch(dt)
    r = vF.masked_sum(x.f(I["values"], "values"), x.m(I["mask"]), axis=P.get("axis"))
    return x.finish({"result": r}, cot)


@peer("verl.masked_var")
def _peer_masked_var(I, P, dt, cot):
    x = Torch(dt)
    r = vF.masked_var(x.f(I["values"], "values"), x.m(I["mask"]), unbiased=P.get("unbiased", True))
    return x.finish({"variance": r}, cot)


@peer("verl.masked_whiten")
def _peer_masked_whiten(I, P, dt, cot):
    x = Torch(dt)
    r = vF.masked_whiten(x.f(I["values"], "values"), x.m(I["mask"]), shift_mean=P.get("shift_mean", True))
    return x.finish({"whitened": r}, cot)


@peer("verl.logprobs_from_logits")
def _peer_logprobs(I, P, dt, cot):
    x = Torch(dt)
    r = vF.logprobs_from_logits(x.f(I["logits"], "logits"), x.i(I["labels"]), inplace_backward=P.get("inplace_backward", True))
    return x.finish({"log_probs": r}, cot)


@peer("verl.entropy_from_logits")
def _peer_entropy(I, P, dt, cot):
    x = Torch(dt)
    return x.finish({"entropy": vF.entropy_from_logits(x.f(I["logits"], "logits"))}, cot)


@peer("verl.calculate_sum_pi_squared_from_logits")
def _peer_sum_pi_sq(I, P, dt, cot):
    x = Torch(dt)
    return x.finish({"sum_pi_squared": vF.calculate_sum_pi_squared_from_logits(x.f(I["logits"], "logits"))}, cot)


@peer("verl.compute_entropy_loss")
def _peer_entropy_loss(I, P, dt, cot):
    x = Torch(dt)
    r = ca.compute_entropy_loss(x.f(I["logits"], "logits"), x.m(I["response_mask"]), loss_agg_mode=P["loss_agg_mode"])
    return x.finish({"entropy_loss": r}, cot)


@peer("verl.compute_value_loss")
def _peer_value_loss(I, P, dt, cot):
    x = Torch(dt)
    loss, clipfrac = ca.compute_value_loss(
        x.f(I["vpreds"], "vpreds"),
        x.f(I["returns"]),
        x.f(I["values"]),
        x.m(I["response_mask"]),
        cliprange_value=P["cliprange_value"],
        loss_agg_mode=P["loss_agg_mode"],
        **norm_kwargs(P),
    )
    return x.finish({"vf_loss": loss, "vf_clipfrac": clipfrac}, cot)


@peer("verl.get_response_mask")
def _peer_response_mask(I, P, dt, cot):
    r = vF.get_response_mask(torch.tensor(np.asarray(I["response_id"]), dtype=torch.long), eos_token=P["eos_token"])
    return {"response_mask": r.numpy().astype(np.float64)}, {}


class _StopDraw(Exception):
    pass


@peer("verl.compute_pf_ppo_reweight_data")
def _peer_pf_ppo(I, P, dt, cot):
    """The sampling weights verl passes to ``torch.multinomial`` (the draw is
    intercepted: it is random and not part of the op)."""
    seen = {}
    real = torch.multinomial

    def capture(weights, *a, **k):
        seen["w"] = weights.detach().clone()
        raise _StopDraw

    class Data:
        pass

    data = Data()
    data.batch = {"token_level_scores": Torch(dt).f(I["token_level_scores"])}
    data.non_tensor_batch = {}
    data.meta_info = {}
    torch.multinomial = capture
    try:
        ca.compute_pf_ppo_reweight_data(data, reweight_method=P["reweight_method"], weight_pow=P["weight_pow"])
    except _StopDraw:
        pass
    finally:
        torch.multinomial = real
    return {"weights": seen["w"].to(torch.float64).numpy()}, {}


def _adv(name, x, I, P):
    fn = ca.get_adv_estimator_fn(name)
    r = x.f(I["token_level_rewards"])
    m = x.m(I["response_mask"])
    eps = P.get("epsilon", 1e-6)
    scale = P.get("norm_adv_by_std_in_grpo", True)
    idx = np.asarray(I["index"]) if "index" in I else None
    if name == "gae":
        return fn(r, x.f(I["values"]), m, gamma=P["gamma"], lam=P["lam"])
    if name in ("grpo", "grpo_vectorized"):
        return fn(r, m, idx, epsilon=eps, norm_adv_by_std_in_grpo=scale)
    if name == "grpo_passk":
        # verl reads the flag from the config (its keyword argument is ignored).
        return fn(r, m, idx, epsilon=eps, config={"norm_adv_by_std_in_grpo": scale})
    if name == "gdpo":
        keys = P.get("gdpo_reward_keys")
        if not keys:
            return fn(r, m, idx, epsilon=eps, norm_adv_by_std_in_grpo=scale)
        config = {"gdpo_reward_keys": list(keys), "gdpo_reward_weights": P.get("gdpo_reward_weights")}
        non_tensor = {k: np.asarray(I[k]) for k in keys}
        batch = {"prompts": x.i(I["prompts"]), "attention_mask": x.i(I["attention_mask"])}
        return fn(r, m, idx, epsilon=eps, norm_adv_by_std_in_grpo=scale, config=config, non_tensor_batch=non_tensor, batch=batch)
    if name in ("rloo", "rloo_vectorized", "opo", "reinforce_plus_plus_baseline"):
        return fn(r, m, idx, epsilon=eps)
    if name == "reinforce_plus_plus":
        return fn(r, m, config=AlgoConfig(gamma=P["gamma"]))
    if name == "remax":
        return fn(r, x.f(I["reward_baselines"]), m)
    if name == "gpg":
        return fn(r, m, idx, epsilon=eps, f_norm=P.get("f_norm", 1.0), alpha=P.get("alpha", 1.0))
    if name in ("optimal_token_baseline", "tir_optimal_token_baseline"):
        w = I.get("rollout_is_weights")
        return fn(
            r,
            m,
            idx,
            x.f(I["old_log_probs"]),
            x.f(I["sum_pi_squared"]),
            rollout_is_weights=None if w is None else x.f(w),
            handle_zero_tail=P["handle_zero_tail"],
            epsilon=P["epsilon"],
        )
    raise KeyError(name)


ADV_OPS = {
    "gae": "verl.compute_gae_advantage_return",
    "grpo": "verl.compute_grpo_outcome_advantage",
    "grpo_vectorized": "verl.compute_grpo_vectorized_outcome_advantage",
    "gdpo": "verl.compute_gdpo_outcome_advantage",
    "grpo_passk": "verl.compute_grpo_passk_outcome_advantage",
    "reinforce_plus_plus_baseline": "verl.compute_reinforce_plus_plus_baseline_outcome_advantage",
    "rloo": "verl.compute_rloo_outcome_advantage",
    "opo": "verl.compute_opo_outcome_advantage",
    "reinforce_plus_plus": "verl.compute_reinforce_plus_plus_outcome_advantage",
    "remax": "verl.compute_remax_outcome_advantage",
    "gpg": "verl.compute_gpg_outcome_advantage",
    "rloo_vectorized": "verl.compute_rloo_vectorized_outcome_advantage",
    "optimal_token_baseline": "verl.compute_optimal_token_baseline_advantage",
    "tir_optimal_token_baseline": "verl.compute_multi_turn_optimal_token_baseline_advantage",
}


def _make_adv_peer(name):
    def run(I, P, dt, cot):
        x = Torch(dt)
        adv, ret = _adv(name, x, I, P)
        return x.finish({"advantages": adv, "returns": ret}, None)

    return run


for _name, _op in ADV_OPS.items():
    PEER[_op] = in_default_dtype(_make_adv_peer(_name))


def _rollout_metrics(m: Dict[str, Any]) -> Dict[str, np.ndarray]:
    return {k: np.asarray(float(v)) for k, v in m.items()}


@peer("verl.compute_rollout_correction_weights")
def _peer_is_weights(I, P, dt, cot):
    x = Torch(dt)
    w, m = rch.compute_rollout_correction_weights(
        x.f(I["log_ratio"]),
        x.m(I["response_mask"]),
        rollout_is=P["rollout_is"],
        rollout_is_threshold=P["rollout_is_threshold"],
        rollout_is_batch_normalize=bool(P.get("rollout_is_batch_normalize") or False),
    )
    out = {"rollout_is_weights": w.to(torch.float64).numpy()}
    out.update(_rollout_metrics(m))
    return out, {}


@peer("verl.compute_rollout_rejection_mask")
def _peer_rejection(I, P, dt, cot):
    x = Torch(dt)
    mask, m = rch.compute_rollout_rejection_mask(
        x.f(I["log_ratio"]), x.m(I["response_mask"]), rollout_rs=P["rollout_rs"], rollout_rs_threshold=P["rollout_rs_threshold"]
    )
    out = {"modified_response_mask": mask.to(torch.float64).numpy()}
    out.update(_rollout_metrics(m))
    return out, {}


@peer("verl.compute_rollout_correction_and_rejection_mask")
def _peer_correction(I, P, dt, cot):
    x = Torch(dt)
    proto, mask, m = rch.compute_rollout_correction_and_rejection_mask(
        x.f(I["old_log_prob"]),
        x.f(I["rollout_log_prob"]),
        x.m(I["response_mask"]),
        rollout_is=P.get("rollout_is"),
        rollout_is_threshold=P.get("rollout_is_threshold"),
        rollout_is_batch_normalize=bool(P.get("rollout_is_batch_normalize") or False),
        rollout_rs=P.get("rollout_rs"),
        rollout_rs_threshold=P.get("rollout_rs_threshold"),
    )
    out = {"modified_response_mask": mask.to(torch.float64).numpy()}
    if proto is not None:
        out["rollout_is_weights"] = proto.batch["rollout_is_weights"].to(torch.float64).numpy()
    out.update(_rollout_metrics(m))
    return out, {}


def run_both(op: str, I: Dict[str, Any], P: Dict[str, Any], dt: str, cot: Optional[Dict[str, Any]] = None):
    """Rounds the inputs for ``dt``, runs verl and posttrain, compares every
    output verl gives and every gradient."""
    I = {k: rnd(v, dt) for k, v in I.items()}
    cot = None if cot is None else {k: rnd(np.asarray(v, dtype=np.float64), dt) for k, v in cot.items()}
    try:
        want, wgrads = PEER[op](I, P, dt, cot)
    except ValueError as e:
        # verl rejects the input (e.g. whitening a single token): so must posttrain.
        with pytest.raises(ValueError):
            ops.call(op, dtype=dt, cotangents=cot, **I, **P)
        return None, {"__rejected__": str(e)}, {}
    got = ops.call(op, dtype=dt, cotangents=cot, **I, **P)
    compare(op, got, want, wgrads, dt)
    return got, want, wgrads


# ---------------------------------------------------------------------------
# Policy losses
# ---------------------------------------------------------------------------

POLICY_BASE = {
    "clip_ratio": 0.2,
    "clip_ratio_low": 0.2,
    "clip_ratio_high": 0.28,
    "clip_ratio_c": 3.0,
    "tau_pos": 1.0,
    "tau_neg": 1.05,
    "clip_cov_ratio": 0.0002,
    "clip_cov_lb": 1.0,
    "clip_cov_ub": 5.0,
    "kl_cov_ratio": 0.0002,
    "ppo_kl_coef": 0.1,
    "dro_beta": None,
}
# Per mode: overrides that make every branch of the mode active on the random inputs.
POLICY_MODES = {
    "vanilla": {},
    "dppo_tv": {"clip_ratio": 0.1, "clip_ratio_low": 0.05, "clip_ratio_high": 0.08, "clip_ratio_c": 1.5},
    "dppo_kl": {"clip_ratio": 0.05, "clip_ratio_low": 0.02, "clip_ratio_high": 0.03, "clip_ratio_c": 1.5},
    "gspo": {"clip_ratio": 0.1, "clip_ratio_low": 0.05, "clip_ratio_high": 0.08},
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "gpg": {},
    # clip_cov_ratio 1: every candidate is detached (verl's random pick is then no pick).
    "clip_cov": {"clip_cov_ratio": 1.0, "clip_cov_lb": 0.3, "clip_cov_ub": 2.0},
    "kl_cov": {"kl_cov_ratio": 0.2, "ppo_kl_coef": 1.0},
    "geo_mean": {"clip_ratio": 0.4, "clip_ratio_low": 0.4, "clip_ratio_high": 0.4},
    "dro": {"dro_beta": 0.5},
    "cispo": {"clip_ratio_low": 1.0, "clip_ratio_high": 0.28},
}
POLICY_MODES = {m: v for m, v in POLICY_MODES.items() if m in ca.POLICY_LOSS_REGISTRY}
# verl 0.9.1 aggregates gspo with the requested loss_agg_mode (the vectors'
# commit forced seq-mean-token-mean): see test_release_difference_gspo_loss_agg_mode.
GSPO_COMMIT_AGG = "seq-mean-token-mean"
# The posttrain parameter that selects the release's gspo aggregation.
GSPO_RELEASE_OPTION: Dict[str, Any] = {"gspo_honor_loss_agg_mode": True}


def policy_cases():
    for mode in POLICY_MODES:
        for agg in AGG_MODES:
            if mode == "gspo" and agg != GSPO_COMMIT_AGG:
                continue
            yield mode, agg


def policy_params(mode: str, agg: str, norm: str = "local") -> Dict[str, Any]:
    p = dict(POLICY_BASE)
    p.update(POLICY_MODES[mode])
    p.update(loss_mode=mode, loss_agg_mode=agg)
    p.update(NORMS[norm])
    return p


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("mode,agg", list(policy_cases()))
def test_policy_loss(mode, agg, dt):
    for b, t in SHAPES:
        for norm in ("local", "global"):
            rng = rng_for("policy", mode, agg, b, t, norm)
            I = policy_inputs(rng, b, t)
            if (b, t) == (8, 33):
                I["rollout_is_weights"] = rng.uniform(0.5, 1.5, (b, t))
            run_both("verl.policy_loss", I, policy_params(mode, agg, norm), dt, {"pg_loss": 0.75})


@pytest.mark.parametrize("dt", DTYPES)
def test_policy_loss_clip_cov_partial_pick(dt):
    """Fewer tokens detached than there are candidates: verl draws them at
    random, posttrain takes the largest covariances. With verl's draw replaced
    by the ordering by covariance the two agree."""
    rng = rng_for("clip_cov_partial")
    b, t = 8, 33
    I = {k: rnd(v, dt) for k, v in policy_inputs(rng, b, t).items()}
    p = policy_params("clip_cov", "token-mean")
    p.update(clip_cov_ratio=0.02, clip_cov_lb=0.0, clip_cov_ub=50.0)
    # The candidates as verl computes them, in verl's (row-major nonzero) order.
    x = Torch(dt)
    lp, old, adv, m = x.f(I["log_prob"]), x.f(I["old_log_prob"]), x.f(I["advantages"]), x.m(I["response_mask"])
    ratio = torch.exp(lp - old)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - p["clip_ratio_low"], 1 + p["clip_ratio_high"])
    cov = (adv - vF.masked_mean(adv, m)) * (lp - vF.masked_mean(lp, m))
    cand = (cov < p["clip_cov_ub"]) & (cov > p["clip_cov_lb"]) & (m > 0) & ~((l2 > l1) & (m > 0))
    nz = torch.nonzero(cand)
    covs = cov[nz[:, 0], nz[:, 1]]
    n_pick = max(int(p["clip_cov_ratio"] * m.sum().item()), 1)
    assert len(nz) > n_pick, "the case must have more candidates than picks"
    order = torch.tensor(sorted(range(len(nz)), key=lambda i: (-covs[i].item(), i)), dtype=torch.long)
    real = torch.randperm
    torch.randperm = lambda n, *a, **k: order[:n].clone()
    try:
        run_both("verl.policy_loss", I, p, dt, {"pg_loss": 1.0})
    finally:
        torch.randperm = real


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_compute_policy_loss_deprecated(agg, dt):
    for b, t in SHAPES:
        rng = rng_for("cpl", agg, b, t)
        P = {"cliprange": 0.2, "cliprange_low": 0.15, "cliprange_high": 0.28, "clip_ratio_c": 1.5, "loss_agg_mode": agg}
        run_both("verl.compute_policy_loss", policy_inputs(rng, b, t), P, dt, {"pg_loss": -1.25})


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_compute_policy_loss_reinforce(agg, dt):
    for b, t in SHAPES:
        for norm in ("local", "global"):
            rng = rng_for("reinforce", agg, b, t, norm)
            I = policy_inputs(rng, b, t)
            I["rollout_log_prob"] = I.pop("old_log_prob")
            I["rollout_is_weights"] = rng.uniform(0.5, 2.0, (b, t))
            P = {"loss_agg_mode": agg, **NORMS[norm]}
            run_both("verl.compute_policy_loss_reinforce", I, P, dt, {"pg_loss": 0.5})


ROLLOUT_OFF = {
    "rollout_is": None,
    "rollout_is_threshold": 2.0,
    "rollout_is_batch_normalize": False,
    "rollout_rs": None,
    "rollout_rs_threshold": None,
}
BYPASS_CASES = [
    {"loss_type": "ppo_clip", "rollout_is": "token", "rollout_is_threshold": 2.0},
    {"loss_type": "ppo_clip", "rollout_is": None, "rollout_rs": "token_k1", "rollout_rs_threshold": "0.6_1.6"},
    {"loss_type": "reinforce", "rollout_is": "token", "rollout_is_threshold": 1.5},
    {
        "loss_type": "reinforce",
        "rollout_is": "sequence",
        "rollout_is_threshold": "0.5_2.0",
        "rollout_rs": "seq_mean_k3",
        "rollout_rs_threshold": 0.2,
    },
    {"loss_type": "reinforce", "rollout_is": "token", "rollout_is_threshold": 2.0, "rollout_is_batch_normalize": True},
]


@pytest.mark.skipif(rch is None, reason="verl has no rollout_corr_helper")
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("case", range(len(BYPASS_CASES)))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_policy_loss_bypass_mode(case, agg, dt):
    for b, t in SHAPES[1:]:
        rng = rng_for("bypass", case, agg, b, t)
        I = policy_inputs(rng, b, t, full_row_masked=False)
        P = policy_params("vanilla", agg)
        P.update(loss_mode="bypass_mode", **ROLLOUT_OFF)
        P.update(BYPASS_CASES[case])
        run_both("verl.policy_loss", I, P, dt, {"pg_loss": 0.8})


# The fast path (posttrain.ops.verl_policy_loss) against verl's actor step:
# policy loss + kl_loss_coef · agg_loss(kl_penalty(log_prob, ref, kl_loss_type)).


def _verl_actor_loss(I, P, dt):
    x = Torch(dt)
    lp = x.f(I["log_prob"], "log_prob")
    mask = x.m(I["response_mask"])
    agg = P["loss_agg_mode"]
    w = I.get("rollout_is_weights")
    pg_loss, metrics = ca.get_policy_loss_fn(P["loss_mode"])(
        x.f(I["old_log_prob"]), lp, x.f(I["advantages"]), mask, agg, actor_config(P), None if w is None else x.f(w)
    )
    total = pg_loss
    out = {"pg_loss": pg_loss.item()}
    out.update(_metrics(metrics))
    if P.get("use_kl_loss"):
        kld = ca.kl_penalty(lp, x.f(I["ref_log_prob"]), P["kl_loss_type"])
        kl_loss = ca.agg_loss(kld, mask, agg, **norm_kwargs(P))
        total = total + kl_loss * P["kl_loss_coef"]
        out["kl_loss"] = kl_loss.item()
    total.backward()
    return out, lp.grad.to(torch.float64).numpy()


# (mode, loss_agg_mode, kl_loss_type or None). posttrain fuses the KL loss
# with the token-local modes only (gspo, geo_mean, clip_cov and kl_cov raise
# ValueError with use_kl_loss): those run without it.
FAST_CASES = [
    ("vanilla", "token-mean", "low_var_kl"),
    ("vanilla", "seq-mean-token-sum-norm", "k1"),
    ("dppo_tv", "token-sum", "low_var_kl"),
    ("dppo_kl", "seq-mean-token-mean", "abs"),
    ("sapo", "token-mean", "mse"),
    ("cispo", "token-sum", "low_var_kl+"),
    ("gpg", "seq-mean-token-sum", "k2"),
    ("dro", "token-mean", "k3+"),
    ("gspo", "seq-mean-token-mean", None),
    ("geo_mean", "token-mean", None),
    ("kl_cov", "token-mean", None),
    ("clip_cov", "seq-mean-token-mean", None),
]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("mode,agg,kl_type", FAST_CASES)
def test_verl_policy_loss_fast_path(mode, agg, kl_type, dt):
    npdt = np.float32 if dt == "f32" else np.float64
    for b, t in SHAPES:
        for norm in ("local", "global"):
            rng = rng_for("fast", mode, agg, kl_type, b, t, norm)
            I = policy_inputs(rng, b, t)
            I["ref_log_prob"] = np.minimum(I["log_prob"] + rng.normal(0, 0.3, (b, t)), -1e-3)
            I["rollout_is_weights"] = rng.uniform(0.5, 1.5, (b, t))
            I = {k: rnd(v, dt) for k, v in I.items()}
            P = policy_params(mode, agg, norm)
            if kl_type is not None:
                P.update(use_kl_loss=True, kl_loss_type=kl_type, kl_loss_coef=0.05)
            with default_dtype(dt):
                want, wgrad = _verl_actor_loss(I, P, dt)
            cfg = {k: v for k, v in P.items()}
            metrics, grad = ops.verl_policy_loss(
                I["old_log_prob"].astype(npdt),
                I["log_prob"].astype(npdt),
                I["advantages"].astype(npdt),
                I["response_mask"],
                rollout_is_weights=I["rollout_is_weights"].astype(npdt),
                ref_log_prob=I["ref_log_prob"].astype(npdt) if "ref_log_prob" in I else None,
                **cfg,
            )
            if kl_type is None:
                del I["ref_log_prob"]
            for k, v in want.items():
                assert k in metrics, f"fast path has no metric `{k}` (has {sorted(metrics)})"
                assert_close(metrics[k], v, dt, f"verl_policy_loss {mode} {k} [{dt}]")
            assert grad.dtype == npdt
            assert_close(grad, wgrad, dt, f"verl_policy_loss {mode} d/dlog_prob [{dt}]")


# ---------------------------------------------------------------------------
# Aggregation, KL, value loss, statistics, logits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("agg", AGG_MODES)
def test_agg_loss(agg, norm, dt):
    for b, t in SHAPES:
        rng = rng_for("agg", agg, norm, b, t)
        I = {"loss_mat": rng.normal(0, 2, (b, t)), "loss_mask": make_mask(rng, b, t)}
        run_both("verl.agg_loss", I, {"loss_agg_mode": agg, **NORMS[norm]}, dt, {"loss": 1.3})


KL_NAMES = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"]


def kl_inputs(rng, b, t):
    lp = -rng.gamma(1.5, 0.8, (b, t))
    ref = lp + rng.normal(0, 0.5, (b, t))
    if b * t >= 8:  # the clamps of low_var_kl: |x| > 20 and k3 > 10
        ref.flat[0] = lp.flat[0] + 25.0
        ref.flat[1] = lp.flat[1] - 15.0
        ref.flat[2] = lp.flat[2] + 3.0
    return {"logprob": lp, "ref_logprob": ref}


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", KL_NAMES + [n + "+" for n in KL_NAMES])
def test_kl_penalty(name, dt):
    for b, t in SHAPES:
        rng = rng_for("kl", name, b, t)
        I = kl_inputs(rng, b, t)
        run_both("verl.kl_penalty", I, {"kl_penalty": name}, dt, {"kl_estimate": rng.normal(0, 1, (b, t))})
        if not name.endswith("+"):
            run_both("verl.kl_penalty_forward", I, {"kl_penalty": name}, dt, {"kl_estimate": rng.normal(0, 1, (b, t))})


@pytest.mark.parametrize("dt", DTYPES)
def test_compute_rewards(dt):
    for b, t in SHAPES:
        for kl_ratio in (0.0, 0.001, 0.2):
            rng = rng_for("rewards", b, t, kl_ratio)
            I = {
                "token_level_scores": rng.normal(0, 1, (b, t)),
                "old_log_prob": -rng.gamma(1.5, 0.8, (b, t)),
                "ref_log_prob": -rng.gamma(1.5, 0.8, (b, t)),
            }
            run_both("verl.compute_rewards", I, {"kl_ratio": kl_ratio}, dt)


@pytest.mark.parametrize("ctl", ["fixed", "adaptive"])
def test_kl_controller(ctl):
    rng = rng_for("klctl", ctl)
    I = {"current_kl": rng.uniform(0.0, 0.3, 12), "n_steps": rng.integers(0, 300, 12)}
    for target, horizon in ((0.1, 10000), (0.05, 64)):
        run_both("verl.kl_controller", I, {"type": ctl, "kl_coef": 0.05, "target_kl": target, "horizon": horizon}, "f64")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", KL_NAMES + ["low_var_kl+"])
def test_apply_kl_penalty(name, dt):
    for b, t in SHAPES[1:]:
        for ctl in ("fixed", "adaptive"):
            rng = rng_for("apply_kl", name, b, t, ctl)
            mask = make_mask(rng, b, t, full_row_masked=False)
            old = -rng.gamma(1.5, 0.8, (b, t))
            I = {
                "token_level_scores": outcome_rewards(rng, mask),
                "old_log_probs": old,
                "ref_log_prob": old + rng.normal(0, 0.5, (b, t)),
                "response_mask": mask,
            }
            P = {"kl_penalty": name, "type": ctl, "kl_coef": 0.05, "target_kl": 0.1, "horizon": 10000}
            run_both("verl.apply_kl_penalty", I, P, dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("agg", AGG_MODES)
def test_compute_value_loss(agg, norm, dt):
    for b, t in SHAPES:
        rng = rng_for("value", agg, norm, b, t)
        values = rng.normal(0, 1, (b, t))
        I = {
            "vpreds": values + rng.normal(0, 0.4, (b, t)),
            "returns": values + rng.normal(0, 1, (b, t)),
            "values": values,
            "response_mask": make_mask(rng, b, t),
        }
        P = {"cliprange_value": 0.2, "loss_agg_mode": agg, **NORMS[norm]}
        run_both("verl.compute_value_loss", I, P, dt, {"vf_loss": 0.9})


@pytest.mark.parametrize("dt", DTYPES)
def test_masked_statistics(dt):
    for b, t in SHAPES:
        rng = rng_for("stats", b, t)
        values = rng.normal(1.0, 2.0, (b, t))
        mask = make_mask(rng, b, t, full_row_masked=(b, t) != (8, 33))
        I = {"values": values, "mask": mask}
        for axis in (None, 0, -1):
            shape = () if axis is None else ((t,) if axis == 0 else (b,))
            cot = {"result": rng.normal(0, 1, shape)}
            run_both("verl.masked_mean", I, {"axis": axis}, dt, cot)
            run_both("verl.masked_sum", I, {"axis": axis}, dt, cot)
        if mask.sum() >= 2:
            for unbiased in (True, False):
                run_both("verl.masked_var", I, {"unbiased": unbiased}, dt, {"variance": 0.6})
            for shift in (True, False):
                run_both("verl.masked_whiten", I, {"shift_mean": shift}, dt, {"whitened": rng.normal(0, 1, (b, t))})


def logits_inputs(rng, b, t, v):
    logits = rng.normal(0, 3.0, (b, t, v))
    labels = rng.integers(0, v, (b, t))
    return logits, labels


@pytest.mark.parametrize("dt", DTYPES)
def test_logits_ops(dt):
    for (b, t), v in zip(SHAPES, (2, 11, 50)):
        rng = rng_for("logits", b, t, v)
        logits, labels = logits_inputs(rng, b, t, v)
        cot = rng.normal(0, 1, (b, t))
        I = {"logits": logits, "labels": labels}
        run_both("verl.logprobs_from_logits", I, {"inplace_backward": True}, dt, {"log_probs": cot})
        run_both("verl.entropy_from_logits", {"logits": logits}, {}, dt, {"entropy": cot})
        run_both("verl.calculate_sum_pi_squared_from_logits", {"logits": logits}, {}, dt, {"sum_pi_squared": cot})
        I = {"logits": logits, "response_mask": make_mask(rng, b, t)}
        for agg in AGG_MODES:
            run_both("verl.compute_entropy_loss", I, {"loss_agg_mode": agg}, dt, {"entropy_loss": 0.7})


def test_get_response_mask():
    rng = rng_for("eos")
    ids = rng.integers(0, 9, (8, 33))
    ids[0, :] = 5  # no eos at all
    for eos in (2, [1, 2], 7):
        run_both("verl.get_response_mask", {"response_id": ids}, {"eos_token": eos}, "f64")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("method,power", [("pow", 2.0), ("pow", 0.5), ("max_min", 1.0), ("max_random", 1.0)])
def test_compute_pf_ppo_reweight_data(method, power, dt):
    rng = rng_for("pfppo", method)
    mask = make_mask(rng, 8, 33)
    scores = outcome_rewards(rng, mask)
    scores[3] = scores[1]  # a tie at the max/min
    P = {"reweight_method": method, "weight_pow": power}
    run_both("verl.compute_pf_ppo_reweight_data", {"token_level_scores": scores}, P, dt)


# ---------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------


# Estimators that take group ``index``es; those that also take ``epsilon``.
EPS_GROUPED = {"grpo", "grpo_vectorized", "gdpo", "grpo_passk", "reinforce_plus_plus_baseline", "rloo", "opo", "gpg"}
EPS_GROUPED |= {"rloo_vectorized"}
GROUPED = EPS_GROUPED | {"optimal_token_baseline", "tir_optimal_token_baseline"}


def adv_case(name: str, rng, b: int, t: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    mask = make_mask(rng, b, t)
    I: Dict[str, Any] = {"token_level_rewards": outcome_rewards(rng, mask), "response_mask": mask}
    P: Dict[str, Any] = {"adv_estimator": name}
    if name in GROUPED:
        I["index"] = group_index(rng, b, min_size=2 if name == "grpo_passk" else 1)
    if name in EPS_GROUPED:
        P["epsilon"] = 1e-6
    if name in ("grpo", "grpo_vectorized", "gdpo", "grpo_passk"):
        P["norm_adv_by_std_in_grpo"] = True
    if name == "gae":
        I["token_level_rewards"] = np.where(mask, rng.normal(0, 0.3, (b, t)), 0.0)
        I["values"] = rng.normal(0, 1, (b, t))
        P.update(gamma=0.99, lam=0.95)
    if name == "reinforce_plus_plus":
        I["token_level_rewards"] = np.where(mask, rng.normal(0, 0.3, (b, t)), 0.0)
        P["gamma"] = 0.9
    if name == "remax":
        I["reward_baselines"] = rng.normal(0.3, 0.5, b)
    if name == "gpg":
        P.update(f_norm=2.0, alpha=1.0)
    if name in ("optimal_token_baseline", "tir_optimal_token_baseline"):
        logits = rng.normal(0, 2, (b, t, 6))
        lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        I["old_log_probs"] = lsm[..., 0]
        I["sum_pi_squared"] = np.exp(2 * lsm).sum(-1)
        I["rollout_is_weights"] = rng.uniform(0.5, 1.5, (b, t))
        P.update(handle_zero_tail=True, epsilon=1e-8)
    return I, P


ADV_VARIANTS = {
    "gae": [{}, {"gamma": 1.0, "lam": 1.0}, {"gamma": 0.9, "lam": 0.0}],
    "grpo": [{}, {"norm_adv_by_std_in_grpo": False}, {"epsilon": 0.25}],
    "grpo_vectorized": [{}, {"norm_adv_by_std_in_grpo": False}],
    "gdpo": [{}, {"norm_adv_by_std_in_grpo": False}],
    "grpo_passk": [{}, {"norm_adv_by_std_in_grpo": False}],
    "reinforce_plus_plus": [{}, {"gamma": 1.0}],
    "optimal_token_baseline": [{}, {"handle_zero_tail": False}, {"drop": "rollout_is_weights"}],
    "tir_optimal_token_baseline": [{}, {"handle_zero_tail": False}, {"drop": "rollout_is_weights"}],
    "gpg": [{}, {"f_norm": 1.0}],
}
# verl computes these in float32 whatever the input dtype (its group_mean_std,
# its GDPO reward tensors): compared at the f32 tolerance in both runs.
ADV_F32_INTERNAL = {"grpo_vectorized"}


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", [n for n in ADV_OPS if n in ca.ADV_ESTIMATOR_REGISTRY])
def test_advantage_estimator(name, dt):
    op = ADV_OPS[name]
    for b, t in SHAPES:
        if name == "grpo_passk" and b < 2:
            continue
        for k, variant in enumerate(ADV_VARIANTS.get(name, [{}])):
            rng = rng_for("adv", name, b, t, k)
            I, P = adv_case(name, rng, b, t)
            variant = dict(variant)
            drop = variant.pop("drop", None)
            if drop:
                I.pop(drop)
            P.update(variant)
            if name in ADV_F32_INTERNAL and dt == "f64":
                I32 = {k2: rnd(v, "f32") for k2, v in I.items()}
                want, _ = PEER[op](I32, P, "f64", None)
                got = ops.call(op, dtype="f64", **I32, **P)
                compare(op, got, want, {}, "f32")
            else:
                run_both(op, I, P, dt)


@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0]])
def test_gdpo_reward_keys(weights):
    """GDPO with per-component rewards (verl builds them as float32 tensors,
    so both runs compare at the f32 tolerance)."""
    rng = rng_for("gdpo_keys", weights)
    b, t, plen = 8, 9, 4
    mask = make_mask(rng, b, t, full_row_masked=False)
    keys = ["accuracy_reward", "length_reward", "format_reward"]
    attn = np.concatenate([np.ones((b, plen), dtype=np.int64), mask.astype(np.int64)], axis=1)
    I = {
        "token_level_rewards": outcome_rewards(rng, mask),
        "response_mask": mask,
        "index": group_index(rng, b),
        "prompts": rng.integers(0, 100, (b, plen)),
        "attention_mask": attn,
    }
    for k in keys:
        I[k] = rng.normal(0, 1, b).astype(np.float32).astype(np.float64)
    P = {"adv_estimator": "gdpo", "epsilon": 1e-6, "norm_adv_by_std_in_grpo": True}
    P.update(gdpo_reward_keys=keys, gdpo_reward_weights=weights)
    for dt in DTYPES:
        want, _ = PEER["verl.compute_gdpo_outcome_advantage"](I, P, dt, None)
        got = ops.call("verl.compute_gdpo_outcome_advantage", dtype=dt, **I, **P)
        compare("verl.compute_gdpo_outcome_advantage", got, want, {}, "f32")


# ---------------------------------------------------------------------------
# Rollout correction
# ---------------------------------------------------------------------------

IS_CASES = [
    ("token", 2.0, False),
    ("token", "0.8_1.25", False),
    ("token", 1.5, True),
    ("sequence", 2.0, False),
    ("sequence", "0.5_2.0", True),
    ("sequence", 5.0, True),
]
RS_CASES = [
    ("token_k1", "0.6_1.6"),
    ("token_k2", 0.1),
    ("token_k3", 0.1),
    ("seq_sum_k1", "0.3_3.0"),
    ("seq_sum_k2", 0.8),
    ("seq_sum_k3", 0.8),
    ("seq_mean_k1", "0.8_1.25"),
    ("seq_mean_k2", 0.05),
    ("seq_mean_k3", 0.05),
    ("seq_max_k2", 0.3),
    ("seq_max_k3", 0.3),
    ("token_k1,seq_mean_k3", "0.5_2.0,0.05"),
]


def log_ratio_inputs(rng, b, t):
    return {"log_ratio": rng.normal(0, 0.35, (b, t)), "response_mask": make_mask(rng, b, t)}


@pytest.mark.skipif(rch is None, reason="verl has no rollout_corr_helper")
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("level,threshold,bn", IS_CASES)
def test_rollout_correction_weights(level, threshold, bn, dt):
    for b, t in SHAPES:
        rng = rng_for("is", level, threshold, bn, b, t)
        P = {"rollout_is": level, "rollout_is_threshold": threshold, "rollout_is_batch_normalize": bn}
        run_both("verl.compute_rollout_correction_weights", log_ratio_inputs(rng, b, t), P, dt)


@pytest.mark.skipif(rch is None, reason="verl has no rollout_corr_helper")
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("opts,threshold", RS_CASES)
def test_rollout_rejection_mask(opts, threshold, dt):
    for b, t in SHAPES:
        rng = rng_for("rs", opts, b, t)
        P = {"rollout_rs": opts, "rollout_rs_threshold": threshold}
        run_both("verl.compute_rollout_rejection_mask", log_ratio_inputs(rng, b, t), P, dt)


@pytest.mark.skipif(rch is None, reason="verl has no rollout_corr_helper")
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("k", range(4))
def test_rollout_correction_and_rejection_mask(k, dt):
    cases = [
        {"rollout_is": "token", "rollout_is_threshold": 2.0},
        {
            "rollout_is": "sequence",
            "rollout_is_threshold": "0.5_2.0",
            "rollout_is_batch_normalize": True,
            "rollout_rs": "seq_mean_k3",
            "rollout_rs_threshold": 0.05,
        },
        {"rollout_is": None, "rollout_rs": "token_k1,seq_max_k2", "rollout_rs_threshold": "0.6_1.6,0.3"},
        {"rollout_is": None, "rollout_rs": None},
    ]
    for b, t in SHAPES:
        rng = rng_for("corr", k, b, t)
        old = -rng.gamma(1.5, 0.8, (b, t))
        I = {"old_log_prob": old, "rollout_log_prob": old + rng.normal(0, 0.35, (b, t)), "response_mask": make_mask(rng, b, t)}
        P = dict(ROLLOUT_OFF)
        P.update(cases[k])
        run_both("verl.compute_rollout_correction_and_rejection_mask", I, P, dt)


# ---------------------------------------------------------------------------
# Coverage: every verl op posttrain shares has a differential test here.
# ---------------------------------------------------------------------------


def test_every_shared_op_has_a_peer():
    shared = {o for o in ops.list_ops() if o.startswith("verl.")}
    assert shared <= set(PEER), f"verl ops posttrain runs without a differential test: {sorted(shared - set(PEER))}"


def test_every_release_policy_loss_mode_is_covered():
    """Every loss_mode of the release's registry is run above (bypass_mode in
    its own test); a new mode fails here until it is added."""
    covered = set(POLICY_MODES) | {"bypass_mode"}
    assert set(ca.POLICY_LOSS_REGISTRY) <= covered, sorted(set(ca.POLICY_LOSS_REGISTRY) - covered)
    assert set(ca.ADV_ESTIMATOR_REGISTRY) <= set(ADV_OPS), sorted(set(ca.ADV_ESTIMATOR_REGISTRY) - set(ADV_OPS))


# ---------------------------------------------------------------------------
# The release against the vectors' commit
# ---------------------------------------------------------------------------


def _vec_array(spec: Dict[str, Any]) -> np.ndarray:
    dtype = {"bool": bool, "i64": np.int64}.get(spec["dtype"], np.float64)
    return np.array(spec["data"], dtype=dtype).reshape(spec["shape"])


def _gspo_agg_differs(case: Dict[str, Any]) -> bool:
    p = case["params"]
    return p.get("loss_mode") == "gspo" and p.get("loss_agg_mode") != GSPO_COMMIT_AGG


# op -> (predicate on a vector case, what differs). The release must differ
# from the vector on exactly these cases (and reproduce it on all others).
RELEASE_DIFFERENCES: Dict[str, Tuple[Callable[[Dict[str, Any]], bool], str]] = {
    "verl.policy_loss": (
        _gspo_agg_differs,
        "gspo: the release aggregates with the requested loss_agg_mode; the commit always used seq-mean-token-mean",
    ),
}


def _f32_internal_case(op: str, case: Dict[str, Any]) -> bool:
    """Vector cases whose verl code computes in float32 whatever the input
    dtype (the same code at the commit and in the release; the vectors hold
    the f64-exact values): grpo_vectorized's ``group_mean_std`` and GDPO's
    per-key reward tensors."""
    if op == "verl.compute_grpo_vectorized_outcome_advantage":
        return True
    return op == "verl.compute_gdpo_outcome_advantage" and bool(case["params"].get("gdpo_reward_keys"))


def _vector_ops():
    if not VECTORS.is_dir():
        return []
    return sorted(p.name[: -len(".json")] for p in VECTORS.glob("verl.*.json"))


@pytest.mark.parametrize("op", _vector_ops())
def test_release_vs_vectors(op):
    data = json.loads((VECTORS / f"{op}.json").read_text())
    rtol0, atol0 = data["tolerance"]["f64"]["rel"], data["tolerance"]["f64"]["abs"]
    pred, what = RELEASE_DIFFERENCES.get(op, (lambda c: False, ""))
    unexpected, vanished, empty = [], [], []
    for case in data["cases"]:
        I = {k: _vec_array(v) for k, v in case["inputs"].items()}
        P = case["params"]
        rtol, atol = TOL["f32"] if _f32_internal_case(op, case) else (rtol0, atol0)
        vjp = case.get("vjp") or {}
        cot = {k: _vec_array(v) for k, v in (vjp.get("cotangents") or {}).items()} or None
        try:
            want, wgrads = PEER[op](I, P, "f64", cot)
        except pytest.skip.Exception:
            raise
        except Exception as e:  # the release rejects the case
            unexpected.append(f"{case['name']}: release raises {type(e).__name__}: {e}")
            continue
        ok, compared = True, 0
        for k, spec in case["outputs"].items():
            if k in want:
                r, a = (TOL["f32"] if _f32_internal(k, want[k]) else (rtol, atol))
                expected = _vec_array(spec).reshape(-1).astype(np.float64)
                ok &= np.allclose(want[k].reshape(-1), expected, rtol=r, atol=a, equal_nan=True)
                compared += 1
        for k, spec in (vjp.get("grads") or {}).items():
            if k in wgrads:
                ok &= np.allclose(wgrads[k].reshape(-1), _vec_array(spec).reshape(-1), rtol=rtol, atol=atol, equal_nan=True)
                compared += 1
        if not compared:
            empty.append(case["name"])
        if pred(case) and ok:
            vanished.append(case["name"])
        elif not pred(case) and not ok:
            unexpected.append(case["name"])
    assert not empty, f"no output of these cases is one verl returns: {empty}"
    assert not unexpected, f"verl {verl.__version__} differs from {VECTOR_COMMIT} on {op}: {unexpected}"
    assert not vanished, f"the named release difference ({what}) no longer shows on: {vanished}"


@pytest.mark.parametrize("dt", DTYPES)
def test_release_difference_gspo_loss_agg_mode(dt):
    """verl 0.9.1's ``compute_policy_loss_gspo`` passes ``loss_agg_mode`` to
    ``agg_loss``; at the vectors' commit it passed ``"seq-mean-token-mean"``.
    posttrain has both: ``gspo_honor_loss_agg_mode=True`` gives the release's,
    in ``ops.call("verl.policy_loss")`` and in the fast path alike."""
    for agg in AGG_MODES:
        if agg == GSPO_COMMIT_AGG:
            continue
        rng = rng_for("gspo_release", agg)
        I = {k: rnd(v, dt) for k, v in policy_inputs(rng, 8, 33).items()}
        P = policy_params("gspo", agg)
        want, wgrads = PEER["verl.policy_loss"](I, P, dt, {"pg_loss": 1.0})
        got = ops.call("verl.policy_loss", dtype=dt, cotangents={"pg_loss": 1.0}, **I, **P, **GSPO_RELEASE_OPTION)
        compare("verl.policy_loss", got, want, wgrads, dt)
        with default_dtype(dt):
            want, wgrad = _verl_actor_loss(I, P, dt)
        npdt = np.float32 if dt == "f32" else np.float64
        arrays = (I[k].astype(npdt) for k in ("old_log_prob", "log_prob", "advantages"))
        metrics, grad = ops.verl_policy_loss(*arrays, I["response_mask"], **P, **GSPO_RELEASE_OPTION)
        assert_close(metrics["pg_loss"], want["pg_loss"], dt, f"fast path gspo {agg} pg_loss")
        assert_close(grad, wgrad, dt, f"fast path gspo {agg} grad")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("agg", [a for a in AGG_MODES if a != GSPO_COMMIT_AGG])
def test_gspo_other_agg_modes_keep_commit_behaviour(agg, dt):
    """Without the option (the default, the vectors' commit): posttrain's gspo
    with any ``loss_agg_mode`` is the release's gspo aggregated with
    seq-mean-token-mean."""
    rng = rng_for("gspo_commit", agg)
    I = {k: rnd(v, dt) for k, v in policy_inputs(rng, 8, 33).items()}
    want, wgrads = PEER["verl.policy_loss"](I, policy_params("gspo", GSPO_COMMIT_AGG), dt, {"pg_loss": 1.0})
    got = ops.call("verl.policy_loss", dtype=dt, cotangents={"pg_loss": 1.0}, **I, **policy_params("gspo", agg))
    compare("verl.policy_loss", got, want, wgrads, dt)


def test_verl_default_dtype_singleton_groups():
    """Not a release difference, a property of verl's code (the commit's too):
    in a process with torch's default float32, verl's f64 GRPO divides a
    singleton group's score by ``torch.tensor(1.0) + ε`` computed in float32
    (1 + 9.54e-7 instead of 1 + 1e-6), and pf-ppo's max_min/max_random
    weights are float32 (``torch.where(…, 1.0, 0.0)``). posttrain computes in
    f64 throughout; the two then agree at the f32 tolerance only (the f64
    tests above run verl under a float64 default, as the vectors did)."""
    assert torch.get_default_dtype() == torch.float32
    rng = rng_for("default_dtype")
    I, P = adv_case("grpo", rng, 8, 33)
    x = Torch("f64")
    adv, _ = _adv("grpo", x, I, P)
    got = ops.call("verl.compute_grpo_outcome_advantage", **I, **P)
    assert_close(got["advantages"], adv.numpy(), "f32", "grpo singleton groups under a float32 default")
    mask = make_mask(rng, 8, 33)
    scores = outcome_rewards(rng, mask)
    P = {"reweight_method": "max_min", "weight_pow": 1.0}
    want, _ = _peer_pf_ppo({"token_level_scores": scores}, P, "f64", None)
    got = ops.call("verl.compute_pf_ppo_reweight_data", token_level_scores=scores, **P)
    assert_close(got["weights"], want["weights"], "f32", "pf-ppo weights under a float32 default")
