"""CAPTURE with real vLLM (CPU build): a seed that keeps host copies of its weights serves a
client that answers like vLLM's own loader. The CPU Llama's post-processing replaces every
linear weight (oneDNN handles, empty parameters left behind), so the copies are all that is left
of them to serve. ``reference`` (the CPU default) is what tests/test_vllm.py runs."""

import os

import pytest

from netloader_testing.harness import OfflineInstance
from netloader_testing.models import tiny_llama

if os.environ.get("NETLOADER_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (make test installs it)")

PROMPTS = ["hello world", "the quick brown fox", "weights travel from a"]


def test_a_seed_with_host_copies_serves_a_client_that_answers_like_vllm(tmp_path):
    model = tiny_llama(tmp_path / "tiny-llama")
    prefix = tmp_path / "seed_"
    seed = OfflineInstance(
        model,
        tmp_path / "seed.log",
        prompts=PROMPTS,
        extra={"CAPTURE": "host", "OUTPUT_PREFIX": str(prefix)},
        hold=True,
    )
    try:
        seeded = seed.outputs()
        assert "CAPTURE=host keeps" in seed.log()
        address = (tmp_path / "seed_0.txt").read_text().strip()
        client = OfflineInstance(
            model,
            tmp_path / "client.log",
            prompts=PROMPTS,
            extra={"SOURCE": [{"device_id": 0, "sources": [address]}]},
        )
        try:
            pulled = client.outputs()
            phases = client.weights_phases()
        finally:
            client.stop()
    finally:
        seed.stop()
    plain = OfflineInstance(model, tmp_path / "plain.log", prompts=PROMPTS, load_format="auto")
    try:
        reference = plain.outputs()
    finally:
        plain.stop()
    assert [p.path for p in phases] == [f"peer {address}"], client.log()[-3000:]
    assert pulled == seeded == reference
    assert "refuse peers" not in seed.log()
