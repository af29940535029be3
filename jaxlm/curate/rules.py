"""Per-document curation: normalization, language, decontamination, quality heuristics.

Each stage is a pure function of one document and the config, so the local worker pool and
Beam's workers run the same code and a document's fate never depends on another document (the
de-duplication, which does, is in dedup.py). `DocumentRules.apply` runs the stages in order:
normalize -> language -> decontaminate -> quality -> classifier -> PII scrubbing; the first
that rejects names the drop.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import json
import re
import unicodedata

from py3langid.langid import MODEL_FILE, LanguageIdentifier

from jaxlm import textfiles
from jaxlm.curate import classifier, extract, pii, urls
from jaxlm.curate.settings import CurationConfig, DecontaminateConfig, QualityConfig

WORD = re.compile(r"\w+")
_BULLETS = ("•", "●", "○", "▪", "■", "◦", "‣", "- ", "* ", "· ")
_ELLIPSES = ("...", "…")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’")
# quality_failure's checks in the order it runs them (the report lists drops in this order).
QUALITY_CHECKS = ("min_words", "max_words", "mean_word_length", "symbol_ratio",
                  "non_alpha_words", "bullet_lines", "ellipsis_lines", "punctuation_lines",
                  "duplicate_lines", "duplicate_line_chars", "top_ngram", "duplicate_ngrams")


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What the per-document stages made of one document."""
  text: str | None         # the curated text; None when dropped
  rule: str | None         # the rule that dropped it ("language", "quality:min_words", ...)
  language: str = ""       # the identified language ("" with the stage off)
  cut: bool = False        # decontamination cut spans out of it
  score: float | None = None  # the quality classifier's score (None with the stage off)
  pii: dict[str, int] = dataclasses.field(default_factory=dict)  # {kind: replacements}


# -- Normalization ------------------------------------------------------------------------------

def normalize(text: str, unicode_form: str, whitespace: bool,
              boilerplate: list[re.Pattern], boilerplate_max_words: int) -> str:
  """Unicode form, whitespace and boilerplate lines. Whitespace: spaces/tabs collapse to one
  space, lines are trimmed, runs of blank lines become one, the document is stripped."""
  if unicode_form:
    text = unicodedata.normalize(unicode_form, text)
  lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
  if whitespace:
    lines = [" ".join(line.split()) for line in lines]
  if boilerplate:
    lines = [line for line in lines
             if len(line.split()) > boilerplate_max_words
             or not any(p.search(line.strip()) for p in boilerplate)]
  if whitespace:
    kept: list[str] = []
    for line in lines:
      if line or (kept and kept[-1]):
        kept.append(line)
    lines = kept
  return "\n".join(lines).strip()


# -- Quality heuristics (C4, Gopher) ------------------------------------------------------------

def _top_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
  """Characters of the most frequent word n-gram (all its occurrences) / characters of words."""
  counts = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
  if not counts:
    return 0.0
  gram, count = counts.most_common(1)[0]
  return count * sum(map(len, gram)) / total_chars


def _duplicate_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
  """Characters of words inside a repeat of an earlier word n-gram / characters of words."""
  seen: set[tuple[str, ...]] = set()
  covered = [False] * len(words)
  for i in range(len(words) - n + 1):
    gram = tuple(words[i:i + n])
    if gram in seen:
      covered[i:i + n] = [True] * n
    seen.add(gram)
  return sum(len(w) for w, c in zip(words, covered) if c) / total_chars


def quality_failure(text: str, q: QualityConfig) -> str | None:
  """The name of the first heuristic `text` fails, or None. Cheap checks first."""
  words = text.split()
  if len(words) < q.min_words:
    return "min_words"
  if len(words) > q.max_words:
    return "max_words"
  word_chars = sum(map(len, words))
  if not q.min_mean_word_length <= word_chars / len(words) <= q.max_mean_word_length:
    return "mean_word_length"
  symbols = text.count("#") + text.count("...") + text.count("…")
  if symbols / len(words) > q.max_symbol_ratio:
    return "symbol_ratio"
  if sum(not any(c.isalpha() for c in w) for w in words) / len(words) \
      > q.max_non_alpha_word_fraction:
    return "non_alpha_words"
  lines = [line.strip() for line in text.split("\n") if line.strip()]
  if sum(line.startswith(_BULLETS) for line in lines) / len(lines) > q.max_bullet_line_fraction:
    return "bullet_lines"
  if sum(line.endswith(_ELLIPSES) for line in lines) / len(lines) > q.max_ellipsis_line_fraction:
    return "ellipsis_lines"
  if sum(line.endswith(_TERMINAL) for line in lines) / len(lines) \
      < q.min_punctuation_line_fraction:
    return "punctuation_lines"
  seen: set[str] = set()
  duplicate_lines = duplicate_chars = 0
  for line in lines:
    if line in seen:
      duplicate_lines += 1
      duplicate_chars += len(line)
    seen.add(line)
  if duplicate_lines / len(lines) > q.max_duplicate_line_fraction:
    return "duplicate_lines"
  if duplicate_chars / sum(map(len, lines)) > q.max_duplicate_line_char_fraction:
    return "duplicate_line_chars"
  lowered = [w.lower() for w in words]
  for n, limit in zip((2, 3, 4), q.max_top_ngram_fraction):
    if _top_ngram_fraction(lowered, n, word_chars) > limit:
      return "top_ngram"
  for n, limit in zip(range(5, 11), q.max_duplicate_ngram_fraction):
    if _duplicate_ngram_fraction(lowered, n, word_chars) > limit:
      return "duplicate_ngrams"
  return None


