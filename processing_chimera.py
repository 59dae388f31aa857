# Copyright 2026 The Chimera/Mixpert HF port authors. Licensed under the Apache License, Version 2.0.
"""ChimeraProcessor: the generalist's own processor plus one image processor per expert encoder."""

from __future__ import annotations

import inspect

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import BatchFeature, ProcessorMixin


try:  # loaded as part of a Hub repo through `trust_remote_code` (relative imports) ...
    from .expert_encoders import expert_input_name
except ImportError:  # ... or as an installed top-level module (`pip install -e .`)
    from expert_encoders import expert_input_name


DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
"""Largest image (width x height) the processor accepts by default: 8000 x 8000. A 10 000 x 10 000 image costs ~4 GB
in preprocessing before anything else says no; raise the limit with `max_image_pixels=` where that is intended."""


def _check_pixels(width: int, height: int, what: str, max_pixels: int | None) -> None:
    if width == 0 or height == 0:
        raise ValueError(f"{what}: empty image of size {width}x{height}; every image needs at least 1x1 pixels.")
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(
            f"{what}: {width}x{height} = {width * height} pixels, more than max_image_pixels={max_pixels}. Downscale "
            "it, or raise the limit (`ChimeraProcessor(..., max_image_pixels=N)` / `processor.max_image_pixels = N`)."
        )


def _to_uint8(array: np.ndarray, what: str, sixteen_bit: bool = False) -> np.ndarray:
    """Integer images by their bit depth (16-bit: 0..65535), float images in [0, 1] or [0, 255], to 8 bits. A plain
    `.convert("RGB")` or `astype(uint8)` clips 16-bit values (an almost white image) and float ones (a black one)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        return _float_to_uint8(array, what)
    if np.issubdtype(array.dtype, np.integer):
        return _integer_to_uint8(array, what, sixteen_bit)
    raise ValueError(f"{what}: unsupported pixel type {array.dtype}.")


def _float_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: the image holds NaN or infinite pixel values.")
    low, high = float(array.min()), float(array.max())
    if low >= 0.0 and high <= 1.0:
        return np.round(array * 255.0).astype(np.uint8)
    if low >= 0.0 and high <= 255.0:
        return np.round(array).astype(np.uint8)
    raise ValueError(f"{what}: float pixel values in [{low:g}, {high:g}]; expected [0, 1] or [0, 255].")


def _integer_to_uint8(array: np.ndarray, what: str, sixteen_bit: bool) -> np.ndarray:
    low, high = int(array.min()), int(array.max())
    if low < 0:
        raise ValueError(f"{what}: negative pixel values ({low}) in an integer image.")
    if array.dtype == np.uint16 or sixteen_bit:  # by the bit depth, not the values: a dark 16-bit image stays dark
        depth = 65535
    elif high <= 255:
        return array.astype(np.uint8)
    else:  # wider integers (e.g. PIL's "I" mode) with values above 255: 16-bit data, or scaled by their maximum
        depth = 65535 if high <= 65535 else int(np.iinfo(array.dtype).max)
    return np.round(array.astype(np.float64) * (255.0 / depth)).astype(np.uint8)


def load_rgb_image(image, what: str = "image", max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """Any image the processors accept -> 8-bit RGB (a PIL image, or an HWC uint8 array), or a clear error naming
    `what`: a path that is missing or not a readable image; an empty or too large image; NaN / infinite pixels.
    RGBA / LA / P / grayscale become RGB (transparent areas on white); 16-bit and float images are scaled by their
    range; channels-first (CHW) arrays and tensors are moved to HWC. URLs are left to the processor."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        path = image.decode() if isinstance(image, bytes) else str(image)
        if path.startswith(("http://", "https://")):
            return path
        image = _open_image(path, what, max_pixels)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, what, max_pixels)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return _array_to_rgb(image, what, max_pixels)
    return image


def _open_image(path: str, what: str, max_pixels: int | None) -> Image.Image:
    try:
        with Image.open(path) as opened:
            _check_pixels(*opened.size, f"{what} ({path})", max_pixels)
            opened.load()
            return opened.copy()
    except ValueError:
        raise
    except Exception as error:  # PIL raises many kinds (OSError, SyntaxError, DecompressionBombError, ...)
        raise ValueError(f"{what}: cannot read image file {path}: {type(error).__name__}: {error}") from error


