"""Loads and runs an exported scorer artefact; needs only numpy and jax.

This file is copied verbatim into every artefact as ``serve.py`` (by
:func:`jax_vaecf.serving.export.write_artifact`), so it must never import the project: it uses
the standard library, numpy and jax (whose serialisation needs the ``flatbuffers``
package). The project's own :class:`jax_vaecf.serving.recommender.Recommender` batches users with
the same :func:`pack`, so a user gets the same arrays, and the same top-k, from both.

Use, from the artefact's folder or with it on ``sys.path``::

  import serve
  scorer = serve.load("path/to/artefact")        # checks every file's sha256 first
  out = scorer.recommend([["1", "50", "260"], ["318"]], k=10)
  out[0]["items"], out[0]["scores"], out[0]["unknown"]

The manifest format is described in the project's ``docs/serving.md``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, Sequence

import numpy as np

FORMAT = "jax_vaecf.scorer/1"
MANIFEST = "manifest.json"
# Users per call are padded up to one of these (then to multiples of the last), and the
# non-zeros to a power of two, so a server compiles a handful of programs.
USER_BUCKETS = (1, 8, 64, 512, 4096)


class ArtifactError(ValueError):
  """An artefact file is missing, altered, or of another format."""


def column_index(item_ids: np.ndarray) -> dict[str, int]:
  """``{text of a raw id: its column}`` over an item table (``item_ids``, any dtype)."""
  return {str(raw): j for j, raw in enumerate(np.asarray(item_ids).tolist())}


def lookup_columns(column: dict[str, int], raw_items: Sequence[Any]) -> np.ndarray:
  """int64 ``(len(raw_items),)``: the column of each raw id in ``column``
  (:func:`column_index`), -1 where it is not there. Ids are compared by their text, so
  ``7`` and ``"7"`` match the int64 item 7 and ``"007"`` matches nothing."""
  return np.fromiter((column.get(str(raw), -1) for raw in raw_items), np.int64,
                     count=len(raw_items))


def columns_of(column: dict[str, int], raw_items: Sequence[Any]
               ) -> tuple[list[int], list[Any]]:
  """One user's raw item ids as (the distinct known columns, sorted; the unknown raw ids,
  in their order), by :func:`lookup_columns`."""
  cols = lookup_columns(column, raw_items)
  unknown = [raw for raw, j in zip(raw_items, cols.tolist()) if j < 0]
  return sorted(set(cols[cols >= 0].tolist())), unknown


def round_up(n: int, buckets: Sequence[int] = USER_BUCKETS) -> int:
  """The smallest bucket >= ``n`` (multiples of the largest bucket beyond it)."""
  for b in buckets:
    if n <= b:
      return b
  return -(-n // buckets[-1]) * buckets[-1]


def pack(columns: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
  """The padded COO arrays of users' item columns, as the scorer takes them.

  Args:
    columns: per user, the int column indices of their items (distinct).

  Returns:
    ``(rows int32 (nnz,), cols int32 (nnz,), vals float32 (nnz,), row_mask float32
    (B,))`` with ``B = round_up(len(columns))`` and ``nnz`` the next power of two of the
    number of entries; padding entries have value 0 and padding rows mask 0.
  """
  n = len(columns)
  lengths = np.array([len(c) for c in columns], np.int64)
  total = int(lengths.sum())
  nnz = 1 << (max(total, 1) - 1).bit_length()
  rows = np.zeros(nnz, np.int32)
  cols = np.zeros(nnz, np.int32)
  vals = np.zeros(nnz, np.float32)
  rows[:total] = np.repeat(np.arange(n, dtype=np.int32), lengths)
  if total:
    cols[:total] = np.concatenate([np.asarray(c, np.int32) for c in columns])
  vals[:total] = 1.0
  mask = (np.arange(round_up(max(n, 1))) < n).astype(np.float32)
  return rows, cols, vals, mask


def sha256_of(path: str) -> str:
  """The sha256 of the file at ``path``: 64 lowercase hex digits (``str``).

  A copy of :func:`jax_vaecf.core.files.sha256_of`, as this file may not import the project;
  tests/test_export.py checks that the two agree.
  """
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 24):
      h.update(block)
  return h.hexdigest()


def read_manifest(folder: str) -> dict:
  """The manifest, after checking that every file it lists has its recorded sha256.

  Raises :class:`ArtifactError` naming the first missing or altered file.
  """
  return read_artifact(folder).manifest


class ArtifactFiles:
  """An artefact's files as read once: ``folder`` (the real folder the path led to when
  it was read), ``manifest`` (dict), ``manifest_sha256`` (the sha256 of the manifest's
  bytes, which name the whole artefact) and ``blobs`` (file name -> the bytes whose
  sha256 was checked)."""

  def __init__(self, folder: str, manifest: dict, manifest_sha256: str,
               blobs: dict[str, bytes]):
    self.folder = folder
    self.manifest = manifest
    self.manifest_sha256 = manifest_sha256
    self.blobs = blobs


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def read_artifact(folder: str) -> ArtifactFiles:
  """Reads the manifest and every file it lists, once each, checking each file's size
  and sha256 on the bytes read: what is checked is what gets loaded.

  The folder's path is resolved once first, so a deploy that swaps a symlink to a new
  artefact while this runs gives the old artefact or the new one, never a mix.
  Raises :class:`ArtifactError` naming the first missing or altered file.
  """
  folder = os.path.realpath(os.fspath(folder))
  path = os.path.join(folder, MANIFEST)
  try:
    raw = _read(path)
    manifest = json.loads(raw.decode("utf-8"))
  except FileNotFoundError:
    raise ArtifactError(f"{path}: not found; {folder} is not a scorer artefact") from None
  except (OSError, ValueError) as e:
    raise ArtifactError(f"{path}: unreadable ({e})") from None
  _check_manifest(manifest, path)
  blobs = {}
  for name, entry in sorted(manifest["files"].items()):
    f = _inside(folder, name, path)
    if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str)):
      raise ArtifactError(f"{path}: the entry of {name!r} in 'files' has no bytes and "
                          "sha256; export the artefact again")
    try:
      blob = _read(f)
    except (FileNotFoundError, IsADirectoryError):
      raise ArtifactError(f"{f}: missing from the artefact") from None
    if len(blob) != entry["bytes"] or hashlib.sha256(blob).hexdigest() != entry["sha256"]:
      raise ArtifactError(f"{f}: checksum mismatch, the file is not the one exported "
                          "(corrupted or replaced); export the artefact again")
    blobs[name] = blob
  return ArtifactFiles(folder, manifest, hashlib.sha256(raw).hexdigest(), blobs)


def _check_manifest(manifest, path: str) -> None:
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    found = manifest.get("format") if isinstance(manifest, dict) else None
    raise ArtifactError(f"{path}: format {found!r}, expected {FORMAT!r}")
  listed = manifest.get("files")
  if not isinstance(listed, dict):
    raise ArtifactError(f"{path}: 'files' must map each file of the artefact to its "
                        f"digest, got {listed!r}; export the artefact again")
  # Every file the loader reads must be listed with its digest: an unlisted one could
  # be replaced without a word.
  for key in READ_FILES:
    name = manifest.get(key)
    if not isinstance(name, str) or name not in listed:
      raise ArtifactError(f"{path}: {key} {name!r} is not in the manifest's list of "
                          "files with their digests; export the artefact again")


# The manifest's keys naming the files load() reads.
READ_FILES = ("program", "params", "item_ids")


def _inside(folder: str, name: str, manifest_path: str) -> str:
  """``folder/name`` when ``name`` is a plain file name of the folder (no folder part,
  no link out of it), else :class:`ArtifactError`."""
  if (not isinstance(name, str) or not name or name in (".", "..")
      or os.path.basename(name) != name or (os.altsep and os.altsep in name)):
    raise ArtifactError(f"{manifest_path}: {name!r} is not a file name inside the "
                        "artefact's folder; export the artefact again")
  f = os.path.join(folder, name)
  if os.path.dirname(os.path.realpath(f)) != os.path.realpath(folder):
    raise ArtifactError(f"{manifest_path}: {name!r} leads out of the artefact's folder "
                        f"(to {os.path.realpath(f)}); export the artefact again")
  return f


def _nested(flat: dict[str, np.ndarray]) -> dict:
  """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


