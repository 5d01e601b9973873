"""Data layer at scale: `align data synth` then `align data check` on N chat conversations.

Both run as real CLI subprocesses; each one's wall time and peak RSS come from os.wait4, so the
numbers are the child's own. The peer for `check` is the floor any JSONL validator pays: plain
`json.loads` over the same lines, timed in this process in the same run.

    python bench/bench_data.py                 # 1.5M conversations (a few minutes on 2 cores)
    python bench/bench_data.py --n 100000      # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RSS_LIMIT_MIB = 2048


def run_cli(*args: str) -> tuple[float, float, int]:
    """Run `python -m align ARGS`; return (wall seconds, peak RSS in MiB, exit code)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "align", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, child.returncode  # ru_maxrss is KiB on Linux


def json_loads_rate(path: Path) -> float:
    """Lines per second of bare `json.loads` over the file: the peer `check` is compared with."""
    start = time.perf_counter()
    count = 0
    with open(path, "rb") as f:
        for line in f:
            json.loads(line)
            count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_500_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        synth_s, synth_rss, rc = run_cli("data", "synth", "--kind", "chat", "--n", str(args.n),
                                         "--seed", str(args.seed), "--out", str(path))
        assert rc == 0, f"synth exited {rc}"
        size_mib = path.stat().st_size / 2**20
        check_s, check_rss, rc = run_cli("data", "check", str(path), "--json")
        assert rc == 0, f"check exited {rc}: the synthetic data should be valid"
        peer = json_loads_rate(path)

    synth_rate, check_rate = args.n / synth_s, args.n / check_s
    print(f"conversations: {args.n:,} ({size_mib:,.0f} MiB JSONL)")
    print(f"synth: {synth_s:6.1f} s  {synth_rate:10,.0f} conv/s  peak RSS {synth_rss:6.0f} MiB")
    print(f"check: {check_s:6.1f} s  {check_rate:10,.0f} conv/s  peak RSS {check_rss:6.0f} MiB")
    print(f"peer json.loads: {peer:10,.0f} lines/s  -> check / json.loads = {check_rate / peer:.2f}x")
    over = [name for name, rss in (("synth", synth_rss), ("check", check_rss)) if rss > RSS_LIMIT_MIB]
    if over:
        sys.exit(f"peak RSS over {RSS_LIMIT_MIB} MiB: {', '.join(over)}")


if __name__ == "__main__":
    main()
