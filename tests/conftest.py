"""Shared test set-up: 8 fake CPU devices, the persistent compilation cache, offline Hugging Face."""

import os
import subprocess
import sys
from pathlib import Path

from tests.xla_flags import CPU_XLA_FLAGS, FEW_STEPS_XLA_FLAGS  # noqa: F401 (the tests import them from here)

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {CPU_XLA_FLAGS}")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("JALIGN_CACHE", str(ROOT / ".cache"))
# Compiled programs are shared through the persistent cache by the test processes and every process
# they start (the CLI, multi-process jobs, servers), which read these from the environment.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


# JALIGN_COMPILE_REPORT=<file>: each test's seconds of tracing, lowering and XLA compilation in the test
# process (not in the processes it starts), appended as JSON lines: which tests compile most, and which
# programs (those of a second or more, by name) each compiled.
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
                  "/jax/core/compile/backend_compile_duration": "compile_s"}
_compile_seconds: dict[str, float] = {}
_compiled_programs: list[tuple[str, float]] = []


def _count_compile_seconds(event, duration, fun_name="", **_):
  if event in COMPILE_EVENTS:
    key = COMPILE_EVENTS[event]
    _compile_seconds[key] = _compile_seconds.get(key, 0.0) + duration
    if key == "compile_s" and duration >= 1.0:
      _compiled_programs.append((fun_name, round(duration, 1)))


if os.environ.get("JALIGN_COMPILE_REPORT"):
  jax.monitoring.register_event_duration_secs_listener(_count_compile_seconds)

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):
    import json
    import time
    _compile_seconds.clear()
    _compiled_programs.clear()
    started, began = time.time(), time.perf_counter()
    yield
    row = {"test": item.nodeid, "worker": os.environ.get("PYTEST_XDIST_WORKER", ""), "started": round(started, 1),
           "wall_s": round(time.perf_counter() - began, 2),
           **{k: round(v, 2) for k, v in _compile_seconds.items()}, "programs": _compiled_programs}
    with open(os.environ["JALIGN_COMPILE_REPORT"], "a") as f:
      f.write(json.dumps(row) + "\n")


# Most tests run what they compile once or a few times: their programs are compiled with LLVM at -O0
# (jax_disable_most_optimizations; half the compile time, code 2-3x slower). Tests marked many_steps
# (training until something is learned, long generation) and the shared runs keep -O1. The persistent
# cache keys each program on its level.
def _optimize(on: bool):
  jax.config.update("jax_disable_most_optimizations", not on)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  _optimize(item.get_closest_marker("many_steps") is not None)


# Modules whose processes take several GB each (the memory probes, the real-size local runs): under
# pytest-xdist's loadfile they make one unit of work, run one after another on one worker and handed
# out first, so that no two of them share the machine's memory and the longest unit does not end the run.
HEAVY_MODULES = ("tests/test_memory.py", "tests/test_scale_scripts.py")
HEAVY = "heavy modules"
# The modules of 40 s or more on a fresh clone, longest first, handed out next: xdist's own order (most
# tests first) leaves files of one long test to the end, where one worker runs them while the other
# has nothing left. The rest follow in xdist's order.
LONG_MODULES = (
    "tests/recipes/test_supervised_preference.py", "tests/test_train_cli.py", "tests/test_plan.py",
    "tests/serve/test_critic_server.py", "tests/serve/test_served_engine.py", "tests/parallel/test_multihost.py",
    "tests/recipes/test_supervised_rm.py",
    "tests/recipes/test_supervised_steerlm2.py", "tests/models/test_llama.py", "tests/test_plan_matches_run.py",
    "tests/parallel/test_sharded_step.py", "tests/models/test_gguf.py", "tests/test_gpu_scale_bench.py",
    "tests/kernels/test_kernels.py", "tests/test_trainer.py", "tests/recipes/test_distill.py",
    "tests/recipes/test_ppo.py", "tests/recipes/test_reward.py", "tests/losses/test_pair_rows.py",
    "tests/recipes/test_spin.py", "tests/losses/test_steerlm2.py", "tests/recipes/test_reinforce.py",
    "tests/test_notebook.py", "tests/rollout/test_generate.py", "tests/models/test_lora.py")
ORDER = {module: rank for rank, module in enumerate((HEAVY,) + LONG_MODULES)}


def pytest_xdist_make_scheduler(config, log):
  if config.getvalue("dist") != "loadfile":
    return None
  from xdist.scheduler import LoadFileScheduling

  class LongestFirst(LoadFileScheduling):
    def _split_scope(self, nodeid):
      module = super()._split_scope(nodeid)
      return HEAVY if module in HEAVY_MODULES else module

    def _assign_work_unit(self, node):
      first = sorted(self.workqueue, key=lambda scope: ORDER.get(scope, len(ORDER)))  # stable: the rest keep theirs
      for scope in reversed(first):
        self.workqueue.move_to_end(scope, last=False)
      super()._assign_work_unit(node)

  return LongestFirst(config, log)


