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


def paired_cfg(preset="trl", beta=0.1, **kw):
    return core.config("PairedConfig", preset=preset, beta=beta, **kw)


def lm_batch(rng, b=3, t=6, v=5, empty_row=True, holes=True):
    """Causal-LM logits ``[b, t, v]``, targets and a validity mask with
    padding (the tail of each row), holes, and (optionally) an empty row."""
    logits = rng.normal(size=(b, t, v)) * 2
    targets = rng.integers(0, v, size=(b, t))
    valid = np.zeros((b, t), bool)
    for i in range(b):
        valid[i, 1:rng.integers(2, t + 1)] = True  # right padding
    if holes:
        valid[-1, 2] = False
    if empty_row:
        valid[0, :] = False
    targets[~valid] = -100  # never read where not valid
    return dict(logits=logits, targets=targets, valid=valid)


def dpo_batch(rng, b=2, t=5, v=4, reference="precomputed"):
    """TRL's concatenated DPO batch: 2b rows (chosen then rejected), a prompt
    of 1–2 tokens, completions of different lengths."""
    rows = 2 * b
    logits = rng.normal(size=(rows, t, v))
    ids = rng.integers(0, v, size=(rows, t))
    cmask = np.zeros((rows, t), bool)
    for r in range(rows):
        start = 1 + r % 2
        cmask[r, start:rng.integers(start + 1, t + 1)] = True
    d = dict(logits=logits, input_ids=ids, completion_mask=cmask)
    if reference == "precomputed":
        d.update(reference_chosen=-np.abs(rng.normal(size=b)) * 3, reference_rejected=-np.abs(rng.normal(size=b)) * 3)
    else:
        d.update(reference_logits=logits + 0.3 * rng.normal(size=logits.shape))
    return d


def kto_cfg(loss_type="kto", beta=0.1, wd=1.0, wu=1.0):
    return core.config("KtoConfig", loss_type=loss_type, beta=beta, desirable_weight=wd, undesirable_weight=wu)


def prm_batch(rng, b=2, t=6, v=7, placeholder=6, reward_ids=(3, 5), soft=False):
    inputs = rng.integers(0, 6, size=(b, t))
    inputs[:, [1, 3, 5]] = placeholder
    inputs[1, 5] = 0  # one fewer scored step
    logits = rng.normal(size=(b, t, v)) * 2
    if soft:
        labels = rng.random((b, t))
    elif reward_ids is None:
        labels = rng.integers(0, v, size=(b, t))
        labels[0, 3] = -100
    else:
        labels = np.asarray(reward_ids)[rng.integers(0, len(reward_ids), size=(b, t))]
        labels[0, 3] = -100  # ignored by the loss, counted (as wrong) by acc
    return dict(placeholder_token_id=placeholder, reward_token_ids=None if reward_ids is None else list(reward_ids),
                inputs=inputs, logits=logits, labels=labels)


