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


def test_the_rule_states_itself_and_refuses_nonsense():
  three = significance.RULE.statement(3)
  assert three.startswith("verdict: B - A is significant when its 95% bootstrap interval")
  for words in ("Holm-adjusted over the 3 metrics", "Wilcoxon shown for reference, it "
                "does not decide", "with >= 2 seeds on each side", "else users only"):
    assert words in three
  plain = significance.Rule(correction="none").statement(3)
  assert "Holm" not in plain and plain.endswith(
      "each of the 3 metrics is tested on its own (no correction for testing several)")
  assert "95% Welch interval" in plain
  with pytest.raises(ValueError, match="alpha must be in"):
    significance.Rule(alpha=0)
  with pytest.raises(ValueError, match="min_seeds must be >= 2"):
    significance.Rule(min_seeds=1)
  with pytest.raises(ValueError, match="correction must be one of"):
    significance.Rule(correction="bonferroni")


def test_holm_by_hand():
  # Sorted 0.01, 0.03, 0.04 times 3, 2, 1 is 0.03, 0.06, 0.04; then the running maximum.
  assert significance.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
  assert significance.holm([0.6, 0.002]) == pytest.approx([0.6, 0.004])
  assert significance.holm([0.7, 0.8]) == pytest.approx([1.0, 1.0])  # 0.7 * 2, capped


def test_paired_comparison_refuses_users_not_counted():
  a = np.array([0.1, np.nan, 0.3])
  with pytest.raises(ValueError, match=r"a: 1 of 3 per-user values are not finite"):
    significance.paired_comparison(a, np.array([0.2, 0.2, 0.2]))


def test_wilcoxon_alone_does_not_decide():
  # Many small gains, a few larger losses: the signed ranks favour B, the mean barely.
  a = np.linspace(0.2, 0.6, 100)
  b = a + np.where(np.arange(100) < 80, 0.01, -0.03)
  row = significance.compare_users(a, b, n_boot=2000)
  assert row["p_wilcoxon"] < 0.05 <= row["p_ttest"] and row["ci_low"] < 0 < row["ci_high"]
  assert not row["significant"] and not row["users_significant"]
  assert row["verdict"] == (
      f"no significant difference over users (the 95% interval [{row['ci_low']:+.4f}, "
      f"{row['ci_high']:+.4f}] covers 0; paired t p = {row['p_ttest']:.2g} >= 0.05); "
      f"Wilcoxon p = {row['p_wilcoxon']:.2g} < 0.05 is shown for reference and does not "
      "decide")


def _seeded(rng, base, offsets, noise=0.002):
  """(seeds, users): ``base`` plus one offset per seed plus a little per-user noise."""
  return np.stack([base + o + noise * rng.standard_normal(base.size) for o in offsets])


def test_the_seed_rule():
  rng = np.random.default_rng(5)
  base = rng.random(300)
  a = _seeded(rng, base, [0.0, 0.001, -0.001])
  wobbly = _seeded(rng, base, [0.03, -0.01, 0.01])  # +0.01 on average, seeds disagree
  steady = _seeded(rng, base, [0.011, 0.009, 0.010])
  both = dict(n_boot=1000, name_a="a", name_b="b")

  def seeds_of(x):
    return x.mean(axis=0), x.mean(axis=1)

  (ua, sa), (uw, sw), (us, ss) = map(seeds_of, (a, wobbly, steady))
  row = significance.compare_users(ua, uw, sa, sw, **both)
  welch = significance.seed_comparison(sa, sw)
  assert row["users_significant"] and row["seeds"] == welch and welch["p_welch"] >= 0.05
  assert row["seed_rule"] == "applied" and not row["significant"]
  assert row["verdict"] == (f"b higher over users, not over seeds (3 v 3 seeds: Welch "
                            f"p = {welch['p_welch']:.2g} >= 0.05)")
  # The seed means are over the same users: the two differences are one number.
  assert welch["diff"] == pytest.approx(row["diff"], abs=1e-12)
  row = significance.compare_users(ua, us, sa, ss, **both)
  assert row["significant"]
  assert row["verdict"] == "b higher over users and over seeds (3 v 3 seeds)"
  # One seed on a side: users only, said.
  row = significance.compare_users(a[0], us, None, ss, **both)
  assert row["seeds"] is None and row["seed_rule"] == "1 v 3 seeds: users only"
  assert row["significant"] and row["verdict"] == "b higher (users only: 1 v 3 seeds)"
  # The other way round: steady seeds, but users too noisy to tell.
  noisy = _seeded(rng, base + 0.2 * rng.standard_normal(base.size), [0.01, 0.0101, 0.0099])
  (un, sn), = map(seeds_of, (noisy,))
  row = significance.compare_users(ua, un, sa, sn, **both)
  assert row["seeds_significant"] and not row["users_significant"]
  assert not row["significant"] and row["verdict"].startswith(
      "no significant difference over users (the 95% interval")
  assert row["verdict"].endswith(
      f"; b higher over seeds (3 v 3 seeds: Welch p = {row['seeds']['p_welch']:.2g}), but "
      "the rule needs both")
  # Seed means over other users than the per-user values are refused.
  with pytest.raises(ValueError,
                     match="seeds_b: the seed means average .* take both over"):
    significance.compare_users(ua, us, sa, ss + 0.01, **both)


