"""posttrain in verl's registries.

verl selects its policy loss by ``actor_rollout_ref.actor.policy_loss.loss_mode``
and its advantage estimator by ``algorithm.adv_estimator``, both looked up in
registries (``register_policy_loss``, ``register_adv_est`` in
``verl.trainer.ppo.core_algos``). :func:`register` adds posttrain's
implementations under ``posttrain_<name>``::

    import posttrain.integrations.verl as ptv
    ptv.register()      # in the driver and in every worker process (e.g. at import of your reward module)

    # then in the verl config:
    #   actor_rollout_ref.actor.policy_loss.loss_mode=posttrain_vanilla
    #   algorithm.adv_estimator=posttrain_grpo

The policy losses (``posttrain_vanilla``, ``posttrain_gspo``,
``posttrain_cispo``, …, one per verl ``loss_mode`` posttrain implements)
take verl's arguments and actor config (clip ratios, ``clip_ratio_c``,
``tau_pos``/``tau_neg``, the ``policy_loss`` sub-config, the global-batch
normalizers in ``config.global_batch_info``) and return verl's
``(pg_loss, metrics)``; the gradient reaching ``log_prob`` is the core's
closed form. Token-local losses run in posttrain's fused single pass.

The advantage estimators (``posttrain_grpo``, ``posttrain_rloo``,
``posttrain_gae``, …) take verl's keyword arguments (``token_level_rewards``,
``response_mask``, ``index`` — verl's ``uid`` strings —, ``config``, …) and
return ``(advantages, returns)``.

Release behaviour: verl 0.9.1's GSPO honours ``loss_agg_mode``; at the
vectors' commit (1dda039) it forced ``seq-mean-token-mean``. posttrain has
both (``gspo_honor_loss_agg_mode``); the registered losses use the release's.

Tested against verl 0.9.1 (``python/tests/test_verl_integration.py``: verl's
own actor loss ``verl.workers.utils.losses.ppo_loss`` and
``ray_trainer.compute_advantage`` with ``<name>`` and ``posttrain_<name>``
agree; ``python/tests/test_diff_verl.py``: the shared ops against verl's
installed functions).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import torch as pt

__all__ = ["register", "POLICY_LOSS_MODES", "ADV_ESTIMATORS", "actor_params"]

#: verl ``loss_mode`` names posttrain implements (registered as ``posttrain_<mode>``).
POLICY_LOSS_MODES = (
    "vanilla",
    "dppo_tv",
    "dppo_kl",
    "gspo",
    "sapo",
    "gpg",
    "clip_cov",
    "kl_cov",
    "geo_mean",
    "dro",
    "cispo",
)

#: verl ``adv_estimator`` name → the peer op posttrain runs for it.
#: verl 0.9.1's ``compute_advantage`` hands ``values``, ``gamma`` and ``lam``
#: only to its built-in ``gae`` branch, so a registered GAE could not run in
#: a verl training loop; posttrain's GAE is ``posttrain.ops.call(
#: "verl.compute_gae_advantage_return", ...)`` / ``posttrain.torch.call``.
ADV_ESTIMATORS = {
    "grpo": "verl.compute_grpo_outcome_advantage",
    "grpo_vectorized": "verl.compute_grpo_vectorized_outcome_advantage",
    "grpo_passk": "verl.compute_grpo_passk_outcome_advantage",
    "rloo": "verl.compute_rloo_outcome_advantage",
    "rloo_vectorized": "verl.compute_rloo_vectorized_outcome_advantage",
    "opo": "verl.compute_opo_outcome_advantage",
    "reinforce_plus_plus": "verl.compute_reinforce_plus_plus_outcome_advantage",
    "reinforce_plus_plus_baseline": "verl.compute_reinforce_plus_plus_baseline_outcome_advantage",
    "remax": "verl.compute_remax_outcome_advantage",
    "gpg": "verl.compute_gpg_outcome_advantage",
}


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        v = obj.get(name, default)
    else:
        v = getattr(obj, name, default)
        if v is default and hasattr(obj, "get"):
            try:
                v = obj.get(name, default)
            except Exception:  # noqa: BLE001 - configs with a strict get
                v = default
    return default if v is None else v


def _num(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def actor_params(config: Any) -> Dict[str, Any]:
    """The posttrain parameters of verl's actor ``config`` (an ``ActorConfig``,
    an OmegaConf node or a dict): clip ratios, dual-clip bound, SAPO
    temperatures, the ``policy_loss`` sub-config and the global-batch
    normalizers."""
    pl = _get(config, "policy_loss")
    p: Dict[str, Any] = {
        "clip_ratio": _get(config, "clip_ratio", 0.2),
        "clip_ratio_low": _get(config, "clip_ratio_low"),
        "clip_ratio_high": _get(config, "clip_ratio_high"),
        "clip_ratio_c": _get(config, "clip_ratio_c", 3.0),
        "tau_pos": _get(config, "tau_pos", 1.0),
        "tau_neg": _get(config, "tau_neg", 1.05),
        "clip_cov_ratio": _get(pl, "clip_cov_ratio", 0.0002),
        "clip_cov_lb": _get(pl, "clip_cov_lb", 1.0),
        "clip_cov_ub": _get(pl, "clip_cov_ub", 5.0),
        "kl_cov_ratio": _get(pl, "kl_cov_ratio", 0.0002),
        "ppo_kl_coef": _get(pl, "ppo_kl_coef", 0.1),
    }
    dro_beta = _get(pl, "dro_beta", _get(config, "dro_beta"))
    if dro_beta is not None:
        p["dro_beta"] = dro_beta
    info = _get(config, "global_batch_info", {}) or {}
    for k in ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor"):
        v = _get(info, k)
        if v is not None:
            p[k] = _num(v)
    return p


def _policy_loss_fn(mode: str):
    def posttrain_policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        # verl 0.9.1's gspo honours loss_agg_mode (1dda039 forced
        # seq-mean-token-mean; posttrain's default keeps the vectors' commit).
        loss, m = pt.verl_policy_loss(
            old_log_prob,
            log_prob,
            advantages,
            response_mask,
            rollout_is_weights=rollout_is_weights,
            loss_mode=mode,
            loss_agg_mode=loss_agg_mode,
            gspo_honor_loss_agg_mode=True,
            **actor_params(config),
        )
        metrics = {
            "actor/pg_clipfrac": m["pg_clipfrac"],
            "actor/ppo_kl": m["ppo_kl"],
            "actor/pg_clipfrac_lower": m["pg_clipfrac_lower"],
        }
        return loss, metrics

    posttrain_policy_loss.__name__ = f"posttrain_{mode}"
    posttrain_policy_loss.__doc__ = (
        f"verl's `{mode}` policy loss computed by posttrain (value and closed-form gradient); "
        "arguments and return value as verl's PolicyLossFn."
    )
    return posttrain_policy_loss


def _index_ids(index: Any, n: int) -> np.ndarray:
    """verl's group ids (``uid`` strings, ints or a tensor) as int64 labels."""
    if index is None:
        raise ValueError("this advantage estimator needs `index` (verl's per-sample `uid`)")
    if isinstance(index, torch.Tensor):
        index = index.cpu().numpy()
    arr = np.asarray(index)
    if arr.shape[0] != n:
        raise ValueError(f"`index` has {arr.shape[0]} entries for {n} responses")
    _, ids = np.unique(arr.astype(str) if arr.dtype == object else arr, return_inverse=True)
    return ids.astype(np.int64).reshape(-1)


