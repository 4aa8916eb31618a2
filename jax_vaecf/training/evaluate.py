"""Scoring a state on held-out users: validation during training, and the test of a
run's best checkpoint (the test record, the catalogue metrics, the per-user file)."""

from __future__ import annotations

import os

import jax

from jax_vaecf.evaluation import catalogue
from jax_vaecf.training import checkpoint as checkpoint_lib
from jax_vaecf.training import configs
from jax_vaecf import data as data_lib
from jax_vaecf.core import distributed
from jax_vaecf.evaluation import metrics as metrics_lib
from jax_vaecf.evaluation import per_user
from jax_vaecf.training import run_folder
from jax_vaecf.training import run_state
from jax_vaecf.training import run_data as run_split

VALIDATION_KS = (20, 50, 100)
BEST_METRIC = "ndcg@100"
# What an epoch's record keeps of a validation (as val_<metric>).
VALIDATION_RECORD = ("ndcg@100", "recall@20", "recall@50")


def own_shards(batches, process_local: bool = False):
  """This process's shards of each global batch (all of them in a one-process run);
  ``process_local`` batches (partitioned data) hold only them already."""
  n, i = jax.process_count(), jax.process_index()
  for b in batches:
    yield b if n == 1 or process_local else distributed.process_shards(b, i, n)


def evaluate(steps, params, split: data_lib.EvalSplit, batch_size: int, *,
             accumulator: metrics_lib.MetricAccumulator | None = None) -> dict:
  """Mean (and standard error) of every metric over the split's users with held-out items
  (a :class:`jax_vaecf.data.PartEvalSplit`: every process's users, each process feeding
  its own; the per-user metrics come back to every process). ``accumulator``, when
  given, keeps every user's values (in the split's row order, except for partitioned
  data)."""
  acc = metrics_lib.MetricAccumulator() if accumulator is None else accumulator
  if isinstance(split, data_lib.PartEvalSplit):
    batches = split.batches(batch_size, steps.num_shards)
  else:
    batches = own_shards(data_lib.eval_batches(split, batch_size,
                                                num_shards=steps.num_shards))
  for _, out in _pipelined(steps.eval_step, params, batches, steps.put_batch):
    acc.add(steps.metrics_to_host(out))  # every user of the global batch
  return acc.result()


def _pipelined(fn, params, host_batches, put):
  """Runs ``fn(params, batch)`` over batches, copying the next while one runs."""
  pending = None
  for host_batch in host_batches:
    out = fn(params, put(host_batch))
    if pending is not None:
      yield pending
    pending = (host_batch, out)
  if pending is not None:
    yield pending


def read_best_state(cfg: configs.Config, workdir: str, data, built: run_state.Built,
                    missing: str) -> tuple:
  """``(state, meta)`` of the best checkpoint of ``workdir``, read without writing
  (``data``: the run's split or its sizes, for the folder's identity). Raises
  ``FileNotFoundError(f"{workdir}: {missing}")`` when the folder has none."""
  ck = checkpoint_lib.RunCheckpoints(workdir, run_folder.identity(cfg, data),
                                     keep_best=cfg.keep_best, best_metric=BEST_METRIC,
                                     read_only=True)
  try:
    restored = ck.restore_best(run_state.state_layout(cfg, built))
  finally:
    ck.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir}: {missing}")
  return restored


def test_best(cfg: configs.Config, workdir: str, split: data_lib.Split,
              ck: checkpoint_lib.RunCheckpoints, built: run_state.Built) -> dict:
  """Scores the best checkpoint of ``workdir`` on the test users."""
  steps = built.steps
  restored = ck.restore_best(run_state.state_layout(cfg, built))
  if restored is None:
    raise FileNotFoundError(
        f"{workdir}: no trained checkpoint to test; run with --train first")
  state, meta = restored
  acc = metrics_lib.MetricAccumulator()
  result = evaluate(steps, steps.init_state(state), split.test, cfg.batch_size_validation,
                    accumulator=acc)
  result["epoch"] = meta.get("epoch")
  if isinstance(split.test, data_lib.PartEvalSplit):
    return result  # users come back in block order, and each process has its rows only
  users = acc.users()
  popularity = catalogue.item_popularity(split.train)
  result.update(catalogue.catalogue_metrics(users["top"], popularity,
                                            split.n_train_users, cfg.test_ks))
  if jax.process_index() == 0:
    per_user.write(os.path.join(workdir, per_user.FILE), split.test.user_ids, users,
                   split.item_ids, popularity,
                   {"split": split_identity(cfg, split), "epoch": meta.get("epoch"),
                    "run": {"model": cfg.model, "seed": cfg.seed},
                    "summary": {k: v for k, v in result.items()
                                if isinstance(v, (int, float))}})
  return result


def split_identity(cfg: configs.Config, split: data_lib.Split) -> dict:
  """What two tested runs must share to be compared user by user: the data settings,
  the item table and the test users."""
  ident = run_folder.identity(cfg, split)
  # Validation targets come out of the training rows, never out of the test users' rows
  # or targets: a run with and one without them (a refit) test the same users.
  settings = {k: v for k, v in run_split.data_settings(cfg).items() if k != "validation_fraction"}
  return {**settings, **{k: ident[k] for k in (
      "dataset", "protocol", "n_items", "n_train_users", "items_digest")},
          "n_test_users": int(split.test.n_users),
          # The digest the item table gets, over the test users' raw ids.
          "test_users_digest": run_folder.items_digest(split.test.user_ids)}
