"""A trained run taking new interactions without a full retrain, into a new run folder.

:func:`update_run` reads a run folder (its best checkpoint and the data it was trained
on), adds interactions (:func:`merge`: new items of known users, new users, new items)
and writes the result as a NEW run folder; the old one is only read. By model:

* EASE: ``P = (G + l2 I)^-1`` is rebuilt from the checkpoint's ``B`` and the training
  rows (:func:`ease_diag_p`: ``diag(P)``, which ``B`` divides out, from
  ``(G + l2 I)(I - B) = diag(1 / diag(P))``), then changed exactly by
  :func:`jax_vaecf.models.gram_updates.ease_update` (a Woodbury update of the changed
  users' rows, a border update for new items) when that costs fewer flops than a refit,
  else refitted on the new rows with the same ``l2``. Either way ``B`` equals a refit on
  the new rows (to float32 rounding).
* EDLAE (and any other closed-form model): its diagonal ``l2 + p / (1 - p) diag(G)``
  moves with every changed item count, so there is no low-rank update: the model is
  refitted on the new rows with the settings its fit chose (no sweep).
* the VAEs (Mult-VAE, Mult-DAE, RecVAE): training continues from the best checkpoint's
  state (weights and Adam moments, the step and so the KL weight's schedule) for a given
  number of steps on the changed users' new rows plus ``replay`` times as many unchanged
  training users drawn at random (so the rest of the users are not forgotten). Their
  output layer has one unit per item: new items are refused, naming them.

The new folder holds its data (``split.npz``): its ``config.json`` says
``dataset=in_memory``, and :func:`run_split` reads the data back from there, so a new
folder can be updated again, tested, exported and served like any run folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from typing import Any, Sequence

import jax
import numpy as np
import scipy.sparse as sp

from jax_vaecf import data as data_lib
from jax_vaecf.data import cache as cache_lib
from jax_vaecf.data import inputs
from jax_vaecf.models import base as model_lib
from jax_vaecf.models import ease as ease_lib
from jax_vaecf.models import gram_solvers
from jax_vaecf.models import gram_updates
from jax_vaecf.training import checkpoint as checkpoint_lib
from jax_vaecf.training import closed_form
from jax_vaecf.training import configs
from jax_vaecf.training import engine
from jax_vaecf.training import epochs
from jax_vaecf.training import reporting
from jax_vaecf.training import run_folder
from jax_vaecf.training import run_state
from jax_vaecf.training import steps as train_lib
from jax_vaecf.training.checkpoint_choice import Standing
from jax_vaecf.training.evaluate import (BEST_METRIC, VALIDATION_RECORD, evaluate,
                                         read_best_state, test_best)

SPLIT_FILE = "split.npz"  # an updated run's data, in its folder
_SPLIT_KEY = "updated run"  # the key save_split stores, checked on load

# Training rows scored at a time by ease_diag_p (a (rows, n_items) float32 product).
_ROWS_AT_A_TIME = 1024


def keep_split(workdir: str, split: data_lib.Split) -> None:
  """Writes ``split`` (the data a run in ``workdir`` was trained on, when it is not a
  data set's) as ``workdir/split.npz``, atomically, for :func:`run_split`."""
  cache_lib.save_split(os.path.join(workdir, SPLIT_FILE), split, _SPLIT_KEY)


def run_split(cfg: configs.Config, workdir: str) -> data_lib.Split:
  """The data the run in ``workdir`` was trained on: its ``split.npz`` (an updated run),
  else the config's data set (:func:`jax_vaecf.training.engine.load_data`)."""
  path = os.path.join(workdir, SPLIT_FILE)
  if os.path.exists(path):
    return cache_lib.load_split(path, _SPLIT_KEY)
  return engine.load_data(cfg)


def next_version(workdir: str) -> str:
  """``<workdir>-update-<N>`` for the first ``N`` not taken (counted on from the ``N``
  of a ``workdir`` that is itself such a version)."""
  base, _, n = workdir.rstrip(os.sep).rpartition("-update-")
  if not base or not n.isdigit():
    base, n = workdir.rstrip(os.sep), "0"
  n = int(n) + 1
  while os.path.exists(f"{base}-update-{n}"):
    n += 1
  return f"{base}-update-{n}"


# ----------------------------------------------------------------------- the data


def _texts(values: Sequence[Any]) -> list[str]:
  """Each raw id's text, as item and user ids are compared everywhere (``7`` == ``"7"``)."""
  return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def positives(inter: data_lib.Interactions, cfg: configs.Config
              ) -> tuple[list[Any], list[Any]]:
  """``(users, items)``: the raw ids of each interaction that counts, as a run's data
  counts them: with ratings, those above ``csv_threshold`` (every row with
  ``csv_all_positive``); ids in a vocabulary as text, numbers as ints."""
  if inter.ratings is not None and not cfg.csv_all_positive:
    inter = data_lib.binarize(inter, cfg.csv_threshold)
  raw = lambda codes, vocab: (codes.tolist() if vocab is None
                              else [v.decode() for v in vocab[codes].tolist()])
  return raw(inter.users, inter.user_vocab), raw(inter.items, inter.item_vocab)


@dataclasses.dataclass(frozen=True)
class Change:
  """The data after an update and what changed.

  Attributes:
    split: the new :class:`jax_vaecf.data.Split` (``n + q`` item columns, new users
      appended to the training rows).
    rows: int64 ``(k,)``: training rows of ``split`` that changed (new users included).
    old_rows: CSR float32 ``(k, n)``: those rows before (a new user's: empty).
    new_items: the ``q`` raw ids of new items (columns ``n ..``).
    added_train: entries added to training rows.
    added_fold_in: entries added to held-out users' fold-in rows.
    new_users: users given that the data did not hold.
  """

  split: data_lib.Split
  rows: np.ndarray
  old_rows: sp.csr_matrix
  new_items: list
  added_train: int
  added_fold_in: int
  new_users: int


def _ids_with(old_ids: np.ndarray, new: list) -> np.ndarray:
  """An id table with ``new`` appended: int64 when every id is an int, else text."""
  old_ids = np.asarray(old_ids)
  if not new:
    return old_ids
  if old_ids.dtype.kind in "iu" and all(isinstance(v, (int, np.integer)) for v in new):
    return np.concatenate([old_ids, np.asarray(new, np.int64)])
  return np.asarray(_texts(old_ids.tolist()) + _texts(new))


def _grown(m: sp.csr_matrix, n_rows: int, n_cols: int, rows, cols) -> sp.csr_matrix:
  """``m`` widened to ``(n_rows, n_cols)`` with ones at ``(rows, cols)``; binary."""
  m = sp.csr_matrix(m)
  coo = m.tocoo()
  out = sp.csr_matrix((np.ones(coo.nnz + len(rows), np.float32),
                       (np.concatenate([coo.row, np.asarray(rows, np.int64)]),
                        np.concatenate([coo.col, np.asarray(cols, np.int64)]))),
                      shape=(n_rows, n_cols))
  out.sum_duplicates()
  out.data[:] = 1.0
  return out


def _eval_part(part: data_lib.EvalSplit | None, width: int, user_cols: dict
               ) -> tuple[data_lib.EvalSplit | None, int]:
  """A held-out part with each of its users' new items in the fold-in row (except an
  item the user has held out), widened to ``width``; and the entries added."""
  if part is None:
    return None, 0
  fold, held = sp.csr_matrix(part.fold_in), sp.csr_matrix(part.heldout)
  rows, cols = [], []
  for r, uid in enumerate(_texts(np.asarray(part.user_ids).tolist())):
    for c in user_cols.get(uid, ()):
      has = (c < fold.shape[1] and (fold[r, c] != 0 or held[r, c] != 0))
      if not has:
        rows.append(r)
        cols.append(c)
  new = data_lib.EvalSplit(fold_in=_grown(fold, fold.shape[0], width, rows, cols),
                           heldout=_grown(held, held.shape[0], width, [], []),
                           user_ids=part.user_ids)
  return new, len(rows)


def _columns_by_user(split: data_lib.Split, users: Sequence[Any], items: Sequence[Any]
                     ) -> tuple[dict[str, set], list, list]:
  """``({user's text: the item columns given}, new users' raw ids, new items' raw ids)``
  in order of first appearance; a new item's column is ``n_items`` on."""
  column = {t: j for j, t in enumerate(_texts(np.asarray(split.item_ids).tolist()))}
  known = set(_texts(np.asarray(split.train_user_ids).tolist()))
  for part in (split.validation, split.test):
    if part is not None:
      known.update(_texts(np.asarray(part.user_ids).tolist()))
  user_cols: dict[str, set] = {}
  new_users, new_items = [], []
  for u, i, ut, it in zip(users, items, _texts(users), _texts(items)):
    if it not in column:
      column[it] = split.n_items + len(new_items)
      new_items.append(i)
    if ut not in known and ut not in user_cols:
      new_users.append(u)
    user_cols.setdefault(ut, set()).add(column[it])
  return user_cols, new_users, new_items


def _train_entries(train: sp.csr_matrix, train_row: dict[str, int],
                   user_cols: dict[str, set]) -> tuple[list[int], list[int]]:
  """``(rows, columns)`` of the given items a training row (old or new) lacks."""
  rows, cols = [], []
  for ut, cs in user_cols.items():
    r = train_row.get(ut)
    if r is None:
      continue
    have = (set(train.indices[train.indptr[r]:train.indptr[r + 1]].tolist())
            if r < train.shape[0] else set())
    for c in sorted(cs - have):
      rows.append(r)
      cols.append(c)
  return rows, cols


def merge(split: data_lib.Split, users: Sequence[Any], items: Sequence[Any]) -> Change:
  """``split`` with the interactions ``(users[j], items[j])`` (raw ids) added.

  A training user's items join the training row; a held-out (validation or test) user's
  join the fold-in rows (they stay scored users, never trained on); a user the data
  lacks becomes a new training row; an item id the table lacks becomes a new column.

  Raises:
    ValueError: the columns differ in length, or nothing is new (every interaction given
      is in the data already).
  """
  if len(users) != len(items):
    raise ValueError(f"data: {len(users)} users but {len(items)} items")
  n, m = split.n_items, split.n_train_users
  user_cols, new_users, new_items = _columns_by_user(split, users, items)
  width = n + len(new_items)
  user_ids = _ids_with(split.train_user_ids, new_users)
  train_row = {t: r for r, t in enumerate(_texts(user_ids.tolist()))}
  train = sp.csr_matrix(split.train)
  rows, cols = _train_entries(train, train_row, user_cols)
  validation, v_added = _eval_part(split.validation, width, user_cols)
  test, t_added = _eval_part(split.test, width, user_cols)
  if not rows and not v_added and not t_added:
    raise ValueError(f"data: all {sum(len(c) for c in user_cols.values())} interactions "
                     "given are in the model's data already; nothing to update")
  changed = np.unique(np.asarray(rows, np.int64))
  old = changed[changed < m]
  old_rows = sp.vstack([train[old], sp.csr_matrix((len(changed) - len(old), n),
                                                  dtype=np.float32)]).tocsr()
  new = dataclasses.replace(split, train=_grown(train, m + len(new_users), width, rows, cols),
                            validation=validation, test=test,
                            item_ids=_ids_with(split.item_ids, new_items),
                            train_user_ids=user_ids)
  return Change(new, changed, old_rows, new_items, len(rows), v_added + t_added,
                len(new_users))


# ----------------------------------------------------------------------- EASE


def ease_diag_p(x: sp.csr_matrix, b: np.ndarray, l2: float) -> np.ndarray:
  """``diag(P)`` float64 ``(n,)`` of EASE's ``P = (X^T X + l2 I)^-1`` from its ``B``
  float32 ``(n, n)`` and the sparse ``(m, n)`` rows ``x`` it was fitted on.

  ``B = I - P diag(1 / diag(P))``, so ``(G + l2 I)(I - B) = diag(1 / diag(P))``: entry
  ``j`` is ``G_jj + l2 - (G B)_jj`` (``B_jj = 0``), with ``(G B)_jj = sum_u x_uj (x B)_uj``
  (``nnz * n`` work, :data:`_ROWS_AT_A_TIME` rows at a time; no ``n x n`` temporary).

  Raises:
    ValueError: an entry is not positive and finite (``B`` was not fitted on ``x`` with
      this ``l2``).
  """
  x = sp.csr_matrix(x, dtype=np.float32)
  gb = np.zeros(x.shape[1])
  for lo in range(0, x.shape[0], _ROWS_AT_A_TIME):
    part = x[lo:lo + _ROWS_AT_A_TIME]
    xb = np.asarray(part @ b, np.float64)
    gb += np.asarray(part.multiply(xb).sum(axis=0), np.float64).ravel()
  inverse = gram_solvers.gram_diagonal(x) + l2 - gb
  bad = np.flatnonzero(~(np.isfinite(inverse) & (inverse > 0)))
  if bad.size:
    raise ValueError(f"EASE's B does not match its training rows and l2 {l2:g} (items "
                     f"{bad[:5].tolist()} get a diagonal of P that is not positive): the "
                     "run folder's checkpoint and data disagree")
  return 1.0 / inverse


def _best_params(cfg: configs.Config, workdir: str, split: data_lib.Split) -> dict:
  """The parameters of ``workdir``'s best checkpoint as numpy arrays, after the
  checkpoint's identity is checked against ``split`` (the data it was trained on)."""
  model = engine.build_model(cfg, split.n_items)
  abstract = jax.eval_shape(lambda: train_lib.init_params(model, jax.random.PRNGKey(0)))
  ck = checkpoint_lib.RunCheckpoints(workdir, run_folder.identity(cfg, split),
                                     read_only=True)
  try:
    restored = ck.restore_best_fields({"params": abstract})
  finally:
    ck.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir}: no finished checkpoint to update")
  return restored[0]["params"]


