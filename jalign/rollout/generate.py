"""Autoregressive generation with the model's KV cache: one prefill, then a jitted decode loop.

``generate(model, prompts, ...)`` takes prompts of different lengths and returns a ``Rollout`` whose
rows start with their prompt at column 0 and continue with the response, right-padded with
``pad_id``. Sampling follows Hugging Face's order: temperature, then top-k, then top-p; stop ids are
suppressed until ``min_new_tokens`` tokens exist. ``logprobs`` are the log-probs of the sampled
tokens under the distribution they were drawn from (the plain softmax when greedy); ``policy_logprobs``
under the model's own softmax, before temperature, top-k, top-p and the stop-id suppression (what the
trainer computes for the same tokens: ``jalign.losses.offpolicy`` compares the two).
"""

from __future__ import annotations

from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jalign.parallel.mesh import fetch, from_host

_NEG_INF = -1e30


@flax.struct.dataclass
class Rollout:
  tokens: jax.Array          # [B,T] prompt then response, right-padded
  prompt_lengths: jax.Array  # [B]
  lengths: jax.Array         # [B] prompt + response, stop token included
  is_end: jax.Array          # [B] stopped on a stop id rather than the length limit
  logprobs: jax.Array        # [B,T] sampling log-prob of generated tokens, 0 elsewhere
  policy_logprobs: jax.Array | None = None  # [B,T] the model's own log-prob of generated tokens, 0 elsewhere

  def responses(self) -> list[list[int]]:
    tokens, start, end = (fetch(x) for x in (self.tokens, self.prompt_lengths, self.lengths))
    return [tokens[b, start[b]:end[b]].tolist() for b in range(tokens.shape[0])]


def filter_logits(logits, *, temperature=1.0, top_k=0, top_p=1.0):
  """Scaled and truncated logits ``[B,V]``; removed entries are set to a large negative value."""
  logits = logits / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, _NEG_INF, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
    before = jnp.cumsum(probs, axis=-1) - probs
    drop_sorted = before >= top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, _NEG_INF, logits)
  return logits


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "min_new_tokens", "temperature",
                                   "top_k", "top_p", "greedy", "stop_ids", "pad_id"))
def generate_arrays(state, prompt_tokens, prompt_lengths, key, *, graphdef, max_new_tokens, min_new_tokens,
                    temperature, top_k, top_p, greedy, stop_ids, pad_id):
  """The jitted loop ``generate`` runs, on arrays: a model's ``nnx.split`` state, prompts ``[B,P]``
  right-padded, their lengths ``[B]`` and a PRNG key; returns ``(tokens, lengths, is_end, logprobs,
  policy_logprobs)``."""
  def forward(tokens, positions, cache):
    # Merged afresh at each trace level: NNX modules may not cross into the loop's trace.
    fresh = jax.tree.map(lambda x: x, state)
    return nnx.merge(graphdef, fresh)(tokens, positions=positions, cache=cache)

  b, p = prompt_tokens.shape
  total = p + max_new_tokens
  rows = jnp.arange(b)
  model = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
  cache = model.init_cache(b, total)
  # The prefill's logits at each row's last prompt token only: a [B,V] projection, not [B,P,V].
  hidden, cache = model.hidden_states(prompt_tokens, cache=cache)
  last = model.logits(hidden[rows, prompt_lengths - 1][:, None])[:, 0]
  tokens = jnp.full((b, total), pad_id, jnp.int32).at[:, :p].set(
      jnp.where(jnp.arange(p)[None] < prompt_lengths[:, None], prompt_tokens, pad_id))
  logprobs = jnp.zeros((b, total), jnp.float32)
  policy_logprobs = jnp.zeros((b, total), jnp.float32)
  stops = jnp.asarray(stop_ids, jnp.int32) if stop_ids else None

  def cond(carry):
    step, done = carry[0], carry[5]
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, key, last, cache, tokens, done, is_end, logprobs, policy_logprobs, count = carry
    key, sample_key = jax.random.split(key)
    policy = jax.nn.log_softmax(last.astype(jnp.float32), axis=-1)
    if stops is not None:
      suppress = jnp.zeros(last.shape[-1], bool).at[stops].set(True) & (step < min_new_tokens)
      last = jnp.where(suppress, _NEG_INF, last)
    if greedy:
      dist = last
      token = jnp.argmax(last, axis=-1).astype(jnp.int32)
    else:
      dist = filter_logits(last, temperature=temperature, top_k=top_k, top_p=top_p)
      token = jax.random.categorical(sample_key, dist, axis=-1).astype(jnp.int32)
    lp = jax.nn.log_softmax(dist, axis=-1)[rows, token]
    pos = prompt_lengths + step
    active = ~done
    tokens = tokens.at[rows, pos].set(jnp.where(active, token, pad_id))
    logprobs = logprobs.at[rows, pos].set(jnp.where(active, lp, 0.0))
    policy_logprobs = policy_logprobs.at[rows, pos].set(jnp.where(active, policy[rows, token], 0.0))
    hit = jnp.isin(token, stops) if stops is not None else jnp.zeros_like(done)
    is_end = is_end | (active & hit)
    count = count + active
    done = done | hit
    logits, cache = forward(token[:, None], pos[:, None], cache)
    return step + 1, key, logits[:, 0], cache, tokens, done, is_end, logprobs, policy_logprobs, count

  done = jnp.zeros((b,), bool)
  carry = (jnp.int32(0), key, last, cache, tokens, done, done, logprobs, policy_logprobs, jnp.zeros((b,), jnp.int32))
  _, _, _, _, tokens, _, is_end, logprobs, policy_logprobs, count = jax.lax.while_loop(cond, body, carry)
  return tokens, prompt_lengths + count, is_end, logprobs, policy_logprobs


