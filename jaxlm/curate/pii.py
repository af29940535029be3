"""Personal data scrubbed: e-mail addresses, IP addresses and phone numbers replaced by
placeholders, with regular expressions as the open pipelines do it (DataTrove's PIIFormatter,
Dolma's PII tagger). Precision over recall: a number is a phone number only in a phone-like
layout (separators or a leading +), an IPv4 address only with four octets <= 255.
"""

from __future__ import annotations

import re

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV6_GROUP = r"[0-9a-fA-F]{1,4}"
# kind -> (pattern, placeholder); the order of this dict is the order they are applied in
# (e-mail first: its domain part may look like an IP or hold digits).
PATTERNS: dict[str, tuple[re.Pattern, str]] = {
    "email": (re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[a-zA-Z]{2,}\b"), "<EMAIL>"),
    "ip": (re.compile(
        rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w.]*\d)"
        rf"|(?<![\w:])(?:{_IPV6_GROUP}:){{7}}{_IPV6_GROUP}(?![\w:])"
        rf"|(?<![\w:])(?:{_IPV6_GROUP}:){{1,6}}:(?:{_IPV6_GROUP}(?::{_IPV6_GROUP}){{0,5}})?"
        rf"(?![\w:])"), "<IP_ADDRESS>"),
    # +CC, an area code (optionally in brackets) and groups split by spaces, dots or dashes:
    # "+1 555-123-4567", "(555) 123-4567", "+44 20 7946 0958", "555.123.4567".
    "phone": (re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"
                         r"\d{3,4}[ .-]\d{3,4}(?![\w-])"), "<PHONE_NUMBER>"),
}


def scrub(text: str, kinds: tuple[str, ...]) -> tuple[str, dict[str, int]]:
  """(text with each `kinds` match replaced by its placeholder, {kind: replacements})."""
  counts = {}
  for kind, (pattern, placeholder) in PATTERNS.items():
    if kind in kinds:
      text, count = pattern.subn(placeholder, text)
      if count:
        counts[kind] = count
  return text, counts