# -- Decontamination ----------------------------------------------------------------------------

def _strings(value) -> list[str]:
  """Every string inside a JSON value (task files keep questions, choices, passages in fields)."""
  if isinstance(value, str):
    return [value]
  if isinstance(value, dict):
    value = list(value.values())
  if isinstance(value, list):
    return [s for item in value for s in _strings(item)]
  return []


def evaluation_texts(path: str) -> list[str]:
  """The texts of one evaluation file: every string of .jsonl/.json records, every cell of a
  .csv, else the whole file."""
  with open(path, encoding="utf-8", errors="replace") as f:
    content = f.read()
  if path.endswith(".jsonl"):
    return [s for line in content.splitlines() if line.strip()
            for s in _strings(json.loads(line))]
  if path.endswith(".json"):
    return _strings(json.loads(content))
  if path.endswith(".csv"):
    return [cell for row in csv.reader(io.StringIO(content)) for cell in row]
  return [content]


def evaluation_ngrams(config: DecontaminateConfig) -> frozenset[str]:
  """Every word n-gram (lower-cased \\w+ words, joined by spaces) of the evaluation files."""
  grams: set[str] = set()
  for path in textfiles.resolve_globs(config.files, "--config.decontaminate.files"):
    try:
      texts = evaluation_texts(path)
    except (OSError, ValueError) as e:
      raise textfiles.CorpusError(f"decontamination file {path} cannot be read ({e}); fix it or "
                                f"leave it out of --config.decontaminate.files.") from None
    for text in texts:
      words = WORD.findall(text.lower())
      grams.update(" ".join(words[i:i + config.ngram])
                   for i in range(len(words) - config.ngram + 1))
  return frozenset(grams)


def contaminated_spans(text: str, grams: frozenset[str], n: int) -> list[tuple[int, int]]:
  """Character spans [start, end) of `text` covered by n-grams in `grams`, merged."""
  matches = list(WORD.finditer(text.lower()))
  words = [m.group() for m in matches]
  spans: list[tuple[int, int]] = []
  for i in range(len(words) - n + 1):
    if " ".join(words[i:i + n]) in grams:
      start, end = matches[i].start(), matches[i + n - 1].end()
      if spans and start <= spans[-1][1]:
        spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
      else:
        spans.append((start, end))
  return spans


def dedup_hash(text: str) -> str:
  """The exact-dedup hash (dedup.exact_hash; here, as dedup imports this module): the
  classifier's Pareto draw is seeded by it, so exact copies share their fate."""
  return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"),
                         digest_size=16).hexdigest()


# -- All per-document stages --------------------------------------------------------------------

class DocumentRules:
  """The per-document stages of `config`, with their resources loaded once per process (the
  language model, the evaluation n-grams, the classifier; for web archives the extractor and
  the block list, which the readers take from here)."""

  def __init__(self, config: CurationConfig):
    self.config = config
    self.extractor = extract.check_extractor(config.web.extractor)
    self.blocklist = urls.load(config.web.blocklist)
    self.classifier = classifier.load(config.classifier.model) if config.classifier.model \
        else None
    self._boilerplate = [re.compile(p, re.IGNORECASE)
                         for p in config.normalize.boilerplate_patterns]
    self._identifier = None
    if config.language.enabled:
      # py3langid ships its model (numpy arrays, no download, no pickle).
      self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    self._grams = (evaluation_ngrams(config.decontaminate) if config.decontaminate.files
                   else frozenset())

  def language(self, text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the start of `text`."""
    code, probability = self._identifier.classify(text[:self.config.language.max_chars])
    return code, float(probability)

  def apply(self, text: str) -> Outcome:
    c = self.config
    if c.normalize.enabled:
      text = normalize(text, c.normalize.unicode_form, c.normalize.whitespace, self._boilerplate,
                       c.normalize.boilerplate_max_words)
    if not text.strip():
      return Outcome(None, "empty")
    language = ""
    if self._identifier is not None:
      language, probability = self.language(text)
      if (c.language.languages and language not in c.language.languages) \
          or probability < c.language.min_confidence:
        return Outcome(None, "language", language)
    cut = False
    if self._grams:
      spans = contaminated_spans(text, self._grams, c.decontaminate.ngram)
      if spans and c.decontaminate.action == "drop":
        return Outcome(None, "contaminated", language)
      if spans:
        pieces, position = [], 0
        for start, end in spans:
          pieces.append(text[position:start])
          position = end
        text = normalize("".join(pieces) + text[position:], "", True, [], 0)
        cut = True
        if not text:
          return Outcome(None, "contaminated", language, cut)
    if c.quality.enabled:
      failure = quality_failure(text, c.quality)
      if failure:
        return Outcome(None, f"quality:{failure}", language, cut)
    score = None
    if self.classifier is not None:
      score = round(float(self.classifier.scores([text])[0]), 6)  # (6 digits: stable JSON)
      if not classifier.keeps(score, dedup_hash(text), c.classifier):
        return Outcome(None, "classifier", language, cut, score)
    found: dict[str, int] = {}
    if c.pii.enabled:
      text, found = pii.scrub(text, c.pii.kinds)
    return Outcome(text, None, language, cut, score, found)
