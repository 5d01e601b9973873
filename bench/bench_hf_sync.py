"""Weight sync to align's HF rollout workers (`align rollout serve --engine hf`), alone: how long
the trainer's `update_weights` takes to reach two workers on loopback, and each worker's peak
memory, for one model size.

    python bench/bench_hf_sync.py --size medium --rounds 5 [--checkout /path/to/align-checkout]

`--checkout` runs both the workers and the trainer-side client from another align checkout (e.g.
one from before the gloo path, whose workers take the weights as one HTTP body), so the two paths
are measured by the same script on the same model (`build_tiny(size, seed=0)`, float32). Each
round perturbs the weights first, so every sync moves new values. What is timed is the whole
`update_weights` call as the GRPO trainer makes it (on the gloo path: the transfer plus the sync
check's probe, which is also timed alone). Prints one Markdown row and the raw figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers.workers import free_port, wait_healthy  # noqa: E402  (the tests' worker helpers)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="nano", help="align.models.tiny size: nano, tiny, small, medium")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="align checkout to run workers and client from")
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    sys.path.insert(0, str(checkout))  # before the first align import: the client is the checkout's
    import torch

    from align.models.load import load_causal_lm
    from align.models.tiny import build_tiny
    from align.weights import policy_weights
    from rollout.config import RolloutConfig
    from rollout.factory import build_engine

    model_dir = Path(build_tiny(tempfile.mkdtemp(prefix=f"bench_hf_sync_{args.size}_"), size=args.size, seed=0))
    model = load_causal_lm(model_dir)
    params = sum(p.numel() for p in model.parameters())
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    workers = []
    for _ in range(args.workers):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "align", "rollout", "serve", "--model", str(model_dir),
                                 "--port", str(port), "--engine", "hf"], env=env, cwd=checkout,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        workers.append((proc, f"http://127.0.0.1:{port}"))
    try:
        for proc, url in workers:
            wait_healthy(proc, url)
        loaded_mb = max(peak_rss_mb(p.pid) for p, _ in workers)
        engine = build_engine(RolloutConfig(mode="server", servers=[u for _, u in workers]), model_dir)
        times, checks = [], []
        for _ in range(args.rounds):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p), alpha=1e-3)
            pairs = policy_weights(model)
            start = time.perf_counter()
            engine.update_weights(pairs)
            times.append(time.perf_counter() - start)
            if hasattr(engine, "check_sync"):
                start = time.perf_counter()
                engine.check_sync(pairs)
                checks.append(time.perf_counter() - start)
        synced_mb = max(peak_rss_mb(p.pid) for p, _ in workers)
        versions = [httpx.get(u + "/health").json()["weight_version"] for _, u in workers]
    finally:
        for proc, _ in workers:
            proc.kill()
            proc.wait()
    if versions != [args.rounds] * args.workers:
        raise RuntimeError(f"workers report versions {versions}, expected {args.rounds} each")
    mb = params * 4 / 2**20
    result = {"size": args.size, "params": params, "weights_mb": mb, "checkout": str(checkout),
              "sync_s": times, "sync_median_s": statistics.median(times), "check_s": checks,
              "worker_peak_mb_loaded": loaded_mb, "worker_peak_mb_after_syncs": synced_mb}
    check = f"{statistics.median(checks):.3f}" if checks else "(none)"
    print(f"| {args.size} ({params / 1e6:.1f}M params, {mb:.0f} MiB) | {checkout.name} | "
          f"{statistics.median(times):.3f} | {check} | {loaded_mb:.0f} → {synced_mb:.0f} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
