"""On-disk cache of processed splits: one compressed npz of CSR arrays per key.

The key hashes the processing options (as sorted JSON) and the identity of every input
file (absolute path, size, mtime and the sha256 of its first MiB), so other options or
a changed input give another file. Files are written with :mod:`jax_vaecf.core.files`
(temporary file, fsync, rename), so a crash never leaves a half-written cache under the
real name; temporary files left by killed writers are removed once they are an hour
old (see :func:`jax_vaecf.core.files.remove_stale_temps`). On load the stored key, format
version, every array shape and every scalar field of the split are checked; a file
that fails (truncated, corrupt, foreign, written before a field existed) is reported
with a warning and rebuilt. A cache folder that cannot be written (read-only, full, not
a folder) is reported with a warning and the split is used uncached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from jax_vaecf.core import files
from jax_vaecf.data.split import EvalSplit, Split

# Bump when a stored array changes meaning. A new scalar field of Split needs no bump:
# it goes into "meta", and a file without it is rebuilt in place. 2: ids keep bytes
# that are not UTF-8 (version 1 merged them into U+FFFD) and repeated (user, item)
# rows collapse before the rating threshold.
FORMAT_VERSION = 2
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


# Fields stored as arrays; any other init field of Split / EvalSplit must be a scalar
# (None, bool, int, float, str) and is stored in the JSON member "meta".
_SPLIT_ARRAYS = ("train", "validation", "test", "item_ids", "train_user_ids", "protocol")
_EVAL_ARRAYS = ("fold_in", "heldout", "user_ids")


def _extra_fields(cls, known: Sequence[str]) -> list[str]:
  return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in known]


def _scalar(value, where: str):
  if isinstance(value, np.generic):
    value = value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"save_split: {where} is a {type(value).__name__}; the cache stores "
                  "only scalar extra fields (None, bool, int, float, str)")


def save_split(path: str | os.PathLike, split: Split, key: str) -> None:
  """Writes ``split`` atomically to ``path`` (npz, no pickled objects).

  Raises OSError when the file cannot be written (nothing is left behind then), and
  TypeError for a Split field the format cannot store.
  """
  path = os.fspath(path)
  arrays = {"key": np.array(key), "version": np.array(FORMAT_VERSION),
            "protocol": np.array(split.protocol), "item_ids": _ids(split.item_ids),
            "train_user_ids": _ids(split.train_user_ids)}
  meta = {"split": {n: _scalar(getattr(split, n), f"Split.{n}")
                    for n in _extra_fields(Split, _SPLIT_ARRAYS)}}
  _put_csr(arrays, "train", split.train)
  for name, ev in (("validation", split.validation), ("test", split.test)):
    if ev is None:
      continue
    _put_csr(arrays, f"{name}.fold_in", ev.fold_in)
    _put_csr(arrays, f"{name}.heldout", ev.heldout)
    arrays[f"{name}.user_ids"] = _ids(ev.user_ids)
    meta[name] = {n: _scalar(getattr(ev, n), f"Split.{name}.{n}")
                  for n in _extra_fields(EvalSplit, _EVAL_ARRAYS)}
  arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.atomic_write(path, "wb") as f:
    np.savez_compressed(f, **arrays)


def _stored_extras(meta: dict, part: str, names: Sequence[str]) -> dict:
  stored = meta.get(part, {})
  missing = [n for n in names if n not in stored]
  if missing:
    # Written before the field existed: its value is unknown, so rebuild.
    raise ValueError(f"no stored {part} field {', '.join(missing)}")
  return {n: stored[n] for n in names}


def load_split(path: str | os.PathLike, key: str) -> Split:
  """Reads a split saved by :func:`save_split`; ValueError unless it is intact and was
  stored under ``key``.

  Any failure while decoding (a corrupt deflate stream raises ``zlib.error``, a
  truncated file ``EOFError`` or ``BadZipFile``, ...) becomes that ValueError, so the
  caller can rebuild.
  """
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as z:
      if str(z["key"]) != key or int(z["version"]) != FORMAT_VERSION:
        raise ValueError("stored under another key")
      meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
      if not isinstance(meta, dict):
        raise ValueError("meta is not a JSON object")
      train = _get_csr(z, "train")
      evals = {}
      for name in ("validation", "test"):
        if f"{name}.user_ids" in z.files:
          ev = EvalSplit(fold_in=_get_csr(z, f"{name}.fold_in"),
                         heldout=_get_csr(z, f"{name}.heldout"),
                         user_ids=z[f"{name}.user_ids"],
                         **_stored_extras(meta, name,
                                          _extra_fields(EvalSplit, _EVAL_ARRAYS)))
          if (ev.fold_in.shape != ev.heldout.shape or ev.user_ids.shape
              != (ev.fold_in.shape[0],) or ev.fold_in.shape[1] != train.shape[1]):
            raise ValueError(f"inconsistent shapes in {name}")
          evals[name] = ev
        else:
          evals[name] = None
      split = Split(train=train, validation=evals["validation"], test=evals["test"],
                    item_ids=z["item_ids"], train_user_ids=z["train_user_ids"],
                    protocol=str(z["protocol"]),
                    **_stored_extras(meta, "split", _extra_fields(Split, _SPLIT_ARRAYS)))
  except Exception as e:  # pylint: disable=broad-except
    # Whatever a damaged file makes numpy, zipfile or zlib raise (zlib.error is not an
    # OSError), the cache's promise is to rebuild; the type is kept in the message so
    # a genuine bug still shows in the warning.
    raise ValueError(f"{path}: unusable cache file ({type(e).__name__}: {e})") from None
  if (split.test is None or split.item_ids.shape != (train.shape[1],)
      or split.train_user_ids.shape != (train.shape[0],)):
    raise ValueError(f"{path}: unusable cache file (inconsistent shapes)")
  return split


# Before jax_vaecf.core.files, cache files were written through tempfile.mkstemp as
# "tmp<random>.npz.tmp"; killed writers left those behind too.
def _is_legacy_temp(name: str) -> bool:
  return name.startswith("tmp") and name.endswith(".npz.tmp")


def _remove_stale_temps(folder: str) -> None:
  files.remove_stale_temps(folder)
  try:
    names = [n for n in os.listdir(folder) if _is_legacy_temp(n)]
  except OSError:
    return
  now = time.time()
  for n in names:
    p = os.path.join(folder, n)
    try:
      if now - os.stat(p).st_mtime > files.STALE_AFTER_S:
        os.remove(p)
    except OSError:
      continue


def cached(build: Callable[[], Split], cache_dir: str | os.PathLike | None, name: str,
           options: dict, inputs: Sequence[str | os.PathLike]) -> Split:
  """Returns the cached split for (options, inputs), building and storing it if needed.

  With ``cache_dir=None`` it just calls ``build``. A cache file that cannot be used is
  reported with a RuntimeWarning and replaced. When the cache file cannot be written
  (read-only or full disk, ``cache_dir`` not a folder) the built split is returned with
  a RuntimeWarning naming the file and the reason, and nothing is left behind.
  Temporary files of killed writers (an hour old) are removed from ``cache_dir``.
  """
  if cache_dir is None:
    return build()
  cache_dir = os.fspath(cache_dir)
  key = cache_key(options, inputs)
  path = os.path.join(cache_dir, f"{name}-{key[:20]}.npz")
  _remove_stale_temps(cache_dir)
  if os.path.exists(path):
    try:
      return load_split(path, key)
    except ValueError as e:
      warnings.warn(f"{e}; rebuilding it", RuntimeWarning, stacklevel=2)
  split = build()
  try:
    save_split(path, split, key)
  except OSError as e:
    if isinstance(e, (FileExistsError, NotADirectoryError)):
      reason = f"{e.filename or cache_dir} is not a folder"
    else:
      reason = e.strerror or str(e) or type(e).__name__
    warnings.warn(f"{path}: cannot write the cache file ({reason}); carrying on "
                  "without the cache", RuntimeWarning, stacklevel=2)
  return split
