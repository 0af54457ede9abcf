"""Fan-out when one peer is slow: the board's endgame copies, the placement policy's choices
(slow relative to what feeds a member, moves, no cycles), and both over real, shaped links.

The policy tests drive ``Relays`` with a clock of their own (it reads no other); the link
tests run real ``netloader serve`` processes in network namespaces (skipped without them).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from helpers import assert_same
from netbed_fixtures import SHARE, bed_checkpoint

from netloader.board import PATIENCE, Board
from netloader.server import relays as relays_module
from netloader.server.relays import SELF, Placement, Relays
from netloader_testing.netbed import NetBed

# --- the board ----------------------------------------------------------------------------


class Clock:
    """A clock the tests move: chunks age without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


CLOCK = Clock()


def sized(n: int) -> Board:
    return Board(n, lambda i: 100, clock=CLOCK)


def test_no_copy_before_a_chunk_is_late():
    board = sized(3)
    assert [board.take("a", copies=True) for _ in range(3)] == [0, 1, 2]
    assert board.take("b", copies=True) is None  # nothing landed: nothing is late yet
    CLOCK.now += 1
    board.done(0, "a")  # the usual time: 1 s
    assert board.take("b", copies=True) is None  # 1 and 2 were asked only 1 s ago
    assert board.refetched == 0


def test_a_late_chunk_is_copied_and_the_first_verified_copy_wins():
    board = sized(3)
    assert board.take("slow", copies=True) == 0
    assert board.take("fast", copies=True) == 1
    CLOCK.now += 1
    board.done(1, "fast")  # the usual time from asking to landing: 1 s
    CLOCK.now += 3 * PATIENCE  # chunk 0 is now late
    assert board.take("fast", copies=True) == 0  # a copy of the late chunk, before 2
    assert board.take("fast", copies=True) == 2
    assert board.refetched == board.copied == 100
    # The late source's answer begins: it may not land in place (another copy is asked).
    assert not board.claim(0, "slow")
    assert board.claim(2, "fast")  # nobody else was asked for 2
    board.done(2, "fast")
    put = []
    assert board.commit(0, "fast", lambda: put.append("fast"))
    assert not board.commit(0, "slow", lambda: put.append("slow"))  # dropped: it lost
    assert put == ["fast"] and board.complete
    assert board.delivered == {"fast": 300}


def test_a_chunk_landing_in_place_or_at_a_source_without_claims_is_never_copied():
    board = sized(3)
    assert board.take("a", copies=True) == 0
    assert board.take("plain") == 1  # a stream that does not land through claims
    assert board.take("a", copies=True) == 2
    assert board.claim(2, "a")
    CLOCK.now += 1
    board.done(2, "a")  # the usual time: 1 s
    assert board.claim(0, "a")  # landing in place from now on
    CLOCK.now += 3 * PATIENCE  # 0 and 1 are late
    assert board.take("b", copies=True) is None
    assert board.take("plain") is None


def test_a_failed_source_gives_back_only_the_chunks_nobody_else_has():
    board = sized(3)
    assert [board.take("slow", copies=True) for _ in range(2)] == [0, 1]
    assert board.take("fast", copies=True) == 2
    CLOCK.now += 1
    board.done(2, "fast")
    CLOCK.now += 3 * PATIENCE
    assert board.take("fast", copies=True) == 0  # a copy of the late chunk
    assert board.release("slow") == [1]  # 0 is still in flight at "fast"
    assert board.take("fast", copies=True) == 1


def test_a_retired_source_gets_no_more_chunks_and_its_streams_are_told():
    board = sized(4)
    told = []
    board.when_retired("slow", lambda: told.append("cut"))
    assert board.take("slow", copies=True) == 0
    board.retire("slow")
    assert told == ["cut"] and board.take("slow", copies=True) is None
    board.when_retired("slow", lambda: told.append("late"))  # a stream opened after: at once
    assert told == ["cut", "late"]
    assert board.release("slow") == [0]  # once its streams ended
    assert board.take("fast", copies=True) == 0


