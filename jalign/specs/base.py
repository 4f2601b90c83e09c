"""What an algorithm spec declares, and the helpers its validation and encoders share.

A spec is data: the config blocks the algorithm owns (with their defaults), its validation, the jsonl
formats it reads and how their records become batch rows, its loss and reference function, and for the
algorithms that generate their own data, their rollout settings. The recipes, the config and the
planner look a spec up by ``config.algorithm``; nothing switches on the name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jalign.data.chat import ModelChatTemplate, NemoChatFormat


class ConfigError(ValueError):
  """A config value that cannot run; the message names the key (``config.train.max_steps: ...``)."""


def require(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}: {message}")


def message_format(c, tok=None):
  """How message prompts are rendered: NeMo's chat format (``data.chat_prompt_tokens``), or with
  ``data.chat_template = "model"`` the tokenizer's own template."""
  if c.data.chat_template == "model":
    if tok is None or tok.chat_template is None:
      raise ConfigError(f"config.data.chat_template: 'model', but the tokenizer "
                        f"{getattr(tok, 'source', '')} has no chat template")
    return ModelChatTemplate(tok)
  return NemoChatFormat.extra_id() if c.data.chat_prompt_tokens == "extra_id" else NemoChatFormat()


def require_rollout_policy(c) -> None:
  """The checks every algorithm that trains its policy on its own rollouts (reinforce, rs, ppo) shares."""
  require(c.rollout.tis_cap >= 0, "rollout.tis_cap", f"{c.rollout.tis_cap}: must be 0 (off) or a positive cap")


def require_reward_model(value: str, key: str, check_files: bool, *, random: bool = False) -> None:
  """A reward model name: ``run:<jalign rm run folder>``, ``hf:<Hugging Face reward model folder>``, or
  (with ``random``) ``random``; with ``check_files``, the folder has its config.json."""
  choices = "random, run:<folder> or hf:<folder>" if random else "run:<folder> or hf:<folder>"
  require((random and value == "random") or value.startswith(("run:", "hf:")), key,
          f"{value!r}: name a reward model, {choices}")
  if check_files and value.startswith("run:"):
    require((Path(value[4:]) / "config.json").is_file(), key, f"{value[4:]} is not a jalign run folder")
  if check_files and value.startswith("hf:"):
    require((Path(value[3:]) / "config.json").is_file(), key,
            f"{value[3:]} is not a Hugging Face model folder (no config.json)")


# The fields of a packed row (``data.packing.build_row``) that every train step reads.
ROW_FIELDS = ("tokens", "targets", "positions", "segment_ids")


def _nothing(c, check_files: bool) -> None:
  return None


# The shared sampling block, ``config.rollout``: its keys, each None until set. A key left None takes
# the same setting from the algorithm's own block (``reinforce.*``, ``ppo.*``, ``spin.*``), where configs
# written before the shared block set it (and still may).
SAMPLING_KEYS = ("num_prompts", "samples_per_prompt", "micro_batch_size", "max_new_tokens", "min_new_tokens",
                 "temperature", "top_k", "top_p")


def sampling(c, block: str, defaults, names: dict[str, str], fixed: dict | None = None) -> dict:
  """``{key: (value, config key it came from)}`` for the shared sampling keys: ``config.rollout.<key>``
  when set, else ``config.<block>.<names[key]>``. Setting both to different values is an error (the
  algorithm's key at its default counts as unset); ``fixed`` keys have one possible value."""
  out = {}
  for key in SAMPLING_KEYS:
    value, new = c.rollout[key], f"rollout.{key}"
    if key in (fixed or {}):
      require(value is None or value == fixed[key], new, f"{value}: {c.algorithm} takes only {fixed[key]}")
      out[key] = (fixed[key], new)
    elif key not in names:
      require(value is None, new, f"{c.algorithm} has no such setting")
      out[key] = (None, new)
    else:
      old = f"{block}.{names[key]}"
      legacy = c[block][names[key]]
      if value is None:
        out[key] = (legacy, old)
      else:
        require(legacy == defaults[names[key]] or legacy == value, new,
                f"{value}, and config.{old} is {legacy}: set one of them")
        out[key] = (value, new)
  return out


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
  """How an algorithm samples (the shared ``config.rollout`` keys over its own block's) and what it
  trains on; ``keys`` names the config key each setting was read from, for messages."""
  keys: dict                  # setting name -> config key
  prompts: int                # prompts per rollout
  per_prompt: int             # samples of each prompt
  kept: int                   # samples of each prompt trained on
  micro_batch: int            # sequences generated at once on each data-parallel rank
  max_new_tokens: int         # 0: data.max_seq_length // 2
  min_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  kl_coef: float = 0.0
  absolute_kl: bool = True
  generation_rules: tuple = ()   # rules of the generation copy of the weights; empty: tensor-parallel only
  offload_optimizer: bool = False  # the optimizer state in pinned host memory while a rollout runs
  unload_engine_train: bool = False  # the generation copy freed while training
  greedy: bool = False

  @classmethod
  def from_sampling(cls, picked: dict, **others) -> "RolloutSettings":
    """Settings from ``sampling``'s picks (renamed to the fields) and the algorithm's own ``others``."""
    fields = {"num_prompts": "prompts", "samples_per_prompt": "per_prompt", "micro_batch_size": "micro_batch"}
    values = {fields.get(k, k): v for k, (v, _) in picked.items()}
    keys = {fields.get(k, k): key for k, (_, key) in picked.items()}
    return cls(keys=keys, **{**values, **others})

  @property
  def samples(self) -> int:
    """Samples generated in one rollout."""
    return self.prompts * self.per_prompt

  @property
  def trained(self) -> int:
    """Samples one rollout trains on."""
    return self.prompts * self.kept


