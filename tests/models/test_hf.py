"""Hugging Face checkpoints: logit parity with transformers, round trips, sharded folders, bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from flax import nnx
from jax.sharding import AxisType

from jalign.models import hf
from jalign.models.safetensors_io import CheckpointError, SafetensorsFile
from tests.models.hf_fixtures import KINDS, make, rel_err, save_random, torch_logits

TOKENS = np.random.RandomState(0).randint(0, 256, (2, 24))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for kind in KINDS:
    model = save_random(kind, root / kind)
    out[kind] = (root / kind, model, torch_logits(model, TOKENS))
  return out


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(checkpoints, kind):
  path, _, ref = checkpoints[kind]
  model = hf.load(path)
  assert rel_err(model(TOKENS), ref) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_saved_folder_reloads_in_transformers(checkpoints, kind, tmp_path):
  path, _, ref = checkpoints[kind]
  out = hf.save(hf.load(path), tmp_path / "saved")
  cls, _ = make(kind)
  reloaded = cls.from_pretrained(out).eval()
  assert rel_err(torch_logits(reloaded, TOKENS), ref) < 1e-6
  assert hf.config_from_hf(json.loads((out / "config.json").read_text())) == hf.load(path).config


def test_config_reads_legacy_rope_keys(checkpoints):
  path, _, _ = checkpoints["llama"]
  new_style = json.loads((path / "config.json").read_text())
  legacy = {k: v for k, v in new_style.items() if k != "rope_parameters"}
  legacy["rope_theta"] = new_style["rope_parameters"]["rope_theta"]
  legacy["rope_scaling"] = {k: v for k, v in new_style["rope_parameters"].items() if k != "rope_theta"}
  assert hf.config_from_hf(legacy) == hf.config_from_hf(new_style)
  assert hf.config_from_hf(legacy).rope_scaling.factor == 8.0


def test_sharded_save_round_trip(checkpoints, tmp_path):
  path, _, ref = checkpoints["llama"]
  out = hf.save(hf.load(path), tmp_path / "sharded", max_shard_bytes=60_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and all((out / s).is_file() for s in shards)
  assert rel_err(hf.load(out)(TOKENS), ref) < 1e-4
  reloaded = tr.LlamaForCausalLM.from_pretrained(out).eval()
  assert rel_err(torch_logits(reloaded, TOKENS), ref) < 1e-6


def test_bfloat16_parameters(checkpoints, tmp_path):
  path, _, ref = checkpoints["llama"]
  model = hf.load(path, dtype="bfloat16", compute_dtype="float32")
  assert model.embed[...].dtype == jnp.bfloat16
  assert model(TOKENS).dtype == jnp.float32
  assert rel_err(model(TOKENS), ref) < 3e-2  # bf16 weight rounding only
  out = hf.save(model, tmp_path / "bf16")
  f = SafetensorsFile(out / "model.safetensors")
  assert f.header["model.embed_tokens.weight"]["dtype"] == "BF16"


def test_load_onto_a_mesh_places_each_tensor_in_its_sharding(checkpoints):
  path, _, ref = checkpoints["llama"]
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
  rules = (("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
           ("vocab", "tensor"))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = hf.load(path, mesh=mesh)
  q = model.layers.attn.q_proj[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 1, 16)
  # 2 KV heads do not split 4 ways: that dimension is replicated instead.
  assert model.layers.attn.k_proj[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
  assert model.embed[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert rel_err(model(TOKENS), ref) < 1e-4


# -- bad input: each error names the file and the problem ---------------------------------------


def _copy(checkpoints, kind, tmp_path, **config_changes):
  """A copy of a checkpoint folder, with keys of its config.json changed."""
  src, _, _ = checkpoints[kind]
  dst = tmp_path / kind
  shutil.copytree(src, dst)
  cfg = json.loads((dst / "config.json").read_text())
  (dst / "config.json").write_text(json.dumps({**cfg, **config_changes}))
  return dst


def test_missing_shard_is_named(checkpoints, tmp_path):
  path, _, _ = checkpoints["llama"]
  out = hf.save(hf.load(path), tmp_path / "sharded", max_shard_bytes=60_000)
  victim = sorted(out.glob("model-*.safetensors"))[1]
  victim.unlink()
  with pytest.raises(CheckpointError, match=f"model.safetensors.index.json.*missing.*{victim.name}"):
    hf.load(out)


def test_unsupported_architecture_is_named(checkpoints, tmp_path):
  path = _copy(checkpoints, "llama", tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
  with pytest.raises(CheckpointError, match=r"config.json: unsupported architecture.*GPT2LMHeadModel"):
    hf.load(path)


def test_mismatched_shape_names_file_and_tensor(checkpoints, tmp_path):
  path = _copy(checkpoints, "llama", tmp_path, intermediate_size=96)
  with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' "
                                            r"has shape \(128, 64\).*\(96, 64\)"):
    hf.load(path)


def test_missing_tensor_and_missing_config_are_named(checkpoints, tmp_path):
  path = _copy(checkpoints, "llama", tmp_path, num_hidden_layers=3)
  with pytest.raises(CheckpointError, match=r"missing tensors model.layers.2"):
    hf.load(path)
  (path / "config.json").unlink()
  with pytest.raises(CheckpointError, match=r"config.json: not found"):
    hf.load(path)


def test_truncated_weights_are_named(checkpoints, tmp_path):
  path = _copy(checkpoints, "llama", tmp_path)
  weights = path / "model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .* runs past the end"):
    hf.load(path)


def test_failed_save_leaves_nothing_half_written(checkpoints, tmp_path, monkeypatch):
  path, _, _ = checkpoints["llama"]
  model = hf.load(path)
  calls = []

  def failing_write(path_, entries, metadata=None):
    calls.append(path_)
    if len(calls) == 2:
      raise OSError("disk full")
    return real_write(path_, entries, metadata)

  real_write = hf.write_file_lazy
  monkeypatch.setattr(hf, "write_file_lazy", failing_write)
  with pytest.raises(OSError, match="disk full"):
    hf.save(model, tmp_path / "out", max_shard_bytes=60_000)
  assert list(tmp_path.iterdir()) == []
  # An existing checkpoint is kept when a save over it fails.
  monkeypatch.setattr(hf, "write_file_lazy", real_write)
  hf.save(model, tmp_path / "out")
  calls.clear()
  monkeypatch.setattr(hf, "write_file_lazy", failing_write)
  with pytest.raises(OSError):
    hf.save(model, tmp_path / "out", max_shard_bytes=60_000, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  assert rel_err(hf.load(tmp_path / "out")(TOKENS), model(TOKENS)) == 0.0


def test_save_refuses_to_overwrite_by_default(checkpoints, tmp_path):
  path, _, _ = checkpoints["llama"]
  model = hf.load(path)
  hf.save(model, tmp_path / "out")
  with pytest.raises(FileExistsError, match="out: exists"):
    hf.save(model, tmp_path / "out")
