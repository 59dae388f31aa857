"""`train.convert_official_chimera` on tiny synthetic official checkpoints.

The builders below write random tensors under the official key names and shapes (github.com/Alpha-Innovator/Chimera,
`chimera/chimera/model/...`), independently of the converter; the reference computations re-implement the official
formulas (InternViT layer, InternLM2 attention with its fused `wqkv`, pixel shuffle "v2", `mlp1`, expert `mlp`,
router, Kosmos-2.5 vision layer) and compare them with the converted transformers modules.
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from chimera_mixpert.tiny import build_expert_image_processor, build_tokenizer, random_images
from train.convert_official_chimera import (
    ChimeraTokenIds,
    chat_template_for,
    convert_state_dict,
    load_official_state_dict,
    main,
    make_parser,
    read_added_tokens,
    resolve_token_ids,
    split_internlm2_wqkv,
)


VIT, VIT_HEADS, IMAGE, PATCH = 32, 4, 16, 4
LLM, LLM_HEADS, LLM_KV = 32, 4, 2
EXPERT = 24
DOMAIN_TOKENS = ["<domain>", "</domain>"]


def _w(*shape, std=0.1):
    return torch.randn(*shape) * std


def _norm_weight(n):
    return 1.0 + 0.1 * torch.randn(n)


# --------------------------------------------------------------------------------------- official-layout builders


def official_intern_vit(prefix, hidden=VIT, layers=2, inter=2 * VIT, image=IMAGE, patch=PATCH, qkv_bias=True,
                        qk_norm=False, norm_type="layer_norm"):
    """chimera/model/chimera/modeling_intern_vit.py: InternVisionModel's state dict and config."""
    sd = {
        prefix + "embeddings.class_embedding": _w(1, 1, hidden, std=1.0),
        prefix + "embeddings.patch_embedding.weight": _w(hidden, 3, patch, patch),
        prefix + "embeddings.patch_embedding.bias": _w(hidden),
        prefix + "embeddings.position_embedding": _w(1, (image // patch) ** 2 + 1, hidden),
    }
    for i in range(layers):
        p = f"{prefix}encoder.layers.{i}."
        sd[p + "attn.qkv.weight"] = _w(3 * hidden, hidden, std=0.3)
        if qkv_bias:
            sd[p + "attn.qkv.bias"] = _w(3 * hidden)
        if qk_norm:
            sd[p + "attn.q_norm.weight"] = _norm_weight(hidden)
            sd[p + "attn.k_norm.weight"] = _norm_weight(hidden)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = _w(hidden, hidden), _w(hidden)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = _w(inter, hidden), _w(inter)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = _w(hidden, inter), _w(hidden)
        for norm in ("norm1", "norm2"):
            sd[p + norm + ".weight"] = _norm_weight(hidden)
            if norm_type == "layer_norm":
                sd[p + norm + ".bias"] = _w(hidden)
        sd[p + "ls1"], sd[p + "ls2"] = 0.5 + _w(hidden), 0.5 + _w(hidden)
    config = dict(model_type="intern_vit_6b", hidden_size=hidden, num_attention_heads=VIT_HEADS,
                  intermediate_size=inter, num_hidden_layers=layers, image_size=image, patch_size=patch,
                  qkv_bias=qkv_bias, qk_normalization=qk_norm, norm_type=norm_type, layer_norm_eps=1e-6,
                  hidden_act="gelu", initializer_factor=0.1, use_flash_attn=False, drop_path_rate=0.0)
    return sd, config


def official_projector(prefix, d_in, d_out):
    """nn.Sequential(LayerNorm, Linear, GELU, Linear) (`mlp1`, `expert_encoder.mlp.{k}`)."""
    return {
        prefix + "0.weight": _norm_weight(d_in), prefix + "0.bias": _w(d_in),
        prefix + "1.weight": _w(d_out, d_in, std=0.3), prefix + "1.bias": _w(d_out),
        prefix + "3.weight": _w(d_out, d_out, std=0.3), prefix + "3.bias": _w(d_out),
    }


def official_llm(kind, vocab, hidden=LLM, layers=2, heads=LLM_HEADS, kv=LLM_KV, inter=2 * LLM, tie=False):
    """`language_model.*` of an InternLM2 (model/internlm2/modeling_internlm2.py), Qwen2 or Phi-3
    (model/phi3/modeling_phi3.py) LLM, and its `llm_config`."""
    hd = hidden // heads
    p = "language_model.model."
    sd = {}
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, hidden_act="silu", max_position_embeddings=512,
                  rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=tie,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="float32", use_cache=True)
    if kind == "internlm2":
        sd[p + "tok_embeddings.weight"] = _w(vocab, hidden, std=1.0)
        for i in range(layers):
            q = f"{p}layers.{i}."
            sd[q + "attention.wqkv.weight"] = _w((heads + 2 * kv) * hd, hidden, std=0.3)
            sd[q + "attention.wo.weight"] = _w(hidden, heads * hd, std=0.3)
            sd[q + "feed_forward.w1.weight"] = _w(inter, hidden, std=0.3)
            sd[q + "feed_forward.w3.weight"] = _w(inter, hidden, std=0.3)
            sd[q + "feed_forward.w2.weight"] = _w(hidden, inter, std=0.3)
            sd[q + "attention_norm.weight"] = _norm_weight(hidden)
            sd[q + "ffn_norm.weight"] = _norm_weight(hidden)
        sd[p + "norm.weight"] = _norm_weight(hidden)
        if not tie:
            sd["language_model.output.weight"] = _w(vocab, hidden, std=0.3)
        config = dict(common, architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False,
                      attn_implementation="eager", auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config"})
        return sd, config
    sd[p + "embed_tokens.weight"] = _w(vocab, hidden, std=1.0)
    for i in range(layers):
        q = f"{p}layers.{i}."
        if kind == "qwen2":
            for name, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
                sd[q + f"self_attn.{name}.weight"], sd[q + f"self_attn.{name}.bias"] = _w(rows, hidden), _w(rows)
            sd[q + "mlp.gate_proj.weight"], sd[q + "mlp.up_proj.weight"] = _w(inter, hidden), _w(inter, hidden)
        else:  # phi3: fused qkv_proj and gate_up_proj (model/phi3/modeling_phi3.py:260, 321)
            sd[q + "self_attn.qkv_proj.weight"] = _w((heads + 2 * kv) * hd, hidden)
            sd[q + "mlp.gate_up_proj.weight"] = _w(2 * inter, hidden)
        sd[q + "self_attn.o_proj.weight"] = _w(hidden, heads * hd)
        sd[q + "mlp.down_proj.weight"] = _w(hidden, inter)
        sd[q + "input_layernorm.weight"] = _norm_weight(hidden)
        sd[q + "post_attention_layernorm.weight"] = _norm_weight(hidden)
    sd[p + "norm.weight"] = _norm_weight(hidden)
    if not tie:
        sd["language_model.lm_head.weight"] = _w(vocab, hidden)
    if kind == "qwen2":
        config = dict(common, architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
                      sliding_window=512, max_window_layers=layers)
    else:
        config = dict(common, architectures=["Phi3ForCausalLM"], model_type="phi3", original_max_position_embeddings=64,
                      embd_pdrop=0.0, resid_pdrop=0.0, sliding_window=None,
                      rope_scaling={"type": "su", "short_factor": [1.0] * (hd // 2), "long_factor": [2.0] * (hd // 2)})
    return sd, config


def official_clip(prefix, hidden=EXPERT, layers=2, image=IMAGE, patch=PATCH):
    """transformers 4.x `CLIPVisionModel` (keys under `vision_model.`)."""
    p = prefix + "vision_model."
    sd = {
        p + "embeddings.class_embedding": _w(hidden, std=1.0),
        p + "embeddings.patch_embedding.weight": _w(hidden, 3, patch, patch),
        p + "embeddings.position_embedding.weight": _w((image // patch) ** 2 + 1, hidden),
        p + "pre_layrnorm.weight": _norm_weight(hidden), p + "pre_layrnorm.bias": _w(hidden),
        p + "post_layernorm.weight": _norm_weight(hidden), p + "post_layernorm.bias": _w(hidden),
        p + "embeddings.position_ids": torch.arange((image // patch) ** 2 + 1)[None],  # persistent in old versions
    }
    for i in range(layers):
        q = f"{p}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[q + f"self_attn.{name}.weight"], sd[q + f"self_attn.{name}.bias"] = _w(hidden, hidden), _w(hidden)
        sd[q + "mlp.fc1.weight"], sd[q + "mlp.fc1.bias"] = _w(2 * hidden, hidden), _w(2 * hidden)
        sd[q + "mlp.fc2.weight"], sd[q + "mlp.fc2.bias"] = _w(hidden, 2 * hidden), _w(hidden)
        for norm in ("layer_norm1", "layer_norm2"):
            sd[q + norm + ".weight"], sd[q + norm + ".bias"] = _norm_weight(hidden), _w(hidden)
    config = dict(model_type="clip_vision_model", hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, image_size=image, patch_size=patch,
                  projection_dim=hidden, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_beams=1, top_k=50,
                  return_dict=True, architectures=["CLIPVisionModel"], transformers_version="4.37.2")
    return sd, config


def official_pix2struct(prefix, kind="pix2struct", hidden=EXPERT, layers=2, heads=4, d_kv=6, patch=PATCH, seq=16):
    """Pix2StructVisionModel (transformers) / Kosmos2_5VisionModel (model/kosmos2_5/modeling_kosmos2_5.py:449-918):
    the same key names."""
    sd = {
        prefix + "embeddings.patch_projection.weight": _w(hidden, patch * patch * 3, std=0.3),
        prefix + "embeddings.patch_projection.bias": _w(hidden),
        prefix + "embeddings.row_embedder.weight": _w(seq, hidden, std=0.5),
        prefix + "embeddings.column_embedder.weight": _w(seq, hidden, std=0.5),
        prefix + "layernorm.weight": _norm_weight(hidden),
    }
    for i in range(layers):
        q = f"{prefix}encoder.layer.{i}."
        for name in ("query", "key", "value"):
            sd[q + f"attention.{name}.weight"] = _w(heads * d_kv, hidden, std=0.3)
        sd[q + "attention.output.weight"] = _w(hidden, heads * d_kv, std=0.3)
        sd[q + "mlp.wi_0.weight"], sd[q + "mlp.wi_1.weight"] = _w(2 * hidden, hidden), _w(2 * hidden, hidden)
        sd[q + "mlp.wo.weight"] = _w(hidden, 2 * hidden)
        sd[q + "pre_mlp_layer_norm.weight"] = _norm_weight(hidden)
        sd[q + "pre_attention_layer_norm.weight"] = _norm_weight(hidden)
    config = dict(model_type=f"{'pix2struct' if kind == 'pix2struct' else 'kosmos_2_5'}_vision_model",
                  hidden_size=hidden, patch_embed_hidden_size=patch * patch * 3, d_ff=2 * hidden, d_kv=d_kv,
                  num_hidden_layers=layers, num_attention_heads=heads, dense_act_fn="gelu_new", layer_norm_eps=1e-6,
                  seq_len=seq, dropout_rate=0.0, attention_dropout=0.0)
    return sd, config


def official_got(prefix, embed=EXPERT, depth=2, heads=4, out_chans=EXPERT, image=32, patch=PATCH, window=2, width=32):
    """model/got/modeling_got_vit.py: GoTVisionModel (SAM ViT blocks, neck, net_2, net_3). The official code fixes the
    neck at 256 -> 512 -> 1024 channels; here the same layout at a tiny width."""
    grid, hd, global_layers = image // patch, embed // heads, [depth - 1]
    sd = {
        prefix + "patch_embed.proj.weight": _w(embed, 3, patch, patch), prefix + "patch_embed.proj.bias": _w(embed),
        prefix + "pos_embed": _w(1, grid, grid, embed),
        prefix + "neck.0.weight": _w(out_chans, embed, 1, 1),
        prefix + "neck.1.weight": _norm_weight(out_chans), prefix + "neck.1.bias": _w(out_chans),
        prefix + "neck.2.weight": _w(out_chans, out_chans, 3, 3),
        prefix + "neck.3.weight": _norm_weight(out_chans), prefix + "neck.3.bias": _w(out_chans),
        prefix + "net_2.weight": _w(2 * out_chans, out_chans, 3, 3),
        prefix + "net_3.weight": _w(width, 2 * out_chans, 3, 3),
    }
    for j in range(depth):
        q = f"{prefix}blocks.{j}."
        size = grid if j in global_layers else window
        sd[q + "norm1.weight"], sd[q + "norm1.bias"] = _norm_weight(embed), _w(embed)
        sd[q + "norm2.weight"], sd[q + "norm2.bias"] = _norm_weight(embed), _w(embed)
        sd[q + "attn.qkv.weight"], sd[q + "attn.qkv.bias"] = _w(3 * embed, embed), _w(3 * embed)
        sd[q + "attn.proj.weight"], sd[q + "attn.proj.bias"] = _w(embed, embed), _w(embed)
        sd[q + "attn.rel_pos_h"], sd[q + "attn.rel_pos_w"] = _w(2 * size - 1, hd), _w(2 * size - 1, hd)
        sd[q + "mlp.lin1.weight"], sd[q + "mlp.lin1.bias"] = _w(2 * embed, embed), _w(2 * embed)
        sd[q + "mlp.lin2.weight"], sd[q + "mlp.lin2.bias"] = _w(embed, 2 * embed), _w(embed)
    config = dict(model_type="got_vision_model", img_size=image, patch_size=patch, in_chans=3, embed_dim=embed,
                  depth=depth, num_heads=heads, mlp_ratio=2.0, out_chans=out_chans, qkv_bias=True, use_abs_pos=True,
                  use_rel_pos=True, rel_pos_zero_init=True, window_size=window, global_attn_indexes=global_layers,
                  hidden_size=width)
    return sd, config


EXPERT_BUILDERS = {
    "pix2struct": lambda p: official_pix2struct(p),
    "kosmos": lambda p: official_pix2struct(p, kind="kosmos"),
    "clip": lambda p: official_clip(p),
    "got": lambda p: official_got(p),
    "intern_vit": lambda p: official_intern_vit(p, hidden=EXPERT, qk_norm=True, norm_type="rms_norm", qkv_bias=False),
}
DOMAINS = {"pix2struct": "table", "kosmos": "document", "clip": "math", "got": "ocr", "intern_vit": "chart"}


def official_checkpoint(llm="internlm2", experts=("pix2struct", "clip"), vocab=64, tie=False, vit_kwargs=None,
                        select_layers=None, seed=0):
    """A whole official `ChimeraChatModel` state dict and `config.json` dict
    (model/chimera/configuration_chimera.py)."""
    torch.manual_seed(seed)
    sd, vision = official_intern_vit("vision_model.", **(vit_kwargs or {}))
    sd.update(official_projector("mlp1.", vision["hidden_size"] * 4, LLM))
    llm_sd, llm_config = official_llm(llm, vocab, tie=tie)
    sd.update(llm_sd)
    config_list = []
    for k, kind in enumerate(experts):
        expert_sd, expert_config = EXPERT_BUILDERS[kind](f"expert_encoder.encoder.{k}.")
        sd.update(expert_sd)
        width = expert_config.get("hidden_size")
        sd.update(official_projector(f"expert_encoder.mlp.{k}.", width, LLM))
        select = (select_layers or {}).get(kind, -1)
        config_list.append({"domain": DOMAINS[kind], "index": k, "select_layer": select, "config": expert_config})
    sd["expert_router.weight"] = _w(len(experts) + 1, vision["hidden_size"], std=0.5)
    config = {
        "architectures": ["ChimeraChatModel"], "model_type": "chimera", "vision_config": vision,
        "llm_config": llm_config,
        "expert_encoder_config": {"config_list": config_list, "llm_hidden_size": LLM, "num_encoder": len(experts)},
        "select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v2", "force_image_size": IMAGE,
        "template": {"internlm2": "internlm2-chat", "qwen2": "Hermes-2", "phi3": "phi3-chat"}[llm],
        "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 6,
        "use_backbone_lora": 0, "use_llm_lora": 0, "pad2square": False,
    }
    return sd, config


def token_ids(n):
    return ChimeraTokenIds(image_context=12, image_end=11, expert_start=20, expert_end=21,
                           experts=list(range(30, 30 + n)))


def _meta_state_shapes(config):
    from transformers.initialization import no_init_weights

    from modeling_chimera import ChimeraForConditionalGeneration

    with torch.device("meta"), no_init_weights():
        model = ChimeraForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _converted_model(sd, config, tokens):
    from modeling_chimera import ChimeraForConditionalGeneration

    chimera_config, converted = convert_state_dict(sd, config, token_ids=tokens)
    model = ChimeraForConditionalGeneration(chimera_config).eval()
    model.load_state_dict(converted, strict=True)
    return model, converted


# ------------------------------------------------------------------------------------------- official formulas


def official_intern_vit_layer(x, sd, p, heads, norm_type, eps=1e-6):
    """model/chimera/modeling_intern_vit.py:143-160 (naive attention) and 224-226:
    x = x + attn(norm1(x)) * ls1; x = x + mlp(norm2(x)) * ls2."""

    def norm(h, name):
        if norm_type == "layer_norm":
            return F.layer_norm(h, h.shape[-1:], sd[p + name + ".weight"], sd[p + name + ".bias"], eps)
        return sd[p + name + ".weight"] * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))

    b, n, c = x.shape
    h = norm(x, "norm1")
    qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias"))
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    if p + "attn.q_norm.weight" in sd:
        rms = lambda t, w: w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps))  # noqa: E731
        q = rms(q.transpose(1, 2).flatten(-2), sd[p + "attn.q_norm.weight"]).view(b, n, heads, -1).transpose(1, 2)
        k = rms(k.transpose(1, 2).flatten(-2), sd[p + "attn.k_norm.weight"]).view(b, n, heads, -1).transpose(1, 2)
    attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    a = F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    x = x + a * sd[p + "ls1"]
    m = F.linear(F.gelu(F.linear(norm(x, "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                 sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return x + m * sd[p + "ls2"]


def official_intern_vit_forward(pixel_values, sd, vision, prefix="vision_model."):
    """InternVisionModel.forward (model/chimera/modeling_intern_vit.py:95-107, 324-362): last_hidden_state."""
    p = prefix + "embeddings."
    patches = F.conv2d(pixel_values, sd[p + "patch_embedding.weight"], sd[p + "patch_embedding.bias"],
                       stride=vision["patch_size"])
    _, dim, height, width = patches.shape
    patches = patches.flatten(2).transpose(1, 2)
    cls = sd[p + "class_embedding"].expand(pixel_values.shape[0], 1, -1)
    # _get_pos_embed (87-93): the stored grid is bicubically resized to the input's grid at every forward.
    pos, grid = sd[p + "position_embedding"], vision["image_size"] // vision["patch_size"]
    pos_grid = pos[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    pos_grid = F.interpolate(pos_grid, size=(height, width), mode="bicubic", align_corners=False)
    pos = torch.cat([pos[:, :1], pos_grid.reshape(1, -1, height * width).permute(0, 2, 1)], dim=1)
    x = torch.cat([cls, patches], 1) + pos
    for i in range(vision["num_hidden_layers"]):
        x = official_intern_vit_layer(x, sd, f"{prefix}encoder.layers.{i}.", vision["num_attention_heads"],
                                      vision["norm_type"])
    return x


def official_pixel_shuffle_v2(x, scale=0.5):
    """model/chimera/modeling_chimera.py:336-351 with ps_version 'v2'."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def official_mlp(x, sd, p):
    """nn.Sequential(LayerNorm, Linear, GELU, Linear) (model/chimera/modeling_chimera.py:121-126,
    model/expert_encoder/modeling_expert_encoder.py:83-91)."""
    x = F.layer_norm(x, x.shape[-1:], sd[p + "0.weight"], sd[p + "0.bias"], 1e-5)
    return F.linear(F.gelu(F.linear(x, sd[p + "1.weight"], sd[p + "1.bias"])), sd[p + "3.weight"], sd[p + "3.bias"])


def official_internlm2_qkv(x, wqkv, heads, kv, head_dim):
    """modeling_internlm2.py:373-385: rearrange 'b q (h gs d) -> b q h gs d'; q = [..., :G, :] as (h gs), k = -2,
    v = -1. Returns (b, heads, q, d), (b, kv, q, d), (b, kv, q, d)."""
    b, n, _ = x.shape
    groups = heads // kv
    qkv = (x @ wqkv.T).view(b, n, kv, groups + 2, head_dim)
    q = qkv[..., :groups, :].reshape(b, n, heads, head_dim)
    return q.transpose(1, 2), qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)


def official_internlm2_logits(input_embeds, sd, cfg):
    """InternLM2ForCausalLM on `inputs_embeds` (eager attention, causal, positions 0..n-1, no rope scaling)."""
    p, n_layers = "language_model.model.", cfg["num_hidden_layers"]
    heads, kv, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd, eps = hidden // heads, cfg["rms_norm_eps"]
    rms = lambda t, w: w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps))  # noqa: E731
    n = input_embeds.shape[1]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.cat([torch.outer(torch.arange(n).float(), inv_freq)] * 2, dim=-1)
    cos, sin = emb.cos(), emb.sin()
    rot = lambda t: torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1)  # noqa: E731 (rotate_half, 247-251)
    causal = torch.full((n, n), float("-inf")).triu(1)
    x = input_embeds
    for i in range(n_layers):
        q_ = f"{p}layers.{i}."
        h = rms(x, sd[q_ + "attention_norm.weight"])
        q, k, v = official_internlm2_qkv(h, sd[q_ + "attention.wqkv.weight"], heads, kv, hd)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        attn = (q @ k.transpose(2, 3) / math.sqrt(hd) + causal).softmax(-1)
        x = x + (attn @ v).transpose(1, 2).reshape(x.shape) @ sd[q_ + "attention.wo.weight"].T
        h = rms(x, sd[q_ + "ffn_norm.weight"])
        x = x + (F.silu(h @ sd[q_ + "feed_forward.w1.weight"].T) * (h @ sd[q_ + "feed_forward.w3.weight"].T)) @ sd[
            q_ + "feed_forward.w2.weight"].T
    return rms(x, sd[p + "norm.weight"]) @ sd["language_model.output.weight"].T


def official_kosmos_vision(patches, sd, cfg, p):
    """Kosmos2_5VisionModel (model/kosmos2_5/modeling_kosmos2_5.py:449-918): T5 RMS norms, attention scaled by
    1 / sqrt(d_kv) (559), gated gelu_new MLP, final layernorm."""
    mask = (patches.sum(-1) != 0).float()
    heads, d_kv, eps = cfg["num_attention_heads"], cfg["d_kv"], cfg["layer_norm_eps"]
    rms = lambda t, w: w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps))  # noqa: E731
    rows, cols = patches[..., 0].long(), patches[..., 1].long()
    x = F.linear(patches[..., 2:], sd[p + "embeddings.patch_projection.weight"],
                 sd[p + "embeddings.patch_projection.bias"])
    x = x + sd[p + "embeddings.row_embedder.weight"][rows] + sd[p + "embeddings.column_embedder.weight"][cols]
    b, n, _ = x.shape
    bias = (1.0 - mask)[:, None, None, :] * torch.finfo(x.dtype).min
    for i in range(cfg["num_hidden_layers"]):
        q_ = f"{p}encoder.layer.{i}."
        h = rms(x, sd[q_ + "pre_attention_layer_norm.weight"])
        q, k, v = (F.linear(h, sd[q_ + f"attention.{t}.weight"]).view(b, n, heads, d_kv).transpose(1, 2)
                   for t in ("query", "key", "value"))
        attn = (q @ k.transpose(2, 3) / math.sqrt(d_kv) + bias).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, n, -1), sd[q_ + "attention.output.weight"])
        h = rms(x, sd[q_ + "pre_mlp_layer_norm.weight"])
        gelu_new = F.gelu(F.linear(h, sd[q_ + "mlp.wi_0.weight"]), approximate="tanh")
        x = x + F.linear(gelu_new * F.linear(h, sd[q_ + "mlp.wi_1.weight"]), sd[q_ + "mlp.wo.weight"])
    return rms(x, sd[p + "layernorm.weight"])


# ------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "llm, experts, tie",
    [
        ("internlm2", ("pix2struct", "clip", "got", "kosmos", "intern_vit"), False),
        ("qwen2", ("clip", "pix2struct"), True),
        ("phi3", ("got",), False),
    ],
)
def test_every_official_key_is_consumed_and_every_weight_filled(llm, experts, tie):
    sd, config = official_checkpoint(llm, experts, tie=tie)
    chimera_config, converted = convert_state_dict(sd, config, token_ids=token_ids(len(experts)))
    targets = _meta_state_shapes(chimera_config)
    assert set(converted) == set(targets)
    assert all(tuple(converted[k].shape) == shape for k, shape in targets.items())
    # Every official value lands somewhere (no tensor is invented; dropped: only the recomputed CLIP position_ids,
    # plus a tied LM head that the official checkpoint does not store).
    official_elements = sum(t.numel() for k, t in sd.items() if not k.endswith("position_ids"))
    tied_extra = converted["lm_head.weight"].numel() if tie else 0
    assert sum(t.numel() for t in converted.values()) - tied_extra == official_elements
    assert chimera_config.domains == [DOMAINS[e] for e in experts]
    assert chimera_config.router_feature == "cls"
    assert chimera_config.expert_insert_after_token_id == 11 and chimera_config.expert_start_token_id == 20
    assert chimera_config.generalist_config.image_token_id == 12
    assert chimera_config.generalist_config.image_seq_length == (IMAGE // PATCH) ** 2 // 4
    assert chimera_config.generalist_config.vision_config.use_mean_pooling
    text_type = chimera_config.get_text_config().model_type
    assert text_type == {"internlm2": "llama", "qwen2": "qwen2", "phi3": "phi3"}[llm]
    assert chimera_config.tie_word_embeddings == tie
    strategies = {e.domain: e.feature_select_strategy for e in chimera_config.experts}
    assert all(strategies[DOMAINS[e]] == ("default" if e in ("clip", "intern_vit") else "full") for e in experts)


def test_left_over_missing_and_mis_shaped_weights_raise():
    sd, config = official_checkpoint()
    tokens = token_ids(2)
    with pytest.raises(ValueError, match=r"left over: 1 \['vision_model.encoder.layers.0.attn.extra'\]"):
        convert_state_dict({**sd, "vision_model.encoder.layers.0.attn.extra": torch.zeros(1)}, config, token_ids=tokens)
    with pytest.raises(ValueError, match=r"left over: 1 \['img_context_embedding'\]"):
        convert_state_dict({**sd, "img_context_embedding": torch.zeros(1)}, config, token_ids=tokens)
    with pytest.raises(ValueError, match=r"does not have: 1 \['model.expert_encoders.table.encoder.extra.weight'\]"):
        convert_state_dict({**sd, "expert_encoder.encoder.0.extra.weight": torch.zeros(1)}, config, token_ids=tokens)
    partial = {k: v for k, v in sd.items() if k != "expert_encoder.mlp.1.3.bias"}
    with pytest.raises(ValueError, match=r"missing: 1 \['model.expert_projectors.math.linear_2.bias'\]"):
        convert_state_dict(partial, config, token_ids=tokens)
    wrong = dict(sd, **{"expert_router.weight": torch.zeros(5, VIT)})
    with pytest.raises(ValueError, match=r"shape mismatches: 1 \['model.router.weight: converted \(5, 32\)"):
        convert_state_dict(wrong, config, token_ids=tokens)
    with pytest.raises(ValueError, match="ps_version"):
        convert_state_dict(sd, dict(config, ps_version="v1"), token_ids=tokens)


def test_internlm2_wqkv_split_reproduces_the_fused_projection():
    torch.manual_seed(0)
    heads, kv, hd, hidden = 4, 2, 8, 32
    x = torch.randn(2, 5, hidden)
    for with_bias in (False, True):
        weight = torch.randn((heads + 2 * kv) * hd, hidden)
        bias = torch.randn((heads + 2 * kv) * hd) if with_bias else torch.zeros((heads + 2 * kv) * hd)
        q_ref, k_ref, v_ref = official_internlm2_qkv(torch.cat([x, torch.ones(2, 5, 1)], -1),
                                                     torch.cat([weight, bias[:, None]], 1), heads, kv, hd)
        wq, wk, wv = split_internlm2_wqkv(weight, heads, kv, hd)
        bq, bk, bv = split_internlm2_wqkv(bias, heads, kv, hd)
        q = F.linear(x, wq, bq).view(2, 5, heads, hd).transpose(1, 2)
        k = F.linear(x, wk, bk).view(2, 5, kv, hd).transpose(1, 2)
        v = F.linear(x, wv, bv).view(2, 5, kv, hd).transpose(1, 2)
        torch.testing.assert_close(q, q_ref)
        torch.testing.assert_close(k, k_ref)
        torch.testing.assert_close(v, v_ref)


def test_converted_internlm2_gives_the_official_logits():
    sd, config = official_checkpoint("internlm2")
    model, _ = _converted_model(sd, config, token_ids(2))
    embeds = torch.randn(2, 7, LLM)
    with torch.no_grad():
        hidden = model.model.generalist.language_model(inputs_embeds=embeds).last_hidden_state
        logits = model.lm_head(hidden)
    expected = official_internlm2_logits(embeds, sd, config["llm_config"])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "variant",
    [dict(), dict(qk_norm=True, norm_type="rms_norm", qkv_bias=False), dict(image=8)],  # image=8: force_image_size 16
)
def test_converted_intern_vit_layers_and_generalist_features_match_the_official_formulas(variant):
    sd, config = official_checkpoint(vit_kwargs=variant)
    model, _ = _converted_model(sd, config, token_ids(2))
    tower = model.model.generalist.vision_tower
    x = torch.randn(2, (IMAGE // PATCH) ** 2 + 1, VIT)
    with torch.no_grad():
        for i, layer in enumerate(tower.encoder.layer):
            expected = official_intern_vit_layer(x, sd, f"vision_model.encoder.layers.{i}.", VIT_HEADS,
                                                 config["vision_config"]["norm_type"])
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        # extract_feature (model/chimera/modeling_chimera.py:353-371): drop CLS, pixel shuffle v2, mlp1.
        pixels = torch.randn(3, 3, IMAGE, IMAGE)
        vit = official_intern_vit_forward(pixels, sd, config["vision_config"])
        side = IMAGE // PATCH
        shuffled = official_pixel_shuffle_v2(vit[:, 1:].reshape(3, side, side, -1)).reshape(3, -1, 4 * VIT)
        expected = official_mlp(shuffled, sd, "mlp1.")
        features = model.model.generalist.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
        # expert_route (model/chimera/modeling_chimera.py:373-380): router on pooler_output =
        # last_hidden_state[:, 0] of the thumbnail (the last tile of each image).
        _, router_logits, _, _ = model.model.encode_generalist(pixels, image_num_patches=[2, 1])
        expected = F.linear(vit[[1, 2], 0], sd["expert_router.weight"])
        torch.testing.assert_close(router_logits, expected, rtol=1e-4, atol=1e-5)


def test_expert_projectors_and_router_match_the_official_formulas():
    experts = ("pix2struct", "clip", "got", "kosmos", "intern_vit")
    sd, config = official_checkpoint("qwen2", experts)
    model, _ = _converted_model(sd, config, token_ids(len(experts)))
    with torch.no_grad():
        for k, kind in enumerate(experts):
            width = config["expert_encoder_config"]["config_list"][k]["config"]["hidden_size"]
            tokens = torch.randn(2, 5, width)
            projected = model.model.expert_projectors[DOMAINS[kind]](tokens)
            torch.testing.assert_close(projected, official_mlp(tokens, sd, f"expert_encoder.mlp.{k}."))
        cls = torch.randn(3, VIT)
        torch.testing.assert_close(model.model.router(cls), cls @ sd["expert_router.weight"].T)  # bias-free Linear


def test_kosmos_expert_is_pix2struct_like_with_scaled_attention():
    sd, config = official_checkpoint("qwen2", ("kosmos", "pix2struct"), select_layers={"pix2struct": -2})
    model, _ = _converted_model(sd, config, token_ids(2))
    cfg = config["expert_encoder_config"]["config_list"][0]["config"]
    patches = torch.randn(2, 16, 2 + PATCH * PATCH * 3)
    patches[:, :, :2] = torch.randint(0, 4, (2, 16, 2)).float()
    patches[1, -4:] = 0  # padding rows
    with torch.no_grad():
        tokens = model.model.expert_encoders["document"](patches)
        expected = official_kosmos_vision(patches, sd, cfg, "expert_encoder.encoder.0.")
        torch.testing.assert_close(tokens[0], expected[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tokens[1, :-4], expected[1, :-4], rtol=1e-4, atol=1e-5)
        # select_layer -2 reads hidden_states[-2] (model/expert_encoder/modeling_expert_encoder.py:166-171).
        assert model.config.experts[1].feature_layer == -2
        encoder = model.model.expert_encoders["table"].encoder
        direct = encoder(flattened_patches=patches, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(model.model.expert_encoders["table"](patches), direct)
        # A Kosmos-2.5 expert read at an inner layer takes its encoder's hidden states.
        model.model.expert_encoders["document"].config.feature_layer = 1
        kosmos = model.model.expert_encoders["document"].encoder
        inner = model.model.expert_encoders["document"](patches)
        hidden = kosmos.encoder(kosmos.embeddings(patches), attention_mask=(patches.sum(-1) != 0).long(),
                                output_hidden_states=True).hidden_states
        assert inner.shape == tokens.shape and torch.equal(inner, hidden[1])


def _write_official_folder(folder, llm="internlm2", experts=("pix2struct", "clip"), shards=2):
    """An official checkpoint folder: config.json, sharded safetensors + index, a tokenizer with the Chimera tokens,
    and the official ChimeraProcessor's `processor_config.json` (`expert_processor_list`)."""
    from transformers import PreTrainedTokenizerFast

    base = build_tokenizer("internvl")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="<|im_end|>",
                                        pad_token="<pad>")  # no InternVL named tokens, as an official tokenizer
    tokenizer.add_tokens(DOMAIN_TOKENS + [f"<DOMAIN_{k}_CONTEXT>" for k in range(len(experts))], special_tokens=True)
    sd, config = official_checkpoint(llm, experts, vocab=len(tokenizer) + 4)
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[s::shards]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    processors = []
    for kind in experts:
        family = {"pix2struct": "pix2struct_vision_model", "clip": "clip_vision_model"}[kind]
        processor = build_expert_image_processor(family)
        meta = processor.to_dict()
        meta["image_processor_type"] = type(processor).__name__
        processors.append(meta)
    (folder / "processor_config.json").write_text(
        json.dumps({"processor_class": "ChimeraProcessor", "expert_processor_list": processors}))
    return sd, config, tokenizer


def test_convert_checkpoint_loads_strictly_and_generates(tmp_path):
    from transformers import AutoModelForImageTextToText

    from modeling_chimera import ChimeraForConditionalGeneration
    from processing_chimera import ChimeraProcessor

    official, output = tmp_path / "official", tmp_path / "converted"
    sd, config, tokenizer = _write_official_folder(official)
    assert load_official_state_dict(official).keys() == sd.keys()
    ids = tokenizer.convert_tokens_to_ids(["<IMG_CONTEXT>", "</img>", "<domain>", "</domain>",
                                           "<DOMAIN_0_CONTEXT>", "<DOMAIN_1_CONTEXT>"])
    assert [read_added_tokens(official)[t] for t in ("<domain>", "<DOMAIN_1_CONTEXT>")] == [ids[2], ids[5]]
    out_dir, wrote_processor = main(make_parser().parse_args(
        ["--input_dir", str(official), "--output_dir", str(output), "--dtype", "float32"]))
    assert wrote_processor and out_dir == output

    model = ChimeraForConditionalGeneration.from_pretrained(output).eval()  # strict: raises on missing / unexpected
    assert model.config.expert_token_ids == ids[4:]
    assert (model.config.expert_start_token_id, model.config.expert_end_token_id) == (ids[2], ids[3])
    assert model.config.expert_insert_after_token_id == ids[1]
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert set(ids[4:]) <= set(model.generation_config.suppress_tokens)
    auto = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True).eval()
    assert type(auto).__module__.startswith("transformers_modules.")

    processor = ChimeraProcessor.from_pretrained(output)
    assert processor.domains == ["table", "math"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert processor.chat_template == chat_template_for("internlm2-chat")
    assert prompt.startswith("<|im_start|>system\n你是由上海人工智能实验室") and prompt.endswith(
        "<|im_end|><|im_start|>user\n<IMG_CONTEXT>\nWhat is shown?<|im_end|><|im_start|>assistant\n")
    images = random_images(2, sizes=((16, 16), (16, 24)))
    inputs = processor(images=[[images[0]], [images[1]]], text=[prompt, prompt], padding=True, return_tensors="pt")

    with torch.no_grad():
        for label in (1, 2):
            expanded = model.model(**inputs, expert_labels=torch.tensor([label, 0])).expanded_input_ids[0].tolist()
            end = expanded.index(ids[1])  # </img>, then <domain> <DOMAIN_{label-1}_CONTEXT> x n </domain>
            count = 16  # Pix2Struct max_patches / CLIP 16 patches (CLS dropped)
            assert expanded[end + 1 : end + 3 + count] == [ids[2]] + [ids[3 + label]] * count + [ids[3]]
        logits = model(**inputs, expert_labels=torch.tensor([1, 2])).logits
        torch.testing.assert_close(auto(**inputs, expert_labels=torch.tensor([1, 2])).logits, logits)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(out.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert not torch.isin(out.sequences[:, inputs["input_ids"].shape[1]:], torch.tensor(ids[4:])).any()
    assert out.expert_index.shape == (2,)


def test_token_ids_come_from_the_tokenizer_files_or_the_flags(tmp_path):
    tokens = {"<IMG_CONTEXT>": 5, "</img>": 4, "<domain>": 7, "</domain>": 8, "<DOMAIN_0_CONTEXT>": 9}
    assert resolve_token_ids(tokens, 1) == ChimeraTokenIds(5, 4, 7, 8, [9])
    assert resolve_token_ids(tokens, 1, {"experts": [3], "image_end": 2}) == ChimeraTokenIds(5, 2, 7, 8, [3])
    with pytest.raises(ValueError, match=r"<DOMAIN_1_CONTEXT>.*--expert_token_ids"):
        resolve_token_ids(tokens, 2)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<domain>": 70}))
    assert read_added_tokens(tmp_path) == {"<domain>": 70}


def test_only_safetensors_checkpoints_are_read(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin.*never unpickles"):
        load_official_state_dict(tmp_path)


@pytest.mark.slow
def test_real_official_checkpoint_converts(tmp_path):
    """Needs a downloaded official checkpoint (e.g. `huggingface-cli download U4R/Chimera-Reasoner-2B`), pointed to by
    CHIMERA_OFFICIAL_DIR."""
    from modeling_chimera import ChimeraForConditionalGeneration

    folder = os.environ.get("CHIMERA_OFFICIAL_DIR")
    if not folder:
        pytest.skip("set CHIMERA_OFFICIAL_DIR to an official Chimera checkpoint folder")
    main(make_parser().parse_args(["--input_dir", folder, "--output_dir", str(tmp_path / "out"),
                                   "--trust_remote_code"]))
    model = ChimeraForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert len(model.config.experts) == len(json.loads(open(os.path.join(folder, "config.json")).read())[
        "expert_encoder_config"]["config_list"])


def test_llm_configs_keep_the_official_rope_scaling():
    from train.convert_official_chimera import _text_config

    _, internlm2 = official_llm("internlm2", 64)
    config, family = _text_config(dict(internlm2, rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0}))
    assert (family, config.model_type, config.attention_bias) == ("internlm2", "llama", False)
    assert config.rope_parameters == {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}
    _, phi3 = official_llm("phi3", 64)
    config, _ = _text_config(phi3)  # "su" (model/phi3/modeling_phi3.py:137-177) is transformers' longrope
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.rope_parameters["factor"] == 512 / 64
    assert config.rope_parameters["original_max_position_embeddings"] == 64
    with pytest.raises(ValueError, match="Unsupported official LLM"):
        _text_config(dict(internlm2, architectures=["MistralForCausalLM"]))
