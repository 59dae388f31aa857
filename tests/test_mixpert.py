"""Mixpert: upcycling equivalence, routing rules, grouped dispatch, sub-image routing, I/O and bad inputs."""

import pytest
import torch

from chimera_mixpert.tiny import (
    FAMILIES,
    build_tiny_mixpert,
    build_generalist,
    build_generalist_config,
    build_processor,
    build_tokenizer,
    chat_prompt,
    random_images,
)
from configuration_mixpert import MixpertConfig
from modeling_mixpert import MixpertForConditionalGeneration, route
from tests.utils import run_without_project

DOMAINS = ["chart", "document", "math"]


def build(family, seed=0, perturb=False, **kwargs):
    """A tiny 3-layer base, its untouched twin, the Mixpert upcycled from it, and the processor."""
    tokenizer = build_tokenizer(family)
    base = build_generalist(family, tokenizer, seed=seed, num_vision_layers=3)
    twin = build_generalist(family, tokenizer, seed=seed, num_vision_layers=3)
    model = MixpertForConditionalGeneration.from_base(base, domains=DOMAINS, num_expert_layers=2, **kwargs)
    if perturb:  # make every expert different (as after expert tuning)
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.model.vision_experts.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model, twin, build_processor(family, tokenizer)


def batch(processor, seed=0):
    images = random_images(3, seed=seed, sizes=((16, 16), (24, 16), (16, 32)))
    text = [chat_prompt(processor, 1, "a"), chat_prompt(processor, 2, "b")]
    return processor(images=[[images[0]], images[1:]], text=text, return_tensors="pt", padding=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_upcycled_model_equals_base_for_every_expert(family):
    model, twin, processor = build(family)
    inputs = batch(processor)
    with torch.no_grad():
        reference = twin(**inputs).logits
        for expert in range(len(DOMAINS) + 1):
            logits = model(**inputs, expert_labels=torch.full((3,), expert)).logits
            assert (logits - reference).abs().max() < 1e-5, expert
        routed = model(**inputs)
        assert (routed.logits - reference).abs().max() < 1e-5
    assert routed.router_logits.shape == (3, len(DOMAINS))


@pytest.mark.parametrize(
    "probs,strategy,threshold,expected",
    [
        ([[0.5, 0.3, 0.2]], "direct", 0.9, [1]),
        ([[0.1, 0.2, 0.7]], "direct", 0.0, [3]),
        ([[0.5, 0.3, 0.2]], "score_threshold", 0.5, [1]),  # equal to λ: keeps the expert
        ([[0.5, 0.3, 0.2]], "score_threshold", 0.51, [0]),  # below λ: versatile
        ([[0.75, 0.0, 0.25]], "score_difference", 0.5, [1]),  # top1 - top2 == τ (exact in binary): keeps it
        ([[0.75, 0.0, 0.25]], "score_difference", 0.51, [0]),  # below τ: versatile
        ([[0.45, 0.45, 0.1], [0.25, 0.75, 0.0]], "score_difference", 0.6, [0, 0]),
        ([[0.45, 0.45, 0.1], [0.05, 0.9, 0.05]], "score_difference", 0.6, [0, 2]),
        ([[0.45, 0.45, 0.1], [0.05, 0.9, 0.05]], "score_threshold", 0.6, [0, 2]),
        ([[0.45, 0.45, 0.1], [0.05, 0.9, 0.05]], "direct", 0.6, [1, 2]),
    ],
)
def test_routing_rules(probs, strategy, threshold, expected):
    assert route(torch.tensor(probs), strategy, threshold).tolist() == expected


def _fixed_router(model, logits):
    """Make the router return `logits` (one row per routed unit), whatever the images."""
    logits = torch.tensor(logits, dtype=torch.float)
    model.model.vision_router.forward = lambda pooled: logits[: pooled.shape[0]].to(pooled.dtype)


@pytest.mark.parametrize("strategy,expected", [("direct", [1, 1, 3]), ("score_threshold", [0, 1, 3]),
                                               ("score_difference", [0, 0, 3])])
def test_strategies_choose_the_expert_that_runs(strategy, expected):
    model, _, processor = build("internvl", perturb=True, routing_strategy=strategy, routing_threshold=0.6)
    inputs = batch(processor)
    # softmax rows: [.42 .39 .19] (unsure), [.71 .26 .03] (top .71, gap .45), [.02 .02 .96]
    _fixed_router(model, [[1.0, 0.93, 0.2], [2.0, 1.0, -1.0], [0.0, 0.0, 4.0]])
    with torch.no_grad():
        out = model(**inputs)
        assert out.expert_index.tolist() == expected
        forced = model(**inputs, expert_labels=torch.tensor(expected))
    assert torch.equal(out.logits, forced.logits)  # the routed experts are the ones that ran


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_dispatch_equals_one_image_at_a_time(family):
    model, _, processor = build(family, perturb=True)
    images = random_images(6, seed=4, sizes=((16, 16), (24, 16), (16, 32)))
    prompts = [chat_prompt(processor, 1, f"q{i}") for i in range(6)]
    labels = torch.tensor([1, 0, 2, 3, 1, 0])
    inputs = processor(images=[[im] for im in images], text=prompts, return_tensors="pt", padding=True)
    image_keys = [k for k in ("image_sizes", "batch_num_images", "image_grid_thw") if k in inputs]
    with torch.no_grad():
        grouped = model.get_image_features(inputs.pixel_values, input_ids=inputs.input_ids, expert_labels=labels,
                                           **{k: inputs[k] for k in image_keys})
        for i in range(6):
            single = processor(images=[images[i]], text=[prompts[i]], return_tensors="pt")
            alone = model.get_image_features(single.pixel_values, input_ids=single.input_ids,
                                             expert_labels=labels[i : i + 1], **{k: single[k] for k in image_keys})
            assert torch.allclose(grouped.image_features[i], alone.image_features[0], atol=1e-5), i
    assert grouped.expert_index.tolist() == labels.tolist()


def test_each_used_expert_runs_once_per_batch(monkeypatch):
    model, _, processor = build("llava_onevision", perturb=True)
    inputs = batch(processor)
    calls = []
    family = model.model.family
    original = family.run_layers
    monkeypatch.setattr(family, "run_layers",
                        lambda layers, acts, keep: (calls.append(acts.num_units), original(layers, acts, keep))[1])
    with torch.no_grad():
        model(**inputs, expert_labels=torch.tensor([2, 2, 0]))
    # one shared pass over all tiles, then (in expert order) the versatile expert on image 2's tiles, expert 2 on the
    # tiles of images 0 and 1
    tiles = model.model.family.image_batch(inputs.pixel_values, image_sizes=inputs.image_sizes,
                                           batch_num_images=inputs.batch_num_images)
    assert calls == [sum(tiles.units_per_image), tiles.units_per_image[2], sum(tiles.units_per_image[:2])]


@pytest.mark.parametrize("family", ["llava_onevision", "internvl"])
def test_sub_image_routing_routes_each_tile(family):
    image_routed, _, processor = build(family, perturb=True)
    tile_routed, _, _ = build(family, perturb=True, routing_granularity="sub_image", routing_strategy="direct")
    tile_routed.load_state_dict(image_routed.state_dict())
    if family == "llava_onevision":
        for m in (image_routed, tile_routed):
            m.model.backbone.config.image_grid_pinpoints = [[16, 16], [32, 16], [16, 32], [32, 32]]
        processor.image_processor.image_grid_pinpoints = [[16, 16], [32, 16], [16, 32], [32, 32]]
        kwargs = {}
    else:
        kwargs = {"crop_to_patches": True, "max_patches": 4}
    image = random_images(1, seed=9, sizes=((16, 48),))[0]
    inputs = processor(images=[image], text=[chat_prompt(processor)], return_tensors="pt", **kwargs)
    image_keys = {k: inputs[k] for k in ("image_sizes", "batch_num_images") if k in inputs}
    with torch.no_grad():
        images = tile_routed.model.family.image_batch(inputs.pixel_values, input_ids=inputs.input_ids, **image_keys)
        tiles = images.units_per_image[0]
        assert tiles >= 3
        tile_experts = [(t % 3) + 1 for t in range(tiles)]
        _fixed_router(tile_routed, [[5.0 if j == e - 1 else 0.0 for j in range(3)] for e in tile_experts])
        out = tile_routed.get_image_features(inputs.pixel_values, input_ids=inputs.input_ids, **image_keys)
        assert out.expert_index.tolist() == tile_experts and out.routed_image.tolist() == [0] * tiles
        # Expected: every tile through its own expert, then the family's usual assembly.
        family_ = image_routed.model.family
        acts = family_.embed(images)
        taps, _ = family_.feature_taps
        shared = family_.used_depth - 2
        acts = family_.run_layers(family_.vision_layers()[:shared], acts, keep=set(taps) | {shared})
        unit_features = []
        for t, e in enumerate(tile_experts):
            layers, norm, projector = image_routed.model.expert_modules(e)
            one = family_.run_layers(layers, family_.select_units(acts, torch.tensor([t])), keep=taps)
            unit_features += family_.project(one, norm, projector)
        expected = family_.assemble(unit_features, images)[0]
        assert torch.allclose(out.image_features[0], expected, atol=1e-5)
        # Image-level routing with the same experts per tile would differ: the tiles really are routed one by one.
        whole = image_routed.get_image_features(inputs.pixel_values, input_ids=inputs.input_ids,
                                                expert_labels=torch.tensor([1]), **image_keys)
        assert not torch.allclose(whole.image_features[0], expected, atol=1e-4)
        # Labels apply to every tile of their image.
        labelled = tile_routed.get_image_features(inputs.pixel_values, input_ids=inputs.input_ids,
                                                  expert_labels=torch.tensor([2]), **image_keys)
        assert labelled.expert_index.tolist() == [2] * tiles


def test_router_loss_only_on_domain_labels_and_backward():
    model, _, processor = build("qwen2_vl", perturb=True)
    inputs = batch(processor)
    model.train()
    out = model(**inputs, expert_labels=torch.tensor([2, 0, 3]), labels=inputs.input_ids)
    expected = torch.nn.functional.cross_entropy(out.router_logits[[0, 2]], torch.tensor([1, 2]))
    assert torch.allclose(out.router_loss, expected)
    assert torch.allclose(out.loss, out.lm_loss + out.router_loss)
    out.loss.backward()
    assert model.model.vision_router.fc1.weight.grad.abs().sum() > 0
    assert model.model.vision_experts["document"].layers[0].attn.qkv.weight.grad.abs().sum() > 0  # expert 2 ran
    assert model.model.vision_experts["chart"].layers[0].attn.qkv.weight.grad is None  # expert 1 did not
    only_versatile = model(**inputs, expert_labels=torch.tensor([0, 0, 0]), labels=inputs.input_ids)
    assert only_versatile.router_loss is None


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_and_beam_search(family):
    model, twin, processor = build(family)
    inputs = batch(processor, seed=2)
    with torch.no_grad():
        ours = model.generate(**inputs, max_new_tokens=4, do_sample=False, expert_labels=torch.tensor([1, 2, 3]))
        theirs = twin.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(ours, theirs)  # upcycled: any expert gives the base model's tokens
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False,
                               return_dict_in_generate=True)
    assert beams.sequences.shape[0] == 4 and beams.expert_index.shape == (3,)


