"""Scheduling one pull across several sources: which run, which replace those that fail,
when to ask the first source again, which errors to report, and the result.

``pull_striped`` tries the sources in order until one accepts: it defines the content (its
manifest, chunk plan and digests), and the ``Transfer`` every run shares is made from its
Accept. The ``Scheduler`` then keeps up to ``max_sources`` runs (``source.SourceRun``)
delivering chunks onto the shared board, each asking for its next chunk whenever it has room,
so each carries a share in proportion to how fast it delivers. A source that fails costs only
the chunks it had in flight: they go back to the board, and the next source of the list takes
its place. Peers the first source names (relay placement) go before the rest of the list; if they
all fail, the first source is asked again (``MAX_REJOINS`` times), naming the peers to avoid.
The pull fails only when no source is left and chunks are still missing; its errors come in
the order the sources were given.

Runs change none of this state: they report through the transfer's queue, and only the
scheduler's thread reads the reports and records what they say.
"""

from __future__ import annotations

import logging
import queue
import time

from netloader.board import Board
from netloader.client.control import Control, Endpoint
from netloader.client.relay import Relaying
from netloader.client.result import PullResult
from netloader.client.source import SourceRun
from netloader.client.transfer import Job, Report, Transfer
from netloader.digest import WSUM
from netloader.errors import AllSourcesFailed, PullError
from netloader.protocol import Accept

log = logging.getLogger("netloader.client")

MAX_REJOINS = 3  # times a client asks its first source again after the peers it named failed


def pull_striped(job: Job, endpoints: list[Endpoint], relaying: Relaying) -> PullResult:
    """Pull over ``endpoints`` (tried in order) and return the result; PullError if no source
    could deliver (``relaying``'s entry is withdrawn then)."""
    sources = Sources(endpoints)
    first, control, accept = _first_accepting(job, sources, relaying)
    transfer = _transfer(job, relaying, control, accept)
    return Scheduler(transfer, sources, first).run(control, accept)


class Sources:
    """The sources not tried yet, in order (``waiting``), and what failed so far: ``errors``,
    and ``failed_peers``, the fetching sources that failed (for the first source to avoid)."""

    def __init__(self, endpoints: list[Endpoint]):
        self.waiting = list(endpoints)
        self.given = [e.text for e in endpoints]  # errors are reported in this order
        self.errors: list[PullError] = []
        self.failed_peers: list[str] = []

    def take(self) -> Endpoint | None:
        return self.waiting.pop(0) if self.waiting else None

    def put_first(self, peers: list[Endpoint], known: set[str]) -> None:
        """Peers a source named: tried before the rest of the list, unless already known."""
        known = known | {e.text for e in self.waiting}
        self.waiting[0:0] = [p for p in peers if p.text not in known]

    def failed_before(self, endpoint: Endpoint, exc: PullError) -> None:
        """``endpoint`` failed before any source accepted."""
        exc.source = endpoint.text
        log.info("source failed: %s", exc)
        self.errors.append(exc)

    def failure(self) -> PullError:
        errors = self.errors or [PullError("no source delivered")]
        # In the order the operator gave the sources (peers named later go last),
        # not the order they happened to fail in.
        rank = {text: i for i, text in enumerate(self.given)}
        errors = sorted(errors, key=lambda e: rank.get(e.source or "", len(rank)))
        if len(errors) == 1:
            return errors[0]
        return AllSourcesFailed(errors)


def _first_accepting(
    job: Job, sources: Sources, relaying: Relaying
) -> tuple[Endpoint, Control, Accept]:
    """The first source that accepts a member request, its open connection and its Accept."""
    while (endpoint := sources.take()) is not None:
        try:
            control = Control.open(endpoint, job.options.timeouts, job.options.token)
        except PullError as exc:
            sources.failed_before(endpoint, exc)
            continue
        try:
            request = job.requests.to(endpoint, job.requests.manifest, member=True)
            return endpoint, control, control.ask_pull(request)
        except PullError as exc:
            control.close()
            sources.failed_before(endpoint, exc)
    error = sources.failure()
    relaying.withdraw(error)
    raise error


def _transfer(job: Job, relaying: Relaying, control: Control, accept: Accept) -> Transfer:
    """What every run shares, from the first source's ``accept``: the caller sees it first
    (``on_accept``), then the destination, the board, progress and relaying are set up."""
    try:
        if job.hooks.on_accept is not None:
            job.hooks.on_accept(accept)
        dest = job.landing.prepare(accept)
    except PullError as exc:
        control.done(exc)
        control.close()
        relaying.withdraw(exc)
        raise
    # Endgame copies are checked where they land aside: not with digests taken on the device.
    endgame = not (job.options.verify and accept.digest == WSUM)
    board = Board(dest.plan.num_chunks, dest.plan.chunk_bytes, endgame=endgame)
    if job.hooks.progress is not None:
        progress = job.hooks.progress
        board.on_done.append(lambda i: progress(dest.plan.chunk_bytes(i)))
    relaying.serve_arrivals(accept, dest, board, job.options.verify)
    return Transfer(accept, dest, board, job.options, job.requests, relaying, queue.Queue())


