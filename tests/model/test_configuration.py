import json
import math

import pytest
import torch

from phi3v import Phi3VConfig, preset_config
from phi3v.model.configuration import CLIP_VIT_L14_336


@pytest.mark.parametrize("name", ["phi-3.5-vision", "phi-3-vision"])
def test_official_config_fields(name):
    config = preset_config(name)
    assert config.model_type == "phi3_v"
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (32064, 3072, 8192)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (32, 32, 32)
    assert config.rope_parameters["rope_type"] == "longrope"
    assert len(config.rope_parameters["short_factor"]) == len(config.rope_parameters["long_factor"]) == 48
    assert config.rope_parameters["original_max_position_embeddings"] == 4096
    assert config.embd_layer["hd_transform_order"] == "sub_glb"
    assert config.img_processor["num_img_tokens"] == 144
    assert config.vision_layers_used == 23 and config.merged_grid == 12 and config.crop_size == 336
    assert config.dtype == torch.bfloat16
    assert config._attn_implementation != "flash_attention_2"  # the hub file's choice is not forced on users


def test_phi35_and_phi3_differ_where_the_spec_says():
    new, old = preset_config("phi-3.5-vision"), preset_config("phi-3-vision")
    assert new.sliding_window == 262144 and old.sliding_window == 131072
    assert new.rope_parameters["short_factor"][-1] == pytest.approx(9.0)
    assert old.rope_parameters["short_factor"][-1] == pytest.approx(3.05)


def test_official_dict_round_trip_writes_su_rope_and_omits_default_clip():
    config = preset_config("phi-3.5-vision")
    data = config.to_official_dict()
    assert data["rope_scaling"]["type"] == "su" and set(data["rope_scaling"]) == {"type", "short_factor", "long_factor"}
    assert data["architectures"] == ["Phi3VForCausalLM"] and data["torch_dtype"] == "bfloat16"
    assert "vision_config" not in data and "rope_parameters" not in data
    again = Phi3VConfig.from_official_dict(json.loads(json.dumps(data)))
    assert again.to_official_dict() == data


def test_su_attention_scale_matches_the_official_formula():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = preset_config("phi-3.5-vision")
    _, scale = ROPE_INIT_FUNCTIONS["longrope"](config)
    assert scale == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))  # 1.19024


def test_tiny_config_keeps_its_vision_config_in_the_file():
    data = preset_config("tiny").to_official_dict()
    assert data["vision_config"]["hidden_size"] == 32
    assert Phi3VConfig.from_official_dict(data).vision_config.hidden_size == 32


def test_default_vision_tower_is_clip_l14_336():
    config = Phi3VConfig()
    assert {k: getattr(config.vision_config, k) for k in CLIP_VIT_L14_336} == CLIP_VIT_L14_336


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"embd_layer": {"hd_transform_order": "glb_sub"}}, "hd_transform_order"),
        ({"embd_layer": {"projection_cls": "linear"}}, "projection_cls"),
        ({"img_processor": {"type_feature": "cls_patch"}}, "type_feature"),
        ({"rope_scaling": {"type": "yarn", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48}}, "yarn"),
    ],
)
def test_unsupported_configs_raise(change, message):
    with pytest.raises(ValueError, match=message):
        Phi3VConfig(**change)


@pytest.mark.parametrize("name", ["phi-3.5-vision", "phi-3-vision"])
def test_reads_the_official_config_json_file(tmp_path, name):
    """The hub file as shipped: auto_map, torch_dtype and a flash-attention request included."""
    from importlib import resources

    data = json.loads(resources.files("phi3v.model").joinpath("official_configs", f"{name}.json").read_text())
    data |= {
        "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig"},
        "_attn_implementation": "flash_attention_2",
    }
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = Phi3VConfig.from_json_file(tmp_path / "config.json")
    assert config.rope_parameters["short_factor"] == data["rope_scaling"]["short_factor"]
    assert config.sliding_window == data["sliding_window"] and config.eos_token_id == 2
    written = config.to_official_dict()
    for key in ("embd_layer", "img_processor", "rope_theta", "vocab_size", "sliding_window", "torch_dtype"):
        assert written[key] == data[key], key
    assert written["rope_scaling"] == data["rope_scaling"]


def test_a_config_of_another_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    with pytest.raises(ValueError, match="model_type is 'phi3', expected 'phi3_v'"):
        Phi3VConfig.from_json_file(tmp_path / "config.json")
