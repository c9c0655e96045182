"""Cases for ``posttrain.ops.core.policy.sequence_mean`` and
``posttrain.ops.core.policy.rollout``: each op held to the contract of
``core_check.check_case`` (finite, f32 ≈ f64, closed-form gradients = finite
differences), and cross-checked against the peer-named op that runs the same
core function (torchtune's GRPO losses, verl's rollout correction and
bypass-mode loss, TRL's vLLM importance-sampling ratio)."""

import numpy as np
import pytest

from posttrain import ops
from posttrain.ops import core

from core_check import params, run_cases

SM = "policy::sequence_mean::"
RO = "policy::rollout::"


# ---------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------


def holey_mask(rng, b, t, empty_row=True):
    mask = rng.random((b, t)) > 0.25
    mask[-1, 0] = False  # a hole
    if empty_row:
        mask[0, :] = False  # an empty row
    return mask


def seq_batch(rng, b=3, t=6, noise=0.1, mask=True, zero_adv=False):
    lp = -np.abs(rng.normal(size=(b, t))) - 0.1
    out = dict(old_log_prob=lp + noise * rng.normal(size=(b, t)), log_prob=lp,
               ref_log_prob=lp + 0.3 * rng.normal(size=(b, t)),
               advantages=np.zeros(b) if zero_adv else rng.normal(size=b))
    if mask:
        out["mask"] = holey_mask(rng, b, t)
    return out


def smc(preset="torchtune", **fields):
    return core.config("SequenceMeanConfig", preset=preset, **fields)


def on_policy(rng, zero_adv=False, **kw):
    x = seq_batch(rng, zero_adv=zero_adv)
    del x["old_log_prob"]
    return dict(cfg=smc(), **x, **kw)


def logits_batch(rng, b=3, t=4, v=5, zero_adv=False, ignore=True):
    targets = rng.integers(0, v, size=(b, t))
    if ignore:
        targets[1, 1] = -100
    return dict(cfg=smc(kl_coeff=0.04), ignore_index=-100 if ignore else None,
                logits=rng.normal(size=(b, t, v)), targets=targets,
                ref_log_prob=-np.abs(rng.normal(size=(b, t))) - 1.0,
                advantages=np.zeros(b) if zero_adv else rng.normal(size=b),
                mask=holey_mask(rng, b, t))


def hidden_batch(rng, b=2, t=4, h=3, v=5, zero_adv=False):
    kw = logits_batch(rng, b, t, v, zero_adv)
    del kw["logits"]
    return dict(kw, hidden=rng.normal(size=(b, t, h)), weight=0.5 * rng.normal(size=(v, h)))


def log_ratio_batch(rng, b=4, t=6, scale=0.3, nan_padding=True):
    lr = scale * rng.normal(size=(b, t))
    mask = holey_mask(rng, b, t)
    if nan_padding:
        lr[~mask] = np.nan  # padding is never read
    return dict(log_ratio=lr, mask=mask)


def two_policies(rng, b=4, t=6, scale=0.3, nan_padding=True):
    lp = -np.abs(rng.normal(size=(b, t))) - 0.1
    rl = lp - scale * rng.normal(size=(b, t))
    mask = holey_mask(rng, b, t)
    if nan_padding:
        rl[~mask] = np.nan
    return lp, rl, mask


def is_cfg(level="Token", upper=2.0, lower=None, batch_normalize=False):
    return core.config("IsConfig", level=level, threshold={"upper": upper, "lower": lower},
                       batch_normalize=batch_normalize)


def rs_cfg(options, thresholds):
    return core.config("RsConfig", options=options, thresholds=thresholds)


def correction(is_=None, rs=None):
    return core.config("RolloutCorrectionConfig", **({"is": is_} if is_ else {}), **({"rs": rs} if rs else {}))


VERL_CLIP = {"PpoClip": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 3.0, "log_ratio_clamp": 20.0}}


