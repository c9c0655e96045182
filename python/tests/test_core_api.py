"""``posttrain.ops.core``: the core's own API under its Rust names.

The contract of the surface itself (configs built by the Rust constructors,
errors, dtypes, zero-copy reads), and that every op of the catalogue is
exercised by a ``test_core_*.py`` case list (a new op without cases fails
here)."""

import importlib
import pathlib

import numpy as np
import pytest

from posttrain.ops import core

from core_check import check_case, params

HERE = pathlib.Path(__file__).parent
CASE_FILES = sorted(p.stem for p in HERE.glob("test_core_*.py") if p.stem != "test_core_api")


def all_cases():
    cases = {}
    for m in CASE_FILES:
        mod = importlib.import_module(m)
        for k, v in getattr(mod, "CASES", {}).items():
            cases.setdefault(k, []).extend(v)
    return cases


def test_every_core_op_has_cases():
    cases = all_cases()
    missing = [p for p in core.list_ops() if not cases.get(p)]
    assert not missing, f"core ops without test cases: {missing}"
    stale = [p for p in cases if p not in core.list_ops()]
    assert not stale, f"cases for ops that do not exist: {stale}"


def test_config_and_op_paths_are_unique():
    paths = [c["path"] for c in core._SPEC["configs"]]
    assert len(paths) == len(set(paths)), sorted(n for n in paths if paths.count(n) > 1)
    names = [c["name"] for c in core._SPEC["configs"]]
    for c in core._SPEC["configs"]:
        assert c["path"].endswith("::" + c["name"]), c
    ops_ = [o["path"] for o in core._SPEC["ops"]]
    assert len(ops_) == len(set(ops_))
    # an ambiguous name asks for the path
    dup = sorted({n for n in names if names.count(n) > 1})
    for n in dup:
        with pytest.raises(ValueError, match=rf"`{n}` is ambiguous: the core has"):
            core.config(n)


def test_every_config_is_documented():
    for c in core._SPEC["configs"]:
        assert c["doc"] and c["path"]
    assert len(core.list_configs()) == len(core._SPEC["configs"])


# ---------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------


def test_config_preset_matches_the_rust_constructor():
    assert core.config("ClipConfig", preset="verl", eps_low=0.2, eps_high=0.28) == {
        "eps_low": 0.2, "eps_high": 0.28, "dual_clip": 3.0, "log_ratio_clamp": 20.0}
    assert core.config("ClipConfig", preset="trl", eps_low=0.2, eps_high=0.2)["dual_clip"] is None
    g = core.config("GroupNormConfig", preset="verl")
    assert (g["std_eps"], g["singleton"]) == (1e-6, "MeanZeroStdOne")
    assert core.config("GroupNormConfig", preset="trl")["std_eps"] == 1e-4


def test_config_fields_override_the_preset_and_are_validated():
    c = core.config("ClipConfig", preset="verl", eps_low=0.2, eps_high=0.28, dual_clip=None)
    assert c["dual_clip"] is None
    with pytest.raises(ValueError, match=r"unknown field `foo`; its fields are"):
        core.config("ClipConfig", preset="verl", eps_low=0.2, eps_high=0.28, foo=1)
    with pytest.raises(ValueError, match=r"preset constructor needs `eps_high`"):
        core.config("ClipConfig", preset="verl", eps_low=0.2)
    with pytest.raises(ValueError, match=r"out of range"):
        core.config("ClipConfig", eps_low=-1.0, eps_high=0.2, dual_clip=None, log_ratio_clamp=None)
    with pytest.raises(ValueError, match=r"missing field"):
        core.config("ClipConfig", eps_low=0.2)
    with pytest.raises(ValueError, match=r"unknown preset|preset"):
        core.config("ClipConfig", preset="deepspeed", eps_low=0.2, eps_high=0.2)
    with pytest.raises(ValueError, match=r"unknown config type `Nope`"):
        core.config("Nope")


