"""netloader: model weights peer-to-peer, from a running process to a starting one.

The core works with plain PyTorch::

    server = netloader.Server(tensors, netloader.Identity("my-model")).start()
    result = netloader.pull([server.address], netloader.Identity("my-model"), into=my_tensors)

The vLLM model-loader plugin (``--load-format netloader``) is a thin layer on top of this.
"""

from netloader.client import PullResult, info, pull
from netloader.errors import (
    AllSourcesFailed,
    Code,
    ConfigError,
    IntegrityError,
    NetloaderError,
    PeerClosed,
    ProtocolError,
    PullError,
    Refused,
    SourceUnreachable,
    TransferTimeout,
)
from netloader.identity import Identity
from netloader.manifest import Manifest, TensorSpec
from netloader.options import (
    ArtifactOptions,
    Limits,
    PullHooks,
    PullOptions,
    ServeOptions,
    Timeouts,
)
from netloader.server import Server
from netloader.snapshot import Snapshot

__version__ = "0.1.0"

__all__ = [
    "AllSourcesFailed",
    "ArtifactOptions",
    "Code",
    "ConfigError",
    "Identity",
    "IntegrityError",
    "Limits",
    "Manifest",
    "NetloaderError",
    "PeerClosed",
    "ProtocolError",
    "PullError",
    "PullHooks",
    "PullOptions",
    "PullResult",
    "Refused",
    "ServeOptions",
    "Server",
    "Snapshot",
    "SourceUnreachable",
    "TensorSpec",
    "Timeouts",
    "TransferTimeout",
    "info",
    "pull",
]
