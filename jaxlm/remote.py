"""Run directories on an object store (`--workdir=gs://bucket/run`): checkpoints at the URL, the
rest in a local mirror.

Orbax reads and writes checkpoints at the URL itself (every process its own shards). The other
files of a run directory (config.json, metrics.jsonl, TensorBoard events, samples, loss.png,
summary.json) are small and written often, some appended to, which object stores do not do:
they live in a local mirror, downloaded fresh when a command opens the run, and uploaded by
process 0 after every checkpoint and when the command ends. A run preempted between two
checkpoints resumes from the last one whatever its mirror held, and its logs are cut back to
that step as on a local disk. The mirror is `MIRRORS/<hash of the URL>-p<process>` (each
process of a job has its own); the file MARKER in it names the URL.
"""

from __future__ import annotations

import hashlib
import os
import shutil

from jaxlm import storage

MARKER = ".jaxlm_remote"
MIRRORS = os.path.join("~", ".cache", "jaxlm", "remote_runs")
_CHECKPOINTS = ("checkpoints", "checkpoints_discarded")
_LOCAL_ONLY = (MARKER, ".lock")
_uploaded: dict[str, tuple[int, int]] = {}  # local file -> (size, mtime) when last uploaded


def local_workdir(workdir: str, process_index: int = 0, mirrors: str = MIRRORS) -> str:
  """`workdir` itself when it is a local path; for a URL, a fresh local mirror of it (its files
  but the checkpoints downloaded; none if the run is new). StorageError naming the URL when it
  cannot be read."""
  if not storage.is_url(workdir) or url_of(workdir):
    return workdir
  url = workdir.rstrip("/")
  digest = hashlib.sha256(url.encode()).hexdigest()[:16]
  local = os.path.join(os.path.expanduser(mirrors), f"{digest}-p{process_index}")
  shutil.rmtree(local, ignore_errors=True)
  os.makedirs(local)
  fs, inner = storage.filesystem(url)
  try:
    remote_files = fs.find(inner) if fs.exists(inner) else []
  except Exception as e:  # pylint: disable=broad-except  (auth, network: the store's own errors)
    raise storage.StorageError(f"workdir {url} cannot be read ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''}); check the "
                               f"bucket and your credentials.") from None
  for remote in remote_files:
    relative = remote[len(inner):].lstrip("/")
    if relative.split("/")[0] in _CHECKPOINTS or not relative:
      continue
    target = os.path.join(local, *relative.split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fs.get_file(remote, target)
    _uploaded[target] = _stamp(target)
  with open(os.path.join(local, MARKER), "w", encoding="utf-8") as f:
    f.write(url)
  return local


def url_of(workdir: str) -> str | None:
  """The URL a local mirror stands for, or None for an ordinary run directory."""
  path = os.path.join(workdir, MARKER)
  if storage.is_url(workdir) or not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return f.read().strip()


def checkpoints_dir(workdir: str) -> str:
  """Where a run's checkpoints are: at the URL for a mirrored run, else in the run directory."""
  url = url_of(workdir)
  return storage.join(url, "checkpoints") if url else os.path.join(workdir, "checkpoints")


def display(workdir: str) -> str:
  """How to name the run to the user: its URL, or its path."""
  return url_of(workdir) or workdir


def upload(workdir: str) -> None:
  """Copies the mirror's new and changed files to the URL (call from process 0); nothing for a
  local run directory."""
  url = url_of(workdir)
  if url is None:
    return
  fs, inner = storage.filesystem(url)
  for directory, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(directory, name)
      relative = os.path.relpath(path, workdir).replace(os.sep, "/")
      if relative in _LOCAL_ONLY or ".tmp-" in name or _uploaded.get(path) == _stamp(path):
        continue
      fs.put_file(path, f"{inner}/{relative}")
      _uploaded[path] = _stamp(path)


def _stamp(path: str) -> tuple[int, int]:
  stat = os.stat(path)
  return stat.st_size, stat.st_mtime_ns
