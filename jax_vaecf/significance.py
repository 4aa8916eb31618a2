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
  """Percentile ``1 - alpha`` interval of the mean of ``d`` (n,) over ``n_boot``
  resamples of its entries with replacement (``numpy.random.default_rng(seed)``)."""
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
  """``b`` against ``a``, both float (n,) over the same users in the same order.

  Returns ``{"n_users", "a", "b", "diff", "ci_low", "ci_high", "p_ttest",
  "p_wilcoxon", "significant"}``: the means, ``diff = mean(b - a)``, its bootstrap
  interval, the p-values, and whether the interval excludes 0 and the t-test's p is
  below ``alpha``.
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
  """Welch's comparison of two sets of per-seed means (each (s,), s >= 2): ``{"diff",
  "ci_low", "ci_high", "p_welch"}``; None with fewer than two seeds on a side."""
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
  """One word or three for a :func:`paired_comparison` row."""
  if not row["significant"]:
    return "no significant difference"
  return f"{name_b} higher" if row["diff"] > 0 else f"{name_a} higher"
