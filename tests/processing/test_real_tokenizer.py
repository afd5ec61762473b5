"""phi3v's ids and labels with the real Phi-3-vision tokenizer files, against an independent re-implementation of
the official processor and the reference recipe (spec §3.2-3.4, §4.4) built on the `tokenizers` library alone."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from tokenizers import Tokenizer

from phi3v.data.dataset import JsonlDataset
from phi3v.processing import Conversation, Phi3VImageProcessor, Phi3VProcessor, Turn
from phi3v.processing.tokenizer import load_tokenizer
from phi3v.train.config import load_config

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


# ---- the system message from the jsonl file, the training config and the commands (issue 13) ----------------------

SYSTEM = "You are a careful assistant."


def _official_one_turn(system, user, count, answer=None):
    """The official ids (and the reference recipe's labels) of one turn with one image of ``count`` image tokens,
    its tag prefixed."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": f"<|image_1|>\n{user}"})
    prompt = official_prompt_ids(messages, [count])
    if answer is None:
        return prompt
    answer_ids = official_answer_ids(answer)
    return prompt + answer_ids, [-100] * len(prompt) + answer_ids


@pytest.fixture
def system_file(tmp_path):
    """Line 1 has its own ``system``, line 2 has none."""
    _image((400, 300)).save(tmp_path / "a.png")
    turn = {"images": ["a.png"], "user": "Describe.", "assistant": "A square."}
    lines = [{"id": "own", "source": "t", "system": SYSTEM, "conversations": [turn]},
             {"id": "none", "source": "t", "conversations": [turn]}]  # fmt: skip
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_a_jsonl_record_s_system_is_rendered_as_the_official_template_and_never_supervised(processor, system_file):
    dataset = JsonlDataset(system_file, system_file.parent, processor=processor)
    count = processor.image_processor.num_image_tokens(400, 300)
    for index, system in ((0, SYSTEM), (1, None)):
        sample = dataset[index]
        ids, labels = _official_one_turn(system, "Describe.", count, "A square.")
        assert sample.input_ids.tolist() == ids and sample.labels.tolist() == labels
    system_ids = ORACLE.encode(f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\n").ids
    assert dataset[0].input_ids[: len(system_ids)].tolist() == system_ids  # <s> <|system|> ... right at the start
    assert set(dataset[0].labels[: len(system_ids)].tolist()) == {-100}


def test_the_training_config_s_system_is_the_default_and_a_record_s_own_wins(processor, system_file):
    config = load_config(None, ["system=Answer: one word."])  # a colon: still text, not a YAML mapping
    assert config.system == "Answer: one word."
    dataset = JsonlDataset(system_file, system_file.parent, processor=processor, system=config.system)
    count = processor.image_processor.num_image_tokens(400, 300)
    for index, system in ((0, SYSTEM), (1, "Answer: one word.")):
        ids, labels = _official_one_turn(system, "Describe.", count, "A square.")
        assert dataset[index].input_ids.tolist() == ids and dataset[index].labels.tolist() == labels


@pytest.fixture(scope="module")
def real_vocabulary_model(tmp_path_factory):
    """The tiny model with the real vocabulary's size and ids, saved with the real tokenizer's processor."""
    from phi3v import build_model
    from phi3v.model.presets import preset_config

    config = preset_config("tiny")
    config.vocab_size, config.image_token_id, config.pad_token_id = 32064, IMAGE_ID, 32000
    out = tmp_path_factory.mktemp("real-vocabulary")
    build_model(config).save_pretrained(out)
    image_processor = Phi3VImageProcessor(num_crops=4, crop_size=config.crop_size)
    Phi3VProcessor(image_processor, load_tokenizer(REAL)).save_pretrained(out)
    return out


@pytest.fixture
def prompts(monkeypatch):
    """The prompt ids of every ``generate`` call, in order."""
    from phi3v import Phi3VForCausalLM

    seen, original = [], Phi3VForCausalLM.generate

    def recording(self, *args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Phi3VForCausalLM, "generate", recording)
    return seen


def test_phi3v_generate_system_puts_the_official_system_turn_in_the_prompt(real_vocabulary_model, tmp_path, prompts):
    from phi3v.cli import main

    _image((400, 300)).save(tmp_path / "a.png")
    args = ["generate", "--model", str(real_vocabulary_model), "--image", str(tmp_path / "a.png"), "--no-stream",
            "--max-new-tokens", "1"]  # fmt: skip
    assert main([*args, "--system", SYSTEM, "Describe."]) == 0
    assert main([*args, "Describe."]) == 0
    count = Phi3VImageProcessor(num_crops=4, crop_size=56).num_image_tokens(400, 300)  # the tiny model's crops
    assert prompts == [_official_one_turn(SYSTEM, "Describe.", count), _official_one_turn(None, "Describe.", count)]


def test_phi3v_generate_refuses_an_empty_system(real_vocabulary_model, capsys):
    from phi3v.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--model", str(real_vocabulary_model), "--system", " ", "Describe."])
    assert "--system: expected a non-empty system message, got ' '" in capsys.readouterr().err


def test_an_openai_system_message_is_served_as_the_official_system_turn(processor):
    """``phi3v serve``: the request's system message renders as ``phi3v generate --system`` and the jsonl field do."""
    import base64
    import io

    from phi3v.serve.config import ServeConfig
    from phi3v.serve.protocol import parse_chat_request

    buffer = io.BytesIO()
    _image((400, 300)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Describe."}]}]  # fmt: skip
    request = parse_chat_request({"model": "m", "messages": messages}, ["m"], ServeConfig(model="m"))
    sample = processor.encode(request.conversation, generation=True)
    count = processor.image_processor.num_image_tokens(400, 300)
    assert sample.input_ids.tolist() == _official_one_turn(SYSTEM, "Describe.", count)


def test_phi3v_eval_system_is_the_default_and_a_record_s_own_wins(real_vocabulary_model, system_file, tmp_path,
                                                                 prompts):  # fmt: skip
    from phi3v.cli import main

    args = ["eval", "--model", str(real_vocabulary_model), "--data", str(system_file), "--image-root",
            str(system_file.parent), "--task", "generic", "--batch-size", "1", "--max-new-tokens", "1"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "flag"), "--system", "Flag text."]) == 0
    count = Phi3VImageProcessor(num_crops=4, crop_size=56).num_image_tokens(400, 300)
    assert prompts == [
        _official_one_turn(SYSTEM, "Describe.", count),
        _official_one_turn("Flag text.", "Describe.", count),
    ]
    prompts.clear()
    assert main([*args, "--out", str(tmp_path / "none")]) == 0
    assert prompts == [_official_one_turn(SYSTEM, "Describe.", count), _official_one_turn(None, "Describe.", count)]
