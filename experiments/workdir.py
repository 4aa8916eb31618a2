"""A run's folder: its settings, item ids, metrics log and checkpoint identity.

``<workdir>/config.json`` holds the settings a run trains with (a resumed run may change
only ``configs.RESUMABLE_FIELDS``, and each change is logged), ``item_ids.npy`` the raw
id of each item column, ``metrics.jsonl`` one JSON line per epoch (and per test, per
settings change, per divergence). :func:`identity` is what a checkpoint must match to be
resumed, tested or served. Every file is written atomically with the user's normal
permissions (:mod:`jax_vaecf.files`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from experiments import configs
from jax_vaecf import checkpoint as checkpoint_lib
from jax_vaecf import data as data_lib
from jax_vaecf import files as files_lib
from jax_vaecf import run_folder


def identity(cfg: configs.Config, split: data_lib.Split) -> dict:
  """What a checkpoint must match to be resumed or tested: model shape and data."""
  ids = np.ascontiguousarray(split.item_ids)
  return {
      "model": cfg.model,
      "n_items": int(split.n_items),
      "hidden_dims": [int(h) for h in configs.hidden_dims_of(cfg)],
      "latent_dim": int(cfg.latent_dim),
      "dataset": cfg.dataset,
      "protocol": split.protocol,
      "n_train_users": int(split.n_train_users),
      "items_digest": run_folder.items_digest(ids),
    # The checkpointed state has ema_params exactly when the run keeps an average; the
    # key is left out otherwise, so workdirs written before averaging existed still match.
  } | ({"weight_average": True} if cfg.ema_decay > 0 else {})



class MetricsLog:
  """``<workdir>/metrics.jsonl``: one JSON object per line, appended per epoch."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")

  def records(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    out = []
    with open(self.path) as f:
      for line in f:
        line = line.strip()
        if line:
          try:
            out.append(json.loads(line))
          except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is replayed anyway
    return out

  def truncate_after(self, epoch: int) -> None:
    """Keeps the training records up to ``epoch`` (a resumed run replays the rest)."""
    keep = [r for r in self.records()
            if r.get("split") in ("train", "config") and r["epoch"] <= epoch]
    files_lib.write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))

  def checkpointed_epochs(self) -> list[int]:
    """Epochs whose record says a resumable checkpoint was saved (records written
    before that was recorded count as saved: the cautious reading)."""
    return [int(r["epoch"]) for r in self.records()
            if r.get("split") == "train" and r.get("checkpointed", True)]

  def write(self, record: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())



def prepare_workdir(cfg: configs.Config, workdir: str, *, lock: bool = True
                    ) -> run_folder.RunLock | None:
  """Checks, before any data work, that ``workdir`` can hold this run, and claims it.

  It must be a folder (created if missing) that can be written when the run trains or
  tests. Such a run takes the folder's lock (:class:`jax_vaecf.run_folder.RunLock`,
  returned; the caller releases it when the run ends): another process writing there
  raises :class:`jax_vaecf.run_folder.RunFolderBusyError` naming its pid. ``lock=False``
  (the processes of a multi-process run other than the one that writes) checks without
  claiming. On an error a folder created here is removed again. Then
  :func:`check_same_run`, once the settings are final.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir}: this is a file, expected a folder for the run")
  if not (cfg.train or cfg.test):
    return None  # benchmark only: nothing is written
  held = run_folder.RunLock(workdir)
  try:
    if lock:
      held.acquire()
    else:
      os.makedirs(workdir, exist_ok=True)
    with files_lib.atomic_write(os.path.join(workdir, ".write-test"), "wb"):
      pass
    os.remove(os.path.join(workdir, ".write-test"))
  except OSError as e:
    held.release(remove_if_unused=True)
    raise ValueError(
        f"--workdir={workdir}: cannot write there ({e.strerror or e})") from None
  return held if lock else None


def check_same_run(cfg: configs.Config, workdir: str) -> None:
  """When ``workdir`` already holds a run that ``cfg`` would train on, the settings that
  shape what is trained must be those in its ``config.json`` (``configs.RESUMABLE_FIELDS``
  may change); otherwise ``ValueError`` lists the differences, so a record of a run
  never describes settings its checkpoints were not trained with."""
  if cfg.train and holds_a_run(workdir):
    changed = config_changes(_saved_config(workdir), cfg)
    fixed = {k: v for k, v in changed.items() if k not in configs.RESUMABLE_FIELDS}
    if fixed:
      lines = "; ".join(f"--{k}: the run has {a!r}, this command asks {b!r}"
                        for k, (a, b) in sorted(fixed.items()))
      raise ValueError(
          f"{workdir} holds a run trained with other settings ({lines}). Resuming would "
          "mix them; use another --workdir, or the run's own settings")


def holds_a_run(workdir: str) -> bool:
  ck_root = os.path.join(workdir, "checkpoints")
  has_steps = any(os.listdir(os.path.join(ck_root, kind))
                  for kind in (checkpoint_lib.LATEST, checkpoint_lib.BEST)
                  if os.path.isdir(os.path.join(ck_root, kind)))
  return has_steps or bool(MetricsLog(workdir).checkpointed_epochs())


def read_run_config(workdir: str) -> dict:
  """The settings a run recorded in ``<workdir>/config.json``, as the JSON object.

  Raises FileNotFoundError when there is none, ValueError when it cannot be read.
  """
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      saved = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: not found") from None
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable ({e})") from None
  if not isinstance(saved, dict):
    raise ValueError(f"{path}: expected a JSON object of settings")
  return saved


def _saved_config(workdir: str) -> dict:
  try:
    return read_run_config(workdir)
  except FileNotFoundError as e:
    raise ValueError(f"{e}, but the workdir holds checkpoints; cannot tell what they "
                     "were trained with. Use another --workdir") from None


def config_changes(saved: dict, cfg: configs.Config) -> dict:
  """``{field: (saved value, new value)}`` for each setting that differs (a field the
  saved config lacks counts as its default)."""
  now = configs.to_json(cfg)
  default = configs.to_json(configs.Config())
  return {k: (saved.get(k, default[k]), v) for k, v in now.items()
          if saved.get(k, default[k]) != v}



def write_run_files(cfg: configs.Config, workdir: str, split: data_lib.Split,
                     start_epoch: int) -> None:
  """The config and raw item ids, so that a workdir alone is enough to serve.

  A run resumed after ``start_epoch`` may have changed only ``configs.RESUMABLE_FIELDS``
  (checked by :func:`prepare_workdir`); such changes are logged in ``metrics.jsonl`` as
  a ``{"split": "config"}`` record before ``config.json`` takes the new values.
  """
  path = os.path.join(workdir, "config.json")
  if start_epoch and os.path.exists(path):
    changed = config_changes(_saved_config(workdir), cfg)
    if changed:
      MetricsLog(workdir).write({
          "split": "config", "epoch": start_epoch,
          "changes": {k: {"from": a, "to": b} for k, (a, b) in sorted(changed.items())}})
  files_lib.write_text_atomic(path, json.dumps(configs.to_json(cfg), indent=1))
  with files_lib.atomic_write(os.path.join(workdir, "item_ids.npy"), "wb") as f:
    np.save(f, np.asarray(split.item_ids), allow_pickle=False)
