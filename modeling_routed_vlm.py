# Copyright 2026 The Chimera/Mixpert HF port authors. Licensed under the Apache License, Version 2.0.
"""What Chimera and Mixpert share: a *routed* vision-language model.

Both wrap an unchanged native VLM (`vlm_backbones` knows its family) and send every image through one expert that a
router picks; both add the router's cross-entropy to the LM loss, route before `generate`'s decoding loop, and are
assembled around an existing native model on the meta device. This module holds that common part, in transformers'
layout (`...PreTrainedModel` -> inner `...Model` -> `...ForConditionalGeneration` with the LM head):

* output classes with the routing fields (`RoutedImageFeatures`, `RoutedModelOutputWithPast`,
  `RoutedCausalLMOutputWithPast`), which each model subclasses to document and extend;
* `RoutedVLMPreTrainedModel` (class attributes and the checkpoint rules of `HubCheckpointMixin`),
  `RoutedVLMModel` (the native model's embeddings, image token, expert-label validation) and
  `RoutedVLMForConditionalGeneration` (LM head, loss, generation plumbing, assembly around a native model);
* the checks and helpers both forwards use (`check_text_inputs`, `integer_labels`, `lm_and_router_loss`, ...).

It is a Hub file like `vlm_backbones.py`: the model files import it relatively and `save_pretrained` ships it.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, fields

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForImageTextToText, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast


try:  # loaded as part of a Hub repo through `trust_remote_code` (relative imports) ...
    from .vlm_backbones import get_backbone_family, image_token_spans, placeholder_ids
except ImportError:  # ... or as an installed top-level module (`pip install -e .`)
    from vlm_backbones import get_backbone_family, image_token_spans, placeholder_ids


# ---------------------------------------------------------------------------------------------------- checks


def check_config_kwargs(config_class, config_kwargs: dict, method: str) -> None:
    """`from_base` / `from_generalist` hand their other keywords to the config, and a config keeps any keyword as an
    attribute: a typo, or an option that does not exist, would be accepted and do nothing. Refuse those, as Python
    refuses an unexpected keyword (`TypeError`), naming the closest known one."""
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(config_kwargs) - known)
    if not unknown:
        return
    own = sorted(name for name in getattr(config_class, "__annotations__", {}) if name in known)
    named = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        named.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(f"{method}() got unknown keyword argument(s) {', '.join(named)}. Besides its own arguments it "
                    f"takes the fields of {config_class.__name__}: {', '.join(own)}.")


def check_finite_pixels(pixel_values, name: str = "pixel_values") -> None:
    """NaN / infinite pixels give NaN features, yet the router would still pick an expert and `generate` still emit
    tokens: refuse them."""
    values = [pixel_values] if isinstance(pixel_values, torch.Tensor) else [v for v in pixel_values if v is not None]
    for value in values:
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"`{name}` hold NaN or infinite values: check the images and their preprocessing.")


def check_text_inputs(input_ids, inputs_embeds, labels=None):
    """An empty batch and labels of the wrong kind fail deep inside the LLM otherwise (a reshape of 0 elements,
    "string indices must be integers"). Returns `labels` as int64 (int32 labels are fine, cross-entropy wants
    int64)."""
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens is not None and (tokens.shape[0] == 0 or tokens.shape[1] == 0):
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        raise ValueError(f"`{name}` is empty (shape {tuple(tokens.shape)}): pass at least one sample of one token.")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.is_floating_point()
                               or labels.dtype == torch.bool):
        kind = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"`labels` must be a LongTensor of token ids shaped like `input_ids` (-100 = not a target), "
                         f"got {kind}.")
    return labels.long() if labels is not None else None


def integer_labels(expert_labels) -> torch.LongTensor:
    """`expert_labels` as a flat LongTensor; float or bool labels are refused (`.long()` would turn 1.7 into 1)."""
    try:
        labels = torch.as_tensor(expert_labels)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"`expert_labels` must be integers (one expert index per image, -100 for none), got "
                         f"{expert_labels!r}: pass a LongTensor such as `torch.tensor([1, 0, 2])`.") from error
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"`expert_labels` must be integers (one expert index per image, -100 for none), got {labels.dtype}: "
            "pass a LongTensor such as `torch.tensor([1, 0, 2])`."
        )
    return labels.long().reshape(-1)


def teacher_forced(choice: torch.LongTensor, labels: torch.LongTensor | None) -> torch.LongTensor:
    """`choice` where `labels` is -100 (or absent), the label elsewhere: a labelled image uses its labelled expert."""
    if labels is None:
        return choice
    labels = labels.to(choice.device)
    return torch.where(labels == -100, choice, labels)


# ------------------------------------------------------------------------------------------------------ loss


def lm_and_router_loss(
    model, logits, labels, router_logits, router_targets, num_items_in_batch=None, shift_labels=None
):
    """`(loss, lm_loss, router_loss)` for Chimera and Mixpert.

    `lm_loss` is the mean next-token cross-entropy over this micro-batch's label tokens and `router_loss` the mean
    router cross-entropy over its labelled rows (`-100` = no target); both are returned as they are, for logging.
    `loss = lm_loss + router_loss_weight * router_loss`, except under `Trainer`'s `num_items_in_batch` convention:
    when a model's `forward` takes `**kwargs`, `Trainer` passes the label-token count of the whole accumulated (and
    data-parallel) batch and stops dividing by the gradient-accumulation steps. Both terms are then multiplied by this
    micro-batch's share of those tokens: the LM term becomes exactly `sum / num_items_in_batch` (transformers' own
    rule), and the router term a weighted mean of the micro-batch router losses whose weights add up to 1 (the same
    scale as without accumulation, instead of once per micro-batch).
    """
    lm_loss = router_loss = None
    total = None
    # `shift_labels` (already shifted targets, as sequence / context parallelism passes them) take precedence over
    # `labels`, as in transformers' `ForCausalLMLoss`.
    targets = shift_labels if shift_labels is not None else (labels[..., 1:] if labels is not None else None)
    local_items = targets.ne(-100).sum() if targets is not None else None
    if targets is not None:
        lm_loss = model.loss_function(
            logits=logits, labels=labels, shift_labels=shift_labels,
            vocab_size=model.config.get_text_config().vocab_size, num_items_in_batch=local_items.clamp(min=1),
        )
        total = lm_loss
    if router_targets is not None and router_logits is not None and bool((router_targets != -100).any()):
        router_loss = torch.nn.functional.cross_entropy(
            router_logits.float(), router_targets.to(router_logits.device), ignore_index=-100
        )
        weighted = model.config.router_loss_weight * router_loss
        total = weighted if total is None else total + weighted
    if total is not None and num_items_in_batch is not None and local_items is not None:
        if int(num_items_in_batch) == 0:  # 0 / 0 would write NaN into every trained weight
            raise ValueError(
                "The accumulated batch has no label tokens (every label is -100), so its loss is undefined: every "
                "training row needs an answer (assistant turn) that is not cut off."
            )
        total = total * local_items.to(total.device) / torch.as_tensor(num_items_in_batch, device=total.device)
    return total, lm_loss, router_loss


# ------------------------------------------------------------------------------------------------ generation


def passthrough_generate_kwargs(**given) -> dict:
    """Arguments for `GenerationMixin.generate` when no routing is needed before decoding: only what was given
    (`GenerationMixin` encodes images whenever a `pixel_values` key exists, even `None`), plus an empty prompt of the
    right batch size for a prompt given as `inputs_embeds` alone (`GenerationMixin` would otherwise guess the batch
    size from the first tensor argument, which for packed or tiled images is not the batch)."""
    kwargs = {k: v for k, v in given.items() if v is not None}
    embeds = kwargs.get("inputs_embeds")
    if kwargs.get("input_ids") is None and embeds is not None:
        kwargs["input_ids"] = embeds.new_empty(embeds.shape[0], 0, dtype=torch.long)
    return kwargs


def image_rows_from_prompt(input_ids, inputs_embeds, embedding, image_token_id: int, counts: list) -> torch.LongTensor:
    """The batch row of each image, read off the prompt's placeholders (`input_ids`, or `inputs_embeds` when the
    prompt was given as embeddings; `counts`: placeholder tokens per image)."""
    if input_ids is None or input_ids.shape[1] == 0:
        input_ids = placeholder_ids(inputs_embeds, embedding, [image_token_id], fill=-1)
    rows = [row for row, _, _ in image_token_spans(input_ids, image_token_id, counts)]
    return torch.tensor(rows, dtype=torch.long, device=input_ids.device)


def repeat_images_for_generation(image_rows: torch.LongTensor, expand_size: int) -> tuple[list[int], list[int]]:
    """Beam search / `num_return_sequences` repeat each batch row `expand_size` times; return, for the repeated batch,
    which original image each new image is and the new image's row."""
    rows = image_rows.tolist()
    order, new_rows = [], []
    for row in sorted(set(rows)):
        for copy in range(expand_size):
            for image, r in enumerate(rows):
                if r == row:
                    order.append(image)
                    new_rows.append(row * expand_size + copy)
    return order, new_rows


