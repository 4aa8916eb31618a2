"""An HTTP server on an exported scorer artefact: an ASGI app (Starlette) with micro-batching.

Optional: needs the ``serve`` extra (``pip install 'jax_vaecf[serve]'``: Starlette and
uvicorn); nothing else in the library imports this module. ``python -m experiments.serve``
runs it; :func:`create_app` gives the app to any ASGI server.

Endpoints (JSON in and out; every error is a 4xx or 5xx with ``{"error": one line}``):

* ``POST /recommend``: ``{"items": [ids], "k": 10}`` for one user, answered with
  ``{"items": [ids], "scores": [floats], "unknown": [ids]}``; or ``{"users": [[ids],
  ...], "k": 10}``, answered with ``{"users": [one such object per user]}``. Ids are
  strings or integers, compared by their text with the artefact's item table; unknown
  ids are reported and skipped, and a user's own items are never returned. ``k``
  defaults to the artefact's and may not exceed it.
* ``GET /health``: 200 ``{"status": "ready"}`` once the artefact is loaded, verified and
  one warm-up call has compiled; 503 ``{"status": "loading"}`` before.
* ``GET /metadata``: the model, items, ``k``, platforms and the sha256 of the
  artefact's manifest (which holds every file's digest), and how often it was loaded.
* ``POST /admin/reload``: loads the artefact folder again (a new export put in its
  place); only from a loopback address. A new artefact that fails its checks is refused
  (409) and the one loaded keeps serving; SIGHUP does the same.

Requests are micro-batched: :class:`MicroBatcher` scores, in one call of the
artefact's program in one worker thread, every request queued while the previous call
ran (up to ``max_batch_users`` users), and waits up to ``max_wait_ms`` more only for
requests already being received, so a lone request is never held back; its queue holds
at most ``max_queue`` requests and answers 503 beyond. A batch is scored, ids and all, by the
artefact that was loaded when the batch was formed, so a reload never mixes two.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Sequence

from jax_vaecf.serving import artefact as serve_lib
from jax_vaecf.serving import requests as server_inputs


def option(default, help: str):
  """A :class:`ServerOptions` field: its default and its one-line help, declared together;
  ``experiments.serve`` makes its flags from them."""
  return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ServerOptions:
  """How the server batches, bounds and drains its work (each field's ``help`` says what
  it bounds; :meth:`check` refuses values out of range).

  Attributes:
    max_wait_ms: float, longest a batch waits for requests still being received.
    max_batch_users: int, users scored in one call at most.
    max_queue: int, requests waiting to be scored at most (beyond: 503).
    max_request_users: int, users in one batch request at most (beyond: 413).
    max_body_bytes: int, request body size at most (beyond: 413).
    drain_timeout_s: float, seconds in-flight requests may take after SIGTERM.
    request_timeout_s: float, seconds a client may take to send headers, and the body.
  """

  max_wait_ms: float = option(2.0, "Longest a batch waits for requests still being "
                                   "received to join it (milliseconds; a request alone "
                                   "never waits; 0 = only those already queued).")
  max_batch_users: int = option(512, "Users scored in one call at most (one of the "
                                     "artefact's padded shapes is 512); 1 scores each "
                                     "request alone.")
  max_queue: int = option(1024, "Requests waiting to be scored at most; beyond, 503.")
  max_request_users: int = option(4096, "Users in one batch request at most; beyond, 413.")
  max_body_bytes: int = option(1 << 20, "Request body size at most (bytes); beyond, 413.")
  drain_timeout_s: float = option(30.0, "On SIGTERM: seconds in-flight requests may take "
                                        "to finish before they are cut off.")
  request_timeout_s: float = option(30.0, "Seconds a client may take to send a request's "
                                          "headers, and again its body; a slower one is "
                                          "cut off (headers) or answered 408 (body).")

  def check(self) -> None:
    """Checks every option's range.

    Raises:
      ValueError: naming the first option out of range.
    """
    for ok, message in (
        (self.max_wait_ms >= 0, f"max_wait_ms must be >= 0, got {self.max_wait_ms}"),
        (self.max_batch_users >= 1, f"max_batch_users must be >= 1, got "
                                    f"{self.max_batch_users}"),
        (self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}"),
        (self.max_request_users >= 1, f"max_request_users must be >= 1, got "
                                      f"{self.max_request_users}"),
        (self.max_body_bytes >= 64, f"max_body_bytes must be >= 64, got "
                                    f"{self.max_body_bytes}"),
        (self.drain_timeout_s > 0, f"drain_timeout_s must be > 0, got "
                                   f"{self.drain_timeout_s}"),
        (self.request_timeout_s > 0, f"request_timeout_s must be > 0, got "
                                     f"{self.request_timeout_s}")):
      if not ok:
        raise ValueError(f"bad setting: {message}")


def option_help(name: str) -> str:
  return ServerOptions.__dataclass_fields__[name].metadata["help"]


# ---------------------------------------------------------------------- requests

# What enters the server is checked in one module, next to this one.
RequestError = server_inputs.RequestError
parse_request = server_inputs.parse_request


def answer(result: dict) -> dict:
  """One user's result of :meth:`jax_vaecf.serving.artefact.Scorer.recommend` as JSON values.

  Args:
    result: ``{"items": raw ids (n,), "scores": float32 (n,), "unknown": [raw ids]}``.

  Returns:
    ``{"items": [ids], "scores": [float], "unknown": [ids]}`` of Python values.
  """
  return {"items": result["items"].tolist(),
          "scores": [float(s) for s in result["scores"].tolist()],
          "unknown": list(result["unknown"])}


# ------------------------------------------------------------------ micro-batching


class Overloaded(RuntimeError):
  """The queue of requests waiting to be scored is full."""


@dataclasses.dataclass
class _Entry:
  histories: list
  k: int
  future: asyncio.Future


class MicroBatcher:
  """Gathers concurrent requests into one scoring call.

  Args:
    model: returns the loaded artefact to score a batch with (read once per batch).
    options: the batching limits.
    executor: where scoring runs (one thread: calls reach the device one at a time).
  """

  def __init__(self, model: Callable[[], Any], options: ServerOptions,
               executor: concurrent.futures.Executor):
    self._model = model
    self._options = options
    self._executor = executor
    self._queue: asyncio.Queue[_Entry] = asyncio.Queue(maxsize=options.max_queue)
    self._arrived = asyncio.Event()
    self._incoming = 0  # requests being read and checked, not yet submitted
    self._task: asyncio.Task | None = None
    self.batches = 0  # scoring calls made, for /metadata and the tests
    self.users = 0

  def start(self) -> None:
    """Starts the worker task on the running event loop (call from inside it)."""
    self._task = asyncio.get_running_loop().create_task(self._run())

  async def stop(self) -> None:
    """Scores what is queued, then ends the worker."""
    while not self._queue.empty():
      await asyncio.sleep(0.01)
    if self._task is not None:
      self._task.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await self._task

  @contextlib.contextmanager
  def incoming(self):
    """Marks a request on its way to :meth:`submit` (its body being read and checked).
    A batch waits for such requests only: a request alone is scored at once, never
    held back by ``max_wait_ms``."""
    self._incoming += 1
    try:
      yield
    finally:
      self._incoming -= 1
      self._arrived.set()

  async def submit(self, histories: list, k: int) -> list[dict]:
    """Scores one request together with the others queued meanwhile.

    Args:
      histories: per user, a list of raw item ids (checked by :func:`parse_request`).
      k: items per user, at most the artefact's ``k``.

    Returns:
      Per user of ``histories``, the artefact's ``recommend`` result: ``{"items": raw
      ids (n,), "scores": float32 (n,), "unknown": [raw ids]}``.

    Raises:
      Overloaded: at once, when ``max_queue`` requests are already waiting.
      ValueError: the artefact's scores are not finite (a diverged model).
    """
    future = asyncio.get_running_loop().create_future()
    try:
      self._queue.put_nowait(_Entry(histories, k, future))
    except asyncio.QueueFull:
      raise Overloaded(f"{self._options.max_queue} requests are waiting to be scored; "
                       "try again shortly") from None
    self._arrived.set()
    return await future

  def _take_queued(self, batch: list[_Entry], users: int) -> int:
    while users < self._options.max_batch_users and not self._queue.empty():
      entry = self._queue.get_nowait()
      batch.append(entry)
      users += len(entry.histories)
    return users

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    wait_s = self._options.max_wait_ms / 1000.0
    while True:
      first = await self._queue.get()
      batch, users = [first], len(first.histories)
      deadline = loop.time() + wait_s
      while True:
        users = self._take_queued(batch, users)
        left = deadline - loop.time()
        if (users >= self._options.max_batch_users or left <= 0
            or not self._incoming):
          break
        self._arrived.clear()
        try:
          await asyncio.wait_for(self._arrived.wait(), left)
        except TimeoutError:
          users = self._take_queued(batch, users)
          break
      model = self._model()  # one artefact for the whole batch: ids and scores
      try:
        results = await loop.run_in_executor(self._executor, _score, model, batch)
      except Exception as e:  # pylint: disable=broad-except
        for entry in batch:
          if not entry.future.done():
            entry.future.set_exception(e)
        continue
      self.batches += 1
      self.users += users
      for entry, result in zip(batch, results):
        if not entry.future.done():  # a client that went away cancelled its future
          entry.future.set_result(result)


def _score(model, batch: Sequence[_Entry]) -> list[list[dict]]:
  """Scores every user of the batch in one ``recommend`` call (at the batch's largest
  ``k``; a smaller ``k`` is a prefix of the same ranking) and splits the results."""
  histories = [h for entry in batch for h in entry.histories]
  k = max(entry.k for entry in batch)
  results = model.recommend(histories, k)
  out, at = [], 0
  for entry in batch:
    mine = results[at:at + len(entry.histories)]
    at += len(entry.histories)
    if entry.k < k:
      mine = [{"items": r["items"][:entry.k], "scores": r["scores"][:entry.k],
               "unknown": r["unknown"]} for r in mine]
    out.append(mine)
  return out


# ----------------------------------------------------------------------- artefacts


def manifest_digest(folder: str) -> str:
  """The digest that names a whole artefact.

  Args:
    folder: the artefact folder.

  Returns:
    The hex sha256 of its ``manifest.json``, which lists every file's digest.

  Raises:
    FileNotFoundError: the folder has no manifest.
  """
  return serve_lib.sha256_of(os.path.join(folder, serve_lib.MANIFEST))


def load_and_warm(folder: str):
  """Loads an artefact and compiles it for one user by a warm-up call.

  Args:
    folder: the artefact folder.

  Returns:
    Its :class:`jax_vaecf.serving.artefact.Scorer`, verified (:func:`jax_vaecf.serving.artefact.load`).

  Raises:
    jax_vaecf.serving.artefact.ArtifactError: a missing, altered or foreign file (a ValueError).
  """
  scorer = serve_lib.load(folder)
  scorer.recommend([[]], 1)
  return scorer


@dataclasses.dataclass
class Loaded:
  """The artefact being served."""

  model: Any
  digest: str
  loaded_at: float
  generation: int


class ServingState:
  """The served artefact and its replacement; reloads run in their own thread.

  Args:
    folder: the artefact folder, read again at each :meth:`load`.
    load: takes the folder, returns the scorer (default :func:`load_and_warm`).
  """

  def __init__(self, folder: str, load: Callable[[str], Any] = load_and_warm):
    self.folder = folder
    self._load = load
    self.current: Loaded | None = None
    self.error: str | None = None  # why the first load failed
    self._reload_lock = asyncio.Lock()

  async def load(self) -> Loaded:
    """Loads the folder's artefact (off the event loop) and serves it from now on.

    Returns:
      The new :class:`Loaded` (scorer, manifest digest, time, generation).

    Raises:
      Exception: the loader's error (``serve.ArtifactError`` for a damaged artefact);
        the artefact served before, if any, then stays.
    """
    async with self._reload_lock:
      loop = asyncio.get_running_loop()
      model, digest = await loop.run_in_executor(None, self._load_checked)
      generation = 1 if self.current is None else self.current.generation + 1
      self.current = Loaded(model, digest, time.time(), generation)
      return self.current

  def _load_checked(self):
    model = self._load(self.folder)
    # The digest of the bytes the scorer was loaded from: hashing the folder again
    # could name an artefact deployed in between.
    digest = getattr(model, "manifest_sha256", None)
    if digest is None:  # a stand-in loader of the tests
      with contextlib.suppress(FileNotFoundError):
        digest = manifest_digest(self.folder)
    return model, digest


# ----------------------------------------------------------------------------- app


def _json(status: int, body: dict, headers: dict | None = None):
  from starlette.responses import Response  # pylint: disable=import-outside-toplevel
  return Response(server_inputs.render(body), status_code=status, headers=headers,
                  media_type="application/json")


async def _read_body(request, limit: int, timeout_s: float) -> bytes:
  """The request's body, or :class:`RequestError`: 413 past ``limit`` bytes, 408 when it
  is not complete within ``timeout_s`` (a slow or stalled client), 400 when the client
  went away before sending all of it."""
  from starlette.requests import ClientDisconnect  # pylint: disable=import-outside-toplevel
  server_inputs.body_size(request.headers.get("content-length"), limit)
  chunks, size = [], 0

  async def read():
    nonlocal size
    async for chunk in request.stream():
      size += len(chunk)
      if size > limit:
        raise RequestError(413, f"request body over {limit} bytes")
      chunks.append(chunk)

  try:
    await asyncio.wait_for(read(), timeout_s)
  except TimeoutError:
    raise RequestError(408, f"the request body was not complete within {timeout_s:g} s "
                            f"({size} bytes received)") from None
  except ClientDisconnect:
    raise RequestError(400, f"the client disconnected after {size} bytes of the "
                            "request body") from None
  return b"".join(chunks)


def create_app(folder: str, options: ServerOptions = ServerOptions(), *,
               load: Callable[[str], Any] = load_and_warm, log=sys.stderr,
               reload_signal: int | None = None):
  """The ASGI app serving the artefact in ``folder`` (endpoints: the module docstring).

  The artefact is loaded and warmed up in the background once the app starts
  (``/health`` says when it is ready); a load that fails is reported there and in
  ``log``, not raised.

  Args:
    folder: the artefact folder (``python -m experiments.export``).
    options: batching and limits, checked first.
    load: replaces :func:`load_and_warm` (tests): takes the folder, returns an object
      with ``recommend(histories, k)``, ``k``, ``n_items`` and ``manifest`` as
      :class:`jax_vaecf.serving.artefact.Scorer` has.
    log: a text stream; gets one line per request and per load.
    reload_signal: a signal number (``signal.SIGHUP``; the main thread's event loop
      only) that reloads the artefact as ``POST /admin/reload`` does; ``None``: none.

  Returns:
    The ASGI application (Starlette, wrapped to log each request).

  Raises:
    ValueError: an option out of range (:meth:`ServerOptions.check`).
    ImportError: Starlette is not installed (the ``serve`` extra).
  """
  from starlette.applications import Starlette  # pylint: disable=import-outside-toplevel
  from starlette.exceptions import HTTPException  # pylint: disable=import-outside-toplevel
  from starlette.routing import Route  # pylint: disable=import-outside-toplevel

  options.check()
  service = _Service(folder, options, load, log, reload_signal)
  app = Starlette(routes=[Route("/recommend", service.recommend, methods=["POST"]),
                          Route("/health", service.health, methods=["GET"]),
                          Route("/metadata", service.metadata, methods=["GET"]),
                          Route("/admin/reload", service.reload, methods=["POST"])],
                  lifespan=service.lifespan,
                  exception_handlers={HTTPException: _http_error, Exception: _server_error})
  return _RequestLog(app, log)


_STILL_LOADING = "the artefact is still loading; see GET /health"


class _Service:
  """The app's endpoints and what they share: the serving state and the micro-batcher,
  both made when the app starts (:meth:`lifespan`) and None before."""

  def __init__(self, folder: str, options: ServerOptions, load: Callable[[str], Any],
               log, reload_signal: int | None):
    self.folder = folder
    self.options = options
    self._load = load
    self.log = log
    self.reload_signal = reload_signal
    self.state: ServingState | None = None
    self.batcher: MicroBatcher | None = None

  def served(self) -> Loaded | None:
    """The artefact being served, or None while none is loaded."""
    return None if self.state is None else self.state.current

  async def recommend(self, request):
    """``POST /recommend``: one user's or a batch's recommendations."""
    current = self.served()
    if current is None:
      return _json(503, {"error": _STILL_LOADING})
    options = self.options
    try:
      with self.batcher.incoming():
        body = await _read_body(request, options.max_body_bytes,
                                options.request_timeout_s)
        histories, k, batch = parse_request(body, current.model.k,
                                            options.max_request_users)
      results = await self.batcher.submit(histories, k)
    except RequestError as e:
      return _json(e.status, {"error": str(e)})
    except Overloaded as e:
      return _json(503, {"error": str(e)})
    except ValueError as e:  # the model's scores are not finite
      return _json(500, {"error": str(e).splitlines()[0]})
    if batch:
      return _json(200, {"users": [answer(r) for r in results]})
    return _json(200, answer(results[0]))

  async def health(self, request):
    """``GET /health``: ready (200), or loading or failed (503)."""
    state = self.state
    if state is not None and state.current is not None:
      return _json(200, {"status": "ready", "generation": state.current.generation})
    if state is not None and state.error is not None:
      return _json(503, {"status": "failed", "error": state.error})
    return _json(503, {"status": "loading"})

  async def metadata(self, request):
    """``GET /metadata``: what is served, since when, and the batching so far."""
    current = self.served()
    if current is None:
      return _json(503, {"error": _STILL_LOADING})
    manifest = current.model.manifest
    return _json(200, {
        "format": manifest.get("format"), "model": manifest.get("model"),
        "n_items": int(current.model.n_items), "k": int(current.model.k),
        "platforms": manifest.get("platforms"), "metrics": manifest.get("metrics"),
        "artifact_sha256": current.digest, "generation": current.generation,
        "loaded_at": current.loaded_at,
        "batching": {"max_wait_ms": self.options.max_wait_ms,
                     "max_batch_users": self.options.max_batch_users,
                     "batches": self.batcher.batches,
                     "users": self.batcher.users}})

  async def reload(self, request):
    """``POST /admin/reload`` (loopback only): loads the folder again; 409 keeps the
    artefact served before when the new one is refused."""
    if not server_inputs.is_loopback(request.client.host if request.client else None):
      return _json(403, {"error": "reloading is allowed from a loopback address only"})
    try:
      current = await self.state.load()
    except Exception as e:  # pylint: disable=broad-except
      return _json(409, {"error": f"the new artefact was refused ({_first_line(e)}); the "
                                  "one loaded before keeps serving"})
    return _json(200, {"status": "reloaded", "artifact_sha256": current.digest,
                       "generation": current.generation})

  @contextlib.asynccontextmanager
  async def lifespan(self, app):
    """Starts the batcher and the first load (in the background), installs the reload
    signal's handler; on shutdown undoes them and drains the batcher."""
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="scorer")
    state = ServingState(self.folder, self._load)
    batcher = MicroBatcher(lambda: state.current.model, self.options, executor)
    self.state, self.batcher = state, batcher
    batcher.start()
    loop = asyncio.get_running_loop()
    loader = loop.create_task(self._first_load())
    if self.reload_signal is not None:
      loop.add_signal_handler(self.reload_signal,
                              lambda: loop.create_task(self._reload_logged()))
    try:
      yield
    finally:
      if self.reload_signal is not None:
        loop.remove_signal_handler(self.reload_signal)
      loader.cancel()
      await batcher.stop()
      executor.shutdown(wait=True)

  async def _first_load(self) -> None:
    """Loads the artefact when the app starts; a failure is kept for ``/health``."""
    state = self.state
    try:
      await state.load()
      print(f"ready: serving {self.folder} ({state.current.model.n_items} items, k="
            f"{state.current.model.k})", file=self.log, flush=True)
    except Exception as e:  # pylint: disable=broad-except
      state.error = _first_line(e)
      print(f"error: {state.error}", file=self.log, flush=True)

  async def _reload_logged(self) -> None:
    """The reload signal's reload: as ``POST /admin/reload``, answered in the log."""
    try:
      current = await self.state.load()
      print(f"reloaded: generation {current.generation}, sha256 {current.digest}",
            file=self.log, flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"error: the new artefact was refused ({_first_line(e)}); the one loaded "
            "before keeps serving", file=self.log, flush=True)


