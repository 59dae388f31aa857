# Copyright 2026 The Chimera/Mixpert HF port authors. Licensed under the Apache License, Version 2.0.
"""Everything this project knows about the native vision-language families it wraps.

Chimera and Mixpert both sit on top of an unchanged transformers VLM ("the backbone": `LlavaOnevisionModel`,
`Qwen2VLModel` or `InternVLModel`). This module is the only place that knows, per family,

* how the vision tower is run layer by layer (so Mixpert can share the first layers and give each expert its own
  last `K` layers, and Chimera can read a routing feature on the way),
* which modules turn tower activations into LLM tokens (feature-layer selection, final norm, pixel shuffle,
  projector, LLaVA-OneVision's anyres packing, Qwen2-VL's patch merger),
* how one image's tokens are pooled into a single vector for a router,
* how image features reach the language model (placeholder token, `mm_token_type_ids`, 3D RoPE positions).

The layer-by-layer path reproduces each family's `get_image_features` exactly (tested to 0.0 at fp32): it is
the native code split at layer boundaries, calling the native modules and helpers, not a re-implementation.

Units: the vision tower sees *units*. For LLaVA-OneVision and InternVL a unit is one tile (crop) of an image;
Qwen2-VL encodes each image at native resolution, so there a unit is one whole image (its patches packed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids


SUPPORTED_FAMILIES = ("llava_onevision", "qwen2_vl", "internvl")


# ------------------------------------------------------------------------------------- transformers versions
# The one place that knows how transformers releases differ for this code. A Hub user loading our files with
# `trust_remote_code` runs them on whatever transformers they have, so nothing here tests a version number: each
# difference is read off the installed library itself.
#
# KV cache name. transformers 5.24 renamed `past_key_values` to `cache` in every model output, native forward and in
# generation (which then calls our `forward(cache=...)` and reads `outputs["cache"]`); 5.23 uses `past_key_values`.
# Our output classes inherit the name from the library's own output classes, our forwards accept both names, and we
# hand the cache to the native modules under the name they declare.

#: The KV-cache field / keyword name of the installed transformers (`"cache"` from 5.24, `"past_key_values"` before).
CACHE_NAME = "cache" if "cache" in {f.name for f in fields(BaseModelOutputWithPast)} else "past_key_values"


def take_cache(past_key_values, kwargs: dict):
    """The KV cache given to one of our forwards under either name (generation on 5.24 passes `cache=`, code written
    for 5.23 `past_key_values=`). Removes `cache` from `kwargs` so it is not passed on twice."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the KV cache once, as `cache` or as `past_key_values` (its name before transformers "
                         "5.24).")
    return cache if cache is not None else past_key_values


def cache_kwarg(cache) -> dict:
    """`{name: cache}` under the installed transformers' name, for native forwards and output classes."""
    return {CACHE_NAME: cache}


def output_cache(outputs):
    """The KV cache of a native output (without 5.24's deprecation warning for the old attribute name)."""
    return getattr(outputs, CACHE_NAME, None)


def unsupported_family_error(model_type) -> ValueError:
    return ValueError(
        f"Unsupported backbone model_type {model_type!r}. Supported families: {', '.join(SUPPORTED_FAMILIES)} "
        "(transformers' native LlavaOnevision*, Qwen2VL* and InternVL* models). Convert other checkpoints to one of "
        "these first (e.g. InternVL2 remote-code checkpoints to the native `internvl` format)."
    )


