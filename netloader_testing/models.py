"""Real models generated locally (no download), for the vLLM tests, demo and benchmarks."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from netloader.options import with_keywords


@dataclass(frozen=True)
class LlamaShape:
    """The size of a generated Llama. Head dim 64 (hidden / heads): the vLLM CPU attention
    kernels refuse 16. ``initializer_range`` 0.1 (not the usual 0.02) makes greedy outputs vary
    from token to token, so that wrong weights show up in them."""

    hidden: int = 256
    layers: int = 2
    intermediate: int = 512
    heads: int = 4
    vocab: int = 512
    tie_word_embeddings: bool = True
    initializer_range: float = 0.1


def tiny_llama(
    path: str | os.PathLike[str], shape: LlamaShape | None = None, *, seed: int = 0, **keywords: Any
) -> Path:
    """Write a randomly initialised Llama of ``shape`` (keywords set its fields) with a locally
    trained tokenizer to ``path``.

    Its greedy outputs are meaningless but deterministic, which is all a consistency check
    needs. Needs ``transformers`` and ``tokenizers`` (both come with vLLM).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    out = Path(path)
    shape = with_keywords(shape or LlamaShape(), keywords)
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=512,
        tie_word_embeddings=shape.tie_word_embeddings,
        initializer_range=shape.initializer_range,
    )
    _save_random_weights(config, out, seed)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape.vocab,
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


def tiny_draft(
    target: str | os.PathLike[str], path: str | os.PathLike[str], *, seed: int | None = None
) -> Path:
    """A speculative-decoding draft for the ``target`` written by ``tiny_llama``, at ``path``:
    the same shape and tokenizer, and with ``seed=None`` the very same weights (the target then
    accepts every drafted token), else random weights from ``seed``."""
    from transformers import LlamaConfig

    out = Path(path)
    shutil.copytree(target, out)
    if seed is not None:
        _save_random_weights(LlamaConfig.from_pretrained(target), out, seed)
    return out


def _save_random_weights(config: Any, out: Path, seed: int) -> None:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)


def tiny_eagle_head(
    target: str | os.PathLike[str], path: str | os.PathLike[str], *, seed: int
) -> Path:
    """An EAGLE head for the ``target`` written by ``tiny_llama``, at ``path``: one decoder
    layer (without its input norm, as EAGLE has it), ``fc`` from embedding and hidden state to
    hidden state, and embeddings of its own, all random from ``seed``. It has no LM head: vLLM
    gives it the target's. Serves with ``{"method": "eagle", "model": path, ...}``."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(path)
    config = LlamaConfig.from_pretrained(target)
    config.num_hidden_layers = 1
    config.save_pretrained(out)
    torch.manual_seed(seed)
    state = LlamaForCausalLM(config).state_dict()
    weights = {
        name.removeprefix("model."): t.clone()
        for name, t in state.items()
        if name.startswith("model.layers.0.") and "input_layernorm" not in name
    }
    weights["embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    hidden = config.hidden_size
    weights["fc.weight"] = torch.randn(hidden, 2 * hidden) * config.initializer_range
    save_file(weights, out / "model.safetensors")
    return out


def tiny_llama_w8a8(
    path: str | os.PathLike[str], shape: LlamaShape | None = None, *, seed: int = 0
) -> Path:
    """``tiny_llama`` in compressed-tensors W8A8 int8 format (what llm-compressor writes for a
    ``W8A8`` scheme): every linear weight of the decoder layers as int8 with a per-channel fp32
    ``weight_scale`` [N, 1], activations quantized per token at run time, lm_head ignored.
    vLLM's CPU backend serves it with ``CPUInt8ScaledMMLinearKernel``."""
    from safetensors.torch import load_file, save_file

    out = tiny_llama(path, shape, seed=seed, tie_word_embeddings=False)
    files = sorted(out.glob("*.safetensors"))
    for file in files:
        tensors = load_file(file)
        quantized: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if ".layers." in name and name.endswith("_proj.weight"):
                scale = t.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
                quantized[name] = (t.float() / scale).round().clamp(-128, 127).to(torch.int8)
                quantized[name.removesuffix("weight") + "weight_scale"] = scale
            else:
                quantized[name] = t
        save_file(quantized, file, metadata={"format": "pt"})
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    int8 = {"num_bits": 8, "type": "int", "symmetric": True}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**int8, "strategy": "channel", "dynamic": False},
                "input_activations": {**int8, "strategy": "token", "dynamic": True},
            }
        },
    }
    config_path.write_text(json.dumps(config, indent=2))
    return out