def timed_http_protocol(timeout_s: float):
  """uvicorn's h11 protocol, closing a connection whose request headers are not complete
  ``timeout_s`` seconds after it opened (or after its previous answer): slow or stalled
  clients cannot hold connections open indefinitely. The body has its own limit in the
  app (408).

  Args:
    timeout_s: seconds a client may take to send a request's headers.

  Returns:
    The protocol class, to pass as ``uvicorn.Config(http=...)``.

  Raises:
    ImportError: uvicorn is not installed (the ``serve`` extra).
  """
  from uvicorn.protocols.http.h11_impl import H11Protocol  # pylint: disable=import-outside-toplevel

  class TimedH11Protocol(H11Protocol):
    _header_timer = None

    def connection_made(self, transport):
      super().connection_made(transport)
      self._arm_header_timer()

    def on_response_complete(self):
      super().on_response_complete()
      self._arm_header_timer()

    def connection_lost(self, exc):
      if self._header_timer is not None:
        self._header_timer.cancel()
      super().connection_lost(exc)

    def _arm_header_timer(self):
      if self._header_timer is not None:
        self._header_timer.cancel()
      self._header_timer = self.loop.call_later(timeout_s, self._headers_overdue)

    def _headers_overdue(self):
      waiting = self.cycle is None or self.cycle.response_complete
      if waiting and not self.transport.is_closing():
        self.transport.close()

  return TimedH11Protocol


