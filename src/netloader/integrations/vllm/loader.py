"""vLLM model-loader plugin: ``--load-format netloader``.

Installing netloader registers the load format in every vLLM process (entry point group
``vllm.general_plugins``). In each worker the loader:

1. creates the model as vLLM's default loader would;
2. if SOURCE names peers for this worker's rank, pulls every parameter and persistent buffer
   straight into the model (identity, layout and full manifest checked first); on any failure it
   logs one WARNING, drops that model and loads a fresh one from storage;
3. captures the loaded tensors *before* vLLM's post-processing (which may repack or rewrite
   them; on CPU it replaces linear weights with kernel handles), with digests;
4. lets vLLM post-process, then serves the captured tensors from this worker's server
   (background threads), so that every instance, whichever way it got its weights, is a source
   for the next ones.

A speculative-decoding draft model goes through the same loader, in the same worker, right
after the target: it is pulled from the same SOURCE addresses under its own identity, falls
back on its own, and is served by the same server (one listener per worker, every model it
holds).

Everything here is glue: the transfer itself is netloader's core.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import time

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.models.interfaces import supports_any_eagle

from netloader import auth, events
from netloader.client import pull
from netloader.errors import PullError
from netloader.identity import Identity
from netloader.integrations.vllm import capture
from netloader.integrations.vllm.compile_cache import CompileArtifacts
from netloader.integrations.vllm.config import NetloaderConfig
from netloader.integrations.vllm.glue import LayerRegistry, route_core_logs
from netloader.options import ServeOptions
from netloader.server import ServedModel, Server
from netloader.snapshot import Snapshot, describe_changed

LOAD_FORMAT = "netloader"
log = init_logger("vllm.netloader")

#: What an EAGLE-style drafter's ``load_weights`` concludes from its checkpoint besides the
#: weights: whether it has its own embeddings and LM head (vLLM gives it the target's if not).
#: A pull skips ``load_weights``, so these travel as one more (tiny) tensor of the draft.
EAGLE_FLAGS = ("has_own_embed_tokens", "has_own_lm_head")
EAGLE_FLAGS_TENSOR = "netloader.eagle_flags"

_registered = False


class _Path(enum.Enum):
    """Where this loader's weights come from: nowhere (outside ``load_model``: a call then
    means an in-place reload), a peer, or storage."""

    IDLE = "idle"
    PEER = "peer"
    STORAGE = "storage"


@dataclasses.dataclass
class _Worker:
    """This process's server: a worker is one rank, and one server (one port) serves every
    model it loads, target and draft. Started by the first model that needs it."""

    server: Server | None = None
    cannot_listen: bool = False  # starting it failed (logged once): this worker serves nothing


_WORKER = _Worker()


def register_loader() -> None:
    """Register the load format with vLLM, once per process."""
    global _registered
    if not _registered:
        register_model_loader(LOAD_FORMAT)(NetloaderModelLoader)
        _registered = True


class NetloaderModelLoader(DefaultModelLoader):
    """The default loader, plus a peer path in front of it and a server behind it."""

    def __init__(self, load_config: LoadConfig):
        # A bad config stops start-up here, with the key, the value and what is allowed.
        self.config = NetloaderConfig.parse(load_config.model_loader_extra_config)
        self.token = auth.load_token(self.config.token_file)  # or NETLOADER_TOKEN
        # The default loader rejects keys it does not know and formats it cannot read.
        super().__init__(
            dataclasses.replace(load_config, load_format="auto", model_loader_extra_config={})
        )
        self._path = _Path.IDLE
        self._pull_from: list[str] = []
        self._pulled_from = ""  # "peer A", or "peers A (x GB), B (y GB)"
        self._identity: Identity | None = None
        self._draft = False  # loading a speculative-decoding draft model
        self._snapshot: Snapshot | None = None
        #: This model's entry in the worker's server while its pull relays what arrives.
        self._relay: ServedModel | None = None
        #: The worker's server already serves a model of this name (a draft named like its
        #: target): this one is not served separately.
        self._shadowed = False
        self._weights_seconds = 0.0
        self._vllm_config: VllmConfig | None = None
        timeouts = self.config.pull_options(None).timeouts
        self._artifacts = CompileArtifacts(self.config.serve.artifacts, self.token, timeouts)
        route_core_logs()

    # --- the whole load ---------------------------------------------------------------------

    def load_model(
        self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = ""
    ) -> nn.Module:
        self._draft = _is_draft(vllm_config, model_config, prefix)
        identity = _identity(self.config, model_config, draft=self._draft)
        self._identity, self._vllm_config = identity, vllm_config
        self._shadowed = _WORKER.server is not None and identity.model in _WORKER.server.catalog
        if self._shadowed:
            log.warning(
                "netloader: rank %d does not serve its %smodel separately: its name %r is taken "
                "(set DRAFT_MODEL to tell target and draft apart)",
                *(identity.rank, self._label, identity.model),
            )
        try:
            model, path = self._load(vllm_config, model_config, prefix)
        finally:
            self._path = _Path.IDLE
        snapshot = self._snapshot
        self._artifacts.finish(identity.rank, self._label)  # before vLLM compiles
        total = (
            snapshot.plan.total_bytes
            if snapshot is not None
            else capture.kept_bytes(_named_tensors(model))
        )
        seconds = self._weights_seconds
        log.info(
            "netloader: rank %d %sweights phase from %s: %.3f GB in %.2f s (%.2f GB/s)",
            *(identity.rank, self._label, path, total / 1e9, seconds),
            total / 1e9 / max(seconds, 1e-9),
        )
        if snapshot is not None:  # None: quantized online, nothing a peer could take (logged)
            self._serve(snapshot, identity)  # its server (and metrics) exist from here on
        kind = _Path.PEER if path.startswith("peer") else _Path.STORAGE
        events.emit(events.WeightsLoaded(identity.model, identity.rank, kind.value, total, seconds))
        self._artifacts.offer(_WORKER.server)
        return model

    @property
    def _label(self) -> str:
        """What log lines call this model: "draft " for a draft, nothing for the target."""
        return "draft " if self._draft else ""

    def _load(
        self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str
    ) -> tuple[nn.Module, str]:
        """The model, from a peer if SOURCE names one for this rank, else (or if that fails,
        with one WARNING) from storage; and the path taken."""
        assert self._identity is not None
        rank = self._identity.rank
        sources = self.config.sources_for(rank)
        if not sources:
            what = "the draft " if self._draft else ""
            log.info("netloader: no SOURCE for rank %d, loading %sfrom storage", rank, what)
        else:
            self._path, self._pull_from = _Path.PEER, sources
            registered = LayerRegistry(vllm_config)
            try:
                return super().load_model(vllm_config, model_config, prefix), self._pulled_from
            except PullError as exc:
                registered.forget_new()  # so a fresh model can register the same layers
                log.warning(
                    "netloader: rank %d could not take its %sweights from a peer, loading from "
                    "storage instead: %s",
                    *(rank, self._label, exc),
                )
                events.emit(events.FellBack(self._identity.model, rank, str(exc)))
                gc.collect()  # the half-filled model of the failed attempt goes first
        self._path, self._pull_from = _Path.STORAGE, []
        return super().load_model(vllm_config, model_config, prefix), "storage"

    # --- the weights phase, called by load_model above (between creation and post-processing)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        if self._path is _Path.IDLE:
            _retire_servers("weights were reloaded in place after they were captured")
            return super().load_weights(model, model_config)
        assert self._vllm_config is not None
        self._artifacts.start(self._vllm_config, model, self._pull_from)  # beside the weights
        start = time.perf_counter()
        if self._path is _Path.PEER:
            self._snapshot = self._pull_weights(model)
        else:
            super().load_weights(model, model_config)
            self._snapshot = self._capture_loaded(model)
        self._weights_seconds = time.perf_counter() - start

    def _pull_weights(self, model: nn.Module) -> Snapshot:
        """Pull into the model's own tensors while this worker's server relays each chunk as
        soon as it landed and was verified; the relay's snapshot is what it serves later."""
        identity = self._identity
        assert identity is not None
        tensors = self._tensors(model)
        meta = [n for n, t in tensors.items() if t.device.type == "meta"]
        if meta:
            raise PullError(f"{len(meta)} tensor(s) are not materialised yet, e.g. {meta[0]!r}")
        relay = self._relay = self._add_to_server(None, identity)  # filled as the pull lands
        server = _WORKER.server if relay is not None else None
        options = self.config.pull_options(self.token)
        try:
            result = pull(self._pull_from, identity, tensors, options, relay=server)
        except PullError:
            raise
        except Exception as exc:  # a netloader bug must cost a fallback, not the instance
            if relay is not None:
                relay.withdraw(f"its own pull failed: {exc}")
            raise PullError(f"unexpected {type(exc).__name__}: {exc}", partial=True) from exc
        _set_eagle_flags(model, tensors)
        capture.set_loader_state(model, tensors)
        used = [source for source, nbytes in result.sources.items() if nbytes]
        self._pulled_from = (
            f"peer {result.describe_sources()}"
            if len(used) <= 1
            else f"peers {result.describe_sources(1e9, ' GB')}"
        ) + f" over {result.transport}"
        if relay is not None and relay.snapshot is not None and not relay.unavailable:
            self._keep_copies(relay.snapshot, tensors)
            return relay.snapshot
        return self._capture(tensors)

    def get_all_weights(self, model_config: ModelConfig, model: nn.Module):  # type: ignore[no-untyped-def]
        # vLLM's reload_weights reads through a new loader's get_all_weights: outside our own
        # load_model that means the live weights are about to differ from what was captured.
        if self._path is _Path.IDLE:
            _retire_servers("weights were reloaded in place after they were captured")
        return super().get_all_weights(model_config, model)

    def _tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What travels of ``model``: its parameters and persistent buffers, and for an
        EAGLE-style draft, its flags (see EAGLE_FLAGS)."""
        tensors = _named_tensors(model)
        if self._draft and supports_any_eagle(model):
            device = next(iter(tensors.values())).device
            flags = [bool(getattr(model, flag, False)) for flag in EAGLE_FLAGS]
            tensors[EAGLE_FLAGS_TENSOR] = torch.tensor(flags, dtype=torch.uint8, device=device)
        return {**tensors, **capture.loader_state(model, next(iter(tensors.values())).device)}

    # --- serving ------------------------------------------------------------------------------

    def _capture_loaded(self, model: nn.Module) -> Snapshot | None:
        """The capture of a model loaded from storage; None (one INFO line) for a model
        quantized online, which no peer could take in (see ``capture``)."""
        online = capture.online_quantized(model)
        if online is None:
            return self._capture(self._tensors(model))
        log.info(
            "netloader: rank %d does not serve its %smodel: it is quantized online while "
            "post-processing (e.g. %s), which no peer can take in",
            *(self._identity.rank if self._identity else 0, self._label, online),
        )
        return None

    def _capture(self, tensors: dict[str, torch.Tensor]) -> Snapshot:
        """What this server will serve of the loaded tensors, with digests, taken before
        post-processing can change anything (``capture.served``)."""
        return Snapshot(capture.served(tensors, self.config))

    def _keep_copies(self, snapshot: Snapshot, tensors: dict[str, torch.Tensor]) -> None:
        """A relay serves the received tensors themselves; where CAPTURE (or INT8_CACHE) says
        so, it serves copies instead from now on (post-processing may rewrite the originals)."""
        served = capture.served(tensors, self.config)
        for name, copy in served.items():
            if copy is not tensors.get(name):
                snapshot.use(name, copy)

    def _serve_options(self) -> ServeOptions:
        from vllm.utils.network_utils import get_ip

        return self.config.serve_options(get_ip(), self.token)

    def _add_to_server(self, snapshot: Snapshot | None, identity: Identity) -> ServedModel | None:
        """Serve ``snapshot`` (None: what a pull will bring) as ``identity`` from this worker's
        server, starting it for the first model; None when it serves nothing new (logged)."""
        if self._shadowed:
            return None
        server = _WORKER.server
        if server is None:
            if _WORKER.cannot_listen:
                return None
            server = Server(snapshot, identity, self._serve_options())
            try:
                server.start()
            except OSError as exc:
                _WORKER.cannot_listen = True
                log.warning("netloader: rank %d serves no peers: %s", identity.rank, exc)
                return None
            if server.address:
                log.info("netloader: rank %d serving peers on %s", identity.rank, server.address)
            _WORKER.server = server
            return server.model()
        return server.add(snapshot, identity)

    def _serve(self, snapshot: Snapshot, identity: Identity) -> None:
        """After post-processing: serve ``snapshot`` (the relay already does, unless its pull
        failed), refusing peers if post-processing rewrote what was captured."""
        changed = snapshot.changed()  # post-processing ran since capture: is it still as loaded?
        entry = self._relay
        if entry is None:
            entry = self._add_to_server(snapshot, identity)
        elif entry.snapshot is not snapshot:
            entry.provide(snapshot)  # a relay whose pull failed: it serves what storage gave
        if entry is not None and changed:
            entry.unavailable = (
                f"vLLM post-processing rewrote weights in place: {describe_changed(changed)}; "
                "set CAPTURE to host or device to keep copies (INT8_CACHE: int8 ones only)"
            )
            log.warning(
                "netloader: rank %d will refuse peers asking for %s: %s",
                *(identity.rank, identity.model, entry.unavailable),
            )


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name; tied ones appear under each name."""
    return {name: t.detach() for name, t in model.state_dict(keep_vars=True).items()}


