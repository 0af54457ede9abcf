"""Shared test helpers: tensors covering every case, and a server in a real child process."""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from netloader import Identity, Server
from netloader.protocol import PROTOCOL_VERSION, Attached, Hello, encode

DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]

#: What a data connection carries before its first chunk: the server's greeting, then its
#: confirmation that it holds the session (the client asks: the Accept names the server's own
#: address). Tests that tamper with byte N of a data stream count from here.
STREAM_PREAMBLE = len(encode(Hello(PROTOCOL_VERSION, "00" * 16, False))) + len(encode(Attached()))


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs and infinities included) so only byte equality can pass."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    numel = 1
    for d in shape:
        numel *= d
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def all_cases(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every dtype as a matrix, a 0-dim scalar, an empty tensor and a non-contiguous view, plus
    tied tensors, slices sharing one storage and a tensor larger than several chunks."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        out[f"{name}.matrix"] = random_tensor((37, 19), dtype, gen)
        out[f"{name}.scalar"] = random_tensor((), dtype, gen)
        out[f"{name}.empty"] = random_tensor((0, 5), dtype, gen)
        out[f"{name}.transposed"] = random_tensor((11, 23), dtype, gen).t()
    tied = random_tensor((64, 32), torch.bfloat16, gen)
    out["embed.weight"] = tied
    out["lm_head.weight"] = tied
    fused = random_tensor((3, 128, 16), torch.float16, gen)
    out["attn.q"], out["attn.k"], out["attn.v"] = fused[0], fused[1], fused[2]
    out["big"] = random_tensor((3, 300_000), torch.float32, gen)  # 3.6 MB: many 64 KiB chunks
    return out


def byte_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes, wherever each tensor lives."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(
        a.cpu().contiguous().reshape(-1).view(torch.uint8),
        b.cpu().contiguous().reshape(-1).view(torch.uint8),
    )


def assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected) or set(got) == set(expected)
    bad = [n for n in expected if not byte_equal(expected[n], got[n])]
    assert not bad, f"tensors differ: {bad}"


def zeros_like_all(
    tensors: dict[str, torch.Tensor], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Destinations shaped like ``tensors`` on ``device``; keeps non-contiguity so that path is
    exercised."""
    out = {}
    for name, t in tensors.items():
        if not t.is_contiguous() and t.dim() == 2:
            out[name] = torch.zeros(t.shape[::-1], dtype=t.dtype, device=device).t()
        else:
            out[name] = torch.zeros(t.shape, dtype=t.dtype, device=device)
    return out


def to_device(tensors: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """``tensors`` on ``device`` with their sharing kept: each storage is copied once and every
    tensor becomes the same view (offset, shape, strides) of its storage's copy, so tied
    tensors stay tied, slices of one storage stay slices of one, views stay non-contiguous."""
    copies: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in tensors.items():
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in copies:
            copies[key] = torch.empty(0, dtype=torch.uint8).set_(storage).to(device, copy=True)
        on_device = torch.empty(0, dtype=t.dtype, device=device)
        out[name] = on_device.set_(
            copies[key].untyped_storage(), t.storage_offset(), t.shape, t.stride()
        )
    return out


def cuda_cases(seed: int = 0) -> dict[str, torch.Tensor]:
    """``all_cases`` on the first CUDA device (a ServerProcess builder)."""
    return to_device(all_cases(seed), "cuda")


def _serve_main(
    queue: Any, builder: str, seed: int, identity: dict, kwargs: dict, log_path: str | None
) -> None:
    if log_path:
        logging.basicConfig(
            filename=log_path, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
        )
    module, func = builder.rsplit(":", 1)
    tensors = getattr(importlib.import_module(module), func)(seed)
    server = Server(tensors, Identity(**identity), **kwargs).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    queue.put(server.address)
    while not stop.wait(0.5):
        pass
    server.close()


class ServerProcess:
    """A netloader server in its own process, serving ``builder(seed)`` (a "module:function")."""

    def __init__(
        self,
        builder: str = "helpers:all_cases",
        seed: int = 0,
        identity: Identity | None = None,
        log_path: Path | None = None,
        **kwargs: Any,
    ):
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        ident = (identity or Identity("test-model")).to_json()
        self.log_path = log_path
        self.process = ctx.Process(
            target=_serve_main,
            args=(self.queue, builder, seed, ident, kwargs, str(log_path) if log_path else None),
            daemon=True,
        )
        self.address: str | None = None

    def __enter__(self) -> ServerProcess:
        self.process.start()
        self.address = self.queue.get(timeout=120)
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the server; safe to call again, from any thread (the relay may call it
        from several connections at once)."""
        with contextlib.suppress(ProcessLookupError):
            if self.process.is_alive():
                os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    def __exit__(self, *exc: object) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        self.kill()


def wait_for(condition: Any, timeout: float, what: str = "the condition") -> None:
    """Poll ``condition()`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g} s"
        time.sleep(0.05)


def netloader_threads(exclude: Any = ()) -> list[threading.Thread]:
    """Live threads netloader created (their names start with "netloader-"), except those in
    ``exclude`` (e.g. threads that existed before the server under test started)."""
    return [
        t for t in threading.enumerate() if t.name.startswith("netloader-") and t not in exclude
    ]


def flip_in_data(position: int, mask: int = 0x01, conn_index: int = 1) -> Any:
    """A per-connection Proxy tamper function: flip the bits ``mask`` of the byte ``position``
    bytes into connection ``conn_index``'s answers (1: the first data connection)."""

    def tamper(conn: int, offset: int, data: bytes) -> bytes:
        if conn == conn_index and offset <= position < offset + len(data):
            data = bytearray(data)
            data[position - offset] ^= mask
            return bytes(data)
        return data

    return tamper


def kill_after(nbytes: int, kill: Any) -> Any:
    """A Proxy tamper function: once ``nbytes`` went through, call ``kill()`` and cut."""

    def tamper(offset: int, data: bytes) -> bytes | None:
        if offset > nbytes:
            kill()
            return None
        return data

    return tamper


class Proxy:
    """A TCP relay on 127.0.0.1 in front of ``target`` that can tamper with server->client bytes.

    ``tamper(offset, data)`` gets each piece the server sends (``offset``: bytes relayed so far
    on all connections) and returns the bytes to forward, or None to cut every connection. With
    ``per_connection=True`` it is called as ``tamper(connection_index, offset_in_it, data)``
    (connections numbered in the order they were accepted). ``on_connect(index, relayed)`` is
    called for each accepted connection before the proxy dials the target; if the target
    cannot be reached then, the client's connection is closed.
    """

    def __init__(
        self,
        target: str,
        tamper: Any = None,
        per_connection: bool = False,
        on_connect: Any = None,
    ):
        import socket

        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.tamper = tamper or (lambda offset, data: data)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.relayed = 0
        self.per_connection = per_connection
        self.on_connect = on_connect
        self.connections = 0
        self.lock = threading.Lock()
        self.socks: list = []
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            with self.lock:
                index = self.connections
                self.connections += 1
            if self.on_connect is not None:
                self.on_connect(index, self.relayed)
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.socks += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, index), daemon=True).start()

    def _pipe(self, src: Any, dst: Any, downstream: int | None) -> None:
        seen = 0
        try:
            while data := src.recv(1 << 16):
                if downstream is not None:
                    with self.lock:
                        offset = self.relayed
                        self.relayed += len(data)
                    if self.per_connection:
                        data = self.tamper(downstream, seen, data)
                    else:
                        data = self.tamper(offset, data)
                    seen += len(data or b"")
                    if data is None:
                        self.close_all()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            import socket

            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close_all(self) -> None:
        import socket

        self.cut.set()
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.close_all()
        self.listener.close()


