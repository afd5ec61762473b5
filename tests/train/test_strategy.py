import math

import pytest
import torch

from phi3v import build_model
from phi3v.train.config import ConfigError, TrainConfig
from phi3v.train.loop import make_optimizer
from phi3v.train.strategy import apply_strategy, component, quantization_config
from tests.conftest import image_batch, prompt_ids

# On the tiny model: 37 CLIP tensors, 6 projector tensors (2 linear layers + 2 separators), 15 language tensors;
# LoRA adapts 2 CLIP layers x 6 projections, the projector's 2 linear layers, 2 decoder layers x 4 + lm_head.
# Per component: (trainable base tensors, adapted modules), written out by hand.
EXPECTED = {
    "full": {"vision": (37, 0), "projector": (6, 0), "language": (15, 0)},
    "frozen_vision": {"vision": (0, 0), "projector": (6, 0), "language": (15, 0)},
    "lora": {"vision": (0, 12), "projector": (0, 2), "language": (0, 9)},
    "qlora": {"vision": (0, 12), "projector": (0, 2), "language": (0, 9)},
}


def _base(config: TrainConfig):
    """The tiny model as the training loop reads it for ``config``: 4-bit through ``from_pretrained`` when the spec
    quantises the base, the full-precision random model otherwise."""
    return build_model("tiny", quantization_config=quantization_config(config))


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
    config = TrainConfig(strategy=strategy, lora_rank=4, precision="fp32")
    model = apply_strategy(_base(config), config)
    assert _what_trains(model) == EXPECTED[strategy]


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

    config = TrainConfig(strategy="lora", quantize_base=True, lora_rank=4)
    model = apply_strategy(_base(config), config)
    assert isinstance(model.get_base_model().model.layers[1].mlp.down_proj.base_layer, bnb.nn.Linear4bit)


def test_a_full_precision_base_is_refused_where_the_spec_quantises():
    """Quantising in place would hold the full-precision model first; the base must be read 4-bit."""
    with pytest.raises(ValueError, match="strategy 'qlora' quantises the base, but the model was not loaded 4-bit"):
        apply_strategy(build_model("tiny"), TrainConfig(strategy="qlora", lora_rank=4))


# The tiny model's linear layers, by hand: 2 decoder layers x (qkv, o, gate_up, down), 2 CLIP layers x (q, k, v, out,
# fc1, fc2), the projector's 2. All are 4-bit, as in the reference recipe; only lm_head keeps its float weights.
LINEAR_4BIT = {
    *(f"model.layers.{i}.{m}" for i in range(2)
      for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")),
    *(f"model.vision_embed_tokens.img_processor.vision_model.encoder.layers.{i}.{m}" for i in range(2)
      for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                "mlp.fc2")),
    "model.vision_embed_tokens.img_projection.0",
    "model.vision_embed_tokens.img_projection.2",
}  # fmt: skip


def test_qlora_reads_the_base_nf4_double_quantised_and_trains_only_the_adapters():
    """The QLoRA path on the CPU (bitsandbytes' CPU backend): the seeded tiny weights go through from_pretrained
    with the BitsAndBytesConfig, then prepare_model_for_kbit_training, then LoRA; a few steps on one batch."""
    import bitsandbytes as bnb

    config = TrainConfig(strategy="qlora", precision="fp32", lora_rank=8, lora_alpha=16, lr=2e-3, warmup_steps=0)
    reference = build_model("tiny")  # the same seeded weights, never quantised
    model = apply_strategy(_base(config), config).train()
    base = model.get_base_model()

    quantised = {name: module for name, module in base.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert set(quantised) == {f"{name}.base_layer" for name in LINEAR_4BIT}
    for name, module in quantised.items():
        state = module.weight.quant_state
        assert (state.quant_type, state.nested, module.weight.dtype) == ("nf4", True, torch.uint8), name
        # NF4 rounds to the nearest of 16 levels scaled by a block's absmax; the widest gap between levels is
        # 1.0 - 0.6962, so no weight moves by more than 0.152 x the tensor's largest |w| (0.16: the double-quantised
        # block scales add a little). Equal weights would mean nothing was quantised.
        want = reference.get_submodule(name.removesuffix(".base_layer")).weight.detach()
        got = bnb.functional.dequantize_4bit(module.weight.data, state).float()
        assert 0 < (got - want).abs().max() <= 0.16 * want.abs().max(), name
    head = base.lm_head.base_layer
    assert type(head) is torch.nn.Linear and torch.equal(head.weight, reference.lm_head.weight)

    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(trainable) == 2 * (len(LINEAR_4BIT) + 1)  # + lm_head's adapter

    optimizer, _ = make_optimizer(model, config)
    pixel_values, image_sizes = image_batch(base, [(1, 2), (2, 1)])
    ids = prompt_ids(base, [[1, 5, 6], (1, 2), [7, 8], (2, 1), [9, 10, 11, 12, 13, 14]])[None]
    labels = torch.full_like(ids, -100)
    labels[:, -5:] = ids[:, -5:]
    packed = {name: module.weight.detach().clone() for name, module in quantised.items()}
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[0] > 1.0, losses  # about ln(512) = 6.2 at the start
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(module.weight, packed[name]) for name, module in quantised.items())


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