@dataclass
class VisionActivations:
    """Vision-tower activations of a set of units, carried between the shared layers and an expert's layers.

    Attributes:
        hidden (`torch.Tensor`): current activations; `(num_units, seq, dim)` for tiled families, packed
            `(num_patches, dim)` for Qwen2-VL.
        taps (`dict[int, torch.Tensor]`): hidden states kept for feature selection, keyed by their index in
            `(embeddings, layer_1, ..., layer_L)`.
        unit_image (`torch.LongTensor` of shape `(num_units,)`): index of the image each unit belongs to.
        depth (`int`): how many tower layers have been applied so far.
        grid_thw (`torch.LongTensor`, Qwen2-VL only): `(num_units, 3)` patch grid per unit.
        rotary (`tuple[torch.Tensor, torch.Tensor]`, Qwen2-VL only): per-patch rotary `(cos, sin)`.
    """

    hidden: torch.Tensor
    unit_image: torch.Tensor
    taps: dict = field(default_factory=dict)
    depth: int = 0
    grid_thw: torch.Tensor | None = None
    rotary: tuple | None = None

    @property
    def num_units(self) -> int:
        return int(self.unit_image.shape[0])


@dataclass
class ImageBatch:
    """The images of one forward pass, as the backbone's processor delivered them, plus where they sit.

    Attributes:
        pixel_values: the family's `pixel_values` (tiles for LLaVA-OV / InternVL, packed patches for Qwen2-VL).
        units_per_image (`list[int]`): tiles per image (all ones for Qwen2-VL).
        extra (`dict`): family inputs needed after encoding (`image_sizes`, `image_grid_thw`, ...).
    """

    pixel_values: torch.Tensor
    units_per_image: list
    extra: dict = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.units_per_image)

    def unit_image(self, device=None) -> torch.LongTensor:
        counts = torch.tensor(self.units_per_image, dtype=torch.long, device=device)
        # `output_size`: known on the host, so no device sync, and it also runs on meta tensors (FLOPs counting).
        return torch.repeat_interleave(torch.arange(len(self.units_per_image), device=device), counts,
                                       output_size=sum(self.units_per_image))


