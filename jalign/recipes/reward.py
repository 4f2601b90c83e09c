"""Reward models at inference: rewards for responses read at the last token, standardised by the
run's ``reward_standardization.json`` (NeMo-Aligner's ``reward_standardization``), merged over
attributes, and the critic a reward model starts.

``RewardModel.load(run_dir)`` reads a reward-model run (``algorithm = "rm"``): rewards come out as
``(r - mean) / std`` with ``mean`` and ``std`` from the run folder's standardisation file (none: 0 and 1),
which ``score_comparisons(..., fit_standardization=True)`` fits. ``RewardModel.load_hf(folder, c)`` reads
a Hugging Face reward model folder (LlamaForSequenceClassification, ``jalign.models.hf_value``) with its
own tokenizer; it was not trained by this package, so the config that loads it says how prompts and
responses are encoded, and its rewards are its raw scores (mean 0, std 1) unless the folder holds a
standardisation file. ``RewardModel.critic()`` is a value model with its own copy of the weights that
outputs a value per token, how PPO's critic starts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jalign import config as config_lib
from jalign.data import preference
from jalign.data.packing import build_row
from jalign.data.sft import Example
from jalign.data.tokenizer import Tokenizer
from jalign.losses import rm
from jalign.models import LlamaConfig, hf_value
from jalign.models.heads import ValueModel, merge_attributes
from jalign.parallel import mesh as pmesh
from jalign.recipes.build import load_trained, read_run_config, rules_of, run_model_config
from jalign.specs.base import ConfigError, message_format

STANDARDIZATION_FILE = "reward_standardization.json"


def read_standardization(run_dir: Path) -> tuple[float, float]:
  """``(mean, std)`` of a run's ``reward_standardization.json``, or ``(0, 1)`` without one."""
  path = Path(run_dir) / STANDARDIZATION_FILE
  if not path.is_file():
    return 0.0, 1.0
  try:
    data = json.loads(path.read_text())
    mean, std = float(data["mean"]), float(data["std"])
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{path}: expected {{\"mean\": number, \"std\": number}} ({e})") from None
  if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
    raise ConfigError(f"{path}: std must be a positive number and mean finite, got {mean}, {std}")
  return mean, std


def write_standardization(run_dir: Path, mean: float, std: float, **info) -> Path:
  path = Path(run_dir) / STANDARDIZATION_FILE
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps({"mean": mean, "std": std, **info}, indent=2))
  tmp.replace(path)
  return path


# How a config names a reward model: a jalign rm run folder, or a Hugging Face reward model folder.
SOURCES = ("run:", "hf:")


def reward_model_config(spec: str) -> LlamaConfig:
  """The trunk config of the reward model ``spec`` names (``run:<folder>`` or ``hf:<folder>``), read
  without its weights."""
  if spec.startswith("hf:"):
    return hf_value.read_config(spec[3:])[0]
  return run_model_config(spec[4:])


@functools.lru_cache(maxsize=16)
def last_token_scorer(graphdef):
  """One jitted scorer per model structure, so that scoring rollout after rollout compiles once."""

  @jax.jit
  def score(state, batch):
    values = nnx.merge(graphdef, state, copy=True)(batch["tokens"], positions=batch["positions"],
                                                   segment_ids=batch["segment_ids"])
    return rm.gather_last(values, batch["length"])
  return score


def scoring_length(c, spec: str) -> int:
  """The length of the rows the reward model ``spec`` names scores: a run's own ``data.max_seq_length``;
  a Hugging Face one's is that of config ``c``, which encodes for it."""
  return read_run_config(spec[4:]).data.max_seq_length if spec.startswith("run:") else c.data.max_seq_length


def scoring_row(example: Example | None, max_length: int, pad: int) -> dict:
  """One row of what the scorer reads: an example (None: an empty row) in ``max_length`` columns, and
  its length."""
  examples = [] if example is None else [example]
  return {**build_row(examples, max_length, pad), "length": np.int32(len(example) if example is not None else 0)}


def last_token_values(model: ValueModel, tok, examples: list[Example], *, max_length: int,
                      batch_size: int = 8, mesh=None, rules=pmesh.DEFAULT_RULES) -> np.ndarray:
  """``[N, A]``: a value model's outputs at each example's last token, ``batch_size`` rows of
  ``max_length`` at a time (one compiled shape). With the ``mesh`` the model is placed on, each
  data-parallel group scores its own rows when ``batch_size`` divides over them."""
  split = mesh is not None and batch_size % pmesh.data_parallel_size(mesh, rules) == 0
  graphdef, state = nnx.split(model)
  score = last_token_scorer(graphdef)
  pad = tok.pad_id if tok.pad_id is not None else 0
  out = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    rows = [scoring_row(ex, max_length, pad) for ex in chunk]
    rows += [rows[-1]] * (batch_size - len(rows))  # one compiled shape; the copies are discarded
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch = pmesh.put_global_batch(batch, mesh, rules) if split else jax.tree.map(jnp.asarray, batch)
    out.append(pmesh.fetch(score(state, batch))[:len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, model.head.kernel.shape[-1]), np.float32)


