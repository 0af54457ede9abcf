"""Generated checkpoints shaped like a real LLM, for the demo, the benchmark and the tests.

No download: a seeded generator fills a few large matrices (bf16 projections, int8 quantized
weights with fp32 scales) and many small fp32 norm and bias tensors, the mix that makes small
tensors and large ones both matter for a transfer.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def tiny_llama(
    path: str | os.PathLike[str],
    *,
    hidden: int = 256,
    layers: int = 2,
    intermediate: int = 512,
    heads: int = 4,
    vocab: int = 512,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.1,
) -> Path:
    """Write a randomly initialised Llama with a locally trained tokenizer to ``path``.

    Its greedy outputs are meaningless but deterministic, which is all a consistency check
    needs. Needs ``transformers`` and ``tokenizers`` (both come with vLLM). Head dim 64: the vLLM
    CPU attention kernels refuse 16. ``initializer_range`` 0.1 (not the usual 0.02) makes greedy
    outputs vary from token to token, so that wrong weights show up in them.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "weights travel from a running instance to a new one",
        "hello world this is a tiny test corpus for a tokenizer",
    ]
    bpe.train_from_iterator(corpus * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(out)
    return out