class BackboneFamily(ABC):
    """What differs between the native VLM families, bound to one native model (`get_backbone_family(backbone)`).

    Built from a config alone (`get_backbone_family(config)`), it answers the config questions only (`used_depth`,
    `tower_hidden_size`, `has_tiles`, ...): configurations ask before any model exists.
    """

    model_type: str = ""
    #: name of the tower attribute on the backbone model
    tower_attr: str = "vision_tower"
    #: names of the image inputs this family's forward takes (listed explicitly in our forwards)
    image_input_names: tuple = ()
    #: whether units are sub-images (tiles) that can be routed one by one
    has_tiles: bool = True
    #: whether the tower has a real CLS token at position 0
    has_cls_token: bool = False

    def __init__(self, config, backbone: nn.Module | None = None):
        self.config = config
        self._backbone = backbone

    @property
    def backbone(self) -> nn.Module:
        if self._backbone is None:
            raise RuntimeError(f"This {type(self).__name__} was made from a config: bind it to a model with "
                               "`get_backbone_family(backbone)` to run it.")
        return self._backbone

    # ----------------------------------------------------------------------------------------------- config

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def vision_config(self):
        return self.config.vision_config

    @property
    def num_vision_layers(self) -> int:
        return self.vision_config.num_hidden_layers

    @property
    def tower_hidden_size(self) -> int:
        """Width of the tower's layers (router input)."""
        return self.vision_config.hidden_size

    @property
    @abstractmethod
    def feature_taps(self) -> tuple[tuple[int, ...], bool]:
        """Hidden-state indices the projector reads (0 = embeddings, i = after layer i) and whether the tower's
        final norm is applied to the last of them."""

    @property
    def used_depth(self) -> int:
        """Number of tower layers whose output reaches the LLM (layers after it are dead weight)."""
        return max(self.feature_taps[0])

    # ---------------------------------------------------------------------------------------------- modules

    def tower(self) -> nn.Module:
        return getattr(self.backbone, self.tower_attr)

    @abstractmethod
    def vision_layers(self) -> nn.ModuleList:
        """The tower's list of transformer layers."""

    def final_norm(self) -> nn.Module | None:
        return None

    def projector(self) -> nn.Module:
        return self.backbone.multi_modal_projector

    # ------------------------------------------------------------------------------------------ vision path

    def image_inputs(self, batch) -> dict:
        """The family's image inputs besides `pixel_values` (`image_sizes`, `image_grid_thw`, ...) found in `batch`."""
        return {name: batch[name] for name in self.image_input_names if name != "pixel_values" and name in batch}

    @abstractmethod
    def image_batch(self, pixel_values, input_ids=None, **image_inputs) -> ImageBatch:
        """Group the processor's image inputs into units and images."""

    @abstractmethod
    def embed(self, images: ImageBatch) -> VisionActivations:
        """Patch embedding (+ positions): the activations before the first tower layer."""

    def layer_kwargs(self, layers, acts: VisionActivations) -> dict:
        """What every tower layer takes besides the hidden states (computed once per `run_layers`)."""
        return {}

    def run_layers(self, layers, acts: VisionActivations, keep) -> VisionActivations:
        """Apply `layers` (a slice of the tower's layers, continuing at `acts.depth`), keeping hidden states whose
        index is in `keep`."""
        if len(layers) == 0:
            return acts
        kwargs = self.layer_kwargs(layers, acts)
        hidden, taps, depth = acts.hidden, dict(acts.taps), acts.depth
        for layer in layers:
            hidden = layer(hidden, **kwargs)
            depth += 1
            if depth in keep:
                taps[depth] = hidden
        return replace(acts, hidden=hidden, taps=taps, depth=depth)

    def select_units(self, acts: VisionActivations, unit_index: torch.LongTensor) -> VisionActivations:
        """The activations of a subset of units (for grouped expert dispatch)."""
        return replace(
            acts,
            hidden=acts.hidden.index_select(0, unit_index),
            taps={k: v.index_select(0, unit_index) for k, v in acts.taps.items()},
            unit_image=acts.unit_image.index_select(0, unit_index),
        )

    def unit_rows(self, acts: VisionActivations, unit_index: torch.LongTensor) -> torch.LongTensor:
        """Rows of `acts.hidden` that hold the units `unit_index` (the inverse of `select_units`)."""
        return unit_index.to(acts.hidden.device)

    @abstractmethod
    def project(self, acts, final_norm=None, projector=None) -> list[torch.Tensor]:
        """Feature selection + (final norm) + projection: one `(tokens, llm_hidden)` tensor per unit. `final_norm` /
        `projector` replace the native ones (a Mixpert expert's own)."""

    def assemble(self, unit_features: list, images: ImageBatch) -> list[torch.Tensor]:
        """Per-unit LLM tokens -> per-image LLM tokens, in the order the processor laid out the placeholders."""
        out, start = [], 0
        for count in images.units_per_image:
            out.append(torch.cat(unit_features[start : start + count], dim=0))
            start += count
        return out

    def pool(self, acts: VisionActivations, tap: int) -> torch.Tensor:
        """Global average pool of hidden state `tap` per unit: `(num_units, dim)` (Mixpert §3.3 router input)."""
        return acts.taps[tap].mean(dim=1)

    def routing_feature(self, acts: VisionActivations, images: ImageBatch, mode: str) -> torch.Tensor:
        """One vector per image for Chimera's router (§3.2): the CLS token (`mode="cls"`) or the token mean
        (`"mean"`) of the feature layer the projector reads, on the unit that shows the whole image."""
        taps, uses_norm = self.feature_taps
        hidden = acts.taps[max(taps)]
        if uses_norm and self.final_norm() is not None:
            hidden = self.final_norm()(hidden)
        hidden = hidden.index_select(0, self.overview_unit(images).to(hidden.device))
        if mode == "cls":
            if not self.has_cls_token:
                raise ValueError(f"The {self.model_type} vision tower has no CLS token: use router_feature='mean'.")
            return hidden[:, 0]
        return hidden.mean(dim=1)

    def overview_unit(self, images: ImageBatch) -> torch.LongTensor:
        """Per image, the unit that shows the whole image (LLaVA-OV's base crop, InternVL's thumbnail)."""
        counts = torch.tensor(images.units_per_image, dtype=torch.long)
        return torch.cumsum(counts, 0) - counts  # first unit of every image

    def tower_outputs(self, images: ImageBatch, output_hidden_states=False, output_attentions=False):
        """The native tower's own forward on the batch's units, for the `hidden_states` / `attentions` that
        `get_image_features` returns on request (the layer-by-layer path records neither)."""
        tower = self.tower()
        return tower(pixel_values=images.pixel_values.to(tower.dtype), output_hidden_states=output_hidden_states,
                     output_attentions=output_attentions, return_dict=True)

    def encode(self, images: ImageBatch) -> tuple[list[torch.Tensor], VisionActivations]:
        """The backbone's own image features (exactly its `get_image_features`), plus the tower activations."""
        acts = self.run_layers(self.vision_layers()[: self.used_depth], self.embed(images), keep=self.feature_taps[0])
        return self.assemble(self.project(acts), images), acts

    # ----------------------------------------------------------------------------------------- language path

    def image_features_for_backbone(self, features: list[torch.Tensor]):
        """The `pooler_output` layout the backbone's `forward(mm_encoder_outputs=...)` expects."""
        return tuple(features)

    def language_forward(self, inputs_embeds, input_ids=None, image_inputs=None, **kwargs):
        """Run the backbone's language model on `inputs_embeds` (image tokens already filled in)."""
        return self.backbone(inputs_embeds=inputs_embeds, return_dict=True, **kwargs)

    def position_ids(self, input_ids, attention_mask, image_inputs, cache=None, mm_token_type_ids=None):
        """Position ids the backbone would derive itself, or `None` where it uses plain `arange` positions. Chimera
        asks for them before GSCM zeroes parts of the attention mask, which must not move any position."""
        return None

    def generation_position_ids(self, text_positions, inputs_tensor, model_kwargs):
        return text_positions


