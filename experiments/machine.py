"""What the CPU offers the step's matmuls: its model and its bf16 instruction sets."""

from __future__ import annotations

import platform


def cpu_flags() -> dict:
  """The CPU model and whether it reports AVX512-BF16 and AMX (Linux /proc/cpuinfo)."""
  model, found = platform.processor() or "unknown", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and model in ("", "unknown", "x86_64"):
          model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
          found = set(line.split(":", 1)[1].split())
          break
  except OSError:
    pass
  return {"cpu": model, "avx512_bf16": "avx512_bf16" in found,
          "amx_bf16": "amx_bf16" in found, "amx_tile": "amx_tile" in found}
