"""One server, several models (a speculative-decoding target and its draft): each is pulled by
its identity through the same port, refused with the closest reason, withdrawn, found broken
and discovered on its own. Real sockets over 127.0.0.1, servers in this process."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import all_cases, assert_same, big_cases, wait_for

from netloader import ConfigError, Identity, Refused, Server, info, pull
from netloader.sockets import free_port

TARGET = Identity("target-model")
DRAFT = Identity("draft-model")


def draft_tensors() -> dict[str, torch.Tensor]:
    """Other names, shapes and bytes than the target's."""
    gen = torch.Generator().manual_seed(7)
    return {
        "d.weight": torch.randn(64, 48, generator=gen),
        "d.bias": torch.randn(48, generator=gen),
    }


@pytest.fixture
def seed():
    """A server holding both models."""
    server = Server(all_cases(), TARGET, chunk_size=64 << 10).start()
    server.add(draft_tensors(), DRAFT)
    yield server
    server.close()


def test_each_model_is_pulled_by_its_identity_through_one_port(seed):
    assert_same(all_cases(), pull(seed.address, TARGET).tensors)
    assert_same(draft_tensors(), pull(seed.address, DRAFT).tensors)
    # Into existing tensors, each model's manifest is checked against that model's.
    into = {n: torch.zeros_like(t) for n, t in draft_tensors().items()}
    pull(seed.address, DRAFT, into=into)
    assert_same(draft_tensors(), into)

    # The server counts a transfer once it heard the client's verdict, just after the pull.
    def counts() -> tuple[int, int]:
        return seed.model("target-model").served, seed.model("draft-model").served

    wait_for(lambda: counts() == (1, 2), 10, "both models' transfers counted")
    assert seed.served == 3
    assert info(seed.address).identity == TARGET  # the info request names no model: the first


def test_a_model_the_server_does_not_hold_is_refused_naming_those_it_does(seed):
    with pytest.raises(Refused) as err:
        pull(seed.address, Identity("other-model"))
    assert err.value.code == "model"
    assert (
        "model differs: server has 'target-model', 'draft-model', client wants 'other-model'"
        in str(err.value)
    )


def test_a_held_name_in_another_layout_or_with_other_tensors_is_refused_for_that(seed):
    with pytest.raises(Refused) as err:
        pull(seed.address, Identity("draft-model", rank=1, world_size=2))
    assert err.value.code == "layout"
    # The target's tensors asked for under the draft's name: the server checks them against
    # the draft's manifest and refuses (before the client's own check of its answer).
    into = {n: torch.zeros_like(t) for n, t in all_cases().items()}
    with pytest.raises(Refused) as err:
        pull(seed.address, DRAFT, into=into)
    assert err.value.code == "manifest"
    assert "refused: tensor manifest differs" in str(err.value)


def test_a_second_model_of_the_same_name_is_an_error(seed):
    with pytest.raises(ValueError, match="already serves a model named 'draft-model'"):
        seed.add(all_cases(), Identity("draft-model"))


def test_withdrawing_one_model_leaves_the_other_served(seed):
    seed.model("draft-model").withdraw("gone for a test")
    with pytest.raises(Refused) as err:
        pull(seed.address, DRAFT)
    assert err.value.code == "unavailable" and "gone for a test" in str(err.value)
    assert_same(all_cases(), pull(seed.address, TARGET).tensors)
    assert seed.unavailable is None  # the first model's own verdict


def test_a_changed_tensor_stops_only_its_own_model(caplog):
    caplog.set_level(logging.WARNING, "netloader.server")
    target, draft = all_cases(), draft_tensors()
    server = Server(target, TARGET, verify_before_send=True, chunk_size=64 << 10).start()
    server.add(draft, DRAFT)
    try:
        draft["d.weight"][3, 3] += 1.0
        with pytest.raises(Refused) as err:
            pull(server.address, DRAFT)
        assert err.value.code == "changed"
        wait_for(lambda: "refusing further pulls of draft-model" in caplog.text, 10, "verdict")
        assert server.model("draft-model").unavailable
        assert server.unavailable is None
        assert_same(all_cases(), pull(server.address, TARGET).tensors)
    finally:
        server.close()


def test_a_relay_relays_each_model_and_is_discovered_per_model():
    """A relay pulls both models from the seed through one server of its own; the seed then
    counts it as a member of each model, and sends a second relay to it for each."""
    seed = Server(big_cases(), TARGET).start()
    seed.add(draft_tensors(), DRAFT)
    first, second = (relay_for_both() for _ in range(2))
    try:
        for relay in (first, second):
            for identity in (TARGET, DRAFT):
                pull([seed.address], identity, relay=relay)
        for name in ("target-model", "draft-model"):
            members = seed.model(name).peers.wait_for(all_hold(2), timeout=10)
            assert [m.address for m in members] == [first.address, second.address], name
            assert all(m.holds for m in members)
        # The second relay took both models from the first, not from the seed.
        again = relay_for_both()
        results = [pull([seed.address], i, relay=again) for i in (TARGET, DRAFT)]
        assert [list(r.sources) for r in results] == [[second.address]] * 2
        assert_same(draft_tensors(), pull(second.address, DRAFT).tensors)
        again.close()
    finally:
        for server in (first, second, seed):
            server.close()


def all_hold(count: int):
    """Members settled: ``count`` of them, each holding the model."""
    return lambda members: len(members) == count and all(m.holds for m in members)


def relay_for_both() -> Server:
    relay = Server(None, TARGET).start()
    relay.add(None, DRAFT)
    return relay


def test_a_relay_whose_draft_pull_fails_withdraws_only_the_draft():
    seed = Server(all_cases(), TARGET).start()
    relay = relay_for_both()
    try:
        pull([seed.address], TARGET, relay=relay)
        with pytest.raises(Refused):  # the seed holds no draft
            pull([seed.address], DRAFT, relay=relay)
        with pytest.raises(Refused) as err:
            pull(relay.address, DRAFT)
        assert err.value.code == "unavailable" and "its own pull failed" in str(err.value)
        assert_same(all_cases(), pull(relay.address, TARGET).tensors)
    finally:
        relay.close()
        seed.close()


def test_pulling_through_a_relay_that_has_no_entry_for_the_model_is_a_config_error():
    relay = Server(None, TARGET).start()
    try:
        with pytest.raises(ConfigError, match="serves no model named 'draft-model'"):
            pull([f"127.0.0.1:{free_port()}"], DRAFT, relay=relay)
    finally:
        relay.close()
