"""Mixpert ablations: the expert-layer scan K = 0 ... D (Mixpert Table 2) and FLOPs per image (Mixpert Table 6).

K = 0: the whole tower is shared, each expert owns only its projector (+ the tower's final norm where the family applies
one: InternVL with `vision_feature_layer=-1`). K = D: every used tower layer is in the experts, only the patch embedding
is shared and the router pools its output.
"""

import re

import pytest
import torch

from chimera_mixpert.tiny import (
    FAMILIES,
    build_generalist,
    build_generalist_config,
    build_processor,
    build_tokenizer,
    chat_prompt,
    random_images,
)
from chimera_mixpert.model_card import render_model_card
from configuration_mixpert import MixpertConfig
from modeling_mixpert import MixpertForConditionalGeneration
from tests.test_mixpert import DOMAINS, batch

DEPTH = 3  # the tiny bases below have 3 vision layers, all used (vision_feature_layer = -1)


def build_k(family, num_expert_layers, seed=0, perturb=False, meta=False, **kwargs):
    """A tiny 3-layer base upcycled with `K = num_expert_layers`, the base's untouched twin, and the processor (as
    `tests.test_mixpert.build`, with K chosen)."""
    tokenizer = build_tokenizer(family)
    if meta:
        with torch.device("meta"):
            base = build_generalist(family, tokenizer, seed=seed, num_vision_layers=DEPTH)
        twin = None
    else:
        base = build_generalist(family, tokenizer, seed=seed, num_vision_layers=DEPTH)
        twin = build_generalist(family, tokenizer, seed=seed, num_vision_layers=DEPTH)
    model = MixpertForConditionalGeneration.from_base(base, domains=DOMAINS, num_expert_layers=num_expert_layers,
                                                      **kwargs)
    if perturb:  # every expert different (as after expert tuning)
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.model.vision_experts.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model, twin, build_processor(family, tokenizer)


def image_inputs(inputs):
    return {k: inputs[k] for k in ("image_sizes", "batch_num_images", "image_grid_thw") if k in inputs}


# ------------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("family", FAMILIES)
def test_config_accepts_every_k_from_0_to_the_used_depth(family):
    base = build_generalist_config(family, build_tokenizer(family), num_vision_layers=DEPTH)
    for k in range(DEPTH + 1):
        assert MixpertConfig(base_config=base, num_expert_layers=k).num_expert_layers == k


@pytest.mark.parametrize("value", [-1, DEPTH + 1, 1.0, True, "2"])
def test_config_rejects_k_outside_0_to_depth(value):
    base = build_generalist_config("internvl", build_tokenizer("internvl"), num_vision_layers=DEPTH)
    message = (rf"`num_expert_layers` must be an integer between 0 and {DEPTH} .*used depth is {DEPTH}\)\. "
               rf"Got {value!r}")
    with pytest.raises(ValueError, match=message):
        MixpertConfig(base_config=base, num_expert_layers=value)


def test_config_rejects_k_0_without_expert_projectors():
    base = build_generalist_config("llava_onevision", build_tokenizer("llava_onevision"), num_vision_layers=DEPTH)
    with pytest.raises(ValueError, match=r"`num_expert_layers=0` with `expert_projector=False` gives the experts no "
                                         r"layer and no projector.*Set `expert_projector=True`"):
        MixpertConfig(base_config=base, num_expert_layers=0, expert_projector=False)


# ------------------------------------------------------------------------------------------- both ends of the scan


