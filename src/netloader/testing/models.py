"""Real models generated locally (no download), for the vLLM tests, demo and benchmarks."""

from __future__ import annotations

import os
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
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(path)
    torch.manual_seed(seed)
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
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
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