def ease_params(cfg: configs.Config, workdir: str, old: data_lib.Split, change: Change
                ) -> tuple[dict, str]:
  """EASE's parameters after ``change`` and how they were made (``"update"``: the
  exact low-rank update; ``"refit"``: a refit with the same ``l2``, when cheaper)."""
  params = _best_params(cfg, workdir, old)
  b = np.array(params["output"]["kernel"], np.float32, order="C")  # P is written over it
  l2 = float(params["l2"])
  diag_p = ease_diag_p(sp.csr_matrix(old.train), b, l2)
  p = gram_solvers.symmetrize_from_lower(gram_updates.p_from_ease_b(b, diag_p))
  x = sp.csr_matrix(change.split.train, dtype=np.float32)
  p, how = gram_updates.ease_update(p, change.old_rows, x[change.rows], l2, x)
  return ease_lib.params_of(jax.device_put(gram_solvers.ease_b_from_p(p)), l2), how


# ----------------------------------------------------------------------- the VAEs


def update_rows(change: Change, n_old_users: int, replay: float, seed: int
                ) -> sp.csr_matrix:
  """The rows a continued training reads: every changed training row and
  ``round(replay * k)`` unchanged old training rows (``k`` changed), drawn with
  ``seed``; CSR float32 ``(k + r, n_items)``."""
  unchanged = np.setdiff1d(np.arange(n_old_users), change.rows)
  r = min(len(unchanged), int(round(replay * len(change.rows))))
  drawn = np.random.default_rng(seed).choice(unchanged, size=r, replace=False)
  rows = np.concatenate([change.rows, np.sort(drawn)])
  return sp.csr_matrix(change.split.train)[rows]


