"""The main text of an HTML page: its bytes decoded by the charset it declares, then a
maintained extractor that removes boilerplate, navigation and comments.

EXTRACTORS (the `web.extractor` key): name -> function(html str) -> text. resiliparse is the
default (DCLM's choice: C++, fastest measured here); trafilatura (FineWeb's) is the
alternative. Both are imported when first used, so a config naming one that is not installed
fails before any input is read (`check_extractor`).
"""

from __future__ import annotations

import codecs
import re
from typing import Callable

from jaxlm.errors import UserError

# <meta charset="x"> or <meta http-equiv="Content-Type" content="text/html; charset=x">
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([\w.:-]+)""", re.IGNORECASE)
_HEADER_CHARSET = re.compile(r"""charset\s*=\s*["']?\s*([\w.:-]+)""", re.IGNORECASE)
META_SNIFF_BYTES = 2048  # the HTML spec's prescan looks at the first 1,024; a little margin


class CharsetError(ValueError):
  """The page's bytes cannot be read as text (an unknown charset, or bytes not in it)."""


def declared_charset(content_type: str, html: bytes) -> str | None:
  """The charset the HTTP Content-Type header names, else a <meta> tag near the start."""
  match = _HEADER_CHARSET.search(content_type or "")
  if match:
    return match.group(1)
  match = _META_CHARSET.search(html[:META_SNIFF_BYTES])
  return match.group(1).decode("ascii", "replace") if match else None


def decode(html: bytes, content_type: str) -> str:
  """The page as text. A declared charset must be known and fit the bytes (else CharsetError:
  the page is counted, not guessed at); an undeclared one is UTF-8, else windows-1252 (what
  browsers assume for legacy pages)."""
  charset = declared_charset(content_type, html)
  if charset is None:
    try:
      return html.decode("utf-8")
    except UnicodeDecodeError:
      return html.decode("cp1252", errors="replace")
  try:
    codec = codecs.lookup(charset)
  except LookupError:
    raise CharsetError(f"unknown charset '{charset}'") from None
  try:
    return html.decode(codec.name)
  except UnicodeDecodeError as e:
    if codec.name != "utf-8":  # the usual mislabel: UTF-8 bytes declared as something else
      try:
        return html.decode("utf-8")
      except UnicodeDecodeError:
        pass
    raise CharsetError(f"bytes not valid {charset} (at byte {e.start})") from None


def _resiliparse(html: str) -> str:
  # pylint: disable=import-outside-toplevel
  from resiliparse.extract.html2text import extract_plain_text
  # main_content: its heuristics drop navigation, headers, footers, sidebars; comments=False
  # drops comment sections; alt texts and form fields are not prose.
  return extract_plain_text(html, main_content=True, comments=False, alt_texts=False,
                            form_fields=False, links=False, noscript=False)


def _trafilatura(html: str) -> str:
  import trafilatura  # pylint: disable=import-outside-toplevel
  # FineWeb's settings, except deduplicate: its cache spans documents, which would make a
  # page's text depend on the pages a worker saw before it.
  return trafilatura.extract(html, favor_precision=True, include_comments=False,
                             deduplicate=False) or ""


EXTRACTORS: dict[str, Callable[[str], str]] = {"resiliparse": _resiliparse,
                                               "trafilatura": _trafilatura}
_PACKAGES = {"resiliparse": "resiliparse==2.0.1", "trafilatura": "trafilatura==2.3.1"}


def check_extractor(name: str) -> Callable[[str], str]:
  """The extractor `name`, its library imported (a UserError naming the key if missing)."""
  try:
    __import__(name)
  except ImportError:
    raise UserError(f"web.extractor={name!r}: the {name} package is not installed; pip install "
                    f"{_PACKAGES[name]} (or choose another web.extractor).") from None
  return EXTRACTORS[name]
