"""Cases for ``posttrain.ops.core``'s kl, value, aggregate, stats, logits,
sequence, distill and fused modules (see ``core_check``), and cross-checks
against the peer-named ops running the same core function."""

import numpy as np
import pytest

from posttrain import ops
from posttrain.ops import core

from core_check import params, run_cases

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AXIS_TO_REDUCE = {None: "All", 0: "Columns", -1: "Rows", 1: "Rows"}
# where a [3, 6] matrix holds numbers (False: NaN); every row and column keeps two
SOME_NAN = np.array([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 0, 1], [1, 0, 1, 1, 1, 0]], bool)


def kl_inputs(rng, shape=(3, 5)):
    lp = -np.abs(rng.normal(size=shape))
    return dict(log_prob=lp, ref_log_prob=lp + 0.3 * rng.normal(size=shape))


def holey_mask(rng, b=3, t=6, empty_row=True):
    """A [b, t] mask with random holes and (optionally) an all-masked row 0;
    every other row keeps at least two valid entries."""
    mask = rng.random((b, t)) > 0.3
    mask[:, :2] = True
    if empty_row:
        mask[0, :] = False
    return mask


def nan_at(x, mask):
    """``x`` with NaN where ``mask`` is false (masked values must never be read)."""
    x = np.array(x, dtype=np.float64)
    x[~mask] = np.nan
    return x


def kl_reward_inputs(rng, b=3, t=6):
    lp = -np.abs(rng.normal(size=(b, t))) - 0.1
    return dict(scores=rng.normal(size=(b, t)), old_log_prob=lp,
                ref_log_prob=lp + 0.4 * rng.normal(size=(b, t)))


def value_inputs(rng, b=3, t=6):
    old = rng.normal(size=(b, t))
    return dict(values=old + 0.8 * rng.normal(size=(b, t)), old_values=old,
                returns=old + rng.normal(size=(b, t)), mask=holey_mask(rng, b, t))


def ppo_value_inputs(rng, b=3, t=6):
    lp = -np.abs(rng.normal(size=(b, t))) - 0.1
    old_v = rng.normal(size=(b, t))
    return dict(old_log_prob=lp + 0.3 * rng.normal(size=(b, t)), log_prob=lp,
                advantages=rng.normal(size=(b, t)), old_values=old_v,
                values=old_v + 0.5 * rng.normal(size=(b, t)), returns=old_v + rng.normal(size=(b, t)))


def adaptive(coef=0.05, target=0.1, horizon=10000.0):
    return core.config("KlController", Adaptive={"coef": coef, "target": target, "horizon": horizon})


