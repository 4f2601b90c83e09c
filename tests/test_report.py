"""jalign report: the figures and the HTML page of real runs, several overlaid."""

import base64
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _png_size(data: bytes) -> tuple[int, int]:
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", data[16:24])


def test_report_draws_two_runs_overlaid_into_pngs_and_one_page(tmp_path, sft_run, reward_run):
  out = subprocess.run([str(Path(sys.executable).parent / "jalign"), "report", str(sft_run), str(reward_run),
                        f"--out={tmp_path / 'report'}"], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  figures = {p.stem: p.read_bytes() for p in (tmp_path / "report").glob("*.png")}
  # What both runs logged (no rollouts: no reward, KL or response-length figures).
  assert set(figures) == {"loss", "lr", "grad_norm", "throughput"}
  for data in figures.values():
    assert _png_size(data) == (700, 400) and len(data) > 10_000  # curves drawn, not an empty canvas
  page = (tmp_path / "report" / "report.html").read_text()
  embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
  assert sorted(base64.b64decode(e) for e in embedded) == sorted(figures.values())  # the page stands alone
  last = json.loads((sft_run / "metrics.jsonl").read_text().splitlines()[-1])
  assert f"<td>sft</td><td>{last['step']}</td><td>{last['loss']:.4g}</td>" in page
  assert "<td>rm</td>" in page


def test_report_names_a_folder_without_metrics(tmp_path):
  out = subprocess.run([sys.executable, "-m", "jalign.report", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
  assert (out.returncode, out.stderr.strip()) == (2, f"error: {tmp_path / 'metrics.jsonl'}: no such file "
                                                     f"(is {tmp_path} a jalign run folder?)")
