# Copyright 2026 The Chimera/Mixpert HF port authors. Licensed under the Apache License, Version 2.0.
"""Everything this project knows about the vision encoders Chimera uses as frozen experts (Chimera §3.2).

`EXPERT_FAMILIES` is the one table of expert families. Per family it says

* which `vision_config.model_type`s it covers, and which full checkpoints (`config.model_type`) hold such an encoder,
* which transformers class runs the encoder, how it is built from a config and how a checkpoint is loaded,
* how the encoder is called and how its output becomes `(n, tokens, hidden)` features (`encode`),
* how wide those features are and whether token 0 is a CLS token,
* which image processors feed it, and under which input name.

Any other vision model that `AutoModel` builds from its config, called with `pixel_values` and returning
`last_hidden_state` (SigLIP, DINOv2, ...), is served by the base class `ExpertFamily`.

Like `vlm_backbones.py`, this is a Hub file: Chimera's configuration, modeling and processing files import it
relatively.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers import AutoConfig


# Model classes are read off `transformers`' lazy modules when a family needs them, so that importing this table (the
# configuration and the processor do) does not import every expert's modeling code.


class GotOcr2ExpertBackbone(nn.Module):
    """GOT-OCR2's SAM-style encoder followed by its two stride-2 convolutions: 256 tokens for a 1024 px image.

    This is the official Chimera GOT expert (`GoTVisionModel` with `net_2` / `net_3`). In transformers the two
    convolutions live in `GotOcr2MultiModalProjector` (`conv_upsampler1/2`); the final linear of that projector is
    not part of the expert (Chimera's own expert projector follows).
    """

    def __init__(self, config):
        super().__init__()
        channels = config.vision_config.output_channels
        hidden = config.text_config.hidden_size
        self.vision_tower = transformers.models.got_ocr2.modeling_got_ocr2.GotOcr2VisionEncoder(config.vision_config)
        self.conv_upsampler1 = nn.Conv2d(channels, channels * 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.conv_upsampler2 = nn.Conv2d(channels * 2, hidden, kernel_size=3, stride=2, padding=1, bias=False)

    def forward(self, pixel_values):
        features = self.vision_tower(pixel_values).last_hidden_state  # (B, C, H/16, W/16)
        features = self.conv_upsampler2(self.conv_upsampler1(features))  # (B, hidden, H/64, W/64)
        return features.flatten(2).transpose(1, 2)


class ExpertFamily:
    """A vision model that `AutoModel` builds, called with `pixel_values`, returning `last_hidden_state` (and
    `hidden_states` on request). Subclasses override what their family does differently."""

    #: `vision_config.model_type`s of the encoders this family runs
    vision_model_types: tuple = ()
    #: `model_type`s of full checkpoints (a whole CLIP, a whole OCR model...) whose vision part is such an encoder
    checkpoint_model_types: tuple = ()
    #: the `vision_config.model_type`s whose token 0 is a CLS token (dropped before projecting, official `uni_encode`)
    cls_token_types: tuple = ("clip_vision_model", "internvl_vision")
    #: image processor classes that feed this family, and the name of their output the encoder takes
    image_processors: tuple = ()
    input_name: str = "pixel_values"

    def encoder_class(self, vision_config) -> type:
        """The transformers class that runs the encoder (its attention support flags are read off it)."""
        return transformers.MODEL_MAPPING[type(vision_config)]

    def build(self, vision_config) -> nn.Module:
        return self.encoder_class(vision_config)(vision_config)

    def hidden_size(self, vision_config) -> int:
        """Width of the features the encoder produces (the expert projector's input)."""
        return vision_config.hidden_size

    def has_cls_token(self, vision_config) -> bool:
        return vision_config.model_type in self.cls_token_types

    def encode(self, encoder: nn.Module, inputs: torch.Tensor, feature_layer: int | None) -> torch.Tensor:
        """`(n, tokens, hidden)` features of the preprocessed `inputs`: the last output, or `hidden_states[i]`."""
        outputs = encoder(pixel_values=inputs, return_dict=True, output_hidden_states=feature_layer is not None)
        return self.selected(outputs, feature_layer)

    @classmethod
    def selected(cls, outputs, feature_layer: int | None) -> torch.Tensor:
        """The encoder output the expert reads: `last_hidden_state`, or `hidden_states[feature_layer]`, as tokens."""
        features = outputs.last_hidden_state if feature_layer is None else outputs.hidden_states[feature_layer]
        return cls.as_tokens(features, feature_layer)

    @staticmethod
    def as_tokens(features: torch.Tensor, feature_layer: int | None) -> torch.Tensor:
        """Feature maps as token sequences: a `(B, C, H, W)` final map (a convolutional neck, as GOT-OCR2's) or a
        `(B, H, W, C)` layer output becomes `(B, H * W, C)`."""
        if features.dim() != 4:
            return features
        return features.flatten(2).transpose(1, 2) if feature_layer is None else features.flatten(1, 2)

    def load(self, path: str, model_type: str, dtype=None) -> nn.Module:
        """A checkpoint of this family (safetensors only)."""
        return transformers.AutoModel.from_pretrained(path, dtype=dtype, use_safetensors=True)

    def vision_part(self, model: nn.Module) -> tuple:
        """`(vision_config, encoder module)` of a model object of this family: the object itself for a vision model,
        its vision half for a full model (in transformers 5 a whole CLIP / SigLIP holds it as `vision_model`)."""
        if model.config.model_type in self.checkpoint_model_types and hasattr(model, "vision_model"):
            return model.config.vision_config, model.vision_model
        return model.config, model


class ClipSiglipFamily(ExpertFamily):
    vision_model_types = ("clip_vision_model", "siglip_vision_model", "siglip2_vision_model")
    checkpoint_model_types = ("clip", "siglip", "siglip2")


class Pix2StructFamily(ExpertFamily):
    """Pix2Struct's encoder: inputs are flattened patches `[row, col, pixels]`; all-zero rows are padding (the
    processor's own mask rule)."""

    vision_model_types = ("pix2struct_vision_model",)
    checkpoint_model_types = ("pix2struct",)
    image_processors = ("Pix2StructImageProcessor", "Pix2StructImageProcessorFast")
    input_name = "flattened_patches"

    def encoder_class(self, vision_config) -> type:
        return transformers.Pix2StructVisionModel

    def encode(self, encoder, inputs, feature_layer):
        outputs = encoder(flattened_patches=inputs, attention_mask=(inputs.sum(-1) != 0).long(), return_dict=True,
                          output_hidden_states=feature_layer is not None)
        return self.selected(outputs, feature_layer)

    def load(self, path, model_type, dtype=None):
        model_class = transformers.Pix2StructForConditionalGeneration
        if model_type == "pix2struct_vision_model":
            model_class = transformers.Pix2StructVisionModel
        return model_class.from_pretrained(path, dtype=dtype, use_safetensors=True)

    def vision_part(self, model):
        if model.config.model_type == "pix2struct" and hasattr(model, "encoder"):
            return model.config.vision_config, model.encoder
        return model.config, model


class Kosmos25Family(Pix2StructFamily):
    """Kosmos-2.5's Pix2Struct-like encoder (attention scaled by 1/sqrt(head_dim)); `AutoModel` has no mapping for it.
    A full Kosmos-2.5's vision encoder is the expert, as in the official Chimera table expert."""

    vision_model_types = ("kosmos_2_5_vision_model",)
    checkpoint_model_types = ("kosmos-2.5",)
    image_processors = ("Kosmos2_5ImageProcessor", "Kosmos2_5ImageProcessorFast")

    def encoder_class(self, vision_config) -> type:
        return transformers.models.kosmos2_5.modeling_kosmos2_5.Kosmos2_5VisionModel

    def encode(self, encoder, inputs, feature_layer):
        if feature_layer is None:
            return super().encode(encoder, inputs, None)
        # Kosmos2_5VisionModel returns only `last_hidden_state`: read the layers from its encoder.
        outputs = encoder.encoder(encoder.embeddings(inputs), attention_mask=(inputs.sum(-1) != 0).long(),
                                  output_hidden_states=True)
        return self.as_tokens(outputs.hidden_states[feature_layer], feature_layer)

    def load(self, path, model_type, dtype=None):
        return transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, use_safetensors=True)

    def vision_part(self, model):
        return ExpertFamily.vision_part(self, model)


class GotOcr2VisionFamily(ExpertFamily):
    """GOT-OCR2's SAM-style encoder alone: its tokens are the neck's `(B, C, H, W)` map (or a layer's
    `(B, H, W, C)`)."""

    vision_model_types = ("got_ocr2_vision",)

    def encoder_class(self, vision_config) -> type:
        return transformers.models.got_ocr2.modeling_got_ocr2.GotOcr2VisionEncoder

    def hidden_size(self, vision_config) -> int:
        return vision_config.output_channels


class GotOcr2Family(GotOcr2VisionFamily):
    """GOT-OCR2's encoder and its two convolutions (`GotOcr2ExpertBackbone`), the official Chimera GOT expert; the
    expert's `vision_config` is the whole `got_ocr2` config."""

    vision_model_types = ("got_ocr2",)
    checkpoint_model_types = ("got_ocr2",)

    def build(self, vision_config):
        return GotOcr2ExpertBackbone(vision_config)

    def hidden_size(self, vision_config) -> int:
        return vision_config.text_config.hidden_size

    def encode(self, encoder, inputs, feature_layer):
        return encoder(inputs)

    def load(self, path, model_type, dtype=None):
        return transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, use_safetensors=True)

    def vision_part(self, model):
        inner = model.model if hasattr(model, "model") else model
        with torch.device("meta"):
            module = GotOcr2ExpertBackbone(model.config)
        module.vision_tower = inner.vision_tower
        module.conv_upsampler1 = inner.multi_modal_projector.conv_upsampler1
        module.conv_upsampler2 = inner.multi_modal_projector.conv_upsampler2
        return model.config, module


