"""Inference cost at the published models' full depth and widths (random weights), measured side by side in one run.

    python -m bench.real_shape                      # everything below, about 15 minutes on 2 CPU cores
    python -m bench.real_shape --parts memory       # one part; --repeats, --dtypes to trade time for spread

Parts (each prints ratios of medians over interleaved repeats; the machine is noisy, so never compare across runs):

- `chimera`: an InternVL2-1B-shaped generalist (InternViT-300M, 24 + Qwen2-0.5B, 24 layers; one 448 px tile) with a
  GOT-OCR2 expert (SAM-base, 12 layers, 1024 px, 256 tokens). Forward: Chimera on a general image (router says "no
  expert") / the bare generalist; Chimera with the expert / (generalist + the expert encoder and projector alone);
  `generate()` (4 new tokens) on a general image / the generalist's. fp32 and bf16 (bf16 runs the general-image
  comparison only: this CPU has no bf16 matrix units and is about 5x slower in bf16).
- `mixpert`: a LLaVA-OneVision-0.5B-shaped base (SigLIP-so400m 26 + Qwen2-0.5B 24 layers, 384 px anyres), 5 domains,
  K = 2. Forward Mixpert / base on one image and on a batch of 2 routed to one expert; FLOPs per image of the base
  and of Mixpert (`torch.utils.flop_counter`, one forward).
- `dispatch`: a Qwen2-VL-2B-shaped base (ViT 32 + LLM 28 layers), 16 images of 224 px routed to a mix of the 5
  experts and the versatile one. The vision path (`get_image_features`): Mixpert grouped dispatch / the base's, and the
  per-image loop / grouped dispatch. The LLM then reads the same tokens in both models, so a forward's ratio lies
  between 1 and this one.
- `memory`: peak resident memory of a fresh process loading a bf16 checkpoint saved in 500 MB shards (the 1B-class
  Chimera and Mixpert above, and the bare generalist for comparison) and then reading every weight once (loaded
  weights can still be unread pages of the memory-mapped files), minus the process's memory before the load, over
  the checkpoint's size on disk (goal <= 1.3).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.mixpert_speed import _interleaved
from chimera_mixpert.tiny import chat_prompt, random_images

PARTS = ("chimera", "mixpert", "dispatch", "memory")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS))
    parser.add_argument("--dtypes", nargs="*", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_layers", type=int, default=None,
                        help="cut every tower to this depth (default: the published depths); for a quick smoke run")
    parser.add_argument("--dispatch_images", type=int, default=16)
    return parser


def _inputs(processor, images):
    return processor(images=[[im] for im in images], text=[chat_prompt(processor)] * len(images), return_tensors="pt",
                     padding=True)


def chimera(dtype_name: str, repeats: int, num_layers) -> dict:
    from chimera_mixpert.real_shapes import build_real_chimera, build_real_generalist

    dtype = DTYPES[dtype_name]
    model, processor = build_real_chimera("internvl2-1b", experts=("got_ocr2",), num_layers=num_layers, dtype=dtype,
                                          max_tiles=1)
    generalist, _ = build_real_generalist("internvl2-1b", num_layers, dtype, max_tiles=1)  # same seed: same weights
    inputs = _inputs(processor, random_images(1, sizes=((448, 448),)))
    native = {k: v for k, v in inputs.items() if k != "expert_pixel_values"}
    encoder, projector = model.model.expert_encoders["ocr"], model.model.expert_projectors["ocr"]
    expert = torch.ones(1, dtype=torch.long)
    generate = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        model.model.router.weight.zero_()  # all-zero scores: argmax = class 0, "no expert"
        assert model(**inputs).expert_index.tolist() == [0]
        # The general path is the generalist: same logits over its vocabulary (Chimera adds its expert tokens after it).
        vocabulary = generalist.config.get_text_config().vocab_size
        assert torch.equal(model(**inputs).logits[..., :vocabulary], generalist(**native).logits)
        runs = {"generalist": lambda: generalist(**native), "chimera_general": lambda: model(**inputs)}
        if dtype_name == "fp32":
            runs.update({
                "generalist+expert": lambda: (generalist(**native),
                                              projector(encoder(inputs["expert_pixel_values"][0].to(dtype)))),
                "chimera_expert": lambda: model(**inputs, expert_labels=expert),
                "generalist_generate": lambda: generalist.generate(**native, **generate),
                "chimera_generate": lambda: model.generate(**inputs, **generate),
            })
        ms = _interleaved(runs, repeats)
    ratios = {"general / generalist": ms["chimera_general"] / ms["generalist"]}
    if dtype_name == "fp32":
        ratios["expert / (generalist + expert alone)"] = ms["chimera_expert"] / ms["generalist+expert"]
        ratios["generate general / generalist"] = ms["chimera_generate"] / ms["generalist_generate"]
    return {"ms": ms, "ratios": ratios, "prompt_tokens": int(inputs["input_ids"].shape[1])}


def mixpert(dtype_name: str, repeats: int, num_layers) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from chimera_mixpert.real_shapes import build_real_generalist, build_real_mixpert

    dtype = DTYPES[dtype_name]
    model, processor = build_real_mixpert("llava-ov-0.5b", num_layers=num_layers, dtype=dtype)
    depth = None if num_layers is None else num_layers + 2
    base, _ = build_real_generalist("llava-ov-0.5b", depth, dtype)  # same seed: the weights Mixpert upcycled
    one = _inputs(processor, random_images(1, sizes=((384, 384),)))
    two = _inputs(processor, random_images(2, seed=1, sizes=((384, 384),)))
    with torch.no_grad():
        ms = _interleaved({
            "base_1": lambda: base(**one),
            "mixpert_1": lambda: model(**one, expert_labels=torch.tensor([3])),
            "base_2": lambda: base(**two),
            "mixpert_2_one_expert": lambda: model(**two, expert_labels=torch.tensor([2, 2])),
        }, repeats)
        flops = {}
        for name, run in (("base", lambda: base(**one)),
                          ("mixpert", lambda: model(**one, expert_labels=torch.tensor([3])))):
            counter = FlopCounterMode(display=False)
            with counter:
                run()
            flops[name] = counter.get_total_flops()
    return {"ms": ms, "ratios": {"one image": ms["mixpert_1"] / ms["base_1"],
                                 "batch of 2, one expert": ms["mixpert_2_one_expert"] / ms["base_2"]},
            "gflops_per_image": {k: v / 1e9 for k, v in flops.items()},
            "flops_ratio": flops["mixpert"] / flops["base"], "crops_per_image": int(one["pixel_values"].shape[1])}


def dispatch(dtype_name: str, repeats: int, num_layers, images: int) -> dict:
    from chimera_mixpert.real_shapes import build_real_generalist, build_real_mixpert

    dtype = DTYPES[dtype_name]
    model, processor = build_real_mixpert("qwen2-vl-2b", num_layers=num_layers, dtype=dtype)
    depth = None if num_layers is None else num_layers + 2
    base, _ = build_real_generalist("qwen2-vl-2b", depth, dtype)
    pictures = random_images(images, sizes=((224, 224),))
    many = _inputs(processor, pictures)
    singles = [_inputs(processor, [p]) for p in pictures]
    mixed = torch.arange(images) % 6  # versatile + 5 domains, mixed through the batch

    def per_image_loop():
        for i, single in enumerate(singles):
            model.get_image_features(single["pixel_values"], expert_labels=mixed[i: i + 1],
                                     image_grid_thw=single["image_grid_thw"])

    with torch.no_grad():
        ms = _interleaved({
            "base": lambda: base.model.get_image_features(many["pixel_values"], image_grid_thw=many["image_grid_thw"]),
            "grouped": lambda: model.get_image_features(many["pixel_values"], expert_labels=mixed,
                                                        image_grid_thw=many["image_grid_thw"]),
            "per_image": per_image_loop,
        }, repeats)
    return {"ms": ms, "ratios": {"grouped / base (vision path)": ms["grouped"] / ms["base"],
                                 "per-image loop / grouped": ms["per_image"] / ms["grouped"]},
            "tokens_per_image": int(many["image_grid_thw"][0].prod()) // 4}


LOAD = """
import json, resource, sys, torch
def rss_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
kind, folder = sys.argv[1:]
if kind == "chimera":
    from modeling_chimera import ChimeraForConditionalGeneration as cls
