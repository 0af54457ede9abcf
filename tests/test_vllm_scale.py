"""Real vLLM (CPU build) at scale: one instance striping its weights over two seeds (and
surviving one seed's death), and two instances started together that form a chain by
themselves, one relaying to the other while it receives.

The model here is larger than test_vllm's (about 42 MB, ten 4 MiB chunks) so that chunks can be
shared between sources, and each seed caps its upload (MAX_UPLOAD_RATE) so that every source is
still sending when the others join.
"""

import os
import re
import signal

import pytest
from helpers import Proxy, kill_after

from netloader_testing.harness import OfflineInstance, WeightsPhase
from netloader_testing.models import tiny_llama

if os.environ.get("NETLOADER_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (make test installs it)")

PROMPTS = ["hello world", "the quick brown fox", "weights travel from a", "a new instance"]
FALLBACK = "could not take its weights from a peer, loading from storage instead"
CAP = "4MB/s"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "llama-42mb"
    return tiny_llama(path, hidden=512, layers=4, intermediate=1024, heads=8)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def plain(model, logs):
    inst = OfflineInstance(model, logs / "plain.log", prompts=PROMPTS, load_format="auto")
    try:
        outputs = inst.outputs()
    finally:
        inst.stop()
    assert len(set(outputs)) == len(PROMPTS)  # the outputs do tell the weights apart
    return outputs


def instance(model, logs, name: str, extra: dict, hold: bool = True) -> OfflineInstance:
    """An instance that writes its address to ``{logs}/{name}_0.txt`` and serves peers."""
    extra = {"OUTPUT_PREFIX": str(logs / f"{name}_"), **extra}
    return OfflineInstance(model, logs / f"{name}.log", prompts=PROMPTS, extra=extra, hold=hold)


def address(logs, name: str) -> str:
    return (logs / f"{name}_0.txt").read_text().strip()


def source(*addresses: str) -> dict:
    return {"device_id": 0, "sources": list(addresses)}


def only_phase(inst: OfflineInstance) -> WeightsPhase:
    phases = inst.weights_phases()
    assert len(phases) == 1, inst.log()[-4000:]
    return phases[0]


@pytest.fixture(scope="module")
def seeds(model, logs, plain):
    """Two seeds from storage, each capped at CAP."""
    insts = [instance(model, logs, f"seed{i}", {"MAX_UPLOAD_RATE": CAP}) for i in range(2)]
    try:
        for inst in insts:
            assert inst.outputs() == plain
        yield [address(logs, f"seed{i}") for i in range(2)]
    finally:
        for inst in insts:
            inst.stop()


def test_a_client_naming_two_seeds_takes_chunks_from_both(model, logs, seeds, plain):
    inst = instance(model, logs, "striped", {"SOURCE": [source(*seeds)]}, hold=False)
    try:
        assert inst.outputs() == plain
    finally:
        inst.stop()
    phase = only_phase(inst)
    shares = sources_of(phase)
    assert phase.path.startswith("peers ") and set(shares) == set(seeds), phase.path
    assert all(gb > 0 for gb in shares.values())
    assert FALLBACK not in inst.log()


def test_a_seed_killed_mid_transfer_costs_no_fallback(model, logs, seeds, plain):
    """The first of two seeds dies (SIGKILL, the whole instance) once 5 MB of its answers went
    out: the client takes what is missing from the other seed and loads no weight from disk."""
    doomed = instance(model, logs, "doomed", {"MAX_UPLOAD_RATE": CAP})
    try:
        assert doomed.outputs() == plain
        kill = kill_after(5 << 20, lambda: os.killpg(doomed.proc.pid, signal.SIGKILL))
        proxy = Proxy(address(logs, "doomed"), kill)
        extra = {"SOURCE": [source(proxy.address, seeds[1])]}
        inst = instance(model, logs, "survivor", extra, hold=False)
        try:
            assert inst.outputs() == plain
        finally:
            inst.stop()
            proxy.close()
        assert not doomed.alive()
    finally:
        doomed.stop()
    log = inst.log()
    assert FALLBACK not in log and "weights phase from storage" not in log, log[-4000:]
    phase = only_phase(inst)
    assert seeds[1] in phase.path, phase.path
    assert "chunk(s) it had in flight go to the other sources" in log


def test_two_instances_started_together_chain_through_each_other(model, logs, seeds, plain):
    """Both new instances name only the same seed. The seed serves one and sends the other to
    it: that one's weights come from the first while the first is still receiving them (or
    once it holds them), and both answer like vLLM's own loader."""
    seed = seeds[1]
    pair = [instance(model, logs, f"fan{i}", {"SOURCE": [source(seed)]}) for i in range(2)]
    try:
        outputs = [inst.outputs() for inst in pair]
        addresses = [address(logs, f"fan{i}") for i in range(2)]
    finally:
        for inst in pair:
            inst.stop()
    assert outputs == [plain, plain]
    shares = [sources_of(only_phase(inst)) for inst in pair]
    assert {seed} in [set(s) for s in shares], shares
    first = [set(s) for s in shares].index({seed})  # the one the seed served itself...
    other = shares[1 - first]
    # ...served the other, alone or beside the seed (a relay found slow while vLLM loads on
    # these 2 cores hands its clients' remaining chunks to the seed: issue 18)
    assert other.get(addresses[first], 0) > 0 and set(other) <= {seed, addresses[first]}, shares
    assert all(FALLBACK not in inst.log() for inst in pair)


def sources_of(phase: WeightsPhase) -> dict[str, float]:
    """{address: GB} from "peers A (x GB), B (y GB)"; from "peer A", {A: 1.0} (one source:
    the log names no share)."""
    if not phase.path.startswith("peers "):
        return {phase.path.removeprefix("peer "): 1.0}
    return {a: float(gb) for a, gb in re.findall(r"(\S+:\d+) \(([\d.]+) GB\)", phase.path)}
