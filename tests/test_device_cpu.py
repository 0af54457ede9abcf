"""The parts of the device work that run without a GPU: the on-device fingerprint (on host
tensors: the same torch ops), digest kinds, device staging (forced onto host tensors), the
choice of CUDA IPC and its fallback, the IPC offer's JSON and bounds, and the protocol of the
cuda_ipc data connection with its two CUDA-only steps (sharing and mapping handles) replaced by
doubles that hand over the server's host tensors. tests/test_device.py has the CUDA cases."""

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import xxhash
from helpers import (
    STREAM_PREAMBLE,
    Proxy,
    all_cases,
    assert_same,
    flip_in_data,
    in_process_server,
    zeros_like_all,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from netloader import Identity, IntegrityError, Refused, Server, events, pull
from netloader.client.source import _differs
from netloader.digest import WSUM, XXH3, fingerprints
from netloader.errors import ProtocolError
from netloader.options import ServeOptions
from netloader.plan import Plan
from netloader.protocol import Accept, PullRequest
from netloader.server.handshake import Gate
from netloader.snapshot import Snapshot
from netloader.sockets import is_local
from netloader.tensors import flat_bytes
from netloader.transport import cuda_ipc, engine, offered, preferred
from netloader.transport.chunks import CHUNK_HEADER
from netloader.transport.cuda_ipc import CudaIpcEngine, check_offer
from netloader.transport.cuda_ipc_wire import (
    IpcOffer,
    IpcReply,
    IpcStorage,
    for_local_torch,
    ipc_handle_problem,
    torch_handle_version,
)
from netloader.transport.staging import DeviceStaging, Staging

ROOT = Path(__file__).parent.parent
IDENT = Identity("test-model")
CHUNK = 64 << 10

# --- the wsum64 fingerprint, by its definition ---------------------------------------------

M, L, MASK = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, (1 << 64) - 1


def reference(data: bytes) -> int:
    """The fingerprint as digest.py defines it, in plain Python."""
    padded = data + bytes(-len(data) % 8)
    total = len(data) * L
    for i in range(len(padded) // 8):
        total += int.from_bytes(padded[8 * i : 8 * i + 8], "little") * (2 * i + 1) * M
    return total & MASK


def layout(sizes: list[int], skew: int, seed: int = 0) -> tuple[Plan, list[torch.Tensor]]:
    """Flat uint8 buffers of ``sizes`` cut from one storage starting ``skew`` bytes in, so
    pieces start at every alignment; and their plan in 64 KiB chunks."""
    gen = torch.Generator().manual_seed(seed)
    storage = torch.randint(0, 256, (sum(sizes) + skew,), dtype=torch.uint8, generator=gen)
    buffers, at = [], skew
    for size in sizes:
        buffers.append(storage[at : at + size])
        at += size
    return Plan(sizes, CHUNK), buffers


def chunk_bytes(plan: Plan, buffers: list[torch.Tensor], index: int) -> bytes:
    return b"".join(bytes(buffers[s][a:b].numpy()) for s, a, b in plan.pieces(index))


sizes = st.lists(
    st.sampled_from([0, 1, 7, 8, 13, 4096, CHUNK - 3, CHUNK, 3 * CHUNK, 3 * CHUNK + 5]),
    min_size=1,
    max_size=6,
)


@settings(max_examples=25, deadline=None)
@given(sizes, st.integers(0, 7))
def test_fingerprint_matches_its_definition(sizes, skew):
    """Whole aligned chunks reduced together, gathered chunks, padded tails: the same value as
    the definition, and the same whether chunks are fingerprinted together or one by one."""
    plan, buffers = layout(sizes, skew)
    chunks = range(plan.num_chunks)
    together = fingerprints(plan, buffers, chunks)
    assert together == [reference(chunk_bytes(plan, buffers, i)) for i in chunks]
    assert together == [fingerprints(plan, buffers, [i])[0] for i in chunks]
    assert fingerprints(plan, buffers, list(chunks)[::-1]) == together[::-1]


def test_long_runs_are_cut_and_still_match(monkeypatch):
    """A tensor of many whole chunks is reduced in runs of at most RUN_BYTES."""
    from netloader import digest

    monkeypatch.setattr(digest, "RUN_BYTES", 3 * CHUNK)
    plan, buffers = layout([10 * CHUNK + 8], 0)
    chunks = list(range(plan.num_chunks))
    assert digest._runs(plan, buffers, chunks) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9], [10]]
    got = fingerprints(plan, buffers, chunks)
    assert got == [reference(chunk_bytes(plan, buffers, i)) for i in chunks]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_flipped_byte_anywhere_changes_its_chunk_only(data):
    plan, buffers = layout([5, CHUNK + 3, 2 * CHUNK, 17, CHUNK - 1], skew=3, seed=1)
    before = fingerprints(plan, buffers, range(plan.num_chunks))
    slot = data.draw(st.sampled_from([i for i, b in enumerate(buffers) if b.numel()]))
    at = data.draw(st.integers(0, buffers[slot].numel() - 1))
    flip = data.draw(st.integers(1, 255))
    original = int(buffers[slot][at])
    buffers[slot][at] = original ^ flip
    try:
        after = fingerprints(plan, buffers, range(plan.num_chunks))
    finally:
        buffers[slot][at] = original
    hit = (plan.offsets[slot] + at) // CHUNK
    assert [i for i in range(plan.num_chunks) if before[i] != after[i]] == [hit]


