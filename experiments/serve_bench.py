"""Load on the HTTP server, beside the same scoring in-process: ``python -m
experiments.serve_bench --artifact DIR``.

  python -m experiments.serve_bench --artifact runs/demo_artefact --seconds 5 \\
      --concurrency 1,8,64

Starts ``python -m experiments.serve`` on a free loopback port twice, with
micro-batching (the server's defaults) and with one request per scoring call
(``--max_batch_users=1 --max_wait_ms=0``), and drives each at every ``--concurrency``
for ``--seconds`` (after a warm-up of as long) with keep-alive connections, each
sending one user's history (``--history`` random items of the table, from a seeded pool)
and waiting for the answer. Every answer is checked against the artefact's answer
computed in-process for the same user: the same items, scores equal to float32 rounding
(a batch pads to another shape than one user alone, which may change the last bits;
items whose scores are that close may swap places). The in-process row is the artefact
called directly, one user per call, in this process. Prints a table (requests/s, p50
and p99 latency, wrong and failed answers) and one JSON line. The load and the server
share the machine, so requests/s measure both.

:func:`time_paths` is the other serving measurement, shared by ``experiments.export
--benchmark`` and ``experiments.benchmark --serving``: batch-1 latency and batch-10,000
throughput of the ``Recommender`` and of the loaded artefact, in-process.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags

from experiments import cli
from jax_vaecf.core import machine

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The tool's flags; defined when it runs, not at import (``--k`` and ``--artifact``
  are other tools' flags too, and the tests import several tools)."""
  flags.DEFINE_string("artifact", None, "The artefact folder to serve.")
  flags.DEFINE_float("seconds", 5.0, "Seconds of load per row (and as long to warm up).")
  flags.DEFINE_list("concurrency", ["1", "8", "64"], "Clients sending at once, per row.")
  flags.DEFINE_integer("pool", 256, "Distinct users (histories) the clients draw from.")
  flags.DEFINE_integer("history", 20, "Items per user's history.")
  flags.DEFINE_integer("k", 10, "Items asked per request (at most the artefact's k).")

# The two servers compared: micro-batching (the defaults) and one request per call.
MODES = {"HTTP, micro-batched": [],
         "HTTP, one request per call": ["--max_batch_users=1", "--max_wait_ms=0"]}


# NVIDIA's VAE-CF README, inference on one A100 80GB, TF32: batch 1.
REFERENCE_BATCH1 = {"users_per_s": 1181, "latency_ms": 0.85}


def time_paths(rec, artefact: str | None, k: int, repeats: int = 50) -> list[dict]:
  """Median batch-1 latency and batch-10,000 throughput of the ``Recommender`` and,
  with ``artefact``, of the loaded artefact: one row each.

  Users are 20 random items each; each path is warmed up (compiled) before timing.
  """
  from jax_vaecf.serving import artefact as serve_lib

  rng = np.random.default_rng(0)
  ids = [str(i) for i in rec.item_ids.tolist()]
  pick = lambda: [ids[j] for j in rng.choice(len(ids), min(20, len(ids) - 1),
                                             replace=False)]
  one, many = [pick()], [pick() for _ in range(10_000)]
  paths = {"Recommender (jit, project installed)": lambda h: rec.recommend(h, k)}
  if artefact is not None:
    scorer = serve_lib.load(artefact)
    paths["exported artefact (serve.py)"] = lambda h: scorer.recommend(h, k)
  rows = []
  for name, fn in paths.items():
    fn(one), fn(many)  # compile both shapes
    lat = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn(one)
      lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    fn(many)
    many_s = time.perf_counter() - t0
    ms = 1000 * float(np.median(lat))
    rows.append({"path": name, "batch1_latency_ms": ms, "batch1_users_per_s": 1000 / ms,
                 "batch10000_users_per_s": 10_000 / many_s})
  return rows