def _tile_image_batch(pixel_values, units_per_image, extra=None) -> ImageBatch:
    if pixel_values.shape[0] != sum(units_per_image):
        raise ValueError(
            f"`pixel_values` holds {pixel_values.shape[0]} tiles but the prompt's image tokens describe "
            f"{sum(units_per_image)} ({units_per_image} per image). Build inputs with the processor that matches "
            "the model, from the same images as the text, and do not truncate image tokens."
        )
    return ImageBatch(pixel_values=pixel_values, units_per_image=list(units_per_image), extra=extra or {})


class LlavaOnevisionFamily(BackboneFamily):
    """LLaVA-OneVision: SigLIP tower (no CLS), 2-layer MLP projector, anyres tiles packed with `image_newline`."""

    model_type = "llava_onevision"
    image_input_names = ("pixel_values", "image_sizes", "batch_num_images")

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_index

    def vision_layers(self):
        return self.backbone.vision_tower.encoder.layers

    @property
    def feature_taps(self):
        # LLaVA-OV reads `hidden_states[vision_feature_layer]`, never the tower's `post_layernorm` output.
        layer = self.config.vision_feature_layer
        layers = [layer] if isinstance(layer, int) else list(layer)
        return tuple(i % (self.num_vision_layers + 1) for i in layers), False

    def image_batch(self, pixel_values, input_ids=None, image_sizes=None, batch_num_images=None, **_):
        if image_sizes is None:
            raise ValueError("LLaVA-OneVision needs `image_sizes` next to `pixel_values` (the processor returns it).")
        # Same rule as LlavaOnevisionModel.get_image_features: multi-image samples use only the base crop.
        if batch_num_images is None:
            need_patching = [True] * len(image_sizes)
        else:
            need_patching = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        units = [
            _llava_onevision().image_size_to_num_patches(
                image_size=size, grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.vision_config.image_size,
            ) if patch else 1
            for size, patch in zip(image_sizes, need_patching)
        ]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, units)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions.")
        return _tile_image_batch(pixel_values, units, {"image_sizes": image_sizes})

    def embed(self, images):
        tower = self.backbone.vision_tower
        hidden = tower.embeddings(images.pixel_values.to(tower.dtype))
        return VisionActivations(hidden=hidden, unit_image=images.unit_image(hidden.device), taps={0: hidden})

    def layer_kwargs(self, layers, acts):
        return {"attention_mask": None}  # SigLIP layers require the argument; tiles are never padded

    def project(self, acts, final_norm=None, projector=None):
        taps, _ = self.feature_taps
        projector = projector if projector is not None else self.projector()
        feature = torch.cat([acts.taps[t] for t in taps], dim=-1)
        if self.config.vision_feature_select_strategy == "default":
            feature = feature[:, 1:]
        return list(projector(feature).unbind(0))

    def assemble(self, unit_features, images):
        split, start = [], 0
        for count in images.units_per_image:
            split.append(torch.stack(unit_features[start : start + count], dim=0))
            start += count
        features, _ = self.backbone.pack_image_features(
            split, images.extra["image_sizes"], image_newline=self.backbone.image_newline,
            vision_aspect_ratio=self.config.vision_aspect_ratio,
        )
        return list(features)


