"""Build DPO preference pairs (Chimera's stage 3 data) from a trained model's own sampled answers.

Chimera (arXiv 2412.05983, §3.4 / §4) runs DPO on preference pairs "constructed from 60K public data". This command
samples `--num_samples` answers per question from a saved Chimera, Mixpert or native VLM, scores each with the
question's domain metric (`evaluation.metrics.DEFAULT_DOMAIN_METRICS`, overridable with `--metric domain=name`), and
pairs a correct answer (score >= `--threshold`) as `chosen` with an incorrect one as `rejected`:

    python -m train.make_preference_pairs --model_name_or_path runs/chimera-stage2 --dataset runs/quickstart/data \\
        --split train --output_dir runs/preference-data --num_samples 8 --metric table=exact_match
    python -m train.dpo --config train/configs/tiny/chimera_dpo.yaml --model_name_or_path runs/chimera-stage2 \\
        --train_file runs/preference-data/preferences.jsonl --output_dir runs/chimera-dpo

- Identical answers (after stripping whitespace) count once. Up to `--pairs_per_question` pairs per question (default
  1): the best correct answer against the worst incorrect one first, then further distinct answers (see
  `chimera_mixpert.preferences`).
- Every sample correct: the question gives no pair. No sample correct: no pair, unless `--reference_as_chosen`, which
  makes the reference answer the chosen one (then `--num_samples 1` is allowed).
- `--dataset`: as `train.evaluate` reads it (a `save_to_disk` folder or a JSONL / parquet file with an image,
  `question`, `answer` and `domain` per row).
- Output (`--output_dir`): `preferences.jsonl` in TRL's preference format (`prompt` / `chosen` / `rejected`
  conversational, `images` as paths relative to the file: `train.dpo --train_file` reads it as is), the images of the
  questions that gave pairs under `images/` (copied as PNG, so the folder is self-contained), and `stats.json`
  (questions, pairs, per-domain yield, reference fallbacks, sample accuracy, the settings). An existing
  `preferences.jsonl` is refused unless `--overwrite_output_dir`, which first deletes the earlier run's outputs
  (`preferences.jsonl`, `stats.json`, `images/q*.png`; other files stay) so no stale image is left.
- Deterministic: the same model, data, flags (`--seed`, `--batch_size` included) and machine give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch

from chimera_mixpert.preferences import (
    PREFERENCE_FILE,
    STATS_FILE,
    PairRules,
    parse_metric_overrides,
    sample_answers,
    summary_table,
    write_preference_folder,
)
from chimera_mixpert.training import dtype_from_name, pretrained_classes, read_model_type
from train.evaluate import check_domains, load_rows


logger = logging.getLogger(__name__)


def make_parser(prog: str | None = None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="a saved Chimera, Mixpert or native VLM")
    parser.add_argument("--dataset", required=True, help="save_to_disk folder, or a .jsonl / .parquet file")
    parser.add_argument("--split", default="train", help="split of a save_to_disk folder")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help=f"replace the {PREFERENCE_FILE} / {STATS_FILE} / images/ already in --output_dir (an "
                        "earlier run's outputs are deleted first)")
    parser.add_argument("--num_samples", type=int, default=8, help="answers sampled per question")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=None, help="default: the model's generation config")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8, help="questions per generate call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metric", action="append", default=[], metavar="DOMAIN=METRIC",
                        help="score DOMAIN with METRIC instead of its default (repeatable)")
    parser.add_argument("--threshold", type=float, default=1.0,
                        help="an answer is correct when its score is >= this (scores are in [0, 1])")
    parser.add_argument("--pairs_per_question", type=int, default=1, help="at most this many distinct pairs")
    parser.add_argument("--reference_as_chosen", action="store_true",
                        help="when no sample is correct, pair the reference answer (chosen) with the samples")
    parser.add_argument("--limit", type=int, default=None, help="use the first N rows only")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as saved)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="let code in the model folder run (a native VLM or processor with custom code)")
    return parser


def check_args(args) -> None:
    """Refuse flags that cannot give pairs, each with the fix, before anything is loaded."""
    positive = {"--num_samples": args.num_samples, "--max_new_tokens": args.max_new_tokens,
                "--batch_size": args.batch_size, "--pairs_per_question": args.pairs_per_question}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}.")
    if args.num_samples < 2 and not args.reference_as_chosen:
        raise ValueError(f"--num_samples {args.num_samples}: one sample cannot be both the correct and the incorrect "
                         "answer of a pair; sample 2 or more, or pass --reference_as_chosen to pair the reference "
                         "answer with the samples.")
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1] (metric scores are), got {args.threshold}.")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0 for sampling, got {args.temperature}.")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}.")
    if args.top_k is not None and args.top_k < 0:
        raise ValueError(f"--top_k must be >= 0 (0 disables it), got {args.top_k}.")
    target = os.path.join(args.output_dir, PREFERENCE_FILE)
    if os.path.exists(target) and not args.overwrite_output_dir:
        raise FileExistsError(f"{target} already exists: pass --overwrite_output_dir to replace it, or choose another "
                              "--output_dir.")


def load_model(path: str, dtype=None, device=None, trust_remote_code: bool = False):
    """`(kind, model, processor)` as `train.evaluate.load_model`, in `dtype` (Chimera / Mixpert keep their routers in
    fp32) and on `device`."""
    kind = read_model_type(path)
    kind = kind if kind in ("chimera", "mixpert") else "native"
    model_class, processor_class = pretrained_classes(kind)
    native = {"use_safetensors": True, "trust_remote_code": trust_remote_code} if kind == "native" else {}
    model = model_class.from_pretrained(path, dtype=dtype, **native).eval()
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return kind, model, processor_class.from_pretrained(path, trust_remote_code=trust_remote_code)


def main(args):
    check_args(args)
    overrides = parse_metric_overrides(args.metric)
    rows = load_rows(args.dataset, args.split, args.limit)
    if not rows:
        raise ValueError(f"{args.dataset} (split {args.split!r}) has no rows.")
    # Only the data's domains matter here (the model's routing is its own business): each needs a metric.
    check_domains(rows, "native", None, overrides, dataset_name=args.dataset)
    kind, model, processor = load_model(args.model_name_or_path, dtype_from_name(args.dtype), args.device,
                                        args.trust_remote_code)
    generation = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
    if args.top_k is not None:
        generation["top_k"] = args.top_k
    samples = sample_answers(model, processor, rows, args.num_samples, args.batch_size, args.seed, **generation)
    rules = PairRules(args.threshold, args.pairs_per_question, args.reference_as_chosen, overrides)
    settings = {"model": args.model_name_or_path, "model_kind": kind, "dataset": args.dataset, "split": args.split,
                "limit": args.limit, "num_samples": args.num_samples, **generation, "top_k": args.top_k,
                "batch_size": args.batch_size, "seed": args.seed, "dtype": args.dtype, "threshold": args.threshold,
                "pairs_per_question": args.pairs_per_question, "reference_as_chosen": args.reference_as_chosen,
                "metrics": {d: rules.metric(d) for d in sorted({r["domain"] for r in rows})}}
    stats = write_preference_folder(args.output_dir, rows, samples, rules, settings)
    print(summary_table(stats))
    print(f"\n{stats['pairs']} pairs from {stats['questions']} questions "
          f"({stats['reference_as_chosen']} with the reference as chosen, {stats['reference_below_threshold']} of "
          f"them scoring below --threshold) -> {os.path.join(args.output_dir, PREFERENCE_FILE)}; stats: "
          f"{os.path.join(args.output_dir, STATS_FILE)}")
    if not stats["pairs"]:
        logger.warning("No pair was written (%s): every sample of a question was right, or none was; pass "
                       "--reference_as_chosen to pair the reference with wrong samples, or sample more "
                       "(--num_samples, --temperature).",
                       json.dumps({k: stats[k] for k in ("all_correct", "no_correct")}))
    return stats


if __name__ == "__main__":
    main(make_parser().parse_args())
