"""Compile artifacts between real servers and clients (no vLLM): policy, matching, hostile offers.

A seed's cache entry is a directory of files as vLLM writes them, with netloader's sidecar.
The hostile peer is a real socket server that knows the token and sends crafted offers and
bytes, as a compromised or broken peer could; nothing of what it sends may stay on disk.
"""

import hashlib
import logging
import os
import socket
import threading
from pathlib import Path

import pytest
import torch
from helpers import Proxy, Serve, ServerProcess, in_process_server, kill_after
from safetensors.torch import save_file

from netloader import auth
from netloader.artifacts import VLLM_TORCH_COMPILE
from netloader.artifacts.entry import FileDigest, host_factors, write_sidecar
from netloader.artifacts.wire import ArtifactsOffer, ArtifactsRequest
from netloader.client.artifacts import NO_TOKEN, Wanted, fetch_artifacts
from netloader.options import ArtifactOptions
from netloader.protocol import PROTOCOL_VERSION, Channel, Hello

TOKEN = b"artifact-test-token-0123456789"
ALIAS, KEY = "a1" * 32, "b2" * 32
FACTORS = {"vllm_config": "cfg-1", **host_factors("cpu")}
FILES = {"inductor_cache/zw/kernel.so": os.urandom(50_000), "inductor_cache/zw/kernel.cpp": b"x"}


def make_entry(root: Path, files=None, ready=True, key=KEY, factors=None) -> Path:
    """A cache entry as a compiling seed leaves it: kernels, the AOT function, the sidecar."""
    entry = VLLM_TORCH_COMPILE.entry_dir(root, key)
    for name, data in {**FILES, **(files or {})}.items():
        (entry / name).parent.mkdir(parents=True, exist_ok=True)
        (entry / name).write_bytes(data)
    if ready:
        (entry / "rank_0_0").mkdir(parents=True, exist_ok=True)
        (entry / "rank_0_0" / "model").write_bytes(b"aot function")
    write_sidecar(entry, VLLM_TORCH_COMPILE, ALIAS, factors or FACTORS)
    return entry


def wanted(root: Path, factors=None, alias=ALIAS) -> Wanted:
    return Wanted(VLLM_TORCH_COMPILE, alias, factors or FACTORS, root)


def everything_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def tree(entry: Path) -> dict[str, bytes]:
    return {
        p.relative_to(entry).as_posix(): p.read_bytes() for p in entry.rglob("*") if p.is_file()
    }


@pytest.fixture
def seed(tmp_path):
    """A server with a token offering the entries under its cache root."""
    root = tmp_path / "seed"
    make_entry(root)
    server = in_process_server({"w": torch.zeros(4)}, token=TOKEN, compile_cache=str(root))
    yield server
    server.close()


def test_a_replica_installs_the_seeds_entry_whole(seed, tmp_path):
    got = fetch_artifacts([seed.address], wanted(tmp_path / "mine"), ArtifactOptions(), TOKEN)
    assert got.files == len(FILES) + 1 and not got.failed, got
    seed_entry = VLLM_TORCH_COMPILE.entry_dir(tmp_path / "seed", KEY)
    mine = VLLM_TORCH_COMPILE.entry_dir(tmp_path / "mine", KEY)
    assert tree(mine) == tree(seed_entry)  # the sidecar too: the replica can offer it on
    assert got.describe().startswith(f"from peer {seed.address}: {got.files} files")
    # asked again, it has the entry: nothing is fetched, nothing is overwritten
    again = fetch_artifacts([seed.address], wanted(tmp_path / "mine"), ArtifactOptions(), TOKEN)
    assert again.files == 0 and "local cache entry exists" in again.reason


def test_an_existing_entry_is_never_overwritten(seed, tmp_path):
    mine = VLLM_TORCH_COMPILE.entry_dir(tmp_path / "mine", KEY)
    (mine / "inductor_cache").mkdir(parents=True)
    (mine / "inductor_cache" / "local.so").write_bytes(b"compiled here")
    got = fetch_artifacts([seed.address], wanted(tmp_path / "mine"), ArtifactOptions(), TOKEN)
    assert got.files == 0 and not got.failed and "exists" in got.reason
    assert tree(mine) == {"inductor_cache/local.so": b"compiled here"}
    assert everything_under(mine.parent) == [
        KEY,
        *(f"{KEY}/{p}" for p in ("inductor_cache", "inductor_cache/local.so")),
    ]


