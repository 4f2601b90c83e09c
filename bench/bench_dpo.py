"""DPO training speed: jalign's DPO step against TRL's DPOTrainer (PyTorch), same model, pairs and settings.

  python bench/bench_dpo.py [--pairs 8] [--steps 4] [--max-length 128]

Both start from SmolLM2-135M-Instruct (the GGUF file, float32) and train on the same bundled
preference pairs, rendered as the same text (NeMo-Aligner chat format for the prompt, the response
and its end-of-turn for each completion), ``--pairs`` pairs per step, summed response log-probs,
beta 0.2, sigmoid DPO loss, AdamW (lr 9e-6, betas 0.9/0.999, weight decay 0.1), gradient clipping
at 1.0, and a reference model (the starting weights) evaluated on every batch. Each tool tokenizes
the text itself; the table shows the tokens each one processed per step. The first step of each
(compilation, warm-up) is not timed. Prints seconds per step, tokens/s and the ratio jalign / TRL.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as tr  # noqa: E402

from jalign import optim, trainer  # noqa: E402
from jalign.losses import dpo  # noqa: E402
from jalign.config import data_path  # noqa: E402
from jalign.data import formats, pipeline, preference  # noqa: E402
from jalign.data.chat import NemoChatFormat  # noqa: E402
from jalign.models import gguf  # noqa: E402
from jalign.models.pretrained import smollm2_path  # noqa: E402

LR, BETA, WEIGHT_DECAY = 9e-6, 0.2, 0.1


def pair_texts(records, chat_format):
  """The text both tools train on: rendered prompt, and each response with its end-of-turn."""
  out = []
  for r in records:
    prompt, _ = preference.render_prompt(r["prompt"], chat_format)
    end = chat_format.end_of_turn + chat_format.turn_start
    out.append({"prompt": prompt, "chosen": r["chosen_response"] + end, "rejected": r["rejected_response"] + end})
  return out


def jalign_steps(model, tok, records, args, *, pack, share=False):
  """Seconds per step, the pairs' tokens per step (as separate sequences, what TRL processes), pairs
  per step and the row width; ``pack`` puts several pairs in each row, ``share`` computes each pair's
  prompt once (``dpo.share_prompt``)."""
  pairs, _ = preference.encode_pairs(records, tok, max_length=args.max_length)
  make_row = preference.shared_pairs_row if share else preference.pairs_row
  pad = tok.pad_id or 0
  # Each step trains on the same args.pairs pairs as TRL's step. Packed, a step's pairs share one row
  # as wide as the fullest step needs (rounded up to 16): one compiled shape, little padding.
  groups = [list(range(i * args.pairs, (i + 1) * args.pairs)) for i in range(len(pairs) // args.pairs)]
  if pack:
    size = preference.shared_pair_length if share else len
    length = -(-max(sum(size(pairs[i]) for i in g) for g in groups) // 16) * 16
    plans = [[g] for g in groups]
  else:
    length = 2 * args.max_length
    plans = [[[i] for i in g] for g in groups]
  slots = max(len(r) for plan in plans for r in plan)
  rows_per_step = max(len(plan) for plan in plans)
  batches = []
  for plan in plans:
    rows = [make_row([pairs[i] for i in r], length, pad, slots) for r in plan]
    rows += [make_row([], length, pad, slots)] * (rows_per_step - len(rows))
    batches.append(jax.tree.map(lambda *xs: np.stack(xs), *rows))
  tokens = float(np.mean([sum(len(pairs[i]) for i in g) for g in groups]))
  # One width for every step (the longest batch's, rounded up to 16): one compilation, as in training
  # with pad_to_multiple_of where most batches share a width.
  width = max(pipeline.trim_batch(b, 16)["tokens"].shape[1] for b in batches)
  batches = [{k: v[:, :width] if v.shape[-1] == length else v for k, v in b.items()} for b in batches]
  pairs_per_step = float(np.mean([np.sum(b["pair_mask"]) for b in batches]))
  tx = optim.adamw(b1=0.9, b2=0.999, weight_decay=WEIGHT_DECAY, grad_clip=1.0)
  graphdef, state = trainer.init_state(model, tx, schedule=optim.constant_schedule(LR))
  state = jax.tree.map(jax.numpy.copy, state)  # the step donates its state; keep the model's arrays
  reference = trainer.ReferencePass(graphdef, state, dpo.reference_logprobs)
  step = jax.jit(trainer.make_train_step(graphdef, lambda m, b, r: dpo.train_loss(m, b, r, beta=BETA), tx),
                 donate_argnums=0)
  times = []
  for b in batches:
    t0 = time.perf_counter()
    b = {**b, **reference(b, state)}
    state, metrics = step(state, b)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  return float(np.mean(times[1:])), tokens, pairs_per_step, width


class StepTimer(tr.TrainerCallback):
  def __init__(self):
    self.times, self.start = [], None

  def on_step_begin(self, args, state, control, **kwargs):
    self.start = time.perf_counter()

  def on_step_end(self, args, state, control, **kwargs):
    self.times.append(time.perf_counter() - self.start)


def trl_steps(jalign_model, texts, args, workdir):
  import datasets
  from trl import DPOConfig, DPOTrainer

  from jalign.models import hf
  # The same float32 weights as a plain checkpoint (transformers refuses to train a model it loaded
  # from GGUF, which it marks as quantized).
  folder = hf.save(jalign_model, os.path.join(workdir, "smollm2"))
  model = tr.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  path = smollm2_path()
  hf_tok = tr.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  dataset = datasets.Dataset.from_list(texts[:args.pairs * args.steps])
  config = DPOConfig(output_dir=workdir, per_device_train_batch_size=args.pairs, max_steps=args.steps,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, beta=BETA,
                     weight_decay=WEIGHT_DECAY, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
                     max_length=args.max_length, use_cpu=True, report_to="none", save_strategy="no",
                     logging_steps=10_000, disable_dropout=True, dataloader_num_workers=0, bf16=False,
                     precompute_ref_log_probs=False, seed=0)
  timer = StepTimer()
  trainer_ = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=hf_tok, callbacks=[timer])
  trainer_.train()
  tokens = float(trainer_.state.log_history[-1].get("num_tokens", float("nan"))) / args.steps
  return float(np.mean(timer.times[1:])), tokens


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pairs", type=int, default=8)
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--max-length", type=int, default=128)
  args = p.parse_args()
  import tempfile
  records, _ = formats.read_jsonl(data_path("bundled:pref_train.jsonl"), "comparison")
  records = records[:args.pairs * args.steps]  # the same pairs, in the same order, for every run
  model, tok = gguf.load(smollm2_path())
  with tempfile.TemporaryDirectory() as workdir:
    t, t_tokens = trl_steps(model, pair_texts(records, NemoChatFormat()), args, workdir)
  j, j_tokens, _, j_width = jalign_steps(model, tok, records, args, pack=False)
  jp, jp_tokens, jp_pairs, jp_width = jalign_steps(model, tok, records, args, pack=True)
  js, js_tokens, js_pairs, js_width = jalign_steps(model, tok, records, args, pack=True, share=True)
  import trl
  print(f"DPO SmolLM2-135M, {args.pairs} pairs/step, max length {args.max_length}, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; trl {trl.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"{'':<30}{'s/step':>10}{'pairs/step':>12}{'tokens/step':>13}{'tokens/s':>10}")
  for name, s, p, n in ((f"jalign, 1 pair/row ({j_width})", j, args.pairs, j_tokens),
                        (f"jalign, packed ({jp_width})", jp, jp_pairs, jp_tokens),
                        (f"jalign, shared prompt ({js_width})", js, js_pairs, js_tokens),
                        ("trl", t, args.pairs, t_tokens)):
    print(f"{name:<30}{s:>10.3f}{p:>12.1f}{n:>13.0f}{n / s:>10.0f}")
  print("(tokens: the pairs' chosen and rejected sequences, without padding, however a tool lays them out)")
  print(f"jalign / trl, one pair per row: {t / j:.2f}x steps/s, {(j_tokens / j) / (t_tokens / t):.2f}x tokens/s")
  for name, s, p, n in (("packed", jp, jp_pairs, jp_tokens), ("shared prompt", js, js_pairs, js_tokens)):
    print(f"jalign {name} / trl: {(n / s) / (t_tokens / t):.2f}x tokens/s, {(p / s) / (args.pairs / t):.2f}x pairs/s")


if __name__ == "__main__":
  main()