class InternVLFamily(BackboneFamily):
    """InternVL (native `internvl`): InternViT tower with CLS, pixel shuffle, LN+MLP projector, dynamic tiles."""

    model_type = "internvl"
    image_input_names = ("pixel_values", "image_num_patches")
    has_cls_token = True

    def vision_layers(self):
        return self.backbone.vision_tower.encoder.layer

    @property
    def feature_taps(self):
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("InternVL supports a single integer `vision_feature_layer`.")
        # -1 reads `last_hidden_state` (after the tower's final norm); any other index reads hidden_states[i].
        return (layer % (self.num_vision_layers + 1),), layer == -1

    def final_norm(self):
        norm = self.backbone.vision_tower.layernorm
        return None if isinstance(norm, nn.Identity) else norm

    @property
    def tokens_per_tile(self) -> int:
        vc = self.vision_config
        size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        return int((size // patch) ** 2 * self.config.downsample_ratio**2)

    def image_batch(self, pixel_values, input_ids=None, image_num_patches=None, **_):
        # InternVL packs the tiles of all images into one `pixel_values`: `image_num_patches` (tiles per image) or the
        # prompt's `<img>...</img>` runs tell which tiles form an image. Without either, every row is one image, as in
        # the native `get_image_features`; the image-token count check in `forward` catches a tiled batch.
        if image_num_patches is None and input_ids is not None:
            image_num_patches = [n // self.tokens_per_tile for n in image_token_runs(input_ids, self.image_token_id)]
        if image_num_patches is None:
            image_num_patches = [1] * pixel_values.shape[0]
        return _tile_image_batch(pixel_values, [int(n) for n in image_num_patches])

    def overview_unit(self, images):
        # The thumbnail is the last tile of a tiled image (`crop_to_patches` appends it); Chimera's router reads
        # its CLS token (official `chimera_infer.py`: `cur_pixel_value[-1:]`).
        return torch.cumsum(torch.tensor(images.units_per_image, dtype=torch.long), 0) - 1

    def embed(self, images):
        hidden = self.backbone.vision_tower.embeddings(images.pixel_values.to(self.backbone.dtype))
        return VisionActivations(hidden=hidden, unit_image=images.unit_image(hidden.device), taps={0: hidden})

    def project(self, acts, final_norm=None, projector=None):
        (tap,), uses_norm = self.feature_taps
        projector = projector if projector is not None else self.projector()
        feature = acts.taps[tap]
        if uses_norm:
            feature = (final_norm if final_norm is not None else self.backbone.vision_tower.layernorm)(feature)
        if self.config.vision_feature_select_strategy == "default":
            feature = feature[:, 1:, :]
        units, tokens = feature.shape[:2]
        side = int(tokens**0.5)
        feature = self.backbone.pixel_shuffle(feature.reshape(units, side, side, -1),
                                              scale_factor=self.config.downsample_ratio)
        feature = feature.reshape(units, -1, feature.shape[-1])
        return list(projector(feature).unbind(0))

    def image_features_for_backbone(self, features):
        return torch.cat(features, dim=0)


class Qwen2VLFamily(BackboneFamily):
    """Qwen2-VL: native-resolution ViT with 2D RoPE, patches of all images packed, `merger` as projector."""

    model_type = "qwen2_vl"
    tower_attr = "visual"
    image_input_names = ("pixel_values", "image_grid_thw")
    has_tiles = False

    @property
    def num_vision_layers(self):
        return self.vision_config.depth

    @property
    def tower_hidden_size(self):
        return self.vision_config.embed_dim

    @property
    def rope_deltas(self):
        """Qwen2-VL's generation state: where the 3D positions after the images stand relative to the text positions.
        It lives on the native model, as with `Qwen2VLForConditionalGeneration`: the native forward reads it to continue
        a KV cache without `position_ids`, so a cache left by `generate` continues the same way through `forward`."""
        return getattr(self.backbone, "rope_deltas", None)

    @rope_deltas.setter
    def rope_deltas(self, value):
        self.backbone.rope_deltas = value

    def routing_feature(self, acts, images, mode):
        if mode == "cls":
            raise ValueError("Qwen2-VL's vision tower has no CLS token: use router_feature='mean'.")
        return self.pool(acts, self.used_depth)

    def vision_layers(self):
        return self.backbone.visual.blocks

    @property
    def feature_taps(self):
        return (self.num_vision_layers,), False

    def projector(self):
        return self.backbone.visual.merger

    def image_batch(self, pixel_values, input_ids=None, image_grid_thw=None, **_):
        if image_grid_thw is None:
            raise ValueError("Qwen2-VL needs `image_grid_thw` next to `pixel_values` (the processor returns it).")
        patches = int(image_grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != patches:
            raise ValueError(
                f"`pixel_values` holds {pixel_values.shape[0]} patches but `image_grid_thw` describes {patches}."
            )
        return ImageBatch(pixel_values=pixel_values, units_per_image=[1] * len(image_grid_thw),
                          extra={"image_grid_thw": image_grid_thw})

    def embed(self, images):
        visual = self.backbone.visual
        grid_thw = images.extra["image_grid_thw"]
        hidden = visual.patch_embed(images.pixel_values.type(visual.dtype))
        # `.to`: the grid may sit on the host while the tower does not (a meta-device FLOPs count).
        positions = get_vision_position_ids(grid_thw, visual.spatial_merge_size).to(hidden.device)
        rotary = visual.rotary_pos_emb(hidden, positions)
        return VisionActivations(
            hidden=hidden, unit_image=images.unit_image(hidden.device), taps={0: hidden}, grid_thw=grid_thw,
            rotary=rotary,
        )

    def layer_kwargs(self, layers, acts):
        # The packed units' sequence boundaries, once for all layers (as `Qwen2VisionTransformerPretrainedModel`).
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(acts.grid_thw, layers[0].attn.config)
        return {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen, "position_embeddings": acts.rotary}

    def _patch_index(self, acts, unit_index):
        """Indices of the packed patches of the units `unit_index`, in that order."""
        # Computed where the grid is (the model's device, or the host for a meta-device FLOPs count), then moved.
        device = acts.grid_thw.device
        lengths = acts.grid_thw.prod(-1)
        starts = torch.cumsum(lengths, 0) - lengths
        unit_index = unit_index.to(device)
        chosen = lengths[unit_index]
        offsets = torch.arange(int(chosen.sum()), device=device) - torch.repeat_interleave(
            torch.cumsum(chosen, 0) - chosen, chosen
        )
        return (torch.repeat_interleave(starts[unit_index], chosen) + offsets).to(acts.hidden.device)

    def select_units(self, acts, unit_index):
        patches = self._patch_index(acts, unit_index)
        return replace(
            acts,
            hidden=acts.hidden.index_select(0, patches),
            taps={k: v.index_select(0, patches) for k, v in acts.taps.items()},
            unit_image=acts.unit_image.index_select(0, unit_index),
            grid_thw=acts.grid_thw.index_select(0, unit_index.to(acts.grid_thw.device)),
            rotary=tuple(r.index_select(0, patches) for r in acts.rotary),
        )

    def tower_outputs(self, images, output_hidden_states=False, output_attentions=False):
        visual = self.backbone.visual
        return visual(images.pixel_values.type(visual.dtype), grid_thw=images.extra["image_grid_thw"],
                      output_hidden_states=output_hidden_states, output_attentions=output_attentions, return_dict=True)

    def unit_rows(self, acts, unit_index):
        return self._patch_index(acts, unit_index)

    def pool(self, acts, tap):
        patches = torch.split(acts.taps[tap], acts.grid_thw.prod(-1).tolist())
        return torch.stack([t.mean(dim=0) for t in patches])

    def project(self, acts, final_norm=None, projector=None):
        (tap,), _ = self.feature_taps
        projector = projector if projector is not None else self.projector()
        merged = projector(acts.taps[tap])
        merge = self.backbone.visual.spatial_merge_size**2
        return list(torch.split(merged, (acts.grid_thw.prod(-1) // merge).tolist()))

    def language_forward(self, inputs_embeds, input_ids=None, image_inputs=None, **kwargs):
        # Qwen2VLModel computes 3D RoPE positions from `input_ids` + `mm_token_type_ids` + `image_grid_thw`; with
        # `inputs_embeds` given it embeds nothing itself, and without `pixel_values` it encodes nothing.
        return self.backbone(input_ids=input_ids, inputs_embeds=inputs_embeds,
                             image_grid_thw=(image_inputs or {}).get("image_grid_thw"), return_dict=True, **kwargs)

    def position_ids(self, input_ids, attention_mask, image_inputs, cache=None, mm_token_type_ids=None):
        return self.backbone.compute_3d_position_ids(
            input_ids=input_ids, inputs_embeds=None, image_grid_thw=(image_inputs or {}).get("image_grid_thw"),
            attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids, **cache_kwarg(cache),
        )

    def generation_position_ids(self, text_positions, inputs_tensor, model_kwargs):
        # Mirrors Qwen2VLForConditionalGeneration._prepare_position_ids_for_generation: [text; t; h; w] rows, or text
        # positions shifted by the stored `rope_deltas` when continuing a cache without new vision tokens.
        cache = model_kwargs.get(CACHE_NAME)
        past_length = cache.get_seq_length() if cache is not None else 0
        mm_types = model_kwargs.get("mm_token_type_ids")
        new_vision = mm_types is not None and bool(mm_types[:, past_length:].any())
        if past_length and self.rope_deltas is not None and not new_vision:
            return text_positions[None, ...] + self.rope_deltas
        ids = model_kwargs.get("input_ids")
        ids = ids if ids is not None and ids.shape[1] > 0 else inputs_tensor
        is_ids = ids is not None and ids.dim() == 2 and ids.dtype in (torch.int, torch.long)
        grid = model_kwargs.get("image_grid_thw")
        if is_ids and mm_types is not None and grid is not None:
            vision_positions, self.rope_deltas = self.backbone.get_rope_index(
                ids, mm_token_type_ids=mm_types, image_grid_thw=grid, attention_mask=model_kwargs.get("attention_mask"),
            )
        else:
            vision_positions = text_positions.unsqueeze(0).expand(3, -1, -1)
            self.rope_deltas = torch.zeros(text_positions.shape[0], 1, dtype=torch.long, device=text_positions.device)
        return torch.cat([text_positions[None], vision_positions], dim=0)


def _llava_onevision():
    # Read off transformers' lazy module when first needed: importing it at the top would import the whole modeling
    # stack into every configuration that imports this file.
    return transformers.models.llava_onevision.modeling_llava_onevision


_FAMILIES = {cls.model_type: cls for cls in (LlavaOnevisionFamily, Qwen2VLFamily, InternVLFamily)}


def get_backbone_family(backbone_or_config) -> BackboneFamily:
    """The adapter of a native VLM's family: bound to `backbone_or_config` when it is the native model
    (`LlavaOnevisionModel` / `Qwen2VLModel` / `InternVLModel`), answering config questions only when it is a config.
    A clear error naming the supported families otherwise."""
    is_model = isinstance(backbone_or_config, nn.Module)
    config = backbone_or_config.config if is_model else backbone_or_config
    model_type = getattr(config, "model_type", config)
    if model_type not in _FAMILIES:
        raise unsupported_family_error(model_type)
    return _FAMILIES[model_type](config, backbone_or_config if is_model else None)


# --------------------------------------------------------------------------------------------------- helpers


def image_token_runs(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """Lengths of the maximal runs of `image_token_id` in `input_ids`, row-major (one run per image for families
    that bracket each image with start/end tokens)."""
    runs = []
    for row in (input_ids == image_token_id).tolist():
        length = 0
        for is_image in row:
            if is_image:
                length += 1
            elif length:
                runs.append(length)
                length = 0
        if length:
            runs.append(length)
    return runs


def check_image_token_count(n_tokens: int, features: list[torch.Tensor], what: str = "image") -> None:
    """The error every family raises when the prompt's placeholders and the encoded images disagree."""
    n_features = sum(int(f.shape[0]) for f in features)
    if n_tokens != n_features:
        raise ValueError(
            f"The prompt holds {n_tokens} {what} tokens but the images encode to {n_features} "
            f"({[int(f.shape[0]) for f in features]} per image). Build `input_ids` and the image inputs with the "
            "same processor call, from the same images, and do not truncate (`truncation=False`, or a `max_length` "
            "long enough for every image token)."
        )


def image_token_spans(input_ids: torch.Tensor, image_token_id: int, counts: list[int]) -> list[tuple[int, int, int]]:
    """`(row, first_col, last_col)` of every image's tokens, in the order `masked_scatter` fills them."""
    mask = input_ids == image_token_id
    check_image_token_count(int(mask.sum()), [torch.empty(c, 0) for c in counts])
    flat = mask.flatten().nonzero().squeeze(-1)
    seq_len = input_ids.shape[1]
    spans, start = [], 0
    for count in counts:
        first, last = int(flat[start]), int(flat[start + count - 1])
        row = first // seq_len
        if last // seq_len != row:
            raise ValueError(
                "One image's tokens run across two samples of the batch: the image inputs do not match `input_ids`."
            )
        spans.append((row, first % seq_len, last % seq_len))
        start += count
    return spans


def placeholder_mask(inputs_embeds: torch.Tensor, embedding: nn.Module, token_id: int) -> torch.BoolTensor:
    """Where `inputs_embeds` holds `token_id`'s own embedding: how the native VLMs find image placeholders when they
    are given embeddings instead of ids. `(batch, seq)`."""
    token = embedding(torch.tensor(token_id, device=inputs_embeds.device)).to(inputs_embeds.dtype)
    return (inputs_embeds == token).all(-1)


def placeholder_ids(inputs_embeds: torch.Tensor, embedding: nn.Module, token_ids, fill: int) -> torch.LongTensor:
    """Token ids recovered from a prompt given as embeddings: each of `token_ids` where the embedding is that token's
    own, `fill` elsewhere. Enough to place image (and expert) tokens; the values stay those of `inputs_embeds`."""
    ids = torch.full(inputs_embeds.shape[:2], fill, dtype=torch.long, device=inputs_embeds.device)
    for token in token_ids:
        ids = ids.masked_fill(placeholder_mask(inputs_embeds, embedding, token), token)
    return ids
