import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from phi3v import Phi3VForCausalLM, build_model
from tests.conftest import image_batch, prompt_ids

P = "model.vision_embed_tokens."
V = P + "img_processor.vision_model."


def _spec_keys(layers=32, vision_layers=24):
    """Spec §2.7, written out independently of the model code: key -> shape at official size."""
    keys = {"model.embed_tokens.weight": (32064, 3072), "model.norm.weight": (3072,), "lm_head.weight": (32064, 3072)}
    for i in range(layers):
        layer = f"model.layers.{i}."
        keys |= {
            layer + "self_attn.qkv_proj.weight": (9216, 3072),
            layer + "self_attn.o_proj.weight": (3072, 3072),
            layer + "mlp.gate_up_proj.weight": (16384, 3072),
            layer + "mlp.down_proj.weight": (3072, 8192),
            layer + "input_layernorm.weight": (3072,),
            layer + "post_attention_layernorm.weight": (3072,),
        }
    keys |= {
        P + "glb_GN": (1, 1, 4096), P + "sub_GN": (1, 1, 1, 4096),
        P + "img_projection.0.weight": (3072, 4096), P + "img_projection.0.bias": (3072,),
        P + "img_projection.2.weight": (3072, 3072), P + "img_projection.2.bias": (3072,),
        V + "embeddings.class_embedding": (1024,), V + "embeddings.patch_embedding.weight": (1024, 3, 14, 14),
        V + "embeddings.position_embedding.weight": (577, 1024),
        V + "pre_layrnorm.weight": (1024,), V + "pre_layrnorm.bias": (1024,),
        V + "post_layernorm.weight": (1024,), V + "post_layernorm.bias": (1024,),
    }  # fmt: skip
    for j in range(vision_layers):
        layer = f"{V}encoder.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys |= {layer + f"self_attn.{proj}.weight": (1024, 1024), layer + f"self_attn.{proj}.bias": (1024,)}
        for norm in ("layer_norm1", "layer_norm2"):
            keys |= {layer + f"{norm}.weight": (1024,), layer + f"{norm}.bias": (1024,)}
        keys |= {layer + "mlp.fc1.weight": (4096, 1024), layer + "mlp.fc1.bias": (4096,),
                 layer + "mlp.fc2.weight": (1024, 4096), layer + "mlp.fc2.bias": (1024,)}  # fmt: skip
    return keys


@pytest.mark.parametrize("preset", ["phi-3.5-vision", "phi-3-vision"])
def test_full_size_preset_on_meta_has_the_spec_keys_and_shapes(preset):
    model = build_model(preset, device="meta")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    spec = _spec_keys()
    unused = {k for k in spec if k.startswith((V + "post_layernorm.", V + "encoder.layers.23."))}
    assert got == {k: v for k, v in spec.items() if k not in unused}
    assert sum(p.numel() for p in model.parameters()) + sum(
        spec[k][0] * (spec[k][1] if len(spec[k]) > 1 else 1) for k in unused
    ) == pytest.approx(4.146e9, rel=1e-3)