class Scorer:
  """A loaded artefact: top-k unseen items for users given by their item histories."""

  def __init__(self, folder: str, manifest: dict, exported, params: dict,
               item_ids: np.ndarray, manifest_sha256: str | None = None):
    self.folder = folder
    self.manifest = manifest
    self.manifest_sha256 = manifest_sha256
    self.k = int(manifest["k"])
    self.n_items = int(manifest["n_items"])
    self.item_ids = item_ids
    import jax

    # Compiled once per input shape; the weights are copied to the device once, not per
    # call (they are most of the work of a batch-1 request otherwise).
    self._call = jax.jit(exported.call)
    self._params = jax.device_put(params)
    self._column = column_index(item_ids)

  def top_k(self, rows, cols, vals, row_mask) -> tuple[np.ndarray, np.ndarray]:
    """The exported program on packed arrays (:func:`pack`): ``(scores float32 (B, k),
    columns int32 (B, k))``; ``-1`` columns (score ``-inf``) are fillers past a user's
    unseen items, and a row of NaN scores marks a user the model cannot score."""
    cols = np.asarray(cols)
    # An out-of-range column would be clipped by the device gather, silently.
    if cols.size and (cols.min() < 0 or cols.max() >= self.n_items):
      raise ValueError(f"cols must be in [0, {self.n_items}), got "
                       f"{int(cols.min())}..{int(cols.max())}")
    scores, cols_out = self._call(self._params, rows, cols, vals, row_mask)
    return np.asarray(scores), np.asarray(cols_out)

  def recommend(self, histories: Sequence[Sequence[Any]], k: int | None = None
                ) -> list[dict]:
    """Per user ``{"items": raw ids, "scores": float32, "unknown": [raw ids]}``.

    ``k`` (default: the exported ``k``) may be at most the exported ``k``. A user gets
    fewer than ``k`` items only when fewer are left outside their history; ids not in
    the item table are reported in ``unknown`` and otherwise ignored.
    """
    k = self.k if k is None else int(k)
    if not 1 <= k <= self.k:
      raise ValueError(f"k must be in [1, {self.k}] (exported with k={self.k}), got {k}")
    columns, unknown = [], []
    for history in histories:
      known, missing = columns_of(self._column, history)
      columns.append(np.array(known, np.int32))
      unknown.append(missing)
    n = len(columns)
    out: list[dict] = []
    for lo in range(0, n, USER_BUCKETS[-1]):
      part = columns[lo:lo + USER_BUCKETS[-1]]
      scores, cols_out = self.top_k(*pack(part))
      if np.isnan(scores[:len(part)]).any():
        raise ValueError("non-finite scores: the exported model's parameters are not "
                         "finite; nothing is returned")
      for i in range(len(part)):
        keep = cols_out[i, :k] >= 0
        out.append({"items": self.item_ids[cols_out[i, :k][keep]],
                    "scores": scores[i, :k][keep],
                    "unknown": unknown[lo + i]})
    return out


def load(folder: str) -> Scorer:
  """Checks and loads an artefact folder (see the module docstring); the scorer's
  ``manifest_sha256`` names the bytes it was loaded from."""
  from jax import export  # after the checks' imports: a missing jax fails here, clearly

  files = read_artifact(folder)
  manifest, blobs = files.manifest, files.blobs
  # read_artifact checked these bytes against the manifest's digests.
  exported = export.deserialize(bytearray(blobs[manifest["program"]]))
  with np.load(io.BytesIO(blobs[manifest["params"]]), allow_pickle=False) as z:
    params = _nested({name: z[name] for name in z.files})
  item_ids = np.load(io.BytesIO(blobs[manifest["item_ids"]]), allow_pickle=False)
  if item_ids.shape != (int(manifest["n_items"]),):
    raise ArtifactError(f"{files.folder}: {item_ids.shape[0]} item ids, the manifest says "
                        f"{manifest['n_items']}")
  return Scorer(files.folder, manifest, exported, params, item_ids,
                files.manifest_sha256)