# ---------------------------------------------------------------------------------------------- checkpoints


def no_split_layer_classes(model: nn.Module, declared) -> set[str]:
    """`_no_split_modules` for a model that nests other models: the names its children declared (`post_init` gathers
    them from direct children only) plus every gradient-checkpointing layer class inside it (the expert encoders sit
    below a `ModuleDict`, and transformers' GOT-OCR2 declares none), keeping only classes the model really has:
    accelerate's FSDP wrapping raises on a listed class it cannot find (CLIP and SigLIP vision towers declare their
    text embeddings too), and `device_map="auto"` needs none of those."""
    present = {type(module).__name__ for module in model.modules()}
    layers = {type(m).__name__ for m in model.modules() if isinstance(m, GradientCheckpointingLayer)}
    return (set(declared or ()) | layers) & present


class HubCheckpointMixin:
    """Loading and saving rules shared by Chimera and Mixpert (mixed into their `PreTrainedModel`).

    * `from_pretrained` reads safetensors only, and raises on a checkpoint whose weights do not match the config
      (missing, unexpected or wrong-shaped weights): routers, projectors and experts are never initialised at random
      on load.
    * `save_pretrained` writes every auto class of `_auto_map` into `config.auto_map` (a class remembers only one
      auto class), so the folder loads with `AutoConfig` / `AutoModel` / `AutoModelForImageTextToText`; and it saves
      the weights under the module names (`save_original_format=False`). transformers 5.23 otherwise renames the
      native backbones' keys to their legacy layout (`language_model.model.*`), which `from_pretrained` undoes but
      `Trainer`'s resume (a plain `load_state_dict`) does not: the LLM would silently stay at its initial weights.
    """

    _auto_map: dict = {}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("use_safetensors", True)
        name = cls.config_class.__name__
        if not isinstance(kwargs.get("config"), PretrainedConfig):
            cls._check_saved_model_type(pretrained_model_name_or_path, kwargs)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except SafetensorError as err:
            raise ValueError(
                f"The weights at {pretrained_model_name_or_path!r} cannot be read ({err}): a safetensors file is "
                "truncated or corrupt (an interrupted download or save). Download or save the model again."
            ) from err
        except RuntimeError as err:
            if "ignore_mismatched_sizes" not in str(err):
                raise
            raise ValueError(
                f"The checkpoint at {pretrained_model_name_or_path!r} holds weights whose shapes do not match its "
                f"{name} (see the load report above, e.g. a router or projector saved for another number of experts "
                "or another width). Fix `config.json` to describe the saved experts, or re-save the model after "
                "building it."
            ) from err
        missing = sorted(info.get("missing_keys", []))
        unexpected = sorted(info.get("unexpected_keys", []))
        if missing or unexpected:
            raise ValueError(
                f"The checkpoint at {pretrained_model_name_or_path!r} does not match its {name}: missing weights "
                f"{missing[:10]}{'...' if len(missing) > 10 else ''}, unexpected weights "
                f"{unexpected[:10]}{'...' if len(unexpected) > 10 else ''}. Nothing is initialised at random on load. "
                "Re-save the model with `save_pretrained` after building it (e.g. with `from_generalist` / "
                "`from_base`), or fix `config.json` so the experts and routers match the weights."
            )
        return (model, info) if want_info else model

    @classmethod
    def _check_saved_model_type(cls, path, kwargs) -> None:
        """The folder / repo must hold this model: a missing `config.json`, or another model's (a Chimera folder given
        to Mixpert), would otherwise build a default-sized model from defaults (~8B parameters) before failing."""
        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder") if k in kwargs}
        folder = os.path.join(str(path), hub.get("subfolder", ""))
        if os.path.isdir(str(path)) and not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"{path} has no config.json: it is not a saved model folder (save one with "
                                    f"`save_pretrained`).")
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):  # shard names are file names in this folder, never paths out of it
            with open(index) as f:
                shards = set(json.load(f).get("weight_map", {}).values())
            bad = sorted(n for n in shards if os.path.basename(n) != n or n in ("", ".", ".."))
            if bad:
                raise ValueError(f"{index} names shards outside its folder: {bad[:5]}. Shard names must be plain file "
                                 "names; re-save the model with `save_pretrained`.")
        found = cls.config_class.get_config_dict(path, **hub)[0].get("model_type")
        expected = cls.config_class.model_type
        if found != expected:
            raise ValueError(
                f"{path} holds a {found!r} model, not a {expected!r} one: load it with its own class "
                f"(`AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)` picks it)."
            )

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **self._auto_map}
        kwargs.setdefault("save_original_format", False)
        return super().save_pretrained(save_directory, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------- outputs


@dataclass
class RoutedImageFeatures(BaseModelOutputWithPooling):
    r"""
    `get_image_features` of a routed VLM: transformers' VLM contract (a `BaseModelOutputWithPooling` whose
    `pooler_output` holds one `(n_i, llm_hidden)` tensor per image) plus the routing. Each model's subclass documents
    its fields.

    router_logits (`torch.FloatTensor`): router scores, one row per routed image (or tile).
    expert_index (`torch.LongTensor`): the expert used per routed row.
    image_rows (`torch.LongTensor` of shape `(num_images,)`, *optional*): the batch row of each image (set by
        `generate`, used to repeat images with their rows for beam search).
    """

    router_logits: torch.FloatTensor | None = None
    expert_index: torch.LongTensor | None = None
    image_rows: torch.LongTensor | None = None

    #: fields with one entry per image, repeated with their image when `generate` repeats batch rows
    per_image_fields = ("pooler_output",)

    def for_images(self, order: list[int], image_rows: torch.LongTensor) -> RoutedImageFeatures:
        """The features of images `order` (with repeats), sitting in batch rows `image_rows`."""
        selected = {}
        for name in self.per_image_fields:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                selected[name] = value.index_select(0, torch.tensor(order, device=value.device))
            elif value is not None:
                selected[name] = tuple(value[i] for i in order)
        return type(self)(**selected, image_rows=image_rows)


@dataclass
class RoutedModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    The inner model's output: the native one plus `router_logits` and `expert_index` (see each model's subclass).
    """

    router_logits: torch.FloatTensor | None = None
    expert_index: torch.LongTensor | None = None


@dataclass
class RoutedCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    The LM output plus the two loss terms (`loss = lm_loss + router_loss_weight * router_loss`, see
    `lm_and_router_loss`) and the routing (see each model's subclass).
    """

    lm_loss: torch.FloatTensor | None = None
    router_loss: torch.FloatTensor | None = None
    router_logits: torch.FloatTensor | None = None
    expert_index: torch.LongTensor | None = None


