"""Router-only evaluation of a saved Mixpert or Chimera (Mixpert Table 3, Chimera's router accuracy): no text is
generated, only the router runs (the shared vision layers or the generalist tower under it), batched.

    python -m train.evaluate_router --model_name_or_path runs/mixpert --dataset runs/quickstart/data --split validation
    python -m train.evaluate_router --model_name_or_path runs/mixpert --dataset val.jsonl \\
        --routing_strategy score_difference --routing_threshold 0.6 --output_dir runs/mixpert/router-eval

Writes `router_report.json`, `router_report.md` and `router_confusion.png` in `--output_dir` (default
`<model>/router-eval-<split>`): per-domain and overall router accuracy, the rate of images routed to their own expert,
the versatile fallback rate (Mixpert) and the confusion matrix (rows: the true data domain, columns: the expert chosen,
incl. "versatile" for Mixpert / "none" for Chimera).

How each number counts (Mixpert §4.3 reports the accuracy of the router's classification):

* `accuracy` (= `argmax_accuracy`): the router's top class against the image's domain. Chimera's class 0 ("no
  expert") is a class: an image of a domain without an expert is right when the router says "none". Mixpert's router
  has one class per domain and none for the versatile expert, so images of a domain without an expert are left out
  (`num_argmax_scored` says how many count).
* `routed_to_own_expert_rate`: the expert actually used after the routing rule (`--routing_strategy`, default the
  config's) against the image's domain's expert (the versatile expert / no expert for a domain without one).
* `fallback_rate` (Mixpert): images the rule (`score_threshold`, `score_difference`) sent to the versatile expert
  although the top class is a domain. A fallback is not a router error; it lowers `routed_to_own_expert_rate` only.

With `routing_granularity="sub_image"` every tile is one router decision, counted with its image's domain.

Data: the rows `train.evaluate` reads (a `save_to_disk` folder and `--split`, or a JSONL / parquet file; an image, a
question, an answer and a domain per row; the question builds the prompt the processor tiles images with). Mixpert
Table 3 measures on a 25K validation set (5K per domain); to make one:

* from the mini-lab's synthetic data: `data = chimera_mixpert.data.synthetic.build_dataset({"validation": 5000},
  mixed=0, seed=1)`, then `datasets.DatasetDict(validation=data["validation"]).save_to_disk("router-val")` (only
  that split: `load_from_disk` fails on the empty splits of this call) and `--dataset router-val --split
  validation`; the mini-lab's own folder (`runs/quickstart/data`) has no validation rows: use its `--split test`,
  which its router never trained on;
* from your own data: hold out N rows per domain that the router never trained on (e.g. with
  `datasets.Dataset.train_test_split(stratify_by_column="domain")` on a `ClassLabel` domain column) and write them
  as JSONL with `image` paths relative to the file.

The data-size sweep of Mixpert Table 3 (router accuracy against router training data per domain):

    for n in 1000 5000 10000 50000 200000; do
        python -m train.mixpert --phase router --model_name_or_path runs/mixpert-experts --train_file train.jsonl \\
            --router_samples_per_domain $n --seed 0 --output_dir runs/router-$n
        python -m train.evaluate_router --model_name_or_path runs/router-$n --dataset router-val --split validation
    done
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from tqdm.auto import tqdm

from chimera_mixpert.training import read_model_type
from evaluation.metrics import DOMAINS
from train.evaluate import (
    domain_targets,
    load_model,
    load_rows,
    plot_matrix,
    prompt_for,
    router_argmax,
    router_report,
    router_summary_lines,
)


def make_parser(prog: str | None = None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="a saved Mixpert or Chimera folder")
    parser.add_argument("--dataset", required=True, help="save_to_disk folder, or a .jsonl / .parquet file")
    parser.add_argument("--split", default="validation", help="the split of a save_to_disk folder")
    parser.add_argument("--output_dir", default=None, help="default: <model>/router-eval-<split>")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--routing_strategy", default=None, choices=["direct", "score_threshold", "score_difference"],
                        help="Mixpert only: the rule deciding the versatile fallback (default: the config's)")
    parser.add_argument("--routing_threshold", type=float, default=None,
                        help="Mixpert only: lambda (score_threshold) or tau (score_difference), in [0, 1]")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="let code in the model folder run (a processor with custom code); off by default")
    return parser


def check_router_domains(rows, model, dataset_name: str = "dataset") -> None:
    """Every data domain is one of the model's experts or a vocabulary domain (`evaluation.metrics.DOMAINS`, routed to
    no expert / the versatile one): a misspelt domain would otherwise count as a domain without an expert."""
    known = set(DOMAINS) | set(model.config.domains)
    unknown = {}
    for i, row in enumerate(rows):
        if row["domain"] not in known:
            unknown.setdefault(row["domain"], []).append(i)
    if unknown:
        domain, where = next(iter(unknown.items()))
        raise ValueError(f"{dataset_name}: domain {domain!r} (rows {where[:5]}{' ...' if len(where) > 5 else ''}) is "
                         f"neither an expert of the model ({list(model.config.domains)}) nor one of {list(DOMAINS)}: "
                         "rename it in the data.")


@torch.no_grad()
def route_rows(model, processor, rows, kind: str, batch_size: int = 32, routing_strategy=None, routing_threshold=None,
               progress: bool = True) -> dict:
    """The router's decisions for `rows` (one image each), through the model's public `router_inputs()` and its router
    module; nothing else of the model runs. Returns per routed row: `domains`, `expert_index` (after the routing
    rule; Chimera: the argmax) and `argmax` (the router's top class as an expert index)."""
    inner = model.model
    device = next(model.parameters()).device
    dtype = next(inner.native.parameters()).dtype
    out = {"domains": [], "expert_index": [], "argmax": []}
    for start in tqdm(range(0, len(rows), batch_size), desc="routing", disable=not progress):
        batch = rows[start : start + batch_size]
        extra = {"experts": []} if kind == "chimera" else {}  # Chimera: no expert encoder input is needed
        inputs = processor(images=[[r["image"]] for r in batch],
                           text=[prompt_for(processor, r["question"]) for r in batch],
                           return_tensors="pt", padding=True, **extra)
        pixel_values = inputs["pixel_values"].to(device, dtype)
        image_inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                        for k, v in inner.family.image_inputs(inputs).items()}
        input_ids = inputs["input_ids"].to(device)
        if kind == "mixpert":
            pooled, routed_image = inner.router_inputs(pixel_values, input_ids=input_ids, **image_inputs)
            logits = inner.vision_router(pooled.to(inner.vision_router.fc1.weight.dtype))
            chosen = inner.choose_experts(logits, routing_strategy=routing_strategy,
                                          routing_threshold=routing_threshold)
            images = routed_image.tolist()
        else:
            logits = inner.router(inner.router_inputs(pixel_values, input_ids=input_ids, **image_inputs).to(
                inner.router.weight.dtype))
            chosen, images = inner.choose_experts(logits), list(range(len(batch)))
        out["domains"] += [batch[i]["domain"] for i in images]
        out["expert_index"] += chosen.tolist()
        out["argmax"] += router_argmax(kind, logits).tolist()
    return out


