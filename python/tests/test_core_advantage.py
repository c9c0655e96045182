"""Cases for ``posttrain.ops.core.advantage`` (see ``core_check``), and
cross-checks against the peer-named ops running the same core function.

Advantages are constants to the policy loss (every peer computes them under
``no_grad``), so none of these ops declares a gradient: the contract checks
finiteness and f32 ≈ f64 only."""

import numpy as np
import pytest

from posttrain import ops
from posttrain.ops import core

from core_check import params, run_cases

A = core.advantage


def groups(rng, n_groups=4, size=4, singleton=True):
    index = np.repeat(np.arange(n_groups), size)
    if singleton:
        index = np.append(index, n_groups)  # a singleton group
    rng.shuffle(index)
    return dict(scores=rng.normal(size=index.size), index=index)


def token_mask(rng, b, t, empty_row=True):
    """Right padding of random length plus holes (multi-turn observation
    tokens); row 1 empty when ``empty_row``."""
    lengths = rng.integers(2, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    mask &= rng.random((b, t)) > 0.15
    mask[:, 0] = True
    if empty_row:
        mask[1, :] = False
    return mask


def token_batch(rng, b=6, t=7, empty_row=True):
    return dict(rewards=rng.normal(size=(b, t)), mask=token_mask(rng, b, t, empty_row))


def gae(rng, preset="verl", gamma=0.99, lam=0.95, **over):
    return dict(cfg=core.config("GaeConfig", preset=preset, gamma=gamma, lam=lam, **over),
                values=rng.normal(size=(6, 7)), **token_batch(rng))


def pass_k(rng, scale=True, eps=1e-6, binary=False):
    g = groups(rng, singleton=False)
    if binary:  # ties for the best, and all-equal groups
        g["scores"] = (rng.random(g["scores"].size) > 0.5).astype(float)
    return dict(cfg=core.config("PassAtKConfig", scale_by_std=scale, std_eps=eps), **g)


def gdpo(rng, k=2, eps=1e-6, scale=True):
    index = np.append(np.repeat(np.arange(3), 3), 3)  # three groups of 3 + a singleton
    rng.shuffle(index)
    b = index.size
    return dict(cfg=core.config("GroupNormConfig", preset="verl", std_eps=eps, scale_by_std=scale),
                key_scores=rng.normal(size=(k, b)), weights=rng.uniform(0.25, 2.0, size=k),
                mask=token_mask(rng, b, 5), index=index)


def otb(rng, zero_tail=True, eps=1e-8, compact=False, is_weights=True, b=7, t=6):
    index = np.array([0, 0, 0, 1, 1, 2, 3][:b])  # groups of 3, 2 and two singletons
    mask = token_mask(rng, b, t)  # row 1 (group 0) empty
    mask[0, :] = True  # a unique longest member of group 0 (zero tail)
    mask[2, 3:] = False
    out = dict(cfg=core.config("OtbConfig", handle_zero_tail=zero_tail, epsilon=eps,
                               compact_steps=compact),
               rewards=rng.normal(size=(b, t)), mask=mask, index=index,
               old_log_probs=-np.abs(rng.normal(size=(b, t))) - 0.05,
               sum_pi_squared=rng.uniform(0.05, 0.9, size=(b, t)))
    if is_weights:
        out["is_weights"] = rng.uniform(0.5, 1.5, size=(b, t))
    return out


def multi_reward(rng, scaling="Group", aggregation="SumThenNormalize", group_size=4, k=2,
                 nan=True):
    b = 12
    per_func = rng.normal(size=(b, k))
    if nan:
        per_func[3, 0] = np.nan  # one unscored reward
        per_func[5, :] = np.nan  # an unscored completion
    cfg = core.config("MultiRewardConfig", group_size=group_size, scaling=scaling,
                      aggregation=aggregation, std_eps=1e-4)
    return dict(cfg=cfg, rewards_per_func=per_func, weights=rng.uniform(0.5, 1.5, size=k))


def rloo(rng, group_size=3, beta=0.05, clip=(-1.0, 1.5), normalize=True, k=2, ref=True):
    b, t = 9, 5
    cfg = core.config("advantage::RlooConfig", group_size=group_size, beta=beta,
                      reward_clip=None if clip is None else list(clip), normalize=normalize,
                      std_eps=1e-4)
    old = -np.abs(rng.normal(size=(b, t)))
    out = dict(cfg=cfg, rewards_per_func=rng.normal(size=(b, k)),
               weights=rng.uniform(0.5, 1.5, size=k), completion_mask=token_mask(rng, b, t),
               old_logps=old)
    if ref:
        out["ref_logps"] = old + 0.1 * rng.normal(size=(b, t))
    return out


CASES = {
    "advantage::group_zscore_advantages": [
        lambda r: dict(cfg=core.config("GroupNormConfig", preset="verl"), **groups(r)),
        lambda r: dict(cfg=core.config("GroupNormConfig", preset="trl"), **groups(r)),
        lambda r: dict(cfg=core.config("GroupNormConfig", preset="trl", scale_by_std=False), **groups(r)),
    ],
    "advantage::outcome_scores": [
        lambda r: dict(rewards=r.normal(size=(5, 6))),
        lambda r: dict(rewards=r.normal(size=(1, 3))),
        lambda r: dict(rewards=r.normal(size=(4, 1))),
    ],
    "advantage::broadcast_to_tokens": [
        lambda r: dict(per_seq=r.normal(size=6), mask=token_mask(r, 6, 7)),
        lambda r: dict(per_seq=r.normal(size=3), mask=np.ones((3, 4), bool)),
    ],
    "advantage::group_mean_baseline_advantages": [
        lambda r: groups(r),
        lambda r: groups(r, n_groups=2, size=5, singleton=False),
    ],
    "advantage::gpg_advantages": [
        lambda r: dict(f_norm=1.0, **groups(r)),
        lambda r: {**groups(r), "f_norm": 2.0,
                   "scores": (r.random(17) > 0.5).astype(float)},  # zero scores count
        lambda r: {**groups(r, singleton=False), "f_norm": -0.5},
    ],
    "advantage::leave_one_out_advantages": [
        lambda r: dict(singleton="RawScore", **groups(r)),
        lambda r: dict(singleton="Zero", **groups(r)),
        lambda r: dict(singleton="MeanZeroStdOne", **groups(r, n_groups=3, size=2)),
    ],
    "advantage::length_weighted_baseline_advantages": [
        lambda r: dict(lengths=r.integers(1, 9, size=17).astype(float), **groups(r)),
        # zero lengths, and a group whose lengths are all zero (baseline 0)
        lambda r: {**groups(r, n_groups=3, size=3, singleton=False),
                   "lengths": np.array([0.0, 4, 2, 0, 0, 0, 3, 0, 5])},
        lambda r: {**groups(r), "lengths": r.uniform(1e3, 1e6, size=17)},
    ],
    "advantage::pass_at_k_advantages": [
        lambda r: pass_k(r),
        lambda r: pass_k(r, scale=False),
        lambda r: pass_k(r, eps=0.25, binary=True),
    ],
    "advantage::gdpo_advantages": [
        lambda r: gdpo(r),
        lambda r: gdpo(r, k=3, eps=0.25),
        lambda r: gdpo(r, k=1, scale=False),
    ],
    "advantage::gae_advantages_returns": [
        lambda r: gae(r),
        lambda r: gae(r, "torchtune", gamma=1.0, lam=1.0),
        lambda r: gae(r, "verl", gamma=0.9, lam=0.0, whiten=None),
        lambda r: gae(r, "torchtune", gamma=0.99, lam=0.5, zero_masked=False),
    ],
    "advantage::discounted_returns": [
        lambda r: dict(gamma=0.9, **token_batch(r)),
        lambda r: dict(gamma=1.0, **token_batch(r, empty_row=False)),
    ],
    "advantage::reinforce_plus_plus_advantages": [
        lambda r: dict(gamma=0.9, **token_batch(r)),
        lambda r: dict(gamma=1.0, **token_batch(r, b=3, t=4)),
    ],
    "advantage::remax_advantages": [
        lambda r: dict(baselines=r.normal(size=6), **token_batch(r)),
        lambda r: dict(baselines=r.normal(size=2), **token_batch(r, b=2, t=3, empty_row=False)),
    ],
    "advantage::optimal_token_baseline_advantages": [
        lambda r: otb(r),
        lambda r: otb(r, zero_tail=False, eps=1e-3, is_weights=False),
        lambda r: otb(r, compact=True),
        lambda r: otb(r, compact=True, zero_tail=False, is_weights=False),
    ],
    "advantage::multi_reward_group_advantages": [
        lambda r: multi_reward(r),
        lambda r: multi_reward(r, scaling="Batch", group_size=3),
        lambda r: multi_reward(r, scaling="None", k=1, nan=False),
        lambda r: multi_reward(r, aggregation="NormalizeThenSum", k=3),
        lambda r: multi_reward(r, group_size=1),
    ],
    "advantage::leave_one_out_reward_advantages": [
        lambda r: rloo(r),
        lambda r: rloo(r, beta=0.0, clip=None, normalize=False, ref=False),
        lambda r: rloo(r, group_size=1, beta=0.1, clip=(-0.5, 0.5), k=1),
        lambda r: rloo(r, group_size=9, normalize=False),
    ],
}


@pytest.mark.parametrize("path,index", params(CASES))
def test_case(path, index):
    run_cases(CASES, path, index)


def test_no_advantage_op_declares_a_gradient():
    for path in core.list_ops():
        if path.startswith("advantage::"):
            assert core.op_info(path)["vjp"] == [], path


# ---------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------


def test_gae_config_is_gae_config_preset():
    v = core.config("GaeConfig", preset="verl", gamma=0.99, lam=0.95)
    assert (v["gamma"], v["lam"], v["skip_masked"], v["zero_masked"]) == (0.99, 0.95, True, False)
    assert v["whiten"]["keep_mean"] is False
    t = core.config("GaeConfig", preset="torchtune", gamma=1.0, lam=0.9)
    assert (t["skip_masked"], t["zero_masked"], t["whiten"]["keep_mean"]) == (False, True, True)
    with pytest.raises(ValueError, match="lam"):
        core.config("GaeConfig", preset="verl", gamma=0.99, lam=1.5)
    with pytest.raises(ValueError, match="gamma"):
        core.config("GaeConfig", **{**v, "gamma": -0.1})
    with pytest.raises(ValueError, match="var_eps"):
        core.config("GaeConfig", **{**v, "whiten": {**v["whiten"], "var_eps": {"Add": 0.0}}})
    with pytest.raises(ValueError, match="needs `lam`"):
        core.config("GaeConfig", preset="verl", gamma=0.99)


def test_trl_configs_are_validated_by_their_constructors():
    with pytest.raises(ValueError, match="num_generations"):
        core.config("MultiRewardConfig", group_size=0, scaling="Group",
                    aggregation="SumThenNormalize", std_eps=1e-4)
    with pytest.raises(ValueError, match="reward_clip_range"):
        core.config("advantage::RlooConfig", group_size=2, beta=0.0, reward_clip=[1.0, -1.0],
                    normalize=False, std_eps=1e-4)
    with pytest.raises(ValueError, match="has no preset constructor"):
        core.config("advantage::RlooConfig", preset="trl")
    with pytest.raises(ValueError, match="missing field"):
        core.config("OtbConfig", epsilon=1e-8)
    assert core.config("PassAtKConfig", scale_by_std=True, std_eps=1e-6) == {
        "scale_by_std": True, "std_eps": 1e-6}


def test_errors_are_reported_not_panics():
    with pytest.raises(ValueError, match="group"):  # pass@k needs ≥ 2 members per group
        A.pass_at_k_advantages(cfg={"scale_by_std": True, "std_eps": 1e-6}, **groups(
            np.random.default_rng(0)))
    with pytest.raises(ValueError, match="f_norm"):
        A.gpg_advantages(f_norm=0.0, **groups(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        A.leave_one_out_reward_advantages(**rloo(np.random.default_rng(0), ref=False))
    with pytest.raises(ValueError, match="num_generations"):
        A.multi_reward_group_advantages(**multi_reward(np.random.default_rng(0), group_size=5))
    with pytest.raises(ValueError, match="shape mismatch|baselines"):
        A.remax_advantages(baselines=np.zeros(2), **token_batch(np.random.default_rng(0)))
    with pytest.raises(ValueError):  # whitening needs two valid tokens
        A.reinforce_plus_plus_advantages(gamma=1.0, rewards=np.ones((2, 2)),
                                         mask=np.array([[True, False], [False, False]]))


# ---------------------------------------------------------------------------
# cross-checks against the peer-named ops (same core functions)
# ---------------------------------------------------------------------------


def verl_batch(seed, b=9, t=6, singleton=True):
    r = np.random.default_rng(seed)
    index = np.repeat(np.arange(b // 3), 3)[:b]
    if singleton:
        index[-1] = 99
    r.shuffle(index)
    mask = token_mask(r, b, t, empty_row=False)
    return r, dict(token_level_rewards=r.normal(size=(b, t)), response_mask=mask, index=index)


def scores_of(v):
    return A.outcome_scores(rewards=v["token_level_rewards"])["scores"]


def on_tokens(per_seq, v):
    return A.broadcast_to_tokens(per_seq=per_seq, mask=v["response_mask"])["out"]


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_group_zscore_is_verls_grpo_outcome_advantage():
    r = np.random.default_rng(3)
    g = groups(r, singleton=True)
    mine = core.advantage.group_zscore_advantages(cfg=core.config("GroupNormConfig", preset="verl"), **g)
    n = g["scores"].size
    peer = ops.call("verl.compute_grpo_outcome_advantage",
                    token_level_rewards=np.column_stack([np.zeros(n), g["scores"]]),
                    response_mask=np.ones((n, 2), bool), index=g["index"])
    np.testing.assert_allclose(peer["advantages"][:, 0], mine["advantages"], rtol=1e-12)


def test_group_zscore_is_torchtunes_grpo_advantages():
    r = np.random.default_rng(4)
    rewards = r.normal(size=(3, 4))
    peer = ops.call("torchtune.grpo_advantages", rewards=rewards)
    mine = A.group_zscore_advantages(cfg=core.config("GroupNormConfig", preset="torchtune"),
                                     scores=rewards.reshape(-1),
                                     index=np.repeat(np.arange(3), 4))
    close(peer["advantages"], mine["advantages"])


@pytest.mark.parametrize("eps,scale", [(1e-6, True), (0.25, False)])
def test_pass_at_k_is_verls_grpo_passk(eps, scale):
    _, v = verl_batch(5, singleton=False)
    peer = ops.call("verl.compute_grpo_passk_outcome_advantage", epsilon=eps,
                    norm_adv_by_std_in_grpo=scale, **v)
    a = A.pass_at_k_advantages(cfg=core.config("PassAtKConfig", scale_by_std=scale, std_eps=eps),
                               scores=scores_of(v), index=v["index"])["advantages"]
    close(peer["advantages"], on_tokens(a, v))


@pytest.mark.parametrize("f_norm", [1.0, 2.0])
def test_gpg_is_verls_gpg(f_norm):
    _, v = verl_batch(6)
    peer = ops.call("verl.compute_gpg_outcome_advantage", f_norm=f_norm, alpha=3.0, **v)
    a = A.gpg_advantages(f_norm=f_norm, scores=scores_of(v), index=v["index"])["advantages"]
    close(peer["advantages"], on_tokens(a, v))


@pytest.mark.parametrize("op,singleton", [("verl.compute_rloo_outcome_advantage", "RawScore"),
                                          ("verl.compute_rloo_vectorized_outcome_advantage", "Zero")])
def test_leave_one_out_is_verls_rloo(op, singleton):
    _, v = verl_batch(7)
    peer = ops.call(op, **v)
    a = A.leave_one_out_advantages(singleton=singleton, scores=scores_of(v),
                                   index=v["index"])["advantages"]
    close(peer["advantages"], on_tokens(a, v))


def test_length_weighted_baseline_is_verls_opo():
    _, v = verl_batch(8)
    peer = ops.call("verl.compute_opo_outcome_advantage", **v)
    a = A.length_weighted_baseline_advantages(
        scores=scores_of(v), lengths=v["response_mask"].sum(1).astype(float),
        index=v["index"])["advantages"]
    close(peer["advantages"], on_tokens(a, v))


def test_group_mean_baseline_is_verls_reinforce_plus_plus_baseline():
    # verl whitens the broadcast baseline advantages over the valid tokens
    # (masked_whiten: masked_mean divides by count + 1e-8, the variance is
    # Bessel-corrected, rsqrt(var + 1e-8)), then zeroes padding.
    _, v = verl_batch(9)
    peer = ops.call("verl.compute_reinforce_plus_plus_baseline_outcome_advantage", **v)
    a = A.group_mean_baseline_advantages(scores=scores_of(v), index=v["index"])["advantages"]
    x, m = on_tokens(a, v), v["response_mask"]
    n = m.sum()
    mean = x[m].sum() / (n + 1e-8)
    var = ((x[m] - mean) ** 2).sum() / (n + 1e-8) * n / (n - 1)
    np.testing.assert_allclose(peer["advantages"], np.where(m, (x - mean) / np.sqrt(var + 1e-8), 0.0),
                               rtol=1e-10, atol=1e-12)


def test_gdpo_is_verls_gdpo_single_key():
    _, v = verl_batch(10)
    peer = ops.call("verl.compute_gdpo_outcome_advantage", epsilon=1e-6,
                    norm_adv_by_std_in_grpo=True, **v)
    mine = A.gdpo_advantages(cfg=core.config("GroupNormConfig", preset="verl"),
                             key_scores=scores_of(v)[None, :], weights=np.ones(1),
                             mask=v["response_mask"], index=v["index"])
    close(peer["advantages"], mine["advantages"])


def test_gdpo_is_verls_gdpo_weighted_keys():
    r, v = verl_batch(11)
    b = v["index"].size
    fmt, acc = r.normal(size=b), r.normal(size=b)
    peer = ops.call("verl.compute_gdpo_outcome_advantage", epsilon=0.25,
                    norm_adv_by_std_in_grpo=False,
                    gdpo_reward_keys=["format_reward", "accuracy_reward"],
                    gdpo_reward_weights=[0.25, 1.5], format_reward=fmt, accuracy_reward=acc, **v)
    mine = A.gdpo_advantages(cfg=core.config("GroupNormConfig", preset="verl", std_eps=0.25,
                                             scale_by_std=False),
                             key_scores=np.stack([fmt, acc]), weights=np.array([0.25, 1.5]),
                             mask=v["response_mask"], index=v["index"])
    close(peer["advantages"], mine["advantages"])


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 0.0)])
def test_gae_is_verls_gae(gamma, lam):
    r, v = verl_batch(12)
    values = r.normal(size=v["token_level_rewards"].shape)
    peer = ops.call("verl.compute_gae_advantage_return", gamma=gamma, lam=lam, values=values,
                    token_level_rewards=v["token_level_rewards"], response_mask=v["response_mask"])
    mine = A.gae_advantages_returns(cfg=core.config("GaeConfig", preset="verl", gamma=gamma, lam=lam),
                                    rewards=v["token_level_rewards"], values=values,
                                    mask=v["response_mask"])
    close(peer["advantages"], mine["advantages"])
    close(peer["returns"], mine["returns"])


def test_gae_is_torchtunes_estimate_advantages():
    r, v = verl_batch(13)
    values = r.normal(size=v["token_level_rewards"].shape)
    peer = ops.call("torchtune.estimate_advantages", gamma=0.99, lmbda=0.95, values=values,
                    rewards=v["token_level_rewards"], masks=v["response_mask"])
    mine = A.gae_advantages_returns(cfg=core.config("GaeConfig", preset="torchtune", gamma=0.99,
                                                    lam=0.95),
                                    rewards=v["token_level_rewards"], values=values,
                                    mask=v["response_mask"])
    close(peer["advantages"], mine["advantages"])
    close(peer["returns"], mine["returns"])


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus_is_verls(gamma):
    _, v = verl_batch(14)
    peer = ops.call("verl.compute_reinforce_plus_plus_outcome_advantage", gamma=gamma,
                    token_level_rewards=v["token_level_rewards"], response_mask=v["response_mask"])
    mine = A.reinforce_plus_plus_advantages(gamma=gamma, rewards=v["token_level_rewards"],
                                            mask=v["response_mask"])
    close(peer["advantages"], mine["advantages"])
    close(peer["returns"], mine["returns"])
    ret = A.discounted_returns(gamma=gamma, rewards=v["token_level_rewards"],
                               mask=v["response_mask"])["returns"]
    close(peer["returns"], ret)


def test_remax_is_verls():
    r, v = verl_batch(15)
    base = r.normal(size=v["index"].size)
    peer = ops.call("verl.compute_remax_outcome_advantage", reward_baselines=base,
                    token_level_rewards=v["token_level_rewards"], response_mask=v["response_mask"])
    mine = A.remax_advantages(rewards=v["token_level_rewards"], baselines=base,
                              mask=v["response_mask"])
    close(peer["advantages"], mine["advantages"])
    close(peer["returns"], mine["returns"])


@pytest.mark.parametrize("op,compact", [("verl.compute_optimal_token_baseline_advantage", False),
                                        ("verl.compute_multi_turn_optimal_token_baseline_advantage", True)])
@pytest.mark.parametrize("zero_tail,eps,with_is", [(True, 1e-8, True), (False, 1e-3, False)])
def test_optimal_token_baseline_is_verls(op, compact, zero_tail, eps, with_is):
    k = otb(np.random.default_rng(16), zero_tail=zero_tail, eps=eps, compact=compact,
            is_weights=with_is)
    peer_in = dict(token_level_rewards=k["rewards"], response_mask=k["mask"], index=k["index"],
                   old_log_probs=k["old_log_probs"], sum_pi_squared=k["sum_pi_squared"])
    if with_is:
        peer_in["rollout_is_weights"] = k["is_weights"]
    peer = ops.call(op, handle_zero_tail=zero_tail, epsilon=eps, **peer_in)
    mine = A.optimal_token_baseline_advantages(**k)
    close(peer["advantages"], mine["advantages"])
    close(peer["returns"], mine["returns"])


TRL_SCALING = {"Group": "group", "Batch": "batch", "None": "none"}
TRL_AGG = {"SumThenNormalize": "sum_then_normalize", "NormalizeThenSum": "normalize_then_sum"}


@pytest.mark.parametrize("scaling,aggregation,group_size,k", [
    ("Group", "SumThenNormalize", 4, 2), ("Batch", "SumThenNormalize", 3, 2),
    ("None", "SumThenNormalize", 4, 1), ("Group", "NormalizeThenSum", 4, 2),
    ("Group", "SumThenNormalize", 1, 2)])
def test_multi_reward_is_trls_grpo_advantages(scaling, aggregation, group_size, k):
    kw = multi_reward(np.random.default_rng(17), scaling=scaling, aggregation=aggregation,
                      group_size=group_size, k=k)
    peer = ops.call("trl.grpo_advantages", rewards_per_func=kw["rewards_per_func"],
                    num_generations=group_size, scale_rewards=TRL_SCALING[scaling],
                    multi_objective_aggregation=TRL_AGG[aggregation],
                    reward_weights=[float(w) for w in kw["weights"]])
    mine = A.multi_reward_group_advantages(**kw)
    close(peer["advantages"], mine["advantages"])
    close(peer["reward"], mine.metrics["reward_mean"])
    close(peer["reward_std"], mine.metrics["reward_std"])
    close(peer["frac_reward_zero_std"], mine.metrics["frac_zero_std"])


@pytest.mark.parametrize("group_size,beta,clip,normalize", [
    (3, 0.05, (-1.0, 1.5), True), (3, 0.0, None, False), (9, 0.1, (-0.5, 0.5), False)])
def test_leave_one_out_reward_is_trls_rloo_advantages(group_size, beta, clip, normalize):
    kw = rloo(np.random.default_rng(18), group_size=group_size, beta=beta, clip=clip,
              normalize=normalize)
    peer = ops.call("trl.rloo_advantages", rewards_per_func=kw["rewards_per_func"],
                    completion_mask=kw["completion_mask"], old_per_token_logps=kw["old_logps"],
                    ref_per_token_logps=kw["ref_logps"], num_generations=group_size, beta=beta,
                    reward_clip_range=None if clip is None else list(clip),
                    normalize_advantages=normalize,
                    reward_weights=[float(w) for w in kw["weights"]])
    mine = A.leave_one_out_reward_advantages(**kw)
    close(peer["advantages"], mine["advantages"])
    close(peer["old_logps"], mine["seq_old_logps"])
    close(peer["reward"], mine.metrics["reward_mean"])
    close(peer["reward_std"], mine.metrics["reward_std"])
    close(peer["frac_reward_zero_std"], mine.metrics["frac_zero_std"])
    if beta != 0.0:
        close(peer["kl"], mine.metrics["kl"])
    else:
        assert "kl" not in mine.metrics
