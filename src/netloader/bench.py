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
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from netloader.sockets import free_port

PAYLOAD_SEED = 1234


@dataclass
class Row:
    name: str
    seconds: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)
    note: str = ""
    nbytes: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def gbps(self) -> float:
        return self.nbytes / 1e9 / self.median_s if self.seconds else float("nan")


@dataclass
class Report:
    machine: str
    payload_bytes: int
    tensors: int
    streams: int
    repeats: int
    rows: list[Row]
    date: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def to_json(self) -> dict[str, Any]:
        base = self.row("netloader")
        out = asdict(self)
        for r, d in zip(self.rows, out["rows"], strict=True):
            d.update(median_s=r.median_s, gbps=r.gbps, netloader_ratio=_ratio(base, r))
        return out

    def table(self) -> str:
        base = self.row("netloader")
        lines = [
            f"payload {self.payload_bytes / 2**30:.2f} GiB in {self.tensors} tensors, "
            f"{self.streams} TCP streams, median of {self.repeats}; machine: {self.machine}",
            f"{'method':30} {'seconds':>8} {'GB/s':>7} {'netloader is':>13} {'peak MiB':>9}  note",
        ]
        for r in self.rows:
            ratio = _ratio(base, r)
            peak = f"{max(r.peak_mib):9.0f}" if r.peak_mib else f"{'-':>9}"
            if r.seconds:
                lines.append(
                    f"{r.name:30} {r.median_s:8.3f} {r.gbps:7.2f} {ratio:12.2f}x {peak}  {r.note}"
                )
            else:
                lines.append(f"{r.name:30} {'-':>8} {'-':>7} {'-':>13} {peak}  {r.note}")
        return "\n".join(lines)


def _ratio(base: Row, other: Row) -> float:
    """How many times faster netloader is than ``other`` (1.0 for itself)."""
    if not base.seconds or not other.seconds:
        return float("nan")
    return other.median_s / base.median_s


def machine_description() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{len(os.sched_getaffinity(0))} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


# --- child processes ------------------------------------------------------------------------


