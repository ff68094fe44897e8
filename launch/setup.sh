#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtualenv in .venv with distrain installed.
#   launch/setup.sh          the package and its runtime dependencies (torch, torchvision, pyyaml)
#   launch/setup.sh --test   plus the test tools, DeepSpeed, TensorBoard, and SLURM from apt
# Re-running it does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[dev]"

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed${extras}"
if ! cmp -s pyproject.toml "$stamp" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras}"
    cp pyproject.toml "$stamp"
fi

if [ -n "$extras" ] && ! command -v slurmctld >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
fi
