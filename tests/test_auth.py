"""Shared-secret authentication: both sides prove they know the token before anything leaves,
and the token itself never shows up anywhere."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import all_cases, assert_same, in_process_server
from test_timeouts import StallingServer

from netloader import ConfigError, Identity, Refused, info, pull
from netloader.auth import load_token

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
    for args in (["info", server.address, "--token-file", str(token_file)],
                 ["pull", server.address, "--token-file", str(token_file), "-v"],
                 ["pull", server.address, "-v"]):  # fmt: skip
        proc = subprocess.run([NETLOADER, *args], capture_output=True, text=True, timeout=60)
        assert secret not in proc.stdout + proc.stderr
    assert '"model": "test-model"' in subprocess.run(
        [NETLOADER, "info", server.address, "--token-file", str(token_file)],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip


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
