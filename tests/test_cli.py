"""One CLI convention: every entry point's --help lists its flags one line each, and every
`python -m flexolmo_jax.X ...` command in the README and in the configs' docstrings parses
as written (flags known, config files and overrides load), without running it."""
import ast
import importlib
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = ("demo", "inspect", "prepare_data", "build_flexmix_mini", "train", "router_init",
            "stitch", "proxy_data", "convert", "evaluate", "generate", "aot", "experiments")
PACKAGES = ("train", "stitch", "convert", "evaluate", "aot", "experiments")
ENV = {"D": "/tmp/flexmix_mini", "W": "/tmp/workdir", "ZONE": "z", "PROJECT": "p",
       "FLEXOLMO_DATA_DIR": "/tmp/data"}


def _module(name: str):
  return importlib.import_module(f"flexolmo_jax.{name}.__main__" if name in PACKAGES
                                 else f"flexolmo_jax.{name}")


def _commands(text: str) -> list[str]:
  """Lines that start with `python -m flexolmo_jax.X` (backslash continuations joined)."""
  text = re.sub(r"\\\n\s*", " ", text)
  out = []
  for line in text.splitlines():
    m = re.match(r"\s*python -m flexolmo_jax\.(\w+)([^|;&\n]*)", line)
    if m:
      out.append((m.group(1), m.group(2)))
  return out


def _documented():
  """README: its code blocks and inline commands with flags; configs: their docstrings."""
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```[a-z]*\n(.*?)```", readme, flags=re.S)
  inline = [c for c in re.findall(r"`(python -m flexolmo_jax\.[^`]+)`", readme) if "--" in c]
  found = [("README.md", m, rest) for m, rest in _commands("\n".join(blocks + inline))]
  for path in sorted((ROOT / "configs").glob("*.py")):
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    for m, rest in _commands(doc):
      found.append((f"configs/{path.name}", m, rest))
  return found


def _argv(rest: str) -> list[str]:
  rest = rest.split("#")[0]
  for k, v in ENV.items():
    rest = rest.replace(f"${k}", v)
  # usage notation: [--opt ...] is optional (take it), [...] stands for more of the same
  rest = rest.replace("[...]", " ")
  rest = re.sub(r"\[(--[^\[\]]*)\]", r" \1 ", rest)
  return shlex.split(rest)


DOCUMENTED = _documented()


def test_every_documented_command_is_found():
  names = {m for _, m, _ in DOCUMENTED}
  assert len(DOCUMENTED) > 30
  assert names >= set(COMMANDS) - {"demo"}, set(COMMANDS) - names


@pytest.mark.parametrize("where,name,rest", DOCUMENTED,
                         ids=[f"{w}:{m}:{i}" for i, (w, m, _) in enumerate(DOCUMENTED)])
def test_documented_command_parses(where, name, rest, monkeypatch):
  monkeypatch.setenv("FLEXOLMO_PARSE_ONLY", "1")
  monkeypatch.chdir(ROOT)  # configs/X.py paths are relative to the checkout, as documented
  argv = _argv(rest)
  rc = _module(name).main(argv)
  assert rc == 0, f"{where}: python -m flexolmo_jax.{name} {' '.join(argv)} -> exit {rc}"


def test_unknown_flag_is_exit_2(monkeypatch, capsys):
  monkeypatch.setenv("FLEXOLMO_PARSE_ONLY", "1")
  assert _module("stitch").main(["--no-such-flag=1"]) == 2
  assert "no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("name", COMMANDS)
def test_help_lists_each_flag_on_one_line(name):
  out = subprocess.run([sys.executable, "-m", f"flexolmo_jax.{name}", "--help"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr
  text = out.stdout
  assert f"python -m flexolmo_jax.{name}" in text or name == "demo", text[:300]
  listing = text.split("\nflags:\n", 1)[1].splitlines()
  flag_lines = [ln for ln in listing if ln.startswith("  --")]
  assert flag_lines and all(ln.startswith(("  --", "  (")) for ln in listing), listing
  names = [ln.split()[0].split("=")[0].replace("[no]", "") for ln in flag_lines]
  assert len(names) == len(set(names))  # one line per flag
