#!/usr/bin/env bash
# N gloo processes on this machine's CPU, one thread each (a laptop or a CI box).
#   launch/local_cpu.sh 2 --config configs/digits_mlp.yaml [key=value ...]
set -euo pipefail
nproc=${1:?usage: local_cpu.sh NPROC --config FILE [key=value ...]}; shift
# one thread per process: N processes on N cores beat N processes fighting over threads
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc_per_node="$nproc" -m distrain.train "$@" strategy.backend=gloo train.device=cpu
