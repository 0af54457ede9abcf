"""Server lifecycle: ports, address files, clean shutdown, no blocking of the host process."""

import logging
import socket
import threading

import pytest
import torch
from helpers import netloader_threads

from netloader import Identity, Server, pull
from netloader.server import write_address

TENSORS = {"w": torch.arange(1000, dtype=torch.float32)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_base_port_plus_rank():
    base = free_port() - 3
    with Server(TENSORS, Identity("m", rank=3, world_size=4), listen_port=base) as srv:
        assert srv.address == f"127.0.0.1:{base + 3}"
        assert (
            pull(srv.address, Identity("m", rank=3, world_size=4)).tensors["w"].equal(TENSORS["w"])
        )


@pytest.mark.parametrize("base", [80, 65535, 70000])
def test_port_out_of_range_means_no_listener(base, caplog):
    caplog.set_level(logging.WARNING, "netloader")
    with Server(TENSORS, Identity("m", rank=1, world_size=2), listen_port=base) as srv:
        assert srv.address is None
    assert f"port {base + 1} (listen_port {base} + rank 1) is outside 1024..65535" in caplog.text


def test_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            Server(TENSORS, Identity("m"), listen_port=port).start()


def test_output_prefix_file(tmp_path):
    prefix = str(tmp_path / "addr" / "rank")
    with Server(TENSORS, Identity("m", rank=1, world_size=2), output_prefix=prefix) as srv:
        assert (tmp_path / "addr" / "rank1.txt").read_text() == srv.address + "\n"
    assert [p.name for p in (tmp_path / "addr").iterdir()] == ["rank1.txt"]  # no temp files left


def test_write_address_replaces_atomically(tmp_path):
    write_address(str(tmp_path / "p"), 0, "1.2.3.4:5")
    write_address(str(tmp_path / "p"), 0, "5.6.7.8:9")
    assert (tmp_path / "p0.txt").read_text() == "5.6.7.8:9\n"


def test_close_stops_threads_and_listener():
    before = netloader_threads()  # e.g. those of other tests' servers, still winding down
    srv = Server(TENSORS, Identity("m")).start()
    port = int(srv.address.rsplit(":", 1)[1])
    assert [t.name for t in netloader_threads(before)] == ["netloader-accept"]
    pull(srv.address, Identity("m"))
    srv.close()
    assert netloader_threads(before) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_serving_does_not_block_the_host():
    """start() returns at once; the host thread keeps working while a client pulls."""
    srv = Server(TENSORS, Identity("m")).start()
    try:
        result = {}
        t = threading.Thread(target=lambda: result.update(r=pull(srv.address, Identity("m"))))
        t.start()
        t.join(30)
        assert result["r"].tensors["w"].equal(TENSORS["w"])
    finally:
        srv.close()
