"""Receiving an offered entry into a cache root: checked, then installed whole or not at all.

Before anything is created, the offer is checked against the client's bounds (file count,
each size, the total) and every path must be a plain relative path inside the entry (no
absolute path, ``..``, empty or hidden component, nor the sidecar). The files are written into
a staging directory beside the entry (same filesystem), each hashed while it lands; only when
every file matched its digest is the staging directory renamed to the entry's name. On any
failure the staging directory is removed: nothing of a refused or failed fetch stays on disk.
An existing entry is never overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from netloader.artifacts.entry import SIDECAR, FileDigest, Wanted, write_sidecar

PIECE = 1 << 20


class Unfit(Exception):
    """An offer or a file that must not be installed (the message says why)."""


class EntryExists(Exception):
    """The entry is there already (a local compile, or another rank installed it first)."""


def check_offer(files: list[FileDigest], max_files: int, max_bytes: int) -> int:
    """The offer's total bytes, if it is within the bounds and every path is safe."""
    if len(files) > max_files:
        raise Unfit(f"{len(files)} files offered, more than the {max_files} allowed")
    total = sum(f.size for f in files)
    if total > max_bytes:
        raise Unfit(f"{total} bytes offered, more than the {max_bytes} allowed")
    seen: set[str] = set()
    for f in files:
        check_path(f.path)
        if f.path in seen:
            raise Unfit(f"path {f.path!r} is offered twice")
        seen.add(f.path)
    return total


def check_path(path: str) -> None:
    parts = PurePosixPath(path).parts
    if (
        not parts
        or path.startswith("/")
        or "\\" in path
        or "\0" in path
        or path != "/".join(parts)
        or any(p in ("", ".", "..") or p.startswith(".") for p in parts)
        or path == SIDECAR
    ):
        raise Unfit(f"offered path {path[:120]!r} is not a plain path inside the entry")


def install(
    wanted: Wanted, key: str, files: list[FileDigest], read: Callable[[int], bytes | bytearray]
) -> Path:
    """Write ``files`` (their bytes from ``read(n)``, in order) as ``wanted``'s entry, named
    ``key``, then rename it into place; its directory."""
    final = wanted.kind.entry_dir(wanted.root, key)
    if final.exists():
        raise EntryExists(f"{final} exists")
    created = [p for p in (final.parent, *final.parent.parents) if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.netloader-", dir=final.parent))
    try:
        for f in files:
            _receive(staging, f, read)
        write_sidecar(staging, wanted.kind, wanted.alias, wanted.factors, key)
        try:
            os.rename(staging, final)  # fails if an entry appeared meanwhile with content
        except OSError as exc:
            raise EntryExists(f"{final} appeared meanwhile: {exc.strerror}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in created:  # innermost first; each only if still empty
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    return final


def _receive(staging: Path, f: FileDigest, read: Callable[[int], bytes | bytearray]) -> None:
    target = staging.joinpath(*PurePosixPath(f.path).parts)
    if not target.resolve().is_relative_to(staging.resolve()):
        raise Unfit(f"offered path {f.path!r} leaves the entry")
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, 0o600)
    except OSError as exc:
        raise Unfit(f"cannot create {f.path!r}: {exc.strerror}") from None
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
        left = f.size
        while left:
            piece = read(min(left, PIECE))
            digest.update(piece)
            out.write(piece)
            left -= len(piece)
    if digest.hexdigest() != f.sha256:
        raise Unfit(f"{f.path!r} does not match its digest")
