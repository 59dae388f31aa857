"""Build the starting checkpoint of a training run from native parts, and save it (model + processor).

    # Chimera: a native generalist + expert encoders (paths or Hub repo ids), experts in router order
    python -m train.assemble chimera --generalist OpenGVLab/InternVL3-1B-hf \\
        --expert table=google/pix2struct-base --expert math=openai/clip-vit-large-patch14-336 \\
        --output_dir runs/chimera-assembled

    # Mixpert: upcycle a native VLM (K = 2 expert layers per domain, paper defaults)
    python -m train.assemble mixpert --base llava-hf/llava-onevision-qwen2-7b-si-hf \\
        --domains chart document math ocr general --output_dir runs/mixpert-upcycled
    # ... with K = 0 (projector-only experts, Mixpert Table 2) and LoRA experts of rank 16 (not in the paper)
    python -m train.assemble mixpert --base llava-hf/llava-onevision-qwen2-7b-si-hf --num_expert_layers 0 \\
        --expert_adapter lora --expert_lora_rank 16 --output_dir runs/mixpert-k0-lora

The output folder loads with `AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)` and is
what `train.chimera` / `train.mixpert` take as `--model_name_or_path`.
"""

from __future__ import annotations

import argparse

import torch

# `main` imports transformers and the model classes when it runs: at the top they would make `--help` about 4 s slower.


def make_parser(prog: str | None = None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="model", required=True)
    chimera = sub.add_parser("chimera", help="generalist + expert encoders -> Chimera")
    chimera.add_argument("--generalist", required=True, help="native llava_onevision / qwen2_vl / internvl model")
    chimera.add_argument("--expert", action="append", required=True, metavar="DOMAIN=MODEL",
                         help="an expert encoder (repeat, in router order); its image processor is loaded from MODEL")
    chimera.add_argument("--expert_feature_layer", action="append", default=[], metavar="DOMAIN=LAYER",
                         help="take hidden_states[LAYER] of that expert instead of its final output")
    chimera.add_argument("--router_feature", default="auto", choices=["auto", "cls", "mean"])
    mixpert = sub.add_parser("mixpert", help="upcycle a native VLM into Mixpert")
    mixpert.add_argument("--base", required=True, help="native llava_onevision / qwen2_vl / internvl model")
    mixpert.add_argument("--domains", nargs="+", default=["chart", "document", "math", "ocr", "general"])
    mixpert.add_argument("--num_expert_layers", type=int, default=2)
    mixpert.add_argument("--routing_strategy", default="score_difference",
                         choices=["direct", "score_threshold", "score_difference"])
    mixpert.add_argument("--routing_threshold", type=float, default=0.6)
    mixpert.add_argument("--routing_granularity", default="image", choices=["image", "sub_image"])
    mixpert.add_argument("--expert_adapter", default="full", choices=["full", "lora"],
                         help="domain experts as full copies (the paper) or LoRA updates of the versatile expert")
    mixpert.add_argument("--expert_lora_rank", type=int, default=None, help="with --expert_adapter lora (default 16)")
    mixpert.add_argument("--expert_lora_alpha", type=float, default=None,
                         help="with --expert_adapter lora (default 2 * rank)")
    for p in (chimera, mixpert):
        p.add_argument("--output_dir", required=True)
        p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: as saved)")
        p.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="also push the result to this repo")
    return parser


def _pairs(values: list[str], what: str) -> dict:
    pairs = {}
    for value in values:
        if "=" not in value:
            raise ValueError(f"{what} must look like DOMAIN=VALUE, got {value!r}.")
        key, val = value.split("=", 1)
        if key in pairs:
            raise ValueError(f"Duplicate domain {key!r} in {what}.")
        pairs[key] = val
    return pairs


def main(args):
    from transformers import AutoImageProcessor, AutoProcessor  # noqa: PLC0415 (transformers: --help stays fast)

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.model == "chimera":
        from modeling_chimera import ChimeraForConditionalGeneration  # noqa: PLC0415 (transformers: --help stays fast)
        from processing_chimera import ChimeraProcessor  # noqa: PLC0415 (transformers: --help stays fast)

        experts = _pairs(args.expert, "--expert")
        layers = {k: int(v) for k, v in _pairs(args.expert_feature_layer, "--expert_feature_layer").items()}
        unknown = sorted(set(layers) - set(experts))
        if unknown:
            raise ValueError(f"--expert_feature_layer for unknown experts {unknown}.")
        specs = {d: {"model": path, **({"feature_layer": layers[d]} if d in layers else {})}
                 for d, path in experts.items()}
        model = ChimeraForConditionalGeneration.from_generalist(
            args.generalist, specs, router_feature=args.router_feature, dtype=dtype
        )
        processor = ChimeraProcessor.from_generalist(
            AutoProcessor.from_pretrained(args.generalist),
            {d: AutoImageProcessor.from_pretrained(path) for d, path in experts.items()},
        )
    else:
        from modeling_mixpert import MixpertForConditionalGeneration  # noqa: PLC0415 (transformers: --help stays fast)

        model = MixpertForConditionalGeneration.from_base(
            args.base, domains=args.domains, num_expert_layers=args.num_expert_layers,
            routing_strategy=args.routing_strategy, routing_threshold=args.routing_threshold,
            routing_granularity=args.routing_granularity, dtype=dtype, expert_adapter=args.expert_adapter,
            **{k: getattr(args, k) for k in ("expert_lora_rank", "expert_lora_alpha") if getattr(args, k) is not None},
        )
        processor = AutoProcessor.from_pretrained(args.base)
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
        processor.push_to_hub(args.push_to_hub)
    return model, processor


if __name__ == "__main__":
    main(make_parser().parse_args())
