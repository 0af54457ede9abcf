"""The settings of compile artifacts (``netloader.artifacts``), shared by a server and the vLLM
client: whether they travel, and the most one cache entry may hold. A group of its own, so
that ``options`` stays one screen per object."""

from __future__ import annotations

from dataclasses import dataclass

from netloader.rules import choice, integer, size
from netloader.settings import Setting, check_fields, declared

ARTIFACT_MODES = ("off", "token", "trusted-network")


@dataclass(frozen=True)
class ArtifactOptions:
    """Whether compile artifacts (native code the receiver runs) travel, and the most one
    cache entry may hold: a server offers and a vLLM client takes none beyond these."""

    mode: str = declared(
        "token",
        Setting(
            "token: compile artifacts travel only between peers that proved the shared token; "
            "trusted-network: also without a token (a WARNING says so); off: never",
            choice(ARTIFACT_MODES),
            "--artifacts",
            "ARTIFACTS",
        ),
    )
    max_files: int = declared(
        100_000,
        Setting(
            "the most files of one compile-cache entry offered or taken",
            integer(1),
            "--artifacts-max-files",
            "ARTIFACTS_MAX_FILES",
        ),
    )
    max_bytes: int = declared(
        8 << 30,
        Setting(
            "the most bytes of one compile-cache entry offered or taken",
            size(1),
            "--artifacts-max-bytes",
            "ARTIFACTS_MAX_BYTES",
        ),
    )

    def __post_init__(self) -> None:
        check_fields(self)
