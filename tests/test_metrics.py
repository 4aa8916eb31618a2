"""Ranking metrics against brute-force numpy, with ties, short and empty held-out sets."""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_vaecf.evaluation import metrics


def _brute_force(scores, heldout, fold_in, k):
  """Per-user NDCG@k, Recall@k, RecallN@k by full sorting; None for no held-out."""
  out = []
  for s, h, f in zip(scores, heldout, fold_in):
    items = [i for i in range(len(s)) if f[i] == 0]
    # Descending score, ties broken by lower item index.
    items.sort(key=lambda i: (-s[i], i))
    # Fold-in items rank last (score -inf), in index order, as top_k orders them.
    ranked = items + [i for i in range(len(s)) if f[i] != 0]
    top = ranked[:k]
    n = int((h > 0).sum())
    if n == 0:
      out.append(None)
      continue
    dcg = sum(1 / np.log2(j + 2) for j, i in enumerate(top) if h[i] > 0)
    idcg = sum(1 / np.log2(j + 2) for j in range(min(k, n)))
    hits = sum(1 for i in top if h[i] > 0)
    first = next((j + 1 for j, i in enumerate(top) if h[i] > 0), None)
    ap = sum(sum(1 for i2 in top[:j + 1] if h[i2] > 0) / (j + 1)
             for j, i in enumerate(top) if h[i] > 0) / min(k, n)
    out.append((dcg / idcg, hits / min(k, n), hits / n, hits / k, float(hits > 0),
                0.0 if first is None else 1 / first, ap))
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_brute_force(seed):
  rng = np.random.default_rng(seed)
  b, n = 40, 30
  # Few distinct score values: many ties.
  scores = rng.integers(0, 5, (b, n)).astype(np.float32)
  fold_in = (rng.random((b, n)) < 0.3).astype(np.float32)
  heldout = ((rng.random((b, n)) < 0.2) & (fold_in == 0)).astype(np.float32)
  heldout[0] = 0  # no held-out items
  heldout[1] = 0
  heldout[1, np.flatnonzero(fold_in[1] == 0)[0]] = 1  # fewer than k held out
  ks = (1, 5, 10, 30)
  got = metrics.ranking_metrics(jnp.asarray(scores), jnp.asarray(heldout),
                                jnp.asarray(fold_in), ks)
  for k in ks:
    want = _brute_force(scores, heldout, fold_in, k)
    for u, w in enumerate(want):
      if w is None:
        assert not bool(got["valid"][u])
        assert float(got[f"ndcg@{k}"][u]) == 0.0
        continue
      assert bool(got["valid"][u])
      assert float(got[f"ndcg@{k}"][u]) == pytest.approx(w[0], abs=1e-6)
      assert float(got[f"recall@{k}"][u]) == pytest.approx(w[1], abs=1e-6)
      assert float(got[f"recalln@{k}"][u]) == pytest.approx(w[2], abs=1e-6)
      for j, name in enumerate(("precision", "hitrate", "mrr", "map"), 3):
        assert float(got[f"{name}@{k}"][u]) == pytest.approx(w[j], abs=1e-6), name


def test_the_conventions_on_a_ranking_worked_by_hand():
  # Items ranked 0, 1, 2, 3, 4 (descending scores); held out: items 1 and 3 (n = 2).
  scores = jnp.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
  heldout = jnp.array([[0.0, 1, 0, 1, 0]])
  m = metrics.ranking_metrics(scores, heldout, None, (1, 2, 4))
  want = {  # hits at ranks 2 and 4
      "precision@1": 0.0, "precision@2": 0.5, "precision@4": 0.5,
      "hitrate@1": 0.0, "hitrate@2": 1.0, "hitrate@4": 1.0,
      "mrr@1": 0.0, "mrr@2": 0.5, "mrr@4": 0.5,
      # AP@4 = (P@2 + P@4) / min(4, 2) = (1/2 + 2/4) / 2; AP@2 = (1/2) / 2.
      "map@1": 0.0, "map@2": 0.25, "map@4": 0.5,
      "recalln@2": 0.5, "recall@2": 0.5, "recall@1": 0.0}
  for name, value in want.items():
    assert float(m[name][0]) == pytest.approx(value), name


def test_perfect_ranking_scores_one_and_fold_in_is_removed():
  scores = jnp.array([[10.0, 9.0, 8.0, 1.0, 0.0]])
  fold_in = jnp.array([[1.0, 0, 0, 0, 0]])  # the top-scored item is a fold-in item
  heldout = jnp.array([[0.0, 1, 1, 0, 0]])
  m = metrics.ranking_metrics(scores, heldout, fold_in, (2,))
  assert float(m["ndcg@2"][0]) == pytest.approx(1.0)
  assert float(m["recall@2"][0]) == pytest.approx(1.0)
  # Without removing fold-in items the same scores rank a non-held-out item first.
  m2 = metrics.ranking_metrics(scores, heldout, None, (2,))
  assert float(m2["ndcg@2"][0]) < 1.0


def test_wrappers_and_accumulator():
  rng = np.random.default_rng(3)
  scores = rng.normal(size=(6, 20)).astype(np.float32)
  heldout = (rng.random((6, 20)) < 0.3).astype(np.float32)
  heldout[2] = 0
  nd, valid = metrics.ndcg_at_k(jnp.asarray(scores), jnp.asarray(heldout), 10)
  rc, _ = metrics.recall_at_k(jnp.asarray(scores), jnp.asarray(heldout), 10)
  full = metrics.ranking_metrics(jnp.asarray(scores), jnp.asarray(heldout), None, (10,))
  np.testing.assert_allclose(nd, full["ndcg@10"])
  np.testing.assert_allclose(rc, full["recall@10"])
  acc = metrics.MetricAccumulator()
  acc.add(full, row_mask=np.array([1, 1, 1, 1, 1, 0]))
  res = acc.result()
  keep = np.asarray(valid) & (np.arange(6) < 5)
  assert res["n_users"] == keep.sum()
  assert res["n_excluded"] == 1  # user 2 has no held-out items; user 5 is padding
  assert res["ndcg@10"] == pytest.approx(float(np.asarray(nd)[keep].mean()))


def test_row_mask_marks_padding_invalid():
  scores = jnp.ones((2, 4))
  heldout = jnp.ones((2, 4))
  m = metrics.ranking_metrics(scores, heldout, None, (2,), row_mask=jnp.array([1.0, 0.0]))
  assert list(np.asarray(m["valid"])) == [True, False]


def test_bad_arguments():
  s = jnp.zeros((2, 5))
  with pytest.raises(ValueError, match="larger than the number of items"):
    metrics.ranking_metrics(s, s, None, (6,))
  with pytest.raises(ValueError, match="heldout"):
    metrics.ranking_metrics(s, jnp.zeros((2, 4)), None, (2,))
  with pytest.raises(ValueError, match="fold_in"):
    metrics.ranking_metrics(s, s, jnp.zeros((3, 5)), (2,))
  with pytest.raises(ValueError, match="scores"):
    metrics.ranking_metrics(jnp.zeros(5), s, None, (2,))
  with pytest.raises(ValueError, match="positive"):
    metrics.ndcg_at_k(s, s, 0)
