"""The documentation names only real things: README.md and docs/*.md are checked against the code.

- every config field named in backticks or as `--config.GROUP.FIELD=` exists in configs/default.py's config;
- every `--config=FILE.py:ARGS` value loads (its config arguments are accepted);
- every repository path (configs/..., semi_jax/..., tests/..., docs/...) and every relative link exists;
- every flag of a `python -m semi_jax.<module>` command is defined by that module (read from its argparse or absl
  definitions), and every flag named on its own is a flag of some command;
- every `semi_jax.main` and `semi_jax.sweep` command parses its flags and its config as the command would, and a
  sweep plans every run (nothing trains; the workdir is a temporary path).
A self-check feeds each check a snippet with a mistake and expects it to be found.
"""
from __future__ import annotations

import ast
import functools
import glob
import os
import re

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

# The two set-up commands of the README; .ci/run runs the second one.
SETUP_COMMANDS = (
    "python3.12 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python -m semi_jax.main "
    "--config=configs/digits_lt.py --workdir=workdirs/digits_lt",
    "python3.12 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python -m pytest -q",
)
# Flags that the documentation names but no semi_jax command defines: the reference code's (pywin/SeMi) and
# gcloud's. XLA's own flags (--xla_*) are allowed too.
EXTERNAL_FLAGS = {"arch", "ratio", "num_max", "tau", "zone", "worker", "command"}
# Words that stand for a value in a path or a config field: configs/NAME.py, --config.GROUP.FIELD=VALUE.
PLACEHOLDERS = {"NAME", "FILE", "DIR", "PATH", "BUCKET", "GROUP", "FIELD", "VALUE", "X"}
FILE_EXTENSIONS = {"json", "jsonl", "py", "md", "png", "csv", "txt", "npz", "log", "tar", "pth"}
# absl's own flags of every absl command (absl.app's help flags are defined by app.run).
ABSL_FLAGS = {"verbosity", "v", "logtostderr", "alsologtostderr", "log_dir", "logger_levels", "showprefixforinfo",
              "stderrthreshold", "only_check_args", "pdb", "pdb_post_mortem", "profile_file", "run_with_pdb",
              "run_with_profiling", "use_cprofile_for_profiling", "help", "helpshort", "helpfull", "helpxml",
              "flagfile", "undefok"}
HELP = {"help", "h", "helpshort", "helpfull"}

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`]+)`")
_COMMAND = re.compile(r"\bpython[\d.]*\s+-m\s+(semi_jax(?:\.\w+)*)")
_CONFIG_OVERRIDE = re.compile(r"--config\.([A-Za-z_][\w.]*)")
_CONFIG_SPEC = re.compile(r"--config=([^\s`'\"]+)")
_PATH = re.compile(r"(?<![\w./-])((?:configs|semi_jax|tests|docs|\.ci)/[\w./-]*)")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w.-]*)")


# --- reading markdown ---------------------------------------------------------------------------------------------

def read(doc: str) -> str:
  with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
    return f.read()


def split(text: str) -> tuple[list[str], str]:
  """(the fenced code blocks, the prose with the blocks taken out)."""
  return _FENCE.findall(text), _FENCE.sub("\n", text)


def inline_code(prose: str) -> list[str]:
  """The inline code spans of the prose, a span broken over lines joined by a space."""
  return [" ".join(span.split()) for span in _INLINE.findall(prose)]


def logical_lines(block: str) -> list[str]:
  """The shell lines of a code block, with backslash continuations joined."""
  return block.replace("\\\n", " ").splitlines()


def commands(text: str) -> list[tuple[str, list[str], str]]:
  """(module, its arguments, the source line) of every `python -m semi_jax.X ...` command, in code blocks and in
  inline code. A command ends at a comment, a shell operator, a quote or the end of the line."""
  blocks, prose = split(text)
  sources = [line for block in blocks for line in logical_lines(block)] + inline_code(prose)
  found = []
  for line in sources:
    for match in _COMMAND.finditer(line):
      rest = line[match.end():]
      rest = re.split(r"\s#|&&|;|\||>|'|\"|`", rest)[0]
      found.append((match.group(1), rest.split(), line.strip()))
  return found


def heading_anchors(text: str) -> set[str]:
  """GitHub's anchors of the headings of a markdown text."""
  _, prose = split(text)
  anchors = set()
  for line in prose.splitlines():
    m = re.match(r"#{1,6}\s+(.*)", line)
    if m:
      title = m.group(1).strip().lower()
      anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
  return anchors


# --- what the code defines -------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def default_config() -> ml_collections.ConfigDict:
  from semi_jax import config_files
  return config_files.load(os.path.join(ROOT, "configs", "default.py"))


