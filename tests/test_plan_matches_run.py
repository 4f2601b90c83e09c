"""The planner compiles the programs the run compiles: for the same config, the train step (and the
reference pass) the planner lowers on abstract arrays is, text for text, the one the Trainer lowers on
its first real batch."""

import pytest

from jalign.parallel import mesh as pmesh
from jalign.plan import plan, program_fingerprint
from jalign.recipes import ppo
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
  actor, _ = plan(c, peak_flops=1e12)
  loop, rollouts = ppo.build(c, log=quiet)
  with pmesh.use(loop.mesh, loop.rules):
    batch = loop._put(next(loop.train_batches))  # a rollout's first global batch
    assert program_fingerprint(loop.lower_train_step(batch)) == actor.step("actor train").program


def test_a_different_program_has_a_different_fingerprint(tmp_path):
  c = load("sft_tiny", tmp_path / "sft", **{"train.max_steps": 4, "train.global_batch_size": 8})
  c.mesh.update(SHARDED)
  [planned] = plan(c, peak_flops=1e12)
  c.optimizer.grad_clip = 0.0  # no clipping: another update rule
  [other] = plan(c, peak_flops=1e12)
  assert planned.step("train").program != other.step("train").program
