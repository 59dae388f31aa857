"""Device checks for the training stages, for a machine with a CUDA GPU: one PASS / FAIL line per stage.

    python -m bench.gpu_check                 # on CUDA (refuses to run without one)
    python -m bench.gpu_check --device cpu    # the same checks on the CPU (the slow test tier runs this)

Each stage saves a small bf16 model, runs the real training script on it through its command-line parser (the tiny
YAML configs, with `--use_cpu` set from `--device`), and checks what only a real device shows:

- `mixpert router phase`, `chimera router stage`: the feature pass and the router run on the training device
  (`results.device` in `run_summary.json`), the router is fp32 inside the bf16 model, the model is saved, and the
  training accuracy is measured after the save.

Prints peak CUDA memory per stage on a GPU. Exit status 1 if any stage fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "train" / "configs" / "tiny"


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    return parser


def run_script(module: str, config: str, *overrides) -> None:
    script = __import__(f"train.{module}", fromlist=["main", "make_parser"])
    script.main(*script.make_parser().parse_args_and_config(["--config", str(TINY / config), *map(str, overrides)]))


def check_router_output(folder: Path, model_class, router_name: str, device: str) -> str:
    summary = json.loads((folder / "run_summary.json").read_text())
    results = summary["results"]
    assert results["device"].startswith(device), f"features / router ran on {results['device']}, not {device}"
    assert 0.0 <= results["train_accuracy"] <= 1.0, "no training accuracy after the save"
    model = model_class.from_pretrained(folder)
    router = model.get_submodule(router_name)
    assert all(p.dtype == torch.float32 for p in router.parameters()), "router not fp32"
    assert {p.dtype for n, p in model.named_parameters() if router_name not in n} == {torch.bfloat16}
    return f"{results['cached_rows']} rows cached, train accuracy {results['train_accuracy']:.2f}"


def mixpert_router_phase(work: Path, use_cpu: bool, device: str) -> str:
    from modeling_mixpert import MixpertForConditionalGeneration
    from train.tiny import build_tiny_mixpert

    model, processor = build_tiny_mixpert("internvl", ["chart", "table", "math", "document", "ocr", "general"],
                                          image_size=32, patch_size=8, generalist_kwargs={"hidden_size": 32})
    model.to(torch.bfloat16).save_pretrained(work / "start")
    processor.save_pretrained(work / "start")
    run_script("mixpert", "mixpert_router.yaml", "--model_name_or_path", work / "start", "--dtype", "bfloat16",
               "--output_dir", work / "out", "--num_train_epochs", 2, "--use_cpu", use_cpu)
    return check_router_output(work / "out", MixpertForConditionalGeneration, "model.vision_router", device)


def chimera_router_stage(work: Path, use_cpu: bool, device: str) -> str:
    from modeling_chimera import ChimeraForConditionalGeneration
    from train.tiny import build_tiny_chimera

    experts = {"table": "pix2struct_vision_model", "chart": "siglip_vision_model", "math": "clip_vision_model"}
    model, processor = build_tiny_chimera("internvl", experts, image_size=32, patch_size=8,
                                          generalist_kwargs={"hidden_size": 32})
    model.to(torch.bfloat16).save_pretrained(work / "start")
    processor.save_pretrained(work / "start")
    run_script("chimera", "chimera_stage1.yaml", "--stage", "router", "--model_name_or_path", work / "start",
               "--dtype", "bfloat16", "--output_dir", work / "out", "--max_steps", -1, "--num_train_epochs", 2,
               "--use_cpu", use_cpu)
    return check_router_output(work / "out", ChimeraForConditionalGeneration, "model.router", device)


STAGES = {"mixpert router phase": mixpert_router_phase, "chimera router stage": chimera_router_stage}


def main(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: run with --device cpu, or on a machine with a GPU.")
        return 2
    failed = 0
    for name, stage in STAGES.items():
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            try:
                detail = stage(Path(folder), args.device == "cpu", args.device)
                status = "PASS"
            except Exception as error:  # one line per stage; the traceback goes to stderr
                traceback.print_exc()
                detail, status = f"{type(error).__name__}: {error}", "FAIL"
                failed += 1
        memory = f", peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if args.device == "cuda" else ""
        print(f"{status} {name} on {args.device}: {detail} ({time.perf_counter() - start:.1f} s{memory})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
