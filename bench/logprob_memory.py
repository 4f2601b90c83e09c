"""Peak memory and time of the fused token log-prob against log_softmax + gather, each case in a fresh process.

  python bench/logprob_memory.py [--batch 2] [--seq 2048] [--vocab 128256] [--hidden 2048] [--impl xla]

Memory is the peak resident memory while the computation runs, above what the process held just
before it (inputs allocated, step compiled), minus the bytes of what it returns (log-probs, or the
gradients for hidden and lm_head). It is sampled every millisecond. Time is a second run. With ``--rounds`` > 1 every case runs that many times,
the cases interleaved so that a slow spell of the machine falls on all of them; the table gives each case's
fastest time and largest memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

CASES = ("naive forward", "fused forward", "naive forward+backward", "fused forward+backward")


def run_case(case: str, args) -> dict:
  import jax
  import jax.numpy as jnp
  import psutil

  from jalign.kernels import token_logprobs

  key = jax.random.PRNGKey(0)
  k1, k2, k3 = jax.random.split(key, 3)
  hidden = jax.random.normal(k1, (args.batch, args.seq, args.hidden), jnp.float32)
  lm_head = jax.random.normal(k2, (args.hidden, args.vocab), jnp.float32) * 0.02
  targets = jax.random.randint(k3, (args.batch, args.seq), 0, args.vocab)

  def naive(h, w):
    logp = jax.nn.log_softmax(jnp.einsum("bth,hv->btv", h, w), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]

  def fused(h, w):
    return token_logprobs(h, w, targets, impl=args.impl)

  fn = naive if case.startswith("naive") else fused
  if case.endswith("backward"):
    fn = jax.grad(lambda h, w, f=fn: jnp.sum(f(h, w)), argnums=(0, 1))
  compiled = jax.jit(fn).lower(hidden, lm_head).compile()
  jax.block_until_ready((hidden, lm_head, targets))
  proc = psutil.Process()
  baseline = proc.memory_info().rss
  peak = [baseline]
  done = threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], proc.memory_info().rss)
      time.sleep(0.001)

  sampler = threading.Thread(target=sample)
  sampler.start()
  out = jax.block_until_ready(compiled(hidden, lm_head))
  done.set()
  sampler.join()
  out_bytes = sum(x.nbytes for x in jax.tree.leaves(out))
  del out
  start = time.perf_counter()
  jax.block_until_ready(compiled(hidden, lm_head))
  return {"case": case, "extra_bytes": max(0, peak[0] - baseline - out_bytes), "seconds": time.perf_counter() - start}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--vocab", type=int, default=128256)
  p.add_argument("--hidden", type=int, default=2048)
  p.add_argument("--impl", default="xla", help="fused implementation: xla (CPU default) or pallas")
  p.add_argument("--rounds", type=int, default=2, help="runs of every case, interleaved")
  p.add_argument("--case", help=argparse.SUPPRESS)
  p.add_argument("--json", help="also write the results here")
  args = p.parse_args()
  if args.case:
    print(json.dumps(run_case(args.case, args)))
    return
  results = {}
  for _ in range(args.rounds):
    for case in CASES:
      cmd = [sys.executable, __file__, f"--case={case}", f"--batch={args.batch}", f"--seq={args.seq}",
             f"--vocab={args.vocab}", f"--hidden={args.hidden}", f"--impl={args.impl}"]
      out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, XLA_FLAGS=""))
      if out.returncode != 0:
        raise SystemExit(f"{case} failed:\n{out.stderr[-2000:]}")
      r = json.loads(out.stdout.strip().splitlines()[-1])
      best = results.setdefault(case, {"case": case, "extra_bytes": 0, "seconds": float("inf"), "all_seconds": []})
      best["extra_bytes"] = max(best["extra_bytes"], r["extra_bytes"])
      best["seconds"] = min(best["seconds"], r["seconds"])
      best["all_seconds"].append(r["seconds"])
  print(f"token log-probs, B={args.batch} T={args.seq} V={args.vocab} H={args.hidden}, fused impl {args.impl}, "
        f"best of {args.rounds}")
  print(f"{'case':<26}{'extra memory':>14}{'time':>10}")
  for case in CASES:
    r = results[case]
    print(f"{case:<26}{r['extra_bytes'] / 2**30:>11.2f} GiB{r['seconds']:>9.2f}s")
  for kind in ("forward", "forward+backward"):
    n, f = results[f"naive {kind}"], results[f"fused {kind}"]
    print(f"{kind}: fused memory {f['extra_bytes'] / max(n['extra_bytes'], 1):.1%} of naive, "
          f"time {f['seconds'] / n['seconds']:.2f}x naive")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=2)


if __name__ == "__main__":
  main()
