"""From Python: one call from data to a fitted model, and the model's answers.

::

  import jax_vaecf
  model = jax_vaecf.fit(user_items, "ml1m")      # scipy CSR users x items, any preset
  model.recommend(users=[0, 7], k=10)            # raw user ids of the data
  model.recommend(items=[["a", "b"]], k=10)      # a new user's raw item ids
  model.evaluate("test")                         # the project's metrics, held-out items
  model.history                                  # one dict per epoch (pandas takes it)
  new = model.update((users, items))             # new interactions: a new run folder
  model.save("runs/mine")                        # a run folder every CLI tool reads
  jax_vaecf.load("runs/mine")                    # and back (a CLI run's folder too)

:func:`fit` runs the same engine as ``python -m experiments.train``
(:func:`jax_vaecf.training.engine.run`): the same split, training, validation, best-keeping, early
stopping, divergence checks and test, into a run folder (a temporary one unless
``workdir`` is given; with one, a second call resumes it as the command line does).
:class:`FittedModel` answers from that folder's best checkpoint through
:class:`jax_vaecf.serving.recommender.Recommender`, so it serves exactly what ``recommend`` and an
exported artefact serve.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
import scipy.sparse as sp

from jax_vaecf.training import configs
from jax_vaecf import data as data_lib
from jax_vaecf.serving import export as export_lib
from jax_vaecf.data import inputs
from jax_vaecf.training import engine as loop
from jax_vaecf.evaluation import metrics as metrics_lib
from jax_vaecf.serving import recommender as recommend_lib
from jax_vaecf.training import run_folder
from jax_vaecf.training import steps as train_lib
from jax_vaecf.training import update as update_lib

Recommendations = recommend_lib.Recommendations


def _config(config: str | configs.Config, settings: dict) -> configs.Config:
  cfg = configs.get_config(config) if isinstance(config, str) else config
  if not isinstance(cfg, configs.Config):
    raise TypeError(f"config: expected a preset name or a Config, got "
                    f"{type(config).__name__}")
  known = configs.setting_names()
  unknown = sorted(set(settings) - set(known))
  if unknown:
    raise ValueError(f"unknown settings {unknown}: expected fields of Config or a "
                     "model's own settings" + "".join(
                         f" ({k} is now {configs.RENAMED[k]})" for k in unknown
                         if k in configs.RENAMED))
  model = settings.get("model", cfg.model)
  check = lambda obj, source: configs.from_json({"model": model, **obj}, source)
  is_list = lambda name: isinstance(configs.default_of(name), tuple)
  return cfg.replace(**inputs.setting_values(settings, check, is_list))


def interactions_of(data: Any, *, user_ids: Sequence | None = None,
                    item_ids: Sequence | None = None) -> data_lib.Interactions:
  """In-memory data as :class:`jax_vaecf.data.Interactions` (what :func:`fit` splits).

  Args:
    data: a scipy sparse matrix ``(n_users, n_items)``, any numeric dtype, of 0 and 1
      (a non-zero entry is an interaction; a stored zero is none), or a tuple of raw-id
      columns ``(users, items)`` / ``(users, items, ratings)``, each ``(n,)`` (ids int
      or str, ratings float), one entry per interaction.
    user_ids: a matrix's ``(n_users,)`` distinct raw row ids; ``None``: the row index.
    item_ids: a matrix's ``(n_items,)`` distinct raw column ids; ``None``: the index.

  Returns:
    The :class:`jax_vaecf.data.Interactions`, one entry per interaction.

  Raises:
    TypeError: ``data`` is neither a sparse matrix nor a 2- or 3-tuple, or a matrix of
      non-numbers.
    ValueError: a NaN, inf, negative or non-1 entry, a matrix without interactions,
      ids of the wrong count or repeated (:func:`jax_vaecf.data.inputs.interaction_matrix`,
      :func:`jax_vaecf.data.inputs.axis_ids`), or ``user_ids`` / ``item_ids`` with columns.
  """
  if sp.issparse(data):
    m = inputs.interaction_matrix(data, "data")
    row_ids = inputs.axis_ids(user_ids, m.shape[0], "user_ids", "row")
    column_ids = inputs.axis_ids(item_ids, m.shape[1], "item_ids", "column")
    users = m.row if row_ids is None else row_ids[m.row]
    items = m.col if column_ids is None else column_ids[m.col]
    return data_lib.from_columns(users, items, source="the matrix")
  if isinstance(data, tuple) and len(data) in (2, 3):
    if user_ids is not None or item_ids is not None:
      raise ValueError("user_ids / item_ids name a matrix's rows and columns; columns "
                       "of raw ids name themselves")
    return data_lib.from_columns(*data, source="the columns")
  raise TypeError("data: expected None (the config's data set), a Split, a scipy sparse "
                  "matrix (users x items) or a tuple (users, items[, ratings]) of raw "
                  f"ids, got {type(data).__name__}")


class TensorBoard:
  """An ``on_epoch`` callback writing every number of each epoch's record as a
  TensorBoard scalar (tag = the record's key with ``@`` as ``_at_``, which TensorBoard's
  tags do not allow: ``val_ndcg_at_100``; step = its epoch) to event files in
  ``logdir``, through ``tensorboardX`` (optional extra ``[tensorboard]``). Its writer
  thread puts events on disk every ``flush_secs`` seconds, so a dashboard follows a
  running fit, and all of them at :meth:`close` (also when the process exits)::

    tb = jax_vaecf.api.TensorBoard("runs/tb")
    model = jax_vaecf.fit(data, "ml1m", on_epoch=tb)
    tb.close()

  Args:
    logdir: the folder of the event files (created if missing).
    flush_secs: seconds between two writes of the queued events to disk.

  Raises:
    ImportError: ``tensorboardX`` is not installed.
  """

  def __init__(self, logdir: str | os.PathLike, flush_secs: float = 5.0):
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError("the TensorBoard callback needs tensorboardX: pip install "
                        "'jax_vaecf[tensorboard]'") from None
    self._writer = SummaryWriter(os.fspath(logdir), flush_secs=flush_secs)
    self._closed = weakref.finalize(self, self._writer.close)

  def __call__(self, record: dict) -> None:
    step = int(record.get("epoch", 0))
    for key, value in record.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
        self._writer.add_scalar(key.replace("@", "_at_"), value, step)

  def close(self) -> None:
    """Writes every event still queued and closes the files."""
    self._closed()


def fit(data: Any = None, config: str | configs.Config = "ml20m", *,
        workdir: str | os.PathLike | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        user_ids: Sequence | None = None, item_ids: Sequence | None = None,
        **settings) -> "FittedModel":
  """Trains (or fits, for EASE) a model and tests it, as ``experiments.train`` does.

  Args:
    data: ``None``: the config's data set (``dataset``, ``data_dir``, as on the command
      line); a :class:`jax_vaecf.data.Split`, checked whole first
      (:func:`jax_vaecf.data.inputs.split`); a scipy sparse matrix ``(n_users, n_items)``,
      any numeric dtype, of 0 and 1 (non-zero = interaction) or a tuple ``(users,
      items[, ratings])`` of ``(n,)`` columns (raw ids int or str, ratings float): split
      by the config's protocol as a ``--dataset=csv`` file is (users with fewer than 5
      items dropped; with ratings, those above ``csv_threshold`` are the positives).
    config: a preset name (``jax_vaecf.training.configs.PRESETS``) or a
      :class:`jax_vaecf.training.configs.Config`.
    workdir: the run folder; ``None``: a temporary one, removed with the model (keep it
      with :meth:`FittedModel.save`). A folder holding this run resumes it. With
      ``refit=True`` the model returned is the refit run's (``workdir/refit``).
    on_epoch: called with each epoch's record (a dict, as logged in ``metrics.jsonl``).
    user_ids, item_ids: a matrix's ``(n_users,)`` row and ``(n_items,)`` column raw ids,
      each distinct (default: their indices).
    **settings: any :class:`Config` field, overriding the preset (``number_of_epochs=50``).

  Returns:
    The :class:`FittedModel` of the run's best checkpoint (``model.results``: the best
    validation metrics and the test metrics).

  Raises:
    TypeError: before any work, naming the argument: ``config`` is not a preset name or
      a ``Config``, ``data`` of another kind, ``on_epoch`` not callable, ``l2`` not a
      number (:mod:`jax_vaecf.data.inputs`).
    ValueError: before any work: an unknown preset or setting, a setting of the wrong
      type or out of range, data that is not 0/1 or has no interaction, a ``Split``
      whose parts disagree.
    jax_vaecf.training.engine.TrainingDivergedError: the loss or parameters became NaN / inf.
    jax_vaecf.training.checkpoint.CheckpointMismatchError: ``workdir`` holds another run.
    jax_vaecf.training.checkpoint.CheckpointSaveError: a checkpoint could not be written (a full
      disk); the folder keeps the checkpoints saved before, and the same call resumes.
  """
  cfg = _config(config, settings)
  inputs.callback(on_epoch, "on_epoch")
  cfg, split = _in_memory_split(cfg, data, user_ids, item_ids)
  temporary = workdir is None
  folder = tempfile.mkdtemp(prefix="jax_vaecf_") if temporary else os.fspath(workdir)
  try:
    results = loop.run(cfg, folder, on_epoch=on_epoch, split=split)
  except BaseException:
    if temporary:
      shutil.rmtree(folder, ignore_errors=True)
    raise
  model = _best_model(cfg, folder, split, results)
  if split is not None:  # data given in Python: the folder keeps it (load, update)
    update_lib.keep_split(model.workdir, model.split)
  if temporary:
    model._owns = weakref.finalize(model, shutil.rmtree, folder, True)
    model._temporary_root = folder
  return model


def _in_memory_split(cfg: configs.Config, data: Any, user_ids: Sequence | None,
                     item_ids: Sequence | None
                     ) -> tuple[configs.Config, data_lib.Split | None]:
  """:func:`fit`'s ``data`` as a checked split, and the config reading it from memory;
  ``(cfg, None)`` unchanged when ``data`` is None (the config's data set)."""
  split = None
  if isinstance(data, data_lib.Split):
    split = inputs.split(data, "data")
  elif data is not None:
    cfg = cfg.replace(dataset=loop.IN_MEMORY, data_dir="")
    configs.validate(cfg)  # a bad setting fails before the data is split
    split = loop.split_interactions(cfg, interactions_of(data, user_ids=user_ids,
                                                         item_ids=item_ids))
  if split is not None and cfg.dataset != loop.IN_MEMORY:
    cfg = cfg.replace(dataset=loop.IN_MEMORY, data_dir="")
  return cfg, split


def _best_model(cfg: configs.Config, folder: str, split: data_lib.Split | None,
                results: dict) -> "FittedModel":
  """The :class:`FittedModel` of a finished run in ``folder``: the refit run's when the
  run refit (``folder/refit``), else the run's own."""
  if "refit" in results:  # the refit model is the one tested and served
    rcfg = loop.refit_config(cfg, results["train"])
    return FittedModel(rcfg, os.path.join(folder, loop.REFIT_FOLDER),
                       split=None if split is None else loop.with_validation(rcfg, split),
                       results=results["refit"])
  return FittedModel(cfg, folder,
                     split=None if split is None else loop.with_validation(cfg, split),
                     results=results)


def load(workdir: str | os.PathLike) -> "FittedModel":
  """The model of a run folder (written by :func:`fit`, :meth:`FittedModel.save` or
  ``python -m experiments.train``); :meth:`FittedModel.load`.

  Args:
    workdir: the run folder.

  Returns:
    Its :class:`FittedModel` (best checkpoint); the data is read again only when a
    method needs it.

  Raises:
    FileNotFoundError: no ``config.json``, no finished checkpoint or no ``item_ids.npy``.
    ValueError: an unreadable ``config.json``, or an item table another run wrote.
    jax_vaecf.evaluation.metrics.NonFiniteModelError: the best checkpoint's parameters are NaN /
      inf (the run diverged).
  """
  return FittedModel.load(workdir)


class FittedModel:
  """A trained run's best checkpoint, with the data it was trained on when known.

  Made by :func:`fit` and :func:`load`, not by hand.

  Args:
    config: the run's :class:`jax_vaecf.training.configs.Config`.
    workdir: its run folder.
    split: the :class:`jax_vaecf.data.Split` it was trained on; ``None``: read again
      from the config's data set when needed.
    results: what the run returned.

  Attributes:
    config: the run's :class:`jax_vaecf.training.configs.Config`.
    workdir: its run folder.
    results: what the run returned (``"train"``: the best validation metrics and epoch;
      ``"test"``: the test metrics), ``{}`` for a loaded folder.
  """

  def __init__(self, config: configs.Config, workdir: str, *,
               split: data_lib.Split | None = None, results: dict | None = None):
    self.config = config
    self.workdir = os.fspath(workdir)
    self.results = dict(results or {})
    self._split = split
    self._recommender: recommend_lib.Recommender | None = None
    self._jitted: dict = {}  # compiled scoring / evaluation, per model (and ks)
    self._rows: dict[str, list[np.ndarray]] | None = None
    self._owns: weakref.finalize | None = None
    self._temporary_root: str | None = None  # removed with the model (fit's own folder)

  @classmethod
  def load(cls, workdir: str | os.PathLike) -> "FittedModel":
    """The model of a run folder; its data is read again (from the config's data set)
    only when a method needs it.

    Args:
      workdir: the run folder.

    Returns:
      The :class:`FittedModel` of its best checkpoint.

    Raises:
      FileNotFoundError: no ``config.json``, no finished checkpoint or no
        ``item_ids.npy``.
      ValueError: an unreadable ``config.json``, or an item table another run wrote.
      jax_vaecf.evaluation.metrics.NonFiniteModelError: the best checkpoint is not finite.
    """
    workdir = os.fspath(workdir)
    model = cls(run_folder.run_config(workdir), workdir)
    _ = model.recommender  # a folder without a finished checkpoint fails here
    return model

  # ------------------------------------------------------------------ what it holds

  @property
  def recommender(self) -> recommend_lib.Recommender:
    """The :class:`jax_vaecf.serving.recommender.Recommender` of the best checkpoint."""
    if self._recommender is None:
      self._recommender = recommend_lib.Recommender.from_workdir(self.workdir)
    return self._recommender

  @property
  def item_ids(self) -> np.ndarray:
    """``(n_items,)`` raw id of each item column (the order of :meth:`score`)."""
    return self.recommender.item_ids

  @property
  def split(self) -> data_lib.Split:
    """The data the run was trained and tested on (read again for a loaded run)."""
    if self._split is None:
      self._split = update_lib.run_split(self.config, self.workdir)
    return self._split

  @property
  def history(self) -> list[dict]:
    """One record per epoch (a closed-form fit: one), as logged: loss, KL weight,
    validation metrics, timings. ``pandas.DataFrame(model.history)`` takes it."""
    return [r for r in run_folder.MetricsLog(self.workdir).records()
            if r.get("split") == "train"]

  # ------------------------------------------------------------------ answers

  def _user_columns(self, users: Iterable[Any]) -> list[np.ndarray]:
    """Each known user's item columns: a training user's row, a held-out user's
    fold-in and held-out items together."""
    if self._rows is None:
      # A user may be in several parts (the per-user protocol: training row, validation
      # and test items of the same user): their items together are what the user has.
      split = self.split
      rows: dict[str, list[np.ndarray]] = {}
      parts = [(split.train, split.train_user_ids)]
      parts += [(m, part.user_ids) for part in (split.validation, split.test)
                if part is not None for m in (part.fold_in, part.heldout)]
      for matrix, ids in parts:
        if ids is None:
          continue
        matrix = sp.csr_matrix(matrix)
        for r, uid in enumerate(np.asarray(ids).tolist()):
          rows.setdefault(str(uid), []).append(
              matrix.indices[matrix.indptr[r]:matrix.indptr[r + 1]])
      self._rows = rows
    out, unknown = [], []
    for u in users:
      found = self._rows.get(str(u))
      if found is None:
        unknown.append(u)
        continue
      out.append(np.unique(np.concatenate(found)).astype(np.int64))
    if unknown:
      raise ValueError(f"users {unknown[:5]!r}{' ...' if len(unknown) > 5 else ''} are "
                       "not in the data: give their items (items=[[...]])")
    return out

  def _columns(self, users, items) -> tuple[list[np.ndarray], list[list[Any]]]:
    users, items = inputs.users_or_items(users, items)
    if users is not None:
      cols = self._user_columns(users)
      return cols, [[] for _ in cols]
    pairs = [self.recommender.columns_of(history) for history in items]
    return [np.asarray(c, np.int64) for c, _ in pairs], [u for _, u in pairs]

  def recommend(self, users: Sequence[Any] | None = None, k: int = 10, *,
                items: Sequence[Sequence[Any]] | None = None) -> Recommendations:
    """Top-``k`` raw item ids (best first) with their scores, never an item the user has.

    Give exactly one of ``users`` and ``items``.

    Args:
      users: raw ids (int or str) of users in the data; their known items (training
        row, or fold-in and held-out items) are folded in.
      k: items per user, in ``[1, n_items]``.
      items: new users, each a list of raw item ids (int or str); unknown ids are
        skipped and reported.

    Returns:
      :class:`jax_vaecf.serving.recommender.Recommendations`: per user, ``items[u]`` raw ids
      ``(n_u,)`` (the item table's dtype) and ``scores[u]`` float32 ``(n_u,)``, best
      first, ``n_u = k`` unless fewer items are left; ``unknown[u]`` the skipped ids.

    Raises:
      TypeError: an id that is not an int or str, a text for a list, ``k`` not an int.
      ValueError: both or neither of ``users`` / ``items``, a user not in the data,
        ``k`` out of range.
      jax_vaecf.evaluation.metrics.NonFiniteModelError: the model scores a user NaN / inf.
    """
    k = inputs.k_value(k, self.recommender.model.n_items)
    cols, unknown = self._columns(users, items)
    scores, top = self.recommender.recommend_columns(cols, k)
    keep = top >= 0
    ids = self.item_ids
    return Recommendations(items=[ids[t[m]] for t, m in zip(top, keep)],
                           scores=[s[m] for s, m in zip(scores, keep)], unknown=unknown)

  def score(self, users: Sequence[Any] | None = None, *,
            items: Sequence[Sequence[Any]] | None = None) -> np.ndarray:
    """The model's score (logit) of every item, the user's own items included.

    Args:
      users: raw ids of users in the data (as :meth:`recommend`).
      items: new users, each a list of raw item ids (unknown ids are skipped).

    Returns:
      float32 ``(n_users, n_items)``, one row per user in the order given, columns in
      :attr:`item_ids` order.

    Raises:
      TypeError: an id that is not an int or str, a text for a list.
      ValueError: both or neither of ``users`` / ``items``, a user not in the data.
    """
    cols, _ = self._columns(users, items)
    rec = self.recommender
    x = np.zeros((len(cols), rec.model.n_items), np.float32)
    for r, c in enumerate(cols):
      x[r, c] = 1.0
    if "score" not in self._jitted:
      self._jitted["score"] = jax.jit(lambda p, x: rec.model.apply({"params": p}, x).logits)
    scores = self._jitted["score"](rec.params, x)  # host rows -> device
    return np.asarray(jax.device_get(scores))  # device -> host

  def evaluate(self, on: str | data_lib.EvalSplit = "test",
               ks: Sequence[int] = (20, 50, 100)) -> dict:
    """The project's metrics (:mod:`jax_vaecf.evaluation.metrics`) of the best checkpoint.

    Args:
      on: ``"test"``, ``"validation"`` or a :class:`jax_vaecf.data.EvalSplit` over the
        model's items (fold-in rows scored, held-out items ranked, fold-in items
        excluded).
      ks: cut-offs, each an int in ``[1, n_items]``.

    Returns:
      ``{"ndcg@k": float, "ndcg@k_se": float, "recall@k": ..., "n_users": int,
      "n_excluded": int}``: for every metric and ``k``, the mean and standard error over
      users with held-out items; ``n_excluded`` users had none.

    Raises:
      TypeError: ``on`` of another kind, ``ks`` not a list of ints.
      ValueError: an unknown part name, a part the data lacks, ``k`` out of range, an
        ``EvalSplit`` of another width or with entries other than 1.
      jax_vaecf.evaluation.metrics.NonFiniteModelError: the model scores a user NaN / inf.
    """
    part = on
    if isinstance(on, str):
      if on not in ("test", "validation"):
        raise ValueError(f"on={on!r}: expected 'test', 'validation' or an EvalSplit")
      part = getattr(self.split, on)
      if part is None:
        raise ValueError(f"the data has no {on} users")
    rec = self.recommender
    ks = inputs.k_values(ks, rec.model.n_items)
    if not isinstance(on, str):
      part = inputs.eval_split(on, rec.model.n_items, "on")
    key = ("evaluate", ks)
    if key not in self._jitted:
      self._jitted[key] = jax.jit(train_lib.make_eval_step(
          rec.model, ks, input_format=self.config.input_format,
          output_chunk_size=self.config.output_chunk_size))
    step = self._jitted[key]
    acc = metrics_lib.MetricAccumulator()
    for batch in data_lib.eval_batches(part, self.config.batch_size_validation):
      acc.add(jax.device_get(step(rec.params, batch)))
    return acc.result()

  # ------------------------------------------------------------------ new data

  def update(self, data: Any, *, out: str | os.PathLike | None = None,
             steps: int | None = None, replay: float = 1.0,
             user_ids: Sequence | None = None, item_ids: Sequence | None = None
             ) -> "FittedModel":
    """The model with new interactions, without a full retrain, as a NEW run folder
    (this one is only read): EASE changed exactly (a low-rank update, or a refit with
    the same ``l2`` when that is cheaper), EDLAE refitted with its chosen settings, a
    VAE trained on from its best checkpoint (weights and Adam state) on the changed
    users and ``replay`` times as many others (:mod:`jax_vaecf.training.update`).

    Args:
      data: the interactions to add, as :func:`fit` takes them (a scipy matrix with
        ``user_ids`` / ``item_ids``, or raw-id columns ``(users, items[, ratings])``):
        known users' new items, new users, and (EASE, EDLAE) new items.
      out: the new run folder (new or empty); ``None``: ``<workdir>-update-<N>`` beside
        this one (a temporary folder when this model's is).
      steps: a VAE's training steps (``None``: one pass over the rows it trains on).
      replay: a VAE's unchanged users drawn per changed user.
      user_ids, item_ids: a matrix's raw row and column ids.

    Returns:
      The new :class:`FittedModel` (``results["train"]["how"]``: ``"update"``,
      ``"refit"`` or ``"continued"``; ``results["test"]``: its test metrics).

    Raises:
      TypeError: ``data`` of another kind.
      ValueError: before any work: nothing new, new items for a VAE, ``out`` not a new
        or empty folder, a bad ``steps`` or ``replay``.
    """
    inter = interactions_of(data, user_ids=user_ids, item_ids=item_ids)
    users, items = update_lib.positives(inter, self.config)
    temporary = out is None and self._temporary_root is not None
    folder = (tempfile.mkdtemp(prefix="jax_vaecf_") if temporary
              else update_lib.next_version(self.workdir) if out is None else os.fspath(out))
    try:
      cfg, split, results = update_lib.update_run(
          self.config, self.workdir, users, items, folder, n_steps=steps, replay=replay,
          split=self.split)
    except BaseException:
      if temporary:
        shutil.rmtree(folder, ignore_errors=True)
      raise
    model = FittedModel(cfg, folder, split=split, results=results)
    if temporary:
      model._owns = weakref.finalize(model, shutil.rmtree, folder, True)
      model._temporary_root = folder
    return model

  # ------------------------------------------------------------------ files

  def save(self, path: str | os.PathLike) -> str:
    """Copies the run folder to ``path``, where every CLI tool (``recommend --workdir``,
    ``export``, ``train`` to resume, ``compare``) reads it; the model then answers from
    there (a temporary folder of :func:`fit` is removed).

    Args:
      path: a new or empty folder, outside the model's run folder.

    Returns:
      ``path`` as a str.

    Raises:
      TypeError: ``path`` is not a str or ``os.PathLike``.
      ValueError: ``path`` is inside the run folder, or exists and is not an empty folder.
    """
    if self._temporary_root is None and isinstance(path, (str, os.PathLike)) and \
        os.path.abspath(os.fspath(path)) == os.path.abspath(self.workdir):
      return os.fspath(path)  # already kept there
    path = inputs.save_path(path, [f for f in (self.workdir, self._temporary_root) if f])
    if os.path.isdir(path):
      os.rmdir(path)
    shutil.copytree(self.workdir, path,
                    ignore=shutil.ignore_patterns(run_folder.LOCK_NAME))
    if self._owns is not None:  # the temporary folder goes now; the copy stays
      self._owns()
      self._owns = None
      self._temporary_root = None
    self.workdir = path
    self._recommender = None
    self._jitted = {}
    return path

  def export(self, out_dir: str | os.PathLike, k: int = 100, *,
             platforms: Sequence[str] = ("cpu",)) -> dict:
    """Writes the scorer artefact (``docs/serving.md``) of the best checkpoint, as
    ``python -m experiments.export`` does (:func:`jax_vaecf.serving.export.export_run`).

    Args:
      out_dir: a new or empty folder.
      k: recommendations per user the artefact returns, in ``[1, n_items]``.
      platforms: backends to lower for, some of ``("cpu", "cuda", "rocm", "tpu")``.

    Returns:
      The artefact's manifest (the dict written as ``manifest.json``).

    Raises:
      TypeError: ``k`` not an int, ``platforms`` not a list.
      ValueError: ``k`` out of range, an unknown platform, ``out_dir`` not empty.
    """
    k = inputs.k_value(k, self.recommender.model.n_items)
    platforms = inputs.platforms(platforms)
    return export_lib.export_run(self.workdir, out_dir, k, platforms=platforms,
                                 recommender=self.recommender)

  def __repr__(self) -> str:
    test = self.results.get("test", {})
    extra = f", test ndcg@100 {test['ndcg@100']:.4f}" if "ndcg@100" in test else ""
    return f"FittedModel({self.config.model}, {self.workdir!r}{extra})"
