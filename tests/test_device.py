"""CUDA tensors for real: TCP with device staging, CUDA IPC on one host, digests on the device.

Every test here needs a CUDA GPU (marker ``cuda``) and is skipped without one, so CI without a
GPU stays green; ``make device-check`` runs them on a GPU machine. NCCL is not tested: two
processes on one GPU cannot form an NCCL pair (NCCL refuses two ranks on one device).
tests/test_device_cpu.py covers what runs without a GPU.
"""

import pytest
import torch
from helpers import (
    STREAM_PREAMBLE,
    Proxy,
    ServerProcess,
    all_cases,
    assert_same,
    flip_in_data,
    to_device,
    zeros_like_all,
)

from netloader import Identity, IntegrityError, Refused, pull
from netloader.digest import WSUM, fingerprints
from netloader.plan import Plan
from netloader.snapshot import Snapshot
from netloader.transport.chunks import CHUNK_HEADER

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False"
    ),
]

IDENT = Identity("test-model")
CHUNK = 64 << 10
TRANSPORTS = ["tcp", "cuda_ipc"]


@pytest.fixture(scope="module")
def device_server():
    with ServerProcess(builder="helpers:cuda_cases", chunk_size=CHUNK) as srv:
        yield srv


@pytest.fixture(scope="module")
def host_server():
    with ServerProcess(chunk_size=CHUNK) as srv:
        yield srv


# --- every case, bit-exact ----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_into_existing_device_tensors(device_server, transport):
    expected = all_cases()
    dest = zeros_like_all(expected, "cuda")
    pointers = {n: t.data_ptr() for n, t in dest.items()}
    result = pull(device_server.address, IDENT, into=dest, transports=[transport])
    assert result.transport == transport  # no fallback
    assert_same(expected, dest)
    assert all(result.tensors[n] is dest[n] and dest[n].data_ptr() == pointers[n] for n in dest)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_into_fresh_device_tensors(device_server, transport):
    result = pull(device_server.address, IDENT, device="cuda", transports=[transport])
    assert result.transport == transport
    assert all(t.device.type == "cuda" for t in result.tensors.values())
    assert_same(all_cases(), result.tensors)
    assert result.tensors["lm_head.weight"] is result.tensors["embed.weight"]


@pytest.mark.parametrize("streams", [1, 8])
def test_device_staging_on_several_streams(device_server, streams):
    result = pull(device_server.address, IDENT, device="cuda", transports=["tcp"], streams=streams)
    assert result.streams == streams
    assert_same(all_cases(), result.tensors)


def test_a_local_device_source_is_pulled_over_ipc_by_default(device_server):
    result = pull(device_server.address, IDENT, device="cuda")
    assert result.transport == "cuda_ipc"
    assert_same(all_cases(), result.tensors)


def test_host_source_into_device_tensors(host_server):
    """XXH3 digests, checked on the pinned slices as the chunks pass."""
    dest = zeros_like_all(all_cases(), "cuda")
    result = pull(host_server.address, IDENT, into=dest)
    assert result.transport == "tcp"  # IPC proposed (local, CUDA), but host tensors cannot
    assert_same(all_cases(), dest)


def test_device_source_into_host_tensors(device_server):
    """wsum64 digests from the server's GPU, checked by the same function on this CPU."""
    result = pull(device_server.address, IDENT)
    assert result.transport == "tcp"
    assert_same(all_cases(), result.tensors)


# --- digests on the device ------------------------------------------------------------------


def test_a_device_snapshot_digests_on_the_device_as_the_cpu_would():
    cases = all_cases()
    on_device = Snapshot(to_device(cases, "cuda"), chunk_size=CHUNK)
    assert on_device.digest_kind == WSUM
    on_host = Snapshot(cases, chunk_size=CHUNK, with_digests=False)
    plan = on_host.plan
    assert on_device.digests == fingerprints(plan, on_host.buffers, range(plan.num_chunks))


def layout(sizes: list[int], skew: int) -> tuple[Plan, list[torch.Tensor]]:
    storage = torch.randint(0, 256, (sum(sizes) + skew,), dtype=torch.uint8, device="cuda")
    buffers, at = [], skew
    for size in sizes:
        buffers.append(storage[at : at + size])
        at += size
    return Plan(sizes, CHUNK), buffers


