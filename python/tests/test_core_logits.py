"""Cases for ``posttrain.ops.core``'s logits, sequence, distill and fused
modules (see ``core_check``), and cross-checks against the peer-named ops
running the same core functions."""

import os
import signal

import numpy as np
import pytest

from posttrain import ops
from posttrain.ops import core

from core_check import params, run_cases

B, T, V = 2, 3, 5


def logits(rng, shape=(B, T, V), scale=2.0):
    return scale * rng.normal(size=shape)


def ids(rng, shape=(B, T), vocab=V):
    return rng.integers(0, vocab, size=shape).astype(np.int64)


def with_neg_inf(rng, shape=(B, T, V)):
    z = logits(rng, shape)
    z[0, 1, 2] = -np.inf  # a zero-probability entry: skipped, never 0·∞
    return z


def token_mask(rng, b=3, t=4):
    m = rng.random((b, t)) > 0.3
    m[0, :] = False  # an empty row
    m[1, 0] = True
    return m


def log_probs(rng, shape):
    z = logits(rng, shape)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def seq_labels(rng, b=3, t=4, vocab=V):
    lab = ids(rng, (b, t), vocab)
    lab[0, :] = -100  # a row with no valid label
    lab[1, 2] = -100  # a hole
    return lab


def distill(rng, beta=0.5, temperature=1.0, reduction="BatchMean", num_items=None, masked=True,
            shape=(B, T, V)):
    kw = dict(cfg=core.config("DistillConfig", jsd={"beta": beta}, temperature=temperature,
                              reduction=reduction, num_items_in_batch=num_items),
              student_logits=logits(rng, shape), teacher_logits=logits(rng, shape))
    if masked:
        v = rng.random(shape[:-1]) > 0.3
        v[0, 0] = False
        kw["valid"] = v
    return kw


def policy_batch(rng, b=3, t=5):
    lp = -np.abs(rng.normal(size=(b, t))) - 0.1
    mask = rng.random((b, t)) > 0.25
    mask[0, :] = False
    mask[1, 0] = True
    return dict(log_prob=lp, old_log_prob=lp + 0.3 * rng.normal(size=(b, t)),
                advantages=rng.normal(size=(b, t)), mask=mask)


def token_loss_cfg(preset="verl", agg="seq-mean-token-mean", kl=None, coef=0.1):
    clip = core.config("ClipConfig", preset=preset, eps_low=0.2, eps_high=0.28)
    pen = None
    if kl is not None:
        pen = core.config("KlPenalty", estimator=core.config("KlConfig", preset=preset, estimator=kl), coef=coef)
    return core.config("TokenLoss", loss={"Ppo": clip}, agg=agg, norm=core.config("GlobalNorm"), kl=pen)


def token_ids(rng, shape=(4, 7), vocab=6):
    return rng.integers(0, vocab, size=shape)


