"""What a server keeps of a freshly loaded model, taken before vLLM's post-processing, and where.

A server must send what a fresh load from storage gives, so it captures the loaded tensors
before ``process_weights_after_loading`` and serves those; the client post-processes itself.
On CUDA that step rewrites or replaces them (vLLM 0.32, ``model_executor/layers/quantization``):

- in place: per-tensor FP8 (``utils/w8a8_utils.py`` ``requantize_with_max_scale`` writes the
  fused qkv/gate_up shards), block FP8 with DeepGEMM E8M0 (``utils/fp8_utils.py``
  ``requant_weight_ue8m0_inplace``), calibrated KV-cache scales (``kv_cache.py``
  ``BaseKVCacheMethod``: ``_k_scale.copy_``), FlashInfer TRT-LLM MoE layouts. References to
  those bytes would change under the server (the digests then refuse every peer);
- by new tensors: GPTQ/AWQ repacking for Marlin/Machete (``kernels/linear/__init__.py``, then
  ``replace_parameter``), FlashInfer CUTLASS MoE (``fused_moe/flashinfer_utils.py``
  ``swap_w13_to_w31``). References would keep the originals alive on the GPU for the life of the
  process, hidden from vLLM's memory profiling (``v1/worker/gpu_worker.py``
  ``determine_available_memory`` runs after the load), so the KV cache silently shrinks.

Hence ``CAPTURE`` (``NetloaderConfig.capture``):

- ``host``: a copy of every tensor in host memory, device to host through one pinned buffer,
  digested there; no device memory is kept. The default on accelerators.
- ``device``: a copy of every tensor on the device (every dtype; the seed's ``hbm`` idea):
  costs the weights once more on the device, taken from the KV cache.
- ``reference``: no copy, the loaded tensors themselves. Right only where post-processing leaves
  their storage untouched. The default on the CPU backend, where it does for what runs here:
  unquantized linear layers are packed into new oneDNN handles and their weights replaced by
  empty parameters (``layers/utils.py`` ``dispatch_cpu_unquantized_gemm(remove_weight=True)``),
  the originals untouched; compressed-tensors W8A8 int8 without AMX re-registers ``weight.t()``
  over the same storage and copies it into a oneDNN handle (``CPUInt8ScaledMMLinearKernel``).
  Replaced originals stay alive through the capture (what a host copy would cost too); tensors
  left in place cost nothing. Should any path rewrite bytes in place (AMX int8 packing, not
  available here), the digests show it after post-processing and the server refuses peers.
- ``auto``: ``host`` on accelerators, ``reference`` on the CPU.

``INT8_CACHE`` keeps its meaning on top of ``reference``: pristine copies of the int8 tensors
(``hbm``: device, ``dram``: host); with ``host`` or ``device`` every tensor is a copy already.

Loader-set module state that post-processing reads travels with the weights (a pull skips the
weight loader that sets it): GPTQ MoE layers keep ``w13_bias``/``w2_bias`` only if
``layer._loaded_expert_biases`` names them (``quantization/auto_gptq.py``
``AutoGPTQMoEMethod``; filled by ``fused_moe/routed_experts.py``'s weight loader), as one small
tensor, like an EAGLE head's flags.

Online quantization (``--quantization fp8_per_tensor`` and the like on a bf16 checkpoint:
``quantization/online/``) quantizes inside post-processing from weights no client can take in
(``replace_parameter(layer, "weight", qweight.t())``): such a model is not captured.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from netloader.integrations.vllm.config import NetloaderConfig

log = logging.getLogger("vllm.netloader")  # vLLM's logger of the loader (``init_logger``)

CAPTURE_MODES = ("auto", "host", "device", "reference")
#: Bytes of the pinned buffer a host capture copies through.
PINNED_BYTES = 64 << 20
#: ``_loaded_expert_biases`` of every MoE layer, as flags over ``EXPERT_BIASES``.
EXPERT_BIASES_TENSOR = "netloader.loaded_expert_biases"
EXPERT_BIASES = ("w13_bias", "w2_bias")  # the names auto_gptq.py looks for


def resolve(mode: str, device: torch.device) -> str:
    """The capture mode ``mode`` means for tensors on ``device``."""
    if mode != "auto":
        return mode
    return "reference" if device.type == "cpu" else "host"


def served(tensors: dict[str, torch.Tensor], config: NetloaderConfig) -> dict[str, torch.Tensor]:
    """What a server serves of freshly loaded ``tensors`` in ``config``'s CAPTURE mode
    (``auto`` resolved here), with INT8_CACHE's pristine int8 copies where the tensors are
    served as references."""
    device = next((t.device for t in tensors.values() if t.numel()), torch.device("cpu"))
    mode = resolve(config.capture, device)
    if mode == "reference":
        return {**tensors, **int8_copies(tensors, config.int8_cache, config.int8_cache_name)}
    copies = kept(tensors, mode)
    where = "host" if mode == "host" else "device"
    log.info(
        "netloader: CAPTURE=%s keeps %.3f GB in %s memory", mode, kept_bytes(copies) / 1e9, where
    )
    return copies


def int8_copies(
    tensors: dict[str, torch.Tensor], mode: str, fragments: tuple[str, ...] | None
) -> dict[str, torch.Tensor]:
    """INT8_CACHE: pristine copies of the int8 tensors (whose name contains one of
    ``fragments``, if given) on the device (``hbm``) or the host (``dram``); none for ``no``."""
    copies = {
        name: t.clone() if mode == "hbm" else t.to("cpu", copy=True)
        for name, t in tensors.items()
        if mode != "no"
        and t.dtype == torch.int8
        and (fragments is None or any(f in name for f in fragments))
    }
    if copies:
        nbytes = sum(t.nbytes for t in copies.values())
        log.info("netloader: INT8_CACHE=%s keeps %.3f GB of int8 copies", mode, nbytes / 1e9)
    return copies


def kept(tensors: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """What a server keeps of ``tensors`` in capture ``mode`` (resolved): the tensors, or
    copies on the host or the device. Tied tensors stay tied (one copy per view)."""
    if mode == "reference":
        return dict(tensors)
    copies: dict[tuple, torch.Tensor] = {}
    pinned = _pinned(tensors) if mode == "host" else None
    out = {}
    for name, t in tensors.items():
        key = _view_key(t)
        if key not in copies:
            copies[key] = t.clone() if mode == "device" else _to_host(t, pinned)
        out[name] = copies[key]
    if pinned is not None:
        torch.cuda.current_stream().synchronize()
    return out


def kept_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct views in ``tensors``."""
    return sum(t.nbytes for t in {_view_key(t): t for t in tensors.values()}.values())