def test_without_a_token_nothing_is_fetched_and_the_reason_says_how(tmp_path):
    root = tmp_path / "seed"
    make_entry(root)
    with in_process_server({"w": torch.zeros(4)}, compile_cache=str(root)) as server:
        got = fetch_artifacts([server.address], wanted(tmp_path / "mine"), ArtifactOptions(), None)
        assert got.reason == NO_TOKEN and "TOKEN_FILE" in got.reason and not got.source
        # a client that asks anyway (trusted network) is refused by a server without a token
        trusted = ArtifactOptions(mode="trusted-network")
        got = fetch_artifacts([server.address], wanted(tmp_path / "mine"), trusted, None)
        assert got.files == 0 and "has no token" in got.reason
    assert everything_under(tmp_path / "mine") == []


def test_a_trusted_network_may_go_without_a_token(tmp_path, caplog):
    root = tmp_path / "seed"
    make_entry(root)
    trusted = ArtifactOptions(mode="trusted-network")
    with caplog.at_level(logging.WARNING, "netloader.server"):
        server = in_process_server(
            {"w": torch.zeros(4)}, compile_cache=str(root), artifacts=trusted
        )
    with server:
        assert "ARTIFACTS=trusted-network" in caplog.text
        got = fetch_artifacts([server.address], wanted(tmp_path / "mine"), trusted, None)
    assert got.files == len(FILES) + 1, got


def test_a_wrong_token_is_refused(seed, tmp_path):
    got = fetch_artifacts([seed.address], wanted(tmp_path / "mine"), ArtifactOptions(), b"w" * 24)
    assert got.failed and "wrong token" in got.reason
    assert everything_under(tmp_path / "mine") == []


def test_off_on_either_side_ships_nothing(tmp_path):
    root = tmp_path / "seed"
    make_entry(root)
    off = ArtifactOptions(mode="off")
    got = fetch_artifacts(["127.0.0.1:1"], wanted(tmp_path / "mine"), off, TOKEN)
    assert got.reason == "ARTIFACTS is off"
    with in_process_server(
        {"w": torch.zeros(4)}, token=TOKEN, compile_cache=str(root), artifacts=off
    ) as server:
        got = fetch_artifacts([server.address], wanted(tmp_path / "mine"), ArtifactOptions(), TOKEN)
    assert got.files == 0 and "ARTIFACTS is off" in got.reason
    assert everything_under(tmp_path / "mine") == []


@pytest.mark.parametrize(
    ("factors", "alias", "says"),
    [
        (
            {**FACTORS, "vllm_config": "cfg-2"},
            "c3" * 32,
            "vllm_config: cfg-2 here, cfg-1 at the peer",
        ),
        ({**FACTORS, "torch": "2.12.0"}, ALIAS, "torch: 2.12.0 here"),
        ({**FACTORS, "cpu_flags": "sse2 avx"}, ALIAS, "cpu_flags differ"),
    ],
)
def test_a_key_or_host_that_differs_ships_nothing_and_names_the_part(
    seed, tmp_path, factors, alias, says
):
    got = fetch_artifacts(
        [seed.address], wanted(tmp_path / "mine", factors, alias), ArtifactOptions(), TOKEN
    )
    assert got.files == 0 and not got.failed
    assert says in got.reason, got.reason
    assert everything_under(tmp_path / "mine") == []


def test_an_entry_still_compiling_is_not_offered(tmp_path):
    root = tmp_path / "seed"
    make_entry(root, ready=False)
    with in_process_server({"w": torch.zeros(4)}, token=TOKEN, compile_cache=str(root)) as server:
        got = fetch_artifacts([server.address], wanted(tmp_path / "mine"), ArtifactOptions(), TOKEN)
    assert got.files == 0 and "not complete yet" in got.reason


def test_a_seed_never_offers_an_entry_holding_a_symlink(tmp_path):
    root = tmp_path / "seed"
    entry = make_entry(root)
    (tmp_path / "secret").write_text("outside the entry")
    (entry / "inductor_cache" / "link.so").symlink_to(tmp_path / "secret")
    with in_process_server({"w": torch.zeros(4)}, token=TOKEN, compile_cache=str(root)) as server:
        got = fetch_artifacts([server.address], wanted(tmp_path / "mine"), ArtifactOptions(), TOKEN)
    assert got.files == 0 and "not a regular file" in got.reason
    assert everything_under(tmp_path / "mine") == []


