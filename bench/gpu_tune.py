"""Block-size and warp sweep for the Pallas attention and log-prob kernels on one GPU.

  python bench/gpu_tune.py [--out gpu_tune.json] [--only attention,pallas-logprobs,xla-logprobs] [--smoke]

Attention: causal bf16, B=4, T=4096, 16/4 heads, head dim 128, forward+backward, against cuDNN in the
same run. Pallas log-prob: 8192 rows, H=4096, V=128256 bf16, forward. XLA log-prob: the same shapes,
forward and forward+backward for several (forward row chunk, backward vocabulary chunk) pairs, with
XLA's temporary bytes, against log_softmax + gather in the same run. ``--smoke`` runs the XLA log-prob
sweep at tiny shapes, to check the script on CPU.
"""

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernels import _gib, guarded, max_diff, temp_bytes, timed  # noqa: E402
from jalign.kernels import attention, logprobs  # noqa: E402
from jalign.kernels.attention_pallas import attention_pallas  # noqa: E402
from jalign.kernels.logprobs_pallas import token_logprobs_pallas  # noqa: E402


def attention_sweep(rows):
  b, t, hq, hkv, d = 4, 4096, 16, 4, 128
  key = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(key[0], (b, t, hq, d), jnp.bfloat16)
  k = jax.random.normal(key[1], (b, t, hkv, d), jnp.bfloat16)
  v = jax.random.normal(key[2], (b, t, hkv, d), jnp.bfloat16)
  do = jax.random.normal(key[3], (b, t, hq, d), jnp.bfloat16)
  flops = 3.5 * 4 * b * hq * t * t * d / 2
  configs = {"cudnn": lambda q, k, v: attention.attention_cudnn(q, k, v)}
  for bq, bk, w, s in [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 8, 2),
                       (64, 128, 4, 2), (128, 32, 4, 2), (64, 32, 4, 3), (32, 64, 4, 2)]:
    configs[f"pallas q{bq} k{bk} w{w} s{s}"] = (
        lambda q, k, v, bq=bq, bk=bk, w=w, s=s: attention_pallas(q, k, v, block_q=bq, block_k=bk, num_warps=w,
                                                                  num_stages=s))
  for name, f in configs.items():
    def case(f=f):
      fwd = jax.jit(f)
      step = jax.jit(lambda q, k, v: (f(q, k, v), jax.vjp(f, q, k, v)[1](do)))
      t_fwd, t_all = timed(fwd, q, k, v, repeats=5), timed(step, q, k, v, repeats=5)
      return {"fwd_ms": 1e3 * t_fwd, "fwd_bwd_ms": 1e3 * t_all, "fwd_bwd_tflops": flops / t_all / 1e12}
    guarded(rows, {"kernel": "attention", "config": name, "seq": t}, case)


def logprob_inputs(n, h, vocab):
  key = jax.random.split(jax.random.PRNGKey(1), 3)
  hidden = jax.random.normal(key[0], (2, n // 2, h), jnp.bfloat16)
  lm_head = (jax.random.normal(key[1], (h, vocab), jnp.float32) * 0.02).astype(jnp.bfloat16)
  targets = jax.random.randint(key[2], (2, n // 2), 0, vocab)
  return hidden, lm_head, targets


def pallas_logprob_sweep(rows):
  n, h, vocab = 8192, 4096, 128256
  hidden, lm_head, targets = logprob_inputs(n, h, vocab)
  for br, bv, bh, w, s in [(64, 128, 64, 4, 2), (128, 128, 64, 8, 2), (128, 128, 64, 4, 3), (128, 256, 64, 8, 2),
                           (64, 256, 64, 8, 3), (128, 128, 128, 8, 2), (64, 128, 128, 4, 3), (128, 64, 64, 4, 3)]:
    f = lambda h_, w_, br=br, bv=bv, bh=bh, w=w, s=s: token_logprobs_pallas(
        h_, w_, targets, block_rows=br, block_vocab=bv, block_hidden=bh, num_warps=w, num_stages=s)
    guarded(rows, {"kernel": "token_logprobs", "config": f"r{br} v{bv} h{bh} w{w} s{s}"},
            lambda f=f: {"fwd_ms": 1e3 * timed(jax.jit(f), hidden, lm_head, repeats=5)})


def xla_logprob_sweep(rows, smoke=False):
  n, h, vocab = (1024, 64, 5000) if smoke else (8192, 4096, 128256)
  hidden, lm_head, targets = logprob_inputs(n, h, vocab)

  def naive(h_, w):
    logits = jnp.einsum("bth,hv->btv", h_, w, preferred_element_type=jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], -1)[..., 0]

  configs = {"naive": naive}
  for chunk, vocab_chunk in [(256, 2048), (512, 2048), (1024, 2048), (256, 4096), (256, 8192), (512, 4096),
                             (256, 1024)]:
    configs[f"xla r{chunk} v{vocab_chunk}"] = (
        lambda h_, w, c=chunk, vc=vocab_chunk: logprobs.token_logprobs_xla(h_, w, targets, chunk=c, vocab_chunk=vc))
  if smoke:  # small enough for plain autodiff otherwise: force the chunked path
    logprobs.PLAIN_MAX_LOGITS_BYTES = 0
  ref_grad = None
  for name, f in configs.items():
    def case(f=f, name=name):
      loss = lambda h_, w: jnp.sum(f(h_, w))
      fwd, fwd_bwd = jax.jit(f), jax.jit(jax.value_and_grad(loss, (0, 1)))
      nonlocal ref_grad
      out = {}
      if ref_grad is None:
        ref_grad = fwd_bwd(hidden, lm_head)[1]
      else:
        out["grad_max_diff"] = max_diff(fwd_bwd(hidden, lm_head)[1], ref_grad)
      out.update(fwd_ms=1e3 * timed(fwd, hidden, lm_head, repeats=5),
                 fwd_bwd_ms=1e3 * timed(fwd_bwd, hidden, lm_head, repeats=5),
                 fwd_temp_gib=_gib(temp_bytes(f, hidden, lm_head)),
                 fwd_bwd_temp_gib=_gib(temp_bytes(jax.value_and_grad(loss, (0, 1)), hidden, lm_head)))
      return out
    guarded(rows, {"kernel": "token_logprobs_xla", "config": name}, case)
  naive_row = rows[-len(configs)]
  for r in rows[-len(configs):]:
    if "fwd_bwd_ms" in r and "fwd_bwd_ms" in naive_row:
      r["speedup_fwd"] = naive_row["fwd_ms"] / r["fwd_ms"]
      r["speedup_fwd_bwd"] = naive_row["fwd_bwd_ms"] / r["fwd_bwd_ms"]
      print(f"  {r['config']}: {r['speedup_fwd']:.2f}x / {r['speedup_fwd_bwd']:.2f}x naive", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="gpu_tune.json")
  parser.add_argument("--only", default="attention,pallas-logprobs,xla-logprobs")
  parser.add_argument("--smoke", action="store_true", help="the XLA log-prob sweep at tiny shapes")
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  rows = []
  sweeps = {"attention": attention_sweep, "pallas-logprobs": pallas_logprob_sweep,
            "xla-logprobs": lambda r: xla_logprob_sweep(r, args.smoke)}
  for name in args.only.split(","):
    print(f"== {name}", flush=True)
    sweeps[name](rows)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
