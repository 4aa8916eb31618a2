"""Beyond-accuracy metrics against plain-Python implementations and values worked by
hand."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from jax_vaecf.evaluation import catalogue


def _reference(top, pop, n_train, k):
  """The definitions of jax_vaecf.evaluation.catalogue, one loop each."""
  n_items = len(pop)
  lists = [list(row[:k]) for row in top]
  slots = [i for row in lists for i in row]
  counts = [0] * n_items
  for i in slots:
    counts[i] += 1
  by_pop = sorted(range(n_items), key=lambda i: (-pop[i], i))
  head = set(by_pop[:math.ceil(0.2 * n_items)])
  c = sorted(counts)
  total = sum(c)
  g = sum((2 * (j + 1) - n_items - 1) * c[j] for j in range(n_items)) / (n_items * total)
  return {
      f"coverage@{k}": sum(1 for x in counts if x) / n_items,
      f"avgpop@{k}": sum(sum(pop[i] for i in row) / k for row in lists) / len(lists),
      f"tail@{k}": sum(1 for i in slots if i not in head) / len(slots),
      f"gini@{k}": g,
      f"novelty@{k}": sum(-math.log2(max(pop[i], 1) / n_train) for i in slots) / len(slots),
  }


@pytest.mark.parametrize("seed", [0, 1])
def test_against_plain_python(seed):
  rng = np.random.default_rng(seed)
  n_items, n_users, n_train = 37, 50, 80
  pop = rng.integers(0, 30, n_items)
  pop[3] = pop[4]  # a popularity tie at the head's edge is broken by column
  top = np.stack([rng.choice(n_items, 10, replace=False) for _ in range(n_users)])
  got = catalogue.catalogue_metrics(top, pop, n_train, (1, 5, 10))
  for k in (1, 5, 10):
    for name, value in _reference(top, pop.tolist(), n_train, k).items():
      assert got[name] == pytest.approx(value, rel=1e-12), name


def test_values_worked_by_hand():
  # 5 items with popularity 10, 6, 3, 1, 0 over N = 16 training users; the head is the
  # ceil(5 / 5) = 1 most popular item, item 0.
  pop = np.array([10, 6, 3, 1, 0])
  top = np.array([[0, 1], [0, 2]])  # k = 2: slots 0, 1, 0, 2
  m = catalogue.catalogue_metrics(top, pop, 16, (1, 2))
  assert m["coverage@2"] == pytest.approx(3 / 5)
  assert m["coverage@1"] == pytest.approx(1 / 5)
  assert m["avgpop@2"] == pytest.approx(((10 + 6) / 2 + (10 + 3) / 2) / 2)
  assert m["tail@2"] == pytest.approx(2 / 4)
  assert m["tail@1"] == 0.0
  # Counts 2, 1, 1, 0, 0 sorted: 0, 0, 1, 1, 2; sum_j (2j - 6) c_j = 0 + 0 + 0 + 2 + 8.
  assert m["gini@2"] == pytest.approx(10 / (5 * 4))
  # Counts 2, 0, 0, 0, 0: one item takes every slot: (n - 1) / n.
  assert m["gini@1"] == pytest.approx(4 / 5)
  assert m["novelty@2"] == pytest.approx(
      (2 * -math.log2(10 / 16) - math.log2(6 / 16) - math.log2(3 / 16)) / 4)
  assert catalogue.gini(np.ones(7)) == 0.0


def test_popularity_from_training_rows_and_bad_input():
  train = sp.csr_matrix(np.array([[1, 0, 1], [1, 0, 0]], np.float32))
  np.testing.assert_array_equal(catalogue.item_popularity(train), [2, 0, 1])
  with pytest.raises(ValueError, match="item columns must be in"):
    catalogue.catalogue_metrics(np.array([[3]]), np.array([1, 1, 1]), 2, (1,))
  with pytest.raises(ValueError, match="expected"):
    catalogue.catalogue_metrics(np.array([[0]]), np.array([1, 1, 1]), 2, (2,))