def bypass(rng, loss=None, corr=None, agg="token-mean", norm=None):
    lp, rl, mask = two_policies(rng, nan_padding=False)
    cfg = core.config("BypassConfig", loss=loss or VERL_CLIP, correction=corr or correction(), agg=agg,
                      norm=norm or core.config("GlobalNorm"))
    return dict(cfg=cfg, log_prob=lp, rollout_log_prob=rl, advantages=rng.normal(size=lp.shape), mask=mask)


def vllm(rng, mode, clip_min=None, clip_max=3.0, nan=None, nan_at=None):
    lp, samp, mask = two_policies(rng, scale=0.2)
    fields = dict(mode=mode, clip_min=clip_min, clip_max=clip_max)
    if nan:
        fields["nan_sampler_log_probs"] = nan
    if nan_at:
        samp[nan_at] = np.nan
        mask[nan_at] = True
    return dict(cfg=core.config("VllmIsConfig", **fields), old_log_prob=lp, sampling_log_prob=samp, mask=mask)


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------

CASES = {
    SM + "token_clipped_loss": [
        lambda r: dict(cfg=smc(), **seq_batch(r)),
        lambda r: dict(cfg=smc("verl", epsilon=0.2, kl_coeff=0.04), **seq_batch(r, mask=False)),
        lambda r: dict(cfg=smc(kl_coeff=0.0), **seq_batch(r, noise=0.5)),  # many clipped ratios
    ],
    SM + "completion_clipped_loss": [
        lambda r: dict(cfg=smc(), **seq_batch(r, noise=0.02)),
        lambda r: dict(cfg=smc(epsilon=0.2), **seq_batch(r, noise=0.05, mask=False)),
        lambda r: dict(cfg=smc(kl_coeff=0.0, epsilon=0.28), **seq_batch(r, noise=0.1)),
    ],
    SM + "on_policy_loss": [
        # A = 0: only the k3 term, whose gradient is the derivative of the value
        lambda r: on_policy(r, zero_adv=True),
        lambda r: on_policy(r, zero_adv=True, guard={"AtLeast": 1e-9}),
        # A ≠ 0: the stop-gradient surrogate's gradient (test_on_policy_gradient_is_the_surrogates)
        lambda r: dict(on_policy(r), _check={"fd": False}),
    ],
    SM + "on_policy_loss_from_logits": [
        lambda r: logits_batch(r, zero_adv=True),
        lambda r: dict(logits_batch(r, zero_adv=True, ignore=False), guard={"Add": 1e-8}),
        lambda r: dict(logits_batch(r), _check={"fd": False}),
    ],
    SM + "on_policy_loss_from_hidden": [
        lambda r: hidden_batch(r, zero_adv=True),
        lambda r: dict(hidden_batch(r), _check={"fd": False}),
    ],
    SM + "truncate_for_logprobs": [
        lambda r: dict(context=2, logits=r.normal(size=(2, 5, 3))),
        lambda r: dict(context=1, logits=r.normal(size=(1, 4, 2))),
        lambda r: dict(context=4, logits=r.normal(size=(2, 4, 3))),  # empty response
    ],
    RO + "rollout_correction_weights": [
        lambda r: dict(cfg=is_cfg("Token", 2.0), **log_ratio_batch(r)),
        lambda r: dict(cfg=is_cfg("Sequence", 2.0, 0.5), **log_ratio_batch(r)),
        lambda r: dict(cfg=is_cfg("Token", 1.25, 0.8, batch_normalize=True), **log_ratio_batch(r)),
        lambda r: dict(cfg=is_cfg("Sequence", 5.0, batch_normalize=True), **log_ratio_batch(r, scale=0.1)),
        lambda r: dict(cfg=is_cfg("Token", 2.0), log_ratio=r.normal(size=(2, 3)), mask=np.zeros((2, 3), bool)),
    ],
    RO + "rollout_rejection_mask": [
        lambda r: dict(cfg=rs_cfg("token_k1", "0.8_1.25"), **log_ratio_batch(r)),
        lambda r: dict(cfg=rs_cfg("seq_mean_k3", 0.02), **log_ratio_batch(r)),
        lambda r: dict(cfg=rs_cfg("token_k1,seq_max_k3", "0.75_1.3,0.15"), **log_ratio_batch(r)),
        lambda r: dict(cfg=rs_cfg("seq_sum_k1,token_k2,seq_sum_k2", "0.5_2.0,0.05,0.3"), **log_ratio_batch(r)),
    ],
    RO + "off_policy_metrics": [
        lambda r: dict(zip(["log_prob", "rollout_log_prob", "mask"], two_policies(r))),
        lambda r: dict(zip(["log_prob", "rollout_log_prob", "mask"], two_policies(r, b=1, scale=1.0))),
        lambda r: dict(log_prob=-np.ones((2, 3)), rollout_log_prob=-np.ones((2, 3)), mask=np.zeros((2, 3), bool)),
    ],
    RO + "rollout_correction_and_rejection": [
        lambda r: dict(cfg=correction(), **dict(zip(["log_prob", "rollout_log_prob", "mask"], two_policies(r)))),
        lambda r: dict(cfg=correction(is_=is_cfg("Sequence", 2.0)),
                       **dict(zip(["log_prob", "rollout_log_prob", "mask"], two_policies(r)))),
        lambda r: dict(cfg=correction(rs=rs_cfg("seq_mean_k1", "0.9_1.1")),
                       **dict(zip(["log_prob", "rollout_log_prob", "mask"], two_policies(r)))),
        lambda r: dict(cfg=correction(is_=is_cfg("Token", 2.0, 0.5, True), rs=rs_cfg("token_k3", 0.05)),
                       **dict(zip(["log_prob", "rollout_log_prob", "mask"], two_policies(r)))),
    ],
    RO + "bypass_policy_loss": [
        lambda r: bypass(r),
        lambda r: bypass(r, corr=correction(is_=is_cfg("Token", 2.0), rs=rs_cfg("token_k1", "0.75_1.3")),
                         agg="seq-mean-token-mean"),
        lambda r: bypass(r, loss="Reinforce", agg="token-sum"),
        lambda r: bypass(r, loss="Reinforce", corr=correction(rs=rs_cfg("seq_max_k2", 0.1)),
                         agg="seq-mean-token-sum-norm",
                         norm=core.config("GlobalNorm", dp_size=2.0, global_batch_size=5.0)),
        # REINFORCE with IS weights: the weights are constants of the gradient
        # (test_bypass_reinforce_gradient_holds_the_weights_constant)
        lambda r: dict(bypass(r, loss="Reinforce", corr=correction(is_=is_cfg("Sequence", 2.0))),
                       _check={"fd": False}),
    ],
    RO + "vllm_importance_sampling_ratio": [
        lambda r: vllm(r, "TokenTruncate"),
        lambda r: vllm(r, "TokenMask", 0.8, 1.2),
        lambda r: vllm(r, "SequenceTruncate", 0.5, 2.0),
        lambda r: vllm(r, "SequenceMask", None, 2.0),
        # a token vLLM could not score (NaN) counts as on-policy (TRL 1.16.0)
        lambda r: vllm(r, "TokenTruncate", nan="as_on_policy", nan_at=(1, 2)),
        lambda r: vllm(r, "SequenceMask", 0.5, 2.0, nan="as_on_policy", nan_at=(1, 2)),
        # TRL f2cd577 propagates it: the ratio of that token and the ratio
        # metrics are NaN by design
        lambda r: dict(vllm(r, "TokenTruncate", nan_at=(1, 2)), _check={"finite": False}),
    ],
}


