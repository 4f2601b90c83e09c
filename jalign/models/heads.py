"""Value heads on the final hidden state: scalar critics and multi-attribute reward models.

``ValueModel(config, num_outputs=A)`` is a Transformer trunk (without the language-model output
projection) plus a linear head with bias, computed in float32 as NeMo-Aligner does
(``force_head_dtype``). ``model(tokens)`` gives per-token values ``[B,T,A]``; ``model.score(tokens,
lengths)`` picks each row's value at its last token, the reward of a reward model; ``model.values(tokens)``
merges the attributes into one value per token, what a critic started from a reward model outputs
(NeMo-Aligner's ``output_sequence=True``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jalign.models.llama import LlamaConfig, Transformer
from jalign.parallel.logical import ACT_EMBED, BATCH, EMBED, LENGTH, VALUE_OUT, constrain


class ValueHead(nnx.Module):

  def __init__(self, hidden_size: int, num_outputs: int = 1, *, rngs: nnx.Rngs, std: float = 0.02):
    kernel = std * jax.random.normal(rngs.params(), (hidden_size, num_outputs), jnp.float32)
    self.kernel = nnx.Param(kernel, logical_axes=(EMBED, VALUE_OUT))
    self.bias = nnx.Param(jnp.zeros((num_outputs,), jnp.float32), logical_axes=(VALUE_OUT,))

  def __call__(self, hidden):
    hidden = constrain(hidden.astype(jnp.float32), (BATCH, LENGTH, ACT_EMBED))
    return hidden @ self.kernel[...] + self.bias[...]


def merge_attributes(values, attribute_weights=None) -> jax.Array:
  """``[..., A] -> [...]``: the weighted sum of the attributes (default weights 1/A)."""
  values = jnp.asarray(values)
  num = values.shape[-1]
  weights = jnp.full((num,), 1.0 / num) if attribute_weights is None else jnp.asarray(attribute_weights, values.dtype)
  if weights.shape != (num,):
    raise ValueError(f"attribute_weights has shape {weights.shape}; the model has {num} outputs")
  return values @ weights


class ValueModel(nnx.Module):
  """Transformer trunk + value head; values ``[B,T,A]`` float32."""

  def __init__(self, config: LlamaConfig, num_outputs: int = 1, *, rngs: nnx.Rngs):
    self.backbone = Transformer(config, rngs=rngs, with_lm_head=False)
    self.head = ValueHead(config.hidden_size, num_outputs, rngs=rngs, std=config.initializer_range)

  @property
  def config(self) -> LlamaConfig:
    return self.backbone.config

  def __call__(self, tokens, *, positions=None, segment_ids=None) -> jax.Array:
    return self.head(self.backbone.hidden_states(tokens, positions=positions, segment_ids=segment_ids))

  def score(self, tokens, lengths, **kwargs) -> jax.Array:
    """Each row's values ``[B,A]`` at its last token (index ``lengths - 1``)."""
    values = self(tokens, **kwargs)
    rows = jnp.arange(values.shape[0])
    return values[rows, jnp.asarray(lengths) - 1]

  def values(self, tokens, *, attribute_weights=None, **kwargs) -> jax.Array:
    """One value per token ``[B,T]``: the outputs merged by ``attribute_weights`` ``[A]`` (default
    uniform, NeMo's ``merge_attributes``); a critic's values, or a reward model's at every prefix."""
    return merge_attributes(self(tokens, **kwargs), attribute_weights)

  def copy(self) -> "ValueModel":
    """A model with its own copy of every parameter (e.g. a critic to train, starting from a reward model)."""
    graphdef, state = nnx.split(self)
    return nnx.merge(graphdef, jax.tree.map(jnp.array, state))

  @classmethod
  def from_transformer(cls, model: Transformer, num_outputs: int = 1, *, rngs: nnx.Rngs) -> "ValueModel":
    """A value model whose trunk shares the parameters of a language model (e.g. an SFT checkpoint)."""
    out = nnx.eval_shape(lambda: cls(model.config, num_outputs, rngs=nnx.Rngs(0)))
    trunk = nnx.state(model, nnx.Param)
    if "lm_head" in trunk:
      del trunk["lm_head"]
    nnx.update(out.backbone, trunk)
    out.head = ValueHead(model.config.hidden_size, num_outputs, rngs=rngs)
    return out
