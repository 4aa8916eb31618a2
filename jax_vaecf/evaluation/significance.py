"""Paired comparison of two models tested on the same users.

For a metric with per-user values ``a_u`` (model A) and ``b_u`` (model B) over the same
``n`` users, :func:`paired_comparison` reports the mean difference ``d = mean(b_u -
a_u)``, its 95% confidence interval by the paired bootstrap over users (resampling
users with replacement, ``n_boot`` times, seeded; percentile interval), and two paired
tests' p-values: Student's paired t-test and the Wilcoxon signed-rank test
(``scipy.stats``). With several training seeds per model, a user's value is first
averaged over the model's seeds, and :func:`seed_comparison` adds the comparison over
seeds: the difference of the seed means with Welch's t interval and test.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

ALPHA = 0.05


def bootstrap_mean_ci(d: np.ndarray, n_boot: int = 10_000, seed: int = 0,
                      alpha: float = ALPHA, chunk: int = 1_000) -> tuple[float, float]:
  """Percentile bootstrap interval of a mean.

  Args:
    d: ``(n,)`` values (per-user differences), any float dtype.
    n_boot: resamples of ``d``'s entries with replacement.
    seed: seed of ``numpy.random.default_rng``.
    alpha: the interval covers ``1 - alpha``.
    chunk: resamples drawn at a time (bounds memory to ``chunk * n`` indices).

  Returns:
    ``(low, high)`` floats; ``(nan, nan)`` for an empty ``d``.
  """
  d = np.asarray(d, np.float64)
  if d.size == 0:
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  means = np.empty(n_boot)
  for lo in range(0, n_boot, chunk):
    hi = min(lo + chunk, n_boot)
    means[lo:hi] = d[rng.integers(0, d.size, (hi - lo, d.size))].mean(axis=1)
  low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
  return float(low), float(high)


def paired_comparison(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, seed: int = 0,
                      alpha: float = ALPHA) -> dict:
  """Model ``b`` against model ``a`` on one metric, user by user.

  Args:
    a: float ``(n,)`` per-user values of model A.
    b: float ``(n,)`` per-user values of model B, the same users in the same order.
    n_boot: bootstrap resamples (:func:`bootstrap_mean_ci`).
    seed: seed of the bootstrap.
    alpha: the interval covers ``1 - alpha``; the tests' level.

  Returns:
    ``{"n_users", "a", "b", "diff", "ci_low", "ci_high", "p_ttest", "p_wilcoxon",
    "significant"}``: the user count, the means, ``diff = mean(b - a)``, its bootstrap
    interval, the paired t-test's and Wilcoxon's p-values (1.0 when no user differs or
    fewer than two users), and whether the interval excludes 0 and the t-test's p is
    below ``alpha`` (a bool).

  Raises:
    ValueError: ``a`` and ``b`` are not two 1-D arrays of one shape.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"expected two (n,) arrays over the same users, got {a.shape} and "
                     f"{b.shape}")
  d = b - a
  low, high = bootstrap_mean_ci(d, n_boot, seed, alpha)
  if d.size < 2 or not np.any(d):
    p_t = p_w = 1.0  # no difference at all (or too few users to test one)
  else:
    p_t = float(stats.ttest_rel(b, a).pvalue)
    p_w = float(stats.wilcoxon(d).pvalue)
  return {"n_users": int(d.size), "a": float(a.mean()), "b": float(b.mean()),
          "diff": float(d.mean()), "ci_low": low, "ci_high": high, "p_ttest": p_t,
          "p_wilcoxon": p_w,
          "significant": bool((low > 0 or high < 0) and p_t < alpha)}


def seed_comparison(a_seeds: np.ndarray, b_seeds: np.ndarray, alpha: float = ALPHA
                    ) -> dict | None:
  """Welch's comparison of two models' per-seed means.

  Args:
    a_seeds: float ``(s_a,)``: model A's mean metric for each training seed.
    b_seeds: float ``(s_b,)``: model B's.
    alpha: the interval covers ``1 - alpha``.

  Returns:
    ``{"diff", "ci_low", "ci_high", "p_welch"}`` floats: ``mean(b) - mean(a)``, its
    Welch t interval and test's p-value; ``None`` with fewer than two seeds on a side.
  """
  a, b = np.asarray(a_seeds, np.float64), np.asarray(b_seeds, np.float64)
  if a.size < 2 or b.size < 2:
    return None
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  diff = float(b.mean() - a.mean())
  se = math.sqrt(va + vb)
  if se == 0:
    return {"diff": diff, "ci_low": diff, "ci_high": diff,
            "p_welch": 1.0 if diff == 0 else 0.0}
  df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
  half = float(stats.t.ppf(1 - alpha / 2, df)) * se
  return {"diff": diff, "ci_low": diff - half, "ci_high": diff + half,
          "p_welch": float(stats.ttest_ind(b, a, equal_var=False).pvalue)}


def verdict(row: dict, name_a: str, name_b: str) -> str:
  """The outcome of a comparison in words.

  Args:
    row: a :func:`paired_comparison` result.
    name_a: model A's name.
    name_b: model B's name.

  Returns:
    ``"no significant difference"`` or ``"<name> higher"``.
  """
  if not row["significant"]:
    return "no significant difference"
  return f"{name_b} higher" if row["diff"] > 0 else f"{name_a} higher"