@pytest.mark.parametrize("path,index", params(CASES))
def test_case(path, index):
    run_cases(CASES, path, index)


# ---------------------------------------------------------------------------
# by-design gradients
# ---------------------------------------------------------------------------


def test_on_policy_gradient_is_the_surrogates():
    # ∂loss/∂log π = (−A_i + β(1 − e^{ref − log π})) / (D_i·B): the A-part is
    # the stop-gradient ratio's, on top of the k3 part of the A = 0 case
    r = np.random.default_rng(11)
    kw = on_policy(r)
    g = core.policy.sequence_mean.on_policy_loss(grad=True, **kw).grads["log_prob"]
    g0 = core.policy.sequence_mean.on_policy_loss(grad=True, **{**kw, "advantages": np.zeros(3)}).grads["log_prob"]
    mask = kw["mask"]
    n = mask.sum(1)
    d = np.where(n > 0, n + 1e-8, 1.0)
    want = np.where(mask, -kw["advantages"][:, None] / (d[:, None] * 3), 0.0)
    np.testing.assert_allclose(g - g0, want, rtol=1e-10, atol=1e-14)


def test_on_policy_from_logits_and_hidden_agree_with_on_policy_loss():
    r = np.random.default_rng(12)
    kw = hidden_batch(r)
    h = core.policy.sequence_mean.on_policy_loss_from_hidden(grad=True, **kw)
    logits = np.einsum("bth,vh->btv", kw["hidden"], kw["weight"])
    rest = {k: v for k, v in kw.items() if k not in ("hidden", "weight")}
    z = core.policy.sequence_mean.on_policy_loss_from_logits(logits=logits, grad=True, **rest)
    np.testing.assert_allclose(h["loss"], z["loss"], rtol=1e-12)
    np.testing.assert_allclose(h["log_prob"], z["log_prob"], rtol=1e-12, atol=1e-14)
    # ∂/∂h = W^T ∂/∂z
    np.testing.assert_allclose(h.grads["hidden"], z.grads["logits"] @ kw["weight"], rtol=1e-10, atol=1e-14)
    ignore = kw["targets"] == -100
    lp = core.policy.sequence_mean.on_policy_loss(
        cfg=kw["cfg"], guard={"AtLeast": 1e-9}, log_prob=np.where(ignore, 0.0, z["log_prob"]),
        ref_log_prob=kw["ref_log_prob"], advantages=kw["advantages"], mask=kw["mask"])
    np.testing.assert_allclose(lp["loss"], z["loss"], rtol=1e-12)


