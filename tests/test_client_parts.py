"""The client's parts on their own: the scheduler's list of sources and errors, how a request
is built for each source, and (with real servers over 127.0.0.1) that a relay sent to a peer
starts that peer instead of asking its source again, however slowly its log line is written."""

from __future__ import annotations

import logging
import time

import torch
from helpers import assert_same, big_cases

from netloader import AllSourcesFailed, Identity, PeerClosed, Server, SourceUnreachable, pull
from netloader.client.control import Endpoint
from netloader.client.schedule import Sources
from netloader.client.transfer import Requests
from netloader.client.transports import Offer

IDENT = Identity("parts-model")


def endpoints(*texts: str) -> list[Endpoint]:
    return [Endpoint.parse(t) for t in texts]


def failed(source: str) -> PeerClosed:
    exc = PeerClosed(f"{source} went away")
    exc.source = source
    return exc


def test_errors_come_in_the_order_the_sources_were_given_and_named_peers_last():
    sources = Sources(endpoints("a:1", "b:2", "c:3"))
    for text in ("peer:9", "c:3", "a:1", "b:2"):  # the order they happened to fail in
        sources.errors.append(failed(text))
    error = sources.failure()
    assert isinstance(error, AllSourcesFailed)
    assert [e.source for e in error.errors] == ["a:1", "b:2", "c:3", "peer:9"]


def test_a_single_error_is_raised_as_itself_and_none_says_so():
    sources = Sources(endpoints("a:1"))
    assert str(sources.failure()) == "no source delivered"
    sources.failed_before(Endpoint.parse("a:1"), SourceUnreachable("cannot connect"))
    error = sources.failure()
    assert isinstance(error, SourceUnreachable) and error.source == "a:1"


def test_named_peers_go_before_the_rest_of_the_list_once_each():
    sources = Sources(endpoints("a:1", "b:2"))
    assert sources.take() == Endpoint.parse("a:1")
    sources.put_first(endpoints("p:5", "b:2", "q:6", "r:7"), known={"r:7"})
    assert [e.text for e in sources.waiting] == ["p:5", "q:6", "b:2"]


def requests(advertise: str | None) -> Requests:
    offer = Offer(("tcp",), torch.device("cpu"))
    return Requests(IDENT, None, 2, offer, advertise)


def test_only_a_member_request_of_a_relay_with_placement_names_it_and_what_to_avoid():
    source = Endpoint.parse("a:1")
    member = requests("10.0.0.7:7000").to(source, None, member=True, avoid=["p:5"])
    assert (member.placement, member.advertise, member.avoid) == (True, "10.0.0.7:7000", ["p:5"])
    other = requests("10.0.0.7:7000").to(source, None, member=False, avoid=["p:5"])
    assert (other.placement, other.advertise, other.avoid) == (False, None, [])
    no_relay = requests(None).to(source, None, member=True, avoid=["p:5"])
    assert (no_relay.placement, no_relay.advertise, no_relay.avoid) == (False, None, [])
    assert member.transports == ["tcp"] and member.streams == 2


class SlowLine(logging.Handler):
    """A log line that takes a while to write (a slow terminal or disk)."""

    def emit(self, record: logging.LogRecord) -> None:
        if "sends this client to" in record.getMessage():
            time.sleep(0.2)


def test_a_relay_sent_to_a_peer_starts_it_first_and_does_not_ask_its_source_again(caplog):
    """The seed sends the second relay to the first. While the line saying so is written, the
    scheduler must wait for the peers it names: start them before the rest of the list (here
    another seed), and not take the source for a dead end and ask it again (a third relay,
    listing the seed alone)."""
    seed = Server(big_cases(), IDENT).start()
    # 16 chunks, capped: both take part before the last lands (in about 0.8 s together).
    other = Server(big_cases(), IDENT, max_upload_rate=40e6).start()
    first = Server(None, IDENT, max_upload_rate=40e6).start()
    second, third = Server(None, IDENT).start(), Server(None, IDENT).start()
    slow = SlowLine()
    logging.getLogger("netloader.client").addHandler(slow)
    try:
        pull([seed.address], IDENT, relay=first)
        with caplog.at_level(logging.INFO, logger="netloader.client"):
            result = pull([seed.address, other.address], IDENT, relay=second)
        assert_same(big_cases(), result.tensors)
        assert "sends this client to" in caplog.text
        assert "again where to pull from" not in caplog.text
        assert list(result.sources) == [first.address, other.address]
        # With the seed alone listed, nothing else is busy while the line is written.
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="netloader.client"):
            pull([seed.address], IDENT, relay=third)
        assert "sends this client to" in caplog.text
        assert "again where to pull from" not in caplog.text
    finally:
        logging.getLogger("netloader.client").removeHandler(slow)
        for server in (third, second, first, other, seed):
            server.close()
