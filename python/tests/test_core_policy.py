"""Cases for ``posttrain.ops.core.policy``: each op held to the contract
of ``core_check.check_case`` (finite, f32 ≈ f64, closed-form gradients =
finite differences), and cross-checked against the peer-named op that runs
the same core function."""

import numpy as np
import pytest

from posttrain import ops
from posttrain.ops import core

from core_check import params, run_cases


def token_batch(rng, b=3, t=6, hole=True):
    lp = -np.abs(rng.normal(size=(b, t))) - 0.1
    mask = rng.random((b, t)) > 0.25
    if hole:
        mask[0, :] = False  # an empty row
    return dict(log_prob=lp, old_log_prob=lp + 0.2 * rng.normal(size=(b, t)),
                advantages=rng.normal(size=(b, t)), mask=mask)


def ppo(rng, preset="verl", agg="seq-mean-token-mean"):
    clip = core.config("ClipConfig", preset=preset, eps_low=0.2, eps_high=0.28)
    return dict(loss={"Ppo": clip}, agg=agg, **token_batch(rng))


CASES = {
    "policy::token::policy_loss": [
        lambda r: ppo(r),
        lambda r: ppo(r, "trl", "token-mean"),
        lambda r: {**ppo(r, "openrlhf", "seq-mean-token-sum-norm"),
                   "norm": core.config("GlobalNorm", dp_size=2.0, batch_num_tokens=7.0)},
        lambda r: {**ppo(r, agg="token-sum"), "is_weights": r.random((3, 6)) + 0.5},
    ],
}


@pytest.mark.parametrize("path,index", params(CASES))
def test_case(path, index):
    run_cases(CASES, path, index)


def test_policy_loss_is_verls_compute_policy_loss():
    r = np.random.default_rng(7)
    kw = ppo(r)
    mine = core.policy.token.policy_loss(grad=True, **kw)
    peer = ops.call("verl.compute_policy_loss", old_log_prob=kw["old_log_prob"], log_prob=kw["log_prob"],
                    advantages=kw["advantages"], response_mask=kw["mask"], loss_agg_mode="seq-mean-token-mean",
                    cliprange=0.2, cliprange_low=0.2, cliprange_high=0.28, clip_ratio_c=3.0,
                    cotangents={"pg_loss": np.ones(())})
    np.testing.assert_allclose(mine["loss"], peer["pg_loss"], rtol=1e-12)
    np.testing.assert_allclose(mine.grads["log_prob"], peer.grads["log_prob"], rtol=1e-12, atol=1e-15)
