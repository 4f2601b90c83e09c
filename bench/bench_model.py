"""Forward and forward+backward time of jalign against transformers, same weights, same inputs.

  python bench/bench_model.py [--models tiny,smollm2] [--repeats 5]

jalign runs jitted (XLA on this backend); transformers runs PyTorch eager. Each row prints the
median of ``--repeats`` timed runs after warm-up (compile excluded), and the ratio
transformers / jalign (above 1: jalign is faster). The loss for the backward pass is the mean
next-token cross-entropy in both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as tr  # noqa: E402
from flax import nnx  # noqa: E402

from jalign.models import LlamaConfig, Transformer, hf  # noqa: E402
from jalign.models.pretrained import smollm2_path  # noqa: E402


def timed(fn, repeats):
  fn()  # warm-up: compile / allocate
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jalign_fns(model, tokens):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  targets = jnp.roll(tokens, -1, axis=1)

  @jax.jit
  def forward(params, tokens):
    return nnx.merge(graphdef, params, rest)(tokens)

  @jax.jit
  def loss_and_grad(params, tokens):
    def loss(p):
      logits = nnx.merge(graphdef, p, rest)(tokens)
      logp = jax.nn.log_softmax(logits[:, :-1])
      return -jnp.mean(jnp.take_along_axis(logp, targets[:, :-1, None], -1))
    return jax.value_and_grad(loss)(params)

  fwd = lambda: jax.block_until_ready(forward(params, tokens))
  bwd = lambda: jax.block_until_ready(loss_and_grad(params, tokens))
  return fwd, bwd, lambda: np.asarray(forward(params, tokens))


def torch_fns(model, tokens):
  t = torch.tensor(np.asarray(tokens), dtype=torch.long)

  def fwd():
    with torch.no_grad():
      return model(t).logits

  def bwd():
    model.zero_grad(set_to_none=True)
    logits = model(t).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1))
    loss.backward()
    return loss

  return fwd, bwd, lambda: fwd().numpy()


def tiny_pair(workdir):
  model = Transformer(LlamaConfig.preset("tiny"), rngs=nnx.Rngs(0))
  path = hf.save(model, os.path.join(workdir, "tiny"))
  return model, tr.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


def smollm2_pair(workdir):
  from jalign.models import gguf
  path = smollm2_path()
  model, _ = gguf.load(path)
  ref = tr.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
  return model, ref


CASES = {"tiny": (tiny_pair, (8, 128)), "smollm2": (smollm2_pair, (2, 128))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="tiny,smollm2")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"backend: jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"{'model':<9} {'batch':>7} {'pass':<13} {'jalign ms':>10} {'torch ms':>10} {'torch/jalign':>13}")
  with tempfile.TemporaryDirectory() as workdir:
    for name in args.models.split(","):
      build, (b, t) = CASES[name]
      model, ref = build(workdir)
      ref.train(False)
      tokens = jnp.asarray(np.random.RandomState(0).randint(0, model.config.vocab_size, (b, t)))
      j_fwd, j_bwd, j_logits = jalign_fns(model, tokens)
      t_fwd, t_bwd, t_logits = torch_fns(ref, tokens)
      diff = np.abs(j_logits() - t_logits()).max() / np.abs(t_logits()).max()
      for label, jf, tf in (("forward", j_fwd, t_fwd), ("fwd+backward", j_bwd, t_bwd)):
        jt, tt = timed(jf, args.repeats), timed(tf, args.repeats)
        print(f"{name:<9} {b:>3}x{t:<4}{label:<13} {jt * 1e3:>10.1f} {tt * 1e3:>10.1f} {tt / jt:>12.2f}x")
      print(f"{name:<9} logits max rel diff {diff:.2e}")


if __name__ == "__main__":
  main()
