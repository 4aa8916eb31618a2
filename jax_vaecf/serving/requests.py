"""What enters the HTTP server, checked in one place: request bodies, ``k``, item ids,
client addresses; and what leaves it, JSON that any id survives.

Standard library only (the server's Starlette app calls these); every refusal is a
:class:`RequestError` with its HTTP status and one line naming the field at fault.

Item ids are JSON strings or integers. An id that was not UTF-8 in the data file is held
as text with lone surrogates (``U+DC80``-``U+DCFF``, Python's ``surrogateescape``): the
server writes it as a JSON ``\\udcXX`` escape, and the same escape in a request names the
same item. Answers are written in ASCII JSON (every other character escaped too), so
they always encode and every JSON parser reads back the exact ids.
"""

from __future__ import annotations

import ipaddress
import json

# The fields of a /recommend body.
FIELDS = ("items", "users", "k")
# Longest rendering of a refused value quoted in a message.
_SHOWN_CHARS = 60


class RequestError(ValueError):
  """A request the server refuses: its HTTP status and a one-line reason.

  Args:
    status: the HTTP status to answer with (400, 408, 413).
    message: one line naming the field at fault.
  """

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def shown(value) -> str:
  """A JSON value for a message: ASCII, one line, at most ~60 characters; containers
  by their kind only (a deeply nested one is never rendered)."""
  if isinstance(value, dict):
    return "an object"
  if isinstance(value, list):
    return "a list"
  text = json.dumps(value, ensure_ascii=True)
  return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def _no_duplicate_keys(pairs):
  seen = {}
  for key, value in pairs:
    if key in seen:
      raise RequestError(400, f"malformed JSON: the field {shown(key)} is given twice")
    seen[key] = value
  return seen


def _no_constant(name):
  raise RequestError(400, f"malformed JSON: {name} is not a JSON value")


def decode_body(body: bytes):
  """The JSON value of a request body (UTF-8, -16 or -32), or :class:`RequestError` 400:
  not JSON, nested too deeply to parse, a field given twice, ``NaN``/``Infinity``."""
  try:
    return json.loads(body, object_pairs_hook=_no_duplicate_keys,
                      parse_constant=_no_constant)
  except RecursionError:
    raise RequestError(400, "malformed JSON: nested too deeply (a request is at most "
                            "three levels: an object, 'users', a user's items)") from None
  except UnicodeDecodeError as e:
    raise RequestError(400, f"malformed JSON: not UTF-8 text ({e.reason} at byte "
                            f"{e.start})") from None
  except ValueError as e:
    if isinstance(e, RequestError):
      raise
    raise RequestError(400, f"malformed JSON: {str(e).splitlines()[0]}") from None


def is_id(value) -> bool:
  """Item ids are JSON strings or integers (``true`` is not an integer here)."""
  return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def check_k(k, max_k: int) -> int:
  if not (isinstance(k, int) and not isinstance(k, bool)) or not 1 <= k <= max_k:
    raise RequestError(400, f"'k' must be an integer in [1, {max_k}] (the artefact's k), "
                            f"got {shown(k)}")
  return k


def check_items(items, where: str) -> list:
  if not isinstance(items, list):
    raise RequestError(400, f"'{where}' must be a list of item ids, got "
                            f"{type(items).__name__}")
  for i, raw in enumerate(items):
    if not is_id(raw):
      raise RequestError(400, f"'{where}[{i}]' must be an item id (a string or an "
                              f"integer), got {shown(raw)}")
  return items


def parse_request(body: bytes, max_k: int, max_users: int
                  ) -> tuple[list[list], int, bool]:
  """Reads a ``/recommend`` body: ``{"items": [ids], "k": k}`` or ``{"users": [[ids],
  ...], "k": k}``.

  Args:
    body: the raw request body (JSON in UTF-8, -16 or -32).
    max_k: the artefact's ``k``: the default and the largest ``k`` allowed.
    max_users: users one request may hold at most.

  Returns:
    ``(histories, k, batch)``: per user a list of raw ids (str or int), ``k`` an int,
    and whether the body was a batch (``"users"``).

  Raises:
    RequestError: 400 for a body that is not such an object (bad JSON, an unknown
      field, both or neither of ``items`` / ``users``, a bad ``k`` or id), 413 for
      more than ``max_users`` users; its message names the field in one line.
  """
  data = decode_body(body)
  if not isinstance(data, dict):
    raise RequestError(400, "expected a JSON object with 'items' (one user) or 'users' "
                            "(a list of users' item lists), and optionally 'k'")
  unknown = sorted(set(data) - set(FIELDS))
  if unknown:
    raise RequestError(400, f"unknown field {unknown[0][:_SHOWN_CHARS]!r}; expected "
                            "'items' or 'users', and 'k'")
  if ("items" in data) == ("users" in data):
    raise RequestError(400, "give exactly one of 'items' (one user's item ids) and "
                            "'users' (a list of users' item lists)")
  k = check_k(data.get("k", max_k), max_k)
  batch = "users" in data
  users = data["users"] if batch else [data["items"]]
  if not isinstance(users, list):
    raise RequestError(400, f"'users' must be a list of item lists, got "
                            f"{type(users).__name__}")
  if len(users) > max_users:
    raise RequestError(413, f"{len(users)} users in one request; at most {max_users}")
  for u, items in enumerate(users):
    check_items(items, f"users[{u}]" if batch else "items")
  return users, k, batch


def body_size(content_length: str | None, limit: int) -> None:
  """Refuses (413) a declared body over ``limit`` bytes before any of it is read."""
  if content_length is not None and content_length.isdigit() and int(content_length) > limit:
    raise RequestError(413, f"request body of {int(content_length)} bytes; at most {limit}")


def is_loopback(host: str | None) -> bool:
  """Whether a client address is loopback; an IPv4 address mapped into IPv6
  (``::ffff:127.0.0.1``, how a dual-stack ``--host ::`` sees 127.0.0.1) counts as the
  IPv4 address it maps."""
  try:
    address = ipaddress.ip_address(host) if host is not None else None
  except ValueError:
    return False
  if address is None:
    return False
  mapped = getattr(address, "ipv4_mapped", None)
  return (mapped or address).is_loopback


def render(body) -> bytes:
  """A JSON answer as bytes: ASCII (so ids with lone surrogates encode, as ``\\udcXX``
  escapes), no ``NaN``/``Infinity`` (not JSON)."""
  return json.dumps(body, ensure_ascii=True, allow_nan=False,
                    separators=(",", ":")).encode("ascii")


__all__ = ["RequestError", "FIELDS", "decode_body", "is_id", "check_k", "check_items",
           "parse_request", "body_size", "is_loopback", "render", "shown"]