def _view_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage().data_ptr() if t.numel() else id(t)
    return (storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _pinned(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    cuda = any(t.device.type == "cuda" for t in tensors.values())
    return torch.empty(PINNED_BYTES, dtype=torch.uint8, pin_memory=True) if cuda else None


def _to_host(t: torch.Tensor, pinned: torch.Tensor | None) -> torch.Tensor:
    """A host copy of ``t``; a CUDA tensor goes through ``pinned`` slice by slice (the copy
    engine reads pinned memory at full speed; the result itself is ordinary memory)."""
    out = torch.empty(t.shape, dtype=t.dtype)
    if t.device.type != "cuda" or pinned is None or not t.numel():
        out.copy_(t)
        return out
    src = t.contiguous().reshape(-1).view(torch.uint8)
    dst = out.reshape(-1).view(torch.uint8)
    stream = torch.cuda.current_stream(t.device)
    for at in range(0, src.numel(), PINNED_BYTES):
        part = src[at : at + PINNED_BYTES]
        pinned[: part.numel()].copy_(part, non_blocking=True)
        stream.synchronize()  # the slice is in the pinned buffer
        dst[at : at + part.numel()].copy_(pinned[: part.numel()])
    return out


# --- loader-set state that travels with the weights ------------------------------------------


def _expert_layers(model: nn.Module) -> list[nn.Module]:
    return [
        m for m in model.modules() if isinstance(getattr(m, "_loaded_expert_biases", None), set)
    ]


def loader_state(model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """The MoE layers' ``_loaded_expert_biases`` as one uint8 tensor (a row of flags per layer,
    in module order: the same shape on every instance of the model), or nothing."""
    layers = _expert_layers(model)
    if not layers:
        return {}
    flags = [[name in m._loaded_expert_biases for name in EXPERT_BIASES] for m in layers]
    return {EXPERT_BIASES_TENSOR: torch.tensor(flags, dtype=torch.uint8, device=device)}


def set_loader_state(model: nn.Module, received: dict[str, torch.Tensor]) -> None:
    """Set the MoE layers' ``_loaded_expert_biases`` as the source's weight loader had."""
    if EXPERT_BIASES_TENSOR not in received:
        return
    rows = received[EXPERT_BIASES_TENSOR].tolist()
    for layer, row in zip(_expert_layers(model), rows, strict=True):
        layer._loaded_expert_biases = {n for n, on in zip(EXPERT_BIASES, row, strict=True) if on}


def online_quantized(model: nn.Module) -> str | None:
    """The first layer quantized online (during post-processing), or None."""
    try:
        from vllm.model_executor.layers.quantization.online.fp8 import OnlineLinearBase
        from vllm.model_executor.layers.quantization.online.moe_base import OnlineMoEMethodBase
    except ImportError:  # a vLLM without online quantization
        return None
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, OnlineLinearBase | OnlineMoEMethodBase):
            return f"{name} ({type(method).__name__})"
    return None
