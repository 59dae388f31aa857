# Copyright 2026 The Chimera/Mixpert HF port authors. Licensed under the Apache License, Version 2.0.
"""Mixpert: a mixture of vision experts inside one VLM's vision tower (arXiv 2505.24541).

`MixpertForConditionalGeneration.model` is a `MixpertModel` holding

* `backbone` — the unchanged native VLM (`LlavaOnevisionModel` / `Qwen2VLModel` / `InternVLModel`). Its vision tower's
  first `D - K` layers are *shared*; its last `K` layers, final norm and projector are the *versatile* expert;
* `vision_experts[domain]` — per domain, a copy of those last `K` layers (+ the final norm where the family applies
  one, + the projector when `config.expert_projector`), fine-tuned on that domain alone (Mixpert §3.2, disentangled
  tuning);
* `vision_router` — a 2-layer MLP on the global-average-pooled output of the shared layers (Mixpert §3.3),

and `lm_head` is the base model's LM head. Every image (or, with `routing_granularity="sub_image"`, every tile) goes
through exactly one expert: the shared layers run once for the batch, then each used expert runs once on the images
routed to it. The LLM sees the same number of image tokens as the base model, so the only extra activated cost is
the router.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForImageTextToText, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
    ModelOutput,
)
from transformers.utils.generic import can_return_tuple


try:
    from .configuration_mixpert import ROUTING_STRATEGIES, MixpertConfig
    from .vlm_backbones import (
        HubCheckpointMixin,
        placeholder_ids,
        passthrough_generate_kwargs,
        image_rows_from_prompt,
        cache_kwarg,
        output_cache,
        take_cache,
        check_image_token_count,
        get_backbone_family,
        repeat_images_for_generation,
        check_config_kwargs,
        no_split_layer_classes,
        check_finite_pixels,
        check_text_inputs,
        integer_labels,
        lm_and_router_loss,
    )
except ImportError:
    from configuration_mixpert import ROUTING_STRATEGIES, MixpertConfig
    from vlm_backbones import (
        HubCheckpointMixin,
        placeholder_ids,
        passthrough_generate_kwargs,
        image_rows_from_prompt,
        cache_kwarg,
        output_cache,
        take_cache,
        check_image_token_count,
        get_backbone_family,
        repeat_images_for_generation,
        check_config_kwargs,
        no_split_layer_classes,
        check_finite_pixels,
        check_text_inputs,
        integer_labels,
        lm_and_router_loss,
    )


# ------------------------------------------------------------------------------------------------------- outputs


@dataclass
class MixpertImageFeatures(BaseModelOutputWithPooling):
    r"""
    What Mixpert's vision side gives for one batch: transformers' VLM contract for `get_image_features` (a
    `BaseModelOutputWithPooling`) plus the routing.

    last_hidden_state (`torch.FloatTensor`): tower activations after the last layer the projector reads, each unit
        through the expert it was routed to: `(num_tiles, tokens, vision_hidden)` (Qwen2-VL: packed patches).
    pooler_output (`tuple[torch.FloatTensor]`): per image, its LLM tokens `(n_i, llm_hidden)`; also readable as
        `image_features`.
    hidden_states (`tuple[torch.FloatTensor]`, *optional*): on request, the embeddings and every layer's output up
        to that layer, shared layers then each unit's expert layers.
    router_logits (`torch.FloatTensor` of shape `(num_routed, num_domains)`): one row per image (`"image"`
        granularity) or per tile (`"sub_image"`).
    expert_index (`torch.LongTensor` of shape `(num_routed,)`): expert used per row, 0 = versatile, k = k-th domain.
    routed_image (`torch.LongTensor` of shape `(num_routed,)`): the image each row belongs to.
    image_rows (`torch.LongTensor`, *optional*): batch row of each image (set by `generate`, for beam search).
    """

    router_logits: torch.FloatTensor | None = None
    expert_index: torch.LongTensor | None = None
    routed_image: torch.LongTensor | None = None
    image_rows: torch.LongTensor | None = None

    @property
    def image_features(self) -> tuple | None:
        return self.pooler_output


@dataclass
class MixpertModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`): LLM output.
    cache, hidden_states, attentions: as the base model returns them (the cache field is inherited from
        `BaseModelOutputWithPast`: `past_key_values` before transformers 5.24, `cache` from 5.24).
    router_logits (`torch.FloatTensor` of shape `(num_routed, num_domains)`, *optional*): router scores.
    expert_index (`torch.LongTensor` of shape `(num_routed,)`, *optional*): 0 = versatile, k = k-th domain.
    routed_image (`torch.LongTensor` of shape `(num_routed,)`, *optional*): image of each routed row.
    """

    router_logits: torch.FloatTensor | None = None
    expert_index: torch.LongTensor | None = None
    routed_image: torch.LongTensor | None = None


