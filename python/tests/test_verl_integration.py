"""posttrain registered in verl, run through verl's own entry points.

``posttrain.integrations.verl.register()`` adds ``posttrain_<mode>`` policy
losses and ``posttrain_<name>`` advantage estimators to verl's registries.
Here each one is run through the function verl itself calls in training and
compared with verl's built-in of the same name:

* policy losses: ``verl.workers.utils.losses.ppo_loss(config, model_output,
  data)`` — the actor loss of verl's engine workers — on a no-padding batch
  as the FSDP engine hands it over (jagged ``prompts``/``responses``/
  ``response_mask``/``old_log_probs``/``advantages``/``ref_log_prob``,
  ``model_output["log_probs"]`` a jagged tensor over prompt + response
  tokens, ``dp_size``/``batch_num_tokens``/``global_batch_size`` as
  non-tensor data), once with ``policy_loss.loss_mode=<mode>`` and once with
  ``posttrain_<mode>``. The returned loss, the metrics both report and
  ``d loss / d log_probs`` (``torch.autograd.grad``) must agree to f32
  tolerance. ``ppo_loss`` adds the KL and entropy terms itself (verl's code
  on both sides); the policy loss is where the two differ.
* advantage estimators: ``verl.trainer.ppo.ray_trainer.compute_advantage``
  on a ``DataProto`` (``token_level_rewards``, ``response_mask``, ``uid``
  strings, ``values``; ``reward_baselines`` for remax), ``<name>`` against
  ``posttrain_<name>``, with an ``AlgoConfig`` (gamma, lam,
  ``norm_adv_by_std_in_grpo``). verl runs ``gae`` and ``grpo`` directly, not
  through its registry: GRPO is also compared through
  ``get_adv_estimator_fn``; GAE (not registered: verl passes ``values`` only to
  its own branch) against ``posttrain.torch.call``.

Both modules import more than these functions need (``ray_trainer`` the whole
trainer: torchdata, PIL, …; ``losses`` verl's dataset package: PIL). Where
those packages are not installed, :func:`verl_functions` compiles the
functions unchanged from the installed verl source, with the module's
imports that succeed.

Differences that are verl's behaviour, not a tolerance question, are strict
xfails naming the difference (none at present: the adapter selects the
release behaviours).
"""

from __future__ import annotations

import ast
import importlib.util
from typing import Any, Dict, Optional

import numpy as np
import pytest

verl = pytest.importorskip("verl")
torch = pytest.importorskip("torch")
pytest.importorskip("tensordict")

from tensordict import TensorDict  # noqa: E402

import posttrain.integrations.verl as ptv  # noqa: E402
import posttrain.torch as pt  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.metric import Metric  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402


def verl_functions(module: str, *names: str):
    """verl's own functions ``names`` from ``module``: imported, or, where the
    module's other imports need packages this environment lacks (verl's
    ``losses.py`` imports its dataset package, which needs PIL;
    ``ray_trainer.py`` needs torchdata, PIL, ...), compiled unchanged from the
    installed source with every top-level import of the module that succeeds."""
    try:
        mod = importlib.import_module(module)
        return tuple(getattr(mod, n) for n in names)
    except ImportError:
        pass
    spec = importlib.util.find_spec(module)
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), spec.origin)
    ns: Dict[str, Any] = {"__name__": module, "__file__": spec.origin}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            try:
                exec(compile(ast.Module(body=[node], type_ignores=[]), spec.origin, "exec"), ns)
            except ImportError:
                pass  # names used only elsewhere in the module (e.g. DatasetPadMode, StatefulDataLoader)
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert sorted(n.name for n in body) == sorted(names), f"{module} lacks one of {names}"
    exec(compile(ast.Module(body=body, type_ignores=[]), spec.origin, "exec"), ns)
    return tuple(ns[n] for n in names)


(ppo_loss,) = verl_functions("verl.workers.utils.losses", "ppo_loss")


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """posttrain in verl's registries for this module's tests only (other
    modules inspect the registries, e.g. test_diff_verl's coverage check)."""
    saved = (
        dict(core_algos.POLICY_LOSS_REGISTRY),
        dict(core_algos.ADV_ESTIMATOR_REGISTRY),
        dict(ptv._REGISTERED),
    )
    ptv.register()
    yield
    registries = (core_algos.POLICY_LOSS_REGISTRY, core_algos.ADV_ESTIMATOR_REGISTRY, ptv._REGISTERED)
    for registry, before in zip(registries, saved):
        registry.clear()
        registry.update(before)

