"""A Hugging Face reward model (``hf:<folder>``, a LlamaForSequenceClassification folder) as PPO's
reward model and critic start and as REINFORCE's reward model: the rewards a run trains on are the
transformers model's scores (mean 0, std 1), its critic starts from the same values, and the planner
and validation take such a folder."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers as tr
from tokenizers.models import WordLevel

from jalign import config as config_lib
from jalign.data.tokenizer import Tokenizer
from jalign.plan import critic_job
from jalign.recipes import critic as critic_lib
from jalign.recipes import ppo, rollouts as rollouts_lib
from jalign.recipes.reward import RewardModel
from tests.conftest import load, quiet

N = 8  # rollout samples: one actor and one critic optimizer step of 8 (one row per fake device)


@pytest.fixture(scope="module")
def hf_rm(tmp_path_factory):
  """``(folder, transformers model)``: a random reward model over the tiny tokenizer's vocabulary."""
  folder = tmp_path_factory.mktemp("hf_rm") / "rm"
  tok = Tokenizer.tiny()
  torch.manual_seed(0)
  config = tr.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                          pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
  model = tr.LlamaForSequenceClassification(config).eval()
  with torch.no_grad():
    model.score.weight.normal_()  # scores of order one, so that a wrong one shows
  model.save_pretrained(folder)
  tok.save(folder)
  return folder, model


def torch_values(model, tokens) -> np.ndarray:
  """``[T]``: the transformers model's score at every prefix of one row."""
  with torch.no_grad():
    ids = torch.tensor(np.asarray(tokens, np.int64))[None]
    return model.score(model.model(ids).last_hidden_state)[0, :, 0].float().numpy()


def ppo_config(tmp_path, folder, **overrides):
  return load("ppo_tiny", tmp_path / "ppo", **{
      "model.init": "random", "critic.init": f"hf:{folder}", "critic.reward_model": f"hf:{folder}",
      "rollout.num_prompts": N, "rollout.micro_batch_size": N, "rollout.max_new_tokens": 12,
      "train.global_batch_size": N, "train.micro_batch_size": 1, "critic.global_batch_size": N,
      "critic.micro_batch_size": 1, "train.max_steps": 1, "train.save_interval": 0, "train.val_check_interval": 0,
      **overrides})


def test_ppo_trains_on_the_hugging_face_models_scores(tmp_path, hf_rm):
  folder, torch_model = hf_rm
  c = ppo_config(tmp_path, folder)
  loop, rollouts = ppo.build(c, log=quiet)
  summary = rollouts_lib.run_loop(c, loop, quiet)
  assert summary["steps"] == 1 and np.isfinite(summary["losses"][1])
  every = rollouts.last  # the rollout the step trained on
  lengths = (every["segment_ids"] > 0).sum(1)
  values = [torch_values(torch_model, every["tokens"][i, :n]) for i, n in enumerate(lengths)]
  # The reward of each sample: transformers' score at its last token, standardised by mean 0 and std 1.
  np.testing.assert_allclose(every["rewards"], [v[-1] for v in values], rtol=1e-5, atol=1e-5)
  assert np.std(every["rewards"]) > 0.1
  # The critic starts as a copy of the reward model: its values are the scores at every prefix.
  mask = every["loss_mask"]
  expected = np.concatenate([v[mask[i, :len(v)] > 0] for i, v in enumerate(values)])
  rows = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl")]
  rollout_row = next(r for r in rows if r["split"] == "rollout")
  assert rollout_row["values_mean"] == pytest.approx(expected.mean(), rel=1e-4, abs=1e-5)
  assert next(r for r in rows if r["split"] == "critic")["optimizer_steps"] == 1


def test_rewards_follow_the_loading_configs_data_settings(tmp_path, hf_rm):
  folder, torch_model = hf_rm
  c = ppo_config(tmp_path, folder)
  reward = RewardModel.load_to_score(c, "critic.reward_model")
  assert (reward.mean, reward.std, reward.config.data.max_seq_length) == (0.0, 1.0, 80)
  # The loading config's data.add_eos (and chat format, max_seq_length) encode what it scores.
  example = reward.encode("Say hello.", "hi there")
  assert example.tokens[-1] == Tokenizer.tiny().eos_id
  c.data.add_eos = False
  assert reward.encode("Say hello.", "hi there").tokens.tolist() == example.tokens[:-1].tolist()
  np.testing.assert_allclose(reward.rewards([example]), torch_values(torch_model, example.tokens)[-1:], rtol=1e-5)
  with pytest.raises(config_lib.ConfigError, match=r"config.critic.reward_model: it reads up to 256 positions"):
    RewardModel.load_to_score(ppo_config(tmp_path, folder, **{"data.max_seq_length": 300}), "critic.reward_model")
  bare = tmp_path / "bare"
  shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer*"))
  with pytest.raises(config_lib.ConfigError, match=r"config.critic.reward_model: .*bare has no tokenizer.json"):
    RewardModel.load_to_score(ppo_config(tmp_path, bare), "critic.reward_model")


