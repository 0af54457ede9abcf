"""What is being moved: the name, dtype and shape of every tensor of one rank.

The manifest is what both sides compare before a single weight byte moves. It travels as JSON
(``[[name, dtype, shape], ...]``); decoding checks every field and bounds every size, because it
comes from the network.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from netloader.errors import ProtocolError, shorten

# Dtypes by the name torch gives them. Names from the network are looked up here, never with
# getattr(torch, name). Dtypes missing from an older torch are skipped.
_DTYPE_NAMES = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
)
DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)}
DTYPE_NAMES: dict[torch.dtype, str] = {d: n for n, d in DTYPES.items()}

MAX_TENSORS = 1_000_000
MAX_NAME_CHARS = 1024
MAX_NDIM = 32
MAX_TENSOR_BYTES = 1 << 48


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported; supported: {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def describe(self) -> str:
        return f"{DTYPE_NAMES.get(self.dtype, self.dtype)}{list(self.shape)}"


class Manifest:
    """An ordered list of tensor specs with unique names."""

    def __init__(self, specs: Iterable[TensorSpec]):
        self.specs: tuple[TensorSpec, ...] = tuple(specs)
        self.by_name: dict[str, TensorSpec] = {s.name: s for s in self.specs}
        if len(self.by_name) != len(self.specs):
            raise ValueError("tensor names in a manifest must be unique")

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> Manifest:
        return cls(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items())

    def __len__(self) -> int:
        return len(self.specs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and self.specs == other.specs

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def to_json(self) -> list[list[Any]]:
        return [[s.name, dtype_name(s.dtype), list(s.shape)] for s in self.specs]

    @classmethod
    def from_json(cls, obj: Any) -> Manifest:
        if not isinstance(obj, list):
            raise ProtocolError("manifest must be a list")
        if len(obj) > MAX_TENSORS:
            raise ProtocolError(f"manifest lists {len(obj)} tensors, more than {MAX_TENSORS}")
        specs = []
        for entry in obj:
            if not (isinstance(entry, list) and len(entry) == 3):
                raise ProtocolError("manifest entry must be [name, dtype, shape]")
            name, dtype, shape = entry
            if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
                raise ProtocolError(f"tensor name must be a string of 1..{MAX_NAME_CHARS} chars")
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise ProtocolError(f"tensor {name!r}: unknown dtype {str(dtype)[:40]!r}")
            if (
                not isinstance(shape, list)
                or len(shape) > MAX_NDIM
                or not all(type(d) is int and 0 <= d < MAX_TENSOR_BYTES for d in shape)
            ):
                raise ProtocolError(f"tensor {name!r}: shape must be a list of <= {MAX_NDIM} ints")
            spec = TensorSpec(name, DTYPES[dtype], tuple(shape))
            if spec.nbytes > MAX_TENSOR_BYTES:
                raise ProtocolError(f"tensor {name!r}: {spec.nbytes} bytes is implausibly large")
            specs.append(spec)
        try:
            return cls(specs)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None

    def mismatch(self, other: Manifest, mine: str = "here", theirs: str = "peer") -> str | None:
        """A reason naming the differences from ``other``, else None.

        ``mine`` and ``theirs`` name the two sides in the reason. Order is not compared: both
        sides address tensors by name.
        """
        a, b = self.by_name, other.by_name
        only_a = [repr(n) for n in a if n not in b]
        only_b = [repr(n) for n in b if n not in a]
        differ = [
            f"{n!r} {mine} {a[n].describe()} vs {theirs} {b[n].describe()}"
            for n in a
            if n in b and a[n] != b[n]
        ]
        problems = []
        if only_a:
            problems.append(f"{len(only_a)} tensor(s) only at {mine}: {shorten(only_a)}")
        if only_b:
            problems.append(f"{len(only_b)} tensor(s) only at {theirs}: {shorten(only_b)}")
        if differ:
            problems.append(f"{len(differ)} tensor(s) differ in dtype or shape: {shorten(differ)}")
        return "; ".join(problems) or None
