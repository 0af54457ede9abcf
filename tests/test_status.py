"""``netloader status``: what a live server is doing, as one JSON object, behind the token."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import RawClient, all_cases, in_process_server, wait_for

from netloader import Identity, Refused, Server, pull
from netloader.client import status
from netloader.protocol import PROTOCOL_VERSION, Refuse, StatusReply, StatusRequest

NETLOADER = [sys.executable, "-m", "netloader"]
IDENT = Identity("test-model")
TOKEN = b"status-test-shared-secret-0123456789"


def counted(address: str) -> tuple[int, int]:
    """The transfers verified and bytes served of the one model at ``address``."""
    (model,) = status(address, token=TOKEN)["models"]
    return model["transfers_verified"], model["bytes_served"]


def test_status_reports_models_bytes_relays_and_refusals_by_code(tmp_path):
    """After one verified pull, two refusals of another model and a relay that pulled (and
    stays a member), the status says so; the CLI prints the same object; without the token
    the status is refused (by the client, and by the server when asked anyway)."""
    with in_process_server(all_cases(), token=TOKEN) as seed:
        size = pull(seed.address, IDENT, token=TOKEN).total_bytes
        for _ in range(2):
            with pytest.raises(Refused):
                pull(seed.address, Identity("another-model"), token=TOKEN)
        with Server(None, IDENT, token=TOKEN).start() as relay:
            pull(seed.address, IDENT, token=TOKEN, relay=relay)
            # The seed counts a transfer once it heard the client's verdict, just after the pull.
            wait_for(lambda: counted(seed.address) == (2, 2 * size), 10, "both transfers counted")
            found = status(seed.address, token=TOKEN)
            token_file = tmp_path / "token"
            token_file.write_bytes(TOKEN)
            cli = subprocess.run(
                [*NETLOADER, "status", seed.address, "--token-file", str(token_file)],
                capture_output=True,
                text=True,
                timeout=120,
            )
        with pytest.raises(Refused, match="requires a shared token"):
            status(seed.address)
        # The server itself refuses a status request without the token's proof.
        raw = RawClient(seed.address)
        raw.channel.send(StatusRequest(PROTOCOL_VERSION, raw.hello.nonce, None))
        refused = raw.channel.recv_any(StatusReply, Refuse)
        raw.close()
    assert isinstance(refused, Refuse) and refused.code == "auth", refused
    (model,) = found["models"]
    assert model["model"] == "test-model" and model["ready"] and model["bytes"] == size
    assert model["relays"] == 1 and model["relay_addresses"] == [relay.address]
    assert model["transfers_verified"] == 2 and model["bytes_served"] == 2 * size
    assert found["bytes_served"] == 2 * size
    assert found["refusals"] == {"model": 2}
    assert found["transfers_active"] == 0 and found["transfers_queued"] == 0
    assert cli.returncode == 0, cli.stderr
    printed = json.loads(cli.stdout)
    assert printed["source"] == seed.address
    assert printed["models"][0]["model"] == "test-model"
    assert printed["refusals"] == {"model": 2}
