"""``python -m jalign.export``: a trained run's policy as a Hugging Face folder that transformers runs with
the run's logits, and as a TensorRT-LLM checkpoint whose ranks give them too; a reward model run as a
LlamaForSequenceClassification folder with the run's scores."""

import numpy as np
import pytest
import torch
import transformers as tr

from jalign import export as export_lib
from jalign.recipes.build import load_trained
from tests.models.hf_fixtures import rel_err, torch_logits
from tests.rollout.test_trtllm import run_checkpoint

TOKENS = np.random.RandomState(0).randint(3, 512, (2, 13))


@pytest.fixture(scope="module")
def trained_logits(sft_run):
  model, _, _ = load_trained(sft_run)
  return np.asarray(model(TOKENS), np.float64)


def test_hf_export_runs_in_transformers_with_the_runs_logits(sft_run, trained_logits, tmp_path, capsys):
  export_lib.main(["--run", str(sft_run), "--out", str(tmp_path / "hf")])
  assert "hf export" in capsys.readouterr().out
  reloaded = tr.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
  assert rel_err(torch_logits(reloaded, TOKENS), trained_logits) < 1e-5
  assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_trtllm_export_ranks_give_the_runs_logits(sft_run, trained_logits, tmp_path):
  out = export_lib.export(sft_run, tmp_path / "trt", format="trtllm", tp_size=2, pp_size=2)
  assert (out / "tokenizer.json").is_file()
  assert rel_err(run_checkpoint(out, TOKENS), trained_logits) < 1e-5


def test_reward_model_export_scores_in_transformers_as_the_run_does(reward_run, tmp_path):
  out = export_lib.export(reward_run, tmp_path / "rm")
  reloaded = tr.LlamaForSequenceClassification.from_pretrained(out).eval()
  with torch.no_grad():
    scores = reloaded(torch.tensor(TOKENS)).logits.numpy()
  model, _, _ = load_trained(reward_run)
  np.testing.assert_allclose(scores, model.score(TOKENS, [TOKENS.shape[1]] * 2), rtol=1e-5, atol=1e-5)
  assert np.abs(scores).max() > 1e-3
  assert (out / "tokenizer.json").is_file()


def test_what_cannot_be_exported_is_refused_clearly(sft_run, reward_run, tmp_path, capsys):
  with pytest.raises(ValueError, match="rm run trains a reward model; --format=hf exports it, trtllm"):
    export_lib.export(reward_run, tmp_path / "rm", format="trtllm")
  with pytest.raises(ValueError, match="a Hugging Face folder is whole"):
    export_lib.export(sft_run, tmp_path / "x", tp_size=2)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("kept")
  with pytest.raises(SystemExit) as exit_:
    export_lib.main(["--run", str(sft_run), "--out", str(tmp_path / "full"), "--format", "trtllm"])
  assert exit_.value.code == 2 and "full: exists and is not empty" in capsys.readouterr().err
  assert (tmp_path / "full" / "keep.txt").read_text() == "kept"
  with pytest.raises(SystemExit):
    export_lib.main(["--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")])
  assert "nowhere/config.json: not a jalign run folder" in capsys.readouterr().err
