"""The host allocator settings: applied where glibc is, and never a change of result."""

import json
import os
import platform
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _python(code: str) -> str:
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip()


def _second_touch_faults(settings: bool) -> tuple[str, int]:
  """Minor page faults of writing a 64 MB block a second time, after it was written
  and freed once, in a fresh process (with the settings applied first, or not); and
  what :func:`reuse_freed_memory` returned (``""`` without it)."""
  out = _python(
      "import resource, ctypes\n"
      "from jax_vaecf.core import host_memory\n"
      f"print(host_memory.reuse_freed_memory() if {settings} else '')\n"
      "libc = ctypes.CDLL(None)\n"
      "libc.malloc.restype = ctypes.c_void_p\n"
      "libc.free.argtypes = [ctypes.c_void_p]\n"
      "def touch():\n"
      "  n = 64 << 20\n"
      "  p = libc.malloc(n)\n"
      "  ctypes.memset(p, 1, n)\n"
      "  libc.free(p)\n"
      "touch()\n"
      "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
      "touch()\n"
      "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
  status, faults = (out.splitlines() + [""])[:2] if settings else ("", out)
  return status, int(faults)


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_settings_are_applied_and_freed_memory_is_reused():
  # After the settings, a large block freed and asked for again is served from the
  # process's heap: no new pages are faulted in the second time.
  status, faults = _second_touch_faults(settings=True)
  assert status == "glibc"
  assert faults < 1000  # 64 MB is 16,384 pages


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_default_allocator_faults_the_block_in_again():
  # Without the settings glibc maps and unmaps the block, faulting each page again: the
  # contrast that makes the test above mean something on this machine.
  _, faults = _second_touch_faults(settings=False)
  assert faults > 10_000


def test_training_is_the_same_with_and_without_the_settings(tmp_path):
  losses = {}
  for flag in ("--reuse_host_memory", "--noreuse_host_memory"):
    out = tmp_path / f"{flag}.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--n_users=400", "--n_items=300",
         "--mean_per_user=12", "--batch_size_train=100", "--steps=3", "--eval_users=0",
         flag, f"--json_out={out}"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text().splitlines()[-1])
    # The record says whether the settings took effect, not only what was asked.
    assert record["versions"]["reuse_host_memory"] == (flag == "--reuse_host_memory"
                                                       and GLIBC)
    losses[flag] = record["results"][0]["final_loss"]
  assert losses["--reuse_host_memory"] == losses["--noreuse_host_memory"]


# In-process checks of the two ways the settings are not applied (the fast tier's test
# of the module; the tests above measure the allocator in fresh processes).
def test_off_linux_nothing_is_set_and_applied_stays_false(monkeypatch):
  from jax_vaecf.core import host_memory
  monkeypatch.setattr(host_memory.sys, "platform", "darwin")
  monkeypatch.setattr(host_memory, "_applied", False)
  assert host_memory.reuse_freed_memory() == "not Linux"
  assert not host_memory.applied()


def test_a_refused_setting_is_named_and_applied_stays_false(monkeypatch):
  from jax_vaecf.core import host_memory
  calls = []

  class _LibC:
    def gnu_get_libc_version(self):
      return b"2.36"

    class mallopt:  # pylint: disable=invalid-name
      argtypes = restype = None

      def __new__(cls, param, value):
        calls.append((param, value))
        return 1 if param == host_memory._M_ARENA_MAX else 0  # refuses the second

  monkeypatch.setattr(host_memory.sys, "platform", "linux")
  monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: _LibC())
  monkeypatch.setattr(host_memory, "_applied", False)
  assert host_memory.reuse_freed_memory() == "mallopt refused M_MMAP_MAX=0"
  assert calls == [(host_memory._M_ARENA_MAX, 1), (host_memory._M_MMAP_MAX, 0)]
  assert not host_memory.applied()


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator settings")
def test_memory_freed_and_kept_for_reuse_counts_as_available_to_the_process():
  # Under the settings a freed 512 MB block stays in the process, where MemAvailable
  # does not count it; what EASE's memory check sees (ease.host_memory_bytes) must (a
  # refit in the validated run's process was refused on Yelp2018 for that reason).
  out = json.loads(_python(
      "import ctypes, json\n"
      "from jax_vaecf.core import host_memory\n"
      "host_memory.reuse_freed_memory()\n"
      "from jax_vaecf.models import ease\n"
      "libc = ctypes.CDLL(None)\n"
      "libc.malloc.restype = ctypes.c_void_p\n"
      "libc.free.argtypes = [ctypes.c_void_p]\n"
      "def avail():\n"
      "  return [int(l.split()[1]) * 1024 for l in open('/proc/meminfo')\n"
      "          if l.startswith('MemAvailable:')][0]\n"
      "before = (avail(), ease.host_memory_bytes(), host_memory.free_heap_bytes())\n"
      "p = libc.malloc(512 << 20)\n"
      "ctypes.memset(p, 1, 512 << 20)\n"
      "libc.free(p)\n"
      "after = (avail(), ease.host_memory_bytes(), host_memory.free_heap_bytes())\n"
      "print(json.dumps([before, after]))\n"))
  (avail0, seen0, free0), (avail1, seen1, free1) = out
  block = 512 << 20
  assert free1 - free0 > 0.9 * block
  assert seen1 - avail1 > 0.9 * block  # the check counts it beside MemAvailable
  del avail0, seen0
