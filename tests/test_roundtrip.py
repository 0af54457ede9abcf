"""Every dtype and shape case travels bit-exactly between two processes, on both transports."""

import pytest
import torch
from helpers import ServerProcess, all_cases, assert_same, zeros_like_all

from netloader import Identity, pull

IDENT = Identity("test-model")


@pytest.fixture(scope="module")
def server():
    with ServerProcess(chunk_size=64 << 10) as srv:
        yield srv


@pytest.mark.parametrize("transport", ["tcp", "gloo"])
def test_into_existing_tensors(server, transport):
    expected = all_cases()
    dest = zeros_like_all(expected)
    ptrs = {n: t.data_ptr() for n, t in dest.items()}
    result = pull(server.address, IDENT, into=dest, transports=[transport])
    assert result.transport == transport
    assert_same(expected, dest)
    # Received in place: the caller's tensors are the ones returned, at the same addresses.
    assert all(result.tensors[n] is dest[n] and dest[n].data_ptr() == ptrs[n] for n in dest)


@pytest.mark.parametrize("transport", ["tcp", "gloo"])
def test_into_fresh_tensors(server, transport):
    result = pull(server.address, IDENT, transports=[transport])
    assert_same(all_cases(), result.tensors)
    # Tied tensors arrive tied, as they were served.
    assert result.tensors["lm_head.weight"] is result.tensors["embed.weight"]


@pytest.mark.parametrize("streams", [1, 3, 8])
def test_stream_counts(server, streams):
    result = pull(server.address, IDENT, streams=streams)
    assert result.streams == streams
    assert_same(all_cases(), result.tensors)


def test_untied_destination_gets_both_copies(server):
    expected = all_cases()
    dest = zeros_like_all(expected)  # separate memory for the two tied names
    pull(server.address, IDENT, into=dest)
    assert dest["lm_head.weight"].data_ptr() != dest["embed.weight"].data_ptr()
    assert_same(expected, dest)


def test_total_bytes_reported(server):
    result = pull(server.address, IDENT)
    unique = {}
    for t in all_cases().values():
        unique[(t.data_ptr(), t.shape, t.dtype)] = t.numel() * t.dtype.itemsize
    assert result.total_bytes == sum(unique.values())
    assert result.seconds > 0


def test_fresh_tensors_on_requested_dtype_and_device(server):
    result = pull(server.address, IDENT, device="cpu")
    assert all(t.device.type == "cpu" for t in result.tensors.values())
    assert result.tensors["bfloat16.scalar"].shape == torch.Size([])