def test_the_critic_starts_from_the_folders_weights_in_the_parameter_dtype(tmp_path, hf_rm):
  folder, torch_model = hf_rm
  embed, score = torch_model.model.embed_tokens.weight.detach().numpy(), torch_model.score.weight.detach().numpy()
  # The reward model only scores, in the compute dtype; the critic trains, in the parameter dtype.
  c = ppo_config(tmp_path, folder, **{"model.dtype": "bfloat16"})
  reward = RewardModel.load_to_score(c, "critic.reward_model")
  critic = critic_lib.critic_model(c, reward)
  assert reward.model.backbone.embed[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(critic.backbone.embed[...], embed)
  np.testing.assert_array_equal(critic.head.kernel[...], score.T)
  # One dtype: the critic is a copy of the reward model's weights, which training leaves alone.
  c = ppo_config(tmp_path, folder)
  reward = RewardModel.load_to_score(c, "critic.reward_model")
  critic = critic_lib.critic_model(c, reward)
  np.testing.assert_array_equal(critic.backbone.embed[...], embed)
  critic.head.kernel.set_value(critic.head.kernel[...] + 1)
  np.testing.assert_array_equal(reward.model.head.kernel[...], score.T)


def test_the_reward_model_must_read_the_policys_token_ids(tmp_path, hf_rm):
  folder, _ = hf_rm
  reward = RewardModel.load_to_score(ppo_config(tmp_path, folder), "critic.reward_model")
  key = "reinforce.reward_model"
  padded = Tokenizer.tiny()
  padded.backend.add_special_tokens(["[PAD]"])  # as public reward models add a pad token
  reward.tokenizer = padded
  reward.check_reads(Tokenizer.tiny(), key)  # a token beyond the policy's ids does no harm
  with pytest.raises(config_lib.ConfigError, match="a vocabulary of 512 tokens, fewer than the policy's tokenizer's 513"):
    reward.check_reads(padded, key)
  reward.tokenizer = Tokenizer(tokenizers.Tokenizer(WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>")))
  with pytest.raises(config_lib.ConfigError, match=r"config.reinforce.reward_model: its tokenizer \(2 tokens\) reads "
                                                   r"51\d of the policy's 512 token ids as other tokens \(first: 0,"):
    reward.check_reads(Tokenizer.tiny(), key)


def test_validation_and_the_planner_take_a_hugging_face_folder(tmp_path, hf_rm):
  folder, torch_model = hf_rm
  config_lib.validate(ppo_config(tmp_path, folder), device_count=8)
  for key in ("critic.reward_model", "critic.init"):
    with pytest.raises(config_lib.ConfigError, match=rf"config.{key}: {tmp_path}/nowhere is not a Hugging Face model"):
      config_lib.validate(ppo_config(tmp_path, folder, **{key: f"hf:{tmp_path}/nowhere"}), device_count=8)
    with pytest.raises(config_lib.ConfigError, match=rf"config.{key}: 'gguf:x': name a reward model, random, run:"):
      config_lib.validate(ppo_config(tmp_path, folder, **{key: "gguf:x"}), device_count=8)
  rf = load("reinforce_tiny", tmp_path / "rf", **{
      "reinforce.reward_model": f"hf:{folder}", "rollout.num_prompts": 16, "rollout.samples_per_prompt": 4,
      "rollout.micro_batch_size": 4, "train.global_batch_size": 16, "train.micro_batch_size": 2})
  config_lib.validate(rf, device_count=8)
  rf.reinforce.reward_model = f"hf:{tmp_path}/nowhere"
  with pytest.raises(config_lib.ConfigError, match="config.reinforce.reward_model: .*nowhere is not a Hugging Face"):
    config_lib.validate(rf, device_count=8)
  c = ppo_config(tmp_path, folder)
  c.critic.mesh.update({"data": 1, "fsdp": 4, "tensor": 2, "pipeline": 1})
  critic = critic_job(c, jax.devices()[:8], peak_flops=1e12, hbm_bytes_per_s=1e12)
  assert [s.name for s in critic.steps] == ["values", "rewards", "critic train"]
  # The critic is the reward model's shape (intermediate size 128), not critic.preset's (tiny: 176); the
  # planner's count includes a language model's output layer.
  assert critic.num_params == sum(p.numel() for p in torch_model.model.parameters()) + 512 * 64
