"""SPIN, self-play fine-tuning: iterations of DPO between the chat data's replies and the model's own,
the model at each iteration's start being the reference (``dpo.beta`` and ``dpo.loss_type`` apply)."""

import ml_collections

from jalign.specs.base import AlgorithmSpec, require


def block():
  b = ml_collections.ConfigDict()
  b.iterations = 3            # max_iterations
  b.epochs = 1                # max_epochs per iteration: steps = ceil(epochs * pairs / global_batch_size)
  b.max_new_tokens = 0        # length_params.max_length; 0: data.max_seq_length // 2
  b.rollout_batch_size = 32   # rollout_micro_batch_size: prompts generated at once
  b.temperature = 1.0
  b.top_k = 0
  b.top_p = 1.0
  b.greedy = False
  return b


def validate(c, check_files):
  s, length = c.spin, c.data.max_seq_length
  require(s.iterations >= 1, "spin.iterations", "must be at least 1")
  require(s.epochs > 0, "spin.epochs", "must be positive")
  require(s.rollout_batch_size >= 1, "spin.rollout_batch_size", "must be at least 1")
  require(0 <= s.max_new_tokens < length, "spin.max_new_tokens",
          f"{s.max_new_tokens} leaves no room for a prompt in data.max_seq_length {length}")
  require(s.greedy or s.temperature > 0, "spin.temperature", "must be positive (or spin.greedy)")
  require(c.dpo.beta > 0, "dpo.beta", "must be positive")


SPEC = AlgorithmSpec("spin", formats=("chat",), recipe="spin", blocks={"spin": block}, validate=validate,
                     plan_jobs=("spin",))
