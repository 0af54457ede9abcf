"""Sources are tried in order; failures name every source and why."""

import socket

import pytest
from helpers import ServerProcess, all_cases, assert_same

from netloader import AllSourcesFailed, ConfigError, Identity, SourceUnreachable, pull
from netloader.client import parse_source

IDENT = Identity("test-model")


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    with ServerProcess() as srv:
        yield srv


def test_first_unreachable_second_serving(server):
    dead = f"127.0.0.1:{closed_port()}"
    result = pull([dead, server.address], IDENT)
    assert result.source == server.address
    assert_same(all_cases(), result.tensors)


def test_first_refusing_second_serving(tmp_path):
    with ServerProcess(identity=Identity("other")) as wrong, ServerProcess() as right:
        result = pull([wrong.address, right.address], IDENT)
        assert result.source == right.address


def test_all_fail():
    dead = [f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"]
    with pytest.raises(AllSourcesFailed) as info:
        pull(dead, IDENT, connect_timeout=2)
    assert [e.source for e in info.value.errors] == dead
    assert all(isinstance(e, SourceUnreachable) for e in info.value.errors)
    assert dead[0] in str(info.value) and dead[1] in str(info.value)
    assert not info.value.partial


def test_single_unreachable_source_raises_its_own_error():
    with pytest.raises(SourceUnreachable, match="cannot connect"):
        pull(f"127.0.0.1:{closed_port()}", IDENT)


@pytest.mark.parametrize("bad", ["localhost", "host:", ":80", "h:0", "h:65536", "h:http", ""])
def test_bad_source_strings(bad):
    with pytest.raises(ConfigError, match="host:port"):
        parse_source(bad)


def test_ipv6_source():
    assert parse_source("[::1]:8000") == ("::1", 8000)
    assert parse_source("10.0.0.1:8000") == ("10.0.0.1", 8000)
