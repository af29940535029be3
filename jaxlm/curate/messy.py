r"""A messy web-like corpus (and clean held-out files) from text every Python ships: what the
curation tests and `python -m experiments.messy_corpus` generate.

English prose comes from the Python reference documentation (`pydoc_data.topics`), split into
documents of a few paragraphs. The corpus then gets what crawls have: exact copies (some with
other whitespace), near duplicates (word edits, reordered paragraphs, other headers and
footers), cookie and legal boilerplate, documents in other languages, and junk (short stubs,
symbol soup, bullet lists, repeated lines). A share of the clean documents goes, untouched and
never duplicated, to `heldout/` for measuring what a model learned.

Writes OUTPUT/train/*.txt + OUTPUT/train/*.jsonl (the messy corpus), OUTPUT/heldout/*.txt and
OUTPUT/truth.json (every planted document: its kind and, for copies, the original's id).
"""

from __future__ import annotations

import functools
import json
import os
import random
import textwrap

# A few sentences per language (everyday prose), sampled into documents.
FOREIGN = {
    "fr": ["Le conseil municipal a voté hier soir le budget de la nouvelle bibliothèque.",
           "Les habitants du quartier se plaignent depuis des mois du bruit des travaux.",
           "Nous avons passé nos vacances dans un petit village au bord de la mer.",
           "La recette demande trois œufs, du beurre fondu et un peu de farine.",
           "Le train de sept heures est arrivé avec vingt minutes de retard.",
           "Ma sœur travaille dans un hôpital et rentre souvent très tard le soir.",
           "Il faut réserver sa place au moins une semaine avant le spectacle.",
           "Les enfants jouaient dans le jardin pendant que la soupe cuisait."],
    "de": ["Der Gemeinderat hat gestern Abend über den Haushalt der neuen Bücherei abgestimmt.",
           "Die Bewohner des Viertels beschweren sich seit Monaten über den Baulärm.",
           "Wir haben unseren Urlaub in einem kleinen Dorf am Meer verbracht.",
           "Für das Rezept braucht man drei Eier, geschmolzene Butter und etwas Mehl.",
           "Der Zug um sieben Uhr kam mit zwanzig Minuten Verspätung an.",
           "Meine Schwester arbeitet in einem Krankenhaus und kommt oft spät nach Hause.",
           "Man muss seinen Platz mindestens eine Woche vor der Vorstellung reservieren.",
           "Die Kinder spielten im Garten, während die Suppe kochte."],
    "es": ["El ayuntamiento aprobó anoche el presupuesto de la nueva biblioteca.",
           "Los vecinos del barrio se quejan desde hace meses del ruido de las obras.",
           "Pasamos las vacaciones en un pequeño pueblo junto al mar.",
           "La receta lleva tres huevos, mantequilla derretida y un poco de harina.",
           "El tren de las siete llegó con veinte minutos de retraso.",
           "Mi hermana trabaja en un hospital y muchas veces vuelve muy tarde a casa.",
           "Hay que reservar el asiento al menos una semana antes de la función.",
           "Los niños jugaban en el jardín mientras se cocinaba la sopa."],
    "ru": ["Вчера вечером городской совет утвердил бюджет новой библиотеки.",
           "Жители района уже несколько месяцев жалуются на шум стройки.",
           "Мы провели отпуск в маленькой деревне на берегу моря.",
           "Для этого рецепта нужны три яйца, растопленное масло и немного муки.",
           "Поезд в семь часов прибыл с опозданием на двадцать минут.",
           "Моя сестра работает в больнице и часто возвращается домой поздно.",
           "Место нужно бронировать как минимум за неделю до спектакля.",
           "Дети играли в саду, пока варился суп."],
}
BOILERPLATE = ["We use cookies to improve your experience. Accept all cookies",
               "Copyright 2021 Example Media Ltd. All rights reserved.",
               "Subscribe to our newsletter", "Privacy Policy | Terms of Use", "Share this article"]
HEADERS = ["Posted by admin on {d} | {n} comments", "Last updated {d} by the editors",
           "From the archive, first published {d}", "Filed under reference, {n} views"]


def _is_prose(paragraph: str) -> bool:
  """Not a code block (indented or a >>> session), grammar rule, table or heading underline."""
  return bool(paragraph) and not paragraph.startswith(" ") and "::=" not in paragraph \
      and ">>>" not in paragraph \
      and not any(set(line) <= set("*=-+|~^ ") for line in paragraph.splitlines())


def _group(paragraphs: list[str], min_words: int) -> list[str]:
  """Consecutive paragraphs joined into documents of at least `min_words` words."""
  documents, current = [], []
  for paragraph in paragraphs:
    current.append(paragraph)
    if sum(len(p.split()) for p in current) >= min_words:
      documents.append("\n\n".join(current))
      current = []
  return documents