def fingerprint_of(t: torch.Tensor) -> int:
    flat = flat_bytes(t.contiguous())
    return fingerprints(Plan([flat.numel()], CHUNK), [flat], [0])[0]


def test_fingerprint_is_stable_and_tells_dtypes_and_layouts_apart():
    t = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    assert fingerprint_of(t) == fingerprint_of(t.clone())
    assert fingerprint_of(t) != fingerprint_of(t.to(torch.float64))
    assert fingerprint_of(t) != fingerprint_of(t.to(torch.bfloat16).to(torch.float32))
    assert fingerprint_of(t) != fingerprint_of(t.t())  # the transposed layout's bytes
    assert fingerprint_of(t) != fingerprint_of(t.reshape(48, 64).flip(0))
    # It digests bytes: the same bytes read as another dtype are the same content.
    assert fingerprint_of(t) == fingerprint_of(t.view(torch.int32))
    # Zero bytes of different lengths differ (the length is part of it).
    assert fingerprint_of(torch.zeros(8, dtype=torch.uint8)) != fingerprint_of(
        torch.zeros(16, dtype=torch.uint8)
    )


def test_host_snapshots_keep_their_xxh3_digests():
    snapshot = Snapshot(all_cases(), chunk_size=CHUNK)
    assert snapshot.digest_kind == XXH3
    for index in range(snapshot.plan.num_chunks):
        data = chunk_bytes(snapshot.plan, snapshot.buffers, index)
        assert snapshot.digests[index] == xxhash.xxh3_64(data).intdigest()


def wsum_snapshot(tensors) -> Snapshot:
    """A host snapshot that carries wsum64 digests, as a device snapshot does."""
    snapshot = Snapshot(tensors, chunk_size=CHUNK, with_digests=False)
    snapshot.digest_kind = WSUM
    snapshot.digests = snapshot.compute_digests()
    return snapshot


def test_wsum_snapshot_digests_are_the_fingerprints():
    snapshot = wsum_snapshot(all_cases())
    plan, buffers = snapshot.plan, snapshot.buffers
    assert snapshot.digests == [
        reference(chunk_bytes(plan, buffers, i)) for i in range(plan.num_chunks)
    ]
    assert snapshot.changed() == []
    buffers[-1][2_000_000] ^= 1  # inside "big", in a chunk of its own
    assert snapshot.changed() == ["big"]


# --- digest kinds on the wire ---------------------------------------------------------------


def accept(**fields) -> Accept:
    snapshot = Snapshot({"w": torch.ones(10)}, chunk_size=CHUNK)
    base = dict(
        session="00" * 16,
        identity=IDENT,
        manifest=snapshot.manifest,
        aliases={},
        transport="tcp",
        streams=1,
        chunk_size=CHUNK,
        digests=snapshot.digests,
    )
    return Accept(**{**base, **fields})


def test_a_source_with_another_digest_kind_is_other_content():
    assert _differs(accept(), accept()) is None
    reason = _differs(accept(digest=WSUM), accept())
    assert reason == "its digests are wsum64, the first source's xxh3-64: they cannot be compared"


def test_accept_without_a_digest_kind_means_xxh3():
    body = accept(digest=WSUM).to_json()
    del body["digest"]
    assert Accept.from_json(body).digest == XXH3
    with pytest.raises(ProtocolError, match="unknown digest kind 'md5'"):
        Accept.from_json({**body, "digest": "md5"})