def test_on_device_digests_catch_a_flipped_byte_anywhere():
    """hypothesis is imported here, not at the top: without it only this test is skipped."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    hypothesis.settings(max_examples=100, deadline=None)(
        hypothesis.given(st.data())(flipped_byte_anywhere)
    )()


def flipped_byte_anywhere(data) -> None:
    from hypothesis import strategies as st

    sizes = data.draw(st.lists(st.integers(0, 3 * CHUNK), min_size=1, max_size=5))
    plan, buffers = layout(sizes, data.draw(st.integers(0, 7)))
    if not plan.total_bytes:
        return
    before = fingerprints(plan, buffers, range(plan.num_chunks))
    assert before == fingerprints(plan, [b.cpu() for b in buffers], range(plan.num_chunks))
    slot = data.draw(st.sampled_from([i for i, b in enumerate(buffers) if b.numel()]))
    at = data.draw(st.integers(0, buffers[slot].numel() - 1))
    buffers[slot][at] ^= data.draw(st.integers(1, 255))
    after = fingerprints(plan, buffers, range(plan.num_chunks))
    hit = (plan.offsets[slot] + at) // CHUNK
    assert [i for i in range(plan.num_chunks) if before[i] != after[i]] == [hit]


@pytest.mark.parametrize("source", ["device_server", "host_server"])
def test_a_flipped_byte_into_device_tensors_is_caught(source, request):
    server = request.getfixturevalue(source)
    position = STREAM_PREAMBLE + 3 * (CHUNK_HEADER.size + CHUNK) + CHUNK_HEADER.size + 4321
    proxy = Proxy(server.address, flip_in_data(position, mask=0x04), per_connection=True)
    try:
        with pytest.raises(IntegrityError, match=r"chunk 3 \(bytes"):
            pull(proxy.address, IDENT, device="cuda", transports=["tcp"], streams=1)
    finally:
        proxy.close()


# --- CUDA IPC: the token, and falling back ------------------------------------------------------


def test_ipc_is_refused_without_the_token():
    token = b"a shared secret of 32 bytes....."
    with ServerProcess(builder="helpers:cuda_cases", token=token) as server:
        for wrong in (None, b"another secret, also 32 bytes..."):
            with pytest.raises(Refused) as info:
                pull(server.address, IDENT, device="cuda", transports=["cuda_ipc"], token=wrong)
            assert info.value.code == "auth"
        result = pull(server.address, IDENT, device="cuda", transports=["cuda_ipc"], token=token)
    assert result.transport == "cuda_ipc"
    assert_same(all_cases(), result.tensors)


def test_a_server_that_turned_ipc_off_serves_over_tcp():
    with ServerProcess(builder="helpers:cuda_cases", cuda_ipc=False) as server:
        result = pull(server.address, IDENT, device="cuda")
    assert result.transport == "tcp"
    assert_same(all_cases(), result.tensors)


def test_ipc_falls_back_to_tcp_when_the_memory_cannot_be_shared(monkeypatch, tmp_path):
    """torch's expandable segments are not shared over this transport: the server says so and
    the client receives over TCP on the same connection."""
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    log = tmp_path / "server.log"
    with ServerProcess(builder="helpers:cuda_cases", log_path=log) as server:
        result = pull(server.address, IDENT, device="cuda", transports=["cuda_ipc"])
        assert result.transport == "tcp"
        assert_same(all_cases(), result.tensors)
        assert "CUDA IPC not possible" in server.log()


# --- the vLLM capture on a GPU ------------------------------------------------------------------


def test_a_host_capture_keeps_nothing_on_the_device():
    """CAPTURE=host: every tensor copied to host memory through the pinned buffer (more than
    one slice of it for the large one), bit-exact, ties kept, no device memory held after."""
    from netloader.integrations.vllm import capture

    big = torch.randint(0, 256, (capture.PINNED_BYTES + 12345,), dtype=torch.uint8, device="cuda")
    tensors = {**to_device(all_cases(), "cuda"), "big": big}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    kept = capture.kept(tensors, "host")
    assert torch.cuda.memory_allocated() <= before  # transient copies of views freed
    assert all(t.device.type == "cpu" for t in kept.values())
    assert all(torch.equal(kept[n].cuda(), t) for n, t in tensors.items() if t.numel())
    assert kept["lm_head.weight"] is kept["embed.weight"]
    device = capture.kept(tensors, "device")
    assert all(t.device.type == "cuda" for t in device.values())
    assert capture.resolve("auto", big.device) == "host"
