"""Process-group pairs (gloo here; NCCL on a GPU): END is acknowledged and both sides shut the
group down; an NCCL pair is built so that a failed peer costs only its transfer."""

import logging
import os

import pytest
import torch
import torch.distributed as dist
from helpers import all_cases, assert_same, in_process_server

from netloader import Identity, pull
from netloader.transport import process_group
from netloader.transport.process_group import PAIR_NCCL_ENV, NcclEngine, pair_environment

IDENT = Identity("test-model")


@pytest.fixture
def ends(monkeypatch):
    """How each side ended its group: (rank, ended) per call of ``finish``."""
    calls = []
    real = process_group.finish

    def finish(group, ended):
        calls.append((group.rank(), ended))
        real(group, ended)

    monkeypatch.setattr(process_group, "finish", finish)
    return calls


def test_end_is_acknowledged_and_both_sides_shut_down(ends):
    tensors = all_cases()
    with in_process_server(tensors, chunk_size=64 << 10) as server:
        result = pull(server.address, IDENT, transports=["gloo"], idle_timeout=20)
    assert result.transport == "gloo"
    assert_same(tensors, result.tensors)
    assert sorted(ends) == [(0, True), (1, True)]  # shutdown, not abort, on both sides


def test_a_lost_acknowledgement_aborts_the_clients_group(ends, monkeypatch, caplog):
    """The bytes are all in place: the pull succeeds, the group is aborted, a line says why."""
    caplog.set_level(logging.WARNING, "netloader")
    real_move = process_group._move

    def move(op, chunk, peer, limit):
        request = chunk.dtype == torch.int64 and chunk.numel() == 1
        to_client = peer == process_group.CLIENT_RANK
        if op.__name__ == "send" and to_client and request and int(chunk.item()) == -1:
            raise ConnectionError("the ack was lost")  # the server's acknowledgement
        real_move(op, chunk, peer, limit)

    monkeypatch.setattr(process_group, "_move", move)
    with in_process_server(all_cases(), chunk_size=64 << 10) as server:
        result = pull(server.address, IDENT, transports=["gloo"], idle_timeout=3)
    assert_same(all_cases(), result.tensors)
    assert (1, False) in ends and "did not acknowledge END" in caplog.text


def test_an_nccl_pair_is_built_with_blocking_wait_only_for_itself(monkeypatch):
    """torch reads these settings in ProcessGroupNCCL's constructor; they are there while the
    pair's group is built and gone afterwards (the doubles stand in for the CUDA-only class)."""
    seen = {}

    class FakeNccl:
        class Options:
            pass

        def __init__(self, store, rank, size, options):
            seen.update({k: os.environ.get(k) for k in PAIR_NCCL_ENV})

    monkeypatch.setattr(dist, "ProcessGroupNCCL", FakeNccl, raising=False)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
    NcclEngine().group(dist.HashStore(), 0, "127.0.0.1", 5.0)
    assert seen == PAIR_NCCL_ENV
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert "TORCH_NCCL_BLOCKING_WAIT" not in os.environ


def test_pair_environment_restores_even_on_failure(monkeypatch):
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "0")
    with pytest.raises(RuntimeError), pair_environment(PAIR_NCCL_ENV):
        assert os.environ["TORCH_NCCL_BLOCKING_WAIT"] == "1"
        raise RuntimeError("the constructor failed")
    assert os.environ["TORCH_NCCL_BLOCKING_WAIT"] == "0"
    assert torch.distributed.is_available()