CASES = {
    # ------------------------------------------------------------------ kl
    "kl::KlConfig::estimate_slices": [
        lambda r, e=e: dict(cfg=core.config("KlConfig", preset="verl", estimator=e), **kl_inputs(r))
        for e in ["K1", "Abs", "K2", "K3"]
    ] + [
        lambda r: dict(cfg=core.config("KlConfig", preset="trl", estimator="K3", straight_through=True),
                       _check={"fd": False}, **kl_inputs(r)),
    ],
    "kl::kl_penalized_rewards": [
        # verl apply_kl_penalty: k3 with verl's clamps, masked padding holding NaN
        lambda r: (lambda m: dict(cfg=core.config("KlConfig", preset="verl", estimator="K3"), beta=0.05,
                                  mask=m, **{k: (nan_at(v, m) if k != "scores" else v)
                                             for k, v in kl_reward_inputs(r).items()}))(holey_mask(r)),
        # verl compute_rewards: k1, no mask
        lambda r: dict(cfg=core.config("KlConfig", preset="verl", estimator="K1"), beta=0.2,
                       **kl_reward_inputs(r)),
        lambda r: dict(cfg=core.config("KlConfig", preset="openrlhf", estimator="K2"), beta=-0.1,
                       mask=holey_mask(r, empty_row=False), **kl_reward_inputs(r)),
        lambda r: dict(cfg=core.config("KlConfig", preset="trl", estimator="Abs", straight_through=True),
                       beta=1.0, mask=holey_mask(r, 2, 4), **kl_reward_inputs(r, 2, 4)),
    ],
    "kl::rewards_with_score_at_eos": [
        # LastValid (OpenRLHF), row 0 empty → last column
        lambda r: dict(beta=0.05, scores=r.normal(size=3), kl=0.3 * r.normal(size=(3, 6)),
                       action_mask=holey_mask(r)),
        # Explicit (torchtune valid_score_idxs)
        lambda r: dict(beta=0.2, scores=r.normal(size=4), kl=0.3 * r.normal(size=(4, 5)),
                       valid_score_idxs=np.array([4, 0, 2, 4])),
        # LastColumn, negative β
        lambda r: dict(beta=-0.1, scores=r.normal(size=2), kl=0.3 * r.normal(size=(2, 3))),
        # a single column: every position is the EOS
        lambda r: dict(beta=1.0, scores=r.normal(size=3), kl=r.normal(size=(3, 1)),
                       action_mask=np.array([[True], [False], [True]])),
    ],
    "kl::KlController::update": [
        lambda r: dict(controller=core.config("KlController", Fixed={"coef": 0.05}), current_kl=3.0, n_steps=64),
        lambda r: dict(controller=adaptive(), current_kl=0.2, n_steps=256),  # above target: grows
        lambda r: dict(controller=adaptive(0.2, 6.0, 64.0), current_kl=0.5, n_steps=10),  # error clipped at −0.2
        lambda r: dict(controller=adaptive(0.001, 0.02, 64.0), current_kl=0.021, n_steps=0),
    ],
    # --------------------------------------------------------------- value
    "value::value_loss": [
        lambda r: dict(cfg=core.config("ValueLossConfig", preset="verl"), **value_inputs(r)),
        lambda r: dict(cfg=core.config("ValueLossConfig", preset="trl", agg="seq-mean-token-mean"), **value_inputs(r)),
        lambda r: dict(cfg=core.config("ValueLossConfig", preset="openrlhf", clip_range=None, agg="token-sum"),
                       **value_inputs(r)),
        lambda r: dict(cfg=core.config("ValueLossConfig", preset="verl", agg="seq-mean-token-sum-norm",
                                       norm=core.config("GlobalNorm", dp_size=2.0, global_batch_size=5.0,
                                                        loss_scale_factor=8.0)),
                       **value_inputs(r)),
        # masked values hold NaN
        lambda r: (lambda x: {**x, "values": nan_at(x["values"], x["mask"]),
                              "returns": nan_at(x["returns"], x["mask"]),
                              "cfg": core.config("ValueLossConfig", preset="torchtune", agg="seq-mean-token-sum")})(
            value_inputs(r)),
    ],
    "value::policy_value_loss": [
        lambda r: dict(cfg=core.config("PolicyValueConfig", preset="torchtune"), policy_mask=holey_mask(r),
                       value_mask=holey_mask(r, empty_row=False), **ppo_value_inputs(r)),
        lambda r: dict(cfg=core.config("PolicyValueConfig", preset="torchtune"), **ppo_value_inputs(r)),
        lambda r: dict(cfg=core.config("PolicyValueConfig", epsilon=0.2, value_clip_range=0.5, value_coeff=1.0),
                       policy_mask=holey_mask(r), **ppo_value_inputs(r)),
        lambda r: dict(cfg=core.config("PolicyValueConfig", preset="verl", value_coeff=0.5),
                       value_mask=holey_mask(r), **ppo_value_inputs(r)),
    ],
    # ----------------------------------------------------------- aggregate
    "aggregate::aggregate": [
        lambda r, m=m: (lambda mask: dict(mode=m, loss=nan_at(r.normal(size=(3, 6)), mask), mask=mask))(holey_mask(r))
        for m in AGG_MODES
    ] + [
        lambda r: dict(mode="token-mean", norm=core.config("GlobalNorm", dp_size=4.0, batch_num_tokens=31.0),
                       loss=r.normal(size=(4, 5)), mask=holey_mask(r, 4, 5)),
        lambda r: dict(mode="seq-mean-token-mean", norm=core.config("GlobalNorm", dp_size=2.0, global_batch_size=7.0),
                       loss=r.normal(size=(4, 5)), mask=holey_mask(r, 4, 5)),
        lambda r: dict(mode="seq-mean-token-sum-norm", norm=core.config("GlobalNorm", loss_scale_factor=32.0),
                       loss=r.normal(size=(2, 5)), mask=holey_mask(r, 2, 5, empty_row=False)),
        # nothing valid: 0 and a zero gradient
        lambda r: dict(mode="token-mean", loss=r.normal(size=(2, 3)), mask=np.zeros((2, 3), bool)),
    ],
    "aggregate::aggregation_weights": [
        lambda r, m=m: dict(mode=m, mask=holey_mask(r)) for m in AGG_MODES
    ] + [
        lambda r: dict(mode="seq-mean-token-mean", norm=core.config("GlobalNorm", dp_size=2.0, global_batch_size=5.0),
                       mask=holey_mask(r, 4, 3)),
    ],
    "aggregate::weighted_sum": [
        lambda r: (lambda mask: dict(loss=nan_at(r.normal(size=(3, 6)), mask), mask=mask,
                                     weights=nan_at(r.random((3, 6)), mask)))(holey_mask(r)),
        lambda r: dict(loss=r.normal(size=5), mask=np.ones(5, bool), weights=r.random(5)),
    ],
    "aggregate::masked_sum": [
        lambda r: (lambda mask: dict(x=nan_at(r.normal(size=(3, 6)), mask), mask=mask))(holey_mask(r)),
        lambda r: dict(x=r.normal(size=4), mask=np.zeros(4, bool)),
    ],
    # --------------------------------------------------------------- stats
    "stats::masked_sum": [
        lambda r, red=red: (lambda mask: dict(reduce=red, values=nan_at(r.normal(size=(3, 6)), mask), mask=mask))(
            holey_mask(r))
        for red in ["All", "Rows", "Columns"]
    ] + [
        lambda r: dict(reduce="Rows", values=r.normal(size=(3, 4)), mask=holey_mask(r, 3, 4),
                       weights=r.random((3, 4))),
    ],
    "stats::masked_mean": [
        lambda r, red=red, p=p: (lambda mask: dict(cfg=core.config("MomentConfig", preset=p), reduce=red,
                                                   values=nan_at(r.normal(size=(3, 6)), mask), mask=mask))(
            holey_mask(r))
        for red, p in [("All", "verl"), ("Rows", "torchtune"), ("Columns", "openrlhf"), ("Rows", "trl")]
    ] + [
        lambda r: dict(cfg=core.config("MomentConfig", preset="verl"), reduce="Columns", values=r.normal(size=(4, 3)),
                       mask=holey_mask(r, 4, 3), weights=r.random((4, 3)) + 0.1),
    ],
    "stats::masked_variance": [
        lambda r: (lambda mask: dict(cfg=core.config("MomentConfig", preset="verl"), center=True,
                                     values=nan_at(r.normal(size=(3, 6)), mask), mask=mask))(holey_mask(r)),
        lambda r: dict(cfg=core.config("MomentConfig", preset="torchtune"), center=False,
                       values=r.normal(size=(3, 6)), mask=holey_mask(r)),
        lambda r: dict(cfg=core.config("MomentConfig", preset="openrlhf"), center=True,
                       values=r.normal(size=(3, 6)), mask=holey_mask(r)),
        lambda r: dict(cfg=core.config("MomentConfig", preset="verl", bessel="None"), center=True,
                       values=r.normal(size=7), mask=r.random(7) > 0.3),
    ],
    "stats::masked_whiten": [
        # NaN at masked positions never leaks when they are zeroed
        lambda r: (lambda mask: dict(cfg=core.config("WhitenConfig", preset="verl", zero_masked=True), reduce="All",
                                     values=nan_at(r.normal(size=(3, 6)), mask), mask=mask))(holey_mask(r)),
        lambda r: dict(cfg=core.config("WhitenConfig", preset="verl"), reduce="All",
                       values=r.normal(size=(3, 6)), mask=holey_mask(r)),
        lambda r: dict(cfg=core.config("WhitenConfig", preset="torchtune", keep_mean=True), reduce="All",
                       values=r.normal(size=(3, 6)), mask=holey_mask(r)),
        lambda r: (lambda mask: dict(cfg=core.config("WhitenConfig", preset="openrlhf"), reduce="Rows",
                                     values=nan_at(r.normal(size=(3, 6)), mask), mask=mask))(holey_mask(r)),
        lambda r: dict(cfg=core.config("WhitenConfig", preset="openrlhf"), reduce="Columns",
                       values=r.normal(size=(4, 3)), mask=holey_mask(r, 4, 3)),
        lambda r: dict(cfg=core.config("WhitenConfig", preset="trl"), reduce="Rows",
                       values=r.normal(size=(2, 5)), mask=holey_mask(r, 2, 5, empty_row=False)),
    ],
    "stats::nan_mean": [
        lambda r, red=red: dict(reduce=red, values=nan_at(r.normal(size=(3, 6)), SOME_NAN))
        for red in ["All", "Rows", "Columns"]
    ] + [
        # one non-NaN entry per row
        lambda r: dict(reduce="Rows", values=nan_at(r.normal(size=(2, 3)), np.eye(2, 3, dtype=bool))),
    ],
    "stats::nan_std": [
        lambda r, red=red: dict(reduce=red, values=nan_at(r.normal(size=(4, 6)), holey_mask(r, 4, 6, empty_row=False)))
        for red in ["All", "Rows"]
    ] + [
        lambda r: dict(reduce="Columns", values=nan_at(r.normal(size=(4, 3)),
                                                       np.array([[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0]], bool))),
    ],
    "stats::nan_max": [
        lambda r: dict(values=nan_at(r.normal(size=(3, 6)), holey_mask(r))),
        lambda r: dict(values=r.normal(size=5)),
        # every entry NaN: NaN (TRL nanmax), a legitimately non-finite output
        lambda r: dict(values=np.full(4, np.nan), _check={"finite": False}),
    ],
    "stats::nan_min": [
        lambda r: dict(values=nan_at(r.normal(size=(3, 6)), holey_mask(r))),
        lambda r: dict(values=r.normal(size=5)),
        # every entry NaN: NaN (TRL nanmin), a legitimately non-finite output
        lambda r: dict(values=np.full(4, np.nan), _check={"finite": False}),
    ],
}


