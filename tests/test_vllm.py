"""The vLLM plugin with real vLLM (CPU build): peer loading, fallbacks, config, chaining.

Instances are shared across tests where possible (each start costs ~25 s on 2 cores); no test
stops or breaks a shared one, so the tests pass in any order and alone. The test that kills a
seed mid-transfer starts a seed of its own.
"""

import json
import os
import re
import signal
import urllib.request
from pathlib import Path

import pytest
from helpers import Proxy, kill_after
from prometheus_client.parser import text_string_to_metric_families

from netloader.sockets import free_port
from netloader.transport import engine
from netloader_testing.harness import ApiServer, OfflineInstance
from netloader_testing.models import tiny_llama

# CI sets NETLOADER_REQUIRE_VLLM=1, so that a missing vLLM fails instead of skipping.
if os.environ.get("NETLOADER_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (make test installs it)")

PROMPTS = ["hello world", "the quick brown fox", "weights travel from a", "a new instance"]
PEER = re.compile(
    r"netloader: rank (\d+) weights phase from peer (\S+) over (\S+): [\d.]+ GB in [\d.]+ s "
    r"\([\d.]+ GB/s\)"
)
STORAGE = re.compile(r"netloader: rank (\d+) weights phase from storage: [\d.]+ GB in [\d.]+ s")
FALLBACK = "could not take its weights from a peer, loading from storage instead"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


def read_address(prefix, rank: int) -> str:
    return (prefix.parent / f"{prefix.name}{rank}.txt").read_text().strip()


@pytest.fixture(scope="module")
def seed(model, logs):
    """TP1 seed: the OpenAI server (what `vllm serve` runs), loading from disk, serving peers."""
    prefix = logs / "seed_"
    srv = ApiServer(model, logs / "seed.log", extra={"OUTPUT_PREFIX": str(prefix)})
    srv.wait_ready()
    srv.address = read_address(prefix, 0)
    srv.outputs = [srv.complete(p) for p in PROMPTS]
    yield srv
    srv.stop()


def plain_outputs(model, logs, tp):
    """The reference: vLLM's own default loader, no netloader at all."""
    log = logs / f"plain_tp{tp}.log"
    inst = OfflineInstance(model, log, prompts=PROMPTS, load_format="auto", tp=tp)
    try:
        return inst.outputs()
    finally:
        inst.stop()


@pytest.fixture(scope="module")
def plain(model, logs):
    return plain_outputs(model, logs, tp=1)


@pytest.fixture(scope="module")
def plain_tp2(model, logs):
    """TP2 results may differ from TP1's (sharded matmuls sum in another order): TP2 instances
    are compared with the default loader in the same layout."""
    return plain_outputs(model, logs, tp=2)


def client(model, logs, name, extra, tp=1, hold=False):
    return OfflineInstance(
        model, logs / f"{name}.log", prompts=PROMPTS, extra=extra, tp=tp, hold=hold
    )


def source(*addresses, device_id=0):
    return {"device_id": device_id, "sources": list(addresses)}


@pytest.fixture(scope="module")
def peer_client(model, logs, seed):
    """TP1 client pulling from the seed; it stays up to serve the next instance. Its SOURCE is
    the one-string form with a name (rank 0 takes from every address of localhost at the
    seed's port), and it serves metrics."""
    prefix = logs / "client_"
    port = seed.address.rsplit(":", 1)[1]
    metrics_port = free_port()
    extra = {"SOURCE": f"localhost:{port}", "OUTPUT_PREFIX": str(prefix)}
    inst = client(model, logs, "client", extra | {"METRICS_PORT": metrics_port}, hold=True)
    inst.result = inst.outputs()
    inst.address = read_address(prefix, 0)
    inst.metrics_port = metrics_port
    yield inst
    inst.stop()


def test_seed_writes_its_address_and_serves_from_storage(seed):
    assert re.fullmatch(r"127\.0\.0\.1:\d+", seed.address)
    assert STORAGE.search(seed.log())
    assert f"rank 0 serving peers on {seed.address}" in seed.log()
    assert "no SOURCE for rank 0, loading from storage" in seed.log()


def test_tp1_client_loads_from_peer_and_answers_identically(peer_client, seed, plain):
    match = PEER.search(peer_client.log())
    assert match and match.group(2) == seed.address, peer_client.log()[-3000:]
    assert FALLBACK not in peer_client.log()
    assert peer_client.result == seed.outputs == plain
    assert len(set(plain)) == len(PROMPTS)  # the outputs do tell the weights apart


def test_client_counts_its_peer_load_in_its_metrics(peer_client):
    """The client's METRICS_PORT (rank 0: the port itself) says it loaded from a peer, how
    long the weights phase took, and what it pulled."""
    url = f"http://127.0.0.1:{peer_client.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.read().decode())
            for s in family.samples
        }
    assert samples[("netloader_loads_total", (("path", "peer"),))] == 1
    assert samples[("netloader_weights_phase_seconds_count", (("path", "peer"),))] == 1
    pulled = [v for (name, _), v in samples.items() if name == "netloader_pulled_bytes_total"]
    assert pulled and pulled[0] > 0


