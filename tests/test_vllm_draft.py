"""Speculative decoding with real vLLM (CPU build): the draft model travels peer-to-peer too,
from the same SOURCE addresses and through the same port as its target, and falls back to
storage on its own.

The seed's draft holds the target's very weights, so the target accepts every token it drafts.
Each client's own disk holds a draft of the same name and shape with other random weights,
which the target accepts (almost) never. A client's acceptance counts therefore tell where its
draft's weights came from, beside its log. Seed and clients keep their drafts under different
paths and name them alike with DRAFT_MODEL.

An EAGLE head (method "eagle") travels the same way; its acceptance tells nothing here (a
random head gets no token accepted), so that test compares the bytes the client serves with the
seed's.

Instances are shared where possible (each start costs ~30 s on 2 cores); the test that kills a
seed, and the EAGLE test, start instances of their own.
"""

import os
import re

import pytest
from helpers import Proxy, assert_same
from safetensors.torch import load_file

from netloader import Identity, pull
from netloader.sockets import free_port
from netloader_testing.harness import ApiServer, OfflineInstance, Run
from netloader_testing.models import tiny_draft, tiny_eagle_head, tiny_llama

if os.environ.get("NETLOADER_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (make test installs it)")

PROMPTS = ["hello world", "the quick brown fox", "weights travel from a", "a new instance"]
DRAFT = "tiny-draft"  # the draft's name (DRAFT_MODEL) for seeds and clients alike
FALLBACK = "rank 0 could not take its weights from a peer, loading from storage instead"
DRAFT_FALLBACK = "rank 0 could not take its draft weights from a peer, loading from storage instead"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("draft")


@pytest.fixture(scope="module")
def target(work):
    return tiny_llama(work / "tiny-llama")


@pytest.fixture(scope="module")
def seed_draft(work, target):
    return tiny_draft(target, work / "seed" / "draft")  # the target's own weights


@pytest.fixture(scope="module")
def own_draft(work, target):
    return tiny_draft(target, work / "client" / "draft", seed=1)  # other random weights


def speculative(draft) -> dict:
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3}


@pytest.fixture(scope="module")
def plain(target, own_draft, work):
    """vLLM's own loader with the clients' draft: the reference answers, and the acceptance
    that the clients' own draft gets."""
    run = Run(PROMPTS, load_format="auto", speculative=speculative(own_draft))
    inst = OfflineInstance(target, work / "plain.log", run)
    try:
        inst.result, inst.accepted = inst.outputs(), inst.acceptance()
    finally:
        inst.stop()
    assert len(set(inst.result)) == len(PROMPTS)  # the outputs do tell the weights apart
    assert inst.accepted.drafted > 0 and not inst.accepted.all_accepted
    return inst


@pytest.fixture(scope="module")
def seed(target, seed_draft, work):
    """The OpenAI server (what `vllm serve --speculative-config` runs), target and draft from
    storage, serving both."""
    prefix = work / "seed_"
    extra = {"OUTPUT_PREFIX": str(prefix), "DRAFT_MODEL": DRAFT}
    srv = ApiServer(target, work / "seed.log", extra=extra, speculative=speculative(seed_draft))
    try:
        srv.wait_ready()
        srv.address = (work / "seed_0.txt").read_text().strip()
        srv.outputs = [srv.complete(p) for p in PROMPTS]
        yield srv
    finally:
        srv.stop()


def client(target, own_draft, work, name: str, extra: dict) -> OfflineInstance:
    """A client with a draft of its own on its disk (``own_draft``), named as the seed's
    unless ``extra`` says otherwise (``DRAFT_MODEL: None``: by its path)."""
    extra = {k: v for k, v in {"DRAFT_MODEL": DRAFT, **extra}.items() if v is not None}
    run = Run(PROMPTS, extra=extra, speculative=speculative(own_draft))
    return OfflineInstance(target, work / f"{name}.log", run)


def source(address: str) -> dict:
    return {"device_id": 0, "sources": [address]}


def finish(inst: OfflineInstance):
    """Outputs and acceptance of a client that ends by itself (it is stopped then)."""
    try:
        return inst.outputs(), inst.acceptance()
    finally:
        inst.stop()


def paths(inst) -> tuple[list[str], list[str]]:
    """The paths the target's and the draft's weights took (from the weights-phase lines)."""
    return [p.path for p in inst.weights_phases()], [p.path for p in inst.weights_phases("draft")]


def one_warning(log: str, fallback: str) -> str:
    lines = [line for line in log.splitlines() if fallback in line]
    assert len(lines) == 1, log[-4000:]
    assert "WARNING" in lines[0]
    return lines[0]


def test_the_seed_serves_target_and_draft_on_one_port(seed, target, plain):
    log = seed.log()
    assert paths(seed) == (["storage"], ["storage"])
    assert re.search(rf"serving {re.escape(str(target))} \(.*\) on {seed.address}\n", log)
    assert re.search(rf"serving {DRAFT} \(.*\) on {seed.address}\n", log)
    assert log.count("serving peers on") == 1  # one listener for both
    assert seed.outputs == plain.result
    assert seed.acceptance().all_accepted  # the seed's draft is the target itself


def test_a_client_takes_target_and_draft_from_the_peer(target, own_draft, work, seed, plain):
    inst = client(target, own_draft, work, "peer", {"SOURCE": [source(seed.address)]})
    outputs, accepted = finish(inst)
    log, peer = inst.log(), f"peer {seed.address}"
    assert paths(inst) == ([peer], [peer]), log[-4000:]
    assert FALLBACK not in log and DRAFT_FALLBACK not in log
    assert outputs == plain.result
    # The draft it runs is the seed's (the target's weights), not the one on its own disk.
    assert accepted.all_accepted, accepted


