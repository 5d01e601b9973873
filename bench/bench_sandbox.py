"""Sandboxed runs per second vs bare `python -c` subprocesses of the same programs, on all cores.

The peer is the cheapest way to run a snippet at all (a plain subprocess, same interpreter and
`-I` flag as the sandbox, same parallelism), so the ratio is the price of the isolation. Every isolation mode that works for the
invoking user is timed in the same run; run it as root and as an unprivileged user to see both.
Run: python bench/bench_sandbox.py [N programs] [rounds]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from rewards.sandbox import Sandbox, SandboxLimits, available_isolations


def programs(n: int) -> list[str]:
    """Small test-like programs: a function and a few asserts (HumanEval-sized)."""
    return [f"def f(x):\n    return sum(range(x)) + {i}\n\nassert f(10) == {45 + i}\nassert f(0) == {i}\n"
            for i in range(n)]


def bare(source: str) -> bool:
    return subprocess.run([sys.executable, "-I", "-c", source], capture_output=True, timeout=30).returncode == 0


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
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    workers = os.cpu_count() or 1
    sources = programs(n)
    modes = available_isolations()
    print(f"uid {os.geteuid()}, {workers} workers, python {sys.executable}, isolation modes: {', '.join(modes)}")
    runners = {"bare python -c": bare}
    for mode in modes:
        sandbox = Sandbox(SandboxLimits(wall_s=10), workers=workers, isolation=mode)
        runners[f"sandbox ({mode})"] = lambda s, sandbox=sandbox: sandbox.run(s).ok
    timed("warm-up", bare, sources[:4], workers)
    rates: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(rounds):  # interleaved, so a change in machine load hits every runner alike
        for label, run in runners.items():
            rates[label].append(timed(label, run, sources, workers))
    peer = statistics.median(rates["bare python -c"])
    print(f"median of {rounds} rounds:")
    for label, values in rates.items():
        rate = statistics.median(values)
        print(f"  {label:<26} {rate:6.1f} runs/s  {rate / peer:.2f}x bare")


if __name__ == "__main__":
    main()
