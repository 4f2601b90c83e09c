"""The config's blocks: each algorithm's comes from its spec, and the shared sampling block
``config.rollout`` sets what the algorithm blocks' older keys set."""

import pytest

from jalign import config as config_lib
from jalign import specs
from jalign.config import ConfigError, load_config_file
from jalign.plan import plan
from tests.conftest import ROOT

OLD_AND_NEW = {  # (old key, its rollout key, a value other than both defaults)
    "reinforce": [("reinforce.num_rollout_samples", "num_prompts", 8),
                  ("reinforce.num_rollouts_per_prompt", "samples_per_prompt", 2),
                  ("reinforce.rollout_batch_size", "micro_batch_size", 4), ("reinforce.max_new_tokens", "max_new_tokens", 9),
                  ("reinforce.min_new_tokens", "min_new_tokens", 2), ("reinforce.temperature", "temperature", 0.7),
                  ("reinforce.top_k", "top_k", 5), ("reinforce.top_p", "top_p", 0.9)],
    "ppo": [("ppo.num_rollout_samples", "num_prompts", 16), ("ppo.rollout_micro_batch_size", "micro_batch_size", 4),
            ("ppo.max_new_tokens", "max_new_tokens", 9), ("ppo.min_new_tokens", "min_new_tokens", 2),
            ("ppo.temperature", "temperature", 0.7), ("ppo.top_k", "top_k", 5), ("ppo.top_p", "top_p", 0.9)],
    "spin": [("spin.rollout_batch_size", "micro_batch_size", 4), ("spin.max_new_tokens", "max_new_tokens", 9),
             ("spin.temperature", "temperature", 0.7), ("spin.top_k", "top_k", 5), ("spin.top_p", "top_p", 0.9)],
}


UNSET = {f"rollout.{key}": None for key in ("num_prompts", "samples_per_prompt", "micro_batch_size", "max_new_tokens")}


def _config(name, **overrides):
  """A shipped tiny config with its sampling keys unset, then ``overrides``."""
  return load_config_file(ROOT / "configs" / f"{name}_tiny.py", {**UNSET, **overrides})


def _values(settings):
  return {k: v for k, v in vars(settings).items() if k != "keys"}


def test_every_algorithm_block_comes_from_its_spec():
  c = config_lib.base_config()
  for spec in specs.REGISTRY.values():
    for name, block in spec.blocks.items():
      assert c[name].to_dict() == block().to_dict()
  assert set(specs.ALGORITHMS) == {"sft", "rm", "dpo", "kto", "kd", "steerlm2", "spin", "reinforce", "rs", "ppo",
                                  "grpo"}
  with pytest.raises(ConfigError, match=r"config.algorithm: 'orpo' is not one of"):
    specs.get("orpo")


@pytest.mark.parametrize("algorithm", sorted(OLD_AND_NEW))
def test_the_rollout_block_sets_what_the_old_keys_set(algorithm):
  pairs = OLD_AND_NEW[algorithm]
  old = specs.sampling_settings(_config(algorithm, **{key: value for key, _, value in pairs}))
  new = specs.sampling_settings(_config(algorithm, **{f"rollout.{key}": value for _, key, value in pairs}))
  assert _values(old) == _values(new)
  assert all(getattr(old, name) != getattr(specs.sampling_settings(_config(algorithm)), name)
             for name in ("max_new_tokens", "temperature", "top_k", "top_p", "micro_batch"))
  assert new.keys["temperature"] == "rollout.temperature" and old.keys["temperature"] == f"{algorithm}.temperature"


def test_both_keys_set_apart_is_an_error_naming_the_new_one():
  c = _config("ppo", **{"ppo.temperature": 0.5, "rollout.temperature": 0.7})
  with pytest.raises(ConfigError, match=r"config.rollout.temperature: 0.7, and config.ppo.temperature is 0.5"):
    specs.sampling_settings(c)
  same = _config("ppo", **{"ppo.temperature": 0.7, "rollout.temperature": 0.7})
  assert specs.sampling_settings(same).temperature == 0.7


def test_validation_names_the_key_the_value_came_from():
  c = _config("reinforce", **{"rollout.temperature": 0.0})
  with pytest.raises(ConfigError, match=r"config.rollout.temperature: must be positive"):
    config_lib.validate(c, check_files=False, device_count=8)
  c = _config("ppo", **{"rollout.samples_per_prompt": 2})
  with pytest.raises(ConfigError, match=r"config.rollout.samples_per_prompt: 2: ppo takes only 1"):
    config_lib.validate(c, check_files=False, device_count=8)


def test_the_planner_plans_the_same_ppo_program_from_either_key():
  common = {"model.init": "random", "critic.init": "random", "critic.reward_model": "random", "data.max_seq_length": 64,
            "train.global_batch_size": 8, "critic.global_batch_size": 8, "critic.micro_batch_size": 1,
            "train.micro_batch_size": 1}
  old = _config("ppo", **common, **{"ppo.num_rollout_samples": 16, "ppo.max_new_tokens": 16,
                                    "ppo.rollout_micro_batch_size": 2})  # as configs written before rollout.*
  new = _config("ppo", **common, **{"rollout.num_prompts": 16, "rollout.max_new_tokens": 16,
                                    "rollout.micro_batch_size": 2})
  plans = [plan(c, peak_flops=1e12) for c in (old, new)]
  steps = [[(s.name, s.repeats, s.program) for job in p for s in job.steps] for p in plans]
  assert steps[0] == steps[1]
  assert ("rollout", 1) in [(name, repeats) for name, repeats, _ in steps[0]]
