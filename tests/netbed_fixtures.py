"""Skip, or fail, a test that needs a NetBed where none can be built; what bed tests share."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

from netloader.synthetic import llm_like
from netloader_testing.netbed import available

#: One source's share in a `pulled ...` line: ``host:port (n bytes)``.
SHARE = re.compile(r"(\S+:\d+) \((\d+) bytes\)")


def require_netbed() -> None:
    """Skip the calling test with the reason beds are unavailable; fail it instead under
    NETLOADER_REQUIRE_NETNS=1, which CI sets (it runs as root, so a skip there is a bug)."""
    ok, reason = available()
    if ok:
        return
    if os.environ.get("NETLOADER_REQUIRE_NETNS") == "1":
        pytest.fail(f"NETLOADER_REQUIRE_NETNS=1 but no network namespaces: {reason}")
    pytest.skip(f"no network namespaces: {reason}")


def require_tool(tool: str, package: str) -> None:
    """Skip the calling test when ``tool`` is not installed; fail it instead under
    NETLOADER_REQUIRE_NETNS=1 (CI, where tools/system-packages.sh installs ``package``)."""
    if shutil.which(tool) is not None:
        return
    why = f"{tool} is not installed (Debian package {package}, see tools/system-packages.sh)"
    if os.environ.get("NETLOADER_REQUIRE_NETNS") == "1":
        pytest.fail(f"NETLOADER_REQUIRE_NETNS=1 but {why}")
    pytest.skip(why)


def bed_checkpoint(tmp_path_factory, nbytes: int, seed: int) -> tuple[Path, dict]:
    """A model folder of ``nbytes`` of LLM-like tensors for seeds on a bed (which it requires),
    and its tensors."""
    require_netbed()
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    folder.mkdir()
    tensors = llm_like(nbytes, seed=seed)
    save_file(tensors, folder / "model.safetensors")
    return folder, tensors
