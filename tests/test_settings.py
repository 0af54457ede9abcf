"""Every setting is declared once, on its option field; the command line, the vLLM keys and the
Python API are built from those declarations, so each setting reaches all three the same way."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from netloader import cli, settings
from netloader.errors import ConfigError
from netloader.integrations.vllm.config import KEYS, NetloaderConfig
from netloader.options import PullOptions, ServeOptions, Timeouts, with_keywords
from netloader.rules import integer, parse_rate, parse_size
from netloader.settings import Setting, declared

README = Path(__file__).parent.parent / "README.md"


def flags_of(command: str) -> set[str]:
    """The option strings ``netloader COMMAND`` accepts."""
    root = cli._parser()
    sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    return {s for action in sub.choices[command]._actions for s in action.option_strings}


SERVE_LEAVES = settings.leaves(ServeOptions())
PULL_LEAVES = settings.leaves(PullOptions())


@pytest.mark.parametrize(
    ("leaf", "commands"),
    [(leaf, ("serve",)) for leaf in SERVE_LEAVES]
    + [(leaf, ("pull", "serve")) for leaf in PULL_LEAVES],
    ids=lambda v: v.dest if isinstance(v, settings.Leaf) else "",
)
def test_every_setting_has_a_flag_and_a_key_or_says_why_not(leaf, commands):
    setting = leaf.setting
    if setting.flag is None:
        assert setting.no_flag, f"{leaf.dest}: no flag and no reason"
    else:
        assert any(setting.flag in flags_of(c) for c in commands), setting.flag
    if setting.key is None:
        assert setting.no_key, f"{leaf.dest}: no vLLM key and no reason"
    else:
        assert setting.key in KEYS


def test_a_field_without_a_declaration_is_refused():
    """A future field that forgets its declaration fails the walk (and the test above)."""

    @dataclasses.dataclass(frozen=True)
    class Options:
        declared_one: int = declared(1, Setting("fine", integer(1), "--one", "ONE"))
        forgotten: int = 2

    with pytest.raises(TypeError, match="'forgotten' declares no Setting or Group"):
        settings.leaves(Options())


def test_the_walk_reaches_every_field():
    for options, found in ((ServeOptions(), SERVE_LEAVES), (PullOptions(), PULL_LEAVES)):
        assert {leaf.path[0] for leaf in found} == {f.name for f in dataclasses.fields(options)}
    # A group's skip holds a field out, with its reason: a server never connects.
    assert ("timeouts", "connect") not in {leaf.path for leaf in SERVE_LEAVES}
    assert ("timeouts", "connect") in {leaf.path for leaf in PULL_LEAVES}


def example(leaf: settings.Leaf) -> tuple[list[str], object]:
    """A non-default value for ``leaf``: as command-line arguments and as a JSON value."""
    setting = leaf.setting
    if isinstance(leaf.default, bool):
        return [setting.flag], not leaf.default
    rule = setting.cli_rule or setting.rule
    text = rule.example
    return [setting.flag, text], setting.rule.decode(setting.key, text)


def value_at(options: object, path: tuple[str, ...]) -> object:
    for name in path:
        options = getattr(options, name)
    return options


BOTH = [
    (leaf, kind)
    for kind, group in (("serve", SERVE_LEAVES), ("pull", PULL_LEAVES))
    for leaf in group
    if leaf.setting.flag and leaf.setting.key
]


@pytest.mark.parametrize(("leaf", "kind"), BOTH, ids=[f"{kind}:{leaf.dest}" for leaf, kind in BOTH])
def test_a_flag_and_its_key_give_the_same_value(leaf, kind):
    args, json_value = example(leaf)
    if kind == "serve":
        parsed = cli._parser().parse_args(["serve", "ckpt", *args])
        from_cli = cli._serve_options(parsed)
        from_vllm = NetloaderConfig.parse({leaf.setting.key: json_value}).serve_options("h", None)
    else:
        flags = flags_of("pull")
        if leaf.setting.flag in flags:
            from_cli = cli._pull_options(cli._parser().parse_args(["pull", "h:1", *args]))
        else:  # only serve --from relays, so only it has --no-placement
            parsed = cli._parser().parse_args(["serve", "--from", "h:1", *args])
            from_cli = cli._replica_pull_options(parsed, None)
        from_vllm = NetloaderConfig.parse({leaf.setting.key: json_value}).pull_options(None)
    got = value_at(from_cli, leaf.path)
    assert got != leaf.default, "the example must differ from the default, or this proves nothing"
    if leaf.path == ("timeouts", "handshake") and kind == "pull":
        # Declared difference: a vLLM client waits HANDSHAKE_TIMEOUT + CONNECT_TIMEOUT.
        assert value_at(from_vllm, leaf.path) == got + from_vllm.timeouts.connect
    else:
        assert value_at(from_vllm, leaf.path) == got


def test_chunk_size_bound_from_every_surface(capsys):
    for bad in ("65535", "268435457"):
        with pytest.raises(SystemExit) as exit_:
            cli._parser().parse_args(["serve", "ckpt", "--chunk-size", bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "argument --chunk-size" in err and f"chunk_size = {bad} is outside" in err, err
        assert "64KiB..256MiB" in err
        with pytest.raises(ConfigError, match=f"CHUNK_SIZE = {bad} is outside 64KiB..256MiB"):
            NetloaderConfig.parse({"CHUNK_SIZE": int(bad)})
        with pytest.raises(ConfigError, match=f"chunk_size = {bad} is outside 64KiB..256MiB"):
            ServeOptions(chunk_size=int(bad))
    for good in ("64KiB", "256MiB"):
        assert ServeOptions(chunk_size=good).chunk_size == parse_size(good)
        assert NetloaderConfig.parse({"CHUNK_SIZE": good}).serve.chunk_size == parse_size(good)


def test_defaults_that_differ_by_surface():
    parse = cli._parser().parse_args
    assert cli._serve_options(parse(["serve", "ckpt"])).timeouts.handshake == 30
    assert cli._pull_options(parse(["pull", "h:1"])).timeouts.handshake == 60
    # serve --from pulls with a client's handshake, whatever its server's is.
    replica = parse(["serve", "--from", "h:1", "--handshake-timeout", "7", "--idle-timeout", "9"])
    pulled = cli._replica_pull_options(replica, None)
    assert (pulled.timeouts.handshake, pulled.timeouts.idle) == (60, 9)
    cfg = NetloaderConfig.parse({})
    assert cfg.serve_options("h", None).timeouts.handshake == 30
    assert cfg.pull_options(None).timeouts.handshake == 35  # HANDSHAKE_TIMEOUT + CONNECT_TIMEOUT
    assert NetloaderConfig.parse({"LISTEN_PORT": 80}).serve.listen_port == 80  # no listener
    with pytest.raises(SystemExit):
        parse(["serve", "ckpt", "--listen-port", "80"])


def test_placement_keeps_its_old_name_discovery():
    assert NetloaderConfig.parse({"DISCOVERY": False}).pull_options(None).placement is False
    assert NetloaderConfig.parse({"PLACEMENT": False}).pull.placement is False
    with pytest.raises(ConfigError, match="give PLACEMENT or its old name DISCOVERY, not both"):
        NetloaderConfig.parse({"PLACEMENT": False, "DISCOVERY": False})
    with pytest.raises(ConfigError, match="PLACEMENT must be true or false, got 'no'"):
        NetloaderConfig.parse({"PLACEMENT": "no"})
    for flag in ("--no-placement", "--no-discovery"):
        args = cli._parser().parse_args(["serve", "--from", "h:1", flag])
        assert cli._replica_pull_options(args, None).placement is False
    options = with_keywords(PullOptions(), {"discovery": False})
    assert options.placement is False and options.discovery is False
    assert PullOptions().discovery is True


def test_new_keys_reach_the_options():
    cfg = NetloaderConfig.parse(
        {
            "MAX_WAITING": 0,
            "MAX_STREAMS": 2,
            "VERIFY_BEFORE_SEND": True,
            "CUDA_IPC": False,
            "STREAMS": 3,
            "VERIFY": False,
            "MAX_UPLOAD_RATE": "8Mbit/s",
        }
    )
    serve, pull = cfg.serve_options("h", None), cfg.pull_options(None)
    assert (serve.limits.max_waiting, serve.limits.max_streams) == (0, 2)
    assert (serve.verify_before_send, serve.cuda_ipc, serve.max_upload_rate) == (True, False, 1e6)
    assert (pull.streams, pull.verify) == (3, False)
    with pytest.raises(ConfigError, match=r"STREAMS must be an integer in 1\.\.64, got 65"):
        NetloaderConfig.parse({"STREAMS": 65})


def test_errors_name_the_flag_or_key_and_the_value(capsys):
    for argv, fragment in [
        (["pull", "h:1", "--streams", "abc"], "argument --streams: streams must be an integer"),
        (["serve", "ckpt", "--idle-timeout", "0"], "idle_timeout must be a positive number"),
        (["serve", "ckpt", "--max-upload-rate", "x"], "--max-upload-rate = 'x' is not a rate"),
        (["pull", "h:1", "--max-bytes", "lots"], "--max-bytes = 'lots' is not a size"),
    ]:
        with pytest.raises(SystemExit):
            cli._parser().parse_args(argv)
        assert fragment in capsys.readouterr().err
    with pytest.raises(ConfigError, match="MAX_WAITING must be an integer >= 0, got -1"):
        NetloaderConfig.parse({"MAX_WAITING": -1})
    with pytest.raises(ConfigError, match="idle_timeout must be a positive number"):
        Timeouts(idle=0)


def test_one_unit_parser_for_sizes_and_rates():
    assert parse_size("4MiB") == 4 << 20 == parse_size(4 << 20)
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_rate("4MiB/s") == 4 << 20
    assert parse_rate("8Mbit") == 1e6
    for bad in ("4Mbit", "fast", "-1", True):
        with pytest.raises(ConfigError, match="is not a size"):
            parse_size(bad)
    assert cli.parse_size("1GiB") == 1 << 30
    with pytest.raises(argparse.ArgumentTypeError, match="is outside >= 1MiB"):
        cli.parse_size("1KiB")


def test_readme_documents_every_key_and_flag():
    text = README.read_text()
    rows = {
        m
        for line in text.splitlines()
        if line.startswith("| `")
        for m in re.findall(r"`([A-Z0-9_]+)`", line.split("|")[1])
    }
    missing_keys = [k for k in KEYS if k not in rows]
    assert not missing_keys, f"keys missing from README's key table: {missing_keys}"
    flags = {s for c in ("serve", "pull", "info") for s in flags_of(c)} - {"-h", "--help"}
    missing_flags = sorted(f for f in flags if not re.search(rf"`[^`]*{f}\b[^`]*`", text))
    assert not missing_flags, f"flags missing from README: {missing_flags}"
