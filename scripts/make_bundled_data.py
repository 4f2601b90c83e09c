"""Write the small chat datasets shipped in jalign/assets/data (NeMo-Aligner chat jsonl).

Run from the repository root: python scripts/make_bundled_data.py
Templated questions with regular answers, so that a tiny model learns them visibly within minutes.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "jalign" / "assets" / "data"
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
CAPITALS = {"France": "Paris", "Italy": "Rome", "Japan": "Tokyo", "Spain": "Madrid", "Germany": "Berlin",
            "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo",
            "Greece": "Athens", "Chile": "Santiago", "India": "New Delhi", "Cuba": "Havana"}
NAMES = ["Ada", "Alan", "Grace", "Linus", "Ken", "Barbara", "Donald", "Edsger", "Margaret", "Dennis"]
ANIMALS = {"spider": "eight", "dog": "four", "bird": "two", "ant": "six", "cat": "four", "fish": "no"}
SYSTEMS = ["", "You are a helpful assistant.", "Answer clearly and briefly."]


def qa(rng):
  kind = rng.randrange(5)
  if kind == 0:
    a, b = rng.randrange(10), rng.randrange(9)
    return f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."
  if kind == 1:
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."
  if kind == 2:
    name = rng.choice(NAMES)
    return f"Please say hello to {name}.", f"Hello, {name}! It is nice to meet you."
  if kind == 3:
    animal = rng.choice(sorted(ANIMALS))
    article = "an" if animal[0] in "aeiou" else "a"
    return f"How many legs does {article} {animal} have?", f"{article.capitalize()} {animal} has {ANIMALS[animal]} legs."
  word = rng.choice(["sea", "sun", "tree", "rain", "moon", "snow"])
  return f"Write one line about the {word}.", f"The {word} is quiet and beautiful today."


def record(rng):
  turns = []
  for _ in range(rng.choice([1, 1, 2])):
    q, a = qa(rng)
    turns += [{"from": "User", "value": q, "label": None}, {"from": "Assistant", "value": a, "label": None}]
  return {"system": rng.choice(SYSTEMS), "conversations": turns, "mask": "User", "type": "VALUE_TO_TEXT"}


def main():
  OUT.mkdir(parents=True, exist_ok=True)
  for name, n, seed in (("sft_chat_train.jsonl", 512, 0), ("sft_chat_val.jsonl", 64, 1)):
    rng = random.Random(seed)
    with open(OUT / name, "w") as f:
      for _ in range(n):
        f.write(json.dumps(record(rng)) + "\n")
    print(f"{n} records -> {OUT / name}")


if __name__ == "__main__":
  main()