def test_a_refused_draft_falls_back_alone(target, own_draft, work, seed, plain):
    """Without DRAFT_MODEL the client names its draft by its path, and the seed holds no draft
    of that name: the client's draft comes from its own disk (and the target accepts as few of
    its tokens as with vLLM's own loader), while its target still comes from the peer."""
    extra = {"SOURCE": [source(seed.address)], "DRAFT_MODEL": None}
    inst = client(target, own_draft, work, "draft_refused", extra)
    outputs, accepted = finish(inst)
    log = inst.log()
    assert paths(inst) == ([f"peer {seed.address}"], ["storage"]), log[-4000:]
    warning = one_warning(log, DRAFT_FALLBACK)
    assert f"server has '{target}', '{DRAFT}', client wants '{own_draft}'" in warning
    assert FALLBACK not in log
    assert outputs == plain.result
    assert accepted == plain.accepted
    assert f"client wants '{own_draft}'" in seed.log()  # the seed logged the refusal too


def test_an_unreachable_source_costs_each_model_its_own_fallback(target, own_draft, work, plain):
    """Each model tries the source and falls back with its own WARNING. (This client also names
    its draft like its target: the draft is then not served separately, which it says once.)"""
    dead = f"127.0.0.1:{free_port()}"
    extra = {"SOURCE": [source(dead)], "MODEL": "same-name", "DRAFT_MODEL": "same-name"}
    inst = client(target, own_draft, work, "unreachable", extra)
    outputs, accepted = finish(inst)
    log = inst.log()
    assert paths(inst) == (["storage"], ["storage"])
    for fallback in (FALLBACK, DRAFT_FALLBACK):
        warning = one_warning(log, fallback)
        assert dead in warning and "cannot connect" in warning
    one_warning(log, "does not serve its draft model separately: its name 'same-name' is taken")
    assert outputs == plain.result
    assert accepted == plain.accepted


def weight_bytes(model) -> int:
    return sum(t.nbytes for t in load_file(model / "model.safetensors").values())


def test_a_seed_killed_between_target_and_draft(target, seed_draft, own_draft, work, plain):
    """A proxy in front of a seed of this test's own kills that seed (SIGKILL, the whole
    instance) when the client opens its first connection after the target's bytes went
    through, which is the draft's: the target came from the peer, the draft falls back."""
    prefix, target_bytes = work / "doomed_", weight_bytes(target)
    extra = {"OUTPUT_PREFIX": str(prefix), "DRAFT_MODEL": DRAFT}
    run = Run(PROMPTS, extra=extra, hold=True, speculative=speculative(seed_draft))
    doomed = OfflineInstance(target, work / "doomed.log", run)

    def kill_before_the_draft(index: int, relayed: int) -> None:
        if relayed >= target_bytes and doomed.alive():
            doomed.kill()

    try:
        assert doomed.outputs() == plain.result
        address = (work / "doomed_0.txt").read_text().strip()
        proxy = Proxy(address, on_connect=kill_before_the_draft)
        try:
            extra = {"SOURCE": [source(proxy.address)]}
            inst = client(target, own_draft, work, "seed_killed", extra)
            outputs, accepted = finish(inst)
        finally:
            proxy.close()
        assert not doomed.alive()
    finally:
        doomed.stop()
    log = inst.log()
    assert paths(inst) == ([f"peer {proxy.address}"], ["storage"]), log[-4000:]
    assert proxy.address in one_warning(log, DRAFT_FALLBACK)
    assert FALLBACK not in log
    assert outputs == plain.result
    assert accepted == plain.accepted


def eagle_instance(target, work, side: str, head, extra: dict) -> OfflineInstance:
    """An instance (kept up) running the EAGLE ``head``, writing its address to a file."""
    extra = {"DRAFT_MODEL": "tiny-eagle", "OUTPUT_PREFIX": str(work / f"eagle_{side}_"), **extra}
    spec = {"method": "eagle", "model": str(head), "num_speculative_tokens": 2}
    run = Run(PROMPTS, extra=extra, hold=True, speculative=spec)
    return OfflineInstance(target, work / f"eagle_{side}.log", run)


def test_an_eagle_head_travels_with_what_its_loading_concluded(target, work, plain):
    """Seed and client run EAGLE heads of the same name and shape with other random weights.
    The client's head comes from the seed: it serves the very bytes the seed serves, and vLLM
    keeps the head's own embeddings, as on the seed (a pull skips the head's load_weights,
    which notes that the checkpoint has them)."""
    seed_head = tiny_eagle_head(target, work / "seed" / "eagle", seed=1)
    own_head = tiny_eagle_head(target, work / "client" / "eagle", seed=2)
    seed = eagle_instance(target, work, "seed", seed_head, {})
    try:
        assert seed.outputs() == plain.result
        address = (work / "eagle_seed_0.txt").read_text().strip()
        inst = eagle_instance(target, work, "client", own_head, {"SOURCE": [source(address)]})
        try:
            assert inst.outputs() == plain.result
            served = (work / "eagle_client_0.txt").read_text().strip()
            heads = [pull(a, Identity("tiny-eagle")).tensors for a in (address, served)]
        finally:
            inst.stop()
    finally:
        seed.stop()
    log = inst.log()
    assert paths(inst) == ([f"peer {address}"], [f"peer {address}"]), log[-4000:]
    assert_same(heads[0], heads[1])
    own = load_file(own_head / "model.safetensors")["fc.weight"]
    assert not heads[1]["model.fc.weight"].equal(own)  # not the head on the client's own disk
    kept = "Detected EAGLE model with distinct embed_tokens weights"
    assert kept in seed.log() and kept in log
