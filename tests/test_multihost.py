"""netloader between hosts with real, shaped links (network namespaces, see docs/netbed.md).

Skipped where namespaces cannot be made; CI (root) must run them (NETLOADER_REQUIRE_NETNS=1).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_same
from netbed_fixtures import SHARE, bed_checkpoint
from safetensors.torch import load_file

from netloader_testing.netbed import NetBed


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return bed_checkpoint(tmp_path_factory, 64 << 20, seed=3)


def serve(host, checkpoint: Path, *extra: str, log=None) -> tuple[subprocess.Popen, str]:
    """``netloader serve`` on ``host`` (its log to the open file ``log``); returns the process
    and its address."""
    proc = host.popen(
        [sys.executable, "-m", "netloader", "serve", checkpoint, "--host", host.address, *extra],
        stdout=subprocess.PIPE,
        stderr=log or subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc, line.split()[-1]


def test_three_sources_on_slow_uplinks_each_carry_a_share(checkpoint, tmp_path):
    """Three source hosts at 100 Mbit/s, a client at 1 Gbit/s: the client takes chunks from all
    three at once, and the file it writes is bit-exact."""
    folder, tensors = checkpoint
    hosts = {"a": "100mbit", "b": "100mbit", "c": "100mbit", "client": "1gbit"}
    with NetBed(hosts) as bed:
        addresses = [serve(bed[name], folder)[1] for name in "abc"]
        out = tmp_path / "out"
        proc = bed["client"].run(
            [sys.executable, "-m", "netloader", "pull", *addresses, "--out", out],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        shares = dict(SHARE.findall(proc.stdout))
        assert set(shares) == set(addresses), proc.stdout
        assert all(int(n) > 0 for n in shares.values()), proc.stdout
        # Each source host sent its share over its own link.
        for name, address in zip("abc", addresses, strict=True):
            assert bed[name].tx_bytes() > int(shares[address])
    assert_same(tensors, load_file(out / "model.safetensors"))


PULLED = re.compile(r"pulled (\d+) bytes in ([\d.]+) s .* from (.*) over .*\(verified, serving\)")


def replica(host, source: str) -> tuple[subprocess.Popen, str]:
    """``netloader serve --from SOURCE`` on ``host``; returns the process and its address."""
    proc = host.popen(
        [sys.executable, "-m", "netloader", "serve", "--from", source, "--host", host.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line + proc.stderr.read()
    return proc, line.split()[-1]


def copy_from(host, address: str, out: Path) -> dict:
    """Pull ``address`` on ``host`` itself into ``out`` and load the file."""
    proc = host.run(
        [sys.executable, "-m", "netloader", "pull", address, "--out", out],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return load_file(out / "model.safetensors")


def test_four_relays_started_together_cost_the_seed_less_than_two_copies(checkpoint, tmp_path):
    """A seed and four clients on equal 200 Mbit/s links, each client naming only the seed:
    they form a chain by themselves, all end bit-exact, and the seed's uplink carried the model
    fewer than two times."""
    folder, tensors = checkpoint
    size = sum(t.nbytes for t in tensors.values())
    names = [f"c{i}" for i in range(4)]
    with NetBed(dict.fromkeys(["seed", *names], "200mbit")) as bed:
        _, seed = serve(bed["seed"], folder)
        sent_before = bed["seed"].tx_bytes()
        relays = [replica(bed[name], seed) for name in names]
        feeders = []
        for proc, _ in relays:
            line = proc.stdout.readline()
            match = PULLED.search(line)
            assert match, line + proc.stderr.read()
            assert int(match[1]) == size
            feeders.append(match[3])
        assert bed["seed"].tx_bytes() - sent_before < 2 * size
        assert feeders.count(seed) == 1, feeders  # the others took theirs from relays
        for name, (_, address) in zip(names, relays, strict=True):
            assert_same(tensors, copy_from(bed[name], address, tmp_path / name))


def test_a_relay_killed_mid_transfer_leaves_the_others_bit_exact(checkpoint, tmp_path):
    """Four clients started together form a chain; one that feeds another is killed once it
    has received a quarter of the model. Everyone else finishes bit-exact, the ones behind it
    from other holders."""
    folder, tensors = checkpoint
    size = sum(t.nbytes for t in tensors.values())
    names = [f"c{i}" for i in range(4)]
    with (
        NetBed(dict.fromkeys(["seed", *names], "100mbit")) as bed,
        open(tmp_path / "seed.log", "w+") as seed_log,
    ):
        _, seed = serve(bed["seed"], folder, log=seed_log)
        base = {name: bed[name].rx_bytes() for name in names}
        relays = {name: replica(bed[name], seed) for name in names}
        received = {name: lambda n=name: bed[n].rx_bytes() - base[n] for name in names}
        _until(lambda: all(received[n]() > 0 for n in names))  # every one joined and pulls
        victim = _a_feeder(seed_log, bed, names)
        _until(lambda: received[victim]() >= size // 4)
        relays[victim][0].kill()
        for name in names:
            if name == victim:
                continue
            proc, address = relays[name]
            line = proc.stdout.readline()
            assert PULLED.search(line), line + proc.stderr.read()
            assert_same(tensors, copy_from(bed[name], address, tmp_path / name))


def _until(condition) -> None:
    """Poll ``condition`` (a counter of a link, a log) until it holds; pytest-timeout bounds it."""
    while not condition():
        time.sleep(0.005)


def _a_feeder(seed_log, bed, names: list[str]) -> str:
    """A client the seed sent another one to, from the seed's log ("sending A to pull from B")."""
    by_address = {bed[n].address: n for n in names}
    seed_log.seek(0)
    feeders = re.findall(r"to pull from ([\d.]+):\d+", seed_log.read())
    assert feeders, "the seed sent nobody to a relay"
    return by_address[feeders[0]]