def evaluate_router(model, processor, rows, kind: str, batch_size: int = 32, routing_strategy=None,
                    routing_threshold=None, dataset_name: str = "dataset", split: str = "validation",
                    progress: bool = True) -> dict:
    """The router report of `rows` (see the module docstring for how each rate counts)."""
    if kind not in ("mixpert", "chimera"):
        raise ValueError("train.evaluate_router needs a Mixpert or Chimera model (a native VLM has no router).")
    if not rows:
        raise ValueError(f"{dataset_name} / {split} has no rows to evaluate the router on.")
    check_router_domains(rows, model, dataset_name)
    routing = route_rows(model, processor, rows, kind, batch_size, routing_strategy, routing_threshold, progress)
    targets = domain_targets(kind, model, sorted({r["domain"] for r in rows}))
    labels = ["none" if kind == "chimera" else "versatile"] + list(model.config.domains)
    report = {"model_kind": kind, "dataset": dataset_name, "split": split, "num_images": len(rows)}
    if kind == "mixpert":
        report["routing_strategy"] = routing_strategy or model.config.routing_strategy
        report["routing_threshold"] = (model.config.routing_threshold if routing_threshold is None
                                       else float(routing_threshold))
        report["routing_granularity"] = model.config.routing_granularity
    return {**report, **router_report(routing["domains"], routing["expert_index"], routing["argmax"], targets, labels,
                                      kind)}


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _rate(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_router_report(report: dict, output_dir: str, title: str = "Router evaluation") -> dict:
    """`router_report.json`, `router_report.md` and `router_confusion.png` in `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "router_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    rule = (f", routing {report['routing_strategy']} (threshold {report['routing_threshold']})"
            if "routing_strategy" in report else "")
    lines = [f"# {title}", "", f"{report['dataset']} / {report['split']}: {report['num_images']} images, "
             f"{report['num_rows']} router decisions{rule}", "", *router_summary_lines(report), ""]
    lines += _table(["domain", "rows", "target expert", "router accuracy", "routed to own expert", "fallback"],
                    [[d, e["num_rows"], e["target"], _rate(e["argmax_accuracy"]), _rate(e["routed_to_own_expert_rate"]),
                      _rate(e["fallback_rate"])] for d, e in report["per_domain"].items()])
    lines += ["", "Confusion matrix (rows: true domain, columns: expert used):", ""]
    lines += _table(["domain \\ expert", *report["labels"]],
                    [[d, *row] for d, row in zip(report["domains"], report["domain_confusion_matrix"])])
    lines += ["", f"How the rates count: {report['counting']}"]
    with open(os.path.join(output_dir, "router_report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_domain_confusion(report, os.path.join(output_dir, "router_confusion.png"))
    return report


def plot_domain_confusion(report: dict, path: str) -> str:
    """The confusion matrix as a PNG (rows: true domain, columns: expert used)."""
    return plot_matrix(report["domain_confusion_matrix"], report["domains"], report["labels"], "expert used",
                       "true domain", f"Router accuracy {_rate(report['accuracy'])}", path)


def main(args):
    kind = read_model_type(args.model_name_or_path)  # the config only: a native VLM is refused before it loads
    if kind not in ("chimera", "mixpert"):
        raise ValueError(f"{args.model_name_or_path} holds a {kind!r} model: train.evaluate_router needs a Mixpert or "
                         "Chimera model (a native VLM has no router).")
    if kind == "chimera" and (args.routing_strategy or args.routing_threshold is not None):
        raise ValueError("--routing_strategy / --routing_threshold apply to Mixpert models only (Chimera's router "
                         "takes its argmax; class 0 is 'no expert').")
    if args.routing_threshold is not None and not 0.0 <= args.routing_threshold <= 1.0:
        raise ValueError(f"--routing_threshold must be in [0, 1] (it is compared with router probabilities), got "
                         f"{args.routing_threshold}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be a positive number of rows, got {args.batch_size}.")
    kind, model, processor = load_model(args.model_name_or_path, args.trust_remote_code)
    model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = load_rows(args.dataset, args.split, args.limit)
    report = evaluate_router(model, processor, rows, kind, args.batch_size, args.routing_strategy,
                             args.routing_threshold, dataset_name=os.path.basename(os.path.normpath(args.dataset)),
                             split=args.split)
    report["model"] = args.model_name_or_path
    output = args.output_dir or os.path.join(args.model_name_or_path, f"router-eval-{args.split}")
    name = os.path.basename(os.path.normpath(args.model_name_or_path))
    write_router_report(report, output, title=f"Router of {kind} {name}")
    print(open(os.path.join(output, "router_report.md")).read())
    return report


if __name__ == "__main__":
    main(make_parser().parse_args())
