"""What a run's config builds for training, and the run's state before its first step.

:func:`jax_vaecf.training.engine.build` makes a :class:`Built` (model, step options, placed steps);
the state functions here make the fresh state in it, or its layout for restoring."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jax_vaecf.training import configs
from jax_vaecf.training import parallel as parallel_lib
from jax_vaecf.training import steps as train_lib


@dataclasses.dataclass(frozen=True)
class Built:
  """What a config builds: its model, step options and placed steps."""

  model: Any
  options: train_lib.StepOptions
  steps: parallel_lib.ParallelSteps


def optimizer(cfg: configs.Config):
  """The run's optimiser (Adam with the config's learning rate and betas)."""
  return train_lib.make_optimizer(cfg.lr, b1=cfg.adam_b1, b2=cfg.adam_b2)


def fresh_state(cfg: configs.Config, built: "Built") -> train_lib.TrainState:
  """The run's initial state, as host-side arrays of one device."""
  return train_lib.create_train_state(built.model, optimizer(cfg),
                                      jax.random.PRNGKey(cfg.seed), built.options)


def state_layout(cfg: configs.Config, built: "Built") -> train_lib.TrainState:
  """The shapes and dtypes of the run's state (nothing allocated): the layout its
  checkpoints are restored into."""
  return jax.eval_shape(lambda: fresh_state(cfg, built))


def placed_fresh_state(cfg: configs.Config, built: "Built") -> train_lib.TrainState:
  """The run's initial state made on its devices (item-split arrays shard by shard;
  the same values as :func:`fresh_state`)."""
  return built.steps.create_state(optimizer(cfg), jax.random.PRNGKey(cfg.seed))
