"""Reading the user's text files: glob resolution and .jsonl lines, with one-line errors.

Shared by the text_files corpus (jaxlm/corpora.py) and curation (jaxlm/curate), and free of
heavy imports (no TFDS), so curation's worker processes start fast.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

from jaxlm.errors import UserError


class CorpusError(UserError):
  """A corpus cannot be found, read or split; the message names the field or file and the fix."""


def parse_jsonl_line(path: str, number: int, line: bytes, text_key: str,
                     key_flag: str = "--config.data.text_key") -> str:
  """The text of one .jsonl line; CorpusError naming `path:number` and the fix otherwise."""
  try:
    record = json.loads(line)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
    raise CorpusError(f"{path}:{number}: not valid JSON ({e}); each line of a .jsonl file "
                      f"must be one JSON object.") from None
  if not isinstance(record, dict) or text_key not in record:
    fields = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
    raise CorpusError(f"{path}:{number}: no field '{text_key}' (found: {fields}); set "
                      f"{key_flag} to the field that holds the text.")
  text = record[text_key]
  if not isinstance(text, str):
    raise CorpusError(f"{path}:{number}: field '{text_key}' is a {type(text).__name__}, not "
                      f"a string; set {key_flag} to a text field.")
  return text


def resolve_globs(patterns: str, flag: str = "--config.data.files") -> list[str]:
  """Absolute, sorted, de-duplicated files matched by comma-separated globs (`**` recursive);
  `flag` is how the user passed them, for the error messages."""
  found: set[str] = set()
  globs = [p.strip() for p in patterns.split(",") if p.strip()]
  if not globs:
    raise CorpusError(f"{flag} is empty; set {flag}='/data/*.txt' (quote it so the shell does "
                      f"not expand it; comma-separate several globs).")
  for pattern in globs:
    if os.path.isdir(os.path.expanduser(pattern)):
      raise CorpusError(f"{flag}='{pattern}' is a directory; name its files with a glob, e.g. "
                        f"{flag}='{os.path.join(pattern, '**', '*.txt')}'.")
    matches = [m for m in glob.glob(os.path.expanduser(pattern), recursive=True)
               if os.path.isfile(m)]
    if not matches:
      raise CorpusError(f"{flag} glob '{pattern}' matched no files; check the path, and quote "
                        f"the glob ({flag}='{pattern}') so the shell passes it unexpanded.")
    found.update(os.path.abspath(m) for m in matches)
  return sorted(found)


def unit_hash(identity: str) -> float:
  """Maps a document identity to [0, 1), identically on every machine and run (sha256): a
  document is held out for validation when this is below the validation fraction."""
  digest = hashlib.sha256(identity.encode("utf-8", errors="surrogatepass")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64
