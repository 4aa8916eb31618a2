"""The search space of ``experiments.tune``: the parameters a search may change, their
Optuna distributions around a base configuration, the base's own values (trial 0's)
and the configuration of a trial's values (docs/tuning.md, "The search space").

The run-level parameters are the tuner's own (:data:`RUN_SPACE`); a model's own settings
come from its registry entry (:attr:`jax_vaecf.model.ModelEntry.space`), read in one
place, :func:`space_for`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jax_vaecf.training import configs
from jax_vaecf.training import engine as loop
from jax_vaecf import model as model_lib
from jax_vaecf.models import space as space_lib


class TuneError(ValueError):
  """A search that cannot start as asked (printed as a one-line usage error)."""


def require_optuna():
  """The optuna module, or a :class:`TuneError` that says how to install it."""
  try:
    import optuna  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise TuneError("experiments.tune needs Optuna: pip install -e .[tune] "
                    "(or pip install optuna)") from None
  return optuna


# Which models a parameter applies to, judged from the base and its model built on one
# item: rule -> (predicate(base, model), words for messages).
_APPLIES: dict[str, tuple[Callable[[configs.Config, Any], bool], str]] = {
    "trained": (lambda cfg, m: not m.closed_form,
                "every model trained by gradient steps (not EASE)"),
    "closed_form": (lambda cfg, m: m.closed_form, "models fitted in closed form (EASE)"),
    "kl_beta": (lambda cfg, m: m.has_kl and cfg.kl_gamma == 0,
                "models with a KL term weighted by the beta schedule (kl_gamma = 0)"),
    "kl_anneal": (lambda cfg, m: m.has_kl and cfg.kl_gamma == 0
                  and cfg.anneal_schedule != "constant",
                  "models with a KL term annealed by the beta schedule (kl_gamma = 0, "
                  "schedule not constant)"),
    "kl_gamma": (lambda cfg, m: m.has_kl and cfg.kl_gamma > 0,
                 "models whose KL term is weighted per user (kl_gamma > 0: RecVAE)"),
    "model": (lambda cfg, m: True, "the models whose registry entry declares it"),
}


Param = space_lib.Param


# The run-level parameters: the tuner's own.
RUN_SPACE: tuple[Param, ...] = (
    Param("lr", "float", "Adam learning rate.", 1e-4, 1e-2, log=True),
    Param("dropout_rate", "float", "Input dropout rate.", 0.0, 0.8),
    Param("anneal_cap", "float", "Largest KL weight (beta).", 0.05, 1.0,
          applies="kl_beta"),
    Param("anneal_epochs", "float", "Epochs for beta to reach 1 (capped at anneal_cap), "
          "as 0.2x to 5x the base's number_of_epochs.", 0.2, 5.0, log=True,
          applies="kl_anneal", per_epochs=True),
    Param("ema_decay", "categorical", "Weight averaging: the decay of the moving average "
          "that is validated (0 = the weights).", choices=(0.0, 0.99, 0.995, 0.999)),
    Param("batch_size_train", "categorical", "Users per training batch.",
          choices=(100, 250, 500, 1000)),
    Param("kl_gamma", "float", "Per-user KL weight: kl_gamma x the user's number of "
          "items.", 1e-3, 3e-2, log=True, applies="kl_gamma"),
)
SPACE = RUN_SPACE  # the run-level part; the models' parts: model_params()


def model_params(model: str | None = None) -> tuple[Param, ...]:
  """The searched settings of the model called ``model`` (its registry entry's
  ``space``), or of every registered model (each name once) when ``None``."""
  names = model_lib.names() if model is None else (model,)
  out: dict[str, Param] = {}
  for name in names:
    for p in model_lib.model_entry(name).space:
      out.setdefault(p.name, p)
  return tuple(out.values())


def space_for(base: configs.Config) -> tuple[Param, ...]:
  """Every parameter that may be searched around ``base``: the run-level ones, then the
  model's own settings, from its registry entry."""
  return RUN_SPACE + model_params(base.model)


class _NotRepresentable(Exception):
  """The base's value of a parameter has no place in its distribution."""


def base_value(param: Param, base: configs.Config, n_train_users: Callable[[], int]):
  """The base's own value of ``param`` (trial 0's); ``n_train_users()`` is asked only to
  express a step-count anneal in epochs. Raises ``_NotRepresentable`` with the reason."""
  if param.read is not None:
    try:
      return param.read(getattr(base, param.name))
    except ValueError as e:
      raise _NotRepresentable(str(e)) from None
  if param.name == "anneal_epochs" and base.anneal_epochs <= 0:
    if base.total_anneal_steps <= 0:
      raise _NotRepresentable("the base has no anneal (total_anneal_steps = 0: beta = "
                              "anneal_cap from the first step)")
    return base.total_anneal_steps / loop.steps_per_epoch(base, n_train_users())
  return _field_type(param.name)(getattr(base, param.name))