def test_bypass_reinforce_gradient_holds_the_weights_constant():
    r = np.random.default_rng(13)
    kw = bypass(r, loss="Reinforce", corr=correction(is_=is_cfg("Token", 2.0)))
    with_is = core.policy.rollout.bypass_policy_loss(grad=True, **kw)
    plain = core.policy.rollout.bypass_policy_loss(grad=True, **{**kw, "cfg": {**kw["cfg"], "correction": correction()}})
    w = with_is["is_weights"]
    np.testing.assert_allclose(with_is.grads["log_prob"], plain.grads["log_prob"] * w, rtol=1e-12, atol=1e-15)
    mask = kw["mask"]
    np.testing.assert_allclose(with_is["loss"], np.sum(-kw["advantages"] * w * kw["log_prob"] * mask) / mask.sum(),
                               rtol=1e-12)


# ---------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------


def test_configs_are_built_and_validated_by_the_core():
    assert smc("verl") == {"epsilon": 0.1, "kl_coeff": 0.1}
    with pytest.raises(ValueError, match="out of range"):
        smc(epsilon=-1.0)
    with pytest.raises(ValueError, match="out of range"):
        core.config("TokenCountGuard", Add=0.0)
    assert core.config("TokenCountGuard", AtLeast=1e-9) == {"AtLeast": 1e-9}
    assert core.config("IsThreshold", upper=2.0) == {"upper": 2.0, "lower": None}
    with pytest.raises(ValueError, match="lower"):
        core.config("IsThreshold", upper=2.0, lower=3.0)
    with pytest.raises(ValueError):
        is_cfg(upper=-1.0)
    # a k1 criterion's missing lower bound is 1/upper (RsCriterion::new)
    opt = core.config("RsOption", name="token_k1")
    assert opt == {"aggregation": "Token", "divergence": "K1"}
    assert core.config("RsCriterion", option=opt, upper=2.0)["lower"] == 0.5
    with pytest.raises(ValueError, match="single upper bound"):
        core.config("RsCriterion", option=core.config("RsOption", name="token_k3"), lower=0.5, upper=2.0)
    # RsConfig from verl's strings (parse / parse_uniform); the serde form round-trips
    rs = rs_cfg("token_k1,seq_max_k3,token_k1", "0.75_1.3,0.15")
    assert [c["option"] for c in rs["criteria"] if c] == [
        {"aggregation": "Token", "divergence": "K1"}, {"aggregation": "SeqMax", "divergence": "K3"}]
    assert core.config("RsConfig", **rs) == rs
    assert rs_cfg("seq_mean_k3", 0.05)["criteria"][0]["upper"] == 0.05
    with pytest.raises(ValueError, match="unknown"):
        rs_cfg("seq_max_k1", 0.1)
    with pytest.raises(ValueError, match="thresholds"):
        core.config("RsConfig", options="token_k1")
    assert correction() == {"is": None, "rs": None}
    with pytest.raises(ValueError, match="clip_ratio_c|dual"):
        core.config("BypassConfig", loss={"PpoClip": {**VERL_CLIP["PpoClip"], "dual_clip": 0.5}},
                    correction=correction(), agg="token-mean", norm=core.config("GlobalNorm"))
    assert core.config("BypassLoss", preset=None, **{"PpoClip": VERL_CLIP["PpoClip"]}) == VERL_CLIP
    v = core.config("VllmIsConfig", mode="TokenMask", clip_max=2.0)
    assert v == {"mode": "TokenMask", "clip_min": None, "clip_max": 2.0, "nan_sampler_log_probs": "propagate"}
    with pytest.raises(ValueError, match="clip_min"):
        core.config("VllmIsConfig", mode="TokenMask", clip_min=3.0, clip_max=2.0)


