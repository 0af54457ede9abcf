"""One connection to a server, from its greeting to the end of what it asked for.

A connection's first message decides what it is: a ``PullRequest`` (checked, placed, admitted,
then the thread runs the session; a relay's connection then stays open as its membership), a
``StreamAttach`` (a data connection of a session, handed to its transport), an
``InfoRequest``, a ``StatusRequest`` or an ``ArtifactsRequest`` (answered at once; see
``status`` and ``artifacts``). Every check raises ``errors.Refusal``; ``handle`` alone turns a
refusal into the peer's ``Refuse`` message (and the event that logs it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from netloader import events
from netloader.artifacts.wire import ArtifactsRequest
from netloader.errors import Code, ProtocolError, Refusal
from netloader.protocol import (
    PROTOCOL_VERSION,
    Attached,
    Channel,
    Done,
    InfoReply,
    InfoRequest,
    PullRequest,
    Refuse,
    StatusRequest,
    StreamAttach,
)
from netloader.server import artifacts, status
from netloader.server.admission import Admission
from netloader.server.artifacts import Shelf
from netloader.server.catalog import Catalog, ServedModel
from netloader.server.listener import Connection
from netloader.server.relays import Placement
from netloader.server.session import (
    Conversation,
    Offered,
    Session,
    SessionContext,
    hold_membership,
)
from netloader.sockets import split_address

log = logging.getLogger("netloader.server")


class Sessions:
    """The transfers running, by session id: their data connections find them here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, Session] = {}

    @contextlib.contextmanager
    def running(self, session: Session) -> Iterator[None]:
        with self._lock:
            self._running[session.id] = session
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(session.id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._running)

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            return self._running.get(session_id)

    def abort_all(self) -> None:
        with self._lock:
            running = list(self._running.values())
        for session in running:
            session.abort()


class Dispatcher:
    """Handles the server's connections (``Listener``'s handler): the checks in the order a
    client can act on, placement, admission, then the session."""

    def __init__(
        self,
        context: SessionContext,
        catalog: Catalog,
        admission: Admission,
        first: Callable[[], ServedModel],
        shelf: Shelf,
    ):
        self.shelf = shelf
        self.context = context
        self.catalog = catalog
        self.admission = admission
        self.first = first
        self.sessions = Sessions()
        self.tally = status.Tally()

    def _live(self) -> status.Live:
        return status.Live(self.catalog, self.tally, len(self.sessions), self.admission.queued)

    def handle(self, conn: Connection) -> bool:
        """Greet the peer and dispatch on its first message; True when the socket was handed
        to a session's transport."""
        timeouts = self.context.timeouts
        channel = Channel(conn.sock, timeouts.idle)
        hello = self.context.gate.greeting()
        conv = Conversation(channel, conn.peer, hello, time.monotonic() + timeouts.handshake)
        model = ""
        try:
            channel.send(conv.hello, conv.deadline)
            request = channel.recv_any(
                PullRequest,
                InfoRequest,
                StreamAttach,
                StatusRequest,
                ArtifactsRequest,
                deadline=conv.deadline,
            )
            match request:
                case ArtifactsRequest():
                    artifacts.answer(conv, request, self.shelf, self.context.gate)
                case StreamAttach():
                    return self._attach(conn, request)
                case InfoRequest():
                    self._info(conv, request)
                case StatusRequest():
                    status.answer(self.context, conv, request, self._live())
                case PullRequest():
                    model = request.identity.model
                    conn.handshake_over()
                    self._pull(conv, request)
        except Refusal as refusal:
            self.tally.refused(str(refusal.code))
            events.emit(events.PullRefused(model, conn.peer, str(refusal.code), refusal.reason))
            channel.send_if_open(Refuse(refusal.code, refusal.reason))
        except ProtocolError as exc:
            log.warning("dropping %s: %s", conn.peer, exc)
            channel.send_if_open(Refuse(Code.PROTOCOL, str(exc)))
        except TimeoutError:
            log.warning(
                "dropping %s: handshake not finished within %g s", conn.peer, timeouts.handshake
            )
        except OSError as exc:
            if not self.context.closing.is_set():
                log.warning("connection from %s failed: %s", conn.peer, exc)
        except Exception:
            log.exception("unexpected error while serving %s", conn.peer)
        return False

    def _info(self, conv: Conversation, request: InfoRequest) -> None:
        """What the first model is (the protocol's info request names no model)."""
        self.context.gate.authenticate(conv.hello, request)
        entry = self.first()
        snapshot = entry.wait(conv.deadline)
        reply = InfoReply(
            PROTOCOL_VERSION,
            entry.identity,
            len(snapshot.manifest),
            snapshot.plan.total_bytes,
            self.context.gate.proof("info", request.nonce, conv.hello.nonce),
        )
        conv.channel.send(reply, conv.deadline)

    def _attach(self, conn: Connection, request: StreamAttach) -> bool:
        session = self.sessions.get(request.session)
        if request.confirm:  # answered before the transport's thread may write on it
            channel = Channel(conn.sock, self.context.timeouts.idle)
            reason = "no session of that id here (this address reached another server)"
            channel.send_if_open(Attached() if session else Refuse(Code.UNAVAILABLE, reason))
        if session is None or not session.transport.attach(conn.sock, request.index):
            if not request.confirm:
                log.warning(
                    "dropping %s: data connection for no open stream of a session", conn.peer
                )
            return False
        return True

    def _pull(self, conv: Conversation, request: PullRequest) -> None:
        """Check, place and serve one pull; a relay's connection then stays as its membership."""
        offered = self._offered(conv, request)
        relays = offered.entry.relays
        relay = request.advertise if request.placement else None
        placement = relays.join(relay, request.avoid) if relay else Placement(here=True)
        session = Session(self.context, conv, offered)
        if relay and placement.here:  # served here: this server sees its progress itself
            relays.watch(relay, meter=lambda: session.out.sent)
        try:
            done = self._place(conv, request, session, placement)
            if relay and done is not None and done.ok:
                relays.holds(relay)
                hold_membership(conv.channel, self.context.timeouts.idle)
        finally:
            if relay:
                relays.leave(relay)

    def _offered(self, conv: Conversation, request: PullRequest) -> Offered:
        """The checks, in the order a client can act on: protocol and token, the model asked
        for (by identity), its snapshot, manifest and availability, then a transport."""
        self.context.gate.check_pull(conv.hello, request)
        entry = self.catalog.pick(request.identity)
        snapshot = entry.wait(conv.deadline)
        entry.check(request, snapshot)
        peer_host = split_address(conv.peer)[0]
        engine = self.context.gate.transport_for(request, snapshot, peer_host)
        return Offered(entry, snapshot, engine)

    def _place(
        self, conv: Conversation, request: PullRequest, session: Session, placement: Placement
    ) -> Done | None:
        """Serve ``request`` here (a transfer slot first) or send it to its peers."""
        model = session.entry.model
        if placement.peers:
            events.emit(events.Placed(model, conv.peer, placement.peers))
        if not placement.here:
            events.emit(events.PullAccepted(model, conv.peer, session.engine.name, False))
            return session.run(request, placement)
        self.admission.admit(conv.peer, conv.deadline, self.context.timeouts.handshake)
        try:
            events.emit(events.PullAccepted(model, conv.peer, session.engine.name, True))
            with self.sessions.running(session):
                return session.run(request, placement)
        finally:
            self.admission.release()
            self.tally.served(model, session.out.sent)
