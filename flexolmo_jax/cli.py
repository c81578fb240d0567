"""The one command-line convention every entry point follows: absl flags, ml_collections configs.

A command module (see flexolmo_jax/data/prepare_data.py for a small one):

    '''One-line summary.

      python -m flexolmo_jax.NAME --flag=... [--config=configs/X.py[:arg] --config.key=value]
    '''
    from absl import flags
    from flexolmo_jax import cli

    FLAGS = flags.FlagValues()  # the command's own: tests import many commands into one process
    _OUT = flags.DEFINE_string("out", None, "Output directory.", flag_values=FLAGS)
    flags.mark_flag_as_required("out", flag_values=FLAGS)

    def _main(argv):  # absl style: argv = [program, positional arguments...]
      ...             # return None/0, or 1 for bad input; raise a known error (below) for 1

    def main(argv=None) -> int:
      return cli.run(_main, FLAGS, argv, __doc__)

`python -m flexolmo_jax.NAME` calls main() -> absl app.run on sys.argv (--help prints the
docstring and the command's flags, one line each); tests call main(["--out=..."]) in-process
and get the exit status back. Exit status: 0 ok; 1 bad input (one line `error: ...` naming it:
any error in KNOWN_ERRORS, ValueError, OSError); 2 bad arguments (unknown or missing flags,
app.UsageError). FLEXOLMO_PARSE_ONLY=1 parses the flags (loading any config file) and exits 0
without running: tests/test_cli.py checks every documented command that way.

The mesh and axis rules always come from a config: `config.mesh` and `config.axis_rules`
(config_base.base_config). Tools that load a model directory (its own config) take a runtime
config (define_runtime_config): defaults in flexolmo_jax/parallel/mesh_config.py, so
`--config.mesh.tensor=4` works without a file, and `--config=configs/X.py` takes X's mesh.
"""
from __future__ import annotations

import os
import pathlib
import sys
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

# Exceptions that mean "bad input", matched by class name so that this module imports nothing
# heavy (the class is already imported wherever it was raised).
KNOWN_ERRORS = frozenset({
    "DataError", "ModelDirError", "StitchError", "SourceError", "StoreError",
    "UnknownExpertError", "ConvertError", "MappingError", "SafetensorsError", "TrainingError",
    "InitError", "EmbedderError",
})
PARSE_ONLY_ENV = "FLEXOLMO_PARSE_ONLY"
RUNTIME_CONFIG = str(pathlib.Path(__file__).parent / "parallel" / "mesh_config.py")
_HELP_FLAGS = ("--help", "-help", "--helpshort", "--helpfull", "-?", "--helpxml")


def parse_names(text: str | None) -> list[str]:
  """'a,b' -> ['a', 'b'] (empty or None -> [])."""
  return [t.strip() for t in (text or "").split(",") if t.strip()]


def parse_names_list(values) -> list[str]:
  """Repeatable comma lists (['a,b', 'c'] or None) -> ['a', 'b', 'c']."""
  return [n for v in values or [] for n in parse_names(v)]


def _is_known(e: BaseException) -> bool:
  if isinstance(e, (ValueError, OSError)):
    return True
  return any(c.__name__ in KNOWN_ERRORS for c in type(e).__mro__)


def _call(main: Callable, argv: list[str]) -> int:
  """main(argv) with the error convention applied; returns the exit status."""
  try:
    rc = main(argv)
  except app.UsageError as e:
    print(f"error: {e}\nPass --help for usage.", file=sys.stderr)
    return 2
  except SystemExit as e:  # a command may sys.exit(n) itself (aot: 1 = does not fit)
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except Exception as e:  # noqa: BLE001 - only known errors are caught, the rest re-raised
    if not _is_known(e):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 1
  return int(rc or 0)


def _config_flags(fv: flags.FlagValues):
  # ml_collections' config flags are the ones that take `--NAME.key=value` overrides.
  return [fv[n] for n in fv if fv[n].name == n and hasattr(fv[n], "_GetOverrides")]


def _adopt(fv: flags.FlagValues) -> None:
  """Moves a command's flags into absl's global FLAGS (app.run parses those) as main-module
  flags, so --help lists them even when __main__ is a two-line shim."""
  for name in fv:
    flag = fv[name]
    if name == flag.name and name not in flags.FLAGS:
      flags.FLAGS[name] = flag
      flags.FLAGS.register_flag_by_module(sys.argv[0], flag)
  for flag in _config_flags(fv):
    flag.flag_values = flags.FLAGS  # --config.x overrides are defined while --config parses


def _parse_global(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}\nPass --help for usage.", file=sys.stderr)
    sys.exit(2)
  except SystemExit as e:
    if e.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
      sys.exit(0)  # absl exits 1 after --help; asking for help is not an error
    raise


