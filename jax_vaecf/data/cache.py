"""On-disk cache of processed splits: one compressed npz of CSR arrays per key.

The key hashes the processing options (as sorted JSON) and the identity of every input
file (absolute path, size, mtime and the sha256 of its first MiB), so other options or
a changed input give another file. Files are written to a temporary name and renamed
(``os.replace``), so a crash never leaves a half-written cache under the real name. On
load the stored key, format version and every array shape are checked; a file that
fails (truncated, corrupt, foreign) is reported with a warning and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from jax_vaecf.data.split import EvalSplit, Split

FORMAT_VERSION = 1
_HEAD_BYTES = 1 << 20


def file_identity(path: str | os.PathLike) -> dict:
  """Path, size, mtime and the sha256 of the first MiB of a file (or of a folder's
  files, recursively, in sorted order)."""
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    return {"dir": path, "files": [file_identity(f) for f in files]}
  st = os.stat(path)
  with open(path, "rb") as f:
    head = hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()
  return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head": head}


def cache_key(options: dict, inputs: Sequence[str | os.PathLike]) -> str:
  """A hex sha256 of the options and the identity of the input files."""
  blob = json.dumps({"version": FORMAT_VERSION, "options": options,
                     "inputs": [file_identity(p) for p in inputs]},
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()


def _put_csr(arrays: dict, name: str, m: sp.csr_matrix) -> None:
  arrays[f"{name}.indptr"] = m.indptr
  arrays[f"{name}.indices"] = m.indices
  arrays[f"{name}.shape"] = np.array(m.shape, np.int64)


def _get_csr(z, name: str) -> sp.csr_matrix:
  indptr, indices = z[f"{name}.indptr"], z[f"{name}.indices"]
  shape = tuple(int(x) for x in z[f"{name}.shape"])
  if (len(shape) != 2 or indptr.shape != (shape[0] + 1,) or indptr[0] != 0
      or indptr[-1] != indices.size or np.any(np.diff(indptr) < 0)
      or (indices.size and (indices.min() < 0 or indices.max() >= shape[1]))):
    raise ValueError(f"inconsistent CSR arrays for {name}")
  return sp.csr_matrix((np.ones(indices.size, np.float32), indices, indptr), shape=shape)


def _ids(a: np.ndarray) -> np.ndarray:
  a = np.asarray(a)
  return a.astype(str) if a.dtype.kind in "OS" else a


def save_split(path: str | os.PathLike, split: Split, key: str) -> None:
  """Writes ``split`` atomically to ``path`` (npz, no pickled objects)."""
  path = os.fspath(path)
  arrays = {"key": np.array(key), "version": np.array(FORMAT_VERSION),
            "protocol": np.array(split.protocol), "item_ids": _ids(split.item_ids),
            "train_user_ids": _ids(split.train_user_ids)}
  _put_csr(arrays, "train", split.train)
  for name, ev in (("validation", split.validation), ("test", split.test)):
    if ev is None:
      continue
    _put_csr(arrays, f"{name}.fold_in", ev.fold_in)
    _put_csr(arrays, f"{name}.heldout", ev.heldout)
    arrays[f"{name}.user_ids"] = _ids(ev.user_ids)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_split(path: str | os.PathLike, key: str) -> Split:
  """Reads a split saved by :func:`save_split`; ValueError unless it is intact and was
  stored under ``key``."""
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as z:
      if str(z["key"]) != key or int(z["version"]) != FORMAT_VERSION:
        raise ValueError("stored under another key")
      train = _get_csr(z, "train")
      evals = {}
      for name in ("validation", "test"):
        if f"{name}.user_ids" in z.files:
          ev = EvalSplit(fold_in=_get_csr(z, f"{name}.fold_in"),
                         heldout=_get_csr(z, f"{name}.heldout"),
                         user_ids=z[f"{name}.user_ids"])
          if (ev.fold_in.shape != ev.heldout.shape or ev.user_ids.shape
              != (ev.fold_in.shape[0],) or ev.fold_in.shape[1] != train.shape[1]):
            raise ValueError(f"inconsistent shapes in {name}")
          evals[name] = ev
        else:
          evals[name] = None
      split = Split(train=train, validation=evals["validation"], test=evals["test"],
                    item_ids=z["item_ids"], train_user_ids=z["train_user_ids"],
                    protocol=str(z["protocol"]))
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: unusable cache file ({e})") from None
  if (split.test is None or split.item_ids.shape != (train.shape[1],)
      or split.train_user_ids.shape != (train.shape[0],)):
    raise ValueError(f"{path}: unusable cache file (inconsistent shapes)")
  return split


def cached(build: Callable[[], Split], cache_dir: str | os.PathLike | None, name: str,
           options: dict, inputs: Sequence[str | os.PathLike]) -> Split:
  """Returns the cached split for (options, inputs), building and storing it if needed.

  With ``cache_dir=None`` it just calls ``build``. A cache file that cannot be used is
  reported with a warning and replaced.
  """
  if cache_dir is None:
    return build()
  key = cache_key(options, inputs)
  path = os.path.join(os.fspath(cache_dir), f"{name}-{key[:20]}.npz")
  if os.path.exists(path):
    try:
      return load_split(path, key)
    except ValueError as e:
      warnings.warn(f"{e}; rebuilding it", RuntimeWarning, stacklevel=2)
  split = build()
  save_split(path, split, key)
  return split
