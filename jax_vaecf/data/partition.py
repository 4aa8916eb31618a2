"""Per-process data for multi-host runs: a split written once as ``P`` parts, each
process reading only its own, memory-mapped (``python -m experiments.partition``).

Layout of a folder written by :func:`write_partitions` for ``P`` processes::

  manifest.json                 format, P, n_items, protocol, users and nnz of every part,
                                the data settings it was made with, sha256 of every file
  item_ids.npy                  (n_items,) raw id of each column
  <m>_row_nnz.npy               int32 (n_users,): every part's row lengths of matrix <m>,
                                part after part (each process needs all of them to agree
                                on the nnz of every batch)
  part-00000-of-0000P/          block p (distributed.process_slice) of each user set:
    <m>_indptr.npy              int64 (users_p + 1,)
    <m>_indices.npy             int32 (nnz_p,)
    <m>_data.npy                float32 (nnz_p,)
    <s>_user_ids.npy            (users_p,) raw user ids of user set <s>

with matrices ``<m>`` in ``train``, ``validation_fold_in``, ``validation_heldout``,
``test_fold_in``, ``test_heldout`` (no validation ones when the split has none) and user
sets ``<s>`` in ``train``, ``validation``, ``test``. Part ``p`` holds block ``p`` of the
training users, of the validation users and of the test users, so a process holds about
``1 / P`` of the data. :func:`open_part` checks the manifest and the part's checksums and
returns a :class:`PartSplit`; its batches (:class:`~jax_vaecf.data.batcher.BlockBatcher`,
:func:`~jax_vaecf.data.batcher.block_eval_batches`) compose into the same global batches
as one process holding every block.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from typing import Any, Iterator, Mapping

import numpy as np
import scipy.sparse as sp

from jax_vaecf.core import distributed
from jax_vaecf.core import files as files_lib
from jax_vaecf.data import batcher as batcher_lib
from jax_vaecf.data import split as split_lib
from jax_vaecf.core.sparse import EvalBatch

FORMAT = 1
MANIFEST = "manifest.json"
ITEM_IDS = "item_ids.npy"
_ARRAYS = (("indptr", np.int64), ("indices", np.int32), ("data", np.float32))


def part_name(index: int, count: int) -> str:
  """The folder of part ``index`` of ``count``: ``part-00000-of-00004``."""
  return f"part-{index:05d}-of-{count:05d}"


@dataclasses.dataclass(frozen=True)
class PartEvalSplit(split_lib.EvalSplit):
  """Block ``block`` of ``blocks`` of an :class:`~jax_vaecf.data.split.EvalSplit`: its
  rows only (``fold_in``, ``heldout``, ``user_ids``), plus every block's row lengths
  (int ``(n_users,)`` each) so every process builds batches of the same shapes."""

  blocks: int = 1
  block: int = 0
  fold_in_row_nnz: np.ndarray | None = None
  heldout_row_nnz: np.ndarray | None = None

  def batches(self, batch_size: int, num_shards: int | None = None
              ) -> Iterator[EvalBatch]:
    """This process's shards of each global evaluation batch (block order)."""
    return batcher_lib.block_eval_batches(
        self.fold_in, self.heldout, batch_size, fold_in_row_nnz=self.fold_in_row_nnz,
        heldout_row_nnz=self.heldout_row_nnz, blocks=self.blocks, block=self.block,
        num_shards=num_shards)


@dataclasses.dataclass(frozen=True)
class PartSplit(split_lib.Split):
  """One process's part of a partitioned split: ``train`` (CSR over memory-mapped arrays)
  and ``train_user_ids`` hold block ``block`` of ``blocks``'s training users,
  ``validation`` / ``test`` are :class:`PartEvalSplit`\\ s; ``train_row_nnz`` (int32
  ``(n_train_users,)``) has every block's row lengths; ``folder`` is where it was read."""

  blocks: int = 1
  block: int = 0
  train_row_nnz: np.ndarray | None = None
  folder: str = ""

  @property
  def n_train_users(self) -> int:
    return int(self.train_row_nnz.size)

  def train_batcher(self, batch_size: int, seed: int, num_shards: int | None = None
                    ) -> batcher_lib.BlockBatcher:
    """The :class:`~jax_vaecf.data.batcher.BlockBatcher` of this part (its shards only)."""
    return batcher_lib.BlockBatcher(self.train, batch_size, seed, row_nnz=self.train_row_nnz,
                                    blocks=self.blocks, block=self.block,
                                    num_shards=num_shards)