def in_process_server(
    tensors: dict[str, torch.Tensor], identity: Identity | None = None, **kwargs: Any
) -> Server:
    return Server(tensors, identity or Identity("test-model"), **kwargs).start()


def frames_of(data: bytes) -> list[dict]:
    """The control frames that make up ``data`` (bytes a peer sent), each decoded from JSON;
    anything that is not a whole number of well-formed frames fails the test."""
    import json

    from netloader.protocol import HEADER, MAGIC

    out = []
    while data:
        assert len(data) >= HEADER.size, f"a partial frame header: {data!r}"
        magic, length = HEADER.unpack(data[: HEADER.size])
        assert magic == MAGIC, f"not a frame: {data[:40]!r}"
        body = data[HEADER.size : HEADER.size + length]
        assert len(body) == length, f"a truncated frame: {data[:80]!r}"
        out.append(json.loads(body))
        data = data[HEADER.size + length :]
    return out


class RawClient:
    """Speaks the control protocol by hand, to misbehave on purpose."""

    def __init__(self, address: str, rcvbuf: int | None = None):
        import socket

        from netloader.protocol import Channel, Hello

        host, port = address.rsplit(":", 1)
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect((host, int(port)))
        self.channel = Channel(self.sock, 10.0)
        self.hello = self.channel.recv(Hello)
        self.address = address

    def request_pull(self, identity: Identity, streams: int = 1) -> Any:
        from netloader.protocol import PROTOCOL_VERSION, Accept, PullRequest, Refuse

        nonce = os.urandom(16).hex()
        self.channel.send(PullRequest(PROTOCOL_VERSION, identity, None, ["tcp"], streams, nonce))
        return self.channel.recv_any(Accept, Refuse)

    def attach(self, session: str, index: int = 0, rcvbuf: int | None = None) -> Any:
        import socket

        from netloader.protocol import Channel, Hello, StreamAttach

        host, port = self.address.rsplit(":", 1)
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect((host, int(port)))
        channel = Channel(sock, 10.0)
        channel.recv(Hello)
        channel.send(StreamAttach(session, index))
        return sock

    def close(self) -> None:
        self.sock.close()


def big_cases(seed: int = 0) -> dict[str, torch.Tensor]:
    """64 MiB in 16 tensors: more than loopback socket buffers hold."""
    gen = torch.Generator().manual_seed(seed)
    return {
        f"w{i}": torch.randint(0, 256, (4 << 20,), generator=gen, dtype=torch.uint8)
        for i in range(16)
    }


class Serve:
    """``netloader serve ARGS`` in a child process; ``address`` once it printed
    ``listening on IP:PORT``."""

    def __init__(self, *args: object):
        netloader = str(Path(sys.executable).with_name("netloader"))
        self.proc = subprocess.Popen(
            [netloader, "serve", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        match = re.fullmatch(r"listening on (\S+:\d+)\n", line)
        assert match, (
            f"unexpected first line {line!r}; stderr: {self.proc.stderr.read() if not line else ''}"
        )
        self.address = match.group(1)

    def next_line(self) -> str:
        return self.proc.stdout.readline()

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then its exit status and stderr."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err
