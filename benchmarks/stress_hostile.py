"""Throw hostile connections at a live netloader server, then check it is unharmed.

    .venv/bin/python benchmarks/stress_hostile.py [--connections 10000] [--workers 16]

The server runs in this process (so its threads, file descriptors and memory can be counted);
attackers run in worker threads and each connection does one hostile thing: random bytes,
truncated frames, huge length prefixes, a wrong protocol version, wrong JSON types, unknown
message kinds, messages out of order, stream attaches for sessions that do not exist, silence,
or walking away in the middle of a pull. Afterwards a normal pull must be bit-exact, and
threads, file descriptors and resident memory must be back where they were (memory within a
tolerance, since allocators keep some freed memory). Exits 1 if anything is off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from netloader import Identity, Server, pull
from netloader.protocol import (
    HEADER,
    MAGIC,
    PROTOCOL_VERSION,
    Done,
    Hello,
    PullRequest,
    StreamAttach,
    encode,
)

IDENTITY = Identity("stress-model")
MEMORY_TOLERANCE_MIB = 64


def tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    out = {f"layer.{i}.weight": torch.randn(256, 256, generator=gen) for i in range(16)}
    out["norm"] = torch.randn(256, generator=gen)
    return out


def frame(body: bytes) -> bytes:
    return HEADER.pack(MAGIC, len(body)) + body


def read_hello(sock: socket.socket) -> None:
    sock.recv(65536)


def pull_request(**overrides: object) -> dict:
    msg = PullRequest(PROTOCOL_VERSION, IDENTITY, None, ["tcp"], 2, os.urandom(16).hex()).to_json()
    msg.update(overrides)
    return msg


def attack(kind: str, address: tuple[str, int], rng: random.Random) -> None:
    with socket.create_connection(address, timeout=5) as sock:
        sock.settimeout(5)
        if kind == "silence":
            return  # connect and hang up
        read_hello(sock)
        if kind == "random_bytes":
            sock.sendall(rng.randbytes(rng.randint(1, 4096)))
        elif kind == "truncated_frame":
            body = json.dumps(pull_request()).encode()
            sock.sendall(frame(body)[: rng.randint(1, len(body))])
            return  # and hang up mid-frame
        elif kind == "huge_length":
            sock.sendall(HEADER.pack(MAGIC, rng.choice([0xFFFFFFFF, 1 << 30, (64 << 20) + 1])))
        elif kind == "bad_magic":
            sock.sendall(struct.pack("!4sI", b"HTTP", 10) + b"x" * 10)
        elif kind == "wrong_version":
            sock.sendall(frame(json.dumps(pull_request(protocol=99)).encode()))
        elif kind == "wrong_types":
            field = rng.choice(["identity", "manifest", "transports", "streams", "nonce", "mac"])
            value = rng.choice([[], {}, "x" * 5000, -1, 1.5, True, None, 1 << 70, [[1, 2, 3]]])
            sock.sendall(frame(json.dumps(pull_request(**{field: value})).encode()))
        elif kind == "unknown_kind":
            sock.sendall(frame(json.dumps({"kind": rng.choice(["shutdown", "exec", ""])}).encode()))
        elif kind == "out_of_order":
            msg = rng.choice([Done(True), Hello(1, "00" * 16, False)])
            sock.sendall(encode(msg))
        elif kind == "bogus_stream":
            sock.sendall(encode(StreamAttach(os.urandom(16).hex(), 0)))
        elif kind == "not_json":
            sock.sendall(frame(b"\xff\xfe" + rng.randbytes(64)))
        elif kind == "deep_json":
            sock.sendall(frame(b"[" * 100_000 + b"]" * 100_000))
        elif kind == "walk_away":
            sock.sendall(frame(json.dumps(pull_request()).encode()))
            sock.recv(1 << 20)  # the Accept, then leave without attaching streams
            return
        with contextlib.suppress(OSError):
            sock.recv(65536)  # whatever the server answers (a refusal, or nothing)


KINDS = [
    "silence",
    "random_bytes",
    "truncated_frame",
    "huge_length",
    "bad_magic",
    "wrong_version",
    "wrong_types",
    "unknown_kind",
    "out_of_order",
    "bogus_stream",
    "not_json",
    "deep_json",
    "walk_away",
]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def settle(server: Server, threads: int, fds: int, timeout: float = 30) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if threading.active_count() <= threads and open_fds() <= fds:
            break
        time.sleep(0.2)
    return threading.active_count(), open_fds()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    logging.basicConfig(level=logging.ERROR)  # refusals are expected here: keep the output short
    served = tensors()
    server = Server(
        served, IDENTITY, handshake_timeout=2.0, idle_timeout=2.0, max_clients=4
    ).start()
    host, port = server.address.rsplit(":", 1)
    address = (host, int(port))
    # Warm up (first pull allocates lazily initialised state), then take the baseline.
    pull(server.address, IDENTITY)
    settle(server, 2, 1 << 30, timeout=5)  # the warm-up's connection thread winds down
    threads, fds, rss = threading.active_count(), open_fds(), rss_mib()
    print(f"baseline: {threads} threads, {fds} fds, {rss:.0f} MiB resident", flush=True)

    rng = random.Random(args.seed)
    plan = [rng.choice(KINDS) for _ in range(args.connections)]
    seeds = [rng.randrange(1 << 30) for _ in plan]
    errors: Counter[str] = Counter()
    start = time.monotonic()

    def one(i: int) -> None:
        try:
            attack(plan[i], address, random.Random(seeds[i]))
        except OSError as exc:
            errors[type(exc).__name__] += 1

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(one, range(len(plan))))
    took = time.monotonic() - start
    print(
        f"{len(plan)} hostile connections in {took:.1f} s "
        f"({', '.join(f'{k} {v}' for k, v in sorted(Counter(plan).items()))}); "
        f"attacker-side socket errors: {dict(errors) or 'none'}",
        flush=True,
    )

    after_threads, after_fds = settle(server, threads, fds)
    result = pull(server.address, IDENTITY)
    exact = all(
        torch.equal(result.tensors[n].view(torch.uint8), t.view(torch.uint8))
        for n, t in served.items()
    )
    after_rss = rss_mib()
    server.close()
    ok = exact and after_threads <= threads and after_fds <= fds
    ok = ok and after_rss - rss <= MEMORY_TOLERANCE_MIB
    print(
        f"after: {after_threads} threads, {after_fds} fds, {after_rss:.0f} MiB resident "
        f"(+{after_rss - rss:.0f} MiB, tolerance {MEMORY_TOLERANCE_MIB}); "
        f"normal pull bit-exact: {'yes' if exact else 'NO'}"
    )
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