@pytest.mark.parametrize("path,index", params(CASES))
def test_case(path, index):
    run_cases(CASES, path, index)


def close(a, b, rtol=1e-12, atol=1e-14):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel(),
                               rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# kl
# ---------------------------------------------------------------------------


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


@pytest.mark.parametrize("verl_name,est,st", [("kl", "K1", False), ("abs", "Abs", False), ("mse", "K2", False),
                                              ("low_var_kl", "K3", False), ("low_var_kl+", "K3", True)])
@pytest.mark.parametrize("ctrl", ["fixed", "adaptive"])
def test_kl_penalized_rewards_is_verls_apply_kl_penalty(verl_name, est, st, ctrl):
    r = np.random.default_rng(11)
    x = kl_reward_inputs(r, 4, 6)
    mask = holey_mask(r, 4, 6)
    cfg = core.config("KlConfig", preset="verl", estimator=est, straight_through=st)
    mine = core.kl.kl_penalized_rewards(cfg=cfg, beta=0.05, mask=mask, **x)
    peer = ops.call("verl.apply_kl_penalty", kl_penalty=verl_name, type=ctrl, kl_coef=0.05, target_kl=0.1,
                    horizon=10000, token_level_scores=x["scores"], old_log_probs=x["old_log_prob"],
                    ref_log_prob=x["ref_log_prob"], response_mask=mask)
    close(mine["rewards"], peer["token_level_rewards"])
    close(mine["mean_kl"], peer["reward_kl_penalty"])
    # the controller is updated after the penalty, with n_steps = batch size
    controller = (core.config("KlController", Fixed={"coef": 0.05}) if ctrl == "fixed"
                  else adaptive(0.05, 0.1, 10000.0))
    upd = core.kl.KlController.update(controller=controller, current_kl=mine["mean_kl"], n_steps=4)
    close(upd["value"], peer["kl_ctrl_value"])


