"""Skip, or fail, a test that needs a NetBed where none can be built."""

from __future__ import annotations

import os
import shutil

import pytest

from netloader_testing.netbed import available


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