EXPERT_FAMILIES = (ClipSiglipFamily(), Pix2StructFamily(), Kosmos25Family(), GotOcr2VisionFamily(), GotOcr2Family())
_ANY_VISION_MODEL = ExpertFamily()


def get_expert_family(model_type: str) -> ExpertFamily:
    """The family of an expert encoder (`vision_config.model_type`) or of a full checkpoint holding one
    (`config.model_type`); any other vision model gets the `AutoModel` default."""
    for family in EXPERT_FAMILIES:
        if model_type in family.vision_model_types or model_type in family.checkpoint_model_types:
            return family
    return _ANY_VISION_MODEL


def expert_input_name(image_processor) -> str:
    """Which output of an expert's image processor its encoder consumes."""
    name = type(image_processor).__name__
    return next((f.input_name for f in EXPERT_FAMILIES if name in f.image_processors), ExpertFamily.input_name)


def load_expert_encoder(spec, dtype=None) -> tuple:
    """`(vision_config, module)` for an expert given as a model object or a path / repo id (safetensors only)."""
    if isinstance(spec, str):
        model_type = AutoConfig.from_pretrained(spec).model_type
        spec = get_expert_family(model_type).load(spec, model_type, dtype)
    if not isinstance(spec, nn.Module) or not hasattr(spec, "config"):
        raise ValueError(f"An expert must be a transformers vision model or a path to one, got {type(spec).__name__}.")
    return get_expert_family(spec.config.model_type).vision_part(spec)
