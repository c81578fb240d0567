"""Components of the bench-config model in isolation, each against its torch equivalent.

  python benchmarks/bench_components.py [--batch=8] [--seq=512] [--repeats=5]
      [--only=attention,moe,head,mlp] [--grad] [--skip-torch]

Where the step's time goes: attention block, MoE block (every dispatch), dense SwiGLU and
LM head + cross-entropy, each forward (or forward + backward with --grad) as one jitted
function, timed interleaved with the same block of transformers' FlexOlmo (layer 0 of the
peer model; torch CPU, bf16 autocast and fp32). Ratios are peer time / our time per round
(> 1: we are faster), with their spread. The last line is a JSON summary.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import hf_flexolmo, interleaved, peak_rss_mb, put_ratio, report, show_times  # noqa: E402
from flexolmo_jax.model import ModelConfig  # noqa: E402
from flexolmo_jax.model.layers import MLP, Attention  # noqa: E402
from flexolmo_jax.model.moe import MoE  # noqa: E402
from flexolmo_jax.train.losses import chunked_token_losses, token_losses  # noqa: E402
from flexolmo_jax.model.head import head_logits  # noqa: E402
import bench_model  # noqa: E402


def _ours(fn, params, *xs, grad: bool):
  """Jitted fn(params, *xs) -> array; with grad, the gradient of its sum wrt (params, x0)."""
  if grad:
    f = jax.jit(jax.grad(lambda p, x, *r: jnp.sum(fn(p, x, *r).astype(jnp.float32)), (0, 1)))
  else:
    f = jax.jit(fn)
  f = f.lower(params, *xs).compile()
  return lambda: jax.block_until_ready(f(params, *xs))


def _torch(fn, x, grad: bool, bf16: bool):
  import torch
  x = x.detach().clone().requires_grad_(grad)

  def run():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(grad):
      y = fn(x)
    if grad:
      y.float().sum().backward()
      x.grad = None
  return run


def components(cfg: ModelConfig, B: int, T: int, grad: bool, only, skip_torch: bool):
  """{component: {contender: runner}}."""
  rng = np.random.default_rng(0)
  h_np = rng.normal(size=(B, T, cfg.d_model)).astype(np.float32)
  h = jnp.asarray(h_np, jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  out = {}
  peer = None if skip_torch else hf_flexolmo(cfg, train=grad)
  if peer is not None:
    import torch
    th = torch.from_numpy(h_np)
    layer = peer.model.layers[0]
    rope = peer.model.rotary_emb(th, torch.arange(T)[None].expand(B, T))

  def with_peer(group: dict, fn):
    if peer is not None:
      group["torch_bf16"] = _torch(fn, th, grad, True)
      group["torch_fp32"] = _torch(fn, th, grad, False)
    return group

  if "attention" in only:
    group = {}
    for impl in ("xla", "chunked"):
      c = cfg.replace(attention=impl)
      m = Attention(c)
      p = m.init(jax.random.key(0), h, pos)
      tag = impl if impl == "xla" else f"{impl}{c.attention_chunk}"
      group[f"ours_{tag}"] = _ours(lambda p, x, m=m: m.apply(p, x, pos)[0], p, h, grad=grad)
    out["attention"] = with_peer(group, lambda x: layer.self_attn(x, rope, None)[0])
  if "moe" in only:
    group = {}
    for name, kw in (("dense", dict(dispatch="dense")),
                     ("cap_gather", dict(dispatch="capacity", capacity_impl="gather")),
                     ("cap_einsum", dict(dispatch="capacity", capacity_impl="einsum")),
                     ("dropless_select", dict(dispatch="dropless", grouped_matmul="select")),
                     ("dropless_ragged", dict(dispatch="dropless", grouped_matmul="ragged_dot"))):
      m = MoE(cfg.replace(**kw))
      p = m.init(jax.random.key(0), h)
      group[f"ours_{name}"] = _ours(lambda p, x, m=m: m.apply(p, x)[0], p, h, grad=grad)
    out["moe"] = with_peer(group, lambda x: layer.mlp(x))
  if "mlp" in only:
    # The dense SwiGLU with the MoE's active FFN width (top_k * ffn_hidden).
    dcfg = cfg.replace(num_experts=0, ffn_hidden=cfg.ffn_hidden * cfg.top_k)
    m = MLP(dcfg)
    p = m.init(jax.random.key(0), h)
    group = {"ours": _ours(lambda p, x: m.apply(p, x), p, h, grad=grad)}
    if peer is not None:
      import torch.nn.functional as F
      w1, w3 = (torch.randn(dcfg.ffn_hidden, cfg.d_model) * 0.02 for _ in range(2))
      w2 = torch.randn(cfg.d_model, dcfg.ffn_hidden) * 0.02
      for w in (w1, w3, w2):
        w.requires_grad_(grad)
      group = with_peer(group, lambda x: F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2))
    out["mlp"] = group
  if "head" in only:
    # Final-norm output -> logits -> mean cross-entropy (what the training loss does).
    w = jnp.asarray(rng.normal(size=(cfg.d_model, cfg.vocab_size)) * 0.02, jnp.float32)
    tgt = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)

    def full(w, x):
      ce, lse = token_losses(head_logits(x, w, cfg), tgt)
      return jnp.mean(ce) + 1e-4 * jnp.mean(jnp.square(lse))

    def chunked(w, x):
      ce, lse = chunked_token_losses(x, w, tgt, cfg.replace(logits_chunk=128))
      return jnp.mean(ce) + 1e-4 * jnp.mean(jnp.square(lse))
    group = {"ours_full": _ours(full, w, h, grad=grad),
             "ours_chunk128": _ours(chunked, w, h, grad=grad)}
    if peer is not None:
      import torch.nn.functional as F
      tt = torch.from_numpy(np.asarray(tgt, np.int64)).reshape(-1)
      lm = peer.lm_head
      group = with_peer(group, lambda x: F.cross_entropy(lm(x).float().reshape(-1, cfg.vocab_size), tt))
    out["head"] = group
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--only", default="attention,moe,mlp,head")
  ap.add_argument("--grad", action="store_true", help="forward + backward")
  ap.add_argument("--skip-torch", action="store_true")
  args = ap.parse_args()
  cfg = ModelConfig(**bench_model.BENCH)
  groups = components(cfg, args.batch, args.seq, args.grad, args.only.split(","), args.skip_torch)
  res = {"backend": jax.default_backend(), "grad": args.grad}
  for comp, fns in groups.items():
    print(f"{comp} ({'fwd+bwd' if args.grad else 'fwd'}):")
    times = interleaved(fns, args.repeats, warmup=1)
    show_times(times)
    for name, ts in times.items():
      res[f"{comp}_{name}_ms"] = float(np.median(ts)) * 1e3
    peers = [n for n in fns if n.startswith("torch")]
    for name in fns:
      if name.startswith("ours"):
        for p in peers:
          put_ratio(res, f"{comp}_{p}_over_{name}", times[p], times[name])
  res["peak_rss_mb"] = peak_rss_mb()
  report(res)


if __name__ == "__main__":
  main()