RTOL, ATOL = 1e-4, 1e-6

# ---------------------------------------------------------------------------
# Policy losses through verl.workers.utils.losses.ppo_loss
# ---------------------------------------------------------------------------

PROMPT_LENS = [3, 5, 2, 4, 6, 3, 4]
RESP_LENS = [7, 1, 12, 5, 9, 3, 10]
# multi-turn tool-output tokens inside a response are masked out
HOLES = {2: (4, 7), 6: (2, 5)}

ADV_SIGNS = [1, -1, 1, 0, -1, 1, -1]
OUTLIERS = {1: (0, 1.6), 4: (2, 1.3), 2: (0, -1.5)}  # sequence: (token, log-ratio)

AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]

# verl actor / policy_loss settings per mode (everything else: ActorConfig defaults)
MODE_ACTOR = {
    "dppo_tv": {"clip_ratio": 0.1, "clip_ratio_low": 0.1, "clip_ratio_high": 0.15},
    "dppo_kl": {"clip_ratio": 0.05, "clip_ratio_low": 0.05, "clip_ratio_high": 0.08},
    "gspo": {"clip_ratio": 0.02, "clip_ratio_low": 0.01, "clip_ratio_high": 0.02},
}
MODE_POLICY_LOSS = {
    # clip_cov_ratio 1: every candidate is detached, so verl's random pick
    # (torch.randperm) selects all of them, as posttrain does.
    "clip_cov": {"clip_cov_ratio": 1.0, "clip_cov_lb": 0.3, "clip_cov_ub": 2.0},
    "kl_cov": {"kl_cov_ratio": 0.2, "ppo_kl_coef": 1.0},
    "dro": {"dro_beta": 0.1},
}
KL_TYPES = ["low_var_kl", "k1", "k3+", "mse", "abs"]

# Global normalizers as a dp rank of a larger mini-batch sees them.
NORMS = {
    "local": lambda ntok, b: {"dp_size": 1, "batch_num_tokens": ntok, "global_batch_size": b},
    "global": lambda ntok, b: {"dp_size": 2, "batch_num_tokens": 2 * ntok + 9, "global_batch_size": 2 * b + 1},
}


class Batch:
    """A no-padding actor micro-batch (what the FSDP engine passes to ppo_loss)."""

    def __init__(self, seed: int, norm: str = "local", perturb: Optional[str] = None):
        g = torch.Generator().manual_seed(seed)
        resp_masks, olds, advs, refs, lp_resp = [], [], [], [], []
        scales = torch.tensor([0.03, 0.15, 0.5])
        for i, r in enumerate(RESP_LENS):
            m = torch.ones(r, dtype=torch.int64)
            if i in HOLES:
                m[HOLES[i][0] : HOLES[i][1]] = 0
            resp_masks.append(m)
            old = -torch.exp(0.8 * torch.randn(r, generator=g) - 0.7)
            # log-ratios of mixed size: inside the clip range, near it, well outside
            step = scales[torch.randint(0, 3, (r,), generator=g)] * torch.randn(r, generator=g)
            if i in OUTLIERS:  # ratio e^±1.6: beyond the dual-clip bound / far below the clip range
                t, d = OUTLIERS[i]
                old[t], step[t] = -2.5, d
            lp = torch.clamp(old + step, max=-1e-4)
            lp_resp.append(lp)
            olds.append(old)
            refs.append(lp + 0.2 * torch.randn(r, generator=g))
            # outcome (GRPO-style) advantage: one value per sequence (0 for a group with equal rewards)
            adv = ADV_SIGNS[i] * (0.3 + torch.randn(1, generator=g).abs())
            advs.append(torch.full((r,), float(adv)) * m)
        seq_lens = [p + r for p, r in zip(PROMPT_LENS, RESP_LENS)]
        self.seq_offsets = torch.tensor([0] + list(np.cumsum(seq_lens)), dtype=torch.int64)
        lp_flat = -torch.exp(torch.randn(int(self.seq_offsets[-1]), generator=g))  # prompt positions: unused
        for i, (p, r) in enumerate(zip(PROMPT_LENS, RESP_LENS)):
            # log_probs[t] scores token t+1: the response's are at [start+p-1, start+p+r-1)
            s = int(self.seq_offsets[i]) + p - 1
            lp_flat[s : s + r] = lp_resp[i]
        self.lp_flat = lp_flat.float()
        self.entropy_flat = (0.5 + torch.rand(lp_flat.shape[0], generator=g)).float()
        if perturb == "old_log_probs":
            olds[0] = olds[0].clone()
            olds[0][0] += 1e-3

        def jag(xs, dtype=torch.float32):
            return torch.nested.as_nested_tensor([x.to(dtype) for x in xs], layout=torch.jagged)

        b = len(RESP_LENS)
        self.data = TensorDict(
            {
                "prompts": jag([torch.arange(p) + 10 for p in PROMPT_LENS], torch.int64),
                "responses": jag([torch.arange(r) + 100 for r in RESP_LENS], torch.int64),
                "response_mask": jag(resp_masks, torch.int64),
                "old_log_probs": jag(olds),
                "advantages": jag(advs),
                "ref_log_prob": jag(refs),
            },
            batch_size=[b],
        )
        ntok = int(sum(int(m.sum()) for m in resp_masks))
        tu.assign_non_tensor(self.data, **NORMS[norm](ntok, b))


