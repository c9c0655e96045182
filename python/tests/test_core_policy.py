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


def grpo_batch(rng, b=4, t=6, old=True, ref=False, even=False):
    """TRL-shaped inputs: [B, T] log-probs/entropies/mask, [B] advantages;
    row 0 fully masked, holes elsewhere. ``even``: an even number of valid
    tokens (so an entropy quantile falls strictly between two entropies)."""
    lp = -np.abs(rng.normal(size=(b, t))) - 0.1
    mask = rng.random((b, t)) > 0.3
    mask[0, :] = False
    mask[1, :2] = True
    if even and mask.sum() % 2:
        k = np.argwhere(mask)[-1]
        mask[k[0], k[1]] = False
    kw = dict(log_probs=lp, entropies=rng.random((b, t)) * 2.0 + 0.05, mask=mask,
              advantages=rng.normal(size=b))
    if old:
        kw["old_log_probs"] = lp + 0.3 * rng.normal(size=(b, t))
    if ref:
        kw["ref_log_probs"] = lp + 0.2 * rng.normal(size=(b, t))
    return kw


def grpo(rng, loss_type="Grpo", batch=None, **fields):
    return dict(cfg=core.config("GrpoConfig", preset="trl", loss_type=loss_type, **fields),
                **(batch or grpo_batch(rng)))


def trl_norm(**kw):
    return core.config("TrlNormalizer", **kw)


def clipped(rng, ratio="Token", correction=None, token_level_loss=True, dual_clip=None, rollout=False):
    clip = core.config("ClipConfig", preset="openrlhf", eps_low=0.2, eps_high=0.28, dual_clip=dual_clip)
    cfg = core.config("ClippedPolicyLoss", clip=clip, ratio=ratio, token_level_loss=token_level_loss,
                      correction=correction)
    kw = dict(cfg=cfg, **token_batch(rng))
    if rollout:
        kw["rollout_log_prob"] = kw["old_log_prob"] + 0.3 * rng.normal(size=kw["old_log_prob"].shape)
    return kw


def is_corr(kind, low=0.5, high=2.0):
    return core.config("RolloutIsCorrection", kind=kind, low=low, high=high)


def surrogate(rng, preset="verl"):
    shape = (3, 5)
    lp = -np.abs(rng.normal(size=shape)) - 0.1
    old = lp + 0.4 * rng.normal(size=shape)
    # beyond the ±20 clamp (verl, openrlhf); a large ratio without it (trl:
    # e^30 would swamp the finite differences of the other elements)
    old[0, 0] = lp[0, 0] - (3.0 if preset == "trl" else 30.0)
    return dict(cfg=core.config("ClipConfig", preset=preset, eps_low=0.2, eps_high=0.28),
                log_prob=lp, old_log_prob=old, advantage=rng.normal(size=shape))


def vespo(rng, ratio=None, **gamma):
    b, t = 4, 6
    mask = rng.random((b, t)) > 0.3
    mask[0, :] = False
    kw = dict(gamma=core.config("VespoGamma", **gamma), advantages=rng.normal(size=b),
              log_ratio=0.3 * rng.normal(size=(b, t)), mask=mask)
    if ratio == "token":
        kw["importance_sampling_ratio"] = np.exp(0.2 * rng.normal(size=(b, t)))
    elif ratio == "row":
        kw["importance_sampling_ratio"] = np.exp(0.2 * rng.normal(size=b))
    return kw


def token_weight(loss_type, **norm):
    return lambda r: dict(loss_type=loss_type, norm=trl_norm(**norm), dims={"batch": 4, "seq": 6},
                          row_valid=3, total_valid=11)


def vl(loss):
    return lambda r: dict(loss=loss, agg="token-mean", **token_batch(r))


NO_FD = {"fd": False}