CASES = {
    "sequence::response_mask_from_eos": [
        lambda r: dict(response_ids=token_ids(r), eos=[2]),
        lambda r: dict(response_ids=token_ids(r), eos=[1, 2]),
        lambda r: dict(response_ids=token_ids(r, (3, 5), 3), eos=[7]),  # no EOS anywhere
    ],
    "sequence::truncate_at_first_stop_token": [
        lambda r: dict(sequences=token_ids(r), stop_tokens=[2], fill=0),
        lambda r: dict(sequences=token_ids(r), stop_tokens=[1, 4], fill=-1),
    ],
    "sequence::reward_penalty_mask": [
        lambda r: dict(padding_masks=np.cumsum(token_ids(r) == 2, axis=1) > 0, seq_lens=r.integers(0, 7, 4)),
        lambda r: dict(cfg=core.config("RewardPenaltyConfig", penalise_no_eos=False, min_response_length=3),
                       padding_masks=np.cumsum(token_ids(r) == 2, axis=1) > 0, seq_lens=r.integers(0, 7, 4)),
    ],
    "logits::log_softmax": [
        lambda r: dict(logits=logits(r)),
        lambda r: dict(logits=logits(r, (7,)), temperature=0.7),
        lambda r: dict(logits=logits(r, scale=8.0), temperature=core.config("Temperature", t=1.3)),
    ],
    "logits::selective_log_softmax": [
        lambda r: dict(logits=logits(r), targets=ids(r)),
        lambda r: dict(logits=logits(r, (4, 11)), targets=ids(r, (4,), 11)),
        lambda r: dict(logits=logits(r, (0, V)), targets=ids(r, (0,))),  # no rows
    ],
    "logits::gather_log_softmax": [
        lambda r: dict(logits=logits(r), targets=ids(r, (B, T, 1))),
        lambda r: dict(logits=logits(r), targets=ids(r, (B, T, 3)), temperature=1.3),
        lambda r: dict(logits=logits(r, (3, 7)), targets=ids(r, (3, 2), 7), temperature=0.7),
    ],
    "logits::entropy_from_logits": [
        lambda r: dict(logits=logits(r)),
        lambda r: dict(logits=with_neg_inf(r)),
        lambda r: dict(logits=logits(r, (11,), scale=5.0)),
    ],
    "logits::sum_pi_squared": [
        lambda r: dict(logits=logits(r)),
        lambda r: dict(logits=with_neg_inf(r)),
    ],
    "logits::sequence_log_probs": [
        lambda r, a=a: dict(cfg=core.config("SequenceLogProbConfig", preset="torchtune", average=a),
                            logits=logits(r, (3, 4, V)), labels=seq_labels(r))
        for a in [False, True]
    ] + [
        lambda r: dict(cfg=core.config("SequenceLogProbConfig", ignore_index=-1, average=True,
                                       shift_labels=False),
                       logits=logits(r, (3, 4, V)), labels=np.where(seq_labels(r) == -100, -1, seq_labels(r))),
    ],
    "logits::entropy_loss": [
        lambda r, m=m: dict(mode=m, logits=logits(r, (3, 4, V)), mask=token_mask(r))
        for m in ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
    ] + [
        lambda r: dict(mode="token-mean", norm=core.config("GlobalNorm", dp_size=2.0, batch_num_tokens=9.0),
                       logits=logits(r, (3, 4, V)), mask=token_mask(r)),
    ],
    "sequence::quantile": [
        lambda r, q=q: dict(q=q, values=r.normal(size=(3, 4))) for q in [0.0, 0.37, 0.5, 1.0]
    ] + [
        # no values: the core's None, NaN here
        lambda r: dict(q=0.5, values=np.zeros((0,)), _check={"finite": False}),
    ],
    "sequence::high_entropy_mask": [
        lambda r, q=q: dict(quantile_q=q, entropies=np.abs(r.normal(size=(3, 4))), mask=token_mask(r))
        for q in [0.0, 0.5, 0.8, 1.0]
    ] + [
        lambda r: dict(quantile_q=0.5, entropies=np.abs(r.normal(size=(2, 3))), mask=np.zeros((2, 3), bool)),
    ],
    "sequence::off_policy_sequence_mask": [
        lambda r, th=th: dict(threshold=th, advantages=r.normal(size=3), **{
            k: v for k, v in policy_batch(r, 3, 4).items() if k in ("log_prob", "mask")},
            sampling_log_prob=-np.abs(r.normal(size=(3, 4))))
        for th in [0.0, 0.1, 1.0]
    ] + [
        lambda r, nan=nan: dict(threshold=0.1, nan=nan, advantages=np.array([-1.0, -0.5, 1.0]),
                                log_prob=np.full((3, 2), -1.0),
                                sampling_log_prob=np.array([[-1.01, np.nan], [-1.0, -1.05], [np.nan, -1.0]]),
                                mask=np.ones((3, 2), bool))
        for nan in ["propagate", "as_on_policy"]
    ],
    "sequence::pf_ppo_sampling_weights": [
        lambda r, m=m: dict(method=m, scores=r.normal(size=(4, 3)))
        for m in [core.config("PfPpoReweight", method="pow"),
                  core.config("PfPpoReweight", method="pow", weight_pow=0.5),
                  "MaxMin", "MaxRandom"]
    ],
    "distill::generalized_jsd_loss": [
        lambda r: distill(r),
        lambda r: distill(r, beta=0.0),
        lambda r: distill(r, beta=1.0, temperature=2.0),
        lambda r: distill(r, beta=0.1, reduction="Sum"),
        lambda r: distill(r, beta=0.5, reduction="Mean", temperature=0.9),
        lambda r: distill(r, beta=0.5, num_items=7.0),
        lambda r: distill(r, beta=0.5, masked=False),
        lambda r: distill(r, beta=0.3, masked=False, shape=(4, V)),
    ],
    "distill::generalized_jsd_elementwise": [
        lambda r: {**{k: v for k, v in distill(r).items() if k != "cfg"}, "jsd": {"beta": 0.3}},
        lambda r: {**{k: v for k, v in distill(r, masked=False).items() if k != "cfg"},
                   "jsd": core.config("Jsd", beta=0.0), "temperature": 0.9},
        lambda r: {**{k: v for k, v in distill(r).items() if k != "cfg"},
                   "jsd": core.config("Jsd", beta=1.0), "temperature": 2.0},
    ],
    "distill::jsd_from_log_probs": [
        lambda r, b=b: dict(jsd={"beta": b}, student_log_probs=log_probs(r, (B, T, V)),
                            teacher_log_probs=log_probs(r, (B, T, V)))
        for b in [0.0, 0.5, 1.0]
    ] + [
        lambda r, b=b: dict(jsd={"beta": b}, student_log_probs=log_probs(r, (B, T, V)),
                            teacher_log_probs=log_probs(r, (B, T, V)), support=r.random((B, T, V)) > 0.3)
        for b in [0.0, 0.3, 1.0]
    ],
    "distill::kd_loss": [
        lambda r: dict(student_logits=logits(r), teacher_logits=logits(r), valid=token_mask(r, B, T)),
        lambda r: dict(student_logits=logits(r, (4, 7)), teacher_logits=logits(r, (4, 7)), valid=np.ones(4, bool)),
        lambda r: dict(student_logits=logits(r), teacher_logits=logits(r), valid=np.zeros((B, T), bool)),
    ],
    "fused::token_loss": [
        lambda r: dict(cfg=token_loss_cfg(), **policy_batch(r)),
        lambda r: dict(cfg=token_loss_cfg("trl", "token-mean"), **policy_batch(r)),
        lambda r: dict(cfg=token_loss_cfg(kl="K3", coef=0.5), ref_log_prob=-np.abs(r.normal(size=(3, 5))),
                       **policy_batch(r)),
        lambda r: dict(cfg=token_loss_cfg(agg="token-sum", kl="K2"), ref_log_prob=-np.abs(r.normal(size=(3, 5))),
                       is_weights=r.random((3, 5)) + 0.5, **policy_batch(r)),
        lambda r: dict(cfg=token_loss_cfg("openrlhf", "seq-mean-token-sum-norm", kl="K1"),
                       ref_log_prob=-np.abs(r.normal(size=(3, 5))), **policy_batch(r)),
    ],
    "fused::log_probs_entropy": [
        lambda r: dict(logits=logits(r), targets=ids(r)),
        lambda r: dict(logits=logits(r), targets=ids(r), temperature=0.7),
        lambda r: dict(logits=logits(r, (4, 11)), targets=ids(r, (4,), 11), temperature=1.3),
    ],
}


