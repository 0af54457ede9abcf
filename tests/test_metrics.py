"""Prometheus metrics: a real Prometheus server scrapes a live netloader server.

The server is a ``ServerProcess`` with ``metrics_port``; Prometheus (Debian's ``prometheus``)
scrapes it every second into a TSDB in a temporary folder, and the test polls Prometheus's HTTP
query API until the values appear (with a deadline). Skipped where prometheus is not installed.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest
from helpers import ServerProcess, all_cases
from netbed_fixtures import require_tool
from prometheus_client.parser import text_string_to_metric_families

from netloader import Identity, Refused, Server, pull
from netloader.sockets import free_port

IDENT = Identity("test-model")


@pytest.fixture
def prometheus(tmp_path) -> Iterator[tuple[str, int]]:
    """A Prometheus that scrapes ``127.0.0.1:<target port>`` every second: its API address
    and the target port, for the test's server to take."""
    require_tool("prometheus", "prometheus")
    target, web = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: netloader\n    static_configs: [{{targets: ['127.0.0.1:{target}']}}]\n"
    )
    proc = subprocess.Popen(
        [
            *("prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"),
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"127.0.0.1:{web}", target
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(api: str, expr: str) -> dict[str, float]:
    """``expr``'s instant value by each series' label values (joined with ','); {} while
    Prometheus is not up yet or has no sample."""
    url = f"http://{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            result = json.load(response)["data"]["result"]
    except OSError:
        return {}
    out = {}
    for series in result:
        labels = {
            k: v for k, v in series["metric"].items() if k not in ("instance", "job", "__name__")
        }
        out[",".join(labels.values())] = float(series["value"][1])
    return out


def wait_for_value(api: str, expr: str, expected: dict[str, float], limit: float = 90.0) -> None:
    deadline = time.monotonic() + limit
    got: dict[str, float] = {}
    while time.monotonic() < deadline:
        got = query(api, expr)
        if got == expected:
            return
        time.sleep(0.2)  # polling an outside server: there is no event to wait on
    pytest.fail(f"Prometheus: {expr} = {got}, expected {expected} within {limit:g} s")


def test_prometheus_reads_served_bytes_and_refusals_by_code(prometheus):
    api, port = prometheus
    with ServerProcess(metrics_port=port) as server:
        size = pull(server.address, IDENT).total_bytes
        for _ in range(2):
            with pytest.raises(Refused):
                pull(server.address, Identity("another-model"))
        wait_for_value(api, "netloader_served_bytes_total", {"test-model": size})
        wait_for_value(api, 'netloader_refusals_total{code="model"}', {"model": 2})
        wait_for_value(api, 'netloader_transfers_total{outcome="verified"}', {"verified": 1})
        wait_for_value(api, "netloader_transfers_active", {"": 0})


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_client_counts_what_it_pulled_and_no_transfer_stays_counted_as_active():
    """In one process (one registry): a pull counts its pulled bytes; once it is over, no
    transfer is counted as active or queued."""
    port = free_port()
    with Server(all_cases(), IDENT, metrics_port=port, max_clients=1).start() as seed:
        before = scrape(port)
        size = pull(seed.address, IDENT).total_bytes
        after = scrape(port)
    pulled = ("netloader_pulled_bytes_total", (("model", "test-model"),))
    assert after[pulled] - before.get(pulled, 0) == size
    assert after[("netloader_transfers_queued", ())] == 0
    assert after[("netloader_transfers_active", ())] == 0
