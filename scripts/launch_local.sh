#!/usr/bin/env bash
# Start N jalign processes on this machine, joined with jax.distributed over 127.0.0.1.
#   scripts/launch_local.sh N --config=configs/sft_tiny.py [--config.key=value ...]
# Each process gets DEVICES_PER_PROCESS CPU devices (default 2); the mesh spans all of them.
# Process 0 prints the progress; the others' output goes to <run_dir>/process_<i>.log. When a process
# fails, the job ends: process 0 prints the failing process's error line, the others end through the
# coordinator, and this script stops any left.
set -euo pipefail
n="${1:?usage: scripts/launch_local.sh N --config=configs/<name>.py [flags...]}"
shift
devices="${DEVICES_PER_PROCESS:-2}"
python="${PYTHON:-.venv/bin/python}"
# XLA:CPU compiles with its older fusion emitters ~40% faster, and the programs run as fast. Its
# concurrency-maximising scheduler can deadlock a program's collectives among a process's fake devices.
xla_flags="--xla_cpu_use_fusion_emitters=false --xla_cpu_enable_concurrency_optimized_scheduler=false"
port=$("$python" -c "import portpicker; print(portpicker.pick_unused_port())")
# The run folder the config names (a --config.run_dir flag wins), for the followers' logs.
run_dir=$("$python" - "$@" <<'EOF'
import sys
config = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")), None)
run_dir = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config.run_dir=")), None)
if run_dir is None and config is not None:
  from jalign.config import load_config_file
  from jalign.specs.base import ConfigError
  try:
    run_dir = load_config_file(config).run_dir
  except ConfigError:
    pass  # process 0 names the problem
print(run_dir or ".")
EOF
)
mkdir -p "$run_dir"
pids=()
for ((i = 0; i < n; i++)); do
  args=("$@" "--config.distributed.coordinator_address=127.0.0.1:$port" "--config.distributed.num_processes=$n"
        "--config.distributed.process_id=$i" "--config.distributed.local_device_count=$devices")
  if [ "$i" -eq 0 ]; then
    JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" "$python" -m jalign.train "${args[@]}" &
  else
    JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" "$python" -m jalign.train "${args[@]}" >"$run_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for ((left = n; left > 0; left--)); do
  code=0
  wait -n "${pids[@]}" || code=$?
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$code
    kill "${pids[@]}" 2>/dev/null || true  # any process still waiting on the failed one
  fi
done
if [ "$status" -ne 0 ]; then
  echo "the job failed (exit $status); the logs of processes 1..$((n - 1)) are $run_dir/process_<i>.log" >&2
fi
exit "$status"
