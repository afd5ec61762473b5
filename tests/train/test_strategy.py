import pytest
import torch

from phi3v import build_model
from phi3v.train.config import ConfigError, TrainConfig
from phi3v.train.strategy import apply_strategy, component

# On the tiny model: 37 CLIP tensors, 6 projector tensors (2 linear layers + 2 separators), 15 language tensors;
# LoRA adapts 2 CLIP layers x 6 projections, the projector's 2 linear layers, 2 decoder layers x 4 + lm_head.
# Per component: (trainable base tensors, adapted modules), written out by hand.
EXPECTED = {
    "full": {"vision": (37, 0), "projector": (6, 0), "language": (15, 0)},
    "frozen_vision": {"vision": (0, 0), "projector": (6, 0), "language": (15, 0)},
    "lora": {"vision": (0, 12), "projector": (0, 2), "language": (0, 9)},
    "qlora": {"vision": (0, 12), "projector": (0, 2), "language": (0, 9)},
}


def _what_trains(model) -> dict[str, tuple[int, int]]:
    base, adapted = dict.fromkeys(("vision", "projector", "language"), 0), dict.fromkeys(("vision", "projector",
                                                                                           "language"), 0)  # fmt: skip
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            adapted[component(name.split(".lora_A.")[0])] += 1
            assert param.requires_grad, name
        elif ".lora_B." in name:
            assert param.requires_grad, name
        elif param.requires_grad:
            base[component(name)] += 1
    return {c: (base[c], adapted[c]) for c in base}


@pytest.mark.parametrize("strategy", list(EXPECTED))
def test_each_preset_trains_exactly_its_components(strategy):
    model = apply_strategy(build_model("tiny"), TrainConfig(strategy=strategy, lora_rank=4, precision="fp32"))
    assert _what_trains(model) == EXPECTED[strategy]
    if strategy == "qlora":
        import bitsandbytes as bnb

        base = model.get_base_model()
        assert isinstance(base.model.layers[0].self_attn.qkv_proj.base_layer, bnb.nn.Linear4bit)
        assert not isinstance(base.lm_head.base_layer, bnb.nn.Linear4bit)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (dict(strategy="lora", vision="frozen"), {"vision": (0, 0), "projector": (0, 2), "language": (0, 9)}),
        (dict(strategy="lora", vision="frozen", projector="frozen", lora_targets=["qkv_proj"]),
         {"vision": (0, 0), "projector": (0, 0), "language": (0, 2)}),
        (dict(strategy="frozen_vision", projector="frozen"), {"vision": (0, 0), "projector": (0, 0),
                                                              "language": (15, 0)}),
        (dict(strategy="full", language="frozen"), {"vision": (37, 0), "projector": (6, 0), "language": (0, 0)}),
    ],
)  # fmt: skip
def test_per_component_settings_override_the_preset(settings, expected):
    model = apply_strategy(build_model("tiny"), TrainConfig(lora_rank=4, **settings))
    assert _what_trains(model) == expected


def test_quantize_base_is_a_setting_not_a_name():
    import bitsandbytes as bnb

    model = apply_strategy(build_model("tiny"), TrainConfig(strategy="lora", quantize_base=True, lora_rank=4))
    assert isinstance(model.get_base_model().model.layers[1].mlp.down_proj.base_layer, bnb.nn.Linear4bit)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(strategy="lora", vision="full"), "components mix lora and full training"),
        (dict(strategy="full", quantize_base=True), "4-bit weights cannot be trained"),
        (dict(strategy="frozen_vision", projector="frozen", language="frozen"), "nothing would train"),
        (dict(strategy="full", vision="thawed"), "vision='thawed': choose frozen, lora or full"),
    ],
)
def test_specs_that_cannot_train_are_refused(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        apply_strategy(build_model("tiny"), TrainConfig(**settings))
    with pytest.raises(ConfigError, match=message):
        TrainConfig(train_data=str(tmp_path), image_root=str(tmp_path), **settings).validate()


def test_frozen_vision_runs_the_tower_without_autograd():
    model = apply_strategy(build_model("tiny"), TrainConfig(strategy="frozen_vision"))
    seen = []
    tower = model.model.vision_embed_tokens.img_processor
    tower.register_forward_hook(lambda mod, args, out: seen.append(out.requires_grad))
    pixel_values = torch.randn(1, 2, 3, 56, 56)
    features = model.model.vision_embed_tokens(pixel_values, torch.tensor([[56, 56]]))
    assert seen == [False] and features.requires_grad  # the projector still trains
