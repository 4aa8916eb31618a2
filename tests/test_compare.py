"""Per-user test results, paired comparisons and their statistics."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from jax_vaecf.evaluation import catalogue
from jax_vaecf.evaluation import per_user
from jax_vaecf.evaluation import significance

import _tools
import _runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------- statistics


def test_paired_comparison_against_the_formulas():
  rng = np.random.default_rng(0)
  a = rng.random(300)
  b = a + 0.02 + 0.1 * rng.standard_normal(300)
  row = significance.paired_comparison(a, b, n_boot=4000, seed=1)
  d = b - a
  assert row["diff"] == pytest.approx(d.mean()) and row["n_users"] == 300
  # Student's paired t by hand.
  t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
  assert row["p_ttest"] == pytest.approx(2 * stats.t.sf(abs(t), d.size - 1), rel=1e-9)
  # The bootstrap interval is close to the normal one, mean +- 1.96 se.
  se = d.std(ddof=0) / math.sqrt(d.size)
  assert row["ci_low"] == pytest.approx(d.mean() - 1.96 * se, abs=0.3 * se)
  assert row["ci_high"] == pytest.approx(d.mean() + 1.96 * se, abs=0.3 * se)
  assert row["significant"] == (row["ci_low"] > 0 and row["p_ttest"] < 0.05)
  assert row["significant"] and significance.verdict(row, "A", "B") == "B higher"
  # The same values: no difference, p = 1, and the verdict says why.
  same = significance.paired_comparison(a, a.copy())
  assert same["diff"] == 0 and same["p_ttest"] == 1.0 and not same["significant"]
  assert significance.verdict(same, "A", "B") == (
      "no significant difference over users (the 95% interval [+0.0000, +0.0000] covers "
      "0; paired t p = 1 >= 0.05)")
  # A clear loss.
  worse = significance.paired_comparison(a, a - 0.1 - 0.01 * rng.random(300))
  assert worse["significant"] and significance.verdict(worse, "A", "B") == "A higher"
  # Seeded: the interval repeats.
  assert significance.paired_comparison(a, b, seed=3) == significance.paired_comparison(
      a, b, seed=3)


def test_seed_comparison_is_welch():
  a, b = np.array([0.41, 0.42, 0.415, 0.418]), np.array([0.425, 0.43, 0.424])
  got = significance.seed_comparison(a, b)
  va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 3
  df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
  half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
  assert got["diff"] == pytest.approx(b.mean() - a.mean())
  assert got["ci_high"] - got["ci_low"] == pytest.approx(2 * half)
  t = (b.mean() - a.mean()) / math.sqrt(va + vb)
  assert got["p_welch"] == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-6)
  assert significance.seed_comparison(a[:1], b) is None


# ------------------------------------------------------------------ the tool


def _fake_run(folder, values, split=None, seed=0, model="multvae", first_user=100):
  """A test_users.npz with ndcg@100 = ``values`` (NaN: not counted); its folder."""
  os.makedirs(folder, exist_ok=True)
  values = np.asarray(values, np.float64)
  n = values.size
  counted = ~np.isnan(values)
  per_user.write(os.path.join(folder, per_user.FILE), np.arange(n) + first_user,
                 {"counted": counted, "n_heldout": counted.astype(np.int64),
                  "ndcg@100": values, "top": np.zeros((n, 3), np.int32)},
                 np.arange(5), np.ones(5, np.int64),
                 {"split": split or {"dataset": "x", "items_digest": "abc"},
                  "run": {"seed": seed, "model": model}})
  return str(folder)


def test_compare_runs_and_roots_of_seeds(tmp_path):
  from experiments import compare
  rng = np.random.default_rng(1)
  base = rng.random(200)
  base[7] = np.nan  # a user without held-out items: left out
  _fake_run(tmp_path / "a", base)
  # A root of two seeds: each user's value is their mean.
  s0, s1 = base + 0.05 + 0.01 * rng.random(200), base + 0.03
  _fake_run(tmp_path / "b" / "seed_0", s0)
  _fake_run(tmp_path / "b" / "seed_1", s1, seed=1)
  rows = compare.compare([str(tmp_path / "a"), str(tmp_path / "b")], ["ndcg@100"],
                         2000, 0)
  (row,) = rows
  keep = ~np.isnan(base)
  want = significance.paired_comparison(base[keep], ((s0 + s1) / 2)[keep], 2000, 0)
  assert {k: row[k] for k in want} == want
  assert row["n_users"] == 199 and row["b_seeds"] == 2 and row["a_seeds"] == 1
  # One seed on a side: the seed condition cannot apply, and the row says so.
  assert row["seeds"] is None and row["seed_rule"] == "1 v 2 seeds: users only"
  assert row["verdict"] == "b higher (users only: 1 v 2 seeds)"
  table = compare.format_table(rows, "verdict: the rule")
  assert "| ndcg@100 | " in table and "| 1 v 2 seeds: users only | - | b higher" in table
  assert table.splitlines()[4] == "verdict: the rule"  # under the table
  assert "ndcg@100: NDCG, ideal DCG over min(k, n)" in table  # the convention, by name
  # Another split is refused, naming what differs.
  _fake_run(tmp_path / "c", base, split={"dataset": "x", "items_digest": "zzz"})
  with pytest.raises(ValueError, match=r"tested on another split .*items_digest: 'abc' "
                     "against 'zzz'"):
    compare.compare([str(tmp_path / "a"), str(tmp_path / "c")], ["ndcg@100"], 200, 0)
  with pytest.raises(ValueError, match=r"no column 'map@7'"):
    compare.compare([str(tmp_path / "a"), str(tmp_path / "b")], ["map@7"], 200, 0)
  with pytest.raises(FileNotFoundError, match="no test_users.npz"):
    compare.compare([str(tmp_path / "a"), str(tmp_path)], ["ndcg@100"], 200, 0)
  # From the shell, with the JSON file.
  out = tmp_path / "cmp.json"
  r = subprocess.run([sys.executable, "-m", "experiments.compare", str(tmp_path / "a"),
                      str(tmp_path / "b"), "--bootstrap=2000", "--metrics=ndcg@100",
                      f"--out={out}"], cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  record = json.loads(out.read_text())
  assert record["rows"][0]["diff"] == pytest.approx(row["diff"])
  assert record["rule"] == significance.RULE.statement(1) in r.stdout.splitlines()


def test_a_test_writes_every_user_and_the_catalogue_metrics(tmp_path_factory):
  workdir = _runs.trained_workdir(tmp_path_factory, "peruser", test=True)
  columns, meta = per_user.read(os.path.join(workdir, per_user.FILE))
  test = [r for r in _runs.records(workdir) if r["split"] == "test"][-1]
  counted = columns["counted"]
  assert counted.sum() == test["n_users"] and (~counted).sum() == test["n_excluded"]
  for name in ("ndcg@10", "recall@5", "recalln@10", "map@10", "mrr@5", "precision@5",
               "hitrate@10"):
    assert np.mean(columns[name][counted]) == pytest.approx(test[name], rel=1e-12), name
    assert np.isnan(columns[name][~counted]).all()
  assert columns["top"].shape == (counted.size, 100)
  assert meta["split"]["n_test_users"] == counted.size == columns["user_id"].size
  assert meta["epoch"] == test["epoch"]
  # The catalogue metrics of the record are those of the file's top-k lists.
  again = catalogue.catalogue_metrics(columns["top"], columns["popularity"],
                                      meta["split"]["n_train_users"], (5, 10))
  for name, value in again.items():
    assert test[name] == pytest.approx(value), name
  assert columns["popularity"].sum() > 0 and columns["item_ids"].size == \
      meta["split"]["n_items"]


def test_plots_of_two_runs(tmp_path):
  pytest.importorskip("matplotlib")
  rng = np.random.default_rng(2)
  _fake_run(tmp_path / "a", rng.random(50))
  _fake_run(tmp_path / "b", rng.random(50))
  out = tmp_path / "plots"
  r = subprocess.run([sys.executable, "-m", "experiments.plot",
                      f"--runs={tmp_path / 'a'},{tmp_path / 'b'}", "--k=2",
                      f"--out_dir={out}"], cwd=REPO, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr
  for name in ("per_user.png", "popularity.png"):
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 400 and height > 300
  _fake_run(tmp_path / "c", rng.random(50), split={"dataset": "y"})
  r = _tools.run("experiments.plot", f"--runs={tmp_path / 'a'},{tmp_path / 'c'}",
                 f"--out_dir={out}")
  assert r.returncode == 1 and "tested on another split" in r.stderr
