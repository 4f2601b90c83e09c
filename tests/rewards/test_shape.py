from jalign.rewards import shape


def test_think_answer_format():
  good = "<think>7 * 6 = 42</think>\n<answer>42</answer>"
  assert shape.think_answer("", good, {}) == 1.0
  for bad in ("<answer>42</answer><think>x</think>", "<think>x</think>", "text <think>x</think><answer>1</answer>",
              "<think>x</think><answer>1</answer> trailing", "<think><think>x</think></think><answer>1</answer>"):
    assert shape.think_answer("", bad, {}) == 0.0, bad
  assert shape.tagged("<a>1</a> <b>2</b>", ("a", "b"))


def test_concise_penalises_past_the_budget():
  assert shape.concise("", "x" * 100, {"length_budget": 100}) == 0.0
  assert shape.concise("", "x" * 150, {"length_budget": 100}) == -0.5
  assert shape.concise("", "x" * 1024, {}) == -1.0
