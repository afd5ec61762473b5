from phi3v import preset_config
from phi3v.processing.tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer, load_tokenizer, special_ids


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


def test_tiny_tokenizer_behaves_like_a_llama_sentencepiece_tokenizer(tmp_path):
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer("<|user|>\nHi there ü").input_ids
    assert ids[0] == tokenizer.bos_token_id  # BOS by default
    assert tokenizer.decode(ids, skip_special_tokens=True) == "\nHi there ü"  # byte fallback round-trips
    assert tokenizer("x", add_special_tokens=False).input_ids == tokenizer.convert_tokens_to_ids(["▁x"])
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert type(loaded).__name__ == "LlamaTokenizer" and loaded.chat_template == CHAT_TEMPLATE
    assert loaded("<|user|>\nHi there ü").input_ids == ids
