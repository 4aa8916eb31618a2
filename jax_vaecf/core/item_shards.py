"""Items split over a device mesh axis: the model-parallel layout of the item layers.

With ``ItemShards(axis, count, n_items)`` shard ``m`` of the mesh axis ``axis`` holds the
items ``m * per_shard ... (m + 1) * per_shard - 1``, where
``per_shard = ceil(n_items / count)``; the last shard's columns past ``n_items`` are
padding. The item-indexed arrays of a run (the first layer's kernel rows, the output
layer's kernel columns and bias, their Adam moments, weight averages and frozen copies)
are split this way, so a device holds ``1 / count`` of them, and the layers that touch
items combine shards with collectives:

* the sparse first layer gathers the kernel rows of the user's items that fall in the
  local shard and sums the partial products over ``axis`` (``psum``);
* the fused output layer forms each shard's logits and combines the log-sum-exp with a
  ``pmax`` and a ``psum`` (:func:`jax_vaecf.core.losses.output_layer_nll`);
* evaluation takes a top-k per shard and merges the candidates
  (:func:`merge_top_k`).

Which arrays are item-indexed is not declared by hand: :func:`item_axes` finds, for any
function building a pytree from a model, the axis of each leaf whose length follows
``n_items`` (by building the abstract shapes for ``n_items`` and ``n_items + 1``). A new
model therefore shards without a line of its own.

Padding columns are zero in every array and stay zero: no entry of a batch points at
them, the output layer gives them probability 0, so their gradients are 0 and Adam
leaves them unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ItemShards:
  """``n_items`` items split into ``count`` equal shards over the mesh axis ``axis``.

  Attributes:
    axis: the mesh axis name the items are split over (``'model'``).
    count: number of shards (the axis size).
    n_items: real items (the global catalogue size).
  """

  axis: str
  count: int
  n_items: int

  def __post_init__(self):
    if self.count < 1:
      raise ValueError(f"ItemShards: count must be >= 1, got {self.count}")
    if self.n_items < self.count:
      raise ValueError(f"ItemShards: {self.n_items} items cannot be split over "
                       f"{self.count} shards")

  @property
  def per_shard(self) -> int:
    """Items per shard, padding included: ``ceil(n_items / count)``."""
    return -(-self.n_items // self.count)

  @property
  def padded(self) -> int:
    """``count * per_shard``: the item axis length of the padded arrays."""
    return self.per_shard * self.count

  def offset(self) -> Array:
    """int32 scalar: the first item of this device's shard (inside ``shard_map``)."""
    return jax.lax.axis_index(self.axis) * self.per_shard

  def local(self, cols: Array) -> tuple[Array, Array]:
    """Global item indices ``cols`` as ``(local index, in this shard)``.

    Items of other shards get local index 0 and ``False``; callers zero their values.
    """
    local = cols - self.offset()
    inside = (local >= 0) & (local < self.per_shard)
    return jnp.where(inside, local, 0), inside

  def real_columns(self) -> Array:
    """bool ``(per_shard,)``: the local columns that are real items (not padding)."""
    return self.offset() + jnp.arange(self.per_shard) < self.n_items


def item_axes(build: Callable[[int], Any], n_items: int) -> Any:
  """The item axis of every leaf of ``build(n_items)`` (``None``: not item-indexed).

  Args:
    build: ``n -> pytree`` of arrays for a catalogue of ``n`` items (e.g. a train state
      made from ``model.clone(n_items=n)``); only traced abstractly (``jax.eval_shape``).
    n_items: the catalogue size.

  Returns:
    The pytree of ``build(n_items)`` with an ``int`` axis or ``None`` per leaf.

  Raises:
    ValueError: a leaf has more than one axis that follows ``n_items``, or an axis
      whose length is not ``n_items``.
  """
  a = jax.eval_shape(lambda: build(n_items))
  b = jax.eval_shape(lambda: build(n_items + 1))

  def axis_of(path, x, y):
    diff = [i for i, (p, q) in enumerate(zip(x.shape, y.shape)) if p != q]
    if not diff:
      return None
    name = jax.tree_util.keystr(path)
    if len(diff) > 1 or x.shape[diff[0]] != n_items:
      raise ValueError(f"{name}: shape {x.shape} follows the item count on axes {diff}; "
                       f"item sharding splits one axis of length n_items")
    return diff[0]

  return jax.tree_util.tree_map_with_path(axis_of, a, b)


def map_with_axes(fn: Callable[[Any, int | None], Any], tree: Any, axes: Any) -> Any:
  """``fn(leaf, axis)`` for every leaf of ``tree``, ``axes`` as :func:`item_axes` gives
  them (``None`` at a leaf's place: no item axis; ``fn`` may return ``None``)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef.unflatten([fn(x, a) for x, a in zip(leaves, treedef.flatten_up_to(axes))])


def pad(tree: Any, axes: Any, shards: ItemShards) -> Any:
  """Host arrays with each item axis zero-padded from ``n_items`` to ``shards.padded``."""
  def one(x, axis):
    x = np.asarray(x)
    if axis is None:
      return x
    if x.shape[axis] != shards.n_items:
      raise ValueError(f"expected {shards.n_items} items on axis {axis}, got shape "
                       f"{x.shape}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, shards.padded - shards.n_items)
    return np.pad(x, widths)
  return map_with_axes(one, tree, axes)


def unpad(x: np.ndarray, axis: int | None, n_items: int) -> np.ndarray:
  """``x`` with its item axis cut back to the real ``n_items`` columns."""
  if axis is None:
    return x
  return np.take(x, np.arange(n_items), axis=axis)


def merge_top_k(values: Array, items: Array, extra: Array, k: int, axis: str
                ) -> tuple[Array, Array, Array]:
  """The global top-``k`` from each shard's own top candidates.

  Args:
    values: float32 ``(B, c)``, a shard's best scores in descending order (ties: lower
      item first), as :func:`jax.lax.top_k` gives them.
    items: int32 ``(B, c)``, their global item indices.
    extra: ``(B, c)``, a value carried along with each candidate (e.g. hit flags).
    k: candidates kept, ``k <= c * shards``.
    axis: the mesh axis the items are split over.

  Returns:
    ``(values, items, extra)``, each ``(B, k)``, identical on every shard: the same
    ranking as one top-k over all items, ties broken by the lower item index (shards
    hold increasing item ranges and are concatenated in order).
  """
  def gather(a):
    a = jax.lax.all_gather(a, axis, axis=1)  # (B, shards, c), shards in axis order
    return a.reshape(a.shape[0], -1)
  values, items, extra = gather(values), gather(items), gather(extra)
  top, where = jax.lax.top_k(values, k)
  return (top, jnp.take_along_axis(items, where, axis=1),
          jnp.take_along_axis(extra, where, axis=1))
