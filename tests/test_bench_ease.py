"""experiments.bench_ease's references: the independent EASE fits it times and checks a
run against are EASE (B = I - P / diag(P), zero diagonal, P = (G + l2 I)^-1)."""

import numpy as np
import pytest

from experiments import bench_ease


@pytest.mark.parametrize("name", bench_ease.REFERENCES)
def test_every_reference_fit_is_ease(name):
  rng = np.random.default_rng(0)
  x = (rng.random((60, 25)) < 0.2).astype(np.float64)
  gram, l2 = x.T @ x, 7.0
  p = np.linalg.inv(gram + l2 * np.eye(25))
  want = np.eye(25) - p / np.diag(p)[None, :]
  b = bench_ease.reference_fit(gram, l2, name)
  assert b.dtype == (np.float32 if name.endswith("32") else np.float64)
  assert np.all(np.diag(b) == 0)
  np.testing.assert_allclose(b, want - np.diag(np.diag(want)),
                             atol=1e-4 if name.endswith("32") else 1e-10)


def test_importing_the_tool_defines_no_flags():
  from absl import flags
  fv = flags.FlagValues()
  bench_ease.define_flags(fv)
  assert {"n_eval_users", "check_workdir", "out", "n_items"} <= set(fv)
  assert "check_workdir" not in flags.FLAGS