def _set_eagle_flags(model: nn.Module, received: dict[str, torch.Tensor]) -> None:
    """Set an EAGLE-style draft's flags as its source's ``load_weights`` had set them."""
    if EAGLE_FLAGS_TENSOR in received:
        for flag, value in zip(EAGLE_FLAGS, received[EAGLE_FLAGS_TENSOR].tolist(), strict=True):
            setattr(model, flag, bool(value))


def _identity(config: NetloaderConfig, model_config: ModelConfig, *, draft: bool) -> Identity:
    """This rank of ``model_config``'s model; its name is MODEL (DRAFT_MODEL for a draft), or
    the model's path as vLLM was given it."""
    from vllm.distributed.parallel_state import (
        get_pp_group,
        get_tensor_model_parallel_world_size,
        get_world_group,
    )

    world = get_world_group()
    return Identity(
        model=(config.draft_model if draft else config.model) or model_config.model,
        rank=world.rank,
        world_size=world.world_size,
        tensor_parallel_size=get_tensor_model_parallel_world_size(),
        pipeline_parallel_size=get_pp_group().world_size,
    )


def _is_draft(vllm_config: VllmConfig, model_config: ModelConfig, prefix: str) -> bool:
    spec = vllm_config.speculative_config
    draft = getattr(spec, "draft_model_config", None) if spec is not None else None
    return prefix == "draft_model" or (draft is not None and model_config is draft)


def _retire_servers(reason: str) -> None:
    """Refuse peers every model of this worker (the reload does not say which one it is)."""
    server = _WORKER.server
    for entry in server.catalog if server is not None else ():
        if not entry.unavailable:
            entry.unavailable = reason
            log.warning(
                "netloader: server on %s now refuses peers asking for %s: %s",
                *(server.address, entry.model, reason),
            )
