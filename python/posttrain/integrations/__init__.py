"""Drop-in loss backends for the Python trainers.

* :mod:`posttrain.integrations.trl` — ``use_posttrain(trainer)`` for TRL's
  ``GRPOTrainer``.
* :mod:`posttrain.integrations.verl` — ``register()`` adds posttrain's
  policy losses and advantage estimators to verl's registries.

Each submodule imports its framework only when imported itself.
"""