CASES = {
    "preference::paired::paired_loss": [
        lambda r: dict(cfg=paired_cfg(), terms=[term("Sigmoid")], **pairs(r)),
        lambda r: dict(cfg=paired_cfg("openrlhf", 0.5, label_smoothing=0.1),
                       terms=[term("Sigmoid"), term("Hinge", 0.5)], pair_weight=r.random(5), **pairs(r)),
        lambda r: dict(cfg=paired_cfg(), terms=[term("Ipo")],
                       chosen_len=r.integers(1, 9, 5).astype(float), rejected_len=r.integers(1, 9, 5).astype(float),
                       **pairs(r)),
        # SimPO: reference-free, target margin, per-token means
        lambda r: dict(cfg=paired_cfg("torchtune", 2.0, target_margin=0.5, label_smoothing=0.1),
                       terms=[term("Sigmoid")], **pairs(r, reference=False)),
        # a single pair, a non-reverse-KL divergence
        lambda r: dict(cfg=paired_cfg(divergence={"Alpha": 0.5}), terms=[term("Sigmoid")], **pairs(r, b=1)),
        # the SFT term mixed with sigmoid (TRL loss_type=["sigmoid", "sft"])
        lambda r: dict(cfg=paired_cfg(), terms=[term("Sigmoid", 0.8), term("Sft", 0.2)],
                       sft_chosen_logps=-np.abs(r.normal(size=4)) * 6, sft_tokens=11.0, **pairs(r, b=4)),
    ],
    "preference::paired::implicit_rewards": [
        lambda r: dict(beta=0.1, policy=r.normal(size=5), reference=r.normal(size=5)),
        lambda r: dict(beta=2.0, policy=r.normal(size=3)),
    ],
    "preference::paired::dpo_from_logits": [
        lambda r: dict(cfg=paired_cfg(), terms=[term("Sigmoid")], **dpo_batch(r)),
        lambda r: dict(cfg=paired_cfg(beta=0.5, label_smoothing=0.1), terms=[term("Sigmoid"), term("Sft", 0.3)],
                       **dpo_batch(r, reference="logits")),
        lambda r: dict(cfg=paired_cfg(), terms=[term("Ipo")], ld_alpha=0.5, **dpo_batch(r, b=3)),
        lambda r: dict(cfg=paired_cfg(divergence="JsDivergence"), terms=[term("Hinge"), term("Robust", 0.5)],
                       **dpo_batch(r, b=1)),
        # WPO: the pair weights are detached functions of the logits, so the
        # gradient is by design not the derivative of the value
        # (test_dpo_from_logits_wpo_matches_trl checks it against TRL).
        lambda r: dict(cfg=paired_cfg(), terms=[term("Sigmoid")], use_weighting=True, _check={"fd": False},
                       **dpo_batch(r)),
    ],
    "preference::paired::pairwise_reward_loss": [
        lambda r: dict(chosen=r.normal(size=6), rejected=r.normal(size=6)),
        lambda r: dict(chosen=r.normal(size=6), rejected=r.normal(size=6), margin=r.random(6), centering=0.01),
        lambda r: dict(chosen=r.normal(size=1), rejected=r.normal(size=1), centering=0.5),
    ],
    "preference::unpaired::kto_kl_baseline": [
        lambda r: dict(policy_kl_logps=-r.random(5) * 3, ref_kl_logps=-r.random(5) * 3),
        lambda r: dict(policy_kl_logps=-r.random(4) - 3.0, ref_kl_logps=-r.random(4)),  # clamped at 0
        lambda r: dict(policy_kl_logps=np.zeros(0), ref_kl_logps=np.zeros(0)),  # empty: 0
    ],
    "preference::unpaired::kto_loss": [
        lambda r: dict(cfg=kto_cfg(), kl=0.2, logratios=r.normal(size=6), desirable=r.random(6) > 0.5),
        lambda r: dict(cfg=kto_cfg("apo_zero_unpaired", 0.5, 1.33, 0.7), logratios=r.normal(size=5),
                       desirable=np.array([True, False, True, True, False])),
        lambda r: dict(cfg=kto_cfg(beta=1.0, wd=0.8), kl=0.0, logratios=r.normal(size=3),
                       desirable=np.ones(3, bool)),  # only desirable examples
        lambda r: dict(cfg=kto_cfg(), logratios=np.zeros(0), desirable=np.zeros(0, bool)),  # empty: 0
    ],
    "preference::unpaired::vanilla_kto_loss": [
        lambda r: dict(beta=0.1, chosen_logratios=r.normal(size=4) + 0.5, rejected_logratios=r.normal(size=3) + 0.5),
        lambda r: dict(beta=2.0, chosen_logratios=r.normal(size=3) - 2.0, rejected_logratios=r.normal(size=5)),
        lambda r: dict(beta=0.5, chosen_logratios=r.normal(size=3), rejected_logratios=np.zeros(0)),  # one side
    ],
    "preference::unpaired::bco_loss": [
        lambda r: dict(beta=0.1, do_train=False, running=core.config("RunningMoments", mean=0.3, var=0.5),
                       chosen_logratios=r.normal(size=4), rejected_logratios=r.normal(size=3)),
        lambda r: dict(beta=0.5, do_train=False, chosen_logratios=r.normal(size=2),
                       rejected_logratios=np.zeros(0)),
        # do_train: δ folds in this batch but is detached, so the gradient is
        # by design not the derivative of the value
        # (test_bco_loss_is_trls_bco_loss checks it against TRL).
        lambda r: dict(beta=0.1, running=core.config("RunningMoments", mean=-0.2, var=2.0, count=16.0),
                       chosen_logratios=r.normal(size=4), rejected_logratios=r.normal(size=4),
                       _check={"fd": False}),
    ],
    "preference::unpaired::RunningMoments::update": [
        lambda r: dict(xs=r.normal(size=6)),
        lambda r: dict(running=core.config("RunningMoments", mean=0.3, var=0.5, std=0.7, count=16.0),
                       xs=r.normal(size=3)),
        lambda r: dict(xs=np.zeros(0)),  # empty: unchanged
    ],
    "preference::unpaired::prm_hard_loss": [
        lambda r: prm_batch(r),
        lambda r: prm_batch(r, reward_ids=(4, 1)),
        lambda r: prm_batch(r, reward_ids=None),
        lambda r: {**prm_batch(r), "placeholder_token_id": 99},  # nothing scored: 0
    ],
    "preference::unpaired::prm_soft_loss": [
        lambda r: prm_batch(r, soft=True),
        lambda r: prm_batch(r, reward_ids=(4, 1), soft=True),
    ],
    "preference::odds_ratio::cpo_loss": [
        lambda r: dict(cfg=core.config("CpoConfig", preset="trl"),
                       chosen_logps=-np.abs(r.normal(size=5)) * 5, rejected_logps=-np.abs(r.normal(size=5)) * 5),
        lambda r: dict(cfg=core.config("CpoConfig", preset="trl", loss_type="hinge", beta=0.5),
                       chosen_logps=-np.abs(r.normal(size=5)) * 5, rejected_logps=-np.abs(r.normal(size=5)) * 5),
        lambda r: dict(cfg=core.config("CpoConfig", preset="trl", loss_type="ipo", beta=0.5),
                       chosen_logps=-r.random(4), rejected_logps=-r.random(4)),
        lambda r: dict(cfg=core.config("CpoConfig", preset="trl", loss_type="simpo", beta=2.0, simpo_gamma=1.0,
                                       label_smoothing=0.1, alpha=0.25),
                       chosen_logps=-r.random(4), rejected_logps=-r.random(4)),
        lambda r: dict(cfg=core.config("CpoConfig", preset="trl", alpha=-0.3, label_smoothing=0.2),
                       chosen_logps=-r.random(1) * 3, rejected_logps=-r.random(1) * 3),
    ],
    "preference::odds_ratio::odds_ratio_loss": [
        lambda r: dict(beta=0.1, chosen_logps=-r.random(5) * 2 - 0.05, rejected_logps=-r.random(5) * 2 - 0.05),
        lambda r: dict(beta=1.0, chosen_logps=-r.random(3) * 0.5 - 0.01, rejected_logps=-r.random(3) * 4 - 1.0),
        lambda r: dict(beta=0.5, chosen_logps=np.zeros(0), rejected_logps=np.zeros(0)),  # empty: means 0
    ],
    "preference::odds_ratio::shifted_sequence_logps": [
        lambda r: lm_batch(r),
        lambda r: {**lm_batch(r, b=4), "average": True},
        lambda r: {**lm_batch(r, empty_row=False, holes=False), "average": True},
    ],
    "preference::odds_ratio::shifted_mean_nll": [
        lambda r: lm_batch(r),
        lambda r: lm_batch(r, b=2, t=4, v=3, empty_row=False),
        lambda r: {**lm_batch(r, b=2), "valid": np.zeros((2, 6), bool)},  # nothing counted: 0
    ],
}