def _parse_local(fv: flags.FlagValues, argv: list[str], prog: str) -> list[str] | int:
  """Parses argv into fv afresh (in-process calls, e.g. tests calling main([...]))."""
  saved, sys.argv = sys.argv, [prog, *argv]  # config_flags reads its overrides off sys.argv
  try:
    fv.unparse_flags()
    for flag in _config_flags(fv):
      for name in [n for n in fv if n.startswith(flag.name + ".")]:
        delattr(fv, name)  # overrides of the previous call
      # A fresh config (overrides edit it in place) with this argv's overrides defined.
      flag.flag_values = fv
      flag._set_default(getattr(flag, "_cli_default", None))
    return fv(sys.argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  finally:
    sys.argv = saved


def _flag_line(flag) -> str:
  if flag.boolean:
    name = f"--[no]{flag.name}"
  elif flag.default is None or flag.default == []:
    name = f"--{flag.name}"
  else:
    name = f"--{flag.name}={flag.default_as_str.strip(chr(39))}"
  text = " ".join((flag.help or "").split())
  return f"  {name:<32} {text}" if len(name) < 32 else f"  {name} {text}"


def usage(fv: flags.FlagValues, doc: str | None) -> str:
  """The command's docstring, then each of its flags on one line (`--help`); absl's own
  multi-line listing, with absl's global flags too, stays available as --helpfull."""
  seen, lines = set(), []
  for name in sorted(fv):
    flag = fv[name]
    if flag.name != name or id(flag) in seen:
      continue  # short names and aliases point at a flag listed under its own name
    seen.add(id(flag))
    lines.append(_flag_line(flag))
  body = (doc or "").strip("\n")
  return f"{body}\n\nflags:\n" + "\n".join(lines) + "\n  (--config.KEY=VALUE overrides " \
      "any field of --config)" * any(fv[n].name == "config" for n in fv)


def run(main: Callable, fv: flags.FlagValues, argv: list[str] | None = None,
        doc: str | None = None) -> int:
  """Parses the command's flags, then main(positional argv) with the error convention.

  argv None: the command line (absl app.run; exits). A list of arguments (no program name):
  in-process, returns the exit status.
  """
  for flag in _config_flags(fv):
    if not hasattr(flag, "_cli_default"):
      flag._cli_default = getattr(flag, "default_unparsed", None)
  parse_only = os.environ.get(PARSE_ONLY_ENV, "") not in ("", "0")
  if argv is not None:
    rest = _parse_local(fv, list(argv), "flexolmo_jax")
    if isinstance(rest, int):
      return rest
    return 0 if parse_only else _call(main, rest)
  if any(a.split("=")[0] in ("--help", "-help", "-h", "--helpshort", "-?")
         for a in sys.argv[1:]):
    print(usage(fv, doc))
    sys.exit(0)
  _adopt(fv)
  if doc:  # absl's --helpfull prints __main__'s docstring: the real module's, not the shim's
    sys.modules["__main__"].__doc__ = doc

  def wrapped(rest):
    fv.mark_as_parsed()
    if not flags.FLAGS["verbosity"].present:  # app.run raises it to INFO: jax/orbax noise
      from absl import logging
      logging.set_verbosity(logging.WARNING)
    return 0 if parse_only else _call(main, rest)

  app.run(wrapped, flags_parser=_parse_global)
  return 0  # not reached: app.run exits


def define_runtime_config(fv: flags.FlagValues) -> flags.FlagHolder:
  """--config of a tool that loads a model directory: mesh + axis_rules (parallel/mesh_config.py
  defaults, overridable as --config.mesh.fsdp=2), or any configs/X.py (its mesh is used)."""
  return config_flags.DEFINE_config_file(
      "config", RUNTIME_CONFIG, "Runtime config (mesh, axis_rules): configs/X.py[:arg] or the "
      "default; override as --config.mesh.tensor=4.", flag_values=fv, lock_config=True)


def mesh_and_rules(config, devices=None):
  """(Mesh, axis rules) of a config's `mesh` and `axis_rules` blocks."""
  from flexolmo_jax.parallel.sharding import make_mesh, rules_from_config
  mesh = config.mesh.to_dict() if hasattr(config.mesh, "to_dict") else dict(config.mesh)
  return make_mesh(mesh, devices), rules_from_config(config.get("axis_rules"))


class DistributedFlags:
  """--coordinator_address --num_processes --process_id --distributed --cpu_devices, shared by
  train, evaluate and generate (multi-host start-up as in parallel/distributed.py)."""

  def __init__(self, fv: flags.FlagValues):
    self.coordinator_address = flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 (multi-host CPU/GPU).",
        flag_values=fv)
    self.num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes.",
                                              flag_values=fv)
    self.process_id = flags.DEFINE_integer("process_id", None, "This process's index.",
                                           flag_values=fv)
    self.distributed = flags.DEFINE_enum(
        "distributed", "auto", ["auto", "on", "off"],
        "jax.distributed.initialize(): auto = on TPU pods only.", flag_values=fv)
    self.cpu_devices = flags.DEFINE_integer("cpu_devices", None,
                                            "CPU devices per process (testing).", flag_values=fv)

  def init(self) -> None:
    from flexolmo_jax.parallel.distributed import init_distributed
    init_distributed(self.coordinator_address.value, self.num_processes.value,
                     self.process_id.value, self.distributed.value, self.cpu_devices.value)


class ModelLoadFlags:
  """--dispatch --param_dtype: how a tool that reads a model directory runs it (fields of the
  model's config that do not change parameter shapes), shared by evaluate and generate."""

  def __init__(self, fv: flags.FlagValues):
    self.dispatch = flags.DEFINE_enum(
        "dispatch", None, ["dense", "capacity", "dropless"],
        "Override the model's MoE dispatch.", flag_values=fv)
    self.param_dtype = flags.DEFINE_enum(
        "param_dtype", None, ["float32", "bfloat16"],
        "Cast weights when loading (bfloat16 halves their memory).", flag_values=fv)
