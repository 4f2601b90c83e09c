"""The reward-function pool: weights, and functions that raise, hang, return NaN or kill their worker."""

import os
import subprocess
import sys
import time

import pytest

from jalign.rewards import functions as f
from tests.conftest import ROOT

FUNCS = "tests.rewards.sample_functions"


def items(*records):
  return [f.Item(prompt="p", response="r" * (i + 1), record=rec, where=f"data.jsonl:{i + 3}")
          for i, rec in enumerate(records)]


def test_weighted_sum_of_functions():
  pool = f.RewardPool([f.parse(f"{FUNCS}:length*0.5"), f.parse("jalign.rewards.shape:concise")], workers=2)
  try:
    totals, parts = pool.score(items({}, {}, {"length_budget": 2}))
  finally:
    pool.close()
  assert parts[f"{FUNCS}:length"] == [1.0, 2.0, 3.0]
  assert totals == [0.5, 1.0, 1.5 - 0.5]


@pytest.mark.parametrize("name, why", [
    ("raises", "raised ValueError: cannot grade 7"),
    ("nan", "returned nan, not a finite number"),
    ("text", "returned '1.0', not a finite number"),
    ("exits", "ended its worker process"),
])
def test_a_failing_function_scores_the_default_and_is_named_with_its_record(name, why):
  logs = []
  pool = f.RewardPool([f.parse(f"{FUNCS}:{name}")], default=-1.0, workers=1, log=logs.append)
  try:
    totals, _ = pool.score(items({"id": 7}, {"id": 7}))
    again, _ = pool.score(items({"id": 7}))  # the pool still serves
  finally:
    pool.close()
  assert totals == [-1.0, -1.0] and again == [-1.0] and pool.failures == 3
  assert logs[0] == f"2 reward function calls failed and scored -1; first: reward function {FUNCS}:{name} {why} on data.jsonl:3"


def test_a_hanging_function_is_stopped_at_its_timeout_and_the_rest_still_score():
  logs = []
  pool = f.RewardPool([f.parse(f"{FUNCS}:hangs")], timeout_s=1.0, workers=2, log=logs.append)
  began = time.monotonic()
  try:
    totals, _ = pool.score(items({"hang": True}, {}, {}, {"hang": True}, {}))
  finally:
    pool.close()
  assert time.monotonic() - began < 10
  assert totals == [0.0, 1.0, 1.0, 0.0, 1.0]
  assert f"reward function {FUNCS}:hangs timed out after 1 s on data.jsonl:3" in logs[0]


def test_a_call_is_timed_from_when_its_worker_has_started():
  """A worker's start (a spawned Python importing the functions: seconds on a busy machine) is not the
  call's time: a module that takes 2 s to import, calls allowed 1 s."""
  pool = f.RewardPool([f.parse("tests.rewards.slow_import:one")], timeout_s=1.0, workers=2)
  try:
    totals, _ = pool.score(items({}, {}, {}))
  finally:
    pool.close()
  assert totals == [1.0, 1.0, 1.0] and pool.failures == 0


def test_workers_do_not_import_the_trainers_main_module():
  """Started from ``python -m`` a module that imports jax, as the trainer is, a worker imports only the
  functions (jax and the trainer would cost each worker seconds and about 200 MB)."""
  out = subprocess.run([sys.executable, "-m", "tests.rewards.trainer_like_main"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["0.0"]


def test_stop_on_error_raises_naming_the_function_and_record():
  pool = f.RewardPool([f.parse(f"{FUNCS}:raises")], on_error="stop", workers=1)
  with pytest.raises(f.RewardError, match=rf"^reward function {FUNCS}:raises raised ValueError: cannot grade 9 on data.jsonl:3$"):
    pool.score(items({"id": 9}))


@pytest.mark.parametrize("spec, message", [
    ("nomodule_xyz:fn", "cannot import nomodule_xyz"),
    ("jalign.rewards.shape:nothing", "jalign.rewards.shape has no nothing"),
    ("justaname", "expected module:function"),
    ("jalign.rewards.shape:concise*heavy", "weight 'heavy' is not a number"),
])
def test_bad_names_are_refused_before_any_worker_starts(spec, message):
  with pytest.raises(f.RewardError, match=message):
    f.RewardPool([f.parse(spec)])
