# Shared by the sbatch scripts: `launch <module> [args...]` runs `python -m <module> args` as one job.
#
# Under Slurm (sbatch): one process per node through srun; JAX finds its peers from Slurm's environment
# and drives every GPU of its node. Locally (JALIGN_LOCAL=<processes>, for trying a config and for the
# tests): that many processes on this machine with fake CPU devices, JALIGN_LOCAL_DEVICES in all
# (default 8), joined with jax.distributed over 127.0.0.1.
#
# PYTHON picks the interpreter (default: .venv/bin/python, else python3).

PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

local_mode() { [ -n "${JALIGN_LOCAL:-}" ]; }

# XLA:CPU compiles with its older fusion emitters ~40% faster, and the programs run as fast. Its
# concurrency-maximising scheduler can deadlock a program's collectives among a process's fake devices.
LOCAL_XLA_FLAGS="--xla_cpu_use_fusion_emitters=false --xla_cpu_enable_concurrency_optimized_scheduler=false"

# The host other jobs reach this job's first process at.
first_host() {
  if local_mode; then echo 127.0.0.1; else scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1; fi
}

launch() {
  local module="$1"; shift
  if ! local_mode; then
    srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON" -m "$module" "$@"
    return
  fi
  local n="$JALIGN_LOCAL" devices="${JALIGN_LOCAL_DEVICES:-8}"
  if [ $((devices % n)) -ne 0 ]; then
    echo "JALIGN_LOCAL_DEVICES=$devices does not split over JALIGN_LOCAL=$n processes" >&2
    return 2
  fi
  local each=$((devices / n))
  # Fake CPU devices keep their buffers in the process's heap, where glibc holds on to freed ones (a
  # PPO job on SmolLM2-135M peaked at 13.6 GB instead of 7.0); buffers of 1 MiB and more are mapped
  # and go back to the system when freed.
  export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-1048576}"
  if [ "$n" -eq 1 ]; then
    JAX_PLATFORMS=cpu XLA_FLAGS="$LOCAL_XLA_FLAGS" "$PYTHON" -m "$module" "$@" "--config.distributed.local_device_count=$each"
    return
  fi
  local port pids=() status=0 i
  port=$("$PYTHON" -c "import portpicker; print(portpicker.pick_unused_port())")
  for ((i = 0; i < n; i++)); do
    JAX_PLATFORMS=cpu XLA_FLAGS="$LOCAL_XLA_FLAGS" "$PYTHON" -m "$module" "$@" \
      "--config.distributed.coordinator_address=127.0.0.1:$port" "--config.distributed.num_processes=$n" \
      "--config.distributed.process_id=$i" "--config.distributed.local_device_count=$each" &
    pids+=($!)
  done
  trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
  for i in "${pids[@]}"; do wait "$i" || status=$?; done
  return "$status"
}