@pytest.mark.parametrize("path,index", params(CASES))
def test_case(path, index):
    run_cases(CASES, path, index)


def test_unread_logits_may_hold_nan():
    """Positions that do not count (and the last logits row) are never read."""
    r = np.random.default_rng(3)
    kw = lm_batch(r)
    kw["logits"][:, -1, :] = np.nan
    kw["logits"][0] = np.nan  # the empty row
    for path, out in [("preference::odds_ratio::shifted_sequence_logps", "logps"),
                      ("preference::odds_ratio::shifted_mean_nll", "nll")]:
        cots = {"logps": np.ones(3)} if out == "logps" else {"nll": np.asarray(1.0)}
        res = core.call(path, cotangents=cots, **kw)
        assert np.all(np.isfinite(res[out]))
        assert np.all(res.grads["logits"][:, -1, :] == 0) and np.all(res.grads["logits"][0] == 0)


# ---------------------------------------------------------------------------
# cross-checks against the peer-named ops
# ---------------------------------------------------------------------------

TIGHT = dict(rtol=1e-12, atol=1e-14)


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


def _peer_pairs(p):
    return dict(policy_chosen_logps=p["policy_chosen"], policy_rejected_logps=p["policy_rejected"],
                **({"reference_chosen_logps": p["reference_chosen"],
                    "reference_rejected_logps": p["reference_rejected"]} if "reference_chosen" in p else {}))


@pytest.mark.parametrize("ipo", [False, True])
def test_paired_loss_and_implicit_rewards_are_openrlhfs_dpo_loss(ipo):
    r = np.random.default_rng(6)
    p = pairs(r)
    cfg = paired_cfg("openrlhf", 0.5, label_smoothing=0.1)
    mine = core.call("preference::paired::paired_loss", cfg=cfg, terms=[term("Ipo" if ipo else "Sigmoid")],
                     cotangents={"loss": np.asarray(1.7)}, **p)
    peer = ops.call("openrlhf.dpo_loss", beta=0.5, label_smoothing=0.1, ipo=ipo, cotangents={"loss": 1.7},
                    **_peer_pairs(p))
    np.testing.assert_allclose(mine["loss"], peer["loss"], **TIGHT)
    np.testing.assert_allclose(mine.grads["policy_chosen"], peer.grads["policy_chosen_logps"], **TIGHT)
    np.testing.assert_allclose(mine.grads["policy_rejected"], peer.grads["policy_rejected_logps"], **TIGHT)
    for side in ("chosen", "rejected"):
        rew = core.preference.paired.implicit_rewards(beta=0.5, policy=p[f"policy_{side}"],
                                                      reference=p[f"reference_{side}"])
        np.testing.assert_allclose(rew["rewards"], peer[f"{side}_rewards"], **TIGHT)