def test_kl_penalized_rewards_without_mask_is_verls_compute_rewards():
    r = np.random.default_rng(12)
    x = kl_reward_inputs(r)
    mine = core.kl.kl_penalized_rewards(cfg=core.config("KlConfig", preset="verl", estimator="K1"), beta=0.2, **x)
    peer = ops.call("verl.compute_rewards", kl_ratio=0.2, token_level_scores=x["scores"],
                    old_log_prob=x["old_log_prob"], ref_log_prob=x["ref_log_prob"])
    close(mine["rewards"], peer["token_level_rewards"])


def test_masked_positions_keep_their_score():
    r = np.random.default_rng(13)
    x = kl_reward_inputs(r)
    mask = holey_mask(r)
    x["old_log_prob"] = nan_at(x["old_log_prob"], mask)
    out = core.kl.kl_penalized_rewards(cfg=core.config("KlConfig", preset="verl", estimator="K3"), beta=0.1,
                                       mask=mask, **x)
    np.testing.assert_array_equal(out["rewards"][~mask], x["scores"][~mask])


def test_rewards_at_last_valid_is_openrlhfs_compute_reward():
    r = np.random.default_rng(14)
    score, kl, mask = r.normal(size=4), 0.3 * r.normal(size=(4, 6)), holey_mask(r, 4, 6)
    cot = r.normal(size=(4, 6))
    mine = core.kl.rewards_with_score_at_eos(beta=0.05, scores=score, kl=kl, action_mask=mask,
                                             cotangents={"rewards": cot})
    peer = ops.call("openrlhf.compute_reward", kl_coef=0.05, reward_clip_range=None, r=score, kl=kl,
                    action_mask=mask, cotangents={"reward": cot})
    close(mine["rewards"], peer["reward"])
    close(mine.grads["kl"], peer.grads["kl"])


