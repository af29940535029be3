"""URL block lists, as C4 and RefinedWeb applied them: a file of blocked domains (each blocks
its subdomains too) and URL patterns.

The file (`web.blocklist`): one entry per line; `#` starts a comment. A line holding `/` or `*`
is a glob matched against the whole URL, case-insensitively (`*://*/casino/*`,
`http://example.com/ads*`); any other line is a domain (`example.com` blocks `example.com` and
`www.example.com`, not `notexample.com`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import urllib.parse

from jaxlm.errors import UserError


class BlocklistError(UserError):
  """The block list file cannot be read."""


@dataclasses.dataclass(frozen=True)
class Blocklist:
  domains: frozenset[str] = frozenset()
  patterns: re.Pattern | None = None  # the globs, translated and joined into one regex


def parse(text: str) -> Blocklist:
  domains, globs = set(), []
  for line in text.splitlines():
    entry = line.split("#", 1)[0].strip().lower()
    if not entry:
      continue
    if "/" in entry or "*" in entry:
      globs.append(fnmatch.translate(entry))
    else:
      domains.add(entry.strip("."))
  return Blocklist(frozenset(domains), re.compile("|".join(globs)) if globs else None)


def load(path: str) -> Blocklist:
  """The block list of `path` ("" : nothing blocked)."""
  if not path:
    return Blocklist()
  try:
    with open(path, encoding="utf-8") as f:
      return parse(f.read())
  except (OSError, UnicodeDecodeError) as e:
    raise BlocklistError(f"web.blocklist={path!r} cannot be read ({e}); name a UTF-8 file of "
                         f"domains and URL globs, or set --config.web.blocklist=''.") from None


def blocked(url: str, blocklist: Blocklist) -> str | None:
  """"domain" or "url_pattern" when `url` is blocked, else None."""
  if blocklist.domains:
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    parts = host.split(".")
    if any(".".join(parts[i:]) in blocklist.domains for i in range(len(parts))):
      return "domain"
  if blocklist.patterns is not None and blocklist.patterns.match(url.lower()):
    return "url_pattern"
  return None