@pytest.mark.parametrize("peer_op", ["torchtune.dpo_loss", "torchtune.simpo_loss"])
def test_paired_loss_per_pair_is_torchtunes(peer_op):
    r = np.random.default_rng(7)
    simpo = peer_op.endswith("simpo_loss")
    p = pairs(r, reference=not simpo)
    beta = 2.0 if simpo else 0.1
    cfg = paired_cfg("torchtune", beta, label_smoothing=0.1, **({"target_margin": 0.5} if simpo else {}))
    cot = r.normal(size=5)
    mine = core.call("preference::paired::paired_loss", cfg=cfg, terms=[term("Sigmoid")],
                     cotangents={"per_pair": cot}, **p)
    kw = dict(beta=beta, label_smoothing=0.1, **({"gamma": 0.5} if simpo else {}))
    peer = ops.call(peer_op, cotangents={"losses": cot}, **kw, **_peer_pairs(p))
    np.testing.assert_allclose(mine["per_pair"], peer["losses"], **TIGHT)
    np.testing.assert_allclose(mine.grads["policy_chosen"], peer.grads["policy_chosen_logps"], **TIGHT)
    np.testing.assert_allclose(mine.grads["policy_rejected"], peer.grads["policy_rejected_logps"], **TIGHT)
    rew = core.preference.paired.implicit_rewards(beta=beta, policy=p["policy_chosen"],
                                                  reference=p.get("reference_chosen"))
    np.testing.assert_allclose(rew["rewards"], peer["chosen_rewards"], **TIGHT)


def _trl_dpo(kw, loss_type, **params):
    d = dict(kw)
    ref = {}
    if "reference_logits" in d:
        ref = dict(ref_logits=d.pop("reference_logits"), precompute_ref_log_probs=False)
    else:
        ref = dict(ref_chosen_logps=d.pop("reference_chosen"), ref_rejected_logps=d.pop("reference_rejected"),
                   precompute_ref_log_probs=True)
    base = dict(beta=0.1, loss_weights=None, label_smoothing=0.0, f_divergence_type="reverse_kl",
                f_alpha_divergence_coef=1.0, ld_alpha=None, use_weighting=False, discopop_tau=0.05)
    base.update(params)
    return ops.call("trl.dpo_loss", loss_type=loss_type, attention_mask=np.ones_like(d["completion_mask"]),
                    cotangents={"loss": 1.0}, **base, **ref, **d)


@pytest.mark.parametrize("variant", ["precomputed", "logits", "ld_alpha", "multi"])
def test_dpo_from_logits_is_trls_dpo_loss(variant):
    r = np.random.default_rng(8)
    kw = dpo_batch(r, b=3, reference="logits" if variant == "logits" else "precomputed")
    cfg, terms, extra, trl_kw = paired_cfg(), [term("Sigmoid")], {}, {}
    if variant == "ld_alpha":
        extra, trl_kw = {"ld_alpha": 0.5}, {"ld_alpha": 0.5}
    if variant == "multi":
        cfg = paired_cfg(beta=0.5, label_smoothing=0.1)
        terms = [term("Sigmoid", 0.8), term("Hinge", 0.2)]
        trl_kw = dict(beta=0.5, label_smoothing=0.1, loss_weights=[0.8, 0.2])
    mine = core.call("preference::paired::dpo_from_logits", cfg=cfg, terms=terms, grad=True, **extra, **kw)
    peer = _trl_dpo(kw, ["sigmoid", "hinge"] if variant == "multi" else ["sigmoid"], **trl_kw)
    np.testing.assert_allclose(mine["loss"], peer["loss"], **TIGHT)
    np.testing.assert_allclose(mine.grads["logits"], peer.grads["logits"], **TIGHT)
    for m, p in [("reward_chosen", "rewards/chosen"), ("margin", "rewards/margins"), ("accuracy", "rewards/accuracies"),
                 ("logps_chosen", "logps/chosen"), ("entropy", "entropy"), ("logits_chosen", "logits/chosen"),
                 ("token_accuracy", "mean_token_accuracy")]:
        np.testing.assert_allclose(mine[m], peer[p], **TIGHT, err_msg=m)


