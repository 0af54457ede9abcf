"""The exceptions netloader raises.

Everything derives from :class:`NetloaderError`. A client failure is a :class:`PullError`; its
``partial`` flag says whether weight bytes may already have landed in the caller's tensors, in
which case those tensors hold a mix of old and new bytes and must not be used.
"""

from __future__ import annotations


class NetloaderError(Exception):
    """Base class of every netloader error."""


class ConfigError(NetloaderError, ValueError):
    """A user-supplied setting is invalid; the message names it and what is allowed."""


def check_seconds(**values: object) -> None:
    """Raise ConfigError unless every value is a positive number of seconds (bools are not)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")


class ProtocolError(NetloaderError):
    """The peer sent something that is not valid netloader traffic."""


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
