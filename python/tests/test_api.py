"""The package's own contract: errors, dtypes, shapes, and the torch
wrappers' backward (checked against finite differences and torch's own
autograd of the same formula)."""

import numpy as np
import pytest

import posttrain
import posttrain.ops as ops

torch = pytest.importorskip("torch")
import posttrain.torch as pt  # noqa: E402


def rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------
# errors: ValueError with the core's message, never a crash
# --------------------------------------------------------------------------


def test_shape_mismatch_is_a_value_error_with_the_core_message():
    r = rng()
    with pytest.raises(ValueError, match=r"shape mismatch: `response_mask` has 6 elements, but the op requires 8"):
        ops.verl_policy_loss(r.normal(size=(2, 4)), r.normal(size=(2, 4)), r.normal(size=(2, 4)), np.ones((2, 3), bool))


def test_unknown_option_names_the_option_and_value():
    r = rng()
    x = r.normal(size=(2, 4))
    with pytest.raises(ValueError, match=r"loss_agg_mode"):
        ops.verl_policy_loss(x, x, x, np.ones((2, 4), bool), loss_agg_mode="token-median")
    with pytest.raises(ValueError, match=r"kl_penalty"):
        ops.call("verl.kl_penalty", logprob=x, ref_logprob=x, kl_penalty="k9")


def test_unknown_op_lists_the_peers_ops():
    with pytest.raises(ValueError, match=r"unknown op `trl.nope`; trl ops: .*trl.grpo_loss"):
        ops.call("trl.nope")
    with pytest.raises(AttributeError):
        ops.verl.no_such_op  # noqa: B018


def test_out_of_range_parameter():
    r = rng()
    lp = r.normal(size=(2, 3))
    with pytest.raises(ValueError, match=r"epsilon"):
        ops.grpo_loss(lp, lp, np.ones((2, 3), bool), np.ones(2), epsilon=-0.1)
    with pytest.raises(ValueError, match=r"temperature"):
        ops.log_probs_entropy(r.normal(size=(2, 5)), np.zeros(2, np.int64), temperature=0.0)


def test_target_out_of_vocabulary_is_refused():
    with pytest.raises(ValueError, match=r"targets"):
        ops.log_probs_entropy(np.zeros((2, 5)), np.array([0, 5]))


def test_per_token_advantages_are_refused_with_the_reason():
    lp = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"one per row"):
        ops.grpo_loss(lp, lp, np.ones((2, 3), bool), np.zeros((2, 3)))


def test_masked_nan_does_not_leak():
    r = rng(1)
    lp, old, adv = r.normal(size=(3, 5)), r.normal(size=(3, 5)), r.normal(size=(3, 5))
    mask = np.ones((3, 5), bool)
    mask[:, 3:] = False
    for x in (lp, old, adv):
        x[:, 3:] = np.nan
    m, g = ops.verl_policy_loss(old, lp, adv, mask, use_kl_loss=True, ref_log_prob=np.where(mask, lp, np.inf))
    assert all(np.isfinite(v) for v in m.values())
    assert np.all(np.isfinite(g)) and np.all(g[:, 3:] == 0)


# --------------------------------------------------------------------------
# dtypes and shapes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_hot_ops_keep_the_precision(dt):
    r = rng(2)
    z = r.normal(size=(2, 3, 7)).astype(dt)
    ids = r.integers(0, 7, size=(2, 3))
    lp, h, lse = ops.log_probs_entropy(z, ids)
    assert lp.dtype == dt and lp.shape == (2, 3) and h.shape == (2, 3)
    ref = z - np.log(np.exp(z).sum(-1, keepdims=True))
    np.testing.assert_allclose(lp, np.take_along_axis(ref, ids[..., None], -1)[..., 0], rtol=1e-5 if dt == np.float32 else 1e-12)
    m, g_lp, g_ent = ops.grpo_loss(lp, h, np.ones((2, 3), bool), np.array([1.0, -1.0], dt))
    assert g_lp.dtype == dt and g_lp.shape == (2, 3)


def test_non_contiguous_inputs_are_accepted():
    r = rng(3)
    big = r.normal(size=(4, 10))
    view = big[:, ::2]  # strided
    m1, g1 = ops.verl_policy_loss(view, view + 0.1, view, np.ones((4, 5), bool))
    m2, g2 = ops.verl_policy_loss(view.copy(), view.copy() + 0.1, view.copy(), np.ones((4, 5), bool))
    assert m1 == m2 and np.array_equal(g1, g2)