def _train_on(cfg: configs.Config, built: run_state.Built, state: train_lib.TrainState,
              x: sp.csr_matrix, n_steps: int | None, seed: int
              ) -> tuple[train_lib.TrainState, list[dict], int]:
  """``state`` trained on the rows ``x`` for ``n_steps`` batches of each pass (``None``:
  one pass; no row: none); returns the state, each step's host metrics and the steps."""
  if not x.shape[0]:
    return state, [], 0  # only held-out users' fold-in rows changed: nothing to train on
  batcher = data_lib.TrainBatcher(x, cfg.batch_size_train, seed=seed,
                                  num_shards=built.steps.num_shards)
  n_steps = batcher.steps_per_epoch if n_steps is None else n_steps
  done, host = 0, []
  while done < n_steps:
    take = min(n_steps - done, batcher.steps_per_epoch)
    state, metrics, _ = epochs.train_epoch(built.steps, state, batcher, done, cfg.prefetch,
                                           max_steps=take)
    host += metrics
    done += take
  return state, host, n_steps


def continue_training(cfg: configs.Config, workdir: str, old: data_lib.Split,
                      change: Change, n_steps: int | None, replay: float
                      ) -> tuple[run_state.Built, train_lib.TrainState, dict, dict]:
  """The best checkpoint's state (weights, Adam moments, step) trained on
  :func:`update_rows` for ``n_steps`` batches of each pass of the model's phases
  (Mult-VAE: ``n_steps`` Adam steps; ``None``: one pass over those rows). Returns the
  built steps, the state, the checkpoint's meta and the update's training record."""
  built = engine.build(cfg, old.n_items, old.n_train_users)  # the run's KL schedule
  restored = read_best_state(cfg, workdir, old, built, "no finished checkpoint to update")
  state, meta = built.steps.init_state(restored[0]), restored[1]
  epoch = int(meta["epoch"])
  x = update_rows(change, old.n_train_users, replay, cfg.seed + epoch)
  t0 = time.perf_counter()
  state, host, n_steps = _train_on(cfg, built, state, x, n_steps, cfg.seed + epoch)
  epochs.check_finite(cfg, state, host, epoch + 1, epoch)
  seconds = time.perf_counter() - t0
  record = {"split": "train", "epoch": epoch + 1, "step": int(built.steps.to_host(state.step)),
            "update_rows": int(x.shape[0]), "update_steps": int(n_steps),
            "loss": float(np.mean([m["loss"] for m in host])) if host else None,
            "epoch_time_s": seconds}
  return built, state, meta, record


