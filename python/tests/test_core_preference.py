"""Cases for ``posttrain.ops.core.preference`` (see ``core_check``), and
cross-checks against the peer-named ops running the same core function."""

import numpy as np
import pytest

from posttrain import ops
from posttrain.ops import core

from core_check import params, run_cases


def pairs(rng, b=5, reference=True):
    d = dict(policy_chosen=-np.abs(rng.normal(size=b)) * 5, policy_rejected=-np.abs(rng.normal(size=b)) * 5)
    if reference:
        d.update(reference_chosen=-np.abs(rng.normal(size=b)) * 5, reference_rejected=-np.abs(rng.normal(size=b)) * 5)
    return d


def term(kind, weight=1.0):
    return core.config("LossTerm", kind=kind, weight=weight)


CASES = {
    "preference::paired::paired_loss": [
        lambda r: dict(cfg=core.config("PairedConfig", preset="trl", beta=0.1), terms=[term("Sigmoid")], **pairs(r)),
        lambda r: dict(cfg=core.config("PairedConfig", preset="openrlhf", beta=0.5, label_smoothing=0.1),
                       terms=[term("Sigmoid"), term("Hinge", 0.5)], pair_weight=r.random(5), **pairs(r)),
        lambda r: dict(cfg=core.config("PairedConfig", preset="trl", beta=0.1), terms=[term("Ipo")],
                       chosen_len=r.integers(1, 9, 5).astype(float), rejected_len=r.integers(1, 9, 5).astype(float),
                       **pairs(r)),
    ],
}


@pytest.mark.parametrize("path,index", params(CASES))
def test_case(path, index):
    run_cases(CASES, path, index)


def test_paired_loss_is_trls_dpo_loss():
    r = np.random.default_rng(5)
    p = pairs(r)
    mine = core.preference.paired.paired_loss(cfg=core.config("PairedConfig", preset="trl", beta=0.1),
                                              terms=[term("Sigmoid")], grad=True, **p)
    peer = ops.dpo_pair_loss(p["policy_chosen"], p["policy_rejected"], p["reference_chosen"],
                             p["reference_rejected"], np.ones(5), np.ones(5), beta=0.1, loss_type="sigmoid")
    np.testing.assert_allclose(mine["loss"], peer[0]["loss"], rtol=1e-12)
    np.testing.assert_allclose(mine.grads["policy_chosen"], peer[1], rtol=1e-12)
    np.testing.assert_allclose(mine.grads["policy_rejected"], peer[2], rtol=1e-12)
