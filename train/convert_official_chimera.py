"""Convert an official Chimera checkpoint (arXiv 2412.05983, github.com/Alpha-Innovator/Chimera) to this project.

The official release is an InternVL2-style remote-code model (`ChimeraChatModel`: InternViT + `mlp1` + an InternLM2 /
Phi-3 / Qwen2 / Llama LLM, plus an `ExpertEncoder` and an `expert_router`). This script rewrites it as a
`ChimeraForConditionalGeneration` over transformers' native `InternVLModel`: the folder it writes loads with
`ChimeraForConditionalGeneration.from_pretrained(folder)` (every weight present, none unexpected) and with
`AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)`.

Usage:

    python -m train.convert_official_chimera --input_dir path/to/Chimera-Reasoner-8B --output_dir chimera-8b-hf
    # options: --dtype bfloat16 | float16 | float32 (default: as saved), --trust_remote_code (load an official
    # remote-code tokenizer, e.g. InternLM2's, to write the processor), explicit token ids when the folder has no
    # tokenizer files: --image_context_token_id --image_end_token_id --expert_start_token_id
    # --expert_end_token_id --expert_token_ids ID [ID ...]

Input: the official folder's `config.json` and its safetensors weights (`model.safetensors` or a sharded
`model.safetensors.index.json`; `.bin` checkpoints are refused). Token ids are read from the folder's tokenizer files
(`tokenizer.json`, `tokenizer_config.json`, `added_tokens.json`) unless given on the command line. When the tokenizer
loads (a `tokenizer.json`, or remote code with `--trust_remote_code`) and the folder has the official
`ChimeraProcessor` config (`expert_processor_list`), an `InternVLProcessor`-based `ChimeraProcessor` is written too;
otherwise only the model is written and the log says which step is missing (build the processor afterwards with
`ChimeraProcessor.from_generalist(InternVLProcessor(...), {domain: image processor})`, see README).

Key mapping (official -> converted). `{i}`, `{j}`: layers; `{k}`: the k-th expert of `config_list`, `<d>` its
domain. Prefixes: `V.` = `vision_model.`, `LM.` = `language_model.model.`, `X.` = `expert_encoder.encoder.{k}.`
(official); `G.` = `model.generalist.`, `T.` = `G.vision_tower.`, `L.` = `G.language_model.`,
`E.` = `model.expert_encoders.<d>.encoder.` (converted).

| official key                                   | converted key                                                  |
|------------------------------------------------|----------------------------------------------------------------|
| V.embeddings.class_embedding                   | T.embeddings.cls_token                                         |
| V.embeddings.patch_embedding.*                 | T.embeddings.patch_embeddings.projection.*                     |
| V.embeddings.position_embedding                | T.embeddings.position_embeddings (1)                           |
| V.encoder.layers.{i}.attn.qkv.*                | T.encoder.layer.{i}.attention.{q,k,v}_proj.* ([q; k; v] split) |
| V.encoder.layers.{i}.attn.proj.*               | T.encoder.layer.{i}.attention.projection_layer.*               |
| V.encoder.layers.{i}.attn.{q,k}_norm.weight    | T.encoder.layer.{i}.attention.{q,k}_norm.weight                |
| V.encoder.layers.{i}.mlp.fc{1,2}.*             | T.encoder.layer.{i}.mlp.fc{1,2}.*                              |
| V.encoder.layers.{i}.norm{1,2}.*               | T.encoder.layer.{i}.layernorm_{before,after}.*                 |
| V.encoder.layers.{i}.ls{1,2}                   | T.encoder.layer.{i}.lambda_{1,2}                               |
| mlp1.{0,1,3}.*                                 | G.multi_modal_projector.{layer_norm,linear_1,linear_2}.*       |
| LM.tok_embeddings.weight (InternLM2)           | L.embed_tokens.weight                                          |
| LM.layers.{i}.attention.wqkv.* (InternLM2)     | L.layers.{i}.self_attn.{q,k,v}_proj.* (grouped split, below)   |
| LM.layers.{i}.attention.wo.* (InternLM2)       | L.layers.{i}.self_attn.o_proj.*                                |
| LM.layers.{i}.feed_forward.w{1,3,2}.weight     | L.layers.{i}.mlp.{gate,up,down}_proj.weight                    |
| LM.layers.{i}.{attention,ffn}_norm.weight      | L.layers.{i}.{input,post_attention}_layernorm.weight           |
| LM.norm.weight                                 | L.norm.weight                                                  |
| language_model.output.weight (InternLM2)       | lm_head.weight                                                 |
| LM.* (Qwen2 / Phi-3 / Llama)                   | L.* (same names; Phi-3 keeps its fused qkv_proj / gate_up_proj) |
| language_model.lm_head.weight (Qwen2 / ...)    | lm_head.weight                                                 |
| expert_router.weight                           | model.router.weight                                            |
| expert_encoder.mlp.{k}.{0,1,3}.*               | model.expert_projectors.<d>.{layer_norm,linear_1,linear_2}.*   |
| X.* (Pix2Struct, Kosmos-2.5)                   | E.* (same names)                                               |
| X.vision_model.* (CLIP)                        | E.* (transformers 5's CLIPVisionModel has no `vision_model.`)  |
| X.* (intern_vit_6b)                            | E.* (renamed as the generalist's InternViT above)              |
| X.patch_embed.proj.* (GOT)                     | E.vision_tower.patch_embed.projection.*                        |
| X.pos_embed (GOT)                              | E.vision_tower.pos_embed                                       |
| X.blocks.{j}.norm{1,2}.* (GOT)                 | E.vision_tower.layers.{j}.layer_norm{1,2}.*                    |
| X.blocks.{j}.{attn,mlp}.* (GOT)                | E.vision_tower.layers.{j}.{attn,mlp}.* (same names)            |
| X.neck.{0,1,2,3}.* (GOT)                       | E.vision_tower.neck.{conv1,layer_norm1,conv2,layer_norm2}.*    |
| X.net_{2,3}.weight (GOT)                       | E.conv_upsampler{1,2}.weight                                   |

(1) resized once, with the official bicubic formula, when `force_image_size` differs from the ViT's `image_size`.
Dropped: recomputed buffers only (`*.rotary_emb.inv_freq`, `*.embeddings.position_ids`) and, for a tied LLM, the
stored LM head (the official model ties it to the embeddings when loading). Any other key left over, any converted
weight missing, or any shape that does not match the converted config raises with the full lists.

InternLM2's fused `wqkv` is laid out per key/value head: `wqkv.weight.view(KV, G + 2, D_head, hidden)` holds the `G`
query heads of group `h`, then its key head, then its value head (`G = heads // KV`); its rotary embedding is the
HF rotate-half form, so the split needs no permutation.

Config: the generalist is a native `InternVLConfig` (vision `internvl_vision` with `use_mean_pooling=True`: InternViT
has no final norm; `vision_feature_layer = select_layer`; the official "v2" pixel shuffle is transformers'
`InternVLModel.pixel_shuffle`); InternLM2 becomes a `llama` text config, Phi-3 / Qwen2 / Llama keep their native
config; `router_feature="cls"`; `expert_start_token_id` / `expert_end_token_id` / `expert_insert_after_token_id` are
`<domain>` / `</domain>` / `</img>`, so expert blocks sit exactly where the official `chat()` writes them.

Comments cite the official repository (github.com/Alpha-Innovator/Chimera) as `path:line`, paths relative to its
`chimera/chimera/` folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    GotOcr2Config,
    InternVLConfig,
    InternVLVisionConfig,
    Kosmos2_5VisionConfig,
    Pix2StructVisionConfig,
    PreTrainedConfig,
)
from transformers.initialization import no_init_weights
from transformers.models.got_ocr2.configuration_got_ocr2 import GotOcr2VisionConfig

from configuration_chimera import ChimeraConfig, ChimeraExpertConfig

# The config classes above cost about a second at import; the image processors, tokenizers and the model class are
# imported in the functions that use them (about 2 s more), so that `--help` and argument errors stay fast.


logger = logging.getLogger(__name__)

SUPPORTED_LLMS = ("InternLM2ForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM", "LlamaForCausalLM")
SUPPORTED_EXPERTS = (
    "clip_vision_model",
    "pix2struct_vision_model",
    "kosmos_2_5_vision_model",
    "got_vision_model",
    "intern_vit_6b",
)

IMAGE_START_TOKEN, IMAGE_END_TOKEN, IMAGE_CONTEXT_TOKEN = "<img>", "</img>", "<IMG_CONTEXT>"
DOMAIN_START_TOKEN, DOMAIN_END_TOKEN = "<domain>", "</domain>"  # train/constants.py:21-22
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # train/constants.py:10-11
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# Recomputed (non-persistent) buffers some older checkpoints still carry; nothing else is ever dropped.
_DROPPED_BUFFERS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|embeddings\.position_ids)$")

# conversation.py:238-247 (SeparatorStyle.MPT) with the templates of conversation.py:350-407.
_DEFAULT_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
CHAT_TEMPLATES = {
    "Hermes-2": ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"),
    "internlm2-chat": ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"),
    "phi3-chat": ("<|system|>\n", "<|user|>\n", "<|assistant|>\n", "<|end|>"),
}


# ------------------------------------------------------------------------------------------------------ token ids


@dataclass
class ChimeraTokenIds:
    """The special-token ids the converted config needs (official `chat()`,
    model/chimera/modeling_chimera.py:466-473, 519)."""

    image_context: int  # <IMG_CONTEXT>: the generalist's image placeholder
    image_end: int  # </img>: expert blocks go right after it
    expert_start: int  # <domain>
    expert_end: int  # </domain>
    experts: list  # <DOMAIN_k_CONTEXT>, k = 0..N-1, in `config_list` order


def read_added_tokens(folder) -> dict:
    """`{token: id}` of the added tokens in a tokenizer folder (`tokenizer.json`, `tokenizer_config.json`,
    `added_tokens.json`), read without loading the tokenizer (official tokenizers may need remote code)."""
    folder = Path(folder)
    tokens = {}
    if (folder / "tokenizer.json").exists():
        for entry in json.loads((folder / "tokenizer.json").read_text()).get("added_tokens", []):
            tokens[entry["content"]] = int(entry["id"])
    if (folder / "tokenizer_config.json").exists():
        decoder = json.loads((folder / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
        for token_id, entry in decoder.items():
            tokens[entry["content"]] = int(token_id)
    if (folder / "added_tokens.json").exists():
        tokens.update({k: int(v) for k, v in json.loads((folder / "added_tokens.json").read_text()).items()})
    return tokens


def resolve_token_ids(tokens: dict, num_experts: int, overrides: dict | None = None) -> ChimeraTokenIds:
    """Token ids from `{token: id}` (see `read_added_tokens`), each replaceable by an explicit id in `overrides`
    (keys: the `ChimeraTokenIds` field names)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    names = {
        "image_context": IMAGE_CONTEXT_TOKEN,
        "image_end": IMAGE_END_TOKEN,
        "expert_start": DOMAIN_START_TOKEN,
        "expert_end": DOMAIN_END_TOKEN,
    }
    values, missing = {}, []
    for field_name, token in names.items():
        if field_name in overrides:
            values[field_name] = int(overrides[field_name])
        elif token in tokens:
            values[field_name] = tokens[token]
        else:
            missing.append(token)
    if "experts" in overrides:
        values["experts"] = [int(t) for t in overrides["experts"]]
    else:
        # model/chimera/modeling_chimera.py:469-472
        expert_tokens = [f"<DOMAIN_{k}_CONTEXT>" for k in range(num_experts)]
        missing += [t for t in expert_tokens if t not in tokens]
        values["experts"] = [tokens[t] for t in expert_tokens if t in tokens]
    if missing:
        raise ValueError(
            f"Cannot find the ids of {missing} in the official tokenizer files. Pass them explicitly "
            "(--image_context_token_id, --image_end_token_id, --expert_start_token_id, --expert_end_token_id, "
            "--expert_token_ids) or point --input_dir at a folder with the official tokenizer."
        )
    if len(values["experts"]) != num_experts:
        raise ValueError(f"{num_experts} experts need {num_experts} expert token ids, got {values['experts']}.")
    return ChimeraTokenIds(**values)


