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


def choose_tokens(last, steps, keys, *, min_new_tokens, temperature, top_k, top_p, greedy, stop_ids):
  """The next token of each row from its logits ``last [B,V]`` after ``steps [B]`` generated tokens:
  ``(token, sampling log-prob, the model's own log-prob)``. Row b draws with ``fold_in(keys[b], steps[b])``,
  so a prompt's sample depends on its key and its step only, not on its row or the rows beside it."""
  policy = jax.nn.log_softmax(last.astype(jnp.float32), axis=-1)
  if stop_ids:
    stops = jnp.zeros(last.shape[-1], bool).at[jnp.asarray(stop_ids, jnp.int32)].set(True)
    last = jnp.where(stops[None] & (steps < min_new_tokens)[:, None], _NEG_INF, last)
  if greedy:
    dist = last
    token = jnp.argmax(last, axis=-1).astype(jnp.int32)
  else:
    dist = filter_logits(last, temperature=temperature, top_k=top_k, top_p=top_p)
    step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
    token = jax.vmap(jax.random.categorical)(step_keys, dist).astype(jnp.int32)
  rows = jnp.arange(last.shape[0])
  return token, jax.nn.log_softmax(dist, axis=-1)[rows, token], policy[rows, token]


def row_keys(key, prompt_ids):
  """Each row's sampling key: the call's ``key`` folded with the row's prompt id."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, prompt_ids)


def _merged(graphdef, state):
  """The model of ``state``, merged afresh: NNX modules may not cross into a loop's trace, so each
  trace level merges its own."""
  return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def _output_tokens(prompt_tokens, prompt_lengths, total: int, pad_id: int):
  """``[N, total]`` rows holding each prompt (its padding as ``pad_id``), the rest ``pad_id``."""
  p = prompt_tokens.shape[1]
  return jnp.full((prompt_tokens.shape[0], total), pad_id, jnp.int32).at[:, :p].set(
      jnp.where(jnp.arange(p)[None] < prompt_lengths[:, None], prompt_tokens, pad_id))


SAMPLING_STATICS = ("graphdef", "max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "greedy",
                    "stop_ids", "pad_id")


@partial(jax.jit, static_argnames=SAMPLING_STATICS)
def generate_arrays(state, prompt_tokens, prompt_lengths, prompt_ids, limits, key, *, graphdef, max_new_tokens,
                    min_new_tokens, temperature, top_k, top_p, greedy, stop_ids, pad_id):
  """The jitted static-batch loop ``generate`` runs, on arrays: a model's ``nnx.split`` state, prompts
  ``[B,P]`` right-padded, their lengths ``[B]``, their ids ``[B]`` (row b samples with ``key`` folded with
  ``prompt_ids[b]``) and limits of new tokens ``[B]`` (at most ``max_new_tokens``), and the call's PRNG
  ``key``; returns ``(tokens, lengths, is_end, logprobs, policy_logprobs)``. Every row keeps its slot
  until the last row stops."""
  b, p = prompt_tokens.shape
  total = p + max_new_tokens
  rows = jnp.arange(b)
  model = _merged(graphdef, state)
  cache = model.init_cache(b, total)
  # The prefill's logits at each row's last prompt token only: a [B,V] projection, not [B,P,V].
  hidden, cache = model.hidden_states(prompt_tokens, cache=cache)
  last = model.logits(hidden[rows, prompt_lengths - 1][:, None])[:, 0]
  tokens = _output_tokens(prompt_tokens, prompt_lengths, total, pad_id)
  logprobs = jnp.zeros((b, total), jnp.float32)
  policy_logprobs = jnp.zeros((b, total), jnp.float32)
  stops = jnp.asarray(stop_ids, jnp.int32) if stop_ids else None
  keys = row_keys(key, prompt_ids)
  choose = partial(choose_tokens, min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, greedy=greedy, stop_ids=stop_ids)

  def cond(carry):
    step, done = carry[0], carry[4]
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, last, cache, tokens, done, is_end, logprobs, policy_logprobs, count = carry
    token, lp, own = choose(last, jnp.full((b,), step), keys)
    pos = prompt_lengths + step
    active = ~done
    tokens = tokens.at[rows, pos].set(jnp.where(active, token, pad_id))
    logprobs = logprobs.at[rows, pos].set(jnp.where(active, lp, 0.0))
    policy_logprobs = policy_logprobs.at[rows, pos].set(jnp.where(active, own, 0.0))
    hit = jnp.isin(token, stops) if stops is not None else jnp.zeros_like(done)
    is_end = is_end | (active & hit)
    count = count + active
    done = done | hit | (count >= limits)
    logits, cache = _merged(graphdef, state)(token[:, None], positions=pos[:, None], cache=cache)
    return step + 1, logits[:, 0], cache, tokens, done, is_end, logprobs, policy_logprobs, count

  done = jnp.zeros((b,), bool)
  carry = (jnp.int32(0), last, cache, tokens, done, done, logprobs, policy_logprobs, jnp.zeros((b,), jnp.int32))
  _, _, _, tokens, _, is_end, logprobs, policy_logprobs, count = jax.lax.while_loop(cond, body, carry)
  return tokens, prompt_lengths + count, is_end, logprobs, policy_logprobs


@partial(jax.jit, static_argnames=SAMPLING_STATICS + ("slots", "prefill_rows"))
def continuous_arrays(state, prompt_tokens, prompt_lengths, prompt_ids, limits, key, *, graphdef, slots,
                      prefill_rows, max_new_tokens, min_new_tokens, temperature, top_k, top_p, greedy, stop_ids,
                      pad_id):
  """The jitted continuous-batching loop, on ``generate_arrays``'s arrays and with its results: ``slots``
  rows of KV cache decode together, and when a row stops the next prompts are prefilled into the free
  slots (up to ``prefill_rows`` prompts at a time, one prefill per decode step), so that a short reply
  frees its slot at once instead of waiting for the longest. A prompt's tokens do not depend on which
  slot it lands in or beside which others it decodes."""
  n, p = prompt_tokens.shape
  total = p + max_new_tokens
  empty = n  # what a slot that holds no prompt points at (scatters to it are dropped)
  keys = row_keys(key, prompt_ids)
  stops = jnp.asarray(stop_ids, jnp.int32) if stop_ids else None
  choose = partial(choose_tokens, min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, greedy=greedy, stop_ids=stop_ids)
  tokens = _output_tokens(prompt_tokens, prompt_lengths, total, pad_id)
  model = _merged(graphdef, state)
  cache = model.init_cache(slots, total)
  last = jnp.zeros((slots, model.config.vocab_size), jnp.float32)

  # A prompt is prefilled at the narrowest of these widths that holds it (a quarter of the padded
  # width at a time), not at the width of the longest prompt as a static batch must.
  widths = sorted({-(-p * k // 4) for k in range(1, 5)})

  def prefill(width, rows):
    """Logits at the last prompt token of prompts ``rows`` and their keys and values, prefilled at
    ``width`` and padded to the prompts' full width (the padding's positions are rewritten by decoding
    before anything reads them)."""
    model = _merged(graphdef, state)
    hidden, fresh = model.hidden_states(prompt_tokens[rows, :width], cache=model.init_cache(prefill_rows, width))
    logits = model.logits(hidden[jnp.arange(prefill_rows), prompt_lengths[rows] - 1][:, None])[:, 0]
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, p - width), (0, 0), (0, 0)))  # noqa: E731
    return logits, pad(fresh.k), pad(fresh.v)

  def skip(rows):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(partial(prefill, p), rows))

  def cond(carry):
    slot_prompt, next_prompt = carry[2], carry[4]
    return (next_prompt < n) | jnp.any(slot_prompt != empty)

  def body(carry):
    cache, last, slot_prompt, slot_count, next_prompt, tokens, is_end, logprobs, policy_logprobs, counts = carry
    # The next prompts go into the lowest free slots. Only the prefill is conditional: the KV cache is
    # written outside the branch, in place (a branch that took the cache would copy it every step).
    ids = next_prompt + jnp.arange(prefill_rows)
    free = slot_prompt == empty
    target = jnp.argsort(~free, stable=True)[:prefill_rows]  # free slots first, lowest first
    placed = (ids < n) & free[target]  # a prefix: prompts in order, free slots in order
    into = jnp.where(placed, target, slots)  # a slot past the last: the write is dropped
    rows = jnp.minimum(ids, n - 1)
    needed = jnp.max(jnp.where(placed, prompt_lengths[rows], 1))
    which = jnp.where(jnp.any(placed), 1 + jnp.searchsorted(jnp.asarray(widths), needed), 0)
    fresh_logits, fresh_k, fresh_v = jax.lax.switch(which, [skip] + [partial(prefill, w) for w in widths], rows)
    cache = type(cache)(k=cache.k.at[:, into, :p].set(fresh_k, mode="drop"),
                        v=cache.v.at[:, into, :p].set(fresh_v, mode="drop"))
    last = last.at[into].set(fresh_logits, mode="drop")
    slot_prompt = slot_prompt.at[into].set(ids, mode="drop")
    slot_count = slot_count.at[into].set(0, mode="drop")
    next_prompt = next_prompt + jnp.sum(placed)
    active = slot_prompt != empty
    prompt = jnp.minimum(slot_prompt, n - 1)
    token, lp, own = choose(last, slot_count, keys[prompt])
    pos = jnp.where(active, prompt_lengths[prompt] + slot_count, 0)
    token = jnp.where(active, token, pad_id)
    tokens = tokens.at[slot_prompt, pos].set(token, mode="drop")
    logprobs = logprobs.at[slot_prompt, pos].set(lp, mode="drop")
    policy_logprobs = policy_logprobs.at[slot_prompt, pos].set(own, mode="drop")
    hit = active & (jnp.isin(token, stops) if stops is not None else False)
    is_end = is_end.at[slot_prompt].set(hit, mode="drop")
    slot_count = slot_count + 1
    counts = counts.at[slot_prompt].set(slot_count, mode="drop")
    logits, cache = _merged(graphdef, state)(token[:, None], positions=pos[:, None], cache=cache)
    finished = hit | (slot_count >= limits[prompt])
    slot_prompt = jnp.where(finished, empty, slot_prompt)
    return (cache, logits[:, 0], slot_prompt, slot_count, next_prompt, tokens, is_end, logprobs, policy_logprobs,
            counts)

  zeros = jnp.zeros((n, total), jnp.float32)
  carry = (cache, last, jnp.full((slots,), empty, jnp.int32), jnp.zeros((slots,), jnp.int32), jnp.int32(0),
           tokens, jnp.zeros((n,), bool), zeros, zeros, jnp.zeros((n,), jnp.int32))
  out = jax.lax.while_loop(cond, body, carry)
  tokens, is_end, logprobs, policy_logprobs, counts = out[5:]
  return tokens, prompt_lengths + counts, is_end, logprobs, policy_logprobs


def generate(model, prompts, **options) -> Rollout:
  """Generate up to ``max_new_tokens`` tokens after each prompt (a list of token-id lists);
  ``max_new_tokens`` is one limit or one per prompt. The options and their defaults are
  ``generation_call``'s: ``min_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``greedy``,
  ``stop_ids``, ``pad_id``, ``seed``, ``prompt_ids``, ``prompt_width``, ``batch_sharding``, ``slots``,
  ``prefill_rows``.

  Prompt i samples with ``jax.random.key(seed)`` folded with ``prompt_ids[i]`` (default ``i``): callers
  that split one set of prompts over several calls pass their ids, and a prompt's sample depends on its
  id and the seed only. With ``slots`` the prompts go through the continuous-batching loop with that many
  rows decoding at once (``continuous_arrays``; ``prefill_rows`` prompts prefilled at a time), otherwise
  all of them decode as one static batch. Both give each prompt the same tokens.

  Prompts are right-padded to the longest of them, or to ``prompt_width`` when that is more: callers
  that generate batch after batch pass one width so that every batch runs one compiled loop.
  ``batch_sharding`` (a sharding of ``[B]`` arrays, e.g. ``jalign.parallel.mesh.batch_sharding``)
  splits the static batch's rows over devices, so that each data-parallel group decodes its own rows
  instead of all of them; every process passes the same prompts. Samples do not depend on it.
  """
  loop, args, settings = generation_call(model, prompts, **options)
  tokens, out_lengths, is_end, logprobs, policy_logprobs = loop(*args, **settings)
  prompt_lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  return Rollout(tokens=tokens, prompt_lengths=prompt_lengths, lengths=out_lengths, is_end=is_end, logprobs=logprobs,
                 policy_logprobs=policy_logprobs)


def generation_call(model, prompts, *, max_new_tokens, min_new_tokens: int = 0, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, greedy: bool = False, stop_ids=(), pad_id: int = 0,
                    seed: int = 0, prompt_ids=None, prompt_width: int = 0, batch_sharding=None, slots: int = 0,
                    prefill_rows: int = 1) -> tuple:
  """What ``generate`` calls, uncalled: ``(jitted loop, arguments, static settings)``, so that a caller
  can lower and compile the loop ahead of running it (``loop.lower(*arguments, **settings)``)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
  limits = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (len(prompts),))
  longest = int(limits.max())
  if limits.min() < 1 or not 0 <= min_new_tokens <= limits.min():
    raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens; "
                     f"got {int(limits.min())}, {min_new_tokens}")
  if not greedy and temperature <= 0:
    raise ValueError("temperature must be positive (use greedy=True for argmax decoding)")
  if slots < 0 or not 1 <= prefill_rows:
    raise ValueError(f"need slots >= 0 and prefill_rows >= 1; got {slots}, {prefill_rows}")
  lengths = np.array([len(p) for p in prompts], np.int32)
  ids = np.arange(len(prompts), dtype=np.int32) if prompt_ids is None else np.asarray(prompt_ids, np.int32)
  width = max(int(lengths.max()), int(prompt_width))
  padded = np.full((len(prompts), width), pad_id, np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p
  graphdef, state = nnx.split(model)
  rows = batch_sharding if batch_sharding is not None and not slots else None
  if rows is not None:
    axis = rows.spec[0] if rows.spec else None
    arrays = (from_host(padded, NamedSharding(rows.mesh, PartitionSpec(axis, None))),
              *(from_host(x, rows) for x in (lengths, ids, limits)))
  else:
    arrays = tuple(jnp.asarray(x) for x in (padded, lengths, ids, limits))
  settings = dict(graphdef=graphdef, max_new_tokens=longest, min_new_tokens=int(min_new_tokens),
                  temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), greedy=bool(greedy),
                  stop_ids=tuple(int(s) for s in stop_ids), pad_id=int(pad_id))
  if slots:
    settings.update(slots=int(slots), prefill_rows=min(int(prefill_rows), int(slots)))
  loop = continuous_arrays if slots else generate_arrays
  return loop, (state, *arrays, jax.random.key(seed)), settings
