"""Attention kernels (model/attention.py): chunked and splash equal the xla reference, with
GQA, odd lengths and document masking; splash under an 8-device mesh; whole-model logits,
gradients and greedy decoding do not depend on the kernel; the load() override."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax.inference import generate as gen
from flexolmo_jax.model import FlexOlmo, ModelConfig
from flexolmo_jax.model.attention import attend
from flexolmo_jax.parallel import DEFAULT_RULES, make_mesh
from model_utils import random_ids, random_params, tiny_config


def _cfg(impl, heads, kv_heads, chunk, **kw):
  return ModelConfig(vocab_size=8, d_model=heads * 8, n_layers=1, n_heads=heads,
                     n_kv_heads=kv_heads, dtype="float32", attention=impl, attention_chunk=chunk,
                     **kw)


def _qkv(B, T, H, K, D, seed=0):
  r = np.random.default_rng(seed)
  return (jnp.asarray(r.normal(size=(B, T, H, D)), jnp.float32),
          jnp.asarray(r.normal(size=(B, T, K, D)), jnp.float32),
          jnp.asarray(r.normal(size=(B, T, K, D)), jnp.float32))


def _segments(B, T, seed=0):
  """Sorted document ids per row, some documents starting inside a block."""
  r = np.random.default_rng(seed)
  return jnp.asarray(np.sort(r.integers(0, 4, (B, T)), axis=1), jnp.int32)


def _run(cfg, q, k, v, seg):
  return jax.jit(lambda q, k, v, s: attend(q, k, v, cfg, segment_ids=s))(q, k, v, seg)


# (B, T, H, K, D, chunk): GQA, MQA, MHA; T not a block multiple, T below one block.
SHAPES = [(2, 37, 4, 2, 16, 8), (1, 30, 4, 1, 8, 16), (2, 5, 2, 2, 8, 512)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("segments", [False, True])
def test_chunked_matches_xla(shape, segments):
  B, T, H, K, D, chunk = shape
  q, k, v = _qkv(B, T, H, K, D)
  seg = _segments(B, T) if segments else None
  ref = _run(_cfg("xla", H, K, chunk), q, k, v, seg)
  out = _run(_cfg("chunked", H, K, chunk), q, k, v, seg)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl,segments", [("chunked", False), ("chunked", True),
                                           ("splash", True)])
def test_gradients_match_xla(impl, segments):
  B, T, H, K, D, chunk = SHAPES[0]
  q, k, v = _qkv(B, T, H, K, D, seed=1)
  seg = _segments(B, T, seed=1) if segments else None
  w = jnp.cos(jnp.arange(B * T * H * D, dtype=jnp.float32)).reshape(B, T, H, D)

  def grads(impl):
    cfg = _cfg(impl, H, K, chunk)
    loss = lambda q, k, v: jnp.sum(w * attend(q, k, v, cfg, segment_ids=seg))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(grads(impl), grads("xla")):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


# Pallas interpret mode is slow on CPU: few, small shapes (the kernel's blocks are 128 long).
@pytest.mark.parametrize("shape,segments", [((2, 37, 4, 2, 16, 128), True),
                                            ((1, 200, 2, 1, 8, 128), False)])
def test_splash_interpret_matches_xla(shape, segments):
  B, T, H, K, D, chunk = shape
  q, k, v = _qkv(B, T, H, K, D, seed=2)
  seg = _segments(B, T, seed=2) if segments else None
  cfg = _cfg("splash", H, K, chunk)
  assert cfg.kernel_platform == "cpu"  # so the kernel runs in interpret mode
  ref = _run(_cfg("xla", H, K, chunk), q, k, v, seg)
  np.testing.assert_allclose(np.asarray(_run(cfg, q, k, v, seg)), np.asarray(ref), atol=1e-5,
                             rtol=0)


def test_splash_under_mesh_shard_map():
  """data=2 x fsdp=2 x tensor=2: batch over (data, fsdp), heads over tensor, same numbers."""
  B, T, H, K, D = 4, 20, 4, 2, 8
  q, k, v = _qkv(B, T, H, K, D, seed=3)
  seg = _segments(B, T, seed=3)
  cfg = _cfg("splash", H, K, 128)
  mesh = make_mesh(dict(data=2, fsdp=2, expert=1, tensor=2))
  fn = jax.jit(lambda q, k, v, s: attend(q, k, v, cfg, segment_ids=s))
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, seg))
    out = fn(q, k, v, seg)
  ref = _run(_cfg("xla", H, K, 128), q, k, v, seg)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def dense():
  """A tiny dense model (attention is what differs between kernels); params built once."""
  cfg = tiny_config(num_experts=0, attention_chunk=4)
  return cfg, random_params(cfg, seed=5)


def test_model_logits_and_document_masking(dense):
  """FlexOlmo logits equal across kernels (with and without segment ids); with segment ids
  and restarted positions, the second packed document's logits are those of it alone."""
  cfg, params = dense
  ids = random_ids(cfg, batch=2, length=13)
  seg = jnp.asarray([[0] * 6 + [1] * 7] * 2, jnp.int32)
  pos = jnp.asarray([list(range(6)) + list(range(7))] * 2, jnp.int32)

  def logits(impl, **kw):
    c = cfg.replace(attention=impl)
    return np.asarray(jax.jit(lambda p, i: FlexOlmo(c).apply({"params": p}, i, **kw)[0])(
        params, ids))
  plain = logits("xla")
  np.testing.assert_allclose(logits("chunked"), plain, atol=1e-5, rtol=0)
  ref = logits("xla", segment_ids=seg, positions=pos)
  for impl in ("chunked", "splash"):
    np.testing.assert_allclose(logits(impl, segment_ids=seg, positions=pos), ref, atol=1e-5,
                               rtol=0, err_msg=impl)
  alone = jax.jit(lambda p, i: FlexOlmo(cfg).apply({"params": p}, i)[0])(params, ids[:, 6:])
  np.testing.assert_allclose(ref[:, 6:], np.asarray(alone), atol=1e-5, rtol=0)
  assert not np.allclose(plain[:, 6:], ref[:, 6:], atol=1e-3)  # the mask matters


