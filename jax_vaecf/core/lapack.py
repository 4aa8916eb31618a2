"""A blocked, in-place Cholesky factor on SciPy's BLAS and LAPACK, for large matrices.

SciPy's bundled OpenBLAS (0.3.30, 32-bit integers) crashes the process (a segmentation
fault, no Python error) in its threaded ``potrf`` from about 28,000 rows on (24,000
passed; ``numpy.linalg.cholesky`` crashed likewise at 31,668), and in ``syrk`` with a
27,572 x 4,096 operand; ``trsm``, ``gemm``, ``trtri`` and ``lauum`` ran at 31,668 rows.
:func:`cholesky_in_place` therefore factors ``BLOCK``-row diagonal blocks with
``potrf``, solves the panel below each with ``trsm`` and updates the trailing matrix
with ``gemm``, one ``BLOCK``-column strip at a time: the same ``n^3 / 3`` flops, at the
same speed (31,668 rows: 59 s on a 2-core AMD EPYC, about 180 GFLOP/s). A matrix of at
most ``BLOCK`` rows is one ``potrf`` call, as before.

The routines are reached through ``scipy.linalg.cython_blas`` / ``cython_lapack``'s
exported function pointers (ctypes), which take a leading dimension, so every block is
worked on where it lies: no copy of the matrix or of its trailing part.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

# Rows of the diagonal blocks factored by potrf (and columns of the trailing strips).
BLOCK = 4096

_P = ctypes.c_void_p


@functools.lru_cache(maxsize=None)
def _routine(module: str, name: str, n_args: int):
  """A ctypes function for SciPy's exported ``name`` (all arguments by pointer)."""
  from scipy.linalg import cython_blas, cython_lapack  # pylint: disable=g-import-not-at-top
  capsule = {"blas": cython_blas, "lapack": cython_lapack}[module].__pyx_capi__[name]
  get_name = ctypes.pythonapi.PyCapsule_GetName
  get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
  get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
  get_pointer.restype = ctypes.c_void_p
  get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
  return ctypes.CFUNCTYPE(None, *[_P] * n_args)(get_pointer(capsule, get_name(capsule)))


def _char(c: str):
  return ctypes.byref(ctypes.c_char(c.encode()))


def _int(v: int):
  return ctypes.byref(ctypes.c_int(int(v)))


def cholesky_in_place(a: np.ndarray, block: int = BLOCK) -> int:
  """Overwrites the lower triangle of the Fortran-ordered ``a`` ``(n, n)`` (float32 or
  float64, symmetric positive definite) with its Cholesky factor ``L`` (``a = L L^T``)
  and zeroes the strict upper triangle.

  Returns LAPACK's ``info``: 0, or ``i > 0`` when the leading minor of order ``i`` is not
  positive definite (the factor is then incomplete).
  """
  if a.ndim != 2 or a.shape[0] != a.shape[1] or not a.flags.f_contiguous:
    raise ValueError(f"a: expected a Fortran-ordered square matrix, got {a.shape}")
  if not a.flags.writeable:
    raise ValueError("a: read-only (it is factored in place)")
  if a.dtype == np.float32:
    prefix, scalar = "s", ctypes.c_float
  elif a.dtype == np.float64:
    prefix, scalar = "d", ctypes.c_double
  else:
    raise ValueError(f"a: expected float32 or float64, got {a.dtype}")
  if block < 1:
    raise ValueError(f"block must be >= 1, got {block}")
  potrf = _routine("lapack", prefix + "potrf", 5)
  trsm = _routine("blas", prefix + "trsm", 11)
  gemm = _routine("blas", prefix + "gemm", 13)
  n, base, size = a.shape[0], a.ctypes.data, a.itemsize
  one, minus_one = ctypes.byref(scalar(1.0)), ctypes.byref(scalar(-1.0))

  def at(row: int, col: int):
    return ctypes.c_void_p(base + (row + col * n) * size)

  info = ctypes.c_int(0)
  for k in range(0, n, block):
    kb = min(block, n - k)
    potrf(_char("L"), _int(kb), at(k, k), _int(n), ctypes.byref(info))
    if info.value:
      return k + info.value
    below = n - k - kb
    if below:
      # L21 = A21 L11^-T, then A22 -= L21 L21^T by strips (gemm: syrk crashes, above).
      trsm(_char("R"), _char("L"), _char("T"), _char("N"), _int(below), _int(kb), one,
           at(k, k), _int(n), at(k + kb, k), _int(n))
      for j in range(k + kb, n, block):
        jb = min(block, n - j)
        gemm(_char("N"), _char("T"), _int(n - j), _int(jb), _int(kb), minus_one,
             at(j, k), _int(n), at(j, k), _int(n), one, at(j, j), _int(n))
  step = max(1, min(1024, -(-n // 8)))  # np.tril's copy: at most n^2 / 64 values
  for j in range(0, n, step):  # the strict upper triangle, as potrf's clean=1
    a[:j, j:j + step] = 0
    diagonal = a[j:j + step, j:j + step]
    diagonal[...] = np.tril(diagonal)
  return 0
