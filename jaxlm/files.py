"""Atomic file writes (a killed process leaves the old file or the new one, never half of one),
JSON reads, and the records of users' data files."""

from __future__ import annotations

import csv
import json
import os
import secrets
from typing import Any, Callable, Sequence


def write_bytes(path: str, content: bytes) -> None:
  """Writes to a temporary file beside `path`, fsyncs, then renames over `path`. The file gets
  the permissions of any new file (the umask's; mkstemp would make it private)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{os.path.abspath(path)}.tmp-{secrets.token_hex(6)}"
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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


def read_records(path: str, error: Callable[[str], Exception], flag: str = "",
                 columns: Sequence[str] = ()) -> list[tuple[str, dict[str, Any]]]:
  """(where, record) of each record of a data file, `where` naming it in messages:

    .csv, or .tsv / .txt (tab-separated; quote characters are text, as in GLUE's and the SMS
      Spam Collection's files), with a header row: a record per row, "PATH:LINE"
    `columns` given: a table without a header row whose columns those are, whatever the file's
      name (tab-separated unless .csv; the SMS Spam Collection's raw `SMSSpamCollection` file
      is `label<TAB>text` lines)
    .jsonl: a JSON object per non-blank line, "PATH:LINE"
    other names (.json): a JSON list of objects, "PATH:record I" (from 0), or objects one per
      line as in .jsonl

  A file that is missing, empty, undecodable or not JSON where JSON is due raises `error(one
  line)`, naming `flag` (the option that gave the path) if given. Records are not checked."""
  name, extension = f"{flag}={path}" if flag else path, os.path.splitext(path)[1].lower()
  if not os.path.isfile(path):
    raise error(f"{name} does not exist; pass an existing file.")
  if os.path.getsize(path) == 0:
    raise error(f"{name} is empty; it needs records (a header row and rows, or JSON objects).")
  try:
    # utf-8-sig: a byte-order mark (Excel, Windows editors) is not part of the first field.
    with open(path, newline="", encoding="utf-8-sig") as f:
      if extension in (".csv", ".tsv", ".txt") or columns:
        tab = extension != ".csv"
        reader = csv.DictReader(f, fieldnames=list(columns) or None,
                                delimiter="\t" if tab else ",",
                                quoting=csv.QUOTE_NONE if tab else csv.QUOTE_MINIMAL)
        rows = [(f"{path}:{reader.line_num}", row) for row in reader]
        for where, row in rows:  # (DictReader files extra fields under None, fills missing ones)
          if None in row:
            raise error(f"{where} has {len(row) - 1 + len(row[None])} fields but the "
                        f"{'columns given have' if columns else 'header has'} "
                        f"{len(reader.fieldnames)}; " + ("a field cannot hold a tab (quotes are "
                        "text in a TSV)." if tab else "quote fields that hold commas."))
          if None in row.values():
            raise error(f"{where} has {sum(v is not None for v in row.values())} fields but the "
                        f"{'columns given have' if columns else 'header has'} "
                        f"{len(reader.fieldnames)}; every row needs all its columns.")
        return rows
      text = f.read()
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise error(f"{name} cannot be read ({e}).") from None
  if extension != ".jsonl":
    try:
      value = json.loads(text)
    except json.JSONDecodeError as e:
      if e.msg != "Extra data":  # (several values: one per line, read below)
        raise error(f"{path}: not JSON ({e.msg} at line {e.lineno}); a table needs a .csv or "
                    f".tsv name.") from None
    else:
      if not isinstance(value, list):
        raise error(f"{path} must hold a JSON list of records, not a {type(value).__name__}; "
                    f"or one record per line.")
      return [(f"{path}:record {i}", record) for i, record in enumerate(value)]
  records = []
  for number, line in enumerate(text.splitlines(), start=1):
    if line.strip():
      try:
        records.append((f"{path}:{number}", json.loads(line)))
      except json.JSONDecodeError as e:
        raise error(f"{path}:{number}: not JSON ({e.msg}).") from None
  return records