def test_holm_across_the_metrics_of_a_pair():
  # Two metrics, each with paired t = 2.2 over 100 users (p = 0.03): significant one by
  # one, not together (Holm: 0.03 * 2 = 0.06 for the smaller, 0.06 for the other).
  a = np.linspace(0.2, 0.6, 100)
  e = np.where(np.arange(100) % 2 == 0, 0.01, -0.01)
  shift = 2.2 * np.std(e, ddof=1) / 10
  rows = [significance.compare_users(a, a + shift + e, n_boot=2000),
          significance.compare_users(a[::-1], a[::-1] + shift + e, n_boot=2000)]
  assert all(0.025 < r["p_ttest"] < 0.035 and r["significant"] for r in rows)
  alone = significance.compare_metrics(rows, rule=significance.Rule(correction="none"))
  assert [r["verdict"] for r in alone] == ["B higher (users only: 1 seed)"] * 2
  together = significance.compare_metrics(rows)
  for r, p in zip(together, significance.holm([r["p_ttest"] for r in rows])):
    assert r["p_ttest_adjusted"] == p >= 0.05 and not r["significant"]
    assert r["verdict"] == (
        f"no significant difference over users (paired t p = {p:.2g} (Holm) >= 0.05); "
        f"Wilcoxon p = {r['p_wilcoxon']:.2g} < 0.05 is shown for reference and does not "
        "decide")
  assert rows[0]["significant"] and "p_ttest_adjusted" not in rows[0]  # not changed


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


def _seed_lists(tmp_path, rng, n=120):
  """Model a as three sibling folders a_s0..2, model b as a root of seed_0..2: b is
  higher by 0.01 over users, but its seeds disagree (+0.03, -0.01, +0.01)."""
  base = rng.random(n)
  a = [_fake_run(tmp_path / f"a_s{s}", base + o + 0.002 * rng.standard_normal(n), seed=s)
       for s, o in enumerate([0.0, 0.001, -0.001])]
  for s, o in enumerate([0.03, -0.01, 0.01]):
    _fake_run(tmp_path / "b" / f"seed_{s}", base + o + 0.002 * rng.standard_normal(n),
              seed=s)
  return a, str(tmp_path / "b")


