"""Chimera's inference overhead, measured side by side in one run (the machine is noisy: interleave, take medians).

    python -m bench.chimera_speed                 # small CPU-sized models, all three generalist families
    python -m bench.chimera_speed --family internvl --repeats 30 --batch 8

Two comparisons per family, on the same batch:
  1. general images (the router says "no expert"): Chimera forward / bare generalist forward
     -> the cost of the router (one linear layer on a feature the generalist computes anyway) and of our wrapping;
  2. expert images (every image routed to an expert): Chimera forward / (generalist forward + expert encoder alone)
     -> what the expert tokens add beyond encoding them (the LLM reads more tokens).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from chimera_mixpert.tiny import (
    FAMILIES,
    build_expert,
    build_expert_image_processor,
    build_generalist,
    build_processor,
    build_tokenizer,
    chat_prompt,
    random_images,
)


SIZES = {
    # hidden, vision hidden, text layers, vision layers, image px, patch px
    "tiny": dict(hidden_size=32, vision_hidden_size=32, num_text_layers=2, num_vision_layers=2, image_size=16,
                 patch_size=4),
    "small": dict(hidden_size=256, vision_hidden_size=192, num_text_layers=4, num_vision_layers=4, image_size=64,
                  patch_size=8),
    # 224 px / 14 px patches: 256 tokens per tile, where matrix products (not Python) dominate on a CPU
    "medium": dict(hidden_size=512, vision_hidden_size=384, num_text_layers=4, num_vision_layers=6, image_size=224,
                   patch_size=14),
}


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, nargs="*", default=list(FAMILIES))
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser


def _time(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_family(family: str, size: dict, batch: int, repeats: int) -> dict:
    from modeling_chimera import ChimeraForConditionalGeneration
    from processing_chimera import ChimeraProcessor

    tokenizer = build_tokenizer(family)
    image_size, patch = size["image_size"], size["patch_size"]
    model_kwargs = {k: v for k, v in size.items()}
    generalist = build_generalist(family, tokenizer, seed=0, **model_kwargs)
    reference = build_generalist(family, tokenizer, seed=0, **model_kwargs)  # identical weights, untouched
    expert_kwargs = dict(image_size=image_size, patch_size=patch, hidden_size=size["vision_hidden_size"],
                         num_layers=size["num_vision_layers"])
    experts = {"math": build_expert("clip_vision_model", seed=1, **expert_kwargs)}
    layout = {"image_end_token_id": tokenizer.convert_tokens_to_ids("</img>")} if family == "internvl" else {}
    model = ChimeraForConditionalGeneration.from_generalist(generalist, experts, **layout).eval()
    processor = ChimeraProcessor.from_generalist(
        build_processor(family, tokenizer, image_size=image_size, patch_size=patch),
        {"math": build_expert_image_processor("clip_vision_model", image_size=image_size, patch_size=patch)},
    )
    images = random_images(batch, seed=0, sizes=((image_size, image_size),))
    inputs = processor(images=[[im] for im in images], text=[chat_prompt(processor)] * batch, return_tensors="pt",
                       padding=True)
    native = {k: v for k, v in inputs.items() if k != "expert_pixel_values"}
    with torch.no_grad():
        model.model.router.weight.zero_()  # all-zero scores: argmax = class 0, the router says "no expert"
        assert model(**inputs).expert_index.eq(0).all()
        expert_labels = torch.ones(batch, dtype=torch.long)
        encoder, projector = model.model.expert_encoders["math"], model.model.expert_projectors["math"]
        runs = {
            "generalist": lambda: reference(**native),
            "chimera_general": lambda: model(**inputs),
            "generalist+expert_encoder": lambda: (reference(**native),
                                                  projector(encoder(inputs.expert_pixel_values[0]))),
            "chimera_expert": lambda: model(**inputs, expert_labels=expert_labels),
        }
        for fn in runs.values():  # warm-up
            fn()
        times = {name: [] for name in runs}
        for _ in range(repeats):
            for name, fn in runs.items():  # interleaved, so drift hits every variant alike
                times[name].append(_time(fn))
    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    expert_tokens = int(projector(encoder(inputs.expert_pixel_values[0][:1])).shape[1])
    return {
        "family": family,
        "ms": medians,
        "general_ratio": medians["chimera_general"] / medians["generalist"],
        "expert_ratio": medians["chimera_expert"] / medians["generalist+expert_encoder"],
        "prompt_tokens": int(inputs.input_ids.shape[1]),
        "expert_tokens_per_image": expert_tokens,
    }


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    print(f"size={args.size} {size} batch={args.batch} repeats={args.repeats} threads={torch.get_num_threads()}")
    header = (f"{'family':<16}{'generalist':>12}{'chimera(gen)':>14}{'ratio':>8}"
              f"{'gen+encoder':>14}{'chimera(exp)':>14}{'ratio':>8}{'prompt':>8}{'+expert':>9}")
    print(header)
    results = []
    for family in args.family:
        r = bench_family(family, size, args.batch, args.repeats)
        ms = r["ms"]
        print(f"{family:<16}{ms['generalist']:>10.2f}ms{ms['chimera_general']:>12.2f}ms{r['general_ratio']:>8.3f}"
              f"{ms['generalist+expert_encoder']:>12.2f}ms{ms['chimera_expert']:>12.2f}ms{r['expert_ratio']:>8.3f}"
              f"{r['prompt_tokens']:>8}{r['expert_tokens_per_image']:>9}")
        results.append(r)
    return results


if __name__ == "__main__":
    main(make_parser().parse_args())
