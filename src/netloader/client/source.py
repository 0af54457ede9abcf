"""One source's run, in a thread of its own, given the ``Transfer`` fixed by the first Accept.

It opens and greets the source (unless it is the first, whose connection it is handed),
checks that it serves the very content the first defined (``_differs``: it is never mixed in
otherwise), fetches chunks from the shared board through the transport the source chose, and
tells the source how it went. A source that sends this client to other peers instead is
followed (``relay.follow``). The run changes nothing of the pull's own state: it reports to
the scheduler (``Report``), which alone records errors and failed peers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from netloader.client.control import Control, Endpoint
from netloader.client.relay import follow
from netloader.client.transfer import Report, Transfer
from netloader.client.transports import run_transport
from netloader.errors import Code, PeerClosed, PullError, Refused, TransferTimeout, as_pull_error
from netloader.protocol import Accept
from netloader.sockets import shutdown, split_address
from netloader.transport import Incoming

log = logging.getLogger("netloader.client")


class SourceRun:
    """One source's part of the pull. ``member``: its request is a member request (to the
    first source, or asking it again, naming the peers to ``avoid``); ``opened``: the first
    source's control connection and Accept, already in hand."""

    def __init__(
        self,
        transfer: Transfer,
        endpoint: Endpoint,
        *,
        member: bool = False,
        avoid: Sequence[str] = (),
        opened: tuple[Control, Accept] | None = None,
    ):
        self.transfer = transfer
        self.endpoint = endpoint
        self.control: Control | None = opened[0] if opened else None
        self.accept: Accept | None = opened[1] if opened else None
        self.member_request = member
        self.avoid = list(avoid)
        self.error: PullError | None = None
        self.streams = 0
        #: The transport that moved this source's bytes (the accepted one, unless it fell back).
        self.transport = ""
        self.thread = threading.Thread(target=self._run, name="netloader-source", daemon=True)
        self._lock = threading.Lock()

    @property
    def is_member(self) -> bool:
        """Sent elsewhere by this source: it delivers nothing itself."""
        return self.accept is not None and not self.accept.delivers

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
                follow(self.endpoint, self.accept, self.control, self.transfer.board, self._peers)
            else:
                inc = self._incoming(self.accept)
                self._receive(self.control, self.accept, inc)
                self.control.done()
        except PullError as exc:
            self._fail(exc, inc)
        finally:
            self._close()
            report = Report(self, over=True, error=self.error, member=self.is_member)
            self.transfer.reports.put(report)

    def _peers(self, peers: list[Endpoint]) -> None:
        """Wake the scheduler: there are new sources to start."""
        self.transfer.reports.put(Report(self, peers=peers))

    def _handshake(self) -> None:
        t = self.transfer
        control = Control.open(self.endpoint, t.options.timeouts, t.options.token)
        with self._lock:
            self.control = control
        request = t.requests.to(
            self.endpoint, t.reference.manifest, member=self.member_request, avoid=self.avoid
        )
        accept = control.ask_pull(request)
        reason = _differs(accept, t.reference)
        if reason:
            control.done(Refused(reason, code=Code.CONTENT))
            raise Refused(reason, code=Code.CONTENT)
        with self._lock:
            self.accept = accept

    def _incoming(self, accept: Accept) -> Incoming:
        t = self.transfer
        self.streams = accept.streams
        self.transport = accept.transport
        host, port = self.endpoint.host, self.endpoint.port
        # Reached by a balancing address, data connections must still reach the server that
        # accepted: those the address sends elsewhere go to the server's own address.
        data = None if accept.data is None else split_address(accept.data)
        return Incoming(
            host=host,
            port=port,
            data=data if data != (host, port) else None,
            session=accept.session,
            streams=accept.streams,
            plan=t.dest.plan,
            buffers=t.dest.buffers,
            digests=t.reference.digests if t.options.verify else None,
            idle=t.options.timeouts.idle,
            board=t.board,
            source=self.endpoint.text,
            offer=accept.offer,
            digest_kind=t.reference.digest,
            transport=accept.transport,
            options=t.options,
        )

    def _receive(self, control: Control, accept: Accept, inc: Incoming) -> None:
        try:
            run_transport(accept.transport, inc)
            self.transport, self.streams = inc.transport, inc.streams
            self._after_retired(inc)
        except Exception as exc:
            error = as_pull_error(exc, "transfer", partial=inc.wrote)
            if isinstance(error, PeerClosed | TransferTimeout):
                error = control.explain(error)
            raise error from None

    def _after_retired(self, inc: Incoming) -> None:
        """A source retired (its own source found it slow) and cut: its chunks in flight go
        to the others now that its streams have ended."""
        board = self.transfer.board
        if board.retired(inc.source) and not board.complete:
            back = board.release(inc.source)
            log.info(
                "no more chunks from %s (found slow); %d chunk(s) it had in flight go to the "
                "other sources",
                inc.source,
                len(back),
            )

    def _fail(self, exc: PullError, inc: Incoming | None) -> None:
        """Hand this source's chunks in flight back to the board and tell the source; whether
        the error counts is the scheduler's to decide (it gets it in the final report)."""
        exc.source = self.endpoint.text
        exc.partial = exc.partial or (inc is not None and inc.wrote)
        self.error = exc
        board = self.transfer.board
        back = board.release(self.endpoint.text) if inc is not None else []
        if self.control is not None and self.accept is not None:
            self.control.done(exc)
        if board.complete or self.is_member:
            return  # a late source cut in its handshake, or a membership: nothing missing
        if inc is None:
            log.warning("not using source %s", exc)
        else:
            log.warning(
                "source failed, %d chunk(s) it had in flight go to the other sources: %s",
                len(back),
                exc,
            )

    def _close(self) -> None:
        if self.control is None:
            return
        ok = self.error is None and self.transfer.board.complete
        self.transfer.relaying.keep_or_close(self.control, member=self.member_request, ok=ok)


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
