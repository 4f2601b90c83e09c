"""Write the small datasets shipped in jalign/assets/data (NeMo-Aligner jsonl formats).

Run from the repository root: python scripts/make_bundled_data.py
Templated questions with regular answers, so that a tiny model learns them visibly within minutes:
SFT chats, preference data (comparison pairs, KTO feedback) whose chosen answer is the right one
and whose rejected answer is the same sentence with a wrong fact, so that a reward model or a policy
can only tell them apart by learning the facts, regression reward-model data (attribute scores), and
SteerLM 2.0 groups (the right answer among wrong ones, the attribute model favouring the right one),
and arithmetic problems with their answers (GRPO's verifiable rewards; held-out problems apart).
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


def wrong(rng, question, answer):
  """The same answer with one fact changed (a wrong sum, capital, leg count, name or subject)."""
  for facts in (NUMBERS, list(CAPITALS.values()), sorted(set(ANIMALS.values())), NAMES,
                ["sea", "sun", "tree", "rain", "moon", "snow"]):
    present = [f for f in facts if f" {f}" in answer or answer.startswith(f)]
    if facts is NUMBERS:
      present = [f for f in facts if answer.endswith(f" {f}.")]
    if present:
      old = present[-1]
      new = rng.choice([f for f in facts if f != old])
      head, _, tail = answer.rpartition(old)
      return head + new + tail
  raise ValueError(f"no fact to change in {answer!r}")


def comparison(rng):
  question, answer = qa(rng)
  system = rng.choice(SYSTEMS)
  prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
  return {"prompt": prompt, "chosen_response": answer, "rejected_response": wrong(rng, question, answer)}


def prompt(rng):
  """A PPO/REINFORCE prompt: a question rendered in NeMo's chat format, up to the assistant's turn."""
  from jalign.data.chat import NemoChatFormat
  from jalign.data.preference import render_prompt
  return {"text": render_prompt(comparison(rng)["prompt"], NemoChatFormat())[0]}


def feedback(rng):
  pair = comparison(rng)
  desirable = rng.random() < 0.5
  return {"prompt": pair["prompt"], "response": pair["chosen_response" if desirable else "rejected_response"],
          "preference": "chosen" if desirable else "rejected"}


def regression(rng):
  """A rendered conversation (SteerLM's <extra_id_N> chat format) with attribute scores: correctness
  4 for the right fact and 0 for a wrong one, and verbosity from the answer's length; correctness is
  missing (-100, NeMo's loss mask value) in about one record in eight."""
  from jalign.data.chat import NemoChatFormat
  question, answer = qa(rng)
  right = rng.random() < 0.5
  reply = answer if right else wrong(rng, question, answer)
  record = {"system": rng.choice(SYSTEMS), "mask": "User",
            "conversations": [{"from": "User", "value": question}, {"from": "Assistant", "value": reply}]}
  text = NemoChatFormat.extra_id().render_text(record)
  correctness = (4.0 if right else 0.0) if rng.random() > 0.125 else -100.0
  return {"text": text, "label": [correctness, round(len(reply.split()) / 2, 1)]}


def steerlm2_group(rng, n=4):
  """One prompt's SteerLM 2.0 samples for the label ``correctness:4``: the right answer and n-1 wrong
  ones in random order. log P(a|x,y) is high only for the right one (the attribute model knows the
  facts); log P(y|x) and log Q'(y|a,x) depend on length alone (neither the base model nor the sampler
  does), so the importance weights put about 0.98 on the right answer."""
  question, answer = qa(rng)
  if question.startswith("Write one line"):  # no fact to be right about: ask a sum instead
    a, b = rng.randrange(10), rng.randrange(9)
    question, answer = f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."
  replies = [answer]
  while len(replies) < n:
    other = wrong(rng, question, answer)
    if other not in replies:
      replies.append(other)
  rng.shuffle(replies)
  responses = []
  for reply in replies:
    words = len(reply.split())
    responses.append({"from": "Assistant", "value": reply,
                      "log(P(a|x,y))": round((-0.4 if reply == answer else -5.0) + rng.uniform(-0.3, 0.3), 3),
                      "log(P(y|x))": round(-1.5 * words + rng.uniform(-0.5, 0.5), 3),
                      "log(Q(y|a,x))": round(-1.5 * words + rng.uniform(-0.5, 0.5), 3)})
  return {"system": rng.choice(SYSTEMS), "prompt_turns": [{"from": "User", "value": question}],
          "label": "correctness:4", "responses": responses}


def record(rng):
  turns = []
  for _ in range(rng.choice([1, 1, 2])):
    q, a = qa(rng)
    turns += [{"from": "User", "value": q, "label": None}, {"from": "Assistant", "value": a, "label": None}]
  return {"system": rng.choice(SYSTEMS), "conversations": turns, "mask": "User", "type": "VALUE_TO_TEXT"}


ITEMS = ["apples", "books", "coins", "pens", "shells", "stamps"]


def arithmetic_problems() -> tuple[list, list]:
  """Every sum and difference of 0-20 (differences not negative), shuffled once and split so that no
  held-out problem is in the training set: (train, validation) as (question, answer) pairs, some as
  one-line word problems."""
  rng = random.Random(12)
  problems = [(a, op, b) for a in range(21) for b in range(21) for op in "+-" if op == "+" or a >= b]
  rng.shuffle(problems)
  out = []
  for a, op, b in problems:
    answer = a + b if op == "+" else a - b
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if rng.random() < 0.5:
      question = f"What is {a} {op} {b}?"
    elif op == "+":
      question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    else:
      question = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?"
    out.append((question, str(answer)))
  return out[64:], out[:64]


def write_arithmetic():
  """GRPO's problems with answers (``problem`` format), and SFT chats that answer the training problems
  ("The answer is N."), for a warm start."""
  train, val = arithmetic_problems()
  for name, pairs in (("arithmetic_train.jsonl", train), ("arithmetic_val.jsonl", val)):
    with open(OUT / name, "w") as f:
      for question, answer in pairs:
        f.write(json.dumps({"prompt": [{"role": "user", "content": question}], "answer": answer}) + "\n")
    print(f"{len(pairs)} records -> {OUT / name}")
  with open(OUT / "arithmetic_sft_train.jsonl", "w") as f:
    for question, answer in train:
      turns = [{"from": "User", "value": question, "label": None},
               {"from": "Assistant", "value": f"The answer is {answer}.", "label": None}]
      f.write(json.dumps({"system": "", "conversations": turns, "mask": "User", "type": "VALUE_TO_TEXT"}) + "\n")
  print(f"{len(train)} records -> {OUT / 'arithmetic_sft_train.jsonl'}")


def main():
  OUT.mkdir(parents=True, exist_ok=True)
  for name, make, n, seed in (("sft_chat_train.jsonl", record, 512, 0), ("sft_chat_val.jsonl", record, 64, 1),
                               ("pref_train.jsonl", comparison, 512, 2), ("pref_val.jsonl", comparison, 64, 3),
                               ("kto_train.jsonl", feedback, 512, 4), ("kto_val.jsonl", feedback, 64, 5),
                               ("regression_train.jsonl", regression, 512, 6),
                               ("regression_val.jsonl", regression, 64, 7),
                               ("steerlm2_train.jsonl", steerlm2_group, 384, 8),
                               ("steerlm2_val.jsonl", steerlm2_group, 64, 9),
                               ("prompts_train.jsonl", prompt, 256, 10), ("prompts_val.jsonl", prompt, 32, 11)):
    rng = random.Random(seed)
    with open(OUT / name, "w") as f:
      for _ in range(n):
        f.write(json.dumps(make(rng)) + "\n")
    print(f"{n} records -> {OUT / name}")
  write_arithmetic()


if __name__ == "__main__":
  main()
