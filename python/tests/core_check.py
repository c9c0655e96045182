"""Shared checks for the core-named ops (``posttrain.ops.core``).

Each ``test_core_*.py`` file lists cases as ``CASES = {path: [build, ...]}``
where ``build(rng)`` returns the op's keyword arguments (f64 arrays, masks,
indices, parameters). :func:`check_case` then holds every op to the same
contract:

* the call succeeds in f64 and every output, metric and gradient is finite
  (masked positions included: no NaN/inf leaks);
* the f32 call agrees with the f64 one (relative 1e-4, absolute 1e-5);
* every closed-form gradient the op declares (``op_info(path)["vjp"]``)
  matches central finite differences of the f64 op, for random cotangents,
  on every real input it differentiates.
"""

from __future__ import annotations

import numpy as np

from posttrain.ops import core


def _real_inputs(path, kwargs):
    spec = core.op_info(path)
    return [i["name"] for i in spec["inputs"] if i["kind"] == "real" and kwargs.get(i["name"]) is not None]


def _as(kwargs, names, dtype):
    out = dict(kwargs)
    for n in names:
        out[n] = np.asarray(kwargs[n], dtype=dtype)
    return out


def _all_arrays(r):
    items = [("output " + k, np.asarray(v, dtype=np.float64)) for k, v in r.outputs.items()
             if np.asarray(v).dtype.kind == "f"]
    items += [("metric " + k, np.asarray(v, dtype=np.float64)) for k, v in r.metrics.items()]
    items += [("grad " + k, np.asarray(v, dtype=np.float64)) for k, v in r.grads.items()]
    return items


def check_case(path, kwargs, *, fd_eps=1e-6, fd_tol=1e-6, f32_rtol=1e-4, f32_atol=1e-5,
               finite=True, fd=True, seed=0):
    """Runs the contract above on one case; returns the f64 result."""
    spec = core.op_info(path)
    reals = _real_inputs(path, kwargs)
    k64 = _as(kwargs, reals, np.float64)
    rng = np.random.default_rng(seed)

    # cotangents for every differentiable output, shaped from a first run
    plain = core.call(path, **k64)
    cots = {}
    for v in spec["vjp"]:
        out = np.asarray(plain.outputs[v["output"]])
        cots[v["output"]] = rng.normal(size=out.shape) if out.shape else np.asarray(rng.normal())
    r64 = core.call(path, cotangents=cots or None, **k64)
    if finite:
        for name, a in _all_arrays(r64):
            assert np.all(np.isfinite(a)), f"{path}: {name} is not finite: {a}"
    for k, v in plain.outputs.items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(r64.outputs[k]),
                                      err_msg=f"{path}: asking for gradients changed `{k}`")

    # f32 against f64
    if reals:
        r32 = core.call(path, cotangents={k: np.asarray(v, np.float32) for k, v in cots.items()} or None,
                        **_as(kwargs, reals, np.float32))
        for (name, a), (_, b) in zip(_all_arrays(r64), _all_arrays(r32)):
            mask = np.isfinite(a)
            np.testing.assert_allclose(b[mask], a[mask], rtol=f32_rtol, atol=f32_atol,
                                       err_msg=f"{path}: f32 {name} vs f64")

    # closed-form gradients against central differences of
    # Σ_outputs <cotangent, output>
    def objective(kw):
        r = core.call(path, **kw)
        return sum(float(np.sum(np.asarray(r.outputs[o]) * c)) for o, c in cots.items())

    differentiated = [] if not fd else sorted({i for v in spec["vjp"] for i in v["inputs"] if kwargs.get(i) is not None})
    for name in differentiated:
        assert name in r64.grads, f"{path}: no gradient for `{name}`"
        g = np.asarray(r64.grads[name])
        x = np.asarray(k64[name], dtype=np.float64)
        assert g.shape == x.shape, f"{path}: grad `{name}` shape {g.shape} != input {x.shape}"
        fd = np.zeros_like(x)
        flat = x.reshape(-1)
        for j in range(flat.size):
            hi, lo = flat.copy(), flat.copy()
            hi[j] += fd_eps
            lo[j] -= fd_eps
            fd.reshape(-1)[j] = (objective({**k64, name: hi.reshape(x.shape)})
                                 - objective({**k64, name: lo.reshape(x.shape)})) / (2 * fd_eps)
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=fd_tol,
                                   err_msg=f"{path}: closed-form gradient of `{name}` vs finite differences")
    return r64


def run_cases(cases, path, index):
    """Builds case ``index`` of ``path`` and checks it. A case may carry
    check options under the key ``"_check"`` (e.g. ``{"fd": False}`` for a
    straight-through estimator, whose gradient is by design not the
    derivative of its value)."""
    build = cases[path][index]
    kwargs = dict(build(np.random.default_rng(1000 + index)))
    opts = kwargs.pop("_check", {})
    return check_case(path, kwargs, **opts)


def params(cases):
    """pytest parameters (path, case index) for ``CASES``."""
    return [(p, i) for p, builds in sorted(cases.items()) for i in range(len(builds))]