def test_a_waiting_stream_wakes_when_a_chunk_becomes_late():
    board = sized(2)
    board.take("slow", copies=True)
    board.take("fast", copies=True)
    CLOCK.now += 1
    board.done(1, "fast")
    assert board.take("fast", copies=True) is None  # chunk 0 is not late yet
    CLOCK.now += 3 * PATIENCE
    started = time.monotonic()
    board.wait_for_work(30, "fast")  # returns at once: chunk 0 is late
    assert time.monotonic() - started < 10
    assert board.take("fast", copies=True) == 0


# --- the placement policy -----------------------------------------------------------------


def fleet(n: int) -> tuple[Relays, Clock, list[str], list[Placement]]:
    clock = Clock()
    relays = Relays("m", clock=clock)
    names = [f"10.0.0.{i}:1" for i in range(1, n + 1)]
    told: list[Placement] = []
    for name in names:
        relays.join(name, [])
        relays.watch(name, notify=told.append)
    return relays, clock, names, told


def report(relays: Relays, clock: Clock, rates: dict[str, float], seconds: int) -> list:
    """Every member reports once a second at its rate (bytes/s); the moves made."""
    moves = []
    held = {m.address: float(m.held) for m in relays.members()}
    for _ in range(seconds):
        clock.now += 1
        for name, rate in rates.items():
            held[name] += rate
            moves += relays.progress(name, int(held[name]))
    return moves


def test_relays_started_together_form_a_chain_and_equal_rates_move_nobody():
    relays, clock, names, told = fleet(4)
    assert [m.upstreams for m in relays.members()] == [[SELF], *([n] for n in names[:-1])]
    assert report(relays, clock, dict.fromkeys(names, 25e6), 5) == []
    assert relays.slow() == [] and told == []


def test_a_member_far_behind_what_feeds_it_is_slow_and_its_downstream_moves_ahead():
    """seed -> a -> b (slow) -> c -> d: b receives at a tenth of a's rate; c and d keep pace
    with b, so they are not slow themselves. c, fed only by slow b, is given a (the nearest
    earlier node that is neither slow nor fed only by slow ones) instead of b; then b, which
    feeds nobody now but shares a's uplink with c, is set aside behind d (the last node,
    whose uplink nobody needs)."""
    relays, clock, (a, b, c, d), told = fleet(4)
    rates = {a: 25e6, b: 2.5e6, c: 2.5e6, d: 2.5e6}
    moves = report(relays, clock, rates, 3)  # b is 2 s of a's rate behind a at the third
    assert relays.slow() == [b]
    assert moves == [
        (c, Placement(here=False, peers=(a,), drop=(b,))),
        (b, Placement(here=False, peers=(d,), drop=(a,))),
    ]
    assert [p for p in told] == [m[1] for m in moves]
    upstreams = {m.address: m.upstreams for m in relays.members()}
    assert upstreams == {a: [SELF], c: [a], d: [c], b: [d]}  # b comes last in the order
    assert [m.address for m in relays.members()] == [a, c, d, b]
    # c speeds up: d now keeps pace with a fast upstream; nobody else moves.
    rates[c] = rates[d] = 25e6
    assert report(relays, clock, rates, 4) == []


def test_a_member_that_received_nothing_while_its_upstream_did_is_slow():
    """Holding nothing is no excuse once a second of reports shows its upstream far ahead:
    b, at a tenth of a's rate, has not verified its first chunk yet (judged at the third)."""
    relays, clock, (a, b, c), _ = fleet(3)
    moves = report(relays, clock, {a: 60e6, b: 0, c: 0}, 3)
    assert relays.slow() == [b]
    assert moves[0] == (c, Placement(here=False, peers=(a,), drop=(b,)))


