r"""A messy web crawl as WARC files, from text every Python ships: what the web-archive tests,
the classifier's measurement and the crawl example (docs/curation.md) curate.

Pages are HTML with the boilerplate extraction must remove (navigation, a sidebar, a comment
section, a footer, scripts and styles) around an article of English prose (`messy.py`'s
documents), and the crawl has what real ones have: exact copies at other URLs, near copies
(lines wrapped anew, another header and footer, 3% of words edited), junk pages (spam, word
salad, link lists, product listings, stubs), other languages, personal data, pages on blocked
domains, non-HTML responses, redirects and errors, and a page with an unknown charset. Clean
articles never in the crawl go to `heldout/` (to measure a model on) and `reference/` (the
classifier's positives).

`make` writes OUTPUT/crawl/crawl-NNNNN.warc.gz (with request and warcinfo records, as Common
Crawl's), OUTPUT/heldout/*.txt, OUTPUT/reference/*.txt, OUTPUT/junk/*.txt (junk texts
outside the crawl: with heldout/, what the classifier's AUC is measured on),
OUTPUT/blocklist.txt and OUTPUT/truth.json ({url: {"kind", "family"?}}).
"""

from __future__ import annotations

import html
import io
import json
import os
import random
import textwrap
from typing import Any

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from jaxlm.curate import messy

NAV = ["Home", "Reference", "Tutorials", "Downloads", "Community", "About us", "Contact"]
SIDEBAR = ["Popular this week", "Ten tips for faster loops", "Why we moved to the cloud",
           "Interview with a core developer", "Our favourite editors, ranked"]
COMMENTS = ["Great post, thanks for sharing this with everyone!",
            "I tried this on my laptop and it did not work at all, any ideas why?",
            "Bookmarked for later reading, very helpful stuff here.",
            "First! Can't wait for the next part of this series."]
FOOTER = ["Copyright 2021 Example Media Ltd. All rights reserved.",
          "Privacy Policy | Terms of Use | Cookie settings"]
# Words every boilerplate block above holds and no article does: what a test looks for.
BOILERPLATE_MARKERS = ("Popular this week", "Great post", "Bookmarked for later",
                       "All rights reserved", "Cookie settings", "Downloads")
SPAM = ("buy cheap best price online discount free shipping casino bonus win big click here "
        "limited offer deal today only order now save money fast delivery top rated").split()
FOREIGN_LANGUAGES = ("fr", "de", "es", "ru")
PII_LINE = ("Questions about this page? Write to {name}@example.org, call +1 555-{a}-{b}, or "
            "report abuse from 192.168.{c}.{d}.")
JUNK_KINDS = ("spam", "salad", "links", "listing", "stub")
BLOCKED_DOMAINS = ("casino-spam.example", "ads.example.net")
BLOCKED_PATTERNS = ("*/tag/*",)


