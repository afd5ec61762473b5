"""Tokenizers against the real Phi-3-vision files and the `tokenizers` library as the oracle (never phi3v itself)."""

import hashlib
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from phi3v import preset_config
from phi3v.processing.tokenizer import (
    CHAT_TEMPLATE,
    build_tiny_tokenizer,
    load_tokenizer,
    special_ids,
    write_tokenizer_files,
)

REAL = Path(__file__).parents[1] / "fixtures" / "phi-3-vision-tokenizer"
SHA256 = {
    "tokenizer.json": "005df01af5e16e758ff74c1a31e7b8910eb75c7d5626689d6bdee40a779d44fe",
    "tokenizer_config.json": "948a2ff1e1cf01d05e4a9880c8145818b3de2a2cb0492eb3eba6fa82fc4fd8ba",
    "special_tokens_map.json": "f9535fada19315e0d8eb89521cebe111c008fee98d16e7c6744acfb50505d8c3",
}
# Texts that cross every special-token boundary, with leading/trailing/double whitespace, unicode, digits and
# punctuation; each is tokenised as a whole and as the chunks the official processor tokenises one by one.
PROBES = [
    "<|user|>\nWhat is in the image?<|end|>\n<|assistant|>\n",
    "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\n",
    "  two leading spaces<|end|>  and after<|end|>\n",
    "trailing space <|end|>\n<|endoftext|>",
    "Answer: 12.50 € (approx.), 3/4 — ok?<|end|>\n<|endoftext|>",
    "\n\nnewlines\n\n<|end|>\n\n",
    "日本語のテキスト 🙂 émigré naïve<|end|>\n",
    "<|assistant|>  x<|assistant|>\ny<|placeholder1|> z",
    "tab\there<|user|>\t<|end|>",
    "</s> after eos</s>\n",
    " ",
    "",
]


@pytest.fixture(scope="module")
def real():
    for name, digest in SHA256.items():
        assert hashlib.sha256((REAL / name).read_bytes()).hexdigest() == digest, f"{name} is not the released file"
    return load_tokenizer(REAL)


@pytest.fixture(scope="module")
def oracle():
    return Tokenizer.from_file(str(REAL / "tokenizer.json"))


