# Copyright 2026 The Chimera/Mixpert HF port authors. Licensed under the Apache License, Version 2.0.
"""Mixpert configuration (Mixpert: Mitigating Multimodal Learning Conflicts with Efficient Mixture-of-Vision-Experts,
arXiv 2505.24541)."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


try:
    from .vlm_backbones import SUPPORTED_FAMILIES, get_backbone_family, unsupported_family_error
except ImportError:
    from vlm_backbones import SUPPORTED_FAMILIES, get_backbone_family, unsupported_family_error


ROUTING_STRATEGIES = ("direct", "score_threshold", "score_difference")
ROUTING_GRANULARITIES = ("image", "sub_image")


class MixpertConfig(PreTrainedConfig):
    r"""
    Configuration of [`MixpertForConditionalGeneration`]: a native VLM whose last vision layers and projector become a
    mixture of per-domain experts plus a *versatile* expert (the original weights), chosen per image by a router.

    Args:
        base_config (`dict` or `PreTrainedConfig`):
            The base model's full config; `model_type` one of `llava_onevision`, `qwen2_vl`, `internvl`. Defaults to a
            default `llava_onevision` config (the paper's main base model).
        domains (`list[str]`, *optional*, defaults to `["chart", "document", "math", "ocr", "general"]`):
            Domain experts in order (paper §4.1). Expert `k` (1-based) is router class `k - 1` and `expert_labels ==
            k`; `expert_labels == 0` selects the versatile expert, which is the router's fallback, not a class.
        num_expert_layers (`int`, *optional*, defaults to 2):
            `K`, how many of the last vision layers each expert owns (paper: 2). The layers before them are shared.
            Must satisfy `1 <= K < D`, `D` the number of tower layers whose output reaches the LLM.
        expert_projector (`bool`, *optional*, defaults to `True`):
            Whether each expert has its own copy of the projector (paper: yes); if not, experts share the base one.
        router_hidden_size (`int`, *optional*):
            Hidden width of the 2-layer router MLP (paper §3.3). Defaults to the vision tower's width.
        routing_strategy (`str`, *optional*, defaults to `"score_difference"`):
            How router scores pick an expert at inference (paper §3.3): `"direct"` (argmax), `"score_threshold"`
            (versatile if the top probability is below `routing_threshold`), `"score_difference"` (versatile if the
            top-1 minus top-2 probability is below `routing_threshold`; paper eq. 2, best with 0.6).
        routing_threshold (`float`, *optional*, defaults to 0.6):
            `λ` for `score_threshold`, `τ` for `score_difference`; must be in `[0, 1]`.
        routing_granularity (`str`, *optional*, defaults to `"image"`):
            `"image"`: one decision per image from the shared features pooled over all its tiles. `"sub_image"`: every
            tile (crop) of a tiled image is routed on its own (paper Table 8). Qwen2-VL has no tiles, so only `"image"`.
        router_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the router cross-entropy in the loss when `expert_labels` are given.
        tie_word_embeddings (`bool`, *optional*):
            Mirrors the base model's setting when not given.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the normal init of the router.
    """

    model_type = "mixpert"
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="llava_onevision")}

    base_config: dict | PreTrainedConfig | None = None
    domains: list | None = None
    num_expert_layers: int = 2
    expert_projector: bool = True
    router_hidden_size: int | None = None
    routing_strategy: str = "score_difference"
    routing_threshold: float = 0.6
    routing_granularity: str = "image"
    router_loss_weight: float = 1.0
    tie_word_embeddings: bool | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        model_type = self.base_config.model_type
        if model_type not in SUPPORTED_FAMILIES:
            raise unsupported_family_error(model_type)
        family = get_backbone_family(self.base_config)
        self._check_domains()
        depth = family.used_depth
        if not isinstance(self.num_expert_layers, int) or not 1 <= self.num_expert_layers < depth:
            raise ValueError(
                f"`num_expert_layers` must be between 1 and {depth - 1}: this {model_type} vision tower feeds the LLM "
                f"from layer {depth}, and at least one layer must stay shared for the router. Got "
                f"{self.num_expert_layers}."
            )
        self._check_routing(family)
        if self.router_hidden_size is None:
            self.router_hidden_size = family.tower_hidden_size
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.base_config, "tie_word_embeddings", False))

    def _check_domains(self):
        """A non-empty list of distinct names without dots; "versatile" is reserved for the fallback expert."""
        default = ["chart", "document", "math", "ocr", "general"]
        self.domains = list(self.domains) if self.domains is not None else default
        if not self.domains or not all(isinstance(d, str) and d and "." not in d for d in self.domains):
            raise ValueError(f"`domains` must be a non-empty list of non-empty names without dots, got {self.domains}.")
        duplicates = sorted({d for d in self.domains if self.domains.count(d) > 1})
        if duplicates:
            raise ValueError(f"Duplicate domain names {duplicates}: every expert needs its own domain name.")
        if "versatile" in self.domains:
            raise ValueError("'versatile' is the name of the fallback expert (expert_labels == 0); pick another domain "
                             "name.")

    def _check_routing(self, family):
        """The routing rule and granularity (Mixpert §3.3) and what the backbone family allows."""
        model_type = self.base_config.model_type
        if self.routing_strategy not in ROUTING_STRATEGIES:
            raise ValueError(f"`routing_strategy` must be one of {ROUTING_STRATEGIES}, got {self.routing_strategy!r}.")
        if not 0.0 <= float(self.routing_threshold) <= 1.0:
            raise ValueError(
                f"`routing_threshold` must be in [0, 1] (it is compared with router probabilities), got "
                f"{self.routing_threshold}."
            )
        if self.routing_granularity not in ROUTING_GRANULARITIES:
            raise ValueError(
                f"`routing_granularity` must be one of {ROUTING_GRANULARITIES}, got {self.routing_granularity!r}."
            )
        if self.routing_granularity == "sub_image" and not family.has_tiles:
            raise ValueError(
                f"{model_type} encodes each image whole at native resolution (no tiles): use "
                "routing_granularity='image'."
            )

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        return self.base_config.get_text_config(decoder=decoder, encoder=encoder)

    @property
    def vision_config(self) -> PreTrainedConfig:
        """The base model's vision-tower config (where transformers' VLM tooling looks for `config.vision_config`)."""
        return self.base_config.vision_config


MixpertConfig.register_for_auto_class()

__all__ = ["MixpertConfig"]
