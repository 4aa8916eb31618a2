"""What a run tells as it goes: records handed to a reporter, and their text lines.

The engine (:func:`jax_vaecf.training.engine.run`) never prints: it calls ``report(record)`` with a
dict whose ``event`` says what happened, and the caller decides where it goes.
:func:`log_record` (the default) sends each record's line to the log;
:func:`print_record` prints it, and is what the command line installs. The events:

- ``preprocessing``: ``dataset``, ``stage``, ``seconds`` (since loading began);
- ``data``: ``stats`` (:meth:`jax_vaecf.data.Split.stats`);
- ``precision``: ``chosen``, ``speedup``, ``platform`` (``--precision=auto``'s choice);
- ``resumed``: ``epoch``;
- ``stopped_already``: ``epoch``, ``stale`` (a resumed run that had stopped early);
- ``epoch``: ``record`` (the epoch's record, as ``metrics.jsonl`` holds it);
- ``stopped``: ``epoch``, ``reason``;
- ``benchmark``: ``summary`` (the training summary);
- ``test``: ``result``, ``ks``;
- ``refit``: ``epochs``, ``folder``;
- ``swept``: ``record`` (one point of a closed-form model's sweep, as ``metrics.jsonl``
  holds it);
- ``fitted``: ``model``, ``summary``, ``record`` (a closed-form fit's training record);
- ``fitted_already``: ``model``, ``chosen`` (a resumed closed-form run).
- ``fit_progress``: ``model``, ``message`` (a closed-form fit's stage done, a note).
"""

from __future__ import annotations

import sys
from typing import Callable

from absl import logging

from jax_vaecf.evaluation import catalogue
from jax_vaecf import data as data_lib

Report = Callable[[dict], None]

# Events whose lines are progress notes rather than results (stderr when printed).
_NOTES = frozenset({"preprocessing", "fit_progress"})


def format_epoch(r: dict) -> str:
  """An epoch's record as the line the command line prints."""
  line = (f"epoch {r['epoch']:4d}  loss {r.get('loss', float('nan')):9.3f}  "
          f"beta {r.get('beta', 0):.4f}  time {r['epoch_time_s']:7.2f}s  "
          f"{r['users_per_s']:10.0f} users/s")
  if "val_ndcg@100" in r:
    line += (f"  val ndcg@100 {r['val_ndcg@100']:.4f}  recall@20 {r['val_recall@20']:.4f}"
             f"  recall@50 {r['val_recall@50']:.4f}")
  return line


def format_catalogue(result: dict, ks) -> str:
  """The test's beyond-accuracy metrics (:mod:`jax_vaecf.evaluation.catalogue`) as one line."""
  parts = [f"{name}@{k} {result[f'{name}@{k}']:.4g}"
           for k in sorted(set(int(k) for k in ks))
           for name in catalogue.CATALOGUE_METRICS if f"{name}@{k}" in result]
  return "catalogue: " + "  ".join(parts) if parts else ""


def format_test(result: dict, ks) -> str:
  """The test's NDCG and Recall at each of ``ks``, with standard errors, as one line."""
  parts = []
  for k in sorted(set(int(k) for k in ks)):
    for name in ("ndcg", "recall"):
      key = f"{name}@{k}"
      if key in result:
        parts.append(f"{key} {result[key]:.4f} (+-{result[key + '_se']:.4f})")
  return (f"test ({result['n_users']} users, {result['n_excluded']} without held-out "
          f"items; best epoch {result.get('epoch')}): " + "  ".join(parts))


def format_benchmark(s: dict) -> str:
  """A training summary's timings as one line."""
  if "mean_epoch_time_s" not in s:
    return "benchmark: no epoch after the warm-up epochs; raise --number_of_epochs"
  line = (f"benchmark: {s['measured_epochs']} epochs after warm-up, mean epoch "
          f"{s['mean_epoch_time_s']:.3f}s, {s['train_users_per_s']:.0f} training users/s")
  if "mean_validation_time_s" in s:
    line += f", validation {s['mean_validation_time_s']:.3f}s"
  return line


def _val_part(r: dict) -> list[str]:
  return [f"val {k[4:]} {r[k]:.4f}" for k in ("val_ndcg@100", "val_recall@20",
                                            "val_recall@50") if k in r]


def format_swept(r: dict) -> str:
  """One swept point of a closed-form fit: its settings and validation metrics."""
  return "  ".join([" ".join(f"{k} {v:g}" for k, v in r["swept"].items()), *_val_part(r)])


def format_fitted(r: dict) -> str:
  """A closed-form fit: what it chose, its time and validation metrics."""
  rec = r["record"]
  line = f"fitted {r['model']} with {r['summary']} in {rec['fit_time_s']:.2f}s"
  if "val_ndcg@100" in rec:
    line += (f"  val ndcg@100 {rec['val_ndcg@100']:.4f}  recall@20 "
             f"{rec['val_recall@20']:.4f}  recall@50 {rec['val_recall@50']:.4f}")
  return line


def _test_lines(r: dict) -> str:
  catalogue_line = format_catalogue(r["result"], r["ks"])
  return format_test(r["result"], r["ks"]) + ("\n" + catalogue_line
                                               if catalogue_line else "")


_FORMATS: dict[str, Callable[[dict], str]] = {
    "preprocessing": lambda r: (f"[{r['seconds']:6.1f}s] preprocessing {r['dataset']}: "
                                f"{r['stage']}"),
    "data": lambda r: data_lib.format_stats(r["stats"]),
    "precision": lambda r: (f"precision auto: {r['chosen']} (the step's large products "
                            f"run {r['speedup']:.2f}x as fast in bf16 as in fp32 on this "
                            f"{r['platform']} device)"),
    "resumed": lambda r: f"resumed from epoch {r['epoch']}",
    "stopped_already": lambda r: (f"the run stopped early after epoch {r['epoch']} "
                                  f"({r['stale']} validations without improvement): "
                                  "nothing to train"),
    "epoch": lambda r: format_epoch(r["record"]),
    "stopped": lambda r: f"stopped after epoch {r['epoch']}: {r['reason']}",
    "benchmark": lambda r: format_benchmark(r["summary"]),
    "test": _test_lines,
    "refit": lambda r: (f"refit: {r['epochs']} epochs on every training item in "
                        f"{r['folder']}"),
    "swept": lambda r: format_swept(r["record"]),
    "fitted": format_fitted,
    "fitted_already": lambda r: (f"{r['model']} was fitted already ({r['chosen']}): "
                                 "nothing to fit"),
    "fit_progress": lambda r: f"fitting {r['model']}: {r['message']}",
}


def format_record(record: dict) -> str:
  """The text of a reported record (one or more lines); ValueError for an unknown
  event, so a record the engine adds is not silently dropped."""
  event = record.get("event")
  if event not in _FORMATS:
    raise ValueError(f"unknown report event {event!r}; expected one of {sorted(_FORMATS)}")
  return _FORMATS[event](record)


def print_record(record: dict) -> None:
  """The command line's reporter: the record's line on stdout (progress notes on
  stderr), flushed at once."""
  stream = sys.stderr if record.get("event") in _NOTES else sys.stdout
  print(format_record(record), file=stream, flush=True)


def log_record(record: dict) -> None:
  """The library's default reporter: the record's line to the log (INFO)."""
  logging.info("%s", format_record(record))
