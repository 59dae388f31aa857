"""Build Chimera stage-1 alignment tasks (Chimera §3.4, stage 1) from structured sources.

    python -m train.data.alignment_tasks --source table=tables.jsonl --source chart=charts.jsonl \\
        --source math=diagrams.jsonl --source document=pages.jsonl --source caption=photos.jsonl \\
        --output_dir data/chimera_stage1 [--format messages|conversations] [--seed 0]

    # the mini-lab's data (a `synthetic.save_dataset` folder): sources derived from its rows, then the tasks
    python -m train.data.alignment_tasks --from_synthetic runs/quickstart/data --output_dir data/lab_stage1

Kinds and their source fields (`image` is relative to the source file's folder): table (`table`: rows of cells,
optional `title`), chart (`x`, `series`, optional `title` / `chart_type` / `x_name`), math (`description`),
document (`text`), ocr (`text`), caption (`caption`); any row may set `domain` (one of `evaluation.metrics.DOMAINS`).
Writes `alignment.jsonl` (images under `images/`: relative symlinks, so move the output folder together with the
sources, or `--images copy` for a self-contained folder) and `counts.json`; the file is what
`train.chimera --stage 1 --train_file` reads. An `--output_dir` holding an earlier run's outputs is refused unless
`--overwrite_output_dir` (which deletes them first, the whole `images/` folder and, with `--from_synthetic`,
`sources/` included).
See `chimera_mixpert.data.alignment`.
"""

from __future__ import annotations

import argparse
import os

from chimera_mixpert.data.alignment import (
    FORMATS,
    KINDS,
    TABLE_FORMATS,
    build_alignment_tasks,
    clear_previous_outputs,
    sources_from_synthetic,
)


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", default=[], metavar="KIND=FILE",
                        help=f"a source file of one kind ({', '.join(KINDS)}); repeat")
    parser.add_argument("--from_synthetic", default=None, metavar="DIR",
                        help="derive the sources from a mini-lab dataset folder (synthetic.save_dataset)")
    parser.add_argument("--synthetic_split", default="train", help="the split of --from_synthetic to use")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--format", default="messages", choices=FORMATS)
    parser.add_argument("--seed", type=int, default=0, help="picks each row's phrasing and table format")
    parser.add_argument("--images", default="link", choices=["link", "copy"],
                        help="symlink (default) or copy the images into OUTPUT_DIR/images")
    parser.add_argument("--table_formats", nargs="+", default=list(TABLE_FORMATS), choices=TABLE_FORMATS)
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="replace an earlier run's outputs in --output_dir (its images/ folder is cleared)")
    return parser


def _parse_sources(values: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        kind, sep, path = value.partition("=")
        if not sep or not path:
            raise ValueError(f"--source must look like KIND=FILE with KIND in {KINDS}, got {value!r}.")
        pairs.append((kind, path))
    return pairs


def main(args: argparse.Namespace) -> dict:
    sources = _parse_sources(args.source)
    if args.from_synthetic:
        from chimera_mixpert.data.synthetic import load_dataset  # noqa: PLC0415 (matplotlib: --from_synthetic only)

        # Its sources go into OUTPUT_DIR/sources: refuse (or clear) an earlier run before writing them.
        clear_previous_outputs(args.output_dir, overwrite=args.overwrite_output_dir, extra=("sources",))
        splits = load_dataset(args.from_synthetic)
        if args.synthetic_split not in splits:
            raise ValueError(f"--synthetic_split {args.synthetic_split!r} is not in {args.from_synthetic} "
                             f"(splits: {sorted(splits)}).")
        derived = sources_from_synthetic(splits[args.synthetic_split], os.path.join(args.output_dir, "sources"))
        sources += list(derived.items())
    counts = build_alignment_tasks(sources, args.output_dir, fmt=args.format, seed=args.seed, images=args.images,
                                   table_formats=args.table_formats, overwrite=args.overwrite_output_dir)
    for kind, n in counts["tasks"].items():
        print(f"{kind:<10} {n:>8}")
    print(f"{'total':<10} {counts['total']:>8}  -> {counts['output']}")
    return counts


if __name__ == "__main__":
    main(make_parser().parse_args())
