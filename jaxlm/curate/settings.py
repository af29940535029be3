"""The curation config: typed, frozen sections built from a config file plus overrides.

A curation config file (`configs/curation/default.py`) defines `get_config()` like the training
configs; `--config.K=V` overrides go through `config.apply_overrides`, and every value is checked
here, before any input is read or any output written.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from jaxlm import config as config_lib
from jaxlm.config import ConfigError

# The choices some keys name (the registries live in the modules that use them: extract.py,
# pii.py; named here so that checking a config imports neither).
EXTRACTORS = ("resiliparse", "trafilatura")
PII_KINDS = ("email", "ip", "phone")

DEFAULT_CONFIG_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs", "curation", "default.py")


@dataclasses.dataclass(frozen=True)
class InputConfig:
  text_key: str = "text"           # the field holding the text in .jsonl inputs
  on_bad_input: str = "fail"       # fail: one-line error; drop: count the document as dropped
  shard_mb: float = 64.0           # input files are grouped into shards of about this size


@dataclasses.dataclass(frozen=True)
class WebConfig:
  """WARC/WET inputs (.warc.gz, .warc.wet.gz): which records become documents, and how."""
  extractor: str = "resiliparse"   # main-text extractor of HTML pages: resiliparse | trafilatura
  content_types: tuple[str, ...] = ("text/html", "application/xhtml+xml")  # others: skipped
  blocklist: str = ""              # file of blocked domains (subdomains too) / URL globs; "": none


@dataclasses.dataclass(frozen=True)
class NormalizeConfig:
  enabled: bool = True
  unicode_form: str = "NFC"        # NFC, NFKC, NFD, NFKD or "" (leave as is)
  whitespace: bool = True          # collapse runs of spaces/tabs, trim lines, <= 1 blank line
  boilerplate_patterns: tuple[str, ...] = ()  # regexes (case-insensitive) of lines to delete
  boilerplate_max_words: int = 30  # only lines this short are boilerplate candidates


@dataclasses.dataclass(frozen=True)
class LanguageConfig:
  enabled: bool = True
  languages: tuple[str, ...] = ("en",)  # ISO 639-1 codes to keep; empty: keep every language
  min_confidence: float = 0.65     # py3langid's normalized probability of the top language
  max_chars: int = 5000            # classify this much of each document (the start)


@dataclasses.dataclass(frozen=True)
class QualityConfig:
  """C4 / Gopher (Rae et al. 2021, appendix A) document heuristics."""
  enabled: bool = True
  min_words: int = 50
  max_words: int = 100_000
  min_mean_word_length: float = 3.0
  max_mean_word_length: float = 10.0
  max_symbol_ratio: float = 0.1            # ('#' + ellipses) per word
  max_non_alpha_word_fraction: float = 0.2  # words without an alphabetic character
  max_bullet_line_fraction: float = 0.9
  max_ellipsis_line_fraction: float = 0.3
  min_punctuation_line_fraction: float = 0.12  # lines ending in . ! ? " ' (C4's rule, per doc)
  max_duplicate_line_fraction: float = 0.3
  max_duplicate_line_char_fraction: float = 0.2
  max_top_ngram_fraction: tuple[float, ...] = (0.20, 0.18, 0.16)  # n = 2, 3, 4
  max_duplicate_ngram_fraction: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)  # 5-10


@dataclasses.dataclass(frozen=True)
class DecontaminateConfig:
  files: str = ""                  # comma-separated globs of evaluation files; "" = stage off
  ngram: int = 13                  # GPT-3's overlap length, in words
  action: str = "drop"             # drop the document, or cut the overlapping spans out


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """GPT-3's quality classifier: hashed n-grams + logistic regression, trained by
  `python -m experiments.curate_classifier`; documents kept by their score."""
  model: str = ""                  # folder the training command wrote; "": stage off
  keep: str = "pareto"             # pareto: keep if pareto(alpha) > 1 - score; threshold
  alpha: float = 9.0               # Pareto shape (GPT-3: 9); smaller keeps more low scores
  threshold: float = 0.5           # keep: threshold keeps scores >= this
  seed: int = 0                    # of the Pareto draws (each seeded by the document's hash too)


@dataclasses.dataclass(frozen=True)
class PiiConfig:
  enabled: bool = False            # replace personal data by placeholders (counted)
  kinds: tuple[str, ...] = ("email", "ip", "phone")  # of jaxlm.curate.pii.PATTERNS


@dataclasses.dataclass(frozen=True)
class DedupConfig:
  exact: bool = True               # hash of the normalized, lower-cased text
  near: bool = True                # MinHash LSH
  threshold: float = 0.65          # Jaccard similarity of word shingles that makes a duplicate
  shingle_words: int = 3           # words per shingle (shingles stop at sentence ends)
  num_perm: int = 128
  seed: int = 1


@dataclasses.dataclass(frozen=True)
class OutputConfig:
  num_shards: int = 4              # output .jsonl shards (documents assigned by a hash of id)


@dataclasses.dataclass(frozen=True)
class CurationConfig:
  input: InputConfig = InputConfig()
  web: WebConfig = WebConfig()
  normalize: NormalizeConfig = NormalizeConfig()
  language: LanguageConfig = LanguageConfig()
  quality: QualityConfig = QualityConfig()
  decontaminate: DecontaminateConfig = DecontaminateConfig()
  classifier: ClassifierConfig = ClassifierConfig()
  pii: PiiConfig = PiiConfig()
  dedup: DedupConfig = DedupConfig()
  output: OutputConfig = OutputConfig()


def to_dict(config: CurationConfig) -> dict[str, Any]:
  return dataclasses.asdict(config)


def _check(config: CurationConfig) -> CurationConfig:
  """Ranges and choices, each a ConfigError naming the key."""
  def require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
      raise ConfigError(f"{key}={value!r}: {what}.")
  require(config.input.on_bad_input in ("fail", "drop"), "input.on_bad_input",
          config.input.on_bad_input, "must be 'fail' or 'drop'")
  require(config.input.shard_mb > 0, "input.shard_mb", config.input.shard_mb, "must be > 0")
  require(config.web.extractor in EXTRACTORS, "web.extractor", config.web.extractor,
          f"must be one of {', '.join(EXTRACTORS)}")
  require(bool(config.web.content_types), "web.content_types", config.web.content_types,
          "needs at least one type, e.g. ('text/html',)")
  require(config.classifier.keep in ("pareto", "threshold"), "classifier.keep",
          config.classifier.keep, "must be 'pareto' or 'threshold'")
  require(config.classifier.alpha > 0, "classifier.alpha", config.classifier.alpha,
          "must be > 0 (GPT-3 used 9)")
  require(0.0 <= config.classifier.threshold <= 1.0, "classifier.threshold",
          config.classifier.threshold, "must be in [0, 1]")
  require(set(config.pii.kinds) <= set(PII_KINDS), "pii.kinds", config.pii.kinds,
          f"each must be one of {', '.join(PII_KINDS)}")
  require(config.normalize.unicode_form in ("", "NFC", "NFKC", "NFD", "NFKD"),
          "normalize.unicode_form", config.normalize.unicode_form,
          "must be NFC, NFKC, NFD, NFKD or ''")
  require(0.0 <= config.language.min_confidence <= 1.0, "language.min_confidence",
          config.language.min_confidence, "must be in [0, 1]")
  require(config.language.max_chars > 0, "language.max_chars", config.language.max_chars,
          "must be > 0")
  require(config.quality.min_words <= config.quality.max_words, "quality.min_words",
          config.quality.min_words, f"must be <= quality.max_words={config.quality.max_words}")
  require(len(config.quality.max_top_ngram_fraction) == 3, "quality.max_top_ngram_fraction",
          config.quality.max_top_ngram_fraction, "needs 3 values (n = 2, 3, 4)")
  require(len(config.quality.max_duplicate_ngram_fraction) == 6,
          "quality.max_duplicate_ngram_fraction", config.quality.max_duplicate_ngram_fraction,
          "needs 6 values (n = 5 to 10)")
  require(config.decontaminate.ngram >= 1, "decontaminate.ngram", config.decontaminate.ngram,
          "must be >= 1")
  require(config.decontaminate.action in ("drop", "cut"), "decontaminate.action",
          config.decontaminate.action, "must be 'drop' or 'cut'")
  require(0.0 < config.dedup.threshold <= 1.0, "dedup.threshold", config.dedup.threshold,
          "must be in (0, 1]")
  require(config.dedup.shingle_words >= 1, "dedup.shingle_words", config.dedup.shingle_words,
          "must be >= 1")
  require(config.dedup.num_perm >= 16, "dedup.num_perm", config.dedup.num_perm, "must be >= 16")
  require(config.output.num_shards >= 1, "output.num_shards", config.output.num_shards,
          "must be >= 1")
  return config


def from_dict(values: Mapping[str, Any]) -> CurationConfig:
  """A checked CurationConfig from nested plain values; unknown keys are ConfigErrors."""
  sections = {f.name: f.type for f in dataclasses.fields(CurationConfig)}
  classes = {f.name: type(f.default) for f in dataclasses.fields(CurationConfig)}
  built = {}
  for name, value in values.items():
    if name not in sections:
      raise ConfigError(f"unknown curation config key '{name}'; sections are: "
                        f"{', '.join(sections)}.")
    if not isinstance(value, Mapping):
      raise ConfigError(f"curation config key '{name}' must be a section (a dict).")
    built[name] = config_lib.section_from_mapping(name, classes[name], value)
  return _check(CurationConfig(**built))


def load(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> CurationConfig:
  """The config of `path` (default: configs/curation/default.py) with `overrides`
  ({"dedup.threshold": 0.7}) applied, checked."""
  values = config_lib.load_file(path or DEFAULT_CONFIG_FILE)
  return from_dict(config_lib.apply_overrides(values, overrides or {}))