async def _http_error(request, exc):
  """Starlette's own refusals (404 no such path, 405 wrong method) as JSON errors."""
  where = f"{request.method} {request.url.path}"
  allowed = sorted(m.strip() for m in (exc.headers or {}).get("Allow", "").split(","))
  message = {404: f"{where}: no such endpoint; the endpoints are POST /recommend, GET "
                  "/health, GET /metadata, POST /admin/reload",
             405: f"{where}: method not allowed; use {', '.join(allowed)}"}
  return _json(exc.status_code, {"error": message.get(exc.status_code, f"{where}: "
                                                       f"{exc.detail}")},
               headers=exc.headers)


async def _server_error(request, exc):
  """A defect of the server: a one-line JSON 500 (the server's log has the traceback)."""
  return _json(500, {"error": f"internal error: {type(exc).__name__}: {_first_line(exc)}"})


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


class _RequestLog:
  """ASGI middleware: one line per request (method, path, status, milliseconds)."""

  def __init__(self, app, log):
    self.app = app
    self.log = log

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    t0 = time.perf_counter()
    status = [500]

    async def send_logged(message):
      if message["type"] == "http.response.start":
        status[0] = message["status"]
      await send(message)

    try:
      await self.app(scope, receive, send_logged)
    finally:
      print(f"{scope['method']} {scope['path']} {status[0]} "
            f"{1000 * (time.perf_counter() - t0):.1f} ms", file=self.log, flush=True)


__all__ = ["ServerOptions", "RequestError", "Overloaded", "MicroBatcher", "ServingState",
           "create_app", "parse_request", "answer", "timed_http_protocol", "load_and_warm",
           "manifest_digest"]