@dataclass
class MixpertCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor`, *optional*): `lm_loss + router_loss_weight * router_loss` (router part rescaled under
        Trainer's `num_items_in_batch`, as in Chimera).
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`).
    cache, hidden_states, attentions: as in `MixpertModelOutputWithPast`.
    lm_loss, router_loss (`torch.FloatTensor`, *optional*): the two parts (router: mean over labelled rows, unweighted).
    router_logits, expert_index, routed_image: as in `MixpertModelOutputWithPast`.
    """

    lm_loss: torch.FloatTensor | None = None
    router_loss: torch.FloatTensor | None = None
    router_logits: torch.FloatTensor | None = None
    expert_index: torch.LongTensor | None = None
    routed_image: torch.LongTensor | None = None


# ------------------------------------------------------------------------------------------------------ modules


class MixpertVisionExpert(nn.Module):
    """One domain expert: its own last `K` tower layers, final norm (when the family applies one) and projector."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module | None = None, projector: nn.Module | None = None):
        super().__init__()
        self.layers = layers
        self.norm = norm
        self.projector = projector

    @classmethod
    def copy_from_backbone(cls, family, backbone, config: MixpertConfig) -> "MixpertVisionExpert":
        """Deep copies of the versatile expert's modules (Mixpert §3.2: experts start from the joint model)."""
        layers, norm, projector = versatile_modules(family, backbone, config)
        expert = cls(
            layers=copy.deepcopy(layers),
            norm=copy.deepcopy(norm) if norm is not None else None,
            projector=copy.deepcopy(projector) if config.expert_projector else None,
        )
        # A deep copy also copies each layer's `config`; point the copies back at the tower's own config so that
        # `set_attn_implementation` / `attn_implementation=` (set on the registered sub-configs) reach the experts.
        for original, copied in ((layers, expert.layers), (norm, expert.norm), (projector, expert.projector)):
            if original is not None and copied is not None:
                for source, target in zip(original.modules(), copied.modules()):
                    if hasattr(source, "config") and hasattr(target, "config"):
                        target.config = source.config
        return expert


def versatile_modules(family, backbone, config: MixpertConfig):
    """The base model's own last `K` layers, final norm (or None) and projector."""
    depth = family.used_depth(config.base_config)
    layers = family.vision_layers(backbone)[depth - config.num_expert_layers : depth]
    _, uses_norm = family.feature_taps(config.base_config)
    norm = family.final_norm(backbone) if uses_norm else None
    return layers, norm, family.projector(backbone)


class MixpertRouter(nn.Module):
    """Mixpert §3.3: a 2-layer MLP (GELU in between) over the global-average-pooled shared-layer features; its softmax
    scores one class per domain."""

    def __init__(self, in_features: int, hidden_size: int, num_domains: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_size, num_domains)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(pooled)))


