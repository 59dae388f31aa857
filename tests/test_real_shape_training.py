"""Every training stage with the shipped real configs (`train/configs/real/`) at real shape, on the CPU: the model
swapped for a `chimera_mixpert.real_shapes` one with one layer per tower, 2 optimizer steps each, batch 1, bf16
autocast with fp32 master weights (`python -m bench.gpu_check --device cpu --shape real --num_layers 1`). Too slow for
CI's budget: marker `real`, run with `python -m pytest -m real -s`; the seconds per step it prints are in the README."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.real
def test_every_stage_with_the_real_configs_at_real_shape():
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--shape", "real",
                          "--num_layers", "1"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=3600)
    lines = [line for line in run.stdout.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))]
    print("\n".join(lines))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert [line.split(" ")[0] for line in lines] == ["PASS"] * 4 + ["SKIP"] + ["PASS"] * 2