def test_call_restores_shapes_and_scalars():
    r = rng(4)
    x = r.normal(size=(3, 4))
    res = ops.call("verl.masked_mean", values=x, mask=np.ones((3, 4), bool), cotangents={"result": 1.0})
    assert res["result"].shape == () and res.grads["values"].shape == (3, 4)
    # verl divides by `count + 1e-8`: within 1e-9 of the plain mean here.
    np.testing.assert_allclose(res["result"], x.sum() / (12 + 1e-8), rtol=1e-12)
    rows = ops.call("verl.masked_mean", values=x, mask=np.ones((3, 4), bool), axis=-1)["result"]
    np.testing.assert_allclose(rows, x.sum(-1) / (4 + 1e-8), rtol=1e-12)
    np.testing.assert_allclose(res.grads["values"], np.full((3, 4), 1 / (12 + 1e-8)), rtol=1e-12)


def test_catalog_names_every_op_with_its_signature():
    info = ops.op_info("trl.grpo_loss")
    assert "per_token_logps" in info["inputs"] and "loss" in info["outputs"]
    assert "per_token_logps" in info["grads"] and "loss_type" in info["params"]
    assert "trl.grpo_loss" in ops.list_ops() and "grpo_loss" in dir(ops.trl)
    assert posttrain.__version__


# --------------------------------------------------------------------------
# torch wrappers: backward = closed form, checked two ways
# --------------------------------------------------------------------------