def route(probabilities: torch.Tensor, strategy: str, threshold: float) -> torch.LongTensor:
    """Expert per row from router probabilities `(rows, num_domains)`: 0 = versatile, k = k-th domain (Mixpert §3.3).

    * `direct`: the top domain.
    * `score_threshold`: the top domain if its probability is at least `threshold` (λ), else versatile.
    * `score_difference` (eq. 2): the top domain if top-1 minus top-2 probability is at least `threshold` (τ), else
      versatile: an image two domains compete for goes to the expert that saw all domains.
    """
    top = probabilities.topk(min(2, probabilities.shape[-1]), dim=-1)
    choice = top.indices[:, 0] + 1
    if strategy == "direct":
        return choice
    if strategy == "score_threshold":
        confident = top.values[:, 0] >= threshold
    elif strategy == "score_difference":
        second = top.values[:, 1] if probabilities.shape[-1] > 1 else torch.zeros_like(top.values[:, 0])
        confident = (top.values[:, 0] - second) >= threshold
    else:
        raise ValueError(f"Unknown routing strategy {strategy!r}.")
    return torch.where(confident, choice, torch.zeros_like(choice))


# ------------------------------------------------------------------------------------------------------- models


class MixpertPreTrainedModel(HubCheckpointMixin, PreTrainedModel):
    config: MixpertConfig
    config_class = MixpertConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _no_split_modules = []
    # The router is small and trained from scratch: in bf16 most of its updates would round away, so it is loaded and
    # kept in fp32 whatever `dtype` the rest of the model takes (its input is cast to its dtype in `forward`).
    _keep_in_fp32_modules_strict = ["vision_router"]
    _auto_map = {
        "AutoConfig": "configuration_mixpert.MixpertConfig",
        "AutoModel": "modeling_mixpert.MixpertForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_mixpert.MixpertForConditionalGeneration",
    }