# ----------------------------------------------------------------------------------------------------- models


class RoutedVLMPreTrainedModel(HubCheckpointMixin, PreTrainedModel):
    """Class attributes shared by Chimera's and Mixpert's models (as transformers' `LlavaPreTrainedModel`). Each model
    adds `config_class`, `_auto_map` and, in `_keep_in_fp32_modules_strict`, its router."""

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


class RoutedVLMModel(RoutedVLMPreTrainedModel):
    """The inner model (no LM head): the native VLM under `native_attr`, plus the model's router and experts.

    Subclasses set `native_attr` (the native model's attribute name) and `zero_label` (what expert 0 means), build
    their modules, then call `finish_init()`.
    """

    native_attr: str = ""
    zero_label: str = ""

    @property
    def family(self):
        """The `vlm_backbones` adapter bound to the native model (bound again when the native model is replaced, as
        `from_generalist` / `from_base` do)."""
        family = self.__dict__.get("_family")
        if family is None or family.backbone is not self.native:
            family = self.__dict__["_family"] = get_backbone_family(self.native)
        return family

    def finish_init(self):
        self.post_init()
        # The nested models' layer classes too, so `device_map="auto"` and FSDP's wrapping by class never split one.
        self._no_split_modules = no_split_layer_classes(self, self._no_split_modules)

    @property
    def native(self) -> nn.Module:
        """The native `LlavaOnevisionModel` / `Qwen2VLModel` / `InternVLModel` this model wraps."""
        return getattr(self, self.native_attr)

    def get_input_embeddings(self):
        return self.native.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.native.set_input_embeddings(value)

    @property
    def get_rope_index(self):
        """Qwen2-VL's 3D RoPE position function of the native model (absent for the other families, so `hasattr`
        tells whether the model uses 3D positions, as on the native models)."""
        return self.native.get_rope_index

    @property
    def domains(self) -> list[str]:
        return self.config.domains

    @property
    def image_token_id(self) -> int:
        """The native model's image placeholder token."""
        return self.family.image_token_id

    def _validate_expert_labels(self, expert_labels, num_images) -> torch.LongTensor | None:
        """`expert_labels` as a LongTensor of one label per image: 0 = `zero_label`, k = the k-th domain's expert,
        -100 = unlabelled (the router decides, no router loss)."""
        if expert_labels is None:
            return None
        labels = integer_labels(expert_labels)
        if labels.numel() != num_images:
            raise ValueError(
                f"`expert_labels` must hold one label per image ({num_images} images in this batch), got "
                f"{labels.numel()}. Use 0 for {self.zero_label}, k for the k-th expert ({self.domains}), -100 to let "
                "the router decide without a router loss."
            )
        bad = (labels != -100) & ((labels < 0) | (labels > len(self.domains)))
        if bad.any():
            raise ValueError(
                f"`expert_labels` out of range: {labels[bad].tolist()}. Valid: 0 ({self.zero_label}), "
                f"1..{len(self.domains)} for {self.domains}, or -100 (unlabelled)."
            )
        return labels