def test_save_load_round_trip_is_bit_identical(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    loaded = Phi3VForCausalLM.from_pretrained(tmp_path)
    for (name, a), (name_b, b) in zip(tiny.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b), name
    grids = [(2, 1)]
    pixel_values, image_sizes = image_batch(tiny, grids)
    ids = prompt_ids(tiny, [[1, 7], grids[0], [8, 9]])[None]
    want = tiny(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
    got = loaded(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
    assert torch.equal(got, want)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "phi3_v" and config["rope_scaling"]["type"] == "su"


def test_load_in_another_dtype(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    loaded = Phi3VForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(loaded.lm_head.weight, tiny.lm_head.weight.bfloat16())


def _official_layout(model, directory):
    """Write a checkpoint the way the official model stores one: 2 shards + index, the ``wte`` alias instead of
    ``embed_tokens``, and the CLIP layer and post-layernorm that the official code builds but never uses."""
    state = dict(model.state_dict())
    state["model.vision_embed_tokens.wte.weight"] = state.pop("model.embed_tokens.weight")
    width = model.config.vision_config.hidden_size
    extra = {
        f"{V}post_layernorm.weight": torch.ones(width), f"{V}post_layernorm.bias": torch.zeros(width),
        f"{V}encoder.layers.2.mlp.fc1.bias": torch.arange(64.0),
    }  # fmt: skip
    state |= extra
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    directory.mkdir()
    for name, names in shards.items():
        save_file({k: state[k].contiguous() for k in names}, directory / name)
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(model.config.to_official_dict()))
    return extra


def test_official_layout_loads_and_saves_back_the_complete_key_set(tiny, tmp_path, caplog):
    extra = _official_layout(tiny, tmp_path / "official")
    with caplog.at_level(logging.INFO, logger="phi3v"):
        loaded = Phi3VForCausalLM.from_pretrained(tmp_path / "official")
    assert [r.message for r in caplog.records if "unused by Phi-3-V" in r.message] != []
    assert torch.equal(loaded.model.embed_tokens.weight, tiny.model.embed_tokens.weight)
    loaded.save_pretrained(tmp_path / "resaved", max_shard_size=100_000)
    index = json.loads((tmp_path / "resaved" / "model.safetensors.index.json").read_text())
    saved = set(index["weight_map"])
    assert saved == set(tiny.state_dict()) | set(extra)
    assert "model.vision_embed_tokens.wte.weight" not in saved
    shard = tmp_path / "resaved" / index["weight_map"][f"{V}encoder.layers.2.mlp.fc1.bias"]
    with safe_open(shard, "pt") as f:
        assert torch.equal(f.get_tensor(f"{V}encoder.layers.2.mlp.fc1.bias"), torch.arange(64.0))


def test_official_layout_loads_4bit_with_the_alias_and_the_unused_clip_tensors(tiny, tmp_path):
    """QLoRA's load: transformers' bitsandbytes quantiser on the same key map and checks, straight from the files."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    extra = _official_layout(tiny, tmp_path / "official")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    loaded = Phi3VForCausalLM.from_pretrained(tmp_path / "official", quantization_config=nf4)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert isinstance(loaded.model.vision_embed_tokens.img_processor.vision_model.encoder.layers[1].mlp.fc1,
                      bnb.nn.Linear4bit)  # fmt: skip
    assert type(loaded.lm_head) is torch.nn.Linear  # transformers keeps the output head by default
    assert torch.equal(loaded.model.embed_tokens.weight, tiny.model.embed_tokens.weight)  # read from the wte alias
    assert loaded.unused_official_weights.keys() == extra.keys()
    assert all(torch.equal(loaded.unused_official_weights[k], v) for k, v in extra.items())
    with pytest.raises(ValueError, match=r"loaded with quantization \(bitsandbytes\) has no official-format weights"):
        loaded.save_pretrained(tmp_path / "resaved")
    assert not (tmp_path / "resaved" / "config.json").exists()


def test_a_4bit_load_still_names_a_missing_tensor(tiny, tmp_path):
    from transformers import BitsAndBytesConfig

    state = dict(tiny.state_dict())
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    tiny.config.save_official(tmp_path)
    with pytest.raises(ValueError, match=r"1 missing: model\.layers\.1\.mlp\.down_proj\.weight"):
        Phi3VForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))


def test_resaving_with_fewer_shards_removes_stale_shards(tiny, tmp_path):
    tiny.save_pretrained(tmp_path, max_shard_size=100_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    tiny.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    Phi3VForCausalLM.from_pretrained(tmp_path)


def test_missing_unexpected_and_misshaped_tensors_are_named(tiny, tmp_path):
    state = dict(tiny.state_dict())
    del state["model.norm.weight"]
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    state["lm_head.weight"] = torch.zeros(3, 64)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    tiny.config.save_official(tmp_path)
    with pytest.raises(ValueError) as err:
        Phi3VForCausalLM.from_pretrained(tmp_path)
    message = str(err.value)
    assert "1 missing: model.norm.weight" in message
    assert "1 unexpected: model.layers.0.mlp.extra.weight" in message
    assert "lm_head.weight: checkpoint (3, 64), model (512, 64)" in message


def test_pickled_weights_are_refused(tiny, tmp_path):
    tiny.config.save_official(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*never loads pickled weights"):
        Phi3VForCausalLM.from_pretrained(tmp_path)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Phi3VForCausalLM.from_pretrained(tmp_path / "nope")


def test_recomputed_buffers_in_a_checkpoint_are_ignored(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["model.rotary_emb.inv_freq"] = torch.zeros(8)
    state[V + "embeddings.position_ids"] = torch.zeros(1, 17, dtype=torch.long)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    tiny.config.save_official(tmp_path)
    loaded = Phi3VForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, tiny.model.rotary_emb.inv_freq)
    assert loaded.model.vision_embed_tokens.img_processor.vision_model.embeddings.position_ids[0, -1] == 16


def test_unused_official_tensors_follow_the_dtype(tiny, tmp_path):
    _official_layout(tiny, tmp_path / "official")
    loaded = Phi3VForCausalLM.from_pretrained(tmp_path / "official", dtype=torch.bfloat16)
    loaded.save_pretrained(tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_a_save_that_fails_midway_leaves_the_old_checkpoint(tiny, tmp_path, monkeypatch):
    import phi3v.model.weights as weights

    tiny.save_pretrained(tmp_path, max_shard_size=100_000)
    before = sorted(p.name for p in tmp_path.iterdir())
    other = build_model("tiny", seed=1)
    calls = []

    def failing_save(shard, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(shard, path, metadata=metadata)

    monkeypatch.setattr(weights, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(tmp_path, max_shard_size=100_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary file left behind
    reloaded = Phi3VForCausalLM.from_pretrained(tmp_path)
    for key, value in tiny.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_save_arguments_of_distributed_callers(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "skipped", is_main_process=False)
    assert not (tmp_path / "skipped").exists()
    with pytest.raises(ValueError, match="safetensors only"):
        tiny.save_pretrained(tmp_path / "pickle", safe_serialization=False)


def test_an_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="nobody/nothing is neither a local directory nor a hub repository"):
        Phi3VForCausalLM.from_pretrained("nobody/nothing", local_files_only=True)
