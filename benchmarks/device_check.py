"""One command for a GPU machine: what the machine is, the CUDA tests, and device transfers
measured side by side.

    make device-check                     # PYTHONPATH=src python3 benchmarks/device_check.py
    PYTHONPATH=src python3 benchmarks/device_check.py --size 1GiB --repeats 2 --skip-tests

Needs no package index and no vLLM: torch with CUDA, xxhash, safetensors, pytest. Without CUDA
it says so and exits 0. Everything runs within ``--budget`` seconds (default 260): the tests
get at most ``--test-timeout``, and no new round of measurements starts that would not fit.

The payload: ``--size`` (default 8 GiB) of tensors shaped like an LLM (bf16 attention, int8 MLP
with fp32 scales, fp32 norms and biases), generated on the GPU. Two processes on one GPU, a
sender that holds the payload (and serves it with netloader) and a receiver that holds
destination tensors of the same shapes. Rows, interleaved round by round:

1. raw pinned D2H + H2D: at the same moment the sender copies every tensor device-to-host and
   the receiver every destination host-to-device, each through two pinned 64 MiB buffers on a
   copy stream (what the copy engines allow for staging; no byte crosses between them);
2. raw loopback TCP: the same byte count over the same number of TCP streams, from host memory
   into host memory allocated and touched beforehand (what the sockets allow);
3. netloader TCP, device staging: ``pull(transports=["tcp"])`` into the receiver's tensors;
4. netloader CUDA IPC: ``pull(transports=["cuda_ipc"])``, digests verified on the device (and
   once more with ``verify=False``);
5. D2D copy, one process: ``copy_`` of every destination tensor into another on the same GPU;

plus on-device digests: the receiver fingerprints every chunk of its tensors (wsum64, as the
server does at capture and a device client does on arrival); and, once, the server's capture.

Each netloader row pulls into zeroed tensors and is then checked bit-exact against the server's
digests (outside the timing). Targets: netloader TCP >= 0.8x the slower of rows 1 and 2; CUDA
IPC >= 0.5x row 5; on-device digests < 5% of the CUDA IPC transfer time.

Writes JSON to ``$OUT/device-check.json`` when ``OUT`` is set, else
``bench-out/device-check.json`` (or ``--json FILE``), and prints a table. The exit status is 1
when a test or a row failed. ``--device cpu`` runs the script's own machinery on a machine
without a GPU (the rows that need CUDA fail with their reason), as the CPU test suite does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
PINNED_SLICE = 64 << 20
STARTUP_TIMEOUT = 240.0
COMMAND_TIMEOUT = 180.0

ROWS = {
    "pinned": "raw pinned D2H + H2D",
    "raw_tcp": "raw loopback TCP",
    "tcp": "netloader TCP, device staging",
    "ipc": "netloader CUDA IPC",
    "ipc_unverified": "netloader CUDA IPC, no verification",
    "d2d": "D2D copy, one process",
    "digest": "on-device digests",
}


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "device-check needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). Nothing was run."
        )
        return 0
    deadline = time.monotonic() + args.budget
    report: dict[str, Any] = {"machine": machine(args.device), "size": args.size}
    print("machine: " + json.dumps(report["machine"]), flush=True)
    if not args.skip_tests:
        left = deadline - time.monotonic() - 60
        report["tests"] = run_tests(max(30.0, min(args.test_timeout, left)))
    report["bench"] = run_bench(args, deadline)
    path = _output(args)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report["bench"]))
    print(f"wrote {path}")
    tests_ok = args.skip_tests or report["tests"]["returncode"] == 0
    return 0 if tests_ok and not report["bench"].get("errors") else 1


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    sys.path.insert(0, str(ROOT / "src"))
    from netloader.cli import parse_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=8 << 30, help="payload (8GiB)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every row (3)")
    parser.add_argument("--streams", type=int, default=min(8, os.cpu_count() or 2))
    parser.add_argument("--budget", type=float, default=260.0, help="seconds for everything")
    parser.add_argument("--test-timeout", type=float, default=150.0)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--json", help="where to write the report")
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: try the script itself without a GPU (rows that need CUDA fail)",
    )
    return parser.parse_args(argv)


def _output(args: argparse.Namespace) -> Path:
    if args.json:
        return Path(args.json)
    base = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench-out"
    base.mkdir(parents=True, exist_ok=True)
    return base / "device-check.json"


def machine(device: str) -> dict[str, Any]:
    if device != "cuda":
        return {"gpu": None, "torch": torch.__version__, "cpus": os.cpu_count()}
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "gpus": torch.cuda.device_count(),
        "driver": _nvidia_smi("driver_version"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


def run_tests(timeout: float) -> dict[str, Any]:
    """``pytest -m cuda tests/test_device.py``: its exit status, time and the end of its output."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_device.py", "-q"]
    cmd += ["-p", "no:cacheprovider"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    print(f"running {' '.join(cmd[2:])} (at most {timeout:.0f} s) ...", flush=True)
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = None, f"{exc.stdout or ''}\n... timed out after {timeout:.0f} s"
    tail = "\n".join(str(output).splitlines()[-40:])
    print(tail, flush=True)
    return {"returncode": code, "seconds": round(time.monotonic() - start, 1), "tail": tail}


# --- the measurements ----------------------------------------------------------------------


def run_bench(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """Start sender and receiver, run every row ``--repeats`` times (interleaved), stop them."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    workers = {role: Worker(ctx, role, barrier, args) for role in ("server", "client")}
    out: dict[str, Any] = {
        "rows": {key: [] for key in ROWS},
        "data_plane": {},
        "errors": {},
        "notes": [],
    }
    try:
        startup = min(STARTUP_TIMEOUT, max(30.0, deadline - time.monotonic()))
        out["server"] = workers["server"].result(startup)
        out["client"] = workers["client"].result(startup)
        print(f"payload ready: {json.dumps(out['server'])}", flush=True)
        _rounds(workers, out, args, deadline)
    except Exception as exc:
        out["errors"]["startup"] = f"{type(exc).__name__}: {exc}"
    finally:
        for worker in workers.values():
            worker.stop()
    out["streams"], out["repeats"] = args.streams, args.repeats
    out["targets"] = targets(_medians(out["rows"], out["data_plane"]))
    return out


def _rounds(
    workers: dict[str, Worker], out: dict, args: argparse.Namespace, deadline: float
) -> None:
    server, client = workers["server"], workers["client"]
    address, raw = out["server"]["address"], out["server"]["raw_address"]
    measures: dict[str, Callable[[], Any]] = {
        "pinned": lambda: max(_both(server, client, "d2h", "h2d")),
        "raw_tcp": lambda: client.call("raw_tcp", raw, args.streams),
        "tcp": lambda: _pulled(client, out, address, ["tcp"], True, args.streams),
        "ipc": lambda: _pulled(client, out, address, ["cuda_ipc"], True, args.streams),
        "ipc_unverified": lambda: _pulled(client, out, address, ["cuda_ipc"], False, args.streams),
        "d2d": lambda: client.call("d2d"),
        "digest": lambda: client.call("digest"),
    }
    last = 0.0
    for round_ in range(args.repeats):
        if round_ and time.monotonic() + last > deadline - 15:
            out["notes"].append(f"stopped after {round_} round(s): the time budget")
            return
        start = time.monotonic()
        for key, measure in measures.items():
            if key in out["errors"]:
                continue
            if server.broken or client.broken:
                out["errors"][key] = "not run: a worker stopped answering"
                continue
            try:
                got = measure()
            except Exception as exc:
                out["errors"][key] = last_line(exc)
                print(f"  {ROWS[key]}: FAILED: {exc}", flush=True)
                continue
            seconds = got if isinstance(got, float) else got["seconds"]
            out["rows"][key].append(seconds)
            if isinstance(got, dict):
                out["data_plane"].setdefault(key, []).append(got["data_s"])
            print(f"  round {round_ + 1} {ROWS[key]}: {seconds:.4f} s", flush=True)
        last = time.monotonic() - start


def last_line(exc: BaseException) -> str:
    """The last line of ``exc``'s message (a worker's traceback ends with the error), or its
    type when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else f"{type(exc).__name__} (no message)"


def _both(server: Worker, client: Worker, a: str, b: str) -> list[float]:
    """Run ``a`` on the server and ``b`` on the client at once (they meet at a barrier); both
    answers are read, whatever happened, so that the next command gets its own."""
    server.send(a)
    client.send(b)
    results, errors = [], []
    for worker in (server, client):
        try:
            results.append(worker.result(COMMAND_TIMEOUT))
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    return results


def _pulled(
    client: Worker, out: dict, address: str, transports: list[str], verify: bool, streams: int
) -> dict[str, Any]:
    """One pull by the receiver: its times (``seconds``: the call, ``data_s``: the pull's own
    measure, without the first handshake), checked bit-exact; a fallback is noted."""
    got = client.call("pull", address, transports, verify, streams)
    if not got["exact"]:
        raise RuntimeError(f"{transports} delivered bytes that differ from the server's digests")
    if got["transport"] != transports[0]:
        note = f"{transports[0]} fell back to {got['transport']}"
        if note not in out["notes"]:
            out["notes"].append(note)
    return got


#: The CUDA IPC row's data-plane time (without the handshake, the offer and the mapping): what
#: a bare D2D copy compares with.
IPC_DATA = "netloader CUDA IPC, data plane"


def _medians(rows: dict[str, list[float]], data_plane: dict[str, list[float]]) -> dict[str, float]:
    out = {ROWS[key]: statistics.median(values) for key, values in rows.items() if values}
    if data_plane.get("ipc"):
        out[IPC_DATA] = statistics.median(data_plane["ipc"])
    return out


def targets(seconds: dict[str, float]) -> list[dict[str, Any]]:
    """The issue's three targets from median seconds by row name; ``met`` is None where a row
    it needs was not measured. A ratio above 1 means netloader is faster than the baseline."""

    def ratio(numerator: str | None, denominator: str) -> float | None:
        if numerator is None or numerator not in seconds or denominator not in seconds:
            return None
        return seconds[numerator] / seconds[denominator]

    ipc = IPC_DATA if IPC_DATA in seconds else ROWS["ipc"]
    baselines = [ROWS["pinned"], ROWS["raw_tcp"]]
    slower = (
        max(baselines, key=lambda r: seconds.get(r, 0.0))
        if all(r in seconds for r in baselines)
        else None
    )
    rows = [
        (
            "netloader TCP >= 0.8x the slower of raw pinned copies and raw TCP",
            slower,
            ROWS["tcp"],
            0.8,
            True,
        ),
        (
            "netloader CUDA IPC (data plane) >= 0.5x a D2D copy in one process",
            ROWS["d2d"],
            ipc,
            0.5,
            True,
        ),
        (
            "on-device digests < 5% of the CUDA IPC transfer (data plane)",
            ROWS["digest"],
            ipc,
            0.05,
            False,
        ),
    ]
    out = []
    for name, numerator, denominator, goal, at_least in rows:
        value = ratio(numerator, denominator)
        met = None if value is None else (value >= goal if at_least else value < goal)
        out.append({"target": name, "ratio": value, "goal": goal, "met": met})
    return out


def table(bench: dict[str, Any]) -> str:
    server = bench.get("server") or {}
    nbytes = server.get("nbytes", 0)
    lines = [
        f"payload {nbytes / 2**30:.2f} GiB in {server.get('tensors', '?')} tensors, "
        f"{bench['streams']} TCP streams, median of up to {bench['repeats']} rounds; "
        f"server capture ({server.get('digest', '?')} digests): "
        f"{server.get('capture_s', float('nan')):.3f} s",
        "(netloader rows: the whole pull() call; 'data s' leaves out the first handshake)",
        f"{'row':38} {'median s':>9} {'GB/s':>8} {'data s':>8}  runs",
    ]
    for key, name in ROWS.items():
        values = bench["rows"][key]
        if values:
            median = statistics.median(values)
            data = bench["data_plane"].get(key)
            shown = f"{statistics.median(data):8.4f}" if data else f"{'':8}"
            speed = nbytes / 1e9 / median
            lines.append(f"{name:38} {median:9.4f} {speed:8.2f} {shown}  {len(values)}")
        else:
            lines.append(
                f"{name:38} {'-':>9} {'-':>8} {'':8}  {bench['errors'].get(key, 'not run')}"
            )
    lines.append("targets:")
    for t in bench["targets"]:
        verdict = {None: "not measured", True: "met", False: "NOT met"}[t["met"]]
        shown = "-" if t["ratio"] is None else f"{t['ratio']:.3f}"
        lines.append(f"  {t['target']}: {shown} (goal {t['goal']}) {verdict}")
    lines += [f"note: {n}" for n in bench["notes"]]
    lines += [f"error: {k}: {v}" for k, v in bench["errors"].items()]
    return "\n".join(lines)


# --- the two processes ---------------------------------------------------------------------


class Worker:
    """A spawned sender or receiver that runs commands sent over a pipe."""

    def __init__(self, ctx: Any, role: str, barrier: Any, args: argparse.Namespace):
        #: Set when an answer did not come in time: later answers could be out of step.
        self.broken = False
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main,
            args=(role, child, barrier, args.size, args.streams, args.device),
            daemon=True,
        )
        self.process.start()

    def call(self, command: str, *args: Any) -> Any:
        self.send(command, *args)
        return self.result(COMMAND_TIMEOUT)

    def send(self, command: str, *args: Any) -> None:
        self.conn.send((command, args))

    def result(self, timeout: float) -> Any:
        if self.broken or not self.conn.poll(timeout):
            self.broken = True
            raise TimeoutError(f"no answer within {timeout:.0f} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.send("stop")
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _worker_main(role: str, conn: Any, barrier: Any, size: int, streams: int, device: str) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"[{role}] %(name)s: %(message)s")
    try:
        if role == "server":
            side: Sender | Receiver = Sender(size, barrier, streams, device)
        else:
            side = Receiver(size, barrier, device)
        conn.send(("ok", side.info))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        command, args = conn.recv()
        if command == "stop":
            return
        try:
            conn.send(("ok", getattr(side, command)(*args)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


def llm_shapes(size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of about ``size`` bytes shaped like an LLM's layers."""
    h = 4096 if size >= 2 << 30 else 1024 if size >= 64 << 20 else 256
    vocab = 8 * h
    layer = {
        **{
            f"self_attn.{p}.weight": ((h, h), torch.bfloat16)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        },
        "self_attn.qkv_bias": ((3 * h,), torch.float32),
        "mlp.up_proj.weight": ((4 * h, h), torch.int8),
        "mlp.up_proj.weight_scale": ((4 * h,), torch.float32),
        "mlp.down_proj.weight": ((h, 4 * h), torch.int8),
        "mlp.down_proj.weight_scale": ((h,), torch.float32),
        "input_layernorm.weight": ((h,), torch.float32),
        "post_attention_layernorm.weight": ((h,), torch.float32),
    }
    per_layer = sum(_nbytes(shape, dtype) for shape, dtype in layer.values())
    layers = max(1, (size - 2 * vocab * h * 2) // per_layer)
    out = {"model.embed_tokens.weight": ((vocab, h), torch.bfloat16)}
    for i in range(layers):
        out.update({f"model.layers.{i}.{name}": spec for name, spec in layer.items()})
    out["model.norm.weight"] = ((h,), torch.float32)
    out["lm_head.weight"] = ((vocab, h), torch.bfloat16)
    return out


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def _generate(shapes: dict, seed: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, (shape, dtype) in shapes.items():
        if dtype == torch.int8:
            out[name] = torch.randint(-128, 128, shape, generator=gen, device=device, dtype=dtype)
        else:
            out[name] = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    _sync(device)
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _pinned_copies(tensors: list[torch.Tensor], to_host: bool, barrier: Any) -> float:
    """Copy every tensor to (or from) host memory through two pinned buffers, on one stream."""
    buffers = [torch.empty(PINNED_SLICE, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    events: list[torch.cuda.Event | None] = [None, None]
    flats = [t.reshape(-1).view(torch.uint8) for t in tensors]
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    barrier.wait(30)
    start = time.perf_counter()
    k = 0
    with torch.cuda.stream(stream):
        for flat in flats:
            for at in range(0, flat.numel(), PINNED_SLICE):
                part = flat[at : at + PINNED_SLICE]
                which = k % 2
                if events[which] is not None:
                    events[which].synchronize()
                host = buffers[which][: part.numel()]
                (host if to_host else part).copy_(part if to_host else host, non_blocking=True)
                events[which] = torch.cuda.Event()
                events[which].record(stream)
                k += 1
    stream.synchronize()
    return time.perf_counter() - start


class Sender:
    """The payload on the GPU, a netloader server for it, and a raw TCP sender."""

    def __init__(self, size: int, barrier: Any, streams: int, device: str):
        from netloader import Identity, Server
        from netloader.bench.children import serve_raw as _serve_raw
        from netloader.snapshot import Snapshot

        self.barrier = barrier
        self.tensors = _generate(llm_shapes(size), 1234, device)
        start = time.perf_counter()
        snapshot = Snapshot(self.tensors)
        capture = time.perf_counter() - start
        self.server = Server(snapshot, Identity("device-check"), max_streams=streams).start()
        nbytes = snapshot.plan.total_bytes
        raw: queue.Queue[str] = queue.Queue()  # where _serve_raw puts its address
        threading.Thread(
            target=_serve_raw, args=(raw, nbytes - nbytes % streams, streams), daemon=True
        ).start()
        self.info = {
            "address": self.server.address,
            "raw_address": raw.get(timeout=120),
            "nbytes": nbytes,
            "tensors": len(self.tensors),
            "chunks": snapshot.plan.num_chunks,
            "capture_s": capture,
            "digest": snapshot.digest_kind,
        }

    def d2h(self) -> float:
        return _pinned_copies(list(self.tensors.values()), True, self.barrier)


class Receiver:
    """Destination tensors on the GPU, and a touched host buffer for raw TCP."""

    def __init__(self, size: int, barrier: Any, device: str):
        from netloader.snapshot import Snapshot

        self.barrier = barrier
        self.device = device
        shapes = llm_shapes(size)
        self.dest = {n: torch.zeros(s, dtype=d, device=device) for n, (s, d) in shapes.items()}
        self.layout = Snapshot(self.dest, with_digests=False)
        nbytes = self.layout.plan.total_bytes
        self.host = torch.ones(nbytes, dtype=torch.uint8)  # pages touched before any timing
        self.copy: dict[str, torch.Tensor] | None = None
        self.info = {"nbytes": nbytes}

    def h2d(self) -> float:
        return _pinned_copies(list(self.dest.values()), False, self.barrier)

    def raw_tcp(self, address: str, streams: int) -> float:
        from netloader.bench.children import split as _split
        from netloader.tensors import host_view

        nbytes = self.host.numel() - self.host.numel() % streams
        view = host_view(self.host[:nbytes])
        host, port = address.rsplit(":", 1)
        errors: list[BaseException] = []
        start = time.perf_counter()
        conns = [socket.create_connection((host, int(port))) for _ in range(streams)]
        threads = [
            threading.Thread(target=_receive_all, args=(c, view[lo:hi], errors))
            for c, (lo, hi) in zip(conns, _split(nbytes, streams), strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        if errors:
            raise errors[0]
        return seconds

    def pull(self, address: str, transports: list[str], verify: bool, streams: int) -> dict:
        from netloader import Identity, pull

        for t in self.dest.values():
            t.zero_()
        _sync(self.device)
        accepted: dict[str, Any] = {}
        start = time.perf_counter()
        result = pull(
            address,
            Identity("device-check"),
            into=self.dest,
            transports=transports,
            streams=streams,
            verify=verify,
            on_accept=lambda a: accepted.update(digests=a.digests, kind=a.digest),
        )
        _sync(self.device)
        seconds = time.perf_counter() - start
        exact = self._digests(accepted["kind"]) == accepted["digests"]
        return {
            "seconds": seconds,
            "data_s": result.seconds,
            "transport": result.transport,
            "exact": exact,
        }

    def _digests(self, kind: str) -> list[int]:
        """This side's digests of its tensors, of the server's ``kind``."""
        from netloader.digest import WSUM, chunk_digest, fingerprints

        plan, buffers = self.layout.plan, self.layout.buffers
        if kind == WSUM:
            return fingerprints(plan, buffers, range(plan.num_chunks))
        return [chunk_digest(kind, plan, buffers, i) for i in range(plan.num_chunks)]

    def d2d(self) -> float:
        if self.copy is None:
            self.copy = {n: torch.empty_like(t) for n, t in self.dest.items()}
        _sync(self.device)
        start = time.perf_counter()
        for name, t in self.dest.items():
            self.copy[name].copy_(t)
        _sync(self.device)
        return time.perf_counter() - start

    def digest(self) -> float:
        from netloader.digest import fingerprints

        plan = self.layout.plan
        _sync(self.device)
        start = time.perf_counter()
        fingerprints(plan, self.layout.buffers, range(plan.num_chunks))  # returns synchronised
        return time.perf_counter() - start


def _receive_all(conn: socket.socket, view: memoryview, errors: list[BaseException]) -> None:
    try:
        with conn:
            while len(view):
                got = conn.recv_into(view)
                if not got:
                    raise ConnectionError("raw sender closed early")
                view = view[got:]
    except BaseException as exc:
        errors.append(exc)


if __name__ == "__main__":
    sys.exit(main())
