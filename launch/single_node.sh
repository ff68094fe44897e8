#!/usr/bin/env bash
# One process per visible GPU on this node (nccl), or NPROC of them.
#   launch/single_node.sh --config configs/cifar10_resnet18.yaml strategy.name=fsdp
set -euo pipefail
nproc=${NPROC:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
[ "$nproc" -gt 0 ] || { echo "single_node.sh: no GPU visible; set NPROC or use launch/local_cpu.sh" >&2; exit 2; }
exec torchrun --standalone --nproc_per_node="$nproc" -m distrain.train "$@"
