"""Knowledge distillation: the offline top-K step and a student trained on it through the shared loop."""

import jax
import numpy as np
import pytest

from jalign.recipes import distill
from jalign.recipes.build import build_trainer
from jalign.train import run

from tests.conftest import load, quiet


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  folder = tmp_path_factory.mktemp("teacher")
  run(load("sft_tiny", folder, **{"train.max_steps": 60, "train.val_check_interval": 0, "train.save_interval": 0,
                                  "data.max_seq_length": 64}), log=quiet)
  return folder


def kd_config(tmp_path, teacher, **overrides):
  return load("kd_tiny", tmp_path / "student", **{"kd.teacher": f"run:{teacher}", "kd.topk_dir": str(tmp_path / "topk"),
                                                  "data.max_seq_length": 64, "train.save_interval": 0, **overrides})


@pytest.mark.many_steps
def test_student_learns_the_teachers_top_k(tmp_path, teacher):
  c = kd_config(tmp_path, teacher, **{"train.max_steps": 60, "train.val_check_interval": 60})
  written = distill.run(c, log=quiet)
  assert [p.name for p in written] == ["sft_chat_train.jsonl.topk.npz", "sft_chat_val.jsonl.topk.npz"]
  with np.load(written[1]) as f:
    assert f["ids"].shape == f["logits"].shape and f["ids"].shape[1] == 16
    assert np.all(np.diff(f["logits"], axis=1) <= 0)  # top-K in descending order
  loop = build_trainer(c, log=quiet)
  before = loop.validate()
  after = loop.run()["val"]
  assert after["val_kd_loss"] < 0.4 * before["val_kd_loss"], (before, after)


def test_top_k_made_for_other_tokens_is_refused(tmp_path, teacher):
  distill.run(kd_config(tmp_path, teacher, **{"train.max_steps": 1}), log=quiet)
  with pytest.raises(ValueError, match=r"sft_chat_train.jsonl.topk.npz: made for other token ids"):
    build_trainer(kd_config(tmp_path, teacher, **{"data.max_seq_length": 48, "train.max_steps": 1}), log=quiet)
  with pytest.raises(FileNotFoundError, match=r"no teacher top-K file; run python -m jalign.distill"):
    build_trainer(kd_config(tmp_path, teacher, **{"kd.topk_dir": str(tmp_path / "none"), "train.max_steps": 1}),
                  log=quiet)


def test_distill_command_needs_a_config():
  import subprocess
  import sys
  from pathlib import Path
  script = Path(sys.executable).parent / "jalign"
  done = subprocess.run([str(script), "distill"], capture_output=True, text=True, timeout=120)
  assert done.returncode != 0 and "--config=configs/<name>.py (a kd config) is required" in done.stderr


def test_the_teacher_on_the_configs_mesh_gives_one_devices_top_k(tmp_path, teacher):
  from flax import nnx

  from jalign.data.sft import Example
  from jalign.parallel import mesh as pmesh
  from jalign.recipes import build
  c = kd_config(tmp_path, teacher, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  mesh, rules = pmesh.make_mesh(dict(c.mesh)), build.rules_of(c)
  sharded, _ = build.build_model(distill.teacher_config(c), mesh, rules)
  weights = nnx.state(sharded, nnx.Param)
  expected = pmesh.tree_shardings(weights, mesh, rules)
  assert all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(jax.tree.leaves(weights), jax.tree.leaves(expected)))
  embedding = sharded.embed[...]
  assert embedding.addressable_shards[0].data.size < embedding.size  # not whole on any device
  whole, _ = build.build_model(distill.teacher_config(c))
  rng = np.random.default_rng(0)
  examples = [Example(rng.integers(1, 200, n).astype(np.int32), np.zeros(n, bool)) for n in (9, 17, 5, 12, 3)]
  ids, logits, offsets = distill.teacher_topk(sharded, examples, k=5, batch_rows=3, mesh=mesh, rules=rules)
  assert offsets.tolist() == [0, 9, 26, 31, 43, 46]
  for ex, start in zip(examples, offsets):
    full = np.asarray(whole(ex.tokens[None]), np.float64)[0]  # one row, no padding: the reference
    top = np.argsort(-full, axis=-1)[:, :5]
    np.testing.assert_array_equal(ids[start:start + len(ex)], top)
    np.testing.assert_allclose(logits[start:start + len(ex)], np.take_along_axis(full, top, -1), atol=1e-4, rtol=1e-4)
