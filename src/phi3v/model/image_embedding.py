"""The image side of Phi-3-V: CLIP tower, HD 2x2 merge with learnable separators, and the projector.

Notation (official sizes in brackets):
    n   images in the batch
    C   crop slots per image after the global view (num_crops) [16]
    S   crop side in pixels [336]
    P   patches per crop side, S / patch_size [24]
    D   CLIP width [1024]
    g   merged grid side, P / 2 [12]
    h,w crop grid of one image (image_size // S), h * w <= C
    E   language-model width [3072]

What Phi-3-V adds to the stock parts (CLIP from transformers):

* the tower stops at ``img_processor.layer_idx`` (-2): 23 of CLIP-L's 24 layers are built, and ``post_layernorm``
  is not built at all, since the official code reads ``hidden_states[-2]`` and never uses either;
* the CLS token is dropped (``type_feature = "patch"``);
* every crop's P x P patch grid is merged 2x2 into g x g tokens of width 4D;
* crops are laid out on the image's crop grid, a learnable ``sub_GN`` token ends every row, then one ``glb_GN``
  token separates the sub-image tokens from the global view (``sub_glb`` order);
* a 2-layer GELU MLP projects 4D -> E.

Unlike the official code, crop slots that are only padding (beyond ``1 + h*w``) never run through CLIP; their
features were discarded anyway, so the output is the same.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionEmbeddings

from phi3v.model.configuration import Phi3VConfig


def num_image_tokens(h_crops: torch.Tensor | int, w_crops: torch.Tensor | int, g: int = 12):
    """Image-token count of one image with an ``h x w`` crop grid.

    ``(h*w + 1) * g^2`` crop tokens, ``h*g`` row separators, ``1`` global separator, ``g`` global-row
    separators, i.e. ``(h*w + 1) * 144 + 1 + (h + 1) * 12`` at official size (757 for a 2x2 grid).
    """
    return (h_crops * w_crops + 1) * g * g + 1 + (h_crops + 1) * g


class _Encoder(nn.Module):
    """CLIP's encoder with only the layers whose output Phi-3-V reads (keys ``encoder.layers.{j}``)."""

    def __init__(self, config: CLIPVisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(num_layers))


