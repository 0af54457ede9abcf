"""The server: serves one rank's tensors from background threads of a process that keeps working.

One server (one listener) serves every model its process holds for that rank, e.g. a
speculative-decoding target and its draft: each under its own name, picked by the identity a
client asks for.

Its parts, along a connection's way:

- ``listener``: one listening socket per rank; every connection gets a short-lived thread;
- ``server``: the ``Server`` itself: its models, its lifecycle, what it offers;
- ``listener``: one listening socket per rank; every connection gets a short-lived thread;
- ``dispatch``: one connection, from its greeting to the end of what it asked for;
- ``handshake``: the checks every model shares (protocol, token, transport);
- ``catalog``: the models served, by name; the identity, manifest and availability checks of
  each (``ServedModel``);
- ``admission``: transfer slots and the queue of clients waiting for one (shared by all models);
- ``session``: one accepted transfer, run by its transport, given a small ``SessionContext``;
- ``relays``: relay placement: the relays pulling or holding a model and where each should pull;
- ``integrity``: whether the server may still serve what it captured of a model.

Every check raises ``errors.Refusal``, which ``dispatch`` turns into the peer's Refuse message;
every wait has a bound; what happens is emitted as ``events`` (which also log it); and
``close()`` stops everything.

A relay's server starts before it holds anything (``tensors=None``): it listens at once, and
serves from ``provide(snapshot)`` on, each chunk as soon as it landed and was verified. Every
model is such an entry (``Served``): ``add(None, identity)`` makes another one wait for its
``provide``, and ``withdraw`` stops one model without touching the others.
"""

from netloader.server.catalog import Served, ServedModel
from netloader.server.server import PORT_RANGE, Server, write_address

__all__ = ["PORT_RANGE", "Served", "ServedModel", "Server", "write_address"]