@dataclasses.dataclass
class RewardModel:
  model: ValueModel
  tokenizer: object
  config: object
  mean: float = 0.0
  std: float = 1.0
  attribute_weights: tuple | None = None
  mesh: object = None  # where the weights are placed (see ``place``)
  rules: tuple = pmesh.DEFAULT_RULES

  def place(self, mesh, rules) -> "RewardModel":
    """Puts the weights on ``mesh`` by ``rules`` (also across processes); scoring then splits its rows
    over the mesh's data-parallel groups."""
    graphdef, weights = nnx.split(self.model)
    self.model = nnx.merge(graphdef, pmesh.place(weights, pmesh.tree_shardings(weights, mesh, rules)))
    self.mesh, self.rules = mesh, rules
    return self

  @classmethod
  def load(cls, run_dir, *, attribute_weights=None, mesh=None, rules=None, model: dict | None = None) -> "RewardModel":
    """The reward model of a run folder; with ``mesh``, read straight onto it by ``rules`` (default: the
    run's); ``model``: ``config.model`` keys in place of the run's (``load_trained``)."""
    run_dir = Path(run_dir)
    model, tok, c = load_trained(run_dir, mesh=mesh, rules=rules, model=model)
    if not isinstance(model, ValueModel):
      raise ConfigError(f"{run_dir}: a {c.algorithm} run, not a reward model (algorithm rm)")
    if attribute_weights is not None and len(attribute_weights) != model.head.kernel.shape[-1]:
      raise ValueError(f"{len(attribute_weights)} attribute weights for a reward model of "
                       f"{model.head.kernel.shape[-1]} outputs ({run_dir})")
    mean, std = read_standardization(run_dir)
    reward = cls(model, tok, c, mean, std, None if attribute_weights is None else tuple(attribute_weights))
    return reward if mesh is None else reward.place(mesh, rules or rules_of(c))

  @classmethod
  def load_hf(cls, folder, c, *, dtype: str | None = None, attribute_weights=None, mesh=None,
              rules=None) -> "RewardModel":
    """The Hugging Face reward model in ``folder`` with the folder's tokenizer, encoding and scoring as
    config ``c``'s data settings say (``data.max_seq_length``, chat template, ``add_eos``); parameters
    in ``dtype`` (default ``model.param_dtype``), computing in ``model.dtype``; with ``mesh``, read
    straight onto it by ``rules`` (default: ``c``'s)."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
      raise ConfigError(f"{folder}: no tokenizer.json; a Hugging Face reward model is read with its own tokenizer")
    rules = rules_of(c) if rules is None else rules
    m = c.model
    with pmesh.use(mesh, rules):  # the reader places each tensor by the rules active here
      model = hf_value.load(folder, dtype=dtype or m.param_dtype, compute_dtype=m.dtype, remat=m.remat, mesh=mesh)
    outputs = model.head.kernel.shape[-1]
    if attribute_weights is not None and len(attribute_weights) != outputs:
      raise ValueError(f"{len(attribute_weights)} attribute weights for a reward model of {outputs} outputs ({folder})")
    mean, std = read_standardization(folder)
    reward = cls(model, Tokenizer.from_dir(folder), c, mean, std,
                 None if attribute_weights is None else tuple(attribute_weights))
    return reward if mesh is None else reward.place(mesh, rules)

  @classmethod
  def load_to_score(cls, c, key: str, mesh=None, rules=None) -> "RewardModel":
    """The reward model that config ``c``'s ``key`` names (``run:<folder>`` or ``hf:<folder>``), checked
    to score sequences of the config's ``data.max_seq_length``; with ``mesh``, read onto it by ``rules``.
    It only scores: its weights are kept in the compute dtype (``model.dtype``), as the planner counts them."""
    spec = config_lib.value_at(c, key)
    if not spec.startswith(SOURCES):
      raise ConfigError(f"config.{key}: {spec!r}; name a reward model, run:<folder> or hf:<folder>")
    if spec.startswith("hf:"):  # checked before minutes of reading weights
      limit = reward_model_config(spec).max_position_embeddings
      if limit < c.data.max_seq_length:
        raise ConfigError(f"config.{key}: it reads up to {limit} positions (max_position_embeddings), fewer "
                          f"than data.max_seq_length {c.data.max_seq_length}")
      if not (Path(spec[3:]) / "tokenizer.json").is_file():
        raise ConfigError(f"config.{key}: {spec[3:]} has no tokenizer.json; a Hugging Face reward model is "
                          "read with its own tokenizer")
      return cls.load_hf(spec[3:], c, dtype=c.model.dtype, mesh=mesh, rules=rules)
    scores_up_to = scoring_length(c, spec)
    if scores_up_to < c.data.max_seq_length:
      raise ConfigError(f"config.{key}: it scores up to {scores_up_to} tokens, fewer than data.max_seq_length "
                        f"{c.data.max_seq_length}")
    m = c.model
    return cls.load(spec[4:], mesh=mesh, rules=rules, model={"param_dtype": m.dtype, "dtype": m.dtype, "remat": m.remat})

  def check_reads(self, tok, key: str) -> None:
    """Refuses to score the token ids of ``tok`` (the policy's tokenizer) unless this reward model reads
    each as the same token: it scores the policy's ids as they are. Tokens it has beyond them (a pad
    token added to a public reward model's vocabulary) do no harm."""
    ours = self.tokenizer.backend.get_vocab(with_added_tokens=True)
    theirs = tok.backend.get_vocab(with_added_tokens=True)
    differ = sorted(i for token, i in theirs.items() if ours.get(token) != i)
    if differ:
      raise ConfigError(f"config.{key}: its tokenizer ({self.tokenizer.vocab_size} tokens) reads {len(differ)} of "
                        f"the policy's {tok.vocab_size} token ids as other tokens (first: {differ[0]}, "
                        f"{tok.id_to_token(differ[0])!r}); it scores the policy's tokens")
    if self.model.config.vocab_size < tok.vocab_size:
      raise ConfigError(f"config.{key}: a vocabulary of {self.model.config.vocab_size} tokens, fewer than the "
                        f"policy's tokenizer's {tok.vocab_size}; it reads the policy's tokens")

  def encode(self, prompt, response: str) -> Example | None:
    """A prompt and response as the reward model's training pairs were encoded (None: does not fit)."""
    d = self.config.data
    chat_format = message_format(self.config, self.tokenizer)
    example, _ = preference.encode_response(prompt, response, self.tokenizer, max_length=d.max_seq_length,
                                            chat_format=chat_format, add_eos=d.add_eos)
    return example

  def raw_scores(self, examples: list[Example], *, batch_size: int = 8) -> np.ndarray:
    """``[N]`` merged rewards before standardisation, read at each sequence's last token."""
    values = last_token_values(self.model, self.tokenizer, examples, max_length=self.config.data.max_seq_length,
                               batch_size=batch_size, mesh=self.mesh, rules=self.rules)
    return np.asarray(merge_attributes(values, self.attribute_weights))

  def rewards(self, examples: list[Example], *, batch_size: int = 8) -> np.ndarray:
    """``[N]`` standardised rewards."""
    return np.asarray(rm.standardize(self.raw_scores(examples, batch_size=batch_size), self.mean, self.std))

  def critic(self) -> ValueModel:
    """The critic PPO starts from this reward model: the same weights (a copy), a value per token
    through ``critic.values(tokens)``."""
    return self.model.copy()


def score_comparisons(reward_model: RewardModel, records: list[dict], *, fit_standardization: bool = False,
                      batch_size: int = 8) -> tuple[list[dict], dict]:
  """Copies of comparison ``records`` with ``chosen_reward`` / ``rejected_reward``, and a summary."""
  encoded = [(reward_model.encode(r["prompt"], r["chosen_response"]),
              reward_model.encode(r["prompt"], r["rejected_response"])) for r in records]
  examples = [ex for pair in encoded for ex in pair if ex is not None]
  raw = reward_model.raw_scores(examples, batch_size=batch_size)
  if fit_standardization:
    if len(raw) < 2:
      raise ValueError("fitting the standardisation needs at least two scored responses")
    reward_model.mean, reward_model.std = float(raw.mean()), float(max(raw.std(), 1e-6))
  scores = iter(np.asarray(rm.standardize(raw, reward_model.mean, reward_model.std)).tolist())
  out, wins, pairs, skipped = [], 0, 0, 0
  for record, (chosen, rejected) in zip(records, encoded):
    rc = next(scores) if chosen is not None else None
    rr = next(scores) if rejected is not None else None
    out.append(dict(record, chosen_reward=rc, rejected_reward=rr))
    if rc is None or rr is None:
      skipped += 1
    else:
      pairs += 1
      wins += rc > rr
  summary = {"records": len(records), "responses": len(raw), "pairs_scored": pairs, "skipped": skipped,
             "accuracy": wins / pairs if pairs else float("nan"),
             "mean": reward_model.mean, "std": reward_model.std}
  return out, summary
