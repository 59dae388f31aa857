"""Evaluate a saved Chimera, Mixpert or plain native VLM on an image-QA dataset: per-domain scores with each domain's
standard metric, router accuracy and confusion matrix, as `report.json`, `report.md` and PNG plots.

    python -m train.evaluate --model_name_or_path runs/chimera --dataset runs/quickstart/data --split test \\
        --output_dir runs/chimera/eval
    python -m train.evaluate --model_name_or_path runs/mixpert --dataset data/test.jsonl --routing_strategy direct

`--dataset` is a folder written by `datasets.DatasetDict.save_to_disk` (the mini-lab's synthetic data) or a JSONL /
parquet file; rows need an image (`image`, or `images` paths), `question`, `answer`, `domain`, and optionally the
metric metadata (`html` for TEDS, `question_type` / `answer_type` / `choices` / `precision` for MathVista).
Metrics per domain: `evaluation.metrics.DEFAULT_DOMAIN_METRICS`, overridable with `--metric domain=name`.
The router block counts as `train.evaluate_router` does; with a Mixpert's `routing_granularity="sub_image"` every tile
is one router decision, counted with its image's domain.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import datasets
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from chimera_mixpert.data.loading import resolve_image_path
from chimera_mixpert.training import pretrained_classes, read_model_type
from evaluation.metrics import (
    DEFAULT_DOMAIN_METRICS,
    METRICS,
    confusion_matrix,
    router_accuracy,
    score_row,
)
from processing_chimera import load_rgb_image


logger = logging.getLogger(__name__)


def make_parser(prog: str | None = None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--dataset", required=True, help="save_to_disk folder, or a .jsonl / .parquet file")
    parser.add_argument("--split", default="test")
    parser.add_argument("--output_dir", default=None, help="default: <model>/eval-<split>")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--routing_strategy", default=None, choices=["direct", "score_threshold", "score_difference"],
                        help="Mixpert only: override the config's routing rule")
    parser.add_argument("--routing_threshold", type=float, default=None)
    parser.add_argument("--metric", action="append", default=[], metavar="DOMAIN=METRIC")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="let code in the model folder run (a native VLM or processor with custom code); off by "
                             "default: Chimera and Mixpert load with this project's classes")
    parser.add_argument("--oracle", action="store_true",
                        help="Chimera / Mixpert: send each image to its domain's expert instead of routing it (the "
                             "score routing would reach if it were perfect)")
    return parser


# ------------------------------------------------------------------------------------------------------- loading


def load_model(path: str, trust_remote_code: bool = False):
    """`(kind, model, processor)` for a Chimera / Mixpert folder (this project's classes) or a native VLM. Code from
    the folder runs only with `trust_remote_code`."""
    kind = read_model_type(path)
    kind = kind if kind in ("chimera", "mixpert") else "native"
    model_class, processor_class = pretrained_classes(kind)
    native = {"use_safetensors": True, "trust_remote_code": trust_remote_code} if kind == "native" else {}
    model = model_class.from_pretrained(path, **native).eval()
    return kind, model, processor_class.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_rows(dataset: str, split: str = "test", limit: int | None = None) -> list[dict]:
    if os.path.isdir(dataset):
        data = datasets.load_from_disk(dataset)
        data = data[split] if isinstance(data, datasets.DatasetDict) else data
    elif dataset.endswith((".jsonl", ".json", ".parquet")):
        data = datasets.load_dataset("parquet" if dataset.endswith(".parquet") else "json", data_files=dataset,
                                     split="train")
    else:
        raise ValueError(f"--dataset must be a save_to_disk folder or a .jsonl/.json/.parquet file, got {dataset}.")
    rows = []
    root = os.path.dirname(os.path.abspath(dataset)) if os.path.isfile(dataset) else dataset
    for i, row in enumerate(data):
        if limit is not None and i >= limit:
            break
        row = dict(row)
        if row.get("image") is None and row.get("images"):  # as in training: inside the root, decoded the same way
            path = resolve_image_path(row["images"][0], root, f"{dataset}, row {i}")
            row["image"] = load_rgb_image(path, f"{dataset}, row {i}")
        elif row.get("image") is not None:
            row["image"] = load_rgb_image(row["image"], f"{dataset}, row {i}")
        missing = [k for k in ("image", "question", "answer", "domain") if row.get(k) is None]
        if missing:
            raise ValueError(f"{dataset}, row {i}: missing {missing} "
                             "(an image, question, answer and domain are needed).")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- prediction


def prompt_for(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


@torch.no_grad()
def predict(model, processor, rows, batch_size=16, max_new_tokens=16, kind="native", progress=True,
            expert_labels=None, predictions_path=None, **generate_kwargs):
    """Greedy answers for `rows`; for Chimera / Mixpert also the expert each image used (`expert_labels`: one per row,
    to force experts instead of routing). With `predictions_path`, each batch's answers are appended to that JSONL
    file as soon as they exist, so a failure later loses nothing generated. Returns `(answers, routing or None)`,
    `routing = {"expert_index": [...], "argmax": [...], "row": [...]}`: per routed row (an image, or a tile with
    Mixpert's `sub_image` granularity), the expert used, the router's own top choice as an expert index
    (`router_argmax`) and the data row its image comes from (the model's `routed_image`, as `train.evaluate_router`
    maps tiles to rows)."""
    answers, experts, argmax, routed_rows = [], [], [], []
    stream = open(predictions_path, "w") if predictions_path else None
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="evaluating", disable=not progress):
            batch = rows[start : start + batch_size]
            inputs = processor(images=[[r["image"]] for r in batch],
                               text=[prompt_for(processor, r["question"]) for r in batch],
                               return_tensors="pt", padding=True)
            forced = {}
            if expert_labels is not None:
                forced["expert_labels"] = torch.tensor(expert_labels[start : start + batch_size])
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 return_dict_in_generate=True, **forced, **generate_kwargs)
            new = out.sequences[:, inputs["input_ids"].shape[1]:]
            batch_answers = [a.strip() for a in processor.batch_decode(new, skip_special_tokens=True)]
            answers += batch_answers
            if kind != "native":
                experts += out["expert_index"].tolist()
                argmax += router_argmax(kind, out["router_logits"]).tolist()
                # One image per row: image i of the batch is row start + i (Chimera: one decision per image).
                images = out["routed_image"].tolist() if out.get("routed_image") is not None else range(len(batch))
                routed_rows += [start + i for i in images]
            if stream is not None:
                for offset, (row, answer) in enumerate(zip(batch, batch_answers)):
                    stream.write(json.dumps({"row": start + offset, "domain": row["domain"],
                                             "question": row["question"], "answer": row["answer"],
                                             "prediction": answer}) + "\n")
                stream.flush()
    finally:
        tokenizer.padding_side = side
        if stream is not None:
            stream.close()
    return answers, ({"expert_index": experts, "argmax": argmax, "row": routed_rows} if kind != "native" else None)


def router_argmax(kind: str, router_logits: torch.Tensor) -> torch.LongTensor:
    """The router's top class as an expert index, whatever the routing rule did with it: Chimera's class `k` is
    expert `k` (0 = no expert); Mixpert's class `k - 1` is domain `k` (0, the versatile expert, is no class)."""
    top = router_logits.argmax(-1).cpu()
    return top + 1 if kind == "mixpert" else top


# ------------------------------------------------------------------------------------------------------- scoring


def check_domains(rows, kind: str, model, metric_overrides=None, dataset_name: str = "dataset") -> None:
    """Every data domain and every model domain must have a metric (the vocabulary `evaluation.metrics.DOMAINS`, or
    `--metric name=...`): a misspelt or foreign name (`doc` for `document`) would otherwise be scored by the wrong
    metric and routed to no expert, silently."""
    known = set(DEFAULT_DOMAIN_METRICS) | set(metric_overrides or {})
    unknown = {}
    for i, row in enumerate(rows):
        if row["domain"] not in known:
            unknown.setdefault(row["domain"], []).append(i)
    if unknown:
        domain, where = next(iter(unknown.items()))
        raise ValueError(
            f"{dataset_name}: domain {domain!r} (rows {where[:5]}{' ...' if len(where) > 5 else ''}) is not one of "
            f"{list(DEFAULT_DOMAIN_METRICS)}: rename it in the data, or name its metric with --metric {domain}=METRIC."
        )
    if kind != "native":
        foreign = [d for d in model.config.domains if d not in known]
        if foreign:
            raise ValueError(
                f"The model's domains {foreign} are not in the domain vocabulary {list(DEFAULT_DOMAIN_METRICS)}, so no "
                f"data row can be routed to them: rename them in the model's config (`config.domains`), or name "
                f"their metric with --metric {foreign[0]}=METRIC if the data uses the same names."
            )


def domain_targets(kind: str, model, domains_in_data: list[str]) -> dict:
    """The expert each data domain should be routed to (Chimera: 0 = no expert; Mixpert: k-th domain)."""
    if kind == "native":
        return {}
    model_domains = list(model.config.domains)
    return {d: (model_domains.index(d) + 1 if d in model_domains else 0) for d in domains_in_data}


def score_rows(rows, answers, metric_overrides=None) -> dict:
    per_domain = {}
    for index, (row, answer) in enumerate(zip(rows, answers)):
        domain = row["domain"]
        metric = (metric_overrides or {}).get(domain) or DEFAULT_DOMAIN_METRICS[domain]
        try:
            value = score_row(metric, answer, row)
        except (ValueError, TypeError, KeyError, IndexError) as error:
            # A malformed prediction (e.g. a generated table with `colspan="x"`) scores 0 instead of losing the report.
            logger.warning("row %d (%s, %s): prediction %r could not be scored (%s: %s); it scores 0.", index, domain,
                           metric, answer[:80], type(error).__name__, error)
            value = 0.0
        entry = per_domain.setdefault(domain, {"metric": metric, "total": 0.0, "num_samples": 0})
        entry["total"] += value
        entry["num_samples"] += 1
    for entry in per_domain.values():
        entry["score"] = entry.pop("total") / entry["num_samples"]
    return per_domain


ROUTER_COUNTING = (
    "accuracy (= argmax_accuracy): share of routed rows whose router top class is their domain's expert, as Mixpert "
    "Table 3 and Chimera report router accuracy; Chimera's class 0 (no expert) is a class, Mixpert rows of a domain "
    "without an expert have no router class and are left out. routed_to_own_expert_rate: share of rows whose expert "
    "after the routing rule is their domain's (the versatile expert / no expert for a domain without one). "
    "fallback_rate (Mixpert, routed): share of rows the rule sent to the versatile expert although the top class is a "
    "domain; a fallback is not a router error."
)


def _share(flags) -> float | None:
    flags = list(flags)
    return sum(map(bool, flags)) / len(flags) if flags else None


def _domain_confusion(domains, chosen, labels: list[str]) -> list[list[int]]:
    """Rows: the data domains (sorted), columns: `labels` (the experts, incl. versatile / none)."""
    rows = sorted(set(domains))
    union = list(labels) + [d for d in rows if d not in labels]
    matrix = confusion_matrix([labels[c] for c in chosen], list(domains), union)
    return [[int(v) for v in matrix[union.index(d)][: len(labels)]] for d in rows]


def router_report(domains, experts, argmax, targets: dict, labels: list[str], kind: str, oracle: bool = False) -> dict:
    """Routing of each routed row (an image, or a tile with Mixpert's `sub_image` granularity): `domains` its data
    domain, `experts` the expert it used, `argmax` the router's top class as an expert index (`router_argmax`),
    `targets` domain -> its expert index, `labels` the expert names (index 0 = "none" / "versatile"). How each rate
    counts: `ROUTER_COUNTING` (kept in the report as `counting`)."""
    truth = [targets[d] for d in domains]
    has_class = [kind == "chimera" or t != 0 for t in truth]
    fallback = [None if oracle or kind != "mixpert" else (e == 0 and a != 0) for e, a in zip(experts, argmax)]

    def rates(index):
        scored = [i for i in index if has_class[i]]
        return {
            "argmax_accuracy": router_accuracy([argmax[i] for i in scored], [truth[i] for i in scored])
            if scored else None,
            "routed_to_own_expert_rate": _share(experts[i] == truth[i] for i in index),
            "fallback_rate": None if fallback[index[0]] is None else _share(fallback[i] for i in index),
            "num_rows": len(index), "num_argmax_scored": len(scored),
        }

    overall = rates(list(range(len(truth))))
    per_domain = {d: {"target": labels[targets[d]], **rates([i for i, x in enumerate(domains) if x == d])}
                  for d in sorted(set(domains))}
    return {
        "accuracy": overall["argmax_accuracy"], **overall,
        "expert_share": sum(e != 0 for e in experts) / max(len(experts), 1),
        "labels": labels,
        "confusion_matrix": [list(map(int, row)) for row in confusion_matrix(experts, truth, list(range(len(labels))))],
        "argmax_confusion_matrix": [list(map(int, row))
                                    for row in confusion_matrix(argmax, truth, list(range(len(labels))))],
        "domains": sorted(set(domains)),
        "domain_confusion_matrix": _domain_confusion(domains, experts, labels),
        "domain_argmax_confusion_matrix": _domain_confusion(domains, argmax, labels),
        "per_domain": per_domain,
        "counting": ROUTER_COUNTING,
    }


def evaluate(model, processor, rows, kind="native", batch_size=16, max_new_tokens=16, metric_overrides=None,
             dataset_name="dataset", split="test", progress=True, oracle=False, predictions_path=None,
             **generate_kwargs) -> dict:
    """Scores per domain (+ routing for Chimera / Mixpert) as a report dict (see `write_report`). `oracle=True`
    sends every image to the expert of its domain instead of routing it; `predictions_path` streams the answers to a
    JSONL file as they are generated."""
    check_domains(rows, kind, model, metric_overrides, dataset_name)
    forced = None
    if oracle:
        targets = domain_targets(kind, model, sorted({r["domain"] for r in rows}))
        forced = [targets[r["domain"]] for r in rows]
    answers, routing = predict(model, processor, rows, batch_size, max_new_tokens, kind, progress,
                               expert_labels=forced, predictions_path=predictions_path, **generate_kwargs)
    per_domain = score_rows(rows, answers, metric_overrides)
    report = {
        "model_kind": kind, "dataset": dataset_name, "split": split, "num_samples": len(rows),
        "experts": "oracle" if oracle else ("routed" if kind != "native" else None),
        "per_domain": per_domain,
        "overall": sum(e["score"] for e in per_domain.values()) / max(len(per_domain), 1),
        "predictions": [{"domain": r["domain"], "question": r["question"], "answer": r["answer"], "prediction": a}
                        for r, a in zip(rows, answers)],
    }
    if routing is not None:
        targets = domain_targets(kind, model, sorted({r["domain"] for r in rows}))
        names = ["none" if kind == "chimera" else "versatile"] + list(model.config.domains)
        # Every decision (a tile with sub_image routing) counts with its image's domain, as in train.evaluate_router.
        report["router"] = router_report([rows[i]["domain"] for i in routing["row"]], routing["expert_index"],
                                         routing["argmax"], targets, names, kind, oracle=oracle)
        if kind == "mixpert":
            report["router"]["routing_granularity"] = model.config.routing_granularity
    return report


# ------------------------------------------------------------------------------------------------------- outputs


def write_report(report: dict, output_dir: str, title: str = "Evaluation") -> dict:
    """`report.json`, `report.md` and plots (`per_domain.png`, `router_confusion.png` when routed)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    oracle = " (oracle experts: each image sent to its domain's expert)" if report.get("experts") == "oracle" else ""
    lines = [f"# {title}", "", f"{report['dataset']} / {report['split']}: {report['num_samples']} samples{oracle}", "",
             "| domain | metric | score | samples |", "|---|---|---|---|"]
    for domain, e in sorted(report["per_domain"].items()):
        lines.append(f"| {domain} | {e['metric']} | {e['score']:.3f} | {e['num_samples']} |")
    lines.append(f"| **mean** | | {report['overall']:.3f} | |")
    if "router" in report:
        lines += ["", *router_summary_lines(report["router"])]
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_per_domain({"model": report}, os.path.join(output_dir, "per_domain.png"))
    if "router" in report:
        plot_confusion(report["router"], os.path.join(output_dir, "router_confusion.png"), sorted(report["per_domain"]))
    return report


def _rate(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def router_summary_lines(router: dict) -> list[str]:
    """Markdown lines: router (argmax) accuracy, routed-to-own-expert rate, fallback rate, and how they count."""
    lines = [f"Router accuracy: {_rate(router['accuracy'])} (the router's top class; {router['num_argmax_scored']} "
             f"of {router['num_rows']} router decisions have a router class)",
             f"Routed to their own expert: {_rate(router['routed_to_own_expert_rate'])}"]
    if router.get("fallback_rate") is not None:
        lines.append(f"Versatile fallback rate: {_rate(router['fallback_rate'])}")
    return lines


def plot_per_domain(reports: dict, path: str, title: str = "Score per domain") -> str:
    """Grouped bars: one group per domain, one bar per report (e.g. joint vs Mixpert)."""
    domains = sorted({d for r in reports.values() for d in r["per_domain"]})
    width = 0.8 / max(len(reports), 1)
    fig = Figure(figsize=(1.2 * len(domains) + 2, 3.5))  # no pyplot: no global backend, no figure to close
    ax = fig.subplots()
    for i, (name, report) in enumerate(reports.items()):
        values = [report["per_domain"].get(d, {}).get("score", 0.0) for d in domains]
        ax.bar([x + i * width for x in range(len(domains))], values, width, label=name)
    ax.set_xticks([x + width * (len(reports) - 1) / 2 for x in range(len(domains))], domains)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_confusion(router: dict, path: str, data_domains=None) -> str:
    """Router confusion matrix (rows: target expert, columns: chosen expert)."""
    labels = router["labels"]
    return plot_matrix(router["confusion_matrix"], labels, labels, "routed to", "target expert",
                       f"Router accuracy {_rate(router['accuracy'])}", path)


def plot_matrix(matrix, row_labels, column_labels, xlabel: str, ylabel: str, title: str, path: str) -> str:
    """A count matrix as an annotated heat map PNG (no pyplot: no global backend)."""
    fig = Figure(figsize=(0.6 * len(column_labels) + 2, 0.6 * len(row_labels) + 1.5))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(column_labels)), column_labels, rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main(args):
    kind, model, processor = load_model(args.model_name_or_path, args.trust_remote_code)
    overrides = {}
    for pair in args.metric:
        domain, sep, metric = pair.partition("=")
        if not sep or metric not in METRICS:
            raise ValueError(f"--metric {pair!r}: expected DOMAIN=METRIC with METRIC one of {sorted(METRICS)}.")
        overrides[domain] = metric
    if args.oracle and kind == "native":
        raise ValueError("--oracle needs a Chimera or Mixpert model (a native VLM has no experts to force).")
    if args.oracle and args.routing_strategy:
        raise ValueError("--oracle replaces routing; drop --routing_strategy.")
    generate_kwargs = {}
    if kind == "mixpert":  # per-call routing: the model validates both (a threshold outside [0, 1] is refused)
        if args.routing_strategy:
            generate_kwargs["routing_strategy"] = args.routing_strategy
        if args.routing_threshold is not None:
            generate_kwargs["routing_threshold"] = args.routing_threshold
    elif args.routing_strategy or args.routing_threshold is not None:
        raise ValueError("--routing_strategy / --routing_threshold apply to Mixpert models only.")
    if args.routing_threshold is not None and not 0.0 <= args.routing_threshold <= 1.0:
        raise ValueError(f"--routing_threshold must be in [0, 1] (it is compared with router probabilities), got "
                         f"{args.routing_threshold}.")
    rows = load_rows(args.dataset, args.split, args.limit)
    output = args.output_dir or os.path.join(args.model_name_or_path, f"eval-{args.split}")
    os.makedirs(output, exist_ok=True)
    report = evaluate(model, processor, rows, kind, args.batch_size, args.max_new_tokens, overrides,
                      dataset_name=os.path.basename(os.path.normpath(args.dataset)), split=args.split,
                      oracle=args.oracle,
                      predictions_path=os.path.join(output, "predictions.jsonl"), **generate_kwargs)
    report["model"] = args.model_name_or_path
    write_report(report, output, title=f"{kind} {os.path.basename(os.path.normpath(args.model_name_or_path))}")
    print(open(os.path.join(output, "report.md")).read())
    return report


if __name__ == "__main__":
    main(make_parser().parse_args())
