"""One cache entry on disk: its files with their digests, and the factors it was built for.

The factors name everything the compiled code depends on (vLLM's own hash parts, torch,
Python, the CPU's instruction sets or the GPU's architecture). They are kept beside the files
in a small JSON sidecar, written by the instance that built the entry (or installed it), so
that any server, a ``netloader serve --compile-cache DIR`` too, can say what an entry is for.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from netloader.artifacts.kinds import Kind

#: The sidecar's name inside an entry; never offered as a file (the offer carries the factors).
SIDECAR = "netloader-artifact.json"


class EntryError(Exception):
    """An entry that cannot be offered as it is on disk (the message says why)."""


@dataclass(frozen=True)
class FileDigest:
    """One file of an entry: its path inside the entry (POSIX, relative), size and SHA-256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Entry:
    """``kind``'s entry ``key`` (its directory's name) in ``directory``, built for ``factors``.

    ``alias`` is the key a replica asks for: the one it can compute while its weights load.
    vLLM's own key can change before it compiles (on the CPU its KV-cache layout is set after
    the load), so an entry is found by the key known at load time and installed under the key
    vLLM gave it.
    """

    kind: Kind
    key: str
    directory: Path
    factors: dict[str, str]
    alias: str

    @classmethod
    def load(cls, kind: Kind, directory: Path) -> Entry | None:
        """The entry in ``directory``, if it has a sidecar of ``kind`` naming it."""
        try:
            meta = json.loads((directory / SIDECAR).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("kind") != kind.name:
            return None
        key, alias, factors = meta.get("key"), meta.get("alias"), meta.get("factors")
        if key != directory.name or not isinstance(alias, str) or not _is_factors(factors):
            return None
        return cls(kind, key, directory, factors, alias)

    def ready(self) -> bool:
        return self.kind.ready(self.directory)


def _is_factors(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def write_sidecar(
    directory: Path, kind: Kind, alias: str, factors: dict[str, str], key: str | None = None
) -> None:
    """Record what ``directory`` (entry ``key``, by default its name) is for, atomically (a
    reader sees all of it or none)."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"kind": kind.name, "key": key or directory.name, "alias": alias, "factors": factors}
    tmp = directory / f".{SIDECAR}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, directory / SIDECAR)


class CacheRoot:
    """The entries of ``kind`` under a cache ``root`` that carry a sidecar: what a
    ``--compile-cache DIR`` offers, and what a replica finds it has already."""

    def __init__(self, kind: Kind, root: Path, scan: int = 256):
        self.kind, self.root, self.scan = kind, Path(root), scan

    def entries(self) -> list[Entry]:
        base = self.root / self.kind.subdir
        try:
            names = sorted(n for n in os.listdir(base) if not n.startswith("."))[: self.scan]
        except OSError:
            return []
        found = (Entry.load(self.kind, base / name) for name in names)
        return [e for e in found if e is not None]

    def find(self, alias: str) -> Entry | None:
        return next((e for e in self.entries() if alias in (e.alias, e.key)), None)


@dataclass(frozen=True)
class Wanted:
    """``kind``'s entry asked for as ``alias`` (the key known while the weights load: see
    ``artifacts.entry.Entry``), built for ``factors``, to install under the cache ``root``."""

    kind: Kind
    alias: str
    factors: dict[str, str]
    root: Path

    def local(self) -> Entry | None:
        """The entry this host has for it already, if any."""
        return CacheRoot(self.kind, self.root).find(self.alias)


def list_files(directory: Path, max_files: int) -> list[str]:
    """Every regular file below ``directory`` (relative POSIX paths, sorted), the sidecar
    excepted. A symlink or any other special file makes the whole entry unfit to offer."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            mode = full.lstat().st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise EntryError(f"{full} is not a regular file or directory")
        found += [Path(dirpath, n).relative_to(directory).as_posix() for n in filenames]
        if len(found) > max_files + 1:
            raise EntryError(f"more than {max_files} files")
    return sorted(p for p in found if p != SIDECAR and not p.startswith("."))


class Digests:
    """SHA-256 of files, computed once per (path, size, mtime): an entry is asked for by many
    replicas, and hashing hundreds of MB of kernels for each would cost the seed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[tuple[str, int, int], str] = {}

    def of(self, path: Path) -> tuple[int, str]:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._known.get(key)
        if known is None:
            known = sha256_file(path)
            with self._lock:
                self._known[key] = known
        return st.st_size, known


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def host_factors(device: str) -> dict[str, str]:
    """What compiled code depends on beyond vLLM's hash: torch, Python, the machine, and the
    CPU's instruction sets (inductor builds C++ with ``-march=native``:
    ``torch/_inductor/cpp_builder.py``) or the GPU's architecture and CUDA version."""
    import torch

    factors = {
        "torch": torch.__version__,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "machine": platform.machine(),
    }
    if device == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        factors["gpu"] = f"{torch.cuda.get_device_name()} sm_{major}{minor}"
        factors["cuda"] = str(torch.version.cuda)
    else:
        factors["cpu_flags"] = " ".join(sorted(_cpu_flags()))
    return factors


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {platform.processor() or "unknown"}


def describe_difference(here: dict[str, str], there: dict[str, str]) -> str | None:
    """The first factor that differs, for people: ``torch: 2.13.0 here, 2.12.0 at the peer``;
    None when they match."""
    for name in sorted(set(here) | set(there)):
        mine, theirs = here.get(name), there.get(name)
        if mine == theirs:
            continue
        if mine and theirs and " " in mine + theirs:  # a set of words: the words that differ
            a, b = set(mine.split()), set(theirs.split())
            return f"{name} differ: only here {sorted(a - b)[:5]}, only at the peer {sorted(b - a)[:5]}"
        return f"{name}: {_short(mine)} here, {_short(theirs)} at the peer"
    return None


def _short(value: str | None) -> str:
    if value is None:
        return "absent"
    return value if len(value) <= 24 else value[:16] + "..."
