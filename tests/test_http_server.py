"""The HTTP server on an exported artefact (``experiments.serve``, ``jax_vaecf.serving.http``):
real HTTP on a free loopback port; answers, bad input, health, the queue bound, reload
and the drain on SIGTERM."""

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from jax_vaecf.serving import export as export_lib
from jax_vaecf.serving import recommender as recommend
from jax_vaecf.serving import artefact as serve
from jax_vaecf.serving import http as server


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def artefacts(trained_run, tmp_path_factory):
  """Two artefacts of one trained model: ``a1`` (k=10) and ``a2`` (k=5) whose item
  table is permuted, so that an id names another column in each; and ``bad``, a copy of
  ``a2`` with a damaged weights file."""
  rec = recommend.Recommender.from_workdir(trained_run)
  root = str(tmp_path_factory.mktemp("http"))
  info = {"model": "multvae"}
  a1, a2, bad = (os.path.join(root, n) for n in ("a1", "a2", "bad"))
  export_lib.write_artifact(a1, rec.model, rec.params, rec.item_ids, 10, model_info=info)
  export_lib.write_artifact(a2, rec.model, rec.params, rec.item_ids[::-1].copy(), 5,
                            model_info=info)
  shutil.copytree(a2, bad)
  raw = bytearray(open(os.path.join(bad, "params.npz"), "rb").read())
  raw[len(raw) // 2] ^= 1
  open(os.path.join(bad, "params.npz"), "wb").write(bytes(raw))
  return {"a1": a1, "a2": a2, "bad": bad, "ids": [str(i) for i in rec.item_ids.tolist()]}


class _Log:
  """A thread-safe line sink for the server's request log."""

  def __init__(self):
    self.lines, self._lock = [], threading.Lock()

  def write(self, text):
    with self._lock:
      self.lines.append(text)

  def flush(self):
    pass

  def text(self):
    with self._lock:
      return "".join(self.lines)


class _Server:
  """``create_app`` under uvicorn in a thread, on a free loopback port."""

  def __init__(self, folder, options=server.ServerOptions(), **kw):
    self.log = _Log()
    app = server.create_app(folder, options, log=self.log, **kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    self.port = sock.getsockname()[1]
    self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                access_log=False, lifespan="on"))
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                   daemon=True)
    self.thread.start()
    deadline = time.time() + 30
    while not self.server.started:
      assert time.time() < deadline, "the server did not start"
      time.sleep(0.02)

  def wait_ready(self, timeout=120):
    deadline = time.time() + timeout
    while True:
      status, health = self.call("GET", "/health")
      if status == 200:
        break
      assert health["status"] == "loading", health
      assert time.time() < deadline, "the artefact never became ready"
      time.sleep(0.05)

  def call(self, method, path, body=None, raw=None):
    return call(self.port, method, path, body, raw)

  def stop(self):
    self.server.should_exit = True
    self.thread.join(timeout=30)


def call(port, method, path, body=None, raw=None, timeout=60):
  """``(status, JSON answer)`` of one request (``raw``: bytes sent as they are)."""
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  try:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data,
                 headers={"Content-Type": "application/json"} if data is not None else {})
    r = conn.getresponse()
    text = r.read()
    return r.status, json.loads(text)
  finally:
    conn.close()


@pytest.fixture(scope="module")
def running(artefacts):
  s = _Server(artefacts["a1"])
  s.wait_ready()
  yield s
  s.stop()


def _reference(folder, histories, k, one_by_one=False):
  """The artefact's answers in-process, all users in one call or each alone (scores
  are equal to the last bit only for the same padded shapes)."""
  scorer = serve.load(folder)
  if one_by_one:
    return [server.answer(scorer.recommend([h], k)[0]) for h in histories]
  return [server.answer(r) for r in scorer.recommend(histories, k)]


