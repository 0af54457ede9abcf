"""--model-loader-extra-config parsing: every bad value is an error naming key, value and rule."""

import json

import pytest

from netloader.errors import ConfigError
from netloader.integrations.vllm.config import NetloaderConfig


def test_defaults():
    cfg = NetloaderConfig.parse({})
    assert cfg == NetloaderConfig()
    assert cfg.sources_for(0) == []
    assert cfg.int8_cache == "no"


def test_full_config():
    cfg = NetloaderConfig.parse(
        {
            "SOURCE": [
                {"device_id": 0, "sources": ["10.0.0.1:7000", "10.0.0.2:7000"]},
                {"device_id": 1, "sources": ["10.0.0.1:7001"]},
            ],
            "MODEL": "llama",
            "DRAFT_MODEL": "llama-draft",
            "LISTEN_PORT": 7000,
            "INT8_CACHE": "DRAM",
            "INT8_CACHE_NAME": ["mlp", "down_proj"],
            "OUTPUT_PREFIX": "/tmp/addr_",
        }
    )
    assert cfg.sources_for(0) == ["10.0.0.1:7000", "10.0.0.2:7000"]
    assert cfg.sources_for(1) == ["10.0.0.1:7001"]
    assert cfg.sources_for(2) == []
    assert (cfg.model, cfg.serve.listen_port, cfg.int8_cache) == ("llama", 7000, "dram")
    assert cfg.draft_model == "llama-draft"
    assert cfg.int8_cache_name == ("mlp", "down_proj")
    assert cfg.serve.output_prefix == "/tmp/addr_"


def test_limits_and_security_keys():
    cfg = NetloaderConfig.parse(
        {
            "TOKEN_FILE": "/etc/netloader/token",
            "LISTEN_HOST": "0.0.0.0",
            "MAX_CLIENTS": 8,
            "CONNECT_TIMEOUT": 2,
            "HANDSHAKE_TIMEOUT": 10.5,
            "IDLE_TIMEOUT": 60,
        }
    )
    assert cfg.token_file == "/etc/netloader/token"
    serve = cfg.serve_options("10.0.0.1", None)
    assert (serve.host, serve.limits.max_clients) == ("0.0.0.0", 8)
    assert (serve.timeouts.handshake, serve.timeouts.idle) == (10.5, 60)
    pull = cfg.pull_options(None)
    # The client's handshake clock covers connecting too.
    assert (pull.timeouts.connect, pull.timeouts.handshake, pull.timeouts.idle) == (2, 12.5, 60)


def test_out_of_range_port_is_accepted_here():
    """A port outside 1024..65535 means "no listener" (warned at start), not a config error."""
    assert NetloaderConfig.parse({"LISTEN_PORT": 80}).serve.listen_port == 80


