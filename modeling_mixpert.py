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
from transformers import AutoModel, GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils.generic import can_return_tuple


try:  # loaded as part of a Hub repo through `trust_remote_code` (relative imports) ...
    from .configuration_mixpert import ROUTING_STRATEGIES, MixpertConfig
    from .modeling_routed_vlm import (
        RoutedCausalLMOutputWithPast,
        RoutedImageFeatures,
        RoutedModelOutputWithPast,
        RoutedVLMForConditionalGeneration,
        RoutedVLMModel,
        RoutedVLMPreTrainedModel,
        check_config_kwargs,
        check_finite_pixels,
        check_text_inputs,
        image_rows_from_prompt,
        passthrough_generate_kwargs,
        teacher_forced,
    )
    from .vlm_backbones import (
        cache_kwarg,
        check_image_token_count,
        output_cache,
        placeholder_ids,
        take_cache,
    )
except ImportError:  # ... or as an installed top-level module (`pip install -e .`)
    from configuration_mixpert import ROUTING_STRATEGIES, MixpertConfig
    from modeling_routed_vlm import (
        RoutedCausalLMOutputWithPast,
        RoutedImageFeatures,
        RoutedModelOutputWithPast,
        RoutedVLMForConditionalGeneration,
        RoutedVLMModel,
        RoutedVLMPreTrainedModel,
        check_config_kwargs,
        check_finite_pixels,
        check_text_inputs,
        image_rows_from_prompt,
        passthrough_generate_kwargs,
        teacher_forced,
    )
    from vlm_backbones import (
        cache_kwarg,
        check_image_token_count,
        output_cache,
        placeholder_ids,
        take_cache,
    )


# ------------------------------------------------------------------------------------------------------- outputs


@dataclass
class MixpertImageFeatures(RoutedImageFeatures):
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
    image_rows (`torch.LongTensor`, *optional*): batch row of each image (set by `generate`, for beam search).
    routed_image (`torch.LongTensor` of shape `(num_routed,)`): the image each row belongs to.
    """

    routed_image: torch.LongTensor | None = None

    @property
    def image_features(self) -> tuple | None:
        return self.pooler_output


@dataclass
class MixpertModelOutputWithPast(RoutedModelOutputWithPast):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`): LLM output.
    cache, hidden_states, attentions: as the base model returns them (the cache field is inherited from
        `BaseModelOutputWithPast`: `past_key_values` before transformers 5.24, `cache` from 5.24).
    router_logits (`torch.FloatTensor` of shape `(num_routed, num_domains)`, *optional*): router scores.
    expert_index (`torch.LongTensor` of shape `(num_routed,)`, *optional*): 0 = versatile, k = k-th domain.
    routed_image (`torch.LongTensor` of shape `(num_routed,)`, *optional*): image of each routed row.
    """

    routed_image: torch.LongTensor | None = None


@dataclass
class MixpertCausalLMOutputWithPast(RoutedCausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor`, *optional*): `lm_loss + router_loss_weight * router_loss` (router part rescaled under
        Trainer's `num_items_in_batch`, as in Chimera).
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`).
    cache, hidden_states, attentions: as in `MixpertModelOutputWithPast`.
    lm_loss, router_loss (`torch.FloatTensor`, *optional*): the two parts (router: mean over labelled rows, unweighted).
    router_logits, expert_index, routed_image: as in `MixpertModelOutputWithPast`.
    """

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
    def copy_from_backbone(cls, family, config: MixpertConfig) -> "MixpertVisionExpert":
        """Deep copies of the versatile expert's modules (Mixpert §3.2: experts start from the joint model)."""
        layers, norm, projector = versatile_modules(family, config)
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


def versatile_modules(family, config: MixpertConfig):
    """The base model's own last `K` layers, final norm (or None) and projector."""
    depth = family.used_depth
    layers = family.vision_layers()[depth - config.num_expert_layers : depth]
    _, uses_norm = family.feature_taps
    return layers, family.final_norm() if uses_norm else None, family.projector()


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


class MixpertPreTrainedModel(RoutedVLMPreTrainedModel):
    config: MixpertConfig
    config_class = MixpertConfig
    # The router is small and trained from scratch: in bf16 most of its updates would round away, so it is loaded and
    # kept in fp32 whatever `dtype` the rest of the model takes (its input is cast to its dtype in `forward`).
    _keep_in_fp32_modules_strict = ["vision_router"]
    _auto_map = {
        "AutoConfig": "configuration_mixpert.MixpertConfig",
        "AutoModel": "modeling_mixpert.MixpertForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_mixpert.MixpertForConditionalGeneration",
    }


