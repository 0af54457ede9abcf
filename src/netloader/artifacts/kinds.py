"""Kinds of compile artifact: each a cache with entries named by a key, under a cache root.

A kind says where its entries live below a root (``subdir``) and when an entry is complete
(``ready``): an instance still compiling must not hand out half an entry. Triton's or
FlashInfer's JIT caches on a GPU node would each be one more kind registered here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: What a key may look like: a file name of its own, never a path (vLLM's are sha256 hex).
KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Kind:
    """``name`` on the wire; entries at ``root / subdir / key``; ``ready(entry)`` is true once
    the instance that builds them has finished writing one."""

    name: str
    subdir: str
    description: str
    ready: Callable[[Path], bool]

    def entry_dir(self, root: Path, key: str) -> Path:
        if not KEY.fullmatch(key):
            raise ValueError(f"artifact key {key!r} is not a plain name")
        return Path(root) / self.subdir / key


def _aot_function_saved(entry: Path) -> bool:
    """vLLM saves a rank's AOT-compiled function (``rank_R_D/model``) once its compile is done
    (``vllm/compilation/decorators.py``, after the first forward); the inductor kernels it
    needs are written before that."""
    return any(p.is_file() and not p.is_symlink() for p in entry.glob("rank_*/model"))


#: vLLM's torch.compile cache: ``VLLM_CACHE_ROOT/torch_compile_cache/torch_aot_compile/{hash}``
#: with ``inductor_cache/`` (C++ or Triton kernels, shared by a node's ranks) and each rank's
#: ``rank_R_D/model``.
VLLM_TORCH_COMPILE = Kind(
    "vllm-torch-compile",
    "torch_compile_cache/torch_aot_compile",
    "vLLM's torch.compile cache (AOT function and inductor kernels)",
    _aot_function_saved,
)

KINDS: dict[str, Kind] = {}


def register_kind(new: Kind) -> None:
    """Make ``new`` known by its name (a name taken by another kind is a programming error)."""
    known = KINDS.setdefault(new.name, new)
    if known is not new:
        raise ValueError(f"artifact kind {new.name!r} is registered already")


register_kind(VLLM_TORCH_COMPILE)
