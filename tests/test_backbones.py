"""The `vlm_backbones` adapter contract, per native family: what Chimera and Mixpert rely on, checked against the native
model itself (tiny random models, fp32, exact)."""

import pytest
import torch

from chimera_mixpert.tiny import FAMILIES, build_generalist, build_processor, chat_prompt, random_images
from vlm_backbones import get_backbone_family


def _model_and_inputs(family):
    """A tiny native VLM and a batch of two samples (one and two images) from its own processor."""
    model = build_generalist(family)
    processor = build_processor(family)
    images = random_images(3, seed=1)
    texts = [chat_prompt(processor, 1), chat_prompt(processor, 2)]
    inputs = processor(images=[[images[0]], images[1:]], text=texts, return_tensors="pt", padding=True)
    return model, inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_config_adapter_answers_config_questions_and_refuses_model_work(family):
    model, _ = _model_and_inputs(family)
    bound, from_config = get_backbone_family(model.model), get_backbone_family(model.config)
    assert type(bound) is type(from_config) and bound.model_type == family
    for name in ("image_token_id", "num_vision_layers", "tower_hidden_size", "feature_taps", "used_depth", "has_tiles"):
        assert getattr(bound, name) == getattr(from_config, name), name
    assert bound.backbone is model.model
    with pytest.raises(RuntimeError, match="made from a config: bind it to a model"):
        from_config.projector()
    with pytest.raises(ValueError, match="Unsupported backbone model_type 'llava'.*Supported families"):
        get_backbone_family("llava")


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_is_the_native_get_image_features_and_fills_every_placeholder(family):
    model, inputs = _model_and_inputs(family)
    adapter = get_backbone_family(model.model)
    extra = adapter.image_inputs(inputs)
    assert set(extra) == set(adapter.image_input_names) - {"pixel_values"} & set(inputs)
    images = adapter.image_batch(inputs["pixel_values"], input_ids=inputs["input_ids"], **extra)
    assert images.num_images == 3
    with torch.no_grad():
        features, acts = adapter.encode(images)
        native = model.model.get_image_features(pixel_values=inputs["pixel_values"], **extra,
                                                **({"vision_feature_layer": model.config.vision_feature_layer}
                                                   if family == "llava_onevision" else {}))
    native = native.pooler_output
    if isinstance(native, torch.Tensor):  # InternVL: one `(tiles, tokens, hidden)` tensor for the whole batch
        native = torch.split(native.reshape(-1, native.shape[-1]), [f.shape[0] for f in features])
    assert len(features) == len(native) == 3
    for ours, theirs in zip(features, native):
        assert torch.equal(ours, theirs)
    placeholders = int((inputs["input_ids"] == adapter.image_token_id).sum())
    assert placeholders == sum(f.shape[0] for f in features)
    assert acts.depth == adapter.used_depth and acts.num_units == sum(images.units_per_image)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_run_in_two_parts_as_in_one_and_units_select_back(family):
    model, inputs = _model_and_inputs(family)
    adapter = get_backbone_family(model.model)
    images = adapter.image_batch(inputs["pixel_values"], input_ids=inputs["input_ids"], **adapter.image_inputs(inputs))
    layers, depth = adapter.vision_layers(), adapter.used_depth
    with torch.no_grad():
        start = adapter.embed(images)
        whole = adapter.run_layers(layers[:depth], start, keep={depth})
        first = adapter.run_layers(layers[:1], start, keep={1})
        split = adapter.run_layers(layers[1:depth], first, keep={depth})
        assert torch.equal(whole.hidden, split.hidden) and split.depth == depth and set(split.taps) >= {0, 1, depth}
        units = torch.tensor([acts for acts in range(whole.num_units) if acts % 2 == 1])
        chosen = adapter.select_units(whole, units)
        assert torch.equal(whole.hidden[adapter.unit_rows(whole, units)], chosen.hidden)
        assert torch.equal(chosen.unit_image, whole.unit_image[units])
        # the chosen units alone through the remaining layers give the same result (units never attend across)
        again = adapter.run_layers(layers[1:depth], adapter.select_units(first, units), keep={depth})
        assert torch.allclose(again.hidden, chosen.hidden, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_language_forward_with_the_features_is_the_native_forward(family):
    model, inputs = _model_and_inputs(family)
    adapter = get_backbone_family(model.model)
    extra = adapter.image_inputs(inputs)
    with torch.no_grad():
        images = adapter.image_batch(inputs["pixel_values"], input_ids=inputs["input_ids"], **extra)
        features, _ = adapter.encode(images)
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == adapter.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, torch.cat(features))
        positions = adapter.position_ids(inputs["input_ids"], inputs["attention_mask"], extra,
                                         mm_token_type_ids=inputs.get("mm_token_type_ids"))
        assert (positions is None) == (family != "qwen2_vl")
        ours = adapter.language_forward(embeds, input_ids=inputs["input_ids"], image_inputs=extra,
                                        attention_mask=inputs["attention_mask"], position_ids=positions,
                                        mm_token_type_ids=inputs.get("mm_token_type_ids"))
        theirs = model.model(**inputs)
    assert torch.allclose(ours.last_hidden_state, theirs.last_hidden_state, atol=1e-5)


def test_qwen2_vl_generation_state_is_the_native_models():
    model, inputs = _model_and_inputs("qwen2_vl")
    adapter = get_backbone_family(model.model)
    text_positions = torch.arange(inputs["input_ids"].shape[1]).expand(2, -1)
    kwargs = {"input_ids": inputs["input_ids"], "mm_token_type_ids": inputs["mm_token_type_ids"],
              "image_grid_thw": inputs["image_grid_thw"], "attention_mask": inputs["attention_mask"]}
    positions = adapter.generation_position_ids(text_positions, inputs["input_ids"], kwargs)
    assert positions.shape == (4, 2, inputs["input_ids"].shape[1])
    vision, deltas = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                                image_grid_thw=inputs["image_grid_thw"],
                                                attention_mask=inputs["attention_mask"])
    assert torch.equal(positions[1:], vision) and torch.equal(adapter.rope_deltas, deltas)
    # where the native forward reads it to continue a cache without `position_ids`, and a re-bound adapter finds it
    assert model.model.rope_deltas is adapter.rope_deltas
    assert get_backbone_family(model.model).rope_deltas is adapter.rope_deltas
