"""The docs against the code, so that neither drifts: README.md, docs/*.md and the entry points'
docstrings (launch.py, benchmarks/*.py, experiments/*.py).

- every `make X` names a Makefile target;
- every `python SCRIPT.py ...` command (in code blocks and inline code, `\\`-continued lines
  joined) names a script that exists and only flags that script defines (absl flags, read from its
  source), with values its integer and enum flags accept; its `--config` experiment file exists
  and, loaded as launch.py loads it (ml_collections' config_flags, locked), accepts the `:ARG`;
  every `--config.a.b=v` names a key of that config and its value parses;
- inline code that is only flags (`--plan`, `--config.mesh.layout=tp`) names flags some entry
  point defines and keys of the base config;
- `python -c` snippets import modules and names that exist; `pip install -r` files exist;
- repository paths named in code and link targets exist.

Placeholders (`DIR`, `N`, `k`, `…`, `NAME.py[:ARG]`) are skipped. Nothing is compiled: a few
experiment files' get_config() run, the rest is reading text (about a second).
"""

import ast
import functools
import importlib
import importlib.util
import re
import shlex
import types

import pytest
from absl import flags
from helpers import REPO
from ml_collections import config_flags

from cgpt_jax.config import base_config

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ENTRY_POINTS = [
  REPO / "launch.py",
  *sorted((REPO / "benchmarks").glob("*.py")),
  *sorted((REPO / "experiments").glob("*.py")),
]
DOC_IDS = [str(p.relative_to(REPO)) for p in DOCS] + ["docstrings"]

# config_flags loads experiment files with importlib's deprecated load_module().
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

# A value or name that stands for one: DIR, N, FOLDER, HOST0:PORT's parts, k, …, NAME.py[:ARG].
PLACEHOLDER = re.compile(r"…|\.\.\.|\b[A-Z][A-Z0-9_]*\b|^[a-zA-Z]$")
# Where a repository path may start.
PATH = re.compile(
  r"^(?:(?:cgpt_jax|experiments|benchmarks|tests|docs)/[\w./-]*"
  r"|launch\.py|Makefile|pyproject\.toml|README\.md|requirements[\w-]*\.txt)$"
)
PYTHON = re.compile(r"(?:\S*/)?python(?:3(?:\.\d+)?)?")


def is_placeholder(text: str) -> bool:
  return bool(PLACEHOLDER.search(text))


# --- what the docs hold ---------------------------------------------------------------------------


def docstring_commands() -> str:
  """The entry points' docstrings, as one code block."""
  docs = [ast.get_docstring(ast.parse(p.read_text())) or "" for p in ENTRY_POINTS]
  return "```\n" + "\n".join(docs).replace("```", "") + "\n```\n"


def text_of(doc_id: str) -> str:
  return docstring_commands() if doc_id == "docstrings" else (REPO / doc_id).read_text()


def code_of(text: str) -> tuple[list[str], list[str]]:
  """(lines of the fenced code blocks, `\\`-continuations joined; inline code spans, whitespace
  collapsed)."""
  blocks = re.findall(r"^\s*```[^\n]*\n(.*?)^\s*```", text, flags=re.M | re.S)
  lines = [l for b in blocks for l in re.sub(r"\\\n", " ", b).splitlines()]
  prose = re.sub(r"^\s*```[^\n]*\n.*?^\s*```", "", text, flags=re.M | re.S)
  spans = [" ".join(s.split()) for s in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose)]
  return lines, spans


def tokens(line: str) -> list[str]:
  try:
    return shlex.split(line, comments=True)
  except ValueError:  # an unbalanced quote in prose
    return line.split()


def unbracket(token: str) -> str:
  """`[--devices` -> `--devices`, `N]` -> `N`: a synopsis's optional parts."""
  token = token.removeprefix("[")
  return token.removesuffix("]") if token.count("]") > token.count("[") else token