class CLIPVisionTrunk(nn.Module):
    """CLIP ViT up to the selected layer: patch + position embedding, ``pre_layrnorm``, encoder layers."""

    def __init__(self, config: CLIPVisionConfig, num_layers: int):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = _Encoder(config, num_layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features of crops.

        Args:
            pixel_values: ``[k, 3, S, S]`` normalised crops.

        Returns:
            ``[k, P*P, D]`` features of the last built layer, CLS dropped.
        """
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))  # [k, 1 + P*P, D]
        for layer in self.encoder.layers:
            hidden = layer(hidden, None)
        return hidden[:, 1:]


class CLIPVisionTower(nn.Module):
    """Holds the trunk under ``vision_model`` so state-dict keys read ``img_processor.vision_model.*``."""

    def __init__(self, config: CLIPVisionConfig, num_layers: int):
        super().__init__()
        self.vision_model = CLIPVisionTrunk(config, num_layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)


class Phi3ImageEmbedding(nn.Module):
    """Turns HD-cropped images into the language model's image-token embeddings.

    The official module also holds ``wte``, an alias of the decoder's ``embed_tokens``; here the decoder embeds
    the text and this module only produces image features, so no weight is shared between two modules.
    """

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        vision = config.vision_config
        if config.img_processor.get("image_dim_out", vision.hidden_size) != vision.hidden_size:
            raise ValueError(
                f"img_processor.image_dim_out={config.img_processor['image_dim_out']} differs from the vision "
                f"tower width {vision.hidden_size}"
            )
        self.crop_size = config.crop_size
        self.grid = config.merged_grid
        dim = 4 * vision.hidden_size  # 2x2 merge stacks four patch features
        self.img_processor = CLIPVisionTower(vision, config.vision_layers_used)
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim))
        # Benchmarks switch this off to measure the official behaviour (CLIP over every slot, padding included).
        self.skip_padding_crops = True
        self.img_projection = nn.Sequential(
            nn.Linear(dim, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )

    def crop_grids(self, image_sizes: torch.Tensor, num_slots: int) -> list[tuple[int, int]]:
        """Crop grid ``(h, w)`` of each image from its padded HD size, checked against the slots given."""
        sizes = image_sizes.tolist()
        grids = []
        for i, (height, width) in enumerate(sizes):
            height, width = int(height), int(width)
            h, w = height // self.crop_size, width // self.crop_size
            if h < 1 or w < 1 or height % self.crop_size or width % self.crop_size:
                raise ValueError(
                    f"image_sizes[{i}] = ({height}, {width}) is not a positive multiple of the crop size "
                    f"{self.crop_size}; pass the padded HD size the processor returns"
                )
            if 1 + h * w > num_slots:
                raise ValueError(
                    f"image_sizes[{i}] = ({height}, {width}) is a {h}x{w} crop grid needing {1 + h * w} crop slots, "
                    f"but pixel_values has {num_slots} per image (num_crops + 1)"
                )
            grids.append((h, w))
        return grids

    def num_tokens(self, image_sizes: torch.Tensor, num_slots: int) -> list[int]:
        """Image-token count of each image."""
        return [num_image_tokens(h, w, self.grid) for h, w in self.crop_grids(image_sizes, num_slots)]

    def _merge_2x2(self, feats: torch.Tensor) -> torch.Tensor:
        """``[k, P*P, D]`` -> ``[k, g, g, 4D]``; channel block ``dy*2 + dx`` holds patch ``(2y+dy, 2x+dx)``."""
        k, _, d = feats.shape
        g = self.grid
        feats = feats.reshape(k, g, 2, g, 2, d)  # [k, y, dy, x, dx, D]
        feats = feats.permute(0, 1, 3, 2, 4, 5)  # [k, y, x, dy, dx, D]
        return feats.reshape(k, g, g, 4 * d)

    def _with_row_separators(self, grid: torch.Tensor) -> torch.Tensor:
        """``[H, W, 4D]`` -> ``[H * (W + 1), 4D]``: ``sub_GN`` appended after every row."""
        rows = grid.shape[0]
        newline = self.sub_GN.reshape(1, 1, -1).expand(rows, 1, -1).to(grid.dtype)
        return torch.cat([grid, newline], dim=1).flatten(0, 1)

    def hd_tokens(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Merged CLIP features with separators, before the projector.

        Args:
            pixel_values: ``[n, C+1, 3, S, S]``; slot 0 is the global view, slots ``1..h*w`` the row-major crops,
                the rest padding (never read).
            image_sizes: ``[n, 2]`` padded HD ``(height, width)`` in pixels, multiples of ``S``.

        Returns:
            ``[T, 4D]`` with ``T = sum_i num_image_tokens(h_i, w_i)``; per image: sub-image tokens with row
            separators, ``glb_GN``, global-view tokens with row separators.
        """
        if pixel_values.ndim != 5:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected [images, num_crops + 1, 3, "
                f"{self.crop_size}, {self.crop_size}] as the processor returns it"
            )
        image_sizes = torch.as_tensor(image_sizes)
        n, slots = pixel_values.shape[:2]
        if image_sizes.shape != (n, 2):
            raise ValueError(f"image_sizes has shape {tuple(image_sizes.shape)}, expected ({n}, 2) for {n} images")
        grids = self.crop_grids(image_sizes, slots)
        used = [1 + h * w for h, w in grids]
        # Only real crops go through CLIP: [sum(used), 3, S, S]
        slot_ids = torch.arange(slots, device=pixel_values.device)
        keep = slot_ids[None, :] < torch.tensor(used, device=pixel_values.device)[:, None]  # [n, C+1]
        # A frozen tower (frozen_vision, or LoRA without vision adapters) runs without autograd: no activations kept.
        tower_trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.img_processor.parameters())
        with torch.set_grad_enabled(tower_trains):
            if self.skip_padding_crops:
                patches = self.img_processor(pixel_values[keep])  # [sum(used), P*P, D]
            else:  # the official way: every slot, then the padding's features are dropped
                patches = self.img_processor(pixel_values.flatten(0, 1))[keep.flatten()]
        feats = self._merge_2x2(patches)  # [sum(used), g, g, 4D]

        g = self.grid
        pieces = []
        for (h, w), image_feats in zip(grids, feats.split(used), strict=True):
            glb = self._with_row_separators(image_feats[0])  # [g * (g+1), 4D]
            sub = image_feats[1:].reshape(h, w, g, g, -1)  # [h, w, y, x, 4D]
            sub = sub.permute(0, 2, 1, 3, 4).reshape(h * g, w * g, -1)  # crops placed on the image grid
            sub = self._with_row_separators(sub)  # [h*g * (w*g + 1), 4D]
            pieces += [sub, self.glb_GN.reshape(1, -1).to(sub.dtype), glb]
        return torch.cat(pieces)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Image-token embeddings of all images, concatenated in image order.

        Args:
            pixel_values: ``[n, C+1, 3, S, S]`` as for ``hd_tokens``.
            image_sizes: ``[n, 2]`` as for ``hd_tokens``.

        Returns:
            ``[T, E]`` projected image tokens.
        """
        tokens = self.hd_tokens(pixel_values, image_sizes)  # [T, 4D]
        return self.img_projection(tokens.to(self.glb_GN.dtype))