def field_exists(path: str) -> bool:
  node = default_config()
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def leaf_fields(config, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and not _is_schedule(value):
      out += leaf_fields(value, f"{prefix}{key}.")
    else:
      out.append(prefix + key)
  return out


def _is_schedule(value) -> bool:
  from semi_jax import schedules
  return set(value.keys()) == set(schedules.FIELD_TYPES)


def module_file(module: str) -> str | None:
  """The file that `python -m module` runs, or None."""
  base = os.path.join(ROOT, *module.split("."))
  for path in (base + ".py", os.path.join(base, "__main__.py")):
    if os.path.isfile(path):
      return path
  return None


@functools.lru_cache(maxsize=None)
def flag_definitions(module: str) -> tuple[tuple[str, str, tuple, dict], ...]:
  """The flags a command module defines, read from its source: (kind, name, literal args, literal keywords) per
  definition; kind is "argparse" or the absl DEFINE function's name."""
  with open(module_file(module), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    literal_args = tuple(_literal(a) for a in node.args)
    keywords = {k.arg: _literal(k.value) for k in node.keywords if k.arg}
    if func == "add_argument":
      for name in literal_args:
        if isinstance(name, str) and name.startswith("-"):
          action = ast.unparse(next((k.value for k in node.keywords if k.arg == "action"), ast.Constant(None)))
          found.append(("argparse", name.lstrip("-"), (action,), {}))
    elif func.startswith("DEFINE_") and literal_args and isinstance(literal_args[0], str):
      found.append((func, literal_args[0], literal_args[1:], keywords))
  return tuple(found)


_NOT_LITERAL = object()


def _literal(node):
  try:
    return ast.literal_eval(node)
  except (ValueError, SyntaxError, TypeError):
    return _NOT_LITERAL


@functools.lru_cache(maxsize=None)
def command_flags(module: str) -> frozenset:
  """Every flag name `python -m module` accepts."""
  names = set()
  uses_absl = False
  for kind, name, args, _ in flag_definitions(module):
    names.add(name)
    if kind == "argparse":
      names.add("help" if name == "h" else name)
      if "BooleanOptionalAction" in args[0]:
        names.add("no-" + name)
    else:
      uses_absl = True
      if kind in ("DEFINE_bool", "DEFINE_boolean"):
        names.add("no" + name)
  names |= HELP if not uses_absl else ABSL_FLAGS | HELP
  return frozenset(names)


@functools.lru_cache(maxsize=None)
def all_command_modules() -> tuple[str, ...]:
  mods = ["semi_jax.main", "semi_jax.sweep", "semi_jax.report", "semi_jax.convert"]
  mods += [f"semi_jax.tools.{os.path.basename(p)[:-3]}"
           for p in sorted(glob.glob(os.path.join(ROOT, "semi_jax", "tools", "*.py")))
           if not p.endswith("__init__.py")]
  return tuple(m for m in mods if flag_definitions(m))


def is_placeholder(word: str) -> bool:
  return word in PLACEHOLDERS or word.startswith("<") or word == "..."


# --- the checks: each returns a list of problems ---------------------------------------------------------------

def check_fields(text: str) -> list[str]:
  """Config fields named in inline code or as --config.GROUP.FIELD= anywhere."""
  blocks, prose = split(text)
  groups = [k for k, v in default_config().items() if isinstance(v, ml_collections.ConfigDict)]
  mention = re.compile(r"(?<![\w./-])((?:%s)\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)" % "|".join(groups))
  named = set()
  for span in inline_code(prose):
    for m in mention.finditer(span):
      if m.group(1).rsplit(".", 1)[-1] not in FILE_EXTENSIONS:
        named.add(m.group(1))
  for m in _CONFIG_OVERRIDE.finditer(text):
    path = m.group(1).rstrip(".")
    if not any(is_placeholder(part) for part in path.split(".")):
      named.add(path)
  return [f"config field {path!r} does not exist in configs/default.py" for path in sorted(named)
          if not field_exists(path)]


def config_specs(text: str) -> set[str]:
  return {m.group(1).rstrip(".,") for m in _CONFIG_SPEC.finditer(text)}


def check_config_specs(text: str) -> list[str]:
  """Every --config=FILE.py[:ARGS] value names a file, and its arguments are accepted."""
  from semi_jax import config_files
  problems = []
  for spec in sorted(config_specs(text)):
    path, _ = config_files.split_spec(spec)
    if any(is_placeholder(part) for part in re.split(r"[/.]", path)):
      continue
    if not os.path.isfile(os.path.join(ROOT, path)):
      problems.append(f"--config={spec}: {path} does not exist")
      continue
    try:
      config_files.load(os.path.join(ROOT, spec))
    except Exception as e:  # noqa: BLE001 - any failure to load is the problem reported
      problems.append(f"--config={spec} does not load: {type(e).__name__}: {e}")
  return problems


def check_paths(text: str, doc: str) -> list[str]:
  """Repository paths named anywhere, and the targets (and anchors) of relative links."""
  problems = []
  for m in _PATH.finditer(text):
    path = m.group(1).rstrip(".")
    if any(is_placeholder(os.path.splitext(part)[0]) for part in path.split("/")):
      continue
    if not os.path.exists(os.path.join(ROOT, path)):
      problems.append(f"path {path} does not exist")
  for target in _LINK.findall(text):
    if re.match(r"[a-z]+:", target):
      continue
    file, _, anchor = target.partition("#")
    full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), file)) if file else os.path.join(ROOT, doc)
    if not os.path.exists(full):
      problems.append(f"link {target}: {os.path.relpath(full, ROOT)} does not exist")
    elif anchor and full.endswith(".md"):
      with open(full, encoding="utf-8") as f:
        if anchor not in heading_anchors(f.read()):
          problems.append(f"link {target}: no heading with the anchor #{anchor}")
  return problems