class MixpertModel(MixpertPreTrainedModel):
    """The base VLM with per-domain vision experts and a vision router (no LM head)."""

    def __init__(self, config: MixpertConfig):
        super().__init__(config)
        self.family = get_backbone_family(config.base_config.model_type)
        self.backbone = AutoModel.from_config(config.base_config)
        self.vision_experts = nn.ModuleDict(
            {d: MixpertVisionExpert.copy_from_backbone(self.family, self.backbone, config) for d in config.domains}
        )
        self.vision_router = MixpertRouter(
            self.family.tower_hidden_size(config.base_config), config.router_hidden_size, config.num_domains
        )
        self.post_init()
        self._no_split_modules = no_split_layer_classes(self, self._no_split_modules)  # classes it has

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    @property
    def get_rope_index(self):
        """Qwen2-VL's 3D RoPE position function of the backbone (absent for the other families, so `hasattr` tells
        whether the model uses 3D positions, as on the native models)."""
        return self.backbone.get_rope_index

    def set_input_embeddings(self, value):
        self.backbone.set_input_embeddings(value)

    @property
    def domains(self) -> list[str]:
        return self.config.domains

    @property
    def image_token_id(self) -> int:
        return self.family.image_token_id(self.backbone.config)

    def expert_modules(self, index: int):
        """`(layers, norm, projector)` of expert `index` (0 = versatile = the base model's own modules)."""
        layers, norm, projector = versatile_modules(self.family, self.backbone, self.config)
        if index == 0:
            return layers, norm, projector
        expert = self.vision_experts[self.domains[index - 1]]
        return (
            expert.layers,
            expert.norm if expert.norm is not None else norm,
            expert.projector if expert.projector is not None else projector,
        )

    def _validate_expert_labels(self, expert_labels, num_images):
        if expert_labels is None:
            return None
        labels = integer_labels(expert_labels)
        if labels.numel() != num_images:
            raise ValueError(
                f"`expert_labels` must hold one label per image ({num_images} images in this batch), got "
                f"{labels.numel()}. Use 0 for the versatile expert, k for the k-th domain ({self.domains}), -100 to "
                "let the router decide."
            )
        bad = (labels != -100) & ((labels < 0) | (labels > self.config.num_domains))
        if bad.any():
            raise ValueError(
                f"`expert_labels` out of range: {labels[bad].tolist()}. Valid: 0 (versatile), 1..{self.config.num_domains} "
                f"for {self.domains}, or -100 (unlabelled)."
            )
        return labels

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        expert_labels: torch.LongTensor | None = None,
        expert_index: torch.LongTensor | None = None,
        routing_strategy: str | None = None,
        routing_threshold: float | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        image_num_patches: torch.Tensor | None = None,
        **kwargs,
    ) -> MixpertImageFeatures:
        """Shared layers once, router, then each used expert once on the units routed to it.

        The expert of each image (tile) is `expert_index` when given, else its label (`expert_labels`, 0 = versatile,
        -100 = unlabelled), else the router's decision under `routing_strategy` / `routing_threshold` (default: the
        config's). InternVL groups tiles by `image_num_patches` (or `input_ids`, as a keyword); without either every
        row of `pixel_values` is one image, as in the native `get_image_features`. Attention weights are not
        recorded: the tower runs layer by layer to dispatch units between experts.
        """
        # `input_ids` and `output_hidden_states` are read from **kwargs on purpose: `GenerationMixin` pops every named
        # parameter of `get_image_features` from the generation kwargs, and must not take them away from `generate`
        # (as in the native models, whose flags travel in `**kwargs`).
        input_ids = kwargs.pop("input_ids", None)
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        family, config, backbone = self.family, self.config, self.backbone
        check_finite_pixels(pixel_values)
        images = family.image_batch(
            backbone.config, pixel_values, input_ids=input_ids, image_sizes=image_sizes,
            batch_num_images=batch_num_images, image_grid_thw=image_grid_thw, image_num_patches=image_num_patches,
        )
        taps, _ = family.feature_taps(backbone.config)
        depth = family.used_depth(backbone.config)
        shared_depth = depth - config.num_expert_layers
        keep = set(taps) | ({*range(depth + 1)} if output_hidden_states else set())
        acts = family.embed(backbone, images)
        acts = family.run_layers(family.vision_layers(backbone)[:shared_depth], acts, keep=keep | {shared_depth})

        # Router input: global average pool of the shared output, per tile, then per image over its tiles (all tiles
        # of a family have the same token count, so the mean of tile means is the mean over all the image's tokens).
        pooled = family.pool(acts, shared_depth)  # (units, tower_hidden)
        unit_image = acts.unit_image
        if config.routing_granularity == "image":
            sums = torch.zeros(images.num_images, pooled.shape[-1], dtype=pooled.dtype, device=pooled.device)
            counts = torch.bincount(unit_image, minlength=images.num_images).clamp(min=1).unsqueeze(-1)
            pooled = sums.index_add(0, unit_image, pooled) / counts.to(pooled.dtype)
            routed_image = torch.arange(images.num_images, device=pooled.device)
        else:
            routed_image = unit_image
        router_logits = self.vision_router(pooled.to(self.vision_router.fc1.weight.dtype))

        labels = self._validate_expert_labels(expert_labels, images.num_images)
        if expert_index is None:
            strategy = routing_strategy or config.routing_strategy
            threshold = config.routing_threshold if routing_threshold is None else float(routing_threshold)
            if strategy not in ROUTING_STRATEGIES:
                raise ValueError(f"`routing_strategy` must be one of {ROUTING_STRATEGIES}, got {strategy!r}.")
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"`routing_threshold` must be in [0, 1] (a probability or a difference of two), got "
                                 f"{threshold}.")
            expert_index = route(router_logits.float().softmax(-1), strategy, threshold)
            if labels is not None:
                row_labels = labels.to(expert_index.device)[routed_image]
                expert_index = torch.where(row_labels == -100, expert_index, row_labels)
        unit_expert = expert_index if config.routing_granularity == "sub_image" else expert_index[unit_image]

        # Grouped dispatch: one pass per used expert over the units routed to it.
        used = torch.unique(unit_expert).tolist()
        unit_features = [None] * acts.num_units
        expert_states = {i: torch.empty_like(acts.hidden) for i in keep | {depth} if i > shared_depth}
        for index in used:
            units = (unit_expert == index).nonzero().squeeze(-1)
            layers, norm, projector = self.expert_modules(index)
            group = acts if len(used) == 1 else family.select_units(acts, units)  # no copy when one expert takes all
            group = family.run_layers(layers, group, keep=keep)
            rows = family.unit_rows(acts, units)
            for i, states in expert_states.items():  # `.to`: an expert trained in fp32 inside a bf16 model
                states[rows] = (group.hidden if i == depth else group.taps[i]).to(states.dtype)
            for unit, features in zip(units.tolist(), family.project(backbone, group, backbone.config, norm, projector)):
                unit_features[unit] = features
        hidden_states = None
        if output_hidden_states:
            hidden_states = tuple(acts.taps[i] if i <= shared_depth else expert_states[i] for i in range(depth + 1))
        return MixpertImageFeatures(
            last_hidden_state=expert_states[depth] if depth in expert_states else acts.hidden,
            pooler_output=tuple(family.assemble(backbone, unit_features, images)),
            hidden_states=hidden_states,
            router_logits=router_logits,
            expert_index=expert_index,
            routed_image=routed_image,
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        expert_labels: torch.LongTensor | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        image_num_patches: torch.Tensor | None = None,
        routing_strategy: str | None = None,
        routing_threshold: float | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> MixpertModelOutputWithPast:
        cache = take_cache(past_key_values, kwargs)
        features = (mm_encoder_outputs or {}).get("image")
        if features is None and pixel_values is not None:
            # Placeholders group InternVL's tiles into images: read them off `inputs_embeds` when no ids are given.
            ids = input_ids if input_ids is not None or inputs_embeds is None else placeholder_ids(
                inputs_embeds, self.get_input_embeddings(), [self.image_token_id], -1)
            features = self.get_image_features(
                pixel_values, input_ids=ids, expert_labels=expert_labels, image_sizes=image_sizes,
                batch_num_images=batch_num_images, image_grid_thw=image_grid_thw, image_num_patches=image_num_patches,
                routing_strategy=routing_strategy, routing_threshold=routing_threshold, output_hidden_states=False,
                return_dict=True,
            )
        backbone_kwargs = {}
        if features is not None:
            if input_ids is not None:
                check_image_token_count(int((input_ids == self.image_token_id).sum()), list(features.image_features))
            backbone_kwargs["mm_encoder_outputs"] = {
                "image": BaseModelOutputWithPooling(
                    pooler_output=self.family.image_features_for_backbone(list(features.image_features))
                )
            }
        if mm_token_type_ids is not None:
            backbone_kwargs["mm_token_type_ids"] = mm_token_type_ids
        if image_grid_thw is not None:
            backbone_kwargs["image_grid_thw"] = image_grid_thw
        outputs = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
            use_cache=use_cache, return_dict=True, **cache_kwarg(cache), **backbone_kwargs, **kwargs,
        )
        return MixpertModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **cache_kwarg(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=features.router_logits if features is not None else None,
            expert_index=features.expert_index if features is not None else None,
            routed_image=features.routed_image if features is not None else None,
        )