def make_actor_config(loss_mode: str, base_mode: str, agg: str, **extra: Any) -> ActorConfig:
    kw: Dict[str, Any] = dict(
        strategy="fsdp",
        ppo_micro_batch_size_per_gpu=1,
        rollout_n=1,
        clip_ratio=0.2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
        loss_agg_mode=agg,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode, **MODE_POLICY_LOSS.get(base_mode, {})),
    )
    kw.update(MODE_ACTOR.get(base_mode, {}))
    kw.update(extra)
    return ActorConfig(**kw)


def _value(v: Any) -> float:
    if isinstance(v, Metric):
        return float(v.aggregate())
    if isinstance(v, torch.Tensor):
        return float(v.detach().item())
    return float(v)


def run_ppo_loss(batch: Batch, loss_mode: str, base_mode: str, agg: str, entropy: bool, **extra: Any):
    config = make_actor_config(loss_mode, base_mode, agg, **extra)
    leaf = batch.lp_flat.detach().clone().requires_grad_(True)
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(leaf, offsets=batch.seq_offsets)}
    if entropy:
        model_output["entropy"] = torch.nested.nested_tensor_from_jagged(batch.entropy_flat, offsets=batch.seq_offsets)
    loss, metrics = ppo_loss(config, model_output, batch.data)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), {k: _value(v) for k, v in metrics.items()}, grad


def compare_ppo_loss(mode: str, agg: str, norm: str = "local", entropy: bool = False, perturb=None, **extra):
    verl_side = run_ppo_loss(Batch(7, norm), mode, mode, agg, entropy, **extra)
    pt_side = run_ppo_loss(Batch(7, norm, perturb), f"posttrain_{mode}", mode, agg, entropy, **extra)
    (l_v, m_v, g_v), (l_p, m_p, g_p) = verl_side, pt_side
    assert torch.isfinite(l_v) and torch.isfinite(g_v).all()
    torch.testing.assert_close(l_p, l_v, rtol=RTOL, atol=ATOL, msg=lambda s: f"{mode}/{agg}/{norm} loss: {s}")
    torch.testing.assert_close(g_p, g_v, rtol=RTOL, atol=ATOL, msg=lambda s: f"{mode}/{agg}/{norm} grad: {s}")
    # posttrain reports every metric verl reports (and may report more, e.g. gpg's zero clip fractions)
    assert set(m_v) <= set(m_p), f"metrics verl reports that posttrain does not: {set(m_v) - set(m_p)}"
    for k in sorted(set(m_v) & set(m_p)):
        np.testing.assert_allclose(m_p[k], m_v[k], rtol=RTOL, atol=ATOL, err_msg=f"{mode}/{agg}/{norm} metric {k}")
    return verl_side, pt_side




