r"""Train GPT-3's quality classifier for curation: hashed word n-grams + logistic regression,
a reference corpus of good text (positives) against the raw crawl (negatives); see
jaxlm/curate/classifier.py and docs/curation.md.

  python -m experiments.curate_classifier --positive='/data/reference/*.txt' \
      --negative='/data/crawl/*.warc.gz' --output=/data/quality_classifier
  # then curate with it (GPT-3's Pareto sampling, alpha 9; or --config.classifier.keep=threshold)
  python -m experiments.curate --input='/data/crawl/*.warc.gz' --output=/data/clean \
      --config.classifier.model=/data/quality_classifier
  # its AUC on documents you labelled (e.g. clean prose against junk):
  python -m experiments.curate_classifier --positive=... --negative=... --output=DIR \
      --eval_positive='/data/good/*.txt' --eval_negative='/data/junk/*.txt'

Inputs are read as curate reads them (web archives: their pages' main text, with --config's
web.* keys) and normalized as curate normalizes them. Writes DIR/classifier.json (settings,
counts, held-out AUC) and DIR/coef.npy; prints one JSON line.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags
from sklearn.metrics import roc_auc_score

from experiments import common
from jaxlm.curate import classifier, inputs, settings

_CONFIG = common.define_config_flag(settings.DEFAULT_CONFIG_FILE)
_POSITIVE = flags.DEFINE_string("positive", None, "globs of the reference corpus (good text): "
                                "text, .jsonl (e.g. a curated folder's *.jsonl) or web archives.")
_NEGATIVE = flags.DEFINE_string("negative", None, "globs of the raw crawl (the negatives).")
_OUTPUT = flags.DEFINE_string("output", None, "folder to write the classifier into (new).")
_HELDOUT = flags.DEFINE_float("heldout", 0.1, "share of documents held out of training for "
                              "the AUC (chosen by a hash of each document's id).")
_FEATURES = flags.DEFINE_integer("n_features", 2**18, "hashed feature slots.", lower_bound=16)
_NGRAM = flags.DEFINE_integer("ngram_max", 2, "word n-grams of 1..N words.", lower_bound=1)
_C = flags.DEFINE_float("C", 1.0, "inverse L2 regularization strength of the regression.")
_EVAL_POSITIVE = flags.DEFINE_string("eval_positive", None, "globs of good documents to report "
                                     "the AUC on (with --eval_negative).")
_EVAL_NEGATIVE = flags.DEFINE_string("eval_negative", None, "globs of bad documents to report "
                                     "the AUC on (with --eval_positive).")


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for flag in (_POSITIVE, _NEGATIVE, _OUTPUT):
    if not flag.value:
      raise app.UsageError(f"--{flag.name} is required.")
  if os.path.exists(_OUTPUT.value):
    raise app.UsageError(f"--output {_OUTPUT.value} already exists; choose a new folder.")
  if bool(_EVAL_POSITIVE.value) != bool(_EVAL_NEGATIVE.value):
    raise app.UsageError("--eval_positive and --eval_negative go together.")
  config = settings.from_dict(common.config_value(_CONFIG).to_dict())
  inputs.check_resources(config)
  positives = inputs.texts(_POSITIVE.value, config)
  negatives = inputs.texts(_NEGATIVE.value, config)
  ids = [f"+{i}" for i, _ in positives] + [f"-{i}" for i, _ in negatives]
  model = classifier.train(
      [t for _, t in positives], [t for _, t in negatives],
      classifier.Features(n_features=_FEATURES.value, ngram_max=_NGRAM.value),
      classifier.heldout_split(ids, _HELDOUT.value), c=_C.value,
      info={"positive": _POSITIVE.value, "negative": _NEGATIVE.value})
  result = dict(model.info)
  if _EVAL_POSITIVE.value:
    good = [t for _, t in inputs.texts(_EVAL_POSITIVE.value, config)]
    bad = [t for _, t in inputs.texts(_EVAL_NEGATIVE.value, config)]
    scores = model.scores(good + bad)
    result.update(eval_documents=len(good) + len(bad), eval_auc=float(roc_auc_score(
        np.r_[np.ones(len(good)), np.zeros(len(bad))], scores)))
    model = classifier.Model(model.features, model.coef, model.intercept, result)
  classifier.save(model, _OUTPUT.value)
  print(json.dumps({**result, "output": _OUTPUT.value}))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