def test_a_member_placed_again_is_judged_afresh():
    """b's upstream vanished; b received nothing for 2 s, then came back and was placed
    again (at the seed): its stalled reports are forgotten, so c behind it is not moved."""
    relays, clock, (a, b, c), told = fleet(3)
    e = "10.0.0.9:1"
    relays.join(e, [a, b, c])  # fed by the seed: the others' pace is measured
    report(relays, clock, dict.fromkeys([a, b, c, e], 25e6), 2)
    relays.leave(a)
    clock.now += 2  # nothing arrives at b (nor c) meanwhile
    assert relays.join(b, [a]) == Placement(here=True)
    assert report(relays, clock, dict.fromkeys([b, c, e], 25e6), 1) == []
    assert relays.slow() == [] and told == []


def test_a_member_placed_again_here_is_measured_by_its_own_reports():
    """b came back after its upstream died and is served by the seed now, which meters what it
    sends b in the new session (from 0); b still reports how much it holds (its first
    connection stays open). Its reports alone measure it, so fast b is not slow and c behind
    it is not moved (a meter sampled between b's reports once made b's rate negative)."""
    relays, clock, (a, b, c), told = fleet(3)
    e = "10.0.0.9:1"
    relays.join(e, [a, b, c])
    report(relays, clock, dict.fromkeys([a, b, c, e], 25e6), 2)
    relays.leave(a)
    assert relays.join(b, [a]) == Placement(here=True)
    since, held, moves = clock.now, {m.address: m.held for m in relays.members()}, []
    relays.watch(b, meter=lambda: int((clock.now - since) * 25e6))
    for step in range(1, 9):  # c and e report every 0.5 s, b every second
        clock.now += 0.5
        for name in (b, c, e) if step % 2 else (c, e):
            held[name] += int(25e6 * (1 if name == b else 0.5))
            moves += relays.progress(name, held[name])
    assert moves == [] and relays.slow() == [] and told == []


def test_nobody_new_is_placed_behind_a_slow_member():
    relays, clock, (a, b, c), _ = fleet(3)
    report(relays, clock, {a: 25e6, b: 2.5e6, c: 2.5e6}, 3)  # c is moved at the third
    late = "10.0.0.9:1"
    placement = relays.join(late, [])
    assert relays.slow() == [b]  # set aside behind c: still slow, so not an upstream
    assert placement.peers == (c,)  # c is fed by a now


def test_a_member_fed_by_the_seed_is_judged_against_the_median_of_the_others():
    relays, clock, (a, b, c), _ = fleet(3)
    relays.join("10.0.0.7:1", [b])  # fed by the seed or a, not b
    rates = {a: 25e6, b: 25e6, c: 25e6, "10.0.0.7:1": 25e6}
    report(relays, clock, rates, 5)
    assert relays.slow() == []


def test_a_member_behind_a_slow_first_one_is_moved_to_the_seed():
    """A member is moved only to nodes that joined before it (no cycle): behind the only
    earlier member, which is slow, it is given the seed itself."""
    relays, clock, (a, b), told = fleet(2)
    # b is fed by a; a is slow against the others' median only if there are others: add two
    # fast members fed by the seed to make a the slow one.
    extra = ["10.0.0.8:1", "10.0.0.9:1"]
    for e in extra:
        relays.join(e, [a, b])
    moves = report(relays, clock, {a: 1e6, b: 1e6, extra[0]: 25e6, extra[1]: 25e6}, 3)
    assert relays.slow() == [a]
    # a is the only earlier member: the seed, instead of a; a is set aside behind the last
    assert moves == [
        (b, Placement(here=True, drop=(a,))),
        (a, Placement(here=False, peers=(extra[1],))),
    ]
    assert len(told) == 2


def test_a_chain_grows_no_deeper_than_half_the_models_chunks():
    """A model of 40 chunks: relays started together chain 20 deep (each hop delays what
    follows by about two chunks' time); the 21st branches off at the top (the seed), and the
    22nd follows it there, a second chain."""
    relays = Relays("m", clock=Clock())
    relays.serves(4 << 20, 40)
    names = [f"10.0.1.{i}:1" for i in range(1, 23)]
    placements = [relays.join(name, []) for name in names]
    assert [p.peers for p in placements[:20]] == [(), *((n,) for n in names[:19])]
    assert placements[20] == Placement(here=True)
    assert placements[21].peers == (names[20],)


