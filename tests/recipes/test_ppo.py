"""PPO with a critic: a rollout's values, KL rewards, GAE and whitened advantages against plain numpy,
the critic trained on its returns, and actor and critic checkpoints that resume together."""

import json
import shutil

import jax
import numpy as np
import pytest

from jalign import config as config_lib
from jalign import trainer
from jalign.data.packing import build_row
from jalign.recipes import critic as critic_lib
from jalign.recipes import ppo, rollouts
from jalign.data.sft import Example
from jalign.models import lora
from jalign.parallel import mesh as pmesh
from jalign.recipes.build import load_trained
from jalign.recipes.reward import RewardModel
from jalign.train import run
from tests.conftest import load, quiet

N = 16  # rollout samples; two actor and two critic optimizer steps of 8 per rollout


def ppo_config(tmp_path, reward_run, sft_run, **overrides):
  return load("ppo_tiny", tmp_path / "ppo", **{
      "model.init": f"run:{sft_run}", "critic.init": f"run:{reward_run}", "critic.reward_model": f"run:{reward_run}",
      "rollout.num_prompts": N, "rollout.micro_batch_size": N, "rollout.max_new_tokens": 12,
      "ppo.kl_coef": 0.5, "train.global_batch_size": 8, "train.micro_batch_size": 1,
      "critic.global_batch_size": 8, "critic.micro_batch_size": 1, "train.max_steps": 4, "train.save_interval": 2,
      "train.val_check_interval": 2, **overrides})


def np_gae(rewards, values, mask, gamma, lam):
  """GAE by a plain backward loop over each row, values and rewards masked."""
  rewards, values = rewards * mask, values * mask
  advantages = np.zeros_like(rewards)
  for i in range(rewards.shape[0]):
    running = 0.0
    for t in reversed(range(rewards.shape[1])):
      following = values[i, t + 1] if t + 1 < rewards.shape[1] else 0.0
      running = rewards[i, t] + gamma * following - values[i, t] + gamma * lam * running
      advantages[i, t] = running
  return advantages, advantages + values


