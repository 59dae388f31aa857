"""Real-shape stand-ins: the published models' widths, image sizes and token counts, random weights, depth cut.

Bugs that only appear at real scale live here (sequence lengths of thousands of tokens, 256-2048-token experts,
bf16), while the weights stay random and the depth is cut to `num_layers` per tower (a config override, not another
code path), so every stage runs on a CPU; `num_layers=None` keeps the published depths (`bench/real_shape.py`).
Nothing is downloaded: the configs below are written from the published `config.json` files of each model (cited per
entry); the tokenizer is the tiny one from `chimera_mixpert.tiny`, with the vocabulary padded to the real size so the
embedding and LM-head shapes are real too.

    from chimera_mixpert.real_shapes import build_real_chimera, build_real_mixpert
    model, processor = build_real_chimera("internvl2-1b", experts=("got_ocr2", "pix2struct"))
"""

from __future__ import annotations

import torch
from transformers import (
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
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    SiglipVisionConfig,
)
from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor
from transformers.models.pix2struct.configuration_pix2struct import Pix2StructVisionConfig

from chimera_mixpert.tiny import build_tokenizer, random_images
from modeling_chimera import ChimeraForConditionalGeneration
from modeling_mixpert import MixpertForConditionalGeneration
from processing_chimera import ChimeraProcessor

# Qwen2-0.5B (the LLM of InternVL2-1B and LLaVA-OneVision-0.5B): Qwen/Qwen2-0.5B config.json.
QWEN2_0_5B = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                  num_hidden_layers=24, vocab_size=151_674, rope_theta=1_000_000.0, tie_word_embeddings=True)
# Qwen2-VL-2B-Instruct's LLM: hidden 1536, 28 layers, 12 heads / 2 KV heads, vocab 151 936.
QWEN2_VL_2B_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                        num_hidden_layers=28, vocab_size=151_936, tie_word_embeddings=True)

# Published depths (vision tower, LLM) for `num_layers=None`: InternViT-300M 24 + Qwen2-0.5B 24; LLaVA-OV-0.5B's
# SigLIP-so400m with its last layer dropped, 26 + 24; Qwen2-VL-2B's ViT 32 + 28. Experts: GOT-OCR2's SAM-base 12,
# Pix2Struct-base 12, CLIP-L 24.
FULL_DEPTH = {"internvl2-1b": (24, 24), "llava-ov-0.5b": (26, 24), "qwen2-vl-2b": (32, 28),
              "got_ocr2": 12, "pix2struct": 12, "clip-l-336": 24}

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # InternVL's ImageNet normalisation
HALF = [0.5, 0.5, 0.5]  # SigLIP / Qwen2-VL-like normalisation (the values do not matter for random weights)


def random_image(height: int, width: int, seed: int = 0):
    """A random RGB PIL image of `height` x `width` pixels (real sizes make the real tile / crop / patch counts)."""
    return random_images(1, seed=seed, sizes=((height, width),))[0]


def _text(tokenizer, spec: dict, num_layers: int, **extra) -> dict:
    config = dict(model_type="qwen2", max_position_embeddings=32_768, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **spec)
    config.update(num_hidden_layers=num_layers, **extra)
    if config["vocab_size"] < len(tokenizer):
        raise ValueError("the tiny tokenizer must fit in the real vocabulary")
    return config


