"""Tokenizers: Phi-3's exactly as ``tokenizer.json`` defines it, and a tiny one that tokenises the same way.

The released model was trained on the tokenisation of the checkpoint's ``tokenizer.json`` (the fast tokenizer of
transformers 4.x, or the ``tokenizers`` library on that file). Its normalizer prepends "▁" to every text segment,
also right after a special token, and turns each space into "▁". transformers 5's ``LlamaTokenizer`` replaces that
normalizer with a Metaspace pre-tokenizer that drops those markers (``<|end|>\n`` becomes ``[32007, 13]`` instead of
``[32007, 29871, 13]``), so phi3v never loads Phi-3 through it: ``load_tokenizer`` wraps the file's own pipeline in
``PreTrainedTokenizerFast`` and checks that nothing was rewritten. Special-token ids are always read from the
tokenizer (``special_ids``), never assumed.

The tiny tokenizer has the same pipeline (Prepend/Replace normalizer, BPE with byte fallback, BOS post-processor,
the same added-token flags) over a character-level vocabulary, so that the tiny preset, the tests and the demo
exercise what the real model gets. Its special tokens sit at 500 + k where the official ones sit at 32000 + k,
and ``<|image|>`` is 511.

Files are written back in the official layout (``write_tokenizer_files``): the original ``tokenizer.json`` bytes
when the tokenizer is unchanged, a ``tokenizer_config.json`` with the chat template, ``added_tokens_decoder``,
``add_bos_token`` and ``additional_special_tokens`` that transformers 4.x and the official processor read, and
``special_tokens_map.json``. Its ``tokenizer_class`` is ``PreTrainedTokenizerFast``: the one class that loads
``tokenizer.json`` unchanged in transformers 4 and 5 alike (the official processor code loads
``LlamaTokenizerFast`` by name, which in 4.x also reads the file as it is).
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from phi3v.utils import atomic_write_text

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


TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


# Added tokens whose right-hand whitespace the official tokenizer.json strips (``<|assistant|>\n`` is one token).
def _rstrip(token: str) -> bool:
    return token in ("</s>", "<|assistant|>", IMAGE_TOKEN) or token.startswith("<|placeholder")


# The official tokenizer_config's `additional_special_tokens`, duplicate included.
_ADDITIONAL_SPECIAL = ["<|system|>", END, "<|user|>", END]


def _pipeline(tokenizer_json: str) -> dict:
    data = json.loads(tokenizer_json)
    return {k: data.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")}


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a checkpoint directory's ``tokenizer.json`` with its own normalizer (no remote code).

    Raises:
        FileNotFoundError: when the directory has no ``tokenizer.json`` (a SentencePiece ``tokenizer.model`` alone
            cannot be turned into the official tokenisation without rewriting it).
        RuntimeError: if transformers changed the file's normalizer, pre-tokenizer, post-processor or decoder.
    """
    directory = Path(path)
    file = directory / TOKENIZER_FILE
    if not file.exists():
        raise FileNotFoundError(
            f"{directory}: no {TOKENIZER_FILE}; phi3v reads the official tokenisation from it (a tokenizer.model "
            "alone would be converted by transformers into a different tokenisation)"
        )
    text = file.read_text(encoding="utf-8")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    if _pipeline(tokenizer.backend_tokenizer.to_str()) != _pipeline(text):
        raise RuntimeError(
            f"{file}: transformers rewrote the tokenizer's pipeline while loading it, so ids would differ from the "
            "official tokenisation; install the versions in constraints.txt"
        )
    tokenizer.phi3v_source = (file, _digest(tokenizer))  # lets save write the original bytes back
    if tokenizer.pad_token is None:
        tokenizer.pad_token = ENDOFTEXT
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _digest(tokenizer: PreTrainedTokenizerFast) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def write_tokenizer_files(tokenizer: PreTrainedTokenizerFast, directory: str | os.PathLike) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` in the official layout.

    Args:
        tokenizer: A Phi-3 tokenizer from ``load_tokenizer`` or ``build_tiny_tokenizer``.
        directory: Target directory (must exist).
    """
    directory = Path(directory)
    source = getattr(tokenizer, "phi3v_source", None)
    if source is not None and source[0].exists() and _digest(tokenizer) == source[1]:
        json_text = source[0].read_text(encoding="utf-8")  # unchanged: the original bytes
    else:
        json_text = tokenizer.backend_tokenizer.to_str(pretty=True)
    added = json.loads(json_text)["added_tokens"]

    def token(name: str) -> str | None:
        value = getattr(tokenizer, name)
        return str(value) if value is not None else None

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in added
        },
        "additional_special_tokens": _ADDITIONAL_SPECIAL,
        "bos_token": token("bos_token"),
        "chat_template": tokenizer.chat_template or CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": token("eos_token"),
        "legacy": False,
        "model_max_length": tokenizer.model_max_length,
        "pad_token": token("pad_token"),
        "padding_side": tokenizer.padding_side,
        "sp_model_kwargs": {},
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": token("unk_token"),
        "use_default_system_prompt": False,
    }

    def entry(content: str | None) -> dict | None:
        if content is None:
            return None
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    special_map = {"additional_special_tokens": _ADDITIONAL_SPECIAL} | {
        name: entry(config[name]) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    atomic_write_text(directory / TOKENIZER_FILE, json_text)
    atomic_write_text(directory / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(directory / SPECIAL_TOKENS_MAP_FILE, json.dumps(special_map, indent=2) + "\n")


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny preset's tokenizer: Phi-3's pipeline, special tokens and template over a 512-token vocabulary."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}  # byte fallback for anything else
    pieces = ["▁", *(c for c in string.printable[:94])]  # word-start marker, digits, letters, punctuation
    merges = [("▁", c) for c in string.ascii_lowercase + string.digits]  # word starts as single tokens
    for piece in pieces + [a + b for a, b in merges]:
        vocab[piece] = len(vocab)
    while len(vocab) < _TINY_SPECIAL_START:
        vocab[f"<reserved_{len(vocab)}>"] = len(vocab)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # The pipeline of Phi-3's tokenizer.json, component for component.
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    for token in ["<unk>", "<s>", "</s>", *PHI3_ADDED_TOKENS, IMAGE_TOKEN]:  # in id order, with the real flags
        added = AddedToken(token, rstrip=_rstrip(token), lstrip=False, normalized=False, special=token != "</s>")
        (backend.add_special_tokens if added.special else backend.add_tokens)([added])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=131072,
        chat_template=CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids([*PHI3_ADDED_TOKENS, IMAGE_TOKEN])
    if ids != list(range(_TINY_SPECIAL_START, TINY_VOCAB_SIZE)) or len(tokenizer) != TINY_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer special ids came out as {ids} (len {len(tokenizer)})")
    return tokenizer
