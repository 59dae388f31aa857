# Copyright 2026 The Chimera/Mixpert HF port authors. Licensed under the Apache License, Version 2.0.
"""Chimera: a generalist VLM that borrows domain skill from frozen expert vision encoders (arXiv 2412.05983).

Layout (transformers' LLaVA convention): `ChimeraForConditionalGeneration.model` is a `ChimeraModel` holding

* `generalist` — the unchanged native backbone (`LlavaOnevisionModel` / `Qwen2VLModel` / `InternVLModel`),
* `router` — `Linear(vision_hidden, N_e + 1, bias=False)` on the generalist encoder's CLS/mean feature (§3.2),
* `expert_encoders[domain]` — frozen expert vision encoders (CLIP, SigLIP, Pix2Struct, GOT-OCR2, ...),
* `expert_projectors[domain]` — LayerNorm -> Linear -> GELU -> Linear into the LLM width (§3.2),

and `lm_head` is the generalist's LM head.

Expert tokens. When image `i` is routed to expert `k`, the expert's `n_k` tokens go right after the image's
generalist tokens (optionally wrapped in start/end tokens and placed after the image-end token, to match the
official checkpoints), as `n_k` copies of `config.expert_token_ids[k-1]` filled with the expert's features.
Users never write these tokens:

* `forward` given *compact* `input_ids` (what the processor produces) routes, inserts the expert tokens, runs the
  LLM, and returns `last_hidden_state` / `logits` aligned with the caller's `input_ids` (position `t` still predicts
  token `t + 1`), so `labels`, Trainer and TRL's DPO work unchanged;
* `generate` routes *before* the decoding loop, decodes on the expanded prompt (KV cache consistent), and returns
  `prompt + new tokens` without the inserted tokens, so `out[:, inputs.input_ids.shape[1]:]` is the answer;
* `forward` given `input_ids` that already hold expert tokens uses them as they are (the expert is read off the
  tokens) — what `generate` feeds, and what analyses of the expanded sequence use.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, GenerationMixin
from transformers.activations import ACT2FN
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple


try:  # loaded as part of a Hub repo through `trust_remote_code` (relative imports) ...
    from .configuration_chimera import ChimeraConfig, ChimeraExpertConfig
    from .expert_encoders import get_expert_family, load_expert_encoder
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
        passthrough_generate_kwargs,
        teacher_forced,
    )
    from .vlm_backbones import (
        cache_kwarg,
        check_image_token_count,
        image_token_spans,
        output_cache,
        placeholder_ids,
        take_cache,
    )
except ImportError:  # ... or as an installed top-level module (`pip install -e .`)
    from configuration_chimera import ChimeraConfig, ChimeraExpertConfig
    from expert_encoders import get_expert_family, load_expert_encoder
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
        passthrough_generate_kwargs,
        teacher_forced,
    )
    from vlm_backbones import (
        cache_kwarg,
        check_image_token_count,
        image_token_spans,
        output_cache,
        placeholder_ids,
        take_cache,
    )


logger = logging.get_logger(__name__)


# ------------------------------------------------------------------------------------------------------- outputs


@dataclass
class ChimeraImageFeatures(RoutedImageFeatures):
    r"""
    Everything Chimera derives from the images of one batch, before the language model. It follows transformers'
    VLM contract for `get_image_features` (a `BaseModelOutputWithPooling`), plus the routing.

    last_hidden_state (`torch.FloatTensor`): the generalist tower's activations after the last layer its projector
        reads, per tile `(num_tiles, tokens, vision_hidden)` (Qwen2-VL: packed patches `(num_patches, vision_hidden)`).
    pooler_output (`tuple[torch.FloatTensor]`): per image, `(n_i, llm_hidden)` generalist tokens (what replaces the
        image placeholders); also readable as `generalist_features`.
    hidden_states, attentions (`tuple[torch.FloatTensor]`, *optional*): the generalist tower's, when requested.
    router_logits (`torch.FloatTensor` of shape `(num_images, num_experts + 1)`): router scores, class 0 = no expert.
    expert_index (`torch.LongTensor` of shape `(num_images,)`): the expert used per image (0 = none).
    image_rows (`torch.LongTensor` of shape `(num_images,)`, *optional*): the batch row of each image (set by
        `generate`, used to repeat features for beam search).
    expert_features (`tuple`): per image, `(m_i, llm_hidden)` expert tokens, or `None` when no expert is used.
    """

    expert_features: tuple | None = None

    per_image_fields = ("pooler_output", "router_logits", "expert_index", "expert_features")

    @property
    def generalist_features(self) -> tuple | None:
        return self.pooler_output


@dataclass
class ChimeraModelOutputWithPast(RoutedModelOutputWithPast):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Aligned with the caller's `input_ids` (expert tokens inserted by the model are not part of it).
    cache (`Cache`, *optional*): the KV cache of the sequence the LLM actually saw (with expert tokens). Named as the
        installed transformers names it: `past_key_values` before 5.24, `cache` from 5.24 (inherited from
        `BaseModelOutputWithPast`).
    hidden_states (`tuple[torch.FloatTensor]`, *optional*): per layer, aligned like `last_hidden_state`.
    attentions (`tuple[torch.FloatTensor]`, *optional*): per layer, over the sequence the LLM saw (with expert
        tokens); `expanded_input_ids` tells what each position holds.
    router_logits (`torch.FloatTensor` of shape `(num_images, num_experts + 1)`, *optional*): router scores.
    expert_index (`torch.LongTensor` of shape `(num_images,)`, *optional*): the expert each image used (0 = none).
    expanded_input_ids (`torch.LongTensor`, *optional*): the token ids the LLM saw.
    expanded_attention_mask (`torch.LongTensor`, *optional*): the attention mask the LLM saw (GSCM zeros included).
    """

    expanded_input_ids: torch.LongTensor | None = None
    expanded_attention_mask: torch.LongTensor | None = None


