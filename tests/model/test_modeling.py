import pytest
import torch
import torch.nn.functional as F
from transformers import Phi3Config, Phi3ForCausalLM

from phi3v import Phi3VConfig, build_model, preset_config
from tests.conftest import image_batch, prompt_ids

GRIDS = [(1, 2), (2, 2)]


def _sample(model, image_id=-1):
    pixel_values, image_sizes = image_batch(model, GRIDS)
    ids = prompt_ids(model, [[1, 5, 6], GRIDS[0], [7, 8], GRIDS[1], [9, 10, 11, 12]], image_id=image_id)
    return ids[None], pixel_values, image_sizes


def _labels(ids, n_answer=3):
    labels = torch.full_like(ids, -100)
    labels[:, -n_answer:] = ids[:, -n_answer:]
    return labels


def test_forward_backward_reaches_every_parameter(tiny):
    tiny.train()
    ids, pixel_values, image_sizes = _sample(tiny)
    out = tiny(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, labels=_labels(ids))
    assert torch.isfinite(out.loss) and out.logits is None
    assert out.cache is None  # no KV cache is built for a training step
    out.loss.backward()
    no_grad = [n for n, p in tiny.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # Separators start at zero like the official init but still get gradients; only nothing may be left out.
    assert no_grad == []


def test_supervised_only_loss_equals_full_vocabulary_loss(tiny):
    ids, pixel_values, image_sizes = _sample(tiny)
    labels = _labels(ids, n_answer=4)
    loss = tiny(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, labels=labels).loss
    logits = tiny(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
    full = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(loss, full)
    summed = tiny(
        input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, labels=labels, num_items_in_batch=8
    ).loss
    torch.testing.assert_close(summed, full * 4 / 8)  # 4 supervised next-token targets


def test_negative_ids_and_image_token_id_are_equivalent_and_input_is_untouched(tiny):
    ids, pixel_values, image_sizes = _sample(tiny)
    dedicated, _, _ = _sample(tiny, image_id=tiny.config.image_token_id)
    kept = ids.clone()
    a = tiny(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
    b = tiny(input_ids=dedicated, pixel_values=pixel_values, image_sizes=image_sizes).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(ids, kept)


def test_placeholder_count_mismatch_raises_with_both_counts(tiny):
    ids, pixel_values, image_sizes = _sample(tiny)
    n = int((ids < 0).sum())
    one_short = torch.cat([ids[:, :3], ids[:, 4:]], dim=1)  # position 3 is the first placeholder
    with pytest.raises(ValueError, match=rf"hold {n - 1} image-token positions but the 2 image\(s\) give {n} image"):
        tiny(input_ids=one_short, pixel_values=pixel_values, image_sizes=image_sizes)
    with pytest.raises(ValueError, match=r"hold \d+ image-token positions but no pixel_values"):
        tiny(input_ids=ids)
    with pytest.raises(ValueError, match=r"pixel_values has shape \(5, 3, 56, 56\); expected \[images, num_crops"):
        tiny(input_ids=ids, pixel_values=pixel_values[0], image_sizes=image_sizes)


def test_padded_crop_slots_do_not_change_the_output(tiny):
    ids, pixel_values, image_sizes = _sample(tiny)
    base = tiny(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
    wider, _ = image_batch(tiny, GRIDS, num_crops=16)
    more = tiny(input_ids=ids, pixel_values=wider, image_sizes=image_sizes).logits
    torch.testing.assert_close(more, base)


@pytest.mark.parametrize("start", [0, 5000], ids=["short-rope", "long-rope"])
def test_text_only_logits_equal_transformers_phi3(tiny, start):
    """Same weights in transformers' Phi3ForCausalLM give the same logits, before and past the rope switch."""
    config = tiny.config
    reference_config = Phi3Config(
        **{
            k: getattr(config, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "max_position_embeddings",
                "original_max_position_embeddings",
                "rms_norm_eps",
                "pad_token_id",
                "bos_token_id",
                "eos_token_id",
                "sliding_window",
            )
        },
        rope_parameters=dict(config.rope_parameters),
    )
    reference = Phi3ForCausalLM(reference_config).eval()
    state = {k: v for k, v in tiny.state_dict().items() if "vision_embed_tokens" not in k}
    reference.load_state_dict(state, strict=True)
    ids = torch.randint(3, 400, (2, 37), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(start, start + 37)[None].expand(2, -1)
    torch.testing.assert_close(
        tiny(input_ids=ids, position_ids=positions).logits, reference(input_ids=ids, position_ids=positions).logits
    )


def test_generation_across_the_rope_switch_matches_uncached():
    """Crossing original_max_position_embeddings drops the short-rope cache and re-runs the prompt with images."""
    model = _switch_model()
    ids, pixel_values, image_sizes = _sample(model)
    assert ids.shape[1] < 60 < ids.shape[1] + 12
    kwargs = dict(
        input_ids=ids,
        pixel_values=pixel_values,
        image_sizes=image_sizes,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    cached, uncached = model.generate(**kwargs, use_cache=True), model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    # Logits, not just tokens: a stale short-rope cache shifts them by ~4e-3 here without flipping the argmax.
    for step, (a, b) in enumerate(zip(cached.logits, uncached.logits, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"step {step}")


def _switch_model():
    data = preset_config("tiny").to_official_dict()
    data.update(original_max_position_embeddings=60, max_position_embeddings=1920)
    return build_model(Phi3VConfig.from_official_dict(data))


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_cache_reset_finds_the_cache_under_either_name(name):
    """transformers 5.24 renamed past_key_values to cache; the reset must see it under the release's name."""
    model = _switch_model()
    ids, pixel_values, image_sizes = _sample(model)
    cache = model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, use_cache=True).cache
    assert 0 < cache.get_seq_length() <= 60
    longer = torch.cat([ids, torch.full((1, 61 - ids.shape[1]), 7)], dim=1)
    inputs = model.prepare_inputs_for_generation(longer, **{name: cache}, use_cache=True, pixel_values=pixel_values)
    assert inputs.get("cache") is None and inputs.get("past_key_values") is None
    assert inputs["input_ids"].shape[1] == 61  # the whole sequence is re-run ...
    assert inputs["pixel_values"] is pixel_values  # ... with its images


def test_a_missed_cache_reset_raises_instead_of_giving_other_tokens(monkeypatch):
    """If a transformers release hands the cache over where the override cannot see it, generation must stop with
    an error rather than extend a short-rope cache past the switch (about 4 logits off at full size)."""
    from transformers import GenerationMixin

    from phi3v.model.modeling import Phi3VForCausalLM

    model = _switch_model()
    ids, pixel_values, image_sizes = _sample(model)
    monkeypatch.setattr(
        Phi3VForCausalLM, "prepare_inputs_for_generation", GenerationMixin.prepare_inputs_for_generation
    )
    with pytest.raises(RuntimeError, match="past the rope switch at 60"):
        model.generate(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=12,
                       do_sample=False, eos_token_id=None, pad_token_id=model.config.pad_token_id)  # fmt: skip
    # A cache that already holds long-rope positions (a prompt past the switch) may grow: nothing to re-run.
    monkeypatch.undo()
    long_prompt = torch.cat([ids, torch.full((1, 70 - ids.shape[1]), 7)], dim=1)
    out = model.generate(input_ids=long_prompt, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=3,
                         do_sample=False, eos_token_id=None, pad_token_id=model.config.pad_token_id)  # fmt: skip
    assert out.shape[1] == 73


def test_sdpa_equals_eager_with_padding():
    sdpa, eager = build_model("tiny", attn_implementation="sdpa"), build_model("tiny", attn_implementation="eager")
    ids, pixel_values, image_sizes = _sample(sdpa)
    padded = torch.cat([torch.full((1, 5), sdpa.config.pad_token_id), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(ids)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=padded, attention_mask=mask, position_ids=positions, pixel_values=pixel_values,
                  image_sizes=image_sizes)  # fmt: skip
    want = eager(**inputs).logits[:, 5:]
    torch.testing.assert_close(sdpa(**inputs).logits[:, 5:], want)
    torch.testing.assert_close(sdpa(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits, want)
    clip_attention = sdpa.model.vision_embed_tokens.img_processor.vision_model.encoder.layers[0].self_attn
    assert clip_attention.config._attn_implementation == "sdpa"


def test_su_rope_matches_the_spec_formula():
    """cos/sin from spec §2.5 written out: inv_freq_i = 1 / (factor_i * theta^(2i/d)), both scaled by
    sqrt(1 + ln(max/orig) / ln(orig)), short factors up to `orig` positions, long factors past it. A small `orig`
    keeps the angles small enough for a float64 reference to be exact."""
    import math

    data = preset_config("tiny").to_official_dict()
    data.update(original_max_position_embeddings=16, max_position_embeddings=512)
    config = Phi3VConfig.from_official_dict(data)
    rope = build_model(config).model.rotary_emb
    d = config.hidden_size // config.num_attention_heads
    scale = math.sqrt(1 + math.log(512 / 16) / math.log(16))
    x = torch.zeros(1, 1, d)
    for positions, factors in [(torch.arange(0, 16), "short_factor"), (torch.arange(0, 17), "long_factor")]:
        factor = torch.tensor(config.rope_parameters[factors], dtype=torch.float64)
        inv_freq = 1 / (factor * 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles = positions[:, None].double() * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = rope(x, positions[None])
        torch.testing.assert_close(cos[0].double(), angles.cos() * scale, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sin[0].double(), angles.sin() * scale, rtol=1e-6, atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointed in (False, True):
        model = build_model("tiny").train()
        if checkpointed:
            model.enable_activation_checkpointing()
            clip_layers = model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers
            assert all(layer.gradient_checkpointing for layer in [*model.model.layers, *clip_layers])
        ids, pixel_values, image_sizes = _sample(model)
        model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, labels=_labels(ids)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_backward(dtype):
    model = build_model("tiny", dtype=dtype).train()
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    ids, pixel_values, image_sizes = _sample(model)
    out = model(input_ids=ids, pixel_values=pixel_values.to(dtype), image_sizes=image_sizes, labels=_labels(ids))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.lm_head.weight.grad.dtype == dtype


def test_greedy_generation_is_the_same_with_and_without_cache(tiny):
    ids, pixel_values, image_sizes = _sample(tiny)
    kwargs = dict(
        input_ids=ids,
        pixel_values=pixel_values,
        image_sizes=image_sizes,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tiny.config.pad_token_id,
    )
    cached = tiny.generate(**kwargs, use_cache=True)
    uncached = tiny.generate(**kwargs, use_cache=False)
    assert cached.shape[1] == ids.shape[1] + 12
    assert torch.equal(cached, uncached)


def test_batched_left_padded_generation_equals_one_by_one(tiny):
    pad = tiny.config.pad_token_id
    first_grids, second_grids = [(1, 1)], [(2, 1), (1, 2)]
    prompts = [
        (prompt_ids(tiny, [[1, 20, 21], first_grids[0], [30, 31, 32, 33, 34, 35]]), first_grids, 0),
        (prompt_ids(tiny, [[1, 40], second_grids[0], [41], second_grids[1], [42, 43]]), second_grids, 1),
    ]
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=pad, output_logits=True,
                  return_dict_in_generate=True)  # fmt: skip
    singles, single_logits, pixels, sizes = [], [], [], []
    for ids, grids, seed in prompts:
        pixel_values, image_sizes = image_batch(tiny, grids, seed=seed)
        pixels.append(pixel_values)
        sizes.append(image_sizes)
        out = tiny.generate(input_ids=ids[None], pixel_values=pixel_values, image_sizes=image_sizes, **kwargs)
        singles.append(out.sequences[0, len(ids) :])
        single_logits.append(torch.cat(out.logits))
    width = max(len(ids) for ids, _, _ in prompts)
    batch = torch.full((2, width), pad)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, (ids, _, _) in enumerate(prompts):
        batch[row, width - len(ids) :] = ids
        mask[row, width - len(ids) :] = 1
    out = tiny.generate(
        input_ids=batch, attention_mask=mask, pixel_values=torch.cat(pixels), image_sizes=torch.cat(sizes), **kwargs
    )
    for row in range(2):
        assert torch.equal(out.sequences[row, width:], singles[row])
        # logits too: wrong position ids under left padding would shift them without changing the argmax
        torch.testing.assert_close(torch.stack([step[row] for step in out.logits]), single_logits[row])


def test_selective_checkpointing_marks_every_other_layer_and_keeps_gradients():
    grads = []
    for every in (None, 2):
        model = build_model("tiny").train()
        if every:
            model.enable_activation_checkpointing(every_n_layers=every)
            clip_layers = model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers
            flags = [layer.gradient_checkpointing for layer in [*clip_layers, *model.model.layers]]
            assert flags.count(True) == 2 and flags.count(False) == 2
        ids, pixel_values, image_sizes = _sample(model)
        model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, labels=_labels(ids)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
