"""``python -m jalign.plan --config=configs/<name>.py``: compile a config's train step ahead of time.

Nothing is allocated: the model, optimizer state and batch are abstract arrays with the shardings
the config's mesh and rules give them. The step is lowered and compiled for a mesh of that many
devices (on a CPU machine, that many host devices), then the planner prints per-device bytes of
parameters and optimizer state (exact arithmetic over shapes and shardings), the compiler's
arguments/outputs/temporaries, FLOPs per step (6 per parameter per token plus attention, and the
recomputed forward pass under remat) and the step time at a given peak.

The compiler here is the CPU one: temporaries are its estimate, a guide to what the GPU compiler
will need rather than its exact figure.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from jalign import config as config_lib
from jalign import optim, trainer
from jalign.algos import sft
from jalign.models import LlamaConfig, Transformer
from jalign.parallel import mesh as pmesh

GiB = 1024**3


@dataclasses.dataclass
class Plan:
  mesh: dict
  params_bytes: int          # per device
  optimizer_bytes: int       # per device
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  flops: float               # per device per step
  step_time_s: float

  @property
  def total_bytes(self) -> int:
    # Arguments (state + batch) are donated into the outputs, so they count once.
    return max(self.argument_bytes, self.output_bytes) + self.temp_bytes


def per_device_bytes(tree, shardings) -> int:
  """Exact bytes one device holds of a sharded pytree (the largest shard, as XLA pads none here)."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shard = s.shard_shape(x.shape)
    total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
  return total


def model_config(c) -> LlamaConfig:
  m = c.model
  if m.init == "random":
    return LlamaConfig.preset(m.preset, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                              **config_lib.pipeline_fields(c))
  kwargs = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, **config_lib.pipeline_fields(c))
  if m.init.startswith("hf:"):
    from jalign.models import hf
    return hf.config_from_hf(hf.read_config_file(Path(m.init[3:])), Path(m.init[3:]) / "config.json", **kwargs)
  from jalign.models import gguf
  from jalign.models.pretrained import smollm2_path
  path = smollm2_path() if m.init == "smollm2" else Path(m.init[5:])
  return gguf.config_from_gguf(gguf.open_reader(path)[0], path, **kwargs)


def plan(c, *, peak_flops: float) -> Plan:
  """Compile the train step of config ``c`` for its mesh over the visible devices."""
  config_lib.validate(c, device_count=jax.device_count(), check_files=False)
  mesh = pmesh.make_mesh(dict(c.mesh))
  rules = tuple(tuple(r) for r in c.sharding_rules)
  cfg = model_config(c)
  o, t, d = c.optimizer, c.train, c.data
  schedule = optim.nemo_schedule(o.lr, max_steps=t.max_steps, warmup_steps=o.warmup_steps,
                                 constant_steps=o.constant_steps, min_lr=o.min_lr)
  tx = optim.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  with pmesh.use(mesh, rules):
    abstract_model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    state = jax.eval_shape(lambda s: trainer.init_state(nnx.merge(graphdef, s), tx)[1], abstract_state)
    shardings = pmesh.tree_shardings(state, mesh, rules)
    rows, length = t.global_batch_size, d.max_seq_length
    batch = {"tokens": jax.ShapeDtypeStruct((rows, length), jnp.int32),
             "targets": jax.ShapeDtypeStruct((rows, length), jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct((rows, length), jnp.float32),
             "positions": jax.ShapeDtypeStruct((rows, length), jnp.int32),
             "segment_ids": jax.ShapeDtypeStruct((rows, length), jnp.int32)}
    batch_sh = pmesh.batch_shardings(batch, mesh, rules)
    micro = t.global_batch_size // (t.micro_batch_size * pmesh.data_parallel_size(mesh, rules))
    step = trainer.make_train_step(graphdef, sft.loss, tx, schedule, micro_batches=micro)
    compiled = jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, None),
                       donate_argnums=0).lower(state, batch).compile()
  memory = compiled.memory_analysis()
  # Analytic FLOPs: XLA's cost analysis counts one iteration of each loop (layers, micro-batches).
  recompute = 4 / 3 if cfg.remat != "none" else 1.0  # a second forward pass in the backward
  flops = trainer.train_flops_per_token(cfg, length) * rows * length * recompute / jax.device_count()
  return Plan(mesh=dict(mesh.shape),
              params_bytes=per_device_bytes(state.params, shardings.params),
              optimizer_bytes=per_device_bytes(state.opt_state, shardings.opt_state),
              argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
              temp_bytes=int(memory.temp_size_in_bytes), flops=flops, step_time_s=flops / peak_flops)


def format_plan(name: str, p: Plan, cfg: LlamaConfig) -> str:
  mesh = " ".join(f"{k}={v}" for k, v in p.mesh.items() if v > 1) or "one device"
  lines = [f"{name}: {cfg.num_params / 1e9:.2f}B parameters on mesh {mesh}",
           f"  per device: parameters {p.params_bytes / GiB:.2f} GiB, optimizer {p.optimizer_bytes / GiB:.2f} GiB, "
           f"temporaries {p.temp_bytes / GiB:.2f} GiB, total {p.total_bytes / GiB:.2f} GiB",
           f"  per device per step: {p.flops / 1e12:.1f} TFLOP, {p.step_time_s:.2f} s at peak"]
  return "\n".join(lines)


def main(argv, config_flag, peak_flag, devices_flag):
  del argv
  c = config_flag.value
  if c is None:
    raise app.UsageError("--config=configs/<name>.py is required")
  needed = devices_flag.value or math.prod(n for n in dict(c.mesh).values() if n > 0)
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", needed)
  try:
    p = plan(c, peak_flops=peak_flag.value * 1e12)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_plan(c.run_dir, p, model_config(c)))


def entry():
  config_flag = config_flags.DEFINE_config_file("config", None, "an ml_collections config file",
                                                lock_config=True)
  peak = flags.DEFINE_float("peak_tflops", 989.0, "per-device peak (dense bf16 H100: 989)")
  devices = flags.DEFINE_integer("devices", 0, "plan for this many devices (default: what the mesh needs)")
  app.run(lambda argv: main(argv, config_flag, peak, devices))


if __name__ == "__main__":
  entry()
