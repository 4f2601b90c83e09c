"""Held-out evaluation: pass@k against brute force, the answers re-scored, and one-line errors."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from jalign import evaluate
from jalign.rewards import math_answers
from tests.conftest import ROOT

FUNCS = "tests.rewards.sample_functions"


@pytest.mark.parametrize("n, c", [(4, 0), (4, 1), (4, 3), (5, 5), (6, 2)])
def test_pass_at_k_is_the_chance_that_some_of_k_drawn_samples_is_correct(n, c):
  samples = [True] * c + [False] * (n - c)
  for k in range(1, n + 1):
    draws = list(itertools.combinations(samples, k))
    assert evaluate.pass_at_k(n, c, k) == pytest.approx(np.mean([any(d) for d in draws]), abs=1e-12)


def test_evaluate_a_run_on_held_out_problems(tmp_path, sft_run):
  data = tmp_path / "problems.jsonl"
  data.write_text("".join(json.dumps({"problem": f"What is {a} + 1?", "expected_answer": a + 1}) + "\n"
                          for a in range(6)))
  # A threshold on the answer's length in characters marks some samples right and others wrong.
  summary = evaluate.evaluate(str(sft_run), str(data), samples=4, max_new_tokens=6,
                              reward_functions=f"{FUNCS}:length", threshold=12, log=lambda *_: None)
  answers = summary["answers"]
  assert len(answers) == 24 and [a["where"] for a in answers[:5]] == [f"{data}:1"] * 4 + [f"{data}:2"]
  correct = np.asarray([len(a["response"]) >= 12 for a in answers]).reshape(6, 4)
  assert [a["reward"] for a in answers] == [float(len(a["response"])) for a in answers]
  assert 0 < correct.mean() < 1, correct
  assert summary["pass@1"] == pytest.approx(correct.mean())
  assert summary["pass@4"] == pytest.approx(np.mean(correct.any(axis=1)))
  want2 = np.mean([evaluate.pass_at_k(4, int(c), 2) for c in correct.sum(1)])
  assert summary["pass@2"] == pytest.approx(want2)
  greedy = evaluate.evaluate(str(sft_run), str(data), greedy=True, max_new_tokens=6, log=lambda *_: None)
  assert greedy["samples"] == 1 and "pass@2" not in greedy


def test_the_command_writes_its_summary_and_bad_input_is_one_line(tmp_path, sft_run):
  cmd = [sys.executable, "-m", "jalign.evaluate", f"--run={sft_run}", "--data=bundled:arithmetic_val.jsonl",
         "--greedy", "--max_new_tokens=4"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  summary = json.loads((sft_run / "eval_arithmetic_val.json").read_text())
  assert summary["prompts"] == 64 and "pass@1=" in out.stdout
  bad = subprocess.run(cmd[:4] + [f"--data={tmp_path / 'none.jsonl'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2 and bad.stderr.strip() == f"error: {tmp_path / 'none.jsonl'}: file not found"


@pytest.mark.many_steps
def test_a_model_that_is_not_a_run_is_asked_in_its_own_chat_template(tmp_path, smollm2_file):
  """``smollm2`` (SmolLM2-135M-Instruct, ChatML): the accuracy before any training."""
  data = tmp_path / "problems.jsonl"
  data.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"}) + "\n")
  summary = evaluate.evaluate("smollm2", str(data), greedy=True, max_new_tokens=24, log=lambda *_: None)
  (answer,) = summary["answers"]
  # An answer to the question, not a continuation of the prompt, its end-of-turn token cut off.
  assert answer["response"].strip() and "<|im" not in answer["response"] and "user" not in answer["response"]
  assert answer["reward"] == math_answers.final_answer("", answer["response"], {"answer": "5"})