def _matrices(split: split_lib.Split) -> dict[str, sp.csr_matrix]:
  out = {"train": split.train}
  for name, ev in (("validation", split.validation), ("test", split.test)):
    if ev is not None:
      out[f"{name}_fold_in"], out[f"{name}_heldout"] = ev.fold_in, ev.heldout
  return out


def _user_sets(split: split_lib.Split) -> dict[str, np.ndarray]:
  out = {"train": split.train_user_ids}
  for name, ev in (("validation", split.validation), ("test", split.test)):
    if ev is not None:
      out[name] = ev.user_ids
  return out


def _save(path: str, array: np.ndarray) -> None:
  with files_lib.atomic_write(path, "wb") as f:
    np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def _write_part(staging: str, p: int, processes: int, matrices: Mapping[str, Any],
                user_sets: Mapping[str, Any], users: dict, nnz: dict,
                names: list[str]) -> None:
  """Writes part ``p``'s user ids and matrix rows under ``staging``, appending each
  file's name to ``names`` and the part's user and non-zero counts to ``users`` and
  ``nnz``."""
  folder = part_name(p, processes)
  os.mkdir(os.path.join(staging, folder), 0o777)
  for s_name, ids in user_sets.items():
    sl = distributed.process_slice(len(ids), p, processes)
    users[s_name].append(sl.stop - sl.start)
    names.append(f"{folder}/{s_name}_user_ids.npy")
    _save(os.path.join(staging, names[-1]), np.asarray(ids)[sl])
  for m_name, m in matrices.items():
    sl = distributed.process_slice(m.shape[0], p, processes)
    lo, hi = int(m.indptr[sl.start]), int(m.indptr[sl.stop])
    parts = {"indptr": m.indptr[sl.start:sl.stop + 1].astype(np.int64) - lo,
             "indices": m.indices[lo:hi], "data": m.data[lo:hi]}
    nnz[m_name].append(hi - lo)
    for key, dtype in _ARRAYS:
      names.append(f"{folder}/{m_name}_{key}.npy")
      _save(os.path.join(staging, names[-1]), parts[key].astype(dtype, copy=False))