def test_dpo_from_logits_wpo_matches_trl():
    """WPO's weights carry no gradient (the case sets fd=False): the
    gradient is TRL's, whose weights are computed under no_grad."""
    r = np.random.default_rng(9)
    kw = dpo_batch(r)
    mine = core.call("preference::paired::dpo_from_logits", cfg=paired_cfg(), terms=[term("Sigmoid")],
                     use_weighting=True, grad=True, **kw)
    peer = _trl_dpo(kw, ["sigmoid"], use_weighting=True)
    np.testing.assert_allclose(mine["loss"], peer["loss"], **TIGHT)
    np.testing.assert_allclose(mine.grads["logits"], peer.grads["logits"], **TIGHT)
    plain = core.call("preference::paired::dpo_from_logits", cfg=paired_cfg(), terms=[term("Sigmoid")], **kw)
    assert mine["loss"] != plain["loss"]


def test_pairwise_reward_loss_is_openrlhfs_and_trls():
    r = np.random.default_rng(10)
    c, j, m = r.normal(size=6), r.normal(size=6), r.random(6)
    mine = core.call("preference::paired::pairwise_reward_loss", chosen=c, rejected=j, margin=m,
                     cotangents={"loss": np.asarray(1.3)})
    peer = ops.call("openrlhf.pairwise_loss", chosen_reward=c, reject_reward=j, margin=m, cotangents={"loss": 1.3})
    np.testing.assert_allclose(mine["loss"], peer["loss"], **TIGHT)
    np.testing.assert_allclose(mine.grads["chosen"], peer.grads["chosen_reward"], **TIGHT)
    np.testing.assert_allclose(mine.grads["rejected"], peer.grads["reject_reward"], **TIGHT)

    mine = core.call("preference::paired::pairwise_reward_loss", chosen=c, rejected=j, margin=m, centering=0.01,
                     grad=True)
    peer = ops.call("trl.reward_loss", logits=np.concatenate([c, j])[:, None], attention_mask=np.ones((12, 3), bool),
                    margin=m, center_rewards_coefficient=0.01, cotangents={"loss": 1.0})
    np.testing.assert_allclose(mine["loss"], peer["loss"], **TIGHT)
    g = peer.grads["logits"].reshape(-1)
    np.testing.assert_allclose(mine.grads["chosen"], g[:6], **TIGHT)
    np.testing.assert_allclose(mine.grads["rejected"], g[6:], **TIGHT)
    for k in ("min_reward", "mean_reward", "max_reward", "accuracy", "margin"):
        np.testing.assert_allclose(mine[k], peer[k], **TIGHT, err_msg=k)


