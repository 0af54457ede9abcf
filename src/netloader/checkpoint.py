"""Reading and writing safetensors checkpoints for the command line."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from netloader.errors import ConfigError


def checkpoint_files(path: str | os.PathLike[str]) -> list[Path]:
    """The ``.safetensors`` files of ``path``: the file itself, or every one in a directory."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ConfigError(f"{str(p)!r} is not a .safetensors file")
        return [p]
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"directory {str(p)!r} holds no .safetensors files")
        return files
    raise ConfigError(f"{str(p)!r} does not exist")


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file or folder (e.g. a Hugging Face model folder)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        for name, tensor in load_file(file).items():
            if name in tensors:
                raise ConfigError(f"tensor {name!r} appears in more than one file of {str(path)!r}")
            tensors[name] = tensor
    return tensors


def save_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write a safetensors file so that ``path`` either does not exist or is complete."""
    target = Path(path)
    seen: set[int] = set()
    unshared = {}
    for name, t in tensors.items():  # safetensors refuses tensors that share storage
        key = t.untyped_storage().data_ptr()
        unshared[name] = t.clone() if key in seen and t.numel() else t.contiguous()
        seen.add(key)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(unshared, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; give it the usual mode
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target
