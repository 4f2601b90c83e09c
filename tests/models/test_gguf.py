"""GGUF: SmolLM2-135M-Instruct against transformers loading the same file, and bad files."""

import gguf
import numpy as np
import pytest
import torch

from jalign.models import gguf as jgguf
from jalign.models.safetensors_io import CheckpointError
from jalign.rollout import generate
from tests.models.hf_fixtures import rel_err


@pytest.fixture(scope="module")
def smollm2(smollm2_file):
  return jgguf.load(smollm2_file)


@pytest.fixture(scope="module")
def reference(smollm2_file):
  from transformers import AutoModelForCausalLM, AutoTokenizer
  kwargs = dict(gguf_file=smollm2_file.name)
  tok = AutoTokenizer.from_pretrained(smollm2_file.parent, **kwargs)
  model = AutoModelForCausalLM.from_pretrained(smollm2_file.parent, dtype=torch.float32, **kwargs).eval()
  return model, tok


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_config_read_from_the_file(smollm2):
  model, tok = smollm2
  cfg = model.config
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
  assert cfg.tie_word_embeddings and cfg.vocab_size == tok.vocab_size == 49152
  assert tok.eos_token == "<|im_end|>" and tok.bos_id == 1


def test_read_onto_a_mesh_each_device_gets_its_shard_of_the_same_weights(smollm2, smollm2_file, monkeypatch):
  import jax
  from flax import nnx

  from jalign.parallel import mesh as pmesh
  dequantized = []
  dequantize = gguf.quants.dequantize
  monkeypatch.setattr(gguf.quants, "dequantize", lambda data, kind: dequantized.append(1) or dequantize(data, kind))
  mesh = pmesh.make_mesh({"data": 1, "fsdp": 4, "tensor": 2, "pipeline": 1})
  with pmesh.use(mesh, pmesh.DEFAULT_RULES):
    sharded, _ = jgguf.load(smollm2_file, mesh=mesh)
  # Each tensor once, not once per device that holds a slice of it (2 + 9 per layer; the head is tied).
  assert len(dequantized) == 2 + 9 * 30
  whole = nnx.state(smollm2[0], nnx.Param)
  placed = nnx.state(sharded, nnx.Param)
  expected = pmesh.tree_shardings(placed, mesh, pmesh.DEFAULT_RULES)
  for a, b, s in zip(jax.tree.leaves(whole), jax.tree.leaves(placed), jax.tree.leaves(expected)):
    assert b.sharding.is_equivalent_to(s, b.ndim)
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
  embed = sharded.embed[...]
  assert embed.addressable_shards[0].data.size * 8 == embed.size  # vocabulary x hidden over all 8 devices


def test_logits_match_transformers_on_the_same_file(smollm2, reference):
  model, tok = smollm2
  ids = np.array([tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)])
  with torch.no_grad():
    ref = reference[0](torch.tensor(ids)).logits.numpy()
  assert rel_err(model(ids), ref) < 1e-3


@pytest.mark.parametrize("text", ["Hello, world! How are you today?", "def f(x):\n    return x * 2\n",
                                  "Ünïcödé, emojis 🙂 and  double  spaces.",
                                  "<|im_start|>user\nHi<|im_end|>\n"])
def test_tokenizer_matches_transformers(smollm2, reference, text):
  tok, ref = smollm2[1], reference[1]
  assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
  assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_digits_are_split_one_by_one(smollm2):
  # llama.cpp's "smollm" pre-tokenizer, as in SmolLM2's own tokenizer.json: one token per digit.
  tok = smollm2[1]
  assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_chat_template_renders_like_transformers(smollm2, reference):
  text = smollm2[1].apply_chat_template(CHAT, add_generation_prompt=True)
  assert text == reference[1].apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
  assert text.endswith("<|im_start|>assistant\n")


def test_answers_a_chat_prompt_sensibly(smollm2):
  model, tok = smollm2
  ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
  rollout = generate(model, [ids], max_new_tokens=16, greedy=True, stop_ids=(tok.eos_id,), pad_id=tok.pad_id)
  answer = tok.decode(rollout.responses()[0])
  assert "Paris" in answer and bool(rollout.is_end[0])


def _write_gguf(path, arch):
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_other_architecture_is_named(tmp_path):
  path = tmp_path / "gpt2.gguf"
  _write_gguf(path, "gpt2")
  with pytest.raises(CheckpointError, match=r"gpt2.gguf: GGUF architecture 'gpt2' is not supported"):
    jgguf.load(path)


def test_not_a_gguf_file_is_named(tmp_path):
  path = tmp_path / "weights.gguf"
  path.write_bytes(b"this is not a gguf file at all" * 10)
  with pytest.raises(CheckpointError, match=r"weights.gguf: not a readable GGUF file"):
    jgguf.load(path)
  with pytest.raises(CheckpointError, match=r"missing.gguf: file not found"):
    jgguf.load(tmp_path / "missing.gguf")


def test_llama_file_missing_keys_is_named(tmp_path):
  path = tmp_path / "partial.gguf"
  _write_gguf(path, "llama")
  with pytest.raises(CheckpointError, match=r"partial.gguf: missing GGUF key 'llama.attention.head_count'"):
    jgguf.load(path)
