"""CAPTURE with real vLLM (CPU build): a seed that keeps host copies of its weights serves a
client that answers like vLLM's own loader. The CPU Llama's post-processing replaces every
linear weight (oneDNN handles, empty parameters left behind), so the copies are all that is left
of them to serve. ``reference`` (the CPU default) is what tests/test_vllm.py runs."""

import os

import pytest
import torch

from netloader_testing.harness import OfflineInstance
from netloader_testing.models import tiny_llama, tiny_llama_w8a8

if os.environ.get("NETLOADER_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (make test installs it)")

PROMPTS = ["hello world", "the quick brown fox", "weights travel from a"]


def seed_and_client(model, tmp_path, extra):
    """A seed of ``model`` (loading from storage with ``extra``) and a client pulling from it:
    their answers, the seed's log, the client's weights phases and the seed's address."""
    prefix = tmp_path / "seed_"
    seed = OfflineInstance(
        model,
        tmp_path / "seed.log",
        prompts=PROMPTS,
        extra={**extra, "OUTPUT_PREFIX": str(prefix)},
        hold=True,
    )
    try:
        seeded = seed.outputs()
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
    return seeded, pulled, seed.log(), phases, address


def test_a_seed_with_host_copies_serves_a_client_that_answers_like_vllm(tmp_path):
    """The seed loaded from storage with vLLM's own loader: its answers are vLLM's."""
    model = tiny_llama(tmp_path / "tiny-llama")
    seeded, pulled, seed_log, phases, address = seed_and_client(
        model, tmp_path, {"CAPTURE": "host"}
    )
    assert "CAPTURE=host keeps" in seed_log
    assert [p.path for p in phases] == [f"peer {address}"]
    assert pulled == seeded
    assert "refuse peers" not in seed_log


def test_an_int8_w8a8_seed_serves_its_weights_as_loaded(tmp_path):
    """compressed-tensors W8A8 int8: post-processing re-registers ``weight.t()`` over the
    loaded storage and packs a copy into oneDNN (without AMX): the references captured on the
    CPU stay as loaded, the digests agree, the client answers like the seed."""
    model = tiny_llama_w8a8(tmp_path / "tiny-llama-w8a8")
    if torch.cpu._is_amx_tile_supported():
        skip_unless_vllm_serves(model, tmp_path)
    seeded, pulled, seed_log, phases, address = seed_and_client(model, tmp_path, {})
    assert "CPUInt8ScaledMMLinearKernel" in seed_log  # the int8 path really ran
    assert "refuse peers" not in seed_log and "CAPTURE=" not in seed_log  # references
    assert [p.path for p in phases] == [f"peer {address}"]
    assert pulled == seeded


def skip_unless_vllm_serves(model, tmp_path) -> None:
    """A skip where vLLM's own loader cannot serve ``model``: on a CPU with AMX its int8 kernel
    takes bf16 activations only (float32 fails), and in bf16 the worker died of SIGILL on a VM
    that reports AMX (2026-12-02)."""
    inst = OfflineInstance(model, tmp_path / "plain.log", prompts=PROMPTS, load_format="auto")
    try:
        inst.outputs()
    except RuntimeError as exc:
        lines = [line for line in str(exc).splitlines() if "exit code" in line or "Error:" in line]
        why = lines[0] if lines else "it exited early"
        pytest.skip(f"vLLM's own loader cannot serve W8A8 int8 on this AMX CPU: {why}")
    finally:
        inst.stop()
