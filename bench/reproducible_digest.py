"""Does this machine compute the mini-lab's pinned bits? A reduced lab (every stage, seed 5, 40 training images per
domain, 60 joint steps: about 2 minutes on 2 cores) runs with `--kernels reproducible`, and every weight file it
writes is hashed into one digest.

    python -m bench.reproducible_digest --output_dir runs/digest
    python -m bench.reproducible_digest --output_dir runs/digest-2 --expected 54055c4af6b7   # exit 1 if it differs

The README ("Reproducible kernels") gives the digest measured on other machines with the README's software. The same
digest here means this machine trains the same weights from the same seed, so the full lab's pinned table
(`train.quickstart --seeds 5,6,7 --kernels reproducible`, about 45 minutes) should come out to the digit; a different
one with the same software versions (written to `digest.json`) is a CPU-dependent kernel the pins miss.

`--executable` runs the pinned lab under another Python command (`multiprocessing.set_executable`); a script that
runs `exec qemu-x86_64 -cpu Nehalem /path/to/python "$@"` checks an emulated CPU of another vendor and instruction set
(qemu-user from Debian's `qemu-user` package; 44 times slower, measured).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The reduced lab: every stage of `train.quickstart`'s lab, shortened. Changing it changes the digest (README).
REDUCED = {"train_per_domain": 40, "test_per_domain": 10, "mixed": 6, "caption_steps": 20, "joint_steps": 60,
           "specialist_steps": 10, "stage1_steps": 10, "stage2_steps": 10, "dpo_steps": 4, "mixpert_expert_steps": 4,
           "router_epochs": 4, "chimera_router_epochs": 4}
PACKAGES = ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "tokenizers", "safetensors", "numpy",
            "pillow")


def make_parser(prog: str | None = None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/digest",
                        help="a new or empty folder (every weight file in it is hashed)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--expected", type=_digest_text, default=None,
                        help="the 12-hex-digit digest to compare with (exit 1 if it differs)")
    parser.add_argument("--executable", default=None,
                        help="the Python command the pinned lab runs under (default: this Python)")
    return parser


def _digest_text(text: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{12}", text):
        raise argparse.ArgumentTypeError(f"--expected takes the 12 lowercase hex digits this script prints; "
                                         f"got {text!r}")
    return text


def weights_digest(folder: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """sha256 of each `*.safetensors` under `folder` (first 12 hex digits, by path relative to it), and one digest
    over that mapping (JSON with sorted keys)."""
    files = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()[:12]
             for p in sorted(Path(folder).rglob("*.safetensors"))}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12], files


def package_versions() -> dict[str, str | None]:
    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {name: installed(name) for name in PACKAGES}


def main(args) -> int:
    from train.quickstart import LabConfig, check_reproducible_kernels_apply, run_labs  # noqa: PLC0415 (--help stays fast)

    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise SystemExit(f"--output_dir {args.output_dir} is a file: pass a new folder")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        raise SystemExit(f"--output_dir {args.output_dir} is not empty: the digest hashes every weight file in it; "
                         "pass a new folder")
    if args.executable is not None:
        if not (os.path.isfile(args.executable) and os.access(args.executable, os.X_OK)):
            raise SystemExit(f"--executable {args.executable} is not an executable file: pass the path of a Python "
                             "or of a script that runs one (a command line with arguments goes in such a script)")
        import multiprocessing  # noqa: PLC0415 (only here)

        # A process-wide setting: this script is a command, it ends after the one lab.
        multiprocessing.set_executable(args.executable)  # the pinned lab runs in a spawned process (run_labs)
    check_reproducible_kernels_apply()
    start = time.perf_counter()
    results = run_labs([(args.output_dir, LabConfig(**REDUCED, kernels="reproducible", seed=args.seed))], 1)[0]
    digest, files = weights_digest(args.output_dir)
    record = {"digest": digest, "seed": args.seed, "files": files, "versions": package_versions(),
              "python": sys.version.split()[0], "kernels": results["kernels"],
              "wall_seconds": round(time.perf_counter() - start, 1), "executable": args.executable}
    with open(os.path.join(args.output_dir, "digest.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(f"{len(files)} weight files, seed {args.seed}: digest {digest} ({record['wall_seconds']} s; versions and "
          f"kernels in {os.path.join(args.output_dir, 'digest.json')})")
    if args.expected is not None and digest != args.expected:
        print(f"the digest differs from --expected {args.expected}: compare the versions in digest.json with the "
              "README's; with the same versions, this machine computes other bits", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(make_parser().parse_args()))
