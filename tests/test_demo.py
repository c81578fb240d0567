"""The main job end to end at tiny scale: every stage's output exists, transformers agrees,
and a second run resumes (skips every finished stage)."""
import json
import os
import subprocess
import sys

import pytest

from train_utils import ROOT

# About 2.5 minutes on 2 cores: the largest single test, and the one that proves the README's
# main command works end to end.


def test_demo_tiny_end_to_end_and_resume(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "flexolmo_jax.demo", f"--workdir={tmp_path}", "--scale=tiny"]
  first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  for path in ["flexmix_mini/flexmix_mini.json", "public/export/model_config.json",
               "embeddings/math.npy", "expert_code/export/model_config.json",
               "expert_math/export/model_config.json", "expert_legal/export/model_config.json",
               "merged/model_config.json", "flexmix_mini/proxy_math/1.0.0",
               "router/export/model_config.json", "eval/merged_untuned/results.json",
               "eval/merged/results.json", "eval/merged/routing.png",
               "eval/baselines.json", "eval/extraction/results.json", "hf/config.json", "training_curves.png", "report.md"]:
    assert (tmp_path / path).exists(), path
  check = json.loads((tmp_path / "hf_check.json").read_text())
  assert check["class"] == "FlexOlmoForCausalLM" and check["max_abs_diff"] <= 1e-4
  report = (tmp_path / "report.md").read_text()
  for row in ["| public |", "merged: all experts", "merged: -math", "merged: public only",
              "merged before router tuning",
              "model soup", "BTM ensemble", "Findings:", "Verbatim extraction",
              "- opting out math: extracted", "Downstream accuracy", "- downstream: merged"]:
    assert row in report, row
  # The merged model with only the public expert is the public model.
  rows = json.loads((tmp_path / "eval" / "merged" / "results.json").read_text())["rows"]
  public = json.loads((tmp_path / "eval" / "public" / "results.json").read_text())["rows"]
  pub_row = next(iter(public.values()))
  for d in ("public", "code", "math", "legal"):
    assert abs(rows["public only"]["perplexity"][d]["loss"] - pub_row["perplexity"][d]["loss"]) < 1e-3

  second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  for stage in ("1/9", "2/9", "3/9", "4/9", "5/9", "6/9", "7/9", "8/9"):  # every stage skipped
    assert f"] {stage}" not in second.stdout, stage
  assert "9/9 report" in second.stdout

  # Without router tuning the report is about the stitched model: evaluation and export are
  # redone for it rather than reused from the tuned one.
  third = subprocess.run(cmd + ["--no-router-tuning"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
  assert third.returncode == 0, third.stderr[-3000:]
  assert "] 7/9" in third.stdout and "] 8/9" in third.stdout
  check = json.loads((tmp_path / "hf_check.json").read_text())
  assert check["model"] == str(tmp_path / "merged") and check["matches_1e-4"]
  merged = json.loads((tmp_path / "eval" / "merged" / "results.json").read_text())
  assert merged["model"]["path"] == str(tmp_path / "merged")
  assert "merged before router tuning" not in (tmp_path / "report.md").read_text()


def _stamp_module(tmp_path):
  """A module `stamp` whose run appends 'NAME start/end' to LOG (sleeping SECONDS between)."""
  (tmp_path / "stamp.py").write_text(
      "import sys, time\n"
      "name, log, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])\n"
      "open(log, 'a').write(f'{name} start\\n')\n"
      "time.sleep(seconds)\n"
      "open(log, 'a').write(f'{name} end\\n')\n"
      "sys.exit(3 if name == 'fail' else 0)\n")


def test_stage_graph_runs_each_job_after_what_it_needs(tmp_path):
  """Demo.run_parallel with dependencies: a job starts only after the jobs it names, the
  free slot takes the first ready job in priority order, a job's stage heading prints once,
  and jobs that wait on each other are an error, not a hang."""
  from flexolmo_jax.experiments.demo import Demo, Job
  _stamp_module(tmp_path)
  log = tmp_path / "order.log"
  demo = Demo(tmp_path / "work", "tiny", jobs=2, env={"PYTHONPATH": str(tmp_path)})
  job = lambda name, after=(), secs=0.3, title="": Job(
      ["stamp", name, str(log), str(secs)], name, after, title)
  # b needs a; c is free, so c runs beside a and b after a; d needs b and c; "elsewhere"
  # is not in this run (already done), so it does not hold e back.
  demo.run_parallel([job("a", secs=3.0, title="first stage"), job("b", ("a",), title="first stage"),
                     job("c"), job("d", ("b", "c"), title="second stage"),
                     job("e", ("elsewhere",))])
  lines = log.read_text().splitlines()
  at = {line: i for i, line in enumerate(lines)}
  assert at["b start"] > at["a end"] and at["c start"] < at["a end"], lines
  assert at["d start"] > at["b end"] and at["d start"] > at["c end"], lines
  assert at["e start"] < at["a end"], lines  # free, and first of the ready ones after c

  log.unlink()
  demo.jobs = 1  # one after another, still in dependency order
  demo.run_parallel([job("y", ("x",)), job("x")])
  assert log.read_text().splitlines() == ["x start", "x end", "y start", "y end"]

  with pytest.raises(SystemExit, match="wait on each other"):
    demo.run_parallel([job("p", ("q",)), job("q", ("p",))])
  demo.jobs = 2
  with pytest.raises(SystemExit, match="stage failed"):
    demo.run_parallel([job("fail"), job("after_fail", ("fail",))])
  assert "after_fail start" not in log.read_text()


def test_stage_headings_print_once_at_their_first_job(tmp_path, capsys):
  from flexolmo_jax.experiments.demo import Demo, Job
  _stamp_module(tmp_path)
  demo = Demo(tmp_path / "work", "tiny", jobs=2, env={"PYTHONPATH": str(tmp_path)})
  log = str(tmp_path / "o.log")
  demo.run_parallel([Job(["stamp", n, log, "0.1"], n, (), "7/9 evaluating") for n in "uvw"])
  assert capsys.readouterr().out.count("] 7/9 evaluating") == 1