@pytest.mark.parametrize("explicit", [True, False])
def test_rewards_at_eos_is_torchtunes_get_rewards_ppo(explicit):
    r = np.random.default_rng(15)
    b, t = 4, 5
    score = r.normal(size=b)
    x = kl_inputs(r, (b, t))
    idx = np.array([4, 0, 2, 3]) if explicit else np.full(b, t - 1)
    # torchtune's kl is k1 = log π − log π_ref, no clamp
    kl = core.kl.KlConfig.estimate_slices(cfg=core.config("KlConfig", preset="torchtune", estimator="K1"), **x)["kl"]
    mine = core.kl.rewards_with_score_at_eos(beta=0.2, scores=score, kl=kl,
                                             valid_score_idxs=idx if explicit else None)
    peer = ops.call("torchtune.get_rewards_ppo", kl_coeff=0.2, scores=score, logprobs=x["log_prob"],
                    ref_logprobs=x["ref_log_prob"], valid_score_idxs=idx)
    close(kl, peer["kl"])
    close(mine["rewards"], peer["total_reward"])


def test_rewards_at_eos_score_gradient_lands_on_the_eos():
    r = np.random.default_rng(16)
    mask = holey_mask(r, 3, 5)
    mask[1, 4] = False
    mask[1, 2] = True
    cot = r.normal(size=(3, 5))
    g = core.kl.rewards_with_score_at_eos(beta=0.3, scores=r.normal(size=3), kl=r.normal(size=(3, 5)),
                                          action_mask=mask, cotangents={"rewards": cot}).grads
    eos = [4 if not mask[i].any() else int(np.flatnonzero(mask[i])[-1]) for i in range(3)]
    close(g["scores"], [cot[i, eos[i]] for i in range(3)])
    close(g["kl"], -0.3 * cot)


def test_rewards_at_eos_refuses_two_positions_and_bad_indices():
    with pytest.raises(ValueError, match="not both"):
        core.kl.rewards_with_score_at_eos(beta=0.1, scores=np.zeros(2), kl=np.zeros((2, 3)),
                                          action_mask=np.ones((2, 3), bool), valid_score_idxs=np.array([0, 1]))
    with pytest.raises(ValueError, match="valid_score_idxs"):
        core.kl.rewards_with_score_at_eos(beta=0.1, scores=np.zeros(2), kl=np.zeros((2, 3)),
                                          valid_score_idxs=np.array([0, 3]))
    with pytest.raises(ValueError, match="scores"):
        core.kl.rewards_with_score_at_eos(beta=0.1, scores=np.zeros(3), kl=np.zeros((2, 3)))


@pytest.mark.parametrize("ctrl", ["fixed", "adaptive"])
def test_kl_controller_update_is_verls_kl_controller(ctrl):
    kl_seq = np.array([0.2, 0.05, 0.11, 3.0, 0.0, 0.1])
    n_seq = np.array([256, 64, 1000, 32, 5000, 1])
    peer = ops.call("verl.kl_controller", type=ctrl, kl_coef=0.05, target_kl=0.1, horizon=10000,
                    current_kl=kl_seq, n_steps=n_seq)
    coef, mine = 0.05, []
    for k, n in zip(kl_seq, n_seq):
        controller = (core.config("KlController", Fixed={"coef": coef}) if ctrl == "fixed"
                      else adaptive(coef, 0.1, 10000.0))
        coef = float(core.kl.KlController.update(controller=controller, current_kl=float(k), n_steps=int(n))["value"])
        mine.append(coef)
    close(mine, peer["kl_coef"])


def test_kl_controller_config_is_validated_and_nan_kl_refused():
    assert core.config("KlController", Fixed={"coef": 0.1}) == {"Fixed": {"coef": 0.1}}
    with pytest.raises(ValueError, match="target_kl"):
        core.config("KlController", Adaptive={"coef": 0.1, "target": 0.0, "horizon": 10.0})
    with pytest.raises(ValueError, match="horizon"):
        core.kl.KlController.update(controller={"Adaptive": {"coef": 0.1, "target": 0.1, "horizon": -1.0}},
                                    current_kl=0.1, n_steps=1)
    with pytest.raises(ValueError, match="n_steps"):
        core.kl.KlController.update(controller=adaptive(1e300, 0.1, 1e-300), current_kl=1.0, n_steps=10**6)