# ----------------------------------------------------------------------- the new folder


def _keep(cfg: configs.Config, out: str, split: data_lib.Split, built: run_state.Built,
          state: train_lib.TrainState, record: dict, meta: dict) -> dict:
  """Writes the updated run into ``out`` as a run of its own: ``config.json``,
  ``item_ids.npy``, ``split.npz``, the state as its best checkpoint (scored on the
  validation users when there are some), ``metrics.jsonl``, then its test. Returns
  ``{"train": record, "test": the test metrics}``."""
  run_folder.write_run_files(cfg, out, split, 0)
  keep_split(out, split)
  epoch = int(record["epoch"])
  standing = Standing(best_epoch=epoch)
  if split.validation is not None:
    vm = evaluate(built.steps, state, split.validation, cfg.batch_size_validation)
    standing.best, standing.best_metrics = vm[BEST_METRIC], {
        k: vm[k] for k in VALIDATION_RECORD}
    record.update({f"val_{k}": v for k, v in standing.best_metrics.items()})
  score = standing.best if standing.best > -math.inf else float(epoch)
  record["best_val_ndcg@100"] = standing.best if standing.best > -math.inf else None
  ck = checkpoint_lib.RunCheckpoints(out, run_folder.identity(cfg, split),
                                     keep_best=cfg.keep_best, best_metric=BEST_METRIC)
  try:
    ck.save_best(record["step"], built.steps.to_host(state),
                 {**meta, **standing.meta(epoch)}, {BEST_METRIC: score})
    log = run_folder.MetricsLog(out)
    log.write({**record, "checkpointed": False})
    test = test_best(cfg, out, split, ck, built) if split.test is not None else {}
    log.write({"split": "test", **test})
  finally:
    ck.close()
  return {"train": record, "test": test}