class RoutedVLMForConditionalGeneration(RoutedVLMPreTrainedModel, GenerationMixin):
    """The inner model plus the native LM head: logits, the loss, generation plumbing and assembly.

    Subclasses set `model_class` (their inner model) and `output_class`, and write `forward` with their own named
    inputs (Trainer keeps only the dataset columns `forward` names), ending in `self.logits_and_loss(...)`.
    """

    model_class: type = RoutedVLMModel
    output_class: type = RoutedCausalLMOutputWithPast
    _tp_plan = {"lm_head": "colwise_gather_output"}  # as the native VLMs: shard the head with the tied embedding

    def __init__(self, config):
        super().__init__(config)
        self.model = self.model_class(config)
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

    def get_image_features(self, pixel_values, **kwargs) -> RoutedImageFeatures:
        return self.model.get_image_features(pixel_values, **kwargs)

    # -- loss

    def router_targets(self, expert_labels, outputs) -> torch.LongTensor | None:
        """The router's cross-entropy targets, one per row of `outputs.router_logits` (-100 = none)."""
        if expert_labels is None or outputs.router_logits is None:
            return None
        return torch.as_tensor(expert_labels).long().reshape(-1)

    def logits_and_loss(self, outputs, labels, expert_labels, logits_to_keep, loss_kwargs: dict):
        """LM head on the inner model's output, the loss (`lm_and_router_loss`), and the model's output class."""
        hidden = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, slice_indices, :])
        loss, lm_loss, router_loss = lm_and_router_loss(
            self, logits, labels, outputs.router_logits, self.router_targets(expert_labels, outputs),
            loss_kwargs.get("num_items_in_batch"), loss_kwargs.get("shift_labels"),
        )
        own = {"loss", "logits", "lm_loss", "router_loss"}
        carried = {f.name: getattr(outputs, f.name, None) for f in fields(self.output_class) if f.name not in own}
        return self.output_class(loss=loss, lm_loss=lm_loss, router_loss=router_loss, logits=logits, **carried)

    @staticmethod
    def pop_loss_kwargs(kwargs: dict) -> dict:
        """`Trainer`'s `num_items_in_batch` and context parallelism's `shift_labels`: for the loss, not the LLM."""
        return {name: kwargs.pop(name, None) for name in ("num_items_in_batch", "shift_labels")}

    # -- generation

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        text_positions = super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        return self.model.family.generation_position_ids(text_positions, inputs_tensor, model_kwargs)

    def _expand_multimodal_outputs(self, input_ids, mm_encoder_output, expand_size=1, inputs_embeds=None):
        # Beam search / num_return_sequences repeat every row; repeat its images' features with it.
        features = mm_encoder_output.get("image")
        if not isinstance(features, RoutedImageFeatures):
            return super()._expand_multimodal_outputs(input_ids, mm_encoder_output, expand_size, inputs_embeds)
        if features.image_rows is None:  # encoded by `GenerationMixin` itself (a prompt given as embeddings)
            features.image_rows = image_rows_from_prompt(
                input_ids, inputs_embeds, self.get_input_embeddings(), self.model.image_token_id,
                [int(f.shape[0]) for f in features.pooler_output],
            )
        order, rows = repeat_images_for_generation(features.image_rows, expand_size)
        mm_encoder_output["image"] = features.for_images(order, torch.tensor(rows, device=features.image_rows.device))
        return mm_encoder_output

    @staticmethod
    def with_routing(output, features: RoutedImageFeatures):
        """A `generate` output with `return_dict_in_generate=True` also carries the routing of its images (and, where
        the features have it, `routed_image`: the image of each routed row, a tile with Mixpert's sub-image routing)."""
        if not isinstance(output, torch.Tensor):
            output["expert_index"] = features.expert_index
            output["router_logits"] = features.router_logits
            if getattr(features, "routed_image", None) is not None:
                output["routed_image"] = features.routed_image
        return output

    # -- assembly

    @staticmethod
    def load_native(native, dtype=None, argument: str = "generalist"):
        """A native `...ForConditionalGeneration` of a supported family, given as an object or a path / repo id
        (safetensors only)."""
        if isinstance(native, str):
            native = AutoModelForImageTextToText.from_pretrained(native, dtype=dtype, use_safetensors=True)
        if not hasattr(native, "lm_head") or not hasattr(native, "model"):
            raise ValueError(
                f"`{argument}` must be a native `...ForConditionalGeneration` model (with `.model` and `.lm_head`), "
                f"got {type(native).__name__}."
            )
        get_backbone_family(native.config)  # clear error for unsupported families
        return native

    @classmethod
    def around_native(cls, config, native):
        """The model built on the meta device (no memory, no initialisation), holding `native`'s own modules (not
        copies) as its native model and LM head. The caller attaches or materialises the rest (`materialise`)."""
        with torch.device("meta"), no_init_weights():
            model = cls(config)
        setattr(model.model, cls.model_class.native_attr, native.model)
        model.lm_head = native.lm_head
        model.generation_config = native.generation_config
        return model

    def materialise(self, modules, reference: torch.Tensor):
        """Allocate `modules` (still on the meta device) where `reference` lives and initialise them; routers
        (`_keep_in_fp32_modules_strict`) in fp32, the rest in `reference`'s dtype."""
        # The class's own list: `post_init` adds the nested models' name patterns to the instance's.
        fp32 = [getattr(self.model, name, None) for name in type(self)._keep_in_fp32_modules_strict]
        for module in modules:
            module.to_empty(device=reference.device)
            for sub in module.modules():
                self._init_weights(sub)
            module.to(torch.float32 if any(module is m for m in fp32) else reference.dtype)
