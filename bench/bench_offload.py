"""Offload/reload benchmark (`align.offload.Offloader`) against a plain copy measured in the same run.

For each model size: a real tiny-family Qwen2 after one AdamW step with gradients resident (weights +
grads + exp_avg + exp_avg_sq: 16 bytes per parameter), round-tripped `--repeats` times; the median
offload and reload time, bytes and effective GB/s. The peer is one `copy_` of a single contiguous
tensor of the same byte count in the same direction between preallocated tensors (pinned host memory
on CUDA: the PCIe bandwidth), i.e. the ceiling the offloader's allocate-then-copy per tensor is
compared with. Also reports device memory freed by the offload (CUDA allocator; RSS on CPU).

    python bench/bench_offload.py --sizes tiny small [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peer_seconds(nbytes: int, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median (device->host, host->device) time of one plain copy_ of `nbytes` bytes between
    preallocated tensors: pure copy bandwidth, no allocation and no per-tensor overhead."""
    pin = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    back = torch.empty_like(src).fill_(0)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).fill_(0)
    down, up = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        host.copy_(src, non_blocking=pin)
        _sync()
        down.append(time.perf_counter() - t)
        t = time.perf_counter()
        back.copy_(host, non_blocking=pin)
        _sync()
        up.append(time.perf_counter() - t)
    return statistics.median(down), statistics.median(up)


def trained_model(size: str, root: Path, device: torch.device):
    """A model with parameters, gradients and AdamW state all resident on `device`."""
    from transformers import AutoModelForCausalLM

    from align.models.tiny import build_tiny

    path = build_tiny(root / size, size=size, corpus_texts=2000)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # AdamW state exists from here on
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()  # and gradients are resident
    return model, opt


def bench(size: str, root: Path, device: torch.device, repeats: int) -> dict:
    from align.offload import Offloader

    model, opt = trained_model(size, root, device)
    off = Offloader(model, opt, device=device)
    for _ in range(repeats + 1):  # the first round trip warms the allocators and is dropped
        with off.offloaded():
            pass
    rounds = off.timeline[2:]
    offs = [e for e in rounds if e.phase == "offload"]
    reloads = [e for e in rounds if e.phase == "reload"]
    nbytes = offs[0].bytes_moved
    peer_down, peer_up = peer_seconds(nbytes, device, repeats)
    return {"size": size, "params": sum(p.numel() for p in model.parameters()), "bytes": nbytes,
            "offload_s": statistics.median(e.seconds for e in offs),
            "reload_s": statistics.median(e.seconds for e in reloads),
            "freed": statistics.median(e.device_mem_before - e.device_mem_after for e in offs),
            "peer_down_s": peer_down, "peer_up_s": peer_up}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads: on a shared machine each of the many small copies pays an "
                         "OpenMP barrier, which swamps the copy itself when the cores are oversubscribed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"threads: {torch.get_num_threads()}, repeats: {args.repeats} (median)")
    mem = "device mem freed" if device.type == "cuda" else "RSS freed"
    print(f"| size | params | bytes moved | offload | GB/s | peer copy GB/s | ratio | reload | GB/s "
          f"| peer copy GB/s | ratio | {mem} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            r = bench(size, Path(tmp), device, args.repeats)
            gbs = {k: r["bytes"] / r[k] / 1e9 for k in ("offload_s", "reload_s", "peer_down_s", "peer_up_s")}
            print(f"| {size} | {r['params'] / 1e6:.2f}M | {r['bytes'] / 2**20:.1f} MiB "
                  f"| {r['offload_s'] * 1e3:.2f} ms | {gbs['offload_s']:.2f} | {gbs['peer_down_s']:.2f} "
                  f"| {gbs['offload_s'] / gbs['peer_down_s']:.2f}x "
                  f"| {r['reload_s'] * 1e3:.2f} ms | {gbs['reload_s']:.2f} | {gbs['peer_up_s']:.2f} "
                  f"| {gbs['reload_s'] / gbs['peer_up_s']:.2f}x | {r['freed'] / 2**20:.1f} MiB |", flush=True)


if __name__ == "__main__":
    main()
