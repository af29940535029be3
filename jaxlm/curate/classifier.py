"""GPT-3's quality classifier (Brown et al. 2020, appendix A): hashed word n-gram features and a
logistic regression telling a reference corpus of good text (positives) from the raw crawl
(negatives); curation keeps a document when np.random.pareto(alpha) > 1 - score (alpha = 9),
or, with `classifier.keep=threshold`, when its score reaches the threshold.

scikit-learn does the work (HashingVectorizer: no vocabulary to store; LogisticRegression).
Saved without pickle: `classifier.json` (the vectorizer's settings, the intercept, what it was
trained on, its held-out AUC) and `coef.npy` (the weights, float64); `load` rebuilds the same
scorer, so a saved-then-loaded model scores exactly as the trained one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from jaxlm import files
from jaxlm.curate.settings import ClassifierConfig
from jaxlm.errors import UserError

MODEL_FILE, WEIGHTS_FILE = "classifier.json", "coef.npy"
FORMAT = "jaxlm-quality-classifier/1"


class ClassifierError(UserError):
  """A classifier folder that cannot be used, or training data that cannot train one."""


@dataclasses.dataclass(frozen=True)
class Features:
  """The HashingVectorizer's settings (all a saved model needs to featurize as in training)."""
  n_features: int = 2**18          # hashed feature slots (GPT-3 used Spark's HashingTF)
  ngram_max: int = 2               # word 1..n-grams
  lowercase: bool = True

  def vectorizer(self) -> HashingVectorizer:
    # alternate_sign=False + l2 norm: non-negative tf features of unit length per document.
    return HashingVectorizer(n_features=self.n_features, ngram_range=(1, self.ngram_max),
                             lowercase=self.lowercase, alternate_sign=False, norm="l2",
                             dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class Model:
  features: Features
  coef: np.ndarray                 # [n_features] float64
  intercept: float
  info: dict[str, Any]             # what it was trained on, held-out AUC, fingerprint

  def scores(self, texts: Sequence[str]) -> np.ndarray:
    """[len(texts)] probabilities of "like the reference corpus"."""
    x = self.features.vectorizer().transform(texts)  # [documents, n_features] sparse
    return 1.0 / (1.0 + np.exp(-(x @ self.coef + self.intercept)))


def heldout_split(identities: Sequence[str], fraction: float) -> np.ndarray:
  """[documents] bool: held out, decided by a hash of each identity (stable across runs)."""
  return np.array([int(hashlib.blake2b(i.encode(), digest_size=8).hexdigest(), 16) / 2**64
                   < fraction for i in identities], dtype=bool)


def train(positives: Sequence[str], negatives: Sequence[str], features: Features = Features(),
          heldout: np.ndarray | None = None, c: float = 1.0, info: dict[str, Any] | None = None
          ) -> Model:
  """A logistic regression on hashed n-grams, positives = 1. heldout: [positives + negatives]
  bool, documents left out of training and scored for the AUC (None: train on all)."""
  if not positives or not negatives:
    raise ClassifierError(f"training needs positive and negative documents (found "
                          f"{len(positives)} positive, {len(negatives)} negative); check the "
                          f"--positive and --negative globs.")
  texts = list(positives) + list(negatives)
  labels = np.array([1] * len(positives) + [0] * len(negatives))
  held = np.zeros(len(texts), bool) if heldout is None else np.asarray(heldout, bool)
  train_rows = ~held
  if len(set(labels[train_rows])) < 2:
    raise ClassifierError("every training document of one class is held out; add documents.")
  x = features.vectorizer().transform(texts)
  # balanced: a crawl has many more negatives than the reference has positives.
  regression = LogisticRegression(C=c, class_weight="balanced", max_iter=1000)
  regression.fit(x[train_rows], labels[train_rows])
  model = Model(features, regression.coef_[0].astype(np.float64),
                float(regression.intercept_[0]), {})
  summary = {"positives": len(positives), "negatives": len(negatives),
             "trained_on": int(train_rows.sum()), "C": c}
  if held.any() and len(set(labels[held])) == 2:
    summary["heldout_documents"] = int(held.sum())
    summary["heldout_auc"] = float(roc_auc_score(labels[held], model.scores(
        [t for t, h in zip(texts, held) if h])))
  return dataclasses.replace(model, info={**summary, **(info or {})})


def fingerprint(model: Model) -> str:
  return hashlib.sha256(model.coef.tobytes() + repr(model.intercept).encode()
                        + json.dumps(dataclasses.asdict(model.features)).encode()
                        ).hexdigest()[:16]


def save(model: Model, directory: str) -> None:
  """classifier.json + coef.npy into `directory` (created; the JSON written last)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, WEIGHTS_FILE), "wb") as f:
    np.save(f, model.coef, allow_pickle=False)
  files.write_bytes(os.path.join(directory, MODEL_FILE), (json.dumps({
      "format": FORMAT, "features": dataclasses.asdict(model.features),
      "intercept": model.intercept, "fingerprint": fingerprint(model), **model.info},
      indent=2) + "\n").encode())


def load(directory: str) -> Model:
  """The model `save` wrote (ClassifierError naming the key and the fix if unusable)."""
  where = f"classifier.model={directory!r}"
  try:
    with open(os.path.join(directory, MODEL_FILE), encoding="utf-8") as f:
      meta = json.load(f)
    coef = np.load(os.path.join(directory, WEIGHTS_FILE), allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ClassifierError(f"{where}: no readable classifier there ({e}); train one with python "
                          f"-m experiments.curate_classifier --output=DIR.") from None
  if meta.get("format") != FORMAT:
    raise ClassifierError(f"{where}: {MODEL_FILE} is not a {FORMAT} model; retrain it.")
  features = Features(**meta["features"])
  if coef.shape != (features.n_features,):
    raise ClassifierError(f"{where}: {WEIGHTS_FILE} holds {coef.shape} weights, expected "
                          f"({features.n_features},); retrain it.")
  model = Model(features, coef, float(meta["intercept"]),
                {k: v for k, v in meta.items() if k not in ("format", "features", "intercept")})
  if fingerprint(model) != meta.get("fingerprint"):
    raise ClassifierError(f"{where}: {WEIGHTS_FILE} does not match {MODEL_FILE} (fingerprint); "
                          f"copy the folder again or retrain.")
  return model


def keeps(score: float, document_hash: str, config: ClassifierConfig) -> bool:
  """GPT-3's rule: keep when np.random.pareto(alpha) > 1 - score, the draw seeded by the
  document's hash and classifier.seed (the same document, the same fate, on any worker);
  or score >= threshold."""
  if config.keep == "threshold":
    return score >= config.threshold
  rng = np.random.default_rng([config.seed, int(document_hash, 16)])
  return bool(rng.pareto(config.alpha) > 1.0 - score)