# ------------------------------------------------------------------------------------------------------- configs


_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
)


def _rope_parameters(llm: dict, family: str) -> dict:
    """The official `rope_scaling` as transformers 5 `rope_parameters`."""
    theta = float(llm.get("rope_theta", 10000.0))
    scaling = llm.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind in ("linear", "dynamic"):
        # model/internlm2/modeling_internlm2.py:325-346: linear / dynamic-NTK scaling over `max_position_embeddings`,
        # the formulas of transformers' "linear" / "dynamic" rope types.
        return {"rope_type": kind, "rope_theta": theta, "factor": float(scaling["factor"])}
    if family == "phi3" and kind in ("su", "longrope", "yarn"):
        # model/phi3/modeling_phi3.py:137-226: short/long factors switched at `original_max_position_embeddings`; "su"
        # scales cos/sin by sqrt(1 + ln(s) / ln(L0)) (transformers' longrope default), "yarn" by 0.1 ln(s) + 1.
        original = int(llm.get("original_max_position_embeddings", 4096))
        scale = llm["max_position_embeddings"] / original
        params = {
            "rope_type": "longrope", "rope_theta": theta, "short_factor": list(scaling["short_factor"]),
            "long_factor": list(scaling["long_factor"]), "original_max_position_embeddings": original,
            "factor": scale,
        }
        if kind == "yarn":
            params["attention_factor"] = 1.0 if scale <= 1.0 else 0.1 * math.log(scale) + 1.0
        return params
    if family in ("llama", "qwen2") and kind:
        # transformers' own LlamaForCausalLM / Qwen2ForCausalLM: their `rope_scaling` is already a transformers rope
        # type (e.g. "llama3", "yarn"); the config validates its fields.
        params = {k: v for k, v in scaling.items() if k not in ("type", "rope_type")}
        return {**params, "rope_type": kind, "rope_theta": theta}
    raise ValueError(f"Unsupported rope_scaling {scaling!r} for the official {family} LLM.")


