"""The router phases at the paper's scale: the feature cache's peak memory and the router's precision.

    python -m bench.router_training                       # 200 000 x 1152 cache (~0.9 GB), 20 000 rows the old way
    python -m bench.router_training --rows 20000 --old_rows 2000

1. Peak memory of the router feature cache, each way measured in its own process (peak RSS over the process's
   resident memory after imports), as a multiple of the features' own size N x D x 4 bytes:
   - `cache`: `chimera_mixpert.training.RouterFeatureCache` (float32 chunks appended to a file, memory-mapped), then
     one epoch through a shuffling `DataLoader` (every row read once);
   - `old`: what the router phases did before: features through `.tolist()` into a `datasets` table (float64 Arrow
     column), then the same epoch.
   Goal (the issue's): `cache` at most ~1.2 x N x D x 4 bytes.
2. The router's updates in a bf16 model: Mixpert's router MLP (1152 -> 1152 -> 5) under AdamW with the real
   config's learning rate (2e-4, cosine): the fraction of first-layer weights that change in one step at mid-schedule,
   with the router in bf16 (what a bf16 model used to train) and in fp32 (what the router phases now train and the
   models keep, `_keep_in_fp32_modules_strict`).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

import torch


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="cache rows N for the new cache")
    parser.add_argument("--old_rows", type=int, default=20_000,
                        help="cache rows for the old way (it needs ~100 B per value)")
    parser.add_argument("--width", type=int, default=1152, help="feature width D (SigLIP-400M: 1152)")
    parser.add_argument("--steps", type=int, default=400, help="schedule length of the precision check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--_child", choices=["cache", "old"], help=argparse.SUPPRESS)
    return parser


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(kind: str, rows: int, width: int) -> None:
    """Build the cache one way from 4096-row chunks, read every row once in shuffled batches, print peak - start."""
    import tempfile

    import datasets  # noqa: F401  (imported before the baseline is read, like the rest)

    from chimera_mixpert.training import RouterFeatureCache

    chunks = lambda: (torch.randn(min(4096, rows - s), width, generator=torch.Generator().manual_seed(s))  # noqa: E731
                      for s in range(0, rows, 4096))
    start = current_rss_mb()
    with tempfile.TemporaryDirectory() as folder:
        if kind == "cache":
            table = RouterFeatureCache(folder)
            for chunk in chunks():
                table.append(chunk, [0] * len(chunk))
            table.close()
        else:
            import datasets

            features = torch.cat(list(chunks()))
            table = datasets.Dataset.from_dict({"features": features.tolist(), "labels": [0] * rows})
            table = table.with_format("torch")
            del features
        loader = torch.utils.data.DataLoader(table, batch_size=128, shuffle=True)
        seen = sum(len(batch["labels"]) for batch in loader)
        assert seen == rows
        print(f"{rss_mb() - start:.1f}")


def measure_memory(args, kind: str, rows: int) -> float:
    out = subprocess.run([sys.executable, "-m", "bench.router_training", "--_child", kind, "--rows", str(rows),
                          "--width", str(args.width)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def updates_kept(dtype: torch.dtype, width: int, steps: int, seed: int) -> float:
    from modeling_mixpert import MixpertRouter

    torch.manual_seed(seed)
    router = MixpertRouter(width, width, 5)  # MixpertConfig's default router_hidden_size: the tower's width
    for module in router.modules():  # transformers' default init for linear layers
        if isinstance(module, torch.nn.Linear):
            module.weight.data.normal_(0.0, 0.02)
            module.bias.data.zero_()
    router.to(dtype)
    optimizer = torch.optim.AdamW(router.parameters(), lr=2e-4, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps))).item())
    kept = 0.0
    for step in range(steps // 2 + 1):
        features, labels = torch.randn(128, width), torch.randint(0, 5, (128,))
        before = router.fc1.weight.detach().clone()
        loss = torch.nn.functional.cross_entropy(router(features.to(dtype)).float(), labels)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        kept = float((router.fc1.weight.detach() != before).float().mean())
    return kept


def main(args):
    if args._child:
        return child(args._child, args.rows, args.width)
    size = lambda n: n * args.width * 4 / 2**20  # noqa: E731
    print(f"1. router feature cache, D = {args.width} (peak RSS added, MB; / N x D x 4 bytes)")
    for kind, rows in (("cache", args.rows), ("cache", args.old_rows), ("old", args.old_rows)):
        peak = measure_memory(args, kind, rows)
        print(f"   {kind:5s} N = {rows:>7d}: {peak:9.1f} MB = {peak / size(rows):5.2f} x {size(rows):.1f} MB")
    print(f"2. router updates kept at mid-schedule (fraction of fc1 weights changed by one step, lr 2e-4 cosine, "
          f"{args.steps} steps)")
    for dtype in (torch.bfloat16, torch.float32):
        kept = updates_kept(dtype, args.width, args.steps, args.seed)
        print(f"   router in {str(dtype).split('.')[-1]:8s}: {kept:.3f}")


if __name__ == "__main__":
    main(make_parser().parse_args())
