"""Curation defaults: web pages' main text, C4/Gopher-style filters for English prose, exact +
MinHash dedup; the quality classifier and PII scrubbing are off until configured.

  python -m experiments.curate --input='/data/crawl/**/*.jsonl' --output=/data/clean \
      --config=configs/curation/default.py --config.dedup.threshold=0.7
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.input = dict(text_key="text", on_bad_input="fail", shard_mb=64.0)
  # WARC/WET inputs: the main-text extractor, the content types kept, a block list file
  # (domains, URL globs; jaxlm/curate/urls.py).
  config.web = dict(extractor="resiliparse", content_types=("text/html", "application/xhtml+xml"),
                    blocklist="")
  config.normalize = dict(
      enabled=True, unicode_form="NFC", whitespace=True, boilerplate_max_words=30,
      # Short lines matching one of these are deleted (C4 deleted every line mentioning
      # javascript; cookie banners, legal footers and share buttons are the usual offenders).
      boilerplate_patterns=(
          r"\bcookies?\b", r"\bjavascript\b", r"all rights reserved", r"privacy policy",
          r"terms of (use|service)", r"\bsubscribe\b", r"\b(sign|log) ?(in|up)\b",
          r"^(share|tweet|print|email)( this)?( (page|article|post))?[.:!]?$",
          r"^(home|menu|skip to (main )?content)$"))
  config.language = dict(enabled=True, languages=("en",), min_confidence=0.65, max_chars=5000)
  config.quality = dict(
      enabled=True, min_words=50, max_words=100_000, min_mean_word_length=3.0,
      max_mean_word_length=10.0, max_symbol_ratio=0.1, max_non_alpha_word_fraction=0.2,
      max_bullet_line_fraction=0.9, max_ellipsis_line_fraction=0.3,
      min_punctuation_line_fraction=0.12, max_duplicate_line_fraction=0.3,
      max_duplicate_line_char_fraction=0.2,
      max_top_ngram_fraction=(0.20, 0.18, 0.16),                          # n = 2, 3, 4
      max_duplicate_ngram_fraction=(0.15, 0.14, 0.13, 0.12, 0.11, 0.10))  # n = 5 .. 10
  # files: comma-separated globs of evaluation sets (task .jsonl/.json/.csv or any text).
  config.decontaminate = dict(files="", ngram=13, action="drop")
  # model: a folder `python -m experiments.curate_classifier` wrote ("" = stage off); keep:
  # pareto (GPT-3: keep if np.random.pareto(alpha) > 1 - score) or threshold.
  config.classifier = dict(model="", keep="pareto", alpha=9.0, threshold=0.5, seed=0)
  config.pii = dict(enabled=False, kinds=("email", "ip", "phone"))
  # 3-word shingles that stop at sentence ends (not at line breaks) and Jaccard >= 0.65: what
  # finds reflowed, re-headed and 3%-edited copies (python -m experiments.dedup_study).
  config.dedup = dict(exact=True, near=True, threshold=0.65, shingle_words=3, num_perm=128,
                      seed=1)
  config.output = dict(num_shards=4)
  return config