@functools.lru_cache(maxsize=2)
def clean_documents(min_words: int = 220, docstrings: bool = True) -> tuple[str, ...]:
  """English prose documents: the reference documentation's topics and (docstrings=True) the
  standard library's docstrings, module by module, cut into whole paragraphs."""
  import ast  # pylint: disable=import-outside-toplevel
  import pydoc_data.topics  # pylint: disable=import-outside-toplevel

  from jaxlm import corpora  # pylint: disable=import-outside-toplevel
  texts = [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)]
  if docstrings:
    root, relpaths = corpora.stdlib_files()
    for rel in relpaths:
      try:
        with open(os.path.join(root, rel), encoding="utf-8") as f:
          tree = ast.parse(f.read())
      except (SyntaxError, UnicodeDecodeError, ValueError):
        continue
      texts.append("\n\n".join(
          ast.get_docstring(node) or "" for node in ast.walk(tree)
          if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))))
  documents, seen = [], set()
  for text in texts:
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if _is_prose(p.strip())]
    # The sources repeat themselves (a topic quoted in a docstring, a module and its C
    # accelerator's twin): a paragraph seen before is left out, so the originals are distinct.
    paragraphs = [p for p in paragraphs if not (p.lower() in seen or seen.add(p.lower()))]
    documents += _group(paragraphs, min_words)
  return tuple(documents)


def near_copy(text: str, kind: str, rng: random.Random, edit_fraction: float = 0.01) -> str:
  """A near duplicate of `text`: `edit_fraction` of its words replaced (edit), its paragraphs
  reordered (reorder), another header and footer (boilerplate), or its lines wrapped anew at
  another width (reflow: the same words, other line breaks)."""
  if kind == "edit":
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * edit_fraction + 1e-9))):
      words[i] = rng.choice(["the", "a", "value", "object", "which", "new"])
    return " ".join(words)
  if kind == "reorder":
    paragraphs = text.split("\n\n")
    rng.shuffle(paragraphs)
    return "\n\n".join(paragraphs)
  if kind == "reflow":
    width = rng.randint(40, 90)
    return "\n\n".join(textwrap.fill(" ".join(p.split()), width) for p in text.split("\n\n"))
  header = rng.choice(HEADERS).format(d=f"2019-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
                                      n=rng.randint(2, 99))
  return f"{header}\n\n{text}\n\nRelated: {rng.choice(['tutorials', 'news', 'guides'])} " \
         f"and more from our team."


def junk_document(kind: str, rng: random.Random) -> str:
  words = "click here best price free shipping buy now limited offer".split()
  if kind == "short":
    return "Page not found. Return to the home page."
  if kind == "symbols":
    return " ".join(rng.choice(["###", "...", "|", "#", ">>", "$$"]) + rng.choice(words)
                    for _ in range(120))
  if kind == "bullets":
    return "\n".join(f"• {' '.join(rng.choices(words, k=6))}" for _ in range(40))
  return "\n".join(["buy now and save big on every order today"] * 30)  # repeated lines


def make(output: str, seed: int = 0, heldout_fraction: float = 0.1,
         docstrings: bool = True) -> dict:
  """Writes the corpus (see the module docstring); returns truth.json's content.
  docstrings=False: the reference documentation alone (a smaller corpus, for tests)."""
  rng = random.Random(seed)
  clean = list(clean_documents(docstrings=docstrings))
  rng.shuffle(clean)
  heldout_count = max(1, int(len(clean) * heldout_fraction))
  heldout, originals = clean[:heldout_count], clean[heldout_count:]
  documents: list[tuple[str, dict]] = []  # (text, truth)
  for i, text in enumerate(originals):
    if rng.random() < 0.3:
      text = "\n".join([rng.choice(BOILERPLATE), text, rng.choice(BOILERPLATE)])
    documents.append((text, {"kind": "original", "family": i}))
  for i in rng.sample(range(len(originals)), len(originals) // 5):
    documents.append((originals[i].replace("\n\n", "\n\n\n") if rng.random() < 0.5
                      else originals[i], {"kind": "exact", "family": i}))
  for kind in ("edit", "reorder", "boilerplate"):
    for i in rng.sample(range(len(originals)), len(originals) // 10):
      documents.append((near_copy(originals[i], kind, rng), {"kind": kind, "family": i}))
  for language, sentences in FOREIGN.items():
    for _ in range(len(originals) // 40):
      documents.append((" ".join(rng.choices(sentences, k=rng.randint(12, 30))),
                        {"kind": "language", "language": language}))
  for kind in ("short", "symbols", "bullets", "repeated"):
    for _ in range(len(originals) // 50):
      documents.append((junk_document(kind, rng), {"kind": "junk_" + kind}))
  rng.shuffle(documents)
  train_dir, heldout_dir = os.path.join(output, "train"), os.path.join(output, "heldout")
  os.makedirs(train_dir)
  os.makedirs(heldout_dir)
  truth: dict[str, dict] = {}
  # Half the documents one per .txt file, the other half in .jsonl files of 50 lines.
  half = len(documents) // 2
  for i, (text, fact) in enumerate(documents[:half]):
    name = f"page{i:05d}.txt"
    with open(os.path.join(train_dir, name), "w", encoding="utf-8") as f:
      f.write(text)
    truth[name] = fact
  rest = documents[half:]
  for start in range(0, len(rest), 50):
    name = f"crawl{start // 50:03d}.jsonl"
    with open(os.path.join(train_dir, name), "w", encoding="utf-8") as f:
      for line, (text, fact) in enumerate(rest[start:start + 50], start=1):
        f.write(json.dumps({"url": f"https://example.com/{start + line}", "text": text}) + "\n")
        truth[f"{name}:{line}"] = fact
  for i, text in enumerate(heldout):
    with open(os.path.join(heldout_dir, f"heldout{i:04d}.txt"), "w", encoding="utf-8") as f:
      f.write(text)
  with open(os.path.join(output, "truth.json"), "w", encoding="utf-8") as f:
    json.dump(truth, f, indent=1)
  return truth