def _loss_cases():
    cases = []
    for i, mode in enumerate(ptv.POLICY_LOSS_MODES):
        for j, agg in enumerate(AGG_MODES):
            for norm in NORMS:
                k = i * len(AGG_MODES) + j
                kl = (k + (norm == "global")) % 2 == 0
                kw = {}
                if kl:
                    kw = {"use_kl_loss": True, "kl_loss_coef": 0.05, "kl_loss_type": KL_TYPES[k % len(KL_TYPES)]}
                marks = []
                ident = f"{mode}-{agg}-{norm}" + (f"-kl_{kw['kl_loss_type']}" if kl else "")
                cases.append(pytest.param(mode, agg, norm, kw, id=ident, marks=marks))
    return cases


@pytest.mark.parametrize("mode,agg,norm,kw", _loss_cases())
def test_ppo_loss_matches_verl(mode, agg, norm, kw):
    (_, m_v, _), _ = compare_ppo_loss(mode, agg, norm, **kw)
    if mode == "clip_cov":  # the case exercises the clip-cov detach
        assert m_v["actor/pg_clipfrac"] > 0


@pytest.mark.parametrize(
    "mode,agg",
    [("vanilla", "token-mean"), ("cispo", "seq-mean-token-sum"), ("sapo", "seq-mean-token-mean")],
)
def test_ppo_loss_with_entropy_and_kl_matches_verl(mode, agg):
    (_, m_v, _), _ = compare_ppo_loss(
        mode, agg, "global", entropy=True, entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="k3"
    )
    assert "actor/entropy_loss" in m_v and "kl_loss" in m_v


def test_ppo_loss_batch_exercises_clipping():
    """The batch makes the clipped losses clip (else the comparison would be weak)."""
    (_, m_v, _), _ = compare_ppo_loss("vanilla", "token-mean")
    assert 0 < m_v["actor/pg_clipfrac"] < 1
    assert m_v["actor/pg_clipfrac_lower"] > 0  # dual clip
    for mode in ("dppo_tv", "dppo_kl"):  # some tokens masked, some ratios truncated at clip_ratio_c
        (_, m_v, _), _ = compare_ppo_loss(mode, "token-mean")
        assert 0 < m_v["actor/pg_clipfrac"] < 1 and m_v["actor/pg_clipfrac_lower"] > 0
    (_, m_v, _), _ = compare_ppo_loss("gspo", "seq-mean-token-mean")  # some sequence ratios clip
    assert 0 < m_v["actor/pg_clipfrac"] < 1


def test_ppo_loss_comparison_detects_a_perturbed_input():
    """One old_log_prob moved by 1e-3 on the posttrain side only: the comparison must fail."""
    with pytest.raises(AssertionError):
        compare_ppo_loss("vanilla", "token-mean", perturb="old_log_probs")


# ---------------------------------------------------------------------------
# Advantage estimators through verl.trainer.ppo.ray_trainer.compute_advantage
# ---------------------------------------------------------------------------


# compute_advantage calls compute_response_mask (same module)
_, compute_advantage = verl_functions(
    "verl.trainer.ppo.ray_trainer", "compute_response_mask", "compute_advantage"
)

ADV_RESP_LENS = [6, 3, 5, 1, 6, 4, 2, 5]
ADV_UIDS = ["q0"] * 3 + ["q1"] * 3 + ["q2"] * 2
GAMMA, LAM = 0.99, 0.95


def make_dataproto(kind: str, name: str = "") -> DataProto:
    """A rollout batch as compute_advantage sees it; ``reward_baselines`` only
    for remax (the trainer adds it only there, and compute_advantage passes
    it to any estimator when present: grpo_vectorized has no ``**kwargs``)."""
    g = torch.Generator().manual_seed(11 if kind == "binary" else 12)
    b, t = len(ADV_RESP_LENS), max(ADV_RESP_LENS)
    lens = torch.tensor(ADV_RESP_LENS)
    mask = (torch.arange(t)[None, :] < lens[:, None]).to(torch.int64)
    if kind == "binary":
        score = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
        rewards = torch.zeros(b, t)
    else:
        score = torch.randn(b, generator=g)
        rewards = 0.05 * torch.randn(b, t, generator=g) * mask  # per-token shaping (e.g. KL in reward)
    rewards[torch.arange(b), lens - 1] += score
    tensors = {
        "token_level_rewards": rewards.float(),
        "response_mask": mask,
        "values": (torch.randn(b, t, generator=g) * mask).float(),
    }
    baselines = (0.5 * torch.randn(b, generator=g)).float()
    if name.removeprefix("posttrain_") == "remax":
        tensors["reward_baselines"] = baselines
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": np.array(ADV_UIDS, dtype=object)})


