"""PPO with a critic (NeMo-Aligner's ``gpt_ppo_actor.yaml`` and its critic server), NeMo's names in
comments. The actor job (policy training, rollouts, the initial policy's log-probs) runs on ``mesh``;
the critic job (critic training and inference, the reward model) on ``critic.mesh``, as NeMo runs them
as two jobs."""

import functools

import jax.numpy as jnp
import ml_collections

from jalign.losses import ppo
from jalign.specs.base import (AlgorithmSpec, RolloutSettings, RolloutSpec, require, require_reward_model,
                               require_rollout_policy, sampling)


def block():
  b = ml_collections.ConfigDict()
  b.num_rollout_samples = 512  # prompts per PPO step
  b.rollout_micro_batch_size = 8  # prompts generated at once on each data-parallel rank
  b.max_new_tokens = 2048      # length_params.max_length
  b.min_new_tokens = 1         # length_params.min_length
  b.temperature = 1.0
  b.top_k = 0
  b.top_p = 1.0
  b.kl_coef = 0.01             # initial_policy_kl_penalty
  b.absolute_kl = True         # use_absolute_kl
  b.clip_eps = 0.2             # ratio_eps
  b.entropy_coef = 0.0         # entropy_bonus
  b.gamma = 1.0                # discount_factor
  b.lam = 0.95                 # gae_lambda
  b.normalize_advantages = True
  b.offload_adam_states = True  # the actor's optimizer state in pinned host memory while rollouts generate and score
  b.unload_engine_train = False  # free the generation copy of the weights while training
  # Logical-axis rules of the generation copy of the weights and of generation's activations; empty:
  # the training rules with parameters sharded over tensor only (replicated over data and fsdp).
  b.generation_rules = ()
  return b


def critic_block():
  b = ml_collections.ConfigDict()
  b.init = "random"         # run:<reward model run> | hf:<HF reward model folder> (NeMo starts the critic from the RM)
  b.preset = "tiny"         # with init=random
  b.reward_model = "random"  # run:<reward model run> | hf:<HF reward model folder>; random: a model of critic.preset
  b.mesh = ml_collections.ConfigDict({"data": -1, "pipeline": 1, "fsdp": 1, "tensor": 1})
  b.global_batch_size = 64
  b.micro_batch_size = 1
  b.lr = 9e-6
  b.min_lr = 9e-7
  b.weight_decay = 0.1
  b.loss_clip = 0.2         # loss_clip_val
  b.offload_adam_states = True  # while serving values and rewards
  # Where the critic job runs: "" in the actor's process; "host:port" the HTTP address of a critic server
  # started by python -m jalign.serve (NeMo's remote_critic_rm.critic.{ip,port}).
  b.server = ""
  b.serve_address = "127.0.0.1:5556"  # what python -m jalign.serve binds (0.0.0.0:<port> for other hosts)
  b.overlap_train = True  # with a server: the critic trains while the actor does (NeMo does not await it)
  b.max_request_rows = 4096  # the server refuses larger requests (one request holds it while it runs)
  # How long the actor waits for the server to serve at its start (a large critic loads for minutes), and
  # for one answer from a server that still answers its liveness checks: one that stops answering them
  # is noticed within seconds.
  b.connect_timeout_s = 600.0
  b.timeout_s = 1800.0
  return b


NAMES = {"num_prompts": "num_rollout_samples", "micro_batch_size": "rollout_micro_batch_size",
         "max_new_tokens": "max_new_tokens", "min_new_tokens": "min_new_tokens", "temperature": "temperature",
         "top_k": "top_k", "top_p": "top_p"}


def settings(c) -> RolloutSettings:
  """The sampling keys (``config.rollout`` over ``config.ppo``): one sample per prompt."""
  p = c.ppo
  picked = sampling(c, "ppo", block(), NAMES, fixed={"samples_per_prompt": 1})
  return RolloutSettings.from_sampling(
      picked, kept=1, kl_coef=p.kl_coef, absolute_kl=p.absolute_kl,
      generation_rules=tuple(tuple(r) for r in p.generation_rules), offload_optimizer=p.offload_adam_states,
      unload_engine_train=p.unload_engine_train)


def validate(c, check_files):
  s = settings(c)
  length, key = c.data.max_seq_length, s.keys
  for size_key, size in (("train.global_batch_size", c.train.global_batch_size),
                         ("critic.global_batch_size", c.critic.global_batch_size)):
    require(s.prompts % size == 0, key["prompts"],
            f"{s.prompts} samples do not split into global batches of {size_key} {size}")
  require(s.micro_batch >= 1, key["micro_batch"], "must be at least 1")
  require(s.temperature > 0, key["temperature"], "must be positive")
  require(0 <= s.min_new_tokens <= s.max_new_tokens, key["min_new_tokens"],
          f"{s.min_new_tokens} is not within 0..{key['max_new_tokens']} {s.max_new_tokens}")
  require(s.max_new_tokens >= 1, key["max_new_tokens"], "must be at least 1")
  require(s.max_new_tokens < length, key["max_new_tokens"],
          f"{s.max_new_tokens} leaves no room for a prompt in data.max_seq_length {length}")
  require(c.critic.max_request_rows >= s.prompts, "critic.max_request_rows",
          f"{c.critic.max_request_rows} is fewer than the {s.prompts} rows of a rollout, which the actor sends at once")
  require_rollout_policy(c)
  for name in ("connect_timeout_s", "timeout_s"):
    require(c.critic[name] > 0, f"critic.{name}", f"{c.critic[name]} is not a positive number of seconds")
  for name in ("init", "reward_model"):
    require_reward_model(c.critic[name], f"critic.{name}", check_files, random=True)


def train_fields(c) -> dict:
  names = ("mask", "old_logprobs", "advantages") + (("tis_weights",) if c.rollout.tis_cap else ())
  return {name: ("token", jnp.float32) for name in names}


def actor_loss(c):
  return functools.partial(ppo.actor_train_loss, clip_eps=c.ppo.clip_eps, entropy_coef=c.ppo.entropy_coef)


SPEC = AlgorithmSpec(
    "ppo", formats=("prompt",), recipe="ppo", blocks={"ppo": block, "critic": critic_block}, validate=validate,
    sampling=settings,
    rollout=RolloutSpec(train_fields=train_fields, loss=actor_loss, with_kl=True, critic=True,
                        reward_model="critic.reward_model"),
    plan_jobs=("actor", "critic"))