def test_client_serves_a_third_instance_and_config_file_wins(
    model, logs, peer_client, plain, tmp_path
):
    """Chaining: the client that loaded from a peer is itself a source. The inline SOURCE points
    nowhere; CONFIG_FILE's SOURCE (which takes priority) points at the client."""
    config = tmp_path / "netloader.json"
    config.write_text(json.dumps({"SOURCE": [source(peer_client.address)]}))
    extra = {"SOURCE": [source(f"127.0.0.1:{free_port()}")], "CONFIG_FILE": str(config)}
    third = client(model, logs, "third", extra)
    assert third.outputs() == plain
    third.stop()
    match = PEER.search(third.log())
    assert match and match.group(2) == peer_client.address, third.log()[-3000:]


def expect_fallback(inst, plain, *reason_fragments):
    assert inst.outputs() == plain
    inst.stop()
    log = inst.log()
    warnings = [line for line in log.splitlines() if FALLBACK in line]
    assert len(warnings) == 1, log[-4000:]  # one WARNING with the reason
    assert "WARNING" in warnings[0]
    for fragment in reason_fragments:
        assert fragment in warnings[0], warnings[0]
    assert STORAGE.search(log) and not PEER.search(log)


def test_fallback_when_source_unreachable(model, logs, plain):
    dead = f"127.0.0.1:{free_port()}"
    inst = client(model, logs, "unreachable", {"SOURCE": [source(dead)]})
    expect_fallback(inst, plain, dead, "cannot connect")


def test_fallback_when_model_differs(model, logs, seed, plain):
    inst = client(
        model, logs, "model", {"SOURCE": [source(seed.address)], "MODEL": "another-model"}
    )
    expect_fallback(inst, plain, "model differs", "'another-model'")
    assert "refused" in seed.log() and "'another-model'" in seed.log()  # the seed logged it too


@pytest.fixture(scope="module")
def token_file(logs):
    path = logs / "token"
    path.write_text("tp2-shared-secret-0123456789\n")
    return str(path)


@pytest.fixture(scope="module")
def seed_tp2(model, logs, token_file):
    """TP2 seed that requires a token (TOKEN_FILE): its peers below must present it."""
    prefix = logs / "seed2_"
    # MOONCAKE on: over Mooncake's tcp protocol (no RDMA here) auto would not offer it.
    extra = {"OUTPUT_PREFIX": str(prefix), "TOKEN_FILE": token_file, "MOONCAKE": "on"}
    inst = client(model, logs, "seed_tp2", extra, tp=2, hold=True)
    inst.result = inst.outputs()
    inst.addresses = [read_address(prefix, r) for r in (0, 1)]
    yield inst
    inst.stop()


def test_tp2_each_rank_pulls_from_matching_seed_rank(model, logs, seed_tp2, token_file, plain_tp2):
    sources = [source(seed_tp2.addresses[r], device_id=r) for r in (0, 1)]
    inst = client(model, logs, "client_tp2", {"SOURCE": sources, "TOKEN_FILE": token_file}, tp=2)
    outputs = inst.outputs()
    inst.stop()
    pulled = {int(m.group(1)): m.group(2) for m in PEER.finditer(inst.log())}
    assert pulled == {0: seed_tp2.addresses[0], 1: seed_tp2.addresses[1]}, inst.log()[-4000:]
    # A seed with MOONCAKE on offers it where it is installed (make test installs it).
    over = {m.group(3) for m in PEER.finditer(inst.log())}
    assert over == {"mooncake" if engine("mooncake").absent() is None else "tcp"}, over
    assert outputs == seed_tp2.result == plain_tp2
    secret = Path(token_file).read_text().strip()
    assert secret not in inst.log() and secret not in seed_tp2.log()
    assert "without a token" not in seed_tp2.log()


def test_tp2_seed_matches_plain_loader(seed_tp2, plain_tp2):
    """The TP2 seed, which loaded from storage through netloader, answers like vLLM's own
    loader in the same layout."""
    assert {m.group(1) for m in STORAGE.finditer(seed_tp2.log())} == {"0", "1"}
    assert seed_tp2.result == plain_tp2
    assert len(set(plain_tp2)) == len(PROMPTS)


def test_fallback_when_tensor_parallel_size_differs(model, logs, seed_tp2, plain, token_file):
    extra = {"SOURCE": [source(seed_tp2.addresses[0])], "TOKEN_FILE": token_file}
    inst = client(model, logs, "tp_differs", extra)
    expect_fallback(inst, plain, "parallel layout differs", "tp=2", "tp=1")


def test_bad_config_stops_startup(model, logs):
    inst = client(model, logs, "bad_config", {"INT8_CACHE": "sometimes"})
    assert inst.wait_exit() != 0
    assert "INT8_CACHE = 'sometimes' is not allowed; use one of hbm, dram, no" in inst.log()


def test_fallback_when_seed_killed_while_sending(model, logs, plain):
    """A relay in front of a seed (this test's own) kills that whole instance (SIGKILL) once
    1 MB of its answer went through: the client is mid-transfer, falls back, and still answers
    right."""
    prefix = logs / "doomed_"
    doomed = client(model, logs, "doomed_seed", {"OUTPUT_PREFIX": str(prefix)}, hold=True)
    try:
        assert doomed.outputs() == plain
        address = read_address(prefix, 0)
        proxy = Proxy(
            address, kill_after(1 << 20, lambda: os.killpg(doomed.proc.pid, signal.SIGKILL))
        )
        inst = client(model, logs, "seed_killed", {"SOURCE": [source(proxy.address)]})
        try:
            expect_fallback(inst, plain, proxy.address)
        finally:
            proxy.close()
        assert not doomed.alive()
        assert proxy.relayed > 1 << 20  # weight bytes were flowing when the seed died
    finally:
        doomed.stop()
