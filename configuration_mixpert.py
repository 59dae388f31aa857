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
EXPERT_ADAPTERS = ("full", "lora")


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
            Must satisfy `0 <= K <= D`, `D` the number of tower layers whose output reaches the LLM (Mixpert Table 2
            scans `K` over that range). `K = 0`: the whole tower is shared and each expert owns only what turns the
            tower output into LLM tokens (its projector, plus the tower's final norm where the family applies one,
            e.g. InternVL with `vision_feature_layer=-1`), which needs `expert_projector=True`. `K = D`: every tower
            layer is in the experts, only the patch embedding (+ positions) stays shared, and the router pools the
            embedding output.
        expert_projector (`bool`, *optional*, defaults to `True`):
            Whether each expert has its own copy of the projector (paper: yes); if not, experts share the base one.
        expert_adapter (`str`, *optional*, defaults to `"full"`):
            What a domain expert holds. `"full"`: its own copy of the modules it replaces (Mixpert §3.2). `"lora"`: a
            low-rank update of them (LoRA, Hu et al. 2021, arXiv 2106.09685; not in the paper): every `nn.Linear`
            weight `W` of the replaced layers / projector stays the versatile expert's (shared, stored once) and the
            expert runs with `W + (expert_lora_alpha / expert_lora_rank) * B @ A`, `A` (rank x in) and `B` (out x
            rank) its own; its other parameters (norms, biases, layer scales: vectors) are its own trainable copies.
        expert_lora_rank (`int`, *optional*):
            LoRA rank `r` of every expert matrix with `expert_adapter="lora"` (defaults to 16 there); a positive
            integer. A rank above `min(in, out)` of a layer is allowed (the update's rank is capped by that) but wastes
            parameters: a warning names the layer. Must stay unset with `expert_adapter="full"`.
        expert_lora_alpha (`float`, *optional*):
            LoRA `alpha`, positive; the update is scaled by `alpha / r` (PEFT's `lora_alpha`). Defaults to
            `2 * expert_lora_rank` with `expert_adapter="lora"`; must stay unset with `expert_adapter="full"`.
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
    expert_adapter: str = "full"
    expert_lora_rank: int | None = None
    expert_lora_alpha: float | None = None
    router_hidden_size: int | None = None
    routing_strategy: str = "score_difference"
    routing_threshold: float = 0.6
    routing_granularity: str = "image"
    router_loss_weight: float = 1.0
    tie_word_embeddings: bool | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_fields()

    def check_fields(self):
        """Check every field and fill the defaults that depend on others (LoRA rank / alpha, router width, tied
        embeddings). `__post_init__` runs it, and so does `MixpertModel.__init__`: keyword overrides of
        `from_pretrained(..., expert_adapter="lora", expert_lora_rank=4)` are set on the config after `__post_init__`
        (transformers' `PreTrainedConfig.from_dict`), and must not skip the checks or leave a default unfilled."""
        model_type = self.base_config.model_type
        if model_type not in SUPPORTED_FAMILIES:
            raise unsupported_family_error(model_type)
        family = get_backbone_family(self.base_config)
        self._check_domains()
        depth = family.used_depth
        self._check_num_expert_layers(depth)
        self._check_routing(family)
        self._check_expert_adapter()
        if self.router_hidden_size is None:
            self.router_hidden_size = family.tower_hidden_size
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.base_config, "tie_word_embeddings", False))

    def _check_num_expert_layers(self, depth: int):
        """`0 <= K <= D` (Mixpert Table 2's scan), and experts that own something."""
        k = self.num_expert_layers
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= depth:
            raise ValueError(
                f"`num_expert_layers` must be an integer between 0 and {depth} (0: experts own only the projector; "
                f"{depth}: every layer of this {self.base_config.model_type} vision tower whose output reaches the "
                f"LLM, whose used depth is {depth}). Got {k!r}."
            )
        if k == 0 and not self.expert_projector:
            raise ValueError(
                "`num_expert_layers=0` with `expert_projector=False` gives the experts no layer and no projector of "
                "their own: every expert would be the versatile one. Set `expert_projector=True` or "
                "`num_expert_layers >= 1`."
            )

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

    def _check_expert_adapter(self):
        """`expert_adapter` is "full" or "lora"; the LoRA rank / alpha are positive and only set for LoRA experts."""
        if self.expert_adapter not in EXPERT_ADAPTERS:
            raise ValueError(f"`expert_adapter` must be one of {EXPERT_ADAPTERS}, got {self.expert_adapter!r}.")
        lora = {"expert_lora_rank": self.expert_lora_rank, "expert_lora_alpha": self.expert_lora_alpha}
        if self.expert_adapter == "full":
            given = [name for name, value in lora.items() if value is not None]
            if given:
                raise ValueError(f"{', '.join(f'`{n}`' for n in given)} only apply to LoRA experts: full-copy experts "
                                 "(expert_adapter='full') have no rank. Pass expert_adapter='lora' or drop them.")
            return
        rank = 16 if self.expert_lora_rank is None else self.expert_lora_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"`expert_lora_rank` must be a positive integer (the LoRA rank r), got {rank!r}.")
        alpha = 2 * rank if self.expert_lora_alpha is None else self.expert_lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"`expert_lora_alpha` must be a positive number (the update is scaled by alpha / r), got "
                             f"{alpha!r}.")
        self.expert_lora_rank, self.expert_lora_alpha = rank, alpha

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