def generalist_config(name: str, tokenizer, num_layers: int | None = 1):
    """The native config of a published generalist at its real widths, `num_layers` per tower (`None`: published)."""
    vision_layers, text_layers = FULL_DEPTH.get(name, (1, 1)) if num_layers is None else (num_layers, num_layers)
    if name == "internvl2-1b":
        # OpenGVLab/InternVL2-1B (InternViT-300M-448px + Qwen2-0.5B); transformers' InternVL layout
        # (OpenGVLab/InternVL3-1B-hf): 448 px tiles, patch 14, pixel shuffle 0.5 -> 256 tokens per tile.
        vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=vision_layers,
                      image_size=[448, 448], patch_size=[14, 14], use_mean_pooling=False, layer_scale_init_value=0.1)
        return InternVLConfig(vision_config=vision, text_config=_text(tokenizer, QWEN2_0_5B, text_layers),
                              image_token_id=tokenizer.context_image_token_id, image_seq_length=256,
                              downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=True)
    if name == "llava-ov-0.5b":
        # llava-hf/llava-onevision-qwen2-0.5b-si-hf: SigLIP-so400m/14 at 384 px (729 tokens per crop), anyres up to
        # 6x6 crops of 384 px, "anyres_max_9", the penultimate layer's features.
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                                    num_hidden_layers=vision_layers, image_size=384, patch_size=14,
                                    vision_use_head=False)
        pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
        return LlavaOnevisionConfig(vision_config=vision, text_config=_text(tokenizer, QWEN2_0_5B, text_layers),
                                    image_token_index=tokenizer.image_token_id,
                                    video_token_index=tokenizer.video_token_id,
                                    image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
                                    vision_feature_layer=-1, tie_word_embeddings=True)
    if name == "qwen2-vl-2b":
        # Qwen/Qwen2-VL-2B-Instruct: ViT 1280 wide, patch 14, 2x2 merge, M-RoPE [16, 24, 24].
        text = _text(tokenizer, QWEN2_VL_2B_TEXT, text_layers, model_type="qwen2_vl_text",
                     rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]})
        vision = dict(depth=vision_layers, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=tokenizer.image_token_id,
                             video_token_id=tokenizer.video_token_id,
                             vision_start_token_id=tokenizer.vision_start_token_id,
                             vision_end_token_id=tokenizer.vision_end_token_id, tie_word_embeddings=True)
    raise ValueError(f"Unknown real-shape generalist {name!r}; known: internvl2-1b, llava-ov-0.5b, qwen2-vl-2b.")


GENERALIST_FAMILY = {"internvl2-1b": "internvl", "llava-ov-0.5b": "llava_onevision", "qwen2-vl-2b": "qwen2_vl"}
_MODELS = {"internvl": InternVLForConditionalGeneration, "llava_onevision": LlavaOnevisionForConditionalGeneration,
           "qwen2_vl": Qwen2VLForConditionalGeneration}


def build_real_generalist(name: str, num_layers: int | None = 1, dtype=torch.bfloat16, max_tiles: int = 6,
                          seed: int = 0):
    """`(model, processor)`: a published generalist's shapes with random weights, in `dtype`, eval mode."""
    family = GENERALIST_FAMILY[name]
    tokenizer = build_tokenizer(family)
    config = generalist_config(name, tokenizer, num_layers)
    torch.manual_seed(seed)
    # `_from_config(dtype=)` as `from_pretrained` does: weights in `dtype`, buffers such as RoPE's `inv_freq` in fp32
    # (`.to(bf16)` would round them too, and a saved-and-loaded model would then differ from this one).
    model = _MODELS[family]._from_config(config, dtype=dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, build_real_processor(name, tokenizer, max_tiles)


def build_real_processor(name: str, tokenizer, max_tiles: int = 6):
    """The generalist's native processor at its real image sizes."""
    if name == "internvl2-1b":
        images = GotOcr2ImageProcessor(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1,
                                       max_patches=max_tiles, image_mean=MEAN, image_std=STD)
        return InternVLProcessor(image_processor=images, tokenizer=tokenizer,
                                 video_processor=InternVLVideoProcessor(size={"height": 448, "width": 448}),
                                 image_seq_length=256, chat_template=tokenizer.chat_template)
    if name == "llava-ov-0.5b":
        pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
        images = LlavaOnevisionImageProcessor(size={"height": 384, "width": 384}, image_grid_pinpoints=pinpoints,
                                              image_mean=HALF, image_std=HALF)
        return LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer,
                                       video_processor=LlavaOnevisionVideoProcessor(size={"height": 384, "width": 384}),
                                       num_image_tokens=729, vision_feature_select_strategy="full",
                                       vision_aspect_ratio="anyres_max_9", chat_template=tokenizer.chat_template)
    if name == "qwen2-vl-2b":
        images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14, merge_size=2,
                                       image_mean=HALF, image_std=HALF)
        return Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer,
                                video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2),
                                chat_template=tokenizer.chat_template)
    raise ValueError(f"Unknown real-shape generalist {name!r}.")


