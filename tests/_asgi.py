"""An in-process ASGI client for the server's tests: the app's lifespan and requests run
on one event loop in a background thread, with no socket and no HTTP client package.
A request's body can be sent in chunks, and the client can disconnect mid-body."""

from __future__ import annotations

import asyncio
import json
import threading


class AsgiClient:
  """Runs ``app`` (lifespan started on enter, shut down on exit)."""

  def __init__(self, app, client_host: str = "127.0.0.1"):
    self.app = app
    self.client_host = client_host
    self.loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
    self._lifespan_in: asyncio.Queue | None = None
    self._lifespan_task = None

  def __enter__(self):
    self._thread.start()
    self._run(self._start())
    return self

  def __exit__(self, *exc):
    self._run(self._stop())
    self.loop.call_soon_threadsafe(self.loop.stop)
    self._thread.join(timeout=30)
    self.loop.close()

  def _run(self, coro, timeout=120):
    return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

  async def _start(self):
    self._lifespan_in = asyncio.Queue()
    out: asyncio.Queue = asyncio.Queue()
    await self._lifespan_in.put({"type": "lifespan.startup"})
    self._lifespan_task = asyncio.ensure_future(self.app(
        {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
        self._lifespan_in.get, out.put))
    message = await out.get()
    assert message["type"] == "lifespan.startup.complete", message
    self._lifespan_out = out

  async def _stop(self):
    await self._lifespan_in.put({"type": "lifespan.shutdown"})
    message = await self._lifespan_out.get()
    assert message["type"] == "lifespan.shutdown.complete", message
    await self._lifespan_task

  def request(self, method: str, path: str, body: bytes = b"", *,
              chunks: list[bytes] | None = None, disconnect: bool = False,
              stall: bool = False, client_host: str | None = None
              ) -> tuple[int, bytes]:
    """``(status, body)`` of one request. ``chunks`` (default ``[body]``) are sent one
    ``http.request`` message each; ``disconnect``: the client goes away after them
    instead of ending the body (status 0 when no response was started); ``stall``: the
    client sends no more and never ends the body."""
    return self._run(self._request(method, path, chunks or [body], disconnect, stall,
                                   client_host or self.client_host))

  async def _request(self, method, path, chunks, disconnect, stall, host):
    incoming = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    if disconnect:
      incoming.append({"type": "http.disconnect"})
    elif not stall:
      incoming[-1]["more_body"] = False
    sent: list[dict] = []

    async def receive():
      if incoming:
        return incoming.pop(0)
      await asyncio.sleep(3600)  # the body is over: a real client waits for its answer

    async def send(message):
      sent.append(message)

    size = sum(len(c) for c in chunks)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": b"", "client": (host, 50000),
             "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json")]
             + ([] if disconnect or stall
                else [(b"content-length", str(size).encode())])}
    await self.app(scope, receive, send)
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), 0)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body

  def json(self, method: str, path: str, body: bytes = b"", **kw):
    """``(status, decoded JSON)``; fails when the answer is not JSON."""
    status, raw = self.request(method, path, body, **kw)
    return status, json.loads(raw)
