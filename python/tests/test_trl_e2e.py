"""End-to-end: TRL's GRPOTrainer with and without the posttrain adapter.

A tiny randomly initialised causal LM (built from a config, nothing
downloaded) is trained for a few steps by ``GRPOTrainer``, once with TRL's own
loss and once with ``posttrain.integrations.trl.use_posttrain``, same seed. The
logged losses and the updated parameters must agree to f32 tolerance.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

import torch

import trl_tiny

# (id, GRPOConfig overrides, metric that shows the clipping branch was exercised or None)
CASES = [
    ("grpo", dict(loss_type="grpo"), "clip_ratio/region_mean"),
    ("dapo", dict(loss_type="dapo"), "clip_ratio/region_mean"),
    ("dapo-eps_high", dict(loss_type="dapo", epsilon_high=0.28), "clip_ratio/region_mean"),
    ("dr_grpo", dict(loss_type="dr_grpo"), "clip_ratio/region_mean"),
    ("bnpo", dict(loss_type="bnpo"), "clip_ratio/region_mean"),
    ("grpo-delta", dict(loss_type="grpo", delta=1.1), "clip_ratio/region_mean"),
    ("grpo-beta0", dict(loss_type="grpo", beta=0.0), "clip_ratio/region_mean"),
    ("cispo", dict(loss_type="cispo", epsilon_high=5.0), None),
    ("cispo-clipped", dict(loss_type="cispo", epsilon_high=1.0), "cispo_clip_ratio"),
    ("sapo", dict(loss_type="sapo"), None),
    (
        "gspo",
        dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
        "clip_ratio/region_mean",
    ),
]


@pytest.mark.parametrize("overrides,clip_metric", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_grpo_trainer_posttrain_matches_trl(tmp_path, overrides, clip_metric):
    seed = 0

    ref_trainer = trl_tiny.make_trainer(tmp_path / "trl", seed=seed, use_posttrain=False, **overrides)
    init = trl_tiny.snapshot_params(ref_trainer.model)
    ref_losses, ref_params = trl_tiny.train_and_collect(ref_trainer)

    pt_trainer = trl_tiny.make_trainer(tmp_path / "posttrain", seed=seed, use_posttrain=True, **overrides)
    pt_init = trl_tiny.snapshot_params(pt_trainer.model)
    pt_losses, pt_params = trl_tiny.train_and_collect(pt_trainer)

    max_steps = ref_trainer.args.max_steps
    assert len(ref_losses) == max_steps
    assert len(pt_losses) == max_steps

    # Both runs start from the same model.
    assert init.keys() == pt_init.keys()
    for name in init:
        assert torch.equal(init[name], pt_init[name]), name

    # The posttrain loss was really used.
    calls = getattr(pt_trainer, "_posttrain_calls", 0)
    assert calls > 0, "the posttrain loss was never called"

    # Not vacuous: rewards vary within groups (non-zero advantages) and training moved the parameters.
    first = next(e for e in ref_trainer.state.log_history if "frac_reward_zero_std" in e)
    assert first["frac_reward_zero_std"] < 1.0
    moved = max((ref_params[n] - init[n]).abs().max().item() for n in init)
    assert moved > 1e-4, f"parameters barely moved ({moved})"
    if clip_metric is not None:
        clipped = max(e.get(clip_metric, 0.0) for e in ref_trainer.state.log_history)
        assert clipped > 0.0, f"{clip_metric} stayed 0: clipping branch not exercised"

    # Same losses, step by step.
    for step, (a, b) in enumerate(zip(pt_losses, ref_losses)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), f"step {step}: posttrain {a!r} vs trl {b!r}"

    # Same gradients (logged pre-update gradient norm; no clipping in trl_tiny).
    ref_gn, pt_gn = trl_tiny.logged(ref_trainer, "grad_norm"), trl_tiny.logged(pt_trainer, "grad_norm")
    assert len(ref_gn) == len(pt_gn) == max_steps
    for step, (a, b) in enumerate(zip(pt_gn, ref_gn)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), f"step {step}: grad_norm posttrain {a!r} vs trl {b!r}"

    # Same updated parameters.
    assert pt_params.keys() == ref_params.keys()
    for name in ref_params:
        torch.testing.assert_close(
            pt_params[name], ref_params[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )



@pytest.mark.parametrize(
    "overrides",
    [
        dict(loss_type="luspo"),
        dict(loss_type="dapo", entropy_coef=0.01),
        dict(loss_type="cispo", epsilon_high=5.0, entropy_coef=0.01),
    ],
    ids=["luspo-token", "dapo-entropy-bonus", "cispo-entropy-bonus"],
)
def test_trl_1_16_normalizers(tmp_path, overrides):
    """TRL 1.16 changed luspo's aggregation and the dapo/cispo entropy bonus
    since the vectors' commit; the adapter selects 1.16's (steps_per_generation)."""
    base, base_params = trl_tiny.train_and_collect(
        trl_tiny.make_trainer(str(tmp_path / "trl"), seed=0, use_posttrain=False, **overrides)
    )
    trainer = trl_tiny.make_trainer(str(tmp_path / "pt"), seed=0, use_posttrain=True, **overrides)
    ours, our_params = trl_tiny.train_and_collect(trainer)
    assert trainer._posttrain_calls > 0
    for a, b in zip(ours, base):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    for k in base_params:
        torch.testing.assert_close(our_params[k], base_params[k], rtol=1e-4, atol=1e-5)