def build_real_expert(name: str, num_layers: int | None = 1, dtype=torch.bfloat16, seed: int = 1):
    """`(expert model as from_generalist takes it, its image processor)` at a published expert's shapes."""
    if name not in FULL_DEPTH:
        raise ValueError(f"Unknown real-shape expert {name!r}; known: got_ocr2, pix2struct, clip-l-336.")
    full = num_layers is None
    num_layers = FULL_DEPTH[name] if full else num_layers
    torch.manual_seed(seed)
    if name == "got_ocr2":
        # stepfun-ai/GOT-OCR-2.0-hf: SAM-base encoder (768 wide, 16 px patches, window 14) at 1024 px, neck 256
        # channels, two stride-2 convolutions -> 256 tokens of width 1024.
        vision = dict(hidden_size=768, output_channels=256, num_hidden_layers=num_layers, num_attention_heads=12,
                      image_size=1024, patch_size=16, window_size=14,
                      global_attn_indexes=[2, 5, 8, 11] if full else [num_layers - 1],
                      mlp_dim=3072)
        text = dict(model_type="qwen2", vocab_size=64, hidden_size=1024, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=16, num_key_value_heads=16)
        model = GotOcr2ForConditionalGeneration._from_config(GotOcr2Config(vision_config=vision, text_config=text),
                                                             dtype=dtype)
        processor = GotOcr2ImageProcessor(size={"height": 1024, "width": 1024}, crop_to_patches=False)
    elif name == "pix2struct":
        # google/pix2struct-base's encoder: 768 wide, 16x16 patches, 2048 patches per image.
        model = Pix2StructVisionModel._from_config(Pix2StructVisionConfig(
            hidden_size=768, intermediate_size=2048, num_hidden_layers=num_layers, num_attention_heads=12, d_kv=64,
            patch_embed_hidden_size=768, seq_len=4096), dtype=dtype)
        processor = Pix2StructImageProcessor(patch_size={"height": 16, "width": 16}, max_patches=2048)
    elif name == "clip-l-336":
        # openai/clip-vit-large-patch14-336: 1024 wide, 336 px, patch 14 -> 577 tokens (576 without CLS).
        model = CLIPVisionModel._from_config(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=num_layers, num_attention_heads=16,
            image_size=336, patch_size=14), dtype=dtype)
        processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    else:
        raise ValueError(f"Unknown real-shape expert {name!r}; known: got_ocr2, pix2struct, clip-l-336.")
    return model.eval(), processor


def build_real_chimera(generalist: str = "internvl2-1b", experts=("got_ocr2", "pix2struct"), num_layers: int | None = 1,
                       dtype=torch.bfloat16, max_tiles: int = 6):
    """A Chimera at real shapes: `experts` maps to domains `ocr` / `table` / `math` (GOT, Pix2Struct, CLIP)."""
    domain = {"got_ocr2": "ocr", "pix2struct": "table", "clip-l-336": "math"}
    base, processor = build_real_generalist(generalist, num_layers, dtype, max_tiles)
    built = {domain[e]: build_real_expert(e, num_layers, dtype, seed=1 + i) for i, e in enumerate(experts)}
    specs = {d: ({"model": m, "feature_select_strategy": "default"} if d == "math" else m)
             for d, (m, _) in built.items()}
    layout = {}
    if GENERALIST_FAMILY[generalist] == "internvl":
        layout["image_end_token_id"] = processor.tokenizer.convert_tokens_to_ids("</img>")
    torch.manual_seed(100)
    model = ChimeraForConditionalGeneration.from_generalist(base, specs, dtype=dtype, **layout).eval()
    return model, ChimeraProcessor.from_generalist(processor, {d: p for d, (_, p) in built.items()})


def build_real_mixpert(base: str = "llava-ov-0.5b", domains=("chart", "table", "math", "document", "ocr"),
                       num_layers: int | None = 1, num_expert_layers: int = 2, dtype=torch.bfloat16,
                       max_tiles: int = 6):
    """A Mixpert upcycled from a real-shape base with `num_layers` shared vision layers + K expert layers (`None`:
    the published depth, its last K layers becoming the experts)."""
    depth = None if num_layers is None else num_layers + num_expert_layers
    model, processor = build_real_generalist(base, depth, dtype, max_tiles)
    torch.manual_seed(100)
    mixpert = MixpertForConditionalGeneration.from_base(model, domains=list(domains),
                                                        num_expert_layers=num_expert_layers).eval()
    return mixpert, processor