def test_model_gradients_chunked_match_xla(dense):
  cfg, params = dense
  ids = random_ids(cfg, batch=2, length=11)

  def grads(impl):
    model = FlexOlmo(cfg.replace(attention=impl))
    loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, ids)[0])[..., 0])
    return jax.jit(jax.grad(loss))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                                                       rtol=0), grads("chunked"), grads("xla"))


def test_greedy_decode_with_chunked_config(dense):
  """KV-cache generation (prefill + decode steps: the xla maths, whatever cfg.attention says)
  gives the tokens of re-running the whole sequence without a cache through the chunked
  kernel (right-padded to one width: causal, so the padding is never seen)."""
  cfg, params = dense
  cfg = cfg.replace(attention="chunked")
  prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, 7).tolist()
  s = gen.Sampling(max_new_tokens=8, stop_at_eos=False)
  out = gen.generate(params, cfg, [prompt], s)[0]
  fwd = jax.jit(lambda p, i: FlexOlmo(cfg).apply({"params": p}, i)[0])
  seq = list(prompt)
  for _ in range(8):
    ids = np.full((1, 16), cfg.pad_token_id, np.int32)
    ids[0, :len(seq)] = seq
    seq.append(int(jnp.argmax(fwd(params, jnp.asarray(ids))[0, len(seq) - 1])))
  assert seq[len(prompt):] == out


def test_cudnn_needs_a_gpu():
  q, k, v = _qkv(1, 8, 2, 2, 8)
  with pytest.raises(ValueError, match="only on GPU"):
    attend(q, k, v, _cfg("cudnn", 2, 2, 8))


def test_load_attention_override(tmp_path, dense):
  from eval_utils import save_model
  import flexolmo_jax
  cfg, params = dense
  save_model(tmp_path / "m", cfg, params=params)
  assert flexolmo_jax.load(tmp_path / "m").config.attention == "xla"
  assert flexolmo_jax.load(tmp_path / "m", attention="chunked").config.attention == "chunked"
  with pytest.raises(ValueError, match="attention"):
    flexolmo_jax.load(tmp_path / "m", attention="flash")


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_document_mask_from_eos(impl):
  """cfg.document_mask: segments end after each EOS; the second packed document's logits
  equal that document run alone (RoPE depends on position differences only)."""
  cfg = tiny_config(num_experts=0, attention=impl, document_mask=True, attention_chunk=8)
  params = random_params(cfg)
  ids = np.array(random_ids(cfg, batch=1, length=21, seed=3))
  ids[ids == cfg.eos_token_id] = cfg.eos_token_id + 1
  ids[0, 8] = cfg.eos_token_id  # document 1 = tokens 0..8, document 2 = tokens 9..20
  run = lambda c, x: np.asarray(FlexOlmo(c).apply({"params": params}, jnp.asarray(x))[0])
  packed = run(cfg, ids)
  alone = run(cfg, ids[:, 9:])
  np.testing.assert_allclose(packed[:, 9:], alone, rtol=1e-4, atol=1e-4)
  unmasked = run(cfg.replace(document_mask=False), ids)
  np.testing.assert_allclose(packed[:, :9], unmasked[:, :9], rtol=1e-5, atol=1e-5)
  assert np.abs(packed[:, 9:] - unmasked[:, 9:]).max() > 1e-3  # the mask changed something