# ---------------------------------------------------------------------------
# value
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", AGG_MODES)
def test_value_loss_is_verls_compute_value_loss(mode):
    r = np.random.default_rng(21)
    x = value_inputs(r, 4, 6)
    norm = dict(dp_size=2, global_batch_size=7, loss_scale_factor=24)
    cfg = core.config("ValueLossConfig", preset="verl", clip_range=0.2, agg=mode,
                      norm=core.config("GlobalNorm", **{k: float(v) for k, v in norm.items()}))
    mine = core.value.value_loss(cfg=cfg, grad=True, **x)
    peer = ops.call("verl.compute_value_loss", cliprange_value=0.2, loss_agg_mode=mode, **norm,
                    vpreds=x["values"], values=x["old_values"], returns=x["returns"], response_mask=x["mask"],
                    cotangents={"vf_loss": np.ones(())})
    close(mine["loss"], peer["vf_loss"])
    close(mine["clipfrac"], peer["vf_clipfrac"])
    close(mine.grads["values"], peer.grads["vpreds"])


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level", [True, False])
def test_value_loss_is_openrlhfs_value_loss(clip_eps, token_level):
    r = np.random.default_rng(22)
    x = value_inputs(r, 4, 6)
    cfg = core.config("ValueLossConfig", preset="openrlhf", clip_range=clip_eps,
                      agg="token-mean" if token_level else "seq-mean-token-mean")
    mine = core.value.value_loss(cfg=cfg, grad=True, **x)
    peer = ops.call("openrlhf.value_loss", clip_eps=clip_eps, token_level_loss=token_level, values=x["values"],
                    old_values=x["old_values"], returns=x["returns"], action_mask=x["mask"],
                    cotangents={"loss": np.ones(())})
    close(mine["loss"], peer["loss"])
    close(mine.grads["values"], peer.grads["values"])


def test_value_loss_preset_and_validation():
    assert core.config("ValueLossConfig", preset="verl")["clip_range"] == 0.5
    assert core.config("ValueLossConfig", preset="trl")["agg"] == "token-mean"
    with pytest.raises(ValueError, match="clip_range"):
        core.config("ValueLossConfig", preset="verl", clip_range=-0.1)
    assert core.config("PolicyValueConfig", preset="torchtune") == {
        "epsilon": 0.1, "value_clip_range": 0.2, "value_coeff": 0.1}
    with pytest.raises(ValueError, match="epsilon"):
        core.config("PolicyValueConfig", preset="torchtune", epsilon=-1.0)


@pytest.mark.parametrize("masks", [True, False])
def test_policy_value_loss_is_torchtunes_ppo_loss(masks):
    r = np.random.default_rng(23)
    x = ppo_value_inputs(r, 4, 6)
    pm, vm = holey_mask(r, 4, 6), holey_mask(r, 4, 6, empty_row=False)
    cfg = core.config("PolicyValueConfig", epsilon=0.2, value_clip_range=0.2, value_coeff=0.5)
    mine = core.value.policy_value_loss(cfg=cfg, grad=True, policy_mask=pm if masks else None,
                                        value_mask=vm if masks else None, **x)
    kw = dict(padding_masks=pm, value_padding_masks=vm) if masks else {}
    peer = ops.call("torchtune.ppo_loss", epsilon=0.2, value_clip_range=0.2, value_coeff=0.5,
                    pi_old_logprobs=x["old_log_prob"], pi_logprobs=x["log_prob"], advantages=x["advantages"],
                    phi_old_values=x["old_values"], phi_values=x["values"], returns=x["returns"],
                    cotangents={"loss": np.ones(())}, **kw)
    for a, b in [("loss", "loss"), ("policy_loss", "policy_loss"), ("value_loss", "value_loss"),
                 ("ratio_mean", "ratios"), ("clipfrac", "clipfrac"), ("approx_kl", "approx_policy_kls")]:
        close(mine[a], peer[b])
    close(mine.grads["log_prob"], peer.grads["pi_logprobs"])
    close(mine.grads["values"], peer.grads["phi_values"])


# ---------------------------------------------------------------------------
# aggregate
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("norm", [{}, dict(dp_size=2, batch_num_tokens=16, global_batch_size=5, loss_scale_factor=20)])
def test_aggregate_is_verls_agg_loss(mode, norm):
    r = np.random.default_rng(31)
    loss, mask = r.normal(size=(4, 6)), holey_mask(r, 4, 6)
    gn = core.config("GlobalNorm", **{k: float(v) for k, v in norm.items()})
    mine = core.aggregate.aggregate(mode=mode, norm=gn, loss=loss, mask=mask, grad=True)
    peer = ops.call("verl.agg_loss", loss_agg_mode=mode, **norm, loss_mat=loss, loss_mask=mask,
                    cotangents={"loss": np.ones(())})
    close(mine["aggregated"], peer["loss"])
    close(mine.grads["loss"], peer.grads["loss_mat"])
    # the gradient is the weight matrix
    w = core.aggregate.aggregation_weights(mode=mode, norm=gn, mask=mask)["weights"]
    close(mine.grads["loss"], w)
    close(core.aggregate.weighted_sum(loss=loss, mask=mask, weights=w)["sum"], mine["aggregated"])


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("norm", [{}, dict(dp_size=2, batch_num_tokens=14.0, global_batch_size=9.0)])
def test_aggregate_is_openrlhfs_aggregate_loss(token_level, norm):
    r = np.random.default_rng(32)
    loss, mask = r.normal(size=(4, 6)), holey_mask(r, 4, 6)
    # OpenRLHF applies dp_size only with the global count of the mode in use
    global_ = "batch_num_tokens" if token_level else "global_batch_size"
    gn = {}
    if norm:
        gn = {"dp_size": float(norm["dp_size"]), global_: norm[global_]}
    mine = core.aggregate.aggregate(mode="token-mean" if token_level else "seq-mean-token-mean",
                                    norm=core.config("GlobalNorm", **gn), loss=loss, mask=mask, grad=True)
    peer = ops.call("openrlhf.aggregate_loss", token_level_loss=token_level, **norm, loss=loss, loss_mask=mask,
                    cotangents={"loss": np.ones(())})
    close(mine["aggregated"], peer["loss"])
    close(mine.grads["loss"], peer.grads["loss"])


