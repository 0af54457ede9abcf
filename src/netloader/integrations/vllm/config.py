"""Netloader's settings, as given to vLLM in ``--model-loader-extra-config`` (a JSON object).

Every key is checked: a wrong type, an unknown mode, a malformed SOURCE entry, an unknown key or
an unreadable CONFIG_FILE raises a ConfigError naming the key, the value and what is allowed. A
bad value is never silently replaced by a default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netloader.client import parse_source
from netloader.errors import ConfigError, check_seconds
from netloader.options import (
    DEFAULT_CHUNK,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_SOURCES,
    SERVER_HANDSHAKE_TIMEOUT,
    Limits,
    PullOptions,
    ServeOptions,
    Timeouts,
    parse_rate,
)
from netloader.plan import MAX_CHUNK, MIN_CHUNK

INT8_CACHE_MODES = ("hbm", "dram", "no")

KEYS = {
    "SOURCE": 'list of {"device_id": int, "sources": ["IP:port", ...]}',
    "MODEL": "model name for the identity check (default: the --model argument)",
    "LISTEN_PORT": "base port: each worker listens on LISTEN_PORT + rank (default: a free port)",
    "INT8_CACHE": f"one of {', '.join(INT8_CACHE_MODES)} (case-insensitive; default no)",
    "INT8_CACHE_NAME": "list of name fragments selecting the int8 parameters to cache",
    "OUTPUT_PREFIX": "each rank writes {OUTPUT_PREFIX}{rank}.txt holding IP:port",
    "CONFIG_FILE": "path of a JSON file with these keys; its values win over inline ones",
    "TOKEN_FILE": "file holding a shared secret; peers must prove they know it",
    "LISTEN_HOST": "address the server binds to (default: vLLM's host IP, VLLM_HOST_IP)",
    "MAX_CLIENTS": "concurrent transfers a server runs; more clients wait (default 4)",
    "CONNECT_TIMEOUT": "seconds to connect to a source (default 5)",
    "HANDSHAKE_TIMEOUT": "seconds for a whole handshake, queueing for a slot included (default 30)",
    "IDLE_TIMEOUT": "seconds a transfer may go without completing a chunk (default 30)",
    "MAX_SOURCES": f"sources of a rank delivering chunks at once (default {DEFAULT_MAX_SOURCES})",
    "MAX_UPLOAD_RATE": "bytes/s a server sends at most, all peers together: a number or a "
    "string like 100MB/s or 800Mbit/s (default: no cap)",
    "CHUNK_SIZE": "bytes per chunk this worker's server cuts its weights into (default 4 MiB; "
    "65536..268435456); smaller chunks shorten each relay hop on slow links",
    "DISCOVERY": "true (default): a source may send this instance to peers ahead of it, which "
    "relay as they receive; false: use only the SOURCE addresses",
    "DRAFT_MODEL": "speculative draft model's name for the identity check (default: its path)",
}


@dataclass(frozen=True)
class NetloaderConfig:
    sources: dict[int, tuple[str, ...]] = field(default_factory=dict)
    model: str | None = None
    draft_model: str | None = None
    listen_port: int | None = None
    int8_cache: str = "no"
    int8_cache_name: tuple[str, ...] | None = None
    output_prefix: str | None = None
    token_file: str | None = None
    listen_host: str | None = None
    max_clients: int = Limits.max_clients
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    handshake_timeout: float = SERVER_HANDSHAKE_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_sources: int = DEFAULT_MAX_SOURCES
    max_upload_rate: float | None = None
    discovery: bool = True
    chunk_size: int = DEFAULT_CHUNK

    def sources_for(self, rank: int) -> list[str]:
        return list(self.sources.get(rank, ()))

    def pull_options(self, token: bytes | None) -> PullOptions:
        # The client's handshake clock also covers connecting; the server may queue it.
        timeouts = Timeouts(
            connect=self.connect_timeout,
            handshake=self.handshake_timeout + self.connect_timeout,
            idle=self.idle_timeout,
        )
        return PullOptions(
            token=token,
            timeouts=timeouts,
            max_sources=self.max_sources,
            discovery=self.discovery,
        )

    def serve_options(self, host: str, token: bytes | None) -> ServeOptions:
        return ServeOptions(
            host=self.listen_host or host,
            listen_port=self.listen_port,
            output_prefix=self.output_prefix,
            token=token,
            limits=Limits(max_clients=self.max_clients),
            timeouts=Timeouts(handshake=self.handshake_timeout, idle=self.idle_timeout),
            max_upload_rate=self.max_upload_rate,
            chunk_size=self.chunk_size,
        )

    @classmethod
    def parse(cls, extra: Mapping[str, Any] | None) -> NetloaderConfig:
        """Validate an extra-config object; CONFIG_FILE's values take priority over inline ones."""
        if extra is None:
            extra = {}
        if not isinstance(extra, Mapping):
            raise ConfigError(
                f"model loader extra config must be a JSON object, got {type(extra).__name__}"
            )
        values = dict(extra)
        _check_keys(values, "model loader extra config")
        path = values.get("CONFIG_FILE")
        if path is not None:
            from_file = _read_config_file(path)
            try:
                cls._from_values(from_file)
            except ConfigError as exc:
                raise ConfigError(f"CONFIG_FILE {path!r}: {exc}") from None
            values = {**values, **from_file}
        return cls._from_values(values)

    @classmethod
    def _from_values(cls, values: Mapping[str, Any]) -> NetloaderConfig:
        return cls(
            sources=_parse_sources(values.get("SOURCE")),
            model=_optional_str(values, "MODEL"),
            draft_model=_optional_str(values, "DRAFT_MODEL"),
            listen_port=_optional_int(values, "LISTEN_PORT"),
            int8_cache=_int8_mode(values.get("INT8_CACHE")),
            int8_cache_name=_name_fragments(values.get("INT8_CACHE_NAME")),
            output_prefix=_optional_str(values, "OUTPUT_PREFIX"),
            token_file=_optional_str(values, "TOKEN_FILE"),
            listen_host=_optional_str(values, "LISTEN_HOST"),
            max_clients=_positive(values, "MAX_CLIENTS", Limits.max_clients, integer=True),
            connect_timeout=_positive(values, "CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
            handshake_timeout=_positive(values, "HANDSHAKE_TIMEOUT", SERVER_HANDSHAKE_TIMEOUT),
            idle_timeout=_positive(values, "IDLE_TIMEOUT", DEFAULT_IDLE_TIMEOUT),
            max_sources=_positive(values, "MAX_SOURCES", DEFAULT_MAX_SOURCES, integer=True),
            max_upload_rate=_rate(values.get("MAX_UPLOAD_RATE")),
            discovery=_flag(values, "DISCOVERY", default=True),
            chunk_size=_chunk_size(values.get("CHUNK_SIZE")),
        )


def _check_keys(values: Mapping[str, Any], where: str) -> None:
    unknown = sorted(k for k in values if k not in KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {where}; allowed: {', '.join(KEYS)}"
        )


def _read_config_file(path: Any) -> dict[str, Any]:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"CONFIG_FILE must be a path string, got {path!r}")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"CONFIG_FILE {path!r} cannot be read: {exc.strerror or exc}") from None
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"CONFIG_FILE {path!r} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"CONFIG_FILE {path!r} must hold a JSON object, got {type(values).__name__}"
        )
    _check_keys(values, f"CONFIG_FILE {path!r}")
    if "CONFIG_FILE" in values:
        raise ConfigError(f"CONFIG_FILE {path!r} may not name another CONFIG_FILE")
    return values


