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


def _fake_lab(values):
    """`run_labs` stand-in for `bench.reproducible_digest`: writes two weight files instead of training."""
    import torch
    from safetensors.torch import save_file

    def run_labs(jobs, workers):
        (folder, config), = jobs
        assert workers == 1 and config.kernels == "reproducible" and config.joint_steps == 60
        for name, value in zip(("joint", "mixpert"), values):
            os.makedirs(os.path.join(folder, name))
            save_file({"w": torch.full((3,), float(value))}, os.path.join(folder, name, "model.safetensors"))
            with open(os.path.join(folder, name, "trainer_state.json"), "w") as f:  # differs per run: not hashed
                f.write(folder)
        return [{"kernels": {"mode": "reproducible", "seed": config.seed}}]

    return run_labs


def test_reproducible_digest_hashes_every_weight_file_and_compares_with_expected(tmp_path, monkeypatch, capsys):
    import hashlib
    import json

    import train.quickstart
    from bench import reproducible_digest as bench

    monkeypatch.setattr(train.quickstart, "check_reproducible_kernels_apply", lambda: None)
    parser = bench.make_parser()
    monkeypatch.setattr(train.quickstart, "run_labs", _fake_lab([1, 2]))
    assert bench.main(parser.parse_args(["--output_dir", str(tmp_path / "a")])) == 0
    record = json.loads((tmp_path / "a" / "digest.json").read_text())
    files = {f"{name}/model.safetensors": hashlib.sha256((tmp_path / "a" / name / "model.safetensors").read_bytes())
             .hexdigest()[:12] for name in ("joint", "mixpert")}
    assert record["files"] == files
    assert record["digest"] == hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
    assert record["kernels"] == {"mode": "reproducible", "seed": 5} and record["versions"]["torch"]
    assert f"2 weight files, seed 5: digest {record['digest']}" in capsys.readouterr().out

    # the same weights again: the same digest, and --expected passes
    args = parser.parse_args(["--output_dir", str(tmp_path / "b"), "--expected", record["digest"]])
    assert bench.main(args) == 0
    # one value changed in one file: another digest, and --expected fails with a message
    monkeypatch.setattr(train.quickstart, "run_labs", _fake_lab([1, 3]))
    args = parser.parse_args(["--output_dir", str(tmp_path / "c"), "--expected", record["digest"]])
    assert bench.main(args) == 1
    assert f"differs from --expected {record['digest']}" in capsys.readouterr().err
    assert json.loads((tmp_path / "c" / "digest.json").read_text())["files"]["joint/model.safetensors"] == \
        files["joint/model.safetensors"]


def test_reproducible_digest_refuses_bad_arguments(tmp_path, capsys):
    from bench import reproducible_digest as bench

    parser = bench.make_parser()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.safetensors").write_bytes(b"x")
    with pytest.raises(SystemExit, match=r"--output_dir .*used is not empty: .* pass a new folder"):
        bench.main(parser.parse_args(["--output_dir", str(tmp_path / "used")]))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match=r"--output_dir .*a-file is a file: pass a new folder"):
        bench.main(parser.parse_args(["--output_dir", str(tmp_path / "a-file")]))
    for executable in (tmp_path / "nope", tmp_path / "a-file"):  # missing; present but not executable
        with pytest.raises(SystemExit, match=r"--executable .* is not an executable file: pass the path of a Python"):
            bench.main(parser.parse_args(["--output_dir", str(tmp_path / "new"), "--executable", str(executable)]))
    for bad in ("54055C4AF6B7", "54055c4af6b"):  # upper case; 11 digits
        with pytest.raises(SystemExit):
            parser.parse_args(["--expected", bad])
        assert "--expected takes the 12 lowercase hex digits this script prints" in capsys.readouterr().err