def test_two_members_behind_one_uplink_are_judged_by_their_share_of_it(monkeypatch):
    """seed -> a -> (b, e), seed -> c -> d (chains of 2 at most): b and e each take a little
    under half of a's rate, their share of a's uplink; neither is slow, nobody moves."""
    monkeypatch.setattr(relays_module, "MIN_DEPTH", 1)
    clock = Clock()
    relays = Relays("m", clock=clock)
    relays.serves(4 << 20, 4)  # chains 2 deep at most
    a, b, c, d, e = (f"10.0.2.{i}:1" for i in range(1, 6))
    told: list[Placement] = []
    for name in (a, b, c, d, e):
        relays.join(name, [])
        relays.watch(name, notify=told.append)
    upstreams = {m.address: m.upstreams for m in relays.members()}
    assert upstreams == {a: [SELF], b: [a], c: [SELF], d: [c], e: [a]}
    rates = {a: 25e6, b: 11e6, c: 25e6, d: 25e6, e: 11e6}
    assert report(relays, clock, rates, 4) == []
    assert relays.slow() == [] and told == []


def test_no_progress_is_judged_only_once_a_chunk_was_due():
    """b receives nothing while a, far ahead, receives at 25 MB/s: with 20 MB chunks, half
    of a's pace brings b a chunk in 1.6 s, so b is not slow after 1 s of reports, and is
    after 2 s."""
    relays, clock, (a, b), _ = fleet(2)
    relays.serves(20_000_000, 64)
    relays.progress(a, 300_000_000)  # a head start: b is not merely waiting for a
    relays.progress(b, 0)
    report(relays, clock, {a: 25e6, b: 0}, 1)
    assert relays.slow() == []
    report(relays, clock, {a: 25e6, b: 0}, 1)
    assert relays.slow() == [b]


def test_a_straggler_is_judged_against_those_that_finished():
    """a -> b -> c took the model at 25 MB/s and hold it; e, fed by the seed, takes 2.5 MB/s.
    Nobody else pulls now, but e is slow against the others' last rates, so a newcomer is
    placed behind c, not e."""
    relays, clock, (a, b, c), _ = fleet(3)
    e = "10.0.0.9:1"
    relays.join(e, [a, b, c])
    report(relays, clock, {a: 25e6, b: 25e6, c: 25e6, e: 2.5e6}, 3)
    for name in (a, b, c):
        relays.holds(name)
    assert relays.slow() == [e]
    assert relays.join("10.0.0.10:1", []).peers == (c,)


def test_members_that_received_nothing_yet_say_nothing_of_the_seeds_pace():
    """seed -> a -> b -> c -> d is starting: a takes 25 MB/s, b, c and d wait (nothing yet,
    b within its request window of a). e, fed by the seed, takes 2.5 MB/s: slow against a,
    the only one receiving, whatever the three waiting ones."""
    relays, clock, (a, b, c, d), _ = fleet(4)
    relays.serves(20_000_000, 64)
    e = "10.0.0.9:1"
    relays.join(e, [a, b, c, d])
    report(relays, clock, {a: 25e6, b: 0, c: 0, d: 0, e: 2.5e6}, 3)
    assert relays.slow() == [e]


# --- over real links ----------------------------------------------------------------------

PULLED = re.compile(r"pulled (\d+) bytes in [\d.]+ s \([\d.]+ GB/s\) from (.*) over ")
AGAIN = re.compile(r"(\d+) bytes fetched again")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return bed_checkpoint(tmp_path_factory, 48 << 20, seed=5)


