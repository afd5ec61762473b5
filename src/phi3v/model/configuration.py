"""Phi-3-V configuration: Phi-3's decoder config plus the image-embedding fields of the official checkpoints.

The official ``config.json`` (Phi-3.5-vision-instruct, Phi-3-vision-128k-instruct) is a Phi-3 config with
``model_type: phi3_v``, an old-style ``rope_scaling`` dict of type ``su`` and two dicts that describe the image
side: ``embd_layer`` (the HD transform) and ``img_processor`` (the CLIP tower). The CLIP tower's own config is not
in the file; the official code hard-codes CLIP ViT-L/14-336, and so do we when ``vision_config`` is absent.

Differences from the official config class, each deliberate:

* ``vision_config`` (optional) lets tests build tiny towers; it is written to ``config.json`` only when it differs
  from CLIP ViT-L/14-336, so an official-size model saves an official-looking file.
* ``image_token_id`` is our one dedicated image-placeholder id (``<|image|>`` = 32044 in the Phi-3-V vocabulary).
  The model also accepts the official processor's negative ids.
* Only the combinations the released checkpoints use are accepted (``sub_glb`` order, ``mlp`` projector, patch
  features, HD transform with learnable separators); anything else raises instead of silently computing something
  the checkpoints were never trained with.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
import transformers
from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, Phi3Config
from transformers.configuration_utils import SubConfigSpec

from phi3v.utils import OFFICIAL_REPO, atomic_write_text

# CLIP ViT-L/14-336 exactly as the official modeling code hard-codes it (spec §2.2).
CLIP_VIT_L14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}

DEFAULT_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}

DEFAULT_IMG_PROCESSOR = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": 144,
}


# The official config.json asks for flash_attention_2 under this key; a file's value is not followed (see from_dict).
FILE_ATTENTION_KEY = "_attn_implementation"

# Fields we write in the official file order; everything else we know is appended after them.
_OFFICIAL_FIELDS = (
    "attention_dropout", "bos_token_id", "embd_layer", "embd_pdrop", "eos_token_id", "hidden_act",
    "hidden_size", "img_processor", "initializer_range", "intermediate_size", "max_position_embeddings",
    "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "original_max_position_embeddings", "pad_token_id", "resid_pdrop", "rms_norm_eps", "rope_scaling",
    "rope_theta", "sliding_window", "tie_word_embeddings", "torch_dtype", "transformers_version", "use_cache",
    "vocab_size",
)  # fmt: skip


def _normalise_rope_scaling(rope_scaling: dict | None) -> dict | None:
    """Map the official ``{"type": "su", ...}`` onto transformers' ``longrope`` parameters.

    transformers only moves ``original_max_position_embeddings`` into the rope parameters when the type is already
    ``longrope``, so "su" must be renamed before the parent config sees it.
    """
    if rope_scaling is None:
        return None
    rope_scaling = dict(rope_scaling)
    kind = rope_scaling.pop("type", None) or rope_scaling.get("rope_type")
    if kind in ("su", "longrope"):
        rope_scaling["rope_type"] = "longrope"
        return rope_scaling
    if kind == "default":
        rope_scaling["rope_type"] = "default"
        return rope_scaling
    raise ValueError(
        f"rope_scaling type {kind!r} is not supported by phi3v: Phi-3-V checkpoints use 'su' (also called "
        "'longrope'); the Phi-3 'yarn' variant computes different frequencies and no Phi-3-V checkpoint uses it"
    )


@strict
class Phi3VConfig(Phi3Config):
    """Configuration of a Phi-3-V model (``model_type`` ``phi3_v``).

    Takes every field of the official ``config.json`` plus:

    Args:
        embd_layer: The official image-embedding dict (HD transform order, projector kind, separators).
        img_processor: The official CLIP dict; ``layer_idx`` (default -2) and ``type_feature`` (default
            ``"patch"``) are read from it when present.
        vision_config: CLIP vision-tower config; CLIP ViT-L/14-336 when absent.
        image_token_id: The dedicated image-placeholder id phi3v's processor emits.
    """

    model_type = "phi3_v"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=CLIP_VIT_L14_336),
    }

    embd_layer: dict | str | None = None
    img_processor: dict | None = None
    vision_config: dict | CLIPVisionConfig | None = None
    image_token_id: int = 32044

    def __post_init__(self, **kwargs: Any):
        if "rope_scaling" in kwargs:
            kwargs["rope_scaling"] = self._longrope_factor(_normalise_rope_scaling(kwargs["rope_scaling"]))
        elif isinstance(self.rope_parameters, dict):
            self.rope_parameters = self._longrope_factor(_normalise_rope_scaling(self.rope_parameters))
        if (torch_dtype := kwargs.pop("torch_dtype", None)) is not None and self.dtype is None:
            self.dtype = torch_dtype
        kwargs.pop("auto_map", None)
        if isinstance(self.embd_layer, str):  # the official class's default, "default", means no image side
            raise ValueError(f"embd_layer={self.embd_layer!r}: phi3v supports Phi-3-V models with the image embedding")
        self.embd_layer = {**DEFAULT_EMBD_LAYER, **(self.embd_layer or {})}
        self.img_processor = {**DEFAULT_IMG_PROCESSOR, **(self.img_processor or {})}
        super().__post_init__(**kwargs)
        self._check_image_side()

    def _longrope_factor(self, rope: dict | None) -> dict | None:
        # The attention scale of "su" rope depends on max / original max positions (32 for the 128k models);
        # stating it as `factor` is what transformers expects and gives the same value.
        if rope is not None and rope["rope_type"] == "longrope":
            rope.setdefault("factor", self.max_position_embeddings / self.original_max_position_embeddings)
        return rope

    def _check_image_side(self) -> None:
        problems = []
        layer = self.embd_layer
        if layer.get("hd_transform_order") != "sub_glb":
            problems.append(f"embd_layer.hd_transform_order={layer.get('hd_transform_order')!r} (need 'sub_glb')")
        if layer.get("projection_cls") != "mlp":
            problems.append(f"embd_layer.projection_cls={layer.get('projection_cls')!r} (need 'mlp')")
        if not layer.get("use_hd_transform") or not layer.get("with_learnable_separator"):
            problems.append("embd_layer.use_hd_transform and with_learnable_separator must both be true")
        if self.img_processor.get("type_feature", "patch") != "patch":
            problems.append(f"img_processor.type_feature={self.img_processor['type_feature']!r} (need 'patch')")
        vision = self.vision_config
        grid, rest = divmod(vision.image_size, vision.patch_size)
        if rest or grid % 2:
            problems.append(
                f"vision image_size {vision.image_size} / patch_size {vision.patch_size} must be an even whole "
                "number of patches for the 2x2 merge"
            )
        n_layers = self.vision_layers_used
        if not 1 <= n_layers <= vision.num_hidden_layers:
            problems.append(
                f"img_processor.layer_idx={self.vision_layer_idx} selects no layer of a "
                f"{vision.num_hidden_layers}-layer tower"
            )
        if problems:
            raise ValueError("Unsupported Phi-3-V config: " + "; ".join(problems))

    # ---- derived quantities ------------------------------------------------------------------------------------

    @property
    def vision_layer_idx(self) -> int:
        """Index into CLIP's ``hidden_states`` (entry 0 = embeddings, entry k = output of layer k-1)."""
        return int(self.img_processor.get("layer_idx", -2))

    @property
    def vision_layers_used(self) -> int:
        """How many CLIP encoder layers run: those up to the selected hidden state (23 of 24 for layer -2)."""
        idx = self.vision_layer_idx
        return idx if idx >= 0 else self.vision_config.num_hidden_layers + 1 + idx

    @property
    def crop_size(self) -> int:
        """Side of one HD crop in pixels (336 for CLIP ViT-L/14-336)."""
        return self.vision_config.image_size

    @property
    def merged_grid(self) -> int:
        """Side of the 2x2-merged patch grid of one crop (12 for 336 px crops of 14 px patches)."""
        return self.vision_config.image_size // self.vision_config.patch_size // 2

    # ---- official config.json --------------------------------------------------------------------------------

    def to_official_dict(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """The ``config.json`` content in the official layout, loadable by the official code and by vLLM.

        Rope parameters go back to the old ``rope_scaling`` form with type ``su``, which the official config
        class validates; ``auto_map`` points at the official code on the hub.

        Args:
            dtype: The dtype of the weights written beside it (``torch_dtype``); default ``self.dtype``.
        """
        rope = self.rope_parameters or {}
        out: dict[str, Any] = {
            "_name_or_path": OFFICIAL_REPO,
            "architectures": ["Phi3VForCausalLM"],
            "auto_map": {
                "AutoConfig": f"{OFFICIAL_REPO}--configuration_phi3_v.Phi3VConfig",
                "AutoModelForCausalLM": f"{OFFICIAL_REPO}--modeling_phi3_v.Phi3VForCausalLM",
            },
        }
        rope_scaling = None
        if rope.get("rope_type") == "longrope":
            rope_scaling = {
                "long_factor": list(rope["long_factor"]),
                "short_factor": list(rope["short_factor"]),
                "type": "su",
            }
        dtype = dtype or self.dtype
        derived = {
            "model_type": self.model_type,
            "rope_scaling": rope_scaling,
            "rope_theta": rope.get("rope_theta", 10000.0),
            "torch_dtype": str(dtype).removeprefix("torch.") if dtype is not None else "bfloat16",
            "transformers_version": transformers.__version__,
        }
        for name in _OFFICIAL_FIELDS:
            out[name] = copy.deepcopy(derived[name] if name in derived else getattr(self, name))
        vision = self.vision_config.to_dict()
        if any(vision.get(k) != v for k, v in CLIP_VIT_L14_336.items()):
            out["vision_config"] = {k: vision[k] for k in ("model_type", *CLIP_VIT_L14_336)}
        out["image_token_id"] = self.image_token_id
        return out

    def save_official(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write ``config.json`` in the official layout (atomically); ``dtype`` as for ``to_official_dict``."""
        text = json.dumps(self.to_official_dict(dtype), indent=2) + "\n"
        atomic_write_text(os.path.join(directory, "config.json"), text)

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike) -> "Phi3VConfig":  # noqa: UP037
        """Read an official or phi3v ``config.json``."""
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
        model_type = data.get("model_type")
        if model_type != cls.model_type:
            raise ValueError(f"{json_file}: model_type is {model_type!r}, expected {cls.model_type!r}")
        return cls.from_official_dict(data)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "Phi3VConfig":  # noqa: UP037
        """Build from a ``config.json``'s content (what ``from_pretrained`` and the Auto classes call).

        The file's ``_attn_implementation`` is dropped: the hub config asks for flash_attention_2, and phi3v
        chooses the attention itself (SDPA by default). The caller's choice, ``attn_implementation=`` or
        ``_attn_implementation=`` in ``kwargs``, is kept, so it reaches the model through the Auto classes too.
        """
        config_dict = {k: v for k, v in config_dict.items() if k != FILE_ATTENTION_KEY}
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_official_dict(cls, data: dict[str, Any]) -> "Phi3VConfig":  # noqa: UP037
        """Build from the content of an official (or phi3v-written) ``config.json`` (its ``_attn_implementation``
        dropped, as in ``from_dict``)."""
        data = dict(data)
        for key in ("architectures", "auto_map", "_name_or_path", "transformers_version", "model_type",
                    FILE_ATTENTION_KEY):  # fmt: skip
            data.pop(key, None)
        if "torch_dtype" in data:  # the official name of `dtype`
            data.setdefault("dtype", data.pop("torch_dtype"))
        return cls(**data)
