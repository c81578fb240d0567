"""Generation: KV-cache decoding equals the full forward, per-example expert masks equal
running each example alone, sampling controls, and the command line."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval_utils import save_model, tiny_moe_config
from flexolmo_jax.inference import generate as gen
from flexolmo_jax.inference import generate_cli as gen_cli
from flexolmo_jax.model import FlexOlmo, expert_mask
from model_utils import random_params, tiny_config


@functools.lru_cache(maxsize=None)
def _jit_forward(cfg):
  return jax.jit(lambda p, x, m: FlexOlmo(cfg).apply({"params": p}, x, expert_mask=m)[0])


def _greedy_reference(cfg, params, prompt, n, exclude=()):
  """No cache, no padding in front: re-run the whole (right-padded, causal) sequence for
  every new token and read the logits at its last real position."""
  seq = list(prompt)
  mask = jnp.asarray(expert_mask(cfg.names, list(exclude), 1)) if cfg.is_moe else None
  fwd = _jit_forward(cfg)
  width = 32
  assert len(prompt) + n <= width
  for _ in range(n):
    ids = np.full((1, width), cfg.pad_token_id, np.int32)
    ids[0, :len(seq)] = seq
    logits = fwd(params, jnp.asarray(ids), mask)
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


@pytest.mark.parametrize("dispatch", ["dense"])  # the CPU default; dropless: test_decode.py
def test_per_example_mask_equals_each_example_alone(dispatch):
  cfg = tiny_config(num_experts=4, top_k=2, dispatch=dispatch, expert_names=("public", "a", "b", "c"))
  params = random_params(cfg, seed=3)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (3, 9, 5, 1)]
  excludes = [["a"], [], ["b", "c"], ["public", "a", "b"]]
  s = gen.Sampling(max_new_tokens=10, stop_at_eos=False)
  fn = gen.make_generate_fn(cfg, s)
  batch = gen.generate(params, cfg, prompts, s, excludes, fn=fn)
  changed = 0
  for p, ex, out in zip(prompts, excludes, batch):
    alone = gen.generate(params, cfg, [p], s, [ex], fn=fn)[0]
    assert out == alone
    assert out == _greedy_reference(cfg, params, p, 10, ex)
    changed += out != gen.generate(params, cfg, [p], s, fn=fn)[0]
  assert changed >= 2  # the exclusions matter for this model


def test_dense_model_and_eos_stop():
  cfg = tiny_config(num_experts=0)
  params = random_params(cfg, seed=1)
  prompt = [5, 6, 7, 8]
  ref = _greedy_reference(cfg, params, prompt, 6)
  out = gen.generate(params, cfg, [prompt], gen.Sampling(6, stop_at_eos=False))[0]
  assert out == ref
  eos = ref[2]
  stop = cfg.replace(eos_token_id=eos)  # a greedy token ends the answer (EOS kept)
  out = gen.generate(params, stop, [prompt, prompt[1:]], gen.Sampling(6))
  ref2 = _greedy_reference(cfg, params, prompt[1:], 6)
  assert out[0] == ref[:ref.index(eos) + 1]
  assert out[1] == (ref2[:ref2.index(eos) + 1] if eos in ref2 else ref2)
  with pytest.raises(ValueError, match="dense"):
    gen.generate(params, cfg, [prompt], gen.Sampling(2), ["a"])


def test_sampling_temperature_and_top_p():
  logits = jnp.asarray([[0.0, 3.0, 2.9, -1.0, 1.0]] * 64)
  key = jax.random.key(0)
  greedy = gen.sample_next(logits, key, gen.Sampling(1))
  assert np.all(np.asarray(greedy) == 1)
  nucleus = gen.sample_next(logits, key, gen.Sampling(1, temperature=1.0, top_p=1e-6))
  assert np.all(np.asarray(nucleus) == 1)  # the nucleus is the single most likely token
  two = np.asarray(gen.sample_next(logits, key, gen.Sampling(1, temperature=1.0, top_p=0.6)))
  assert set(two) == {1, 2}  # p(1) ~ 0.47 < 0.6: the nucleus is {1, 2}
  free = np.asarray(gen.sample_next(logits, key, gen.Sampling(1, temperature=5.0)))
  assert len(set(free)) >= 4
  limited = np.asarray(gen.sample_next(logits, key, gen.Sampling(1, temperature=5.0, vocab_limit=3)))
  assert set(limited) <= {0, 1, 2}
  with pytest.raises(ValueError):
    gen.Sampling(1, top_p=0.0)


def test_cli_per_example_exclusions(flexmix_tiny, tmp_path, capsys):
  tok = flexmix_tiny / "tokenizer.json"
  cfg = tiny_moe_config(tok)
  save_model(tmp_path / "m", cfg, seed=2)
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"prompt": "def add(a, b):", "exclude": ["math"]}) + "\n"
                     + json.dumps({"prompt": "The court"}) + "\n")
  out = tmp_path / "gen.jsonl"
  rc = gen_cli.main([f"--ckpt={tmp_path / 'm'}", f"--tokenizer={tok}", f"--prompts_file={prompts}",
                 "--prompt=x = 1", "--exclude=code", "--max_new_tokens=5", f"--out={out}"])
  assert rc == 0
  recs = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["exclude"] for r in recs] == [["code"], ["math"], ["code"]]
  assert all(1 <= len(r["tokens"]) <= 5 for r in recs)
  assert "def add(a, b):" in capsys.readouterr().out
  assert gen_cli.main([f"--ckpt={tmp_path / 'm'}", f"--tokenizer={tok}", "--prompt=hi",
                   "--exclude=news"]) == 1
  assert "unknown expert name 'news'" in capsys.readouterr().err
  assert gen_cli.main([f"--ckpt={tmp_path / 'm'}", "--prompt=hi"]) == 1
  assert "no tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_decoding_weights_in_compute_dtype_are_exact(dispatch):
  """bf16 compute: storing the matmul weights in bf16 changes no logit (dot casts anyway)."""
  cfg = tiny_config(dtype="bfloat16", dispatch=dispatch, expert_bias=True)
  params = random_params(cfg, seed=4)
  cast = gen.cast_for_decoding(params, cfg)
  dtypes = {jax.tree_util.keystr(k): v.dtype for k, v in jax.tree_util.tree_leaves_with_path(cast)}
  assert any(d == jnp.bfloat16 for d in dtypes.values())
  assert all(d == jnp.float32 for k, d in dtypes.items() if "scale" in k or "router" in k)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
  fwd = jax.jit(lambda p: FlexOlmo(cfg).apply({"params": p}, ids)[0])
  np.testing.assert_array_equal(np.asarray(fwd(params)), np.asarray(fwd(cast)))
