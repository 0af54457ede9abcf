"""`netloader bench`: the same bytes moved several ways, side by side, in one run.

Every receiver runs in a fresh process that allocates fresh destination memory, as a new vLLM
instance does, and reports the time from its first action (connect, or open the file) to the
last byte in place, plus its peak memory above what it used before receiving.

Rows:
- netloader: the real client and server code path, two processes over 127.0.0.1;
- netloader, no digests: the same without integrity digests (what verification costs);
- raw sockets: the same byte count over the same number of TCP streams with plain
  ``sendall``/``recv_into`` into one buffer: the practical limit of the link;
- gloo per tensor: ``torch.distributed`` gloo send/recv, one message per tensor;
- safetensors cold / warm: vLLM's default path without a peer, reading the checkpoint with
  ``safe_open`` and copying every tensor into preallocated memory, after dropping the page cache
  (``echo 1 > /proc/sys/vm/drop_caches``) and again with the file cached.

This module runs the rounds; ``children`` holds what each child process does, ``report`` the
rows and how they are shown (table, JSON, bar chart).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netloader.bench.children import (
    load_safetensors,
    payload,
    recv_gloo,
    recv_netloader,
    recv_raw,
    send_gloo,
    serve_netloader,
    serve_raw,
)
from netloader.bench.report import Report, Row, machine_description, plot, write_json
from netloader.sockets import free_port

__all__ = ["Report", "Row", "drop_page_cache", "machine_description", "plot", "run", "write_json"]


class _Child:
    """A spawned helper process (a server or a sender) that reports one value when ready."""

    def __init__(self, ctx: Any, target: Callable[..., None], *args: Any):
        self.queue = ctx.Queue()
        self.process = ctx.Process(target=target, args=(self.queue, *args), daemon=True)
        self.process.start()

    def ready(self) -> Any:
        return self.queue.get(timeout=600)

    def stop(self) -> None:
        self.process.kill()
        self.process.join()


def _measure(ctx: Any, target: Callable[..., None], *args: Any) -> tuple[float, float, int]:
    child = _Child(ctx, target, *args)
    try:
        result = child.queue.get(timeout=600)
    finally:
        child.process.join(60)
    if child.process.exitcode not in (0, None):
        raise RuntimeError(f"benchmark child {target.__name__} failed")
    return result


def drop_page_cache() -> str | None:
    """Drop the page cache; returns None on success, else why it was not possible."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return None
    except OSError as exc:
        return f"cannot drop the page cache: {exc.strerror}"


def run(
    size: int = 1 << 30,
    *,
    streams: int | None = None,
    repeats: int = 5,
    workdir: str | None = None,
    log: Callable[[str], None] = print,
) -> Report:
    """Run every method ``repeats`` times, interleaved (one run of each method per round, so
    that drift on a noisy machine hits all of them alike), and return the report."""
    from safetensors.torch import save_file

    from netloader.options import default_streams

    ctx = mp.get_context("spawn")
    streams = streams or default_streams()
    with tempfile.TemporaryDirectory(dir=workdir, prefix="netloader-bench-") as tmp:
        path = str(Path(tmp) / "model.safetensors")
        log(f"generating a {size / 2**30:.2f} GiB LLM-shaped checkpoint in {path} ...")
        tensors = payload(size)
        nbytes, count = sum(t.nbytes for t in tensors.values()), len(tensors)
        save_file(tensors, path)
        del tensors
        servers = [
            _Child(ctx, serve_netloader, path, True),
            _Child(ctx, serve_raw, nbytes, streams),
            _Child(ctx, serve_netloader, path, False),
        ]
        try:
            addresses = [c.ready() for c in servers]
            methods = _methods(ctx, path, nbytes, streams, addresses)
            rows = _rounds(methods, nbytes, repeats, log)
        finally:
            for child in servers:
                child.stop()
    return Report(machine_description(), nbytes, count, streams, repeats, rows)


Method = Callable[[], tuple[float, float, int]]


def _methods(
    ctx: Any, path: str, nbytes: int, streams: int, addresses: list[str]
) -> dict[str, Method | str]:
    """Each row's measurement, or why it cannot run here."""
    with_digests, raw, without = addresses

    def gloo() -> tuple[float, float, int]:
        port = free_port()
        sender = _Child(ctx, send_gloo, path, port)
        try:
            return _measure(ctx, recv_gloo, path, port)
        finally:
            sender.stop()

    def cold() -> tuple[float, float, int]:
        drop_page_cache()
        return _measure(ctx, load_safetensors, path)

    return {
        "netloader": lambda: _measure(ctx, recv_netloader, with_digests, streams),
        "netloader, no digests": lambda: _measure(ctx, recv_netloader, without, streams),
        f"raw sockets x{streams}": lambda: _measure(ctx, recv_raw, raw, nbytes, streams),
        "gloo per tensor": gloo,
        "safetensors, cold cache": drop_page_cache() or cold,
        "safetensors, warm cache": lambda: _measure(ctx, load_safetensors, path),
    }


def _rounds(
    methods: dict[str, Method | str], nbytes: int, repeats: int, log: Callable[[str], None]
) -> list[Row]:
    rows = {name: Row(name, nbytes=nbytes) for name in methods}
    for name, method in methods.items():
        if isinstance(method, str):
            rows[name].note = method
    for i in range(repeats):
        for name, method in methods.items():
            if isinstance(method, str):
                continue
            seconds, peak, got = method()
            if got != nbytes:
                raise RuntimeError(f"{name}: moved {got} bytes, expected {nbytes}")
            rows[name].seconds.append(seconds)
            rows[name].peak_mib.append(peak)
            log(
                f"  round {i + 1}/{repeats} {name}: {seconds:.3f} s ({nbytes / 1e9 / seconds:.2f} GB/s)"
            )
    return list(rows.values())
