"""Starting real `align rollout serve` workers on loopback for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx


def chat_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of one-turn chat prompts, ready for the assistant's reply."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          return_dict=False) for t in texts]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(model_dir, *options: str, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """An `align rollout serve` process on `port` (a free one by default; the same one to restart a
    worker on its URL)."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "align", "rollout", "serve", "--model", str(model_dir),
                             "--port", str(port), *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = proc.stderr.read().decode()[-2000:] if proc.stderr else "(log not piped)"
            raise RuntimeError(f"worker exited: {log}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_s}s")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with `start_new_session=True` and everything in its group: killing
    `vllm serve` alone orphans its EngineCore child, which then holds its memory until reboot."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone already
        pass
    proc.wait()


def stop(workers: list[tuple[subprocess.Popen, str]]) -> None:
    for proc, _ in workers:
        proc.kill()
        proc.wait()


@contextmanager
def running_workers(model_dir, count: int, *options: str, timeout_s: float = 180) -> Iterator[list[str]]:
    """`with running_workers(dir, 2) as urls:` healthy workers (started together), killed on exit."""
    workers = [start_worker(model_dir, *options) for _ in range(count)]
    try:
        for worker in workers:
            wait_healthy(*worker, timeout_s=timeout_s)
        yield [url for _, url in workers]
    finally:
        stop(workers)


@contextmanager
def running_worker(model_dir, *options: str, timeout_s: float = 180) -> Iterator[str]:
    """`with running_worker(dir) as url:` one healthy worker, killed on exit."""
    with running_workers(model_dir, 1, *options, timeout_s=timeout_s) as urls:
        yield urls[0]
