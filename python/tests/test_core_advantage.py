"""Cases for ``posttrain.ops.core.advantage`` (see ``core_check``), and
cross-checks against the peer-named ops running the same core function."""

import numpy as np
import pytest

from posttrain import ops
from posttrain.ops import core

from core_check import params, run_cases


def groups(rng, n_groups=4, size=4, singleton=True):
    index = np.repeat(np.arange(n_groups), size)
    if singleton:
        index = np.append(index, n_groups)  # a singleton group
    rng.shuffle(index)
    return dict(scores=rng.normal(size=index.size), index=index)


CASES = {
    "advantage::group_zscore_advantages": [
        lambda r: dict(cfg=core.config("GroupNormConfig", preset="verl"), **groups(r)),
        lambda r: dict(cfg=core.config("GroupNormConfig", preset="trl"), **groups(r)),
        lambda r: dict(cfg=core.config("GroupNormConfig", preset="trl", scale_by_std=False), **groups(r)),
    ],
}


@pytest.mark.parametrize("path,index", params(CASES))
def test_case(path, index):
    run_cases(CASES, path, index)


def test_group_zscore_is_verls_grpo_outcome_advantage():
    r = np.random.default_rng(3)
    g = groups(r, singleton=True)
    mine = core.advantage.group_zscore_advantages(cfg=core.config("GroupNormConfig", preset="verl"), **g)
    n = g["scores"].size
    peer = ops.call("verl.compute_grpo_outcome_advantage",
                    token_level_rewards=np.column_stack([np.zeros(n), g["scores"]]),
                    response_mask=np.ones((n, 2), bool), index=g["index"])
    np.testing.assert_allclose(peer["advantages"][:, 0], mine["advantages"], rtol=1e-12)
