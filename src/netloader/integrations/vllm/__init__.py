"""vLLM integration: the ``netloader`` load format (``loader``) and its settings (``config``).

Installing netloader registers the load format in every vLLM process through the entry point
``vllm.general_plugins`` -> ``register``. This package imports vLLM only when registering, so
its settings can be checked (and tested) without vLLM.
"""

from __future__ import annotations


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group; safe to call any number of times."""
    from netloader.integrations.vllm.loader import register_loader

    register_loader()
