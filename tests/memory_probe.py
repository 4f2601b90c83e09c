"""How much a fresh process's peak resident memory rises while models and optimizer states are built
into their shardings, on 8 fake CPU devices (``tests/test_memory.py`` runs it, one process per check).

python tests/memory_probe.py <mode> <folder> writes <folder>/<mode>.json. Modes:
  random   a random ~2 GB model (preset llama-500m) on fsdp 4 x tensor 2, then its optimizer state;
           each array's per-device bytes beside the planner's; then (set-up for hf) writes the model
           to <folder>/hf as a ~1 GB bfloat16 Hugging Face folder
  hf       that folder read onto the same mesh
  rm-folder  writes a random reward model of the smollm2-135m shape to <folder>/rm as a bfloat16
           Hugging Face reward-model folder (set-up)
  ppo      a PPO job's actor with its optimizer state and reference copy, critic with its optimizer
           state, and reward model (both read from that folder), each built on its mesh
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.xla_flags import CPU_XLA_FLAGS  # noqa: E402

# Each program runs once, but makes up to GBs of random values: LLVM at -O1, not the few-steps -O0 (the
# three probes: 72 s; at -O0, 135 s).
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=8 {CPU_XLA_FLAGS}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from jalign import plan, specs, trainer  # noqa: E402
from jalign.config import load_config_file  # noqa: E402
from jalign.data.tokenizer import Tokenizer  # noqa: E402
from jalign.models import LlamaConfig, Transformer, hf, hf_value  # noqa: E402
from jalign.models.heads import ValueModel  # noqa: E402
from jalign.parallel import mesh as pmesh  # noqa: E402
from jalign.recipes import build, critic, rollouts  # noqa: E402

MESH = {"data": 1, "pipeline": 1, "fsdp": 4, "tensor": 2}


def quiet(*_):
  pass


def _status(key: str) -> int:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(key + ":"):
      return int(line.split()[1]) * 1024
  raise KeyError(key)


def measured(build_fn):
  """``(result, bytes)``: what ``build_fn()`` returns, and how far the peak resident memory rose above
  the resident memory before it."""
  Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
  before = _status("VmRSS")
  out = build_fn()
  jax.block_until_ready(jax.tree.leaves(out))
  return out, _status("VmHWM") - before


def nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def config(name, folder, **overrides):
  return load_config_file(ROOT / "configs" / f"{name}.py", {
      "run_dir": str(folder / "run"), "model.preset": "llama-500m", "model.allow_random": True,
      **{f"mesh.{k}": v for k, v in MESH.items()}, **overrides})


def random_model(folder: Path) -> dict:
  c = config("sft_tiny", folder)
  mesh, rules = pmesh.make_mesh(MESH), build.rules_of(c)
  model, model_peak = measured(lambda: build.build_model(c, mesh, rules)[0])
  _, tx = build.build_optimizer(c)
  (graphdef, state), optimizer_peak = measured(lambda: trainer.init_state(model, tx, mesh=mesh, rules=rules))
  abstract = nnx.eval_shape(lambda: Transformer(build.model_config(c), rngs=nnx.Rngs(0)))
  _, planned = plan.planned_state(abstract, tx, mesh, rules)
  run_leaves = jax.tree_util.tree_leaves_with_path(state.replace(rest=None))
  differ = [jax.tree_util.keystr(path) for (path, x), p in zip(run_leaves, jax.tree.leaves(planned.replace(rest=None)))
            if x.addressable_shards[0].data.nbytes != plan.per_device_bytes([p])]
  hf.save(nnx.merge(graphdef, state.params, state.rest), folder / "hf", dtype="bfloat16")
  return {"params_bytes": nbytes(state.params), "params_peak": model_peak,
          "hf_bytes": sum(f.stat().st_size for f in (folder / "hf").iterdir()),
          "optimizer_bytes": nbytes(state.opt_state), "optimizer_peak": optimizer_peak,
          "arrays": len(run_leaves), "differ_from_planner": differ,
          "planned_params_per_device": plan.per_device_bytes(planned.params),
          "params_per_device": sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state.params))}


def hf_model(folder: Path) -> dict:
  c = config("sft_tiny", folder, **{"model.init": f"hf:{folder / 'hf'}", "model.param_dtype": "bfloat16",
                                    "model.dtype": "bfloat16"})
  model, peak = measured(lambda: build.build_model(c, pmesh.make_mesh(MESH), build.rules_of(c))[0])
  return {"params_bytes": nbytes(nnx.state(model)), "params_peak": peak}


def rm_folder(folder: Path) -> dict:
  model = Transformer(LlamaConfig.preset("smollm2-135m"), rngs=nnx.Rngs(0))
  hf_value.save(ValueModel.from_transformer(model, 1, rngs=nnx.Rngs(1)), folder / "rm", dtype="bfloat16",
                tokenizer=Tokenizer.tiny())  # the PPO config's
  return {}


def ppo(folder: Path) -> dict:
  rm = f"hf:{folder / 'rm'}"
  c = config("ppo_tiny", folder, **{"model.init": "random", "model.preset": "smollm2-135m", "critic.init": rm,
                                    "critic.reward_model": rm, **{f"critic.mesh.{k}": v for k, v in MESH.items()},
                                    "train.global_batch_size": 16, "train.micro_batch_size": 1,
                                    "critic.micro_batch_size": 1})
  options = rollouts.trainer_options(c, False)

  def build_job():
    policy = rollouts.build_policy(c, specs.get("ppo").sampling(c), quiet, with_kl=True)
    return policy, critic.build(c, options, tok=policy.tok)

  (policy, job), peak = measured(build_job)
  parts = {"actor": nbytes(policy.state.params), "actor_optimizer": nbytes(policy.state.opt_state),
           "reference": nbytes(policy.initial.params), "critic": nbytes(job.state.params),
           "critic_optimizer": nbytes(job.state.opt_state), "reward_model": nbytes(nnx.state(job.reward.model))}
  return {"bytes": parts, "total_bytes": sum(parts.values()), "peak": peak}


MODES = {"random": random_model, "hf": hf_model, "rm-folder": rm_folder, "ppo": ppo}

if __name__ == "__main__":
  mode, out = sys.argv[1], Path(sys.argv[2])
  result = MODES[mode](out)
  (out / f"{mode}.json").write_text(json.dumps(result, indent=2, default=str))
