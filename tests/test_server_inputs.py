"""What enters the HTTP server (``jax_vaecf.serving.requests``), tried in-process on the ASGI
app over a tiny artefact: ids that were not UTF-8, malformed and hostile bodies, wrong
methods and paths, clients that stall or go away, reloads racing a deploy; and a
property test that any body gets the artefact's own answer or one JSON 4xx line."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("starlette")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from jax_vaecf.serving import export as export_lib  # noqa: E402
from jax_vaecf.serving import artefact as serve  # noqa: E402
from jax_vaecf.serving import http as server  # noqa: E402

from _asgi import AsgiClient  # noqa: E402

K = 5
# Ids as the readers hold them: "caf\udce9" is the Windows-1252 byte 0xE9 kept by
# surrogateescape; "é" is UTF-8 text; "6" is also asked for as the JSON integer 6.
IDS = (["caf\udce9", "caf\udce8", "é", "x y", "\udcff\udc80"]
       + [str(j) for j in range(7)])


def _write(folder, ids, k, seed):
  import jax
  from jax_vaecf import model as model_lib
  from jax_vaecf.training import steps as train_lib
  m = model_lib.build_model("multdae", len(ids), hidden_dims=(8,))
  params = train_lib.init_params(m, jax.random.PRNGKey(seed))
  export_lib.write_artifact(folder, m, params, np.array(ids), k,
                            model_info={"model": "multdae"})


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
  root = tmp_path_factory.mktemp("inputs")
  a1, a2 = str(root / "a1"), str(root / "a2")
  _write(a1, IDS, K, 0)
  _write(a2, IDS[::-1], K - 1, 1)
  return {"a1": a1, "a2": a2}


@pytest.fixture(scope="module")
def client(artefacts):
  app = server.create_app(artefacts["a1"], server.ServerOptions(request_timeout_s=0.5),
                          log=open(os.devnull, "w"))
  with AsgiClient(app) as c:
    for _ in range(600):
      if c.request("GET", "/health")[0] == 200:
        break
      import time
      time.sleep(0.1)
    yield c


@pytest.fixture(scope="module")
def scorer(artefacts):
  return serve.load(artefacts["a1"])


def _is_error_line(status, raw, statuses=range(400, 500)):
  body = json.loads(raw)
  return (status in statuses and set(body) == {"error"} and isinstance(body["error"], str)
          and "\n" not in body["error"] and len(body["error"]) < 400)


def test_ids_that_were_not_utf8_round_trip_as_json_escapes(client, scorer):
  body = b'{"items": ["caf\\udce9", 6, "\\u00e9", "\\ud800"], "k": 5}'
  status, raw = client.request("POST", "/recommend", body)
  assert status == 200, raw
  raw.decode("ascii")  # every non-ASCII character escaped: always encodable
  got = json.loads(raw)
  want = server.answer(scorer.recommend([["caf\udce9", 6, "é", "\ud800"]], K)[0])
  assert got == want
  assert got["unknown"] == ["\ud800"]
  assert set(got["items"]) <= set(IDS) - {"caf\udce9", "é", "6"}


@pytest.mark.parametrize("body, message", [
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b'{"items": [], "k": 2, "k": 5}', 'the field "k" is given twice'),
    (b'{"items": [NaN]}', "NaN is not a JSON value"),
    (b'{"items": ["\xff"]}', "not UTF-8"),
    (b'{"items": [[[[[[[[1]]]]]]]]}', "'items[0]' must be an item id"),
    (b'{"items": "12"}', "'items' must be a list of item ids, got str"),
    (b'{"users": [["1"]], "k": true}', "'k' must be an integer in [1, 5]"),
])
def test_malformed_bodies_are_one_json_line_400(client, body, message):
  status, raw = client.request("POST", "/recommend", body)
  assert _is_error_line(status, raw, (400,)), (status, raw)
  assert message in json.loads(raw)["error"]


@pytest.mark.parametrize("method, path, status, message", [
    ("GET", "/nope", 404, "no such endpoint"),
    ("GET", "/recommend", 405, "use POST"),
    ("DELETE", "/health", 405, "use GET, HEAD"),
])
def test_unknown_paths_and_methods_are_one_json_line(client, method, path, status, message):
  got, raw = client.request(method, path)
  assert _is_error_line(got, raw, (status,)), raw
  assert message in json.loads(raw)["error"]


def test_a_client_gone_mid_body_is_a_4xx_not_a_500(client):
  status, raw = client.request("POST", "/recommend", chunks=[b'{"items": ["1",'],
                               disconnect=True)
  assert _is_error_line(status, raw, (400,)), (status, raw)
  assert "disconnected after 15 bytes" in json.loads(raw)["error"]


def test_a_stalled_body_is_answered_408(client):
  status, raw = client.request("POST", "/recommend", chunks=[b'{"items": '], stall=True)
  assert _is_error_line(status, raw, (408,)), (status, raw)
  assert "not complete within 0.5 s (10 bytes received)" in json.loads(raw)["error"]


@pytest.mark.parametrize("host, status", [
    ("::ffff:127.0.0.1", 200), ("::1", 200), ("::ffff:10.0.0.1", 403), ("10.0.0.1", 403)])
def test_mapped_ipv4_loopback_may_reload(client, host, status):
  """``--host ::`` sees a reload from 127.0.0.1 as ``::ffff:127.0.0.1``."""
  got, raw = client.request("POST", "/admin/reload", client_host=host)
  assert got == status, raw


def test_a_reload_racing_a_deploy_serves_and_reports_one_artefact(artefacts, monkeypatch,
                                                                  tmp_path):
  """The documented deploy swaps a symlink; here it lands right after the loader first
  opens a file. The loaded scorer, its manifest and its reported sha256 must all be of
  the same artefact."""
  live = tmp_path / "live"
  os.symlink(artefacts["a1"], live)
  real_open, swapped = open, []

  def open_then_deploy(path, *args, **kw):
    f = real_open(path, *args, **kw)
    if not swapped:
      swapped.append(path)
      os.symlink(artefacts["a2"], tmp_path / "next")
      os.replace(tmp_path / "next", live)
    return f

  monkeypatch.setattr(serve, "open", open_then_deploy, raising=False)
  state = server.ServingState(str(live))
  model, digest = state._load_checked()  # pylint: disable=protected-access
  assert swapped
  monkeypatch.undo()
  digests = {name: server.manifest_digest(artefacts[name]) for name in ("a1", "a2")}
  which = "a1" if model.k == K else "a2"
  assert digest == digests[which]
  np.testing.assert_array_equal(model.item_ids, IDS if which == "a1" else IDS[::-1])


# ------------------------------------------------------------------- the property test

_ID = st.one_of(
    st.sampled_from(IDS + ["\ud800", "caf\udce7", ""]), st.integers(-3, 12),
    st.text(max_size=4), st.floats(allow_nan=False), st.booleans(), st.none(),
    st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=2),
                                                             st.integers(), max_size=1))
_ITEMS = st.one_of(st.lists(_ID, max_size=6), _ID)
_GOOD_ID = st.one_of(st.sampled_from(IDS + ["\ud800", "caf\udce7", ""]),
                    st.integers(-3, 12), st.text(max_size=4))
_GOOD_ITEMS = st.lists(_GOOD_ID, max_size=8)
_K = st.one_of(st.integers(-2, K + 2), st.floats(allow_nan=False), st.text(max_size=2),
               st.booleans(), st.none())


@st.composite
def _bodies(draw):
  """Raw bytes of a /recommend body: mostly JSON objects near the contract, some not."""
  kind = draw(st.sampled_from(["good items", "good users"] * 3
                              + ["items", "users", "both", "neither", "nested", "text"]))
  if kind.startswith("good"):
    data = ({"items": draw(_GOOD_ITEMS)} if kind == "good items"
            else {"users": draw(st.lists(_GOOD_ITEMS, max_size=4))})
    if draw(st.booleans()):
      data["k"] = draw(st.integers(1, K))
    return json.dumps(data, ensure_ascii=True).encode()
  if kind == "nested":
    depth = draw(st.integers(1, 3000))
    return b"[" * depth + b"]" * depth
  if kind == "text":
    return draw(st.binary(max_size=20))
  data = {}
  if kind in ("items", "both"):
    data["items"] = draw(_ITEMS)
  if kind in ("users", "both"):
    data["users"] = draw(st.one_of(st.lists(_ITEMS, max_size=3), _ID))
  if draw(st.booleans()):
    data["k"] = draw(_K)
  if draw(st.integers(0, 9)) == 0:
    data[draw(st.text(max_size=3))] = 1
  ascii_only = draw(st.booleans())
  text = json.dumps(data, ensure_ascii=ascii_only)
  # Without escaping, a lone surrogate can only be sent as invalid UTF-8.
  return text.encode("utf-8", "surrogatepass")


def _valid(data):
  """The contract, stated independently of the server: ``(histories, k)`` of a body it
  must answer, else None."""
  def is_id(x):
    return isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool))

  def ok_items(items):
    return isinstance(items, list) and all(is_id(x) for x in items)

  if not isinstance(data, dict) or set(data) - {"items", "users", "k"}:
    return None
  if ("items" in data) == ("users" in data):
    return None
  k = data.get("k", K)
  if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= K):
    return None
  users = data["users"] if "users" in data else [data["items"]]
  if not isinstance(users, list) or not all(ok_items(u) for u in users):
    return None
  return users, k


def _not_json(name):
  raise ValueError(f"{name} is not JSON")


def _parsed(body):
  try:
    return json.loads(body, parse_constant=_not_json)
  except (ValueError, RecursionError):
    return None


@settings(max_examples=60, deadline=None)
@given(body=_bodies())
def test_any_body_gets_the_artefacts_answer_or_one_json_4xx_line(client, scorer, body):
  status, raw = client.request("POST", "/recommend", body)
  hypothesis.event(f"status {status}")
  assert status != 500, raw
  valid = _valid(_parsed(body))
  if status != 200:
    assert _is_error_line(status, raw), (status, raw)
    assert valid is None, (body, raw)
    return
  assert valid is not None, (body, raw)
  histories, k = valid
  want = [server.answer(r) for r in scorer.recommend(histories, k)]
  got = json.loads(raw)
  assert got == ({"users": want} if "users" in _parsed(body) else want[0])


def test_a_connection_whose_headers_stall_is_closed(artefacts):
  """Slow clients cannot hold connections open: headers not complete within
  request_timeout_s close the connection (a real socket: the timer is uvicorn's side)."""
  import socket
  import threading
  import time
  uvicorn = pytest.importorskip("uvicorn")
  options = server.ServerOptions(request_timeout_s=0.3)
  app = server.create_app(artefacts["a1"], options, log=open(os.devnull, "w"))
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  uv = uvicorn.Server(uvicorn.Config(
      app, log_level="warning", access_log=False, lifespan="off",
      http=server.timed_http_protocol(options.request_timeout_s)))
  thread = threading.Thread(target=uv.run, kwargs={"sockets": [listener]}, daemon=True)
  thread.start()
  try:
    while not uv.started:
      time.sleep(0.02)
    with socket.create_connection(listener.getsockname(), timeout=10) as c:
      c.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\n")  # and nothing more
      t0 = time.perf_counter()
      assert c.recv(100) == b""  # closed by the server, not by our 10 s timeout
      assert time.perf_counter() - t0 < 5
  finally:
    uv.should_exit = True
    thread.join(timeout=30)
