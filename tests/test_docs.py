"""The manual keeps up with the code: every `python -m experiments.NAME ...` command in README.md
and docs/*.md names a script that exists, only flags that script defines and only --config.K=V
keys of its config schema; every relative link and #anchor resolves.

Nothing is imported from experiments/ and nothing runs: a script's flags are read from its source
(the `flags.DEFINE_*("name", ...)` calls, plus those of the experiments/common.py helpers it
calls), so absl's one global flag registry never sees two scripts' flags at once.
"""

from __future__ import annotations

import ast
import functools
import glob
import importlib.util
import os
import re

from jaxlm import config as config_lib
from jaxlm.curate import settings as curate_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")


def doc_paths() -> list[str]:
  return [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


# Flags absl defines for every script (absl.app and absl.logging; --flagfile and --undefok are
# the parser's own), and -h, which experiments/common.parse_flags reads as --help.
ABSL_FLAGS = frozenset({
    "?", "alsologtostderr", "help", "helpfull", "helpshort", "helpxml", "log_dir",
    "logger_levels", "logtostderr", "only_check_args", "only_check_flags", "pdb",
    "pdb_post_mortem", "profile_file", "run_with_pdb", "run_with_profiling", "showprefixforinfo",
    "stderrthreshold", "use_cprofile_for_profiling", "v", "verbosity", "flagfile", "undefok", "h"})
CURATION_SCRIPTS = frozenset({"curate", "curate_classifier", "dedup_study"})  # curation schema
PASSTHROUGH_SCRIPTS = frozenset({"harness"})  # the command line is lm_eval's (no absl flags)
COMMAND = re.compile(r"\bpython3? -m experiments\.(\w+)")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # --config.K=V written as syntax, not as a key


# ---------------------------------------------------------------------------------------------
# Markdown: fenced blocks, prose, inline code, headings


def split_markdown(text: str) -> tuple[list[str], str]:
  """(fenced code blocks, the prose outside them: fenced lines blanked, line count kept)."""
  blocks, prose, block, fence = [], [], [], None
  for line in text.split("\n"):
    stripped = line.lstrip()
    if fence is None and (stripped.startswith("```") or stripped.startswith("~~~")):
      fence, block = stripped[:3], []
      prose.append("")
    elif fence is not None and stripped.startswith(fence):
      blocks.append("\n".join(block))
      fence = None
      prose.append("")
    elif fence is not None:
      block.append(line)
      prose.append("")
    else:
      prose.append(line)
  return blocks, "\n".join(prose)


def inline_code(prose: str) -> list[str]:
  """The `code spans` of the prose, paragraph by paragraph (a span may wrap onto the next line);
  newlines inside a span become spaces."""
  spans = []
  for paragraph in re.split(r"\n\s*\n", prose):
    spans += [" ".join(s.split("\n")) for s in re.findall(r"`([^`]+)`", paragraph)]
  return spans


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
  _, prose = split_markdown(text)
  seen: dict[str, int] = {}
  result = set()
  for match in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", prose, flags=re.M):
    base = slug(match.group(1))
    n = seen.get(base, 0)
    seen[base] = n + 1
    result.add(base if n == 0 else f"{base}-{n}")
  return result


# ---------------------------------------------------------------------------------------------
# Shell: logical lines and words


def _scan(line: str) -> tuple[str, str | None]:
  """(the line without its comment, the quote left open at its end or None)."""
  quote, i, out = None, 0, []
  while i < len(line):
    c = line[i]
    if quote == "'":
      quote = None if c == "'" else quote
    elif quote == '"':
      if c == "\\":
        out.append(line[i:i + 2])
        i += 2
        continue
      quote = None if c == '"' else quote
    elif c in "'\"":
      quote = c
    elif c == "\\":
      out.append(line[i:i + 2])
      i += 2
      continue
    elif c == "#" and (i == 0 or line[i - 1].isspace()):
      break
    out.append(c)
    i += 1
  return "".join(out), quote


def logical_lines(block: str) -> list[str]:
  """A code block's commands: comments dropped, lines ending in a backslash (or inside an open
  quote) joined with the next."""
  commands, pending, quote_open = [], "", False
  for line in block.split("\n"):
    text, quote = _scan(pending + ("\n" if quote_open else "") + line)
    quote_open = quote is not None
    if quote_open:
      pending = text
      continue
    if text.rstrip().endswith("\\") and not text.rstrip().endswith("\\\\"):
      pending = text.rstrip()[:-1] + " "
      continue
    pending = ""
    commands.append(text)
  if pending:
    commands.append(pending)
  return commands


def words(command: str) -> list[str]:
  """Shell words with quotes removed, up to the first operator (; & | < >) or comment; an
  unterminated quote runs to the end."""
  result, word, quote, started, i = [], [], None, False, 0
  while i < len(command):
    c = command[i]
    if quote:
      if c == quote:
        quote = None
      elif c == "\\" and quote == '"' and i + 1 < len(command):
        if command[i + 1] != "\n":  # (backslash-newline: a line continuation)
          word.append(command[i + 1])
        i += 1
      else:
        word.append(c)
    elif c == "\\" and command[i + 1:i + 2] == "\n":  # a line continuation
      i += 1
    elif c.isspace():
      if started:
        result.append("".join(word))
      word, started = [], False
    elif not started and c in ";&|<>":
      return result
    elif not started and c == "#":
      return result
    elif c in "'\"":
      quote, started = c, True
    elif c == "\\" and i + 1 < len(command):
      word.append(command[i + 1])
      started = True
      i += 1
    else:
      word.append(c)
      started = True
    i += 1
  if started:
    result.append("".join(word))
  return result


def commands_in(text: str) -> list[tuple[str, list[str]]]:
  """(script name, its words) of every `python -m experiments.NAME ...` in a markdown text."""
  blocks, prose = split_markdown(text)
  found = []
  sources = [line for block in blocks for line in logical_lines(block)] + inline_code(prose)
  for source in sources:
    for match in COMMAND.finditer(source):
      found.append((match.group(1), words(source[match.end():])))
  return found


# ---------------------------------------------------------------------------------------------
# What the scripts define


def _defined_names(tree: ast.AST) -> dict[str, set[str]]:
  """{function name ('' for module level and nested code): flag names its DEFINE_* calls define}."""
  result: dict[str, set[str]] = {"": set()}

  def visit(node: ast.AST, owner: str) -> None:
    for child in ast.iter_child_nodes(node):
      child_owner = owner
      if isinstance(child, ast.FunctionDef) and owner == "":
        child_owner = child.name
        result.setdefault(child_owner, set())
      if isinstance(child, ast.Call):
        func = child.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if (name.startswith("DEFINE") and child.args and isinstance(child.args[0], ast.Constant)
            and isinstance(child.args[0].value, str)):
          result[owner].add(child.args[0].value)
      visit(child, child_owner)

  visit(tree, "")
  return result


@functools.lru_cache(maxsize=None)
def _common_helpers() -> dict[str, set[str]]:
  """{experiments.common function: the flags it defines, itself or through the other helpers
  it calls (define_finetune_flags -> define_restore_step_flag ...)}."""
  with open(os.path.join(EXPERIMENTS, "common.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  defined = _defined_names(tree)
  calls = {node.name: {c.func.id for c in ast.walk(node)
                       if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
           for node in tree.body if isinstance(node, ast.FunctionDef)}
  for _ in calls:  # (to a fixed point: helpers call helpers)
    for name, called in calls.items():
      for other in called & defined.keys():
        defined[name] = defined.get(name, set()) | defined[other]
  return {name: flags for name, flags in defined.items() if name and flags}


@functools.lru_cache(maxsize=None)
def script_flags(name: str) -> frozenset[str]:
  """The flags experiments/NAME.py defines: its own DEFINE_* calls (at module level or in any
  function), those of the experiments.common helpers it calls, and those of the scripts it
  imports (`from experiments import import_hf`: an alias script)."""
  with open(os.path.join(EXPERIMENTS, f"{name}.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  flags = set().union(*_defined_names(tree).values())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == "experiments":
      flags |= {flag for alias in node.names if alias.name != "common"
                for flag in script_flags(alias.name)}
  helpers = _common_helpers()
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name) and node.func.value.id == "common"
        and node.func.attr in helpers):
      flags |= helpers[node.func.attr]
  return frozenset(flags | ABSL_FLAGS)


@functools.lru_cache(maxsize=None)
def lm_eval_flags() -> frozenset[str] | None:
  """The flags of lm_eval's `run` command line, read from its source; None without lm_eval."""
  spec = importlib.util.find_spec("lm_eval")  # (finds the package; imports nothing)
  if spec is None or not spec.origin:
    return None
  path = os.path.join(os.path.dirname(spec.origin), "_cli", "run.py")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  return frozenset(node.value[2:] for node in ast.walk(tree)
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)
                   and re.fullmatch(r"--[a-z][\w-]*", node.value)) or None


@functools.lru_cache(maxsize=None)
def config_schema(script: str) -> dict:
  if script in CURATION_SCRIPTS:
    return curate_settings.to_dict(curate_settings.CurationConfig())
  return config_lib.to_dict(config_lib.Config())


def key_in(schema: dict, path: str) -> bool:
  node = schema
  for part in path.split("."):
    if not isinstance(node, dict) or part not in node:
      return False
    node = node[part]
  return not isinstance(node, dict)  # a whole section is not an override


# ---------------------------------------------------------------------------------------------
# The checks


def command_errors(where: str, script: str, argv: list[str]) -> list[str]:
  shown = f"{where}: python -m experiments.{script} {' '.join(argv)}"[:160]
  if PLACEHOLDER.match(script):  # `python -m experiments.NAME`: the syntax, not a script
    return []
  if not os.path.exists(os.path.join(EXPERIMENTS, f"{script}.py")):
    return [f"{shown}\n    experiments/{script}.py does not exist"]
  if script in PASSTHROUGH_SCRIPTS:
    defined = lm_eval_flags()
    if defined is None:
      return []  # lm_eval (a test extra) is not installed: its flags are not known here
  else:
    defined = script_flags(script)
  errors = []
  for arg in argv:
    arg = arg.strip("[]")
    if not arg.startswith("-") or re.match(r"^-\d", arg) or arg in ("-", "--"):
      continue
    name, _, value = arg.lstrip("-").partition("=")
    if name.startswith("config.") and script not in PASSTHROUGH_SCRIPTS:
      path = name[len("config."):]
      if "config" not in defined:
        errors.append(f"{shown}\n    --{name}: the script has no --config flag")
      elif not any(PLACEHOLDER.match(part) for part in path.split(".")):
        if not key_in(config_schema(script), path):
          schema = "curation" if script in CURATION_SCRIPTS else "training"
          errors.append(f"{shown}\n    --{name}: no such key in the {schema} config schema")
      continue
    if name not in defined and not (name.startswith("no") and name[2:] in defined):
      errors.append(f"{shown}\n    --{name}: experiments/{script}.py defines no such flag")
      continue
    if value.startswith("configs/") and value.endswith(".py"):
      if not os.path.exists(os.path.join(REPO, value)):
        errors.append(f"{shown}\n    --{name}={value}: no such file")
  return errors


def check_commands(paths: list[str]) -> tuple[int, list[str]]:
  """(commands found, errors) over the markdown files."""
  count, errors = 0, []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    where = os.path.relpath(path, REPO)
    for script, argv in commands_in(text):
      count += 1
      errors += command_errors(where, script, argv)
  return count, errors


def check_config_mentions(paths: list[str]) -> list[str]:
  """`--config.K=V` written in the prose outside a command (`--config.train.spike_action=skip`):
  K must be a key of the training or the curation config schema."""
  errors = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      _, prose = split_markdown(f.read())
    for span in inline_code(prose):
      if COMMAND.search(span):
        continue  # (checked with its script)
      for word in words(span):
        name = word.strip("[]").partition("=")[0]
        if not name.startswith("--config."):
          continue
        key = name[len("--config."):]
        if any(PLACEHOLDER.match(part) for part in key.split(".")):
          continue
        if not (key_in(config_schema("pretrain"), key) or key_in(config_schema("curate"), key)):
          errors.append(f"{os.path.relpath(path, REPO)}: `{span}`: {name}: no such key in the "
                        f"training or curation config schema")
  return errors


def check_links(paths: list[str]) -> list[str]:
  errors = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    _, prose = split_markdown(text)
    prose = "\n\n".join(re.sub(r"`[^`]*`", "", paragraph)  # (a link in a code span is none)
                        for paragraph in re.split(r"\n\s*\n", prose))
    where = os.path.relpath(path, REPO)
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose):
      if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
        continue
      file_part, _, anchor = target.partition("#")
      linked = (os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part
                else path)
      if not os.path.exists(linked):
        errors.append(f"{where}: link ({target}): {os.path.relpath(linked, REPO)} does not exist")
        continue
      if anchor and linked.endswith(".md"):
        with open(linked, encoding="utf-8") as f:
          if anchor not in anchors(f.read()):
            errors.append(f"{where}: link ({target}): no heading with anchor #{anchor} in "
                          f"{os.path.relpath(linked, REPO)}")
  return errors


def test_documented_commands_use_existing_scripts_flags_and_config_keys():
  count, errors = check_commands(doc_paths())
  assert count >= 50, f"only {count} commands found: is the extraction broken?"
  assert not errors, (f"{len(errors)} documented commands do not match the code:\n"
                      + "\n".join(errors))


def test_config_keys_named_in_the_prose_exist():
  errors = check_config_mentions(doc_paths())
  assert not errors, "\n".join(errors)


def test_links_and_anchors_resolve():
  errors = check_links(doc_paths())
  assert not errors, "\n".join(errors)


def test_the_checks_catch_stale_commands_and_links(tmp_path):
  bad = tmp_path / "bad.md"
  bad.write_text(
      "```bash\n"
      "python -m experiments.pretrain --config.model.num_layer=2 \\\n"      # a key misspelt
      "    --workdir=runs/x --progres   # a comment --not_a_flag\n"          # a flag misspelt
      "python -m experiments.curate --input='/d/*' --output=/o --config.dedup.threshhold=0.7\n"
      "python -m experiments.pretrain --config=configs/nope.py --config.K=V ...\n"
      "```\n\n"
      "Inline: `python -m experiments.no_such_script --x=1` and `python -m experiments.generate\n"
      "--workdir=runs/x --nokv_cache --top_q=0.9`; [a link](missing.md), "
      "`--config.train.spikes=1`, "
      f"[an anchor]({os.path.join(REPO, 'docs', 'training.md')}#no-such-heading).\n",
      encoding="utf-8")
  count, errors = check_commands([str(bad)])
  assert count == 5
  text = "\n".join(errors)
  for expected in ("--config.model.num_layer: no such key", "--progres: experiments/pretrain.py",
                   "--config.dedup.threshhold: no such key in the curation",
                   "--config=configs/nope.py: no such file", "no_such_script.py does not exist",
                   "--top_q: experiments/generate.py"):
    assert expected in text, (expected, text)
  assert len(errors) == 6, text  # not the comment, not --config.K=V, not --nokv_cache
  assert "--config.train.spikes: no such key" in "\n".join(check_config_mentions([str(bad)]))
  link_errors = "\n".join(check_links([str(bad)]))
  assert "missing.md does not exist" in link_errors and "#no-such-heading" in link_errors


def test_the_config_reference_is_generated_from_the_schema():
  """docs/config.md is `python -m jaxlm.config_doc`'s output for the schema as it is: a key
  added, removed, renamed or re-defaulted without regenerating it fails here."""
  from jaxlm import config as config_lib
  from jaxlm import config_doc
  with open(os.path.join(REPO, "docs", "config.md"), encoding="utf-8") as f:
    assert f.read() == config_doc.render(), (
        "docs/config.md is out of date: python -m jaxlm.config_doc > docs/config.md")
  flat = []

  def walk(values, prefix=""):
    for key, value in values.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      else:
        flat.append(f"{prefix}{key}")
  walk(config_lib.to_dict(config_lib.Config()))
  page = config_doc.render()
  assert all(f"| `{key}` |" in page for key in flat)
  assert "| `model.lora_rank` | int | `0` | adapters' rank (0: no LoRA) |" in page
