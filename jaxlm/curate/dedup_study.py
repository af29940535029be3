"""How well the near-duplicate stage finds planted copies: recall and precision per kind of copy.

The corpus: English prose documents (`messy.clean_documents`: the Python reference
documentation and, optionally, the standard library's docstrings), each paragraph one line, as
extracted web text comes; a share of them gets one planted copy of each kind: its lines wrapped
anew at another width (reflow), another header and footer (boilerplate), a few percent of its
words replaced (edit), its paragraphs shuffled (reorder). The stage's clusters are compared with
the truth: a found pair is right when both documents come from the same original.
`python -m experiments.dedup_study` prints the table over seeds and settings.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Any

from jaxlm.curate import dedup, messy
from jaxlm.curate.settings import DedupConfig

KINDS = ("reflow", "boilerplate", "edit", "reorder")


def planted_corpus(seed: int, copy_fraction: float = 0.1, edit_fraction: float = 0.03,
                   docstrings: bool = True) -> tuple[dict[dedup.DocKey, str],
                                                      dict[dedup.DocKey, tuple[str, int]]]:
  """({key: text}, {key: (kind, family)}): every original (kind "original", its own family) and,
  for `copy_fraction` of them per kind, one copy of that kind (the original's family)."""
  rng = random.Random(seed)
  originals = list(messy.clean_documents(docstrings=docstrings))
  texts: dict[dedup.DocKey, str] = {}
  truth: dict[dedup.DocKey, tuple[str, int]] = {}
  for family, text in enumerate(originals):
    texts[(f"original{family:05d}", 0)] = text
    truth[(f"original{family:05d}", 0)] = ("original", family)
  for kind in KINDS:
    for family in rng.sample(range(len(originals)), int(len(originals) * copy_fraction)):
      key = (f"{kind}{family:05d}", 0)
      texts[key] = messy.near_copy(originals[family], kind, rng, edit_fraction)
      truth[key] = (kind, family)
  return texts, truth


def score(roots: dict[dedup.DocKey, dedup.DocKey], truth: dict[dedup.DocKey, tuple[str, int]]
          ) -> dict[str, dict[str, float]]:
  """{kind | "all": {recall, precision, planted, found}} of the clusters `roots` ({member:
  root}). Recall: planted (copy, original) pairs inside one cluster; precision: pairs inside
  clusters (a cluster of k documents holds k(k-1)/2) whose documents share an original; a
  kind's precision counts the pairs with a copy of that kind."""
  clusters: dict[dedup.DocKey, list[dedup.DocKey]] = {}
  for key, root in roots.items():
    clusters.setdefault(root, []).append(key)
  found = [pair for members in clusters.values()
           for pair in itertools.combinations(sorted(members), 2)]
  found_set = {frozenset(pair) for pair in found}
  originals = {family: key for key, (kind, family) in truth.items() if kind == "original"}
  result = {}
  for kind in KINDS + ("all",):
    planted = [frozenset((key, originals[family])) for key, (k, family) in truth.items()
               if k != "original" and kind in (k, "all")]
    involved = [pair for pair in found
                if kind == "all" or any(truth[key][0] == kind for key in pair)]
    right = [pair for pair in involved if truth[pair[0]][1] == truth[pair[1]][1]]
    if not planted:
      continue
    result[kind] = {"recall": sum(p in found_set for p in planted) / len(planted),
                    "precision": len(right) / len(involved) if involved else 1.0,
                    "planted": len(planted), "found": len(involved)}
  return result


def measure(seed: int, config: DedupConfig, **corpus: Any) -> dict[str, dict[str, float]]:
  """score() of the near-duplicate stage under `config` on planted_corpus(seed, **corpus)."""
  texts, truth = planted_corpus(seed, **corpus)
  signer = dedup.Signer(config)
  roots = dedup.near_duplicates({key: signer(text) for key, text in texts.items()}, config)
  return score(roots, truth)


def sweep(seeds: list[int], settings: list[dict[str, Any]], base: DedupConfig,
          **corpus: Any) -> list[dict[str, Any]]:
  """One row per (setting, seed): the setting ({"threshold": 0.7, ...}), the seed, score()."""
  return [{"setting": setting, "seed": seed,
           "score": measure(seed, dataclasses.replace(base, **setting), **corpus)}
          for setting in settings for seed in seeds]