def test_a_relay_serves_on_with_its_sources_digest_kind():
    """A relay of a device server serves its wsum64 digests onwards, named as such."""
    tensors = all_cases()
    with in_process_server(wsum_snapshot(tensors)) as source:
        relay = Server(None, IDENT).start()
        try:
            pull(source.address, IDENT, relay=relay)
            seen = []
            again = pull(relay.address, IDENT, on_accept=lambda a: seen.append(a.digest))
        finally:
            relay.close()
    assert seen == [WSUM]
    assert_same(tensors, again.tensors)


# --- device staging, forced onto host tensors -----------------------------------------------


def test_only_the_receiving_side_orders_its_copies_after_the_callers_stream(monkeypatch):
    """Served tensors are fixed after capture: the sending side's copies do not queue behind
    the caller's (in vLLM: the legacy default) stream; the receiving side's do (the caller may
    still be writing its destination). On a CPU the ordering itself is a no-op: what is seen
    here is whether each side asks for it."""
    asked = []
    monkeypatch.setattr(DeviceStaging, "_follow_callers", lambda self: asked.append(self))
    source = Snapshot(all_cases(), chunk_size=CHUNK, with_digests=False)
    sender = DeviceStaging(source.plan, source.buffers)
    sender.send(0, lambda view: None)
    assert asked == []
    receiver = DeviceStaging(source.plan, [torch.zeros_like(b) for b in source.buffers])
    receiver.receive(0, lambda view: None)
    assert asked == [receiver]


def test_device_staging_moves_every_chunk_through_two_small_slices():
    source = Snapshot(all_cases(), chunk_size=CHUNK, with_digests=False)
    dest = [torch.zeros_like(b) for b in source.buffers]
    sender = DeviceStaging(source.plan, source.buffers, slice_bytes=1000)
    receiver = DeviceStaging(source.plan, dest, slice_bytes=1000)
    a, b = socket.socketpair()
    a.settimeout(20)  # bytes that never come fail the test instead of hanging it
    b.settimeout(20)
    thread = threading.Thread(
        target=lambda: [sender.send(i, a.sendall) for i in range(source.plan.num_chunks)]
    )
    thread.start()
    try:
        for index in range(source.plan.num_chunks):
            hasher = xxhash.xxh3_64()

            def take(view, hasher=hasher):
                assert b.recv_into(view, len(view), socket.MSG_WAITALL) == len(view)
                hasher.update(view)

            receiver.receive(index, take)
            data = chunk_bytes(source.plan, source.buffers, index)
            assert hasher.intdigest() == xxhash.xxh3_64(data).intdigest()
    finally:
        thread.join()
        a.close()
        b.close()
    assert all(torch.equal(x, y) for x, y in zip(source.buffers, dest, strict=True))


@pytest.fixture
def staged(monkeypatch):
    """Every chunk goes through DeviceStaging, on both sides, as device chunks do."""
    monkeypatch.setattr(Staging, "on_device", lambda self, index: True)


@pytest.mark.parametrize("kind", [XXH3, WSUM])
def test_tcp_with_device_staging_is_bit_exact(staged, kind):
    tensors = all_cases()
    snapshot = wsum_snapshot(tensors) if kind == WSUM else Snapshot(tensors, chunk_size=CHUNK)
    with in_process_server(snapshot) as server:
        dest = zeros_like_all(tensors)
        result = pull(server.address, IDENT, into=dest, transports=["tcp"], streams=3)
        assert_same(tensors, dest)
        fresh = pull(server.address, IDENT, transports=["tcp"])
        assert_same(tensors, fresh.tensors)
    assert result.transport == "tcp"


@pytest.mark.parametrize("kind", [XXH3, WSUM])
def test_device_staging_catches_a_flipped_byte(staged, kind):
    """XXH3 from the slices as they pass, wsum64 where the chunk landed: both catch it."""
    tensors = all_cases()
    snapshot = wsum_snapshot(tensors) if kind == WSUM else Snapshot(tensors, chunk_size=CHUNK)
    with in_process_server(snapshot) as server:
        # The data stream: the greeting, then chunk 0 (8-byte header, 64 KiB), chunk 1, ...
        position = STREAM_PREAMBLE + 2 * (CHUNK_HEADER.size + CHUNK) + CHUNK_HEADER.size + 777
        proxy = Proxy(server.address, flip_in_data(position, mask=0x10), per_connection=True)
        try:
            with pytest.raises(IntegrityError, match=r"chunk 2 \(bytes"):
                pull(proxy.address, IDENT, transports=["tcp"], streams=1)
        finally:
            proxy.close()