def _parse_sources(value: Any) -> dict[int, tuple[str, ...]]:
    allowed = KEYS["SOURCE"]
    if value is None:
        return {}
    if not isinstance(value, list):
        raise ConfigError(f"SOURCE must be a {allowed}, got {value!r}")
    out: dict[int, tuple[str, ...]] = {}
    for i, entry in enumerate(value):
        where = f"SOURCE[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"device_id", "sources"}:
            raise ConfigError(
                f'{where} = {entry!r} must be an object with exactly "device_id" and "sources"'
            )
        device_id, sources = entry["device_id"], entry["sources"]
        if type(device_id) is not int or device_id < 0:
            raise ConfigError(f"{where}.device_id = {device_id!r} must be an int >= 0")
        if device_id in out:
            raise ConfigError(f"{where}: device_id {device_id} appears more than once in SOURCE")
        if not isinstance(sources, list):
            raise ConfigError(f'{where}.sources = {sources!r} must be a list of "IP:port" strings')
        for s in sources:
            try:
                parse_source(s)
            except ConfigError as exc:
                raise ConfigError(f"{where}.sources: {exc}") from None
        out[device_id] = tuple(sources)
    return out


def _optional_str(values: Mapping[str, Any], key: str) -> str | None:
    value = values.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a non-empty string, got {value!r}")
    return value


def _optional_int(values: Mapping[str, Any], key: str) -> int | None:
    value = values.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return value


def _positive(values: Mapping[str, Any], key: str, default: float, *, integer: bool = False) -> Any:
    value = values.get(key)
    if value is None:
        return default
    if not integer:
        check_seconds(**{key: value})
    elif type(value) is not int or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _int8_mode(value: Any) -> str:
    if value is None:
        return "no"
    if not isinstance(value, str) or value.lower() not in INT8_CACHE_MODES:
        raise ConfigError(
            f"INT8_CACHE = {value!r} is not allowed; use one of {', '.join(INT8_CACHE_MODES)}"
        )
    return value.lower()


def _name_fragments(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"INT8_CACHE_NAME must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def _rate(value: Any) -> float | None:
    return None if value is None else parse_rate(value, "MAX_UPLOAD_RATE")


def _flag(values: Mapping[str, Any], key: str, *, default: bool) -> bool:
    value = values.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _chunk_size(value: Any) -> int:
    if value is None:
        return DEFAULT_CHUNK
    if type(value) is not int or not MIN_CHUNK <= value <= MAX_CHUNK:
        raise ConfigError(
            f"CHUNK_SIZE = {value!r} must be an integer number of bytes in {MIN_CHUNK}..{MAX_CHUNK}"
        )
    return value
