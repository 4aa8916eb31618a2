"""experiments.bench_sparse_ease in-process on a tiny synthetic shape: both sides' rows,
and the three scorers of the scoring table agreeing with the host's products."""

import re

import pytest

import _tools
from experiments import bench_sparse_ease as bench


@pytest.fixture
def tiny(monkeypatch):
  monkeypatch.setitem(bench.SHAPES, "tiny", (600, 300, 12.0, 5))
  # The peer's row must not depend on whether sansa is installed here.
  monkeypatch.setattr(bench, "sansa_problem", lambda: "not installed (test)")


def test_synthetic_and_scoring_rows_on_a_tiny_shape(tiny):
  r = _tools.run("experiments.bench_sparse_ease", "--sections=synthetic,scoring",
                 "--shapes=tiny", "--synthetic_density=0.05", "--score_users=50",
                 "--repeats=1")
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.splitlines()
  (ours,) = [l for l in lines if l.startswith("| tiny |") and "sparse EASE" in l]
  cells = [c.strip() for c in ours.split("|")[1:-1]]
  assert cells[1:3] == ["600", "300"]
  # 15 entries per column of each factor, at most: at most 2 * 15 * 300 weights.
  assert 0 < int(cells[5].replace(",", "")) <= 2 * 15 * 300
  assert any("sansa" in l and "not installed (test)" in l for l in lines)
  scoring = [l for l in lines if l.startswith("| tiny | 300 |")]
  assert len(scoring) == 3, r.stdout
  for line in scoring:
    assert "failed" not in line
    assert float(line.split("|")[-2]) <= 1e-5, line  # max difference to the host


def test_unknown_sections_and_sides_are_usage_errors():
  r = _tools.run("experiments.bench_sparse_ease", "--sections=nope")
  assert r.returncode == 2 and re.search(r"--sections: unknown \['nope'\]", r.stderr)
  r = _tools.run("experiments.bench_sparse_ease", "--sides=other")
  assert r.returncode == 2 and "--sides: unknown ['other']" in r.stderr
  r = _tools.run("experiments.bench_sparse_ease", "--sides=sansa", "--sections=scoring")
  assert r.returncode == 2 and "keep ours in --sides" in r.stderr


def test_the_yelp2018_rows_on_tiny_lightgcn_files(tiny, tmp_path):
  from experiments import synthetic
  x, _ = synthetic.make_dataset(n_users=300, n_items=120, n_eval_users=10,
                                mean_per_user=15.0, min_per_user=6, zipf=0.7)
  rng = __import__("numpy").random.default_rng(0)
  with open(tmp_path / "train.txt", "w") as train, open(tmp_path / "test.txt", "w") as test:
    for u in range(x.shape[0]):
      items = rng.permutation(x.indices[x.indptr[u]:x.indptr[u + 1]])
      cut = max(1, len(items) // 5)
      train.write(" ".join(map(str, [u, *items[cut:]])) + "\n")
      test.write(" ".join(map(str, [u, *items[:cut]])) + "\n")
  r = _tools.run("experiments.bench_sparse_ease", "--sections=yelp2018",
                 f"--data_dir_yelp2018={tmp_path}", f"--cache_dir={tmp_path / 'cache'}",
                 "--yelp2018_l2=20", "--yelp2018_densities=1.0,0.1")
  assert r.returncode == 0, r.stderr[-2000:]
  rows = {tuple(c.strip() for c in l.split("|")[1:3]): [c.strip() for c in l.split("|")[1:-1]]
          for l in r.stdout.splitlines() if l.startswith("| ") and not l.startswith("| model")}
  dense = rows[("dense EASE (float32, primal form)", "1")]
  exact = rows[("sparse EASE (gram_ratio 4, colamd)", "1")]
  # At density 1 sparse EASE is exact: the same metrics as the dense solver's, to rounding.
  for d, e in zip(dense[5:8], exact[5:8]):
    assert abs(float(d) - float(e)) <= 2e-4, (dense, exact)
  assert 0.0 < float(dense[5]) < 1.0
  cut = rows[("sparse EASE (gram_ratio 4, colamd)", "0.1")]
  assert int(cut[2].replace(",", "")) < int(exact[2].replace(",", ""))
  assert any("sansa" in l and "not installed (test)" in l for l in r.stdout.splitlines())
