"""Mismatches are refused with a reason on both sides, before any weight byte moves."""

import pytest
import torch
from helpers import ServerProcess, all_cases, assert_same

from netloader import Identity, Refused, pull

SERVED = Identity("served-model", rank=1, world_size=2, tensor_parallel_size=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    with ServerProcess(identity=SERVED, log_path=log) as srv:
        yield srv


def sentinel(t):
    return 1 if t.dtype == torch.bool else 0xAB  # bool memory must hold 0 or 1


def filled(shape, dtype=torch.float32):
    t = torch.empty(shape, dtype=dtype)
    t.reshape(-1).view(torch.uint8).fill_(sentinel(t))
    return t


def sentinel_dest():
    """Contiguous destinations filled with a sentinel byte, to prove nothing was written."""
    return {n: filled(t.shape, t.dtype) for n, t in all_cases().items()}


def expect_refusal(server, identity, dest, code, *fragments):
    with pytest.raises(Refused) as info:
        pull(server.address, identity, into=dest)
    err = info.value
    assert err.code == code
    assert not err.partial
    for fragment in fragments:
        assert fragment in str(err)
        assert fragment in server.log()  # the server logged the same reason
    # Not a single byte landed in the destination.
    untouched = [
        bool((t.reshape(-1).view(torch.uint8) == sentinel(t)).all()) for t in dest.values()
    ]
    assert all(untouched)
    return err


def test_wrong_model(server):
    ident = Identity("other-model", rank=1, world_size=2, tensor_parallel_size=2)
    expect_refusal(server, ident, sentinel_dest(), "model", "'served-model'", "'other-model'")


def test_wrong_layout(server):
    ident = Identity(
        "served-model", rank=1, world_size=2, tensor_parallel_size=1, pipeline_parallel_size=2
    )
    expect_refusal(server, ident, sentinel_dest(), "layout", "tp=2 pp=1", "tp=1 pp=2")


def test_wrong_world_size(server):
    ident = Identity("served-model", rank=1, world_size=4, tensor_parallel_size=4)
    expect_refusal(server, ident, sentinel_dest(), "layout", "world_size=4")


def test_wrong_rank(server):
    ident = Identity("served-model", rank=0, world_size=2, tensor_parallel_size=2)
    expect_refusal(server, ident, sentinel_dest(), "rank", "rank 1", "rank 0")


def test_manifest_name(server):
    dest = sentinel_dest()
    dest["renamed"] = dest.pop("big")
    expect_refusal(server, SERVED, dest, "manifest", "'renamed'", "'big'")


def test_manifest_shape(server):
    dest = sentinel_dest()
    dest["big"] = filled((3, 299_999))
    expect_refusal(
        server,
        SERVED,
        dest,
        "manifest",
        "'big' server float32[3, 300000] vs client float32[3, 299999]",
    )


def test_manifest_dtype(server):
    dest = sentinel_dest()
    dest["int8.matrix"] = filled((37, 19), torch.uint8)
    expect_refusal(
        server,
        SERVED,
        dest,
        "manifest",
        "'int8.matrix' server int8[37, 19] vs client uint8[37, 19]",
    )


def test_manifest_extra_tensor(server):
    dest = sentinel_dest()
    dest["extra.bias"] = filled((4,))
    expect_refusal(server, SERVED, dest, "manifest", "1 tensor(s) only at client: 'extra.bias'")


def test_manifest_missing_tensor(server):
    dest = sentinel_dest()
    del dest["float16.scalar"]
    expect_refusal(server, SERVED, dest, "manifest", "1 tensor(s) only at server: 'float16.scalar'")


def test_matching_request_still_served(server):
    """The refusals above left the server healthy."""
    dest = sentinel_dest()
    pull(server.address, SERVED, into=dest)
    assert_same(all_cases(), dest)
