"""Netloader's settings, as given to vLLM in ``--model-loader-extra-config`` (a JSON object).

The keys are the declarations of ``NetloaderConfig``'s fields: the loader's own (SOURCE, MODEL,
...) here, and those of ``ServeOptions`` and ``PullOptions`` (see ``netloader.settings``). Every
key is checked: a wrong type, an unknown mode, a malformed SOURCE entry, an unknown key or an
unreadable CONFIG_FILE raises a ConfigError naming the key, the value and what is allowed. A bad
value is never silently replaced by a default.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netloader.client import parse_source
from netloader.client.transports import check_known
from netloader.errors import ConfigError
from netloader.integrations.vllm.capture import CAPTURE_MODES
from netloader.options import TOKEN_FILE, PullOptions, ServeOptions
from netloader.rules import NAMES, TEXT, Rule, choice, optional
from netloader.settings import (
    SETTING,
    Group,
    Setting,
    declared,
    former_keys,
    from_keys,
    key_table,
)

INT8_CACHE_MODES = ("hbm", "dram", "no")
_SOURCE_FORM = (
    'list of {"device_id": int, "sources": ["HOST:port", ...]}, or one "NAME:port" string'
)


@dataclass(frozen=True)
class Fleet:
    """``SOURCE`` as one ``"NAME:PORT"`` string: rank ``r`` takes from every address of
    ``host`` (resolved when its pull starts) at port ``base_port + r``."""

    host: str
    base_port: int

    def sources_for(self, rank: int) -> list[str]:
        port = self.base_port + rank
        if port > 65535:
            raise ConfigError(
                f"SOURCE = '{self.host}:{self.base_port}' gives rank {rank} port {port}, "
                "beyond 65535; use a lower base port or the list form"
            )
        return [f"{self.host}:{port}"]


def _parse_sources(name: str, value: Any) -> dict[int, tuple[str, ...]] | Fleet:
    if isinstance(value, str):
        try:
            return Fleet(*parse_source(value))
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be a {_SOURCE_FORM}, got {value!r}")
    out: dict[int, tuple[str, ...]] = {}
    for i, entry in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"device_id", "sources"}:
            raise ConfigError(
                f'{where} = {entry!r} must be an object with exactly "device_id" and "sources"'
            )
        device_id, sources = entry["device_id"], entry["sources"]
        if type(device_id) is not int or device_id < 0:
            raise ConfigError(f"{where}.device_id = {device_id!r} must be an int >= 0")
        if device_id in out:
            raise ConfigError(f"{where}: device_id {device_id} appears more than once in {name}")
        if not isinstance(sources, list):
            raise ConfigError(f'{where}.sources = {sources!r} must be a list of "IP:port" strings')
        for s in sources:
            try:
                parse_source(s)
            except ConfigError as exc:
                raise ConfigError(f"{where}.sources: {exc}") from None
        out[device_id] = tuple(sources)
    return out


def _path(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a path string, got {value!r}")
    return value


_SOURCE = Setting(
    _SOURCE_FORM + ". device_id is the worker's global rank; no entry for it: load from storage. "
    "A string: rank r takes from every address of NAME at port + r",
    Rule(_parse_sources),
    key="SOURCE",
)


@dataclass(frozen=True)
class NetloaderConfig:
    """The loader's settings: its own fields, then a server's and a client's options."""

    sources: dict[int, tuple[str, ...]] | Fleet = field(
        default_factory=dict, metadata={SETTING: _SOURCE}
    )
    model: str | None = declared(
        None,
        Setting(
            "model name for the identity check",
            optional(TEXT),
            key="MODEL",
            unset="the --model argument",
        ),
    )
    #: What this worker's server does (its host comes from vLLM, or LISTEN_HOST).
    serve: ServeOptions = declared(ServeOptions(), Group())  # noqa: RUF009 (frozen)
    #: How this worker pulls; its handshake clock is set in ``pull_options``.
    pull: PullOptions = declared(PullOptions(), Group())  # noqa: RUF009 (frozen)
    draft_model: str | None = declared(
        None,
        Setting(
            "speculative draft model's name for the identity check",
            optional(TEXT),
            key="DRAFT_MODEL",
            unset="its path",
        ),
    )
    capture: str = declared(
        "auto",
        Setting(
            f"one of {', '.join(CAPTURE_MODES)} (case-insensitive): where a server keeps what it "
            "serves of the loaded weights",
            choice(CAPTURE_MODES),
            key="CAPTURE",
        ),
    )
    int8_cache: str = declared(
        "no",
        Setting(
            f"one of {', '.join(INT8_CACHE_MODES)} (case-insensitive): where a server keeps "
            "pristine copies of int8 parameters",
            choice(INT8_CACHE_MODES),
            key="INT8_CACHE",
        ),
    )
    int8_cache_name: tuple[str, ...] | None = declared(
        None,
        Setting(
            "list of name fragments selecting the int8 parameters to cache",
            optional(NAMES),
            key="INT8_CACHE_NAME",
            unset="all",
        ),
    )
    config_file: str | None = declared(
        None,
        Setting(
            "path of a JSON file with these keys; its values win over inline ones",
            optional(Rule(_path)),
            key="CONFIG_FILE",
        ),
    )
    token_file: str | None = declared(None, TOKEN_FILE)
    listen_host: str | None = declared(
        None,
        Setting(
            "address the server binds to",
            optional(TEXT),
            key="LISTEN_HOST",
            unset="vLLM's host IP, VLLM_HOST_IP",
        ),
    )

    def sources_for(self, rank: int) -> list[str]:
        if isinstance(self.sources, Fleet):
            return self.sources.sources_for(rank)
        return list(self.sources.get(rank, ()))

    def pull_options(self, token: bytes | None) -> PullOptions:
        # The client's handshake clock also covers connecting; the server may queue it.
        timeouts = self.pull.timeouts
        handshake = self.serve.timeouts.handshake + timeouts.connect
        return dataclasses.replace(
            self.pull, token=token, timeouts=dataclasses.replace(timeouts, handshake=handshake)
        )

    def serve_options(self, host: str, token: bytes | None) -> ServeOptions:
        return dataclasses.replace(self.serve, host=self.listen_host or host, token=token)

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
                from_keys(cls(), from_file)
            except ConfigError as exc:
                raise ConfigError(f"CONFIG_FILE {path!r}: {exc}") from None
            values = {**values, **from_file}
        config = from_keys(cls(), values)
        check_known(config.pull.transports)  # TRANSPORTS naming one that cannot run here
        return config


#: Every key -> its help (with the default), in the order of NetloaderConfig's fields.
KEYS = key_table(NetloaderConfig())
#: Old key names still accepted -> the key each now is (DISCOVERY -> PLACEMENT).
FORMER_KEYS = former_keys(NetloaderConfig())


def _check_keys(values: Mapping[str, Any], where: str) -> None:
    unknown = sorted(k for k in values if k not in KEYS and k not in FORMER_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {where}; allowed: {', '.join(KEYS)}"
        )


def _read_config_file(path: Any) -> dict[str, Any]:
    _path("CONFIG_FILE", path)
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