@functools.cache
def makefile_targets() -> frozenset[str]:
  text = (REPO / "Makefile").read_text()
  rules = re.findall(r"^([\w.$()/ -]+?)\s*:(?!=)", text, flags=re.M)
  return frozenset(t for rule in rules for t in rule.split())


# --- what the entry points define -----------------------------------------------------------------


@functools.cache
def defined_flags(script: str) -> dict[str, tuple[str, tuple | None]]:
  """Flag name -> (kind, enum values or None) for every absl flag SCRIPT (a path under REPO) and its
  sibling modules define with flags.DEFINE_* or config_flags.DEFINE_config_file, read from the
  source, plus absl's own."""
  path = REPO / script
  sources = [path]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      sources += [path.parent / f"{a.name}.py" for a in node.names]
  found = {name: ("absl", None) for name in absl_flags()}
  for source in (s for s in sources if s.is_file()):
    for node in ast.walk(ast.parse(source.read_text())):
      func = node.func if isinstance(node, ast.Call) else None
      name = getattr(func, "attr", None) or getattr(func, "id", None)
      if not (name and name.startswith("DEFINE_") and node.args):
        continue
      flag = node.args[0]
      if not (isinstance(flag, ast.Constant) and isinstance(flag.value, str)):
        continue
      kind = name.removeprefix("DEFINE_").replace("boolean", "bool")
      values = None
      if kind == "enum" and len(node.args) > 2:
        try:
          values = tuple(ast.literal_eval(node.args[2]))
        except ValueError:  # computed: not checked
          values = None
      found[flag.value] = (kind, values)
  return found


@functools.cache
def absl_flags() -> frozenset[str]:
  """absl's own flags (--verbosity, --helpfull, ...), which every absl program takes."""
  importlib.import_module("absl.app")
  importlib.import_module("absl.logging")
  by_module = flags.FLAGS.flags_by_module_dict()
  names = {f.name for m, fs in by_module.items() if m.startswith("absl") for f in fs}
  return frozenset(names | {"help", "helpshort", "helpfull", "helpxml", "flagfile", "undefok"})


def all_entry_point_flags() -> dict:
  merged = {}
  for p in ENTRY_POINTS:
    merged.update(defined_flags(str(p.relative_to(REPO))))
  return merged


@functools.cache
def load_config(config: str | None, override: tuple[str, str] | None = None):
  """The config of `--config=CONFIG` (path.py[:ARG] relative to the repository) as launch.py loads
  it, with --config.KEY=VALUE applied if given; the base config when CONFIG is None."""
  if config is None and override is None:
    return base_config()
  argv = ["docs", f"--config={REPO / (config or 'experiments/shakespeare_char.py')}"]
  if override:
    argv.append(f"--config.{override[0]}={override[1]}")
  fv = flags.FlagValues()
  # launch.py's flag; the override flags are defined from the command line (sys.argv there).
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
  )
  fv(argv)
  return fv.config


def has_key(cfg, key: str) -> bool:
  node = cfg
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


# --- the checks -----------------------------------------------------------------------------------


