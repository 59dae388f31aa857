# Copyright 2026 The Chimera/Mixpert HF port authors. Licensed under the Apache License, Version 2.0.
"""Mixpert: a mixture of vision experts inside one VLM's vision tower (arXiv 2505.24541).

`MixpertForConditionalGeneration.model` is a `MixpertModel` holding

* `backbone` — the unchanged native VLM (`LlavaOnevisionModel` / `Qwen2VLModel` / `InternVLModel`). Its vision tower's
  first `D - K` layers are *shared*; its last `K` layers, final norm and projector are the *versatile* expert;
* `vision_experts[domain]` — per domain, a copy of those last `K` layers (+ the final norm where the family applies
  one, + the projector when `config.expert_projector`), fine-tuned on that domain alone (Mixpert §3.2, disentangled
  tuning); with `config.expert_adapter="lora"` (not in the paper) a LoRA update of them instead, the versatile
  matrices shared (`MixpertLoraMirror`);
* `vision_router` — a 2-layer MLP on the global-average-pooled output of the shared layers (Mixpert §3.3),

and `lm_head` is the base model's LM head. Every image (or, with `routing_granularity="sub_image"`, every tile) goes
through exactly one expert: the shared layers run once for the batch, then each used expert runs once on the images
routed to it. The LLM sees the same number of image tokens as the base model, so the only extra activated cost is
the router.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel, GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import logging
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
        ImageBatch,
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
        ImageBatch,
        cache_kwarg,
        check_image_token_count,
        output_cache,
        placeholder_ids,
        take_cache,
    )


logger = logging.get_logger(__name__)


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


class MixpertLoraLinear(nn.Module):
    """A LoRA expert's update of one shared `nn.Linear` (LoRA, Hu et al. 2021, arXiv 2106.09685): the expert runs the
    layer with `W + scaling * lora_B @ lora_A`, `W` the versatile weight (not copied). PEFT's initialisation: `lora_A`
    Kaiming-uniform, `lora_B` zeros, so the update is exactly 0 at creation. `bias` is the expert's own copy of the
    layer's bias (None without one)."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        like = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, **like))
        self.lora_B = nn.Parameter(torch.empty(linear.out_features, rank, **like))
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT's `LoraLayer.reset_lora_parameters`
        nn.init.zeros_(self.lora_B)

    def merged_weight(self, weight: torch.Tensor, scaling: float) -> torch.Tensor:
        """`weight + scaling * B @ A`, summed in the wider of the two dtypes (fp32 LoRA master weights over a bf16
        `W` round once), returned in `W`'s dtype and on `W`'s device. The update is moved to `W`'s device: under an
        accelerate `device_map` the expert and the versatile layer may sit on different devices, and the expert's
        weights are never moved by accelerate's hooks (the mirror runs no forward of its own). Autograd reaches
        `lora_A` / `lora_B` through the move."""
        delta = (self.lora_B @ self.lora_A) * scaling
        dtype = torch.promote_types(weight.dtype, delta.dtype)
        return (weight.to(dtype) + delta.to(weight.device, dtype)).to(weight.dtype)


