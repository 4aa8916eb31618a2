"""Paired comparison of two models tested on the same users.

For a metric with per-user values ``a_u`` (model A) and ``b_u`` (model B) over the same
``n`` users, :func:`paired_comparison` reports the mean difference ``d = mean(b_u -
a_u)``, its 95% confidence interval by the paired bootstrap over users (resampling
users with replacement, ``n_boot`` times, seeded; percentile interval), and two paired
tests' p-values: Student's paired t-test and the Wilcoxon signed-rank test
(``scipy.stats``). With several training seeds per model, a user's value is first
averaged over the model's seeds, and :func:`seed_comparison` adds the comparison over
seeds: the difference of the seed means with Welch's t interval and test.

Which of these numbers decides is one object, :class:`Rule` (``RULE``, the default), whose
:meth:`Rule.statement` is the one line a report prints under its table:
:func:`compare_users` applies it to one metric, :func:`compare_metrics` to the several
metrics of one pair (Holm's correction across them), and :func:`verdict` puts the outcome
in words, the reason included when the rule says no.
"""

from __future__ import annotations

import dataclasses
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
    "alpha", "significant"}``: the user count, the means, ``diff = mean(b - a)``, its
    bootstrap interval, the paired t-test's and Wilcoxon's p-values (1.0 when no user
    differs or fewer than two users), ``alpha``, and whether the interval excludes 0 and
    the t-test's p is below ``alpha`` (a bool; Wilcoxon's p does not decide).

  Raises:
    ValueError: ``a`` and ``b`` are not two 1-D arrays of one shape, or hold a value
      that is not finite.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"expected two (n,) arrays over the same users, got {a.shape} and "
                     f"{b.shape}")
  for name, values in (("a", a), ("b", b)):
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:  # NaN marks a user not counted: it would make every statistic NaN
      raise ValueError(f"{name}: {bad} of {values.size} per-user values are not finite; "
                       "pass only the users counted in both runs")
  d = b - a
  low, high = bootstrap_mean_ci(d, n_boot, seed, alpha)
  if d.size < 2 or not np.any(d):
    p_t = p_w = 1.0  # no difference at all (or too few users to test one)
  else:
    p_t = float(stats.ttest_rel(b, a).pvalue)
    p_w = float(stats.wilcoxon(d).pvalue)
  return {"n_users": int(d.size), "a": float(a.mean()), "b": float(b.mean()),
          "diff": float(d.mean()), "ci_low": low, "ci_high": high, "p_ttest": p_t,
          "p_wilcoxon": p_w, "alpha": alpha,
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


CORRECTIONS = ("holm", "none")


@dataclasses.dataclass(frozen=True)
class Rule:
  """When model B's difference from model A on a metric counts as significant.

  Over users: the ``1 - alpha`` bootstrap interval of ``mean(b - a)`` excludes 0 and the
  paired t-test's p is below ``alpha``; Wilcoxon's p is reported, never decisive. Over
  seeds, with at least ``min_seeds`` training seeds on each side: Welch's test of the
  seed means must also give p below ``alpha``. The two conditions answer two questions
  (would other test users, would other training seeds, show the difference?) and the
  verdict needs both; with fewer seeds the seed spread is unknown and the verdict rests
  on the users alone, and says so.

  Attributes:
    alpha: the level of every test; the intervals cover ``1 - alpha``.
    min_seeds: the seeds each side needs for the seed condition (Welch's test needs a
      variance on both sides: 2 or more).
    correction: ``"holm"``: the deciding p-values (paired t, Welch) of the metrics of
      one pair are adjusted together by Holm's step-down method (the intervals are not
      adjusted); ``"none"``: each metric is tested on its own.
  """
  alpha: float = ALPHA
  min_seeds: int = 2
  correction: str = "holm"

  def __post_init__(self):
    if not 0 < self.alpha < 1:
      raise ValueError(f"Rule.alpha must be in (0, 1), got {self.alpha}")
    if self.min_seeds < 2:
      raise ValueError(f"Rule.min_seeds must be >= 2 (Welch needs two seeds a side), "
                       f"got {self.min_seeds}")
    if self.correction not in CORRECTIONS:
      raise ValueError(f"Rule.correction must be one of {CORRECTIONS}, got "
                       f"{self.correction!r}")

  def statement(self, n_metrics: int = 1) -> str:
    """The rule in one line, for under a table of ``n_metrics`` metrics per pair.

    Args:
      n_metrics: the metrics compared for each pair of models.

    Returns:
      ``"verdict: ..."``, one line.
    """
    level, conf = f"{self.alpha:g}", f"{100 * (1 - self.alpha):g}%"
    holm = self.correction == "holm" and n_metrics > 1
    t_test = (f"the paired t-test p, Holm-adjusted over the {n_metrics} metrics of the "
              f"pair, is < {level}" if holm else f"the paired t-test p < {level}")
    seeds = (f"Welch's test over the seed means must also give p < {level} "
             "(Holm-adjusted likewise; intervals unadjusted)" if holm else
             f"the {conf} Welch interval of B - A over the seed means must also "
             "exclude 0")
    tail = ("" if holm or n_metrics == 1 else
            f"; each of the {n_metrics} metrics is tested on its own (no correction for "
            "testing several)")
    return (f"verdict: B - A is significant when its {conf} bootstrap interval over "
            f"users excludes 0 and {t_test} (Wilcoxon shown for reference, it does not "
            f"decide); with >= {self.min_seeds} seeds on each side, {seeds}, else users "
            "only" + tail)


RULE = Rule()


def holm(p_values) -> np.ndarray:
  """Holm's step-down adjustment of p-values tested together.

  Args:
    p_values: float ``(m,)``.

  Returns:
    float64 ``(m,)``: each adjusted p-value (reject at level ``alpha`` where it is below
    ``alpha``: the family-wise error rate is at most ``alpha`` under any dependence).
  """
  p = np.asarray(p_values, np.float64)
  order = np.argsort(p, kind="stable")
  steps = (p.size - np.arange(p.size)) * p[order]
  out = np.empty_like(p)
  out[order] = np.minimum(1.0, np.maximum.accumulate(steps))
  return out


def _seed_means(means, values: np.ndarray, name: str) -> np.ndarray | None:
  if means is None:
    return None
  means = np.asarray(means, np.float64)
  if means.ndim != 1 or not means.size:
    raise ValueError(f"{name}: expected (seeds,) means, got shape {means.shape}")
  # A user's value is the mean over the seeds, so the two means agree when both were
  # taken over the same users; otherwise the seed test would compare other users.
  if not np.isclose(means.mean(), values.mean(), rtol=1e-9, atol=1e-12):
    raise ValueError(f"{name}: the seed means average {means.mean():.6g}, the per-user "
                     f"values {values.mean():.6g}; take both over the same users")
  return means


def compare_users(a_values: np.ndarray, b_values: np.ndarray, seeds_a=None, seeds_b=None,
                  *, name_a: str = "A", name_b: str = "B", n_boot: int = 10_000,
                  seed: int = 0, rule: Rule = RULE) -> dict:
  """Model B against model A on one metric, over users and, given seeds, over seeds.

  Args:
    a_values: float ``(n,)``: model A's value of the metric per user (with several
      training seeds, each user's mean over them).
    b_values: float ``(n,)``: model B's, the same users in the same order.
    seeds_a: float ``(s_a,)``: model A's mean over those users for each training seed,
      or ``None`` for a single seed.
    seeds_b: float ``(s_b,)``: likewise for model B.
    name_a: model A's name, for the verdict.
    name_b: model B's name.
    n_boot: bootstrap resamples of the users.
    seed: seed of the bootstrap.
    rule: what decides (:class:`Rule`).

  Returns:
    :func:`paired_comparison`'s dict, plus ``"a_seeds"``, ``"b_seeds"`` (counts),
    ``"seeds"`` (:func:`seed_comparison`'s dict where the seed condition applies, else
    ``None``), ``"seed_rule"`` (``"applied"`` or why not, e.g. ``"1 v 3 seeds: users
    only"``), ``"users_significant"``, ``"seeds_significant"`` (``None`` where not
    applied), ``"significant"`` (the rule's decision) and ``"verdict"`` (words).

  Raises:
    ValueError: the arrays do not match, hold non-finite values, or the seed means were
      not taken over the users of the per-user values.
  """
  row = paired_comparison(a_values, b_values, n_boot, seed, rule.alpha)
  means_a = _seed_means(seeds_a, np.asarray(a_values, np.float64), "seeds_a")
  means_b = _seed_means(seeds_b, np.asarray(b_values, np.float64), "seeds_b")
  n_a = 1 if means_a is None else means_a.size
  n_b = 1 if means_b is None else means_b.size
  applies = min(n_a, n_b) >= rule.min_seeds
  row.update(a_seeds=n_a, b_seeds=n_b,
             seeds=seed_comparison(means_a, means_b, rule.alpha) if applies else None,
             seed_rule="applied" if applies else _seed_count(n_a, n_b) + ": users only")
  return _decide(row, name_a, name_b)


def compare_metrics(rows: list[dict], name_a: str = "A", name_b: str = "B",
                    rule: Rule = RULE) -> list[dict]:
  """The decisions on several metrics of one pair of models, corrected together.

  Args:
    rows: one :func:`compare_users` result per metric, all of the same two models.
    name_a: model A's name, for the verdicts.
    name_b: model B's name.
    rule: its ``correction`` says whether the metrics' p-values are Holm-adjusted.

  Returns:
    New dicts, one per row: with ``"holm"`` and several rows, ``"p_ttest_adjusted"``
    (and ``"p_welch_adjusted"`` in ``"seeds"``) added, and the decisions and verdict
    taken on the adjusted p-values; otherwise copies of ``rows``.
  """
  rows = [dict(r, seeds=dict(r["seeds"]) if r.get("seeds") else r.get("seeds"))
          for r in rows]
  if rule.correction != "holm" or len(rows) < 2:
    return rows
  for r, p in zip(rows, holm([r["p_ttest"] for r in rows])):
    r["p_ttest_adjusted"] = float(p)
  with_seeds = [r for r in rows if r.get("seeds")]
  for r, p in zip(with_seeds, holm([r["seeds"]["p_welch"] for r in with_seeds])):
    r["seeds"]["p_welch_adjusted"] = float(p)
  return [_decide(r, name_a, name_b) for r in rows]


def _p(row: dict, key: str) -> tuple[float, str]:
  """A deciding p-value: the adjusted one where there is one, and how to name it."""
  if f"{key}_adjusted" in row:
    return row[f"{key}_adjusted"], " (Holm)"
  return row[key], ""


def _seed_count(n_a: int, n_b: int) -> str:
  return "1 seed" if n_a == n_b == 1 else f"{n_a} v {n_b} seeds"


def _decide(row: dict, name_a: str, name_b: str) -> dict:
  alpha = row.get("alpha", ALPHA)
  row["users_significant"] = not _users_reasons(row)
  seeds = row.get("seeds")
  row["seeds_significant"] = None if not seeds else bool(_p(seeds, "p_welch")[0] < alpha)
  row["significant"] = bool(row["users_significant"] and row["seeds_significant"] in
                            (None, True))
  row["verdict"] = verdict(row, name_a, name_b)
  return row


def _users_reasons(row: dict) -> list[str]:
  """Why the users condition fails (empty: it holds)."""
  alpha = row.get("alpha", ALPHA)
  reasons = []
  if not (row["ci_low"] > 0 or row["ci_high"] < 0):
    reasons.append(f"the {100 * (1 - alpha):g}% interval [{row['ci_low']:+.4f}, "
                   f"{row['ci_high']:+.4f}] covers 0")
  p_t, how = _p(row, "p_ttest")
  if not p_t < alpha:
    reasons.append(f"paired t p = {p_t:.2g}{how} >= {alpha:g}")
  return reasons


def verdict(row: dict, name_a: str, name_b: str) -> str:
  """The outcome of a comparison in words, with the reason where it is not significant.

  Args:
    row: a :func:`paired_comparison`, :func:`compare_users` or :func:`compare_metrics`
      result.
    name_a: model A's name.
    name_b: model B's name.

  Returns:
    ``"<name> higher"`` (a bare :func:`paired_comparison` row),
    ``"<name> higher over users and over seeds (3 v 3 seeds)"``, ``"<name> higher
    (users only: 1 v 3 seeds)"``, ``"<name> higher over users, not over seeds (3 v 3
    seeds: Welch p = ...)"``, or ``"no significant difference over users
    (<reasons>)"``, where a Wilcoxon p below ``alpha`` is named as not deciding and a
    seed difference alone is named as not enough.
  """
  alpha = row.get("alpha", ALPHA)
  higher = f"{name_b if row['diff'] > 0 else name_a} higher"
  seeds, reasons = row.get("seeds"), _users_reasons(row)
  counts = _seed_count(row.get("a_seeds", 1), row.get("b_seeds", 1))
  p_w, how_w = _p(seeds, "p_welch") if seeds else (1.0, "")
  if reasons:
    words = f"no significant difference over users ({'; '.join(reasons)})"
    if row["p_wilcoxon"] < alpha:
      words += (f"; Wilcoxon p = {row['p_wilcoxon']:.2g} < {alpha:g} is shown for "
                "reference and does not decide")
    if seeds and p_w < alpha:
      words += (f"; {higher} over seeds ({counts}: Welch p = {p_w:.2g}{how_w}), but the "
                "rule needs both")
    return words
  if seeds:
    if p_w < alpha:
      return f"{higher} over users and over seeds ({counts})"
    return (f"{higher} over users, not over seeds ({counts}: Welch p = {p_w:.2g}{how_w} "
            f">= {alpha:g})")
  return higher if "a_seeds" not in row else f"{higher} (users only: {counts})"
