"""Tokenizers: Phi-3's as shipped in the checkpoints, and a tiny one with the same special tokens and template.

The official checkpoints ship a Llama SentencePiece tokenizer (``tokenizer.model`` / ``tokenizer.json``) with
added special tokens; transformers loads it as ``LlamaTokenizer`` without remote code. Special-token ids are
always read from the tokenizer (``special_ids``), never assumed.

The tiny tokenizer is the same class with a character-level vocabulary (byte fallback, ``▁`` word starts), so
the tiny preset, the tests and the demo exercise the real code path. Its special tokens sit at 500 + k where the
official ones sit at 32000 + k, and ``<|image|>`` is 511.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

END = "<|end|>"
ENDOFTEXT = "<|endoftext|>"
IMAGE_TOKEN = "<|image|>"
# Phi-3's added tokens in id order (32000 ... 32010), then phi3v's image token.
PHI3_ADDED_TOKENS = (
    ENDOFTEXT, "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>", "<|placeholder4|>",
    "<|system|>", END, "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
)  # fmt: skip

# The official chat template (tokenizer_config.json of Phi-3.5-vision-instruct).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{- '<|assistant|>\\n' -}}"
    "{% endif %}"
)

TINY_VOCAB_SIZE = 512
_TINY_SPECIAL_START = 500


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens phi3v needs, read from a tokenizer."""

    bos: int | None
    pad: int
    end: int
    endoftext: int
    image: int | None


def special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    """Read the special-token ids from ``tokenizer``.

    Raises:
        ValueError: if ``<|end|>`` or ``<|endoftext|>`` is not a single token of this tokenizer.
    """

    def single(token: str) -> int | None:
        ids = tokenizer.convert_tokens_to_ids([token])
        return None if ids[0] is None or ids[0] == tokenizer.unk_token_id else ids[0]

    end, endoftext = single(END), single(ENDOFTEXT)
    if end is None or endoftext is None:
        raise ValueError(f"the tokenizer has no single-token {END} and {ENDOFTEXT}; it is not a Phi-3 tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else endoftext
    return SpecialIds(bos=tokenizer.bos_token_id, pad=pad, end=end, endoftext=endoftext, image=single(IMAGE_TOKEN))


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load the tokenizer files of a checkpoint directory (no remote code).

    Raises:
        FileNotFoundError: when the directory has neither ``tokenizer.json`` nor ``tokenizer.model`` (transformers
            would otherwise build an almost empty tokenizer from the remaining files without complaint).
    """
    directory = Path(path)
    if not any((directory / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"{directory}: no tokenizer.json or tokenizer.model")
    config_file = directory / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.exists() else None
    if declared in ("LlamaTokenizer", "LlamaTokenizerFast"):  # Phi-3's: load it directly, no config.json guessing
        tokenizer = LlamaTokenizer.from_pretrained(directory)
    else:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = ENDOFTEXT
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_tokenizer() -> LlamaTokenizer:
    """The tiny preset's tokenizer: Phi-3's class, special tokens and template over a 512-token vocabulary."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}  # byte fallback for anything else
    pieces = ["▁", *(c for c in string.printable[:94])]  # word-start marker, digits, letters, punctuation
    merges = [("▁", c) for c in string.ascii_lowercase + string.digits]  # word starts as single tokens
    for piece in pieces + [a + b for a, b in merges]:
        vocab[piece] = len(vocab)
    while len(vocab) < _TINY_SPECIAL_START:
        vocab[f"<reserved_{len(vocab)}>"] = len(vocab)
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        extra_special_tokens=[*list(PHI3_ADDED_TOKENS), IMAGE_TOKEN],
        model_max_length=131072,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids([*PHI3_ADDED_TOKENS, IMAGE_TOKEN])
    if ids != list(range(_TINY_SPECIAL_START, TINY_VOCAB_SIZE)) or len(tokenizer) != TINY_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer special ids came out as {ids} (len {len(tokenizer)})")
    return tokenizer