elif kind == "mixpert":
    from modeling_mixpert import MixpertForConditionalGeneration as cls
else:
    from transformers import AutoModelForImageTextToText as cls
before = rss_mb("VmRSS:")
model = cls.from_pretrained(folder, dtype=torch.bfloat16)
loaded = rss_mb("VmRSS:")
# Weights may still be pages of the memory-mapped files: touch every page of every tensor, so all of it is resident
# (what a first forward does), and take the peak over the load and that.
with torch.no_grad():
    for tensor in list(model.parameters()) + list(model.buffers()):
        tensor.flatten()[::1024].float().sum()  # one element per 2 KB touches every page, allocates almost nothing
print(json.dumps({"before_mb": before, "loaded_mb": loaded, "peak_mb": rss_mb("VmHWM:"), "after_mb": rss_mb("VmRSS:")}))
"""


def memory(num_layers) -> dict:
    from chimera_mixpert.real_shapes import build_real_chimera, build_real_generalist, build_real_mixpert

    results = {}
    builders = {
        "generalist (InternVL2-1B shape)": ("generalist", lambda: build_real_generalist("internvl2-1b", num_layers)[0]),
        "chimera (+ GOT-OCR2, Pix2Struct)": ("chimera", lambda: build_real_chimera(
            "internvl2-1b", experts=("got_ocr2", "pix2struct"), num_layers=num_layers)[0]),
        "mixpert (LLaVA-OV-0.5B shape, 5 experts)": ("mixpert", lambda: build_real_mixpert(
            "llava-ov-0.5b", num_layers=num_layers)[0]),
    }
    root = Path(__file__).resolve().parent.parent
    for name, (kind, build) in builders.items():
        with tempfile.TemporaryDirectory() as folder:
            model = build()
            model.save_pretrained(folder, max_shard_size="500MB")
            del model
            files = list(Path(folder).glob("*.safetensors"))
            size_mb = sum(f.stat().st_size for f in files) / 2**20
            run = subprocess.run([sys.executable, "-c", LOAD, kind, folder], cwd=root, capture_output=True, text=True,
                                 check=True)
            rss = json.loads(run.stdout.strip().splitlines()[-1])
        results[name] = {"checkpoint_mb": size_mb, "shards": len(files), **rss,
                         "peak_over_checkpoint": (rss["peak_mb"] - rss["before_mb"]) / size_mb}
    return results


def main(args) -> dict:
    print(f"threads={torch.get_num_threads()} repeats={args.repeats} depth="
          f"{'published' if args.num_layers is None else args.num_layers} dtypes={args.dtypes}", flush=True)
    results = {}
    for dtype in args.dtypes if "chimera" in args.parts else []:
        r = results[f"chimera_{dtype}"] = chimera(dtype, args.repeats, args.num_layers)
        print(f"\nChimera, InternVL2-1B shape + GOT-OCR2, {dtype}, prompt {r['prompt_tokens']} tokens: "
              + ", ".join(f"{k} {v:.0f} ms" for k, v in r["ms"].items()), flush=True)
        for name, value in r["ratios"].items():
            print(f"  {name:<40}{value:.3f}", flush=True)
    if "mixpert" in args.parts:
        r = results["mixpert_fp32"] = mixpert("fp32", args.repeats, args.num_layers)
        print(f"\nMixpert, LLaVA-OV-0.5B shape, fp32, {r['crops_per_image']} crops per image: "
              + ", ".join(f"{k} {v:.0f} ms" for k, v in r["ms"].items()), flush=True)
        for name, value in r["ratios"].items():
            print(f"  Mixpert / base, {name:<30}{value:.3f}", flush=True)
        g = r["gflops_per_image"]
        print(f"  GFLOPs per image: base {g['base']:.1f}, Mixpert {g['mixpert']:.1f} "
              f"(+{(g['mixpert'] - g['base']) * 1e3:.2f}"
              f" MFLOPs, ratio {r['flops_ratio']:.6f})")
    if "dispatch" in args.parts:
        r = results["dispatch_fp32"] = dispatch("fp32", max(2, args.repeats - 1), args.num_layers,
                                                args.dispatch_images)
        print(f"\nMixpert dispatch, Qwen2-VL-2B shape, fp32, {args.dispatch_images} mixed images of 224 px "
              f"({r['tokens_per_image']} tokens each): " + ", ".join(f"{k} {v:.0f} ms" for k, v in r["ms"].items()),
              flush=True)
        for name, value in r["ratios"].items():
            print(f"  {name:<40}{value:.3f}", flush=True)
    if "memory" in args.parts:
        r = results["memory"] = memory(args.num_layers)
        print("\nLoading a bf16 checkpoint in 500 MB shards, fresh process (peak RSS - RSS before) / checkpoint size:")
        for name, m in r.items():
            print(f"  {name:<44}{m['checkpoint_mb']:>7.0f} MB in {m['shards']} shards, peak +"
                  f"{m['peak_mb'] - m['before_mb']:.0f} MB, ratio {m['peak_over_checkpoint']:.2f}", flush=True)
    return results


if __name__ == "__main__":
    main(make_parser().parse_args())
