"""Tiny, offline stand-ins for real checkpoints: tokenizers, processors and native VLMs built from configs.

Nothing here downloads anything. Tests, the tiny training configs (`train/configs/tiny/`) and the mini-lab use
these builders when no model path is given, so the whole pipeline runs on a CPU without the Hugging Face Hub.

The sizes are the smallest that build and run on every family: hidden 32, 2 text and 2 vision layers. Every builder
is deterministic for a given `seed`.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    GotOcr2Config,
    GotOcr2ForConditionalGeneration,
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Pix2StructImageProcessor,
    Pix2StructVisionModel,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.got_ocr2.configuration_got_ocr2 import GotOcr2VisionConfig
from transformers.models.got_ocr2.modeling_got_ocr2 import GotOcr2VisionEncoder
from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor
from transformers.models.pix2struct.configuration_pix2struct import Pix2StructVisionConfig

from modeling_chimera import ChimeraForConditionalGeneration
from modeling_mixpert import MixpertForConditionalGeneration
from processing_chimera import ChimeraProcessor


FAMILIES = ("llava_onevision", "qwen2_vl", "internvl")
EXPERT_FAMILIES = ("clip_vision_model", "siglip_vision_model", "pix2struct_vision_model", "got_ocr2_vision", "got_ocr2")

# Every special token any of the three families needs; one vocabulary serves all of them.
SPECIAL_TOKENS = [
    "<pad>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<video>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
]

# How each family writes one image into the prompt; the processor expands it to the image's token count.
IMAGE_PLACEHOLDER = {
    "llava_onevision": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "internvl": "<IMG_CONTEXT>",
}

# Named special tokens the family's processor reads from the tokenizer (`tok.image_token`, ...).
NAMED_TOKENS = {
    "llava_onevision": {"image_token": "<image>", "video_token": "<video>"},
    "qwen2_vl": {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    },
    "internvl": {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    },
}

# A ChatML template (the one Qwen2 / LLaVA-OV / InternVL2.5 use) that accepts string or list content, as TRL
# produces list content. `{% generation %}` marks assistant text so `return_assistant_tokens_mask` works.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '__IMAGE__' }}"
    "{% elif item['type'] == 'text' %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ item['text'] }}{% endgeneration %}"
    "{% else %}{{ item['text'] }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is shown in this image? Answer with a single word or number.",
    "The chart shows sales by year: 2019 12, 2020 15, 2021 9. Which year is highest?",
    "Read the table and give the value in row 2, column 3.",
    "What is the angle ABC in degrees? The length of the side is 5 cm.",
    "Transcribe the text in the image. The title of the document is Annual Report.",
    "How many red circles are there? There are three blue squares and two green triangles.",
    "yes no one two three four five six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9 % . , : ; ? ! -",
    "chart table math document ocr general bar line pie plot cell row column value answer question",
]


def build_tokenizer(family: str = "llava_onevision", vocab_size: int = 320, corpus=None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer locally and wrap it the way `family`'s processor expects."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; supported: {', '.join(FAMILIES)}.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or _CORPUS) * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens=dict(NAMED_TOKENS[family]),
        chat_template=CHAT_TEMPLATE.replace("__IMAGE__", IMAGE_PLACEHOLDER[family]),
    )
    return tokenizer


def _text_config(tokenizer, hidden_size=32, num_layers=2, num_heads=4, **overrides):
    config = dict(
        model_type="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    return config


def build_generalist_config(
    family: str,
    tokenizer,
    image_size: int = 16,
    patch_size: int = 4,
    hidden_size: int = 32,
    vision_hidden_size: int = 32,
    num_text_layers: int = 2,
    num_vision_layers: int = 2,
):
    """A tiny native config of `family` whose special-token ids match `tokenizer`."""
    text_config = _text_config(tokenizer, hidden_size=hidden_size, num_layers=num_text_layers)
    # SigLIP (LLaVA-OneVision) and InternViT take the same ViT fields
    vit = dict(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 2,
        num_hidden_layers=num_vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    if family == "llava_onevision":
        vision = SiglipVisionConfig(**vit, vision_use_head=False)
        return LlavaOnevisionConfig(
            vision_config=vision,
            text_config=text_config,
            image_token_index=tokenizer.image_token_id,
            video_token_index=tokenizer.video_token_id,
            image_grid_pinpoints=[[image_size, image_size]],
            vision_aspect_ratio="anyres_max_1",
            tie_word_embeddings=False,
        )
    if family == "qwen2_vl":
        head_dim = hidden_size // 4
        text_config.update(model_type="qwen2_vl_text", rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
        })
        vision = dict(
            depth=num_vision_layers,
            embed_dim=vision_hidden_size,
            hidden_size=hidden_size,
            num_heads=4,
            mlp_ratio=2,
            patch_size=patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return Qwen2VLConfig(
            text_config=text_config,
            vision_config=vision,
            image_token_id=tokenizer.image_token_id,
            video_token_id=tokenizer.video_token_id,
            vision_start_token_id=tokenizer.vision_start_token_id,
            vision_end_token_id=tokenizer.vision_end_token_id,
            tie_word_embeddings=False,
        )
    if family == "internvl":
        vision = dict(**vit, use_mean_pooling=False)
        return InternVLConfig(
            vision_config=vision,
            text_config=text_config,
            image_token_id=tokenizer.context_image_token_id,
            image_seq_length=(image_size // patch_size) ** 2 // 4,
            downsample_ratio=0.5,
            tie_word_embeddings=False,
        )
    raise ValueError(f"Unknown family {family!r}; supported: {', '.join(FAMILIES)}.")


_MODEL_CLASSES = {
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "internvl": InternVLForConditionalGeneration,
}


def build_generalist(family: str, tokenizer=None, seed: int = 0, **config_kwargs):
    """A randomly initialised tiny native VLM of `family` (fp32, eval mode)."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(family)
    config = build_generalist_config(family, tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[family](config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def build_processor(family: str, tokenizer=None, image_size: int = 16, patch_size: int = 4, max_patches: int = 4):
    """The family's native processor around `tokenizer`, sized for `build_generalist`'s defaults. For InternVL,
    `max_patches` caps the dynamic tiles of a large image (`InternVLProcessor` always tiles: its class default
    `crop_to_patches=True` wins over the image processor's setting; 1 means one tile per image)."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(family)
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    if family == "llava_onevision":
        image_processor = LlavaOnevisionImageProcessor(
            size={"height": image_size, "width": image_size},
            image_grid_pinpoints=[[image_size, image_size]],
            image_mean=mean,
            image_std=std,
        )
        video_processor = LlavaOnevisionVideoProcessor(size={"height": image_size, "width": image_size})
        return LlavaOnevisionProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            num_image_tokens=(image_size // patch_size) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_1",
            chat_template=tokenizer.chat_template,
        )
    if family == "qwen2_vl":
        pixels = image_size * image_size
        image_processor = Qwen2VLImageProcessor(
            min_pixels=pixels, max_pixels=pixels, patch_size=patch_size, merge_size=2, image_mean=mean, image_std=std
        )
        video_processor = Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=patch_size,
                                                merge_size=2)
        return Qwen2VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=tokenizer.chat_template,
        )
    if family == "internvl":
        image_processor = GotOcr2ImageProcessor(
            size={"height": image_size, "width": image_size},
            crop_to_patches=False,
            max_patches=max_patches,
            image_mean=mean,
            image_std=std,
        )
        video_processor = InternVLVideoProcessor(size={"height": image_size, "width": image_size})
        return InternVLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            image_seq_length=(image_size // patch_size) ** 2 // 4,
            chat_template=tokenizer.chat_template,
        )
    raise ValueError(f"Unknown family {family!r}; supported: {', '.join(FAMILIES)}.")


def build_expert_config(family: str, image_size: int = 16, patch_size: int = 4, hidden_size: int = 24, num_layers=2):
    """A tiny vision config of an expert-encoder family (CLIP, SigLIP, Pix2Struct or GOT-OCR2 vision)."""
    if family == "clip_vision_model":
        return CLIPVisionConfig(
            hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
            num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=hidden_size,
        )
    if family == "siglip_vision_model":
        return SiglipVisionConfig(
            hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
            num_attention_heads=4, image_size=image_size, patch_size=patch_size, vision_use_head=False,
        )
    if family == "pix2struct_vision_model":
        return Pix2StructVisionConfig(
            hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
            num_attention_heads=4, d_kv=hidden_size // 4, patch_embed_hidden_size=patch_size * patch_size * 3,
            seq_len=(image_size // patch_size) ** 2,
        )
    if family in ("got_ocr2_vision", "got_ocr2"):
        vision = GotOcr2VisionConfig(
            hidden_size=hidden_size, output_channels=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=4, image_size=image_size, patch_size=patch_size, window_size=2,
            global_attn_indexes=[num_layers - 1], mlp_dim=hidden_size * 2,
        )
        if family == "got_ocr2_vision":
            return vision
        text = dict(model_type="qwen2", vocab_size=64, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
        return GotOcr2Config(vision_config=vision, text_config=text)
    raise ValueError(f"Unknown expert family {family!r}; supported: {', '.join(EXPERT_FAMILIES)}.")


def build_expert_image_processor(family: str, image_size: int = 16, patch_size: int = 4):
    """The image processor that matches `build_expert_config(family)`."""
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    size = {"height": image_size, "width": image_size}
    if family == "clip_vision_model":
        return CLIPImageProcessor(size=size, crop_size=size, do_center_crop=False, image_mean=mean, image_std=std)
    if family == "siglip_vision_model":
        return SiglipImageProcessor(size=size, image_mean=mean, image_std=std)
    if family == "pix2struct_vision_model":
        return Pix2StructImageProcessor(patch_size={"height": patch_size, "width": patch_size},
                                        max_patches=(image_size // patch_size) ** 2)
    if family in ("got_ocr2_vision", "got_ocr2"):
        return GotOcr2ImageProcessor(size=size, crop_to_patches=False, image_mean=mean, image_std=std)
    raise ValueError(f"Unknown expert family {family!r}; supported: {', '.join(EXPERT_FAMILIES)}.")


# Expert image sizes for tiny models: GOT-OCR2's two stride-2 convolutions need a larger map to keep 4 tokens.
EXPERT_IMAGE_SIZE = {"got_ocr2": 32}


def build_expert(family: str, seed: int = 0, **config_kwargs):
    """A randomly initialised tiny expert encoder of `family`, as `from_generalist` accepts it (for `got_ocr2` the full
    GOT-OCR2 model, whose encoder and convolutions become the expert)."""
    config_kwargs.setdefault("image_size", EXPERT_IMAGE_SIZE.get(family, 16))
    config = build_expert_config(family, **config_kwargs)
    classes = {
        "clip_vision_model": CLIPVisionModel,
        "siglip_vision_model": SiglipVisionModel,
        "pix2struct_vision_model": Pix2StructVisionModel,
        "got_ocr2_vision": GotOcr2VisionEncoder,
        "got_ocr2": GotOcr2ForConditionalGeneration,
    }
    torch.manual_seed(seed)
    return classes[family](config).eval()


def build_tiny_chimera(
    family: str = "internvl",
    experts: dict | None = None,
    seed: int = 0,
    tokenizer=None,
    image_size: int = 16,
    patch_size: int = 4,
    generalist_kwargs: dict | None = None,
    **chimera_kwargs,
):
    """A tiny Chimera and its processor: `experts` maps domain -> expert family (default: table=Pix2Struct,
    math=CLIP). Images are `image_size` px (`patch_size` px patches) for the generalist and the experts (GOT-OCR2
    experts use twice the size, so its two stride-2 convolutions keep 4 tokens). Returns `(model, processor)`."""
    experts = experts or {"table": "pix2struct_vision_model", "math": "clip_vision_model"}
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(family)
    generalist = build_generalist(family, tokenizer, seed=seed, image_size=image_size, patch_size=patch_size,
                                  **(generalist_kwargs or {}))
    scale = image_size // 16
    sizes = {f: EXPERT_IMAGE_SIZE.get(f, 16) * scale for f in experts.values()}
    expert_models = {
        d: build_expert(f, seed=seed + 1 + i, image_size=sizes[f], patch_size=patch_size)
        for i, (d, f) in enumerate(experts.items())
    }
    torch.manual_seed(seed + 100)
    if family == "internvl" and chimera_kwargs.get("expert_layout") != "plain":
        chimera_kwargs.setdefault("image_end_token_id", tokenizer.convert_tokens_to_ids("</img>"))
    model = ChimeraForConditionalGeneration.from_generalist(generalist, expert_models, **chimera_kwargs)
    processor = ChimeraProcessor.from_generalist(
        build_processor(family, tokenizer, image_size=image_size, patch_size=patch_size),
        {d: build_expert_image_processor(f, image_size=sizes[f], patch_size=patch_size) for d, f in experts.items()},
    )
    return model, processor


def build_tiny_mixpert(
    family: str = "internvl",
    domains=("chart", "table", "math", "document", "ocr", "general"),
    seed: int = 0,
    tokenizer=None,
    image_size: int = 16,
    patch_size: int = 4,
    num_vision_layers: int = 3,
    num_expert_layers: int = 2,
    generalist_kwargs: dict | None = None,
    **mixpert_kwargs,
):
    """A tiny Mixpert upcycled from a tiny native base, and the base's processor. Returns `(model, processor)`."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(family)
    base = build_generalist(family, tokenizer, seed=seed, image_size=image_size, patch_size=patch_size,
                            num_vision_layers=num_vision_layers, **(generalist_kwargs or {}))
    torch.manual_seed(seed + 100)
    model = MixpertForConditionalGeneration.from_base(
        base, domains=list(domains), num_expert_layers=num_expert_layers, **mixpert_kwargs
    )
    return model, build_processor(family, tokenizer, image_size=image_size, patch_size=patch_size)


def random_images(n: int, seed: int = 0, sizes=((16, 16),)):
    """`n` random RGB PIL images, cycling through `sizes` (height, width)."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(n)
    ]


def chat_prompt(processor, num_images: int = 1, text: str = "What is shown?", answer: str | None = None) -> str:
    """A chat prompt with `num_images` images, ending with the assistant turn (or with `answer` and its end)."""
    messages = [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}]
    if answer is None:
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages)


def auto_config(config_dict: dict):
    """`AutoConfig.for_model` on a dict with a `model_type` key (helper for YAML-driven tiny configs)."""
    config_dict = dict(config_dict)
    return AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
