# Copyright 2026 The Chimera/Mixpert HF port authors. Licensed under the Apache License, Version 2.0.
"""Chimera configuration (Chimera: Improving Generalist Model with Domain-Specific Experts, arXiv 2412.05983)."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


try:  # loaded as part of a Hub repo through `trust_remote_code` (relative imports) ...
    from .expert_encoders import get_expert_family
    from .vlm_backbones import SUPPORTED_FAMILIES, unsupported_family_error
except ImportError:  # ... or as an installed top-level module (`pip install -e .`)
    from expert_encoders import get_expert_family
    from vlm_backbones import SUPPORTED_FAMILIES, unsupported_family_error


ROUTER_FEATURES = ("auto", "cls", "mean")


class ChimeraExpertConfig(PreTrainedConfig):
    r"""
    One domain expert of Chimera: a frozen vision encoder of any Hugging Face vision family plus the choice of which
    of its outputs become the expert's visual tokens (Chimera §3.2).

    Args:
        domain (`str`):
            Domain name, e.g. `"table"`, `"chart"`, `"math"`, `"document"`. Unique within a model.
        vision_config (`dict` or `PreTrainedConfig`):
            The expert encoder's config. Supported families: `clip_vision_model`, `siglip_vision_model`,
            `pix2struct_vision_model` (inputs are flattened patches), `got_ocr2_vision` (the SAM-style GOT-OCR2
            encoder; tokens are its neck map), `got_ocr2` (the GOT encoder followed by GOT-OCR2's two stride-2
            convolutions, 256 tokens at 1024 px, the official Chimera GOT expert), and any other vision model that
            `AutoModel.from_config` builds and that takes `pixel_values` and returns `last_hidden_state`.
        feature_layer (`int`, *optional*):
            `None` (default) takes the encoder's final output (`last_hidden_state`, for Pix2Struct after its final
            norm, for CLIP before `post_layernorm`). An integer `i` takes `hidden_states[i]`.
        feature_select_strategy (`str`, *optional*):
            `"default"` drops token 0 (the CLS token), `"full"` keeps every token. `None` (default) drops it for
            towers that have a CLS token (CLIP) and keeps everything otherwise.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the expert projector (LayerNorm -> Linear -> act -> Linear).
    """

    model_type = "chimera_expert"
    sub_configs_defaults = {"vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model")}

    domain: str = "expert"
    vision_config: dict | PreTrainedConfig | None = None
    feature_layer: int | None = None
    feature_select_strategy: str | None = None
    projector_hidden_act: str = "gelu"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not isinstance(self.domain, str) or not self.domain:
            raise ValueError(f"An expert's `domain` must be a non-empty string, got {self.domain!r}.")
        if self.feature_select_strategy is None:
            # Towers with a CLS token drop it before projecting (official `uni_encode`: `[:, 1:]`).
            cls_token = get_expert_family(self.vision_config.model_type).has_cls_token(self.vision_config)
            self.feature_select_strategy = "default" if cls_token else "full"
        if self.feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"Expert {self.domain!r}: `feature_select_strategy` must be 'default' (drop CLS) or 'full', "
                f"got {self.feature_select_strategy!r}."
            )


class ChimeraConfig(PreTrainedConfig):
    r"""
    Configuration of [`ChimeraForConditionalGeneration`]: a native generalist VLM plus frozen domain-expert vision
    encoders, a router that picks at most one expert per image, and Generalist-Specialist Collaboration Masking.

    Args:
        generalist_config (`dict` or `PreTrainedConfig`):
            The generalist's full config; its `model_type` must be one of `llava_onevision`, `qwen2_vl`, `internvl`.
            Defaults to a default `internvl` config (the paper's generalist family).
        experts (`list[ChimeraExpertConfig | dict]`):
            The experts in order: expert `k` (1-based) is router class `k` and `expert_labels == k`; class 0 means
            "no expert".
        expert_token_ids (`list[int]`, *optional*):
            One placeholder token id per expert (the official `<DOMAIN_i_CONTEXT>` tokens). The model inserts
            `n_k` copies of expert `k`'s id after an image routed to it and fills them with the expert's features;
            users never type them. [`ChimeraForConditionalGeneration.from_generalist`] adds rows to the vocabulary
            for them when not given.
        expert_start_token_id (`int`, *optional*):
            Token written before every expert block (official Chimera: `<domain>`). `None`: no wrapper.
        expert_end_token_id (`int`, *optional*):
            Token written after every expert block (official Chimera: `</domain>`). `None`: no wrapper.
        expert_insert_after_token_id (`int`, *optional*):
            If this token immediately follows an image's last generalist token (InternVL's `</img>`), the expert
            block goes after it, as in the official layout. `None` (default): right after the last image token.
        router_feature (`str`, *optional*, defaults to `"auto"`):
            What the router reads from the generalist encoder for each image (Chimera §3.2): `"cls"` (CLS token of
            the feature layer), `"mean"` (mean over tokens), or `"auto"` (CLS where the tower has one, InternViT;
            mean for SigLIP and Qwen2-VL's ViT). It is read from the tile that shows the whole image (InternVL's
            thumbnail, LLaVA-OneVision's base crop).
        router_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the router cross-entropy added to the LM loss when `expert_labels` are given (paper: 1).
        gscm_ratio (`float`, *optional*, defaults to 0.0):
            Generalist-Specialist Collaboration Masking (Chimera §3.3): in training mode, for every image that uses
            an expert, `int(gscm_ratio * n)` of its `n` generalist tokens, drawn uniformly at random, get attention
            mask 0. Must be in `[0, 1)`; 0 disables it. Never applied in eval mode.
        tie_word_embeddings (`bool`, *optional*):
            Mirrors the generalist's setting when not given.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the normal init of the router and the expert projectors.
    """

    model_type = "chimera"
    sub_configs_defaults = {"generalist_config": SubConfigSpec(config_class=AutoConfig, model_type="internvl")}

    generalist_config: dict | PreTrainedConfig | None = None
    experts: list | None = None
    expert_token_ids: list | None = None
    expert_start_token_id: int | None = None
    expert_end_token_id: int | None = None
    expert_insert_after_token_id: int | None = None
    router_feature: str = "auto"
    router_loss_weight: float = 1.0
    gscm_ratio: float = 0.0
    tie_word_embeddings: bool | None = None
    initializer_range: float = 0.02

    @property
    def _attn_implementation(self):
        return self._attn_implementation_internal

    @_attn_implementation.setter
    def _attn_implementation(self, value):
        # transformers sets the attention implementation recursively on `sub_configs` only; the experts are a list of
        # configs (their number varies), so pass it on to each expert here too. A dict value may name an expert's
        # domain, e.g. `{"": "sdpa", "table": "eager"}`; otherwise each expert takes the top-level value.
        PreTrainedConfig._attn_implementation.fset(self, value)
        for expert in getattr(self, "experts", None) or []:
            if isinstance(expert, ChimeraExpertConfig):
                expert._attn_implementation = (
                    value.get(expert.domain, self._attn_implementation_internal) if isinstance(value, dict) else value
                )

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.generalist_config.model_type not in SUPPORTED_FAMILIES:
            raise unsupported_family_error(self.generalist_config.model_type)
        self.experts = [
            e if isinstance(e, ChimeraExpertConfig) else ChimeraExpertConfig(**e) for e in (self.experts or [])
        ]
        if self._attn_implementation_internal is not None:
            self._attn_implementation = self._attn_implementation_internal  # reach the experts built just now
        self._check_experts()
        if self.router_feature not in ROUTER_FEATURES:
            raise ValueError(f"`router_feature` must be one of {ROUTER_FEATURES}, got {self.router_feature!r}.")
        if not 0.0 <= float(self.gscm_ratio) < 1.0:
            raise ValueError(
                f"`gscm_ratio` must be in [0, 1) (the fraction of generalist image tokens masked), got "
                f"{self.gscm_ratio}."
            )
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.generalist_config, "tie_word_embeddings", False))

    def _check_experts(self):
        """Distinct domain names, and one distinct placeholder token id per expert."""
        domains = [e.domain for e in self.experts]
        duplicates = sorted({d for d in domains if domains.count(d) > 1})
        if duplicates:
            raise ValueError(f"Duplicate expert domain names {duplicates}: every expert needs its own domain name.")
        if self.expert_token_ids is not None:
            self.expert_token_ids = [int(t) for t in self.expert_token_ids]
            if len(self.expert_token_ids) != len(self.experts) or len(set(self.expert_token_ids)) != len(self.experts):
                raise ValueError(
                    f"`expert_token_ids` must hold one distinct id per expert ({len(self.experts)}), got "
                    f"{self.expert_token_ids}."
                )

    @property
    def num_experts_with_none(self) -> int:
        """Router classes: the experts plus class 0 ("no expert")."""
        return len(self.experts) + 1

    @property
    def domains(self) -> list[str]:
        return [e.domain for e in self.experts]

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        return self.generalist_config.get_text_config(decoder=decoder, encoder=encoder)

    @property
    def vision_config(self) -> PreTrainedConfig:
        """The generalist's vision-tower config (where transformers' VLM tooling looks for `config.vision_config`)."""
        return self.generalist_config.vision_config

    def to_dict(self):
        output = super().to_dict()
        output["experts"] = [_expert_to_dict(e) for e in self.experts]
        return output


def _expert_to_dict(expert: ChimeraExpertConfig) -> dict:
    d = expert.to_dict()
    d.pop("transformers_version", None)
    return d


ChimeraConfig.register_for_auto_class()

__all__ = ["ChimeraConfig", "ChimeraExpertConfig"]
