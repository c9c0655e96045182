"""Cases for ``posttrain.ops.core``'s kl, value, aggregate, stats, logits,
sequence, distill and fused modules (see ``core_check``), and cross-checks
against the peer-named ops running the same core function."""

import numpy as np
import pytest

from posttrain import ops
from posttrain.ops import core

from core_check import params, run_cases


def kl_inputs(rng, shape=(3, 5)):
    lp = -np.abs(rng.normal(size=shape))
    return dict(log_prob=lp, ref_log_prob=lp + 0.3 * rng.normal(size=shape))


CASES = {
    "kl::KlConfig::estimate_slices": [
        lambda r, e=e: dict(cfg=core.config("KlConfig", preset="verl", estimator=e), **kl_inputs(r))
        for e in ["K1", "Abs", "K2", "K3"]
    ] + [
        lambda r: dict(cfg=core.config("KlConfig", preset="trl", estimator="K3", straight_through=True),
                       _check={"fd": False}, **kl_inputs(r)),
    ],
}


@pytest.mark.parametrize("path,index", params(CASES))
def test_case(path, index):
    run_cases(CASES, path, index)


def test_k3_is_verls_low_var_kl():
    r = np.random.default_rng(2)
    x = kl_inputs(r)
    mine = core.kl.KlConfig.estimate_slices(cfg=core.config("KlConfig", preset="verl", estimator="K3"), **x)
    peer = ops.call("verl.kl_penalty", logprob=x["log_prob"], ref_logprob=x["ref_log_prob"], kl_penalty="low_var_kl")
    np.testing.assert_allclose(mine["kl"], peer["kl_estimate"], rtol=1e-12)


def test_straight_through_k3_has_k3_value_and_k2_gradient():
    r = np.random.default_rng(4)
    x = kl_inputs(r)
    st = core.kl.KlConfig.estimate_slices(
        cfg=core.config("KlConfig", preset="verl", estimator="K3", straight_through=True), grad=True, **x)
    k3 = core.kl.KlConfig.estimate_slices(cfg=core.config("KlConfig", preset="verl", estimator="K3"), **x)
    k2 = core.kl.KlConfig.estimate_slices(cfg=core.config("KlConfig", preset="verl", estimator="K2"), grad=True, **x)
    np.testing.assert_allclose(st["kl"], k3["kl"], rtol=1e-12)
    np.testing.assert_allclose(st.grads["log_prob"], k2.grads["log_prob"], rtol=1e-12)