def test_hand_written_configs_are_accepted():
    r = np.random.default_rng(0)
    x = r.normal(size=(2, 3))
    m = np.ones((2, 3), bool)
    built = core.config("ClipConfig", preset="trl", eps_low=0.2, eps_high=0.2)
    a = core.policy.token.policy_loss(loss={"Ppo": built}, agg="token-mean", log_prob=x,
                                      old_log_prob=x * 0.9, advantages=x, mask=m)
    b = core.policy.token.policy_loss(
        loss={"Ppo": {"eps_low": 0.2, "eps_high": 0.2, "dual_clip": None, "log_ratio_clamp": None}},
        agg="token-mean", log_prob=x, old_log_prob=x * 0.9, advantages=x, mask=m)
    assert a["loss"] == b["loss"]


# ---------------------------------------------------------------------------
# calls
# ---------------------------------------------------------------------------


def _ppo(**kw):
    r = np.random.default_rng(3)
    x = r.normal(size=(2, 4))
    base = dict(loss={"Ppo": core.config("ClipConfig", preset="verl", eps_low=0.2, eps_high=0.28)},
                agg="seq-mean-token-mean", log_prob=x, old_log_prob=x + 0.1 * r.normal(size=x.shape),
                advantages=r.normal(size=x.shape), mask=r.random(x.shape) > 0.3)
    base.update(kw)
    return base


def test_errors_name_the_op_and_the_argument():
    with pytest.raises(ValueError, match=r"policy_loss: unknown argument `logprob`"):
        core.policy.token.policy_loss(**{**_ppo(), "logprob": 1})
    with pytest.raises(ValueError, match=r"missing input `mask`"):
        kw = _ppo()
        del kw["mask"]
        core.policy.token.policy_loss(**kw)
    with pytest.raises(ValueError, match=r"shape mismatch"):
        core.policy.token.policy_loss(**_ppo(advantages=np.zeros((2, 3))))
    with pytest.raises(ValueError, match=r"parameter `agg`: unknown variant `mean`"):
        core.policy.token.policy_loss(**_ppo(agg="mean"))
    with pytest.raises(ValueError, match=r"unknown core op `policy::token::nope`; in policy::token: "):
        core.call("policy::token::nope")
    with pytest.raises(ValueError, match=r"no gradient flows from output `clipfrac`"):
        core.policy.token.policy_loss(cotangents={"clipfrac": 1.0}, **_ppo())
    with pytest.raises(ValueError, match=r"no closed-form gradient"):
        core.advantage.group_zscore_advantages(
            cfg=core.config("GroupNormConfig", preset="trl"), scores=[1.0, 2.0], index=[0, 0], grad=True)
    with pytest.raises(ValueError, match=r"must hold integers"):
        core.advantage.group_zscore_advantages(
            cfg=core.config("GroupNormConfig", preset="trl"), scores=[1.0, 2.0], index=[0.5, 0.0])


def test_precision_follows_the_first_real_input():
    kw = _ppo()
    r64 = core.policy.token.policy_loss(grad=True, **kw)
    kw32 = {**kw, "log_prob": kw["log_prob"].astype(np.float32)}
    r32 = core.policy.token.policy_loss(grad=True, **kw32)
    assert r64["loss"].dtype == np.float64 and r32["loss"].dtype == np.float32
    assert r32.grads["log_prob"].dtype == np.float32
    assert r32.grads["log_prob"].shape == (2, 4)
    np.testing.assert_allclose(r32.grads["log_prob"], r64.grads["log_prob"], rtol=1e-4, atol=1e-6)


def test_torch_cpu_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    kw = _ppo()
    want = core.policy.token.policy_loss(**kw)["loss"]
    kwt = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    assert core.policy.token.policy_loss(**kwt)["loss"] == want