# --- choosing CUDA IPC ------------------------------------------------------------------------


def test_local_addresses():
    assert is_local("127.0.0.1") and is_local("localhost")
    assert not is_local("192.0.2.1")  # TEST-NET-1: never assigned
    assert not is_local("no-such-host.invalid")


@pytest.fixture
def pretend_cuda(monkeypatch):
    """CUDA IPC 'supports' every device, as on a GPU machine (the data path still refuses)."""
    monkeypatch.setattr(CudaIpcEngine, "supports", lambda self, device: True)


def test_preferred_proposes_ipc_only_for_a_local_source(pretend_cuda):
    cuda = torch.device("cuda", 0)
    assert preferred(cuda, "127.0.0.1") == ["cuda_ipc", "tcp"]  # no NCCL on one host
    assert "cuda_ipc" not in preferred(cuda, "192.0.2.1")
    assert "cuda_ipc" not in preferred(cuda)
    assert preferred(cuda, "192.0.2.1")[-1] == "tcp"


def test_preferred_for_host_tensors_is_tcp():
    """Host tensors: mooncake first where it is installed (make test installs it), then TCP."""
    mooncake = ["mooncake"] if engine("mooncake").absent() is None else []
    assert preferred(torch.device("cpu"), "127.0.0.1") == [*mooncake, "tcp"]


def test_server_offers_ipc_only_to_a_local_client(pretend_cuda):
    request = PullRequest(2, IDENT, None, ["cuda_ipc", "tcp"], 2, "00" * 16)
    snapshot = Snapshot({"w": torch.ones(4)})
    assert Gate(None).transport_for(request, snapshot, "127.0.0.1").name == "cuda_ipc"
    assert Gate(None).transport_for(request, snapshot, "192.0.2.7").name == "tcp"
    without_ipc = Gate(None, offered(ServeOptions(cuda_ipc=False)))
    assert without_ipc.transport_for(request, snapshot, "127.0.0.1").name == "tcp"


def test_host_tensors_never_take_ipc():
    tensors = all_cases()
    with in_process_server(tensors) as server:
        result = pull(server.address, IDENT, transports=["cuda_ipc", "tcp"])
        assert result.transport == "tcp"
        assert_same(tensors, result.tensors)
        with pytest.raises(Refused) as info:
            pull(server.address, IDENT, transports=["cuda_ipc"])
    assert info.value.code == "transport"


# --- the IPC offer: plain JSON, every field bounded -------------------------------------------


def storage(**fields) -> dict:
    good = dict(
        handle="0263" + "ab" * 64,
        size=1 << 20,
        offset=0,
        ref="/torch_100_200_3",
        ref_offset=5,
        event="00" * 64,
        sync=True,
    )
    return {**good, **fields}


def offer_json(storages=None, slots=None, **fields) -> dict:
    return {
        "kind": "ipc_offer",
        "gpu": "GPU-8a1f-0000",
        "storages": [storage()] if storages is None else storages,
        "slots": [[0, 0], None] if slots is None else slots,
        "reason": "",
        **fields,
    }


def test_a_good_offer_decodes():
    offer = IpcOffer.from_json(offer_json())
    assert offer.storages == [IpcStorage(**storage())]
    check_offer(offer, Plan([4096, 0], CHUNK))