def require_sampling(c, s: RolloutSettings, why_two: str) -> None:
  """The checks every algorithm that samples several replies per prompt makes of its settings;
  ``why_two`` says why it needs at least two samples of each prompt."""
  key, length, batch = s.keys, c.data.max_seq_length, c.train.global_batch_size
  require(s.per_prompt >= 2, key["per_prompt"], f"must be at least 2 ({why_two})")
  require(s.trained % batch == 0, key["prompts"],
          f"{s.prompts} x {s.kept} samples to train on do not split into global batches of {batch}")
  require(s.micro_batch >= 1, key["micro_batch"], "must be at least 1")
  require(0 <= s.max_new_tokens < length and 0 <= s.min_new_tokens <= (s.max_new_tokens or length // 2),
          key["max_new_tokens"], f"need 0 <= min_new_tokens <= max_new_tokens < data.max_seq_length {length}")
  require(s.temperature > 0, key["temperature"], "must be positive")
  require_rollout_policy(c)


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
  """What an algorithm that trains on rollouts adds: the fields of the rows its train step reads
  (beyond tokens, targets, positions and segment ids) and its loss."""
  train_fields: Callable[[Any], dict]   # name -> dtype of the per-token or per-row fields, for the planner
  loss: Callable[[Any], Callable]
  # Needs the current and initial policy's log-probs (the KL); a function of the config where that
  # depends on it.
  with_kl: bool | Callable[[Any], bool]
  critic: bool = False                  # a critic job (and its server) beside the actor, which scores
  reward_model: str = "reinforce.reward_model"  # the config key of the reward model run that scores
  always_old: bool = False              # needs the current policy's log-probs (pi_old) even without a KL

  def fields(self, c) -> tuple[str, ...]:
    """Every field of the rows the train step reads."""
    return ROW_FIELDS + tuple(self.train_fields(c))

  def initial(self, c) -> bool:
    """Whether config ``c`` needs the initial policy's log-probs."""
    return self.with_kl(c) if callable(self.with_kl) else self.with_kl

  def old(self, c) -> bool:
    """Whether config ``c`` needs the current policy's log-probs of each rollout."""
    return self.always_old or self.initial(c)


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
  """One algorithm. ``recipe`` names the job that runs it (``jalign.train`` looks it up)."""
  name: str
  formats: tuple[str, ...]
  recipe: str = "train"
  blocks: dict = dataclasses.field(default_factory=dict)   # config block name -> () -> its defaults
  validate: Callable[[Any, bool], None] = _nothing  # (c, check_files): the checks of its own keys
  # (c, tok, records, path) -> (examples, EncodeStats): a jsonl file's records as training examples.
  encode: Callable | None = None
  # (c, examples) -> [[example index, ...] per row]: which examples share a row.
  plan: Callable | None = None
  # (c, slots) -> (make_row, length): how a row is built; ``slots``: items the fullest row holds.
  row: Callable | None = None
  # (c, model) -> (model, loss_fn, reference_fn or None): what trains and how.
  parts: Callable | None = None
  # With LoRA, parameters that train besides the adapters (a reward model's new head).
  lora_also_trains: Any = None
  # How it generates (the shared config.rollout keys over its own block's); None: it generates nothing.
  sampling: Callable[[Any], RolloutSettings] | None = None
  rollout: RolloutSpec | None = None
  plan_jobs: tuple[str, ...] = ("train",)  # the planner's jobs for this algorithm