CASES = {
    "policy::token::policy_loss": [
        lambda r: ppo(r),
        lambda r: ppo(r, "trl", "token-mean"),
        lambda r: {**ppo(r, "openrlhf", "seq-mean-token-sum-norm"),
                   "norm": core.config("GlobalNorm", dp_size=2.0, batch_num_tokens=7.0)},
        lambda r: {**ppo(r, agg="token-sum"), "is_weights": r.random((3, 6)) + 0.5},
        vl("LogProb"),
        vl({"SoftGate": {"tau_pos": 1.0, "tau_neg": 1.05}}),
        vl({"QuadraticPenalty": {"beta": 0.5}}),
        vl({"GeometricMean": {"eps_low": 0.2, "eps_high": 0.28}}),
        vl({"KlCov": {"ratio": 0.2, "coef": 0.1, "log_ratio_clamp": 20.0}}),
        vl({"ClipCov": {"clip": core.config("ClipConfig", preset="trl", eps_low=0.2, eps_high=0.2),
                        "ratio": 0.2, "lb": -5.0, "ub": 5.0}}),
    ],
    "policy::ppo_clipped_surrogate": [
        lambda r: surrogate(r),
        lambda r: surrogate(r, "trl"),
        lambda r: surrogate(r, "openrlhf"),
    ],
    "policy::ppo::clipped_policy_loss": [
        lambda r: clipped(r),
        lambda r: clipped(r, dual_clip=3.0, token_level_loss=False),
        lambda r: clipped(r, ratio="Sequence"),
        lambda r: clipped(r, correction=is_corr("Truncate"), rollout=True),
        lambda r: clipped(r, correction=is_corr("TokenMask", 0.8, 1.25), rollout=True),
        lambda r: clipped(r, correction=is_corr("SequenceMask", 0.5, 2.0), rollout=True),
        lambda r: clipped(r, ratio="Sequence", correction=is_corr("Truncate"), rollout=True),
        lambda r: {**clipped(r), "norm": core.config("GlobalNorm", dp_size=2.0, batch_num_tokens=9.0)},
    ],
    "policy::grpo::grpo_loss": [
        lambda r: grpo(r),
        lambda r: grpo(r, eps_high=0.28, delta=1.3, beta=0.04, batch=grpo_batch(r, ref=True)),
        lambda r: grpo(r, "Bnpo", beta=0.1, bias_correction_kl=True, batch=grpo_batch(r, ref=True)),
        lambda r: grpo(r, "DrGrpo", norm=trl_norm(max_completion_length=9.0, train=False)),
        lambda r: grpo(r, "Dapo", norm=trl_norm(num_items_in_batch=13.0, num_processes=2.0,
                                                 gradient_accumulation_steps=2.0),
                       entropy_bonus=core.config("EntropyBonus", coef=0.01, adaptive=None)),
        lambda r: grpo(r, "Luspo", norm=trl_norm(gradient_accumulation_steps=2.0)),
        lambda r: grpo(r, "Luspo", norm=trl_norm(gradient_accumulation_steps=2.0, steps_per_generation=4.0)),
        lambda r: grpo(r, "Sapo", sapo_temperature_pos=2.0, sapo_temperature_neg=0.5),
        lambda r: grpo(r, level="Sequence", eps_low=3e-4, eps_high=4e-4),
        lambda r: grpo(r, top_entropy_quantile=0.5, batch=grpo_batch(r, even=True),
                       entropy_bonus=core.config("EntropyBonus", coef=0.05, adaptive=None)),
        lambda r: {**grpo(r, vllm_is_correction=True), "importance_sampling_ratio": np.exp(0.2 * r.normal(size=(4, 6)))},
        lambda r: {**grpo(r, "Bnpo", level="Sequence", vllm_is_correction=True),
                   "importance_sampling_ratio": np.exp(0.2 * r.normal(size=4))},
        lambda r: (lambda kw: {**kw, "sampling_log_probs": kw["old_log_probs"] + 0.1 * r.normal(size=(4, 6))})(
            grpo(r, off_policy_mask_threshold=0.02)),
        lambda r: grpo(r, "Dapo", norm=trl_norm(num_items_in_batch=26.0, gradient_accumulation_steps=4.0,
                                                 steps_per_generation=2.0),
                       entropy_bonus=core.config("EntropyBonus", coef=0.01, adaptive=core.config(
                           "AdaptiveEntropy", target=2.0, coef_min=0.0, coef_max=1.0, coef_delta=0.005,
                           last_world_entropy=0.5))),
        # straight-through by design (their own tests below): CISPO and VESPO
        # weigh log π by a detached function of the ratio, GSPO-token keeps
        # only the token's own log π in the gradient, and on-policy has a
        # constant ratio 1 with the gradient −A·w.
        lambda r: {**grpo(r, "Cispo", eps_high=1.2), "_check": NO_FD},
        lambda r: {**grpo(r, "Vespo"), "_check": NO_FD},
        lambda r: {**grpo(r, "Vespo", vllm_is_correction=False), "importance_sampling_ratio": np.exp(0.2 * r.normal(size=(4, 6))),
                   "_check": NO_FD},
        lambda r: {**grpo(r, level="SequenceToken"), "_check": NO_FD},
        lambda r: {**grpo(r, batch=grpo_batch(r, old=False)), "_check": NO_FD},
    ],
    "policy::grpo::gmpo_loss": [
        lambda r: dict(cfg=core.config("GmpoConfig", preset="trl"), **grpo_batch(r)),
        lambda r: dict(cfg=core.config("GmpoConfig", preset="trl", eps_low=0.2, eps_high=0.3, beta=0.04),
                       **grpo_batch(r, ref=True)),
        lambda r: dict(cfg=core.config("GmpoConfig", preset="trl", top_entropy_quantile=0.5,
                                       gradient_accumulation_steps=2.0), **grpo_batch(r, even=True)),
        lambda r: dict(cfg=core.config("GmpoConfig", preset="trl", gradient_accumulation_steps=4.0, train=False),
                       **grpo_batch(r)),
    ],
    "policy::grpo::rloo_loss": [
        lambda r: rloo(r),
        lambda r: rloo(r, eps_low=0.1, eps_high=0.5),
        lambda r: rloo(r, log_ratio_clamp=None),
    ],
    "policy::grpo::vespo_gamma_weights": [
        lambda r: vespo(r),
        lambda r: vespo(r, "token", k_pos=1.5, lambda_pos=1.0),
        lambda r: vespo(r, "row", k_neg=4.0, lambda_neg=1e-5),
    ],
    "policy::grpo::trl_token_weight": [
        token_weight("Grpo"),
        token_weight("Bnpo", gradient_accumulation_steps=2.0),
        token_weight("DrGrpo", max_completion_length=9.0),
        token_weight("Dapo", num_items_in_batch=13.0, num_processes=2.0),
        token_weight("Luspo", gradient_accumulation_steps=2.0, train=False),
        token_weight("Luspo", steps_per_generation=4.0),
    ],
}