@pytest.mark.parametrize("k", [0, DEPTH])
@pytest.mark.parametrize("family", FAMILIES)
def test_upcycled_model_equals_base_at_k_0_and_k_depth(family, k):
    model, twin, processor = build_k(family, k)
    expert = model.model.vision_experts[DOMAINS[0]]
    assert model.model.shared_depth == DEPTH - k and len(expert.layers) == k
    # InternVL's tiny tower applies its final norm to the features the projector reads: the norm goes with the expert.
    assert (expert.norm is not None) == (family == "internvl") and expert.projector is not None
    inputs = batch(processor)
    with torch.no_grad():
        reference = twin(**inputs).logits
        for index in range(len(DOMAINS) + 1):
            assert torch.equal(model(**inputs, expert_labels=torch.full((3,), index)).logits, reference), index
        routed = model(**inputs)
    assert torch.equal(routed.logits, reference) and routed.router_logits.shape == (3, len(DOMAINS))


@pytest.mark.parametrize("k", [0, DEPTH])
@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_dispatch_equals_one_image_at_a_time_at_k_0_and_k_depth(family, k):
    model, _, processor = build_k(family, k, perturb=True)
    images = random_images(5, seed=4, sizes=((16, 16), (24, 16), (16, 32)))
    prompts = [chat_prompt(processor, 1, f"q{i}") for i in range(5)]
    labels = torch.tensor([1, 0, 2, 3, 1])
    inputs = processor(images=[[im] for im in images], text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        grouped = model.get_image_features(inputs.pixel_values, input_ids=inputs.input_ids, expert_labels=labels,
                                           **image_inputs(inputs))
        versatile = model.get_image_features(inputs.pixel_values, input_ids=inputs.input_ids,
                                             expert_labels=torch.zeros(5, dtype=torch.long), **image_inputs(inputs))
        for i in range(5):
            single = processor(images=[images[i]], text=[prompts[i]], return_tensors="pt")
            alone = model.get_image_features(single.pixel_values, input_ids=single.input_ids,
                                             expert_labels=labels[i : i + 1], **image_inputs(single))
            assert torch.allclose(grouped.image_features[i], alone.image_features[0], atol=1e-5), i
    assert grouped.expert_index.tolist() == labels.tolist()
    # the perturbed experts really ran: images sent to a domain expert differ from the versatile expert's tokens
    assert not torch.allclose(grouped.image_features[0], versatile.image_features[0], atol=1e-4)
    assert torch.allclose(grouped.image_features[1], versatile.image_features[1], atol=1e-6)


@pytest.mark.parametrize("family", ["llava_onevision", "internvl"])
def test_training_step_at_k_0_changes_only_the_used_projector_copies(family):
    model, _, processor = build_k(family, 0)
    inputs = batch(processor)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    assert not any(".layers." in name for name in before if name.startswith("model.vision_experts."))
    model.train()
    optimizer = torch.optim.SGD(model.model.vision_experts.parameters(), lr=0.5)
    out = model(**inputs, expert_labels=torch.tensor([1, 2, 1]), labels=inputs.input_ids)
    out.lm_loss.backward()
    optimizer.step()
    changed = {name for name, t in model.state_dict().items() if not torch.equal(t, before[name])}
    # only the chart and document experts ran (math did not), and each owns only its projector (+ InternVL's norm)
    owned = ("projector.",) + (("norm.",) if family == "internvl" else ())
    assert changed and all(
        name.startswith(("model.vision_experts.chart.", "model.vision_experts.document."))
        and name.split(".", 3)[3].startswith(owned) for name in changed
    ), sorted(changed)
    for domain in ("chart", "document"):
        assert any(name.startswith(f"model.vision_experts.{domain}.projector.") for name in changed), domain


def _pooled_embedding(model, family, processor, inputs):
    """What the router should read at K = D, computed from the native modules: per image, the mean of the patch
    embedding's output over all its tokens (over every tile of a tiled image)."""
    adapter = model.model.family
    images = adapter.image_batch(inputs.pixel_values, input_ids=inputs.input_ids, **image_inputs(inputs))
    native = model.model.backbone
    if family == "qwen2_vl":
        patches = native.visual.patch_embed(inputs.pixel_values)
        per_unit = torch.stack([p.mean(0) for p in patches.split(inputs.image_grid_thw.prod(-1).tolist())])
    else:
        per_unit = native.vision_tower.embeddings(images.pixel_values).mean(1)
    return torch.stack([u.mean(0) for u in per_unit.split(images.units_per_image)])


@pytest.mark.parametrize("family", FAMILIES)
def test_k_depth_routes_on_the_pooled_patch_embedding(family):
    model, _, processor = build_k(family, DEPTH)
    inputs = batch(processor)
    with torch.no_grad():
        expected = _pooled_embedding(model, family, processor, inputs)
        pooled, rows = model.model.router_inputs(inputs.pixel_values, input_ids=inputs.input_ids,
                                                 **image_inputs(inputs))
        assert rows.tolist() == [0, 1, 2] and torch.allclose(pooled, expected, atol=1e-6)
        out = model(**inputs)
        assert torch.equal(out.router_logits, model.model.vision_router(pooled))
        # no tower layer is shared: changing them all leaves the router's input as it was
        for p in model.model.family.vision_layers().parameters():
            p.add_(1.0)
        again, _ = model.model.router_inputs(inputs.pixel_values, input_ids=inputs.input_ids, **image_inputs(inputs))
    assert torch.equal(again, pooled)


# ------------------------------------------------------------------------------------------------------- FLOPs


def _linear(tokens, n_in, n_out):
    return 2 * tokens * n_in * n_out


def _llm_and_head(text, tokens, vocab):
    """Qwen2 decoder over `tokens` positions + the LM head on the last one."""
    h, i, kv = text.hidden_size, text.intermediate_size, text.num_key_value_heads * (text.hidden_size //
                                                                                   text.num_attention_heads)
    layer = (_linear(tokens, h, h) * 2 + _linear(tokens, h, kv) * 2  # q, o; k, v
             + 2 * (2 * tokens * tokens * h)  # Q K^T and A V over all heads
             + _linear(tokens, h, i) * 2 + _linear(tokens, i, h))  # gate, up; down
    return text.num_hidden_layers * layer + _linear(1, h, vocab)


def _vision_llava_onevision(config, size):
    v = config.vision_config
    t = (size // v.patch_size) ** 2  # SigLIP: no CLS; `full` feature selection keeps every token
    layer = _linear(t, v.hidden_size, v.hidden_size) * 4 + 2 * (2 * t * t * v.hidden_size) \
        + _linear(t, v.hidden_size, v.intermediate_size) + _linear(t, v.intermediate_size, v.hidden_size)
    h = config.text_config.hidden_size
    embed = _linear(t, v.num_channels * v.patch_size**2, v.hidden_size)  # the patch convolution
    return embed + DEPTH * layer + _linear(t, v.hidden_size, h) + _linear(t, h, h), t


def _vision_qwen2_vl(config, size):
    v = config.vision_config
    m = v.spatial_merge_size
    side = size // (v.patch_size * m) * m
    t, d, merged = side * side, v.embed_dim, v.embed_dim * m * m
    layer = _linear(t, d, 3 * d) + _linear(t, d, d) + 2 * (2 * t * t * d) \
        + _linear(t, d, v.mlp_ratio * d) + _linear(t, v.mlp_ratio * d, d)
    embed = _linear(t, v.in_channels * v.temporal_patch_size * v.patch_size**2, d)  # the 3D patch convolution
    tokens = t // (m * m)
    return embed + DEPTH * layer + _linear(tokens, merged, merged) + _linear(tokens, merged, v.hidden_size), tokens


def _vision_internvl(config, size):
    """InternViT (CLS + patches; q, k, v, o projections; MLP), then the pixel shuffle (a reshape: no FLOPs) and the
    LayerNorm-Linear-GELU-Linear projector over the merged patches (CLS dropped: `default` feature selection)."""
    v = config.vision_config
    patches = (size // v.patch_size[0]) ** 2
    t, d = patches + 1, v.hidden_size
    layer = _linear(t, d, d) * 4 + 2 * (2 * t * t * d) + _linear(t, d, v.intermediate_size) \
        + _linear(t, v.intermediate_size, d)
    embed = _linear(patches, v.num_channels * v.patch_size[0] ** 2, d)  # the patch convolution (no CLS)
    ratio = config.downsample_ratio
    tokens, merged, h = int(patches * ratio**2), int(d / ratio**2), config.text_config.hidden_size
    return embed + DEPTH * layer + _linear(tokens, merged, h) + _linear(tokens, h, h), tokens


VISION_COUNTS = {"llava_onevision": _vision_llava_onevision, "qwen2_vl": _vision_qwen2_vl,
                 "internvl": _vision_internvl}


@pytest.mark.parametrize("k", [0, 2, DEPTH])
@pytest.mark.parametrize("family", FAMILIES)
def test_flops_per_image_match_a_hand_count(family, k):
    model, _, _ = build_k(family, k)
    config = model.config.base_config
    vision, tokens = VISION_COUNTS[family](config, 16)
    base = vision + _llm_and_head(config.text_config, tokens, config.text_config.vocab_size)
    router = model.model.vision_router
    router_flops = _linear(1, router.fc1.in_features, router.fc1.out_features) + _linear(
        1, router.fc2.in_features, router.fc2.out_features)
    counts = model.parameter_counts(image_size=16)
    assert counts["base_flops_per_image"] == base
    assert counts["added_flops_per_image"] == router_flops == 2 * (32 * 32 + 32 * len(DOMAINS))
    assert counts["flops_per_image"] == base + router_flops


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_on_a_meta_model_equal_the_real_one_and_leave_the_model_intact(family):
    real, _, processor = build_k(family, 2, perturb=True)
    meta, _, _ = build_k(family, 2, meta=True)
    assert next(meta.parameters()).device.type == "meta"
    inputs = batch(processor)
    with torch.no_grad():
        before = real(**inputs, expert_labels=torch.tensor([1, 2, 0])).logits
    counts, meta_counts = real.parameter_counts(), meta.parameter_counts()
    assert {k: v for k, v in counts.items() if "flops" in k} == {k: v for k, v in meta_counts.items() if "flops" in k}
    router = real.model.vision_router
    assert counts["added_flops_per_image"] == 2 * (router.fc1.in_features + len(DOMAINS)) * router.fc1.out_features
    assert counts["flops_per_image"] > counts["base_flops_per_image"] > 0
    # the count swaps the weights for meta tensors only while it runs
    assert all(p.device.type == "cpu" for p in real.parameters())
    with torch.no_grad():
        assert torch.equal(real(**inputs, expert_labels=torch.tensor([1, 2, 0])).logits, before)


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_flops_at_another_size_match_a_hand_count(family):
    """InternViT interpolates its positions (any multiple of patch / downsample_ratio = 8 here); Qwen2-VL rounds a
    size down to whole merged blocks (8 pixels here): 20 counts as 16."""
    model, _, _ = build_k(family, 2)
    config = model.config.base_config
    vision, tokens = VISION_COUNTS[family](config, 24 if family == "internvl" else 16)
    counts = model.flops_per_image(image_size=24 if family == "internvl" else 20)
    assert counts["base_flops_per_image"] == vision + _llm_and_head(config.text_config, tokens,
                                                                    config.text_config.vocab_size)


@pytest.mark.parametrize(
    "family,sizes,allowed",
    [
        # SigLIP's position table is fixed: the tower's size only (any other fails to broadcast in the embedding)
        ("llava_onevision", [24, 8, 3, 0], r"must be 16 \(the tower's `image_size`: SigLIP's position table is "
                                           r"fixed\)"),
        # pixel shuffle: a whole number of merged patches per side (12 px = 3 patches: a reshape error before)
        ("internvl", [12, 20, 4, 3, -8], r"must be a positive multiple of 8 \(`patch_size / downsample_ratio`"),
        # under one 2x2 merged block of 4-pixel patches (silently rounded up to one block before)
        ("qwen2_vl", [7, 4, 0, -28], r"must be an integer of at least 8 \(one merged block\)"),
    ],
)
def test_flops_reject_an_image_size_the_family_cannot_take(family, sizes, allowed):
    model, _, _ = build_k(family, 2, meta=True)
    for size in [*sizes, 16.0, True, "16"]:
        got = re.escape(repr(size))
        message = rf"`image_size` of the FLOPs count of a Mixpert on {family} {allowed}.*; got {got}\.$"
        with pytest.raises(ValueError, match=message):
            model.flops_per_image(image_size=size)
        with pytest.raises(ValueError, match=message):
            model.parameter_counts(image_size=size)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts_at_the_default_size_and_without_flops(family):
    """The default size is one the family takes, so plain `parameter_counts()` always counts; `flops=False` gives
    the parameters alone and refuses an `image_size` it would ignore."""
    model, _, _ = build_k(family, 2, meta=True)
    counts = model.parameter_counts()
    params = model.parameter_counts(flops=False)
    assert params == {k: v for k, v in counts.items() if "flops" not in k}
    assert set(counts) - set(params) == {"flops_per_image", "base_flops_per_image", "added_flops_per_image"}
    assert params["total"] == sum(p.numel() for p in model.parameters())
    default = {"llava_onevision": 16, "internvl": 16, "qwen2_vl": 448}[family]
    assert counts["flops_per_image"] == model.flops_per_image(image_size=default)["flops_per_image"] > 0
    with pytest.raises(ValueError, match=r"`image_size` only applies to the FLOPs count: drop it or pass `flops=True`"):
        model.parameter_counts(image_size=16, flops=False)


# -------------------------------------------------------------------------------------------------- model card


def _card_architecture(tmp_path, family, **kwargs):
    """The model card's architecture paragraph for a saved Mixpert config (the card reads `config.json` alone)."""
    base = build_generalist_config(family, build_tokenizer(family), num_vision_layers=DEPTH)
    MixpertConfig(base_config=base, domains=DOMAINS, **kwargs).save_pretrained(tmp_path)
    text = str(render_model_card(tmp_path))
    return text[text.index("## Model Details"):]


@pytest.mark.parametrize(
    "family,kwargs,expected",
    [
        ("llava_onevision", {"num_expert_layers": 0},
         "The projector is cloned per domain (Mixpert §3.2); the base model's own form the versatile expert. Every "
         "vision layer is shared by all experts."),
        ("llava_onevision", {"num_expert_layers": 1},
         "The last vision layer and the projector are cloned per domain (Mixpert §3.2);"),
        ("llava_onevision", {"num_expert_layers": 2},
         "The last 2 vision layers and the projector are cloned per domain (Mixpert §3.2); the base model's own"),
        ("internvl", {"num_expert_layers": 0},
         "The vision tower's final LayerNorm and the projector are cloned per domain (Mixpert §3.2);"),
        ("internvl", {"num_expert_layers": 2, "expert_adapter": "lora", "expert_lora_rank": 4},
         "The last 2 vision layers, the vision tower's final LayerNorm and the projector are adapted per domain by "
         "LoRA updates of rank 4 (alpha 8; not in the paper: the versatile weights are shared);"),
        ("qwen2_vl", {"num_expert_layers": 2, "expert_projector": False},
         "The last 2 vision layers are cloned per domain (Mixpert §3.2); the base model's own form the versatile "
         "expert. Every expert shares the base model's projector."),
    ],
)
def test_model_card_names_what_the_experts_own(tmp_path, family, kwargs, expected):
    text = _card_architecture(tmp_path, family, **kwargs)
    assert expected in text
    assert "last 0" not in text
    assert ("LayerNorm" in text) == (family == "internvl")
    assert ("projector are" in text or "projector is" in text) == kwargs.get("expert_projector", True)