def expand_keys(overrides: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
  """--config.mesh.data|pipe|fsdp|tensor=N: one key each."""
  expanded = []
  for key, value in overrides:
    first, *others = key.split("|")
    prefix = first.rpartition(".")[0]
    expanded += [(first, value)] + [(f"{prefix}.{other}", value) for other in others]
  return expanded


def check_overrides(config: str | None, overrides: list[tuple[str, str | None]]) -> list[str]:
  """Problems with --config.KEY=VALUE against CONFIG (None: the base config)."""
  problems = []
  try:
    cfg = load_config(config)
  except Exception as e:  # noqa: BLE001  (reported: a config the docs name that does not load)
    return [f"--config={config} does not load: {type(e).__name__}: {e}"]
  for key, value in expand_keys(overrides):
    if is_placeholder(key):
      continue
    if not has_key(cfg, key):
      problems.append(f"--config.{key}: no such key in {config or 'base_config()'}")
      continue
    if value is None or is_placeholder(value):
      continue
    for alternative in value.split("|"):
      try:
        load_config(config, (key, alternative))
      except Exception as e:  # noqa: BLE001
        problems.append(f"--config.{key}={alternative} does not parse: {type(e).__name__}: {e}")
  return problems


def check_value(name: str, kind: str, values: tuple | None, value: str | None) -> list[str]:
  """Problems with VALUE (alternatives a|b|c each) for an integer or enum flag --NAME."""
  problems = []
  for alternative in (value or "").split("|"):
    if not alternative or is_placeholder(alternative):
      continue
    if kind == "integer" and not re.fullmatch(r"-?\d+", alternative):
      problems.append(f"--{name}={alternative} is not an integer")
    if kind == "enum" and values is not None and alternative not in values:
      problems.append(f"--{name}={alternative} is not one of {values}")
  return problems


def check_flags(script: str, args: list[str]) -> list[str]:
  """Problems with a command line of SCRIPT (relative to the repository): unknown flags, values its
  integer or enum flags refuse, a --config file that is missing or refuses its ARG, unknown keys."""
  known = defined_flags(script)
  configs = {name for name, (kind, _) in known.items() if kind == "config_file"}
  problems, config, overrides = [], None, []
  args = [unbracket(a) for a in args]
  i = 0
  while i < len(args):
    arg = args[i]
    i += 1
    if not arg.startswith("--") or arg == "--":
      continue
    name, eq, value = arg[2:].partition("=")
    head, dot, key = name.partition(".")
    if dot and head in configs:
      overrides.append((key, value if eq else None))
      continue
    if is_placeholder(name):
      continue
    kind, values = known.get(name, known.get(name.removeprefix("no"), (None, None)))
    if kind is None or (name not in known and kind != "bool"):
      problems.append(f"{script}: no flag --{name}")
      continue
    if not eq and kind != "bool" and i < len(args) and not args[i].startswith("--"):
      value, i = args[i], i + 1
    if kind == "config_file":
      config = value
    else:
      problems += [f"{script}: {p}" for p in check_value(name, kind, values, value)]
  if configs and config is not None and is_placeholder(config):
    config = None  # experiments/NAME.py: the keys are checked against the base config
  elif config is not None:
    path = config.rpartition(":")[0] if ":" in config else config
    if not (REPO / path).is_file():
      return [*problems, f"{script}: --config {path} does not exist"]
  if configs:
    problems += check_overrides(config, overrides)
  return problems


def check_snippet(code: str) -> list[str]:
  """Problems with a `python -c` snippet: imports of modules or names that do not exist, and
  attributes it reads from an imported module that the module does not have."""
  problems, modules = [], {}
  try:
    tree = ast.parse(code)
  except SyntaxError as e:
    return [f"python -c {code!r}: {e}"]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if importlib.util.find_spec(a.name) is None:
          problems.append(f"python -c: no module {a.name}")
        elif a.asname:
          modules[a.asname] = a.name
    elif isinstance(node, ast.ImportFrom) and node.module:
      if importlib.util.find_spec(node.module) is None:
        problems.append(f"python -c: no module {node.module}")
        continue
      parent = importlib.import_module(node.module)
      for a in node.names:
        full = f"{node.module}.{a.name}"
        if isinstance(getattr(parent, a.name, None), types.ModuleType) or (
          not hasattr(parent, a.name) and importlib.util.find_spec(full) is not None
        ):
          modules[a.asname or a.name] = full
        elif not hasattr(parent, a.name):
          problems.append(f"python -c: `from {node.module} import {a.name}`: no such name")
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in modules
    ):
      if not hasattr(importlib.import_module(modules[node.value.id]), node.attr):
        problems.append(f"python -c: {modules[node.value.id]} has no {node.attr}")
  return problems


def commands(doc_id: str):
  """(the line, its tokens) of every code line and inline span of the doc."""
  lines, spans = code_of(text_of(doc_id))
  for line in lines + spans:
    yield line, tokens(line)