class MixpertModel(RoutedVLMModel, MixpertPreTrainedModel):
    """The base VLM with per-domain vision experts and a vision router (no LM head)."""

    native_attr = "backbone"
    zero_label = "the versatile expert"

    def __init__(self, config: MixpertConfig):
        super().__init__(config)
        self.backbone = AutoModel.from_config(config.base_config)
        self.vision_experts = nn.ModuleDict(
            {d: MixpertVisionExpert.copy_from_backbone(self.family, config) for d in config.domains}
        )
        self.vision_router = MixpertRouter(
            self.family.tower_hidden_size, config.router_hidden_size, config.num_domains
        )
        self.finish_init()

    @property
    def shared_depth(self) -> int:
        """How many tower layers every image shares (the used depth `D` minus the experts' `K`)."""
        return self.family.used_depth - self.config.num_expert_layers

    def expert_modules(self, index: int):
        """`(layers, norm, projector)` of expert `index` (0 = versatile = the base model's own modules)."""
        layers, norm, projector = versatile_modules(self.family, self.config)
        if index == 0:
            return layers, norm, projector
        expert = self.vision_experts[self.domains[index - 1]]
        return (
            expert.layers,
            expert.norm if expert.norm is not None else norm,
            expert.projector if expert.projector is not None else projector,
        )

    # -- routing (Mixpert §3.3)

    def _shared_layers(self, images, keep: set):
        """Patch embedding and the shared layers, keeping hidden states `keep` and the shared output."""
        family = self.family
        return family.run_layers(family.vision_layers()[: self.shared_depth], family.embed(images),
                                 keep=keep | {self.shared_depth})

    def _pooled(self, acts, images):
        """The router's input: the global average pool of the shared output per routed row, and each row's image."""
        pooled = self.family.pool(acts, self.shared_depth)  # (units, tower_hidden)
        if self.config.routing_granularity != "image":
            return pooled, acts.unit_image
        # Per image, the mean over its tiles (all tiles of a family have the same token count, so the mean of tile
        # means is the mean over all the image's tokens).
        sums = torch.zeros(images.num_images, pooled.shape[-1], dtype=pooled.dtype, device=pooled.device)
        counts = torch.bincount(acts.unit_image, minlength=images.num_images).clamp(min=1).unsqueeze(-1)
        pooled = sums.index_add(0, acts.unit_image, pooled) / counts.to(pooled.dtype)
        return pooled, torch.arange(images.num_images, device=pooled.device)

    def router_inputs(self, pixel_values, input_ids=None, **image_inputs):
        """The router's input and the image of each routed row: `(rows, tower_hidden)` pooled shared-layer features and
        `(rows,)` image indices, a row per image (or per tile with `routing_granularity="sub_image"`). The shared
        layers are frozen while the router trains, so the router phase of `train.mixpert` caches these."""
        images = self.family.image_batch(pixel_values, input_ids=input_ids, **image_inputs)
        return self._pooled(self._shared_layers(images, set()), images)

    def choose_experts(self, router_logits, expert_labels=None, routing_strategy=None, routing_threshold=None):
        """The expert of each routed row (0 = versatile): its label where `expert_labels` (one per row, -100 =
        unlabelled) has one, else the routing rule of this call or of the config applied to the router's
        probabilities (`route`)."""
        strategy = routing_strategy or self.config.routing_strategy
        threshold = self.config.routing_threshold if routing_threshold is None else float(routing_threshold)
        if strategy not in ROUTING_STRATEGIES:
            raise ValueError(f"`routing_strategy` must be one of {ROUTING_STRATEGIES}, got {strategy!r}.")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`routing_threshold` must be in [0, 1] (a probability or a difference of two), got "
                             f"{threshold}.")
        return teacher_forced(route(router_logits.float().softmax(-1), strategy, threshold), expert_labels)

    def _dispatch(self, acts, unit_expert, keep: set, output_hidden_states: bool):
        """Grouped dispatch: one pass per used expert over the units routed to it. Returns the last tower states,
        the hidden states on request, and each unit's LLM tokens."""
        family = self.family
        depth, shared_depth = family.used_depth, self.shared_depth
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
            for unit, features in zip(units.tolist(), family.project(group, norm, projector)):
                unit_features[unit] = features
        hidden_states = None
        if output_hidden_states:
            hidden_states = tuple(acts.taps[i] if i <= shared_depth else expert_states[i] for i in range(depth + 1))
        return expert_states.get(depth, acts.hidden), hidden_states, unit_features

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
        family = self.family
        check_finite_pixels(pixel_values)
        images = family.image_batch(
            pixel_values, input_ids=input_ids, image_sizes=image_sizes,
            batch_num_images=batch_num_images, image_grid_thw=image_grid_thw, image_num_patches=image_num_patches,
        )
        taps, _ = family.feature_taps
        keep = set(taps) | ({*range(family.used_depth + 1)} if output_hidden_states else set())
        acts = self._shared_layers(images, keep)
        pooled, routed_image = self._pooled(acts, images)
        router_logits = self.vision_router(pooled.to(self.vision_router.fc1.weight.dtype))
        labels = self._validate_expert_labels(expert_labels, images.num_images)
        if expert_index is None:
            row_labels = labels.to(routed_image.device)[routed_image] if labels is not None else None
            expert_index = self.choose_experts(router_logits, row_labels, routing_strategy, routing_threshold)
        unit_expert = expert_index if self.config.routing_granularity == "sub_image" else expert_index[acts.unit_image]
        last_hidden, hidden_states, unit_features = self._dispatch(acts, unit_expert, keep, output_hidden_states)
        return MixpertImageFeatures(
            last_hidden_state=last_hidden,
            pooler_output=tuple(family.assemble(unit_features, images)),
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



class MixpertForConditionalGeneration(RoutedVLMForConditionalGeneration, MixpertPreTrainedModel, GenerationMixin):
    """Mixpert with the base model's LM head."""

    model_class = MixpertModel
    output_class = MixpertCausalLMOutputWithPast
    _tied_weights_keys = {"lm_head.weight": "model.backbone.language_model.embed_tokens.weight"}

    def router_targets(self, expert_labels, outputs) -> torch.LongTensor | None:
        """Per routed row, its image's domain as a router class: domain k is class k - 1; the versatile expert (0)
        and unlabelled rows (-100) have no target (the versatile expert is the router's fallback, not a class)."""
        if expert_labels is None or outputs.router_logits is None:
            return None
        image_labels = torch.as_tensor(expert_labels).long().reshape(-1).to(outputs.router_logits.device)
        row_labels = image_labels[outputs.routed_image]
        return torch.where(row_labels >= 1, row_labels - 1, torch.full_like(row_labels, -100))

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
        loss_kwargs = self.pop_loss_kwargs(kwargs)
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=take_cache(past_key_values, kwargs), inputs_embeds=inputs_embeds, return_dict=True,
            expert_labels=expert_labels, image_sizes=image_sizes, batch_num_images=batch_num_images,
            image_grid_thw=image_grid_thw, image_num_patches=image_num_patches, routing_strategy=routing_strategy,
            routing_threshold=routing_threshold, mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=mm_encoder_outputs, use_cache=use_cache, **kwargs,
        )
        return self.logits_and_loss(outputs, labels, expert_labels, logits_to_keep, loss_kwargs)

    # ------------------------------------------------------------------------------------------------ generation

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
        return self.with_routing(output, features)

    # ------------------------------------------------------------------------------------------------- assembly

    @classmethod
    def from_base(
        cls,
        base,
        domains=("chart", "document", "math", "ocr", "general"),
        num_expert_layers: int = 2,
        dtype: torch.dtype | None = None,
        **config_kwargs,
    ) -> MixpertForConditionalGeneration:
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
        check_config_kwargs(MixpertConfig, config_kwargs, "MixpertForConditionalGeneration.from_base")
        base = cls.load_native(base, dtype, "base")
        config = MixpertConfig(
            base_config=base.config, domains=list(domains), num_expert_layers=num_expert_layers, **config_kwargs
        )
        model = cls.around_native(config, base)  # reuses the base model's modules
        for domain in config.domains:
            model.model.vision_experts[domain] = MixpertVisionExpert.copy_from_backbone(model.model.family, config)
        model.materialise([model.model.vision_router], next(base.parameters()))  # fp32 (`_keep_in_fp32_modules_strict`)
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