def page_html(title: str, body: str, rng: random.Random, reflow: bool = False,
              charset: str = "utf-8") -> str:
  """An HTML page: `body`'s paragraphs (split at blank lines) as the article, inside the
  site's navigation, sidebar, comments and footer. reflow: each paragraph's lines wrapped at
  a random width with <br> (as a copied e-mail or plain-text post shows)."""
  def paragraph(text: str) -> str:
    if not reflow:
      return f"<p>{html.escape(text)}</p>"
    lines = textwrap.wrap(" ".join(text.split()), rng.randint(40, 90))
    return "<p>" + "<br>\n".join(html.escape(line) for line in lines) + "</p>"
  article = "\n".join(paragraph(p) for p in body.split("\n\n") if p.strip())
  nav = "".join(f'<li><a href="/{item.lower().replace(" ", "-")}">{item}</a></li>'
                for item in NAV)
  side = "".join(f'<li><a href="/post/{i}">{item}</a></li>' for i, item in enumerate(SIDEBAR))
  comments = "".join(f'<div class="comment"><span class="author">user{rng.randint(1, 999)}'
                     f'</span><p>{c}</p></div>' for c in rng.sample(COMMENTS, 3))
  footer = "".join(f"<p>{line}</p>" for line in FOOTER)
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="{charset}"><title>{html.escape(title)}</title>
<style>body {{ font-family: sans-serif; }} .sidebar {{ float: right; }}</style>
<script>window.dataLayer = window.dataLayer || []; function track() {{ return 1; }}</script>
</head><body>
<header class="site-header"><div class="logo">Example Media</div>
<nav class="main-nav"><ul>{nav}</ul></nav></header>
<div class="container">
<aside class="sidebar"><h3>{SIDEBAR[0]}</h3><ul>{side}</ul></aside>
<main><article class="post"><h1>{html.escape(title)}</h1>
{article}
</article>
<section class="comments" id="comments"><h3>3 Comments</h3>{comments}</section>
</main></div>
<footer class="site-footer">{footer}</footer>
</body></html>
"""


def junk_text(kind: str, rng: random.Random, vocabulary: list[str]) -> str:
  """Text a quality classifier should score low: spam, word salad (prose words in random
  order), a link list, a product listing, a stub."""
  if kind == "spam":
    return "\n\n".join(" ".join(rng.choices(SPAM, k=rng.randint(15, 40))) + "!"
                       for _ in range(rng.randint(4, 10)))
  if kind == "salad":
    return "\n\n".join(" ".join(rng.choices(vocabulary, k=rng.randint(40, 80))) + "."
                       for _ in range(rng.randint(3, 6)))
  if kind == "links":
    return "\n".join(" | ".join(rng.choices(vocabulary, k=6)).title() for _ in range(30))
  if kind == "listing":
    return "\n".join(f"Item {rng.randint(1000, 9999)} - {' '.join(rng.choices(vocabulary, k=3))}"
                     f" - ${rng.randint(1, 99)}.{rng.randint(10, 99)} - in stock"
                     for _ in range(40))
  return "Page not found. The page you are looking for may have moved."


def _record(writer: WARCWriter, url: str, date: str, status: str, content_type: str,
            body: bytes) -> None:
  """A request record, then the response (as a crawler writes them)."""
  request = StatusAndHeaders(f"GET /{url.split('/', 3)[-1]} HTTP/1.1",
                             [("Host", url.split("/")[2])], is_http_request=True)
  writer.write_record(writer.create_warc_record(url, "request", http_headers=request,
                                                warc_headers_dict={"WARC-Date": date}))
  headers = StatusAndHeaders(status, [("Content-Type", content_type)], protocol="HTTP/1.1")
  writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body),
                                                http_headers=headers,
                                                warc_headers_dict={"WARC-Date": date}))


def write_warc(path: str, pages: list[dict[str, Any]]) -> None:
  """A .warc.gz of `pages` ({url, body (bytes), and optionally status, content_type, date})."""
  with open(path, "wb") as f:
    writer = WARCWriter(f, gzip=path.endswith(".gz"))
    writer.write_record(writer.create_warcinfo_record(os.path.basename(path),
                                                      {"software": "jaxlm messy_web"}))
    for page in pages:
      _record(writer, page["url"], page.get("date", "2021-06-01T12:00:00Z"),
              page.get("status", "200 OK"),
              page.get("content_type", "text/html; charset=utf-8"), page["body"])


def write_wet(path: str, documents: list[tuple[str, str]]) -> None:
  """A .warc.wet.gz of (url, text) conversion records, as Common Crawl's WET files."""
  with open(path, "wb") as f:
    writer = WARCWriter(f, gzip=True)
    for url, text in documents:
      writer.write_record(writer.create_warc_record(
          url, "conversion", payload=io.BytesIO(text.encode("utf-8")),
          warc_content_type="text/plain", warc_headers_dict={"WARC-Date": "2021-06-01T12:00:00Z"}))