def test_the_cli_offers_a_cache_built_elsewhere(tmp_path):
    root = tmp_path / "seed"
    make_entry(root)
    save_file({"w": torch.ones(8)}, tmp_path / "model.safetensors")
    (tmp_path / "token").write_bytes(TOKEN)
    srv = Serve(
        tmp_path / "model.safetensors", "--compile-cache", root, "--token-file", tmp_path / "token"
    )
    try:
        got = fetch_artifacts([srv.address], wanted(tmp_path / "mine"), ArtifactOptions(), TOKEN)
    finally:
        srv.stop()
    assert got.files == len(FILES) + 1, got


def test_a_seed_killed_mid_fetch_leaves_nothing(tmp_path):
    root = tmp_path / "seed"
    make_entry(root, files={"inductor_cache/big.so": os.urandom(48 << 20)})
    with ServerProcess(token=TOKEN, compile_cache=str(root)) as seed:
        proxy = Proxy(seed.address, kill_after(4 << 20, seed.kill))
        try:
            got = fetch_artifacts(
                [proxy.address], wanted(tmp_path / "mine"), ArtifactOptions(), TOKEN
            )
        finally:
            proxy.close()
    assert got.failed, got
    assert everything_under(tmp_path / "mine") == []


# --- a hostile peer: it knows the token, and lies ---------------------------------------------


class HostilePeer:
    """Answers one artifacts request with ``files`` (an offer of FileDigests) and ``payload``
    (the bytes sent after it), then closes."""

    def __init__(self, files: list[FileDigest], payload: bytes, key: str = KEY):
        self.files, self.payload, self.key = files, payload, key
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            channel = Channel(conn, 10.0)
            hello = Hello(PROTOCOL_VERSION, auth.new_nonce(), True)
            channel.send(hello)
            request = channel.recv(ArtifactsRequest)
            offer = ArtifactsOffer(self.files, key=self.key)
            offer.mac = auth.mac(
                TOKEN, "server", "artifacts", request.nonce, hello.nonce, offer.digest()
            )
            channel.send(offer)
            conn.sendall(self.payload)

    def close(self) -> None:
        self.thread.join(10)
        self.listener.close()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


GOOD = b"kernel bytes" * 100


@pytest.mark.parametrize(
    ("files", "payload", "says"),
    [
        ([FileDigest("../../evil.so", len(GOOD), digest(GOOD))], GOOD, "not a plain path"),
        ([FileDigest("/tmp/evil.so", len(GOOD), digest(GOOD))], GOOD, "not a plain path"),
        ([FileDigest("a/../../evil.so", len(GOOD), digest(GOOD))], GOOD, "not a plain path"),
        ([FileDigest("netloader-artifact.json", 2, digest(b"{}"))], b"{}", "not a plain path"),
        ([FileDigest("a.so", len(GOOD), digest(GOOD))] * 2, GOOD * 2, "offered twice"),
        ([FileDigest("a.so", 9 << 30, "0" * 64)], b"", "more than the"),
        ([FileDigest(f"f{i}", 0, digest(b"")) for i in range(101)], b"", "101 files offered"),
        (
            [
                FileDigest("ok.so", len(GOOD), digest(GOOD)),
                FileDigest("bad.so", 4, digest(b"good")),
            ],
            GOOD + b"evil",
            "does not match its digest",
        ),
        ([FileDigest("a.so", len(GOOD), digest(GOOD))], GOOD[:500], "peer closed"),
    ],
    ids=[
        "traversal",
        "absolute",
        "inner-dotdot",
        "sidecar",
        "twice",
        "oversize",
        "too-many",
        "digest",
        "truncated",
    ],
)
def test_a_hostile_offer_leaves_nothing_on_disk(tmp_path, files, payload, says):
    peer = HostilePeer(files, payload)
    try:
        options = ArtifactOptions(max_files=100)
        got = fetch_artifacts([peer.address], wanted(tmp_path / "cache" / "mine"), options, TOKEN)
    finally:
        peer.close()
    assert got.failed and says in got.reason, got.reason
    assert everything_under(tmp_path) == []
