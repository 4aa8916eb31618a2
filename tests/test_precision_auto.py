"""--precision=auto: the measured choice, recorded in the run's config."""

import json
import os

import pytest

from jax_vaecf.training import configs
from jax_vaecf.training import engine as loop
from jax_vaecf.training import reporting
from jax_vaecf.core import machine

import _runs


def test_the_speedup_is_measured():
  assert machine.bf16_speedup(rows=32, width=16, n_items=256, repeats=1) > 0


@pytest.mark.parametrize("speedup, chosen", [(2.0, "bf16"), (1.19, "fp32"), (0.8, "fp32")])
def test_auto_picks_bf16_only_when_it_is_clearly_faster(monkeypatch, speedup, chosen):
  monkeypatch.setattr(machine, "bf16_speedup", lambda device: speedup)
  cfg = configs.Config().replace(precision="auto")
  assert loop.resolve_precision(cfg).precision == chosen
  for fixed in ("fp32", "bf16", "fp16"):
    same = configs.Config().replace(precision=fixed)
    assert loop.resolve_precision(same) is same


# A whole run; the module's choice-of-precision checks stay fast.
SLOW_TESTS = ["test_a_run_records_the_chosen_precision"]


def test_a_run_records_the_chosen_precision(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(machine, "bf16_speedup", lambda device: 3.0)
  data = _runs.movielens_dir_plain(tmp_path)
  cfg = _runs.small_config(data, cache_dir=os.path.join(data, "cache"), precision="auto",
                           number_of_epochs=1, test=False)
  workdir = str(tmp_path / "run")
  with pytest.warns(Warning):  # bf16 on CPU says where it is fast
    loop.run(cfg, workdir, report=reporting.print_record)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["precision"] == "bf16"
  assert "precision auto: bf16" in capsys.readouterr().out


def test_auto_is_a_valid_setting_and_nonsense_is_not():
  configs.validate(configs.Config().replace(precision="auto"))
  with pytest.raises(ValueError, match="precision must be one of"):
    configs.validate(configs.Config().replace(precision="fp64"))


def test_auto_is_refused_in_a_multi_process_run(monkeypatch):
  monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="measures one machine"):
    loop.resolve_precision(configs.Config().replace(precision="auto"))
