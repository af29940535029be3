r"""Generate a messy web-like corpus (and clean held-out files) from text every Python ships.

  python -m experiments.messy_corpus --output=/tmp/messy

What the corpus holds (prose from the Python reference documentation with planted copies, near
duplicates, boilerplate, other languages and junk; clean held-out files; truth.json): see
jaxlm/curate/messy.py, which generates it.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments import common

_OUTPUT = flags.DEFINE_string("output", None, "folder to create (must not exist).")
_SEED = flags.DEFINE_integer("seed", 0, "random seed of every choice.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from jaxlm.curate import messy
  output = _OUTPUT.value
  if not output or os.path.exists(output):
    raise app.UsageError("--output must name a folder that does not exist yet.")
  truth = messy.make(output, _SEED.value)
  kinds: dict[str, int] = {}
  for fact in truth.values():
    kinds[fact["kind"]] = kinds.get(fact["kind"], 0) + 1
  print(json.dumps({"documents": len(truth), "kinds": kinds}))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