class Scheduler:
    """Runs the pull once its first source (``first``) accepted: starts, replaces and ends
    the runs, reads their reports, and builds the result."""

    def __init__(self, transfer: Transfer, sources: Sources, first: Endpoint):
        self.transfer = transfer
        self.board = transfer.board
        self.sources = sources
        self.first = first
        self.runs: list[SourceRun] = []  # every run started, in order
        self.busy: set[SourceRun] = set()  # fetching or in their handshake
        self.members: set[SourceRun] = set()  # sent elsewhere by their source, until they end
        self.rejoins = 0

    def run(self, control: Control, accept: Accept) -> PullResult:
        """The pull, from the first source's open ``control`` connection and ``accept``."""
        start = time.perf_counter()
        self._start(SourceRun(self.transfer, self.first, member=True, opened=(control, accept)))
        if not accept.delivers:
            self._take_reports()  # the peers it names go before the rest of the list
        self._fill()
        try:
            self._wait()
        finally:
            self._finish_runs()
        if not self.board.complete:
            error = self.sources.failure()
            self.transfer.relaying.withdraw(error)
            raise error
        self.transfer.dest.finish()
        return self._result(time.perf_counter() - start)

    def _start(self, run: SourceRun) -> None:
        self.runs.append(run)
        self.busy.add(run)
        run.thread.start()

    def _fill(self) -> None:
        """Start the next sources in the list until ``max_sources`` are busy."""
        while len(self.busy) < self.transfer.options.max_sources:
            endpoint = self.sources.take()
            if endpoint is None:
                return
            self._start(SourceRun(self.transfer, endpoint))

    def _wait(self) -> None:
        """Until every chunk landed or no source is left: replace each source that fails, and
        when peers named by the first source all failed, ask it again. It returns only once
        no run is busy or the board is complete, so a failure's errors are all recorded."""
        while not self.board.complete:
            if not self.busy:
                if not self.sources.waiting and not self._rejoin():
                    return
                self._fill()
                continue
            self._take_reports()
            if not self.board.complete:
                self._fill()

    def _take_reports(self) -> None:
        """Wait for the next report, then take every other one already in."""
        reports = self.transfer.reports
        self._record(reports.get())
        while True:
            try:
                report = reports.get_nowait()
            except queue.Empty:
                return
            self._record(report)

    def _record(self, report: Report) -> None:
        run = report.run
        self.busy.discard(run)
        if report.peers is not None:  # a membership: its source sent this client to peers
            self.members.add(run)
            # A source that placed this client may name itself later (a move): only sources
            # that deliver or may deliver count as known.
            known = {r.endpoint.text for r in self.runs if not r.is_member}
            self.sources.put_first(report.peers, known)
            return
        self.members.discard(run)
        # Once the board is complete nothing is missing (a late source cut in its handshake);
        # a membership delivered nothing.
        if report.error is None or report.member or self.board.complete:
            return
        self.sources.errors.append(report.error)
        if not run.member_request:
            self.sources.failed_peers.append(run.endpoint.text)

    def _rejoin(self) -> bool:
        """Ask the first source again where to pull from, avoiding the peers that failed."""
        if not self.members or self.rejoins >= MAX_REJOINS:
            return False
        self.rejoins += 1
        failed = self.sources.failed_peers
        log.info("asking %s again where to pull from (avoiding %s)", self.first.text, failed)
        self._start(SourceRun(self.transfer, self.first, member=True, avoid=failed))
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

    def _result(self, seconds: float) -> PullResult:
        fetched = [r for r in self.runs if r.accept is not None and r.accept.delivers]
        delivered = {r.endpoint.text: self.board.delivered[r.endpoint.text] for r in fetched}
        # Transport and streams of the source that delivered most.
        main = max(fetched, key=lambda r: self.board.delivered[r.endpoint.text])
        return PullResult(
            tensors=self.transfer.dest.tensors,
            source=self.first.text,
            total_bytes=self.transfer.dest.plan.total_bytes,
            seconds=seconds,
            transport=main.transport,
            streams=main.streams,
            sources=delivered,
            refetched=self.board.refetched,
            copied=self.board.copied,
        )