def _pil_to_rgb(image: Image.Image, what: str, max_pixels: int | None) -> Image.Image:
    _check_pixels(image.width, image.height, what, max_pixels)
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # PIL opens 16-bit PNGs as "I;16" or "I" (int32): both hold 16-bit data
        array = _to_uint8(np.asarray(image), what, sixteen_bit=image.mode.startswith("I;16"))
        return Image.fromarray(array).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").split()[-1])
        return background
    return image.convert("RGB")


def _array_to_rgb(image, what: str, max_pixels: int | None) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.float() if image.dtype in (torch.bfloat16, torch.float16) else image  # numpy has no bf16
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim not in (2, 3):
        raise ValueError(f"{what}: an image array must be HW, HWC or CHW, got shape {tuple(array.shape)}.")
    if array.size == 0:
        raise ValueError(f"{what}: empty image array of shape {tuple(array.shape)}.")
    channels_first = array.ndim == 3 and array.shape[0] in (1, 2, 3, 4) and array.shape[-1] not in (1, 2, 3, 4)
    if channels_first:
        array = np.moveaxis(array, 0, -1)
    _check_pixels(array.shape[1], array.shape[0], what, max_pixels)
    array = _to_uint8(array, what)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    elif array.shape[-1] in (1, 2):
        array = np.concatenate([array[..., :1]] * 3, axis=-1)
    elif array.shape[-1] == 4:
        array = array[..., :3]
    elif array.shape[-1] != 3:
        raise ValueError(f"{what}: {array.shape[-1]} channels; expected 1 to 4 (HWC) or a CHW array.")
    return np.ascontiguousarray(array)


def _flatten_images(images):
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(_flatten_images(item))
        return flat
    return [images]


def _renest(images, converted):
    """Put converted images back into the caller's nesting (the generalist processor reads it)."""
    it = iter(converted)

    def walk(item):
        if isinstance(item, (list, tuple)):
            return [walk(x) for x in item]
        return next(it)

    return walk(images)


