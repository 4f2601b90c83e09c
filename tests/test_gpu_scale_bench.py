"""``bench/gpu_scale.py`` runs end to end without a GPU: every part at the tiny shape on the CPU, each in
a process of its own, with the figures it reports on a GPU (no peak to compare with here)."""

import json
import os
import subprocess
import sys

from tests.conftest import FEW_STEPS_XLA_FLAGS, ROOT


def test_every_part_runs_at_the_tiny_shape(tmp_path):
  out = tmp_path / "gpu_scale.json"
  done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_scale.py"), "--tiny", "--out", str(out),
                         "--parts", "sft-1b,dpo-1b,ppo-1b,gen-1b"], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, XLA_FLAGS=FEW_STEPS_XLA_FLAGS))  # one device, as on one GPU
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  results = json.loads(out.read_text())
  parts = results["parts"]
  assert results["device"] == "cpu" and set(parts) == {"sft-1b", "dpo-1b", "ppo-1b", "gen-1b"}
  for name in ("sft-1b", "dpo-1b"):
    r = parts[name]
    assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] is None  # no peak to divide by on a CPU
    assert r["planned_peak_bytes"] > 0  # the planner's, for the config the part trained
  assert parts["dpo-1b"]["reference_s"] > 0
  assert set(parts["ppo-1b"]["seconds"]) == {"generate", "refit", "log-probs", "reward", "critic", "train"}
  assert all(s >= 0 for s in parts["ppo-1b"]["seconds"].values()) and parts["ppo-1b"]["steps"] == 2
  assert parts["gen-1b"]["batch_64"]["tokens_per_s"] > parts["gen-1b"]["batch_1"]["tokens_per_s"]
  assert "| PPO step |" in done.stdout and "| sft-1b |" in done.stdout
