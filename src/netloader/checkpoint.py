"""Reading and writing safetensors checkpoints for the command line.

``netloader pull --out`` receives straight into the file it writes: ``SafetensorsOutput`` lays
the file out from the server's manifest, maps it into memory and hands out tensors that are
views of it. No second full-size copy is made, and the bytes live in the file's page cache,
which the kernel writes back and can reclaim, not in the process's own memory; the size limit
is the free disk space, reserved before anything moves.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from netloader.errors import ConfigError
from netloader.manifest import DTYPE_NAMES, DTYPES, Manifest

# The safetensors format's names for torch dtypes (its specification, not its private tables).
SAFETENSORS_NAMES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "complex64": "C64",
}


def torch_dtype(safetensors_name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``)."""
    for name, st in SAFETENSORS_NAMES.items():
        if st == safetensors_name:
            return DTYPES[name]
    raise ValueError(f"unknown safetensors dtype {safetensors_name!r}")


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


class SafetensorsOutput:
    """A safetensors file at ``path``, laid out from ``manifest`` before any byte arrives.

    ``tensors`` are views of the memory-mapped file, in the manifest's shapes and dtypes: fill
    them, then ``commit()`` to move the file into place, or ``abort()`` to remove it. Until
    ``commit()`` the data lives under a hidden temporary name in the same folder, so ``path``
    is either absent or complete.
    """

    def __init__(self, path: str | os.PathLike[str], manifest: Manifest):
        self.path = Path(path)
        header, offsets = _layout(manifest)
        start = len(header)
        size = start + sum(s.nbytes for s in manifest.specs)
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        self._tmp = Path(tmp)
        try:
            with os.fdopen(fd, "r+b") as f:
                self._reserve(f.fileno(), size)
                f.write(header)
                self._map = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED)
            data = torch.frombuffer(self._map, dtype=torch.uint8)
            self.tensors: dict[str, torch.Tensor] = {}
            for spec in manifest.specs:  # in the manifest's order, as a pull returns them
                begin, end = offsets[spec.name]
                if spec.nbytes == 0:
                    self.tensors[spec.name] = torch.empty(spec.shape, dtype=spec.dtype)
                else:
                    flat = data[start + begin : start + end].view(spec.dtype)
                    self.tensors[spec.name] = flat.view(spec.shape)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise

    def _reserve(self, fd: int, size: int) -> None:
        """Reserve the blocks before anything moves: a write into a mapped page the disk
        cannot hold would kill the process with SIGBUS instead of raising an error."""
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            free = shutil.disk_usage(self.path.parent).free
            raise ConfigError(
                f"cannot reserve {size / 1e9:.2f} GB for the model in "
                f"{str(self.path.parent)!r} ({free / 1e9:.2f} GB free): {exc.strerror or exc}"
            ) from None

    def commit(self) -> Path:
        """Move the complete file to ``path``.

        No msync: the mapped pages are the file's page cache, written back by the kernel like
        any other write (an msync cost a second per GB here, and the previous save_file path
        did not sync either). Every reader sees the whole file from the moment it has its name.
        """
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp made it private; give it the usual mode
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Remove the temporary file. The mapping itself goes away with the last tensor."""
        self._tmp.unlink(missing_ok=True)


def _layout(manifest: Manifest) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The file's header (length prefix and JSON, padded) and each tensor's byte range after it.

    Widest elements first: with no gaps allowed between tensors, every offset stays aligned for
    its dtype, so each tensor can be a view of the mapping.
    """
    unsupported = sorted({DTYPE_NAMES[s.dtype] for s in manifest.specs} - set(SAFETENSORS_NAMES))
    if unsupported:
        raise ConfigError(
            f"safetensors cannot hold dtype(s) {', '.join(unsupported)}; "
            f"it holds: {', '.join(SAFETENSORS_NAMES)}"
        )
    header: dict[str, object] = {}
    offsets: dict[str, tuple[int, int]] = {}
    offset = 0
    for spec in sorted(manifest.specs, key=lambda s: -s.dtype.itemsize):
        offsets[spec.name] = (offset, offset + spec.nbytes)
        header[spec.name] = {
            "dtype": SAFETENSORS_NAMES[DTYPE_NAMES[spec.dtype]],
            "shape": list(spec.shape),
            "data_offsets": list(offsets[spec.name]),
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the format pads the header with spaces
    return len(text).to_bytes(8, "little") + text, offsets
