"""Block-size and warp sweep for the Pallas attention and log-prob kernels on one GPU.

  python bench/gpu_tune.py [--out gpu_tune.json]

Attention: causal bf16, B=4, T=4096, 16/4 heads, head dim 128, forward+backward, against cuDNN in the
same run. Log-prob: 8192 rows, H=4096, V=128256 bf16, forward (and forward+backward for the two
fastest forward configurations), against log_softmax + gather.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernels import guarded, timed  # noqa: E402
from jalign.kernels import attention  # noqa: E402
from jalign.kernels.attention_pallas import attention_pallas  # noqa: E402
from jalign.kernels.logprobs_pallas import token_logprobs_pallas  # noqa: E402


def main():
  out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "gpu_tune.json"
  rows = []
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
  Path(out).write_text(json.dumps(rows, indent=1))

  n, h, vocab = 8192, 4096, 128256
  key = jax.random.split(jax.random.PRNGKey(1), 3)
  hidden = jax.random.normal(key[0], (2, n // 2, h), jnp.bfloat16)
  lm_head = (jax.random.normal(key[1], (h, vocab), jnp.float32) * 0.02).astype(jnp.bfloat16)
  targets = jax.random.randint(key[2], (2, n // 2), 0, vocab)
  for br, bv, bh, w, s in [(64, 128, 64, 4, 2), (128, 128, 64, 8, 2), (128, 128, 64, 4, 3), (128, 256, 64, 8, 2),
                           (64, 256, 64, 8, 3), (128, 128, 128, 8, 2), (64, 128, 128, 4, 3), (128, 64, 64, 4, 3)]:
    f = lambda h_, w_, br=br, bv=bv, bh=bh, w=w, s=s: token_logprobs_pallas(
        h_, w_, targets, block_rows=br, block_vocab=bv, block_hidden=bh, num_warps=w, num_stages=s)
    guarded(rows, {"kernel": "token_logprobs", "config": f"r{br} v{bv} h{bh} w{w} s{s}"},
            lambda f=f: {"fwd_ms": 1e3 * timed(jax.jit(f), hidden, lm_head, repeats=5)})
  Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
