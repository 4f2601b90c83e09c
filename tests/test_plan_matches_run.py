"""The planner compiles the programs the run compiles: for the same config, the train step (and the
reference pass, and PPO's critic job) the planner lowers on abstract arrays is, text for text, the one
the run lowers on its first real batch."""

import numpy as np
import pytest
from flax import nnx

from jalign import trainer
from jalign.parallel import mesh as pmesh
from jalign.plan import plan, program_fingerprint
from jalign.recipes import ppo
from jalign.recipes import reward as reward_lib
from jalign.recipes.build import build_trainer
from tests.conftest import load, quiet

SHARDED = {"data": 2, "fsdp": 2, "tensor": 2, "pipeline": 1}


@pytest.mark.parametrize("name", ["sft_tiny", "dpo_tiny"])
def test_planned_train_step_is_the_trainers(name, tmp_path):
  # The planner compiles the widest batch; data.pad_to_multiple_of would trim this data's batches.
  c = load(name, tmp_path / name, **{"train.max_steps": 4, "train.global_batch_size": 8,
                                     "data.pad_to_multiple_of": 0})
  c.mesh.update(SHARDED)
  [planned] = plan(c, peak_flops=1e12)
  loop = build_trainer(c, log=quiet)
  with pmesh.use(loop.mesh, loop.rules):
    data = pmesh.put_batch(next(loop.train_batches), loop.mesh, loop.rules)
    if name == "dpo_tiny":  # the reference pass's program, then the train step's on what it adds
      reference = loop.reference._fn.lower(loop.reference.params, loop.state.rest, data)
      assert program_fingerprint(reference) == planned.step("reference log-probs").program
      data = {**data, **loop.reference(data, loop.state)}
    assert program_fingerprint(loop.lower_train_step(data)) == planned.step("train").program


def test_planned_ppo_actor_step_is_the_trainers(tmp_path, reward_run):
  c = load("ppo_tiny", tmp_path / "ppo", **{
      "model.init": "random", "critic.init": "random", "critic.reward_model": f"run:{reward_run}",
      "rollout.num_prompts": 8, "rollout.micro_batch_size": 4, "rollout.max_new_tokens": 8,
      "train.global_batch_size": 8, "critic.global_batch_size": 8, "critic.micro_batch_size": 1,
      "train.max_steps": 2, "data.validation": ""})
  c.mesh.update(SHARDED)
  c.critic.mesh.update({"data": 4, "fsdp": 1, "tensor": 2, "pipeline": 1})
  actor, planned_critic = plan(c, peak_flops=1e12)
  loop, rollouts = ppo.build(c, log=quiet)
  with pmesh.use(loop.mesh, loop.rules):
    batch = loop._put(next(loop.train_batches))  # a rollout's first global batch
    assert program_fingerprint(loop.lower_train_step(batch)) == actor.step("actor train").program
  # The critic job's programs, on what the critic reads from a rollout: its values, the reward
  # model's scores and the critic's train step.
  critic, size, width = rollouts.prepare.critic, c.critic.global_batch_size, c.data.max_seq_length
  rows = {key: np.zeros((size, width), np.int32) for key in ("tokens", "positions", "segment_ids")}
  scored = reward_lib.scoring_row(None, critic.reward.config.data.max_seq_length, 0)
  with pmesh.use(critic.mesh, critic.rules):
    part = pmesh.put_global_batch(rows, critic.mesh, critic.rules)
    values = critic._values.lower(critic.state.params, critic.state.rest, part)
    assert program_fingerprint(values) == planned_critic.step("values").program
    graphdef, weights = nnx.split(critic.reward.model)
    scores = reward_lib.last_token_scorer(graphdef).lower(
        weights, pmesh.put_global_batch({k: np.stack([v] * size) for k, v in scored.items()}, critic.mesh, critic.rules))
    assert program_fingerprint(scores) == planned_critic.step("rewards").program
    part = pmesh.put_global_batch({**rows, **{key: np.zeros((size, width), np.float32)
                                              for key in ("mask", "old_values", "returns")}}, critic.mesh, critic.rules)
    step = trainer.jit_train_step(critic._step_fn, critic.state_sharding,
                                  pmesh.batch_shardings(part, critic.mesh, critic.rules))
    assert program_fingerprint(step.lower(critic.state, part)) == planned_critic.step("critic train").program


def test_a_different_program_has_a_different_fingerprint(tmp_path):
  c = load("sft_tiny", tmp_path / "sft", **{"train.max_steps": 4, "train.global_batch_size": 8})
  c.mesh.update(SHARDED)
  [planned] = plan(c, peak_flops=1e12)
  c.optimizer.grad_clip = 0.0  # no clipping: another update rule
  [other] = plan(c, peak_flops=1e12)
  assert planned.step("train").program != other.step("train").program
