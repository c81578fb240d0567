"""Small helpers every command-line entry point shares."""
from __future__ import annotations


def parse_names(text: str | None) -> list[str]:
  """'a,b' -> ['a', 'b'] (empty or None -> [])."""
  return [t.strip() for t in (text or "").split(",") if t.strip()]


def parse_mesh(text: str | None) -> dict[str, int]:
  """'fsdp=-1,tensor=2' -> {'fsdp': -1, 'tensor': 2}; empty -> all devices on fsdp."""
  if not text:
    return {"fsdp": -1}
  out = {}
  for item in parse_names(text):
    name, _, size = item.partition("=")
    try:
      out[name.strip()] = int(size)
    except ValueError:
      raise ValueError(f"bad --mesh entry {item!r}; expected axis=size, e.g. fsdp=-1") from None
  return out
