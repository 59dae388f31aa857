"""Chimera: config and processor round trips, remote-code loading without the project, and every bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from chimera_mixpert.tiny import (
    FAMILIES,
    build_expert_config,
    build_generalist_config,
    build_tiny_chimera,
    build_tokenizer,
    chat_prompt,
    random_images,
)
from configuration_chimera import ChimeraConfig
from modeling_chimera import ChimeraForConditionalGeneration
from processing_chimera import ChimeraProcessor
from tests.utils import run_without_project


def test_config_round_trip_keeps_nested_configs_as_objects(tmp_path):
    tokenizer = build_tokenizer("internvl")
    config = ChimeraConfig(
        generalist_config=build_generalist_config("internvl", tokenizer),
        experts=[
            {"domain": "table", "vision_config": build_expert_config("pix2struct_vision_model")},
            {"domain": "math", "vision_config": build_expert_config("clip_vision_model").to_dict(),
             "feature_layer": -2},
        ],
        expert_token_ids=[400, 401],
        gscm_ratio=0.25,
        router_feature="cls",
    )
    config.save_pretrained(tmp_path)
    loaded = ChimeraConfig.from_pretrained(tmp_path)
    assert type(loaded.generalist_config).__name__ == "InternVLConfig"
    assert [type(e.vision_config).__name__ for e in loaded.experts] == ["Pix2StructVisionConfig", "CLIPVisionConfig"]
    assert loaded.experts[1].feature_layer == -2 and loaded.experts[1].feature_select_strategy == "default"
    assert loaded.experts[0].feature_select_strategy == "full"
    assert loaded.to_dict() == config.to_dict()
    assert loaded.get_text_config().hidden_size == 32 and loaded.domains == ["table", "math"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"gscm_ratio": 1.0}, "gscm_ratio"),
        ({"gscm_ratio": -0.1}, "gscm_ratio"),
        ({"router_feature": "max"}, "router_feature"),
        ({"expert_token_ids": [400]}, "one distinct id per expert"),
        ({"expert_token_ids": [400, 400]}, "one distinct id per expert"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    tokenizer = build_tokenizer("internvl")
    experts = [{"domain": "a", "vision_config": build_expert_config("clip_vision_model")},
               {"domain": "b", "vision_config": build_expert_config("clip_vision_model")}]
    with pytest.raises(ValueError, match=message):
        ChimeraConfig(generalist_config=build_generalist_config("internvl", tokenizer), experts=experts, **kwargs)


def test_config_rejects_duplicate_domains_and_unsupported_families():
    tokenizer = build_tokenizer("internvl")
    expert = {"domain": "table", "vision_config": build_expert_config("clip_vision_model")}
    with pytest.raises(ValueError, match=r"Duplicate expert domain names \['table'\]"):
        ChimeraConfig(generalist_config=build_generalist_config("internvl", tokenizer), experts=[expert, expert])
    with pytest.raises(ValueError,
                       match="Unsupported backbone model_type 'llava'.*llava_onevision, qwen2_vl, internvl"):
        ChimeraConfig(generalist_config={"model_type": "llava"}, experts=[expert])
    with pytest.raises(ValueError, match="non-empty string"):
        ChimeraConfig(generalist_config=build_generalist_config("internvl", tokenizer),
                      experts=[{"domain": "", "vision_config": build_expert_config("clip_vision_model")}])


def test_from_generalist_rejects_unsupported_generalists():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from chimera_mixpert.tiny import build_expert

    tokenizer = build_tokenizer("llava_onevision")
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=build_expert_config("clip_vision_model"),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)))
    with pytest.raises(ValueError, match="Unsupported backbone model_type 'llava'"):
        ChimeraForConditionalGeneration.from_generalist(llava, {"math": build_expert("clip_vision_model")})
    with pytest.raises(ValueError, match="non-empty dict"):
        ChimeraForConditionalGeneration.from_generalist(llava, {})


def test_processor_converts_rgba_and_grayscale_and_rejects_empty_images():
    _, processor = build_tiny_chimera("llava_onevision")
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), mode="RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L")
    out = processor(images=[[rgba], [gray]], text=[chat_prompt(processor)] * 2, return_tensors="pt", padding=True)
    assert out.pixel_values.shape[2] == 3
    assert [tuple(x.shape) for x in out.expert_pixel_values] == [(2, 16, 2 + 4 * 4 * 3), (2, 3, 16, 16)]
    # Grayscale becomes three equal channels; fully transparent RGBA becomes white.
    gray_rgb = processor.expert_image_processors["math"](images=[gray.convert("RGB")], return_tensors="pt").pixel_values
    assert torch.equal(out.expert_pixel_values[1][1], gray_rgb[0])
    clear = Image.new("RGBA", (16, 16), (10, 20, 30, 0))
    white = processor.expert_image_processors["math"](images=[Image.new("RGB", (16, 16), "white")], return_tensors="pt")
    converted = processor(images=[clear], text=[chat_prompt(processor)], return_tensors="pt")
    assert torch.equal(converted.expert_pixel_values[1][0], white.pixel_values[0])
    gray_array = processor(images=[np.zeros((16, 16), dtype=np.uint8)], text=[chat_prompt(processor)],
                           return_tensors="pt")
    assert gray_array.pixel_values.shape[2] == 3
    with pytest.raises(ValueError, match="empty image"):
        processor(images=[Image.new("RGB", (0, 5))], text=[chat_prompt(processor)], return_tensors="pt")
    with pytest.raises(ValueError, match="empty image array"):
        processor(images=[np.zeros((0, 4, 3), dtype=np.uint8)], text=[chat_prompt(processor)], return_tensors="pt")
    with pytest.raises(ValueError, match=r"Unknown expert domains \['chart'\]"):
        processor(images=[rgba], text=[chat_prompt(processor)], experts=["chart"], return_tensors="pt")
    only = processor(images=[rgba], text=[chat_prompt(processor)], experts=["math"], return_tensors="pt")
    assert only.expert_pixel_values[0] is None and only.expert_pixel_values[1].shape[0] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_round_trip_and_chat_template(family, tmp_path):
    _, processor = build_tiny_chimera(family)
    processor.save_pretrained(tmp_path)
    loaded = ChimeraProcessor.from_pretrained(tmp_path)
    assert loaded.domains == processor.domains and loaded.chat_template == processor.chat_template
    assert json.loads((tmp_path / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_chimera.ChimeraProcessor"
    }
    images = random_images(2, sizes=((16, 16), (24, 16)))
    text = [chat_prompt(processor, 1), chat_prompt(processor, 1, "another")]
    a = processor(images=[[images[0]], [images[1]]], text=text, return_tensors="pt", padding=True)
    b = loaded(images=[[images[0]], [images[1]]], text=text, return_tensors="pt", padding=True)
    assert a.keys() == b.keys()
    for key in a:
        if key == "expert_pixel_values":
            assert all(torch.equal(x, y) for x, y in zip(a[key], b[key]))
        else:
            assert torch.equal(a[key], b[key]), key


def test_bad_inputs_raise_clear_errors():
    model, processor = build_tiny_chimera("internvl")
    images = random_images(2)
    inputs = processor(images=[[images[0]], [images[1]]], text=[chat_prompt(processor)] * 2, return_tensors="pt",
                       padding=True)
    with pytest.raises(ValueError, match=r"one label per image \(2 images"):
        model(**inputs, expert_labels=torch.tensor([1, 0, 2]))
    with pytest.raises(ValueError, match=r"out of range: \[3\]"):
        model(**inputs, expert_labels=torch.tensor([3, 0]))
    with pytest.raises(ValueError, match=r"out of range: \[-1\]"):
        model(**inputs, expert_labels=torch.tensor([-1, 0]))
    no_experts = {k: v for k, v in inputs.items() if k != "expert_pixel_values"}
    with pytest.raises(ValueError, match=r"routed to expert 2 \('math'\) but `expert_pixel_values` has no inputs"):
        model(**no_experts, expert_labels=torch.tensor([2, 0]))
    partial = dict(inputs, expert_pixel_values=[inputs.expert_pixel_values[0], None])
    with pytest.raises(ValueError, match=r"routed to expert 2 \('math'\)"):
        model(**partial, expert_labels=torch.tensor([2, 1]))
    assert model(**partial, expert_labels=torch.tensor([1, 0])).logits.shape[0] == 2  # unused expert may be missing
    truncated = dict(inputs, input_ids=inputs.input_ids[:, :-3], attention_mask=inputs.attention_mask[:, :-3])
    truncated["input_ids"] = truncated["input_ids"].clone()
    image_positions = (truncated["input_ids"] == model.model.generalist_image_token_id).nonzero()
    truncated["input_ids"][tuple(image_positions[-1])] = 0  # one image token lost
    with pytest.raises(ValueError, match="tiles but the prompt's image tokens|prompt holds 7 image tokens"):
        model(**truncated, expert_labels=torch.tensor([0, 0]))
    # `inputs_embeds` with images: placeholders are where the image token's embedding is; none here.
    with pytest.raises(ValueError, match="holds 2 tiles but the prompt's image tokens describe 0"):
        model(inputs_embeds=torch.zeros(2, 5, 32), pixel_values=inputs.pixel_values)
    with pytest.raises(ValueError, match="Pass `input_ids` or `inputs_embeds` together with the images"):
        model(pixel_values=inputs.pixel_values)


def test_image_token_count_mismatch_names_the_fix():
    model, processor = build_tiny_chimera("llava_onevision")
    inputs = processor(images=random_images(1), text=[chat_prompt(processor)], return_tensors="pt")
    ids = inputs.input_ids.clone()
    ids[ids == model.model.generalist_image_token_id] = 0
    ids[0, 0] = model.model.generalist_image_token_id
    with pytest.raises(ValueError, match=r"prompt holds 1 image tokens but the images encode to 36 .*do not truncate"):
        model(**dict(inputs, input_ids=ids), expert_labels=torch.tensor([0]))


def _tiny_checkpoint(tmp_path, family="internvl"):
    model, processor = build_tiny_chimera(family)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return model, processor


def test_checkpoint_with_missing_or_unexpected_weights_raises(tmp_path):
    _tiny_checkpoint(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    ChimeraForConditionalGeneration.from_pretrained(tmp_path)  # intact: loads
    broken = {k: v for k, v in weights.items() if not k.startswith("model.expert_projectors.math.")}
    save_file(broken, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights \['model.expert_projectors.math.layer_norm.bias'"):
        ChimeraForConditionalGeneration.from_pretrained(tmp_path)
    extra = dict(weights, **{"model.router_extra.weight": torch.zeros(2)})
    save_file(extra, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected weights \['model.router_extra.weight'\]"):
        ChimeraForConditionalGeneration.from_pretrained(tmp_path)
    wrong = dict(weights, **{"model.router.weight": torch.zeros(5, weights["model.router.weight"].shape[1])})
    save_file(wrong, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="shapes do not match its ChimeraConfig"):
        ChimeraForConditionalGeneration.from_pretrained(tmp_path)


def test_only_safetensors_are_read(tmp_path):
    model, _ = _tiny_checkpoint(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        ChimeraForConditionalGeneration.from_pretrained(tmp_path)


def test_saved_chimera_loads_in_a_clean_process_with_identical_logits(tmp_path):
    """Save each family's Chimera; load all three through AutoModel / AutoModelForImageTextToText / AutoProcessor
    with trust_remote_code in a process where this project cannot be imported; logits must be identical."""
    for family in FAMILIES:
        folder = tmp_path / family
        model, processor = build_tiny_chimera(family, {"chart": "siglip_vision_model",
                                                       "table": "pix2struct_vision_model"})
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        inputs = processor(images=[random_images(1)[0]], text=[chat_prompt(processor)], return_tensors="pt")
        with torch.no_grad():
            reference = model(**inputs, expert_labels=torch.tensor([2])).logits
        torch.save(reference, folder / "reference.pt")
    out = run_without_project(
        f"""
        import torch
        from PIL import Image
        import numpy as np
        from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
        for family in {list(FAMILIES)!r}:
            folder = {str(tmp_path)!r} + "/" + family
            assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "ChimeraConfig"
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
            prompt = processor.apply_chat_template(
                [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is shown?"}}]}}],
                add_generation_prompt=True)
            inputs = processor(images=[image], text=[prompt], return_tensors="pt")
            reference = torch.load(folder + "/reference.pt")
            for auto in (AutoModel, AutoModelForImageTextToText):
                model = auto.from_pretrained(folder, trust_remote_code=True)
                assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
                with torch.no_grad():
                    logits = model(**inputs, expert_labels=torch.tensor([2])).logits
                assert torch.equal(logits, reference), (family, (logits - reference).abs().max())
            print(family, "ok")
        """,
        cwd=tmp_path,
    )
    assert out.split() == [w for f in FAMILIES for w in (f, "ok")]