def test_kto_loss_and_kl_baseline_are_openrlhfs_kto_loss():
    r = np.random.default_rng(11)
    pc, pr, rc, rr = (-np.abs(r.normal(size=n)) * 3 for n in (4, 3, 4, 3))
    pkl, rkl = -np.abs(r.normal(size=7)) * 3, -np.abs(r.normal(size=7)) * 3
    kl = core.preference.unpaired.kto_kl_baseline(policy_kl_logps=pkl, ref_kl_logps=rkl)["kl"]
    lr = np.concatenate([pc - rc, pr - rr])
    desirable = np.arange(7) < 4
    mine = core.call("preference::unpaired::kto_loss", cfg=kto_cfg(beta=0.5, wd=1.33, wu=0.7), kl=float(kl),
                     logratios=lr, desirable=desirable, cotangents={"loss": np.asarray(0.9)})
    peer = ops.call("openrlhf.kto_loss", beta=0.5, desirable_weight=1.33, undesirable_weight=0.7, world_size=1,
                    policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc,
                    reference_rejected_logps=rr, policy_KL_logps=pkl, reference_KL_logps=rkl,
                    cotangents={"losses": 0.9})
    np.testing.assert_allclose(kl, peer["KL"], **TIGHT)
    np.testing.assert_allclose(mine["loss"], peer["losses"], **TIGHT)
    np.testing.assert_allclose(mine.grads["logratios"][:4], peer.grads["policy_chosen_logps"], **TIGHT)
    np.testing.assert_allclose(mine.grads["logratios"][4:], peer.grads["policy_rejected_logps"], **TIGHT)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_shifted_logps_and_kto_compose_to_trls_kto_loss(loss_type):
    """shifted_sequence_logps → kto_kl_baseline → kto_loss, and back through
    shifted_sequence_logps' VJP, is TRL's KTOTrainer step from logits."""
    r = np.random.default_rng(12)
    n, t, v = 4, 6, 5
    lb, klb = lm_batch(r, b=n, t=t, v=v, empty_row=False), lm_batch(r, b=n, t=t, v=v, empty_row=False)
    ids, kl_ids = np.where(lb["valid"], lb["targets"], 0), np.where(klb["valid"], klb["targets"], 0)
    label = np.array([True, False, True, False])
    ref_lp, ref_kl = -np.abs(r.normal(size=n)) * 3, -np.abs(r.normal(size=n)) * 3
    cfg = kto_cfg(loss_type, 0.5, 1.33, 0.7)

    lp = core.preference.odds_ratio.shifted_sequence_logps(logits=lb["logits"], targets=ids, valid=lb["valid"])
    if loss_type == "kto":
        kl_lp = core.preference.odds_ratio.shifted_sequence_logps(logits=klb["logits"], targets=kl_ids,
                                                                  valid=klb["valid"])["logps"]
        kl = float(core.preference.unpaired.kto_kl_baseline(policy_kl_logps=kl_lp, ref_kl_logps=ref_kl)["kl"])
    else:
        kl = 0.0
    loss = core.call("preference::unpaired::kto_loss", cfg=cfg, kl=kl, logratios=lp["logps"] - ref_lp,
                     desirable=label, grad=True)
    back = core.call("preference::odds_ratio::shifted_sequence_logps", logits=lb["logits"], targets=ids,
                     valid=lb["valid"], cotangents={"logps": loss.grads["logratios"]})

    peer = ops.call("trl.kto_loss", loss_type=loss_type, beta=0.5, desirable_weight=1.33, undesirable_weight=0.7,
                    precompute_ref_log_probs=True, logits=lb["logits"], input_ids=ids,
                    attention_mask=np.ones((n, t), bool), completion_mask=lb["valid"], label=label,
                    KL_logits=klb["logits"], KL_input_ids=kl_ids, KL_attention_mask=np.ones((n, t), bool),
                    KL_completion_mask=klb["valid"], ref_logps=ref_lp, ref_KL_logps=ref_kl,
                    cotangents={"loss": 1.0})
    np.testing.assert_allclose(loss["loss"], peer["loss"], **TIGHT)
    np.testing.assert_allclose(kl, peer["kl"], **TIGHT)
    np.testing.assert_allclose(back.grads["logits"], peer.grads["logits"], **TIGHT)


def test_vanilla_kto_loss_is_openrlhfs():
    r = np.random.default_rng(13)
    pc, pr, rc, rr = (-np.abs(r.normal(size=n)) * 3 for n in (4, 3, 4, 3))
    mine = core.call("preference::unpaired::vanilla_kto_loss", beta=0.5, chosen_logratios=pc - rc,
                     rejected_logratios=pr - rr, cotangents={"loss": np.asarray(1.1)})
    peer = ops.call("openrlhf.vanilla_kto_loss", beta=0.5, policy_chosen_logps=pc, policy_rejected_logps=pr,
                    reference_chosen_logps=rc, reference_rejected_logps=rr, cotangents={"losses": 1.1})
    np.testing.assert_allclose(mine["loss"], peer["losses"], **TIGHT)
    np.testing.assert_allclose(mine.grads["chosen_logratios"], peer.grads["policy_chosen_logps"], **TIGHT)
    np.testing.assert_allclose(mine.grads["rejected_logratios"], peer.grads["policy_rejected_logps"], **TIGHT)


@pytest.mark.parametrize("do_train", [True, False])
def test_bco_loss_is_trls_bco_loss(do_train):
    """BCO's δ is detached, also when do_train folds this batch into it: the
    gradient is TRL's (explicit test for the fd=False case)."""
    r = np.random.default_rng(14)
    pc, pr, rc, rr = (-np.abs(r.normal(size=n)) * 3 for n in (4, 3, 4, 3))
    mean, var, count = -0.2, 2.0, 16.0
    running = core.config("RunningMoments", mean=mean, var=var, std=float(np.sqrt(var)), count=count)
    cots = {"losses": r.normal(size=7), "chosen_rewards": r.normal(size=4), "rejected_rewards": r.normal(size=3)}
    mine = core.call("preference::unpaired::bco_loss", beta=0.5, do_train=do_train, running=running,
                     chosen_logratios=pc - rc, rejected_logratios=pr - rr, cotangents=cots)
    peer = ops.call("trl.bco_loss", beta=0.5, do_train=do_train, **{"running.mean": mean, "running.var": var,
                    "running.count": count}, policy_chosen_logps=pc, policy_rejected_logps=pr,
                    reference_chosen_logps=rc, reference_rejected_logps=rr, cotangents=cots)
    for k in ("losses", "chosen_rewards", "rejected_rewards"):
        np.testing.assert_allclose(mine[k], peer[k], **TIGHT, err_msg=k)
    for k in ("delta", "running.mean", "running.var", "running.std", "running.count"):
        np.testing.assert_allclose(mine[k.replace(".", "_")], peer[k], **TIGHT, err_msg=k)
    np.testing.assert_allclose(mine.grads["chosen_logratios"], peer.grads["policy_chosen_logps"], **TIGHT)
    np.testing.assert_allclose(mine.grads["rejected_logratios"], peer.grads["policy_rejected_logps"], **TIGHT)
    # the state threads through RunningMoments::update the same way
    upd = core.call("preference::unpaired::RunningMoments::update", running=running,
                    xs=np.concatenate([mine["chosen_rewards"], mine["rejected_rewards"]]))
    if do_train:
        for k in ("mean", "var", "std", "count"):
            np.testing.assert_allclose(upd[k], mine["running_" + k], **TIGHT, err_msg=k)


