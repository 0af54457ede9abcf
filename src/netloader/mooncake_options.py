"""The settings of the ``mooncake`` transport (Mooncake TransferEngine), shared by servers and
clients: whether a server offers it, and how this process's engine reaches its peers. A group
of its own, so that ``options`` stays one screen per object (see ``transport.mooncake``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from netloader.rules import NAMES, choice, optional
from netloader.settings import Setting, check_fields, declared

OFFER_MODES = ("auto", "on", "off")
PROTOCOLS = ("tcp", "rdma")


@dataclass(frozen=True)
class MooncakeOptions:
    """Mooncake TransferEngine: ``offer`` (servers only), ``protocol`` and ``devices``."""

    offer: str = declared(
        "auto",
        Setting(
            "offer the mooncake transport (one-sided reads of the served memory): auto = only "
            "when a token is set (the engine's own port has no authentication) and the protocol "
            "is rdma (over Mooncake's tcp protocol netloader's TCP is faster), on, or off",
            dataclasses.replace(choice(OFFER_MODES), example="on"),
            "--mooncake",
            "MOONCAKE",
        ),
    )
    protocol: str = declared(
        "tcp",
        Setting(
            "Mooncake TransferEngine protocol: tcp (any host) or rdma (RDMA NICs)",
            dataclasses.replace(choice(PROTOCOLS), example="rdma"),
            "--mooncake-protocol",
            "MOONCAKE_PROTOCOL",
        ),
    )
    devices: tuple[str, ...] | None = declared(
        None,
        Setting(
            "RDMA device names Mooncake may use, comma-separated (e.g. mlx5_0,mlx5_1)",
            dataclasses.replace(optional(NAMES), example="mlx5_0"),
            "--mooncake-devices",
            "MOONCAKE_DEVICES",
            unset="every device Mooncake finds",
        ),
    )

    def __post_init__(self) -> None:
        check_fields(self)
