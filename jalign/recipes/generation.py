"""The policy of a config served for generation (``python -m jalign.serve`` with ``generation.serve``;
``jalign.serve.generation`` binds it to PyTriton's endpoints)."""

from __future__ import annotations

from jalign.parallel import mesh as pmesh
from jalign.recipes import build
from jalign.rollout.generate import Rollout, generate

# Prompts are padded to a multiple of this many tokens, so that requests of similar lengths share a
# compiled loop.
PROMPT_WIDTH_MULTIPLE = 32


class GenerationJob:
  """The policy of a config, placed on its mesh, generating with each data-parallel group decoding its
  own rows when the batch divides over them."""

  def __init__(self, c):
    self.mesh, self.rules = pmesh.make_mesh(dict(c.mesh)), build.rules_of(c)
    self.model, own = build.build_model(c, self.mesh, self.rules)
    self.tokenizer = build.build_tokenizer(c, own)
    self.add_bos = c.data.add_bos
    self.data_parallel = pmesh.data_parallel_size(self.mesh, self.rules)
    self._rows = pmesh.batch_sharding(self.mesh, self.rules)
    self.pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0

  def generate(self, prompts: list[list[int]], *, max_new_tokens: int, stop_ids=None, **settings) -> Rollout:
    """A ``Rollout`` of host (numpy) arrays: every process of a server job gathers the whole of it."""
    if not prompts:
      raise ValueError("no prompts")
    longest = max(len(p) for p in prompts)
    width = -(-longest // PROMPT_WIDTH_MULTIPLE) * PROMPT_WIDTH_MULTIPLE
    stops = tuple(stop_ids) if stop_ids is not None else tuple(
        i for i in (self.tokenizer.eos_id,) if i is not None)
    rows = self._rows if len(prompts) % self.data_parallel == 0 else None
    out = generate(self.model, prompts, max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=self.pad,
                   prompt_width=width, batch_sharding=rows, **settings)
    return Rollout(*(pmesh.fetch(x) for x in (out.tokens, out.prompt_lengths, out.lengths, out.is_end, out.logprobs)))

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=self.add_bos)

  def decode(self, tokens: list[int]) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=True)