def write_partitions(split: split_lib.Split, out: str | os.PathLike, processes: int, *,
                     settings: Mapping[str, Any],
                     info: Mapping[str, Any] | None = None) -> dict:
  """Writes ``split`` as ``processes`` parts into the new folder ``out`` (see the module
  docstring) and returns the manifest.

  Args:
    split: the whole split, as training reads it (validation hold-out already applied).
    out: must not exist; the folder is assembled beside it and renamed into place, so a
      failure leaves nothing.
    processes: ``P >= 1``.
    settings: the JSON data settings the split was made with; :func:`open_part` refuses
      a run whose settings differ.
    info: other JSON facts to record (e.g. where the raw files were); not compared.
  """
  out = os.path.abspath(os.fspath(out))
  if os.path.lexists(out):
    raise ValueError(f"{out}: already exists; choose a new --out (a partitioned folder is "
                     "written once, never updated)")
  if processes < 1:
    raise ValueError(f"processes must be >= 1, got {processes}")
  if np.asarray(split.item_ids).shape != (split.n_items,):
    raise ValueError(f"item_ids: expected shape ({split.n_items},), got "
                     f"{np.asarray(split.item_ids).shape}")
  matrices, user_sets = _matrices(split), _user_sets(split)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  # os.mkdir applies the umask, as the rename keeps the folder's mode (mkdtemp: 0700).
  staging = os.path.join(parent, f".{os.path.basename(out)}.{secrets.token_hex(4)}.tmp")
  os.mkdir(staging, 0o777)
  try:
    names = [ITEM_IDS]
    _save(os.path.join(staging, ITEM_IDS), np.asarray(split.item_ids))
    for m_name, m in matrices.items():
      names.append(f"{m_name}_row_nnz.npy")
      _save(os.path.join(staging, names[-1]), np.diff(m.indptr).astype(np.int32))
    users = {s: [] for s in user_sets}
    nnz = {m: [] for m in matrices}
    for p in range(processes):
      _write_part(staging, p, processes, matrices, user_sets, users, nnz, names)
    manifest = {
        "format": FORMAT, "processes": int(processes), "n_items": int(split.n_items),
        "protocol": split.protocol, "collapsed_duplicates": int(split.collapsed_duplicates),
        "matrices": list(matrices), "users": users, "nnz": nnz,
        "nnz_per_part": [sum(n[p] for n in nnz.values()) for p in range(processes)],
        "settings": dict(settings), "info": dict(info or {}),
        "files": {n: {"sha256": files_lib.sha256_of(os.path.join(staging, n)),
                      "bytes": os.path.getsize(os.path.join(staging, n))} for n in names},
    }
    files_lib.write_text_atomic(os.path.join(staging, MANIFEST),
                                json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return manifest


def read_manifest(folder: str | os.PathLike) -> dict:
  """``folder``'s manifest; ``FileNotFoundError`` / ``ValueError`` naming what is wrong."""
  path = os.path.join(os.fspath(folder), MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing; is {folder} a folder written by "
                            "python -m experiments.partition?")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable ({e})") from None
  found = manifest.get("format") if isinstance(manifest, dict) else None
  if found != FORMAT:
    raise ValueError(f"{path}: format {found!r}; this version reads format {FORMAT}")
  return manifest


def setting_differences(recorded: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
  """``name: X in the folder, Y in this run`` for every setting that differs."""
  show = lambda d, k: repr(d[k]) if k in d else "absent"
  return [f"{k}: {show(recorded, k)} in the folder, {show(given, k)} in this run"
          for k in sorted(set(recorded) | set(given))
          if k not in recorded or k not in given or recorded[k] != given[k]]


def _check_part_files(folder: str, manifest: Mapping[str, Any], part: str,
                      verify: bool) -> None:
  """Every shared file and every file of ``part`` is present and, with ``verify``, has
  the sha256 the manifest records."""
  shared = [n for n in manifest["files"] if "/" not in n]
  mine = [n for n in manifest["files"] if n.startswith(part + "/")]
  for name in shared + mine:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: missing from the partitioned folder")
    if verify and files_lib.sha256_of(path) != manifest["files"][name]["sha256"]:
      raise ValueError(f"{path}: its sha256 differs from {MANIFEST}'s (damaged or altered); "
                       "write the folder again with python -m experiments.partition")


def open_part(folder: str | os.PathLike, process_index: int, process_count: int, *,
              settings: Mapping[str, Any] | None = None, verify: bool = True) -> PartSplit:
  """Part ``process_index`` of the partitioned folder, its arrays memory-mapped.

  Args:
    folder: written by :func:`write_partitions`.
    process_index, process_count: this process and the run's process count, which must
      be the folder's ``P``.
    settings: the run's data settings; with them, any difference from the folder's is
      refused (listing every one).
    verify: check the sha256 of the shared files and of this part's files.

  Returns:
    A :class:`PartSplit`. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` for a damaged one, another process count or other settings, each
    naming the folder or file.
  """
  folder = os.fspath(folder)
  manifest = read_manifest(folder)
  p_count = manifest["processes"]
  if p_count != process_count:
    raise ValueError(f"{folder}: written for {p_count} processes, this run has "
                     f"{process_count}; write it again with python -m experiments.partition "
                     f"--processes={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if settings is not None:
    diff = setting_differences(manifest["settings"], settings)
    if diff:
      raise ValueError(f"{folder}: made with other data settings than this run's: "
                       + "; ".join(diff))
  part = part_name(process_index, process_count)
  _check_part_files(folder, manifest, part, verify)
  load = lambda name: np.load(os.path.join(folder, name), mmap_mode="r", allow_pickle=False)
  n_items = int(manifest["n_items"])

  def matrix(name: str) -> sp.csr_matrix:
    # Assigned, not passed to the constructor, which may copy the index arrays.
    arrays = {key: load(f"{part}/{name}_{key}.npy") for key, _ in _ARRAYS}
    m = sp.csr_matrix((arrays["indptr"].size - 1, n_items), dtype=np.float32)
    m.indptr, m.indices, m.data = arrays["indptr"], arrays["indices"], arrays["data"]
    return m

  def eval_split(name: str) -> PartEvalSplit | None:
    if f"{name}_fold_in" not in manifest["matrices"]:
      return None
    return PartEvalSplit(matrix(f"{name}_fold_in"), matrix(f"{name}_heldout"),
                         load(f"{part}/{name}_user_ids.npy"), blocks=process_count,
                         block=process_index,
                         fold_in_row_nnz=load(f"{name}_fold_in_row_nnz.npy"),
                         heldout_row_nnz=load(f"{name}_heldout_row_nnz.npy"))

  return PartSplit(train=matrix("train"), validation=eval_split("validation"),
                   test=eval_split("test"), item_ids=np.load(os.path.join(folder, ITEM_IDS)),
                   train_user_ids=load(f"{part}/train_user_ids.npy"),
                   protocol=manifest["protocol"],
                   collapsed_duplicates=int(manifest["collapsed_duplicates"]),
                   blocks=process_count, block=process_index,
                   train_row_nnz=load("train_row_nnz.npy"), folder=folder)
