"""Exports a trained model as a self-contained scorer artefact (``jax.export``).

An artefact is a folder that a server loads with nothing but numpy and jax (plus
``flatbuffers``, jax's serialisation format), through the ``serve.py`` it contains::

  manifest.json   format, model, shapes, dtypes, k, versions, metrics, sha256 of each file
  scorer.jax      the fold-in top-k program (:func:`jax_vaecf.serving.recommender.scorer_fn`),
                  serialised by jax.export with symbolic users ``B`` and non-zeros ``nnz``
  params.npz      the served weights only (no optimiser state), keys ``layer/name``
  item_ids.npy    the raw id of each item column
  serve.py        the loader (:mod:`jax_vaecf.serving.artefact`, copied verbatim)

The program takes ``(params, rows int32 (nnz,), cols int32 (nnz,), vals float32 (nnz,),
row_mask float32 (B,))`` and returns ``(scores float32 (B, k), columns int32 (B, k))``,
the user's own items excluded (fillers ``-1`` / ``-inf`` past a user's unseen items).
``docs/serving.md`` describes the format.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import secrets
import shutil
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_vaecf.core import files as files_lib
from jax_vaecf import model as model_lib
from jax_vaecf.serving import recommender as recommend_lib
from jax_vaecf.serving import artefact as serve_lib

PROGRAM = "scorer.jax"
PARAMS = "params.npz"
ITEM_IDS = "item_ids.npy"
LOADER = "serve.py"


def export_scorer(model, params, k: int, platforms: Sequence[str] = ("cpu",)):
  """Lowers :func:`jax_vaecf.serving.recommender.scorer_fn` for ``model`` with ``jax.export``.

  Args:
    model: the Linen module (``n_items`` wide).
    params: its parameters (a pytree of float arrays); their shapes and dtypes are
      fixed in the program.
    k: items per user, in ``[1, n_items]``.
    platforms: the backends the program is lowered for (``"cpu"``, ``"cuda"``, ...).

  Returns:
    The ``jax.export.Exported`` program ``(params, rows int32 (nnz,), cols int32
    (nnz,), vals float32 (nnz,), row_mask float32 (B,)) -> (scores float32 (B, k),
    columns int32 (B, k))``, with the users ``B`` and non-zeros ``nnz`` symbolic.

  Raises:
    ValueError: ``k`` out of range.
  """
  users, nnz = jax.export.symbolic_shape("B, nnz")
  spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype)
  return jax.export.export(jax.jit(recommend_lib.scorer_fn(model, k)),
                           platforms=tuple(platforms))(
      jax.tree_util.tree_map(spec, params),
      jax.ShapeDtypeStruct((nnz,), jnp.int32), jax.ShapeDtypeStruct((nnz,), jnp.int32),
      jax.ShapeDtypeStruct((nnz,), jnp.float32), jax.ShapeDtypeStruct((users,), jnp.float32))


def _flat_params(params) -> dict[str, np.ndarray]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(p, "key", p)) for p in path]
    if any("/" in key for key in keys):
      raise ValueError(f"parameter name {keys!r} holds '/', which the format reserves")
    out["/".join(keys)] = np.asarray(jax.device_get(leaf))
  return out


def _versions() -> dict:
  out = {}
  for name in ("jax", "jaxlib", "flax", "numpy", "jax_vaecf"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def write_artifact(out_dir: str | os.PathLike, model, params, item_ids: np.ndarray, k: int,
                   *, model_info: Mapping[str, Any], metrics: Mapping[str, Any] | None = None,
                   platforms: Sequence[str] = ("cpu",)) -> dict:
  """Writes the artefact folder ``out_dir`` (see the module docstring); returns the
  manifest.

  Args:
    out_dir: must not exist, or be an empty folder; the artefact is assembled in a
      temporary folder beside it and renamed into place, so a failure leaves nothing.
    model: the Linen module (``n_items`` wide).
    params: its (served) parameters, a pytree of float arrays, all finite.
    item_ids: ``(n_items,)`` raw ids (int or str) of the columns.
    k: recommendations per user the program returns (callers may take fewer).
    model_info: JSON facts about the model (name, widths, ...), stored in the manifest.
    metrics: JSON metrics of the exported checkpoint (validation, test), stored as is.
    platforms: backends to lower for (``"cpu"``, ``"cuda"``, ...).

  Returns:
    The manifest (the dict written as ``manifest.json``: format, shapes, dtypes, ``k``,
    versions, metrics and each file's sha256 and size).

  Raises:
    ValueError: ``out_dir`` exists and is not an empty folder, ``item_ids`` is not
      ``(n_items,)``, ``k`` is out of range, a parameter name holds ``/``, or jax
      cannot serialise (``flatbuffers`` missing).
    jax_vaecf.evaluation.metrics.NonFiniteModelError: a parameter holds NaN / inf.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise ValueError(f"{out_dir}: exists and is not an empty folder; choose a new --out")
  item_ids = np.asarray(item_ids)
  if item_ids.shape != (model.n_items,):
    raise ValueError(f"item_ids: expected shape ({model.n_items},), got {item_ids.shape}")
  recommend_lib.check_finite_params(params)
  exported = export_scorer(model, params, k, platforms)
  program = _serialized(exported)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  # os.mkdir applies the umask, as the rename keeps the folder's mode (mkdtemp: 0700).
  staging = os.path.join(parent, f".{os.path.basename(out_dir)}.{secrets.token_hex(4)}.tmp")
  os.mkdir(staging, 0o777)
  try:
    _write_payload(staging, program, params, item_ids)
    manifest = _manifest(staging, model, params, item_ids, k, exported.platforms,
                         model_info, metrics)
    files_lib.write_text_atomic(os.path.join(staging, serve_lib.MANIFEST),
                                json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty (checked above)
    os.replace(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return manifest


def _serialized(exported) -> bytes:
  """The serialised bytes of the ``jax.export.Exported`` program; ValueError when the
  optional serialiser is missing."""
  try:
    return bytes(exported.serialize())
  except ImportError as e:  # jax serialises with flatbuffers, an optional package of jax
    raise ValueError(f"cannot serialise the program ({e}); pip install "
                     "'jax_vaecf[export]' (or flatbuffers)") from None


def _write_payload(folder: str, program: bytes, params, item_ids: np.ndarray) -> None:
  """Writes the artefact's files other than the manifest into ``folder``: the program,
  the flat parameters (npz), the item ids (npy, no pickle) and the loader's source."""
  files_lib.write_bytes_atomic(os.path.join(folder, PROGRAM), program)
  with files_lib.atomic_write(os.path.join(folder, PARAMS), "wb") as f:
    np.savez(f, **_flat_params(params))
  with files_lib.atomic_write(os.path.join(folder, ITEM_IDS), "wb") as f:
    np.save(f, item_ids, allow_pickle=False)
  files_lib.write_text_atomic(os.path.join(folder, LOADER), inspect.getsource(serve_lib))


def _manifest(folder: str, model, params, item_ids: np.ndarray, k: int,
              platforms: Sequence[str], model_info: Mapping[str, Any],
              metrics: Mapping[str, Any] | None) -> dict:
  """The manifest (JSON-ready dict) of the payload :func:`_write_payload` wrote into
  ``folder``: format, file names, model facts, input and output signature, parameter
  shapes, versions, metrics, and each file's sha256 and size."""
  names = (PROGRAM, PARAMS, ITEM_IDS, LOADER)
  return {
      "format": serve_lib.FORMAT,
      "program": PROGRAM, "params": PARAMS, "item_ids": ITEM_IDS, "loader": LOADER,
      "model": dict(model_info),
      "n_items": int(model.n_items),
      "k": int(k),
      "platforms": list(platforms),
      "inputs": {"rows": ["nnz", "int32"], "cols": ["nnz", "int32"],
                 "vals": ["nnz", "float32"], "row_mask": ["B", "float32"]},
      "outputs": {"scores": ["B", int(k), "float32"], "columns": ["B", int(k), "int32"]},
      "param_shapes": {name: [list(a.shape), str(a.dtype)]
                       for name, a in _flat_params(params).items()},
      "item_id_dtype": str(item_ids.dtype),
      "user_buckets": list(serve_lib.USER_BUCKETS),
      "versions": _versions(),
      "metrics": dict(metrics or {}),
      "files": {name: {"sha256": serve_lib.sha256_of(os.path.join(folder, name)),
                       "bytes": os.path.getsize(os.path.join(folder, name))}
                for name in names},
  }


def checkpoint_metrics(workdir: str, epoch: int | None) -> dict:
  """What an artefact of a checkpoint states about itself, from the run's log.

  Args:
    workdir: the run folder (its ``metrics.jsonl`` is read).
    epoch: the checkpoint's epoch; ``None``: unknown (nothing is found).

  Returns:
    ``{"epoch": epoch, "validation": {metric: value}, "test": {metric: value}}``, the
    last two only when the log holds records of that epoch.
  """
  from jax_vaecf.training import run_folder  # pylint: disable=g-import-not-at-top
  out: dict = {"epoch": epoch}
  for r in run_folder.MetricsLog(workdir).records():
    if r.get("split") == "train" and r.get("epoch") == epoch:
      out["validation"] = {k[4:]: v for k, v in r.items() if k.startswith("val_")
                           and not k.endswith("time_s")}
    elif r.get("split") == "test" and r.get("epoch") == epoch:
      out["test"] = {k: v for k, v in r.items() if k != "split"}
  return out


def export_run(workdir: str, out_dir: str | os.PathLike, k: int = 100, *,
               platforms: Sequence[str] = ("cpu",),
               recommender: "recommend_lib.Recommender | None" = None) -> dict:
  """Writes the artefact of a run folder's best checkpoint: its served weights, the
  model's shape, the checkpoint's validation and test metrics.

  Args:
    workdir: the run folder.
    out_dir: a new or empty folder (:func:`write_artifact`).
    k: recommendations per user, in ``[1, n_items]``.
    platforms: backends to lower for (``"cpu"``, ``"cuda"``, ...).
    recommender: that run's :class:`jax_vaecf.serving.recommender.Recommender`, when already
      loaded; ``None``: loaded here.

  Returns:
    The manifest, as :func:`write_artifact`.

  Raises:
    FileNotFoundError: the run has no finished checkpoint
      (:meth:`jax_vaecf.serving.recommender.Recommender.from_workdir`).
    ValueError: ``k`` outside ``[1, n_items]``, and as :func:`write_artifact`.
  """
  rec = recommender or recommend_lib.Recommender.from_workdir(workdir)
  if not 1 <= k <= rec.model.n_items:
    raise ValueError(f"k={k}: expected 1 to the {rec.model.n_items} items")
  ident = rec.checkpoint_meta["identity"]
  return write_artifact(
      out_dir, rec.model, rec.params, rec.item_ids, k,
      model_info={key: ident[key] for key in ("model", "dataset") if key in ident}
      | {key: ident[key] for key in model_lib.model_entry(ident["model"]).shape}
      | {"weights": "weight average" if ident.get("weight_average") else "weights"},
      metrics=checkpoint_metrics(workdir, rec.checkpoint_meta.get("epoch")),
      platforms=platforms)
