#!/usr/bin/env bash
# Fault-tolerant single-node run: when a worker dies, torchrun restarts the whole group (up to
# MAX_RESTARTS times) and distrain resumes from the newest committed checkpoint.
#   MAX_RESTARTS=3 NPROC=4 launch/elastic.sh --config configs/digits_mlp.yaml checkpoint.every_steps=50
set -euo pipefail
nproc=${NPROC:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
[ "$nproc" -gt 0 ] || nproc=2
exec torchrun --standalone --nproc_per_node="$nproc" --max-restarts="${MAX_RESTARTS:-3}" -m distrain.train "$@"