def crawl_pages(originals: list[str], rng: random.Random
                ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
  """[(page, truth)] of the whole crawl, shuffled (see the module docstring)."""
  vocabulary = sorted({w.strip(".,;:()").lower() for t in originals for w in t.split()
                       if w.isalpha()})
  pages: list[tuple[dict[str, Any], dict[str, Any]]] = []
  count = iter(range(10**6))

  def add(body: str | bytes, truth: dict[str, Any], site: str = "", **page: Any) -> None:
    n = next(count)
    site = site or f"site{n % 7}.example.com"
    date = f"2021-{1 + n % 12:02d}-{1 + n % 28:02d}T{n % 24:02d}:00:00Z"
    pages.append(({"url": f"https://{site}/post/{n}", "date": date,
                   "body": body.encode("utf-8") if isinstance(body, str) else body, **page},
                  truth))

  for family, text in enumerate(originals):
    if rng.random() < 0.1:  # personal data in a line of its own
      text += "\n\n" + PII_LINE.format(name=f"author{family}", a=rng.randint(100, 999),
                                       b=rng.randint(1000, 9999), c=rng.randint(0, 255),
                                       d=rng.randint(1, 254))
    add(page_html(f"Article {family}", text, rng), {"kind": "original", "family": family})
  for family in rng.sample(range(len(originals)), len(originals) // 10):
    add(page_html(f"Article {family}", originals[family], rng), {"kind": "exact",
                                                                  "family": family})
  for kind in ("reflow", "boilerplate", "edit"):
    for family in rng.sample(range(len(originals)), len(originals) // 10):
      text = originals[family] if kind == "reflow" else messy.near_copy(
          originals[family], kind, rng, edit_fraction=0.03)
      add(page_html(f"Copy {family}", text, rng, reflow=kind == "reflow"),
          {"kind": kind, "family": family})
  for kind in JUNK_KINDS:
    for _ in range(max(1, len(originals) // 15)):
      add(page_html(f"{kind} page", junk_text(kind, rng, vocabulary), rng),
          {"kind": f"junk_{kind}"})
  for language in FOREIGN_LANGUAGES:
    for _ in range(max(1, len(originals) // 40)):
      add(page_html("Nouvelles", " ".join(rng.choices(messy.FOREIGN[language], k=20)), rng),
          {"kind": "language", "language": language})
  for domain in BLOCKED_DOMAINS:
    add(page_html("Win big", originals[rng.randrange(len(originals))], rng),
        {"kind": "blocked_domain"}, site=f"www.{domain}")
  add(page_html("Tag page", originals[rng.randrange(len(originals))], rng),
      {"kind": "blocked_pattern"}, site="blog.example.org/tag")
  add(b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(200)),
      {"kind": "not_html"}, content_type="image/png")
  add(b"body { color: red; }", {"kind": "not_html"}, content_type="text/css")
  add(page_html("Not found", "This page does not exist.", rng), {"kind": "status"},
      status="404 Not Found")
  add(b"", {"kind": "status"}, status="301 Moved Permanently")
  add(page_html("Odd", originals[0], rng).encode("utf-8"), {"kind": "bad_charset"},
      content_type="text/html; charset=x-no-such-charset")
  rng.shuffle(pages)
  return pages


def make(output: str, seed: int = 0, articles: int = 200, heldout: int = 40,
         reference: int = 200, pages_per_file: int = 100) -> dict[str, Any]:
  """Writes the crawl (see the module docstring); returns truth.json's content. articles:
  distinct prose articles in the crawl; heldout, reference: clean articles outside it (and
  heldout junk texts)."""
  rng = random.Random(seed)
  clean = list(messy.clean_documents())
  rng.shuffle(clean)
  if articles + heldout + reference > len(clean):
    raise ValueError(f"only {len(clean)} clean documents; ask for fewer articles.")
  originals = clean[:articles]
  pages = crawl_pages(originals, rng)
  vocabulary = sorted({w.strip(".,;:()").lower() for t in originals for w in t.split()
                       if w.isalpha()})
  junk = [junk_text(kind, rng, vocabulary) for kind in JUNK_KINDS for _ in range(heldout // 5)]
  for folder in ("crawl", "heldout", "reference", "junk"):
    os.makedirs(os.path.join(output, folder))
  for start in range(0, len(pages), pages_per_file):
    write_warc(os.path.join(output, "crawl", f"crawl-{start // pages_per_file:05d}.warc.gz"),
               [page for page, _ in pages[start:start + pages_per_file]])
  for folder, texts in (("heldout", clean[articles:articles + heldout]), ("junk", junk),
                        ("reference", clean[articles + heldout:
                                            articles + heldout + reference])):
    for i, text in enumerate(texts):
      with open(os.path.join(output, folder, f"{folder}{i:04d}.txt"), "w",
                encoding="utf-8") as f:
        f.write(text)
  with open(os.path.join(output, "blocklist.txt"), "w", encoding="utf-8") as f:
    f.write("# blocked domains (their subdomains too) and URL globs\n"
            + "\n".join(BLOCKED_DOMAINS + BLOCKED_PATTERNS) + "\n")
  truth = {page["url"]: fact for page, fact in pages}
  with open(os.path.join(output, "truth.json"), "w", encoding="utf-8") as f:
    json.dump(truth, f, indent=1)
  return truth
