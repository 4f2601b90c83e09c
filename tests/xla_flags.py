"""The XLA flags of the test processes and of every process they start (no JAX import: a process
sets them before JAX starts)."""

# XLA:CPU compiles with its older fusion emitters ~40% faster (a tiny train step: 1.3 s instead of 2.2),
# and with LLVM at -O1 a further ~25% (the tiny SFT step: 3.3 s -> 2.6 s), and the programs run as fast:
# compiling is a third of the suite's time on a fresh clone. Its scheduler that maximises concurrency lets
# the devices of one process run independent collectives in different orders, which on two cores can
# deadlock a program until XLA aborts the process (PPO's critic step on a data x tensor mesh: 4 of 13 runs;
# 0 of 10 without it). Every process a test starts is given these too (CPU_XLA_FLAGS in place of the fake
# device count; FEW_STEPS_XLA_FLAGS for the jobs and commands that run a few steps).
_XLA_CPU = "--xla_cpu_use_fusion_emitters=false --xla_cpu_enable_concurrency_optimized_scheduler=false"
CPU_XLA_FLAGS = f"{_XLA_CPU} --xla_backend_optimization_level=1"
# For processes whose programs each run once or a few times (a benchmark's every part at the tiny shape, a
# job of a few steps): LLVM at -O0 compiles 2.5x faster than at -O2, and the code runs 2-3x slower.
FEW_STEPS_XLA_FLAGS = f"{_XLA_CPU} --xla_backend_optimization_level=0"
