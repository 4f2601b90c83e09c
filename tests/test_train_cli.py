"""The command line: python -m jalign.train and the jalign script, config overrides and errors that name the key."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FEW_STEPS_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config.train.max_steps=3", "--config.train.val_check_interval=0", "--config.train.save_interval=0",
         "--config.data.max_seq_length=64", "--config.train.global_batch_size=4", "--config.train.micro_batch_size=2"]


def train(*args, command=(sys.executable, "-m", "jalign.train")):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FEW_STEPS_XLA_FLAGS)
  return subprocess.run([*command, "--config=configs/sft_tiny.py", *SMALL, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_runs_with_overrides_and_saves_the_resolved_config(tmp_path):
  out = train(f"--config.run_dir={tmp_path / 'run'}", "--config.optimizer.lr=1e-3")
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"run folder: {tmp_path / 'run'}" in out.stdout
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["optimizer"]["lr"] == 1e-3 and saved["train"]["max_steps"] == 3
  assert (tmp_path / "run" / "checkpoints" / "3").is_dir()


def test_jalign_script_is_the_same_command(tmp_path):
  script = Path(sys.executable).parent / "jalign"
  out = train(f"--config.run_dir={tmp_path / 'run'}", command=(str(script), "train"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "finished after 3 steps" in out.stdout


def test_invalid_config_names_the_key_before_compiling(tmp_path):
  out = train(f"--config.run_dir={tmp_path / 'run'}", "--config.train.micro_batch_size=3")
  assert out.returncode == 2
  assert ("config.train.micro_batch_size: 3 rows on each of 1 data-parallel ranks do not divide the global "
          "batch of 4") in out.stderr
  assert not (tmp_path / "run").exists()
  out = train("--config.train.no_such_key=1")
  assert out.returncode != 0 and "no_such_key" in out.stderr


def test_bad_flags_and_config_files_end_in_one_line(tmp_path):
  (tmp_path / "syntax.py").write_text("def get_config(:\n")
  (tmp_path / "broken.py").write_text("from jalign.config import base_config\n\ndef get_config():\n  return 1 / 0\n")
  (tmp_path / "bad_hf").mkdir()
  (tmp_path / "bad_hf" / "config.json").write_text("{")
  cases = [
      ([f"--config.model.init=hf:{tmp_path}"],
       f"error: config.model.init: {tmp_path} holds no config.json: not a Hugging Face model folder"),
      ([f"--config.model.init=hf:{tmp_path / 'bad_hf'}"],
       f"error: {tmp_path / 'bad_hf' / 'config.json'}: not valid JSON (Expecting property name enclosed in double "
       "quotes: line 1 column 2 (char 1))"),
      (["--config.optimizer.lrr=1"], 'error: --config.optimizer.lrr: no such key \'lrr\' (did you mean "lr" instead of "lrr"?)'),
      (["--config.train.global_batch_size=0"], "error: config.train.global_batch_size: must be at least 1"),
      (["--config=configs/nope.py"], "error: --config=configs/nope.py: no such file"),
      ([f"--config={tmp_path / 'syntax.py'}"], f"error: {tmp_path / 'syntax.py'}:1: invalid syntax"),
      ([f"--config={tmp_path / 'broken.py'}"], f"error: {tmp_path / 'broken.py'}:4: ZeroDivisionError: division by zero"),
  ]
  for args, line in cases:
    out = train(f"--config.run_dir={tmp_path / 'run'}", *args)
    assert (out.returncode, out.stderr.strip()) == (2, line), out.stderr[-2000:]
  assert not (tmp_path / "run").exists()


def test_malformed_data_line_stops_before_training(tmp_path):
  data = tmp_path / "bad.jsonl"
  good = (ROOT / "jalign" / "assets" / "data" / "sft_chat_val.jsonl").read_text().splitlines()
  data.write_text("\n".join(good[:5] + ['{"system": "", "conversations": "oops"}'] + good[5:]) + "\n")
  out = train(f"--config.run_dir={tmp_path / 'run'}", f"--config.data.train={data}")
  assert out.returncode == 2
  assert f"{data}:6: field 'conversations' must be a non-empty list" in out.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()
  out = train(f"--config.run_dir={tmp_path / 'run2'}", f"--config.data.train={data}",
              "--config.data.skip_bad_lines=True")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "1 bad lines skipped" in out.stdout


def test_algorithms_that_generate_their_data_are_not_built_by_build_trainer(tmp_path):
  from jalign.config import ConfigError
  from jalign.config import load_config_file
  from jalign.recipes.build import build_trainer
  c = load_config_file(ROOT / "configs" / "ppo_70b.py", {"run_dir": str(tmp_path / "run")})
  with pytest.raises(ConfigError, match="config.algorithm: ppo generates its own data; jalign.train.run"):
    build_trainer(c)
  assert not (tmp_path / "run").exists()


def test_saved_configs_without_newer_keys_read_with_their_defaults(tmp_path):
  from jalign.config import ConfigError, read_saved
  from jalign.config import load_config_file
  c = load_config_file(ROOT / "configs" / "dpo_tiny.py", {"dpo.beta": 0.5})
  saved = json.loads(c.to_json_best_effort())
  del saved["data"]["chat_template"], saved["steerlm2"]  # as a run made before these keys existed wrote it
  (tmp_path / "config.json").write_text(json.dumps(saved))
  back = read_saved(tmp_path / "config.json")
  assert back.data.chat_template == "nemo" and back.steerlm2.responses == 4 and back.dpo.beta == 0.5
  assert back.sharding_rules == c.sharding_rules
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ConfigError, match="config.json: not a readable jalign config"):
    read_saved(tmp_path / "config.json")


# The runs that shipped configs start from (run:runs/...), as the tests make them.
EARLIER_RUNS = {"runs/sft_tiny": "sft_run", "runs/rm_tiny": "reward_run", "runs/sft_arithmetic_tiny": "sft_run"}


def _run_references(tree) -> set[str]:
  if isinstance(tree, dict):
    return set().union(*(_run_references(v) for v in tree.values()))
  return {tree[4:]} if isinstance(tree, str) and tree.startswith("run:") else set()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_validates_with_its_files(path, tmp_path, monkeypatch, request):
  """On the devices its mesh names (one for -1 axes), its data and model files checked; the runs it
  starts from (``runs/sft_tiny`` and ``runs/rm_tiny``, which its docstring trains first) made as the
  tests make them."""
  from jalign import config as config_lib
  from jalign.config import load_config_file
  c = load_config_file(path)
  for run in _run_references(c.to_dict()):
    (tmp_path / run).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / run).symlink_to(request.getfixturevalue(EARLIER_RUNS[run]))
  monkeypatch.chdir(tmp_path)
  config_lib.validate(c, process_count=1, device_count=config_lib.nominal_device_count(c.mesh), check_files=True)


def _files(folder: Path) -> dict:
  return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_folder_keeps_the_config_its_checkpoints_were_trained_with(tmp_path):
  run_dir = tmp_path / "run"
  assert train(f"--config.run_dir={run_dir}", "--config.train.save_interval=3").returncode == 0
  finished = _files(run_dir)
  # A run that cannot start (its data is bad) leaves the finished run's record as it was.
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"system": "", "conversations": "oops"}\n')
  out = train(f"--config.run_dir={run_dir}", f"--config.data.train={bad}", "--config.optimizer.lr=1e-3")
  assert (out.returncode, out.stderr.strip()) == (2, f"error: {bad}:1: field 'conversations' must be a non-empty list")
  assert _files(run_dir) == finished
  # Resuming with a config that trains otherwise is refused, naming what differs.
  out = train(f"--config.run_dir={run_dir}", "--config.optimizer.lr=1e-3", "--config.train.max_steps=5")
  assert (out.returncode, out.stderr.strip()) == (2, (
      f"error: config: {run_dir} holds checkpoints (latest step 3) trained with a different config: "
      "optimizer.lr 0.003 -> 0.001; use another run_dir, or set train.allow_config_change=True to resume "
      "with these changes"))
  assert _files(run_dir) == finished
  # Allowed, it warns and keeps each config under the step it took over at.
  out = train(f"--config.run_dir={run_dir}", "--config.optimizer.lr=1e-3", "--config.train.max_steps=5",
              "--config.train.allow_config_change=True")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stderr.strip().startswith("warning: resuming at step 3 with a changed config: optimizer.lr 0.003 -> 0.001")
  assert (run_dir / "configs" / "step_0.json").read_bytes() == finished[Path("config.json")]
  assert json.loads((run_dir / "configs" / "step_3.json").read_text())["optimizer"]["lr"] == 1e-3
  assert (run_dir / "configs" / "step_3.json").read_bytes() == (run_dir / "config.json").read_bytes()
  assert (run_dir / "checkpoints" / "5").is_dir()
  for path in (Path("checkpoints/3"),):  # the earlier checkpoint is untouched
    assert all(finished[p] == (run_dir / p).read_bytes() for p in finished if path in p.parents)


def test_a_run_that_diverges_names_the_newest_checkpoint_whose_state_was_finite(tmp_path):
  import jax
  import numpy as np

  from jalign.recipes.build import load_trained
  run_dir = tmp_path / "run"
  out = train(f"--config.run_dir={run_dir}", "--config.optimizer.lr=1e6", "--config.optimizer.warmup_steps=4",
              "--config.train.max_steps=8", "--config.train.val_check_interval=1", "--config.train.save_interval=1",
              "--config.train.keep_last=8")
  # Step 2's state validated finite, but its gradient (measured at step 3) is not: step 1 is the good one.
  assert (out.returncode, out.stderr.strip()) == (1, f"error: step 3: grad_norm is nan; stopping. The last good "
                                                     f"checkpoint is step 1 in {run_dir / 'checkpoints'}")
  model, tok, _ = load_trained(run_dir, 1)
  logits = model(np.asarray([tok.encode("hello there")], np.int32))
  assert np.isfinite(np.asarray(jax.device_get(logits))).all()


DISK_FULL = r"""
set -e
mount -t tmpfs -o size=64m tmpfs "$MNT"
"$@" --config.train.max_steps=4 --config.train.save_interval=2 > /dev/null
cp -a "$MNT/run" "$OUT/before"
# The disk is left with room for half a checkpoint.
free=$(df -B1 --output=avail "$MNT" | tail -1); size=$(du -sb "$MNT/run/checkpoints/4" | cut -f1)
fallocate -l $((free - size / 2)) "$MNT/filler"
set +e
"$@" --config.train.max_steps=200 --config.train.save_interval=50 > "$OUT/stdout" 2> "$OUT/stderr"
echo $? > "$OUT/rc"
cp -a "$MNT/run" "$OUT/after"
"""


def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line(tmp_path):
  """On a 64 MB tmpfs (in a mount namespace of its own) filled up after checkpoint 4: the save of step 50
  fails, the run stops before its next save would have, and checkpoints 2 and 4 are as they were."""
  mnt, out = tmp_path / "disk", tmp_path / "out"
  mnt.mkdir(), out.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FEW_STEPS_XLA_FLAGS, MNT=str(mnt), OUT=str(out))
  subprocess.run(["unshare", "--map-root-user", "--mount", "bash", "-c", DISK_FULL, "disk_full", sys.executable,
                  "-m", "jalign.train", "--config=configs/sft_tiny.py", *SMALL[3:], "--config.train.val_check_interval=0",
                  f"--config.run_dir={mnt / 'run'}"], cwd=ROOT, env=env, check=True, timeout=300)
  stderr = (out / "stderr").read_text()
  assert (int((out / "rc").read_text()), stderr.strip()) == (1, (
      f"error: checkpoint 50 could not be written to {mnt / 'run' / 'checkpoints' / '50'}: No space left on device; "
      "the last complete checkpoint is 4")), stderr[-3000:]
  before, after = _files(out / "before" / "checkpoints"), _files(out / "after" / "checkpoints")
  assert sorted({p.parts[0] for p in before}) == ["2", "4"] and all(after[p] == b for p, b in before.items())
  steps = [json.loads(line)["step"] for line in (out / "after" / "metrics.jsonl").read_text().splitlines()]
  assert 50 <= steps[-1] < 100  # stopped once the write was known to have failed


def test_an_unreadable_checkpoint_is_named_and_the_intact_one_offered(tmp_path):
  run_dir = tmp_path / "run"
  assert train(f"--config.run_dir={run_dir}", "--config.train.max_steps=4", "--config.train.save_interval=2").returncode == 0
  largest = max((p for p in (run_dir / "checkpoints" / "4").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])  # torn by a failing disk
  saved = _files(run_dir)
  out = train(f"--config.run_dir={run_dir}", "--config.train.max_steps=6", "--config.train.save_interval=2")
  assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-3000:]
  assert out.stderr.startswith(f"error: {run_dir / 'checkpoints'}: checkpoint 4 (")
  assert out.stderr.strip().endswith("cannot be read; checkpoint 2 is intact: set "
                                     "train.skip_unreadable_checkpoints=True to resume from it")
  assert _files(run_dir) == saved
  out = train(f"--config.run_dir={run_dir}", "--config.train.max_steps=6", "--config.train.save_interval=2",
              "--config.train.skip_unreadable_checkpoints=True")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 2" in out.stdout and "resuming from checkpoint 2" in out.stderr
  kept = {p.relative_to(Path("checkpoints/4")): b for p, b in saved.items() if Path("checkpoints/4") in p.parents}
  assert _files(run_dir / "checkpoints" / "4.unreadable") == kept
  assert (run_dir / "checkpoints" / "6").is_dir()
