"""Device checks for every training stage, for a machine with a CUDA GPU: one PASS / FAIL / SKIP line per stage.

    python -m bench.gpu_check                              # CUDA, real shapes, bf16 (a few minutes on one GPU)
    python -m bench.gpu_check --device cpu --shape tiny    # the same checks on the CPU (the slow test tier runs this)

`--shape real` builds the published models' widths, image sizes and token counts (`chimera_mixpert.real_shapes`, two
layers per tower, random weights) and trains them with the shipped real configs (`train/configs/real/`); `--shape tiny`
uses the tiny models and configs. Every stage runs the real training script through its command-line parser, from a
bf16 checkpoint, with `--bf16 true`, 2 optimizer steps of batch 1, chained as a real run is:

    chimera stage 1 -> chimera router stage -> chimera stage 2 (GSCM) -> chimera DPO
    chimera stage 2 under DeepSpeed ZeRO-2 (`accelerate launch`, one process; CUDA with deepspeed installed only)
    mixpert expert phase -> mixpert router phase

and checks what only a real device shows: the model trained on the device (`device` in `run_summary.json`), the
trainable bf16 weights trained as fp32 master weights (under DeepSpeed: none, it keeps its own copy), the saved model
is bf16 with an fp32 router, the frozen expert encoders did not move and the trained groups did, and for the router
phases that the features were computed on the device and the accuracy measured after the save. Prints peak CUDA memory
per stage. Exit status 1 if any stage fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "train" / "configs"
CONFIG = {  # stage -> (tiny config, real config)
    "chimera_1": ("chimera_stage1.yaml", "chimera_internvl_8b_stage1.yaml"),
    "chimera_router": ("chimera_stage1.yaml", "chimera_internvl_8b_stage1.yaml"),  # the router stage's own settings
    "chimera_2": ("chimera_stage2.yaml", "chimera_internvl_8b_stage2.yaml"),
    "chimera_dpo": ("chimera_dpo.yaml", "chimera_internvl_8b_dpo.yaml"),
    "mixpert_experts": ("mixpert_experts.yaml", "mixpert_llava_ov_7b_experts.yaml"),
    "mixpert_router": ("mixpert_router.yaml", "mixpert_llava_ov_7b_router.yaml"),
}


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shape", default="real", choices=["real", "tiny"])
    parser.add_argument("--num_layers", type=int, default=2, help="layers per tower at --shape real")
    return parser


class Run:
    """The work folder, the shape and the device of one check run, and the script invocation they imply."""

    def __init__(self, work: Path, shape: str, device: str, num_layers: int = 2):
        self.work, self.shape, self.device, self.num_layers = work, shape, device, num_layers
        self.files, self.processors = {}, {}

    def config(self, stage: str) -> Path:
        tiny, real = CONFIG[stage]
        return CONFIGS / self.shape / (real if self.shape == "real" else tiny)

    def args(self, stage: str, start: str, out: str, *extra) -> list[str]:
        args = ["--config", str(self.config(stage)), "--model_name_or_path", str(self.work / start),
                "--output_dir", str(self.work / out), "--dtype", "bfloat16", "--use_cpu", str(self.device == "cpu"),
                "--report_to", "none", "--dataloader_num_workers", "0", "--save_strategy", "no"]
        if not stage.endswith("router"):
            args += ["--bf16", "true", "--max_steps", "2", "--per_device_train_batch_size", "1",
                     "--gradient_accumulation_steps", "1"]
        data = self.files.get("pairs" if stage == "chimera_dpo" else "sft")
        if data:
            args += ["--train_file", str(data)]
        return args + [str(x) for x in extra]

    def script(self, module: str, stage: str, start: str, out: str, *extra) -> dict:
        script = __import__(f"train.{module}", fromlist=["main", "make_parser"])
        script.main(*script.make_parser().parse_args_and_config(self.args(stage, start, out, *extra)))
        return json.loads((self.work / out / "run_summary.json").read_text())


# ------------------------------------------------------------------------------------------------ the checks


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def check_saved(run: Run, start: str, out: str, router: str, trained: str, frozen: str | None) -> str:
    """bf16 model with an fp32 router; the `trained` prefix moved, the `frozen` prefix did not."""
    before, after = weights(run.work / start), weights(run.work / out)
    dtypes = {n: t.dtype for n, t in after.items() if t.is_floating_point()}
    assert {d for n, d in dtypes.items() if n.startswith(router)} == {torch.float32}, "router not fp32 on disk"
    assert {d for n, d in dtypes.items() if not n.startswith(router)} == {torch.bfloat16}, "not bf16 on disk"
    names = [n for n in after if n.startswith(trained) and after[n].is_floating_point()]
    moved = sum(int((before[n] != after[n]).sum()) for n in names) / max(1, sum(after[n].numel() for n in names))
    assert moved > 0, f"nothing under {trained} changed"
    kept = "" if frozen is None else f", {frozen[:-1]} unchanged"
    if frozen is not None:
        changed = [n for n in after if n.startswith(frozen) and not torch.equal(before[n], after[n])]
        assert not changed, f"frozen weights changed: {changed[:3]}"
    return f"{moved:.1%} of {trained[:-1]} changed in 2 steps{kept}"


def check_master_weights(summary: dict, managed: bool = False) -> None:
    """The trainable bf16 weights trained as fp32 master weights (`chimera_mixpert.training.fp32_master_weights`),
    unless DeepSpeed kept its own copy."""
    counts = [summary.get("fp32_master_parameters")] + [r.get("fp32_master_parameters") for r in
                                                         summary.get("results", {}).values() if isinstance(r, dict)]
    upcast = sum(c for c in counts if c)
    assert (upcast == 0) if managed else (upcast > 0), f"{upcast} parameters trained as fp32 master weights"


def check_device(summary: dict, device: str) -> None:
    where = summary.get("device") or summary.get("results", {}).get("device", "")
    assert where.startswith(device), f"trained on {where or 'an unrecorded device'}, not {device}"


def check_router(run: Run, summary: dict, out: str, model_class, router_name: str) -> str:
    results = summary["results"]
    check_device(summary, run.device)
    assert 0.0 <= results["train_accuracy"] <= 1.0, "no training accuracy after the save"
    model = model_class.from_pretrained(run.work / out)
    router = model.get_submodule(router_name)
    assert all(p.dtype == torch.float32 for p in router.parameters()), "router not fp32"
    assert {p.dtype for n, p in model.named_parameters() if router_name not in n} == {torch.bfloat16}
    return f"{results['cached_rows']} rows cached, train accuracy {results['train_accuracy']:.2f}"


# ---------------------------------------------------------------------------------------------------- stages


def prepare(run: Run) -> None:
    """bf16 starting checkpoints (Chimera with two experts; Mixpert with two domains) and the data files."""
    from chimera_mixpert.data.export import export_preference_jsonl, export_sft_jsonl

    if run.shape == "real":
        from chimera_mixpert.real_shapes import build_real_chimera, build_real_mixpert, random_image

        chimera, chimera_processor = build_real_chimera("internvl2-1b", experts=("got_ocr2", "pix2struct"),
                                                        num_layers=run.num_layers)
        mixpert, mixpert_processor = build_real_mixpert("llava-ov-0.5b", domains=("ocr", "table"),
                                                        num_layers=run.num_layers)
        rows = [{"image": random_image(896, 1344, seed=i), "question": "What does it say?", "answer": "forty two",
                 "domain": domain} for i, domain in enumerate(["ocr", "table", "ocr", "table"])]
        run.files["sft"] = export_sft_jsonl(rows, str(run.work / "data"), "sft")
        run.files["pairs"] = export_preference_jsonl([{**r, "chosen": "forty two", "rejected": "seven"} for r in rows],
                                                     str(run.work / "data"), "pairs")
    else:  # the tiny configs write their own synthetic data
        from chimera_mixpert.tiny import build_tiny_chimera, build_tiny_mixpert

        experts = {"table": "pix2struct_vision_model", "chart": "siglip_vision_model", "math": "clip_vision_model"}
        chimera, chimera_processor = build_tiny_chimera("internvl", experts, image_size=32, patch_size=8,
                                                        generalist_kwargs={"hidden_size": 32})
        mixpert, mixpert_processor = build_tiny_mixpert(
            "internvl", ["chart", "table", "math", "document", "ocr", "general"], image_size=32, patch_size=8,
            generalist_kwargs={"hidden_size": 32})
    for name, model, processor in (("chimera", chimera, chimera_processor), ("mixpert", mixpert, mixpert_processor)):
        model.to(torch.bfloat16).save_pretrained(run.work / name)
        processor.save_pretrained(run.work / name)
        run.processors[name] = processor


def chimera_stage_1(run: Run) -> str:
    summary = run.script("chimera", "chimera_1", "chimera", "c1", "--stage", 1)
    check_device(summary, run.device)
    check_master_weights(summary)
    # The generalist's projector trains in stage 1 on every row (2 rows of batch 1 may route to no expert, leaving
    # the expert projectors without a gradient).
    return check_saved(run, "chimera", "c1", "model.router.", "model.generalist.multi_modal_projector.",
                       "model.expert_encoders.")


def chimera_router_stage(run: Run) -> str:
    from modeling_chimera import ChimeraForConditionalGeneration

    summary = run.script("chimera", "chimera_router", "c1", "router", "--stage", "router", "--max_steps", -1,
                         "--num_train_epochs", 2)
    return check_router(run, summary, "router", ChimeraForConditionalGeneration, "model.router")


def chimera_stage_2(run: Run) -> str:
    summary = run.script("chimera", "chimera_2", "router", "c2", "--stage", 2)
    check_device(summary, run.device)
    check_master_weights(summary)
    assert summary["gscm_ratio"] > 0, "GSCM off in stage 2"
    return check_saved(run, "router", "c2", "model.router.", "model.generalist.language_model.",
                       "model.expert_encoders.") + f", GSCM ratio {summary['gscm_ratio']}"


def chimera_dpo(run: Run) -> str:
    """DPO, then the final model generates on the device."""
    from chimera_mixpert.real_shapes import random_image
    from chimera_mixpert.tiny import chat_prompt
    from modeling_chimera import ChimeraForConditionalGeneration

    summary = run.script("dpo", "chimera_dpo", "c2", "dpo")
    check_device(summary, run.device)
    check_master_weights(summary)
    detail = check_saved(run, "c2", "dpo", "model.router.", "model.generalist.language_model.", "model.router.")
    model = ChimeraForConditionalGeneration.from_pretrained(run.work / "dpo", dtype=torch.bfloat16).to(run.device)
    processor = run.processors["chimera"]
    size = (896, 1344) if run.shape == "real" else (32, 32)
    inputs = processor(images=[[random_image(*size)]], text=[chat_prompt(processor)],
                       return_tensors="pt").to(run.device)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2, "generate() did not add 2 tokens"
    return detail + ", generate() after DPO on the device"


def chimera_stage_2_zero2(run: Run) -> str:
    if run.device != "cuda":
        raise Skip("DeepSpeed needs a CUDA GPU")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise Skip("deepspeed is not installed (pip install deepspeed)") from None
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(CONFIGS / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "1", "-m", "train.chimera",
               *run.args("chimera_2", "router", "zero2", "--stage", 2)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run.work / "zero2" / "run_summary.json").read_text())
    check_device(summary, run.device)
    check_master_weights(summary, managed=True)  # DeepSpeed keeps the fp32 copy itself
    return check_saved(run, "router", "zero2", "model.router.", "model.generalist.language_model.",
                       "model.expert_encoders.")


def mixpert_expert_phase(run: Run) -> str:
    domain = "ocr" if run.shape == "real" else "math"
    summary = run.script("mixpert", "mixpert_experts", "mixpert", "mx", "--domains", domain)
    check_device(summary, run.device)
    check_master_weights(summary)
    return check_saved(run, "mixpert", "mx", "model.vision_router.", f"model.vision_experts.{domain}.",
                       "model.backbone.language_model.")


def mixpert_router_phase(run: Run) -> str:
    from modeling_mixpert import MixpertForConditionalGeneration

    summary = run.script("mixpert", "mixpert_router", "mx", "mr", "--num_train_epochs", 2)
    return check_router(run, summary, "mr", MixpertForConditionalGeneration, "model.vision_router")


def _pace(run: Run) -> str:
    """Seconds per optimizer step of the stage that just ran (its newest run summary)."""
    summaries = sorted(run.work.glob("*/run_summary.json"), key=lambda f: f.stat().st_mtime)
    pace = json.loads(summaries[-1].read_text()).get("seconds_per_step") if summaries else None
    return f", {pace:.3g} s/step" if pace else ""


class Skip(Exception):
    """A stage that cannot run on this machine (the reason is printed)."""


STAGES = {
    "chimera stage 1": chimera_stage_1,
    "chimera router stage": chimera_router_stage,
    "chimera stage 2": chimera_stage_2,
    "chimera dpo": chimera_dpo,
    "chimera stage 2 under deepspeed zero-2": chimera_stage_2_zero2,
    "mixpert expert phase": mixpert_expert_phase,
    "mixpert router phase": mixpert_router_phase,
}


def main(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: run with --device cpu, or on a machine with a GPU.")
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    failed = 0
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        run = Run(work, args.shape, args.device, args.num_layers)
        prepare(run)
        for name, stage in STAGES.items():
            gc.collect()  # the previous stage's models
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                detail, status = stage(run), "PASS"
                detail += _pace(run)
            except Skip as reason:
                detail, status = str(reason), "SKIP"
            except Exception as error:  # one line per stage; the traceback goes to stderr
                traceback.print_exc()
                detail, status = f"{type(error).__name__}: {error}", "FAIL"
                failed += 1
            memory = ""
            if args.device == "cuda" and "deepspeed" not in name:  # that stage runs in its own process
                memory = f", peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
            print(f"{status} {name} on {args.device} ({args.shape} shape): {detail} "
                  f"({time.perf_counter() - start:.1f} s{memory})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
