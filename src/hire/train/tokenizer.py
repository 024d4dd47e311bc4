"""A byte-level BPE tokenizer trained on the project's corpus, for models trained from scratch.

Trained with Hugging Face ``tokenizers`` and wrapped as a ``PreTrainedTokenizerFast``, so the run
directory is an ordinary Hugging Face model directory (``AutoTokenizer`` loads it).
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = "<|endoftext|>"


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer with ``vocab_size`` entries (one special token, ``<|endoftext|>``,
    used as BOS and EOS) learned from ``text``."""
    # tokenizers and transformers are imported where they are used: they take seconds to import,
    # and `hire --help` imports this package
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + 1} (the 256 bytes and one special token), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=None)


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def encode(tokenizer, text: str):
    """All of ``text`` as one int64 tensor of token ids (no special tokens). # -> (N,)"""
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
