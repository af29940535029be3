"""Web archives in: the documents of a WARC file (HTTP responses: the main text of HTML pages)
or a WET file (Common Crawl's text conversions), read with warcio.

Each response or conversion record is one document, numbered by its place among the file's
records (1 = the first record: `crawl.warc.gz:17`), with its URL, crawl date (WARC-Date) and
content type kept as metadata. What is not a page to train on is counted, never silently lost:
a status other than 200 (`skipped:status`), a content type outside `web.content_types`
(`skipped:content_type`), a blocked domain or URL (`blocked:domain`, `blocked:url_pattern`).
Damage (an unknown or wrong charset, an extractor failure, a truncated or corrupt file) stops
the run with one line naming the file, or with `input.on_bad_input=drop` is counted as
`bad_input:<reason>` (charset, extraction, truncated, damaged); the records before a
truncation are kept.
"""

from __future__ import annotations

import zlib
from typing import Any, BinaryIO, Callable, Iterator

from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

from jaxlm import textfiles
from jaxlm.curate import extract, urls
from jaxlm.curate.settings import CurationConfig

# The file names read as web archives (".warc.wet.gz", Common Crawl's WET, ends in ".wet.gz").
SUFFIXES = (".warc.gz", ".wet.gz", ".warc", ".wet")
DOCUMENT_RECORDS = ("response", "conversion")  # request, metadata, warcinfo...: not documents

# (record number, text or None, bytes, rule or None, problem or snippet, metadata)
Item = tuple[int, str | None, int, str | None, str, dict[str, Any]]


def is_archive(path: str) -> bool:
  return path.lower().endswith(SUFFIXES)


def _refuse(path: str, number: int, url: str, problem: str, fix: str) -> None:
  raise textfiles.CorpusError(f"{path}: record {number} ({url}): {problem}; {fix}, or set "
                              f"--config.input.on_bad_input=drop to count such records.")


def _page(record, number: int, url: str, body: bytes, meta: dict[str, Any], path: str,
          config: CurationConfig, extractor: Callable[[str], str],
          blocklist: urls.Blocklist) -> Item:
  """One response or conversion record -> its document or the rule that skips it."""
  size = len(body)
  if record.rec_type == "conversion":  # WET: already text (UTF-8 by the format's definition)
    meta["content_type"] = (record.rec_headers.get_header("Content-Type") or "text/plain")
    mime = None
  else:
    status = record.http_headers.get_statuscode() if record.http_headers else ""
    header = (record.http_headers.get_header("Content-Type") or "") if record.http_headers \
        else ""
    mime = header.split(";")[0].strip().lower()
    meta["content_type"] = mime
    if status != "200":
      return number, None, size, "skipped:status", f"{url}: status {status}", meta
    if mime not in config.web.content_types:
      return number, None, size, "skipped:content_type", f"{url}: {mime or 'no type'}", meta
  reason = urls.blocked(url, blocklist)
  if reason:
    return number, None, size, f"blocked:{reason}", url, meta
  drop = config.input.on_bad_input == "drop"
  if mime is None:
    return number, body.decode("utf-8", errors="replace"), size, None, "", meta
  try:
    html = extract.decode(body, header)
  except extract.CharsetError as e:
    if not drop:
      _refuse(path, number, url, str(e), "fix the charset in its Content-Type")
    return number, None, size, "bad_input:charset", f"{url}: {e}", meta
  try:
    text = extractor(html)
  except Exception as e:  # pylint: disable=broad-except  (any failure of one page: counted)
    said = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    if not drop:
      _refuse(path, number, url, f"the {config.web.extractor} extractor failed ({said})",
              "try --config.web.extractor=<another>")
    return number, None, size, "bad_input:extraction", f"{url}: {said}", meta
  return number, text, size, None, "", meta


def documents(path: str, stream: BinaryIO, config: CurationConfig,
              extractor: Callable[[str], str], blocklist: urls.Blocklist) -> Iterator[Item]:
  """The documents (and counted skips) of one WARC/WET file, read from `stream`."""
  drop = config.input.on_bad_input == "drop"
  iterator = ArchiveIterator(stream)
  number = 0
  problem, rule = "", "bad_input:truncated"
  try:
    for record in iterator:
      number += 1
      if record.rec_type not in DOCUMENT_RECORDS:
        continue
      url = record.rec_headers.get_header("WARC-Target-URI") or ""
      meta = {"url": url, "date": record.rec_headers.get_header("WARC-Date") or ""}
      body = record.content_stream().read()
      if getattr(record.raw_stream, "limit", 0) > 0:  # fewer bytes than its Content-Length
        problem = f"truncated inside record {number} ({url})"
        break
      yield _page(record, number, url, body, meta, path, config, extractor, blocklist)
    else:
      # A gzip member cut short ends warcio's iteration without an error: the file's bytes
      # past the last whole record are the sign.
      if iterator.offset < iterator.fh.tell():
        problem = (f"truncated after record {number} ({iterator.fh.tell() - iterator.offset} "
                   f"bytes of an unfinished record)")
  except textfiles.CorpusError:  # (a ValueError too) a record refused above: as it is
    raise
  except (ArchiveLoadFailed, EOFError, zlib.error, ValueError) as e:
    said = " ".join(str(e).split())[:200]  # warcio quotes the bad line, line break included
    problem = f"damaged after record {number} ({type(e).__name__}: {said})"
    rule = "bad_input:damaged"
  if problem:
    if not drop:
      raise textfiles.CorpusError(
          f"{path}: {problem}; fetch the file again, or set --config.input.on_bad_input=drop "
          f"to keep the records before the damage and count the rest as one bad_input.")
    yield number + 1, None, 0, rule, f"{path}: {problem}", {}
