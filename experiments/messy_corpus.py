r"""Generate a messy web-like corpus (and clean held-out files) from text every Python ships.

  python -m experiments.messy_corpus --output=/tmp/messy
  python -m experiments.messy_corpus --output=/tmp/web --warc   # a crawl as .warc.gz files

What the corpus holds (prose from the Python reference documentation with planted copies, near
duplicates, boilerplate, other languages and junk; clean held-out files; truth.json): see
jaxlm/curate/messy.py, which generates it; with --warc, HTML pages in WARC files (boilerplate,
copies, junk, skips, a blocked domain, a reference corpus for the quality classifier): see
jaxlm/curate/messy_web.py.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments import common

_OUTPUT = flags.DEFINE_string("output", None, "folder to create (must not exist).")
_SEED = flags.DEFINE_integer("seed", 0, "random seed of every choice.")
_WARC = flags.DEFINE_bool("warc", False, "write a web crawl: HTML pages in .warc.gz files.")
_ARTICLES = flags.DEFINE_integer("articles", 600, "--warc: distinct prose articles in the crawl "
                                 "(besides 60 held out and 300 for the reference corpus).",
                                 lower_bound=1)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from jaxlm.curate import messy, messy_web
  output = _OUTPUT.value
  if not output or os.path.exists(output):
    raise app.UsageError("--output must name a folder that does not exist yet.")
  truth = (messy_web.make(output, _SEED.value, articles=_ARTICLES.value, heldout=60,
                          reference=300) if _WARC.value else messy.make(output, _SEED.value))
  kinds: dict[str, int] = {}
  for fact in truth.values():
    kinds[fact["kind"]] = kinds.get(fact["kind"], 0) + 1
  print(json.dumps({"documents": len(truth), "kinds": kinds}))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
