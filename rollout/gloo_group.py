"""Weights over a torch.distributed gloo group: the data plane of align's CPU weight transfer.

Torch only (no vLLM), so vLLM's workers (`rollout.transfer_gloo`) and align's own HF worker can
share it. The group is standalone (a TCPStore on the trainer plus `ProcessGroupGloo`), never the
default process group, so it coexists with a trainer's DDP/FSDP group and one group per rollout
server can fail alone.

Tensors travel one group at a time (vLLM's `layerwise_groups`: one decoder layer, or the
embeddings, or the final norm and head): each group is packed into one uint8 buffer and
broadcast from rank 0, so memory on either side is bounded by one layer, not the model. Only the
metadata (names, dtypes, shapes, group sizes) travels over HTTP.

Trainer side: `host_group` opens the group while the server joins it (its join is an HTTP
request that returns once it has), `layer_groups` cuts the weights into groups, `send_while`
broadcasts them while the server's receiving request runs.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch.distributed import BroadcastOptions, PrefixStore, TCPStore
from torch.distributed.distributed_c10d import ProcessGroupGloo

PREFIX = "align-weights"


@dataclass
class GroupLayout:
    """What the receiver needs to rebuild the tensors: per tensor a name, a dtype name
    (`float32`, `bfloat16`, ...) and a shape; `group_sizes[g]` tensors make up group g."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    group_sizes: list[int]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes) == sum(self.group_sizes):
            raise ValueError(f"GroupLayout: {len(self.names)} names, {len(self.dtype_names)} dtypes, "
                             f"{len(self.shapes)} shapes and groups of {sum(self.group_sizes)} tensors "
                             "must all agree")

    @classmethod
    def of(cls, groups: list[list[tuple[str, torch.Tensor]]]) -> GroupLayout:
        pairs = [p for g in groups for p in g]
        return cls([n for n, _ in pairs], [str(t.dtype).removeprefix("torch.") for _, t in pairs],
                   [list(t.shape) for _, t in pairs], [len(g) for g in groups])

    def groups(self) -> Iterator[list[tuple[str, torch.dtype, list[int]]]]:
        start = 0
        for size in self.group_sizes:
            yield [(self.names[i], getattr(torch, self.dtype_names[i]), self.shapes[i])
                   for i in range(start, start + size)]
            start += size


def layer_groups(names: list[str]) -> list[list[str]]:
    """vLLM's `layerwise_groups` partition, torch only: one group per decoder layer (keyed on the
    outermost integer segment, so a MoE layer's experts stay with their layer), the names before
    the first layer (embeddings) in front and every other un-indexed name (final norm, head) last."""
    pre: list[str] = []
    post: list[str] = []
    stacks: dict[tuple[str, int], list[str]] = {}
    for name in names:
        parts = name.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is None:
            (post if stacks else pre).append(name)
        else:
            stacks.setdefault((".".join(parts[:index]), int(parts[index])), []).append(name)
    prefixes = list(dict.fromkeys(prefix for prefix, _ in stacks))
    order = sorted(stacks, key=lambda key: (prefixes.index(key[0]), key[1]))
    return [g for g in [pre, *(stacks[k] for k in order), post] if g]


def grouped(pairs: list[tuple[str, torch.Tensor]]) -> list[list[tuple[str, torch.Tensor]]]:
    """(name, tensor) pairs cut by `layer_groups`, in its order."""
    by_name = dict(pairs)
    return [[(n, by_name[n]) for n in names] for names in layer_groups(list(by_name))]


def listen_socket(host: str) -> socket.socket:
    """A bound, listening socket on a free port of `host`, handed to the TCPStore so no other
    process can take the port between choosing and binding it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen()
    return sock


def open_group(address: str, port: int, rank: int, world_size: int, timeout_s: float,
               sock: socket.socket | None = None) -> ProcessGroupGloo:
    """Join (rank > 0) or host (rank 0, which owns `sock`) a gloo group; blocks until all ranks
    arrived or `timeout_s` passed. The same timeout bounds every later broadcast, so a peer that
    died mid-transfer is an error, not a hang."""
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        if sock is None:
            raise ValueError("open_group: rank 0 hosts the store and needs its listening socket")
        store = TCPStore(address, port, world_size, is_master=True, timeout=timeout,
                         master_listen_fd=sock.detach(), wait_for_workers=False)
    else:
        store = TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    return ProcessGroupGloo(PrefixStore(PREFIX, store), rank, world_size, timeout)


def host_group(address: str, world_size: int, timeout_s: float,
               join: Callable[[dict], object]) -> ProcessGroupGloo:
    """Rank 0's side of a new group: a store on a free port of `address`, and `join(info)` asking
    the other ranks to come (`info`: master_address, master_port, world_size, timeout_s). The
    server answers `join` only once it has joined, so the group is hosted on a side thread
    meanwhile; a refused `join` is raised at once (the rendezvous then times out on its own)."""
    sock = listen_socket(address)
    info = {"master_address": address, "master_port": sock.getsockname()[1], "world_size": world_size,
            "timeout_s": timeout_s}
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        group = pool.submit(open_group, address, info["master_port"], 0, world_size, timeout_s, sock)
        join(info)
        return group.result()
    finally:
        pool.shutdown(wait=False)


def send_while(group: ProcessGroupGloo, groups: Iterable[list[torch.Tensor]], receive: Callable[[], object]) -> int:
    """`send_groups` while `receive()` (the request that makes the server receive them) runs on a
    side thread; returns the bytes sent. A failed broadcast is raised without waiting for the
    request, which may never return; the group is unusable afterwards."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        request = pool.submit(receive)
        sent = send_groups(group, groups)
        request.result()
        return sent
    finally:
        pool.shutdown(wait=False)


def _broadcast(group: ProcessGroupGloo, buffer: torch.Tensor) -> None:
    opts = BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([buffer], opts).wait()


ALIGN = 16  # bytes: every tensor starts at a multiple, so the receiver can view any dtype in place


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    sizes = [t.numel() * t.element_size() for t in tensors]
    buffer = torch.zeros(sum(_padded(s) for s in sizes), dtype=torch.uint8)
    offset = 0
    for tensor, size in zip(tensors, sizes):
        buffer[offset:offset + size] = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
        offset += _padded(size)
    return buffer


def send_groups(group: ProcessGroupGloo, groups: Iterable[list[torch.Tensor]]) -> int:
    """Broadcast each group as one packed buffer (rank 0); returns the bytes sent."""
    sent = 0
    for tensors in groups:
        buffer = _pack(tensors)
        _broadcast(group, buffer)
        sent += buffer.numel()
    return sent


def receive_groups(group: ProcessGroupGloo, layout: GroupLayout) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The receiving side of `send_groups`: one list of (name, tensor) per group, in order. Each
    group's tensors are views of that group's buffer; drop them before the next group is wanted
    to keep memory at one group."""
    for specs in layout.groups():
        sizes = [torch.Size(shape).numel() * dtype.itemsize for _, dtype, shape in specs]
        buffer = torch.empty(sum(_padded(s) for s in sizes), dtype=torch.uint8)
        _broadcast(group, buffer)
        out, offset = [], 0
        for (name, dtype, shape), size in zip(specs, sizes):
            out.append((name, buffer[offset:offset + size].view(dtype).view(shape)))
            offset += _padded(size)
        yield out
