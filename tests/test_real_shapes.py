"""The real-shape tier: published widths, image sizes and token counts, random weights, one layer per tower, bf16
(`chimera_mixpert.real_shapes`). Slow: `python -m pytest -m slow tests/test_real_shapes.py`."""

from pathlib import Path

import pytest
import torch

from chimera_mixpert.real_shapes import random_image as image
from chimera_mixpert.tiny import chat_prompt

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parent.parent / "train" / "configs"




def round_trip(model, inputs, tmp_path, **forward_kwargs):
    """Save, load in bf16, same logits; returns the first logits."""
    with torch.no_grad():
        before = model(**inputs, **forward_kwargs).logits
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    router = "vision_router" if hasattr(loaded.model, "vision_router") else "router"
    assert all(p.dtype == torch.float32 for p in getattr(loaded.model, router).parameters())  # kept fp32
    with torch.no_grad():
        after = loaded(**inputs, **forward_kwargs).logits
    assert before.dtype == torch.bfloat16 and torch.isfinite(before.float()).all()
    assert torch.equal(before, after)
    return before


def test_chimera_on_an_internvl2_1b_generalist_with_got_and_pix2struct_experts(tmp_path):
    from chimera_mixpert.real_shapes import build_real_chimera

    model, processor = build_real_chimera("internvl2-1b", experts=("got_ocr2", "pix2struct"))
    inputs = processor(images=[[image(896, 1344)]], text=[chat_prompt(processor)], return_tensors="pt")
    assert inputs["pixel_values"].shape == (7, 3, 448, 448)  # 6 tiles + the thumbnail
    assert [tuple(x.shape) for x in inputs["expert_pixel_values"]] == [(1, 3, 1024, 1024), (1, 2048, 770)]
    with torch.no_grad():
        for label, count in ((1, 256), (2, 2048)):  # GOT-OCR2: 256 tokens; Pix2Struct: 2048 patches
            out = model.model(**inputs, expert_labels=torch.tensor([label]))
            assert int((out.expanded_input_ids == model.config.expert_token_ids[label - 1]).sum()) == count
            assert out.expanded_input_ids.shape[1] == inputs["input_ids"].shape[1] + count + 2  # + <domain> </domain>
        generated = model.generate(**inputs, expert_labels=torch.tensor([2]), max_new_tokens=2, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 2)
    round_trip(model, inputs, tmp_path, expert_labels=torch.tensor([1]))


def test_chimera_on_a_qwen2_vl_2b_generalist_with_a_clip_l_336_expert(tmp_path):
    from chimera_mixpert.real_shapes import build_real_chimera

    model, processor = build_real_chimera("qwen2-vl-2b", experts=("clip-l-336",))
    inputs = processor(images=[[image(448, 448)]], text=[chat_prompt(processor)], return_tensors="pt")
    with torch.no_grad():
        out = model.model(**inputs, expert_labels=torch.tensor([1]))
        assert int((out.expanded_input_ids == model.config.expert_token_ids[0]).sum()) == 576  # CLS dropped
        generated = model.generate(**inputs, expert_labels=torch.tensor([1]), max_new_tokens=2, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 2)
    round_trip(model, inputs, tmp_path, expert_labels=torch.tensor([1]))


def test_mixpert_on_a_llava_onevision_0_5b_base_with_anyres_tiles(tmp_path):
    from chimera_mixpert.real_shapes import build_real_mixpert

    model, processor = build_real_mixpert("llava-ov-0.5b")
    inputs = processor(images=[[image(384, 768)], [image(384, 384, seed=1)]], text=[chat_prompt(processor)] * 2,
                       return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape[-2:] == (384, 384)
    with torch.no_grad():
        routed = model(**inputs, expert_labels=torch.tensor([1, 3]))
        assert routed.expert_index.tolist() == [1, 3]
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 2)
    round_trip(model, inputs, tmp_path, expert_labels=torch.tensor([1, 3]))


def test_the_real_dpo_config_max_length_fits_real_internvl_prompts_and_trls_default_does_not():
    from types import SimpleNamespace

    import yaml
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from chimera_mixpert.real_shapes import build_real_chimera
    from train.dpo import check_lengths

    real = yaml.safe_load((CONFIGS / "real" / "chimera_internvl_8b_dpo.yaml").read_text())
    _, processor = build_real_chimera("internvl2-1b", experts=("got_ocr2",))
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read the table."}]}],
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "a b c"}]}],
             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "d"}]}],
             "images": [image(896, 1344, seed=i)]} for i in range(2)]

    def trainer(max_length):
        collator = DataCollatorForVisionPreference(processor=processor, max_length=max_length)
        return SimpleNamespace(args=SimpleNamespace(max_length=max_length), is_world_process_zero=lambda: True,
                               data_collator=collator)

    longest = check_lengths(trainer(real["max_length"]), {"training": [dict(r) for r in rows]})
    assert 1792 < longest <= real["max_length"]  # 7 tiles x 256 image tokens + text fit in the real config's 4096
    with pytest.raises(ValueError, match=rf"is {longest} tokens long .* --max_length is 1024: TRL would cut it"):
        check_lengths(trainer(1024), {"training": [dict(r) for r in rows]})  # TRL's default would cut image tokens


def test_chimera_on_a_llava_onevision_0_5b_generalist_with_a_clip_l_336_expert(tmp_path):
    from chimera_mixpert.real_shapes import build_real_chimera

    model, processor = build_real_chimera("llava-ov-0.5b", experts=("clip-l-336",))
    inputs = processor(images=[[image(384, 768)]], text=[chat_prompt(processor)], return_tensors="pt")
    assert inputs["pixel_values"].shape[-3:] == (3, 384, 384)  # anyres crops of 384 px + the base image
    with torch.no_grad():
        out = model.model(**inputs, expert_labels=torch.tensor([1]))
        assert int((out.expanded_input_ids == model.config.expert_token_ids[0]).sum()) == 576
        general = model.model(**inputs, expert_labels=torch.tensor([0]))  # "no expert": the generalist's tokens only
        assert general.expanded_input_ids.shape[1] == inputs["input_ids"].shape[1]
        generated = model.generate(**inputs, expert_labels=torch.tensor([1]), max_new_tokens=2, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 2)
    round_trip(model, inputs, tmp_path, expert_labels=torch.tensor([1]))


def test_mixpert_on_a_qwen2_vl_2b_base(tmp_path):
    from chimera_mixpert.real_shapes import build_real_mixpert

    model, processor = build_real_mixpert("qwen2-vl-2b")
    assert len(model.model.vision_experts) == 5
    inputs = processor(images=[[image(448, 672)], [image(448, 448, seed=1)]], text=[chat_prompt(processor)] * 2,
                       return_tensors="pt", padding=True)
    grid = inputs["image_grid_thw"].tolist()
    assert grid == [[1, 32, 48], [1, 32, 32]]  # 14 px patches; 2x2 merge -> 384 and 256 tokens
    with torch.no_grad():
        routed = model(**inputs, expert_labels=torch.tensor([2, 5]))
        assert routed.expert_index.tolist() == [2, 5]
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 2)
    round_trip(model, inputs, tmp_path, expert_labels=torch.tensor([2, 5]))