@dataclass
class ChimeraCausalLMOutputWithPast(RoutedCausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor`, *optional*): `lm_loss + router_loss_weight * router_loss` (the router part rescaled
        under Trainer's `num_items_in_batch`, see `modeling_routed_vlm.lm_and_router_loss`).
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): aligned with `input_ids`.
    cache, hidden_states, attentions: as in `ChimeraModelOutputWithPast` (the cache field inherited from
        `CausalLMOutputWithPast`, named as the installed transformers names it).
    lm_loss (`torch.FloatTensor`, *optional*): next-token cross-entropy.
    router_loss (`torch.FloatTensor`, *optional*): router cross-entropy (mean over labelled images, unweighted).
    router_logits, expert_index: as in `ChimeraModelOutputWithPast`.
    """


# ------------------------------------------------------------------------------------------------------ experts


_ATTENTION_SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn"}


def _fit_expert_attention(config: ChimeraExpertConfig) -> None:
    """An expert that cannot run the requested attention implementation keeps its own default instead of failing the
    whole load: a generalist on flash attention is common, while GOT-OCR2's encoder supports only eager attention and
    Pix2Struct no flash attention. A warning says so; a dict such as `{"": "sdpa", "ocr": "eager"}` chooses per
    expert."""
    requested = config.vision_config._attn_implementation
    if not isinstance(requested, str) or requested == "eager":
        return
    flash = requested.startswith("flash_attention")
    flag = "_supports_flash_attn" if flash else _ATTENTION_SUPPORT_FLAGS.get(requested)
    encoder_class = get_expert_family(config.vision_config.model_type).encoder_class(config.vision_config)
    if flag is not None and not getattr(encoder_class, flag, False):
        logger.warning_once(
            f"Expert {config.domain!r} ({encoder_class.__name__}) does not support attn_implementation={requested!r}: "
            f"it keeps its default. Choose per expert with a dict, e.g. attn_implementation={{'': {requested!r}, "
            f"{config.domain!r}: 'eager'}}."
        )
        config._attn_implementation = None


class ChimeraExpertEncoder(nn.Module):
    """One frozen expert vision encoder and the rule that turns its output into tokens (official `uni_encode`); what
    differs per encoder family is in `expert_encoders.EXPERT_FAMILIES`."""

    def __init__(self, config: ChimeraExpertConfig):
        super().__init__()
        self.config = config
        self.expert_family = get_expert_family(config.vision_config.model_type)
        _fit_expert_attention(config)
        self.encoder = self.expert_family.build(config.vision_config)

    @property
    def family(self) -> str:
        return self.config.vision_config.model_type

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """`inputs`: the expert's preprocessed images, `(n, ...)`. Returns `(n, tokens, expert_hidden)`."""
        features = self.expert_family.encode(self.encoder, inputs, self.config.feature_layer)
        if self.config.feature_select_strategy == "default":
            features = features[:, 1:]
        return features


class ChimeraExpertProjector(nn.Module):
    """Expert tokens -> LLM width: LayerNorm -> Linear -> GELU -> Linear (Chimera §3.2; official `mlp[i]`)."""

    def __init__(self, in_features: int, out_features: int, hidden_act: str = "gelu"):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_features)
        self.linear_1 = nn.Linear(in_features, out_features)
        self.act = ACT2FN[hidden_act]
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, features):
        return self.linear_2(self.act(self.linear_1(self.layer_norm(features))))


# ------------------------------------------------------------------------------------------------------- layout


@dataclass
class ExpertTokenLayout:
    """Where every image's generalist and expert tokens sit in the sequence the LLM sees.

    input_ids / attention_mask / mm_token_type_ids / position_ids: the expanded inputs.
    source_positions (`(batch, orig_len)`): expanded position of each caller token; for the token an expert block
        was inserted after, the position of the block's last token (so outputs keep next-token semantics).
    keep_positions (`(batch, orig_len)`): expanded position of each caller token (to strip `generate` outputs).
    image_positions (`list[torch.LongTensor]`): per image, expanded positions of its generalist tokens.
    image_rows (`list[int]`): per image, the batch row it sits in.
    inserted (`bool`): whether any token was inserted.
    """

    input_ids: torch.LongTensor
    attention_mask: torch.Tensor | None
    mm_token_type_ids: torch.Tensor | None
    position_ids: torch.Tensor | None
    source_positions: torch.LongTensor
    keep_positions: torch.LongTensor
    image_positions: list
    image_rows: list
    inserted: bool

    @classmethod
    def unchanged(cls, input_ids, attention_mask, mm_token_type_ids, position_ids, spans) -> ExpertTokenLayout:
        """The layout of inputs that get no expert block (or already hold theirs)."""
        batch, seq_len = input_ids.shape
        positions = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        image_positions = [torch.arange(first, last + 1, device=input_ids.device) for _, first, last in spans]
        return cls(input_ids, attention_mask, mm_token_type_ids, position_ids, positions, positions, image_positions,
                   [row for row, _, _ in spans], inserted=False)

    def realign(self, states: torch.Tensor) -> torch.Tensor:
        """`(batch, expanded_len, dim)` states -> `(batch, orig_len, dim)` aligned with the caller's `input_ids`."""
        if not self.inserted:
            return states
        return states.gather(1, self.source_positions.unsqueeze(-1).expand(-1, -1, states.shape[-1]))


def _padding_side(attention_mask) -> str:
    """Left when some row starts with padding and every row ends with a real token, right otherwise."""
    if attention_mask is None:
        return "right"
    left = bool((attention_mask[:, 0] == 0).any()) and bool((attention_mask[:, -1] == 1).all())
    return "left" if left else "right"


def _expand_inputs(inputs: dict, inserts: list, spans: list, padding_side: str, pad_token_id: int) -> ExpertTokenLayout:
    """Compact -> expanded inputs: `inserts[row]` holds `(anchor column, block ids)` pairs, each block going right after
    its anchor. Rows are padded to the longest on `padding_side`."""
    input_ids = inputs["input_ids"]
    (batch, seq_len), device = input_ids.shape, input_ids.device
    added = [sum(len(block) for _, block in row) for row in inserts]
    new_len = seq_len + max(added)
    expanded = {
        "input_ids": torch.full((batch, new_len), pad_token_id, dtype=input_ids.dtype, device=device),
        "attention_mask": torch.zeros((batch, new_len), dtype=torch.long, device=device),
    }
    for name in ("mm_token_type_ids", "position_ids"):  # inserted tokens are text (type 0)
        if inputs[name] is not None:
            expanded[name] = torch.zeros((batch, new_len), dtype=inputs[name].dtype, device=device)
    keep = torch.empty((batch, seq_len), dtype=torch.long, device=device)
    source = torch.empty((batch, seq_len), dtype=torch.long, device=device)
    for row in range(batch):
        offset = new_len - seq_len - added[row] if padding_side == "left" else 0
        keep[row], source[row] = _expand_row(row, inputs, expanded, inserts[row], offset)
    return ExpertTokenLayout(
        expanded["input_ids"], expanded["attention_mask"], expanded.get("mm_token_type_ids"),
        expanded.get("position_ids"), source, keep, [keep[row, first : last + 1] for row, first, last in spans],
        [row for row, _, _ in spans], inserted=True,
    )


def _expand_row(row: int, inputs: dict, expanded: dict, inserts: list, offset: int):
    """Write row `row` of the `expanded` tensors; returns the expanded positions of its caller tokens (`keep`) and
    where each caller token's output is read (`source`: after an inserted block, the block's last token)."""
    ids, positions = inputs["input_ids"], inputs["position_ids"]
    seq_len, device = ids.shape[1], ids.device
    shift = torch.zeros(seq_len, dtype=torch.long, device=device)
    for anchor, block in inserts:
        shift[anchor + 1 :] += len(block)
    keep = torch.arange(seq_len, device=device) + shift + offset
    source = keep.clone()
    expanded["input_ids"][row, keep] = ids[row]
    mask = inputs["attention_mask"]
    expanded["attention_mask"][row, keep] = mask[row].long() if mask is not None else 1
    if "mm_token_type_ids" in expanded:
        expanded["mm_token_type_ids"][row, keep] = inputs["mm_token_type_ids"][row]
    if "position_ids" in expanded:
        expanded["position_ids"][row, keep] = positions[row] + shift
    for anchor, block in inserts:
        start = int(keep[anchor]) + 1
        end = start + len(block)
        expanded["input_ids"][row, start:end] = torch.tensor(block, dtype=ids.dtype, device=device)
        expanded["attention_mask"][row, start:end] = 1
        if "position_ids" in expanded:  # the block continues the positions after its anchor
            following = torch.arange(1, len(block) + 1, device=device)
            expanded["position_ids"][row, start:end] = positions[row, anchor] + following
        source[anchor] = end - 1
    return keep, source


def _scatter(embeds, mask, features, what):
    """`features` (a list of `(n_i, hidden)`) into the positions of `mask`, after checking the counts agree."""
    check_image_token_count(int(mask.sum()), list(features), what)
    if not features:
        return embeds
    source = torch.cat(list(features), dim=0).to(embeds.device, embeds.dtype)
    return embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), source)


# ------------------------------------------------------------------------------------------------------- models


class ChimeraPreTrainedModel(RoutedVLMPreTrainedModel):
    config: ChimeraConfig
    config_class = ChimeraConfig
    # The router is small and trained from scratch: in bf16 most of its updates would round away, so it is loaded and
    # kept in fp32 whatever `dtype` the rest of the model takes (its input is cast to its dtype in `forward`).
    _keep_in_fp32_modules_strict = ["router"]
    _auto_map = {
        "AutoConfig": "configuration_chimera.ChimeraConfig",
        "AutoModel": "modeling_chimera.ChimeraForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_chimera.ChimeraForConditionalGeneration",
    }


class ChimeraModel(RoutedVLMModel, ChimeraPreTrainedModel):
    """The generalist backbone plus router, frozen expert encoders and expert projectors (no LM head)."""

    native_attr = "generalist"
    zero_label = "'no expert'"

    def __init__(self, config: ChimeraConfig):
        super().__init__(config)
        self.generalist = AutoModel.from_config(config.generalist_config)
        text_hidden = config.get_text_config().hidden_size
        self.router = nn.Linear(self.family.tower_hidden_size, config.num_experts_with_none, bias=False)
        self.expert_encoders = nn.ModuleDict({e.domain: ChimeraExpertEncoder(e) for e in config.experts})
        self.expert_projectors = nn.ModuleDict(
            {
                e.domain: ChimeraExpertProjector(
                    get_expert_family(e.vision_config.model_type).hidden_size(e.vision_config), text_hidden,
                    e.projector_hidden_act,
                )
                for e in config.experts
            }
        )
        self.expert_encoders.requires_grad_(False)  # experts are frozen at every stage (Chimera §3.4)
        self.finish_init()

    def train(self, mode: bool = True):
        super().train(mode)
        self.expert_encoders.eval()  # frozen encoders never use dropout / batch statistics
        return self

    @property
    def generalist_image_token_id(self) -> int:
        """The generalist's image placeholder token (the same as `image_token_id`)."""
        return self.image_token_id

    # -- images: encode and route (Chimera §3.2)

    def _image_batch(self, pixel_values, input_ids=None, **image_inputs):
        return self.family.image_batch(pixel_values, input_ids=input_ids, **image_inputs)

    def _route_feature(self, acts, images):
        mode = self.config.router_feature
        if mode == "auto":
            mode = "cls" if self.family.has_cls_token else "mean"
        return self.family.routing_feature(acts, images, mode)

    def router_inputs(self, pixel_values, input_ids=None, **image_inputs) -> torch.Tensor:
        """The router's input, one row per image `(num_images, vision_hidden)`: the generalist tower's CLS token or
        token mean (`config.router_feature`) on the tile that shows the whole image (Chimera §3.2). The router stage
        of `train.chimera` caches these."""
        images = self._image_batch(pixel_values, input_ids=input_ids, **image_inputs)
        _, acts = self.family.encode(images)
        return self._route_feature(acts, images)

    def choose_experts(self, router_logits, expert_labels=None, input_ids=None, generalist_features=None):
        """The expert of each image (0 = none): the one `input_ids` already name when they hold expert blocks, else
        the labelled one (`expert_labels`, teacher forcing; -100 leaves it to the router), else the router's
        argmax (Chimera §3.2)."""
        labels = self._validate_expert_labels(expert_labels, router_logits.shape[0])
        if input_ids is None or not self.has_expert_tokens(input_ids):
            return teacher_forced(router_logits.argmax(-1), labels)
        expert_index = self.expert_index_from_tokens(input_ids, generalist_features)
        if labels is not None and bool(((labels != -100) & (labels.to(expert_index.device) != expert_index)).any()):
            raise ValueError(
                f"`expert_labels` {labels.tolist()} disagree with the expert tokens in `input_ids` "
                f"{expert_index.tolist()}: pass compact input_ids (without expert tokens) to teacher-force."
            )
        return expert_index

    def encode_generalist(self, pixel_values, input_ids=None, **image_inputs):
        """Generalist tokens per image, router logits, the image grouping and the tower activations."""
        check_finite_pixels(pixel_values)
        images = self._image_batch(pixel_values, input_ids=input_ids, **image_inputs)
        features, acts = self.family.encode(images)
        router_logits = self.router(self._route_feature(acts, images).to(self.router.weight.dtype))
        return features, router_logits, images, acts

    def encode_experts(self, expert_index, expert_pixel_values, num_images):
        """Run each used expert once, on just the images routed to it (the official training code runs every expert
        on every image). Returns per image `(m_i, llm_hidden)` or `None`."""
        features = [None] * num_images
        for k, domain in enumerate(self.domains, start=1):
            routed = (expert_index == k).nonzero().squeeze(-1)
            if routed.numel() == 0:
                continue
            given = expert_pixel_values is not None and len(expert_pixel_values) >= k
            inputs = expert_pixel_values[k - 1] if given else None
            tokens = self._run_expert(k, self._expert_inputs(k, inputs, routed, num_images), tuple(inputs.shape))
            for row, image in enumerate(routed.tolist()):
                features[image] = tokens[row]
        return tuple(features)

    def _expert_inputs(self, k, inputs, routed, num_images) -> torch.Tensor:
        """The rows of expert `k`'s inputs for the images `routed` to it, after checking there is one per image."""
        domain = self.domains[k - 1]
        if inputs is None:
            raise ValueError(
                f"Image(s) {routed.tolist()} are routed to expert {k} ({domain!r}) but `expert_pixel_values` has no "
                f"inputs for it. Pass the `expert_pixel_values` that `ChimeraProcessor` returns (one tensor per "
                "expert, one row per image)."
            )
        if inputs.shape[0] != num_images:
            raise ValueError(
                f"`expert_pixel_values[{k - 1}]` ({domain!r}) has {inputs.shape[0]} rows for {num_images} images."
            )
        check_finite_pixels(inputs, f"expert_pixel_values[{k - 1}]")
        return inputs.index_select(0, routed.to(inputs.device))

    def _run_expert(self, k, inputs, given_shape) -> torch.Tensor:
        """Expert `k`'s frozen encoder and its projector: `(n, m, llm_hidden)` (`given_shape`: of the caller's
        `expert_pixel_values[k - 1]`, for the error message)."""
        domain = self.domains[k - 1]
        encoder, projector = self.expert_encoders[domain], self.expert_projectors[domain]
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())):
            try:
                tokens = encoder(inputs.to(self.dtype))
            except RuntimeError as error:  # e.g. another expert's inputs: a shape error deep in the encoder
                shape_error = any(word in str(error) for word in ("size", "shape", "dimension"))
                if isinstance(error, torch.OutOfMemoryError) or not shape_error:
                    raise
                raise ValueError(
                    f"Expert {k} ({domain!r}, {encoder.family}) cannot encode `expert_pixel_values[{k - 1}]` of "
                    f"shape {given_shape}: pass the list `ChimeraProcessor` returns, in the model's expert "
                    f"order {self.domains}. ({error})"
                ) from error
        return projector(tokens.to(projector.linear_1.weight.dtype))

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        expert_pixel_values: list | None = None,
        expert_labels: torch.LongTensor | None = None,
        expert_index: torch.LongTensor | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        image_num_patches: torch.Tensor | None = None,
        **kwargs,
    ) -> ChimeraImageFeatures:
        """Encode a batch of images: generalist tokens, router scores, the expert choice and the expert tokens.

        The expert is `expert_index` when given, else the labelled one (`expert_labels`, teacher forcing), else the
        router's argmax. Only the chosen expert's encoder runs for an image. InternVL needs `image_num_patches` (or
        `input_ids`, passed as a keyword) to group tiles into images; without either every row of `pixel_values` is
        one image, as in the native `get_image_features`. `output_hidden_states` / `output_attentions` add the
        generalist tower's (the tower is unchanged, so they are the native tower's own).
        """
        # `input_ids`, `output_hidden_states` and `output_attentions` are read from **kwargs on purpose:
        # `GenerationMixin` pops every named parameter of `get_image_features` from the generation kwargs, and must not
        # take them away from `generate` (as in the native models, whose flags travel in `**kwargs`).
        input_ids = kwargs.pop("input_ids", None)
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        output_attentions = kwargs.pop("output_attentions", None)
        features, router_logits, images, acts = self.encode_generalist(
            pixel_values, input_ids=input_ids, image_sizes=image_sizes, batch_num_images=batch_num_images,
            image_grid_thw=image_grid_thw, image_num_patches=image_num_patches,
        )
        if expert_index is None:
            expert_index = self.choose_experts(router_logits, expert_labels, input_ids, features)
        else:
            self._validate_expert_labels(expert_labels, images.num_images)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        tower = None
        if output_hidden_states or output_attentions:
            tower = self.family.tower_outputs(images, output_hidden_states, output_attentions)
        return ChimeraImageFeatures(
            last_hidden_state=acts.hidden,
            pooler_output=tuple(features),
            hidden_states=tower.hidden_states if tower is not None and output_hidden_states else None,
            attentions=tower.attentions if tower is not None and output_attentions else None,
            router_logits=router_logits,
            expert_index=expert_index,
            expert_features=self.encode_experts(expert_index, expert_pixel_values, images.num_images),
        )

    # -- token layout: where each routed image's expert block goes

    def _expert_block(self, k: int, count: int) -> list[int]:
        block = [self.config.expert_token_ids[k - 1]] * count
        if self.config.expert_start_token_id is not None:
            block = [self.config.expert_start_token_id] + block
        if self.config.expert_end_token_id is not None:
            block = block + [self.config.expert_end_token_id]
        return block

    def _check_expert_tokens_configured(self):
        if self.config.experts and self.config.expert_token_ids is None:
            raise ValueError(
                "`config.expert_token_ids` is not set: build the model with `ChimeraForConditionalGeneration."
                "from_generalist(...)`, which reserves one token id per expert, or set it in the config."
            )

    def has_expert_tokens(self, input_ids) -> bool:
        return bool(self.config.expert_token_ids) and bool(
            torch.isin(input_ids, torch.tensor(self.config.expert_token_ids, device=input_ids.device)).any()
        )

    def expert_index_from_tokens(self, input_ids, generalist_features) -> torch.LongTensor:
        """For `input_ids` that already hold expert blocks: which expert follows each image (0 = none)."""
        counts = [int(f.shape[0]) for f in generalist_features]
        spans = image_token_spans(input_ids, self.image_token_id, counts)
        token_to_expert = {t: k for k, t in enumerate(self.config.expert_token_ids, start=1)}
        skip = {self.config.expert_start_token_id, self.config.expert_insert_after_token_id} - {None}
        index = []
        for row, _, last in spans:
            col = last + 1
            while col < input_ids.shape[1] and int(input_ids[row, col]) in skip:
                col += 1
            index.append(token_to_expert.get(int(input_ids[row, col]), 0) if col < input_ids.shape[1] else 0)
        return torch.tensor(index, dtype=torch.long, device=input_ids.device)

    def _expert_inserts(self, input_ids, image_features, spans) -> list[list]:
        """Per batch row, `(anchor column, block ids)` of every expert block to insert: after the image's last
        generalist token, or after the token right behind it when that is `config.expert_insert_after_token_id`
        (InternVL's `</img>`, the official layout). Inputs that already hold expert blocks get none."""
        inserts = [[] for _ in range(input_ids.shape[0])]
        if not spans or self.has_expert_tokens(input_ids):
            return inserts
        after = self.config.expert_insert_after_token_id
        experts = zip(spans, image_features.expert_index.tolist(), image_features.expert_features)
        for (row, _, last), k, feats in experts:
            if k == 0:
                continue
            followed = after is not None and last + 1 < input_ids.shape[1] and int(input_ids[row, last + 1]) == after
            anchor = last + 1 if followed else last
            inserts[row].append((anchor, self._expert_block(k, int(feats.shape[0]))))
        return inserts

    def layout(
        self,
        input_ids: torch.LongTensor,
        image_features: ChimeraImageFeatures,
        attention_mask: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        padding_side: str | None = None,
        pad_token_id: int | None = None,
    ) -> ExpertTokenLayout:
        """Insert each routed image's expert block after its generalist tokens (compact -> expanded inputs). Inputs
        that already hold expert blocks are laid out as they are."""
        counts = [int(f.shape[0]) for f in image_features.generalist_features]
        spans = image_token_spans(input_ids, self.image_token_id, counts) if counts else []
        inserts = self._expert_inserts(input_ids, image_features, spans)
        if not any(inserts):
            return ExpertTokenLayout.unchanged(input_ids, attention_mask, mm_token_type_ids, position_ids, spans)
        if position_ids is not None and position_ids.dim() != 2:
            raise ValueError(
                "Chimera computes 3D (M-RoPE) positions itself when it inserts expert tokens: call it without "
                "`position_ids`, or with input_ids that already hold the expert tokens (see `generate`)."
            )
        if pad_token_id is None:
            pad_token_id = self.config.get_text_config().pad_token_id or 0
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids,
                  "position_ids": position_ids}
        return _expand_inputs(inputs, inserts, spans, padding_side or _padding_side(attention_mask), pad_token_id)

    def _gscm_mask(self, attention_mask, layout, expert_index):
        """Generalist-Specialist Collaboration Masking (Chimera §3.3): for each image that uses an expert, mask
        `int(ratio * n)` of its `n` generalist tokens, chosen uniformly at random, from attention."""
        ratio = float(self.config.gscm_ratio)
        if not self.training or ratio <= 0 or expert_index is None or not bool((expert_index > 0).any()):
            return attention_mask
        if attention_mask is None:
            attention_mask = torch.ones_like(layout.input_ids)
        attention_mask = attention_mask.clone()
        for image, positions in enumerate(layout.image_positions):
            if int(expert_index[image]) <= 0:
                continue
            n_mask = int(ratio * positions.numel())
            chosen = positions[torch.randperm(positions.numel(), device=positions.device)[:n_mask]]
            attention_mask[layout.image_rows[image], chosen] = 0
        return attention_mask

    # -- embeddings

    def expanded_embeddings(self, layout, inputs_embeds=None):
        """Token embeddings of the expanded sequence: the caller's `inputs_embeds` at the caller's positions when
        given, the embedding table elsewhere (inserted expert slots)."""
        embeds = self.get_input_embeddings()(layout.input_ids)
        if inputs_embeds is not None:
            index = layout.keep_positions.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
            embeds = embeds.scatter(1, index, inputs_embeds.to(embeds.dtype))
        return embeds

    def embed(self, layout, image_features, inputs_embeds=None):
        """The expanded sequence's embeddings with every image's generalist features on its placeholders and every
        expert's features on its expert tokens."""
        ids = layout.input_ids
        embeds = _scatter(self.expanded_embeddings(layout, inputs_embeds), ids == self.image_token_id,
                          image_features.generalist_features, "image")
        used = image_features.expert_index.tolist()
        for k, token_id in enumerate(self.config.expert_token_ids or [], start=1):
            chosen = [f for f, e in zip(image_features.expert_features, used) if e == k]
            mask = ids == token_id
            if chosen or bool(mask.any()):
                embeds = _scatter(embeds, mask, chosen, f"expert-{k} ({self.domains[k - 1]!r})")
        return embeds

    def _placeholder_ids(self, inputs_embeds):
        """Token ids for a call with `inputs_embeds` and images but no `input_ids`: the image token (and each expert
        token, and the layout's `</img>` / wrapper tokens) where the embedding is that token's own (how the native
        VLMs find placeholders in `inputs_embeds`), the pad token elsewhere. They only place the generalist and
        expert tokens; the values come from `inputs_embeds`."""
        if inputs_embeds is None:
            raise ValueError("Pass `input_ids` or `inputs_embeds` together with the images.")
        pad = self.config.get_text_config().pad_token_id
        layout = (self.config.expert_insert_after_token_id, self.config.expert_start_token_id,
                  self.config.expert_end_token_id)  # where blocks go (InternVL: after `</img>`) and their wrappers
        tokens = [self.image_token_id, *(self.config.expert_token_ids or []), *(t for t in layout if t is not None)]
        return placeholder_ids(inputs_embeds, self.get_input_embeddings(), tokens, fill=0 if pad is None else pad)

    # -- forward

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        expert_pixel_values: list | None = None,
        expert_labels: torch.LongTensor | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        image_num_patches: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> ChimeraModelOutputWithPast:
        cache = take_cache(past_key_values, kwargs)
        llm_kwargs = dict(image_inputs={"image_grid_thw": image_grid_thw}, use_cache=use_cache, **cache_kwarg(cache),
                          **kwargs)
        image_features = (mm_encoder_outputs or {}).get("image")
        if pixel_values is None and image_features is None:
            return self._text_forward(input_ids, inputs_embeds, attention_mask, position_ids, mm_token_type_ids,
                                      llm_kwargs)
        if input_ids is None:
            input_ids = self._placeholder_ids(inputs_embeds)
        self._check_expert_tokens_configured()
        if image_features is None:  # 1. encode & route: generalist tokens, router, the chosen experts' tokens
            image_features = self.get_image_features(
                pixel_values, input_ids=input_ids, expert_pixel_values=expert_pixel_values, expert_labels=expert_labels,
                image_sizes=image_sizes, batch_num_images=batch_num_images, image_grid_thw=image_grid_thw,
                image_num_patches=image_num_patches, output_hidden_states=False, output_attentions=False,
                return_dict=True,
            )
        self._check_cache_continuation(cache, input_ids, image_features)
        # 2. lay out: each routed image's expert block goes in after its generalist tokens
        layout = self.layout(input_ids, image_features, attention_mask, mm_token_type_ids, position_ids)
        # 3. embed: token embeddings, generalist features on the image tokens, expert features on the expert tokens
        embeds = self.embed(layout, image_features, inputs_embeds)
        position_ids = layout.position_ids
        if position_ids is None:  # from the unmasked attention mask: GSCM must not move positions
            position_ids = self.family.position_ids(layout.input_ids, layout.attention_mask,
                                                    {"image_grid_thw": image_grid_thw}, cache, layout.mm_token_type_ids)
        # 4. mask: GSCM hides part of each routed image's generalist tokens while training (Chimera §3.3)
        attention = self._gscm_mask(layout.attention_mask, layout, image_features.expert_index)
        # 5. the generalist's LLM on the expanded sequence
        outputs = self.family.language_forward(
            embeds, input_ids=layout.input_ids, attention_mask=attention, position_ids=position_ids,
            mm_token_type_ids=layout.mm_token_type_ids, **llm_kwargs,
        )
        # 6. realign: outputs line up with the caller's input_ids again
        return self._realigned(outputs, layout, image_features, attention)

    @staticmethod
    def _realigned(outputs, layout, image_features, attention) -> ChimeraModelOutputWithPast:
        """The LLM's outputs on the expanded sequence, read back at the caller's positions (attentions stay expanded:
        `expanded_input_ids` says what each position holds)."""
        hidden_states = outputs.hidden_states
        if hidden_states is not None:  # `output_hidden_states=[layer ids]` captures some layers only: the rest are None
            hidden_states = tuple(h if h is None else layout.realign(h) for h in hidden_states)
        return ChimeraModelOutputWithPast(
            last_hidden_state=layout.realign(outputs.last_hidden_state),
            **cache_kwarg(output_cache(outputs)),
            hidden_states=hidden_states,
            attentions=outputs.attentions,
            router_logits=image_features.router_logits,
            expert_index=image_features.expert_index,
            expanded_input_ids=layout.input_ids,
            expanded_attention_mask=attention,
        )

    def _text_forward(self, input_ids, inputs_embeds, attention_mask, position_ids, mm_token_type_ids, llm_kwargs):
        """A call without images: the generalist's LLM alone."""
        if input_ids is not None and self.has_expert_tokens(input_ids):
            raise ValueError("`input_ids` hold expert tokens but no images were given (`pixel_values`).")
        outputs = self.family.language_forward(
            inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids),
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            mm_token_type_ids=mm_token_type_ids, **llm_kwargs,
        )
        return ChimeraModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state, **cache_kwarg(output_cache(outputs)),
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )

    def _check_cache_continuation(self, cache, input_ids, image_features):
        """Expert tokens cannot be inserted into a sequence whose start is already in the KV cache."""
        if cache is None or cache.get_seq_length() == 0 or self.has_expert_tokens(input_ids):
            return
        if bool((image_features.expert_index > 0).any()):
            raise ValueError(
                "Cannot insert expert tokens into a sequence that continues a KV cache; use `generate()`, which "
                "routes before decoding, or pass input_ids that already hold the expert tokens."
            )


