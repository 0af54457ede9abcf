"""Small pieces of vLLM glue the loader needs: its layer registry, and its logging."""

from __future__ import annotations

import logging

from vllm.config import VllmConfig


class LayerRegistry:
    """vLLM registers every attention and MoE layer by name in the compilation config when a
    model is built and refuses a name twice. Dropping a failed model must drop its entries."""

    def __init__(self, vllm_config: VllmConfig):
        self.config = vllm_config.compilation_config
        self.layers = set(getattr(self.config, "static_forward_context", {}))
        self.moe = len(getattr(self.config, "static_all_moe_layers", []))

    def forget_new(self) -> None:
        context = getattr(self.config, "static_forward_context", {})
        for name in [n for n in context if n not in self.layers]:
            del context[name]
        moe = getattr(self.config, "static_all_moe_layers", None)
        if moe is not None:
            del moe[self.moe :]


def route_core_logs() -> None:
    """Let the core's ``netloader.*`` loggers print through vLLM's handlers and format."""
    core, vllm_logger = logging.getLogger("netloader"), logging.getLogger("vllm")
    if not core.handlers and vllm_logger.handlers:
        for handler in vllm_logger.handlers:
            core.addHandler(handler)
        core.setLevel(logging.INFO)
        core.propagate = False