def serve(host, *args, log=None) -> tuple[subprocess.Popen, str]:
    proc = host.popen(
        [sys.executable, "-m", "netloader", "serve", *args, "--host", host.address],
        stdout=subprocess.PIPE,
        stderr=log or subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc, line.split()[-1]


def test_a_client_finishes_from_the_fast_source_while_the_slow_one_holds_chunks(checkpoint):
    """Two sources holding the model, one at a tenth of the other's rate, the slow one named
    first: the fast one carries most chunks, and the chunks still waiting at the slow one at
    the end are asked again from the fast one (``fetched again``), bit-exact."""
    folder, tensors = checkpoint
    hosts = {"fast": "200mbit", "slow": "20mbit", "client": "1gbit"}
    with NetBed(hosts) as bed:
        slow = serve(bed["slow"], folder, "--chunk-size", "1MiB")[1]
        fast = serve(bed["fast"], folder, "--chunk-size", "1MiB")[1]
        proc = bed["client"].run(
            [sys.executable, "-m", "netloader", "pull", slow, fast, "--out", folder.parent / "o"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr
    shares = sources(proc.stdout)
    assert shares[fast] > 3 * shares.get(slow, 0), proc.stdout
    again = AGAIN.search(proc.stdout)
    assert again and int(again[1]) > 0, proc.stdout
    from safetensors.torch import load_file

    assert_same(tensors, load_file(folder.parent / "o" / "model.safetensors"))


# ``netloader serve ARGS`` once a line arrives on stdin: imports done, it joins at once.
ON_CUE = """
import sys
from netloader.cli import main
print("ready", flush=True)
sys.stdin.readline()
sys.exit(main(["serve", *sys.argv[1:]]))
"""


def test_a_relay_behind_a_slow_one_is_moved_ahead_by_the_seed(checkpoint, tmp_path):
    """seed -> a -> b (a tenth of the rate) -> c, joined in that order: the seed finds b slow
    against a, and moves c to a instead; c takes most of its chunks from a."""
    hosts = {"seed": "50mbit", "a": "50mbit", "b": "5mbit", "c": "50mbit"}
    with NetBed(hosts) as bed, open(tmp_path / "seed.log", "w+") as seed_log:
        # 1 MiB chunks: b's progress shows within seconds, long before a holds everything.
        _, seed = serve(bed["seed"], checkpoint[0], "--chunk-size", "1MiB", log=seed_log)
        procs = {}
        for name in "abc":
            args = ["--from", seed, "--host", bed[name].address]
            procs[name] = bed[name].popen(
                [sys.executable, "-c", ON_CUE, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=open(tmp_path / f"{name}.log", "w"),  # noqa: SIM115 - closed with the bed
                text=True,
            )
        for proc in procs.values():
            assert proc.stdout.readline() == "ready\n"
        for name, proc in procs.items():  # in this order, each once the one before pulls
            before = bed[name].rx_bytes()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            address = proc.stdout.readline().split()[-1]  # "listening on ADDRESS"
            procs[name] = (proc, address)
            _until(lambda n=name, b=before: bed[n].rx_bytes() - b > 256 << 10)
        line = procs["c"][0].stdout.readline()
        seed_log.seek(0)
        log = seed_log.read()
    address = {n: a for n, (_, a) in procs.items()}
    assert f"moving {address['c']} to pull from {address['a']} instead of {address['b']}" in log
    c_log = (tmp_path / "c.log").read_text()
    assert f"no more chunks from {address['b']}" in c_log, c_log
    shares = sources(line)
    assert shares.get(address["a"], 0) > shares.get(address["b"], 0), line


def sources(line: str) -> dict[str, int]:
    """The bytes each source delivered, from a ``pulled`` line."""
    match = PULLED.search(line)
    assert match, line
    shares = {k: int(v) for k, v in SHARE.findall(match[2])}
    return shares or {match[2]: int(match[1])}


def _until(condition) -> None:
    """Poll ``condition`` (a link's counter) until it holds; pytest-timeout bounds it."""
    while not condition():
        time.sleep(0.005)