def _ease_run(cfg, workdir, old, change, out) -> tuple[configs.Config, dict]:
  t0 = time.perf_counter()
  params, how = ease_params(cfg, workdir, old, change)
  fit_s = time.perf_counter() - t0
  closed_form.check_finite_params(params, cfg.model)
  cfg = cfg.replace(l2=(float(params["l2"]),))  # the value fitted, as a refit records it
  built = engine.build(cfg, change.split.n_items, change.split.n_train_users)
  # pylint: disable-next=protected-access
  state = built.steps.init_state(closed_form._state_of(cfg, built, params))
  chosen = model_lib.settings_json(cfg.model_settings)
  record = {"split": "train", "epoch": 1, "step": 1, "how": how, "chosen": chosen,
            "fit_time_s": fit_s, "epoch_time_s": fit_s}
  return cfg, _keep(cfg, out, change.split, built, state, record,
                    {"chosen": chosen, "how": how})


def _vae_run(cfg, workdir, old, change, out, n_steps, replay
             ) -> tuple[configs.Config, dict]:
  built, state, meta, record = continue_training(cfg, workdir, old, change, n_steps, replay)
  record["how"] = "continued"
  return cfg, _keep(cfg, out, change.split, built, state, record, {"how": "continued"})


def _refit_run(cfg, workdir, change, out, report) -> tuple[configs.Config, dict]:
  """A closed-form model without an exact update (EDLAE: its diagonal moves with the
  item counts) refitted on the new data with the settings its fit chose."""
  chosen = checkpoint_lib.read_best_meta(workdir).get("chosen") or {}
  cfg = cfg.replace(**chosen)
  results = engine.run(cfg, out, split=change.split, report=report)
  keep_split(out, change.split)
  results["train"]["how"] = "refit"
  return cfg, results


