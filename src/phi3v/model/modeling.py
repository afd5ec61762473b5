"""Phi-3-V: transformers' Phi-3 decoder with the image embedding of ``image_embedding.py`` in front.

The decoder (embedding, 32 Phi-3 layers with fused ``qkv_proj`` / ``gate_up_proj``, RMSNorm, longrope "su"
rotary embedding) is transformers' own ``Phi3Model``; this file adds only what Phi-3-V adds:

* ``model.vision_embed_tokens`` (the image side) and the scatter of its features into the image-token positions;
* a causal-LM head that is untied from the embedding, computes the loss only at supervised positions, and
  re-runs the prompt when generation crosses the short/long rope switch (as the official code does).

Image positions in ``input_ids`` are either the official processor's negative ids (-1, -2, ... for image k; the
value is never used to pick the image, only their order matters) or ``config.image_token_id``. Features fill those
positions in row-major order over the batch, so images must be given in the order their placeholders appear.

Weights load from and save to the official checkpoint layout; see ``weights.py``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
from transformers.models.phi3.modeling_phi3 import Phi3Model, Phi3RotaryEmbedding

from phi3v.model.configuration import Phi3VConfig
from phi3v.model.image_embedding import Phi3ImageEmbedding

IGNORE_INDEX = -100

# transformers 5.24 renamed the KV-cache argument and output field from ``past_key_values`` to ``cache``. The names
# are read from the installed release, so that the cache is never passed or returned under a name it ignores.
_CACHE_NAMES = ("cache", "past_key_values")


def _cache_name(names: set[str], where: str) -> str:
    for name in _CACHE_NAMES:
        if name in names:
            return name
    raise ImportError(
        f"{where} names its KV cache neither {' nor '.join(_CACHE_NAMES)}; phi3v's long-context cache reset cannot "
        "work with this transformers release. Install the versions in constraints.txt."
    )


_DECODER_CACHE_ARG = _cache_name(set(inspect.signature(Phi3Model.forward).parameters), "Phi3Model.forward")
_OUTPUT_CACHE_FIELD = _cache_name(
    {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}, "CausalLMOutputWithPast"
)


class Phi3VPreTrainedModel(PreTrainedModel):
    """Shared settings and weight initialisation of the Phi-3-V models."""

    config_class = Phi3VConfig
    config: Phi3VConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # What transformers' loader needs for device maps and quantisation (bitsandbytes): layers never split across
    # devices, the KV cache (under either name) never moved by device hooks. Nothing is kept in float32
    # (`_keep_in_fp32_modules`): RMSNorm computes in float32 itself and the official model keeps nothing; a 4-bit
    # base keeps `lm_head` in its float dtype through the quantisation config (phi3v.train.strategy).
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]
    _skip_keys_device_placement = list(_CACHE_NAMES)
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the image scatter depends on data-dependent counts

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CLIPVisionEmbeddings):
            nn.init.normal_(module.class_embedding, std=module.embed_dim**-0.5)
            module.position_ids.copy_(torch.arange(module.num_positions).expand(1, -1))
        elif isinstance(module, Phi3ImageEmbedding):
            # The official module zero-initialises its separators.
            nn.init.zeros_(module.glb_GN)
            nn.init.zeros_(module.sub_GN)

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (rotary frequencies, CLIP position ids).

        Needed after building on the meta device, since buffers are not in any checkpoint.
        """
        for module in self.modules():
            if isinstance(module, Phi3RotaryEmbedding):
                device = module.inv_freq.device
                fresh = Phi3RotaryEmbedding(module.config)  # computed on CPU in float32
                module.inv_freq = fresh.inv_freq.to(device)
                module.original_inv_freq = fresh.original_inv_freq.to(device)
                if hasattr(module, "long_inv_freq"):
                    del module.long_inv_freq
            elif isinstance(module, CLIPVisionEmbeddings):
                device = module.position_ids.device
                module.position_ids = torch.arange(module.num_positions, device=device).expand(1, -1)

    def enable_activation_checkpointing(self, every_n_layers: int = 1) -> None:
        """Non-reentrant activation checkpointing over the decoder and CLIP layers.

        Non-reentrant is required: with reentrant checkpointing and frozen inputs (frozen vision, LoRA), layers
        silently get no gradient.

        Args:
            every_n_layers: Checkpoint every n-th layer (counted over CLIP and decoder layers together) and keep
                the others' activations: 1 is full checkpointing, 2 recomputes half the layers, and so on.
        """
        kwargs = {"use_reentrant": False}
        if hasattr(self, "activation_checkpointing_enable"):
            self.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
        else:  # transformers without the new name
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)

    def compile_layers(self) -> int:
        """``torch.compile`` each decoder and CLIP layer in place (dynamic shapes: sequence lengths vary); returns
        how many. Per layer rather than the whole model, so that the image merge, the variable number of crops
        and activation checkpointing stay in eager mode."""
        layers = [*self.model.layers, *self.model.vision_embed_tokens.img_processor.vision_model.encoder.layers]
        for layer in layers:
            layer.compile(dynamic=True)
        return len(layers)


