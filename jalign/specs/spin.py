"""SPIN, self-play fine-tuning: iterations of DPO between the chat data's replies and the model's own,
the model at each iteration's start being the reference (``dpo.beta`` and ``dpo.loss_type`` apply)."""

import ml_collections

from jalign.specs.base import AlgorithmSpec, RolloutSettings, require, sampling


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


NAMES = {"micro_batch_size": "rollout_batch_size", "max_new_tokens": "max_new_tokens", "temperature": "temperature",
         "top_k": "top_k", "top_p": "top_p"}


def settings(c) -> RolloutSettings:
  """How each iteration generates (``config.rollout`` over ``config.spin``): one reply to each prompt."""
  picked = sampling(c, "spin", block(), NAMES, fixed={"samples_per_prompt": 1, "min_new_tokens": 0})
  return RolloutSettings.from_sampling(picked, kept=1, greedy=c.spin.greedy)


def validate(c, check_files):
  s, length = settings(c), c.data.max_seq_length
  require(c.spin.iterations >= 1, "spin.iterations", "must be at least 1")
  require(c.spin.epochs > 0, "spin.epochs", "must be positive")
  require(s.micro_batch >= 1, s.keys["micro_batch"], "must be at least 1")
  require(0 <= s.max_new_tokens < length, s.keys["max_new_tokens"],
          f"{s.max_new_tokens} leaves no room for a prompt in data.max_seq_length {length}")
  require(s.greedy or s.temperature > 0, s.keys["temperature"], "must be positive (or spin.greedy)")
  require(c.dpo.beta > 0, "dpo.beta", "must be positive")
  require(not c.rollout.tis_cap, "rollout.tis_cap", "spin trains with the DPO loss, without importance weights")


SPEC = AlgorithmSpec("spin", formats=("chat",), recipe="spin", blocks={"spin": block}, validate=validate,
                     sampling=settings, plan_jobs=("spin",))