def test_the_tool_compares_seeds_and_states_its_rule(tmp_path):
  a, b = _seed_lists(tmp_path, np.random.default_rng(3))
  out = tmp_path / "cmp.json"
  r = _tools.run("experiments.compare", ",".join(a), b, "--bootstrap=500",
                 "--metrics=ndcg@100", f"--out={out}")
  assert r.returncode == 0, r.stderr
  record = json.loads(out.read_text())
  rule = significance.RULE.statement(1)
  assert record["rule"] == rule and rule in r.stdout.splitlines()
  assert record["rule_settings"] == {"alpha": 0.05, "min_seeds": 2, "correction": "holm"}
  (row,) = record["rows"]
  assert row["a_seeds"] == row["b_seeds"] == 3 and row["seed_rule"] == "applied"
  assert row["users_significant"] and not row["significant"]
  assert row["verdict"].startswith("b higher over users, not over seeds (3 v 3 seeds: ")
  assert f"| {row['verdict']} |" in r.stdout  # the side of sibling runs is named "a"
  assert r.stdout.startswith(f"B = {b} (3 seeds) against A = {','.join(a)} (3 seeds), "
                             "120 test users:")
  # The list side is each user's mean over the three runs.
  want = np.mean([per_user.read(os.path.join(f, per_user.FILE))[0]["ndcg@100"]
                  for f in a], axis=0).mean()
  assert row["a"] == pytest.approx(want, rel=1e-12)


def test_a_side_that_is_not_one_models_seeds_is_refused(tmp_path):
  from experiments import compare
  rng = np.random.default_rng(4)
  a, b = _seed_lists(tmp_path, rng)
  values = rng.random(120)
  for name, kwargs, message in [
      ("other_split", dict(split={"dataset": "x", "items_digest": "zzz"}, seed=7),
       r"other_split/test_users.npz was tested on another split than .*a_s0/test_users"
       r".npz \(items_digest: 'abc' against 'zzz'\)"),
      ("other_users", dict(seed=7, first_user=500),
       r"other_users/test_users.npz: other test users than .*a_s0"),
      ("same_seed", dict(seed=1), r"same_seed.*: seed 1, as .*a_s1.*different training "
       "seeds"),
      ("other_model", dict(seed=7, model="recvae"), r"model 'recvae', but .* is "
       "'multvae'; a side is one model's seeds")]:
    bad = _fake_run(tmp_path / name, values, **kwargs)
    with pytest.raises(ValueError, match=message):
      compare.compare([",".join(a + [bad]), b], ["ndcg@100"], 100, 0)
  with pytest.raises(ValueError,
                     match=r"a_s0/test_users.npz is listed twice in one side"):
    compare.compare([",".join(a + [a[0] + "/"]), b], ["ndcg@100"], 100, 0)
  with pytest.raises(ValueError, match=r"an empty entry"):
    compare.compare([a[0] + ",", b], ["ndcg@100"], 100, 0)
  with pytest.raises(ValueError, match=r"share .*seed_0.*must be separate runs"):
    compare.compare([b, b + "/seed_0"], ["ndcg@100"], 100, 0)
  # From the command line: one line on stderr, status 1.
  r = _tools.run("experiments.compare", ",".join(a + [a[1]]), b, "--bootstrap=100")
  assert r.returncode == 1 and r.stdout == "" and len(r.stderr.splitlines()) == 1


def test_sibling_seeds_are_not_two_models_unless_asked(tmp_path):
  a, b = _seed_lists(tmp_path, np.random.default_rng(5))
  r = _tools.run("experiments.compare", a[0], a[1], "--bootstrap=100")
  assert r.returncode == 1 and r.stderr.splitlines() == [
      f"error: {a[0]} and {a[1]} differ only by a seed suffix: two seeds of one model, "
      f"not two models; give a model's seeds as one argument, comma-separated "
      f"({a[0]},{a[1]}), or pass --allow_seed_siblings"]
  r = _tools.run("experiments.compare", a[0], a[1], "--bootstrap=100",
                 "--allow_seed_siblings", "--metrics=ndcg@100")
  assert r.returncode == 0, r.stderr
  assert "| 1 seed: users only | - |" in r.stdout
  assert f"B = {a[1]} (1 seed) against A = {a[0]} (1 seed)" in r.stdout
  # Folders that only end in digits, or that differ otherwise, are two models.
  from experiments import compare
  compare.check_not_seed_siblings(["runs/model1", "runs/model2", "runs/a_s0",
                                   "other/a_s1", "runs/b_s0", "runs/a_s0/refit"])
  for pair in (["r/x_seed1", "r/x_seed2"], ["r/seed_0", "r/seed_3"], ["r/x-3", "r/x-4"]):
    with pytest.raises(ValueError, match="differ only by a seed suffix"):
      compare.check_not_seed_siblings(pair)
