import json

import pytest
import torch
from PIL import Image

from phi3v import build_model
from phi3v.processing import Conversation, Phi3VProcessor, TruncationError, Turn
from phi3v.processing.tokenizer import CHAT_TEMPLATE


def _image(size, colour):
    return Image.new("RGB", size, colour)


@pytest.fixture(scope="module")
def processor():
    return Phi3VProcessor.tiny(num_crops=4)


def test_save_and_load_are_self_contained(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["num_crops"] == 4 and config["image_processor_type"] == "Phi3VImageProcessor"
    loaded = Phi3VProcessor.from_pretrained(tmp_path)
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE
    assert loaded.special == processor.special and len(loaded.tokenizer) == len(processor.tokenizer)
    conversation = [{"images": [_image((90, 40), (1, 2, 3))], "user": "Colour?", "assistant": "dark"}]
    a, b = processor.encode(conversation), loaded.encode(conversation)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.pixel_values, b.pixel_values)
    assert Phi3VProcessor.from_pretrained(tmp_path, num_crops=16).image_processor.num_crops == 16


def test_reads_the_official_preprocessor_config(processor, tmp_path):
    processor.tokenizer.save_pretrained(tmp_path)
    official = {
        "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "Phi3VImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "num_crops": 4,
        "num_img_tokens": 144,
        "processor_class": "Phi3VProcessor",
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(official))
    loaded = Phi3VProcessor.from_pretrained(tmp_path)
    assert loaded.image_processor.crop_size == 336 and loaded.image_processor.num_crops == 4
    assert loaded.image_token_id == 511  # read from the tokenizer's <|image|>, never assumed
    loaded.save_pretrained(tmp_path / "again")  # official keys it does not use survive a round trip
    again = json.loads((tmp_path / "again" / "preprocessor_config.json").read_text())
    # auto_map is written pointing at Microsoft's hub files: a local "processing_phi3_v" reference would need
    # the .py files beside it, which phi3v never writes.
    assert again["auto_map"]["AutoProcessor"] == "microsoft/Phi-3.5-vision-instruct--processing_phi3_v.Phi3VProcessor"
    assert again["num_img_tokens"] == 144


def test_broken_processor_files_are_named(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    config = tmp_path / "preprocessor_config.json"
    config.write_text('{"num_crops": "4"')
    with pytest.raises(ValueError, match=r"preprocessor_config\.json"):
        Phi3VProcessor.from_pretrained(tmp_path)
    config.write_text('{"num_crops": 0}')
    with pytest.raises(ValueError, match=r"preprocessor_config.json: num_crops must be at least 1"):
        Phi3VProcessor.from_pretrained(tmp_path)
    config.write_text('{"num_crops": 4}')
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        Phi3VProcessor.from_pretrained(tmp_path)


def test_batched_forward_equals_per_sample_forwards(processor):
    """Text-only and image samples with different crop grids in one right-padded batch."""
    model = build_model("tiny")
    conversations = [
        [{"user": "Say hi.", "assistant": "hi"}],
        [{"images": [_image((200, 60), (255, 0, 0))], "user": "Colour?", "assistant": "red"}],
        [
            {"images": [_image((50, 300), (0, 0, 255)), _image((80, 80), (0, 255, 0))], "user": "2?", "assistant": "y"},
            {"user": "Sure?", "assistant": "yes, both"},
        ],
    ]  # fmt: skip
    samples = [processor.encode(c) for c in conversations]
    assert [s.image_sizes.tolist() if s.image_sizes is not None else None for s in samples] == [
        None, [[56, 168]], [[224, 56], [112, 112]]
    ]  # fmt: skip
    batch = processor.collate(samples)
    assert batch["pixel_values"].shape == (3, 5, 3, 56, 56)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
    logits = model(**inputs).logits
    total, tokens = 0.0, 0
    for row, sample in enumerate(samples):
        alone = model(input_ids=sample.input_ids[None], pixel_values=sample.pixel_values,
                      image_sizes=sample.image_sizes)  # fmt: skip
        n = len(sample.input_ids)
        torch.testing.assert_close(logits[row, :n], alone.logits[0], rtol=1e-4, atol=1e-4)
        with_labels = model(input_ids=sample.input_ids[None], pixel_values=sample.pixel_values,
                            image_sizes=sample.image_sizes, labels=sample.labels[None])  # fmt: skip
        count = int((sample.labels[1:] != -100).sum())
        total, tokens = total + with_labels.loss * count, tokens + count
    batched = model(**inputs, labels=batch["labels"]).loss
    torch.testing.assert_close(batched, total / tokens, rtol=1e-5, atol=1e-5)  # token-weighted, not a mean of means


def test_prompt_gives_generation_inputs_in_three_lines(processor):
    model = build_model("tiny")
    inputs = processor.prompt("What colour is this?", [_image((64, 64), (255, 255, 0))])
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    ids = inputs["input_ids"][0].tolist()
    assert ids[-4:] == processor.tokenizer("<|end|>\n<|assistant|>\n", add_special_tokens=False).input_ids
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=processor.eos_token_ids,
                               pad_token_id=processor.pad_token_id)  # fmt: skip
    assert isinstance(processor.decode(generated[0, len(ids) :]), str)


