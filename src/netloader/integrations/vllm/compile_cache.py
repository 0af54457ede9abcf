"""vLLM's compile cache travels beside the weights (kind ``vllm-torch-compile``).

While its weights are pulled, a worker works out the cache keys vLLM will use for its own
compile, with vLLM's own functions (``vllm/compilation/decorators.py``: the AOT hash of
``aot_compile_hash_factors(vllm_config)`` plus ``_model_hash_key(forward)`` of each compiled
module), and fetches those entries from its source into its own ``VLLM_CACHE_ROOT``, so that
vLLM, which compiles after ``load_model`` returns, finds a warm cache. Afterwards the worker's
server offers its own entries (once vLLM has written them): every instance is a source of
compile artifacts too. A fetch never fails the load.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from torch import nn
from vllm.config import VllmConfig
from vllm.logger import init_logger

from netloader.artifacts import VLLM_TORCH_COMPILE
from netloader.artifacts.entry import SIDECAR, Entry, host_factors, write_sidecar
from netloader.client.artifacts import Fetched, Wanted, fetch_artifacts
from netloader.options import ArtifactOptions, Timeouts
from netloader.server import Server

log = init_logger("vllm.netloader")


def _key(vllm_config: VllmConfig, module: nn.Module) -> tuple[str, list[str]]:
    """vLLM's cache key for ``module`` as vLLM computes it now, and its factors."""
    from vllm.compilation.caching import aot_compile_hash_factors
    from vllm.compilation.decorators import _model_hash_key

    factors = aot_compile_hash_factors(vllm_config)
    factors.append(_model_hash_key(module.forward))
    return hashlib.sha256(str(factors).encode()).hexdigest(), factors  # as decorators.py


def wanted_entries(vllm_config: VllmConfig, model: nn.Module) -> tuple[list[LiveEntry], str]:
    """The cache entries vLLM will look for when it compiles ``model``, or why none."""
    import vllm.envs as envs

    if not envs.VLLM_USE_AOT_COMPILE:
        return [], "vLLM's AOT compile is off (VLLM_USE_AOT_COMPILE=0)"
    if envs.VLLM_DISABLE_COMPILE_CACHE:
        return [], "vLLM's compile cache is off (VLLM_DISABLE_COMPILE_CACHE=1)"
    compiled = [m for m in model.modules() if getattr(m, "do_not_compile", True) is False]
    if not compiled:
        return [], "the model is not compiled (enforce_eager, or compilation mode NONE)"
    host = host_factors(vllm_config.device_config.device_type)
    root = Path(envs.VLLM_CACHE_ROOT)
    return [LiveEntry(vllm_config, m, host, root) for m in compiled], ""


class LiveEntry:
    """One compiled module's cache entry in this worker: what a replica asks for while its
    weights load (``wanted``), and, for this worker's server, the entry vLLM wrote.

    The alias is vLLM's key computed at load time; vLLM's own key may differ by the time it
    compiles (on the CPU the KV-cache layout is set in between), so the server computes it
    again when asked, when vLLM's config has settled."""

    kind = VLLM_TORCH_COMPILE

    def __init__(
        self, vllm_config: VllmConfig, module: nn.Module, host: dict[str, str], root: Path
    ):
        self.vllm_config, self.module, self.root = vllm_config, module, root
        alias, factors = _key(vllm_config, module)
        named = {"vllm_env": factors[0], "vllm_config": factors[1], "vllm_model": factors[-1]}
        if len(factors) > 3:  # inductor's factors (VLLM_USE_MEGA_AOT_ARTIFACT)
            named["inductor"] = hashlib.sha256(str(factors[2:-1]).encode()).hexdigest()
        self.wanted = Wanted(self.kind, alias, {**named, **host}, root)
        self._settled: Path | None = None

    def find(self, alias: str) -> Entry | None:
        if alias != self.wanted.alias:
            return None
        directory = self._settled or self.kind.entry_dir(self.root, self._key_now())
        if not directory.is_dir():
            return None
        if not (directory / SIDECAR).exists():  # so that --compile-cache can offer it later
            write_sidecar(directory, self.kind, alias, self.wanted.factors)
        entry = Entry.load(self.kind, directory)
        if entry is not None and entry.ready():
            self._settled = directory  # compiled: vLLM's key no longer changes
        return entry

    def _key_now(self) -> str:
        return _key(self.vllm_config, self.module)[0]

    def entries(self) -> list[Entry]:
        entry = self.find(self.wanted.alias)
        return [entry] if entry is not None else []


class CompileArtifacts:
    """One loader's compile artifacts: fetched while its weights travel, offered after."""

    def __init__(self, options: ArtifactOptions, token: bytes | None, timeouts: Timeouts):
        self.options, self.token, self.timeouts = options, token, timeouts
        self.entries: list[LiveEntry] = []
        self.why_none = ""
        self.results: list[Fetched] = []
        self._thread: threading.Thread | None = None

    def start(self, vllm_config: VllmConfig, model: nn.Module, sources: list[str]) -> None:
        """Work out the entries (once per load) and start fetching them from ``sources``."""
        if self._thread is not None or self.entries or self.why_none:
            return
        if self.options.mode == "off":
            self.why_none = "ARTIFACTS is off"
            return
        try:
            self.entries, self.why_none = wanted_entries(vllm_config, model)
        except Exception as exc:  # vLLM's internals moved: compile as usual, never fail the load
            self.why_none = f"cannot work out vLLM's cache key: {type(exc).__name__}: {exc}"
            log.warning("netloader: compile artifacts off for this load: %s", self.why_none)
        if sources and self.entries:
            self._thread = threading.Thread(
                target=self._fetch, args=(sources,), name="netloader-artifacts", daemon=True
            )
            self._thread.start()

    def _fetch(self, sources: list[str]) -> None:
        for entry in self.entries:
            self.results.append(
                fetch_artifacts(sources, entry.wanted, self.options, self.token, self.timeouts)
            )

    def finish(self, rank: int, label: str) -> None:
        """Wait for the fetch (bounded by its own timeouts) and log what it did."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        for fetched in self.results:
            if fetched.failed:
                log.warning(
                    "netloader: rank %d %scompile artifacts: %s; vLLM compiles as usual",
                    *(rank, label, fetched.describe()),
                )
            else:
                sep = " " if fetched.files else ": "  # "artifacts from peer A: ..." / ": none"
                log.info(
                    "netloader: rank %d %scompile artifacts%s%s",
                    *(rank, label, sep, fetched.describe()),
                )

    def offer(self, server: Server | None) -> None:
        """Let this worker's server offer its entries, once vLLM has written them."""
        for entry in self.entries if server is not None else ():
            server.shelf.add(entry)
