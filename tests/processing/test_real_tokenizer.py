"""phi3v's ids and labels with the real Phi-3-vision tokenizer files, against an independent re-implementation of
the official processor and the reference recipe (spec §3.2-3.4, §4.4) built on the `tokenizers` library alone."""

import re
from pathlib import Path

import pytest
from PIL import Image
from tokenizers import Tokenizer

from phi3v.processing import Conversation, Phi3VImageProcessor, Phi3VProcessor, Turn
from phi3v.processing.tokenizer import load_tokenizer

REAL = Path(__file__).parents[1] / "fixtures" / "phi-3-vision-tokenizer"
ORACLE = Tokenizer.from_file(str(REAL / "tokenizer.json"))
IMAGE_ID = 32044


def official_prompt_ids(messages, counts):
    """The official chat template (as in tokenizer_config.json), then Phi3VProcessor._convert_images_texts_to_inputs:
    split at the tags, each chunk through the tokenizer with its special tokens, tag k -> counts[k-1] placeholders
    (negative ids there; phi3v writes the image token instead)."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages) + "<|assistant|>\n"
    chunks = re.split(r"<\|image_\d+\|>", text)
    tags = [int(k) for k in re.findall(r"<\|image_(\d+)\|>", text)]
    ids = []
    for i, chunk in enumerate(chunks):
        ids += ORACLE.encode(chunk).ids
        if i < len(tags):
            ids += [IMAGE_ID] * counts[tags[i] - 1]
    return ids


def official_answer_ids(answer):
    return ORACLE.encode(answer + "<|end|>\n<|endoftext|>", add_special_tokens=False).ids


@pytest.fixture(scope="module")
def processor():
    return Phi3VProcessor(Phi3VImageProcessor(num_crops=4), load_tokenizer(REAL))


def _image(size):
    return Image.new("RGB", size, (120, 30, 200))


CASES = [
    # (system, [(user, image sizes, answer)])
    (None, [("What is in the image?", [(400, 300)], "A cat.")]),
    (None, [("<|image_1|>\n<|image_2|>\nSame digit?", [(100, 100), (640, 480)], "yes")]),
    (None, [("<|image_2|><|image_1|>\nSwapped tags", [(200, 50), (50, 200)], "no")]),
    ("You are a careful assistant.", [("Describe.", [(336, 336)], "  Leading spaces, then text  ")]),
    (None, [("Q1 with 3.14 and €", [(300, 300)], "A1"), ("  Q2 follow-up?\n", [], "Ünïcödé 日本 🙂")]),
    (None, [("No image at all\t(tab)", [], "42")]),
    ("System\n\nwith blank lines", [("First", [], "1"), ("Second", [], "2"), ("Third", [], "\n")]),
]


@pytest.mark.parametrize("system, turns", CASES)
def test_training_ids_and_labels_equal_the_official_recipe(processor, system, turns):
    conversation = Conversation([Turn(u, [_image(s) for s in sizes], a) for u, sizes, a in turns], system)
    sample = processor.encode(conversation)
    want_ids, want_labels = [], []
    for i, (user, sizes, answer) in enumerate(turns):
        counts = [processor.image_processor.num_image_tokens(w, h) for w, h in sizes]
        content = user if "<|image_" in user or not sizes else "".join(
            f"<|image_{k + 1}|>" for k in range(len(sizes))
        ) + "\n" + user  # fmt: skip
        messages = ([{"role": "system", "content": system}] if system and i == 0 else []) + [
            {"role": "user", "content": content}
        ]
        prompt, answer_ids = official_prompt_ids(messages, counts), official_answer_ids(answer)
        want_ids += prompt + answer_ids
        want_labels += [-100] * len(prompt) + answer_ids
    assert sample.input_ids.tolist() == want_ids
    assert sample.labels.tolist() == want_labels


@pytest.mark.parametrize("system, turns", CASES)
def test_generation_prompts_equal_the_official_processor(processor, system, turns):
    user, sizes, _ = turns[0]
    images = [_image(s) for s in sizes]
    inputs = processor.prompt(user, images, system=system)
    counts = [processor.image_processor.num_image_tokens(w, h) for w, h in sizes]
    content = user if "<|image_" in user or not sizes else "".join(
        f"<|image_{k + 1}|>" for k in range(len(sizes))
    ) + "\n" + user  # fmt: skip
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    assert inputs["input_ids"][0].tolist() == official_prompt_ids(messages, counts)


def test_a_prompt_string_in_the_official_form(processor):
    prompt = "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n"
    image = _image((500, 200))
    count = processor.image_processor.num_image_tokens(500, 200)
    ids = processor(prompt, [image])["input_ids"][0].tolist()
    assert ids == official_prompt_ids([{"role": "user", "content": "<|image_1|>\nWhat is shown?"}], [count])
    # The official sequence: BOS again after the image run, and ▁ before the text after every special token.
    assert ids[:4] == [1, 32010, 29871, 13] and ids[4 : 4 + count] == [IMAGE_ID] * count
    assert ids[4 + count : 4 + count + 3] == [1, 29871, 13]
