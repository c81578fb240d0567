"""Where FlexMix-mini's text comes from: only things present wherever Python and this package's
dependencies are installed, read (never imported or executed) and selected deterministically.

  public  English technical prose: the Python reference topics shipped as ``pydoc_data.topics``
          plus the docstrings of one half of the standard-library modules.
  code    Python source of the *other* half of the standard-library modules, so no text is
          shared with ``public``'s docstrings.
  legal   licence texts: the interpreter's LICENSE.txt and the LICENSE/COPYING/NOTICE files of
          installed distributions, with paragraphs repeated across files removed (bundled
          copies of Apache/MIT/BSD would otherwise dominate and leak across the split).
  math    generated word problems with worked answers (math_problems.py).

Order is a hash of each path, so the byte budget takes a spread of the library rather than
the alphabetically first packages.
"""
from __future__ import annotations

import ast
import hashlib
import os
import re
import sys
import sysconfig
from collections.abc import Iterator

Doc = tuple[str, str]  # (text, source id)

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
              # generated tables and vendored wheels, not representative prose or code
              "encodings", "pydoc_data", "ensurepip", "lib2to3", "turtledemo"}
# Long modules / licence bundles are cut into documents of about this many bytes (at top-level
# statements / paragraphs), so the hash split has enough units to give a usable validation set.
_CHUNK = 8_000


def _stable_order(names: list[str]) -> list[str]:
  return sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())


def _stdlib_modules() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS
                         and not d.startswith((".", "config-")))
    found += [os.path.relpath(os.path.join(dirpath, f), root)
              for f in filenames if f.endswith(".py")]
  return _stable_order(found)


def _half(rel: str) -> int:
  """0: module lends its docstrings to `public`; 1: its source goes to `code`."""
  return hashlib.sha256(rel.encode()).digest()[0] & 1


def _read_stdlib(rel: str) -> str | None:
  try:
    with open(os.path.join(sysconfig.get_paths()["stdlib"], rel), encoding="utf-8") as fh:
      return fh.read()
  except (OSError, UnicodeDecodeError):
    return None


def _take(docs: Iterator[Doc], budget: int) -> list[Doc]:
  out, used = [], 0
  for text, sid in docs:
    if used >= budget:
      break
    out.append((text, sid))
    used += len(text.encode("utf-8"))
  return out


def _docstrings(rel: str) -> str | None:
  src = _read_stdlib(rel)
  if src is None:
    return None
  try:
    tree = ast.parse(src)
  except SyntaxError:
    return None
  found = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node)
      if doc and len(doc) >= 40:  # "Return x." style one-liners carry little prose
        found.append((getattr(node, "lineno", 0), doc))
  found.sort(key=lambda x: x[0])  # source order, module docstring first
  return "\n\n".join(d for _, d in found) or None


def public_docs(budget: int) -> list[Doc]:
  def gen() -> Iterator[Doc]:
    from pydoc_data import topics  # data module: a dict of reference-manual sections

    yield from ((topics.topics[k], f"pydoc_data.topics:{k}")
                for k in _stable_order(list(topics.topics)))
    for rel in _stdlib_modules():
      if _half(rel) == 0 and (text := _docstrings(rel)):
        yield text, f"docstrings:{rel}"
  return _take(gen(), budget)


def _code_chunks(src: str) -> list[str]:
  if len(src) <= _CHUNK:
    return [src]
  chunks, current, size = [], [], 0
  for line in src.splitlines(keepends=True):
    top_level = line.startswith(("def ", "class ", "async def ", "@"))
    if top_level and size >= _CHUNK and not (current and current[-1].startswith("@")):
      chunks.append("".join(current))
      current, size = [], 0
    current.append(line)
    size += len(line)
  chunks.append("".join(current))
  return [c for c in chunks if c.strip()]


def code_docs(budget: int) -> list[Doc]:
  def gen() -> Iterator[Doc]:
    for rel in _stdlib_modules():
      if _half(rel) == 1 and (src := _read_stdlib(rel)) and src.strip():
        for i, chunk in enumerate(_code_chunks(src)):
          yield chunk, f"stdlib:{rel}#{i}"
  return _take(gen(), budget)


_LICENSE_NAME = re.compile(r"^(licen[cs]e|copying|notice|copyright)([._-].*)?$", re.I)
_LICENSE_EXT = ("", ".txt", ".md", ".rst")


def _licence_files() -> list[str]:
  roots = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
                 | {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))})
  found = [os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")]
  for root in roots:
    if not os.path.isdir(root):
      continue
    for dirpath, dirnames, filenames in os.walk(root):
      depth = os.path.relpath(dirpath, root).count(os.sep)
      dirnames[:] = sorted(d for d in dirnames if d != "__pycache__") if depth < 3 else []
      for f in filenames:
        if _LICENSE_NAME.match(f) and os.path.splitext(f)[1].lower() in _LICENSE_EXT:
          found.append(os.path.join(dirpath, f))
  return [p for p in dict.fromkeys(found) if os.path.isfile(p)]


def _paragraph_chunks(paragraphs: list[str]) -> list[str]:
  chunks, current, size = [], [], 0
  for para in paragraphs:
    if current and size + len(para) > _CHUNK:
      chunks.append("\n\n".join(current))
      current, size = [], 0
    current.append(para)
    size += len(para) + 2
  if current:
    chunks.append("\n\n".join(current))
  return chunks


def _normalise(paragraph: str) -> str:
  return re.sub(r"\s+", " ", paragraph.lower()).strip()


def legal_docs(budget: int) -> list[Doc]:
  def gen() -> Iterator[Doc]:
    seen: set[str] = set()
    paths = _licence_files()
    # Key on the path below site-packages, so the order does not depend on the prefix.
    key = {p: re.sub(r"^.*?(site|dist)-packages/", "", p) for p in paths}
    for path in sorted(paths, key=lambda p: hashlib.sha256(key[p].encode()).hexdigest()):
      try:
        with open(path, encoding="utf-8") as fh:
          text = fh.read()
      except (OSError, UnicodeDecodeError):
        continue
      kept = []
      for para in re.split(r"\n\s*\n", text):
        norm = _normalise(para)
        if len(norm) >= 80:  # short lines (names, "All rights reserved.") repeat freely
          if norm in seen:
            continue
          seen.add(norm)
        if norm:
          kept.append(para.strip("\n"))
      for i, doc in enumerate(_paragraph_chunks(kept)):
        if len(doc) >= 200:
          yield doc + "\n", f"licence:{key[path]}#{i}"
  return _take(gen(), budget)