# ---------------------------------------------------------------------------
# cross-checks against the peer-named ops
# ---------------------------------------------------------------------------


def _tt_inputs(kw):
    out = dict(pi_old_logprobs=kw["old_log_prob"], pi_logprobs=kw["log_prob"], ref_logprobs=kw["ref_log_prob"],
               advantages=kw["advantages"])
    if "mask" in kw:
        out["padding_masks"] = kw["mask"]
    return out


def _same_seq_mean(mine, peer):
    np.testing.assert_allclose(mine["loss"], peer["loss"], rtol=1e-12, atol=1e-15)
    for a, b in [("policy_loss", "policy_loss"), ("kl_loss", "kl_loss"), ("ratio_mean", "ratios"),
                 ("clipfrac", "clipfrac")]:
        np.testing.assert_allclose(mine[a], peer[b], rtol=1e-12, atol=1e-15, err_msg=a)


@pytest.mark.parametrize("op,peer,noise", [
    ("token_clipped_loss", "torchtune.grpo_loss", 0.3),
    ("completion_clipped_loss", "torchtune.grpo_completion_loss", 0.05),
    ("on_policy_loss", "torchtune.grpo_simple_loss", 0.1),
])
def test_sequence_mean_losses_are_torchtunes(op, peer, noise):
    r = np.random.default_rng(21)
    kw = seq_batch(r, noise=noise)
    cfg = smc(epsilon=0.2, kl_coeff=0.04)
    mine_kw = dict(kw) if op != "on_policy_loss" else {k: v for k, v in kw.items() if k != "old_log_prob"}
    mine = core.call(SM + op, cfg=cfg, grad=True, **mine_kw)
    theirs = ops.call(peer, epsilon=0.2, kl_coeff=0.04, cotangents={"loss": np.ones(())}, **_tt_inputs(kw))
    _same_seq_mean(mine, theirs)
    np.testing.assert_allclose(mine.grads["log_prob"], theirs.grads["pi_logprobs"], rtol=1e-12, atol=1e-15)


