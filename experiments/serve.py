"""Serve an exported artefact over HTTP: ``python -m experiments.serve --artifact DIR``.

  python -m experiments.export --workdir runs/demo --out runs/demo_artefact
  python -m experiments.serve --artifact runs/demo_artefact --port 8000
  curl -s localhost:8000/recommend -d '{"items": ["1", "50", "260"], "k": 5}'

Needs the ``serve`` extra (``pip install -e ".[serve]"``: Starlette and uvicorn). Binds
to 127.0.0.1 unless ``--host`` says otherwise; ``--port=0`` takes a free port. The
artefact is verified (every file's sha256) and warmed up before ``GET /health`` says
ready. SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight
finish (``--drain_timeout_s``) and exits 0; SIGHUP or ``POST /admin/reload`` (from a
loopback address) loads the artefact folder again, keeping the old one when the new one
fails its checks. The endpoints and the choice of Starlette are in docs/serving.md;
:mod:`jax_vaecf.serving.http` is the app.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import sys

from absl import app
from absl import flags

from experiments import cli

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags, defined when it runs (not at import: other tools have flags of
  these names): the artefact, the address, and one flag per
  :class:`jax_vaecf.serving.http.ServerOptions` field (same name, type, default and help)."""
  from jax_vaecf.serving import http as server  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("artifact", None, "The artefact folder python -m experiments.export "
                      "wrote (reloading reads it again).", flag_values=flag_values)
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every "
                      "interface).", flag_values=flag_values)
  flags.DEFINE_integer("port", 8000, "Port to listen on; 0 takes a free one (printed).",
                       flag_values=flag_values)
  for field in dataclasses.fields(server.ServerOptions):
    define = {int: flags.DEFINE_integer, float: flags.DEFINE_float}[type(field.default)]
    define(field.name, field.default, field.metadata["help"], flag_values=flag_values)


def options_from_flags(flag_values: flags.FlagValues = flags.FLAGS):
  from jax_vaecf.serving import http as server  # pylint: disable=import-outside-toplevel
  return server.ServerOptions(**{f.name: flag_values[f.name].value
                                 for f in dataclasses.fields(server.ServerOptions)})


def bind(host: str, port: int) -> socket.socket:
  """A listening-ready socket on ``host:port`` (IPv4 or IPv6), or ValueError."""
  try:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
  except OSError as e:
    raise ValueError(f"--host={host} --port={port}: cannot listen there "
                     f"({e.strerror or e})") from None
  sock.set_inheritable(True)
  return sock


def main(argv):
  cli.start(argv, required=("artifact",))
  if not 0 <= FLAGS.port <= 65535:
    raise app.UsageError(f"--port must be in [0, 65535], got {FLAGS.port}")
  try:
    import uvicorn  # pylint: disable=import-outside-toplevel
    from jax_vaecf.serving import http as server  # pylint: disable=import-outside-toplevel
    import starlette.applications  # pylint: disable=import-outside-toplevel
    del starlette  # imported only to fail here, with the fix, when it is missing
  except ImportError as e:
    print(f"error: the server needs the serve extra ({e}); pip install "
          "'jax_vaecf[serve]'", file=sys.stderr)
    sys.exit(1)
  options = options_from_flags()
  try:
    options.check()
    # Refuse a missing or damaged artefact before listening; the server loads it again
    # in the background (and /health says when it is ready).
    from jax_vaecf.serving import artefact as serve_lib  # pylint: disable=import-outside-toplevel
    serve_lib.read_manifest(FLAGS.artifact)
    sock = bind(FLAGS.host, FLAGS.port)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  host, port = sock.getsockname()[:2]
  shown = f"[{host}]" if ":" in host else host
  print(f"listening on http://{shown}:{port} (artefact {FLAGS.artifact})", flush=True)
  config = uvicorn.Config(
      server.create_app(FLAGS.artifact, options, reload_signal=signal.SIGHUP),
      log_level="warning", access_log=False, lifespan="on",
      http=server.timed_http_protocol(options.request_timeout_s),
      timeout_graceful_shutdown=options.drain_timeout_s)
  # uvicorn re-raises the signal that stopped it once it has drained; with a handler of
  # our own in place that ends in a normal exit (status 0) instead of death by signal.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: None)
  uvicorn.Server(config).run(sockets=[sock])
  print("stopped: requests in flight answered", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
