"""What ships: a wheel built from this repository holds the product and nothing else.

The test scaffolding (``netloader_testing/``: vLLM harness, generated models, network
namespaces) and the tests, demo and benchmarks stay in the source tree, and are still found
there by the processes the scaffolding starts.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from netloader_testing.harness import Run, vllm_env

ROOT = Path(__file__).parent.parent
# Build outputs and caches of the checkout are left behind: setuptools would ship a stale
# build/lib (files since removed from src/ included), and a clean clone has none of them.
LOCAL = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*_cache", ".hypothesis"
)


def wheel_names(tmp_path: Path) -> list[str]:
    """Build a wheel from a fresh copy of the repository, as pip would for users; its files."""
    tree, out = tmp_path / "tree", tmp_path / "dist"
    shutil.copytree(ROOT, tree, ignore=LOCAL)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    proc = subprocess.run(
        [*cmd, "-w", str(out), str(tree)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("netloader-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_holds_the_product_only(tmp_path: Path) -> None:
    names = wheel_names(tmp_path)
    # It is the real package (so the checks below have something to look at) ...
    assert {"netloader/__init__.py", "netloader/cli.py", "netloader/server/__init__.py"} <= set(
        names
    )
    # ... with the scaffolding neither inside it nor next to it.
    assert not [n for n in names if n.startswith("netloader/testing/")]
    assert {n.split("/")[0] for n in names} == {"netloader", "netloader-0.1.0.dist-info"}


def test_offline_driver_finds_the_scaffolding_from_any_directory(tmp_path: Path) -> None:
    """``OfflineInstance`` runs ``python -m netloader_testing.harness``: a child inherits no
    ``sys.path``, and its working directory (here one outside the checkout) does not help."""
    cmd = [*Run().command(tmp_path / "model"), "--help"]  # exits before it imports vLLM
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=vllm_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--load-format" in proc.stdout
