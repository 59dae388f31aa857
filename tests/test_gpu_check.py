"""`bench/gpu_check.py` runs its device checks on the CPU (on a GPU machine: `python -m bench.gpu_check`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_passes_every_stage_on_the_cpu():
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--shape", "tiny"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert [line.split(" on ")[0] for line in lines] == [
        "PASS chimera stage 1", "PASS chimera router stage", "PASS chimera stage 2", "PASS chimera dpo",
        "SKIP chimera stage 2 under deepspeed zero-2", "PASS mixpert expert phase", "PASS mixpert router phase"]
    assert "DeepSpeed needs a CUDA GPU" in lines[4]