def test_one_user_a_batch_and_unknown_ids_answer_as_the_artefact_does(running, artefacts):
  ids = artefacts["ids"]
  history = ids[:3]
  status, got = running.call("POST", "/recommend", {"items": history + ["nope"], "k": 4})
  assert status == 200
  ref = _reference(artefacts["a1"], [history + ["nope"]], 4)[0]
  assert got == json.loads(json.dumps(ref))
  assert got["unknown"] == ["nope"] and len(got["items"]) == 4
  assert not set(map(str, got["items"])) & set(history)  # never the user's own items
  # Integers name the same items as their text.
  status, same = running.call("POST", "/recommend", {"items": [int(i) for i in history],
                                                     "k": 4})
  assert status == 200 and same["items"] == got["items"]
  # A batch, and k defaulting to the artefact's.
  users = [ids[5:9], [], ["x", ids[0]]]
  status, got = running.call("POST", "/recommend", {"users": users})
  assert status == 200
  assert got == {"users": json.loads(json.dumps(_reference(artefacts["a1"], users, 10)))}
  assert got["users"][2]["unknown"] == ["x"]
  assert "POST /recommend 200 " in running.log.text() and " ms\n" in running.log.text()


_BAD = [
    (b'{"items": ["1"', 400, "malformed JSON"),
    (b'\xff\xfe', 400, "malformed JSON"),
    (b'[1, 2]', 400, "expected a JSON object with 'items'"),
    (b'{}', 400, "give exactly one of 'items'"),
    (b'{"items": [], "users": []}', 400, "give exactly one of 'items'"),
    (b'{"items": [], "kk": 3}', 400, "unknown field 'kk'"),
    (b'{"items": "1,2"}', 400, "'items' must be a list of item ids, got str"),
    (b'{"items": [1.5]}', 400, "'items[0]' must be an item id (a string or an integer), "
                               "got 1.5"),
    (b'{"items": [null]}', 400, "'items[0]' must be an item id"),
    (b'{"items": [true]}', 400, "'items[0]' must be an item id"),
    (b'{"users": {"a": 1}}', 400, "'users' must be a list of item lists, got dict"),
    (b'{"users": [["1"], "2"]}', 400, "'users[1]' must be a list of item ids, got str"),
    (b'{"users": [["1", {}]]}', 400, "'users[0][1]' must be an item id"),
    (b'{"items": [], "k": 0}', 400, "'k' must be an integer in [1, 10]"),
    (b'{"items": [], "k": 11}', 400, "'k' must be an integer in [1, 10]"),
    (b'{"items": [], "k": 2.0}', 400, "'k' must be an integer in [1, 10]"),
    (b'{"items": [], "k": true}', 400, "'k' must be an integer in [1, 10]"),
    (b'{"items": [], "k": "3"}', 400, "'k' must be an integer in [1, 10]"),
]


def test_bad_input_is_a_4xx_with_a_one_line_message(running):
  for raw, status, message in _BAD:
    got_status, got = running.call("POST", "/recommend", raw=raw)
    assert (got_status, list(got)) == (status, ["error"]), raw
    assert message in got["error"] and "\n" not in got["error"], (raw, got)
  # Too large: the body, and the batch.
  status, got = running.call("POST", "/recommend",
                             raw=b'{"items": [' + b'"1",' * 300_000 + b'"1"]}')
  assert status == 413 and "at most 1048576" in got["error"]
  status, got = running.call("POST", "/recommend", {"users": [[]] * 4097})
  assert status == 413 and got["error"] == "4097 users in one request; at most 4096"
  assert running.call("POST", "/recommend", {"items": []})[0] == 200  # still serving


def test_health_says_ready_only_after_the_load_and_warm_up(artefacts):
  gate = threading.Event()

  def slow_load(folder):
    assert gate.wait(60)
    return server.load_and_warm(folder)

  s = _Server(artefacts["a1"], load=slow_load)
  try:
    assert s.call("GET", "/health") == (503, {"status": "loading"})
    status, got = s.call("POST", "/recommend", {"items": []})
    assert status == 503 and "still loading" in got["error"]
    gate.set()
    s.wait_ready()
    assert s.call("GET", "/health") == (200, {"status": "ready", "generation": 1})
    status, meta = s.call("GET", "/metadata")
    assert status == 200 and meta["k"] == 10 and meta["n_items"] == len(artefacts["ids"])
    assert meta["artifact_sha256"] == server.manifest_digest(artefacts["a1"])
  finally:
    s.stop()


class _SlowModel:
  """Takes ``delay`` seconds per scoring call (a busy device)."""

  k, n_items, manifest = 3, 5, {}

  def __init__(self, delay):
    self.delay = delay
    self.calls = []

  def recommend(self, histories, k):
    self.calls.append(len(histories))
    time.sleep(self.delay)
    return [{"items": np.arange(k), "scores": np.zeros(k, np.float32), "unknown": []}
            for _ in histories]


