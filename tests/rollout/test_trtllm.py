"""TensorRT-LLM checkpoints: a numpy model that runs the way TensorRT-LLM's Llama runs a checkpoint
(each tensor-parallel rank computes from its own file, partial outputs summed as its all-reduce does,
pipeline ranks in turn) must give the logits of the model that was exported."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.models import LlamaConfig, Transformer
from jalign.models.heads import ValueModel
from jalign.models.safetensors_io import SafetensorsFile
from jalign.rollout import trtllm

TOKENS = np.random.RandomState(0).randint(0, 250, (2, 11))


def make_model(**changes):
  fields = dict(vocab_size=250, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                num_kv_heads=2, max_position_embeddings=64, rope_theta=500.0)
  model = Transformer(LlamaConfig(**{**fields, **changes}), rngs=nnx.Rngs(3))
  # Random norm scales and biases, so that a misplaced one shows in the logits.
  state = nnx.state(model, nnx.Param)
  rng = np.random.RandomState(1)
  for path, var in nnx.to_flat_state(state):
    if path[-1] in ("scale",) or path[-1].endswith("_bias"):
      var.set_value(jnp.asarray(1 + 0.3 * rng.standard_normal(var.shape), var.get_value().dtype))
  nnx.update(model, state)
  return model


def rms_norm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def rope_gpt_neox(x, base):
  """x [T, heads, D], rotated by halves."""
  t, _, d = x.shape
  freq = base ** (-np.arange(0, d, 2) / d)
  angle = np.arange(t)[:, None] * freq[None]
  cos, sin = (np.concatenate([f(angle)] * 2, -1)[:, None] for f in (np.cos, np.sin))
  rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
  return x * cos + rotated * sin


def attention_of_rank(h, w, config, tp):
  """One rank's share of a layer's attention output, [T, H]: its fused-QKV heads through its dense rows."""
  d = config["head_size"]
  nq, nkv = config["num_attention_heads"] // tp, max(config["num_key_value_heads"] // tp, 1)
  qkv = h @ w["attention.qkv.weight"].T + w.get("attention.qkv.bias", 0)
  q, k, v = np.split(qkv, [nq * d, (nq + nkv) * d], -1)
  t = h.shape[0]
  q, k, v = q.reshape(t, nq, d), k.reshape(t, nkv, d), v.reshape(t, nkv, d)
  q, k = rope_gpt_neox(q, config["rotary_base"]), rope_gpt_neox(k, config["rotary_base"])
  out = np.empty_like(q)
  for j in range(nq):
    kv = j // (nq // nkv)
    scores = q[:, j] @ k[:, kv].T / np.sqrt(d) + np.triu(np.full((t, t), -np.inf), 1)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    out[:, j] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
  return out.reshape(t, nq * d) @ w["attention.dense.weight"].T


def run_checkpoint(folder, tokens):
  config = json.loads((folder / "config.json").read_text())
  tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
  eps = config["norm_epsilon"]
  files = [SafetensorsFile(folder / f"rank{r}.safetensors") for r in range(tp * pp)]

  def tensors(rank, prefix=""):
    f = files[rank]
    return {k[len(prefix):]: f.get(k).astype(np.float64) for k in f.keys() if k.startswith(prefix)}

  logits = []
  for row in tokens:
    x = tensors(0)["transformer.vocab_embedding.weight"][row]
    for p in range(pp):
      ranks = range(p * tp, (p + 1) * tp)
      layers = sorted({int(k.split(".")[2]) for k in files[ranks[0]].keys() if k.startswith("transformer.layers.")})
      assert layers == list(range(len(layers)))  # each pipeline rank numbers its layers from 0
      for i in layers:
        w = [tensors(r, f"transformer.layers.{i}.") for r in ranks]
        h = rms_norm(x, w[0]["input_layernorm.weight"], eps)
        x = x + sum(attention_of_rank(h, w[t], config, tp) for t in range(tp))
        h = rms_norm(x, w[0]["post_layernorm.weight"], eps)
        silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
        # TensorRT-LLM's gated MLP: act(fc(x)) * gate(x), then proj.
        x = x + sum((silu(h @ w[t]["mlp.fc.weight"].T) * (h @ w[t]["mlp.gate.weight"].T)) @ w[t]["mlp.proj.weight"].T
                    for t in range(tp))
    last = range((pp - 1) * tp, pp * tp)
    h = rms_norm(x, tensors(last[0])["transformer.ln_f.weight"], eps)
    full = np.concatenate([h @ tensors(r)["lm_head.weight"].T for r in last], -1)
    logits.append(full[:, :config["vocab_size"]])
  return np.stack(logits)


@pytest.mark.parametrize("tp,pp,changes", [
    (1, 1, {}),
    (2, 2, {}),                                   # 3 layers over 2 pipeline ranks: 2 + 1
    (4, 1, {}),                                   # 2 key/value heads, each on 2 ranks; vocabulary 250 -> 252
    (2, 3, {"attention_bias": True, "architecture": "qwen2"}),
    (2, 1, {"tie_word_embeddings": True}),
])
def test_ranks_run_as_tensorrt_llm_runs_them_give_the_models_logits(tmp_path, tp, pp, changes):
  model = make_model(**changes)
  out = trtllm.export_checkpoint(model, tmp_path / "ckpt", tp_size=tp, pp_size=pp)
  assert sorted(p.name for p in out.iterdir()) == sorted(["config.json"] + [f"rank{r}.safetensors"
                                                                             for r in range(tp * pp)])
  expected = np.asarray(model(jnp.asarray(TOKENS)), np.float64)
  actual = run_checkpoint(out, TOKENS)
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_config_describes_the_model_and_its_split(tmp_path):
  model = make_model()
  out = trtllm.export_checkpoint(model, tmp_path / "ckpt", tp_size=2, pp_size=1, dtype="bfloat16")
  config = json.loads((out / "config.json").read_text())
  cfg = model.config
  assert config["architecture"] == "LlamaForCausalLM" and config["dtype"] == "bfloat16"
  assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
          config["head_size"], config["intermediate_size"], config["vocab_size"]) == (
              3, 4, 2, cfg.head_dim, 48, 250)
  assert config["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
  assert config["rotary_base"] == 500.0 and config["position_embedding_type"] == "rope_gpt_neox"
  f = SafetensorsFile(out / "rank1.safetensors")
  assert {str(f.dtype(k)) for k in f.keys()} == {"bfloat16"}
  # Per rank: 2 query heads and 1 key/value head of 8 dims fused; half the MLP; half the padded vocabulary.
  assert f.shape("transformer.layers.0.attention.qkv.weight") == (32, 32)
  assert f.shape("transformer.layers.2.mlp.proj.weight") == (32, 24)
  assert f.shape("lm_head.weight") == (125, 32)


def test_llama3_rope_scaling_is_written_as_tensorrt_llm_reads_it():
  cfg = LlamaConfig.preset("llama3.1-405b")
  config = trtllm.checkpoint_config(cfg, dtype="bfloat16", tp_size=8)
  assert config["rotary_scaling"]["type"] == "llama3"
  assert config["rotary_scaling"]["factor"] == cfg.rope_scaling.factor
  assert config["rotary_base"] == cfg.rope_theta and config["num_key_value_heads"] == cfg.num_kv_heads == 8


def test_layers_split_over_pipeline_ranks_as_tensorrt_llm_splits_them():
  assert trtllm.layer_ranges(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
  assert trtllm.layer_ranges(4, 4) == [range(i, i + 1) for i in range(4)]
  with pytest.raises(ValueError, match="pp_size=5"):
    trtllm.layer_ranges(4, 5)


def test_bad_requests_fail_clearly_and_keep_what_exists(tmp_path):
  model = make_model()
  with pytest.raises(ValueError, match="tp_size=3"):
    trtllm.export_checkpoint(model, tmp_path / "a", tp_size=3)
  with pytest.raises(ValueError, match="dtype='int8'"):
    trtllm.export_checkpoint(model, tmp_path / "a", dtype="int8")
  with pytest.raises(TypeError, match="ValueModel"):
    trtllm.export_checkpoint(ValueModel(model.config, rngs=nnx.Rngs(0)), tmp_path / "a")
  assert not (tmp_path / "a").exists()
  kept = tmp_path / "kept"
  kept.mkdir()
  (kept / "engine.txt").write_text("previous")
  with pytest.raises(FileExistsError, match="kept"):
    trtllm.export_checkpoint(model, kept)
  assert (kept / "engine.txt").read_text() == "previous"
  trtllm.export_checkpoint(model, kept, overwrite=True)
  assert not (kept / "engine.txt").exists() and (kept / "rank0.safetensors").is_file()
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_engine_build_names_the_missing_builder(tmp_path):
  model = make_model()
  out = trtllm.export_checkpoint(model, tmp_path / "ckpt")
  with pytest.raises(RuntimeError, match="trtllm-build-missing: not found on PATH"):
    trtllm.build_engine(out, tmp_path / "engine", max_batch_size=4, max_input_len=16, max_seq_len=32,
                        trtllm_build="trtllm-build-missing")
