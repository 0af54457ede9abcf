"""netloader between hosts with real, shaped links (network namespaces, see docs/netbed.md).

Skipped where namespaces cannot be made; CI (root) must run them (NETLOADER_REQUIRE_NETNS=1).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_same
from netbed_fixtures import require_netbed
from safetensors.torch import load_file, save_file

from netloader.synthetic import llm_like
from netloader.testing.netbed import NetBed

SHARE = re.compile(r"(\S+:\d+) \((\d+) bytes\)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    require_netbed()
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    folder.mkdir()
    tensors = llm_like(64 << 20, seed=3)
    save_file(tensors, folder / "model.safetensors")
    return folder, tensors


def serve(host, checkpoint: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``netloader serve`` on ``host``; returns the process and its address."""
    proc = host.popen(
        [sys.executable, "-m", "netloader", "serve", checkpoint, "--host", host.address, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
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