@pytest.mark.parametrize(
    "hostile, why",
    [
        (offer_json([storage(handle="0265" + "ab" * 64)]), "expandable segments"),
        (offer_json([storage(handle="0463" + "ab" * 64)]), "version 4, newer than the known 3"),
        (offer_json([storage(handle="0378" + "ab" * 64)]), "handle type 0x78"),
        (offer_json([storage(handle="0263" + "ab" * 63)]), "65 bytes"),
        (offer_json([storage(handle="ab" * 2000)]), "longer than"),
        (offer_json([storage(handle="x!" * 64)]), "must be hex"),
        (offer_json([storage(ref="/../../dev/shm/x")]), "not a shared-memory name"),
        (offer_json([storage(ref="/dev/mem")]), "not a shared-memory name"),
        (offer_json([storage(ref_offset=10_000)]), "outside 0..9999"),
        (offer_json([storage(ref_offset=-1)]), "outside 0..9999"),
        (offer_json([storage(size=1 << 60)]), "outside 1.."),
        (offer_json([storage(event="00" * 65)]), "'event'"),
        (offer_json([storage(sync="yes")]), "'sync' must be bool"),
        (offer_json([{**storage(), "pickle": "gASV"}]), "must be an object with"),
        (offer_json([storage()], slots=[[1, 0]]), "null or"),
        (offer_json([storage()], slots=[[0, -8]]), "null or"),
        (offer_json(gpu="../../0"), "GPU UUID"),
        (offer_json(storages="gASV"), "'storages' must be list"),
    ],
)
def test_a_hostile_offer_is_refused(hostile, why):
    with pytest.raises(ProtocolError, match=why):
        IpcOffer.from_json(hostile)


@pytest.mark.parametrize(
    "handle",
    ["ab" * 64, "0163" + "ab" * 64, "0263" + "ab" * 64, "0363" + "ab" * 64, "0363" + "ab" * 90],
)
def test_handles_are_accepted_as_torchs_consumer_accepts_them(handle):
    """A bare handle (torch before 2.3), versions up to 3 (torch 2.13), trailing bytes that
    torch's consumer ignores."""
    assert ipc_handle_problem(bytes.fromhex(handle)) is None
    assert IpcOffer.from_json(offer_json([storage(handle=handle)])).storages[0].handle == handle


def test_a_newer_handle_is_opened_with_the_local_version_byte():
    v3 = bytes.fromhex("0363" + "ab" * 64)
    assert for_local_torch(v3, 2) == bytes.fromhex("0263" + "ab" * 64)  # torch 2.12 client
    assert for_local_torch(v3, 3) == v3
    assert for_local_torch(bytes.fromhex("0263" + "ab" * 64), 3)[0] == 2  # older: as sent
    assert for_local_torch(bytes.fromhex("ab" * 64), 2) == bytes.fromhex("ab" * 64)
    versions = ["2.12.1", "2.13.0", "2.13.0+cu128", "2.14.0a0+git1234", "3.0.0"]
    assert [torch_handle_version(v) for v in versions] == [2, 3, 3, 3, 3]


@pytest.mark.parametrize(
    "slots, sizes, why",
    [
        ([[0, (1 << 20) - 100]], [4096], "beyond its storage"),
        ([None], [4096], "leaves out slot 0"),
        ([[0, 0]], [4096, 8], "has 1 slots for 2"),
    ],
)
def test_an_offer_that_does_not_fit_the_plan_is_refused(slots, sizes, why):
    offer = IpcOffer.from_json(offer_json([storage()], slots=slots))
    with pytest.raises(ProtocolError, match=why):
        check_offer(offer, Plan(sizes, CHUNK))


# --- the cuda_ipc data connection, with doubles for its two CUDA-only steps -----------------