@pytest.mark.parametrize("path,index", params(CASES))
def test_case(path, index):
    run_cases(CASES, path, index)


# ---------------------------------------------------------------------------
# cross-checks against the peer-named ops
# ---------------------------------------------------------------------------

def close(a, b, rtol=1e-12, atol=1e-12):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.size == b.size, (a.shape, b.shape)
    np.testing.assert_allclose(a.reshape(-1), b.reshape(-1), rtol=rtol, atol=atol)


def test_log_softmax_is_numpys():
    r = np.random.default_rng(1)
    z = logits(r)
    mine = core.logits.log_softmax(logits=z, temperature=0.7, grad=True)
    y = z / 0.7
    ref = y - np.log(np.sum(np.exp(y - y.max(-1, keepdims=True)), -1, keepdims=True)) - y.max(-1, keepdims=True)
    close(mine["log_probs"], ref)
    # a unit cotangent on every element: Σ_k (1 − p_k·V) / T
    p = np.exp(ref)
    close(mine.grads["logits"], (1.0 - V * p) / 0.7)


def test_selective_log_softmax_is_trls_and_verls():
    r = np.random.default_rng(2)
    z, t = logits(r), ids(r)
    c = r.normal(size=t.shape)
    mine = core.logits.selective_log_softmax(logits=z, targets=t, cotangents={"log_probs": c})
    trl = ops.call("trl.selective_log_softmax", logits=z, index=t, cotangents={"per_token_logps": c})
    verl = ops.call("verl.logprobs_from_logits", logits=z, labels=t, cotangents={"log_probs": c})
    close(mine["log_probs"], trl["per_token_logps"])
    close(mine["log_probs"], verl["log_probs"])
    close(mine.grads["logits"], trl.grads["logits"])
    close(mine.grads["logits"], verl.grads["logits"])


