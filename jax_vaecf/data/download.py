"""Fetching the archives of the data sets that have one; clear instructions for the rest.

Downloads stream into a temporary file in the cache folder while an md5 is computed,
check the length announced by the server and the published checksum, then
``os.replace`` the file to its final name. Extraction refuses any archive member whose
path would leave the target folder and also extracts via a temporary folder.

Which archive (URL, md5) belongs to which data set, and where to get the others by hand,
is each data set's entry in :mod:`registry`. Checksums: GroupLens publishes md5 sums (no
sha256) for its frozen archives; the values there are the ones recorded for these zips
by other loaders (e.g. DataRec, eli-osherovich/papers_with_code). ``ml-latest-small`` is
regenerated over time and has no fixed checksum, so only its length is checked.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from typing import Callable, Sequence

from jax_vaecf.core import files as files_lib
from jax_vaecf.data import registry

GROUPLENS = registry.GROUPLENS

# md5 of each registered archive by name, for fetch_movielens (from the registry's
# entries, built once at import).
MD5 = {d.archive: d.md5 for d in registry.downloads()}

_CHUNK = 1 << 20


def missing_files_error(entry: registry.DataSet, data_dir: str,
                        cache_dir: str | None = None) -> FileNotFoundError:
  """The error for a data set whose files are not in ``data_dir``: which files go where,
  and how to get them (``download=True``, or where to fetch them by hand)."""
  if entry.layout == registry.GIVEN:
    return FileNotFoundError(f"{data_dir}: not found, expected {entry.obtain or 'a file'} "
                             f"(the {entry.name!r} data set reads the file data_dir names)")
  what = " or ".join(entry.files)
  if entry.layout == registry.FOLDER:
    where = data_dir if os.path.isdir(data_dir) else f"{data_dir} (no such folder)"
    head = f"{where}: no {what} (or .gz) in this folder."
    put = f"put them in {data_dir}"
  else:
    expected = os.path.join(data_dir, entry.files[0])
    also = "".join(f", {name}" for name in entry.files[1:])
    head = (f"{expected}{also}: not found (nor .gz, nor in "
            f"{os.path.join(data_dir, entry.subfolder)}).")
    put = f"put it at {expected}"
  if entry.download is not None:
    return FileNotFoundError(
        f"{head} Pass download=True to fetch {entry.download.url} into "
        f"{cache_dir or data_dir}, or unzip it into {data_dir} yourself.")
  source = f" from {entry.obtain}" if entry.obtain else ""
  return FileNotFoundError(
      f"{head} The {entry.name!r} data set cannot be downloaded automatically: fetch "
      f"{what}{source} and {put} (or pass its location as data_dir / path).")


def missing_pair_error(entry: registry.DataSet, data_dir: str, names: Sequence[str],
                       missing: str) -> FileNotFoundError:
  """The error for a train/test pair (ngcf, ml-100k's folds) missing file ``missing``."""
  source = f", from {entry.obtain}" if entry.obtain else ""
  return FileNotFoundError(
      f"{os.path.join(data_dir, missing)}: not found (nor {missing}.gz), expected the "
      f"{entry.name} train/test pair {names[0]} and {names[1]} in {data_dir}{source}")


def _progress(done: int, total: int | None, out) -> None:
  if total:
    frac = done / total
    bar = "#" * int(30 * frac)
    out.write(f"\r[{bar:<30}] {done / 1e6:8.1f} / {total / 1e6:.1f} MB")
  else:
    out.write(f"\r{done / 1e6:8.1f} MB")
  out.flush()


def download(url: str, dest: str, md5: str | None = None,
             opener: Callable = urllib.request.urlopen, progress: bool = True) -> str:
  """Downloads ``url`` to ``dest`` atomically, checking length and md5.

  Raises ValueError (nothing left at ``dest``) for a truncated body or a checksum
  mismatch; ``OSError`` from the opener (offline) is re-raised with the URL.
  """
  folder = os.path.dirname(os.path.abspath(dest))
  os.makedirs(folder, exist_ok=True)
  h = hashlib.md5()
  done = 0
  try:
    resp = opener(url)
  except OSError as e:
    raise OSError(f"{url}: download failed ({e}); fetch it by hand and put it at "
                  f"{dest}") from e
  # Written under a temporary name and renamed only once complete and verified.
  with resp, files_lib.atomic_write(dest, "wb") as f:
    length = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
    total = int(length) if length else None
    while True:
      chunk = resp.read(_CHUNK)
      if not chunk:
        break
      f.write(chunk)
      h.update(chunk)
      done += len(chunk)
      if progress:
        _progress(done, total, sys.stderr)
    if progress:
      sys.stderr.write("\n")
    if total is not None and done != total:
      raise ValueError(f"{url}: truncated download, got {done} of {total} bytes")
    if md5 is not None and h.hexdigest() != md5:
      raise ValueError(f"{url}: md5 {h.hexdigest()} does not match the published {md5}")
  return dest


def safe_extract(archive: str, target: str) -> None:
  """Extracts a zip into ``target``; ValueError if any member would land outside it."""
  target = os.path.abspath(target)
  os.makedirs(target, exist_ok=True)
  with zipfile.ZipFile(archive) as z:
    for member in z.namelist():
      dest = os.path.abspath(os.path.join(target, member))
      if os.path.commonpath([target, dest]) != target or os.path.isabs(member):
        raise ValueError(f"{archive}: member {member!r} would be extracted outside {target}")
    tmp = tempfile.mkdtemp(dir=target, prefix=".extract-")
    try:
      z.extractall(tmp)
      for entry in os.listdir(tmp):
        final = os.path.join(target, entry)
        if os.path.isdir(final):
          shutil.rmtree(final)
        os.replace(os.path.join(tmp, entry), final)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)


def fetch(archive: registry.Download, cache_dir: str | os.PathLike, *,
          opener: Callable = urllib.request.urlopen, progress: bool = True) -> str:
  """Returns the folder ``cache_dir/<archive.archive>`` holding the extracted archive,
  downloading (checking its md5) and extracting it first when absent."""
  cache_dir = os.fspath(cache_dir)
  folder = os.path.join(cache_dir, archive.archive)
  if os.path.isdir(folder):
    return folder
  path = os.path.join(cache_dir, f"{archive.archive}.zip")
  if not os.path.exists(path):
    download(archive.url, path, archive.md5, opener, progress)
  safe_extract(path, cache_dir)
  if not os.path.isdir(folder):
    raise ValueError(f"{path}: expected a top-level folder {archive.archive}/ in the "
                     "archive")
  return folder


def fetch_movielens(name: str, cache_dir: str | os.PathLike, *, url: str | None = None,
                    opener: Callable = urllib.request.urlopen,
                    progress: bool = True) -> str:
  """:func:`fetch` by archive name (``ml-20m``, ``ml-1m``, ``ml-100k``,
  ``ml-latest-small``), checked against :data:`MD5`; ``url`` replaces GroupLens'."""
  if name not in MD5:
    raise ValueError(f"fetch_movielens: unknown data set {name!r}, expected one of "
                     f"{sorted(MD5)}")
  return fetch(registry.Download(name, url or GROUPLENS.format(name=name), MD5[name]),
               cache_dir, opener=opener, progress=progress)
