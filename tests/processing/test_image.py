"""The HD transform on real photos (scikit-image, scikit-learn) and extreme shapes, against values computed here
independently: the grid rule, the token formula and the padding offsets of spec §3.1."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from phi3v.processing.image import (
    CLIP_MEAN,
    CLIP_STD,
    ImageError,
    Phi3VImageProcessor,
    load_image,
    num_image_tokens_for_size,
)


def _photos():
    import skimage.data
    from sklearn.datasets import load_digits

    photos = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "camera", "page")}
    photos["digit"] = (load_digits().images[0] * 16).astype(np.uint8)  # 8x8, values 0..255
    return {name: Image.fromarray(array) for name, array in photos.items()}


PHOTOS = _photos()


def expected_grid(width, height, num_crops):
    """Spec §3.1 steps 2-5, by scanning every scale instead of the official while loop."""
    portrait = width < height
    long, short = (height, width) if portrait else (width, height)
    ratio = long / short
    scale = max(s for s in range(1, num_crops + 1) if s * math.ceil(s / ratio) <= num_crops)
    new_long = scale * 336
    new_short = max(1, int(new_long / ratio))
    rows = math.ceil(new_short / 336)
    top = int((rows * 336 - new_short) / 2)
    grid = (scale, rows) if portrait else (rows, scale)
    return grid, new_long, new_short, top


def expected_tokens(h, w):
    return (h * w + 1) * 144 + 1 + (h + 1) * 12


def reassemble(pixel_values, h, w):
    """Crop slots 1..h*w back into the [3, h*336, w*336] HD image."""
    crops = pixel_values[1 : 1 + h * w].reshape(h, w, 3, 336, 336)
    return crops.permute(2, 0, 3, 1, 4).reshape(3, h * 336, w * 336)


def normalise(rgb_uint8):
    pixels = torch.from_numpy(np.asarray(rgb_uint8, dtype=np.float32) / 255).permute(2, 0, 1)
    return (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


@pytest.mark.parametrize("num_crops", [4, 16])
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_real_photos(name, num_crops):
    image = PHOTOS[name]
    processor = Phi3VImageProcessor(num_crops=num_crops)
    out = processor([image])
    (h, w), new_long, new_short, top = expected_grid(*image.size, num_crops)
    assert out["pixel_values"].shape == (1, num_crops + 1, 3, 336, 336)
    assert out["image_sizes"].tolist() == [[h * 336, w * 336]]
    assert out["num_img_tokens"] == [expected_tokens(h, w)]
    assert processor.num_image_tokens(*image.size) == expected_tokens(h, w)

    pixel_values = out["pixel_values"][0]
    hd = reassemble(pixel_values, h, w)
    rgb = image.convert("RGB")
    portrait = image.width < image.height
    if portrait:
        rgb = rgb.transpose(Image.Transpose.TRANSPOSE)
        hd = hd.transpose(1, 2)  # back to the landscape frame: [3, rows*336, scale*336]
    resized = normalise(rgb.resize((new_long, new_short), Image.Resampling.BILINEAR))
    white = normalise(np.full((1, 1, 3), 255, np.uint8))
    torch.testing.assert_close(hd[:, top : top + new_short], resized)
    assert torch.allclose(hd[:, :top], white.expand(3, top, hd.shape[2]))
    assert torch.allclose(hd[:, top + new_short :], white.expand(3, hd.shape[1] - top - new_short, hd.shape[2]))

    hd_upright = hd.transpose(1, 2) if portrait else hd
    global_view = F.interpolate(hd_upright[None], size=(336, 336), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(pixel_values[0], global_view)
    assert not pixel_values[1 + h * w :].any()


@pytest.mark.parametrize("size", [(1, 1), (20000, 10), (10, 20000), (3, 1000), (1000, 3), (336, 337), (5000, 2)])
@pytest.mark.parametrize("num_crops", [1, 4, 16])
def test_extreme_sizes(size, num_crops):
    processor = Phi3VImageProcessor(num_crops=num_crops)
    (h, w), *_ = expected_grid(*size, num_crops)
    assert processor.num_image_tokens(*size) == expected_tokens(h, w)
    assert h * w <= num_crops
    out = processor([Image.new("RGB", size, (0, 128, 255))])
    assert out["image_sizes"].tolist() == [[h * 336, w * 336]]
    assert out["num_img_tokens"] == [expected_tokens(h, w)]
    assert torch.isfinite(out["pixel_values"]).all()


def test_spec_token_examples():
    assert num_image_tokens_for_size(336, 336, 1) == 313
    assert num_image_tokens_for_size(672, 672, 4) == 757
    assert num_image_tokens_for_size(1344, 1008, 16) == 1921  # h=1008, w=1344: a 3x4 grid
    assert num_image_tokens_for_size(10, 2000, 16) == 2653  # a tall strip: 16x1, the most for num_crops=16
    assert num_image_tokens_for_size(10, 2000, 4) == 781


def test_grayscale_rgba_and_palette_become_rgb_like_the_official_processor():
    """The pinned transformers' convert_to_rgb is a plain convert("RGB"): alpha is dropped, not composited."""
    processor = Phi3VImageProcessor(num_crops=1)
    gray = PHOTOS["camera"]
    assert gray.mode == "L"
    torch.testing.assert_close(processor([gray])["pixel_values"], processor([gray.convert("RGB")])["pixel_values"])
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red stays red
    torch.testing.assert_close(
        processor([rgba])["pixel_values"], processor([Image.new("RGB", (40, 40), (255, 0, 0))])["pixel_values"]
    )
    palette = Image.new("P", (30, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    palette.info["transparency"] = 1
    expected = Image.new("RGB", (30, 20), (10, 200, 30))
    torch.testing.assert_close(processor([palette])["pixel_values"], processor([expected])["pixel_values"])


def test_load_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    loaded = load_image(path)
    assert loaded.size == (20, 60) and loaded.mode == "RGB"
    assert load_image(path, exif_transpose=False).size == (60, 20)  # as the reference recipe opens it


def test_unreadable_files_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:2000])
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    for path in (truncated, not_an_image, tmp_path / "missing.png"):
        with pytest.raises(ImageError, match=path.name):
            load_image(path)