@pytest.mark.parametrize("reward_ids,soft", [((3, 5), False), (None, False), ((4, 1), False), ((3, 5), True)])
def test_prm_losses_are_openrlhfs_prm_loss(reward_ids, soft):
    r = np.random.default_rng(15)
    kw = prm_batch(r, reward_ids=reward_ids, soft=soft, placeholder=6)
    path = "preference::unpaired::prm_soft_loss" if soft else "preference::unpaired::prm_hard_loss"
    mine = core.call(path, cotangents={"loss": np.asarray(0.7)}, **kw)
    peer = ops.call("openrlhf.prm_loss", placeholder_token_id=6,
                    reward_token_ids=None if reward_ids is None else list(reward_ids), return_acc=True,
                    inputs=kw["inputs"], logits=kw["logits"], labels=kw["labels"], cotangents={"loss": 0.7})
    np.testing.assert_allclose(mine["loss"], peer["loss"], **TIGHT)
    np.testing.assert_allclose(mine["acc"], peer["acc"], **TIGHT)
    np.testing.assert_allclose(mine.grads["logits"], peer.grads["logits"], **TIGHT)


@pytest.mark.parametrize("loss_type,alpha", [("sigmoid", 0.0), ("hinge", 0.25), ("ipo", 0.0), ("simpo", -0.3)])
def test_cpo_loss_is_trls(loss_type, alpha):
    r = np.random.default_rng(16)
    c, j = -r.random(5) * 2, -r.random(5) * 2
    cfg = core.config("CpoConfig", preset="trl", loss_type=loss_type, beta=0.5, label_smoothing=0.1,
                      simpo_gamma=1.0, alpha=alpha)
    cot = r.normal(size=5)
    mine = core.call("preference::odds_ratio::cpo_loss", cfg=cfg, chosen_logps=c, rejected_logps=j,
                     cotangents={"losses": cot})
    peer = ops.call("trl.cpo_loss", loss_type=loss_type, beta=0.5, label_smoothing=0.1, simpo_gamma=1.0,
                    alpha=alpha, policy_chosen_logps=c, policy_rejected_logps=j, cotangents={"losses": cot})
    for k in ("losses", "chosen_rewards", "rejected_rewards"):
        np.testing.assert_allclose(mine[k], peer[k], **TIGHT, err_msg=k)
    np.testing.assert_allclose(mine.grads["chosen_logps"], peer.grads["policy_chosen_logps"], **TIGHT)
    np.testing.assert_allclose(mine.grads["rejected_logps"], peer.grads["policy_rejected_logps"], **TIGHT)


def test_odds_ratio_loss_is_trls():
    r = np.random.default_rng(17)
    c, j = -r.random(5) * 2 - 0.05, -r.random(5) * 2 - 0.05
    cots = {"losses": r.normal(size=5), "log_odds_ratio": np.asarray(0.4), "log_odds_chosen": np.asarray(-0.6)}
    mine = core.call("preference::odds_ratio::odds_ratio_loss", beta=0.5, chosen_logps=c, rejected_logps=j,
                     cotangents=cots)
    peer = ops.call("trl.odds_ratio_loss", beta=0.5, policy_chosen_logps=c, policy_rejected_logps=j,
                    cotangents=cots)
    for k in ("losses", "chosen_rewards", "rejected_rewards", "log_odds_ratio", "log_odds_chosen"):
        np.testing.assert_allclose(mine[k], peer[k], **TIGHT, err_msg=k)
    np.testing.assert_allclose(mine.grads["chosen_logps"], peer.grads["policy_chosen_logps"], **TIGHT)
    np.testing.assert_allclose(mine.grads["rejected_logps"], peer.grads["policy_rejected_logps"], **TIGHT)