def check_command_flags(text: str) -> list[str]:
  """Every flag of a `python -m semi_jax.X` command is defined by X; every flag named alone in inline code (a span
  that starts with --), by some command."""
  problems = []
  for module, args, line in commands(text):
    if module_file(module) is None:
      problems.append(f"`python -m {module}`: no such module ({line})")
      continue
    known = command_flags(module)
    for arg in args:
      if arg.startswith("--") or arg == "-h":
        name = arg.lstrip("-").split("=", 1)[0]
        if name.startswith("config.") and "config" in known:
          continue
        if name not in known:
          problems.append(f"`python -m {module}` has no flag --{name} ({line})")
  everywhere = set().union(*(command_flags(m) for m in all_command_modules())) | EXTERNAL_FLAGS
  _, prose = split(text)
  for span in inline_code(prose):
    if not span.startswith("--"):  # a flag named alone, not a command (of semi_jax: above; of another program)
      continue
    for m in _FLAG.finditer(span):
      name = m.group(1).split("=", 1)[0]
      if name.startswith(("config.", "xla_")) or name in everywhere:
        continue
      problems.append(f"flag --{name} is defined by no command (`{span}`)")
  return problems


def _define(fv: flags.FlagValues, module: str, argv: list[str]) -> None:
  """Defines on `fv` the flags of an absl command, as its source defines them (with default values where they
  are literals). A config flag registers its --config.FIELD overrides from `argv` (sys.argv in the command)."""
  for kind, name, args, keywords in flag_definitions(module):
    if kind == "DEFINE_config_file":
      config_flags.DEFINE_config_file(name, None, "", flag_values=fv, lock_config=keywords.get("lock_config", True),
                                      sys_argv=argv)
      continue
    default = args[0] if args and args[0] is not _NOT_LITERAL else None
    if kind == "DEFINE_enum" and len(args) > 1 and args[1] is not _NOT_LITERAL:
      flags.DEFINE_enum(name, default, args[1], "", flag_values=fv)
    elif kind == "DEFINE_enum":
      flags.DEFINE_string(name, default, "", flag_values=fv)
    else:
      getattr(flags, kind)(name, default, "", flag_values=fv)


def parse_command(module: str, args: list[str], workdir: str) -> None:
  """Parses a `semi_jax.main` or `semi_jax.sweep` command line as the command does, and builds its config (main:
  fitted to its length and validated; sweep: every run planned and validated). Raises on a problem."""
  from semi_jax import config_files, config_validation, sweep
  args = [f"--workdir={workdir}" if a.startswith("--workdir=") else a for a in args]
  argv = [module] + [a.replace("$HOME", workdir) for a in args]
  fv = flags.FlagValues()
  _define(fv, module, argv)
  config_files.make_argv_configs_importable(argv)
  fv(argv)
  spec = config_files.flag_spec(argv)
  if module == "semi_jax.main":
    config = fv.config
    config_files.fit_to_length(config, spec, explicit=fv["config"].override_values)
    config_validation.validate(config)
    return
  if fv.print_commands and fv.together:
    raise ValueError("--print_commands and --together exclude each other")
  seeds = None if fv.seeds is None else [int(s) for s in fv.seeds]
  common = dict(config_flags.get_override_values(fv["config"]))
  runs = sweep.plan(spec, fv.workdir, seeds=seeds, only=fv.only, common=common)
  assert runs, "the sweep plans no run"


def check_parse(text: str, workdir: str) -> list[str]:
  problems = []
  for module, args, line in commands(text):
    if module not in ("semi_jax.main", "semi_jax.sweep") or not args or "..." in args:
      continue  # other commands; the name of a command alone; an elided command line
    if any(a.lstrip("-").split("=")[0] in HELP for a in args):
      continue
    try:
      parse_command(module, args, workdir)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - every failure is the problem reported
      problems.append(f"`{line}` does not parse: {type(e).__name__}: {e}")
  return problems


