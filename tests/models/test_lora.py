"""LoRA adapters: exact no-op at B = 0, an independent merged-weight reference, gradients only to the
adapters, merge and Hugging Face export, KV-cache decoding, pipelining, target subsets, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from flax import nnx

from jalign.models import hf
from jalign.models.heads import ValueModel
from jalign.models.llama import LlamaConfig, Transformer
from jalign.models.lora import (ALL_TARGETS, LORA_RANK, LoRAParam, add_lora, count_params, has_lora,
                                lora_targets, merge_lora, without_adapters)
from jalign.parallel.logical import EMBED, HEAD_DIM, HEADS, LAYERS, MLP
from tests.models.hf_fixtures import rel_err, torch_logits

TINY = LlamaConfig.preset("tiny")
RANK, ALPHA = 8, 16.0  # scale 2, so that a missing or doubled scale shows
TOKENS = jnp.asarray(np.random.RandomState(0).randint(3, TINY.vocab_size, (2, 12)))


def _adapted(targets=ALL_TARGETS, config=TINY, random_b=True, seed=0):
  model = add_lora(Transformer(config, rngs=nnx.Rngs(0)), targets=targets, rank=RANK, alpha=ALPHA,
                   rngs=nnx.Rngs(1))
  if random_b:
    rng = np.random.RandomState(seed)
    lora = nnx.state(model, LoRAParam)
    for path, v in nnx.to_flat_state(lora):
      if path[-1].endswith("_lora_b"):
        v.set_value(jnp.asarray(rng.normal(0, 0.05, v.shape), v.dtype))
    nnx.update(model, lora)
  return model


def _value(module, name):
  return np.asarray(getattr(module, name)[...], np.float64)


@pytest.fixture(scope="module")
def base():
  return Transformer(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def adapted():
  return _adapted()


def test_zero_b_gives_exactly_the_base_logits(base):
  model = _adapted(random_b=False)  # as add_lora leaves it: B = 0
  np.testing.assert_array_equal(model(TOKENS), base(TOKENS))
  np.testing.assert_array_equal(nnx.jit(lambda m, t: m(t))(model, TOKENS), nnx.jit(lambda m, t: m(t))(base, TOKENS))


def test_zero_b_is_exact_in_bfloat16_too():
  cfg = TINY.replace(dtype="bfloat16", param_dtype="bfloat16")
  base = Transformer(cfg, rngs=nnx.Rngs(0))(TOKENS)
  model = add_lora(Transformer(cfg, rngs=nnx.Rngs(0)), targets="all", rank=RANK, rngs=nnx.Rngs(1))
  assert model.layers.attn.q_proj_lora_a[...].dtype == jnp.float32  # adapters kept in float32
  np.testing.assert_array_equal(model(TOKENS), base)


def test_adapters_shapes_and_logical_axes(adapted):
  attn, mlp = adapted.layers.attn, adapted.layers.mlp
  h, d, hq, hkv, f, n = TINY.hidden_size, TINY.head_dim, TINY.num_heads, TINY.num_kv_heads, TINY.intermediate_size, TINY.num_layers
  expect = {
      (attn, "q_proj_lora_a"): ((n, h, RANK), (LAYERS, EMBED, LORA_RANK)),
      (attn, "q_proj_lora_b"): ((n, RANK, hq, d), (LAYERS, LORA_RANK, HEADS, HEAD_DIM)),
      (attn, "k_proj_lora_b"): ((n, RANK, hkv, d), (LAYERS, LORA_RANK, "kv_heads", HEAD_DIM)),
      (attn, "o_proj_lora_a"): ((n, hq, d, RANK), (LAYERS, HEADS, HEAD_DIM, LORA_RANK)),
      (attn, "o_proj_lora_b"): ((n, RANK, h), (LAYERS, LORA_RANK, EMBED)),
      (mlp, "gate_proj_lora_b"): ((n, RANK, f), (LAYERS, LORA_RANK, MLP)),
      (mlp, "down_proj_lora_a"): ((n, f, RANK), (LAYERS, MLP, LORA_RANK)),
      (mlp, "down_proj_lora_b"): ((n, RANK, h), (LAYERS, LORA_RANK, EMBED)),
  }
  for (module, name), (shape, axes) in expect.items():
    v = getattr(module, name)
    assert isinstance(v, LoRAParam) and isinstance(v, nnx.Param)
    assert v.shape == shape and v.get_metadata()["logical_axes"] == axes, name
  assert attn.lora_scale == mlp.lora_scale == ALPHA / RANK
  # A: Xavier-normal as NeMo's column_init_method, independent per layer.
  a = np.asarray(attn.q_proj_lora_a[...])
  assert abs(a.std() - np.sqrt(2 / (h + RANK))) < 0.02 and not np.allclose(a[0], a[1])


def test_random_b_equals_an_independently_merged_model(base, adapted):
  """Logits of the adapter model = those of a plain model whose kernels are set to W + scale*A@B by hand."""
  ref = Transformer(TINY, rngs=nnx.Rngs(0))
  s = ALPHA / RANK
  subscripts = {"q_proj": "lhr,lrnd->lhnd", "k_proj": "lhr,lrnd->lhnd", "v_proj": "lhr,lrnd->lhnd",
                "o_proj": "lndr,lrh->lndh", "gate_proj": "lir,lro->lio", "up_proj": "lir,lro->lio",
                "down_proj": "lir,lro->lio"}
  for name, sub in subscripts.items():
    src, dst = [getattr(m.layers, "attn" if name[0] in "qkvo" else "mlp") for m in (adapted, ref)]
    w = _value(src, name) + s * np.einsum(sub, _value(src, f"{name}_lora_a"), _value(src, f"{name}_lora_b"))
    getattr(dst, name).set_value(jnp.asarray(w, jnp.float32))
  got, want = adapted(TOKENS), ref(TOKENS)
  assert rel_err(got, base(TOKENS)) > 1e-2  # the adapters do something
  assert rel_err(got, want) < 1e-5


def test_gradients_reach_only_the_adapters(adapted):
  graphdef, lora, rest = nnx.split(adapted, LoRAParam, ...)
  assert all(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(lora))
  assert all(not isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(rest))
  # copy=True: `rest` (the frozen base weights) holds Variables of the outer trace, which nnx.scan
  # refuses inside jax.grad ("Cannot extract graph node from different trace level").
  loss = lambda lora, rest: jnp.mean(
      jax.nn.log_softmax(nnx.merge(graphdef, lora, rest, copy=True)(TOKENS))[..., 5])
  grads = jax.grad(loss)(lora, rest)
  flat = nnx.to_flat_state(grads)
  assert len(flat) == 2 * len(ALL_TARGETS)
  for path, g in flat:
    assert isinstance(g, LoRAParam), path
    assert np.abs(np.asarray(g[...])).max() > 0, path  # B != 0: A gets gradient too
  # One SGD step on the adapters lowers the loss; the base weights are not an input of the step.
  stepped = jax.tree.map(lambda p, g: p - 0.01 * g, lora, grads)
  assert loss(stepped, rest) < loss(lora, rest)
  # nnx.grad with the filter agrees.
  g2 = nnx.grad(lambda m: loss(*nnx.split(m, LoRAParam, ...)[1:]), argnums=nnx.DiffState(0, LoRAParam))(adapted)
  for (p1, a), (p2, b) in zip(flat, nnx.to_flat_state(g2)):
    assert p1 == p2
    np.testing.assert_allclose(a[...], b[...], rtol=1e-5, atol=1e-9)


def test_at_init_only_b_gets_gradient():
  model = _adapted(random_b=False)
  graphdef, lora, rest = nnx.split(model, LoRAParam, ...)
  grads = jax.grad(lambda lora: jnp.mean(nnx.merge(graphdef, lora, rest, copy=True)(TOKENS) ** 2))(lora)
  for path, g in nnx.to_flat_state(grads):
    is_b = str(path[-1]).endswith("lora_b")
    assert (np.abs(np.asarray(g[...])).max() > 0) == is_b, path


def test_without_adapters_in_the_same_jitted_function(base, adapted):
  graphdef, lora, rest = nnx.split(adapted, LoRAParam, ...)
  fn = jax.jit(lambda lora, rest, t: nnx.merge(graphdef, lora, rest, copy=True)(t))
  on = fn(lora, rest, TOKENS)
  off = fn(without_adapters(lora), rest, TOKENS)
  assert fn._cache_size() == 1  # no retrace
  np.testing.assert_array_equal(off, nnx.jit(lambda m, t: m(t))(base, TOKENS))
  assert rel_err(on, off) > 1e-2
  # The A matrices and the caller's state are untouched; modules and full states work too.
  assert all(np.abs(np.asarray(v[...])).max() > 0 for p, v in nnx.to_flat_state(lora))
  np.testing.assert_array_equal(without_adapters(adapted)(TOKENS), base(TOKENS))
  np.testing.assert_array_equal(adapted(TOKENS), on)
  full = without_adapters(nnx.state(adapted))
  np.testing.assert_array_equal(nnx.merge(*nnx.split(adapted)[:1], full)(TOKENS), base(TOKENS))
  pure = without_adapters(nnx.to_pure_dict(nnx.state(adapted, LoRAParam)))
  assert all(not np.any(v) for k, v in jax.tree_util.tree_leaves_with_path(pure) if "lora_b" in str(k))


def test_merge_equals_adapted_and_leaves_the_original(adapted):
  before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(adapted))}
  merged = merge_lora(adapted)
  assert type(merged) is Transformer and not has_lora(merged) and has_lora(adapted)
  assert not any(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(nnx.state(merged)))
  assert not hasattr(merged.layers.attn, "lora_scale")
  assert rel_err(merged(TOKENS), adapted(TOKENS)) < 1e-5
  for p, v in nnx.to_flat_state(nnx.state(adapted)):
    np.testing.assert_array_equal(v[...], before[p])
  # Same structure as a freshly built plain model.
  fresh = nnx.state(Transformer(TINY, rngs=nnx.Rngs(3)))
  assert jax.tree.structure(nnx.state(merged)) == jax.tree.structure(fresh)


def test_merged_model_exports_to_transformers(adapted, tmp_path):
  out = hf.save(merge_lora(adapted), tmp_path / "merged")
  reloaded = tr.LlamaForCausalLM.from_pretrained(out).eval()
  assert rel_err(torch_logits(reloaded, TOKENS), adapted(TOKENS)) < 1e-4
  assert rel_err(hf.load(out)(TOKENS), adapted(TOKENS)) < 1e-5


def test_kv_cache_decoding_with_adapters(adapted):
  full = adapted(TOKENS)
  cache = adapted.init_cache(2, 16)
  logits, cache = adapted(TOKENS[:, :5], cache=cache)
  np.testing.assert_allclose(logits, full[:, :5], atol=2e-5)
  for i in range(5, TOKENS.shape[1]):
    step, cache = adapted(TOKENS[:, i:i + 1], positions=jnp.full((2, 1), i), cache=cache)
    np.testing.assert_allclose(step[:, 0], full[:, i], atol=2e-5, err_msg=f"position {i}")


def test_pipelined_layers_with_adapters():
  cfg = TINY.replace(num_layers=4)
  plain = _adapted(config=cfg)
  piped = _adapted(config=cfg.replace(pipeline_stages=2, pipeline_microbatches=2))
  np.testing.assert_allclose(piped(TOKENS), plain(TOKENS), rtol=1e-5, atol=1e-5)


def test_a_subset_of_targets(base):
  model = _adapted(targets=("q", "v"))
  assert lora_targets(model) == ("q", "v")
  attn, mlp = model.layers.attn, model.layers.mlp
  assert hasattr(attn, "q_proj_lora_a") and hasattr(attn, "v_proj_lora_b")
  assert not any(hasattr(attn, f"{n}_proj_lora_a") for n in "ko")
  assert not hasattr(mlp, "lora_scale") and not any(hasattr(mlp, f"{n}_proj_lora_a") for n in ("gate", "up", "down"))
  assert rel_err(model(TOKENS), base(TOKENS)) > 1e-3
  assert rel_err(merge_lora(model)(TOKENS), model(TOKENS)) < 1e-5
  # NeMo's target names, and its default (attention_qkv).
  assert lora_targets(add_lora(Transformer(TINY, rngs=nnx.Rngs(0)), targets=["mlp_fc1", "attention_dense"],
                               rngs=nnx.Rngs(0))) == ("o", "gate", "up")
  default = add_lora(Transformer(TINY, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
  assert lora_targets(default) == ("q", "k", "v")
  assert default.layers.attn.q_proj_lora_a.shape[-1] == 32 and default.layers.attn.lora_scale == 1.0


def test_bad_input_is_refused():
  model = Transformer(TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"unknown LoRA target 'qkv'; valid targets: q, k, v, o, gate, up, down"):
    add_lora(model, targets=("q", "qkv"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no LoRA targets"):
    add_lora(model, targets=(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="rank"):
    add_lora(model, rank=0, rngs=nnx.Rngs(0))
  assert not has_lora(model)  # nothing was added by the refused calls
  add_lora(model, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="already has LoRA"):
    add_lora(model, targets="o", rngs=nnx.Rngs(0))


def test_value_model_trunk_can_be_adapted():
  model = ValueModel(TINY, rngs=nnx.Rngs(0))
  base = model(TOKENS)
  add_lora(model, targets="all", rank=4, rngs=nnx.Rngs(1))
  assert lora_targets(model) == ALL_TARGETS
  np.testing.assert_array_equal(model(TOKENS), base)


def test_trainable_fraction():
  # NeMo's default targets (q, k, v) at rank 8 on the tiny preset: 2 layers x 8 x (64+64 + 2 x (64+32)).
  count = count_params(add_lora(Transformer(TINY, rngs=nnx.Rngs(0)), rank=8, rngs=nnx.Rngs(0)))
  assert count.lora == 2 * 8 * (128 + 2 * 96) == 5120
  assert count.base == TINY.num_params and count.total == TINY.num_params + count.lora
  assert count.fraction < 0.05  # 3.1%
  # Every projection at rank 8 is 10.6% of this 64-wide toy model; at real widths, ~1% at rank 32.
  everything = count_params(add_lora(Transformer(TINY, rngs=nnx.Rngs(0)), targets="all", rank=8, rngs=nnx.Rngs(0)))
  assert everything.lora == 18688 and 0.10 < everything.fraction < 0.11
  cfg = LlamaConfig.preset("llama3-8b")
  abstract = nnx.eval_shape(lambda: add_lora(Transformer(cfg, rngs=nnx.Rngs(0)), targets="all", rank=32,
                                             rngs=nnx.Rngs(0)))
  big = count_params(abstract)
  assert big.base == cfg.num_params and big.lora == 32 * 32 * (2 * 8192 + 2 * 5120 + 3 * 18432)
  assert big.fraction < 0.011  # 83.9M of 8.1B
