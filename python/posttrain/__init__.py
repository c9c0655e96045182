"""posttrain: the math of LLM post-training, from posttrain-core (Rust).

The losses and estimators behind RLHF/PPO, DPO and its family, and GRPO and
its family, reproducing TRL, verl, OpenRLHF and torchtune number for number,
each with its closed-form gradient.

Modules
-------
``posttrain.ops``
    NumPy in, NumPy out. Every peer op of the conformance vectors by its peer
    name and parameter names (``ops.call("verl.compute_policy_loss", ...)``,
    or ``ops.verl.compute_policy_loss(...)``), and the hot ops of a training
    step read in place (``grpo_loss``, ``verl_policy_loss``,
    ``log_probs_entropy``).
``posttrain.torch``
    The same ops on PyTorch CPU tensors as ``torch.autograd.Function``s whose
    backward is the core's closed-form gradient, so ``loss.backward()`` works
    in a training loop (f32 and f64).
``posttrain.integrations.trl`` / ``posttrain.integrations.verl``
    Drop-in loss backends: ``use_posttrain(trainer)`` for TRL's GRPOTrainer
    and DPOTrainer, ``register()`` for verl's policy-loss and advantage
    registries.

Errors from the core surface as ``ValueError`` with the core's message.
"""

from . import _native
from . import ops

__version__ = _native.__version__

__all__ = ["ops", "__version__"]