def test_batched_prompts_are_left_padded(processor):
    conversations = [
        Conversation([Turn("A much longer question than the other one?", [_image((60, 60), (0, 0, 0))])]),
        Conversation([Turn("Short?", [_image((60, 200), (9, 9, 9))])]),
    ]
    batch = processor(conversations, generation=True)
    assert batch["attention_mask"][0].all() and not batch["attention_mask"][1, 0]
    assert (batch["input_ids"][1, : int((batch["attention_mask"][1] == 0).sum())] == processor.pad_token_id).all()


def test_truncation_never_cuts_an_image_span(processor):
    conversation = [{"images": [_image((60, 60), (0, 0, 0))], "user": "What is it?", "assistant": "a black square"}]
    full = processor.encode(conversation)
    image_end = int((full.input_ids == processor.image_token_id).nonzero().max()) + 1
    with pytest.raises(TruncationError, match=rf"cut at max_length {image_end - 1} would cut image 1's tokens"):
        processor.encode(conversation, max_length=image_end - 1)
    assert processor.encode(conversation, max_length=image_end - 1, on_overflow="drop") is None
    # a cut after the image that still keeps part of the answer is fine
    cut = processor.encode(conversation, max_length=len(full.input_ids) - 2)
    assert torch.equal(cut.input_ids, full.input_ids[:-2]) and cut.pixel_values is not None
    # a cut that leaves no answer token is refused
    answer_start = int((full.labels != -100).nonzero().min())
    with pytest.raises(TruncationError, match="keeps no answer token"):
        processor.encode(conversation, max_length=answer_start)


def test_truncation_before_a_later_image_raises(processor):
    conversation = [
        {"images": [_image((60, 60), (0, 0, 0))], "user": "First?", "assistant": "a"},
        {"images": [_image((60, 60), (9, 9, 9))], "user": "Second?", "assistant": "b"},
    ]
    full = processor.encode(conversation)
    first_turn_end = int((full.labels != -100).nonzero().min()) + 6  # inside the first answer
    with pytest.raises(TruncationError, match="image 2's tokens"):
        processor.encode(conversation, max_length=first_turn_end)


def test_a_jsonl_conversation_list_is_accepted_directly(processor):
    conversation = [{"images": [_image((60, 60), (0, 0, 0))], "user": "What?", "assistant": "x"}]
    batch = processor(conversation)
    assert torch.equal(batch["input_ids"][0], processor.encode(conversation).input_ids)


def test_dropped_samples_are_counted_by_the_collator(processor):
    conversation = [{"images": [_image((60, 60), (0, 0, 0))], "user": "What?", "assistant": "x"}]
    samples = [processor.encode(conversation, max_length=10, on_overflow="drop"), processor.encode(conversation)]
    batch = processor.collate(samples)
    assert batch["num_dropped"] == 1 and batch["input_ids"].shape[0] == 1


def test_an_official_style_prompt_string(processor):
    """processor(prompt, images) as with the official processor: same ids as the conversation route."""
    images = [_image((60, 60), (0, 0, 0)), _image((60, 120), (5, 5, 5))]
    prompt = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare.<|end|>\n<|assistant|>\n"
    official = processor(prompt, images)
    via_conversation = processor.prompt("<|image_1|>\n<|image_2|>\nCompare.", images)
    for key in via_conversation:
        assert torch.equal(official[key], via_conversation[key]), key
    with pytest.raises(ValueError, match="prompt: image tags"):
        processor("<|user|>\n<|image_1|>\nOne tag.<|end|>\n<|assistant|>\n", images)
