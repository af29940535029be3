"""Atomic file writes (a killed process leaves the old file or the new one, never half of one),
and JSON reads."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_bytes(path: str, content: bytes) -> None:
  """Writes to a temporary file beside `path`, fsyncs, then renames over `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(content)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_json(path: str) -> Any:
  """The JSON value in `path`, or None if there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value: Any) -> None:
  """`value` as indented JSON plus a newline, written atomically."""
  write_bytes(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))
