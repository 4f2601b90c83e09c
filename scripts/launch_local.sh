#!/usr/bin/env bash
# Start N jalign processes on this machine, joined with jax.distributed over 127.0.0.1.
#   scripts/launch_local.sh N --config=configs/sft_tiny.py [--config.key=value ...]
# Each process gets DEVICES_PER_PROCESS CPU devices (default 2); the mesh spans all of them.
# Process 0 prints the progress; the others' output goes to <run_dir>/process_<i>.log.
set -euo pipefail
n="${1:?usage: scripts/launch_local.sh N --config=configs/<name>.py [flags...]}"
shift
devices="${DEVICES_PER_PROCESS:-2}"
python="${PYTHON:-.venv/bin/python}"
port=$("$python" -c "import portpicker; print(portpicker.pick_unused_port())")
logs=$(mktemp -d "${TMPDIR:-/tmp}/jalign-launch.XXXXXX")
pids=()
for ((i = 0; i < n; i++)); do
  args=("$@" "--config.distributed.coordinator_address=127.0.0.1:$port" "--config.distributed.num_processes=$n"
        "--config.distributed.process_id=$i" "--config.distributed.local_device_count=$devices")
  if [ "$i" -eq 0 ]; then
    JAX_PLATFORMS=cpu XLA_FLAGS= "$python" -m jalign.train "${args[@]}" &
  else
    JAX_PLATFORMS=cpu XLA_FLAGS= "$python" -m jalign.train "${args[@]}" >"$logs/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
[ "$status" -eq 0 ] || echo "a process failed; logs of processes 1..$((n - 1)) are in $logs" >&2
exit "$status"
