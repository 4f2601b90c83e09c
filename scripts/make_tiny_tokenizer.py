"""Train the tiny byte-level BPE tokenizer shipped in jalign/assets/tiny_tokenizer.

Run from the repository root: python scripts/make_tiny_tokenizer.py
The output is committed; rerun only when the corpus or the special tokens change.
"""

from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jalign.data.tokenizer import Tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "jalign" / "assets"
VOCAB_SIZE = 512
# Ids 0-2 match the "tiny" model preset: pad 0, bos 1, eos 2.
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def main():
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  backend.train([str(ASSETS / "tiny_corpus.txt")], trainer)
  tok = Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>",
                  chat_template=CHATML)
  tok.save(ASSETS / "tiny_tokenizer")
  print(f"vocabulary {tok.vocab_size} -> {ASSETS / 'tiny_tokenizer'}")


if __name__ == "__main__":
  main()
