"""Writing a pulled model straight into a safetensors file (what `netloader pull --out` uses)."""

import subprocess
import sys

import pytest
import torch
from helpers import all_cases, assert_same
from safetensors import safe_open
from safetensors.torch import load_file

from netloader.checkpoint import SafetensorsOutput
from netloader.errors import ConfigError
from netloader.manifest import Manifest, TensorSpec


def test_filled_views_become_a_file_safetensors_reads(tmp_path):
    expected = all_cases()
    out = SafetensorsOutput(tmp_path / "model.safetensors", Manifest.of(expected))
    assert list(out.tensors) == list(expected)
    for name, t in expected.items():
        out.tensors[name].copy_(t)
    assert not (tmp_path / "model.safetensors").exists()  # nothing at the name until commit
    out.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert_same(expected, load_file(tmp_path / "model.safetensors"))
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # the header, as safetensors sees it
        assert set(f.keys()) == set(expected)


def test_views_are_the_file_itself(tmp_path):
    """No second copy: a write into a view is a write into the mapped file."""
    out = SafetensorsOutput(
        tmp_path / "m.safetensors", Manifest([TensorSpec("w", torch.int32, (4,))])
    )
    out.tensors["w"].copy_(torch.tensor([1, 2, 3, 4], dtype=torch.int32))
    out.commit()
    raw = (tmp_path / "m.safetensors").read_bytes()
    assert raw.endswith(torch.tensor([1, 2, 3, 4], dtype=torch.int32).numpy().tobytes())


def test_disk_blocks_are_reserved_before_any_byte_arrives(tmp_path):
    """A sparse file would let a write into a mapped page hit a full disk mid-pull (SIGBUS);
    the file must hold real blocks for its whole size from the start."""
    out = SafetensorsOutput(tmp_path / "m.safetensors", Manifest.of(all_cases()))
    size = out._tmp.stat().st_size
    assert out._tmp.stat().st_blocks * 512 >= size > 100_000
    out.abort()


def test_abort_leaves_nothing(tmp_path):
    out = SafetensorsOutput(tmp_path / "m.safetensors", Manifest.of(all_cases()))
    out.abort()
    assert list(tmp_path.iterdir()) == []


def test_dtype_safetensors_cannot_hold_is_refused_before_any_file(tmp_path):
    manifest = Manifest([TensorSpec("z", torch.complex128, (2,))])
    with pytest.raises(ConfigError, match="complex128"):
        SafetensorsOutput(tmp_path / "m.safetensors", manifest)
    assert list(tmp_path.iterdir()) == []


def test_model_larger_than_the_free_disk_is_refused(tmp_path):
    manifest = Manifest([TensorSpec("w", torch.uint8, (1 << 47,))])  # 140 TB
    with pytest.raises(ConfigError, match=r"cannot reserve 140737\.49 GB .* GB free"):
        SafetensorsOutput(tmp_path / "m.safetensors", manifest)
    assert list(tmp_path.iterdir()) == []


def test_space_the_kernel_will_not_grant_is_an_error_not_a_crash(tmp_path):
    """When the kernel will not give the file its size, the result is a ConfigError naming the
    size and the folder, and no file. The refusal is real: the kernel's file-size limit
    (RLIMIT_FSIZE) in a child process."""
    code = f"""
import resource, signal, sys
import torch
from netloader.checkpoint import SafetensorsOutput
from netloader.errors import ConfigError
from netloader.manifest import Manifest, TensorSpec
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    SafetensorsOutput({str(tmp_path / "m.safetensors")!r}, Manifest([TensorSpec("w", torch.uint8, (8 << 20,))]))
except ConfigError as exc:
    print(exc)
    sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "cannot reserve 0.01 GB" in proc.stdout and "too large" in proc.stdout, proc.stdout
    assert list(tmp_path.iterdir()) == []
