"""One pull across several sources at once.

The first source in the list that accepts defines the content: its manifest, chunk plan and
digests. Up to ``max_sources`` sources then deliver chunks at the same time, each asking the
shared ``Board`` for its next chunk whenever it has room, so each carries a share in proportion
to how fast it delivers. A source whose manifest, plan or digests differ from the first's is
not used (logged with the reason) and never mixed in. A source that fails (dies, stalls,
refuses, sends a chunk whose digest fails) costs only the chunks it had in flight: they go back
to the board for the others, and the next source in the list, if any, takes its place. The pull
fails only when no source is left and chunks are still missing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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
from netloader.sockets import shutdown
from netloader.transport import TRANSPORTS, Incoming

log = logging.getLogger("netloader.client")


@dataclass
class PullResult:
    tensors: dict[str, torch.Tensor]
    #: The source that defined the content: the first in the list that accepted.
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
        """``A`` alone, or ``A (n bytes), B (m bytes)`` when several sources delivered."""
        used = {s: n for s, n in self.sources.items() if n}
        if len(used) <= 1:
            return self.source
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


class Striped:
    """Runs one pull over ``endpoints`` (tried in order) and returns its result."""

    def __init__(self, job: Job, endpoints: list[Endpoint]):
        self.job = job
        self.waiting = list(endpoints)  # not tried yet, in order
        self.errors: list[PullError] = []
        self.runs: list[_SourceRun] = []
        self.ended: queue.Queue[_SourceRun] = queue.Queue()

    def run(self) -> PullResult:
        first, control, accept = self._first_accepting()
        try:
            if self.job.hooks.on_accept is not None:
                self.job.hooks.on_accept(accept)
            dest: Destination = self.job.prepare(accept)
        except PullError as exc:
            control.done(exc)
            control.close()
            raise
        self.board = Board(dest.plan.num_chunks, dest.plan.chunk_bytes)
        if self.job.hooks.progress is not None:
            progress = self.job.hooks.progress
            self.board.on_done.append(lambda i: progress(dest.plan.chunk_bytes(i)))
        self.reference = accept
        self.dest = dest
        start = time.perf_counter()
        self._start(_SourceRun(self, first, control, accept))
        self._fill()
        self._wait()
        if not self.board.complete:
            raise self._failure()
        dest.finish()
        return self._result(first, time.perf_counter() - start)

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
                return endpoint, control, control.ask_pull(self._request(self.job.request.manifest))
            except PullError as exc:
                control.close()
                self._failed_before(endpoint, exc)
        raise self._failure()

    def _request(self, manifest: Manifest | None) -> PullRequest:
        base = self.job.request
        return PullRequest(
            protocol=PROTOCOL_VERSION,
            identity=base.identity,
            manifest=manifest,
            transports=base.transports,
            streams=base.streams,
            nonce="",
        )

    def _failed_before(self, endpoint: Endpoint, exc: PullError) -> None:
        exc.source = endpoint.text
        log.info("source failed: %s", exc)
        self.errors.append(exc)

    def _start(self, run: _SourceRun) -> None:
        self.runs.append(run)
        run.thread.start()

    def _fill(self) -> None:
        """Start the next sources in the list until ``max_sources`` are at work."""
        while self.waiting and self._active() < self.job.options.max_sources:
            self._start(_SourceRun(self, self.waiting.pop(0)))

    def _active(self) -> int:
        return sum(1 for r in self.runs if not r.over)

    def _wait(self) -> None:
        """Until every chunk landed or no source is left: replace each source that fails.
        Then stop the sources still in their handshake and wait for those fetching."""
        while not self.board.complete and self._active():
            run = self.ended.get()
            if run.error is not None and not self.board.complete:
                self._fill()
        for run in self.runs:
            run.abort_handshake()
        for run in self.runs:
            if run.accept is not None:
                run.thread.join()

    def _failure(self) -> PullError:
        errors = self.errors or [PullError("no source delivered")]
        if len(errors) == 1:
            return errors[0]
        return AllSourcesFailed(errors)

    def _result(self, first: Endpoint, seconds: float) -> PullResult:
        plan = self.dest.plan
        delivered = {
            r.endpoint.text: self.board.delivered[r.endpoint.text]
            for r in self.runs
            if r.accept is not None
        }
        ref = next(r for r in self.runs if r.endpoint == first)
        return PullResult(
            tensors=self.dest.tensors,
            source=first.text,
            total_bytes=plan.total_bytes,
            seconds=seconds,
            transport=self.reference.transport,
            streams=ref.streams,
            sources=delivered,
            refetched=self.board.refetched,
        )


class _SourceRun:
    """One source's part: handshake (unless it was the first), check it serves the very same
    content, fetch chunks until the board has none left, and tell the server how it went."""

    def __init__(
        self,
        pull: Striped,
        endpoint: Endpoint,
        control: Control | None = None,
        accept: Accept | None = None,
    ):
        self.pull = pull
        self.endpoint = endpoint
        self.control = control
        self.accept = accept
        self.error: PullError | None = None
        self.over = False
        self.streams = 0
        self.thread = threading.Thread(target=self._run, name="netloader-source", daemon=True)
        self._lock = threading.Lock()

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
            inc = self._incoming(self.control, self.accept)
            self._receive(self.control, self.accept, inc)
            self.control.done()
        except PullError as exc:
            self._fail(exc, inc)
        finally:
            if self.control is not None:
                self.control.close()
            self.over = True
            self.pull.ended.put(self)

    def _handshake(self) -> None:
        pull = self.pull
        control = Control.open(self.endpoint, pull.job.options.timeouts, pull.job.options.token)
        with self._lock:
            self.control = control
        accept = control.ask_pull(pull._request(pull.reference.manifest))
        reason = _differs(accept, pull.reference)
        if reason:
            control.done(Refused(reason, code=Code.CONTENT))
            raise Refused(reason, code=Code.CONTENT)
        with self._lock:
            self.accept = accept

    def _incoming(self, control: Control, accept: Accept) -> Incoming:
        pull = self.pull
        self.streams = accept.streams
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
        )

    def _receive(self, control: Control, accept: Accept, inc: Incoming) -> None:
        try:
            TRANSPORTS[accept.transport]().receive(inc)
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
        if board.complete:
            return  # e.g. a late source stopped in its handshake: nothing was missing
        self.pull.errors.append(exc)
        if inc is None:
            log.warning("not using source %s", exc)
        else:
            log.warning(
                "source failed, %d chunk(s) it had in flight go to the other sources: %s",
                len(back),
                exc,
            )


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
    if accept.digests != reference.digests:
        return "its chunk digests differ from the first source's (other bytes under the same name)"
    return None
