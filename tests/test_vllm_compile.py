"""Compile artifacts travel with the weights, in real vLLM (CPU build) in its compile mode.

A seed compiles (inductor C++ kernels and vLLM's AOT function in its own VLLM_CACHE_ROOT) and
keeps serving; a new replica with an empty cache pulls weights and the seed's cache entry, and
vLLM then finds a warm cache: it compiles no kernel of its own. The hostile and mismatched
cases run against real servers without vLLM in tests/test_artifacts.py.
"""

import os
import re
from pathlib import Path

import pytest

from netloader.artifacts import VLLM_TORCH_COMPILE
from netloader_testing.harness import OfflineInstance, Run
from netloader_testing.models import tiny_llama

if os.environ.get("NETLOADER_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (make test installs it)")

PROMPTS = ["hello world", "weights travel from a"]
FETCHED = re.compile(
    r"netloader: rank 0 compile artifacts from peer (\S+): (\d+) files, [\d.]+ MB in [\d.]+ s"
)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("compile")


@pytest.fixture(scope="module")
def token_file(work):
    path = work / "token"
    path.write_text("compile-artifacts-secret-0123\n")
    return str(path)


@pytest.fixture(scope="module")
def seed(work, token_file):
    """A compiling seed with its own cache; it stays up, serving weights and artifacts."""
    model = tiny_llama(work / "model")
    prefix = work / "seed_"
    extra = {"OUTPUT_PREFIX": str(prefix), "TOKEN_FILE": token_file}
    run = Run(PROMPTS, extra=extra, hold=True, compile=True)
    inst = OfflineInstance(model, work / "seed.log", run, cache_root=work / "seed-cache")
    inst.model = model
    inst.result = inst.outputs()
    inst.address = (work / "seed_0.txt").read_text().strip()
    yield inst
    inst.stop()


def entries(cache_root: Path) -> list[Path]:
    base = cache_root / VLLM_TORCH_COMPILE.subdir
    return sorted(p for p in base.iterdir() if not p.name.startswith(".")) if base.exists() else []


def kernels(entry: Path) -> set[str]:
    """The compiled kernels (shared objects) of a cache entry, by path inside it."""
    return {p.relative_to(entry).as_posix() for p in entry.rglob("*.so")}


def test_new_replica_takes_the_seeds_compile_cache_and_compiles_nothing(work, seed, token_file):
    [seed_entry] = entries(work / "seed-cache")
    seed_kernels = kernels(seed_entry)
    assert seed_kernels, "the seed compiled no kernel: is compile mode on?"
    extra = {"SOURCE": [{"device_id": 0, "sources": [seed.address]}], "TOKEN_FILE": token_file}
    run = Run(PROMPTS, extra=extra, compile=True)
    inst = OfflineInstance(seed.model, work / "replica.log", run, cache_root=work / "replica-cache")
    try:
        assert inst.outputs() == seed.result
    finally:
        inst.stop()
    log = inst.log()
    fetched = FETCHED.search(log)
    assert fetched, log[-4000:]
    assert fetched[1] == seed.address and int(fetched[2]) >= len(seed_kernels)
    [entry] = entries(work / "replica-cache")
    assert entry.name == seed_entry.name  # the key vLLM used is the one netloader asked for
    assert kernels(entry) == seed_kernels  # vLLM compiled no kernel of its own
    assert f"{entry.name}/rank_0_0" in log  # vLLM read the AOT function it was given
    assert "weights phase from peer" in log
