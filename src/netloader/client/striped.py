"""One pull across several sources at once, relaying what arrives.

The first source in the list that accepts defines the content: its manifest, chunk plan and
digests. Up to ``max_sources`` sources then deliver chunks at the same time, each asking the
shared ``Board`` for its next chunk whenever it has room, so each carries a share in proportion
to how fast it delivers. A source whose manifest, plan or digests differ from the first's is
not used (logged with the reason) and never mixed in. A source that fails (dies, stalls,
refuses, sends a chunk whose digest fails) costs only the chunks it had in flight: they go back
to the board for the others, and the next source in the list, if any, takes its place. The pull
fails only when no source is left and chunks are still missing.

With a ``relay`` (a server of this process serving the pulled model's name), every chunk is
served onwards as soon as it landed and was verified, and the sources are told its address. With discovery on, the first source may
answer "take the chunks from these peers instead" (relays ahead in its chain): this client then
keeps its connection to that source open as its membership, pulls from the peers, and if they
all fail asks the source again, naming the peers to avoid.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from netloader.board import Board
from netloader.client.control import Control, Endpoint
from netloader.client.destination import Destination
from netloader.errors import (
    AllSourcesFailed,
    Code,
    PeerClosed,
    PullError,
    Refused,
    TransferTimeout,
    as_pull_error,
)
from netloader.manifest import Manifest
from netloader.options import PullHooks, PullOptions
from netloader.protocol import PROTOCOL_VERSION, Accept, PullRequest
from netloader.snapshot import Snapshot
from netloader.sockets import shutdown
from netloader.transport import Incoming, engine

if TYPE_CHECKING:
    from netloader.server import Served, Server

log = logging.getLogger("netloader.client")


@dataclass
class PullResult:
    tensors: dict[str, torch.Tensor]
    #: The source that defined the content: the first in the list that accepted (with
    #: discovery it may have sent this client to other peers: see ``sources``).
    source: str
    total_bytes: int
    seconds: float
    transport: str
    streams: int
    #: Verified bytes each source that took part delivered, in the order of the list.
    sources: dict[str, int] = field(default_factory=dict)
    #: Bytes asked again of another source after the source fetching them failed.
    refetched: int = 0

    @property
    def gbps(self) -> float:
        return self.total_bytes / 1e9 / max(self.seconds, 1e-9)

    def describe_sources(self, unit: float = 1.0, suffix: str = " bytes") -> str:
        """``A`` when one source delivered everything, else ``A (n bytes), B (m bytes)``."""
        used = {s: n for s, n in self.sources.items() if n}
        if len(used) <= 1:
            return next(iter(used), self.source)
        return ", ".join(f"{s} ({_amount(n / unit)}{suffix})" for s, n in used.items())


def _amount(value: float) -> str:
    return f"{value:.3f}" if value != int(value) else str(int(value))


@dataclass(frozen=True)
class Job:
    """What one pull needs, whichever sources deliver it (set up by ``netloader.pull``):
    the request every source gets (its manifest is the caller's, if any), the settings, the
    caller's hooks, and where the bytes of an accepted transfer land."""

    request: PullRequest
    options: PullOptions
    hooks: PullHooks
    prepare: Callable[[Accept], Destination]
    #: The transports to offer a source, by its host (CUDA IPC only to one on this machine).
    transports: Callable[[str], list[str]]


MAX_REJOINS = 3  # times a client asks its first source again after the peers it named failed


class Striped:
    """Runs one pull over ``endpoints`` (tried in order) and returns its result."""

    def __init__(self, job: Job, endpoints: list[Endpoint], relay: Server | None = None):
        self.job = job
        self.relay = relay if relay is not None and relay.address else None
        #: The relay's entry for the model pulled: it serves what arrives.
        self.relayed: Served | None = (
            self.relay.model(job.request.identity.model) if self.relay is not None else None
        )
        self.waiting = list(endpoints)  # not tried yet, in order
        self.given = [e.text for e in endpoints]  # errors are reported in this order
        self.errors: list[PullError] = []
        self.runs: list[_SourceRun] = []
        self.ended: queue.Queue[_SourceRun] = queue.Queue()
        self.failed_peers: list[str] = []
        self.rejoins = 0
        self._lock = threading.Lock()

    def run(self) -> PullResult:
        first, control, accept = self._first_accepting()
        try:
            if self.job.hooks.on_accept is not None:
                self.job.hooks.on_accept(accept)
            dest: Destination = self.job.prepare(accept)
        except PullError as exc:
            control.done(exc)
            control.close()
            self._withdraw(exc)
            raise
        self.first, self.reference, self.dest = first, accept, dest
        self.board = Board(dest.plan.num_chunks, dest.plan.chunk_bytes)
        if self.job.hooks.progress is not None:
            progress = self.job.hooks.progress
            self.board.on_done.append(lambda i: progress(dest.plan.chunk_bytes(i)))
        self._relay_what_arrives()
        start = time.perf_counter()
        self._start(_SourceRun(self, first, control, accept, member=True))
        self._fill()
        try:
            self._wait()
        finally:
            self._finish_runs()
        if not self.board.complete:
            error = self._failure()
            self._withdraw(error)
            raise error
        dest.finish()
        return self._result(time.perf_counter() - start)

    # --- sources --------------------------------------------------------------------------

    def _first_accepting(self) -> tuple[Endpoint, Control, Accept]:
        while self.waiting:
            endpoint = self.waiting.pop(0)
            try:
                control = Control.open(endpoint, self.job.options.timeouts, self.job.options.token)
            except PullError as exc:
                self._failed_before(endpoint, exc)
                continue
            try:
                request = self.request(endpoint, self.job.request.manifest, member=True)
                return endpoint, control, control.ask_pull(request)
            except PullError as exc:
                control.close()
                self._failed_before(endpoint, exc)
        error = self._failure()
        self._withdraw(error)
        raise error

    def request(
        self, endpoint: Endpoint, manifest: Manifest | None, *, member: bool
    ) -> PullRequest:
        """The request for ``endpoint``. A ``member`` request (to the first source, or asking it
        again) names this client's relay and asks where to pull from; the others just pull."""
        base = self.job.request
        discover = member and self.relay is not None and self.job.options.discovery
        return PullRequest(
            protocol=PROTOCOL_VERSION,
            identity=base.identity,
            manifest=manifest,
            transports=self.job.transports(endpoint.host),
            streams=base.streams,
            nonce="",
            advertise=self.relay.address if discover and self.relay else None,
            discover=discover,
            avoid=list(self.failed_peers) if discover else [],
        )

    def _failed_before(self, endpoint: Endpoint, exc: PullError) -> None:
        exc.source = endpoint.text
        log.info("source failed: %s", exc)
        self.errors.append(exc)

    def suggest(self, peers: list[str]) -> None:
        """Peers the first source named: tried before the rest of the list (from any thread)."""
        with self._lock:
            known = {r.endpoint.text for r in self.runs} | {e.text for e in self.waiting}
            fresh = [Endpoint.parse(p) for p in peers if p not in known]
            self.waiting[0:0] = fresh

    def _start(self, run: _SourceRun) -> None:
        with self._lock:
            self.runs.append(run)
        run.thread.start()

    def _fill(self) -> None:
        """Start the next sources in the list until ``max_sources`` are delivering."""
        while self._fetching() < self.job.options.max_sources:
            with self._lock:
                if not self.waiting:
                    return
                endpoint = self.waiting.pop(0)
            self._start(_SourceRun(self, endpoint))

    def _fetching(self) -> int:
        """Sources at work or in their handshake; members only relay the first source's word."""
        with self._lock:
            return sum(1 for r in self.runs if not r.over and not r.is_member)

    def _wait(self) -> None:
        """Until every chunk landed or no source is left: replace each source that fails, and
        when peers named by the first source all failed, ask it again."""
        while not self.board.complete:
            if not self._fetching():
                with self._lock:
                    idle = not self.waiting
                if idle and not self._rejoin():
                    return
                self._fill()
                continue
            self.ended.get()
            if not self.board.complete:
                self._fill()

    def _rejoin(self) -> bool:
        """Ask the first source again where to pull from, avoiding the peers that failed."""
        members = [r for r in self.runs if r.is_member and not r.over]
        if not members or self.rejoins >= MAX_REJOINS:
            return False
        self.rejoins += 1
        log.info(
            "asking %s again where to pull from (avoiding %s)", self.first.text, self.failed_peers
        )
        self._start(_SourceRun(self, self.first, member=True))
        return True

    def _finish_runs(self) -> None:
        """Stop whatever still runs: handshakes are cut, fetching and member sources end once
        the board is finished (they then tell their server how it went)."""
        if not self.board.complete:
            self.board.stop()
        for run in self.runs:
            run.abort_handshake()
        for run in self.runs:
            if run.accept is not None:
                run.thread.join()

    def _relay_what_arrives(self) -> None:
        """Serve every chunk onwards as soon as it landed and was verified."""
        if self.relayed is None:
            return
        accept = self.reference
        if accept.digests is None or not self.job.options.verify:
            self.relayed.withdraw(
                "cannot relay chunks it cannot verify (the source sent no digests)"
            )
            return
        snapshot = Snapshot.receiving(
            accept.manifest,
            accept.aliases,
            self.dest.buffers,
            self.dest.plan,
            accept.digests,
            accept.digest,
        )
        assert snapshot.ready is not None
        self.board.on_done.append(snapshot.ready.mark)
        self.relayed.provide(snapshot)

    def _withdraw(self, error: PullError) -> None:
        if self.relayed is not None:
            self.relayed.withdraw(f"its own pull failed: {error}")

    def _failure(self) -> PullError:
        errors = self.errors or [PullError("no source delivered")]
        # In the order the operator gave the sources (peers named later go last),
        # not the order they happened to fail in.
        rank = {text: i for i, text in enumerate(self.given)}
        errors = sorted(errors, key=lambda e: rank.get(e.source or "", len(rank)))
        if len(errors) == 1:
            return errors[0]
        return AllSourcesFailed(errors)

    def _result(self, seconds: float) -> PullResult:
        plan = self.dest.plan
        delivered = {
            r.endpoint.text: self.board.delivered[r.endpoint.text]
            for r in self.runs
            if r.accept is not None and r.accept.stay
        }
        # Transport and streams of the source that delivered most.
        main = max(
            (r for r in self.runs if r.accept is not None and r.accept.stay),
            key=lambda r: self.board.delivered[r.endpoint.text],
        )
        assert main.accept is not None
        return PullResult(
            tensors=self.dest.tensors,
            source=self.first.text,
            total_bytes=plan.total_bytes,
            seconds=seconds,
            transport=main.transport,
            streams=main.streams,
            sources=delivered,
            refetched=self.board.refetched,
        )


class _SourceRun:
    """One source's part: handshake (unless it was the first), check it serves the very same
    content, fetch chunks until the board has none left, and tell the server how it went. A
    source that sends this client to other peers instead (discovery) is only kept as its
    membership until the pull ends."""

    def __init__(
        self,
        pull: Striped,
        endpoint: Endpoint,
        control: Control | None = None,
        accept: Accept | None = None,
        *,
        member: bool = False,
    ):
        self.pull = pull
        self.endpoint = endpoint
        self.control = control
        self.accept = accept
        self.member_request = member
        self.error: PullError | None = None
        self.over = False
        self.streams = 0
        #: The transport that moved this source's bytes (the accepted one, unless it fell back).
        self.transport = ""
        self.thread = threading.Thread(target=self._run, name="netloader-source", daemon=True)
        self._lock = threading.Lock()

    @property
    def is_member(self) -> bool:
        """Sent elsewhere by this source: it delivers nothing itself."""
        return self.accept is not None and not self.accept.stay

    def abort_handshake(self) -> None:
        """Stop a handshake still running (the board needs nothing more)."""
        with self._lock:
            if self.accept is None and self.control is not None:
                shutdown(self.control.channel.sock)

    def _run(self) -> None:
        inc: Incoming | None = None
        try:
            if self.control is None:
                self._handshake()
            assert self.control is not None and self.accept is not None
            if self.is_member:
                self._follow(self.accept)
            else:
                inc = self._incoming(self.accept)
                self._receive(self.control, self.accept, inc)
                self.control.done()
        except PullError as exc:
            self._fail(exc, inc)
        finally:
            self._close()
            self.over = True
            self.pull.ended.put(self)

    def _handshake(self) -> None:
        pull = self.pull
        control = Control.open(self.endpoint, pull.job.options.timeouts, pull.job.options.token)
        with self._lock:
            self.control = control
        request = pull.request(self.endpoint, pull.reference.manifest, member=self.member_request)
        accept = control.ask_pull(request)
        reason = _differs(accept, pull.reference)
        if reason:
            control.done(Refused(reason, code=Code.CONTENT))
            raise Refused(reason, code=Code.CONTENT)
        with self._lock:
            self.accept = accept

    def _follow(self, accept: Accept) -> None:
        """This source sent us to ``accept.peers``: pull from them, and stay connected until
        the pull ends, then say how it went."""
        log.info("%s sends this client to %s", self.endpoint.text, ", ".join(accept.peers))
        self.pull.suggest(accept.peers)
        self.pull.ended.put(self)  # wake the pull: there are new sources to start
        board = self.pull.board
        board.wait_finished()
        assert self.control is not None
        self.control.done(None if board.complete else PullError("the pull failed"))

    def _incoming(self, accept: Accept) -> Incoming:
        pull = self.pull
        self.streams = accept.streams
        self.transport = accept.transport
        return Incoming(
            host=self.endpoint.host,
            port=self.endpoint.port,
            session=accept.session,
            streams=accept.streams,
            plan=pull.dest.plan,
            buffers=pull.dest.buffers,
            digests=pull.reference.digests if pull.job.options.verify else None,
            idle=pull.job.options.timeouts.idle,
            board=pull.board,
            source=self.endpoint.text,
            offer=accept.offer,
            digest_kind=pull.reference.digest,
            transport=accept.transport,
        )

    def _receive(self, control: Control, accept: Accept, inc: Incoming) -> None:
        try:
            engine(accept.transport).receive(inc)
            self.transport = inc.transport
        except Exception as exc:
            error = as_pull_error(exc, "transfer", partial=inc.wrote)
            if isinstance(error, PeerClosed | TransferTimeout):
                error = control.explain(error)
            raise error from None

    def _fail(self, exc: PullError, inc: Incoming | None) -> None:
        exc.source = self.endpoint.text
        exc.partial = exc.partial or (inc is not None and inc.wrote)
        self.error = exc
        board = self.pull.board
        back = board.release(self.endpoint.text) if inc is not None else []
        if self.control is not None and self.accept is not None:
            self.control.done(exc)
        if board.complete or self.is_member:
            return  # a late source cut in its handshake, or a membership: nothing missing
        self.pull.errors.append(exc)
        if not self.member_request:
            self.pull.failed_peers.append(self.endpoint.text)
        if inc is None:
            log.warning("not using source %s", exc)
        else:
            log.warning(
                "source failed, %d chunk(s) it had in flight go to the other sources: %s",
                len(back),
                exc,
            )

    def _close(self) -> None:
        """A relay keeps its membership at a source that registered it, for as long as its
        own server runs; every other connection closes now."""
        if self.control is None:
            return
        relay = self.pull.relay
        registered = self.member_request and relay is not None and self.pull.job.options.discovery
        if registered and self.error is None and self.pull.board.complete:
            assert relay is not None
            relay.keep(self.control.detach())
        else:
            self.control.close()


def _differs(accept: Accept, reference: Accept) -> str | None:
    """Why ``accept`` cannot be mixed with the ``reference`` source's content, if it cannot."""
    if accept.manifest != reference.manifest:
        return "its tensor manifest differs from the first source's"
    if accept.aliases != reference.aliases:
        return "it ties tensors differently from the first source"
    if accept.chunk_size != reference.chunk_size:
        return (
            f"it cuts chunks of {accept.chunk_size} bytes, the first source {reference.chunk_size}"
        )
    if accept.digests is None or reference.digests is None:
        return "without digests its bytes cannot be checked against the first source's"
    if accept.digest != reference.digest:
        return (
            f"its digests are {accept.digest}, the first source's {reference.digest}: "
            "they cannot be compared"
        )
    if accept.digests != reference.digests:
        return "its chunk digests differ from the first source's (other bytes under the same name)"
    return None