def _text_config(llm: dict):
    """The LLM's config in transformers' native form, and the official family name."""
    arch = (llm.get("architectures") or [None])[0]
    if arch not in SUPPORTED_LLMS:
        raise ValueError(f"Unsupported official LLM {arch!r}; supported: {', '.join(SUPPORTED_LLMS)}.")
    fields = {k: llm[k] for k in _TEXT_KEYS if k in llm}
    fields["tie_word_embeddings"] = bool(llm.get("tie_word_embeddings", False))
    if arch == "InternLM2ForCausalLM":
        # model/internlm2/modeling_internlm2.py:315-321: one `bias` flag for wqkv and wo (= Llama's attention_bias);
        # 270-272: bias-free gated MLP. InternLM2Config defaults bias=True (configuration_internlm2.py).
        family, model_type = "internlm2", "llama"
        fields.update(attention_bias=bool(llm.get("bias", True)), mlp_bias=False)
    elif arch == "LlamaForCausalLM":
        family = model_type = "llama"
        fields.update({k: llm[k] for k in ("attention_bias", "mlp_bias", "head_dim") if llm.get(k) is not None})
    elif arch == "Qwen2ForCausalLM":
        family = model_type = "qwen2"
        fields.update({k: llm[k] for k in ("use_sliding_window", "sliding_window", "max_window_layers") if k in llm})
    else:
        family = model_type = "phi3"
        fields.update({
            k: llm[k] for k in ("original_max_position_embeddings", "sliding_window", "embd_pdrop", "resid_pdrop")
            if k in llm
        })
    fields["rope_parameters"] = _rope_parameters(llm, family)
    return AutoConfig.for_model(model_type, **fields), family


def _intern_vit_config(vision: dict, image_size: int | None = None):
    """configuration_intern_vit.py fields -> `InternVLVisionConfig` (`use_mean_pooling=True`: InternViT has no final
    norm, model/chimera/modeling_intern_vit.py:297-362)."""
    return InternVLVisionConfig(
        hidden_size=vision["hidden_size"],
        num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"],
        intermediate_size=vision["intermediate_size"],
        attention_bias=bool(vision.get("qkv_bias", False)),
        use_qk_norm=bool(vision.get("qk_normalization", True)),
        hidden_act=vision.get("hidden_act", "gelu"),
        norm_type=vision.get("norm_type", "rms_norm"),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        attention_dropout=vision.get("attention_dropout", 0.0),
        projection_dropout=vision.get("dropout", 0.0),
        image_size=int(image_size or vision.get("image_size", 224)),
        patch_size=vision.get("patch_size", 14),
        num_channels=vision.get("num_channels", 3),
        layer_scale_init_value=vision.get("initializer_factor", 0.1),
        use_mean_pooling=True,
    )


def _own_fields(config_class, values: dict) -> dict:
    """The entries of an official (transformers 4.x) config dict that `config_class` itself defines (drops the 4.x
    generic and generation fields every saved config carried)."""
    generic = set(PreTrainedConfig.__dataclass_fields__)
    return {k: v for k, v in values.items() if k in config_class.__dataclass_fields__ and k not in generic}