def test_shifted_ops_and_odds_ratio_compose_to_trls_orpo_step():
    """ORPO from logits: loss = shifted_mean_nll(chosen rows, input ids,
    attention) − mean(odds_ratio_loss(shifted_sequence_logps(average))),
    values and logits gradient equal to TRL ORPOTrainer.get_batch_loss_metrics."""
    r = np.random.default_rng(18)
    b, t, v = 2, 6, 5
    logits = r.normal(size=(2 * b, t, v))
    ids = r.integers(0, v, size=(2 * b, t))
    attn = np.ones((2 * b, t), bool)
    attn[1, -1] = attn[3, -2:] = False
    labels = np.where(attn, ids, -100)
    labels[:, :2] = -100  # the prompt
    valid = labels != -100
    seq = core.call("preference::odds_ratio::shifted_sequence_logps", logits=logits, targets=labels, valid=valid,
                    average=True)
    orpo = core.call("preference::odds_ratio::odds_ratio_loss", beta=0.5, chosen_logps=seq["logps"][:b],
                     rejected_logps=seq["logps"][b:], cotangents={"losses": np.full(b, -1.0 / b)})
    nll = core.call("preference::odds_ratio::shifted_mean_nll", logits=logits[:b], targets=ids[:b], valid=attn[:b],
                    grad=True)
    back = core.call("preference::odds_ratio::shifted_sequence_logps", logits=logits, targets=labels, valid=valid,
                     average=True, cotangents={"logps": np.concatenate([orpo.grads["chosen_logps"],
                                                                         orpo.grads["rejected_logps"]])})
    grad = back.grads["logits"].copy()
    grad[:b] += nll.grads["logits"]
    peer = ops.call("trl.orpo_batch_loss_metrics", beta=0.5, chosen_input_ids=ids[:b], chosen_attention_mask=attn[:b],
                    chosen_labels=labels[:b], rejected_input_ids=ids[b:], rejected_attention_mask=attn[b:],
                    rejected_labels=labels[b:], logits=logits, cotangents={"loss": 1.0})
    np.testing.assert_allclose(nll["nll"], peer["nll_loss"], **TIGHT)
    np.testing.assert_allclose(nll["nll"] - np.mean(orpo["losses"]), peer["loss"], **TIGHT)
    np.testing.assert_allclose(orpo["log_odds_ratio"], peer["log_odds_ratio"], **TIGHT)
    np.testing.assert_allclose(grad, peer.grads["logits"], **TIGHT)


def test_configs_run_the_core_validation():
    with pytest.raises(ValueError, match="beta"):
        kto_cfg(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        core.config("CpoConfig", preset="trl", label_smoothing=0.7)
    assert core.config("CpoConfig", preset="openrlhf") == core.config("CpoConfig", preset="trl")
    assert core.config("RunningMoments") == {"mean": 0.0, "var": 1.0, "std": 1.0, "count": 1e-24}
    with pytest.raises(ValueError, match="sft"):
        core.call("preference::paired::paired_loss", cfg=paired_cfg(), terms=[term("Sft")], **pairs(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="sft_tokens"):
        core.call("preference::paired::paired_loss", cfg=paired_cfg(), terms=[term("Sigmoid")],
                  sft_chosen_logps=np.zeros(5), **pairs(np.random.default_rng(0)))


def test_paired_loss_sft_term_is_the_chosen_nll():
    r = np.random.default_rng(19)
    p, sft = pairs(r, b=4), -np.abs(r.normal(size=4)) * 6
    both = core.call("preference::paired::paired_loss", cfg=paired_cfg(), terms=[term("Sigmoid"), term("Sft", 0.5)],
                     sft_chosen_logps=sft, sft_tokens=10.0, grad=True, **p)
    only = core.call("preference::paired::paired_loss", cfg=paired_cfg(), terms=[term("Sigmoid")], grad=True, **p)
    np.testing.assert_allclose(both["loss"], only["loss"] + 0.5 * (-sft.sum() / 10.0), **TIGHT)
    np.testing.assert_allclose(both.grads["sft_chosen_logps"], np.full(4, -0.5 / 10.0), **TIGHT)
    np.testing.assert_allclose(both.grads["policy_chosen"], only.grads["policy_chosen"], **TIGHT)


def test_hand_written_configs_are_validated_by_the_op():
    bad_kto = {"loss_type": "kto", "beta": -1.0, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    with pytest.raises(ValueError, match="beta"):
        core.call("preference::unpaired::kto_loss", cfg=bad_kto, logratios=np.zeros(2), desirable=np.ones(2, bool))
    bad_cpo = {**core.config("CpoConfig", preset="trl"), "cpo_alpha": -1.0}
    with pytest.raises(ValueError, match="cpo_alpha"):
        core.call("preference::odds_ratio::cpo_loss", cfg=bad_cpo, chosen_logps=np.zeros(2), rejected_logps=np.zeros(2))
