"""GPU kernel benchmark: attention, fused token log-prob and decode attention, every implementation.

  python bench/gpu_kernels.py [--out gpu_kernels.json] [--smoke]

Prints one table per kernel and writes all figures (and the device's name) to a JSON file. Each case
first checks the implementation against the XLA one on the same inputs (max abs difference), then
times it (median of several runs after warm-up). A case that fails to compile or run is reported with
its error and the rest go on. Sized to finish in under 5 minutes on one H100; ``--smoke`` runs tiny
shapes (on CPU, Pallas in interpret mode) to check the script itself.

Attention: causal, bf16, head dim 128, 16 query / 4 KV heads, batch x sequence = 16k tokens;
TFLOP/s counts the causal half of the matmuls (forward 4*B*H*T*T*D/2; forward+backward 3.5x that).
Log-prob: hidden [B*T, H] @ lm_head [H, 128256], against log_softmax + gather; memory is XLA's
compiled temporary bytes (``memory_analysis``), inputs and outputs excluded.
Decode: one token per row against a bf16 KV cache with ragged lengths.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jalign.kernels import attention, logprobs  # noqa: E402
from jalign.kernels.attention_pallas import attention_pallas  # noqa: E402
from jalign.kernels.decode_pallas import decode_attention_pallas  # noqa: E402
from jalign.kernels.logprobs_pallas import token_logprobs_pallas  # noqa: E402


def timed(fn, *args, repeats=10, warmup=2):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def temp_bytes(fn, *args):
  try:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes)
  except Exception:  # not every backend reports it
    return None


def max_diff(a, b):
  leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in leaves)


def guarded(results, row, fn):
  try:
    row.update(fn())
  except Exception as e:  # report and go on: one kernel failing must not hide the others
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    traceback.print_exc(limit=3)
  results.append(row)
  print("  ", json.dumps(row), flush=True)


def attention_cases(args):
  lengths = (64, 128) if args.smoke else (1024, 2048, 4096, 8192)
  hq, hkv, d, tokens = (4, 2, 32, 256) if args.smoke else (16, 4, 128, 16384)
  impls = {
      "xla": lambda q, k, v: attention.attention_xla(q, k, v, causal=True),
      "cudnn": lambda q, k, v: attention.attention_cudnn(q, k, v, causal=True),
      "pallas": lambda q, k, v: attention_pallas(q, k, v),
  }
  results = []
  for t in lengths:
    b = max(1, tokens // t)
    key = jax.random.split(jax.random.PRNGKey(t), 4)
    q = jax.random.normal(key[0], (b, t, hq, d), jnp.bfloat16)
    k = jax.random.normal(key[1], (b, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(key[2], (b, t, hkv, d), jnp.bfloat16)
    do = jax.random.normal(key[3], (b, t, hq, d), jnp.bfloat16)
    flops = 4 * b * hq * t * t * d / 2
    grads = lambda f: jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](do))
    # One forward and one backward in one program, as a training step runs them.
    step = lambda f: jax.jit(lambda q, k, v: (f(q, k, v), jax.vjp(f, q, k, v)[1](do)))
    ref_out = jax.jit(impls["xla"])(q, k, v) if t <= 4096 else None
    ref_grad = grads(impls["xla"])(q, k, v) if t <= 4096 else None
    for name, f in impls.items():
      def case(f=f, name=name):
        fwd, fwd_bwd = jax.jit(f), grads(f)
        out = {}
        if ref_out is not None and name != "xla":
          out["fwd_max_diff"] = max_diff(fwd(q, k, v), ref_out)
          out["bwd_max_diff"] = max_diff(fwd_bwd(q, k, v), ref_grad)
        t_fwd = timed(fwd, q, k, v)
        t_all = timed(step(f), q, k, v)
        out.update(fwd_ms=1e3 * t_fwd, fwd_bwd_ms=1e3 * t_all, fwd_tflops=flops / t_fwd / 1e12,
                   fwd_bwd_tflops=3.5 * flops / t_all / 1e12)
        return out
      guarded(results, {"kernel": "attention", "impl": name, "seq": t, "batch": b}, case)
  return results


def logprob_cases(args):
  n, h, vocab = (256, 64, 1000) if args.smoke else (8192, 4096, 128256)
  key = jax.random.split(jax.random.PRNGKey(1), 4)
  hidden = jax.random.normal(key[0], (2, n // 2, h), jnp.bfloat16)
  lm_head = (jax.random.normal(key[1], (h, vocab), jnp.float32) * 0.02).astype(jnp.bfloat16)
  targets = jax.random.randint(key[2], (2, n // 2), 0, vocab)

  def naive(h_, w):
    logp = jax.nn.log_softmax(jnp.einsum("bth,hv->btv", h_, w, preferred_element_type=jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]

  impls = {"naive": naive,
           "xla chunked": lambda h_, w: logprobs.token_logprobs_xla(h_, w, targets),
           "pallas": lambda h_, w: token_logprobs_pallas(h_, w, targets)}
  ref = jax.jit(naive)(hidden, lm_head)
  ref_grad = jax.jit(jax.grad(lambda h_, w: jnp.sum(naive(h_, w)), (0, 1)))(hidden, lm_head)
  results = []
  for name, f in impls.items():
    def case(f=f, name=name):
      fwd = jax.jit(f)
      fwd_bwd = jax.jit(jax.value_and_grad(lambda h_, w: jnp.sum(f(h_, w)), (0, 1)))
      out = {"fwd_max_diff": max_diff(fwd(hidden, lm_head), ref),
             "grad_max_diff": max_diff(fwd_bwd(hidden, lm_head)[1], ref_grad)}
      out.update(fwd_ms=1e3 * timed(fwd, hidden, lm_head), fwd_bwd_ms=1e3 * timed(fwd_bwd, hidden, lm_head),
                 fwd_temp_gib=_gib(temp_bytes(f, hidden, lm_head)),
                 fwd_bwd_temp_gib=_gib(temp_bytes(jax.value_and_grad(lambda h_, w: jnp.sum(f(h_, w)), (0, 1)),
                                                  hidden, lm_head)))
      return out
    guarded(results, {"kernel": "token_logprobs", "impl": name, "rows": n, "hidden": h, "vocab": vocab}, case)
  return results


def _gib(b):
  return None if b is None else b / 2**30


def decode_cases(args):
  b, s, hq, hkv, d = (4, 256, 8, 2, 32) if args.smoke else (32, 8192, 32, 8, 128)
  key = jax.random.split(jax.random.PRNGKey(2), 3)
  q = jax.random.normal(key[0], (b, hq, d), jnp.bfloat16)
  k = jax.random.normal(key[1], (b, s, hkv, d), jnp.bfloat16)
  v = jax.random.normal(key[2], (b, s, hkv, d), jnp.bfloat16)
  rng = np.random.default_rng(0)
  results = []
  for label, lengths in (("full", np.full(b, s)), ("ragged", rng.integers(1, s + 1, b))):
    lengths = jnp.asarray(lengths, jnp.int32)
    xla = jax.jit(attention.decode_attention_xla)
    ref = xla(q, k, v, lengths)
    kv_bytes = 2 * int(jnp.sum(lengths)) * hkv * d * 2
    for name, f in (("xla", xla), ("pallas", jax.jit(decode_attention_pallas))):
      def case(f=f):
        t = timed(f, q, k, v, lengths, repeats=20)
        return {"max_diff": max_diff(f(q, k, v, lengths), ref), "us": 1e6 * t,
                "valid_kv_gb_per_s": kv_bytes / t / 1e9}
      guarded(results, {"kernel": "decode_attention", "impl": name, "lengths": label, "batch": b, "cache": s}, case)
  return results


def print_table(rows):
  keys = [k for k in rows[0] if k not in ("kernel",)]
  for r in rows[1:]:
    keys += [k for k in r if k not in keys and k != "kernel"]
  print(" | ".join(keys))
  for r in rows:
    print(" | ".join(_fmt(r.get(k, "")) for k in keys))


def _fmt(x):
  return f"{x:.4g}" if isinstance(x, float) else str(x)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="gpu_kernels.json")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on CPU")
  parser.add_argument("--only", default="attention,logprobs,decode")
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  report = {"device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__, "rows": []}
  start = time.time()
  for name, fn in (("decode", decode_cases), ("attention", attention_cases), ("logprobs", logprob_cases)):
    if name in args.only.split(","):
      print(f"== {name}", flush=True)
      rows = fn(args)
      report["rows"] += rows
      Path(args.out).write_text(json.dumps(report, indent=1))
  for kernel in ("attention", "token_logprobs", "decode_attention"):
    rows = [r for r in report["rows"] if r["kernel"] == kernel]
    if rows:
      print(f"\n## {kernel}")
      print_table(rows)
  print(f"\ntotal {time.time() - start:.0f} s; wrote {args.out}")


if __name__ == "__main__":
  main()
