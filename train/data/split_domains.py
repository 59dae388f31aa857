"""Split a training mixture into one file per domain by each row's source name (Mixpert's per-domain data, Table 1).

    python -m train.data.split_domains --mapping train/configs/data/mixpert_llava_ov_domains.yaml \\
        --input data/llava_ov_si.jsonl --output_dir data/mixpert_domains [--source_field source] \\
        [--unmatched error|general|drop]

Writes `<domain>.jsonl` (`.parquet` for parquet inputs), rows unchanged plus `domain`, and `counts.json`; prints the
counts. A row whose source is in no domain of the mapping is an error (the message names the file, row and source)
unless `--unmatched general` or `--unmatched drop`; a source matching two domains is always an error.
Relative image paths are rewritten to start from `--output_dir` (absolute ones are kept), so the split files load
with the default image root (their folder) whatever the inputs' folders; images outside `--output_dir` (`../` paths)
need `--allow_images_outside_root true` when training.
See `chimera_mixpert.data.domains`.
"""

from __future__ import annotations

import argparse

from chimera_mixpert.data.domains import UNMATCHED_POLICIES, format_counts, split_by_domain


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mapping", required=True, help="YAML file: domain -> list of source names or globs")
    parser.add_argument("--input", required=True, nargs="+", help=".jsonl / .json / .parquet file(s), one kind")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--source_field", default="source", help="the row field naming its source dataset")
    parser.add_argument("--unmatched", default="error", choices=UNMATCHED_POLICIES,
                        help="rows whose source is not in the mapping: error (default), general, or drop (counted)")
    return parser


def main(args: argparse.Namespace) -> dict:
    counts = split_by_domain(args.input, args.mapping, args.output_dir, source_field=args.source_field,
                             unmatched=args.unmatched)
    print(format_counts(counts))
    print(f"Wrote {args.output_dir} (counts.json)")
    return counts


if __name__ == "__main__":
    main(make_parser().parse_args())
