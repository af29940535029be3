r"""Near-duplicate recall and precision per kind of planted copy (reflowed lines, another
header and footer, edited words, reordered paragraphs) in a prose corpus, over seeds and
settings; see jaxlm/curate/dedup_study.py.

  python -m experiments.dedup_study                      # the default config, seeds 0-3
  python -m experiments.dedup_study --shingle_words=3,5 --thresholds=0.65,0.8 --seeds=8
"""

from __future__ import annotations

import itertools
import json

from absl import app, flags

from experiments import common
from jaxlm.curate import dedup_study, settings

_CONFIG = common.define_config_flag(settings.DEFAULT_CONFIG_FILE)
_SEEDS = flags.DEFINE_integer("seeds", 4, "corpora to plant copies in (seeds 0..N-1).",
                              lower_bound=1)
_SHINGLES = flags.DEFINE_list("shingle_words", [], "shingle sizes to compare (default: the "
                              "config's).")
_THRESHOLDS = flags.DEFINE_list("thresholds", [], "thresholds to compare (default: the "
                                "config's).")
_EDIT = flags.DEFINE_float("edit_fraction", 0.03, "share of words an edited copy changes.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  base = settings.from_dict(common.config_value(_CONFIG).to_dict()).dedup
  grid = [{"shingle_words": int(n), "threshold": float(t)} for n, t in itertools.product(
      _SHINGLES.value or [base.shingle_words], _THRESHOLDS.value or [base.threshold])]
  rows = dedup_study.sweep(list(range(_SEEDS.value)), grid, base,
                           edit_fraction=_EDIT.value)
  print("| shingle words | threshold | kind | recall (min-max over seeds) | precision |")
  print("|---:|---:|---|---|---|")
  for setting in grid:
    scores = [r["score"] for r in rows if r["setting"] == setting]
    for kind in scores[0]:
      recall = [s[kind]["recall"] for s in scores]
      precision = [s[kind]["precision"] for s in scores]
      print(f"| {setting['shingle_words']} | {setting['threshold']} | {kind} | "
            f"{min(recall):.3f}-{max(recall):.3f} | {min(precision):.3f}-{max(precision):.3f} |")
  print(json.dumps(rows))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
