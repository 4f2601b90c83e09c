"""The NNX decoder itself: KV-cache decoding, packing, remat, scanned layers, presets, logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.kernels import token_logprobs
from jalign.models import LlamaConfig, Transformer
from jalign.models.heads import ValueModel
from jalign.models.llama import PRESETS, rope_inverse_frequencies, RopeScaling
from jalign.parallel.logical import param_specs

TINY = LlamaConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
  return Transformer(TINY, rngs=nnx.Rngs(0))


def _tokens(b, t, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(3, TINY.vocab_size, (b, t)))


@pytest.mark.parametrize("prefill", [1, 5, 11])
def test_kv_cache_decoding_matches_full_forward_at_every_position(model, prefill):
  tokens = _tokens(3, 12)
  full = model(tokens)
  cache = model.init_cache(3, 16)
  logits, cache = model(tokens[:, :prefill], cache=cache)
  np.testing.assert_allclose(logits, full[:, :prefill], atol=2e-5)
  for i in range(prefill, 12):
    step, cache = model(tokens[:, i:i + 1], positions=jnp.full((3, 1), i), cache=cache)
    np.testing.assert_allclose(step[:, 0], full[:, i], atol=2e-5, err_msg=f"position {i}")


def test_kv_cache_with_ragged_rows(model):
  """Rows at different positions in one decode step, as in batched generation of mixed prompts."""
  tokens = _tokens(2, 10, seed=1)
  full = model(tokens)
  cache = model.init_cache(2, 12)
  _, cache = model(tokens[:, :6], cache=cache)  # row 0 continues from 6, row 1 from 4
  positions = jnp.array([[6], [4]])
  logits, cache = model(tokens[jnp.arange(2)[:, None], positions], positions=positions, cache=cache)
  np.testing.assert_allclose(logits[0, 0], full[0, 6], atol=2e-5)
  np.testing.assert_allclose(logits[1, 0], full[1, 4], atol=2e-5)


def test_pallas_decode_attention_in_the_model(model):
  """The ragged decode kernel on the model's one-token steps gives the full forward's logits."""
  pallas = Transformer(TINY.replace(decode_attention_impl="pallas"), rngs=nnx.Rngs(0))
  nnx.update(pallas, nnx.state(model))
  tokens = _tokens(2, 10, seed=4)
  full = model(tokens)
  cache = pallas.init_cache(2, 12)
  _, cache = pallas(tokens[:, :6], cache=cache)
  positions = jnp.array([[6], [4]])
  logits, cache = pallas(tokens[jnp.arange(2)[:, None], positions], positions=positions, cache=cache)
  np.testing.assert_allclose(logits[0, 0], full[0, 6], atol=2e-5)
  np.testing.assert_allclose(logits[1, 0], full[1, 4], atol=2e-5)


def test_packed_documents_do_not_attend_across_segments(model):
  a, b = _tokens(1, 7, seed=2), _tokens(1, 5, seed=3)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[1] * 7 + [2] * 5])
  positions = jnp.array([list(range(7)) + list(range(5))])
  out = model(packed, positions=positions, segment_ids=segments)
  np.testing.assert_allclose(out[:, :7], model(a), atol=2e-5)
  np.testing.assert_allclose(out[:, 7:], model(b), atol=2e-5)
  leaky = model(packed, positions=positions)
  assert np.abs(leaky[:, 7:] - model(b)).max() > 1e-3  # without segment ids the documents mix


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_the_same_gradients(remat):
  tokens = _tokens(2, 8)

  def loss(m):
    return jnp.mean(m(tokens) ** 2)

  plain = nnx.grad(loss)(Transformer(TINY, rngs=nnx.Rngs(0)))
  rematted = nnx.grad(loss)(Transformer(TINY.replace(remat=remat), rngs=nnx.Rngs(0)))
  for (path, g1), (_, g2) in zip(nnx.to_flat_state(plain), nnx.to_flat_state(rematted)):
    np.testing.assert_allclose(g1.get_value(), g2.get_value(), rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_scanned_layers_keep_the_program_size_independent_of_depth():
  tokens = _tokens(1, 8)

  def program_size(layers):
    m = Transformer(TINY.replace(num_layers=layers), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(m)
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    return len(fn.lower(state, tokens).as_text())

  shallow, deep = program_size(2), program_size(16)
  assert deep < shallow * 1.05, (shallow, deep)


def test_bfloat16_compute_is_close_to_float32(model):
  tokens = _tokens(2, 10)
  ref = model(tokens)
  bf16 = Transformer(TINY.replace(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
  out = bf16(tokens)
  assert out.dtype == jnp.float32 and bf16.embed[...].dtype == jnp.bfloat16
  assert float(jnp.abs(out - ref).max() / jnp.abs(ref).max()) < 5e-2


def test_token_logprobs_from_hidden_states_match_the_logits(model):
  tokens = _tokens(2, 9)
  targets = jnp.roll(tokens, -1, axis=1)
  ref = jnp.take_along_axis(jax.nn.log_softmax(model(tokens)), targets[..., None], -1)[..., 0]
  out = token_logprobs(model.hidden_states(tokens), model.lm_head_kernel(), targets)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_every_parameter_carries_logical_axis_names(model):
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get("logical_axes")
    assert names is not None and len(names) == var.get_value().ndim, path
    if path[0] == "layers":
      assert names[0] == "layers", path
  specs = param_specs(model, rules=(("embed", "fsdp"), ("heads", "tensor")))
  assert specs["layers"]["attn"]["q_proj"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


def test_value_model_scores_the_last_token():
  vm = ValueModel(TINY, num_outputs=3, rngs=nnx.Rngs(0))
  tokens = _tokens(2, 6)
  values = vm(tokens)
  assert values.shape == (2, 6, 3) and values.dtype == jnp.float32
  np.testing.assert_allclose(vm.score(tokens, [4, 6]), values[jnp.arange(2), jnp.array([3, 5])])


@pytest.mark.parametrize("name,billions", [("llama3-8b", 8.03), ("llama3-70b", 70.55),
                                           ("llama3.1-405b", 405.85), ("smollm2-135m", 0.1345),
                                           ("mistral-7b", 7.25), ("qwen2-7b", 7.62)])
def test_presets_have_the_published_sizes(name, billions):
  assert abs(LlamaConfig.preset(name).num_params / 1e9 - billions) / billions < 0.01
  assert set(PRESETS) >= {"tiny", "smollm2-135m", "llama3-8b", "llama3-70b", "llama3.1-405b"}


def test_llama3_rope_scaling_matches_the_published_rule():
  cfg = LlamaConfig.preset("llama3.1-8b")
  inv = rope_inverse_frequencies(cfg)
  base = 1.0 / (cfg.rope_theta ** (np.arange(0, 128, 2) / 128))
  wavelen = 2 * np.pi / base
  assert np.allclose(inv[wavelen < 8192 / 4], base[wavelen < 8192 / 4])  # high frequencies kept
  assert np.allclose(inv[wavelen > 8192], base[wavelen > 8192] / 8)  # low frequencies scaled by 8
  unscaled = rope_inverse_frequencies(cfg.replace(rope_scaling=None))
  assert np.allclose(unscaled, base.astype(np.float32))
  assert cfg.rope_scaling == RopeScaling()


def test_bad_configs_are_refused():
  with pytest.raises(ValueError, match="not a multiple"):
    LlamaConfig.preset("tiny", num_kv_heads=3)
  with pytest.raises(ValueError, match="remat"):
    LlamaConfig.preset("tiny", remat="sometimes")
  with pytest.raises(KeyError, match="unknown preset"):
    LlamaConfig.preset("llama9-1t")


@pytest.mark.parametrize("stages,repeats,micro", [(2, 1, 1), (2, 1, 2), (2, 1, 4), (2, 2, 2), (2, 2, 4)])
def test_pipelined_layers_equal_the_scanned_layers(stages, repeats, micro):
  cfg = TINY.replace(num_layers=4)
  tokens = _tokens(4, 8)
  plain = Transformer(cfg, rngs=nnx.Rngs(0))
  piped = Transformer(cfg.replace(pipeline_stages=stages, pipeline_repeats=repeats, pipeline_microbatches=micro),
                      rngs=nnx.Rngs(0))
  np.testing.assert_allclose(piped(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
  loss = lambda m: jnp.mean(m(tokens) ** 2)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.grad(loss)(piped)), nnx.to_flat_state(nnx.grad(loss)(plain))):
    a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + 1e-9, path


def test_pallas_attention_in_the_model_matches_xla(model):
  tokens = _tokens(2, 10)
  segments = jnp.array([[1] * 4 + [2] * 6, [1] * 10])
  pallas = Transformer(TINY.replace(attention_impl="pallas"), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(pallas(tokens, segment_ids=segments), model(tokens, segment_ids=segments), atol=2e-5)
