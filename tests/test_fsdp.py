"""FSDP: the shipped config's wrap list covers every layer of every family, and `bench/fsdp_check.py` trains Chimera
stage 2 and Mixpert's expert phase sharded over 2 CPU processes with the same result as one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.modeling_layers import GradientCheckpointingLayer

from bench.fsdp_check import wrap_classes
from chimera_mixpert.tiny import FAMILIES, build_tiny_chimera, build_tiny_mixpert

ROOT = Path(__file__).resolve().parent.parent
EVERY_EXPERT = {"table": "pix2struct_vision_model", "math": "clip_vision_model", "ocr": "got_ocr2",
                "chart": "siglip_vision_model", "document": "got_ocr2_vision"}


def layer_classes(model) -> set:
    return {type(m).__name__ for m in model.modules() if isinstance(m, GradientCheckpointingLayer)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["chimera", "mixpert"])
def test_every_layer_class_is_unsplittable_and_accelerate_can_wrap_each(family, kind, tmp_path):
    if kind == "chimera":
        model, _ = build_tiny_chimera(family, EVERY_EXPERT)
    else:
        model, _ = build_tiny_mixpert(family)
    for built in (model, type(model).from_pretrained(model.save_pretrained(tmp_path) or tmp_path)):
        layers = layer_classes(built)
        assert len(layers) >= (5 if kind == "chimera" else 2)  # LLM + vision tower (+ the expert families)
        # device_map="auto" keeps each on one device (before: the expert encoders' layers were missing).
        assert layers <= set(built._no_split_modules), sorted(layers - set(built._no_split_modules))
        # accelerate with fsdp.yaml wraps every layer class, and finds every class it is told to wrap (before: the
        # yaml's fixed list named classes no single model has, and lacked Qwen2VLDecoderLayer and GotOcr2VisionLayer;
        # the native towers declare classes such as SiglipTextEmbeddings that a vision model does not have).
        assert layers <= set(wrap_classes(built))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["chimera", "mixpert"])
def test_fsdp_on_two_cpu_processes_matches_one_process(kind, tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.fsdp_check", "--model", kind, "--work", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in run.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert run.returncode == 0 and len(lines) == 8, run.stdout[-4000:] + run.stderr[-4000:]
    assert all(line.startswith("PASS") for line in lines)
    assert (tmp_path / f"fsdp-{kind}" / "config.json").is_file()