@pytest.mark.parametrize("temp", [1.0, 0.7, 1.3])
def test_gather_log_softmax_is_openrlhfs_and_torchtunes(temp):
    r = np.random.default_rng(3)
    z, t = logits(r), ids(r)
    c = r.normal(size=t.shape)
    mine = core.logits.gather_log_softmax(logits=z, targets=t[..., None], temperature=temp,
                                          cotangents={"log_probs": c[..., None]})
    orl = ops.call("openrlhf.log_probs_from_logits", logits=z, labels=t, temperature=temp,
                   cotangents={"log_probs": c})
    tt = ops.call("torchtune.logits_to_logprobs", logits=z, sequences=t, temperature=temp,
                  cotangents={"logprobs": c})
    close(mine["log_probs"][..., 0], orl["log_probs"])
    close(mine["log_probs"][..., 0], tt["logprobs"])
    close(mine.grads["logits"], orl.grads["logits"])
    close(mine.grads["logits"], tt.grads["logits"])


def test_entropy_from_logits_is_trls_verls_and_openrlhfs():
    r = np.random.default_rng(4)
    z = logits(r)
    c = r.normal(size=(B, T))
    mine = core.logits.entropy_from_logits(logits=z, cotangents={"entropy": c})
    for op, out in [("trl.entropy_from_logits", "entropies"), ("verl.entropy_from_logits", "entropy"),
                    ("openrlhf.compute_entropy", "entropy")]:
        kw = {"chunk_size": 4} if op.startswith("trl") else {}
        peer = ops.call(op, logits=z, cotangents={out: c}, **kw)
        close(mine["entropy"], peer[out])
        close(mine.grads["logits"], peer.grads["logits"])


def test_sum_pi_squared_is_verls():
    r = np.random.default_rng(5)
    z = logits(r)
    c = r.normal(size=(B, T))
    mine = core.logits.sum_pi_squared(logits=z, cotangents={"sum_pi_squared": c})
    peer = ops.call("verl.calculate_sum_pi_squared_from_logits", logits=z, cotangents={"sum_pi_squared": c})
    close(mine["sum_pi_squared"], peer["sum_pi_squared"])
    close(mine.grads["logits"], peer.grads["logits"])


@pytest.mark.parametrize("average", [False, True])
def test_sequence_log_probs_is_torchtunes(average):
    r = np.random.default_rng(6)
    z, lab = logits(r, (3, 4, V)), seq_labels(r)
    c = r.normal(size=3)
    mine = core.logits.sequence_log_probs(
        cfg=core.config("SequenceLogProbConfig", preset="torchtune", average=average),
        logits=z, labels=lab, cotangents={"log_probs": c})
    peer = ops.call("torchtune.get_batch_log_probs", logits=z, labels=lab, label_pad_token_id=-100,
                    return_average_logprobs=average, cotangents={"logps": c})
    close(mine["log_probs"], peer["logps"])
    close(mine.grads["logits"], peer.grads["logits"])


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_entropy_loss_is_verls(mode):
    r = np.random.default_rng(7)
    z, m = logits(r, (3, 4, V)), token_mask(r)
    mine = core.logits.entropy_loss(mode=mode, logits=z, mask=m, grad=True)
    peer = ops.call("verl.compute_entropy_loss", logits=z, response_mask=m, loss_agg_mode=mode,
                    cotangents={"entropy_loss": np.ones(())})
    close(mine["loss"], peer["entropy_loss"])
    close(mine.grads["logits"], peer.grads["logits"])


