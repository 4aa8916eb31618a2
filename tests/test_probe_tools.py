"""The machine probes: the matmul probe's table and the PyTorch baseline's guard."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import _tools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_probe_matmul_times_every_form_in_both_precisions():
  r = _run("experiments.probe_matmul", "--rows=64", "--width=64", "--n_items=512",
           "--repeats=1")
  assert r.returncode == 0, r.stderr[-2000:]
  record = json.loads(r.stdout.strip().splitlines()[-1])
  forms = record["probe_matmul"]
  assert len(forms) == 6 and any("the step's form" in name for name in forms)
  for rates in forms.values():
    assert set(rates) == {"float32", "bfloat16"}
    assert all(v > 0 for v in rates.values())
  assert {"cpu", "avx512_bf16", "amx_bf16"} <= set(record)
  assert "| kernel grad, the step's form |" in r.stdout
  first = record["first_layer_ms"]
  assert set(first) == {"X @ W1, gather", "X @ W1, entry loop",
                        "X @ W1 + kernel grad, gather", "X @ W1 + kernel grad, entry loop"}
  assert all(v > 0 for v in first.values())


def test_probe_matmul_refuses_a_nonsense_shape():
  r = _tools.run("experiments.probe_matmul", "--rows=0")
  assert r.returncode != 0 and "--rows must be >= 1" in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="PyTorch is installed here")
def test_torch_baseline_says_it_needs_pytorch():
  r = _tools.run("experiments.torch_baseline", "--steps=1")
  assert r.returncode != 0 and "pip install torch" in r.stderr