def test_on_policy_loss_from_logits_is_torchtunes_chunked_loss():
    r = np.random.default_rng(22)
    kw = logits_batch(r)
    mine = core.policy.sequence_mean.on_policy_loss_from_logits(grad=True, **kw)
    theirs = ops.call("torchtune.grpo_with_chunked_output_loss", num_output_chunks=8, epsilon=0.1,
                      kl_coeff=kw["cfg"]["kl_coeff"], pi_logits=kw["logits"], targets=kw["targets"],
                      ref_logprobs=kw["ref_log_prob"], advantages=kw["advantages"], padding_masks=kw["mask"],
                      cotangents={"loss": np.ones(())})
    _same_seq_mean(mine, theirs)
    np.testing.assert_allclose(mine["log_prob"], theirs["pi_logprobs"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mine.grads["logits"], theirs.grads["pi_logits"], rtol=1e-12, atol=1e-15)


def test_on_policy_loss_from_hidden_is_torchtunes_linear_grpo_loss():
    r = np.random.default_rng(23)
    kw = hidden_batch(r)
    mine = core.policy.sequence_mean.on_policy_loss_from_hidden(grad=True, **kw)
    theirs = ops.call("torchtune.linear_grpo_loss", num_output_chunks=1, epsilon=0.1,
                      kl_coeff=kw["cfg"]["kl_coeff"], ignore_index=-100, mask_pre_projection=True,
                      pi_old_outputs=kw["hidden"], weight=kw["weight"], pi_outputs=kw["targets"],
                      ref_outputs=kw["ref_log_prob"], advantages=kw["advantages"], padding_masks=kw["mask"],
                      cotangents={"loss": np.ones(())})
    _same_seq_mean(mine, theirs)
    np.testing.assert_allclose(mine["log_prob"], theirs["pi_logprobs"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mine.grads["hidden"], theirs.grads["pi_old_outputs"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mine.grads["weight"], theirs.grads["weight"], rtol=1e-12, atol=1e-15)


def test_truncate_for_logprobs_is_torchtunes():
    r = np.random.default_rng(24)
    x = r.normal(size=(2, 6, 3))
    cot = r.normal(size=(2, 3, 3))
    mine = core.policy.sequence_mean.truncate_for_logprobs(context=3, logits=x, cotangents={"out": cot})
    theirs = ops.call("torchtune.truncate_sequence_for_logprobs", context_length=3, query_response_logits=x,
                      cotangents={"logits": cot})
    np.testing.assert_array_equal(mine["out"].reshape(-1), np.asarray(theirs["logits"]).reshape(-1))
    np.testing.assert_array_equal(mine["out"], x[:, 2:-1])
    np.testing.assert_array_equal(mine.grads["logits"], np.asarray(theirs.grads["query_response_logits"]).reshape(x.shape))


def _same_metrics(mine, mine_prefix, theirs, their_prefix, names):
    assert names, "nothing compared"
    for n in names:
        np.testing.assert_allclose(mine[mine_prefix + n], theirs[their_prefix + n], rtol=1e-12, atol=1e-15,
                                   err_msg=n)


def _is_names(mine, prefix=""):
    return [k[len(prefix):] for k in mine.metrics if k.startswith(prefix) and "." not in k[len(prefix):]]


@pytest.mark.parametrize("level,threshold,bn", [
    ("token", 2.0, False), ("sequence", "0.5_2.0", False), ("token", "0.8_1.25", True), ("sequence", 5.0, True)])
def test_rollout_correction_weights_are_verls(level, threshold, bn):
    r = np.random.default_rng(31)
    kw = log_ratio_batch(r, nan_padding=False)
    if isinstance(threshold, str):
        lo, up = map(float, threshold.split("_"))
    else:
        lo, up = None, threshold
    mine = core.policy.rollout.rollout_correction_weights(cfg=is_cfg(level.capitalize(), up, lo, bn), **kw)
    theirs = ops.call("verl.compute_rollout_correction_weights", rollout_is=level, rollout_is_threshold=threshold,
                      rollout_is_batch_normalize=bn, log_ratio=kw["log_ratio"], response_mask=kw["mask"])
    np.testing.assert_allclose(mine["weights"], theirs["rollout_is_weights"], rtol=1e-12, atol=1e-15)
    _same_metrics(mine, "", theirs, "rollout_is_", _is_names(mine))


def _rs_names(mine, prefix=""):
    out = []
    for k in mine.metrics:
        if not k.startswith(prefix):
            continue
        out.append(k[len(prefix):])
    return out


def _rs_peer(name):
    return name.replace(".", "_")


@pytest.mark.parametrize("options,thresholds", [
    ("token_k1", "0.8_1.25"), ("seq_mean_k3", 0.02), ("seq_sum_k1", "0.5_2.0"), ("token_k2", 0.05)])
def test_rollout_rejection_mask_is_verls(options, thresholds):
    r = np.random.default_rng(32)
    kw = log_ratio_batch(r, nan_padding=False)
    mine = core.policy.rollout.rollout_rejection_mask(cfg=rs_cfg(options, thresholds), **kw)
    theirs = ops.call("verl.compute_rollout_rejection_mask", rollout_rs=options, rollout_rs_threshold=thresholds,
                      log_ratio=kw["log_ratio"], response_mask=kw["mask"])
    np.testing.assert_array_equal(mine["keep"], theirs["modified_response_mask"])
    names = _rs_names(mine)
    assert f"{options}.masked_fraction" in names
    for n in names:
        np.testing.assert_allclose(mine[n], theirs["rollout_rs_" + _rs_peer(n)], rtol=1e-12, atol=1e-15, err_msg=n)


@pytest.mark.parametrize("rollout_is,rollout_rs,rs_threshold", [
    (None, None, None), ("token", "token_k1,seq_max_k3", "0.75_1.3,0.15"), ("sequence", "seq_mean_k3", 0.04)])
def test_rollout_correction_and_rejection_is_verls(rollout_is, rollout_rs, rs_threshold):
    r = np.random.default_rng(33)
    lp, rl, mask = two_policies(r, nan_padding=False)
    cfg = correction(is_=is_cfg(rollout_is.capitalize(), 2.0) if rollout_is else None,
                     rs=rs_cfg(rollout_rs, rs_threshold) if rollout_rs else None)
    mine = core.policy.rollout.rollout_correction_and_rejection(cfg=cfg, log_prob=lp, rollout_log_prob=rl, mask=mask)
    peer_kw = dict(rollout_is=rollout_is, rollout_is_threshold=2.0, rollout_rs=rollout_rs,
                   rollout_rs_threshold=rs_threshold)
    theirs = ops.call("verl.compute_rollout_correction_and_rejection_mask", old_log_prob=lp, rollout_log_prob=rl,
                      response_mask=mask, **{k: v for k, v in peer_kw.items() if v is not None})
    np.testing.assert_array_equal(mine["keep"], theirs["modified_response_mask"])
    if rollout_is:
        np.testing.assert_allclose(mine["weights"], theirs["rollout_is_weights"], rtol=1e-12, atol=1e-15)
        _same_metrics(mine, "is.", theirs, "rollout_corr/rollout_is_", _is_names(mine, "is."))
    else:
        assert not any(k.startswith("is.") for k in mine.metrics)
    if rollout_rs:
        for n in _rs_names(mine, "rs."):
            np.testing.assert_allclose(mine["rs." + n], theirs["rollout_corr/rollout_rs_" + _rs_peer(n)],
                                       rtol=1e-12, atol=1e-15, err_msg=n)
    else:
        np.testing.assert_array_equal(mine["keep"], mask)
    _same_metrics(mine, "off_policy.", theirs, "rollout_corr/", _is_names(mine, "off_policy."))
    # off_policy_metrics alone gives the same numbers
    alone = core.policy.rollout.off_policy_metrics(log_prob=lp, rollout_log_prob=rl, mask=mask)
    assert len(alone.metrics) == 13
    _same_metrics(alone, "", theirs, "rollout_corr/", list(alone.metrics))


@pytest.mark.parametrize("loss_type,agg,rollout_is,rollout_rs,rs_threshold", [
    ("ppo_clip", "token-mean", None, None, None),
    ("ppo_clip", "seq-mean-token-mean", "token", "token_k1", "0.75_1.3"),
    ("reinforce", "token-sum", "sequence", None, None),
    ("reinforce", "seq-mean-token-sum-norm", None, "seq_max_k2", 0.1),
])
def test_bypass_policy_loss_is_verls_bypass_mode(loss_type, agg, rollout_is, rollout_rs, rs_threshold):
    r = np.random.default_rng(34)
    corr = correction(is_=is_cfg(rollout_is.capitalize(), 2.0) if rollout_is else None,
                      rs=rs_cfg(rollout_rs, rs_threshold) if rollout_rs else None)
    kw = bypass(r, loss=VERL_CLIP if loss_type == "ppo_clip" else "Reinforce", corr=corr, agg=agg)
    mine = core.policy.rollout.bypass_policy_loss(grad=True, **kw)
    peer_kw = dict(rollout_is=rollout_is, rollout_is_threshold=2.0 if rollout_is else None, rollout_rs=rollout_rs,
                   rollout_rs_threshold=rs_threshold)
    theirs = ops.call("verl.policy_loss", loss_mode="bypass_mode", loss_type=loss_type, loss_agg_mode=agg,
                      clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                      old_log_prob=kw["rollout_log_prob"], log_prob=kw["log_prob"], advantages=kw["advantages"],
                      response_mask=kw["mask"], cotangents={"pg_loss": np.ones(())},
                      **{k: v for k, v in peer_kw.items() if v is not None})
    np.testing.assert_allclose(mine["loss"], theirs["pg_loss"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mine.grads["log_prob"], theirs.grads["log_prob"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mine["ppo_kl"], theirs["ppo_kl"], rtol=1e-12, atol=1e-15)
    if loss_type == "ppo_clip":
        for n in ["pg_clipfrac", "pg_clipfrac_lower"]:
            np.testing.assert_allclose(mine[n], theirs[n], rtol=1e-12, atol=1e-15)
    _same_metrics(mine, "correction.off_policy.", theirs, "rollout_corr/",
                  _is_names(mine, "correction.off_policy."))
    if rollout_is:
        _same_metrics(mine, "correction.is.", theirs, "rollout_corr/rollout_is_", _is_names(mine, "correction.is."))
    if rollout_rs:
        np.testing.assert_array_equal(mine["keep"] <= kw["mask"], True)
        for n in _rs_names(mine, "correction.rs."):
            np.testing.assert_allclose(mine["correction.rs." + n], theirs["rollout_corr/rollout_rs_" + _rs_peer(n)],
                                       rtol=1e-12, atol=1e-15, err_msg=n)


@pytest.mark.parametrize("mode,clip_min,clip_max", [
    ("token_truncate", None, 3.0), ("token_mask", 0.8, 1.2), ("sequence_truncate", 0.5, 2.0),
    ("sequence_mask", None, 2.0)])
def test_vllm_importance_sampling_ratio_is_trls(mode, clip_min, clip_max):
    r = np.random.default_rng(35)
    rust_mode = "".join(p.capitalize() for p in mode.split("_"))
    kw = vllm(r, rust_mode, clip_min, clip_max)
    kw["sampling_log_prob"] = np.where(kw["mask"], kw["sampling_log_prob"], -1.0)  # TRL multiplies by the mask
    mine = core.policy.rollout.vllm_importance_sampling_ratio(**kw)
    theirs = ops.call("trl.grpo_vllm_importance_sampling_ratio", vllm_importance_sampling_mode=mode,
                      vllm_importance_sampling_clip_min=clip_min, vllm_importance_sampling_clip_max=clip_max,
                      old_per_token_logps=kw["old_log_prob"], sampling_per_token_logps=kw["sampling_log_prob"],
                      completion_mask=kw["mask"])
    np.testing.assert_allclose(mine["ratio"].reshape(-1), np.asarray(theirs["importance_sampling_ratio"]).reshape(-1),
                               rtol=1e-12, atol=1e-15)
    assert mine["num_items"] == int(np.asarray(theirs["num_items_in_batch"]).reshape(-1)[0])
    for a, b in [("logp_difference_mean", "sampling/sampling_logp_difference/mean"),
                 ("logp_difference_max", "sampling/sampling_logp_difference/max"),
                 ("ratio_min", "sampling/importance_sampling_ratio/min"),
                 ("ratio_mean", "sampling/importance_sampling_ratio/mean"),
                 ("ratio_max", "sampling/importance_sampling_ratio/max")]:
        np.testing.assert_allclose(mine[a], theirs[b], rtol=1e-12, atol=1e-15, err_msg=a)