@pytest.mark.parametrize("q", [0.0, 0.25, 0.37, 1.0])
def test_high_entropy_mask_is_trls(q):
    r = np.random.default_rng(8)
    h, m = np.abs(r.normal(size=(3, 4))), token_mask(r)
    mine = core.sequence.high_entropy_mask(quantile_q=q, entropies=h, mask=m)
    peer = ops.call("trl.get_high_entropy_mask", entropies=h, mask=m, threshold=q)
    np.testing.assert_array_equal(mine["entropy_mask"], np.asarray(peer["entropy_mask"]) != 0)
    tau = np.quantile(h[m], q)
    close(mine.metrics["threshold"], tau, rtol=1e-15, atol=1e-15)
    close(core.sequence.quantile(q=q, values=h[m])["quantile"], tau, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("th", [0.0, 0.02, 0.1])
def test_off_policy_sequence_mask_is_trls(th):
    r = np.random.default_rng(9)
    kw = policy_batch(r, 4, 5)
    adv = r.normal(size=4)
    slp = kw["log_prob"] + 0.2 * r.normal(size=(4, 5))
    mine = core.sequence.off_policy_sequence_mask(threshold=th, advantages=adv, log_prob=kw["log_prob"],
                                                  sampling_log_prob=slp, mask=kw["mask"])
    peer = ops.call("trl.get_off_policy_mask", advantages=adv[:, None], per_token_logps=kw["log_prob"],
                    sampling_per_token_logps=slp, mask=kw["mask"], off_policy_threshold=th)
    np.testing.assert_array_equal(mine["keep"], np.asarray(peer["off_policy_mask"]).reshape(-1) != 0)


@pytest.mark.parametrize("method,pw", [("pow", 2.0), ("pow", 0.5), ("max_min", 2.0), ("max_random", 2.0)])
def test_pf_ppo_sampling_weights_are_verls(method, pw):
    r = np.random.default_rng(10)
    s = r.normal(size=(5, 3))
    mine = core.sequence.pf_ppo_sampling_weights(
        method=core.config("PfPpoReweight", method=method, weight_pow=pw), scores=s)
    peer = ops.call("verl.compute_pf_ppo_reweight_data", token_level_scores=s, reweight_method=method,
                    weight_pow=pw)
    close(mine["weights"], peer["weights"])


@pytest.mark.parametrize("peer_op", ["trl.gkd_generalized_jsd_loss", "trl.distillation_generalized_jsd_loss"])
@pytest.mark.parametrize("beta,temp,red,n", [(0.0, 1.0, "batchmean", None), (0.5, 0.9, "batchmean", None),
                                             (1.0, 2.0, "sum", None), (0.1, 1.0, "mean", None),
                                             (0.5, 1.0, "batchmean", 7)])
def test_generalized_jsd_loss_is_trls(peer_op, beta, temp, red, n):
    r = np.random.default_rng(11)
    zs, zt = logits(r), logits(r)
    lab = ids(r)
    lab[0, :2] = -100
    rust_red = {"batchmean": "BatchMean", "sum": "Sum", "mean": "Mean"}[red]
    cfg = core.config("DistillConfig", jsd={"beta": beta}, temperature=temp, reduction=rust_red,
                      num_items_in_batch=None if n is None else float(n))
    mine = core.distill.generalized_jsd_loss(cfg=cfg, student_logits=zs, teacher_logits=zt, valid=lab != -100,
                                             grad=True)
    peer = ops.call(peer_op, student_logits=zs, teacher_logits=zt, labels=lab, beta=beta, temperature=temp,
                    reduction=red, num_items_in_batch=n, cotangents={"loss": np.ones(())})
    close(mine["loss"], peer["loss"])
    close(mine.grads["student_logits"], peer.grads["student_logits"])


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("support", [False, True])
def test_jsd_from_log_probs_is_trls(beta, support):
    r = np.random.default_rng(12)
    s, t = log_probs(r, (B, T, V)), log_probs(r, (B, T, V))
    sm = r.random((B, T, V)) > 0.3
    c = r.normal(size=(B, T, V))
    kw = dict(support=sm) if support else {}
    mine = core.distill.jsd_from_log_probs(jsd={"beta": beta}, student_log_probs=s, teacher_log_probs=t,
                                           cotangents={"jsd": c}, **kw)
    pkw = dict(support_mask=sm) if support else {}
    peer = ops.call("trl.distillation_jsd_divergence", student_log_probs=s, teacher_log_probs=t, beta=beta,
                    cotangents={"jsd": c}, **pkw)
    close(mine["jsd"], peer["jsd"])
    close(mine.grads["student_log_probs"], peer.grads["student_log_probs"])


def test_generalized_jsd_elementwise_sums_to_the_loss():
    r = np.random.default_rng(13)
    kw = distill(r, beta=0.4, temperature=1.3, reduction="Sum")
    loss = core.distill.generalized_jsd_loss(grad=True, **kw)
    el = core.distill.generalized_jsd_elementwise(
        jsd=kw["cfg"]["jsd"], temperature=1.3, student_logits=kw["student_logits"],
        teacher_logits=kw["teacher_logits"], valid=kw["valid"], grad=True)
    close(np.sum(el["jsd"]), loss["loss"])
    close(el.grads["student_logits"], loss.grads["student_logits"])
    assert np.all(el["jsd"][~kw["valid"]] == 0)


@pytest.mark.parametrize("peer_op", ["trl.gkd_generalized_jsd_loss", "trl.distillation_generalized_jsd_loss"])
@pytest.mark.parametrize("beta,temp", [(0.0, 1.0), (0.3, 0.9), (1.0, 2.0)])
def test_generalized_jsd_elementwise_is_trls_reduction_none(peer_op, beta, temp):
    r = np.random.default_rng(17)
    zs, zt = logits(r), logits(r)
    lab = ids(r)
    lab[0, :2] = -100
    valid = lab != -100
    c = r.normal(size=zs.shape)
    mine = core.distill.generalized_jsd_elementwise(jsd={"beta": beta}, temperature=temp, student_logits=zs,
                                                    teacher_logits=zt, valid=valid, cotangents={"jsd": c})
    # TRL returns the valid rows only
    peer = ops.call(peer_op, student_logits=zs, teacher_logits=zt, labels=lab, beta=beta, temperature=temp,
                    reduction="none", cotangents={"loss": c[valid].reshape(-1)})
    close(mine["jsd"][valid], peer["loss"])
    close(mine.grads["student_logits"], peer.grads["student_logits"])


def test_kd_loss_is_openrlhfs():
    r = np.random.default_rng(14)
    zs, zt = logits(r), logits(r)
    lab = ids(r)
    lab[1, 1] = -100
    mine = core.distill.kd_loss(student_logits=zs, teacher_logits=zt, valid=lab != -100, grad=True)
    peer = ops.call("openrlhf.kd_loss", logits=zs, teacher_logits=zt, label=lab,
                    cotangents={"distil_loss": np.ones(())})
    close(mine["loss"], peer["distil_loss"])
    close(mine.grads["student_logits"], peer.grads["logits"])


@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_fused_log_probs_entropy_is_the_hot_op_and_the_reference_chain(temp):
    r = np.random.default_rng(15)
    z, t = logits(r), ids(r)
    c_lp, c_h = r.normal(size=t.shape), r.normal(size=t.shape)
    mine = core.fused.log_probs_entropy(logits=z, targets=t, temperature=temp,
                                        cotangents={"log_probs": c_lp, "entropy": c_h})
    lp, h, lse = ops.log_probs_entropy(z, t, temp)
    g = ops.log_probs_entropy_backward(z, t, lse, h, c_lp, c_h, temp)
    close(mine["log_probs"], lp)
    close(mine["entropy"], h)
    close(mine["lse"], lse)
    close(mine.grads["logits"], g)
    # the reference drivers: gather_log_softmax + entropy_from_logits (of z/T, chained by 1/T)
    ref_lp = core.logits.gather_log_softmax(logits=z, targets=t[..., None], temperature=temp,
                                            cotangents={"log_probs": c_lp[..., None]})
    ref_h = core.logits.entropy_from_logits(logits=z / temp, cotangents={"entropy": c_h})
    close(mine["log_probs"], ref_lp["log_probs"][..., 0], atol=1e-12)
    close(mine["entropy"], ref_h["entropy"], atol=1e-12)
    close(mine.grads["logits"], ref_lp.grads["logits"] + ref_h.grads["logits"] / temp, atol=1e-12)
    # only one cotangent: the other counts as zero
    only_h = core.fused.log_probs_entropy(logits=z, targets=t, temperature=temp, cotangents={"entropy": c_h})
    close(only_h.grads["logits"], ops.log_probs_entropy_backward(z, t, lse, h, np.zeros_like(c_h), c_h, temp))


@pytest.mark.parametrize("kl", [None, "K3", "K1"])
def test_fused_token_loss_is_verls_actor_loss(kl):
    r = np.random.default_rng(16)
    kw = policy_batch(r)
    ref = -np.abs(r.normal(size=(3, 5)))
    cfg = token_loss_cfg("verl", "seq-mean-token-mean", kl=kl, coef=0.1)
    mine = core.fused.token_loss(cfg=cfg, ref_log_prob=ref if kl else None, grad=True, **kw)
    verl_kl = {None: {}, "K3": dict(use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.1),
               "K1": dict(use_kl_loss=True, kl_loss_type="k1", kl_loss_coef=0.1)}[kl]
    metrics, g = ops.verl_policy_loss(kw["old_log_prob"], kw["log_prob"], kw["advantages"], kw["mask"],
                                      ref_log_prob=ref if kl else None, clip_ratio_low=0.2, clip_ratio_high=0.28,
                                      loss_agg_mode="seq-mean-token-mean", **verl_kl)
    close(mine["loss"], metrics["pg_loss"] + (0.1 * metrics["kl_loss"] if kl else 0.0))
    close(mine.metrics["policy_loss"], metrics["pg_loss"])
    close(mine.metrics["clipfrac"], metrics["pg_clipfrac"])
    close(mine.metrics["approx_kl"], metrics["ppo_kl"])
    close(mine.grads["log_prob"], g)
    if kl is None:
        # and the reference driver
        pl = core.policy.token.policy_loss(loss=cfg["loss"], agg=cfg["agg"], grad=True, **kw)
        close(mine["loss"], pl["loss"])
        close(mine.grads["log_prob"], pl.grads["log_prob"], atol=1e-15)
    else:
        close(mine.metrics["kl_loss"], metrics["kl_loss"])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_parallel_token_loss_in_a_forked_child():
    # The parallel drivers run on a pool of worker threads started on first
    # use; a forked child has none of them (and may hold a copied lock), so
    # it must compute on threads of its own: the same numbers, no hang.
    r = np.random.default_rng(17)
    kw = policy_batch(r, b=8, t=300)
    ref = -np.abs(r.normal(size=(8, 300)))
    args = (kw["old_log_prob"], kw["log_prob"], kw["advantages"], kw["mask"])
    opts = dict(ref_log_prob=ref, threads=2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                loss_agg_mode="seq-mean-token-mean", use_kl_loss=True, kl_loss_type="low_var_kl",
                kl_loss_coef=0.1)
    want_m, want_g = ops.verl_policy_loss(*args, **opts)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(60)
            got_m, got_g = ops.verl_policy_loss(*args, **opts)
            code = 0 if (got_m == want_m and np.array_equal(got_g, want_g)) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"


def test_configs_validate():
    with pytest.raises(ValueError, match="temperature"):
        core.config("Temperature", t=0.0)
    with pytest.raises(ValueError, match="beta"):
        core.config("Jsd", beta=1.5)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        core.config("DistillConfig", jsd={"beta": 0.5}, temperature=1.0, reduction="Sum", num_items_in_batch=0.5)
    with pytest.raises(ValueError, match="temperature"):
        core.config("DistillConfig", jsd={"beta": 0.5}, temperature=-1.0, reduction="Sum")
    with pytest.raises(ValueError, match="token-local|cross-token"):
        core.config("TokenLoss", loss={"SequenceRatio": {"eps_low": 0.2, "eps_high": 0.28, "max_log_ratio": 10.0,
                                                         "force_seq_mean_token_mean": True}},
                    agg="token-mean", norm=core.config("GlobalNorm"), kl=None)
    # non-finite numbers do not survive JSON; the core's checks stand behind
    with pytest.raises(ValueError, match="kl_loss_coef|JSON"):
        core.config("KlPenalty", estimator=core.config("KlConfig", preset="verl", estimator="K3"),
                    coef=float("inf"))
    with pytest.raises(ValueError, match="weight_pow|JSON"):
        core.config("PfPpoReweight", Pow=float("inf"))
    with pytest.raises(ValueError, match="reweight method"):
        core.config("PfPpoReweight", method="softmax")
    with pytest.raises(ValueError, match="only constructor"):
        core.config("SequenceLogProbConfig", preset="verl", average=True)
    assert core.config("RewardPenaltyConfig") == {"penalise_no_eos": False, "min_response_length": None}
    assert core.config("Temperature") == 1.0
    # a temperature that bypasses the config builder is still validated by the op
    with pytest.raises(ValueError, match="temperature"):
        core.logits.log_softmax(logits=np.zeros((2, 3)), temperature=-1.0)
    with pytest.raises(ValueError, match="beta"):
        core.distill.jsd_from_log_probs(jsd={"beta": 2.0}, student_log_probs=np.zeros(3),
                                        teacher_log_probs=np.zeros(3))
    # wrong lengths and a label out of range are errors, not panics
    with pytest.raises(ValueError, match="targets"):
        core.logits.selective_log_softmax(logits=np.zeros((2, 3)), targets=np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="teacher_logits"):
        core.distill.kd_loss(student_logits=np.zeros((2, 3)), teacher_logits=np.zeros((2, 4)),
                             valid=np.ones(2, bool))
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        core.distill.generalized_jsd_loss(cfg=core.config("DistillConfig", jsd={"beta": 0.5}, temperature=1.0,
                                                          reduction="Sum"),
                                          student_logits=np.zeros(3), teacher_logits=np.zeros(3))
    with pytest.raises(ValueError, match="targets"):
        core.logits.selective_log_softmax(logits=np.zeros((2, 3)), targets=np.array([0, 3]))


def test_sequence_masks_are_the_peers():
    r = np.random.default_rng(11)
    ids = token_ids(r, (5, 8))
    for eos in (2, [1, 2]):
        mine = core.sequence.response_mask_from_eos(response_ids=ids, eos=np.atleast_1d(eos))
        peer = ops.call("verl.get_response_mask", response_id=ids, eos_token=eos)
        np.testing.assert_array_equal(mine["mask"].reshape(-1), np.asarray(peer["response_mask"]).reshape(-1) != 0)
    for fill in (0, -1, 4):
        mine = core.sequence.truncate_at_first_stop_token(sequences=ids, stop_tokens=[2, 3], fill=fill)
        peer = ops.call("torchtune.truncate_sequence_at_first_stop_token", sequences=ids,
                        stop_tokens=np.array([2, 3]), fill_value=fill)
        np.testing.assert_array_equal(mine["sequences"].reshape(-1), np.asarray(peer["sequences"]).reshape(-1))
        np.testing.assert_array_equal(mine["padding_mask"].reshape(-1),
                                      np.asarray(peer["padding_mask"]).reshape(-1) != 0)
    pad = mine["padding_mask"]
    lens = r.integers(0, 8, 5)
    for no_eos, min_len in ((True, None), (False, 3), (True, 6)):
        cfg = core.config("RewardPenaltyConfig", penalise_no_eos=no_eos, min_response_length=min_len)
        got = core.sequence.reward_penalty_mask(cfg=cfg, padding_masks=pad, seq_lens=lens)
        peer = ops.call("torchtune.get_reward_penalty_mask", padding_masks=pad, seq_lens=lens,
                        penalise_no_eos=no_eos, min_response_length=min_len)
        np.testing.assert_array_equal(got["penalise"], np.asarray(peer["reward_penalty_mask"]).reshape(-1) != 0)
