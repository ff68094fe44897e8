#!/usr/bin/env bash
# Run the same command on every node; torchrun's c10d rendezvous on HEAD:PORT forms one job.
#   NNODES=2 HEAD=node01:29500 launch/multi_node.sh --config configs/gpt_tiny_fsdp.yaml
# NPROC: processes per node (default: the node's GPUs). RUN_ID: any string shared by the nodes.
set -euo pipefail
: "${NNODES:?set NNODES}" "${HEAD:?set HEAD=host:port of the first node}"
nproc=${NPROC:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
exec torchrun --nnodes="$NNODES" --nproc_per_node="$nproc" --rdzv_backend=c10d --rdzv_endpoint="$HEAD" \
    --rdzv_id="${RUN_ID:-distrain}" -m distrain.train "$@"