def test_non_contiguous_inputs_are_made_contiguous():
    kw = _ppo()
    want = core.policy.token.policy_loss(**kw)["loss"]
    t = {k: (np.asfortranarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    assert core.policy.token.policy_loss(**t)["loss"] == want


def test_namespaces_follow_the_rust_paths_and_document_the_op():
    for path in core.list_ops():
        obj = core
        for part in path.split("::"):
            obj = getattr(obj, part)
        assert path in obj.__doc__
        info = core.op_info(path)
        assert info["doc"] and info["inputs"] is not None


def test_check_case_catches_a_wrong_gradient(monkeypatch):
    # the harness itself: a gradient off by a factor must fail the check
    real_call = core.call

    def broken(path, cotangents=None, grad=False, **kw):
        r = real_call(path, cotangents=cotangents, grad=grad, **kw)
        for k in r.grads:
            r.grads[k] = r.grads[k] * 1.01
        return r

    monkeypatch.setattr(core, "call", broken)
    with pytest.raises(AssertionError, match=r"finite differences"):
        check_case("policy::token::policy_loss", _ppo())


# ---------------------------------------------------------------------------
# posttrain.torch.core: the same ops as autograd functions
# ---------------------------------------------------------------------------


def test_torch_core_backward_is_the_closed_form_gradient():
    torch = pytest.importorskip("torch")
    import posttrain.torch as pt

    kw = _ppo()
    lp = torch.from_numpy(kw["log_prob"]).requires_grad_()
    tkw = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    tkw["log_prob"] = lp
    out, metrics = pt.core("policy::token::policy_loss", **tkw)
    assert set(metrics) == {"clipfrac", "clipfrac_lower", "approx_kl"}
    (3.0 * out["loss"]).backward()
    want = core.policy.token.policy_loss(cotangents={"loss": 3.0}, **kw).grads["log_prob"]
    np.testing.assert_allclose(lp.grad.numpy(), want, rtol=1e-14)
    assert torch.autograd.gradcheck(
        lambda x: pt.core("policy::token::policy_loss", **{**tkw, "log_prob": x})[0]["loss"],
        (lp.detach().clone().requires_grad_(),))


def test_torch_core_array_outputs_and_several_cotangents():
    torch = pytest.importorskip("torch")
    import posttrain.torch as pt

    r = np.random.default_rng(9)
    c = torch.from_numpy(-np.abs(r.normal(size=4)) * 3).requires_grad_()
    rj = torch.from_numpy(-np.abs(r.normal(size=4)) * 3).requires_grad_()
    ref = torch.from_numpy(-np.abs(r.normal(size=4)) * 3)
    cfg = core.config("PairedConfig", preset="trl", beta=0.1)
    terms = [core.config("LossTerm", kind="Sigmoid")]

    def f(c, rj):
        out, _ = pt.core("preference::paired::paired_loss", cfg=cfg, terms=terms, policy_chosen=c,
                         policy_rejected=rj, reference_chosen=ref, reference_rejected=ref)
        return out["loss"] + (out["per_pair"] ** 2).sum()

    assert torch.autograd.gradcheck(f, (c, rj))


def test_torch_core_f32_and_non_differentiable_outputs():
    torch = pytest.importorskip("torch")
    import posttrain.torch as pt

    g = {"scores": torch.tensor([1.0, 2.0, 4.0, 0.5], dtype=torch.float32, requires_grad=True),
         "index": torch.tensor([0, 0, 1, 1])}
    out, _ = pt.core("advantage::group_zscore_advantages", cfg=core.config("GroupNormConfig", preset="trl"), **g)
    assert out["advantages"].dtype == torch.float32
    assert not out["advantages"].requires_grad  # advantages are constants


# ---------------------------------------------------------------------------
# hostile input: every case with one input cut short or poisoned must give a
# result or a ValueError (a Rust panic would surface as PanicException)
# ---------------------------------------------------------------------------


def _hostile_variants(path, kwargs):
    spec = core.op_info(path)
    for i in spec["inputs"]:
        name = i["name"]
        v = kwargs.get(name)
        if v is None:
            continue
        a = np.asarray(v)
        if a.size:
            yield f"{name} cut short", {**kwargs, name: a.reshape(-1)[:-1]}
        yield f"{name} empty", {**kwargs, name: a.reshape(-1)[:0]}
        if i["kind"] == "real" and a.size:
            poisoned = np.array(a, dtype=np.float64)
            poisoned.reshape(-1)[0] = np.nan
            yield f"{name} NaN", {**kwargs, name: poisoned}
        if i["kind"] == "index" and a.size:
            yield f"{name} huge", {**kwargs, name: np.full(a.shape, 2**62, dtype=np.int64)}


def test_hostile_inputs_never_crash():
    cases = all_cases()
    checked = 0
    for path, builds in sorted(cases.items()):
        for k, build in enumerate(builds[:2]):
            kwargs = dict(build(np.random.default_rng(k)))
            kwargs.pop("_check", None)
            for what, kw in _hostile_variants(path, kwargs):
                try:
                    core.call(path, grad=bool(core.op_info(path)["vjp"]), **kw)
                except ValueError:
                    pass
                checked += 1
    assert checked > 500
