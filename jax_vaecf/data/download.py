"""Fetching the MovieLens archives; clear instructions for sets without a public URL.

Downloads stream into a temporary file in the cache folder while an md5 is computed,
check the length announced by the server and the published checksum, then
``os.replace`` the file to its final name. Extraction refuses any archive member whose
path would leave the target folder and also extracts via a temporary folder.

Checksums: GroupLens publishes md5 sums (no sha256) for its frozen archives; the values
below are the ones recorded for these zips by other loaders (e.g. DataRec,
eli-osherovich/papers_with_code). ``ml-latest-small`` is regenerated over time and has
no fixed checksum, so only its length is checked.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from typing import Callable

from jax_vaecf import files as files_lib

GROUPLENS = "https://files.grouplens.org/datasets/movielens/{name}.zip"

# md5 of the zip archives (GroupLens publishes md5, not sha256).
MD5 = {
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-latest-small": None,
}

# Where to get the sets that cannot be downloaded automatically.
MANUAL = {
    "netflix": ("training_set/ (mv_*.txt) or combined_data_*.txt",
                "the Netflix Prize data set (e.g. https://archive.org/details/nf_prize_dataset.tar "
                "or Kaggle 'netflix-prize-data')"),
    "msd": ("train_triplets.txt",
            "the Echo Nest Taste Profile subset, http://millionsongdataset.com/tasteprofile/"),
    "lastfm": ("usersha1-artmbid-artname-plays.tsv",
               "Last.fm Dataset 360K, http://ocelma.net/MusicRecommendationDataset/lastfm-360K.html"),
    "pinterest": ("pinterest-20.train.rating",
                  "the NCF repository, https://github.com/hexiangnan/neural_collaborative_filtering "
                  "(Data/)"),
}

_CHUNK = 1 << 20


def missing_file_error(dataset: str, expected_path: str) -> FileNotFoundError:
  """The error for a data set that must be fetched by hand."""
  name, where = MANUAL.get(dataset, ("the data file", "its publisher"))
  return FileNotFoundError(
      f"{expected_path}: not found. The {dataset!r} data set cannot be downloaded "
      f"automatically: fetch {name} from {where} and put it at {expected_path} (or pass "
      "its location as data_dir / path).")


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


def fetch_movielens(name: str, cache_dir: str | os.PathLike, *, url: str | None = None,
                    opener: Callable = urllib.request.urlopen,
                    progress: bool = True) -> str:
  """Returns the folder ``cache_dir/name`` holding the extracted archive, downloading
  and extracting it first when absent."""
  if name not in MD5:
    raise ValueError(f"fetch_movielens: unknown data set {name!r}, expected one of "
                     f"{sorted(MD5)}")
  cache_dir = os.fspath(cache_dir)
  folder = os.path.join(cache_dir, name)
  if os.path.isdir(folder):
    return folder
  archive = os.path.join(cache_dir, f"{name}.zip")
  if not os.path.exists(archive):
    download(url or GROUPLENS.format(name=name), archive, MD5[name], opener, progress)
  safe_extract(archive, cache_dir)
  if not os.path.isdir(folder):
    raise ValueError(f"{archive}: expected a top-level folder {name}/ in the archive")
  return folder
