"""FSDP: the shipped config's wrap list covers every layer of every family, and `bench/fsdp_check.py` trains Chimera
stage 2 and Mixpert's expert phase sharded over 2 CPU processes with the same result as one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.modeling_layers import GradientCheckpointingLayer

from bench.fsdp_check import wrap_classes
from train.tiny import FAMILIES, build_tiny_chimera, build_tiny_mixpert

ROOT = Path(__file__).resolve().parent.parent
ALL_EXPERTS = {"table": "pix2struct_vision_model", "math": "clip_vision_model", "ocr": "got_ocr2",
               "chart": "siglip_vision_model"}


def layer_classes(model) -> set:
    return {type(m).__name__ for m in model.modules() if isinstance(m, GradientCheckpointingLayer)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["chimera", "mixpert"])
def test_every_layer_class_is_unsplittable_and_wrapped_by_the_fsdp_config(family, kind):
    if kind == "chimera":
        model, _ = build_tiny_chimera(family, ALL_EXPERTS)
    else:
        model, _ = build_tiny_mixpert(family)
    layers = layer_classes(model)
    assert len(layers) >= (5 if kind == "chimera" else 2)  # LLM + vision tower (+ the four expert families)
    # device_map="auto" keeps each of these on one device; before, the expert encoders' layers were missing.
    assert layers <= set(model._no_split_modules), sorted(layers - set(model._no_split_modules))
    # fsdp.yaml wraps each of them (before: Qwen2VLDecoderLayer and GotOcr2VisionLayer were missing).
    assert layers <= set(wrap_classes()), sorted(layers - set(wrap_classes()))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["chimera", "mixpert"])
def test_fsdp_on_two_cpu_processes_matches_one_process(kind, tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.fsdp_check", "--model", kind, "--work", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in run.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert run.returncode == 0 and len(lines) == 9, run.stdout[-4000:] + run.stderr[-4000:]
    assert all(line.startswith("PASS") for line in lines)
    assert (tmp_path / f"fsdp-{kind}" / "config.json").is_file()
