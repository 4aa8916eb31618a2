"""The blocked in-place Cholesky factor (jax_vaecf.core.lapack)."""

import numpy as np
import pytest

from jax_vaecf.core import lapack


def _spd(n, seed=0):
  x = np.random.default_rng(seed).standard_normal((n, n + 5))
  return x @ x.T + n * np.eye(n)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("block", [1, 7, 64, lapack.BLOCK])
def test_blocked_factor_equals_numpy_and_cleans_the_upper_triangle(dtype, tol, block):
  a = _spd(53)
  want = np.linalg.cholesky(a)
  f = np.asfortranarray(a.astype(dtype))
  address = f.ctypes.data
  assert lapack.cholesky_in_place(f, block=block) == 0
  assert f.ctypes.data == address  # in place
  np.testing.assert_array_equal(np.triu(f, 1), 0)
  np.testing.assert_allclose(f, want, rtol=tol, atol=tol * np.abs(want).max())


def test_the_first_failing_minor_is_reported_across_blocks():
  a = _spd(40)
  a[25, 25] = -1.0  # leading minors 1..25 positive definite, 26 not
  f = np.asfortranarray(a)
  assert lapack.cholesky_in_place(f, block=8) == 26
  assert lapack.cholesky_in_place(np.asfortranarray(a), block=64) == 26


def test_bad_arrays_are_refused():
  with pytest.raises(ValueError, match="Fortran-ordered"):
    lapack.cholesky_in_place(np.ascontiguousarray(_spd(5)))
  with pytest.raises(ValueError, match="float32 or float64"):
    lapack.cholesky_in_place(np.asfortranarray(_spd(5).astype(np.float16)))
  with pytest.raises(ValueError, match="block"):
    lapack.cholesky_in_place(np.asfortranarray(_spd(5)), block=0)