def test_config_file_wins(tmp_path):
    path = tmp_path / "nl.json"
    path.write_text(
        json.dumps({"SOURCE": [{"device_id": 0, "sources": ["1.2.3.4:5"]}], "MODEL": "f"})
    )
    cfg = NetloaderConfig.parse(
        {
            "SOURCE": [{"device_id": 0, "sources": ["9.9.9.9:9"]}],
            "MODEL": "inline",
            "LISTEN_PORT": 7000,
            "CONFIG_FILE": str(path),
        }
    )
    assert cfg.sources_for(0) == ["1.2.3.4:5"]
    assert cfg.model == "f"
    assert cfg.serve.listen_port == 7000  # inline keys the file does not set stay


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        ({"PORT": 1}, ["'PORT'", "allowed: SOURCE, MODEL, LISTEN_PORT"]),
        ({"SOURCE": 7000}, ["SOURCE must be a list", 'or one "NAME:port" string', "got 7000"]),
        ({"SOURCE": [{"device_id": 0}]}, ["SOURCE[0]", '"device_id" and "sources"']),
        (
            {"SOURCE": [{"device_id": "0", "sources": []}]},
            ["SOURCE[0].device_id = '0'", "int >= 0"],
        ),
        ({"SOURCE": [{"device_id": -1, "sources": []}]}, ["device_id = -1"]),
        ({"SOURCE": [{"device_id": 0, "sources": "a:1"}]}, ["SOURCE[0].sources = 'a:1'"]),
        ({"SOURCE": [{"device_id": 0, "sources": ["nohost"]}]}, ["SOURCE[0].sources", "'nohost'"]),
        ({"SOURCE": [{"device_id": 0, "sources": ["h:99999"]}]}, ["'h:99999'", "1..65535"]),
        (
            {"SOURCE": [{"device_id": 0, "sources": []}, {"device_id": 0, "sources": []}]},
            ["device_id 0 appears more than once"],
        ),
        ({"SOURCE": [{"device_id": 0, "sources": [], "x": 1}]}, ["SOURCE[0]"]),
        ({"MODEL": 3}, ["MODEL must be a non-empty string, got 3"]),
        ({"MODEL": ""}, ["MODEL must be a non-empty string"]),
        ({"DRAFT_MODEL": ["d"]}, ["DRAFT_MODEL must be a non-empty string, got ['d']"]),
        ({"LISTEN_PORT": "7000"}, ["LISTEN_PORT must be an integer, got '7000'"]),
        ({"LISTEN_PORT": True}, ["LISTEN_PORT must be an integer, got True"]),
        ({"LISTEN_PORT": 70.5}, ["LISTEN_PORT must be an integer, got 70.5"]),
        ({"INT8_CACHE": "ssd"}, ["INT8_CACHE = 'ssd'", "hbm, dram, no"]),
        ({"INT8_CACHE": 1}, ["INT8_CACHE = 1"]),
        ({"INT8_CACHE_NAME": "mlp"}, ["INT8_CACHE_NAME must be a list", "'mlp'"]),
        ({"INT8_CACHE_NAME": [""]}, ["INT8_CACHE_NAME must be a list of non-empty strings"]),
        ({"OUTPUT_PREFIX": ["a"]}, ["OUTPUT_PREFIX must be a non-empty string"]),
        ({"CONFIG_FILE": 5}, ["CONFIG_FILE must be a path string, got 5"]),
        ({"CONFIG_FILE": "/nonexistent/nl.json"}, ["'/nonexistent/nl.json' cannot be read"]),
        ({"TOKEN_FILE": 1}, ["TOKEN_FILE must be a non-empty string, got 1"]),
        ({"LISTEN_HOST": ""}, ["LISTEN_HOST must be a non-empty string"]),
        ({"MAX_CLIENTS": 0}, ["MAX_CLIENTS must be an integer >= 1, got 0"]),
        ({"MAX_CLIENTS": 2.5}, ["MAX_CLIENTS must be an integer >= 1, got 2.5"]),
        ({"IDLE_TIMEOUT": -1}, ["IDLE_TIMEOUT must be a positive number of seconds, got -1"]),
        ({"CONNECT_TIMEOUT": "5"}, ["CONNECT_TIMEOUT must be a positive number of seconds"]),
        ({"HANDSHAKE_TIMEOUT": True}, ["HANDSHAKE_TIMEOUT must be a positive number"]),
    ],
)
def test_bad_values(extra, fragments):
    with pytest.raises(ConfigError) as info:
        NetloaderConfig.parse(extra)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object, got list"),
        ('{"SOURCES": []}', "unknown key(s) 'SOURCES'"),
        ('{"CONFIG_FILE": "x"}', "may not name another CONFIG_FILE"),
        ('{"INT8_CACHE": "maybe"}', "INT8_CACHE = 'maybe'"),
    ],
)
def test_bad_config_files(tmp_path, content, fragment):
    path = tmp_path / "nl.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        NetloaderConfig.parse({"CONFIG_FILE": str(path)})
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_not_an_object():
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        NetloaderConfig.parse([1])


def test_source_as_one_name_gives_every_rank_its_own_port():
    """``"SOURCE": "NAME:PORT"``: rank r takes from NAME at PORT + r (every address of the
    name, resolved when the pull starts); a bad string or a port past 65535 is named."""
    cfg = NetloaderConfig.parse({"SOURCE": "seeds.llm.svc.cluster.local:7000"})
    assert cfg.sources_for(0) == ["seeds.llm.svc.cluster.local:7000"]
    assert cfg.sources_for(3) == ["seeds.llm.svc.cluster.local:7003"]
    with pytest.raises(ConfigError, match=r"SOURCE: source 'seeds' is not 'host:port'"):
        NetloaderConfig.parse({"SOURCE": "seeds"})
    with pytest.raises(ConfigError, match="rank 1 port 65536, beyond 65535"):
        NetloaderConfig.parse({"SOURCE": "seeds:65535"}).sources_for(1)