def test_first_rollout_matches_numpy_and_trains_the_critic(tmp_path, reward_run, sft_run):
  c = ppo_config(tmp_path, reward_run, sft_run, **{"ppo.gamma": 0.9})
  loop, rollouts = ppo.build(c, log=quiet)
  batches = rollouts.rollout()
  assert len(batches) == 2 and all(len(b["tokens"]) == 8 for b in batches)
  assert sorted(batches[0]) == sorted(("tokens", "targets", "positions", "segment_ids", "mask", "old_logprobs", "advantages"))
  every = rollouts.last  # the whole rollout, in sampling order
  tokens, mask, ended = every["tokens"], every["loss_mask"], every["is_end"]
  lengths = (every["segment_ids"] > 0).sum(1)
  # Scores and values from a reward model loaded afresh: the critic starts as its copy.
  reward_model = RewardModel.load(reward_run)
  examples = [Example(tokens[i, :n], np.zeros(n, bool)) for i, n in enumerate(lengths)]
  scores = reward_model.rewards(examples)
  np.testing.assert_allclose(every["rewards"], scores, rtol=1e-5, atol=1e-6)
  values = np.asarray(reward_model.model.values(tokens, positions=every["positions"],
                                                segment_ids=every["segment_ids"]))
  # pi_old: the SFT policy's log-probs of the sampled tokens, by log_softmax of its logits.
  policy, _, _ = load_trained(sft_run)
  logits = np.asarray(policy(tokens, positions=every["positions"], segment_ids=every["segment_ids"]), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, every["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(every["old_logprobs"][mask > 0], picked[mask > 0], rtol=1e-4, atol=1e-4)
  # The engine's own log-probs of what it sampled, in the same layout: the same float32 model decoding
  # with its KV cache, so the gap to the trainer's is rounding alone.
  engine = every["engine_logprobs"]
  np.testing.assert_allclose(engine[mask > 0], picked[mask > 0], atol=1e-4)
  assert not engine[mask == 0].any()
  # Step 0: the policy is the initial one, so the KL is 0 and the only reward is the score at the last
  # response token (index length - 2 in the log-prob layout).
  rewards = np.zeros(mask.shape)
  rewards[np.arange(N), lengths - 2] = scores
  advantages, returns = np_gae(rewards, values, mask, gamma=0.9, lam=c.ppo.lam)
  on = mask > 0
  whitened = (advantages - advantages[on].mean()) / np.sqrt(advantages[on].var() + 1e-8)
  np.testing.assert_allclose(every["advantages"][on], whitened[on], rtol=2e-4, atol=2e-4)
  # The actor trains on the responses that ended; the critic saw every response.
  np.testing.assert_array_equal(every["mask"], mask * ended[:, None])
  assert ended.sum() >= 2  # the fine-tuned policy ends some replies within 12 tokens: the actor trains on them
  stats = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl")]
  rollout_row = next(r for r in stats if r["split"] == "rollout")
  assert rollout_row["init_policy_kl"] == 0.0
  assert rollout_row["returns_mean"] == pytest.approx(returns[on].mean(), rel=1e-3, abs=1e-4)
  assert rollout_row["values_mean"] == pytest.approx(values[on].mean(), rel=1e-3, abs=1e-4)
  # One critic epoch: N / critic.global_batch_size optimizer steps moved the critic's values.
  critic_row = next(r for r in stats if r["split"] == "critic")
  assert int(jax.device_get(loop.companion.state.step)) == critic_row["optimizer_steps"] == 2
  assert np.isfinite(critic_row["critic_loss"])
  assert np.abs(loop.companion.values(every)[on] - values[on]).max() > 1e-4


def test_actor_and_critic_checkpoint_and_resume_together(tmp_path, reward_run, sft_run, monkeypatch):
  # While rollouts generate, the actor's Adam state waits in pinned host memory (ppo.offload_adam_states)
  # and generation reads a copy of the weights sharded over tensor only, where training shards them over fsdp.
  seen = set()
  generate = rollouts.Rollouts._generate

  def recording(self, prompts, *, seed):
    kinds = frozenset(leaf.sharding.memory_kind for leaf in jax.tree.leaves(self.loop.state.opt_state))
    out = generate(self, prompts, seed=seed)
    copy = self.engine.model.layers.attn.q_proj.get_value().sharding.spec
    trained = self.loop.state.params["layers"]["attn"]["q_proj"].get_value().sharding.spec
    seen.add((kinds, tuple(copy), tuple(trained)))
    return out
  monkeypatch.setattr(rollouts.Rollouts, "_generate", recording)

  def config(*args, **overrides):  # this test's mesh: data 2, fsdp 2, tensor 2
    c = ppo_config(*args, **{"train.micro_batch_size": 2, **overrides})
    c.mesh.update({"data": 2, "fsdp": 2, "tensor": 2, "pipeline": 1})
    return c

  summary = run(config(tmp_path, reward_run, sft_run), log=quiet)
  assert seen == {(frozenset({"pinned_host"}), (None, None, "tensor", None), ("pipeline", "fsdp", "tensor", None))}
  assert summary["steps"] == 4 and all(np.isfinite(list(summary["losses"].values())))
  folder = tmp_path / "ppo"
  rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
  assert [r["step"] for r in rows if r["split"] == "rollout"] == [0, 2]
  assert [r["optimizer_steps"] for r in rows if r["split"] == "critic"] == [2, 4]
  rollout_rows = [r for r in rows if r["split"] == "rollout"]
  assert rollout_rows[0]["init_policy_kl"] == 0.0 and rollout_rows[1]["init_policy_kl"] > 0.0
  val_rows = [r for r in rows if r["split"] == "val"]
  assert [r["step"] for r in val_rows] == [2, 4] and all(np.isfinite(r["val_reward"]) for r in val_rows)
  actor_steps = sorted(int(p.name) for p in (folder / "checkpoints").iterdir())
  assert sorted(int(p.name) for p in (folder / "critic" / "checkpoints").iterdir()) == actor_steps
  # A rerun resumes both: the critic continues from its 4 optimizer steps, not a fresh copy of the RM.
  summary = run(config(tmp_path, reward_run, sft_run, **{"train.max_steps": 6}), log=quiet)
  assert summary["steps"] == 6 and sorted(summary["losses"]) == [5, 6]
  rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
  assert [r["optimizer_steps"] for r in rows if r["split"] == "critic"] == [2, 4, 6]
  # Without its critic checkpoint a run does not resume on a fresh critic.
  shutil.rmtree(folder / "critic" / "checkpoints" / "6")
  with pytest.raises(trainer.TrainingError, match="no critic checkpoint at step 6"):
    run(config(tmp_path, reward_run, sft_run, **{"train.max_steps": 8}), log=quiet)


def test_the_critic_keeps_its_optimizer_in_host_memory_while_it_serves(tmp_path, reward_run, sft_run):
  """critic.offload_adam_states (what the planner counts): the critic's Adam state waits in pinned host
  memory while it gives values and rewards and is on the devices to train; values, training and the
  values after it are bitwise what they are without the offload."""
  tokens = np.asarray([[(7 * i + 3 * t) % 400 + 10 for t in range(40)] for i in range(16)])  # two critic steps
  rows = [build_row([Example(row, np.ones(len(row), bool))], 80, 0) for row in tokens]
  batch = {k: np.stack([r[k] for r in rows]) for k in ("tokens", "positions", "segment_ids")}
  mask = np.stack([r["loss_mask"] for r in rows])
  train_batch = {**batch, "mask": mask, "old_values": np.zeros_like(mask), "returns": mask * 0.5}
  results = []
  for offload in (True, False):
    c = ppo_config(tmp_path / str(offload), reward_run, sft_run, **{"critic.offload_adam_states": offload})
    critic = critic_lib.build(c, rollouts.trainer_options(c, False))
    kinds, values_pass = [], critic._values

    def watched(params, rest, part, critic=critic, kinds=kinds, values_pass=values_pass):
      kinds.append({x.sharding.memory_kind for x in jax.tree.leaves(critic.state.opt_state)})
      return values_pass(params, rest, part)

    critic._values = watched
    before = critic.values(batch)
    metrics = critic.train(train_batch)
    results.append((before, metrics, critic.values(batch)))
    assert kinds[0] == ({"pinned_host"} if offload else {"device"})
    assert {x.sharding.memory_kind for x in jax.tree.leaves(critic.state.opt_state)} == {"device"}
    assert critic.rewards([Example(tokens[0], np.zeros(40, bool))]).shape == (1,)
  (a_before, a_metrics, a_after), (b_before, b_metrics, b_after) = results
  np.testing.assert_array_equal(a_before, b_before)
  np.testing.assert_array_equal(a_after, b_after)
  assert a_metrics == b_metrics and np.abs(a_after - a_before).max() > 0


def test_bad_ppo_configs_name_their_key(tmp_path, reward_run, sft_run):
  with pytest.raises(config_lib.ConfigError, match="config.critic.reward_model: 'random'; PPO training needs"):
    run(ppo_config(tmp_path, reward_run, sft_run, **{"critic.reward_model": "random"}), log=quiet)
  with pytest.raises(config_lib.ConfigError, match="config.rollout.num_prompts: 12 samples do not split"):
    run(ppo_config(tmp_path, reward_run, sft_run, **{"rollout.num_prompts": 12}), log=quiet)
  with pytest.raises(config_lib.ConfigError, match="config.critic.reward_model: it scores up to 80"):
    run(ppo_config(tmp_path, reward_run, sft_run, **{"data.max_seq_length": 96}), log=quiet)
  with pytest.raises(config_lib.ConfigError, match="config.rollout.tis_cap: -1.0: must be 0"):
    run(ppo_config(tmp_path, reward_run, sft_run, **{"rollout.tis_cap": -1.0}), log=quiet)


@pytest.mark.many_steps
def test_lora_ppo_trains_only_adapters_generates_with_them_folded_in_and_ascends_its_objective(
    tmp_path, facts_reward_run, sft_run, monkeypatch):
  """lora.rank on the rollout policy: the adapters alone train (the base stays frozen and, adapters
  off, is the KL's initial policy), generation reads a plain copy with the adapters folded into its
  kernels, and a step on a rollout's batch lowers the clipped surrogate loss of that batch. (Whether the
  mean reward against the tiny reward model then rises over 40 steps turns on the last bits of that
  model's training: measured, it rose by 0.5-1.3 for some and fell for others, so it is not asserted.)"""
  seen = []
  engine_ready = rollouts.Rollouts.engine_ready

  def compared(self):
    engine = engine_ready(self)
    copy, policy = engine.model, self.loop.model()
    tokens = jax.numpy.asarray([[5, 17, 42, 99, 3, 250, 7, 64]])
    gap = float(jax.numpy.abs(copy(tokens) - policy(tokens)).max())
    seen.append((lora.has_lora(copy), lora.has_lora(policy), gap, self.loop))
    return engine
  monkeypatch.setattr(rollouts.Rollouts, "engine_ready", compared)

  steps = 40  # 20 rollouts, each of half the 32 validation prompts: every two see the same prompts
  c = ppo_config(tmp_path, facts_reward_run, sft_run, **{
      "lora.rank": 8, "optimizer.lr": 1e-2, "optimizer.min_lr": 1e-3, "ppo.kl_coef": 0.01,
      "data.train": "bundled:prompts_val.jsonl",
      "train.max_steps": steps, "train.save_interval": steps, "train.val_check_interval": 0})
  loop, _ = ppo.build(c, log=quiet)
  with pmesh.use(loop.mesh, loop.rules):
    batch = loop._put(next(loop.train_batches))  # the first rollout's first batch, as the run's step gets it
    loop._jit(batch)
    surrogate = jax.jit(loop._eval_fn)
    loss = lambda state: float(np.divide(*jax.device_get(surrogate(state, batch)[:2])))
    stepped = jax.tree.map(jax.numpy.copy, loop.state)
    for _ in range(3):  # the first of the warm-up steps has a rate of 0
      stepped, _ = loop._train_step(stepped, batch)
    assert loss(stepped) < loss(loop.state) - 1e-3
  summary = rollouts.run_loop(c, loop, quiet)
  assert summary["steps"] == steps
  assert seen[-1][3] is loop
  trained, frozen = trainer.count(loop.state.params), trainer.count(loop.state.rest)
  assert trained / (trained + frozen) < 0.05, (trained, frozen)
  assert all(not on_copy and on_policy for on_copy, on_policy, _, _ in seen)
  assert max(gap for _, _, gap, _ in seen) < 1e-4  # the folded copy computes what the adapters do
  rows = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl")]
  rollout_rows = [r for r in rows if r["split"] == "rollout"]
  assert rollout_rows[0]["init_policy_kl"] == 0.0 and rollout_rows[-1]["init_policy_kl"] > 0.0
  # The checkpoint holds the adapters and their optimizer state, no base weight.
  metadata = json.loads((tmp_path / "ppo" / "checkpoints" / str(steps) / "state" / "_METADATA").read_text())
  weights = [key for key, value in metadata["tree_metadata"].items()
             if value["value_metadata"].get("write_shape") is not None and "params" in key]
  assert weights and all("_lora_" in key for key in weights), weights
  # The run as a starting point (run:<folder>, export): its base with the trained adapters.
  restored, _, _ = load_trained(tmp_path / "ppo")
  tokens = jax.numpy.asarray([[5, 17, 42, 99, 3, 250, 7, 64]])
  np.testing.assert_allclose(restored(tokens), loop.model()(tokens), atol=1e-5)