# --- the tests -----------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
  monkeypatch.chdir(ROOT)  # config paths in the docs are relative to the repository root


@pytest.mark.parametrize("doc", DOCS)
def test_config_fields_exist(doc):
  assert check_fields(read(doc)) == []


@pytest.mark.parametrize("doc", DOCS)
def test_config_arguments_are_accepted(doc):
  assert check_config_specs(read(doc)) == []


@pytest.mark.parametrize("doc", DOCS)
def test_paths_and_links_exist(doc):
  assert check_paths(read(doc), doc) == []


@pytest.mark.parametrize("doc", DOCS)
def test_command_flags_exist(doc):
  assert check_command_flags(read(doc)) == []


@pytest.mark.parametrize("doc", DOCS)
def test_main_and_sweep_commands_parse(doc, tmp_path):
  assert check_parse(read(doc), str(tmp_path / "workdir")) == []
  assert not os.path.exists(tmp_path / "workdir"), "parsing a command must write nothing"


def test_readme_keeps_the_set_up_commands():
  lines = read("README.md").splitlines()
  for command in SETUP_COMMANDS:
    assert command in lines


def test_accelerator_installs_use_the_pinned_jax():
  """One install instruction for GPUs and TPUs wherever it appears: pip install -r requirements.txt "jax[X]==PIN"."""
  pin = re.search(r"^jax==(\S+)", read("requirements.txt"), re.M).group(1)
  seen = 0
  for doc in DOCS:
    for line in read(doc).splitlines():
      for m in re.finditer(r"jax\[(\w+)\]==([\w.]+)", line):
        seen += 1
        assert m.group(1) in ("cuda12", "tpu") and m.group(2) == pin, f"{doc}: {line}"
        assert f'pip install -r requirements.txt "jax[{m.group(1)}]=={pin}"' in line, f"{doc}: {line}"
  assert seen


def test_every_pinned_package_is_named_in_the_readme():
  """The README's Dependencies section names every package requirements.txt pins (and says why it is there)."""
  pinned = re.findall(r"^([A-Za-z0-9_.-]+)==", read("requirements.txt"), re.M)
  section = read("README.md").split("## Dependencies", 1)[1].split("\n## ", 1)[0]
  assert len(pinned) >= 15
  missing = [name for name in pinned if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", section)]
  assert not missing, missing


def test_every_config_field_is_documented():
  table = read("docs/config.md")
  missing = [f for f in leaf_fields(default_config()) if f"| `{f}` |" not in table]
  assert missing == [], "add these fields to the table of docs/config.md"


def test_the_checks_find_mistakes(tmp_path):
  fake = """
# A page

Set `train.total_step` or `bank.beta.kinds` and keep `eval.jsonl`; see `semi_jax/nowhere.py` and
[the config](docs/nope.md) and [a section](docs/config.md#no-such-heading). `--no_such_flag` is not a flag.

```bash
python -m semi_jax.main --config=configs/digits_lt.py:algo=semi2 --workdir=DIR --config.train.batch_sizes=4
python -m semi_jax.sweep --config=configs/ablations/decay.py --workdir=DIR --seed=0
python -m semi_jax.sweep --config=configs/ablations/decay.py --workdir=DIR --config.bank.beta.value=0.9
python -m semi_jax.report --workdir=DIR --paired=final
python -m semi_jax.tools.nothing --out=DIR
```
"""
  fields = "\n".join(check_fields(fake))
  for name in ("train.total_step", "bank.beta.kinds", "train.batch_sizes"):
    assert name in fields
  assert "eval.jsonl" not in fields
  assert "algo" in "\n".join(check_config_specs(fake))
  paths = "\n".join(check_paths(fake, "README.md"))
  assert "semi_jax/nowhere.py" in paths and "docs/nope.md" in paths and "#no-such-heading" in paths
  flag_problems = "\n".join(check_command_flags(fake))
  for problem in ("--seed ", "--paired ", "semi_jax.tools.nothing", "--no_such_flag"):
    assert problem in flag_problems
  parse_problems = check_parse(fake, str(tmp_path / "w"))
  assert len(parse_problems) == 3  # the unknown field and algorithm, the unknown flag, the override of a variant
  assert "collides with sweep variant" in parse_problems[2]
  # ... and a correct page passes every check.
  good = ("Set `train.total_steps` ([config](docs/config.md#short-runs)).\n\n```bash\n"
          "python -m semi_jax.sweep --config=configs/ablations/decay.py:base=test --workdir=DIR --seeds=0,1 "
          "--together\n"
          "python -m semi_jax.main --config=configs/test.py --workdir=DIR --config.train.total_steps=2\n```\n")
  assert check_fields(good) + check_config_specs(good) + check_paths(good, "README.md") == []
  assert check_command_flags(good) + check_parse(good, str(tmp_path / "w")) == []