def _new_items_refused(cfg: configs.Config, change: Change) -> None:
  if change.new_items and model_lib.model_entry(cfg.model).fit is None:
    shown = ", ".join(_texts(change.new_items[:5])) + (
        f" and {len(change.new_items) - 5} more" if len(change.new_items) > 5 else "")
    raise ValueError(f"data: items {shown} are not in the model's item table; "
                     f"{cfg.model}'s output layer has one unit per item, so it cannot "
                     "take new items without a retrain (leave them out, or fit again)")


def update_run(cfg: configs.Config, workdir: str, users: Sequence[Any],
               items: Sequence[Any], out: str, *, n_steps: int | None = None,
               replay: float = 1.0, split: data_lib.Split | None = None,
               report: reporting.Report = reporting.log_record
               ) -> tuple[configs.Config, data_lib.Split, dict]:
  """The run in ``workdir`` with the interactions ``(users[j], items[j])`` (raw ids)
  added, written as a new run in ``out`` (a new or empty folder; ``workdir`` is only
  read). See the module's docstring for what each model does.

  Args:
    cfg: the run's config (``workdir``'s ``config.json``).
    workdir: the run folder.
    users, items: raw ids, one pair per interaction (:func:`merge`).
    out: the new run folder.
    n_steps: the VAEs' continued training (:func:`continue_training`); else unused.
    replay: the VAEs' unchanged users per changed user (:func:`update_rows`).
    split: the data the run was trained on (``None``: :func:`run_split`).
    report: the records of a refit (:func:`jax_vaecf.training.engine.run`).

  Returns:
    ``(config, split, results)`` of the new run: ``results["train"]`` its record (with
    ``how``: ``"update"``, ``"refit"`` or ``"continued"``), ``results["test"]`` its test.

  Raises:
    ValueError: before any work: nothing new, new items for a VAE, ``out`` not a new
      or empty folder, ``n_steps`` < 1 or ``replay`` < 0; the checkpoint and data
      disagree (:class:`jax_vaecf.training.checkpoint.CheckpointMismatchError`).
  """
  if n_steps is not None and (not isinstance(n_steps, int) or n_steps < 1):
    raise ValueError(f"steps: expected an int >= 1, got {n_steps!r}")
  if not (isinstance(replay, (int, float)) and 0 <= replay < math.inf):
    raise ValueError(f"replay: expected a number >= 0, got {replay!r}")
  out = inputs.save_path(out, [workdir], "out")
  old = run_split(cfg, workdir) if split is None else split
  change = merge(old, users, items)
  _new_items_refused(cfg, change)
  new_cfg = cfg.replace(dataset=engine.IN_MEMORY, data_dir="", refit=False)
  if model_lib.model_entry(cfg.model).fit is not None and cfg.model != "ease":
    new_cfg, results = _refit_run(new_cfg, workdir, change, out, report)
    return new_cfg, change.split, results
  lock = run_folder.prepare_workdir(new_cfg, out)
  try:
    if cfg.model == "ease":
      new_cfg, results = _ease_run(new_cfg, workdir, old, change, out)
    else:
      new_cfg, results = _vae_run(new_cfg, workdir, old, change, out, n_steps, replay)
  except BaseException:
    lock.release()
    shutil.rmtree(out, ignore_errors=True)  # a new folder: nothing of it is kept
    raise
  lock.release()
  return new_cfg, change.split, results