def test_aggregate_masked_sum_and_weighted_sum_check_lengths():
    with pytest.raises(ValueError, match="mask"):
        core.aggregate.masked_sum(x=np.zeros(3), mask=np.ones(2, bool))
    with pytest.raises(ValueError, match="weights"):
        core.aggregate.weighted_sum(loss=np.zeros(3), mask=np.ones(3, bool), weights=np.ones(4))
    r = np.random.default_rng(33)
    x, m = r.normal(size=(3, 4)), holey_mask(r, 3, 4)
    close(core.aggregate.masked_sum(x=x, mask=m)["sum"], core.stats.masked_sum(reduce="All", values=x, mask=m)["sum"])


# ---------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("peer", ["verl", "torchtune"])
@pytest.mark.parametrize("axis", [None, 0, -1])
@pytest.mark.parametrize("what", ["sum", "mean"])
def test_masked_sum_and_mean_are_the_peers(peer, axis, what):
    r = np.random.default_rng(41)
    x, mask = r.normal(size=(4, 6)), holey_mask(r, 4, 6)
    mask[:, 3] = False  # an empty column too
    red = AXIS_TO_REDUCE[axis]
    if what == "sum":
        mine = core.stats.masked_sum(reduce=red, values=x, mask=mask, cotangents=None)
    else:
        mine = core.stats.masked_mean(cfg=core.config("MomentConfig", preset=peer), reduce=red, values=x, mask=mask)
    cot = r.normal(size=np.shape(mine[what]))
    mine_g = core.call(f"stats::masked_{what}", reduce=red, values=x, mask=mask, cotangents={what: cot},
                       **({} if what == "sum" else {"cfg": core.config("MomentConfig", preset=peer)}))
    if peer == "verl":
        out = ops.call(f"verl.masked_{what}", axis=axis, values=x, mask=mask, cotangents={"result": cot})
        key, gkey = "result", "values"
    else:
        out = ops.call(f"torchtune.masked_{what}", dim=axis, x=x, mask=mask, cotangents={what: cot})
        key, gkey = what, "x"
    close(mine[what], out[key])
    close(mine_g.grads["values"], out.grads[gkey])


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_variance_is_the_peers(unbiased):
    r = np.random.default_rng(42)
    x, mask = r.normal(size=(4, 6)), holey_mask(r, 4, 6)
    # verl: centers itself, Bessel Exact (or None)
    cfg = core.config("MomentConfig", preset="verl", **({} if unbiased else {"bessel": "None"}))
    mine = core.stats.masked_variance(cfg=cfg, center=True, values=x, mask=mask, grad=True)
    peer = ops.call("verl.masked_var", unbiased=unbiased, values=x, mask=mask, cotangents={"variance": np.ones(())})
    close(mine["variance"], peer["variance"])
    close(mine.grads["values"], peer.grads["values"])
    # torchtune: already centered values, smoothed Bessel (or None)
    cfg = core.config("MomentConfig", preset="torchtune", **({} if unbiased else {"bessel": "None"}))
    mine = core.stats.masked_variance(cfg=cfg, center=False, values=x, mask=mask, grad=True)
    peer = ops.call("torchtune.masked_var", unbiased=unbiased, centered_values=x, mask=mask,
                    cotangents={"var": np.ones(())})
    close(mine["variance"], peer["var"])
    close(mine.grads["values"], peer.grads["centered_values"])


