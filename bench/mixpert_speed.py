"""Mixpert's inference cost, measured side by side in one run, and its parameter accounting at 7B scale.

    python -m bench.mixpert_speed                  # small CPU-sized models + the LLaVA-OV-7B parameter table
    python -m bench.mixpert_speed --repeats 30 --family internvl

1. Mixpert forward / base forward on the same inputs: the paper's claim is that only the router is extra (goal
   <= 1.03x). Three cases: one image; a batch routed to one expert; a batch routed to a mix of experts (each used
   expert then runs on fewer images, which costs matrix-product efficiency on a CPU).
2. Grouped dispatch (one pass per used expert) / a per-image loop, vision path only, on a mixed batch of 16 images
   (goal >= 3x). Grouping saves per-call overhead and gains batching efficiency; on a compute-bound CPU the latter
   is small, so compare `--size small` and `--size medium`.
3. Parameter accounting of a LLaVA-OneVision-7B-sized Mixpert (5 domains, K = 2) built on the meta device, next to
   Mixpert Table 6 (+237.1M total, +1.3M activated).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.chimera_speed import SIZES
from chimera_mixpert.tiny import (
    FAMILIES,
    build_generalist,
    build_processor,
    build_tokenizer,
    chat_prompt,
    random_images,
)


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, nargs="*", default=list(FAMILIES))
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=4, help="batch of the forward comparison")
    parser.add_argument("--dispatch_batch", type=int, default=16, help="images in the dispatch comparison")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip_7b", action="store_true", help="skip the LLaVA-OV-7B parameter table")
    return parser


def _median_ms(times):
    return statistics.median(times) * 1000


def _interleaved(runs: dict, repeats: int) -> dict:
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: _median_ms(t) for name, t in times.items()}


def bench_family(family, size, batch, dispatch_batch, repeats):
    from modeling_mixpert import MixpertForConditionalGeneration

    tokenizer = build_tokenizer(family)
    image_size, patch = size["image_size"], size["patch_size"]
    base = build_generalist(family, tokenizer, seed=0, **size)
    twin = build_generalist(family, tokenizer, seed=0, **size)
    model = MixpertForConditionalGeneration.from_base(base, domains=["chart", "document", "math", "ocr", "general"])
    model.eval()
    processor = build_processor(family, tokenizer, image_size=image_size, patch_size=patch)
    images = random_images(max(batch, dispatch_batch), seed=0, sizes=((image_size, image_size),))
    mixed = torch.arange(dispatch_batch) % 6  # versatile + 5 domains, mixed through the batch

    def prompts(n):
        return processor(images=[[im] for im in images[:n]], text=[chat_prompt(processor)] * n, return_tensors="pt",
                         padding=True)

    one, inputs, many = prompts(1), prompts(batch), prompts(dispatch_batch)
    image_keys = [k for k in ("image_sizes", "batch_num_images", "image_grid_thw") if k in inputs]
    singles = [processor(images=[im], text=[chat_prompt(processor)], return_tensors="pt")
               for im in images[:dispatch_batch]]

    def per_image_loop():
        for i, single in enumerate(singles):
            model.get_image_features(single.pixel_values, input_ids=single.input_ids, expert_labels=mixed[i : i + 1],
                                     **{k: single[k] for k in image_keys})

    with torch.no_grad():
        forward = _interleaved({
            "base_1": lambda: twin(**one),
            "mixpert_1": lambda: model(**one, expert_labels=torch.tensor([3])),
            "base_batch": lambda: twin(**inputs),
            "mixpert_batch_one_expert": lambda: model(**inputs, expert_labels=torch.full((batch,), 2)),
            "mixpert_batch_mixed": lambda: model(**inputs, expert_labels=mixed[:batch]),
        }, repeats)
        dispatch = _interleaved({
            "grouped": lambda: model.get_image_features(many.pixel_values, input_ids=many.input_ids,
                                                        expert_labels=mixed, **{k: many[k] for k in image_keys}),
            "per_image": per_image_loop,
        }, max(3, repeats // 3))
    return forward, dispatch


def llava_onevision_7b_table():
    """Mixpert on a LLaVA-OneVision-7B-sized config (SigLIP-so400m/14 @ 384, 26 layers; Qwen2-7B), meta device."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from modeling_mixpert import MixpertForConditionalGeneration

    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=26, num_attention_heads=16, patch_size=14, image_size=384,
                           vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                         num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4),
    )
    with torch.device("meta"):
        base = LlavaOnevisionForConditionalGeneration(config)
        domains = ["chart", "document", "math", "ocr", "general"]
        model = MixpertForConditionalGeneration.from_base(base, domains=domains)
        lora = MixpertForConditionalGeneration.from_base(base, domains=domains, expert_adapter="lora")
    # FLOPs of one 384 px tile (729 tokens), counted on the meta weights (`flops_per_image`)
    return {**model.parameter_counts(), "lora": lora.parameter_counts()}


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    print(f"size={args.size} {size} batch={args.batch} dispatch_batch={args.dispatch_batch} repeats={args.repeats} "
          f"threads={torch.get_num_threads()}")
    print(f"{'family':<16}{'1 image':>9}{'one expert':>12}{'mixed':>8}   (Mixpert / base forward, batch {args.batch})"
          f"{'per-image':>12}{'grouped':>10}{'speed-up':>10}")
    results = {}
    for family in args.family:
        forward, dispatch = bench_family(family, size, args.batch, args.dispatch_batch, args.repeats)
        ratios = {
            "one_image": forward["mixpert_1"] / forward["base_1"],
            "batch_one_expert": forward["mixpert_batch_one_expert"] / forward["base_batch"],
            "batch_mixed": forward["mixpert_batch_mixed"] / forward["base_batch"],
        }
        speedup = dispatch["per_image"] / dispatch["grouped"]
        print(f"{family:<16}{ratios['one_image']:>9.3f}{ratios['batch_one_expert']:>12.3f}{ratios['batch_mixed']:>8.3f}"
              f"{'':<41}{dispatch['per_image']:>10.1f}ms{dispatch['grouped']:>8.1f}ms{speedup:>9.2f}x")
        results[family] = {"forward_ms": forward, "dispatch_ms": dispatch, "forward_ratios": ratios,
                           "dispatch_speedup": speedup}
    if not args.skip_7b:
        counts = llava_onevision_7b_table()
        print("\nLLaVA-OneVision-7B-sized Mixpert, 5 domains, K=2 (paper Table 6: +237.1M total, +1.3M activated)")
        for key in ("base", "total", "added_by_experts", "router", "activated", "added_activated"):
            print(f"  {key:<22}{counts[key] / 1e6:>12.1f}M   LoRA (rank 16): {counts['lora'][key] / 1e6:>8.1f}M")
        for key in ("base_flops_per_image", "flops_per_image", "added_flops_per_image"):
            print(f"  {key:<22}{counts[key] / 1e9:>12.4f}G   LoRA (rank 16): {counts['lora'][key] / 1e9:>8.4f}G")
        results["llava_onevision_7b"] = counts
    return results


if __name__ == "__main__":
    main(make_parser().parse_args())
