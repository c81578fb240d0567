"""Training as users run it: the CLI, two jax.distributed processes, and kill -9 + resume."""
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flexolmo_jax.storage import model_io
from flexolmo_jax.train.trainer import train
from train_utils import ROOT, tiny_stage_config


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # each process sets its own device count
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _cli(public_model, workdir, *extra):
  return [sys.executable, "-m", "flexolmo_jax.train",
          f"--config={ROOT / 'configs' / 'flexmix_mini.py'}:expert,math,tiny",
          f"--workdir={workdir}",
          f"--config.data.root={public_model['data']}",
          f"--config.init.public={public_model['dir']}",
          f"--config.init.public_embedding={public_model['embeddings']['public']}",
          f"--config.init.domain_embedding={public_model['embeddings']['math']}",
          "--config.data.num_threads=1", *extra]


def _params(path):
  return jax.device_get(model_io.load_params(path, model_io.read_config(path)))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(public_model, tmp_path):
  common = ["--config.train.steps=3", "--config.train.log_every=1", "--config.model.dtype=float32",
            "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.expert=1",
            "--config.checkpoint.every=3"]
  port = _free_port()
  procs = [subprocess.Popen(
      _cli(public_model, tmp_path / "multi", *common, f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={i}", "--cpu_devices=2"),
      env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=420)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]

  config = tiny_stage_config("expert", public_model["data"], "math", steps=3, log_every=1)
  config.init.public = str(public_model["dir"])
  config.init.public_embedding = str(public_model["embeddings"]["public"])
  config.init.domain_embedding = str(public_model["embeddings"]["math"])
  config.model.dtype = "float32"
  config.mesh.update(dict(data=1, fsdp=1, expert=1, tensor=1))
  config.eval.sources = {}
  train(config, tmp_path / "single", devices=jax.devices()[:1])

  multi, single = _params(tmp_path / "multi" / "export"), _params(tmp_path / "single" / "export")
  for a, b in zip(jax.tree.leaves(multi), jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  assert "done: step 3" in outs[0]


def _wait_for_checkpoint(proc, ckpts, at_least, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
    if steps and max(steps) >= at_least:
      return max(steps)
    if proc.poll() is not None:
      pytest.fail("training ended before the signal could be sent; make it longer")
    time.sleep(0.05)
  pytest.fail("no checkpoint appeared")


def test_sigterm_and_kill_9_then_rerun_is_bitwise_identical(public_model, tmp_path):
  args = ["--config.train.steps=40", "--config.checkpoint.every=4", "--config.train.log_every=4"]
  ref = subprocess.run(_cli(public_model, tmp_path / "ref", *args), env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=420)
  assert ref.returncode == 0, ref.stderr[-3000:]
  work = tmp_path / "interrupted"
  ckpts = work / "checkpoints"

  # 1. SIGTERM (TPU preemption): saves where it is and exits 143.
  proc = subprocess.Popen(_cli(public_model, work, *args), env=_env(), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _wait_for_checkpoint(proc, ckpts, 4)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 143, out[-2000:]
  assert "preempted: saved step" in out

  # 2. kill -9 in the middle of the resumed run: nothing that looks finished is left.
  proc = subprocess.Popen(_cli(public_model, work, *args), env=_env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  reached = _wait_for_checkpoint(proc, ckpts, 16)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (work / "export").exists()
  assert reached < 40

  # 3. The same command again finishes; the result is bitwise the uninterrupted one.
  again = subprocess.run(_cli(public_model, work, *args), env=_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=420)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from step" in again.stderr + again.stdout  # it resumed, not restarted
  for a, b in zip(jax.tree.leaves(_params(tmp_path / "ref" / "export")),
                  jax.tree.leaves(_params(work / "export"))):
    np.testing.assert_array_equal(a, b)


def test_sigterm_to_one_of_two_processes_all_save_the_same_step(public_model, tmp_path):
  # Each process: one CPU device, mesh data=2. The step delay keeps the run going long enough
  # for the signal to land mid-training (tiny steps take milliseconds).
  args = ["--config.train.steps=16", "--config.checkpoint.every=4", "--config.train.log_every=4",
          "--config.model.dtype=float32", "--config.mesh.data=2", "--config.mesh.fsdp=1",
          "--config.mesh.expert=1", "--config.eval.sources={}",
          "--config.checkpoint.preemption_check_every=2"]
  env = dict(_env(), FLEXOLMO_TRAIN_STEP_DELAY="0.4")

  def launch(workdir, n=2):
    port = _free_port()
    return [subprocess.Popen(
        _cli(public_model, workdir, *args, f"--coordinator_address=127.0.0.1:{port}",
             f"--num_processes={n}", f"--process_id={i}", "--cpu_devices=1"),
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(n)]

  def finish(procs, timeout=240):
    outs = []
    for p in procs:
      try:
        outs.append(p.communicate(timeout=timeout)[0])
      except subprocess.TimeoutExpired:
        for q in procs:
          q.kill()
        pytest.fail("a process hung (the others are killed)")
    return outs

  work = tmp_path / "interrupted"
  procs = launch(work)
  _wait_for_checkpoint(procs[0], work / "checkpoints", 4)
  procs[1].send_signal(signal.SIGTERM)  # one host only
  outs = finish(procs)
  for p, out in zip(procs, outs):
    assert p.returncode == 143, out[-3000:]
  saved = [int(m) for out in outs for m in
           __import__("re").findall(r"process \d preempted: saved step (\d+)", out)]
  assert len(saved) == 2 and saved[0] == saved[1] < 16, saved
  assert not (work / "export").exists()

  ref_procs = launch(tmp_path / "ref")
  for p, out in zip(ref_procs, finish(ref_procs)):
    assert p.returncode == 0, out[-3000:]
  procs = launch(work)
  outs = finish(procs)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert f"resumed from step {saved[0]}" in outs[0]
  for a, b in zip(jax.tree.leaves(_params(tmp_path / "ref" / "export")),
                  jax.tree.leaves(_params(work / "export"))):
    np.testing.assert_array_equal(a, b)