def generate(model, prompts, *, max_new_tokens: int, min_new_tokens: int = 0, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, greedy: bool = False, stop_ids=(), pad_id: int = 0,
             seed: int = 0, prompt_width: int = 0, batch_sharding=None) -> Rollout:
  """Generate up to ``max_new_tokens`` tokens after each prompt (a list of token-id lists).

  Prompts are right-padded to the longest of them, or to ``prompt_width`` when that is more: callers
  that generate batch after batch pass one width so that every batch runs one compiled loop.
  ``batch_sharding`` (a sharding of ``[B]`` arrays, e.g. ``jalign.parallel.mesh.batch_sharding``)
  splits the rows over devices, so that each data-parallel group decodes its own rows instead of all of
  them; every process passes the same prompts. Samples do not depend on it.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
  if max_new_tokens < 1 or not 0 <= min_new_tokens <= max_new_tokens:
    raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens; "
                     f"got {max_new_tokens}, {min_new_tokens}")
  if not greedy and temperature <= 0:
    raise ValueError("temperature must be positive (use greedy=True for argmax decoding)")
  lengths = np.array([len(p) for p in prompts], np.int32)
  width = max(int(lengths.max()), int(prompt_width))
  padded = np.full((len(prompts), width), pad_id, np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p
  graphdef, state = nnx.split(model)
  if batch_sharding is not None:
    rows = batch_sharding.spec[0] if batch_sharding.spec else None
    prompt_tokens = from_host(padded, NamedSharding(batch_sharding.mesh, PartitionSpec(rows, None)))
    prompt_lengths = from_host(lengths, batch_sharding)
  else:
    prompt_tokens, prompt_lengths = jnp.asarray(padded), jnp.asarray(lengths)
  tokens, out_lengths, is_end, logprobs, policy_logprobs = generate_arrays(
      state, prompt_tokens, prompt_lengths, jax.random.key(seed), graphdef=graphdef,
      max_new_tokens=int(max_new_tokens), min_new_tokens=int(min_new_tokens),
      temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), greedy=bool(greedy),
      stop_ids=tuple(int(s) for s in stop_ids), pad_id=int(pad_id))
  return Rollout(tokens=tokens, prompt_lengths=jnp.asarray(lengths), lengths=out_lengths,
                 is_end=is_end, logprobs=logprobs, policy_logprobs=policy_logprobs)
