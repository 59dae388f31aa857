"""Publish a saved Chimera / Mixpert folder to the Hub: weights (safetensors, sharded above `--max_shard_size`),
the model code (`configuration_*.py`, `modeling_*.py`, `processing_*.py`, `vlm_backbones.py`), `config.json` with
`auto_map`, the processor and its chat template, the generation config, and a model card rendered from the
evaluation report.

    python -m train.push --model_dir runs/chimera --repo_id org/chimera-tiny --report runs/chimera/eval-test/report.json

`model.push_to_hub(repo_id)` / `processor.push_to_hub(repo_id)` work too (they carry the code and `auto_map`); this
script adds the card and re-shards. Pull with
`AutoModelForImageTextToText.from_pretrained(repo_id, trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from huggingface_hub import HfApi

from chimera_mixpert.model_card import render_model_card

# `main` imports transformers and the model classes when it runs: at the top they would make `--help` (a tenth of a
# second) about 6 s slower.


def make_parser(prog: str | None = None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--repo_id", required=True)
    parser.add_argument("--report", default=None, help="evaluation report.json for the card's model-index")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--base_model", action="append", default=None)
    parser.add_argument("--dataset", action="append", default=None)
    parser.add_argument("--max_shard_size", default="5GB", help="e.g. 5GB, 500MB")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--commit_message", default="Upload model")
    return parser


def main(args):
    config_file = os.path.join(args.model_dir, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--model_dir {args.model_dir!r} has no config.json; pass a folder written by "
                                "save_pretrained (a training script's --output_dir).")
    if args.report is not None and not os.path.isfile(args.report):
        raise FileNotFoundError(f"--report {args.report!r} does not exist; run `python -m train.evaluate "
                                f"--model_name_or_path {args.model_dir} ...` first or drop --report.")
    if args.repo_id.count("/") > 1 or not args.repo_id.strip("/"):
        raise ValueError(f"--repo_id {args.repo_id!r} must be 'name' or 'org/name'.")
    with open(config_file) as f:
        kind = json.load(f).get("model_type")
    if kind == "chimera":
        from modeling_chimera import ChimeraForConditionalGeneration as model_class  # noqa: PLC0415 (transformers: --help stays fast)
        from processing_chimera import ChimeraProcessor as processor_class  # noqa: PLC0415 (transformers: --help stays fast)
    elif kind == "mixpert":
        from transformers import AutoProcessor as processor_class  # noqa: PLC0415 (transformers: --help stays fast)

        from modeling_mixpert import MixpertForConditionalGeneration as model_class  # noqa: PLC0415 (transformers: --help stays fast)
    else:
        raise ValueError(f"{args.model_dir} holds a {kind!r} model; train.push publishes Chimera or Mixpert folders.")
    model = model_class.from_pretrained(args.model_dir)
    # this project's / transformers' classes: no folder code
    processor = processor_class.from_pretrained(args.model_dir)
    api = HfApi()
    repo_id = api.create_repo(args.repo_id, private=args.private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as staging:
        model.save_pretrained(staging, max_shard_size=args.max_shard_size)
        processor.save_pretrained(staging)
        for extra in ("run_summary.json",):
            if os.path.isfile(os.path.join(args.model_dir, extra)):
                with open(os.path.join(args.model_dir, extra)) as src, open(os.path.join(staging, extra), "w") as dst:
                    dst.write(src.read())
        card = render_model_card(staging, args.report, repo_id, args.license, args.base_model, args.dataset)
        card.save(os.path.join(staging, "README.md"))
        api.upload_folder(folder_path=staging, repo_id=repo_id, commit_message=args.commit_message)
    return repo_id


if __name__ == "__main__":
    print(main(make_parser().parse_args()))
