"""The layout a newcomer reads: the README's table is true, top-level modules are only the
command shims, one indentation style, no private orbax modules, no torch in the core."""
import ast
import pathlib
import re
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "flexolmo_jax"
COMMANDS = ("demo", "inspect", "prepare_data", "build_flexmix_mini", "router_init", "proxy_data",
            "generate")
PACKAGE_COMMANDS = ("train", "stitch", "convert", "evaluate", "aot")


def _sources():
  return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_readme_table_names_every_package_and_only_existing_paths():
  readme = (ROOT / "README.md").read_text()
  table = readme[readme.index("| folder | what |"):readme.index("Entry points:")]
  named = {p for p in re.findall(r"`([\w./]+/)`", table) if "/" in p.rstrip("/")}
  for path in named:
    assert (ROOT / path).is_dir(), f"README names {path}, which does not exist"
  packages = {f"flexolmo_jax/{p.parent.name}/" for p in PKG.glob("*/__init__.py")}
  assert packages <= named, f"packages missing from the README table: {packages - named}"


def test_top_level_modules_are_the_config_schema_shared_cli_helpers_and_command_shims():
  top = {p.stem for p in PKG.glob("*.py")}
  assert top == {"__init__", "config_base", "cli", *COMMANDS}, sorted(top)
  for name in COMMANDS:
    tree = ast.parse((PKG / f"{name}.py").read_text())
    imports = [n for n in tree.body if isinstance(n, ast.ImportFrom)
               and n.module.startswith("flexolmo_jax.")]
    assert imports, f"flexolmo_jax/{name}.py should only forward to its stage package"
    assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))], name
  for name in PACKAGE_COMMANDS:
    assert (PKG / name / "__main__.py").is_file()


def test_one_indentation_style():
  for path in _sources():
    with open(path) as f:
      for tok in tokenize.generate_tokens(f.readline):
        if tok.type == tokenize.INDENT:
          assert len(tok.string) % 2 == 0 and "\t" not in tok.string, (path, tok.start)
          first = tok.string
          break
      else:
        continue
    assert first == "  ", f"{path.relative_to(ROOT)} indents with {len(first)} spaces, not 2"


def test_no_private_orbax_modules_and_no_torch_in_the_core():
  for path in _sources():
    text = path.read_text()
    assert "orbax.checkpoint._src" not in text, path
    tree = ast.parse(text)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or ""]
      else:
        continue
      if any(n.split(".")[0] in ("torch", "transformers") for n in names):
        # only the demo's transformers check may import them, lazily inside a function
        assert path.name == "demo.py", f"{path.relative_to(ROOT)} imports {names}"