def format_paths(rows: list[dict]) -> str:
  lines = ["| path | batch 1 latency (ms) | batch 1 users/s | batch 10,000 users/s |",
           "|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['path']} | {r['batch1_latency_ms']:.2f} | "
                 f"{r['batch1_users_per_s']:,.0f} | {r['batch10000_users_per_s']:,.0f} |")
  ref = REFERENCE_BATCH1
  lines.append(f"| NVIDIA VAE-CF, A100 TF32 (published) | {ref['latency_ms']} | "
               f"{ref['users_per_s']:,} | - |")
  return "\n".join(lines)


def matches(got: dict, ref: dict, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
  """Whether an answer equals the reference up to float32 rounding: the same unknown ids
  and scores, and the same items except where neighbouring scores are that close."""
  if got.get("unknown") != ref["unknown"] or len(got.get("items", ())) != len(ref["items"]):
    return False
  g, r = np.asarray(got["scores"], np.float64), np.asarray(ref["scores"], np.float64)
  if not np.allclose(g, r, rtol=rtol, atol=atol):
    return False
  for i, (a, b) in enumerate(zip(got["items"], ref["items"])):
    if a != b:
      # A swap of near-ties: b must appear next to i with a score as close.
      near = [j for j in (i - 1, i + 1) if 0 <= j < len(r)
              and got["items"][j] == b and abs(r[i] - r[j]) <= atol + rtol * abs(r[i])]
      if not near:
        return False
  return True


async def _post(reader, writer, body: bytes) -> tuple[int, bytes]:
  writer.write(b"POST /recommend HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
               b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
  await writer.drain()
  status = int((await reader.readline()).split()[1])
  length = 0
  while (line := await reader.readline()) not in (b"\r\n", b""):
    name, _, value = line.partition(b":")
    if name.strip().lower() == b"content-length":
      length = int(value)
  return status, await reader.readexactly(length)


async def _load(port: int, concurrency: int, seconds: float, bodies: list[bytes],
                refs: list[dict], seed: int) -> dict:
  """``concurrency`` clients for ``seconds``; latencies and counts."""
  end = time.perf_counter() + seconds
  latencies, wrong, failed = [], [0], [0]

  async def client(c: int):
    rng = np.random.default_rng((seed, c))
    try:
      reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
      failed[0] += 1
      return
    try:
      while time.perf_counter() < end:
        j = int(rng.integers(len(bodies)))
        t0 = time.perf_counter()
        try:
          status, text = await _post(reader, writer, bodies[j])
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
          failed[0] += 1
          return
        latencies.append(time.perf_counter() - t0)
        if status != 200:
          failed[0] += 1
        elif not matches(json.loads(text), refs[j]):
          wrong[0] += 1
    finally:
      writer.close()

  await asyncio.gather(*(client(c) for c in range(concurrency)))
  lat = np.array(latencies) * 1000
  return {"concurrency": concurrency, "requests": len(latencies),
          "requests_per_s": len(latencies) / seconds,
          "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
          "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
          "wrong": wrong[0], "failed": failed[0]}


def in_process(scorer, histories: list, k: int, seconds: float) -> dict:
  """The artefact called directly, one user per call, for ``seconds``."""
  lat = []
  end = time.perf_counter() + seconds
  j = 0
  while time.perf_counter() < end:
    t0 = time.perf_counter()
    scorer.recommend([histories[j % len(histories)]], k)
    lat.append(time.perf_counter() - t0)
    j += 1
  lat = np.array(lat) * 1000
  return {"concurrency": 1, "requests": int(lat.size), "requests_per_s": lat.size / seconds,
          "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
          "wrong": 0, "failed": 0}


def start_server(artifact: str, extra: list[str]) -> tuple[subprocess.Popen, int]:
  """``experiments.serve`` on a free loopback port, once ``/health`` says ready."""
  proc = subprocess.Popen([sys.executable, "-m", "experiments.serve", "--artifact",
                           artifact, "--port", "0", *extra],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  line = proc.stdout.readline()
  if not line.startswith("listening on http://"):
    proc.kill()
    raise RuntimeError(f"the server did not start: {line!r}")
  port = int(line.split("://", 1)[1].split()[0].rsplit(":", 1)[1])
  deadline = time.time() + 300
  while True:
    try:
      conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
      conn.request("GET", "/health")
      if conn.getresponse().status == 200:
        return proc, port
    except OSError:
      pass
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      raise RuntimeError("the server never became ready")
    time.sleep(0.2)


def run(artifact: str, concurrency: list[int], seconds: float, pool: int, history: int,
        k: int) -> list[dict]:
  from jax_vaecf.serving import artefact as serve_lib  # pylint: disable=import-outside-toplevel
  from jax_vaecf.serving import http as server  # pylint: disable=import-outside-toplevel
  scorer = serve_lib.load(artifact)
  if not 1 <= k <= scorer.k:
    raise ValueError(f"--k={k}: the artefact answers 1 to {scorer.k} items")
  ids = scorer.item_ids.tolist()
  rng = np.random.default_rng(0)
  histories = [[str(ids[j]) for j in rng.choice(len(ids), min(history, len(ids) - 1),
                                                replace=False)] for _ in range(pool)]
  refs = [server.answer(scorer.recommend([h], k)[0]) for h in histories]
  refs = [json.loads(json.dumps(r)) for r in refs]  # as they come back over JSON
  bodies = [json.dumps({"items": h, "k": k}).encode() for h in histories]
  rows = [{"path": "in-process Scorer.recommend", **in_process(scorer, histories, k,
                                                               seconds)}]
  for name, extra in MODES.items():
    proc, port = start_server(artifact, extra)
    try:
      for c in concurrency:
        asyncio.run(_load(port, c, seconds, bodies, refs, seed=1))  # compiles shapes
        rows.append({"path": name, **asyncio.run(_load(port, c, seconds, bodies, refs,
                                                       seed=2))})
    finally:
      proc.terminate()
      proc.wait(60)
  return rows


def format_table(rows: list[dict]) -> str:
  lines = ["| path | concurrency | requests | requests/s | p50 ms | p99 ms | wrong | failed |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['path']} | {r['concurrency']} | {r['requests']} | "
                 f"{r['requests_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                 f"{r['wrong']} | {r['failed']} |")
  batched = {r["concurrency"]: r for r in rows if r["path"] == "HTTP, micro-batched"}
  single = {r["concurrency"]: r for r in rows if r["path"] == "HTTP, one request per call"}
  for c in sorted(set(batched) & set(single)):
    if single[c]["requests_per_s"] > 0:
      lines.append(f"micro-batching at concurrency {c}: "
                   f"{batched[c]['requests_per_s'] / single[c]['requests_per_s']:.2f}x the "
                   "requests/s of one request per call")
  return "\n".join(lines)


def main(argv):
  cli.start(argv, required=("artifact",))
  try:
    concurrency = [int(c) for c in FLAGS.concurrency]
  except ValueError:
    raise app.UsageError(f"--concurrency: expected integers, got {FLAGS.concurrency}")
  if not concurrency or min(concurrency) < 1:
    raise app.UsageError("--concurrency: expected integers >= 1")
  if FLAGS.seconds <= 0 or FLAGS.pool < 1 or FLAGS.history < 0:
    raise app.UsageError("--seconds must be > 0, --pool >= 1 and --history >= 0")
  try:
    rows = run(FLAGS.artifact, concurrency, FLAGS.seconds, FLAGS.pool, FLAGS.history,
               FLAGS.k)
  except (ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"machine: {machine.cpu_model()} ({os.cpu_count()} cores); load and server on "
        f"the same machine, loopback; {FLAGS.seconds:g} s a row, users of "
        f"{FLAGS.history} items, k={FLAGS.k}")
  print(format_table(rows))
  print(json.dumps({"results": rows, "argv": sys.argv[1:]}))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
