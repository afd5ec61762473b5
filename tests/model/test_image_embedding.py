"""The image side against an independent, loop-based reading of spec §2.2-2.4."""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from phi3v import num_image_tokens
from tests.conftest import image_batch


@pytest.mark.parametrize(
    ("h", "w", "g", "expected"),
    [(1, 1, 12, 313), (2, 2, 12, 757), (4, 4, 12, 2509), (16, 1, 12, 2653), (4, 1, 12, 781), (3, 4, 12, 1921)],
)
def test_token_formula_matches_spec_examples(h, w, g, expected):
    assert num_image_tokens(h, w, g) == expected


def test_clip_trunk_is_layer_minus_2_without_cls(tiny):
    """Our cut tower equals a stock 3-layer CLIP's hidden_states[-2] with CLS dropped."""
    vision_cfg = CLIPVisionConfig(**tiny.config.vision_config.to_dict())
    stock = CLIPVisionModel(vision_cfg).eval()
    trunk = tiny.model.vision_embed_tokens.img_processor.vision_model
    missing, unexpected = stock.load_state_dict(trunk.state_dict(), strict=False)
    assert set(unexpected) == set()
    assert all(k.startswith(("encoder.layers.2.", "post_layernorm.")) for k in missing)
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        want = stock(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = trunk(pixels)
    torch.testing.assert_close(got, want)


def _reference_tokens(embedding, pixel_values, image_sizes):
    """Spec §2.4 written as loops: one token at a time, in the order the official code emits them."""
    s, g = embedding.crop_size, embedding.grid
    sub_gn, glb_gn = embedding.sub_GN.reshape(-1), embedding.glb_GN.reshape(-1)

    def merged(crop):  # [3, S, S] -> callable (y, x) -> [4D]
        patches = embedding.img_processor(crop[None])[0]  # [P*P, D]
        p = 2 * g

        def token(y, x):
            return torch.cat([patches[(2 * y + dy) * p + (2 * x + dx)] for dy in (0, 1) for dx in (0, 1)])

        return token

    tokens = []
    for image, (height, width) in zip(pixel_values, image_sizes.tolist(), strict=True):
        h, w = height // s, width // s
        crops = [merged(image[1 + i]) for i in range(h * w)]
        for row in range(h * g):
            for col in range(w * g):
                tokens.append(crops[(row // g) * w + col // g](row % g, col % g))
            tokens.append(sub_gn)
        tokens.append(glb_gn)
        global_view = merged(image[0])
        for row in range(g):
            for col in range(g):
                tokens.append(global_view(row, col))
            tokens.append(sub_gn)
    return torch.stack(tokens)


def test_hd_merge_and_separators_follow_the_spec(tiny):
    embedding = tiny.model.vision_embed_tokens
    with torch.no_grad():  # distinct separators so a misplaced one shows
        embedding.sub_GN.normal_()
        embedding.glb_GN.normal_()
    pixel_values, image_sizes = image_batch(tiny, [(1, 2), (2, 1), (2, 2)], num_crops=4)
    with torch.no_grad():
        got = embedding.hd_tokens(pixel_values, image_sizes)
        want = _reference_tokens(embedding, pixel_values, image_sizes)
    assert got.shape == (sum(num_image_tokens(h, w, 2) for h, w in [(1, 2), (2, 1), (2, 2)]), 128)
    torch.testing.assert_close(got, want)


def test_padding_slots_are_never_read(tiny):
    embedding = tiny.model.vision_embed_tokens
    pixel_values, image_sizes = image_batch(tiny, [(1, 1), (1, 2)], num_crops=4)
    seen = []
    embedding.img_processor.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        before = embedding(pixel_values, image_sizes)
        pixel_values[0, 2:] = float("nan")  # padding of image 0
        pixel_values[1, 3:] = float("nan")  # padding of image 1
        after = embedding(pixel_values, image_sizes)
    assert seen == [2 + 3, 2 + 3]
    torch.testing.assert_close(after, before)


def test_bad_image_sizes_raise(tiny):
    embedding = tiny.model.vision_embed_tokens
    pixel_values, _ = image_batch(tiny, [(1, 1)], num_crops=1)
    with pytest.raises(ValueError, match=r"needing 5 crop slots, but pixel_values has 2"):
        embedding(pixel_values, torch.tensor([[112, 112]]))
    with pytest.raises(ValueError, match="not a positive multiple of the crop size 56"):
        embedding(pixel_values, torch.tensor([[50, 56]]))