def load(name, run_dir, **overrides):
  """A shipped config with test-sized batches (8 CPU devices here) and dotted-key ``overrides``."""
  from jalign.config import load_config_file
  # One batch width (no data.pad_to_multiple_of trimming): a program compiled per width costs seconds, the
  # tiny model's padding milliseconds. Micro-batches are per data-parallel rank: the tests see 8 CPU devices.
  base = {"run_dir": str(run_dir), "train.global_batch_size": 16, "train.log_every": 1000,
          "train.micro_batch_size": 1, "data.pad_to_multiple_of": 0}
  return load_config_file(ROOT / "configs" / f"{name}.py", {**base, **overrides})


def quiet(*_):
  """A log that prints nothing."""


def launch_job(module, args, processes, devices_each, *, only=None, **popen):
  """``python -m <module> <args>`` as a jax.distributed job of ``processes`` local processes (one process:
  no coordinator) of ``devices_each`` CPU devices; the ``Popen`` of each, process 0 first. ``only``:
  ``{process id: [args]}`` added to that process's alone."""
  import portpicker
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FEW_STEPS_XLA_FLAGS)
  job = [f"--config.distributed.coordinator_address=127.0.0.1:{portpicker.pick_unused_port()}",
         f"--config.distributed.num_processes={processes}"]
  only = only or {}
  return [subprocess.Popen([sys.executable, "-m", module, *args, *only.get(i, []),
                            f"--config.distributed.local_device_count={devices_each}"]
                           + (job + [f"--config.distributed.process_id={i}"] if processes > 1 else []),
                           cwd=ROOT, env=env, **popen)
          for i in range(processes)]


def run_job(module, args, processes, devices_each):
  """``launch_job`` waited for: each process's ``(stdout, stderr)``, every one checked to exit 0."""
  procs = launch_job(module, args, processes, devices_each, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


@pytest.fixture(scope="session")
def smollm2_file():
  from jalign.models.pretrained import smollm2_path
  return smollm2_path()


def _shared_run(tmp_path_factory, worker_id, name, config, overrides):
  """A training run made once per test session: under pytest-xdist the workers share it (made by the
  first that needs it, under a file lock), so that each does not train its own copy."""
  from filelock import FileLock

  from jalign.train import run
  base = tmp_path_factory.getbasetemp()
  root = base.parent if worker_id != "master" else base  # the session's folder, above the workers'
  folder = root / "shared_runs" / name
  folder.parent.mkdir(parents=True, exist_ok=True)
  with FileLock(str(folder) + ".lock"):
    if not (folder / "done").exists():
      optimized = not jax.config.read("jax_disable_most_optimizations")
      _optimize(True)  # it trains for many steps, whichever test needs it first
      try:
        run(load(config, folder, **overrides), log=quiet)
      finally:
        _optimize(optimized)
      (folder / "done").touch()
  return folder


@pytest.fixture(scope="session")
def reward_run(tmp_path_factory, worker_id):
  """A tiny reward model run (two steps: any fixed scorer will do), for the algorithms that need one."""
  return _shared_run(tmp_path_factory, worker_id, "rm", "rm_tiny",
                     {"train.max_steps": 2, "train.val_check_interval": 0, "train.save_interval": 0})


@pytest.fixture(scope="session")
def facts_reward_run(tmp_path_factory, worker_id):
  """A tiny reward model trained until it prefers the right facts of the bundled pairs (250 steps,
  validated at the last): a reward model that scores content, for the policy tests that need one."""
  return _shared_run(tmp_path_factory, worker_id, "rm_facts", "rm_tiny",
                     {"train.max_steps": 250, "train.val_check_interval": 250, "train.save_interval": 0})


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, worker_id):
  """A briefly fine-tuned tiny policy: it ends most replies with the chat format's turn start."""
  return _shared_run(tmp_path_factory, worker_id, "sft", "sft_tiny",
                     {"train.max_steps": 120, "train.val_check_interval": 0, "train.save_interval": 0})


@pytest.fixture(scope="module", autouse=True)
def _collect_garbage_after_each_module():
  """Models and their compiled steps hang in reference cycles: freed after each module, not whenever."""
  yield
  import gc
  gc.collect()


def direct_logprobs(model, examples):
  """Each example's summed log-prob of its loss-masked targets, from the model's full logits (a float64
  log-softmax): the independent reference of the packed and shared rows. All examples go through one
  jitted call, right-padded to one width (a causal model's positions before the padding do not see it)."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  width = max(len(ex.tokens) for ex in examples)
  tokens = np.zeros((len(examples), width), np.int32)
  for i, ex in enumerate(examples):
    tokens[i, :len(ex.tokens)] = ex.tokens
  logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return np.array([np.sum(logp[i, np.arange(len(ex.tokens) - 1), ex.tokens[1:]] * ex.loss_mask[1:])
                   for i, ex in enumerate(examples)])