def test_a_full_queue_answers_503_and_concurrent_requests_share_a_call(tmp_path):
  model = _SlowModel(0.6)
  opts = server.ServerOptions(max_queue=1, max_batch_users=1, max_wait_ms=0)
  s = _Server(str(tmp_path), opts, load=lambda folder: model)
  try:
    s.wait_ready()
    out = {}

    def ask(name):
      out[name] = s.call("POST", "/recommend", {"items": [1]})

    threads = []
    for name in ("scored", "queued", "refused"):
      threads.append(threading.Thread(target=ask, args=(name,)))
      threads[-1].start()
      time.sleep(0.15)
    for t in threads:
      t.join()
    assert out["scored"][0] == 200 and out["queued"][0] == 200
    assert out["refused"][0] == 503 and "1 requests are waiting" in out["refused"][1]["error"]
  finally:
    s.stop()
  # With batching, requests that arrive together are scored in one call.
  model = _SlowModel(0.3)
  s = _Server(str(tmp_path), server.ServerOptions(max_wait_ms=200),
              load=lambda folder: model)
  try:
    s.wait_ready()
    model.calls.clear()
    threads = [threading.Thread(target=s.call, args=("POST", "/recommend", {"items": []}))
               for _ in range(6)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert sum(model.calls) == 6 and len(model.calls) < 6
  finally:
    s.stop()


def test_reload_swaps_without_mixing_and_keeps_serving_when_refused(artefacts, tmp_path):
  link = str(tmp_path / "current")
  os.symlink(artefacts["a1"], link)
  s = _Server(link)
  try:
    s.wait_ready()
    histories = [artefacts["ids"][j:j + 4] for j in range(0, 40, 4)]
    # Both artefacts' answers at k=5; an answer mixing one's ids with the other's
    # columns would be neither.
    refs = [_reference(artefacts[a], histories, 5, one_by_one=True) for a in ("a1", "a2")]
    assert refs[0] != refs[1]
    seen, stop = [], threading.Event()

    def load_traffic():
      j = 0
      while not stop.is_set():
        status, got = s.call("POST", "/recommend", {"items": histories[j], "k": 5})
        seen.append((status, j, got))
        j = (j + 1) % len(histories)

    traffic = threading.Thread(target=load_traffic)
    traffic.start()
    time.sleep(0.3)
    os.symlink(artefacts["a2"], str(tmp_path / "next"))
    os.replace(str(tmp_path / "next"), link)
    status, got = s.call("POST", "/admin/reload")
    assert status == 200 and got["generation"] == 2
    assert got["artifact_sha256"] == server.manifest_digest(artefacts["a2"])
    time.sleep(0.3)
    stop.set()
    traffic.join()
    assert seen and all(st == 200 for st, _, _ in seen)
    for _, j, got in seen:
      assert got in (json.loads(json.dumps(refs[0][j])), json.loads(json.dumps(refs[1][j])))
    assert seen[-1][2] == json.loads(json.dumps(refs[1][seen[-1][1]]))
    assert s.call("GET", "/metadata")[1]["k"] == 5
    # A damaged artefact in its place is refused, naming the file; a2 keeps serving.
    os.symlink(artefacts["bad"], str(tmp_path / "next"))
    os.replace(str(tmp_path / "next"), link)
    status, got = s.call("POST", "/admin/reload")
    assert status == 409
    assert "params.npz: checksum mismatch" in got["error"]
    assert "the one loaded before keeps serving" in got["error"]
    status, meta = s.call("GET", "/metadata")
    assert meta["generation"] == 2 and meta["k"] == 5
    assert s.call("POST", "/recommend", {"items": histories[0], "k": 5})[1] == \
        json.loads(json.dumps(refs[1][0]))
  finally:
    s.stop()


def test_reload_is_refused_to_a_client_that_is_not_on_loopback(artefacts):
  app = server.create_app(artefacts["a1"], load=lambda folder: _SlowModel(0))

  async def post_from(host):
    sent = []
    scope = {"type": "http", "method": "POST", "path": "/admin/reload",
             "raw_path": b"/admin/reload", "query_string": b"", "headers": [],
             "client": (host, 5555), "server": ("127.0.0.1", 80), "scheme": "http",
             "http_version": "1.1", "root_path": ""}

    async def receive():
      return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
      sent.append(message)

    lifespan = asyncio.Queue()
    await lifespan.put({"type": "lifespan.startup"})
    events = []
    life = asyncio.create_task(app({"type": "lifespan"}, lifespan.get,
                                   lambda m: events.append(m) or asyncio.sleep(0)))
    while not events:
      await asyncio.sleep(0.01)
    await app(scope, receive, send)
    await lifespan.put({"type": "lifespan.shutdown"})
    await life
    return sent[0]["status"], json.loads(sent[1]["body"])

  status, got = asyncio.run(post_from("192.0.2.7"))  # an address, never contacted
  assert status == 403 and "loopback address only" in got["error"]
  assert asyncio.run(post_from("::1"))[0] == 200


def test_sigterm_drains_requests_in_flight_then_exits_0(artefacts):
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.serve", "--artifact", artefacts["a1"],
       "--port", "0"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert line.startswith("listening on http://127.0.0.1:"), proc.stderr.read()
    port = int(line.split(":")[2].split()[0])
    deadline = time.time() + 120
    while True:
      try:
        if call(port, "GET", "/health")[0] == 200:
          break
      except OSError:
        pass
      assert time.time() < deadline and proc.poll() is None
      time.sleep(0.1)
    history = artefacts["ids"][:3]
    body = json.dumps({"items": history, "k": 3}).encode()
    # A request in flight when the signal comes: its headers and half its body sent.
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                 + body[:10])
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None  # still draining
    # A new connection is no longer accepted.
    with pytest.raises(OSError):
      call(port, "GET", "/health", timeout=5)
    sock.sendall(body[10:])
    reply = b""
    while chunk := sock.recv(65536):
      reply += chunk
    sock.close()
    head, _, text = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(text) == json.loads(json.dumps(
        _reference(artefacts["a1"], [history], 3)[0]))
    assert proc.wait(60) == 0
    assert "stopped: requests in flight answered" in proc.stdout.read()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def test_options_and_a_missing_artefact_are_refused_before_listening(tmp_path):
  with pytest.raises(ValueError, match="bad setting: max_queue must be >= 1, got 0"):
    server.ServerOptions(max_queue=0).check()
  r = subprocess.run([sys.executable, "-m", "experiments.serve", "--artifact",
                      str(tmp_path), "--port", "0"], cwd=REPO, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path}/manifest.json: not found; {tmp_path} is not a scorer artefact")
  assert "listening" not in r.stdout