class _Memory:
    """Peak resident memory of this process above its level when created (Linux /proc).

    Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark, so imports and
    earlier spikes do not count.
    """

    def __init__(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")
        self.base = _status_kib("VmRSS")

    def peak_mib(self) -> float:
        return (_status_kib("VmHWM") - self.base) / 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _payload(size: int) -> dict[str, torch.Tensor]:
    from netloader.synthetic import llm_like

    return llm_like(size, seed=PAYLOAD_SEED)


def _serve_netloader(queue: Any, path: str, digests: bool) -> None:
    from safetensors.torch import load_file

    from netloader import Identity, Server
    from netloader.snapshot import Snapshot

    tensors = {n: t.clone() for n, t in load_file(path).items()}  # private memory, like a model
    server = Server(Snapshot(tensors, with_digests=digests), Identity("bench")).start()
    queue.put(server.address)
    threading.Event().wait()


def _recv_netloader(queue: Any, address: str, streams: int) -> None:
    from netloader import Identity, pull

    memory = _Memory()
    start = time.perf_counter()
    result = pull(address, Identity("bench"), streams=streams)
    seconds = time.perf_counter() - start
    queue.put((seconds, memory.peak_mib(), result.total_bytes))


def _serve_raw(queue: Any, nbytes: int, streams: int) -> None:
    from netloader.tensors import host_view

    buf = torch.ones(nbytes, dtype=torch.uint8)
    view = host_view(buf)
    listener = socket.create_server(("127.0.0.1", 0))
    queue.put(f"127.0.0.1:{listener.getsockname()[1]}")
    while True:
        conns = [listener.accept()[0] for _ in range(streams)]
        parts = _split(nbytes, streams)

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


def _recv_raw(queue: Any, address: str, nbytes: int, streams: int) -> None:
    from netloader.tensors import host_view

    host, port = address.rsplit(":", 1)
    memory = _Memory()
    start = time.perf_counter()
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = host_view(buf)
    conns = [socket.create_connection((host, int(port))) for _ in range(streams)]

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
        for c, p in zip(conns, _split(nbytes, streams), strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put((time.perf_counter() - start, memory.peak_mib(), nbytes))


def _split(nbytes: int, parts: int) -> list[tuple[int, int]]:
    step = -(-nbytes // parts)
    return [(i * step, min(nbytes, (i + 1) * step)) for i in range(parts)]


def _gloo_group(port: int, rank: int) -> Any:
    import torch.distributed as dist

    from netloader.transport.process_group import gloo_pair

    store = dist.TCPStore(
        "127.0.0.1", port, 2, is_master=rank == 0, timeout=datetime.timedelta(seconds=120)
    )
    return gloo_pair(store, rank, "127.0.0.1", 120.0)


def _send_gloo(queue: Any, path: str, port: int) -> None:
    from safetensors.torch import load_file

    loaded = load_file(path)
    tensors = [loaded[n].clone().reshape(-1).view(torch.uint8) for n in sorted(loaded)]
    group = _gloo_group(port, 0)
    queue.put("ready")
    for t in tensors:
        group.send([t], 1, 0).wait()
    group.barrier().wait()


def _recv_gloo(queue: Any, path: str, port: int) -> None:
    from safetensors import safe_open

    from netloader.checkpoint import torch_dtype

    with safe_open(path, framework="pt") as f:
        names = sorted(f.keys())
        shapes = [(f.get_slice(n).get_shape(), f.get_slice(n).get_dtype()) for n in names]
    group = _gloo_group(port, 1)
    memory = _Memory()
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


def _load_safetensors(queue: Any, path: str) -> None:
    """vLLM's default path: read each tensor from the file, copy it into the model's memory."""
    from safetensors import safe_open

    memory = _Memory()
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


# --- orchestration --------------------------------------------------------------------------


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
        tensors = _payload(size)
        nbytes, count = sum(t.nbytes for t in tensors.values()), len(tensors)
        save_file(tensors, path)
        del tensors
        servers = [
            _Child(ctx, _serve_netloader, path, True),
            _Child(ctx, _serve_raw, nbytes, streams),
            _Child(ctx, _serve_netloader, path, False),
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
        sender = _Child(ctx, _send_gloo, path, port)
        try:
            return _measure(ctx, _recv_gloo, path, port)
        finally:
            sender.stop()

    def cold() -> tuple[float, float, int]:
        drop_page_cache()
        return _measure(ctx, _load_safetensors, path)

    return {
        "netloader": lambda: _measure(ctx, _recv_netloader, with_digests, streams),
        "netloader, no digests": lambda: _measure(ctx, _recv_netloader, without, streams),
        f"raw sockets x{streams}": lambda: _measure(ctx, _recv_raw, raw, nbytes, streams),
        "gloo per tensor": gloo,
        "safetensors, cold cache": drop_page_cache() or cold,
        "safetensors, warm cache": lambda: _measure(ctx, _load_safetensors, path),
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


def plot(report: Report, path: str) -> None:
    """A bar chart of GB/s per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.seconds]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    names = [r.name for r in rows][::-1]
    speeds = [r.gbps for r in rows][::-1]
    colors = ["tab:blue" if n.startswith("netloader") else "tab:gray" for n in names]
    bars = ax.barh(names, speeds, color=colors)
    for bar, speed in zip(bars, speeds, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {speed:.2f}", va="center")
    ax.set_xlabel("GB/s (median)")
    ax.set_title(
        f"{report.payload_bytes / 2**30:.2f} GiB, {report.tensors} tensors, receiver in a fresh process\n"
        f"{report.machine}",
        fontsize=9,
    )
    ax.set_xlim(0, max(speeds) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(report: Report, path: str) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