def _adv_fn(name: str, op: str):
    def posttrain_adv_estimator(
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        index: Any = None,
        config: Any = None,
        **kwargs: Any,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        inputs: Dict[str, Any] = {
            "token_level_rewards": token_level_rewards.detach(),
            "response_mask": response_mask.detach().bool(),
        }
        params: Dict[str, Any] = {"adv_estimator": name}
        b = token_level_rewards.shape[0]
        if name == "remax":
            inputs["reward_baselines"] = kwargs["reward_baselines"].detach()
        elif name == "reinforce_plus_plus":
            params["gamma"] = kwargs.get("gamma", _get(config, "gamma", 1.0))
        else:
            inputs["index"] = torch.from_numpy(_index_ids(index, b))
            params["epsilon"] = kwargs.get("epsilon", 1e-6)
            if name in ("grpo", "grpo_passk"):
                params["norm_adv_by_std_in_grpo"] = kwargs.get(
                    "norm_adv_by_std_in_grpo", _get(config, "norm_adv_by_std_in_grpo", True)
                )
            elif name == "grpo_vectorized":
                # verl 0.9.1's grpo_vectorized reads only its keyword argument
                # (which its compute_advantage never passes), not the config.
                params["norm_adv_by_std_in_grpo"] = kwargs.get("norm_adv_by_std_in_grpo", True)
            if name == "gpg":
                params["f_norm"] = kwargs.get("f_norm", 1.0)
                params["alpha"] = kwargs.get("alpha", 1.0)
        out = pt.call(op, **inputs, **params)
        adv, ret = out["advantages"], out["returns"]
        like = token_level_rewards
        return adv.to(like.dtype).reshape(like.shape), ret.to(like.dtype).reshape(like.shape)

    posttrain_adv_estimator.__name__ = f"posttrain_{name}"
    posttrain_adv_estimator.__doc__ = f"verl's `{name}` advantage estimator computed by posttrain ({op})."
    return posttrain_adv_estimator


_REGISTERED: Dict[str, List[str]] = {}


def register(prefix: str = "posttrain_") -> Dict[str, List[str]]:
    """Registers posttrain's policy losses and advantage estimators in verl's
    registries as ``<prefix><name>`` and returns the names registered.
    Idempotent (a second call registers nothing new)."""
    from verl.trainer.ppo import core_algos

    if prefix in _REGISTERED:
        return {"policy_loss": list(_REGISTERED[prefix][0]), "adv_estimator": list(_REGISTERED[prefix][1])}
    losses, advs = [], []
    for mode in POLICY_LOSS_MODES:
        name = f"{prefix}{mode}"
        core_algos.register_policy_loss(name)(_policy_loss_fn(mode))
        losses.append(name)
    for est, op in ADV_ESTIMATORS.items():
        name = f"{prefix}{est}"
        core_algos.register_adv_est(name)(_adv_fn(est, op))
        advs.append(name)
    _REGISTERED[prefix] = (losses, advs)
    return {"policy_loss": losses, "adv_estimator": advs}
