"""The exceptions netloader raises, the codes that say why, and the one place where low-level
failures (sockets, torch.distributed) become them.

Everything derives from :class:`NetloaderError`. A client failure is a :class:`PullError`; its
``partial`` flag says whether weight bytes may already have landed in the caller's tensors, in
which case those tensors hold a mix of old and new bytes and must not be used.
"""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    """Machine-readable reasons, sent in ``Refuse`` and ``Done`` messages and kept in
    :attr:`Refused.code`. Peers may send codes this version does not know; they are kept as
    plain strings."""

    PROTOCOL = "protocol"  # not valid netloader traffic, or a version this side does not speak
    AUTH = "auth"  # the shared token is missing, wrong, or not proven
    MODEL = "model"  # another model
    LAYOUT = "layout"  # another world size / tensor- / pipeline-parallel layout
    RANK = "rank"  # another rank of the same layout
    MANIFEST = "manifest"  # tensors differ in name, dtype or shape
    TRANSPORT = "transport"  # no transport both sides can use for these tensors
    BUSY = "busy"  # every transfer slot and the waiting queue are taken
    UNAVAILABLE = "unavailable"  # the server no longer serves (e.g. its weights changed)
    CHANGED = "changed"  # a served tensor changed since capture; caught while sending
    INTEGRITY = "integrity"  # the client received bytes that do not match the digests
    CONTENT = "content"  # a further source serves other bytes than the first one (not mixed in)


class NetloaderError(Exception):
    """Base class of every netloader error."""


class ConfigError(NetloaderError, ValueError):
    """A user-supplied setting is invalid; the message names it and what is allowed."""


def check_seconds(**values: object) -> None:
    """Raise ConfigError unless every value is a positive number of seconds (bools are not)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")


class Refusal(NetloaderError):
    """A server's no to one request: a ``Code`` and a reason for people. Raised by whichever
    check fails (token, model, manifest, transport, slots, ...) and turned into the peer's
    ``Refuse`` message in one place (``server.dispatch``)."""

    def __init__(self, code: Code | str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ProtocolError(NetloaderError):
    """The peer sent something that is not valid netloader traffic."""


class TensorsChanged(NetloaderError):
    """A served tensor no longer holds the bytes it had at capture; sending it would be wrong."""


class Withdrawn(NetloaderError):
    """The server stopped serving these tensors (e.g. a relay whose own pull failed)."""


class PullError(NetloaderError):
    """Getting weights from a source failed.

    ``source`` is the ``host:port`` that failed (None before any source was tried).
    ``partial`` is True when some weight bytes were already written into the destination
    tensors: their contents are then undefined.
    """

    def __init__(self, message: str, *, source: str | None = None, partial: bool = False):
        super().__init__(message)
        self.source = source
        self.partial = partial

    def __str__(self) -> str:
        message = super().__str__()
        return f"{self.source}: {message}" if self.source else message


class SourceUnreachable(PullError):
    """No connection could be made to the source."""


class Refused(PullError):
    """The server refused the request; ``code`` is machine-readable, the message is for people."""

    def __init__(
        self, message: str, *, code: str, source: str | None = None, partial: bool = False
    ):
        super().__init__(message, source=source, partial=partial)
        self.code = code


class TransferTimeout(PullError, TimeoutError):
    """The peer made no progress within the allowed time."""


class PeerClosed(PullError):
    """The peer closed the connection or died before the transfer finished."""


class IntegrityError(PullError):
    """Received bytes do not match the digest the server computed when it captured them."""


class AllSourcesFailed(PullError):
    """Every source was tried and none delivered; ``errors`` holds one error per source."""

    def __init__(self, errors: list[PullError]):
        lines = "; ".join(str(e) for e in errors)
        super().__init__(
            f"all {len(errors)} source(s) failed: {lines}",
            partial=any(e.partial for e in errors),
        )
        self.errors = errors


def as_pull_error(exc: BaseException, during: str, *, partial: bool = False) -> PullError:
    """The PullError that explains ``exc``, raised while ``during`` (e.g. "handshake").

    The one place where low-level failures are mapped, by type: transports turn their own
    failures into builtin ones first (the process-group transport, whose backends raise plain
    RuntimeErrors, tells a timeout by the time it waited).
    """
    if isinstance(exc, PullError):
        exc.partial = exc.partial or partial
        return exc
    if isinstance(exc, TimeoutError):
        return TransferTimeout(f"{during} stalled: {exc}", partial=partial)
    if isinstance(exc, ProtocolError):
        return PullError(f"bad data from server during {during}: {exc}", partial=partial)
    if isinstance(exc, OSError):
        return PeerClosed(f"connection lost during {during}: {exc}", partial=partial)
    raise exc


def shorten(items: list[str], limit: int = 3) -> str:
    """``items`` joined by commas, at most ``limit`` of them, then "and N more"."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
