"""Two processes x 4 CPU devices with jax.distributed: same losses as one process with 8 devices,
a checkpoint saved by both, restored by one process onto another mesh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import portpicker
from flax import nnx

from jalign.train import build_trainer, load_config_file

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
COMMON = [f"--config.train.max_steps={STEPS}", "--config.train.val_check_interval=0",
          "--config.train.save_interval=0", "--config.data.max_seq_length=64",
          "--config.train.global_batch_size=8", "--config.train.micro_batch_size=1", "--config.data.validation="]


def _launch(run_dir, processes, devices_each):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  port = portpicker.pick_unused_port()
  procs = []
  for pid in range(processes):
    flags = [f"--config.run_dir={run_dir}", f"--config.distributed.local_device_count={devices_each}"]
    if processes > 1:
      flags += [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={pid}"]
    procs.append(subprocess.Popen([sys.executable, "-m", "jalign.train", "--config=configs/sft_tiny.py",
                                   *COMMON, *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def _losses(run_dir):
  rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if r["split"] == "train"]


def test_two_processes_match_one_and_restore_on_another_mesh(tmp_path):
  _launch(tmp_path / "one", 1, 8)
  outs = _launch(tmp_path / "two", 2, 4)
  assert "run folder" in outs[0][0] and "run folder" not in outs[1][0]  # process 0 speaks for the job
  single, multi = _losses(tmp_path / "one"), _losses(tmp_path / "two")
  assert len(single) == len(multi) == STEPS
  np.testing.assert_allclose(multi, single, rtol=1e-5)

  # Restore the two-process checkpoint here, in one process, on two other meshes.
  params = []
  for sizes in ({"fsdp": 4, "tensor": 2}, {"data": 8}):
    c = load_config_file(ROOT / "configs" / "sft_tiny.py", {
        "run_dir": str(tmp_path / "two"), "train.max_steps": STEPS, "data.max_seq_length": 64,
        "train.global_batch_size": 8, "train.micro_batch_size": 1, "data.validation": ""})
    c.mesh.update({"data": 1, "pipeline": 1, "fsdp": 1, "tensor": 1, **sizes})
    loop = build_trainer(c, log=lambda *_: None)
    assert loop.restore() == STEPS and int(loop.state.step) == STEPS
    q = loop.state.params["layers"]["attn"]["q_proj"].get_value()
    if sizes.get("tensor"):
      assert q.sharding.spec == jax.sharding.PartitionSpec("pipeline", "fsdp", "tensor", None)
    params.append([np.asarray(v.get_value()) for _, v in nnx.to_flat_state(loop.state.params)])
  for a, b in zip(*params):
    np.testing.assert_array_equal(a, b)
