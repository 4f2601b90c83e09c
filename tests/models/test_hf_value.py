"""Hugging Face reward models (sequence classification folders): scores at each row's last token as
transformers gives them, on one device and sharded over a mesh, and folders written back that
transformers loads with the same scores."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tr
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jalign.models import hf, hf_value
from jalign.models.heads import ValueModel
from jalign.models.safetensors_io import CheckpointError
from jalign.parallel.logical import variable_spec
from tests.models.hf_fixtures import COMMON, LLAMA3_SCALING, nonzero_attention_biases, torch_logits

PAD = 0
LENGTHS = np.array([24, 17])
TOKENS = np.random.RandomState(1).randint(1, 256, (2, 24))
TOKENS[1, LENGTHS[1]:] = PAD  # right padding, which transformers skips to find the last token

KINDS = {  # (class, config): GQA with Llama 3.1 scaling and one score; Qwen2's attention biases and three
    "llama": (tr.LlamaForSequenceClassification,
              dict(COMMON, rope_scaling=LLAMA3_SCALING, rope_theta=5e5, num_labels=1, pad_token_id=PAD), tr.LlamaConfig),
    "qwen2": (tr.Qwen2ForSequenceClassification, dict(COMMON, num_labels=3, pad_token_id=PAD), tr.Qwen2Config),
}


def save_random_rm(kind, path, seed=0):
  cls, kwargs, config_cls = KINDS[kind]
  torch.manual_seed(seed)
  model = cls(config_cls(**kwargs)).eval()
  with torch.no_grad():
    model.score.weight.normal_()  # scores of order one, so that a wrong trunk shows
  nonzero_attention_biases(model)
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_rm")
  out = {}
  for kind in KINDS:
    model = save_random_rm(kind, root / kind)
    out[kind] = (root / kind, model, torch_logits(model, TOKENS))
  return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_scores_at_the_last_token_match_transformers(checkpoints, kind):
  path, torch_model, ref = checkpoints[kind]
  model = hf_value.load(path)
  assert isinstance(model, ValueModel) and ref.shape == (2, KINDS[kind][1]["num_labels"])
  np.testing.assert_allclose(model.score(TOKENS, LENGTHS), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(model.head.bias[...], 0.0)
  np.testing.assert_array_equal(model.head.kernel[...], torch_model.score.weight.detach().numpy().T)


def test_load_onto_a_mesh_places_each_tensor_in_its_sharding(checkpoints):
  path, _, ref = checkpoints["llama"]
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
  rules = (("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
           ("vocab", "tensor"))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = hf_value.load(path, mesh=mesh)
    for name, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      assert var[...].sharding == NamedSharding(mesh, variable_spec(var, mesh=mesh)), name
  q = model.backbone.layers.attn.q_proj[...]
  assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 1, 16)
  kernel = model.head.kernel[...]
  assert kernel.sharding.spec == PartitionSpec("fsdp", None) and kernel.addressable_shards[0].data.shape == (32, 1)
  assert len(model.head.bias[...].sharding.device_set) == 8
  np.testing.assert_allclose(model.score(TOKENS, LENGTHS), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_saved_folder_loads_in_transformers_with_the_same_scores(checkpoints, kind, tmp_path):
  path, _, ref = checkpoints[kind]
  out = hf_value.save(hf_value.load(path), tmp_path / "saved", max_shard_bytes=60_000)  # sharded, with an index
  assert (out / "model.safetensors.index.json").is_file()
  reloaded = KINDS[kind][0].from_pretrained(out).eval()
  np.testing.assert_allclose(torch_logits(reloaded, TOKENS), ref, rtol=1e-6, atol=1e-6)
  config = json.loads((out / "config.json").read_text())
  assert config["pad_token_id"] == PAD and len(config["id2label"]) == KINDS[kind][1]["num_labels"]
  assert hf_value.read_config(out) == hf_value.read_config(path)


def test_a_head_with_a_bias_is_refused(checkpoints, tmp_path):
  path, _, _ = checkpoints["llama"]
  model = hf_value.load(path)
  model.head.bias.set_value(jnp.array([0.5], jnp.float32))
  with pytest.raises(ValueError, match="nonzero bias.*LlamaForSequenceClassification"):
    hf_value.save(model, tmp_path / "biased")
  assert not (tmp_path / "biased").exists()


def test_a_language_model_is_not_a_reward_model_and_back(checkpoints, tmp_path):
  path, _, _ = checkpoints["llama"]
  with pytest.raises(CheckpointError, match="LlamaForSequenceClassification is a reward model.*hf:<folder>"):
    hf.load(path)
  lm = tr.LlamaForCausalLM(tr.LlamaConfig(**COMMON))
  lm.save_pretrained(tmp_path / "lm")
  with pytest.raises(CheckpointError, match=r"config.json: architectures \['LlamaForCausalLM'\] name no reward model"):
    hf_value.load(tmp_path / "lm")
  cfg = json.loads((path / "config.json").read_text())
  (tmp_path / "three").mkdir()
  (tmp_path / "three" / "config.json").write_text(json.dumps({**cfg, "num_labels": 3}))
  (tmp_path / "three" / "model.safetensors").symlink_to(path / "model.safetensors")
  with pytest.raises(CheckpointError, match=r"tensor 'score.weight' has shape \(1, 64\).*\(3, 64\)"):
    hf_value.load(tmp_path / "three")
