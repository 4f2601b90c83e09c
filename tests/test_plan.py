"""The planner: exact parameter and optimizer bytes, and a compiled step for a real config."""

import subprocess
import sys
from pathlib import Path


from jalign.models import LlamaConfig
from jalign.plan import plan
from jalign.train import load_config_file

ROOT = Path(__file__).resolve().parents[1]


def test_parameter_and_optimizer_bytes_are_exact():
  c = load_config_file(ROOT / "configs" / "sft_tiny.py", {"train.micro_batch_size": 1})
  c.mesh.update({"data": 1, "fsdp": 8, "tensor": 1, "pipeline": 1})
  p = plan(c, peak_flops=1e12)
  cfg = LlamaConfig.preset("tiny")
  norms = (2 * cfg.num_layers + 1) * cfg.hidden_size  # norm scales have no embed axis: replicated
  assert p.params_bytes == 4 * ((cfg.num_params - norms) // 8 + norms)
  assert p.optimizer_bytes == 2 * p.params_bytes + 8  # Adam's two moments; its and the schedule's counts
  assert p.mesh["fsdp"] == 8 and p.temp_bytes > 0 and p.flops > 0


def test_llama3_8b_on_8_devices_fits_in_80_gb():
  out = subprocess.run([sys.executable, "-m", "jalign.plan", "--config=configs/sft_llama3_8b.py"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  line = next(l for l in out.stdout.splitlines() if "total" in l)
  total = float(line.split("total ")[1].split(" GiB")[0])
  assert 10 < total < 80, line
  assert "8.03B parameters on mesh fsdp=8" in out.stdout
