import pytest
import torch

from phi3v import build_model
from phi3v.train.config import TrainConfig
from phi3v.train.strategy import STRATEGIES, apply_strategy, component, lora_target_regex, parameter_counts


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_trains_exactly_its_components(strategy):
    model = apply_strategy(build_model("tiny"), TrainConfig(strategy=strategy, lora_rank=4, precision="fp32"))
    spec = STRATEGIES[strategy]
    trains = {"vision": spec.vision, "projector": spec.projector, "language": spec.language, "adapters": True}
    for name, param in model.named_parameters():
        assert param.requires_grad == trains[component(name)], name
    counts = parameter_counts(model)
    assert (counts["adapters"]["total"] > 0) == spec.adapters
    if strategy == "qlora":
        import bitsandbytes as bnb

        base = model.get_base_model()
        assert isinstance(base.model.layers[0].self_attn.qkv_proj.base_layer, bnb.nn.Linear4bit)
        assert not isinstance(base.lm_head.base_layer, bnb.nn.Linear4bit)


def test_lora_targets_cover_language_vision_and_projector():
    model = apply_strategy(build_model("tiny"), TrainConfig(strategy="lora", lora_rank=4))
    adapted = {n.split(".lora_A")[0].removeprefix("base_model.model.") for n, _ in model.named_parameters()
               if ".lora_A" in n}  # fmt: skip
    assert "model.layers.0.self_attn.qkv_proj" in adapted and "lm_head" in adapted
    assert "model.vision_embed_tokens.img_projection.0" in adapted
    assert "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.1.mlp.fc2" in adapted
    no_vision = TrainConfig(strategy="lora", lora_vision=False, lora_targets=["qkv_proj"])
    assert "img_processor" not in lora_target_regex(no_vision) and "lm_head" not in lora_target_regex(no_vision)


def test_frozen_vision_runs_the_tower_without_autograd():
    model = apply_strategy(build_model("tiny"), TrainConfig(strategy="frozen_vision"))
    seen = []
    tower = model.model.vision_embed_tokens.img_processor
    tower.register_forward_hook(lambda mod, args, out: seen.append(out.requires_grad))
    pixel_values = torch.randn(1, 2, 3, 56, 56)
    features = model.model.vision_embed_tokens(pixel_values, torch.tensor([[56, 56]]))
    assert seen == [False] and features.requires_grad  # the projector still trains
