"""``jalign report RUN_DIR [RUN_DIR ...] [--out=DIR]``: pictures of training runs.

Reads each run folder's ``metrics.jsonl`` and draws one PNG per quantity a run logged (the runs
overlaid, each in its own colour): loss and validation loss, reward and KL, response length, learning
rate, gradient norm, throughput, and the trainer-vs-engine log-prob gap where a run logs it; then one
self-contained ``report.html`` (the figures embedded) with a table of each run's last values. The
output goes to ``--out`` (default ``<first run>/report``). matplotlib draws, off screen.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from pathlib import Path

# (file name, title, y-axis label, [(split, key, line label)], log-scale y). A figure is drawn when
# any run has one of its series.
FIGURES = [
    ("loss", "Loss", "loss", [("train", "loss", "train"), ("val", "val_loss", "validation")], False),
    ("reward", "Reward", "reward", [("rollout", "reward", "rollout"), ("val", "val_reward", "validation"),
                                    ("rollout", "rewards_with_kl", "with KL penalty")], False),
    ("kl", "KL to the initial policy", "KL", [("rollout", "init_policy_kl", "rollout")], False),
    ("response_length", "Response length", "tokens", [("rollout", "response_length", "rollout"),
                                                      ("val", "val_response_length", "validation")], False),
    ("lr", "Learning rate", "lr", [("train", "lr", "actor"), ("critic", "lr", "critic")], False),
    ("grad_norm", "Gradient norm", "norm", [("train", "grad_norm", "actor"), ("critic", "grad_norm", "critic")], True),
    ("throughput", "Throughput", "tokens/s", [("train", "tokens_per_s", "train")], False),
    ("logprob_gap", "Trainer vs engine log-probs", "mean |difference|",
     [("rollout", "logprob_gap", "rollout"), ("train", "logprob_gap", "train")], True),
]


class ReportError(ValueError):
  pass


def read_metrics(run_dir: Path) -> dict:
  """``{(split, key): ([steps], [values])}`` of a run's ``metrics.jsonl``; a step logged twice (a run
  folder from before resumes marked their place) keeps its last value."""
  path = Path(run_dir) / "metrics.jsonl"
  if not path.is_file():
    raise ReportError(f"{path}: no such file (is {run_dir} a jalign run folder?)")
  latest: dict = {}
  for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
    try:
      row = json.loads(line)
      step, split = int(row["step"]), str(row["split"])
    except (ValueError, KeyError, TypeError):
      continue  # a line cut short by a kill
    for key, value in row.items():
      if key not in ("step", "split") and isinstance(value, (int, float)) and math.isfinite(value):
        latest.setdefault((split, key), {})[step] = float(value)
  return {name: (sorted(points), [points[s] for s in sorted(points)]) for name, points in latest.items()}


def draw(runs: dict, out: Path) -> list[Path]:
  """The figures of ``runs`` (``{label: metrics}``) as PNGs in ``out``; the paths written."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out.mkdir(parents=True, exist_ok=True)
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  styles = ["-", "--", ":", "-."]
  written = []
  for name, title, ylabel, series, log_y in FIGURES:
    lines = [(label, s, key, tag) for label, metrics in runs.items() for (s, key, tag) in series if (s, key) in metrics]
    if not lines:
      continue
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for r, (label, metrics) in enumerate(runs.items()):
      for k, (split, key, tag) in enumerate(series):
        if (split, key) in metrics:
          steps, values = metrics[(split, key)]
          marker = "o" if len(steps) < 30 else None
          ax.plot(steps, values, styles[k % len(styles)], color=colours[r % len(colours)], marker=marker,
                  markersize=3, label=f"{label}: {tag}" if len(runs) > 1 else tag)
    if log_y and all(v > 0 for label, s, key, _ in lines for v in runs[label][(s, key)][1]):
      ax.set_yscale("log")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
  return written


def _last(metrics: dict, split: str, key: str) -> str:
  series = metrics.get((split, key))
  return f"{series[1][-1]:.4g}" if series else ""


def write_html(runs: dict, figures: list[Path], out: Path) -> Path:
  """``report.html``: the figures embedded as data URIs (the page stands alone) and each run's last
  step and values."""
  columns = [("train", "loss"), ("val", "val_loss"), ("rollout", "reward"), ("val", "val_reward")]
  rows = []
  for label, metrics in runs.items():
    last_step = max((steps[-1] for steps, _ in metrics.values()), default=0)
    cells = "".join(f"<td>{_last(metrics, s, k)}</td>" for s, k in columns)
    rows.append(f"<tr><td>{html.escape(label)}</td><td>{last_step}</td>{cells}</tr>")
  header = "".join(f"<th>{k}</th>" for _, k in columns)
  images = "".join(
      f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"></figure>'
      for p in figures)
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>jalign report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}figure{{display:inline-block;margin:8px}}</style>
</head><body><h1>jalign report</h1>
<table><tr><th>run</th><th>last step</th>{header}</tr>{''.join(rows)}</table>
{images}
</body></html>
"""
  path = out / "report.html"
  path.write_text(page)
  return path


def report(run_dirs: list[str], out: str | None = None) -> Path:
  """Draws the runs in ``run_dirs``; the path of the HTML page."""
  if not run_dirs:
    raise ReportError("name at least one run folder")
  labels = [Path(d).name or str(d) for d in run_dirs]
  if len(set(labels)) < len(labels):
    labels = [str(d) for d in run_dirs]
  runs = {label: read_metrics(Path(d)) for label, d in zip(labels, run_dirs)}
  folder = Path(out) if out else Path(run_dirs[0]) / "report"
  return write_html(runs, draw(runs, folder), folder)


def main(argv=None):
  p = argparse.ArgumentParser(prog="jalign report", description="Pictures of jalign runs: PNGs and one HTML page.")
  p.add_argument("runs", nargs="+", help="run folders (each with its metrics.jsonl)")
  p.add_argument("--out", default=None, help="folder for the figures and report.html (default: <first run>/report)")
  args = p.parse_args(argv)
  try:
    page = report(args.runs, args.out)
  except ReportError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"report: {page}")


if __name__ == "__main__":
  main()
