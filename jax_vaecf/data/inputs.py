"""What enters the library from a caller, checked in one place before any work.

Every public entry (:func:`jax_vaecf.api.fit`, :class:`jax_vaecf.api.FittedModel`'s
``recommend``, ``score``, ``evaluate``, ``save`` and ``export``, a hand-made
:class:`jax_vaecf.data.Split`, EASE's ``l2``) passes its arguments through one of the
functions below. Each refuses what it cannot answer right with one line naming the
argument (``TypeError`` for a value of the wrong kind, ``ValueError`` for a value out of
range), so no input is half-used and then silently answered wrong. The functions are
pure: they read their arguments and return the checked (normalised) values.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import scipy.sparse as sp

from jax_vaecf.data import split as split_lib

# --------------------------------------------------------------------------- raw ids


def _is_id(value: Any) -> bool:
  """A raw id is an integer or a text (the forms :func:`jax_vaecf.data.from_columns`
  keeps); a bool, float, None or bytes would be looked up by a text that no data holds."""
  if isinstance(value, (bool, np.bool_)):
    return False
  return isinstance(value, (numbers.Integral, str))


def _is_list(value: Any) -> bool:
  """A list of things: not a text (a text iterated gives characters, not ids)."""
  if isinstance(value, (str, bytes, np.str_, np.bytes_)):
    return False
  if isinstance(value, np.ndarray):
    return value.ndim == 1
  return isinstance(value, Iterable) and not isinstance(value, (dict, set, frozenset))


def ids(values: Any, argument: str) -> list:
  """Checks a list of raw ids.

  Args:
    values: a list, tuple or 1-D array of raw ids (``int`` or ``str``).
    argument: the caller's argument name, for the message.

  Returns:
    The ids as a Python list (a numpy array's elements as Python values).

  Raises:
    TypeError: naming ``argument``: a text in place of a list (``users="12"``), a lone
      id, or an element that is not an id (``None``, a bool, a float, bytes, a list).
  """
  if not _is_list(values):
    kind = "a text" if isinstance(values, (str, bytes)) else type(values).__name__
    raise TypeError(f"{argument}: expected a list of raw ids, got {kind} {values!r:.60}"
                    f" (one id: {argument}=[{values!r:.40}])")
  out = list(values.tolist() if isinstance(values, np.ndarray) else values)
  for i, v in enumerate(out):
    if not _is_id(v):
      raise TypeError(f"{argument}[{i}]: a raw id is an int or a str, got "
                      f"{type(v).__name__} {v!r:.60}")
  return out


def histories(values: Any, argument: str = "items") -> list[list]:
  """Checks users' item histories.

  Args:
    values: per user, a list of raw item ids (a list of lists, or a 2-D array).
    argument: the caller's argument name, for the message.

  Returns:
    One Python list of raw ids (``int`` or ``str``) per user.

  Raises:
    TypeError: naming ``argument``: a text, a flat list of ids where a list of lists is
      meant (``items=[1, 260]``: one user is ``items=[[1, 260]]``), or a bad id
      (:func:`ids`).
  """
  if not _is_list(values) and not (isinstance(values, np.ndarray) and values.ndim == 2):
    raise TypeError(f"{argument}: expected a list of users' item lists "
                    f"({argument}=[[...], ...]), got {type(values).__name__} "
                    f"{values!r:.60}")
  out = []
  for u, history in enumerate(values):
    if _is_id(history) or history is None:
      raise TypeError(f"{argument}: expected a list of users' item lists, got a flat list "
                      f"of ids ({argument}[{u}] = {history!r:.40}); one user's items are "
                      f"{argument}=[[...]]")
    out.append(ids(history, f"{argument}[{u}]"))
  return out


def users_or_items(users: Any, items: Any) -> tuple[list | None, list[list] | None]:
  """Checks that exactly one of ``users`` and ``items`` is given.

  Args:
    users: raw user ids (:func:`ids`), or ``None``.
    items: per new user, raw item ids (:func:`histories`), or ``None``.

  Returns:
    ``(users, None)`` or ``(None, items)``, the one given checked.

  Raises:
    ValueError: both or neither given.
    TypeError: as :func:`ids` / :func:`histories`.
  """
  if (users is None) == (items is None):
    raise ValueError("users / items: give users (raw ids in the data) or items (each "
                     "new user's raw item ids), not both")
  if users is not None:
    return ids(users, "users"), None
  return None, histories(items, "items")


# --------------------------------------------------------------------------- numbers


def k_value(k: Any, n_items: int, argument: str = "k") -> int:
  """Checks a number of items per user.

  Args:
    k: an int (Python or numpy).
    n_items: the model's items, the largest ``k``.
    argument: the caller's argument name, for the message.

  Returns:
    ``k`` as a Python int in ``[1, n_items]``.

  Raises:
    TypeError: a bool, float or text (no rounding: ``k=2.5`` is not ``k=2``).
    ValueError: out of range.
  """
  if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
    raise TypeError(f"{argument}: expected an int, got {type(k).__name__} {k!r:.40}")
  if not 1 <= int(k) <= n_items:
    raise ValueError(f"{argument} must be in [1, {n_items}] (the model's items), got {k}")
  return int(k)


def k_values(ks: Any, n_items: int, argument: str = "ks") -> tuple[int, ...]:
  """Checks a list of cut-offs.

  Args:
    ks: a non-empty list of ints, each as :func:`k_value`.
    n_items: the model's items, the largest ``k``.
    argument: the caller's argument name, for the message.

  Returns:
    The ``k`` values as a tuple of ints, sorted, each once.

  Raises:
    TypeError: ``ks`` not a list, or an element as :func:`k_value`.
    ValueError: an empty list, or a ``k`` out of range.
  """
  if not _is_list(ks):
    raise TypeError(f"{argument}: expected a list of ints, got {type(ks).__name__} "
                    f"{ks!r:.40}")
  out = [k_value(k, n_items, f"{argument}[{i}]") for i, k in enumerate(ks)]
  if not out:
    raise ValueError(f"{argument}: give at least one k")
  return tuple(sorted(set(out)))


def callback(fn: Any, argument: str) -> None:
  """Checks a callback, so a bad one fails here, not after an epoch's work.

  Args:
    fn: ``None`` or a callable.
    argument: the caller's argument name, for the message.

  Raises:
    TypeError: ``fn`` is neither.
  """
  if fn is not None and not callable(fn):
    raise TypeError(f"{argument}: expected a function of one record (dict) or None, got "
                    f"{type(fn).__name__} {fn!r:.40}")


# --------------------------------------------------------------------------- matrices


def _first_where(m: sp.coo_matrix, mask: np.ndarray) -> str:
  i = int(np.argmax(mask))
  return f"{m.data[i].item()!r} at row {int(m.row[i])}, column {int(m.col[i])}"


def interaction_matrix(data: Any, argument: str = "data") -> sp.coo_matrix:
  """Checks a matrix of interactions: non-zero entries are the interactions, so ratings
  or counts would be ignored silently.

  Args:
    data: a scipy sparse ``(n_users, n_items)`` matrix of 0 and 1, any numeric dtype.
    argument: the caller's argument name, for the message.

  Returns:
    A COO copy without its stored zeros (a zero is no interaction, stored or not).

  Raises:
    TypeError: a matrix of non-numbers.
    ValueError: naming ``argument`` and the entry's row and column: a NaN, inf,
      negative or other non-1 value; or a matrix with no interaction.
  """
  m = sp.coo_matrix(data, copy=True)
  values = np.asarray(m.data)
  if values.dtype.kind not in "biuf":
    raise TypeError(f"{argument}: expected numbers, got a matrix of {values.dtype}")
  values = values.astype(np.float64)
  for mask, what in ((~np.isfinite(values), "NaN or inf"), (values < 0, "negative")):
    if mask.any():
      raise ValueError(f"{argument}: a {what} entry ({_first_where(m, mask)}); entries "
                       "must be 0 (no interaction) or 1 (an interaction)")
  m.eliminate_zeros()
  other = np.asarray(m.data, np.float64) != 1.0
  if other.any():
    raise ValueError(
        f"{argument}: entries must be 0 or 1 (non-zero = an interaction), got "
        f"{_first_where(m, other)}; binarise it ((M >= 4).astype('float32')) or give "
        "columns (users, items, ratings) to keep ratings above csv_threshold")
  if m.nnz == 0:
    raise ValueError(f"{argument}: the matrix holds no interaction (no non-zero entry)")
  return m


def axis_ids(values: Any, n: int, argument: str, axis: str) -> np.ndarray | None:
  """Checks a matrix's ``user_ids`` / ``item_ids``.

  Args:
    values: ``n`` raw ids (:func:`ids`), one per row or column; ``None``: the indices.
    n: rows or columns of the matrix.
    argument: the caller's argument name, for the message.
    axis: ``"row"`` or ``"column"``.

  Returns:
    The ids as a ``(n,)`` numpy array, or ``None``.

  Raises:
    TypeError: as :func:`ids`.
    ValueError: not ``n`` ids, or an id given twice.
  """
  if values is None:
    return None
  out = ids(values, argument)
  if len(out) != n:
    raise ValueError(f"{argument}: {len(out)} ids for the matrix's {n} {axis}s")
  array = np.asarray(out)
  try:
    split_lib.check_distinct_ids(array, "user" if axis == "row" else "item", axis=axis)
  except ValueError as e:
    raise ValueError(f"{argument}: {e}") from None
  return array


# --------------------------------------------------------------------------- splits


def _binary_part(m: Any, argument: str, shape: tuple[int | None, int]) -> sp.csr_matrix:
  """One matrix of a split: scipy sparse of ``shape`` (``None``: any rows), every stored
  value 1, as a CSR float32 with int32 indices (what the batcher reads)."""
  if not sp.issparse(m):
    raise TypeError(f"{argument}: expected a scipy sparse matrix, got {type(m).__name__}")
  if len(m.shape) != 2 or (shape[0] is not None and m.shape[0] != shape[0]) or \
      m.shape[1] != shape[1]:
    want = f"({'any' if shape[0] is None else shape[0]}, {shape[1]})"
    raise ValueError(f"{argument}: shape {m.shape}, expected {want} (rows = its ids, "
                     "columns = the split's item_ids)")
  coo = sp.coo_matrix(m)
  bad = np.asarray(coo.data, np.float64) != 1.0
  if bad.any():
    raise ValueError(f"{argument}: a split's entries are 1 (an interaction), got "
                     f"{_first_where(coo, bad)}; drop stored zeros (eliminate_zeros()) "
                     "and binarise")
  return split_lib.binary_csr(coo.row, coo.col, coo.shape)


def eval_split(part: Any, n_items: int, argument: str) -> split_lib.EvalSplit:
  """Checks an :class:`EvalSplit` over ``n_items`` items (see :func:`split`).

  Args:
    part: the :class:`EvalSplit`.
    n_items: the columns its matrices must have.
    argument: the caller's argument name, for the message.

  Returns:
    The :class:`EvalSplit` with CSR float32 0/1 matrices (int32 indices).

  Raises:
    TypeError: not an ``EvalSplit``, or a matrix that is not scipy sparse.
    ValueError: ``user_ids`` not 1-D, a matrix not ``(len(user_ids), n_items)``, or a
      stored value other than 1.
  """
  if not isinstance(part, split_lib.EvalSplit):
    raise TypeError(f"{argument}: expected an EvalSplit, got {type(part).__name__}")
  users = np.asarray(part.user_ids)
  if users.ndim != 1:
    raise ValueError(f"{argument}.user_ids: expected one id per row, shape {users.shape}")
  fold_in = _binary_part(part.fold_in, f"{argument}.fold_in", (users.size, n_items))
  heldout = _binary_part(part.heldout, f"{argument}.heldout", (users.size, n_items))
  return split_lib.EvalSplit(fold_in=fold_in, heldout=heldout, user_ids=users)


def split(value: Any, argument: str = "data") -> split_lib.Split:
  """Checks a hand-made :class:`Split` whole, before any training: the item columns of
  every matrix equal ``len(item_ids)`` (a wider held-out matrix would lose its extra
  targets without a word), the rows equal their ids, every stored value is 1 (no -1,
  NaN or stored zero), the protocol is known and training has an interaction.

  Args:
    value: the :class:`Split`.
    argument: the caller's argument name, for the message.

  Returns:
    The split with CSR float32 matrices (int32 indices), as the library's own are.

  Raises:
    TypeError: not a ``Split``, or a matrix that is not scipy sparse.
    ValueError: naming the field at fault (``data.test.heldout``, ...): an unknown
      protocol, ids that are not 1-D ints or texts, a shape that disagrees, a value
      other than 1, no training interaction, no test users.
  """
  if not isinstance(value, split_lib.Split):
    raise TypeError(f"{argument}: expected a Split, got {type(value).__name__}")
  if value.protocol not in split_lib.PROTOCOLS:
    raise ValueError(f"{argument}.protocol: {value.protocol!r}, expected one of "
                     f"{split_lib.PROTOCOLS}")
  item_ids = np.asarray(value.item_ids)
  users = np.asarray(value.train_user_ids)
  for name, a in (("item_ids", item_ids), ("train_user_ids", users)):
    if a.ndim != 1 or a.dtype.kind not in "iuUSO":
      raise ValueError(f"{argument}.{name}: expected one int or str id each, got "
                       f"{a.dtype} of shape {a.shape}")
  n_items = item_ids.size
  train = _binary_part(value.train, f"{argument}.train", (users.size, n_items))
  if train.nnz == 0:
    raise ValueError(f"{argument}.train: holds no interaction")
  if value.test is None:
    raise ValueError(f"{argument}.test: a split needs test users")
  parts = {name: None if getattr(value, name) is None else
           eval_split(getattr(value, name), n_items, f"{argument}.{name}")
           for name in ("validation", "test")}
  return split_lib.Split(train=train, item_ids=item_ids, train_user_ids=users,
                         protocol=value.protocol,
                         collapsed_duplicates=value.collapsed_duplicates, **parts)


# --------------------------------------------------------------------------- files


# The backends jax.export lowers for; any other name writes an artefact no server loads.
EXPORT_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def platforms(values: Any, argument: str = "platforms") -> tuple[str, ...]:
  """Checks export platforms.

  Args:
    values: a non-empty list of :data:`EXPORT_PLATFORMS` names.
    argument: the caller's argument name, for the message.

  Returns:
    The names as a tuple of str.

  Raises:
    TypeError: not a list.
    ValueError: empty, or an unknown name.
  """
  if not _is_list(values):
    raise TypeError(f"{argument}: expected a list of platform names, got "
                    f"{type(values).__name__} {values!r:.40}")
  out = tuple(values)
  bad = [p for p in out if p not in EXPORT_PLATFORMS]
  if bad or not out:
    raise ValueError(f"{argument}: {bad or 'none given'}; expected some of "
                     f"{EXPORT_PLATFORMS}")
  return out


def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return os.path.commonpath([path, folder]) == folder


def save_path(path: Any, run_folders: Sequence[str], argument: str = "path") -> str:
  """Checks where a model may be saved: a copy inside a folder the library removes
  would be removed with it.

  Args:
    path: a str or ``os.PathLike`` folder.
    run_folders: the model's run folder and the temporary folder that holds it.
    argument: the caller's argument name, for the message.

  Returns:
    ``path`` as a str: a new or empty folder outside ``run_folders``.

  Raises:
    TypeError: not a path.
    ValueError: inside one of ``run_folders``, or exists and is not an empty folder.
  """
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"{argument}: expected a folder path, got {type(path).__name__}")
  path = os.fspath(path)
  for folder in run_folders:
    if _inside(path, folder):
      raise ValueError(f"{argument}: {path} is inside the model's run folder {folder}; "
                       "save it to a folder of its own")
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ValueError(f"{argument}: {path} exists and is not an empty folder")
  return path


def setting_values(settings: dict, check: Callable[[dict, str], Any],
                   is_list: Callable[[str], bool]) -> dict:
  """Checks the keyword settings of :func:`jax_vaecf.api.fit`, each typed as a settings
  file's: numpy scalars become Python ones, a list setting takes a list, a tuple or one
  number (EASE's ``l2=500``).

  Args:
    settings: ``{setting: value}`` (Config fields and the model's own settings).
    check: ``(settings dict, where) -> Config`` (:func:`jax_vaecf.training.configs.from_json`),
      which types each setting, checks it (the model's settings by the model's own
      checks) and names it in its errors.
    is_list: whether the setting ``name`` holds a list.

  Returns:
    ``{setting: typed value}``, ready for ``Config.replace``.

  Raises:
    ValueError: a value of the wrong type or out of its range, naming ``fit(name=...)``.
  """
  out = {}
  for name, value in settings.items():
    if isinstance(value, np.generic):
      value = value.item()
    if is_list(name) and isinstance(value, numbers.Real) and not isinstance(value, bool):
      value = [value]
    elif isinstance(value, (tuple, list, np.ndarray)):
      value = [v.item() if isinstance(v, np.generic) else v for v in value]
    out[name] = getattr(check({name: value}, f"fit({name}=...)"), name)
  return out