@pytest.fixture
def host_ipc(monkeypatch, pretend_cuda):
    """Sharing "hands over" host storages by a made-up handle and mapping "opens" them, in one
    process: everything else of the transport runs as on a GPU. ``corrupt`` makes the mapped
    copy of one byte differ."""
    shared: dict[str, torch.Tensor] = {}
    state = {"corrupt": False}

    def share(snapshot):
        storages, slots, keep = [], [], []
        for buf in snapshot.buffers:
            if buf.numel() == 0:
                slots.append(None)
                continue
            whole = torch.empty(0, dtype=torch.uint8).set_(buf.untyped_storage())
            handle = os.urandom(64).hex()
            shared[handle] = whole
            storages.append(
                IpcStorage(handle, whole.numel(), 0, "/torch_1_2_3", 0, "00" * 64, False)
            )
            slots.append([len(storages) - 1, buf.data_ptr() - whole.data_ptr()])
            keep.append(whole)
        return IpcOffer("GPU-test", storages, slots), keep

    def open_storage(storage, device):
        whole = shared[storage.handle]
        if state["corrupt"]:
            whole = whole.clone()
            whole[whole.numel() // 2] ^= 0x40
        return whole

    def release(storages):
        state["released"] += [s.handle for s in storages]

    state["released"] = []
    state["shared"] = shared
    monkeypatch.setattr(cuda_ipc, "share", share)
    monkeypatch.setattr(cuda_ipc, "usable_gpu", lambda gpu, device: 0)
    monkeypatch.setattr(cuda_ipc, "_open", open_storage)
    monkeypatch.setattr(cuda_ipc, "release_counters", release)
    return state


@pytest.mark.parametrize("kind", [XXH3, WSUM])
def test_ipc_protocol_copies_every_chunk(host_ipc, kind):
    tensors = all_cases()
    snapshot = wsum_snapshot(tensors) if kind == WSUM else Snapshot(tensors, chunk_size=CHUNK)
    with in_process_server(snapshot) as server:
        dest = zeros_like_all(tensors)
        result = pull(server.address, IDENT, into=dest, transports=["cuda_ipc"])
        assert (result.transport, result.streams) == ("cuda_ipc", 1)
        assert_same(tensors, dest)
        fresh = pull(server.address, IDENT, transports=["cuda_ipc"])
        assert_same(tensors, fresh.tensors)
        assert fresh.tensors["lm_head.weight"] is fresh.tensors["embed.weight"]


def test_counters_of_storages_the_client_did_not_map_are_released(host_ipc, monkeypatch):
    """Mapped storages are the client's to release (by dropping them); the server releases the
    rest: all of them when the client cannot map any, those after the first that failed."""
    tensors = all_cases()
    with in_process_server(Snapshot(tensors, chunk_size=CHUNK)) as server:
        result = pull(server.address, IDENT, transports=["cuda_ipc"], streams=3)
        assert (result.transport, result.streams) == ("cuda_ipc", 1)
        assert host_ipc["released"] == []  # every storage mapped

        opened, real_open = [], cuda_ipc._open

        def open_one(storage, device):
            if opened:
                raise RuntimeError("cudaIpcOpenMemHandle failed")
            opened.append(storage.handle)
            return real_open(storage, device)

        monkeypatch.setattr(cuda_ipc, "_open", open_one)
        result = pull(server.address, IDENT, transports=["cuda_ipc"], streams=3)
        assert (result.transport, result.streams) == ("tcp", 3)
        assert_same(tensors, result.tensors)
        offered = list(host_ipc["shared"])[-len(host_ipc["released"]) - 1 :]
        assert offered[0] == opened[0] and host_ipc["released"] == offered[1:]
        assert len(offered) > 2


def test_an_ipc_reply_says_how_many_storages_were_opened():
    assert IpcReply.from_json({"ok": True, "reason": ""}).opened(5) == 5  # before the field
    assert IpcReply.from_json({"ok": False, "reason": "x"}).opened(5) == 0
    assert IpcReply.from_json({"ok": False, "reason": "x", "mapped": 2}).opened(5) == 2
    with pytest.raises(ProtocolError, match="'mapped'"):
        IpcReply.from_json({"ok": False, "reason": "x", "mapped": -1})


@pytest.mark.parametrize("kind", [XXH3, WSUM])
def test_ipc_verifies_what_it_copied(host_ipc, kind):
    host_ipc["corrupt"] = True
    tensors = all_cases()
    snapshot = wsum_snapshot(tensors) if kind == WSUM else Snapshot(tensors, chunk_size=CHUNK)
    with in_process_server(snapshot) as server, pytest.raises(IntegrityError):
        pull(server.address, IDENT, transports=["cuda_ipc"])


def test_ipc_needs_the_token_like_everything_else(host_ipc, caplog):
    caplog.set_level(logging.WARNING, "netloader")
    tensors = all_cases()
    token = b"t" * 32
    with in_process_server(tensors, token=token) as server:
        for wrong in (None, b"w" * 32):
            with pytest.raises(Refused) as info:
                pull(server.address, IDENT, transports=["cuda_ipc"], token=wrong)
            assert info.value.code == "auth" and not info.value.partial
        # The server itself refused the wrong token, before any transport was chosen.
        assert "authentication failed: wrong token" in caplog.text
        result = pull(server.address, IDENT, transports=["cuda_ipc"], token=token)
    assert result.transport == "cuda_ipc"
    assert_same(tensors, result.tensors)


def test_ipc_falls_back_to_tcp_on_the_usual_streams(pretend_cuda, caplog):
    """Host tensors cannot be shared: the server says why, the client receives over TCP, on
    as many streams as a TCP pull (the first is the offer's connection)."""
    caplog.set_level(logging.WARNING, "netloader")
    tensors = all_cases()
    senders: set[int] = set()  # the server's threads that sent chunks
    another = threading.Event()

    def sent(event: events.Event) -> None:
        if isinstance(event, events.ChunkSent):
            senders.add(threading.get_ident())
            if len(senders) > 1:
                another.set()
            another.wait(10)  # the first stream to send waits until another one sends

    stop = events.subscribe(sent)
    try:
        with in_process_server(tensors, chunk_size=CHUNK) as server:
            dest = zeros_like_all(tensors)
            result = pull(server.address, IDENT, into=dest, transports=["cuda_ipc"], streams=4)
    finally:
        stop()
    assert (result.transport, result.streams) == ("tcp", 4)
    assert len(senders) > 1
    assert_same(tensors, dest)
    assert "the served tensors are not all on one CUDA device" in caplog.text


# --- make device-check without a GPU -----------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine: run make device-check")
def test_device_check_says_it_needs_a_gpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--size", "8MiB"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "needs a CUDA GPU" in proc.stdout


def test_device_check_runs_its_rows_on_a_cpu(tmp_path):
    """``--device cpu``: the two processes, the rows that need no CUDA, the report; the rows
    that need CUDA fail with their reason (and the exit status says so)."""
    out = tmp_path / "device-check.json"
    args = ["--device", "cpu", "--size", "8MiB", "--repeats", "2", "--skip-tests", "--json", out]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    bench = json.loads(out.read_text())["bench"]
    measured = {key for key, values in bench["rows"].items() if len(values) == 2}
    assert measured == {"raw_tcp", "tcp", "d2d", "digest"}, bench["errors"]
    assert set(bench["errors"]) == {"pinned", "ipc", "ipc_unverified"}
    assert "pin_memory" in bench["errors"]["pinned"]
    assert "none of the transports ['cuda_ipc']" in bench["errors"]["ipc"]
    assert "netloader TCP, device staging" in proc.stdout and "targets:" in proc.stdout


def load_device_check():
    spec = importlib.util.spec_from_file_location(
        "device_check", ROOT / "benchmarks/device_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_check_targets():
    check = load_device_check()
    seconds = {
        "raw pinned D2H + H2D": 1.0,
        "raw loopback TCP": 2.0,
        "netloader TCP, device staging": 2.4,
        "netloader CUDA IPC": 0.05,
        "D2D copy, one process": 0.02,
        "on-device digests": 0.004,
    }
    got = {t["target"]: t for t in check.targets(seconds)}
    tcp = got["netloader TCP >= 0.8x the slower of raw pinned copies and raw TCP"]
    assert tcp["ratio"] == pytest.approx(2.0 / 2.4) and tcp["met"]
    ipc = got["netloader CUDA IPC (data plane) >= 0.5x a D2D copy in one process"]
    assert ipc["ratio"] == pytest.approx(0.4) and not ipc["met"]
    digests = got["on-device digests < 5% of the CUDA IPC transfer (data plane)"]
    assert digests["ratio"] == pytest.approx(0.08) and not digests["met"]
    assert check.targets({})[0]["met"] is None  # nothing measured: nothing claimed
    # With the pull's own data-plane time, the handshake and the mapping are left out.
    seconds[check.IPC_DATA] = 0.03
    got = {t["target"]: t for t in check.targets(seconds)}
    ipc = got["netloader CUDA IPC (data plane) >= 0.5x a D2D copy in one process"]
    assert ipc["ratio"] == pytest.approx(0.02 / 0.03) and ipc["met"]


def test_device_check_reports_an_error_without_a_message():
    """An exception with an empty message (a bare AssertionError in a worker) is reported by its
    type, and the run goes on."""
    check = load_device_check()
    assert check.last_line(AssertionError()) == "AssertionError (no message)"
    assert check.last_line(RuntimeError("Traceback ...\n  x\nValueError: bad")) == "ValueError: bad"


def test_the_device_tests_load_without_hypothesis():
    """tests/test_device.py imports hypothesis only inside the one test that needs it: on a GPU
    machine without it, every other device test still runs."""
    code = (
        "import sys; sys.modules['hypothesis'] = None; "
        "sys.path[:0] = ['tests', 'src']; import test_device; print('loaded')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.strip() == "loaded", proc.stderr[-2000:]
