"""Each test user's results, as a columnar file beside a run's summary.

``<workdir>/test_users.npz`` (written by every test of a run; no pickled objects) holds
one row per test user, in the split's order:

=================  ============================================================
``user_id``        the raw user id (int64, or text as read)
``counted``        bool: the user has held-out items and counts in the means
``n_heldout``      int64: held-out items
``<metric>@<k>``   float64 per metric and cut-off (NaN where not counted)
``top``            int32 ``(users, kmax)``: the item columns ranked first
``item_ids``       the raw id of each item column
``popularity``     int64 ``(n_items,)``: training users per item
``meta``           JSON: the split's identity, the tested epoch, the summary
=================  ============================================================

A DataFrame takes the per-user columns at once::

  import numpy as np, pandas as pd
  with np.load("runs/demo/test_users.npz") as z:
    users = pd.DataFrame({k: z[k] for k in z.files if z[k].ndim == 1
                          and len(z[k]) == len(z["user_id"])})
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from jax_vaecf.core import files

FILE = "test_users.npz"
_TABLES = ("top", "item_ids", "popularity", "meta")


def write(path: str | os.PathLike, user_ids: np.ndarray, users: Mapping[str, np.ndarray],
          item_ids: np.ndarray, popularity: np.ndarray, meta: Mapping[str, Any]) -> None:
  """Writes the file atomically.

  Args:
    user_ids: ``(n,)`` raw ids, one per row.
    users: :meth:`jax_vaecf.evaluation.metrics.MetricAccumulator.users` of those users (``counted``,
      ``n_heldout``, the metrics and ``top``), each ``(n, ...)``.
    item_ids, popularity: ``(n_items,)`` each.
    meta: JSON facts (the split's identity, the epoch, the summary).
  """
  user_ids = np.asarray(user_ids)
  n = user_ids.shape[0]
  for name, a in users.items():
    if np.asarray(a).shape[:1] != (n,):
      raise ValueError(f"{name}: expected {n} rows (one per user), got "
                       f"{np.asarray(a).shape}")
  arrays = {"user_id": user_ids, **{k: np.asarray(v) for k, v in users.items()},
            "item_ids": np.asarray(item_ids), "popularity": np.asarray(popularity),
            "meta": np.array(json.dumps(dict(meta), sort_keys=True))}
  with files.atomic_write(path, "wb") as f:
    np.savez_compressed(f, **arrays)


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
  """``(columns, meta)`` of a file :func:`write` wrote; ``columns`` holds every array but
  ``meta``. Raises FileNotFoundError or ValueError naming the file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found; test the run first (python -m "
                            "experiments.train --notrain --test --workdir=...)")
  try:
    with np.load(path, allow_pickle=False) as z:
      columns = {k: z[k] for k in z.files if k != "meta"}
      meta = json.loads(str(z["meta"]))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
  n = columns.get("user_id", np.zeros(0)).shape[0]
  bad = [k for k, v in columns.items() if k not in _TABLES and v.shape[:1] != (n,)]
  if "user_id" not in columns or "counted" not in columns or bad:
    raise ValueError(f"{path}: not a per-user results file (columns {sorted(columns)})")
  return columns, meta


def metric_names(columns: Mapping[str, np.ndarray]) -> list[str]:
  """The ``<metric>@<k>`` columns, sorted."""
  return sorted(k for k in columns if "@" in k)