class MixpertForConditionalGeneration(MixpertPreTrainedModel, GenerationMixin):
    """Mixpert with the base model's LM head."""

    _tied_weights_keys = {"lm_head.weight": "model.backbone.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # as the native VLMs: shard the head with the tied embedding

    def __init__(self, config: MixpertConfig):
        super().__init__(config)
        self.model = MixpertModel(config)
        text_config = config.get_text_config()
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @property
    def domains(self) -> list[str]:
        return self.config.domains

    def get_image_features(self, pixel_values, **kwargs) -> MixpertImageFeatures:
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        expert_labels: torch.LongTensor | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        image_num_patches: torch.Tensor | None = None,
        routing_strategy: str | None = None,
        routing_threshold: float | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MixpertCausalLMOutputWithPast:
        r"""
        expert_labels (`torch.LongTensor` of shape `(num_images,)`, *optional*):
            Per image: 0 = versatile expert, k = k-th domain expert, -100 = let the router decide. Labelled images use
            that expert, and images labelled with a domain add the router's cross-entropy (the versatile expert is not
            a router class). With `routing_granularity="sub_image"` every tile takes its image's label.
        routing_strategy (`str`, *optional*), routing_threshold (`float`, *optional*):
            This call's routing rule instead of the config's (`generate` takes them too): `"direct"`,
            `"score_threshold"` or `"score_difference"`, and λ / τ in [0, 1] (Mixpert §3.3).
        """
        labels = check_text_inputs(input_ids, inputs_embeds, labels)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=take_cache(past_key_values, kwargs), inputs_embeds=inputs_embeds, expert_labels=expert_labels,
            return_dict=True,
            image_sizes=image_sizes, batch_num_images=batch_num_images, image_grid_thw=image_grid_thw,
            image_num_patches=image_num_patches, routing_strategy=routing_strategy, routing_threshold=routing_threshold,
            mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=mm_encoder_outputs, use_cache=use_cache, **kwargs,
        )
        hidden = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, slice_indices, :])
        targets = None
        if expert_labels is not None and outputs.router_logits is not None:
            image_labels = torch.as_tensor(expert_labels).long().reshape(-1).to(outputs.router_logits.device)
            row_labels = image_labels[outputs.routed_image]
            # Domain k is router class k - 1; the versatile expert (0) and unlabelled rows (-100) have no target.
            targets = torch.where(row_labels >= 1, row_labels - 1, torch.full_like(row_labels, -100))
        loss, lm_loss, router_loss = lm_and_router_loss(
            self, logits, labels, outputs.router_logits, targets, num_items_in_batch, shift_labels
        )
        return MixpertCausalLMOutputWithPast(
            loss=loss, lm_loss=lm_loss, router_loss=router_loss, logits=logits,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions, router_logits=outputs.router_logits,
            expert_index=outputs.expert_index, routed_image=outputs.routed_image, **cache_kwarg(output_cache(outputs)),
        )

    # ------------------------------------------------------------------------------------------------ generation

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        text_positions = super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        return self.model.family.generation_position_ids(self.model.backbone, text_positions, inputs_tensor, model_kwargs)

    def _expand_multimodal_outputs(self, input_ids, mm_encoder_output, expand_size=1, inputs_embeds=None):
        features = mm_encoder_output.get("image")
        if not isinstance(features, MixpertImageFeatures):
            return super()._expand_multimodal_outputs(input_ids, mm_encoder_output, expand_size, inputs_embeds)
        if features.image_rows is None:  # encoded by `GenerationMixin` itself (a prompt given as embeddings)
            features.image_rows = image_rows_from_prompt(
                input_ids, inputs_embeds, self.get_input_embeddings(), self.model.image_token_id,
                [int(f.shape[0]) for f in features.pooler_output],
            )
        order, rows = repeat_images_for_generation(features.image_rows, expand_size)
        mm_encoder_output["image"] = MixpertImageFeatures(
            pooler_output=tuple(features.pooler_output[i] for i in order),
            image_rows=torch.tensor(rows, device=features.image_rows.device),
        )
        return mm_encoder_output

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
        """`GenerationMixin.generate`, with the images routed and encoded once before decoding (so beam search and
        `num_return_sequences` repeat whole images, tiles included). With `return_dict_in_generate=True` the output
        also carries `expert_index` and `router_logits`. Pass `expert_labels` to force experts."""
        image_kwargs = {name: kwargs.pop(name, None) for name in (
            "expert_labels", "image_sizes", "batch_num_images", "image_num_patches", "routing_strategy",
            "routing_threshold")}
        inputs_embeds = kwargs.pop("inputs_embeds", None)
        prompt_ids = input_ids
        if prompt_ids is None and inputs_embeds is not None and pixel_values is not None:
            prompt_ids = placeholder_ids(inputs_embeds, self.get_input_embeddings(), [self.model.image_token_id], -1)
        if pixel_values is None or prompt_ids is None:
            routing = {k: image_kwargs.pop(k) for k in ("routing_strategy", "routing_threshold")}
            if pixel_values is not None and any(v is not None for v in routing.values()):
                # `GenerationMixin` encodes the images itself here: it would not pass a routing override on.
                raise ValueError("`routing_strategy` / `routing_threshold` need `input_ids` (or `inputs_embeds`) with "
                                 "the images; set `model.config.routing_strategy` instead.")
            return super().generate(**passthrough_generate_kwargs(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                inputs_embeds=inputs_embeds, **image_kwargs,
            ), **kwargs)
        # The prompt's placeholders group InternVL's tiles into images and give each image's batch row.
        features = self.model.get_image_features(
            pixel_values, input_ids=prompt_ids, image_grid_thw=kwargs.get("image_grid_thw"), return_dict=True,
            **image_kwargs
        )
        features.image_rows = image_rows_from_prompt(
            prompt_ids, None, None, self.model.image_token_id, [int(f.shape[0]) for f in features.pooler_output]
        )
        output = super().generate(**passthrough_generate_kwargs(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
        ), mm_encoder_outputs={"image": features}, **kwargs)
        if not isinstance(output, torch.Tensor):
            output["expert_index"] = features.expert_index
            output["router_logits"] = features.router_logits
        return output

    # ------------------------------------------------------------------------------------------------- assembly

    @classmethod
    def from_base(
        cls,
        base,
        domains=("chart", "document", "math", "ocr", "general"),
        num_expert_layers: int = 2,
        dtype: torch.dtype | None = None,
        **config_kwargs,
    ) -> "MixpertForConditionalGeneration":
        """Upcycle a native VLM into Mixpert (Mixpert §3.2).

        Args:
            base: a native LLaVA-OneVision / Qwen2-VL / InternVL `...ForConditionalGeneration` object, or a path / Hub
                repo id of one (safetensors only). Its modules are reused (not copied) as the shared layers, the
                versatile expert and the LLM.
            domains: the domain experts, in order (expert `k` = `domains[k-1]`).
            num_expert_layers: `K`, the last vision layers each expert owns (paper: 2).
            **config_kwargs: the other `MixpertConfig` fields (routing strategy, threshold, granularity...).

        Every domain expert starts as an exact copy of the versatile one, so right after upcycling every routing
        decision gives the base model's outputs.
        """
        from transformers.initialization import no_init_weights

        check_config_kwargs(MixpertConfig, config_kwargs, "MixpertForConditionalGeneration.from_base")
        if isinstance(base, str):
            base = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype, use_safetensors=True)
        if not hasattr(base, "lm_head") or not hasattr(base, "model"):
            raise ValueError(
                f"`base` must be a native `...ForConditionalGeneration` model (with `.model` and `.lm_head`), got "
                f"{type(base).__name__}."
            )
        family = get_backbone_family(base.config.model_type)
        config = MixpertConfig(
            base_config=base.config, domains=list(domains), num_expert_layers=num_expert_layers, **config_kwargs
        )
        with torch.device("meta"), no_init_weights():
            model = cls(config)
        model.model.backbone = base.model
        model.lm_head = base.lm_head
        for domain in config.domains:
            model.model.vision_experts[domain] = MixpertVisionExpert.copy_from_backbone(family, base.model, config)
        reference = next(base.parameters())
        router = model.model.vision_router
        router.to_empty(device=reference.device)
        for module in router.modules():
            model._init_weights(module)
        router.to(torch.float32)  # `_keep_in_fp32_modules_strict`: the router stays fp32 in every dtype
        model.generation_config = base.generation_config
        return model.train(base.training)

    # ---------------------------------------------------------------------------------------------- accounting

    def parameter_counts(self) -> dict:
        """Parameter accounting in the style of Mixpert Table 6.

        Returns a dict with `total`, `base` (what the upcycled model had), `added_by_experts` (the domain experts'
        copies), `router`, `activated` (parameters one image, or one tile, actually runs through: the shared layers,
        one expert, the LLM and the router) and `added_activated` (`activated - base`: the router).
        """
        total = sum(p.numel() for p in self.parameters())
        experts = sum(p.numel() for p in self.model.vision_experts.parameters())
        router = sum(p.numel() for p in self.model.vision_router.parameters())
        base = total - experts - router
        return {
            "total": total,
            "base": base,
            "added_by_experts": experts,
            "router": router,
            "activated": base + router,
            "added_activated": router,
        }


MixpertForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "MixpertPreTrainedModel",
    "MixpertModel",
    "MixpertForConditionalGeneration",
    "MixpertImageFeatures",
    "MixpertModelOutputWithPast",
    "MixpertCausalLMOutputWithPast",
    "route",
]
