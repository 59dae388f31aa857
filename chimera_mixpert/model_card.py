"""Render the Hub model card (`README.md`) of a trained Chimera / Mixpert from its config and evaluation report.

    python -m chimera_mixpert.model_card --model_dir runs/chimera-8b --report runs/chimera-8b/eval/report.json \\
        --repo_id org/chimera-8b --base_model OpenGVLab/InternVL3-8B-hf --dataset org/chimera-sft

The template is `model_card.md` at the repository root (Hub YAML front matter + the Hub's model-card sections). The
front matter carries `library_name: transformers`, `pipeline_tag: image-text-to-text`, the license, `base_model`,
tags, datasets and a `model-index` with one result per evaluated domain (and the router's accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData


TEMPLATE = Path(__file__).resolve().parent.parent / "model_card.md"
PAPER = {"chimera": "Chimera (arXiv 2412.05983)", "mixpert": "Mixpert (arXiv 2505.24541)"}


def make_parser(prog: str | None = None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="saved Chimera / Mixpert folder")
    parser.add_argument("--report", default=None, help="evaluation report.json (python -m train.evaluate)")
    parser.add_argument("--repo_id", default=None, help="Hub repo id used in the usage snippet")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--base_model", action="append", default=None, help="repeatable; default: from the config")
    parser.add_argument("--dataset", action="append", default=None, help="training datasets (repeatable)")
    parser.add_argument("--output", default=None, help="default: <model_dir>/README.md")
    return parser


def _table(rows: list[list], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mixpert_experts_text(config: dict) -> str:
    """What each Mixpert domain expert owns, from `num_expert_layers` (K), `expert_projector`, `expert_adapter` and
    whether the family applies a final norm the expert owns (InternVL reading the last layer through InternViT's
    LayerNorm: `vision_feature_layer=-1` without mean pooling; see `versatile_modules`). Read off `config.json` (with
    transformers' defaults for fields a saved config leaves out), so the card needs no model."""
    k = int(config.get("num_expert_layers", 2))
    backbone = config["base_config"]
    owned = [] if k == 0 else ["The last vision layer"] if k == 1 else [f"The last {k} vision layers"]
    final_norm = (backbone.get("model_type") == "internvl" and backbone.get("vision_feature_layer", -1) == -1
                  and not backbone.get("vision_config", {}).get("use_mean_pooling", True))
    if final_norm:
        owned.append("the vision tower's final LayerNorm")
    projector = config.get("expert_projector", True)
    if projector:
        owned.append("the projector")
    if not owned:  # `MixpertConfig` refuses this too; the card reads `config.json` without building the config
        raise ValueError("This Mixpert config.json gives the experts nothing of their own (`num_expert_layers=0` with "
                         "`expert_projector=false`): fix config.json.")
    owned[0] = owned[0][0].upper() + owned[0][1:]
    subject = owned[0] if len(owned) == 1 else ", ".join(owned[:-1]) + " and " + owned[-1]
    verb = "are" if len(owned) > 1 or k > 1 else "is"
    if config.get("expert_adapter", "full") == "full":
        how = "cloned per domain (Mixpert §3.2)"
    else:
        how = (f"adapted per domain by LoRA updates of rank {config.get('expert_lora_rank')} (alpha "
               f"{config.get('expert_lora_alpha')}; not in the paper: the versatile weights are shared)")
    text = f"{subject} {verb} {how}; the base model's own form the versatile expert."
    if k == 0:
        text += " Every vision layer is shared by all experts."
    if not projector:
        text += " Every expert shares the base model's projector."
    return text


def _describe(config: dict) -> dict:
    kind = config["model_type"]
    if kind == "chimera":
        backbone = config["generalist_config"]
        experts = config.get("experts", [])
        rows = [[i, e["domain"], e["vision_config"]["model_type"],
                 "last" if e.get("feature_layer") is None else e["feature_layer"],
                 "yes" if e.get("feature_select_strategy") == "default" else "no"]
                for i, e in enumerate(experts, start=1)]
        architecture = (
            "Router classes: 0 = no expert, then the experts below (router: `Linear(vision_hidden, N+1)` on the "
            f"generalist's {config.get('router_feature', 'auto')} feature, Chimera §3.2). Expert encoders are frozen; "
            "each has a LayerNorm-Linear-GELU-Linear projector; an image routed to an expert gets that expert's tokens "
            "right after its own image tokens.\n\n"
            + _table(rows, ["class", "domain", "expert encoder", "feature layer", "CLS dropped"])
        )
        return {"kind": kind, "family": backbone["model_type"], "domains": [e["domain"] for e in experts],
                "base": [backbone.get("_name_or_path")] + [e["vision_config"].get("_name_or_path") for e in experts],
                "architecture": architecture, "fallback": "generalist alone (router class 0)"}
    if kind == "mixpert":
        backbone = config["base_config"]
        rows = [[i, d] for i, d in enumerate(config.get("domains", []), start=1)]
        architecture = (
            f"{_mixpert_experts_text(config)} A 2-layer MLP router on the pooled shared "
            f"features picks one expert per {'tile' if config.get('routing_granularity') == 'sub_image' else 'image'} "
            f"with the `{config.get('routing_strategy')}` rule (threshold {config.get('routing_threshold')}, §3.3).\n\n"
            + _table([[0, "versatile (fallback)"]] + rows, ["expert", "domain"])
        )
        return {"kind": kind, "family": backbone["model_type"], "domains": list(config.get("domains", [])),
                "base": [backbone.get("_name_or_path")], "architecture": architecture, "fallback": "versatile expert"}
    raise ValueError(f"{kind!r} is not a Chimera or Mixpert config.")


def eval_results(report: dict) -> list[EvalResult]:
    """model-index entries: one per evaluated domain, plus the router's accuracy (the domain is the dataset config,
    so the Hub keeps the entries apart)."""
    dataset = report.get("dataset", "evaluation")
    results = []
    for domain, entry in sorted(report.get("per_domain", {}).items()):
        results.append(EvalResult(
            task_type="image-text-to-text", dataset_type=str(dataset), dataset_name=f"{dataset} ({domain})",
            dataset_config=domain, dataset_split=report.get("split"), metric_type=entry["metric"],
            metric_value=round(float(entry["score"]), 4),
            metric_name=f"{domain}: {entry['metric']}",
        ))
    router = report.get("router")
    if router and router.get("accuracy") is not None:
        results.append(EvalResult(
            task_type="image-text-to-text", dataset_type=str(dataset), dataset_name=f"{dataset} (routing)",
            dataset_config="routing", dataset_split=report.get("split"), metric_type="accuracy",
            metric_value=round(float(router["accuracy"]), 4),
            metric_name="router accuracy",
        ))
    return results


def _training_text(model_dir: str) -> str:
    path = os.path.join(model_dir, "run_summary.json")
    if not os.path.isfile(path):
        return "See the training scripts (`train/chimera.py`, `train/mixpert.py`, `train/dpo.py`) of the repository."
    with open(path) as f:
        summary = json.load(f)
    fraction = summary.get("trainable", {}).get("fraction")
    parts = [f"Last run: `{summary.get('script')}`"]
    for key in ("stage", "phase", "gscm_ratio", "groups", "global_step", "world_size"):
        if summary.get(key) is not None:
            parts.append(f"{key} = {summary[key]}")
    if fraction is not None:
        parts.append(f"trainable fraction = {fraction:.3%}")
    return "; ".join(parts) + "."


def render_model_card(model_dir, report=None, repo_id=None, license="apache-2.0", base_models=None, datasets=None):
    """A `huggingface_hub.ModelCard` for the model in `model_dir` (see the module docstring)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        info = _describe(json.load(f))
    if isinstance(report, (str, os.PathLike)):
        with open(report) as f:
            report = json.load(f)
    base = [b for b in (base_models or info["base"]) if b and not os.path.isdir(b)] or None
    name = repo_id.split("/")[-1] if repo_id else os.path.basename(os.path.abspath(model_dir))
    data = ModelCardData(
        library_name="transformers", pipeline_tag="image-text-to-text", license=license, base_model=base,
        datasets=datasets, tags=[info["kind"], info["family"], "vision-language", "mixture-of-experts", "custom_code"],
        model_name=name, eval_results=eval_results(report) if report else None,
    )
    if report:
        rows = [[d, e["metric"], f"{e['score']:.4f}", e.get("num_samples", "")]
                for d, e in sorted(report["per_domain"].items())]
        results_table = _table(rows, ["domain", "metric", "score", "samples"])
        if report.get("router", {}).get("accuracy") is not None:
            results_table += f"\n\nRouter accuracy: {report['router']['accuracy']:.4f}."
        evaluation_text = (f"On `{report.get('dataset')}` ({report.get('split', 'test')} split, "
                           f"{report.get('num_samples', '?')} samples), metrics per domain as in "
                           "`evaluation/metrics.py`.")
    else:
        results_table = ""
        evaluation_text = "Not evaluated yet: run `python -m train.evaluate` and re-render this card."
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        model_name=name,
        model_summary=f"A {info['kind'].capitalize()} model ({PAPER[info['kind']]}) on a `{info['family']}` backbone, "
                      f"with experts for: {', '.join(info['domains']) or 'none'}.",
        model_description=("Chimera adds frozen domain-expert vision encoders to a generalist VLM, one chosen per "
                           "image by a router." if info["kind"] == "chimera" else
                           "Mixpert turns the last vision layers and projector of a VLM into per-domain experts plus a "
                           "versatile fallback, one chosen per image by a router, at almost no extra inference cost."),
        model_type=f"{info['kind']} (image-text-to-text)",
        backbone_family=info["family"],
        license=license,
        base_models_text=", ".join(base) if base else "trained from configs",
        architecture=info["architecture"],
        repo=repo_id or "(local)",
        repo_id=repo_id or model_dir,
        fallback_name=info["fallback"],
        out_of_scope=("Anything safety-critical. Domains the experts were not trained for fall back to the "
                      "generalist / versatile path and gain nothing."),
        training_data=", ".join(datasets) if datasets else "See the training configs.",
        training_procedure=_training_text(model_dir),
        evaluation_text=evaluation_text,
        results_table=results_table,
        limitations=("The router decides per image: a wrongly routed image gets the wrong expert (or none). Scores "
                     "depend on the evaluation protocol: MathVista answers are extracted with rules, not the official "
                     "GPT judge. Models trained by the mini-lab are tiny demonstrations, not useful assistants."),
    )


def main(args):
    card = render_model_card(args.model_dir, args.report, args.repo_id, args.license, args.base_model, args.dataset)
    output = args.output or os.path.join(args.model_dir, "README.md")
    card.save(output)
    return output


if __name__ == "__main__":
    print(main(make_parser().parse_args()))
