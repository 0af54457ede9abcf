"""Optional shared-secret authentication: HMAC-SHA256 challenge-response, both directions.

Each side sends a fresh random nonce. The client proves it knows the token by MACing both nonces
before the server reveals anything; the server proves the same in its reply, so a client with a
token never takes weights from an impostor. Comparisons are constant-time. The token itself never
travels and is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from netloader.errors import ConfigError

TOKEN_ENV = "NETLOADER_TOKEN"
MIN_TOKEN_BYTES = 16


def new_nonce() -> str:
    return os.urandom(16).hex()


def mac(token: bytes, role: str, *parts: str) -> str:
    """HMAC over a role label and the hex strings of a conversation (nonces, session)."""
    message = "\0".join(("netloader", role, *parts)).encode()
    return hmac.new(token, message, hashlib.sha256).hexdigest()


def check(token: bytes, proof: str | None, role: str, *parts: str) -> bool:
    return proof is not None and hmac.compare_digest(proof, mac(token, role, *parts))


def load_token(path: str | os.PathLike[str] | None = None, *, env: bool = True) -> bytes | None:
    """The token from ``path`` (a file) or, failing that, the NETLOADER_TOKEN variable.

    Surrounding whitespace is stripped. A token shorter than 16 bytes is rejected: it could be
    guessed.
    """
    if path is not None:
        try:
            token = Path(path).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {str(path)!r}: {exc.strerror}") from None
        source = f"token file {str(path)!r}"
    elif env and os.environ.get(TOKEN_ENV):
        token = os.environ[TOKEN_ENV].encode().strip()
        source = f"environment variable {TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_BYTES:
        raise ConfigError(f"the token from {source} is shorter than {MIN_TOKEN_BYTES} bytes")
    return token