def test_masked_variance_exact_refuses_one_valid_entry():
    with pytest.raises(ValueError, match="two valid"):
        core.stats.masked_variance(cfg=core.config("MomentConfig", preset="verl"), center=True,
                                   values=np.ones(3), mask=np.array([True, False, False]))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_is_verls_and_torchtunes(shift_mean):
    r = np.random.default_rng(43)
    x, mask = r.normal(size=(4, 6)), holey_mask(r, 4, 6)
    cot = r.normal(size=(4, 6))
    # verl: shift_mean=False keeps the mean
    mine = core.stats.masked_whiten(cfg=core.config("WhitenConfig", preset="verl", keep_mean=not shift_mean),
                                    reduce="All", values=x, mask=mask, cotangents={"whitened": cot})
    peer = ops.call("verl.masked_whiten", shift_mean=shift_mean, values=x, mask=mask, cotangents={"whitened": cot})
    close(mine["whitened"], peer["whitened"], rtol=1e-11)
    close(mine.grads["values"], peer.grads["values"], rtol=1e-10, atol=1e-12)
    # torchtune: shift_mean=True keeps the mean
    mine = core.stats.masked_whiten(cfg=core.config("WhitenConfig", preset="torchtune", keep_mean=shift_mean),
                                    reduce="All", values=x, mask=mask, cotangents={"whitened": cot})
    peer = ops.call("torchtune.whiten", shift_mean=shift_mean, x=x, mask=mask, cotangents={"whitened": cot})
    close(mine["whitened"], peer["whitened"], rtol=1e-11)
    close(mine.grads["values"], peer.grads["x"], rtol=1e-10, atol=1e-12)


def test_masked_whiten_rows_is_openrlhfs_masked_normalize():
    r = np.random.default_rng(44)
    x, mask = r.normal(size=(4, 6)), holey_mask(r, 4, 6)
    cot = r.normal(size=(4, 6))
    mine = core.stats.masked_whiten(cfg=core.config("WhitenConfig", preset="openrlhf"), reduce="Rows",
                                    values=x, mask=mask, cotangents={"whitened": cot})
    peer = ops.call("openrlhf.masked_normalize", dim=1, eps=1e-8, tensor=x, mask=mask,
                    cotangents={"normalized": cot})
    close(mine["whitened"], peer["normalized"], rtol=1e-11)
    close(mine.grads["values"], peer.grads["tensor"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dim", [None, 0, 1, -1])
def test_nan_std_is_trls_nanstd(dim):
    r = np.random.default_rng(45)
    x = nan_at(r.normal(size=(4, 6)), np.array([[1, 1, 1, 1, 0, 1], [1, 0, 1, 1, 1, 1],
                                                 [0, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 1]], bool))
    red = AXIS_TO_REDUCE[dim]
    mine = core.stats.nan_std(reduce=red, values=x)
    cot = r.normal(size=np.shape(mine["std"]))
    mine = core.stats.nan_std(reduce=red, values=x, cotangents={"std": cot})
    peer = ops.call("trl.nanstd", dim=dim, keepdim=False, tensor=x, cotangents={"std": cot})
    close(mine["std"], peer["std"])
    close(mine.grads["values"], peer.grads["tensor"])


def test_nan_mean_is_numpys_nanmean_and_all_nan_groups_are_nan():
    r = np.random.default_rng(46)
    x = nan_at(r.normal(size=(3, 5)), holey_mask(r, 3, 5))  # row 0 all NaN
    for red, axis in [("All", None), ("Rows", 1), ("Columns", 0)]:
        with np.errstate(all="ignore"), pytest.warns(RuntimeWarning) if red == "Rows" else _nothing():
            want = np.nanmean(x, axis=axis)
        close(core.stats.nan_mean(reduce=red, values=x)["mean"], want)
    # the gradient is 1/n at the non-NaN entries of each column
    cot = r.normal(size=5)
    g = core.stats.nan_mean(reduce="Columns", values=x, cotangents={"mean": cot}).grads["values"]
    present = ~np.isnan(x)
    close(g, present * cot / present.sum(axis=0))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_nan_max_and_min_are_trls():
    r = np.random.default_rng(47)
    x = nan_at(r.normal(size=7), r.random(7) > 0.3)
    close(core.stats.nan_max(values=x)["max"], ops.call("trl.nanmax", tensor=x)["value"])
    close(core.stats.nan_min(values=x)["min"], ops.call("trl.nanmin", tensor=x)["value"])
    assert np.isnan(core.stats.nan_max(values=np.full(3, np.nan))["max"])
    assert np.isnan(ops.call("trl.nanmax", tensor=np.full(3, np.nan))["value"])


def test_moment_and_whiten_configs_are_the_presets_and_validated():
    assert core.config("MomentConfig", preset="openrlhf") == {"count_eps": 0.0, "count_floor": 1.0, "bessel": "None"}
    assert core.config("WhitenConfig", preset="openrlhf")["var_eps"] == {"Floor": 1e-8}
    assert core.config("WhitenConfig", preset="verl")["zero_masked"] is False
    with pytest.raises(ValueError, match="count_eps"):
        core.config("MomentConfig", preset="verl", count_eps=-1.0)
    with pytest.raises(ValueError, match="var_eps"):
        core.config("WhitenConfig", preset="verl", var_eps={"Add": 0.0})
