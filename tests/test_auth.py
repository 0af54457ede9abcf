"""Shared-secret authentication: both sides prove they know the token before anything leaves,
and the token itself never shows up anywhere."""

import hashlib
import hmac
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import RawClient, all_cases, assert_same, in_process_server
from test_timeouts import StallingServer

from netloader import ConfigError, Identity, Refused, info, pull
from netloader.auth import load_token
from netloader.protocol import PROTOCOL_VERSION, Accept, PullRequest, Refuse

IDENT = Identity("test-model")
TOKEN = b"correct-horse-battery-staple-42"
OTHER = b"another-secret-entirely-different"
NETLOADER = str(Path(sys.executable).with_name("netloader"))


@pytest.fixture
def server(caplog):
    caplog.set_level(logging.DEBUG, "netloader")
    srv = in_process_server(all_cases(), token=TOKEN)
    yield srv
    srv.close()


def test_right_token_pulls_and_reads_info(server):
    assert_same(all_cases(), pull(server.address, IDENT, token=TOKEN).tensors)
    assert info(server.address, token=TOKEN).tensors == len(all_cases())


def test_missing_token_is_refused_before_anything_leaves(server, caplog):
    with pytest.raises(Refused) as err:
        pull(server.address, IDENT)
    assert err.value.code == "auth"
    assert "server requires a shared token" in str(err.value)
    with pytest.raises(Refused, match="requires a shared token"):
        info(server.address)


def test_wrong_token_is_refused_on_both_sides(server, caplog):
    with pytest.raises(Refused) as err:
        pull(server.address, IDENT, token=OTHER)
    assert err.value.code == "auth"
    assert "wrong token" in str(err.value)
    assert "authentication failed: wrong token" in caplog.text  # the server logged it
    assert not err.value.partial
    with pytest.raises(Refused, match="wrong token"):
        info(server.address, token=OTHER)


def test_client_with_token_refuses_a_server_without_one():
    srv = in_process_server(all_cases())
    try:
        with pytest.raises(Refused, match="server does not authenticate"):
            pull(srv.address, IDENT, token=TOKEN)
    finally:
        srv.close()


def test_client_refuses_an_impostor_that_cannot_prove_the_token():
    """A fake server that claims to authenticate and accepts anything, with a made-up proof."""
    fake = StallingServer(all_cases(), prefix=0, claims_auth=True)
    try:
        with pytest.raises(Refused, match="server failed to prove it knows the token"):
            pull(fake.address, IDENT, token=TOKEN)
    finally:
        fake.close()


def test_token_never_appears_in_logs_errors_or_output(server, caplog, tmp_path):
    secret = TOKEN.decode()
    for attempt in (None, OTHER, TOKEN):
        try:
            pull(server.address, IDENT, token=attempt)
        except Refused as exc:
            assert secret not in str(exc)
    assert secret not in caplog.text
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN + b"\n")
    for args, status in ((["info", server.address, "--token-file", str(token_file)], 0),
                         (["-v", "pull", server.address, "--token-file", str(token_file)], 0),
                         (["-v", "pull", server.address], 1)):  # fmt: skip
        proc = subprocess.run([NETLOADER, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == status, proc.stderr
        assert secret not in proc.stdout + proc.stderr
    assert '"model": "test-model"' in subprocess.run(
        [NETLOADER, "info", server.address, "--token-file", str(token_file)],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip


@pytest.mark.parametrize(
    "token, status, message",
    [
        (TOKEN, 0, None),
        (OTHER, 1, "authentication failed: wrong token"),
        (None, 1, "server requires a shared token"),
    ],
)
def test_cli_exit_status(server, tmp_path, token, status, message):
    """0 when the pull went through; 1, with one line naming the cause, when it was refused."""
    args = [NETLOADER, "pull", server.address]
    if token is not None:
        (tmp_path / "token").write_bytes(token)
        args += ["--token-file", str(tmp_path / "token")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stderr
    if message is None:
        assert proc.stdout.startswith("pulled "), proc.stdout
    else:
        assert proc.stderr.strip().count("\n") == 0, proc.stderr
        assert proc.stderr.startswith("netloader pull: failed: ") and message in proc.stderr
        assert not proc.stdout


def client_proof(token: bytes, server_nonce: str, client_nonce: str) -> str:
    """HMAC-SHA256 of the conversation, as a client proves it knows the token for a pull."""
    message = "\0".join(("netloader", "client", "pull", server_nonce, client_nonce)).encode()
    return hmac.new(token, message, hashlib.sha256).hexdigest()


def test_replayed_proof_is_refused(server, caplog):
    """A PullRequest with a valid proof, captured and sent again on a new connection, is bound
    to the first connection's Hello nonce: the server refuses it."""
    first = RawClient(server.address)
    nonce = "cd" * 16
    request = PullRequest(
        PROTOCOL_VERSION,
        IDENT,
        None,
        ["tcp"],
        1,
        nonce,
        client_proof(TOKEN, first.hello.nonce, nonce),
    )
    first.channel.send(request)
    assert isinstance(first.channel.recv_any(Accept, Refuse), Accept)  # valid where it was made
    first.close()

    second = RawClient(server.address)
    assert second.hello.auth and second.hello.nonce != first.hello.nonce
    second.channel.send(request)
    answer = second.channel.recv_any(Accept, Refuse)
    second.close()
    assert isinstance(answer, Refuse), answer
    assert answer.code == "auth" and answer.reason == "authentication failed: wrong token"


def test_token_from_environment(server):
    env = {**os.environ, "NETLOADER_TOKEN": TOKEN.decode()}
    proc = subprocess.run(
        [NETLOADER, "pull", server.address], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_server_without_token_says_so_once(caplog):
    caplog.set_level(logging.WARNING, "netloader")
    srv = in_process_server(all_cases())
    try:
        pull(srv.address, IDENT)
        pull(srv.address, IDENT)
    finally:
        srv.close()
    assert caplog.text.count("anyone who can reach this port can read the weights") == 1


def test_token_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read token file"):
        load_token(tmp_path / "missing")
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ConfigError, match="shorter than 16 bytes"):
        load_token(short)