class Phi3VModel(Phi3VPreTrainedModel, Phi3Model):
    """Phi-3 decoder whose input embeddings carry image features at the image-token positions."""

    def __init__(self, config: Phi3VConfig):
        Phi3Model.__init__(self, config)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.vision_embed_tokens = Phi3ImageEmbedding(config)
        self.post_init()

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``True`` where ``input_ids`` holds an image placeholder (negative or ``image_token_id``)."""
        return (input_ids < 0) | (input_ids == self.config.image_token_id)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features scattered into the image positions.

        Args:
            input_ids: ``[B, L]``, image positions negative or ``config.image_token_id``. Never modified.
            pixel_values: ``[n, C+1, 3, S, S]`` for the ``n`` images, in placeholder order.
            image_sizes: ``[n, 2]`` padded HD sizes.

        Returns:
            ``[B, L, E]`` input embeddings.

        Raises:
            ValueError: if the number of image positions differs from the number of image features.
        """
        image_mask = self.image_token_mask(input_ids)
        # Placeholders are embedded as token 0 and then overwritten, so that row gets no gradient from them.
        embeds = self.embed_tokens(input_ids.masked_fill(image_mask, 0))  # [B, L, E]
        n_positions = int(image_mask.sum())
        if pixel_values is None:
            if n_positions:
                raise ValueError(f"input_ids hold {n_positions} image-token positions but no pixel_values were given")
            if self._other_rank_runs_vision(embeds.device, has_images=False):
                # A blank 1x1-grid image (global view + one crop) through the sharded tower, weighted 0: the same
                # embeddings and a zero gradient for the image side, and the tower's collectives pair up.
                size = self.vision_embed_tokens.crop_size
                blank = embeds.new_zeros(1, 2, 3, size, size)  # [1, 1 + 1 crop, 3, S, S]
                sizes = torch.tensor([[size, size]], device=embeds.device)
                embeds = embeds + 0.0 * self.vision_embed_tokens(blank, sizes).sum()
        else:
            self._other_rank_runs_vision(embeds.device, has_images=True)
            if image_sizes is None:
                raise ValueError("pixel_values were given without image_sizes")
            features = self.vision_embed_tokens(pixel_values, image_sizes)  # [T, E]
            if n_positions != features.shape[0]:
                per_image = self.vision_embed_tokens.num_tokens(image_sizes, pixel_values.shape[1])
                raise ValueError(
                    f"input_ids hold {n_positions} image-token positions but the {len(per_image)} image(s) give "
                    f"{features.shape[0]} image features (per image: {per_image}); the prompt must be built with "
                    "the same num_crops as pixel_values"
                )
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))
        return self.embed_dropout(embeds)

    def _other_rank_runs_vision(self, device: torch.device, has_images: bool) -> bool:
        """Whether this rank, with no images of its own, must run the CLIP tower because another rank does.

        Only under FSDP2 (``train.engine.shard_fsdp2``), where the tower is a sharded unit of its own: running it
        all-gathers its parameters (and backward reduce-scatters its gradients), which every rank must do
        together. The ranks agree with one all-reduce per forward. Elsewhere: False, and no collective.
        """
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self.vision_embed_tokens.img_processor, FSDPModule):
            return False
        import torch.distributed as dist

        flag = torch.tensor([int(has_images)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not has_images and bool(flag.item())

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Phi-3 decoder forward; ``input_ids`` plus images become ``inputs_embeds`` first.

        Other keyword arguments (``attention_mask``, ``position_ids``, ``past_key_values``, ``use_cache``) are
        those of transformers' ``Phi3Model``.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes)
        elif pixel_values is not None:
            raise ValueError("pixel_values cannot be combined with inputs_embeds; embed the images with embed()")
        return Phi3Model.forward(self, inputs_embeds=inputs_embeds, **kwargs)


class Phi3VForCausalLM(Phi3VPreTrainedModel, GenerationMixin):
    """Phi-3.5-vision / Phi-3-vision for causal language modelling and generation.

    Example:
        >>> from phi3v import Phi3VForCausalLM, build_model
        >>> model = build_model("tiny")
        >>> model.save_pretrained("tiny-phi3v")
        >>> model = Phi3VForCausalLM.from_pretrained("tiny-phi3v")
    """

    _tied_weights_keys: dict[str, str] = {}
    # Official tensors that are not built (CLIP layers past the one read, post_layernorm) and buffers some
    # exporters include; `from_pretrained` reads the former aside, so the load stays quiet about them.
    _keys_to_ignore_on_load_unexpected = [
        r"vision_model\.encoder\.layers\.\d+\.",
        r"vision_model\.post_layernorm\.",
        r"rotary_emb\.inv_freq$",
        r"embeddings\.position_ids$",
    ]

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Official checkpoint tensors that phi3v does not compute with (CLIP's last layer, post_layernorm),
        # kept from loading so that saving writes the complete official key set.
        self.unused_official_weights: dict[str, torch.Tensor] = {}
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Forward pass.

        Args:
            input_ids: ``[B, L]`` token ids; image positions negative or ``config.image_token_id``.
            attention_mask: ``[B, L]``, 1 for real tokens, 0 for padding.
            position_ids: ``[B, L]``; defaults to ``0..L-1`` after the cached length.
            cache: KV cache for generation (also accepted as ``past_key_values``, the name before transformers
                5.24).
            inputs_embeds: ``[B, L, E]`` instead of ``input_ids``.
            pixel_values: ``[n, C+1, 3, S, S]`` HD crops of the images, in placeholder order.
            image_sizes: ``[n, 2]`` padded HD sizes in pixels.
            labels: ``[B, L]`` targets, ``-100`` where no loss is taken; shifted inside (label ``t+1`` is the
                target of position ``t``).
            use_cache: Return a KV cache.
            logits_to_keep: Without labels, compute logits for the last ``logits_to_keep`` positions only
                (0 = all).
            num_items_in_batch: Divide the summed loss by this count instead of this batch's supervised tokens,
                so that gradient accumulation weights every token equally.

        Returns:
            ``loss`` (with labels; mean cross-entropy over supervised tokens), ``logits`` ``[B, L', V]``
            (float32; ``None`` with labels, since the head then runs only at supervised positions) and the cache.

        Raises:
            RuntimeError: if a cache filled with short-rope keys would be extended past the rope switch (the
                generation-time reset did not happen, so the outputs would differ from the official model's).
        """
        if "past_key_values" in kwargs:
            if cache is not None:
                raise ValueError("pass the KV cache as cache or past_key_values, not both")
            cache = kwargs.pop("past_key_values")
        self._check_rope_switch(cache, input_ids if input_ids is not None else inputs_embeds)
        if use_cache is None:  # a KV cache is only worth building to generate
            use_cache = labels is None and not self.training
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{_DECODER_CACHE_ARG: cache},
            **kwargs,
        )
        hidden = outputs.last_hidden_state  # [B, L, E]
        loss = logits = None
        if labels is not None:
            loss_sum, n_tokens = supervised_loss(hidden, labels, self.lm_head)
            loss = loss_sum / (num_items_in_batch if num_items_in_batch is not None else n_tokens)
        else:
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            logits = self.lm_head(hidden).float()
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD)}
        )

    def _check_rope_switch(self, cache: Cache | None, inputs: torch.Tensor | None) -> None:
        """Refuse to extend a short-rope cache past ``original_max_position_embeddings``.

        Keys cached while the sequence was within the original context were rotated with the short factors; once
        the sequence passes it, the official model uses the long factors for every position, so the whole sequence
        must be re-run (``prepare_inputs_for_generation`` drops the cache). If a transformers release hands the
        cache over in a way that override does not see, this raises instead of producing other tokens.
        """
        if cache is None or inputs is None:
            return
        limit = self.config.original_max_position_embeddings
        cached = cache.get_seq_length()
        if 0 < cached <= limit < cached + inputs.shape[1]:
            raise RuntimeError(
                f"a KV cache of {cached} short-rope positions would be extended to {cached + inputs.shape[1]}, past "
                f"the rope switch at {limit}; the official model re-runs the sequence there. The cache reset in "
                "prepare_inputs_for_generation did not happen: this transformers release is not supported "
                "(install the versions in constraints.txt)"
            )

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # Phi-3's rope switches from short to long factors once the sequence passes the original context; the
        # cached keys were rotated with short factors, so the official code drops the cache and re-runs the whole
        # sequence (images included) the first time that happens. The cache arrives under the release's name.
        if args:
            raise TypeError("prepare_inputs_for_generation takes input_ids and keyword arguments only")
        name = next((n for n in _CACHE_NAMES if kwargs.get(n) is not None), None)
        limit = self.config.original_max_position_embeddings
        if name is not None and input_ids.shape[1] > limit and 0 < kwargs[name].get_seq_length() <= limit:
            kwargs[name] = None
            kwargs["next_sequence_length"] = None
            kwargs["is_first_iteration"] = True
        return super().prepare_inputs_for_generation(input_ids, **kwargs)

    # ---- official checkpoint format -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any
    ) -> Phi3VForCausalLM:
        """Load an official or phi3v checkpoint with transformers' own loader (safetensors only, no remote code).

        Takes what ``PreTrainedModel.from_pretrained`` takes, with the same meaning: ``dtype`` / ``torch_dtype``
        (``"auto"``: the checkpoint's), ``device_map`` (``"auto"`` too), ``attn_implementation``,
        ``quantization_config`` (e.g. ``BitsAndBytesConfig`` for a 4-bit base, loaded 4-bit directly),
        ``revision``, ``cache_dir``, ``local_files_only``, ``token``. Unknown arguments raise. On top of it, phi3v
        holds the official key set to the letter:

        * ``model.vision_embed_tokens.wte.weight`` (the official alias of ``model.embed_tokens.weight``) is read as
          the embedding when the checkpoint has no ``model.embed_tokens.weight``;
        * CLIP's unused last layer and ``post_layernorm`` are not built; their tensors are read aside and written
          back by ``save_pretrained``;
        * anything else missing, unexpected or mis-shaped raises, naming the tensors.

        Raises:
            ValueError: on missing, unexpected or mis-shaped tensors; for ``use_safetensors=False``.
            TypeError: for ``trust_remote_code=True`` (phi3v is the code) and unknown arguments.
        """
        from phi3v.model.weights import check_loading_info, local_checkpoint, read_unused_official, weight_files

        if kwargs.pop("trust_remote_code", False):
            raise TypeError("phi3v runs no remote code: drop trust_remote_code=True (importing phi3v is enough)")
        if kwargs.get("use_safetensors") is False:
            raise ValueError("phi3v loads safetensors only; use_safetensors=False is not supported")
        if "_attn_implementation" in kwargs:  # the spelling of older model cards
            kwargs.setdefault("attn_implementation", kwargs.pop("_attn_implementation"))
        # The Auto classes move the caller's choice into the config they pass; SDPA only when nobody chose.
        if getattr(kwargs.get("config"), "_attn_implementation", None) is None:
            kwargs.setdefault("attn_implementation", "sdpa")
        if (local := local_checkpoint(pretrained_model_name_or_path)) is not None:
            weight_files(local)  # a clear error for a directory of pickles or without weights
        want_info = kwargs.pop("output_loading_info", False)
        # Mis-shaped tensors are collected (not raised by transformers) so that one message names all problems.
        reinit_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                use_safetensors=True,
                ignore_mismatched_sizes=True,
                key_mapping={r"^model\.vision_embed_tokens\.wte\.": "model.embed_tokens."},
                output_loading_info=True,
                **kwargs,
            )
        except OSError as err:
            if local is not None:
                raise
            raise FileNotFoundError(
                f"{pretrained_model_name_or_path} is neither a local directory nor a hub repository that could be "
                f"downloaded ({err})"
            ) from err
        check_loading_info(pretrained_model_name_or_path, info, model.config, shapes=not reinit_mismatched)
        model.reset_buffers()
        hub = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
        model.unused_official_weights = read_unused_official(pretrained_model_name_or_path, model, **hub)
        return (model, info) if want_info else model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_size: int | str = "5GB",
        is_main_process: bool = True,
        safe_serialization: bool = True,
        **unsupported: Any,
    ) -> None:
        """Write official-format safetensors shards, the index, ``config.json`` and ``generation_config.json``.

        Args:
            save_directory: Target directory (created if missing).
            state_dict: Weights to write instead of ``self.state_dict()`` (e.g. gathered from a sharded engine).
            max_shard_size: Largest shard, bytes or a string such as ``"5GB"``.
            is_main_process: Only the main process writes (the argument distributed callers pass).
            safe_serialization: Must stay ``True``: phi3v writes safetensors only.
        """
        from phi3v.model.weights import save_pretrained

        if not safe_serialization:
            raise ValueError("phi3v writes safetensors only; safe_serialization=False is not supported")
        if state_dict is None and (method := getattr(self, "quantization_method", None)) is not None:
            raise ValueError(
                f"a model loaded with quantization ({getattr(method, 'value', method)}) has no official-format "
                "weights to write: save the adapter, or load the base without quantization_config to save it"
            )
        if unsupported:
            raise TypeError(f"Phi3VForCausalLM.save_pretrained got unsupported arguments: {sorted(unsupported)}")
        if is_main_process:
            save_pretrained(self, save_directory, state_dict=state_dict, max_shard_size=max_shard_size)


def without_adapters(model: nn.Module) -> Phi3VForCausalLM:
    """The Phi-3-V model inside a PEFT wrapper (its adapter layers stay in place), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supervised_loss(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy, with the LM head run only where a target exists.

    Equal to the full-vocabulary loss over all positions (masked by ``-100``) but skips the head's matmul and
    the ``[B, L, V]`` logits for unsupervised positions, which are almost all of a vision sample.

    Args:
        hidden: ``[B, L, E]`` final hidden states.
        labels: ``[B, L]`` unshifted targets, ``-100`` where ignored.
        lm_head: The output projection.

    Returns:
        ``(loss_sum, n_tokens)``: float32 scalar sum and the number of supervised tokens.
    """
    targets = labels[:, 1:]  # [B, L-1]: position t predicts token t+1
    supervised = targets != IGNORE_INDEX
    picked = hidden[:, :-1][supervised]  # [N, E]
    logits = lm_head(picked).float()  # [N, V]
    loss_sum = F.cross_entropy(logits, targets[supervised], reduction="sum")
    return loss_sum, supervised.sum()