def test_the_load_scripts_answer_check_allows_only_a_swap_of_equal_scores():
  from experiments import serve_bench
  ref = {"items": [5, 3, 9], "scores": [2.0, 1.5, 1.0], "unknown": ["x"]}
  same = json.loads(json.dumps(ref))
  assert serve_bench.matches(same, ref)
  assert not serve_bench.matches({**same, "items": [5, 9, 3]}, ref)  # not near-ties
  assert not serve_bench.matches({**same, "items": [5, 3, 8]}, ref)
  assert not serve_bench.matches({**same, "scores": [2.0, 1.5, 1.1]}, ref)
  assert not serve_bench.matches({**same, "unknown": []}, ref)
  ties = {"items": [5, 3, 9], "scores": [2.0, 1.5, 1.5], "unknown": []}
  assert serve_bench.matches({**ties, "items": [5, 9, 3]}, ties)  # a swap of equals


def test_the_serve_tools_flags_are_the_server_options():
  from absl import flags
  from experiments import serve as serve_tool
  fv = flags.FlagValues()
  serve_tool.define_flags(fv)
  fv(["serve", "--artifact=a"])
  assert serve_tool.options_from_flags(fv) == server.ServerOptions()
  fv = flags.FlagValues()
  serve_tool.define_flags(fv)
  fv(["serve", "--artifact=a", "--max_queue=7", "--max_wait_ms=0.5"])
  assert serve_tool.options_from_flags(fv) == server.ServerOptions(max_queue=7,
                                                                   max_wait_ms=0.5)


def test_the_load_script_checks_every_answer(artefacts):
  from experiments import serve_bench
  rows = serve_bench.run(artefacts["a1"], [4], 0.3, pool=16, history=5, k=3)
  assert [r["path"] for r in rows] == ["in-process Scorer.recommend",
                                       *serve_bench.MODES]
  for r in rows:
    assert r["requests"] > 0 and r["wrong"] == 0 and r["failed"] == 0, r
  table = serve_bench.format_table(rows)
  assert "micro-batching at concurrency 4:" in table
