"""experiments.bench_ease's reference fits: every one is EASE's closed form."""

import numpy as np

from experiments import bench_ease


def test_every_reference_fit_is_the_closed_form():
  rng = np.random.default_rng(0)
  x = (rng.random((60, 12)) < 0.3).astype(np.float64)
  gram, l2 = x.T @ x, 5.0
  # B = I - P diag(1/diag(P)) with P = (G + l2 I)^-1 (Steck, 2019), in float64.
  p = np.linalg.solve(gram + l2 * np.eye(12), np.eye(12))
  want = np.eye(12) - p / np.diag(p)[None, :]
  for name in bench_ease.REFERENCES:
    got = bench_ease.reference_fit(gram, l2, name)
    assert got.dtype == (np.float32 if name.endswith("32") else np.float64), name
    np.testing.assert_allclose(got, want, atol=1e-5 if name.endswith("32") else 1e-12,
                               err_msg=name)
    assert np.all(np.diag(got) == 0.0), name