def test_tiny_crop_size():
    processor = Phi3VImageProcessor(num_crops=4, crop_size=56)
    out = processor([PHOTOS["digit"]])
    assert out["pixel_values"].shape == (1, 5, 3, 56, 56)
    assert out["image_sizes"].tolist() == [[112, 112]]
    assert out["num_img_tokens"] == [(4 + 1) * 4 + 1 + 3 * 2]


def test_uint8_crops_finished_on_the_device_equal_the_float_path():
    """Workers ship uint8 crops; ``finish`` (normalise, global view from the reassembled image, empty slots zero)
    gives the float pipeline's pixel_values: the same float operations on the same values."""
    processor = Phi3VImageProcessor(num_crops=6)
    images = [PHOTOS["astronaut"], PHOTOS["page"], PHOTOS["digit"], PHOTOS["coffee"].rotate(90, expand=True)]
    plain = processor(images)
    shipped = processor(images, uint8=True)
    assert shipped["pixel_values"].dtype == torch.uint8
    assert (shipped["pixel_values"][:, 0] == 0).all()  # the global view is made on the device
    assert torch.equal(shipped["image_sizes"], plain["image_sizes"])
    finished = processor.finish(shipped["pixel_values"], shipped["image_sizes"])
    assert finished.dtype == torch.float32 and finished.shape == plain["pixel_values"].shape
    assert (finished - plain["pixel_values"]).abs().max() <= 1e-6
    assert shipped["pixel_values"].element_size() * 4 == plain["pixel_values"].element_size()


def test_sixteen_bit_files_are_scaled_not_turned_white(tmp_path):
    """A 16-bit greyscale PNG (mode I;16): a plain convert("RGB") clips every value above 255 to white."""
    from phi3v.processing.image import load_image

    levels = np.array([[0, 257 * 100, 32896, 65535]], dtype=np.uint16)  # 8-bit 0, 100, 128 (32896*255/65535), 255
    Image.fromarray(levels).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode == "I;16" and raw.convert("RGB").getpixel((1, 0)) == (255, 255, 255)  # the finding
    image = load_image(tmp_path / "deep.png")
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(4)] == [(v, v, v) for v in (0, 100, 128, 255)]
