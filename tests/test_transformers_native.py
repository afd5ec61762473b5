"""transformers habits on phi3v directories: the model card's code, Auto classes, pipelines, PEFT, saved files."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    BatchFeature,
    PreTrainedTokenizerFast,
    pipeline,
)

import phi3v  # noqa: F401 - registers the Auto classes
from phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor, build_model

OFFICIAL = Path(__file__).parent / "fixtures" / "phi-3-vision-tokenizer"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A phi3v-saved tiny checkpoint directory: weights, config and processor files."""
    directory = tmp_path_factory.mktemp("tiny-phi3v")
    build_model("tiny", seed=0).save_pretrained(directory)
    Phi3VProcessor.tiny(num_crops=4).save_pretrained(directory)
    return directory


def _images():
    return [Image.new("RGB", (120, 60), (200, 30, 30)), Image.new("RGB", (50, 90), (20, 180, 60))]


def test_the_model_card_snippet_runs_verbatim(checkpoint):
    """microsoft/Phi-3.5-vision-instruct's README code with `import phi3v` instead of trust_remote_code=True (and
    local images instead of downloaded slides)."""
    model_id = str(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(
        model_id, device_map="cpu", torch_dtype="auto", _attn_implementation="eager"
    )
    processor = AutoProcessor.from_pretrained(model_id, num_crops=4)
    images, placeholder = [], ""
    for i, image in enumerate(_images(), start=1):
        images.append(image)
        placeholder += f"<|image_{i}|>\n"
    messages = [{"role": "user", "content": placeholder + "Summarize the deck of slides."}]
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(prompt, images, return_tensors="pt").to("cpu")
    generation_args = {"max_new_tokens": 6, "do_sample": False}
    generate_ids = model.generate(**inputs, eos_token_id=processor.tokenizer.eos_token_id, **generation_args)
    generate_ids = generate_ids[:, inputs["input_ids"].shape[1] :]
    response = processor.batch_decode(generate_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]

    assert type(model) is Phi3VForCausalLM and model.dtype == torch.float32
    assert type(processor) is Phi3VProcessor and processor.image_processor.num_crops == 4
    assert isinstance(inputs, BatchFeature) and set(inputs) == {"input_ids", "attention_mask", "pixel_values",
                                                                "image_sizes"}  # fmt: skip
    assert inputs["pixel_values"].shape[:2] == (2, 5)
    # The same greedy tokens as phi3v's own API, decoded the same way.
    own = processor.prompt(placeholder + "Summarize the deck of slides.", images)
    assert torch.equal(own["input_ids"], inputs["input_ids"])
    again = model.generate(**own, max_new_tokens=6, do_sample=False, eos_token_id=processor.tokenizer.eos_token_id)
    assert response == processor.decode(again[0, own["input_ids"].shape[1] :])


def test_auto_classes_load_a_phi3v_directory_without_remote_code(checkpoint):
    assert type(AutoConfig.from_pretrained(checkpoint)) is Phi3VConfig
    assert type(AutoModelForCausalLM.from_pretrained(checkpoint)) is Phi3VForCausalLM
    assert type(AutoModelForImageTextToText.from_pretrained(checkpoint)) is Phi3VForCausalLM
    assert type(AutoProcessor.from_pretrained(checkpoint)) is Phi3VProcessor
    assert type(AutoImageProcessor.from_pretrained(checkpoint)) is Phi3VImageProcessor
    # The official auto_map stays in what we write, for transformers 4.x and vLLM with trust_remote_code.
    config = json.loads((checkpoint / "config.json").read_text())
    assert (
        config["auto_map"]["AutoModelForCausalLM"]
        == "microsoft/Phi-3.5-vision-instruct--modeling_phi3_v.Phi3VForCausalLM"
    )


def test_from_pretrained_takes_the_standard_arguments(checkpoint):
    model = Phi3VForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, _attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    model = Phi3VForCausalLM.from_pretrained(checkpoint, torch_dtype="auto", device_map="auto", local_files_only=True)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    with pytest.raises(TypeError, match="bogus"):
        Phi3VForCausalLM.from_pretrained(checkpoint, bogus=1)
    with pytest.raises(TypeError, match="no remote code"):
        Phi3VForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    with pytest.raises(TypeError, match="bogus"):
        Phi3VProcessor.from_pretrained(checkpoint, bogus=1)


def _attention(model) -> dict[str, str]:
    """The attention each part runs (what its attention modules dispatch on at run time)."""
    clip_layer = model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers[0]
    return {
        "config": model.config._attn_implementation,
        "decoder": model.model.layers[0].self_attn.config._attn_implementation,
        "vision": clip_layer.self_attn.config._attn_implementation,
    }


@pytest.mark.parametrize("loader", [AutoModelForCausalLM, AutoModelForImageTextToText, Phi3VForCausalLM])
@pytest.mark.parametrize("argument", ["attn_implementation", "_attn_implementation"])
def test_the_requested_attention_sticks_through_every_loader(checkpoint, loader, argument):
    """The model card passes `_attn_implementation=` to AutoModelForCausalLM; transformers' spelling is
    `attn_implementation=`. Both reach the decoder and the CLIP tower, whichever class loads."""
    model = loader.from_pretrained(checkpoint, **{argument: "eager"})
    assert _attention(model) == {"config": "eager", "decoder": "eager", "vision": "eager"}
    assert _attention(loader.from_pretrained(checkpoint)) == {"config": "sdpa", "decoder": "sdpa", "vision": "sdpa"}


def test_the_hub_file_s_attention_is_not_followed_but_the_caller_s_is(checkpoint, tmp_path):
    """The official config.json says `_attn_implementation: flash_attention_2`; that is the file's, not the
    caller's choice (flash-attn is not even installed here)."""
    directory = tmp_path / "hub-like"
    shutil.copytree(checkpoint, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"_attn_implementation": "flash_attention_2"}))
    assert _attention(AutoModelForCausalLM.from_pretrained(directory))["vision"] == "sdpa"
    model = AutoModelForCausalLM.from_pretrained(directory, _attn_implementation="eager")
    assert _attention(model) == {"config": "eager", "decoder": "eager", "vision": "eager"}
    assert AutoConfig.from_pretrained(directory)._attn_implementation is None  # phi3v's SDPA default applies


