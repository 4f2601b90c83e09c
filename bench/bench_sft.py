"""SFT training speed: jalign's jitted step against a plain PyTorch transformers loop, same everything.

  python bench/bench_sft.py [--batch 4] [--seq 256] [--steps 5] [--model smollm2|tiny]

Both start from the same weights (SmolLM2-135M-Instruct from the GGUF file, or the tiny preset
saved and reloaded), train on the same batches of the bundled chat data (one example per row,
right-padded, answer-only loss), with AdamW (betas 0.9/0.98, weight decay 0.01), gradient clipping
at 1.0 and the token-mean NLL. Prints steps/s, tokens/s and the ratio jalign / PyTorch.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as tr  # noqa: E402
from flax import nnx  # noqa: E402

from jalign import optim, trainer  # noqa: E402
from jalign.losses import sft  # noqa: E402
from jalign.config import data_path  # noqa: E402
from jalign.data import formats, packing  # noqa: E402
from jalign.data.sft import encode_records  # noqa: E402
from jalign.data.tokenizer import Tokenizer  # noqa: E402
from jalign.models import LlamaConfig, Transformer, hf  # noqa: E402


def load(name, workdir):
  if name == "smollm2":
    from jalign.models import gguf
    from jalign.models.pretrained import smollm2_path
    path = smollm2_path()
    model, tok = gguf.load(path)
    ref = tr.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tok, ref
  model = Transformer(LlamaConfig.preset("tiny"), rngs=nnx.Rngs(0))
  folder = hf.save(model, os.path.join(workdir, "tiny"))
  return model, Tokenizer.tiny(), tr.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)


def batches(tok, batch, seq, count, pack=False):
  records, _ = formats.read_jsonl(data_path("bundled:sft_chat_train.jsonl"), "chat")
  examples, _ = encode_records(records, "chat", tok, max_length=seq)
  plan = packing.plan_rows(examples, seq, pack=pack)
  rows = [packing.build_row([examples[i] for i in plan[r]], seq, tok.pad_id or 0) for r in range(batch * count)]
  return [{k: np.stack([r[k] for r in rows[i * batch:(i + 1) * batch]]) for k in rows[0]} for i in range(count)]


def time_steps(step_fn, data):
  step_fn(data[0])  # warm-up (compile)
  start = time.perf_counter()
  for b in data[1:]:
    step_fn(b)
  return (time.perf_counter() - start) / (len(data) - 1)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=5)
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as workdir:
    model, tok, ref = load(args.model, workdir)
    data = batches(tok, args.batch, args.seq, args.steps + 1)
    packed = batches(tok, args.batch, args.seq, args.steps + 1, pack=True)
    real = lambda d: float(np.mean([np.sum(b["segment_ids"] > 0) for b in d]))

    lr = 1e-5
    tx = optim.adamw(weight_decay=0.01)
    graphdef, state = trainer.init_state(model, tx, schedule=optim.constant_schedule(lr))
    step = jax.jit(trainer.make_train_step(graphdef, sft.loss, tx), donate_argnums=0)
    holder = {"state": state}

    def jalign_step(b):
      holder["state"], metrics = step(holder["state"], b)
      jax.block_until_ready(metrics["loss"])

    ref.train()
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)

    def torch_step(b):
      tokens = torch.tensor(b["tokens"], dtype=torch.long)
      attention = torch.tensor(b["segment_ids"] > 0, dtype=torch.long)
      labels = torch.tensor(np.where(b["loss_mask"] > 0, b["targets"], -100), dtype=torch.long)
      logits = ref(input_ids=tokens, attention_mask=attention).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=-100)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
      opt.step()

    j = time_steps(jalign_step, data)
    jp = time_steps(jalign_step, packed)
    t = time_steps(torch_step, data)
  print(f"SFT {args.model}, batch {args.batch} x {args.seq}, jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"{'':<22}{'s/step':>10}{'steps/s':>10}{'real tokens/step':>18}{'tokens/s':>12}")
  rows = (("jalign", j, real(data)), ("pytorch", t, real(data)), ("jalign, packed rows", jp, real(packed)))
  for name, s, n in rows:
    print(f"{name:<22}{s:>10.3f}{1 / s:>10.2f}{n:>18.0f}{n / s:>12.0f}")
  print(f"jalign / pytorch, same padded batches: {t / j:.2f}x steps/s")
  print(f"jalign packed / pytorch padded: {(real(packed) / jp) / (real(data) / t):.2f}x tokens/s")


if __name__ == "__main__":
  main()
