"""The training stages with the shipped real configs (`train/configs/real/`) at real shape: the model swapped for a
`train.real_shapes` one with one layer per tower, 2 optimizer steps each, batch 1, bf16, on the CPU. Too slow for
CI's budget: marker `real`, run with `python -m pytest -m real`; the seconds per step it prints are in the README."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.tiny import chat_prompt

CONFIGS = Path(__file__).resolve().parent.parent / "train" / "configs"


def image(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def run_real(module, config, *overrides):
    script = __import__(f"train.{module}", fromlist=["main", "make_parser"])
    args = ["--config", str(CONFIGS / "real" / config), "--max_steps", "2", "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "1", "--use_cpu", "true", "--report_to", "none",
            "--dataloader_num_workers", "0", "--save_strategy", "no", *map(str, overrides)]
    return script.main(*script.make_parser().parse_args_and_config(args))


def summary(folder):
    import json

    return json.loads((folder / "run_summary.json").read_text())


@pytest.mark.real
def test_every_chimera_stage_with_the_real_configs_at_real_shape(tmp_path):
    from modeling_chimera import ChimeraForConditionalGeneration
    from train.data.export import export_preference_jsonl, export_sft_jsonl
    from train.real_shapes import build_real_chimera

    model, processor = build_real_chimera("internvl2-1b", experts=("got_ocr2", "pix2struct"))
    model.save_pretrained(tmp_path / "start")
    processor.save_pretrained(tmp_path / "start")
    rows = [{"image": image(896, 1344, seed=i), "question": "What does it say?", "answer": "forty two",
             "domain": domain} for i, domain in enumerate(["ocr", "table", "general", "ocr"])]
    sft = export_sft_jsonl(rows, str(tmp_path / "data"), "sft")
    pairs = export_preference_jsonl([{**r, "chosen": "forty two", "rejected": "seven"} for r in rows],
                                    str(tmp_path / "data"), "pref")
    for stage, start, out in (("1", "start", "s1"), ("router", "s1", "router"), ("2", "router", "s2")):
        config = "chimera_internvl_8b_stage2.yaml" if stage == "2" else "chimera_internvl_8b_stage1.yaml"
        run_real("chimera", config, "--stage", stage, "--model_name_or_path", tmp_path / start, "--train_file", sft,
                 "--output_dir", tmp_path / out)
        assert summary(tmp_path / out)["global_step"] == 2, stage
    run_real("dpo", "chimera_internvl_8b_dpo.yaml", "--model_name_or_path", tmp_path / "s2", "--train_file", pairs,
             "--output_dir", tmp_path / "dpo")
    assert summary(tmp_path / "dpo")["global_step"] == 2
    final = ChimeraForConditionalGeneration.from_pretrained(tmp_path / "dpo", dtype=torch.bfloat16)
    assert final.model.router.weight.dtype == torch.float32
    inputs = processor(images=[[rows[0]["image"]]], text=[chat_prompt(processor)], return_tensors="pt")
    with torch.no_grad():
        generated = final.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2
    print({stage: summary(tmp_path / stage)["seconds_per_step"] for stage in ("s1", "router", "s2", "dpo")})


@pytest.mark.real
def test_every_mixpert_phase_with_the_real_configs_at_real_shape(tmp_path):
    from train.data.export import export_sft_jsonl
    from train.real_shapes import build_real_mixpert

    model, processor = build_real_mixpert("llava-ov-0.5b", domains=("chart", "ocr"))
    model.save_pretrained(tmp_path / "start")
    processor.save_pretrained(tmp_path / "start")
    rows = [{"image": image(384, 768, seed=i), "question": "What is it?", "answer": "a chart", "domain": domain}
            for i, domain in enumerate(["chart", "ocr", "chart", "ocr"])]
    sft = export_sft_jsonl(rows, str(tmp_path / "data"), "sft")
    run_real("mixpert", "mixpert_llava_ov_7b_experts.yaml", "--model_name_or_path", tmp_path / "start",
             "--train_file", sft, "--output_dir", tmp_path / "experts")
    run_real("mixpert", "mixpert_llava_ov_7b_router.yaml", "--model_name_or_path", tmp_path / "experts",
             "--train_file", sft, "--output_dir", tmp_path / "router")
    experts, router = summary(tmp_path / "experts"), summary(tmp_path / "router")
    assert [experts["results"][d]["steps"] for d in ("chart", "ocr")] == [2, 2]
    assert router["results"]["cached_rows"] == 4
    print({d: experts["results"][d]["seconds_per_step"] for d in ("chart", "ocr")}, router["seconds_per_step"])
