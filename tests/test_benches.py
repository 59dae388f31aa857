"""The benchmark scripts run (their numbers are read by people, not asserted: timings are noise on a shared CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["bench.chimera_speed", "--size", "tiny", "--repeats", "1"],
    ["bench.router_training", "--rows", "4096", "--old_rows", "512", "--steps", "4"],
])
def test_bench_script_runs(command):
    run = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip()


@pytest.mark.real
def test_real_shape_bench_runs_and_loading_stays_within_1_3_times_the_checkpoint():
    """`bench.real_shape` at one layer per tower (about 4 minutes: marker `real`, not in CI)."""
    run = subprocess.run([sys.executable, "-m", "bench.real_shape", "--num_layers", "1", "--repeats", "1",
                          "--dispatch_images", "2", "--dtypes", "fp32"], cwd=ROOT, capture_output=True, text=True,
                         timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    ratios = [float(line.rsplit("ratio ", 1)[1]) for line in run.stdout.splitlines() if "MB in" in line]
    assert len(ratios) == 3 and all(r <= 1.3 for r in ratios), run.stdout[-2000:]
    assert "general / generalist" in run.stdout and "per-image loop / grouped" in run.stdout