def rloo(rng, **fields):
    kw = grpo_batch(rng, old=False)
    kw["old_logps"] = np.where(kw["mask"], kw["log_probs"], 0.0).sum(1) + 0.2 * rng.normal(size=4)
    return dict(cfg=core.config("policy::grpo::RlooConfig", preset="trl", **fields), **kw)


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


def _trl_params(loss_type="grpo", level="token", **kw):
    p = dict(loss_type=loss_type, importance_sampling_level=level, epsilon=0.2, epsilon_high=0.2, delta=None,
             beta=0.0, top_entropy_quantile=1.0, max_completion_length=6, num_items_in_batch=13,
             num_processes=1, current_gradient_accumulation_steps=1, mode="train")
    p.update(kw)
    return p


def _trl_inputs(kw):
    names = {"log_probs": "per_token_logps", "entropies": "entropies", "mask": "completion_mask",
             "advantages": "advantages", "old_log_probs": "old_per_token_logps",
             "ref_log_probs": "ref_per_token_logps", "importance_sampling_ratio": "importance_sampling_ratio",
             "sampling_log_probs": "sampling_per_token_logps"}
    return {names[k]: v for k, v in kw.items() if k in names}


@pytest.mark.parametrize("trl,cfg,extra", [
    (_trl_params(), dict(loss_type="Grpo"), {}),
    (_trl_params("grpo", epsilon_high=0.28, delta=1.3, beta=0.04),
     dict(loss_type="Grpo", eps_high=0.28, delta=1.3, beta=0.04), {"ref": True}),
    (_trl_params("bnpo", beta=0.1, use_bias_correction_kl=True),
     dict(loss_type="Bnpo", beta=0.1, bias_correction_kl=True), {"ref": True}),
    (_trl_params("dapo", num_processes=2, current_gradient_accumulation_steps=2, entropy_coef=0.01),
     dict(loss_type="Dapo", norm={"num_items_in_batch": 13.0, "num_processes": 2.0,
                                  "gradient_accumulation_steps": 2.0},
          entropy_bonus={"coef": 0.01, "adaptive": None}), {}),
    (_trl_params("luspo", mode="eval"), dict(loss_type="Luspo", norm={"train": False}), {}),
    (_trl_params("cispo", epsilon_high=1.2), dict(loss_type="Cispo", eps_high=1.2), {}),
    (_trl_params("sapo"), dict(loss_type="Sapo"), {}),
    (_trl_params("vespo"), dict(loss_type="Vespo"), {}),
    (_trl_params("grpo", "sequence", epsilon=3e-4, epsilon_high=4e-4),
     dict(loss_type="Grpo", level="Sequence", eps_low=3e-4, eps_high=4e-4), {}),
    (_trl_params("grpo", top_entropy_quantile=0.5), dict(loss_type="Grpo", top_entropy_quantile=0.5), {"even": True}),
    (_trl_params("grpo", use_vllm=True, vllm_importance_sampling_correction=True),
     dict(loss_type="Grpo", vllm_is_correction=True), {"is": True}),
    (_trl_params("grpo", off_policy_mask_threshold=0.02),
     dict(loss_type="Grpo", off_policy_mask_threshold=0.02), {"sampling": True}),
])
def test_grpo_loss_is_trls_grpo_loss(trl, cfg, extra):
    r = np.random.default_rng(11)
    kw = grpo_batch(r, ref=extra.get("ref", False), even=extra.get("even", False))
    if extra.get("is"):
        kw["importance_sampling_ratio"] = np.exp(0.2 * r.normal(size=(4, 6)))
    if extra.get("sampling"):
        kw["sampling_log_probs"] = kw["old_log_probs"] + 0.1 * r.normal(size=(4, 6))
    base = dict(cfg)
    lt = base.pop("loss_type")
    if "norm" in base:
        base["norm"] = trl_norm(max_completion_length=6.0, num_items_in_batch=13.0, **{
            k: v for k, v in base["norm"].items() if k != "num_items_in_batch"})
    else:
        base["norm"] = trl_norm(max_completion_length=6.0, num_items_in_batch=13.0)
    mine = core.policy.grpo.grpo_loss(cfg=core.config("GrpoConfig", preset="trl", loss_type=lt, **base),
                                      grad=True, **kw)
    peer = ops.call("trl.grpo_loss", cotangents={"loss": np.ones(())}, **trl, **_trl_inputs(kw))
    np.testing.assert_allclose(mine["loss"], peer["loss"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mine.metrics["entropy"], peer["entropy"], rtol=1e-12, atol=1e-15)
    for k in ["low_mean", "high_mean", "region_mean", "low_min", "high_max"]:
        if "clip_ratio/" + k in peer.outputs:
            np.testing.assert_allclose(mine.metrics["clip." + k], peer["clip_ratio/" + k], rtol=1e-12, atol=1e-15)
    if "kl" in peer.outputs:
        np.testing.assert_allclose(mine.metrics["kl"], peer["kl"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mine.grads["log_probs"], peer.grads["per_token_logps"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mine.grads["entropies"], peer.grads["entropies"], rtol=1e-12, atol=1e-15)


def test_gmpo_loss_is_trls_gmpo_loss():
    r = np.random.default_rng(12)
    kw = grpo_batch(r, ref=True)
    mine = core.policy.grpo.gmpo_loss(cfg=core.config("GmpoConfig", preset="trl", eps_low=0.2, eps_high=0.3,
                                                      beta=0.04, gradient_accumulation_steps=2.0), grad=True, **kw)
    peer = ops.call("trl.gmpo_loss", epsilon=0.2, epsilon_high=0.3, beta=0.04, top_entropy_quantile=1.0,
                    current_gradient_accumulation_steps=2, mode="train", cotangents={"loss": np.ones(())},
                    **_trl_inputs(kw))
    np.testing.assert_allclose(mine["loss"], peer["loss"], rtol=1e-12)
    np.testing.assert_allclose(mine.metrics["kl"], peer["kl"], rtol=1e-12)
    np.testing.assert_allclose(mine.metrics["clip.region_mean"], peer["clip_ratio/region_mean"], rtol=1e-12)
    np.testing.assert_allclose(mine.grads["log_probs"], peer.grads["per_token_logps"], rtol=1e-12, atol=1e-15)


def test_rloo_loss_is_trls_rloo_loss():
    kw = rloo(np.random.default_rng(13), eps_high=0.28)
    kw.pop("cfg")
    mine = core.policy.grpo.rloo_loss(cfg=core.config("policy::grpo::RlooConfig", preset="trl", eps_high=0.28), grad=True, **kw)
    peer = ops.call("trl.rloo_loss", epsilon=0.2, epsilon_high=0.28, mode="train", old_logps=kw["old_logps"],
                    cotangents={"loss": np.ones(())}, **_trl_inputs(kw))
    np.testing.assert_allclose(mine["loss"], peer["loss"], rtol=1e-12)
    np.testing.assert_allclose(mine.metrics["clip.high_mean"], peer["clip_ratio/high_mean"], rtol=1e-12)
    np.testing.assert_allclose(mine.grads["log_probs"], peer.grads["per_token_logps"], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("ratio,correction,peer_kw", [
    ("Token", None, dict(policy_loss_type="ppo", token_level_loss=True, enable_vllm_is_correction=False)),
    ("Sequence", None, dict(policy_loss_type="gspo", token_level_loss=False, enable_vllm_is_correction=False)),
    ("Token", ("Truncate", 0.5, 2.0), dict(policy_loss_type="ppo", token_level_loss=True,
                                           enable_vllm_is_correction=True, vllm_is_truncated_threshold=[0.5, 2.0],
                                           vllm_is_correction_type="tis")),
    ("Token", ("TokenMask", 0.8, 1.25), dict(policy_loss_type="ppo", token_level_loss=False,
                                             enable_vllm_is_correction=True, vllm_is_truncated_threshold=[0.8, 1.25],
                                             vllm_is_correction_type="icepop")),
    ("Token", ("SequenceMask", 0.5, 2.0), dict(policy_loss_type="ppo", token_level_loss=True,
                                               enable_vllm_is_correction=True, vllm_is_truncated_threshold=[0.5, 2.0],
                                               vllm_is_correction_type="seq-mask-tis")),
])
def test_clipped_policy_loss_is_openrlhfs_policy_loss(ratio, correction, peer_kw):
    r = np.random.default_rng(14)
    corr = is_corr(*correction) if correction else None
    kw = clipped(r, ratio=ratio, correction=corr, token_level_loss=peer_kw["token_level_loss"],
                 dual_clip=3.0, rollout=True)
    mine = core.policy.ppo.clipped_policy_loss(grad=True, **kw)
    peer = ops.call("openrlhf.policy_loss", clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0,
                    log_probs=kw["log_prob"], old_log_probs=kw["old_log_prob"], advantages=kw["advantages"],
                    action_mask=kw["mask"], rollout_log_probs=kw["rollout_log_prob"],
                    cotangents={"loss": np.ones(())}, **peer_kw)
    np.testing.assert_allclose(mine["loss"], peer["loss"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mine.metrics["clip_ratio"], peer["clip_ratio"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mine.metrics["approx_kl"], peer["ppo_kl"], rtol=1e-12, atol=1e-15)
    if "rollout_kl" in mine.metrics:
        np.testing.assert_allclose(mine.metrics["rollout_kl"], peer["vllm_kl"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mine.grads["log_prob"], peer.grads["log_probs"], rtol=1e-12, atol=1e-15)


def test_vespo_gamma_weights_is_trls_get_gamma_weights():
    kw = vespo(np.random.default_rng(15), "token", k_pos=1.5, lambda_pos=1.0)
    g = kw.pop("gamma")
    mine = core.policy.grpo.vespo_gamma_weights(gamma=g, **kw)
    peer = ops.call("trl.get_gamma_weights", **g, advantages=kw["advantages"][:, None],
                    log_ratio_per_token=kw["log_ratio"], mask=kw["mask"],
                    importance_sampling_ratio=kw["importance_sampling_ratio"])
    np.testing.assert_allclose(mine["phi"], np.ravel(peer["phi_seq"]), rtol=1e-12, atol=1e-300)


def test_ppo_clipped_surrogate_sums_to_policy_loss():
    r = np.random.default_rng(16)
    kw = surrogate(r)
    one = core.policy.ppo_clipped_surrogate(grad=True, **kw)
    tot = core.policy.token.policy_loss(loss={"Ppo": kw["cfg"]}, agg="token-sum", log_prob=kw["log_prob"],
                                        old_log_prob=kw["old_log_prob"], advantages=kw["advantage"],
                                        mask=np.ones(kw["log_prob"].shape, bool), grad=True)
    np.testing.assert_allclose(np.sum(one["loss"]), tot["loss"], rtol=1e-12)
    np.testing.assert_allclose(one.grads["log_prob"], tot.grads["log_prob"], rtol=1e-12, atol=1e-15)
    assert one["clipped"].dtype == bool and one["ratio"][0, 0] == np.exp(20.0)


def _grpo_grad(lt, kw, **fields):
    return core.policy.grpo.grpo_loss(cfg=core.config("GrpoConfig", preset="trl", loss_type=lt, **fields),
                                      grad=True, **kw)


def test_grpo_cispo_gradient_is_the_detached_weight():
    # dapo-normalised: ∂L/∂log π_t = −min(r_t, ε_high)·A_i · num_processes / num_items
    kw = grpo_batch(np.random.default_rng(17))
    out = _grpo_grad("Cispo", kw, eps_high=1.2, norm=trl_norm(num_items_in_batch=13.0))
    r = np.exp(kw["log_probs"] - kw["old_log_probs"])
    want = np.where(kw["mask"], -np.minimum(r, 1.2) * kw["advantages"][:, None] / 13.0, 0.0)
    np.testing.assert_allclose(out.grads["log_probs"], want, rtol=1e-12, atol=1e-15)


def test_grpo_vespo_gradient_is_the_gamma_weight():
    kw = grpo_batch(np.random.default_rng(18))
    out = _grpo_grad("Vespo", kw, norm=trl_norm(num_items_in_batch=13.0))
    phi = core.policy.grpo.vespo_gamma_weights(advantages=kw["advantages"], mask=kw["mask"],
                                               log_ratio=kw["log_probs"] - kw["old_log_probs"])["phi"]
    want = np.where(kw["mask"], -(phi * kw["advantages"])[:, None] / 13.0, 0.0)
    np.testing.assert_allclose(out.grads["log_probs"], want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(out.metrics["vespo_phi_seq_mean"], phi.mean(), rtol=1e-12)


def test_grpo_sequence_token_equals_sequence_for_grpo():
    # per-row advantages and grpo's per-row weights: GSPO-token's per-token
    # gradient equals GSPO's gradient spread over the row
    kw = grpo_batch(np.random.default_rng(19))
    a = _grpo_grad("Grpo", kw, level="SequenceToken")
    b = _grpo_grad("Grpo", kw, level="Sequence")
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-12)
    np.testing.assert_allclose(a.grads["log_probs"], b.grads["log_probs"], rtol=1e-12, atol=1e-15)


def test_grpo_on_policy_equals_old_log_probs_equal_to_log_probs():
    kw = grpo_batch(np.random.default_rng(20), old=False)
    a = _grpo_grad("Bnpo", kw)
    b = _grpo_grad("Bnpo", {**kw, "old_log_probs": kw["log_probs"].copy()})
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-12)
    np.testing.assert_allclose(a.grads["log_probs"], b.grads["log_probs"], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("lt,norm", [("Grpo", {}), ("Bnpo", {"gradient_accumulation_steps": 2.0}),
                                     ("DrGrpo", {"max_completion_length": 9.0}),
                                     ("Dapo", {"num_items_in_batch": 13.0, "num_processes": 2.0})])
def test_trl_token_weight_is_grpo_loss_weight(lt, norm):
    # ratio 1 (inside the clip): ∂L/∂log π_t = −A_i · w(n_i, N)
    kw = grpo_batch(np.random.default_rng(21), old=False)
    out = _grpo_grad(lt, kw, norm=trl_norm(**norm))
    b, t = kw["mask"].shape
    n = kw["mask"].sum(1)
    for i in range(b):
        w = core.policy.grpo.trl_token_weight(loss_type=lt, norm=trl_norm(**norm), dims={"batch": b, "seq": t},
                                              row_valid=int(n[i]), total_valid=int(n.sum()))["weight"]
        want = np.where(kw["mask"][i], -kw["advantages"][i] * w, 0.0)
        np.testing.assert_allclose(out.grads["log_probs"][i], want, rtol=1e-12, atol=1e-15)


def test_configs_validate_and_normalise():
    clip = core.config("ClipConfig", preset="openrlhf", eps_low=0.2, eps_high=0.2)
    c = core.config("ClippedPolicyLoss", clip=clip, ratio="Sequence", token_level_loss=True, correction=None)
    assert c["token_level_loss"] is False  # GSPO forces per-sequence aggregation
    with pytest.raises(ValueError):
        core.config("RolloutIsCorrection", kind="Truncate", low=2.0, high=1.0)
    with pytest.raises(ValueError):
        core.config("GrpoConfig", preset="verl", loss_type="Grpo")
    with pytest.raises(ValueError):
        core.config("GrpoConfig", preset="trl", loss_type="Grpo", top_entropy_quantile=1.5)
    with pytest.raises(ValueError):
        core.config("TrlNormalizer", num_processes=0.5)
    with pytest.raises(ValueError):
        core.config("AdaptiveEntropy", target=1.0, coef_min=1.0, coef_max=0.5, coef_delta=0.1,
                    last_world_entropy=0.0)
    with pytest.raises(ValueError):
        core.config("VerlPolicyParams", clip_ratio_c=0.5)
    with pytest.raises(ValueError):
        core.config("DivergenceConfig", eps_low=0.2, eps_high=0.2, truncation=0.0)
    assert core.config("VespoGamma")["k_pos"] == 2.0
    assert core.config("GmpoConfig", preset="trl")["eps_low"] == 0.4
    assert core.config("policy::grpo::RlooConfig", preset="trl")["log_ratio_clamp"] == 20.0
    assert core.config("VerlPolicyParams")["clip_ratio_c"] == 3.0
