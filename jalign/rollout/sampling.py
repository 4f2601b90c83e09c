"""What a rollout asks of an engine and gets back, and the sampling every engine does with a model.

``Request`` is how a rollout samples (``jalign.rollout.generate``'s settings) and in how many rows at
once; ``sample`` runs it on a model, in batches or with continuous batching, each data-parallel group of
the mesh decoding its own rows; ``Samples`` is what comes back, with the version of the weights. The
local engine and the generation server both call ``sample``, so for the same weights and request they
give the same tokens.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from jalign.parallel import mesh as pmesh
from jalign.rollout.generate import generate


@dataclasses.dataclass(frozen=True)
class Request:
  """How a rollout samples (``jalign.rollout.generate``'s settings), and in how many rows at once."""
  max_new_tokens: int
  min_new_tokens: int = 0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  stop_ids: tuple = ()
  pad_id: int = 0
  seed: int = 0            # prompt i samples with this seed folded with i
  prompt_width: int = 0    # prompts padded to at least this: one compiled loop for every rollout
  rows: int = 1            # rows decoding at once, over all data-parallel groups
  continuous: bool = False  # continuous batching (a row that stops takes the next prompt)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> "Request":
    values = json.loads(text)
    return cls(**{**values, "stop_ids": tuple(values.get("stop_ids", ()))})


@dataclasses.dataclass
class Samples:
  responses: list      # token lists, the stop token included when there is one
  is_end: np.ndarray   # [N] bool: stopped on a stop id
  logprobs: list       # the engine's log-prob of each response token under its model's own softmax
  version: int         # the weights' version (the trainer's step) that generated them


def sample(model, prompts: list[list[int]], request: Request, mesh, rules) -> tuple[list, np.ndarray, list]:
  """``(responses, is_end, logprobs)`` of ``model`` for ``prompts``: ``request.rows`` rows at once, each
  data-parallel group of ``mesh`` decoding its own (every process of a job passes the same prompts)."""
  size = request.rows
  groups = pmesh.data_parallel_size(mesh, rules) if mesh is not None else 1
  rows = pmesh.batch_sharding(mesh, rules) if mesh is not None and size % groups == 0 else None
  settings = dict(max_new_tokens=request.max_new_tokens, min_new_tokens=request.min_new_tokens,
                  temperature=request.temperature, top_k=request.top_k, top_p=request.top_p, greedy=request.greedy,
                  stop_ids=tuple(request.stop_ids), pad_id=request.pad_id, seed=request.seed,
                  prompt_width=request.prompt_width)
  if request.continuous:  # every prompt in one call
    calls = [(prompts, np.arange(len(prompts)), dict(slots=size, prefill_rows=groups))]
  else:  # batches of ``size`` (the last filled up with copies of its first prompt: one compiled shape)
    calls = []
    for start in range(0, len(prompts), size):
      chunk = prompts[start:start + size]
      calls.append((chunk + [chunk[0]] * (size - len(chunk)), np.arange(start, start + size),
                    dict(batch_sharding=rows)))
  responses, ended, logprobs = [], [], []
  for chunk, ids, how in calls:
    with pmesh.use(mesh, rules):  # the continuous loop's slots over the data-parallel groups
      out = generate(model, chunk, prompt_ids=ids, **settings, **how)
    kept = min(len(chunk), len(prompts) - len(responses))
    replies = out.responses()[:kept]
    responses += replies
    ended += pmesh.fetch(out.is_end)[:kept].tolist()
    policy = pmesh.fetch(out.policy_logprobs)
    logprobs += [policy[b, len(p):len(p) + len(r)] for b, (p, r) in enumerate(zip(chunk, replies))]
  return responses, np.asarray(ended, bool), logprobs
