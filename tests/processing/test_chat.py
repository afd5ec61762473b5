"""Chat rendering against an independent implementation of the official recipe (spec §3.2-3.4, §4.4)."""

import re

import pytest

from phi3v.processing.chat import IGNORE_INDEX, Conversation, Turn, render, template_text
from phi3v.processing.tokenizer import build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()
IMAGE_ID = 511


def tokenize(text, add_special_tokens):
    return TOKENIZER(text, add_special_tokens=add_special_tokens)["input_ids"]


def official_turn(content, counts, system=None):
    """What the official processor makes of one user turn: jinja template, per-chunk tokenisation, and the k-th
    tag replaced by image k's run of placeholders."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    prompt = TOKENIZER.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chunks = re.split(r"<\|image_\d+\|>", prompt)
    tags = [int(k) for k in re.findall(r"<\|image_(\d+)\|>", prompt)]
    ids = []
    for i, chunk in enumerate(chunks):
        ids += TOKENIZER(chunk).input_ids
        if i < len(tags):
            ids += [IMAGE_ID] * counts[tags[i] - 1]
    return ids


def official_answer(answer):
    return TOKENIZER(answer + "<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids


def test_template_text_equals_the_jinja_template():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<|image_1|>\n<|image_2|>\nSame digit?"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "Which?"},
    ]
    for generation in (False, True):
        want = TOKENIZER.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        assert template_text(messages, generation) == want
    assert template_text(messages[:2], True).endswith("Same digit?<|end|>\n<|assistant|>\n")


def test_single_image_sample_matches_the_official_recipe():
    conversation = Conversation([Turn("What digit is this?", ["img"], "7")])
    rendered = render(conversation, tokenize, [13], IMAGE_ID)
    prompt = official_turn("<|image_1|>\nWhat digit is this?", [13])
    answer = official_answer("7")
    assert rendered.input_ids == prompt + answer
    assert rendered.labels == [IGNORE_INDEX] * len(prompt) + answer
    # As with the real tokenizer.json: "▁" before the answer and before the newline after <|end|>, all supervised.
    assert TOKENIZER.convert_ids_to_tokens(answer) == ["▁7", "<|end|>", "▁", "<0x0A>", "<|endoftext|>"]


def test_multi_turn_multi_image_with_system_matches_the_official_recipe():
    conversation = Conversation(
        [
            Turn("<|image_1|><|image_2|>\nAre these the same digit?", ["a", "b"], "no"),
            Turn("What is the left one?", [], "3"),
            Turn("And this one?", ["c"], "8"),
        ],
        system="You read digits.",
    )
    counts = [13, 27, 17]
    rendered = render(conversation, tokenize, counts, IMAGE_ID)
    want_ids, want_labels = [], []
    for content, turn_counts, answer, system in [
        ("<|image_1|><|image_2|>\nAre these the same digit?", counts[:2], "no", "You read digits."),
        ("What is the left one?", [], "3", None),
        ("<|image_1|>\nAnd this one?", counts[2:], "8", None),
    ]:
        prompt = official_turn(content, turn_counts, system)
        want_ids += prompt + official_answer(answer)
        want_labels += [IGNORE_INDEX] * len(prompt) + official_answer(answer)
    assert rendered.input_ids == want_ids
    assert rendered.labels == want_labels
    assert rendered.image_order == [0, 1, 2]
    assert [end - start for start, end in rendered.image_spans] == counts


def test_labels_cover_exactly_the_answers_and_their_end_tokens():
    conversation = Conversation([Turn("Q1", ["x"], "alpha"), Turn("Q2", [], "beta")])
    rendered = render(conversation, tokenize, [9], IMAGE_ID)
    supervised = [label for label in rendered.labels if label != IGNORE_INDEX]
    assert supervised == official_answer("alpha") + official_answer("beta")
    assert TOKENIZER.decode(official_answer("alpha")) == "alpha<|end|> \n<|endoftext|>"  # the ▁ of tokenizer.json
    for start, end in rendered.image_spans:
        assert set(rendered.labels[start:end]) == {IGNORE_INDEX}
    # every supervised position holds its own input id (labels are unshifted)
    assert all(lab == tok for lab, tok in zip(rendered.labels, rendered.input_ids, strict=True) if lab != -100)


def test_each_text_chunk_starts_with_bos_like_the_official_processor():
    """The chosen tokenisation: chunks between image tags are tokenised separately, so <s> follows every image."""
    conversation = Conversation([Turn("<|image_1|><|image_2|>\nq", ["a", "b"], "a")])
    rendered = render(conversation, tokenize, [5, 5], IMAGE_ID)
    bos = [i for i, t in enumerate(rendered.input_ids) if t == TOKENIZER.bos_token_id]
    # "<|user|>\n" | image 1 | "" | image 2 | "\nq<|end|>\n<|assistant|>\n": three chunks, three <s>
    assert len(bos) == 3
    assert bos[1] == rendered.image_spans[0][1] and bos[2] == rendered.image_spans[1][1]


def test_generation_mode_stops_after_the_last_prompt():
    conversation = Conversation([Turn("Q1", [], "A1"), Turn("Q2", ["x"], None)])
    rendered = render(conversation, tokenize, [9], IMAGE_ID, generation=True)
    assert rendered.input_ids == official_turn("Q1", []) + official_answer("A1") + official_turn("<|image_1|>\nQ2", [9])
    # <|assistant|> strips the whitespace after it (rstrip in tokenizer.json), so the prompt ends on it.
    assert TOKENIZER.convert_ids_to_tokens(rendered.input_ids[-3:]) == ["▁", "<0x0A>", "<|assistant|>"]


def test_out_of_order_tags_feed_images_in_appearance_order():
    conversation = Conversation([Turn("<|image_2|> then <|image_1|>", ["first", "second"], "ok")])
    rendered = render(conversation, tokenize, [5, 9], IMAGE_ID)
    assert rendered.image_order == [1, 0]
    assert [end - start for start, end in rendered.image_spans] == [9, 5]


@pytest.mark.parametrize(
    ("user", "n_images"),
    [("<|image_1|><|image_1|> twice", 2), ("<|image_3|> only", 2), ("<|image_1|> <|image_2|>", 1)],
)
def test_mismatched_tags_raise(user, n_images):
    conversation = Conversation([Turn(user, ["x"] * n_images, "a")])
    with pytest.raises(ValueError, match=rf"turn 1: image tags .* each of its {n_images} image"):
        render(conversation, tokenize, [5] * n_images, IMAGE_ID)


def test_training_turn_without_answer_raises():
    with pytest.raises(ValueError, match="turn 2 of 2 has no assistant answer to train on"):
        render(Conversation([Turn("a", [], "b"), Turn("c")]), tokenize, [], IMAGE_ID)