@pytest.mark.parametrize("doc_id", DOC_IDS)
def test_make_targets_exist(doc_id):
  problems = []
  for line, toks in commands(doc_id):
    if toks[:1] == ["make"]:
      for target in toks[1:]:
        if "=" in target or target.startswith("-") or is_placeholder(target):
          continue
        if target not in makefile_targets():
          problems.append(f"`{line}`: no Makefile target {target!r}")
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc_id", DOC_IDS)
def test_commands_name_real_scripts_flags_and_config_keys(doc_id):
  problems = []
  for line, toks in commands(doc_id):
    found = []
    for i, tok in enumerate(toks):
      if PYTHON.fullmatch(tok) and i + 1 < len(toks):
        if toks[i + 1] == "-c" and i + 2 < len(toks):
          found.append(("-c", toks[i + 2]))
        elif toks[i + 1].endswith(".py"):
          found.append((toks[i + 1], toks[i + 2 :]))
        break
    if not found and toks and re.fullmatch(r"(launch|(benchmarks|experiments)/\w+)\.py", toks[0]):
      found.append((toks[0], toks[1:]))
    if toks[:3] == ["pip", "install", "-r"] and len(toks) > 3:
      if not (REPO / toks[3]).is_file():
        problems.append(f"`{line}`: no file {toks[3]}")
    for script, args in found:
      if script == "-c":
        problems += [f"`{line}`: {p}" for p in check_snippet(args)]
      elif is_placeholder(script):
        continue
      elif not (REPO / script).is_file():
        problems.append(f"`{line}`: no script {script}")
      else:
        problems += [f"`{line}`: {p}" for p in check_flags(script, args)]
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc_id", DOC_IDS[:-1])
def test_inline_flags_are_defined(doc_id):
  """Inline code that is only flags: each is a flag of some entry point, or a base config key."""
  known = all_entry_point_flags()
  problems = []
  for span in code_of(text_of(doc_id))[1]:
    toks = [unbracket(t) for t in tokens(span)]
    if not toks or not toks[0].startswith("--"):
      continue
    overrides = []
    for tok in (t for t in toks if t.startswith("--")):
      name, eq, value = tok[2:].partition("=")
      if name.startswith("config."):
        overrides.append((name.removeprefix("config."), value if eq else None))
      elif is_placeholder(name):
        continue
      elif name in known:
        problems += [f"`{span}`: {p}" for p in check_value(name, *known[name], value)]
      elif name.removeprefix("no") not in known:
        problems.append(f"`{span}`: no entry point defines --{name}")
    problems += [f"`{span}`: {p}" for p in check_overrides(None, overrides)]
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc_id", DOC_IDS[:-1])
def test_paths_exist(doc_id):
  """Repository paths in code (`cgpt_jax/parallel/layouts.py`, experiments/x.py:ARG) and link
  targets (relative to the doc) exist."""
  doc = REPO / doc_id
  text = doc.read_text()
  lines, spans = code_of(text)
  problems = []
  for token in (t for line in lines + spans for t in line.split()):
    path = token.strip("`'\",;()").split(":")[0].split("#")[0]
    if PATH.match(path) and not is_placeholder(path) and not (REPO / path).exists():
      problems.append(f"{path} does not exist")
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    path, _, anchor = target.partition("#")
    if "://" in path:
      continue
    linked = doc.parent / path if path else doc
    if not linked.exists():
      problems.append(f"link target {target} does not exist")
    elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
      problems.append(f"link target {target}: no heading {anchor!r} in {linked.name}")
  assert not problems, "\n".join(problems)


@functools.cache
def anchors(doc) -> frozenset[str]:
  """GitHub's anchors for the headings of DOC: lower case, punctuation dropped, spaces to hyphens,
  a repeated one suffixed -1, -2, ..."""
  text = re.sub(r"^\s*```.*?^\s*```", "", doc.read_text(), flags=re.M | re.S)
  seen, found = {}, set()
  for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
    found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
    seen[slug] = seen.get(slug, 0) + 1
  return frozenset(found)