def distribution(param: Param, base: configs.Config, value: Any):
  """The Optuna distribution of ``param`` for this base. A categorical gains the base's
  ``value`` as a choice; a range is not widened to it (trial 0 runs it as a fixed value
  outside the range: widened to the paper's 200,000-step anneal, the anneal range spent
  half its trials on runs whose KL weight hardly moved)."""
  dists = require_optuna().distributions
  if param.kind == "categorical":
    return dists.CategoricalDistribution(tuple(sorted(set(param.choices) | {value})))
  if param.log and value <= 0:
    raise _NotRepresentable(f"the base's value {value} is not > 0 (sampled on a log scale)")
  scale = base.number_of_epochs if param.per_epochs else 1
  kind = dists.IntDistribution if param.kind == "int" else dists.FloatDistribution
  cast = int if param.kind == "int" else float
  return kind(cast(param.low * scale), cast(param.high * scale), log=param.log)


def _field_type(name: str) -> type:
  """``int`` or ``float``: the type of the setting ``name`` (a list of ints: one, an
  int)."""
  default = configs.default_of(name)
  return int if isinstance(default, (int, tuple)) else float


def config_changes(param: Param, base: configs.Config, value: Any) -> dict:
  """The Config fields a trial value sets."""
  if param.write is not None:
    return {param.name: param.write(value, getattr(base, param.name))}
  return {param.name: _field_type(param.name)(value)}


@dataclasses.dataclass(frozen=True)
class Space:
  """The searched parameters of one base: each one's distribution and base value."""

  params: tuple[Param, ...]
  distributions: dict
  base_values: dict

  def trial_config(self, base: configs.Config, values: dict) -> configs.Config:
    """The base with a trial's values, training without testing. A value equal to the
    base's leaves its field as written (``hidden_dims=()``, a step-count anneal)."""
    changes: dict = {}
    for p in self.params:
      if values[p.name] != self.base_values[p.name]:
        changes.update(config_changes(p, base, values[p.name]))
    return base.replace(**changes, train=True, test=False, benchmark=False)

  def suggest(self, trial) -> dict:
    """A trial's values, asked of ``trial`` (an ``optuna.trial.Trial``) in order."""
    d = self.distributions
    return {p.name: trial.suggest_categorical(p.name, d[p.name].choices)
            if p.kind == "categorical" else getattr(trial, "suggest_" + p.kind)(
                p.name, d[p.name].low, d[p.name].high, log=d[p.name].log)
            for p in self.params}

  def to_json(self) -> dict:
    to_json = require_optuna().distributions.distribution_to_json
    return {p.name: to_json(self.distributions[p.name]) for p in self.params}


def make_space(base: configs.Config, names: tuple[str, ...] = (),
               n_train_users: Callable[[], int] | None = None,
               note: Callable[[str], None] = lambda s: None) -> Space:
  """The space for ``base``: the parameters ``names`` (default: every one of
  :func:`space_for` that applies to the model and can hold the base's value; those left
  out are reported through ``note``). Raises :class:`TuneError` for an unknown name, one
  that does not apply to the model, or one that cannot hold the base's value."""
  candidates = space_for(base)
  known = [p.name for p in RUN_SPACE + model_params()]
  unknown = [n for n in names if n not in known]
  if unknown:
    raise TuneError(f"--space: unknown parameter {', '.join(map(repr, unknown))}; "
                    f"expected names from {', '.join(known)}")
  other = [n for n in names if n not in {p.name for p in candidates}]
  if other:
    raise TuneError(f"--space: {', '.join(other)} does not apply to --model={base.model} "
                    "(a setting of another model)")
  if len(set(names)) != len(names):
    raise TuneError(f"--space names a parameter twice: {','.join(names)}")
  model = loop.build_model(base, 1)
  users = n_train_users or (lambda: loop.load_data(base).n_train_users)
  chosen, dists, values = [], {}, {}
  for p in (p for p in candidates if not names or p.name in names):
    if not _APPLIES[p.applies][0](base, model):
      if names:
        raise TuneError(f"--space: {p.name} does not apply to --model={base.model} with "
                        f"these settings (it applies to {_APPLIES[p.applies][1]})")
      continue
    try:
      value = base_value(p, base, users)
      dist = distribution(p, base, value)
    except _NotRepresentable as e:
      if names:
        raise TuneError(f"--space: {p.name} cannot start from the base: {e}") from None
      note(f"not searching {p.name}: {e}")
      continue
    chosen.append(p)
    dists[p.name], values[p.name] = dist, value
    if p.kind != "categorical" and not dist.low <= value <= dist.high:
      note(f"trial 0 runs the base's {p.name}={value:g}, outside the searched range "
           f"{dist.low:g} to {dist.high:g}")
  if not chosen:
    raise TuneError("--space: no parameter to search")
  return Space(tuple(chosen), dists, values)
