"""The multi-seed accuracy tool: override parsing and the mean / standard error."""

import numpy as np
import pytest

from experiments import accuracy
from experiments import configs


def test_parse_overrides_types_every_field_kind():
  cfg = configs.get_config("ml1m")
  got = accuracy.parse_overrides(
      ["lr=0.002", "number_of_epochs=50", "hidden_dims=300;100", "download=true",
       "anneal_schedule=cyclical"], cfg)
  assert got == {"lr": 0.002, "number_of_epochs": 50, "hidden_dims": (300, 100),
                 "download": True, "anneal_schedule": "cyclical"}
  with pytest.raises(ValueError, match="unknown field"):
    accuracy.parse_overrides(["learning_rate=1"], cfg)
  with pytest.raises(ValueError, match="field=value"):
    accuracy.parse_overrides(["lr"], cfg)


def test_summarize_mean_and_standard_error():
  runs = [{"ndcg@100": v, "recall@20": 2 * v} for v in (0.40, 0.41, 0.42)]
  s = accuracy.summarize(runs)
  assert s["n_seeds"] == 3
  assert s["ndcg@100"] == pytest.approx(0.41)
  assert s["ndcg@100_se"] == pytest.approx(np.std([0.40, 0.41, 0.42], ddof=1) / np.sqrt(3))
  assert s["recall@20"] == pytest.approx(0.82)
  assert "recall@50" not in s
