"""The engine reports through a reporter and prints nothing itself; the command line's
reporter prints the lines the tools always printed."""

import ast
import glob
import os

import pytest

from jax_vaecf.training import engine as loop
from jax_vaecf.training import reporting

import _runs

LIBRARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "jax_vaecf")

# The one place the library writes lines itself: the HTTP server's request log, to the
# stream its command line hands to create_app (the command's choice, as a reporter is).
PENDING = {("serving/http.py", None)}


def _prints(path: str) -> list[tuple[str | None, int]]:
  """(enclosing top-level function, line) of every ``print(...)`` call in a file."""
  tree = ast.parse(open(path).read())
  found = []
  for top in tree.body:
    name = getattr(top, "name", None)
    for node in ast.walk(top):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id == "print"):
        found.append((name, node.lineno))
  return found


def test_the_library_prints_only_in_the_command_lines_reporter():
  stray = []
  for path in glob.glob(os.path.join(LIBRARY, "**", "*.py"), recursive=True):
    rel = os.path.relpath(path, LIBRARY)
    for function, line in _prints(path):
      allowed = ((rel, None) in PENDING or (rel, function) in PENDING
                 or (rel, function) == ("training/reporting.py", "print_record"))
      if not allowed:
        stray.append(f"{rel}:{line} ({function})")
  assert not stray, stray


def test_print_record_writes_the_lines_the_tools_printed(capsys):
  reporting.print_record({"event": "epoch", "record": {
      "epoch": 3, "loss": 591.0501, "beta": 0.2, "epoch_time_s": 1.5,
      "users_per_s": 1234.4, "val_ndcg@100": 0.4, "val_recall@20": 0.3,
      "val_recall@50": 0.5}})
  reporting.print_record({"event": "stopped", "epoch": 7, "reason": "asked"})
  reporting.print_record({"event": "preprocessing", "dataset": "ml-1m",
                          "stage": "reading", "seconds": 2.5})
  out, err = capsys.readouterr()
  assert out == ("epoch    3  loss   591.050  beta 0.2000  time    1.50s        1234 "
                 "users/s  val ndcg@100 0.4000  recall@20 0.3000  recall@50 0.5000\n"
                 "stopped after epoch 7: asked\n")
  assert err == "[   2.5s] preprocessing ml-1m: reading\n"  # progress notes: stderr


def test_a_test_record_prints_its_test_and_catalogue_lines(capsys):
  result = {"n_users": 59, "n_excluded": 1, "epoch": 28, "ndcg@20": 0.17444,
            "ndcg@20_se": 0.0225, "recall@20": 0.2305, "recall@20_se": 0.0298,
            "coverage@20": 0.5}
  reporting.print_record({"event": "test", "result": result, "ks": (20,)})
  assert capsys.readouterr().out == (
      "test (59 users, 1 without held-out items; best epoch 28): ndcg@20 0.1744 "
      "(+-0.0225)  recall@20 0.2305 (+-0.0298)\ncatalogue: coverage@20 0.5\n")


def test_an_unknown_event_is_refused_not_dropped():
  with pytest.raises(ValueError, match="unknown report event 'epochs'"):
    reporting.print_record({"event": "epochs"})


def test_a_run_reports_each_step_and_prints_nothing(tmp_path, capsys):
  data = _runs.movielens_dir_plain(tmp_path)
  cfg = _runs.small_config(data, cache_dir=str(tmp_path / "cache"), number_of_epochs=2,
                           early_stopping=0)
  got = []
  res = loop.run(cfg, str(tmp_path / "run"), report=got.append)
  assert capsys.readouterr().out == ""
  events = [r["event"] for r in got]
  assert events[0] == "preprocessing" and "data" in events
  assert events[events.index("data"):] == ["data", "epoch", "epoch", "test"]
  epochs = [r["record"] for r in got if r["event"] == "epoch"]
  assert [r["epoch"] for r in epochs] == [1, 2]
  assert epochs == [r for r in _runs.records(str(tmp_path / "run")) if r["split"] == "train"]
  assert got[-1]["result"] is res["test"] and got[-1]["ks"] == cfg.test_ks
  # Resumed with more epochs: the reporter hears of it.
  got.clear()
  loop.run(cfg.replace(number_of_epochs=3, test=False), str(tmp_path / "run"),
           report=got.append)
  assert [(r["event"], r.get("epoch") or r["record"]["epoch"]) for r in got
          if r["event"] in ("resumed", "epoch")] == [("resumed", 2), ("epoch", 3)]
