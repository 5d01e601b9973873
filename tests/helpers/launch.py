"""`align train RECIPE` in one process or on several gloo ranks started by torchrun, for the
multi-rank tests (FSDP2 stages, colocated vLLM per rank, rollout servers under FSDP2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def train(recipe: Path, world: int, timeout_s: float = 900, **env: str) -> subprocess.CompletedProcess:
    """Run the recipe on `world` ranks (`torchrun --standalone`: a free port each time) with
    OMP_NUM_THREADS=1 and the repository importable; `env` adds variables."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
              if world > 1 else [sys.executable])
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([*launch, "-m", "align", "train", str(recipe)], cwd=recipe.parent, env=full_env,
                          capture_output=True, text=True, timeout=timeout_s)
