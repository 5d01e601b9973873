"""Sandboxed runs per second vs bare `python -c` subprocesses of the same programs, on all cores.

The peer is the cheapest way to run a snippet at all (a plain subprocess, same interpreter, same
parallelism), so the ratio is the price of the isolation. Run: python bench/bench_sandbox.py [N]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from rewards.sandbox import Sandbox, SandboxLimits


def programs(n: int) -> list[str]:
    """Small test-like programs: a function and a few asserts (HumanEval-sized)."""
    return [f"def f(x):\n    return sum(range(x)) + {i}\n\nassert f(10) == {45 + i}\nassert f(0) == {i}\n"
            for i in range(n)]


def bare(source: str) -> bool:
    return subprocess.run([sys.executable, "-c", source], capture_output=True, timeout=30).returncode == 0


def timed(label: str, run, sources: list[str], workers: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        ok = sum(pool.map(run, sources))
    seconds = time.perf_counter() - start
    rate = len(sources) / seconds
    print(f"{label:<28} {len(sources)} programs, {ok} passed, {seconds:6.2f} s, {rate:6.1f} runs/s")
    return rate


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    workers = os.cpu_count() or 1
    sources = programs(n)
    sandbox = Sandbox(SandboxLimits(wall_s=10), workers=workers)
    print(f"{workers} workers, sandbox isolation: {sandbox.isolation}")
    timed("warm-up", bare, sources[:4], workers)
    peer = timed("bare python -c", bare, sources, workers)
    ours = timed(f"sandbox ({sandbox.isolation})", lambda s: sandbox.run(s).ok, sources, workers)
    plain = Sandbox(SandboxLimits(wall_s=10), workers=workers, isolation="rlimits")
    timed("sandbox (rlimits fallback)", lambda s: plain.run(s).ok, sources, workers)
    print(f"sandbox / bare throughput ratio: {ours / peer:.2f}x")


if __name__ == "__main__":
    main()