def test_parameter_accounting_adds_up():
    model, twin, _ = build("internvl")
    counts = model.parameter_counts()
    base_total = sum(p.numel() for p in twin.parameters())
    assert counts["base"] == base_total
    assert counts["total"] == counts["base"] + counts["added_by_experts"] + counts["router"]
    layers, norm, projector = model.model.expert_modules(0)
    per_expert = sum(p.numel() for m in (layers, norm, projector) if m is not None for p in m.parameters())
    assert counts["added_by_experts"] == len(DOMAINS) * per_expert
    assert counts["activated"] - counts["base"] == counts["router"] == counts["added_activated"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_expert_layers": 4}, r"`num_expert_layers` must be an integer between 0 and 3"),
        ({"num_expert_layers": -1}, r"`num_expert_layers` must be an integer between 0 and 3"),
        ({"domains": ["chart", "chart"]}, r"Duplicate domain names \['chart'\]"),
        ({"domains": ["versatile"]}, "fallback expert"),
        ({"routing_threshold": 1.5}, r"routing_threshold` must be in \[0, 1\]"),
        ({"routing_threshold": -0.1}, r"routing_threshold` must be in \[0, 1\]"),
        ({"routing_strategy": "top2"}, "routing_strategy"),
        ({"routing_granularity": "tile"}, "routing_granularity"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    base = build_generalist_config("internvl", build_tokenizer("internvl"), num_vision_layers=3)
    with pytest.raises(ValueError, match=message):
        MixpertConfig(base_config=base, **kwargs)


def test_config_rejects_unknown_family_and_sub_image_on_qwen():
    with pytest.raises(ValueError, match="Unsupported backbone model_type 'llava'"):
        MixpertConfig(base_config={"model_type": "llava"})
    qwen = build_generalist_config("qwen2_vl", build_tokenizer("qwen2_vl"), num_vision_layers=3)
    with pytest.raises(ValueError, match="no tiles"):
        MixpertConfig(base_config=qwen, routing_granularity="sub_image")


def test_bad_labels_raise():
    model, _, processor = build("llava_onevision")
    inputs = batch(processor)
    with pytest.raises(ValueError, match=r"one label per image \(3 images"):
        model(**inputs, expert_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"out of range: \[4\]"):
        model(**inputs, expert_labels=torch.tensor([1, 4, 0]))
    ids = inputs.input_ids.clone()
    ids[0, (ids[0] == model.model.image_token_id).nonzero()[0]] = 0
    with pytest.raises(ValueError, match="prompt holds .* image tokens but the images encode to"):
        model(**dict(inputs, input_ids=ids))


def test_saved_mixpert_loads_in_a_clean_process_with_identical_logits(tmp_path):
    for family in FAMILIES:
        model, _, processor = build(family, perturb=True, routing_strategy="direct")
        model.save_pretrained(tmp_path / family)
        processor.save_pretrained(tmp_path / family)
        inputs = batch(processor)
        with torch.no_grad():
            out = model(**inputs)
        torch.save({"inputs": dict(inputs), "logits": out.logits, "experts": out.expert_index},
                   tmp_path / family / "ref.pt")
    stdout = run_without_project(
        f"""
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
        for family in {list(FAMILIES)!r}:
            folder = {str(tmp_path)!r} + "/" + family
            assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "MixpertConfig"
            ref = torch.load(folder + "/ref.pt", weights_only=False)
            for auto in (AutoModel, AutoModelForImageTextToText):
                model = auto.from_pretrained(folder, trust_remote_code=True)
                assert type(model).__module__.startswith("transformers_modules.")
                with torch.no_grad():
                    out = model(**ref["inputs"])
                assert torch.equal(out.logits, ref["logits"]) and torch.equal(out.expert_index, ref["experts"])
            print(family, "ok")
        """,
        cwd=tmp_path,
    )
    assert stdout.split() == [w for f in FAMILIES for w in (f, "ok")]


@pytest.mark.parametrize("max_patches", [1, 4])
def test_tiny_internvl_processor_caps_tiles_of_a_large_image(max_patches):
    from PIL import Image

    from chimera_mixpert.tiny import build_processor

    processor = build_processor("internvl", image_size=16, patch_size=4, max_patches=max_patches)
    out = processor(images=[Image.new("RGB", (64, 32), "red")], text=[processor.image_token + " hi"],
                    return_tensors="pt")
    # InternVL tiles a large image into up to `max_patches` crops, plus a thumbnail when there is more than one
    expected = 1 if max_patches == 1 else min(max_patches, 2) + 1
    assert out["pixel_values"].shape == (expected, 3, 16, 16)


def test_routing_strategy_can_be_chosen_per_call_in_forward_and_generate():
    """`forward` / `generate(routing_strategy=..., routing_threshold=...)` route by that rule instead of the config's;
    bad values are refused with the allowed ones named."""
    model, processor = build_tiny_mixpert("qwen2_vl", domains=("chart", "table"), routing_strategy="score_threshold",
                                          routing_threshold=1.0)  # the config sends every image to the versatile
    model.eval()
    inputs = processor(images=random_images(2), text=[chat_prompt(processor)] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**inputs).expert_index.tolist() == [0, 0]
        direct = model(**inputs, routing_strategy="direct")
        assert direct.expert_index.tolist() == (direct.router_logits.argmax(-1) + 1).tolist()
        assert model(**inputs, routing_threshold=0.0).expert_index.tolist() == direct.expert_index.tolist()
    out = model.generate(**inputs, routing_strategy="direct", max_new_tokens=2, return_dict_in_generate=True)
    assert out.expert_index.tolist() == direct.expert_index.tolist()
    with pytest.raises(ValueError, match=r"`routing_strategy` must be one of \('direct'"):
        model(**inputs, routing_strategy="argmax")
    with pytest.raises(ValueError, match=r"`routing_threshold` must be in \[0, 1\]"):
        model(**inputs, routing_threshold=1.5)