class MixpertLoraMirror(nn.Module):
    """A LoRA expert's part for one versatile module (a layer, the final norm, the projector), laid out as that module
    is: a `MixpertLoraLinear` where it has an `nn.Linear`, and its own trainable copy of every other parameter (norm
    scales and shifts, InternViT's layer scales: vectors). Copying the vectors costs under 0.1% of a full copy at
    LLaVA-OneVision-7B's shape and lets each domain re-tune its normalisation and biases (as BitFit, Ben Zaken et al.
    2022), which low-rank matrices alone cannot; the matrices are what a full copy spends its parameters on. Its
    state-dict keys read like the module's: `layers.0.self_attn.q_proj.lora_A`, `layers.0.layer_norm1.weight`.
    """

    def __init__(self, source: nn.Module, rank: int):
        super().__init__()
        for name, param in source.named_parameters(recurse=False):
            self.register_parameter(name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
        for name, child in source.named_children():
            if isinstance(child, nn.Linear):
                self.add_module(name, MixpertLoraLinear(child, rank))
            elif next(child.parameters(), None) is not None:
                self.add_module(name, MixpertLoraMirror(child, rank))

    def parameters_for(self, source: nn.Module, scaling: float, prefix: str = "") -> dict:
        """Every parameter of `source` (by its name there) as this expert computes it, for `functional_call`: on the
        device and in the dtype of `source`'s own (see `MixpertLoraLinear.merged_weight`)."""
        out = {}
        for name, param in source.named_parameters(recurse=False):
            out[prefix + name] = getattr(self, name).to(param.device, param.dtype)
        for name, child in source.named_children():
            part = self._modules.get(name)
            if isinstance(part, MixpertLoraLinear):
                out[f"{prefix}{name}.weight"] = part.merged_weight(child.weight, scaling)
                if part.bias is not None:
                    out[f"{prefix}{name}.bias"] = part.bias.to(child.bias.device, child.bias.dtype)
            elif part is not None:
                out.update(part.parameters_for(child, scaling, f"{prefix}{name}."))
        return out


class _LoraBound:
    """A versatile module run as a LoRA expert: calling it calls the module through `torch.func.functional_call` with
    the expert's parameters (`MixpertLoraMirror.parameters_for`), so the module's own forward and buffers compute the
    expert and nothing is copied. Not an `nn.Module`: it is built per pass and must not register the versatile module
    a second time. Other attributes read through to the module (Qwen2-VL's dispatch reads `layers[0].attn.config`)."""

    def __init__(self, module: nn.Module, mirror: MixpertLoraMirror, scaling: float):
        self.module, self.mirror, self.scaling = module, mirror, scaling

    def __getattr__(self, name):
        return getattr(self.__dict__["module"], name)

    def _call(self, *args, **kwargs):
        return torch.func.functional_call(self.module, self.mirror.parameters_for(self.module, self.scaling), args,
                                          kwargs)

    def _call_unchecked(self, *args, **kwargs):
        module = self.module
        module.gradient_checkpointing = False
        try:
            return self._call(*args, **kwargs)
        finally:
            module.gradient_checkpointing = True

    def __call__(self, *args, **kwargs):
        module = self.module
        if getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled():
            # A checkpointed layer recomputes its forward during backward, after `functional_call` has put `W` back:
            # it would recompute with the versatile weights. Checkpoint the merge and the call as one function
            # instead (non-reentrant: the frozen shared features need no grad), the layer's own checkpointing off.
            return checkpoint(self._call_unchecked, *args, use_reentrant=False, **kwargs)
        return self._call(*args, **kwargs)


class MixpertVisionExpert(nn.Module):
    """One domain expert: its own last `K` tower layers, final norm (when the family applies one) and projector, as
    full copies (`lora_scaling=None`), or as `MixpertLoraMirror`s of the versatile ones (`expert_adapter="lora"`:
    low-rank updates of the versatile matrices, scaled by `lora_scaling = alpha / r`)."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module | None = None, projector: nn.Module | None = None,
                 lora_scaling: float | None = None):
        super().__init__()
        self.layers = layers
        self.norm = norm
        self.projector = projector
        self.lora_scaling = lora_scaling

    @classmethod
    def from_backbone(cls, family, config: MixpertConfig) -> "MixpertVisionExpert":
        """A new expert equal to the versatile one, of the config's `expert_adapter` kind."""
        if config.expert_adapter == "lora":
            return cls.lora_from_backbone(family, config)
        return cls.copy_from_backbone(family, config)

    @classmethod
    def lora_from_backbone(cls, family, config: MixpertConfig) -> "MixpertVisionExpert":
        """LoRA experts (not in the paper): low-rank updates of the versatile modules, zero at creation (B = 0)."""
        layers, norm, projector = versatile_modules(family, config)
        rank = config.expert_lora_rank
        sources = {**{f"layers.{i}": layer for i, layer in enumerate(layers)}, "norm": norm,
                   "projector": projector if config.expert_projector else None}
        wasteful = sorted(f"{key}.{name}" for key, module in sources.items() if module is not None
                          for name, sub in module.named_modules() if isinstance(sub, nn.Linear)
                          and rank > min(sub.in_features, sub.out_features))
        if wasteful:
            logger.warning_once(
                f"expert_lora_rank={rank} exceeds min(in, out) of {wasteful[:5]}{'...' if len(wasteful) > 5 else ''}: "
                "their low-rank update cannot use that rank and its extra parameters are wasted. Lower the rank.")
        return cls(
            layers=nn.ModuleList(MixpertLoraMirror(layer, rank) for layer in layers),
            norm=MixpertLoraMirror(norm, rank) if norm is not None else None,
            projector=MixpertLoraMirror(projector, rank) if config.expert_projector else None,
            lora_scaling=config.expert_lora_alpha / rank,
        )

    def bind(self, layers, norm, projector):
        """`(layers, norm, projector)` that compute this expert, given the versatile ones (which it replaces: a full
        copy's own modules, or the versatile modules run with this expert's LoRA weights)."""
        if self.lora_scaling is None:
            return (self.layers, self.norm if self.norm is not None else norm,
                    self.projector if self.projector is not None else projector)
        scaling = self.lora_scaling
        return (
            [_LoraBound(layer, mirror, scaling) for layer, mirror in zip(layers, self.layers)],
            _LoraBound(norm, self.norm, scaling) if self.norm is not None else norm,
            _LoraBound(projector, self.projector, scaling) if self.projector is not None else projector,
        )

    def added_activated_parameters(self) -> int:
        """Parameters this expert adds to an image's path beyond the versatile expert's: 0 for a full copy (it
        replaces them), the LoRA matrices for a LoRA expert (its vector copies replace the versatile ones)."""
        return sum(m.lora_A.numel() + m.lora_B.numel() for m in self.modules() if isinstance(m, MixpertLoraLinear))

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
    """The base model's own last `K` layers, final norm (or None) and projector.

    `K = 0` gives an empty `ModuleList`: the expert is then only what turns the tower output into LLM tokens. The
    final norm (where the family applies one after the last used layer) always goes with the projector, whatever `K`:
    it acts on the features the projector reads, after the last shared layer, so sharing it would leave an expert's
    tokens depending on weights outside the expert. `K = D` gives every used layer; the patch embedding stays shared.
    """
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


class _FlopsProbe(nn.Module):
    """One image's vision path through a Mixpert (`path="mixpert"`: shared layers, router, domain expert 1) or through
    its base model (`path="base"`: the native tower and projector), returning its LLM tokens; `path="llm"`: the LLM over
    those tokens and the LM head on the last one. For `FlopCounterMode`: a wrapper so that `torch.func.functional_call`
    can run it with every weight swapped for a meta tensor of the same shape (no arithmetic, no copy of the model,
    whatever device it is on)."""

    def __init__(self, model):
        super().__init__()
        self.model = model  # a MixpertForConditionalGeneration

    def forward(self, inputs, path: str) -> torch.Tensor:
        inner = self.model.model
        family = inner.family
        taps, _ = family.feature_taps
        if path == "base":
            acts = family.run_layers(family.vision_layers()[: family.used_depth], family.embed(inputs), keep=taps)
            return family.project(acts)[0]
        if path == "mixpert":
            acts = inner._shared_layers(inputs, set(taps))
            pooled, _ = inner._pooled(acts, inputs)
            inner.vision_router(pooled.to(inner.vision_router.fc1.weight.dtype))
            # A CPU index: the dispatch reads which experts are used on the host, which a meta tensor cannot tell.
            return inner._dispatch(acts, torch.ones(1, dtype=torch.long), set(taps), False)[2][0]
        language_model = inner.backbone.language_model
        # A ready 4D mask (values unused on meta): transformers' mask builder would read data (padding checks).
        mask = torch.zeros(1, 1, inputs.shape[0], inputs.shape[0], dtype=language_model.dtype, device=inputs.device)
        hidden = language_model(inputs_embeds=inputs[None].to(language_model.dtype), attention_mask=mask,
                                use_cache=False).last_hidden_state
        return self.model.lm_head(hidden[:, -1:])


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
        config.check_fields()  # `from_pretrained`'s keyword overrides are set after the config's `__post_init__`
        super().__init__(config)
        self.backbone = AutoModel.from_config(config.base_config)
        self.vision_experts = nn.ModuleDict(
            {d: MixpertVisionExpert.from_backbone(self.family, config) for d in config.domains}
        )
        self.vision_router = MixpertRouter(
            self.family.tower_hidden_size, config.router_hidden_size, config.num_domains
        )
        self.finish_init()

    @property
    def shared_depth(self) -> int:
        """How many tower layers every image shares (the used depth `D` minus the experts' `K`): from `D` (`K = 0`,
        projector-only experts) down to 0 (`K = D`, only the patch embedding is shared)."""
        return self.family.used_depth - self.config.num_expert_layers

    def expert_modules(self, index: int):
        """`(layers, norm, projector)` of expert `index` (0 = versatile = the base model's own modules)."""
        layers, norm, projector = versatile_modules(self.family, self.config)
        if index == 0:
            return layers, norm, projector
        return self.vision_experts[self.domains[index - 1]].bind(layers, norm, projector)

    # -- routing (Mixpert §3.3)

    def _shared_layers(self, images, keep: set):
        """Patch embedding and the shared layers, keeping hidden states `keep` and the shared output (hidden state
        `shared_depth`: the embedding output itself when `K = D`)."""
        family = self.family
        return family.run_layers(family.vision_layers()[: self.shared_depth], family.embed(images),
                                 keep=keep | {self.shared_depth})

    def _pooled(self, acts, images):
        """The router's input: the global average pool of the shared output per routed row, and each row's image.
        With `K = D` the shared output is the patch embedding's (+ positions): the router then sees no transformer
        layer, the only input every expert shares (Mixpert §3.3 pools "the shared layers' output")."""
        pooled = self.family.pool(acts, self.shared_depth)  # (units, tower_hidden)
        if self.config.routing_granularity != "image":
            return pooled, acts.unit_image
        # Per image, the mean over its tiles (all tiles of a family have the same token count, so the mean of tile
        # means is the mean over all the image's tokens).
        # The tile counts are known on the host: no device sync, and the pool also runs on meta tensors (FLOPs).
        sums = torch.zeros(images.num_images, pooled.shape[-1], dtype=pooled.dtype, device=pooled.device)
        counts = torch.tensor(images.units_per_image, dtype=pooled.dtype, device=pooled.device).clamp(min=1)
        pooled = sums.index_add(0, acts.unit_image, pooled) / counts.unsqueeze(-1)
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
        also carries `expert_index`, `router_logits` and `routed_image` (the image of each routing decision). Pass
        `expert_labels` to force experts."""
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
            num_expert_layers: `K`, the last vision layers each expert owns (paper: 2), `0 <= K <= D` (`D`: the tower
                layers whose output reaches the LLM). `K = 0`: experts own only the projector (+ the final norm where
                the family applies one); `K = D`: every used layer, the router then pools the patch embedding's output.
            **config_kwargs: the other `MixpertConfig` fields (routing strategy, threshold, granularity...;
                `expert_adapter="lora"`, `expert_lora_rank`, `expert_lora_alpha` for low-rank experts).

        Every domain expert starts as an exact copy of the versatile one (a LoRA expert: a zero update, `B = 0`), so
        right after upcycling every routing decision gives the base model's outputs.
        """
        check_config_kwargs(MixpertConfig, config_kwargs, "MixpertForConditionalGeneration.from_base")
        base = cls.load_native(base, dtype, "base")
        config = MixpertConfig(
            base_config=base.config, domains=list(domains), num_expert_layers=num_expert_layers, **config_kwargs
        )
        model = cls.around_native(config, base)  # reuses the base model's modules
        for domain in config.domains:
            model.model.vision_experts[domain] = MixpertVisionExpert.from_backbone(model.model.family, config)
        model.materialise([model.model.vision_router], next(base.parameters()))  # fp32 (`_keep_in_fp32_modules_strict`)
        return model.train(base.training)

    # ---------------------------------------------------------------------------------------------- accounting

    def parameter_counts(self, image_size: int | None = None, flops: bool = True) -> dict:
        """Parameter accounting in the style of Mixpert Table 6.

        Returns a dict with `total`, `base` (what the upcycled model had), `added_by_experts` (the domain experts'
        copies; LoRA experts: their LoRA matrices and vector copies), `router`, `activated` (parameters one image, or
        one tile, actually runs through: the shared layers, one expert, the LLM and the router; a full-copy expert
        replaces the versatile modules, a LoRA expert adds its matrices, counted for the largest expert) and
        `added_activated` (`activated - base`: the router, + those LoRA matrices), plus the FLOPs of
        one image, `flops_per_image`, `base_flops_per_image` and `added_flops_per_image` (see `flops_per_image`,
        which `image_size` is passed to). `image_size` is checked before anything is counted (a `ValueError` names the
        sizes the family takes); the default size is always one it takes. `flops=False` returns the parameter counts
        alone, without running the FLOPs count (`image_size` must then stay unset).
        """
        if flops:
            images = self._flops_images(image_size)  # a bad size fails here, before any counting
        elif image_size is not None:
            raise ValueError("`image_size` only applies to the FLOPs count: drop it or pass `flops=True`.")
        total = sum(p.numel() for p in self.parameters())
        experts = sum(p.numel() for p in self.model.vision_experts.parameters())
        router = sum(p.numel() for p in self.model.vision_router.parameters())
        base = total - experts - router
        lora = max((e.added_activated_parameters() for e in self.model.vision_experts.values()), default=0)
        counts = {
            "total": total,
            "base": base,
            "added_by_experts": experts,
            "router": router,
            "activated": base + router + lora,
            "added_activated": router + lora,
        }
        return {**counts, **self._count_flops(images)} if flops else counts

    def _flops_size_rule(self) -> tuple[int, str, int, str]:
        """`(default, rule, size, allowed)`: the default `image_size` of `flops_per_image`, the sizes it takes (`rule`
        "equal" / "multiple" / "at_least" of `size`) and those in words.

        * LLaVA-OneVision: SigLIP adds a fixed table of position embeddings (no interpolation), so only the tower's
          `image_size` (one anyres crop).
        * InternVL: InternViT interpolates its positions, but the pixel shuffle needs the patch grid's side times
          `downsample_ratio` to be whole: multiples of `patch_size / downsample_ratio` (28 at patch 14, ratio 0.5);
          default the tower's `image_size`.
        * Qwen2-VL: any size of at least one merged block (`patch_size * spatial_merge_size`, 28), rounded down to
          whole blocks; default 448 (or one block where a block is larger).
        """
        family = self.model.family
        vision = family.vision_config
        if not family.has_tiles:
            block = vision.patch_size * vision.spatial_merge_size
            return max(448, block), "at_least", block, f"an integer of at least {block} (one merged block)"
        native = _first(vision.image_size)
        if family.model_type == "llava_onevision":
            return native, "equal", native, f"{native} (the tower's `image_size`: SigLIP's position table is fixed)"
        step = _first(vision.patch_size) * Fraction(self.config.base_config.downsample_ratio).limit_denominator(
            64).denominator
        return native, "multiple", step, (f"a positive multiple of {step} (`patch_size / downsample_ratio`: the pixel "
                                          "shuffle needs a whole number of merged patches per side)")

    def _flops_images(self, image_size: int | None) -> ImageBatch:
        """One image on the meta device for `flops_per_image`, after checking `image_size` (`_flops_size_rule`)."""
        family = self.model.family
        vision = family.vision_config
        default, rule, step, allowed = self._flops_size_rule()
        size = default if image_size is None else image_size
        valid = not isinstance(size, bool) and isinstance(size, int) and size >= 1 and (
            size == step if rule == "equal" else size % step == 0 if rule == "multiple" else size >= step)
        if not valid:
            raise ValueError(f"`image_size` of the FLOPs count of a Mixpert on {family.model_type} must be {allowed}; "
                             f"got {image_size!r}.")
        if family.has_tiles:
            pixels = torch.empty(1, vision.num_channels, size, size, device="meta")
            return ImageBatch(pixel_values=pixels, units_per_image=[1])
        # Qwen2-VL: packed patches of `temporal_patch_size` frames, a grid of whole merged blocks (rounded down)
        side = size // step * vision.spatial_merge_size
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.empty(side * side, width, device="meta")
        return ImageBatch(pixel_values=pixels, units_per_image=[1],
                          extra={"image_grid_thw": torch.tensor([[1, side, side]])})

    def flops_per_image(self, image_size: int | None = None) -> dict:
        """FLOPs of one image, counted from the modules by `torch.utils.flop_counter.FlopCounterMode` (Mixpert Table 6).

        One image is one unit at the tower's native size: a single `image_size` x `image_size` tile for LLaVA-OneVision
        and InternVL (default: the tower's `image_size`, so no anyres / dynamic-tile crops), and an `image_size`-pixel
        square for Qwen2-VL (default 448, rounded down to whole merged patches). A size the family cannot take raises a
        `ValueError` naming the sizes it takes. The count covers the path the image
        takes at inference: the patch embedding, the vision layers, the projector, the LLM over that image's tokens
        alone (no text, no KV cache) and the LM head on the last token (a prefill under `generate`). As
        `FlopCounterMode` counts, these are the FLOPs of matrix products, convolutions and attention (2 per
        multiply-add; attention in full, causal or not); norms, activations, softmax and pooling are not counted.

        Returns `flops_per_image` (Mixpert: shared layers, router, one domain expert, LLM), `base_flops_per_image` (the
        base model's own path) and `added_flops_per_image` (their difference: the router's two linear layers, plus
        whatever a domain expert computes beyond the versatile one: for LoRA experts, the merge `B @ A` of every
        adapted weight, done once per expert pass and so shared by the images of a batch). Every weight is swapped
        for a meta tensor of its shape while counting (`torch.func.functional_call`): no arithmetic runs and nothing
        is copied, at any size.
        """
        return self._count_flops(self._flops_images(image_size))

    def _count_flops(self, images: ImageBatch) -> dict:
        probe = _FlopsProbe(self)
        meta = {name: torch.empty_like(t, device="meta") for name, t in (*probe.named_parameters(),
                                                                          *probe.named_buffers())}
        flops, llm = {}, {}
        for path in ("mixpert", "base"):
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                tokens = torch.func.functional_call(probe, meta, (images, path))
            if tokens.shape[0] not in llm:  # the LLM's cost depends on the token count alone: counted once per count
                with torch.no_grad(), FlopCounterMode(display=False) as llm_counter:
                    torch.func.functional_call(probe, meta, (tokens, "llm"))
                llm[tokens.shape[0]] = llm_counter.get_total_flops()
            flops[path] = counter.get_total_flops() + llm[tokens.shape[0]]
        return {
            "flops_per_image": flops["mixpert"],
            "base_flops_per_image": flops["base"],
            "added_flops_per_image": flops["mixpert"] - flops["base"],
        }


def _first(size) -> int:
    """A config's image / patch size given as an int or as `[height, width]`."""
    return int(size[0] if isinstance(size, (list, tuple)) else size)


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
