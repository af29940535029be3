"""Paths that are local files or URLs (`gs://bucket/...`, any fsspec scheme): the few file
operations data preparation, token shards and run directories need, the same way for both.

Local paths use the os module (writes are atomic: a temporary file renamed into place). URLs go
through fsspec (`gcsfs` for gs://); an object store's object appears whole when its upload
closes, which is what makes those writes atomic too. Library code never reads credentials or
the environment: fsspec's own configuration (e.g. application default credentials for GCS,
`STORAGE_EMULATOR_HOST` for an emulator) applies.
"""

from __future__ import annotations

import contextlib
import glob as glob_lib
import os
import posixpath
import secrets
from typing import Any, BinaryIO, Callable, Iterator

from jaxlm.errors import UserError


class StorageError(UserError):
  """A path or URL cannot be read or written; the message names it and the fix."""


def is_url(path: str) -> bool:
  return "://" in path


def filesystem(url: str) -> tuple[Any, str]:
  """(fsspec filesystem, path within it) of a URL; StorageError naming the package to install
  when its scheme's implementation is missing."""
  import fsspec  # pylint: disable=import-outside-toplevel
  try:
    return fsspec.core.url_to_fs(url)
  except ImportError as e:
    raise StorageError(f"{url}: {e}; install it (gs:// needs gcsfs, in "
                       f"requirements.txt).") from None
  except ValueError as e:
    raise StorageError(f"{url}: unknown storage scheme ({e}); use a local path or gs://.") from None


def _remote(url: str, call: Callable[[], Any]) -> Any:
  """`call()` on an object store; its errors (network, credentials, a missing bucket) as one
  StorageError line naming the URL. FileNotFoundError passes through (callers expect it)."""
  try:
    return call()
  except (FileNotFoundError, StorageError):
    raise
  except Exception as e:  # pylint: disable=broad-except  (fsspec backends raise their own)
    reason = (str(e).splitlines() or [""])[0][:200]
    raise StorageError(f"{url} cannot be reached ({type(e).__name__}: {reason}); check the "
                       f"bucket name, the network and your credentials (on Google Cloud: gcloud "
                       f"auth application-default login).") from None


def _url(fs: Any, path: str) -> str:
  """fsspec's protocol-less path back as a URL."""
  protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
  return f"{protocol}://{path.lstrip('/')}"


def join(base: str, *names: str) -> str:
  return posixpath.join(base, *names) if is_url(base) else os.path.join(base, *names)


def dirname(path: str) -> str:
  return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(path)


def basename(path: str) -> str:
  return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  fs, inner = filesystem(path)
  return _remote(path, lambda: fs.exists(inner))


def isfile(path: str) -> bool:
  if not is_url(path):
    return os.path.isfile(path)
  fs, inner = filesystem(path)
  return _remote(path, lambda: fs.isfile(inner))


def isdir(path: str) -> bool:
  if not is_url(path):
    return os.path.isdir(path)
  fs, inner = filesystem(path)
  return _remote(path, lambda: fs.isdir(inner))


def getsize(path: str) -> int:
  if not is_url(path):
    return os.path.getsize(path)
  fs, inner = filesystem(path)
  return int(_remote(path, lambda: fs.size(inner)))


def mtime_ns(path: str) -> int:
  """Modification time (ns) of a local file; 0 for a URL (object stores: the size, name and
  the object's immutability stand in for it)."""
  return 0 if is_url(path) else os.stat(path).st_mtime_ns


def makedirs(path: str) -> None:
  if not is_url(path):
    os.makedirs(path, exist_ok=True)
  # (object stores have no folders: writing an object makes its prefix)


def listdir(path: str) -> list[str]:
  """Names in a folder (none if it does not exist)."""
  if not is_url(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  fs, inner = filesystem(path)
  try:
    return sorted(posixpath.basename(p.rstrip("/"))
                  for p in _remote(path, lambda: fs.ls(inner, detail=False)))
  except FileNotFoundError:
    return []


def glob(pattern: str) -> list[str]:
  """Sorted files matching `pattern` (`**` recursive)."""
  if not is_url(pattern):
    return sorted(m for m in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                  if os.path.isfile(m))
  fs, inner = filesystem(pattern)
  return _remote(pattern, lambda: sorted(_url(fs, p) for p in fs.glob(inner) if fs.isfile(p)))


def open_read(path: str) -> BinaryIO:
  """A binary file object to read (seekable)."""
  if not is_url(path):
    return open(path, "rb")
  fs, inner = filesystem(path)
  return _remote(path, lambda: fs.open(inner, "rb"))


def read_bytes(path: str) -> bytes:
  with open_read(path) as f:
    return f.read()


def read_ranges(path: str, starts: list[int], ends: list[int]) -> list[bytes]:
  """Bytes [start, end) of `path` for each pair, fetched concurrently from an object store."""
  fs, inner = filesystem(path)
  return _remote(path, lambda: fs.cat_ranges([inner] * len(starts), starts, ends))


@contextlib.contextmanager
def open_write(path: str) -> Iterator[BinaryIO]:
  """A binary file to write that appears at `path` only complete: locally a temporary file
  beside it, fsynced and renamed over it; on an object store the upload, committed at the
  end (discarded if the block raises)."""
  if is_url(path):
    fs, inner = filesystem(path)
    handle = fs.open(inner, "wb")
    try:
      yield handle
    except BaseException:
      if hasattr(handle, "discard"):
        handle.discard()
      raise
    handle.close()
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{os.path.abspath(path)}.tmp-{secrets.token_hex(6)}"
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # (the umask's permissions)
  try:
    with os.fdopen(fd, "wb") as handle:
      yield handle
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_bytes(path: str, content: bytes) -> None:
  """`content` at `path`, atomically (see `open_write`)."""
  with open_write(path) as handle:
    handle.write(content)


def remove(path: str) -> None:
  """Deletes a file, or a folder and everything under it; nothing if it does not exist."""
  if not is_url(path):
    if os.path.isdir(path):
      import shutil  # pylint: disable=import-outside-toplevel
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
    return
  fs, inner = filesystem(path)
  if fs.exists(inner):
    fs.rm(inner, recursive=True)


def move(source: str, target: str) -> None:
  """Renames a file or folder (an object store copies and deletes: not atomic there)."""
  if not is_url(source):
    os.replace(source, target)
    return
  fs, inner = filesystem(source)
  fs.mv(inner, filesystem(target)[1], recursive=True)
  # Listings cached before the move would still show the source, in this instance and in the
  # others of its class (Orbax reaches gs:// through its own: a --restore_step resume then
  # found the discarded step "there", failed to delete it, and could not save that step).
  for instance in [fs, *getattr(type(fs), "_cache", {}).values()]:
    instance.invalidate_cache()
