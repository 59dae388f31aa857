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
