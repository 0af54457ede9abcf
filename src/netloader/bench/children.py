"""What runs in each of `netloader bench`'s child processes: the servers and senders, and the
receivers it times.

A receiver runs in a fresh process that allocates fresh destination memory, as a new vLLM
instance does, and puts (seconds from its first action to the last byte in place, peak MiB
above what it used before receiving, bytes moved) on its queue.
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch

PAYLOAD_SEED = 1234


class Memory:
    """Peak resident memory of this process above its level when created (Linux /proc).

    Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark, so imports and
    earlier spikes do not count.
    """

    def __init__(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")
        self.base = status_kib("VmRSS")

    def peak_mib(self) -> float:
        return (status_kib("VmHWM") - self.base) / 1024


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def payload(size: int) -> dict[str, torch.Tensor]:
    from netloader.synthetic import llm_like

    return llm_like(size, seed=PAYLOAD_SEED)


def serve_netloader(queue: Any, path: str, digests: bool) -> None:
    from safetensors.torch import load_file

    from netloader import Identity, Server
    from netloader.snapshot import Snapshot

    tensors = {n: t.clone() for n, t in load_file(path).items()}  # private memory, like a model
    server = Server(Snapshot(tensors, with_digests=digests), Identity("bench")).start()
    queue.put(server.address)
    threading.Event().wait()


def recv_netloader(queue: Any, address: str, streams: int) -> None:
    from netloader import Identity, pull

    memory = Memory()
    start = time.perf_counter()
    result = pull(address, Identity("bench"), streams=streams)
    seconds = time.perf_counter() - start
    queue.put((seconds, memory.peak_mib(), result.total_bytes))


def serve_raw(queue: Any, nbytes: int, streams: int) -> None:
    from netloader.tensors import host_view

    buf = torch.ones(nbytes, dtype=torch.uint8)
    view = host_view(buf)
    listener = socket.create_server(("127.0.0.1", 0))
    queue.put(f"127.0.0.1:{listener.getsockname()[1]}")
    while True:
        conns = [listener.accept()[0] for _ in range(streams)]
        parts = split(nbytes, streams)

        def send(conn: socket.socket, lo: int, hi: int) -> None:
            with conn:
                conn.sendall(view[lo:hi])

        threads = [
            threading.Thread(target=send, args=(c, *p)) for c, p in zip(conns, parts, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def recv_raw(queue: Any, address: str, nbytes: int, streams: int) -> None:
    from netloader.sockets import split_address
    from netloader.tensors import host_view

    host, port = split_address(address)
    memory = Memory()
    start = time.perf_counter()
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = host_view(buf)
    conns = [socket.create_connection((host, port)) for _ in range(streams)]

    def recv(conn: socket.socket, lo: int, hi: int) -> None:
        part = view[lo:hi]
        while len(part):
            n = conn.recv_into(part)
            if not n:
                raise ConnectionError("raw sender closed early")
            part = part[n:]
        conn.close()

    threads = [
        threading.Thread(target=recv, args=(c, *p))
        for c, p in zip(conns, split(nbytes, streams), strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put((time.perf_counter() - start, memory.peak_mib(), nbytes))


def split(nbytes: int, parts: int) -> list[tuple[int, int]]:
    step = -(-nbytes // parts)
    return [(i * step, min(nbytes, (i + 1) * step)) for i in range(parts)]


def gloo_group(port: int, rank: int) -> Any:
    import torch.distributed as dist

    from netloader.transport.process_group import gloo_pair

    store = dist.TCPStore(
        "127.0.0.1", port, 2, is_master=rank == 0, timeout=datetime.timedelta(seconds=120)
    )
    return gloo_pair(store, rank, "127.0.0.1", 120.0)


def send_gloo(queue: Any, path: str, port: int) -> None:
    from safetensors.torch import load_file

    loaded = load_file(path)
    tensors = [loaded[n].clone().reshape(-1).view(torch.uint8) for n in sorted(loaded)]
    group = gloo_group(port, 0)
    queue.put("ready")
    for t in tensors:
        group.send([t], 1, 0).wait()
    group.barrier().wait()


def recv_gloo(queue: Any, path: str, port: int) -> None:
    from safetensors import safe_open

    from netloader.checkpoint import torch_dtype

    with safe_open(path, framework="pt") as f:
        names = sorted(f.keys())
        shapes = [(f.get_slice(n).get_shape(), f.get_slice(n).get_dtype()) for n in names]
    group = gloo_group(port, 1)
    memory = Memory()
    start = time.perf_counter()
    received = []  # kept, like a model's parameters: fresh memory for every tensor
    for shape, dtype in shapes:
        t = torch.empty(shape, dtype=torch_dtype(dtype)).reshape(-1).view(torch.uint8)
        group.recv([t], 0, 0).wait()
        received.append(t)
    seconds = time.perf_counter() - start
    total = sum(t.numel() for t in received)
    group.barrier().wait()
    queue.put((seconds, memory.peak_mib(), total))


def load_safetensors(queue: Any, path: str) -> None:
    """vLLM's default path: read each tensor from the file, copy it into the model's memory."""
    from safetensors import safe_open

    memory = Memory()
    start = time.perf_counter()
    total = 0
    loaded = []
    with safe_open(path, framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
            src = f.get_tensor(name)
            dst = torch.empty_like(src)
            dst.copy_(src)
            loaded.append(dst)
            total += dst.nbytes
    queue.put((time.perf_counter() - start, memory.peak_mib(), total))
