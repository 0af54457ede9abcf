"""Generated checkpoints shaped like a real LLM, for ``netloader bench``, the demo and the tests.

No download: a seeded generator fills a few large matrices (bf16 projections, int8 quantized
weights with fp32 scales) and many small fp32 norm and bias tensors, the mix that makes small
tensors and large ones both matter for a transfer.
"""

from __future__ import annotations

import torch


def llm_like(total_bytes: int, *, seed: int = 0, hidden: int = 1024) -> dict[str, torch.Tensor]:
    """About ``total_bytes`` of tensors in decoder layers; names like a Llama checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def normal(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    # Per layer: attention (bf16), MLP up/down (int8 + per-row fp32 scales), norms and biases.
    per_layer = 4 * hidden * hidden * 2 + 2 * 4 * hidden * hidden + 3 * hidden * 4 + 8 * hidden * 4
    layers = max(1, (total_bytes - 2 * 8192 * hidden * 2) // per_layer)
    out["model.embed_tokens.weight"] = normal(8192, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{proj}.weight"] = normal(hidden, hidden)
        out[p + "self_attn.qkv_bias"] = normal(3 * hidden, dtype=torch.float32)
        for proj, shape in (("up_proj", (4 * hidden, hidden)), ("down_proj", (hidden, 4 * hidden))):
            out[p + f"mlp.{proj}.weight"] = torch.randint(
                -128, 128, shape, generator=gen, dtype=torch.int8
            )
            out[p + f"mlp.{proj}.weight_scale"] = normal(shape[0], dtype=torch.float32).abs()
        out[p + "input_layernorm.weight"] = normal(hidden, dtype=torch.float32)
        out[p + "post_attention_layernorm.weight"] = normal(hidden, dtype=torch.float32)
    out["model.norm.weight"] = normal(hidden, dtype=torch.float32)
    out["lm_head.weight"] = normal(8192, hidden)
    return out