_GENERATE_IMAGE_INPUTS = ("expert_pixel_values", "expert_labels", "image_sizes", "batch_num_images", "image_grid_thw",
                          "image_num_patches")


class ChimeraForConditionalGeneration(RoutedVLMForConditionalGeneration, ChimeraPreTrainedModel, GenerationMixin):
    """Chimera with the generalist's LM head. See the module docstring for the expert-token layout."""

    model_class = ChimeraModel
    output_class = ChimeraCausalLMOutputWithPast
    _tied_weights_keys = {"lm_head.weight": "model.generalist.language_model.embed_tokens.weight"}

    def resize_token_embeddings(self, new_num_tokens=None, *args, **kwargs):
        """`PreTrainedModel.resize_token_embeddings`, refusing to drop the rows of the expert placeholder tokens."""
        ids = self.config.expert_token_ids or []
        if new_num_tokens is not None and ids and new_num_tokens <= max(ids):
            raise ValueError(
                f"Cannot resize the vocabulary to {new_num_tokens}: Chimera's expert placeholder tokens "
                f"(`config.expert_token_ids` = {ids}) need at least {max(ids) + 1} rows. Resize to a larger size, or "
                "move the placeholders first."
            )
        return super().resize_token_embeddings(new_num_tokens, *args, **kwargs)

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
        expert_pixel_values: list | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        image_num_patches: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> ChimeraCausalLMOutputWithPast:
        r"""
        expert_labels (`torch.LongTensor` of shape `(num_images,)`, *optional*):
            Per image: 0 = no expert, k = the k-th expert of `config.experts`, -100 = unlabelled. Labelled images use
            their expert (teacher forcing) and add the router's cross-entropy to the loss.
        expert_pixel_values (`list[torch.Tensor]`, *optional*):
            One tensor per expert (config order), one row per image: that expert's preprocessed input (what
            `ChimeraProcessor` returns). Only the rows of images routed to an expert are used.

        Loss: `lm_loss + router_loss_weight * router_loss`, rescaled under `Trainer`'s `num_items_in_batch` (see
        `modeling_routed_vlm.lm_and_router_loss`); `lm_loss` and `router_loss` are also returned unscaled.
        """
        labels = check_text_inputs(input_ids, inputs_embeds, labels)
        loss_kwargs = self.pop_loss_kwargs(kwargs)
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=take_cache(past_key_values, kwargs), inputs_embeds=inputs_embeds, return_dict=True,
            expert_pixel_values=expert_pixel_values, expert_labels=expert_labels, image_sizes=image_sizes,
            batch_num_images=batch_num_images, image_grid_thw=image_grid_thw, image_num_patches=image_num_patches,
            mm_token_type_ids=mm_token_type_ids, mm_encoder_outputs=mm_encoder_outputs, use_cache=use_cache, **kwargs,
        )
        return self.logits_and_loss(outputs, labels, expert_labels, logits_to_keep, loss_kwargs)

    # ------------------------------------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
        """`GenerationMixin.generate` with routing before the decoding loop.

        With images: encode them once (generalist, router, chosen experts), insert each routed image's expert
        tokens into the prompt, decode on that expanded prompt, and return the caller's prompt + the new tokens
        (the inserted tokens are removed again, so `out[:, input_ids.shape[1]:]` is the continuation). A prompt that
        already holds expert blocks (e.g. a previous call's `expanded_input_ids`) keeps the experts it names; it is
        taken as fully laid out, so an image with no block after it uses no expert (do not mix compact and expanded
        rows, or add a new image to an expanded prompt). A prompt given
        as `inputs_embeds` (placeholders embedded with the image token's embedding) is expanded the same way; then, as
        for any model, only the new tokens are returned. Pass `expert_labels` to force experts (0 = none);
        `return_dict_in_generate=True` also gives `expert_index` and `router_logits`.
        """
        image_kwargs = {name: kwargs.pop(name, None) for name in _GENERATE_IMAGE_INPUTS}
        inputs_embeds = kwargs.pop("inputs_embeds", None)
        prompt_ids = input_ids
        if prompt_ids is None and inputs_embeds is not None and pixel_values is not None:
            prompt_ids = self.model._placeholder_ids(inputs_embeds)
        if pixel_values is None or prompt_ids is None:
            image_kwargs.pop("expert_labels")
            return super().generate(**passthrough_generate_kwargs(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                inputs_embeds=inputs_embeds, **image_kwargs,
            ), **kwargs)
        self.model._check_expert_tokens_configured()
        features = self.model.get_image_features(pixel_values, input_ids=prompt_ids, return_dict=True, **image_kwargs)
        layout, extra = self._expanded_prompt(prompt_ids, features, attention_mask, inputs_embeds, image_kwargs, kwargs)
        self._count_lengths_from_the_callers_prompt(kwargs, layout.input_ids.shape[1] - prompt_ids.shape[1])
        attention = layout.attention_mask if layout.attention_mask is not None else torch.ones_like(layout.input_ids)
        # The expanded ids go along even for a prompt given as embeddings: Qwen2-VL's 3D positions are read off them.
        output = super().generate(
            input_ids=layout.input_ids, attention_mask=attention, mm_encoder_outputs={"image": features}, **extra,
            **kwargs,
        )
        output = self._strip_expert_tokens(output, layout, prompt_ids.shape[0], keep_prompt=input_ids is not None)
        return self.with_routing(output, features)

    def _expanded_prompt(self, prompt_ids, features, attention_mask, inputs_embeds, image_kwargs, kwargs):
        """The prompt with its expert blocks (left-padded, as decoding wants) and the inputs `generate` gets with it."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        layout = self.model.layout(
            prompt_ids, features, attention_mask=attention_mask,
            mm_token_type_ids=kwargs.pop("mm_token_type_ids", None), position_ids=kwargs.pop("position_ids", None),
            padding_side="left",
            pad_token_id=kwargs.get("pad_token_id", generation_config.pad_token_id),
        )
        features.image_rows = torch.tensor(layout.image_rows, dtype=torch.long, device=prompt_ids.device)
        extra = {name: value for name, value in (
            ("mm_token_type_ids", layout.mm_token_type_ids), ("image_grid_thw", image_kwargs["image_grid_thw"]),
            ("position_ids", layout.position_ids)) if value is not None}
        if inputs_embeds is not None:  # the caller's embeddings, with the expert slots filled in from their ids
            extra["inputs_embeds"] = self.model.expanded_embeddings(layout, inputs_embeds)
        return layout, extra

    def _count_lengths_from_the_callers_prompt(self, kwargs, inserted: int) -> None:
        """`max_length` / `min_length` measure the caller's prompt + new tokens; decoding runs on the prompt with
        `inserted` expert tokens added, so the totals it sees grow by as much (`max_new_tokens`, when set anywhere,
        takes precedence in `generate` and needs nothing). Precedence as in `generate`: keyword > the
        `generation_config` passed > the model's."""
        if not inserted:
            return
        passed = kwargs.get("generation_config")
        sources = [kwargs, vars(passed) if passed is not None else {}, vars(self.generation_config)]
        for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
            value = next((source[total] for source in sources if source.get(total) is not None), None)
            if value is None or any(source.get(new) is not None for source in sources):
                continue
            if total in kwargs or passed is None:
                kwargs[total] = value + inserted
            else:  # keep the caller's object unchanged; `generate` warns when a config and keywords are mixed
                passed = kwargs["generation_config"] = copy.deepcopy(passed)
                setattr(passed, total, value + inserted)

    @staticmethod
    def _strip_expert_tokens(output, layout, batch_size, keep_prompt=True):
        """`generate` output on the expanded prompt -> the caller's prompt (when it was given as ids) + the new
        tokens."""
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        keep = layout.keep_positions.repeat_interleave(sequences.shape[0] // batch_size, dim=0)
        prompt_len = layout.input_ids.shape[1]
        prompt = sequences[:, :prompt_len].gather(1, keep) if keep_prompt else sequences[:, :0]
        stripped = torch.cat([prompt, sequences[:, prompt_len:]], dim=1)
        if isinstance(output, torch.Tensor):
            return stripped
        output.sequences = stripped
        return output

    # ------------------------------------------------------------------------------------------------- assembly

    @classmethod
    def from_generalist(
        cls,
        generalist,
        experts: dict,
        expert_token_ids: list[int] | None = None,
        router_feature: str = "auto",
        gscm_ratio: float = 0.0,
        router_loss_weight: float = 1.0,
        dtype: torch.dtype | None = None,
        expert_layout: str | None = None,
        image_end_token_id: int | None = None,
        **config_kwargs,
    ) -> ChimeraForConditionalGeneration:
        """Assemble Chimera from an existing generalist and expert encoders.

        Args:
            generalist: a native LLaVA-OneVision / Qwen2-VL / InternVL `...ForConditionalGeneration` object, or a
                local path / Hub repo id of one (loaded with `AutoModelForImageTextToText`, safetensors only).
                The object's modules are reused, not copied; its vocabulary grows by one row per expert.
            experts: `{domain: expert}` in router order. An expert is a vision model object (`CLIPVisionModel`,
                `SiglipVisionModel`, `Pix2StructVisionModel`, `GotOcr2VisionEncoder`, or a full `CLIPModel`,
                `SiglipModel`, `Pix2StructForConditionalGeneration`, `GotOcr2ForConditionalGeneration`,
                `Kosmos2_5ForConditionalGeneration`, whose vision part is taken), a path / repo id of one, or a
                dict `{"model": ..., "feature_layer": ..., "feature_select_strategy": ...}`. Expert encoders are frozen.
            expert_token_ids: reuse existing vocabulary ids as expert placeholders instead of adding new rows.
            expert_layout: where expert blocks go. `"official"` (the default for InternVL generalists, the only family
                the official Chimera ships): `</img><domain><expert tokens></domain>`, as in checkpoints converted
                from the official release, so one layout serves both; `<domain>` / `</domain>` get new vocabulary
                rows unless `expert_start_token_id` / `expert_end_token_id` are given. `"plain"` (the default for
                LLaVA-OneVision and Qwen2-VL): the expert tokens right after the image's last generalist token
                (before Qwen2-VL's `<|vision_end|>`), no wrapper tokens.
            image_end_token_id: the id of InternVL's `</img>` (`processor.end_image_token_id`), needed by the official
                layout; read from the generalist's tokenizer when `generalist` is a path or repo id.
            router_feature, gscm_ratio, router_loss_weight, **config_kwargs: see `ChimeraConfig`.
        """
        check_config_kwargs(ChimeraConfig, config_kwargs, "ChimeraForConditionalGeneration.from_generalist")
        if not isinstance(experts, dict) or not experts:
            raise ValueError("`experts` must be a non-empty dict {domain: expert vision model or path}.")
        generalist_path = generalist if isinstance(generalist, str) else None
        generalist = cls.load_native(generalist, dtype, "generalist")
        expert_specs, expert_modules = _load_experts(experts, dtype)
        expert_token_ids, layout_ids, new_rows = _reserve_expert_tokens(
            generalist, generalist_path, len(expert_specs), expert_token_ids, expert_layout, image_end_token_id,
            config_kwargs,
        )
        config_kwargs.update(layout_ids)
        config = ChimeraConfig(
            generalist_config=generalist.config, experts=expert_specs, expert_token_ids=expert_token_ids,
            router_feature=router_feature, gscm_ratio=gscm_ratio, router_loss_weight=router_loss_weight,
            **config_kwargs,
        )
        model = cls.around_native(config, generalist)  # reuses the generalist's modules
        for domain, module in expert_modules.items():
            model.model.expert_encoders[domain].encoder = module.requires_grad_(False)
        model.materialise([model.model.router, *model.model.expert_projectors.values()], next(generalist.parameters()))
        if new_rows:
            model.resize_token_embeddings(generalist.config.get_text_config().vocab_size + new_rows, mean_resizing=True)
            generalist.lm_head = model.lm_head  # keep the (now shared) generalist object consistent
        model._suppress_input_only_tokens()
        return model.train(generalist.training)

    def _suppress_input_only_tokens(self):
        """Expert placeholders (and their wrappers) are inputs only: `generate` never emits them."""
        config = self.config
        suppress = list(self.generation_config.suppress_tokens or [])
        inputs_only = [*config.expert_token_ids, config.expert_start_token_id, config.expert_end_token_id]
        suppress += [token for token in inputs_only if token is not None and token not in suppress]
        self.generation_config.suppress_tokens = suppress


ChimeraForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")


def _reserve_expert_tokens(generalist, generalist_path, num_experts, expert_token_ids, layout, image_end_token_id,
                           config_kwargs) -> tuple[list, dict, int]:
    """`(expert_token_ids, layout config entries, new vocabulary rows)` for `from_generalist`: one new row per expert
    unless `expert_token_ids` reuses existing ids, plus the layout's wrapper tokens (see `_expert_layout_ids`)."""
    vocab = generalist.config.get_text_config().vocab_size
    new_rows = 0
    if expert_token_ids is None:
        expert_token_ids, new_rows = list(range(vocab, vocab + num_experts)), num_experts
    layout_ids = _expert_layout_ids(generalist, generalist_path, layout, image_end_token_id, vocab + new_rows,
                                    config_kwargs)
    return expert_token_ids, layout_ids, new_rows + sum(layout_ids.pop("_new_rows", ()))


def _expert_layout_ids(generalist, generalist_path, layout, image_end_token_id, next_id, config_kwargs) -> dict:
    """Config entries of the expert-token layout `from_generalist` builds (see its `expert_layout`). New vocabulary
    rows for `<domain>` / `</domain>` start at `next_id`; `_new_rows` says how many."""
    family = generalist.config.model_type
    layout = layout or ("official" if family == "internvl" else "plain")
    if layout == "plain":
        return {}
    if layout != "official":
        raise ValueError(f"expert_layout must be 'official' or 'plain', got {layout!r}.")
    if family != "internvl":
        raise ValueError(f"expert_layout='official' is InternVL's (`</img><domain>...</domain>`); a {family} "
                         "generalist takes expert_layout='plain'.")
    if image_end_token_id is None and generalist_path is not None:
        image_end_token_id = getattr(AutoTokenizer.from_pretrained(generalist_path), "end_image_token_id", None)
    if image_end_token_id is None:
        raise ValueError(
            "An InternVL generalist gets the official Chimera expert layout `</img><domain>...</domain>` by default, "
            "which needs the id of `</img>`: pass image_end_token_id=processor.end_image_token_id (or "
            "tokenizer.end_image_token_id), or expert_layout='plain' for expert tokens right after the image tokens."
        )
    ids, new = {"expert_insert_after_token_id": int(image_end_token_id)}, []
    for key in ("expert_start_token_id", "expert_end_token_id"):
        if config_kwargs.get(key) is None:
            ids[key] = next_id + len(new)
            new.append(1)
    return {**ids, "_new_rows": new}


def _load_experts(experts: dict, dtype=None) -> tuple[list, dict]:
    """The `ChimeraExpertConfig`s and encoder modules for `from_generalist`'s `experts` (`{domain: spec}`)."""
    specs, modules = [], {}
    for domain, spec in experts.items():
        options = dict(spec) if isinstance(spec, dict) else {"model": spec}
        vision_config, module = load_expert_encoder(options.pop("model"), dtype=dtype)
        specs.append(ChimeraExpertConfig(domain=domain, vision_config=vision_config, **options))
        modules[domain] = module
    return specs, modules


__all__ = [
    "ChimeraPreTrainedModel",
    "ChimeraModel",
    "ChimeraForConditionalGeneration",
    "ChimeraImageFeatures",
    "ChimeraModelOutputWithPast",
    "ChimeraCausalLMOutputWithPast",
]