class ChimeraProcessor(ProcessorMixin):
    r"""
    Processor for [`ChimeraForConditionalGeneration`]: runs the generalist's native processor (LLaVA-OneVision,
    Qwen2-VL or InternVL: chat template, image tokens, tiles) and, for every image, each expert's image processor,
    returned as `expert_pixel_values` (one tensor per expert in config order, one row per image). The model uses
    only the rows of the expert each image is routed to.

    Every image goes through `load_rgb_image` before either processor sees it: RGBA / palette / grayscale images
    become RGB (transparent areas on white), 16-bit and float images are scaled by their range, CHW arrays are moved
    to HWC; a missing or unreadable file, an empty image, NaN / infinite pixels or more than `max_image_pixels`
    pixels raise an error naming the image.

    Args:
        image_processor, tokenizer, video_processor: the generalist processor's parts.
        chat_template (`str`, *optional*): defaults to the generalist's template.
        generalist_processor_class (`str`): class name of the generalist's processor (e.g. `"InternVLProcessor"`).
        generalist_kwargs (`dict`): the generalist processor's other init arguments (e.g. `image_seq_length`).
        expert_preprocessing (`list[dict]`): per expert, in the model's expert order, `{"domain": ..., "config":
            image processor config dict}` (a list: JSON object keys would lose the order).
        max_image_pixels (`int`, *optional*, defaults to 64 000 000): the largest image accepted (width x height);
            `None` for no limit.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        chat_template=None,
        generalist_processor_class: str | None = None,
        generalist_kwargs: dict | None = None,
        expert_preprocessing: list | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        **kwargs,
    ):
        if generalist_processor_class is None:
            raise ValueError(
                "`generalist_processor_class` is required; build a ChimeraProcessor with "
                "`ChimeraProcessor.from_generalist(generalist_processor, expert_image_processors)`."
            )
        super().__init__(image_processor, tokenizer, video_processor, chat_template=chat_template)
        self.generalist_processor_class = generalist_processor_class
        self.generalist_kwargs = dict(generalist_kwargs or {})
        generalist_cls = getattr(transformers, generalist_processor_class)
        self.generalist = generalist_cls(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
            chat_template=chat_template, **self.generalist_kwargs,
        )
        self.max_image_pixels = max_image_pixels
        self.expert_preprocessing = [dict(entry) for entry in (expert_preprocessing or [])]
        domains = [entry["domain"] for entry in self.expert_preprocessing]
        if len(set(domains)) != len(domains):
            raise ValueError(f"Duplicate expert domain names in {domains}.")
        self.expert_image_processors = {
            entry["domain"]: _image_processor_from_dict(entry["config"]) for entry in self.expert_preprocessing
        }

    @classmethod
    def from_generalist(cls, generalist_processor, expert_image_processors: dict, chat_template=None):
        """Wrap a native processor (object, path or repo id) and `{domain: image processor}` (objects, paths or
        repo ids), in the same domain order as the model's experts."""
        if isinstance(generalist_processor, str):
            generalist_processor = transformers.AutoProcessor.from_pretrained(generalist_processor)
        name = type(generalist_processor).__name__
        if name not in ("LlavaOnevisionProcessor", "Qwen2VLProcessor", "InternVLProcessor"):
            raise ValueError(
                f"Unsupported generalist processor {name}: expected LlavaOnevisionProcessor, Qwen2VLProcessor or "
                "InternVLProcessor."
            )
        attributes = set(type(generalist_processor).get_attributes()) | {"self", "chat_template", "kwargs", "args"}
        init_params = inspect.signature(type(generalist_processor).__init__).parameters
        generalist_kwargs = {
            p: getattr(generalist_processor, p)
            for p in init_params
            if p not in attributes and hasattr(generalist_processor, p)
        }
        preprocessing = []
        for domain, processor in expert_image_processors.items():
            if isinstance(processor, str):
                processor = transformers.AutoImageProcessor.from_pretrained(processor)
            preprocessing.append({"domain": domain, "config": processor.to_dict()})
        return cls(
            image_processor=generalist_processor.image_processor,
            tokenizer=generalist_processor.tokenizer,
            video_processor=generalist_processor.video_processor,
            chat_template=chat_template if chat_template is not None else generalist_processor.chat_template,
            generalist_processor_class=name,
            generalist_kwargs=generalist_kwargs,
            expert_preprocessing=preprocessing,
        )

    @property
    def domains(self) -> list[str]:
        return list(self.expert_image_processors)

    @property
    def model_input_names(self):
        return list(self.generalist.model_input_names) + ["expert_pixel_values"]

    def __call__(self, images=None, text=None, videos=None, experts: list[str] | None = None, **kwargs) -> BatchFeature:
        """Process like the generalist processor, plus `expert_pixel_values`.

        Args:
            experts (`list[str]`, *optional*): only preprocess for these domains (the others get `None` entries),
                e.g. when the domain of every image is known. Default: all experts.
        """
        flat = [load_rgb_image(image, f"image {i}", self.max_image_pixels)
                for i, image in enumerate(_flatten_images(images))]
        if images is not None:
            images = _renest(images, flat)
        outputs = self.generalist(images=images, text=text, videos=videos, **kwargs)
        if flat:
            unknown = sorted(set(experts or []) - set(self.domains))
            if unknown:
                raise ValueError(f"Unknown expert domains {unknown}; this processor has {self.domains}.")
            expert_inputs = []
            for domain, processor in self.expert_image_processors.items():
                if experts is not None and domain not in experts:
                    expert_inputs.append(None)
                    continue
                key = expert_input_name(processor)
                expert_inputs.append(processor(images=flat, return_tensors="pt")[key])
            outputs["expert_pixel_values"] = expert_inputs
            # One tensor per expert, of different shapes: never stacked into one tensor.
            outputs.skip_tensor_conversion = list(outputs.skip_tensor_conversion or []) + ["expert_pixel_values"]
        return outputs

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.generalist.post_process_image_text_to_text(
            generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs
        )


def _image_processor_from_dict(config: dict):
    config = dict(config)
    class_name = config.pop("image_processor_type", None)
    cls = getattr(transformers, class_name, None) if class_name else None
    if cls is None:
        raise ValueError(f"Cannot rebuild an expert image processor of type {class_name!r} from its saved config.")
    return cls.from_dict(config)


ChimeraProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["ChimeraProcessor"]
