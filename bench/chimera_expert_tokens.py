"""Where does a Chimera gain or lose against its generalist? Ablations of the expert tokens on a mini-lab run.

    python -m train.quickstart --output_dir runs/quickstart
    python -m bench.chimera_expert_tokens --lab runs/quickstart            # expert domains of the test split

Every row is the same images and questions, scored with the lab's metrics; experts are forced by domain (oracle)
where a row says so, so the router's mistakes play no part:

* `joint`: the native generalist the lab trained.
* `assembled, no expert`: `from_generalist`'s output before any training, every image routed to "no expert". It must
  score exactly as `joint` (the generalist path is the generalist's); `identical` says whether every answer matched.
* `<stage>, no expert`: after Chimera stage 1 (+ the router stage) or stage 2, with no expert tokens: what the
  stage did to the generalist's own path (stage 1 trains the generalist's projector, Chimera §3.4; stage 2 the LLM).
* `<stage>, experts`: each image's own domain expert.
* `<stage>, experts masked`: the expert block (`<domain>`, the expert tokens, `</domain>`) in the sequence but masked
  from attention: the block's position shift alone.
* `<stage>, experts zeroed`: the expert tokens present with zero features: the tokens' presence without content.

A drop from `joint` to `assembled, no expert` would be a defect; from `joint` to `<stage>, no expert` is what the
stage's training did to the generalist's path; from `<stage>, no expert` to `<stage>, experts` is the experts' own
effect.
"""

from __future__ import annotations

import argparse
import os

import torch

# `main` imports transformers, the model classes and `train.evaluate` when it runs (`--help` stays fast).

EXPERT_DOMAINS = ("chart", "table", "math", "document")


def make_parser(prog: str | None = None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lab", required=True, help="a `train.quickstart --output_dir` folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--domains", nargs="+", default=list(EXPERT_DOMAINS))
    parser.add_argument("--stages", nargs="+", default=["chimera-router", "chimera-stage2"],
                        help="Chimera folders of the lab to ablate")
    parser.add_argument("--batch_size", type=int, default=32)
    return parser


def _masked_layout(inner, token_ids):
    """`inner.layout` whose attention mask hides `token_ids` (the expert blocks; the positions stay as laid out)."""
    layout = inner.layout
    ids = torch.tensor(sorted(token_ids))

    def masked(*args, **kwargs):
        out = layout(*args, **kwargs)
        if out.attention_mask is not None:
            out.attention_mask = out.attention_mask.masked_fill(torch.isin(out.input_ids, ids), 0)
        return out

    return masked


def ablate(model, processor, rows, batch_size: int) -> dict:
    """`{variant: (answers)}` for one Chimera: no expert, its domain's expert, that expert masked, zeroed."""
    from train.evaluate import domain_targets, predict  # noqa: PLC0415 (transformers: --help stays fast)

    targets = domain_targets("chimera", model, sorted({r["domain"] for r in rows}))
    oracle = [targets[r["domain"]] for r in rows]
    inner, config = model.model, model.config

    def answers(labels):
        return predict(model, processor, rows, batch_size, kind="chimera", progress=False, expert_labels=labels)[0]

    out = {"no expert": answers([0] * len(rows)), "experts": answers(oracle)}
    block = set(config.expert_token_ids) | {config.expert_start_token_id, config.expert_end_token_id} - {None}
    inner.layout = _masked_layout(inner, block)  # an instance attribute over the method, for this call only
    try:
        out["experts masked"] = answers(oracle)
    finally:
        del inner.layout
    hooks = [p.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
             for p in inner.expert_projectors.values()]
    try:
        out["experts zeroed"] = answers(oracle)
    finally:
        for hook in hooks:
            hook.remove()
    return out


def main(args) -> dict:
    from train.evaluate import load_model, load_rows, predict, score_rows  # noqa: PLC0415 (transformers: --help stays fast)
    from train.quickstart import LAB_METRICS  # noqa: PLC0415 (transformers: --help stays fast)

    rows = [r for r in load_rows(os.path.join(args.lab, "data"), args.split) if r["domain"] in args.domains]
    results = {}
    _, joint, joint_processor = load_model(os.path.join(args.lab, "joint"))
    results["joint"] = predict(joint, joint_processor, rows, args.batch_size, progress=False)[0]
    _, assembled, processor = load_model(os.path.join(args.lab, "chimera-assembled"))
    results["assembled, no expert"] = predict(assembled, processor, rows, args.batch_size, kind="chimera",
                                              progress=False, expert_labels=[0] * len(rows))[0]
    for stage in args.stages:
        _, model, processor = load_model(os.path.join(args.lab, stage))
        results.update({f"{stage}, {name}": a for name, a in ablate(model, processor, rows, args.batch_size).items()})
    scores = {name: {d: e["score"] for d, e in score_rows(rows, answers, LAB_METRICS).items()}
              for name, answers in results.items()}
    domains = sorted({r["domain"] for r in rows})
    print(f"{len(rows)} {args.split} rows ({', '.join(domains)}); one image = {len(domains) / len(rows):.3f} of a "
          "domain's score")
    print(f"{'variant':<36}" + "".join(f"{d:>10}" for d in domains) + f"{'mean':>8}")
    for name, per_domain in scores.items():
        mean = sum(per_domain.values()) / len(per_domain)
        print(f"{name:<36}" + "".join(f"{per_domain[d]:>10.3f}" for d in domains) + f"{mean:>8.3f}")
    identical = results["assembled, no expert"] == results["joint"]
    print(f"assembled, no expert identical to joint, answer for answer: {identical}")
    return {"scores": scores, "answers": results, "assembled_identical_to_joint": identical}


if __name__ == "__main__":
    main(make_parser().parse_args())
