"""The HD image transform of Phi-3-V, step for step as the official processor does it (spec §3.1).

Notation:
    C   num_crops, the most sub-image crops per image [4 or 16]
    S   crop side in pixels [336]
    h,w crop grid of one image, h * w <= C

For one image the official processor:

1. converts to RGB (a plain conversion: alpha is dropped, not composited);
2. transposes portraits so that the long side is horizontal;
3. picks ``scale`` = the largest integer with ``scale * ceil(scale / ratio) <= C`` (``ratio = w / h >= 1``);
4. resizes (bilinear, antialiased: PIL's resize) to width ``scale * S`` and height ``int(width / ratio)``,
   up-scaling small images too;
5. pads the height with white up to a multiple of S, ``int(diff / 2)`` rows on top and the rest below;
6. transposes back;
7. scales to [0, 1] and normalises with CLIP's mean and std;
8. makes the global view: bicubic resize of the normalised, padded image to S x S (no antialias, no clamp);
9. cuts the S x S crops in row-major order;
10. stacks ``[global, crop_0, ...]`` and zero-pads to ``C + 1`` slots.

Only PIL and torch are used. Where the official code would fail (an image so flat that step 4 gives a height of 0
pixels), the height is taken as 1 pixel instead.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import BaseImageProcessor, BatchFeature

from phi3v.utils import OFFICIAL_REPO

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WHITE = (255, 255, 255)


class ImageError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


def load_image(path: str | os.PathLike, exif_transpose: bool = True) -> Image.Image:
    """Open an image file fully and convert it to RGB.

    Args:
        path: The file.
        exif_transpose: Apply the EXIF orientation, so a photo is seen the way a viewer shows it. The reference
            recipe opens files without it; pass ``False`` to match it exactly for rotated photos.

    Raises:
        ImageError: for a missing, truncated or non-image file, naming it.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later in a worker
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return to_rgb(_sixteen_to_eight_bits(image))
    except FileNotFoundError as err:
        raise ImageError(f"{path}: image file not found") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"{path}: cannot read image ({err})") from err


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _sixteen_to_eight_bits(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (``I;16``, e.g. a 16-bit PNG) scaled to 8 bits: ``round(v * 255 / 65535)``.

    The official processor's ``convert("RGB")`` clips such values at 255, so almost every pixel turns white; the
    model was trained on 8-bit RGB, so a file's full 16-bit range is mapped onto 0..255 first.
    """
    if image.mode not in _SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image).astype(np.uint32)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))  # mode "L"


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB, as the official processor converts it (transformers' ``convert_to_rgb`` of the pinned
    versions: a plain ``convert("RGB")``, so transparent pixels keep their colour and the alpha is dropped)."""
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class HDGeometry:
    """Where an image of a given size lands in the HD transform.

    Attributes:
        transposed: Whether the image is portrait and was transposed.
        resized: ``(width, height)`` after the resize, in the landscape frame.
        padded_height: Height after padding, in the landscape frame (multiple of S).
        top: White rows added above, in the landscape frame.
        grid: ``(h, w)`` crop grid of the final, upright image.
    """

    transposed: bool
    resized: tuple[int, int]
    padded_height: int
    top: int
    grid: tuple[int, int]


def hd_geometry(width: int, height: int, num_crops: int, crop_size: int = 336) -> HDGeometry:
    """The HD transform's sizes for an image, computed from its size alone (no pixels touched)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} has no pixels")
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * crop_size)
    new_h = max(1, int(new_w / ratio))
    padded = math.ceil(new_h / crop_size) * crop_size
    top = int((padded - new_h) / 2)
    rows, cols = padded // crop_size, new_w // crop_size
    grid = (cols, rows) if transposed else (rows, cols)
    return HDGeometry(transposed, (new_w, new_h), padded, top, grid)


def num_image_tokens_for_size(width: int, height: int, num_crops: int, crop_size: int = 336, g: int = 12) -> int:
    """Image tokens the model will produce for an image of this size (spec §2.4), without touching pixels."""
    h, w = hd_geometry(width, height, num_crops, crop_size).grid
    return (h * w + 1) * g * g + 1 + (h + 1) * g


class Phi3VImageProcessor(BaseImageProcessor):
    """The official Phi-3-V image processor: HD crops, global view, zero-padded crop slots.

    A transformers ``BaseImageProcessor``: ``image_processor(images, return_tensors="pt")`` gives a
    ``BatchFeature``, ``AutoImageProcessor`` loads it from ``preprocessor_config.json`` once phi3v is imported.

    Args:
        num_crops: Most sub-image crops per image (official default 4; 16 for single-image documents).
        crop_size: Crop side in pixels (336 for the official models; the tiny preset uses 56).
        image_mean: Per-channel normalisation mean.
        image_std: Per-channel normalisation std.
        **kwargs: Other keys of ``preprocessor_config.json`` (kept and written back unchanged).
    """

    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(
        self,
        num_crops: int = 4,
        crop_size: int = 336,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        **kwargs: Any,
    ):
        for key in ("num_crops", "crop_size"):
            value = locals()[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{key} must be an integer, got {value!r}")
        if num_crops < 1:
            raise ValueError(f"num_crops must be at least 1, got {num_crops}")
        if crop_size % 28:
            raise ValueError(f"crop_size {crop_size} must be a multiple of 28 (14-pixel patches merged 2x2)")
        # Keys we derive or write ourselves; anything else is kept for the round trip.
        for key in ("image_processor_type", "processor_class", "auto_map", "num_img_tokens", "do_convert_rgb"):
            kwargs.pop(key, None)
        super().__init__()
        self.extra = kwargs
        self.num_crops = num_crops
        self.crop_size = crop_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)

    @property
    def merged_grid(self) -> int:
        """Merged tokens per crop side (12 for 336-pixel crops of 14-pixel patches)."""
        return self.crop_size // 28

    def geometry(self, width: int, height: int) -> HDGeometry:
        """``hd_geometry`` with this processor's settings."""
        return hd_geometry(width, height, self.num_crops, self.crop_size)

    def num_image_tokens(self, width: int, height: int) -> int:
        """Image-token count of an image of this size."""
        return num_image_tokens_for_size(width, height, self.num_crops, self.crop_size, self.merged_grid)

    def hd_image(self, image: Image.Image) -> torch.Tensor:
        """Steps 1-7: the normalised, padded HD image ``[3, h*S, w*S]`` (float32)."""
        return self.normalize(self.hd_pixels(image))

    def hd_pixels(self, image: Image.Image) -> torch.Tensor:
        """Steps 1-6: the resized, white-padded HD image ``[3, h*S, w*S]`` as uint8 (no rounding: PIL's output)."""
        image = to_rgb(image)
        geo = self.geometry(*image.size)
        if geo.transposed:
            image = image.transpose(Image.Transpose.TRANSPOSE)
        image = image.resize(geo.resized, Image.Resampling.BILINEAR)
        new_w, _new_h = geo.resized
        canvas = Image.new("RGB", (new_w, geo.padded_height), WHITE)
        canvas.paste(image, (0, geo.top))
        if geo.transposed:
            canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
        return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)  # [3, H, W] uint8

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Step 7: uint8 ``[..., 3, H, W]`` -> float32 ``(x / 255 - mean) / std``, on the tensor's device."""
        mean = torch.tensor(self.image_mean, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.image_std, device=pixels.device).view(3, 1, 1)
        return (pixels.float().div_(255) - mean) / std

    def crops(self, hd: torch.Tensor) -> torch.Tensor:
        """Steps 8-10: ``[3, h*S, w*S]`` -> ``[C+1, 3, S, S]`` (global view, row-major crops, zero slots)."""
        slots = self.tile_slots(hd)
        slots[0] = self._global_view(hd)
        return slots

    def tile_slots(self, hd: torch.Tensor) -> torch.Tensor:
        """Steps 9-10: ``[3, h*S, w*S]`` -> ``[C+1, 3, S, S]`` of ``hd``'s dtype: row-major crops from slot 1,
        zeros elsewhere, slot 0 (the global view) left empty.

        On uint8 pixels this is what data-loader workers ship: a quarter of the float32 size; ``finish`` makes
        the model input from it on the training device.
        """
        s = self.crop_size
        _, height, width = hd.shape
        h, w = height // s, width // s
        if h * w > self.num_crops:
            raise ValueError(f"a {h}x{w} crop grid exceeds num_crops={self.num_crops}")
        slots = hd.new_zeros(self.num_crops + 1, 3, s, s)
        slots[1 : 1 + h * w] = hd.reshape(3, h, s, w, s).permute(1, 3, 0, 2, 4).reshape(h * w, 3, s, s)
        return slots

    def _global_view(self, hd: torch.Tensor) -> torch.Tensor:
        """Step 8: the whole HD image ``[3, H, W]`` resized to one ``[3, S, S]`` crop (bicubic, as the official)."""
        s = self.crop_size
        return F.interpolate(hd[None], size=(s, s), mode="bicubic", align_corners=False)[0]

    def finish(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """uint8 slots from ``tile_slots`` -> the float32 ``pixel_values`` of ``crops``, on their device.

        Normalises the crops, puts each HD image back together from them for the bicubic global view (the same
        float arithmetic as ``crops``), and zeroes the empty slots.

        Args:
            pixel_values: ``[n, C+1, 3, S, S]`` uint8.
            image_sizes: ``[n, 2]`` padded HD (height, width).
        """
        s = self.crop_size
        out = self.normalize(pixel_values)
        for i, (height, width) in enumerate(image_sizes.tolist()):
            h, w = height // s, width // s
            hd = out[i, 1 : 1 + h * w].reshape(h, w, 3, s, s).permute(2, 0, 3, 1, 4).reshape(3, h * s, w * s)
            out[i, 0] = self._global_view(hd)
            out[i, 1 + h * w :] = 0
        return out

    def __call__(
        self,
        images: Image.Image | Sequence[Image.Image] | Sequence[Sequence[Image.Image]],
        uint8: bool = False,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Process images (``preprocess``)."""
        return self.preprocess(images, uint8=uint8, return_tensors=return_tensors, **kwargs)

    def preprocess(
        self,
        images: Image.Image | Sequence[Image.Image] | Sequence[Sequence[Image.Image]],
        uint8: bool = False,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Process images.

        Args:
            images: One PIL image, a list, or a list of lists (one per prompt; flattened in order).
            uint8: Return uint8 crops without the global view (``tile_slots``), for ``finish`` on the device.
            return_tensors: ``"pt"`` or ``None`` (the values are torch tensors either way).

        Returns:
            ``pixel_values`` ``[n, C+1, 3, S, S]`` float32 (uint8 with ``uint8``), ``image_sizes`` ``[n, 2]``
            long (padded HD height, width), ``num_img_tokens`` list of ``n`` ints.

        Raises:
            TypeError: for arguments this processor does not take.
            ValueError: for ``return_tensors`` other than ``"pt"`` or ``None``.
        """
        if kwargs:
            raise TypeError(f"Phi3VImageProcessor got unsupported arguments: {sorted(kwargs)}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r}: Phi3VImageProcessor returns torch tensors ('pt')")
        if isinstance(images, Image.Image):
            images = [images]
        images = [i for item in images for i in (item if isinstance(item, (list, tuple)) else [item])]
        pixel_values, sizes, counts = [], [], []
        for image in images:
            pixels = self.hd_pixels(image)
            pixel_values.append(self.tile_slots(pixels) if uint8 else self.crops(self.normalize(pixels)))
            sizes.append(list(pixels.shape[1:]))
            counts.append(self.num_image_tokens(*image.size))
        s = self.crop_size
        empty = torch.zeros(0, self.num_crops + 1, 3, s, s, dtype=torch.uint8 if uint8 else torch.float32)
        data = {
            "pixel_values": torch.stack(pixel_values) if pixel_values else empty,
            "image_sizes": torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),
            "num_img_tokens": counts,  # a list, as the official processor returns it
        }
        return BatchFeature(data=data)  # already torch tensors

    # ---- preprocessor_config.json -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The official ``preprocessor_config.json`` (plus ``crop_size`` when not 336, and unknown keys read in).

        ``auto_map`` points the official code at Microsoft's hub files, so ``trust_remote_code=True`` loaders
        (transformers 4.x, vLLM) open a phi3v-written directory with the original processor.
        """
        data = {
            "auto_map": {
                "AutoProcessor": f"{OFFICIAL_REPO}--processing_phi3_v.Phi3VProcessor",
                "AutoImageProcessor": f"{OFFICIAL_REPO}--image_processing_phi3_v.Phi3VImageProcessor",
            },
            "do_convert_rgb": True,
            "image_mean": list(self.image_mean),
            "image_processor_type": "Phi3VImageProcessor",
            "image_std": list(self.image_std),
            "num_crops": self.num_crops,
            "num_img_tokens": self.merged_grid**2,
            "processor_class": "Phi3VProcessor",
        }
        if self.crop_size != 336:
            data["crop_size"] = self.crop_size
        return {**self.extra, **data}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict, **overrides: Any) -> Phi3VImageProcessor:
        """Build from ``preprocessor_config.json`` content; ``overrides`` (e.g. ``num_crops``) win.

        Keys this class does not use are kept and written back by ``to_dict``, so a saved directory still opens
        with the official processor.
        """
        return_unused = overrides.pop("return_unused_kwargs", False)
        known = ("num_crops", "crop_size", "image_mean", "image_std")
        data = {**data, **{k: v for k, v in overrides.items() if k in known and v is not None}}
        processor = cls(**data)
        unused = {k: v for k, v in overrides.items() if k not in known}
        return (processor, unused) if return_unused else processor