def test_log_probs_entropy_gradcheck_f64():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 6, (2, 3), generator=g)

    def f(z):
        lp, h = pt.log_probs_entropy(z, ids, 0.7)
        return lp, h

    assert torch.autograd.gradcheck(f, (z,))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_log_probs_entropy_matches_torch_autograd(dtype, tol):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 50, dtype=dtype, generator=g) * 3
    ids = torch.randint(0, 50, (3, 4), generator=g)
    w1, w2 = torch.randn(3, 4, dtype=dtype, generator=g), torch.randn(3, 4, dtype=dtype, generator=g)
    za = z.clone().requires_grad_()
    lp, h = pt.log_probs_entropy(za, ids)
    (lp * w1 + h * w2).sum().backward()
    zb = z.clone().requires_grad_()
    ls = torch.log_softmax(zb, -1)
    lp_ref = ls.gather(-1, ids[..., None])[..., 0]
    h_ref = -(ls.exp() * ls).sum(-1)
    (lp_ref * w1 + h_ref * w2).sum().backward()
    torch.testing.assert_close(lp, lp_ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(h, h_ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(za.grad, zb.grad, rtol=tol * 10, atol=tol * 10)


def test_peer_op_gradcheck_f64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ref = torch.randn(3, 5, dtype=torch.float64, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3

    def f(x):
        kl = pt.call("verl.kl_penalty", logprob=x, ref_logprob=ref, kl_penalty="low_var_kl")["kl_estimate"]
        return pt.call("verl.agg_loss", loss_mat=kl, loss_mask=mask, loss_agg_mode="seq-mean-token-mean")["loss"]

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "cispo", "sapo"])
def test_grpo_loss_backward_is_the_closed_form(loss_type):
    g = torch.Generator().manual_seed(3)
    lp = (torch.randn(4, 6, dtype=torch.float64, generator=g) * 0.3 - 1).requires_grad_()
    old = lp.detach() + torch.randn(4, 6, dtype=torch.float64, generator=g) * 0.3
    ent = torch.rand(4, 6, dtype=torch.float64, generator=g).requires_grad_()
    mask = torch.rand(4, 6, generator=g) > 0.2
    adv = torch.randn(4, dtype=torch.float64, generator=g)
    cfg = dict(loss_type=loss_type, epsilon_high=0.28 if loss_type != "cispo" else 2.0, entropy_coef=0.01)
    loss, m = pt.grpo_loss(lp, ent, mask, adv, old_per_token_logps=old, **cfg)
    loss.backward()
    _, g_lp, g_ent = ops.grpo_loss(lp.detach().numpy(), ent.detach().numpy(), mask.numpy(), adv.numpy(),
                                   old_per_token_logps=old.numpy(), **cfg)
    assert loss.item() == m["loss"]
    np.testing.assert_array_equal(lp.grad.numpy(), g_lp)
    np.testing.assert_array_equal(ent.grad.numpy(), g_ent)
    assert np.abs(g_lp).sum() > 0

    if loss_type == "cispo":
        return  # CISPO's clipped weight is detached (TRL's `.detach()`): not the total derivative

    def f(x):
        return pt.grpo_loss(x, ent.detach(), mask, adv, old_per_token_logps=old, **cfg)[0]

    # Away from the clip boundaries the loss is smooth: finite differences agree.
    assert torch.autograd.gradcheck(f, (lp.detach().clone().requires_grad_(),), eps=1e-7, atol=1e-6)


def test_verl_policy_loss_with_kl_backward():
    g = torch.Generator().manual_seed(4)
    lp = (torch.randn(3, 5, dtype=torch.float64, generator=g) * 0.3 - 1).requires_grad_()
    old = lp.detach() + torch.randn(3, 5, dtype=torch.float64, generator=g) * 0.1
    ref = lp.detach() + torch.randn(3, 5, dtype=torch.float64, generator=g) * 0.1
    adv = torch.randn(3, 5, dtype=torch.float64, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.2

    def f(x):
        return pt.verl_policy_loss(old, x, adv, mask, ref_log_prob=ref, use_kl_loss=True, kl_loss_coef=0.1,
                                   kl_loss_type="low_var_kl", loss_agg_mode="seq-mean-token-mean")[0]

    assert torch.autograd.gradcheck(f, (lp,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "nca_pair", "bco_pair", "sppo_hard", "apo_down"])
@pytest.mark.parametrize("scores", ["constants_dropped", "zero_at_reference"])
def test_dpo_pair_loss_f_divergence_scores_backward(loss_type, scores):
    """Both f-divergence score settings: the closed-form gradient matches finite differences, and the
    two settings differ on these loss types (by hand: forward KL at x = 0 scores -1 or 0)."""
    g = torch.Generator().manual_seed(7)
    c = (torch.randn(4, dtype=torch.float64, generator=g) * 0.3 - 5).requires_grad_()
    r = (torch.randn(4, dtype=torch.float64, generator=g) * 0.3 - 6).requires_grad_()
    c0 = c.detach() + torch.randn(4, dtype=torch.float64, generator=g) * 0.5
    r0 = r.detach() + torch.randn(4, dtype=torch.float64, generator=g) * 0.5
    nc, nr = torch.tensor([3.0, 1.0, 5.0, 2.0], dtype=torch.float64), torch.tensor([2.0, 4.0, 1.0, 6.0], dtype=torch.float64)
    cfg = dict(loss_type=loss_type, f_divergence_type="forward_kl", beta=0.5, f_divergence_scores=scores)

    def f(x, y):
        return pt.dpo_pair_loss(x, y, c0, r0, nc, nr, **cfg)[0]

    assert torch.autograd.gradcheck(f, (c, r), eps=1e-7, atol=1e-6)
    other = "zero_at_reference" if scores == "constants_dropped" else "constants_dropped"
    a = f(c, r).item()
    b = pt.dpo_pair_loss(c, r, c0, r0, nc, nr, **dict(cfg, f_divergence_scores=other))[0].item()
    assert abs(a - b) > 1e-6
    # At x = 0 (policy = reference) forward KL scores -1 (constants dropped) or 0: by hand for IPO,
    # ((sc/nc - sr/nr) - 1/(2β))² = (-1/2 + 1/1 - 1)² = 1/4 or (0 - 1)² = 1.
    if loss_type == "ipo":
        z = torch.zeros(1, dtype=torch.float64)
        m, _, _ = ops.dpo_pair_loss(z.numpy(), z.numpy(), z.numpy(), z.numpy(), np.array([2.0]), np.array([1.0]), **cfg)
        assert m["loss"] == (0.25 if scores == "constants_dropped" else 1.0)


def test_dpo_pair_loss_refuses_unknown_f_divergence_scores():
    x = np.zeros(2)
    with pytest.raises(ValueError, match=r"unsupported `f_divergence_scores` = \"trl_1.16\""):
        ops.dpo_pair_loss(x, x, x, x, np.ones(2), np.ones(2), f_divergence_scores="trl_1.16")
    with pytest.raises(ValueError, match=r"unknown parameter `f_divergence_score`"):
        ops.dpo_pair_loss(x, x, x, x, np.ones(2), np.ones(2), f_divergence_score="zero_at_reference")


def test_unknown_parameters_are_refused():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"unknown parameter `kl_penaltyy`"):
        ops.call("verl.kl_penalty", logprob=x, ref_logprob=x, kl_penaltyy="k1")
    with pytest.raises(ValueError, match=r"unknown parameter `clip_ratioo`"):
        ops.verl_policy_loss(x, x, x, np.ones((2, 3), bool), clip_ratioo=0.3)
    with pytest.raises(ValueError, match=r"unknown parameter `epsilonn`"):
        ops.grpo_loss(x, x, np.ones((2, 3), bool), np.ones(2), epsilonn=0.3)