def test_the_documented_prompt_encodes_as_the_released_model_saw_it(real):
    # From the fixture's README (measured with the tokenizers library and transformers 4.x).
    prompt = "<|user|>\nWhat is in the image?<|end|>\n<|assistant|>\n"
    assert real(prompt).input_ids == [1, 32010, 29871, 13, 5618, 338, 297, 278, 1967, 29973, 32007, 29871, 13, 32001]
    # An answer's supervised tokens: ▁ before the first word and before the \n after <|end|>.
    answer = real("yes<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids
    assert answer == [4874, 32007, 29871, 13, 32000]
    assert real.convert_ids_to_tokens(answer) == ["▁yes", "<|end|>", "▁", "<0x0A>", "<|endoftext|>"]


@pytest.mark.parametrize("text", PROBES)
def test_real_tokenizer_equals_the_tokenizers_library(real, oracle, text):
    for add_special_tokens in (True, False):
        want = oracle.encode(text, add_special_tokens=add_special_tokens).ids
        assert real(text, add_special_tokens=add_special_tokens).input_ids == want


def test_special_ids_of_the_real_tokenizer(real):
    ids = special_ids(real)
    assert (ids.bos, ids.pad, ids.end, ids.endoftext, ids.image) == (1, 32000, 32007, 32000, 32044)
    assert real.chat_template == json.loads((REAL / "tokenizer_config.json").read_text())["chat_template"]


def test_saved_files_are_the_official_ones_and_load_to_the_same_ids(real, oracle, tmp_path):
    write_tokenizer_files(real, tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (REAL / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "special_tokens_map.json").read_text()) == json.loads(
        (REAL / "special_tokens_map.json").read_text()
    )
    saved, official = (json.loads((d / "tokenizer_config.json").read_text()) for d in (tmp_path, REAL))
    # Every official key with its value, except the class: PreTrainedTokenizerFast reads tokenizer.json as it is
    # in transformers 4 and 5 (5's LlamaTokenizer would not).
    assert saved.pop("tokenizer_class") == "PreTrainedTokenizerFast"
    official.pop("tokenizer_class")
    assert {k: saved[k] for k in official} == official
    loaders = {
        "phi3v": load_tokenizer(tmp_path),
        "AutoTokenizer": AutoTokenizer.from_pretrained(tmp_path),
        "PreTrainedTokenizerFast": PreTrainedTokenizerFast.from_pretrained(tmp_path),
    }
    for name, tokenizer in loaders.items():
        for text in PROBES:
            assert tokenizer(text).input_ids == oracle.encode(text).ids, (name, text)
        assert tokenizer.chat_template == real.chat_template, name


def test_transformers5_llama_tokenizer_is_not_the_official_tokenisation(oracle):
    """Why phi3v never loads Phi-3 as LlamaTokenizer: it drops the ▁ after special tokens. If a release fixes
    this, the test says so, and the workaround can be reconsidered."""
    from transformers import LlamaTokenizer

    llama = LlamaTokenizer.from_pretrained(REAL)
    text = PROBES[0]
    assert llama(text).input_ids != oracle.encode(text).ids


def test_a_directory_without_tokenizer_json_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_tiny_tokenizer_fits_the_tiny_model():
    tokenizer, config = build_tiny_tokenizer(), preset_config("tiny")
    ids = special_ids(tokenizer)
    assert len(tokenizer) == config.vocab_size
    assert (ids.bos, ids.pad, ids.image) == (config.bos_token_id, config.pad_token_id, config.image_token_id)
    # Phi-3's added tokens keep their order: <|endoftext|> = base + 0, <|assistant|> + 1, <|end|> + 7, <|user|> + 10
    base = ids.endoftext
    assert tokenizer.convert_tokens_to_ids(["<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]) == [
        base + 1, base + 6, base + 7, base + 10
    ]  # fmt: skip


def test_tiny_tokenizer_has_the_real_pipeline_and_token_flags():
    """The tiny tokenizer must tokenise like the real one at special-token boundaries, so the tiny tests exercise
    what the real model gets: same normalizer, post-processor and decoder, and the same added-token flags."""
    real_file = json.loads((REAL / "tokenizer.json").read_text())
    tiny_file = json.loads(build_tiny_tokenizer().backend_tokenizer.to_str())
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert tiny_file[part] == real_file[part], part
    real_flags = {t["content"]: t for t in real_file["added_tokens"]}
    for token in tiny_file["added_tokens"]:
        want = real_flags[token["content"]]
        assert {k: token[k] for k in ("lstrip", "rstrip", "normalized", "special")} == {
            k: want[k] for k in ("lstrip", "rstrip", "normalized", "special")
        }, token["content"]
    assert tiny_file["model"]["byte_fallback"] and tiny_file["model"]["type"] == "BPE"


def test_tiny_and_real_tokens_agree_around_special_tokens(real):
    tiny = build_tiny_tokenizer()
    for text in ["<|user|>\n", "<|end|>\n<|assistant|>\n", "x<|end|>\n<|endoftext|>", "<|system|>\n<|end|>\n"]:
        assert tiny.convert_ids_to_tokens(tiny(text).input_ids) == real.convert_ids_to_tokens(real(text).input_ids)


def test_tiny_tokenizer_round_trips_through_its_files(tmp_path):
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer("<|user|>\nHi there ü").input_ids
    assert ids[0] == tokenizer.bos_token_id  # BOS by default
    assert tokenizer.decode(ids, skip_special_tokens=True) == "\nHi there ü"  # byte fallback round-trips
    assert tokenizer("x", add_special_tokens=False).input_ids == tokenizer.convert_tokens_to_ids(["▁x"])
    write_tokenizer_files(tokenizer, tmp_path)
    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert loaded.chat_template == CHAT_TEMPLATE
        assert loaded("<|user|>\nHi there ü").input_ids == ids


def test_the_processor_tokenises_as_transformers_does_even_after_a_truncating_call(real):
    """The processor reads ids from the fast tokenizer's backend; they must be transformers' own, also when a
    caller's truncating or padding call left the backend configured."""
    from phi3v.processing import Phi3VImageProcessor, Phi3VProcessor

    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=1), real)
    text = PROBES[0]
    whole = real(text).input_ids
    for probe in PROBES:
        for flag in (True, False):
            assert processor._tokenize(probe, flag) == real(probe, add_special_tokens=flag).input_ids
    real._tokenizer.enable_truncation(max_length=4)  # left by a caller, or a tokenizer.json's truncation block
    try:
        assert processor._tokenize(text, True) == real(text).input_ids == whole  # transformers' call resets it
    finally:
        real._tokenizer.no_truncation()
    real._tokenizer.enable_padding(length=20, pad_id=32000, pad_token="<|endoftext|>")
    try:
        assert processor._tokenize(text, True) == real(text).input_ids
    finally:
        real._tokenizer.no_padding()
    assert processor._tokenize(text, True) == whole