def test_the_image_text_to_text_pipeline(checkpoint):
    pipe = pipeline("image-text-to-text", model=str(checkpoint))
    image = _images()[0]
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
    out = pipe(text=chat, max_new_tokens=4, do_sample=False, return_full_text=False)
    # What the model generates for the same prompt through phi3v's own API.
    processor, model = pipe.processor, pipe.model
    inputs = processor.prompt("<|image_1|>\nColour?", [image])
    ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"] == processor.decode(ids[0, inputs["input_ids"].shape[1] :])


def test_processor_chat_template_takes_content_parts(checkpoint):
    processor = AutoProcessor.from_pretrained(checkpoint)
    image = _images()[0]
    parts = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    text = processor.apply_chat_template(parts, add_generation_prompt=True)
    assert text == "<|user|>\n<|image_1|>\nWhat?<|end|>\n<|assistant|>\n"
    encoded = processor.apply_chat_template(parts, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert torch.equal(encoded["input_ids"], processor(text, [image])["input_ids"])


def test_peft_loads_an_adapter_on_a_phi3v_directory(checkpoint, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = Phi3VForCausalLM.from_pretrained(checkpoint)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["qkv_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 510, 259, 13, 300, 301]])
    want = lora(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), tmp_path / "adapter")
    torch.testing.assert_close(loaded(input_ids=ids).logits, want)
    assert not torch.allclose(Phi3VForCausalLM.from_pretrained(checkpoint)(input_ids=ids).logits, want)


def test_saved_processor_files_reload_through_generic_classes_to_identical_inputs(checkpoint, tmp_path):
    processor = Phi3VProcessor.from_pretrained(checkpoint)
    prompt = "<|user|>\n<|image_1|>\n<|image_2|>\nSame?<|end|>\n<|assistant|>\n"
    want = processor(prompt, _images())
    processor.save_pretrained(tmp_path)
    generic = AutoProcessor.from_pretrained(tmp_path)
    got = generic(prompt, _images())
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        assert torch.equal(got[key], want[key]), key
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    pixels = image_processor(_images(), return_tensors="pt")
    assert torch.equal(pixels["pixel_values"], want["pixel_values"])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert tokenizer(prompt.split("<|image_1|>")[0]).input_ids == want["input_ids"][0, :4].tolist()


def test_preprocessor_config_has_every_official_key(checkpoint):
    official = json.loads((OFFICIAL / "preprocessor_config.json").read_text())
    saved = json.loads((checkpoint / "preprocessor_config.json").read_text())
    assert set(official) <= set(saved)
    assert saved["processor_class"] == "Phi3VProcessor" and saved["image_processor_type"] == "Phi3VImageProcessor"
    assert saved["auto_map"] == {
        "AutoProcessor": "microsoft/Phi-3.5-vision-instruct--processing_phi3_v.Phi3VProcessor",
        "AutoImageProcessor": "microsoft/Phi-3.5-vision-instruct--image_processing_phi3_v.Phi3VImageProcessor",
    }
    assert saved["num_img_tokens"] == 4  # the tiny preset's 56-pixel crops: (56 / 28) ** 2 merged tokens
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (checkpoint / name).exists(), name
    assert json.loads((checkpoint / "tokenizer_config.json").read_text())["chat_template"].startswith("{% for message")


def test_the_official_processor_files_load_and_encode(tmp_path):
    """Microsoft's own preprocessor_config.json and tokenizer files, as shipped, through AutoProcessor."""
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "config.json"):  # fmt: skip
        (tmp_path / name).write_bytes((OFFICIAL / name).read_bytes())
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor) is Phi3VProcessor and processor.image_processor.num_crops == 16
    from tokenizers import Tokenizer

    prompt = "<|user|>\nHi<|end|>\n<|assistant|>\n"
    ids = processor(prompt)["input_ids"][0].tolist()
    assert ids == Tokenizer.from_file(str(OFFICIAL / "tokenizer.json")).encode(prompt).ids