def run_compute_advantage(name: str, kind: str, norm: bool):
    config = AlgoConfig(gamma=GAMMA, lam=LAM, adv_estimator=name, norm_adv_by_std_in_grpo=norm)
    out = compute_advantage(
        make_dataproto(kind, name),
        adv_estimator=name,
        gamma=GAMMA,
        lam=LAM,
        num_repeat=3,
        norm_adv_by_std_in_grpo=norm,
        config=config,
    )
    return out.batch["advantages"], out.batch["returns"]


def _adv_cases():
    cases = []
    for name in ptv.ADV_ESTIMATORS:
        for kind in ("binary", "continuous"):
            for norm in (True, False):
                if not norm and name not in ("grpo", "grpo_vectorized", "grpo_passk"):
                    continue
                marks = []
                ident = f"{name}-{kind}-{'std' if norm else 'nostd'}"
                cases.append(pytest.param(name, kind, norm, id=ident, marks=marks))
    return cases


@pytest.mark.parametrize("name,kind,norm", _adv_cases())
def test_compute_advantage_matches_verl(name, kind, norm):
    adv_v, ret_v = run_compute_advantage(name, kind, norm)
    adv_p, ret_p = run_compute_advantage(f"posttrain_{name}", kind, norm)
    assert adv_p.dtype == adv_v.dtype and adv_p.shape == adv_v.shape
    torch.testing.assert_close(adv_p, adv_v, rtol=RTOL, atol=ATOL, msg=lambda s: f"{name} advantages: {s}")
    torch.testing.assert_close(ret_p, ret_v, rtol=RTOL, atol=ATOL, msg=lambda s: f"{name} returns: {s}")


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("kind", ["binary", "continuous"])
def test_grpo_through_registry_matches_verl(kind, norm):
    """compute_advantage calls verl's GRPO directly; compare through get_adv_estimator_fn too."""
    data = make_dataproto(kind)
    kw = dict(
        token_level_rewards=data.batch["token_level_rewards"],
        response_mask=data.batch["response_mask"],
        index=data.non_tensor_batch["uid"],
        norm_adv_by_std_in_grpo=norm,
        config=AlgoConfig(norm_adv_by_std_in_grpo=norm),
    )
    adv_v, ret_v = core_algos.get_adv_estimator_fn("grpo")(**kw)
    adv_p, ret_p = core_algos.get_adv_estimator_fn("posttrain_grpo")(**kw)
    torch.testing.assert_close(adv_p, adv_v, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ret_p, ret_v, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["binary", "continuous"])
def test_gae_matches_verl(kind):
    """posttrain's GAE (not registered: verl 0.9.1 hands `values`, gamma and
    lam only to its own GAE branch) on the arguments verl's GAE gets."""
    data = make_dataproto(kind)
    kw = dict(
        token_level_rewards=data.batch["token_level_rewards"],
        values=data.batch["values"],
        response_mask=data.batch["response_mask"],
        gamma=GAMMA,
        lam=LAM,
    )
    adv_v, ret_v = core_algos.get_adv_estimator_fn("gae")(**kw)
    out = pt.call("verl.compute_gae_advantage_return", **kw)
    torch.testing.assert_close(out["advantages"], adv_v, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out["returns"], ret_v, rtol=RTOL, atol=ATOL)
    assert "posttrain_gae" not in core_algos.ADV_ESTIMATOR_REGISTRY


def test_compute_advantage_comparison_detects_a_perturbed_input():
    adv_v, _ = run_compute_advantage("rloo", "continuous", True)
    data = make_dataproto("continuous")
    data.batch["token_level_rewards"][0, 0] += 1e-3
    out = compute_advantage(
        data, adv_estimator="posttrain_rloo", gamma=GAMMA, lam=LAM, config=AlgoConfig(gamma=GAMMA, lam=LAM)
    )
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out.batch["advantages"], adv_v, rtol=RTOL, atol=ATOL)