def _expert_configs(entry: dict):
    """One `config_list` entry (model/expert_encoder/configuration_expert_encoder.py:92-94) -> (vision config,
    feature_layer, feature_select_strategy), matching `ExpertEncoder.uni_encode`
    (model/expert_encoder/modeling_expert_encoder.py:131-179; line numbers below are of that file)."""
    cfg = dict(entry["config"])
    family = cfg.get("model_type")
    select_layer = entry.get("select_layer", -1)
    feature_layer = None if select_layer in (-1, None) else int(select_layer)
    if family == "clip_vision_model":
        # 142-154: last_hidden_state (or hidden_states[select_layer]) without the CLS token.
        return CLIPVisionConfig(**_own_fields(CLIPVisionConfig, cfg)), feature_layer, "default"
    if family == "pix2struct_vision_model":
        # 156-171: flattened patches + attention mask, last_hidden_state (after the final norm) or hidden_states[i].
        return Pix2StructVisionConfig(**_own_fields(Pix2StructVisionConfig, cfg)), feature_layer, "full"
    if family == "kosmos_2_5_vision_model":
        # model/kosmos2_5/configuration_kosmos2_5.py: d_ff / d_kv / seq_len are transformers' intermediate_size /
        # head_dim / max_num_patches; the model itself is the same (model/kosmos2_5/modeling_kosmos2_5.py:449-918).
        config = Kosmos2_5VisionConfig(
            hidden_size=cfg.get("hidden_size", 1536), patch_embed_hidden_size=cfg.get("patch_embed_hidden_size", 768),
            intermediate_size=cfg.get("d_ff", 3968), head_dim=cfg.get("d_kv", 64),
            num_hidden_layers=cfg.get("num_hidden_layers", 18), num_attention_heads=cfg.get("num_attention_heads", 24),
            dense_act_fn=cfg.get("dense_act_fn", "gelu_new"), layer_norm_eps=cfg.get("layer_norm_eps", 1e-6),
            dropout_rate=cfg.get("dropout_rate", 0.0), attention_dropout=cfg.get("attention_dropout", 0.0),
            max_num_patches=cfg.get("seq_len", 4096),
        )
        return config, feature_layer, "full"
    if family == "got_vision_model":
        # model/got/configuration_got_vit.py:17-31 (SAM ViT-B) -> GotOcr2VisionConfig; GoTVisionModel.forward
        # (model/got/modeling_got_vit.py:471-485) ends with net_2 / net_3 = GOT-OCR2's conv_upsampler1/2, whose output
        # width is the config's `hidden_size` (the expert mlp's LayerNorm width, 69 and 85).
        # 173-175: select_layer is ignored, all tokens are kept.
        embed_dim = cfg.get("embed_dim", 768)
        vision = GotOcr2VisionConfig(
            hidden_size=embed_dim, output_channels=cfg.get("out_chans", 256),
            num_hidden_layers=cfg.get("depth", 12), num_attention_heads=cfg.get("num_heads", 12),
            num_channels=cfg.get("in_chans", 3), image_size=cfg.get("img_size", 1024),
            patch_size=cfg.get("patch_size", 16), qkv_bias=cfg.get("qkv_bias", True),
            use_abs_pos=cfg.get("use_abs_pos", True), use_rel_pos=cfg.get("use_rel_pos", False),
            window_size=cfg.get("window_size", 0), global_attn_indexes=list(cfg.get("global_attn_indexes", ())),
            mlp_dim=int(embed_dim * cfg.get("mlp_ratio", 4.0)), layer_norm_eps=1e-6, hidden_act="gelu",
        )
        width = cfg.get("hidden_size", 1024)
        # Only `hidden_size` of the text config is used (GotOcr2ExpertBackbone builds no text model).
        text = {"model_type": "qwen2", "hidden_size": width, "intermediate_size": width, "num_hidden_layers": 1,
                "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 1}
        return GotOcr2Config(vision_config=vision, text_config=text), None, "full"
    if family == "intern_vit_6b":
        # 142-154: as CLIP, last_hidden_state (InternViT has no final norm) or hidden_states[i], CLS dropped.
        return _intern_vit_config(cfg), feature_layer, "default"
    raise ValueError(f"Unsupported official expert {family!r}; supported: {', '.join(SUPPORTED_EXPERTS)}.")


def convert_config(official_config: dict, token_ids: ChimeraTokenIds):
    """The official `ChimeraChatConfig` dict (model/chimera/configuration_chimera.py) -> this project's
    `ChimeraConfig`."""
    experts_config = official_config.get("expert_encoder_config")
    if not experts_config or not experts_config.get("config_list"):
        raise ValueError(
            "This official config has no `expert_encoder_config`: it is a plain InternVL2 model, not Chimera."
        )
    if official_config.get("ps_version", "v1") != "v2":
        # model/chimera/modeling_chimera.py:336-351: "v1" leaves the pixel-shuffled grid transposed; transformers'
        # InternVL pixel_shuffle is "v2" (the final permute), so a "v1" model's token order cannot be reproduced.
        raise ValueError(f"ps_version {official_config.get('ps_version', 'v1')!r} is not supported (only 'v2').")
    vision = official_config["vision_config"]
    select_layer = int(official_config.get("select_layer", -1))
    if select_layer != -1:
        logger.warning(
            "select_layer=%d: the official router reads the CLS token of the *last* InternViT layer "
            "(model/chimera/modeling_chimera.py:373-380), this project's router reads it at the feature layer; "
            "routing may differ.",
            select_layer,
        )
    image_size = int(official_config.get("force_image_size") or vision.get("image_size", 224))
    patch = vision.get("patch_size", 14)
    ratio = float(official_config.get("downsample_ratio", 0.5))
    text_config, _ = _text_config(official_config["llm_config"])
    tie = bool(text_config.tie_word_embeddings)
    generalist = InternVLConfig(
        vision_config=_intern_vit_config(vision, image_size=image_size),
        text_config=text_config,
        image_token_id=token_ids.image_context,
        image_seq_length=int((image_size // patch) ** 2 * ratio**2),  # model/chimera/modeling_chimera.py:57
        downsample_ratio=ratio,
        # mlp1 = LN -> Linear -> nn.GELU() -> Linear (model/chimera/modeling_chimera.py:121-126)
        projector_hidden_act="gelu",
        vision_feature_layer=select_layer,  # extract_feature (model/chimera/modeling_chimera.py:353-364)
        vision_feature_select_strategy="default",  # `vit_embeds[:, 1:, :]` (model/chimera/modeling_chimera.py:364)
        tie_word_embeddings=tie,
    )
    experts = []
    for index, entry in enumerate(experts_config["config_list"]):
        if entry.get("index", index) != index:
            raise ValueError(
                f"config_list entry {index} has index {entry.get('index')} (the official code asserts equality)."
            )
        vision_config, feature_layer, strategy = _expert_configs(entry)
        experts.append(ChimeraExpertConfig(  # projector: model/expert_encoder/modeling_expert_encoder.py:83-91
            domain=entry["domain"], vision_config=vision_config, feature_layer=feature_layer,
            feature_select_strategy=strategy, projector_hidden_act="gelu",
        ))
    return ChimeraConfig(
        generalist_config=generalist,
        experts=experts,
        expert_token_ids=list(token_ids.experts),
        expert_start_token_id=token_ids.expert_start,
        expert_end_token_id=token_ids.expert_end,
        expert_insert_after_token_id=token_ids.image_end,
        # expert_route reads pooler_output = last_hidden_state[:, 0] of the thumbnail
        # (model/chimera/modeling_chimera.py:373-380, model/chimera/modeling_intern_vit.py:352)
        router_feature="cls",
        tie_word_embeddings=tie,
    )


# ------------------------------------------------------------------------------------------------------- weights


class _Source:
    """The official state dict; every key must be taken exactly once."""

    def __init__(self, state_dict: dict):
        self.tensors = dict(state_dict)
        self.dropped = []

    def keys_under(self, prefix: str) -> list:
        return sorted(k for k in self.tensors if k.startswith(prefix))

    def take(self, key: str) -> torch.Tensor:
        return self.tensors.pop(key)

    def drop_buffers(self):
        for key in [k for k in self.tensors if _DROPPED_BUFFERS.search(k)]:
            self.dropped.append(key)
            del self.tensors[key]


def _apply_rules(source: _Source, src_prefix: str, dst_prefix: str, rules, out: dict):
    """Map every official key under `src_prefix` whose remainder fully matches a rule's regex: the replacement is a
    template (`\\1`...) or a function `(match, tensor) -> {name: tensor}` for keys that split. Unmatched keys stay in
    `source` (and are reported as left over)."""
    for key in source.keys_under(src_prefix):
        local = key[len(src_prefix):]
        for pattern, replacement in rules:
            match = re.fullmatch(pattern, local)
            if match is None:
                continue
            tensor = source.take(key)
            pieces = replacement(match, tensor) if callable(replacement) else {match.expand(replacement): tensor}
            for name, value in pieces.items():
                if dst_prefix + name in out:
                    raise ValueError(f"Two official weights map to {dst_prefix + name!r}.")
                out[dst_prefix + name] = value
            break


def split_internvit_qkv(weight: torch.Tensor):
    """InternViT's fused `attn.qkv` (`[3D, D]` weight or `[3D]` bias) -> q, k, v: `qkv(x).reshape(B, N, 3, heads,
    head_dim)` (model/chimera/modeling_intern_vit.py:145) is a plain `[q; k; v]` stack."""
    if weight.shape[0] % 3:
        raise ValueError(f"InternViT qkv of shape {tuple(weight.shape)} is not a [q; k; v] stack.")
    return weight.chunk(3, dim=0)


def split_internlm2_wqkv(weight: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """InternLM2's fused `wqkv` (`[(H + 2 KV) * D_head, hidden]` weight or `[(H + 2 KV) * D_head]` bias) -> q, k, v.

    modeling_internlm2.py:373-385: `rearrange(qkv, 'b q (h gs d) -> b q h gs d', gs=G + 2, d=D_head)`, queries are
    `[..., :G, :]` flattened as `(h gs)`, keys `[..., -2, :]`, values `[..., -1, :]` (`G = H // KV`). Query head
    `h * G + g` attends with key/value head `h`, which is transformers' `repeat_kv` grouping: no permutation."""
    groups = num_heads // num_kv_heads
    expected = (num_heads + 2 * num_kv_heads) * head_dim
    if weight.shape[0] != expected:
        raise ValueError(f"wqkv has {weight.shape[0]} rows, expected (H + 2 KV) * D_head = {expected}.")
    tail = weight.shape[1:]
    grouped = weight.reshape(num_kv_heads, groups + 2, head_dim, *tail)
    q = grouped[:, :groups].reshape(num_heads * head_dim, *tail)
    k = grouped[:, groups].reshape(num_kv_heads * head_dim, *tail)
    v = grouped[:, groups + 1].reshape(num_kv_heads * head_dim, *tail)
    return q, k, v


def _resize_position_embedding(pos: torch.Tensor, old_grid: int, new_grid: int) -> torch.Tensor:
    """`InternVisionEmbeddings._get_pos_embed` (model/chimera/modeling_intern_vit.py:87-93, applied at every forward
    there) done once: bicubic, align_corners=False, in float32, CLS position untouched."""
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    grid = patch_pos.float().reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patch_pos = grid.reshape(1, -1, new_grid * new_grid).permute(0, 2, 1).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


def _intern_vit_rules(vision: dict, target_image_size: int):
    """InternViT (model/chimera/modeling_intern_vit.py; line numbers below are of that file) -> transformers'
    InternVLVisionModel (`internvl_vision`)."""
    patch = vision.get("patch_size", 14)
    old_grid, new_grid = vision.get("image_size", 224) // patch, target_image_size // patch

    def qkv(match, tensor):
        q, k, v = split_internvit_qkv(tensor)
        layer, kind = match.group(1), match.group(2)
        return {f"encoder.layer.{layer}.attention.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v))}

    def position(match, tensor):
        return {"embeddings.position_embeddings": tensor if old_grid == new_grid else
                _resize_position_embedding(tensor, old_grid, new_grid)}

    return [
        (r"embeddings\.class_embedding", "embeddings.cls_token"),  # 74-76, [1, 1, D] both sides
        (r"embeddings\.patch_embedding\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),  # 78-80
        (r"embeddings\.position_embedding", position),  # 85, [1, N + 1, D] both sides
        (r"encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)", qkv),  # 129, 145
        (r"encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)",
         r"encoder.layer.\1.attention.projection_layer.\2"),  # 141
        (r"encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.weight", r"encoder.layer.\1.attention.\2.weight"),  # 135-137
        (r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layer.\1.mlp.\2.\3"),  # 189-190
        (r"encoder\.layers\.(\d+)\.norm1\.(weight|bias)", r"encoder.layer.\1.layernorm_before.\2"),  # 208, 224
        (r"encoder\.layers\.(\d+)\.norm2\.(weight|bias)", r"encoder.layer.\1.layernorm_after.\2"),  # 209, 226
        (r"encoder\.layers\.(\d+)\.ls1", r"encoder.layer.\1.lambda_1"),  # 211, 224
        (r"encoder\.layers\.(\d+)\.ls2", r"encoder.layer.\1.lambda_2"),  # 212, 226
    ]


def _llm_rules(family: str, text_config):
    """Official LLM (`language_model.*`) -> transformers' text model under `model.generalist.language_model.` (the LM
    head is handled by the caller)."""
    if family != "internlm2":
        # Qwen2 / Llama are transformers' own classes; Phi-3's official code (model/phi3/modeling_phi3.py:260-261,
        # 320-321, 353-357) has transformers' fused qkv_proj / gate_up_proj layout and names.
        return [(r"model\.(.+)", r"\1")]
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = text_config.hidden_size // heads

    def wqkv(match, tensor):
        q, k, v = split_internlm2_wqkv(tensor, heads, kv_heads, head_dim)
        layer, kind = match.group(1), match.group(2)
        return {f"layers.{layer}.self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v))}

    # model/internlm2/modeling_internlm2.py (line numbers below are of that file)
    return [
        (r"model\.tok_embeddings\.weight", "embed_tokens.weight"),  # 829
        (r"model\.norm\.weight", "norm.weight"),  # 832
        (r"model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)", wqkv),  # 315-319, 373-385
        (r"model\.layers\.(\d+)\.attention\.wo\.(weight|bias)", r"layers.\1.self_attn.o_proj.\2"),  # 321
        # 270-280: w2(act(w1 x) * w3 x) = down(act(gate x) * up x)
        (r"model\.layers\.(\d+)\.feed_forward\.w1\.weight", r"layers.\1.mlp.gate_proj.weight"),  # 270
        (r"model\.layers\.(\d+)\.feed_forward\.w3\.weight", r"layers.\1.mlp.up_proj.weight"),  # 271
        (r"model\.layers\.(\d+)\.feed_forward\.w2\.weight", r"layers.\1.mlp.down_proj.weight"),  # 272
        (r"model\.layers\.(\d+)\.attention_norm\.weight", r"layers.\1.input_layernorm.weight"),  # 632
        (r"model\.layers\.(\d+)\.ffn_norm\.weight", r"layers.\1.post_attention_layernorm.weight"),  # 633
    ]


_GOT_RULES = [  # model/got/modeling_got_vit.py -> GotOcr2ExpertBackbone (GotOcr2VisionEncoder + conv_upsampler1/2)
    (r"patch_embed\.proj\.(weight|bias)", r"vision_tower.patch_embed.projection.\1"),  # 322
    (r"pos_embed", "vision_tower.pos_embed"),  # 429-431, [1, H/p, W/p, D] both sides
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"vision_tower.layers.\1.layer_norm1.\2"),  # 88
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"vision_tower.layers.\1.layer_norm2.\2"),  # 98
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"vision_tower.layers.\1.attn.\2.\3"),  # 149-150, 164
    (r"blocks\.(\d+)\.attn\.(rel_pos_h|rel_pos_w)", r"vision_tower.layers.\1.attn.\2"),  # 158-159
    (r"blocks\.(\d+)\.mlp\.(lin1|lin2)\.(weight|bias)", r"vision_tower.layers.\1.mlp.\2.\3"),  # 31-32
    (r"neck\.0\.weight", "vision_tower.neck.conv1.weight"),  # 449-465: Conv1x1, LN2d, Conv3x3, LN2d
    (r"neck\.1\.(weight|bias)", r"vision_tower.neck.layer_norm1.\1"),
    (r"neck\.2\.weight", "vision_tower.neck.conv2.weight"),
    (r"neck\.3\.(weight|bias)", r"vision_tower.neck.layer_norm2.\1"),
    (r"net_2\.weight", "conv_upsampler1.weight"),  # 468
    (r"net_3\.weight", "conv_upsampler2.weight"),  # 469
]

# nn.Sequential(LayerNorm, Linear, GELU, Linear): index 2 has no weights (model/chimera/modeling_chimera.py:121-126,
# model/expert_encoder/modeling_expert_encoder.py:83-91).
_PROJECTOR_RULES = [
    (r"0\.(weight|bias)", r"layer_norm.\1"),
    (r"1\.(weight|bias)", r"linear_1.\1"),
    (r"3\.(weight|bias)", r"linear_2.\1"),
]


def _target_shapes(config) -> dict:
    """`{key: shape}` of the converted model's state dict (built on the meta device, nothing allocated)."""
    from modeling_chimera import ChimeraForConditionalGeneration  # noqa: PLC0415 (modeling: ~2 s more for --help)

    with torch.device("meta"), no_init_weights():
        model = ChimeraForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_state_dict(official_state_dict: dict, official_config: dict, *, token_ids: ChimeraTokenIds):
    """Convert an official Chimera state dict. Returns `(ChimeraConfig, state_dict)`; the state dict holds exactly the
    converted model's keys with the right shapes (else `ValueError` listing what is left over, missing or
    mis-shaped). Tensors are taken as they are (slices / views of the official ones, no dtype change)."""
    config = convert_config(official_config, token_ids)
    domains = config.domains
    targets = _target_shapes(config)
    source = _Source(official_state_dict)
    source.drop_buffers()
    out = {}

    # Generalist vision tower + projector.
    vision = official_config["vision_config"]
    image_size = int(official_config.get("force_image_size") or vision.get("image_size", 224))
    _apply_rules(source, "vision_model.", "model.generalist.vision_tower.", _intern_vit_rules(vision, image_size), out)
    _apply_rules(source, "mlp1.", "model.generalist.multi_modal_projector.", _PROJECTOR_RULES, out)

    # LLM.
    text_config, family = _text_config(official_config["llm_config"])
    _apply_rules(source, "language_model.", "model.generalist.language_model.", _llm_rules(family, text_config), out)
    head_key = "language_model.output.weight" if family == "internlm2" else "language_model.lm_head.weight"
    embed_key = "model.generalist.language_model.embed_tokens.weight"
    if config.tie_word_embeddings:
        # A tied official LLM uses its embeddings as LM head whatever the file holds (tie_weights on load).
        if head_key in source.tensors:
            source.dropped.append(head_key)
            source.take(head_key)
        if embed_key in out:
            out["lm_head.weight"] = out[embed_key]
    elif head_key in source.tensors:
        out["lm_head.weight"] = source.take(head_key)

    # Router and experts (model/chimera/modeling_chimera.py:82; model/expert_encoder/modeling_expert_encoder.py:75,
    # 83-91).
    if "expert_router.weight" in source.tensors:
        out["model.router.weight"] = source.take("expert_router.weight")
    for index, domain in enumerate(domains):
        src = f"expert_encoder.encoder.{index}."
        dst = f"model.expert_encoders.{domain}.encoder."
        kind = official_config["expert_encoder_config"]["config_list"][index]["config"]["model_type"]
        if kind == "got_vision_model":
            rules = _GOT_RULES
        elif kind == "intern_vit_6b":
            entry = official_config["expert_encoder_config"]["config_list"][index]["config"]
            rules = _intern_vit_rules(entry, entry.get("image_size", 224))
        elif kind == "clip_vision_model" and not any(k.startswith(dst + "vision_model.") for k in targets):
            rules = [(r"vision_model\.(.+)", r"\1")]  # transformers 5's CLIPVisionModel has no `vision_model.` level
        else:
            rules = [(r"(.+)", r"\1")]  # Pix2Struct / Kosmos-2.5 / CLIP: transformers' own names
        _apply_rules(source, src, dst, rules, out)
        _apply_rules(source, f"expert_encoder.mlp.{index}.", f"model.expert_projectors.{domain}.", _PROJECTOR_RULES,
                     out)

    _check_complete(source, out, targets)
    if source.dropped:
        logger.info("Dropped %d recomputed buffers / tied LM head: %s", len(source.dropped), source.dropped[:10])
    return config, out


def _check_complete(source: _Source, out: dict, targets: dict):
    left_over = sorted(source.tensors)
    missing = sorted(set(targets) - set(out))
    unexpected = sorted(set(out) - set(targets))
    wrong = sorted(
        f"{k}: converted {tuple(out[k].shape)}, expected {targets[k]}"
        for k in set(out) & set(targets) if tuple(out[k].shape) != targets[k]
    )
    if left_over or missing or unexpected or wrong:
        def show(items):
            return f"{len(items)} {items[:25]}{' ...' if len(items) > 25 else ''}"

        raise ValueError(
            "The official checkpoint does not convert cleanly:\n"
            f"  official weights left over: {show(left_over)}\n"
            f"  converted weights missing: {show(missing)}\n"
            f"  converted weights the model does not have: {show(unexpected)}\n"
            f"  shape mismatches: {show(wrong)}"
        )


# ---------------------------------------------------------------------------------------------------- checkpoint


def load_official_state_dict(input_dir) -> dict:
    """All tensors of an official checkpoint folder (safetensors only)."""
    input_dir = Path(input_dir)
    index = input_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (input_dir / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        found = sorted(p.name for p in input_dir.glob("*.bin")) + sorted(p.name for p in input_dir.glob("*.pt*"))
        raise FileNotFoundError(
            f"No safetensors weights in {str(input_dir)!r} (model.safetensors or model.safetensors.index.json)"
            + (f"; found {found}: convert them to safetensors first, this converter never unpickles files." if found
               else ".")
        )
    state_dict = {}
    for shard in shards:
        state_dict.update(load_file(str(input_dir / shard)))
    return state_dict


def chat_template_for(template: str | None, system_message: str | None = None) -> str | None:
    """A Jinja chat template reproducing the official conversation template `template` (SeparatorStyle.MPT,
    conversation.py:238-247: `system + sep`, then `role + message + sep` per turn, the open assistant role last;
    `chat()` writes each image as `<image>\\n` before the question, model/chimera/modeling_chimera.py:455-456).
    Images become `<IMG_CONTEXT>`, which `InternVLProcessor` expands to `<img><IMG_CONTEXT>...</img>`. `None` for
    templates it does not know."""
    if template not in CHAT_TEMPLATES:
        return None
    system_prefix, user, assistant, sep = CHAT_TEMPLATES[template]
    system = json.dumps(system_message if system_message is not None else _DEFAULT_SYSTEM_MESSAGE, ensure_ascii=False)
    return (
        "{%- set ns = namespace(system=" + system + ", start=0) -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
        "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join('') -%}{%- endif -%}"
        "{%- set ns.start = 1 -%}"
        "{%- endif -%}"
        "{{ " + json.dumps(system_prefix) + " + ns.system + " + json.dumps(sep) + " }}"
        "{%- for message in messages[ns.start:] -%}"
        "{%- if message['role'] == 'assistant' -%}{{ " + json.dumps(assistant) + " }}"
        "{%- else -%}{{ " + json.dumps(user) + " }}{%- endif -%}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{ '<IMG_CONTEXT>\\n' }}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ " + json.dumps(sep) + " }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + json.dumps(assistant) + " }}{%- endif -%}"
    )


def _expert_image_processor(meta: dict):
    """An official expert image processor (model/chimera/processing_chimera.py:12-42) as a transformers image
    processor."""
    from transformers import GotOcr2ImageProcessor  # noqa: PLC0415 (processors: ~2 s more for --help)
    from transformers.image_utils import PILImageResampling  # noqa: PLC0415 (processors: ~2 s more for --help)

    meta = dict(meta)
    kind = meta.pop("image_processor_type", None)
    meta.pop("processor_class", None)
    if kind in ("Pix2StructImageProcessor", "CLIPImageProcessor", "Kosmos2_5ImageProcessor"):
        # The official code instantiates transformers' Pix2Struct / CLIP processors from these dicts; its
        # Kosmos-2.5 processor (model/kosmos2_5/image_processing_kosmos2_5.py:114-126) has transformers' arguments.
        if kind == "CLIPImageProcessor":
            # set by the official code only to count tokens (model/chimera/processing_chimera.py:31)
            meta.pop("max_patches", None)
        return getattr(transformers, kind).from_dict(meta)
    if kind == "GOTImageProcessor":
        # model/got/image_processing_got.py: bicubic resize to image_size x image_size, CLIP mean / std always.
        size = int(meta.get("image_size", 384))
        return GotOcr2ImageProcessor(size={"height": size, "width": size}, crop_to_patches=False,
                                     resample=PILImageResampling.BICUBIC, image_mean=list(CLIP_MEAN),
                                     image_std=list(CLIP_STD))
    if kind == "InternViTImageProcessor":
        # model/chimera/processing_intern_vit.py: bicubic resize to size x size, ImageNet mean / std by default.
        size = meta.get("size") or 448
        size = int(size if not isinstance(size, dict) else size.get("height", size.get("shortest_edge")))
        return GotOcr2ImageProcessor(size={"height": size, "width": size}, crop_to_patches=False,
                                     resample=PILImageResampling.BICUBIC,
                                     image_mean=list(meta.get("image_mean") or IMAGENET_MEAN),
                                     image_std=list(meta.get("image_std") or IMAGENET_STD))
    raise ValueError(f"Unsupported official expert image processor {kind!r}.")


def _official_expert_processors(input_dir: Path):
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = input_dir / name
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("expert_processor_list"):
                return data["expert_processor_list"]
    return None


def build_processor(input_dir, config, official_config: dict, trust_remote_code: bool = False):
    """`(ChimeraProcessor, None)` (InternVLProcessor + expert image processors) for the converted model, or `(None,
    reason)` when the official tokenizer or processor config cannot be used offline."""
    from transformers import AutoTokenizer, GotOcr2ImageProcessor, InternVLProcessor  # noqa: PLC0415 (processors: ~2 s more for --help)
    from transformers.image_utils import PILImageResampling  # noqa: PLC0415 (processors: ~2 s more for --help)
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor  # noqa: PLC0415 (processors: ~2 s more for --help)

    from processing_chimera import ChimeraProcessor  # noqa: PLC0415 (processors: ~2 s more for --help)

    input_dir = Path(input_dir)
    metas = _official_expert_processors(input_dir)
    if metas is None or len(metas) != len(config.experts):
        return None, f"no official `expert_processor_list` for {len(config.experts)} experts in {str(input_dir)!r}"
    try:
        expert_processors = {e.domain: _expert_image_processor(m) for e, m in zip(config.experts, metas)}
    except ValueError as err:
        return None, str(err)
    named = {"start_image_token": IMAGE_START_TOKEN, "end_image_token": IMAGE_END_TOKEN,
             "context_image_token": IMAGE_CONTEXT_TOKEN, "video_token": "<video>"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(input_dir), trust_remote_code=trust_remote_code,
                                                  extra_special_tokens=named)
    except Exception as err:  # the official tokenizer may need remote code or sentencepiece
        return None, f"the official tokenizer does not load ({type(err).__name__}: {err})"
    if tokenizer.convert_tokens_to_ids("<video>") in (None, tokenizer.unk_token_id):
        # InternVLProcessor needs a video token; Chimera (and this conversion) handles images only, so the token
        # only has to exist in the tokenizer.
        tokenizer.add_tokens(["<video>"], special_tokens=True)
        if tokenizer.convert_tokens_to_ids("<video>") >= config.get_text_config().vocab_size:
            logger.warning("Added `<video>` to the tokenizer for InternVLProcessor; it has no embedding row (Chimera "
                           "takes images only, never pass videos).")
    for field_name, token_id in (("<IMG_CONTEXT>", config.generalist_config.image_token_id),
                                 ("</img>", config.expert_insert_after_token_id)):
        if tokenizer.convert_tokens_to_ids(field_name) != token_id:
            return None, f"the tokenizer's {field_name} id differs from the converted config's {token_id}"
    vision = official_config["vision_config"]
    size = int(official_config.get("force_image_size") or vision.get("image_size", 448))
    # chimera_infer.py:19-88: bicubic resize, ImageNet mean / std, dynamic tiles (max_num=12) plus a thumbnail last.
    image_processor = GotOcr2ImageProcessor(
        size={"height": size, "width": size}, crop_to_patches=bool(official_config.get("dynamic_image_size", True)),
        min_patches=int(official_config.get("min_dynamic_patch", 1)), max_patches=12,
        resample=PILImageResampling.BICUBIC, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    )
    template = chat_template_for(official_config.get("template"), official_config.get("system_message"))
    try:
        generalist = InternVLProcessor(
            image_processor=image_processor, tokenizer=tokenizer,
            video_processor=InternVLVideoProcessor(size={"height": size, "width": size}),
            image_seq_length=config.generalist_config.image_seq_length, chat_template=template,
        )
    except (AttributeError, KeyError, ValueError) as err:  # e.g. a remote-code tokenizer without named tokens
        return None, f"InternVLProcessor does not accept the official tokenizer ({type(err).__name__}: {err})"
    if template is None:
        logger.warning("Unknown official conversation template %r: the processor has no chat template.",
                       official_config.get("template"))
    return ChimeraProcessor.from_generalist(generalist, expert_processors), None


def _target_dtype(state_dict: dict, dtype):
    if dtype is not None:
        return dtype
    for key in ("language_model.model.tok_embeddings.weight", "language_model.model.embed_tokens.weight"):
        if key in state_dict:
            return state_dict[key].dtype
    return next(t.dtype for t in state_dict.values() if t.is_floating_point())


def convert_checkpoint(
    input_dir,
    output_dir,
    dtype: torch.dtype | None = None,
    token_id_overrides: dict | None = None,
    trust_remote_code: bool = False,
    max_shard_size: str = "5GB",
):
    """Convert the official checkpoint folder `input_dir` and write the converted model (and, when possible, its
    processor) to `output_dir`. Returns `(output_dir, processor written?)`."""
    from modeling_chimera import ChimeraForConditionalGeneration  # noqa: PLC0415 (modeling: ~2 s more for --help)

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    official_config = json.loads((input_dir / "config.json").read_text())
    num_experts = len((official_config.get("expert_encoder_config") or {}).get("config_list") or [])
    tokens = read_added_tokens(input_dir)
    token_ids = resolve_token_ids(tokens, num_experts, token_id_overrides)
    state_dict = load_official_state_dict(input_dir)
    dtype = _target_dtype(state_dict, dtype)
    config, converted = convert_state_dict(state_dict, official_config, token_ids=token_ids)
    del state_dict
    converted = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in converted.items()}

    config.dtype = dtype
    with torch.device("meta"), no_init_weights():
        model = ChimeraForConditionalGeneration(config)
    model.load_state_dict(converted, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    generation = model.generation_config
    sep = CHAT_TEMPLATES.get(official_config.get("template"), (None,) * 4)[3]
    if sep in tokens:  # official chat() stops at the template's separator (model/chimera/modeling_chimera.py:479, 529)
        generation.eos_token_id = tokens[sep]
    pad = official_config["llm_config"].get("pad_token_id")
    if pad is not None:
        generation.pad_token_id = pad
    generation.suppress_tokens = list(token_ids.experts)  # expert placeholders are inputs only
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    logger.info("Wrote the converted model to %s", output_dir)

    processor, reason = build_processor(input_dir, config, official_config, trust_remote_code=trust_remote_code)
    if processor is None:
        logger.warning(
            "Model written without a processor: %s. Build it with ChimeraProcessor.from_generalist(InternVLProcessor"
            "(...), {domain: image processor}) and save it into %s.", reason, output_dir,
        )
        return output_dir, False
    processor.save_pretrained(output_dir)
    logger.info("Wrote the ChimeraProcessor to %s", output_dir)
    return output_dir, True


# ----------------------------------------------------------------------------------------------------------- CLI


def make_parser(prog: str | None = None):
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input_dir", required=True,
                        help="official Chimera checkpoint folder (config.json + safetensors)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the converted weights (default: as saved)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow the official tokenizer's remote code (InternLM2) when writing the processor")
    parser.add_argument("--max_shard_size", default="5GB")
    parser.add_argument("--image_context_token_id", type=int, default=None, help="id of <IMG_CONTEXT>")
    parser.add_argument("--image_end_token_id", type=int, default=None, help="id of </img>")
    parser.add_argument("--expert_start_token_id", type=int, default=None, help="id of <domain>")
    parser.add_argument("--expert_end_token_id", type=int, default=None, help="id of </domain>")
    parser.add_argument("--expert_token_ids", type=int, nargs="+", default=None,
                        help="ids of <DOMAIN_0_CONTEXT> ... <DOMAIN_{N-1}_CONTEXT>")
    return parser


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {
        "image_context": args.image_context_token_id, "image_end": args.image_end_token_id,
        "expert_start": args.expert_start_token_id, "expert_end": args.expert_end_token_id,
        "experts": args.expert_token_ids,
    }
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return convert_checkpoint(args.input_dir, args.output_dir, dtype=dtype, token_id_overrides=overrides,
                              trust_remote_code=args.trust_remote_code, max_shard_size=args.max_shard_size)


if __name__ == "__main__":
    main(make_parser().parse_args())
