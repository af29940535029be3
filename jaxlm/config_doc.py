"""docs/config.md, generated from the config schema (jaxlm/config.py): every key of every
section with its type, default, allowed values and the comment the schema gives it, so the
reference cannot drift from the code (tests/test_docs.py compares the file with `render()`).

  python -m jaxlm.config_doc > docs/config.md      # after changing the schema
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import tokenize

from jaxlm import config as config_lib

_HEADER = """# Config reference

Every key of the config schema (`jaxlm/config.py`), generated from it: `python -m
jaxlm.config_doc > docs/config.md` (tests/test_docs.py fails when this page and the schema
differ). Config files (`configs/*.py`) start from these defaults; any key can be overridden on
the command line as `--config.SECTION.KEY=VALUE` (`--config.seed=VALUE` at the top). How runs
use them: [training.md](training.md#configs-and-overrides).
"""


def field_comments(cls: type) -> dict[str, str]:
  """{field: its comment} of a dataclass: the comment on the field's line, else the comment
  lines right above it (a comment above a group of fields goes to the first)."""
  source = inspect.getsource(cls)
  comments: dict[int, str] = {}
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      comments[token.start[0]] = token.string.lstrip("#").strip()
  lines = source.splitlines()
  out = {}
  for number, line in enumerate(lines, start=1):
    stripped = line.strip()
    name = stripped.split(":")[0]
    if not stripped or stripped.startswith("#") or ":" not in stripped or not name.isidentifier():
      continue
    if number in comments and not stripped.startswith("#"):
      out[name] = comments[number]
      continue
    above, row = [], number - 1
    while row in comments and lines[row - 1].strip().startswith("#"):
      above.insert(0, comments[row])
      row -= 1
    if above:
      out[name] = " ".join(above)
  return out


def _value(value) -> str:
  return "`" + json.dumps(config_lib.plain(value)) + "`"


def render() -> str:
  """The whole page."""
  parts = [_HEADER]
  defaults = config_lib.Config()
  sections = [("top level", config_lib.Config, ["seed"])] + [
      (f.name, type(getattr(defaults, f.name)), None)
      for f in dataclasses.fields(config_lib.Config) if f.name != "seed"]
  for section, cls, only in sections:
    comments = field_comments(cls)
    doc = inspect.getdoc(cls) if section != "top level" else ""
    parts.append(f"## {section}\n")
    if doc and not doc.startswith(cls.__name__ + "("):
      parts.append(doc.strip() + "\n")
    parts.append("| key | type | default | meaning |\n|---|---|---|---|")
    for field in dataclasses.fields(cls):
      if only is not None and field.name not in only:
        continue
      key = field.name if section == "top level" else f"{section}.{field.name}"
      kind = field.type if isinstance(field.type, str) else field.type.__name__
      default = getattr(cls(), field.name)
      meaning = comments.get(field.name, "")
      choices = config_lib.CHOICES.get(key)
      if choices:
        listed = ", ".join(f"`{c}`" if c else "`''`" for c in choices)
        meaning = meaning.rstrip(".") + ("; " if meaning else "") + f"one of {listed}"
      parts.append(f"| `{key}` | {kind.replace('|', chr(92) + '|')} | {_value(default)} | "
                   f"{meaning.replace('|', chr(92) + '|')} |")
    parts.append("")
  return "\n".join(parts)


if __name__ == "__main__":
  print(render(), end="")
